//! Given/when/then for process managers: given events, when an event, then these commands
//! (and these scheduled, these cancelled). Pure: no store, no router.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use crate::event::{Envelope, Metadata};
use crate::ids::{EventId, Position, StreamId, Timestamp, Version};
use crate::process::{compensate, react, Effects, ProcessManager, Rejection, Route};

/// The time of the first test event (2026-01-01T00:00:00Z); each later one is a second later.
pub const TEST_EPOCH: Timestamp = Timestamp(1_767_225_600_000_000);

/// Starts a process manager test: `ProcessTest::new(manager).given(..).when(..)`.
///
/// ```
/// # use cqrs_core::testing::ProcessTest;
/// # use cqrs_core::{DomainEvent, Effects, Envelope, ProcessManager, Route};
/// # use serde::{Deserialize, Serialize};
/// #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
/// #[event(category = "signup")]
/// enum Signup { Started { email: String }, Confirmed }
///
/// #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
/// enum Mail { Welcome { email: String }, Reminder { email: String } }
///
/// struct Onboarding;
/// impl ProcessManager for Onboarding {
///     type Event = Signup;
///     type State = Option<String>;
///     type Command = Mail;
///     fn name(&self) -> &str { "onboarding" }
///     fn route(&self, event: &Envelope<Signup>) -> Route {
///         let key = event.stream_id.aggregate_id().to_owned();
///         match event.event { Signup::Started { .. } => Route::Start(key), Signup::Confirmed => Route::Stop(key) }
///     }
///     fn handle(&self, state: &Option<String>, event: &Envelope<Signup>, effects: &mut Effects<Mail>) {
///         match &event.event {
///             Signup::Started { email } => {
///                 effects.dispatch("welcome", Mail::Welcome { email: email.clone() });
///                 let day = event.recorded_at.plus(std::time::Duration::from_secs(86_400));
///                 effects.schedule("reminder", day, Mail::Reminder { email: email.clone() });
///             }
///             Signup::Confirmed => effects.cancel("reminder"),
///         }
///     }
///     fn apply(&self, state: Option<String>, event: &Envelope<Signup>) -> Option<String> {
///         match &event.event { Signup::Started { email } => Some(email.clone()), Signup::Confirmed => state }
///     }
/// }
///
/// ProcessTest::new(Onboarding)
///     .when("signup-1", Signup::Started { email: "ada@example.com".into() })
///     .then_commands(vec![Mail::Welcome { email: "ada@example.com".into() }])
///     .then_scheduled(vec![("reminder", Mail::Reminder { email: "ada@example.com".into() })]);
///
/// ProcessTest::new(Onboarding)
///     .given(vec![("signup-1", Signup::Started { email: "ada@example.com".into() })])
///     .when("signup-1", Signup::Confirmed)
///     .then_no_commands()
///     .then_cancelled(vec!["reminder"]);
/// ```
pub struct ProcessTest<P: ProcessManager> {
    manager: P,
    given: Vec<Envelope<P::Event>>,
    versions: HashMap<String, u64>,
}

impl<P: ProcessManager> ProcessTest<P> {
    /// A test of `manager` with no history.
    pub fn new(manager: P) -> Self {
        Self { manager, given: Vec::new(), versions: HashMap::new() }
    }

