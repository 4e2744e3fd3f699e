//! Counters and a latency histogram, shown live on `/dashboard` and exported at `/metrics`
//! in the Prometheus text format. Lock-free: every update is one atomic add.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// Sub-buckets per power of two in the latency histogram (12.5% resolution).
const SUB_BUCKETS: usize = 8;
/// Powers of two covered: 1 µs to ~67 s.
const POWERS: usize = 26;

/// A log-linear histogram of durations in microseconds.
#[derive(Debug)]
pub struct Histogram {
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: (0..POWERS * SUB_BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    fn index(micros: u64) -> usize {
        if micros < SUB_BUCKETS as u64 {
            return micros as usize;
        }
        let power = 63 - micros.leading_zeros() as usize; // ≥ 3
        let sub = ((micros >> (power - 3)) & (SUB_BUCKETS as u64 - 1)) as usize;
        ((power - 2) * SUB_BUCKETS + sub).min(POWERS * SUB_BUCKETS - 1)
    }

    /// The largest value that falls in bucket `index`.
    fn upper_bound(index: usize) -> u64 {
        if index < SUB_BUCKETS {
            return index as u64;
        }
        let power = index / SUB_BUCKETS + 2;
        let sub = (index % SUB_BUCKETS) as u64;
        ((SUB_BUCKETS as u64 + sub + 1) << (power - 3)) - 1
    }

    /// Records one duration.
    pub fn record(&self, duration: Duration) {
        let micros = u64::try_from(duration.as_micros()).unwrap_or(u64::MAX);
        self.buckets[Self::index(micros)].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// Recorded values.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The `q` quantile (0.0–1.0) in microseconds, to the bucket's upper bound; 0 if empty.
    pub fn quantile(&self, q: f64) -> u64 {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (index, count) in counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Self::upper_bound(index);
            }
        }
        Self::upper_bound(counts.len() - 1)
    }
}

/// The app's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Live views connected now.
    pub views: AtomicI64,
    /// Websocket connections accepted since start.
    pub connections: AtomicU64,
    /// Commands stored (or recognised as duplicates).
    pub commands_ok: AtomicU64,
    /// Commands refused by the aggregate.
    pub commands_refused: AtomicU64,
    /// Commands that failed in the store or dispatcher.
    pub commands_failed: AtomicU64,
    /// Dispatch latency.
    pub dispatch: Histogram,
    /// Frames sent to browsers.
    pub frames_sent: AtomicU64,
    /// Bytes of those frames.
    pub bytes_sent: AtomicU64,
    /// Frames from browsers that were refused (malformed, too many, too large).
    pub frames_refused: AtomicU64,
    /// Views that fell behind their room's channel and resynced from their position.
    pub resyncs: AtomicU64,
}

impl Metrics {
    /// Counts one frame of `bytes` sent.
    pub fn sent(&self, bytes: usize) {
        self.frames_sent.fetch_add(1, Ordering::Relaxed);
        self.bytes_sent.fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

/// One reading of the metrics, with rates over the last sampling interval.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Connected views.
    pub views: i64,
    /// Rooms known.
    pub rooms: usize,
    /// Commands per second over the last interval.
    pub commands_per_second: f64,
    /// Commands accepted since start.
    pub commands_ok: u64,
    /// Commands refused since start.
    pub commands_refused: u64,
    /// Dispatch latency p50 since start, µs.
    pub dispatch_p50_micros: u64,
    /// Dispatch latency p99 since start, µs.
    pub dispatch_p99_micros: u64,
    /// The store's last known position.
    pub store_head: u64,
    /// The read model's position.
    pub projected: u64,
    /// Events stored but not yet projected.
    pub projection_lag: u64,
    /// Frames sent since start.
    pub frames_sent: u64,
    /// Bytes sent since start.
    pub bytes_sent: u64,
    /// Resyncs since start.
    pub resyncs: u64,
}

impl Snapshot {
    /// Reads the counters; `previous_commands` and `interval` give the command rate.
    pub fn take(
        metrics: &Metrics,
        rooms: usize,
        store_head: u64,
        projected: u64,
        previous_commands: u64,
        interval: Duration,
    ) -> Self {
        let commands_ok = metrics.commands_ok.load(Ordering::Relaxed);
        let commands_refused = metrics.commands_refused.load(Ordering::Relaxed);
        let done = commands_ok + commands_refused;
        let seconds = interval.as_secs_f64();
        Self {
            views: metrics.views.load(Ordering::Relaxed),
            rooms,
            commands_per_second: if seconds > 0.0 {
                done.saturating_sub(previous_commands) as f64 / seconds
            } else {
                0.0
            },
            commands_ok,
            commands_refused,
            dispatch_p50_micros: metrics.dispatch.quantile(0.5),
            dispatch_p99_micros: metrics.dispatch.quantile(0.99),
            store_head: store_head.max(projected),
            projected,
            projection_lag: store_head.saturating_sub(projected),
            frames_sent: metrics.frames_sent.load(Ordering::Relaxed),
            bytes_sent: metrics.bytes_sent.load(Ordering::Relaxed),
            resyncs: metrics.resyncs.load(Ordering::Relaxed),
        }
    }

