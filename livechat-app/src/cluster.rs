//! One chat across nodes: presence and typing travel between the processes that share a
//! PostgreSQL database, over its `LISTEN/NOTIFY` (no other server). Nothing of it is stored.
//!
//! Each node sends on the channel [`CHANNEL`] small JSON packets (under PostgreSQL's 8 000-byte
//! payload limit, split when larger):
//! - `{"n":node,"p":[[room,[names…],count],…],"t":[[room,name],…]}`: its people in the rooms
//!   whose presence changed (at most 50 ms after the change), every room it has people in
//!   (every [`HEARTBEAT`], also when it has none: the packet then says only that it is alive),
//!   and the typing signals it took;
//! - `{"n":node,"bye":true}`: it is stopping; the others drop its people at once.
//!
//! A node that dies without a word is dropped after [`NODE_TIMEOUT`] without a packet (checked
//! every second): everyone sees its people leave within 7 s. Packets from a node are applied in
//! the order PostgreSQL delivers them, which is the order they were sent; what a node missed
//! while its listening connection was down comes back with the next heartbeat. A packet that
//! does not parse, or names an invalid room or name, is ignored.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::domain::{validate_sender, ChatId};
use crate::live::present::Model;
use crate::rooms::{LocalPresence, NODE_TIMEOUT};

/// The `LISTEN/NOTIFY` channel of presence and typing.
pub const CHANNEL: &str = "livechat_cluster";
/// How often a node announces all its rooms' presence (and that it is alive).
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// How long changes are gathered before they are sent.
const GATHER: Duration = Duration::from_millis(50);
/// Largest packet sent, in bytes (PostgreSQL refuses payloads of 8 000 bytes and more).
const MAX_PACKET: usize = 7_000;

/// One packet on [`CHANNEL`].
#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
struct Packet {
    /// The sending node.
    n: String,
    /// Presence: room, first names, count.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    p: Vec<(String, Vec<String>, usize)>,
    /// Typing: room, name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    t: Vec<(String, String)>,
    /// The node is stopping.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    bye: bool,
}

/// Splits what a node has to say into packets of at most [`MAX_PACKET`] bytes of JSON (one
/// packet, saying only that the node is alive, when there is nothing else).
fn packets(node: &str, presence: Vec<LocalPresence>, typing: Vec<(ChatId, String)>) -> Vec<String> {
    let empty = || Packet { n: node.to_owned(), ..Packet::default() };
    let base = node.len() + 16;
    let has_news = |packet: &Packet| !(packet.p.is_empty() && packet.t.is_empty());
    let json = |packet: &Packet| serde_json::to_string(packet).unwrap_or_default();
    let (mut out, mut packet, mut size) = (Vec::new(), empty(), base);
    let entries = presence
        .into_iter()
        .map(|entry| (Some((entry.room.as_str().to_owned(), entry.names, entry.count)), None))
        .chain(typing.into_iter().map(|(room, name)| (None, Some((room.as_str().to_owned(), name)))));
    for (present, typist) in entries {
        let entry_size = match (&present, &typist) {
            (Some(entry), _) => serde_json::to_string(entry).map_or(MAX_PACKET, |json| json.len() + 8),
            (_, Some((room, name))) => room.len() + name.len() + 16,
            _ => 0,
        };
        if size + entry_size > MAX_PACKET && has_news(&packet) {
            out.push(json(&packet));
            (packet, size) = (empty(), base);
        }
        size += entry_size;
        packet.p.extend(present);
        packet.t.extend(typist);
    }
    if out.is_empty() || has_news(&packet) {
        out.push(json(&packet));
    }
    out
}

/// Applies a packet heard from another node to the model; ignores this node's own and
/// anything malformed.
fn apply(model: &Model, node: &str, payload: &str) {
    let packet: Packet = match serde_json::from_str(payload) {
        Ok(packet) => packet,
        Err(error) => {
            tracing::debug!(%error, "ignoring a cluster packet that does not parse");
            return;
        }
    };
    if packet.n == node || packet.n.is_empty() {
        return;
    }
    if packet.bye {
        model.forget_nodes(Some(&packet.n));
        return;
    }
    model.node_alive(&packet.n);
    for (room, names, count) in packet.p {
        let Ok(room) = ChatId::parse(&room) else { continue };
        let names: Vec<String> =
            names.into_iter().filter(|name| validate_sender(name).is_ok_and(|n| n == name)).collect();
        model.remote_presence(&packet.n, &room, names, count);
    }
    for (room, name) in packet.t {
        if let (Ok(room), Ok(_)) = (ChatId::parse(&room), validate_sender(&name)) {
            model.remote_typing(&room, &name);
        }
    }
}

