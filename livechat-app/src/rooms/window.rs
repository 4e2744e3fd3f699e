//! A room's recent window: the latest messages of a resident room, bounded by count and by
//! bytes, covering a contiguous range of its stream's versions, `(base, head]`.
//!
//! Every event of the room in that range has been applied, so for a reader whose last seen
//! position is at or after `base` the window knows every change since: the messages in it,
//! plus `outside`, the current states of older messages that were edited or deleted within
//! the range. Anything older is read from the store (`history`).

use std::collections::VecDeque;
use std::sync::Arc;

use cqrs_core::Position;

use super::message::{Message, MessageData, Revision, Shared};

/// Bounds of a window.
#[derive(Debug, Clone, Copy)]
pub struct WindowLimits {
    /// Most messages kept.
    pub messages: usize,
    /// Most bytes of shown messages kept (at least one message is always kept).
    pub bytes: usize,
}

/// What a reader that was away must be sent.
#[derive(Debug)]
pub enum CatchUp<M> {
    /// Exactly the changes after its position, oldest change first: new messages and the
    /// current states of changed ones.
    Changes(Vec<Shared<M>>),
    /// Too much to replay, or older than the window: the latest page, to replace its list.
    Reset {
        /// The latest messages, oldest first, within the page's count and byte bounds.
        latest: Vec<Shared<M>>,
        /// Whether older messages exist.
        has_more: bool,
    },
}

/// The window of one room.
#[derive(Debug)]
pub struct Window<M> {
    /// The event just before the window (`Revision::default()`: the window starts at the
    /// stream's beginning).
    base: Revision,
    /// The last event applied.
    head: Revision,
    /// Messages in the window, by version.
    messages: VecDeque<Shared<M>>,
    /// Current states of messages before the window changed within it, by revision.
    outside: Vec<Shared<M>>,
    /// Approximate bytes of `messages` and `outside` ([`approximate_bytes`]).
    bytes: usize,
    limits: WindowLimits,
}

impl<M> Window<M> {
    /// An empty window after `base`, whose head is `head` (`head == base` for a window built
    /// from a stream read that found no message yet).
    pub fn new(base: Revision, head: Revision, limits: WindowLimits) -> Self {
        Self { base, head, messages: VecDeque::new(), outside: Vec::new(), bytes: 0, limits }
    }

    /// The last event applied.
    pub fn head(&self) -> Revision {
        self.head
    }

    /// The event just before the window.
    pub fn base(&self) -> Revision {
        self.base
    }

    /// Messages in the window.
    pub fn len(&self) -> usize {
        self.messages.len()
    }

    /// Whether the window holds no message.
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The number of the latest message (0 if none is known).
    pub fn last_number(&self) -> u64 {
        self.messages.back().map_or(0, |m| m.data.number)
    }

    /// The message `version` if the window has it (in range or in `outside`).
    pub fn get(&self, version: u64) -> Option<&Shared<M>> {
        let index = self.messages.binary_search_by_key(&version, |m| m.data.sent.version).ok();
        index
            .and_then(|i| self.messages.get(i))
            .or_else(|| self.outside.iter().find(|m| m.data.sent.version == version))
    }

    /// Moves the head to `at` (an event of the room that changed no message here).
    pub fn advance(&mut self, at: Revision) {
        self.head = self.head.max(at);
    }

    /// Adds or replaces a message's state, moves the head to the state's revision, then trims
    /// the window to its limits.
    pub fn put(&mut self, message: Shared<M>) {
        let version = message.data.sent.version;
        self.head = self.head.max(message.data.revision);
        self.bytes += approximate_bytes(&message.data);
        match self.messages.binary_search_by_key(&version, |m| m.data.sent.version) {
            Ok(index) => {
                let old = std::mem::replace(&mut self.messages[index], message);
                self.bytes -= approximate_bytes(&old.data);
            }
            Err(index) if version > self.base.version => self.messages.insert(index, message),
            Err(_) => {
                if let Some(index) = self.outside.iter().position(|m| m.data.sent.version == version) {
                    let old = self.outside.remove(index);
                    self.bytes -= approximate_bytes(&old.data);
                }
                self.outside.push(message);
            }
        }
        self.trim();
    }

    fn trim(&mut self) {
        while self.messages.len() > self.limits.messages.max(1)
            || (self.bytes > self.limits.bytes && self.messages.len() > 1)
        {
            let Some(oldest) = self.messages.pop_front() else { break };
            self.base = self.base.max(oldest.data.sent);
            if oldest.data.revision > self.base {
                self.outside.push(oldest);
            }
            let base = self.base;
            self.outside.retain(|m| m.data.revision > base);
            self.bytes = self.messages.iter().chain(&self.outside).map(|m| approximate_bytes(&m.data)).sum();
        }
    }

    /// The latest messages, oldest first: at most `limit`, and no more than `max_bytes` of
    /// them as `weight` measures (at least one), and whether older messages exist.
    pub fn latest(
        &self,
        limit: usize,
        max_bytes: usize,
        weight: impl Fn(&Message<M>) -> usize,
    ) -> (Vec<Shared<M>>, bool) {
        let mut taken = Vec::new();
        let mut bytes = 0;
        for message in self.messages.iter().rev() {
            let size = weight(message);
            if taken.len() >= limit || (!taken.is_empty() && bytes + size > max_bytes) {
                break;
            }
            bytes += size;
            taken.push(Arc::clone(message));
        }
        taken.reverse();
        let has_more = taken.len() < self.messages.len() || self.base.version > 0;
        (taken, has_more)
    }

