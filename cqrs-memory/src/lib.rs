#![doc = include_str!("../README.md")]

mod coordination;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use cqrs_core::store::{validate_append, validate_atomic, validate_query};
use cqrs_core::{
    AppendCondition, AppendOutcome, AppendResult, Claim, CommandId, EventId, EventStore, ExpectedVersion, NewEvent,
    ParkedEvent, Payload, Position, ProcessState, Query, QueryItem, RecordedEvent, Scheduled, Snapshot, StoreError,
    StreamAppend, StreamId, Tag, Timestamp, Version, DEFAULT_COMMAND_RETENTION,
};
use tokio::sync::watch;

/// An in-memory event store. Cheap to clone: clones share the same log.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// All state behind one lock, held only for the few microseconds of an append or read,
    /// never across an await.
    state: RwLock<State>,
    /// The position of the newest event; subscribers wake up when it changes.
    head: watch::Sender<Position>,
    /// How long command ids are remembered; `None` = for ever.
    command_retention: Option<Duration>,
}

#[derive(Default)]
struct State {
    /// The global log; the event at index `i` has position `i + 1`.
    log: Log,
    /// For each stream, the log index of each of its events (version `v` at `[v - 1]`).
    streams: HashMap<StreamId, Vec<usize>>,
    /// The result of every remembered command id, per stream.
    commands: HashMap<(StreamId, CommandId), AppendResult>,
    /// The remembered command ids in the order they were stored, with when: pruning pops
    /// from the front.
    command_times: VecDeque<(Timestamp, StreamId, CommandId)>,
    event_ids: HashSet<EventId>,
    /// For each tag, the log indexes of the events carrying it, ascending.
    tag_index: HashMap<Tag, Vec<usize>>,
    /// For each event type, the log indexes of its events, ascending.
    type_index: HashMap<Arc<str>, Vec<usize>>,
    checkpoints: HashMap<String, Position>,
    snapshots: HashMap<StreamId, Snapshot>,
    /// Claims by name; an expired one stays until taken again (its token counts on).
    claims: HashMap<String, Claim>,
    /// Parked events by handler, in position order.
    parked: HashMap<String, BTreeMap<Position, ParkedEvent>>,
    /// Process manager instances by (process, key).
    processes: HashMap<(String, String), ProcessState>,
    /// Scheduled commands by (owner, key, name).
    scheduled: HashMap<(String, String, String), Scheduled>,
    /// The set-aside ones among them, with their errors.
    set_aside: HashMap<(String, String, String), String>,
}

/// Events in fixed-size segments: growing the log never moves (copies) stored events, so an
/// append costs the same at the millionth event as at the first.
#[derive(Default)]
struct Log {
    segments: Vec<Vec<RecordedEvent>>,
    len: usize,
}

/// Events per log segment.
const SEGMENT_LEN: usize = 4096;

impl Log {
    fn len(&self) -> usize {
        self.len
    }

    fn push(&mut self, event: RecordedEvent) {
        match self.segments.last_mut() {
            Some(segment) if segment.len() < SEGMENT_LEN => segment.push(event),
            _ => {
                let mut segment = Vec::with_capacity(SEGMENT_LEN);
                segment.push(event);
                self.segments.push(segment);
            }
        }
        self.len += 1;
    }

    fn get(&self, index: usize) -> &RecordedEvent {
        &self.segments[index / SEGMENT_LEN][index % SEGMENT_LEN]
    }

    /// Clones the events at indexes `start..end` (cheap: payloads are shared).
    fn slice(&self, start: usize, end: usize) -> Vec<RecordedEvent> {
        let mut events = Vec::with_capacity(end.saturating_sub(start));
        let mut index = start;
        while index < end {
            let segment = &self.segments[index / SEGMENT_LEN];
            let offset = index % SEGMENT_LEN;
            let take = (end - index).min(segment.len() - offset);
            events.extend_from_slice(&segment[offset..offset + take]);
            index += take;
        }
        events
    }
}

