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

/// The functions a migrated database holds are exactly those of `sql/` (one file per function
/// name, all its overloads), each as its file defines it: every file run into a scratch schema
/// gives definitions identical to the live ones. So the readable current definitions cannot
/// drift from the immutable migrations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_functions_are_the_ones_in_the_sql_folder() {
    let db = TestDb::create().await;
    let _store = db.store().await;
    let mut connection = db.connection().await;
    let definitions = |schema: &'static str| {
        sqlx::query_as::<_, (String, String)>(
            "SELECT p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')', \
             replace(pg_get_functiondef(p.oid), n.nspname || '.', '') \
             FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = $1 ORDER BY 1",
        )
        .bind(schema)
    };
    let live = definitions("public").fetch_all(&mut connection).await.expect("live functions");
    connection.execute("CREATE SCHEMA sql_folder; SET search_path = sql_folder, public").await.expect("scratch");
    let mut files: Vec<_> = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/sql"))
        .expect("sql folder")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "sql"))
        .collect();
    files.sort();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("read");
        sqlx::raw_sql(&text).execute(&mut connection).await.unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    }
    let defined = definitions("sql_folder").fetch_all(&mut connection).await.expect("defined functions");
    let names = |list: &[(String, String)]| list.iter().map(|(name, _)| name.clone()).collect::<Vec<_>>();
    assert_eq!(names(&defined), names(&live), "sql/ defines exactly the live functions");
    for ((name, file), (_, migrated)) in defined.iter().zip(&live) {
        assert_eq!(file, migrated, "{name}: sql/ and the migrations differ");
    }
    for (name, _) in &live {
        let file = name.split('(').next().unwrap_or_default();
        assert!(files.iter().any(|path| path.ends_with(format!("{file}.sql"))), "{name} is in sql/{file}.sql");
    }
}
