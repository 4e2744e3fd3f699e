//! The write model: the `Chat` aggregate, its commands (send, edit, delete a message), its
//! events and the rules it enforces, with typed errors shown to the sender.
//!
//! A message is named by the stream version of its `MessageSent` event: its place in the
//! room's stream, stable for ever, and readable back with `EventStore::read_stream`.

use std::collections::{HashMap, VecDeque};
use std::fmt;

use cqrs_core::{Aggregate, Command, DomainEvent, StreamId, Tag, Timestamp};
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
/// How long after sending a message its sender may edit or delete it: 15 minutes.
pub const EDIT_WINDOW_MICROS: i64 = 15 * 60 * 1_000_000;
/// A message may be edited or deleted only while fewer than this many events have been stored
/// in its room after it. This bounds how far a reader of an older page must look ahead for the
/// edits of the messages on it (see `rooms::history`), whatever the room's traffic.
pub const MAX_EDIT_DISTANCE: u64 = 500;
/// The reactions a message can get, one of each per person.
pub const REACTIONS: [&str; 6] = ["👍", "❤️", "😂", "🎉", "😮", "😢"];
/// Reactions (added or removed) one person may make in one room within [`RATE_WINDOW_MICROS`].
pub const REACTION_RATE_LIMIT: usize = 20;
/// Most distinct names one message may mention.
pub const MAX_MENTIONS: usize = 20;
/// Room ids that are also top-level routes, so no room can be named after them.
pub const RESERVED_CHAT_IDS: [&str; 8] =
    ["dashboard", "metrics", "health", "assets", "live", "join", "admin", "search"];

/// A room's id: 1–64 characters of `[A-Za-z0-9_-]`, not a route name.
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
    /// The name of a page of the site (`dashboard`, `metrics`, ...).
    #[error("the room name {0:?} is reserved; choose another")]
    Reserved(String),
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
        if RESERVED_CHAT_IDS.iter().any(|reserved| reserved.eq_ignore_ascii_case(id)) {
            return Err(ChatIdError::Reserved(id.to_owned()));
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

/// Characters that are invisible or change the direction of the text around them (bidi
/// overrides, isolates and marks, zero-width characters, line and paragraph separators). A
/// name containing one could pass for another person's, or reorder what follows it.
pub fn is_invisible_or_bidi(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{061C}' | '\u{180E}' | '\u{200B}'..='\u{200F}' | '\u{2028}'..='\u{202E}'
        | '\u{2060}'..='\u{206F}' | '\u{FEFF}' | '\u{FFF9}'..='\u{FFFB}')
}

/// Checks a sender name and returns it trimmed: 1–32 characters, no control, invisible or
/// direction-changing characters.
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
    if name.chars().any(is_invisible_or_bidi) {
        return Err(ChatError::SenderInvisibleCharacters);
    }
    Ok(name)
}

/// Checks a message's text and returns it trimmed: 1–4 000 characters, no control characters
/// other than newline and tab.
pub fn validate_content(content: &str) -> Result<&str, ChatError> {
    let content = content.trim();
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
    Ok(content)
}

/// The names of `candidates` that `content` mentions as `@name` (followed by the end, a space
/// or punctuation), at most [`MAX_MENTIONS`], in the order given, each once.
pub fn mentioned<'a>(content: &str, candidates: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut found: Vec<String> = Vec::new();
    for name in candidates {
        if found.len() >= MAX_MENTIONS {
            break;
        }
        if !name.is_empty() && !found.iter().any(|f| f == name) && mention_at(content, name).is_some() {
            found.push(name.to_owned());
        }
    }
    found
}

/// The byte offset of the first `@name` in `content` that ends at a word boundary.
pub fn mention_at(content: &str, name: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(found) = content[from..].find('@') {
        let at = from + found;
        let rest = &content[at + 1..];
        if let Some(tail) = rest.strip_prefix(name) {
            let after = tail.chars().next();
            let before_ok = content[..at].chars().next_back().is_none_or(|c| !c.is_alphanumeric());
            if before_ok && after.is_none_or(|c| !(c.is_alphanumeric() || c == '_' || c == '-')) {
                return Some(at);
            }
        }
        from = at + 1;
    }
    None
}

