//! `ChatReadModel`: each room's messages in RAM, rebuilt from the store at start (the way the
//! original kept them in Mnesia RAM tables), fed by a handler runner in global order, and the
//! point that publishes each new message to the room's live views.
//!
//! Every message is rendered to HTML once, when the event is applied, and kept as the ready
//! websocket frame; every viewer of the room is sent the same shared bytes.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use axum::extract::ws::Utf8Bytes;
use cqrs_core::{Envelope, EventHandler, HandlerError, Position};
use tokio::sync::{broadcast, watch};

use crate::domain::{ChatEvent, ChatId, MessageSent};
use crate::live::protocol;
use crate::render;

/// The name of the read model's handler (and its in-memory checkpoint).
pub const HANDLER_NAME: &str = "chat-read-model";

/// Live updates buffered per room before a slow view is declared lagging and resyncs.
const ROOM_CHANNEL_CAPACITY: usize = 256;

/// One stored message: its position, its event, and its rendered frame.
#[derive(Debug)]
pub struct ChatMessage {
    /// The event's global position: the order of the log and the resume point of views.
    pub position: Position,
    /// The event.
    pub event: MessageSent,
    /// The `msg` frame: a header line, then the message's HTML.
    frame: Utf8Bytes,
    /// Where the HTML starts in `frame`.
    html_at: usize,
}

impl ChatMessage {
    fn new(position: Position, event: MessageSent) -> Self {
        let html = render::message(position.0, &event).into_string();
        let (frame, html_at) = protocol::message_frame(position, &html);
        Self { position, event, frame: frame.into(), html_at }
    }

    /// The message's HTML (`li.msg`).
    pub fn html(&self) -> &str {
        &self.frame.as_str()[self.html_at..]
    }

    /// The websocket frame announcing this message.
    pub fn frame(&self) -> Utf8Bytes {
        self.frame.clone()
    }
}

/// What a view that was away must be sent.
#[derive(Debug)]
pub enum CatchUp {
    /// Exactly the messages after its position, in order.
    Missed(Vec<Arc<ChatMessage>>),
    /// Too many to replay: the latest messages, to replace its list.
    Reset {
        /// The latest messages, oldest first.
        latest: Vec<Arc<ChatMessage>>,
        /// Whether older ones exist.
        has_more: bool,
    },
}

/// Who is in a room, as shown: the first names (sorted) rendered, and how many people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    /// The list fragment: the first [`render::PRESENCE_SHOWN`] names. In a big room it rarely
    /// changes when someone joins, so it is rarely re-sent.
    pub list: Arc<str>,
    /// How many distinct people are here.
    pub count: usize,
}

impl Presence {
    fn of(here: &BTreeMap<String, usize>) -> Self {
        let names: Vec<&str> = here.keys().take(render::PRESENCE_SHOWN).map(String::as_str).collect();
        Self { list: Arc::from(render::presence(&names, here.len()).into_string()), count: here.len() }
    }
}

/// One room: its messages, its live channel and who is here.
#[derive(Debug)]
pub struct Room {
    id: ChatId,
    inner: Mutex<RoomInner>,
    presence: watch::Sender<Presence>,
}

#[derive(Debug)]
struct RoomInner {
    messages: Vec<Arc<ChatMessage>>,
    updates: broadcast::Sender<Arc<ChatMessage>>,
    /// Name → number of connected views with that name, sorted by name.
    here: BTreeMap<String, usize>,
}

impl Room {
    fn new(id: ChatId) -> Self {
        let (updates, _) = broadcast::channel(ROOM_CHANNEL_CAPACITY);
        let here = BTreeMap::new();
        let (presence, _) = watch::channel(Presence::of(&here));
        Self { id, inner: Mutex::new(RoomInner { messages: Vec::new(), updates, here }), presence }
    }

    fn lock(&self) -> MutexGuard<'_, RoomInner> {
        // A panic while holding this lock cannot leave the vector half-written (push is
        // atomic from the outside), so a poisoned lock is still consistent.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The room's id.
    pub fn id(&self) -> &ChatId {
        &self.id
    }

    /// How many messages the room has.
    pub fn len(&self) -> usize {
        self.lock().messages.len()
    }

    /// Whether the room has no messages.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The latest `limit` messages, oldest first, and whether older ones exist.
    pub fn latest(&self, limit: usize) -> (Vec<Arc<ChatMessage>>, bool) {
        let inner = self.lock();
        let start = inner.messages.len().saturating_sub(limit);
        (inner.messages[start..].to_vec(), start > 0)
    }

