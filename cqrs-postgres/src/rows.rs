//! Conversions between database rows and `cqrs-core` types, checked at the SQL boundary.

use std::collections::HashMap;
use std::sync::Arc;

use cqrs_core::store::RowNames;
use cqrs_core::{
    AppendResult, CausationId, CommandId, CorrelationId, EventId, Metadata, Payload, Position, RecordedEvent,
    StoreError, Tag, Timestamp, Version,
};
use futures_util::TryStreamExt;
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgArguments, PgPool, PgRow, PgTypeInfo, PgValueFormat, PgValueRef, Postgres};
use sqlx::query::Query;
use sqlx::types::Json;
use sqlx::{Row, TypeInfo, ValueRef};
use uuid::Uuid;

use crate::error::to_store_error;

/// The columns of an event, in the order `cqrs_read_page` returns them (the decoder finds them
/// by name once per result, so the order only has to be the same within one result).
pub(crate) const EVENT_COLUMNS: &str = "position, event_id, stream_id, version, event_type, schema_version, \
     payload, command_id, causation_id, correlation_id, headers, recorded_at, tags";

/// A stored bigint that must be a non-negative `u64`.
pub(crate) fn to_u64(value: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| StoreError::Corrupt(format!("negative {what} {value} in the store")))
}

/// A `u64` bound for SQL, saturated at `i64::MAX` (no stored number is larger).
pub(crate) fn to_i64_saturating(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01 UTC).
const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// When an event was recorded, in Unix microseconds: decoded from a `timestamptz` column (its
/// binary form is microseconds since 2000-01-01 UTC) or from a `bigint` of Unix microseconds
/// (what the SQL read functions return). Saves the server a `numeric` computation per row.
struct RecordedAtMicros(i64);

impl sqlx::Type<Postgres> for RecordedAtMicros {
    fn type_info() -> PgTypeInfo {
        PgTypeInfo::with_name("timestamptz")
    }

    fn compatible(ty: &PgTypeInfo) -> bool {
        matches!(ty.name(), "TIMESTAMPTZ" | "INT8")
    }
}

impl<'r> sqlx::Decode<'r, Postgres> for RecordedAtMicros {
    fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
        let timestamptz = value.type_info().name() == "TIMESTAMPTZ";
        let micros = match value.format() {
            PgValueFormat::Binary => {
                let bytes: [u8; 8] = value.as_bytes()?.try_into().map_err(|_| "a timestamp of other than 8 bytes")?;
                i64::from_be_bytes(bytes)
            }
            PgValueFormat::Text if !timestamptz => value.as_str()?.parse()?,
            PgValueFormat::Text => return Err("a timestamptz in text form".into()),
        };
        if timestamptz {
            micros.checked_add(PG_EPOCH_UNIX_MICROS).map(Self).ok_or_else(|| "an infinite timestamp".into())
        } else {
            Ok(Self(micros))
        }
    }
}

/// A `jsonb` (or `json`/`text`) column's JSON text, taken as the server sent it: not parsed here,
/// so an event's payload is parsed once, when it is decoded into its type (see
/// [`cqrs_core::Payload`]). `jsonb`'s binary form is a version byte (1) and the text.
struct JsonText(Arc<str>);

impl sqlx::Type<Postgres> for JsonText {
    fn type_info() -> PgTypeInfo {
        PgTypeInfo::with_name("jsonb")
    }

    fn compatible(ty: &PgTypeInfo) -> bool {
        matches!(ty.name(), "JSONB" | "JSON" | "TEXT")
    }
}

impl<'r> sqlx::Decode<'r, Postgres> for JsonText {
    fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
        let jsonb = value.type_info().name() == "JSONB";
        let bytes = value.as_bytes()?;
        let text = match (value.format(), bytes.split_first()) {
            (PgValueFormat::Binary, Some((&1, text))) if jsonb => text,
            (PgValueFormat::Binary, _) if jsonb => return Err("a jsonb value of an unknown binary version".into()),
            _ => bytes,
        };
        Ok(Self(Arc::from(std::str::from_utf8(text)?)))
    }
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
    fn of(row: &PgRow) -> Result<Self, sqlx::Error> {
        let at = |name: &str| row.try_column(name).map(sqlx::Column::ordinal);
        let recorded_at = match at("recorded_at") {
            Ok(index) => index,
            Err(_) => at("recorded_at_micros")?,
        };
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
            recorded_at,
            tags: at("tags")?,
        })
    }
}

