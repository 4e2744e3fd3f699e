//! Process managers (sagas): workflows across aggregates, driven by events.
//!
//! A [`ProcessManager`] routes each event to an instance by a correlation key (an order id,
//! say): [`Route::Start`], [`Route::Continue`] or [`Route::Stop`]. For that instance it decides
//! commands to send now and commands to send later ([`Effects`]), and evolves the instance's
//! state, which the store keeps
//! ([`Coordination::save_process`](crate::Coordination::save_process)). Commands go out
//! through a [`CommandRouter`] (usually one [`Dispatcher`](crate::Dispatcher) per aggregate) with
//! causation and correlation from the triggering event.
//!
//! **Exactly-once effects under at-least-once delivery.** Every command's id is derived from
//! the triggering event, the process, the instance and the step
//! ([`CommandId::derived`](crate::CommandId::derived)), so a replay after a crash sends the same
//! ids and the stores' command-id check applies each once. Per event the runner: loads the
//! instance (an event at or below the instance's saved position was handled: skipped), decides,
//! sends the commands, stores schedules and cancellations (idempotent), then saves the new state
//! with the event's position. A crash anywhere in between replays the event into the same
//! state, which decides the same commands. Because the id comes from the step, one reaction
//! may not use a step (or schedule) name twice: the runner refuses such a reaction before
//! sending anything ([`RepeatedStep`], a bug in the process manager: the event is retried or
//! parked like any handler failure), and [`ProcessTest`](crate::testing::ProcessTest) fails
//! with the same error.
//!
//! **Ending.** An instance ends on [`Route::Stop`] or when its reaction calls [`Effects::end`];
//! without either it lives for ever ([`ProcessAdmin::instances`] lists them). An ended instance
//! keeps a tombstone with the ending event's position, so a replay (after a checkpoint that
//! lagged) does not restart it, until the checkpoint passes it (the scheduler prunes tombstones
//! at or below the checkpoint once a minute, the first time a minute after it starts). Axon and Commanded delete an
//! ended saga outright; they can, because their token or subscription position moves in the
//! same transaction. Here the instance and the checkpoint are saved separately, so the tombstone
//! stands in for that.
//!
//! **Refusals.** A command refused by its aggregate goes to [`ProcessManager::rejected`] with
//! the state the reaction decided on and the typed [`Rejection`]; a refused compensation fails
//! the event ([`CompensationRefused`]), so the error policy retries or parks it.
//!
//! **Durable timeouts.** [`Effects::schedule`] stores a command with a due time (computed from
//! the event's `recorded_at`, so replays agree). A scheduler task, exclusive across processes
//! like the event runner, fires due commands with their stored ids (a second firing is a
//! duplicate) and removes them; a [`Clock::test`](crate::Clock::test) makes this testable
//! without waiting. A command that cannot fire (unreadable, or failing
//! [`MAX_FIRING_ATTEMPTS`](crate::MAX_FIRING_ATTEMPTS) times with a back-off) is set aside, like
//! a parked event: [`ProcessAdmin`] lists, retries and discards them.
//!
//! **Renaming.** The name is part of every derived command id, the checkpoint and the stored
//! instances and schedules: a plain new name re-runs history with new ids. List old names in
//! [`ProcessManager::previous_names`] to rename without that (what a Commanded or Axon user
//! does by hand: start the new subscription or processing group at the old one's position;
//! here the ids stay the same too, so even an event handled again across the rename applies
//! its commands once).
//!
//! The runner is the ordinary handler runner, so a process manager gets one active consumer
//! across processes, partitions by instance key ([`RunnerConfig::workers`]) and parked events.

mod admin;
mod handler;
mod scheduler;

pub use admin::ProcessAdmin;

#[cfg(feature = "testing")]
pub(crate) use handler::{compensate, react};

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::aggregate::CommandEnvelope;
use crate::clock::Clock;
use crate::dispatcher::DispatchError;
use crate::event::{DomainEvent, Envelope};
use crate::handler::{spawn_handler, HandlerError, Progress, RunnerConfig, RunningHandler};
use crate::ids::Timestamp;
use crate::store::Store;

/// How an event concerns a process manager.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Not at all.
    Ignore,
    /// Starts instance `key` (or continues it, if it exists).
    Start(String),
    /// Continues instance `key`; ignored if it does not exist.
    Continue(String),
    /// Handles the event in instance `key`, then ends it: its pending schedules are cancelled
    /// and its state is replaced by a tombstone ([`ProcessState::ended`](crate::ProcessState::ended))
    /// at this event's position, so a replay of its earlier events (after a checkpoint that
    /// lagged) sends nothing; a later `Start` begins a new instance. Tombstones at or below the
    /// saved checkpoint are pruned by the scheduler (once a minute). Ignored if the instance
    /// does not exist.
    Stop(String),
}

