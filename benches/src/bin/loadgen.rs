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

// The report's `json!` is one large literal.
#![recursion_limit = "256"]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const USAGE: &str = "usage: loadgen [options]

  --url URL            websocket endpoint (default ws://127.0.0.1:4700/live)
  --addr HOST:PORT     same as --url ws://HOST:PORT/live
  --viewers N          idle readers in the room (default 1000)
  --rate R             new messages per second (default 10)
  --seconds S          how long to send (default 30)
  --content-bytes B    bytes of message text (default 120, at least 14)
  --server-pid PID     read the server's VmRSS and CPU time from /proc/PID
  --senders N          sender connections, one name each (default max(1, ceil(2 * rate)))
  --batch N            viewers connecting at once (default 200)
  --room ID            room to use (default load-<unix time>, fresh each run)
  --shared-name        all viewers use one name (no presence churn while they join)
  --settle S           idle wait before the second RSS reading (default 3)
  --drain S            give up waiting for deliveries after S seconds without progress (default 10)
  --quick              100 viewers, 5 seconds (smoke run)

A deployment behind a balancer (scripts/cluster, scripts/cluster-test):
  --sender-url URL     senders connect here (default --url): the sender on one node
  --reconnect          viewers and senders reconnect when their socket ends, as the page
                       does: a viewer rejoins after the last position it has (resume), a
                       sender resends what was not acknowledged with the same command ids
  --kill PID@S         SIGKILL process PID S seconds after sending starts (repeatable)
  --term PID@S         SIGTERM (graceful shutdown) PID at S seconds (repeatable: a rolling
                       restart, with a supervisor that starts the node again)
  --check              exit 1 unless every viewer joined, every message was stored once
                       (acknowledged), and every viewer got each exactly once";

/// The marker before each message's sequence number in its content (and so in its HTML).
const MARKER: &str = "lgseq";
const NOT_RECEIVED: u32 = u32::MAX;
const PING_EVERY: Duration = Duration::from_secs(25);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
struct Args {
    url: String,
    viewers: usize,
    rate: f64,
    seconds: f64,
    content_bytes: usize,
    server_pid: Option<u32>,
    senders: Option<usize>,
    batch: usize,
    room: Option<String>,
    shared_name: bool,
    settle: f64,
    drain: f64,
    sender_url: Option<String>,
    reconnect: bool,
    signals: Vec<(u32, f64, &'static str)>,
    check: bool,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        url: "ws://127.0.0.1:4700/live".to_owned(),
        viewers: 1000,
        rate: 10.0,
        seconds: 30.0,
        content_bytes: 120,
        server_pid: None,
        senders: None,
        batch: 200,
        room: None,
        shared_name: false,
        settle: 3.0,
        drain: 10.0,
        sender_url: None,
        reconnect: false,
        signals: Vec::new(),
        check: false,
    };
    let signal = |text: String, name: &'static str| -> Result<(u32, f64, &'static str)> {
        let (pid, at) = text.split_once('@').with_context(|| format!("--{name} takes PID@SECONDS, not {text:?}"))?;
        Ok((pid.parse().context("pid")?, at.parse().context("seconds")?, name))
    };
    let mut raw = std::env::args().skip(1);
    while let Some(arg) = raw.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag.to_owned(), Some(value.to_owned())),
            _ => (arg.clone(), None),
        };
        let mut value = || inline.clone().or_else(|| raw.next()).with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--url" => args.url = value()?,
            "--addr" => args.url = format!("ws://{}/live", value()?),
            "--viewers" => args.viewers = value()?.parse().context("--viewers")?,
            "--rate" => args.rate = value()?.parse().context("--rate")?,
            "--seconds" => args.seconds = value()?.parse().context("--seconds")?,
            "--content-bytes" => args.content_bytes = value()?.parse().context("--content-bytes")?,
            "--server-pid" => args.server_pid = Some(value()?.parse().context("--server-pid")?),
            "--senders" => args.senders = Some(value()?.parse().context("--senders")?),
            "--batch" => args.batch = value()?.parse().context("--batch")?,
            "--room" => args.room = Some(value()?),
            "--shared-name" => args.shared_name = true,
            "--settle" => args.settle = value()?.parse().context("--settle")?,
            "--drain" => args.drain = value()?.parse().context("--drain")?,
            "--sender-url" => args.sender_url = Some(value()?),
            "--reconnect" => args.reconnect = true,
            "--kill" => args.signals.push(signal(value()?, "kill")?),
            "--term" => args.signals.push(signal(value()?, "term")?),
            "--check" => args.check = true,
            "--quick" => {
                args.viewers = 100;
                args.seconds = 5.0;
                args.settle = 1.0;
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if args.content_bytes < MARKER.len() + 9 {
        bail!("--content-bytes must be at least {}", MARKER.len() + 9);
    }
    if args.rate <= 0.0 || args.seconds <= 0.0 || args.batch == 0 {
        bail!("--rate, --seconds and --batch must be positive");
    }
    Ok(args)
}

