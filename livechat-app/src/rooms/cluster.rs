//! Presence and typing of the other nodes: what this process hears from them (through
//! [`crate::cluster`]) merged into each room's lists, and what it has to tell them.
//!
//! Each node announces, per room, the names of the people it has there (at most
//! [`ANNOUNCED_NAMES`]) and how many in all: at once on a change and again every heartbeat. A
//! node not heard from for [`NODE_TIMEOUT`] (it died, or lost its database connection) is
//! dropped from every list; a node that stops gracefully says so and is dropped at once.
//! Typing from another node is taken like a local signal (without the throttle, which its
//! own node applied) and expires the same way.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::{ChatReadModel, Present};
use crate::domain::ChatId;

/// Names a node announces per room at most; beyond them it announces only the count.
pub const ANNOUNCED_NAMES: usize = 100;
/// A node not heard from for this long is taken for dead and its people leave every list.
pub const NODE_TIMEOUT: Duration = Duration::from_secs(6);

/// One other node's people in one room, as last heard.
#[derive(Debug, Clone)]
struct Announced {
    names: Vec<String>,
    count: usize,
}

/// What this process knows of the other nodes, and what it has yet to tell them.
#[derive(Debug, Default)]
pub(super) struct Cluster {
    /// Per room, per node: its people.
    rooms: Mutex<HashMap<ChatId, HashMap<String, Announced>>>,
    /// When each node was last heard from.
    nodes: Mutex<HashMap<String, Instant>>,
    /// Rooms whose local presence changed since it was last announced.
    dirty: Mutex<HashSet<ChatId>>,
    /// Typing signals taken here, not announced yet.
    typing: Mutex<Vec<(ChatId, String)>>,
    /// Wakes the announcer.
    pub(super) wake: Notify,
}

/// The people of other nodes in one room: names (sorted, each once) and those beyond the
/// names each node announced.
#[derive(Debug, Default, Clone)]
pub(super) struct Others {
    pub(super) names: BTreeSet<String>,
    pub(super) unnamed: usize,
}

impl Cluster {
    pub(super) fn others(&self, room: &ChatId) -> Others {
        let rooms = self.rooms.lock().unwrap_or_else(|p| p.into_inner());
        let mut others = Others::default();
        for announced in rooms.get(room).into_iter().flat_map(HashMap::values) {
            others.names.extend(announced.names.iter().cloned());
            others.unnamed += announced.count.saturating_sub(announced.names.len());
        }
        others
    }
}

/// The local presence of one room, to announce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalPresence {
    /// The room.
    pub room: ChatId,
    /// The first [`ANNOUNCED_NAMES`] names, sorted.
    pub names: Vec<String>,
    /// How many people in all.
    pub count: usize,
}

impl<P: Present> ChatReadModel<P> {
    /// Starts keeping what other nodes need to hear (call once, when joining a cluster; until
    /// then nothing is collected).
    pub fn announce_to_cluster(&self) {
        self.inner.clustered.store(true, Ordering::Relaxed);
    }

    /// Waits until there is something new to announce.
    pub async fn cluster_news(&self) {
        self.inner.cluster.wake.notified().await;
    }

    /// The local presence of the rooms that changed since the last call (`all`: of every room
    /// with someone here, for a heartbeat; a room everyone left is announced once, empty).
    pub fn local_presence(&self, all: bool) -> Vec<LocalPresence> {
        let dirty: HashSet<ChatId> =
            std::mem::take(&mut *self.inner.cluster.dirty.lock().unwrap_or_else(|p| p.into_inner()));
        let rooms = self.inner.rooms.read().unwrap_or_else(|p| p.into_inner());
        let mut announced = Vec::new();
        for (id, room) in rooms.iter() {
            let inner = room.lock();
            if inner.here.count() == 0 && !dirty.contains(id) || !all && !dirty.contains(id) {
                continue;
            }
            let names = inner.here.first(ANNOUNCED_NAMES).into_iter().map(str::to_owned).collect();
            announced.push(LocalPresence { room: id.clone(), names, count: inner.here.count() });
        }
        // A room evicted since it changed had nobody left.
        for id in dirty.into_iter().filter(|id| !rooms.contains_key(id)) {
            announced.push(LocalPresence { room: id, names: Vec::new(), count: 0 });
        }
        announced
    }

