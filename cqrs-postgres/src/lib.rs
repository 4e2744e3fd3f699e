#![doc = include_str!("../README.md")]

mod config;
mod coordination;
mod error;
mod listener;
mod notify;
mod projection;
mod recent;
mod request;
mod rows;
mod single;
mod writer;

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use cqrs_core::store::batching::{BatchLimits, BatchQueue, Reservations};
use cqrs_core::store::validate_query;
use cqrs_core::{
    AppendCondition, AppendOutcome, AppendResult, CommandId, EventStore, ExpectedVersion, NewEvent, Position, Query,
    RecordedEvent, Snapshot, StoreError, StreamAppend, StreamId, Timestamp, Version,
};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use sqlx::{Connection, PgConnection, PgPool, Row};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

pub use crate::config::{PgStoreConfig, NOTIFY_CHANNEL};
pub use crate::error::PgStoreError;
pub use crate::projection::{spawn_projection, spawn_projection_with, PgProjection};

use crate::error::to_store_error;
use crate::recent::RecentEvents;
use crate::request::AppendRequest;
use crate::rows::{to_i64_saturating, to_u64, EventDecoder, EVENT_COLUMNS};
#[doc(hidden)]
pub use crate::single::single_event_sql;

/// How many appends may wait for the writer task before callers wait to enqueue.
const QUEUE_CAPACITY: usize = 4096;

/// A PostgreSQL [`EventStore`]. Cheap to clone: clones share the pool, the writer task and the
/// listener. See the crate documentation for the schema and the ordering design.
#[derive(Clone)]
pub struct PgEventStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// Appends, reads and checkpoints.
    pool: PgPool,
    /// Queue of the group-commit writer tasks, which own the receiving end: they end when the
    /// last store handle is dropped.
    appends: mpsc::Sender<AppendRequest>,
    /// Newest known position; changed on every NOTIFY, local commit and listener reconnect.
    head: Arc<watch::Sender<Position>>,
    /// The LISTEN task, aborted on drop.
    listener: JoinHandle<()>,
    /// The task that forgets command ids past their retention, aborted on drop.
    pruner: Option<JoinHandle<()>>,
    /// Closed on drop so the listener's connection goes away at once.
    listener_pool: PgPool,
    poll_interval: Duration,
    /// The highest read bound seen (see `read_all`): every event at or below it that will
    /// ever commit has committed.
    read_bound: AtomicU64,
    /// Events this process's writers just committed, read from memory near the head.
    recent: Arc<RecentEvents>,
    /// What the writer tasks share (head, wake-ups), for atomic appends, which commit on
    /// their own connection.
    writer: Arc<writer::WriterShared>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.listener.abort();
        if let Some(pruner) = &self.pruner {
            pruner.abort();
        }
        let listener_pool = self.listener_pool.clone();
        // Closing is async; outside a runtime the pool closes its connections when dropped.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { listener_pool.close().await });
        }
    }
}

impl std::fmt::Debug for PgEventStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgEventStore").field("head", &*self.inner.head.borrow()).finish_non_exhaustive()
    }
}

impl PgEventStore {
    /// Connects to `database_url` with the default [`PgStoreConfig`]. Call
    /// [`migrate`](Self::migrate) once before the first use of a new database.
    pub async fn connect(database_url: &str) -> Result<Self, PgStoreError> {
        Self::connect_with(database_url, PgStoreConfig::default()).await
    }

    /// Connects to `database_url` with `config`.
    pub async fn connect_with(database_url: &str, config: PgStoreConfig) -> Result<Self, PgStoreError> {
        let options = PgConnectOptions::from_str(database_url).map_err(PgStoreError::InvalidUrl)?;
        let pool = PgPoolOptions::new()
            // Each writer task keeps one connection; at least one more serves reads.
            .max_connections(
                config.max_connections.max(u32::try_from(config.writer_tasks).unwrap_or(u32::MAX).saturating_add(1)),
            )
            .acquire_timeout(config.acquire_timeout)
            // A dead connection fails its next query and is dropped; no ping per checkout.
            .test_before_acquire(false)
            // The append and read functions need a fresh snapshot per statement.
            .after_connect(|connection, _| {
                Box::pin(async move {
                    sqlx::query("SET default_transaction_isolation = 'read committed'").execute(connection).await?;
                    Ok(())
                })
            })
            .connect_with(options.application_name(&config.application_name))
            .await
            .map_err(PgStoreError::Connect)?;
        Ok(Self::from_pool(pool, config))
    }

