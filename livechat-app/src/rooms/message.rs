//! A message as readers see it now: the `MessageSent` with every later edit or delete folded
//! in, and where its latest change sits in the room's stream.

use std::sync::Arc;

use cqrs_core::{Position, Timestamp};

use crate::domain::{ChatEvent, MessageSent};

/// A place in a room's stream: the event's stream version and its global position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Revision {
    /// The event's version in the room's stream.
    pub version: u64,
    /// The event's global position.
    pub position: Position,
}

/// What a message says now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// Its text (edited or not).
    Text {
        /// The text.
        content: String,
        /// The names it mentions.
        mentions: Vec<String>,
        /// Whether its sender replaced the first text.
        edited: bool,
    },
    /// Deleted: the text is gone from every read model.
    Deleted,
}

/// One message's current state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageData {
    /// Where the `MessageSent` is: the message's identity (`version`) and its position in
    /// the log (the page's resume point).
    pub sent: Revision,
    /// The message's number in its room (0 if stored before numbers were recorded).
    pub number: u64,
    /// Who sent it.
    pub sender: String,
    /// When.
    pub sent_at: Timestamp,
    /// What it says now.
    pub body: Body,
    /// The latest change: the `MessageSent` itself, or its latest edit or delete. Readers keep
    /// the state with the highest revision, so replays and races cannot bring an old text back.
    pub revision: Revision,
}

impl MessageData {
    /// A message as posted.
    pub fn sent(at: Revision, event: &MessageSent) -> Self {
        Self {
            sent: at,
            number: event.number,
            sender: event.sender.clone(),
            sent_at: event.sent_at,
            body: Body::Text { content: event.content.clone(), mentions: event.mentions.clone(), edited: false },
            revision: at,
        }
    }

    /// This message after `event` (an edit or delete of it) at `at`; unchanged for any other
    /// event or an older revision.
    pub fn changed(&self, at: Revision, event: &ChatEvent) -> Self {
        if at <= self.revision {
            return self.clone();
        }
        let body = match (event, &self.body) {
            (ChatEvent::MessageEdited(edited), Body::Text { .. }) if edited.version == self.sent.version => {
                Body::Text { content: edited.content.clone(), mentions: edited.mentions.clone(), edited: true }
            }
            (ChatEvent::MessageDeleted(deleted), _) if deleted.version == self.sent.version => Body::Deleted,
            _ => return self.clone(),
        };
        Self { body, revision: at, ..self.clone() }
    }

    /// Whether the message is deleted.
    pub fn is_deleted(&self) -> bool {
        self.body == Body::Deleted
    }
}

/// The message an edit or delete is about, if it is one.
pub fn target_of(event: &ChatEvent) -> Option<u64> {
    match event {
        ChatEvent::MessageSent(_) => None,
        ChatEvent::MessageEdited(edited) => Some(edited.version),
        ChatEvent::MessageDeleted(deleted) => Some(deleted.version),
    }
}

/// A message with the form its readers get it in (made once per state, shared by all).
#[derive(Debug)]
pub struct Message<M> {
    /// The state.
    pub data: MessageData,
    /// How it is shown (see [`Present`](super::Present)).
    pub shown: M,
}

/// A shared message.
pub type Shared<M> = Arc<Message<M>>;
