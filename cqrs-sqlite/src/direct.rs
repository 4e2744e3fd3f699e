//! The writer's direct access to its connection: SQLite's own API (through rusqlite) on the
//! writer's thread, with no hop to sqlx's worker thread and back per statement.
//!
//! The write connection is opened by sqlx, which owns it (ops and transactional projections
//! take it as a `SqliteConnection`). While the writer holds sqlx's lock on the handle
//! ([`SqliteConnection::lock_handle`](sqlx::SqliteConnection::lock_handle)), sqlx's worker
//! thread is parked and the writer's thread alone calls SQLite on it, through a rusqlite
//! connection made from the same handle. That connection never closes the handle (sqlx does)
//! and keeps its own prepared statements, used only under the lock.

use std::ptr::NonNull;

use rusqlite::types::{ToSqlOutput, Value, ValueRef};
use rusqlite::{params_from_iter, Connection, ErrorCode};

/// How many statements the writer keeps prepared: the batch's statements come in a few sizes
/// each (see the writer's `AT_ONCE_CACHED_ROWS`).
const STATEMENT_CACHE: usize = 128;

/// The writer's SQLite calls on its connection's handle. Use it only while holding sqlx's lock
/// on that handle, and drop it (which finalizes its statements) before the connection closes.
pub(crate) struct Direct {
    connection: Connection,
}

impl std::fmt::Debug for Direct {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Direct").finish_non_exhaustive()
    }
}

impl Direct {
    /// Wraps the handle of a connection sqlx opened.
    ///
    /// # Safety
    /// `handle` must stay open for as long as the `Direct` lives, and the `Direct` must be used
    /// (and dropped) only while no other thread uses the handle.
    #[allow(unsafe_code)]
    pub(crate) unsafe fn new(handle: NonNull<rusqlite::ffi::sqlite3>) -> rusqlite::Result<Self> {
        // SAFETY: the caller keeps the handle open and unused by other threads meanwhile; the
        // connection made never closes it (`from_handle`, not `from_handle_owned`).
        let connection = unsafe { Connection::from_handle(handle.as_ptr()) }?;
        connection.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        Ok(Self { connection })
    }

    /// Runs a statement of no parameters and no rows (`BEGIN IMMEDIATE`, `COMMIT`, savepoints).
    pub(crate) fn run(&self, sql: &str) -> rusqlite::Result<()> {
        self.connection.prepare_cached(sql)?.raw_execute().map(|_| ())
    }

    /// Runs a statement with `params`; its rows changed. `cached`: keep it prepared.
    pub(crate) fn execute(&self, sql: &str, cached: bool, params: &Params<'_>) -> rusqlite::Result<usize> {
        let values = params_from_iter(params.values.iter());
        if cached {
            self.connection.prepare_cached(sql)?.execute(values)
        } else {
            self.connection.prepare(sql)?.execute(values)
        }
    }

    /// Runs a query with `params`, mapping each row with `row`.
    pub(crate) fn query<T>(
        &self,
        sql: &str,
        cached: bool,
        params: &Params<'_>,
        mut row: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<Vec<T>> {
        let values = params_from_iter(params.values.iter());
        let collect = |statement: &mut rusqlite::Statement<'_>| -> rusqlite::Result<Vec<T>> {
            let mut rows = statement.query(values)?;
            let mut found = Vec::new();
            while let Some(next) = rows.next()? {
                found.push(row(next)?);
            }
            Ok(found)
        };
        if cached {
            collect(&mut *self.connection.prepare_cached(sql)?)
        } else {
            collect(&mut self.connection.prepare(sql)?)
        }
    }
}

/// A statement's parameters, in order (anonymous `?`), borrowed where they can be.
#[derive(Default)]
pub(crate) struct Params<'a> {
    values: Vec<ToSqlOutput<'a>>,
}

impl<'a> Params<'a> {
    /// Room for `count` parameters.
    pub(crate) fn with_capacity(count: usize) -> Self {
        Self { values: Vec::with_capacity(count) }
    }

    pub(crate) fn text(&mut self, value: &'a str) {
        self.values.push(ToSqlOutput::Borrowed(ValueRef::Text(value.as_bytes())));
    }

    pub(crate) fn owned_text(&mut self, value: String) {
        self.values.push(ToSqlOutput::Owned(Value::Text(value)));
    }

    pub(crate) fn int(&mut self, value: i64) {
        self.values.push(ToSqlOutput::Owned(Value::Integer(value)));
    }

    /// A UUID as its 16 bytes, as sqlx stores them.
    pub(crate) fn uuid(&mut self, value: Option<&'a uuid::Uuid>) {
        self.values.push(match value {
            Some(id) => ToSqlOutput::Borrowed(ValueRef::Blob(id.as_bytes())),
            None => ToSqlOutput::Owned(Value::Null),
        });
    }
}

/// A UUID column (16 bytes, as sqlx stores them), or NULL.
pub(crate) fn uuid_column(row: &rusqlite::Row<'_>, index: usize) -> rusqlite::Result<Option<uuid::Uuid>> {
    match row.get_ref(index)? {
        ValueRef::Null => Ok(None),
        ValueRef::Blob(bytes) => uuid::Uuid::from_slice(bytes).map(Some).map_err(|error| {
            rusqlite::Error::FromSqlConversionFailure(index, rusqlite::types::Type::Blob, Box::new(error))
        }),
        other => Err(rusqlite::Error::InvalidColumnType(index, "uuid".to_owned(), other.data_type())),
    }
}

/// Whether the error is a uniqueness violation (of an event id, in the writer).
pub(crate) fn is_unique_violation(error: &rusqlite::Error) -> bool {
    /// `SQLITE_CONSTRAINT_PRIMARYKEY`, `SQLITE_CONSTRAINT_UNIQUE`.
    const UNIQUE: [i32; 2] = [1555, 2067];
    matches!(error, rusqlite::Error::SqliteFailure(failure, _) if UNIQUE.contains(&failure.extended_code))
}

/// Whether SQLite refused one statement's data (a constraint, a value too big or out of range,
/// a value that could not be encoded) without ending the transaction: the append that sent it
/// is invalid, the others in its batch are not affected.
pub(crate) fn is_refused_data(error: &rusqlite::Error) -> bool {
    match error {
        rusqlite::Error::ToSqlConversionFailure(_) => true,
        rusqlite::Error::SqliteFailure(failure, _) => matches!(
            failure.code,
            ErrorCode::TooBig
                | ErrorCode::ConstraintViolation
                | ErrorCode::TypeMismatch
                | ErrorCode::ParameterOutOfRange
        ),
        _ => false,
    }
}
