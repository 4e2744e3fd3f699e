//! A transactional projection killed with SIGKILL in the middle of a batch (half of its rows
//! written, not committed) and started again: every event is in the projection exactly once.
//! On PostgreSQL (the server in `DATABASE_URL`) and on a SQLite file.

mod support;

use std::time::Duration;

use sqlx::Row;
use support::{fill_jobs, wait_until, PgDatabase, Process};

const EVENTS: u64 = 1_000;

fn worker(url: &str, crash_at_batch: Option<usize>) -> Process {
    let crash = crash_at_batch.map(|batch| batch.to_string());
    let mut args = vec![url];
    if let Some(crash) = &crash {
        args.push(crash);
    }
    Process::spawn(env!("CARGO_BIN_EXE_projection_worker"), &args)
}

fn progress(process: &Process) -> u64 {
    process.lines_of("progress").last().and_then(|words| words.first()?.parse().ok()).unwrap_or(0)
}

/// Crashes a worker in its third batch, then runs another to the end.
async fn crash_mid_batch_and_restart(url: &str) {
    let mut crashing = worker(url, Some(3));
    wait_until("the crash point", Duration::from_secs(60), || crashing.lines().iter().any(|line| line == "crashing"))
        .await;
    let before = progress(&crashing);
    assert!(before >= 200, "two batches committed before the crash (progress {before})");
    crashing.child.kill().await.expect("SIGKILL");
    let restarted = worker(url, None);
    wait_until("the restarted projection to catch up", Duration::from_secs(120), || progress(&restarted) == EVENTS)
        .await;
}

fn check(applied: &[(i64, i64)], counts: &[(String, i64)]) {
    assert_eq!(applied.len() as u64, EVENTS, "one row per event");
    for (position, times) in applied {
        assert_eq!(*times, 1, "event {position} applied {times} times");
    }
    let total: i64 = counts.iter().map(|(_, events)| events).sum();
    assert_eq!(u64::try_from(total).expect("positive"), EVENTS, "the counts add up: {counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_projection_killed_mid_batch_applies_every_event_exactly_once() {
    let database = PgDatabase::create().await;
    let store = cqrs_postgres::PgEventStore::connect(&database.url).await.expect("connect");
    store.migrate().await.expect("migrate");
    fill_jobs(&store, EVENTS).await;
    crash_mid_batch_and_restart(&database.url).await;
    let applied: Vec<(i64, i64)> = sqlx::query("SELECT position, count(*) AS times FROM job_applied GROUP BY position")
        .fetch_all(store.pool())
        .await
        .expect("read")
        .iter()
        .map(|row| (row.get("position"), row.get("times")))
        .collect();
    let counts: Vec<(String, i64)> = sqlx::query("SELECT stream_id, events FROM job_counts")
        .fetch_all(store.pool())
        .await
        .expect("read")
        .iter()
        .map(|row| (row.get("stream_id"), row.get("events")))
        .collect();
    check(&applied, &counts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_projection_killed_mid_batch_applies_every_event_exactly_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("events.db").display());
    {
        let store = cqrs_sqlite::SqliteEventStore::connect(&url).await.expect("open");
        fill_jobs(&store, EVENTS).await;
    }
    crash_mid_batch_and_restart(&url).await;
    let store = cqrs_sqlite::SqliteEventStore::connect(&url).await.expect("open");
    let applied: Vec<(i64, i64)> = sqlx::query("SELECT position, count(*) AS times FROM job_applied GROUP BY position")
        .fetch_all(store.read_pool())
        .await
        .expect("read")
        .iter()
        .map(|row| (row.get("position"), row.get("times")))
        .collect();
    let counts: Vec<(String, i64)> = sqlx::query("SELECT stream_id, events FROM job_counts")
        .fetch_all(store.read_pool())
        .await
        .expect("read")
        .iter()
        .map(|row| (row.get("stream_id"), row.get("events")))
        .collect();
    check(&applied, &counts);
}
