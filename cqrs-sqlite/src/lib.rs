#![doc = include_str!("../README.md")]

mod config;
mod coordination;
mod direct;
mod error;
mod pages;
mod projection;
mod query;
mod rows;
mod writer;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use cqrs_core::store::batching::{BatchLimits, BatchQueue, Reservations};
use cqrs_core::{
    AppendCondition, AppendOutcome, AppendResult, CommandId, EventStore, ExpectedVersion, NewEvent, Position, Query,
    RecordedEvent, Snapshot, StoreError, StreamAppend, StreamId, Timestamp, Version,
};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{ConnectOptions, Row, SqliteConnection, SqlitePool};
use tokio::sync::{mpsc, oneshot, watch};

pub use crate::config::SqliteStoreConfig;
pub use crate::error::SqliteStoreError;
pub use crate::projection::{spawn_projection, spawn_projection_with, SqliteProjection};

use crate::direct::Direct;
use crate::error::{open_error, to_store_error};
use crate::rows::{command_result, limit, to_u64, EventDecoder, EVENT_COLUMNS};
use crate::writer::{AppendRequest, AtomicRequest, Core, Counters, WriteRequest, Writer};

/// How many writes may wait for the writer before callers wait to enqueue.
const QUEUE_CAPACITY: usize = 4096;

/// How many rows a read connection's SQLite thread may hand over before the reading task takes
/// them (sqlx's default is 50): with a page's rows buffered, that thread steps through the page
/// without waiting for the decoder, instead of the two threads waking each other every row.
const READ_ROW_BUFFER: usize = 1024;

/// A SQLite [`EventStore`] in one file. Cheap to clone: clones share the read pool and the
/// writer. See the crate documentation for durability and the ordering design.
#[derive(Clone)]
pub struct SqliteEventStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// Reads and checkpoint loads; its connections are `query_only`.
    readers: SqlitePool,
    /// Queue of the writer, which owns the receiving end and the only write connection:
    /// it ends (and closes that connection) when the last store handle is dropped.
    writes: mpsc::Sender<WriteRequest>,
    /// Last committed position, published by the writer after each commit.
    head: Arc<watch::Sender<Position>>,
    counters: Arc<Counters>,
    /// `read_all`'s connections (see `pages.rs`).
    pages: Arc<pages::Pages>,
    path: PathBuf,
    poll_interval: Duration,
}

impl std::fmt::Debug for SqliteEventStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteEventStore")
            .field("path", &self.inner.path)
            .field("head", &*self.inner.head.borrow())
            .finish_non_exhaustive()
    }
}

/// Counters of the writer since the store was opened, from
/// [`SqliteEventStore::stats`]. Useful to see group commit at work: many appends, few
/// transactions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct SqliteStoreStats {
    /// Write transactions committed (each one `COMMIT`, one WAL fsync).
    pub transactions: u64,
    /// Write transactions that failed and were rolled back (their callers got
    /// `StoreError::Unavailable`).
    pub failed_transactions: u64,
    /// Appends stored (duplicates and refused appends not counted).
    pub appends: u64,
    /// Events stored.
    pub events: u64,
    /// Appends refused inside a committed batch (conflicts, reused event ids, refused data).
    pub refused_appends: u64,
    /// The most requests (appends, checkpoint and snapshot saves) one transaction carried.
    pub largest_batch: u64,
}

