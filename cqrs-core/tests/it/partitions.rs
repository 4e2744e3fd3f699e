//! Partitioned handlers (several workers): a property test with random handling times checks
//! that events of one key are handled in order, that keys run in parallel, that the checkpoint
//! is never saved past an event not yet handled (so a restart after any prefix skips nothing),
//! and that a restart in the middle loses nothing.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cqrs_core::testing::counter::{Counter, CounterCommand, CounterEvent};
use cqrs_core::{spawn_handler, Dispatcher, Envelope, EventHandler, EventStore, HandlerError, Position, Progress};
use cqrs_core::{RunnerConfig, StreamId};
use proptest::prelude::*;

use crate::dispatcher::Instrumented;

/// Records (run, position, stream) of every event handled, after a per-event delay.
#[derive(Clone)]
struct Sorter {
    run: usize,
    delays_ms: Arc<Vec<u64>>,
    handled: Arc<Mutex<Vec<(usize, u64, StreamId)>>>,
    done: Arc<Mutex<HashSet<u64>>>,
    concurrent: Arc<AtomicUsize>,
    max_concurrent: Arc<AtomicUsize>,
}

impl EventHandler for Sorter {
    type Event = CounterEvent;
    fn name(&self) -> &str {
        "sorter"
    }
    fn partition_key(&self, event: &Envelope<CounterEvent>) -> String {
        event.stream_id.as_str().to_owned()
    }
    async fn handle(&self, event: Envelope<CounterEvent>) -> Result<(), HandlerError> {
        let now = self.concurrent.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_concurrent.fetch_max(now, Ordering::SeqCst);
        let index = usize::try_from(event.position.0).unwrap_or(0) % self.delays_ms.len().max(1);
        tokio::time::sleep(Duration::from_millis(self.delays_ms.get(index).copied().unwrap_or(0))).await;
        self.handled.lock().expect("lock").push((self.run, event.position.0, event.stream_id.clone()));
        self.done.lock().expect("lock").insert(event.position.0);
        self.concurrent.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }
}

async fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn run_case(keys: Vec<u32>, delays_ms: Vec<u64>, workers: usize, stop_after: usize) {
    let store = Arc::new(Instrumented::default());
    let dispatcher = Dispatcher::<Counter, _>::new(Arc::clone(&store));
    for key in &keys {
        dispatcher.dispatch(CounterCommand::increment(*key, 1)).await.expect("dispatch");
    }
    let total = keys.len();
    let done = Arc::new(Mutex::new(HashSet::new()));
    let violations = Arc::new(Mutex::new(Vec::new()));
    {
        let (done, violations) = (Arc::clone(&done), Arc::clone(&violations));
        *store.checkpoint_hook.lock().expect("lock") = Some(Box::new(move |checkpoint: Position| {
            let done = done.lock().expect("lock");
            let missing: Vec<u64> = (1..=checkpoint.0).filter(|p| !done.contains(p)).collect();
            if !missing.is_empty() {
                violations.lock().expect("lock").push((checkpoint.0, missing));
            }
        }));
    }
    let handled = Arc::new(Mutex::new(Vec::new()));
    let max_concurrent = Arc::new(AtomicUsize::new(0));
    let config = RunnerConfig {
        workers,
        checkpoint_every: 3,
        checkpoint_delay: Duration::from_millis(1),
        ..RunnerConfig::default()
    };
    let sorter = |run| Sorter {
        run,
        delays_ms: Arc::new(delays_ms.clone()),
        handled: Arc::clone(&handled),
        done: Arc::clone(&done),
        concurrent: Arc::new(AtomicUsize::new(0)),
        max_concurrent: Arc::clone(&max_concurrent),
    };

    // First run, stopped after some prefix; then a restarted run finishes.
    let progress = Progress::new();
    let first = spawn_handler(Arc::clone(&store), sorter(1), config.clone(), &progress);
    let stop_after = stop_after.min(total);
    wait_for("the first run's prefix", || done.lock().expect("lock").len() >= stop_after).await;
    first.stop().await;
    let progress = Progress::new();
    let second = spawn_handler(Arc::clone(&store), sorter(2), config, &progress);
    let last = Position(total as u64);
    progress.wait_for("sorter", last, Duration::from_secs(60)).await.expect("the second run catches up");
    second.stop().await;

    assert!(violations.lock().expect("lock").is_empty(), "checkpoints past unhandled events: {violations:?}");
    let handled = handled.lock().expect("lock").clone();
    let seen: HashSet<u64> = handled.iter().map(|(_, position, _)| *position).collect();
    assert_eq!(seen.len(), total, "every event handled at least once");
    for run in [1, 2] {
        let mut last_by_key: HashMap<&StreamId, u64> = HashMap::new();
        for (_, position, stream) in handled.iter().filter(|(r, _, _)| *r == run) {
            if let Some(previous) = last_by_key.insert(stream, *position) {
                assert!(previous < *position, "run {run}: {stream} handled {position} after {previous}");
            }
        }
    }
    assert_eq!(store.load_checkpoint("sorter").await.expect("load"), Some(last));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, .. ProptestConfig::default() })]

    #[test]
    fn partitioned_handlers_keep_key_order_and_never_checkpoint_past_an_unhandled_event(
        keys in proptest::collection::vec(0u32..6, 10..60),
        delays_ms in proptest::collection::vec(0u64..4, 1..30),
        workers in 2usize..5,
        stop_after in 0usize..60,
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        runtime.block_on(run_case(keys, delays_ms, workers, stop_after));
    }
}

/// Different keys really run at the same time (with two workers and two slow keys).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn different_keys_run_in_parallel() {
    let store = Arc::new(Instrumented::default());
    let dispatcher = Dispatcher::<Counter, _>::new(Arc::clone(&store));
    // Two keys that land on different workers of two.
    let mut ids = Vec::new();
    for id in 0..50u32 {
        let key = Counter::stream_id(id).as_str().to_owned();
        let mut hasher = std::hash::DefaultHasher::new();
        std::hash::Hash::hash(&key, &mut hasher);
        let worker = std::hash::Hasher::finish(&hasher) % 2;
        if !ids.iter().any(|(_, w)| *w == worker) {
            ids.push((id, worker));
        }
    }
    for _ in 0..4 {
        for (id, _) in &ids {
            dispatcher.dispatch(CounterCommand::increment(*id, 1)).await.expect("dispatch");
        }
    }
    let max_concurrent = Arc::new(AtomicUsize::new(0));
    let sorter = Sorter {
        run: 1,
        delays_ms: Arc::new(vec![30]),
        handled: Arc::new(Mutex::new(Vec::new())),
        done: Arc::new(Mutex::new(HashSet::new())),
        concurrent: Arc::new(AtomicUsize::new(0)),
        max_concurrent: Arc::clone(&max_concurrent),
    };
    let progress = Progress::new();
    let config = RunnerConfig { workers: 2, ..RunnerConfig::default() };
    let running = spawn_handler(Arc::clone(&store), sorter, config, &progress);
    progress.wait_for("sorter", Position(8), Duration::from_secs(30)).await.expect("done");
    running.stop().await;
    assert_eq!(max_concurrent.load(Ordering::SeqCst), 2, "the two keys were handled at the same time");
}
