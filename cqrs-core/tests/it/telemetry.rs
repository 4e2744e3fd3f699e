//! The framework's metrics, as a recorder sees them: dispatches by outcome, appends, handler
//! progress. (A recorder is global, and the other tests run beside this one: the metrics
//! checked exactly carry labels no other test uses. The debugging recorder drains what it
//! reports, so readings are accumulated.)

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use cqrs_core::testing::counter::{Counter, CounterCommand, CounterEvent};
use cqrs_core::{spawn_handler, Dispatcher, Envelope, EventHandler, HandlerError, Position, Progress, RunnerConfig};
use cqrs_memory::MemoryStore;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use metrics_util::MetricKind;

/// Everything recorded so far: counters summed, every gauge value seen, each metric's kind.
#[derive(Default)]
struct Seen {
    counters: HashMap<String, u64>,
    gauges: HashMap<String, Vec<f64>>,
    kinds: HashMap<String, MetricKind>,
}

fn recorder() -> &'static (Snapshotter, Mutex<Seen>) {
    static RECORDER: OnceLock<(Snapshotter, Mutex<Seen>)> = OnceLock::new();
    RECORDER.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder.install().expect("the first recorder of this test binary");
        (snapshotter, Mutex::new(Seen::default()))
    })
}

/// `name{k=v,...}` with the labels sorted.
fn key_of(name: &str, labels: &[(&str, &str)]) -> String {
    let mut labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    labels.sort();
    format!("{name}{{{}}}", labels.join(","))
}

/// Reads the recorder and returns what was seen so far.
fn seen<T>(read: impl FnOnce(&Seen) -> T) -> T {
    let (snapshotter, seen) = recorder();
    let mut seen = seen.lock().expect("lock");
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let labels: Vec<(&str, &str)> = key.key().labels().map(|l| (l.key(), l.value())).collect();
        let name = key_of(key.key().name(), &labels);
        seen.kinds.insert(key.key().name().to_owned(), key.kind());
        match value {
            DebugValue::Counter(n) => *seen.counters.entry(name).or_default() += n,
            DebugValue::Gauge(g) => seen.gauges.entry(name).or_default().push(g.into_inner()),
            DebugValue::Histogram(_) => {}
        }
    }
    read(&seen)
}

struct Counted;

impl EventHandler for Counted {
    type Event = CounterEvent;
    fn name(&self) -> &str {
        "metrics-test-handler"
    }
    async fn handle(&self, _: Envelope<CounterEvent>) -> Result<(), HandlerError> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatches_appends_and_handlers_are_measured() {
    recorder();
    let store = Arc::new(MemoryStore::new());
    let dispatcher = Dispatcher::<Counter, _>::new(Arc::clone(&store));
    for _ in 0..3 {
        dispatcher.dispatch(CounterCommand::increment(7, 1)).await.expect("dispatch");
    }
    assert!(dispatcher.dispatch(CounterCommand::decrement(7, 100)).await.is_err(), "refused");
    let progress = Progress::new();
    let running = spawn_handler(Arc::clone(&store), Counted, RunnerConfig::default(), &progress);
    progress.wait_for("metrics-test-handler", Position(3), Duration::from_secs(10)).await.expect("caught up");

    let handler = [("handler", "metrics-test-handler")];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !seen(|seen| seen.gauges.get(&key_of("cqrs_handler_position", &handler)).is_some_and(|g| g.contains(&3.0))) {
        assert!(tokio::time::Instant::now() < deadline, "the position gauge never showed 3");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    running.stop().await;
    seen(|seen| {
        assert_eq!(seen.counters.get(&key_of("cqrs_handler_events_total", &handler)), Some(&3));
        assert_eq!(seen.counters.get(&key_of("cqrs_handler_takeovers_total", &handler)), Some(&1));
        assert!(seen.gauges.get(&key_of("cqrs_handler_active", &handler)).is_some_and(|g| g.contains(&1.0)));
        // Shared with the other tests of this binary: at least what this test did.
        let stored =
            seen.counters.get(&key_of("cqrs_commands_total", &[("category", "counter"), ("outcome", "stored")]));
        assert!(stored.is_some_and(|n| *n >= 3), "{stored:?}");
        let refused =
            seen.counters.get(&key_of("cqrs_commands_total", &[("category", "counter"), ("outcome", "rejected")]));
        assert!(refused.is_some_and(|n| *n >= 1), "{refused:?}");
        let appended = seen.counters.get(&key_of("cqrs_appends_total", &[("result", "appended"), ("store", "memory")]));
        assert!(appended.is_some_and(|n| *n >= 3), "{appended:?}");
        assert_eq!(seen.kinds.get("cqrs_dispatch_duration_seconds"), Some(&MetricKind::Histogram));
        assert_eq!(seen.kinds.get("cqrs_append_duration_seconds"), Some(&MetricKind::Histogram));
    });
}

/// A refused compensation and a set-aside scheduled command are counted, by process manager.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_compensations_and_set_aside_schedules_are_counted() {
    use cqrs_core::testing::saga::{append_saga, RecordingRouter, Saga, SagaEvent};
    use cqrs_core::{spawn_process_manager, Clock, CommandId, ErrorPolicy, Scheduled, Timestamp};
    recorder();
    let store = Arc::new(MemoryStore::new());
    let process = "metered-saga";
    append_saga(&*store, SagaEvent::StartedAsking { key: "1".into(), what: "refuse-compensation".into() }).await;
    let unreadable = Scheduled {
        owner: process.to_owned(),
        key: "2".to_owned(),
        name: "deadline".to_owned(),
        due: Timestamp::now().minus(Duration::from_secs(60)),
        command: serde_json::json!({ "renamed": true }),
        command_id: CommandId::new(),
        attempts: 0,
    };
    cqrs_core::Coordination::schedule(&*store, unreadable).await.expect("schedule");
    let config = RunnerConfig {
        initial_backoff: Duration::from_millis(5),
        on_error: ErrorPolicy::ParkAfter { attempts: 1 },
        ..RunnerConfig::default()
    };
    let progress = Progress::new();
    let (clock, _control) = Clock::test();
    let running = spawn_process_manager(
        Arc::clone(&store),
        Saga::new(process),
        RecordingRouter::default(),
        config,
        clock,
        &progress,
    );
    let labels = [("process", process)];
    let (refused, set_aside) = (
        key_of("cqrs_process_compensations_refused_total", &labels),
        key_of("cqrs_process_schedules_set_aside_total", &labels),
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !seen(|seen| seen.counters.contains_key(&refused) && seen.counters.contains_key(&set_aside)) {
        assert!(tokio::time::Instant::now() < deadline, "not counted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    running.stop().await;
    seen(|seen| {
        assert_eq!(seen.counters.get(&refused), Some(&1), "refused once, then parked");
        assert_eq!(seen.counters.get(&set_aside), Some(&1));
    });
}
