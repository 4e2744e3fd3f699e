//! Conversions between SQLite rows and `cqrs-core` types, checked at the SQL boundary.
//!
//! SQLite integers are `i64`; ids are 16-byte blobs; payloads, headers and snapshot states
//! are JSON text.

use std::collections::HashMap;
use std::sync::Arc;

use cqrs_core::store::RowNames;
use cqrs_core::{
    AppendResult, CausationId, CommandId, CorrelationId, EventId, Metadata, Payload, Position, RecordedEvent,
    StoreError, Tag, Timestamp, Version,
};
use futures_util::TryStreamExt;
use sqlx::query::Query;
use sqlx::sqlite::{SqliteArguments, SqlitePool, SqliteRow};
use sqlx::{Row, Sqlite};
use uuid::Uuid;

use crate::error::to_store_error;

/// The columns of an event row, as [`EventDecoder`] reads them (by name, once per result).
pub(crate) const EVENT_COLUMNS: &str = "position, event_id, stream_id, version, event_type, schema_version, \
     payload, command_id, causation_id, correlation_id, headers, recorded_at, tags";

/// A stored integer that must be a non-negative `u64`.
pub(crate) fn to_u64(value: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| StoreError::Corrupt(format!("negative {what} {value} in the store")))
}

/// A `u64` bound for SQL, saturated at `i64::MAX` (no stored number is larger).
pub(crate) fn to_i64_saturating(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// A `usize` limit for SQL, saturated at `i64::MAX`.
pub(crate) fn limit(value: usize) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Parses stored JSON text, or reports the row as corrupt.
pub(crate) fn json(text: &str, what: &str) -> Result<serde_json::Value, StoreError> {
    serde_json::from_str(text).map_err(|error| StoreError::Corrupt(format!("stored {what} is not valid JSON: {error}")))
}

/// Parses stored headers (a JSON object of strings), or reports the row as corrupt. `{}`, by
/// far the most common, skips the parser.
fn parse_headers(text: &str) -> Result<HashMap<String, String>, StoreError> {
    if text == "{}" {
        return Ok(HashMap::new());
    }
    serde_json::from_str(text)
        .map_err(|error| StoreError::Corrupt(format!("stored headers are not a JSON object of strings: {error}")))
}

/// The stored form of an event's tags: a JSON array of strings, in the order given; `[]` for
/// none (the column's default, which events stored before tags existed have).
pub(crate) fn encode_tags(tags: &[Tag]) -> String {
    if tags.is_empty() {
        return "[]".to_owned();
    }
    // A list of strings always serializes.
    serde_json::to_string(tags).unwrap_or_else(|_| "[]".to_owned())
}

/// Parses stored tags (see [`encode_tags`]), or reports the row as corrupt.
fn parse_tags(text: &str) -> Result<Vec<Tag>, StoreError> {
    serde_json::from_str(text)
        .map_err(|error| StoreError::Corrupt(format!("stored tags are not a JSON array of tags: {error}")))
}

/// Where each event column is in one result.
#[derive(Clone, Copy)]
struct Columns {
    position: usize,
    event_id: usize,
    stream_id: usize,
    version: usize,
    event_type: usize,
    schema_version: usize,
    payload: usize,
    command_id: usize,
    causation_id: usize,
    correlation_id: usize,
    headers: usize,
    recorded_at: usize,
    tags: usize,
}

impl Columns {
    fn of(row: &SqliteRow) -> Result<Self, sqlx::Error> {
        let at = |name: &str| row.try_column(name).map(sqlx::Column::ordinal);
        Ok(Self {
            position: at("position")?,
            event_id: at("event_id")?,
            stream_id: at("stream_id")?,
            version: at("version")?,
            event_type: at("event_type")?,
            schema_version: at("schema_version")?,
            payload: at("payload")?,
            command_id: at("command_id")?,
            causation_id: at("causation_id")?,
            correlation_id: at("correlation_id")?,
            headers: at("headers")?,
            recorded_at: at("recorded_at")?,
            tags: at("tags")?,
        })
    }
}

/// Decodes the event rows of one result (selected with [`EVENT_COLUMNS`]). Columns are found by
/// name once, for the first row; text is decoded in place rather than copied; the event type
/// and stream id of the row before are shared when they repeat (a page often holds runs of one
/// stream and one type), and the usual empty headers and tags skip the JSON parser (events
/// without tags share one empty list; a run of events with the same tags shares one list).
#[derive(Default)]
pub(crate) struct EventDecoder {
    columns: Option<Columns>,
    names: RowNames,
    no_tags: Option<Arc<[Tag]>>,
    /// The stored tags of the last row with tags, and their list, shared while they repeat.
    last_tags: Option<(String, Arc<[Tag]>)>,
}

impl EventDecoder {
    /// Runs `query` on `pool` and decodes each row as it arrives from sqlx's SQLite thread, so
    /// that decoding overlaps SQLite stepping through the rest of the page.
    pub(crate) async fn fetch<'q>(
        query: Query<'q, Sqlite, SqliteArguments<'q>>,
        pool: &SqlitePool,
        max_count: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let mut rows = query.fetch(pool);
        let mut decoder = Self::default();
        let mut events = Vec::with_capacity(max_count.min(1024));
        while let Some(row) = rows.try_next().await.map_err(to_store_error)? {
            events.push(decoder.decode(&row)?);
        }
        Ok(events)
    }

    /// Decodes one event row.
    pub(crate) fn decode(&mut self, row: &SqliteRow) -> Result<RecordedEvent, StoreError> {
        let corrupt = |error: sqlx::Error| StoreError::Corrupt(format!("cannot decode an event row: {error}"));
        let columns = match self.columns {
            Some(columns) => columns,
            None => *self.columns.insert(Columns::of(row).map_err(corrupt)?),
        };
        let raw = RawEvent {
            position: row.try_get(columns.position).map_err(corrupt)?,
            event_id: row.try_get(columns.event_id).map_err(corrupt)?,
            stream_id: row.try_get(columns.stream_id).map_err(corrupt)?,
            version: row.try_get(columns.version).map_err(corrupt)?,
            event_type: row.try_get(columns.event_type).map_err(corrupt)?,
            schema_version: row.try_get(columns.schema_version).map_err(corrupt)?,
            payload: row.try_get(columns.payload).map_err(corrupt)?,
            command_id: row.try_get(columns.command_id).map_err(corrupt)?,
            causation_id: row.try_get(columns.causation_id).map_err(corrupt)?,
            correlation_id: row.try_get(columns.correlation_id).map_err(corrupt)?,
            headers: row.try_get(columns.headers).map_err(corrupt)?,
            recorded_at: row.try_get(columns.recorded_at).map_err(corrupt)?,
            tags: row.try_get(columns.tags).map_err(corrupt)?,
        };
        self.assemble(raw)
    }

    /// Builds the event from one row's columns, however they were read.
    pub(crate) fn assemble(&mut self, raw: RawEvent<'_>) -> Result<RecordedEvent, StoreError> {
        let stream_id = self.names.stream_id(raw.stream_id)?;
        let event_type = self.names.event_type(raw.event_type);
        let tags = match &self.last_tags {
            _ if raw.tags == "[]" => Arc::clone(self.no_tags.get_or_insert_with(|| Arc::from(Vec::new()))),
            Some((text, parsed)) if text == raw.tags => Arc::clone(parsed),
            _ => {
                let parsed: Arc<[Tag]> = Arc::from(parse_tags(raw.tags)?);
                self.last_tags = Some((raw.tags.to_owned(), Arc::clone(&parsed)));
                parsed
            }
        };
        let schema_version = raw.schema_version;
        Ok(RecordedEvent {
            event_id: EventId(raw.event_id),
            stream_id,
            version: Version(to_u64(raw.version, "version")?),
            position: Position(to_u64(raw.position, "position")?),
            recorded_at: Timestamp(raw.recorded_at),
            event_type,
            schema_version: u32::try_from(schema_version)
                .map_err(|_| StoreError::Corrupt(format!("schema version {schema_version} out of range")))?,
            payload: Payload::from_json_text(raw.payload),
            metadata: Arc::new(Metadata {
                command_id: raw.command_id.map(CommandId),
                causation_id: raw.causation_id.map(CausationId),
                correlation_id: raw.correlation_id.map(CorrelationId),
                headers: parse_headers(raw.headers)?,
            }),
            tags,
        })
    }
}

