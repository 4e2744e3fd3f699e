//! What the tasks share and count: send times, frame sizes, per-viewer and per-sender tallies.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use crate::ws::{position_in, sequence_in};
use crate::NOT_RECEIVED;

/// What every task shares: the clock, the send times, the counters.
pub(crate) struct Shared {
    pub(crate) base: Instant,
    /// Per sequence number: nanoseconds since `base` + 1 when it was sent; 0 = not yet.
    pub(crate) sent_at: Vec<AtomicU64>,
    /// `msg` frames of ours received by viewers (for the drain wait).
    pub(crate) delivered: AtomicU64,
    /// Set while messages are being sent (frames seen then are counted apart).
    pub(crate) sending: AtomicBool,
    /// Per sequence number: acknowledged with `ok: true` (so every viewer must get it).
    pub(crate) ok: Vec<AtomicBool>,
    pub(crate) acked_ok: AtomicU64,
    pub(crate) acked_err: AtomicU64,
}

impl Shared {
    /// Nothing sent or counted yet, for a run of `messages` messages.
    pub(crate) fn new(messages: usize) -> Self {
        Self {
            base: Instant::now(),
            sent_at: (0..messages).map(|_| AtomicU64::new(0)).collect(),
            delivered: AtomicU64::new(0),
            sending: AtomicBool::new(false),
            ok: (0..messages).map(|_| AtomicBool::new(false)).collect(),
            acked_ok: AtomicU64::new(0),
            acked_err: AtomicU64::new(0),
        }
    }

    pub(crate) fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.duration_since(self.base).as_nanos()).unwrap_or(u64::MAX)
    }
}

/// Sizes of `msg` frames: the whole frame, its HTML after the header line, and the difference.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FrameSizes {
    pub(crate) count: u64,
    pub(crate) frame_min: usize,
    pub(crate) frame_max: usize,
    pub(crate) html_min: usize,
    pub(crate) html_max: usize,
    pub(crate) overhead_min: usize,
    pub(crate) overhead_max: usize,
}

impl Default for FrameSizes {
    fn default() -> Self {
        Self {
            count: 0,
            frame_min: usize::MAX,
            frame_max: 0,
            html_min: usize::MAX,
            html_max: 0,
            overhead_min: usize::MAX,
            overhead_max: 0,
        }
    }
}

impl FrameSizes {
    pub(crate) fn add(&mut self, frame: usize, html: usize) {
        self.count += 1;
        self.frame_min = self.frame_min.min(frame);
        self.frame_max = self.frame_max.max(frame);
        self.html_min = self.html_min.min(html);
        self.html_max = self.html_max.max(html);
        self.overhead_min = self.overhead_min.min(frame - html);
        self.overhead_max = self.overhead_max.max(frame - html);
    }

    pub(crate) fn merge(&mut self, other: &Self) {
        if other.count == 0 {
            return;
        }
        self.count += other.count;
        self.frame_min = self.frame_min.min(other.frame_min);
        self.frame_max = self.frame_max.max(other.frame_max);
        self.html_min = self.html_min.min(other.html_min);
        self.html_max = self.html_max.max(other.html_max);
        self.overhead_min = self.overhead_min.min(other.overhead_min);
        self.overhead_max = self.overhead_max.max(other.overhead_max);
    }
}

/// Frames and bytes of one kind.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Tally {
    pub(crate) frames: u64,
    pub(crate) bytes: u64,
}

impl Tally {
    pub(crate) fn add(&mut self, bytes: usize) {
        self.frames += 1;
        self.bytes += bytes as u64;
    }
}