    /// Up to `limit` messages just before `position`, oldest first, and whether older exist.
    pub fn before(&self, position: Position, limit: usize) -> (Vec<Arc<ChatMessage>>, bool) {
        let inner = self.lock();
        let end = inner.messages.partition_point(|m| m.position < position);
        let start = end.saturating_sub(limit);
        (inner.messages[start..end].to_vec(), start > 0)
    }

    /// What a view at `after` has missed, capped at `max_replay` messages.
    pub fn catch_up(&self, after: Position, max_replay: usize, reset_to: usize) -> CatchUp {
        catch_up(&self.lock(), after, max_replay, reset_to)
    }

    /// Subscribes a view at `after` to the room: what it missed, and the live channel, taken
    /// under one lock so that nothing falls between the two.
    pub fn subscribe(
        &self,
        after: Position,
        max_replay: usize,
        reset_to: usize,
    ) -> (CatchUp, broadcast::Receiver<Arc<ChatMessage>>) {
        let inner = self.lock();
        let receiver = inner.updates.subscribe();
        (catch_up(&inner, after, max_replay, reset_to), receiver)
    }

    /// Who is here, updated on every change.
    pub fn presence(&self) -> watch::Receiver<Presence> {
        self.presence.subscribe()
    }

    /// Counts `name` as here until the guard is dropped.
    pub fn enter(self: &Arc<Self>, name: &str) -> PresenceGuard {
        {
            let mut inner = self.lock();
            *inner.here.entry(name.to_owned()).or_default() += 1;
            self.publish_presence(&inner);
        }
        PresenceGuard { room: Arc::clone(self), name: name.to_owned() }
    }

    /// How many distinct people are here.
    pub fn viewers(&self) -> usize {
        self.lock().here.len()
    }

    fn publish_presence(&self, inner: &RoomInner) {
        let now = Presence::of(&inner.here);
        self.presence.send_if_modified(|current| {
            let changed = *current != now;
            if changed {
                *current = now;
            }
            changed
        });
    }

    /// Appends a message unless it is already here (delivery is at least once).
    fn apply(&self, position: Position, event: MessageSent) -> bool {
        let mut inner = self.lock();
        if inner.messages.last().is_some_and(|last| last.position >= position) {
            return false;
        }
        let message = Arc::new(ChatMessage::new(position, event));
        inner.messages.push(Arc::clone(&message));
        // No receiver is not an error: nobody is watching the room.
        let _ = inner.updates.send(message);
        true
    }
}

fn catch_up(inner: &RoomInner, after: Position, max_replay: usize, reset_to: usize) -> CatchUp {
    let start = inner.messages.partition_point(|m| m.position <= after);
    let missed = inner.messages.len() - start;
    if missed > max_replay {
        let start = inner.messages.len().saturating_sub(reset_to);
        CatchUp::Reset { latest: inner.messages[start..].to_vec(), has_more: start > 0 }
    } else {
        CatchUp::Missed(inner.messages[start..].to_vec())
    }
}

/// Keeps a name in a room's presence; leaving happens on drop.
#[derive(Debug)]
pub struct PresenceGuard {
    room: Arc<Room>,
    name: String,
}

impl Drop for PresenceGuard {
    fn drop(&mut self) {
        let mut inner = self.room.lock();
        if let Some(count) = inner.here.get_mut(&self.name) {
            *count -= 1;
            if *count == 0 {
                inner.here.remove(&self.name);
            }
        }
        self.room.publish_presence(&inner);
    }
}

/// A line of the lobby's room list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomSummary {
    /// The room.
    pub id: ChatId,
    /// Messages in it.
    pub messages: usize,
    /// People in it now.
    pub viewers: usize,
    /// Position of its latest message (recency).
    pub last_position: Position,
}

/// The read model: every room, in RAM. Cheap to clone; clones share the rooms.
#[derive(Debug, Clone)]
pub struct ChatReadModel {
    inner: Arc<ModelInner>,
}

#[derive(Debug)]
struct ModelInner {
    rooms: RwLock<HashMap<ChatId, Arc<Room>>>,
    position: AtomicU64,
    events: AtomicU64,
    /// Bumped on every applied message and presence change; the lobby re-renders on it.
    changes: watch::Sender<u64>,
}

impl Default for ChatReadModel {
    fn default() -> Self {
        Self::new()
    }
}

