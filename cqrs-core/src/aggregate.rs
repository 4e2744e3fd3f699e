//! The write model: [`Aggregate`] (pure decide and evolve functions), the [`Command`] trait
//! that routes a command to its stream, and the [`CommandEnvelope`] that carries a command with
//! its idempotency key and tracing ids.

use std::collections::HashMap;
use std::fmt;

use crate::event::{DomainEvent, Metadata};
use crate::ids::{CausationId, CommandId, CorrelationId, EventId, StreamId, StreamIdError};

/// An aggregate: the consistency boundary that decides which events a command produces.
///
/// Both functions are pure: [`execute`](Aggregate::execute) looks at the current state and the
/// command and returns new events (or a domain error); [`apply`](Aggregate::apply) folds one event
/// into the state. One aggregate instance is one stream, named `{CATEGORY}-{id}`.
///
/// ```
/// use cqrs_core::{Aggregate, Command, DomainEvent};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, Default, Clone)]
/// struct Counter { value: u64 }
///
/// #[derive(Debug, Command)]
/// #[command(aggregate = Counter, id = counter)]
/// struct Increment { counter: u32, by: u64 }
///
/// #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
/// #[event(category = "counter")]
/// struct Incremented { by: u64 }
///
/// #[derive(Debug, thiserror::Error, PartialEq)]
/// #[error("overflow")]
/// struct Overflow;
///
/// impl Aggregate for Counter {
///     const CATEGORY: &'static str = "counter";
///     type Command = Increment;
///     type Event = Incremented;
///     type Error = Overflow;
///     fn execute(&self, command: &Increment) -> Result<Vec<Incremented>, Overflow> {
///         self.value.checked_add(command.by).ok_or(Overflow)?;
///         Ok(vec![Incremented { by: command.by }])
///     }
///     fn apply(mut self, event: &Incremented) -> Self {
///         self.value += event.by;
///         self
///     }
/// }
///
/// let state = Counter::default().apply(&Incremented { by: 2 });
/// assert_eq!(state.execute(&Increment { counter: 1, by: u64::MAX }), Err(Overflow));
/// assert_eq!(Increment { counter: 1, by: 1 }.stream_id()?.as_str(), "counter-1");
/// # Ok::<(), cqrs_core::StreamIdError>(())
/// ```
pub trait Aggregate: Default + Clone + Send + Sync + 'static {
    /// The stream category of this aggregate's instances (`"account"` → `account-42`).
    const CATEGORY: &'static str;
    /// The commands this aggregate handles (usually an enum).
    type Command: Command;
    /// The events it emits (usually an enum).
    type Event: DomainEvent;
    /// Its domain errors: the command is refused and nothing is stored.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Decides: the events that `command` produces in the current state, or why it is refused.
    /// Returning no events is allowed and stores nothing.
    fn execute(&self, command: &Self::Command) -> Result<Vec<Self::Event>, Self::Error>;

    /// Evolves: the state after `event`. Must not fail: the event already happened.
    fn apply(self, event: &Self::Event) -> Self;
}

/// A command: knows which stream (aggregate instance) it is addressed to.
///
/// Derive it with `#[derive(Command)]` and `#[command(aggregate = Type, id = field)]` (or
/// `category = "..."`; the field defaults to `id`, and a field marked `#[command(id)]` wins),
/// or write it by hand. Routing can fail: an id taken from a request may be too long or hold
/// a control character. The dispatcher then answers [`DispatchError::InvalidStreamId`]
/// (a 4xx) and decides nothing.
///
/// ```
/// use cqrs_core::{Command, StreamIdError};
///
/// #[derive(Debug, Command)]
/// #[command(category = "account")]
/// enum AccountCommand {
///     Open { id: String, owner: String },
///     Close { id: String },
/// }
///
/// let open = AccountCommand::Open { id: "42".into(), owner: "ada".into() };
/// assert_eq!(open.stream_id()?.as_str(), "account-42");
/// let oversized = AccountCommand::Close { id: "x".repeat(1000) };
/// assert!(matches!(oversized.stream_id(), Err(StreamIdError::TooLong { .. })));
/// # Ok::<(), StreamIdError>(())
/// ```
///
/// [`DispatchError::InvalidStreamId`]: crate::DispatchError::InvalidStreamId
pub trait Command: fmt::Debug + Send + Sync + 'static {
    /// The stream of the aggregate instance that handles this command, or why the command
    /// names no valid stream.
    fn stream_id(&self) -> Result<StreamId, StreamIdError>;
}

