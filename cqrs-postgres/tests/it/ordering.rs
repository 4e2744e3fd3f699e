//! The global position never skips: many concurrent writers, through two store instances and
//! through raw transactions that stay open for a random while (or roll back), and a live
//! subscriber that must see every committed event exactly once, in position order.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cqrs_core::testing::conformance::event;
use cqrs_core::{EventId, EventStore, ExpectedVersion, Position, RecordedEvent, StreamId, Subscription, Version};
use cqrs_postgres::{PgEventStore, PgStoreConfig};
use serde_json::json;
use sqlx::Connection;

use crate::support::{random_below, read_everything, stream, TestDb};

const STORE_WRITERS: u64 = 4;
const STORE_APPENDS: u64 = 40;
const RAW_WRITERS: u64 = 4;
const RAW_APPENDS: u64 = 15;

/// One append through `cqrs_append_batch` or `cqrs_append_arrays` in an explicit transaction that sleeps before it
/// commits (or rolls back): the slow writer that a naive sequence reader would skip past.
/// Returns the event ids if committed.
async fn slow_raw_append(connection: &mut sqlx::PgConnection, stream_id: &StreamId) -> Option<Vec<EventId>> {
    let ids: Vec<EventId> = (0..1 + random_below(2)).map(|_| EventId::new()).collect();
    let events: Vec<_> = ids
        .iter()
        .map(|id| json!({"id": id.0, "t": "RawHappened", "sv": 1, "p": {"n": 0}, "ca": null, "co": null, "h": {}}))
        .collect();
    let batch = json!([{"s": stream_id.as_str(), "e": "any", "c": null, "ev": events}]);
    let mut transaction = connection.begin().await.expect("begin");
    // Either batch function: the store's writers use both, and they must order alike.
    let outcome: String = if random_below(2) == 0 {
        sqlx::query_scalar("SELECT outcome FROM cqrs_append_batch($1)")
            .bind(sqlx::types::Json(batch))
            .fetch_one(&mut *transaction)
            .await
            .expect("raw append")
    } else {
        let n = ids.len();
        sqlx::query_scalar(
            "SELECT outcome FROM cqrs_append_arrays(ARRAY[$1], '{any}', '{NULL}', '{NULL}', '{f}', ARRAY[$2::integer], \
             array_fill(1, ARRAY[$2::integer]), array_fill($1, ARRAY[$2::integer]), \
             array_fill(NULL::uuid, ARRAY[$2::integer]), $3, array_fill('RawHappened'::text, ARRAY[$2::integer]), \
             array_fill(1, ARRAY[$2::integer]), array_fill('{\"n\": 0}'::jsonb, ARRAY[$2::integer]), \
             array_fill(NULL::uuid, ARRAY[$2::integer]), array_fill(NULL::uuid, ARRAY[$2::integer]), \
             array_fill('{}'::jsonb, ARRAY[$2::integer]))",
        )
        .bind(stream_id.as_str())
        .bind(i32::try_from(n).expect("few events"))
        .bind(ids.iter().map(|id| id.0).collect::<Vec<_>>())
        .fetch_one(&mut *transaction)
        .await
        .expect("raw append")
    };
    assert_eq!(outcome, "appended");
    tokio::time::sleep(Duration::from_millis(random_below(40))).await;
    if random_below(6) == 0 {
        transaction.rollback().await.expect("rollback");
        None
    } else {
        transaction.commit().await.expect("commit");
        Some(ids)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_never_skips_events_of_slow_writers() {
    let db = TestDb::create().await;
    let first = db.store().await;
    let second = db.store_with(PgStoreConfig::default().with_max_connections(6).with_writer_tasks(2)).await;
    let streams: Vec<StreamId> = (0..3).map(|i| stream(&format!("shared{i}"))).collect();
    let committed = Arc::new(Mutex::new(HashSet::new()));

    let (seen, subscriber) = collect_feed(&first, None, "subscription");
    // A second subscriber on the same store instance that lags: its pages lie below the read
    // bound the first one has already seen, so the store reads them with a plain SELECT.
    let (lagging, lagging_subscriber) = collect_feed(&first, Some(Duration::from_millis(2)), "lagging subscription");

    let mut writers = Vec::new();
    for writer in 0..STORE_WRITERS * 2 {
        let store = if writer % 2 == 0 { first.clone() } else { second.clone() };
        writers.push(tokio::spawn(store_writer(writer, store, streams.clone(), Arc::clone(&committed))));
    }
    for _ in 0..RAW_WRITERS {
        let connection = db.connection().await;
        writers.push(tokio::spawn(raw_writer(connection, streams.clone(), Arc::clone(&committed))));
    }
    for writer in writers {
        writer.await.expect("writer");
    }
    let committed = committed.lock().expect("lock").clone();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    wait_for_count(&seen, committed.len(), deadline, "subscriber stalled: it missed an event").await;
    wait_for_count(&lagging, committed.len(), deadline, "the lagging subscriber stalled: it missed an event").await;
    // Anything extra (a duplicate) would arrive quickly.
    tokio::time::sleep(Duration::from_millis(300)).await;
    subscriber.abort();
    lagging_subscriber.abort();
    let seen = seen.lock().expect("lock").clone();
    let lagging: Vec<EventId> = lagging.lock().expect("lock").iter().map(|e| e.event_id).collect();

    let seen_ids: Vec<EventId> = seen.iter().map(|e| e.event_id).collect();
    assert_eq!(seen_ids.len(), committed.len(), "every committed event exactly once");
    assert_eq!(seen_ids.iter().copied().collect::<HashSet<_>>(), committed, "exactly the committed events");
    assert!(seen.windows(2).all(|w| w[0].position < w[1].position), "strictly increasing positions");
    let stored: Vec<EventId> = read_everything(&first).await.iter().map(|e| e.event_id).collect();
    assert_eq!(seen_ids, stored, "the live feed is the stored order");
    assert_eq!(lagging, stored, "the lagging feed is the stored order, every event once");
    for s in &streams {
        let events = first.read_stream(s, Version(1), usize::MAX).await.expect("read_stream");
        assert!(events.iter().enumerate().all(|(i, e)| e.version == Version(i as u64 + 1)), "{s} contiguous");
        assert!(events.windows(2).all(|w| w[0].position < w[1].position), "{s} in position order");
    }
}

/// A subscriber from the start that collects every event (pausing `pause` after each, to lag);
/// panics with `what` if the feed fails.
fn collect_feed(
    store: &PgEventStore,
    pause: Option<Duration>,
    what: &'static str,
) -> (Arc<Mutex<Vec<RecordedEvent>>>, tokio::task::JoinHandle<()>) {
    let seen: Arc<Mutex<Vec<RecordedEvent>>> = Arc::default();
    let collected = Arc::clone(&seen);
    let mut feed = Subscription::all(Arc::new(store.clone()), Position::START).with_page_size(7);
    let task = tokio::spawn(async move {
        while let Some(event) = feed.next().await.expect(what) {
            collected.lock().expect("lock").push(event);
            if let Some(pause) = pause {
                tokio::time::sleep(pause).await;
            }
        }
    });
    (seen, task)
}

/// Store writer `writer`: `STORE_APPENDS` appends to random shared streams, each recorded in
/// `committed` once acknowledged, with short random pauses.
async fn store_writer(
    writer: u64,
    store: PgEventStore,
    streams: Vec<StreamId>,
    committed: Arc<Mutex<HashSet<EventId>>>,
) {
    for i in 0..STORE_APPENDS {
        let sent = event(writer * 1000 + i);
        let id = sent.event_id;
        let s = &streams[usize::try_from(random_below(3)).expect("small")];
        store.append(s, ExpectedVersion::Any, vec![sent]).await.expect("store append");
        committed.lock().expect("lock").insert(id);
        if i % 5 == 0 {
            tokio::time::sleep(Duration::from_millis(random_below(5))).await;
        }
    }
}

/// A raw writer: `RAW_APPENDS` slow transactions (see [`slow_raw_append`]), the committed ones
/// recorded in `committed`.
async fn raw_writer(
    mut connection: sqlx::PgConnection,
    streams: Vec<StreamId>,
    committed: Arc<Mutex<HashSet<EventId>>>,
) {
    for _ in 0..RAW_APPENDS {
        let s = &streams[usize::try_from(random_below(3)).expect("small")];
        if let Some(ids) = slow_raw_append(&mut connection, s).await {
            committed.lock().expect("lock").extend(ids);
        }
    }
}

/// Waits until `events` holds `count` events; panics with `stalled` after `deadline`.
async fn wait_for_count(
    events: &Mutex<Vec<RecordedEvent>>,
    count: usize,
    deadline: tokio::time::Instant,
    stalled: &str,
) {
    while events.lock().expect("lock").len() < count {
        assert!(tokio::time::Instant::now() < deadline, "{stalled}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The watermark, step by step: while a transaction that took position `p` is open, readers
/// stop below `p` even though later positions are committed; after it commits, both appear in
/// position order; after a rollback, the hole is passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_stop_below_an_open_writer() {
    let db = TestDb::create().await;
    let store = db.store().await;
    let s = stream("watermark");
    store.append(&s, ExpectedVersion::Any, vec![event(1)]).await.expect("first");

    let mut connection = db.connection().await;
    for commit in [true, false] {
        let before = read_everything(&store).await.len();
        let slow_stream = stream("slow");
        let mut slow = connection.begin().await.expect("begin");
        let batch = json!([{"s": slow_stream.as_str(), "e": "any", "c": null,
            "ev": [{"id": EventId::new().0, "t": "Slow", "sv": 1, "p": {}, "h": {}}]}]);
        let slow_position: i64 = sqlx::query_scalar("SELECT first_position FROM cqrs_append_batch($1)")
            .bind(sqlx::types::Json(batch))
            .fetch_one(&mut *slow)
            .await
            .expect("slow append");
        let later = store.append(&s, ExpectedVersion::Any, vec![event(2)]).await.expect("later").result();
        assert!(i64::try_from(later.first_position.0).expect("small") > slow_position);
        let visible = read_everything(&store).await;
        assert_eq!(visible.len(), before, "nothing at or above an open writer's position may be read");
        if commit {
            slow.commit().await.expect("commit");
        } else {
            slow.rollback().await.expect("rollback");
        }
        let visible = read_everything(&store).await;
        let expected = before + if commit { 2 } else { 1 };
        assert_eq!(visible.len(), expected, "both (or, after a rollback, the later) event are read now");
        assert_eq!(visible.last().map(|e| e.position), Some(later.first_position));
    }
}
