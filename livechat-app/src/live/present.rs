//! How the live layer shows the read model's states: each message state rendered to HTML once
//! and kept as its ready websocket frame, shared by every viewer; the presence list as HTML;
//! who is typing as a ready frame.

use std::sync::Arc;

use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::protocol;
use crate::render;
use crate::rooms::{ChatReadModel, Message, MessageData, Present, Shared};

/// The chat's presenter.
#[derive(Debug, Clone, Copy, Default)]
pub struct LivePresent;

/// A message state as viewers get it: its `msg` frame, whose tail is the message's HTML.
#[derive(Debug)]
pub struct LiveMessage {
    frame: Utf8Bytes,
    html_at: usize,
}

impl LiveMessage {
    /// The message's HTML (`li.msg`).
    pub fn html(&self) -> &str {
        &self.frame.as_str()[self.html_at..]
    }

    /// The websocket frame announcing this state (shared bytes: cloning does not copy).
    pub fn frame(&self) -> Utf8Bytes {
        self.frame.clone()
    }
}

impl Present for LivePresent {
    type Message = LiveMessage;
    type Presence = Arc<str>;
    type Typing = Utf8Bytes;

    fn message(&self, message: &MessageData) -> LiveMessage {
        let html = render::message(message, false).into_string();
        let (frame, html_at) = protocol::message_frame(message.sent.position, &html);
        LiveMessage { frame: frame.into(), html_at }
    }

    fn weight(&self, message: &Message<LiveMessage>) -> usize {
        message.shown.frame.len()
    }

    fn presence(&self, names: &[&str], count: usize) -> Arc<str> {
        Arc::from(render::presence(names, count).into_string())
    }

    fn typing(&self, names: &[String]) -> Utf8Bytes {
        protocol::typing_frame(names).into()
    }
}

/// The chat's read model.
pub type Model = ChatReadModel<LivePresent>;

/// A message as the live layer shares it.
pub type LiveShared = Shared<LiveMessage>;
