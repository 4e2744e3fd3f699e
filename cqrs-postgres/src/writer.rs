//! Group commit: the store's writer task (one by default) takes every queued append (up to a
//! bound), writes them in one transaction with one round trip (`cqrs_append_arrays`, or
//! `cqrs_append_batch` for a lone append or a batch with a conditional append), and answers
//! each caller on its own.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use cqrs_core::store::batching::{BatchLimits, BatchQueue, Reservations};
use cqrs_core::{
    AppendCondition, AppendOutcome, CommandId, EventId, ExpectedVersion, Metadata, NewEvent, Payload, Position,
    RecordedEvent, StoreError, StreamId, Tag, Timestamp, Version,
};
use serde::Serialize;
use sqlx::pool::PoolConnection;
use sqlx::postgres::PgRow;
use sqlx::types::Json;
use sqlx::{PgPool, Postgres, Row};
use tokio::sync::watch;
use uuid::Uuid;

use crate::config::NOTIFY_CHANNEL;
use crate::error::{is_data_error, is_event_id_violation, is_retryable, is_statement_error, shared_unavailable};
use crate::listener::Announced;
use crate::notify::NotifyThrottle;
use crate::recent::RecentEvents;
use crate::request::{expected_json, AppendRequest, ItemJson};
use crate::rows::append_result;
use crate::single::{undecided, ConditionalEvent, SingleEvent};

/// How often a batch that deadlocked or hit a serialization failure is retried.
const MAX_BATCH_RETRIES: u32 = 5;

/// The answer to a chain link that was not attempted.
fn skipped(request: &AppendRequest) -> StoreError {
    cqrs_core::store::chain_broken(&request.stream_id, request.expected)
}

/// The writer task's connection, kept across batches (no pool checkout, release and ping per
/// batch) and replaced after any error that may have broken it.
struct WriterConnection {
    pool: PgPool,
    held: Option<PoolConnection<Postgres>>,
    notify: Arc<NotifyThrottle>,
}

/// A statement's result rows, and whether it sent the NOTIFY at its commit.
struct Written {
    rows: Vec<PgRow>,
    notified: bool,
}

impl WriterConnection {
    /// One statement in autocommit mode: one round trip, one transaction, one commit.
    ///
    /// A batch of several appends goes to the set-based `cqrs_append_arrays`, unless one of them
    /// has a condition (only the per-append loop checks conditions, each after the appends
    /// before it in the batch); a lone append of one event (with no condition) to the statement of
    /// [`crate::single`], and to `cqrs_append_batch` if that statement leaves it undecided; a
    /// lone conditional append of one event to `cqrs_append_conditional`; any other lone append
    /// to `cqrs_append_batch`, whose per-append statements cost less than the
    /// set-based function's fixed ones for a single append (BENCHMARKS.md, issue 12). All take
    /// the same locks in the same order and give the same answers. Each row also carries the
    /// transaction's `now()`: the `recorded_at` of every event the batch stores (the outer
    /// SELECT runs in the same autocommit transaction as the function).
    ///
    /// Whether the statement sends the NOTIFY at its commit is the [`NotifyThrottle`]'s call;
    /// it is told how the statement ended, so that one follows every commit.
    async fn append_batch(&mut self, batch: &[AppendRequest]) -> Result<Written, sqlx::Error> {
        let connection = match &mut self.held {
            Some(connection) => connection,
            None => self.held.insert(self.pool.acquire().await?),
        };
        let ticket = self.notify.begin();
        let result = write_statement(connection, batch, ticket.notify).await;
        let newest = match &result {
            Ok(rows) => rows
                .iter()
                .filter_map(|row| row.try_get::<Option<i64>, _>("last_position").ok().flatten())
                .filter_map(|position| u64::try_from(position).ok())
                .max()
                .map_or(Position::START, Position),
            Err(_) => Position::START,
        };
        self.notify.finish(ticket, ticket.notify && result.is_ok(), newest);
        if matches!(&result, Err(error) if !is_statement_error(error)) {
            // Possibly broken: give it back (the pool tests it on release) and take a fresh one
            // next time.
            self.held = None;
        }
        result.map(|rows| Written { rows, notified: ticket.notify })
    }
}

