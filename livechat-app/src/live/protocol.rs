//! The wire format between `live.js` and a view task.
//!
//! Client → server: one JSON object per text frame, tagged by `t`:
//! - `{"t":"join","view":"room","room":"lobby-talk","after":42}`: start the view; `after` is
//!   the position of the last message the page shows (the resume point after a reconnect);
//! - `{"t":"send","ref":7,"id":"<uuid>","message":"hi"}`: post a message; `id` is made by the
//!   client once per message, so a resend after a reconnect posts once;
//! - `{"t":"ping"}`: heartbeat.
//!
//! Server → client: a JSON header line, then for some frames a raw HTML body after the first
//! `\n`. HTML travels unescaped, so a new message costs its HTML plus a ~25-byte header,
//! whatever the size of the room:
//! - `{"t":"joined","pos":N}`; `{"t":"msg","pos":N}\n<li…>`; `{"t":"reset","pos":N,"more":true}\n<li…>…`;
//! - `{"t":"ack","ref":7,"ok":true}` or `{"t":"ack","ref":7,"ok":false,"error":"…"}`;
//! - `{"t":"morph","id":"presence"}\n<html>`: replace the children of an element;
//! - `{"t":"error","error":"…"}`; `{"t":"pong"}`.

use cqrs_core::Position;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Which live view a socket runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ViewKind {
    /// A chat room (`/{chat_id}`).
    Room,
    /// The room list (`/`).
    Lobby,
    /// The metrics (`/dashboard`).
    Dashboard,
}

/// A frame from the browser.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "t", rename_all = "lowercase", deny_unknown_fields)]
pub enum ClientFrame {
    /// Starts the view.
    Join {
        /// Which view.
        view: ViewKind,
        /// The room, for a room view.
        #[serde(default)]
        room: Option<String>,
        /// The last message position the client has.
        #[serde(default)]
        after: u64,
    },
    /// Posts a message.
    Send {
        /// The client's reference, echoed in the `ack`.
        #[serde(rename = "ref")]
        reference: u64,
        /// The command id: the same for every resend of one message.
        id: Uuid,
        /// The text.
        message: String,
    },
    /// Heartbeat.
    Ping,
}

/// The `msg` frame of a message and where its HTML starts.
pub fn message_frame(position: Position, html: &str) -> (String, usize) {
    let mut frame = format!("{{\"t\":\"msg\",\"pos\":{}}}\n", position.0);
    let html_at = frame.len();
    frame.push_str(html);
    (frame, html_at)
}

/// `{"t":"reset",...}` followed by the messages' HTML.
pub fn reset_frame<'a>(position: Position, has_more: bool, html: impl Iterator<Item = &'a str>) -> String {
    let mut frame = format!("{{\"t\":\"reset\",\"pos\":{},\"more\":{}}}\n", position.0, has_more);
    html.for_each(|part| frame.push_str(part));
    frame
}

/// `{"t":"joined","pos":N}`.
pub fn joined_frame(position: Position) -> String {
    format!("{{\"t\":\"joined\",\"pos\":{}}}", position.0)
}

/// A successful `ack`.
pub fn ack_ok(reference: u64) -> String {
    format!("{{\"t\":\"ack\",\"ref\":{reference},\"ok\":true}}")
}

#[derive(Serialize)]
struct AckError<'a> {
    t: &'static str,
    #[serde(rename = "ref")]
    reference: u64,
    ok: bool,
    error: &'a str,
}

/// A refused `ack` with the reason shown beside the composer.
pub fn ack_error(reference: u64, error: &str) -> String {
    serde_json::to_string(&AckError { t: "ack", reference, ok: false, error })
        .unwrap_or_else(|_| format!("{{\"t\":\"ack\",\"ref\":{reference},\"ok\":false,\"error\":\"refused\"}}"))
}

#[derive(Serialize)]
struct ErrorFrame<'a> {
    t: &'static str,
    error: &'a str,
}

/// An `error` frame: the last frame was not understood or not allowed.
pub fn error_frame(error: &str) -> String {
    serde_json::to_string(&ErrorFrame { t: "error", error })
        .unwrap_or_else(|_| "{\"t\":\"error\",\"error\":\"error\"}".to_owned())
}

/// `{"t":"morph","id":ID}` followed by the new inner HTML of element `ID`.
pub fn morph_frame(id: &str, html: &str) -> String {
    format!("{{\"t\":\"morph\",\"id\":\"{id}\"}}\n{html}")
}

/// `{"t":"pong"}`.
pub const PONG: &str = "{\"t\":\"pong\"}";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_client_frames() {
        let join: ClientFrame =
            serde_json::from_str(r#"{"t":"join","view":"room","room":"abc","after":5}"#).expect("join");
        assert_eq!(join, ClientFrame::Join { view: ViewKind::Room, room: Some("abc".into()), after: 5 });
        let send: ClientFrame =
            serde_json::from_str(r#"{"t":"send","ref":1,"id":"67e55044-10b1-426f-9247-bb680e5fe0c8","message":"hi"}"#)
                .expect("send");
        assert!(matches!(send, ClientFrame::Send { reference: 1, ref message, .. } if message == "hi"));
        for bad in [
            r#"{"t":"nope"}"#,
            r#"{"t":"send","ref":1}"#,
            "not json",
            r#"{"t":"join","view":"attic"}"#,
            r#"{"t":"send","ref":"x","id":"nope","message":1}"#,
        ] {
            assert!(serde_json::from_str::<ClientFrame>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn message_frames_add_a_short_header() {
        let html = "<li>x</li>";
        let (frame, at) = message_frame(Position(123_456), html);
        assert_eq!(&frame[at..], html);
        assert_eq!(frame, "{\"t\":\"msg\",\"pos\":123456}\n<li>x</li>");
        assert!(frame.len() - html.len() <= 64);
    }

    #[test]
    fn errors_are_valid_json() {
        let frame = ack_error(3, "the \"message\" is empty");
        let value: serde_json::Value = serde_json::from_str(&frame).expect("json");
        assert_eq!(value["error"], "the \"message\" is empty");
        assert_eq!(value["ok"], false);
        let value: serde_json::Value = serde_json::from_str(&error_frame("bad\nframe")).expect("json");
        assert_eq!(value["t"], "error");
    }
}
