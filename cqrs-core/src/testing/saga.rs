//! A tiny process manager for the conformance suite: instances keyed by a string, commands that
//! are only recorded (or refused) by a [`RecordingRouter`], and a payment-deadline-like schedule.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::aggregate::CommandEnvelope;
use crate::event::{Envelope, Metadata, NewEvent};
use crate::handler::HandlerError;
use crate::ids::StreamId;
use crate::process::{CommandRouter, Effects, ProcessManager, Rejection, Route, RouteError};
use crate::store::{AppendOutcome, EventStore, ExpectedVersion};
use crate::DomainEvent;

/// How long after [`SagaEvent::Started`] its `deadline` schedule is due.
pub const SAGA_DEADLINE: Duration = Duration::from_secs(3600);

/// The events [`Saga`] listens to, stored in streams `saga-{key}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, DomainEvent)]
#[event(category = "saga")]
pub enum SagaEvent {
    /// Starts instance `key`: sends `hello` now and schedules `deadline` an hour later
    /// ([`SAGA_DEADLINE`] after the event).
    Started {
        /// The instance.
        key: String,
    },
    /// Starts `key` and sends `what` now, at step `what` (nothing scheduled).
    StartedAsking {
        /// The instance.
        key: String,
        /// The command's content and step.
        what: String,
    },
    /// Continues `key`: sends `what` now, at step `what`.
    Asked {
        /// The instance.
        key: String,
        /// The command's content and step.
        what: String,
    },
    /// Continues `key`: sends two different commands under one step name (a bug).
    AskedTwice {
        /// The instance.
        key: String,
    },
    /// Continues `key`, and ends it from `handle` ([`Effects::end`]).
    Finished {
        /// The instance.
        key: String,
    },
    /// Continues `key`: moves its `deadline` to [`SAGA_DEADLINE`] × 2 after this event, by
    /// cancelling it and scheduling it anew in one reaction.
    Postponed {
        /// The instance.
        key: String,
    },
    /// Stops `key` ([`Route::Stop`]).
    Stopped {
        /// The instance.
        key: String,
    },
}

impl SagaEvent {
    fn key(&self) -> &str {
        match self {
            SagaEvent::Started { key }
            | SagaEvent::StartedAsking { key, .. }
            | SagaEvent::Asked { key, .. }
            | SagaEvent::AskedTwice { key }
            | SagaEvent::Finished { key }
            | SagaEvent::Postponed { key }
            | SagaEvent::Stopped { key } => key,
        }
    }
}

/// The one command [`Saga`] sends: `what` to instance `key`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SagaCommand {
    /// The instance that sent it.
    pub key: String,
    /// What it says (a [`RecordingRouter`] refuses those starting with `refuse`).
    pub what: String,
}

/// An instance's state: its key (empty until started) and what it has asked.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SagaState {
    /// The instance key, set by `Started`.
    pub key: String,
    /// Every `what` asked so far.
    pub asked: Vec<String>,
}

/// The test process manager. On a refused command it compensates with `undo {what} of
/// {state.key}`, so a test sees which state `rejected` was given.
#[derive(Debug, Clone)]
pub struct Saga {
    /// Its name.
    pub name: String,
    /// Its previous names, oldest first.
    pub previous: Vec<&'static str>,
}

impl Saga {
    /// A saga named `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into(), previous: Vec::new() }
    }

    /// A saga named `name`, renamed from `previous` (oldest first).
    pub fn renamed(name: impl Into<String>, previous: Vec<&'static str>) -> Self {
        Self { name: name.into(), previous }
    }
}

impl ProcessManager for Saga {
    type Event = SagaEvent;
    type State = SagaState;
    type Command = SagaCommand;

    fn name(&self) -> &str {
        &self.name
    }

    fn previous_names(&self) -> &[&str] {
        &self.previous
    }

    fn route(&self, event: &Envelope<SagaEvent>) -> Route {
        let key = event.event.key().to_owned();
        match &event.event {
            SagaEvent::Started { .. } | SagaEvent::StartedAsking { .. } => Route::Start(key),
            SagaEvent::Asked { .. }
            | SagaEvent::AskedTwice { .. }
            | SagaEvent::Finished { .. }
            | SagaEvent::Postponed { .. } => Route::Continue(key),
            SagaEvent::Stopped { .. } => Route::Stop(key),
        }
    }