/// Sends `batch` as the one statement that writes it (see [`WriterConnection::append_batch`]),
/// the NOTIFY at its commit if `notify`; a lone append that the single-event statement leaves
/// undecided, or that it was refused with (rolled back as a whole), goes on to
/// `cqrs_append_batch` in a transaction of its own.
async fn write_statement(
    connection: &mut sqlx::PgConnection,
    batch: &[AppendRequest],
    notify: bool,
) -> Result<Vec<PgRow>, sqlx::Error> {
    if batch.len() > 1 {
        if let Some(arrays) = AppendArrays::new(batch) {
            return arrays.query(notify).fetch_all(connection).await;
        }
    } else if let Some(single) = SingleEvent::new(batch) {
        match single.query(notify).fetch_all(&mut *connection).await {
            Ok(rows) if !undecided(&rows) => return Ok(rows),
            Err(error) if !is_statement_error(&error) => return Err(error),
            _ => {}
        }
    } else if let Some(conditional) = ConditionalEvent::new(batch) {
        return conditional.query(notify).fetch_all(connection).await;
    }
    let payload: Vec<AppendJson<'_>> = batch.iter().map(AppendJson::from).collect();
    sqlx::query(
        "SELECT append_index, outcome, actual_version, first_version, last_version, first_position, \
         last_position, duplicate_event_id, (extract(epoch FROM now()) * 1000000)::bigint AS \
         recorded_at_micros FROM cqrs_append_batch($1, $2)",
    )
    .bind(Json(payload))
    .bind(notify)
    .fetch_all(connection)
    .await
}

/// What every writer task shares with the store.
pub(crate) struct WriterShared {
    /// Newest known position: sent after each committed batch, waking local subscribers.
    pub(crate) head: Arc<watch::Sender<Position>>,
    /// Whether the listener's NOTIFY or the writer's answer woke subscribers first.
    pub(crate) announced: Arc<Announced>,
    /// Streams held for a conflict loser's retry.
    pub(crate) reservations: Arc<Reservations>,
    /// Committed events, handed to local readers (filled before the wake-up).
    pub(crate) recent: Arc<RecentEvents>,
    /// Which statements send the NOTIFY for other processes.
    pub(crate) notify: Arc<NotifyThrottle>,
}

/// One writer task: runs until the queue is closed and drained.
pub(crate) async fn run_writer(
    pool: PgPool,
    queue: Arc<tokio::sync::Mutex<BatchQueue<AppendRequest>>>,
    shared: Arc<WriterShared>,
    limits: BatchLimits,
) {
    let mut connection = WriterConnection { pool, held: None, notify: Arc::clone(&shared.notify) };
    loop {
        // The lock is held only while taking a batch, so another writer task can take the
        // next batch while this one commits.
        let Some(batch) = queue.lock().await.next_batch(limits).await else {
            return;
        };
        write_batch(&mut connection, batch, &shared).await;
    }
}

/// Writes one batch and answers every request in it.
async fn write_batch(connection: &mut WriterConnection, mut batch: Vec<AppendRequest>, shared: &WriterShared) {
    // Stable: appends to one stream keep their arrival order. Every store instance locks
    // streams in this order, so concurrent batches cannot deadlock on stream rows.
    batch.sort_by(|a, b| a.stream_id.cmp(&b.stream_id));
    // A chain's links follow its head, in order, as consecutive items of the statement.
    let batch: Vec<AppendRequest> = batch
        .into_iter()
        .flat_map(|mut request| {
            let followers = std::mem::take(&mut request.followers);
            std::iter::once(request).chain(followers)
        })
        .collect();
    cqrs_core::telemetry::record_batch("postgres", batch.len());
    let events: usize = batch.iter().map(|request| request.events.len()).sum();
    let span = tracing::debug_span!("append_batch", store = "postgres", appends = batch.len(), events);
    let written = async {
        match run_with_retries(connection, &batch).await {
            Ok(written) => {
                answer(batch, &written, shared);
            }
            Err(error) => settle(connection, batch, error, Replay::Once, shared).await,
        }
    };
    tracing::Instrument::instrument(written, span).await
}

