//! One resident room: its window (or the events waiting while it loads), its live channel,
//! presence and typing, behind one lock; and the step that applies an event to a window.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cqrs_core::{Envelope, Position, StoreError, StreamId};
use tokio::sync::{broadcast, watch};

use super::cluster::Others;
use super::message::{self, Message, MessageData, Revision, Shared};
use super::presence::{Here, SignalOutcome, Typing, PRESENCE_SHOWN};
use super::window::{CatchUp, Window};
use super::{ChatReadModel, PresenceView, Present, RoomError, TypingView};
use crate::domain::{ChatEvent, ChatId};

/// Where a room's load from the store is (waiters watch it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LoadState {
    Loading,
    Ready,
    Failed,
}

/// A room's contents: loading (with the feed's events for it buffered), ready, or failed.
pub(super) enum Load<M> {
    /// Being read from the store; the feed's events for it wait here.
    Loading(Vec<Envelope<ChatEvent>>),
    Ready(Window<M>),
    Failed,
}

pub(super) struct RoomInner<P: Present> {
    pub(super) load: Load<P::Message>,
    pub(super) updates: broadcast::Sender<Shared<P::Message>>,
    pub(super) here: Here,
    pub(super) typing: Typing,
}

/// One resident room: its window, live channel, presence and typing.
pub struct Room<P: Present> {
    pub(super) id: ChatId,
    pub(super) stream: StreamId,
    pub(super) inner: Mutex<RoomInner<P>>,
    pub(super) state: watch::Sender<LoadState>,
    pub(super) presence: watch::Sender<Arc<PresenceView<P::Presence>>>,
    pub(super) typing: watch::Sender<Arc<TypingView<P::Typing>>>,
    /// Milliseconds since the model started, at the last use: the eviction clock.
    pub(super) last_used: AtomicU64,
}

impl<P: Present> std::fmt::Debug for Room<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Room").field("id", &self.id).finish()
    }
}

/// What [`Room::subscribe`] gives a view: its catch-up, its live channel, and the room's head
/// the catch-up reaches.
pub type Subscribed<M> = (CatchUp<M>, broadcast::Receiver<Shared<M>>, Revision);

/// What applying one event to a room did.
pub(super) enum Applied {
    Done,
    /// The event edits a message the window does not hold: read it from the store first.
    NeedsTarget(u64),
    /// The event skips versions: the room must be reloaded.
    Gap,
}