    /// Commands handled (accepted or refused), the base of the next rate.
    pub fn commands(&self) -> u64 {
        self.commands_ok + self.commands_refused
    }
}

/// The Prometheus text exposition of `metrics` and `snapshot`.
pub fn prometheus(metrics: &Metrics, snapshot: &Snapshot) -> String {
    let mut out = String::with_capacity(4096);
    let mut line = |name: &str, kind: &str, help: &str, value: String| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
    };
    let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed).to_string();
    line("livechat_views", "gauge", "Live views connected now.", snapshot.views.to_string());
    line("livechat_rooms", "gauge", "Rooms known to the read model.", snapshot.rooms.to_string());
    line("livechat_connections_total", "counter", "Websocket connections accepted.", load(&metrics.connections));
    line("livechat_commands_ok_total", "counter", "Commands stored.", load(&metrics.commands_ok));
    line(
        "livechat_commands_refused_total",
        "counter",
        "Commands refused by the aggregate.",
        load(&metrics.commands_refused),
    );
    line(
        "livechat_commands_failed_total",
        "counter",
        "Commands that failed in the store.",
        load(&metrics.commands_failed),
    );
    line("livechat_events_stored", "gauge", "The event store's last known position.", snapshot.store_head.to_string());
    line("livechat_events_projected", "gauge", "The read model's position.", snapshot.projected.to_string());
    line(
        "livechat_projection_lag",
        "gauge",
        "Events stored but not yet projected.",
        snapshot.projection_lag.to_string(),
    );
    line("livechat_frames_sent_total", "counter", "Websocket frames sent.", load(&metrics.frames_sent));
    line("livechat_bytes_sent_total", "counter", "Websocket bytes sent.", load(&metrics.bytes_sent));
    line("livechat_frames_refused_total", "counter", "Client frames refused.", load(&metrics.frames_refused));
    line("livechat_resyncs_total", "counter", "Lagging views resynced.", load(&metrics.resyncs));
    let _ = writeln!(
        out,
        "# HELP livechat_dispatch_seconds Command dispatch latency.\n# TYPE livechat_dispatch_seconds summary"
    );
    for q in [0.5, 0.9, 0.99] {
        let _ = writeln!(
            out,
            "livechat_dispatch_seconds{{quantile=\"{q}\"}} {}",
            metrics.dispatch.quantile(q) as f64 / 1e6
        );
    }
    let _ = writeln!(
        out,
        "livechat_dispatch_seconds_sum {}\nlivechat_dispatch_seconds_count {}",
        metrics.dispatch.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
        metrics.dispatch.count()
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_cover_their_values() {
        for micros in [0, 1, 7, 8, 9, 15, 16, 17, 100, 1_000, 12_345, 1_000_000] {
            let index = Histogram::index(micros);
            assert!(Histogram::upper_bound(index) >= micros, "{micros} in bucket {index}");
            if index > 0 {
                assert!(Histogram::upper_bound(index - 1) < micros, "{micros} not in an earlier bucket");
            }
        }
    }

    #[test]
    fn quantiles_within_a_bucket() {
        let histogram = Histogram::default();
        for micros in 1..=1000u64 {
            histogram.record(Duration::from_micros(micros));
        }
        let p50 = histogram.quantile(0.5);
        let p99 = histogram.quantile(0.99);
        assert!((500..=570).contains(&p50), "p50 {p50}");
        assert!((990..=1130).contains(&p99), "p99 {p99}");
        assert_eq!(Histogram::default().quantile(0.5), 0);
    }

    #[test]
    fn prometheus_text_has_every_metric() {
        let metrics = Metrics::default();
        metrics.sent(100);
        metrics.dispatch.record(Duration::from_micros(50));
        let snapshot = Snapshot::take(&metrics, 2, 10, 8, 0, Duration::from_secs(1));
        assert_eq!(snapshot.projection_lag, 2);
        let text = prometheus(&metrics, &snapshot);
        assert!(text.contains("livechat_bytes_sent_total 100\n"), "{text}");
        assert!(text.contains("livechat_rooms 2\n"));
        assert!(text.contains("livechat_dispatch_seconds_count 1\n"));
    }
}