    /// The typing signals taken here since the last call.
    pub fn local_typing(&self) -> Vec<(ChatId, String)> {
        std::mem::take(&mut *self.inner.cluster.typing.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub(super) fn presence_changed(&self, room: &ChatId) {
        if self.inner.clustered.load(Ordering::Relaxed) {
            self.inner.cluster.dirty.lock().unwrap_or_else(|p| p.into_inner()).insert(room.clone());
            self.inner.cluster.wake.notify_one();
        }
    }

    /// A typing signal from `name` in `room` was taken here (not throttled): the other nodes
    /// hear of it.
    pub fn typing_taken(&self, room: &ChatId, name: &str) {
        if self.inner.clustered.load(Ordering::Relaxed) {
            let mut typing = self.inner.cluster.typing.lock().unwrap_or_else(|p| p.into_inner());
            if typing.len() < 10_000 {
                typing.push((room.clone(), name.to_owned()));
            }
            drop(typing);
            self.inner.cluster.wake.notify_one();
        }
    }

    /// Node `node` was heard from now.
    pub fn node_alive(&self, node: &str) {
        self.inner.cluster.nodes.lock().unwrap_or_else(|p| p.into_inner()).insert(node.to_owned(), Instant::now());
    }

    /// Node `node` has `count` people in `room`, the first of them `names`.
    pub fn remote_presence(&self, node: &str, room: &ChatId, mut names: Vec<String>, count: usize) {
        names.truncate(ANNOUNCED_NAMES);
        self.node_alive(node);
        {
            let mut rooms = self.inner.cluster.rooms.lock().unwrap_or_else(|p| p.into_inner());
            if count == 0 {
                if let Some(nodes) = rooms.get_mut(room) {
                    nodes.remove(node);
                    if nodes.is_empty() {
                        rooms.remove(room);
                    }
                }
            } else {
                rooms.entry(room.clone()).or_default().insert(node.to_owned(), Announced { names, count });
            }
        }
        if count > 0 {
            self.lobby_list(room);
        }
        self.republish(room);
        // The lobby counts every node's people, resident room or not.
        self.touch();
    }

    /// `name` is typing in `room` on another node.
    pub fn remote_typing(&self, room: &ChatId, name: &str) {
        if let Some(room) = self.resident(room) {
            room.signal_remote_typing(&self.inner.present, name);
        }
    }

    /// Drops node `node` (it said it stopped), or every node not heard from for
    /// [`NODE_TIMEOUT`] (`None`), from every room's list.
    pub fn forget_nodes(&self, node: Option<&str>) {
        let gone: Vec<String> = {
            let mut nodes = self.inner.cluster.nodes.lock().unwrap_or_else(|p| p.into_inner());
            let gone: Vec<String> = match node {
                Some(node) => vec![node.to_owned()],
                None => {
                    nodes.iter().filter(|(_, seen)| seen.elapsed() > NODE_TIMEOUT).map(|(n, _)| n.clone()).collect()
                }
            };
            for node in &gone {
                nodes.remove(node);
            }
            gone
        };
        if gone.is_empty() {
            return;
        }
        let touched: Vec<ChatId> = {
            let mut rooms = self.inner.cluster.rooms.lock().unwrap_or_else(|p| p.into_inner());
            let mut touched = Vec::new();
            rooms.retain(|room, nodes| {
                let before = nodes.len();
                nodes.retain(|node, _| !gone.contains(node));
                if nodes.len() != before {
                    touched.push(room.clone());
                }
                !nodes.is_empty()
            });
            touched
        };
        for room in &touched {
            self.republish(room);
        }
        if !touched.is_empty() {
            // The lobby counts every node's people, resident room or not.
            self.touch();
        }
    }

    /// Shows a resident room's presence again, with what is now known of the other nodes.
    fn republish(&self, id: &ChatId) {
        if let Some(room) = self.resident(id) {
            let others = self.inner.cluster.others(id);
            let inner = room.lock();
            room.publish_presence(&self.inner.present, &inner, &others);
            drop(inner);
            self.touch();
        }
    }

    pub(super) fn others(&self, room: &ChatId) -> Others {
        self.inner.cluster.others(room)
    }
}
