//! Transactional projections on SQLite: a projection's table writes and its checkpoint commit
//! in one transaction, so its effects are exactly-once.
//!
//! **How this coexists with the single writer.** The store has one write connection, owned by
//! its writer, and SQLite allows one writing transaction per file. So a projection's batch
//! runs *on the writer*, inside its group-commit transaction, under a savepoint of its own: the
//! projection's updates, the claim check and the checkpoint are released together and share
//! the batch's one `COMMIT` (one fsync) with the appends queued beside them; a batch that fails
//! rolls back to its savepoint alone. While a batch is applied, appends wait for the writer, so
//! keep `apply` to database work (no network calls, nothing slow). A panic in `apply` is caught
//! and fails that batch only.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use cqrs_core::{
    spawn_batch_handler, BatchHandler, Claim, DomainEvent, Envelope, HandlerError, Position, Progress, RecordedEvent,
    RunnerConfig, RunningHandler, StoreError, DEFAULT_MAX_BATCH,
};
use sqlx::{Executor, SqliteConnection};

use crate::coordination::{holds, run_op, save_checkpoint};
use crate::rows::to_i64_saturating;
use crate::SqliteEventStore;

/// A projection into your own tables in the store's file, updated in the same transaction as
/// its checkpoint. Create its tables before starting it (with your own migrations, through a
/// connection of your own, or in the first `apply`).
///
/// ```
/// use cqrs_core::{DomainEvent, Envelope, EventStore, ExpectedVersion, HandlerError, NewEvent, Metadata};
/// use cqrs_core::{Progress, RunnerConfig, StreamId};
/// use cqrs_sqlite::{spawn_projection, SqliteEventStore, SqliteProjection};
/// use serde::{Deserialize, Serialize};
/// use sqlx::Connection;
///
/// #[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
/// #[event(category = "order")]
/// enum OrderEvent { Placed, Cancelled }
///
/// struct OrdersByStatus;
///
/// impl SqliteProjection for OrdersByStatus {
///     type Event = OrderEvent;
///     fn name(&self) -> &str {
///         "orders-by-status"
///     }
///     async fn apply(
///         &self,
///         transaction: &mut sqlx::SqliteConnection,
///         events: &[Envelope<OrderEvent>],
///     ) -> Result<(), HandlerError> {
///         for event in events {
///             let status = match event.event { OrderEvent::Placed => "placed", OrderEvent::Cancelled => "cancelled" };
///             sqlx::query("INSERT INTO orders_by_status (order_id, status) VALUES (?1, ?2) \
///                          ON CONFLICT (order_id) DO UPDATE SET status = excluded.status")
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
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// # let url = format!("sqlite://{}", dir.path().join("shop.db").display());
/// // The projection's table, created with a connection of your own (or your migrations).
/// let mut ddl = sqlx::SqliteConnection::connect(&format!("{url}?mode=rwc")).await?;
/// sqlx::query("CREATE TABLE orders_by_status (order_id TEXT PRIMARY KEY, status TEXT NOT NULL)")
///     .execute(&mut ddl)
///     .await?;
/// ddl.close().await?;
///
/// let store = SqliteEventStore::connect(&url).await?;
/// let placed = NewEvent::from_domain(&OrderEvent::Placed, Metadata::default())?;
/// let appended = store.append(&StreamId::new("order-7")?, ExpectedVersion::Any, vec![placed]).await?;
/// let progress = Progress::new();
/// let running = spawn_projection(&store, OrdersByStatus, RunnerConfig::default(), &progress);
/// progress.wait_for("orders-by-status", appended.result().last_position, std::time::Duration::from_secs(5)).await?;
/// let status: String = sqlx::query_scalar("SELECT status FROM orders_by_status WHERE order_id = '7'")
///     .fetch_one(store.read_pool())
///     .await?;
/// assert_eq!(status, "placed");
/// running.stop().await;
/// # Ok(()) }
/// ```
pub trait SqliteProjection: Send + Sync + 'static {
    /// The events it decodes.
    type Event: DomainEvent;

    /// The stable name of the projection and its checkpoint.
    fn name(&self) -> &str;

    /// Whether it takes this event (by default, by category and type: see
    /// [`DomainEvent::accepts`]).
    fn interested(&self, event: &RecordedEvent) -> bool {
        Self::Event::accepts(event.category(), &event.event_type)
    }

    /// Applies a batch of events inside `transaction` (the writer's open transaction, under a
    /// savepoint): on an error nothing of the batch is kept and it is retried. Use
    /// `&mut *transaction` as the executor.
    fn apply(
        &self,
        transaction: &mut SqliteConnection,
        events: &[Envelope<Self::Event>],
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// A future that turns a panic while polling it into an error.
struct CatchUnwind<F>(Pin<Box<F>>);

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, Box<dyn Any + Send>>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.0.as_mut();
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

/// A [`SqliteProjection`] run as a [`BatchHandler`] through the store's writer.
struct Transactional<P> {
    projection: Arc<P>,
    store: SqliteEventStore,
}

/// One savepoint around a projection batch.
async fn savepoint<P: SqliteProjection>(
    connection: &mut SqliteConnection,
    projection: &P,
    events: &[Envelope<P::Event>],
    through: i64,
    claim: Option<&Claim>,
) -> Result<Result<Result<(), HandlerError>, StoreError>, sqlx::Error> {
    if let Some(claim) = claim {
        if !holds(connection, claim).await? {
            return Ok(Err(StoreError::ClaimLost { name: claim.name.clone() }));
        }
    }
    connection.execute("SAVEPOINT cqrs_projection").await?;
    let applied =
        if events.is_empty() { Ok(Ok(())) } else { CatchUnwind(Box::pin(projection.apply(connection, events))).await };
    let applied = match applied {
        Ok(result) => result,
        Err(_panic) => Err(HandlerError::new(format!("projection {} panicked in apply", projection.name()))),
    };
    match applied {
        Ok(()) => {
            save_checkpoint(connection, projection.name(), through).await?;
            connection.execute("RELEASE cqrs_projection").await?;
            Ok(Ok(Ok(())))
        }
        Err(error) => {
            connection.execute("ROLLBACK TO cqrs_projection").await?;
            connection.execute("RELEASE cqrs_projection").await?;
            Ok(Ok(Err(error)))
        }
    }
}

impl<P: SqliteProjection> BatchHandler for Transactional<P> {
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
        let projection = Arc::clone(&self.projection);
        let claim = claim.cloned();
        let through = to_i64_saturating(through.0);
        let outcome = run_op(self.store.writes(), move |connection| {
            Box::pin(async move { savepoint(connection, &*projection, &events, through, claim.as_ref()).await })
        })
        .await?;
        outcome
    }
}

/// Starts `projection` on `store`: batches of up to [`DEFAULT_MAX_BATCH`] events, each applied
/// and checkpointed in one transaction on the store's writer; exclusive across the processes
/// that open the file, by default.
pub fn spawn_projection<P: SqliteProjection>(
    store: &SqliteEventStore,
    projection: P,
    config: RunnerConfig,
    progress: &Progress,
) -> RunningHandler {
    spawn_projection_with(store, projection, config, DEFAULT_MAX_BATCH, progress)
}

/// [`spawn_projection`] with batches of at most `max_batch` events.
pub fn spawn_projection_with<P: SqliteProjection>(
    store: &SqliteEventStore,
    projection: P,
    config: RunnerConfig,
    max_batch: usize,
    progress: &Progress,
) -> RunningHandler {
    let handler = Transactional { projection: Arc::new(projection), store: store.clone() };
    spawn_batch_handler(Arc::new(store.clone()), handler, config, max_batch, progress)
}
