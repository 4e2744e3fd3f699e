//! A process manager as an event handler: load the instance, decide, send, schedule, save.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{CommandRouter, CompensationRefused, Effects, ProcessManager, Rejection, RepeatedStep, Route, RouteError};
use crate::aggregate::CommandEnvelope;
use crate::coordination::{ProcessState, Scheduled};
use crate::event::{DomainEvent, Envelope, RecordedEvent};
use crate::handler::{current_claim, EventHandler, HandlerError};
use crate::ids::{CausationId, CommandId, CorrelationId, EventId, Position};
use crate::store::{Store, StoreError};

/// What the store keeps of an instance: its state and the names of its pending schedules (so
/// stopping the instance cancels them).
#[derive(Serialize, Deserialize)]
pub(super) struct Stored<S> {
    pub(super) state: S,
    #[serde(default)]
    pub(super) schedules: Vec<String>,
}

/// What the store keeps of a scheduled command: the command and where it came from.
#[derive(Serialize, Deserialize)]
pub(super) struct StoredCommand<C> {
    pub(super) command: C,
    pub(super) causation: Option<CausationId>,
    pub(super) correlation: Option<CorrelationId>,
    #[serde(default)]
    pub(super) headers: std::collections::HashMap<String, String>,
}

/// The step name an instance's command id is derived from: unique per process manager,
/// instance and step.
pub(super) fn step_of(process: &str, key: &str, step: &str) -> String {
    format!("{process}/{key}/{step}")
}

/// The name command ids are derived from: the oldest of the previous names, so a renamed
/// process manager sends the ids the original would have.
pub(super) fn id_name<P: ProcessManager>(manager: &P) -> &str {
    manager.previous_names().first().copied().unwrap_or_else(|| manager.name())
}

/// The derived id of a command `process` sends for `key` at `step` in reaction to `event`.
pub(super) fn command_id(event: EventId, process: &str, key: &str, step: &str) -> CommandId {
    CommandId::derived(event, &step_of(process, key, step))
}

/// What `manager` decides about `event` in an instance in `state`: its effects (checked: no
/// step or schedule name twice) and the instance's next state. The runner and
/// [`ProcessTest`](crate::testing::ProcessTest) both call this.
pub(crate) fn react<P: ProcessManager>(
    manager: &P,
    state: P::State,
    event: &Envelope<P::Event>,
) -> Result<(Effects<P::Command>, P::State), RepeatedStep> {
    let mut effects = Effects::default();
    manager.handle(&state, event, &mut effects);
    effects.check_steps(manager.name())?;
    let next = manager.apply(state, event);
    Ok((effects, next))
}

/// The compensations `manager` decides for `command`, sent at `step` and refused with
/// `rejection`, in an instance whose reaction decided on `state` (checked like a reaction). The
/// runner and [`ProcessThen::when_rejected`](crate::testing::ProcessThen::when_rejected) both
/// call this.
pub(crate) fn compensate<P: ProcessManager>(
    manager: &P,
    state: &P::State,
    step: &str,
    command: &P::Command,
    rejection: &Rejection,
) -> Result<Effects<P::Command>, RepeatedStep> {
    let mut compensations = Effects::default();
    manager.rejected(state, step, command, rejection, &mut compensations);
    compensations.check_steps(manager.name())?;
    Ok(compensations)
}

pub(super) struct ProcessHandler<S: ?Sized, P, R> {
    store: Arc<S>,
    manager: Arc<P>,
    router: Arc<R>,
    /// The highest checkpoint of the previous names (loaded once): events at or below it were
    /// handled under an old name.
    renamed_at: tokio::sync::OnceCell<Position>,
}

impl<S: Store + ?Sized, P: ProcessManager, R: CommandRouter<P::Command>> ProcessHandler<S, P, R> {
    pub(super) fn new(store: Arc<S>, manager: Arc<P>, router: Arc<R>) -> Self {
        Self { store, manager, router, renamed_at: tokio::sync::OnceCell::new() }
    }

