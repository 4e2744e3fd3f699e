//! The dispatcher on the memory store: warm cache, conflicts, idempotency, parallelism,
//! metadata flow.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cqrs_core::async_trait;
use cqrs_core::testing::counter::{Counter, CounterCommand, CounterError};
use cqrs_core::{
    AppendOutcome, AppendResult, CausationId, Claim, ClaimOutcome, CommandEnvelope, CommandId, Coordination,
    CorrelationId, DispatchError, Dispatcher, DispatcherConfig, EventStore, ExpectedVersion, NewEvent, ParkedEvent,
    ParkedStatus, Position, ProcessInstance, ProcessState, RecordedEvent, Scheduled, SetAsideCommand, StoreError,
    StreamId, Timestamp, Version,
};
use cqrs_memory::MemoryStore;
use tokio::sync::{watch, Barrier};

/// A store wrapper that counts calls and can inject faults.
#[derive(Default)]
pub(crate) struct Instrumented {
    inner: MemoryStore,
    stream_reads: AtomicU64,
    /// `read_all` calls.
    pub(crate) all_reads: AtomicU64,
    /// The `from` version of every `read_stream` call.
    read_from: std::sync::Mutex<Vec<Version>>,
    appends_in_flight: AtomicUsize,
    max_appends_in_flight: AtomicUsize,
    always_conflict: AtomicBool,
    /// Store the next append, then report it as failed (an acknowledgement lost in transit).
    lose_next_ack: AtomicBool,
    barrier: Option<Arc<Barrier>>,
    /// Every `append` call, including refused ones.
    pub(crate) append_calls: AtomicU64,
    /// While set, appends wait before storing anything.
    pub(crate) hold_appends: AtomicBool,
    /// Store the next append, then never answer (the caller's future is dropped mid-append).
    pub(crate) hang_after_next_append: AtomicBool,
    /// The next `read_all` fails.
    pub(crate) fail_next_read_all: AtomicBool,
    /// While set, `read_all` waits before reading (a slow database).
    pub(crate) hold_read_all: AtomicBool,
    /// Claims asked for by this owner fail (its database connection is gone).
    pub(crate) fail_claims_of: std::sync::Mutex<Option<String>>,
    /// Called with every checkpoint saved, before it is saved.
    #[allow(clippy::type_complexity)]
    pub(crate) checkpoint_hook: std::sync::Mutex<Option<Box<dyn Fn(Position) + Send + Sync>>>,
    /// The number of links of every `append_chain` call.
    chains: std::sync::Mutex<Vec<usize>>,
}

impl Instrumented {
    fn saving(&self, position: Position) {
        if let Some(hook) = &*self.checkpoint_hook.lock().expect("lock") {
            hook(position);
        }
    }
}

