//! Event handlers (projections and side effects) and the runner that drives each one from its
//! own checkpoint: at-least-once, in global order (or in order per partition, with several
//! workers), never skipping an event.
//!
//! - [`spawn_handler`] starts a runner; [`RunnerConfig`] says where it starts, how it retries,
//!   whether it runs in one process at a time ([`Placement`]), how many workers it has, and
//!   what it does with an event that keeps failing ([`ErrorPolicy`]).
//! - One active consumer across processes: an exclusive runner holds a claim in the store
//!   (see [`Coordination::claim`](crate::Coordination::claim)); the others stand by
//!   ([`HandlerState::Standby`]) and take over once it lapses. Its checkpoint writes are
//!   fenced by the claim, and it stops handling before the claim could lapse, so two
//!   processes are never active at once.
//! - Parked events: with [`ErrorPolicy::ParkAfter`], an event that fails too often is stored
//!   with its error (with every later event of its sequence behind it, in order) and the
//!   handler goes on; [`ParkedEvents`] lets an operator list, retry or discard them.

mod batch;
mod claim;
pub mod control;
mod parking;
mod runner;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::future::Future;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::coordination::{Claim, DEFAULT_CLAIM_RETRY, DEFAULT_CLAIM_TTL};
use crate::event::{DomainEvent, Envelope, RecordedEvent, Upcasters};
use crate::ids::Position;
use crate::store::{Store, StoreError};

pub use batch::{spawn_batch_handler, BatchHandler, DEFAULT_MAX_BATCH};
pub(crate) use runner::{lease_lost as lease_ended, stopped as stop_signal, Tenures};

/// The tenures (claim periods) of a task named `name` configured like a runner: for
/// schedulers and other exclusive tasks that are not event handlers.
pub(crate) fn runner_tenures<S: Store + ?Sized>(store: &Arc<S>, name: &str, config: &RunnerConfig) -> Tenures {
    Tenures::new(store, name, config)
}
pub use control::{ControlError, HandlerControl};
pub use parking::ParkedEvents;

/// A failure reported by a handler. The runner retries the same event with back-off.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct HandlerError(Box<dyn std::error::Error + Send + Sync>);

impl HandlerError {
    /// Wraps any error.
    pub fn new(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self(error.into())
    }
}

impl From<StoreError> for HandlerError {
    fn from(error: StoreError) -> Self {
        Self::new(error)
    }
}

/// A named consumer of events: a projection that builds a read model, or a side effect (send a
/// mail, dispatch a follow-up command made with [`Envelope::cause`], whose id is derived from
/// the event so a redelivery cannot apply it twice).
///
/// The [`name`](EventHandler::name) identifies the handler's checkpoint: keep it stable, or
/// change it on purpose to replay from the start. Delivery is at least once, so `handle` must
/// be idempotent (a projection can compare `event.position` with what it has stored).
///
/// A handler takes the events its [`Event`](EventHandler::Event) type declares for their
/// stream category ([`DomainEvent::accepts`]); with the derive that is the category and names
/// of the event enum. An event it takes but cannot decode is a failure like any other: the
/// runner retries it and reports the handler `Retrying`, then `Stuck`; it never passes it over.
///
/// `handle` is a native `async fn` (no `#[async_trait]` needed): write
/// `async fn handle(&self, event: Envelope<MyEvent>) -> Result<(), HandlerError>`; its future
/// must be `Send`, since the runner is a tokio task.
pub trait EventHandler: Send + Sync + 'static {
    /// The events this handler decodes.
    type Event: DomainEvent;

    /// The stable name of the handler and its checkpoint.
    fn name(&self) -> &str;

    /// Whether this event is for this handler. By default: its event type accepts it
    /// ([`DomainEvent::accepts`], by stream category and type name). The runner asks with the
    /// event already upcast (current type and shape). Events not of interest still advance the
    /// checkpoint.
    fn interested(&self, event: &RecordedEvent) -> bool {
        Self::Event::accepts(event.category(), &event.event_type)
    }

    /// Handles one event. An error makes the runner retry this same event with back-off (or
    /// park it, see [`ErrorPolicy`]).
    fn handle(&self, event: Envelope<Self::Event>) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// The sequence an event belongs to: events of one sequence are handled one at a time, in
    /// position order, and an event parked after failing holds back the rest of its sequence.
    /// With [`RunnerConfig::workers`] above 1, different sequences are handled in parallel
    /// (Commanded's `partition_by`, Axon's sequencing policy). By default, the event's stream:
    /// events of one aggregate instance stay in order.
    fn partition_key(&self, event: &Envelope<Self::Event>) -> String {
        event.stream_id.as_str().to_owned()
    }
}

