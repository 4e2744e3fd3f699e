//! The app's metrics, recorded through the [`metrics`] facade into a
//! `metrics-exporter-prometheus` recorder and exported at `/metrics`. Latencies are Prometheus
//! histograms with fixed buckets, so a p99 across nodes is one query
//! (`histogram_quantile(0.99, sum by (le) (rate(livechat_dispatch_seconds_bucket[1m])))`).
//!
//! Two recorders are rendered together: the app's own ([`Metrics::new`] builds one per app, so
//! two apps in one process, as in tests, count apart), and the process's global one, which
//! receives the framework's `cqrs_*` metrics (see `cqrs_core::telemetry`) and which
//! [`Metrics::new`] installs when no other global recorder is. `/dashboard` reads the same
//! exposition text once a second ([`Reading`]) and charts it ([`crate::dashboard::History`]).

use std::sync::OnceLock;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Level, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use crate::dashboard::Reading;

/// Bucket bounds of every `*_seconds` histogram: 100 µs to 10 s.
pub const SECONDS_BUCKETS: [f64; 16] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Bucket bounds of `cqrs_append_batch_size` (appends per group commit).
pub const BATCH_BUCKETS: [f64; 11] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];

/// A recorder with the app's buckets.
fn recorder() -> PrometheusRecorder {
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS_BUCKETS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full("cqrs_append_batch_size".into()), &BATCH_BUCKETS));
    match builder {
        Ok(builder) => builder.build_recorder(),
        // Only an empty bucket list is refused; ours are constants.
        Err(error) => unreachable!("constant buckets refused: {error}"),
    }
}

/// The process's global recorder (the framework's metrics), if this module installed it.
fn framework() -> Option<&'static PrometheusHandle> {
    static FRAMEWORK: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    FRAMEWORK
        .get_or_init(|| {
            let recorder = recorder();
            let handle = recorder.handle();
            match metrics::set_global_recorder(recorder) {
                Ok(()) => {
                    cqrs_core::telemetry::describe();
                    Some(handle)
                }
                Err(_) => {
                    tracing::warn!("a global metrics recorder was installed already: /metrics shows no cqrs_* metrics");
                    None
                }
            }
        })
        .as_ref()
}

/// The app's metrics: handles into its recorder. Every update is an atomic operation.
#[derive(Debug)]
pub struct Metrics {
    recorder: PrometheusRecorder,
    /// Live views connected now.
    pub views: Gauge,
    /// Websocket connections accepted since start.
    pub connections: Counter,
    /// Commands stored (or recognised as duplicates).
    pub commands_ok: Counter,
    /// Commands refused by the aggregate.
    pub commands_refused: Counter,
    /// Commands that failed in the store or dispatcher.
    pub commands_failed: Counter,
    /// Commands whose outcome the store could not tell (answered "unknown").
    pub commands_unknown: Counter,
    /// Commands the server dispatched a second time with the same id after an unknown outcome.
    pub commands_retried: Counter,
    /// Commands refused because their id was used before for different content.
    pub commands_id_reused: Counter,
    /// Dispatch latency of the chat's commands, seconds.
    pub dispatch: Histogram,
    /// Frames sent to browsers.
    pub frames_sent: Counter,
    /// Bytes of those frames.
    pub bytes_sent: Counter,
    /// Frames from browsers that were refused (malformed, too many, too large).
    pub frames_refused: Counter,
    /// Views that fell behind their room's channel and resynced from their position.
    pub resyncs: Counter,
    /// HTTP connections closed because a request head did not arrive in time.
    pub http_timeouts: Counter,
    /// Mention notifications delivered by this process.
    pub mentions_notified: Counter,
    /// Requests that needed the client's address, from a trusted proxy that did not say it.
    pub unknown_clients: Counter,
    limited: Vec<Counter>,
    closes: Vec<Counter>,
    levels: LevelHandles,
}

