//! Search on PostgreSQL: a table with a generated `tsvector` (the `simple` configuration: no
//! stemming, so every language is matched word for word) and a GIN index, kept by a
//! transactional projection. The projection is exclusive (one node writes it, the others stand
//! by); every node reads it.

use async_trait::async_trait;
use cqrs_core::{Envelope, HandlerError, Progress, RunnerConfig};
use cqrs_postgres::{spawn_projection, PgEventStore, PgProjection};
use sqlx::{PgConnection, PgPool};

use super::{
    change, hits, Change, Hit, Search, SearchError, SearchIndex, Terms, MATCH_END, MATCH_START, PROJECTION_NAME,
};
use crate::domain::{ChatEvent, ChatId};

/// The PostgreSQL search index and its projection.
#[derive(Debug, Clone)]
pub struct PgSearch {
    name: String,
    table: String,
    pool: PgPool,
}

impl PgSearch {
    /// The chat's search (table `chat_search`) in `store`'s database: creates the table and
    /// its index if missing (under an advisory lock, so nodes starting together do not race)
    /// and starts the projection.
    pub async fn start(store: &PgEventStore, progress: &Progress) -> Result<Search, sqlx::Error> {
        Self::start_named(store, PROJECTION_NAME, "chat_search", progress).await
    }

    /// [`PgSearch::start`] under another projection name and table.
    pub async fn start_named(
        store: &PgEventStore,
        name: &str,
        table: &str,
        progress: &Progress,
    ) -> Result<Search, sqlx::Error> {
        let pool = store.pool().clone();
        // One simple query: its statements run in one implicit transaction, which holds the
        // lock to the end.
        sqlx::raw_sql(&format!(
            "SELECT pg_advisory_xact_lock(hashtext('livechat search schema')); \
             CREATE TABLE IF NOT EXISTS {table} (position bigint PRIMARY KEY, room text NOT NULL, version bigint NOT NULL, \
             sender text NOT NULL, sent_at bigint NOT NULL, body text NOT NULL, \
             tsv tsvector GENERATED ALWAYS AS (to_tsvector('simple', body)) STORED, UNIQUE (room, version)); \
             CREATE INDEX IF NOT EXISTS {table}_tsv ON {table} USING gin (tsv); \
             CREATE INDEX IF NOT EXISTS {table}_room ON {table} (room, position);"
        ))
        .execute(&pool)
        .await?;
        let search = Self { name: name.to_owned(), table: table.to_owned(), pool };
        let running = spawn_projection(store, search.clone(), RunnerConfig::default(), progress);
        Ok(Search { index: std::sync::Arc::new(search), running })
    }

    /// Drops the table of the index named `table` (a version no longer kept).
    pub async fn drop_tables(store: &PgEventStore, table: &str) -> Result<(), sqlx::Error> {
        sqlx::raw_sql(&format!("DROP TABLE IF EXISTS {table}")).execute(store.pool()).await.map(drop)
    }

    async fn write(&self, transaction: &mut PgConnection, events: &[Envelope<ChatEvent>]) -> Result<(), sqlx::Error> {
        let table = &self.table;
        let mut inserts = Inserts::default();
        for change in events.iter().filter_map(change) {
            if let Change::Insert { position, room, version, sender, sent_at, body } = change {
                inserts.push(position, room, version, sender, sent_at, body);
                continue;
            }
            // In order: the inserts before an edit or delete first.
            std::mem::take(&mut inserts).write(transaction, table).await?;
            match change {
                Change::Insert { .. } => {}
                Change::Update { room, version, body } => {
                    sqlx::query(&format!("UPDATE {table} SET body = $3 WHERE room = $1 AND version = $2"))
                        .bind(room)
                        .bind(version)
                        .bind(body)
                        .execute(&mut *transaction)
                        .await?;
                }
                Change::Delete { room, version } => {
                    sqlx::query(&format!("DELETE FROM {table} WHERE room = $1 AND version = $2"))
                        .bind(room)
                        .bind(version)
                        .execute(&mut *transaction)
                        .await?;
                }
            }
        }
        inserts.write(transaction, table).await
    }
}

/// New messages as parallel arrays: one statement for all of a batch's (a catch-up writes
/// hundreds a batch).
#[derive(Default)]
struct Inserts<'a> {
    positions: Vec<i64>,
    rooms: Vec<&'a str>,
    versions: Vec<i64>,
    senders: Vec<&'a str>,
    sent_at: Vec<i64>,
    bodies: Vec<&'a str>,
}

impl<'a> Inserts<'a> {
    fn push(&mut self, position: i64, room: &'a str, version: i64, sender: &'a str, sent_at: i64, body: &'a str) {
        self.positions.push(position);
        self.rooms.push(room);
        self.versions.push(version);
        self.senders.push(sender);
        self.sent_at.push(sent_at);
        self.bodies.push(body);
    }

    async fn write(self, transaction: &mut PgConnection, table: &str) -> Result<(), sqlx::Error> {
        if self.positions.is_empty() {
            return Ok(());
        }
        sqlx::query(&format!(
            "INSERT INTO {table} (position, room, version, sender, sent_at, body) \
             SELECT * FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::text[], $5::bigint[], $6::text[]) \
             ON CONFLICT (position) DO UPDATE SET body = EXCLUDED.body"
        ))
        .bind(self.positions)
        .bind(self.rooms)
        .bind(self.versions)
        .bind(self.senders)
        .bind(self.sent_at)
        .bind(self.bodies)
        .execute(&mut *transaction)
        .await
        .map(drop)
    }
}

/// The `tsquery` of `terms`: each word quoted as a lexeme (words hold only letters and
/// digits), the last one also a prefix, all of them required.
fn tsquery(terms: &Terms) -> String {
    let words = terms.words();
    let quoted: Vec<String> = words
        .iter()
        .enumerate()
        .map(|(index, word)| {
            let prefix = if index + 1 == words.len() { ":*" } else { "" };
            format!("'{}'{prefix}", word.replace('\'', "''").replace('\\', "\\\\"))
        })
        .collect();
    quoted.join(" & ")
}

#[async_trait]
impl SearchIndex for PgSearch {
    async fn search(&self, terms: &Terms, room: Option<&ChatId>, limit: usize) -> Result<Vec<Hit>, SearchError> {
        let table = &self.table;
        let sql = format!(
            "SELECT position, room, version, sender, sent_at, ts_headline('simple', body, q, $4) AS snippet \
             FROM {table}, to_tsquery('simple', $1) q WHERE tsv @@ q AND ($2::text IS NULL OR room = $2) \
             ORDER BY position DESC LIMIT $3"
        );
        let options = format!("StartSel={MATCH_START}, StopSel={MATCH_END}, HighlightAll=true");
        let rows = sqlx::query(&sql)
            .bind(tsquery(terms))
            .bind(room.map(ChatId::as_str))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .bind(options)
            .fetch_all(&self.pool)
            .await
            .map_err(SearchError::Unavailable)?;
        hits(&rows)
    }
}

impl PgProjection for PgSearch {
    type Event = ChatEvent;

    fn name(&self) -> &str {
        &self.name
    }

    async fn apply(&self, transaction: &mut PgConnection, events: &[Envelope<ChatEvent>]) -> Result<(), HandlerError> {
        self.write(transaction, events).await.map_err(HandlerError::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_word_is_a_quoted_lexeme_and_the_last_a_prefix() {
        let terms = Terms::parse("pizza & !tonight | a:*").expect("terms");
        assert_eq!(tsquery(&terms), "'pizza' & 'tonight' & 'a':*");
    }
}
