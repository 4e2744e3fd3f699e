//! Dynamic Consistency Boundaries across concurrent transactions: the conformance suite's race
//! and property cases run on one store instance, whose single writer task serialises every
//! batch. Here they run where transactions really overlap: two store instances (two pools, two
//! writers: two processes) on one database, and one instance with several writer tasks. Only
//! the boundary locks keep a conditional append's check exact there.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use cqrs_core::testing::conformance;
use cqrs_core::{
    AppendCondition, AppendOutcome, AppendResult, CommandId, EventStore, ExpectedVersion, NewEvent, Position, Query,
    RecordedEvent, StoreError, StreamId, Version,
};
use cqrs_postgres::{PgEventStore, PgStoreConfig};
use tokio::sync::watch;

use crate::support::TestDb;

/// Two store instances on one database, used in turn: each call goes to the next instance, so
/// concurrent appends of one test come from two processes' writers at once.
struct TwoProcesses {
    stores: [PgEventStore; 2],
    next: AtomicUsize,
    _db: Arc<TestDb>,
}

impl TwoProcesses {
    async fn open() -> Arc<Self> {
        let db = TestDb::create().await;
        let first = db.store().await;
        let second = db.store_with(PgStoreConfig::default().with_max_connections(6).with_writer_tasks(2)).await;
        Arc::new(Self { stores: [first, second], next: AtomicUsize::new(0), _db: db })
    }

    fn pick(&self) -> &PgEventStore {
        &self.stores[self.next.fetch_add(1, Ordering::Relaxed) % 2]
    }
}

#[cqrs_core::async_trait]
impl EventStore for TwoProcesses {
    async fn append_with_condition(
        &self,
        stream_id: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        condition: Option<AppendCondition>,
    ) -> Result<AppendOutcome, StoreError> {
        self.pick().append_with_condition(stream_id, expected, events, condition).await
    }

    async fn read_query(
        &self,
        query: &Query,
        after: Position,
        max_count: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.pick().read_query(query, after, max_count).await
    }

    async fn read_stream(
        &self,
        stream_id: &StreamId,
        from: Version,
        max_count: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.pick().read_stream(stream_id, from, max_count).await
    }

    async fn read_all(&self, after: Position, max_count: usize) -> Result<Vec<RecordedEvent>, StoreError> {
        self.pick().read_all(after, max_count).await
    }

    async fn head(&self) -> Result<Position, StoreError> {
        self.pick().head().await
    }

    async fn stream_version(&self, stream_id: &StreamId) -> Result<Version, StoreError> {
        self.pick().stream_version(stream_id).await
    }

    async fn find_command(
        &self,
        stream_id: &StreamId,
        command_id: CommandId,
    ) -> Result<Option<AppendResult>, StoreError> {
        self.pick().find_command(stream_id, command_id).await
    }

    async fn load_checkpoint(&self, name: &str) -> Result<Option<Position>, StoreError> {
        self.pick().load_checkpoint(name).await
    }

    async fn save_checkpoint(&self, name: &str, position: Position) -> Result<(), StoreError> {
        self.pick().save_checkpoint(name, position).await
    }

    fn notifications(&self) -> watch::Receiver<Position> {
        self.stores[0].notifications()
    }
}

/// One instance with several writer tasks: several batch transactions in flight at once.
async fn several_writers() -> Arc<cqrs_core::testing::WithGuard<PgEventStore, Arc<TestDb>>> {
    let db = TestDb::create().await;
    let store = db.store_with(PgStoreConfig::default().with_max_connections(8).with_writer_tasks(4)).await;
    Arc::new(cqrs_core::testing::WithGuard { store, guard: db })
}

/// Overlapping conditional appends from two processes: exactly one commits per round;
/// disjoint ones all commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dcb_two_processes_overlapping_conditional_appends_exactly_one_commits() {
    conformance::dcb_overlapping_conditional_appends_exactly_one_commits(TwoProcesses::open().await).await;
}

/// Random conditional and plain (tagged) appends from two processes commit exactly when no
/// matching event came after their `after`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dcb_two_processes_random_conditional_appends_commit_exactly_when_valid() {
    conformance::dcb_random_conditional_appends_commit_exactly_when_valid(TwoProcesses::open().await).await;
}

/// Stream appends of one process (through the set-based batch function when they batch) are
/// seen by the conditions of the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dcb_two_processes_stream_appends_are_seen_by_conditions() {
    conformance::dcb_stream_appends_are_seen_by_conditions(TwoProcesses::open().await).await;
}

