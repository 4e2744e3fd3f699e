//! A process manager as an event handler: load the instance, decide, send, schedule, save.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{CommandRouter, CompensationRefused, Effects, ProcessManager, Rejection, RepeatedStep, Route, RouteError};
use crate::aggregate::CommandEnvelope;
use crate::coordination::{ProcessState, Scheduled};
use crate::event::{DomainEvent, Envelope, RecordedEvent};
use crate::handler::{current_claim, EventHandler, HandlerError};
use crate::ids::{CausationId, CommandId, CorrelationId, EventId, Position, Timestamp};
use crate::store::{Store, StoreError};

/// What the store keeps of an instance: its state and the names of its pending schedules (so
/// stopping the instance cancels them).
#[derive(Default, Serialize, Deserialize)]
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

    /// The state an event of instance `key` is handled in, with the instance's pending
    /// schedules; `None` when there is nothing to do: handled already, or not for a live
    /// instance (after its end, or before its start).
    fn instance_state(
        &self,
        stored: Option<&ProcessState>,
        starts: bool,
        event: &Envelope<P::Event>,
        key: &str,
    ) -> Result<Option<Stored<P::State>>, HandlerError> {
        let name = self.manager.name();
        match stored {
            // Handled already (the state was saved, the checkpoint not yet): nothing to do.
            Some(stored) if stored.position >= event.position => Ok(None),
            // Ended (a tombstone): a later start begins a new instance; anything else is for
            // the instance that ended, and ignored like one that never existed.
            Some(stored) if stored.ended => Ok(starts.then(Stored::default)),
            Some(stored) => {
                let stored = Stored::<P::State>::deserialize(&stored.state)
                    .map_err(|error| HandlerError::new(format!("{name}/{key}: stored state unreadable: {error}")))?;
                Ok(Some(stored))
            }
            None if starts => Ok(Some(Stored::default())),
            // Not started: a Continue or Stop for an instance that does not exist.
            None => Ok(None),
        }
    }

    /// Sends the reaction's commands in order. A refused one gets the compensations the
    /// manager decides on `next` sent, and their schedules, cancellations and end added to
    /// `effects`.
    async fn send_commands(
        &self,
        event: &Envelope<P::Event>,
        key: &str,
        next: &P::State,
        effects: &mut Effects<P::Command>,
    ) -> Result<(), HandlerError> {
        for (step, command) in effects.commands.clone() {
            match self.send(event, key, &step, command.clone()).await {
                Ok(()) => {}
                Err(RouteError::Failed(error)) => return Err(error),
                Err(RouteError::Rejected(rejection)) => {
                    tracing::debug!(process = self.manager.name(), key, step, %rejection, "a command was refused");
                    let compensations =
                        compensate(&*self.manager, next, &step, &command, &rejection).map_err(HandlerError::new)?;
                    self.send_compensations(event, key, &step, compensations.commands).await?;
                    effects.scheduled.extend(compensations.scheduled);
                    effects.cancelled.extend(compensations.cancelled);
                    effects.ended |= compensations.ended;
                }
            }
        }
        Ok(())
    }

    /// Sends the compensations for the command refused at `step`.
    async fn send_compensations(
        &self,
        event: &Envelope<P::Event>,
        key: &str,
        step: &str,
        compensations: Vec<(String, P::Command)>,
    ) -> Result<(), HandlerError> {
        let name = self.manager.name();
        for (compensation, command) in compensations {
            let step = format!("{step}/rejected/{compensation}");
            match self.send(event, key, &step, command).await {
                Ok(()) => {}
                Err(RouteError::Failed(error)) => return Err(error),
                Err(RouteError::Rejected(rejection)) => {
                    // Not passed over: counted, and the event fails (retried or parked by the
                    // error policy), so an operator sees it.
                    tracing::warn!(process = name, key, step, %rejection, "a compensation was refused");
                    metrics::counter!("cqrs_process_compensations_refused_total", "process" => name.to_owned())
                        .increment(1);
                    let refused =
                        CompensationRefused { process: name.to_owned(), key: key.to_owned(), step, rejection };
                    return Err(HandlerError::new(refused));
                }
            }
        }
        Ok(())
    }

    /// Applies the reaction's cancellations, then its schedules, keeping `schedules` (the
    /// instance's pending ones) up to date. Cancellations first: they apply to what was pending
    /// before this reaction, so a reaction that cancels and schedules one name moves it instead
    /// of losing it.
    async fn apply_schedules(
        &self,
        event: &Envelope<P::Event>,
        key: &str,
        effects: &Effects<P::Command>,
        schedules: &mut Vec<String>,
    ) -> Result<(), HandlerError> {
        for schedule in &effects.cancelled {
            self.unschedule(key, schedule).await?;
            schedules.retain(|pending| pending != schedule);
        }
        for (schedule, due, command) in &effects.scheduled {
            self.schedule(event, key, schedule, *due, command).await?;
            if !schedules.contains(schedule) {
                schedules.push(schedule.clone());
            }
        }
        Ok(())
    }

    /// Stores `command` to be sent at `due` as schedule `schedule` of instance `key`.
    async fn schedule(
        &self,
        event: &Envelope<P::Event>,
        key: &str,
        schedule: &str,
        due: Timestamp,
        command: &P::Command,
    ) -> Result<(), HandlerError> {
        let manager = &*self.manager;
        let stored = StoredCommand {
            command: command.clone(),
            causation: Some(CausationId::from(event.event_id)),
            correlation: event.metadata.correlation_id,
            headers: event.metadata.headers.clone(),
        };
        let command = serde_json::to_value(&stored).map_err(HandlerError::new)?;
        let scheduled = Scheduled {
            owner: manager.name().to_owned(),
            key: key.to_owned(),
            name: schedule.to_owned(),
            due,
            command,
            command_id: command_id(event.event_id, id_name(manager), key, &format!("schedule/{schedule}")),
            attempts: 0,
        };
        self.store.schedule(scheduled).await?;
        // It replaces a pending one of a previous name too.
        for previous in manager.previous_names() {
            self.store.unschedule(previous, key, schedule, None).await?;
        }
        Ok(())
    }

    /// Cancels schedule `schedule` of instance `key`, under the name and every previous name.
    async fn unschedule(&self, key: &str, schedule: &str) -> Result<(), StoreError> {
        self.store.unschedule(self.manager.name(), key, schedule, None).await?;
        for previous in self.manager.previous_names() {
            self.store.unschedule(previous, key, schedule, None).await?;
        }
        Ok(())
    }

    /// Saves instance `key` as handled up to `position`: a tombstone once it `stops` (ending it
    /// cancels everything still pending), else its `next` state and pending `schedules`; then
    /// deletes it under the previous name it `moved_from`, if any.
    async fn save(
        &self,
        position: Position,
        key: &str,
        stops: bool,
        next: P::State,
        schedules: Vec<String>,
        moved_from: Option<&str>,
    ) -> Result<(), HandlerError> {
        let name = self.manager.name();
        let fence = current_claim();
        if stops {
            for schedule in &schedules {
                self.unschedule(key, schedule).await?;
            }
            // A tombstone, not a deletion: a replay of this instance's earlier events (after a
            // checkpoint that lagged) must find them handled, not start it again.
            self.store.save_process(name, key, Some(&ProcessState::ended(position)), fence.as_ref()).await?;
        } else {
            let value: Value = serde_json::to_value(Stored { state: next, schedules }).map_err(HandlerError::new)?;
            let saved = ProcessState::running(value, position);
            self.store.save_process(name, key, Some(&saved), fence.as_ref()).await?;
        }
        if let Some(previous) = moved_from {
            // Moved to the new name (a crash before this leaves both; the new one is read first).
            self.store.save_process(previous, key, None, fence.as_ref()).await?;
        }
        Ok(())
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
        let route = self.manager.route(&event);
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
        let Some(Stored { state, mut schedules }) = self.instance_state(stored.as_ref(), starts, &event, key)? else {
            return Ok(());
        };
        let (mut effects, next) = react(&*self.manager, state, &event).map_err(HandlerError::new)?;
        self.send_commands(&event, key, &next, &mut effects).await?;
        self.apply_schedules(&event, key, &effects, &mut schedules).await?;
        let stops = stops || effects.ended;
        self.save(event.position, key, stops, next, schedules, moved_from).await
    }
}
