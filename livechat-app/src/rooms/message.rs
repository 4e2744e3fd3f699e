//! A message as readers see it now: the `MessageSent` with every later edit or delete folded
//! in, and where its latest change sits in the room's stream.

use std::sync::Arc;

use cqrs_core::{Position, Timestamp};

use crate::domain::{ChatEvent, MessageSent, Reaction, REACTIONS};

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
    /// Who reacted with what: each offered emoji someone chose, in [`REACTIONS`] order, with
    /// their names, sorted (none on a deleted message).
    pub reactions: Vec<(&'static str, Vec<String>)>,
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
            reactions: Vec::new(),
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
            (ChatEvent::MessageDeleted(deleted), _) if deleted.version == self.sent.version => {
                return Self { body: Body::Deleted, reactions: Vec::new(), revision: at, ..self.clone() };
            }
            (ChatEvent::ReactionAdded(reaction), Body::Text { .. }) if reaction.version == self.sent.version => {
                return Self { reactions: self.reacted(reaction, true), revision: at, ..self.clone() };
            }
            (ChatEvent::ReactionRemoved(reaction), Body::Text { .. }) if reaction.version == self.sent.version => {
                return Self { reactions: self.reacted(reaction, false), revision: at, ..self.clone() };
            }
            _ => return self.clone(),
        };
        Self { body, revision: at, ..self.clone() }
    }

    /// The reactions after `reaction` is added (`add`) or taken back: one of each emoji per
    /// person, so adding twice or taking back what is not there changes nothing.
    fn reacted(&self, reaction: &Reaction, add: bool) -> Vec<(&'static str, Vec<String>)> {
        let Some(&emoji) = REACTIONS.iter().find(|&&offered| offered == reaction.emoji) else {
            return self.reactions.clone();
        };
        let mut reactions = self.reactions.clone();
        let at = reactions.iter().position(|(shown, _)| *shown == emoji);
        match (at, add) {
            (Some(i), true) => {
                if let Err(place) = reactions[i].1.binary_search(&reaction.sender) {
                    reactions[i].1.insert(place, reaction.sender.clone());
                }
            }
            (Some(i), false) => {
                reactions[i].1.retain(|name| *name != reaction.sender);
                if reactions[i].1.is_empty() {
                    reactions.remove(i);
                }
            }
            (None, true) => {
                reactions.push((emoji, vec![reaction.sender.clone()]));
                reactions.sort_by_key(|(shown, _)| REACTIONS.iter().position(|offered| offered == shown));
            }
            (None, false) => {}
        }
        reactions
    }

    /// Whether `name` reacted with `emoji`.
    pub fn has_reacted(&self, name: &str, emoji: &str) -> bool {
        self.reactions.iter().any(|(shown, names)| *shown == emoji && names.iter().any(|n| n == name))
    }

    /// Whether the message is deleted.
    pub fn is_deleted(&self) -> bool {
        self.body == Body::Deleted
    }
}

/// The message an edit, delete or reaction is about, if it is one.
pub fn target_of(event: &ChatEvent) -> Option<u64> {
    match event {
        ChatEvent::MessageSent(_) => None,
        ChatEvent::MessageEdited(edited) => Some(edited.version),
        ChatEvent::MessageDeleted(deleted) => Some(deleted.version),
        ChatEvent::ReactionAdded(reaction) | ChatEvent::ReactionRemoved(reaction) => Some(reaction.version),
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
