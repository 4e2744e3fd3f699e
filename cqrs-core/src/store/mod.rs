//! For store authors, everything a backend implements and uses: the [`EventStore`] (the event
//! log) and [`Coordination`] traits, joined by [`Store`]; their request, result and error types;
//! the append checks ([`validate_append`]), chain helpers ([`append_links_one_by_one`],
//! [`chain_broken`]), row decoding ([`RowNames`]) and the group-commit queue ([`batching`]).
//!
//! A store that keeps payloads as JSON text hands each back as read, with
//! [`Payload::from_json_text`](crate::Payload::from_json_text): it is parsed once, into the
//! handler's type, when decoded. Parsing it into a `Value` on the way would parse it twice.
//!
//! Application code needs only the traits and types, which the crate root re-exports.

use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;

use crate::event::{NewEvent, RecordedEvent};
use crate::ids::{CommandId, Position, StreamId, Timestamp, Version};

pub mod batching;
mod coordination;
mod rows;

pub use crate::forward_coordination;
pub use coordination::{Coordination, Store};
pub use rows::RowNames;

pub use crate::query::{AppendCondition, Query, QueryItem, Tag};

/// How long stores remember a command id by default (see [`EventStore::prune_commands`]).
pub const DEFAULT_COMMAND_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// The most events one append may carry.
pub const MAX_EVENTS_PER_APPEND: usize = 10_000;

/// The most tags one event may carry.
pub const MAX_TAGS_PER_EVENT: usize = 64;

/// The most items a [`Query`] of an [`AppendCondition`] or a query read may have.
pub const MAX_QUERY_ITEMS: usize = 64;

/// What the writer believes the stream's version to be; the append fails with
/// [`StoreError::Conflict`] if it is wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExpectedVersion {
    /// Append whatever the stream's version.
    Any,
    /// The stream must have no events.
    NoStream,
    /// The stream must have at least one event.
    StreamExists,
    /// The stream's last event must have exactly this version (`Version(0)` = no stream).
    Exact(Version),
}

impl ExpectedVersion {
    /// Whether a stream currently at `actual` satisfies this expectation.
    pub fn accepts(self, actual: Version) -> bool {
        match self {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => actual == Version::NONE,
            ExpectedVersion::StreamExists => actual > Version::NONE,
            ExpectedVersion::Exact(expected) => actual == expected,
        }
    }
}

/// Where an append landed. For an empty append, `first_*` are one past `last_*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AppendResult {
    /// Version of the first appended event.
    pub first_version: Version,
    /// Version of the last appended event: the stream's version after the append.
    pub last_version: Version,
    /// Global position of the first appended event.
    pub first_position: Position,
    /// Global position of the last appended event.
    pub last_position: Position,
}

/// The answer to an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AppendOutcome {
    /// The events were stored.
    Appended(AppendResult),
    /// The command id of the events was already stored for this stream; nothing was written and
    /// the original result is returned.
    Duplicate(AppendResult),
}

impl AppendOutcome {
    /// The result, whether fresh or from the first time.
    pub fn result(&self) -> AppendResult {
        match *self {
            AppendOutcome::Appended(result) | AppendOutcome::Duplicate(result) => result,
        }
    }
}

/// Checks the parts of an append request that every store must refuse before touching
/// anything: no events, more than [`MAX_EVENTS_PER_APPEND`], events with different command ids,
/// or one event id twice. Returns the request's command id. Stores call it first in `append`.
pub fn validate_append(events: &[NewEvent]) -> Result<Option<CommandId>, StoreError> {
    let Some(first) = events.first() else {
        return Err(StoreError::InvalidAppend("an append needs at least one event".into()));
    };
    if events.len() > MAX_EVENTS_PER_APPEND {
        return Err(StoreError::InvalidAppend(format!(
            "{} events in one append, more than the limit of {MAX_EVENTS_PER_APPEND}",
            events.len()
        )));
    }
    if let Some(event) = events.iter().find(|event| event.tags.len() > MAX_TAGS_PER_EVENT) {
        return Err(StoreError::InvalidAppend(format!(
            "event {} carries {} tags, more than the limit of {MAX_TAGS_PER_EVENT}",
            event.event_id,
            event.tags.len()
        )));
    }
    let command_id = first.metadata.command_id;
    if events.iter().any(|event| event.metadata.command_id != command_id) {
        return Err(StoreError::InvalidAppend("all events of one append must share one command id".into()));
    }
    if events.len() > 1 {
        let mut ids = std::collections::HashSet::with_capacity(events.len());
        if let Some(event) = events.iter().find(|event| !ids.insert(event.event_id)) {
            return Err(StoreError::DuplicateEventId(event.event_id));
        }
    }
    Ok(command_id)
}

