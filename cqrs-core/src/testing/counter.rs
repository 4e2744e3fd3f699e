//! A tiny test domain: counters that go up and down but never below zero. Used by the
//! conformance suite, the docs and the property tests.

use serde::{Deserialize, Serialize};

use crate::aggregate::Aggregate;
use crate::ids::StreamId;
use crate::{Command, DomainEvent};

/// The state of one counter.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counter {
    /// Current value.
    pub value: u64,
    /// How many events were applied.
    pub applied: u64,
}

/// Commands to a counter, routed to `counter-{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Command)]
#[command(aggregate = Counter)]
pub enum CounterCommand {
    /// Adds `by`.
    Increment {
        /// Which counter.
        id: u32,
        /// How much.
        by: u64,
    },
    /// Subtracts `by`; refused below zero.
    Decrement {
        /// Which counter.
        id: u32,
        /// How much.
        by: u64,
    },
    /// Produces no events.
    Noop {
        /// Which counter.
        id: u32,
    },
}

impl CounterCommand {
    /// `Increment { id, by }`.
    pub fn increment(id: u32, by: u64) -> Self {
        CounterCommand::Increment { id, by }
    }
    /// `Decrement { id, by }`.
    pub fn decrement(id: u32, by: u64) -> Self {
        CounterCommand::Decrement { id, by }
    }
}

/// Events of a counter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, DomainEvent)]
#[event(category = "counter")]
pub enum CounterEvent {
    /// The counter went up.
    Incremented {
        /// How much.
        by: u64,
    },
    /// The counter went down.
    Decremented {
        /// How much.
        by: u64,
    },
}

/// Why a counter refused a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CounterError {
    /// Decrementing would go below zero.
    #[error("cannot decrement {value} by {by}")]
    WouldGoNegative {
        /// Current value.
        value: u64,
        /// Requested decrement.
        by: u64,
    },
    /// Incrementing would overflow.
    #[error("counter overflow")]
    Overflow,
}

impl Counter {
    /// The stream of counter `id`.
    pub fn stream_id(id: u32) -> StreamId {
        // "counter-" plus at most 10 digits is always a valid stream id.
        StreamId::for_aggregate(Self::CATEGORY, id).unwrap_or_else(|_| unreachable!("short ascii id"))
    }
}

impl Aggregate for Counter {
    const CATEGORY: &'static str = "counter";
    type Command = CounterCommand;
    type Event = CounterEvent;
    type Error = CounterError;

    fn execute(&self, command: &CounterCommand) -> Result<Vec<CounterEvent>, CounterError> {
        match *command {
            CounterCommand::Increment { by, .. } => {
                self.value.checked_add(by).ok_or(CounterError::Overflow)?;
                Ok(vec![CounterEvent::Incremented { by }])
            }
            CounterCommand::Decrement { by, .. } if by > self.value => {
                Err(CounterError::WouldGoNegative { value: self.value, by })
            }
            CounterCommand::Decrement { by, .. } => Ok(vec![CounterEvent::Decremented { by }]),
            CounterCommand::Noop { .. } => Ok(Vec::new()),
        }
    }

    fn apply(mut self, event: &CounterEvent) -> Self {
        match *event {
            CounterEvent::Incremented { by } => self.value += by,
            CounterEvent::Decremented { by } => self.value -= by,
        }
        self.applied += 1;
        self
    }
}