/// Whether a batch whose outcome is unknown may be written once more.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Replay {
    Once,
    No,
}

/// Answers the requests of a batch that failed with `error`.
///
/// - The server refused the statement: the batch was rolled back as a whole (for example
///   another writer stored one of its event ids meanwhile, or one payload is unacceptable to
///   jsonb). A batch of several appends is written again one by one, so only the guilty one
///   fails; a refused single append is invalid.
/// - The outcome is unknown (the connection broke or the server went away during the batch,
///   as for the first batch on a connection that died while idle, after a server restart):
///   appends that carry a command id are written once more, on a fresh connection. Each then
///   finds its command id (it had committed: `Duplicate` with its first result) or is
///   appended now, so "unknown" becomes a definite answer. Appends without a command id
///   cannot be told apart from a second copy and are answered `Unavailable`.
async fn settle(
    connection: &mut WriterConnection,
    batch: Vec<AppendRequest>,
    error: sqlx::Error,
    replay: Replay,
    shared: &WriterShared,
) {
    if is_statement_error(&error) && batch.len() > 1 {
        tracing::debug!(%error, "batch refused, writing its appends one by one");
        let mut previous_appended = false;
        for request in batch {
            if request.continues && !previous_appended {
                let error = skipped(&request);
                let _ = request.reply.send(Err(error));
                continue;
            }
            previous_appended = write_single(connection, request, replay, shared).await;
        }
        return;
    }
    if is_data_error(&error) {
        return refuse(batch, &error);
    }
    let error = Arc::new(error);
    if replay == Replay::No || is_statement_error(&error) {
        return fail(&connection.pool, batch, &error, &shared.head);
    }
    let (replayable, unknown): (Vec<_>, Vec<_>) = batch.into_iter().partition(|request| request.command_id.is_some());
    if !unknown.is_empty() {
        fail(&connection.pool, unknown, &error, &shared.head);
    }
    if replayable.is_empty() {
        return;
    }
    tracing::debug!(%error, appends = replayable.len(), "batch outcome unknown; writing its appends with command ids again");
    match run_with_retries(connection, &replayable).await {
        Ok(written) => {
            answer(replayable, &written, shared);
        }
        Err(error) => Box::pin(settle(connection, replayable, error, Replay::No, shared)).await,
    }
}

/// Writes one append in a transaction of its own, after its batch was refused; true if it is
/// known to be appended now (false when in doubt: a chain's next link is then not attempted).
async fn write_single(
    connection: &mut WriterConnection,
    mut request: AppendRequest,
    replay: Replay,
    shared: &WriterShared,
) -> bool {
    // Alone in its statement, a link has no link before it to check.
    request.continues = false;
    let single = vec![request];
    let mut result = run_with_retries(connection, &single).await;
    if matches!(&result, Err(error) if is_event_id_violation(error)) {
        // Raced with a writer of the same event id: now the function's own check sees it.
        result = run_with_retries(connection, &single).await;
    }
    match result {
        Ok(written) => answer(single, &written, shared).first().copied().unwrap_or(false),
        Err(error) => {
            Box::pin(settle(connection, single, error, replay, shared)).await;
            false
        }
    }
}

async fn run_with_retries(connection: &mut WriterConnection, batch: &[AppendRequest]) -> Result<Written, sqlx::Error> {
    let mut attempt = 0;
    loop {
        let result = connection.append_batch(batch).await;
        match result {
            Err(error) if is_retryable(&error) && attempt < MAX_BATCH_RETRIES => {
                attempt += 1;
                tracing::debug!(%error, attempt, "batch rolled back, retrying");
                tokio::time::sleep(Duration::from_millis(5 * u64::from(attempt))).await;
            }
            other => return other,
        }
    }
}

