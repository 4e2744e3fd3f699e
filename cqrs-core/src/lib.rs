#![doc = include_str!("../README.md")]
//!
//! # Modules
//! - [`ids`]: stream ids, versions, positions and message ids.
//! - [`event`]: the event trait, envelopes, metadata and upcasting.
//! - [`aggregate`]: the write model and command envelopes.
//! - [`store`]: the [`EventStore`] trait that backends implement.
//! - [`batching`]: for store implementors, the group-commit write queue with its fairness rule.
//! - [`subscription`]: catch-up-then-live feeds over any store.
//! - [`dispatcher`]: the command path with caching, retries and read-your-writes.
//! - [`handler`]: projections and side effects, driven from durable checkpoints.
//! - `testing` (feature `testing`): the given/when/then harness and the store conformance suite.

pub mod aggregate;
pub mod batching;
mod cache;
pub mod dispatcher;
pub mod event;
pub mod handler;
pub mod ids;
pub mod store;
pub mod subscription;
#[cfg(feature = "testing")]
pub mod testing;

/// Re-exported so handler implementations need no extra dependency: `#[cqrs_core::async_trait]`.
pub use async_trait::async_trait;

pub use aggregate::{Aggregate, Command, CommandEnvelope};
pub use dispatcher::{Consistency, DispatchError, DispatchOutcome, Dispatcher, DispatcherConfig, SnapshotPolicy};
pub use event::{
    DecodeError, DomainEvent, Envelope, FnUpcaster, Metadata, NewEvent, RecordedEvent, UpcastResult, Upcaster,
    Upcasters,
};
pub use handler::{
    spawn_handler, Checkpoints, EventHandler, HandlerError, HandlerState, HandlerStatus, Progress, ProgressError,
    RunnerConfig, RunningHandler, StartFrom,
};
pub use ids::{CausationId, CommandId, CorrelationId, EventId, Position, StreamId, StreamIdError, Timestamp, Version};
pub use store::{
    validate_append, AppendOutcome, AppendResult, EventStore, ExpectedVersion, Snapshot, StoreError,
    MAX_EVENTS_PER_APPEND,
};
pub use subscription::Subscription;