    /// Events that happened before, each with the stream it was stored in (`"order-1"`).
    #[must_use]
    pub fn given<'a>(mut self, events: impl IntoIterator<Item = (&'a str, P::Event)>) -> Self {
        for (stream, event) in events {
            let envelope = self.envelope(stream, event);
            self.given.push(envelope);
        }
        self
    }

    /// Reacts to `event` in `stream`, after the given history.
    #[track_caller]
    pub fn when(mut self, stream: &str, event: P::Event) -> ProcessThen<P> {
        let event = self.envelope(stream, event);
        let mut instances: HashMap<String, P::State> = HashMap::new();
        // The history as the runner sees it: each event decided on (so an instance that a
        // reaction ends, `Effects::end`, is gone), its effects dropped.
        for past in &self.given {
            let route = self.manager.route(past);
            let (key, state) = match &route {
                Route::Ignore => continue,
                Route::Start(key) => (key, Some(instances.remove(key).unwrap_or_default())),
                Route::Continue(key) | Route::Stop(key) => (key, instances.remove(key)),
            };
            let Some(state) = state else { continue };
            let (effects, next) = react(&self.manager, state, past).unwrap_or_else(|error| panic!("given: {error}"));
            if !matches!(route, Route::Stop(_)) && !effects.ends() {
                instances.insert(key.clone(), next);
            }
        }
        let route = self.manager.route(&event);
        let state = match &route {
            Route::Ignore => None,
            Route::Start(key) => Some(instances.remove(key).unwrap_or_default()),
            Route::Continue(key) | Route::Stop(key) => instances.remove(key),
        };
        let mut effects = Effects::default();
        let after = state.map(|state| match react(&self.manager, state, &event) {
            Ok((decided, next)) => {
                effects = decided;
                next
            }
            // What the runner refuses (the event fails), the test refuses too.
            Err(error) => panic!("{error}"),
        });
        ProcessThen { manager: self.manager, route, effects, state: after, recorded_at: event.recorded_at }
    }

    fn envelope(&mut self, stream: &str, event: P::Event) -> Envelope<P::Event> {
        let position = self.given.len() as u64 + 1;
        let version = self.versions.entry(stream.to_owned()).or_default();
        *version += 1;
        Envelope {
            event,
            event_id: EventId::new(),
            stream_id: StreamId::new(stream).unwrap_or_else(|error| panic!("test stream id {stream:?}: {error}")),
            version: Version(*version),
            position: Position(position),
            recorded_at: Timestamp(TEST_EPOCH.0 + i64::try_from(position).unwrap_or(0) * 1_000_000),
            metadata: Arc::new(Metadata::default()),
        }
    }
}

/// What the process manager did, to assert on.
pub struct ProcessThen<P: ProcessManager> {
    manager: P,
    route: Route,
    effects: Effects<P::Command>,
    state: Option<P::State>,
    recorded_at: Timestamp,
}

impl<P: ProcessManager> ProcessThen<P>
where
    P::Command: PartialEq,
{
    /// Asserts it sent exactly these commands now, in order.
    #[track_caller]
    pub fn then_commands(self, expected: Vec<P::Command>) -> Self {
        let sent: Vec<&P::Command> = self.effects.commands().iter().map(|(_, command)| command).collect();
        let expected: Vec<&P::Command> = expected.iter().collect();
        assert_eq!(sent, expected, "the process manager sent other commands (route: {:?})", self.route);
        self
    }

    /// Asserts it sent no command now.
    #[track_caller]
    pub fn then_no_commands(self) -> Self {
        self.then_commands(Vec::new())
    }

    /// Asserts it scheduled exactly these commands, by name, in order.
    #[track_caller]
    pub fn then_scheduled(self, expected: Vec<(&str, P::Command)>) -> Self {
        let scheduled: Vec<(&str, &P::Command)> =
            self.effects.scheduled().iter().map(|(name, _, command)| (name.as_str(), command)).collect();
        let expected: Vec<(&str, &P::Command)> = expected.iter().map(|(name, command)| (*name, command)).collect();
        assert_eq!(scheduled, expected, "the process manager scheduled other commands");
        self
    }
}

impl<P: ProcessManager> ProcessThen<P> {
    /// Asserts it cancelled exactly these schedules, in order.
    #[track_caller]
    pub fn then_cancelled(self, expected: Vec<&str>) -> Self {
        let cancelled: Vec<&str> = self.effects.cancelled().iter().map(String::as_str).collect();
        assert_eq!(cancelled, expected, "the process manager cancelled other schedules");
        self
    }

    /// Asserts the event ended its instance ([`Route::Stop`], or [`Effects::end`]).
    #[track_caller]
    pub fn then_ended(self) -> Self {
        let ended = matches!(self.route, Route::Stop(_)) || self.effects.ends();
        assert!(ended && self.state.is_some(), "the instance did not end (route: {:?})", self.route);
        self
    }