impl Route {
    /// The instance key, if the event concerns one.
    pub fn key(&self) -> Option<&str> {
        match self {
            Route::Ignore => None,
            Route::Start(key) | Route::Continue(key) | Route::Stop(key) => Some(key),
        }
    }
}

/// What a process manager asks for in reaction to one event: commands now (each under a step
/// name, unique among this reaction's steps), commands later, and cancellations.
#[derive(Debug, Clone, PartialEq)]
pub struct Effects<C> {
    commands: Vec<(String, C)>,
    scheduled: Vec<(String, Timestamp, C)>,
    cancelled: Vec<String>,
    ended: bool,
}

impl<C> Default for Effects<C> {
    fn default() -> Self {
        Self { commands: Vec::new(), scheduled: Vec::new(), cancelled: Vec::new(), ended: false }
    }
}

impl<C> Effects<C> {
    /// Sends `command` now. `step` names it within this reaction (`"reserve:tea"`); its id is
    /// derived from the event, the instance and the step, so each command of one reaction needs
    /// its own step: a repeated one fails the reaction ([`RepeatedStep`]).
    pub fn dispatch(&mut self, step: impl Into<String>, command: C) {
        self.commands.push((step.into(), command));
    }

    /// Sends `command` at `due` (replacing a pending schedule of the same `name` in this
    /// instance). Compute `due` from the event's `recorded_at`, not from the wall clock, so a
    /// replay schedules the same time. It fires at `due` or up to about half a second later
    /// (the scheduler looks every 500 ms), never earlier.
    pub fn schedule(&mut self, name: impl Into<String>, due: Timestamp, command: C) {
        self.scheduled.push((name.into(), due, command));
    }

    /// Cancels the pending schedule `name` of this instance.
    pub fn cancel(&mut self, name: impl Into<String>) {
        self.cancelled.push(name.into());
    }

    /// Ends the instance after this reaction, as [`Route::Stop`] does: its commands are sent,
    /// then every pending schedule of the instance (this reaction's included) is cancelled and
    /// its state replaced by a tombstone. For workflows that finish on an event that also
    /// continues them ("the last line shipped"), so that instances do not live for ever. This
    /// is Axon's `SagaLifecycle.end()` / Commanded's `{:stop, id}` decided in the handler.
    pub fn end(&mut self) {
        self.ended = true;
    }

    /// Whether this reaction ends the instance ([`end`](Self::end)).
    pub fn ends(&self) -> bool {
        self.ended
    }

    /// The commands to send now, with their steps.
    pub fn commands(&self) -> &[(String, C)] {
        &self.commands
    }

    /// The commands to send later: (name, due, command).
    pub fn scheduled(&self) -> &[(String, Timestamp, C)] {
        &self.scheduled
    }

    /// The schedules to cancel.
    pub fn cancelled(&self) -> &[String] {
        &self.cancelled
    }

    /// Checks that no step name (and no schedule name) is used twice: each command's id is
    /// derived from its step, so a second command under the same step would get the first
    /// one's id and be taken by the store for a duplicate of it (and silently dropped). The
    /// runner refuses such a reaction (a bug in `handle` or `rejected`) before sending anything;
    /// [`ProcessTest`](crate::testing::ProcessTest) fails the test with the same error.
    pub fn check_steps(&self, process: &str) -> Result<(), RepeatedStep> {
        let repeated = |kind: &'static str, names: Vec<&String>| {
            let mut seen = std::collections::HashSet::new();
            match names.into_iter().find(|name| !seen.insert(name.as_str())) {
                Some(step) => Err(RepeatedStep { process: process.to_owned(), kind, step: step.clone() }),
                None => Ok(()),
            }
        };
        repeated("step", self.commands.iter().map(|(step, _)| step).collect())?;
        repeated("schedule", self.scheduled.iter().map(|(name, _, _)| name).collect())
    }
}

/// A reaction of a process manager used one step (or schedule) name twice: a bug in its
/// `handle` (or `rejected`). Nothing of the reaction is sent; the event fails like any handler
/// error (retried, or parked under [`ErrorPolicy::ParkAfter`](crate::ErrorPolicy::ParkAfter)).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "process manager {process:?}: {kind} {step:?} is used twice in one reaction; give each command its own \
     {kind} name (its id is derived from it, so the second would be dropped as a duplicate of the first)"
)]
pub struct RepeatedStep {
    /// The process manager's name.
    pub process: String,
    /// `"step"` (a command sent now) or `"schedule"`.
    pub kind: &'static str,
    /// The repeated name.
    pub step: String,
}

