//! Claims, parked events, process manager state and scheduled commands, in their own tables
//! (`migrations/20261201000002_handlers.sql`). Claim times are the server's clock (`now()`), so
//! processes on different hosts agree on when a claim lapses.

use std::time::Duration;

use async_trait::async_trait;
use cqrs_core::store::Coordination;
use cqrs_core::{
    Claim, ClaimOutcome, CommandId, EventId, ParkedEvent, ParkedStatus, Position, ProcessInstance, ProcessState,
    Scheduled, SetAsideCommand, StoreError, StreamId, Timestamp,
};
use sqlx::postgres::PgRow;
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use crate::error::to_store_error;
use crate::rows::{to_i64_saturating, to_u64};
use crate::PgEventStore;

/// A timestamptz bound as microseconds since the epoch.
const FROM_MICROS: &str = "'epoch'::timestamptz + $X * interval '1 microsecond'";

fn at(parameter: &str) -> String {
    FROM_MICROS.replace("$X", parameter)
}

/// `time` in microseconds for [`at`], inside the years 1–9999: the ends of `i64` overflow
/// PostgreSQL's interval arithmetic ("interval out of range"), and "due by the end of time"
/// is a fair question to ask.
fn bounded_micros(time: Timestamp) -> i64 {
    /// 0001-01-01 and 9999-12-31 23:59:59.999999 UTC.
    const RANGE: (i64, i64) = (-62_135_596_800_000_000, 253_402_300_799_999_999);
    time.as_micros().clamp(RANGE.0, RANGE.1)
}

fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

fn decode(error: sqlx::Error) -> StoreError {
    StoreError::Corrupt(format!("cannot decode a row: {error}"))
}

fn claim_of(row: &PgRow) -> Result<Claim, StoreError> {
    Ok(Claim {
        name: row.try_get("name").map_err(decode)?,
        owner: row.try_get("owner").map_err(decode)?,
        token: to_u64(row.try_get("token").map_err(decode)?, "claim token")?,
        expires_at: Timestamp(row.try_get("expires_micros").map_err(decode)?),
    })
}

const CLAIM_COLUMNS: &str = "name, owner, token, (extract(epoch FROM expires_at) * 1000000)::bigint AS expires_micros";

pub(crate) async fn claim(pool: &PgPool, name: &str, owner: &str, ttl: Duration) -> Result<ClaimOutcome, StoreError> {
    // Taken if free or lapsed, renewed if ours; a new tenure gets the next token.
    let taken = sqlx::query(&format!(
        "INSERT INTO cqrs_claims AS c (name, owner, token, expires_at) VALUES ($1, $2, 1, now() + $3 * interval '1 microsecond') \
         ON CONFLICT (name) DO UPDATE SET \
           token = CASE WHEN c.owner = EXCLUDED.owner AND c.expires_at > now() THEN c.token ELSE c.token + 1 END, \
           owner = EXCLUDED.owner, expires_at = EXCLUDED.expires_at \
         WHERE c.expires_at <= now() OR c.owner = EXCLUDED.owner \
         RETURNING {CLAIM_COLUMNS}"
    ))
    .bind(name)
    .bind(owner)
    .bind(micros(ttl))
    .fetch_optional(pool)
    .await
    .map_err(to_store_error)?;
    if let Some(row) = taken {
        return Ok(ClaimOutcome::Held(claim_of(&row)?));
    }
    let holder = sqlx::query(&format!("SELECT {CLAIM_COLUMNS} FROM cqrs_claims WHERE name = $1"))
        .bind(name)
        .fetch_optional(pool)
        .await
        .map_err(to_store_error)?;
    match holder {
        Some(row) => {
            let current = claim_of(&row)?;
            Ok(ClaimOutcome::Taken { holder: current.owner, until: current.expires_at })
        }
        // Released and gone between the two statements: free now; the caller asks again.
        None => Ok(ClaimOutcome::Taken { holder: String::new(), until: Timestamp::now() }),
    }
}

