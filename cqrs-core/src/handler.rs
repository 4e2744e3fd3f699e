//! Event handlers (projections and side effects) and the runner that drives each one from its
//! own checkpoint: at-least-once, in global order, never skipping an event.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use std::future::Future;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::dispatcher::DispatchError;
use crate::event::{DomainEvent, Envelope, RecordedEvent, Upcasters};
use crate::ids::Position;
use crate::store::{EventStore, StoreError};
use crate::subscription::Subscription;

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

/// A failed follow-up command is a handler failure: `dispatcher.dispatch(cmd).await?` works in
/// [`EventHandler::handle`].
impl<E: std::error::Error + Send + Sync + 'static> From<DispatchError<E>> for HandlerError {
    fn from(error: DispatchError<E>) -> Self {
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

    /// Handles one event. An error makes the runner retry this same event with back-off.
    fn handle(&self, event: Envelope<Self::Event>) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// What a handler runner is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandlerState {
    /// Loading the checkpoint.
    Starting,
    /// Handling events or waiting for new ones.
    Running,
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
    /// Stopped on request.
    Stopped,
}

/// A snapshot of a handler's progress, published on every change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerStatus {
    /// The handler's name.
    pub name: String,
    /// Position of the last event handled (or skipped as not of interest).
    pub position: Position,
    /// What it is doing.
    pub state: HandlerState,
}

/// Why waiting for a handler's progress failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProgressError {
    /// No runner with that name reports to this registry. Check the handler name.
    #[error("no handler named {0:?} is registered")]
    UnknownHandler(String),
    /// The handler did not reach the position in time (it may be stuck; see its status).
    #[error("handler {name:?} did not reach {position} within {timeout:?}")]
    Timeout {
        /// The handler.
        name: String,
        /// The position waited for.
        position: Position,
        /// How long we waited.
        timeout: Duration,
    },
    /// The handler's runner stopped before reaching the position.
    #[error("handler {0:?} stopped")]
    Stopped(String),
}

/// A registry of handler progress shared by runners (which report) and dispatchers (which wait
/// for read-your-writes). Cheap to clone.
#[derive(Clone, Default)]
pub struct Progress {
    handlers: Arc<Mutex<HashMap<String, watch::Receiver<HandlerStatus>>>>,
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

    fn register(&self, name: &str, status: watch::Receiver<HandlerStatus>) {
        let mut handlers = self.handlers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        handlers.insert(name.to_owned(), status);
    }

    /// Whether a runner named `name` reports to this registry.
    pub fn is_registered(&self, name: &str) -> bool {
        self.handlers.lock().unwrap_or_else(std::sync::PoisonError::into_inner).contains_key(name)
    }

    /// The latest status of a handler.
    pub fn status(&self, name: &str) -> Option<HandlerStatus> {
        let handlers = self.handlers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        handlers.get(name).map(|status| status.borrow().clone())
    }

    /// The latest status of every registered handler, sorted by name.
    pub fn statuses(&self) -> Vec<HandlerStatus> {
        let handlers = self.handlers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut statuses: Vec<_> = handlers.values().map(|status| status.borrow().clone()).collect();
        statuses.sort_by(|a, b| a.name.cmp(&b.name));
        statuses
    }

    /// Waits until handler `name` has processed `position`.
    pub async fn wait_for(&self, name: &str, position: Position, timeout: Duration) -> Result<(), ProgressError> {
        let receiver = {
            let handlers = self.handlers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            handlers.get(name).cloned()
        };
        let Some(mut receiver) = receiver else {
            return Err(ProgressError::UnknownHandler(name.to_owned()));
        };
        let reached = async { receiver.wait_for(|status| status.position >= position).await.map(|_| ()) };
        match tokio::time::timeout(timeout, reached).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_closed)) => Err(ProgressError::Stopped(name.to_owned())),
            Err(_elapsed) => Err(ProgressError::Timeout { name: name.to_owned(), position, timeout }),
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

/// Tuning for a handler runner.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// Where to start without a checkpoint.
    pub start_from: StartFrom,
    /// First retry delay after a failure; doubles up to `max_backoff`.
    pub initial_backoff: Duration,
    /// Longest retry delay.
    pub max_backoff: Duration,
    /// After failing on one event for this long, the status becomes [`HandlerState::Stuck`].
    pub stuck_after: Duration,
    /// Save the checkpoint at least every this many events.
    pub checkpoint_every: u32,
    /// When caught up, save the checkpoint once no new event has come for this long. A
    /// trickle of events (one command at a time) then costs one checkpoint write per pause,
    /// not one per event; `Duration::ZERO` saves at once whenever caught up.
    pub checkpoint_delay: Duration,
    /// Events read per store call.
    pub page_size: usize,
    /// Upcasters for decoding.
    pub upcasters: Upcasters,
    /// Where the checkpoint is kept.
    pub checkpoints: Checkpoints,
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
        }
    }
}

