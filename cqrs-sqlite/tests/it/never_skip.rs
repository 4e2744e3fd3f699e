//! Never skip, with slow commits and writers in three processes on one file: a trigger makes a
//! third of all event inserts spin for a few milliseconds *after* the row took its position,
//! inside the writer's transaction, while two child processes and this one append and readers
//! follow live and catch up from the start. Every reader must see every acknowledged event
//! once, in position order, and its gap audits must find nothing committed behind it.
//!
//! SQLite cannot commit out of position order (one write lock per file, positions taken under
//! it), so unlike the PostgreSQL test there is no guard to remove here: this test holds that
//! property to account, across processes and the store's own group commit.

use std::collections::HashSet;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cqrs_core::testing::never_skip::{
    acked_in_output, assert_never_skipped, print_acked, write_randomly, Reader, ReaderSpec,
};
use cqrs_core::{EventStore, Position, StreamId};
use cqrs_sqlite::{SqliteEventStore, SqliteStoreConfig};
use sqlx::{Connection, Executor, SqliteConnection};

use crate::support::stream;

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
    let children: Vec<_> = (0..CHILDREN).map(|child| spawn_child(&file, child)).collect();
    let acked = Arc::new(Mutex::new(HashSet::new()));
    let streams: Vec<StreamId> = (0..4).map(|i| stream(&format!("parent{i}"))).collect();
    let writers: Vec<_> = (0..TASKS_PER_PROCESS)
        .map(|task| {
            let (store, streams, acked) = (Arc::clone(&store), streams.clone(), Arc::clone(&acked));
            tokio::spawn(async move { write_randomly(&*store, &streams, APPENDS_PER_TASK, task, &acked, |_| ()).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    readers.push(Reader::spawn(Arc::clone(&store), ReaderSpec::new("catching up", 7)));
    readers.push(Reader::spawn(Arc::clone(&store), ReaderSpec::new("lagging", 3).lagging(Duration::from_millis(2))));

    for writer in writers {
        writer.await.expect("writer");
    }
    for child in children {
        let output = child.wait_with_output().await.expect("child writer");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "child writer failed: {stdout}\n{}", String::from_utf8_lossy(&output.stderr));
        let ids = acked_in_output(&stdout);
        assert!(!ids.is_empty(), "child writer acknowledged nothing: {stdout}");
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
    let streams: Vec<StreamId> = (0..4).map(|i| stream(&format!("{prefix}{i}"))).collect();
    let acked = Arc::new(Mutex::new(HashSet::new()));
    let tasks: Vec<_> = (0..TASKS_PER_PROCESS)
        .map(|task| {
            let (store, streams, acked) = (Arc::clone(&store), streams.clone(), Arc::clone(&acked));
            tokio::spawn(
                async move { write_randomly(&*store, &streams, APPENDS_PER_TASK, task, &acked, print_acked).await },
            )
        })
        .collect();
    for task in tasks {
        task.await.expect("child task");
    }
}

/// This test binary again, running only this test, as a writer on `file`.
fn spawn_child(file: &Path, child: usize) -> tokio::process::Child {
    let exe = std::env::current_exe().expect("test binary");
    tokio::process::Command::new(exe)
        .args(["--exact", TEST_NAME, "--nocapture", "--test-threads", "1"])
        .env(CHILD_FILE, file)
        .env(CHILD_STREAMS, format!("child{child}-"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn child writer")
}
