//! Integration tests of cqrs-sqlite, in one binary: the shared conformance suite on a fresh
//! file per test, reopening, group commit, and faults.

mod batching;
mod conformance;
mod faults;
mod reopen;
mod support;
