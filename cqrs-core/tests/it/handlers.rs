//! Handler runners on the memory store: ordering, checkpoints, restarts, retries, stuck
//! status, read-your-writes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cqrs_core::testing::counter::{Counter, CounterCommand, CounterEvent};
use cqrs_core::{
    spawn_handler, Checkpoints, CommandEnvelope, Consistency, DispatchError, Dispatcher, Envelope, EventHandler,
    EventStore, HandlerError, HandlerState, Position, Progress, ProgressError, RunnerConfig, StartFrom, Version,
};
use cqrs_memory::MemoryStore;

/// A projection: each counter's value, plus every position it handled.
#[derive(Clone, Default)]
struct Totals {
    name: &'static str,
    values: Arc<Mutex<HashMap<String, i64>>>,
    seen: Arc<Mutex<Vec<Position>>>,
    delay: Duration,
    /// Fail this many times on the event at `fail_at`.
    fail_at: Option<Position>,
    failures_left: Arc<AtomicU32>,
}

impl EventHandler for Totals {
    type Event = CounterEvent;
    fn name(&self) -> &str {
        self.name
    }
    async fn handle(&self, event: Envelope<CounterEvent>) -> Result<(), HandlerError> {
        if Some(event.position) == self.fail_at && self.failures_left.load(Ordering::SeqCst) > 0 {
            self.failures_left.fetch_sub(1, Ordering::SeqCst);
            return Err(HandlerError::new("downstream unavailable"));
        }
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        let delta = match event.event {
            CounterEvent::Incremented { by } => by as i64,
            CounterEvent::Decremented { by } => -(by as i64),
        };
        *self.values.lock().expect("lock").entry(event.stream_id.to_string()).or_default() += delta;
        self.seen.lock().expect("lock").push(event.position);
        Ok(())
    }
}

impl Totals {
    fn named(name: &'static str) -> Self {
        Self { name, ..Self::default() }
    }
    fn value(&self, id: u32) -> i64 {
        self.values.lock().expect("lock").get(Counter::stream_id(id).as_str()).copied().unwrap_or(0)
    }
    fn seen(&self) -> Vec<Position> {
        self.seen.lock().expect("lock").clone()
    }
}

async fn fill(dispatcher: &Dispatcher<Counter, MemoryStore>, count: u32) {
    for i in 0..count {
        dispatcher.dispatch(CounterCommand::increment(i % 3, 1)).await.expect("dispatch");
    }
}

async fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..500 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn handler_sees_history_then_live_events_in_order_and_saves_its_checkpoint() {
    let store = Arc::new(MemoryStore::new());
    let dispatcher = Dispatcher::<Counter, _>::new(Arc::clone(&store));
    fill(&dispatcher, 30).await;
    let progress = Progress::new();
    let totals = Totals::named("totals");
    let running = spawn_handler(Arc::clone(&store), totals.clone(), RunnerConfig::default(), &progress);
    fill(&dispatcher, 30).await;
    wait_until("60 events", || totals.seen().len() == 60).await;
    assert_eq!(totals.seen(), (1..=60).map(Position).collect::<Vec<_>>(), "in global order, each once");
    assert_eq!((totals.value(0), totals.value(1), totals.value(2)), (20, 20, 20));
    wait_until("checkpoint", || futures_ready(store.load_checkpoint("totals")) == Some(Position(60))).await;
    assert_eq!(running.status().position, Position(60));
    running.stop().await;
}

/// Polls a ready future of the memory store (it never actually waits).
fn futures_ready<T>(future: impl std::future::Future<Output = Result<T, cqrs_core::StoreError>>) -> T {
    let waker = std::task::Waker::noop();
    let mut context = std::task::Context::from_waker(waker);
    let mut future = std::pin::pin!(future);
    match future.as_mut().poll(&mut context) {
        std::task::Poll::Ready(result) => result.expect("memory store call"),
        std::task::Poll::Pending => panic!("memory store call was not ready"),
    }
}

#[tokio::test]
async fn a_restarted_handler_resumes_after_its_checkpoint() {
    let store = Arc::new(MemoryStore::new());
    let dispatcher = Dispatcher::<Counter, _>::new(Arc::clone(&store));
    fill(&dispatcher, 10).await;
    let progress = Progress::new();
    let first = Totals::named("resumable");
    let running = spawn_handler(Arc::clone(&store), first.clone(), RunnerConfig::default(), &progress);
    wait_until("first run", || first.seen().len() == 10).await;
    running.stop().await;
    assert_eq!(futures_ready(store.load_checkpoint("resumable")), Some(Position(10)));

    fill(&dispatcher, 5).await;
    let second = Totals::named("resumable");
    let running = spawn_handler(Arc::clone(&store), second.clone(), RunnerConfig::default(), &progress);
    wait_until("second run", || second.seen().len() == 5).await;
    assert_eq!(second.seen(), (11..=15).map(Position).collect::<Vec<_>>(), "no replay of handled events");
    running.stop().await;
}

