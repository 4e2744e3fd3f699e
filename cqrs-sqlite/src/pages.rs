//! Pages of events (`read_all`, `read_stream`) through SQLite's C API (rusqlite), on
//! connections of their own.
//!
//! sqlx's SQLite driver steps each statement on a worker thread and sends every row back over
//! a channel, copying each value: for a page of 512 events that is 512 hops and thousands of
//! allocations, most of a replay's time. Here a whole page is read and decoded on a blocking
//! thread in one go, from a cached prepared statement, text borrowed from SQLite's buffers.
//!
//! Each read is one statement, so it sees one committed snapshot: a prefix of the log, since
//! positions are assigned under the write lock in commit order (see `writer.rs`). The
//! connections are `query_only`, and as many as the read pool's (`read_connections`): a read
//! waits for one up to `acquire_timeout`, so a burst of reads cannot open files without bound.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use cqrs_core::{Position, RecordedEvent, StoreError, StreamId, Version};
use rusqlite::{Connection, OpenFlags};
use tokio::sync::Semaphore;
use uuid::Uuid;

use crate::rows::{limit, to_i64_saturating, EventDecoder, RawEvent, EVENT_COLUMNS};
use crate::SqliteStoreConfig;

/// Which page to read.
pub(crate) enum Page {
    /// The log's events after a position.
    All(Position),
    /// One stream's events from a version.
    Stream(StreamId, Version),
}

/// Connections for pages of events.
pub(crate) struct Pages {
    path: PathBuf,
    busy_timeout: Duration,
    /// SQLite's `mmap_size` for these connections (see `SqliteStoreConfig::read_mmap_size`).
    mmap_size: i64,
    /// One permit per connection that may be open: reads beyond them wait.
    permits: Arc<Semaphore>,
    acquire_timeout: Duration,
    idle: Mutex<Vec<Connection>>,
    all_sql: String,
    stream_sql: String,
}

impl Pages {
    pub(crate) fn new(path: PathBuf, config: &SqliteStoreConfig) -> Self {
        let connections = usize::try_from(config.read_connections).unwrap_or(1);
        let (busy_timeout, acquire_timeout) = (config.busy_timeout, config.acquire_timeout);
        let mmap_size = i64::try_from(config.read_mmap_size).unwrap_or(i64::MAX);
        let all_sql = format!("SELECT {EVENT_COLUMNS} FROM cqrs_events WHERE position > ?1 ORDER BY position LIMIT ?2");
        let stream_sql = format!(
            "SELECT {EVENT_COLUMNS} FROM cqrs_events WHERE stream_id = ?1 AND version >= ?2 ORDER BY version LIMIT ?3"
        );
        let permits = Arc::new(Semaphore::new(connections.max(1)));
        Self {
            path,
            busy_timeout,
            mmap_size,
            permits,
            acquire_timeout,
            idle: Mutex::new(Vec::new()),
            all_sql,
            stream_sql,
        }
    }

    /// At most `max_count` events of `page`, read on a blocking thread.
    pub(crate) async fn read(self: &Arc<Self>, page: Page, max_count: usize) -> Result<Vec<RecordedEvent>, StoreError> {
        let permit = tokio::time::timeout(self.acquire_timeout, Arc::clone(&self.permits).acquire_owned())
            .await
            .map_err(|_| {
                StoreError::Unavailable(format!("no read connection free within {:?}", self.acquire_timeout).into())
            })?
            .map_err(|error| StoreError::Unavailable(Box::new(error)))?;
        let pages = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let events = pages.read_now(&page, max_count);
            drop(permit);
            events
        })
        .await
        .map_err(|error| StoreError::Unavailable(Box::new(error)))?
    }

    fn read_now(&self, page: &Page, max_count: usize) -> Result<Vec<RecordedEvent>, StoreError> {
        let connection = match self.idle.lock().unwrap_or_else(PoisonError::into_inner).pop() {
            Some(connection) => connection,
            None => self.open().map_err(unavailable)?,
        };
        let events = self.read_on(&connection, page, max_count);
        // A connection whose read failed is dropped, not reused. (At most one per permit.)
        if events.is_ok() {
            self.idle.lock().unwrap_or_else(PoisonError::into_inner).push(connection);
        }
        events
    }

    fn open(&self) -> rusqlite::Result<Connection> {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let connection = Connection::open_with_flags(&self.path, flags)?;
        connection.busy_timeout(self.busy_timeout)?;
        connection.pragma_update(None, "query_only", true)?;
        connection.pragma_update(None, "mmap_size", self.mmap_size)?;
        connection.set_prepared_statement_cache_capacity(4);
        Ok(connection)
    }

    fn read_on(
        &self,
        connection: &Connection,
        page: &Page,
        max_count: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let max = limit(max_count);
        let (sql, all_after, stream) = match page {
            Page::All(after) => (&self.all_sql, to_i64_saturating(after.0), None),
            Page::Stream(stream_id, from) => (&self.stream_sql, to_i64_saturating(from.0), Some(stream_id.as_str())),
        };
        let mut statement = connection.prepare_cached(sql).map_err(unavailable)?;
        let mut rows = match stream {
            None => statement.query((all_after, max)),
            Some(stream_id) => statement.query((stream_id, all_after, max)),
        }
        .map_err(unavailable)?;
        let mut decoder = EventDecoder::default();
        let mut events = Vec::with_capacity(max_count.min(1024));
        while let Some(row) = rows.next().map_err(unavailable)? {
            events.push(decoder.assemble(raw(row)?)?);
        }
        Ok(events)
    }
}

/// One row's columns, in [`EVENT_COLUMNS`] order.
fn raw<'r>(row: &'r rusqlite::Row<'r>) -> Result<RawEvent<'r>, StoreError> {
    let corrupt = |error: rusqlite::Error| StoreError::Corrupt(format!("cannot decode an event row: {error}"));
    let text = |index: usize| -> Result<&'r str, StoreError> {
        row.get_ref(index).and_then(|v| Ok(v.as_str()?)).map_err(corrupt)
    };
    let integer =
        |index: usize| -> Result<i64, StoreError> { row.get_ref(index).and_then(|v| Ok(v.as_i64()?)).map_err(corrupt) };
    let uuid = |index: usize| -> Result<Option<Uuid>, StoreError> {
        match row.get_ref(index).map_err(corrupt)?.as_blob_or_null().map_err(|e| corrupt(e.into()))? {
            None => Ok(None),
            Some(bytes) => Uuid::from_slice(bytes)
                .map(Some)
                .map_err(|error| StoreError::Corrupt(format!("cannot decode an event row: a stored id: {error}"))),
        }
    };
    Ok(RawEvent {
        position: integer(0)?,
        event_id: uuid(1)?.ok_or_else(|| StoreError::Corrupt("cannot decode an event row: no event id".into()))?,
        stream_id: text(2)?,
        version: integer(3)?,
        event_type: text(4)?,
        schema_version: integer(5)?,
        payload: text(6)?,
        command_id: uuid(7)?,
        causation_id: uuid(8)?,
        correlation_id: uuid(9)?,
        headers: text(10)?,
        recorded_at: integer(11)?,
        tags: text(12)?,
    })
}

/// A failed read: the file is busy, gone or unreadable now.
fn unavailable(error: rusqlite::Error) -> StoreError {
    match error.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase) => {
            StoreError::Corrupt(error.to_string())
        }
        _ => StoreError::Unavailable(Box::new(error)),
    }
}
