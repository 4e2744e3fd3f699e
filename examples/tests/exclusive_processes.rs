//! Two real OS processes (`exclusive_handler`) run the same exclusive handler on one store:
//! one is active, the other stands by. The active one is killed with SIGKILL mid-stream; the
//! other takes over within the documented bound, every event is handled at least once, nothing
//! is skipped, and no event is handled by both at the same time. On PostgreSQL (the server in
//! `DATABASE_URL`) and on one SQLite file opened by both processes.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cqrs_core::{EventStore, ExpectedVersion, Metadata, NewEvent, StreamId, Timestamp};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// Events to handle.
const EVENTS: u64 = 300;
/// The claim ttl the children use; the takeover bound is this plus one retry (a quarter).
const TTL_MS: u64 = 1_000;
/// The default bound, documented in ARCHITECTURE.md: ttl 3 s + retry 1 s, and 1 s of slack.
const DOCUMENTED_BOUND: Duration = Duration::from_secs(5);

/// One handled event as a child reported it.
#[derive(Debug, Clone, Copy)]
struct Effect {
    position: u64,
    started: i64,
    ended: i64,
}

/// A running `exclusive_handler` and what it printed so far.
struct Process {
    child: Child,
    effects: Arc<Mutex<Vec<Effect>>>,
    states: Arc<Mutex<Vec<String>>>,
}

impl Process {
    fn spawn(url: &str, owner: &str) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_exclusive_handler"))
            .args([url, owner, &TTL_MS.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start exclusive_handler");
        let stdout = child.stdout.take().expect("piped stdout");
        let effects = Arc::new(Mutex::new(Vec::new()));
        let states = Arc::new(Mutex::new(Vec::new()));
        let (effects_in, states_in) = (Arc::clone(&effects), Arc::clone(&states));
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let words: Vec<&str> = line.split_whitespace().collect();
                match words.as_slice() {
                    ["effect", position, started, ended] => {
                        let parse = |word: &str| word.parse::<i64>().expect("a number");
                        let position = u64::try_from(parse(position)).expect("positive");
                        effects_in.lock().expect("lock").push(Effect {
                            position,
                            started: parse(started),
                            ended: parse(ended),
                        });
                    }
                    ["state", ..] => states_in.lock().expect("lock").push(line.clone()),
                    _ => {}
                }
            }
        });
        Self { child, effects, states }
    }

    fn effects(&self) -> Vec<Effect> {
        self.effects.lock().expect("lock").clone()
    }

    fn last_state(&self) -> Option<String> {
        self.states.lock().expect("lock").last().cloned()
    }
}

async fn wait_until(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn fill(store: &dyn EventStore) {
    for n in 0..EVENTS {
        let stream = StreamId::for_aggregate("job", n % 7).expect("valid");
        let event = NewEvent {
            event_id: cqrs_core::EventId::new(),
            event_type: "Queued".to_owned(),
            schema_version: 1,
            payload: serde_json::json!({ "n": n }),
            metadata: Metadata::default(),
        };
        store.append(&stream, ExpectedVersion::Any, vec![event]).await.expect("append");
    }
}

async fn kill_the_active_one(url: &str) {
    let mut a = Process::spawn(url, "process-a");
    wait_until("a to be active and busy", Duration::from_secs(60), || a.effects().len() >= 20).await;
    let b = Process::spawn(url, "process-b");
    wait_until("b to stand by", Duration::from_secs(60), || {
        b.last_state().is_some_and(|state| state == "state standby process-a")
    })
    .await;
    assert!(b.effects().is_empty(), "the standby handled nothing while a was active");

    a.child.kill().await.expect("SIGKILL a");
    let killed_at = Timestamp::now().as_micros();
    wait_until("every event handled", Duration::from_secs(120), || {
        let mut seen: Vec<u64> = a.effects().iter().chain(b.effects().iter()).map(|e| e.position).collect();
        seen.sort_unstable();
        seen.dedup();
        seen.len() as u64 == EVENTS
    })
    .await;

    let (by_a, by_b) = (a.effects(), b.effects());
    assert!(!by_b.is_empty(), "b took over");
    let takeover_micros = by_b.iter().map(|e| e.started).min().expect("b handled") - killed_at;
    let takeover = Duration::from_micros(u64::try_from(takeover_micros).unwrap_or(0));
    println!("takeover after SIGKILL: {takeover:?} (ttl {TTL_MS} ms + retry {} ms)", TTL_MS / 4);
    assert!(takeover < DOCUMENTED_BOUND, "took over after {takeover:?}");
    // Never both at once: every effect of a ended before b's first began.
    let a_last_end = by_a.iter().map(|e| e.ended).max().expect("a handled");
    let b_first_start = by_b.iter().map(|e| e.started).min().expect("b handled");
    assert!(
        a_last_end <= b_first_start,
        "a's last effect ended at {a_last_end}, after b's first began at {b_first_start}"
    );
    // Nothing skipped: b resumed at or before the first event a had not handled.
    let a_max = by_a.iter().map(|e| e.position).max().expect("a handled");
    let b_min = by_b.iter().map(|e| e.position).min().expect("b handled");
    assert!(b_min <= a_max + 1, "b started at {b_min} although a only got to {a_max}");
    assert!(b_min > 1, "b resumed from a's checkpoint, not from the start");
    let mut b_positions: Vec<u64> = by_b.iter().map(|e| e.position).collect();
    assert!(b_positions.windows(2).all(|w| w[0] < w[1]), "b handled in order");
    b_positions.dedup();
    println!(
        "a handled {}, b handled {} ({} again after the kill)",
        by_a.len(),
        by_b.len(),
        (a_max + 1).saturating_sub(b_min)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_the_standby_takes_over_when_the_active_process_is_killed() {
    let server = std::env::var("DATABASE_URL")
        .expect("DATABASE_URL is not set: this test needs a PostgreSQL server (scripts/test starts one)");
    let name = format!("cqrs_exclusive_{}", uuid::Uuid::new_v4().simple());
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&server).await.expect("connect");
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut admin).await.expect("create database");
    let base = server.rsplit_once('/').map_or(server.as_str(), |(base, _)| base);
    let url = format!("{base}/{name}");
    {
        let store = cqrs_postgres::PgEventStore::connect(&url).await.expect("connect");
        store.migrate().await.expect("migrate");
        fill(&store).await;
    }
    kill_the_active_one(&url).await;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut admin).await.expect("drop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_second_process_on_the_file_stands_by_and_takes_over() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("events.db").display());
    {
        let store = cqrs_sqlite::SqliteEventStore::connect(&url).await.expect("open");
        fill(&store).await;
    }
    kill_the_active_one(&url).await;
}
