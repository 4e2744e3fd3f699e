//! The shared store conformance suite, each test on its own fresh file.

use std::sync::Arc;

use cqrs_core::testing::conformance;

use crate::support::{reopen, temp_store};

cqrs_core::conformance_tests!(|| async { Arc::new(temp_store().await) });

/// A checkpoint saved before the store is closed is read back by a new store on the same file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_survive_reopen() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("events.db");
    let store = Arc::new(cqrs_sqlite::SqliteEventStore::open(&path).await.expect("open"));
    conformance::checkpoints_survive_reopen(store, || async { Arc::new(reopen(&path).await) }).await;
}
