//! The websocket of one view: the upgrade handshake, sending with a deadline, reading with
//! input limits, and closing so the close frame arrives.
//!
//! The socket is tungstenite's, over hyper's upgraded connection, rather than axum's wrapper,
//! for two reasons: read errors are matched by type (a frame over the size limit is
//! `Error::Capacity` → 1009, invalid UTF-8 → 1007, a protocol violation such as an unmasked
//! frame → 1002), and after a close frame the client's pending input can be read and dropped
//! before the connection is closed. Dropping a socket with unread input makes the kernel send
//! a reset, and a client still writing then never sees the close code.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::header::{self, HeaderValue};
use axum::http::{Request, Response, StatusCode};
use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncReadExt;
use tokio_tungstenite::tungstenite::error::{CapacityError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

use super::protocol::{self, ClientFrame};
use crate::metrics::{Limit, Metrics};

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
    /// Most changes replayed one by one on a resume; beyond it the list is reset.
    pub max_replay: usize,
    /// Messages a page shows at first, and after a reset.
    pub page_size: usize,
    /// Most bytes of messages in one page or one reset frame (well under the socket's write
    /// buffer cap, so a catch-up frame can always be sent).
    pub page_bytes: usize,
    /// Shortest interval between two presence updates to one view.
    pub presence_interval: Duration,
    /// How long, after sending a close frame, the client's input is read (and dropped) before
    /// the connection is closed.
    pub close_drain: Duration,
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
            page_bytes: 256 * 1024,
            presence_interval: Duration::from_millis(500),
            close_drain: Duration::from_secs(2),
        }
    }
}

/// The socket's write buffer cap: a frame that cannot be written within it ends the view.
pub const MAX_WRITE_BUFFER_BYTES: usize = 1024 * 1024;

/// The websocket of a view.
pub type Stream = WebSocketStream<TokioIo<Upgraded>>;

/// Why an upgrade request was refused: the text of the `400` to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadUpgrade(pub &'static str);

/// Checks a websocket upgrade request and answers it: the `101 Switching Protocols` response
/// and the upgrade to await.
pub fn accept(request: &mut Request<Body>) -> Result<(Response<Body>, OnUpgrade), BadUpgrade> {
    let bad = BadUpgrade;
    let headers = request.headers();
    let has_token = |name: header::HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|v| v.trim().eq_ignore_ascii_case(token))
    };
    if !has_token(header::UPGRADE, "websocket") || !has_token(header::CONNECTION, "upgrade") {
        return Err(bad("this is a websocket endpoint\n"));
    }
    if headers.get(header::SEC_WEBSOCKET_VERSION).map(HeaderValue::as_bytes) != Some(b"13") {
        return Err(bad("websocket version 13 is required\n"));
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else { return Err(bad("missing Sec-WebSocket-Key\n")) };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let Some(on_upgrade) = request.extensions_mut().remove::<OnUpgrade>() else {
        return Err(bad("this connection cannot be upgraded\n"));
    };
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let response_headers = response.headers_mut();
    response_headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    response_headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Ok(accept) = HeaderValue::from_str(&accept) {
        response_headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    Ok((response, on_upgrade))
}

/// The websocket over an accepted upgrade, with this view's buffer and frame limits.
pub async fn open(on_upgrade: OnUpgrade, config: &LiveConfig) -> Option<Stream> {
    let upgraded = on_upgrade.await.ok()?;
    let settings = WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(4 * 1024)
        .max_write_buffer_size(MAX_WRITE_BUFFER_BYTES)
        .max_message_size(Some(config.max_frame_bytes))
        .max_frame_size(Some(config.max_frame_bytes));
    Some(WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(settings)).await)
}

