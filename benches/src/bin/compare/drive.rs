//! Load generators: one client sending in sequence, or many tasks sharing one command counter.
//! Both feed the same numbered commands ([`workload::command`]) to a [`Contender`] and time
//! each call.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::workload::{self, SendMessage};

/// A framework under test, seen from its callers: send one command, learn whether it was
/// acknowledged.
pub trait Contender: Send + Sync + 'static {
    /// Sends one command; `Err` carries the error the framework returned to the caller.
    fn send(&self, command: SendMessage) -> impl Future<Output = Result<(), String>> + Send;
}

/// What the callers saw.
#[derive(Debug, Default)]
pub struct Run {
    /// Commands sent.
    pub sent: u64,
    /// Commands acknowledged (`Ok`).
    pub acked: u64,
    /// Commands that returned an error.
    pub errors: u64,
    /// The first error's text.
    pub first_error: Option<String>,
    /// From the first send to the last reply.
    pub elapsed: Duration,
    /// Per-command latency, sorted.
    pub latencies: Vec<Duration>,
    /// Sequential runs only: throughput of the first and last `size` commands.
    pub windows: Option<Windows>,
}

/// Throughput at the start and at the end of a sequential run.
#[derive(Debug, Clone, Copy)]
pub struct Windows {
    /// Commands per window.
    pub size: u64,
    /// Duration of the first `size` commands.
    pub first: Duration,
    /// Duration of the last `size` commands.
    pub last: Duration,
    /// Median latency of the first `size` commands: unlike the window's duration, hardly moved
    /// by a few preemptions on a busy machine.
    pub first_p50: Duration,
    /// Median latency of the last `size` commands.
    pub last_p50: Duration,
}

impl Run {
    /// The latency at quantile `q` (0..=1).
    pub fn latency(&self, q: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((self.latencies.len() - 1) as f64 * q).round() as usize;
        self.latencies[rank.min(self.latencies.len() - 1)]
    }

    fn record(&mut self, result: Result<(), String>, latency: Duration) {
        self.sent += 1;
        self.latencies.push(latency);
        match result {
            Ok(()) => self.acked += 1,
            Err(error) => {
                self.errors += 1;
                self.first_error.get_or_insert(error);
            }
        }
    }

    fn merge(&mut self, other: Run) {
        self.sent += other.sent;
        self.acked += other.acked;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.latencies.extend(other.latencies);
    }
}

/// One client sends `commands` commands to chat 0, each after the previous one's reply.
/// The windows are the first and last `window` commands.
pub async fn sequential<C: Contender>(contender: &C, commands: u64, window: u64) -> Run {
    if commands == 0 {
        return Run::default();
    }
    let window = window.clamp(1, commands.max(1));
    let mut run = Run { latencies: Vec::with_capacity(commands as usize), ..Run::default() };
    let mut first_end = Duration::ZERO;
    let mut last_start = Duration::ZERO;
    let start = Instant::now();
    for index in 0..commands {
        if index == commands - window {
            last_start = start.elapsed();
        }
        let sent = Instant::now();
        let result = contender.send(workload::command(index, 1)).await;
        run.record(result, sent.elapsed());
        if index + 1 == window {
            first_end = start.elapsed();
        }
    }
    run.elapsed = start.elapsed();
    let window_len = window as usize;
    run.windows = Some(Windows {
        size: window,
        first: first_end,
        last: run.elapsed - last_start,
        first_p50: median(&run.latencies[..window_len]),
        last_p50: median(&run.latencies[run.latencies.len() - window_len..]),
    });
    run.latencies.sort_unstable();
    run
}

fn median(latencies: &[Duration]) -> Duration {
    let mut sorted = latencies.to_vec();
    sorted.sort_unstable();
    sorted.get(sorted.len() / 2).copied().unwrap_or_default()
}

/// `tasks` tasks send `commands` commands in all over `chats` chats: each task takes the next
/// command number, sends it, waits for the reply, and repeats.
pub async fn concurrent<C: Contender>(contender: Arc<C>, commands: u64, chats: u32, tasks: usize) -> Run {
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let contender = Arc::clone(&contender);
            let next = Arc::clone(&next);
            tokio::spawn(async move {
                let mut run = Run { latencies: Vec::with_capacity((commands as usize / tasks) + 1), ..Run::default() };
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    if index >= commands {
                        return run;
                    }
                    let sent = Instant::now();
                    let result = contender.send(workload::command(index, chats)).await;
                    run.record(result, sent.elapsed());
                }
            })
        })
        .collect();
    let mut total = Run::default();
    for handle in handles {
        match handle.await {
            Ok(run) => total.merge(run),
            Err(panic) => {
                total.errors += 1;
                total.first_error.get_or_insert(format!("sending task failed: {panic}"));
            }
        }
    }
    total.elapsed = start.elapsed();
    total.latencies.sort_unstable();
    total
}
