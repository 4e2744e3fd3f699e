//! An operator's pause, resume and reset of an exclusive handler ([`HandlerControl`]), seen by
//! every runner of it (two "processes" on one store).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cqrs_core::testing::counter::{Counter, CounterCommand, CounterEvent};
use cqrs_core::{
    spawn_handler, ControlError, Coordination, Dispatcher, Envelope, EventHandler, EventStore, HandlerControl,
    HandlerError, HandlerState, Position, Progress, RunnerConfig, RunningHandler,
};
use cqrs_memory::MemoryStore;
use tokio::time::Instant;

#[derive(Clone)]
struct Recorder {
    log: Arc<Mutex<Vec<(String, u64)>>>,
    owner: String,
}

impl EventHandler for Recorder {
    type Event = CounterEvent;
    fn name(&self) -> &str {
        "recorder"
    }
    async fn handle(&self, event: Envelope<CounterEvent>) -> Result<(), HandlerError> {
        self.log.lock().expect("lock").push((self.owner.clone(), event.position.0));
        Ok(())
    }
}

fn config(owner: &str) -> RunnerConfig {
    RunnerConfig {
        owner: owner.to_owned(),
        claim_ttl: Duration::from_millis(600),
        claim_retry: Duration::from_millis(50),
        checkpoint_delay: Duration::ZERO,
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

fn positions(log: &Mutex<Vec<(String, u64)>>) -> Vec<u64> {
    log.lock().expect("lock").iter().map(|(_, position)| *position).collect()
}

fn paused(running: &RunningHandler) -> bool {
    matches!(running.status().state, HandlerState::Paused { .. })
}

struct Fixture {
    store: Arc<MemoryStore>,
    dispatcher: Dispatcher<Counter, MemoryStore>,
    log: Arc<Mutex<Vec<(String, u64)>>>,
    progress: Progress,
}

impl Fixture {
    fn new() -> Self {
        let store = Arc::new(MemoryStore::new());
        let dispatcher = Dispatcher::<Counter, _>::new(Arc::clone(&store));
        Self { store, dispatcher, log: Arc::default(), progress: Progress::new() }
    }

    fn runner(&self, owner: &str) -> RunningHandler {
        let recorder = Recorder { log: Arc::clone(&self.log), owner: owner.to_owned() };
        spawn_handler(Arc::clone(&self.store), recorder, config(owner), &self.progress)
    }

    async fn fill(&self, count: u32) -> Position {
        for n in 0..count {
            self.dispatcher.dispatch(CounterCommand::increment(n % 3, 1)).await.expect("dispatch");
        }
        self.store.head().await.expect("head")
    }

    async fn saved(&self) -> Option<Position> {
        self.store.load_checkpoint("recorder").await.expect("checkpoint")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_stops_every_runner_of_the_handler_until_it_is_lifted() {
    let fixture = Fixture::new();
    let (first, second) = (fixture.runner("a"), fixture.runner("b"));
    let head = fixture.fill(5).await;
    wait_until("the first five handled", || positions(&fixture.log).len() == 5).await;

    let control = HandlerControl::new(Arc::clone(&fixture.store));
    // The holder is in the claims, and so is the standby, announced by its claim keeper.
    let holder = (fixture.store.claims().await.expect("claims").into_iter())
        .find(|claim| claim.name == "recorder")
        .map(|claim| claim.owner)
        .expect("a holder");
    let standby = if holder == "a" { "b" } else { "a" };
    let deadline = Instant::now() + Duration::from_secs(10);
    while control.standbys().await.expect("standbys") != [("recorder".to_owned(), vec![standby.to_owned()])] {
        assert!(Instant::now() < deadline, "the standby is not listed: {:?}", control.standbys().await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    control.pause("recorder", "ops:alice").await.expect("pause");
    wait_until("both runners paused", || paused(&first) && paused(&second)).await;
    assert_eq!(first.status().state, HandlerState::Paused { by: "ops:alice".into() }, "the status names who paused it");
    assert_eq!(control.paused().await.expect("paused"), [("recorder".to_owned(), "ops:alice".to_owned())]);
    assert!(
        fixture.store.claims().await.expect("claims").iter().all(|claim| claim.name != "recorder"),
        "a paused handler's claim is given up"
    );

    let later = fixture.fill(3).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(positions(&fixture.log).len(), 5, "nothing is handled while paused");
    assert_eq!(fixture.saved().await, Some(head), "the checkpoint stays where it was");

    assert!(control.resume("recorder").await.expect("resume"));
    assert!(!control.resume("recorder").await.expect("resume again"), "a second resume finds no pause");
    wait_until("the three handled after the resume", || positions(&fixture.log).len() == 8).await;
    let handled = positions(&fixture.log);
    assert_eq!(handled.last().copied(), Some(later.0));
    let mut sorted = handled.clone();
    sorted.dedup();
    assert_eq!(sorted, handled, "each event once, in order");
    first.stop().await;
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_handles_again_exactly_the_events_after_the_chosen_position() {
    let fixture = Fixture::new();
    let running = fixture.runner("a");
    let head = fixture.fill(10).await;
    wait_until("ten handled", || positions(&fixture.log).len() == 10).await;
    let before = positions(&fixture.log);
    let control = HandlerControl::new(Arc::clone(&fixture.store));

    let refused = control.reset("recorder", Position(4), Duration::from_secs(5)).await;
    assert!(matches!(refused, Err(ControlError::NotPaused(_))), "a running handler is not reset: {refused:?}");

    // Wait for the checkpoint of all ten, so the pause itself re-handles nothing.
    let deadline = Instant::now() + Duration::from_secs(10);
    while fixture.saved().await != Some(head) {
        assert!(Instant::now() < deadline, "checkpoint not saved");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    control.pause("recorder", "ops").await.expect("pause");
    wait_until("paused", || paused(&running)).await;
    let reset_to = Position(before[3]);
    let was = control.reset("recorder", reset_to, Duration::from_secs(5)).await.expect("reset");
    assert_eq!(was, Some(head), "the reset answers the checkpoint it replaced");
    assert_eq!(fixture.saved().await, Some(reset_to));
    control.resume("recorder").await.expect("resume");

    wait_until("the six after the reset handled again", || positions(&fixture.log).len() == 16).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = positions(&fixture.log);
    assert_eq!(after.len(), 16, "nothing more than the events after the reset position");
    assert_eq!(after[10..], before[4..], "exactly the events after {reset_to}, in order");
    running.stop().await;
}
