//! Spacing out this process's NOTIFYs.
//!
//! A NOTIFY is only a wake-up for other processes' subscribers (this process's are woken by
//! the writer itself), but PostgreSQL makes every listening backend, this process's own
//! listener included, run a transaction per NOTIFY it receives. Sending one per commit cost
//! about one extra server transaction per command (BENCHMARKS.md, issue 12). So a writer
//! statement asks the append function for a NOTIFY only if none went out for
//! [`PgStoreConfig::notify_interval`](crate::PgStoreConfig::notify_interval); when it does
//! not, the statement is *uncovered*, and this module makes sure a NOTIFY follows it:
//!
//! - a later statement that carries one covers it, but only if it started after the
//!   uncovered one finished (so its NOTIFY, sent at its commit, comes after that commit);
//! - otherwise a flush task sends one of its own at most two intervals after the last NOTIFY.
//!
//! So under a light load every commit still notifies at once, and under a heavy one other
//! processes hear of a commit at most `2 × notify_interval` late; their poll
//! ([`PgStoreConfig::poll_interval`](crate::PgStoreConfig::poll_interval)) remains the
//! safety net if a flush fails.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use cqrs_core::Position;
use sqlx::PgPool;
use tokio::time::Instant;

use crate::config::NOTIFY_CHANNEL;
use crate::listener::Announced;

/// Decides which writer statements carry a NOTIFY, and sends the ones owed.
pub(crate) struct NotifyThrottle {
    interval: Duration,
    pool: PgPool,
    announced: Arc<Announced>,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// When the last NOTIFY was asked of a statement or sent by a flush.
    last: Option<Instant>,
    /// Writer statements finished so far (committed or not).
    finished: u64,
    /// The newest finished statement that no NOTIFY has followed yet (its number), and the
    /// newest position any such statement wrote (the flush's payload).
    uncovered: Option<(u64, Position)>,
    /// Whether a flush task is running.
    flushing: bool,
}

/// What [`NotifyThrottle::begin`] decided for one statement.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ticket {
    /// Whether the statement sends the NOTIFY at its commit.
    pub(crate) notify: bool,
    /// Statements finished when this one started.
    seen: u64,
}