/// Waits while `flag` is set.
async fn wait_while(flag: &AtomicBool) {
    while flag.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[async_trait]
impl EventStore for Instrumented {
    async fn append_with_condition(
        &self,
        stream_id: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        condition: Option<cqrs_core::AppendCondition>,
    ) -> Result<AppendOutcome, StoreError> {
        self.append_calls.fetch_add(1, Ordering::SeqCst);
        if self.always_conflict.load(Ordering::SeqCst) {
            let actual = self.inner.stream_version(stream_id).await?;
            return Err(StoreError::Conflict { stream_id: stream_id.clone(), expected, actual: Version(actual.0 + 1) });
        }
        let now = self.appends_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_appends_in_flight.fetch_max(now, Ordering::SeqCst);
        if let Some(barrier) = &self.barrier {
            barrier.wait().await;
        }
        tokio::task::yield_now().await;
        wait_while(&self.hold_appends).await;
        let result = self.inner.append_with_condition(stream_id, expected, events, condition).await;
        self.appends_in_flight.fetch_sub(1, Ordering::SeqCst);
        if self.lose_next_ack.swap(false, Ordering::SeqCst) {
            return Err(StoreError::Unavailable("connection reset during commit".into()));
        }
        if self.hang_after_next_append.swap(false, Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        result
    }
    async fn append_chain(
        &self,
        stream_id: &StreamId,
        version: Version,
        links: Vec<Vec<NewEvent>>,
    ) -> Vec<Result<AppendOutcome, StoreError>> {
        self.chains.lock().expect("lock").push(links.len());
        cqrs_core::store::append_links_one_by_one(self, stream_id, version, links).await
    }
    async fn read_stream(&self, s: &StreamId, from: Version, max: usize) -> Result<Vec<RecordedEvent>, StoreError> {
        self.stream_reads.fetch_add(1, Ordering::SeqCst);
        self.read_from.lock().expect("lock").push(from);
        self.inner.read_stream(s, from, max).await
    }
    async fn append_atomic(
        &self,
        appends: Vec<cqrs_core::StreamAppend>,
        condition: Option<cqrs_core::AppendCondition>,
    ) -> Result<Vec<AppendOutcome>, StoreError> {
        self.inner.append_atomic(appends, condition).await
    }

    async fn read_query(
        &self,
        query: &cqrs_core::Query,
        after: Position,
        max_count: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.inner.read_query(query, after, max_count).await
    }

    async fn read_all(&self, after: Position, max: usize) -> Result<Vec<RecordedEvent>, StoreError> {
        self.all_reads.fetch_add(1, Ordering::SeqCst);
        wait_while(&self.hold_read_all).await;
        if self.fail_next_read_all.swap(false, Ordering::SeqCst) {
            return Err(StoreError::Unavailable("read failed".into()));
        }
        self.inner.read_all(after, max).await
    }
    async fn head(&self) -> Result<Position, StoreError> {
        self.inner.head().await
    }
    async fn prune_commands(&self, older_than: Timestamp) -> Result<u64, StoreError> {
        self.inner.prune_commands(older_than).await
    }
    async fn stream_version(&self, s: &StreamId) -> Result<Version, StoreError> {
        self.inner.stream_version(s).await
    }
    async fn find_command(&self, s: &StreamId, id: CommandId) -> Result<Option<AppendResult>, StoreError> {
        self.inner.find_command(s, id).await
    }
    async fn load_checkpoint(&self, name: &str) -> Result<Option<Position>, StoreError> {
        self.inner.load_checkpoint(name).await
    }
    async fn save_checkpoint(&self, name: &str, position: Position) -> Result<(), StoreError> {
        self.saving(position);
        self.inner.save_checkpoint(name, position).await
    }
    fn notifications(&self) -> watch::Receiver<Position> {
        self.inner.notifications()
    }
    fn supports_snapshots(&self) -> bool {
        self.inner.supports_snapshots()
    }
    async fn load_snapshot(&self, s: &StreamId) -> Result<Option<cqrs_core::Snapshot>, StoreError> {
        self.inner.load_snapshot(s).await
    }
    async fn save_snapshot(&self, snapshot: cqrs_core::Snapshot) -> Result<(), StoreError> {
        self.inner.save_snapshot(snapshot).await
    }
}

#[async_trait]
impl Coordination for Instrumented {
    async fn claim(&self, name: &str, owner: &str, ttl: Duration) -> Result<ClaimOutcome, StoreError> {
        if self.fail_claims_of.lock().expect("lock").as_deref() == Some(owner) {
            return Err(StoreError::Unavailable("connection lost".into()));
        }
        self.inner.claim(name, owner, ttl).await
    }

    async fn release_claim(&self, claim: &Claim) -> Result<(), StoreError> {
        self.inner.release_claim(claim).await
    }

    async fn claims(&self) -> Result<Vec<Claim>, StoreError> {
        self.inner.claims().await
    }

    async fn save_checkpoint_claimed(&self, name: &str, position: Position, claim: &Claim) -> Result<(), StoreError> {
        self.saving(position);
        self.inner.save_checkpoint_claimed(name, position, claim).await
    }

    async fn park(&self, event: ParkedEvent, fence: Option<&Claim>) -> Result<(), StoreError> {
        self.inner.park(event, fence).await
    }

    async fn parked(&self, handler: &str) -> Result<Vec<ParkedEvent>, StoreError> {
        self.inner.parked(handler).await
    }

    async fn set_parked_status(
        &self,
        handler: &str,
        position: Position,
        status: ParkedStatus,
        fence: Option<&Claim>,
    ) -> Result<bool, StoreError> {
        self.inner.set_parked_status(handler, position, status, fence).await
    }

    async fn parked_retry_failed(
        &self,
        handler: &str,
        position: Position,
        error: &str,
        fence: Option<&Claim>,
    ) -> Result<bool, StoreError> {
        self.inner.parked_retry_failed(handler, position, error, fence).await
    }

    async fn unpark(&self, handler: &str, position: Position, fence: Option<&Claim>) -> Result<bool, StoreError> {
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

#[tokio::test]
async fn warm_instances_are_not_reloaded() {
    let store = Arc::new(Instrumented::default());
    let dispatcher = Dispatcher::<Counter, _>::new(Arc::clone(&store));
    for _ in 0..200 {
        dispatcher.dispatch(CounterCommand::increment(1, 1)).await.expect("increment");
    }
    // One read to load the (empty) stream, none afterwards: cost does not grow with length.
    assert_eq!(store.stream_reads.load(Ordering::SeqCst), 1);
    let (state, version) = dispatcher.load(&Counter::stream_id(1)).await.expect("load");
    assert_eq!((state.value, version), (200, Version(200)));
}

#[tokio::test]
async fn cache_is_bounded_and_evicted_instances_reload_correctly() {
    let store = Arc::new(Instrumented::default());
    let config = DispatcherConfig { cache_capacity: 4, ..DispatcherConfig::default() };
    let dispatcher = Dispatcher::<Counter, _>::with_config(Arc::clone(&store), config);
    for round in 0..3u64 {
        for id in 0..10 {
            let outcome = dispatcher.dispatch(CounterCommand::increment(id, 1)).await.expect("increment");
            assert_eq!(outcome.version, Version(round + 1));
        }
    }
    assert_eq!(dispatcher.cached_instances(), 4);
}

#[tokio::test]
async fn rejected_commands_store_nothing() {
    let store = Arc::new(MemoryStore::new());
    let dispatcher = Dispatcher::<Counter, _>::new(Arc::clone(&store));
    dispatcher.dispatch(CounterCommand::increment(1, 2)).await.expect("increment");
    match dispatcher.dispatch(CounterCommand::decrement(1, 3)).await {
        Err(DispatchError::Rejected(CounterError::WouldGoNegative { value: 2, by: 3 })) => {}
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert_eq!(store.len(), 1);
    let noop = dispatcher.dispatch(CounterCommand::Noop { id: 1 }).await.expect("noop");
    assert_eq!((noop.appended, noop.version), (None, Version(1)));
}

#[tokio::test]
async fn conflicts_from_another_process_are_retried_with_the_missing_events() {
    let store = Arc::new(Instrumented::default());
    let ours = Dispatcher::<Counter, _>::new(Arc::clone(&store));
    let theirs = Dispatcher::<Counter, _>::new(Arc::clone(&store));
    ours.dispatch(CounterCommand::increment(1, 1)).await.expect("warm up");
    theirs.dispatch(CounterCommand::increment(1, 10)).await.expect("other process");
    let reads_before = store.stream_reads.load(Ordering::SeqCst);
    // Our cache says value 1; the real value is 11, so decrementing by 5 must succeed after the
    // conflict is resolved by reading the missing event.
    let outcome = ours.dispatch(CounterCommand::decrement(1, 5)).await.expect("retried");
    assert_eq!(outcome.version, Version(3));
    assert_eq!(store.stream_reads.load(Ordering::SeqCst), reads_before + 1, "one catch-up read");
    let (state, _) = ours.load(&Counter::stream_id(1)).await.expect("load");
    assert_eq!(state.value, 6);
}

#[tokio::test]
async fn persistent_conflicts_give_up_with_a_typed_error() {
    let store = Arc::new(Instrumented::default());
    let config = DispatcherConfig { max_conflict_retries: 3, ..DispatcherConfig::default() };
    let dispatcher = Dispatcher::<Counter, _>::with_config(Arc::clone(&store), config);
    store.always_conflict.store(true, Ordering::SeqCst);
    match dispatcher.dispatch(CounterCommand::increment(1, 1)).await {
        Err(DispatchError::TooManyConflicts { attempts: 4, stream_id }) => assert_eq!(stream_id, Counter::stream_id(1)),
        other => panic!("expected TooManyConflicts, got {other:?}"),
    }
}

#[tokio::test]
async fn a_lost_acknowledgement_is_safe_to_retry_with_the_same_command_id() {
    let store = Arc::new(Instrumented::default());
    let dispatcher = Dispatcher::<Counter, _>::new(Arc::clone(&store));
    dispatcher.dispatch(CounterCommand::increment(1, 1)).await.expect("warm up");
    let key = CommandId::new();
    let command = || CommandEnvelope::new(CounterCommand::increment(1, 5)).with_command_id(key);
    store.lose_next_ack.store(true, Ordering::SeqCst);
    let error = dispatcher.dispatch(command()).await.expect_err("ack lost");
    assert!(matches!(&error, DispatchError::Store(e) if e.is_transient()), "{error:?}");
    let retry = dispatcher.dispatch(command()).await.expect("retry");
    assert!(retry.duplicate, "the retry must not apply the command twice");
    let (state, version) = dispatcher.load(&Counter::stream_id(1)).await.expect("load");
    assert_eq!((state.value, version), (6, Version(2)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn different_instances_run_in_parallel() {
    // Each append waits until two appends are in flight at once; with any global lock in the
    // dispatcher the two commands could never meet and this test would time out.
    let store = Arc::new(Instrumented { barrier: Some(Arc::new(Barrier::new(2))), ..Instrumented::default() });
    let dispatcher = Dispatcher::<Counter, _>::new(Arc::clone(&store));
    let (a, b) = (dispatcher.clone(), dispatcher.clone());
    let both = async move {
        tokio::join!(a.dispatch(CounterCommand::increment(1, 1)), b.dispatch(CounterCommand::increment(2, 1)))
    };
    let (first, second) = tokio::time::timeout(Duration::from_secs(10), both).await.expect("ran in parallel");
    first.expect("first");
    second.expect("second");
    assert_eq!(store.max_appends_in_flight.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_instance_is_serialised() {
    let store = Arc::new(Instrumented::default());
    let dispatcher = Dispatcher::<Counter, _>::new(Arc::clone(&store));
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let dispatcher = dispatcher.clone();
            tokio::spawn(async move { dispatcher.dispatch(CounterCommand::increment(7, 1)).await })
        })
        .collect();
    for task in tasks {
        let outcome = task.await.expect("task").expect("dispatch");
        assert!(!outcome.duplicate);
    }
    assert_eq!(store.max_appends_in_flight.load(Ordering::SeqCst), 1, "one command at a time per instance");
    let (state, version) = dispatcher.load(&Counter::stream_id(7)).await.expect("load");
    assert_eq!((state.value, version), (50, Version(50)));
}

/// Commands queued on a busy instance are taken by the next command to run, decided one after
/// another on the state each leaves, and stored with one chain (one round trip on PostgreSQL).
#[tokio::test]
async fn commands_queued_on_one_instance_are_decided_in_turn_and_stored_as_one_chain() {
    for batch in [64, 1] {
        let store = Arc::new(Instrumented::default());
        let config = DispatcherConfig { batch_commands: batch, ..DispatcherConfig::default() };
        let dispatcher = Dispatcher::<Counter, _>::with_config(Arc::clone(&store), config);
        store.hold_appends.store(true, Ordering::SeqCst);
        let first = {
            let dispatcher = dispatcher.clone();
            tokio::spawn(async move { dispatcher.dispatch(CounterCommand::increment(3, 1)).await })
        };
        while store.append_calls.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        // While the first waits on its append, 20 more queue up: half of them decrements, which
        // are only possible on the state the increments before them leave.
        let queued: Vec<_> = (0..20u64)
            .map(|i| {
                let dispatcher = dispatcher.clone();
                let command =
                    if i % 2 == 0 { CounterCommand::increment(3, 1) } else { CounterCommand::decrement(3, 1) };
                tokio::spawn(async move { dispatcher.dispatch(command).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        store.hold_appends.store(false, Ordering::SeqCst);
        first.await.expect("task").expect("first");
        let mut versions = Vec::new();
        for task in queued {
            let outcome = task.await.expect("task").expect("every queued command is accepted");
            versions.push(outcome.appended.expect("stored").last_version.0);
        }
        versions.sort_unstable();
        assert_eq!(versions, (2..=21).collect::<Vec<u64>>(), "each stored once, at its own version");
        let (state, version) = dispatcher.load(&Counter::stream_id(3)).await.expect("load");
        assert_eq!((state.value, version), (1, Version(21)));
        let chains = store.chains.lock().expect("lock").clone();
        if batch > 1 {
            assert_eq!(chains, [20], "the 20 queued commands were stored as one chain");
        } else {
            assert!(chains.is_empty(), "batching off: one append per command");
        }
    }
}

#[tokio::test]
async fn causation_and_correlation_flow_from_commands_to_events_to_follow_up_commands() {
    let store = Arc::new(MemoryStore::new());
    let dispatcher = Dispatcher::<Counter, _>::new(Arc::clone(&store));
    let correlation = CorrelationId::new();
    let first = CommandEnvelope::new(CounterCommand::increment(1, 1))
        .with_correlation_id(correlation)
        .with_header("user", "ada");
    let first_id = first.command_id;
    dispatcher.dispatch(first).await.expect("first");
    let event = store.read_all(Position::START, 1).await.expect("read").remove(0);
    assert_eq!(event.metadata.command_id, Some(first_id));
    assert_eq!(event.metadata.causation_id, None, "a command from outside has no cause");
    assert_eq!(event.metadata.correlation_id, Some(correlation));

    // A handler reacting to that event dispatches a follow-up command.
    let follow_up = event.cause("copy", CounterCommand::increment(2, 1));
    let follow_up_id = follow_up.command_id;
    assert_eq!(follow_up_id, CommandId::derived(event.event_id, "copy"));
    assert_eq!(follow_up.causation_id, Some(CausationId::from(event.event_id)));
    dispatcher.dispatch(follow_up).await.expect("follow-up");
    let second = store.read_all(event.position, 1).await.expect("read").remove(0);
    assert_eq!(second.metadata.correlation_id, Some(correlation), "correlation flows through the chain");
    assert_eq!(second.metadata.command_id, Some(follow_up_id));
    assert_eq!(
        second.metadata.causation_id,
        Some(CausationId::from(event.event_id)),
        "the follow-up's events name the event that caused their command"
    );
    assert_eq!(second.metadata.headers.get("user").map(String::as_str), Some("ada"));

    // The same from a decoded envelope, as an EventHandler receives it.
    let envelope =
        cqrs_core::Upcasters::new().decode::<cqrs_core::testing::counter::CounterEvent>(&second).expect("decode");
    let from_handler = envelope.cause("next", CounterCommand::increment(4, 1));
    assert_eq!(from_handler.causation_id, Some(CausationId::from(second.event_id)));
    assert_eq!(from_handler.correlation_id, Some(correlation));

    // Without an explicit correlation id, a command starts its own conversation.
    let lone = CommandEnvelope::new(CounterCommand::increment(3, 1));
    let lone_id = lone.command_id;
    dispatcher.dispatch(lone).await.expect("lone");
    let third = store.read_all(second.position, 1).await.expect("read").remove(0);
    assert_eq!(third.metadata.correlation_id, Some(CorrelationId(lone_id.0)));
}

#[tokio::test]
async fn a_retried_envelope_with_a_generated_id_is_a_duplicate_not_a_refusal() {
    let store = Arc::new(Instrumented::default());
    let dispatcher = Dispatcher::<Counter, _>::new(Arc::clone(&store));
    dispatcher.dispatch(CounterCommand::increment(1, 5)).await.expect("increment");
    // No id chosen by the caller: CommandEnvelope::new generated one.
    let withdraw = CommandEnvelope::new(CounterCommand::decrement(1, 5));
    store.lose_next_ack.store(true, Ordering::SeqCst);
    let lost = dispatcher.dispatch(withdraw.clone()).await;
    assert!(matches!(lost, Err(DispatchError::Store(StoreError::Unavailable(_)))), "{lost:?}");
    // The first try committed, so the retry would be refused on the current state (value 0);
    // its id is an idempotency key all the same, and the retry answers the first outcome.
    let retried = dispatcher.dispatch(withdraw).await.expect("the retry succeeds");
    assert!(retried.duplicate);
    assert_eq!(retried.version, Version(2));
    let (state, version) = dispatcher.load(&Counter::stream_id(1)).await.expect("load");
    assert_eq!((state.value, version), (0, Version(2)), "applied once");
}

#[tokio::test]
async fn a_dispatch_dropped_during_its_append_is_caught_up_before_the_next_decision() {
    let store = Arc::new(Instrumented::default());
    let dispatcher = Dispatcher::<Counter, _>::new(Arc::clone(&store));
    dispatcher.dispatch(CounterCommand::increment(1, 1)).await.expect("increment");
    store.hang_after_next_append.store(true, Ordering::SeqCst);
    // The append commits, but the caller gives up (a timeout, a dropped request).
    let abandoned =
        tokio::time::timeout(Duration::from_millis(100), dispatcher.dispatch(CounterCommand::increment(1, 1)));
    assert!(abandoned.await.is_err(), "the dispatch was dropped mid-append");
    let calls = store.append_calls.load(Ordering::SeqCst);
    let outcome = dispatcher.dispatch(CounterCommand::increment(1, 1)).await.expect("next command");
    assert_eq!(outcome.version, Version(3));
    assert_eq!(
        store.append_calls.load(Ordering::SeqCst) - calls,
        1,
        "the next command decided on state that includes the abandoned append (no conflict on the way)"
    );
    let (state, _) = dispatcher.load(&Counter::stream_id(1)).await.expect("load");
    assert_eq!(state.value, 3);
}

#[tokio::test]
async fn clear_cache_keeps_the_commands_on_one_instance_one_at_a_time() {
    let store = Arc::new(Instrumented::default());
    let dispatcher = Dispatcher::<Counter, _>::new(Arc::clone(&store));
    dispatcher.dispatch(CounterCommand::increment(1, 1)).await.expect("warm up");
    store.hold_appends.store(true, Ordering::SeqCst);
    let first = tokio::spawn({
        let dispatcher = dispatcher.clone();
        async move { dispatcher.dispatch(CounterCommand::increment(1, 1)).await }
    });
    while store.appends_in_flight.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    dispatcher.clear_cache();
    let second = tokio::spawn({
        let dispatcher = dispatcher.clone();
        async move { dispatcher.dispatch(CounterCommand::increment(1, 1)).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(store.appends_in_flight.load(Ordering::SeqCst), 1, "the second command waits for the first");
    store.hold_appends.store(false, Ordering::SeqCst);
    let (first, second) = (first.await.expect("task"), second.await.expect("task"));
    assert_eq!(first.expect("first").version, Version(2));
    assert_eq!(second.expect("second").version, Version(3));
    assert_eq!(store.max_appends_in_flight.load(Ordering::SeqCst), 1);
    assert_eq!(store.append_calls.load(Ordering::SeqCst), 3, "no conflict: one append per command");
    // The instance in use when the cache was cleared is reloaded by the command after it.
    let reads = store.stream_reads.load(Ordering::SeqCst);
    assert_eq!(reads, 2, "loaded at the start and once more after clear_cache");
}

/// A thermostat that is raised to at least a target: "already there" stores nothing, so that
/// decision depends on the state like a refusal does.
mod thermostat {
    use cqrs_core::{Aggregate, Command, DomainEvent};
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Default, Clone)]
    pub struct Thermostat {
        pub degrees: u32,
    }

    #[derive(Debug, Command)]
    #[command(aggregate = Thermostat, id = room)]
    pub enum Set {
        AtLeast { room: String, degrees: u32 },
        Exactly { room: String, degrees: u32 },
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
    #[event(category = "thermostat")]
    pub enum Changed {
        SetTo { degrees: u32 },
    }

    #[derive(Debug, thiserror::Error)]
    #[error("never")]
    pub struct Never;

    impl Aggregate for Thermostat {
        const CATEGORY: &'static str = "thermostat";
        type Command = Set;
        type Event = Changed;
        type Error = Never;
        fn execute(&self, command: &Set) -> Result<Vec<Changed>, Never> {
            Ok(match *command {
                Set::AtLeast { degrees, .. } if self.degrees >= degrees => vec![],
                Set::AtLeast { degrees, .. } | Set::Exactly { degrees, .. } => vec![Changed::SetTo { degrees }],
            })
        }
        fn apply(self, event: &Changed) -> Self {
            let Changed::SetTo { degrees } = *event;
            Thermostat { degrees }
        }
    }
}

#[tokio::test]
async fn a_decision_to_store_nothing_is_rechecked_when_the_cached_state_is_stale() {
    use thermostat::{Set, Thermostat};
    let store = Arc::new(MemoryStore::new());
    let here = Dispatcher::<Thermostat, _>::new(Arc::clone(&store));
    let elsewhere = Dispatcher::<Thermostat, _>::new(Arc::clone(&store)); // another process
    let at_least = || Set::AtLeast { room: "kitchen".into(), degrees: 20 };
    here.dispatch(at_least()).await.expect("raise");
    elsewhere.dispatch(Set::Exactly { room: "kitchen".into(), degrees: 15 }).await.expect("lower");
    // `here` still caches 20 degrees, on which "at least 20" stores nothing.
    let outcome = here.dispatch(at_least()).await.expect("raise again");
    assert!(outcome.appended.is_some(), "decided again on the current state (15 degrees)");
    let stream = cqrs_core::StreamId::for_aggregate("thermostat", "kitchen").expect("valid");
    let (state, version) = Dispatcher::<Thermostat, _>::new(Arc::clone(&store)).load(&stream).await.expect("load");
    assert_eq!((state.degrees, version), (20, Version(3)));
    // On current state the answer stands without another write.
    let again = here.dispatch(at_least()).await.expect("no-op");
    assert_eq!((again.appended, again.version), (None, Version(3)));
}

#[tokio::test]
async fn a_command_naming_no_valid_stream_is_a_typed_error() {
    use thermostat::{Set, Thermostat};
    let store = Arc::new(MemoryStore::new());
    let dispatcher = Dispatcher::<Thermostat, _>::new(Arc::clone(&store));
    let oversized = Set::AtLeast { room: "x".repeat(1_000), degrees: 20 };
    match dispatcher.dispatch(oversized).await {
        Err(DispatchError::InvalidStreamId(cqrs_core::StreamIdError::TooLong { .. })) => {}
        other => panic!("expected InvalidStreamId, got {other:?}"),
    }
    let control = Set::AtLeast { room: "a\u{0}b".into(), degrees: 20 };
    assert!(matches!(dispatcher.dispatch(control).await, Err(DispatchError::InvalidStreamId(_))));
    assert!(store.is_empty(), "nothing was stored");
}

/// A hand-written event impl that forgot a name in EVENT_TYPES.
mod sloppy {
    use cqrs_core::{Aggregate, Command, DomainEvent, StreamId, StreamIdError};
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Default, Clone)]
    pub struct Sloppy;

    #[derive(Debug)]
    pub struct Touch;
    impl Command for Touch {
        fn stream_id(&self) -> Result<StreamId, StreamIdError> {
            StreamId::new("sloppy-1")
        }
    }

    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub enum Event {
        Listed,
        Forgotten,
    }
    impl DomainEvent for Event {
        const EVENT_TYPES: &'static [&'static str] = &["Listed"];
        fn event_type(&self) -> &'static str {
            match self {
                Event::Listed => "Listed",
                Event::Forgotten => "Forgotten",
            }
        }
    }

    #[derive(Debug, thiserror::Error)]
    #[error("never")]
    pub struct Never;

    impl Aggregate for Sloppy {
        const CATEGORY: &'static str = "sloppy";
        type Command = Touch;
        type Event = Event;
        type Error = Never;
        fn execute(&self, _: &Touch) -> Result<Vec<Event>, Never> {
            Ok(vec![Event::Listed, Event::Forgotten])
        }
        fn apply(self, _: &Event) -> Self {
            self
        }
    }
}

#[tokio::test]
async fn an_event_type_missing_from_event_types_is_refused_not_stored() {
    let store = Arc::new(MemoryStore::new());
    let dispatcher = Dispatcher::<sloppy::Sloppy, _>::new(Arc::clone(&store));
    match dispatcher.dispatch(sloppy::Touch).await {
        Err(DispatchError::UndeclaredEventType { event_type: "Forgotten", category: "sloppy" }) => {}
        other => panic!("expected UndeclaredEventType, got {other:?}"),
    }
    assert!(store.is_empty(), "handlers would have skipped it, so nothing is stored");
}

#[tokio::test]
async fn old_event_shapes_are_upcast_when_the_dispatcher_loads_them() {
    use cqrs_core::{FnUpcaster, Metadata, Upcasters};
    let store = Arc::new(MemoryStore::new());
    // Schema v0 of "Incremented" called the field `amount`; v1 calls it `by`.
    let old = NewEvent {
        event_id: cqrs_core::EventId::new(),
        event_type: "Incremented".into(),
        schema_version: 0,
        payload: serde_json::json!({"type": "Incremented", "amount": 40}),
        metadata: Metadata::default(),
        tags: Vec::new(),
    };
    store.append(&Counter::stream_id(1), ExpectedVersion::NoStream, vec![old]).await.expect("append old shape");

    let plain = Dispatcher::<Counter, _>::new(Arc::clone(&store));
    assert!(matches!(plain.load(&Counter::stream_id(1)).await, Err(DispatchError::Decode(_))), "no silent misread");

    let upcasters = Upcasters::new().with(FnUpcaster::new("Incremented", 0, |mut payload: serde_json::Value| {
        let amount = payload.get_mut("amount").map(serde_json::Value::take).ok_or("amount missing")?;
        Ok(serde_json::json!({"type": "Incremented", "by": amount}))
    }));
    let dispatcher = Dispatcher::<Counter, _>::new(Arc::clone(&store)).with_upcasters(upcasters);
    let outcome = dispatcher.dispatch(CounterCommand::increment(1, 2)).await.expect("dispatch");
    assert_eq!(outcome.version, Version(2));
    let (state, _) = dispatcher.load(&Counter::stream_id(1)).await.expect("load");
    assert_eq!(state.value, 42);
}

#[tokio::test]
async fn snapshots_bound_what_a_cold_load_reads() {
    use cqrs_core::SnapshotPolicy;
    let store = Arc::new(Instrumented::default());
    let writer = Dispatcher::<Counter, _>::new(Arc::clone(&store)).with_snapshots(SnapshotPolicy::every(100));
    for _ in 0..250 {
        writer.dispatch(CounterCommand::increment(1, 1)).await.expect("increment");
    }
    store.read_from.lock().expect("lock").clear();
    let restarted = Dispatcher::<Counter, _>::new(Arc::clone(&store)).with_snapshots(SnapshotPolicy::every(100));
    let outcome = restarted.dispatch(CounterCommand::increment(1, 1)).await.expect("dispatch");
    assert_eq!(outcome.version, Version(251));
    assert_eq!(*store.read_from.lock().expect("lock"), vec![Version(201)], "only the events after the snapshot");
    let (state, _) = restarted.load(&Counter::stream_id(1)).await.expect("load");
    assert_eq!((state.value, state.applied), (251, 251));
}

/// An aggregate whose `apply` panics once on the value 13: a bug in user code.
mod fragile {
    use std::sync::atomic::{AtomicBool, Ordering};

    use cqrs_core::{Aggregate, Command, DomainEvent, StreamId};
    use serde::{Deserialize, Serialize};

    pub static PANIC_ON_13: AtomicBool = AtomicBool::new(false);

    #[derive(Debug, Default, Clone)]
    pub struct Fragile {
        pub total: u64,
    }

    #[derive(Debug)]
    pub struct Add(pub u64);

    impl Command for Add {
        fn stream_id(&self) -> Result<StreamId, cqrs_core::StreamIdError> {
            StreamId::new("fragile-1")
        }
    }

    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct Added(pub u64);

    impl DomainEvent for Added {
        const EVENT_TYPES: &'static [&'static str] = &["Added"];
        fn event_type(&self) -> &'static str {
            "Added"
        }
    }

    #[derive(Debug, thiserror::Error)]
    #[error("never")]
    pub struct Never;

    impl Aggregate for Fragile {
        const CATEGORY: &'static str = "fragile";
        type Command = Add;
        type Event = Added;
        type Error = Never;
        fn execute(&self, command: &Add) -> Result<Vec<Added>, Never> {
            Ok(vec![Added(command.0)])
        }
        fn apply(mut self, event: &Added) -> Self {
            if event.0 == 13 && PANIC_ON_13.swap(false, Ordering::SeqCst) {
                panic!("bug in apply");
            }
            self.total += event.0;
            self
        }
    }
}

#[tokio::test]
async fn a_panic_in_apply_does_not_leave_a_half_applied_cached_state() {
    use fragile::{Add, Fragile, PANIC_ON_13};
    let store = Arc::new(MemoryStore::new());
    let dispatcher = Dispatcher::<Fragile, _>::new(Arc::clone(&store));
    dispatcher.dispatch(Add(5)).await.expect("add 5");
    PANIC_ON_13.store(true, Ordering::SeqCst);
    let panicking = dispatcher.clone();
    let result = tokio::spawn(async move { panicking.dispatch(Add(13)).await }).await;
    assert!(result.is_err(), "apply panicked after the append");
    dispatcher.dispatch(Add(1)).await.expect("add 1");
    let stream_id = StreamId::new("fragile-1").expect("id");
    let (cached, version) = dispatcher.load(&stream_id).await.expect("cached");
    let (rebuilt, _) = Dispatcher::<Fragile, _>::new(Arc::clone(&store)).load(&stream_id).await.expect("rebuilt");
    assert_eq!((cached.total, version), (19, Version(3)));
    assert_eq!(rebuilt.total, 19);
}
