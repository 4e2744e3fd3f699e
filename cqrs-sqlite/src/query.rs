//! The SQL of a DCB [`Query`]: the same `WHERE` clause serves `read_query` (on the readers)
//! and the check of an append condition (on the writer, inside its transaction).
//!
//! Each item is `position IN (...)` of its own first `limit` positions after `after`, in
//! position order: an item with tags walks the tag table's key `(tag, position)` from its first
//! tag, keeping the positions that carry its other tags too (key lookups) and are of its types
//! (a rowid lookup); an item with types only walks the event type index `(event_type,
//! position)`; an item with neither, the log itself. Items are OR'ed, the whole behind
//! `position > ?`. Each item stops after `limit` positions, so a page of a long read costs
//! its own size, not the rest of the tag. Every value is a bound parameter.

use cqrs_core::{Position, Query, QueryItem};

use crate::direct::{Direct, Params};
use crate::rows::to_i64_saturating;

/// A `sqlx` query on SQLite, with its arguments.
pub(crate) type SqliteQuery<'q> = sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>>;

/// Where a query's parameters go: a sqlx query, or the writer's own [`Params`].
pub(crate) trait Bind<'q>: Sized {
    /// Binds a text parameter after those bound.
    fn text(self, value: &'q str) -> Self;
    /// Binds an integer parameter after those bound.
    fn int(self, value: i64) -> Self;
}

impl<'q> Bind<'q> for SqliteQuery<'q> {
    fn text(self, value: &'q str) -> Self {
        self.bind(value)
    }
    fn int(self, value: i64) -> Self {
        self.bind(value)
    }
}

impl<'q> Bind<'q> for Params<'q> {
    fn text(mut self, value: &'q str) -> Self {
        Params::text(&mut self, value);
        self
    }
    fn int(mut self, value: i64) -> Self {
        Params::int(&mut self, value);
        self
    }
}

/// Up to this many bound parameters, a query's statement stays prepared on its connection
/// (larger ones are rare and prepared each time, so they do not crowd out the others).
const CACHED_PARAMETERS: usize = 16;

/// `?, ?, ...`: `count` anonymous parameters.
fn placeholders(count: usize) -> String {
    vec!["?"; count].join(", ")
}

/// The positions of one item's events after `?`, in order, at most `?` of them.
fn item_positions(item: &QueryItem) -> String {
    let types = (!item.types.is_empty()).then(|| placeholders(item.types.len()));
    let Some((_, others)) = item.tags.split_first() else {
        return match types {
            Some(types) => format!(
                "SELECT position FROM cqrs_events WHERE event_type IN ({types}) AND position > ? \
                 ORDER BY position LIMIT ?"
            ),
            None => "SELECT position FROM cqrs_events WHERE position > ? ORDER BY position LIMIT ?".to_owned(),
        };
    };
    let mut sql = "SELECT t.position FROM cqrs_event_tags AS t WHERE t.tag = ? AND t.position > ?".to_owned();
    for _ in others {
        sql.push_str(" AND EXISTS (SELECT 1 FROM cqrs_event_tags AS u WHERE u.tag = ? AND u.position = t.position)");
    }
    if let Some(types) = types {
        sql.push_str(&format!(
            " AND EXISTS (SELECT 1 FROM cqrs_events AS e WHERE e.position = t.position AND e.event_type IN ({types}))"
        ));
    }
    sql.push_str(" ORDER BY t.position LIMIT ?");
    sql
}

/// `position > ? AND (position IN (item) OR ...)` for a query with at least one item, with
/// anonymous parameters bound by [`bind_where`] in the same order.
pub(crate) fn where_clause(query: &Query) -> String {
    let items: Vec<String> = query.items.iter().map(|item| format!("position IN ({})", item_positions(item))).collect();
    format!("position > ? AND ({})", items.join(" OR "))
}

/// Binds the parameters of [`where_clause`]`(query)` after those `statement` has: events after
/// `after`, at most `limit` per item.
pub(crate) fn bind_where<'q, B: Bind<'q>>(mut statement: B, query: &'q Query, after: Position, limit: i64) -> B {
    let after = to_i64_saturating(after.0);
    statement = statement.int(after);
    for item in &query.items {
        match item.tags.split_first() {
            None => {
                for event_type in &item.types {
                    statement = statement.text(event_type.as_str());
                }
                statement = statement.int(after);
            }
            Some((first, others)) => {
                statement = statement.text(first.as_str()).int(after);
                for tag in others {
                    statement = statement.text(tag.as_str());
                }
                for event_type in &item.types {
                    statement = statement.text(event_type.as_str());
                }
            }
        }
        statement = statement.int(limit);
    }
    statement
}

