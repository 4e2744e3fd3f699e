//! Parked events: after N failures an event is parked (with every later event of its sequence
//! behind it) and the handler goes on; an operator retries or discards; parked events survive
//! restarts; nothing is passed over silently.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cqrs_core::testing::counter::{Counter, CounterCommand, CounterEvent};
use cqrs_core::{
    spawn_handler, Dispatcher, Envelope, ErrorPolicy, EventHandler, HandlerError, ParkedEvents, ParkedStatus, Position,
    Progress, RunnerConfig,
};
use cqrs_memory::MemoryStore;
use tokio::time::Instant;

/// Fails on the positions in `failing`; records the ones it handled, in order.
#[derive(Clone, Default)]
struct Picky {
    failing: Arc<Mutex<HashSet<u64>>>,
    handled: Arc<Mutex<Vec<u64>>>,
}

impl EventHandler for Picky {
    type Event = CounterEvent;
    fn name(&self) -> &str {
        "picky"
    }
    async fn handle(&self, event: Envelope<CounterEvent>) -> Result<(), HandlerError> {
        if self.failing.lock().expect("lock").contains(&event.position.0) {
            return Err(HandlerError::new(format!("cannot handle {}", event.position)));
        }
        self.handled.lock().expect("lock").push(event.position.0);
        Ok(())
    }
}

impl Picky {
    fn failing_at(positions: &[u64]) -> Self {
        let picky = Self::default();
        picky.failing.lock().expect("lock").extend(positions);
        picky
    }
    fn handled(&self) -> Vec<u64> {
        self.handled.lock().expect("lock").clone()
    }
}

