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
use crate::ws::{frame_kind, text_frame};
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
