//! Catch-up-then-live subscriptions, built once for every store.
//!
//! A [`Subscription`] never relies on a live channel for data: it always reads the store from
//! the last position (or version) it delivered, in pages, and uses the store's
//! [`notifications`](crate::EventStore::notifications) only to learn when to read again. So the
//! switch from catch-up to live cannot open a gap or deliver a duplicate, and a slow subscriber
//! cannot overflow anything: it simply reads further behind the head.
//!
//! A subscription of the whole log also audits itself: every run of positions it passed over
//! without an event (a gap: a rolled-back append, a burned sequence number) is read again a
//! while later. An event found there committed after the subscription went past its position,
//! so the subscription skipped it: the store broke its ordering contract. That is counted
//! ([`Subscription::skipped_events`], metric `cqrs_subscription_skipped_events_total`) and
//! logged as an error; the event is not delivered out of order.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::event::RecordedEvent;
use crate::ids::{Position, StreamId, Version};
use crate::store::{EventStore, StoreError};

/// How many events a subscription reads per store call.
pub const DEFAULT_PAGE_SIZE: usize = 512;

/// How long after passing over a gap in positions a subscription reads it again, looking for
/// an event that committed late (see the [module documentation](self)).
pub const DEFAULT_GAP_AUDIT_DELAY: Duration = Duration::from_secs(5);

/// The most gaps a subscription keeps waiting for their audit; beyond it the oldest is dropped
/// unread (so a store with many gaps costs bounded memory and reads).
const MAX_PENDING_GAPS: usize = 1024;

/// The most positions one audit read covers; a longer gap is audited in its first positions.
const MAX_GAP_READ: u64 = 4096;

#[derive(Debug, Clone)]
enum Cursor {
    All { after: Position },
    Stream { stream_id: StreamId, next: Version },
}

/// An ordered, gap-free feed of events: first the stored ones after a starting point, then new
/// ones as they are committed.
///
/// ```
/// # use std::sync::Arc;
/// # use cqrs_core::{Position, Subscription, EventStore};
/// # async fn demo<S: EventStore>(store: Arc<S>) -> Result<(), cqrs_core::StoreError> {
/// let mut feed = Subscription::all(store, Position::START);
/// while let Some(event) = feed.next().await? {
///     println!("{} {} {}", event.position, event.stream_id, event.event_type);
/// }
/// # Ok(()) }
/// ```
pub struct Subscription<S: EventStore + ?Sized> {
    store: Arc<S>,
    cursor: Cursor,
    buffer: VecDeque<RecordedEvent>,
    notifications: watch::Receiver<Position>,
    page_size: usize,
    last_position: Position,
    /// The last read returned a short page after the notification was marked seen, and no
    /// wake-up has come since: the store has nothing more for us until the next notification
    /// (or poll), so reading again now would only cost a round trip.
    caught_up: bool,
    /// While catching up (the last page of the whole log came back full), the next page is
    /// read in a task of its own while the consumer handles this one, so the store's work and
    /// the consumer's overlap.
    ahead: Option<Ahead>,
    /// Gaps passed over, waiting to be read again.
    gaps: Gaps,
}

/// The gaps a subscription of the whole log passed over, oldest first, and what their audits
/// found.
#[derive(Debug)]
struct Gaps {
    pending: VecDeque<Gap>,
    delay: Duration,
    skipped: u64,
}

/// Positions `first ..= last` passed over without an event, to be read again at `due`.
#[derive(Debug, Clone, Copy)]
struct Gap {
    first: u64,
    last: u64,
    due: Instant,
}

impl Gaps {
    fn new() -> Self {
        Self { pending: VecDeque::new(), delay: DEFAULT_GAP_AUDIT_DELAY, skipped: 0 }
    }

    /// Notes the positions strictly between `from` and `to`, if any.
    fn passed(&mut self, from: Position, to: Position) {
        if to.0 <= from.0.saturating_add(1) {
            return;
        }
        if self.pending.len() == MAX_PENDING_GAPS {
            self.pending.pop_front();
        }
        self.pending.push_back(Gap { first: from.0 + 1, last: to.0 - 1, due: Instant::now() + self.delay });
    }

    /// Puts the oldest gap's audit off by the audit delay (at least a second).
    fn postpone(&mut self) {
        let later = Instant::now() + self.delay.max(Duration::from_secs(1));
        if let Some(gap) = self.pending.front_mut() {
            gap.due = later;
        }
    }

    /// The oldest gap, if its audit is due.
    fn due(&self) -> Option<Gap> {
        self.pending.front().filter(|gap| gap.due <= Instant::now()).copied()
    }
}

/// A page of [`EventStore::read_all`] read ahead, after `after`.
struct Ahead {
    after: Position,
    task: tokio::task::JoinHandle<Result<Vec<RecordedEvent>, StoreError>>,
}

impl<S: EventStore + ?Sized> Drop for Subscription<S> {
    fn drop(&mut self) {
        if let Some(ahead) = self.ahead.take() {
            ahead.task.abort();
        }
    }
}

