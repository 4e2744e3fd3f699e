//! `loadgen`: a websocket load generator for `livechat-app` (issue 5): many idle readers in
//! one room, a steady stream of new messages, and what each reader gets.
//!
//! Run it through the script, which builds both binaries, starts a release server on
//! 127.0.0.1:4700 with the in-memory store and passes its pid:
//! ```sh
//! scripts/loadtest                                   # 1 000 viewers, 10 msg/s, 30 s
//! scripts/loadtest --viewers 10000
//! scripts/loadtest --quick                           # 100 viewers, 5 s: a smoke run
//! ```
//! or by hand against a running server:
//! ```sh
//! cargo run --release -p benches --bin loadgen -- --url ws://127.0.0.1:4700/live \
//!     --viewers 1000 --rate 10 --seconds 30 --content-bytes 120 --server-pid "$(pidof livechat-app)"
//! ```
//!
//! What it does, in one process sharing one monotonic clock:
//! 1. raises its own `RLIMIT_NOFILE` soft limit to the hard limit;
//! 2. connects `--senders` sender connections (default: enough that each sends at most one
//!    message per 2 s, half the room's limit of 5 per 5 s per name; each has its own name
//!    cookie, and sends far below the server's 10 frames/s per connection); every connection
//!    claims its own client address in `X-Forwarded-For` (the server trusts loopback as a proxy),
//!    so the server's per-address limits see one client per simulated browser;
//! 3. reads the server's `VmRSS`, opens `--viewers` viewers in parallel batches of `--batch`
//!    (each: upgrade with cookie `livechat_name=viewer-N`, `join` the room, read the catch-up
//!    until `joined`), waits `--settle` seconds for presence updates to stop, and reads `VmRSS`
//!    again: the difference divided by the viewers is the server memory per idle view;
//! 4. sends `--rate` messages per second for `--seconds`, round-robin over the senders. Each
//!    message's content starts with `lgseqNNNNNNNN` (its sequence number) padded to
//!    `--content-bytes`; the sender stores the send `Instant` just before writing the frame;
//! 5. every viewer, on each `msg` frame, takes `Instant::now()`, finds the sequence number in
//!    the HTML and records receipt − send: one latency per (viewer, message) pair;
//! 6. waits until every viewer has every acknowledged message (or `--drain` seconds without
//!    progress), then reports delivery latency p50/p99/max, deliveries lost and duplicated,
//!    the size of a new-message frame against its HTML, the other frames (presence `morph`,
//!    `pong`, …) with their bytes, the server's memory per idle view and its CPU time per
//!    delivered frame. A table for people, then one JSON line (`{"loadgen":…}`) for tools.
//!
//! Viewers ping every 25 s (the server drops a silent browser after 60 s). The generator and
//! the server share the machine's cores: the latency it reports includes the generator's own
//! scheduling, as a browser's would include its own.

mod args;
mod report;
mod sender;
mod server;
mod stats;
mod viewer;
mod ws;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::args::{parse_args, Args};
use crate::report::Report;
use crate::sender::sender;
use crate::server::{vm_rss_kib, CpuStart, CpuUse};
use crate::stats::{percentile, SenderStats, SenderTotals, Shared, Totals, ViewerStats};
use crate::viewer::viewer;

/// The marker before each message's sequence number in its content (and so in its HTML).
const MARKER: &str = "lgseq";
/// A viewer's latency slot for a message it has not received.
const NOT_RECEIVED: u32 = u32::MAX;
/// How often connections ping (the server drops a silent browser after 60 s).
const PING_EVERY: Duration = Duration::from_secs(25);
/// The longest wait to connect and join.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

