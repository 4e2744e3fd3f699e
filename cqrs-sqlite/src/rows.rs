//! Conversions between SQLite rows and `cqrs-core` types, checked at the SQL boundary.
//!
//! SQLite integers are `i64`; ids are 16-byte blobs; payloads, headers and snapshot states
//! are JSON text.

use std::collections::HashMap;
use std::sync::Arc;

use cqrs_core::{
    AppendResult, CausationId, CommandId, CorrelationId, EventId, Metadata, Position, RecordedEvent, StoreError,
    StreamId, Timestamp, Version,
};
use sqlx::sqlite::SqliteRow;
use sqlx::Row;
use uuid::Uuid;

/// The columns of an event row, in the order [`recorded_event`] reads them.
pub(crate) const EVENT_COLUMNS: &str = "position, event_id, stream_id, version, event_type, schema_version, \
     payload, command_id, causation_id, correlation_id, headers, recorded_at";

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

/// Parses stored headers (a JSON object of strings), or reports the row as corrupt.
fn parse_headers(text: &str) -> Result<HashMap<String, String>, StoreError> {
    serde_json::from_str(text)
        .map_err(|error| StoreError::Corrupt(format!("stored headers are not a JSON object of strings: {error}")))
}

/// Decodes one event row (selected with [`EVENT_COLUMNS`]).
pub(crate) fn recorded_event(row: &SqliteRow) -> Result<RecordedEvent, StoreError> {
    let decode = |error: sqlx::Error| StoreError::Corrupt(format!("cannot decode an event row: {error}"));
    let position: i64 = row.try_get("position").map_err(decode)?;
    let event_id: Uuid = row.try_get("event_id").map_err(decode)?;
    let stream_id: String = row.try_get("stream_id").map_err(decode)?;
    let version: i64 = row.try_get("version").map_err(decode)?;
    let event_type: String = row.try_get("event_type").map_err(decode)?;
    let schema_version: i64 = row.try_get("schema_version").map_err(decode)?;
    let payload: String = row.try_get("payload").map_err(decode)?;
    let command_id: Option<Uuid> = row.try_get("command_id").map_err(decode)?;
    let causation_id: Option<Uuid> = row.try_get("causation_id").map_err(decode)?;
    let correlation_id: Option<Uuid> = row.try_get("correlation_id").map_err(decode)?;
    let headers: String = row.try_get("headers").map_err(decode)?;
    let recorded_at: i64 = row.try_get("recorded_at").map_err(decode)?;
    Ok(RecordedEvent {
        event_id: EventId(event_id),
        stream_id: StreamId::new(&stream_id)
            .map_err(|error| StoreError::Corrupt(format!("stored stream id {stream_id:?}: {error}")))?,
        version: Version(to_u64(version, "version")?),
        position: Position(to_u64(position, "position")?),
        recorded_at: Timestamp(recorded_at),
        event_type: Arc::from(event_type),
        schema_version: u32::try_from(schema_version)
            .map_err(|_| StoreError::Corrupt(format!("schema version {schema_version} out of range")))?,
        payload: Arc::new(json(&payload, "payload")?),
        metadata: Arc::new(Metadata {
            command_id: command_id.map(CommandId),
            causation_id: causation_id.map(CausationId),
            correlation_id: correlation_id.map(CorrelationId),
            headers: parse_headers(&headers)?,
        }),
    })
}

/// Decodes the four bounds of a `cqrs_commands` row.
pub(crate) fn command_result(row: &SqliteRow) -> Result<AppendResult, StoreError> {
    let column = |name: &str| -> Result<i64, StoreError> {
        row.try_get::<i64, _>(name)
            .map_err(|error| StoreError::Corrupt(format!("cannot decode a command row: {error}")))
    };
    Ok(AppendResult {
        first_version: Version(to_u64(column("first_version")?, "version")?),
        last_version: Version(to_u64(column("last_version")?, "version")?),
        first_position: Position(to_u64(column("first_position")?, "position")?),
        last_position: Position(to_u64(column("last_position")?, "position")?),
    })
}
