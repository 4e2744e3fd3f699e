//! The LISTEN connection dies (its backend is terminated) again and again while writers
//! append: the subscriber still sees every event exactly once, in order, and keeps receiving
//! notifications after each reconnect. The poll interval is an hour, so only notifications
//! and reconnect wake-ups can drive the subscriber.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cqrs_core::testing::conformance::event;
use cqrs_core::{EventId, EventStore, ExpectedVersion, Position, RecordedEvent, Subscription};
use cqrs_postgres::{PgEventStore, PgStoreConfig};
use sqlx::PgConnection;

use crate::support::{random_below, stream, TestDb};

const EVENTS: usize = 300;

async fn kill_listener(connection: &mut PgConnection, application_name: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
    )
    .bind(application_name)
    .fetch_one(connection)
    .await
    .expect("terminate listener")
}

async fn listener_connected(connection: &mut PgConnection, application_name: &str) -> bool {
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1")
        .bind(application_name)
        .fetch_one(connection)
        .await
        .expect("pg_stat_activity");
    count > 0
}

async fn wait_for_listener(connection: &mut PgConnection, application_name: &str) {
    for _ in 0..500 {
        if listener_connected(connection, application_name).await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the listener did not (re)connect");
}

async fn wait_for_count(seen: &Mutex<Vec<RecordedEvent>>, count: usize, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while seen.lock().expect("lock").len() < count {
        assert!(tokio::time::Instant::now() < deadline, "subscriber stalled waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A second store on `db` whose subscribers never poll (an hour), so only notifications and
/// reconnect wake-ups drive them; with its listener's `application_name` and an admin
/// connection, once the listener is connected.
async fn never_polling_reader(db: &TestDb) -> (PgEventStore, String, PgConnection) {
    let application_name = format!("listener-{}", uuid::Uuid::new_v4().simple());
    let reader = db
        .store_with(
            PgStoreConfig::default()
                .with_max_connections(4)
                .with_listener_application_name(&application_name)
                .with_poll_interval(Duration::from_secs(3600)),
        )
        .await;
    let mut admin = db.connection().await;
    wait_for_listener(&mut admin, &application_name).await;
    (reader, application_name, admin)
}

/// A subscriber of the whole log from the start, recording every event it is handed.
fn subscribe(store: &PgEventStore) -> (Arc<Mutex<Vec<RecordedEvent>>>, tokio::task::JoinHandle<()>) {
    let seen: Arc<Mutex<Vec<RecordedEvent>>> = Arc::default();
    let mut feed = Subscription::all(Arc::new(store.clone()), Position::START);
    let recorded = Arc::clone(&seen);
    let task = tokio::spawn(async move {
        while let Some(event) = feed.next().await.expect("subscription") {
            recorded.lock().expect("lock").push(event);
        }
    });
    (seen, task)
}

async fn append_one(store: &PgEventStore, ids: &Mutex<Vec<EventId>>) {
    let sent = event(0);
    let id = sent.event_id;
    store.append(&stream("live"), ExpectedVersion::Any, vec![sent]).await.expect("append");
    ids.lock().expect("lock").push(id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_survives_listener_kills() {
    let db = TestDb::create().await;
    let writer = db.store().await;
    let (reader, application_name, mut admin) = never_polling_reader(&db).await;

    let (seen, subscriber) = subscribe(&reader);
    let written: Arc<Mutex<Vec<EventId>>> = Arc::default();
    let appender = {
        let writer = writer.clone();
        let written = Arc::clone(&written);
        tokio::spawn(async move {
            for _ in 0..EVENTS {
                append_one(&writer, &written).await;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let mut kills = 0;
    while !appender.is_finished() {
        kills += kill_listener(&mut admin, &application_name).await;
        tokio::time::sleep(Duration::from_millis(30 + random_below(100))).await;
    }
    appender.await.expect("appender");
    assert!(kills > 0, "the test must have killed the listener");
    wait_for_count(&seen, EVENTS, "the events appended during the kills").await;

    // An append right after a kill, before the listener is back: only the reconnect wake-up
    // can deliver it (no later append, no polling).
    assert_eq!(kill_listener(&mut admin, &application_name).await, 1);
    append_one(&writer, &written).await;
    wait_for_count(&seen, EVENTS + 1, "an event committed while the listener was down").await;

    // Live again after the reconnect.
    wait_for_listener(&mut admin, &application_name).await;
    append_one(&writer, &written).await;
    wait_for_count(&seen, EVENTS + 2, "an event after the reconnect").await;

    tokio::time::sleep(Duration::from_millis(200)).await;
    subscriber.abort();
    let seen: Vec<EventId> = seen.lock().expect("lock").iter().map(|e| e.event_id).collect();
    let written = written.lock().expect("lock").clone();
    assert_eq!(seen, written, "every event exactly once, in order");
}

/// A writer that notifies at most every 200 ms commits a burst inside one interval: the
/// commits after the first go without a NOTIFY, and another process whose subscriber never
/// polls (an hour) must still receive every event, from the NOTIFY the writer owes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_process_hears_of_commits_made_inside_the_notify_interval() {
    let db = TestDb::create().await;
    let writer = db.store_with(PgStoreConfig::default().with_notify_interval(Duration::from_millis(200))).await;
    let (reader, _, _admin) = never_polling_reader(&db).await;
    let (seen, subscriber) = subscribe(&reader);
    let written: Arc<Mutex<Vec<EventId>>> = Arc::default();
    for burst in 1..=3 {
        for _ in 0..20 {
            append_one(&writer, &written).await;
        }
        wait_for_count(&seen, burst * 20, "events committed without a NOTIFY of their own").await;
    }
    subscriber.abort();
    let seen: Vec<EventId> = seen.lock().expect("lock").iter().map(|e| e.event_id).collect();
    let written = written.lock().expect("lock").clone();
    assert_eq!(seen, written, "every event exactly once, in order");
}
