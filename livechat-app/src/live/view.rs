//! One task per connected view: it holds the view's state (which room, who, the room version
//! of the last change it forwarded), reads the browser's frames, and pushes only what changed.
//!
//! Never buffers without bound: live changes come from the room's bounded broadcast channel;
//! a view that falls behind (slow socket) resyncs from its own version through the room's
//! window (or is reset to the latest page, bounded in bytes), and a socket that does not take
//! a frame within [`LiveConfig::send_timeout`](super::LiveConfig::send_timeout) is closed (the browser reconnects and resumes
//! from what it has).

use std::sync::Arc;
use std::time::{Duration, Instant};

use cqrs_core::{Consistency, Position};
use tokio::sync::{broadcast, watch};
use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::present::LiveShared;
use super::protocol::{self, AckStatus, ClientFrame, ViewKind};
use super::socket::{Conn, End, Stream};
use crate::commands::{Outcome, RoomFacts, Sender};
use crate::domain::{validate_sender, ChatId};
use crate::metrics::Limit;
use crate::rooms::{CatchUp, PresenceView, RoomError};
use crate::state::AppState;
use crate::web::security::ClientAddress;

/// Most queued messages written with one flush.
const MAX_BATCH: usize = 64;

/// Who opened a view: the name from the cookie, if set, and the client's address.
#[derive(Debug, Clone)]
pub struct Visitor {
    /// The reader's name.
    pub name: Option<String>,
    /// The client's address (for the per-address limits).
    pub address: ClientAddress,
}

/// Runs one view on an upgraded socket until the browser leaves or the server shuts down.
pub async fn run(socket: Stream, state: Arc<AppState>, visitor: Visitor) {
    state.metrics.connections.increment(1);
    state.metrics.views.increment(1.0);
    let mut conn = Conn::new(socket, state.live.clone(), Arc::clone(&state.metrics));
    let end = match serve(&mut conn, &state, &visitor).await {
        Ok(()) => End::Gone,
        Err(end) => end,
    };
    conn.finish(end).await;
    state.metrics.views.decrement(1.0);
}

async fn serve(conn: &mut Conn, state: &Arc<AppState>, visitor: &Visitor) -> Result<(), End> {
    let mut shutdown = state.shutdown.clone();
    let join = tokio::time::timeout(conn.live().join_timeout, async {
        loop {
            let frame = tokio::select! {
                frame = conn.receive() => frame?,
                _ = shutdown.wait_for(|stopping| *stopping) => return Err(End::Close(1001, "server shutting down")),
            };
            match frame {
                ClientFrame::Join { view, room, after } => return Ok((view, room, after)),
                ClientFrame::Ping {} => conn.send(Utf8Bytes::from_static(protocol::PONG)).await?,
                ClientFrame::Typing {} => {}
                ClientFrame::Send { reference, .. }
                | ClientFrame::Edit { reference, .. }
                | ClientFrame::React { reference, .. }
                | ClientFrame::Delete { reference, .. } => {
                    conn.send_str(protocol::ack(reference, &AckStatus::Refused("not joined to a room yet"))).await?;
                }
            }
        }
    })
    .await;
    let (view, room, after) = match join {
        Ok(joined) => joined?,
        Err(_) => return Err(End::Close(1008, "no join")),
    };
    match view {
        ViewKind::Room => {
            let Some(name) = visitor.name.as_deref().and_then(|n| validate_sender(n).ok()).map(str::to_owned) else {
                conn.send_str(protocol::error_frame("choose a name first")).await?;
                return Err(End::Close(1008, "no name"));
            };
            let room = match room.as_deref().map(ChatId::parse) {
                Some(Ok(room)) => room,
                Some(Err(error)) => {
                    conn.send_str(protocol::error_frame(&error.to_string())).await?;
                    return Err(End::Close(1008, "bad room"));
                }
                None => {
                    conn.send_str(protocol::error_frame("a room view needs a room")).await?;
                    return Err(End::Close(1008, "bad room"));
                }
            };
            room_view(conn, state, room, name, visitor.address, Position(after)).await
        }
        ViewKind::Lobby => region_view(conn, state, "rooms", state.lobby.clone()).await,
        ViewKind::Dashboard => region_view(conn, state, "metrics", state.dashboard.clone()).await,
    }
}

/// A view of one region that changes as a whole (the room list, the dashboard).
async fn region_view(
    conn: &mut Conn,
    state: &AppState,
    id: &str,
    mut source: watch::Receiver<Arc<str>>,
) -> Result<(), End> {
    conn.send_str(protocol::joined_frame(Position(0))).await?;
    let mut shutdown = state.shutdown.clone();
    source.mark_changed();
    loop {
        let idle = idle_deadline(conn);
        tokio::select! {
            frame = conn.receive() => match frame? {
                ClientFrame::Ping {} => conn.send(Utf8Bytes::from_static(protocol::PONG)).await?,
                ClientFrame::Join { .. } => conn.refuse("already joined").await?,
                ClientFrame::Typing {} => {}
                ClientFrame::Send { reference, .. }
                | ClientFrame::Edit { reference, .. }
                | ClientFrame::React { reference, .. }
                | ClientFrame::Delete { reference, .. } => {
                    conn.send_str(protocol::ack(reference, &AckStatus::Refused("this view takes no messages"))).await?;
                }
            },
            changed = source.changed() => {
                if changed.is_err() {
                    return Err(End::Close(1001, "server shutting down"));
                }
                let html = Arc::clone(&source.borrow_and_update());
                conn.send_str(protocol::morph_frame(id, &html)).await?;
            }
            () = tokio::time::sleep_until(idle) => return Err(End::Close(1008, "idle")),
            _ = shutdown.changed() => return Err(End::Close(1001, "server shutting down")),
        }
    }
}

