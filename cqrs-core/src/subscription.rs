//! Catch-up-then-live subscriptions, built once for every store.
//!
//! A [`Subscription`] never relies on a live channel for data: it always reads the store from
//! the last position (or version) it delivered, in pages, and uses the store's
//! [`notifications`](crate::EventStore::notifications) only to learn when to read again. So the
//! switch from catch-up to live cannot open a gap or deliver a duplicate, and a slow subscriber
//! cannot overflow anything: it simply reads further behind the head.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::watch;

use crate::event::RecordedEvent;
use crate::ids::{Position, StreamId, Version};
use crate::store::{EventStore, StoreError};

/// How many events a subscription reads per store call.
pub const DEFAULT_PAGE_SIZE: usize = 512;

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
        }
    }

    /// Sets how many events are read per store call (at least 1).
    #[must_use]
    pub fn with_page_size(mut self, page_size: usize) -> Self {
        self.page_size = page_size.max(1);
        self
    }

    /// The global position of the last event returned (the starting point before the first).
    pub fn position(&self) -> Position {
        self.last_position
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
            Cursor::All { after } => *after = event.position,
            Cursor::Stream { next, .. } => *next = event.version.next(),
        }
        Some(event)
    }

    /// Reads the next page into the buffer; true if it found events. Skips the read when the
    /// last one came back short and no notification has come since (see `caught_up`).
    async fn fill(&mut self) -> Result<bool, StoreError> {
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

    /// Waits for a notification (or the store's poll interval). False if the store closed.
    async fn wait_for_notification(&mut self) -> bool {
        match self.store.poll_interval() {
            Some(interval) => match tokio::time::timeout(interval, self.notifications.changed()).await {
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
