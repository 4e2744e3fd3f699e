//! Events this process's writers have just committed, kept for reads near the head: with it, a
//! local subscriber that is up to date gets the next batch's events from memory instead of
//! reading each event back from the database (one read per batch and subscriber saved). For
//! store implementations: the bundled SQL stores keep one each.
//!
//! Only a *run* is kept: consecutive positions `start ..= end`, every one of them an event
//! this process appended and saw committed. Such a run has no gap another writer could still
//! fill (each position is handed out once), so `read_all(after)` with `after + 1` inside it may
//! answer from the run without the watermark: nothing else lies between `after` and the run's
//! end. A batch that does not continue (or precede) the run replaces it; one whose positions
//! are not consecutive (another process took numbers in between) is kept only from its last
//! gap on. Whatever the run does not cover is read from the database as before.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use crate::{
    AppendResult, CommandId, Metadata, NewEvent, Payload, Position, RecordedEvent, StreamId, Timestamp, Version,
};

/// The run of recently committed local events (see the module documentation).
pub struct RecentEvents {
    capacity: usize,
    run: Mutex<VecDeque<RecordedEvent>>,
}

impl RecentEvents {
    /// Keeps at most `capacity` events (0: keeps none, every read goes to the database).
    pub fn new(capacity: usize) -> Self {
        Self { capacity, run: Mutex::new(VecDeque::new()) }
    }

    /// Whether committed events are kept at all (so the writer need not build them).
    pub fn keeps_any(&self) -> bool {
        self.capacity > 0
    }

    /// Adds the events of one committed batch, in any order. Call before waking readers.
    pub fn committed(&self, mut events: Vec<RecordedEvent>) {
        if self.capacity == 0 || events.is_empty() {
            return;
        }
        events.sort_by_key(|event| event.position);
        // From the batch's last gap on: a run must hold every position it spans.
        let tail_start =
            events.windows(2).rposition(|pair| pair[1].position.0 != pair[0].position.0 + 1).map_or(0, |gap| gap + 1);
        let mut events = events.split_off(tail_start);
        let Ok(mut run) = self.run.lock() else { return };
        let (first, last) = (events[0].position.0, events[events.len() - 1].position.0);
        match (run.front().map(|event| event.position.0), run.back().map(|event| event.position.0)) {
            (Some(_), Some(end)) if first == end + 1 => run.extend(events),
            (Some(start), Some(_)) if last + 1 == start => {
                // Committed after a later batch of another writer task: prepend, within capacity.
                let room = self.capacity.saturating_sub(run.len());
                if room < events.len() {
                    return;
                }
                for event in events.into_iter().rev() {
                    run.push_front(event);
                }
            }
            _ => {
                if events.len() > self.capacity {
                    events.drain(..events.len() - self.capacity);
                }
                *run = events.into();
            }
        }
        while run.len() > self.capacity {
            run.pop_front();
        }
    }

    /// The events after `after`, at most `max_count`, if the run holds the next one; `None`
    /// means: read from the database.
    pub fn after(&self, after: Position, max_count: usize) -> Option<Vec<RecordedEvent>> {
        let run = self.run.lock().ok()?;
        let start = run.front()?.position.0;
        let end = run.back()?.position.0;
        let next = after.0.checked_add(1)?;
        if next < start || next > end {
            return None;
        }
        let skip = usize::try_from(next - start).ok()?;
        Some(run.iter().skip(skip).take(max_count).cloned().collect())
    }
}

/// The stored form of one appended request's events, for [`RecentEvents::committed`]: the
/// values a read of them returns (positions and versions from `result`, the command id in the
/// metadata, `recorded_at` as the store stored it). Nothing if `result` does not span exactly
/// the events (positions not consecutive: they cannot be told apart then).
pub fn recorded(
    stream_id: &StreamId,
    command_id: Option<CommandId>,
    events: Vec<NewEvent>,
    result: AppendResult,
    recorded_at: Timestamp,
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
                recorded_at,
                event_type: Arc::from(event_type),
                schema_version,
                payload: Payload::from_value(payload),
                metadata: Arc::new(Metadata { command_id, ..metadata }),
                tags: Arc::from(tags),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use crate::EventId;

    use super::*;

    fn event(position: u64) -> RecordedEvent {
        RecordedEvent {
            event_id: EventId::new(),
            stream_id: StreamId::new("s").expect("stream id"),
            version: Version(position),
            position: Position(position),
            recorded_at: Timestamp(0),
            event_type: Arc::from("T"),
            schema_version: 1,
            payload: Payload::from_value(serde_json::json!({})),
            metadata: Arc::new(Metadata::default()),
            tags: Arc::from(Vec::new()),
        }
    }

    fn positions(events: Option<Vec<RecordedEvent>>) -> Option<Vec<u64>> {
        events.map(|events| events.iter().map(|event| event.position.0).collect())
    }

    #[test]
    fn answers_only_inside_a_run_without_gaps() {
        let recent = RecentEvents::new(8);
        assert_eq!(positions(recent.after(Position(0), 10)), None);
        recent.committed(vec![event(5), event(3), event(4)]);
        assert_eq!(positions(recent.after(Position(2), 10)), Some(vec![3, 4, 5]));
        assert_eq!(positions(recent.after(Position(3), 1)), Some(vec![4]));
        // Below the run (position 2 may be someone else's) and at its end: the database.
        assert_eq!(positions(recent.after(Position(1), 10)), None);
        assert_eq!(positions(recent.after(Position(5), 10)), None);
        recent.committed(vec![event(6)]);
        assert_eq!(positions(recent.after(Position(4), 10)), Some(vec![5, 6]));
        // A batch with a gap (8 was another process's): only what follows the gap is kept.
        recent.committed(vec![event(7), event(9), event(10)]);
        assert_eq!(positions(recent.after(Position(6), 10)), None);
        assert_eq!(positions(recent.after(Position(8), 10)), Some(vec![9, 10]));
        // A batch that committed late, right below the run, is prepended.
        recent.committed(vec![event(8)]);
        assert_eq!(positions(recent.after(Position(7), 10)), Some(vec![8, 9, 10]));
    }

    #[test]
    fn keeps_at_most_its_capacity() {
        let recent = RecentEvents::new(3);
        recent.committed((1..=5).map(event).collect());
        assert_eq!(positions(recent.after(Position(2), 10)), Some(vec![3, 4, 5]));
        assert_eq!(positions(recent.after(Position(1), 10)), None);
        recent.committed(vec![event(6)]);
        assert_eq!(positions(recent.after(Position(3), 10)), Some(vec![4, 5, 6]));
        let none = RecentEvents::new(0);
        none.committed(vec![event(1)]);
        assert_eq!(positions(none.after(Position(0), 10)), None);
    }
}