/// Answers each request from its result row; returns, per request, whether it was appended.
/// An append that lost a version conflict and carries a command id gets its stream reserved for
/// its retry first (see [`cqrs_core::store::batching`]).
fn answer(batch: Vec<AppendRequest>, written: &Written, shared: &WriterShared) -> Vec<bool> {
    let rows = &written.rows;
    let mut appended = Vec::with_capacity(batch.len());
    let mut by_index: HashMap<usize, &PgRow> = HashMap::with_capacity(rows.len());
    for row in rows {
        if let Ok(index) = row.try_get::<i32, _>("append_index") {
            if let Ok(index) = usize::try_from(index) {
                by_index.insert(index, row);
            }
        }
    }
    let mut newest = Position::START;
    let mut committed = Vec::new();
    for (index, request) in batch.into_iter().enumerate() {
        let row = by_index.get(&index);
        let outcome = match row {
            Some(row) => outcome_of(row, &request),
            None => Err(StoreError::Corrupt(format!("the batch function returned no row for append {index}"))),
        };
        appended.push(matches!(outcome, Ok(AppendOutcome::Appended(_))));
        match (&outcome, request.command_id) {
            (Ok(AppendOutcome::Appended(result)), _) => newest = newest.max(result.last_position),
            (Err(StoreError::Conflict { .. }), Some(command_id)) => {
                shared.reservations.reserve(request.stream_id.clone(), command_id);
            }
            _ => {}
        }
        let AppendRequest { stream_id, command_id, events, reply, .. } = request;
        let stored = match (&outcome, row) {
            (Ok(AppendOutcome::Appended(result)), Some(row)) if shared.recent.keeps_any() => {
                Some((*result, row.try_get::<i64, _>("recorded_at_micros")))
            }
            _ => None,
        };
        // The caller may have gone away; its append happened anyway.
        let _ = reply.send(outcome);
        if let Some((result, Ok(recorded_at))) = stored {
            committed.extend(recorded(stream_id, command_id, events, result, recorded_at));
        }
    }
    shared.recent.committed(committed);
    if newest > Position::START {
        // Local subscribers need not wait for the NOTIFY round trip; and the NOTIFY of this
        // batch, when it comes, need not wake them again (nor this, if the NOTIFY came first:
        // it is sent at the commit, so the listener's wake-up came after it too).
        if shared.announced.writer_committed(newest, written.notified) {
            shared.head.send_modify(|position| *position = (*position).max(newest));
        }
    }
    appended
}

/// The stored form of an appended request's events, for [`RecentEvents`]: the values a read
/// of them returns (positions and versions from the result, `recorded_at` the transaction's
/// `now()`, which is the column's default). Nothing if the positions are not consecutive
/// (another session took numbers in between): they cannot be told apart then.
fn recorded(
    stream_id: StreamId,
    command_id: Option<CommandId>,
    events: Vec<NewEvent>,
    result: cqrs_core::AppendResult,
    recorded_at: i64,
) -> Vec<RecordedEvent> {
    let count = |first: u64, last: u64| last.checked_sub(first).and_then(|span| span.checked_add(1));
    let n = Some(events.len() as u64);
    if count(result.first_position.0, result.last_position.0) != n
        || count(result.first_version.0, result.last_version.0) != n
    {
        return Vec::new();
    }
    events
        .into_iter()
        .zip(0u64..)
        .map(|(event, offset)| {
            let NewEvent { event_id, event_type, schema_version, payload, metadata, tags } = event;
            RecordedEvent {
                event_id,
                stream_id: stream_id.clone(),
                version: Version(result.first_version.0 + offset),
                position: Position(result.first_position.0 + offset),
                recorded_at: Timestamp(recorded_at),
                event_type: Arc::from(event_type),
                schema_version,
                payload: Payload::from_value(payload),
                metadata: Arc::new(Metadata { command_id, ..metadata }),
                tags: Arc::from(tags),
            }
        })
        .collect()
}

