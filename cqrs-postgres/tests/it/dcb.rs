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

    async fn append_atomic(
        &self,
        appends: Vec<cqrs_core::StreamAppend>,
        condition: Option<AppendCondition>,
    ) -> Result<Vec<AppendOutcome>, StoreError> {
        self.pick().append_atomic(appends, condition).await
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

/// Overlapping atomic appends (two streams each) from two processes: exactly one commits per
/// round, and no loser leaves a stream behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dcb_two_processes_atomic_appends_exactly_one_commits() {
    conformance::atomic_appends_with_overlapping_conditions_exactly_one_commits(TwoProcesses::open().await).await;
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
    let tag = cqrs_core::Tag::new("hot", uuid::Uuid::new_v4().simple());
    race_conditions(
        Plain { tasks: 8, appends: 15, decider_attempts: 15 },
        "Plain",
        vec![tag.clone()],
        cqrs_core::QueryItem::tags([tag]),
    )
    .await;
}

/// The single-event statement takes the shared boundary locks too: one process appends tagged
/// events one at a time without a condition (each a batch of one, written by that statement),
/// the other appends with conditions on that tag; no conditional append commits past a
/// matching event stored after its `after`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dcb_single_event_appends_are_seen_by_conditions_of_another_process() {
    let tag = cqrs_core::Tag::new("hot", uuid::Uuid::new_v4().simple());
    race_conditions(
        Plain { tasks: 1, appends: 300, decider_attempts: 60 },
        "Plain",
        vec![tag.clone()],
        cqrs_core::QueryItem::tags([tag]),
    )
    .await;
}

/// The same with untagged events and a condition on their type (the statement's cheaper
/// variant, which takes the type's keys as a pair).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dcb_untagged_single_event_appends_are_seen_by_type_conditions() {
    let event_type = format!("Plain{}", uuid::Uuid::new_v4().simple());
    let item = cqrs_core::QueryItem::types([event_type.clone()]);
    race_conditions(Plain { tasks: 1, appends: 300, decider_attempts: 60 }, &event_type, Vec::new(), item).await;
}

/// The shape of a [`race_conditions`] run: how many unconditional tasks, each appending how
/// many events one at a time, and the fewest attempts each decider makes.
struct Plain {
    tasks: usize,
    appends: usize,
    decider_attempts: usize,
}