/// The unique user name and gapless invoice numbers, decided from two processes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dcb_two_processes_unique_names_and_gapless_invoices() {
    let store = TwoProcesses::open().await;
    conformance::dcb_unique_user_names_are_released_on_deletion(Arc::clone(&store)).await;
    conformance::dcb_invoice_numbers_are_gapless_under_concurrency(store).await;
}

/// The race and the property with four writer tasks in one instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dcb_several_writer_tasks_race_and_property() {
    let store = several_writers().await;
    conformance::dcb_overlapping_conditional_appends_exactly_one_commits(Arc::clone(&store)).await;
    conformance::dcb_random_conditional_appends_commit_exactly_when_valid(store).await;
}

/// The set-based batch function takes the shared boundary locks too: one process appends
/// tagged events without a condition in concurrent batches (several appends per batch go
/// through `cqrs_append_arrays`), the other appends with conditions on that tag; no
/// conditional append commits past a matching event stored after its `after`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dcb_set_based_batches_are_seen_by_conditions_of_another_process() {
    let processes = TwoProcesses::open().await;
    let tag = cqrs_core::Tag::new("hot", uuid::Uuid::new_v4().simple());
    let query = Query::from_items([cqrs_core::QueryItem::tags([tag.clone()])]);
    let mut plain = Vec::new();
    for _ in 0..8 {
        let (processes, tag) = (Arc::clone(&processes), tag.clone());
        plain.push(tokio::spawn(async move {
            for _ in 0..15 {
                let event = conformance::tagged("Plain", std::slice::from_ref(&tag), serde_json::json!({}));
                processes.stores[0]
                    .append(&crate::support::stream("plain"), ExpectedVersion::Any, vec![event])
                    .await
                    .expect("plain append");
            }
        }));
    }
    let mut deciders = Vec::new();
    for _ in 0..4 {
        let (processes, tag, query) = (Arc::clone(&processes), tag.clone(), query.clone());
        deciders.push(tokio::spawn(async move {
            let mut committed = Vec::new();
            for _ in 0..15 {
                let after = processes.stores[1].head().await.expect("head");
                let event = conformance::tagged("Decided", std::slice::from_ref(&tag), serde_json::json!({}));
                let condition = AppendCondition::new(query.clone(), Some(after));
                match processes.stores[1]
                    .append_with_condition(
                        &crate::support::stream("decided"),
                        ExpectedVersion::Any,
                        vec![event],
                        Some(condition),
                    )
                    .await
                {
                    Ok(outcome) => committed.push((after, outcome.result().first_position)),
                    Err(StoreError::ConditionFailed { position }) => assert!(position > after),
                    Err(other) => panic!("unexpected error: {other}"),
                }
            }
            committed
        }));
    }
    for task in plain {
        task.await.expect("plain task");
    }
    let mut committed = Vec::new();
    for task in deciders {
        committed.extend(task.await.expect("decider"));
    }
    let log = crate::support::read_everything(&*processes).await;
    for (after, at) in committed {
        let between =
            log.iter().find(|e| e.position > after && e.position < at && query.matches(&e.event_type, &e.tags));
        assert!(between.is_none(), "committed at {at} past {:?} stored after {after}", between.map(|e| e.position));
    }
}

/// A batch with far more boundary keys than the server's lock table holds (10,000 events with
/// 8 tags of their own each: 160,000 keys) takes one batch-wide lock instead of a lock per key,
/// so it is stored; and a condition still sees its events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dcb_a_batch_with_many_tags_does_not_fill_the_lock_table() {
    let db = TestDb::create().await;
    let store = db.store().await;
    let after = store.head().await.expect("head");
    let events: Vec<NewEvent> = (0..cqrs_core::store::MAX_EVENTS_PER_APPEND)
        .map(|n| {
            let tags: Vec<cqrs_core::Tag> = (0..8).map(|k| cqrs_core::Tag::new(&format!("k{k}"), n)).collect();
            conformance::tagged("Bulk", &tags, serde_json::json!({}))
        })
        .collect();
    store.append(&crate::support::stream("bulk"), ExpectedVersion::Any, events).await.expect("a large tagged batch");
    let query = Query::from_items([cqrs_core::QueryItem::tags([cqrs_core::Tag::new("k7", 9_999)])]);
    let condition = AppendCondition::new(query, Some(after));
    let event = conformance::tagged("Late", &[], serde_json::json!({}));
    let stale = store
        .append_with_condition(&crate::support::stream("late"), ExpectedVersion::Any, vec![event], Some(condition))
        .await;
    assert!(
        matches!(stale, Err(StoreError::ConditionFailed { position }) if position == Position(after.0 + 10_000)),
        "got {stale:?}"
    );
}