/// What every task shares: the clock, the send times, the counters.
struct Shared {
    base: Instant,
    /// Per sequence number: nanoseconds since `base` + 1 when it was sent; 0 = not yet.
    sent_at: Vec<AtomicU64>,
    /// `msg` frames of ours received by viewers (for the drain wait).
    delivered: AtomicU64,
    /// Set while messages are being sent (frames seen then are counted apart).
    sending: AtomicBool,
    /// Per sequence number: acknowledged with `ok: true` (so every viewer must get it).
    ok: Vec<AtomicBool>,
    acked_ok: AtomicU64,
    acked_err: AtomicU64,
}

impl Shared {
    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.duration_since(self.base).as_nanos()).unwrap_or(u64::MAX)
    }
}

/// Sizes of `msg` frames: the whole frame, its HTML after the header line, and the difference.
#[derive(Debug, Clone, Copy)]
struct FrameSizes {
    count: u64,
    frame_min: usize,
    frame_max: usize,
    html_min: usize,
    html_max: usize,
    overhead_min: usize,
    overhead_max: usize,
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
    fn add(&mut self, frame: usize, html: usize) {
        self.count += 1;
        self.frame_min = self.frame_min.min(frame);
        self.frame_max = self.frame_max.max(frame);
        self.html_min = self.html_min.min(html);
        self.html_max = self.html_max.max(html);
        self.overhead_min = self.overhead_min.min(frame - html);
        self.overhead_max = self.overhead_max.max(frame - html);
    }

    fn merge(&mut self, other: &Self) {
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
struct Tally {
    frames: u64,
    bytes: u64,
}

impl Tally {
    fn add(&mut self, bytes: usize) {
        self.frames += 1;
        self.bytes += bytes as u64;
    }
}

/// What one viewer saw.
#[derive(Debug, Default)]
struct ViewerStats {
    joined: bool,
    /// Per sequence number: receipt − send of its first arrival, microseconds
    /// (`NOT_RECEIVED` if it never came).
    latency_by_seq: Vec<u32>,
    /// Arrivals of a message already received.
    duplicates: u64,
    sizes: FrameSizes,
    /// `msg` frames that were not ours or not yet sent (should stay 0).
    unknown_msgs: u64,
    /// Frames before `joined`.
    catch_up: Tally,
    /// Other frames by kind, whole run.
    other: BTreeMap<String, Tally>,
    /// Other frames while messages were being sent.
    other_while_sending: Tally,
    /// Why the connection ended before the run did, if it did (without `--reconnect`, or
    /// when a reconnect failed for good).
    ended: Option<String>,
    /// With `--reconnect`: why each connection ended, and how long until joined again (µs).
    reconnects: Vec<(String, u64)>,
    /// `reset` frames (the server could not send exactly what was missed).
    resets: u64,
    /// The last position this viewer has (its resume point).
    last_pos: u64,
}

fn frame_kind(head: &str) -> &str {
    head.find("\"t\":\"")
        .map(|at| &head[at + 5..])
        .and_then(|rest| rest.find('"').map(|end| &rest[..end]))
        .unwrap_or("?")
}

fn sequence_in(html: &str) -> Option<usize> {
    let at = html.find(MARKER)? + MARKER.len();
    let digits = &html[at..];
    let end = digits.find(|c: char| !c.is_ascii_digit()).unwrap_or(digits.len());
    digits[..end].parse().ok()
}

fn ws_config() -> WebSocketConfig {
    // Small buffers: tungstenite's default 128 KiB read buffer per connection would cost the
    // generator over a gigabyte at 10 000 viewers.
    WebSocketConfig::default().read_buffer_size(8 * 1024).write_buffer_size(4 * 1024)
}

/// The client address a connection claims through the server's trusted loopback proxy: each
/// simulated browser is its own client, as behind a real proxy, so the server's per-address
/// limits (connections, commands) apply per browser and not to the whole load test.
fn forwarded_for(name: &str) -> String {
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    let [a, b, c, ..] = hash.to_le_bytes();
    format!("10.{a}.{b}.{}", c.max(1))
}

async fn connect(url: &str, name: &str) -> Result<Ws> {
    let mut request = url.into_client_request().context("websocket URL")?;
    request.headers_mut().insert("cookie", HeaderValue::from_str(&format!("livechat_name={name}"))?);
    request.headers_mut().insert("x-forwarded-for", HeaderValue::from_str(&forwarded_for(name))?);
    let (ws, _) = tokio_tungstenite::connect_async_with_config(request, Some(ws_config()), true)
        .await
        .with_context(|| format!("connecting {url}"))?;
    Ok(ws)
}

fn join_frame(room: &str, after: u64) -> String {
    json!({"t": "join", "view": "room", "room": room, "after": after}).to_string()
}

/// The `pos` of a frame's header, if it has one.
fn position_in(head: &str) -> Option<u64> {
    let at = head.find("\"pos\":")? + 6;
    let digits = &head[at..];
    let end = digits.find(|c: char| !c.is_ascii_digit()).unwrap_or(digits.len());
    digits[..end].parse().ok()
}

/// Connects, joins after `stats.last_pos` and reads the catch-up until `joined`. Messages of
/// ours in the catch-up (a resume after a reconnect) count as deliveries.
async fn connect_and_join(url: &str, name: &str, room: &str, shared: &Shared, stats: &mut ViewerStats) -> Result<Ws> {
    let mut ws = connect(url, name).await?;
    ws.send(Message::Text(join_frame(room, stats.last_pos).into())).await.context("sending join")?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => {
                let now = Instant::now();
                let text = text.as_str();
                let (head, html) = text.split_once('\n').unwrap_or((text, ""));
                match frame_kind(head) {
                    "joined" => {
                        stats.last_pos = stats.last_pos.max(position_in(head).unwrap_or(0));
                        return Ok(ws);
                    }
                    "error" => bail!("server refused the join: {head}"),
                    "msg" => {
                        if !stats.message(shared, now, text.len(), head, html) {
                            stats.catch_up.add(text.len());
                        }
                    }
                    "reset" => {
                        stats.resets += 1;
                        stats.catch_up.add(text.len());
                    }
                    _ => stats.catch_up.add(text.len()),
                }
            }
            Some(Ok(Message::Close(close))) => bail!("closed before joined: {close:?}"),
            Some(Ok(_)) => {}
            Some(Err(error)) => bail!("socket failed before joined: {error}"),
            None => bail!("socket ended before joined"),
        }
    }
}