impl ChatReadModel {
    /// An empty model.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(ModelInner {
                rooms: RwLock::new(HashMap::new()),
                position: AtomicU64::new(0),
                events: AtomicU64::new(0),
                changes: watch::channel(0).0,
            }),
        }
    }

    /// The room, if it has ever had a message or a viewer.
    pub fn room(&self, id: &ChatId) -> Option<Arc<Room>> {
        self.inner.rooms.read().unwrap_or_else(|p| p.into_inner()).get(id).cloned()
    }

    /// The room, created empty if new (a view may wait in a room before its first message).
    pub fn room_or_create(&self, id: &ChatId) -> Arc<Room> {
        if let Some(room) = self.room(id) {
            return room;
        }
        let mut rooms = self.inner.rooms.write().unwrap_or_else(|p| p.into_inner());
        Arc::clone(rooms.entry(id.clone()).or_insert_with(|| Arc::new(Room::new(id.clone()))))
    }

    /// Enters `name` into the room `id` (created if new) and returns the room with the guard
    /// that keeps the name present. Safe against [`forget_if_unused`](Self::forget_if_unused)
    /// running at the same time: the returned room is the one in the model.
    pub fn enter(&self, id: &ChatId, name: &str) -> (Arc<Room>, PresenceGuard) {
        loop {
            let room = self.room_or_create(id);
            let guard = room.enter(name);
            if self.room(id).is_some_and(|current| Arc::ptr_eq(&current, &room)) {
                self.touch();
                return (room, guard);
            }
            // Forgotten between lookup and entry: try again with the current room.
        }
    }

    /// Drops a room that has no message and nobody in it, so that visiting made-up room names
    /// does not grow memory for ever.
    pub fn forget_if_unused(&self, id: &ChatId) {
        let mut rooms = self.inner.rooms.write().unwrap_or_else(|p| p.into_inner());
        let unused = rooms.get(id).is_some_and(|room| {
            let inner = room.lock();
            inner.messages.is_empty() && inner.here.is_empty()
        });
        if unused {
            rooms.remove(id);
        }
        drop(rooms);
        self.touch();
    }

    /// Rooms with messages or viewers, most recently active first, at most `limit`.
    pub fn rooms(&self, limit: usize) -> Vec<RoomSummary> {
        let rooms: Vec<Arc<Room>> =
            self.inner.rooms.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        let mut summaries: Vec<RoomSummary> = rooms
            .iter()
            .map(|room| {
                let inner = room.lock();
                RoomSummary {
                    id: room.id.clone(),
                    messages: inner.messages.len(),
                    viewers: inner.here.len(),
                    last_position: inner.messages.last().map_or(Position(0), |m| m.position),
                }
            })
            .filter(|summary| summary.messages > 0 || summary.viewers > 0)
            .collect();
        summaries.sort_by(|a, b| b.last_position.cmp(&a.last_position).then_with(|| a.id.cmp(&b.id)));
        summaries.truncate(limit);
        summaries
    }

    /// How many rooms exist.
    pub fn room_count(&self) -> usize {
        self.inner.rooms.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// The position of the last event applied.
    pub fn position(&self) -> Position {
        Position(self.inner.position.load(Ordering::Acquire))
    }

    /// Messages applied since start.
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

    /// Applies one event at `position`. Returns whether it was new.
    pub fn apply(&self, position: Position, event: &ChatEvent) -> bool {
        let ChatEvent::MessageSent(sent) = event;
        let applied = self.room_or_create(&sent.chat_id).apply(position, sent.clone());
        if applied {
            self.inner.events.fetch_add(1, Ordering::Relaxed);
            self.touch();
        }
        self.inner.position.fetch_max(position.0, Ordering::AcqRel);
        applied
    }
}

impl EventHandler for ChatReadModel {
    type Event = ChatEvent;

    fn name(&self) -> &str {
        HANDLER_NAME
    }

