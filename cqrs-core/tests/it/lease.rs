//! An exclusive runner never acts outside its lease, whatever fails: two "nodes" share one
//! store, each through its own connection ([`Node`]), and one node loses its database while
//! the other can still reach it. Handling intervals are recorded from the moment `handle` is
//! entered until it returns or is cancelled, and no interval of one node may overlap one of
//! the other. Also: a graceful stop during an outage is bounded, park writes are fenced by the
//! claim, and a failed retry never brings back an event an operator discarded.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cqrs_core::async_trait;
use cqrs_core::testing::counter::{Counter, CounterCommand, CounterEvent};
use cqrs_core::{
    spawn_handler, AppendOutcome, AppendResult, Claim, ClaimOutcome, CommandId, Coordination, Dispatcher, Envelope,
    ErrorPolicy, EventHandler, EventStore, ExpectedVersion, HandlerError, HandlerState, NewEvent, ParkedEvent,
    ParkedEvents, ParkedStatus, Position, ProcessInstance, ProcessState, Progress, RecordedEvent, RunnerConfig,
    Scheduled, SetAsideCommand, StoreError, StreamId, Timestamp, Version,
};
use cqrs_memory::MemoryStore;
use tokio::sync::watch;
use tokio::time::Instant;

/// One process's view of the shared store: its connection can go down (every call fails), and
/// its park writes can be held in flight (sent, not yet landed) until released.
struct Node {
    inner: Arc<MemoryStore>,
    down: AtomicBool,
    /// While set, a park write waits for `release_parks` in a task of its own: the caller may
    /// give up on it, but it lands later, like a statement already sent to a server.
    hold_parks: AtomicBool,
    release_parks: watch::Sender<bool>,
    /// Held park writes that have landed (or been refused).
    parks_landed: Arc<AtomicUsize>,
    /// Just before this node's next write to the parked event at this position, an operator
    /// discards it (the race between a failed retry and a discard).
    discard_before_write_to: Mutex<Option<Position>>,
}

impl Node {
    fn new(inner: &Arc<MemoryStore>) -> Arc<Self> {
        Arc::new(Self {
            inner: Arc::clone(inner),
            down: AtomicBool::new(false),
            hold_parks: AtomicBool::new(false),
            release_parks: watch::channel(false).0,
            parks_landed: Arc::default(),
            discard_before_write_to: Mutex::new(None),
        })
    }

    fn check(&self) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("connection to the database lost".into()));
        }
        Ok(())
    }

    async fn operator_discards_first(&self, handler: &str, position: Position) {
        let armed = {
            let mut armed = self.discard_before_write_to.lock().expect("lock");
            if *armed == Some(position) {
                armed.take()
            } else {
                None
            }
        };
        if armed.is_some() {
            assert!(self.inner.unpark(handler, position, None).await.expect("discard"), "discarded");
        }
    }
}

#[async_trait]
impl EventStore for Node {
    async fn append_with_condition(
        &self,
        s: &StreamId,
        e: ExpectedVersion,
        events: Vec<NewEvent>,
        condition: Option<cqrs_core::AppendCondition>,
    ) -> Result<AppendOutcome, StoreError> {
        self.check()?;
        self.inner.append_with_condition(s, e, events, condition).await
    }
    async fn append_atomic(
        &self,
        appends: Vec<cqrs_core::StreamAppend>,
        condition: Option<cqrs_core::AppendCondition>,
    ) -> Result<Vec<AppendOutcome>, StoreError> {
        self.check()?;
        self.inner.append_atomic(appends, condition).await
    }

    async fn read_query(
        &self,
        query: &cqrs_core::Query,
        after: Position,
        max: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.check()?;
        self.inner.read_query(query, after, max).await
    }
    async fn read_stream(&self, s: &StreamId, from: Version, max: usize) -> Result<Vec<RecordedEvent>, StoreError> {
        self.check()?;
        self.inner.read_stream(s, from, max).await
    }
    async fn read_all(&self, after: Position, max: usize) -> Result<Vec<RecordedEvent>, StoreError> {
        self.check()?;
        self.inner.read_all(after, max).await
    }
    async fn head(&self) -> Result<Position, StoreError> {
        self.check()?;
        self.inner.head().await
    }
    async fn stream_version(&self, s: &StreamId) -> Result<Version, StoreError> {
        self.check()?;
        self.inner.stream_version(s).await
    }
    async fn find_command(&self, s: &StreamId, id: CommandId) -> Result<Option<AppendResult>, StoreError> {
        self.check()?;
        self.inner.find_command(s, id).await
    }
    async fn load_checkpoint(&self, name: &str) -> Result<Option<Position>, StoreError> {
        self.check()?;
        self.inner.load_checkpoint(name).await
    }
    async fn save_checkpoint(&self, name: &str, position: Position) -> Result<(), StoreError> {
        self.check()?;
        self.inner.save_checkpoint(name, position).await
    }
    fn notifications(&self) -> watch::Receiver<Position> {
        self.inner.notifications()
    }
}

