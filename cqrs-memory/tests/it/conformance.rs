//! The shared store conformance suite, run against `MemoryStore`.

use std::sync::Arc;

use cqrs_memory::MemoryStore;

cqrs_core::conformance_tests!(|| async { Arc::new(MemoryStore::new()) });

/// The memory store is not durable, but a clone is the same store: checkpoints saved through
/// one handle are seen through another.
#[tokio::test]
async fn checkpoints_are_shared_between_handles() {
    let store = Arc::new(MemoryStore::new());
    let same = Arc::clone(&store);
    cqrs_core::testing::conformance::checkpoints_survive_reopen(store, || async move { same }).await;
}
