//! The [`EventStore`] trait that backends implement, with its request, result and error types.

use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;

use crate::coordination::{
    Claim, ClaimOutcome, ParkedEvent, ParkedStatus, ProcessInstance, ProcessState, Scheduled, SetAsideCommand,
};
use crate::event::{NewEvent, RecordedEvent};
use crate::ids::{CommandId, Position, StreamId, Timestamp, Version};

/// How long stores remember a command id by default (see [`EventStore::prune_commands`]).
pub const DEFAULT_COMMAND_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// The most events one append may carry.
pub const MAX_EVENTS_PER_APPEND: usize = 10_000;

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

/// Errors of an [`EventStore`].
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
    /// The store does not keep what this call needs (claims, parked events, process state or
    /// schedules): a store of your own that has not implemented them, or a decorator without
    /// an [`inner_store`](EventStore::inner_store).
    #[error("this store does not keep {0}")]
    Unsupported(&'static str),
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

/// A durable (or in-memory) log of event streams, the one trait each backend implements.
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
/// `Arc<dyn EventStore>`; that is why it is written with [`macro@async_trait`] (boxed
/// futures), while the traits users implement for their own code ([`EventHandler`]) use
/// native `async fn`. Implementations write `#[cqrs_core::async_trait]` on their impl.
///
/// [`EventHandler`]: crate::EventHandler
#[async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// Appends `events` to `stream_id` if its version satisfies `expected`. All events of one
    /// call must carry the same `metadata.command_id` (or none).
    async fn append(
        &self,
        stream_id: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendOutcome, StoreError>;

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

    /// Reads up to `max_count` events of one stream, starting at version `from` (inclusive), in
    /// version order. An unknown stream is empty.
    async fn read_stream(
        &self,
        stream_id: &StreamId,
        from: Version,
        max_count: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError>;

    /// Reads up to `max_count` events of all streams with a position strictly greater than
    /// `after`, in position order.
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

    /// For decorators (a test's fault injector, an instrumenting wrapper): the store that the
    /// methods below (claims, parked events, process state, schedules) go to when the
    /// decorator does not implement them. Stores implement those methods themselves and keep
    /// the default, `None`; then an unimplemented one answers [`StoreError::Unsupported`].
    fn inner_store(&self) -> Option<&dyn EventStore> {
        None
    }

    /// Takes or renews the claim on `name` for `owner`, lasting `ttl` from now by the store's
    /// own clock (the database's, for a shared store), so that at most one process at a time
    /// is the active consumer of a handler. Held by `owner` and not expired: renewed (same
    /// token). Expired, released or never taken: taken (a new, larger token). Held by another
    /// owner and not expired: [`ClaimOutcome::Taken`].
    async fn claim(&self, name: &str, owner: &str, ttl: Duration) -> Result<ClaimOutcome, StoreError> {
        match self.inner_store() {
            Some(inner) => inner.claim(name, owner, ttl).await,
            None => Err(StoreError::Unsupported("claims")),
        }
    }

    /// Gives a claim up (if `claim`'s owner and token still hold it), so a standby can take
    /// over at once instead of waiting for it to expire.
    async fn release_claim(&self, claim: &Claim) -> Result<(), StoreError> {
        match self.inner_store() {
            Some(inner) => inner.release_claim(claim).await,
            None => Err(StoreError::Unsupported("claims")),
        }
    }

    /// The claims currently held (not expired), by name.
    async fn claims(&self) -> Result<Vec<Claim>, StoreError> {
        match self.inner_store() {
            Some(inner) => inner.claims().await,
            None => Err(StoreError::Unsupported("claims")),
        }
    }

    /// Saves checkpoint `name` if `claim` is still held (same owner and token, not expired),
    /// atomically with that check; otherwise writes nothing and fails with
    /// [`StoreError::ClaimLost`]. A process that lost its claim cannot move the checkpoint.
    async fn save_checkpoint_claimed(&self, name: &str, position: Position, claim: &Claim) -> Result<(), StoreError> {
        match self.inner_store() {
            Some(inner) => inner.save_checkpoint_claimed(name, position, claim).await,
            None => Err(StoreError::Unsupported("claims")),
        }
    }

    /// Stores a parked event (replacing one of the same handler and position). With `fence`,
    /// only while that claim is held, atomically with the check (else
    /// [`StoreError::ClaimLost`], nothing written): a runner's park that lands after its lease
    /// ended must not block a sequence the next holder has already handled.
    async fn park(&self, event: ParkedEvent, fence: Option<&Claim>) -> Result<(), StoreError> {
        match self.inner_store() {
            Some(inner) => inner.park(event, fence).await,
            None => Err(StoreError::Unsupported("parked events")),
        }
    }

    /// The events `handler` has parked, in position order.
    async fn parked(&self, handler: &str) -> Result<Vec<ParkedEvent>, StoreError> {
        match self.inner_store() {
            Some(inner) => inner.parked(handler).await,
            None => Err(StoreError::Unsupported("parked events")),
        }
    }

    /// Sets a parked event's status (an operator asks for a retry, or the handler's retry
    /// failed); false if no such parked event (it never inserts one). `fence` as for
    /// [`park`](EventStore::park); operators pass `None`.
    async fn set_parked_status(
        &self,
        handler: &str,
        position: Position,
        status: ParkedStatus,
        fence: Option<&Claim>,
    ) -> Result<bool, StoreError> {
        match self.inner_store() {
            Some(inner) => inner.set_parked_status(handler, position, status, fence).await,
            None => Err(StoreError::Unsupported("parked events")),
        }
    }

    /// Records that a retry of a parked event failed with `error`: its error is replaced, its
    /// attempts counted one more and its status set back to [`ParkedStatus::Parked`]. Only
    /// updates: false if the event is no longer parked (an operator discarded it meanwhile,
    /// which this must never undo). `fence` as for [`park`](EventStore::park).
    async fn parked_retry_failed(
        &self,
        handler: &str,
        position: Position,
        error: &str,
        fence: Option<&Claim>,
    ) -> Result<bool, StoreError> {
        match self.inner_store() {
            Some(inner) => inner.parked_retry_failed(handler, position, error, fence).await,
            None => Err(StoreError::Unsupported("parked events")),
        }
    }

    /// Removes a parked event (handled after a retry, or discarded by an operator); false if
    /// there was none. `fence` as for [`park`](EventStore::park); operators pass `None`.
    async fn unpark(&self, handler: &str, position: Position, fence: Option<&Claim>) -> Result<bool, StoreError> {
        match self.inner_store() {
            Some(inner) => inner.unpark(handler, position, fence).await,
            None => Err(StoreError::Unsupported("parked events")),
        }
    }

    /// A process manager instance's state.
    async fn load_process(&self, process: &str, key: &str) -> Result<Option<ProcessState>, StoreError> {
        match self.inner_store() {
            Some(inner) => inner.load_process(process, key).await,
            None => Err(StoreError::Unsupported("process state")),
        }
    }

    /// Saves (or, with `None`, deletes) a process manager instance's state (running, or the
    /// tombstone of an ended one: [`ProcessState::ended`]). With `fence`, only
    /// while that claim is held (else [`StoreError::ClaimLost`], nothing written).
    async fn save_process(
        &self,
        process: &str,
        key: &str,
        state: Option<&ProcessState>,
        fence: Option<&Claim>,
    ) -> Result<(), StoreError> {
        match self.inner_store() {
            Some(inner) => inner.save_process(process, key, state, fence).await,
            None => Err(StoreError::Unsupported("process state")),
        }
    }

    /// Up to `max` of `process`'s instances (running, and ended ones not yet pruned) with keys
    /// after `after` (from the first without), in key order: page with the last key.
    async fn process_instances(
        &self,
        process: &str,
        after: Option<&str>,
        max: usize,
    ) -> Result<Vec<ProcessInstance>, StoreError> {
        match self.inner_store() {
            Some(inner) => inner.process_instances(process, after, max).await,
            None => Err(StoreError::Unsupported("process state")),
        }
    }

    /// Removes the tombstones of `process`'s ended instances at or below `position` (its saved
    /// checkpoint: no replay reaches them); returns how many. Running instances are kept.
    async fn prune_processes(&self, process: &str, position: Position) -> Result<u64, StoreError> {
        match self.inner_store() {
            Some(inner) => inner.prune_processes(process, position).await,
            None => Err(StoreError::Unsupported("process state")),
        }
    }

    /// Stores a scheduled command, replacing one with the same owner, key and name.
    async fn schedule(&self, scheduled: Scheduled) -> Result<(), StoreError> {
        match self.inner_store() {
            Some(inner) => inner.schedule(scheduled).await,
            None => Err(StoreError::Unsupported("schedules")),
        }
    }

    /// Removes a scheduled command (fired, or cancelled); false if there was none. With
    /// `only`, only if it is still the one with that command id (not scheduled anew since).
    async fn unschedule(
        &self,
        owner: &str,
        key: &str,
        name: &str,
        only: Option<CommandId>,
    ) -> Result<bool, StoreError> {
        match self.inner_store() {
            Some(inner) => inner.unschedule(owner, key, name, only).await,
            None => Err(StoreError::Unsupported("schedules")),
        }
    }

    /// Up to `max` of `owner`'s scheduled commands due at `now`, earliest first; set-aside ones
    /// are not due.
    async fn due(&self, owner: &str, now: Timestamp, max: usize) -> Result<Vec<Scheduled>, StoreError> {
        match self.inner_store() {
            Some(inner) => inner.due(owner, now, max).await,
            None => Err(StoreError::Unsupported("schedules")),
        }
    }

    /// Records a failed firing of `scheduled` with `error`, if it is still the one with that
    /// command id (not scheduled anew since); false otherwise. With `retry_at`: one more
    /// attempt, due again at `retry_at`. Without: set aside (not due until retried).
    async fn scheduled_failed(
        &self,
        scheduled: &Scheduled,
        error: &str,
        retry_at: Option<Timestamp>,
    ) -> Result<bool, StoreError> {
        match self.inner_store() {
            Some(inner) => inner.scheduled_failed(scheduled, error, retry_at).await,
            None => Err(StoreError::Unsupported("schedules")),
        }
    }

    /// `owner`'s set-aside scheduled commands, by key and name.
    async fn set_aside_scheduled(&self, owner: &str) -> Result<Vec<SetAsideCommand>, StoreError> {
        match self.inner_store() {
            Some(inner) => inner.set_aside_scheduled(owner).await,
            None => Err(StoreError::Unsupported("schedules")),
        }
    }

    /// Makes a set-aside scheduled command due again (at its due time, attempts reset); false
    /// if there is no such set-aside command.
    async fn retry_scheduled(&self, owner: &str, key: &str, name: &str) -> Result<bool, StoreError> {
        match self.inner_store() {
            Some(inner) => inner.retry_scheduled(owner, key, name).await,
            None => Err(StoreError::Unsupported("schedules")),
        }
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
