//! [`WithGuard`]: a store that owns what must outlive it in a test (a temporary directory, a
//! test database), so each backend's tests need no delegating wrapper of their own.

use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;

use crate::event::{NewEvent, RecordedEvent};
use crate::ids::{CommandId, Position, StreamId, Timestamp, Version};
use crate::query::{AppendCondition, Query};
use crate::store::{
    AppendOutcome, AppendResult, Coordination, EventStore, ExpectedVersion, Snapshot, StoreError, StreamAppend,
};

/// A store and a guard dropped after it (fields drop in declaration order): for example a
/// SQLite store and the temporary directory of its file, or a PostgreSQL store and the test
/// database it was given. Every [`EventStore`] and [`Coordination`] call goes to `store`.
#[derive(Debug)]
pub struct WithGuard<S, G> {
    /// The store under test.
    pub store: S,
    /// What must outlive the store.
    pub guard: G,
}

#[async_trait]
impl<S: EventStore, G: Send + Sync + 'static> EventStore for WithGuard<S, G> {
    async fn append(
        &self,
        stream_id: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendOutcome, StoreError> {
        self.store.append(stream_id, expected, events).await
    }

    async fn append_with_condition(
        &self,
        stream_id: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        condition: Option<AppendCondition>,
    ) -> Result<AppendOutcome, StoreError> {
        self.store.append_with_condition(stream_id, expected, events, condition).await
    }

    async fn append_atomic(
        &self,
        appends: Vec<StreamAppend>,
        condition: Option<AppendCondition>,
    ) -> Result<Vec<AppendOutcome>, StoreError> {
        self.store.append_atomic(appends, condition).await
    }

    async fn read_query(
        &self,
        query: &Query,
        after: Position,
        max_count: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.store.read_query(query, after, max_count).await
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

    async fn head(&self) -> Result<Position, StoreError> {
        self.store.head().await
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

    async fn prune_commands(&self, older_than: Timestamp) -> Result<u64, StoreError> {
        self.store.prune_commands(older_than).await
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

crate::forward_coordination!(impl [S: Coordination, G: Send + Sync + 'static] WithGuard<S, G> => store);