fn main() -> Result<()> {
    let args = parse_args()?;
    let (soft, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).context("reading RLIMIT_NOFILE")?;
    let nofile = rlimit::increase_nofile_limit(hard).context("raising RLIMIT_NOFILE")?;
    eprintln!("loadgen: open files limit {soft} -> {nofile} (hard {hard})");
    if (nofile as usize) < args.viewers + 64 {
        bail!("{} viewers need more than the {nofile} open files this process may have", args.viewers);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("tokio runtime")?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    let plan = Plan::new(args);
    let args = &plan.args;
    let shared = Arc::new(Shared::new(plan.messages));
    let (stop_tx, stop) = watch::channel(false);
    eprintln!(
        "loadgen: {} viewers, {} senders, room {}, {} messages at {}/s of {} bytes, {}",
        args.viewers, plan.senders, plan.room, plan.messages, args.rate, args.content_bytes, args.url
    );

    // Senders first, so their joins' presence updates are over before the viewers come.
    let (sender_queues, sender_tasks) = spawn_senders(&plan, &shared, &stop);
    // Let them join before the viewers come.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (viewer_tasks, joined) = join_phase(&plan, &shared, &stop).await;
    let sent = send_phase(&plan, &shared, sender_queues, joined.joined).await;
    let _ = stop_tx.send(true);

    // Collect.
    let mut sender_stats = Vec::new();
    for task in sender_tasks {
        sender_stats.push(task.await.context("sender task")?);
    }
    // A message is expected at every viewer when the server acknowledged it with `ok: true`.
    let expected_messages: Vec<bool> = shared.ok.iter().map(|ok| ok.load(Ordering::Relaxed)).collect();
    let mut totals = Totals::new(plan.messages);
    for task in viewer_tasks {
        let stats = task.await.context("viewer task")?;
        if stats.joined {
            totals.add(stats, &expected_messages);
        }
    }
    let report = build_report(&plan, joined, sent, &sender_stats, totals, &expected_messages, &shared);
    report.print_table();
    report.print_json();
    if report.args.check {
        check(&Checked {
            args: report.args,
            joined: report.joined,
            messages: plan.messages,
            acked_ok: report.acked_ok,
            acked_err: report.acked_err,
            lost: report.lost,
            duplicates: report.duplicates,
            unknown: report.unknown,
            resets: report.resets,
            ended: &report.ended,
            signalled: &report.signalled,
        })?;
    }
    Ok(())
}

/// The run's shape, fixed before it starts.
struct Plan {
    args: Arc<Args>,
    /// Messages to send: `--rate` × `--seconds`.
    messages: usize,
    /// Sender connections: `--senders`, or enough that each sends at most one message per 2 s.
    senders: usize,
    /// `--room`, or a fresh `load-<unix time>`.
    room: Arc<str>,
}

impl Plan {
    fn new(args: Args) -> Self {
        let messages = (args.rate * args.seconds).round() as usize;
        let senders = args.senders.unwrap_or_else(|| ((args.rate * 2.0).ceil() as usize).max(1));
        let unix = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let room: Arc<str> = Arc::from(args.room.clone().unwrap_or_else(|| format!("load-{unix}")));
        Self { args: Arc::new(args), messages, senders, room }
    }
}

/// Spawns the sender connections; returns the queue of message numbers each one sends, and
/// their tasks.
fn spawn_senders(
    plan: &Plan,
    shared: &Arc<Shared>,
    stop: &watch::Receiver<bool>,
) -> (Vec<mpsc::UnboundedSender<usize>>, Vec<JoinHandle<SenderStats>>) {
    let mut sender_queues = Vec::new();
    let mut sender_tasks: Vec<JoinHandle<SenderStats>> = Vec::new();
    for index in 0..plan.senders {
        let (queue, work) = mpsc::unbounded_channel();
        sender_queues.push(queue);
        sender_tasks.push(tokio::spawn(sender(
            format!("sender-{index:03}"),
            Arc::clone(&plan.args),
            Arc::clone(&plan.room),
            Arc::clone(shared),
            work,
            stop.clone(),
        )));
    }
    (sender_queues, sender_tasks)
}

/// How the viewers joined, and the server's memory before they came and once they idled.
struct Joined {
    joined: usize,
    /// Why the others did not join → how many.
    errors: BTreeMap<String, usize>,
    seconds: f64,
    rss_before: Option<u64>,
    rss_idle: Option<u64>,
}

/// Opens the viewers, waits `--settle` seconds, and reads the server's memory around it;
/// returns the viewer tasks and how the joins went.
async fn join_phase(
    plan: &Plan,
    shared: &Arc<Shared>,
    stop: &watch::Receiver<bool>,
) -> (Vec<JoinHandle<ViewerStats>>, Joined) {
    let args = &plan.args;
    let rss_before = args.server_pid.and_then(vm_rss_kib);
    let join_started = Instant::now();
    let (viewer_tasks, joined, join_errors) = join_viewers(args, &plan.room, shared, stop).await;
    let join_seconds = join_started.elapsed().as_secs_f64();
    eprintln!("loadgen: {joined} of {} viewers joined in {join_seconds:.1} s", args.viewers);
    for (error, count) in &join_errors {
        eprintln!("loadgen:   {count} × {error}");
    }
    tokio::time::sleep(Duration::from_secs_f64(args.settle)).await;
    let rss_idle = args.server_pid.and_then(vm_rss_kib);
    (viewer_tasks, Joined { joined, errors: join_errors, seconds: join_seconds, rss_before, rss_idle })
}

/// What the send phase measured.
struct Sent {
    /// How long sending took.
    seconds: f64,
    /// What each `--kill`/`--term` signal did.
    signalled: Vec<String>,
    /// The CPU used from the start of sending to the end of the drain.
    cpu: CpuUse,
    /// The server's memory after the drain.
    rss_end: Option<u64>,
}

/// Sends `--rate` messages per second round-robin over the senders (sending any signals on
/// their schedule), then waits for the deliveries to drain.
async fn send_phase(
    plan: &Plan,
    shared: &Shared,
    sender_queues: Vec<mpsc::UnboundedSender<usize>>,
    joined: usize,
) -> Sent {
    let (args, server) = (&plan.args, plan.args.server_pid);
    let cpu_start = CpuStart::read(server);
    shared.sending.store(true, Ordering::Relaxed);
    let send_started = tokio::time::Instant::now();
    let signals = spawn_signals(args, send_started);
    for seq in 0..plan.messages {
        tokio::time::sleep_until(send_started + Duration::from_secs_f64(seq as f64 / args.rate)).await;
        let _ = sender_queues[seq % plan.senders].send(seq);
    }
    drop(sender_queues);
    let send_seconds = send_started.elapsed().as_secs_f64();

    // Drain: until every viewer has every acknowledged message, or no progress for a while.
    let mut signalled = Vec::new();
    for signal in signals {
        signalled.push(signal.await.unwrap_or_else(|_| "signal task failed".to_owned()));
    }
    drain(shared, plan.messages, joined, args.drain).await;
    let cpu = cpu_start.since(server, send_started);
    shared.sending.store(false, Ordering::Relaxed);
    let rss_end = server.and_then(vm_rss_kib);
    Sent { seconds: send_seconds, signalled, cpu, rss_end }
}

/// The report from what the phases measured and the tasks counted.
fn build_report<'a>(
    plan: &'a Plan,
    joined: Joined,
    sent: Sent,
    sender_stats: &'a [SenderStats],
    mut totals: Totals,
    expected_messages: &[bool],
    shared: &Shared,
) -> Report<'a> {
    totals.sort();
    let senders = SenderTotals::sum(sender_stats);
    let latencies = &totals.latencies;
    let received = latencies.len() as u64;
    let kib_per_view = match (joined.rss_before, joined.rss_idle) {
        (Some(before), Some(idle)) if joined.joined > 0 => Some((idle as f64 - before as f64) / joined.joined as f64),
        _ => None,
    };
    let deliveries = received + totals.other_while_sending.frames;
    let cpu = sent.cpu;
    Report {
        args: &plan.args,
        room: &plan.room,
        senders: plan.senders,
        joined: joined.joined,
        join_errors: joined.errors,
        join_seconds: joined.seconds,
        sent: shared.sent_at.iter().filter(|at| at.load(Ordering::Relaxed) != 0).count(),
        send_seconds: sent.seconds,
        acked_ok: shared.acked_ok.load(Ordering::Relaxed),
        acked_err: shared.acked_err.load(Ordering::Relaxed),
        ack_us: senders.ack_us,
        expected: joined.joined as u64 * expected_messages.iter().filter(|&&ok| ok).count() as u64,
        received,
        lost: totals.lost,
        duplicates: totals.duplicates,
        unknown: totals.unknown,
        p50: percentile(latencies, 50.0),
        p99: percentile(latencies, 99.0),
        max: latencies.last().map_or(f64::NAN, |&us| f64::from(us) / 1_000.0),
        thirds_p99: totals.by_third.iter().map(|third| percentile(third, 99.0)).collect(),
        last_viewer_us: totals.last_viewer_us,
        sizes: totals.sizes,
        catch_up: totals.catch_up,
        other: totals.other,
        other_while_sending: totals.other_while_sending,
        rss_before: joined.rss_before,
        rss_idle: joined.rss_idle,
        rss_end: sent.rss_end,
        kib_per_view,
        cpu_server: cpu.server,
        server_us_per_frame: cpu.server.map(|cpu| cpu * 1e6 / deliveries.max(1) as f64),
        cpu_self: cpu.own,
        active_seconds: cpu.active_seconds,
        cores: cpu.cores,
        machine_busy_cores: cpu.machine_busy_cores,
        other_cores: cpu.other_cores,
        pressure_before: cpu.pressure_before,
        pressure_after: cpu.pressure_after,
        ended: totals.ended,
        signalled: sent.signalled,
        viewers_hit: totals.viewers_hit,
        viewers_lossless: totals.viewers_lossless,
        reconnect_reasons: totals.reconnect_reasons,
        recoveries_us: totals.recoveries_us,
        resets: totals.resets,
        sender_reconnects: senders.reconnects,
        resent: senders.resent,
        refusals: senders.refusals,
    }
}