/// Asks a room to post a message: the short form of [`ChatCommand::SendMessage`] without
/// mentions (`.into()` turns it into the command).
#[derive(Debug, Clone, PartialEq, Eq)]
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

impl From<SendMessage> for ChatCommand {
    fn from(send: SendMessage) -> Self {
        ChatCommand::SendMessage {
            chat_id: send.chat_id,
            sender: send.sender,
            content: send.content,
            mentions: Vec::new(),
            sent_at: send.sent_at,
        }
    }
}

/// What a room is asked to do. Routed to the room's stream, `chat-{chat_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Command)]
#[command(aggregate = Chat, id = chat_id)]
pub enum ChatCommand {
    /// Post a message.
    SendMessage {
        /// The room.
        chat_id: ChatId,
        /// Who sends it, as typed (trimmed and checked).
        sender: String,
        /// The text, as typed (trimmed and checked).
        content: String,
        /// Names of people in the room the text may mention as `@name`; only those it does
        /// mention are kept.
        mentions: Vec<String>,
        /// When the server received the command: the clock of the rate limit.
        sent_at: Timestamp,
    },
    /// Replace the text of one's own message.
    EditMessage {
        /// The room.
        chat_id: ChatId,
        /// The message: the stream version of its `MessageSent`.
        version: u64,
        /// Who asks (must be the message's sender).
        sender: String,
        /// The new text (trimmed and checked like a new message).
        content: String,
        /// Names the new text may mention.
        mentions: Vec<String>,
        /// When the server received the command.
        edited_at: Timestamp,
    },
    /// Add (or take back) one's reaction to any message of the room.
    React {
        /// The room.
        chat_id: ChatId,
        /// The message: the stream version of its `MessageSent`.
        version: u64,
        /// Who reacts.
        sender: String,
        /// One of [`REACTIONS`].
        emoji: String,
        /// `true` to add it, `false` to take it back.
        add: bool,
        /// When the server received the command.
        reacted_at: Timestamp,
    },
    /// Delete one's own message: its text is no longer shown to anyone.
    DeleteMessage {
        /// The room.
        chat_id: ChatId,
        /// The message: the stream version of its `MessageSent`.
        version: u64,
        /// Who asks (must be the message's sender).
        sender: String,
        /// When the server received the command.
        deleted_at: Timestamp,
    },
}

impl ChatCommand {
    /// The room the command is for.
    pub fn chat_id(&self) -> &ChatId {
        match self {
            ChatCommand::SendMessage { chat_id, .. }
            | ChatCommand::EditMessage { chat_id, .. }
            | ChatCommand::React { chat_id, .. }
            | ChatCommand::DeleteMessage { chat_id, .. } => chat_id,
        }
    }

    /// The command's name: `send`, `edit`, `react` or `delete`.
    pub fn kind(&self) -> &'static str {
        match self {
            ChatCommand::SendMessage { .. } => "send",
            ChatCommand::EditMessage { .. } => "edit",
            ChatCommand::React { .. } => "react",
            ChatCommand::DeleteMessage { .. } => "delete",
        }
    }
}

/// The events of a room, stored under their variant names. Reactions are tagged with their
/// message ([`reaction_tag`]), so a page of old messages finds its reactions by tag, wherever
/// they are in the room's stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, DomainEvent)]
#[event(category = "chat", tags = reaction_tags)]
pub enum ChatEvent {
    /// A message was posted.
    MessageSent(MessageSent),
    /// A message's text was replaced by its sender.
    MessageEdited(MessageEdited),
    /// A message was deleted by its sender.
    MessageDeleted(MessageDeleted),
    /// Someone reacted to a message.
    ReactionAdded(Reaction),
    /// Someone took their reaction back.
    ReactionRemoved(Reaction),
}

/// The tag of the reactions to message `version` of room `chat_id`: `reaction:{room}/{version}`.
pub fn reaction_tag(chat_id: &ChatId, version: u64) -> Tag {
    Tag::new("reaction", format!("{chat_id}/{version}"))
}

fn reaction_tags(event: &ChatEvent) -> Vec<Tag> {
    match event {
        ChatEvent::ReactionAdded(reaction) | ChatEvent::ReactionRemoved(reaction) => {
            vec![reaction_tag(&reaction.chat_id, reaction.version)]
        }
        _ => Vec::new(),
    }
}

