//! A viewer: an idle reader of the room that times each message it receives.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{oneshot, watch};
use tokio_tungstenite::tungstenite::Message;

use crate::args::Args;
use crate::stats::{Shared, ViewerStats};
use crate::ws::{connect, frame_kind, join_frame, position_in, text_frame, Ws};
use crate::{CONNECT_TIMEOUT, NOT_RECEIVED, PING_EVERY};

/// Connects, joins after `stats.last_pos` and reads the catch-up until `joined`. Messages of
/// ours in the catch-up (a resume after a reconnect) count as deliveries.
pub(crate) async fn connect_and_join(
    url: &str,
    name: &str,
    room: &str,
    shared: &Shared,
    stats: &mut ViewerStats,
) -> Result<Ws> {
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

/// Reconnects (with `--reconnect`) until joined or the run stops: 100 ms apart, doubling to 1 s,
/// as the page's schedule (without its jitter). None when stopped or out of time.
pub(crate) async fn rejoin(
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

/// One idle viewer: joins, tells `joined` how that went, then counts every frame it gets
/// until the run stops; with `--reconnect`, rejoins after the last position it has.
pub(crate) async fn viewer(
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
                        count_frame(&mut stats, &shared, now, text.as_str());
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

/// Counts a text frame a viewer received at `now`: one of the run's messages (or an unknown
/// one), or another kind.
fn count_frame(stats: &mut ViewerStats, shared: &Shared, now: Instant, text: &str) {
    let (head, html) = text.split_once('\n').unwrap_or((text, ""));
    let kind = frame_kind(head);
    if kind == "msg" {
        if !stats.message(shared, now, text.len(), head, html) {
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
}

/// An end reason without the details that differ per connection.
pub(crate) fn simplify(why: &str) -> String {
    why.chars().take(80).collect()
}
