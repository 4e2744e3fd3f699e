//! One process of a deployment that runs an exclusive handler: start two (or more) on one
//! store, and exactly one of them handles events; kill it, and another takes over from the
//! checkpoint within the claim's ttl plus one retry.
//!
//! Run with: `cargo run -p examples --bin exclusive_handler -- STORE_URL OWNER [CLAIM_TTL_MS]`
//! where `STORE_URL` is `postgres://…` or `sqlite://PATH`. It handles the `job` events of the
//! store (`Queued { n }`), each in about 5 ms, and prints one line per event it handled,
//! `effect POSITION STARTED_MICROS ENDED_MICROS`, plus `state active` / `state standby HOLDER`
//! when its role changes. The multi-process tests (`tests/exclusive_processes.rs`) read them.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use cqrs_core::{
    spawn_handler, DomainEvent, Envelope, EventHandler, HandlerError, HandlerState, Progress, RunnerConfig, Store,
    Timestamp,
};
use serde::{Deserialize, Serialize};

/// The events this demo handles.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(category = "job")]
pub enum JobEvent {
    /// A job was queued.
    Queued {
        /// Its number.
        n: u64,
    },
}

/// The side effect: a line on stdout per event (as a mail or a call to another service would
/// be), after 5 ms of "work".
struct Effects;

impl EventHandler for Effects {
    type Event = JobEvent;
    fn name(&self) -> &str {
        "effects"
    }
    async fn handle(&self, event: Envelope<JobEvent>) -> Result<(), HandlerError> {
        let started = Timestamp::now().as_micros();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let ended = Timestamp::now().as_micros();
        let mut out = std::io::stdout().lock();
        writeln!(out, "effect {} {started} {ended}", event.position.0)
            .and_then(|()| out.flush())
            .map_err(HandlerError::new)
    }
}

async fn open(url: &str) -> anyhow::Result<Arc<dyn Store>> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let store = cqrs_postgres::PgEventStore::connect(url).await.context("connect to PostgreSQL")?;
        store.migrate().await.context("migrate")?;
        Ok(Arc::new(store))
    } else if url.starts_with("sqlite://") {
        Ok(Arc::new(cqrs_sqlite::SqliteEventStore::connect(url).await.context("open the SQLite file")?))
    } else {
        anyhow::bail!("STORE_URL must start with postgres:// or sqlite://, got {url:?}")
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: exclusive_handler STORE_URL OWNER [CLAIM_TTL_MS]";
    let url = args.next().context(usage)?;
    let owner = args.next().context(usage)?;
    let ttl_ms: Option<u64> =
        args.next().map(|ttl| ttl.parse()).transpose().context("CLAIM_TTL_MS must be a number")?;
    let store = open(&url).await?;
    let defaults = RunnerConfig::default();
    let config = RunnerConfig {
        owner,
        // Without CLAIM_TTL_MS, the library's defaults (3 s, retried every 1 s).
        claim_ttl: ttl_ms.map_or(defaults.claim_ttl, Duration::from_millis),
        claim_retry: ttl_ms.map_or(defaults.claim_retry, |ttl| Duration::from_millis((ttl / 4).max(50))),
        // Checkpoint often: a successor redoes at most this many events.
        checkpoint_every: 10,
        ..defaults
    };
    let running = spawn_handler(store, Effects, config, &Progress::new());
    let mut status = running.watch();
    let mut shown = String::new();
    loop {
        let line = match &status.borrow_and_update().state {
            HandlerState::Standby { holder } => format!("state standby {}", holder.as_deref().unwrap_or("?")),
            HandlerState::Running | HandlerState::Retrying { .. } | HandlerState::Stuck { .. } => {
                "state active".to_owned()
            }
            _ => String::new(),
        };
        if !line.is_empty() && line != shown {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{line}").and_then(|()| out.flush())?;
            shown = line;
        }
        tokio::select! {
            changed = status.changed() => if changed.is_err() { break },
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    running.stop().await;
    Ok(())
}