/// Values the app reads from its parts when sampled (not counted as they happen).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Levels {
    /// Rooms resident in memory.
    pub rooms: u64,
    /// The event store's last known position.
    pub store_head: u64,
    /// The read model's position.
    pub projected: u64,
    /// HTTP and websocket connections open now.
    pub connections_open: u64,
    /// Messages held in the rooms' windows.
    pub window_messages: u64,
    /// Rooms loaded from the store since start.
    pub rooms_loaded: u64,
    /// Idle rooms evicted since start.
    pub rooms_evicted: u64,
}

#[derive(Debug)]
struct LevelHandles {
    rooms: Gauge,
    store_head: Gauge,
    projected: Gauge,
    lag: Gauge,
    connections_open: Gauge,
    window_messages: Gauge,
    rooms_loaded: Counter,
    rooms_evicted: Counter,
}

/// The close codes counted in `livechat_closes_total{code}`.
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
    /// Reactions per sender name per room (the aggregate's rule).
    NameReactions,
    /// New rooms per client address per minute.
    RoomCreation,
    /// Frames per connection (token bucket).
    Frames,
    /// Typing signals taken per sender (one a second; extra ones are dropped).
    Typing,
    /// Searches per client address (token bucket).
    AddressSearches,
}

impl Limit {
    /// Every limit.
    pub const ALL: [Limit; 9] = [
        Limit::Connections,
        Limit::AddressConnections,
        Limit::AddressCommands,
        Limit::NameMessages,
        Limit::NameReactions,
        Limit::RoomCreation,
        Limit::Frames,
        Limit::Typing,
        Limit::AddressSearches,
    ];

    /// The label on `/metrics`.
    pub fn label(self) -> &'static str {
        match self {
            Limit::Connections => "connections",
            Limit::AddressConnections => "address_connections",
            Limit::AddressCommands => "address_commands",
            Limit::NameMessages => "name_messages",
            Limit::NameReactions => "name_reactions",
            Limit::RoomCreation => "room_creation",
            Limit::AddressSearches => "address_searches",
            Limit::Frames => "frames",
            Limit::Typing => "typing",
        }
    }
}

const METADATA: Metadata<'static> = Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

