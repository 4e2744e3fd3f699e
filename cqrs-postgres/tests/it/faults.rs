//! Faults: every backend of the store is terminated again and again during appends. Callers
//! get successes or `StoreError::Unavailable`, never a panic or another error; every
//! acknowledged append is stored afterwards; the store works again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use cqrs_core::testing::conformance::event;
use cqrs_core::{AppendOutcome, EventId, EventStore, ExpectedVersion, Position, StoreError, Subscription};
use cqrs_postgres::{PgEventStore, PgStoreConfig};

use crate::support::{read_everything, stream, TestDb};

const WRITERS: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_backends_give_typed_errors_and_lose_no_acknowledged_append() {
    let db = TestDb::create().await;
    let store = db.store_with(PgStoreConfig::default().with_acquire_timeout(Duration::from_secs(2))).await;
    let stop = tokio::time::Instant::now() + Duration::from_secs(3);

    let writers: Vec<_> = (0..WRITERS).map(|_| tokio::spawn(append_until(store.clone(), stop))).collect();
    let kills = kill_backends_until(&db, stop).await;
    let mut acknowledged = HashMap::new();
    let mut unavailable = 0;
    for writer in writers {
        let (acks, errors) = writer.await.expect("writer must not panic");
        acknowledged.extend(acks);
        unavailable += errors;
    }
    assert!(kills > 0, "the test must have killed backends");
    assert!(!acknowledged.is_empty(), "some appends must have succeeded");
    tracing_free_note(kills, acknowledged.len(), unavailable);

    // The store recovers: retry until the pool has replaced its dead connections.
    let mut recovered = false;
    for _ in 0..50 {
        match store.append(&stream("after"), ExpectedVersion::Any, vec![event(1)]).await {
            Ok(_) => {
                recovered = true;
                break;
            }
            Err(StoreError::Unavailable(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(other) => panic!("unexpected error after the faults: {other}"),
        }
    }
    assert!(recovered, "the store must work again once the database is reachable");

    // Reads too: a pooled read connection whose backend was killed answers `Unavailable` once
    // (transient, by contract) and is replaced; retry as a caller would.
    let mut unavailable_reads = 0;
    let stored = read_all_retrying(&store, &mut unavailable_reads).await;
    for (id, position) in &acknowledged {
        assert_eq!(stored.get(id), Some(position), "acknowledged append {id} must be stored at its position");
    }
    // Subscriptions work again too.
    let mut feed = Subscription::all(Arc::new(store.clone()), Position::START);
    let mut delivered = 0;
    while delivered < stored.len() {
        match tokio::time::timeout(Duration::from_secs(30), feed.next()).await.expect("stalled") {
            Ok(event) => {
                event.expect("open");
                delivered += 1;
            }
            // A dead pooled connection, once more: the subscription reads again from where it was.
            Err(StoreError::Unavailable(_)) if unavailable_reads < 50 => unavailable_reads += 1,
            Err(other) => panic!("subscribing after the faults: {other}"),
        }
    }
}

/// One writer: appends to its own stream until `stop`; returns the acknowledged appends (event
/// id → position) and how many were unavailable. Any other answer panics.
async fn append_until(store: PgEventStore, stop: tokio::time::Instant) -> (HashMap<EventId, Position>, usize) {
    let s = stream("faulty");
    let (mut acknowledged, mut unavailable) = (HashMap::new(), 0);
    while tokio::time::Instant::now() < stop {
        let sent = event(0);
        let id = sent.event_id;
        match store.append(&s, ExpectedVersion::Any, vec![sent]).await {
            Ok(AppendOutcome::Appended(result)) => {
                acknowledged.insert(id, result.first_position);
            }
            Err(StoreError::Unavailable(_)) => unavailable += 1,
            other => panic!("an append may succeed or be unavailable, got {other:?}"),
        }
    }
    (acknowledged, unavailable)
}

/// Terminates every other backend of the test database every 150 ms until `stop`; returns how
/// many it terminated.
async fn kill_backends_until(db: &TestDb, stop: tokio::time::Instant) -> i64 {
    let mut killer = db.connection().await;
    let mut kills = 0;
    while tokio::time::Instant::now() < stop {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let killed: i64 = sqlx::query_scalar(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .fetch_one(&mut killer)
        .await
        .expect("terminate backends");
        kills += killed;
    }
    kills
}

/// Every stored event's position by id, read page by page; an `Unavailable` page is read again
/// (at most 50 times in all, counted in `unavailable_reads`).
async fn read_all_retrying(store: &PgEventStore, unavailable_reads: &mut usize) -> HashMap<EventId, Position> {
    let mut stored = HashMap::new();
    let mut after = Position::START;
    loop {
        let page = match store.read_all(after, 500).await {
            Ok(page) => page,
            Err(StoreError::Unavailable(_)) if *unavailable_reads < 50 => {
                *unavailable_reads += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(other) => panic!("reading after the faults: {other}"),
        };
        let Some(last) = page.last() else { break };
        after = last.position;
        stored.extend(page.into_iter().map(|e| (e.event_id, e.position)));
    }
    stored
}

fn tracing_free_note(kills: i64, acknowledged: usize, unavailable: usize) {
    println!("faults: {kills} backends killed, {acknowledged} appends acknowledged, {unavailable} unavailable");
}

/// The writer's kept connection dies while idle (a server restart, an idle timeout in a
/// proxy): the next batch finds it dead, and its outcome is unknown. Appends that carry a
/// command id are written once more on a fresh connection, so their callers get a definite
/// answer instead of `Unavailable`, and nothing is stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_after_the_writer_connection_died_get_definite_answers() {
    use cqrs_core::testing::conformance::event_with;
    use cqrs_core::{CommandId, Metadata};

    let db = TestDb::create().await;
    let store = db.store_with(PgStoreConfig::default().with_application_name("cqrs-replay-test")).await;
    let s = stream("replay");
    store.append(&s, ExpectedVersion::Any, vec![event(0)]).await.expect("the writer holds a connection now");
    let mut killer = db.connection().await;
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name = 'cqrs-replay-test'",
    )
    .fetch_one(&mut killer)
    .await
    .expect("terminate the store's backends");
    assert!(killed >= 1, "the writer's connection was killed");
    tokio::time::sleep(Duration::from_millis(100)).await;

    let command_id = CommandId::new();
    let sent = event_with(1, Metadata { command_id: Some(command_id), ..Metadata::default() });
    let event_id = sent.event_id;
    match store.append(&s, ExpectedVersion::Any, vec![sent]).await {
        Ok(AppendOutcome::Appended(result)) => assert_eq!(result.first_version.0, 2),
        other => panic!("an append with a command id must get a definite answer, got {other:?}"),
    }
    let stored = read_everything(&store).await;
    assert_eq!(stored.iter().filter(|e| e.event_id == event_id).count(), 1, "stored once");
}