#[async_trait]
impl Coordination for Node {
    async fn claim(&self, name: &str, owner: &str, ttl: Duration) -> Result<ClaimOutcome, StoreError> {
        self.check()?;
        self.inner.claim(name, owner, ttl).await
    }

    async fn release_claim(&self, claim: &Claim) -> Result<(), StoreError> {
        self.check()?;
        self.inner.release_claim(claim).await
    }

    async fn claims(&self) -> Result<Vec<Claim>, StoreError> {
        self.inner.claims().await
    }

    async fn save_checkpoint_claimed(&self, name: &str, position: Position, claim: &Claim) -> Result<(), StoreError> {
        self.check()?;
        self.inner.save_checkpoint_claimed(name, position, claim).await
    }

    async fn park(&self, event: ParkedEvent, fence: Option<&Claim>) -> Result<(), StoreError> {
        self.check()?;
        self.operator_discards_first(&event.handler, event.position).await;
        if !self.hold_parks.load(Ordering::SeqCst) {
            return self.inner.park(event, fence).await;
        }
        let (inner, fence, landed) = (Arc::clone(&self.inner), fence.cloned(), Arc::clone(&self.parks_landed));
        let mut released = self.release_parks.subscribe();
        let write = async move {
            let _ = released.wait_for(|released| *released).await;
            let result = inner.park(event, fence.as_ref()).await;
            landed.fetch_add(1, Ordering::SeqCst);
            result
        };
        tokio::spawn(write).await.map_err(|error| StoreError::Unavailable(error.into()))?
    }

    async fn parked(&self, handler: &str) -> Result<Vec<ParkedEvent>, StoreError> {
        self.check()?;
        self.inner.parked(handler).await
    }

    async fn set_parked_status(
        &self,
        handler: &str,
        position: Position,
        status: ParkedStatus,
        fence: Option<&Claim>,
    ) -> Result<bool, StoreError> {
        self.check()?;
        self.operator_discards_first(handler, position).await;
        self.inner.set_parked_status(handler, position, status, fence).await
    }

    async fn parked_retry_failed(
        &self,
        handler: &str,
        position: Position,
        error: &str,
        fence: Option<&Claim>,
    ) -> Result<bool, StoreError> {
        self.check()?;
        self.operator_discards_first(handler, position).await;
        self.inner.parked_retry_failed(handler, position, error, fence).await
    }

    async fn unpark(&self, handler: &str, position: Position, fence: Option<&Claim>) -> Result<bool, StoreError> {
        self.check()?;
        self.inner.unpark(handler, position, fence).await
    }

    async fn load_process(&self, process: &str, key: &str) -> Result<Option<ProcessState>, StoreError> {
        self.inner.load_process(process, key).await
    }

    async fn save_process(
        &self,
        process: &str,
        key: &str,
        state: Option<&ProcessState>,
        fence: Option<&Claim>,
    ) -> Result<(), StoreError> {
        self.inner.save_process(process, key, state, fence).await
    }

    async fn process_instances(
        &self,
        process: &str,
        after: Option<&str>,
        max: usize,
    ) -> Result<Vec<ProcessInstance>, StoreError> {
        self.inner.process_instances(process, after, max).await
    }

    async fn prune_processes(&self, process: &str, position: Position) -> Result<u64, StoreError> {
        self.inner.prune_processes(process, position).await
    }

    async fn schedule(&self, scheduled: Scheduled) -> Result<(), StoreError> {
        self.inner.schedule(scheduled).await
    }

    async fn unschedule(
        &self,
        owner: &str,
        key: &str,
        name: &str,
        only: Option<CommandId>,
    ) -> Result<bool, StoreError> {
        self.inner.unschedule(owner, key, name, only).await
    }

    async fn due(&self, owner: &str, now: Timestamp, max: usize) -> Result<Vec<Scheduled>, StoreError> {
        self.inner.due(owner, now, max).await
    }

    async fn scheduled_failed(
        &self,
        scheduled: &Scheduled,
        error: &str,
        retry_at: Option<Timestamp>,
    ) -> Result<bool, StoreError> {
        self.inner.scheduled_failed(scheduled, error, retry_at).await
    }