/// What a handler runner is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandlerState {
    /// Loading the checkpoint.
    Starting,
    /// Handling events or waiting for new ones.
    Running,
    /// An exclusive handler that another process runs: this one waits to take over when that
    /// process's claim lapses.
    Standby {
        /// Who holds the claim (`None` while the store cannot be asked).
        holder: Option<String>,
    },
    /// The event at `position` failed `attempts` times so far; retrying with back-off.
    Retrying {
        /// The event being retried.
        position: Position,
        /// Failed attempts so far.
        attempts: u32,
        /// The last error.
        error: String,
    },
    /// Like `Retrying`, but for longer than the configured threshold: an operator should look.
    /// The runner keeps retrying; it never skips the event.
    Stuck {
        /// The event that keeps failing.
        position: Position,
        /// Failed attempts so far.
        attempts: u32,
        /// The last error.
        error: String,
    },
    /// An exclusive handler an operator paused ([`HandlerControl::pause`]): no process runs it
    /// until the pause is lifted; its checkpoint stays where it was.
    Paused {
        /// Who paused it.
        by: String,
    },
    /// Stopped on request.
    Stopped,
}

/// The state in words, as an operator reads it ("running", "paused by ops:alice", "stuck at
/// 42 after 9 failures: ...").
impl fmt::Display for HandlerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandlerState::Starting => f.write_str("starting"),
            HandlerState::Running => f.write_str("running"),
            HandlerState::Standby { holder } => {
                write!(f, "standing by ({} is active)", holder.as_deref().unwrap_or("another process"))
            }
            HandlerState::Retrying { attempts, error, .. } => write!(f, "retrying ({attempts} failures): {error}"),
            HandlerState::Stuck { position, attempts, error } => {
                write!(f, "stuck at {position} after {attempts} failures: {error}")
            }
            HandlerState::Paused { by } => write!(f, "paused by {by}"),
            HandlerState::Stopped => f.write_str("stopped"),
        }
    }
}

/// A snapshot of a handler's progress, published on every change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerStatus {
    /// The handler's name.
    pub name: String,
    /// Position below which every event has been handled (or passed over as not of interest,
    /// or parked).
    pub position: Position,
    /// What it is doing.
    pub state: HandlerState,
    /// This runner's process identity ([`RunnerConfig::owner`]).
    pub owner: String,
    /// Where it runs: in this process only while it holds the claim, or in every process.
    pub placement: Placement,
    /// How many events it has parked (known to this runner; see [`ParkedEvents`]).
    pub parked: u64,
}

impl HandlerStatus {
    /// Whether this runner is the active consumer (it is running, retrying or stuck, not
    /// starting, standing by or stopped).
    pub fn is_active(&self) -> bool {
        matches!(self.state, HandlerState::Running | HandlerState::Retrying { .. } | HandlerState::Stuck { .. })
    }
}

/// Reads a handler's checkpoint from the store: how a process that stands by for an exclusive
/// handler learns how far the active process has got.
type CheckpointReader =
    Arc<dyn Fn() -> std::pin::Pin<Box<dyn Future<Output = Result<Option<Position>, StoreError>> + Send>> + Send + Sync>;

/// What a [`Progress`] registry knows of one runner.
#[derive(Clone)]
struct Registered {
    status: watch::Receiver<HandlerStatus>,
    /// For runners with checkpoints in the store.
    checkpoint: Option<CheckpointReader>,
}

/// How often a wait for an exclusive handler that another process runs reads its checkpoint
/// (first, then doubling up to the second).
const CHECKPOINT_POLL: (Duration, Duration) = (Duration::from_millis(5), Duration::from_millis(100));

