//! Group commit: the store's one writer, on a thread of its own, owns the only write
//! connection. It takes every queued request (up to a bound), runs them all in one `BEGIN
//! IMMEDIATE` transaction (the appends queued together, conditional or not, checked and written
//! set-based: one read, then one multi-row statement per table; an append that would not simply
//! be stored or refused by its condition, inside a savepoint checked against its own expected
//! version), commits once (one fsync), and only then answers each caller.
//!
//! **Driver.** The connection is opened by sqlx (transactional projections and the other ops
//! take it as a `SqliteConnection`), but the writer calls SQLite itself, on its own thread,
//! while it holds sqlx's lock on the handle ([`Direct`]): no statement travels to sqlx's worker
//! thread and back. It keeps that lock from one batch to the next, and lets go of it only for a
//! batch that carries an op, around each op.
//!
//! **Ordering invariant.** Positions are assigned inside the write transaction, as one more
//! than the highest stored position, while holding SQLite's write lock (taken by `BEGIN
//! IMMEDIATE`, released by `COMMIT`). So positions are handed out in commit order: when a
//! transaction commits, every lower position is already committed (or was rolled back and
//! never becomes visible). A WAL reader sees a prefix of the commit sequence, hence a prefix
//! of the positions, and `read_all` can never skip an event. This holds even when another
//! process writes the same file: the write lock serialises both.
//!
//! **Conditions.** An append's condition (DCB) is checked by this writer inside the same
//! transaction, after the append's command id and version, with the conditions of its group
//! in the group's one read, once every earlier group of the batch is written. A conditional
//! append joins a group only if its query matches none of the events of the group's earlier
//! appends ([`windows`]), so the check sees every event before it that it could match, and no
//! two appends whose events match each other's query both commit (the README's "Dynamic
//! Consistency Boundaries").

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use cqrs_core::store::batching::{BatchLimits, BatchQueue, QueuedWrite, Reservations};
use cqrs_core::{
    AppendCondition, AppendOutcome, AppendResult, CommandId, ExpectedVersion, NewEvent, Position, Snapshot, StoreError,
    StreamId, Timestamp, Version,
};
use sqlx::{Connection, SqliteConnection};
use tokio::runtime::Handle;
use tokio::sync::{oneshot, watch};
use uuid::Uuid;

use crate::direct::{is_refused_data, is_unique_violation, uuid_column, Direct, Params};
use crate::query;
use crate::rows::{append_result, encode_tags, to_i64_saturating};

/// One queued append and where to send its answer.
pub(crate) struct AppendRequest {
    pub(crate) stream_id: StreamId,
    pub(crate) expected: ExpectedVersion,
    pub(crate) command_id: Option<CommandId>,
    pub(crate) events: Vec<NewEvent>,
    /// Checked inside the writer's transaction, after the command id and the version.
    pub(crate) condition: Option<AppendCondition>,
    pub(crate) reply: oneshot::Sender<Result<AppendOutcome, StoreError>>,
}

/// An atomic append: its parts (each an append whose own `reply` is never used; the first
/// carries the condition) and where to send the answer for all of them.
pub(crate) struct AtomicRequest {
    pub(crate) parts: Vec<AppendRequest>,
    pub(crate) reply: oneshot::Sender<Result<Vec<AppendOutcome>, StoreError>>,
}

/// One queued write: the writer owns the only write connection, so checkpoint and snapshot
/// saves travel the same queue as appends (and share their commits).
pub(crate) enum WriteRequest {
    /// An append.
    Append(AppendRequest),
    /// An atomic append to several streams
    /// ([`EventStore::append_atomic`](cqrs_core::EventStore::append_atomic)): all or nothing,
    /// inside a savepoint of the batch's transaction.
    Atomic(AtomicRequest),
    /// A chain of appends to one stream ([`EventStore::append_chain`](cqrs_core::EventStore::append_chain)),
    /// in order and in one transaction: a link is attempted only if the one before it was
    /// appended; after that, every link is answered with a conflict without being written.
    Chain(Vec<AppendRequest>),
    /// Save a checkpoint (position already checked to fit an SQLite integer).
    Checkpoint { name: String, position: i64, reply: oneshot::Sender<Result<(), StoreError>> },
    /// Save a snapshot (numbers already checked; the state serialized).
    Snapshot { snapshot: Snapshot, state: String, reply: oneshot::Sender<Result<(), StoreError>> },
    /// Forget the command ids of up to [`PRUNE_CHUNK`] events recorded before `older_than`
    /// (microseconds).
    Prune { older_than: i64, reply: oneshot::Sender<Result<Pruned, StoreError>> },
    /// Any other write: run inside the batch's transaction, answered after the commit; `fail`
    /// answers it when its batch fails before it ran.
    Op { run: WriteOp, fail: Box<dyn FnOnce(StoreError) + Send> },
}

/// What a [`WriteOp`] leaves to do once the batch's transaction has ended: it is called with
/// `Ok(())` after the commit, or with the error that failed the batch.
pub(crate) type Answer = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// The future of a [`WriteOp`], borrowing the writer's connection.
pub(crate) type OpFuture<'c> = std::pin::Pin<Box<dyn std::future::Future<Output = OpResult> + Send + 'c>>;

/// `Ok(answer)`: the op's own outcome is decided (it may still be a refusal, which the answer
/// reports); `Err`: a database failure that fails the whole batch, with the answer to send it.
pub(crate) type OpResult = Result<Answer, (sqlx::Error, Answer)>;

/// A write run on the writer's connection inside its open transaction (claims, parked events,
/// process state, schedules, transactional projections). It must leave the transaction usable:
/// an op that may fail half-way wraps its statements in a savepoint.
pub(crate) type WriteOp = Box<dyn for<'c> FnOnce(&'c mut SqliteConnection) -> OpFuture<'c> + Send>;

/// Boxes a closure as a [`WriteOp`] (and gives it the higher-ranked signature closures do not
/// infer on their own).
pub(crate) fn write_op<F>(op: F) -> WriteOp
where
    F: for<'c> FnOnce(&'c mut SqliteConnection) -> OpFuture<'c> + Send + 'static,
{
    Box::new(op)
}

