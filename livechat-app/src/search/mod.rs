//! Search: the chat's second read model. A transactional projection keeps every message's
//! current text in a full-text index in the store's own database (SQLite FTS5 in the chat's
//! file, PostgreSQL `tsvector` with a GIN index), updated in the same transaction as its
//! checkpoint: an edit replaces the indexed text, a delete removes it.
//!
//! Input never reaches the index's query language: [`Terms::parse`] keeps only words (runs of
//! letters and digits), at most [`MAX_TERMS`], and each backend quotes them itself, so FTS5
//! `MATCH` operators and `tsquery` syntax typed into the box are just characters between words.

mod postgres;
mod sqlite;
mod versions;

use std::sync::Arc;

use async_trait::async_trait;
use cqrs_core::{Envelope, Position, RunningHandler, Timestamp};

pub use postgres::PgSearch;
pub use sqlite::SqliteSearch;
pub use versions::{table_name, SearchVersions};

use crate::domain::{ChatEvent, ChatId};

/// The name of the search projection (and its checkpoint).
pub const PROJECTION_NAME: &str = "chat-search";
/// Longest search input, in characters.
pub const MAX_QUERY_CHARS: usize = 200;
/// Most words a search matches on (all of them must be in a message).
pub const MAX_TERMS: usize = 8;
/// Longest word kept, in characters.
const MAX_TERM_CHARS: usize = 64;
/// Results shown per search.
pub const RESULTS: usize = 50;
/// Marks the start of a matched word in a snippet (control characters never occur in
/// messages, which refuse them).
pub const MATCH_START: char = '\u{2}';
/// Marks the end of a matched word in a snippet.
pub const MATCH_END: char = '\u{3}';

/// Why a search was not run.
#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    /// Nothing to search for.
    #[error("type a word to search for")]
    Empty,
    /// Over [`MAX_QUERY_CHARS`] characters.
    #[error("a search is at most {MAX_QUERY_CHARS} characters")]
    TooLong,
    /// No version of the index is served yet.
    #[error("search is starting; try again in a moment")]
    Starting,
    /// The index could not be read.
    #[error("search is unavailable right now: {0}")]
    Unavailable(#[source] sqlx::Error),
}

/// The words of a search: lower-case runs of letters and digits, each at most 64 characters,
/// at most [`MAX_TERMS`], in the order typed (duplicates dropped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Terms(Vec<String>);

impl Terms {
    /// Parses what someone typed.
    pub fn parse(input: &str) -> Result<Self, SearchError> {
        if input.chars().count() > MAX_QUERY_CHARS {
            return Err(SearchError::TooLong);
        }
        let mut terms: Vec<String> = Vec::new();
        for word in input.split(|c: char| !c.is_alphanumeric()).filter(|word| !word.is_empty()) {
            let word: String = word.chars().take(MAX_TERM_CHARS).flat_map(char::to_lowercase).collect();
            if !terms.contains(&word) {
                terms.push(word);
            }
            if terms.len() == MAX_TERMS {
                break;
            }
        }
        if terms.is_empty() {
            return Err(SearchError::Empty);
        }
        Ok(Self(terms))
    }

    /// The words.
    pub fn words(&self) -> &[String] {
        &self.0
    }
}

/// One message that matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    /// Its room.
    pub room: ChatId,
    /// Its version in the room's stream (its `data-version`).
    pub version: u64,
    /// The global position of its `MessageSent`.
    pub position: Position,
    /// Who sent it.
    pub sender: String,
    /// When.
    pub sent_at: Timestamp,
    /// Its current text, the matched words between [`MATCH_START`] and [`MATCH_END`].
    pub snippet: String,
}

/// A full-text index of the chat's messages.
#[async_trait]
pub trait SearchIndex: Send + Sync + 'static {
    /// The newest messages (in `room`, or in every room) that contain every word of `terms`
    /// (the last one also as a prefix), at most `limit`.
    async fn search(&self, terms: &Terms, room: Option<&ChatId>, limit: usize) -> Result<Vec<Hit>, SearchError>;
}