pub(crate) async fn release_claim(pool: &PgPool, claim: &Claim) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE cqrs_claims SET expires_at = now() \
         WHERE name = $1 AND owner = $2 AND token = $3 AND expires_at > now()",
    )
    .bind(&claim.name)
    .bind(&claim.owner)
    .bind(to_i64_saturating(claim.token))
    .execute(pool)
    .await
    .map_err(to_store_error)?;
    Ok(())
}

pub(crate) async fn claims(pool: &PgPool) -> Result<Vec<Claim>, StoreError> {
    let rows = sqlx::query(&format!("SELECT {CLAIM_COLUMNS} FROM cqrs_claims WHERE expires_at > now() ORDER BY name"))
        .fetch_all(pool)
        .await
        .map_err(to_store_error)?;
    rows.iter().map(claim_of).collect()
}

/// Locks `claim`'s row for share if it is still held, inside the caller's transaction: a
/// process taking the claim over waits for that transaction to end. False if not held.
pub(crate) async fn hold_for_commit(connection: &mut PgConnection, claim: &Claim) -> Result<bool, StoreError> {
    let held = sqlx::query(
        "SELECT 1 FROM cqrs_claims WHERE name = $1 AND owner = $2 AND token = $3 AND expires_at > now() FOR SHARE",
    )
    .bind(&claim.name)
    .bind(&claim.owner)
    .bind(to_i64_saturating(claim.token))
    .fetch_optional(connection)
    .await
    .map_err(to_store_error)?;
    Ok(held.is_some())
}

pub(crate) async fn save_checkpoint_claimed(
    pool: &PgPool,
    name: &str,
    position: Position,
    claim: &Claim,
) -> Result<(), StoreError> {
    let mut transaction = pool.begin().await.map_err(to_store_error)?;
    if !hold_for_commit(&mut transaction, claim).await? {
        return Err(StoreError::ClaimLost { name: claim.name.clone() });
    }
    crate::PgEventStore::save_checkpoint_in(&mut transaction, name, position).await?;
    transaction.commit().await.map_err(to_store_error)
}

const PARKED_COLUMNS: &str = "handler, position, event_id, stream_id, event_type, sequence, error, attempts, \
     (extract(epoch FROM parked_at) * 1000000)::bigint AS parked_micros, status";

fn parked_of(row: &PgRow) -> Result<ParkedEvent, StoreError> {
    let stream_id: String = row.try_get("stream_id").map_err(decode)?;
    let status: String = row.try_get("status").map_err(decode)?;
    let attempts: i32 = row.try_get("attempts").map_err(decode)?;
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
        parked_at: Timestamp(row.try_get("parked_micros").map_err(decode)?),
        status: ParkedStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown parked status {status:?}")))?,
    })
}

/// Runs one write to the parked events: with `fence`, in a transaction that holds the claim
/// row `FOR SHARE` first (so it lands only while the claim is held, and a takeover waits for
/// it); returns the rows it changed.
async fn parked_write(
    pool: &PgPool,
    fence: Option<&Claim>,
    query: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
) -> Result<u64, StoreError> {
    let Some(claim) = fence else {
        return Ok(query.execute(pool).await.map_err(to_store_error)?.rows_affected());
    };
    let mut transaction = pool.begin().await.map_err(to_store_error)?;
    if !hold_for_commit(&mut transaction, claim).await? {
        return Err(StoreError::ClaimLost { name: claim.name.clone() });
    }
    let changed = query.execute(&mut *transaction).await.map_err(to_store_error)?.rows_affected();
    transaction.commit().await.map_err(to_store_error)?;
    Ok(changed)
}