fn outcome_of(row: &PgRow, request: &AppendRequest) -> Result<AppendOutcome, StoreError> {
    if matches!(row.try_get::<&str, _>("outcome"), Ok("skipped")) {
        return Err(skipped(request));
    }
    part_outcome(row, &request.stream_id, request.expected)
}

/// One append's answer from its result row (not a skipped chain link).
fn part_outcome(row: &PgRow, stream_id: &StreamId, expected: ExpectedVersion) -> Result<AppendOutcome, StoreError> {
    let corrupt = |error: sqlx::Error| StoreError::Corrupt(format!("cannot decode an append result: {error}"));
    let outcome: String = row.try_get("outcome").map_err(corrupt)?;
    let actual: i64 = row.try_get("actual_version").map_err(corrupt)?;
    let bounds = || -> Result<_, StoreError> {
        append_result(
            row.try_get("first_version").map_err(corrupt)?,
            row.try_get("last_version").map_err(corrupt)?,
            row.try_get("first_position").map_err(corrupt)?,
            row.try_get("last_position").map_err(corrupt)?,
        )
    };
    match outcome.as_str() {
        "appended" => Ok(AppendOutcome::Appended(bounds()?)),
        "duplicate" => Ok(AppendOutcome::Duplicate(bounds()?)),
        "conflict" => Err(StoreError::Conflict {
            stream_id: stream_id.clone(),
            expected,
            actual: Version(crate::rows::to_u64(actual, "version")?),
        }),
        "condition_failed" => {
            let position: i64 = row.try_get("first_position").map_err(corrupt)?;
            Err(StoreError::ConditionFailed { position: Position(crate::rows::to_u64(position, "position")?) })
        }
        "duplicate_event_id" => {
            let id: Uuid = row.try_get("duplicate_event_id").map_err(corrupt)?;
            Err(StoreError::DuplicateEventId(EventId(id)))
        }
        other => Err(StoreError::Corrupt(format!("unknown append outcome {other:?}"))),
    }
}

/// Answers appends whose data the database refused (only ever a batch of one).
fn refuse(batch: Vec<AppendRequest>, error: &sqlx::Error) {
    for request in batch {
        let _ = request.reply.send(Err(StoreError::InvalidAppend(format!("refused by the database: {error}"))));
    }
}

/// Reports a failed batch to every caller, then wakes readers everywhere: a rolled-back
/// batch may have held their read bound back, and sends no NOTIFY of its own.
fn fail(pool: &PgPool, batch: Vec<AppendRequest>, error: &Arc<sqlx::Error>, head: &watch::Sender<Position>) {
    tracing::warn!(%error, appends = batch.len(), "append batch failed");
    for request in batch {
        let _ = request.reply.send(Err(shared_unavailable(error)));
    }
    head.send_modify(|_| {});
    // In the background: while the server is down this would wait for the acquire timeout.
    let pool = pool.clone();
    tokio::spawn(async move {
        let wake = sqlx::query("SELECT pg_notify($1, '0')").bind(NOTIFY_CHANNEL).execute(&pool).await;
        if let Err(error) = wake {
            tracing::debug!(%error, "could not send the wake-up after a failed batch");
        }
    });
}

/// The JSON form of one append, as `cqrs_append_batch` reads it.
#[derive(Serialize)]
struct AppendJson<'a> {
    s: &'a str,
    e: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    v: Option<u64>,
    c: Option<Uuid>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    k: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    q: Option<ConditionJson<'a>>,
    ev: Vec<EventJson<'a>>,
}

/// An append's condition: `a` the position after which no event may match, `i` its query.
#[derive(Serialize)]
struct ConditionJson<'a> {
    a: i64,
    i: Vec<ItemJson<'a>>,
}