/// Decodes the event rows of one result. Columns are found by name once, for the first row;
/// the event type and stream id of the row before are shared when they repeat (a page often
/// holds runs of one stream and one type), and the usual empty headers skip the JSON parser.
#[derive(Default)]
pub(crate) struct EventDecoder {
    columns: Option<Columns>,
    names: RowNames,
}

impl EventDecoder {
    /// Runs `query` and decodes each row as it arrives, so that decoding overlaps the server
    /// still producing and sending the rest (a catch-up page is CPU work on both sides).
    pub(crate) async fn fetch(
        query: Query<'_, Postgres, PgArguments>,
        pool: &PgPool,
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
    pub(crate) fn decode(&mut self, row: &PgRow) -> Result<RecordedEvent, StoreError> {
        let corrupt = |error: sqlx::Error| StoreError::Corrupt(format!("cannot decode an event row: {error}"));
        let columns = match self.columns {
            Some(columns) => columns,
            None => *self.columns.insert(Columns::of(row).map_err(corrupt)?),
        };
        let position: i64 = row.try_get(columns.position).map_err(corrupt)?;
        let version: i64 = row.try_get(columns.version).map_err(corrupt)?;
        let schema_version: i32 = row.try_get(columns.schema_version).map_err(corrupt)?;
        let payload: JsonText = row.try_get(columns.payload).map_err(corrupt)?;
        let command_id: Option<Uuid> = row.try_get(columns.command_id).map_err(corrupt)?;
        let causation_id: Option<Uuid> = row.try_get(columns.causation_id).map_err(corrupt)?;
        let correlation_id: Option<Uuid> = row.try_get(columns.correlation_id).map_err(corrupt)?;
        let event_id: Uuid = row.try_get(columns.event_id).map_err(corrupt)?;
        let recorded_at: RecordedAtMicros = row.try_get(columns.recorded_at).map_err(corrupt)?;
        let stream_id: &str = row.try_get(columns.stream_id).map_err(corrupt)?;
        let stream_id = self.names.stream_id(stream_id)?;
        let event_type: &str = row.try_get(columns.event_type).map_err(corrupt)?;
        let event_type = self.names.event_type(event_type);
        let tags: Vec<String> = row.try_get(columns.tags).map_err(corrupt)?;
        let tags = tags
            .iter()
            .map(|tag| Tag::parse(tag).map_err(|error| StoreError::Corrupt(format!("stored tag {tag:?}: {error}"))))
            .collect::<Result<Arc<[Tag]>, StoreError>>()?;
        Ok(RecordedEvent {
            event_id: EventId(event_id),
            stream_id,
            version: Version(to_u64(version, "version")?),
            position: Position(to_u64(position, "position")?),
            recorded_at: Timestamp(recorded_at.0),
            event_type,
            schema_version: u32::try_from(schema_version)
                .map_err(|_| StoreError::Corrupt(format!("negative schema version {schema_version}")))?,
            payload: Payload::from_json_text(payload.0),
            metadata: Arc::new(Metadata {
                command_id: command_id.map(CommandId),
                causation_id: causation_id.map(CausationId),
                correlation_id: correlation_id.map(CorrelationId),
                headers: headers(row, columns.headers).map_err(corrupt)?,
            }),
            tags,
        })
    }
}

/// An event's headers: `{}` (by far the most common) without the JSON parser.
fn headers(row: &PgRow, index: usize) -> Result<HashMap<String, String>, sqlx::Error> {
    let raw = row.try_get_raw(index)?;
    // jsonb in binary form is a version byte (1) and then the text.
    if raw.format() == PgValueFormat::Binary && matches!(raw.as_bytes(), Ok(b"\x01{}")) {
        return Ok(HashMap::new());
    }
    let headers: Json<HashMap<String, String>> = row.try_get(index)?;
    Ok(headers.0)
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
