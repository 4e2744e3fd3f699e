//! Test databases: one fresh database per test, dropped when the test ends (even on panic).

use std::sync::Arc;
use std::time::Duration;

use cqrs_core::testing::WithGuard;
use cqrs_core::{EventStore, Position, RecordedEvent, StreamId};
use cqrs_postgres::{PgEventStore, PgStoreConfig};
use sqlx::{Connection, Executor, PgConnection};

/// The server URL from `DATABASE_URL`; panics (fails the test) with instructions if unset.
pub fn server_url() -> String {
    match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => panic!(
            "DATABASE_URL is not set: the cqrs-postgres tests need a PostgreSQL server. \
             Run `scripts/test`, or `source scripts/postgres.sh; pg_start` and then cargo test"
        ),
    }
}

/// `url` with its database name replaced by `database`.
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |index| index + 3);
    let server = match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{server}/{database}?{query}"),
        None => format!("{server}/{database}"),
    }
}

/// A fresh database, dropped (with its connections) when the last handle goes away.
pub struct TestDb {
    /// URL of the fresh database.
    pub url: String,
    name: String,
    server_url: String,
}

impl TestDb {
    /// Creates `cqrs_test_<uuid>` on the `DATABASE_URL` server (without the schema).
    pub async fn create() -> Arc<TestDb> {
        let server_url = server_url();
        let name = format!("cqrs_test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(&server_url)
            .await
            .unwrap_or_else(|error| panic!("cannot connect to DATABASE_URL {server_url}: {error}"));
        admin.execute(format!("CREATE DATABASE {name}").as_str()).await.expect("create test database");
        let _ = admin.close().await;
        Arc::new(TestDb { url: with_database(&server_url, &name), name, server_url })
    }

    /// A migrated store on this database.
    pub async fn store(&self) -> PgEventStore {
        self.store_with(PgStoreConfig::default().with_max_connections(6)).await
    }

    /// A migrated store on this database, with `config`.
    pub async fn store_with(&self, config: PgStoreConfig) -> PgEventStore {
        let store = PgEventStore::connect_with(&self.url, config).await.expect("connect store");
        store.migrate().await.expect("migrate");
        store
    }

    /// A plain connection to this database.
    pub async fn connection(&self) -> PgConnection {
        PgConnection::connect(&self.url).await.expect("connect to test database")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let server_url = self.server_url.clone();
        let statement = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        // Drop may run inside the test's runtime: use a thread with a runtime of its own.
        let dropper = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                return;
            };
            runtime.block_on(async move {
                for _ in 0..5 {
                    if let Ok(mut admin) = PgConnection::connect(&server_url).await {
                        if admin.execute(statement.as_str()).await.is_ok() {
                            return;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            });
        });
        let _ = dropper.join();
    }
}

/// A store that owns its test database: what the conformance suite gets. The database is
/// dropped after the store's handles.
pub type TestStore = WithGuard<PgEventStore, Arc<TestDb>>;

/// A fresh database with a migrated store on it.
pub async fn fresh_store() -> Arc<TestStore> {
    let db = TestDb::create().await;
    let store = db.store().await;
    Arc::new(WithGuard { store, guard: db })
}

/// Every event in position order, read in pages through `read_all`.
pub async fn read_everything<S: EventStore + ?Sized>(store: &S) -> Vec<RecordedEvent> {
    let mut all = Vec::new();
    let mut after = Position::START;
    loop {
        let page = store.read_all(after, 500).await.expect("read_all");
        match page.last() {
            Some(last) => after = last.position,
            None => return all,
        }
        all.extend(page);
    }
}

/// A random number below `bound` (tests only need rough randomness).
pub fn random_below(bound: u64) -> u64 {
    let bytes = uuid::Uuid::new_v4().into_bytes();
    let value = u64::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3], bytes[4], bytes[5], bytes[7], bytes[9]]);
    value % bound.max(1)
}

/// A unique stream id with a readable prefix.
pub fn stream(prefix: &str) -> StreamId {
    StreamId::new(format!("{prefix}-{}", uuid::Uuid::new_v4().simple())).expect("valid stream id")
}

#[test]
fn database_name_is_replaced() {
    assert_eq!(with_database("postgres://u@h:1/postgres", "x"), "postgres://u@h:1/x");
    assert_eq!(with_database("postgres://u@h:1/postgres?sslmode=disable", "x"), "postgres://u@h:1/x?sslmode=disable");
    assert_eq!(with_database("postgres://u@h:1", "x"), "postgres://u@h:1/x");
}