    /// Up to `limit` messages before position `before`, oldest first, if the window holds
    /// the whole page: `None` when the page reaches past the window's start.
    pub fn before(&self, before: Position, limit: usize) -> Option<(Vec<Shared<M>>, bool)> {
        let end = self.messages.partition_point(|m| m.data.sent.position < before);
        let start = end.saturating_sub(limit);
        if end - start < limit && self.base.version > 0 {
            return None;
        }
        let page: Vec<Shared<M>> = self.messages.range(start..end).cloned().collect();
        Some((page, start > 0 || self.base.version > 0))
    }

    /// The version of the last message before position `before`, if the window can tell.
    pub fn version_before(&self, before: Position) -> Option<u64> {
        let end = self.messages.partition_point(|m| m.data.sent.position < before);
        match end {
            0 if self.base.version > 0 => None,
            0 => Some(0),
            _ => Some(self.messages[end - 1].data.sent.version),
        }
    }

    /// What a reader that has seen every change up to `seen` (a predicate on revisions:
    /// `true` = already seen) missed, if the window covers it; `None` if its last position is
    /// before the window. More than `max_replay` changes, or a page too big for `max_bytes`,
    /// make a [`CatchUp::Reset`].
    pub fn catch_up(
        &self,
        covered: bool,
        seen: impl Fn(Revision) -> bool,
        max_replay: usize,
        page: (usize, usize),
        weight: impl Fn(&Message<M>) -> usize + Copy,
    ) -> CatchUp<M> {
        if covered {
            let mut changes: Vec<Shared<M>> =
                self.messages.iter().chain(&self.outside).filter(|m| !seen(m.data.revision)).cloned().collect();
            if changes.len() <= max_replay {
                changes.sort_by_key(|m| m.data.revision);
                return CatchUp::Changes(changes);
            }
        }
        let (latest, has_more) = self.latest(page.0, page.1, weight);
        CatchUp::Reset { latest, has_more }
    }

    /// Whether a reader whose last seen position is `after` is covered by the window.
    pub fn covers_position(&self, after: Position) -> bool {
        after >= self.base.position
    }

    /// Whether a reader whose last seen room version is `after` is covered by the window.
    pub fn covers_version(&self, after: u64) -> bool {
        after >= self.base.version
    }
}

/// A message's approximate size in memory, for trimming.
pub fn approximate_bytes(data: &MessageData) -> usize {
    let text = match &data.body {
        super::message::Body::Text { content, .. } => content.len(),
        super::message::Body::Deleted => 0,
    };
    // The shown form (HTML) is about twice the text, plus markup.
    3 * text + 2 * data.sender.len() + 256
}

#[cfg(test)]
mod tests {
    use cqrs_core::Timestamp;

    use super::super::message::Body;
    use super::*;

    fn message(version: u64, position: u64, text: &str) -> Shared<()> {
        let at = Revision { version, position: Position(position) };
        Arc::new(Message {
            data: MessageData {
                sent: at,
                number: version,
                sender: "a".into(),
                sent_at: Timestamp(0),
                body: Body::Text { content: text.into(), mentions: vec![], edited: false },
                reactions: vec![],
                revision: at,
            },
            shown: (),
        })
    }

    fn versions(messages: &[Shared<()>]) -> Vec<u64> {
        messages.iter().map(|m| m.data.sent.version).collect()
    }

    #[test]
    fn trims_by_count_and_remembers_changes_of_messages_that_left() {
        let limits = WindowLimits { messages: 3, bytes: usize::MAX };
        let mut window = Window::new(Revision::default(), Revision::default(), limits);
        for v in 1..=5 {
            window.put(message(v, v * 10, "x"));
        }
        assert_eq!(window.len(), 3);
        assert_eq!(window.base().version, 2);
        let (latest, more) = window.latest(10, usize::MAX, |_| 1);
        assert_eq!(versions(&latest), [3, 4, 5]);
        assert!(more);
        // An edit of message 1 (before the window) at version 6 is kept as an outside change.
        let mut edited = message(1, 10, "edited");
        Arc::get_mut(&mut edited).expect("unique").data.revision = Revision { version: 6, position: Position(60) };
        window.put(edited);
        match window.catch_up(
            window.covers_position(Position(50)),
            |r| r.position <= Position(50),
            100,
            (10, 100),
            |_| 1,
        ) {
            CatchUp::Changes(changes) => assert_eq!(versions(&changes), [1]),
            other => panic!("{other:?}"),
        }
        assert!(!window.covers_position(Position(10)));
        assert!(
            matches!(window.catch_up(false, |_| true, 100, (2, 100), |_| 1), CatchUp::Reset { ref latest, has_more: true } if latest.len() == 2)
        );
    }

    #[test]
    fn pages_before_a_position_only_when_the_window_holds_them() {
        let limits = WindowLimits { messages: 4, bytes: usize::MAX };
        let mut window = Window::new(Revision::default(), Revision::default(), limits);
        for v in 1..=6 {
            window.put(message(v, v, "x"));
        }
        let (page, more) = window.before(Position(6), 2).expect("in the window");
        assert_eq!(versions(&page), [4, 5]);
        assert!(more);
        assert!(window.before(Position(4), 2).is_none(), "reaches past the window");
        assert_eq!(window.version_before(Position(5)), Some(4));
        assert_eq!(window.version_before(Position(3)), None);
    }

    #[test]
    fn the_latest_page_is_bounded_by_bytes() {
        let limits = WindowLimits { messages: 10, bytes: usize::MAX };
        let mut window = Window::new(Revision::default(), Revision::default(), limits);
        for v in 1..=10 {
            window.put(message(v, v, "x"));
        }
        let (latest, more) = window.latest(10, 250, |_| 100);
        assert_eq!(versions(&latest), [9, 10]);
        assert!(more);
    }
}
