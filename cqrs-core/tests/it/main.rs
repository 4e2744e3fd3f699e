//! Behaviour tests of cqrs-core, in one binary, on the in-memory store (`cqrs_memory`): the
//! dispatcher, handler runners (partitions, parking, exclusivity, leases, batches),
//! subscriptions, telemetry and property tests. Each store's conformance run lives in its own
//! crate's `tests/it/`.

mod batches;
mod control;
mod decisions;
mod dispatcher;
mod exclusive;
mod handlers;
mod lease;
mod parking;
mod partitions;
mod properties;
mod rebuilds;
mod subscriptions;
mod telemetry;