pub(crate) async fn park(pool: &PgPool, event: &ParkedEvent, fence: Option<&Claim>) -> Result<(), StoreError> {
    let sql = format!(
        "INSERT INTO cqrs_parked (handler, position, event_id, stream_id, event_type, sequence, error, attempts, \
         parked_at, status) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, {}, $10) \
         ON CONFLICT (handler, position) DO UPDATE SET event_id = EXCLUDED.event_id, stream_id = EXCLUDED.stream_id, \
         event_type = EXCLUDED.event_type, sequence = EXCLUDED.sequence, error = EXCLUDED.error, \
         attempts = EXCLUDED.attempts, parked_at = EXCLUDED.parked_at, status = EXCLUDED.status",
        at("$9")
    );
    let query = sqlx::query(&sql)
        .bind(&event.handler)
        .bind(to_i64_saturating(event.position.0))
        .bind(event.event_id.0)
        .bind(event.stream_id.as_str())
        .bind(&event.event_type)
        .bind(&event.sequence)
        .bind(&event.error)
        .bind(i32::try_from(event.attempts).unwrap_or(i32::MAX))
        .bind(bounded_micros(event.parked_at))
        .bind(event.status.as_str());
    parked_write(pool, fence, query).await?;
    Ok(())
}

pub(crate) async fn parked(pool: &PgPool, handler: &str) -> Result<Vec<ParkedEvent>, StoreError> {
    let rows = sqlx::query(&format!("SELECT {PARKED_COLUMNS} FROM cqrs_parked WHERE handler = $1 ORDER BY position"))
        .bind(handler)
        .fetch_all(pool)
        .await
        .map_err(to_store_error)?;
    rows.iter().map(parked_of).collect()
}

pub(crate) async fn set_parked_status(
    pool: &PgPool,
    handler: &str,
    position: Position,
    status: ParkedStatus,
    fence: Option<&Claim>,
) -> Result<bool, StoreError> {
    let query = sqlx::query("UPDATE cqrs_parked SET status = $3 WHERE handler = $1 AND position = $2")
        .bind(handler)
        .bind(to_i64_saturating(position.0))
        .bind(status.as_str());
    Ok(parked_write(pool, fence, query).await? > 0)
}

pub(crate) async fn parked_retry_failed(
    pool: &PgPool,
    handler: &str,
    position: Position,
    error: &str,
    fence: Option<&Claim>,
) -> Result<bool, StoreError> {
    let query = sqlx::query(
        "UPDATE cqrs_parked SET status = 'parked', error = $3, attempts = attempts + 1 \
         WHERE handler = $1 AND position = $2",
    )
    .bind(handler)
    .bind(to_i64_saturating(position.0))
    .bind(error);
    Ok(parked_write(pool, fence, query).await? > 0)
}

pub(crate) async fn unpark(
    pool: &PgPool,
    handler: &str,
    position: Position,
    fence: Option<&Claim>,
) -> Result<bool, StoreError> {
    let query = sqlx::query("DELETE FROM cqrs_parked WHERE handler = $1 AND position = $2")
        .bind(handler)
        .bind(to_i64_saturating(position.0));
    Ok(parked_write(pool, fence, query).await? > 0)
}

pub(crate) async fn load_process(pool: &PgPool, process: &str, key: &str) -> Result<Option<ProcessState>, StoreError> {
    let row = sqlx::query("SELECT state, position, ended FROM cqrs_processes WHERE process = $1 AND key = $2")
        .bind(process)
        .bind(key)
        .fetch_optional(pool)
        .await
        .map_err(to_store_error)?;
    row.as_ref().map(process_state_of).transpose()
}

fn process_state_of(row: &PgRow) -> Result<ProcessState, StoreError> {
    let state: Json<serde_json::Value> = row.try_get("state").map_err(decode)?;
    Ok(ProcessState {
        state: state.0,
        position: Position(to_u64(row.try_get("position").map_err(decode)?, "position")?),
        ended: row.try_get("ended").map_err(decode)?,
    })
}

