//! Reading a room from the store by stream version: its latest events (to fill a window),
//! a page of older messages with their later edits folded in, one message, and which version
//! a global position falls after. The store is the truth; nothing here is cached.

use std::collections::HashMap;

use cqrs_core::{Envelope, EventStore, Position, Query, QueryItem, StoreError, StreamId, Upcasters, Version};

use super::message::{target_of, MessageData, Revision};
use crate::domain::{reaction_tag, ChatEvent, ChatId, MAX_EDIT_DISTANCE};

/// Events read per store call when walking a stream backwards.
const CHUNK: u64 = 128;

/// A room's events read from the store, in version order.
#[derive(Debug)]
pub struct Tail {
    /// The event just before `events` (`Revision::default()` when they start the stream).
    pub base: Revision,
    /// The events.
    pub events: Vec<Envelope<ChatEvent>>,
}

fn decode(recorded: &cqrs_core::RecordedEvent) -> Result<Envelope<ChatEvent>, StoreError> {
    Upcasters::new().decode::<ChatEvent>(recorded).map_err(|error| StoreError::Corrupt(error.to_string()))
}

async fn read(
    store: &dyn EventStore,
    stream: &StreamId,
    from: u64,
    count: u64,
) -> Result<Vec<Envelope<ChatEvent>>, StoreError> {
    let count = usize::try_from(count).unwrap_or(usize::MAX);
    store.read_stream(stream, Version(from.max(1)), count).await?.iter().map(decode).collect()
}

/// The room's latest events: back from the end until they hold `messages` messages (or
/// `max_events` events, or the stream's start), and the event before them.
pub async fn tail(
    store: &dyn EventStore,
    stream: &StreamId,
    messages: usize,
    max_events: u64,
) -> Result<Tail, StoreError> {
    let end = store.stream_version(stream).await?.0;
    let mut start = end + 1;
    let mut events: Vec<Envelope<ChatEvent>> = Vec::new();
    let mut found = 0;
    while start > 1 && found < messages && (end + 1 - start) < max_events {
        let from = start.saturating_sub(CHUNK).max(1);
        let mut chunk = read(store, stream, from, start - from).await?;
        found += chunk.iter().filter(|e| matches!(e.event, ChatEvent::MessageSent(_))).count();
        chunk.append(&mut events);
        events = chunk;
        start = from;
    }
    // Drop whole messages beyond the count from the front; the last dropped event is the base.
    let mut base = Revision::default();
    if start > 1 {
        let before = read(store, stream, start - 1, 1).await?;
        base = before.first().map_or(base, |e| Revision { version: e.version.0, position: e.position });
    }
    let excess = found.saturating_sub(messages);
    if excess > 0 {
        let mut seen = 0;
        let cut = events
            .iter()
            .position(|e| {
                if matches!(e.event, ChatEvent::MessageSent(_)) {
                    seen += 1;
                }
                seen > excess
            })
            .unwrap_or(0);
        if let Some(last_dropped) = cut.checked_sub(1).and_then(|i| events.get(i)) {
            base = Revision { version: last_dropped.version.0, position: last_dropped.position };
        }
        events.drain(..cut);
    }
    Ok(Tail { base, events })
}

/// Folds events into messages: each `MessageSent` among them with its later edits and
/// deletes, in version order; and the edits and deletes of messages before them, by target.
pub fn fold(events: &[Envelope<ChatEvent>]) -> (Vec<MessageData>, Vec<(u64, Revision, ChatEvent)>) {
    let mut messages: Vec<MessageData> = Vec::new();
    let mut index: HashMap<u64, usize> = HashMap::new();
    let mut outside = Vec::new();
    for envelope in events {
        let at = Revision { version: envelope.version.0, position: envelope.position };
        match (&envelope.event, target_of(&envelope.event)) {
            (ChatEvent::MessageSent(sent), _) => {
                index.insert(at.version, messages.len());
                messages.push(MessageData::sent(at, sent));
            }
            (event, Some(target)) => match index.get(&target) {
                Some(&i) => messages[i] = messages[i].changed(at, event),
                None => outside.push((target, at, event.clone())),
            },
            (_, None) => {}
        }
    }
    (messages, outside)
}

