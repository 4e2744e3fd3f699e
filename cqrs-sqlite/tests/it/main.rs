//! Integration tests of cqrs-sqlite, in one binary: the shared conformance suite on a fresh
//! file per test, reopening, `kill -9`, group commit, and faults.

mod batching;
mod conformance;
mod crash;
mod dcb;
mod faults;
mod never_skip;
mod reopen;
mod support;
