//! Never skip, shown adversarially: a trigger stalls about half of all event inserts for up to
//! 30 ms *after* the row took its position, so commits finish out of position order all the
//! time; writers in three processes (this one and two children) append through it while
//! readers follow live and catch up from the start. Every reader must see every acknowledged
//! event once, in position order, and its gap audits must find nothing committed behind it. A
//! naive reader (no watermark) beside them must skip, or the run was not adversarial.
//!
//! The second test removes the guard (a reader bound without the watermark) and shows that
//! the same subscription then skips, and that its audit counts the skip.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cqrs_core::testing::conformance::event;
use cqrs_core::testing::never_skip::{
    acked_by_child, assert_never_skipped, spawn_child, spawn_writers, Reader, ReaderSpec,
};
use cqrs_core::{EventId, EventStore, ExpectedVersion, Position, Subscription};
use cqrs_postgres::{PgEventStore, PgStoreConfig};
use sqlx::{Connection, Executor, Row};

use crate::support::{read_everything, stream, TestDb};

/// Set in a child process: the URL of the parent's test database.
const CHILD_URL: &str = "CQRS_NEVER_SKIP_CHILD_URL";
/// Set in a child process: its streams' prefix.
const CHILD_STREAMS: &str = "CQRS_NEVER_SKIP_CHILD_STREAMS";
const TEST_NAME: &str = "never_skip::commits_out_of_position_order_are_never_skipped";
const CHILDREN: usize = 2;
const TASKS_PER_PROCESS: u64 = 3;
const APPENDS_PER_TASK: u64 = 40;

/// About half of all inserts stall 5–30 ms after taking their position, before commit.
const SLOW_COMMITS: &str = "
CREATE FUNCTION test_stall_after_position() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF random() < 0.5 THEN PERFORM pg_sleep(0.005 + random() * 0.025); END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER test_stall_after_position AFTER INSERT ON cqrs_events
    FOR EACH ROW EXECUTE FUNCTION test_stall_after_position();";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_out_of_position_order_are_never_skipped() {
    if let Ok(url) = std::env::var(CHILD_URL) {
        return child_writer(&url).await;
    }
    let db = TestDb::create().await;
    let store = Arc::new(db.store_with(PgStoreConfig::default().with_max_connections(8).with_writer_tasks(2)).await);
    // A second instance that keeps no recent run, so all its reads go through the watermark.
    let plain = Arc::new(db.store_with(PgStoreConfig::default().with_max_connections(4).with_recent_events(0)).await);
    db.connection().await.execute(SLOW_COMMITS).await.expect("install the stalling trigger");

    let mut readers = vec![
        Reader::spawn(Arc::clone(&store), ReaderSpec::new("live", 64)),
        Reader::spawn(Arc::clone(&plain), ReaderSpec::new("live, other instance", 5)),
    ];
    let naive_skips = Arc::new(AtomicI64::new(0));
    let naive = tokio::spawn(naive_reader(db.connection().await, Arc::clone(&naive_skips)));
    let children: Vec<_> = (0..CHILDREN)
        .map(|child| {
            spawn_child(TEST_NAME, &[(CHILD_URL, db.url.as_ref()), (CHILD_STREAMS, format!("child{child}-").as_ref())])
        })
        .collect();
    let (acked, writers) = spawn_writers(&store, "parent", TASKS_PER_PROCESS, APPENDS_PER_TASK, false);
    // Readers that start behind, and catch up while the writers go on.
    tokio::time::sleep(Duration::from_millis(700)).await;
    readers.push(Reader::spawn(Arc::clone(&store), ReaderSpec::new("catching up", 7)));
    readers.push(Reader::spawn(Arc::clone(&plain), ReaderSpec::new("lagging", 3).lagging(Duration::from_millis(2))));

    for writer in writers {
        writer.await.expect("writer");
    }
    for child in children {
        let ids = acked_by_child(child).await;
        acked.lock().expect("lock").extend(ids);
    }
    let acked = acked.lock().expect("lock").clone();
    naive.abort();
    let naive_skips = naive_skips.load(Ordering::Acquire);

    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let mut results = Vec::new();
    for reader in readers {
        results.push(reader.finish(acked.len(), deadline).await);
    }
    assert_never_skipped(&results, &acked, &read_everything(&*store).await);
    eprintln!("{} events from 3 processes; the naive reader skipped {naive_skips}", acked.len());
    assert!(naive_skips > 0, "no reader without the watermark skipped: the commits were not out of order");
}