/// Why waiting for a handler's progress failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProgressError {
    /// No runner with that name reports to this registry. Check the handler name.
    #[error("no handler named {0:?} is registered")]
    UnknownHandler(String),
    /// The handler did not reach the position in time (it may be stuck; see its status).
    #[error(
        "handler {name:?} did not reach {position} within {timeout:?}{}",
        last_failure.as_ref().map(|failure| format!("; its last failure: {failure}")).unwrap_or_default()
    )]
    Timeout {
        /// The handler.
        name: String,
        /// The position waited for.
        position: Position,
        /// How long we waited.
        timeout: Duration,
        /// Why it is behind, if it failed while we waited (the event, the attempt and the
        /// handler's error, or why its checkpoint could not be read).
        last_failure: Option<String>,
    },
    /// The handler's runner stopped before reaching the position.
    #[error("handler {0:?} stopped")]
    Stopped(String),
}

/// A registry of handler progress shared by runners (which report) and dispatchers (which wait
/// for read-your-writes). Cheap to clone.
///
/// Waiting works on every node: a runner that is active here is watched directly; for an
/// exclusive runner that stands by here (another process holds its claim) the wait reads the
/// handler's checkpoint from the store instead, so a read-your-writes request sent to any node
/// of a cluster returns once the holder, wherever it runs, has saved a checkpoint at or past
/// the command's events (within its `checkpoint_delay`, 100 ms by default, of handling them).
#[derive(Clone, Default)]
pub struct Progress {
    handlers: Arc<Mutex<HashMap<String, Registered>>>,
}

impl fmt::Debug for Progress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let handlers = self.handlers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        f.debug_struct("Progress").field("handlers", &handlers.keys().collect::<Vec<_>>()).finish()
    }
}

impl Progress {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn register(&self, name: &str, status: watch::Receiver<HandlerStatus>, checkpoint: Option<CheckpointReader>) {
        let mut handlers = self.handlers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        handlers.insert(name.to_owned(), Registered { status, checkpoint });
    }

    /// Whether a runner named `name` reports to this registry.
    pub fn is_registered(&self, name: &str) -> bool {
        self.handlers.lock().unwrap_or_else(std::sync::PoisonError::into_inner).contains_key(name)
    }

    /// The latest status of a handler.
    pub fn status(&self, name: &str) -> Option<HandlerStatus> {
        let handlers = self.handlers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        handlers.get(name).map(|registered| registered.status.borrow().clone())
    }

    /// The latest status of every registered handler, sorted by name.
    pub fn statuses(&self) -> Vec<HandlerStatus> {
        let handlers = self.handlers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut statuses: Vec<_> = handlers.values().map(|registered| registered.status.borrow().clone()).collect();
        statuses.sort_by(|a, b| a.name.cmp(&b.name));
        statuses
    }

    /// Waits until handler `name` has processed `position`: here, if its runner is active in
    /// this process, or by its checkpoint in the store, if it stands by here. A timeout names
    /// the handler's last failure seen while waiting.
    pub async fn wait_for(&self, name: &str, position: Position, timeout: Duration) -> Result<(), ProgressError> {
        let registered = {
            let handlers = self.handlers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            handlers.get(name).cloned()
        };
        let Some(Registered { status: mut receiver, checkpoint }) = registered else {
            return Err(ProgressError::UnknownHandler(name.to_owned()));
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last_failure: Option<String> = None;
        let mut poll = CHECKPOINT_POLL.0;
        loop {
            let status = receiver.borrow_and_update().clone();
            if status.position >= position {
                return Ok(());
            }
            if let HandlerState::Retrying { position, attempts, error }
            | HandlerState::Stuck { position, attempts, error } = &status.state
            {
                last_failure = Some(format!("{position}, attempt {attempts}: {error}"));
            }
            if let HandlerState::Paused { by } = &status.state {
                last_failure = Some(format!("paused by {by}"));
            }
            if status.state == HandlerState::Stopped {
                return Err(ProgressError::Stopped(name.to_owned()));
            }
            // Another process is (or may be) the active consumer: its checkpoint tells.
            let elsewhere = match (&checkpoint, &status.state) {
                (Some(read), HandlerState::Standby { .. } | HandlerState::Starting) => Some(read),
                _ => None,
            };
            if let Some(read) = elsewhere {
                match read().await {
                    Ok(Some(saved)) if saved >= position => return Ok(()),
                    Ok(_) => {}
                    Err(error) => last_failure = Some(format!("reading its checkpoint: {error}")),
                }
            }
            let poll_at = elsewhere.map(|_| tokio::time::Instant::now() + poll);
            tokio::select! {
                changed = receiver.changed() => {
                    if changed.is_err() {
                        if receiver.borrow().position >= position {
                            return Ok(());
                        }
                        return Err(ProgressError::Stopped(name.to_owned()));
                    }
                }
                () = runner::sleep_until_some(poll_at) => poll = (poll * 2).min(CHECKPOINT_POLL.1),
                () = tokio::time::sleep_until(deadline) => {
                    return Err(ProgressError::Timeout { name: name.to_owned(), position, timeout, last_failure });
                }
            }
        }
    }
}

/// Where a handler without a checkpoint starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartFrom {
    /// From the first event (build a projection from history).
    #[default]
    Origin,
    /// From the events stored after the runner starts (a side effect that must not act on
    /// history).
    Current,
}