impl NotifyThrottle {
    /// A throttle of `interval` (zero: every statement notifies, as without one).
    pub(crate) fn new(interval: Duration, pool: PgPool, announced: Arc<Announced>) -> Arc<Self> {
        Arc::new(Self { interval, pool, announced, state: Mutex::new(State::default()) })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A writer statement is about to start: whether it should notify.
    pub(crate) fn begin(&self) -> Ticket {
        let mut state = self.state();
        let now = Instant::now();
        let notify = self.interval.is_zero() || state.last.is_none_or(|last| now.duration_since(last) >= self.interval);
        if notify {
            state.last = Some(now);
        }
        Ticket { notify, seen: state.finished }
    }

    /// A writer statement finished: `notified` if it committed with its NOTIFY, else with
    /// the newest position it wrote (`Position::START` if none, or if it failed). An
    /// uncovered statement gets a NOTIFY from a later statement or from the flush task.
    pub(crate) fn finish(self: &Arc<Self>, ticket: Ticket, notified: bool, newest: Position) {
        let mut state = self.state();
        state.finished += 1;
        if notified {
            if state.uncovered.is_some_and(|(number, _)| number <= ticket.seen) {
                state.uncovered = None;
            }
            return;
        }
        let newest = state.uncovered.map_or(newest, |(_, position)| position.max(newest));
        state.uncovered = Some((state.finished, newest));
        if !state.flushing {
            state.flushing = true;
            tokio::spawn(Arc::clone(self).flush());
        }
    }

    /// Sends the NOTIFYs owed, each two intervals after the last one unless a statement's
    /// NOTIFY covered the uncovered statements first; ends when nothing is owed.
    async fn flush(self: Arc<Self>) {
        loop {
            match self.next_flush() {
                Flush::Done => return,
                Flush::Wait(due) => tokio::time::sleep_until(due).await,
                Flush::Send(payload) => {
                    // This process's subscribers were woken by the writer already: the listener
                    // need not wake them again when this NOTIFY comes back.
                    self.announced.expect_notify(payload);
                    let sent = sqlx::query("SELECT pg_notify($1, $2)")
                        .bind(NOTIFY_CHANNEL)
                        .bind(payload.0.to_string())
                        .execute(&self.pool)
                        .await;
                    if let Err(error) = sent {
                        tracing::debug!(%error, "could not send a deferred NOTIFY; other processes will poll");
                    }
                }
            }
        }
    }

    /// What the flush task does next.
    fn next_flush(&self) -> Flush {
        let mut state = self.state();
        let Some((_, newest)) = state.uncovered else {
            state.flushing = false;
            return Flush::Done;
        };
        let now = Instant::now();
        if let Some(due) = state.last.map(|last| last + 2 * self.interval) {
            if due > now {
                return Flush::Wait(due);
            }
        }
        state.uncovered = None;
        state.last = Some(now);
        Flush::Send(newest)
    }
}

/// The flush task's next step.
enum Flush {
    /// Nothing is owed: the task ends.
    Done,
    /// Owed, but not before this.
    Wait(Instant),
    /// Send a NOTIFY with this payload now.
    Send(Position),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttle(interval: Duration) -> Arc<NotifyThrottle> {
        // Never connects: these tests stop before a flush would send.
        let pool = sqlx::postgres::PgPoolOptions::new().connect_lazy("postgres://localhost/none").expect("lazy pool");
        NotifyThrottle::new(interval, pool, Arc::new(Announced::default()))
    }

    #[tokio::test(start_paused = true)]
    async fn a_statement_inside_the_interval_skips_its_notify_and_is_owed_one() {
        let throttle = throttle(Duration::from_millis(5));
        let first = throttle.begin();
        assert!(first.notify, "the first statement notifies at once");
        throttle.finish(first, true, Position(1));
        let second = throttle.begin();
        assert!(!second.notify, "inside the interval");
        throttle.finish(second, false, Position(2));
        assert_eq!(throttle.state().uncovered, Some((2, Position(2))));
        tokio::time::advance(Duration::from_millis(5)).await;
        let third = throttle.begin();
        assert!(third.notify, "the interval has passed");
        throttle.finish(third, true, Position(3));
        assert_eq!(throttle.state().uncovered, None, "covered: it started after the second finished");
    }

    #[tokio::test(start_paused = true)]
    async fn a_notify_that_started_before_the_uncovered_statement_finished_does_not_cover_it() {
        let throttle = throttle(Duration::from_millis(5));
        let first = throttle.begin();
        throttle.finish(first, true, Position(1));
        let deferred = throttle.begin();
        tokio::time::advance(Duration::from_millis(5)).await;
        // Started while `deferred` is still running (a second writer task).
        let concurrent = throttle.begin();
        assert!(concurrent.notify);
        throttle.finish(deferred, false, Position(2));
        throttle.finish(concurrent, true, Position(3));
        assert_eq!(throttle.state().uncovered, Some((2, Position(2))), "still owed");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_notifying_statement_is_owed_a_notify_too() {
        let throttle = throttle(Duration::from_millis(5));
        let ticket = throttle.begin();
        assert!(ticket.notify);
        throttle.finish(ticket, false, Position::START);
        assert_eq!(throttle.state().uncovered, Some((1, Position::START)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_interval_notifies_every_statement() {
        let throttle = throttle(Duration::ZERO);
        for _ in 0..3 {
            let ticket = throttle.begin();
            assert!(ticket.notify);
            throttle.finish(ticket, true, Position(1));
        }
        assert_eq!(throttle.state().uncovered, None);
    }
}
