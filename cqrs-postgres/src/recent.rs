//! Events this process's writers have just committed, kept for reads near the head: with it, a
//! local subscriber that is up to date gets the next batch's events from memory instead of
//! reading each event back from the server (one statement per batch and subscriber saved).
//!
//! Only a *run* is kept: consecutive positions `start ..= end`, every one of them an event
//! this process appended and saw committed. Such a run has no gap another writer could still
//! fill (each position is handed out once), so `read_all(after)` with `after + 1` inside it may
//! answer from the run without the watermark: nothing else lies between `after` and the run's
//! end. A batch that does not continue (or precede) the run replaces it; one whose positions
//! are not consecutive (another process took numbers in between) is kept only from its last
//! gap on. Whatever the run does not cover is read from the database as before.

use std::collections::VecDeque;
use std::sync::Mutex;

use cqrs_core::{Position, RecordedEvent};

/// The run of recently committed local events (see the module documentation).
pub(crate) struct RecentEvents {
    capacity: usize,
    run: Mutex<VecDeque<RecordedEvent>>,
}

impl RecentEvents {
    /// Keeps at most `capacity` events (0: keeps none, every read goes to the database).
    pub(crate) fn new(capacity: usize) -> Self {
        Self { capacity, run: Mutex::new(VecDeque::new()) }
    }

    /// Whether committed events are kept at all (so the writer need not build them).
    pub(crate) fn keeps_any(&self) -> bool {
        self.capacity > 0
    }

    /// Adds the events of one committed batch, in any order. Call before waking readers.
    pub(crate) fn committed(&self, mut events: Vec<RecordedEvent>) {
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
    pub(crate) fn after(&self, after: Position, max_count: usize) -> Option<Vec<RecordedEvent>> {
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use cqrs_core::{EventId, Metadata, StreamId, Timestamp, Version};

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
            payload: cqrs_core::Payload::from_value(serde_json::json!({})),
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
