#![doc = include_str!("../README.md")]
//!
//! # Modules
//! - [`ids`]: stream ids, versions, positions and message ids.
//! - [`event`]: the event trait, envelopes, metadata and upcasting.
//! - [`aggregate`]: the write model and command envelopes.
//! - [`query`]: Dynamic Consistency Boundaries: tags, queries and append conditions.
//! - [`store`]: for store authors: the [`EventStore`] (event log) and [`Coordination`] traits,
//!   joined by [`Store`], with their errors, the append checks, row helpers and the group-commit
//!   queue ([`store::batching`]).
//! - [`coordination`]: claims, parked events, process state and schedules kept by the store.
//! - [`subscription`]: catch-up-then-live feeds over any store.
//! - [`decision`]: command handlers whose consistency boundary is a query (DCB).
//! - [`dispatcher`]: the command path with caching, retries and read-your-writes.
//! - [`handler`]: projections and side effects, driven from durable checkpoints; one active
//!   consumer across processes, partitions, parked events, transactional batches.
//! - [`process`]: process managers (sagas) with durable state and scheduled commands.
//! - [`rebuild`]: projections rebuilt beside the live one and switched in one step.
//! - [`clock`]: the clock of schedules (system, or a test clock).
//! - [`telemetry`]: the spans and metrics the framework emits (every name in one table).
//! - `testing` (feature `testing`): the given/when/then harness and the store conformance suite.

// The derive macros name `::cqrs_core`; this lets them work inside this crate too (the test
// domain and the conformance suite use them).
#[allow(unused_extern_crates)]
extern crate self as cqrs_core;

pub mod aggregate;
mod cache;
pub mod clock;
pub mod coordination;
pub mod decision;
pub mod dispatcher;
pub mod event;
pub mod handler;
pub mod ids;
pub mod process;
pub mod query;
pub mod rebuild;
pub mod store;
pub mod subscription;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;

/// Re-exported so [`EventStore`] and [`Coordination`] implementations need no extra dependency:
/// `#[cqrs_core::async_trait]`.
pub use async_trait::async_trait;

/// The derive macros (feature `derive`, on by default): `#[derive(DomainEvent)]` and
/// `#[derive(Command)]`. They share their names with the traits, as serde's do, so one `use`
/// brings both. See [`DomainEvent`] and [`Command`] for the attributes.
#[cfg(feature = "derive")]
pub use cqrs_derive::{Command, DomainEvent};

/// What the derive macros' generated code calls. Not a public API: it may change in any
/// release.
#[doc(hidden)]
pub mod __private {
    pub use serde_json::{Error, Map, Value};

    use serde::de::{DeserializeOwned, Error as _};
    use serde::Serialize;

    /// A value as JSON.
    pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Value, Error> {
        serde_json::to_value(value)
    }

    /// A value from JSON, without copying the JSON.
    pub fn decode<T: DeserializeOwned>(payload: &Value) -> Result<T, Error> {
        T::deserialize(payload)
    }

    /// One field of a struct variant's payload; an absent key reads as `null` (so an `Option`
    /// field added later decodes old events as `None`).
    pub fn field<T: DeserializeOwned>(payload: &Value, key: &str) -> Result<T, Error> {
        let Value::Object(object) = payload else {
            return Err(Error::custom(format!("expected an object with field `{key}`, found {}", kind(payload))));
        };
        match object.get(key) {
            Some(value) => T::deserialize(value).map_err(|error| Error::custom(format!("field `{key}`: {error}"))),
            None => T::deserialize(&Value::Null).map_err(|_| Error::custom(format!("missing field `{key}`"))),
        }
    }

    /// Element `index` of a tuple variant's payload of `len` elements.
    pub fn element<T: DeserializeOwned>(payload: &Value, index: usize, len: usize) -> Result<T, Error> {
        match payload {
            Value::Array(items) if items.len() == len => T::deserialize(&items[index]),
            other => Err(Error::custom(format!("expected an array of {len} elements, found {}", kind(other)))),
        }
    }

    /// The error for a stored type name the event type does not know.
    pub fn unknown_event_type(event_type: &str) -> Error {
        Error::custom(format!("unknown event type {event_type:?}"))
    }

    fn kind(value: &Value) -> &'static str {
        match value {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Number(_) => "a number",
            Value::String(_) => "a string",
            Value::Array(_) => "an array",
            Value::Object(_) => "an object",
        }
    }
}

pub use aggregate::{Aggregate, Command, CommandEnvelope};
pub use clock::{Clock, TestClock};
pub use coordination::{
    default_owner, Claim, ClaimOutcome, ParkedEvent, ParkedStatus, ProcessInstance, ProcessState, Scheduled,
    SetAsideCommand, DEFAULT_CLAIM_RETRY, DEFAULT_CLAIM_TTL, MAX_FIRING_ATTEMPTS,
};
pub use decision::{Decider, Decision};
pub use dispatcher::{Consistency, DispatchError, DispatchOutcome, Dispatcher, DispatcherConfig, SnapshotPolicy};
pub use event::{
    DecodeError, DomainEvent, Envelope, FnUpcaster, Metadata, NewEvent, RecordedEvent, UpcastResult, Upcaster,
    Upcasters,
};
pub use handler::{
    current_claim, spawn_batch_handler, spawn_handler, BatchHandler, Checkpoints, ControlError, ErrorPolicy,
    EventHandler, HandlerControl, HandlerError, HandlerState, HandlerStatus, ParkedEvents, Placement, Progress,
    ProgressError, RunnerConfig, RunningHandler, StartFrom, DEFAULT_MAX_BATCH,
};
pub use ids::{CausationId, CommandId, CorrelationId, EventId, Position, StreamId, StreamIdError, Timestamp, Version};
pub use process::{
    spawn_process_manager, CommandRouter, CompensationRefused, Effects, ProcessAdmin, ProcessManager, Rejection,
    RepeatedStep, Route, RouteError, RunningProcess,
};
pub use query::{AppendCondition, Query, QueryItem, Tag, TagError};
pub use store::{
    AppendOutcome, AppendResult, Coordination, EventStore, ExpectedVersion, Snapshot, Store, StoreError, StreamAppend,
    DEFAULT_COMMAND_RETENTION, MAX_EVENTS_PER_APPEND, MAX_STREAMS_PER_APPEND,
};
pub use subscription::Subscription;
