//! Integration tests of cqrs-postgres, in one binary. Every test creates its own database on
//! the server named by `DATABASE_URL` (and drops it afterwards), so tests run in parallel.
//! Without `DATABASE_URL` every test fails with a message saying how to start a server.

mod appends;
mod checkpoints;
mod conformance;
mod dcb;
mod faults;
mod listener;
mod multi_process;
mod never_skip;
mod ordering;
mod projection;
mod restart;
mod schema;
mod support;