pub(crate) async fn process_instances(
    pool: &PgPool,
    process: &str,
    after: Option<&str>,
    max: usize,
) -> Result<Vec<ProcessInstance>, StoreError> {
    let rows = sqlx::query(
        "SELECT key, state, position, ended FROM cqrs_processes \
         WHERE process = $1 AND ($2::text IS NULL OR key > $2) ORDER BY key LIMIT $3",
    )
    .bind(process)
    .bind(after)
    .bind(to_i64_saturating(u64::try_from(max).unwrap_or(u64::MAX)))
    .fetch_all(pool)
    .await
    .map_err(to_store_error)?;
    rows.iter()
        .map(|row| Ok(ProcessInstance { key: row.try_get("key").map_err(decode)?, state: process_state_of(row)? }))
        .collect()
}

async fn write_process(
    connection: &mut PgConnection,
    process: &str,
    key: &str,
    state: Option<&ProcessState>,
) -> Result<(), StoreError> {
    let query = match state {
        Some(state) => sqlx::query(
            "INSERT INTO cqrs_processes (process, key, state, position, ended) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (process, key) DO UPDATE SET state = EXCLUDED.state, position = EXCLUDED.position, \
             ended = EXCLUDED.ended, updated_at = now()",
        )
        .bind(process)
        .bind(key)
        .bind(Json(&state.state))
        .bind(to_i64_saturating(state.position.0))
        .bind(state.ended),
        None => sqlx::query("DELETE FROM cqrs_processes WHERE process = $1 AND key = $2").bind(process).bind(key),
    };
    query.execute(connection).await.map_err(to_store_error)?;
    Ok(())
}

pub(crate) async fn save_process(
    pool: &PgPool,
    process: &str,
    key: &str,
    state: Option<&ProcessState>,
    fence: Option<&Claim>,
) -> Result<(), StoreError> {
    let Some(claim) = fence else {
        let mut connection = pool.acquire().await.map_err(to_store_error)?;
        return write_process(&mut connection, process, key, state).await;
    };
    let mut transaction = pool.begin().await.map_err(to_store_error)?;
    if !hold_for_commit(&mut transaction, claim).await? {
        return Err(StoreError::ClaimLost { name: claim.name.clone() });
    }
    write_process(&mut transaction, process, key, state).await?;
    transaction.commit().await.map_err(to_store_error)
}

pub(crate) async fn prune_processes(pool: &PgPool, process: &str, position: Position) -> Result<u64, StoreError> {
    let deleted = sqlx::query("DELETE FROM cqrs_processes WHERE process = $1 AND ended AND position <= $2")
        .bind(process)
        .bind(to_i64_saturating(position.0))
        .execute(pool)
        .await
        .map_err(to_store_error)?;
    Ok(deleted.rows_affected())
}

pub(crate) async fn schedule(pool: &PgPool, scheduled: &Scheduled) -> Result<(), StoreError> {
    sqlx::query(&format!(
        "INSERT INTO cqrs_scheduled (owner, key, name, due, command, command_id) VALUES ($1, $2, $3, {}, $5, $6) \
         ON CONFLICT (owner, key, name) DO UPDATE SET due = EXCLUDED.due, command = EXCLUDED.command, \
         command_id = EXCLUDED.command_id, attempts = 0, error = NULL, set_aside = false",
        at("$4")
    ))
    .bind(&scheduled.owner)
    .bind(&scheduled.key)
    .bind(&scheduled.name)
    .bind(bounded_micros(scheduled.due))
    .bind(Json(&scheduled.command))
    .bind(scheduled.command_id.0)
    .execute(pool)
    .await
    .map_err(to_store_error)?;
    Ok(())
}

