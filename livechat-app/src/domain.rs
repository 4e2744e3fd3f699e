//! The write model: the `Chat` aggregate, its command `SendMessage`, its event `MessageSent`
//! and the rules it enforces, with typed errors shown to the sender.

use std::collections::{HashMap, VecDeque};
use std::fmt;

use cqrs_core::{Aggregate, Command, DomainEvent, StreamId, Timestamp};
use serde::{Deserialize, Serialize};

/// Longest chat id, in characters.
pub const MAX_CHAT_ID_LEN: usize = 64;
/// Longest sender name after trimming, in characters.
pub const MAX_SENDER_LEN: usize = 32;
/// Longest message after trimming, in characters.
pub const MAX_CONTENT_LEN: usize = 4_000;
/// Messages one sender may send to one room within [`RATE_WINDOW_MICROS`].
pub const RATE_LIMIT: usize = 5;
/// The rate-limit window: 5 seconds.
pub const RATE_WINDOW_MICROS: i64 = 5_000_000;

/// A room's id: 1–64 characters of `[A-Za-z0-9_-]`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ChatId(String);

/// Why a string is not a chat id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChatIdError {
    /// Empty.
    #[error("the room name is empty")]
    Empty,
    /// Over 64 characters.
    #[error("the room name is longer than {MAX_CHAT_ID_LEN} characters")]
    TooLong,
    /// A character outside `[A-Za-z0-9_-]`.
    #[error("the room name may only contain letters, digits, '-' and '_'")]
    BadCharacter,
}

impl ChatId {
    /// Validates `id`.
    pub fn parse(id: &str) -> Result<Self, ChatIdError> {
        if id.is_empty() {
            return Err(ChatIdError::Empty);
        }
        if id.len() > MAX_CHAT_ID_LEN {
            return Err(ChatIdError::TooLong);
        }
        if !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            return Err(ChatIdError::BadCharacter);
        }
        Ok(Self(id.to_owned()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The event stream of this room: `chat-{id}`.
    pub fn stream_id(&self) -> StreamId {
        // "chat-" plus at most 64 ASCII characters is always a valid stream id.
        StreamId::for_aggregate(Chat::CATEGORY, &self.0).unwrap_or_else(|_| unreachable!("short ascii id"))
    }

    /// The room of a `chat-{id}` stream, if it is one.
    pub fn from_stream(stream: &StreamId) -> Option<Self> {
        (stream.category() == Chat::CATEGORY).then(|| Self::parse(stream.aggregate_id()).ok()).flatten()
    }
}

impl TryFrom<String> for ChatId {
    type Error = ChatIdError;
    fn try_from(id: String) -> Result<Self, ChatIdError> {
        Self::parse(&id)
    }
}

impl From<ChatId> for String {
    fn from(id: ChatId) -> String {
        id.0
    }
}

impl fmt::Display for ChatId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ChatId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChatId({})", self.0)
    }
}

/// Checks a sender name and returns it trimmed: 1–32 characters, no control characters.
pub fn validate_sender(name: &str) -> Result<&str, ChatError> {
    let name = name.trim();
    if name.is_empty() {
        return Err(ChatError::EmptySender);
    }
    if name.chars().count() > MAX_SENDER_LEN {
        return Err(ChatError::SenderTooLong { max: MAX_SENDER_LEN });
    }
    if name.chars().any(char::is_control) {
        return Err(ChatError::SenderControlCharacters);
    }
    Ok(name)
}

/// Asks a room to post a message. Routed to the room's stream, `chat-{chat_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Command)]
#[command(aggregate = Chat, id = chat_id)]
pub struct SendMessage {
    /// The room.
    pub chat_id: ChatId,
    /// Who sends it, as typed (the aggregate trims and checks it).
    pub sender: String,
    /// The text, as typed (the aggregate trims and checks it).
    pub content: String,
    /// When the server received the command: the clock of the rate limit.
    pub sent_at: Timestamp,
}

/// The events of a room, stored under their variant names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, DomainEvent)]
#[event(category = "chat")]
pub enum ChatEvent {
    /// A message was posted.
    MessageSent(MessageSent),
}

