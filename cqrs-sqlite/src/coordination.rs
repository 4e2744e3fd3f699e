//! Claims, parked events, process manager state and scheduled commands
//! (`migrations/20261201000002_handlers.sql`). Writes run on the writer's connection, inside its
//! group-commit transaction (see [`run_op`]); reads use the read pool.
//!
//! Claim times are this process's clock: every process that opens one SQLite file runs on the
//! same machine, so they share it. A claim's check and its write happen under SQLite's write
//! lock, so two processes can never both take one.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use cqrs_core::store::Coordination;
use cqrs_core::{
    Claim, ClaimOutcome, CommandId, EventId, ParkedEvent, ParkedStatus, Position, ProcessInstance, ProcessState,
    Scheduled, SetAsideCommand, StoreError, StreamId, Timestamp,
};
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection, SqlitePool};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::error::to_store_error;
use crate::rows::{json, limit, to_i64_saturating, to_u64};
use crate::writer::{write_op, Answer, OpFuture, WriteRequest};
use crate::SqliteEventStore;

/// Runs `work` on the writer's connection inside its next batch transaction, and returns its
/// result once that transaction has committed (or the batch's failure instead). A database
/// error in `work` fails its batch; an `Ok(Err(..))` is the op's own refusal (a lost claim),
/// answered after the commit like a success.
pub(crate) async fn run_op<T, F>(writes: &mpsc::Sender<WriteRequest>, work: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: for<'c> FnOnce(
            &'c mut SqliteConnection,
        ) -> Pin<Box<dyn Future<Output = Result<Result<T, StoreError>, sqlx::Error>> + Send + 'c>>
        + Send
        + 'static,
{
    let (reply, answer) = oneshot::channel::<Result<T, StoreError>>();
    let slot = Arc::new(Mutex::new(Some(reply)));
    let send = |slot: &Mutex<Option<oneshot::Sender<Result<T, StoreError>>>>, result: Result<T, StoreError>| {
        if let Some(reply) = slot.lock().unwrap_or_else(PoisonError::into_inner).take() {
            // The caller may have gone away; the write happened (or not) anyway.
            let _ = reply.send(result);
        }
    };
    let fail = {
        let slot = Arc::clone(&slot);
        Box::new(move |error: StoreError| send(&slot, Err(error))) as Box<dyn FnOnce(StoreError) + Send>
    };
    let run = write_op(move |connection: &mut SqliteConnection| -> OpFuture<'_> {
        let future = work(connection);
        Box::pin(async move {
            match future.await {
                Ok(value) => {
                    Ok(Box::new(move |commit: Result<(), StoreError>| send(&slot, commit.and(value))) as Answer)
                }
                Err(error) => Err((
                    error,
                    Box::new(move |commit: Result<(), StoreError>| {
                        let error = commit.err().unwrap_or_else(|| StoreError::Unavailable("write failed".into()));
                        send(&slot, Err(error));
                    }) as Answer,
                )),
            }
        })
    });
    writes.send(WriteRequest::Op { run, fail }).await.map_err(|_| StoreError::Closed)?;
    answer.await.map_err(|_| StoreError::Closed)?
}

fn decode(error: sqlx::Error) -> StoreError {
    StoreError::Corrupt(format!("cannot decode a row: {error}"))
}

/// The claim on `name` as stored: (owner, token, expires_at).
async fn stored_claim(
    connection: &mut SqliteConnection,
    name: &str,
) -> Result<Option<(String, i64, i64)>, sqlx::Error> {
    let row = sqlx::query("SELECT owner, token, expires_at FROM cqrs_claims WHERE name = ?1")
        .bind(name)
        .fetch_optional(connection)
        .await?;
    row.map(|row| Ok((row.try_get("owner")?, row.try_get("token")?, row.try_get("expires_at")?))).transpose()
}

/// Whether `claim` is the current, unexpired claim on its name (inside the write lock).
pub(crate) async fn holds(connection: &mut SqliteConnection, claim: &Claim) -> Result<bool, sqlx::Error> {
    let now = Timestamp::now().as_micros();
    Ok(stored_claim(connection, &claim.name).await?.is_some_and(|(owner, token, expires_at)| {
        owner == claim.owner && token == to_i64_saturating(claim.token) && expires_at > now
    }))
}