impl ChatEvent {
    /// The room the event belongs to.
    pub fn chat_id(&self) -> &ChatId {
        match self {
            ChatEvent::MessageSent(e) => &e.chat_id,
            ChatEvent::MessageEdited(e) => &e.chat_id,
            ChatEvent::MessageDeleted(e) => &e.chat_id,
            ChatEvent::ReactionAdded(e) | ChatEvent::ReactionRemoved(e) => &e.chat_id,
        }
    }
}

/// A reaction to a message, added or taken back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reaction {
    /// The room.
    pub chat_id: ChatId,
    /// The message: the stream version of its `MessageSent`.
    pub version: u64,
    /// Who reacted, trimmed.
    pub sender: String,
    /// One of [`REACTIONS`].
    pub emoji: String,
    /// When.
    pub at: Timestamp,
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
    /// The message's number in its room: 1 for the first (0 in events stored before the
    /// number was recorded).
    #[serde(default)]
    pub number: u64,
    /// Names the text mentions as `@name`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mentions: Vec<String>,
}

/// A message's text was replaced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageEdited {
    /// The room.
    pub chat_id: ChatId,
    /// The message: the stream version of its `MessageSent`.
    pub version: u64,
    /// The sender (the message's own).
    pub sender: String,
    /// The new text, trimmed.
    pub content: String,
    /// Names the new text mentions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mentions: Vec<String>,
    /// When.
    pub edited_at: Timestamp,
}

/// A message was deleted. The event log keeps the original `MessageSent` (it is immutable);
/// every read model drops its text (see the README, "What a delete erases").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageDeleted {
    /// The room.
    pub chat_id: ChatId,
    /// The message: the stream version of its `MessageSent`.
    pub version: u64,
    /// The sender (the message's own).
    pub sender: String,
    /// When.
    pub deleted_at: Timestamp,
}

/// Why a room refused a command. The `Display` text is shown beside the composer.
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
    /// An invisible or text-direction character in the name ([`is_invisible_or_bidi`]).
    #[error("the name contains invisible or text-direction characters")]
    SenderInvisibleCharacters,
    /// Too many messages from this sender in this room just now.
    #[error("slow down: at most {RATE_LIMIT} messages per 5 seconds; try again in {retry_after_ms} ms")]
    RateLimited {
        /// When the next message would be accepted.
        retry_after_ms: u64,
    },
    /// No message has this number in the room.
    #[error("there is no such message")]
    NoSuchMessage,
    /// Someone else's message.
    #[error("you can only edit or delete your own messages")]
    NotYourMessage,
    /// Too old (15 minutes, or too many messages since) to be changed.
    #[error("a message can be edited or deleted only in the first 15 minutes")]
    EditWindowClosed,
    /// The message was deleted.
    #[error("the message was deleted")]
    AlreadyDeleted,
    /// Not one of [`REACTIONS`].
    #[error("that reaction is not offered; choose one of 👍 ❤️ 😂 🎉 😮 😢")]
    UnknownReaction,
    /// Too many reactions from this person in this room just now.
    #[error("slow down: at most {REACTION_RATE_LIMIT} reactions per 5 seconds; try again in {retry_after_ms} ms")]
    ReactingTooFast {
        /// When the next reaction would be accepted.
        retry_after_ms: u64,
    },
}

/// A recent message whose sender may still change it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Editable {
    version: u64,
    sender: String,
    sent_at: Timestamp,
    deleted: bool,
}

/// A room's write-side state: only what its rules need, never the message texts.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Chat {
    /// Messages posted so far.
    pub messages: u64,
    /// Events in the stream so far: the stream's version.
    pub events: u64,
    /// Per sender, the times of their latest [`RATE_LIMIT`] messages, oldest first.
    recent: HashMap<String, VecDeque<Timestamp>>,
    /// Messages still within the edit window, oldest first.
    editable: VecDeque<Editable>,
    /// Bit `v` is set when version `v` of the stream is a `MessageSent` (what a reaction may
    /// name): one bit per event.
    message_bits: Vec<u64>,
    /// The versions of deleted messages.
    deleted: std::collections::HashSet<u64>,
    /// Per person, the times of their latest [`REACTION_RATE_LIMIT`] reactions, oldest first.
    recent_reactions: HashMap<String, VecDeque<Timestamp>>,
}