/// Where a handler's checkpoint lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Checkpoints {
    /// In the event store: a restart resumes after the last saved position (a durable
    /// projection or a side effect).
    #[default]
    Store,
    /// Only in the runner's memory: every start begins at [`RunnerConfig::start_from`] and
    /// nothing is written to the store. For a projection whose state itself lives in RAM and
    /// must be rebuilt from history on each start (a saved checkpoint would skip that history).
    InMemory,
}

/// Where a handler runs when several processes share a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Placement {
    /// [`Exclusive`](Placement::Exclusive) with checkpoints in the store,
    /// [`EveryProcess`](Placement::EveryProcess) with checkpoints in memory.
    #[default]
    Auto,
    /// In one process at a time: the runner claims the handler's name in the store, the
    /// others stand by. For side effects (mail, calls to other services) and durable
    /// projections.
    Exclusive,
    /// In every process: for handlers that build per-process state, such as a read model kept
    /// in RAM.
    EveryProcess,
}

impl Placement {
    /// What `Auto` means for these checkpoints.
    pub fn resolve(self, checkpoints: Checkpoints) -> Placement {
        match (self, checkpoints) {
            (Placement::Auto, Checkpoints::Store) => Placement::Exclusive,
            (Placement::Auto, Checkpoints::InMemory) => Placement::EveryProcess,
            (other, _) => other,
        }
    }
}

/// What a runner does with an event its handler keeps failing on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ErrorPolicy {
    /// Retry with back-off for ever; the handler waits on the event (reported `Retrying`, then
    /// `Stuck`).
    #[default]
    RetryForever,
    /// After this many failed attempts, park the event (stored durably with its error) and go
    /// on. Later events of the same sequence ([`EventHandler::partition_key`]) are parked
    /// behind it, so no sequence is handled out of order. An operator retries or discards
    /// parked events with [`ParkedEvents`].
    ParkAfter {
        /// Failed attempts before parking (at least 1).
        attempts: u32,
    },
}

