//! Conversions between database rows and `cqrs-core` types, checked at the SQL boundary.

use std::collections::HashMap;
use std::sync::Arc;

use cqrs_core::{
    AppendResult, CausationId, CommandId, CorrelationId, EventId, Metadata, Position, RecordedEvent, StoreError,
    StreamId, Timestamp, Version,
};
use sqlx::postgres::PgRow;
use sqlx::types::Json;
use sqlx::Row;
use uuid::Uuid;

/// The columns of an event, in the order `cqrs_read_all` returns them.
pub(crate) const EVENT_COLUMNS: &str = "position, event_id, stream_id, version, event_type, schema_version, \
     payload, command_id, causation_id, correlation_id, headers, \
     (extract(epoch FROM recorded_at) * 1000000)::bigint AS recorded_at_micros";

/// A stored bigint that must be a non-negative `u64`.
pub(crate) fn to_u64(value: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| StoreError::Corrupt(format!("negative {what} {value} in the store")))
}

/// A `u64` bound for SQL, saturated at `i64::MAX` (no stored number is larger).
pub(crate) fn to_i64_saturating(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Decodes one event row.
pub(crate) fn recorded_event(row: &PgRow) -> Result<RecordedEvent, StoreError> {
    let decode = |error: sqlx::Error| StoreError::Corrupt(format!("cannot decode an event row: {error}"));
    let position: i64 = row.try_get("position").map_err(decode)?;
    let stream_id: String = row.try_get("stream_id").map_err(decode)?;
    let version: i64 = row.try_get("version").map_err(decode)?;
    let schema_version: i32 = row.try_get("schema_version").map_err(decode)?;
    let payload: Json<serde_json::Value> = row.try_get("payload").map_err(decode)?;
    let headers: Json<HashMap<String, String>> = row.try_get("headers").map_err(decode)?;
    let command_id: Option<Uuid> = row.try_get("command_id").map_err(decode)?;
    let causation_id: Option<Uuid> = row.try_get("causation_id").map_err(decode)?;
    let correlation_id: Option<Uuid> = row.try_get("correlation_id").map_err(decode)?;
    let event_type: String = row.try_get("event_type").map_err(decode)?;
    let event_id: Uuid = row.try_get("event_id").map_err(decode)?;
    let recorded_at: i64 = row.try_get("recorded_at_micros").map_err(decode)?;
    Ok(RecordedEvent {
        event_id: EventId(event_id),
        stream_id: StreamId::new(&stream_id)
            .map_err(|error| StoreError::Corrupt(format!("stored stream id {stream_id:?}: {error}")))?,
        version: Version(to_u64(version, "version")?),
        position: Position(to_u64(position, "position")?),
        recorded_at: Timestamp(recorded_at),
        event_type: Arc::from(event_type),
        schema_version: u32::try_from(schema_version)
            .map_err(|_| StoreError::Corrupt(format!("negative schema version {schema_version}")))?,
        payload: Arc::new(payload.0),
        metadata: Arc::new(Metadata {
            command_id: command_id.map(CommandId),
            causation_id: causation_id.map(CausationId),
            correlation_id: correlation_id.map(CorrelationId),
            headers: headers.0,
        }),
    })
}

/// Builds an [`AppendResult`] from the four stored bounds.
pub(crate) fn append_result(
    first_version: i64,
    last_version: i64,
    first_position: i64,
    last_position: i64,
) -> Result<AppendResult, StoreError> {
    Ok(AppendResult {
        first_version: Version(to_u64(first_version, "version")?),
        last_version: Version(to_u64(last_version, "version")?),
        first_position: Position(to_u64(first_position, "position")?),
        last_position: Position(to_u64(last_position, "position")?),
    })
}
