//! The SQL of a DCB [`Query`]: the same `WHERE` clause serves `read_query` (on the readers)
//! and the check of an append condition (on the writer, inside its transaction).
//!
//! Each item is `event_type IN (...)` (when it names types) and, per tag, `position IN (SELECT
//! position FROM cqrs_event_tags WHERE tag = ? AND position > ?)`; items are OR'ed, the whole
//! behind `position > ?`. SQLite answers each item from an index (the tag table's primary key,
//! or `cqrs_events_event_type`), never by scanning the log. Every value is a bound parameter.

use cqrs_core::{Position, Query};

use crate::rows::to_i64_saturating;

/// A `sqlx` query on SQLite, with its arguments.
pub(crate) type SqliteQuery<'q> = sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>>;

/// Up to this many bound parameters, a query's statement stays prepared on its connection
/// (larger ones are rare and prepared each time, so they do not crowd out the others).
const CACHED_PARAMETERS: usize = 16;

/// `position > ? AND (item OR item ...)` for a query with at least one item, with anonymous
/// parameters bound by [`bind_where`] in the same order.
pub(crate) fn where_clause(query: &Query) -> String {
    let items: Vec<String> = query
        .items
        .iter()
        .map(|item| {
            let mut terms = Vec::with_capacity(1 + item.tags.len());
            if !item.types.is_empty() {
                terms.push(format!("event_type IN ({})", vec!["?"; item.types.len()].join(", ")));
            }
            for _ in &item.tags {
                terms.push(
                    "position IN (SELECT position FROM cqrs_event_tags WHERE tag = ? AND position > ?)".to_owned(),
                );
            }
            if terms.is_empty() {
                // No types and no tags: every event.
                "1".to_owned()
            } else {
                format!("({})", terms.join(" AND "))
            }
        })
        .collect();
    format!("position > ? AND ({})", items.join(" OR "))
}

/// Binds the parameters of [`where_clause`]`(query)` after those `statement` has.
pub(crate) fn bind_where<'q>(mut statement: SqliteQuery<'q>, query: &'q Query, after: Position) -> SqliteQuery<'q> {
    let after = to_i64_saturating(after.0);
    statement = statement.bind(after);
    for item in &query.items {
        for event_type in &item.types {
            statement = statement.bind(event_type.as_str());
        }
        for tag in &item.tags {
            statement = statement.bind(tag.as_str()).bind(after);
        }
    }
    statement
}

/// Whether the statement of `query` is small enough to keep prepared.
pub(crate) fn cached(query: &Query) -> bool {
    let parameters: usize = query.items.iter().map(|item| item.types.len() + 2 * item.tags.len()).sum();
    parameters <= CACHED_PARAMETERS
}

/// The first position after `after` of an event `query` matches, on `connection` (the writer's,
/// inside its transaction, so it sees the batch's earlier appends).
pub(crate) async fn first_match(
    connection: &mut sqlx::SqliteConnection,
    query: &Query,
    after: Position,
) -> Result<Option<i64>, sqlx::Error> {
    if query.is_none() {
        return Ok(None);
    }
    let sql = format!("SELECT position FROM cqrs_events WHERE {} ORDER BY position LIMIT 1", where_clause(query));
    let statement = bind_where(sqlx::query(&sql).persistent(cached(query)), query, after);
    let row = statement.fetch_optional(connection).await?;
    row.map(|row| sqlx::Row::try_get::<i64, _>(&row, 0)).transpose()
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
            bind_where(sqlx::query(&sql), query, Position(0)).bind(10).fetch_all(connection).await.expect("plan");
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