impl ViewerStats {
    /// Records a `msg` frame; false if it is not one of this run's sent messages.
    fn message(&mut self, shared: &Shared, now: Instant, len: usize, head: &str, html: &str) -> bool {
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

/// Reconnects (with `--reconnect`) until joined or the run stops: 100 ms apart, doubling to 1 s,
/// as the page's schedule (without its jitter). None when stopped or out of time.
async fn rejoin(
    url: &str,
    name: &str,
    room: &str,
    shared: &Shared,
    stats: &mut ViewerStats,
    stop: &mut watch::Receiver<bool>,
) -> Option<Ws> {
    let started = Instant::now();
    let mut delay = Duration::from_millis(100);
    while started.elapsed() < CONNECT_TIMEOUT {
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = stop.changed() => return None,
        }
        match tokio::time::timeout(Duration::from_secs(5), connect_and_join(url, name, room, shared, stats)).await {
            Ok(Ok(ws)) => return Some(ws),
            Ok(Err(_)) | Err(_) => delay = (delay * 2).min(Duration::from_secs(1)),
        }
    }
    None
}

async fn viewer(
    name: String,
    args: Arc<Args>,
    room: Arc<str>,
    shared: Arc<Shared>,
    joined: oneshot::Sender<Result<(), String>>,
    mut stop: watch::Receiver<bool>,
) -> ViewerStats {
    let messages = shared.sent_at.len();
    let mut stats = ViewerStats { latency_by_seq: vec![NOT_RECEIVED; messages], ..ViewerStats::default() };
    let joining =
        tokio::time::timeout(CONNECT_TIMEOUT, connect_and_join(&args.url, &name, &room, &shared, &mut stats)).await;
    let mut ws = match joining {
        Ok(Ok(ws)) => ws,
        Ok(Err(error)) => {
            let _ = joined.send(Err(format!("{error:#}")));
            return stats;
        }
        Err(_) => {
            let _ = joined.send(Err("connect and join timed out".to_owned()));
            return stats;
        }
    };
    stats.joined = true;
    let _ = joined.send(Ok(()));
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
    loop {
        let ended = tokio::select! {
            biased;
            frame = ws.next() => {
                let now = Instant::now();
                match text_frame(frame) {
                    Ok(Some(text)) => {
                        let text = text.as_str();
                        let (head, html) = text.split_once('\n').unwrap_or((text, ""));
                        let kind = frame_kind(head);
                        if kind == "msg" {
                            if !stats.message(&shared, now, text.len(), head, html) {
                                stats.unknown_msgs += 1;
                            }
                        } else {
                            if kind == "reset" {
                                stats.resets += 1;
                            }
                            stats.other.entry(kind.to_owned()).or_default().add(text.len());
                            if shared.sending.load(Ordering::Relaxed) {
                                stats.other_while_sending.add(text.len());
                            }
                        }
                        None
                    }
                    Ok(None) => None,
                    Err(ended) => Some(ended),
                }
            }
            _ = ping.tick() => {
                ws.send(Message::Text("{\"t\":\"ping\"}".into())).await.err().map(|error| format!("ping failed: {error}"))
            }
            _ = stop.changed() => break,
        };
        let Some(why) = ended else { continue };
        if !args.reconnect {
            stats.ended = Some(why);
            break;
        }
        let lost_at = Instant::now();
        match rejoin(&args.url, &name, &room, &shared, &mut stats, &mut stop).await {
            Some(again) => {
                ws = again;
                let took = u64::try_from(lost_at.elapsed().as_micros()).unwrap_or(u64::MAX);
                stats.reconnects.push((simplify(&why), took));
            }
            None => {
                if !*stop.borrow() {
                    stats.ended = Some(format!("{why}; could not rejoin"));
                }
                break;
            }
        }
    }
    stats
}

/// An end reason without the details that differ per connection.
fn simplify(why: &str) -> String {
    why.chars().take(80).collect()
}

/// What the senders saw: acknowledgements and their round trips.
#[derive(Debug, Default)]
struct SenderStats {
    ack_us: Vec<u32>,
    refusals: Vec<String>,
    ended: Option<String>,
    /// Sends repeated with the same id: after a reconnect, or an `unknown` answer.
    resent: u64,
    reconnects: u64,
}

/// One sender connection: sends what it is given, reads acknowledgements; with `--reconnect`,
/// reconnects when the socket ends and sends again, with the same ids, what is unanswered.
async fn sender(
    name: String,
    args: Arc<Args>,
    room: Arc<str>,
    shared: Arc<Shared>,
    mut work: mpsc::UnboundedReceiver<usize>,
    mut stop: watch::Receiver<bool>,
) -> SenderStats {
    let url = args.sender_url.clone().unwrap_or_else(|| args.url.clone());
    let (reconnect, content_bytes) = (args.reconnect, args.content_bytes);
    let mut stats = SenderStats::default();
    let mut ignored = ViewerStats::default();
    let mut ws = match connect_and_join(&url, &name, &room, &shared, &mut ignored).await {
        Ok(ws) => ws,
        Err(error) => {
            stats.ended = Some(format!("{error:#}"));
            return stats;
        }
    };
    // Sent and not answered yet: the frame to send again, with its id.
    let mut pending: BTreeMap<usize, String> = BTreeMap::new();
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
    let mut open = true;
    loop {
        let ended: Option<String> = tokio::select! {
            seq = work.recv(), if open => {
                let Some(seq) = seq else {
                    open = false;
                    continue;
                };
                let content = message_content(seq, content_bytes);
                let frame = json!({"t": "send", "ref": seq, "id": uuid::Uuid::new_v4(), "message": content}).to_string();
                pending.insert(seq, frame.clone());
                shared.sent_at[seq].store(shared.nanos(Instant::now()) + 1, Ordering::Release);
                ws.send(Message::Text(frame.into())).await.err().map(|error| format!("send failed: {error}"))
            }
            frame = ws.next() => {
                let now = Instant::now();
                match text_frame(frame) {
                    Ok(Some(text)) => {
                        let text = text.as_str();
                        let head = text.split_once('\n').map_or(text, |(head, _)| head);
                        match frame_kind(head) {
                            "ack" => {
                                let ack: Value = serde_json::from_str(head).unwrap_or(Value::Null);
                                let seq = ack["ref"].as_u64().and_then(|r| usize::try_from(r).ok());
                                let status = ack["status"].as_str().unwrap_or("");
                                if ack["ok"] == Value::Bool(true) {
                                    if let Some(seq) = seq {
                                        pending.remove(&seq);
                                        if shared.ok.get(seq).is_some_and(|ok| !ok.swap(true, Ordering::Relaxed)) {
                                            shared.acked_ok.fetch_add(1, Ordering::Relaxed);
                                        }
                                    }
                                } else if status == "unknown" {
                                    // Not known to be stored: the same id again, as the page does.
                                    if let Some(frame) = seq.and_then(|seq| pending.get(&seq)) {
                                        tokio::time::sleep(Duration::from_millis(200)).await;
                                        stats.resent += 1;
                                        let _ = ws.send(Message::Text(frame.clone().into())).await;
                                    }
                                } else {
                                    if let Some(seq) = seq {
                                        pending.remove(&seq);
                                    }
                                    shared.acked_err.fetch_add(1, Ordering::Relaxed);
                                    stats.refusals.push(ack["error"].as_str().unwrap_or("?").to_owned());
                                }
                                if let Some(sent) = seq.and_then(|seq| shared.sent_at.get(seq)) {
                                    let sent = sent.load(Ordering::Acquire);
                                    let us = shared.nanos(now).saturating_sub(sent.saturating_sub(1)) / 1_000;
                                    stats.ack_us.push(u32::try_from(us).unwrap_or(u32::MAX));
                                }
                            }
                            "error" => stats.refusals.push(head.to_owned()),
                            _ => {}
                        }
                        None
                    }
                    Ok(None) => None,
                    Err(ended) => Some(ended),
                }
            }
            _ = ping.tick() => {
                ws.send(Message::Text("{\"t\":\"ping\"}".into())).await.err().map(|error| format!("ping failed: {error}"))
            }
            _ = stop.changed() => break,
        };
        let Some(why) = ended else { continue };
        if !reconnect {
            stats.ended = Some(why);
            break;
        }
        let Some(again) = rejoin(&url, &name, &room, &shared, &mut ignored, &mut stop).await else {
            if !*stop.borrow() {
                stats.ended = Some(format!("{why}; could not reconnect"));
            }
            break;
        };
        ws = again;
        stats.reconnects += 1;
        let mut failed = None;
        for frame in pending.values() {
            stats.resent += 1;
            if let Err(error) = ws.send(Message::Text(frame.clone().into())).await {
                failed = Some(error);
                break;
            }
        }
        if let Some(error) = failed {
            stats.ended = Some(format!("resend failed: {error}"));
            break;
        }
    }
    stats
}

/// `lgseq00000042 ` then filler, exactly `bytes` bytes, not ending in a space.
fn message_content(seq: usize, bytes: usize) -> String {
    const FILLER: &str = "the quick brown fox jumps over the lazy dog ";
    let mut content = format!("{MARKER}{seq:08} ");
    while content.len() < bytes {
        content.push_str(FILLER);
    }
    content.truncate(bytes - 1);
    content.push('.');
    content
}

/// `VmRSS` of a process, KiB.
fn vm_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
}