    async fn handle(&self, event: Envelope<ChatEvent>) -> Result<(), HandlerError> {
        self.apply(event.position, &event.event);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use cqrs_core::Timestamp;

    use super::*;

    fn sent(room: &str, content: &str) -> ChatEvent {
        ChatEvent::MessageSent(MessageSent {
            chat_id: ChatId::parse(room).expect("valid"),
            sender: "alice".into(),
            content: content.into(),
            sent_at: Timestamp(0),
        })
    }

    fn positions(messages: &[Arc<ChatMessage>]) -> Vec<u64> {
        messages.iter().map(|m| m.position.0).collect()
    }

    #[test]
    fn applies_in_order_and_ignores_redelivery() {
        let model = ChatReadModel::new();
        assert!(model.apply(Position(1), &sent("a", "one")));
        assert!(model.apply(Position(2), &sent("b", "other room")));
        assert!(model.apply(Position(3), &sent("a", "two")));
        assert!(!model.apply(Position(3), &sent("a", "two")), "a redelivered event is ignored");
        assert!(!model.apply(Position(1), &sent("a", "one")));
        let room = model.room(&ChatId::parse("a").expect("valid")).expect("room a");
        let (latest, more) = room.latest(100);
        assert_eq!(positions(&latest), [1, 3]);
        assert!(!more);
        assert_eq!(latest[1].event.content, "two");
        assert_eq!(model.position(), Position(3));
        assert_eq!(model.events(), 3);
    }

    #[test]
    fn pages_and_catch_up() {
        let model = ChatReadModel::new();
        for i in 1..=10 {
            model.apply(Position(i), &sent("a", &format!("m{i}")));
        }
        let room = model.room_or_create(&ChatId::parse("a").expect("valid"));
        let (latest, more) = room.latest(3);
        assert_eq!(positions(&latest), [8, 9, 10]);
        assert!(more);
        let (older, more) = room.before(Position(8), 5);
        assert_eq!(positions(&older), [3, 4, 5, 6, 7]);
        assert!(more);
        let (oldest, more) = room.before(Position(3), 5);
        assert_eq!(positions(&oldest), [1, 2]);
        assert!(!more);
        match room.catch_up(Position(7), 5, 2) {
            CatchUp::Missed(missed) => assert_eq!(positions(&missed), [8, 9, 10]),
            other => panic!("expected missed, got {other:?}"),
        }
        match room.catch_up(Position(2), 5, 2) {
            CatchUp::Reset { latest, has_more } => {
                assert_eq!(positions(&latest), [9, 10]);
                assert!(has_more);
            }
            other => panic!("expected reset, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn subscribers_get_new_messages_once_rendered() {
        let model = ChatReadModel::new();
        model.apply(Position(1), &sent("a", "before"));
        let room = model.room_or_create(&ChatId::parse("a").expect("valid"));
        let (catch_up, mut live) = room.subscribe(Position(0), 100, 100);
        assert!(matches!(catch_up, CatchUp::Missed(ref m) if m.len() == 1));
        model.apply(Position(2), &sent("a", "<b>live</b>"));
        let message = live.recv().await.expect("live message");
        assert_eq!(message.position, Position(2));
        assert!(message.html().contains("&lt;b&gt;live&lt;/b&gt;"));
        assert!(message.frame().as_str().ends_with(message.html()));
    }

    #[test]
    fn presence_counts_views_per_name() {
        let model = ChatReadModel::new();
        let room = model.room_or_create(&ChatId::parse("a").expect("valid"));
        let presence = room.presence();
        let first = room.enter("bob");
        let second = room.enter("bob");
        let _carol = room.enter("carol");
        assert_eq!(room.viewers(), 2);
        assert!(presence.borrow().list.contains("bob") && presence.borrow().list.contains("carol"));
        assert_eq!(presence.borrow().count, 2);
        drop(first);
        assert!(presence.borrow().list.contains("bob"), "bob still has a view open");
        drop(second);
        assert!(!presence.borrow().list.contains("bob"));
        assert_eq!(presence.borrow().count, 1);
        assert_eq!(model.rooms(10).len(), 1);
    }

    #[test]
    fn empty_rooms_are_forgotten_when_the_last_viewer_leaves() {
        let model = ChatReadModel::new();
        let id = ChatId::parse("made-up").expect("valid");
        let (_, guard) = model.enter(&id, "visitor");
        model.forget_if_unused(&id);
        assert!(model.room(&id).is_some(), "kept while someone is here");
        drop(guard);
        model.forget_if_unused(&id);
        assert!(model.room(&id).is_none(), "an empty room nobody is in is dropped");
        model.apply(Position(1), &sent("made-up", "now it has history"));
        let (_, guard) = model.enter(&id, "visitor");
        drop(guard);
        model.forget_if_unused(&id);
        assert_eq!(model.room(&id).map(|room| room.len()), Some(1), "a room with messages stays");
    }
}
