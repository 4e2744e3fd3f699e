//! A store on a fresh file in its own temporary directory, removed when the store is dropped.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use cqrs_core::testing::conformance::event;
use cqrs_core::testing::WithGuard;
use cqrs_core::{AppendOutcome, EventStore, ExpectedVersion, StoreError, StreamId};
use cqrs_sqlite::{SqliteEventStore, SqliteStoreConfig};
use sqlx::{Connection, Executor, SqliteConnection};

/// A [`SqliteEventStore`] that owns the temporary directory of its file (dropped after the
/// store, so the files go last).
pub type TempStore = WithGuard<SqliteEventStore, tempfile::TempDir>;

/// A store on a fresh file in a new temporary directory.
pub async fn temp_store() -> TempStore {
    temp_store_with(SqliteStoreConfig::default()).await
}

/// A store on a fresh file in a new temporary directory, opened with `config`.
pub async fn temp_store_with(config: SqliteStoreConfig) -> TempStore {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteEventStore::open_with(dir.path().join("events.db"), config).await.expect("open store");
    WithGuard { store, guard: dir }
}

/// A connection of its own to `path` holding the file's write lock (`BEGIN IMMEDIATE`) until
/// it rolls back: the store's writer waits for it.
pub async fn lock_file(path: &Path) -> SqliteConnection {
    let url = format!("sqlite://{}", path.display());
    let mut connection = SqliteConnection::connect(&url).await.expect("second connection");
    connection.execute("BEGIN IMMEDIATE").await.expect("take the write lock");
    connection
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

/// An append not yet polled.
pub type Append<'a> = Pending<'a, Result<AppendOutcome, StoreError>>;

/// A call of the store not yet polled, whose first poll queues its request to the writer.
pub type Pending<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Runs `calls` together in one batch of the writer, alone, and returns their answers in order.
/// A connection of its own holds the file's write lock while a first append, as many events as
/// a batch takes (so alone in its batch; the store must have the default `max_batch_events`),
/// waits for it and `calls` queue behind: each one's first poll sends its request. Whenever the
/// writer takes the first append, it cannot take the others with it, and cannot commit it
/// before the lock is released, by which time all of them are queued.
pub async fn in_one_batch<T>(temp: &TempStore, calls: Vec<Pending<'_, T>>) -> Vec<T> {
    let mut lock = lock_file(&file_of(temp)).await;
    let filler = (0..SqliteStoreConfig::default().max_batch_events).map(|n| event(n as u64)).collect();
    let filled = stream("filled");
    let mut first: Append<'_> = temp.store.append(&filled, ExpectedVersion::NoStream, filler);
    let mut cx = Context::from_waker(Waker::noop());
    assert!(matches!(first.as_mut().poll(&mut cx), Poll::Pending), "queued, waiting for the writer");
    let mut calls = calls;
    for call in &mut calls {
        assert!(call.as_mut().poll(&mut cx).is_pending(), "queued, waiting for the writer");
    }
    lock.execute("ROLLBACK").await.expect("release the write lock");
    assert!(matches!(first.await, Ok(AppendOutcome::Appended(_))), "the first append");
    futures_util::future::join_all(calls).await
}