    /// Uses an existing pool (its connection options are also used for the LISTEN
    /// connection). Its sessions must use READ COMMITTED (PostgreSQL's default). Must be
    /// called inside a tokio runtime: it starts the writer and listener tasks.
    pub fn from_pool(pool: PgPool, config: PgStoreConfig) -> Self {
        let (head, _) = watch::channel(Position::START);
        let head = Arc::new(head);
        let listener_options = (*pool.connect_options()).clone().application_name(&config.listener_application_name);
        let listener_pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(config.acquire_timeout)
            .connect_lazy_with(listener_options);
        let announced = Arc::new(listener::Announced::default());
        let listener =
            tokio::spawn(listener::run_listener(listener_pool.clone(), Arc::clone(&head), Arc::clone(&announced)));
        let (appends, requests) = mpsc::channel(QUEUE_CAPACITY);
        let limits =
            BatchLimits { max_appends: config.max_batch_appends.max(1), max_events: config.max_batch_events.max(1) };
        let reservations = Arc::new(Reservations::default());
        let queue = Arc::new(tokio::sync::Mutex::new(BatchQueue::new(requests, Arc::clone(&reservations))));
        let recent = Arc::new(RecentEvents::new(config.recent_events));
        let notify = notify::NotifyThrottle::new(config.notify_interval, pool.clone(), Arc::clone(&announced));
        let shared = Arc::new(writer::WriterShared {
            head: Arc::clone(&head),
            announced,
            reservations,
            recent: Arc::clone(&recent),
            notify,
        });
        for _ in 0..config.writer_tasks.max(1) {
            tokio::spawn(writer::run_writer(pool.clone(), Arc::clone(&queue), Arc::clone(&shared), limits));
        }
        let writer = shared;
        let pruner = match (config.command_retention, config.prune_interval()) {
            (Some(retention), Some(every)) => Some(tokio::spawn(run_pruner(pool.clone(), retention, every))),
            _ => None,
        };
        Self {
            inner: Arc::new(Inner {
                pool,
                appends,
                head,
                listener,
                pruner,
                listener_pool,
                poll_interval: config.poll_interval,
                read_bound: AtomicU64::new(0),
                recent,
                writer,
            }),
        }
    }

    /// Creates or upgrades the schema (numbered SQL files in `migrations/`, embedded at build
    /// time). Safe to call from several processes at once: sqlx's migrator holds an advisory
    /// lock while it runs. Migrations of other crates in the same database are ignored.
    pub async fn migrate(&self) -> Result<(), PgStoreError> {
        migrate_pool(&self.inner.pool).await
    }

    /// The connection pool, for running your own queries next to the store (for example a
    /// read model updated in the same transaction as its checkpoint).
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// Saves checkpoint `name` inside the caller's transaction (pass `&mut *transaction`), so
    /// a projection can commit its read model and its position atomically: exactly-once
    /// processing.
    pub async fn save_checkpoint_in(
        connection: &mut PgConnection,
        name: &str,
        position: Position,
    ) -> Result<(), StoreError> {
        let position = i64::try_from(position.0)
            .map_err(|_| StoreError::InvalidAppend(format!("checkpoint {position} does not fit in a bigint")))?;
        sqlx::query(
            "INSERT INTO cqrs_checkpoints (name, position) VALUES ($1, $2) \
             ON CONFLICT (name) DO UPDATE SET position = EXCLUDED.position, updated_at = now()",
        )
        .bind(name)
        .bind(position)
        .execute(connection)
        .await
        .map_err(to_store_error)?;
        Ok(())
    }