fn parking() -> RunnerConfig {
    RunnerConfig {
        on_error: ErrorPolicy::ParkAfter { attempts: 3 },
        initial_backoff: Duration::from_millis(1),
        parked_poll: Duration::from_millis(20),
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

async fn parked_positions(parked: &ParkedEvents<MemoryStore>) -> Vec<u64> {
    parked.list("picky").await.expect("list").iter().map(|p| p.position.0).collect()
}

/// Counters 1 and 2 alternate: positions 1, 3, 5 are counter-1's, 2, 4, 6 counter-2's.
async fn alternate(dispatcher: &Dispatcher<Counter, MemoryStore>, events: u32) {
    for n in 0..events {
        dispatcher.dispatch(CounterCommand::increment(1 + n % 2, 1)).await.expect("dispatch");
    }
}

#[tokio::test]
async fn an_event_that_keeps_failing_is_parked_with_its_stream_behind_it_and_retried_in_order() {
    let store = Arc::new(MemoryStore::new());
    let dispatcher = Dispatcher::<Counter, _>::new(Arc::clone(&store));
    alternate(&dispatcher, 6).await;
    let progress = Progress::new();
    let picky = Picky::failing_at(&[3]);
    let running = spawn_handler(Arc::clone(&store), picky.clone(), parking(), &progress);
    progress.wait_for("picky", Position(6), Duration::from_secs(20)).await.expect("went on past the failure");
    assert_eq!(picky.handled(), [1, 2, 4, 6], "counter-2 went on; counter-1 stopped at 3");
    let parked = ParkedEvents::new(Arc::clone(&store));
    let list = parked.list("picky").await.expect("list");
    assert_eq!(list.iter().map(|p| p.position.0).collect::<Vec<_>>(), [3, 5]);
    assert_eq!((list[0].attempts, list[0].error.as_str()), (3, "cannot handle @3"));
    assert_eq!(list[0].sequence, "counter-1");
    assert!(list[1].error.contains("behind") && list[1].attempts == 0, "{:?}", list[1]);
    assert_eq!(running.status().parked, 2);

    // A retry while it still fails: it stays parked, with one more attempt on record.
    assert!(parked.retry("picky", Position(3)).await.expect("retry"));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let list = parked.list("picky").await.expect("list");
        if list[0].attempts == 4 && list.iter().all(|p| p.status == ParkedStatus::Parked) {
            break;
        }
        assert!(Instant::now() < deadline, "the failed retry was not recorded: {list:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(picky.handled(), [1, 2, 4, 6]);

    // Fixed: a retry of the later one retries the sequence from its oldest parked event.
    picky.failing.lock().expect("lock").clear();
    assert!(parked.retry("picky", Position(5)).await.expect("retry"));
    wait_until("the sequence is retried", || picky.handled().len() == 6).await;
    assert_eq!(picky.handled(), [1, 2, 4, 6, 3, 5], "3 before 5");
    wait_until("nothing parked", || running.status().parked == 0).await;
    assert!(parked_positions(&parked).await.is_empty());
    // The stream flows again.
    dispatcher.dispatch(CounterCommand::increment(1, 1)).await.expect("dispatch");
    wait_until("the next event", || picky.handled().last() == Some(&7)).await;
    running.stop().await;
}

#[tokio::test]
async fn a_discarded_event_is_never_handled_and_what_waited_behind_it_can_be_retried() {
    let store = Arc::new(MemoryStore::new());
    let dispatcher = Dispatcher::<Counter, _>::new(Arc::clone(&store));
    alternate(&dispatcher, 3).await; // 1, 3 on counter-1; 2 on counter-2
    let progress = Progress::new();
    let picky = Picky::failing_at(&[1]);
    let running = spawn_handler(Arc::clone(&store), picky.clone(), parking(), &progress);
    progress.wait_for("picky", Position(3), Duration::from_secs(20)).await.expect("went on");
    let parked = ParkedEvents::new(Arc::clone(&store));
    assert_eq!(parked_positions(&parked).await, [1, 3]);
    assert!(parked.discard("picky", Position(1)).await.expect("discard"));
    assert!(!parked.discard("picky", Position(1)).await.expect("discard twice"));
    assert_eq!(parked_positions(&parked).await, [3], "what waited behind it stays parked");
    assert!(parked.retry("picky", Position(3)).await.expect("retry"));
    wait_until("3 handled", || picky.handled().contains(&3)).await;
    assert_eq!(picky.handled(), [2, 3], "1 was discarded, never handled");
    wait_until("nothing parked", || running.status().parked == 0).await;
    running.stop().await;
}

#[tokio::test]
async fn parked_events_survive_a_restart_and_keep_holding_their_sequence_back() {
    let store = Arc::new(MemoryStore::new());
    let dispatcher = Dispatcher::<Counter, _>::new(Arc::clone(&store));
    alternate(&dispatcher, 2).await; // 1 on counter-1, 2 on counter-2
    let progress = Progress::new();
    let picky = Picky::failing_at(&[1]);
    let first = spawn_handler(Arc::clone(&store), picky.clone(), parking(), &progress);
    progress.wait_for("picky", Position(2), Duration::from_secs(20)).await.expect("went on");
    first.stop().await;

    let restarted = Picky::default(); // fixed, in a new process
    let progress = Progress::new();
    let second = spawn_handler(Arc::clone(&store), restarted.clone(), parking(), &progress);
    alternate(&dispatcher, 2).await; // 3 on counter-1 (behind 1), 4 on counter-2
    progress.wait_for("picky", Position(4), Duration::from_secs(20)).await.expect("caught up");
    assert_eq!(restarted.handled(), [4], "counter-1 is still held back by its parked event");
    assert_eq!(second.status().parked, 2);
    let parked = ParkedEvents::new(Arc::clone(&store));
    assert_eq!(parked_positions(&parked).await, [1, 3]);
    assert_eq!(parked.retry_all("picky").await.expect("retry all"), 2);
    wait_until("both retried", || restarted.handled().len() == 3).await;
    assert_eq!(restarted.handled(), [4, 1, 3]);
    second.stop().await;
}

/// Handles like [`Picky`], but a retry of `held` waits at a gate the test opens.
#[derive(Clone)]
struct Gated {
    picky: Picky,
    held: u64,
    inside: Arc<std::sync::atomic::AtomicBool>,
    gate: Arc<tokio::sync::Semaphore>,
}

impl EventHandler for Gated {
    type Event = CounterEvent;
    fn name(&self) -> &str {
        "picky"
    }
    async fn handle(&self, event: Envelope<CounterEvent>) -> Result<(), HandlerError> {
        let retrying = !self.picky.failing.lock().expect("lock").contains(&event.position.0);
        if event.position.0 == self.held && retrying {
            self.inside.store(true, std::sync::atomic::Ordering::SeqCst);
            let _permit = self.gate.acquire().await.map_err(HandlerError::new)?;
        }
        self.picky.handle(event).await
    }
}

#[tokio::test]
async fn discarding_an_event_while_its_retry_runs_counts_it_once_and_keeps_polling() {
    let store = Arc::new(MemoryStore::new());
    let dispatcher = Dispatcher::<Counter, _>::new(Arc::clone(&store));
    alternate(&dispatcher, 4).await;
    let progress = Progress::new();
    // 3 (counter-1) and 4 (counter-2) fail: two parked events, nothing behind them.
    let gated = Gated {
        picky: Picky::failing_at(&[3, 4]),
        held: 3,
        inside: Arc::default(),
        gate: Arc::new(tokio::sync::Semaphore::new(0)),
    };
    let running = spawn_handler(Arc::clone(&store), gated.clone(), parking(), &progress);
    progress.wait_for("picky", Position(4), Duration::from_secs(20)).await.expect("went on");
    let parked = ParkedEvents::new(Arc::clone(&store));
    wait_until("two parked", || running.status().parked == 2).await;

    // Fixed for 3; its retry is in the handler when an operator discards it.
    gated.picky.failing.lock().expect("lock").remove(&3);
    assert!(parked.retry("picky", Position(3)).await.expect("retry"));
    wait_until("the retry is in the handler", || gated.inside.load(std::sync::atomic::Ordering::SeqCst)).await;
    assert!(parked.discard("picky", Position(3)).await.expect("discard"));
    wait_until("the runner sees the discard", || running.status().parked == 1).await;
    gated.gate.add_permits(1);
    wait_until("the retry ran", || gated.picky.handled().contains(&3)).await;
    assert_eq!(parked_positions(&parked).await, [4]);

    // Still counted: 4 is parked, so retry requests are still looked for.
    gated.picky.failing.lock().expect("lock").clear();
    assert!(parked.retry("picky", Position(4)).await.expect("retry"));
    wait_until("4 is retried", || gated.picky.handled().contains(&4)).await;
    wait_until("nothing parked", || running.status().parked == 0).await;
    assert!(parked_positions(&parked).await.is_empty());
    running.stop().await;
}