    fn handle(&self, _state: &SagaState, event: &Envelope<SagaEvent>, effects: &mut Effects<SagaCommand>) {
        let command = |what: &str| SagaCommand { key: event.event.key().to_owned(), what: what.to_owned() };
        match &event.event {
            SagaEvent::Started { .. } => {
                effects.dispatch("hello", command("hello"));
                effects.schedule("deadline", event.recorded_at.plus(SAGA_DEADLINE), command("deadline"));
            }
            SagaEvent::Asked { what, .. } | SagaEvent::StartedAsking { what, .. } => {
                effects.dispatch(what.clone(), command(what));
            }
            SagaEvent::AskedTwice { .. } => {
                effects.dispatch("twice", command("first"));
                effects.dispatch("twice", command("second"));
            }
            SagaEvent::Finished { .. } => effects.end(),
            SagaEvent::Postponed { .. } => {
                effects.cancel("deadline");
                effects.schedule("deadline", event.recorded_at.plus(SAGA_DEADLINE * 2), command("deadline"));
            }
            SagaEvent::Stopped { .. } => {}
        }
    }

    fn apply(&self, mut state: SagaState, event: &Envelope<SagaEvent>) -> SagaState {
        match &event.event {
            SagaEvent::Started { key } => state.key.clone_from(key),
            SagaEvent::StartedAsking { key, what } => {
                state.key.clone_from(key);
                state.asked.push(what.clone());
            }
            SagaEvent::Asked { what, .. } => state.asked.push(what.clone()),
            SagaEvent::AskedTwice { .. }
            | SagaEvent::Finished { .. }
            | SagaEvent::Postponed { .. }
            | SagaEvent::Stopped { .. } => {}
        }
        state
    }

    /// Compensates with `undo {step} of {state.key} ({typed|untyped})` at step `undo`; for a
    /// step starting with `refuse-compensation`, with one the router refuses too.
    fn rejected(
        &self,
        state: &SagaState,
        step: &str,
        _command: &SagaCommand,
        error: &Rejection,
        effects: &mut Effects<SagaCommand>,
    ) {
        let typed = if error.downcast_ref::<SagaRefusal>().is_some() { "typed" } else { "untyped" };
        let refuse = if step.starts_with("refuse-compensation") { "refuse: " } else { "" };
        let what = format!("{refuse}undo {step} of {} ({typed})", state.key);
        effects.dispatch("undo", SagaCommand { key: state.key.clone(), what });
    }
}

/// Why a [`RecordingRouter`] refused a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} is refused")]
pub struct SagaRefusal {
    /// The refused command's `what`.
    pub what: String,
}

/// Appends `event` to its stream `saga-{key}`.
pub async fn append_saga<S: EventStore + ?Sized>(store: &S, event: SagaEvent) {
    let stream = StreamId::new(format!("saga-{}", event.key())).expect("saga stream id");
    let new = NewEvent::from_domain(&event, Metadata::default()).expect("serialize saga event");
    match store.append(&stream, ExpectedVersion::Any, vec![new]).await {
        Ok(AppendOutcome::Appended(_)) => {}
        other => panic!("append {event:?}: {other:?}"),
    }
}

/// Records the commands it routes; refuses those whose `what` starts with `refuse`, fails to
/// route those starting with `fail` (and those starting with `flaky` the first time only).
#[derive(Debug, Clone)]
pub struct RecordingRouter {
    sent: Arc<Mutex<Vec<CommandEnvelope<SagaCommand>>>>,
    count: Arc<watch::Sender<usize>>,
}

impl Default for RecordingRouter {
    fn default() -> Self {
        Self { sent: Arc::default(), count: Arc::new(watch::channel(0).0) }
    }
}

impl RecordingRouter {
    /// What it was asked to route, refused ones included, in order.
    pub fn sent(&self) -> Vec<CommandEnvelope<SagaCommand>> {
        self.sent.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The `what` of each command routed so far.
    pub fn whats(&self) -> Vec<String> {
        self.sent().into_iter().map(|envelope| envelope.command.what).collect()
    }

    /// Waits until at least `n` commands were routed (panics after `timeout`).
    pub async fn wait_sent(&self, n: usize, timeout: Duration) {
        let mut count = self.count.subscribe();
        let reached = tokio::time::timeout(timeout, count.wait_for(|count| *count >= n)).await.is_ok_and(|r| r.is_ok());
        match reached {
            true => {}
            false => panic!("expected {n} commands routed within {timeout:?}, got {:?}", self.whats()),
        }
    }
}

impl CommandRouter<SagaCommand> for RecordingRouter {
    async fn route(&self, command: CommandEnvelope<SagaCommand>) -> Result<(), RouteError> {
        let refuse = command.command.what.starts_with("refuse");
        let what = command.command.what.clone();
        let first = {
            let mut sent = self.sent.lock().unwrap_or_else(PoisonError::into_inner);
            let first = !sent.iter().any(|earlier| earlier.command_id == command.command_id);
            sent.push(command);
            first
        };
        self.count.send_modify(|count| *count += 1);
        if refuse {
            return Err(RouteError::Rejected(Rejection::new(SagaRefusal { what })));
        }
        if what.starts_with("fail") || (what.starts_with("flaky") && first) {
            return Err(RouteError::Failed(HandlerError::new(format!("{what} cannot be routed"))));
        }
        Ok(())
    }
}
