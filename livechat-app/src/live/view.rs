//! One task per connected view: it holds the view's state (which room, who, the position of
//! the last message sent), reads the browser's frames, and pushes only what changed.
//!
//! Never buffers without bound: live messages come from the room's bounded broadcast channel;
//! a view that falls behind (slow socket) resyncs from its own position through the read model,
//! and a socket that does not take a frame within [`LiveConfig::send_timeout`] is closed (the
//! browser reconnects and resumes from what it has).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{close_code, CloseFrame, Message, Utf8Bytes, WebSocket};
use cqrs_core::{CommandEnvelope, CommandId, Consistency, DispatchError, Position, StoreError, Timestamp};
use futures_util::SinkExt;
use tokio::sync::{broadcast, watch};

use super::protocol::{self, ClientFrame, ViewKind};
use crate::app::AppState;
use crate::domain::{validate_sender, ChatId, SendMessage};
use crate::read_model::{CatchUp, ChatMessage, Presence};

/// Limits of one live connection.
#[derive(Debug, Clone)]
pub struct LiveConfig {
    /// Largest frame accepted from a browser.
    pub max_frame_bytes: usize,
    /// Frames per second a browser may send, on average.
    pub frames_per_second: f64,
    /// Frames a browser may send in a burst.
    pub frame_burst: f64,
    /// Refused frames after which the connection is closed.
    pub max_refused_frames: u32,
    /// A silent browser (no frame, not even a ping) is disconnected after this long.
    pub idle_timeout: Duration,
    /// Time to send the `join` frame after connecting.
    pub join_timeout: Duration,
    /// Longest wait for a browser to take one frame.
    pub send_timeout: Duration,
    /// Most missed messages replayed one by one on a resume; beyond it the list is reset.
    pub max_replay: usize,
    /// Messages a page shows at first, and after a reset.
    pub page_size: usize,
    /// Shortest interval between two presence updates to one view.
    pub presence_interval: Duration,
}

impl Default for LiveConfig {
    fn default() -> Self {
        Self {
            max_frame_bytes: 64 * 1024,
            frames_per_second: 10.0,
            frame_burst: 30.0,
            max_refused_frames: 50,
            idle_timeout: Duration::from_secs(60),
            join_timeout: Duration::from_secs(10),
            send_timeout: Duration::from_secs(10),
            max_replay: 1_000,
            page_size: 100,
            presence_interval: Duration::from_millis(500),
        }
    }
}

/// Most queued messages written with one flush.
const MAX_BATCH: usize = 64;

/// Why a view ends.
enum End {
    /// The browser went away or the socket failed; nothing to send.
    Gone,
    /// Close with this code and reason.
    Close(u16, &'static str),
}

/// The socket side of a view: sending with a deadline, counting, and limiting input.
struct Conn {
    socket: WebSocket,
    state: Arc<AppState>,
    tokens: f64,
    refill_at: Instant,
    refused: u32,
    last_heard: Instant,
}

impl Conn {
    async fn send(&mut self, text: Utf8Bytes) -> Result<(), End> {
        let bytes = text.len();
        match tokio::time::timeout(self.state.live.send_timeout, self.socket.send(Message::Text(text))).await {
            Ok(Ok(())) => {
                self.state.metrics.sent(bytes);
                Ok(())
            }
            Ok(Err(_)) => Err(End::Gone),
            Err(_) => Err(End::Close(close_code::AGAIN, "too slow")),
        }
    }

    /// Sends several frames with one flush (one `sendto` for all when the socket takes them)
    /// and one deadline: how a view that fell behind catches up cheaply.
    async fn send_many(&mut self, frames: Vec<Utf8Bytes>) -> Result<(), End> {
        let bytes: usize = frames.iter().map(|frame| frame.as_str().len()).sum();
        let count = frames.len() as u64;
        let socket = &mut self.socket;
        let write = async move {
            for frame in frames {
                socket.feed(Message::Text(frame)).await?;
            }
            socket.flush().await
        };
        match tokio::time::timeout(self.state.live.send_timeout, write).await {
            Ok(Ok(())) => {
                self.state.metrics.frames_sent.fetch_add(count, Ordering::Relaxed);
                self.state.metrics.bytes_sent.fetch_add(bytes as u64, Ordering::Relaxed);
                Ok(())
            }
            Ok(Err(_)) => Err(End::Gone),
            Err(_) => Err(End::Close(close_code::AGAIN, "too slow")),
        }
    }