/// A workflow across aggregates, one instance per correlation key.
///
/// `handle` and `apply` must be deterministic: the same state and event give the same effects,
/// so a replay after a crash sends the same commands (with the same ids).
pub trait ProcessManager: Send + Sync + 'static {
    /// The events it listens to (often an enum over several aggregates' events, with a
    /// category per variant: `#[event(category = "...")]`).
    type Event: DomainEvent;
    /// An instance's state, kept in the store between events.
    type State: Default + Clone + Serialize + DeserializeOwned + Send + Sync + 'static;
    /// The commands it sends (an enum over the aggregates it drives; routed by a
    /// [`CommandRouter`]). Serializable, because scheduled ones are stored.
    type Command: Clone + fmt::Debug + Serialize + DeserializeOwned + Send + Sync + 'static;

    /// The stable name of the process manager: its checkpoint, its instances and its schedules
    /// are kept under it, and every command id it derives includes it.
    ///
    /// **Changing it starts a new process manager that re-runs the whole history**: no
    /// checkpoint, no instances, new command ids (so the aggregates take its commands for new
    /// ones: stock reserved again, payments taken again), and the old name's pending schedules
    /// never fire. To rename, list the old name in
    /// [`previous_names`](Self::previous_names).
    fn name(&self) -> &str;

    /// The names this process manager had before, oldest first (`&["fulfilment"]` for
    /// `fulfilment-v2`). With them, a rename continues where the old name stopped:
    ///
    /// - events at or below the highest checkpoint of a previous name were handled under it
    ///   and are skipped (the runner reads them once, under its new checkpoint);
    /// - an instance not found under the new name is taken over from the newest previous name
    ///   that has it (moved on its next event);
    /// - command ids keep being derived from the **oldest** name, so an event handled again
    ///   across the rename sends the same ids (duplicates, applied once);
    /// - the previous names' pending schedules still fire (once: they keep their ids), and are
    ///   cancelled or replaced like the new name's.
    ///
    /// The old names' set-aside scheduled commands stay listed under those names
    /// ([`ProcessAdmin::set_aside`]), and events parked under an old name stay parked there
    /// (the new name skips them): retry or discard those before renaming. Stop the runners of the old name before starting the new
    /// one. Keep the list for as long
    /// as previous names may have pending schedules or unmoved instances; never remove the
    /// oldest while ids derived from it may come again (command retention). This is Axon's
    /// "copy the token to the new processing group" and Commanded's `start_from` set to the old
    /// subscription's position, done for you, plus stable ids.
    fn previous_names(&self) -> &[&str] {
        &[]
    }

    /// Which instance the event concerns, and how.
    fn route(&self, event: &Envelope<Self::Event>) -> Route;

    /// Decides what to do about `event` in an instance in `state`.
    fn handle(&self, state: &Self::State, event: &Envelope<Self::Event>, effects: &mut Effects<Self::Command>);

    /// The instance's state after `event`.
    fn apply(&self, state: Self::State, event: &Envelope<Self::Event>) -> Self::State;

    /// A command it sent now at `step` was refused by its aggregate (`error` says why, typed:
    /// [`Rejection::downcast_ref`]): decide compensations (commands, schedules, cancellations,
    /// all under this instance; a compensation's step is `{step}/rejected/{its step}`).
    ///
    /// `state` is the state the reaction decided on: `apply(state before, event)`, the state
    /// that is saved after this event (for the event that starts an instance, the started
    /// state, never `State::default()`). By default no compensation (the refusal is logged).
    ///
    /// A refused compensation is not passed over: it is counted
    /// (`cqrs_process_compensations_refused_total{process}`) and fails the event
    /// ([`CompensationRefused`]), so the runner's [`ErrorPolicy`](crate::ErrorPolicy) applies:
    /// retried (status `Retrying`, then `Stuck`), or parked for an operator. Test it with
    /// [`ProcessThen::when_rejected`](crate::testing::ProcessThen::when_rejected), which runs
    /// the same code.
    fn rejected(
        &self,
        state: &Self::State,
        step: &str,
        command: &Self::Command,
        error: &Rejection,
        effects: &mut Effects<Self::Command>,
    ) {
        let _ = (state, step, command, error, effects);
    }
}