impl Chat {
    /// Drops senders whose latest message left the window `now` is in; bounds the state by
    /// the senders active in the last 5 seconds.
    fn forget_quiet_senders(&mut self, now: Timestamp) {
        self.recent.retain(|_, times| times.back().is_some_and(|last| now.0 - last.0 < RATE_WINDOW_MICROS));
    }

    /// Drops messages that can no longer be changed as of `now` and the current version.
    fn forget_closed_messages(&mut self, now: Timestamp) {
        while self.editable.front().is_some_and(|m| {
            self.events.saturating_sub(m.version) >= MAX_EDIT_DISTANCE || now.0 - m.sent_at.0 > EDIT_WINDOW_MICROS
        }) {
            self.editable.pop_front();
        }
    }

    /// How many senders the rate limit currently tracks.
    pub fn tracked_senders(&self) -> usize {
        self.recent.len()
    }

    /// How many messages may still be edited (the state kept for the edit rules).
    pub fn editable_messages(&self) -> usize {
        self.editable.len()
    }

    fn check_rate(&self, sender: &str, now: Timestamp) -> Result<(), ChatError> {
        match wait_for(self.recent.get(sender), RATE_LIMIT, now) {
            Some(retry_after_ms) => Err(ChatError::RateLimited { retry_after_ms }),
            None => Ok(()),
        }
    }

    /// Whether stream version `version` is a message.
    fn is_message(&self, version: u64) -> bool {
        let (word, bit) = (usize::try_from(version / 64).unwrap_or(usize::MAX), version % 64);
        self.message_bits.get(word).is_some_and(|bits| bits & (1 << bit) != 0)
    }

    /// The message `version` if `sender` may react to it at `now` with `emoji`.
    fn reactable(&self, version: u64, sender: &str, emoji: &str, now: Timestamp) -> Result<(), ChatError> {
        if !REACTIONS.contains(&emoji) {
            return Err(ChatError::UnknownReaction);
        }
        if !self.is_message(version) {
            return Err(ChatError::NoSuchMessage);
        }
        if self.deleted.contains(&version) {
            return Err(ChatError::AlreadyDeleted);
        }
        match wait_for(self.recent_reactions.get(sender), REACTION_RATE_LIMIT, now) {
            Some(retry_after_ms) => Err(ChatError::ReactingTooFast { retry_after_ms }),
            None => Ok(()),
        }
    }

    /// The message `version` if `sender` may change it at `now`.
    fn changeable(&self, version: u64, sender: &str, now: Timestamp) -> Result<&Editable, ChatError> {
        if version == 0 || version > self.events {
            return Err(ChatError::NoSuchMessage);
        }
        let message = self.editable.iter().find(|m| m.version == version);
        let Some(message) = message else {
            // Either too old, or an event that is not a message: both read as closed.
            return Err(ChatError::EditWindowClosed);
        };
        if message.sender != sender {
            return Err(ChatError::NotYourMessage);
        }
        if message.deleted {
            return Err(ChatError::AlreadyDeleted);
        }
        if now.0 - message.sent_at.0 > EDIT_WINDOW_MICROS || self.events - version >= MAX_EDIT_DISTANCE {
            return Err(ChatError::EditWindowClosed);
        }
        Ok(message)
    }
}

/// How long (ms) until one more action fits `limit` per [`RATE_WINDOW_MICROS`], given the times
/// of the latest ones; `None` if it fits now.
fn wait_for(times: Option<&VecDeque<Timestamp>>, limit: usize, now: Timestamp) -> Option<u64> {
    let times = times.filter(|times| times.len() >= limit)?;
    let elapsed = now.0 - times[times.len() - limit].0;
    (elapsed < RATE_WINDOW_MICROS).then(|| ((RATE_WINDOW_MICROS - elapsed) as u64).div_ceil(1000))
}

/// Remembers one more action at `at`, keeping the latest `limit`.
fn record(times: &mut VecDeque<Timestamp>, at: Timestamp, limit: usize) {
    times.push_back(at);
    while times.len() > limit {
        times.pop_front();
    }
}