/// One part of an append with its events already built, outside the lock: only versions,
/// positions and the time are set under it.
struct Prepared {
    stream_id: StreamId,
    expected: ExpectedVersion,
    events: Vec<RecordedEvent>,
}

impl Prepared {
    fn new(part: StreamAppend) -> Self {
        let StreamAppend { stream_id, expected, events } = part;
        let events = events
            .into_iter()
            .map(|event| RecordedEvent {
                event_id: event.event_id,
                stream_id: stream_id.clone(),
                version: Version(0),
                position: Position::START,
                recorded_at: Timestamp(0),
                event_type: Arc::from(event.event_type),
                schema_version: event.schema_version,
                payload: Payload::from_value(event.payload),
                metadata: Arc::new(event.metadata),
                tags: Arc::from(event.tags),
            })
            .collect();
        Self { stream_id, expected, events }
    }
}

impl State {
    /// Writes one checked part at versions after `actual`; returns where it landed and its
    /// stream. Allocates only for a new stream, event type or tag.
    fn write_part(&mut self, part: Prepared, actual: Version, recorded_at: Timestamp) -> (AppendResult, StreamId) {
        let Prepared { stream_id, events, .. } = part;
        let first_index = self.log.len();
        let count = events.len() as u64;
        let State { log, streams, event_ids, tag_index, type_index, .. } = self;
        let appended = first_index..first_index + events.len();
        match streams.get_mut(&stream_id) {
            Some(indexes) => indexes.extend(appended),
            None => {
                streams.insert(stream_id.clone(), appended.collect());
            }
        }
        for (offset, mut event) in events.into_iter().enumerate() {
            let index = first_index + offset;
            event_ids.insert(event.event_id);
            match type_index.get_mut(&*event.event_type) {
                Some(typed) => typed.push(index),
                None => {
                    type_index.insert(Arc::clone(&event.event_type), vec![index]);
                }
            }
            for tag in event.tags.iter() {
                let tagged = tag_index.entry(tag.clone()).or_default();
                // A tag repeated on one event is indexed once.
                if tagged.last() != Some(&index) {
                    tagged.push(index);
                }
            }
            event.version = Version(actual.0 + offset as u64 + 1);
            event.position = Position(index as u64 + 1);
            event.recorded_at = recorded_at;
            log.push(event);
        }
        let result = AppendResult {
            first_version: Version(actual.0 + 1),
            last_version: Version(actual.0 + count),
            first_position: Position(first_index as u64 + 1),
            last_position: Position(first_index as u64 + count),
        };
        (result, stream_id)
    }

    fn remember_command(&mut self, stream_id: StreamId, command_id: CommandId, result: AppendResult, at: Timestamp) {
        self.commands.insert((stream_id.clone(), command_id), result);
        self.command_times.push_back((at, stream_id, command_id));
    }

    /// The log indexes above `start` of the events one query item matches, ascending, at most
    /// `limit`: found through the item's rarest tag, else its types, else the whole log.
    fn item_matches(&self, item: &QueryItem, start: usize, limit: usize) -> Vec<usize> {
        let matches = |index: &usize| {
            let event = self.log.get(*index);
            item.matches(&event.event_type, &event.tags)
        };
        let tail = |indexes: &[usize]| -> Vec<usize> {
            let from = indexes.partition_point(|&index| index < start);
            indexes[from..].iter().copied().filter(matches).take(limit).collect()
        };
        if !item.tags.is_empty() {
            let rarest = item.tags.iter().map(|tag| self.tag_index.get(tag).map_or(&[][..], Vec::as_slice));
            return rarest.min_by_key(|indexes| indexes.len()).map(tail).unwrap_or_default();
        }
        if !item.types.is_empty() {
            let mut found: Vec<usize> = item
                .types
                .iter()
                .filter_map(|event_type| self.type_index.get(event_type.as_str()))
                .flat_map(|indexes| tail(indexes))
                .collect();
            found.sort_unstable();
            found.truncate(limit);
            return found;
        }
        (start..self.log.len()).take(limit).collect()
    }