/// A running handler: query its status, or stop it. Dropping it also stops the runner (after
/// the event in hand), so keep it for as long as the handler should run.
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

    /// Stops the runner after the event in hand, saves the checkpoint, and waits for it.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        if let Err(error) = self.task.await {
            tracing::error!(handler = %self.name, %error, "handler task ended abnormally");
        }
    }
}

/// Starts a task that feeds `handler` every event after its checkpoint, then live events.
///
/// The checkpoint is loaded from the store (or chosen by [`RunnerConfig::start_from`]), saved
/// after handling (every [`RunnerConfig::checkpoint_every`] events and whenever caught up), and
/// the handler's progress is published to `progress` for read-your-writes.
pub fn spawn_handler<S, H>(store: Arc<S>, handler: H, config: RunnerConfig, progress: &Progress) -> RunningHandler
where
    S: EventStore + ?Sized,
    H: EventHandler,
{
    let name = handler.name().to_owned();
    let (status_tx, status_rx) =
        watch::channel(HandlerStatus { name: name.clone(), position: Position::START, state: HandlerState::Starting });
    progress.register(&name, status_rx.clone());
    let (stop_tx, stop_rx) = watch::channel(false);
    let runner = Runner { store, handler, config, status: status_tx, stop: stop_rx, name: name.clone() };
    let task = tokio::spawn(runner.run());
    RunningHandler { name, status: status_rx, stop: stop_tx, task }
}

struct Runner<S: EventStore + ?Sized, H> {
    store: Arc<S>,
    handler: H,
    config: RunnerConfig,
    status: watch::Sender<HandlerStatus>,
    stop: watch::Receiver<bool>,
    name: String,
}

/// Resolves once the stop flag is set (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await.map(|_| ());
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Returned when the runner was asked to stop while waiting.
struct Stopped;

/// Consecutive failures of one step, with exponential back-off.
struct Failures {
    attempts: u32,
    since: Instant,
    next_delay: Duration,
    max_delay: Duration,
}

impl Failures {
    fn new(config: &RunnerConfig) -> Self {
        Self { attempts: 0, since: Instant::now(), next_delay: config.initial_backoff, max_delay: config.max_backoff }
    }

    /// Records one more failure and returns how long to wait before the next attempt.
    fn record(&mut self) -> Duration {
        if self.attempts == 0 {
            self.since = Instant::now();
        }
        self.attempts += 1;
        let delay = self.next_delay;
        self.next_delay = (self.next_delay * 2).min(self.max_delay);
        delay
    }
}

impl<S: EventStore + ?Sized, H: EventHandler> Runner<S, H> {
    async fn run(mut self) {
        let Ok(start) = self.start_position().await else {
            return self.set_state(HandlerState::Stopped);
        };
        self.status.send_modify(|status| {
            status.position = start;
            status.state = HandlerState::Running;
        });
        let mut feed = Subscription::all(Arc::clone(&self.store), start).with_page_size(self.config.page_size);
        let mut saved = start;
        let mut handled = start;
        let mut since_save = 0u32;
        let mut read_failures = Failures::new(&self.config);
        loop {
            if self.stop_requested() {
                break;
            }
            let read = feed.try_next().await;
            if read.is_ok() && read_failures.attempts > 0 {
                read_failures = Failures::new(&self.config);
                self.set_state(HandlerState::Running);
            }
            let next = match read {
                Ok(Some(event)) => Some(event),
                Ok(None) => {
                    // Caught up. Save the checkpoint once no new event comes within the delay
                    // (at once with a zero delay), and wait for new events meanwhile.
                    let unsaved = handled != saved;
                    if unsaved && self.config.checkpoint_delay.is_zero() && self.save(handled).await.is_ok() {
                        saved = handled;
                        since_save = 0;
                    }
                    let save_at =
                        (handled != saved).then(|| tokio::time::Instant::now() + self.config.checkpoint_delay);
                    let mut stop = self.stop.clone();
                    tokio::select! {
                        // `Subscription::next` is cancel-safe: it changes state only after a read.
                        next = feed.next() => match next {
                            Ok(Some(event)) => Some(event),
                            Ok(None) => break,
                            Err(error) => {
                                if self.read_failed(&mut read_failures, handled, &error).await.is_err() {
                                    break;
                                }
                                None
                            }
                        },
                        () = sleep_until_some(save_at) => {
                            if self.save(handled).await.is_ok() {
                                saved = handled;
                                since_save = 0;
                            }
                            None
                        }
                        () = stopped(&mut stop) => break,
                    }
                }
                Err(error) => {
                    if self.read_failed(&mut read_failures, handled, &error).await.is_err() {
                        break;
                    }
                    None
                }
            };
            let Some(event) = next else { continue };
            if read_failures.attempts > 0 {
                read_failures = Failures::new(&self.config);
            }
            if self.deliver(&event).await.is_err() {
                break;
            }
            handled = event.position;
            self.status.send_modify(|status| {
                status.position = handled;
                status.state = HandlerState::Running;
            });
            since_save += 1;
            if since_save >= self.config.checkpoint_every && self.save(handled).await.is_ok() {
                saved = handled;
                since_save = 0;
            }
        }
        if handled != saved {
            let _ = self.save(handled).await;
        }
        self.set_state(HandlerState::Stopped);
    }