/// `plain.tasks` tasks append `plain.appends` events of `event_type` with `tags` each, one at a
/// time, on the instance with one writer (one task: every batch is that one append; several:
/// batches of several); four deciders on the other instance append events of the same type and
/// tags on condition that nothing matching `item` came after the head they read. Every
/// committed conditional append must have no match between the two.
///
/// Each decider makes at least `plain.decider_attempts` attempts and goes on until it has made
/// one that began after every plain task finished: only the deciders' own events can fail
/// those, so at least one of them commits, however the machine schedules the tasks.
async fn race_conditions(plain: Plain, event_type: &str, tags: Vec<cqrs_core::Tag>, item: cqrs_core::QueryItem) {
    let processes = TwoProcesses::open().await;
    let query = Query::from_items([item]);
    let mut plain_tasks = Vec::new();
    for _ in 0..plain.tasks {
        let (processes, event_type, tags) = (Arc::clone(&processes), event_type.to_owned(), tags.clone());
        plain_tasks.push(tokio::spawn(async move {
            for _ in 0..plain.appends {
                let event = conformance::tagged(&event_type, &tags, serde_json::json!({}));
                processes.stores[0]
                    .append(&crate::support::stream("plain"), ExpectedVersion::Any, vec![event])
                    .await
                    .expect("plain append");
            }
        }));
    }
    let plain_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut deciders = Vec::new();
    for _ in 0..4 {
        let (processes, event_type, tags, query) =
            (Arc::clone(&processes), event_type.to_owned(), tags.clone(), query.clone());
        let plain_done = Arc::clone(&plain_done);
        deciders.push(tokio::spawn(async move {
            let mut committed = Vec::new();
            for attempt in 1.. {
                let last = attempt >= plain.decider_attempts && plain_done.load(Ordering::SeqCst);
                let after = processes.stores[1].head().await.expect("head");
                let event = conformance::tagged(&event_type, &tags, serde_json::json!({"decided": true}));
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
                if last {
                    break;
                }
            }
            committed
        }));
    }
    for task in plain_tasks {
        task.await.expect("plain task");
    }
    plain_done.store(true, Ordering::SeqCst);
    let mut committed = Vec::new();
    for task in deciders {
        committed.extend(task.await.expect("decider"));
    }
    assert!(!committed.is_empty(), "no conditional append committed: nothing was checked");
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

/// The shared buffers one statement touched, from `EXPLAIN (ANALYZE, BUFFERS)` (functions it
/// calls included): a measure of work that does not depend on the machine's speed.
async fn buffers_of(connection: &mut sqlx::PgConnection, statement: &str) -> u64 {
    let lines: Vec<String> =
        sqlx::query_scalar(&format!("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF, TIMING OFF) {statement}"))
            .fetch_all(&mut *connection)
            .await
            .expect("explain");
    let line = lines.iter().find(|line| line.contains("Buffers: shared")).expect("a buffers line");
    line.split_whitespace()
        .filter_map(|word| word.split_once('=').and_then(|(key, n)| (key == "hit" || key == "read").then_some(n)))
        .map(|n| n.trim_end_matches(',').parse::<u64>().expect("a count"))
        .sum()
}

/// A rare tag among many events of a common one: `read_query` pages (small and large pages,
/// single items, several items, tags with types) return exactly what a filter of the log
/// returns, and conditions fail at the first match. The check walks the tag index in order:
/// the first match of a common tag or of a rare one costs a few pages, under generic plans, not
/// one per match (as an unordered GIN index costs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dcb_rare_and_common_tags_are_read_and_checked_through_the_tag_index() {
    let db = TestDb::create().await;
    let store = db.store().await;
    let common = cqrs_core::Tag::new("common", "x");
    let rare = cqrs_core::Tag::new("rare", "y");
    for batch in 0..40u32 {
        let events = (0..100u32)
            .map(|i| {
                let n = batch * 100 + i;
                let mut tags = vec![common.clone(), cqrs_core::Tag::new("mod", n % 7)];
                if n % 1500 == 1499 {
                    tags.push(rare.clone());
                }
                let kind = if n % 3 == 0 { "Three" } else { "Other" };
                conformance::tagged(kind, &tags, serde_json::json!({ "n": n }))
            })
            .collect();
        store.append(&crate::support::stream("filler"), ExpectedVersion::Any, events).await.expect("append");
    }
    let log = crate::support::read_everything(&store).await;
    let queries = [
        Query::from_items([cqrs_core::QueryItem::tags([rare.clone()])]),
        Query::from_items([cqrs_core::QueryItem::tags([common.clone()])]),
        Query::from_items([cqrs_core::QueryItem::types(["Three"]).with_tags([rare.clone()])]),
        Query::from_items([cqrs_core::QueryItem::tags([common.clone(), cqrs_core::Tag::new("mod", 3)])]),
        Query::from_items([
            cqrs_core::QueryItem::tags([rare.clone()]),
            cqrs_core::QueryItem::types(["Three"]).with_tags([cqrs_core::Tag::new("mod", 5)]),
            cqrs_core::QueryItem::types(["Nothing"]),
        ]),
    ];
    for query in &queries {
        let expected: Vec<Position> =
            log.iter().filter(|e| query.matches(&e.event_type, &e.tags)).map(|e| e.position).collect();
        for page in [1, 7, 1000] {
            let mut read = Vec::new();
            let mut after = Position(0);
            loop {
                let events = store.read_query(query, after, page).await.expect("read_query");
                let Some(last) = events.last() else { break };
                after = last.position;
                read.extend(events.iter().map(|e| e.position));
            }
            assert_eq!(read, expected, "{query:?} in pages of {page}");
        }
        for after in [Position(0), expected.first().copied().unwrap_or(Position(0)), Position(3999)] {
            let first = expected.iter().copied().find(|p| *p > after);
            let condition = AppendCondition::new(query.clone(), Some(after));
            let outcome = store
                .append_with_condition(
                    &crate::support::stream("decided"),
                    ExpectedVersion::Any,
                    vec![conformance::tagged("Decided", &[], serde_json::json!({}))],
                    Some(condition),
                )
                .await;
            match (first, outcome) {
                (Some(at), Err(StoreError::ConditionFailed { position })) => assert_eq!(position, at, "{query:?}"),
                (None, Ok(_)) => {}
                (first, outcome) => panic!("{query:?} after {after}: first match {first:?}, got {outcome:?}"),
            }
        }
    }
    let mut connection = db.connection().await;
    sqlx::Executor::execute(&mut connection, "SET plan_cache_mode = force_generic_plan; ANALYZE")
        .await
        .expect("generic plans");
    for items in [r#"[{"g": ["common:x"]}]"#, r#"[{"g": ["rare:y"]}]"#, r#"[{"g": ["rare:y"], "t": ["Three"]}]"#] {
        for after in [0, 2000] {
            let statement = format!("SELECT cqrs_first_match({after}, '{items}')");
            // Once to compile and plan (catalog pages), then measured.
            buffers_of(&mut connection, &statement).await;
            let buffers = buffers_of(&mut connection, &statement).await;
            assert!(buffers < 20, "the first match of {items} after {after} touched {buffers} pages");
        }
    }
}