    async fn set_aside_scheduled(&self, owner: &str) -> Result<Vec<SetAsideCommand>, StoreError> {
        self.inner.set_aside_scheduled(owner).await
    }

    async fn retry_scheduled(&self, owner: &str, key: &str, name: &str) -> Result<bool, StoreError> {
        self.inner.retry_scheduled(owner, key, name).await
    }
}

/// One call of `handle`: from entering it to returning or being cancelled.
#[derive(Debug, Clone)]
struct Interval {
    node: &'static str,
    position: u64,
    started: Instant,
    ended: Instant,
    completed: bool,
}

/// Records its interval when dropped: at the end of `handle`, or when its future is dropped.
struct Recording {
    log: Arc<Mutex<Vec<Interval>>>,
    node: &'static str,
    position: u64,
    started: Instant,
    completed: bool,
}

impl Drop for Recording {
    fn drop(&mut self) {
        let interval = Interval {
            node: self.node,
            position: self.position,
            started: self.started,
            ended: Instant::now(),
            completed: self.completed,
        };
        self.log.lock().expect("lock").push(interval);
    }
}

/// A side effect that takes `delay` per event (or never ends on `hang_at`), and fails on the
/// positions in `failing`.
#[derive(Clone)]
struct Mailer {
    node: &'static str,
    log: Arc<Mutex<Vec<Interval>>>,
    delay: Duration,
    hang_at: Option<u64>,
    failing: Arc<Mutex<HashSet<u64>>>,
    /// Positions `handle` was entered for, in order.
    entered: Arc<Mutex<Vec<u64>>>,
}

impl Mailer {
    fn new(node: &'static str, log: &Arc<Mutex<Vec<Interval>>>, delay: Duration) -> Self {
        Self { node, log: Arc::clone(log), delay, hang_at: None, failing: Arc::default(), entered: Arc::default() }
    }
}