/// Starts this node's part of the cluster on `pool`'s database: the announcer (which says
/// goodbye when `shutdown` turns true) and the listener.
pub fn spawn(pool: PgPool, node: String, model: Model, shutdown: watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
    model.announce_to_cluster();
    let announcer = tokio::spawn(announce(pool.clone(), node.clone(), model.clone(), shutdown));
    let listener = tokio::spawn(listen(pool, node, model));
    vec![announcer, listener]
}

async fn notify(pool: &PgPool, packets: Vec<String>) {
    for packet in packets {
        let sent = sqlx::query("SELECT pg_notify($1, $2)").bind(CHANNEL).bind(&packet).execute(pool).await;
        if let Err(error) = sent {
            tracing::debug!(%error, "could not send a cluster packet (the next heartbeat repeats the presence)");
        }
    }
}

async fn announce(pool: PgPool, node: String, model: Model, mut shutdown: watch::Receiver<bool>) {
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let all = tokio::select! {
            _ = heartbeat.tick() => true,
            () = model.cluster_news() => {
                tokio::time::sleep(GATHER).await;
                false
            }
            () = async { drop(shutdown.wait_for(|stopping| *stopping).await) } => {
                let bye = Packet { n: node.clone(), bye: true, ..Packet::default() };
                if let Ok(bye) = serde_json::to_string(&bye) {
                    notify(&pool, vec![bye]).await;
                }
                return;
            }
        };
        let (presence, typing) = (model.local_presence(all), model.local_typing());
        if all || !presence.is_empty() || !typing.is_empty() {
            notify(&pool, packets(&node, presence, typing)).await;
        }
    }
}

async fn listen(pool: PgPool, node: String, model: Model) {
    let mut expiry = tokio::time::interval(Duration::from_secs(1));
    loop {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(listener) => listener,
            Err(error) => {
                tracing::warn!(%error, "cluster: cannot connect to listen; retrying");
                model.forget_nodes(None);
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if let Err(error) = listener.listen(CHANNEL).await {
            tracing::warn!(%error, "cluster: LISTEN failed; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        loop {
            tokio::select! {
                received = listener.try_recv() => match received {
                    Ok(Some(notification)) => apply(&model, &node, notification.payload()),
                    // The connection was lost; try_recv reconnects on the next call.
                    Ok(None) => tracing::debug!("cluster: listening connection lost; reconnecting"),
                    Err(error) => {
                        tracing::warn!(%error, "cluster: listening failed; reconnecting");
                        break;
                    }
                },
                _ = expiry.tick() => model.forget_nodes(None),
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// How long after a node dies its people are gone from every list, at most.
pub const DEAD_NODE_BOUND: Duration = Duration::from_secs(NODE_TIMEOUT.as_secs() + 1);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_stay_under_the_payload_limit_and_keep_everything() {
        let room = ChatId::parse("big-room").expect("room");
        let presence: Vec<LocalPresence> = (0..300)
            .map(|i| LocalPresence {
                room: ChatId::parse(&format!("room-{i}")).expect("room"),
                names: (0..20).map(|n| format!("person-{n}-with-a-long-name")).collect(),
                count: 25,
            })
            .collect();
        let typing: Vec<(ChatId, String)> = (0..500).map(|i| (room.clone(), format!("typist-{i}"))).collect();
        let sent = packets("node-1", presence.clone(), typing.clone());
        assert!(sent.len() > 1);
        let mut rooms = 0;
        let mut typists = 0;
        for json in &sent {
            assert!(json.len() < 8_000, "{} bytes", json.len());
            let packet: Packet = serde_json::from_str(json).expect("parses");
            assert_eq!(packet.n, "node-1");
            rooms += packet.p.len();
            typists += packet.t.len();
        }
        assert_eq!((rooms, typists), (presence.len(), typing.len()));
        let alive = packets("node-1", Vec::new(), Vec::new());
        assert_eq!(alive, [r#"{"n":"node-1"}"#]);
    }
}
