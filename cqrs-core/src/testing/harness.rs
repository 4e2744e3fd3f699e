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

#[cfg(test)]
mod tests {
    use std::panic::{catch_unwind, AssertUnwindSafe};
    use std::sync::{Arc, Mutex};

    use super::AggregateTest;
    use crate::testing::counter::{Counter, CounterCommand, CounterError, CounterEvent};

    /// Runs `f`, which must panic, and returns the panic's source line.
    fn panic_line(f: impl FnOnce()) -> u32 {
        let line = Arc::new(Mutex::new(None));
        let seen = Arc::clone(&line);
        let previous = std::panic::take_hook();
        // The hook is global: record only this thread's panic, not one of a test running beside.
        let this_thread = std::thread::current().id();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current().id() == this_thread {
                *seen.lock().expect("lock") = info.location().map(|l| (l.file().to_owned(), l.line()));
            }
        }));
        let result = catch_unwind(AssertUnwindSafe(f));
        std::panic::set_hook(previous);
        assert!(result.is_err(), "expected a panic");
        let (file, line) = line.lock().expect("lock").clone().expect("panic location");
        assert!(file.ends_with("harness.rs"), "{file}");
        line
    }

    #[test]
    fn failures_point_at_the_test_line() {
        // The panic must be reported inside the test's own closure, not inside the harness.
        let start = line!();
        let line = panic_line(|| {
            let then = AggregateTest::<Counter>::given_no_events().when(CounterCommand::increment(1, 1));
            then.then_events(vec![CounterEvent::Incremented { by: 2 }]);
        });
        let end = line!();
        assert!(start < line && line < end, "panic reported at line {line}, outside {start}..{end}");
        let start = line!();
        let line = panic_line(|| {
            let then = AggregateTest::<Counter>::given_no_events().when(CounterCommand::increment(1, 1));
            then.then_error(CounterError::Overflow);
        });
        let end = line!();
        assert!(start < line && line < end, "panic reported at line {line}, outside {start}..{end}");
    }

    #[test]
    fn then_error_matches_checks_the_error() {
        AggregateTest::<Counter>::given(vec![CounterEvent::Incremented { by: u64::MAX }])
            .when(CounterCommand::increment(1, 1))
            .then_error_matches(|error| *error == CounterError::Overflow);
        let state = AggregateTest::<Counter>::given(vec![CounterEvent::Incremented { by: 3 }])
            .when(CounterCommand::decrement(1, 3))
            .then_events(vec![CounterEvent::Decremented { by: 3 }]);
        assert_eq!(state.value, 0);
    }
}