/// Why a view ends.
#[derive(Debug)]
pub enum End {
    /// The browser went away or the socket failed; nothing to send.
    Gone,
    /// Close with this code and reason; the stream is still in step (whole frames read).
    Close(u16, &'static str),
    /// Close with this code and reason after a read error left the stream mid-frame: the
    /// client's remaining input is drained as raw bytes.
    CloseMidFrame(u16, &'static str),
}

/// The socket side of a view: sending with a deadline, counting, and limiting input.
pub struct Conn {
    socket: Stream,
    live: LiveConfig,
    metrics: Arc<Metrics>,
    tokens: f64,
    refill_at: Instant,
    refused: u32,
    /// When the browser was last heard from (the idle deadline counts from here).
    pub last_heard: Instant,
}

impl Conn {
    /// A connection over `socket`.
    pub fn new(socket: Stream, live: LiveConfig, metrics: Arc<Metrics>) -> Self {
        Self {
            socket,
            tokens: live.frame_burst,
            refill_at: Instant::now(),
            refused: 0,
            last_heard: Instant::now(),
            live,
            metrics,
        }
    }

    /// The limits.
    pub fn live(&self) -> &LiveConfig {
        &self.live
    }

    /// Sends one frame within the send deadline.
    pub async fn send(&mut self, text: Utf8Bytes) -> Result<(), End> {
        let bytes = text.len();
        match tokio::time::timeout(self.live.send_timeout, self.socket.send(Message::Text(text))).await {
            Ok(Ok(())) => {
                self.metrics.sent(bytes);
                Ok(())
            }
            Ok(Err(_)) => Err(End::Gone),
            Err(_) => Err(End::Close(1013, "too slow")),
        }
    }

    /// Sends a frame made of a string.
    pub async fn send_str(&mut self, text: String) -> Result<(), End> {
        self.send(text.into()).await
    }

    /// Sends several frames with one flush (one `sendto` for all when the socket takes them)
    /// and one deadline: how a view that fell behind catches up cheaply.
    pub async fn send_many(&mut self, frames: Vec<Utf8Bytes>) -> Result<(), End> {
        let bytes: usize = frames.iter().map(|frame| frame.as_str().len()).sum();
        let count = frames.len() as u64;
        let socket = &mut self.socket;
        let write = async move {
            for frame in frames {
                socket.feed(Message::Text(frame)).await?;
            }
            socket.flush().await
        };
        match tokio::time::timeout(self.live.send_timeout, write).await {
            Ok(Ok(())) => {
                self.metrics.sent_many(count, bytes);
                Ok(())
            }
            Ok(Err(_)) => Err(End::Gone),
            Err(_) => Err(End::Close(1013, "too slow")),
        }
    }

    /// Refuses a frame with an error frame; closes after too many.
    pub async fn refuse(&mut self, reason: &str) -> Result<(), End> {
        self.refused += 1;
        self.metrics.frames_refused.increment(1);
        if self.refused > self.live.max_refused_frames {
            return Err(End::Close(1008, "too many refused frames"));
        }
        self.send_str(protocol::error_frame(reason)).await
    }

    /// The next frame from the browser, parsed. Malformed, binary and over-rate frames are
    /// answered with an error frame and skipped; read errors end the view with the close code
    /// of their type.
    pub async fn receive(&mut self) -> Result<ClientFrame, End> {
        loop {
            let message = match self.socket.next().await {
                None => return Err(End::Gone),
                Some(Ok(message)) => message,
                Some(Err(error)) => return Err(read_error(&error)),
            };
            self.last_heard = Instant::now();
            let text = match message {
                Message::Text(text) => text,
                Message::Close(_) => return Err(End::Gone),
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
                Message::Binary(_) => {
                    self.refuse("binary frames are not supported").await?;
                    continue;
                }
            };
            if !self.take_token() {
                self.metrics.limited(Limit::Frames);
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
        self.tokens = (self.tokens + now.duration_since(self.refill_at).as_secs_f64() * self.live.frames_per_second)
            .min(self.live.frame_burst);
        self.refill_at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Ends the connection as `end` says: a close frame, then the client's input read and
    /// dropped until it closes too (or for [`LiveConfig::close_drain`] at most), so the close
    /// frame is delivered rather than lost to a reset.
    pub async fn finish(mut self, end: End) {
        let (code, reason, mid_frame) = match end {
            End::Gone => return,
            End::Close(code, reason) => (code, reason, false),
            End::CloseMidFrame(code, reason) => (code, reason, true),
        };
        self.metrics.closed(code);
        let frame = CloseFrame { code: CloseCode::from(code), reason: reason.into() };
        let deadline = tokio::time::Instant::now() + self.live.close_drain;
        if tokio::time::timeout_at(deadline, self.socket.send(Message::Close(Some(frame)))).await.is_err() {
            return;
        }
        if mid_frame {
            // The stream is mid-frame: its next bytes are no frame. Read raw bytes until the
            // client closes its side.
            let raw = self.socket.get_mut();
            // On the heap: an array here would sit in every view's future for its whole life.
            let mut sink = vec![0u8; 4096];
            while let Ok(Ok(read)) = tokio::time::timeout_at(deadline, raw.read(&mut sink)).await {
                if read == 0 {
                    break;
                }
            }
        } else {
            // Whole frames: read them until the client's close (tungstenite answers nothing more).
            while let Ok(Some(Ok(message))) = tokio::time::timeout_at(deadline, self.socket.next()).await {
                if matches!(message, Message::Close(_)) {
                    break;
                }
            }
        }
    }
}

/// The close a read error calls for, by the error's type.
fn read_error(error: &WsError) -> End {
    tracing::debug!(%error, "websocket read failed");
    match error {
        WsError::Capacity(CapacityError::MessageTooLong { .. }) => End::CloseMidFrame(1009, "frame too large"),
        WsError::Utf8(_) => End::Close(1007, "invalid UTF-8"),
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake | ProtocolError::SendAfterClosing) => End::Gone,
        WsError::Protocol(_) => End::CloseMidFrame(1002, "protocol error"),
        _ => End::Gone,
    }
}