/// What one viewer saw.
#[derive(Debug, Default)]
pub(crate) struct ViewerStats {
    pub(crate) joined: bool,
    /// Per sequence number: receipt − send of its first arrival, microseconds
    /// (`NOT_RECEIVED` if it never came).
    pub(crate) latency_by_seq: Vec<u32>,
    /// Arrivals of a message already received.
    pub(crate) duplicates: u64,
    pub(crate) sizes: FrameSizes,
    /// `msg` frames that were not ours or not yet sent (should stay 0).
    pub(crate) unknown_msgs: u64,
    /// Frames before `joined`.
    pub(crate) catch_up: Tally,
    /// Other frames by kind, whole run.
    pub(crate) other: BTreeMap<String, Tally>,
    /// Other frames while messages were being sent.
    pub(crate) other_while_sending: Tally,
    /// Why the connection ended before the run did, if it did (without `--reconnect`, or
    /// when a reconnect failed for good).
    pub(crate) ended: Option<String>,
    /// With `--reconnect`: why each connection ended, and how long until joined again (µs).
    pub(crate) reconnects: Vec<(String, u64)>,
    /// `reset` frames (the server could not send exactly what was missed).
    pub(crate) resets: u64,
    /// The last position this viewer has (its resume point).
    pub(crate) last_pos: u64,
}

impl ViewerStats {
    /// Records a `msg` frame; false if it is not one of this run's sent messages.
    pub(crate) fn message(&mut self, shared: &Shared, now: Instant, len: usize, head: &str, html: &str) -> bool {
        if let Some(pos) = position_in(head) {
            self.last_pos = self.last_pos.max(pos);
        }
        let messages = shared.sent_at.len();
        let sent = sequence_in(html)
            .filter(|&seq| seq < messages)
            .map(|seq| (seq, shared.sent_at[seq].load(Ordering::Acquire)))
            .filter(|&(_, sent)| sent != 0);
        let Some((seq, sent)) = sent else { return false };
        let latency_us = shared.nanos(now).saturating_sub(sent - 1) / 1_000;
        // A sender's own connection keeps no per-message record: it only reads its catch-up.
        let Some(slot) = self.latency_by_seq.get_mut(seq) else { return true };
        if *slot == NOT_RECEIVED {
            *slot = u32::try_from(latency_us).unwrap_or(NOT_RECEIVED - 1);
        } else {
            self.duplicates += 1;
        }
        self.sizes.add(len, html.len());
        shared.delivered.fetch_add(1, Ordering::Relaxed);
        true
    }
}

/// What the senders saw: acknowledgements and their round trips.
#[derive(Debug, Default)]
pub(crate) struct SenderStats {
    pub(crate) ack_us: Vec<u32>,
    pub(crate) refusals: Vec<String>,
    pub(crate) ended: Option<String>,
    /// Sends repeated with the same id: after a reconnect, or an `unknown` answer.
    pub(crate) resent: u64,
    pub(crate) reconnects: u64,
}

/// The senders' tallies summed.
pub(crate) struct SenderTotals<'a> {
    /// Every acknowledgement's round trip, µs, sorted.
    pub(crate) ack_us: Vec<u32>,
    pub(crate) resent: u64,
    pub(crate) reconnects: u64,
    /// Why sends were refused → how many.
    pub(crate) refusals: BTreeMap<&'a str, usize>,
}

impl<'a> SenderTotals<'a> {
    pub(crate) fn sum(senders: &'a [SenderStats]) -> Self {
        let mut ack_us: Vec<u32> = senders.iter().flat_map(|s| s.ack_us.iter().copied()).collect();
        ack_us.sort_unstable();
        let mut refusals: BTreeMap<&str, usize> = BTreeMap::new();
        for reason in senders.iter().flat_map(|s| s.refusals.iter()) {
            *refusals.entry(reason.as_str()).or_default() += 1;
        }
        Self {
            ack_us,
            resent: senders.iter().map(|s| s.resent).sum(),
            reconnects: senders.iter().map(|s| s.reconnects).sum(),
            refusals,
        }
    }
}

pub(crate) fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    f64::from(sorted[rank.clamp(1, sorted.len()) - 1]) / 1_000.0
}