/// The most streams one [`EventStore::append_atomic`] may write.
pub const MAX_STREAMS_PER_APPEND: usize = 64;

/// One stream's part of an atomic append ([`EventStore::append_atomic`]): its events and the
/// version the stream must have.
#[derive(Debug, Clone)]
pub struct StreamAppend {
    /// The stream the events go to.
    pub stream_id: StreamId,
    /// What the stream's version must be.
    pub expected: ExpectedVersion,
    /// The events, in order.
    pub events: Vec<NewEvent>,
}

impl StreamAppend {
    /// A part of an atomic append.
    pub fn new(stream_id: StreamId, expected: ExpectedVersion, events: Vec<NewEvent>) -> Self {
        Self { stream_id, expected, events }
    }

    /// Events that belong to no stream, as the Dynamic Consistency Boundary specification
    /// appends them: each one becomes the only event of a stream of its own, named
    /// [`UNSTREAMED_PREFIX`] followed by its event id (expected: no such stream yet). They are
    /// found by their tags and types ([`EventStore::read_query`]) and by position, like any event.
    pub fn unstreamed(events: Vec<NewEvent>) -> Result<Vec<Self>, StoreError> {
        events
            .into_iter()
            .map(|event| {
                let stream_id = StreamId::new(format!("{UNSTREAMED_PREFIX}{}", event.event_id))
                    .map_err(|error| StoreError::InvalidAppend(error.to_string()))?;
                Ok(Self::new(stream_id, ExpectedVersion::NoStream, vec![event]))
            })
            .collect()
    }
}

/// The start of the streams of events appended without one ([`StreamAppend::unstreamed`]):
/// their category is `$event`.
pub const UNSTREAMED_PREFIX: &str = "$event-";

/// [`validate_append`] for a store that keeps versions in a signed 64-bit column (SQL
/// `BIGINT`): an exact expected version must fit in it too.
pub fn validate_append_i64(expected: ExpectedVersion, events: &[NewEvent]) -> Result<Option<CommandId>, StoreError> {
    if let ExpectedVersion::Exact(version) = expected {
        if i64::try_from(version.0).is_err() {
            return Err(StoreError::InvalidAppend(format!("expected version {version} is out of range")));
        }
    }
    validate_append(events)
}

/// Everything an SQL store checks of an atomic append before it writes: [`validate_atomic`],
/// [`validate_append_i64`] for each part, and the condition's query. Returns the command id
/// and the condition, `None` when its query matches nothing (so nothing to check).
pub fn validate_atomic_i64(
    parts: &[StreamAppend],
    condition: Option<AppendCondition>,
) -> Result<(Option<CommandId>, Option<AppendCondition>), StoreError> {
    let command_id = validate_atomic(parts)?;
    for part in parts {
        validate_append_i64(part.expected, &part.events)?;
    }
    if let Some(condition) = &condition {
        validate_query(&condition.fail_if_events_match)?;
    }
    Ok((command_id, condition.filter(|condition| !condition.fail_if_events_match.is_none())))
}