    async fn send_str(&mut self, text: String) -> Result<(), End> {
        self.send(text.into()).await
    }

    /// Refuses a frame with an error frame; closes after too many.
    async fn refuse(&mut self, reason: &str) -> Result<(), End> {
        self.refused += 1;
        self.state.metrics.frames_refused.fetch_add(1, Ordering::Relaxed);
        if self.refused > self.state.live.max_refused_frames {
            return Err(End::Close(close_code::POLICY, "too many refused frames"));
        }
        self.send_str(protocol::error_frame(reason)).await
    }

    /// The next frame from the browser, parsed; `None` when it is gone. Malformed, binary and
    /// over-rate frames are answered with an error frame and skipped.
    async fn receive(&mut self) -> Result<ClientFrame, End> {
        loop {
            let message = match self.socket.recv().await {
                None => return Err(End::Gone),
                Some(Ok(message)) => message,
                Some(Err(error)) => {
                    tracing::debug!(%error, "websocket read failed");
                    let capacity = error.to_string().contains("too long") || error.to_string().contains("Space limit");
                    return Err(if capacity { End::Close(close_code::SIZE, "frame too large") } else { End::Gone });
                }
            };
            self.last_heard = Instant::now();
            let text = match message {
                Message::Text(text) => text,
                Message::Close(_) => return Err(End::Gone),
                Message::Ping(_) | Message::Pong(_) => continue,
                Message::Binary(_) => {
                    self.refuse("binary frames are not supported").await?;
                    continue;
                }
            };
            if !self.take_token() {
                self.refuse("too many frames; slow down").await?;
                continue;
            }
            match serde_json::from_str::<ClientFrame>(text.as_str()) {
                Ok(frame) => return Ok(frame),
                Err(error) => self.refuse(&format!("malformed frame: {error}")).await?,
            }
        }
    }

