//! `--writers`: plain appends at 1, 4, 16, 64, 256 and 1 024 concurrent writers, one event per
//! append, each writer its own stream, on our stores; with `--peer umadb` the same through
//! UmaDB's server and client, first, alone on the machine.
//!
//! No framework above the store: this is the store's append path as a library user calls it,
//! the case UmaDB's own benchmarks run. Each writer appends with `ExpectedVersion::Any` (UmaDB's
//! appends carry no condition either), and the latency of each append is kept.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cqrs_core::{EventId, EventStore, ExpectedVersion, Metadata, NewEvent, StreamId};

/// One run at one concurrency level.
#[derive(Debug)]
pub struct WritersRun {
    /// `sqlite`, `postgres` or `umadb`.
    pub store: &'static str,
    /// Concurrent writers.
    pub writers: usize,
    /// Appends acknowledged.
    pub appends: u64,
    /// Appends that failed.
    pub errors: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Latency of one append, 50th and 99th percentile.
    pub p50: Duration,
    /// See `p50`.
    pub p99: Duration,
}

impl WritersRun {
    /// Appends per second.
    pub fn rate(&self) -> f64 {
        self.appends as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// From each writer's latencies.
    pub fn from_latencies(
        store: &'static str,
        writers: usize,
        mut latencies: Vec<Duration>,
        errors: u64,
        elapsed: Duration,
    ) -> Self {
        latencies.sort_unstable();
        let at = |q: f64| {
            let index = ((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1));
            latencies.get(index).copied().unwrap_or_default()
        };
        let (p50, p99) = (at(0.50), at(0.99));
        Self { store, writers, appends: latencies.len() as u64, errors, elapsed, p50, p99 }
    }

    /// Prints its line and its JSON line.
    pub fn print(&self) {
        println!(
            "writers {:<8} {:>5} writers: {:>9.0} appends/s  p50 {:>7.2} ms  p99 {:>7.2} ms  errors {}",
            self.store,
            self.writers,
            self.rate(),
            self.p50.as_secs_f64() * 1e3,
            self.p99.as_secs_f64() * 1e3,
            self.errors
        );
        println!(
            "{{\"case\":\"writers_{}_{}\",\"appends\":{},\"appends_per_s\":{:.0},\"p50_ms\":{:.3},\"p99_ms\":{:.3},\"errors\":{}}}",
            self.store,
            self.writers,
            self.appends,
            self.rate(),
            self.p50.as_secs_f64() * 1e3,
            self.p99.as_secs_f64() * 1e3,
            self.errors
        );
    }
}

/// The concurrency levels, and the appends of each level.
pub fn levels(quick: bool) -> (&'static [usize], fn(usize) -> u64) {
    if quick {
        (&[1, 16], |writers| (writers as u64 * 10).max(100))
    } else {
        (&[1, 4, 16, 64, 256, 1024], |writers| (writers as u64 * 16).clamp(2_000, 16_384))
    }
}

/// The event every writer appends: about 150 bytes of JSON, as UmaDB's case stores.
pub fn payload(writer: usize, n: u64) -> serde_json::Value {
    serde_json::json!({ "writer": writer, "n": n, "note": "x".repeat(100) })
}

/// `writers` tasks on `store`, each appending one event at a time to its own stream until the
/// level's `appends` are shared out.
pub async fn ours<S: EventStore + ?Sized>(
    store: Arc<S>,
    name: &'static str,
    writers: usize,
    appends: u64,
) -> WritersRun {
    let run = uuid::Uuid::new_v4().simple().to_string();
    let per_writer = (appends / writers as u64).max(1);
    let started = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|writer| {
            let store = Arc::clone(&store);
            let stream = StreamId::new(format!("writer-{run}-{writer}"));
            tokio::spawn(async move {
                let Ok(stream) = stream else { return (Vec::new(), per_writer) };
                let (mut latencies, mut errors) = (Vec::with_capacity(per_writer as usize), 0);
                for n in 0..per_writer {
                    let event = NewEvent {
                        event_id: EventId::new(),
                        event_type: "Written".to_owned(),
                        schema_version: 1,
                        payload: payload(writer, n),
                        metadata: Metadata::default(),
                        tags: Vec::new(),
                    };
                    let sent = Instant::now();
                    match store.append(&stream, ExpectedVersion::Any, vec![event]).await {
                        Ok(_) => latencies.push(sent.elapsed()),
                        Err(_) => errors += 1,
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let (mut latencies, mut errors) = (Vec::new(), 0);
    for task in tasks {
        match task.await {
            Ok((mine, failed)) => {
                latencies.extend(mine);
                errors += failed;
            }
            Err(_) => errors += per_writer,
        }
    }
    WritersRun::from_latencies(name, writers, latencies, errors, started.elapsed())
}
