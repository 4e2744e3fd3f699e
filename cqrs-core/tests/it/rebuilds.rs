//! Projections rebuilt beside the live one ([`Rebuilds`]): built from the origin while the live
//! version serves, switched in one step with no moment where readers see a partial model, and
//! no side effect fired again.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use cqrs_core::rebuild::{version_name, RebuildError, Rebuildable, Rebuilds};
use cqrs_core::testing::counter::{Counter, CounterCommand, CounterEvent};
use cqrs_core::{
    spawn_handler, Dispatcher, Envelope, EventHandler, EventStore, HandlerControl, HandlerError, Position, Progress,
    RunnerConfig, RunningHandler, Store,
};
use cqrs_memory::MemoryStore;
use tokio::time::Instant;

/// Each version's model: the positions it has applied.
type Models = Arc<Mutex<BTreeMap<u32, BTreeSet<u64>>>>;

struct Applier {
    name: String,
    version: u32,
    models: Models,
}

impl EventHandler for Applier {
    type Event = CounterEvent;
    fn name(&self) -> &str {
        &self.name
    }
    async fn handle(&self, event: Envelope<CounterEvent>) -> Result<(), HandlerError> {
        self.models.lock().expect("lock").entry(self.version).or_default().insert(event.position.0);
        Ok(())
    }
}

/// A read model kept in memory per version, with durable checkpoints (one process here).
struct Totals {
    store: Arc<MemoryStore>,
    models: Models,
    served: AtomicU32,
    dropped: Mutex<Vec<u32>>,
}

impl Totals {
    /// What a reader sees: the size of the served version's model.
    fn read(&self) -> usize {
        let version = self.served.load(Ordering::SeqCst);
        self.models.lock().expect("lock").get(&version).map_or(0, BTreeSet::len)
    }

    fn model(&self, version: u32) -> BTreeSet<u64> {
        self.models.lock().expect("lock").get(&version).cloned().unwrap_or_default()
    }
}

#[async_trait]
impl Rebuildable for Totals {
    fn name(&self) -> &str {
        "totals"
    }
    async fn start(&self, version: u32, progress: &Progress) -> Result<RunningHandler, RebuildError> {
        let applier = Applier { name: version_name("totals", version), version, models: Arc::clone(&self.models) };
        let config = RunnerConfig {
            claim_ttl: Duration::from_millis(600),
            claim_retry: Duration::from_millis(50),
            checkpoint_delay: Duration::ZERO,
            ..RunnerConfig::default()
        };
        Ok(spawn_handler(Arc::clone(&self.store), applier, config, progress))
    }
    fn serve(&self, version: u32) {
        self.served.store(version, Ordering::SeqCst);
    }
    async fn drop_version(&self, version: u32) -> Result<(), RebuildError> {
        self.models.lock().expect("lock").remove(&version);
        self.dropped.lock().expect("lock").push(version);
        Ok(())
    }
}

/// A side effect: counts every delivery.
struct Mailer(Arc<Mutex<Vec<u64>>>);

impl EventHandler for Mailer {
    type Event = CounterEvent;
    fn name(&self) -> &str {
        "mailer"
    }
    async fn handle(&self, event: Envelope<CounterEvent>) -> Result<(), HandlerError> {
        self.0.lock().expect("lock").push(event.position.0);
        Ok(())
    }
}

async fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_built_beside_under_writes_switches_with_no_partial_model_and_no_side_effect_again() {
    let store = Arc::new(MemoryStore::new());
    let dispatcher = Arc::new(Dispatcher::<Counter, _>::new(Arc::clone(&store)));
    let progress = Progress::new();
    let mails = Arc::new(Mutex::new(Vec::new()));
    let mailer = spawn_handler(Arc::clone(&store), Mailer(Arc::clone(&mails)), RunnerConfig::default(), &progress);
    let totals = Arc::new(Totals {
        store: Arc::clone(&store),
        models: Models::default(),
        served: AtomicU32::new(0),
        dropped: Mutex::default(),
    });
    let rebuilds = Rebuilds::new(Arc::clone(&store) as Arc<dyn Store>, progress.clone(), "test");
    rebuilds.register(Arc::clone(&totals) as Arc<dyn Rebuildable>).await.expect("register");
    for n in 0..300 {
        dispatcher.dispatch(CounterCommand::increment(n % 7, 1)).await.expect("dispatch");
    }

    // Writes go on, and a reader checks that what it sees never shrinks.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn({
        let (dispatcher, stop) = (Arc::clone(&dispatcher), Arc::clone(&stop));
        async move {
            let mut n = 0u32;
            while !stop.load(Ordering::SeqCst) {
                dispatcher.dispatch(CounterCommand::increment(n % 7, 1)).await.expect("dispatch");
                n += 1;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    });
    let reader = tokio::spawn({
        let (totals, stop) = (Arc::clone(&totals), Arc::clone(&stop));
        async move {
            let (mut last, mut reads, mut shrinks) = (0usize, 0u64, Vec::new());
            while !stop.load(Ordering::SeqCst) {
                let seen = totals.read();
                if seen < last {
                    shrinks.push((last, seen));
                }
                last = seen;
                reads += 1;
                tokio::task::yield_now().await;
            }
            (reads, shrinks)
        }
    });

    let version = rebuilds.build("totals").await.expect("build");
    assert_eq!(version, 2);
    assert!(matches!(rebuilds.build("totals").await, Err(RebuildError::Busy { version: 2, .. })));
    let view = rebuilds.views().await.remove(0);
    assert_eq!((view.live, view.beside), (1, Some(2)));
    assert_eq!(totals.served.load(Ordering::SeqCst), 1, "version 1 serves while 2 is built");
    rebuilds.switch("totals", 2, Duration::from_secs(20)).await.expect("switch");
    assert_eq!(totals.served.load(Ordering::SeqCst), 2);
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::SeqCst);
    writer.await.expect("writer");
    let (reads, shrinks) = reader.await.expect("reader");
    assert!(reads > 100, "the reader read throughout ({reads} reads)");
    assert!(shrinks.is_empty(), "readers saw the model shrink: {shrinks:?}");

    // Both versions end equal to every event: 2 is a full build, 1 stays current for a rollback.
    let head = store.head().await.expect("head");
    for name in ["totals", "totals@v2", "mailer"] {
        progress.wait_for(name, head, Duration::from_secs(20)).await.expect("caught up");
    }
    let all: BTreeSet<u64> =
        store.read_all(Position::START, 100_000).await.expect("read").iter().map(|e| e.position.0).collect();
    assert_eq!(totals.model(2).len(), all.len());
    assert!(totals.model(2) == all, "version 2 equals a build of every event");
    assert!(totals.model(1) == all, "version 1 is kept current beside");
    let mailed = mails.lock().expect("lock").clone();
    assert_eq!(mailed.len(), all.len(), "the side effect ran once per event: the rebuild fired nothing again");

    let view = rebuilds.views().await.remove(0);
    assert_eq!((view.live, view.beside), (2, Some(1)), "1 is kept beside for a rollback");
    rebuilds.drop_version("totals", 1).await.expect("drop");
    assert_eq!(*totals.dropped.lock().expect("lock"), [1]);
    assert!(
        matches!(rebuilds.drop_version("totals", 2).await, Err(RebuildError::NotBeside { .. })),
        "the live one stays"
    );
    let view = rebuilds.views().await.remove(0);
    assert_eq!((view.live, view.beside), (2, None));
    assert_eq!(rebuilds.build("totals").await.expect("build again"), 3, "version numbers are never reused");
    mailer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_follows_the_switch_and_serves_the_new_version() {
    let store = Arc::new(MemoryStore::new());
    let dispatcher = Dispatcher::<Counter, _>::new(Arc::clone(&store));
    for n in 0..50 {
        dispatcher.dispatch(CounterCommand::increment(n % 3, 1)).await.expect("dispatch");
    }
    let process = || {
        let progress = Progress::new();
        let totals = Arc::new(Totals {
            store: Arc::clone(&store),
            models: Models::default(),
            served: AtomicU32::new(0),
            dropped: Mutex::default(),
        });
        (Rebuilds::new(Arc::clone(&store) as Arc<dyn Store>, progress, "p"), totals)
    };
    let (first, first_totals) = process();
    let (second, second_totals) = process();
    first.register(Arc::clone(&first_totals) as Arc<dyn Rebuildable>).await.expect("register");
    second.register(Arc::clone(&second_totals) as Arc<dyn Rebuildable>).await.expect("register");
    first.build("totals").await.expect("build");
    // An operator paused version 1: the switch works from its frozen checkpoint and leaves the
    // operator's pause in place.
    let control = HandlerControl::new(Arc::clone(&store));
    control.pause("totals", "ops:alice").await.expect("pause");
    first.switch("totals", 2, Duration::from_secs(20)).await.expect("switch");
    assert_eq!(control.paused_by("totals").await.expect("paused"), Some("ops:alice".to_owned()));
    wait_until("the second process serves version 2", || second_totals.served.load(Ordering::SeqCst) == 2).await;
    let view = second.views().await.remove(0);
    assert_eq!((view.live, view.beside), (2, Some(1)));
    assert!(view.status(2).is_some(), "the second process runs (or stands by for) version 2 too");
}