pub(crate) async fn claim(
    writes: &mpsc::Sender<WriteRequest>,
    name: &str,
    owner: &str,
    ttl: Duration,
) -> Result<ClaimOutcome, StoreError> {
    let (name, owner) = (name.to_owned(), owner.to_owned());
    run_op(writes, move |connection| {
        Box::pin(async move {
            let now = Timestamp::now();
            let token = match stored_claim(connection, &name).await? {
                Some((holder, _, expires_at)) if expires_at > now.as_micros() && holder != owner => {
                    return Ok(Ok(ClaimOutcome::Taken { holder, until: Timestamp(expires_at) }));
                }
                Some((_, token, expires_at)) if expires_at > now.as_micros() => token,
                Some((_, token, _)) => token + 1,
                None => 1,
            };
            let expires_at = now.plus(ttl);
            sqlx::query(
                "INSERT INTO cqrs_claims (name, owner, token, expires_at) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, token = excluded.token, \
                 expires_at = excluded.expires_at",
            )
            .bind(&name)
            .bind(&owner)
            .bind(token)
            .bind(expires_at.as_micros())
            .execute(&mut *connection)
            .await?;
            let token = u64::try_from(token).unwrap_or(0);
            Ok(Ok(ClaimOutcome::Held(Claim { name, owner, token, expires_at })))
        })
    })
    .await
}

pub(crate) async fn release_claim(writes: &mpsc::Sender<WriteRequest>, claim: &Claim) -> Result<(), StoreError> {
    let claim = claim.clone();
    run_op(writes, move |connection| {
        Box::pin(async move {
            if holds(connection, &claim).await? {
                sqlx::query("UPDATE cqrs_claims SET expires_at = ?2 WHERE name = ?1")
                    .bind(&claim.name)
                    .bind(Timestamp::now().as_micros())
                    .execute(&mut *connection)
                    .await?;
            }
            Ok(Ok(()))
        })
    })
    .await
}

pub(crate) async fn claims(pool: &SqlitePool) -> Result<Vec<Claim>, StoreError> {
    let rows =
        sqlx::query("SELECT name, owner, token, expires_at FROM cqrs_claims WHERE expires_at > ?1 ORDER BY name")
            .bind(Timestamp::now().as_micros())
            .fetch_all(pool)
            .await
            .map_err(to_store_error)?;
    rows.iter()
        .map(|row| {
            Ok(Claim {
                name: row.try_get("name").map_err(decode)?,
                owner: row.try_get("owner").map_err(decode)?,
                token: to_u64(row.try_get("token").map_err(decode)?, "claim token")?,
                expires_at: Timestamp(row.try_get("expires_at").map_err(decode)?),
            })
        })
        .collect()
}

/// Saves a checkpoint inside an op (in the writer's open transaction).
pub(crate) async fn save_checkpoint(
    connection: &mut SqliteConnection,
    name: &str,
    position: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(crate::writer::SAVE_CHECKPOINT_SQL)
        .bind(name)
        .bind(position)
        .bind(Timestamp::now().as_micros())
        .execute(connection)
        .await
        .map(|_| ())
}

pub(crate) async fn save_checkpoint_claimed(
    writes: &mpsc::Sender<WriteRequest>,
    name: &str,
    position: i64,
    claim: &Claim,
) -> Result<(), StoreError> {
    let (name, claim) = (name.to_owned(), claim.clone());
    run_op(writes, move |connection| {
        Box::pin(async move {
            if !holds(connection, &claim).await? {
                return Ok(Err(StoreError::ClaimLost { name: claim.name }));
            }
            save_checkpoint(connection, &name, position).await?;
            Ok(Ok(()))
        })
    })
    .await
}

fn parked_of(row: &SqliteRow) -> Result<ParkedEvent, StoreError> {
    let stream_id: String = row.try_get("stream_id").map_err(decode)?;
    let status: String = row.try_get("status").map_err(decode)?;
    let attempts: i64 = row.try_get("attempts").map_err(decode)?;
    Ok(ParkedEvent {
        handler: row.try_get("handler").map_err(decode)?,
        position: Position(to_u64(row.try_get("position").map_err(decode)?, "position")?),
        event_id: EventId(row.try_get::<Uuid, _>("event_id").map_err(decode)?),
        stream_id: StreamId::new(&stream_id)
            .map_err(|error| StoreError::Corrupt(format!("parked stream id {stream_id:?}: {error}")))?,
        event_type: row.try_get("event_type").map_err(decode)?,
        sequence: row.try_get("sequence").map_err(decode)?,
        error: row.try_get("error").map_err(decode)?,
        attempts: u32::try_from(attempts).map_err(|_| StoreError::Corrupt(format!("parked attempts {attempts}")))?,
        parked_at: Timestamp(row.try_get("parked_at").map_err(decode)?),
        status: ParkedStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown parked status {status:?}")))?,
    })
}

