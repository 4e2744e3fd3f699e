//! Handler throughput on the SQL stores: a transactional projection catching up from position
//! 0, against the store's own `read_all` rate over the same events; and, on SQLite, what such a
//! projection costs the appends that share its writer.
//!
//! Run with:
//! ```sh
//! source scripts/postgres.sh; PG_FSYNC=on pg_start     # throwaway server; sets DATABASE_URL
//! cargo run --release -p benches --bin handlers                  # both stores, 100 000 events
//! cargo run --release -p benches --bin handlers -- --events 20000 --only sqlite
//! ```
//!
//! Cases, each on a fresh database (or file) holding `--events` events of 100 streams:
//! - `read_all`: page through every event with `read_all` (pages of 512), events/s: the ceiling
//!   of any handler on this store.
//! - `projection batch=B` for B in 1, 100, 500: a transactional projection (one upsert per event
//!   into a counts table, then the checkpoint, one transaction per batch) catching up from 0,
//!   events/s until its checkpoint reaches the last event.
//! - `sqlite appends` (SQLite only): 32 tasks appending for 3 s, alone and while a projection
//!   catches up on the same file, appends/s.
//!
//! Output: one line per case and one JSON line (`{"case": ...}`). No timing is asserted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use cqrs_core::{
    DomainEvent, Envelope, EventStore, ExpectedVersion, HandlerError, Metadata, NewEvent, Position, Progress,
    RunnerConfig, StreamId,
};
use serde::{Deserialize, Serialize};
use sqlx::Connection;

/// The events the projection takes.
#[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
#[event(category = "bench")]
enum BenchEvent {
    Happened { n: u64 },
}

struct Counts;

impl cqrs_postgres::PgProjection for Counts {
    type Event = BenchEvent;
    fn name(&self) -> &str {
        "bench-counts"
    }
    async fn apply(
        &self,
        transaction: &mut sqlx::PgConnection,
        events: &[Envelope<BenchEvent>],
    ) -> Result<(), HandlerError> {
        for event in events {
            sqlx::query(
                "INSERT INTO bench_counts (stream_id, events) VALUES ($1, 1) \
                 ON CONFLICT (stream_id) DO UPDATE SET events = bench_counts.events + 1",
            )
            .bind(event.stream_id.as_str())
            .execute(&mut *transaction)
            .await
            .map_err(HandlerError::new)?;
        }
        Ok(())
    }
}

impl cqrs_sqlite::SqliteProjection for Counts {
    type Event = BenchEvent;
    fn name(&self) -> &str {
        "bench-counts"
    }
    async fn apply(
        &self,
        transaction: &mut sqlx::SqliteConnection,
        events: &[Envelope<BenchEvent>],
    ) -> Result<(), HandlerError> {
        for event in events {
            sqlx::query(
                "INSERT INTO bench_counts (stream_id, events) VALUES (?1, 1) \
                 ON CONFLICT (stream_id) DO UPDATE SET events = bench_counts.events + 1",
            )
            .bind(event.stream_id.as_str())
            .execute(&mut *transaction)
            .await
            .map_err(HandlerError::new)?;
        }
        Ok(())
    }
}

const TABLE: &str = "CREATE TABLE IF NOT EXISTS bench_counts (stream_id TEXT PRIMARY KEY, events BIGINT NOT NULL)";

fn event(n: u64) -> NewEvent {
    NewEvent {
        event_id: cqrs_core::EventId::new(),
        event_type: "Happened".to_owned(),
        schema_version: 1,
        payload: serde_json::json!({ "n": n, "note": "x".repeat(100) }),
        metadata: Metadata::default(),
        tags: Vec::new(),
    }
}

/// Appends `count` events over 100 streams, 1 000 per append.
async fn fill(store: &dyn EventStore, count: u64) -> anyhow::Result<()> {
    let mut n = 0;
    while n < count {
        let size = (count - n).min(1_000);
        let stream = StreamId::for_aggregate("bench", n / 1_000 % 100)?;
        let events = (n..n + size).map(event).collect();
        store.append(&stream, ExpectedVersion::Any, events).await?;
        n += size;
    }
    Ok(())
}

async fn read_all_rate(store: &dyn EventStore) -> anyhow::Result<f64> {
    let started = Instant::now();
    let (mut after, mut read) = (Position::START, 0u64);
    loop {
        let page = store.read_all(after, 512).await?;
        let Some(last) = page.last() else { break };
        after = last.position;
        read += page.len() as u64;
    }
    Ok(read as f64 / started.elapsed().as_secs_f64())
}

fn report(case: &str, store: &str, value: f64, unit: &str, extra: &str) {
    println!("{store:<9} {case:<28} {value:>12.0} {unit}{extra}");
    println!("{{\"case\":\"{case}\",\"store\":\"{store}\",\"value\":{value:.1},\"unit\":\"{unit}\"}}");
}