/// Events stored before the tag index existed are indexed by its migration: found by tag and
/// by a condition after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dcb_migration_indexes_the_tags_of_older_events() {
    let db = TestDb::create().await;
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(&db.url).await.expect("pool");
    let mut older = sqlx::migrate!("./migrations");
    let index = older
        .migrations
        .iter()
        .position(|migration| migration.description.contains("dcb tag index"))
        .expect("the tag index migration");
    older.migrations = older.migrations[..index].to_vec().into();
    older.run(&pool).await.expect("the migrations before the tag index");
    for (n, tags) in [(1, "{old:a,shared:s}"), (2, "{}"), (3, "{old:b,shared:s,shared:s}")] {
        sqlx::query(
            "INSERT INTO cqrs_events (position, event_id, stream_id, version, event_type, schema_version, payload, tags) \
             VALUES (nextval('cqrs_position_seq'), gen_random_uuid(), 'older', $1, 'Old', 1, '{}', $2::text[])",
        )
        .bind(n)
        .bind(tags)
        .execute(&pool)
        .await
        .expect("an event of the older schema");
    }
    sqlx::query("INSERT INTO cqrs_streams (stream_id, version) VALUES ('older', 3)")
        .execute(&pool)
        .await
        .expect("stream");
    pool.close().await;
    let store = db.store().await;
    let shared = Query::from_items([cqrs_core::QueryItem::tags([cqrs_core::Tag::new("shared", "s")])]);
    let found: Vec<Position> =
        store.read_query(&shared, Position(0), 10).await.expect("read").iter().map(|e| e.position).collect();
    assert_eq!(found, [Position(1), Position(3)]);
    let b = Query::from_items([cqrs_core::QueryItem::tags([cqrs_core::Tag::new("old", "b")])]);
    let outcome = store
        .append_with_condition(
            &crate::support::stream("after-migration"),
            ExpectedVersion::Any,
            vec![conformance::tagged("New", &[cqrs_core::Tag::new("old", "b")], serde_json::json!({}))],
            Some(AppendCondition::new(b.clone(), Some(Position(1)))),
        )
        .await;
    assert!(matches!(outcome, Err(StoreError::ConditionFailed { position: Position(3) })), "{outcome:?}");
    // New events are indexed by the appends themselves, next to the backfilled ones.
    store
        .append(
            &crate::support::stream("after-migration"),
            ExpectedVersion::Any,
            vec![conformance::tagged("New", &[cqrs_core::Tag::new("shared", "s")], serde_json::json!({}))],
        )
        .await
        .expect("append");
    assert_eq!(store.read_query(&shared, Position(0), 10).await.expect("read").len(), 3);
}
