//! Group commit: the store's one writer task owns the only write connection. It takes every
//! queued request (up to a bound), runs them all in one `BEGIN IMMEDIATE` transaction (the
//! appends queued together, conditional or not, checked and written set-based, in two calls to
//! sqlx's SQLite thread, the first of which also begins the transaction and the last of which
//! also commits it when nothing follows; an append that would not simply be stored or refused
//! by its condition, inside a savepoint checked against its own expected version), commits
//! once (one fsync), and only then answers each caller.
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
use sqlx::{Connection, Executor, SqliteConnection};
use tokio::sync::{oneshot, watch};
use uuid::Uuid;

use crate::error::{is_refused_data, is_unique_violation, shared_unavailable};
use crate::query::{self, SqliteQuery};
use crate::rows::{command_result, encode_tags, to_i64_saturating};

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
    /// Forget up to [`PRUNE_CHUNK`] command ids stored before `older_than` (microseconds).
    Prune { older_than: i64, reply: oneshot::Sender<Result<u64, StoreError>> },
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

/// Most events (and links) [`Writer::append_at_once`] writes in one statement: 13 parameters
/// per event stays far below SQLite's limit of 32 766.
const AT_ONCE_MAX_ROWS: usize = 256;

/// Up to this many rows, the multi-row statements stay prepared on the connection (larger
/// ones are rare and prepared each time, so they do not crowd out the others).
const AT_ONCE_CACHED_ROWS: usize = 4;

/// `?, ?, ...`: `count` anonymous parameters. Not numbered (`?N`): for each bound value sqlx
/// asks SQLite for its parameter's name, a lookup that scans the statement's named parameters,
/// which made a multi-row statement's binding quadratic in its size.
fn placeholders(count: usize) -> String {
    vec!["?"; count].join(", ")
}

/// `(?, ..., ?), (...)`: `count` rows of `columns` anonymous parameters.
fn rows(count: usize, columns: usize) -> String {
    let row = format!("({})", placeholders(columns));
    vec![row.as_str(); count].join(", ")
}

/// Most command ids one prune request forgets: a long delete would hold the write lock.
pub(crate) const PRUNE_CHUNK: u64 = 10_000;

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

/// The writer task's state.
pub(crate) struct Writer {
    pub(crate) connection: SqliteConnection,
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
    Pruned(oneshot::Sender<Result<u64, StoreError>>, u64),
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

impl Writer {
    /// Runs until every store handle is gone and the queue is drained, then closes the
    /// connection (which checkpoints the WAL).
    pub(crate) async fn run(mut self) {
        while let Some(batch) = self.queue.next_batch(self.limits).await {
            self.write_batch(batch).await;
            // The callers just answered are woken on this thread: let them queue their next
            // appends before the next batch is taken, so that it holds them all rather than
            // the first few (and the next one the rest).
            tokio::task::yield_now().await;
        }
        if let Err(error) = self.connection.close().await {
            tracing::debug!(%error, "closing the sqlite writer connection failed");
        }
    }

    /// Writes one batch in one transaction and answers every request in it, inside its
    /// `append_batch` span.
    async fn write_batch(&mut self, batch: Vec<WriteRequest>) {
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
        let span = tracing::debug_span!("append_batch", store = "sqlite", requests = batch.len(), appends);
        tracing::Instrument::instrument(self.write_batch_now(batch), span).await;
    }

    async fn write_batch_now(&mut self, batch: Vec<WriteRequest>) {
        let size = u64::try_from(batch.len()).unwrap_or(u64::MAX);
        let mut pending = Vec::with_capacity(batch.len());
        let mut newest = Position::START;
        let result = self.transaction(batch, &mut pending, &mut newest).await;
        match result {
            Ok(()) => {
                self.counters.transactions.fetch_add(1, Ordering::Relaxed);
                self.counters.largest_batch.fetch_max(size, Ordering::Relaxed);
                for answer in &pending {
                    match answer {
                        Pending::Append(_, outcome) => self.counters.record(outcome.as_ref().ok()),
                        Pending::Atomic(_, Ok(outcomes)) => {
                            outcomes.iter().for_each(|outcome| self.counters.record(Some(outcome)));
                        }
                        Pending::Atomic(_, Err(_)) => self.counters.record(None),
                        _ => {}
                    }
                }
                if newest > Position::START {
                    // Committed: now readers can see it.
                    self.head.send_modify(|position| *position = (*position).max(newest));
                }
                for answer in pending {
                    answer.send();
                }
            }
            Err((error, unanswered)) => {
                self.counters.failed_transactions.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%error, requests = size, "sqlite write batch failed");
                // Nothing of the batch was committed (SQLite rolled back, or we did).
                if let Err(rollback) = self.connection.execute("ROLLBACK").await {
                    tracing::debug!(error = %rollback, "rollback after a failed batch");
                }
                let error = Arc::new(error);
                for answer in pending {
                    answer.send_failed(shared_unavailable(&error));
                }
                for request in unanswered {
                    fail_request(request, || shared_unavailable(&error));
                }
            }
        }
    }

