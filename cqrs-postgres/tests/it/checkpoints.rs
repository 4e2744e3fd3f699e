//! Checkpoints in the caller's transaction: a projection that commits its read model and its
//! checkpoint together processes every event exactly once, even when it crashes mid-way.

use std::sync::Arc;

use cqrs_core::testing::conformance::event;
use cqrs_core::{EventStore, ExpectedVersion, Position, Subscription};
use cqrs_postgres::PgEventStore;
use sqlx::{Connection, Executor};

use crate::support::{stream, TestDb};

const CHECKPOINT: &str = "totals-projection";

/// Runs the projection until it has handled `limit` events (or none are left), committing
/// the read model and the checkpoint per event; `crash_after` leaves one transaction
/// uncommitted, as a process that dies mid-event would.
async fn run_projection(db: &TestDb, store: &PgEventStore, limit: usize, crash_after: Option<usize>) -> usize {
    let mut connection = db.connection().await;
    let start = PgEventStore::load_checkpoint_in(&mut connection, CHECKPOINT).await.expect("load").unwrap_or_default();
    let mut feed = Subscription::all(Arc::new(store.clone()), start);
    let mut handled = 0;
    while handled < limit {
        let Some(event) = feed.try_next().await.expect("read") else { break };
        let n = event.payload["n"].as_i64().expect("marker");
        let mut transaction = connection.begin().await.expect("begin");
        sqlx::query("INSERT INTO totals (id, total, events) VALUES (1, $1, 1) ON CONFLICT (id) DO UPDATE SET total = totals.total + $1, events = totals.events + 1")
            .bind(n)
            .execute(&mut *transaction)
            .await
            .expect("update read model");
        PgEventStore::save_checkpoint_in(&mut transaction, CHECKPOINT, event.position).await.expect("checkpoint");
        if crash_after == Some(handled) {
            // Dropped without commit: the read model change and the checkpoint vanish together.
            drop(transaction);
            return handled;
        }
        transaction.commit().await.expect("commit");
        handled += 1;
    }
    handled
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projection_with_checkpoint_in_same_transaction_is_exactly_once() {
    let db = TestDb::create().await;
    let store = db.store().await;
    db.connection()
        .await
        .execute("CREATE TABLE totals (id int PRIMARY KEY, total bigint NOT NULL, events bigint NOT NULL)")
        .await
        .expect("read model table");
    let s = stream("projected");
    for n in 1..=30 {
        store.append(&s, ExpectedVersion::Any, vec![event(n)]).await.expect("append");
    }
    assert_eq!(run_projection(&db, &store, 10, None).await, 10);
    // Crashes while handling the 6th event of its second run.
    assert_eq!(run_projection(&db, &store, 10, Some(5)).await, 5);
    // A new store instance (a restarted process) resumes from the committed checkpoint.
    let restarted = db.store().await;
    assert_eq!(run_projection(&db, &restarted, usize::MAX, None).await, 15);
    let (total, events): (i64, i64) = sqlx::query_as("SELECT total, events FROM totals WHERE id = 1")
        .fetch_one(restarted.pool())
        .await
        .expect("read model");
    assert_eq!((total, events), ((1..=30).sum::<i64>(), 30), "every event applied exactly once");
    let last = store.read_all(Position::START, usize::MAX).await.expect("read").last().map(|e| e.position);
    assert_eq!(restarted.load_checkpoint(CHECKPOINT).await.expect("load"), last);
}