/// An event's tags as the batch functions take them: joined by the unit separator, which no
/// tag holds (tags have no control characters).
fn joined_tags(tags: &[Tag]) -> String {
    match tags {
        [] => String::new(),
        [tag] => tag.as_str().to_owned(),
        tags => tags.iter().map(Tag::as_str).collect::<Vec<_>>().join("\u{1f}"),
    }
}

#[derive(Serialize)]
struct EventJson<'a> {
    id: Uuid,
    t: &'a str,
    sv: u32,
    p: &'a serde_json::Value,
    ca: Option<Uuid>,
    co: Option<Uuid>,
    h: &'a HashMap<String, String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    g: String,
}

impl<'a> From<&'a AppendRequest> for AppendJson<'a> {
    fn from(request: &'a AppendRequest) -> Self {
        AppendJson::new(
            &request.stream_id,
            request.expected,
            request.command_id,
            request.continues,
            request.condition.as_ref(),
            &request.events,
        )
    }
}

impl<'a> AppendJson<'a> {
    fn new(
        stream_id: &'a StreamId,
        expected: ExpectedVersion,
        command_id: Option<CommandId>,
        continues: bool,
        condition: Option<&'a AppendCondition>,
        events: &'a [NewEvent],
    ) -> Self {
        let (kind, version) = expected_json(expected);
        AppendJson {
            s: stream_id.as_str(),
            e: kind,
            v: version,
            c: command_id.map(|id| id.0),
            k: continues,
            q: condition.map(|condition| ConditionJson {
                a: crate::rows::to_i64_saturating(condition.after_position().0),
                i: condition.fail_if_events_match.items.iter().map(ItemJson::from).collect(),
            }),
            ev: events
                .iter()
                .map(|event| EventJson {
                    id: event.event_id.0,
                    t: &event.event_type,
                    sv: event.schema_version,
                    p: &event.payload,
                    ca: event.metadata.causation_id.map(|id| id.0),
                    co: event.metadata.correlation_id.map(|id| id.0),
                    h: &event.metadata.headers,
                    g: joined_tags(&event.tags),
                })
                .collect(),
        }
    }
}