fn idle_deadline(conn: &Conn) -> tokio::time::Instant {
    tokio::time::Instant::from_std(conn.last_heard + conn.live().idle_timeout)
}

/// What a room view remembers between frames.
struct RoomState {
    room_id: ChatId,
    name: String,
    address: ClientAddress,
    /// The room version of the last change forwarded to the browser.
    seen: u64,
}

/// A room view: catch up from `after`, then push each change once, in order.
async fn room_view(
    conn: &mut Conn,
    state: &Arc<AppState>,
    room_id: ChatId,
    name: String,
    address: ClientAddress,
    after: Position,
) -> Result<(), End> {
    let (room, presence_guard) = match Box::pin(state.model.enter(&room_id, &name)).await {
        Ok(entered) => entered,
        Err(error) => {
            conn.send_str(protocol::error_frame(&error.to_string())).await?;
            return Err(End::Close(1013, room_error_reason(&error)));
        }
    };
    let live = state.live.clone();
    let present = state.model.present();
    let page = (live.page_size, live.page_bytes);
    let (catch_up, mut updates, head) = room.subscribe(present, after, live.max_replay, page);
    let mut view = RoomState { room_id, name, address, seen: head.version };
    let last = send_catch_up(conn, catch_up).await?.unwrap_or(after);
    conn.send_str(protocol::joined_frame(last.max(after))).await?;

    let mut presence = room.presence();
    presence.mark_changed();
    let mut typing = room.typing();
    let mut pacer = PresencePacer { sent_at: None, due: None, shown: None };
    let mut shutdown = state.shutdown.clone();
    let result = loop {
        let due = pacer.due.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        let idle = idle_deadline(conn);
        tokio::select! {
            frame = conn.receive() => {
                let frame = match frame {
                    Ok(frame) => frame,
                    Err(end) => break Err(end),
                };
                // Boxed: the command path's future is large and needed only while a command
                // runs, so idle views do not carry its space.
                if let Err(end) = Box::pin(handle_frame(conn, state, &room, &view, frame)).await {
                    break Err(end);
                }
            }
            update = updates.recv() => {
                if let Err(end) = forward(conn, state, &room, &mut view, &mut updates, update).await {
                    break Err(end);
                }
            }
            changed = typing.changed() => {
                if changed.is_err() {
                    break Err(End::Close(1001, "room closed"));
                }
                let frame = typing.borrow_and_update().shown.clone();
                if let Err(end) = conn.send(frame).await {
                    break Err(end);
                }
            }
            changed = presence.changed(), if pacer.due.is_none() => {
                if changed.is_err() {
                    break Err(End::Close(1001, "room closed"));
                }
                pacer.changed(live.presence_interval);
            }
            () = tokio::time::sleep_until(due), if pacer.due.is_some() => {
                if let Err(end) = pacer.send(conn, &mut presence).await {
                    break Err(end);
                }
            }
            () = tokio::time::sleep_until(idle) => break Err(End::Close(1008, "idle")),
            _ = shutdown.changed() => break Err(End::Close(1001, "server shutting down")),
        }
    };
    drop(presence_guard);
    result
}

/// When a room view sends presence: at most once per `presence_interval`, and only the parts
/// that changed.
struct PresencePacer {
    /// When presence was last sent.
    sent_at: Option<Instant>,
    /// When the pending change goes out; `None` without one.
    due: Option<tokio::time::Instant>,
    /// The presence last sent (shared with the room: no copy of the names per view).
    shown: Option<Arc<PresenceView<Arc<str>>>>,
}

impl PresencePacer {
    /// Presence changed: it goes out once `interval` has passed since the last send.
    fn changed(&mut self, interval: Duration) {
        let earliest = self.sent_at.map_or_else(Instant::now, |at| at + interval);
        self.due = Some(tokio::time::Instant::from_std(earliest.max(Instant::now())));
    }

    /// Sends the parts of the current presence that changed since the last send.
    async fn send(
        &mut self,
        conn: &mut Conn,
        presence: &mut watch::Receiver<Arc<PresenceView<Arc<str>>>>,
    ) -> Result<(), End> {
        self.due = None;
        self.sent_at = Some(Instant::now());
        let now = Arc::clone(&presence.borrow_and_update());
        // Only the parts that changed: in a big room a join usually moves the count only.
        let mut frames: Vec<Utf8Bytes> = Vec::new();
        if self.shown.as_ref().is_none_or(|shown| !Arc::ptr_eq(&shown.shown, &now.shown)) {
            frames.push(protocol::morph_frame("presence", &now.shown).into());
        }
        if self.shown.as_ref().is_none_or(|shown| shown.count != now.count) {
            frames.push(protocol::morph_frame("presence-count", &now.count.to_string()).into());
        }
        self.shown = Some(now);
        if frames.is_empty() {
            return Ok(());
        }
        conn.send_many(frames).await
    }
}

