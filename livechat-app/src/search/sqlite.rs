//! Search on SQLite: an FTS5 table in the chat's own file, kept by a transactional projection
//! that runs inside the store's writer transaction.
//!
//! `{prefix}_messages (position INTEGER PRIMARY KEY, room, version, sender, sent_at)` holds each
//! live message's place, and the FTS5 table `{prefix} (body, room)` its text and room under the
//! same rowid (the position of its `MessageSent`), so "newest first" is the FTS index's own
//! rowid order and a search in one room is narrowed by the index.

use async_trait::async_trait;
use cqrs_core::{Envelope, HandlerError, Progress, RunnerConfig};
use cqrs_sqlite::{spawn_projection, SqliteEventStore, SqliteProjection};
use sqlx::{SqliteConnection, SqlitePool};

use super::{change, hits, Change, Hit, Search, SearchError, SearchIndex, Terms, PROJECTION_NAME};
use crate::domain::{ChatEvent, ChatId};

/// The SQLite search index and its projection.
#[derive(Debug, Clone)]
pub struct SqliteSearch {
    name: String,
    table: String,
    pool: SqlitePool,
}

impl SqliteSearch {
    /// The chat's search (tables `chat_search`, `chat_search_messages`) on the file `url`
    /// names, whose store is `store`: creates its tables if missing (with a connection of its
    /// own, before the projection starts) and starts the projection.
    pub async fn start(url: &str, store: &SqliteEventStore, progress: &Progress) -> Result<Search, sqlx::Error> {
        Self::start_named(url, store, PROJECTION_NAME, "chat_search", progress).await
    }

    /// [`SqliteSearch::start`] under another projection name and table (a second index built
    /// beside the first, as a rebuild does).
    pub async fn start_named(
        url: &str,
        store: &SqliteEventStore,
        name: &str,
        table: &str,
        progress: &Progress,
    ) -> Result<Search, sqlx::Error> {
        let ddl = ddl_pool(url).await?;
        sqlx::raw_sql(&format!(
            "CREATE TABLE IF NOT EXISTS {table}_messages (position INTEGER PRIMARY KEY, room TEXT NOT NULL, \
             version INTEGER NOT NULL, sender TEXT NOT NULL, sent_at INTEGER NOT NULL, UNIQUE (room, version)); \
             CREATE VIRTUAL TABLE IF NOT EXISTS {table} USING fts5(body, room, tokenize = 'unicode61 remove_diacritics 2');"
        ))
        .execute(&ddl)
        .await?;
        ddl.close().await;
        let search = Self { name: name.to_owned(), table: table.to_owned(), pool: store.read_pool().clone() };
        let running = spawn_projection(store, search.clone(), RunnerConfig::default(), progress);
        Ok(Search { index: std::sync::Arc::new(search), running })
    }
}

impl SqliteSearch {
    /// Drops the tables of the index named `table` (a version no longer kept).
    pub async fn drop_tables(url: &str, table: &str) -> Result<(), sqlx::Error> {
        let ddl = ddl_pool(url).await?;
        sqlx::raw_sql(&format!("DROP TABLE IF EXISTS {table}; DROP TABLE IF EXISTS {table}_messages;"))
            .execute(&ddl)
            .await?;
        ddl.close().await;
        Ok(())
    }
}

/// One connection of its own for creating or dropping the index's tables.
async fn ddl_pool(url: &str) -> Result<SqlitePool, sqlx::Error> {
    sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect(url).await
}

/// The FTS5 query of `terms` in the `body` column: each word a quoted string (words hold only
/// letters and digits), the last one also a prefix, all of them required; in `room`'s column
/// too when given (a room id is letters, digits, `-` and `_`: safe in quotes), so a search in
/// one room walks that room's rows, not every match (the exact room is checked in SQL).
fn match_expression(terms: &Terms, room: Option<&ChatId>) -> String {
    let words = terms.words();
    let mut expression = String::from("body : (");
    for (index, word) in words.iter().enumerate() {
        if index > 0 {
            expression.push(' ');
        }
        expression.push('"');
        expression.push_str(&word.replace('"', "\"\""));
        expression.push('"');
        if index + 1 == words.len() {
            expression.push('*');
        }
    }
    expression.push(')');
    if let Some(room) = room {
        expression.push_str(&format!(" AND room : \"{room}\""));
    }
    expression
}