/// A failure of the writer's transaction: the batch is rolled back and every caller in it gets
/// this error (as [`StoreError::Unavailable`]).
#[derive(Debug, thiserror::Error)]
pub(crate) enum WriteError {
    /// A call of SQLite by the writer itself.
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    /// An op (on sqlx), or sqlx's lock on the handle (its worker thread is gone).
    #[error(transparent)]
    Sqlx(#[from] sqlx::Error),
    /// A request reached a path that does not run it (a bug of the writer's routing).
    #[error("the sqlite writer misrouted a request: {0}")]
    Misrouted(&'static str),
}

/// Most events (and links) [`Core::append_at_once`] writes in one statement: 13 parameters
/// per event stays far below SQLite's limit of 32 766.
const AT_ONCE_MAX_ROWS: usize = 256;

/// Up to this many rows, the multi-row statements stay prepared on the connection (larger
/// ones are rare and prepared each time, so they do not crowd out the others).
const AT_ONCE_CACHED_ROWS: usize = 4;

/// `?, ?, ...`: `count` anonymous parameters.
fn placeholders(count: usize) -> String {
    vec!["?"; count].join(", ")
}

/// `(?, ..., ?), (...)`: `count` rows of `columns` anonymous parameters.
fn rows(count: usize, columns: usize) -> String {
    let row = format!("({})", placeholders(columns));
    vec![row.as_str(); count].join(", ")
}

/// The longest the writer waits for the callers of a batch to queue their next requests (see
/// `Core::let_callers_return`): a small part of a commit's fsync, and spent yielding the core.
const GATHER: std::time::Duration = std::time::Duration::from_micros(50);

/// Most events one prune request reads: a long read would hold the write lock.
pub(crate) const PRUNE_CHUNK: u64 = 10_000;

// A prune request moves past at least one append: none has more events than a chunk.
const _: () = assert!(PRUNE_CHUNK as usize >= cqrs_core::store::MAX_EVENTS_PER_APPEND);

impl QueuedWrite for WriteRequest {
    /// The stream and command id of an append; `None` for other writes (never held).
    fn append_key(&self) -> Option<(&StreamId, Option<CommandId>)> {
        match self {
            WriteRequest::Append(append) => Some((&append.stream_id, append.command_id)),
            WriteRequest::Chain(links) => links.first().map(|head| (&head.stream_id, head.command_id)),
            _ => None,
        }
    }

    /// How many events the request writes.
    fn event_count(&self) -> usize {
        match self {
            WriteRequest::Append(append) => append.events.len(),
            WriteRequest::Chain(links) => links.iter().map(|link| link.events.len()).sum(),
            WriteRequest::Atomic(atomic) => atomic.parts.iter().map(|part| part.events.len()).sum(),
            _ => 0,
        }
    }
}

/// Counters of the writer, read by [`SqliteEventStore::stats`](crate::SqliteEventStore::stats).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) transactions: AtomicU64,
    pub(crate) failed_transactions: AtomicU64,
    pub(crate) appends: AtomicU64,
    pub(crate) events: AtomicU64,
    pub(crate) refused_appends: AtomicU64,
    pub(crate) largest_batch: AtomicU64,
}

impl Counters {
    /// Counts one committed append's answer (`None`: refused).
    fn record(&self, outcome: Option<&AppendOutcome>) {
        match outcome {
            Some(AppendOutcome::Appended(result)) => {
                self.appends.fetch_add(1, Ordering::Relaxed);
                self.events.fetch_add(result.last_version.0 - result.first_version.0 + 1, Ordering::Relaxed);
            }
            Some(AppendOutcome::Duplicate(_)) => {}
            None => {
                self.refused_appends.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The writer: the write connection (sqlx's, for ops) and everything else ([`Core`]), apart so
/// that the writer can hold the lock on the one while working with the other.
pub(crate) struct Writer {
    pub(crate) connection: SqliteConnection,
    pub(crate) core: Core,
}

/// The writer's state besides its sqlx connection.
pub(crate) struct Core {
    /// SQLite calls on the connection's handle, under sqlx's lock.
    pub(crate) direct: Direct,
    pub(crate) queue: BatchQueue<WriteRequest>,
    pub(crate) reservations: Arc<Reservations>,
    pub(crate) head: Arc<watch::Sender<Position>>,
    pub(crate) counters: Arc<Counters>,
    pub(crate) limits: BatchLimits,
}

/// What one request's work inside the transaction produced, sent once the batch commits.
enum Pending {
    Append(oneshot::Sender<Result<AppendOutcome, StoreError>>, Result<AppendOutcome, StoreError>),
    Atomic(oneshot::Sender<Result<Vec<AppendOutcome>, StoreError>>, Result<Vec<AppendOutcome>, StoreError>),
    Saved(oneshot::Sender<Result<(), StoreError>>, Result<(), StoreError>),
    Pruned(oneshot::Sender<Result<Pruned, StoreError>>, Pruned),
    Op(Answer),
}

impl Pending {
    /// Replaces a successful answer by `error` (the transaction did not commit).
    fn send_failed(self, error: StoreError) {
        // The callers may have gone away; nothing to do then.
        match self {
            Pending::Append(reply, _) => {
                let _ = reply.send(Err(error));
            }
            Pending::Atomic(reply, _) => {
                let _ = reply.send(Err(error));
            }
            Pending::Saved(reply, _) => {
                let _ = reply.send(Err(error));
            }
            Pending::Pruned(reply, _) => {
                let _ = reply.send(Err(error));
            }
            Pending::Op(answer) => answer(Err(error)),
        }
    }

    fn send(self) {
        match self {
            Pending::Append(reply, outcome) => {
                let _ = reply.send(outcome);
            }
            Pending::Atomic(reply, outcome) => {
                let _ = reply.send(outcome);
            }
            Pending::Saved(reply, outcome) => {
                let _ = reply.send(outcome);
            }
            Pending::Pruned(reply, pruned) => {
                let _ = reply.send(Ok(pruned));
            }
            Pending::Op(answer) => answer(Ok(())),
        }
    }
}

/// One batch's transaction as it goes: the answers to send once it commits, where the next
/// event goes, the newest position written.
struct Tx {
    pending: Vec<Pending>,
    next_position: i64,
    newest: Position,
    recorded_at: i64,
}

/// A failed transaction: the error, and the requests not yet run (answered with it).
type Failed = (WriteError, Vec<WriteRequest>);

impl Writer {
    /// Runs on the writer's own thread until every store handle is gone and the queue is
    /// drained, then closes the connection (which checkpoints the WAL). `runtime` runs what is
    /// async: waiting for the queue, and ops.
    pub(crate) fn run(self, runtime: &Handle) {
        let Writer { mut connection, mut core } = self;
        loop {
            // Direct: batches without ops, under the lock, until one with an op comes.
            let with_ops = match runtime.block_on(connection.lock_handle()) {
                Ok(_locked) => core.direct_batches(runtime),
                Err(error) => {
                    core.fail_until_closed(runtime, &error.into());
                    None
                }
            };
            let Some(batch) = with_ops else { break };
            let (span, size) = (core.batch_span(&batch), batch.len());
            runtime.block_on(tracing::Instrument::instrument(core.batch_with_ops(&mut connection, batch), span));
            core.let_callers_return(size);
        }
        // The writer's statements are finalized (under the lock, when sqlx's worker still runs)
        // before sqlx closes the handle.
        let locked = runtime.block_on(connection.lock_handle());
        drop(core);
        drop(locked);
        if let Err(error) = runtime.block_on(connection.close()) {
            tracing::debug!(%error, "closing the sqlite writer connection failed");
        }
    }
}

impl Core {
    /// Writes batches while they hold no op (the caller holds the lock); returns the first one
    /// that does, or `None` once the queue is closed and drained.
    fn direct_batches(&mut self, runtime: &Handle) -> Option<Vec<WriteRequest>> {
        while let Some(batch) = runtime.block_on(self.queue.next_batch(self.limits)) {
            if batch.iter().any(is_op) {
                return Some(batch);
            }
            let span = self.batch_span(&batch);
            let _entered = span.enter();
            let size = batch.len();
            let mut tx = Tx::new();
            let result = match self.begin(&mut tx) {
                Ok(()) => self.requests(batch, &mut tx).and_then(|()| self.commit()),
                Err(error) => Err((error, batch)),
            };
            if result.is_err() {
                self.rollback();
            }
            self.finish(size, tx, result);
            self.let_callers_return(size);
        }
        None
    }

    /// After answering `answered` requests, gives their callers a moment to queue their next
    /// ones before the next batch is taken, so that it holds them all rather than the first
    /// few (and the one after it the rest, each paying a commit). The callers run on the
    /// runtime's threads, which share the cores with this one: it yields to them, for at most
    /// [`GATHER`], until as many requests wait as were answered. After a lone request, for half
    /// of that: a caller sending one command after another has its next one queued by then, and
    /// the writer takes it without being woken from its sleep (the wake-up is a good part of a
    /// sequential command's time). It never delays a request that is already queued.
    fn let_callers_return(&self, answered: usize) {
        let deadline = std::time::Instant::now() + if answered < 2 { GATHER / 2 } else { GATHER };
        while self.queue.queued() < answered && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
    }

    /// Answers every request with `error` until the queue is closed: the connection is gone.
    fn fail_until_closed(&mut self, runtime: &Handle, error: &WriteError) {
        tracing::error!(%error, "the sqlite writer lost its connection");
        let error = Arc::new(error.to_string());
        while let Some(batch) = runtime.block_on(self.queue.next_batch(self.limits)) {
            self.counters.failed_transactions.fetch_add(1, Ordering::Relaxed);
            for request in batch {
                fail_request(request, || StoreError::Unavailable(error.as_str().into()));
            }
        }
    }

    /// The batch's `append_batch` span (and its size recorded, if it appends).
    fn batch_span(&self, batch: &[WriteRequest]) -> tracing::Span {
        let appends = batch
            .iter()
            .map(|request| match request {
                WriteRequest::Append(_) => 1,
                WriteRequest::Chain(links) => links.len(),
                WriteRequest::Atomic(atomic) => atomic.parts.len(),
                _ => 0,
            })
            .sum();
        if appends > 0 {
            cqrs_core::telemetry::record_batch("sqlite", appends);
        }
        tracing::debug_span!("append_batch", store = "sqlite", requests = batch.len(), appends)
    }

    /// Writes a batch that holds ops, taking sqlx's lock around the requests between them.
    async fn batch_with_ops(&mut self, connection: &mut SqliteConnection, batch: Vec<WriteRequest>) {
        let size = batch.len();
        let mut tx = Tx::new();
        let result = self.transaction_with_ops(connection, batch, &mut tx).await;
        // If the lock cannot be taken, sqlx's worker (and the connection) is gone.
        if let (Err(_), Ok(_locked)) = (&result, connection.lock_handle().await) {
            self.rollback();
        }
        self.finish(size, tx, result);
    }

    /// `BEGIN IMMEDIATE`, every request (each op on sqlx, the others directly), `COMMIT`.
    async fn transaction_with_ops(
        &mut self,
        connection: &mut SqliteConnection,
        batch: Vec<WriteRequest>,
        tx: &mut Tx,
    ) -> Result<(), Failed> {
        match connection.lock_handle().await {
            Ok(_locked) => {
                if let Err(error) = self.begin(tx) {
                    return Err((error, batch));
                }
            }
            Err(error) => return Err((error.into(), batch)),
        }
        let mut requests = batch.into_iter().peekable();
        while let Some(request) = requests.next() {
            if let WriteRequest::Op { run, fail: _ } = request {
                match run(connection).await {
                    Ok(answer) => tx.pending.push(Pending::Op(answer)),
                    Err((error, answer)) => {
                        // Answered with the batch's failure, like the requests already run.
                        tx.pending.push(Pending::Op(answer));
                        return Err((error.into(), requests.collect()));
                    }
                }
                continue;
            }
            // This request and the ones up to the next op, directly.
            let mut direct = vec![request];
            while let Some(next) = requests.next_if(|next| !is_op(next)) {
                direct.push(next);
            }
            let done = match connection.lock_handle().await {
                Ok(_locked) => self.requests(direct, tx),
                Err(error) => Err((error.into(), direct)),
            };
            if let Err((error, mut unanswered)) = done {
                unanswered.extend(requests);
                return Err((error, unanswered));
            }
        }
        match connection.lock_handle().await {
            Ok(_locked) => self.commit(),
            Err(error) => Err((error.into(), Vec::new())),
        }
    }

    /// `BEGIN IMMEDIATE` (the write lock), then the next position under it.
    fn begin(&mut self, tx: &mut Tx) -> Result<(), WriteError> {
        self.direct.run("BEGIN IMMEDIATE")?;
        let next = self.direct.query(
            "SELECT coalesce(max(position), 0) + 1 FROM cqrs_events",
            true,
            &Params::default(),
            |row| row.get::<_, i64>(0),
        )?;
        tx.next_position = next.first().copied().unwrap_or(1);
        Ok(())
    }

    fn commit(&mut self) -> Result<(), Failed> {
        self.direct.run("COMMIT").map_err(|error| (error.into(), Vec::new()))
    }

    /// Rolls back a failed batch (nothing of it is committed; SQLite may have rolled back
    /// already). The caller holds the lock.
    fn rollback(&self) {
        if let Err(error) = self.direct.run("ROLLBACK") {
            tracing::debug!(%error, "rollback after a failed batch");
        }
    }

    /// Ends a batch: after a commit, publishes the new head and sends every answer; after a
    /// failure (rolled back), answers every request with it.
    fn finish(&mut self, size: usize, tx: Tx, result: Result<(), Failed>) {
        let size = u64::try_from(size).unwrap_or(u64::MAX);
        match result {
            Ok(()) => {
                self.counters.transactions.fetch_add(1, Ordering::Relaxed);
                self.counters.largest_batch.fetch_max(size, Ordering::Relaxed);
                for answer in &tx.pending {
                    match answer {
                        Pending::Append(_, outcome) => self.counters.record(outcome.as_ref().ok()),
                        Pending::Atomic(_, Ok(outcomes)) => {
                            outcomes.iter().for_each(|outcome| self.counters.record(Some(outcome)));
                        }
                        Pending::Atomic(_, Err(_)) => self.counters.record(None),
                        _ => {}
                    }
                }
                if tx.newest > Position::START {
                    // Committed: now readers can see it.
                    self.head.send_modify(|position| *position = (*position).max(tx.newest));
                }
                for answer in tx.pending {
                    answer.send();
                }
            }
            Err((error, unanswered)) => {
                self.counters.failed_transactions.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%error, requests = size, "sqlite write batch failed");
                let error = Arc::new(error);
                let shared = || StoreError::Unavailable(Box::new(Arc::clone(&error)));
                for answer in tx.pending {
                    answer.send_failed(shared());
                }
                for request in unanswered {
                    fail_request(request, shared);
                }
            }
        }
    }

    /// Runs requests that are not ops inside the open transaction. On a failure that is not one
    /// request's own fault, returns the error and the requests not yet run; the caller rolls
    /// back.
    fn requests(&mut self, batch: Vec<WriteRequest>, tx: &mut Tx) -> Result<(), Failed> {
        let mut requests = batch.into_iter().peekable();
        while let Some(request) = requests.next() {
            if is_append(&request) {
                // This append or chain and every one queued right after it, together.
                let chains = take_appends(request, &mut requests);
                if let Err((error, mut unanswered)) = self.chains(chains, tx) {
                    unanswered.extend(requests);
                    return Err((error.into(), unanswered));
                }
                continue;
            }
            if let Err((error, mut unanswered)) = self.other_write(request, tx) {
                unanswered.extend(requests);
                return Err((error, unanswered));
            }
        }
        Ok(())
    }

    /// Runs one write that is neither an append nor an op inside the open transaction. On a
    /// failure of the transaction, returns the error and the request.
    fn other_write(&mut self, request: WriteRequest, tx: &mut Tx) -> Result<(), Failed> {
        let direct = &self.direct;
        let answer = match request {
            WriteRequest::Atomic(atomic) => {
                let outcome = self.atomic(&atomic.parts, tx);
                match outcome {
                    Ok(outcome) => Pending::Atomic(atomic.reply, outcome),
                    Err(error) => return Err((error.into(), vec![WriteRequest::Atomic(atomic)])),
                }
            }
            WriteRequest::Checkpoint { name, position, reply } => {
                match save_checkpoint(direct, &name, position, tx.recorded_at) {
                    Ok(()) => Pending::Saved(reply, Ok(())),
                    Err(error) => return Err((error.into(), vec![WriteRequest::Checkpoint { name, position, reply }])),
                }
            }
            WriteRequest::Snapshot { snapshot, state, reply } => {
                match save_snapshot(direct, &snapshot, &state, tx.recorded_at) {
                    Ok(()) => Pending::Saved(reply, Ok(())),
                    Err(error) => return Err((error.into(), vec![WriteRequest::Snapshot { snapshot, state, reply }])),
                }
            }
            WriteRequest::Prune { older_than, reply } => match prune_commands(direct, older_than) {
                Ok(pruned) => Pending::Pruned(reply, pruned),
                Err(error) => return Err((error.into(), vec![WriteRequest::Prune { older_than, reply }])),
            },
            // Appends go through `chains` and ops through `transaction_with_ops`; answered as a
            // failure if one ever came here.
            request @ (WriteRequest::Append(_) | WriteRequest::Chain(_) | WriteRequest::Op { .. }) => {
                return Err((WriteError::Misrouted("an append or an op reached other_write"), vec![request]));
            }
        };
        tx.pending.push(answer);
        Ok(())
    }

    /// Runs appends and chains queued together inside the open transaction, pushing their
    /// answers: a window ([`windows`]) at a time, each chain on its own if that declines. A
    /// conditional append shares a window only with appends before it whose events its query
    /// does not match, so its check before the window sees what it would see after them. On a
    /// failure of the transaction, returns the error and the requests not yet run.
    fn chains(
        &mut self,
        chains: Vec<Vec<AppendRequest>>,
        tx: &mut Tx,
    ) -> Result<(), (rusqlite::Error, Vec<WriteRequest>)> {
        let mut windows = windows(chains).into_iter();
        while let Some(window) = windows.next() {
            let unanswered = |window: Vec<Vec<AppendRequest>>, windows: std::vec::IntoIter<Vec<Vec<AppendRequest>>>| {
                window.into_iter().chain(windows.flatten()).map(WriteRequest::Chain).collect::<Vec<_>>()
            };
            let refs: Vec<&[AppendRequest]> = window.iter().map(Vec::as_slice).collect();
            match self.append_at_once(&refs, tx) {
                Ok(Some(results)) => {
                    for (chain, results) in window.into_iter().zip(results) {
                        answer_at_once(chain, results, tx);
                    }
                    continue;
                }
                // Declined, nothing written: each chain on its own.
                Ok(None) => {}
                Err(error) => return Err((error, unanswered(window, windows))),
            }
            // A window of one chain was just tried at once.
            let tried = window.len() == 1;
            let mut chains = window.into_iter();
            while let Some(links) = chains.next() {
                if let Err((error, rest)) = self.chain(links, tx, tried) {
                    let mut left = vec![WriteRequest::Chain(rest)];
                    left.extend(unanswered(chains.collect(), windows));
                    return Err((error, left));
                }
            }
        }
        Ok(())
    }

    /// Runs the links of a chain inside the open transaction, pushing their answers (set-based
    /// unless `tried_at_once`: that just declined); on a failure of the transaction, returns
    /// the error and the links not yet run.
    fn chain(
        &mut self,
        links: Vec<AppendRequest>,
        tx: &mut Tx,
        tried_at_once: bool,
    ) -> Result<(), (rusqlite::Error, Vec<AppendRequest>)> {
        if !tried_at_once {
            match self.append_at_once(&[&links], tx) {
                Ok(Some(mut results)) => {
                    answer_at_once(links, results.pop().unwrap_or_default(), tx);
                    return Ok(());
                }
                // Declined, nothing written: link by link, which says why.
                Ok(None) => {}
                Err(error) => return Err((error, links)),
            }
        }
        let mut links = links.into_iter();
        let mut broken = false;
        while let Some(link) = links.next() {
            if broken {
                let outcome = Err(cqrs_core::store::chain_broken(&link.stream_id, link.expected));
                tx.pending.push(Pending::Append(link.reply, outcome));
                continue;
            }
            match self.append(&link, tx) {
                Ok(outcome) => {
                    match &outcome {
                        Ok(AppendOutcome::Appended(result)) => tx.newest = tx.newest.max(result.last_position),
                        Err(StoreError::Conflict { .. }) => {
                            broken = true;
                            if let Some(command_id) = link.command_id {
                                self.reservations.reserve(link.stream_id.clone(), command_id);
                            }
                        }
                        _ => broken = true,
                    }
                    tx.pending.push(Pending::Append(link.reply, outcome));
                }
                Err(error) => {
                    let mut rest = vec![link];
                    rest.extend(links);
                    return Err((error, rest));
                }
            }
        }
        Ok(())
    }

    /// The common case of a batch's appends set-based, whatever the number of chains, streams,
    /// events and conditions: one read of every stream's version, of every command id and of
    /// the first event each condition matches, then one multi-row statement per table (every
    /// event, the streams' versions, the command ids, the tags' index) inside a savepoint. Each
    /// link is checked in order: its command id, its version against the version the links and
    /// chains before it leave (a stream may appear in several chains), its condition against
    /// the database before these chains, which [`windows`] made the same as after the links
    /// before it (their events match none of its queries). A link whose condition fails is
    /// answered `ConditionFailed` and not written; the others are. It declines (`Ok(None)`,
    /// nothing written) whenever a link would not simply be appended or refused by its
    /// condition: a version conflict, a command id already stored or given twice, an event the
    /// database refuses, a condition in a chain of several links, or a batch too big for one
    /// statement; [`chain`](Self::chain) then writes each chain on its own, and its links one
    /// by one if need be, which says why.
    fn append_at_once(
        &mut self,
        chains: &[&[AppendRequest]],
        tx: &mut Tx,
    ) -> rusqlite::Result<Option<Vec<Vec<LinkOutcome>>>> {
        let Some(plan) = AtOnce::plan(chains) else { return Ok(None) };
        let Some(Looked { versions: stored, failed }) = self.lookup_at_once(&plan)? else {
            return Ok(None);
        };
        let Some((encoded, written)) = check_at_once(chains, &stored, &failed) else {
            return Ok(None);
        };
        if written.events == 0 {
            // Every condition failed: nothing to write.
            let mut failed = failed.into_iter();
            let results =
                chains.iter().map(|chain| chain.iter().map(|_| refused(failed.next().flatten())).collect()).collect();
            return Ok(Some(results));
        }
        let first_position = tx.next_position;
        let rows = AtOnceRows { first_position, versions: stored, encoded, recorded_at: tx.recorded_at, failed };
        let Some(bound) = rows.bind(chains, &written) else { return Ok(None) };
        self.direct.run("SAVEPOINT at_once")?;
        let cached = |rows: usize| rows <= AT_ONCE_CACHED_ROWS;
        let direct = &self.direct;
        let inserted = direct
            .execute(&insert_events_sql(written.events), cached(written.events), &bound.events)
            .and_then(|_| match written.tagged {
                false => Ok(0),
                true => {
                    let mut positions = Params::with_capacity(2);
                    positions.int(first_position);
                    positions.int(bound.next_position - 1);
                    direct.execute(INDEX_TAGS_SQL, true, &positions)
                }
            });
        if let Err(error) = inserted {
            // Undo the statements that ran; if that fails, the transaction is: a failed batch.
            if let Err(undo) = direct.run("ROLLBACK TO at_once").and_then(|()| direct.run("RELEASE at_once")) {
                tracing::debug!(error = %undo, "undoing a set-based append");
                return Err(error);
            }
            // Nothing of the batch is stored: the per-chain and per-link paths say why.
            return if is_unique_violation(&error) || is_refused_data(&error) { Ok(None) } else { Err(error) };
        }
        direct.run("RELEASE at_once")?;
        tx.next_position = bound.next_position;
        Ok(Some(bound.results))
    }

    /// The set-based append's one read: every stream's version, any of the command ids stored
    /// for one of the streams (both index lookups; a pair found only across streams is filtered
    /// out), and for each condition the first event after its `after` that its query matches
    /// (a conditions of one tag and no type from the tag table's key, in one `VALUES`-driven
    /// select; any other as its own select). Returns the versions (0 for a new stream) and each
    /// link's failing position; `None` (declined) if a command id of the batch is stored
    /// already or a version is corrupt.
    fn lookup_at_once<'a>(&mut self, plan: &AtOnce<'a>) -> rusqlite::Result<Option<Looked<'a>>> {
        let (lookup, cached) = lookup_at_once_sql(plan);
        let params = bind_lookup(plan);
        let found = self.direct.query(&lookup, cached, &params, |row| {
            Ok((
                row.get::<_, Option<String>>(0)?,
                row.get::<_, Option<i64>>(1)?,
                uuid_column(row, 2)?,
                row.get::<_, Option<i64>>(3)?,
            ))
        })?;
        let streams = &plan.streams;
        let mut versions: HashMap<&str, i64> = streams.iter().map(|stream| (*stream, 0)).collect();
        let mut failed = vec![None; plan.links];
        let mut declined = false;
        for (stream, version, command_id, link) in found {
            if let Some(link) = link {
                // A condition's first match, if any.
                if let (Some(failing), Some(position)) =
                    (usize::try_from(link).ok().and_then(|link| failed.get_mut(link)), version)
                {
                    *failing = Some(position);
                }
                continue;
            }
            let Some(stream) = stream else { continue };
            if declined {
                continue;
            }
            match (version, command_id) {
                (Some(version), _) if version >= 0 => {
                    if let Some(current) = versions.get_mut(stream.as_str()) {
                        *current = version;
                    }
                }
                (None, Some(command_id)) if plan.commands.binary_search(&(stream.as_str(), command_id)).is_err() => {}
                // A stored command id of this batch (a duplicate), or a corrupt version.
                _ => declined = true,
            }
        }
        Ok((!declined).then_some(Looked { versions, failed }))
    }

    /// Runs one append inside the open transaction: its checks in order (a stored command id
    /// answers the duplicate, then the version, then the condition), then its writes.
    /// `Ok(Err(..))` is this append's own refusal (conflict, failed condition, reused event id),
    /// after which the transaction goes on; `Err` is a failure of the transaction itself.
    fn append(&mut self, request: &AppendRequest, tx: &mut Tx) -> rusqlite::Result<Result<AppendOutcome, StoreError>> {
        match self.check(request)? {
            Checked::Answered(answer) => Ok(answer),
            Checked::At(current) => self.write_checked(request, current, tx),
        }
    }

    /// An append's checks, in order, inside the open transaction (so they see the batch's
    /// earlier appends): its command id, its stream's version, its condition.
    fn check(&mut self, request: &AppendRequest) -> rusqlite::Result<Checked> {
        let direct = &self.direct;
        let stream_id = request.stream_id.as_str();
        if let Some(command_id) = &request.command_id {
            let mut params = Params::with_capacity(2);
            params.text(stream_id);
            params.uuid(Some(&command_id.0));
            let prior = direct.query(FIND_COMMAND_SQL, true, &params, |row| {
                Ok([row.get::<_, i64>(0)?, row.get(1)?, row.get(2)?, row.get(3)?])
            })?;
            if let Some(columns) = prior.first() {
                return Ok(Checked::Answered(append_result(*columns).map(AppendOutcome::Duplicate)));
            }
        }
        let mut params = Params::with_capacity(1);
        params.text(stream_id);
        let current = direct.query(STREAM_VERSION_SQL, true, &params, |row| row.get::<_, i64>(0))?;
        let current = current.first().copied().unwrap_or(0);
        let Ok(actual) = u64::try_from(current).map(Version) else {
            let corrupt = StoreError::Corrupt(format!("negative version {current} of {stream_id}"));
            return Ok(Checked::Answered(Err(corrupt)));
        };
        if !request.expected.accepts(actual) {
            let (stream_id, expected) = (request.stream_id.clone(), request.expected);
            return Ok(Checked::Answered(Err(StoreError::Conflict { stream_id, expected, actual })));
        }
        if let Some(condition) = &request.condition {
            let found = query::first_match(direct, &condition.fail_if_events_match, condition.after_position())?;
            if let Some(position) = found {
                // Positive by construction: positions start at 1.
                let position = Position(position.unsigned_abs());
                return Ok(Checked::Answered(Err(StoreError::ConditionFailed { position })));
            }
        }
        Ok(Checked::At(current))
    }

    /// Writes one checked append at versions after `current` (its events, which carry its
    /// command id, and their tags), inside a savepoint: if the database refuses an event,
    /// only this append is undone and refused.
    fn write_checked(
        &mut self,
        request: &AppendRequest,
        current: i64,
        tx: &mut Tx,
    ) -> rusqlite::Result<Result<AppendOutcome, StoreError>> {
        let direct = &self.direct;
        direct.run("SAVEPOINT cqrs_append")?;
        let first_position = tx.next_position;
        let undo = || direct.run("ROLLBACK TO cqrs_append").and_then(|()| direct.run("RELEASE cqrs_append"));
        match insert_events(direct, request, current, first_position, tx.recorded_at) {
            Ok(()) => {}
            Err(error) if is_unique_violation(&error) => {
                undo()?;
                return Ok(Err(reused_event_id(direct, request)?));
            }
            Err(error) if is_refused_data(&error) => {
                // This append's data was refused (too big, a constraint): only it fails.
                undo()?;
                return Ok(Err(StoreError::InvalidAppend(format!("refused by the database: {error}"))));
            }
            Err(error) => return Err(error),
        }
        // The event rows are all there is: they carry the stream's version and the command id.
        let n_events = i64::try_from(request.events.len()).unwrap_or(i64::MAX);
        let last_position = first_position + n_events - 1;
        direct.run("RELEASE cqrs_append")?;
        tx.next_position = last_position + 1;
        Ok(Ok(AppendOutcome::Appended(AppendResult {
            first_version: Version(current.unsigned_abs() + 1),
            last_version: Version(current.unsigned_abs() + request.events.len() as u64),
            // Positive by construction: positions start at 1 and only grow.
            first_position: Position(first_position.unsigned_abs()),
            last_position: Position(last_position.unsigned_abs()),
        })))
    }

    /// Runs an atomic append's parts inside the open transaction, in a savepoint: each part's
    /// checks and writes in order (the first part's condition is checked before anything of
    /// the append is written), kept only if every part was appended (or nothing was, every
    /// part a duplicate). `Ok(Err(..))` is the append's own refusal; `Err` a failure of the
    /// transaction.
    fn atomic(
        &mut self,
        parts: &[AppendRequest],
        tx: &mut Tx,
    ) -> rusqlite::Result<Result<Vec<AppendOutcome>, StoreError>> {
        self.direct.run("SAVEPOINT cqrs_atomic")?;
        let first_position = tx.next_position;
        let mut outcomes = Vec::with_capacity(parts.len());
        let mut refusal = None;
        for part in parts {
            match self.append(part, tx)? {
                Ok(outcome) => outcomes.push(outcome),
                Err(error) => {
                    refusal = Some(error);
                    break;
                }
            }
        }
        let appended = outcomes.iter().filter(|outcome| matches!(outcome, AppendOutcome::Appended(_))).count();
        let refusal = match (refusal, appended) {
            (Some(refusal), _) => Some(refusal),
            (None, appended) if appended == parts.len() || appended == 0 => None,
            (None, _) => Some(match parts.first().and_then(|part| part.command_id) {
                Some(command_id) => cqrs_core::store::partly_duplicate(command_id),
                None => StoreError::Corrupt("an atomic append without a command id found a duplicate".into()),
            }),
        };
        if let Some(refusal) = refusal {
            self.direct.run("ROLLBACK TO cqrs_atomic")?;
            self.direct.run("RELEASE cqrs_atomic")?;
            tx.next_position = first_position;
            return Ok(Err(refusal));
        }
        self.direct.run("RELEASE cqrs_atomic")?;
        for outcome in &outcomes {
            if let AppendOutcome::Appended(result) = outcome {
                tx.newest = tx.newest.max(result.last_position);
            }
        }
        Ok(Ok(outcomes))
    }
}

impl Tx {
    fn new() -> Self {
        Self {
            pending: Vec::new(),
            next_position: 1,
            newest: Position::START,
            recorded_at: Timestamp::now().as_micros(),
        }
    }
}

/// After a uniqueness violation: which of the append's event ids is already stored.
fn reused_event_id(direct: &Direct, request: &AppendRequest) -> rusqlite::Result<StoreError> {
    for event in &request.events {
        let mut params = Params::with_capacity(1);
        params.uuid(Some(&event.event_id.0));
        let stored = direct.query("SELECT 1 FROM cqrs_events WHERE event_id = ?", true, &params, |_| Ok(()))?;
        if !stored.is_empty() {
            return Ok(StoreError::DuplicateEventId(event.event_id));
        }
    }
    // No stored id matches: the violated key was another one, which the single writer
    // makes impossible unless the file was changed behind its back.
    Ok(StoreError::Corrupt(format!("unexpected uniqueness violation appending to {}", request.stream_id)))
}

/// Whether a request is an op (run on sqlx's side of the connection).
fn is_op(request: &WriteRequest) -> bool {
    matches!(request, WriteRequest::Op { .. })
}

/// Indexes the tags of the events stored at positions `?` to `?` (inclusive): one row per
/// distinct tag of each event, read back from the rows just written (their `tags` column).
const INDEX_TAGS_SQL: &str = "INSERT INTO cqrs_event_tags (tag, position) \
     SELECT DISTINCT tag.value, event.position FROM cqrs_events AS event, json_each(event.tags) AS tag \
     WHERE event.position BETWEEN ? AND ? AND event.tags <> '[]'";

/// The outcome of an append's checks ([`Core::check`]).
enum Checked {
    /// Answered without writing: a duplicate, or a refusal.
    Answered(Result<AppendOutcome, StoreError>),
    /// To be written: the stream's current version.
    At(i64),
}

/// The position at or below which command ids are forgotten, as a scalar subquery (see the
/// migration `20261208000001_one_row_per_event.sql`).
pub(crate) const HORIZON: &str = "(SELECT position FROM cqrs_command_horizon)";

/// The first outcome of a stored command id, by stream id and command id: the range of its
/// events (an append has at least one), its columns named as `rows::command_result` reads
/// them; no row if the id is unknown or forgotten.
pub(crate) const FIND_COMMAND_SQL: &str = "SELECT min(version) AS first_version, max(version) AS last_version, \
     min(position) AS first_position, max(position) AS last_position FROM cqrs_events \
     WHERE stream_id = ? AND command_id = ? AND position > (SELECT position FROM cqrs_command_horizon) \
     HAVING count(*) > 0";

/// A stream's version, by stream id: its last event's (0 for an unknown stream).
pub(crate) const STREAM_VERSION_SQL: &str = "SELECT coalesce(max(version), 0) FROM cqrs_events WHERE stream_id = ?";

/// The statement of one event row.
const INSERT_EVENT_SQL: &str = "INSERT INTO cqrs_events (position, event_id, stream_id, version, event_type, \
     schema_version, payload, command_id, causation_id, correlation_id, headers, recorded_at, tags) \
     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)";

/// Inserts the events of one append at versions after `current` and positions from
/// `first_position`, and indexes their tags.
fn insert_events(
    direct: &Direct,
    request: &AppendRequest,
    current: i64,
    first_position: i64,
    recorded_at: i64,
) -> rusqlite::Result<()> {
    let command_id = request.command_id.map(|id| id.0);
    for (offset, event) in (0i64..).zip(&request.events) {
        let encoded = Encoded::of(event).map_err(|error| rusqlite::Error::ToSqlConversionFailure(Box::new(error)))?;
        let row = EventRow {
            position: first_position + offset,
            stream_id: request.stream_id.as_str(),
            version: current + 1 + offset,
            command_id: command_id.as_ref(),
            recorded_at,
        };
        let mut params = Params::with_capacity(13);
        row.bind(&mut params, event, encoded);
        direct.execute(INSERT_EVENT_SQL, true, &params)?;
    }
    if request.events.iter().any(|event| !event.tags.is_empty()) {
        let last_position = first_position + i64::try_from(request.events.len()).unwrap_or(i64::MAX) - 1;
        let mut params = Params::with_capacity(2);
        params.int(first_position);
        params.int(last_position);
        direct.execute(INDEX_TAGS_SQL, true, &params)?;
    }
    Ok(())
}

/// An event's headers and tags, encoded for their columns.
struct Encoded {
    headers: String,
    tags: String,
}

impl Encoded {
    /// An error if the headers cannot be encoded (not expected: a map of strings).
    fn of(event: &NewEvent) -> Result<Self, serde_json::Error> {
        Ok(Self { headers: serde_json::to_string(&event.metadata.headers)?, tags: encode_tags(&event.tags) })
    }
}

/// What the set-based append answers a link: appended, or refused by its condition.
type LinkOutcome = Result<AppendResult, StoreError>;

/// The answer of a link not written because its condition failed at `position` (a position
/// always comes with a failed condition; 0 if that were ever not so).
fn refused(position: Option<i64>) -> LinkOutcome {
    Err(StoreError::ConditionFailed { position: Position(position.unwrap_or(0).unsigned_abs()) })
}

/// Pushes the answers of a chain the set-based append ran.
fn answer_at_once(chain: Vec<AppendRequest>, results: Vec<LinkOutcome>, tx: &mut Tx) {
    for (link, result) in chain.into_iter().zip(results) {
        if let Ok(result) = &result {
            tx.newest = tx.newest.max(result.last_position);
        }
        tx.pending.push(Pending::Append(link.reply, result.map(AppendOutcome::Appended)));
    }
}

/// A condition of the set-based append.
struct Condition<'a> {
    /// The link's index among all links of the batch's chains.
    link: usize,
    condition: &'a AppendCondition,
    /// The query's one tag, when it is one item of one tag and no type.
    tag: Option<&'a str>,
}

/// What a batch's set-based append ([`Core::append_at_once`]) reads: its streams, command ids
/// and conditions.
struct AtOnce<'a> {
    /// How many links the batch has.
    links: usize,
    /// The streams, sorted, each once.
    streams: Vec<&'a str>,
    /// The (stream, command id) pairs, sorted, each once.
    commands: Vec<(&'a str, Uuid)>,
    /// The command ids alone, sorted, each once.
    command_ids: Vec<Uuid>,
    /// The links' conditions that may fail (a query of no items never does).
    conditions: Vec<Condition<'a>>,
}

impl<'a> AtOnce<'a> {
    /// The batch's streams, command ids and conditions; `None` (declined) for a batch with no
    /// events, with an empty link, too big for one statement, giving a command id twice, or
    /// with a condition in a chain of several links.
    fn plan(chains: &[&'a [AppendRequest]]) -> Option<Self> {
        let links = || chains.iter().flat_map(|chain: &&'a [AppendRequest]| chain.iter());
        let events: usize = links().map(|link| link.events.len()).sum();
        if events == 0 || events > AT_ONCE_MAX_ROWS || links().count() > AT_ONCE_MAX_ROWS {
            return None;
        }
        if links().any(|link| link.events.is_empty()) {
            return None;
        }
        if chains.iter().any(|chain| chain.len() > 1 && conditional(chain)) {
            // A failed condition breaks the chain: link by link.
            return None;
        }
        let mut streams: Vec<&str> = links().map(|link| link.stream_id.as_str()).collect();
        streams.sort_unstable();
        streams.dedup();
        let mut commands: Vec<(&str, Uuid)> =
            links().filter_map(|link| link.command_id.map(|id| (link.stream_id.as_str(), id.0))).collect();
        commands.sort_unstable();
        let given = commands.len();
        commands.dedup();
        if commands.len() != given {
            // A command id twice: the second is a duplicate, answered link by link.
            return None;
        }
        let mut command_ids: Vec<Uuid> = commands.iter().map(|(_, id)| *id).collect();
        command_ids.sort_unstable();
        command_ids.dedup();
        let conditions = links()
            .enumerate()
            .filter_map(|(link, request)| request.condition.as_ref().map(|condition| (link, condition)))
            .filter(|(_, condition)| !condition.fail_if_events_match.is_none())
            .map(|(link, condition)| Condition {
                link,
                condition,
                tag: query::single_tag(&condition.fail_if_events_match),
            })
            .collect();
        Some(Self { links: links().count(), streams, commands, command_ids, conditions })
    }
}

/// What the set-based append's read found ([`Core::lookup_at_once`]).
struct Looked<'a> {
    /// Every stream's version (0 for a new one).
    versions: HashMap<&'a str, i64>,
    /// Per link, the position its condition fails at, if it does.
    failed: Vec<Option<i64>>,
}

/// The statement of [`Core::lookup_at_once`] (see there), and whether to keep it prepared.
/// Conditions come one-tag first, then the others, each in link order, as [`bind_lookup`]
/// binds them.
fn lookup_at_once_sql(plan: &AtOnce<'_>) -> (String, bool) {
    let (streams, command_ids) = (&plan.streams, &plan.command_ids);
    // Each stream's version is one step down its (stream_id, version) key (SQLite's min/max
    // optimisation), which a `GROUP BY` over the streams would not take: it walks every version.
    let mut lookup = format!(
        "SELECT s.column1, (SELECT coalesce(max(version), 0) FROM cqrs_events WHERE stream_id = s.column1), \
         NULL, NULL FROM (VALUES {}) AS s",
        rows(streams.len(), 1)
    );
    if !command_ids.is_empty() {
        lookup.push_str(&format!(
            " UNION ALL SELECT stream_id, NULL, command_id, NULL FROM cqrs_events \
             WHERE stream_id IN ({}) AND command_id IN ({}) AND position > {HORIZON}",
            placeholders(streams.len()),
            placeholders(command_ids.len())
        ));
    }
    let by_tag = plan.conditions.iter().filter(|condition| condition.tag.is_some()).count();
    if by_tag > 0 {
        lookup.push_str(&format!(
            " UNION ALL SELECT NULL, (SELECT position FROM cqrs_event_tags WHERE tag = c.column2 \
             AND position > c.column3 ORDER BY position LIMIT 1), NULL, c.column1 FROM (VALUES {}) AS c",
            rows(by_tag, 3)
        ));
    }
    for condition in plan.conditions.iter().filter(|condition| condition.tag.is_none()) {
        lookup.push_str(&format!(
            " UNION ALL SELECT NULL, {}, NULL, ?",
            query::first_match_sql(&condition.condition.fail_if_events_match)
        ));
    }
    let cached = streams.len() <= AT_ONCE_CACHED_ROWS
        && command_ids.len() <= AT_ONCE_CACHED_ROWS
        && by_tag <= AT_ONCE_CACHED_ROWS
        && by_tag == plan.conditions.len();
    (lookup, cached)
}

/// The parameters of [`lookup_at_once_sql`]'s statement, in order.
fn bind_lookup<'p>(plan: &'p AtOnce<'_>) -> Params<'p> {
    let (streams, command_ids) = (&plan.streams, &plan.command_ids);
    let mut params = Params::with_capacity(2 * streams.len() + command_ids.len() + 3 * plan.conditions.len());
    for stream in streams {
        params.text(stream);
    }
    if !command_ids.is_empty() {
        for stream in streams {
            params.text(stream);
        }
        for command_id in command_ids {
            params.uuid(Some(command_id));
        }
    }
    let link = |condition: &Condition<'_>| i64::try_from(condition.link).unwrap_or(i64::MAX);
    for condition in plan.conditions.iter() {
        if let Some(tag) = condition.tag {
            params.int(link(condition));
            params.text(tag);
            params.int(to_i64_saturating(condition.condition.after_position().0));
        }
    }
    for condition in plan.conditions.iter().filter(|condition| condition.tag.is_none()) {
        let (query_of, after) = (&condition.condition.fail_if_events_match, condition.condition.after_position());
        params = query::bind_first_match(params, query_of, after);
        params.int(link(condition));
    }
    params
}

/// What the set-based append writes: the links whose condition did not fail.
struct Written {
    /// Their events.
    events: usize,
    /// Whether one of their events carries tags (to index).
    tagged: bool,
}

/// Checks every link's expectation against the version everything before it leaves (from the
/// `stored` versions; a link whose condition `failed` is checked but leaves the version as it
/// was) and encodes the headers and tags of the events to write. Returns them, in order, and
/// what is written; `None` (declined) if a link would not simply be appended or refused by its
/// condition.
fn check_at_once<'a>(
    chains: &[&'a [AppendRequest]],
    stored: &HashMap<&'a str, i64>,
    failed: &[Option<i64>],
) -> Option<(Vec<Encoded>, Written)> {
    let links = || chains.iter().flat_map(|chain: &&'a [AppendRequest]| chain.iter());
    let mut versions = stored.clone();
    let mut written = Written { events: 0, tagged: false };
    let mut encoded = Vec::new();
    for (link, fails) in links().zip(failed) {
        let version = versions.get_mut(link.stream_id.as_str())?;
        if !link.expected.accepts(Version(version.unsigned_abs())) {
            return None;
        }
        if fails.is_some() {
            continue;
        }
        *version += i64::try_from(link.events.len()).unwrap_or(i64::MAX);
        written.events += link.events.len();
        written.tagged |= link.events.iter().any(|event| !event.tags.is_empty());
        for event in &link.events {
            encoded.push(Encoded::of(event).ok()?);
        }
    }
    Some((encoded, written))
}

/// `count` event rows in one statement.
fn insert_events_sql(count: usize) -> String {
    format!(
        "INSERT INTO cqrs_events (position, event_id, stream_id, version, event_type, schema_version, payload, \
         command_id, causation_id, correlation_id, headers, recorded_at, tags) VALUES {}",
        rows(count, 13)
    )
}

/// The set-based append's parameters, per statement, and what it answers.
struct Bound<'a> {
    events: Params<'a>,
    /// Each chain's answers.
    results: Vec<Vec<LinkOutcome>>,
    /// The position after the last event written.
    next_position: i64,
}

/// What the set-based append binds besides the links themselves.
struct AtOnceRows<'a> {
    /// The position of the batch's first event.
    first_position: i64,
    /// Every stream's version before the batch.
    versions: HashMap<&'a str, i64>,
    /// The events' encoded headers and tags, in order.
    encoded: Vec<Encoded>,
    recorded_at: i64,
    /// Per link, the position its condition failed at (then not written).
    failed: Vec<Option<i64>>,
}

impl<'a> AtOnceRows<'a> {
    /// Binds the parameters of the set-based append's statement: every event row (a link whose
    /// condition failed skipped). Returns them,
    /// each chain's answers and the next position; `None` for a link of an unknown stream or an
    /// event not encoded (not expected: declined).
    fn bind(self, chains: &[&'a [AppendRequest]], written: &Written) -> Option<Bound<'a>> {
        let Self { first_position, mut versions, encoded, recorded_at, failed } = self;
        let mut position = first_position;
        let mut encoded = encoded.into_iter();
        let mut failed = failed.into_iter();
        let mut results = Vec::with_capacity(chains.len());
        let mut events = Params::with_capacity(13 * written.events);
        for chain in chains {
            let mut chain_results = Vec::with_capacity(chain.len());
            for link in *chain {
                if let Some(at) = failed.next().flatten() {
                    chain_results.push(refused(Some(at)));
                    continue;
                }
                let stream_id = link.stream_id.as_str();
                let version = versions.get_mut(stream_id)?;
                let command_id = link.command_id.as_ref().map(|id| &id.0);
                let (first_position, first_version) = (position, *version + 1);
                for event in &link.events {
                    *version += 1;
                    let row = EventRow { position, stream_id, version: *version, command_id, recorded_at };
                    row.bind(&mut events, event, encoded.next()?);
                    position += 1;
                }
                let (last_version, last_position) = (*version, position - 1);
                chain_results.push(Ok(AppendResult {
                    // Positive by construction: versions and positions start at 1 and only grow.
                    first_version: Version(first_version.unsigned_abs()),
                    last_version: Version(last_version.unsigned_abs()),
                    first_position: Position(first_position.unsigned_abs()),
                    last_position: Position(last_position.unsigned_abs()),
                }));
            }
            results.push(chain_results);
        }
        Some(Bound { events, results, next_position: position })
    }
}

/// Where one event goes: what a row of `cqrs_events` takes besides the event itself.
struct EventRow<'a> {
    position: i64,
    stream_id: &'a str,
    version: i64,
    command_id: Option<&'a Uuid>,
    recorded_at: i64,
}

impl<'a> EventRow<'a> {
    /// Binds the row's thirteen columns, in table order, after the parameters `params` has.
    fn bind(&self, params: &mut Params<'a>, event: &'a NewEvent, encoded: Encoded) {
        params.int(self.position);
        params.uuid(Some(&event.event_id.0));
        params.text(self.stream_id);
        params.int(self.version);
        params.text(event.event_type.as_str());
        params.int(i64::from(event.schema_version));
        params.owned_text(event.payload.to_string());
        params.uuid(self.command_id);
        params.uuid(event.metadata.causation_id.as_ref().map(|id| &id.0));
        params.uuid(event.metadata.correlation_id.as_ref().map(|id| &id.0));
        params.owned_text(encoded.headers);
        params.int(self.recorded_at);
        params.owned_text(encoded.tags);
    }
}

/// Saves a checkpoint (an op's, on sqlx, or the writer's own, directly).
pub(crate) const SAVE_CHECKPOINT_SQL: &str = "INSERT INTO cqrs_checkpoints (name, position, updated_at) \
     VALUES (?, ?, ?) ON CONFLICT (name) DO UPDATE SET position = excluded.position, updated_at = excluded.updated_at";

fn save_checkpoint(direct: &Direct, name: &str, position: i64, now: i64) -> rusqlite::Result<()> {
    let mut params = Params::with_capacity(3);
    params.text(name);
    params.int(position);
    params.int(now);
    direct.execute(SAVE_CHECKPOINT_SQL, true, &params).map(|_| ())
}

fn save_snapshot(direct: &Direct, snapshot: &Snapshot, state: &str, now: i64) -> rusqlite::Result<()> {
    let mut params = Params::with_capacity(5);
    params.text(snapshot.stream_id.as_str());
    params.int(to_i64_saturating(snapshot.version.0));
    params.int(i64::from(snapshot.schema_version));
    params.text(state);
    params.int(now);
    // An older snapshot never replaces a newer one.
    direct
        .execute(
            "INSERT INTO cqrs_snapshots (stream_id, version, schema_version, state, saved_at) \
             VALUES (?, ?, ?, ?, ?) \
             ON CONFLICT (stream_id) DO UPDATE SET version = excluded.version, \
             schema_version = excluded.schema_version, state = excluded.state, saved_at = excluded.saved_at \
             WHERE cqrs_snapshots.version <= excluded.version",
            true,
            &params,
        )
        .map(|_| ())
}

/// Forgets the command ids of up to [`PRUNE_CHUNK`] events recorded before `older_than`: moves
/// the horizon ([`HORIZON`]) over the log's prefix recorded before it, never inside one append's
/// events (so a lookup sees all of an append's events or none). Returns how many (stream,
/// command id) pairs it forgot and whether events before `older_than` may remain (another
/// request goes on from there).
fn prune_commands(direct: &Direct, older_than: i64) -> rusqlite::Result<Pruned> {
    let horizon = direct.query(HORIZON_SQL, true, &Params::with_capacity(0), |row| row.get::<_, i64>(0))?;
    let horizon = horizon.first().copied().unwrap_or(0);
    let mut params = Params::with_capacity(2);
    params.int(horizon);
    // One more than a chunk: the row after the chunk says whether its last append ends there.
    params.int(i64::try_from(PRUNE_CHUNK + 1).unwrap_or(i64::MAX));
    let events = direct.query(
        "SELECT position, recorded_at, command_id, stream_id FROM cqrs_events WHERE position > ? \
         ORDER BY position LIMIT ?",
        true,
        &params,
        |row| Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?, uuid_column(row, 2)?, row.get::<_, String>(3)?)),
    )?;
    let (mut forgotten, mut new_horizon, mut more) = (0, horizon, false);
    for (index, (position, recorded_at, command_id, stream_id)) in events.iter().enumerate() {
        if *recorded_at >= older_than {
            break;
        }
        // The events of one append are consecutive and share stream and command id; the log's
        // last event ends its append (appends commit whole).
        let ends_append = match events.get(index + 1) {
            Some(next) => command_id.is_none() || (&next.2, &next.3) != (command_id, stream_id),
            // The chunk's extra row, which only says where the chunk's last append ends.
            None if index >= usize::try_from(PRUNE_CHUNK).unwrap_or(usize::MAX) => {
                more = true;
                break;
            }
            None => true,
        };
        if ends_append {
            forgotten += u64::from(command_id.is_some());
            new_horizon = *position;
        }
    }
    if new_horizon > horizon {
        let mut params = Params::with_capacity(1);
        params.int(new_horizon);
        direct.execute("UPDATE cqrs_command_horizon SET position = ? WHERE id = 1", true, &params)?;
    }
    Ok(Pruned { forgotten, more })
}

/// What one prune request did ([`prune_commands`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pruned {
    /// The (stream, command id) pairs forgotten.
    pub(crate) forgotten: u64,
    /// Whether events recorded before the bound may remain past the horizon.
    pub(crate) more: bool,
}