    async fn read_failed(
        &mut self,
        failures: &mut Failures,
        position: Position,
        error: &StoreError,
    ) -> Result<(), Stopped> {
        let delay = failures.record();
        self.report_failure(position, failures, &error.to_string());
        self.sleep_or_stop(delay).await
    }

    async fn start_position(&mut self) -> Result<Position, Stopped> {
        let store = Arc::clone(&self.store);
        let name = self.name.clone();
        let durable = self.config.checkpoints == Checkpoints::Store;
        if durable {
            let checkpoint = self.retrying(Position::START, || store.load_checkpoint(&name)).await?;
            if let Some(position) = checkpoint {
                return Ok(position);
            }
        }
        match self.config.start_from {
            StartFrom::Origin => Ok(Position::START),
            StartFrom::Current => {
                let head = self.retrying(Position::START, || store.head()).await?;
                // Saved at once: a restart before the first event must not move the start past
                // events stored since this first start.
                if durable {
                    self.retrying(head, || store.save_checkpoint(&name, head)).await?;
                }
                Ok(head)
            }
        }
    }

    /// Brings one event up to date, and if the handler is interested in it (by its current
    /// type: an upcaster may have renamed it), decodes and handles it; retries until that
    /// succeeds or the runner is stopped. An event that cannot be upcast is retried (and
    /// reported), never passed over: its interest cannot be known.
    async fn deliver(&mut self, event: &RecordedEvent) -> Result<(), Stopped> {
        let mut failures = Failures::new(&self.config);
        loop {
            let result = match self.config.upcasters.upcast(event) {
                Ok(current) if !self.handler.interested(&current) => return Ok(()),
                Ok(current) => match self.config.upcasters.decode::<H::Event>(&current) {
                    Ok(envelope) => self.handler.handle(envelope).await,
                    Err(error) => Err(HandlerError::new(error)),
                },
                Err(error) => Err(HandlerError::new(error)),
            };
            match result {
                Ok(()) => return Ok(()),
                Err(error) => {
                    let delay = failures.record();
                    self.report_failure(event.position, &failures, &error.to_string());
                    self.sleep_or_stop(delay).await?;
                }
            }
        }
    }

    /// Runs a store call until it succeeds, backing off on errors.
    async fn retrying<T, F, Fut>(&mut self, position: Position, mut call: F) -> Result<T, Stopped>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        let mut failures = Failures::new(&self.config);
        loop {
            if *self.stop.borrow() {
                return Err(Stopped);
            }
            match call().await {
                Ok(value) => return Ok(value),
                Err(error) => {
                    let delay = failures.record();
                    self.report_failure(position, &failures, &error.to_string());
                    self.sleep_or_stop(delay).await?;
                }
            }
        }
    }

    fn report_failure(&self, position: Position, failures: &Failures, error: &str) {
        let attempts = failures.attempts;
        let stuck = failures.since.elapsed() >= self.config.stuck_after;
        if stuck {
            tracing::error!(handler = %self.name, %position, attempts, error, "handler is stuck");
        } else {
            tracing::warn!(handler = %self.name, %position, attempts, error, "handler failed, retrying");
        }
        let error = error.to_owned();
        let state = if stuck {
            HandlerState::Stuck { position, attempts, error }
        } else {
            HandlerState::Retrying { position, attempts, error }
        };
        self.set_state(state);
    }

    /// Whether `stop` was called or the [`RunningHandler`] was dropped.
    fn stop_requested(&self) -> bool {
        *self.stop.borrow() || self.stop.has_changed().is_err()
    }

    async fn sleep_or_stop(&mut self, delay: Duration) -> Result<(), Stopped> {
        tokio::select! {
            _ = tokio::time::sleep(delay) => Ok(()),
            () = stopped(&mut self.stop) => Err(Stopped),
        }
    }

    async fn save(&mut self, position: Position) -> Result<(), StoreError> {
        if self.config.checkpoints == Checkpoints::InMemory {
            return Ok(());
        }
        let result = self.store.save_checkpoint(&self.name, position).await;
        if let Err(error) = &result {
            tracing::warn!(handler = %self.name, %position, %error, "saving checkpoint failed; will retry later");
        }
        result
    }

    fn set_state(&self, state: HandlerState) {
        self.status.send_modify(|status| status.state = state);
    }
}
