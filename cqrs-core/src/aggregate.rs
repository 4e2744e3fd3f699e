//! The write model: [`Aggregate`] (pure decide and evolve functions), the [`Command`] trait
//! that routes a command to its stream, and the [`CommandEnvelope`] that carries a command with
//! its idempotency key and tracing ids.

use std::collections::HashMap;
use std::fmt;

use crate::event::{DomainEvent, Metadata, RecordedEvent};
use crate::ids::{CausationId, CommandId, CorrelationId, EventId, StreamId};

/// An aggregate: the consistency boundary that decides which events a command produces.
///
/// Both functions are pure: [`execute`](Aggregate::execute) looks at the current state and the
/// command and returns new events (or a domain error); [`apply`](Aggregate::apply) folds one event
/// into the state. One aggregate instance is one stream.
///
/// ```
/// use cqrs_core::{Aggregate, Command, DomainEvent, StreamId};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, Default, Clone)]
/// struct Counter { value: u64 }
///
/// #[derive(Debug)]
/// struct Increment { counter: u32, by: u64 }
/// impl Command for Increment {
///     fn stream_id(&self) -> StreamId { StreamId::for_aggregate("counter", self.counter).expect("short id") }
/// }
///
/// #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
/// struct Incremented { by: u64 }
/// impl DomainEvent for Incremented {
///     const EVENT_TYPES: &'static [&'static str] = &["Incremented"];
///     fn event_type(&self) -> &'static str { "Incremented" }
/// }
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
pub trait Command: fmt::Debug + Send + Sync + 'static {
    /// The stream of the aggregate instance that handles this command.
    fn stream_id(&self) -> StreamId;
}

/// A command with its idempotency key and tracing ids.
///
/// Build one with [`CommandEnvelope::new`], or from an event with [`RecordedEvent::cause`] so
/// causation and correlation flow from the event to the command and on to its events.
#[derive(Debug, Clone)]
pub struct CommandEnvelope<C> {
    /// The command.
    pub command: C,
    /// The command's id; doubles as its idempotency key for its stream.
    pub command_id: CommandId,
    /// Whether the id was set by the caller (and so is an idempotency key) or generated.
    pub idempotent: bool,
    /// What caused this command (an event id), if anything.
    pub causation_id: Option<CausationId>,
    /// The conversation; defaults to a value derived from the command id.
    pub correlation_id: Option<CorrelationId>,
    /// Application headers copied onto every event this command produces.
    pub headers: HashMap<String, String>,
}

impl<C> CommandEnvelope<C> {
    /// Wraps a command with a fresh command id (not an idempotency key).
    pub fn new(command: C) -> Self {
        Self {
            command,
            command_id: CommandId::new(),
            idempotent: false,
            causation_id: None,
            correlation_id: None,
            headers: HashMap::new(),
        }
    }

    /// Sets the command id chosen by the caller. Dispatching the same id again to the same
    /// stream produces no new events and returns the first outcome, even after a restart.
    #[must_use]
    pub fn with_command_id(mut self, command_id: CommandId) -> Self {
        self.command_id = command_id;
        self.idempotent = true;
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

    /// Marks this command as caused by `event`: causation = the event's id, correlation = the
    /// event's correlation id, headers inherited.
    #[must_use]
    pub fn caused_by(self, event: &RecordedEvent) -> Self {
        self.caused_by_event(event.event_id, &event.metadata)
    }

    /// Like [`caused_by`](Self::caused_by), from an event's id and metadata.
    #[must_use]
    pub fn caused_by_event(mut self, event_id: EventId, metadata: &Metadata) -> Self {
        self.causation_id = Some(CausationId::from(event_id));
        self.correlation_id = metadata.correlation_id.or(self.correlation_id);
        for (key, value) in &metadata.headers {
            self.headers.entry(key.clone()).or_insert_with(|| value.clone());
        }
        self
    }

    /// The metadata given to each event this command produces.
    pub fn event_metadata(&self) -> Metadata {
        Metadata {
            command_id: Some(self.command_id),
            causation_id: Some(CausationId::from(self.command_id)),
            correlation_id: Some(self.correlation_id.unwrap_or(CorrelationId(self.command_id.0))),
            headers: self.headers.clone(),
        }
    }
}
