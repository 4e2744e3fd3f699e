//! Test support, behind the `testing` feature: the given/when/then [`AggregateTest`] harness,
//! the store [`conformance`] suite every backend runs, a tiny test domain ([`counter`]), and
//! [`WithGuard`] for stores that own their test resources.

pub mod conformance;
pub mod counter;
mod guard;
mod harness;

pub use guard::WithGuard;
pub use harness::{AggregateTest, Then};
