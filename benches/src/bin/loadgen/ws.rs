//! Websocket connections to the server: connecting as a named client, the join frame, reading
//! frames and what they carry.

use anyhow::{Context, Result};
use serde_json::json;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::MARKER;

pub(crate) type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub(crate) fn frame_kind(head: &str) -> &str {
    head.find("\"t\":\"")
        .map(|at| &head[at + 5..])
        .and_then(|rest| rest.find('"').map(|end| &rest[..end]))
        .unwrap_or("?")
}

pub(crate) fn sequence_in(html: &str) -> Option<usize> {
    let at = html.find(MARKER)? + MARKER.len();
    let digits = &html[at..];
    let end = digits.find(|c: char| !c.is_ascii_digit()).unwrap_or(digits.len());
    digits[..end].parse().ok()
}

pub(crate) fn ws_config() -> WebSocketConfig {
    // Small buffers: tungstenite's default 128 KiB read buffer per connection would cost the
    // generator over a gigabyte at 10 000 viewers.
    WebSocketConfig::default().read_buffer_size(8 * 1024).write_buffer_size(4 * 1024)
}

/// The client address a connection claims through the server's trusted loopback proxy: each
/// simulated browser is its own client, as behind a real proxy, so the server's per-address
/// limits (connections, commands) apply per browser and not to the whole load test.
pub(crate) fn forwarded_for(name: &str) -> String {
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    let [a, b, c, ..] = hash.to_le_bytes();
    format!("10.{a}.{b}.{}", c.max(1))
}

pub(crate) async fn connect(url: &str, name: &str) -> Result<Ws> {
    let mut request = url.into_client_request().context("websocket URL")?;
    request.headers_mut().insert("cookie", HeaderValue::from_str(&format!("livechat_name={name}"))?);
    request.headers_mut().insert("x-forwarded-for", HeaderValue::from_str(&forwarded_for(name))?);
    let (ws, _) = tokio_tungstenite::connect_async_with_config(request, Some(ws_config()), true)
        .await
        .with_context(|| format!("connecting {url}"))?;
    Ok(ws)
}

pub(crate) fn join_frame(room: &str, after: u64) -> String {
    json!({"t": "join", "view": "room", "room": room, "after": after}).to_string()
}

/// The `pos` of a frame's header, if it has one.
pub(crate) fn position_in(head: &str) -> Option<u64> {
    let at = head.find("\"pos\":")? + 6;
    let digits = &head[at..];
    let end = digits.find(|c: char| !c.is_ascii_digit()).unwrap_or(digits.len());
    digits[..end].parse().ok()
}

/// A text frame (`Ok(Some)`), a frame to skip (`Ok(None)`), or why the socket ended (`Err`).
pub(crate) fn text_frame(
    frame: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
) -> Result<Option<Utf8Bytes>, String> {
    match frame {
        Some(Ok(Message::Text(text))) => Ok(Some(text)),
        Some(Ok(Message::Close(close))) => Err(match close {
            Some(close) => format!("closed by server: {} {}", u16::from(close.code), close.reason),
            None => "closed by server without a code".to_owned(),
        }),
        Some(Ok(_)) => Ok(None),
        Some(Err(error)) => Err(format!("socket failed: {error}")),
        None => Err("socket ended".to_owned()),
    }
}
