//! Counters and a latency histogram, shown live on `/dashboard` and exported at `/metrics`
//! in the Prometheus text format. Lock-free: every update is one atomic add. The dashboard's
//! charts come from [`History`], one [`Sample`] per second for the last 15 minutes.

use std::collections::VecDeque;
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

    /// The bucket counts now (to diff two readings: the quantiles of an interval).
    pub fn counts(&self) -> Vec<u64> {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect()
    }

    /// The `q` quantile (0.0–1.0) in microseconds, to the bucket's upper bound; 0 if empty.
    pub fn quantile(&self, q: f64) -> u64 {
        Self::quantile_of(&self.counts(), q)
    }

    /// The `q` quantile of bucket counts read with [`counts`](Self::counts) (or a difference of
    /// two readings).
    pub fn quantile_of(counts: &[u64], q: f64) -> u64 {
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
    /// Commands whose outcome the store could not tell (answered "unknown").
    pub commands_unknown: AtomicU64,
    /// Commands the server dispatched a second time with the same id after an unknown outcome.
    pub commands_retried: AtomicU64,
    /// Commands refused because their id was used before for different content.
    pub commands_id_reused: AtomicU64,
    /// Limits hit (see [`Limit`]).
    pub limited: [AtomicU64; Limit::ALL.len()],
    /// HTTP connections closed because a request head did not arrive in time.
    pub http_timeouts: AtomicU64,
    /// Websockets closed by the server, by close code: 1001, 1002, 1007, 1008, 1009, 1013.
    pub closes: [AtomicU64; CLOSE_CODES.len()],
}

/// The close codes counted in [`Metrics::closes`].
pub const CLOSE_CODES: [u16; 6] = [1001, 1002, 1007, 1008, 1009, 1013];

/// A limit a client can hit; each has a counter on `/metrics`
/// (`livechat_limited_total{limit="…"}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// The global connection cap.
    Connections,
    /// The connection cap per client address.
    AddressConnections,
    /// Commands per client address (token bucket).
    AddressCommands,
    /// Messages per sender name per room (the aggregate's rule).
    NameMessages,
    /// New rooms per client address per minute.
    RoomCreation,
    /// Frames per connection (token bucket).
    Frames,
    /// Typing signals taken per sender (one a second; extra ones are dropped).
    Typing,
}

impl Limit {
    /// Every limit, in the order of [`Metrics::limited`].
    pub const ALL: [Limit; 7] = [
        Limit::Connections,
        Limit::AddressConnections,
        Limit::AddressCommands,
        Limit::NameMessages,
        Limit::RoomCreation,
        Limit::Frames,
        Limit::Typing,
    ];

    /// The label on `/metrics`.
    pub fn label(self) -> &'static str {
        match self {
            Limit::Connections => "connections",
            Limit::AddressConnections => "address_connections",
            Limit::AddressCommands => "address_commands",
            Limit::NameMessages => "name_messages",
            Limit::RoomCreation => "room_creation",
            Limit::Frames => "frames",
            Limit::Typing => "typing",
        }
    }
}

impl Metrics {
    /// Counts one frame of `bytes` sent.
    pub fn sent(&self, bytes: usize) {
        self.frames_sent.fetch_add(1, Ordering::Relaxed);
        self.bytes_sent.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Counts one hit of `limit`.
    pub fn limited(&self, limit: Limit) {
        let index = Limit::ALL.iter().position(|l| *l == limit).unwrap_or(0);
        self.limited[index].fetch_add(1, Ordering::Relaxed);
    }

    /// How often `limit` was hit.
    pub fn limited_count(&self, limit: Limit) -> u64 {
        Limit::ALL.iter().position(|l| *l == limit).map_or(0, |i| self.limited[i].load(Ordering::Relaxed))
    }

    /// Counts one close sent with `code`.
    pub fn closed(&self, code: u16) {
        if let Some(index) = CLOSE_CODES.iter().position(|c| *c == code) {
            self.closes[index].fetch_add(1, Ordering::Relaxed);
        }
    }
}

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

/// The last [`History::CAPACITY`] samples, oldest first, and the counters they were taken
/// from (to turn totals into rates).
#[derive(Debug, Clone, Default)]
pub struct History {
    samples: VecDeque<Sample>,
    previous: Option<(u64, u64, u64, Vec<u64>)>,
}

impl History {
    /// 15 minutes of one sample a second.
    pub const CAPACITY: usize = 900;

