//! The commonest write, one command storing one event, as one prepared statement.
//!
//! A lone append of a single event with no condition is decided and written by
//! [`single_event_sql`], with no call of the batch functions: they spend most of their server
//! time on fixed per-call work (BENCHMARKS.md, "Known gaps"), which this statement does not
//! have. It takes the same locks in the same order as `cqrs_append_batch`: the watermark lock
//! before any position, then the event's shared boundary locks in key order, then the
//! stream row. It answers `appended` or `duplicate` itself; anything it cannot decide with
//! the batch function's answer (a version conflict, whose actual version must be read under
//! the stream lock; an event id stored already; a stream or command id that another session
//! stored after this statement's snapshot, which the unique indexes refuse) it leaves to
//! `cqrs_append_batch`, which the writer then calls in a second transaction.
//!
//! A lone conditional append of one event goes to the function `cqrs_append_conditional`
//! (`ConditionalEvent`) instead: its condition must be read with a snapshot taken after its
//! exclusive boundary locks, which one statement cannot do, so it stays a function, but one with
//! the fewest statements and no JSON but the condition's items.

use std::collections::HashMap;
use std::sync::LazyLock;

use cqrs_core::Tag;

use sqlx::postgres::{PgArguments, PgRow};
use sqlx::query::Query;
use sqlx::types::Json;
use sqlx::{Postgres, Row};
use uuid::Uuid;

use crate::request::{expected_json, AppendRequest, ItemJson};
use crate::rows::to_i64_saturating;

/// The statement for an event with tags (`tagged`) or without, its parameters as
/// `SingleEvent::query` binds them. Its result has the batch functions' columns (one row,
/// `append_index` 0), plus `recorded_at_micros`; `outcome` is `appended`, `duplicate` or
/// `undecided`.
///
/// Evaluation order is forced by data dependencies, not by CTE order: the boundary locks read
/// the watermark CTE, the stream UPDATE's condition reads the boundary CTE (an init plan, run
/// before any row is locked), the INSERT of a new stream reads the UPDATE's result, and the
/// position's `nextval` is computed per row of their union, after both.
///
/// The boundary keys are those `cqrs_lock_boundaries` takes for the event: (type, `*`) and
/// (`*`, `*`), and (type, tag) and (`*`, tag) for each tag, shared, each once, in ascending
/// order. Without tags they are the first two, taken as a pair (a cheaper plan).
///
/// The command id and event id lookups read the statement's snapshot, taken before the stream
/// lock. A command id stored by a session that committed after that snapshot makes the
/// command INSERT fail on the primary key; an event id, the events' unique index; a stream
/// created meanwhile, the streams' primary key. The statement then rolls back as a whole and
/// the batch function answers.
pub fn single_event_sql(tagged: bool) -> &'static str {
    static STATEMENTS: LazyLock<[String; 2]> = LazyLock::new(|| [statement(false), statement(true)]);
    &STATEMENTS[usize::from(tagged)]
}