/// How many parameters [`where_clause`]`(query)` binds.
pub(crate) fn parameters(query: &Query) -> usize {
    1 + query.items.iter().map(|item| item.types.len() + item.tags.len() + 2).sum::<usize>()
}

/// Whether the statement of `query` is small enough to keep prepared.
pub(crate) fn cached(query: &Query) -> bool {
    parameters(query) <= CACHED_PARAMETERS
}

/// The SQL of the first position of an event `query` matches: a scalar subquery, its
/// parameters bound by [`bind_first_match`].
pub(crate) fn first_match_sql(query: &Query) -> String {
    format!("(SELECT position FROM cqrs_events WHERE {} ORDER BY position LIMIT 1)", where_clause(query))
}

/// Binds the parameters of [`first_match_sql`]`(query)` after those `statement` has.
pub(crate) fn bind_first_match<'q, B: Bind<'q>>(statement: B, query: &'q Query, after: Position) -> B {
    bind_where(statement, query, after, 1)
}

/// The one tag of a query of one item with one tag and no types (the usual condition of a
/// decision), which the tag table's key answers alone.
pub(crate) fn single_tag(query: &Query) -> Option<&str> {
    match query.items.as_slice() {
        [item] if item.types.is_empty() && item.tags.len() == 1 => item.tags.first().map(|tag| tag.as_str()),
        _ => None,
    }
}

/// The first position after `after` of an event `query` matches, on the writer's connection
/// (inside its transaction, so it sees the batch's earlier appends).
pub(crate) fn first_match(direct: &Direct, query: &Query, after: Position) -> rusqlite::Result<Option<i64>> {
    if query.is_none() {
        return Ok(None);
    }
    let sql = format!("SELECT {}", first_match_sql(query));
    let params = bind_first_match(Params::with_capacity(parameters(query)), query, after);
    let found = direct.query(&sql, cached(query), &params, |row| row.get::<_, Option<i64>>(0))?;
    Ok(found.into_iter().next().flatten())
}

#[cfg(test)]
mod tests {
    use cqrs_core::{QueryItem, Tag};
    use sqlx::{Connection, Row, SqliteConnection};

    use super::*;

    /// SQLite's plan for `query`'s read, one line per step.
    async fn plan(connection: &mut SqliteConnection, query: &Query) -> Vec<String> {
        let sql = format!(
            "EXPLAIN QUERY PLAN SELECT * FROM cqrs_events WHERE {} ORDER BY position LIMIT ?",
            where_clause(query)
        );
        let rows =
            bind_where(sqlx::query(&sql), query, Position(0), 10).bind(10).fetch_all(connection).await.expect("plan");
        rows.iter().map(|row| row.get::<String, _>("detail")).collect()
    }

    /// Every item is answered from an index (the tag table's key or the event type index),
    /// never by scanning the log from `after`.
    #[tokio::test]
    async fn reads_by_query_use_the_indexes() {
        let mut connection = SqliteConnection::connect("sqlite::memory:").await.expect("connect");
        sqlx::migrate!("./migrations").run(&mut connection).await.expect("migrate");
        let (c1, s7) = (Tag::new("course", "c1"), Tag::new("student", "s7"));
        let queries = [
            Query::from_items([QueryItem::tags([c1.clone()])]),
            Query::from_items([QueryItem::types(["A", "B"])]),
            Query::from_items([QueryItem::types(["A"]).with_tags([c1.clone(), s7.clone()])]),
            Query::from_items([QueryItem::types(["A"]).with_tags([c1.clone()]), QueryItem::tags([s7.clone()])]),
            Query::from_items([QueryItem::types(["A"]), QueryItem::tags([s7])]),
        ];
        for query in &queries {
            let plan = plan(&mut connection, query).await;
            // A range of positions alone is a scan of the log from `after`.
            let scans =
                |step: &String| step.starts_with("SCAN cqrs_events") || step.contains("INTEGER PRIMARY KEY (rowid>?)");
            assert!(!plan.iter().any(scans), "{query:?} scans the log: {plan:?}");
        }
    }
}