impl<S: EventStore + ?Sized> Subscription<S> {
    /// Every event of every stream with a position greater than `after`.
    pub fn all(store: Arc<S>, after: Position) -> Self {
        let notifications = store.notifications();
        Self {
            store,
            cursor: Cursor::All { after },
            buffer: VecDeque::new(),
            notifications,
            page_size: DEFAULT_PAGE_SIZE,
            last_position: after,
            caught_up: false,
            ahead: None,
            gaps: Gaps::new(),
        }
    }

    /// Every event of one stream from version `from` (inclusive; `Version(1)` for all).
    pub fn stream(store: Arc<S>, stream_id: StreamId, from: Version) -> Self {
        let notifications = store.notifications();
        let next = from.max(Version(1));
        Self {
            store,
            cursor: Cursor::Stream { stream_id, next },
            buffer: VecDeque::new(),
            notifications,
            page_size: DEFAULT_PAGE_SIZE,
            last_position: Position::START,
            caught_up: false,
            ahead: None,
            gaps: Gaps::new(),
        }
    }

    /// Sets how many events are read per store call (at least 1).
    #[must_use]
    pub fn with_page_size(mut self, page_size: usize) -> Self {
        self.page_size = page_size.max(1);
        self
    }

    /// Sets how long after passing over a gap in positions the subscription reads it again
    /// (default [`DEFAULT_GAP_AUDIT_DELAY`]). Longer catches later commits; shorter reports
    /// sooner.
    #[must_use]
    pub fn with_gap_audit_delay(mut self, delay: Duration) -> Self {
        self.gaps.delay = delay;
        self
    }

    /// The global position of the last event returned (the starting point before the first).
    pub fn position(&self) -> Position {
        self.last_position
    }

    /// How many events this subscription skipped: events found, by a gap's audit, at positions
    /// it had already passed over. Always 0 on a store that keeps its ordering contract.
    pub fn skipped_events(&self) -> u64 {
        self.gaps.skipped
    }

    /// Reads every gap passed over so far again now, whether due or not (a test, or a consumer
    /// about to stop, that wants the count final). Returns [`skipped_events`](Self::skipped_events).
    pub async fn audit_gaps_now(&mut self) -> Result<u64, StoreError> {
        while let Some(gap) = self.gaps.pending.front().copied() {
            self.audit(gap).await?;
        }
        Ok(self.gaps.skipped)
    }

    /// Waits for the next event. Returns `Ok(None)` only when the store is closed and every
    /// stored event has been delivered.
    pub async fn next(&mut self) -> Result<Option<RecordedEvent>, StoreError> {
        loop {
            if let Some(event) = self.pop() {
                return Ok(Some(event));
            }
            if self.fill().await? {
                continue;
            }
            let open = self.wait_for_notification().await;
            // Woken (a notification, a poll tick, or the store closing): always read again.
            self.caught_up = false;
            if !open {
                // Store closed: deliver anything committed before it closed, then end.
                if self.fill().await? {
                    continue;
                }
                return Ok(None);
            }
        }
    }

    /// Returns the next event if one is already stored, without waiting for new ones.
    ///
    /// Both this and [`next`](Self::next) are cancel-safe: the subscription's state (its
    /// position, its buffer, and which wake-ups it has consumed) changes only when a store read
    /// has succeeded. A read that fails, or a future dropped mid-read (a `select!` whose other
    /// branch won), leaves the pending wake-up in place, so the next call reads again.
    pub async fn try_next(&mut self) -> Result<Option<RecordedEvent>, StoreError> {
        if self.buffer.is_empty() {
            self.fill().await?;
        }
        Ok(self.pop())
    }

    /// The next event already read from the store, without any I/O: for a consumer that
    /// takes what has arrived as one batch after awaiting [`next`](Self::next).
    pub fn next_buffered(&mut self) -> Option<RecordedEvent> {
        self.pop()
    }

    fn pop(&mut self) -> Option<RecordedEvent> {
        let event = self.buffer.pop_front()?;
        self.last_position = event.position;
        match &mut self.cursor {
            Cursor::All { after } => {
                self.gaps.passed(*after, event.position);
                *after = event.position;
            }
            Cursor::Stream { next, .. } => *next = event.version.next(),
        }
        Some(event)
    }

