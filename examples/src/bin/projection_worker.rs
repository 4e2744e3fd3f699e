//! A transactional projection in a process of its own, for the crash tests: it counts the
//! `job` events per stream into table `job_counts` and records every event it applied in
//! `job_applied`, in the same transactions as its checkpoint.
//!
//! Run with: `cargo run -p examples --bin projection_worker -- STORE_URL [CRASH_AT_BATCH]`
//! (`postgres://…` or `sqlite://PATH`). With `CRASH_AT_BATCH` = n, it stops in the middle of
//! its n-th batch (after writing half of it), prints `crashing`, and waits to be killed. It
//! prints `progress POSITION` as its checkpoint moves.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use cqrs_core::{DomainEvent, Envelope, HandlerError, Progress, RunnerConfig};
use serde::{Deserialize, Serialize};
use sqlx::Connection;

/// The events it projects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(category = "job")]
pub enum JobEvent {
    /// A job was queued.
    Queued {
        /// Its number.
        n: u64,
    },
}

/// Events per batch.
const BATCH: usize = 100;

struct Counts {
    crash_at: Option<usize>,
    batches: AtomicUsize,
}

impl Counts {
    /// Whether this batch is the one to crash in.
    fn crashing(&self) -> bool {
        let batch = self.batches.fetch_add(1, Ordering::SeqCst) + 1;
        self.crash_at == Some(batch)
    }
}

async fn crash() -> ! {
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "crashing").and_then(|()| out.flush());
    }
    loop {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}

impl cqrs_postgres::PgProjection for Counts {
    type Event = JobEvent;
    fn name(&self) -> &str {
        "job-counts"
    }
    async fn apply(
        &self,
        transaction: &mut sqlx::PgConnection,
        events: &[Envelope<JobEvent>],
    ) -> Result<(), HandlerError> {
        let crashing = self.crashing();
        for (index, event) in events.iter().enumerate() {
            if crashing && index == events.len() / 2 {
                crash().await;
            }
            let position = i64::try_from(event.position.0).map_err(HandlerError::new)?;
            sqlx::query("INSERT INTO job_applied (position) VALUES ($1)")
                .bind(position)
                .execute(&mut *transaction)
                .await
                .map_err(HandlerError::new)?;
            sqlx::query(
                "INSERT INTO job_counts (stream_id, events) VALUES ($1, 1) \
                 ON CONFLICT (stream_id) DO UPDATE SET events = job_counts.events + 1",
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
    type Event = JobEvent;
    fn name(&self) -> &str {
        "job-counts"
    }
    async fn apply(
        &self,
        transaction: &mut sqlx::SqliteConnection,
        events: &[Envelope<JobEvent>],
    ) -> Result<(), HandlerError> {
        let crashing = self.crashing();
        for (index, event) in events.iter().enumerate() {
            if crashing && index == events.len() / 2 {
                crash().await;
            }
            let position = i64::try_from(event.position.0).map_err(HandlerError::new)?;
            sqlx::query("INSERT INTO job_applied (position) VALUES (?1)")
                .bind(position)
                .execute(&mut *transaction)
                .await
                .map_err(HandlerError::new)?;
            sqlx::query(
                "INSERT INTO job_counts (stream_id, events) VALUES (?1, 1) \
                 ON CONFLICT (stream_id) DO UPDATE SET events = job_counts.events + 1",
            )
            .bind(event.stream_id.as_str())
            .execute(&mut *transaction)
            .await
            .map_err(HandlerError::new)?;
        }
        Ok(())
    }
}

const TABLES: [&str; 2] = [
    "CREATE TABLE IF NOT EXISTS job_applied (position BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS job_counts (stream_id TEXT PRIMARY KEY, events BIGINT NOT NULL)",
];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let url = args.next().context("usage: projection_worker STORE_URL [CRASH_AT_BATCH]")?;
    let crash_at = args.next().map(|n| n.parse::<usize>()).transpose().context("CRASH_AT_BATCH must be a number")?;
    let counts = Counts { crash_at, batches: AtomicUsize::new(0) };
    let config = RunnerConfig {
        claim_ttl: Duration::from_millis(1_000),
        claim_retry: Duration::from_millis(200),
        ..RunnerConfig::default()
    };
    let progress = Progress::new();
    let running = if url.starts_with("sqlite://") {
        let mut ddl = sqlx::SqliteConnection::connect(&format!("{url}?mode=rwc")).await.context("open the file")?;
        for table in TABLES {
            sqlx::query(table).execute(&mut ddl).await.context("create the projection's tables")?;
        }
        ddl.close().await?;
        let store = cqrs_sqlite::SqliteEventStore::connect(&url).await.context("open the store")?;
        cqrs_sqlite::spawn_projection_with(&store, counts, config, BATCH, &progress)
    } else {
        let store = cqrs_postgres::PgEventStore::connect(&url).await.context("connect")?;
        store.migrate().await.context("migrate")?;
        for table in TABLES {
            sqlx::query(table).execute(store.pool()).await.context("create the projection's tables")?;
        }
        cqrs_postgres::spawn_projection_with(&store, counts, config, BATCH, &progress)
    };
    let mut status = running.watch();
    loop {
        let position = status.borrow_and_update().position;
        {
            let mut out = std::io::stdout().lock();
            writeln!(out, "progress {}", position.0).and_then(|()| out.flush())?;
        }
        tokio::select! {
            changed = status.changed() => if changed.is_err() { break },
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    running.stop().await;
    Ok(())
}
