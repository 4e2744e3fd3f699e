//! The shared store conformance suite, each property on a fresh database.

use cqrs_core::testing::{conformance, WithGuard};

use crate::support::fresh_store;

cqrs_core::conformance_tests!(|| async { fresh_store().await });

/// A checkpoint saved through one store instance is loaded by a new instance (a restarted
/// process) on the same database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_survive_reopen() {
    let store = fresh_store().await;
    // The closure holds only the database, so the first store is really gone before reopening.
    let db = std::sync::Arc::clone(&store.guard);
    let reopen = move || async move { std::sync::Arc::new(WithGuard { store: db.store().await, guard: db }) };
    conformance::checkpoints_survive_reopen(store, reopen).await;
}