/// What one event does to the index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change<'a> {
    /// A new message.
    Insert { position: i64, room: &'a str, version: i64, sender: &'a str, sent_at: i64, body: &'a str },
    /// A message's new text.
    Update { room: &'a str, version: i64, body: &'a str },
    /// A message gone.
    Delete { room: &'a str, version: i64 },
}

/// The index change an event makes, if any (reactions change nothing).
pub(crate) fn change(envelope: &Envelope<ChatEvent>) -> Option<Change<'_>> {
    let number = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    match &envelope.event {
        ChatEvent::MessageSent(sent) => Some(Change::Insert {
            position: number(envelope.position.0),
            room: sent.chat_id.as_str(),
            version: number(envelope.version.0),
            sender: &sent.sender,
            sent_at: sent.sent_at.0,
            body: &sent.content,
        }),
        ChatEvent::MessageEdited(edited) => Some(Change::Update {
            room: edited.chat_id.as_str(),
            version: number(edited.version),
            body: &edited.content,
        }),
        ChatEvent::MessageDeleted(deleted) => {
            Some(Change::Delete { room: deleted.chat_id.as_str(), version: number(deleted.version) })
        }
        ChatEvent::ReactionAdded(_) | ChatEvent::ReactionRemoved(_) => None,
    }
}

/// The hits of a backend's result rows: columns `position`, `room`, `version`, `sender`,
/// `sent_at` and `snippet` (a row naming an invalid room or a negative number is skipped).
pub(crate) fn hits<R>(rows: &[R]) -> Result<Vec<Hit>, SearchError>
where
    R: sqlx::Row,
    for<'n> &'n str: sqlx::ColumnIndex<R>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let mut hits = Vec::with_capacity(rows.len());
    for row in rows {
        let number = |name: &str| row.try_get::<i64, _>(name).map_err(SearchError::Unavailable);
        let text = |name: &str| row.try_get::<String, _>(name).map_err(SearchError::Unavailable);
        let (Ok(room), Ok(version), Ok(position)) =
            (ChatId::parse(&text("room")?), u64::try_from(number("version")?), u64::try_from(number("position")?))
        else {
            continue;
        };
        hits.push(Hit {
            room,
            version,
            position: Position(position),
            sender: text("sender")?,
            sent_at: Timestamp(number("sent_at")?),
            snippet: text("snippet")?,
        });
    }
    Ok(hits)
}

/// Where the search index lives: the store's own database.
#[derive(Debug, Clone)]
pub enum Backend {
    /// The SQLite file of this URL, whose store this is.
    Sqlite {
        /// The `sqlite://` URL.
        url: String,
        /// Its store.
        store: cqrs_sqlite::SqliteEventStore,
    },
    /// The PostgreSQL database of this store.
    Postgres(cqrs_postgres::PgEventStore),
}

impl Backend {
    /// Creates the index's tables if missing and starts its projection.
    pub async fn start(self, progress: &cqrs_core::Progress) -> Result<Search, sqlx::Error> {
        match self {
            Backend::Sqlite { url, store } => SqliteSearch::start(&url, &store, progress).await,
            Backend::Postgres(store) => PgSearch::start(&store, progress).await,
        }
    }
}

/// The running search: its index and the projection that keeps it.
pub struct Search {
    /// The index.
    pub index: Arc<dyn SearchIndex>,
    /// The projection's runner.
    pub running: RunningHandler,
}

impl std::fmt::Debug for Search {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Search").field("projection", &self.running.status()).finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_words_reach_the_index() {
        let terms = Terms::parse("Pizza \"tonight\" OR pizza* NEAR(a b) -x ^y col:z 'q' \\ AND").expect("terms");
        assert_eq!(terms.words(), ["pizza", "tonight", "or", "near", "a", "b", "x", "y"]);
        assert!(terms.words().iter().all(|w| w.chars().all(char::is_alphanumeric)));
        assert_eq!(Terms::parse("Größe été 東京").expect("terms").words(), ["größe", "été", "東京"]);
        assert!(matches!(Terms::parse("  \"*():'!&|  "), Err(SearchError::Empty)));
        assert!(matches!(Terms::parse(""), Err(SearchError::Empty)));
        assert!(matches!(Terms::parse(&"a".repeat(201)), Err(SearchError::TooLong)));
        assert_eq!(Terms::parse(&"b".repeat(200)).expect("terms").words()[0].len(), MAX_TERM_CHARS);
    }
}