/// User + system CPU time of a process (`/proc/PID/stat`), in seconds (USER_HZ = 100).
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// (busy, total) jiffies of all CPUs together, from the first line of `/proc/stat`.
fn machine_jiffies() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> =
        stat.lines().next()?.split_whitespace().skip(1).take(8).filter_map(|f| f.parse().ok()).collect();
    let total: u64 = fields.iter().sum();
    let idle = fields.get(3)? + fields.get(4)?;
    Some((total - idle, total))
}

/// `some avg10` of `/proc/pressure/cpu`: the share of time runnable tasks waited for a CPU.
fn cpu_pressure_avg10() -> Option<f64> {
    let pressure = std::fs::read_to_string("/proc/pressure/cpu").ok()?;
    pressure.lines().next()?.split_whitespace().find_map(|f| f.strip_prefix("avg10="))?.parse().ok()
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    f64::from(sorted[rank.clamp(1, sorted.len()) - 1]) / 1_000.0
}

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
    let args = Arc::new(args);
    let messages = (args.rate * args.seconds).round() as usize;
    let senders = args.senders.unwrap_or_else(|| ((args.rate * 2.0).ceil() as usize).max(1));
    let unix = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let room: Arc<str> = Arc::from(args.room.clone().unwrap_or_else(|| format!("load-{unix}")));
    let shared = Arc::new(Shared {
        base: Instant::now(),
        sent_at: (0..messages).map(|_| AtomicU64::new(0)).collect(),
        delivered: AtomicU64::new(0),
        sending: AtomicBool::new(false),
        ok: (0..messages).map(|_| AtomicBool::new(false)).collect(),
        acked_ok: AtomicU64::new(0),
        acked_err: AtomicU64::new(0),
    });
    let (stop_tx, stop) = watch::channel(false);
    let server = args.server_pid;
    eprintln!(
        "loadgen: {} viewers, {senders} senders, room {room}, {messages} messages at {}/s of {} bytes, {}",
        args.viewers, args.rate, args.content_bytes, args.url
    );

    // Senders first, so their joins' presence updates are over before the viewers come.
    let mut sender_queues = Vec::new();
    let mut sender_tasks: Vec<JoinHandle<SenderStats>> = Vec::new();
    for index in 0..senders {
        let (queue, work) = mpsc::unbounded_channel();
        sender_queues.push(queue);
        sender_tasks.push(tokio::spawn(sender(
            format!("sender-{index:03}"),
            Arc::clone(&args),
            Arc::clone(&room),
            Arc::clone(&shared),
            work,
            stop.clone(),
        )));
    }
    // Let them join before the viewers come.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let rss_before = server.and_then(vm_rss_kib);
    let join_started = Instant::now();
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
                Arc::clone(&args),
                Arc::clone(&room),
                Arc::clone(&shared),
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
    let join_seconds = join_started.elapsed().as_secs_f64();
    eprintln!("loadgen: {joined} of {} viewers joined in {join_seconds:.1} s", args.viewers);
    for (error, count) in &join_errors {
        eprintln!("loadgen:   {count} × {error}");
    }
    tokio::time::sleep(Duration::from_secs_f64(args.settle)).await;
    let rss_idle = server.and_then(vm_rss_kib);

    // Send.
    let cpu_server_start = server.and_then(|pid| cpu_seconds(&pid.to_string()));
    let cpu_self_start = cpu_seconds("self");
    let machine_start = machine_jiffies();
    let pressure_before = cpu_pressure_avg10();
    shared.sending.store(true, Ordering::Relaxed);
    let send_started = tokio::time::Instant::now();
    let signals: Vec<JoinHandle<String>> = args
        .signals
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
        .collect();
    for seq in 0..messages {
        tokio::time::sleep_until(send_started + Duration::from_secs_f64(seq as f64 / args.rate)).await;
        let _ = sender_queues[seq % senders].send(seq);
    }
    drop(sender_queues);
    let send_seconds = send_started.elapsed().as_secs_f64();

    // Drain: until every viewer has every acknowledged message, or no progress for a while.
    let mut signalled = Vec::new();
    for signal in signals {
        signalled.push(signal.await.unwrap_or_else(|_| "signal task failed".to_owned()));
    }
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
        } else if last.1.elapsed().as_secs_f64() > args.drain {
            eprintln!("loadgen: no progress for {} s; {delivered} of {expected} deliveries", args.drain);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cpu_server = server.and_then(|pid| cpu_seconds(&pid.to_string())).zip(cpu_server_start).map(|(b, a)| b - a);
    let cpu_self = cpu_seconds("self").zip(cpu_self_start).map(|(b, a)| b - a);
    let active_seconds = send_started.elapsed().as_secs_f64();
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    // Busy cores of the whole machine while sending, and what is left for everything else
    // (other people's builds and benchmarks on a shared box).
    let machine_busy_cores = machine_jiffies().zip(machine_start).and_then(|((busy, total), (busy0, total0))| {
        (total > total0).then(|| (busy - busy0) as f64 / (total - total0) as f64 * cores as f64)
    });
    let other_cores =
        machine_busy_cores.map(|busy| busy - (cpu_server.unwrap_or(0.0) + cpu_self.unwrap_or(0.0)) / active_seconds);
    let pressure_after = cpu_pressure_avg10();
    shared.sending.store(false, Ordering::Relaxed);
    let rss_end = server.and_then(vm_rss_kib);
    let _ = stop_tx.send(true);

    // Collect.
    let mut latencies: Vec<u32> = Vec::new();
    let mut sizes = FrameSizes::default();
    let mut other: BTreeMap<String, Tally> = BTreeMap::new();
    let mut other_while_sending = Tally::default();
    let mut catch_up = Tally::default();
    let (mut unknown, mut lost, mut duplicates) = (0u64, 0u64, 0u64);
    let mut ended: BTreeMap<String, usize> = BTreeMap::new();
    let mut sender_stats = Vec::new();
    let mut recoveries_us: Vec<u64> = Vec::new();
    let mut reconnect_reasons: BTreeMap<String, usize> = BTreeMap::new();
    let (mut resets, mut viewers_hit, mut viewers_lossless) = (0u64, 0usize, 0usize);
    // Delivery latencies of the messages of each third of the run (is it getting worse?), and
    // per message the latency of the last viewer to get it.
    let mut by_third: [Vec<u32>; 3] = Default::default();
    let mut last_viewer_us = vec![0u32; messages];
    for task in sender_tasks {
        sender_stats.push(task.await.context("sender task")?);
    }
    let acked_ok = shared.acked_ok.load(Ordering::Relaxed);
    let acked_err = shared.acked_err.load(Ordering::Relaxed);
    // A message is expected at every viewer when the server acknowledged it with `ok: true`.
    let expected_messages: Vec<bool> = shared.ok.iter().map(|ok| ok.load(Ordering::Relaxed)).collect();
    let mut ack_us: Vec<u32> = sender_stats.iter().flat_map(|s| s.ack_us.iter().copied()).collect();
    ack_us.sort_unstable();
    for task in viewer_tasks {
        let stats = task.await.context("viewer task")?;
        if !stats.joined {
            continue;
        }
        sizes.merge(&stats.sizes);
        for (kind, tally) in &stats.other {
            let total = other.entry(kind.clone()).or_default();
            total.frames += tally.frames;
            total.bytes += tally.bytes;
        }
        other_while_sending.frames += stats.other_while_sending.frames;
        other_while_sending.bytes += stats.other_while_sending.bytes;
        catch_up.frames += stats.catch_up.frames;
        catch_up.bytes += stats.catch_up.bytes;
        unknown += stats.unknown_msgs;
        duplicates += stats.duplicates;
        resets += stats.resets;
        if !stats.reconnects.is_empty() {
            viewers_hit += 1;
        }
        for (why, us) in &stats.reconnects {
            recoveries_us.push(*us);
            *reconnect_reasons.entry(why.clone()).or_default() += 1;
        }
        let mut viewer_lost = 0;
        for (seq, &us) in stats.latency_by_seq.iter().enumerate() {
            if us == NOT_RECEIVED {
                viewer_lost += u64::from(expected_messages[seq]);
                continue;
            }
            latencies.push(us);
            by_third[(seq * 3 / messages).min(2)].push(us);
            last_viewer_us[seq] = last_viewer_us[seq].max(us);
        }
        lost += viewer_lost;
        if viewer_lost == 0 && stats.duplicates == 0 {
            viewers_lossless += 1;
        }
        if let Some(why) = stats.ended {
            *ended.entry(why).or_default() += 1;
        }
    }
    recoveries_us.sort_unstable();
    let recovery_ms = |p: f64| {
        if recoveries_us.is_empty() {
            f64::NAN
        } else {
            let rank = ((p / 100.0) * recoveries_us.len() as f64).ceil().max(1.0) as usize;
            recoveries_us[rank.min(recoveries_us.len()) - 1] as f64 / 1_000.0
        }
    };
    let resent: u64 = sender_stats.iter().map(|s| s.resent).sum();
    let sender_reconnects: u64 = sender_stats.iter().map(|s| s.reconnects).sum();
    latencies.sort_unstable();
    for third in &mut by_third {
        third.sort_unstable();
    }
    last_viewer_us.sort_unstable();
    let thirds_p99: Vec<f64> = by_third.iter().map(|third| percentile(third, 99.0)).collect();
    let sent = shared.sent_at.iter().filter(|at| at.load(Ordering::Relaxed) != 0).count();
    let expected = joined as u64 * expected_messages.iter().filter(|&&ok| ok).count() as u64;
    let received = latencies.len() as u64;
    let p50 = percentile(&latencies, 50.0);
    let p99 = percentile(&latencies, 99.0);
    let max = latencies.last().map_or(f64::NAN, |&us| f64::from(us) / 1_000.0);
    let kib_per_view = match (rss_before, rss_idle) {
        (Some(before), Some(idle)) if joined > 0 => Some((idle as f64 - before as f64) / joined as f64),
        _ => None,
    };
    let deliveries = received + other_while_sending.frames;
    let server_us_per_frame = cpu_server.map(|cpu| cpu * 1e6 / deliveries.max(1) as f64);

    println!();
    println!("live fan-out: {joined} viewers, {senders} senders, {sent} messages in {send_seconds:.1} s");
    println!("{:<48} value", "what");
    let row = |what: &str, value: String| println!("{what:<48} {value}");
    row("viewers joined (of requested)", format!("{joined} of {}", args.viewers));
    row("join time, all viewers", format!("{join_seconds:.2} s"));
    row("messages sent / acked ok / refused", format!("{sent} / {acked_ok} / {acked_err}"));
    row(
        "ack round trip p50 / p99 (ms)",
        format!("{:.2} / {:.2}", percentile(&ack_us, 50.0), percentile(&ack_us, 99.0)),
    );
    row("deliveries expected / received", format!("{expected} / {received}"));
    row("deliveries lost / duplicated / unknown", format!("{lost} / {duplicates} / {unknown}"));
    row("delivery latency p50 / p99 / max (ms)", format!("{p50:.2} / {p99:.2} / {max:.2}"));
    row(
        "delivery p99 in 1st / 2nd / 3rd third (ms)",
        format!("{:.2} / {:.2} / {:.2}", thirds_p99[0], thirds_p99[1], thirds_p99[2]),
    );
    row(
        "last viewer has a message p50 / max (ms)",
        format!("{:.2} / {:.2}", percentile(&last_viewer_us, 50.0), percentile(&last_viewer_us, 100.0)),
    );
    if sizes.count > 0 {
        row("msg frame bytes min / max", format!("{} / {}", sizes.frame_min, sizes.frame_max));
        row("msg HTML bytes min / max", format!("{} / {}", sizes.html_min, sizes.html_max));
        row("msg frame - HTML bytes min / max", format!("{} / {}", sizes.overhead_min, sizes.overhead_max));
    }
    row("catch-up frames before joined (bytes)", format!("{} ({})", catch_up.frames, catch_up.bytes));
    for (kind, tally) in &other {
        row(&format!("other frames: {kind} (bytes)"), format!("{} ({})", tally.frames, tally.bytes));
    }
    row(
        "other frames while sending (bytes)",
        format!("{} ({})", other_while_sending.frames, other_while_sending.bytes),
    );
    let kib = |v: Option<u64>| v.map_or("n/a".to_owned(), |v| format!("{v} KiB"));
    row("server RSS before viewers", kib(rss_before));
    row("server RSS, viewers joined and idle", kib(rss_idle));
    row("server RSS after sending", kib(rss_end));
    row("server RSS per idle view", kib_per_view.map_or("n/a".to_owned(), |k| format!("{k:.1} KiB")));
    row(
        "server CPU while sending (per delivered frame)",
        match (cpu_server, server_us_per_frame) {
            (Some(cpu), Some(us)) => format!("{cpu:.2} s of {active_seconds:.1} s ({us:.1} µs)"),
            _ => "n/a".to_owned(),
        },
    );
    row("loadgen CPU while sending", cpu_self.map_or("n/a".to_owned(), |cpu| format!("{cpu:.2} s")));
    row(
        "machine busy while sending (cores)",
        match (machine_busy_cores, other_cores) {
            (Some(busy), Some(other)) => format!("{busy:.2} of {cores}, of which other processes {other:.2}"),
            _ => "n/a".to_owned(),
        },
    );
    let pressure = |p: Option<f64>| p.map_or("n/a".to_owned(), |p| format!("{p:.1} %"));
    row(
        "CPU pressure avg10 before / after sending",
        format!("{} / {}", pressure(pressure_before), pressure(pressure_after)),
    );
    for (why, count) in &ended {
        row("connections ended early", format!("{count} × {why}"));
    }
    for signal in &signalled {
        row("signal", signal.clone());
    }
    if args.reconnect {
        row("viewers reconnected / lossless (of joined)", format!("{viewers_hit} / {viewers_lossless} of {joined}"));
        for (why, count) in &reconnect_reasons {
            row("  reconnects after", format!("{count} × {why}"));
        }
        row(
            "time to recover min / p50 / p99 / max (ms)",
            format!(
                "{:.0} / {:.0} / {:.0} / {:.0}",
                recovery_ms(0.0),
                recovery_ms(50.0),
                recovery_ms(99.0),
                recovery_ms(100.0)
            ),
        );
        row("reset frames (resume not exact)", resets.to_string());
        row("sender reconnects / sends repeated with the same id", format!("{sender_reconnects} / {resent}"));
    }
    let mut refusals: BTreeMap<&str, usize> = BTreeMap::new();
    for reason in sender_stats.iter().flat_map(|s| s.refusals.iter()) {
        *refusals.entry(reason.as_str()).or_default() += 1;
    }
    for (reason, count) in &refusals {
        row("sends refused", format!("{count} × {reason}"));
    }

    let reconnect_report = json!({
        "viewers_reconnected": viewers_hit,
        "viewers_lossless": viewers_lossless,
        "reasons": reconnect_reasons,
        "recovery_ms": {"min": recovery_ms(0.0), "p50": recovery_ms(50.0), "p99": recovery_ms(99.0), "max": recovery_ms(100.0)},
        "resets": resets,
        "sender_reconnects": sender_reconnects,
        "resent_same_id": resent,
    });
    let report = json!({"loadgen": {
        "url": args.url,
        "room": &*room,
        "viewers_requested": args.viewers,
        "viewers_joined": joined,
        "join_errors": join_errors,
        "join_seconds": join_seconds,
        "senders": senders,
        "rate_per_second": args.rate,
        "send_seconds": send_seconds,
        "content_bytes": args.content_bytes,
        "messages_sent": sent,
        "acked_ok": acked_ok,
        "acked_refused": acked_err,
        "ack_ms": {"p50": percentile(&ack_us, 50.0), "p99": percentile(&ack_us, 99.0)},
        "deliveries_expected": expected,
        "deliveries_received": received,
        "lost": lost,
        "duplicates": duplicates,
        "unknown_msg_frames": unknown,
        "latency_ms": {"p50": p50, "p99": p99, "max": max},
        "latency_p99_ms_by_third": thirds_p99,
        "last_viewer_ms": {"p50": percentile(&last_viewer_us, 50.0), "max": percentile(&last_viewer_us, 100.0)},
        "msg_frame_bytes": {"min": sizes.frame_min.min(sizes.frame_max), "max": sizes.frame_max},
        "msg_html_bytes": {"min": sizes.html_min.min(sizes.html_max), "max": sizes.html_max},
        "msg_overhead_bytes": {"min": sizes.overhead_min.min(sizes.overhead_max), "max": sizes.overhead_max},
        "catch_up": {"frames": catch_up.frames, "bytes": catch_up.bytes},
        "other_frames": other.iter().map(|(k, t)| (k.clone(), json!({"frames": t.frames, "bytes": t.bytes})))
            .collect::<serde_json::Map<_, _>>(),
        "other_frames_while_sending": {"frames": other_while_sending.frames, "bytes": other_while_sending.bytes},
        "server_rss_kib": {"before": rss_before, "idle": rss_idle, "end": rss_end},
        "server_kib_per_idle_view": kib_per_view,
        "server_cpu_seconds_while_sending": cpu_server,
        "server_cpu_us_per_delivered_frame": server_us_per_frame,
        "loadgen_cpu_seconds_while_sending": cpu_self,
        "active_seconds": active_seconds,
        "cores": cores,
        "machine_busy_cores_while_sending": machine_busy_cores,
        "other_processes_cores_while_sending": other_cores,
        "cpu_pressure_avg10": {"before": pressure_before, "after": pressure_after},
        "ended_early": ended,
        "refusals": refusals,
        "signals": signalled,
        "reconnect": reconnect_report,
    }});
    println!("{report}");
    if args.check {
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
    }
    Ok(())
}

/// A text frame (`Ok(Some)`), a frame to skip (`Ok(None)`), or why the socket ended (`Err`).
fn text_frame(
    frame: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
) -> Result<Option<Utf8Bytes>, String> {
    match frame {
        Some(Ok(Message::Text(text))) => Ok(Some(text)),
        Some(Ok(Message::Close(close))) => Err(match close {
            Some(close) => format!("closed by server: {} {}", u16::from(close.code), close.reason),
            None => "closed by server without a code".to_owned(),
        }),
        Some(Ok(_)) => Ok(None),
        Some(Err(error)) => Err(format!("socket failed: {error}")),
        None => Err("socket ended".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