/// `Ok(None)` without a fence or while it is held, checked on the write connection inside the
/// batch transaction (under the write lock, so atomic with the write that follows).
async fn fenced(connection: &mut SqliteConnection, fence: Option<&Claim>) -> Result<Option<StoreError>, sqlx::Error> {
    match fence {
        Some(claim) if !holds(connection, claim).await? => Ok(Some(StoreError::ClaimLost { name: claim.name.clone() })),
        _ => Ok(None),
    }
}

pub(crate) async fn park(
    writes: &mpsc::Sender<WriteRequest>,
    event: ParkedEvent,
    fence: Option<&Claim>,
) -> Result<(), StoreError> {
    let fence = fence.cloned();
    run_op(writes, move |connection| {
        Box::pin(async move {
            if let Some(lost) = fenced(connection, fence.as_ref()).await? {
                return Ok(Err(lost));
            }
            sqlx::query(
                "INSERT INTO cqrs_parked (handler, position, event_id, stream_id, event_type, sequence, error, \
                 attempts, parked_at, status) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) \
                 ON CONFLICT (handler, position) DO UPDATE SET event_id = excluded.event_id, \
                 stream_id = excluded.stream_id, event_type = excluded.event_type, sequence = excluded.sequence, \
                 error = excluded.error, attempts = excluded.attempts, parked_at = excluded.parked_at, \
                 status = excluded.status",
            )
            .bind(&event.handler)
            .bind(to_i64_saturating(event.position.0))
            .bind(event.event_id.0)
            .bind(event.stream_id.as_str())
            .bind(&event.event_type)
            .bind(&event.sequence)
            .bind(&event.error)
            .bind(i64::from(event.attempts))
            .bind(event.parked_at.as_micros())
            .bind(event.status.as_str())
            .execute(connection)
            .await?;
            Ok(Ok(()))
        })
    })
    .await
}

pub(crate) async fn parked(pool: &SqlitePool, handler: &str) -> Result<Vec<ParkedEvent>, StoreError> {
    let rows = sqlx::query(
        "SELECT handler, position, event_id, stream_id, event_type, sequence, error, attempts, parked_at, status \
         FROM cqrs_parked WHERE handler = ?1 ORDER BY position",
    )
    .bind(handler)
    .fetch_all(pool)
    .await
    .map_err(to_store_error)?;
    rows.iter().map(parked_of).collect()
}

/// A change to one parked event; none of them inserts a row.
pub(crate) enum ParkedUpdate {
    /// Set its status.
    Status(ParkedStatus),
    /// A retry failed with this error: one more attempt, back to parked.
    RetryFailed(String),
    /// Delete it.
    Remove,
}

/// Applies `update` to the parked event at `position` (fenced by `fence`); false if there is
/// no such parked event.
pub(crate) async fn update_parked(
    writes: &mpsc::Sender<WriteRequest>,
    handler: &str,
    position: Position,
    update: ParkedUpdate,
    fence: Option<&Claim>,
) -> Result<bool, StoreError> {
    let (handler, fence) = (handler.to_owned(), fence.cloned());
    let position = to_i64_saturating(position.0);
    run_op(writes, move |connection| {
        Box::pin(async move {
            if let Some(lost) = fenced(connection, fence.as_ref()).await? {
                return Ok(Err(lost));
            }
            let query = match &update {
                ParkedUpdate::Status(status) => {
                    sqlx::query("UPDATE cqrs_parked SET status = ?3 WHERE handler = ?1 AND position = ?2")
                        .bind(&handler)
                        .bind(position)
                        .bind(status.as_str())
                }
                ParkedUpdate::RetryFailed(error) => sqlx::query(
                    "UPDATE cqrs_parked SET status = 'parked', error = ?3, attempts = attempts + 1 \
                     WHERE handler = ?1 AND position = ?2",
                )
                .bind(&handler)
                .bind(position)
                .bind(error.as_str()),
                ParkedUpdate::Remove => sqlx::query("DELETE FROM cqrs_parked WHERE handler = ?1 AND position = ?2")
                    .bind(&handler)
                    .bind(position),
            };
            let changed = query.execute(connection).await?;
            Ok(Ok(changed.rows_affected() > 0))
        })
    })
    .await
}

