//! Schema and migrations: concurrent migration from two processes, re-running migrations,
//! and the immutability guards on stored events.

use cqrs_core::testing::conformance::event;
use cqrs_core::{EventStore, ExpectedVersion};
use cqrs_postgres::migrate_pool;
use sqlx::postgres::PgPoolOptions;
use sqlx::Executor;

use crate::support::{stream, TestDb};

/// Two processes migrating one empty database at the same moment both succeed, the schema is
/// applied once, and a later migrate is a no-op.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrations_are_safe() {
    let db = TestDb::create().await;
    let first = PgPoolOptions::new().max_connections(2).connect(&db.url).await.expect("pool 1");
    let second = PgPoolOptions::new().max_connections(2).connect(&db.url).await.expect("pool 2");
    let (a, b) = tokio::join!(migrate_pool(&first), migrate_pool(&second));
    a.expect("first migrate");
    b.expect("second migrate");
    migrate_pool(&first).await.expect("migrate again");
    let applied: i64 =
        sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations").fetch_one(&first).await.expect("count");
    let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations")).expect("migrations").count();
    assert_eq!(applied, i64::try_from(files).expect("few files"), "each migration applied once");
    first.close().await;
    second.close().await;
    let store = db.store().await;
    store.append(&stream("after-migrate"), ExpectedVersion::Any, vec![event(1)]).await.expect("append");
}

/// UPDATE, DELETE and TRUNCATE of stored events are refused by triggers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_events_are_immutable() {
    let db = TestDb::create().await;
    let store = db.store().await;
    store.append(&stream("immutable"), ExpectedVersion::Any, vec![event(1)]).await.expect("append");
    let mut connection = db.connection().await;
    for statement in
        ["UPDATE cqrs_events SET event_type = 'Changed'", "DELETE FROM cqrs_events", "TRUNCATE cqrs_events"]
    {
        let error = connection.execute(statement).await.expect_err(statement);
        let code = error.as_database_error().and_then(|db| db.code()).map(|code| code.into_owned());
        assert_eq!(code.as_deref(), Some("23001"), "{statement} must be refused by the trigger: {error}");
    }
    assert_eq!(crate::support::read_everything(&store).await.len(), 1);
}