impl Aggregate for Chat {
    const CATEGORY: &'static str = "chat";
    type Command = ChatCommand;
    type Event = ChatEvent;
    type Error = ChatError;

    fn execute(&self, command: &ChatCommand) -> Result<Vec<ChatEvent>, ChatError> {
        match command {
            ChatCommand::SendMessage { chat_id, sender, content, mentions, sent_at } => {
                let sender = validate_sender(sender)?;
                let content = validate_content(content)?;
                self.check_rate(sender, *sent_at)?;
                Ok(vec![ChatEvent::MessageSent(MessageSent {
                    chat_id: chat_id.clone(),
                    sender: sender.to_owned(),
                    content: content.to_owned(),
                    sent_at: *sent_at,
                    number: self.messages + 1,
                    mentions: mentioned(content, mentions.iter().map(String::as_str)),
                })])
            }
            ChatCommand::EditMessage { chat_id, version, sender, content, mentions, edited_at } => {
                let sender = validate_sender(sender)?;
                let content = validate_content(content)?;
                let message = self.changeable(*version, sender, *edited_at)?;
                Ok(vec![ChatEvent::MessageEdited(MessageEdited {
                    chat_id: chat_id.clone(),
                    version: message.version,
                    sender: sender.to_owned(),
                    content: content.to_owned(),
                    mentions: mentioned(content, mentions.iter().map(String::as_str)),
                    edited_at: *edited_at,
                })])
            }
            ChatCommand::React { chat_id, version, sender, emoji, add, reacted_at } => {
                let sender = validate_sender(sender)?;
                self.reactable(*version, sender, emoji, *reacted_at)?;
                let reaction = Reaction {
                    chat_id: chat_id.clone(),
                    version: *version,
                    sender: sender.to_owned(),
                    emoji: emoji.clone(),
                    at: *reacted_at,
                };
                Ok(vec![if *add { ChatEvent::ReactionAdded(reaction) } else { ChatEvent::ReactionRemoved(reaction) }])
            }
            ChatCommand::DeleteMessage { chat_id, version, sender, deleted_at } => {
                let sender = validate_sender(sender)?;
                let message = self.changeable(*version, sender, *deleted_at)?;
                Ok(vec![ChatEvent::MessageDeleted(MessageDeleted {
                    chat_id: chat_id.clone(),
                    version: message.version,
                    sender: sender.to_owned(),
                    deleted_at: *deleted_at,
                })])
            }
        }
    }

    fn apply(mut self, event: &ChatEvent) -> Self {
        self.events += 1;
        match event {
            ChatEvent::MessageSent(sent) => {
                self.messages += 1;
                if self.recent.len() > 64 {
                    self.forget_quiet_senders(sent.sent_at);
                }
                record(self.recent.entry(sent.sender.clone()).or_default(), sent.sent_at, RATE_LIMIT);
                let (word, bit) = (usize::try_from(self.events / 64).unwrap_or(usize::MAX), self.events % 64);
                if self.message_bits.len() <= word {
                    self.message_bits.resize(word + 1, 0);
                }
                self.message_bits[word] |= 1 << bit;
                self.editable.push_back(Editable {
                    version: self.events,
                    sender: sent.sender.clone(),
                    sent_at: sent.sent_at,
                    deleted: false,
                });
                self.forget_closed_messages(sent.sent_at);
            }
            ChatEvent::MessageEdited(edited) => self.forget_closed_messages(edited.edited_at),
            ChatEvent::MessageDeleted(deleted) => {
                if let Some(message) = self.editable.iter_mut().find(|m| m.version == deleted.version) {
                    message.deleted = true;
                }
                self.deleted.insert(deleted.version);
                self.forget_closed_messages(deleted.deleted_at);
            }
            ChatEvent::ReactionAdded(reaction) | ChatEvent::ReactionRemoved(reaction) => {
                if self.recent_reactions.len() > 64 {
                    self.recent_reactions.retain(|_, times| {
                        times.back().is_some_and(|last| reaction.at.0 - last.0 < RATE_WINDOW_MICROS)
                    });
                }
                record(
                    self.recent_reactions.entry(reaction.sender.clone()).or_default(),
                    reaction.at,
                    REACTION_RATE_LIMIT,
                );
            }
        }
        self
    }
}
