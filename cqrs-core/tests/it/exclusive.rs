//! One active consumer per exclusive handler: two runners of one handler on one store (two
//! "processes"), a standby that takes over after a release or after the holder's claim lapses,
//! and never two handling at the same time.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cqrs_core::testing::counter::{Counter, CounterCommand, CounterEvent};
use cqrs_core::{
    spawn_handler, Dispatcher, Envelope, EventHandler, EventStore, HandlerError, HandlerState, Placement, Position,
    Progress, RunnerConfig,
};
use cqrs_memory::MemoryStore;
use tokio::time::Instant;

use crate::dispatcher::Instrumented;

/// Who handled which event, and when (to check that no two owners overlap).
#[derive(Debug, Clone)]
struct Handled {
    owner: &'static str,
    position: Position,
    started: Instant,
    ended: Instant,
}

#[derive(Clone)]
struct Mailer {
    owner: &'static str,
    log: Arc<Mutex<Vec<Handled>>>,
    delay: Duration,
}

impl EventHandler for Mailer {
    type Event = CounterEvent;
    fn name(&self) -> &str {
        "mailer"
    }
    async fn handle(&self, event: Envelope<CounterEvent>) -> Result<(), HandlerError> {
        let started = Instant::now();
        tokio::time::sleep(self.delay).await;
        let record = Handled { owner: self.owner, position: event.position, started, ended: Instant::now() };
        self.log.lock().expect("lock").push(record);
        Ok(())
    }
}

fn config(owner: &str) -> RunnerConfig {
    RunnerConfig {
        owner: owner.to_owned(),
        claim_ttl: Duration::from_millis(600),
        claim_retry: Duration::from_millis(50),
        checkpoint_delay: Duration::from_millis(10),
        ..RunnerConfig::default()
    }
}

async fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn fill<S: EventStore>(dispatcher: &Dispatcher<Counter, S>, count: u32) {
    for n in 0..count {
        dispatcher.dispatch(CounterCommand::increment(n % 3, 1)).await.expect("dispatch");
    }
}

fn positions(log: &Mutex<Vec<Handled>>, owner: &str) -> Vec<u64> {
    log.lock().expect("lock").iter().filter(|h| h.owner == owner).map(|h| h.position.0).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_runner_stands_by_and_takes_over_from_the_checkpoint_after_a_release() {
    let store = Arc::new(MemoryStore::new());
    let dispatcher = Dispatcher::<Counter, _>::new(Arc::clone(&store));
    let log = Arc::new(Mutex::new(Vec::new()));
    fill(&dispatcher, 5).await;
    let (progress_a, progress_b) = (Progress::new(), Progress::new());
    let a = Mailer { owner: "a", log: Arc::clone(&log), delay: Duration::ZERO };
    let first = spawn_handler(Arc::clone(&store), a, config("a"), &progress_a);
    wait_until("a handles the history", || positions(&log, "a").len() == 5).await;
    let b = Mailer { owner: "b", log: Arc::clone(&log), delay: Duration::ZERO };
    let second = spawn_handler(Arc::clone(&store), b, config("b"), &progress_b);
    wait_until("b stands by", || second.status().state == HandlerState::Standby { holder: Some("a".into()) }).await;
    assert_eq!(second.status().placement, Placement::Exclusive);
    assert!(first.status().is_active() && first.status().owner == "a");

    fill(&dispatcher, 5).await;
    wait_until("a handles the new events", || positions(&log, "a").len() == 10).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(positions(&log, "b").is_empty(), "the standby handled nothing");

    first.stop().await; // releases the claim
    fill(&dispatcher, 5).await;
    wait_until("b takes over", || positions(&log, "b").len() == 5).await;
    assert_eq!(
        positions(&log, "b"),
        (11..=15).collect::<Vec<_>>(),
        "resumed from a's checkpoint: none skipped or repeated"
    );
    assert!(second.status().is_active() && second.status().owner == "b");
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_holder_cannot_renew_it_stops_before_the_standby_starts() {
    let store = Arc::new(Instrumented::default());
    let dispatcher = Dispatcher::<Counter, _>::new(Arc::clone(&store));
    let log = Arc::new(Mutex::new(Vec::new()));
    let slow = Duration::from_millis(40);
    let (progress_a, progress_b) = (Progress::new(), Progress::new());
    let first = spawn_handler(
        Arc::clone(&store),
        Mailer { owner: "a", log: Arc::clone(&log), delay: slow },
        config("a"),
        &progress_a,
    );
    wait_until("a holds the claim", || first.status().is_active()).await;
    let second = spawn_handler(
        Arc::clone(&store),
        Mailer { owner: "b", log: Arc::clone(&log), delay: slow },
        config("b"),
        &progress_b,
    );
    wait_until("b stands by", || matches!(second.status().state, HandlerState::Standby { .. })).await;
    fill(&dispatcher, 60).await;
    wait_until("a is busy", || positions(&log, "a").len() >= 3).await;

    // a's database connection goes away: it cannot renew, but is mid-stream.
    *store.fail_claims_of.lock().expect("lock") = Some("a".into());
    wait_until("b takes over", || !positions(&log, "b").is_empty()).await;
    wait_until("every event handled", || {
        let mut all: Vec<u64> = log.lock().expect("lock").iter().map(|h| h.position.0).collect();
        all.sort_unstable();
        all.dedup();
        all.len() == 60
    })
    .await;
    assert!(matches!(first.status().state, HandlerState::Standby { .. }), "a stood down: {:?}", first.status());

    // Never two at once: every event a started, it finished before b started its first.
    let log = log.lock().expect("lock").clone();
    let b_started = log.iter().filter(|h| h.owner == "b").map(|h| h.started).min().expect("b handled");
    let a_ended = log.iter().filter(|h| h.owner == "a").map(|h| h.ended).max().expect("a handled");
    assert!(a_ended <= b_started, "a finished at {a_ended:?}, after b started at {b_started:?}");
    // At least once, in order within each owner.
    for owner in ["a", "b"] {
        let mine: Vec<u64> = log.iter().filter(|h| h.owner == owner).map(|h| h.position.0).collect();
        assert!(mine.windows(2).all(|w| w[0] < w[1]), "{owner} handled in order: {mine:?}");
    }
    first.stop().await;
    second.stop().await;
}