#[async_trait]
impl SearchIndex for SqliteSearch {
    async fn search(&self, terms: &Terms, room: Option<&ChatId>, limit: usize) -> Result<Vec<Hit>, SearchError> {
        let table = &self.table;
        let in_room = if room.is_some() { " AND m.room = ?2" } else { "" };
        let sql = format!(
            "SELECT m.position, m.room, m.version, m.sender, m.sent_at, highlight({table}, 0, char(2), char(3)) AS snippet \
             FROM {table} JOIN {table}_messages m ON m.position = {table}.rowid \
             WHERE {table} MATCH ?1{in_room} ORDER BY {table}.rowid DESC LIMIT ?3"
        );
        let rows = sqlx::query(&sql)
            .bind(match_expression(terms, room))
            .bind(room.map(ChatId::as_str))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await
            .map_err(SearchError::Unavailable)?;
        hits(&rows)
    }
}

impl SqliteProjection for SqliteSearch {
    type Event = ChatEvent;

    fn name(&self) -> &str {
        &self.name
    }

    async fn apply(
        &self,
        transaction: &mut SqliteConnection,
        events: &[Envelope<ChatEvent>],
    ) -> Result<(), HandlerError> {
        self.write(transaction, events).await.map_err(HandlerError::new)
    }
}

/// Messages inserted per statement while catching up (6 parameters each, far below SQLite's
/// limit of 32 766).
const INSERT_ROWS: usize = 200;

/// A new message's row.
type NewRow<'a> = (i64, &'a str, i64, &'a str, i64, &'a str);

impl SqliteSearch {
    async fn write(
        &self,
        transaction: &mut SqliteConnection,
        events: &[Envelope<ChatEvent>],
    ) -> Result<(), sqlx::Error> {
        let mut inserts: Vec<NewRow<'_>> = Vec::new();
        for change in events.iter().filter_map(change) {
            if let Change::Insert { position, room, version, sender, sent_at, body } = change {
                inserts.push((position, room, version, sender, sent_at, body));
                if inserts.len() == INSERT_ROWS {
                    self.insert(transaction, &std::mem::take(&mut inserts)).await?;
                }
                continue;
            }
            // In order: the inserts before an edit or delete first.
            self.insert(transaction, &std::mem::take(&mut inserts)).await?;
            self.change(transaction, change).await?;
        }
        self.insert(transaction, &inserts).await
    }

    /// New messages, a multi-row statement per table (a catch-up writes thousands a batch).
    async fn insert(&self, transaction: &mut SqliteConnection, rows: &[NewRow<'_>]) -> Result<(), sqlx::Error> {
        if rows.is_empty() {
            return Ok(());
        }
        let table = &self.table;
        let values = |columns: usize| vec![format!("({})", vec!["?"; columns].join(", ")); rows.len()].join(", ");
        let sql = format!(
            "INSERT OR REPLACE INTO {table}_messages (position, room, version, sender, sent_at) VALUES {}",
            values(5)
        );
        let mut query = sqlx::query(&sql);
        for &(position, room, version, sender, sent_at, _) in rows {
            query = query.bind(position).bind(room).bind(version).bind(sender).bind(sent_at);
        }
        query.execute(&mut *transaction).await?;
        let sql = format!("INSERT INTO {table} (rowid, body, room) VALUES {}", values(3));
        let mut query = sqlx::query(&sql);
        for &(position, room, _, _, _, body) in rows {
            query = query.bind(position).bind(body).bind(room);
        }
        query.execute(&mut *transaction).await?;
        Ok(())
    }

    /// An edit or a delete.
    async fn change(&self, transaction: &mut SqliteConnection, change: Change<'_>) -> Result<(), sqlx::Error> {
        let table = &self.table;
        match change {
            Change::Insert { .. } => Ok(()),
            Change::Update { room, version, body } => sqlx::query(&format!(
                "UPDATE {table} SET body = ?3 WHERE rowid = \
                     (SELECT position FROM {table}_messages WHERE room = ?1 AND version = ?2)"
            ))
            .bind(room)
            .bind(version)
            .bind(body)
            .execute(&mut *transaction)
            .await
            .map(drop),
            Change::Delete { room, version } => {
                sqlx::query(&format!(
                    "DELETE FROM {table} WHERE rowid = \
                     (SELECT position FROM {table}_messages WHERE room = ?1 AND version = ?2)"
                ))
                .bind(room)
                .bind(version)
                .execute(&mut *transaction)
                .await?;
                sqlx::query(&format!("DELETE FROM {table}_messages WHERE room = ?1 AND version = ?2"))
                    .bind(room)
                    .bind(version)
                    .execute(&mut *transaction)
                    .await
                    .map(drop)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_word_is_quoted_and_the_last_is_a_prefix() {
        let terms = Terms::parse("NEAR pizza OR \"x\"").expect("terms");
        assert_eq!(match_expression(&terms, None), "body : (\"near\" \"pizza\" \"or\" \"x\"*)");
        let room = ChatId::parse("room-0500").expect("room");
        assert_eq!(
            match_expression(&terms, Some(&room)),
            "body : (\"near\" \"pizza\" \"or\" \"x\"*) AND room : \"room-0500\""
        );
    }
}