/// Runs the projection with batches of `batch` until its checkpoint reaches `head`.
async fn catch_up(
    spawn: impl FnOnce(RunnerConfig, usize, &Progress) -> cqrs_core::RunningHandler,
    batch: usize,
    head: Position,
) -> anyhow::Result<f64> {
    let progress = Progress::new();
    let started = Instant::now();
    let running = spawn(RunnerConfig::default(), batch, &progress);
    progress.wait_for("bench-counts", head, Duration::from_secs(3_600)).await?;
    let rate = head.0 as f64 / started.elapsed().as_secs_f64();
    running.stop().await;
    Ok(rate)
}

async fn postgres(events: u64) -> anyhow::Result<()> {
    let server = std::env::var("DATABASE_URL").context("DATABASE_URL is not set (see the doc comment)")?;
    let base = server.rsplit_once('/').map_or(server.as_str(), |(base, _)| base).to_owned();
    let mut admin = sqlx::PgConnection::connect(&server).await?;
    for batch in [0, 1, 100, 500] {
        let name = format!("cqrs_handlers_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut admin).await?;
        let store = cqrs_postgres::PgEventStore::connect(&format!("{base}/{name}")).await?;
        store.migrate().await?;
        sqlx::query(TABLE).execute(store.pool()).await?;
        fill(&store, events).await?;
        let head = store.head().await?;
        if batch == 0 {
            report("read_all", "postgres", read_all_rate(&store).await?, "events/s", "");
        } else {
            let rate =
                catch_up(|c, b, p| cqrs_postgres::spawn_projection_with(&store, Counts, c, b, p), batch, head).await?;
            report(&format!("projection batch={batch}"), "postgres", rate, "events/s", "");
        }
        drop(store);
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut admin).await?;
    }
    Ok(())
}

async fn sqlite_store(dir: &std::path::Path, name: &str) -> anyhow::Result<cqrs_sqlite::SqliteEventStore> {
    let url = format!("sqlite://{}", dir.join(name).display());
    let mut ddl = sqlx::SqliteConnection::connect(&format!("{url}?mode=rwc")).await?;
    sqlx::query(TABLE).execute(&mut ddl).await?;
    ddl.close().await?;
    Ok(cqrs_sqlite::SqliteEventStore::connect(&url).await?)
}

/// 32 tasks appending single events for `for_how_long`; appends/s.
async fn append_rate(store: &cqrs_sqlite::SqliteEventStore, for_how_long: Duration) -> anyhow::Result<f64> {
    let done = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + for_how_long;
    let tasks: Vec<_> = (0..32u64)
        .map(|task| {
            let (store, done) = (store.clone(), Arc::clone(&done));
            tokio::spawn(async move {
                let stream = StreamId::for_aggregate("writer", task).expect("valid");
                while Instant::now() < until {
                    store.append(&stream, ExpectedVersion::Any, vec![event(task)]).await.expect("append");
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await?;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / for_how_long.as_secs_f64())
}

async fn sqlite(events: u64) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    for batch in [0, 1, 100, 500] {
        let store = sqlite_store(dir.path(), &format!("handlers-{batch}.db")).await?;
        fill(&store, events).await?;
        let head = store.head().await?;
        if batch == 0 {
            report("read_all", "sqlite", read_all_rate(&store).await?, "events/s", "");
        } else {
            let rate =
                catch_up(|c, b, p| cqrs_sqlite::spawn_projection_with(&store, Counts, c, b, p), batch, head).await?;
            report(&format!("projection batch={batch}"), "sqlite", rate, "events/s", "");
        }
    }
    let store = sqlite_store(dir.path(), "appends.db").await?;
    fill(&store, events).await?;
    let alone = append_rate(&store, Duration::from_secs(3)).await?;
    report("appends, alone", "sqlite", alone, "appends/s", "");
    let progress = Progress::new();
    let running = cqrs_sqlite::spawn_projection_with(&store, Counts, RunnerConfig::default(), 500, &progress);
    let beside = append_rate(&store, Duration::from_secs(3)).await?;
    let caught_up = progress.status("bench-counts").map_or(0, |status| status.position.0);
    running.stop().await;
    report(
        "appends, projection running",
        "sqlite",
        beside,
        "appends/s",
        &format!(" (the projection got to {caught_up} of {events}+ meanwhile)"),
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut events = 100_000u64;
    let mut only: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--events" => events = args.next().context("--events N")?.parse()?,
            "--only" => only = Some(args.next().context("--only postgres|sqlite")?),
            other => anyhow::bail!("unknown argument {other:?}"),
        }
    }
    println!("{events} events of 100 streams, 1 000 per append");
    if only.as_deref() != Some("sqlite") {
        postgres(events).await?;
    }
    if only.as_deref() != Some("postgres") {
        sqlite(events).await?;
    }
    Ok(())
}
