//! An acknowledged append survives `kill -9` of the process that made it.
//!
//! The test runs this test binary again as a child (selected by an environment variable), which
//! appends from several tasks and prints a line per acknowledged append; the parent kills it
//! with SIGKILL mid-stream, reopens the file and checks that every acknowledged event is there.
//! (Power loss is not simulated; `synchronous=FULL` is what covers it, see the README.)

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;

use cqrs_core::testing::conformance::event;
use cqrs_core::{EventStore, ExpectedVersion, Position};
use cqrs_sqlite::SqliteEventStore;

use crate::support::stream;

/// Set in the child: the database file to append to.
const CHILD_ENV: &str = "CQRS_SQLITE_CRASH_CHILD";
/// Acknowledged appends the parent waits for before killing the child.
const ACKS_BEFORE_KILL: usize = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_appends_survive_kill_9() {
    if let Ok(path) = std::env::var(CHILD_ENV) {
        return append_until_killed(&path).await;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("crash.db");
    let executable = std::env::current_exe().expect("test binary");
    let acknowledged = tokio::task::spawn_blocking({
        let path = path.clone();
        move || {
            let mut child = Command::new(executable)
                .args(["--exact", "crash::acknowledged_appends_survive_kill_9", "--nocapture", "--test-threads=1"])
                .env(CHILD_ENV, &path)
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn the child");
            let stdout = child.stdout.take().expect("child stdout");
            let mut acknowledged = HashMap::new();
            for line in BufReader::new(stdout).lines() {
                let line = line.expect("child output");
                if let Some(ack) = line.strip_prefix("ack ") {
                    let (position, event_id) = ack.split_once(' ').expect("ack line");
                    acknowledged.insert(event_id.to_owned(), position.parse::<u64>().expect("position"));
                    if acknowledged.len() >= ACKS_BEFORE_KILL {
                        break;
                    }
                }
            }
            child.kill().expect("SIGKILL the child");
            let status = child.wait().expect("reap the child");
            assert!(!status.success(), "the child must have been killed, not finished: {status}");
            acknowledged
        }
    })
    .await
    .expect("watcher");
    assert_eq!(acknowledged.len(), ACKS_BEFORE_KILL, "the child stopped early");

    let store = SqliteEventStore::open(&path).await.expect("reopen after kill -9");
    let mut stored = HashMap::new();
    let mut after = Position::START;
    loop {
        let page = store.read_all(after, 1000).await.expect("read_all");
        let Some(last) = page.last() else { break };
        after = last.position;
        stored.extend(page.iter().map(|e| (e.event_id.to_string(), e.position.0)));
    }
    for (event_id, position) in &acknowledged {
        assert_eq!(stored.get(event_id), Some(position), "acknowledged event {event_id} was lost");
    }
    assert!(stored.len() >= acknowledged.len());
}

/// The child: 8 tasks append until the process is killed, printing each acknowledgement.
async fn append_until_killed(path: &str) {
    let store = Arc::new(SqliteEventStore::open(path).await.expect("child open"));
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let s = stream("crash");
                for n in 0.. {
                    let sent = event(n);
                    let event_id = sent.event_id;
                    let outcome = store.append(&s, ExpectedVersion::Any, vec![sent]).await.expect("child append");
                    println!("ack {} {event_id}", outcome.result().last_position.0);
                }
            })
        })
        .collect();
    for task in tasks {
        let _ = task.await;
    }
}
