//! The clock that decides when scheduled commands are due: the system's, or a test clock that a
//! test moves forward by hand, so a "cancel after 15 minutes" is testable without waiting.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;

use crate::ids::Timestamp;

/// A source of "now" for schedules. Cheap to clone.
///
/// ```
/// use std::time::Duration;
/// use cqrs_core::Clock;
///
/// let (clock, control) = Clock::test();
/// let start = clock.now();
/// control.advance(Duration::from_secs(15 * 60));
/// assert_eq!(clock.now().as_micros() - start.as_micros(), 15 * 60 * 1_000_000);
/// ```
#[derive(Debug, Clone, Default)]
pub struct Clock {
    test: Option<Arc<TestTime>>,
}

#[derive(Debug)]
struct TestTime {
    now: Mutex<Timestamp>,
    moved: watch::Sender<()>,
}

/// Moves a test [`Clock`] forward.
#[derive(Debug, Clone)]
pub struct TestClock {
    time: Arc<TestTime>,
}

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Self { test: None }
    }

    /// A test clock starting at the current system time (so timestamps the stores record stay
    /// comparable), and its control.
    pub fn test() -> (Self, TestClock) {
        let time = Arc::new(TestTime { now: Mutex::new(Timestamp::now()), moved: watch::channel(()).0 });
        (Self { test: Some(Arc::clone(&time)) }, TestClock { time })
    }

    /// Now.
    pub fn now(&self) -> Timestamp {
        match &self.test {
            Some(time) => *time.now.lock().unwrap_or_else(PoisonError::into_inner),
            None => Timestamp::now(),
        }
    }

    /// Resolves after `real` time passes, or (for a test clock) as soon as the clock is moved.
    pub async fn tick(&self, real: Duration) {
        match &self.test {
            Some(time) => {
                let mut moved = time.moved.subscribe();
                let _ = tokio::time::timeout(real, moved.changed()).await;
            }
            None => tokio::time::sleep(real).await,
        }
    }
}

impl TestClock {
    /// Moves the clock forward by `by`, waking what waits on it.
    pub fn advance(&self, by: Duration) {
        {
            let mut now = self.time.now.lock().unwrap_or_else(PoisonError::into_inner);
            *now = now.plus(by);
        }
        self.time.moved.send_replace(());
    }
}
