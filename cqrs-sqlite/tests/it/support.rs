//! A store on a fresh file in its own temporary directory, removed when the store is dropped.

use std::path::{Path, PathBuf};

use cqrs_core::testing::WithGuard;
use cqrs_core::StreamId;
use cqrs_sqlite::SqliteEventStore;

/// A [`SqliteEventStore`] that owns the temporary directory of its file (dropped after the
/// store, so the files go last).
pub type TempStore = WithGuard<SqliteEventStore, tempfile::TempDir>;

/// A store on a fresh file in a new temporary directory.
pub async fn temp_store() -> TempStore {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteEventStore::open(dir.path().join("events.db")).await.expect("open store");
    WithGuard { store, guard: dir }
}

/// The database file of a [`TempStore`].
pub fn file_of(temp: &TempStore) -> PathBuf {
    temp.guard.path().join("events.db")
}

/// Opens `path` again, as a restarted process would.
pub async fn reopen(path: &Path) -> SqliteEventStore {
    SqliteEventStore::open(path).await.expect("reopen store")
}

/// A fresh stream id.
pub fn stream(name: &str) -> StreamId {
    StreamId::new(format!("{name}-{}", uuid::Uuid::new_v4().simple())).expect("stream id")
}