    /// Reads the next page into the buffer; true if it found events. Skips the read when the
    /// last one came back short and no notification has come since (see `caught_up`).
    async fn fill(&mut self) -> Result<bool, StoreError> {
        if let Some(gap) = self.gaps.due() {
            // A failed audit read never fails the feed; it is tried again a while later (not at
            // once: the wait for it would end at once, and the feed would spin).
            if let Err(error) = self.audit(gap).await {
                tracing::debug!(%error, "gap audit read failed; tried again later");
                self.gaps.postpone();
            }
        }
        if self.caught_up && !self.notifications.has_changed().unwrap_or(true) {
            return Ok(false);
        }
        if let Some(found) = self.take_ahead().await {
            return Ok(found);
        }
        // The notification current now counts as seen once this read succeeds: marked on a
        // copy of the receiver *before* reading (so an append that lands during the read still
        // wakes us up), and the copy kept only after the read. A failed or cancelled read thus
        // leaves the wake-up pending.
        let mut seen = self.notifications.clone();
        seen.borrow_and_update();
        let page = match &self.cursor {
            Cursor::All { after } => {
                let page = self.store.read_all(*after, self.page_size).await?;
                check_positions(*after, &page)?;
                page
            }
            Cursor::Stream { stream_id, next } => {
                let page = self.store.read_stream(stream_id, *next, self.page_size).await?;
                check_versions(*next, &page)?;
                page
            }
        };
        let found = !page.is_empty();
        self.notifications = seen;
        self.caught_up = page.len() < self.page_size;
        self.read_ahead(&page);
        self.buffer.extend(page);
        Ok(found)
    }

    /// After a full page of the whole log, starts reading the next one.
    fn read_ahead(&mut self, page: &[RecordedEvent]) {
        let (Cursor::All { .. }, false, Some(last)) = (&self.cursor, self.caught_up, page.last()) else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let (store, after, page_size) = (Arc::clone(&self.store), last.position, self.page_size);
        let task = runtime.spawn(async move { store.read_all(after, page_size).await });
        self.ahead = Some(Ahead { after, task });
    }

    /// The page read ahead, if there is one for where the cursor stands: `Some(found)` once it
    /// is in the buffer; `None` to read normally (no page ahead, or its read failed: the
    /// normal read then reports or retries). The page counts as read like any other; only the
    /// wake-up it covers is not marked seen, which costs at most one more read.
    async fn take_ahead(&mut self) -> Option<bool> {
        let Cursor::All { after } = self.cursor else { return None };
        let ahead = self.ahead.as_mut()?;
        if ahead.after != after {
            self.ahead.take()?.task.abort();
            return None;
        }
        // Cancel-safe: dropped here, the task stays in `self.ahead` for the next call.
        let result = (&mut ahead.task).await;
        self.ahead = None;
        let page = match result {
            Ok(Ok(page)) => page,
            Ok(Err(_)) | Err(_) => return None,
        };
        check_positions(after, &page).ok()?;
        let found = !page.is_empty();
        self.caught_up = page.len() < self.page_size;
        self.read_ahead(&page);
        self.buffer.extend(page);
        Some(found)
    }

    /// Reads `gap` again; counts (and logs) any event found in it, then forgets it. Left
    /// pending if the read fails or is cancelled.
    async fn audit(&mut self, gap: Gap) -> Result<(), StoreError> {
        let span = (gap.last - gap.first + 1).min(MAX_GAP_READ);
        let max = usize::try_from(span).unwrap_or(usize::MAX);
        let page = self.store.read_all(Position(gap.first - 1), max).await?;
        let late: Vec<Position> =
            page.iter().map(|event| event.position).filter(|position| position.0 <= gap.last).collect();
        self.gaps.pending.pop_front();
        if !late.is_empty() {
            self.gaps.skipped += late.len() as u64;
            metrics::counter!("cqrs_subscription_skipped_events_total").increment(late.len() as u64);
            tracing::error!(
                skipped = ?late,
                "events committed at positions this subscription had already passed: the store \
                 broke its ordering contract and they were not delivered"
            );
        }
        Ok(())
    }

    /// Waits for a notification (or the store's poll interval, or the next gap audit). False
    /// if the store closed.
    async fn wait_for_notification(&mut self) -> bool {
        let audit = self.gaps.pending.front().map(|gap| gap.due.saturating_duration_since(Instant::now()));
        let wait = match (self.store.poll_interval(), audit) {
            (Some(poll), Some(audit)) => Some(poll.min(audit)),
            (poll, audit) => poll.or(audit),
        };
        match wait {
            Some(wait) => match tokio::time::timeout(wait, self.notifications.changed()).await {
                Ok(result) => result.is_ok(),
                Err(_elapsed) => true,
            },
            None => self.notifications.changed().await.is_ok(),
        }
    }
}

/// Guards the store contract: positions must strictly increase past the cursor.
fn check_positions(after: Position, page: &[RecordedEvent]) -> Result<(), StoreError> {
    let mut previous = after;
    for event in page {
        if event.position <= previous {
            return Err(StoreError::Corrupt(format!(
                "read_all returned {} after {}: positions must strictly increase",
                event.position, previous
            )));
        }
        previous = event.position;
    }
    Ok(())
}

/// Guards the store contract: stream versions must be contiguous from the cursor.
fn check_versions(next: Version, page: &[RecordedEvent]) -> Result<(), StoreError> {
    let mut expected = next;
    for event in page {
        if event.version != expected {
            return Err(StoreError::Corrupt(format!(
                "read_stream returned {} where {} was expected: versions must be contiguous",
                event.version, expected
            )));
        }
        expected = expected.next();
    }
    Ok(())
}
