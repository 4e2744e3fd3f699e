//! Integration tests of cqrs-memory, in one binary: the shared conformance suite, the
//! dispatcher and handler runner on top of this store, and property tests.

mod conformance;
mod dispatcher;
mod handlers;
mod properties;
mod subscriptions;
