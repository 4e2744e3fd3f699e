//! The crate's own error type, for setting a store up, and the mapping of database errors to
//! [`StoreError`] for everything else.

use std::sync::Arc;

use cqrs_core::StoreError;

/// Errors while connecting a [`PgEventStore`](crate::PgEventStore) or migrating its schema.
/// Errors of the store's operations themselves are [`StoreError`]s.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PgStoreError {
    /// The database URL could not be parsed. Fix the configuration.
    #[error("invalid database url: {0}")]
    InvalidUrl(#[source] sqlx::Error),
    /// The server could not be reached or refused the connection. Retry later or check the
    /// server and credentials.
    #[error("cannot connect to the database: {0}")]
    Connect(#[source] sqlx::Error),
    /// Applying the schema migrations failed. Check the server log; a migration that was
    /// changed after being applied also ends here.
    #[error("schema migration failed: {0}")]
    Migrate(#[source] sqlx::migrate::MigrateError),
}

/// SQLSTATE codes after which a whole transaction was rolled back and may simply be retried.
const RETRYABLE_CODES: [&str; 2] = [
    "40001", // serialization_failure
    "40P01", // deadlock_detected
];

/// Whether the transaction failed as a whole and retrying it cannot duplicate anything.
pub(crate) fn is_retryable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => db.code().is_some_and(|code| RETRYABLE_CODES.contains(&code.as_ref())),
        _ => false,
    }
}

/// Whether the error is the unique constraint on event ids (another writer stored the same id
/// concurrently).
pub(crate) fn is_event_id_violation(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => db.is_unique_violation() && db.constraint() == Some("cqrs_events_event_id_key"),
        _ => false,
    }
}

/// SQLSTATE classes after which a statement's fate is unknown or the session is gone:
/// connection exception, insufficient resources, operator intervention (e.g. the backend was
/// terminated), system error, internal error.
const AMBIGUOUS_CLASSES: [&str; 5] = ["08", "53", "57", "58", "XX"];

/// Whether the server refused the statement itself (so its implicit transaction was rolled
/// back and nothing was written), as opposed to a lost connection or a dying server.
pub(crate) fn is_statement_error(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => {
            db.code().is_some_and(|code| !AMBIGUOUS_CLASSES.iter().any(|class| code.starts_with(class)))
        }
        _ => false,
    }
}

/// Whether the server refused the data (SQLSTATE class 22: a payload jsonb cannot hold, a
/// number out of range...): the append is invalid and retrying will not help.
pub(crate) fn is_data_error(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => db.code().is_some_and(|code| code.starts_with("22")),
        _ => false,
    }
}

/// Maps a database error of a read or a checkpoint call. Decoding problems are corruption;
/// everything else (connection lost, server restarting, pool exhausted) is unavailability.
pub(crate) fn to_store_error(error: sqlx::Error) -> StoreError {
    match error {
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) | sqlx::Error::ColumnNotFound(_) => {
            StoreError::Corrupt(error.to_string())
        }
        sqlx::Error::PoolClosed => StoreError::Closed,
        other => StoreError::Unavailable(Box::new(other)),
    }
}

/// The same failure, reported to every caller of a failed batch.
pub(crate) fn shared_unavailable(error: &Arc<sqlx::Error>) -> StoreError {
    StoreError::Unavailable(Box::new(Arc::clone(error)))
}