/// The message `version` of the room as it was just before stream version `before`: its
/// edits and delete (at most [`MAX_EDIT_DISTANCE`] events after it) and its reactions (found by
/// their tag, however far) folded in; `None` if `version` is not a message.
pub async fn message(
    store: &dyn EventStore,
    stream: &StreamId,
    version: u64,
    before: u64,
) -> Result<Option<MessageData>, StoreError> {
    let event = read(store, stream, version, 1).await?;
    let Some(sent) = event.into_iter().find(|e| e.version.0 == version && matches!(e.event, ChatEvent::MessageSent(_)))
    else {
        return Ok(None);
    };
    let edits_until = before.min(version.saturating_add(MAX_EDIT_DISTANCE));
    let mut events = vec![sent];
    if edits_until > version + 1 {
        events.extend(read(store, stream, version + 1, edits_until - version - 1).await?);
    }
    let reactions = reactions_of(store, stream, &[version]).await?;
    events.extend(reactions.into_iter().filter(|e| e.version.0 >= edits_until && e.version.0 < before));
    events.sort_by_key(|e| e.version);
    let (messages, _) = fold(&events);
    Ok(messages.into_iter().find(|m| m.sent.version == version))
}

/// Every reaction event of messages `versions` of the room, by their tags, in version order.
pub async fn reactions_of(
    store: &dyn EventStore,
    stream: &StreamId,
    versions: &[u64],
) -> Result<Vec<Envelope<ChatEvent>>, StoreError> {
    let Some(chat_id) = ChatId::from_stream(stream) else { return Ok(Vec::new()) };
    let mut found = Vec::new();
    for versions in versions.chunks(cqrs_core::store::MAX_QUERY_ITEMS) {
        let query = Query::from_items(
            versions.iter().map(|&version| QueryItem::tags([reaction_tag(&chat_id, version)])).collect::<Vec<_>>(),
        );
        let mut after = Position::START;
        loop {
            let page = store.read_query(&query, after, 512).await?;
            let Some(last) = page.last() else { break };
            after = last.position;
            for recorded in page.iter().filter(|recorded| recorded.stream_id == *stream) {
                found.push(decode(recorded)?);
            }
        }
    }
    found.sort_by_key(|e| e.version);
    Ok(found)
}

/// Up to `limit` messages before version `before` (exclusive), oldest first, as they are now
/// (every edit and delete folded in), and whether older ones exist.
///
/// Edits of a message come at most [`MAX_EDIT_DISTANCE`] events after it (the aggregate's
/// rule), so the page's edits are all in the events up to that far past its last message;
/// reactions further on are read by their tags ([`reactions_of`]).
pub async fn page_before(
    store: &dyn EventStore,
    stream: &StreamId,
    before: u64,
    limit: usize,
) -> Result<(Vec<MessageData>, bool), StoreError> {
    let mut start = before;
    let mut events: Vec<Envelope<ChatEvent>> = Vec::new();
    let mut found = 0;
    while start > 1 && found < limit {
        let from = start.saturating_sub(CHUNK).max(1);
        let mut chunk = read(store, stream, from, start - from).await?;
        found += chunk.iter().filter(|e| matches!(e.event, ChatEvent::MessageSent(_))).count();
        chunk.append(&mut events);
        events = chunk;
        start = from;
    }
    let mut later = read(store, stream, before, MAX_EDIT_DISTANCE + limit as u64).await?;
    events.append(&mut later);
    // Reactions may come any time after their message: those past the events read, by tag.
    let read_to = events.last().map_or(0, |e| e.version.0);
    let sent: Vec<u64> = events
        .iter()
        .filter(|e| e.version.0 < before && matches!(e.event, ChatEvent::MessageSent(_)))
        .map(|e| e.version.0)
        .collect();
    let sent = &sent[sent.len().saturating_sub(limit + 1)..];
    events.extend(reactions_of(store, stream, sent).await?.into_iter().filter(|e| e.version.0 > read_to));
    let (messages, _) = fold(&events);
    let mut page: Vec<MessageData> = messages.into_iter().filter(|m| m.sent.version < before).collect();
    let has_more = page.len() > limit || start > 1;
    let excess = page.len().saturating_sub(limit);
    page.drain(..excess);
    Ok((page, has_more))
}

/// The version of the room's last event before global position `before` (0 if none), found
/// by bisection over single-event reads (positions grow with versions within a stream).
pub async fn version_before(store: &dyn EventStore, stream: &StreamId, before: Position) -> Result<u64, StoreError> {
    let (mut low, mut high) = (0u64, store.stream_version(stream).await?.0);
    // Invariant: position(low) < before (or low = 0); position(v) >= before for v > high.
    while low < high {
        let middle = low + (high - low).div_ceil(2);
        let event = store.read_stream(stream, Version(middle), 1).await?;
        match event.first() {
            Some(event) if event.position < before => low = middle,
            _ => high = middle - 1,
        }
    }
    Ok(low)
}
