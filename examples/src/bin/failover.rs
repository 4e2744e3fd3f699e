//! Measures failover of an exclusive handler between real processes: two `exclusive_handler`
//! processes on one store, the active one killed with SIGKILL while it handles a stream of
//! events, the time until the standby's first event, over several kills.
//!
//! Run with (both binaries side by side in the target directory):
//! ```sh
//! source scripts/postgres.sh; pg_start
//! cargo build --release -p examples --bins
//! target/release/failover "$DATABASE_URL" [KILLS] [CLAIM_TTL_MS]    # or sqlite://PATH
//! ```
//! Defaults: 10 kills, the default claim ttl (3 000 ms). Prints each takeover and
//! min / median / max.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use cqrs_core::{EventStore, ExpectedVersion, Metadata, NewEvent, StreamId};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A child and the instants at which it printed an `effect` line.
struct Handler {
    child: Child,
    effects: Arc<Mutex<Vec<Instant>>>,
}

fn spawn(program: &std::path::Path, url: &str, owner: &str, ttl_ms: Option<u64>) -> anyhow::Result<Handler> {
    let mut args = vec![url.to_owned(), owner.to_owned()];
    args.extend(ttl_ms.map(|ttl| ttl.to_string()));
    let mut child = Command::new(program)
        .args(&args)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("start {}", program.display()))?;
    let stdout = child.stdout.take().context("stdout")?;
    let effects = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&effects);
    tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if line.starts_with("effect ") {
                seen.lock().map(|mut seen| seen.push(Instant::now())).ok();
            }
        }
    });
    Ok(Handler { child, effects })
}

fn effects_after(handler: &Handler, after: Instant) -> Option<Instant> {
    handler.effects.lock().ok()?.iter().copied().find(|at| *at > after)
}

async fn open(url: &str) -> anyhow::Result<Arc<dyn EventStore>> {
    if url.starts_with("sqlite://") {
        Ok(Arc::new(cqrs_sqlite::SqliteEventStore::connect(url).await?))
    } else {
        let store = cqrs_postgres::PgEventStore::connect(url).await?;
        store.migrate().await?;
        Ok(Arc::new(store))
    }
}

/// Keeps appending `job` events, one every 2 ms, so the active handler is always busy.
async fn feed(store: Arc<dyn EventStore>) {
    let mut n = 0u64;
    loop {
        let event = NewEvent {
            event_id: cqrs_core::EventId::new(),
            event_type: "Queued".to_owned(),
            schema_version: 1,
            payload: serde_json::json!({ "n": n }),
            metadata: Metadata::default(),
            tags: Vec::new(),
        };
        let stream = StreamId::for_aggregate("job", n % 7).unwrap_or_else(|_| unreachable!("short id"));
        if let Err(error) = store.append(&stream, ExpectedVersion::Any, vec![event]).await {
            eprintln!("append failed: {error}");
        }
        n += 1;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let url = args.next().context("usage: failover STORE_URL [KILLS] [CLAIM_TTL_MS]")?;
    let kills: usize = args.next().map_or(Ok(10), |n| n.parse()).context("KILLS")?;
    let ttl_ms: Option<u64> = args.next().map(|n| n.parse()).transpose().context("CLAIM_TTL_MS")?;
    let program = std::env::current_exe()?.with_file_name("exclusive_handler");
    let store = open(&url).await?;
    let feeder = tokio::spawn(feed(Arc::clone(&store)));
    let mut active = spawn(&program, &url, "node-0", ttl_ms)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while effects_after(&active, Instant::now() - Duration::from_secs(60)).is_none() {
        anyhow::ensure!(Instant::now() < deadline, "the first handler never became active");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut standby = spawn(&program, &url, "node-1", ttl_ms)?;
    let mut takeovers = Vec::with_capacity(kills);
    for kill in 1..=kills {
        tokio::time::sleep(Duration::from_millis(1_500)).await; // the standby is waiting
        active.child.kill().await?;
        let killed = Instant::now();
        let give_up = killed + Duration::from_secs(60);
        let first = loop {
            if let Some(at) = effects_after(&standby, killed) {
                break at;
            }
            anyhow::ensure!(Instant::now() < give_up, "no takeover within 60 s");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let takeover = first - killed;
        println!("kill {kill:>2}: taken over after {:>6.0} ms", takeover.as_secs_f64() * 1_000.0);
        takeovers.push(takeover);
        // The survivor is now active; a new process stands by.
        active = standby;
        standby = spawn(&program, &url, &format!("node-{}", kill + 1), ttl_ms)?;
    }
    feeder.abort();
    takeovers.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1_000.0;
    let median = takeovers[takeovers.len() / 2];
    let claim = match ttl_ms {
        Some(ttl) => format!("claim ttl {ttl} ms, retry {} ms", (ttl / 4).max(50)),
        None => "default claim ttl 3 000 ms, retry 1 000 ms".to_owned(),
    };
    println!(
        "takeover over {kills} kills ({claim}): min {:.0} ms, median {:.0} ms, max {:.0} ms",
        ms(takeovers[0]),
        ms(median),
        ms(takeovers[takeovers.len() - 1])
    );
    Ok(())
}