/// The joined viewers' tallies summed, with every delivery's latency.
#[derive(Debug)]
pub(crate) struct Totals {
    /// Every delivery's latency, µs.
    pub(crate) latencies: Vec<u32>,
    pub(crate) sizes: FrameSizes,
    /// Other frames by kind.
    pub(crate) other: BTreeMap<String, Tally>,
    pub(crate) other_while_sending: Tally,
    pub(crate) catch_up: Tally,
    /// `msg` frames without a sequence number of ours.
    pub(crate) unknown: u64,
    /// Expected messages a viewer never got.
    pub(crate) lost: u64,
    pub(crate) duplicates: u64,
    /// Why connections ended for good → how many.
    pub(crate) ended: BTreeMap<String, usize>,
    /// Each reconnect's time to recover, µs.
    pub(crate) recoveries_us: Vec<u64>,
    /// Why viewers reconnected → how many times.
    pub(crate) reconnect_reasons: BTreeMap<String, usize>,
    pub(crate) resets: u64,
    /// Viewers that reconnected at least once.
    pub(crate) viewers_hit: usize,
    /// Viewers that lost and duplicated nothing.
    pub(crate) viewers_lossless: usize,
    /// Delivery latencies of the messages of each third of the run (is it getting worse?).
    pub(crate) by_third: [Vec<u32>; 3],
    /// Per message, the latency of the last viewer to get it.
    pub(crate) last_viewer_us: Vec<u32>,
}

impl Totals {
    /// Nothing counted yet, for a run of `messages` messages.
    pub(crate) fn new(messages: usize) -> Self {
        Self {
            latencies: Vec::new(),
            sizes: FrameSizes::default(),
            other: BTreeMap::new(),
            other_while_sending: Tally::default(),
            catch_up: Tally::default(),
            unknown: 0,
            lost: 0,
            duplicates: 0,
            ended: BTreeMap::new(),
            recoveries_us: Vec::new(),
            reconnect_reasons: BTreeMap::new(),
            resets: 0,
            viewers_hit: 0,
            viewers_lossless: 0,
            by_third: Default::default(),
            last_viewer_us: vec![0u32; messages],
        }
    }

    /// Sorts the latencies and recovery times, for percentiles.
    pub(crate) fn sort(&mut self) {
        self.recoveries_us.sort_unstable();
        self.latencies.sort_unstable();
        for third in &mut self.by_third {
            third.sort_unstable();
        }
        self.last_viewer_us.sort_unstable();
    }

    /// Adds one joined viewer's tallies; `expected_messages[seq]`: every viewer should get it.
    pub(crate) fn add(&mut self, stats: ViewerStats, expected_messages: &[bool]) {
        let messages = self.last_viewer_us.len();
        self.sizes.merge(&stats.sizes);
        for (kind, tally) in &stats.other {
            let total = self.other.entry(kind.clone()).or_default();
            total.frames += tally.frames;
            total.bytes += tally.bytes;
        }
        self.other_while_sending.frames += stats.other_while_sending.frames;
        self.other_while_sending.bytes += stats.other_while_sending.bytes;
        self.catch_up.frames += stats.catch_up.frames;
        self.catch_up.bytes += stats.catch_up.bytes;
        self.unknown += stats.unknown_msgs;
        self.duplicates += stats.duplicates;
        self.resets += stats.resets;
        if !stats.reconnects.is_empty() {
            self.viewers_hit += 1;
        }
        for (why, us) in &stats.reconnects {
            self.recoveries_us.push(*us);
            *self.reconnect_reasons.entry(why.clone()).or_default() += 1;
        }
        let mut viewer_lost = 0;
        for (seq, &us) in stats.latency_by_seq.iter().enumerate() {
            if us == NOT_RECEIVED {
                viewer_lost += u64::from(expected_messages[seq]);
                continue;
            }
            self.latencies.push(us);
            self.by_third[(seq * 3 / messages).min(2)].push(us);
            self.last_viewer_us[seq] = self.last_viewer_us[seq].max(us);
        }
        self.lost += viewer_lost;
        if viewer_lost == 0 && stats.duplicates == 0 {
            self.viewers_lossless += 1;
        }
        if let Some(why) = stats.ended {
            *self.ended.entry(why).or_default() += 1;
        }
    }
}