pub(crate) async fn load_process(
    pool: &SqlitePool,
    process: &str,
    key: &str,
) -> Result<Option<ProcessState>, StoreError> {
    let row = sqlx::query("SELECT state, position, ended FROM cqrs_processes WHERE process = ?1 AND key = ?2")
        .bind(process)
        .bind(key)
        .fetch_optional(pool)
        .await
        .map_err(to_store_error)?;
    row.as_ref().map(process_state_of).transpose()
}

fn process_state_of(row: &SqliteRow) -> Result<ProcessState, StoreError> {
    let state: String = row.try_get("state").map_err(decode)?;
    Ok(ProcessState {
        state: json(&state, "process state")?,
        position: Position(to_u64(row.try_get("position").map_err(decode)?, "position")?),
        ended: row.try_get::<i64, _>("ended").map_err(decode)? != 0,
    })
}

pub(crate) async fn process_instances(
    pool: &SqlitePool,
    process: &str,
    after: Option<&str>,
    max: usize,
) -> Result<Vec<ProcessInstance>, StoreError> {
    let rows = sqlx::query(
        "SELECT key, state, position, ended FROM cqrs_processes \
         WHERE process = ?1 AND (?2 IS NULL OR key > ?2) ORDER BY key LIMIT ?3",
    )
    .bind(process)
    .bind(after)
    .bind(limit(max))
    .fetch_all(pool)
    .await
    .map_err(to_store_error)?;
    rows.iter()
        .map(|row| Ok(ProcessInstance { key: row.try_get("key").map_err(decode)?, state: process_state_of(row)? }))
        .collect()
}

pub(crate) async fn save_process(
    writes: &mpsc::Sender<WriteRequest>,
    process: &str,
    key: &str,
    state: Option<&ProcessState>,
    fence: Option<&Claim>,
) -> Result<(), StoreError> {
    let (process, key, fence) = (process.to_owned(), key.to_owned(), fence.cloned());
    let state = state.map(|state| (state.state.to_string(), to_i64_saturating(state.position.0), state.ended));
    run_op(writes, move |connection| {
        Box::pin(async move {
            if let Some(claim) = fence {
                if !holds(connection, &claim).await? {
                    return Ok(Err(StoreError::ClaimLost { name: claim.name }));
                }
            }
            match state {
                Some((state, position, ended)) => {
                    sqlx::query(
                        "INSERT INTO cqrs_processes (process, key, state, position, updated_at, ended) \
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (process, key) DO UPDATE SET \
                         state = excluded.state, position = excluded.position, updated_at = excluded.updated_at, \
                         ended = excluded.ended",
                    )
                    .bind(&process)
                    .bind(&key)
                    .bind(state)
                    .bind(position)
                    .bind(Timestamp::now().as_micros())
                    .bind(i64::from(ended))
                    .execute(connection)
                    .await?;
                }
                None => {
                    sqlx::query("DELETE FROM cqrs_processes WHERE process = ?1 AND key = ?2")
                        .bind(&process)
                        .bind(&key)
                        .execute(connection)
                        .await?;
                }
            }
            Ok(Ok(()))
        })
    })
    .await
}

pub(crate) async fn prune_processes(
    writes: &mpsc::Sender<WriteRequest>,
    process: &str,
    position: Position,
) -> Result<u64, StoreError> {
    let process = process.to_owned();
    let position = to_i64_saturating(position.0);
    run_op(writes, move |connection| {
        Box::pin(async move {
            let deleted = sqlx::query("DELETE FROM cqrs_processes WHERE process = ?1 AND ended = 1 AND position <= ?2")
                .bind(&process)
                .bind(position)
                .execute(connection)
                .await?;
            Ok(Ok(deleted.rows_affected()))
        })
    })
    .await
}

pub(crate) async fn schedule(writes: &mpsc::Sender<WriteRequest>, scheduled: Scheduled) -> Result<(), StoreError> {
    run_op(writes, move |connection| {
        Box::pin(async move {
            sqlx::query(
                "INSERT INTO cqrs_scheduled (owner, key, name, due, command, command_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
                 ON CONFLICT (owner, key, name) DO UPDATE SET due = excluded.due, command = excluded.command, \
                 command_id = excluded.command_id, attempts = 0, error = NULL, set_aside = 0",
            )
            .bind(&scheduled.owner)
            .bind(&scheduled.key)
            .bind(&scheduled.name)
            .bind(scheduled.due.as_micros())
            .bind(scheduled.command.to_string())
            .bind(scheduled.command_id.0)
            .execute(connection)
            .await?;
            Ok(Ok(()))
        })
    })
    .await
}

