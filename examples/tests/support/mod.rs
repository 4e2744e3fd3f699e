//! What the multi-process tests share: child processes whose output lines are collected, a
//! fresh PostgreSQL database, and a store filled with `job` events.

#![allow(dead_code)]

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cqrs_core::{EventStore, ExpectedVersion, Metadata, NewEvent, StreamId};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// A running program of this crate and the lines it printed so far.
pub struct Process {
    pub child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Process {
    /// Starts `program` (a path from `env!("CARGO_BIN_EXE_…")`) with `args`.
    pub fn spawn(program: &str, args: &[&str]) -> Self {
        let mut child = Command::new(program)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|error| panic!("start {program}: {error}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let collected = Arc::clone(&lines);
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                collected.lock().expect("lock").push(line);
            }
        });
        Self { child, lines }
    }

    /// Every line printed so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("lock").clone()
    }

    /// The lines that start with `word`, split into the words after it.
    pub fn lines_of(&self, word: &str) -> Vec<Vec<String>> {
        self.lines()
            .iter()
            .filter_map(|line| {
                let mut words = line.split_whitespace();
                (words.next() == Some(word)).then(|| words.map(str::to_owned).collect())
            })
            .collect()
    }
}

/// Waits for `check`, failing the test after `limit`.
pub async fn wait_until(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Appends `count` `job` events (`Queued { n }`) over seven streams.
pub async fn fill_jobs(store: &dyn EventStore, count: u64) {
    for n in 0..count {
        let stream = StreamId::for_aggregate("job", n % 7).expect("valid");
        let event = NewEvent {
            event_id: cqrs_core::EventId::new(),
            event_type: "Queued".to_owned(),
            schema_version: 1,
            payload: serde_json::json!({ "n": n }),
            metadata: Metadata::default(),
            tags: Vec::new(),
        };
        store.append(&stream, ExpectedVersion::Any, vec![event]).await.expect("append");
    }
}

/// A fresh database on the `DATABASE_URL` server, dropped with the guard.
pub struct PgDatabase {
    pub url: String,
    name: String,
    server: String,
}

impl PgDatabase {
    pub async fn create() -> Self {
        let server = std::env::var("DATABASE_URL")
            .expect("DATABASE_URL is not set: this test needs a PostgreSQL server (scripts/test starts one)");
        let name = format!("cqrs_example_{}", uuid::Uuid::new_v4().simple());
        let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&server).await.expect("connect");
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut admin).await.expect("create database");
        let base = server.rsplit_once('/').map_or(server.as_str(), |(base, _)| base);
        Self { url: format!("{base}/{name}"), name, server }
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let (server, statement) = (self.server.clone(), format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name));
        let _ = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            runtime.block_on(async move {
                if let Ok(mut admin) = <sqlx::PgConnection as sqlx::Connection>::connect(&server).await {
                    let _ = sqlx::query(&statement).execute(&mut admin).await;
                }
            });
        })
        .join();
    }
}