/// [`EventStore::append_atomic`](cqrs_core::EventStore::append_atomic): the parts as one call of
/// `cqrs_append_batch` in a transaction of their own, by stream id (the order every writer
/// locks streams in), the condition on the first; committed only if every part was appended.
/// The function takes the boundary locks of every part before any stream row, and checks the
/// condition before writing any part, so the check is the one a single conditional append
/// gets (README, "Dynamic Consistency Boundaries").
pub(crate) async fn append_atomic(
    pool: &PgPool,
    shared: &WriterShared,
    parts: Vec<cqrs_core::StreamAppend>,
    command_id: Option<CommandId>,
    condition: Option<AppendCondition>,
) -> Result<Vec<AppendOutcome>, StoreError> {
    let mut order: Vec<usize> = (0..parts.len()).collect();
    order.sort_by(|&a, &b| parts[a].stream_id.cmp(&parts[b].stream_id));
    let payload: Vec<AppendJson<'_>> = order
        .iter()
        .enumerate()
        .map(|(nth, &index)| {
            let part = &parts[index];
            let condition = if nth == 0 { condition.as_ref() } else { None };
            AppendJson::new(&part.stream_id, part.expected, command_id, false, condition, &part.events)
        })
        .collect();
    let unavailable = |error: sqlx::Error| shared_unavailable(&Arc::new(error));
    let mut transaction = pool.begin().await.map_err(unavailable)?;
    let rows = sqlx::query(
        "SELECT append_index, outcome, actual_version, first_version, last_version, first_position, last_position, \
         duplicate_event_id FROM cqrs_append_batch($1, true)",
    )
    .bind(Json(payload))
    .fetch_all(&mut *transaction)
    .await;
    let rows = match rows {
        Ok(rows) => rows,
        Err(error) if is_data_error(&error) => {
            return Err(StoreError::InvalidAppend(format!("refused by the database: {error}")));
        }
        Err(error) if is_event_id_violation(&error) => {
            drop(transaction);
            return Err(reused_event_id(pool, &parts).await);
        }
        Err(error) => return Err(unavailable(error)),
    };
    let mut outcomes: Vec<Option<Result<AppendOutcome, StoreError>>> = (0..parts.len()).map(|_| None).collect();
    for row in &rows {
        let nth = row.try_get::<i32, _>("append_index").ok().and_then(|index| usize::try_from(index).ok());
        let Some(&index) = nth.and_then(|nth| order.get(nth)) else { continue };
        let part = &parts[index];
        outcomes[index] = Some(part_outcome(row, &part.stream_id, part.expected));
    }
    let mut outcomes: Vec<Result<AppendOutcome, StoreError>> = outcomes
        .into_iter()
        .map(|outcome| outcome.unwrap_or_else(|| Err(StoreError::Corrupt("the batch function skipped a part".into()))))
        .collect();
    let appended = outcomes.iter().all(|outcome| matches!(outcome, Ok(AppendOutcome::Appended(_))));
    let duplicate = outcomes.iter().all(|outcome| matches!(outcome, Ok(AppendOutcome::Duplicate(_))));
    if !appended {
        transaction.rollback().await.map_err(unavailable)?;
        // The rolled-back transaction may have held readers' bound back: wake them.
        shared.head.send_modify(|_| {});
        if duplicate {
            return outcomes.into_iter().collect();
        }
        let partly = outcomes.iter().any(|outcome| matches!(outcome, Ok(AppendOutcome::Duplicate(_))));
        if let (true, Some(command_id)) = (partly, command_id) {
            return Err(cqrs_core::store::partly_duplicate(command_id));
        }
        // The first refusal in the order they were checked.
        let first = order.iter().copied().find(|&index| outcomes[index].is_err());
        return match first.map(|index| outcomes.swap_remove(index)) {
            Some(Err(refusal)) => Err(refusal),
            _ => Err(StoreError::Corrupt("an atomic append was neither appended nor refused".into())),
        };
    }
    transaction.commit().await.map_err(unavailable)?;
    let newest = outcomes
        .iter()
        .filter_map(|outcome| outcome.as_ref().ok().map(|outcome| outcome.result().last_position))
        .max()
        .unwrap_or(Position::START);
    if shared.announced.writer_committed(newest, true) {
        shared.head.send_modify(|position| *position = (*position).max(newest));
    }
    outcomes.into_iter().collect()
}

/// Which event id of an atomic append the unique index refused (another writer stored it
/// first).
async fn reused_event_id(pool: &PgPool, parts: &[cqrs_core::StreamAppend]) -> StoreError {
    let ids: Vec<Uuid> = parts.iter().flat_map(|part| &part.events).map(|event| event.event_id.0).collect();
    let stored = sqlx::query_scalar::<_, Uuid>("SELECT event_id FROM cqrs_events WHERE event_id = ANY($1) LIMIT 1")
        .bind(&ids)
        .fetch_optional(pool)
        .await;
    match stored {
        Ok(Some(id)) => StoreError::DuplicateEventId(EventId(id)),
        Ok(None) => StoreError::InvalidAppend("an event id of the append was refused as stored already".into()),
        Err(error) => shared_unavailable(&Arc::new(error)),
    }
}

/// A batch as the parallel arrays `cqrs_append_arrays` takes: one element per append, then one
/// per event (each event repeats its append's 1-based index, stream and command id).
struct AppendArrays<'a> {
    streams: Vec<&'a str>,
    kinds: Vec<&'static str>,
    expected: Vec<Option<i64>>,
    commands: Vec<Option<Uuid>>,
    continues: Vec<bool>,
    counts: Vec<i32>,
    event_appends: Vec<i32>,
    event_streams: Vec<&'a str>,
    event_commands: Vec<Option<Uuid>>,
    ids: Vec<Uuid>,
    types: Vec<&'a str>,
    schemas: Vec<i32>,
    payloads: Vec<Json<&'a serde_json::Value>>,
    causations: Vec<Option<Uuid>>,
    correlations: Vec<Option<Uuid>>,
    headers: Vec<Json<&'a HashMap<String, String>>>,
    tags: Vec<String>,
}