pub(crate) async fn unschedule(
    writes: &mpsc::Sender<WriteRequest>,
    owner: &str,
    key: &str,
    name: &str,
    only: Option<CommandId>,
) -> Result<bool, StoreError> {
    let (owner, key, name) = (owner.to_owned(), key.to_owned(), name.to_owned());
    run_op(writes, move |connection| {
        Box::pin(async move {
            let deleted = sqlx::query(
                "DELETE FROM cqrs_scheduled WHERE owner = ?1 AND key = ?2 AND name = ?3 \
                 AND (?4 IS NULL OR command_id = ?4)",
            )
            .bind(&owner)
            .bind(&key)
            .bind(&name)
            .bind(only.map(|id| id.0))
            .execute(connection)
            .await?;
            Ok(Ok(deleted.rows_affected() > 0))
        })
    })
    .await
}

fn scheduled_of(row: &SqliteRow) -> Result<Scheduled, StoreError> {
    let command: String = row.try_get("command").map_err(decode)?;
    Ok(Scheduled {
        owner: row.try_get("owner").map_err(decode)?,
        key: row.try_get("key").map_err(decode)?,
        name: row.try_get("name").map_err(decode)?,
        due: Timestamp(row.try_get("due").map_err(decode)?),
        command: json(&command, "scheduled command")?,
        command_id: CommandId(row.try_get::<Uuid, _>("command_id").map_err(decode)?),
        attempts: u32::try_from(row.try_get::<i64, _>("attempts").map_err(decode)?).unwrap_or(u32::MAX),
    })
}

pub(crate) async fn due(
    pool: &SqlitePool,
    owner: &str,
    now: Timestamp,
    max: usize,
) -> Result<Vec<Scheduled>, StoreError> {
    let rows = sqlx::query(
        "SELECT owner, key, name, due, command, command_id, attempts FROM cqrs_scheduled \
         WHERE owner = ?1 AND set_aside = 0 AND due <= ?2 ORDER BY due, key, name LIMIT ?3",
    )
    .bind(owner)
    .bind(now.as_micros())
    .bind(limit(max))
    .fetch_all(pool)
    .await
    .map_err(to_store_error)?;
    rows.iter().map(scheduled_of).collect()
}

pub(crate) async fn scheduled_failed(
    writes: &mpsc::Sender<WriteRequest>,
    scheduled: &Scheduled,
    error: &str,
    retry_at: Option<Timestamp>,
) -> Result<bool, StoreError> {
    let (owner, key, name, id) =
        (scheduled.owner.clone(), scheduled.key.clone(), scheduled.name.clone(), scheduled.command_id);
    let error = error.to_owned();
    run_op(writes, move |connection| {
        Box::pin(async move {
            let updated = sqlx::query(
                "UPDATE cqrs_scheduled SET attempts = attempts + 1, error = ?5, \
                 due = coalesce(?6, due), set_aside = CASE WHEN ?6 IS NULL THEN 1 ELSE 0 END \
                 WHERE owner = ?1 AND key = ?2 AND name = ?3 AND command_id = ?4",
            )
            .bind(&owner)
            .bind(&key)
            .bind(&name)
            .bind(id.0)
            .bind(&error)
            .bind(retry_at.map(Timestamp::as_micros))
            .execute(connection)
            .await?;
            Ok(Ok(updated.rows_affected() > 0))
        })
    })
    .await
}

pub(crate) async fn set_aside_scheduled(pool: &SqlitePool, owner: &str) -> Result<Vec<SetAsideCommand>, StoreError> {
    let rows = sqlx::query(
        "SELECT owner, key, name, due, command, command_id, attempts, error FROM cqrs_scheduled \
         WHERE owner = ?1 AND set_aside = 1 ORDER BY key, name",
    )
    .bind(owner)
    .fetch_all(pool)
    .await
    .map_err(to_store_error)?;
    rows.iter()
        .map(|row| {
            let error: Option<String> = row.try_get("error").map_err(decode)?;
            Ok(SetAsideCommand { scheduled: scheduled_of(row)?, error: error.unwrap_or_default() })
        })
        .collect()
}

pub(crate) async fn retry_scheduled(
    writes: &mpsc::Sender<WriteRequest>,
    owner: &str,
    key: &str,
    name: &str,
) -> Result<bool, StoreError> {
    let (owner, key, name) = (owner.to_owned(), key.to_owned(), name.to_owned());
    run_op(writes, move |connection| {
        Box::pin(async move {
            let updated = sqlx::query(
                "UPDATE cqrs_scheduled SET set_aside = 0, attempts = 0 \
                 WHERE owner = ?1 AND key = ?2 AND name = ?3 AND set_aside = 1",
            )
            .bind(&owner)
            .bind(&key)
            .bind(&name)
            .execute(connection)
            .await?;
            Ok(Ok(updated.rows_affected() > 0))
        })
    })
    .await
}

