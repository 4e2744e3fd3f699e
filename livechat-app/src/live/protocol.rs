//! The wire format between `live.js` and a view task.
//!
//! Client → server: one JSON object per text frame, tagged by `t`; unknown fields are refused:
//! - `{"t":"join","view":"room","room":"lobby-talk","after":42}`: start the view; `after` is
//!   the position of the last message the page shows (the resume point after a reconnect);
//! - `{"t":"send","ref":7,"id":"<uuid>","message":"hi"}`: post a message; `id` is made by the
//!   client once per message, so a resend after a reconnect or an unknown outcome posts once;
//! - `{"t":"edit","ref":8,"id":"<uuid>","version":12,"message":"hi!"}`: replace the text of
//!   one's own message `version` (its `data-version`);
//! - `{"t":"delete","ref":9,"id":"<uuid>","version":12}`: delete it;
//! - `{"t":"react","ref":10,"id":"<uuid>","version":12,"emoji":"👍","add":true}`: add one's
//!   reaction to message `version` (`"add":false` takes it back);
//! - `{"t":"typing"}`: the composer is being typed in (sent at most once a second);
//! - `{"t":"ping"}`: heartbeat.
//!
//! Server → client: a JSON header line, then for some frames a raw HTML body after the first
//! `\n`. HTML travels unescaped, so a message costs its HTML plus a ~25-byte header,
//! whatever the size of the room:
//! - `{"t":"joined","pos":N}`;
//! - `{"t":"msg","pos":N}\n<li…>`: a message's current state. The client replaces the element
//!   `#m-N` if it has one with a lower `data-rev` (an edit or delete: the frame's size does not
//!   depend on the room's length), appends it if `N` is past its last message, and otherwise
//!   ignores it (an update of a message it has not loaded);
//! - `{"t":"reset","pos":N,"more":true}\n<li…>…`: replace the list (bounded in bytes);
//! - `{"t":"ack","ref":7,"ok":true,"status":"stored"}`; `"status":"refused"` (final, with
//!   `"error"`: fix the input, the id may be reused for a new text); `"status":"unknown"` (with
//!   `"error"`: the store could not say whether it was stored; resend the same id until it
//!   is answered, which is safe because the id makes it post once);
//! - `{"t":"morph","id":"presence"}\n<html>`: replace the children of an element;
//! - `{"t":"typing","names":["alice"]}`: who is typing in the room (the client leaves itself out);
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
    /// Replaces the text of one's own message.
    Edit {
        /// The client's reference, echoed in the `ack`.
        #[serde(rename = "ref")]
        reference: u64,
        /// The command id.
        id: Uuid,
        /// The message (its `data-version`).
        version: u64,
        /// The new text.
        message: String,
    },
    /// Deletes one's own message.
    Delete {
        /// The client's reference, echoed in the `ack`.
        #[serde(rename = "ref")]
        reference: u64,
        /// The command id.
        id: Uuid,
        /// The message (its `data-version`).
        version: u64,
    },
    /// Adds or takes back one's reaction to a message.
    React {
        /// The client's reference, echoed in the `ack`.
        #[serde(rename = "ref")]
        reference: u64,
        /// The command id.
        id: Uuid,
        /// The message (its `data-version`).
        version: u64,
        /// One of the offered reactions.
        emoji: String,
        /// `true` to add it, `false` to take it back.
        add: bool,
    },
    /// The composer is being typed in.
    Typing {},
    /// Heartbeat.
    Ping {},
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

/// How a command ended, as the `ack` says it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckStatus<'a> {
    /// Stored (or already stored under this id with the same content).
    Stored,
    /// Refused for good, with the reason shown beside the composer.
    Refused(&'a str),
    /// Not known to be stored: resend with the same id.
    Unknown(&'a str),
}

#[derive(Serialize)]
struct Ack<'a> {
    t: &'static str,
    #[serde(rename = "ref")]
    reference: u64,
    ok: bool,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

/// The `ack` of the command sent with `reference`.
pub fn ack(reference: u64, status: &AckStatus<'_>) -> String {
    let (ok, name, error) = match status {
        AckStatus::Stored => (true, "stored", None),
        AckStatus::Refused(error) => (false, "refused", Some(*error)),
        AckStatus::Unknown(error) => (false, "unknown", Some(*error)),
    };
    serde_json::to_string(&Ack { t: "ack", reference, ok, status: name, error })
        .unwrap_or_else(|_| format!("{{\"t\":\"ack\",\"ref\":{reference},\"ok\":false,\"status\":\"unknown\"}}"))
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

#[derive(Serialize)]
struct TypingFrame<'a> {
    t: &'static str,
    names: &'a [String],
}

/// `{"t":"typing","names":[…]}`.
pub fn typing_frame(names: &[String]) -> String {
    serde_json::to_string(&TypingFrame { t: "typing", names })
        .unwrap_or_else(|_| "{\"t\":\"typing\",\"names\":[]}".to_owned())
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
        let edit: ClientFrame = serde_json::from_str(
            r#"{"t":"edit","ref":2,"id":"67e55044-10b1-426f-9247-bb680e5fe0c8","version":3,"message":"x"}"#,
        )
        .expect("edit");
        assert!(matches!(edit, ClientFrame::Edit { version: 3, .. }));
        assert_eq!(serde_json::from_str::<ClientFrame>(r#"{"t":"ping"}"#).expect("ping"), ClientFrame::Ping {});
        assert_eq!(serde_json::from_str::<ClientFrame>(r#"{"t":"typing"}"#).expect("typing"), ClientFrame::Typing {});
        for bad in [
            r#"{"t":"nope"}"#,
            r#"{"t":"send","ref":1}"#,
            "not json",
            r#"{"t":"join","view":"attic"}"#,
            r#"{"t":"send","ref":"x","id":"nope","message":1}"#,
            r#"{"t":"ping","x":1}"#,
            r#"{"t":"typing","who":"bob"}"#,
            r#"{"t":"join","view":"lobby","extra":true}"#,
            r#"{"t":"send","ref":1,"id":"67e55044-10b1-426f-9247-bb680e5fe0c8","message":"hi","sender":"eve"}"#,
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
    fn acks_say_stored_refused_or_unknown() {
        let stored: serde_json::Value = serde_json::from_str(&ack(1, &AckStatus::Stored)).expect("json");
        assert_eq!(stored, serde_json::json!({"t": "ack", "ref": 1, "ok": true, "status": "stored"}));
        let refused: serde_json::Value =
            serde_json::from_str(&ack(3, &AckStatus::Refused("the \"message\" is empty"))).expect("json");
        assert_eq!(refused["error"], "the \"message\" is empty");
        assert_eq!((refused["ok"].clone(), refused["status"].clone()), (false.into(), "refused".into()));
        let unknown: serde_json::Value = serde_json::from_str(&ack(4, &AckStatus::Unknown("later"))).expect("json");
        assert_eq!(unknown["status"], "unknown");
        let value: serde_json::Value = serde_json::from_str(&error_frame("bad\nframe")).expect("json");
        assert_eq!(value["t"], "error");
        let typing: serde_json::Value = serde_json::from_str(&typing_frame(&["a\"b".into()])).expect("json");
        assert_eq!(typing["names"][0], "a\"b");
    }
}
