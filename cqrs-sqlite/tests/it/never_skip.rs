//! Never skip, with slow commits and writers in three processes on one file: a trigger makes a
//! third of all event inserts spin for a few milliseconds *after* the row took its position,
//! inside the writer's transaction, while two child processes and this one append and readers
//! follow live and catch up from the start. Every reader must see every acknowledged event
//! once, in position order, and its gap audits must find nothing committed behind it.
//!
//! SQLite cannot commit out of position order (one write lock per file, positions taken under
//! it), so unlike the PostgreSQL test there is no guard to remove here: this test holds that
//! property to account, across processes and the store's own group commit.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cqrs_core::testing::never_skip::{
    acked_by_child, assert_never_skipped, spawn_child, spawn_writers, Reader, ReaderSpec,
};
use cqrs_core::{EventStore, Position};
use cqrs_sqlite::{SqliteEventStore, SqliteStoreConfig};
use sqlx::{Connection, Executor, SqliteConnection};

/// Set in a child process: the parent's database file.
const CHILD_FILE: &str = "CQRS_NEVER_SKIP_CHILD_FILE";
/// Set in a child process: its streams' prefix.
const CHILD_STREAMS: &str = "CQRS_NEVER_SKIP_CHILD_STREAMS";
const TEST_NAME: &str = "never_skip::slow_commits_from_three_processes_are_never_skipped";
const CHILDREN: usize = 2;
const TASKS_PER_PROCESS: u64 = 3;
const APPENDS_PER_TASK: u64 = 40;

/// A third of all inserts spin through 250 000 rows of a cross join before the statement ends
/// (SQLite has no sleep; a trigger body cannot use a CTE).
const SLOW_COMMITS: &str = "
CREATE TABLE test_spin (x INTEGER);
WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 500) INSERT INTO test_spin (x) SELECT x FROM n;
CREATE TRIGGER test_stall_after_position AFTER INSERT ON cqrs_events
    WHEN abs(random()) % 3 = 0
    BEGIN SELECT count(*) FROM test_spin a, test_spin b; END;";

fn config() -> SqliteStoreConfig {
    // Other processes' commits are not announced here: readers poll for them.
    SqliteStoreConfig::default()
        .with_poll_interval(Duration::from_millis(20))
        .with_busy_timeout(Duration::from_secs(30))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_commits_from_three_processes_are_never_skipped() {
    if let Ok(file) = std::env::var(CHILD_FILE) {
        return child_writer(Path::new(&file)).await;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("events.db");
    let store = Arc::new(SqliteEventStore::open_with(&file, config()).await.expect("open store"));
    let url = format!("sqlite://{}", file.display());
    let mut connection = SqliteConnection::connect(&url).await.expect("connect");
    connection.execute(SLOW_COMMITS).await.expect("install the stalling trigger");
    connection.close().await.expect("close");

    let mut readers = vec![
        Reader::spawn(Arc::clone(&store), ReaderSpec::new("live", 64)),
        Reader::spawn(Arc::clone(&store), ReaderSpec::new("live, small pages", 5)),
    ];
    let children: Vec<_> = (0..CHILDREN)
        .map(|child| {
            spawn_child(TEST_NAME, &[(CHILD_FILE, file.as_ref()), (CHILD_STREAMS, format!("child{child}-").as_ref())])
        })
        .collect();
    let (acked, writers) = spawn_writers(&store, "parent", TASKS_PER_PROCESS, APPENDS_PER_TASK, false);
    tokio::time::sleep(Duration::from_millis(500)).await;
    readers.push(Reader::spawn(Arc::clone(&store), ReaderSpec::new("catching up", 7)));
    readers.push(Reader::spawn(Arc::clone(&store), ReaderSpec::new("lagging", 3).lagging(Duration::from_millis(2))));

    for writer in writers {
        writer.await.expect("writer");
    }
    for child in children {
        let ids = acked_by_child(child).await;
        acked.lock().expect("lock").extend(ids);
    }
    let acked = acked.lock().expect("lock").clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let mut results = Vec::new();
    for reader in readers {
        results.push(reader.finish(acked.len(), deadline).await);
    }
    let stored = store.read_all(Position::START, usize::MAX).await.expect("read_all");
    eprintln!("{} events from 3 processes", acked.len());
    assert_never_skipped(&results, &acked, &stored);
}

/// A child process: writes the same file through its own store and prints what was
/// acknowledged.
async fn child_writer(file: &Path) {
    let prefix = std::env::var(CHILD_STREAMS).expect("child streams");
    let store = Arc::new(SqliteEventStore::open_with(file, config()).await.expect("child store"));
    let (_, tasks) = spawn_writers(&store, &prefix, TASKS_PER_PROCESS, APPENDS_PER_TASK, true);
    for task in tasks {
        task.await.expect("child task");
    }
}