/// What kind of metric, with its description, for [`Metrics::new`].
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A recorder for one app, with every metric registered and described (so `/metrics`
    /// lists them all from the start), and the process's global recorder installed for the
    /// framework's metrics if no recorder is yet.
    pub fn new() -> Self {
        let _ = framework();
        let recorder = recorder();
        let describe = |name: &'static str, kind: Kind, unit: Option<Unit>, help: &'static str| {
            let (key, help) = (KeyName::from_const_str(name), SharedString::const_str(help));
            match kind {
                Kind::Counter => recorder.describe_counter(key, unit, help),
                Kind::Gauge => recorder.describe_gauge(key, unit, help),
                Kind::Histogram => recorder.describe_histogram(key, unit, help),
            }
        };
        for (name, kind, unit, help) in DESCRIPTIONS {
            describe(name, kind, unit, help);
        }
        let counter = |name: &'static str| recorder.register_counter(&Key::from_static_name(name), &METADATA);
        let gauge = |name: &'static str| recorder.register_gauge(&Key::from_static_name(name), &METADATA);
        let labelled = |name: &'static str, label: &'static str, value: String| {
            recorder.register_counter(&Key::from_parts(name, vec![Label::new(label, value)]), &METADATA)
        };
        Self {
            views: gauge("livechat_views"),
            connections: counter("livechat_connections_total"),
            commands_ok: counter("livechat_commands_ok_total"),
            commands_refused: counter("livechat_commands_refused_total"),
            commands_failed: counter("livechat_commands_failed_total"),
            commands_unknown: counter("livechat_commands_unknown_total"),
            commands_retried: counter("livechat_commands_retried_total"),
            commands_id_reused: counter("livechat_commands_id_reused_total"),
            dispatch: recorder.register_histogram(&Key::from_static_name("livechat_dispatch_seconds"), &METADATA),
            frames_sent: counter("livechat_frames_sent_total"),
            bytes_sent: counter("livechat_bytes_sent_total"),
            frames_refused: counter("livechat_frames_refused_total"),
            resyncs: counter("livechat_resyncs_total"),
            http_timeouts: counter("livechat_http_header_timeouts_total"),
            mentions_notified: counter("livechat_mentions_notified_total"),
            unknown_clients: counter("livechat_unknown_clients_total"),
            limited: Limit::ALL
                .iter()
                .map(|limit| labelled("livechat_limited_total", "limit", limit.label().to_owned()))
                .collect(),
            closes: CLOSE_CODES
                .iter()
                .map(|code| labelled("livechat_closes_total", "code", code.to_string()))
                .collect(),
            levels: LevelHandles {
                rooms: gauge("livechat_rooms"),
                store_head: gauge("livechat_events_stored"),
                projected: gauge("livechat_events_projected"),
                lag: gauge("livechat_projection_lag"),
                connections_open: gauge("livechat_connections_open"),
                window_messages: gauge("livechat_window_messages"),
                rooms_loaded: counter("livechat_rooms_loaded_total"),
                rooms_evicted: counter("livechat_rooms_evicted_total"),
            },
            recorder,
        }
    }

    /// Names this process on `/metrics`: `livechat_build_info{version, node}` (the node is the
    /// process's identity in handler claims, so `livechat_handler_holder` can be joined on it).
    pub fn set_node(&self, node: &str) {
        let labels = vec![Label::new("version", env!("CARGO_PKG_VERSION")), Label::new("node", node.to_owned())];
        self.recorder.register_gauge(&Key::from_parts("livechat_build_info", labels), &METADATA).set(1.0);
    }

    /// The exposition of the store's handler claims: `livechat_handler_holder{handler, holder}`
    /// (1 for each claim) and `livechat_handler_claim_expires_seconds{handler}` (until it lapses
    /// unless renewed; negative once lapsed). Rendered from a fresh recorder on each scrape, so
    /// a holder that left leaves no stale series.
    pub fn render_claims(claims: &[cqrs_core::Claim], now: cqrs_core::Timestamp) -> String {
        let recorder = PrometheusBuilder::new().build_recorder();
        recorder.describe_gauge(
            KeyName::from_const_str("livechat_handler_holder"),
            None,
            SharedString::const_str("1 for the process holding each exclusive handler's claim, by the store."),
        );
        recorder.describe_gauge(
            KeyName::from_const_str("livechat_handler_claim_expires_seconds"),
            Some(Unit::Seconds),
            SharedString::const_str("Seconds until each handler's claim lapses unless renewed."),
        );
        // Pause and standby markers are the framework's, not handlers.
        for claim in claims.iter().filter(|claim| !cqrs_core::handler::control::is_reserved(&claim.name)) {
            let holder = vec![Label::new("handler", claim.name.clone()), Label::new("holder", claim.owner.clone())];
            recorder.register_gauge(&Key::from_parts("livechat_handler_holder", holder), &METADATA).set(1.0);
            let handler = vec![Label::new("handler", claim.name.clone())];
            let left = (claim.expires_at.0 - now.0) as f64 / 1e6;
            recorder
                .register_gauge(&Key::from_parts("livechat_handler_claim_expires_seconds", handler), &METADATA)
                .set(left);
        }
        recorder.handle().render()
    }

    /// Counts one frame of `bytes` sent.
    pub fn sent(&self, bytes: usize) {
        self.sent_many(1, bytes);
    }

    /// Counts `frames` frames of `bytes` bytes in all.
    pub fn sent_many(&self, frames: u64, bytes: usize) {
        self.frames_sent.increment(frames);
        self.bytes_sent.increment(bytes as u64);
    }

    /// Counts one hit of `limit`.
    pub fn limited(&self, limit: Limit) {
        if let Some(index) = Limit::ALL.iter().position(|l| *l == limit) {
            self.limited[index].increment(1);
        }
    }

    /// How often `limit` was hit (read from the exposition).
    pub fn limited_count(&self, limit: Limit) -> u64 {
        self.reading().labelled("livechat_limited_total", "limit", limit.label()) as u64
    }

    /// Counts one close sent with `code`.
    pub fn closed(&self, code: u16) {
        if let Some(index) = CLOSE_CODES.iter().position(|c| *c == code) {
            self.closes[index].increment(1);
        }
    }

    /// Sets the values read from the app's parts (before a scrape or a sample).
    pub fn set_levels(&self, levels: &Levels) {
        let handles = &self.levels;
        handles.rooms.set(levels.rooms as f64);
        handles.store_head.set(levels.store_head.max(levels.projected) as f64);
        handles.projected.set(levels.projected as f64);
        handles.lag.set(levels.store_head.saturating_sub(levels.projected) as f64);
        handles.connections_open.set(levels.connections_open as f64);
        handles.window_messages.set(levels.window_messages as f64);
        handles.rooms_loaded.absolute(levels.rooms_loaded);
        handles.rooms_evicted.absolute(levels.rooms_evicted);
    }

    /// The Prometheus text exposition: the app's metrics, then the framework's.
    pub fn render(&self) -> String {
        let mut text = self.recorder.handle().render();
        if let Some(framework) = framework() {
            text.push_str(&framework.render());
        }
        text
    }

    /// The exposition, parsed.
    pub fn reading(&self) -> Reading {
        Reading::parse(&self.render())
    }
}