/// Tuning for a handler runner. Every field has a default ([`RunnerConfig::default`]), named
/// on the field; set the ones you need with `..RunnerConfig::default()`.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// Where to start without a checkpoint. Default: [`StartFrom::Origin`].
    pub start_from: StartFrom,
    /// First retry delay after a failure (of the handler, or of a store call); doubles up to
    /// `max_backoff`. Default: 20 ms.
    pub initial_backoff: Duration,
    /// Longest retry delay. An exclusive runner never waits past its lease, however long
    /// this is. Default: 5 s.
    pub max_backoff: Duration,
    /// After failing on one event for this long, the status becomes [`HandlerState::Stuck`].
    /// Default: 30 s.
    pub stuck_after: Duration,
    /// Save the checkpoint at least every this many events. Default: 256.
    pub checkpoint_every: u32,
    /// When caught up, save the checkpoint once no new event has come for this long. A
    /// trickle of events (one command at a time) then costs one checkpoint write per pause,
    /// not one per event; `Duration::ZERO` saves at once whenever caught up. It is also how
    /// soon other processes see this runner's progress ([`Progress::wait_for`] on a node
    /// that stands by). Default: 100 ms.
    pub checkpoint_delay: Duration,
    /// Events read per store call. Default: 512.
    pub page_size: usize,
    /// Upcasters for decoding. Default: none.
    pub upcasters: Upcasters,
    /// Where the checkpoint is kept. Default: [`Checkpoints::Store`].
    pub checkpoints: Checkpoints,
    /// One process at a time, or every process. Default: [`Placement::Auto`] (exclusive with
    /// checkpoints in the store).
    pub placement: Placement,
    /// What to do with an event that keeps failing. Default: [`ErrorPolicy::RetryForever`].
    pub on_error: ErrorPolicy,
    /// Tasks handling events at once (at least 1). With more than one, events are spread by
    /// [`EventHandler::partition_key`]: in order within a key, in parallel across keys; the
    /// checkpoint moves only past positions below which every event is handled. Default: 1.
    pub workers: usize,
    /// This process's identity in claims. Default: [`default_owner`](crate::default_owner)
    /// (`host:pid:random`).
    pub owner: String,
    /// How long a claim lasts unless renewed (renewed every third of it). An exclusive
    /// handler whose process dies is taken over within `claim_ttl + claim_retry`. The holder
    /// acts only for 90 % of it after asking, so a lease assumes that the store's clock
    /// (the database server's) does not step by more than a tenth of `claim_ttl` while it is
    /// held: run NTP slewing, not stepping. Default: 3 s.
    pub claim_ttl: Duration,
    /// How often a standby asks for the claim. Default: 1 s.
    pub claim_retry: Duration,
    /// How often a runner with parked events looks for operators' retry requests and
    /// discards. Default: 1 s.
    pub parked_poll: Duration,
    /// The longest a graceful [`RunningHandler::stop`] waits for the events in hand, the last
    /// checkpoint save and giving the claim up (a store that is down must not hold a shutdown).
    /// Past it the events in hand are dropped half-done (handled again by the next holder)
    /// and an unreleased claim lapses after `claim_ttl`. An exclusive runner's stop never
    /// runs past its lease, whatever this says. Default: 5 s.
    pub stop_timeout: Duration,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            start_from: StartFrom::Origin,
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_secs(5),
            stuck_after: Duration::from_secs(30),
            checkpoint_every: 256,
            checkpoint_delay: Duration::from_millis(100),
            page_size: crate::subscription::DEFAULT_PAGE_SIZE,
            upcasters: Upcasters::new(),
            checkpoints: Checkpoints::Store,
            placement: Placement::Auto,
            on_error: ErrorPolicy::RetryForever,
            workers: 1,
            owner: crate::coordination::default_owner(),
            claim_ttl: DEFAULT_CLAIM_TTL,
            claim_retry: DEFAULT_CLAIM_RETRY,
            parked_poll: Duration::from_secs(1),
            stop_timeout: Duration::from_secs(5),
        }
    }
}

/// A running handler: query its status, or stop it. Dropping it also stops the runner (after
/// the events in hand), so keep it for as long as the handler should run.
#[derive(Debug)]
pub struct RunningHandler {
    name: String,
    status: watch::Receiver<HandlerStatus>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// A running handler names itself, so it can be passed to
/// [`Consistency::strong`](crate::Consistency::strong).
impl AsRef<str> for RunningHandler {
    fn as_ref(&self) -> &str {
        &self.name
    }
}

impl RunningHandler {
    /// The handler's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its latest status.
    pub fn status(&self) -> HandlerStatus {
        self.status.borrow().clone()
    }

    /// A receiver that sees every status change.
    pub fn watch(&self) -> watch::Receiver<HandlerStatus> {
        self.status.clone()
    }

    /// Stops at once, as if the process had died: the events in hand are dropped half-done,
    /// nothing more is saved, and the claim is not given up (it lapses after its ttl). For
    /// crash tests.
    pub fn abort(self) {
        self.task.abort();
    }

    /// Stops the runner after the events in hand, saves the checkpoint, gives up its claim (so
    /// a standby takes over at once), and waits for it. Bounded: at most
    /// [`RunnerConfig::stop_timeout`] (and never past an exclusive runner's lease) for the
    /// events in hand and the saves, however the store is doing; what is not done by then is
    /// dropped and handled again by the next holder.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        if let Err(error) = self.task.await {
            tracing::error!(handler = %self.name, %error, "handler task ended abnormally");
        }
    }
}

tokio::task_local! {
    static CURRENT_CLAIM: Option<Claim>;
}