/// Opens `--viewers` viewers in parallel batches of `--batch`, each batch joined (or failed)
/// before the next starts. Returns the viewer tasks, how many joined, and why the others did
/// not (reason → count).
async fn join_viewers(
    args: &Arc<Args>,
    room: &Arc<str>,
    shared: &Arc<Shared>,
    stop: &watch::Receiver<bool>,
) -> (Vec<JoinHandle<ViewerStats>>, usize, BTreeMap<String, usize>) {
    let mut viewer_tasks: Vec<JoinHandle<ViewerStats>> = Vec::with_capacity(args.viewers);
    let mut join_errors: BTreeMap<String, usize> = BTreeMap::new();
    let mut joined = 0usize;
    for batch_start in (0..args.viewers).step_by(args.batch) {
        let mut waits = Vec::new();
        for index in batch_start..(batch_start + args.batch).min(args.viewers) {
            let name = if args.shared_name { "viewer".to_owned() } else { format!("viewer-{index:05}") };
            let (tx, rx) = oneshot::channel();
            viewer_tasks.push(tokio::spawn(viewer(
                name,
                Arc::clone(args),
                Arc::clone(room),
                Arc::clone(shared),
                tx,
                stop.clone(),
            )));
            waits.push(rx);
        }
        for wait in waits {
            match wait.await {
                Ok(Ok(())) => joined += 1,
                Ok(Err(error)) => *join_errors.entry(error).or_default() += 1,
                Err(_) => *join_errors.entry("viewer task ended".to_owned()).or_default() += 1,
            }
        }
    }
    (viewer_tasks, joined, join_errors)
}