pub(crate) async fn unschedule(
    pool: &PgPool,
    owner: &str,
    key: &str,
    name: &str,
    only: Option<CommandId>,
) -> Result<bool, StoreError> {
    let deleted = sqlx::query(
        "DELETE FROM cqrs_scheduled WHERE owner = $1 AND key = $2 AND name = $3          AND ($4::uuid IS NULL OR command_id = $4)",
    )
    .bind(owner)
    .bind(key)
    .bind(name)
    .bind(only.map(|id| id.0))
        .execute(pool)
        .await
        .map_err(to_store_error)?;
    Ok(deleted.rows_affected() > 0)
}

fn scheduled_of(row: &PgRow) -> Result<Scheduled, StoreError> {
    let command: Json<serde_json::Value> = row.try_get("command").map_err(decode)?;
    Ok(Scheduled {
        owner: row.try_get("owner").map_err(decode)?,
        key: row.try_get("key").map_err(decode)?,
        name: row.try_get("name").map_err(decode)?,
        due: Timestamp(row.try_get("due_micros").map_err(decode)?),
        command: command.0,
        command_id: CommandId(row.try_get::<Uuid, _>("command_id").map_err(decode)?),
        attempts: u32::try_from(row.try_get::<i32, _>("attempts").map_err(decode)?).unwrap_or(0),
    })
}

const SCHEDULED_COLUMNS: &str =
    "owner, key, name, (extract(epoch FROM due) * 1000000)::bigint AS due_micros, command, command_id, attempts";

pub(crate) async fn due(pool: &PgPool, owner: &str, now: Timestamp, max: usize) -> Result<Vec<Scheduled>, StoreError> {
    let rows = sqlx::query(&format!(
        "SELECT {SCHEDULED_COLUMNS} FROM cqrs_scheduled WHERE owner = $1 AND NOT set_aside AND due <= {} \
         ORDER BY due, key, name LIMIT $3",
        at("$2")
    ))
    .bind(owner)
    .bind(bounded_micros(now))
    .bind(to_i64_saturating(u64::try_from(max).unwrap_or(u64::MAX)))
    .fetch_all(pool)
    .await
    .map_err(to_store_error)?;
    rows.iter().map(scheduled_of).collect()
}

pub(crate) async fn scheduled_failed(
    pool: &PgPool,
    scheduled: &Scheduled,
    error: &str,
    retry_at: Option<Timestamp>,
) -> Result<bool, StoreError> {
    let updated = sqlx::query(&format!(
        "UPDATE cqrs_scheduled SET attempts = attempts + 1, error = $5, \
         due = CASE WHEN $6::bigint IS NULL THEN due ELSE {} END, set_aside = ($6::bigint IS NULL) \
         WHERE owner = $1 AND key = $2 AND name = $3 AND command_id = $4",
        at("$6::bigint")
    ))
    .bind(&scheduled.owner)
    .bind(&scheduled.key)
    .bind(&scheduled.name)
    .bind(scheduled.command_id.0)
    .bind(error)
    .bind(retry_at.map(bounded_micros))
    .execute(pool)
    .await
    .map_err(to_store_error)?;
    Ok(updated.rows_affected() > 0)
}