/// The horizon's position (see [`HORIZON`]).
const HORIZON_SQL: &str = "SELECT position FROM cqrs_command_horizon WHERE id = 1";

/// Most parameters the conditions of one set-based read bind (SQLite takes 32 766 in all).
const AT_ONCE_CONDITION_PARAMETERS: usize = 8_192;

/// Most conditions other than of one tag in one set-based read: each is one more select of a
/// compound, which SQLite bounds at 500.
const AT_ONCE_QUERY_CONDITIONS: usize = 64;

/// The chains cut into windows that one set-based statement takes, in order: at most
/// [`AT_ONCE_MAX_ROWS`] events and links each, conditions of bounded size; a chain of several
/// links with a condition alone in its window. **The guard:** a conditional append joins a
/// window only if its query matches none of the events the window's chains before it carry, so
/// that its condition checked against the database before the window (as
/// [`Core::append_at_once`] does) is its condition checked after them; one that matches
/// starts a new window, which the database then shows it.
fn windows(chains: Vec<Vec<AppendRequest>>) -> Vec<Vec<Vec<AppendRequest>>> {
    let mut windows: Vec<Vec<Vec<AppendRequest>>> = Vec::new();
    let (mut rows, mut links, mut alone) = (0, 0, false);
    let (mut parameters, mut queries) = (0, 0);
    for chain in chains {
        let (chain_rows, chain_links) = (chain.iter().map(|link| link.events.len()).sum::<usize>(), chain.len());
        let (chain_parameters, chain_queries) = condition_weight(&chain);
        let was_alone = std::mem::replace(&mut alone, chain.len() > 1 && conditional(&chain));
        match windows.last_mut() {
            Some(window)
                if !alone
                    && !was_alone
                    && rows + chain_rows <= AT_ONCE_MAX_ROWS
                    && links + chain_links <= AT_ONCE_MAX_ROWS
                    && parameters + chain_parameters <= AT_ONCE_CONDITION_PARAMETERS
                    && queries + chain_queries <= AT_ONCE_QUERY_CONDITIONS
                    && !sees(&chain, window) =>
            {
                window.push(chain);
                rows += chain_rows;
                links += chain_links;
                parameters += chain_parameters;
                queries += chain_queries;
            }
            _ => {
                windows.push(vec![chain]);
                (rows, links, parameters, queries) = (chain_rows, chain_links, chain_parameters, chain_queries);
            }
        }
    }
    windows
}

