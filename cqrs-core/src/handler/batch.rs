//! Batch handlers: events in batches, each batch committed together with the checkpoint (a
//! transactional projection). The runner owns the protocol; the SQL stores' adapters
//! (`cqrs_postgres::spawn_projection`, `cqrs_sqlite::spawn_projection`) own the transaction,
//! and their users write only the table updates.
//!
//! Exactly once: a batch's effects and its checkpoint commit in one transaction, fenced by the
//! claim. When a commit fails, its outcome may be unknown (the connection broke during COMMIT):
//! before retrying, the runner reloads the checkpoint and drops what it covers, so a batch that
//! did commit is never applied again.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::claim::Lease;
use super::runner::{lease_lost, sleep_until_some, stopped, End, Failures, Tenures};
use super::{
    Checkpoints, HandlerError, HandlerMetrics, HandlerState, HandlerStatus, Progress, RunnerConfig, RunningHandler,
};
use crate::coordination::Claim;
use crate::event::{DomainEvent, Envelope, RecordedEvent};
use crate::ids::Position;
use crate::store::{Store, StoreError};
use crate::subscription::Subscription;

/// A handler that takes events in batches and commits each batch together with its checkpoint.
///
/// You rarely implement it yourself: `cqrs_postgres::PgProjection` and
/// `cqrs_sqlite::SqliteProjection` do, around a transaction of their database, and you write
/// only the table updates.
pub trait BatchHandler: Send + Sync + 'static {
    /// The events it decodes.
    type Event: DomainEvent;

    /// The stable name of the handler and its checkpoint.
    fn name(&self) -> &str;

    /// Whether it takes this event (see [`EventHandler::interested`](super::EventHandler::interested)).
    fn interested(&self, event: &RecordedEvent) -> bool {
        Self::Event::accepts(event.category(), &event.event_type)
    }

    /// Applies `events` and saves checkpoint [`name`](Self::name) = `through` in one
    /// transaction, which must also check `claim` (if any) and fail with
    /// [`StoreError::ClaimLost`] (wrapped in the error) when it is lost. `events` may be empty
    /// (only the checkpoint moves). An error means the runner cannot tell whether it committed:
    /// it reloads the checkpoint before retrying.
    fn commit(
        &self,
        events: Vec<Envelope<Self::Event>>,
        through: Position,
        claim: Option<&Claim>,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// How many events a batch holds at most, by default.
pub const DEFAULT_MAX_BATCH: usize = 500;

/// Starts a runner that feeds `handler` batches of at most `max_batch` events (what has
/// arrived by the time the previous batch committed), from its checkpoint. Placement, claims,
/// start position and back-off follow `config` as for [`spawn_handler`](crate::spawn_handler);
/// checkpoints are always in the store (they commit with the batches).
pub fn spawn_batch_handler<S, H>(
    store: Arc<S>,
    handler: H,
    config: RunnerConfig,
    max_batch: usize,
    progress: &Progress,
) -> RunningHandler
where
    S: Store + ?Sized,
    H: BatchHandler,
{
    let config = RunnerConfig { checkpoints: Checkpoints::Store, ..config };
    let name = handler.name().to_owned();
    let (status, status_rx, stop_tx, stop_rx) = super::channels(&name, &config, progress, &store);
    let task = tokio::spawn(run(store, handler, config, max_batch.max(1), status, stop_rx));
    RunningHandler { name, status: status_rx, stop: stop_tx, task }
}

async fn run<S, H>(
    store: Arc<S>,
    handler: H,
    config: RunnerConfig,
    max_batch: usize,
    status: watch::Sender<HandlerStatus>,
    mut stop: watch::Receiver<bool>,
) where
    S: Store + ?Sized,
    H: BatchHandler,
{
    let name = handler.name().to_owned();
    let mut tenures = Tenures::new(&store, &name, &config);
    let metrics = HandlerMetrics::new(&name);
    let runner = BatchRunner { store, handler, config, max_batch, status, name, metrics };
    while let Some((claim, lease)) = tenures.next(|state| runner.set_state(state), &mut stop).await {
        if let Some(claim) = &claim {
            tracing::info!(handler = %runner.name, owner = %claim.owner, token = claim.token, "active: claim taken");
            runner.metrics.takeovers.increment(1);
        }
        runner.metrics.active.set(1.0);
        let end = runner.active(claim, lease, &mut stop).await;
        runner.metrics.active.set(0.0);
        match end {
            End::Stopped => break,
            End::LeaseLost => {
                tracing::warn!(handler = %runner.name, "claim lost; standing by");
                runner.set_state(HandlerState::Standby { holder: None });
            }
        }
    }
    tenures.finish(&*runner.store).await;
    runner.set_state(HandlerState::Stopped);
}

struct BatchRunner<S: ?Sized, H> {
    store: Arc<S>,
    handler: H,
    config: RunnerConfig,
    max_batch: usize,
    status: watch::Sender<HandlerStatus>,
    name: String,
    metrics: HandlerMetrics,
}

/// Where a batch runner's tenure has got to.
struct Cursor {
    /// The checkpoint as committed.
    committed: Position,
    /// The end of the events passed over (not of interest) since the last commit: saved once
    /// idle, without a transaction of the handler's.
    passed_over: Position,
    /// When to save `passed_over`.
    save_at: Option<Instant>,
}

/// Whether a handler error is a lost claim.
fn claim_lost(error: &HandlerError) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = source {
        if matches!(current.downcast_ref::<StoreError>(), Some(StoreError::ClaimLost { .. })) {
            return true;
        }
        source = current.source();
    }
    false
}