impl SqliteEventStore {
    /// Opens (creating it if missing) the event store in the file at `path`, with the default
    /// [`SqliteStoreConfig`], and applies the schema migrations. Must be called inside a
    /// tokio runtime: the writer, on a thread of its own, runs its async work (waiting for its
    /// queue, ops) on that runtime.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, SqliteStoreError> {
        Self::open_with(path, SqliteStoreConfig::default()).await
    }

    /// Opens the file at `path` with `config`.
    pub async fn open_with(path: impl AsRef<Path>, config: SqliteStoreConfig) -> Result<Self, SqliteStoreError> {
        Self::open_options(SqliteConnectOptions::new().filename(path.as_ref()), config).await
    }

    /// Opens the store named by a `sqlite://PATH` URL (for example `sqlite://data/events.db`
    /// or `sqlite:///var/lib/app/events.db`), creating the file if missing, with the default
    /// [`SqliteStoreConfig`]. The store's own settings (WAL, `synchronous=FULL`, read-write)
    /// replace any `mode` or pragma given in the URL; in-memory URLs are refused.
    pub async fn connect(url: &str) -> Result<Self, SqliteStoreError> {
        Self::connect_with(url, SqliteStoreConfig::default()).await
    }

    /// Opens the store named by a `sqlite://PATH` URL with `config`.
    pub async fn connect_with(url: &str, config: SqliteStoreConfig) -> Result<Self, SqliteStoreError> {
        if url.contains(":memory:") || url.contains("mode=memory") {
            return Err(SqliteStoreError::InMemory);
        }
        let options = SqliteConnectOptions::from_str(url).map_err(SqliteStoreError::InvalidUrl)?;
        Self::open_options(options, config).await
    }

    async fn open_options(options: SqliteConnectOptions, config: SqliteStoreConfig) -> Result<Self, SqliteStoreError> {
        let path = options.get_filename().to_path_buf();
        let options = options
            .read_only(false)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: in WAL mode, NORMAL skips the fsync at commit, so an acknowledged append
            // can be lost on power failure. See the crate documentation.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(config.busy_timeout)
            // sqlx logs every statement at INFO by default: that would be every append.
            .disable_statement_logging();
        let mut writer = options.connect().await.map_err(|e| open_error(path.clone(), e))?;
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&mut writer)
            .await
            .map_err(|e| open_error(path.clone(), e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(SqliteStoreError::NoWal { path, mode });
        }
        migrate(&mut writer).await?;
        let last: i64 = sqlx::query_scalar("SELECT coalesce(max(position), 0) FROM cqrs_events")
            .fetch_one(&mut writer)
            .await
            .map_err(|e| open_error(path.clone(), e))?;

        let readers = SqlitePoolOptions::new()
            .max_connections(config.read_connections.max(1))
            .acquire_timeout(config.acquire_timeout)
            .connect_with(options.create_if_missing(false).pragma("query_only", "ON").row_buffer_size(READ_ROW_BUFFER))
            .await
            .map_err(|e| open_error(path.clone(), e))?;

        let (head, _) = watch::channel(Position(last.unsigned_abs()));
        let head = Arc::new(head);
        let counters = Arc::new(Counters::default());
        let (writes, requests) = mpsc::channel(QUEUE_CAPACITY);
        let reservations = Arc::new(Reservations::default());
        let direct = {
            let mut locked = writer.lock_handle().await.map_err(|e| open_error(path.clone(), e))?;
            // SAFETY: the handle stays open until the writer drops its `Direct` (`Writer::run`
            // drops it before closing the connection), and the writer uses it only while it
            // holds this same lock.
            #[allow(unsafe_code)]
            let direct = unsafe { Direct::new(locked.as_raw_handle()) };
            direct.map_err(|e| open_error(path.clone(), sqlx::Error::Io(std::io::Error::other(e))))?
        };
        let writer = Writer {
            connection: writer,
            core: Core {
                direct,
                queue: BatchQueue::new(requests, Arc::clone(&reservations)),
                reservations,
                head: Arc::clone(&head),
                counters: Arc::clone(&counters),
                limits: BatchLimits {
                    max_appends: config.max_batch_appends.max(1),
                    max_events: config.max_batch_events.max(1),
                },
            },
        };
        let runtime = tokio::runtime::Handle::current();
        std::thread::Builder::new()
            .name("cqrs-sqlite-writer".to_owned())
            .spawn(move || writer.run(&runtime))
            .map_err(|e| open_error(path.clone(), sqlx::Error::Io(e)))?;
        if let (Some(retention), Some(every)) = (config.command_retention, config.prune_interval()) {
            tokio::spawn(run_pruner(writes.downgrade(), retention, every));
        }
        Ok(Self {
            inner: Arc::new(Inner {
                readers,
                writes,
                head,
                counters,
                pages: Arc::new(pages::Pages::new(path.clone(), &config)),
                path,
                poll_interval: config.poll_interval,
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The read pool, for your own queries next to the store. Its connections are
    /// `query_only`: writes go through the store.
    pub fn read_pool(&self) -> &SqlitePool {
        &self.inner.readers
    }

    /// The writer's queue (for ops run inside its transaction).
    pub(crate) fn writes(&self) -> &mpsc::Sender<WriteRequest> {
        &self.inner.writes
    }

    /// The writer's counters since the store was opened.
    pub fn stats(&self) -> SqliteStoreStats {
        let counters = &self.inner.counters;
        SqliteStoreStats {
            transactions: counters.transactions.load(Ordering::Relaxed),
            failed_transactions: counters.failed_transactions.load(Ordering::Relaxed),
            appends: counters.appends.load(Ordering::Relaxed),
            events: counters.events.load(Ordering::Relaxed),
            refused_appends: counters.refused_appends.load(Ordering::Relaxed),
            largest_batch: counters.largest_batch.load(Ordering::Relaxed),
        }
    }

    /// Queues a write and waits for its answer.
    async fn write<T>(
        &self,
        request: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> WriteRequest,
    ) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.inner.writes.send(request(reply)).await.map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

/// Forgets command ids stored before `older_than` through the writer, a chunk per request.
async fn prune_commands(writes: &mpsc::Sender<WriteRequest>, older_than: Timestamp) -> Result<u64, StoreError> {
    let mut pruned = 0;
    loop {
        let (reply, answer) = oneshot::channel();
        let request = WriteRequest::Prune { older_than: older_than.as_micros(), reply };
        writes.send(request).await.map_err(|_| StoreError::Closed)?;
        let chunk = answer.await.map_err(|_| StoreError::Closed)??;
        pruned += chunk.forgotten;
        if !chunk.more {
            return Ok(pruned);
        }
    }
}

/// The background task that keeps command ids for `retention`, pruning `every` so often. It
/// holds the queue weakly, so it ends with the store.
async fn run_pruner(writes: mpsc::WeakSender<WriteRequest>, retention: Duration, every: Duration) {
    // The first prune after one interval: opening a store costs no extra write.
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(writes) = writes.upgrade() else { return };
        match prune_commands(&writes, Timestamp::now().minus(retention)).await {
            Ok(0) => {}
            Ok(pruned) => tracing::debug!(pruned, "forgot command ids past their retention"),
            Err(StoreError::Closed) => return,
            Err(error) => tracing::debug!(%error, "pruning command ids failed; will retry"),
        }
    }
}

/// Applies the embedded migrations (numbered SQL files in `migrations/`). Migrations of the
/// application in the same file are ignored. SQLite has no migration lock: two processes
/// opening a new file at the same instant may both try, and one then fails with
/// [`SqliteStoreError::Migrate`] (open it again).
async fn migrate(connection: &mut SqliteConnection) -> Result<(), SqliteStoreError> {
    let mut migrator = sqlx::migrate!("./migrations");
    migrator.set_ignore_missing(true);
    migrator.run(connection).await.map_err(SqliteStoreError::Migrate)
}

#[async_trait]
impl EventStore for SqliteEventStore {
    /// Queued to the writer, which checks the condition inside its transaction, after the
    /// append's command id and version (see the README's "Dynamic Consistency Boundaries").
    async fn append_with_condition(
        &self,
        stream_id: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        condition: Option<AppendCondition>,
    ) -> Result<AppendOutcome, StoreError> {
        let started = std::time::Instant::now();
        let span = cqrs_core::telemetry::append_span("sqlite", stream_id, events.len());
        let appended = async {
            let command_id = cqrs_core::store::validate_append_i64(expected, &events)?;
            if let Some(condition) = &condition {
                cqrs_core::store::validate_query(&condition.fail_if_events_match)?;
            }
            // A condition no event can fail is no condition.
            let condition = condition.filter(|condition| !condition.fail_if_events_match.is_none());
            let stream_id = stream_id.clone();
            self.write(|reply| {
                WriteRequest::Append(AppendRequest { stream_id, expected, command_id, events, condition, reply })
            })
            .await
        };
        let result = tracing::Instrument::instrument(appended, span.clone()).await;
        cqrs_core::telemetry::record_append("sqlite", started, &result, &span);
        result
    }

    /// All parts in one request to the writer, so in one transaction, in a savepoint of it.
    async fn append_atomic(
        &self,
        appends: Vec<StreamAppend>,
        condition: Option<AppendCondition>,
    ) -> Result<Vec<AppendOutcome>, StoreError> {
        let (command_id, mut condition) = cqrs_core::store::validate_atomic_i64(&appends, condition)?;
        let parts = appends
            .into_iter()
            .map(|StreamAppend { stream_id, expected, events }| {
                // Each part's own reply goes unused: the request answers for all of them.
                let (reply, _) = oneshot::channel();
                AppendRequest { stream_id, expected, command_id, events, condition: condition.take(), reply }
            })
            .collect();
        self.write(|reply| WriteRequest::Atomic(AtomicRequest { parts, reply })).await
    }

    /// The whole chain in one request to the writer, so in one transaction (one commit), each
    /// link checked on its own and written only right after the previous one.
    async fn append_chain(
        &self,
        stream_id: &StreamId,
        version: Version,
        links: Vec<Vec<NewEvent>>,
    ) -> Vec<Result<AppendOutcome, StoreError>> {
        let mut expected = version;
        let mut checked = Vec::with_capacity(links.len());
        for events in &links {
            match cqrs_core::store::validate_append_i64(ExpectedVersion::Exact(expected), events) {
                Ok(command_id) => checked.push((ExpectedVersion::Exact(expected), command_id)),
                // A refused link: link by link, which answers it and stops there.
                Err(_) => return cqrs_core::store::append_links_one_by_one(self, stream_id, version, links).await,
            }
            expected = Version(expected.0.saturating_add(events.len() as u64));
        }
        if links.len() < 2 {
            return cqrs_core::store::append_links_one_by_one(self, stream_id, version, links).await;
        }
        let started = std::time::Instant::now();
        let events: usize = links.iter().map(Vec::len).sum();
        let span = cqrs_core::telemetry::append_span("sqlite", stream_id, events);
        let mut requests = Vec::with_capacity(links.len());
        let mut answers = Vec::with_capacity(links.len());
        for (events, (expected, command_id)) in links.into_iter().zip(checked) {
            let (reply, answer) = oneshot::channel();
            requests.push(AppendRequest {
                stream_id: stream_id.clone(),
                expected,
                command_id,
                events,
                condition: None,
                reply,
            });
            answers.push(answer);
        }
        let results = async {
            if self.inner.writes.send(WriteRequest::Chain(requests)).await.is_err() {
                return answers.iter().map(|_| Err(StoreError::Closed)).collect();
            }
            let mut results = Vec::with_capacity(answers.len());
            for answer in answers {
                results.push(answer.await.unwrap_or(Err(StoreError::Closed)));
            }
            results
        };
        let results: Vec<Result<AppendOutcome, StoreError>> =
            tracing::Instrument::instrument(results, span.clone()).await;
        for result in &results {
            cqrs_core::telemetry::record_append("sqlite", started, result, &span);
        }
        results
    }

    async fn read_stream(
        &self,
        stream_id: &StreamId,
        from: Version,
        max_count: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        if max_count == 0 {
            return Ok(Vec::new());
        }
        // Versions are contiguous and committed in order: one statement reads a prefix.
        self.inner.pages.read(pages::Page::Stream(stream_id.clone(), from), max_count).await
    }

    async fn read_all(&self, after: Position, max_count: usize) -> Result<Vec<RecordedEvent>, StoreError> {
        if max_count == 0 {
            return Ok(Vec::new());
        }
        // No watermark needed: positions are assigned in commit order (see `writer`), and
        // one statement reads one committed snapshot. A page per hop (see `pages.rs`).
        self.inner.pages.read(pages::Page::All(after), max_count).await
    }

    async fn read_query(
        &self,
        query: &Query,
        after: Position,
        max_count: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        cqrs_core::store::validate_query(query)?;
        if max_count == 0 || query.is_none() {
            return Ok(Vec::new());
        }
        // Like `read_all`: one statement reads one committed snapshot, a prefix of the log.
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM cqrs_events WHERE {} ORDER BY position LIMIT ?",
            query::where_clause(query)
        );
        let max = limit(max_count);
        let statement = query::bind_where(sqlx::query(&sql).persistent(query::cached(query)), query, after, max);
        EventDecoder::fetch(statement.bind(max), &self.inner.readers, max_count).await
    }

    async fn head(&self) -> Result<Position, StoreError> {
        // Positions are assigned in commit order: the largest stored one is readable, and
        // nothing can later commit below it.
        let head: i64 = sqlx::query_scalar("SELECT coalesce(max(position), 0) FROM cqrs_events")
            .fetch_one(&self.inner.readers)
            .await
            .map_err(to_store_error)?;
        Ok(Position(to_u64(head, "head")?))
    }

    async fn prune_commands(&self, older_than: Timestamp) -> Result<u64, StoreError> {
        prune_commands(&self.inner.writes, older_than).await
    }

    async fn stream_version(&self, stream_id: &StreamId) -> Result<Version, StoreError> {
        let version: i64 = sqlx::query_scalar(writer::STREAM_VERSION_SQL)
            .bind(stream_id.as_str())
            .fetch_one(&self.inner.readers)
            .await
            .map_err(to_store_error)?;
        Ok(Version(to_u64(version, "version")?))
    }

    async fn find_command(
        &self,
        stream_id: &StreamId,
        command_id: CommandId,
    ) -> Result<Option<AppendResult>, StoreError> {
        let row = sqlx::query(writer::FIND_COMMAND_SQL)
            .bind(stream_id.as_str())
            .bind(command_id.0)
            .fetch_optional(&self.inner.readers)
            .await
            .map_err(to_store_error)?;
        row.as_ref().map(command_result).transpose()
    }

    async fn load_checkpoint(&self, name: &str) -> Result<Option<Position>, StoreError> {
        let position: Option<i64> = sqlx::query_scalar("SELECT position FROM cqrs_checkpoints WHERE name = ?1")
            .bind(name)
            .fetch_optional(&self.inner.readers)
            .await
            .map_err(to_store_error)?;
        position.map(|position| Ok(Position(to_u64(position, "checkpoint")?))).transpose()
    }

    async fn save_checkpoint(&self, name: &str, position: Position) -> Result<(), StoreError> {
        let position = i64::try_from(position.0)
            .map_err(|_| StoreError::InvalidAppend(format!("checkpoint {position} does not fit in an integer")))?;
        let name = name.to_owned();
        self.write(|reply| WriteRequest::Checkpoint { name, position, reply }).await
    }

    fn supports_snapshots(&self) -> bool {
        true
    }

    async fn load_snapshot(&self, stream_id: &StreamId) -> Result<Option<Snapshot>, StoreError> {
        let row = sqlx::query("SELECT version, schema_version, state FROM cqrs_snapshots WHERE stream_id = ?1")
            .bind(stream_id.as_str())
            .fetch_optional(&self.inner.readers)
            .await
            .map_err(to_store_error)?;
        let Some(row) = row else {
            return Ok(None);
        };
        let version: i64 = row.try_get("version").map_err(to_store_error)?;
        let schema_version: i64 = row.try_get("schema_version").map_err(to_store_error)?;
        let state: String = row.try_get("state").map_err(to_store_error)?;
        Ok(Some(Snapshot {
            stream_id: stream_id.clone(),
            version: Version(to_u64(version, "snapshot version")?),
            schema_version: u32::try_from(schema_version)
                .map_err(|_| StoreError::Corrupt(format!("snapshot schema version {schema_version} out of range")))?,
            state: rows::json(&state, "snapshot state")?,
        }))
    }

    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), StoreError> {
        if i64::try_from(snapshot.version.0).is_err() {
            return Err(StoreError::InvalidAppend(format!("snapshot {} is out of range", snapshot.version)));
        }
        let state = snapshot.state.to_string();
        self.write(|reply| WriteRequest::Snapshot { snapshot, state, reply }).await
    }

    fn notifications(&self) -> watch::Receiver<Position> {
        self.inner.head.subscribe()
    }

    fn poll_interval(&self) -> Option<Duration> {
        Some(self.inner.poll_interval)
    }
}