    /// Position up to which a previous name handled the events.
    async fn renamed_at(&self) -> Result<Position, StoreError> {
        let load = || async {
            let mut highest = Position::START;
            for previous in self.manager.previous_names() {
                if let Some(checkpoint) = self.store.load_checkpoint(previous).await? {
                    highest = highest.max(checkpoint);
                }
            }
            Ok::<_, StoreError>(highest)
        };
        self.renamed_at.get_or_try_init(load).await.copied()
    }

    /// The instance `key`: under the name, else under the newest previous name that has it
    /// (then also that name, to delete once it is saved under the new one).
    async fn load_instance(&self, key: &str) -> Result<(Option<ProcessState>, Option<&str>), StoreError> {
        let name = self.manager.name();
        if let Some(stored) = self.store.load_process(name, key).await? {
            return Ok((Some(stored), None));
        }
        for previous in self.manager.previous_names().iter().rev() {
            if let Some(stored) = self.store.load_process(previous, key).await? {
                return Ok((Some(stored), Some(previous)));
            }
        }
        Ok((None, None))
    }

    /// Sends `command` with the id derived for `step`, as caused by `event`.
    async fn send(
        &self,
        event: &Envelope<P::Event>,
        key: &str,
        step: &str,
        command: P::Command,
    ) -> Result<(), RouteError> {
        let full_step = step_of(id_name(&*self.manager), key, step);
        let envelope = CommandEnvelope::new(command).caused_by(event.event_id, &event.metadata, &full_step);
        self.router.route(envelope).await
    }
}