    /// Asserts the event was routed so.
    #[track_caller]
    pub fn then_routed(self, expected: Route) -> Self {
        assert_eq!(self.route, expected, "the event was routed elsewhere");
        self
    }

    /// The command sent now at `step` is refused with `error`: what the process manager does
    /// about it ([`ProcessManager::rejected`], given the state the reaction decided on, and
    /// checked like a reaction), run exactly as the runner runs it. The effects to assert on
    /// are then the compensations (their steps as `rejected` named them).
    ///
    /// ```text
    /// ProcessTest::new(Fulfilment)
    ///     .when("order-1", placed)
    ///     .when_rejected("reserve:tea", Rejection::new(InventoryError::OutOfStock))
    ///     .then_commands(vec![cancel("order-1")]);
    /// ```
    #[track_caller]
    #[must_use]
    pub fn when_rejected(self, step: &str, error: Rejection) -> Self {
        let Some((_, command)) = self.effects.commands().iter().find(|(sent, _)| sent == step) else {
            let steps: Vec<&str> = self.effects.commands().iter().map(|(step, _)| step.as_str()).collect();
            panic!("no command was sent at step {step:?} (steps: {steps:?})");
        };
        let Some(state) = &self.state else { panic!("the event reached no instance (route: {:?})", self.route) };
        let effects = match compensate(&self.manager, state, step, command, &error) {
            Ok(effects) => effects,
            Err(error) => panic!("{error}"),
        };
        Self { effects, ..self }
    }

    /// The effects, for assertions of your own (due times: see [`recorded_at`](Self::recorded_at)).
    pub fn effects(&self) -> &Effects<P::Command> {
        &self.effects
    }

    /// The instance's state after the event (`None` if the event was ignored or the instance
    /// did not exist).
    pub fn state(&self) -> Option<&P::State> {
        self.state.as_ref()
    }

    /// When the `when` event was recorded, to compute expected due times.
    pub fn recorded_at(&self) -> Timestamp {
        self.recorded_at
    }
}

impl<P: ProcessManager> fmt::Debug for ProcessThen<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProcessThen").field("route", &self.route).finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::ProcessTest;
    use crate::process::Rejection;
    use crate::testing::saga::{Saga, SagaCommand, SagaEvent, SagaRefusal};

    /// `when_rejected` gives `rejected` the state the reaction decided on (the started one) and
    /// the typed error, like the runner.
    #[test]
    fn a_refusal_is_compensated_from_the_decided_state() {
        let refusal = Rejection::new(SagaRefusal { what: "refuse-me".into() });
        ProcessTest::new(Saga::new("saga"))
            .when("saga-1", SagaEvent::StartedAsking { key: "1".into(), what: "refuse-me".into() })
            .when_rejected("refuse-me", refusal)
            .then_commands(vec![SagaCommand { key: "1".into(), what: "undo refuse-me of 1 (typed)".into() }]);
    }

    /// A reaction that ends its instance: the harness shows it, and a later event finds no
    /// instance, as in the runner.
    #[test]
    fn a_reaction_can_end_its_instance() {
        let started = ("saga-1", SagaEvent::Started { key: "1".into() });
        let finished = SagaEvent::Finished { key: "1".into() };
        ProcessTest::new(Saga::new("saga")).given(vec![started.clone()]).when("saga-1", finished.clone()).then_ended();
        let then = ProcessTest::new(Saga::new("saga"))
            .given(vec![started, ("saga-1", finished)])
            .when("saga-1", SagaEvent::Asked { key: "1".into(), what: "late".into() })
            .then_no_commands();
        assert!(then.state().is_none());
    }

    /// The harness refuses what the runner refuses: two commands under one step name.
    #[test]
    #[should_panic(expected = "process manager \"saga\": step \"twice\" is used twice in one reaction")]
    fn a_repeated_step_fails_the_test() {
        let _ = ProcessTest::new(Saga::new("saga"))
            .given(vec![("saga-1", SagaEvent::Started { key: "1".into() })])
            .when("saga-1", SagaEvent::AskedTwice { key: "1".into() });
    }
}