/// Whether a condition of `chain` matches an event of the chains of `window`.
fn sees(chain: &[AppendRequest], window: &[Vec<AppendRequest>]) -> bool {
    chain.iter().filter_map(|link| link.condition.as_ref()).any(|condition| {
        let query = &condition.fail_if_events_match;
        window.iter().flatten().flat_map(|link| &link.events).any(|event| query.matches(&event.event_type, &event.tags))
    })
}

/// The parameters a chain's conditions bind in the set-based read, and how many are not of one
/// tag.
fn condition_weight(chain: &[AppendRequest]) -> (usize, usize) {
    chain.iter().filter_map(|link| link.condition.as_ref()).fold((0, 0), |(parameters, queries), condition| {
        let query = &condition.fail_if_events_match;
        if query::single_tag(query).is_some() {
            (parameters + 3, queries)
        } else {
            (parameters + query::parameters(query) + 1, queries + 1)
        }
    })
}

/// Whether a chain holds a conditional append (in practice a chain of one: `append_chain`
/// takes no conditions).
fn conditional(chain: &[AppendRequest]) -> bool {
    chain.iter().any(|link| link.condition.is_some())
}

/// Whether a request is an append or a chain of them.
fn is_append(request: &WriteRequest) -> bool {
    matches!(request, WriteRequest::Append(_) | WriteRequest::Chain(_))
}