impl<S, P, R> EventHandler for ProcessHandler<S, P, R>
where
    S: Store + ?Sized,
    P: ProcessManager,
    R: CommandRouter<P::Command>,
{
    type Event = P::Event;

    fn name(&self) -> &str {
        self.manager.name()
    }

    fn interested(&self, event: &RecordedEvent) -> bool {
        P::Event::accepts(event.category(), &event.event_type)
    }

    /// Events of one instance are one sequence: in order, and parked together.
    fn partition_key(&self, event: &Envelope<P::Event>) -> String {
        match self.manager.route(event).key() {
            Some(key) => key.to_owned(),
            None => event.stream_id.as_str().to_owned(),
        }
    }

    async fn handle(&self, event: Envelope<P::Event>) -> Result<(), HandlerError> {
        let manager = &*self.manager;
        let name = manager.name();
        let route = manager.route(&event);
        let (key, starts, stops) = match &route {
            Route::Ignore => return Ok(()),
            Route::Start(key) => (key.as_str(), true, false),
            Route::Continue(key) => (key.as_str(), false, false),
            Route::Stop(key) => (key.as_str(), false, true),
        };
        if event.position <= self.renamed_at().await? {
            // Handled under a previous name.
            return Ok(());
        }
        let (stored, moved_from) = self.load_instance(key).await?;
        let (state, mut schedules) = match &stored {
            // Handled already (the state was saved, the checkpoint not yet): nothing to do.
            Some(stored) if stored.position >= event.position => return Ok(()),
            // Ended (a tombstone): a later start begins a new instance; anything else is for
            // the instance that ended, and ignored like one that never existed.
            Some(stored) if stored.ended => match starts {
                true => (P::State::default(), Vec::new()),
                false => return Ok(()),
            },
            Some(stored) => {
                let Stored { state, schedules } = Stored::<P::State>::deserialize(&stored.state)
                    .map_err(|error| HandlerError::new(format!("{name}/{key}: stored state unreadable: {error}")))?;
                (state, schedules)
            }
            None if starts => (P::State::default(), Vec::new()),
            // Not started: a Continue or Stop for an instance that does not exist.
            None => return Ok(()),
        };

        let (mut effects, next) = react(manager, state, &event).map_err(HandlerError::new)?;
        for (step, command) in effects.commands.clone() {
            match self.send(&event, key, &step, command.clone()).await {
                Ok(()) => {}
                Err(RouteError::Failed(error)) => return Err(error),
                Err(RouteError::Rejected(rejection)) => {
                    tracing::debug!(process = name, key, step, %rejection, "a command was refused");
                    let compensations =
                        compensate(manager, &next, &step, &command, &rejection).map_err(HandlerError::new)?;
                    for (compensation, command) in compensations.commands {
                        let step = format!("{step}/rejected/{compensation}");
                        match self.send(&event, key, &step, command).await {
                            Ok(()) => {}
                            Err(RouteError::Failed(error)) => return Err(error),
                            Err(RouteError::Rejected(rejection)) => {
                                // Not passed over: counted, and the event fails (retried or
                                // parked by the error policy), so an operator sees it.
                                tracing::warn!(process = name, key, step, %rejection, "a compensation was refused");
                                metrics::counter!("cqrs_process_compensations_refused_total", "process" => name.to_owned())
                                    .increment(1);
                                let refused = CompensationRefused {
                                    process: name.to_owned(),
                                    key: key.to_owned(),
                                    step,
                                    rejection,
                                };
                                return Err(HandlerError::new(refused));
                            }
                        }
                    }
                    effects.scheduled.extend(compensations.scheduled);
                    effects.cancelled.extend(compensations.cancelled);
                    effects.ended |= compensations.ended;
                }
            }
        }
        // Cancellations first: they apply to what was pending before this reaction, so a
        // reaction that cancels and schedules one name moves it instead of losing it.
        for schedule in &effects.cancelled {
            self.store.unschedule(name, key, schedule, None).await?;
            for previous in manager.previous_names() {
                self.store.unschedule(previous, key, schedule, None).await?;
            }
            schedules.retain(|pending| pending != schedule);
        }
        for (schedule, due, command) in &effects.scheduled {
            let stored = StoredCommand {
                command: command.clone(),
                causation: Some(CausationId::from(event.event_id)),
                correlation: event.metadata.correlation_id,
                headers: event.metadata.headers.clone(),
            };
            let command = serde_json::to_value(&stored).map_err(HandlerError::new)?;
            let scheduled = Scheduled {
                owner: name.to_owned(),
                key: key.to_owned(),
                name: schedule.clone(),
                due: *due,
                command,
                command_id: command_id(event.event_id, id_name(manager), key, &format!("schedule/{schedule}")),
                attempts: 0,
            };
            self.store.schedule(scheduled).await?;
            // It replaces a pending one of a previous name too.
            for previous in manager.previous_names() {
                self.store.unschedule(previous, key, schedule, None).await?;
            }
            if !schedules.contains(schedule) {
                schedules.push(schedule.clone());
            }
        }
        let stops = stops || effects.ended;
        // Ending the instance cancels everything still pending.
        let cancel = if stops { std::mem::take(&mut schedules) } else { Vec::new() };
        for schedule in &cancel {
            self.store.unschedule(name, key, schedule, None).await?;
            for previous in manager.previous_names() {
                self.store.unschedule(previous, key, schedule, None).await?;
            }
            schedules.retain(|pending| pending != schedule);
        }

        let fence = current_claim();
        if stops {
            // A tombstone, not a deletion: a replay of this instance's earlier events (after a
            // checkpoint that lagged) must find them handled, not start it again.
            self.store.save_process(name, key, Some(&ProcessState::ended(event.position)), fence.as_ref()).await?;
        } else {
            let value: Value = serde_json::to_value(Stored { state: next, schedules }).map_err(HandlerError::new)?;
            let saved = ProcessState::running(value, event.position);
            self.store.save_process(name, key, Some(&saved), fence.as_ref()).await?;
        }
        if let Some(previous) = moved_from {
            // Moved to the new name (a crash before this leaves both; the new one is read first).
            self.store.save_process(previous, key, None, fence.as_ref()).await?;
        }
        Ok(())
    }
}