    /// Loads checkpoint `name` inside the caller's transaction (see
    /// [`save_checkpoint_in`](Self::save_checkpoint_in)).
    pub async fn load_checkpoint_in(connection: &mut PgConnection, name: &str) -> Result<Option<Position>, StoreError> {
        let row = sqlx::query("SELECT position FROM cqrs_checkpoints WHERE name = $1")
            .bind(name)
            .fetch_optional(connection)
            .await
            .map_err(to_store_error)?;
        match row {
            Some(row) => {
                let position: i64 = row.try_get("position").map_err(to_store_error)?;
                Ok(Some(Position(to_u64(position, "checkpoint")?)))
            }
            None => Ok(None),
        }
    }
}

/// Forgets command ids stored before `older_than`, in chunks (no long-running delete).
async fn prune_commands(pool: &PgPool, older_than: Timestamp) -> Result<u64, StoreError> {
    const CHUNK: i64 = 10_000;
    let mut pruned = 0;
    loop {
        let deleted = sqlx::query(
            "DELETE FROM cqrs_commands WHERE ctid IN (SELECT ctid FROM cqrs_commands              WHERE recorded_at < 'epoch'::timestamptz + $1 * interval '1 microsecond' LIMIT $2)",
        )
        .bind(older_than.as_micros())
        .bind(CHUNK)
        .execute(pool)
        .await
        .map_err(to_store_error)?
        .rows_affected();
        pruned += deleted;
        if deleted < CHUNK as u64 {
            return Ok(pruned);
        }
    }
}

/// The background task that keeps command ids for `retention`, pruning `every` so often.
async fn run_pruner(pool: PgPool, retention: Duration, every: Duration) {
    // The first prune after one interval: opening a store costs no extra write.
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        match prune_commands(&pool, Timestamp::now().minus(retention)).await {
            Ok(0) => {}
            Ok(pruned) => tracing::debug!(pruned, "forgot command ids past their retention"),
            Err(error) => tracing::debug!(%error, "pruning command ids failed; will retry"),
        }
    }
}

/// Applies the embedded migrations to the database behind `pool` (what
/// [`PgEventStore::migrate`] does, without a store).
pub async fn migrate_pool(pool: &PgPool) -> Result<(), PgStoreError> {
    let mut migrator = sqlx::migrate!("./migrations");
    // The application may keep its own migrations in the same `_sqlx_migrations` table.
    migrator.set_ignore_missing(true);
    // A connection of its own, closed afterwards: the migrator's advisory lock is
    // session-level, and a failed run must not leave it held by a pooled connection (where
    // it would block every other process's migration).
    let mut connection = pool.acquire().await.map_err(PgStoreError::Connect)?.detach();
    let result = migrator.run(&mut connection).await.map_err(PgStoreError::Migrate);
    if let Err(error) = connection.close().await {
        tracing::debug!(%error, "closing the migration connection failed");
    }
    result
}

/// The positions of the first `$3` events in `($1, $2]` that one query item matches, in
/// position order, binding its values as the next parameters after `binds` of them. An item with
/// tags walks its first tag's positions in order in `cqrs_event_tags` (one range scan of its
/// primary key, however rare or common the tag), checking its other tags and its types on each
/// event row in a subquery the planner cannot flatten: as a join, a generic plan that guesses
/// the check selective fetches every position of the tag and sorts them. An item without tags
/// walks `(event_type, position)`, or the positions alone.
fn item_positions(item: &cqrs_core::QueryItem, binds: &mut usize) -> String {
    let mut bind = || {
        *binds += 1;
        *binds
    };
    if item.tags.is_empty() {
        let types = if item.types.is_empty() { String::new() } else { format!(" AND event_type = ANY(${})", bind()) };
        return format!(
            "SELECT position FROM cqrs_events WHERE position > $1 AND position <= $2{types} \
             ORDER BY position LIMIT $3"
        );
    }
    let first = bind();
    let rest = if item.tags.len() > 1 { format!(" AND e.tags @> ${}", bind()) } else { String::new() };
    let types = if item.types.is_empty() { String::new() } else { format!(" AND e.event_type = ANY(${})", bind()) };
    let check = if rest.is_empty() && types.is_empty() {
        String::new()
    } else {
        format!(" AND EXISTS (SELECT 1 FROM cqrs_events e WHERE e.position = t.position{rest}{types} OFFSET 0)")
    };
    format!(
        "SELECT t.position FROM cqrs_event_tags t WHERE t.tag = ${first} AND t.position > $1 \
         AND t.position <= $2{check} ORDER BY t.position LIMIT $3"
    )
}