/// `first` (an append or a chain) and every append or chain queued right after it, as chains
/// (an append is a chain of one link).
fn take_appends(
    first: WriteRequest,
    requests: &mut std::iter::Peekable<std::vec::IntoIter<WriteRequest>>,
) -> Vec<Vec<AppendRequest>> {
    let mut chains = Vec::new();
    let mut next = Some(first);
    while let Some(request) = next.take() {
        match request {
            WriteRequest::Append(append) => chains.push(vec![append]),
            WriteRequest::Chain(links) => chains.push(links),
            _ => {}
        }
        next = requests.next_if(is_append);
    }
    chains
}

/// Answers a request of a failed batch.
fn fail_request(request: WriteRequest, error: impl Fn() -> StoreError) {
    match request {
        WriteRequest::Append(append) => {
            let _ = append.reply.send(Err(error()));
        }
        WriteRequest::Chain(links) => {
            for link in links {
                let _ = link.reply.send(Err(error()));
            }
        }
        WriteRequest::Atomic(atomic) => {
            let _ = atomic.reply.send(Err(error()));
        }
        WriteRequest::Checkpoint { reply, .. } | WriteRequest::Snapshot { reply, .. } => {
            let _ = reply.send(Err(error()));
        }
        WriteRequest::Prune { reply, .. } => {
            let _ = reply.send(Err(error()));
        }
        WriteRequest::Op { fail, .. } => fail(error()),
    }
}