/// Builds the statement (see [`single_event_sql`]).
fn statement(tagged: bool) -> String {
    let (boundaries, locked, tags_column, tags_value, tag_rows) = if tagged {
        (
            "SELECT count(pg_advisory_xact_lock_shared(17475, k.key)) AS locked
    FROM (SELECT DISTINCT cqrs_boundary_key(w.ty, g.tg) AS key
          FROM unnest($13::text[] || '*'::text) g(tg) CROSS JOIN (VALUES ($6::text), ('*')) w(ty)
          CROSS JOIN watermark
          ORDER BY 1) k",
            "(SELECT b.locked FROM boundaries b) > 0",
            ", tags",
            ", $13::text[]",
            "), tagged AS (
    INSERT INTO cqrs_event_tags (tag, position)
    SELECT DISTINCT g.tag, d.position FROM decided d CROSS JOIN unnest($13::text[]) g(tag)",
        )
    } else {
        (
            "SELECT pg_advisory_xact_lock_shared(17475, least(k.a, k.b)) AS first,
           pg_advisory_xact_lock_shared(17475, greatest(k.a, k.b)) AS second
    FROM (SELECT cqrs_boundary_key($6::text, '*') AS a, cqrs_boundary_key('*', '*') AS b) k
    CROSS JOIN watermark",
            "(SELECT count(*) FROM boundaries) = 1",
            "",
            "",
            "",
        )
    };
    format!(
        r"
WITH watermark AS MATERIALIZED (
    SELECT pg_advisory_xact_lock_shared(cqrs_lock_marker()
        + (SELECT CASE WHEN q.is_called THEN q.last_value + 1 ELSE q.last_value END FROM cqrs_position_seq q)) AS locked
), boundaries AS MATERIALIZED (
    {boundaries}
), prior AS MATERIALIZED (
    SELECT c.first_version, c.last_version, c.first_position, c.last_position
    FROM cqrs_commands c WHERE c.stream_id = $1::text AND c.command_id = $4::uuid
), reused AS MATERIALIZED (
    SELECT ev.event_id FROM cqrs_events ev WHERE ev.event_id = $5::uuid
), moved AS MATERIALIZED (
    UPDATE cqrs_streams s SET version = s.version + 1
    WHERE s.stream_id = $1::text
      AND {locked}
      AND NOT EXISTS (SELECT 1 FROM prior) AND NOT EXISTS (SELECT 1 FROM reused)
      AND ($2::text = 'any' OR ($2::text = 'exists' AND s.version > 0)
           OR ($2::text = 'exact' AND s.version = $3::bigint) OR ($2::text = 'no_stream' AND s.version = 0))
    RETURNING s.version
), created AS MATERIALIZED (
    INSERT INTO cqrs_streams (stream_id, version)
    SELECT $1::text, 1
    WHERE NOT EXISTS (SELECT 1 FROM moved)
      AND NOT EXISTS (SELECT 1 FROM cqrs_streams s WHERE s.stream_id = $1::text)
      AND NOT EXISTS (SELECT 1 FROM prior) AND NOT EXISTS (SELECT 1 FROM reused)
      AND ($2::text IN ('any', 'no_stream') OR ($2::text = 'exact' AND $3::bigint = 0))
    RETURNING version
), decided AS MATERIALIZED (
    SELECT d.version, nextval('cqrs_position_seq') AS position
    FROM (SELECT m.version FROM moved m UNION ALL SELECT c.version FROM created c) d
), written AS (
    INSERT INTO cqrs_events (position, event_id, stream_id, version, event_type, schema_version, payload,
                             command_id, causation_id, correlation_id, headers{tags_column})
    SELECT d.position, $5::uuid, $1::text, d.version, $6::text, $7::integer, $8::jsonb, $4::uuid, $9::uuid,
           $10::uuid, $11::jsonb{tags_value}
    FROM decided d
{tag_rows}), commanded AS (
    INSERT INTO cqrs_commands (stream_id, command_id, first_version, last_version, first_position, last_position)
    SELECT $1::text, $4::uuid, d.version, d.version, d.position, d.position
    FROM decided d WHERE $4::uuid IS NOT NULL
)
SELECT 0 AS append_index,
       CASE WHEN d.version IS NOT NULL THEN 'appended' WHEN pr.first_version IS NOT NULL THEN 'duplicate'
            ELSE 'undecided' END AS outcome,
       coalesce(d.version - 1, (SELECT s.version FROM cqrs_streams s WHERE s.stream_id = $1::text), 0)
           AS actual_version,
       coalesce(d.version, pr.first_version) AS first_version,
       coalesce(d.version, pr.last_version) AS last_version,
       coalesce(d.position, pr.first_position) AS first_position,
       coalesce(d.position, pr.last_position) AS last_position,
       NULL::uuid AS duplicate_event_id,
       (extract(epoch FROM now()) * 1000000)::bigint AS recorded_at_micros,
       CASE WHEN $12::boolean THEN pg_notify('cqrs_events', coalesce(d.position, 0)::text) IS NOT NULL
            ELSE false END AS notified
FROM (SELECT 1) one
LEFT JOIN decided d ON true
LEFT JOIN prior pr ON d.version IS NULL
"
    )
}

/// The most tags the statement takes for its event: (type, tag) and (`*`, tag) for each, with
/// (type, `*`) and (`*`, `*`), is then at most 512 boundary keys, the most
/// `cqrs_lock_boundaries` takes one by one (beyond, it takes one batch-wide lock instead).
const MOST_TAGS: usize = 255;

/// One append that [`single_event_sql`] can write, as its parameters.
pub(crate) struct SingleEvent<'a> {
    stream: &'a str,
    kind: &'static str,
    expected: Option<i64>,
    command: Option<Uuid>,
    id: Uuid,
    event_type: &'a str,
    schema: i32,
    payload: Json<&'a serde_json::Value>,
    causation: Option<Uuid>,
    correlation: Option<Uuid>,
    headers: Json<&'a HashMap<String, String>>,
    tags: Vec<&'a str>,
}

impl<'a> SingleEvent<'a> {
    /// `Some` for a batch of one append of one event, with no condition, at most
    /// [`MOST_TAGS`] tags and numbers that fit the statement's columns; anything else goes to
    /// the batch functions.
    pub(crate) fn new(batch: &'a [AppendRequest]) -> Option<Self> {
        let [request] = batch else { return None };
        if request.condition.is_some() {
            return None;
        }
        Self::of(request)
    }

