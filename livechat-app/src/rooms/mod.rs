//! `ChatReadModel`: the rooms people are using now, each with a bounded window of its latest
//! messages, fed by a handler runner in global order and loaded from the store on demand.
//!
//! Memory is a function of the rooms in use and their viewers, not of history:
//! - a room is *resident* from its first use (a page, a view) until it has had no viewer for
//!   [`RoomsConfig::idle_eviction`] (or, beyond [`RoomsConfig::max_resident`] resident rooms,
//!   the least recently used viewer-less one is evicted first);
//! - a resident room keeps a [`Window`] of its latest messages (count and byte bounds), its
//!   live channel, presence and typing; older pages are read from the store by version
//!   ([`history`]);
//! - the lobby is a bounded, recency-ordered set of rooms ([`RoomsConfig::lobby_rooms`]).
//!
//! No gap, no duplicate, between a room's load from the store and the live feed: the room is
//! put in the map as *loading* before the store is read, so every event the feed handles from
//! then on is buffered; the read covers everything committed before it; the buffer is then
//! applied, skipping versions the read already had. Events are applied in version order, and
//! one that skips a version closes the room (its views reconnect and reload).
//!
//! The model knows nothing of HTML or of the wire format: a [`Present`] implementation makes
//! the shown form of each message state once, and every reader shares it.

pub mod history;
pub mod message;
pub mod presence;
pub mod window;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use cqrs_core::{Envelope, EventHandler, EventStore, HandlerError, Position, StoreError, StreamId};
use tokio::sync::{broadcast, watch};

use crate::domain::{ChatEvent, ChatId};
pub use message::{Body, Message, MessageData, Revision, Shared};
use presence::{Here, SignalOutcome, Typing, PRESENCE_SHOWN};
pub use window::{CatchUp, Window, WindowLimits};

/// The name of the read model's handler (and its in-memory checkpoint).
pub const HANDLER_NAME: &str = "chat-read-model";

/// How readers get messages, presence and typing: made once per state and shared.
pub trait Present: Send + Sync + 'static {
    /// A message state as readers get it.
    type Message: Send + Sync + 'static;
    /// The presence list as readers get it.
    type Presence: Send + Sync + 'static;
    /// The typing names as readers get them.
    type Typing: Send + Sync + 'static;
    /// Shows one message state.
    fn message(&self, message: &MessageData) -> Self::Message;
    /// The size of a shown message in bytes, for pages and catch-ups bounded by bytes.
    fn weight(&self, message: &Message<Self::Message>) -> usize;
    /// Shows the first names of a room's presence; `count` people are there in all.
    fn presence(&self, names: &[&str], count: usize) -> Self::Presence;
    /// Shows who is typing.
    fn typing(&self, names: &[String]) -> Self::Typing;
}

/// A room's presence as readers get it. A change of the head count alone shares the names
/// and the shown list with the previous view (a join into a big room allocates a few bytes,
/// however many views still hold the previous one).
#[derive(Debug)]
pub struct PresenceView<T> {
    /// The first names, sorted.
    pub names: Arc<[String]>,
    /// How many people.
    pub count: usize,
    /// The shown list.
    pub shown: Arc<T>,
}

/// Who is typing in a room, as readers get it.
#[derive(Debug)]
pub struct TypingView<T> {
    /// The names, sorted.
    pub names: Vec<String>,
    /// The shown form.
    pub shown: T,
}

/// Bounds of the read model.
#[derive(Debug, Clone)]
pub struct RoomsConfig {
    /// Each resident room's window.
    pub window: WindowLimits,
    /// Live updates buffered per room before a slow view is declared lagging and resyncs.
    pub channel_capacity: usize,
    /// A room without viewers is evicted after this long unused.
    pub idle_eviction: Duration,
    /// Resident rooms beyond which viewer-less ones are evicted at once, least recent first.
    pub max_resident: usize,
    /// Rooms the lobby remembers (most recently active first).
    pub lobby_rooms: usize,
    /// Longest wait for a room to load from the store.
    pub load_timeout: Duration,
}