    /// The log indexes above `start` of the events `query` matches, ascending, at most `limit`.
    fn query_matches(&self, query: &Query, start: usize, limit: usize) -> Vec<usize> {
        let mut found: Vec<usize> = query.items.iter().flat_map(|item| self.item_matches(item, start, limit)).collect();
        found.sort_unstable();
        found.dedup();
        found.truncate(limit);
        found
    }

    /// `Err(ConditionFailed)` with the first matching position when `condition` fails now.
    fn check_condition(&self, condition: Option<&AppendCondition>) -> Result<(), StoreError> {
        let Some(condition) = condition else { return Ok(()) };
        let start = usize::try_from(condition.after_position().0).unwrap_or(usize::MAX);
        match self.query_matches(&condition.fail_if_events_match, start, 1).first() {
            Some(&index) => Err(StoreError::ConditionFailed { position: Position(index as u64 + 1) }),
            None => Ok(()),
        }
    }

    /// Whether `claim` is the current, unexpired claim on its name.
    fn holds(&self, claim: &Claim) -> bool {
        self.claims.get(&claim.name).is_some_and(|current| {
            current.owner == claim.owner && current.token == claim.token && current.expires_at > Timestamp::now()
        })
    }

    /// `Ok` without a fence or while it is held; else [`StoreError::ClaimLost`].
    fn fenced(&self, fence: Option<&Claim>) -> Result<(), StoreError> {
        match fence {
            Some(claim) if !self.holds(claim) => Err(StoreError::ClaimLost { name: claim.name.clone() }),
            _ => Ok(()),
        }
    }