/// One event row's columns as read, text borrowed from the row.
pub(crate) struct RawEvent<'r> {
    pub(crate) position: i64,
    pub(crate) event_id: Uuid,
    pub(crate) stream_id: &'r str,
    pub(crate) version: i64,
    pub(crate) event_type: &'r str,
    pub(crate) schema_version: i64,
    pub(crate) payload: &'r str,
    pub(crate) command_id: Option<Uuid>,
    pub(crate) causation_id: Option<Uuid>,
    pub(crate) correlation_id: Option<Uuid>,
    pub(crate) headers: &'r str,
    pub(crate) recorded_at: i64,
    pub(crate) tags: &'r str,
}

/// Decodes the four bounds of a stored command's outcome (`writer::FIND_COMMAND_SQL`'s row).
pub(crate) fn command_result(row: &SqliteRow) -> Result<AppendResult, StoreError> {
    let column = |name: &str| -> Result<i64, StoreError> {
        row.try_get::<i64, _>(name)
            .map_err(|error| StoreError::Corrupt(format!("cannot decode a command row: {error}")))
    };
    append_result([
        column("first_version")?,
        column("last_version")?,
        column("first_position")?,
        column("last_position")?,
    ])
}

/// A stored command's result from its first and last version and first and last position.
pub(crate) fn append_result(
    [first_version, last_version, first_position, last_position]: [i64; 4],
) -> Result<AppendResult, StoreError> {
    Ok(AppendResult {
        first_version: Version(to_u64(first_version, "version")?),
        last_version: Version(to_u64(last_version, "version")?),
        first_position: Position(to_u64(first_position, "position")?),
        last_position: Position(to_u64(last_position, "position")?),
    })
}