    /// Takes a sample of `metrics` and `snapshot`, `interval` after the previous one.
    pub fn record(&mut self, metrics: &Metrics, snapshot: &Snapshot, interval: Duration) {
        let counts = metrics.dispatch.counts();
        let frames = metrics.frames_sent.load(Ordering::Relaxed);
        let bytes = metrics.bytes_sent.load(Ordering::Relaxed);
        let commands = snapshot.commands();
        let seconds = interval.as_secs_f64().max(1e-3);
        let (rate, p50, p99, frames_rate, bytes_rate) = match &self.previous {
            Some((c, f, b, previous)) => {
                let diff: Vec<u64> = counts.iter().zip(previous).map(|(now, then)| now.saturating_sub(*then)).collect();
                (
                    commands.saturating_sub(*c) as f64 / seconds,
                    Histogram::quantile_of(&diff, 0.5),
                    Histogram::quantile_of(&diff, 0.99),
                    frames.saturating_sub(*f) as f64 / seconds,
                    bytes.saturating_sub(*b) as f64 / seconds,
                )
            }
            None => (0.0, 0, 0, 0.0, 0.0),
        };
        self.previous = Some((commands, frames, bytes, counts));
        self.samples.push_back(Sample {
            commands_per_second: rate,
            p50_micros: p50,
            p99_micros: p99,
            views: snapshot.views,
            events_stored: snapshot.store_head,
            lag: snapshot.projection_lag,
            frames_per_second: frames_rate,
            bytes_per_second: bytes_rate,
        });
        while self.samples.len() > Self::CAPACITY {
            self.samples.pop_front();
        }
    }

    /// The samples, oldest first.
    pub fn samples(&self) -> impl ExactSizeIterator<Item = &Sample> + DoubleEndedIterator {
        self.samples.iter()
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
    line("livechat_rooms", "gauge", "Rooms resident in memory (with their recent window).", snapshot.rooms.to_string());
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
    line(
        "livechat_commands_unknown_total",
        "counter",
        "Commands answered \"unknown\": the store could not say whether they were stored.",
        load(&metrics.commands_unknown),
    );
    line(
        "livechat_commands_retried_total",
        "counter",
        "Commands dispatched again by the server with the same id after an unknown outcome.",
        load(&metrics.commands_retried),
    );
    line(
        "livechat_commands_id_reused_total",
        "counter",
        "Commands refused: their id was used before for a different content.",
        load(&metrics.commands_id_reused),
    );
    line(
        "livechat_http_header_timeouts_total",
        "counter",
        "HTTP connections closed because a request head did not arrive in time.",
        load(&metrics.http_timeouts),
    );
    let _ = writeln!(
        out,
        "# HELP livechat_limited_total Requests refused by a limit.\n# TYPE livechat_limited_total counter"
    );
    for limit in Limit::ALL {
        let _ = writeln!(out, "livechat_limited_total{{limit=\"{}\"}} {}", limit.label(), metrics.limited_count(limit));
    }
    let _ = writeln!(
        out,
        "# HELP livechat_closes_total Websockets closed by the server.\n# TYPE livechat_closes_total counter"
    );
    for (code, count) in CLOSE_CODES.iter().zip(&metrics.closes) {
        let _ = writeln!(out, "livechat_closes_total{{code=\"{code}\"}} {}", count.load(Ordering::Relaxed));
    }
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