impl EventHandler for Mailer {
    type Event = CounterEvent;
    fn name(&self) -> &str {
        "mailer"
    }
    async fn handle(&self, event: Envelope<CounterEvent>) -> Result<(), HandlerError> {
        let position = event.position.0;
        let mut recording = Recording {
            log: Arc::clone(&self.log),
            node: self.node,
            position,
            started: Instant::now(),
            completed: false,
        };
        self.entered.lock().expect("lock").push(position);
        if self.hang_at == Some(position) {
            // A call to a service (or a database) that never answers.
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(self.delay).await;
        if self.failing.lock().expect("lock").contains(&position) {
            return Err(HandlerError::new(format!("cannot send mail for {position}")));
        }
        recording.completed = true;
        Ok(())
    }
}

fn exclusive(owner: &str) -> RunnerConfig {
    RunnerConfig {
        owner: owner.to_owned(),
        claim_ttl: Duration::from_millis(600),
        claim_retry: Duration::from_millis(50),
        checkpoint_delay: Duration::from_millis(10),
        // Like the chat's notifier: a long back-off after failures.
        initial_backoff: Duration::from_secs(3),
        max_backoff: Duration::from_secs(30),
        ..RunnerConfig::default()
    }
}

async fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn intervals(log: &Mutex<Vec<Interval>>, node: &str) -> Vec<Interval> {
    log.lock().expect("lock").iter().filter(|i| i.node == node).cloned().collect()
}

fn completed(log: &Mutex<Vec<Interval>>) -> HashSet<u64> {
    log.lock().expect("lock").iter().filter(|i| i.completed).map(|i| i.position).collect()
}

/// No interval of `a` overlaps one of `b`.
fn assert_never_both(log: &Mutex<Vec<Interval>>) {
    let (a, b) = (intervals(log, "a"), intervals(log, "b"));
    for x in &a {
        for y in &b {
            assert!(
                x.ended <= y.started || y.ended <= x.started,
                "a handled @{} from {:?} to {:?} while b handled @{} from {:?} to {:?}",
                x.position,
                x.started,
                x.ended,
                y.position,
                y.started,
                y.ended
            );
        }
    }
}

async fn fill(dispatcher: &Dispatcher<Counter, MemoryStore>, from: u32, count: u32) {
    for n in from..from + count {
        dispatcher.dispatch(CounterCommand::increment(n % 4, 1)).await.expect("dispatch");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_cannot_read_stops_its_workers_when_its_lease_ends() {
    let store = Arc::new(MemoryStore::new());
    let dispatcher = Dispatcher::<Counter, _>::new(Arc::clone(&store));
    let (a, b) = (Node::new(&store), Node::new(&store));
    let log = Arc::new(Mutex::new(Vec::new()));
    let (progress_a, progress_b) = (Progress::new(), Progress::new());
    let slow = Duration::from_millis(50);
    // A 2 s claim: a may act on it for 1.8 s after asking, b takes it 2 s after a's last renewal.
    let config = |owner| RunnerConfig { claim_ttl: Duration::from_secs(2), ..exclusive(owner) };
    let first = spawn_handler(Arc::clone(&a), Mailer::new("a", &log, slow), config("a"), &progress_a);
    wait_until("a holds the claim", || first.status().is_active()).await;
    let second = spawn_handler(Arc::clone(&b), Mailer::new("b", &log, slow), config("b"), &progress_b);
    wait_until("b stands by", || matches!(second.status().state, HandlerState::Standby { .. })).await;

    // a reads 60 events at once and works through them slowly (3 s in all).
    fill(&dispatcher, 0, 60).await;
    wait_until("a is busy", || intervals(&log, "a").len() >= 2).await;
    // a's database goes away mid-stream, and a new event makes its feeder read (and fail, then
    // back off for 3 s); b can still reach the database.
    a.down.store(true, Ordering::SeqCst);
    fill(&dispatcher, 60, 1).await;
    wait_until("b takes over", || !intervals(&log, "b").is_empty()).await;
    wait_until("every event sent", || completed(&log).len() == 61).await;
    assert!(!first.status().is_active(), "a stood down: {:?}", first.status());
    assert_never_both(&log);
    first.abort();
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_during_an_outage_ends_within_its_bound_and_its_lease() {
    let store = Arc::new(MemoryStore::new());
    let dispatcher = Dispatcher::<Counter, _>::new(Arc::clone(&store));
    let (a, b) = (Node::new(&store), Node::new(&store));
    let log = Arc::new(Mutex::new(Vec::new()));
    let (progress_a, progress_b) = (Progress::new(), Progress::new());
    // The stop may wait a minute for the events in hand, but never past the lease.
    let config = |owner| RunnerConfig { stop_timeout: Duration::from_secs(60), ..exclusive(owner) };
    let mut mailer_a = Mailer::new("a", &log, Duration::ZERO);
    mailer_a.hang_at = Some(2);
    let entered = Arc::clone(&mailer_a.entered);
    let first = spawn_handler(Arc::clone(&a), mailer_a, config("a"), &progress_a);
    wait_until("a holds the claim", || first.status().is_active()).await;
    let second = spawn_handler(Arc::clone(&b), Mailer::new("b", &log, Duration::ZERO), config("b"), &progress_b);
    wait_until("b stands by", || matches!(second.status().state, HandlerState::Standby { .. })).await;
    fill(&dispatcher, 0, 3).await;
    wait_until("a is in event 2", || entered.lock().expect("lock").contains(&2)).await;
    // The database goes away while a's handler waits on it; the operator stops a.
    a.down.store(true, Ordering::SeqCst);
    let asked = Instant::now();
    tokio::time::timeout(Duration::from_secs(20), first.stop()).await.expect("the stop completes");
    // Bounded by the lease (600 ms, unrenewable), not by the 60 s stop timeout.
    assert!(asked.elapsed() < Duration::from_secs(5), "stop took {:?}", asked.elapsed());
    wait_until("b sends everything", || completed(&log).len() == 3).await;
    assert_never_both(&log);
    second.stop().await;

    // Without a claim (every-process placement) the stop timeout bounds it.
    let c = Node::new(&store);
    let mut mailer_c = Mailer::new("c", &log, Duration::ZERO);
    mailer_c.hang_at = Some(4);
    let entered = Arc::clone(&mailer_c.entered);
    let config = RunnerConfig {
        placement: cqrs_core::Placement::EveryProcess,
        checkpoints: cqrs_core::Checkpoints::InMemory,
        stop_timeout: Duration::from_millis(300),
        ..exclusive("c")
    };
    let progress = Progress::new();
    let third = spawn_handler(Arc::clone(&c), mailer_c, config, &progress);
    fill(&dispatcher, 3, 1).await;
    wait_until("c is in event 4", || entered.lock().expect("lock").contains(&4)).await;
    c.down.store(true, Ordering::SeqCst);
    let asked = Instant::now();
    tokio::time::timeout(Duration::from_secs(20), third.stop()).await.expect("the stop completes");
    assert!(asked.elapsed() < Duration::from_secs(5), "stop took {:?}", asked.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_park_that_lands_after_the_lease_ended_is_refused() {
    let store = Arc::new(MemoryStore::new());
    let dispatcher = Dispatcher::<Counter, _>::new(Arc::clone(&store));
    let (a, b) = (Node::new(&store), Node::new(&store));
    let log = Arc::new(Mutex::new(Vec::new()));
    let (progress_a, progress_b) = (Progress::new(), Progress::new());
    let config = |owner| RunnerConfig {
        on_error: ErrorPolicy::ParkAfter { attempts: 1 },
        initial_backoff: Duration::from_millis(20),
        parked_poll: Duration::from_millis(20),
        ..exclusive(owner)
    };
    // a fails on event 2 and parks it; its park write is sent but lands late.
    let mailer_a = Mailer::new("a", &log, Duration::ZERO);
    mailer_a.failing.lock().expect("lock").insert(2);
    a.hold_parks.store(true, Ordering::SeqCst);
    let first = spawn_handler(Arc::clone(&a), mailer_a, config("a"), &progress_a);
    wait_until("a holds the claim", || first.status().is_active()).await;
    let second = spawn_handler(Arc::clone(&b), Mailer::new("b", &log, Duration::ZERO), config("b"), &progress_b);
    wait_until("b stands by", || matches!(second.status().state, HandlerState::Standby { .. })).await;
    fill(&dispatcher, 0, 3).await;
    wait_until("a tried event 2", || intervals(&log, "a").iter().any(|i| i.position == 2)).await;
    // a loses the database; b takes over from a's checkpoint and sends event 2 fine.
    a.down.store(true, Ordering::SeqCst);
    wait_until("b sends event 2", || intervals(&log, "b").iter().any(|i| i.position == 2 && i.completed)).await;
    progress_b.wait_for("mailer", Position(3), Duration::from_secs(20)).await.expect("b caught up");
    // Now a's park lands, under a claim that is no longer held.
    a.release_parks.send_replace(true);
    wait_until("a's park write landed", || a.parks_landed.load(Ordering::SeqCst) == 1).await;
    let parked = ParkedEvents::new(Arc::clone(&store));
    assert!(parked.list("mailer").await.expect("list").is_empty(), "a stale parked row was written");
    // The stream of event 2 still flows, also for b's next tenure (which loads parked events).
    second.stop().await;
    let third = spawn_handler(Arc::clone(&b), Mailer::new("b", &log, Duration::ZERO), config("b"), &progress_b);
    dispatcher.dispatch(CounterCommand::increment(1, 1)).await.expect("dispatch");
    progress_b.wait_for("mailer", Position(4), Duration::from_secs(20)).await.expect("b handles the next event");
    assert!(completed(&log).contains(&4), "event 4 was handled, not parked behind event 2");
    assert_eq!(third.status().parked, 0);
    first.abort();
    third.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_retry_never_brings_back_an_event_discarded_meanwhile() {
    let store = Arc::new(MemoryStore::new());
    let dispatcher = Dispatcher::<Counter, _>::new(Arc::clone(&store));
    let node = Node::new(&store);
    let log = Arc::new(Mutex::new(Vec::new()));
    let progress = Progress::new();
    let config = RunnerConfig {
        on_error: ErrorPolicy::ParkAfter { attempts: 1 },
        initial_backoff: Duration::from_millis(1),
        parked_poll: Duration::from_millis(20),
        ..exclusive("a")
    };
    let mailer = Mailer::new("a", &log, Duration::ZERO);
    mailer.failing.lock().expect("lock").insert(2);
    let running = spawn_handler(Arc::clone(&node), mailer.clone(), config, &progress);
    fill(&dispatcher, 0, 3).await;
    progress.wait_for("mailer", Position(3), Duration::from_secs(20)).await.expect("went past the failure");
    let parked = ParkedEvents::new(Arc::clone(&store));
    assert_eq!(parked.list("mailer").await.expect("list").len(), 1);
    // The retry fails again; just before the runner records that, an operator discards it.
    *node.discard_before_write_to.lock().expect("lock") = Some(Position(2));
    assert!(parked.retry("mailer", Position(2)).await.expect("retry"));
    wait_until("the discard happened", || node.discard_before_write_to.lock().expect("lock").is_none()).await;
    wait_until("the runner counts nothing parked", || running.status().parked == 0).await;
    assert!(parked.list("mailer").await.expect("list").is_empty(), "the discarded event came back");
    // Its stream is not held behind it.
    mailer.failing.lock().expect("lock").clear();
    dispatcher.dispatch(CounterCommand::increment(1, 1)).await.expect("dispatch");
    progress.wait_for("mailer", Position(4), Duration::from_secs(20)).await.expect("next event");
    wait_until("event 4 sent", || completed(&log).contains(&4)).await;
    running.stop().await;
}