/// Why an aggregate refused a command: its message, and the typed error when the router had
/// one (a [`DispatchError::Rejected`] converts with it: `dispatcher.dispatch(..).await?`).
#[derive(Debug, Clone)]
pub struct Rejection {
    message: String,
    error: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl Rejection {
    /// A refusal with its typed error (the aggregate's `Error`).
    pub fn new<E: std::error::Error + Send + Sync + 'static>(error: E) -> Self {
        Self { message: error.to_string(), error: Some(Arc::new(error)) }
    }

    /// A refusal known only by its message.
    pub fn from_message(message: impl Into<String>) -> Self {
        Self { message: message.into(), error: None }
    }

    /// Its message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The typed error, if it is an `E` (`rejection.downcast_ref::<OrderError>()`).
    pub fn downcast_ref<E: std::error::Error + 'static>(&self) -> Option<&E> {
        self.error.as_deref().and_then(|error| error.downcast_ref::<E>())
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Rejection {}

/// A compensation decided by [`ProcessManager::rejected`] was refused too. The event fails with
/// it (retried or parked by the runner's error policy): an operator must look.
#[derive(Debug, thiserror::Error)]
#[error(
    "process manager {process:?}, instance {key:?}: the compensation at step {step:?} (for a refused command) \
     was refused: {rejection}"
)]
pub struct CompensationRefused {
    /// The process manager's name.
    pub process: String,
    /// The instance.
    pub key: String,
    /// The compensation's full step (`{refused step}/rejected/{its step}`).
    pub step: String,
    /// Why it was refused.
    pub rejection: Rejection,
}

/// Why a routed command was not applied.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RouteError {
    /// The aggregate refused it (a final answer): the process manager's
    /// [`rejected`](ProcessManager::rejected) decides what follows.
    #[error("refused: {0}")]
    Rejected(Rejection),
    /// It could not be dispatched (the store failed...): the event is handled again later,
    /// sending the same command ids.
    #[error(transparent)]
    Failed(HandlerError),
}

impl<E: std::error::Error + Send + Sync + 'static> From<DispatchError<E>> for RouteError {
    fn from(error: DispatchError<E>) -> Self {
        match error {
            DispatchError::Rejected(refusal) => RouteError::Rejected(Rejection::new(refusal)),
            // The events were stored; only read-your-writes failed.
            DispatchError::ConsistencyTimeout { .. } => RouteError::Failed(HandlerError::new(error)),
            other => RouteError::Failed(HandlerError::new(other)),
        }
    }
}

/// Sends a process manager's commands to the aggregates they are for: usually a `match` over
/// the command enum, each arm a [`Dispatcher`](crate::Dispatcher)`::dispatch` with the envelope
/// re-wrapped around the variant's command (keep its id and metadata:
/// [`CommandEnvelope::map`](crate::CommandEnvelope::map)).
pub trait CommandRouter<C>: Send + Sync + 'static {
    /// Dispatches one command; `Ok` once it is applied (or was already: a duplicate).
    fn route(&self, command: CommandEnvelope<C>) -> impl Future<Output = Result<(), RouteError>> + Send;
}

/// A running process manager: its event runner and its scheduler.
#[derive(Debug)]
pub struct RunningProcess {
    events: RunningHandler,
    scheduler: scheduler::RunningScheduler,
}

impl RunningProcess {
    /// The event runner (status, read-your-writes name: the process manager's name).
    pub fn events(&self) -> &RunningHandler {
        &self.events
    }

    /// Stops both at once, as if the process had died (see [`RunningHandler::abort`]).
    pub fn abort(self) {
        self.scheduler.abort();
        self.events.abort();
    }

    /// Stops both, after the work in hand, and gives up their claims.
    pub async fn stop(self) {
        self.scheduler.stop().await;
        self.events.stop().await;
    }
}

/// Starts process manager `manager` on `store`: its events through the handler runner
/// (configured by `config`: placement, workers by instance key, error policy) and its scheduled
/// commands through a scheduler on `clock`, both sending through `router`.
pub fn spawn_process_manager<S, P, R>(
    store: Arc<S>,
    manager: P,
    router: R,
    config: RunnerConfig,
    clock: Clock,
    progress: &Progress,
) -> RunningProcess
where
    S: Store + ?Sized,
    P: ProcessManager,
    R: CommandRouter<P::Command>,
{
    let manager = Arc::new(manager);
    let router = Arc::new(router);
    let scheduler =
        scheduler::spawn(Arc::clone(&store), Arc::clone(&manager), Arc::clone(&router), config.clone(), clock);
    let handler = handler::ProcessHandler::new(Arc::clone(&store), manager, router);
    let events = spawn_handler(store, handler, config, progress);
    RunningProcess { events, scheduler }
}