/// The claim under which the current event is being handled, inside
/// [`EventHandler::handle`] of an exclusive runner: pass it as the fence of writes that must
/// not land once another process has taken over (for example
/// [`Coordination::save_process`](crate::Coordination::save_process)). `None` outside a
/// handler or for an every-process runner.
pub fn current_claim() -> Option<Claim> {
    CURRENT_CLAIM.try_with(Clone::clone).ok().flatten()
}

/// Starts a task that feeds `handler` every event after its checkpoint, then live events.
///
/// The checkpoint is loaded from the store (or chosen by [`RunnerConfig::start_from`]), saved
/// after handling (every [`RunnerConfig::checkpoint_every`] events and whenever caught up), and
/// the handler's progress is published to `progress` for read-your-writes. An exclusive runner
/// first waits for its claim ([`Placement`]).
pub fn spawn_handler<S, H>(store: Arc<S>, handler: H, config: RunnerConfig, progress: &Progress) -> RunningHandler
where
    S: Store + ?Sized,
    H: EventHandler,
{
    let name = handler.name().to_owned();
    let (status_tx, status_rx, stop_tx, stop_rx) = channels(&name, &config, progress, &store);
    let task = tokio::spawn(runner::run(store, handler, config, status_tx, stop_rx));
    RunningHandler { name, status: status_rx, stop: stop_tx, task }
}

/// The metrics of one runner (see [`crate::telemetry`]), created once: their label is the
/// handler's name.
pub(crate) struct HandlerMetrics {
    pub(crate) position: metrics::Gauge,
    pub(crate) lag: metrics::Gauge,
    pub(crate) events: metrics::Counter,
    pub(crate) failures: metrics::Counter,
    pub(crate) parked: metrics::Gauge,
    pub(crate) active: metrics::Gauge,
    pub(crate) takeovers: metrics::Counter,
}

impl HandlerMetrics {
    pub(crate) fn new(name: &str) -> Self {
        let label = || ("handler", name.to_owned());
        Self {
            position: metrics::gauge!("cqrs_handler_position", &[label()]),
            lag: metrics::gauge!("cqrs_handler_lag_events", &[label()]),
            events: metrics::counter!("cqrs_handler_events_total", &[label()]),
            failures: metrics::counter!("cqrs_handler_failures_total", &[label()]),
            parked: metrics::gauge!("cqrs_handler_parked_events", &[label()]),
            active: metrics::gauge!("cqrs_handler_active", &[label()]),
            takeovers: metrics::counter!("cqrs_handler_takeovers_total", &[label()]),
        }
    }

    /// Publishes the position (and the lag behind the newest announced position).
    pub(crate) fn progress(&self, position: Position, newest: Position, parked: u64) {
        self.position.set(position.0 as f64);
        self.lag.set(newest.0.saturating_sub(position.0) as f64);
        self.parked.set(parked as f64);
    }
}

/// A new runner's status channel (registered with `progress`, with a reader of its checkpoint
/// in `store` when it keeps one there) and stop channel.
fn channels<S: Store + ?Sized>(
    name: &str,
    config: &RunnerConfig,
    progress: &Progress,
    store: &Arc<S>,
) -> (watch::Sender<HandlerStatus>, watch::Receiver<HandlerStatus>, watch::Sender<bool>, watch::Receiver<bool>) {
    let (status_tx, status_rx) = watch::channel(HandlerStatus {
        name: name.to_owned(),
        position: Position::START,
        state: HandlerState::Starting,
        owner: config.owner.clone(),
        placement: config.placement.resolve(config.checkpoints),
        parked: 0,
    });
    let checkpoint = (config.checkpoints == Checkpoints::Store).then(|| {
        let (store, name) = (Arc::clone(store), name.to_owned());
        Arc::new(move || {
            let (store, name) = (Arc::clone(&store), name.clone());
            Box::pin(async move { store.load_checkpoint(&name).await })
                as std::pin::Pin<Box<dyn Future<Output = Result<Option<Position>, StoreError>> + Send>>
        }) as CheckpointReader
    });
    progress.register(name, status_rx.clone(), checkpoint);
    let (stop_tx, stop_rx) = watch::channel(false);
    (status_tx, status_rx, stop_tx, stop_rx)
}
