//! Integration tests of cqrs-memory, in one binary: the shared conformance suite, the
//! dispatcher and handler runner on top of this store, and property tests.

mod batches;
mod conformance;
mod dispatcher;
mod exclusive;
mod handlers;
mod lease;
mod parking;
mod partitions;
mod properties;
mod subscriptions;
mod telemetry;
