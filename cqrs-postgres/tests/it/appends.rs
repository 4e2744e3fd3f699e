//! Batch edge cases: an event id reused inside one group-commit batch fails only the guilty
//! append, and the batch function itself refuses a reused id through the unique index.

use cqrs_core::testing::conformance::event;
use cqrs_core::{EventStore, ExpectedVersion, StoreError};
use cqrs_postgres::PgStoreConfig;
use serde_json::json;

use crate::support::{read_everything, stream, TestDb};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_function_refuses_an_event_id_used_twice() {
    let db = TestDb::create().await;
    let _store = db.store().await;
    let id = uuid::Uuid::new_v4();
    let one = |s: &str| json!({"s": s, "e": "any", "c": null, "ev": [{"id": id, "t": "T", "sv": 1, "p": {}, "h": {}}]});
    let mut connection = db.connection().await;
    let error = sqlx::query("SELECT * FROM cqrs_append_batch($1)")
        .bind(sqlx::types::Json(json!([one("a-1"), one("b-1")])))
        .fetch_all(&mut connection)
        .await
        .expect_err("a reused event id must fail the batch");
    let db_error = error.as_database_error().expect("database error");
    assert!(db_error.is_unique_violation());
    assert_eq!(db_error.constraint(), Some("cqrs_events_event_id_key"));
    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM cqrs_events").fetch_one(&mut connection).await.expect("count");
    assert_eq!(stored, 0, "the failed batch wrote nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reused_event_id_in_a_batch_fails_only_its_append() {
    let db = TestDb::create().await;
    let store = db.store_with(PgStoreConfig::default().with_max_connections(4)).await;
    for _round in 0..5 {
        let shared = event(0);
        let tasks: Vec<_> = (0..16)
            .map(|n| {
                let store = store.clone();
                let sent = if n == 3 || n == 11 { shared.clone() } else { event(n) };
                tokio::spawn(async move { store.append(&stream("reuse"), ExpectedVersion::Any, vec![sent]).await })
            })
            .collect();
        let (mut ok, mut duplicates) = (0, 0);
        for task in tasks {
            match task.await.expect("task") {
                Ok(_) => ok += 1,
                Err(StoreError::DuplicateEventId(id)) if id == shared.event_id => duplicates += 1,
                Err(other) => panic!("unexpected error {other}"),
            }
        }
        assert_eq!((ok, duplicates), (15, 1));
    }
    assert_eq!(read_everything(&store).await.len(), 5 * 15);
}

/// A payload PostgreSQL cannot store (a NUL character in a JSON string) fails only its own
/// append, as `InvalidAppend`; the appends batched with it are stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unstorable_payload_fails_only_its_append() {
    let db = TestDb::create().await;
    let store = db.store().await;
    for _round in 0..3 {
        let tasks: Vec<_> = (0..12u64)
            .map(|n| {
                let store = store.clone();
                let mut sent = event(n);
                if n == 5 {
                    sent.payload = json!({"n": n, "text": "nul \u{0} inside"});
                }
                tokio::spawn(async move { (n, store.append(&stream("nul"), ExpectedVersion::Any, vec![sent]).await) })
            })
            .collect();
        for task in tasks {
            match task.await.expect("task") {
                (5, Err(StoreError::InvalidAppend(_))) => {}
                (5, other) => panic!("the NUL payload must be refused as invalid, got {other:?}"),
                (_, result) => assert!(result.is_ok(), "a valid append must be stored: {result:?}"),
            }
        }
    }
    assert_eq!(read_everything(&store).await.len(), 3 * 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unstorable_payload_alone_is_invalid() {
    let db = TestDb::create().await;
    let store = db.store().await;
    let mut sent = event(1);
    sent.payload = json!({"text": "nul \u{0} inside"});
    let result = store.append(&stream("nul"), ExpectedVersion::Any, vec![sent]).await;
    assert!(matches!(result, Err(StoreError::InvalidAppend(_))), "got {result:?}");
    store.append(&stream("fine"), ExpectedVersion::Any, vec![event(2)]).await.expect("the store still works");
}