    /// Forgets the command ids stored before `older_than`; returns how many.
    fn prune_commands(&mut self, older_than: Timestamp) -> u64 {
        let mut pruned = 0;
        while let Some((stored_at, _, _)) = self.command_times.front() {
            if *stored_at >= older_than {
                break;
            }
            if let Some((_, stream_id, command_id)) = self.command_times.pop_front() {
                self.commands.remove(&(stream_id, command_id));
                pruned += 1;
            }
        }
        pruned
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore").field("events", &self.len()).finish()
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store that remembers command ids for
    /// [`DEFAULT_COMMAND_RETENTION`] (7 days).
    pub fn new() -> Self {
        Self::with_command_retention(Some(DEFAULT_COMMAND_RETENTION))
    }

    /// An empty store that remembers command ids for `retention` (`None`: for ever). Older
    /// ones are forgotten as new commands are stored.
    pub fn with_command_retention(retention: Option<Duration>) -> Self {
        let (head, _) = watch::channel(Position::START);
        Self { inner: Arc::new(Inner { state: RwLock::new(State::default()), head, command_retention: retention }) }
    }

    /// How many events are stored.
    pub fn len(&self) -> usize {
        self.read().log.len()
    }

    /// Whether no event is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The append itself, under the lock (see [`EventStore::append_with_condition`]).
    fn append_now(
        &self,
        stream_id: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        condition: Option<&AppendCondition>,
    ) -> Result<AppendOutcome, StoreError> {
        let command_id = validate_append(&events)?;
        let part = StreamAppend::new(stream_id.clone(), expected, events);
        let mut outcomes = self.append_parts(vec![part], command_id, condition)?;
        outcomes.pop().ok_or_else(|| StoreError::Corrupt("an append of one stream gave no answer".into()))
    }

    /// Appends validated parts under one write lock, all or nothing: the command id (all
    /// parts stored before: their first results), then each part's version, the condition and
    /// the event ids, then the writes.
    fn append_parts(
        &self,
        parts: Vec<StreamAppend>,
        command_id: Option<CommandId>,
        condition: Option<&AppendCondition>,
    ) -> Result<Vec<AppendOutcome>, StoreError> {
        if let Some(condition) = condition {
            validate_query(&condition.fail_if_events_match)?;
        }
        let parts: Vec<Prepared> = parts.into_iter().map(Prepared::new).collect();
        let (outcomes, head) = {
            let mut state = self.write();
            let outcomes = self.append_locked(&mut state, parts, command_id, condition)?;
            (outcomes, state.log.len() as u64)
        };
        // Published after the lock is released (a wake-up can cost a system call), and only
        // forwards: a later append may have published a higher head already.
        self.inner.head.send_if_modified(|published| {
            let newer = published.0 < head;
            if newer {
                *published = Position(head);
            }
            newer
        });
        Ok(outcomes)
    }

    /// The checks and writes of [`append_parts`](Self::append_parts), under the write lock.
    fn append_locked(
        &self,
        state: &mut State,
        parts: Vec<Prepared>,
        command_id: Option<CommandId>,
        condition: Option<&AppendCondition>,
    ) -> Result<Vec<AppendOutcome>, StoreError> {
        if let Some(command_id) = command_id {
            let stored: Vec<AppendResult> = parts
                .iter()
                .filter_map(|part| state.commands.get(&(part.stream_id.clone(), command_id)).copied())
                .collect();
            if stored.len() == parts.len() {
                return Ok(stored.into_iter().map(AppendOutcome::Duplicate).collect());
            }
            if !stored.is_empty() {
                return Err(cqrs_core::store::partly_duplicate(command_id));
            }
        }
        let mut actuals = Vec::with_capacity(parts.len());
        for part in &parts {
            let actual = Version(state.streams.get(&part.stream_id).map_or(0, |indexes| indexes.len() as u64));
            if !part.expected.accepts(actual) {
                return Err(StoreError::Conflict {
                    stream_id: part.stream_id.clone(),
                    expected: part.expected,
                    actual,
                });
            }
            actuals.push(actual);
        }
        state.check_condition(condition)?;
        let reused = parts.iter().flat_map(|part| &part.events).find(|event| state.event_ids.contains(&event.event_id));
        if let Some(event) = reused {
            return Err(StoreError::DuplicateEventId(event.event_id));
        }
        let recorded_at = Timestamp::now();
        let mut outcomes = Vec::with_capacity(parts.len());
        for (part, actual) in parts.into_iter().zip(actuals) {
            let result = state.write_part(part, actual, recorded_at);
            if let Some(command_id) = command_id {
                state.remember_command(result.1, command_id, result.0, recorded_at);
            }
            outcomes.push(AppendOutcome::Appended(result.0));
        }
        if let (Some(retention), Some(_)) = (self.inner.command_retention, command_id) {
            state.prune_commands(recorded_at.minus(retention));
        }
        Ok(outcomes)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-written: appends validate
        // everything before the first mutation.
        self.inner.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.inner.state.write().unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait]
impl EventStore for MemoryStore {
    async fn append_with_condition(
        &self,
        stream_id: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        condition: Option<AppendCondition>,
    ) -> Result<AppendOutcome, StoreError> {
        let started = std::time::Instant::now();
        let span = cqrs_core::telemetry::append_span("memory", stream_id, events.len());
        let result = span.in_scope(|| self.append_now(stream_id, expected, events, condition.as_ref()));
        cqrs_core::telemetry::record_append("memory", started, &result, &span);
        result
    }

    async fn append_atomic(
        &self,
        appends: Vec<StreamAppend>,
        condition: Option<AppendCondition>,
    ) -> Result<Vec<AppendOutcome>, StoreError> {
        let command_id = validate_atomic(&appends)?;
        self.append_parts(appends, command_id, condition.as_ref())
    }

    async fn read_query(
        &self,
        query: &Query,
        after: Position,
        max_count: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        validate_query(query)?;
        let state = self.read();
        let start = usize::try_from(after.0).unwrap_or(usize::MAX);
        Ok(state.query_matches(query, start, max_count).into_iter().map(|index| state.log.get(index).clone()).collect())
    }

    async fn read_stream(
        &self,
        stream_id: &StreamId,
        from: Version,
        max_count: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let state = self.read();
        let Some(indexes) = state.streams.get(stream_id) else {
            return Ok(Vec::new());
        };
        let skip = usize::try_from(from.0.saturating_sub(1)).unwrap_or(usize::MAX);
        Ok(indexes.iter().skip(skip).take(max_count).map(|&index| state.log.get(index).clone()).collect())
    }

    async fn read_all(&self, after: Position, max_count: usize) -> Result<Vec<RecordedEvent>, StoreError> {
        let state = self.read();
        let start = usize::try_from(after.0).unwrap_or(usize::MAX).min(state.log.len());
        let end = start.saturating_add(max_count).min(state.log.len());
        Ok(state.log.slice(start, end))
    }

    async fn head(&self) -> Result<Position, StoreError> {
        Ok(Position(self.read().log.len() as u64))
    }

    async fn prune_commands(&self, older_than: Timestamp) -> Result<u64, StoreError> {
        Ok(self.write().prune_commands(older_than))
    }

    async fn stream_version(&self, stream_id: &StreamId) -> Result<Version, StoreError> {
        Ok(Version(self.read().streams.get(stream_id).map_or(0, |indexes| indexes.len() as u64)))
    }

    async fn find_command(
        &self,
        stream_id: &StreamId,
        command_id: CommandId,
    ) -> Result<Option<AppendResult>, StoreError> {
        Ok(self.read().commands.get(&(stream_id.clone(), command_id)).copied())
    }

    async fn load_checkpoint(&self, name: &str) -> Result<Option<Position>, StoreError> {
        Ok(self.read().checkpoints.get(name).copied())
    }

    async fn save_checkpoint(&self, name: &str, position: Position) -> Result<(), StoreError> {
        self.write().checkpoints.insert(name.to_owned(), position);
        Ok(())
    }

    fn notifications(&self) -> watch::Receiver<Position> {
        self.inner.head.subscribe()
    }

    fn supports_snapshots(&self) -> bool {
        true
    }

    async fn load_snapshot(&self, stream_id: &StreamId) -> Result<Option<Snapshot>, StoreError> {
        Ok(self.read().snapshots.get(stream_id).cloned())
    }

    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), StoreError> {
        let mut state = self.write();
        let stored = state.snapshots.get(&snapshot.stream_id).map(|stored| stored.version);
        if stored.is_none_or(|stored| stored <= snapshot.version) {
            state.snapshots.insert(snapshot.stream_id.clone(), snapshot);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cqrs_core::testing::conformance::event;

    #[tokio::test]
    async fn reads_cross_log_segments() {
        let store = MemoryStore::new();
        let stream = StreamId::new("big-1").expect("id");
        let total = 8_300; // more than two segments, a multiple of the batch size
        assert!(total > 2 * SEGMENT_LEN);
        for chunk in 0..total / 100 {
            let events = (0..100).map(|n| event((chunk * 100 + n) as u64)).collect();
            store.append(&stream, ExpectedVersion::Any, events).await.expect("append");
        }
        let window = store.read_all(Position(SEGMENT_LEN as u64 - 3), 10).await.expect("read_all");
        let positions: Vec<u64> = window.iter().map(|e| e.position.0).collect();
        assert_eq!(positions, (SEGMENT_LEN as u64 - 2..SEGMENT_LEN as u64 + 8).collect::<Vec<_>>());
        let tail = store.read_stream(&stream, Version(total as u64 - 1), 10).await.expect("read_stream");
        assert_eq!(tail.iter().map(|e| e.version.0).collect::<Vec<_>>(), vec![total as u64 - 1, total as u64]);
        assert_eq!(store.read_all(Position::START, usize::MAX).await.expect("all").len(), total);
    }
}