impl Default for RoomsConfig {
    fn default() -> Self {
        Self {
            window: WindowLimits { messages: 200, bytes: 1024 * 1024 },
            channel_capacity: 256,
            idle_eviction: Duration::from_secs(60),
            max_resident: 1_000,
            lobby_rooms: 100,
            load_timeout: Duration::from_secs(10),
        }
    }
}

/// Why a room cannot be had now.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RoomError {
    /// The live feed has not reached the store's head as of startup yet. Retry shortly (a 503).
    #[error("the chat is rebuilding its read model; try again in a moment")]
    Rebuilding,
    /// The store could not be read. Retry later (a 503).
    #[error("the room could not be read from the store: {0}")]
    Store(#[from] StoreError),
    /// Loading took longer than [`RoomsConfig::load_timeout`]. Retry later (a 503).
    #[error("the room took too long to load")]
    LoadTimeout,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LoadState {
    Loading,
    Ready,
    Failed,
}

enum Load<M> {
    /// Being read from the store; the feed's events for it wait here.
    Loading(Vec<Envelope<ChatEvent>>),
    Ready(Window<M>),
    Failed,
}

struct RoomInner<P: Present> {
    load: Load<P::Message>,
    updates: broadcast::Sender<Shared<P::Message>>,
    here: Here,
    typing: Typing,
}

/// One resident room: its window, live channel, presence and typing.
pub struct Room<P: Present> {
    id: ChatId,
    stream: StreamId,
    inner: Mutex<RoomInner<P>>,
    state: watch::Sender<LoadState>,
    presence: watch::Sender<Arc<PresenceView<P::Presence>>>,
    typing: watch::Sender<Arc<TypingView<P::Typing>>>,
    /// Milliseconds since the model started, at the last use: the eviction clock.
    last_used: AtomicU64,
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
enum Applied {
    Done,
    /// The event edits a message the window does not hold: read it from the store first.
    NeedsTarget(u64),
    /// The event skips versions: the room must be reloaded.
    Gap,
}

impl<P: Present> Room<P> {
    fn new(id: ChatId, present: &P, channel_capacity: usize) -> Self {
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

    fn lock(&self) -> MutexGuard<'_, RoomInner<P>> {
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

    /// A typing signal from `name`; throttled and expiring (see [`presence`]).
    pub fn signal_typing(&self, present: &P, name: &str) -> SignalOutcome {
        let mut inner = self.lock();
        let outcome = inner.typing.signal(name, Instant::now());
        if outcome == SignalOutcome::Started {
            self.publish_typing(present, &inner);
        }
        outcome
    }

    fn expire_typing(&self, present: &P, now: Instant) {
        let mut inner = self.lock();
        if !inner.typing.is_empty() && inner.typing.expire(now) {
            self.publish_typing(present, &inner);
        }
    }

    fn publish_typing(&self, present: &P, inner: &RoomInner<P>) {
        let names = inner.typing.names();
        let shown = present.typing(&names);
        self.typing.send_replace(Arc::new(TypingView { names, shown }));
    }

    fn publish_presence(&self, present: &P, inner: &RoomInner<P>) {
        let names = inner.here.first(PRESENCE_SHOWN);
        let count = inner.here.count();
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
    fn apply(&self, present: &P, envelope: &Envelope<ChatEvent>, target: Option<Option<MessageData>>) -> Applied {
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
    fn close(&self) {
        let mut inner = self.lock();
        inner.load = Load::Failed;
        inner.updates = broadcast::channel(1).0;
        self.state.send_replace(LoadState::Failed);
    }

    async fn wait_loaded(&self, timeout: Duration) -> Result<(), RoomError> {
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
    model: ChatReadModel<P>,
    room: Arc<Room<P>>,
    name: String,
}

impl<P: Present> std::fmt::Debug for PresenceGuard<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PresenceGuard").field("room", &self.room.id).field("name", &self.name).finish()
    }
}

impl<P: Present> Drop for PresenceGuard<P> {
    fn drop(&mut self) {
        {
            let mut inner = self.room.lock();
            inner.here.leave(&self.name);
            if inner.typing.stop(&self.name) {
                self.room.publish_typing(&self.model.inner.present, &inner);
            }
            self.room.publish_presence(&self.model.inner.present, &inner);
        }
        self.model.used(&self.room);
        self.model.touch();
    }
}

/// A line of the lobby's room list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomSummary {
    /// The room.
    pub id: ChatId,
    /// Messages posted in it.
    pub messages: u64,
    /// People in it now.
    pub viewers: usize,
}

/// The lobby's rooms: a bounded set ordered by recency of activity.
#[derive(Debug, Default)]
struct Lobby {
    messages: HashMap<ChatId, (u64, u64)>,
    order: BTreeSet<(u64, ChatId)>,
    next_activity: u64,
}

impl Lobby {
    fn touch(&mut self, id: &ChatId, messages: Option<u64>, capacity: usize) {
        self.next_activity += 1;
        let activity = self.next_activity;
        let previous = self.messages.insert(id.clone(), (messages.unwrap_or(0), activity));
        if let Some((count, old)) = previous {
            self.order.remove(&(old, id.clone()));
            if messages.is_none() {
                self.messages.insert(id.clone(), (count, activity));
            }
        }
        self.order.insert((activity, id.clone()));
        while self.order.len() > capacity.max(1) {
            let Some(oldest) = self.order.pop_first() else { break };
            self.messages.remove(&oldest.1);
        }
    }
}

struct ModelInner<P: Present> {
    store: Arc<dyn EventStore>,
    present: P,
    config: RoomsConfig,
    rooms: RwLock<HashMap<ChatId, Arc<Room<P>>>>,
    lobby: Mutex<Lobby>,
    ready: watch::Sender<bool>,
    position: AtomicU64,
    events: AtomicU64,
    evicted: AtomicU64,
    loads: AtomicU64,
    epoch: Instant,
    /// Bumped on every applied message and presence change; the lobby re-renders on it.
    changes: watch::Sender<u64>,
}

/// The read model. Cheap to clone; clones share the rooms.
pub struct ChatReadModel<P: Present> {
    inner: Arc<ModelInner<P>>,
}

impl<P: Present> Clone for ChatReadModel<P> {
    fn clone(&self) -> Self {
        Self { inner: Arc::clone(&self.inner) }
    }
}

impl<P: Present> std::fmt::Debug for ChatReadModel<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatReadModel").field("resident", &self.resident_rooms()).finish()
    }
}

impl<P: Present> ChatReadModel<P> {
    /// An empty model over `store`; rooms load from it on first use.
    pub fn new(store: Arc<dyn EventStore>, present: P, config: RoomsConfig) -> Self {
        Self {
            inner: Arc::new(ModelInner {
                store,
                present,
                config,
                rooms: RwLock::new(HashMap::new()),
                lobby: Mutex::new(Lobby::default()),
                ready: watch::channel(false).0,
                position: AtomicU64::new(0),
                events: AtomicU64::new(0),
                evicted: AtomicU64::new(0),
                loads: AtomicU64::new(0),
                epoch: Instant::now(),
                changes: watch::channel(0).0,
            }),
        }
    }

    /// The presenter.
    pub fn present(&self) -> &P {
        &self.inner.present
    }

    /// The bounds.
    pub fn config(&self) -> &RoomsConfig {
        &self.inner.config
    }

    /// Marks the live feed as having reached the store's head as of startup: rooms may load.
    pub fn mark_ready(&self) {
        self.inner.ready.send_replace(true);
    }

    /// Turns true when the live feed has reached the store's head as of startup.
    pub fn ready(&self) -> watch::Receiver<bool> {
        self.inner.ready.subscribe()
    }

    /// Whether the live feed has reached the store's head as of startup.
    pub fn is_ready(&self) -> bool {
        *self.inner.ready.borrow()
    }

    fn resident(&self, id: &ChatId) -> Option<Arc<Room<P>>> {
        self.inner.rooms.read().unwrap_or_else(|p| p.into_inner()).get(id).cloned()
    }

    fn used(&self, room: &Room<P>) {
        let now = u64::try_from(self.inner.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        room.last_used.store(now, Ordering::Relaxed);
    }

    /// The room, loaded from the store if it is not resident. Refused while the model is
    /// rebuilding.
    pub async fn room(&self, id: &ChatId) -> Result<Arc<Room<P>>, RoomError> {
        if !self.is_ready() {
            return Err(RoomError::Rebuilding);
        }
        let room = {
            let existing = self.resident(id);
            match existing {
                Some(room) => room,
                None => {
                    let mut rooms = self.inner.rooms.write().unwrap_or_else(|p| p.into_inner());
                    match rooms.get(id) {
                        Some(room) => Arc::clone(room),
                        None => {
                            let room = Arc::new(Room::new(
                                id.clone(),
                                &self.inner.present,
                                self.inner.config.channel_capacity,
                            ));
                            rooms.insert(id.clone(), Arc::clone(&room));
                            // The load runs on its own, so a request that gives up cannot leave the
                            // room loading for ever.
                            tokio::spawn(self.clone().load(Arc::clone(&room)));
                            room
                        }
                    }
                }
            }
        };
        self.used(&room);
        room.wait_loaded(self.inner.config.load_timeout).await?;
        Ok(room)
    }

    /// Enters `name` into the room `id` and returns the room with the guard that keeps the
    /// name present. The returned room is the one in the model, even if it was evicted while
    /// entering.
    pub async fn enter(&self, id: &ChatId, name: &str) -> Result<(Arc<Room<P>>, PresenceGuard<P>), RoomError> {
        loop {
            let room = self.room(id).await?;
            {
                let mut inner = room.lock();
                inner.here.enter(name);
                room.publish_presence(&self.inner.present, &inner);
            }
            let guard = PresenceGuard { model: self.clone(), room: Arc::clone(&room), name: name.to_owned() };
            if self.resident(id).is_some_and(|current| Arc::ptr_eq(&current, &room)) {
                self.lobby_touch(id, None);
                return Ok((room, guard));
            }
            // Evicted between load and entry: try again with the current room.
        }
    }

    async fn load(self, room: Arc<Room<P>>) {
        self.inner.loads.fetch_add(1, Ordering::Relaxed);
        match self.read_window(&room).await {
            Ok(mut window) => {
                // Events the feed handled while the store was read wait in the buffer; those the
                // read already had are skipped by version. The buffer is drained until it is
                // empty under the lock, and the window is put in place under that same lock, so
                // nothing the feed hands over in between is lost.
                loop {
                    let batch = {
                        let mut inner = room.lock();
                        match &mut inner.load {
                            Load::Loading(buffer) if buffer.is_empty() => {
                                inner.load = Load::Ready(window);
                                break;
                            }
                            Load::Loading(buffer) => std::mem::take(buffer),
                            _ => return,
                        }
                    };
                    for event in batch {
                        let mut target = None;
                        while let Step::NeedsTarget(version) =
                            step(&self.inner.present, &mut window, &event, target.take())
                        {
                            match history::message(&*self.inner.store, &room.stream, version).await {
                                Ok(found) => target = Some(found),
                                Err(error) => return self.load_failed(&room, &error),
                            }
                        }
                    }
                }
                room.state.send_replace(LoadState::Ready);
                self.enforce_resident_cap();
            }
            Err(error) => self.load_failed(&room, &error),
        }
    }

    fn load_failed(&self, room: &Arc<Room<P>>, error: &StoreError) {
        tracing::warn!(room = %room.id, %error, "loading the room failed");
        self.remove(room);
        room.close();
    }

    async fn read_window(&self, room: &Room<P>) -> Result<Window<P::Message>, StoreError> {
        let limits = self.inner.config.window;
        let store = &*self.inner.store;
        let tail = history::tail(store, &room.stream, limits.messages, limits.messages as u64 * 4 + 64).await?;
        let head = tail.events.last().map_or(tail.base, |e| Revision { version: e.version.0, position: e.position });
        let mut window = Window::new(tail.base, tail.base, limits);
        let (messages, outside) = history::fold(&tail.events);
        for data in messages {
            window.put(Arc::new(Message { shown: self.inner.present.message(&data), data }));
        }
        for (target, at, event) in outside {
            let base = match window.get(target) {
                Some(known) => Some(known.data.clone()),
                None => history::message(store, &room.stream, target).await?,
            };
            if let Some(data) = base.map(|b| b.changed(at, &event)) {
                window.put(Arc::new(Message { shown: self.inner.present.message(&data), data }));
            }
        }
        window.advance(head);
        Ok(window)
    }

    fn remove(&self, room: &Arc<Room<P>>) -> bool {
        let mut rooms = self.inner.rooms.write().unwrap_or_else(|p| p.into_inner());
        if rooms.get(&room.id).is_some_and(|current| Arc::ptr_eq(current, room)) {
            rooms.remove(&room.id);
            return true;
        }
        false
    }

    /// Evicts viewer-less rooms unused for [`RoomsConfig::idle_eviction`], and expires typing
    /// signals. Called by the app's ticker.
    pub fn sweep(&self) {
        let now_ms = u64::try_from(self.inner.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        let idle_ms = u64::try_from(self.inner.config.idle_eviction.as_millis()).unwrap_or(u64::MAX);
        let rooms: Vec<Arc<Room<P>>> =
            self.inner.rooms.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        let now = Instant::now();
        for room in rooms {
            room.expire_typing(&self.inner.present, now);
            let idle = now_ms.saturating_sub(room.last_used.load(Ordering::Relaxed)) >= idle_ms;
            if idle && self.evictable(&room) && self.remove(&room) {
                self.inner.evicted.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn evictable(&self, room: &Room<P>) -> bool {
        let inner = room.lock();
        inner.here.count() == 0 && matches!(inner.load, Load::Ready(_) | Load::Failed)
    }

    fn enforce_resident_cap(&self) {
        let max = self.inner.config.max_resident;
        if self.resident_rooms() <= max {
            return;
        }
        let mut rooms: Vec<Arc<Room<P>>> =
            self.inner.rooms.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        rooms.sort_by_key(|room| room.last_used.load(Ordering::Relaxed));
        let mut excess = rooms.len().saturating_sub(max);
        for room in rooms {
            if excess == 0 {
                break;
            }
            if self.evictable(&room) && self.remove(&room) {
                self.inner.evicted.fetch_add(1, Ordering::Relaxed);
                excess -= 1;
            }
        }
    }

    fn lobby_touch(&self, id: &ChatId, messages: Option<u64>) {
        let capacity = self.inner.config.lobby_rooms;
        self.inner.lobby.lock().unwrap_or_else(|p| p.into_inner()).touch(id, messages, capacity);
        self.touch();
    }

    /// Remembers, for the lobby, that `id` had its message number `messages` (the lobby's
    /// start-up fill from the log's tail).
    pub fn remember_room(&self, id: &ChatId, messages: u64) {
        self.lobby_touch(id, Some(messages));
    }

    /// The most recently active rooms with messages or viewers, at most `limit`: the cost
    /// depends on the lobby's bound, not on how many rooms were ever created.
    pub fn rooms(&self, limit: usize) -> Vec<RoomSummary> {
        let entries: Vec<(ChatId, u64)> = {
            let lobby = self.inner.lobby.lock().unwrap_or_else(|p| p.into_inner());
            lobby.order.iter().rev().map(|(_, id)| (id.clone(), lobby.messages.get(id).map_or(0, |e| e.0))).collect()
        };
        entries
            .into_iter()
            .map(|(id, messages)| {
                let viewers = self.resident(&id).map_or(0, |room| room.viewers());
                RoomSummary { id, messages, viewers }
            })
            .filter(|summary| summary.messages > 0 || summary.viewers > 0)
            .take(limit)
            .collect()
    }

    /// How many rooms are resident (in memory) now.
    pub fn resident_rooms(&self) -> usize {
        self.inner.rooms.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Rooms evicted since start.
    pub fn evicted_rooms(&self) -> u64 {
        self.inner.evicted.load(Ordering::Relaxed)
    }

    /// Rooms loaded from the store since start.
    pub fn loaded_rooms(&self) -> u64 {
        self.inner.loads.load(Ordering::Relaxed)
    }

    /// Messages held in the windows of every resident room.
    pub fn window_messages(&self) -> usize {
        let rooms: Vec<Arc<Room<P>>> =
            self.inner.rooms.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        rooms.iter().map(|room| room.window_len()).sum()
    }

    /// The position of the last event applied.
    pub fn position(&self) -> Position {
        Position(self.inner.position.load(Ordering::Acquire))
    }

    /// Events handled since start.
    pub fn events(&self) -> u64 {
        self.inner.events.load(Ordering::Relaxed)
    }

    /// Changes whenever a message is applied or presence changes somewhere.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// Marks the model changed (presence moved), for the lobby.
    pub fn touch(&self) {
        self.inner.changes.send_modify(|n| *n += 1);
    }

    /// The store the model reads rooms from.
    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.inner.store
    }

    /// A page of up to `limit` messages before position `before`, oldest first, as they are
    /// now, and whether older ones exist: from the window when it holds the page, else from
    /// the store (`version` is the client's hint of the version at `before`; it saves a search).
    pub async fn before(
        &self,
        id: &ChatId,
        before: Position,
        version: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<Shared<P::Message>>, bool), RoomError> {
        let room = self.room(id).await?;
        if let Some(page) = room.before_in_window(before, limit) {
            return Ok(page);
        }
        let store = &*self.inner.store;
        let end = match version {
            // The hint comes from the client: never past the stream's end.
            Some(hint) => hint.min(store.stream_version(&room.stream).await?.0 + 1),
            None => history::version_before(store, &room.stream, before).await? + 1,
        };
        let (messages, has_more) = history::page_before(store, &room.stream, end, limit).await?;
        let page = messages
            .into_iter()
            .filter(|m| m.sent.position < before)
            .map(|data| Arc::new(Message { shown: self.inner.present.message(&data), data }))
            .collect();
        Ok((page, has_more))
    }

    /// Applies one event from the feed (delivery is at least once; repeats are skipped).
    pub async fn apply(&self, envelope: &Envelope<ChatEvent>) -> Result<(), StoreError> {
        self.inner.position.fetch_max(envelope.position.0, Ordering::AcqRel);
        self.inner.events.fetch_add(1, Ordering::Relaxed);
        let id = envelope.event.chat_id().clone();
        if let ChatEvent::MessageSent(sent) = &envelope.event {
            let number = if sent.number > 0 { sent.number } else { envelope.version.0 };
            self.lobby_touch(&id, Some(number));
        }
        let Some(room) = self.resident(&id) else { return Ok(()) };
        let mut target = None;
        loop {
            match room.apply(&self.inner.present, envelope, target.take()) {
                Applied::Done => return Ok(()),
                Applied::NeedsTarget(version) => {
                    target = Some(history::message(&*self.inner.store, &room.stream, version).await?);
                }
                Applied::Gap => {
                    tracing::warn!(room = %id, version = envelope.version.0, "a gap in the room's events; reloading it");
                    self.remove(&room);
                    room.close();
                    return Ok(());
                }
            }
        }
    }
}

/// What [`step`] did.
enum Step<M> {
    /// Applied (or already there); the new state of a message, if one changed.
    Done(Option<Shared<M>>),
    /// The event edits a message the window does not hold: read it from the store first.
    NeedsTarget(u64),
}

/// Applies one event of the room to `window` (skipped if the window has it already): a new
/// message, or the new state of the message an edit or delete is about. `target` is that
/// message as read from the store, once asked for (`Some(None)`: not found). The load path and
/// the live path both apply events through here.
fn step<P: Present>(
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

impl<P: Present> EventHandler for ChatReadModel<P> {
    type Event = ChatEvent;

    fn name(&self) -> &str {
        HANDLER_NAME
    }

    async fn handle(&self, event: Envelope<ChatEvent>) -> Result<(), HandlerError> {
        self.apply(&event).await.map_err(|error| HandlerError::new(error.to_string()))
    }
}
