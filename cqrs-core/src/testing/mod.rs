//! Test support, behind the `testing` feature: the given/when/then [`AggregateTest`] harness,
//! the store [`conformance`] suite every backend runs, and a tiny test domain ([`counter`]).

pub mod conformance;
pub mod counter;
mod harness;

pub use harness::{AggregateTest, Then};