#[async_trait]
impl Coordination for SqliteEventStore {
    async fn claim(&self, name: &str, owner: &str, ttl: Duration) -> Result<ClaimOutcome, StoreError> {
        claim(&self.inner.writes, name, owner, ttl).await
    }

    async fn release_claim(&self, claim: &Claim) -> Result<(), StoreError> {
        release_claim(&self.inner.writes, claim).await
    }

    async fn claims(&self) -> Result<Vec<Claim>, StoreError> {
        claims(&self.inner.readers).await
    }

    async fn save_checkpoint_claimed(&self, name: &str, position: Position, claim: &Claim) -> Result<(), StoreError> {
        let position = i64::try_from(position.0)
            .map_err(|_| StoreError::InvalidAppend(format!("checkpoint {position} does not fit in an integer")))?;
        save_checkpoint_claimed(&self.inner.writes, name, position, claim).await
    }

    async fn park(&self, event: ParkedEvent, fence: Option<&Claim>) -> Result<(), StoreError> {
        park(&self.inner.writes, event, fence).await
    }

    async fn parked(&self, handler: &str) -> Result<Vec<ParkedEvent>, StoreError> {
        parked(&self.inner.readers, handler).await
    }

    async fn set_parked_status(
        &self,
        handler: &str,
        position: Position,
        status: ParkedStatus,
        fence: Option<&Claim>,
    ) -> Result<bool, StoreError> {
        update_parked(&self.inner.writes, handler, position, ParkedUpdate::Status(status), fence).await
    }

    async fn parked_retry_failed(
        &self,
        handler: &str,
        position: Position,
        error: &str,
        fence: Option<&Claim>,
    ) -> Result<bool, StoreError> {
        let update = ParkedUpdate::RetryFailed(error.to_owned());
        update_parked(&self.inner.writes, handler, position, update, fence).await
    }

    async fn unpark(&self, handler: &str, position: Position, fence: Option<&Claim>) -> Result<bool, StoreError> {
        update_parked(&self.inner.writes, handler, position, ParkedUpdate::Remove, fence).await
    }

    async fn load_process(&self, process: &str, key: &str) -> Result<Option<ProcessState>, StoreError> {
        load_process(&self.inner.readers, process, key).await
    }

    async fn save_process(
        &self,
        process: &str,
        key: &str,
        state: Option<&ProcessState>,
        fence: Option<&Claim>,
    ) -> Result<(), StoreError> {
        save_process(&self.inner.writes, process, key, state, fence).await
    }

    async fn process_instances(
        &self,
        process: &str,
        after: Option<&str>,
        max: usize,
    ) -> Result<Vec<ProcessInstance>, StoreError> {
        process_instances(&self.inner.readers, process, after, max).await
    }

    async fn prune_processes(&self, process: &str, position: Position) -> Result<u64, StoreError> {
        prune_processes(&self.inner.writes, process, position).await
    }

    async fn schedule(&self, scheduled: Scheduled) -> Result<(), StoreError> {
        schedule(&self.inner.writes, scheduled).await
    }

    async fn unschedule(
        &self,
        owner: &str,
        key: &str,
        name: &str,
        only: Option<CommandId>,
    ) -> Result<bool, StoreError> {
        unschedule(&self.inner.writes, owner, key, name, only).await
    }

    async fn due(&self, owner: &str, now: Timestamp, max: usize) -> Result<Vec<Scheduled>, StoreError> {
        due(&self.inner.readers, owner, now, max).await
    }

    async fn scheduled_failed(
        &self,
        scheduled: &Scheduled,
        error: &str,
        retry_at: Option<Timestamp>,
    ) -> Result<bool, StoreError> {
        scheduled_failed(&self.inner.writes, scheduled, error, retry_at).await
    }

    async fn set_aside_scheduled(&self, owner: &str) -> Result<Vec<SetAsideCommand>, StoreError> {
        set_aside_scheduled(&self.inner.readers, owner).await
    }

    async fn retry_scheduled(&self, owner: &str, key: &str, name: &str) -> Result<bool, StoreError> {
        retry_scheduled(&self.inner.writes, owner, key, name).await
    }
}