/// Every metric of the app, described once.
const DESCRIPTIONS: [(&str, Kind, Option<Unit>, &str); 27] = [
    ("livechat_views", Kind::Gauge, None, "Live views connected now."),
    ("livechat_connections_total", Kind::Counter, None, "Websocket connections accepted."),
    ("livechat_commands_ok_total", Kind::Counter, None, "Commands stored (or recognised as duplicates)."),
    ("livechat_commands_refused_total", Kind::Counter, None, "Commands refused by the aggregate."),
    ("livechat_commands_failed_total", Kind::Counter, None, "Commands that failed in the store."),
    (
        "livechat_commands_unknown_total",
        Kind::Counter,
        None,
        "Commands answered \"unknown\": the store could not say whether they were stored.",
    ),
    (
        "livechat_commands_retried_total",
        Kind::Counter,
        None,
        "Commands dispatched again by the server with the same id after an unknown outcome.",
    ),
    (
        "livechat_commands_id_reused_total",
        Kind::Counter,
        None,
        "Commands refused: their id was used before for a different content.",
    ),
    (
        "livechat_dispatch_seconds",
        Kind::Histogram,
        Some(Unit::Seconds),
        "Chat command latency at the server: limits, dispatch and the store's answer.",
    ),
    ("livechat_frames_sent_total", Kind::Counter, None, "Websocket frames sent."),
    ("livechat_bytes_sent_total", Kind::Counter, Some(Unit::Bytes), "Websocket bytes sent."),
    ("livechat_frames_refused_total", Kind::Counter, None, "Client frames refused."),
    ("livechat_resyncs_total", Kind::Counter, None, "Lagging views resynced."),
    (
        "livechat_http_header_timeouts_total",
        Kind::Counter,
        None,
        "HTTP connections closed because a request head did not arrive in time.",
    ),
    ("livechat_limited_total", Kind::Counter, None, "Requests refused by a limit."),
    (
        "livechat_unknown_clients_total",
        Kind::Counter,
        None,
        "Requests needing the client address from a trusted proxy that did not name it in X-Forwarded-For.",
    ),
    ("livechat_closes_total", Kind::Counter, None, "Websockets closed by the server, by close code."),
    ("livechat_rooms", Kind::Gauge, None, "Rooms resident in memory (with their recent window)."),
    ("livechat_events_stored", Kind::Gauge, None, "The event store's last known position."),
    ("livechat_events_projected", Kind::Gauge, None, "The read model's position."),
    ("livechat_projection_lag", Kind::Gauge, None, "Events stored but not yet projected."),
    ("livechat_connections_open", Kind::Gauge, None, "HTTP and websocket connections open now."),
    ("livechat_window_messages", Kind::Gauge, None, "Messages held in the rooms' windows."),
    ("livechat_rooms_loaded_total", Kind::Counter, None, "Rooms loaded from the store."),
    ("livechat_rooms_evicted_total", Kind::Counter, None, "Idle rooms evicted from memory."),
    ("livechat_build_info", Kind::Gauge, None, "Always 1; the version and this process's claim identity in labels."),
    (
        "livechat_mentions_notified_total",
        Kind::Counter,
        None,
        "Mention notifications delivered by this process (the notifier runs in one process at a time).",
    ),
];

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::dashboard::{Reading, Snapshot};

    #[test]
    fn the_exposition_has_every_metric_with_help_and_histogram_buckets() {
        let metrics = Metrics::new();
        metrics.set_node("node-1:42:abcd");
        metrics.sent(100);
        metrics.dispatch.record(0.000_05);
        metrics.limited(Limit::Typing);
        metrics.closed(1008);
        metrics.set_levels(&Levels { rooms: 2, store_head: 10, projected: 8, ..Levels::default() });
        let text = metrics.render();
        for (name, ..) in &DESCRIPTIONS {
            assert!(text.contains(&format!("# HELP {name} ")), "{name} described: {text}");
        }
        assert!(text.contains("livechat_bytes_sent_total 100\n"), "{text}");
        assert!(text.contains("livechat_rooms 2\n"), "{text}");
        assert!(text.contains("livechat_projection_lag 2\n"), "{text}");
        assert!(text.contains("livechat_limited_total{limit=\"typing\"} 1\n"), "{text}");
        assert!(text.contains("livechat_closes_total{code=\"1008\"} 1\n"), "{text}");
        assert!(text.contains("# TYPE livechat_dispatch_seconds histogram"), "{text}");
        assert!(text.contains("livechat_dispatch_seconds_bucket{le=\"0.0001\"} 1\n"), "{text}");
        assert!(text.contains("livechat_dispatch_seconds_count 1\n"), "{text}");
        assert!(text.contains("livechat_build_info{version=\"0.1.0\",node=\"node-1:42:abcd\"} 1\n"), "{text}");
        let reading = Reading::parse(&text);
        assert_eq!(reading.value("livechat_bytes_sent_total"), 100.0);
        assert_eq!(reading.labelled("livechat_limited_total", "limit", "typing"), 1.0);
        assert_eq!(metrics.limited_count(Limit::Frames), 0);
        let snapshot = Snapshot::of(&reading, None, Duration::ZERO);
        assert_eq!((snapshot.rooms, snapshot.store_head, snapshot.projection_lag), (2, 10, 2));
        assert_eq!(snapshot.dispatch.count(), 1.0);
    }

    #[test]
    fn claims_render_as_holder_series() {
        let claim = cqrs_core::Claim {
            name: "mention-notifier".into(),
            owner: "node-2:7:ffff".into(),
            token: 3,
            expires_at: cqrs_core::Timestamp(5_000_000),
        };
        let text = Metrics::render_claims(&[claim], cqrs_core::Timestamp(2_500_000));
        let reading = Reading::parse(&text);
        assert_eq!(reading.labelled("livechat_handler_holder", "holder", "node-2:7:ffff"), 1.0, "{text}");
        assert_eq!(reading.labelled("livechat_handler_claim_expires_seconds", "handler", "mention-notifier"), 2.5);
        assert!(text.contains("# HELP livechat_handler_holder "), "{text}");
        assert!(!Metrics::render_claims(&[], cqrs_core::Timestamp(0)).contains("livechat_handler_holder{"));
    }

    #[test]
    fn two_apps_count_apart() {
        let (one, two) = (Metrics::new(), Metrics::new());
        one.commands_ok.increment(3);
        assert_eq!(one.reading().value("livechat_commands_ok_total"), 3.0);
        assert_eq!(two.reading().value("livechat_commands_ok_total"), 0.0);
    }
}
