//! The request queue in front of the writer task (adapted from `cqrs-postgres`), with one
//! fairness rule: after an append with
//! a command id loses a version conflict, other appends to that stream wait (briefly) until the
//! loser's retry arrives, so a writer that must re-read before retrying is not starved by one
//! that appends back to back.
//!
//! Without it, two dispatchers hammering one stream through a batching store livelock: the
//! winner's next append is queued earlier than the loser's retry (which first re-reads the
//! stream), so the winner wins again and again.
//!
//! Checkpoint and snapshot saves go through the same queue (the writer owns the only write
//! connection) and are never held.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use cqrs_core::{CommandId, StreamId};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::writer::WriteRequest;

/// How long other appends to a stream wait for a conflict loser's retry at most.
pub(crate) const CONFLICT_HOLD: Duration = Duration::from_millis(25);

/// Bounds of one batch.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchLimits {
    /// Most appends per batch.
    pub(crate) max_appends: usize,
    /// A batch stops growing once it holds this many events.
    pub(crate) max_events: usize,
}

/// Streams whose next append is reserved for a conflict loser's retry.
#[derive(Default)]
pub(crate) struct Reservations {
    by_stream: Mutex<HashMap<StreamId, (CommandId, Instant)>>,
}

impl Reservations {
    /// Reserves `stream_id`'s next append for `command_id`, for at most [`CONFLICT_HOLD`].
    pub(crate) fn reserve(&self, stream_id: StreamId, command_id: CommandId) {
        self.lock().insert(stream_id, (command_id, Instant::now() + CONFLICT_HOLD));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<StreamId, (CommandId, Instant)>> {
        self.by_stream.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The receiving end of the request queue, owned by the writer task.
pub(crate) struct AppendQueue {
    requests: mpsc::Receiver<WriteRequest>,
    /// Received but not yet written, in arrival order.
    pending: VecDeque<WriteRequest>,
    reservations: Arc<Reservations>,
    closed: bool,
}

impl AppendQueue {
    pub(crate) fn new(requests: mpsc::Receiver<WriteRequest>, reservations: Arc<Reservations>) -> Self {
        Self { requests, pending: VecDeque::new(), reservations, closed: false }
    }

    /// Waits for the next batch; `None` once the queue is closed and drained.
    pub(crate) async fn next_batch(&mut self, limits: BatchLimits) -> Option<Vec<WriteRequest>> {
        loop {
            while self.pending.len() < limits.max_appends {
                match self.requests.try_recv() {
                    Ok(request) => self.pending.push_back(request),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        self.closed = true;
                        break;
                    }
                }
            }
            let (batch, next_release) = self.take_eligible(limits);
            if !batch.is_empty() {
                return Some(batch);
            }
            if self.pending.is_empty() && self.closed {
                return None;
            }
            // Nothing writable: wait for a new append, or for a reservation to expire.
            let received = match next_release {
                Some(deadline) if !self.closed => tokio::time::timeout_at(deadline, self.requests.recv()).await.ok(),
                Some(deadline) => {
                    tokio::time::sleep_until(deadline).await;
                    continue;
                }
                None => Some(self.requests.recv().await),
            };
            match received {
                Some(Some(request)) => self.pending.push_back(request),
                Some(None) => self.closed = true,
                None => {} // a reservation expired
            }
        }
    }

    /// Moves the appends that may be written now into a batch, keeping arrival order within
    /// each stream. Returns the batch and, if appends stay held, when the first hold ends.
    fn take_eligible(&mut self, limits: BatchLimits) -> (Vec<WriteRequest>, Option<Instant>) {
        let now = Instant::now();
        let mut reservations = self.reservations.lock();
        reservations.retain(|_, (_, until)| *until > now);
        if self.closed {
            // No retry can arrive any more.
            reservations.clear();
        }
        let mut batch = Vec::new();
        let mut n_events = 0;
        let mut held = VecDeque::new();
        let mut held_streams = HashSet::new();
        let mut next_release: Option<Instant> = None;
        while let Some(request) = self.pending.pop_front() {
            let full = batch.len() >= limits.max_appends || (n_events >= limits.max_events && !batch.is_empty());
            let Some((stream_id, command_id)) = request.append_key() else {
                // Checkpoints and snapshots: never held.
                if full {
                    held.push_back(request);
                } else {
                    batch.push(request);
                }
                continue;
            };
            let blocked = match reservations.get(stream_id) {
                Some((reserved, until)) if command_id != Some(*reserved) => {
                    next_release = Some(next_release.map_or(*until, |release| release.min(*until)));
                    true
                }
                Some(_) if !full => {
                    // The loser's retry: it overtakes the held appends of its stream, and the
                    // hold ends (the held ones follow in the next batch, in arrival order).
                    reservations.remove(stream_id);
                    false
                }
                _ => held_streams.contains(stream_id),
            };
            if full || blocked {
                held_streams.insert(stream_id.clone());
                held.push_back(request);
            } else {
                n_events += request.event_count();
                batch.push(request);
            }
        }
        self.pending = held;
        (batch, next_release)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cqrs_core::{ExpectedVersion, Metadata};
    use tokio::sync::oneshot;

    use crate::writer::AppendRequest;

    const LIMITS: BatchLimits = BatchLimits { max_appends: 10, max_events: 100 };

    fn request(stream: &str, command_id: CommandId) -> WriteRequest {
        let metadata = Metadata { command_id: Some(command_id), ..Metadata::default() };
        let (reply, _) = oneshot::channel();
        WriteRequest::Append(AppendRequest {
            stream_id: StreamId::new(stream).expect("stream id"),
            expected: ExpectedVersion::Any,
            command_id: Some(command_id),
            events: vec![cqrs_core::testing::conformance::event_with(0, metadata)],
            reply,
        })
    }

    fn commands(batch: &[WriteRequest]) -> Vec<Option<CommandId>> {
        batch.iter().map(|request| request.append_key().and_then(|(_, command_id)| command_id)).collect()
    }

    #[tokio::test]
    async fn conflict_loser_retry_goes_first_and_order_within_a_stream_is_kept() {
        let (sender, receiver) = mpsc::channel(16);
        let reservations = Arc::new(Reservations::default());
        let mut queue = AppendQueue::new(receiver, Arc::clone(&reservations));
        let (winner_next, winner_after, loser, other) =
            (CommandId::new(), CommandId::new(), CommandId::new(), CommandId::new());
        reservations.reserve(StreamId::new("s-1").expect("id"), loser);
        for request in [request("s-1", winner_next), request("t-1", other), request("s-1", winner_after)] {
            assert!(sender.send(request).await.is_ok());
        }
        // The other stream is not held; the reserved stream waits for the loser.
        let first = queue.next_batch(LIMITS).await.expect("batch");
        assert_eq!(commands(&first), vec![Some(other)]);
        assert!(sender.send(request("s-1", loser)).await.is_ok());
        let second = queue.next_batch(LIMITS).await.expect("batch");
        assert_eq!(commands(&second), vec![Some(loser)]);
        // Then the held ones, in arrival order.
        let third = queue.next_batch(LIMITS).await.expect("batch");
        assert_eq!(commands(&third), vec![Some(winner_next), Some(winner_after)]);
        drop(sender);
        assert!(queue.next_batch(LIMITS).await.is_none());
    }

    #[tokio::test]
    async fn a_hold_ends_after_its_deadline() {
        let (sender, receiver) = mpsc::channel(16);
        let reservations = Arc::new(Reservations::default());
        let mut queue = AppendQueue::new(receiver, Arc::clone(&reservations));
        reservations.reserve(StreamId::new("s-1").expect("id"), CommandId::new());
        let waiting = CommandId::new();
        assert!(sender.send(request("s-1", waiting)).await.is_ok());
        let batch = queue.next_batch(LIMITS).await.expect("batch");
        assert_eq!(commands(&batch), vec![Some(waiting)]);
    }
}