impl<'a> AppendArrays<'a> {
    /// `None` if a number does not fit the function's integer columns (an expected version or
    /// schema version beyond `i64` or `i32`, more events than `i32` counts): such a batch goes
    /// through `cqrs_append_batch`, which refuses or answers it as before. `None` too for a batch
    /// with a conditional append (only `cqrs_append_batch` checks conditions).
    fn new(batch: &'a [AppendRequest]) -> Option<Self> {
        let n_events = batch.iter().map(|request| request.events.len()).sum();
        let mut arrays = AppendArrays {
            streams: Vec::with_capacity(batch.len()),
            kinds: Vec::with_capacity(batch.len()),
            expected: Vec::with_capacity(batch.len()),
            commands: Vec::with_capacity(batch.len()),
            continues: Vec::with_capacity(batch.len()),
            counts: Vec::with_capacity(batch.len()),
            event_appends: Vec::with_capacity(n_events),
            event_streams: Vec::with_capacity(n_events),
            event_commands: Vec::with_capacity(n_events),
            ids: Vec::with_capacity(n_events),
            types: Vec::with_capacity(n_events),
            schemas: Vec::with_capacity(n_events),
            payloads: Vec::with_capacity(n_events),
            causations: Vec::with_capacity(n_events),
            correlations: Vec::with_capacity(n_events),
            headers: Vec::with_capacity(n_events),
            tags: Vec::with_capacity(n_events),
        };
        for (index, request) in batch.iter().enumerate() {
            if request.condition.is_some() {
                return None;
            }
            let (kind, version) = expected_json(request.expected);
            let append = i32::try_from(index + 1).ok()?;
            let command = request.command_id.map(|id| id.0);
            arrays.streams.push(request.stream_id.as_str());
            arrays.kinds.push(kind);
            arrays.expected.push(match version {
                Some(version) => Some(i64::try_from(version).ok()?),
                None => None,
            });
            arrays.commands.push(command);
            arrays.continues.push(request.continues);
            arrays.counts.push(i32::try_from(request.events.len()).ok()?);
            for event in &request.events {
                arrays.event_appends.push(append);
                arrays.event_streams.push(request.stream_id.as_str());
                arrays.event_commands.push(command);
                arrays.ids.push(event.event_id.0);
                arrays.types.push(&event.event_type);
                arrays.schemas.push(i32::try_from(event.schema_version).ok()?);
                arrays.payloads.push(Json(&event.payload));
                arrays.causations.push(event.metadata.causation_id.map(|id| id.0));
                arrays.correlations.push(event.metadata.correlation_id.map(|id| id.0));
                arrays.headers.push(Json(&event.metadata.headers));
                arrays.tags.push(joined_tags(&event.tags));
            }
        }
        Some(arrays)
    }

    /// The statement, sending the NOTIFY at its commit if `notify`.
    fn query(self, notify: bool) -> sqlx::query::Query<'a, Postgres, sqlx::postgres::PgArguments> {
        sqlx::query(
            "SELECT append_index, outcome, actual_version, first_version, last_version, first_position, \
             last_position, duplicate_event_id, (extract(epoch FROM now()) * 1000000)::bigint AS recorded_at_micros \
             FROM cqrs_append_arrays($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)",
        )
        .bind(self.streams)
        .bind(self.kinds)
        .bind(self.expected)
        .bind(self.commands)
        .bind(self.continues)
        .bind(self.counts)
        .bind(self.event_appends)
        .bind(self.event_streams)
        .bind(self.event_commands)
        .bind(self.ids)
        .bind(self.types)
        .bind(self.schemas)
        .bind(self.payloads)
        .bind(self.causations)
        .bind(self.correlations)
        .bind(self.headers)
        .bind(self.tags)
        .bind(notify)
    }
}
