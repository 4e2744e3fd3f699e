//! The dashboard's numbers at one moment, read from a parsed exposition.

use std::time::Duration;

use super::exposition::{Buckets, Reading};

/// The dashboard's numbers, read from the exposition.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Connected views.
    pub views: i64,
    /// Rooms resident in memory.
    pub rooms: u64,
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
    /// The dispatch latency histogram.
    pub dispatch: Buckets,
}

impl Snapshot {
    /// The numbers in `reading`; `previous` (the last snapshot) and `interval` give the rate.
    pub fn of(reading: &Reading, previous: Option<&Snapshot>, interval: Duration) -> Self {
        let count = |name: &str| reading.value(name).max(0.0) as u64;
        let dispatch = reading.buckets("livechat_dispatch_seconds");
        let mut snapshot = Self {
            views: reading.value("livechat_views") as i64,
            rooms: count("livechat_rooms"),
            commands_per_second: 0.0,
            commands_ok: count("livechat_commands_ok_total"),
            commands_refused: count("livechat_commands_refused_total"),
            dispatch_p50_micros: (dispatch.quantile(0.5) * 1e6) as u64,
            dispatch_p99_micros: (dispatch.quantile(0.99) * 1e6) as u64,
            store_head: count("livechat_events_stored"),
            projected: count("livechat_events_projected"),
            projection_lag: count("livechat_projection_lag"),
            frames_sent: count("livechat_frames_sent_total"),
            bytes_sent: count("livechat_bytes_sent_total"),
            resyncs: count("livechat_resyncs_total"),
            dispatch,
        };
        if let Some(previous) = previous {
            let seconds = interval.as_secs_f64();
            if seconds > 0.0 {
                snapshot.commands_per_second = snapshot.commands().saturating_sub(previous.commands()) as f64 / seconds;
            }
        }
        snapshot
    }

    /// Commands handled (accepted or refused), the base of the next rate.
    pub fn commands(&self) -> u64 {
        self.commands_ok + self.commands_refused
    }
}
