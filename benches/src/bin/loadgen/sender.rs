//! A sender: posts its share of the messages and records their send times.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;

use crate::args::Args;
use crate::stats::{SenderStats, Shared, ViewerStats};
use crate::viewer::{connect_and_join, rejoin};
use crate::ws::{frame_kind, text_frame, Ws};
use crate::{MARKER, PING_EVERY};

/// One sender connection: sends what it is given, reads acknowledgements; with `--reconnect`,
/// reconnects when the socket ends and sends again, with the same ids, what is unanswered.
pub(crate) async fn sender(
    name: String,
    args: Arc<Args>,
    room: Arc<str>,
    shared: Arc<Shared>,
    mut work: mpsc::UnboundedReceiver<usize>,
    mut stop: watch::Receiver<bool>,
) -> SenderStats {
    let url = args.sender_url.clone().unwrap_or_else(|| args.url.clone());
    let mut ignored = ViewerStats::default();
    let ws = match connect_and_join(&url, &name, &room, &shared, &mut ignored).await {
        Ok(ws) => ws,
        Err(error) => return SenderStats { ended: Some(format!("{error:#}")), ..SenderStats::default() },
    };
    let mut link =
        Link { ws, pending: BTreeMap::new(), stats: SenderStats::default(), shared, content_bytes: args.content_bytes };
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
    let mut open = true;
    loop {
        let ended: Option<String> = tokio::select! {
            seq = work.recv(), if open => {
                let Some(seq) = seq else {
                    open = false;
                    continue;
                };
                link.send(seq).await
            }
            frame = link.ws.next() => link.read(frame).await,
            _ = ping.tick() => link.ping().await,
            _ = stop.changed() => break,
        };
        let Some(why) = ended else { continue };
        if !args.reconnect {
            link.stats.ended = Some(why);
            break;
        }
        let Some(again) = rejoin(&url, &name, &room, &link.shared, &mut ignored, &mut stop).await else {
            if !*stop.borrow() {
                link.stats.ended = Some(format!("{why}; could not reconnect"));
            }
            break;
        };
        if let Err(error) = link.resume(again).await {
            link.stats.ended = Some(format!("resend failed: {error}"));
            break;
        }
    }
    link.stats
}

/// A sender's connection, what it sent that is not answered yet, and what it counted.
struct Link {
    ws: Ws,
    /// Sent and not answered yet: the frame to send again, with its id.
    pending: BTreeMap<usize, String>,
    stats: SenderStats,
    shared: Arc<Shared>,
    content_bytes: usize,
}

impl Link {
    /// Sends message `seq`, recording its send time; why the socket failed, if it did.
    async fn send(&mut self, seq: usize) -> Option<String> {
        let shared = &self.shared;
        let content = message_content(seq, self.content_bytes);
        let frame = json!({"t": "send", "ref": seq, "id": uuid::Uuid::new_v4(), "message": content}).to_string();
        self.pending.insert(seq, frame.clone());
        shared.sent_at[seq].store(shared.nanos(Instant::now()) + 1, Ordering::Release);
        self.ws.send(Message::Text(frame.into())).await.err().map(|error| format!("send failed: {error}"))
    }

    /// Pings the server; why the socket failed, if it did.
    async fn ping(&mut self) -> Option<String> {
        self.ws.send(Message::Text("{\"t\":\"ping\"}".into())).await.err().map(|error| format!("ping failed: {error}"))
    }

    /// Reads one frame: counts acknowledgements and errors; why the socket ended, if it did.
    async fn read(&mut self, frame: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>) -> Option<String> {
        let now = Instant::now();
        match text_frame(frame) {
            Ok(Some(text)) => {
                let text = text.as_str();
                let head = text.split_once('\n').map_or(text, |(head, _)| head);
                match frame_kind(head) {
                    "ack" => self.acknowledged(head, now).await,
                    "error" => self.stats.refusals.push(head.to_owned()),
                    _ => {}
                }
                None
            }
            Ok(None) => None,
            Err(ended) => Some(ended),
        }
    }

    /// Records an `ack` frame received at `now`: stored, refused, or unknown (then sent again
    /// with the same id, as the page does), and its round trip.
    async fn acknowledged(&mut self, head: &str, now: Instant) {
        let shared = Arc::clone(&self.shared);
        let ack: Value = serde_json::from_str(head).unwrap_or(Value::Null);
        let seq = ack["ref"].as_u64().and_then(|r| usize::try_from(r).ok());
        let status = ack["status"].as_str().unwrap_or("");
        if ack["ok"] == Value::Bool(true) {
            if let Some(seq) = seq {
                self.pending.remove(&seq);
                if shared.ok.get(seq).is_some_and(|ok| !ok.swap(true, Ordering::Relaxed)) {
                    shared.acked_ok.fetch_add(1, Ordering::Relaxed);
                }
            }
        } else if status == "unknown" {
            // Not known to be stored: the same id again, as the page does.
            if let Some(frame) = seq.and_then(|seq| self.pending.get(&seq)) {
                tokio::time::sleep(Duration::from_millis(200)).await;
                self.stats.resent += 1;
                let _ = self.ws.send(Message::Text(frame.clone().into())).await;
            }
        } else {
            if let Some(seq) = seq {
                self.pending.remove(&seq);
            }
            shared.acked_err.fetch_add(1, Ordering::Relaxed);
            self.stats.refusals.push(ack["error"].as_str().unwrap_or("?").to_owned());
        }
        if let Some(sent) = seq.and_then(|seq| shared.sent_at.get(seq)) {
            let sent = sent.load(Ordering::Acquire);
            let us = shared.nanos(now).saturating_sub(sent.saturating_sub(1)) / 1_000;
            self.stats.ack_us.push(u32::try_from(us).unwrap_or(u32::MAX));
        }
    }

    /// Goes on over a new connection: sends again, with the same ids, what is unanswered.
    async fn resume(&mut self, ws: Ws) -> Result<(), tokio_tungstenite::tungstenite::Error> {
        self.ws = ws;
        self.stats.reconnects += 1;
        for frame in self.pending.values() {
            self.stats.resent += 1;
            self.ws.send(Message::Text(frame.clone().into())).await?;
        }
        Ok(())
    }
}

/// `lgseq00000042 ` then filler, exactly `bytes` bytes, not ending in a space.
pub(crate) fn message_content(seq: usize, bytes: usize) -> String {
    const FILLER: &str = "the quick brown fox jumps over the lazy dog ";
    let mut content = format!("{MARKER}{seq:08} ");
    while content.len() < bytes {
        content.push_str(FILLER);
    }
    content.truncate(bytes - 1);
    content.push('.');
    content
}
