//! Dynamic Consistency Boundaries (DCB, see dcb.events): [`Tag`]s on events, a [`Query`] over
//! event types and tags, and the [`AppendCondition`] that makes an append fail when an event
//! matching a query was stored after the position a decision read up to.
//!
//! One log serves both models: events appended through stream aggregates carry their tags too
//! (from [`DomainEvent::tags`](crate::DomainEvent::tags)), so a decision's query sees them, and
//! events appended by a decision belong to a stream like any other.
//!
//! ```
//! use cqrs_core::{AppendCondition, Position, Query, QueryItem, Tag};
//!
//! let course = Tag::new("course", "c1");
//! let student = Tag::new("student", "s7");
//! // Everything that decides whether s7 may join c1: the course's definition and its
//! // subscriptions, and the student's other subscriptions.
//! let query = Query::from_items([
//!     QueryItem::types(["CourseDefined", "StudentSubscribed"]).with_tags([course.clone()]),
//!     QueryItem::types(["StudentSubscribed"]).with_tags([student.clone()]),
//! ]);
//! assert!(query.matches("StudentSubscribed", &[student.clone(), Tag::new("course", "c2")]));
//! assert!(!query.matches("CourseDefined", &[Tag::new("course", "c2")]));
//! // Append only if nothing matching was stored after position 41, which the decision read.
//! let condition = AppendCondition::new(query, Some(Position(41)));
//! assert_eq!(condition.after, Some(Position(41)));
//! ```

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::ids::Position;

/// The longest tag, in bytes.
pub const MAX_TAG_LEN: usize = 256;

/// A label that places an event in a consistency boundary, by convention `kind:value`
/// (`course:c1`, `student:s7`). An event carries any number of tags; a [`QueryItem`] matches the
/// events that carry all of its tags.
///
/// Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Tag(Arc<str>);

/// Why a string is not a [`Tag`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TagError {
    /// The tag is empty.
    #[error("a tag cannot be empty")]
    Empty,
    /// The tag is longer than [`MAX_TAG_LEN`] bytes.
    #[error("a tag is at most {MAX_TAG_LEN} bytes, this one is {0}")]
    TooLong(usize),
    /// The tag holds a control character.
    #[error("a tag cannot hold control characters")]
    ControlCharacter,
}

impl Tag {
    /// The tag `kind:value`. A value that makes it longer than [`MAX_TAG_LEN`] is cut at a
    /// character boundary (tags are keys, not data); control characters become `?`.
    pub fn new(kind: &str, value: impl fmt::Display) -> Self {
        let mut text = format!("{kind}:{value}");
        if text.chars().any(char::is_control) {
            text = text.chars().map(|c| if c.is_control() { '?' } else { c }).collect();
        }
        if text.len() > MAX_TAG_LEN {
            let mut end = MAX_TAG_LEN;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
        }
        Self(Arc::from(text))
    }

    /// A tag from its full text, checked: non-empty, at most [`MAX_TAG_LEN`] bytes, no control
    /// characters.
    pub fn parse(text: &str) -> Result<Self, TagError> {
        if text.is_empty() {
            return Err(TagError::Empty);
        }
        if text.len() > MAX_TAG_LEN {
            return Err(TagError::TooLong(text.len()));
        }
        if text.chars().any(char::is_control) {
            return Err(TagError::ControlCharacter);
        }
        Ok(Self(Arc::from(text)))
    }

    /// The tag's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl TryFrom<String> for Tag {
    type Error = TagError;

    fn try_from(text: String) -> Result<Self, TagError> {
        Tag::parse(&text)
    }
}

impl From<Tag> for String {
    fn from(tag: Tag) -> String {
        tag.0.to_string()
    }
}

impl AsRef<str> for Tag {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// One alternative of a [`Query`]: it matches an event whose type is one of `types` (any type
/// when `types` is empty) and whose tags include every one of `tags` (any tags when `tags` is
/// empty).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct QueryItem {
    /// The event types this item matches; empty: every type.
    pub types: Vec<String>,
    /// The tags an event must all carry; empty: no requirement.
    pub tags: Vec<Tag>,
}

impl QueryItem {
    /// Events of any of these types (with any tags until [`with_tags`](Self::with_tags)).
    pub fn types<I, S>(types: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self { types: types.into_iter().map(Into::into).collect(), tags: Vec::new() }
    }

    /// Events of any type that carry all these tags.
    pub fn tags(tags: impl IntoIterator<Item = Tag>) -> Self {
        Self { types: Vec::new(), tags: tags.into_iter().collect() }
    }

