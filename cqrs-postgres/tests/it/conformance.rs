//! The shared store conformance suite, each property on a fresh database.

use cqrs_core::testing::conformance;

use crate::support::TestStore;

cqrs_core::conformance_tests!(|| async { TestStore::fresh().await });

/// A checkpoint saved through one store instance is loaded by a new instance (a restarted
/// process) on the same database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_survive_reopen() {
    let store = TestStore::fresh().await;
    // The closure holds only the database, so the first store is really gone before reopening.
    let db = std::sync::Arc::clone(&store.db);
    let reopen = move || async move { std::sync::Arc::new(TestStore { store: db.store().await, db }) };
    conformance::checkpoints_survive_reopen(store, reopen).await;
}
