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

mod cluster;
pub mod history;
mod lobby;
pub mod message;
pub mod presence;
mod room;
pub mod window;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use cqrs_core::{Envelope, EventHandler, EventStore, HandlerError, Position, StoreError};
use tokio::sync::watch;

use crate::domain::{ChatEvent, ChatId};
pub use cluster::{LocalPresence, ANNOUNCED_NAMES, NODE_TIMEOUT};
use lobby::Lobby;
pub use lobby::RoomSummary;
pub use message::{Body, Message, MessageData, Revision, Shared};
use room::{step, Applied, Load, LoadState, Step};
pub use room::{PresenceGuard, Room, Subscribed};
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
    /// The other nodes' presence, and what to tell them.
    cluster: cluster::Cluster,
    /// Whether this process is part of a cluster (see [`ChatReadModel::announce_to_cluster`]).
    clustered: AtomicBool,
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
                cluster: cluster::Cluster::default(),
                clustered: AtomicBool::new(false),
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
            let others = self.others(id);
            {
                let mut inner = room.lock();
                inner.here.enter(name);
                room.publish_presence(&self.inner.present, &inner, &others);
            }
            self.presence_changed(id);
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
                            let before = event.version.0;
                            match history::message(&*self.inner.store, &room.stream, version, before).await {
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
                None => history::message(store, &room.stream, target, at.version).await?,
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

    /// Puts `id` in the lobby if it is not there yet (a room known only by its people on
    /// other nodes), without moving it if it is.
    fn lobby_list(&self, id: &ChatId) {
        let known = self.inner.lobby.lock().unwrap_or_else(|p| p.into_inner()).messages.contains_key(id);
        if !known {
            self.lobby_touch(id, None);
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
                // Everyone in the room on every node: this node's people and the others'.
                let others = self.inner.cluster.others(&id);
                let viewers = match self.resident(&id) {
                    Some(room) => room.viewers_with(&others),
                    None => others.names.len() + others.unnamed,
                };
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
                    let before = envelope.version.0;
                    target = Some(history::message(&*self.inner.store, &room.stream, version, before).await?);
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

impl<P: Present> EventHandler for ChatReadModel<P> {
    type Event = ChatEvent;

    fn name(&self) -> &str {
        HANDLER_NAME
    }

    async fn handle(&self, event: Envelope<ChatEvent>) -> Result<(), HandlerError> {
        self.apply(&event).await.map_err(|error| HandlerError::new(error.to_string()))
    }
}