/// A message was posted to a room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageSent {
    /// The room.
    pub chat_id: ChatId,
    /// The sender, trimmed.
    pub sender: String,
    /// The text, trimmed.
    pub content: String,
    /// When the server accepted it (microseconds since the Unix epoch).
    pub sent_at: Timestamp,
}

/// Why a room refused a message. The `Display` text is shown beside the composer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChatError {
    /// Blank message.
    #[error("the message is empty")]
    EmptyContent,
    /// Over [`MAX_CONTENT_LEN`] characters.
    #[error("the message is {len} characters long; the limit is {max}")]
    ContentTooLong {
        /// Its length in characters, after trimming.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A control character other than newline or tab.
    #[error("the message contains control characters")]
    ContentControlCharacters,
    /// Blank name.
    #[error("the name is empty")]
    EmptySender,
    /// Name over [`MAX_SENDER_LEN`] characters.
    #[error("the name is longer than {max} characters")]
    SenderTooLong {
        /// The limit.
        max: usize,
    },
    /// A control character in the name.
    #[error("the name contains control characters")]
    SenderControlCharacters,
    /// Too many messages from this sender in this room just now.
    #[error("slow down: at most {RATE_LIMIT} messages per 5 seconds; try again in {retry_after_ms} ms")]
    RateLimited {
        /// When the next message would be accepted.
        retry_after_ms: u64,
    },
}

/// A room's write-side state: only what its rules need, never the messages themselves.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Chat {
    /// Messages posted so far.
    pub messages: u64,
    /// Per sender, the times of their latest [`RATE_LIMIT`] messages, oldest first.
    recent: HashMap<String, VecDeque<Timestamp>>,
}

impl Chat {
    /// Drops senders whose latest message left the window `now` is in; bounds the state by
    /// the senders active in the last 5 seconds.
    fn forget_quiet_senders(&mut self, now: Timestamp) {
        self.recent.retain(|_, times| times.back().is_some_and(|last| now.0 - last.0 < RATE_WINDOW_MICROS));
    }

    /// How many senders the rate limit currently tracks.
    pub fn tracked_senders(&self) -> usize {
        self.recent.len()
    }
}

impl Aggregate for Chat {
    const CATEGORY: &'static str = "chat";
    type Command = SendMessage;
    type Event = ChatEvent;
    type Error = ChatError;

    fn execute(&self, command: &SendMessage) -> Result<Vec<ChatEvent>, ChatError> {
        let sender = validate_sender(&command.sender)?;
        let content = command.content.trim();
        if content.is_empty() {
            return Err(ChatError::EmptyContent);
        }
        let len = content.chars().count();
        if len > MAX_CONTENT_LEN {
            return Err(ChatError::ContentTooLong { len, max: MAX_CONTENT_LEN });
        }
        if content.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
            return Err(ChatError::ContentControlCharacters);
        }
        if let Some(times) = self.recent.get(sender) {
            if times.len() >= RATE_LIMIT {
                let oldest = times[times.len() - RATE_LIMIT];
                let elapsed = command.sent_at.0 - oldest.0;
                if elapsed < RATE_WINDOW_MICROS {
                    let wait_micros = RATE_WINDOW_MICROS - elapsed;
                    return Err(ChatError::RateLimited { retry_after_ms: (wait_micros as u64).div_ceil(1000) });
                }
            }
        }
        Ok(vec![ChatEvent::MessageSent(MessageSent {
            chat_id: command.chat_id.clone(),
            sender: sender.to_owned(),
            content: content.to_owned(),
            sent_at: command.sent_at,
        })])
    }

    fn apply(mut self, event: &ChatEvent) -> Self {
        let ChatEvent::MessageSent(sent) = event;
        self.messages += 1;
        if self.recent.len() > 64 {
            self.forget_quiet_senders(sent.sent_at);
        }
        let times = self.recent.entry(sent.sender.clone()).or_default();
        times.push_back(sent.sent_at);
        while times.len() > RATE_LIMIT {
            times.pop_front();
        }
        self
    }
}