/// Checks an atomic append before a store touches anything: one to
/// [`MAX_STREAMS_PER_APPEND`] parts, each stream once, each part valid for
/// [`validate_append`], one command id (or none) for all of them, no event id twice, at most
/// [`MAX_EVENTS_PER_APPEND`] events in all. Returns the command id.
pub fn validate_atomic(parts: &[StreamAppend]) -> Result<Option<CommandId>, StoreError> {
    let Some(first) = parts.first() else {
        return Err(StoreError::InvalidAppend("an atomic append needs at least one stream".into()));
    };
    if parts.len() > MAX_STREAMS_PER_APPEND {
        return Err(StoreError::InvalidAppend(format!(
            "{} streams in one append, more than the limit of {MAX_STREAMS_PER_APPEND}",
            parts.len()
        )));
    }
    let total: usize = parts.iter().map(|part| part.events.len()).sum();
    if total > MAX_EVENTS_PER_APPEND {
        return Err(StoreError::InvalidAppend(format!(
            "{total} events in one append, more than the limit of {MAX_EVENTS_PER_APPEND}"
        )));
    }
    let command_id = validate_append(&first.events)?;
    let mut streams = std::collections::HashSet::with_capacity(parts.len());
    let mut event_ids = std::collections::HashSet::with_capacity(total);
    for part in parts {
        if validate_append(&part.events)? != command_id {
            return Err(StoreError::InvalidAppend("all events of one append must share one command id".into()));
        }
        if !streams.insert(&part.stream_id) {
            return Err(StoreError::InvalidAppend(format!("stream {} appears twice in one append", part.stream_id)));
        }
        if let Some(event) = part.events.iter().find(|event| !event_ids.insert(event.event_id)) {
            return Err(StoreError::DuplicateEventId(event.event_id));
        }
    }
    Ok(command_id)
}

/// The answer to an atomic append whose command id is stored for some of its streams only:
/// the id was used before for another set of streams.
pub fn partly_duplicate(command_id: CommandId) -> StoreError {
    StoreError::InvalidAppend(format!(
        "command {command_id} was stored before for a different set of streams; a retry must append to the same streams"
    ))
}

/// Checks a query before a store runs it: at most [`MAX_QUERY_ITEMS`] items, each with at most
/// [`MAX_TAGS_PER_EVENT`] tags and 64 types.
pub fn validate_query(query: &Query) -> Result<(), StoreError> {
    if query.items.len() > MAX_QUERY_ITEMS {
        return Err(StoreError::InvalidQuery(format!(
            "{} items, more than the limit of {MAX_QUERY_ITEMS}",
            query.items.len()
        )));
    }
    if query.items.iter().any(|item| item.tags.len() > MAX_TAGS_PER_EVENT || item.types.len() > 64) {
        return Err(StoreError::InvalidQuery(format!("an item with more than {MAX_TAGS_PER_EVENT} tags or 64 types")));
    }
    Ok(())
}

/// Errors of an [`EventStore`] or a [`Coordination`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The stream's version did not match the expectation. Reload the stream and decide again
    /// (the dispatcher does this for you, a bounded number of times).
    #[error("version conflict on {stream_id}: expected {expected:?}, actual {actual}")]
    Conflict {
        /// The stream.
        stream_id: StreamId,
        /// What the writer expected.
        expected: ExpectedVersion,
        /// The stream's actual version.
        actual: Version,
    },
    /// An event id was already stored (in this or another stream). Caller bug: event ids must be
    /// fresh.
    #[error("duplicate event id {0}")]
    DuplicateEventId(crate::ids::EventId),
    /// The append request itself is malformed (too many events, mixed command ids...). Fix the
    /// caller; retrying will not help.
    #[error("invalid append: {0}")]
    InvalidAppend(String),
    /// A conditional append found an event matching its condition's query stored after the
    /// condition's `after`: the decision was made on stale facts. Nothing was written. Read
    /// again and decide again (the dispatcher does this for decisions, a bounded number of
    /// times).
    #[error("append condition failed: an event at {position} matches the query")]
    ConditionFailed {
        /// The position of the first matching event after the condition's `after`.
        position: Position,
    },
    /// A query (of a read or of an append condition) is too large to run.
    #[error("invalid query: {0}")]
    InvalidQuery(String),
    /// The backend is unreachable or failed (connection lost, database restarting...). Retry
    /// later; the store did not acknowledge anything for this call, or the append either fully
    /// happened or not at all.
    #[error("store unavailable: {0}")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The store returned data it cannot read (corrupt row, unknown format). Needs an operator.
    #[error("corrupt store data: {0}")]
    Corrupt(String),
    /// The store was shut down.
    #[error("store closed")]
    Closed,
    /// A write fenced by a claim found the claim gone (expired, released, or taken by another
    /// process); nothing was written. The caller is no longer the active consumer: stop and
    /// stand by.
    #[error("the claim on {name:?} is no longer held by this process")]
    ClaimLost {
        /// The claimed name.
        name: String,
    },
}