    fn take_token(&mut self) -> bool {
        let now = Instant::now();
        let live = &self.state.live;
        self.tokens = (self.tokens + now.duration_since(self.refill_at).as_secs_f64() * live.frames_per_second)
            .min(live.frame_burst);
        self.refill_at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Runs one view on an upgraded socket until the browser leaves or the server shuts down.
/// `name` is the reader's name from the cookie, if set.
pub async fn run(socket: WebSocket, state: Arc<AppState>, name: Option<String>) {
    state.metrics.connections.fetch_add(1, Ordering::Relaxed);
    state.metrics.views.fetch_add(1, Ordering::Relaxed);
    let live = &state.live;
    let mut conn = Conn {
        socket,
        tokens: live.frame_burst,
        refill_at: Instant::now(),
        refused: 0,
        last_heard: Instant::now(),
        state: Arc::clone(&state),
    };
    let end = serve(&mut conn, name).await;
    if let Err(End::Close(code, reason)) = end {
        let frame = CloseFrame { code, reason: reason.into() };
        let _ = tokio::time::timeout(Duration::from_secs(1), conn.socket.send(Message::Close(Some(frame)))).await;
    }
    state.metrics.views.fetch_sub(1, Ordering::Relaxed);
}

async fn serve(conn: &mut Conn, name: Option<String>) -> Result<(), End> {
    let join = tokio::time::timeout(conn.state.live.join_timeout, async {
        loop {
            match conn.receive().await? {
                ClientFrame::Join { view, room, after } => return Ok((view, room, after)),
                ClientFrame::Ping => conn.send(Utf8Bytes::from_static(protocol::PONG)).await?,
                ClientFrame::Send { reference, .. } => {
                    conn.send_str(protocol::ack_error(reference, "not joined to a room yet")).await?;
                }
            }
        }
    })
    .await;
    let (view, room, after) = match join {
        Ok(joined) => joined?,
        Err(_) => return Err(End::Close(close_code::POLICY, "no join")),
    };
    match view {
        ViewKind::Room => {
            let Some(name) = name.as_deref().and_then(|n| validate_sender(n).ok()).map(str::to_owned) else {
                conn.send_str(protocol::error_frame("choose a name first")).await?;
                return Err(End::Close(close_code::POLICY, "no name"));
            };
            let room = match room.as_deref().map(ChatId::parse) {
                Some(Ok(room)) => room,
                Some(Err(error)) => {
                    conn.send_str(protocol::error_frame(&error.to_string())).await?;
                    return Err(End::Close(close_code::POLICY, "bad room"));
                }
                None => {
                    conn.send_str(protocol::error_frame("a room view needs a room")).await?;
                    return Err(End::Close(close_code::POLICY, "bad room"));
                }
            };
            room_view(conn, room, name, Position(after)).await
        }
        ViewKind::Lobby => {
            let lobby = conn.state.lobby.clone();
            region_view(conn, "rooms", lobby).await
        }
        ViewKind::Dashboard => {
            let dashboard = conn.state.dashboard.clone();
            region_view(conn, "metrics", dashboard).await
        }
    }
}

/// A view of one region that changes as a whole (the room list, the dashboard).
async fn region_view(conn: &mut Conn, id: &str, mut source: watch::Receiver<Arc<str>>) -> Result<(), End> {
    conn.send_str(protocol::joined_frame(Position(0))).await?;
    let mut shutdown = conn.state.shutdown.clone();
    source.mark_changed();
    loop {
        let idle = idle_deadline(conn);
        tokio::select! {
            frame = conn.receive() => match frame? {
                ClientFrame::Ping => conn.send(Utf8Bytes::from_static(protocol::PONG)).await?,
                ClientFrame::Join { .. } => conn.refuse("already joined").await?,
                ClientFrame::Send { reference, .. } => {
                    conn.send_str(protocol::ack_error(reference, "this view takes no messages")).await?;
                }
            },
            changed = source.changed() => {
                if changed.is_err() {
                    return Err(End::Close(close_code::AWAY, "server shutting down"));
                }
                let html = Arc::clone(&source.borrow_and_update());
                conn.send_str(protocol::morph_frame(id, &html)).await?;
            }
            () = tokio::time::sleep_until(idle) => {
                return Err(End::Close(close_code::POLICY, "idle"));
            }
            _ = shutdown.changed() => return Err(End::Close(close_code::AWAY, "server shutting down")),
        }
    }
}

fn idle_deadline(conn: &Conn) -> tokio::time::Instant {
    tokio::time::Instant::from_std(conn.last_heard + conn.state.live.idle_timeout)
}

/// A room view: catch up from `after`, then push each new message once, in order.
async fn room_view(conn: &mut Conn, room_id: ChatId, name: String, after: Position) -> Result<(), End> {
    let state = Arc::clone(&conn.state);
    let (room, presence_guard) = state.model.enter(&room_id, &name);
    let live = &state.live;
    let (catch_up, mut updates) = room.subscribe(after, live.max_replay, live.page_size);
    let mut last = after;
    send_catch_up(conn, catch_up, &mut last).await?;
    conn.send_str(protocol::joined_frame(last)).await?;

    let mut presence = room.presence();
    presence.mark_changed();
    let mut presence_sent_at: Option<Instant> = None;
    let mut presence_due: Option<tokio::time::Instant> = None;
    let mut shown: Option<Presence> = None;
    let mut shutdown = state.shutdown.clone();
    let result = loop {
        let due = presence_due.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        let idle = idle_deadline(conn);
        tokio::select! {
            frame = conn.receive() => {
                let frame = match frame {
                    Ok(frame) => frame,
                    Err(end) => break Err(end),
                };
                let sent = match frame {
                    ClientFrame::Ping => conn.send(Utf8Bytes::from_static(protocol::PONG)).await,
                    ClientFrame::Join { .. } => conn.refuse("already joined").await,
                    ClientFrame::Send { reference, id, message } => {
                        let reply = send_message(&state, &room_id, &name, id, message, &Consistency::Eventual).await;
                        let frame = match reply {
                            Ok(()) => protocol::ack_ok(reference),
                            Err(reason) => protocol::ack_error(reference, &reason),
                        };
                        conn.send_str(frame).await
                    }
                };
                if let Err(end) = sent {
                    break Err(end);
                }
            }
            update = updates.recv() => {
                // Take what else is already queued too: a view that fell behind writes its
                // backlog with one flush instead of one write per message.
                let mut lagged = false;
                let mut frames = Vec::new();
                let mut next = update;
                loop {
                    match next {
                        Ok(message) if message.position > last => {
                            last = message.position;
                            frames.push(message.frame());
                        }
                        Ok(_) => {}
                        Err(broadcast::error::RecvError::Lagged(_)) => lagged = true,
                        Err(broadcast::error::RecvError::Closed) => break,
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
                let mut sent = if frames.is_empty() { Ok(()) } else { conn.send_many(frames).await };
                if sent.is_ok() && lagged {
                    state.metrics.resyncs.fetch_add(1, Ordering::Relaxed);
                    let catch_up = room.catch_up(last, live.max_replay, live.page_size);
                    sent = send_catch_up(conn, catch_up, &mut last).await;
                }
                if let Err(end) = sent {
                    break Err(end);
                }
            }
            changed = presence.changed(), if presence_due.is_none() => {
                if changed.is_err() {
                    break Err(End::Close(close_code::AWAY, "room closed"));
                }
                let earliest = presence_sent_at.map_or_else(Instant::now, |at| at + live.presence_interval);
                presence_due = Some(tokio::time::Instant::from_std(earliest.max(Instant::now())));
            }
            () = tokio::time::sleep_until(due), if presence_due.is_some() => {
                presence_due = None;
                presence_sent_at = Some(Instant::now());
                let now = presence.borrow_and_update().clone();
                // Only the parts that changed: in a big room a join usually moves the count only.
                let mut frames = Vec::new();
                if shown.as_ref().is_none_or(|shown| shown.list != now.list) {
                    frames.push(protocol::morph_frame("presence", &now.list).into());
                }
                if shown.as_ref().is_none_or(|shown| shown.count != now.count) {
                    frames.push(protocol::morph_frame("presence-count", &now.count.to_string()).into());
                }
                shown = Some(now);
                if !frames.is_empty() {
                    if let Err(end) = conn.send_many(frames).await {
                        break Err(end);
                    }
                }
            }
            () = tokio::time::sleep_until(idle) => break Err(End::Close(close_code::POLICY, "idle")),
            _ = shutdown.changed() => break Err(End::Close(close_code::AWAY, "server shutting down")),
        }
    };
    drop(presence_guard);
    state.model.forget_if_unused(&room_id);
    result
}

async fn send_catch_up(conn: &mut Conn, catch_up: CatchUp, last: &mut Position) -> Result<(), End> {
    match catch_up {
        CatchUp::Missed(missed) => {
            for message in missed {
                *last = message.position;
                conn.send(message.frame()).await?;
            }
        }
        CatchUp::Reset { latest, has_more } => {
            if let Some(newest) = latest.last() {
                *last = newest.position;
            }
            let frame = protocol::reset_frame(*last, has_more, latest.iter().map(|m: &Arc<ChatMessage>| m.html()));
            conn.send_str(frame).await?;
        }
    }
    Ok(())
}

/// Dispatches `SendMessage`; the error is the text shown beside the composer.
pub async fn send_message(
    state: &AppState,
    room: &ChatId,
    name: &str,
    id: uuid::Uuid,
    content: String,
    consistency: &Consistency,
) -> Result<(), String> {
    let command = SendMessage { chat_id: room.clone(), sender: name.to_owned(), content, sent_at: Timestamp::now() };
    let envelope = CommandEnvelope::new(command).with_command_id(CommandId(id));
    let started = Instant::now();
    let result = state.dispatcher.dispatch_with(envelope, consistency).await;
    state.metrics.dispatch.record(started.elapsed());
    match result {
        Ok(_) | Err(DispatchError::ConsistencyTimeout { .. }) => {
            state.metrics.commands_ok.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        Err(DispatchError::Rejected(error)) => {
            state.metrics.commands_refused.fetch_add(1, Ordering::Relaxed);
            Err(error.to_string())
        }
        Err(error) => {
            state.metrics.commands_failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%room, %error, "send failed");
            Err(match error {
                DispatchError::TooManyConflicts { .. } => "the room is busy; please send again".to_owned(),
                DispatchError::Store(StoreError::Unavailable(_)) => {
                    "the message could not be stored (database unavailable); please send again".to_owned()
                }
                _ => "the message could not be stored; please send again".to_owned(),
            })
        }
    }
}