/// A child process: writes through its own store instance and prints what was acknowledged.
async fn child_writer(url: &str) {
    let prefix = std::env::var(CHILD_STREAMS).expect("child streams");
    let store = Arc::new(
        PgEventStore::connect_with(url, PgStoreConfig::default().with_max_connections(6).with_writer_tasks(2))
            .await
            .expect("child store"),
    );
    let (_, tasks) = spawn_writers(&store, &prefix, TASKS_PER_PROCESS, APPENDS_PER_TASK, true);
    for task in tasks {
        task.await.expect("child task");
    }
}

/// What a reader without the watermark does: every millisecond, reads what is committed above
/// its cursor and moves the cursor to the last. Counts in `skips` the events that later turned
/// up at or below its cursor: the ones it skipped. Runs until aborted.
async fn naive_reader(mut connection: sqlx::PgConnection, skips: Arc<AtomicI64>) {
    let (mut cursor, mut seen) = (0_i64, 0_i64);
    loop {
        let rows = sqlx::query("SELECT position FROM cqrs_events WHERE position > $1 ORDER BY position")
            .bind(cursor)
            .fetch_all(&mut connection)
            .await
            .expect("naive read");
        if let Some(last) = rows.last() {
            cursor = last.get::<i64, _>(0);
            seen += i64::try_from(rows.len()).expect("few rows");
        }
        let behind: i64 = sqlx::query_scalar("SELECT count(*) FROM cqrs_events WHERE position <= $1")
            .bind(cursor)
            .fetch_one(&mut connection)
            .await
            .expect("naive count");
        skips.store(behind - seen, Ordering::Release);
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// The guard removed: a reader bound that ignores in-flight writers. A transaction takes a
/// position and stays open while a later one commits; the subscription passes the open
/// position, then the first transaction commits. The audit must count that skip; with the
/// guard in place the same steps skip nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_watermark_a_late_commit_is_skipped_and_counted() {
    for guarded in [true, false] {
        let db = TestDb::create().await;
        let store =
            Arc::new(db.store_with(PgStoreConfig::default().with_max_connections(4).with_recent_events(0)).await);
        if !guarded {
            db.connection()
                .await
                .execute(
                    "CREATE OR REPLACE FUNCTION cqrs_read_bound() RETURNS bigint LANGUAGE sql AS \
                     $$ SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM cqrs_position_seq $$",
                )
                .await
                .expect("remove the guard");
        }
        let (early, late) = (stream("early"), stream("late"));
        let mut open = db.connection().await;
        let mut transaction = open.begin().await.expect("begin");
        let raw = serde_json::json!([{"s": early.as_str(), "e": "any", "c": null, "ev": [
            {"id": EventId::new().0, "t": "RawHappened", "sv": 1, "p": {}, "ca": null, "co": null, "h": {}}]}]);
        let outcome: String = sqlx::query_scalar("SELECT outcome FROM cqrs_append_batch($1)")
            .bind(sqlx::types::Json(raw))
            .fetch_one(&mut *transaction)
            .await
            .expect("open append");
        assert_eq!(outcome, "appended");
        store.append(&late, ExpectedVersion::Any, vec![event(2)]).await.expect("later append");

        let mut feed = Subscription::all(Arc::clone(&store), Position::START).with_gap_audit_delay(Duration::ZERO);
        let first = tokio::time::timeout(Duration::from_millis(500), feed.next()).await;
        transaction.commit().await.expect("commit the early one");
        if guarded {
            assert!(first.is_err(), "with the watermark, nothing is delivered while the earlier position is open");
            let events: Vec<_> = [feed.next().await, feed.next().await]
                .into_iter()
                .map(|next| next.expect("next").expect("event"))
                .collect();
            assert_eq!(events[0].stream_id, early, "the early commit first");
            assert_eq!(events[1].stream_id, late);
            assert_eq!(feed.audit_gaps_now().await.expect("audit"), 0);
        } else {
            let delivered = first.expect("without the watermark the later event comes at once").expect("next");
            assert_eq!(delivered.expect("event").stream_id, late, "the later event, past the open position");
            assert_eq!(feed.audit_gaps_now().await.expect("audit"), 1, "the audit counts the skipped event");
            let after = tokio::time::timeout(Duration::from_millis(300), feed.next()).await;
            assert!(after.is_err(), "the skipped event is never delivered out of order: {after:?}");
        }
    }
}