impl StoreError {
    /// Whether retrying the same call later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// [`EventStore::append_chain`] link by link: each link with the exact version the previous one
/// left, stopping at the first link not appended. For stores that write a chain in one round
/// trip, the answer for links they cannot attempt.
pub async fn append_links_one_by_one<S: EventStore + ?Sized>(
    store: &S,
    stream_id: &StreamId,
    version: Version,
    links: Vec<Vec<NewEvent>>,
) -> Vec<Result<AppendOutcome, StoreError>> {
    let mut answers = Vec::with_capacity(links.len());
    let mut next = Some(version);
    for events in links {
        let Some(expected) = next else {
            answers.push(Err(chain_broken(stream_id, ExpectedVersion::Exact(version))));
            continue;
        };
        let count = events.len() as u64;
        let answer = store.append(stream_id, ExpectedVersion::Exact(expected), events).await;
        next = match &answer {
            Ok(AppendOutcome::Appended(appended)) => Some(appended.last_version),
            _ => None,
        };
        debug_assert!(next.is_none_or(|v| v.0 == expected.0 + count));
        answers.push(answer);
    }
    answers
}

/// The answer for a chain link after one that was not appended: a conflict with the link's own
/// expectation (the link was not attempted and the stream's version was not read, so `actual`
/// repeats the expected version, or is 0 for an expectation without one).
pub fn chain_broken(stream_id: &StreamId, expected: ExpectedVersion) -> StoreError {
    let actual = match expected {
        ExpectedVersion::Exact(version) => version,
        _ => Version::NONE,
    };
    StoreError::Conflict { stream_id: stream_id.clone(), expected, actual }
}

/// A durable (or in-memory) log of event streams: appends and chains, reads, the head,
/// stream versions, command ids, checkpoints, snapshots and notifications. Each backend
/// implements it, and [`Coordination`] beside it (together a [`Store`]); a
/// [`Dispatcher`](crate::Dispatcher) and a [`Subscription`](crate::Subscription) need only this.
///
/// Contract, checked by [`crate::testing::conformance`] for every backend:
/// - versions within a stream are contiguous from 1; an append is all-or-nothing;
/// - positions strictly increase in the order `read_all` returns events, and `read_all` never
///   returns an event at position `p` and later returns one below `p` (no event is skipped by a
///   reader that resumes from the last position it saw);
/// - an append whose events carry a command id already stored for that stream writes nothing
///   and returns [`AppendOutcome::Duplicate`] with the first result (checked before the version);
/// - [`notifications`](EventStore::notifications) changes after new events become readable;
/// - [`head`](EventStore::head) is the position of the last event `read_all` can return now.
///
/// The trait is object-safe, so an application can pick its store at run time and hold an
/// `Arc<dyn EventStore>` (or an `Arc<dyn Store>`); that is why it is written with [`macro@async_trait`] (boxed
/// futures), while the traits users implement for their own code ([`EventHandler`]) use
/// native `async fn`. Implementations write `#[cqrs_core::async_trait]` on their impl.
///
/// [`EventHandler`]: crate::EventHandler
#[async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// Appends `events` to `stream_id` if its version satisfies `expected`. All events of one
    /// call must carry the same `metadata.command_id` (or none). It is
    /// [`append_with_condition`](EventStore::append_with_condition) without a condition.
    async fn append(
        &self,
        stream_id: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendOutcome, StoreError> {
        self.append_with_condition(stream_id, expected, events, None).await
    }

    /// Appends a chain of appends to one stream, in order: link `i` is written with the exact
    /// version link `i - 1` left (`version` + the events of the links before it), and only if
    /// link `i - 1` was appended; once a link is not appended (a conflict, a duplicate command
    /// id, an error), every later link is answered [`StoreError::Conflict`] without being
    /// written. So a link that is stored always follows every earlier link of its chain, never
    /// events someone else wrote in between: a command decided on the state its chain's earlier
    /// links leave is stored only on that state. One answer per link, in order.
    ///
    /// The dispatcher uses it for commands that queue up on one aggregate instance (a hot
    /// stream): it decides them one after another on the state each leaves and stores them
    /// with one call. The default appends link by link; a store may write the whole chain in
    /// one round trip and one commit (PostgreSQL does).
    async fn append_chain(
        &self,
        stream_id: &StreamId,
        version: Version,
        links: Vec<Vec<NewEvent>>,
    ) -> Vec<Result<AppendOutcome, StoreError>> {
        append_links_one_by_one(self, stream_id, version, links).await
    }

    /// [`append`](EventStore::append) with an [`AppendCondition`]: the append also fails, with
    /// [`StoreError::ConditionFailed`] naming the first matching position, when an event
    /// matching `condition.fail_if_events_match` is stored after `condition.after`. The check
    /// and the write are atomic: of two conditional appends whose events each match the other's
    /// query, at most one commits, whatever the concurrency (processes, group-commit batches);
    /// appends whose queries and events do not overlap both commit. Checks in order: a known
    /// command id answers [`AppendOutcome::Duplicate`], then the version, then the condition.
    /// With `condition` `None` it is `append`.
    async fn append_with_condition(
        &self,
        stream_id: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        condition: Option<AppendCondition>,
    ) -> Result<AppendOutcome, StoreError>;

    /// Appends to several streams in one transaction, all or nothing: every part's stream must
    /// satisfy its expected version, and with a `condition`, no event matching its query may
    /// be stored after its `after` (the events of this append do not count). One answer per
    /// part, in order: all [`AppendOutcome::Appended`], or all [`AppendOutcome::Duplicate`]
    /// when the append's command id was stored before (with the first results). Otherwise
    /// nothing is written and the error names the first refusal: [`StoreError::Conflict`] (its
    /// stream), [`StoreError::ConditionFailed`], [`StoreError::DuplicateEventId`], or
    /// [`StoreError::InvalidAppend`] ([`validate_atomic`], or a command id stored for only some
    /// of the streams: [`partly_duplicate`]).
    ///
    /// The parts' events get consecutive positions in the order the store writes the parts:
    /// the order given on SQLite and in memory, by stream id on PostgreSQL (its writers lock
    /// streams in that order). Events that belong to no stream go through
    /// [`StreamAppend::unstreamed`].
    async fn append_atomic(
        &self,
        appends: Vec<StreamAppend>,
        condition: Option<AppendCondition>,
    ) -> Result<Vec<AppendOutcome>, StoreError>;

    /// Reads up to `max_count` events matching `query` with a position strictly greater than
    /// `after`, in position order. Like [`read_all`](EventStore::read_all), it never returns an
    /// event at `p` and later one below `p`.
    async fn read_query(
        &self,
        query: &Query,
        after: Position,
        max_count: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError>;

    /// Reads up to `max_count` events of one stream, starting at version `from` (inclusive), in
    /// version order. An unknown stream is empty.
    async fn read_stream(
        &self,
        stream_id: &StreamId,
        from: Version,
        max_count: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError>;

    /// Reads up to `max_count` events of all streams with a position strictly greater than
    /// `after`, in position order. A page may hold fewer than `max_count` events while more are
    /// stored (`cqrs-postgres` answers reads right behind its own commits from memory, up to
    /// the last of them): read on until a page comes back empty to reach the end of the log.
    async fn read_all(&self, after: Position, max_count: usize) -> Result<Vec<RecordedEvent>, StoreError>;

    /// Where the log ends now: the position of the last event that [`read_all`] can return,
    /// `Position::START` when there is none. Every event at or below it is readable, and no
    /// event can later appear below it, so a reader that starts after the head misses nothing
    /// stored after this call, and one that has delivered the head has seen everything stored
    /// before it.
    ///
    /// [`read_all`]: EventStore::read_all
    async fn head(&self) -> Result<Position, StoreError>;

    /// The current version of a stream (`Version::NONE` if it has no events).
    async fn stream_version(&self, stream_id: &StreamId) -> Result<Version, StoreError>;

    /// The result of the append that stored `command_id` on `stream_id`, if any.
    async fn find_command(
        &self,
        stream_id: &StreamId,
        command_id: CommandId,
    ) -> Result<Option<AppendResult>, StoreError>;

    /// Loads the checkpoint saved under `name` (a handler's last processed position).
    async fn load_checkpoint(&self, name: &str) -> Result<Option<Position>, StoreError>;

    /// Saves the checkpoint `name`. Stores never move a checkpoint backwards by themselves; the
    /// caller decides (a handler reset may save a lower position).
    async fn save_checkpoint(&self, name: &str, position: Position) -> Result<(), StoreError>;

    /// Forgets the command ids stored before `older_than`, so the idempotency records do not
    /// grow for ever; returns how many were forgotten. After that, a command with such an id
    /// is decided again like a new one. Stores call it themselves on a schedule, keeping ids
    /// for their configured command retention (7 days by default: the idempotency promise
    /// holds for that long); call it to prune at once. Stores that keep every id answer 0.
    async fn prune_commands(&self, older_than: Timestamp) -> Result<u64, StoreError> {
        let _ = older_than;
        Ok(0)
    }

    /// A signal that changes (to the newest known position, or any larger token) whenever new
    /// events may have become readable. Subscribers use it only as a wake-up and always read
    /// the store, so a missed or coalesced change can delay but never lose an event.
    fn notifications(&self) -> watch::Receiver<Position>;

    /// How often a waiting subscriber re-reads the store even without a notification; `None`
    /// when notifications are reliable (in-process stores). Cross-process stores return a
    /// safety-net interval.
    fn poll_interval(&self) -> Option<Duration> {
        None
    }

    /// Whether this store keeps snapshots. Stores that do not keep the default methods below,
    /// which store nothing and find nothing.
    fn supports_snapshots(&self) -> bool {
        false
    }

    /// The latest snapshot of a stream, if any.
    async fn load_snapshot(&self, stream_id: &StreamId) -> Result<Option<Snapshot>, StoreError> {
        let _ = stream_id;
        Ok(None)
    }

    /// Saves a snapshot, replacing an older one of the same stream (a snapshot at a lower
    /// version than the stored one is ignored).
    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), StoreError> {
        let _ = snapshot;
        Ok(())
    }
}

/// An aggregate's state at a stream version, so loading it reads only the later events.
///
/// Snapshots are a cache: deleting them changes nothing but load time. `schema_version` is the
/// aggregate state's own format version; a snapshot whose version differs from the code's is
/// ignored and the stream is replayed.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// The stream.
    pub stream_id: StreamId,
    /// The version of the last event folded into `state`.
    pub version: Version,
    /// Format version of `state`.
    pub schema_version: u32,
    /// The serialized state.
    pub state: serde_json::Value,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_version_rules() {
        assert!(ExpectedVersion::Any.accepts(Version(0)));
        assert!(ExpectedVersion::Any.accepts(Version(9)));
        assert!(ExpectedVersion::NoStream.accepts(Version(0)));
        assert!(!ExpectedVersion::NoStream.accepts(Version(1)));
        assert!(!ExpectedVersion::StreamExists.accepts(Version(0)));
        assert!(ExpectedVersion::StreamExists.accepts(Version(2)));
        assert!(ExpectedVersion::Exact(Version(2)).accepts(Version(2)));
        assert!(!ExpectedVersion::Exact(Version(2)).accepts(Version(3)));
    }
}
