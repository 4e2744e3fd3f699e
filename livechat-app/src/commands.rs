//! The command path: what a person's send, edit or delete becomes, and what they are told.
//!
//! Every command carries the client's id, an idempotency key, and ends in one of three
//! [`Outcome`]s: stored, refused (final), or unknown (the store could not say whether the
//! append committed; the server has already tried once more with the same id, and the client
//! must resend the same id, which posts at most once). An id used before for a different
//! content is refused, never acknowledged as if the new content were stored.

use std::sync::Arc;
use std::time::Instant;

use cqrs_core::{
    CommandEnvelope, CommandId, Consistency, DispatchError, DispatchOutcome, Dispatcher, EventStore, StoreError,
    Timestamp, Upcasters,
};

use crate::domain::{validate_content, validate_sender, Chat, ChatCommand, ChatError, ChatEvent, ChatId};
use crate::limits::Limits;
use crate::metrics::{Limit, Metrics};
use crate::web::security::ClientAddress;

/// How a command ended, for the person who sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Stored (now, or the first time this id was sent with this content).
    Stored,
    /// Refused for good: the reason. Nothing was stored for it.
    Refused(String),
    /// Not known to be stored: the reason. Send the same id again.
    Unknown(String),
}

/// Who sends a command: the name from their cookie and their client address.
#[derive(Debug, Clone, Copy)]
pub struct Sender<'a> {
    /// Their name.
    pub name: &'a str,
    /// Their address (behind a trusted proxy: the forwarded one, or unknown).
    pub address: ClientAddress,
}

/// What the room knows that a command needs.
#[derive(Debug, Clone, Default)]
pub struct RoomFacts {
    /// Names the text may mention (people here and recent senders), longest first.
    pub names: Vec<String>,
    /// Whether the room has no event yet (a first message creates it).
    pub is_new: bool,
}

impl RoomFacts {
    /// What `room` knows now.
    pub fn of<P: crate::rooms::Present>(room: &crate::rooms::Room<P>) -> Self {
        Self { names: room.known_names(), is_new: room.head().version == 0 }
    }
}

/// The command path: the dispatcher, with the limits and counters around it.
#[derive(Clone)]
pub struct Commands {
    /// The chat's dispatcher.
    pub dispatcher: Dispatcher<Chat, dyn EventStore>,
    metrics: Arc<Metrics>,
    limits: Arc<Limits>,
}

/// The text shown when the store could not say whether a command was stored.
pub const UNKNOWN_TEXT: &str =
    "the server could not confirm that this was stored; retrying with the same id (it will be posted once)";

impl Commands {
    /// The command path over `dispatcher`.
    pub fn new(dispatcher: Dispatcher<Chat, dyn EventStore>, metrics: Arc<Metrics>, limits: Arc<Limits>) -> Self {
        Self { dispatcher, metrics, limits }
    }

    /// Posts `content` to `room` as `sender`.
    pub async fn send(
        &self,
        room: &ChatId,
        sender: Sender<'_>,
        id: uuid::Uuid,
        content: String,
        facts: &RoomFacts,
        consistency: &Consistency,
    ) -> Outcome {
        if let Err(refusal) = self.limits.command(sender.address) {
            self.metrics.limited(Limit::AddressCommands);
            return Outcome::Refused(refusal.to_string());
        }
        if facts.is_new {
            if let Err(refusal) = self.limits.new_room(sender.address) {
                self.metrics.limited(Limit::RoomCreation);
                return Outcome::Refused(refusal.to_string());
            }
        }
        let command = ChatCommand::SendMessage {
            chat_id: room.clone(),
            sender: sender.name.to_owned(),
            content,
            mentions: facts.names.clone(),
            sent_at: Timestamp::now(),
        };
        self.run(command, id, consistency).await
    }

    /// Replaces the text of `sender`'s message `version` in `room`.
    pub async fn edit(
        &self,
        room: &ChatId,
        sender: Sender<'_>,
        id: uuid::Uuid,
        version: u64,
        content: String,
        facts: &RoomFacts,
    ) -> Outcome {
        if let Err(refusal) = self.limits.command(sender.address) {
            self.metrics.limited(Limit::AddressCommands);
            return Outcome::Refused(refusal.to_string());
        }
        let command = ChatCommand::EditMessage {
            chat_id: room.clone(),
            version,
            sender: sender.name.to_owned(),
            content,
            mentions: facts.names.clone(),
            edited_at: Timestamp::now(),
        };
        self.run(command, id, &Consistency::Eventual).await
    }

    /// Adds (`add`) or takes back `sender`'s reaction `emoji` to message `version` in `room`.
    pub async fn react(
        &self,
        room: &ChatId,
        sender: Sender<'_>,
        id: uuid::Uuid,
        version: u64,
        emoji: String,
        add: bool,
    ) -> Outcome {
        if let Err(refusal) = self.limits.command(sender.address) {
            self.metrics.limited(Limit::AddressCommands);
            return Outcome::Refused(refusal.to_string());
        }
        let command = ChatCommand::React {
            chat_id: room.clone(),
            version,
            sender: sender.name.to_owned(),
            emoji,
            add,
            reacted_at: Timestamp::now(),
        };
        self.run(command, id, &Consistency::Eventual).await
    }

    /// Deletes `sender`'s message `version` in `room`.
    pub async fn delete(&self, room: &ChatId, sender: Sender<'_>, id: uuid::Uuid, version: u64) -> Outcome {
        if let Err(refusal) = self.limits.command(sender.address) {
            self.metrics.limited(Limit::AddressCommands);
            return Outcome::Refused(refusal.to_string());
        }
        let command = ChatCommand::DeleteMessage {
            chat_id: room.clone(),
            version,
            sender: sender.name.to_owned(),
            deleted_at: Timestamp::now(),
        };
        self.run(command, id, &Consistency::Eventual).await
    }