    /// This item, also requiring all of `tags`.
    #[must_use]
    pub fn with_tags(mut self, tags: impl IntoIterator<Item = Tag>) -> Self {
        self.tags.extend(tags);
        self
    }

    /// Whether an event of `event_type` carrying `tags` matches this item.
    pub fn matches(&self, event_type: &str, tags: &[Tag]) -> bool {
        (self.types.is_empty() || self.types.iter().any(|t| t == event_type))
            && self.tags.iter().all(|wanted| tags.contains(wanted))
    }
}

/// Which events a decision depends on: the events matching any of its [`QueryItem`]s. A query
/// without items matches no event; [`Query::all`] matches every event.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Query {
    /// The alternatives; an event matches the query when it matches one of them.
    pub items: Vec<QueryItem>,
}

impl Query {
    /// Every event.
    pub fn all() -> Self {
        Self { items: vec![QueryItem::default()] }
    }

    /// No event.
    pub fn none() -> Self {
        Self { items: Vec::new() }
    }

    /// The events matching any of `items`.
    pub fn from_items(items: impl IntoIterator<Item = QueryItem>) -> Self {
        Self { items: items.into_iter().collect() }
    }

    /// This query, also matching the events `item` matches.
    #[must_use]
    pub fn or(mut self, item: QueryItem) -> Self {
        self.items.push(item);
        self
    }

    /// Whether an event of `event_type` carrying `tags` matches this query.
    pub fn matches(&self, event_type: &str, tags: &[Tag]) -> bool {
        self.items.iter().any(|item| item.matches(event_type, tags))
    }

    /// Whether this query matches every event (one of its items has no types and no tags).
    pub fn is_all(&self) -> bool {
        self.items.iter().any(|item| item.types.is_empty() && item.tags.is_empty())
    }

    /// Whether this query matches no event.
    pub fn is_none(&self) -> bool {
        self.items.is_empty()
    }
}

/// The condition of a conditional append: fail if any event matching `fail_if_events_match` was
/// stored after position `after` (after the start of the log when `None`). A decision reads the
/// events its query matches, up to some position, decides on them, and appends with that
/// position as `after`: the append then commits only if its decision is still valid.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AppendCondition {
    /// The events that would invalidate the decision.
    pub fail_if_events_match: Query,
    /// The position the decision read up to; `None`: the decision read nothing (any matching
    /// event invalidates it).
    pub after: Option<Position>,
}

impl AppendCondition {
    /// Fail if an event matching `query` was stored after `after`.
    pub fn new(query: Query, after: Option<Position>) -> Self {
        Self { fail_if_events_match: query, after }
    }

    /// The position after which matching events make the append fail.
    pub fn after_position(&self) -> Position {
        self.after.unwrap_or(Position::START)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_item_matches_on_type_and_all_its_tags() {
        let c1 = Tag::new("course", "c1");
        let s7 = Tag::new("student", "s7");
        let item = QueryItem::types(["StudentSubscribed"]).with_tags([c1.clone(), s7.clone()]);
        assert!(item.matches("StudentSubscribed", &[s7.clone(), c1.clone(), Tag::new("x", 1)]));
        assert!(!item.matches("StudentSubscribed", std::slice::from_ref(&c1)));
        assert!(!item.matches("CourseDefined", &[c1.clone(), s7.clone()]));
        assert!(QueryItem::tags([c1.clone()]).matches("Anything", std::slice::from_ref(&c1)));
        assert!(QueryItem::types(["A"]).matches("A", &[]));
    }

    #[test]
    fn all_and_none() {
        assert!(Query::all().matches("Any", &[]));
        assert!(Query::all().is_all());
        assert!(!Query::none().matches("Any", &[]));
        assert!(Query::none().is_none());
        assert!(!Query::from_items([QueryItem::types(["A"])]).is_all());
    }

    #[test]
    fn tags_are_checked_and_bounded() {
        assert_eq!(Tag::parse(""), Err(TagError::Empty));
        assert_eq!(Tag::parse("a\nb"), Err(TagError::ControlCharacter));
        assert_eq!(Tag::parse(&"x".repeat(MAX_TAG_LEN + 1)), Err(TagError::TooLong(MAX_TAG_LEN + 1)));
        assert_eq!(Tag::new("user", "ada").as_str(), "user:ada");
        assert_eq!(Tag::new("ka", "é".repeat(200)).as_str().len(), MAX_TAG_LEN - 1, "cut at a character boundary");
        assert_eq!(Tag::new("k", "a\u{0}b").as_str(), "k:a?b");
        let json = serde_json::to_string(&Tag::new("a", "b")).expect("json");
        assert_eq!(json, "\"a:b\"");
        assert!(serde_json::from_str::<Tag>("\"\"").is_err());
    }
}
