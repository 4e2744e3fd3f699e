//! Transactional projections on PostgreSQL: a projection's table writes and its checkpoint
//! commit in one transaction, so its effects are exactly-once. The runner
//! ([`cqrs_core::spawn_batch_handler`]) hands it batches of events; you write only the updates.

use std::future::Future;
use std::sync::Arc;

use cqrs_core::{
    spawn_batch_handler, BatchHandler, Claim, DomainEvent, Envelope, HandlerError, Position, Progress, RecordedEvent,
    RunnerConfig, RunningHandler, StoreError, DEFAULT_MAX_BATCH,
};
use sqlx::{PgConnection, PgPool};

use crate::coordination::hold_for_commit;
use crate::error::to_store_error;
use crate::PgEventStore;

/// A projection into your own tables, updated in the same transaction as its checkpoint.
///
/// ```no_run
/// use cqrs_core::{DomainEvent, Envelope, HandlerError, Progress, RunnerConfig};
/// use cqrs_postgres::{spawn_projection, PgEventStore, PgProjection};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
/// #[event(category = "order")]
/// enum OrderEvent { Placed { total_cents: i64 }, Cancelled }
///
/// /// Orders per status, in table `orders_by_status(order_id text primary key, status text)`.
/// struct OrdersByStatus;
///
/// impl PgProjection for OrdersByStatus {
///     type Event = OrderEvent;
///     fn name(&self) -> &str {
///         "orders-by-status"
///     }
///     async fn apply(
///         &self,
///         transaction: &mut sqlx::PgConnection,
///         events: &[Envelope<OrderEvent>],
///     ) -> Result<(), HandlerError> {
///         for event in events {
///             let status = match event.event { OrderEvent::Placed { .. } => "placed", OrderEvent::Cancelled => "cancelled" };
///             sqlx::query("INSERT INTO orders_by_status (order_id, status) VALUES ($1, $2) \
///                          ON CONFLICT (order_id) DO UPDATE SET status = EXCLUDED.status")
///                 .bind(event.stream_id.aggregate_id())
///                 .bind(status)
///                 .execute(&mut *transaction)
///                 .await
///                 .map_err(HandlerError::new)?;
///         }
///         Ok(())
///     }
/// }
///
/// # async fn run(store: PgEventStore) {
/// let running = spawn_projection(&store, OrdersByStatus, RunnerConfig::default(), &Progress::new());
/// # let _ = running;
/// # }
/// ```
pub trait PgProjection: Send + Sync + 'static {
    /// The events it decodes.
    type Event: DomainEvent;

    /// The stable name of the projection and its checkpoint.
    fn name(&self) -> &str;

    /// Whether it takes this event (by default, by category and type: see
    /// [`DomainEvent::accepts`]).
    fn interested(&self, event: &RecordedEvent) -> bool {
        Self::Event::accepts(event.category(), &event.event_type)
    }

    /// Applies a batch of events inside `transaction`. The runner saves the checkpoint in the
    /// same transaction afterwards and commits; on an error nothing of the batch is kept and
    /// it is retried. Use `&mut *transaction` as the executor.
    fn apply(
        &self,
        transaction: &mut PgConnection,
        events: &[Envelope<Self::Event>],
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// A [`PgProjection`] run as a [`BatchHandler`]: begin, check the claim (holding its row for
/// share, so a takeover waits for this commit), apply, save the checkpoint, commit.
struct Transactional<P> {
    projection: P,
    pool: PgPool,
}

impl<P: PgProjection> BatchHandler for Transactional<P> {
    type Event = P::Event;

    fn name(&self) -> &str {
        self.projection.name()
    }

    fn interested(&self, event: &RecordedEvent) -> bool {
        self.projection.interested(event)
    }

    async fn commit(
        &self,
        events: Vec<Envelope<P::Event>>,
        through: Position,
        claim: Option<&Claim>,
    ) -> Result<(), HandlerError> {
        let mut transaction = self.pool.begin().await.map_err(to_store_error)?;
        if let Some(claim) = claim {
            if !hold_for_commit(&mut transaction, claim).await? {
                return Err(StoreError::ClaimLost { name: claim.name.clone() }.into());
            }
        }
        // The checkpoint guard, inside this transaction: a commit of an earlier attempt whose
        // outcome we never learnt (a cut socket, a synchronous standby) may still be in flight,
        // holding the checkpoint row; this waits for it and leaves out what it covered, so no
        // event is applied twice.
        let mut events = events;
        if let Some(saved) = lock_checkpoint(&mut transaction, self.projection.name()).await? {
            if saved >= through {
                return Ok(());
            }
            events.retain(|event| event.position > saved);
        }
        if !events.is_empty() {
            self.projection.apply(&mut transaction, &events).await?;
        }
        PgEventStore::save_checkpoint_in(&mut transaction, self.projection.name(), through).await?;
        transaction.commit().await.map_err(to_store_error)?;
        Ok(())
    }
}

/// Locks checkpoint `name` for the rest of the caller's transaction and returns it (`None` if
/// there is none yet): one statement once the row exists. A missing row is created first (it
/// commits only with the transaction, which then saves its own position), so two transactions
/// of one projection always meet on one row: the second waits until the first has ended, then
/// reads what it committed.
async fn lock_checkpoint(connection: &mut PgConnection, name: &str) -> Result<Option<Position>, StoreError> {
    async fn locked(connection: &mut PgConnection, name: &str) -> Result<Option<i64>, StoreError> {
        sqlx::query_scalar("SELECT position FROM cqrs_checkpoints WHERE name = $1 FOR UPDATE")
            .bind(name)
            .fetch_optional(connection)
            .await
            .map_err(to_store_error)
    }
    let mut position = locked(&mut *connection, name).await?;
    if position.is_none() {
        let created =
            sqlx::query("INSERT INTO cqrs_checkpoints (name, position) VALUES ($1, 0) ON CONFLICT (name) DO NOTHING")
                .bind(name)
                .execute(&mut *connection)
                .await
                .map_err(to_store_error)?;
        if created.rows_affected() > 0 {
            return Ok(None);
        }
        // Another transaction created it first (and has ended): lock what it left.
        position = locked(&mut *connection, name).await?;
    }
    let Some(position) = position else { return Ok(None) };
    let position =
        u64::try_from(position).map_err(|_| StoreError::Corrupt(format!("checkpoint {name:?} at {position}")))?;
    Ok(Some(Position(position)))
}

/// Starts `projection` on `store`: batches of up to [`DEFAULT_MAX_BATCH`] events, each applied
/// and checkpointed in one transaction; exclusive across processes by default (see
/// [`RunnerConfig::placement`]).
pub fn spawn_projection<P: PgProjection>(
    store: &PgEventStore,
    projection: P,
    config: RunnerConfig,
    progress: &Progress,
) -> RunningHandler {
    spawn_projection_with(store, projection, config, DEFAULT_MAX_BATCH, progress)
}

/// [`spawn_projection`] with batches of at most `max_batch` events.
pub fn spawn_projection_with<P: PgProjection>(
    store: &PgEventStore,
    projection: P,
    config: RunnerConfig,
    max_batch: usize,
    progress: &Progress,
) -> RunningHandler {
    let handler = Transactional { projection, pool: store.pool().clone() };
    spawn_batch_handler(Arc::new(store.clone()), handler, config, max_batch, progress)
}
