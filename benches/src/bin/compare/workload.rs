//! The chat workload, written once and implemented for both frameworks: one `Chat` type is
//! both a `cqrs_core::Aggregate` and a `cqrs_es::Aggregate`, with the same decision, the same
//! event type and the same serde payload, so the two sides do the same domain work.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use cqrs_core::{Envelope, EventHandler, HandlerError, StreamId};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{EventEnvelope, Query};
use serde::{Deserialize, Serialize};

/// Bytes of message text in every command.
pub const CONTENT_BYTES: usize = 120;
/// The longest message the aggregate accepts.
const MAX_CONTENT_BYTES: usize = 1_000;
/// Stream category (ours) and aggregate type (cqrs-es).
const CATEGORY: &str = "chat";

/// A chat room's write model: how many messages it holds.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Chat {
    messages: u64,
}

/// Send a message to chat `chat`.
#[derive(Debug)]
pub struct SendMessage {
    pub chat: u32,
    pub sender: String,
    pub content: String,
}

/// A message was sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageSent {
    pub sender: String,
    pub content: String,
}

/// Why a message was refused (never, with this workload's commands).
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("message is empty")]
    Empty,
    #[error("message is longer than {MAX_CONTENT_BYTES} bytes")]
    TooLong,
}

impl Chat {
    /// The decision both frameworks run.
    fn decide(&self, command: &SendMessage) -> Result<(), ChatError> {
        if command.content.is_empty() {
            return Err(ChatError::Empty);
        }
        if command.content.len() > MAX_CONTENT_BYTES {
            return Err(ChatError::TooLong);
        }
        Ok(())
    }
}

/// The stream id (ours) and aggregate id (cqrs-es) of a chat: the same text on both sides.
pub fn chat_id(chat: u32) -> String {
    format!("{CATEGORY}-{chat}")
}

/// Command number `index` of a run over `chats` chats. The same index gives the same command
/// on both sides. With one chat every command goes to chat 0; otherwise the chat is a hash of
/// the index, so concurrent tasks sometimes hit the same chat at the same time, as users do.
pub fn command(index: u64, chats: u32) -> SendMessage {
    let chat = if chats <= 1 { 0 } else { (splitmix64(index) % u64::from(chats)) as u32 };
    let mut content = format!("message {index} ");
    content.extend(std::iter::repeat_n('x', CONTENT_BYTES.saturating_sub(content.len())));
    SendMessage { chat, sender: format!("user-{}", index % 50), content }
}

fn splitmix64(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

// --- this project ---------------------------------------------------------------------------

impl cqrs_core::Command for SendMessage {
    fn stream_id(&self) -> Result<StreamId, cqrs_core::StreamIdError> {
        StreamId::new(chat_id(self.chat))
    }
}

impl cqrs_core::DomainEvent for MessageSent {
    const EVENT_TYPES: &'static [&'static str] = &["MessageSent"];
    fn event_type(&self) -> &'static str {
        "MessageSent"
    }
}

impl cqrs_core::Aggregate for Chat {
    const CATEGORY: &'static str = CATEGORY;
    type Command = SendMessage;
    type Event = MessageSent;
    type Error = ChatError;

    fn execute(&self, command: &SendMessage) -> Result<Vec<MessageSent>, ChatError> {
        self.decide(command)?;
        Ok(vec![MessageSent { sender: command.sender.clone(), content: command.content.clone() }])
    }

    fn apply(mut self, _event: &MessageSent) -> Self {
        self.messages += 1;
        self
    }
}

/// Our read model: counts the events it is handed (run by `spawn_handler`).
#[derive(Debug, Clone, Default)]
pub struct MessageCount(pub Arc<AtomicU64>);

/// The handler name [`MessageCount`] registers under.
pub const COUNT_HANDLER: &str = "message_count";

impl EventHandler for MessageCount {
    type Event = MessageSent;
    fn name(&self) -> &str {
        COUNT_HANDLER
    }
    async fn handle(&self, _event: Envelope<MessageSent>) -> Result<(), HandlerError> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

// --- cqrs-es --------------------------------------------------------------------------------

impl cqrs_es::DomainEvent for MessageSent {
    fn event_type(&self) -> String {
        "MessageSent".to_owned()
    }
    fn event_version(&self) -> String {
        "1.0".to_owned()
    }
}

impl cqrs_es::Aggregate for Chat {
    const TYPE: &'static str = CATEGORY;
    type Command = SendMessage;
    type Event = MessageSent;
    type Error = ChatError;
    type Services = ();

    async fn handle(&mut self, command: SendMessage, _services: &(), sink: &EventSink<Self>) -> Result<(), ChatError> {
        self.decide(&command)?;
        sink.write(MessageSent { sender: command.sender, content: command.content }, self).await;
        Ok(())
    }

    fn apply(&mut self, _event: MessageSent) {
        self.messages += 1;
    }
}

/// The peer's read model: a `Query`, called in-process after each commit.
#[derive(Debug, Clone, Default)]
pub struct PeerMessageCount(pub Arc<AtomicU64>);

#[async_trait]
impl Query<Chat> for PeerMessageCount {
    async fn dispatch(&self, _aggregate_id: &str, events: &[EventEnvelope<Chat>]) {
        self.0.fetch_add(events.len() as u64, Ordering::Relaxed);
    }
}
