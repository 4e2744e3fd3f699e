//! Who is in a room and who is typing: in memory, never events in the store (other nodes'
//! people come from `rooms::cluster`, fed by [`crate::cluster`]).
//!
//! Presence counts views per name (one person may have several tabs open). Typing is a
//! signal a sender's composer sends while they type: at most one per second per sender is
//! taken, each keeps the name "typing" for [`TYPING_TTL`], and sending a message ends it.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// Names shown in a room's presence list; the count shows everyone.
pub const PRESENCE_SHOWN: usize = 50;
/// How long one typing signal keeps a name "typing".
pub const TYPING_TTL: Duration = Duration::from_secs(5);
/// Shortest interval between two typing signals taken from one sender.
pub const TYPING_THROTTLE: Duration = Duration::from_secs(1);
/// Most names shown as typing at once.
pub const TYPING_SHOWN: usize = 10;

/// Views per name, sorted by name.
#[derive(Debug, Default)]
pub struct Here {
    views: BTreeMap<String, usize>,
}

impl Here {
    /// One more view of `name`.
    pub fn enter(&mut self, name: &str) {
        *self.views.entry(name.to_owned()).or_default() += 1;
    }

    /// One view of `name` fewer.
    pub fn leave(&mut self, name: &str) {
        if let Some(count) = self.views.get_mut(name) {
            *count -= 1;
            if *count == 0 {
                self.views.remove(name);
            }
        }
    }

    /// How many distinct people.
    pub fn count(&self) -> usize {
        self.views.len()
    }

    /// Whether `name` is here.
    pub fn contains(&self, name: &str) -> bool {
        self.views.contains_key(name)
    }

    /// The first names, sorted.
    pub fn first(&self, limit: usize) -> Vec<&str> {
        self.views.keys().take(limit).map(String::as_str).collect()
    }

    /// Every name here (for mentions).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.views.keys().map(String::as_str)
    }
}

#[derive(Debug, Clone, Copy)]
struct Typist {
    until: Instant,
    signalled: Instant,
}

/// Who is typing now.
#[derive(Debug, Default)]
pub struct Typing {
    typists: HashMap<String, Typist>,
}

impl Typing {
    /// Takes a signal from `name` at `now`; returns whether the set of names changed. A signal
    /// within [`TYPING_THROTTLE`] of the last one taken from the same name is ignored.
    pub fn signal(&mut self, name: &str, now: Instant) -> SignalOutcome {
        match self.typists.get_mut(name) {
            Some(typist) if now.duration_since(typist.signalled) < TYPING_THROTTLE => SignalOutcome::Throttled,
            Some(typist) => {
                *typist = Typist { until: now + TYPING_TTL, signalled: now };
                SignalOutcome::Extended
            }
            None => {
                self.typists.insert(name.to_owned(), Typist { until: now + TYPING_TTL, signalled: now });
                SignalOutcome::Started
            }
        }
    }

    /// A signal from `name` taken on another node (which throttled it) at `now`; returns
    /// whether the name started typing.
    pub fn signal_remote(&mut self, name: &str, now: Instant) -> bool {
        let until = now + TYPING_TTL;
        match self.typists.get_mut(name) {
            Some(typist) => {
                typist.until = typist.until.max(until);
                false
            }
            None => {
                self.typists.insert(name.to_owned(), Typist { until, signalled: now });
                true
            }
        }
    }

    /// `name` stopped (sent their message); returns whether they were typing.
    pub fn stop(&mut self, name: &str) -> bool {
        self.typists.remove(name).is_some()
    }

    /// Forgets signals that expired by `now`; returns whether any did.
    pub fn expire(&mut self, now: Instant) -> bool {
        let before = self.typists.len();
        self.typists.retain(|_, typist| typist.until > now);
        self.typists.len() != before
    }

    /// Whether nobody is typing.
    pub fn is_empty(&self) -> bool {
        self.typists.is_empty()
    }

    /// The names typing, sorted, at most [`TYPING_SHOWN`].
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.typists.keys().cloned().collect();
        names.sort();
        names.truncate(TYPING_SHOWN);
        names
    }
}

/// What one typing signal did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalOutcome {
    /// The name started typing: readers are told.
    Started,
    /// The name was typing; its signal now lasts longer.
    Extended,
    /// Too soon after the last signal taken from this name; ignored.
    Throttled,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typing_is_throttled_expires_and_ends_on_send() {
        let start = Instant::now();
        let mut typing = Typing::default();
        assert_eq!(typing.signal("alice", start), SignalOutcome::Started);
        assert_eq!(typing.signal("alice", start + Duration::from_millis(500)), SignalOutcome::Throttled);
        assert_eq!(typing.signal("alice", start + Duration::from_millis(1000)), SignalOutcome::Extended);
        assert_eq!(typing.names(), ["alice"]);
        assert!(!typing.expire(start + Duration::from_millis(5_500)), "extended at 1 s: lasts until 6 s");
        assert!(typing.expire(start + Duration::from_millis(6_000)));
        assert!(typing.is_empty());
        typing.signal("bob", start);
        assert!(typing.stop("bob"));
        assert!(!typing.stop("bob"));
    }

    #[test]
    fn presence_counts_views_per_name() {
        let mut here = Here::default();
        here.enter("bob");
        here.enter("bob");
        here.enter("carol");
        assert_eq!(here.count(), 2);
        here.leave("bob");
        assert!(here.contains("bob"), "bob still has a view open");
        here.leave("bob");
        assert!(!here.contains("bob"));
        assert_eq!(here.first(10), ["carol"]);
    }
}
