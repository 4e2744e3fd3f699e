//! The dashboard's history: one [`Sample`] a second for the last 15 minutes, from which the
//! charts are drawn.

use std::collections::VecDeque;
use std::time::Duration;

use super::snapshot::Snapshot;

/// One second of the dashboard's charts.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sample {
    /// Commands handled per second.
    pub commands_per_second: f64,
    /// Dispatch latency p50 in this second, µs.
    pub p50_micros: u64,
    /// Dispatch latency p99 in this second, µs.
    pub p99_micros: u64,
    /// Connected views.
    pub views: i64,
    /// Events stored (the store's head).
    pub events_stored: u64,
    /// Projection lag in events.
    pub lag: u64,
    /// Frames sent per second.
    pub frames_per_second: f64,
    /// Bytes sent per second.
    pub bytes_per_second: f64,
}

/// The last [`History::CAPACITY`] samples, oldest first, and the reading they were last taken
/// from (to turn totals into rates).
#[derive(Debug, Clone, Default)]
pub struct History {
    samples: VecDeque<Sample>,
    previous: Option<Snapshot>,
}

impl History {
    /// 15 minutes of one sample a second.
    pub const CAPACITY: usize = 900;

    /// Takes a sample from `snapshot`, `interval` after the previous one.
    pub fn record(&mut self, snapshot: &Snapshot, interval: Duration) {
        let seconds = interval.as_secs_f64().max(1e-3);
        let sample = match &self.previous {
            Some(before) => {
                let latency = snapshot.dispatch.since(&before.dispatch);
                let rate = |now: u64, then: u64| now.saturating_sub(then) as f64 / seconds;
                Sample {
                    commands_per_second: rate(snapshot.commands(), before.commands()),
                    p50_micros: (latency.quantile(0.5) * 1e6) as u64,
                    p99_micros: (latency.quantile(0.99) * 1e6) as u64,
                    views: snapshot.views,
                    events_stored: snapshot.store_head,
                    lag: snapshot.projection_lag,
                    frames_per_second: rate(snapshot.frames_sent, before.frames_sent),
                    bytes_per_second: rate(snapshot.bytes_sent, before.bytes_sent),
                }
            }
            None => Sample {
                views: snapshot.views,
                events_stored: snapshot.store_head,
                lag: snapshot.projection_lag,
                ..Sample::default()
            },
        };
        self.previous = Some(snapshot.clone());
        self.samples.push_back(sample);
        while self.samples.len() > Self::CAPACITY {
            self.samples.pop_front();
        }
    }

    /// The samples, oldest first.
    pub fn samples(&self) -> impl ExactSizeIterator<Item = &Sample> + DoubleEndedIterator {
        self.samples.iter()
    }
}