    /// Dispatches, retrying once with the same id when the outcome is unknown, inside a
    /// `chat_command` span (the root of the trace a send starts: the framework's `dispatch`,
    /// `append` and, through the events' headers, every `handle` span descend from it).
    async fn run(&self, command: ChatCommand, id: uuid::Uuid, consistency: &Consistency) -> Outcome {
        let span = tracing::info_span!(
            "chat_command",
            room = %command.chat_id(),
            command = command.kind(),
            command_id = %id,
            outcome = tracing::field::Empty,
        );
        let outcome = tracing::Instrument::instrument(self.run_inner(command, id, consistency), span.clone()).await;
        span.record(
            "outcome",
            match outcome {
                Outcome::Stored => "stored",
                Outcome::Refused(_) => "refused",
                Outcome::Unknown(_) => "unknown",
            },
        );
        outcome
    }

    async fn run_inner(&self, command: ChatCommand, id: uuid::Uuid, consistency: &Consistency) -> Outcome {
        let room = command.chat_id().clone();
        let started = Instant::now();
        let envelope = CommandEnvelope::new(command.clone()).with_command_id(CommandId(id));
        let mut result = self.dispatcher.dispatch_with(envelope.clone(), consistency).await;
        if matches!(result, Err(DispatchError::Store(StoreError::Unavailable(_)))) {
            self.metrics.commands_retried.increment(1);
            result = self.dispatcher.dispatch_with(envelope, consistency).await;
        }
        self.metrics.dispatch.record(started.elapsed().as_secs_f64());
        let outcome = match result {
            Ok(outcome) => self.stored(&command, &outcome).await,
            Err(DispatchError::ConsistencyTimeout { outcome, .. }) => self.stored(&command, &outcome).await,
            Err(DispatchError::Rejected(error)) => {
                if matches!(error, ChatError::RateLimited { .. }) {
                    self.metrics.limited(Limit::NameMessages);
                }
                if matches!(error, ChatError::ReactingTooFast { .. }) {
                    self.metrics.limited(Limit::NameReactions);
                }
                Outcome::Refused(error.to_string())
            }
            Err(DispatchError::InvalidStreamId(error)) => Outcome::Refused(error.to_string()),
            Err(
                error @ (DispatchError::TooManyConflicts { .. }
                | DispatchError::Store(StoreError::Unavailable(_) | StoreError::Closed)),
            ) => {
                tracing::warn!(%room, %error, "command outcome unknown");
                Outcome::Unknown(UNKNOWN_TEXT.to_owned())
            }
            Err(error) => {
                tracing::error!(%room, %error, "command failed");
                Outcome::Refused("the server could not store this; please report it".to_owned())
            }
        };
        let counter = match &outcome {
            Outcome::Stored => &self.metrics.commands_ok,
            Outcome::Refused(_) => &self.metrics.commands_refused,
            Outcome::Unknown(_) => &self.metrics.commands_unknown,
        };
        counter.increment(1);
        outcome
    }

    /// A dispatch that stored (or found) events: for a repeated id, whether the stored event
    /// says what this command says.
    async fn stored(&self, command: &ChatCommand, outcome: &DispatchOutcome) -> Outcome {
        let Some(appended) = outcome.appended.filter(|_| outcome.duplicate) else { return Outcome::Stored };
        let stored = self.dispatcher.store().read_stream(&outcome.stream_id, appended.first_version, 1).await;
        let event = match stored.as_deref() {
            Ok([recorded]) => Upcasters::new().decode_payload::<ChatEvent>(recorded).ok(),
            Ok(_) => None,
            Err(error) => {
                tracing::warn!(%error, "cannot read the first use of a repeated command id");
                return Outcome::Unknown(UNKNOWN_TEXT.to_owned());
            }
        };
        if event.as_ref().is_some_and(|event| same_content(command, event)) {
            Outcome::Stored
        } else {
            self.metrics.commands_id_reused.increment(1);
            Outcome::Refused(
                "this message id was already used for a different message; nothing was stored (reload the page to send it again)"
                    .to_owned(),
            )
        }
    }
}

/// Whether `event`, stored by an earlier command with the same id, is what `command` would
/// store now.
fn same_content(command: &ChatCommand, event: &ChatEvent) -> bool {
    match (command, event) {
        (ChatCommand::SendMessage { sender, content, .. }, ChatEvent::MessageSent(sent)) => {
            validate_sender(sender).is_ok_and(|s| s == sent.sender)
                && validate_content(content).is_ok_and(|c| c == sent.content)
        }
        (ChatCommand::EditMessage { version, sender, content, .. }, ChatEvent::MessageEdited(edited)) => {
            *version == edited.version
                && validate_sender(sender).is_ok_and(|s| s == edited.sender)
                && validate_content(content).is_ok_and(|c| c == edited.content)
        }
        (ChatCommand::DeleteMessage { version, sender, .. }, ChatEvent::MessageDeleted(deleted)) => {
            *version == deleted.version && validate_sender(sender).is_ok_and(|s| s == deleted.sender)
        }
        (ChatCommand::React { version, sender, emoji, add: true, .. }, ChatEvent::ReactionAdded(reaction))
        | (ChatCommand::React { version, sender, emoji, add: false, .. }, ChatEvent::ReactionRemoved(reaction)) => {
            *version == reaction.version
                && *emoji == reaction.emoji
                && validate_sender(sender).is_ok_and(|s| s == reaction.sender)
        }
        _ => false,
    }
}