#[tokio::test]
async fn start_from_current_ignores_history() {
    let store = Arc::new(MemoryStore::new());
    let dispatcher = Dispatcher::<Counter, _>::new(Arc::clone(&store));
    fill(&dispatcher, 10).await;
    let progress = Progress::new();
    let mailer = Totals::named("mailer");
    let config = RunnerConfig { start_from: StartFrom::Current, ..RunnerConfig::default() };
    let running = spawn_handler(Arc::clone(&store), mailer.clone(), config, &progress);
    wait_until("started", || running.status().state == HandlerState::Running).await;
    fill(&dispatcher, 2).await;
    wait_until("live events", || mailer.seen().len() == 2).await;
    assert_eq!(mailer.seen(), vec![Position(11), Position(12)]);
    running.stop().await;
}

/// Caught up, the runner saves its checkpoint only after `checkpoint_delay` without events (so a
/// trickle of single commands does not cost one checkpoint write each); stopping saves it.
#[tokio::test]
async fn the_checkpoint_is_saved_after_a_pause_or_on_stop() {
    let store = Arc::new(MemoryStore::new());
    let dispatcher = Dispatcher::<Counter, _>::new(Arc::clone(&store));
    let progress = Progress::new();
    let config = RunnerConfig { checkpoint_delay: Duration::from_secs(60), ..RunnerConfig::default() };
    let model = Totals::named("patient");
    let running = spawn_handler(Arc::clone(&store), model.clone(), config, &progress);
    fill(&dispatcher, 5).await;
    wait_until("handled", || model.seen().len() == 5).await;
    assert_eq!(store.load_checkpoint("patient").await.expect("load"), None, "not saved while the pause lasts");
    running.stop().await;
    assert_eq!(store.load_checkpoint("patient").await.expect("load"), Some(Position(5)), "saved on stop");

    let config = RunnerConfig { checkpoint_delay: Duration::ZERO, ..RunnerConfig::default() };
    let eager = Totals::named("eager");
    let running = spawn_handler(Arc::clone(&store), eager.clone(), config, &progress);
    wait_until("handled", || eager.seen().len() == 5).await;
    for _ in 0..500 {
        if store.load_checkpoint("eager").await.expect("load") == Some(Position(5)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(store.load_checkpoint("eager").await.expect("load"), Some(Position(5)), "saved at once when caught up");
    running.stop().await;
}

/// A RAM projection keeps its checkpoint in memory: nothing is written to the store, and a
/// second start replays the whole history (a saved checkpoint would skip it).
#[tokio::test]
async fn in_memory_checkpoints_replay_history_on_every_start() {
    let store = Arc::new(MemoryStore::new());
    let dispatcher = Dispatcher::<Counter, _>::new(Arc::clone(&store));
    fill(&dispatcher, 6).await;
    let progress = Progress::new();
    let config = || RunnerConfig { checkpoints: Checkpoints::InMemory, checkpoint_every: 1, ..RunnerConfig::default() };
    for _ in 0..2 {
        let model = Totals::named("ram-model");
        let running = spawn_handler(Arc::clone(&store), model.clone(), config(), &progress);
        wait_until("caught up", || model.seen().len() == 6).await;
        assert_eq!(model.seen(), (1..=6).map(Position).collect::<Vec<_>>());
        running.stop().await;
        assert_eq!(store.load_checkpoint("ram-model").await.expect("load"), None, "nothing saved");
    }
}

#[tokio::test(start_paused = true)]
async fn a_failing_handler_is_retried_reported_stuck_and_never_skips() {
    let store = Arc::new(MemoryStore::new());
    let dispatcher = Dispatcher::<Counter, _>::new(Arc::clone(&store));
    fill(&dispatcher, 5).await;
    let progress = Progress::new();
    let flaky =
        Totals { fail_at: Some(Position(3)), failures_left: Arc::new(AtomicU32::new(12)), ..Totals::named("flaky") };
    let config = RunnerConfig { stuck_after: Duration::from_secs(10), ..RunnerConfig::default() };
    let running = spawn_handler(Arc::clone(&store), flaky.clone(), config, &progress);
    let mut status = running.watch();
    let retrying = status.wait_for(|s| matches!(s.state, HandlerState::Retrying { .. })).await.expect("status").clone();
    assert!(matches!(retrying.state, HandlerState::Retrying { position: Position(3), .. }), "{retrying:?}");
    assert_eq!(retrying.position, Position(2), "the last handled event");
    assert_eq!(flaky.seen(), vec![Position(1), Position(2)], "stops at the failing event");
    let stuck = status.wait_for(|s| matches!(s.state, HandlerState::Stuck { .. })).await.expect("status").clone();
    match &stuck.state {
        HandlerState::Stuck { position, attempts, error } => {
            assert_eq!(*position, Position(3));
            assert!(*attempts >= 5, "{attempts}");
            assert!(error.contains("downstream unavailable"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(progress.status("flaky").expect("registered").state, stuck.state, "queryable by name");
    // Once the failure clears, the runner goes on from the same event.
    status.wait_for(|s| s.position == Position(5)).await.expect("recovered");
    assert_eq!(flaky.seen(), (1..=5).map(Position).collect::<Vec<_>>());
    assert_eq!(running.status().state, HandlerState::Running);
    running.stop().await;
}

#[tokio::test]
async fn strong_consistency_waits_for_the_named_handlers() {
    let store = Arc::new(MemoryStore::new());
    let progress = Progress::new();
    let slow = Totals { delay: Duration::from_millis(30), ..Totals::named("slow-totals") };
    let running = spawn_handler(Arc::clone(&store), slow.clone(), RunnerConfig::default(), &progress);
    let dispatcher = Dispatcher::<Counter, _>::new(Arc::clone(&store)).with_progress(progress.clone());
    for expected in 1..=5 {
        dispatcher
            .dispatch_with(CommandEnvelope::new(CounterCommand::increment(1, 1)), &Consistency::strong(["slow-totals"]))
            .await
            .expect("dispatch");
        assert_eq!(slow.value(1), expected, "the read model already shows the write");
    }
    running.stop().await;
}

#[tokio::test]
async fn strong_consistency_reports_unknown_handlers_and_timeouts() {
    let store = Arc::new(MemoryStore::new());
    let progress = Progress::new();
    let dispatcher = Dispatcher::<Counter, _>::new(Arc::clone(&store)).with_progress(progress.clone());
    let unknown = Consistency::strong(["nobody"]);
    match dispatcher.dispatch_with(CommandEnvelope::new(CounterCommand::increment(1, 1)), &unknown).await {
        Err(DispatchError::UnknownHandler(name)) => assert_eq!(name, "nobody"),
        other => panic!("a misspelt handler name must not look like a timeout: {other:?}"),
    }
    assert!(store.is_empty(), "refused before the command ran: nothing stored");
    let stuck = Totals {
        fail_at: Some(Position(1)),
        failures_left: Arc::new(AtomicU32::new(u32::MAX)),
        ..Totals::named("stuck")
    };
    let running = spawn_handler(Arc::clone(&store), stuck, RunnerConfig::default(), &progress);
    let strict = Consistency::Strong { handlers: vec!["stuck".into()], timeout: Duration::from_millis(200) };
    match dispatcher.dispatch_with(CommandEnvelope::new(CounterCommand::increment(1, 1)), &strict).await {
        Err(DispatchError::ConsistencyTimeout { source: ProgressError::Timeout { position, .. }, outcome }) => {
            assert_eq!(position, Position(1));
            assert_eq!(outcome.version, Version(1), "the command itself succeeded");
        }
        other => panic!("{other:?}"),
    }
    running.stop().await;
}

#[tokio::test]
async fn strong_consistency_names_handlers_by_their_running_handle() {
    let store = Arc::new(MemoryStore::new());
    let progress = Progress::new();
    let totals = Totals::named("by-handle");
    let running = spawn_handler(Arc::clone(&store), totals.clone(), RunnerConfig::default(), &progress);
    let dispatcher = Dispatcher::<Counter, _>::new(Arc::clone(&store)).with_progress(progress.clone());
    let strong = Consistency::strong([&running]);
    dispatcher.dispatch_with(CommandEnvelope::new(CounterCommand::increment(1, 4)), &strong).await.expect("dispatch");
    assert_eq!(totals.value(1), 4, "read-your-writes through the handle");
    running.stop().await;
}

#[tokio::test]
async fn an_event_the_handler_takes_but_cannot_decode_is_retried_not_skipped() {
    use cqrs_core::{EventId, ExpectedVersion, Metadata, NewEvent};
    let store = Arc::new(MemoryStore::new());
    // An "Incremented" of the counter category whose payload does not fit the event type.
    let broken = NewEvent {
        event_id: EventId::new(),
        event_type: "Incremented".into(),
        schema_version: 1,
        payload: serde_json::json!({ "by": "three" }),
        metadata: Metadata::default(),
        tags: Vec::new(),
    };
    store.append(&Counter::stream_id(1), ExpectedVersion::Any, vec![broken]).await.expect("append");
    let dispatcher = Dispatcher::<Counter, _>::new(Arc::clone(&store));
    let progress = Progress::new();
    let totals = Totals::named("strict");
    let running = spawn_handler(Arc::clone(&store), totals.clone(), RunnerConfig::default(), &progress);
    wait_until("the failure is reported", || matches!(running.status().state, HandlerState::Retrying { .. })).await;
    // A later, good event (on another counter, so the broken stream need not load) waits.
    dispatcher.dispatch(CounterCommand::increment(2, 1)).await.expect("dispatch");
    tokio::time::sleep(Duration::from_millis(100)).await;
    match running.status().state {
        HandlerState::Retrying { position, error, .. } => {
            assert_eq!(position, Position(1));
            assert!(error.contains("Incremented"), "the error names the event: {error}");
        }
        other => panic!("expected Retrying, got {other:?}"),
    }
    assert_eq!(running.status().position, Position::START, "the checkpoint did not move past it");
    assert!(totals.seen().is_empty(), "nothing after it was handled");
    running.stop().await;
    assert_eq!(futures_ready(store.load_checkpoint("strict")), None, "no checkpoint past the broken event");
}

#[tokio::test]
async fn events_of_other_types_are_passed_over_but_advance_the_position() {
    let store = Arc::new(MemoryStore::new());
    let other = cqrs_core::StreamId::new("other-1").expect("id");
    store
        .append(&other, cqrs_core::ExpectedVersion::Any, vec![cqrs_core::testing::conformance::event(1)])
        .await
        .expect("append");
    let dispatcher = Dispatcher::<Counter, _>::new(Arc::clone(&store));
    fill(&dispatcher, 2).await;
    let progress = Progress::new();
    let totals = Totals::named("typed");
    let running = spawn_handler(Arc::clone(&store), totals.clone(), RunnerConfig::default(), &progress);
    progress.wait_for("typed", Position(3), Duration::from_secs(5)).await.expect("caught up");
    assert_eq!(totals.seen(), vec![Position(2), Position(3)]);
    running.stop().await;
}

#[tokio::test]
async fn start_from_current_is_fixed_at_the_first_start() {
    let store = Arc::new(MemoryStore::new());
    let dispatcher = Dispatcher::<Counter, _>::new(Arc::clone(&store));
    fill(&dispatcher, 3).await;
    let progress = Progress::new();
    let config = || RunnerConfig { start_from: StartFrom::Current, ..RunnerConfig::default() };
    let first = Totals::named("notifier");
    let running = spawn_handler(Arc::clone(&store), first.clone(), config(), &progress);
    wait_until("started", || running.status().state == HandlerState::Running).await;
    running.stop().await;
    // Stored after the first start, while the handler was down: it must still be delivered.
    fill(&dispatcher, 1).await;
    let second = Totals::named("notifier");
    let running = spawn_handler(Arc::clone(&store), second.clone(), config(), &progress);
    wait_until("the missed event", || second.seen().len() == 1).await;
    assert_eq!(second.seen(), vec![Position(4)]);
    running.stop().await;
}

#[tokio::test(start_paused = true)]
async fn stop_takes_effect_while_the_handler_is_behind() {
    let store = Arc::new(MemoryStore::new());
    let dispatcher = Dispatcher::<Counter, _>::new(Arc::clone(&store));
    fill(&dispatcher, 400).await;
    let progress = Progress::new();
    let slow = Totals { delay: Duration::from_millis(5), ..Totals::named("slow") };
    let running = spawn_handler(Arc::clone(&store), slow.clone(), RunnerConfig::default(), &progress);
    tokio::time::sleep(Duration::from_millis(50)).await;
    running.stop().await;
    let handled = slow.seen();
    assert!(handled.len() < 400, "stop must not wait for the whole backlog ({} handled)", handled.len());
    let checkpoint = futures_ready(store.load_checkpoint("slow"));
    assert_eq!(checkpoint, handled.last().copied(), "the checkpoint is the last handled event");
}

#[tokio::test]
async fn events_renamed_by_an_upcaster_reach_the_handler() {
    use cqrs_core::{FnUpcaster, Metadata, NewEvent, UpcastResult, Upcaster, Upcasters};
    /// v0 of the counter's increment was stored as "Bumped" with an `amount`.
    struct BumpedToIncremented;
    impl Upcaster for BumpedToIncremented {
        fn event_type(&self) -> &str {
            "Bumped"
        }
        fn source_version(&self) -> u32 {
            0
        }
        fn upcast(&self, payload: serde_json::Value) -> Result<UpcastResult, String> {
            let by = payload.get("amount").cloned().ok_or("amount missing")?;
            Ok(UpcastResult {
                event_type: "Incremented".into(),
                payload: serde_json::json!({"type": "Incremented", "by": by}),
            })
        }
    }
    let store = Arc::new(MemoryStore::new());
    let old = NewEvent {
        event_id: cqrs_core::EventId::new(),
        event_type: "Bumped".into(),
        schema_version: 0,
        payload: serde_json::json!({"amount": 3}),
        metadata: Metadata::default(),
        tags: Vec::new(),
    };
    store.append(&Counter::stream_id(1), cqrs_core::ExpectedVersion::Any, vec![old]).await.expect("append");
    let upcasters =
        Upcasters::new()
            .with(BumpedToIncremented)
            .with(FnUpcaster::new("Unrelated", 0, |value: serde_json::Value| Ok(value)));
    let progress = Progress::new();
    let totals = Totals::named("renamed");
    let config = RunnerConfig { upcasters, ..RunnerConfig::default() };
    let running = spawn_handler(Arc::clone(&store), totals.clone(), config, &progress);
    progress.wait_for("renamed", Position(1), Duration::from_secs(5)).await.expect("caught up");
    assert_eq!(totals.seen(), vec![Position(1)], "the renamed event was handled, not passed over");
    assert_eq!(totals.value(1), 3);
    running.stop().await;
}

#[tokio::test]
async fn start_from_current_asks_the_store_for_its_head_instead_of_reading_the_log() {
    use crate::dispatcher::Instrumented;
    use std::sync::atomic::Ordering as AtomicOrdering;
    let store = Arc::new(Instrumented::default());
    let events: Vec<_> = (0..5_000).map(cqrs_core::testing::conformance::event).collect();
    let history = cqrs_core::StreamId::new("history-1").expect("id");
    store.append(&history, cqrs_core::ExpectedVersion::Any, events).await.expect("append");
    let progress = Progress::new();
    let totals = Totals::named("from-now");
    let config = RunnerConfig { start_from: StartFrom::Current, ..RunnerConfig::default() };
    let running = spawn_handler(Arc::clone(&store), totals.clone(), config, &progress);
    wait_until("started", || running.status().state == HandlerState::Running).await;
    assert_eq!(running.status().position, Position(5_000), "starts at the head");
    let dispatcher = Dispatcher::<Counter, _>::new(Arc::clone(&store));
    dispatcher.dispatch(CounterCommand::increment(1, 1)).await.expect("dispatch");
    wait_until("the new event", || totals.seen() == vec![Position(5_001)]).await;
    assert!(
        store.all_reads.load(AtomicOrdering::SeqCst) <= 2,
        "no paging through the 5 000 stored events to find the end ({} reads)",
        store.all_reads.load(AtomicOrdering::SeqCst)
    );
    running.stop().await;
}

/// A slow handler catching up over a page shows its progress and saves its checkpoint as it
/// goes, not only after the page: a process killed mid-page resumes near where it stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_handler_saves_its_checkpoint_within_a_page() {
    let store = Arc::new(MemoryStore::new());
    let dispatcher = Dispatcher::<Counter, _>::new(Arc::clone(&store));
    fill(&dispatcher, 40).await;
    let progress = Progress::new();
    let slow = Totals { delay: Duration::from_millis(20), ..Totals::named("slow") };
    let config = RunnerConfig { checkpoint_every: 1, checkpoint_delay: Duration::ZERO, ..RunnerConfig::default() };
    let running = spawn_handler(Arc::clone(&store), slow.clone(), config, &progress);
    wait_until("ten handled", || slow.seen().len() >= 10).await;
    let saved = store.load_checkpoint("slow").await.expect("load").unwrap_or(Position::START);
    assert!(saved >= Position(5), "the checkpoint moves within the page of 40 events: {saved}");
    assert!(running.status().position >= Position(5), "and so does the status: {:?}", running.status());
    assert!(slow.seen().len() < 40, "still inside the page");
    running.stop().await;
}
