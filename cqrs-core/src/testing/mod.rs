//! Test support, behind the `testing` feature: the given/when/then [`AggregateTest`] harness,
//! the store [`conformance`] suite every backend runs, a tiny test domain ([`counter`]),
//! [`ProcessTest`] (given/when/then for process managers), [`DecisionTest`] (for decisions), and [`WithGuard`] for stores that
//! own their test resources; [`never_skip`], readers that prove a store never skips a late commit.

pub mod conformance;
mod conformance_atomic;
mod conformance_dcb;
pub mod counter;
mod decision;
mod guard;
mod harness;
pub mod never_skip;
mod process;
pub mod saga;

pub use decision::{DecisionTest, DecisionThen};
pub use guard::WithGuard;
pub use harness::{AggregateTest, Then};
pub use process::{ProcessTest, ProcessThen, TEST_EPOCH};
