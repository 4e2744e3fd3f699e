//! A store on a fresh file in its own temporary directory, removed when the store is dropped.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use cqrs_core::{
    AppendOutcome, AppendResult, CommandId, EventStore, ExpectedVersion, NewEvent, Position, RecordedEvent, Snapshot,
    StoreError, StreamId, Version,
};
use cqrs_sqlite::{SqliteEventStore, SqliteStoreConfig};
use tokio::sync::watch;

/// A [`SqliteEventStore`] that owns the temporary directory of its file.
pub struct TempStore {
    pub store: SqliteEventStore,
    /// Dropped after `store` (fields drop in order), so the files go last.
    pub dir: tempfile::TempDir,
}

impl TempStore {
    pub async fn new() -> Self {
        Self::with_config(SqliteStoreConfig::default()).await
    }

    pub async fn with_config(config: SqliteStoreConfig) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteEventStore::open_with(dir.path().join("events.db"), config).await.expect("open store");
        Self { store, dir }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("events.db")
    }
}

/// Opens `path` again, as a restarted process would.
pub async fn reopen(path: &Path) -> SqliteEventStore {
    SqliteEventStore::open(path).await.expect("reopen store")
}

#[async_trait]
impl EventStore for TempStore {
    async fn append(
        &self,
        stream_id: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendOutcome, StoreError> {
        self.store.append(stream_id, expected, events).await
    }

    async fn read_stream(
        &self,
        stream_id: &StreamId,
        from: Version,
        max_count: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.store.read_stream(stream_id, from, max_count).await
    }

    async fn read_all(&self, after: Position, max_count: usize) -> Result<Vec<RecordedEvent>, StoreError> {
        self.store.read_all(after, max_count).await
    }

    async fn stream_version(&self, stream_id: &StreamId) -> Result<Version, StoreError> {
        self.store.stream_version(stream_id).await
    }

    async fn find_command(
        &self,
        stream_id: &StreamId,
        command_id: CommandId,
    ) -> Result<Option<AppendResult>, StoreError> {
        self.store.find_command(stream_id, command_id).await
    }

    async fn load_checkpoint(&self, name: &str) -> Result<Option<Position>, StoreError> {
        self.store.load_checkpoint(name).await
    }

    async fn save_checkpoint(&self, name: &str, position: Position) -> Result<(), StoreError> {
        self.store.save_checkpoint(name, position).await
    }

    fn notifications(&self) -> watch::Receiver<Position> {
        self.store.notifications()
    }

    fn poll_interval(&self) -> Option<Duration> {
        self.store.poll_interval()
    }

    fn supports_snapshots(&self) -> bool {
        self.store.supports_snapshots()
    }

    async fn load_snapshot(&self, stream_id: &StreamId) -> Result<Option<Snapshot>, StoreError> {
        self.store.load_snapshot(stream_id).await
    }

    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), StoreError> {
        self.store.save_snapshot(snapshot).await
    }
}

/// A fresh stream id.
pub fn stream(name: &str) -> StreamId {
    StreamId::new(format!("{name}-{}", uuid::Uuid::new_v4().simple())).expect("stream id")
}