pub(crate) async fn set_aside_scheduled(pool: &PgPool, owner: &str) -> Result<Vec<SetAsideCommand>, StoreError> {
    let rows = sqlx::query(&format!(
        "SELECT {SCHEDULED_COLUMNS}, error FROM cqrs_scheduled WHERE owner = $1 AND set_aside ORDER BY key, name"
    ))
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

pub(crate) async fn retry_scheduled(pool: &PgPool, owner: &str, key: &str, name: &str) -> Result<bool, StoreError> {
    let updated = sqlx::query(
        "UPDATE cqrs_scheduled SET set_aside = false, attempts = 0 \
         WHERE owner = $1 AND key = $2 AND name = $3 AND set_aside",
    )
    .bind(owner)
    .bind(key)
    .bind(name)
    .execute(pool)
    .await
    .map_err(to_store_error)?;
    Ok(updated.rows_affected() > 0)
}

#[async_trait]
impl Coordination for PgEventStore {
    async fn claim(&self, name: &str, owner: &str, ttl: Duration) -> Result<ClaimOutcome, StoreError> {
        claim(&self.inner.pool, name, owner, ttl).await
    }

    async fn release_claim(&self, claim: &Claim) -> Result<(), StoreError> {
        release_claim(&self.inner.pool, claim).await
    }

    async fn claims(&self) -> Result<Vec<Claim>, StoreError> {
        claims(&self.inner.pool).await
    }

    async fn save_checkpoint_claimed(&self, name: &str, position: Position, claim: &Claim) -> Result<(), StoreError> {
        save_checkpoint_claimed(&self.inner.pool, name, position, claim).await
    }

    async fn park(&self, event: ParkedEvent, fence: Option<&Claim>) -> Result<(), StoreError> {
        park(&self.inner.pool, &event, fence).await
    }

    async fn parked(&self, handler: &str) -> Result<Vec<ParkedEvent>, StoreError> {
        parked(&self.inner.pool, handler).await
    }

    async fn set_parked_status(
        &self,
        handler: &str,
        position: Position,
        status: ParkedStatus,
        fence: Option<&Claim>,
    ) -> Result<bool, StoreError> {
        set_parked_status(&self.inner.pool, handler, position, status, fence).await
    }

    async fn parked_retry_failed(
        &self,
        handler: &str,
        position: Position,
        error: &str,
        fence: Option<&Claim>,
    ) -> Result<bool, StoreError> {
        parked_retry_failed(&self.inner.pool, handler, position, error, fence).await
    }

    async fn unpark(&self, handler: &str, position: Position, fence: Option<&Claim>) -> Result<bool, StoreError> {
        unpark(&self.inner.pool, handler, position, fence).await
    }

    async fn load_process(&self, process: &str, key: &str) -> Result<Option<ProcessState>, StoreError> {
        load_process(&self.inner.pool, process, key).await
    }

    async fn save_process(
        &self,
        process: &str,
        key: &str,
        state: Option<&ProcessState>,
        fence: Option<&Claim>,
    ) -> Result<(), StoreError> {
        save_process(&self.inner.pool, process, key, state, fence).await
    }

    async fn process_instances(
        &self,
        process: &str,
        after: Option<&str>,
        max: usize,
    ) -> Result<Vec<ProcessInstance>, StoreError> {
        process_instances(&self.inner.pool, process, after, max).await
    }

    async fn prune_processes(&self, process: &str, position: Position) -> Result<u64, StoreError> {
        prune_processes(&self.inner.pool, process, position).await
    }

    async fn schedule(&self, scheduled: Scheduled) -> Result<(), StoreError> {
        schedule(&self.inner.pool, &scheduled).await
    }

    async fn unschedule(
        &self,
        owner: &str,
        key: &str,
        name: &str,
        only: Option<CommandId>,
    ) -> Result<bool, StoreError> {
        unschedule(&self.inner.pool, owner, key, name, only).await
    }

    async fn due(&self, owner: &str, now: Timestamp, max: usize) -> Result<Vec<Scheduled>, StoreError> {
        due(&self.inner.pool, owner, now, max).await
    }

    async fn scheduled_failed(
        &self,
        scheduled: &Scheduled,
        error: &str,
        retry_at: Option<Timestamp>,
    ) -> Result<bool, StoreError> {
        scheduled_failed(&self.inner.pool, scheduled, error, retry_at).await
    }

    async fn set_aside_scheduled(&self, owner: &str) -> Result<Vec<SetAsideCommand>, StoreError> {
        set_aside_scheduled(&self.inner.pool, owner).await
    }

    async fn retry_scheduled(&self, owner: &str, key: &str, name: &str) -> Result<bool, StoreError> {
        retry_scheduled(&self.inner.pool, owner, key, name).await
    }
}