    /// `BEGIN IMMEDIATE`, every request, `COMMIT`. On a failure that is not one request's
    /// own fault, returns the error and the requests not yet run; the caller rolls back.
    async fn transaction(
        &mut self,
        batch: Vec<WriteRequest>,
        pending: &mut Vec<Pending>,
        newest: &mut Position,
    ) -> Result<(), (sqlx::Error, Vec<WriteRequest>)> {
        // `BEGIN IMMEDIATE` runs in the first call the batch makes to sqlx's SQLite thread: the
        // set-based lookup of the appends queued first, or `begun`.
        let mut next_position = None;
        let recorded_at = Timestamp::now().as_micros();
        let mut requests = batch.into_iter().peekable();
        while let Some(request) = requests.next() {
            if is_append(&request) {
                // This append or chain and every one queued right after it, together.
                let chains = take_appends(request, &mut requests);
                // The batch's last requests: their statement may commit the transaction too.
                let last = requests.peek().is_none();
                match self.chains(chains, pending, &mut next_position, newest, recorded_at, last).await {
                    Ok(true) => return Ok(()),
                    Ok(false) => continue,
                    Err((error, mut unanswered)) => {
                        unanswered.extend(requests);
                        return Err((error, unanswered));
                    }
                }
            }
            let next = match self.begun(&mut next_position).await {
                Ok(next) => next,
                Err(error) => {
                    let mut unanswered = vec![request];
                    unanswered.extend(requests);
                    return Err((error, unanswered));
                }
            };
            if let WriteRequest::Atomic(atomic) = request {
                match self.atomic(&atomic.parts, next, newest, recorded_at).await {
                    Ok(outcome) => pending.push(Pending::Atomic(atomic.reply, outcome)),
                    Err(error) => {
                        let mut unanswered = vec![WriteRequest::Atomic(atomic)];
                        unanswered.extend(requests);
                        return Err((error, unanswered));
                    }
                }
                continue;
            }
            match self.other_write(request, recorded_at).await {
                Ok(answer) => pending.push(answer),
                Err((error, unrun)) => {
                    let mut unanswered = Vec::new();
                    match unrun {
                        Unrun::Request(request) => unanswered.push(request),
                        // Answered with the batch's failure, like the requests already run.
                        Unrun::Answer(answer) => pending.push(Pending::Op(answer)),
                    }
                    unanswered.extend(requests);
                    return Err((error, unanswered));
                }
            }
        }
        if next_position.is_none() {
            // Nothing ran, so nothing began.
            return Ok(());
        }
        match self.connection.execute("COMMIT").await {
            Ok(_) => Ok(()),
            Err(error) => Err((error, Vec::new())),
        }
    }

    /// Runs one write that is not an append inside the open transaction. On a failure of the
    /// transaction, returns the error and what is left to answer.
    async fn other_write(&mut self, request: WriteRequest, recorded_at: i64) -> Result<Pending, (sqlx::Error, Unrun)> {
        let connection = &mut self.connection;
        match request {
            WriteRequest::Checkpoint { name, position, reply } => {
                match save_checkpoint(connection, &name, position, recorded_at).await {
                    Ok(()) => Ok(Pending::Saved(reply, Ok(()))),
                    Err(error) => Err((error, Unrun::Request(WriteRequest::Checkpoint { name, position, reply }))),
                }
            }
            WriteRequest::Snapshot { snapshot, state, reply } => {
                match save_snapshot(connection, &snapshot, &state, recorded_at).await {
                    Ok(()) => Ok(Pending::Saved(reply, Ok(()))),
                    Err(error) => Err((error, Unrun::Request(WriteRequest::Snapshot { snapshot, state, reply }))),
                }
            }
            WriteRequest::Prune { older_than, reply } => match prune_commands(connection, older_than).await {
                Ok(pruned) => Ok(Pending::Pruned(reply, pruned)),
                Err(error) => Err((error, Unrun::Request(WriteRequest::Prune { older_than, reply }))),
            },
            WriteRequest::Op { run, fail: _ } => match run(connection).await {
                Ok(answer) => Ok(Pending::Op(answer)),
                Err((error, answer)) => Err((error, Unrun::Answer(answer))),
            },
            // Appends go through `chains`; answered the same way if one ever came here.
            request @ (WriteRequest::Append(_) | WriteRequest::Chain(_) | WriteRequest::Atomic(_)) => {
                Err((sqlx::Error::Protocol("an append reached other_write".to_owned()), Unrun::Request(request)))
            }
        }
    }