    /// The append's parameters, whatever its condition, if it is one event with at most
    /// [`MOST_TAGS`] tags, not a chain link, and its numbers fit.
    fn of(request: &'a AppendRequest) -> Option<Self> {
        let [event] = request.events.as_slice() else { return None };
        if request.continues || !request.followers.is_empty() || event.tags.len() > MOST_TAGS {
            return None;
        }
        let (kind, expected) = expected_json(request.expected);
        Some(SingleEvent {
            stream: request.stream_id.as_str(),
            kind,
            expected: match expected {
                Some(version) => Some(i64::try_from(version).ok()?),
                None => None,
            },
            command: request.command_id.map(|id| id.0),
            id: event.event_id.0,
            event_type: &event.event_type,
            schema: i32::try_from(event.schema_version).ok()?,
            payload: Json(&event.payload),
            causation: event.metadata.causation_id.map(|id| id.0),
            correlation: event.metadata.correlation_id.map(|id| id.0),
            headers: Json(&event.metadata.headers),
            tags: event.tags.iter().map(Tag::as_str).collect(),
        })
    }

    /// The statement, sending the NOTIFY at its commit if `notify`.
    pub(crate) fn query(self, notify: bool) -> Query<'a, Postgres, PgArguments> {
        let query = sqlx::query(single_event_sql(!self.tags.is_empty()))
            .bind(self.stream)
            .bind(self.kind)
            .bind(self.expected)
            .bind(self.command)
            .bind(self.id)
            .bind(self.event_type)
            .bind(self.schema)
            .bind(self.payload)
            .bind(self.causation)
            .bind(self.correlation)
            .bind(self.headers)
            .bind(notify);
        if self.tags.is_empty() {
            query
        } else {
            query.bind(self.tags)
        }
    }
}

/// The most exclusive boundary keys a condition may take for `cqrs_append_conditional`: one per
/// query item and type of it (or one for an item without types), as `cqrs_lock_boundaries`
/// takes them one by one.
const MOST_CONDITION_KEYS: usize = 512;

/// A lone conditional append of one event, as `cqrs_append_conditional`'s parameters: the
/// function with the locks, checks and answers of `cqrs_append_batch` for such an append, in
/// fewer statements and with no JSON to take apart but the condition's items.
pub(crate) struct ConditionalEvent<'a> {
    event: SingleEvent<'a>,
    after: i64,
    items: Json<Vec<ItemJson<'a>>>,
}

impl<'a> ConditionalEvent<'a> {
    /// `Some` for a batch of one append of one event (at most [`MOST_TAGS`] tags) with a
    /// condition of at least one item and at most [`MOST_CONDITION_KEYS`] keys.
    pub(crate) fn new(batch: &'a [AppendRequest]) -> Option<Self> {
        let [request] = batch else { return None };
        let condition = request.condition.as_ref()?;
        let items = &condition.fail_if_events_match.items;
        let keys: usize = items.iter().map(|item| item.types.len().max(1)).sum();
        if items.is_empty() || keys > MOST_CONDITION_KEYS {
            return None;
        }
        Some(ConditionalEvent {
            event: SingleEvent::of(request)?,
            after: to_i64_saturating(condition.after_position().0),
            items: Json(items.iter().map(ItemJson::from).collect()),
        })
    }

    /// The call, sending the NOTIFY at its commit if `notify`; its rows carry the
    /// transaction's `now()` as `recorded_at_micros`, as the batch functions' calls do.
    pub(crate) fn query(self, notify: bool) -> Query<'a, Postgres, PgArguments> {
        let SingleEvent {
            stream,
            kind,
            expected,
            command,
            id,
            event_type,
            schema,
            payload,
            causation,
            correlation,
            headers,
            tags,
        } = self.event;
        sqlx::query(
            "SELECT append_index, outcome, actual_version, first_version, last_version, first_position, \
             last_position, duplicate_event_id, (extract(epoch FROM now()) * 1000000)::bigint AS recorded_at_micros \
             FROM cqrs_append_conditional($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
        )
        .bind(stream)
        .bind(kind)
        .bind(expected)
        .bind(command)
        .bind(id)
        .bind(event_type)
        .bind(schema)
        .bind(payload)
        .bind(causation)
        .bind(correlation)
        .bind(headers)
        .bind(tags)
        .bind(self.after)
        .bind(self.items)
        .bind(notify)
    }
}

/// Whether the statement left its append to the batch function.
pub(crate) fn undecided(rows: &[PgRow]) -> bool {
    !matches!(rows, [row] if matches!(row.try_get::<&str, _>("outcome"), Ok("appended" | "duplicate")))
}