/// A command with its idempotency key and tracing ids.
///
/// Build one with [`CommandEnvelope::new`], or from an event with [`Envelope::cause`] so the
/// command gets an id derived from the event and causation and correlation flow from the
/// event to the command and on to its events (see [`Metadata`]).
///
/// Every command id is an idempotency key for its stream, whether the caller chose it or
/// [`new`](Self::new) generated it: dispatching the same envelope again (for example after an
/// [`Unavailable`](crate::StoreError::Unavailable) error, when the first try may have
/// committed) applies it at most once. Ids are remembered for the store's command retention
/// (see [`EventStore::prune_commands`](crate::EventStore::prune_commands)).
///
/// [`Envelope::cause`]: crate::Envelope::cause
#[derive(Debug, Clone)]
pub struct CommandEnvelope<C> {
    /// The command.
    pub command: C,
    /// The command's id; its idempotency key for its stream.
    pub command_id: CommandId,
    /// What caused this command (an event id), if anything; stored as the causation id of the
    /// command's events.
    pub causation_id: Option<CausationId>,
    /// The conversation; defaults to a value derived from the command id.
    pub correlation_id: Option<CorrelationId>,
    /// Application headers copied onto every event this command produces.
    pub headers: HashMap<String, String>,
}

impl<C> CommandEnvelope<C> {
    /// Wraps a command with a fresh random command id.
    pub fn new(command: C) -> Self {
        Self {
            command,
            command_id: CommandId::new(),
            causation_id: None,
            correlation_id: None,
            headers: HashMap::new(),
        }
    }

    /// Sets the command id chosen by the caller (for example sent by the client with the
    /// request). Dispatching the same id again to the same stream produces no new events and
    /// returns the first outcome, even after a restart.
    #[must_use]
    pub fn with_command_id(mut self, command_id: CommandId) -> Self {
        self.command_id = command_id;
        self
    }

    /// Sets the correlation id.
    #[must_use]
    pub fn with_correlation_id(mut self, correlation_id: CorrelationId) -> Self {
        self.correlation_id = Some(correlation_id);
        self
    }

    /// Adds an application header, copied onto the events.
    #[must_use]
    pub fn with_header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(key.into(), value.into());
        self
    }

    /// Marks this command as the one sent at `step` in reaction to the event `event_id` with
    /// `metadata`: its id becomes [`CommandId::derived`]`(event_id, step)`, its causation the
    /// event, its correlation the event's, and the event's headers are inherited (without
    /// overriding headers already set). [`Envelope::cause`](crate::Envelope::cause) calls it.
    #[must_use]
    pub fn caused_by(mut self, event_id: EventId, metadata: &Metadata, step: &str) -> Self {
        self.command_id = CommandId::derived(event_id, step);
        self.causation_id = Some(CausationId::from(event_id));
        self.correlation_id = metadata.correlation_id.or(self.correlation_id);
        for (key, value) in &metadata.headers {
            self.headers.entry(key.clone()).or_insert_with(|| value.clone());
        }
        self
    }

    /// The same envelope (id, causation, correlation, headers) around another command: for a
    /// router that turns a process manager's command enum into one aggregate's command.
    pub fn map<D>(self, f: impl FnOnce(C) -> D) -> CommandEnvelope<D> {
        CommandEnvelope {
            command: f(self.command),
            command_id: self.command_id,
            causation_id: self.causation_id,
            correlation_id: self.correlation_id,
            headers: self.headers,
        }
    }

    /// The metadata given to each event this command produces: its command id, its causation
    /// (what caused the command), its correlation (the command id's if none was set) and its
    /// headers.
    pub fn event_metadata(&self) -> Metadata {
        Metadata {
            command_id: Some(self.command_id),
            causation_id: self.causation_id,
            correlation_id: Some(self.correlation_id.unwrap_or(CorrelationId(self.command_id.0))),
            headers: self.headers.clone(),
        }
    }
}