    /// The transaction's next position, beginning the transaction first if nothing has: two
    /// statements in one hand-off to sqlx's SQLite thread (each call is a round trip to it),
    /// the write lock, then the next position under it.
    async fn begun<'p>(&mut self, next_position: &'p mut Option<i64>) -> Result<&'p mut i64, sqlx::Error> {
        if let Some(next) = next_position {
            return Ok(next);
        }
        let next: i64 = sqlx::query_scalar("BEGIN IMMEDIATE; SELECT coalesce(max(position), 0) + 1 FROM cqrs_events")
            .fetch_one(&mut self.connection)
            .await?;
        Ok(next_position.insert(next))
    }

    /// Runs appends and chains queued together inside the open transaction, pushing their
    /// answers: a window ([`windows`]) at a time, each chain on its own if that declines. A
    /// conditional append shares a window only with appends before it whose events its query
    /// does not match, so its check before the window sees what it would see after them. With `commit` (nothing follows
    /// them in the batch), the last set-based write commits the transaction in the same call;
    /// true if it did. On a failure of the transaction, returns the error and the requests not
    /// yet run.
    async fn chains(
        &mut self,
        chains: Vec<Vec<AppendRequest>>,
        pending: &mut Vec<Pending>,
        next_position: &mut Option<i64>,
        newest: &mut Position,
        recorded_at: i64,
        commit: bool,
    ) -> Result<bool, (sqlx::Error, Vec<WriteRequest>)> {
        let mut windows = windows(chains).into_iter();
        while let Some(window) = windows.next() {
            let unanswered = |window: Vec<Vec<AppendRequest>>, windows: std::vec::IntoIter<Vec<Vec<AppendRequest>>>| {
                window.into_iter().chain(windows.flatten()).map(WriteRequest::Chain).collect::<Vec<_>>()
            };
            let commit = commit && windows.len() == 0;
            let refs: Vec<&[AppendRequest]> = window.iter().map(Vec::as_slice).collect();
            let at_once = self.append_at_once(&refs, next_position, recorded_at, commit).await;
            match at_once {
                Ok(Some(results)) => {
                    for (chain, results) in window.into_iter().zip(results) {
                        answer_at_once(chain, results, pending, newest);
                    }
                    if commit {
                        return Ok(true);
                    }
                    continue;
                }
                // Declined, nothing written: each chain on its own.
                Ok(None) => {}
                Err(error) => return Err((error, unanswered(window, windows))),
            }
            let next_position = match self.begun(next_position).await {
                Ok(next) => next,
                Err(error) => return Err((error, unanswered(window, windows))),
            };
            // A window of one chain was just tried at once.
            let tried = window.len() == 1;
            let mut chains = window.into_iter();
            while let Some(links) = chains.next() {
                if let Err((error, rest)) = self.chain(links, pending, next_position, newest, recorded_at, tried).await
                {
                    let mut left = vec![WriteRequest::Chain(rest)];
                    left.extend(unanswered(chains.collect(), windows));
                    return Err((error, left));
                }
            }
        }
        Ok(false)
    }

    /// Runs the links of a chain inside the open transaction, pushing their answers (set-based
    /// unless `tried_at_once`: that just declined); on a failure of the transaction, returns
    /// the error and the links not yet run.
    async fn chain(
        &mut self,
        links: Vec<AppendRequest>,
        pending: &mut Vec<Pending>,
        next_position: &mut i64,
        newest: &mut Position,
        recorded_at: i64,
        tried_at_once: bool,
    ) -> Result<(), (sqlx::Error, Vec<AppendRequest>)> {
        if !tried_at_once {
            let mut begun = Some(*next_position);
            let at_once = self.append_at_once(&[&links], &mut begun, recorded_at, false).await;
            *next_position = begun.unwrap_or(*next_position);
            match at_once {
                Ok(Some(mut results)) => {
                    answer_at_once(links, results.pop().unwrap_or_default(), pending, newest);
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
                pending.push(Pending::Append(link.reply, outcome));
                continue;
            }
            match self.append(&link, next_position, recorded_at).await {
                Ok(outcome) => {
                    match &outcome {
                        Ok(AppendOutcome::Appended(result)) => *newest = (*newest).max(result.last_position),
                        Err(StoreError::Conflict { .. }) => {
                            broken = true;
                            if let Some(command_id) = link.command_id {
                                self.reservations.reserve(link.stream_id.clone(), command_id);
                            }
                        }
                        _ => broken = true,
                    }
                    pending.push(Pending::Append(link.reply, outcome));
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

    /// The common case of a batch's appends in two calls to the SQLite thread, whatever the
    /// number of chains, streams, events and conditions: one read of every stream's version, of
    /// every command id and of the first event each condition matches, then one call of three
    /// statements (a multi-row `INSERT` of every event, atomic as one statement so no
    /// savepoint; a multi-row upsert of the streams' versions; a multi-row `INSERT` of the
    /// command ids). Each link is checked in order: its command id, its version against the
    /// version the links and chains before it leave (a stream may appear in several chains),
    /// its condition against the database before these chains, which [`windows`] made the same
    /// as after the links before it (their events match none of its queries). A link whose
    /// condition fails is answered `ConditionFailed` and not written; the others are. It
    /// declines (`Ok(None)`, nothing written) whenever a link would not simply be appended or
    /// refused by its condition: a version conflict, a command id already stored or given
    /// twice, an event the database refuses, a condition in a chain of several links, or a
    /// batch too big for one statement; [`chain`](Self::chain) then writes each chain on its
    /// own, and its links one by one if need be, which says why.
    ///
    /// With `commit`, the same call also commits the transaction. With no `next_position` yet,
    /// the lookup's call also begins the transaction and reads it (then set even when the
    /// method declines).
    async fn append_at_once(
        &mut self,
        chains: &[&[AppendRequest]],
        next_position: &mut Option<i64>,
        recorded_at: i64,
        commit: bool,
    ) -> Result<Option<Vec<Vec<LinkOutcome>>>, sqlx::Error> {
        let Some(plan) = AtOnce::plan(chains) else { return Ok(None) };
        let Some(Looked { versions: stored, first_position, failed }) =
            self.lookup_at_once(&plan, next_position).await?
        else {
            return Ok(None);
        };
        let Some((encoded, changed, written)) = check_at_once(chains, &plan, &stored, &failed) else {
            return Ok(None);
        };
        if written.events == 0 {
            // Every condition failed: nothing to write.
            if commit {
                self.connection.execute("COMMIT").await?;
            }
            let mut failed = failed.into_iter();
            let results =
                chains.iter().map(|chain| chain.iter().map(|_| refused(failed.next().flatten())).collect()).collect();
            return Ok(Some(results));
        }
        let insert = insert_at_once_sql(&written, changed.len(), commit);
        let cached =
            written.events <= AT_ONCE_CACHED_ROWS && changed.len() <= 1 && written.commands <= AT_ONCE_CACHED_ROWS;
        let query = sqlx::query(&insert).persistent(cached);
        let rows = AtOnceRows { first_position, versions: stored, encoded, changed: &changed, recorded_at, failed };
        let Some((query, results, position)) = rows.bind(query, chains, &written) else {
            return Ok(None);
        };
        if let Err(error) = query.execute(&mut self.connection).await {
            // Undo the statements that ran. If this fails too, the savepoint is gone (the
            // failure was the COMMIT, after it) or the transaction is: a failed batch.
            if let Err(undo) = self.connection.execute("ROLLBACK TO at_once; RELEASE at_once").await {
                tracing::debug!(error = %undo, "undoing a set-based append");
                return Err(error);
            }
            // Nothing of the batch is stored: the per-chain and per-link paths say why.
            return if is_unique_violation(&error) || is_refused_data(&error) { Ok(None) } else { Err(error) };
        }
        *next_position = Some(position);
        Ok(Some(results))
    }

    /// The set-based append's one read: every stream's version, any of the command ids stored
    /// for one of the streams (both index lookups; a pair found only across streams is filtered
    /// out), and for each condition the first event after its `after` that its query matches
    /// (a conditions of one tag and no type from the tag table's key, in one `VALUES`-driven
    /// select; any other as its own select); first, if the transaction has not begun (no
    /// `next_position`), the write lock and the next position under it (the row without a
    /// stream). Returns the versions (0 for a new stream), the next position and each link's
    /// failing position; `None` (declined) if a command id of the batch is stored already or a
    /// version is corrupt.
    async fn lookup_at_once<'a>(
        &mut self,
        plan: &AtOnce<'a>,
        next_position: &mut Option<i64>,
    ) -> Result<Option<Looked<'a>>, sqlx::Error> {
        let (lookup, cached) = lookup_at_once_sql(plan, next_position.is_none());
        let query = bind_lookup(sqlx::query(&lookup).persistent(cached), plan);
        let streams = &plan.streams;
        let mut versions: HashMap<&str, i64> = streams.iter().map(|stream| (*stream, 0)).collect();
        let mut failed = vec![None; plan.links];
        let mut declined = false;
        for row in query.fetch_all(&mut self.connection).await? {
            let (stream, version, command_id, link) = lookup_row(&row)?;
            if let Some(link) = link {
                // A condition's first match, if any.
                if let (Some(failing), Some(position)) =
                    (usize::try_from(link).ok().and_then(|link| failed.get_mut(link)), version)
                {
                    *failing = Some(position);
                }
                continue;
            }
            let Some(stream) = stream else {
                // The next position (rows of the lookup are decided below).
                *next_position = version;
                continue;
            };
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
        let Some(first_position) = *next_position else {
            return Err(sqlx::Error::Protocol("the write transaction began without its next position".to_owned()));
        };
        Ok((!declined).then_some(Looked { versions, first_position, failed }))
    }

    /// Runs one append inside the open transaction: its checks in order (a stored command id
    /// answers the duplicate, then the version, then the condition), then its writes.
    /// `Ok(Err(..))` is this append's own refusal (conflict, failed condition, reused event id),
    /// after which the transaction goes on; `Err` is a failure of the transaction itself.
    async fn append(
        &mut self,
        request: &AppendRequest,
        next_position: &mut i64,
        recorded_at: i64,
    ) -> Result<Result<AppendOutcome, StoreError>, sqlx::Error> {
        match self.check(request).await? {
            Checked::Answered(answer) => Ok(answer),
            Checked::At(current) => self.write_checked(request, current, next_position, recorded_at).await,
        }
    }

    /// An append's checks, in order, inside the open transaction (so they see the batch's
    /// earlier appends): its command id, its stream's version, its condition.
    async fn check(&mut self, request: &AppendRequest) -> Result<Checked, sqlx::Error> {
        let connection = &mut self.connection;
        let stream_id = request.stream_id.as_str();
        if let Some(command_id) = request.command_id {
            let prior = sqlx::query(
                "SELECT first_version, last_version, first_position, last_position FROM cqrs_commands \
                 WHERE stream_id = ?1 AND command_id = ?2",
            )
            .bind(stream_id)
            .bind(command_id.0)
            .fetch_optional(&mut *connection)
            .await?;
            if let Some(row) = prior {
                return Ok(Checked::Answered(command_result(&row).map(AppendOutcome::Duplicate)));
            }
        }
        let current: Option<i64> = sqlx::query_scalar("SELECT version FROM cqrs_streams WHERE stream_id = ?1")
            .bind(stream_id)
            .fetch_optional(&mut *connection)
            .await?;
        let current = current.unwrap_or(0);
        let Ok(actual) = u64::try_from(current).map(Version) else {
            let corrupt = StoreError::Corrupt(format!("negative version {current} of {stream_id}"));
            return Ok(Checked::Answered(Err(corrupt)));
        };
        if !request.expected.accepts(actual) {
            let (stream_id, expected) = (request.stream_id.clone(), request.expected);
            return Ok(Checked::Answered(Err(StoreError::Conflict { stream_id, expected, actual })));
        }
        if let Some(position) = self.condition_fails(request).await? {
            return Ok(Checked::Answered(Err(StoreError::ConditionFailed { position })));
        }
        Ok(Checked::At(current))
    }

    /// The first event after the append's condition's `after` that its query matches (the
    /// condition fails), read inside the open transaction; `None` without a condition.
    async fn condition_fails(&mut self, request: &AppendRequest) -> Result<Option<Position>, sqlx::Error> {
        let Some(condition) = &request.condition else { return Ok(None) };
        let found =
            query::first_match(&mut self.connection, &condition.fail_if_events_match, condition.after_position())
                .await?;
        // Positive by construction: positions start at 1.
        Ok(found.map(|position| Position(position.unsigned_abs())))
    }

    /// Writes one checked append at versions after `current` (its events, their tags, its
    /// stream's version, its command id), inside a savepoint: if the database refuses an event,
    /// only this append is undone and refused.
    async fn write_checked(
        &mut self,
        request: &AppendRequest,
        current: i64,
        next_position: &mut i64,
        recorded_at: i64,
    ) -> Result<Result<AppendOutcome, StoreError>, sqlx::Error> {
        let connection = &mut self.connection;
        connection.execute("SAVEPOINT cqrs_append").await?;
        let first_position = *next_position;
        match insert_events(connection, request, current, first_position, recorded_at).await {
            Ok(()) => {}
            Err(error) if is_unique_violation(&error) => {
                connection.execute("ROLLBACK TO cqrs_append; RELEASE cqrs_append").await?;
                return Ok(Err(self.reused_event_id(request).await?));
            }
            Err(error) if is_refused_data(&error) => {
                // This append's data was refused (too big, a constraint): only it fails.
                connection.execute("ROLLBACK TO cqrs_append; RELEASE cqrs_append").await?;
                return Ok(Err(StoreError::InvalidAppend(format!("refused by the database: {error}"))));
            }
            Err(error) => return Err(error),
        }
        let n_events = i64::try_from(request.events.len()).unwrap_or(i64::MAX);
        let last_position = first_position + n_events - 1;
        let range = StoredRange { current, first_position, last_position, recorded_at };
        record_stream_and_command(connection, request, &range).await?;
        connection.execute("RELEASE cqrs_append").await?;
        *next_position = last_position + 1;
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
    async fn atomic(
        &mut self,
        parts: &[AppendRequest],
        next_position: &mut i64,
        newest: &mut Position,
        recorded_at: i64,
    ) -> Result<Result<Vec<AppendOutcome>, StoreError>, sqlx::Error> {
        self.connection.execute("SAVEPOINT cqrs_atomic").await?;
        let first_position = *next_position;
        let mut outcomes = Vec::with_capacity(parts.len());
        let mut refusal = None;
        for part in parts {
            match self.append(part, next_position, recorded_at).await? {
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
            self.connection.execute("ROLLBACK TO cqrs_atomic; RELEASE cqrs_atomic").await?;
            *next_position = first_position;
            return Ok(Err(refusal));
        }
        self.connection.execute("RELEASE cqrs_atomic").await?;
        for outcome in &outcomes {
            if let AppendOutcome::Appended(result) = outcome {
                *newest = (*newest).max(result.last_position);
            }
        }
        Ok(Ok(outcomes))
    }

    /// After a uniqueness violation: which of the append's event ids is already stored.
    async fn reused_event_id(&mut self, request: &AppendRequest) -> Result<StoreError, sqlx::Error> {
        for event in &request.events {
            let stored: Option<i64> = sqlx::query_scalar("SELECT 1 FROM cqrs_events WHERE event_id = ?1")
                .bind(event.event_id.0)
                .fetch_optional(&mut self.connection)
                .await?;
            if stored.is_some() {
                return Ok(StoreError::DuplicateEventId(event.event_id));
            }
        }
        // No stored id matches: the violated key was another one, which the single writer
        // makes impossible unless the file was changed behind its back.
        Ok(StoreError::Corrupt(format!("unexpected uniqueness violation appending to {}", request.stream_id)))
    }
}

/// Indexes the tags of the events stored at positions `?` to `?` (inclusive): one row per
/// distinct tag of each event, read back from the rows just written (their `tags` column).
const INDEX_TAGS_SQL: &str = "INSERT INTO cqrs_event_tags (tag, position) \
     SELECT DISTINCT tag.value, event.position FROM cqrs_events AS event, json_each(event.tags) AS tag \
     WHERE event.position BETWEEN ? AND ? AND event.tags <> '[]'";

/// The outcome of an append's checks ([`Writer::check`]).
enum Checked {
    /// Answered without writing: a duplicate, or a refusal.
    Answered(Result<AppendOutcome, StoreError>),
    /// To be written: the stream's current version.
    At(i64),
}

/// Where a checked append lands.
struct StoredRange {
    /// The stream's version before the append.
    current: i64,
    first_position: i64,
    last_position: i64,
    recorded_at: i64,
}

/// Inserts the events of one append at versions after `current` and positions from
/// `first_position`, and indexes their tags.
async fn insert_events(
    connection: &mut SqliteConnection,
    request: &AppendRequest,
    current: i64,
    first_position: i64,
    recorded_at: i64,
) -> Result<(), sqlx::Error> {
    let command_id: Option<Uuid> = request.command_id.map(|id| id.0);
    for (offset, event) in (0i64..).zip(&request.events) {
        let encoded = Encoded::of(event).map_err(|error| sqlx::Error::Encode(Box::new(error)))?;
        let row = EventRow {
            position: first_position + offset,
            stream_id: request.stream_id.as_str(),
            version: current + 1 + offset,
            command_id,
            recorded_at,
        };
        let query = sqlx::query(
            "INSERT INTO cqrs_events (position, event_id, stream_id, version, event_type, schema_version, payload, \
             command_id, causation_id, correlation_id, headers, recorded_at, tags) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
        );
        row.bind(query, event, encoded).execute(&mut *connection).await?;
    }
    if request.events.iter().any(|event| !event.tags.is_empty()) {
        let last_position = first_position + i64::try_from(request.events.len()).unwrap_or(i64::MAX) - 1;
        sqlx::query(INDEX_TAGS_SQL).bind(first_position).bind(last_position).execute(&mut *connection).await?;
    }
    Ok(())
}

/// After a checked append's events: its stream's new version and its command id's row.
async fn record_stream_and_command(
    connection: &mut SqliteConnection,
    request: &AppendRequest,
    range: &StoredRange,
) -> Result<(), sqlx::Error> {
    let stream_id = request.stream_id.as_str();
    let last_version = range.current + (range.last_position - range.first_position + 1);
    sqlx::query(
        "INSERT INTO cqrs_streams (stream_id, version) VALUES (?1, ?2) \
         ON CONFLICT (stream_id) DO UPDATE SET version = excluded.version",
    )
    .bind(stream_id)
    .bind(last_version)
    .execute(&mut *connection)
    .await?;
    if let Some(command_id) = request.command_id {
        sqlx::query(
            "INSERT INTO cqrs_commands (stream_id, command_id, first_version, last_version, first_position, \
             last_position, recorded_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )
        .bind(stream_id)
        .bind(command_id.0)
        .bind(range.current + 1)
        .bind(last_version)
        .bind(range.first_position)
        .bind(range.last_position)
        .bind(range.recorded_at)
        .execute(&mut *connection)
        .await?;
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
fn answer_at_once(
    chain: Vec<AppendRequest>,
    results: Vec<LinkOutcome>,
    pending: &mut Vec<Pending>,
    newest: &mut Position,
) {
    for (link, result) in chain.into_iter().zip(results) {
        if let Ok(result) = &result {
            *newest = (*newest).max(result.last_position);
        }
        pending.push(Pending::Append(link.reply, result.map(AppendOutcome::Appended)));
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

/// What a batch's set-based append ([`Writer::append_at_once`]) reads: its streams, command ids
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

/// What the set-based append's read found ([`Writer::lookup_at_once`]).
struct Looked<'a> {
    /// Every stream's version (0 for a new one).
    versions: HashMap<&'a str, i64>,
    /// The position of the batch's first event.
    first_position: i64,
    /// Per link, the position its condition fails at, if it does.
    failed: Vec<Option<i64>>,
}

/// A row of the set-based append's read: a stream and its version, a stream and a stored
/// command id, a link and its condition's first match, or the next position (version only).
type LookupRow = (Option<String>, Option<i64>, Option<Uuid>, Option<i64>);

/// Decodes a row of the set-based append's read.
fn lookup_row(row: &sqlx::sqlite::SqliteRow) -> Result<LookupRow, sqlx::Error> {
    use sqlx::Row;
    Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?, row.try_get(3)?))
}

/// The statement of [`Writer::lookup_at_once`] (see there), beginning the transaction if
/// `begin`, and whether to keep it prepared. Conditions come one-tag first, then the others,
/// each in link order, as [`bind_lookup`] binds them.
fn lookup_at_once_sql(plan: &AtOnce<'_>, begin: bool) -> (String, bool) {
    let (streams, command_ids) = (&plan.streams, &plan.command_ids);
    let mut lookup = if begin {
        "BEGIN IMMEDIATE; SELECT NULL, coalesce(max(position), 0) + 1, NULL, NULL FROM cqrs_events UNION ALL "
            .to_owned()
    } else {
        String::new()
    };
    lookup.push_str(&format!(
        "SELECT stream_id, version, NULL, NULL FROM cqrs_streams WHERE stream_id IN ({})",
        placeholders(streams.len())
    ));
    if !command_ids.is_empty() {
        lookup.push_str(&format!(
            " UNION ALL SELECT stream_id, NULL, command_id, NULL FROM cqrs_commands \
             WHERE stream_id IN ({}) AND command_id IN ({})",
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

/// Binds the parameters of [`lookup_at_once_sql`]'s statement in order.
fn bind_lookup<'q>(mut query: SqliteQuery<'q>, plan: &AtOnce<'q>) -> SqliteQuery<'q> {
    let (streams, command_ids) = (&plan.streams, &plan.command_ids);
    for stream in streams {
        query = query.bind(*stream);
    }
    if !command_ids.is_empty() {
        for stream in streams {
            query = query.bind(*stream);
        }
        for command_id in command_ids {
            query = query.bind(*command_id);
        }
    }
    let link = |condition: &Condition<'_>| i64::try_from(condition.link).unwrap_or(i64::MAX);
    for condition in plan.conditions.iter().filter(|condition| condition.tag.is_some()) {
        let after = to_i64_saturating(condition.condition.after_position().0);
        query = query.bind(link(condition)).bind(condition.tag).bind(after);
    }
    for condition in plan.conditions.iter().filter(|condition| condition.tag.is_none()) {
        let (query_of, after) = (&condition.condition.fail_if_events_match, condition.condition.after_position());
        query = query::bind_first_match(query, query_of, after).bind(link(condition));
    }
    query
}

/// What the set-based append writes: the links whose condition did not fail.
struct Written {
    /// Their events.
    events: usize,
    /// Their command ids.
    commands: usize,
    /// Whether one of their events carries tags (to index).
    tagged: bool,
}

/// A stream and its version.
type StreamVersion<'a> = (&'a str, i64);

/// Checks every link's expectation against the version everything before it leaves (from the
/// `stored` versions; a link whose condition `failed` is checked but leaves the version as it
/// was) and encodes the headers and tags of the events to write. Returns them, in order, the
/// streams whose version changes, with their new version, and what is written; `None`
/// (declined) if a link would not simply be appended or refused by its condition.
fn check_at_once<'a>(
    chains: &[&'a [AppendRequest]],
    plan: &AtOnce<'a>,
    stored: &HashMap<&'a str, i64>,
    failed: &[Option<i64>],
) -> Option<(Vec<Encoded>, Vec<StreamVersion<'a>>, Written)> {
    let links = || chains.iter().flat_map(|chain: &&'a [AppendRequest]| chain.iter());
    let mut versions = stored.clone();
    let mut written = Written { events: 0, commands: 0, tagged: false };
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
        written.commands += usize::from(link.command_id.is_some());
        written.tagged |= link.events.iter().any(|event| !event.tags.is_empty());
        for event in &link.events {
            encoded.push(Encoded::of(event).ok()?);
        }
    }
    let changed: Vec<(&str, i64)> = plan
        .streams
        .iter()
        .map(|stream| (*stream, versions[stream]))
        .filter(|(stream, v)| stored[stream] != *v)
        .collect();
    Some((encoded, changed, written))
}

/// The set-based append's statements in one call (one hand-off to the SQLite thread), their
/// anonymous parameters bound in order, inside a savepoint: if SQLite refuses one, the
/// savepoint undoes whatever the ones before it wrote. The events, the streams' versions, the
/// command ids if any, the tags' index if `tagged`. With `commit`, it also commits.
fn insert_at_once_sql(written: &Written, changed: usize, commit: bool) -> String {
    let (events, commands) = (written.events, written.commands);
    let mut insert = format!(
        "SAVEPOINT at_once; INSERT INTO cqrs_events (position, event_id, stream_id, version, event_type, schema_version, payload, \
         command_id, causation_id, correlation_id, headers, recorded_at, tags) VALUES {}; \
         INSERT INTO cqrs_streams (stream_id, version) VALUES {} \
         ON CONFLICT (stream_id) DO UPDATE SET version = excluded.version",
        rows(events, 13),
        rows(changed, 2)
    );
    if commands > 0 {
        insert.push_str(&format!(
            "; INSERT INTO cqrs_commands (stream_id, command_id, first_version, last_version, first_position, \
             last_position, recorded_at) VALUES {}",
            rows(commands, 7)
        ));
    }
    if written.tagged {
        insert.push_str("; ");
        insert.push_str(INDEX_TAGS_SQL);
    }
    insert.push_str(if commit { "; RELEASE at_once; COMMIT" } else { "; RELEASE at_once" });
    insert
}

/// A command id row of the set-based append: stream, id, first and last version, first and
/// last position.
type CommandRow<'a> = (&'a str, Uuid, i64, i64, i64, i64);

/// What the set-based append binds besides the links themselves.
struct AtOnceRows<'a, 'c> {
    /// The position of the batch's first event.
    first_position: i64,
    /// Every stream's version before the batch.
    versions: HashMap<&'a str, i64>,
    /// The events' encoded headers and tags, in order.
    encoded: Vec<Encoded>,
    /// The streams whose version changes, with their new version.
    changed: &'c [StreamVersion<'a>],
    recorded_at: i64,
    /// Per link, the position its condition failed at (then not written).
    failed: Vec<Option<i64>>,
}

impl<'a> AtOnceRows<'a, '_> {
    /// Binds the parameters of [`insert_at_once_sql`]'s statements in order: every event row,
    /// every changed stream, every command id, the positions whose tags to index (a link whose
    /// condition failed skipped). Returns the query, each chain's answers and the next
    /// position; `None` for a link of an unknown stream or an event not encoded (not expected:
    /// declined).
    fn bind<'q>(
        self,
        mut query: SqliteQuery<'q>,
        chains: &[&'a [AppendRequest]],
        written: &Written,
    ) -> Option<(SqliteQuery<'q>, Vec<Vec<LinkOutcome>>, i64)>
    where
        'a: 'q,
    {
        let Self { first_position, mut versions, encoded, changed, recorded_at, failed } = self;
        let mut position = first_position;
        let mut encoded = encoded.into_iter();
        let mut failed = failed.into_iter();
        let mut results = Vec::with_capacity(chains.len());
        let mut stored_commands: Vec<CommandRow<'a>> = Vec::with_capacity(written.commands);
        for chain in chains {
            let mut chain_results = Vec::with_capacity(chain.len());
            for link in *chain {
                if let Some(at) = failed.next().flatten() {
                    chain_results.push(refused(Some(at)));
                    continue;
                }
                let stream_id = link.stream_id.as_str();
                let version = versions.get_mut(stream_id)?;
                let command_id: Option<Uuid> = link.command_id.map(|id| id.0);
                let (first_position, first_version) = (position, *version + 1);
                for event in &link.events {
                    *version += 1;
                    let row = EventRow { position, stream_id, version: *version, command_id, recorded_at };
                    query = row.bind(query, event, encoded.next()?);
                    position += 1;
                }
                let (last_version, last_position) = (*version, position - 1);
                if let Some(command_id) = command_id {
                    stored_commands.push((
                        stream_id,
                        command_id,
                        first_version,
                        last_version,
                        first_position,
                        last_position,
                    ));
                }
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
        for (stream_id, version) in changed {
            query = query.bind(*stream_id).bind(*version);
        }
        for (stream_id, command_id, first_version, last_version, first_position, last_position) in stored_commands {
            query = query
                .bind(stream_id)
                .bind(command_id)
                .bind(first_version)
                .bind(last_version)
                .bind(first_position)
                .bind(last_position)
                .bind(recorded_at);
        }
        if written.tagged {
            query = query.bind(first_position).bind(position - 1);
        }
        Some((query, results, position))
    }
}

/// Where one event goes: what a row of `cqrs_events` takes besides the event itself.
struct EventRow<'a> {
    position: i64,
    stream_id: &'a str,
    version: i64,
    command_id: Option<Uuid>,
    recorded_at: i64,
}

impl<'a> EventRow<'a> {
    /// Binds the row's thirteen columns, in table order, after the parameters `query` has.
    fn bind<'q>(&self, query: SqliteQuery<'q>, event: &'q NewEvent, encoded: Encoded) -> SqliteQuery<'q>
    where
        'a: 'q,
    {
        query
            .bind(self.position)
            .bind(event.event_id.0)
            .bind(self.stream_id)
            .bind(self.version)
            .bind(event.event_type.as_str())
            .bind(i64::from(event.schema_version))
            .bind(event.payload.to_string())
            .bind(self.command_id)
            .bind(event.metadata.causation_id.map(|id| id.0))
            .bind(event.metadata.correlation_id.map(|id| id.0))
            .bind(encoded.headers)
            .bind(self.recorded_at)
            .bind(encoded.tags)
    }
}

pub(crate) async fn save_checkpoint(
    connection: &mut SqliteConnection,
    name: &str,
    position: i64,
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO cqrs_checkpoints (name, position, updated_at) VALUES (?1, ?2, ?3) \
         ON CONFLICT (name) DO UPDATE SET position = excluded.position, updated_at = excluded.updated_at",
    )
    .bind(name)
    .bind(position)
    .bind(now)
    .execute(connection)
    .await?;
    Ok(())
}

async fn save_snapshot(
    connection: &mut SqliteConnection,
    snapshot: &Snapshot,
    state: &str,
    now: i64,
) -> Result<(), sqlx::Error> {
    // An older snapshot never replaces a newer one.
    sqlx::query(
        "INSERT INTO cqrs_snapshots (stream_id, version, schema_version, state, saved_at) \
         VALUES (?1, ?2, ?3, ?4, ?5) \
         ON CONFLICT (stream_id) DO UPDATE SET version = excluded.version, \
         schema_version = excluded.schema_version, state = excluded.state, saved_at = excluded.saved_at \
         WHERE cqrs_snapshots.version <= excluded.version",
    )
    .bind(snapshot.stream_id.as_str())
    .bind(to_i64_saturating(snapshot.version.0))
    .bind(i64::from(snapshot.schema_version))
    .bind(state)
    .bind(now)
    .execute(connection)
    .await?;
    Ok(())
}

/// Forgets up to [`PRUNE_CHUNK`] command ids stored before `older_than`.
async fn prune_commands(connection: &mut SqliteConnection, older_than: i64) -> Result<u64, sqlx::Error> {
    let result = sqlx::query(
        "DELETE FROM cqrs_commands WHERE (stream_id, command_id) IN \
         (SELECT stream_id, command_id FROM cqrs_commands WHERE recorded_at < ?1 LIMIT ?2)",
    )
    .bind(older_than)
    .bind(i64::try_from(PRUNE_CHUNK).unwrap_or(i64::MAX))
    .execute(connection)
    .await?;
    Ok(result.rows_affected())
}

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
/// [`Writer::append_at_once`] does) is its condition checked after them; one that matches
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

/// What is left to answer of a write that failed its transaction.
enum Unrun {
    /// The request itself, not run.
    Request(WriteRequest),
    /// An op's answer, to send the batch's failure to.
    Answer(Answer),
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