fn room_error_reason(error: &RoomError) -> &'static str {
    match error {
        RoomError::Rebuilding => "rebuilding",
        _ => "room unavailable",
    }
}

/// One frame from the browser in a room view.
async fn handle_frame(
    conn: &mut Conn,
    state: &AppState,
    room: &crate::rooms::Room<super::present::LivePresent>,
    view: &RoomState,
    frame: ClientFrame,
) -> Result<(), End> {
    let sender = Sender { name: &view.name, address: view.address };
    let facts = || RoomFacts::of(room);
    let (reference, outcome) = match frame {
        ClientFrame::Ping {} => return conn.send(Utf8Bytes::from_static(protocol::PONG)).await,
        ClientFrame::Join { .. } => return conn.refuse("already joined").await,
        ClientFrame::Typing {} => {
            if room.signal_typing(state.model.present(), &view.name) == crate::rooms::presence::SignalOutcome::Throttled
            {
                state.metrics.limited(Limit::Typing);
            } else {
                state.model.typing_taken(&view.room_id, &view.name);
            }
            return Ok(());
        }
        ClientFrame::Send { reference, id, message } => {
            let outcome =
                state.commands.send(&view.room_id, sender, id, message, &facts(), &Consistency::Eventual).await;
            (reference, outcome)
        }
        ClientFrame::Edit { reference, id, version, message } => {
            (reference, state.commands.edit(&view.room_id, sender, id, version, message, &facts()).await)
        }
        ClientFrame::Delete { reference, id, version } => {
            (reference, state.commands.delete(&view.room_id, sender, id, version).await)
        }
        ClientFrame::React { reference, id, version, emoji, add } => {
            (reference, state.commands.react(&view.room_id, sender, id, version, emoji, add).await)
        }
    };
    let status = match &outcome {
        Outcome::Stored => AckStatus::Stored,
        Outcome::Refused(error) => AckStatus::Refused(error),
        Outcome::Unknown(error) => AckStatus::Unknown(error),
    };
    conn.send_str(protocol::ack(reference, &status)).await
}

/// Forwards a live change (and whatever else is already queued) to the browser.
async fn forward(
    conn: &mut Conn,
    state: &AppState,
    room: &crate::rooms::Room<super::present::LivePresent>,
    view: &mut RoomState,
    updates: &mut broadcast::Receiver<LiveShared>,
    update: Result<LiveShared, broadcast::error::RecvError>,
) -> Result<(), End> {
    // Take what else is already queued too: a view that fell behind writes its backlog with
    // one flush instead of one write per message.
    let mut lagged = false;
    let mut frames = Vec::new();
    let mut next = update;
    loop {
        match next {
            Ok(message) if message.data.revision.version > view.seen => {
                view.seen = message.data.revision.version;
                frames.push(message.shown.frame());
            }
            Ok(_) => {}
            Err(broadcast::error::RecvError::Lagged(_)) => lagged = true,
            Err(broadcast::error::RecvError::Closed) => return Err(End::Close(1012, "room reloaded")),
        }
        if lagged || frames.len() >= MAX_BATCH {
            break;
        }
        next = match updates.try_recv() {
            Ok(message) => Ok(message),
            Err(broadcast::error::TryRecvError::Lagged(n)) => Err(broadcast::error::RecvError::Lagged(n)),
            Err(_) => break,
        };
    }
    if !frames.is_empty() {
        conn.send_many(frames).await?;
    }
    if lagged {
        state.metrics.resyncs.increment(1);
        let live = &state.live;
        let (catch_up, head) =
            room.catch_up_after(state.model.present(), view.seen, live.max_replay, (live.page_size, live.page_bytes));
        // Everything up to `head` is in the catch-up; later changes are still in the channel.
        view.seen = view.seen.max(head.version);
        send_catch_up(conn, catch_up).await?;
    }
    Ok(())
}

/// Sends a catch-up (each change as its own frame, or one reset frame bounded in bytes);
/// returns the position of the last message it sent, if any.
async fn send_catch_up(
    conn: &mut Conn,
    catch_up: CatchUp<super::present::LiveMessage>,
) -> Result<Option<Position>, End> {
    match catch_up {
        CatchUp::Changes(changes) => {
            let mut last = None;
            for message in changes {
                last = Some(message.data.sent.position).max(last);
                conn.send(message.shown.frame()).await?;
            }
            Ok(last)
        }
        CatchUp::Reset { latest, has_more } => {
            let last = latest.last().map_or(Position(0), |m| m.data.sent.position);
            let frame = protocol::reset_frame(last, has_more, latest.iter().map(|m| m.shown.html()));
            conn.send_str(frame).await?;
            Ok(Some(last))
        }
    }
}
