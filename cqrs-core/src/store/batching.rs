//! A building block for store implementors: the write queue in front of a store's writer
//! task(s), which takes everything queued (up to [`BatchLimits`]) as one batch for a group
//! commit, with one fairness rule: after an append with a command id loses a version conflict,
//! other appends to that stream wait (briefly) until the loser's retry arrives, so a writer
//! that must re-read before retrying is not starved by one that appends back to back.
//!
//! Without it, two dispatchers hammering one stream through a batching store livelock: the
//! winner's next append is queued earlier (a round trip earlier, with a remote database) than
//! the loser's retry (which first re-reads the stream), so the winner wins again and again.
//!
//! The writer reports a conflict loser with [`Reservations::reserve`]; [`BatchQueue`] then
//! holds the stream's other appends until the loser's retry arrives or [`CONFLICT_HOLD`]
//! passes. Requests that are not appends (for example checkpoint or snapshot saves that travel
//! the same queue, see [`QueuedWrite::append_key`]) are never held.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::ids::{CommandId, StreamId};

/// How long other appends to a stream wait for a conflict loser's retry at most.
pub const CONFLICT_HOLD: Duration = Duration::from_millis(25);

/// A request that travels a [`BatchQueue`].
pub trait QueuedWrite {
    /// The stream and command id of an append; `None` for a request that is not an append
    /// (such requests are never held).
    fn append_key(&self) -> Option<(&StreamId, Option<CommandId>)>;

    /// How many events the request writes (counted against [`BatchLimits::max_events`]).
    fn event_count(&self) -> usize;
}

/// Bounds of one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Most requests per batch.
    pub max_appends: usize,
    /// A batch stops growing once it holds this many events.
    pub max_events: usize,
}

/// Streams whose next append is reserved for a conflict loser's retry. Shared (through an
/// [`Arc`]) by the [`BatchQueue`] and the writer that reports conflicts.
#[derive(Debug, Default)]
pub struct Reservations {
    by_stream: Mutex<HashMap<StreamId, (CommandId, Instant)>>,
}

impl Reservations {
    /// Reserves `stream_id`'s next append for `command_id`, for at most [`CONFLICT_HOLD`].
    pub fn reserve(&self, stream_id: StreamId, command_id: CommandId) {
        self.lock().insert(stream_id, (command_id, Instant::now() + CONFLICT_HOLD));
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<StreamId, (CommandId, Instant)>> {
        self.by_stream.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The receiving end of a write queue: owned by the writer task, or shared by several writer
/// tasks behind an async mutex.
pub struct BatchQueue<R> {
    requests: mpsc::Receiver<R>,
    /// Received but not yet written, in arrival order.
    pending: VecDeque<R>,
    reservations: Arc<Reservations>,
    closed: bool,
}

impl<R> fmt::Debug for BatchQueue<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatchQueue")
            .field("pending", &self.pending.len())
            .field("reservations", &self.reservations)
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

impl<R: QueuedWrite> BatchQueue<R> {
    /// A queue over `requests`, holding the streams reserved in `reservations`.
    pub fn new(requests: mpsc::Receiver<R>, reservations: Arc<Reservations>) -> Self {
        Self { requests, pending: VecDeque::new(), reservations, closed: false }
    }

    /// How many requests wait: received and held, or still in the channel.
    pub fn queued(&self) -> usize {
        self.pending.len() + self.requests.len()
    }

    /// Waits for the next batch; `None` once the queue is closed and drained.
    pub async fn next_batch(&mut self, limits: BatchLimits) -> Option<Vec<R>> {
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
            // Nothing writable: wait for a new request, or for a reservation to expire.
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

    /// Moves the requests that may be written now into a batch, keeping arrival order within
    /// each stream. Returns the batch and, if appends stay held, when the first hold ends.
    fn take_eligible(&mut self, limits: BatchLimits) -> (Vec<R>, Option<Instant>) {
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
                // Not an append: never held.
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

    const LIMITS: BatchLimits = BatchLimits { max_appends: 10, max_events: 100 };

    /// An append of one event, or (without a stream) some other write.
    struct TestRequest {
        stream_id: Option<StreamId>,
        command_id: Option<CommandId>,
    }

    impl QueuedWrite for TestRequest {
        fn append_key(&self) -> Option<(&StreamId, Option<CommandId>)> {
            self.stream_id.as_ref().map(|stream_id| (stream_id, self.command_id))
        }

        fn event_count(&self) -> usize {
            usize::from(self.stream_id.is_some())
        }
    }

    fn request(stream: &str, command_id: CommandId) -> TestRequest {
        TestRequest { stream_id: Some(StreamId::new(stream).expect("stream id")), command_id: Some(command_id) }
    }

    fn commands(batch: &[TestRequest]) -> Vec<Option<CommandId>> {
        batch.iter().map(|request| request.command_id).collect()
    }

    #[tokio::test]
    async fn conflict_loser_retry_goes_first_and_order_within_a_stream_is_kept() {
        let (sender, receiver) = mpsc::channel(16);
        let reservations = Arc::new(Reservations::default());
        let mut queue = BatchQueue::new(receiver, Arc::clone(&reservations));
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
        let mut queue = BatchQueue::new(receiver, Arc::clone(&reservations));
        reservations.reserve(StreamId::new("s-1").expect("id"), CommandId::new());
        let waiting = CommandId::new();
        assert!(sender.send(request("s-1", waiting)).await.is_ok());
        let batch = queue.next_batch(LIMITS).await.expect("batch");
        assert_eq!(commands(&batch), vec![Some(waiting)]);
    }

    #[tokio::test]
    async fn other_writes_are_never_held() {
        let (sender, receiver) = mpsc::channel(16);
        let reservations = Arc::new(Reservations::default());
        let mut queue = BatchQueue::new(receiver, Arc::clone(&reservations));
        reservations.reserve(StreamId::new("s-1").expect("id"), CommandId::new());
        let held = CommandId::new();
        assert!(sender.send(request("s-1", held)).await.is_ok());
        assert!(sender.send(TestRequest { stream_id: None, command_id: None }).await.is_ok());
        let batch = queue.next_batch(LIMITS).await.expect("batch");
        assert_eq!(commands(&batch), vec![None]);
        let batch = queue.next_batch(LIMITS).await.expect("batch");
        assert_eq!(commands(&batch), vec![Some(held)]);
    }
}
