//! A given/when/then harness for aggregates, in the style of cqrs-es' `TestFramework`.

use std::fmt;

use crate::aggregate::Aggregate;

/// Starts an aggregate test: `AggregateTest::<A>::given(events).when(command)`.
///
/// ```
/// use cqrs_core::testing::AggregateTest;
/// use cqrs_core::testing::counter::{Counter, CounterCommand, CounterError, CounterEvent};
///
/// AggregateTest::<Counter>::given(vec![CounterEvent::Incremented { by: 2 }])
///     .when(CounterCommand::increment(1, 3))
///     .then_events(vec![CounterEvent::Incremented { by: 3 }]);
///
/// AggregateTest::<Counter>::given_no_events()
///     .when(CounterCommand::decrement(1, 1))
///     .then_error(CounterError::WouldGoNegative { value: 0, by: 1 });
/// ```
pub struct AggregateTest<A: Aggregate> {
    state: A,
}

impl<A: Aggregate> AggregateTest<A> {
    /// The aggregate after these events.
    pub fn given(events: Vec<A::Event>) -> Self {
        Self { state: events.iter().fold(A::default(), A::apply) }
    }

    /// A fresh aggregate.
    pub fn given_no_events() -> Self {
        Self::given(Vec::new())
    }

    /// Runs the command against the state.
    pub fn when(self, command: A::Command) -> Then<A> {
        let result = self.state.execute(&command);
        Then { state: self.state, result }
    }
}

/// The outcome of [`AggregateTest::when`], to assert on.
pub struct Then<A: Aggregate> {
    state: A,
    result: Result<Vec<A::Event>, A::Error>,
}

impl<A: Aggregate> Then<A>
where
    A::Event: PartialEq,
{
    /// Asserts the command produced exactly these events, in order.
    #[track_caller]
    pub fn then_events(self, expected: Vec<A::Event>) -> A {
        match self.result {
            Ok(events) => {
                assert_eq!(events, expected, "the command produced other events than expected");
                events.iter().fold(self.state, A::apply)
            }
            Err(error) => panic!("expected events {expected:?}, but the command was rejected: {error}"),
        }
    }

    /// Asserts the command produced no events.
    #[track_caller]
    pub fn then_no_events(self) -> A {
        self.then_events(Vec::new())
    }
}

impl<A: Aggregate> Then<A> {
    /// Asserts the command was rejected with exactly this error.
    #[track_caller]
    pub fn then_error(self, expected: A::Error)
    where
        A::Error: PartialEq + fmt::Debug,
    {
        match self.result {
            Ok(events) => panic!("expected error {expected:?}, but the command produced {events:?}"),
            Err(error) => assert_eq!(error, expected, "the command was rejected with another error"),
        }
    }

    /// Asserts the command was rejected with an error matching `check`.
    #[track_caller]
    pub fn then_error_matches(self, check: impl FnOnce(&A::Error) -> bool) {
        match self.result {
            Ok(events) => panic!("expected an error, but the command produced {events:?}"),
            Err(error) => assert!(check(&error), "the command was rejected with an unexpected error: {error}"),
        }
    }
}