/// Spawns one task per `--signal`: at its time after `send_started` it sends the signal and
/// returns what happened, for the report.
fn spawn_signals(args: &Args, send_started: tokio::time::Instant) -> Vec<JoinHandle<String>> {
    args.signals
        .iter()
        .map(|&(pid, at, name)| {
            tokio::spawn(async move {
                tokio::time::sleep_until(send_started + Duration::from_secs_f64(at)).await;
                let flag = if name == "kill" { "-KILL" } else { "-TERM" };
                let done = std::process::Command::new("kill").arg(flag).arg(pid.to_string()).status();
                let outcome = match done {
                    Ok(status) if status.success() => "sent".to_owned(),
                    Ok(status) => format!("failed ({status})"),
                    Err(error) => format!("failed ({error})"),
                };
                let unix = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
                eprintln!("loadgen: SIG{} to {pid} at {at} s (unix {unix:.3}): {outcome}", &flag[1..]);
                format!("SIG{} {pid} at {at} s: {outcome}", &flag[1..])
            })
        })
        .collect()
}

/// Waits until every message is acknowledged and every viewer has every acknowledged one, or
/// until deliveries make no progress for `drain` seconds.
async fn drain(shared: &Shared, messages: usize, joined: usize, drain: f64) {
    let mut last = (u64::MAX, Instant::now());
    loop {
        let acked = shared.acked_ok.load(Ordering::Relaxed) + shared.acked_err.load(Ordering::Relaxed);
        let delivered = shared.delivered.load(Ordering::Relaxed);
        let expected = shared.acked_ok.load(Ordering::Relaxed) * joined as u64;
        if acked >= messages as u64 && delivered >= expected {
            break;
        }
        if delivered != last.0 {
            last = (delivered, Instant::now());
        } else if last.1.elapsed().as_secs_f64() > drain {
            eprintln!("loadgen: no progress for {} s; {delivered} of {expected} deliveries", drain);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What `--check` looks at.
struct Checked<'a> {
    args: &'a Args,
    joined: usize,
    messages: usize,
    acked_ok: u64,
    acked_err: u64,
    lost: u64,
    duplicates: u64,
    unknown: u64,
    resets: u64,
    ended: &'a BTreeMap<String, usize>,
    signalled: &'a [String],
}

/// `--check`: fails unless every viewer joined, every message was stored once and delivered
/// once to each viewer, no connection ended for good, and every signal was sent.
fn check(checked: &Checked<'_>) -> Result<()> {
    let Checked { args, joined, messages, acked_ok, acked_err, lost, duplicates, unknown, resets, ended, signalled } =
        *checked;
    let mut failures = Vec::new();
    if joined != args.viewers {
        failures.push(format!("{} of {} viewers joined", joined, args.viewers));
    }
    if acked_ok != messages as u64 {
        failures.push(format!("{acked_ok} of {messages} messages acknowledged as stored ({acked_err} refused)"));
    }
    if lost > 0 || duplicates > 0 || unknown > 0 {
        failures.push(format!("{lost} deliveries lost, {duplicates} duplicated, {unknown} unknown"));
    }
    if !ended.is_empty() {
        failures.push(format!("{} connections ended for good", ended.values().sum::<usize>()));
    }
    if resets > 0 {
        failures.push(format!("{resets} reset frames"));
    }
    if signalled.iter().any(|s| !s.ends_with("sent")) {
        failures.push("a signal was not delivered".to_owned());
    }
    if !failures.is_empty() {
        bail!("check failed: {}", failures.join("; "));
    }
    eprintln!("loadgen: check passed: every message stored once and delivered once to each of {joined} viewers");
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::sender::message_content;
    use crate::ws::{frame_kind, sequence_in};

    #[test]
    fn content_has_the_requested_length_and_its_sequence() {
        for bytes in [23, 120, 500] {
            let content = message_content(42, bytes);
            assert_eq!(content.len(), bytes, "{content:?}");
            assert_eq!(sequence_in(&format!("<p class=\"body\">{content}</p>")), Some(42));
        }
    }

    #[test]
    fn frame_kinds() {
        assert_eq!(frame_kind("{\"t\":\"msg\",\"pos\":3}"), "msg");
        assert_eq!(frame_kind("{\"t\":\"morph\",\"id\":\"presence\"}"), "morph");
        assert_eq!(frame_kind("nonsense"), "?");
    }
}
