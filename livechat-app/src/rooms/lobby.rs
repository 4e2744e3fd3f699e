//! The lobby's rooms: a bounded set ordered by recency of activity, so its refresh costs the
//! same whatever the number of rooms ever created.

use std::collections::{BTreeSet, HashMap};

use crate::domain::ChatId;

/// A line of the lobby's room list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomSummary {
    /// The room.
    pub id: ChatId,
    /// Messages posted in it.
    pub messages: u64,
    /// People in it now.
    pub viewers: usize,
}

/// The lobby's rooms: a bounded set ordered by recency of activity.
#[derive(Debug, Default)]
pub(super) struct Lobby {
    pub(super) messages: HashMap<ChatId, (u64, u64)>,
    pub(super) order: BTreeSet<(u64, ChatId)>,
    next_activity: u64,
}

impl Lobby {
    pub(super) fn touch(&mut self, id: &ChatId, messages: Option<u64>, capacity: usize) {
        self.next_activity += 1;
        let activity = self.next_activity;
        let previous = self.messages.insert(id.clone(), (messages.unwrap_or(0), activity));
        if let Some((count, old)) = previous {
            self.order.remove(&(old, id.clone()));
            if messages.is_none() {
                self.messages.insert(id.clone(), (count, activity));
            }
        }
        self.order.insert((activity, id.clone()));
        while self.order.len() > capacity.max(1) {
            let Some(oldest) = self.order.pop_first() else { break };
            self.messages.remove(&oldest.1);
        }
    }
}