/// Binds one query item's values in the order [`item_positions`] numbers them.
fn bind_item<'q>(
    mut statement: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    item: &'q cqrs_core::QueryItem,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    if let Some(first) = item.tags.first() {
        statement = statement.bind(first.as_str());
        if item.tags.len() > 1 {
            statement = statement.bind(item.tags.iter().map(|tag| tag.as_str()).collect::<Vec<_>>());
        }
    }
    if !item.types.is_empty() {
        statement = statement.bind(&item.types);
    }
    statement
}

#[async_trait]
impl EventStore for PgEventStore {
    async fn append(
        &self,
        stream_id: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendOutcome, StoreError> {
        self.append_with_condition(stream_id, expected, events, None).await
    }

    /// Through the group-commit writer like [`append`](EventStore::append): the batch takes the
    /// boundary locks, and its per-append loop checks the condition (see the README, "Dynamic
    /// Consistency Boundaries"). A condition whose query has no items cannot fail: it is dropped.
    async fn append_with_condition(
        &self,
        stream_id: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        condition: Option<AppendCondition>,
    ) -> Result<AppendOutcome, StoreError> {
        let started = std::time::Instant::now();
        let span = cqrs_core::telemetry::append_span("postgres", stream_id, events.len());
        let appended = async {
            let command_id = cqrs_core::store::validate_append_i64(expected, &events)?;
            if let Some(condition) = &condition {
                validate_query(&condition.fail_if_events_match)?;
            }
            let condition = condition.filter(|condition| !condition.fail_if_events_match.is_none());
            let (reply, answer) = oneshot::channel();
            let request = AppendRequest {
                stream_id: stream_id.clone(),
                expected,
                command_id,
                events,
                condition,
                reply,
                continues: false,
                followers: Vec::new(),
            };
            self.inner.appends.send(request).await.map_err(|_| StoreError::Closed)?;
            answer.await.map_err(|_| StoreError::Closed)?
        };
        let result = tracing::Instrument::instrument(appended, span.clone()).await;
        cqrs_core::telemetry::record_append("postgres", started, &result, &span);
        result
    }

    /// The whole chain in one batch (one statement, one commit), each link checked on its own
    /// and written only right after the previous one.
    async fn append_chain(
        &self,
        stream_id: &StreamId,
        version: Version,
        links: Vec<Vec<NewEvent>>,
    ) -> Vec<Result<AppendOutcome, StoreError>> {
        let started = std::time::Instant::now();
        let events: usize = links.iter().map(Vec::len).sum();
        let span = cqrs_core::telemetry::append_span("postgres", stream_id, events);
        // Every link valid and carrying a command id (so a replay after an unknown outcome keeps
        // the chain whole), or link by link.
        let mut expected = version;
        let mut checked = Vec::with_capacity(links.len());
        for events in &links {
            match cqrs_core::store::validate_append_i64(ExpectedVersion::Exact(expected), events) {
                Ok(Some(command_id)) => checked.push((ExpectedVersion::Exact(expected), command_id)),
                _ => return cqrs_core::store::append_links_one_by_one(self, stream_id, version, links).await,
            }
            expected = Version(expected.0 + events.len() as u64);
        }
        if links.len() < 2 {
            return cqrs_core::store::append_links_one_by_one(self, stream_id, version, links).await;
        }
        let mut answers = Vec::with_capacity(links.len());
        let mut requests = Vec::with_capacity(links.len());
        for (index, (events, (expected, command_id))) in links.into_iter().zip(checked).enumerate() {
            let (reply, answer) = oneshot::channel();
            answers.push(answer);
            requests.push(AppendRequest {
                stream_id: stream_id.clone(),
                expected,
                command_id: Some(command_id),
                events,
                condition: None,
                reply,
                continues: index > 0,
                followers: Vec::new(),
            });
        }
        let mut requests = requests.into_iter();
        let results = async {
            let Some(mut head) = requests.next() else { return Vec::new() };
            head.followers = requests.collect();
            if self.inner.appends.send(head).await.is_err() {
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
            cqrs_core::telemetry::record_append("postgres", started, result, &span);
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
        // Stream reads need no watermark: the stream row lock orders a stream's commits, so a
        // version is visible only after every lower one.
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM cqrs_events WHERE stream_id = $1 AND version >= $2 ORDER BY version LIMIT $3"
        );
        let query = sqlx::query(&sql)
            .bind(stream_id.as_str())
            .bind(to_i64_saturating(from.0))
            .bind(to_i64_saturating(u64::try_from(max_count).unwrap_or(u64::MAX)));
        EventDecoder::fetch(query, &self.inner.pool, max_count).await
    }

    async fn read_all(&self, after: Position, max_count: usize) -> Result<Vec<RecordedEvent>, StoreError> {
        if max_count == 0 {
            return Ok(Vec::new());
        }
        // Right behind this process's own commits: the next events are in memory, and no other
        // writer can have an event among them (see `recent`).
        if let Some(events) = self.inner.recent.after(after, max_count) {
            return Ok(events);
        }
        let limit = to_i64_saturating(u64::try_from(max_count).unwrap_or(u64::MAX));
        let known = self.inner.read_bound.load(AtomicOrdering::Acquire);
        let mut events = Vec::new();
        let mut after = after;
        // Catching up far below a bound already read: a plain page up to that bound (every
        // event at or below it that will ever commit is visible to this later statement). Near
        // the head, or if gaps made the page short, the watermark function reads the rest.
        if known.saturating_sub(after.0) >= u64::try_from(max_count).unwrap_or(u64::MAX) {
            let sql = format!(
                "SELECT {EVENT_COLUMNS} FROM cqrs_events WHERE position > $1 AND position <= $2 \
                 ORDER BY position LIMIT $3"
            );
            let query = sqlx::query(&sql).bind(to_i64_saturating(after.0)).bind(to_i64_saturating(known)).bind(limit);
            events = EventDecoder::fetch(query, &self.inner.pool, max_count).await?;
            if events.len() == max_count {
                return Ok(events);
            }
            // Short: the page held every event up to the bound.
            after = Position(known);
        }
        let rows = sqlx::query(
            "SELECT event_position AS position, event_id, stream_id, version, event_type, schema_version, payload, \
             command_id, causation_id, correlation_id, headers, recorded_at_micros, read_bound, tags \
             FROM cqrs_read_page($1, $2)",
        )
        .bind(to_i64_saturating(after.0))
        .bind(to_i64_saturating(u64::try_from(max_count - events.len()).unwrap_or(u64::MAX)))
        .fetch_all(&self.inner.pool)
        .await
        .map_err(to_store_error)?;
        if let Some(row) = rows.first() {
            let bound: i64 = row.try_get("read_bound").map_err(to_store_error)?;
            self.inner.read_bound.fetch_max(to_u64(bound, "read bound")?, AtomicOrdering::AcqRel);
        }
        let mut decoder = EventDecoder::default();
        for row in &rows {
            events.push(decoder.decode(row)?);
        }
        Ok(events)
    }

    /// One `cqrs_append_batch` call in a transaction of its own, parts in stream-id order (the
    /// writers' lock order), the condition on the first part (see the README).
    async fn append_atomic(
        &self,
        appends: Vec<StreamAppend>,
        condition: Option<AppendCondition>,
    ) -> Result<Vec<AppendOutcome>, StoreError> {
        let (command_id, condition) = cqrs_core::store::validate_atomic_i64(&appends, condition)?;
        writer::append_atomic(&self.inner.pool, &self.inner.writer, appends, command_id, condition).await
    }

    /// One statement, bounded like `read_all` by a read bound taken in an earlier statement: it
    /// never returns an event at `p` and later one below `p`. Each item reads its first
    /// `max_count` positions by its own ordered index range (see `item_positions`); several
    /// items are merged by a `UNION` of those, cut again to the first `max_count`.
    async fn read_query(
        &self,
        query: &Query,
        after: Position,
        max_count: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        validate_query(query)?;
        if max_count == 0 || query.is_none() {
            return Ok(Vec::new());
        }
        // The bound first, in a statement of its own: the read's snapshot comes after it.
        let bound: i64 =
            sqlx::query_scalar("SELECT cqrs_read_bound()").fetch_one(&self.inner.pool).await.map_err(to_store_error)?;
        self.inner.read_bound.fetch_max(to_u64(bound.max(0), "read bound")?, AtomicOrdering::AcqRel);
        let items: &[cqrs_core::QueryItem] = if query.is_all() { &[] } else { &query.items };
        // One tag alone: the events straight from the tag's range. Each event is fetched by a
        // probe of its position (a LATERAL subquery the planner cannot flatten): as a plain join,
        // a custom plan may merge-join the tag's range against the log, walking every event up
        // to the tag's last match of the page.
        let sql = match items {
            [] => format!(
                "SELECT {EVENT_COLUMNS} FROM cqrs_events WHERE position > $1 AND position <= $2 \
                 ORDER BY position LIMIT $3"
            ),
            [item] if item.types.is_empty() && item.tags.len() == 1 => format!(
                "SELECT {EVENT_COLUMNS} FROM cqrs_event_tags t(tag, at) CROSS JOIN LATERAL \
                 (SELECT * FROM cqrs_events e WHERE e.position = t.at OFFSET 0) e \
                 WHERE t.tag = $4 AND t.at > $1 AND t.at <= $2 ORDER BY t.at LIMIT $3"
            ),
            [item] => format!(
                "SELECT {EVENT_COLUMNS} FROM ({}) p(at) CROSS JOIN LATERAL \
                 (SELECT * FROM cqrs_events e WHERE e.position = p.at OFFSET 0) e ORDER BY p.at",
                item_positions(item, &mut 3)
            ),
            items => {
                let mut binds = 3;
                let union: Vec<String> =
                    items.iter().map(|item| format!("({})", item_positions(item, &mut binds))).collect();
                format!(
                    "SELECT {EVENT_COLUMNS} FROM ({} ORDER BY position LIMIT $3) p(at) CROSS JOIN LATERAL \
                     (SELECT * FROM cqrs_events e WHERE e.position = p.at OFFSET 0) e ORDER BY p.at",
                    union.join(" UNION ")
                )
            }
        };
        let mut statement = sqlx::query(&sql)
            .bind(to_i64_saturating(after.0))
            .bind(bound)
            .bind(to_i64_saturating(u64::try_from(max_count).unwrap_or(u64::MAX)));
        for item in items {
            statement = bind_item(statement, item);
        }
        EventDecoder::fetch(statement, &self.inner.pool, max_count).await
    }

    async fn head(&self) -> Result<Position, StoreError> {
        let head: i64 =
            sqlx::query_scalar("SELECT cqrs_head()").fetch_one(&self.inner.pool).await.map_err(to_store_error)?;
        Ok(Position(to_u64(head, "head")?))
    }

    async fn prune_commands(&self, older_than: Timestamp) -> Result<u64, StoreError> {
        prune_commands(&self.inner.pool, older_than).await
    }

    async fn stream_version(&self, stream_id: &StreamId) -> Result<Version, StoreError> {
        let version: Option<i64> = sqlx::query_scalar("SELECT version FROM cqrs_streams WHERE stream_id = $1")
            .bind(stream_id.as_str())
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(to_store_error)?;
        Ok(Version(to_u64(version.unwrap_or(0), "version")?))
    }

    async fn find_command(
        &self,
        stream_id: &StreamId,
        command_id: CommandId,
    ) -> Result<Option<AppendResult>, StoreError> {
        let row = sqlx::query(
            "SELECT first_version, last_version, first_position, last_position FROM cqrs_commands \
             WHERE stream_id = $1 AND command_id = $2",
        )
        .bind(stream_id.as_str())
        .bind(command_id.0)
        .fetch_optional(&self.inner.pool)
        .await
        .map_err(to_store_error)?;
        let Some(row) = row else {
            return Ok(None);
        };
        let column = |name: &str| row.try_get::<i64, _>(name).map_err(to_store_error);
        Ok(Some(rows::append_result(
            column("first_version")?,
            column("last_version")?,
            column("first_position")?,
            column("last_position")?,
        )?))
    }

    async fn load_checkpoint(&self, name: &str) -> Result<Option<Position>, StoreError> {
        let mut connection = self.inner.pool.acquire().await.map_err(to_store_error)?;
        Self::load_checkpoint_in(&mut connection, name).await
    }

    async fn save_checkpoint(&self, name: &str, position: Position) -> Result<(), StoreError> {
        let mut connection = self.inner.pool.acquire().await.map_err(to_store_error)?;
        Self::save_checkpoint_in(&mut connection, name, position).await
    }

    fn supports_snapshots(&self) -> bool {
        true
    }

    async fn load_snapshot(&self, stream_id: &StreamId) -> Result<Option<Snapshot>, StoreError> {
        let row = sqlx::query("SELECT version, schema_version, state FROM cqrs_snapshots WHERE stream_id = $1")
            .bind(stream_id.as_str())
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(to_store_error)?;
        let Some(row) = row else {
            return Ok(None);
        };
        let version: i64 = row.try_get("version").map_err(to_store_error)?;
        let schema_version: i32 = row.try_get("schema_version").map_err(to_store_error)?;
        let state: sqlx::types::Json<serde_json::Value> = row.try_get("state").map_err(to_store_error)?;
        Ok(Some(Snapshot {
            stream_id: stream_id.clone(),
            version: Version(to_u64(version, "snapshot version")?),
            schema_version: u32::try_from(schema_version)
                .map_err(|_| StoreError::Corrupt(format!("negative snapshot schema version {schema_version}")))?,
            state: state.0,
        }))
    }

    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), StoreError> {
        let version = i64::try_from(snapshot.version.0)
            .map_err(|_| StoreError::InvalidAppend(format!("snapshot {} is out of range", snapshot.version)))?;
        let schema_version = i32::try_from(snapshot.schema_version).map_err(|_| {
            StoreError::InvalidAppend(format!("snapshot schema version {} is out of range", snapshot.schema_version))
        })?;
        // An older snapshot never replaces a newer one.
        sqlx::query(
            "INSERT INTO cqrs_snapshots (stream_id, version, schema_version, state) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (stream_id) DO UPDATE SET version = EXCLUDED.version, \
             schema_version = EXCLUDED.schema_version, state = EXCLUDED.state, saved_at = now() \
             WHERE cqrs_snapshots.version <= EXCLUDED.version",
        )
        .bind(snapshot.stream_id.as_str())
        .bind(version)
        .bind(schema_version)
        .bind(sqlx::types::Json(&snapshot.state))
        .execute(&self.inner.pool)
        .await
        .map_err(to_store_error)?;
        Ok(())
    }

    fn notifications(&self) -> watch::Receiver<Position> {
        self.inner.head.subscribe()
    }

    fn poll_interval(&self) -> Option<Duration> {
        Some(self.inner.poll_interval)
    }
}
