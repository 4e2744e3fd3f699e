//! The crate's own error type, for opening a store, and the mapping of SQLite errors to
//! [`StoreError`] for everything else.

use std::path::PathBuf;

use cqrs_core::StoreError;

/// Errors while opening a [`SqliteEventStore`](crate::SqliteEventStore) or migrating its
/// schema. Errors of the store's operations themselves are [`StoreError`]s.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SqliteStoreError {
    /// The `sqlite://` URL could not be parsed. Fix the configuration.
    #[error("invalid sqlite url: {0}")]
    InvalidUrl(#[source] sqlx::Error),
    /// The URL names an in-memory database, which is not durable and which the writer and the
    /// readers would not share. Use [`cqrs_memory`](https://docs.rs/cqrs-memory) for that.
    #[error("an in-memory sqlite database cannot back an event store; give a file path")]
    InMemory,
    /// The file exists but is not a SQLite database (or is encrypted, or its header is
    /// damaged). Check the path; nothing was written to the file.
    #[error("{path} is not a sqlite database: {source}")]
    NotADatabase {
        /// The file.
        path: PathBuf,
        /// SQLite's report.
        #[source]
        source: sqlx::Error,
    },
    /// The file could not be opened or created (missing directory, no permission, read-only
    /// file system), or the first statements on it failed.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// SQLite's report.
        #[source]
        source: sqlx::Error,
    },
    /// The database holds an unknown or modified schema (for example migrations of a newer
    /// version of this crate, or a migration changed after it was applied), or applying a
    /// migration failed.
    #[error("schema migration failed: {0}")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    /// The file refused WAL mode (SQLite reported another journal mode), for example because
    /// it lives on a file system without shared memory support.
    #[error("{path} cannot use WAL mode (journal mode is {mode:?})")]
    NoWal {
        /// The file.
        path: PathBuf,
        /// The journal mode SQLite kept.
        mode: String,
    },
}

/// `SQLITE_NOTADB`: the file is not a database.
const SQLITE_NOTADB: i64 = 26;

/// The primary result code (low byte) of a SQLite error, if it is one.
pub(crate) fn primary_code(error: &sqlx::Error) -> Option<i64> {
    match error {
        sqlx::Error::Database(db) => db.code().and_then(|code| code.parse::<i64>().ok()).map(|code| code & 0xff),
        _ => None,
    }
}

/// Maps an error of the first statements on a file to the open error that explains it.
pub(crate) fn open_error(path: PathBuf, source: sqlx::Error) -> SqliteStoreError {
    if primary_code(&source) == Some(SQLITE_NOTADB) {
        SqliteStoreError::NotADatabase { path, source }
    } else {
        SqliteStoreError::Open { path, source }
    }
}

/// Maps a database error of a read or a checkpoint call. Decoding problems and a damaged
/// file are corruption; everything else (busy, I/O error, pool exhausted) is unavailability.
pub(crate) fn to_store_error(error: sqlx::Error) -> StoreError {
    /// `SQLITE_CORRUPT`.
    const SQLITE_CORRUPT: i64 = 11;
    match error {
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) | sqlx::Error::ColumnNotFound(_) => {
            StoreError::Corrupt(error.to_string())
        }
        ref other if matches!(primary_code(other), Some(SQLITE_CORRUPT | SQLITE_NOTADB)) => {
            StoreError::Corrupt(error.to_string())
        }
        sqlx::Error::PoolClosed => StoreError::Closed,
        other => StoreError::Unavailable(Box::new(other)),
    }
}