impl<P: Present> Room<P> {
    pub(super) fn new(id: ChatId, present: &P, channel_capacity: usize) -> Self {
        let (updates, _) = broadcast::channel(channel_capacity.max(1));
        let presence =
            PresenceView { names: Arc::from(Vec::new()), count: 0, shown: Arc::new(present.presence(&[], 0)) };
        let typing = TypingView { names: Vec::new(), shown: present.typing(&[]) };
        Self {
            stream: id.stream_id(),
            id,
            inner: Mutex::new(RoomInner {
                load: Load::Loading(Vec::new()),
                updates,
                here: Here::default(),
                typing: Typing::default(),
            }),
            state: watch::channel(LoadState::Loading).0,
            presence: watch::channel(Arc::new(presence)).0,
            typing: watch::channel(Arc::new(typing)).0,
            last_used: AtomicU64::new(0),
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, RoomInner<P>> {
        // Every update under this lock leaves the room consistent before any step that could
        // panic, so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The room's id.
    pub fn id(&self) -> &ChatId {
        &self.id
    }

    fn with_window<T>(&self, read: impl FnOnce(&Window<P::Message>) -> T) -> Option<T> {
        match &self.lock().load {
            Load::Ready(window) => Some(read(window)),
            _ => None,
        }
    }

    /// The last event of the room applied here (version 0: the room has no event yet).
    pub fn head(&self) -> Revision {
        self.with_window(Window::head).unwrap_or_default()
    }

    /// The number of the room's latest message.
    pub fn last_number(&self) -> u64 {
        self.with_window(Window::last_number).unwrap_or(0)
    }

    /// Messages held in memory for this room.
    pub fn window_len(&self) -> usize {
        self.with_window(Window::len).unwrap_or(0)
    }

    /// The latest messages (at most `limit` and `max_bytes` as the presenter weighs them),
    /// oldest first, and whether older ones exist.
    pub fn latest(&self, present: &P, limit: usize, max_bytes: usize) -> (Vec<Shared<P::Message>>, bool) {
        self.with_window(|w| w.latest(limit, max_bytes, |m| present.weight(m))).unwrap_or((Vec::new(), false))
    }

    /// The page before `before` if the window holds all of it.
    pub fn before_in_window(&self, before: Position, limit: usize) -> Option<(Vec<Shared<P::Message>>, bool)> {
        self.with_window(|w| w.before(before, limit)).flatten()
    }

    /// Subscribes a view whose page shows everything up to position `after` to the room: what
    /// it missed, the live channel, and the head the catch-up reaches, taken under one lock so
    /// nothing falls between them.
    pub fn subscribe(
        &self,
        present: &P,
        after: Position,
        max_replay: usize,
        page: (usize, usize),
    ) -> Subscribed<P::Message> {
        let inner = self.lock();
        let receiver = inner.updates.subscribe();
        let (catch_up, head) = match &inner.load {
            Load::Ready(window) => (
                window.catch_up(
                    window.covers_position(after),
                    |r| r.position <= after,
                    max_replay,
                    page,
                    |m| present.weight(m),
                ),
                window.head(),
            ),
            _ => (CatchUp::Changes(Vec::new()), Revision::default()),
        };
        (catch_up, receiver, head)
    }

    /// What a live view that has forwarded every change up to room version `seen` missed, and
    /// the room's head it reaches (later changes come through the view's channel).
    pub fn catch_up_after(
        &self,
        present: &P,
        seen: u64,
        max_replay: usize,
        page: (usize, usize),
    ) -> (CatchUp<P::Message>, Revision) {
        self.with_window(|w| {
            let catch_up =
                w.catch_up(w.covers_version(seen), |r| r.version <= seen, max_replay, page, |m| present.weight(m));
            (catch_up, w.head())
        })
        .unwrap_or((CatchUp::Changes(Vec::new()), Revision::default()))
    }

    /// Who is here, updated on every change.
    pub fn presence(&self) -> watch::Receiver<Arc<PresenceView<P::Presence>>> {
        self.presence.subscribe()
    }

    /// Who is typing, updated on every change.
    pub fn typing(&self) -> watch::Receiver<Arc<TypingView<P::Typing>>> {
        self.typing.subscribe()
    }

    /// How many distinct people are here.
    pub fn viewers(&self) -> usize {
        self.lock().here.count()
    }

    /// How many distinct people are here or, as `others` says, in this room on other nodes
    /// (a name on several nodes counts once; people another node did not name count each).
    pub(super) fn viewers_with(&self, others: &Others) -> usize {
        let inner = self.lock();
        if others.names.is_empty() && others.unnamed == 0 {
            return inner.here.count();
        }
        let local_only = inner.here.names().filter(|name| !others.names.contains(*name)).count();
        local_only + others.names.len() + others.unnamed
    }

    /// Names someone here may mention: the people here and the senders of the window's
    /// messages.
    pub fn known_names(&self) -> Vec<String> {
        let inner = self.lock();
        let mut names: Vec<String> = inner.here.names().map(str::to_owned).collect();
        if let Load::Ready(window) = &inner.load {
            let (latest, _) = window.latest(usize::MAX, usize::MAX, |_| 0);
            for message in latest.iter().rev() {
                if names.len() >= 200 {
                    break;
                }
                if !names.contains(&message.data.sender) {
                    names.push(message.data.sender.clone());
                }
            }
        }
        // Longest first, so "@ann marie" is found before "@ann".
        names.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        names
    }

    /// A typing signal from `name`; throttled and expiring (see [`super::presence`]).
    pub fn signal_typing(&self, present: &P, name: &str) -> SignalOutcome {
        let mut inner = self.lock();
        let outcome = inner.typing.signal(name, Instant::now());
        if outcome == SignalOutcome::Started {
            self.publish_typing(present, &inner);
        }
        outcome
    }

    /// Someone typing on another node (throttled there).
    pub(super) fn signal_remote_typing(&self, present: &P, name: &str) {
        let mut inner = self.lock();
        if inner.typing.signal_remote(name, Instant::now()) {
            self.publish_typing(present, &inner);
        }
    }

    pub(super) fn expire_typing(&self, present: &P, now: Instant) {
        let mut inner = self.lock();
        if !inner.typing.is_empty() && inner.typing.expire(now) {
            self.publish_typing(present, &inner);
        }
    }

    pub(super) fn publish_typing(&self, present: &P, inner: &RoomInner<P>) {
        let names = inner.typing.names();
        let shown = present.typing(&names);
        self.typing.send_replace(Arc::new(TypingView { names, shown }));
    }

    /// Shows who is here: the people of this node and, from `others`, of the other nodes.
    pub(super) fn publish_presence(&self, present: &P, inner: &RoomInner<P>, others: &Others) {
        let (names, count) = if others.names.is_empty() && others.unnamed == 0 {
            (inner.here.first(PRESENCE_SHOWN), inner.here.count())
        } else {
            let everyone: std::collections::BTreeSet<&str> =
                inner.here.names().chain(others.names.iter().map(String::as_str)).collect();
            let count = everyone.len() + others.unnamed;
            (everyone.into_iter().take(PRESENCE_SHOWN).collect(), count)
        };
        let current = self.presence.borrow().clone();
        let same_names = current.names.iter().map(String::as_str).eq(names.iter().copied());
        let more_changed = (count > names.len()) != (current.count > current.names.len());
        if current.count == count && same_names {
            return;
        }
        let view = if same_names && !more_changed {
            PresenceView { names: Arc::clone(&current.names), count, shown: Arc::clone(&current.shown) }
        } else {
            let shown = Arc::new(present.presence(&names, count));
            PresenceView { names: names.into_iter().map(str::to_owned).collect(), count, shown }
        };
        self.presence.send_replace(Arc::new(view));
    }

    /// Applies one event of this room: buffered while loading, skipped if already applied.
    /// `target` is the edited message as read from the store, once asked for.
    pub(super) fn apply(
        &self,
        present: &P,
        envelope: &Envelope<ChatEvent>,
        target: Option<Option<MessageData>>,
    ) -> Applied {
        let mut inner = self.lock();
        let inner = &mut *inner;
        if let ChatEvent::MessageSent(sent) = &envelope.event {
            // Sending ends "typing".
            if inner.typing.stop(&sent.sender) {
                self.publish_typing(present, inner);
            }
        }
        let window = match &mut inner.load {
            Load::Loading(buffer) => {
                buffer.push(envelope.clone());
                return Applied::Done;
            }
            Load::Failed => return Applied::Done,
            Load::Ready(window) => window,
        };
        if envelope.version.0 > window.head().version + 1 {
            return Applied::Gap;
        }
        match step(present, window, envelope, target) {
            Step::Done(Some(message)) => {
                // No receiver is not an error: nobody is watching the room.
                let _ = inner.updates.send(message);
                Applied::Done
            }
            Step::Done(None) => Applied::Done,
            Step::NeedsTarget(version) => Applied::NeedsTarget(version),
        }
    }

    /// Ends every view of the room: its channel closes (they reconnect and load it again).
    pub(super) fn close(&self) {
        let mut inner = self.lock();
        inner.load = Load::Failed;
        inner.updates = broadcast::channel(1).0;
        self.state.send_replace(LoadState::Failed);
    }

    pub(super) async fn wait_loaded(&self, timeout: Duration) -> Result<(), RoomError> {
        let mut state = self.state.subscribe();
        let loaded = tokio::time::timeout(timeout, state.wait_for(|s| *s != LoadState::Loading)).await;
        match loaded {
            Ok(Ok(state)) if *state == LoadState::Ready => Ok(()),
            Ok(_) => Err(RoomError::Store(StoreError::Unavailable("the room could not be loaded".into()))),
            Err(_) => Err(RoomError::LoadTimeout),
        }
    }
}

/// Keeps a name in a room's presence; leaving happens on drop.
pub struct PresenceGuard<P: Present> {
    pub(super) model: ChatReadModel<P>,
    pub(super) room: Arc<Room<P>>,
    pub(super) name: String,
}

impl<P: Present> std::fmt::Debug for PresenceGuard<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PresenceGuard").field("room", &self.room.id).field("name", &self.name).finish()
    }
}

impl<P: Present> Drop for PresenceGuard<P> {
    fn drop(&mut self) {
        let others = self.model.others(&self.room.id);
        {
            let mut inner = self.room.lock();
            inner.here.leave(&self.name);
            if inner.typing.stop(&self.name) {
                self.room.publish_typing(&self.model.inner.present, &inner);
            }
            self.room.publish_presence(&self.model.inner.present, &inner, &others);
        }
        self.model.presence_changed(&self.room.id);
        self.model.used(&self.room);
        self.model.touch();
    }
}

/// What [`step`] did.
pub(super) enum Step<M> {
    /// Applied (or already there); the new state of a message, if one changed.
    Done(Option<Shared<M>>),
    /// The event edits a message the window does not hold: read it from the store first.
    NeedsTarget(u64),
}

/// Applies one event of the room to `window` (skipped if the window has it already): a new
/// message, or the new state of the message an edit or delete is about. `target` is that
/// message as read from the store, once asked for (`Some(None)`: not found). The load path and
/// the live path both apply events through here.
pub(super) fn step<P: Present>(
    present: &P,
    window: &mut Window<P::Message>,
    envelope: &Envelope<ChatEvent>,
    target: Option<Option<MessageData>>,
) -> Step<P::Message> {
    let at = Revision { version: envelope.version.0, position: envelope.position };
    if at.version <= window.head().version {
        return Step::Done(None);
    }
    let state = match (&envelope.event, message::target_of(&envelope.event)) {
        (ChatEvent::MessageSent(sent), _) => Some(MessageData::sent(at, sent)),
        (event, Some(version)) => match (window.get(version), target) {
            (Some(known), _) => Some(known.data.changed(at, event)),
            (None, Some(loaded)) => loaded.map(|data| data.changed(at, event)),
            (None, None) => return Step::NeedsTarget(version),
        },
        (_, None) => None,
    };
    match state {
        Some(data) => {
            let message = Arc::new(Message { shown: present.message(&data), data });
            window.put(Arc::clone(&message));
            Step::Done(Some(message))
        }
        None => {
            window.advance(at);
            Step::Done(None)
        }
    }
}