impl<S: Store + ?Sized, H: BatchHandler> BatchRunner<S, H> {
    fn set_state(&self, state: HandlerState) {
        self.status.send_if_modified(|status| {
            let changed = status.state != state;
            status.state = state;
            changed
        });
    }

    fn report_failure(&self, position: Position, failures: &Failures, error: &str) {
        let attempts = failures.attempts;
        let stuck = failures.since.elapsed() >= self.config.stuck_after;
        if stuck {
            tracing::error!(handler = %self.name, %position, attempts, error, "batch handler is stuck");
        } else {
            tracing::warn!(handler = %self.name, %position, attempts, error, "batch failed, retrying");
        }
        let error = error.to_owned();
        self.set_state(if stuck {
            HandlerState::Stuck { position, attempts, error }
        } else {
            HandlerState::Retrying { position, attempts, error }
        });
    }

    /// A store call retried until it succeeds; `None` when stopped or the lease is lost.
    async fn retrying<T, Fut>(&self, position: Position, mut call: impl FnMut() -> Fut) -> Result<T, StoreError>
    where
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let mut failures = Failures::new(&self.config);
        loop {
            match call().await {
                Ok(value) => return Ok(value),
                Err(error @ StoreError::ClaimLost { .. }) => return Err(error),
                Err(error) => {
                    let delay = failures.record();
                    self.report_failure(position, &failures, &error.to_string());
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    async fn start_position(&self, claim: Option<&Claim>) -> Result<Position, StoreError> {
        if let Some(position) = self.retrying(Position::START, || self.store.load_checkpoint(&self.name)).await? {
            return Ok(position);
        }
        match self.config.start_from {
            super::StartFrom::Origin => Ok(Position::START),
            super::StartFrom::Current => {
                let head = self.retrying(Position::START, || self.store.head()).await?;
                self.retrying(head, || self.save(head, claim)).await?;
                Ok(head)
            }
        }
    }

    async fn save(&self, position: Position, claim: Option<&Claim>) -> Result<(), StoreError> {
        match claim {
            Some(claim) => self.store.save_checkpoint_claimed(&self.name, position, claim).await,
            None => self.store.save_checkpoint(&self.name, position).await,
        }
    }

    async fn active(
        &self,
        claim: Option<Claim>,
        mut lease: Option<watch::Receiver<Lease>>,
        stop: &mut watch::Receiver<bool>,
    ) -> End {
        let start = match self.begin(claim.as_ref(), &mut lease, stop).await {
            Ok(start) => start,
            Err(end) => return end,
        };
        let mut feed = Subscription::all(Arc::clone(&self.store), start).with_page_size(self.config.page_size);
        let newest = self.store.notifications();
        let mut cursor = Cursor { committed: start, passed_over: start, save_at: None };
        let mut read_failures = Failures::new(&self.config);
        loop {
            let first = tokio::select! {
                biased;
                () = lease_lost(&mut lease, claim.as_ref()) => return End::LeaseLost,
                () = stopped(stop) => break,
                next = feed.next() => match next {
                    Ok(Some(event)) => event,
                    Ok(None) => break,
                    Err(error) => {
                        let delay = read_failures.record();
                        self.report_failure(cursor.passed_over, &read_failures, &error.to_string());
                        tokio::select! {
                            biased;
                            () = lease_lost(&mut lease, claim.as_ref()) => return End::LeaseLost,
                            () = stopped(stop) => break,
                            () = tokio::time::sleep(delay) => continue,
                        }
                    }
                },
                () = sleep_until_some(cursor.save_at) => {
                    if let Err(end) = self.save_passed_over(&mut cursor, claim.as_ref()).await {
                        return end;
                    }
                    continue;
                }
            };
            read_failures = Failures::new(&self.config);
            let (interesting, through) = self.take_batch(first, &mut feed);
            if interesting.is_empty() {
                self.pass_over(&mut cursor, through, &newest);
                continue;
            }
            let outcome = tokio::select! {
                biased;
                () = lease_lost(&mut lease, claim.as_ref()) => return End::LeaseLost,
                outcome = self.commit_with_retries(interesting, through, claim.as_ref(), stop) => outcome,
            };
            match outcome {
                Committed::Yes => self.show_committed(&mut cursor, through, &newest),
                Committed::Stopped => break,
                Committed::ClaimLost => return End::LeaseLost,
            }
        }
        if cursor.passed_over != cursor.committed {
            // Bounded like every stop: a store that is down must not hold the shutdown.
            let _ = tokio::time::timeout(self.config.stop_timeout, self.save(cursor.passed_over, claim.as_ref())).await;
        }
        End::Stopped
    }

    /// Starts a tenure: finds the start position (unless the tenure ends or the runner stops
    /// first) and shows it, `Running`.
    async fn begin(
        &self,
        claim: Option<&Claim>,
        lease: &mut Option<watch::Receiver<Lease>>,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<Position, End> {
        self.set_state(HandlerState::Starting);
        let start = tokio::select! {
            biased;
            () = lease_lost(lease, claim) => return Err(End::LeaseLost),
            () = stopped(stop) => return Err(End::Stopped),
            start = self.start_position(claim) => match start {
                Ok(start) => start,
                Err(_) => return Err(End::LeaseLost),
            },
        };
        self.status.send_modify(|status| {
            status.position = start;
            status.state = HandlerState::Running;
        });
        Ok(start)
    }

    /// A batch: `first` and what the feed has buffered after it, up to `max_batch` events.
    /// Returns the events the handler takes, and the position the batch runs through.
    fn take_batch(&self, first: RecordedEvent, feed: &mut Subscription<S>) -> (Vec<RecordedEvent>, Position) {
        let mut through = first.position;
        let mut batch = vec![first];
        while batch.len() < self.max_batch {
            match feed.next_buffered() {
                Some(event) => {
                    through = event.position;
                    batch.push(event);
                }
                None => break,
            }
        }
        (batch.into_iter().filter(|event| self.is_for_us(event)).collect(), through)
    }

    /// A batch of nothing of interest: shows it as handled; its position is saved once idle.
    fn pass_over(&self, cursor: &mut Cursor, through: Position, newest: &watch::Receiver<Position>) {
        cursor.passed_over = through;
        self.status.send_modify(|status| status.position = through);
        self.metrics.progress(through, *newest.borrow(), 0);
        cursor.save_at = Some(Instant::now() + self.config.checkpoint_delay);
    }

    /// A batch committed through `through`: shows it, `Running`.
    fn show_committed(&self, cursor: &mut Cursor, through: Position, newest: &watch::Receiver<Position>) {
        cursor.committed = through;
        cursor.passed_over = through;
        cursor.save_at = None;
        self.metrics.progress(through, *newest.borrow(), 0);
        self.status.send_modify(|status| {
            status.position = through;
            status.state = HandlerState::Running;
        });
    }

    /// Saves the position passed over, once idle; after a failure, tries again in a second. A
    /// lost claim ends the tenure.
    async fn save_passed_over(&self, cursor: &mut Cursor, claim: Option<&Claim>) -> Result<(), End> {
        cursor.save_at = None;
        match self.save(cursor.passed_over, claim).await {
            Ok(()) => cursor.committed = cursor.passed_over,
            Err(StoreError::ClaimLost { .. }) => return Err(End::LeaseLost),
            Err(_) => cursor.save_at = Some(Instant::now() + Duration::from_secs(1)),
        }
        Ok(())
    }

    /// Whether the handler takes this event. An event that cannot be upcast counts as taken:
    /// its decoding then fails the batch (retried), rather than being passed over.
    fn is_for_us(&self, event: &RecordedEvent) -> bool {
        match self.config.upcasters.upcast(event) {
            Ok(current) => self.handler.interested(&current),
            Err(_) => true,
        }
    }

    /// Commits a batch, retrying with back-off; before each retry the checkpoint is reloaded
    /// and events it already covers are dropped (an unknown outcome may have committed).
    async fn commit_with_retries(
        &self,
        mut events: Vec<RecordedEvent>,
        through: Position,
        claim: Option<&Claim>,
        stop: &mut watch::Receiver<bool>,
    ) -> Committed {
        let mut failures = Failures::new(&self.config);
        loop {
            let decoded: Result<Vec<Envelope<H::Event>>, HandlerError> = events
                .iter()
                .map(|event| self.config.upcasters.decode::<H::Event>(event).map_err(HandlerError::new))
                .collect();
            let count = events.len();
            let span = tracing::info_span!(
                "handle",
                handler = %self.name,
                position = through.0,
                events = count,
                attempt = failures.attempts + 1,
            );
            let result = match decoded {
                Ok(decoded) => {
                    tracing::Instrument::instrument(self.handler.commit(decoded, through, claim), span).await
                }
                Err(error) => Err(error),
            };
            let error = match result {
                Ok(()) => {
                    self.metrics.events.increment(count as u64);
                    return Committed::Yes;
                }
                Err(error) if claim_lost(&error) => return Committed::ClaimLost,
                Err(error) => error,
            };
            self.metrics.failures.increment(1);
            let delay = failures.record();
            self.report_failure(events.first().map_or(through, |event| event.position), &failures, &error.to_string());
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = stopped(stop) => return Committed::Stopped,
            }
            // Did it commit after all?
            match self.store.load_checkpoint(&self.name).await {
                Ok(Some(checkpoint)) if checkpoint >= through => return Committed::Yes,
                Ok(Some(checkpoint)) => events.retain(|event| event.position > checkpoint),
                Ok(None) | Err(_) => {}
            }
        }
    }
}

/// How a batch's commit ended.
enum Committed {
    Yes,
    Stopped,
    ClaimLost,
}
