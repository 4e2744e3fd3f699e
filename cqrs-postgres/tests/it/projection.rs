//! Transactional projections when a commit's outcome is unknown: the socket is cut while the
//! server is still committing. The retry must not apply the batch a second time, whether the
//! first commit lands before or after the retry begins.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cqrs_core::testing::counter::{Counter, CounterCommand, CounterEvent};
use cqrs_core::{Dispatcher, Envelope, HandlerError, Position, Progress, RunnerConfig};
use cqrs_postgres::{spawn_projection, PgEventStore, PgProjection, PgStoreConfig};
use sqlx::{Executor, PgConnection};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::support::TestDb;

/// A TCP proxy in front of the server whose open connections can be cut at once (the client
/// side sees its socket fail; the server side is closed too, but a backend blocked in a lock
/// wait notices only once it next talks to the client, after its commit). New connections
/// are proxied as before.
struct CuttableProxy {
    port: u16,
    connections: Arc<Mutex<JoinSet<()>>>,
}

impl CuttableProxy {
    async fn start(server: std::net::SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let connections = Arc::new(Mutex::new(JoinSet::new()));
        let open = Arc::clone(&connections);
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                open.lock().expect("lock").spawn(async move {
                    let Ok(mut upstream) = TcpStream::connect(server).await else { return };
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                    let _ = client.shutdown().await;
                });
            }
        });
        Self { port, connections }
    }

    /// Drops every proxied connection now.
    fn cut(&self) {
        self.connections.lock().expect("lock").abort_all();
    }
}

/// Adds each batch's event count to `totals.n`: applying a batch twice shows.
struct Totals;

impl PgProjection for Totals {
    type Event = CounterEvent;
    fn name(&self) -> &str {
        "totals"
    }
    async fn apply(
        &self,
        transaction: &mut PgConnection,
        events: &[Envelope<CounterEvent>],
    ) -> Result<(), HandlerError> {
        let count = i64::try_from(events.len()).map_err(HandlerError::new)?;
        sqlx::query("UPDATE totals SET n = n + $1")
            .bind(count)
            .execute(&mut *transaction)
            .await
            .map_err(HandlerError::new)?;
        // At COMMIT a deferred trigger waits for the test's advisory lock: a slow commit.
        sqlx::query("INSERT INTO commit_gate VALUES (1)")
            .execute(&mut *transaction)
            .await
            .map_err(HandlerError::new)?;
        Ok(())
    }
}

async fn waiting_backends(admin: &mut PgConnection, wait_event: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
         AND wait_event_type = 'Lock' AND ($1 = '' OR wait_event = $1)",
    )
    .bind(wait_event)
    .fetch_one(admin)
    .await
    .expect("pg_stat_activity")
}

async fn wait_for_waiters(admin: &mut PgConnection, wait_event: &str, count: i64, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while waiting_backends(admin, wait_event).await < count {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_commit_was_still_in_flight_when_it_was_retried_is_applied_once() {
    let db = TestDb::create().await;
    let mut admin = db.connection().await;
    admin
        .execute(
            "CREATE TABLE totals (n bigint NOT NULL); INSERT INTO totals VALUES (0); \
             CREATE TABLE commit_gate (k int); \
             CREATE FUNCTION wait_for_gate() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN PERFORM pg_advisory_xact_lock(4242); RETURN NULL; END $$; \
             CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON commit_gate \
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION wait_for_gate();",
        )
        .await
        .expect("schema");
    // postgres://user@host:port/database: the same URL with the proxy as host and port.
    let (scheme, rest) = db.url.split_once("://").expect("a URL");
    let (authority, path) = rest.split_once('/').expect("a database in the URL");
    let (user, host_port) = authority.rsplit_once('@').map_or(("", authority), |(user, at)| (user, at));
    let server = tokio::net::lookup_host(host_port).await.expect("resolve the server").next().expect("an address");
    let proxy = CuttableProxy::start(server).await;
    let user = if user.is_empty() { String::new() } else { format!("{user}@") };
    let through_proxy = format!("{scheme}://{user}127.0.0.1:{}/{path}", proxy.port);
    let config = PgStoreConfig::default().with_max_connections(6).with_acquire_timeout(Duration::from_secs(5));
    let store = PgEventStore::connect_with(&through_proxy, config).await.expect("connect through the proxy");
    store.migrate().await.expect("migrate");

    let dispatcher = Dispatcher::<Counter, _>::new(Arc::new(store.clone()));
    let mut last = Position::START;
    for n in 0..3 {
        let outcome = dispatcher.dispatch(CounterCommand::increment(n, 1)).await.expect("dispatch");
        last = outcome.appended.expect("stored").last_position;
    }
    // The test holds the gate: the projection's first commit will wait in COMMIT.
    sqlx::query("SELECT pg_advisory_lock(4242)").execute(&mut admin).await.expect("hold the gate");
    let progress = Progress::new();
    let config = RunnerConfig {
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(50),
        ..RunnerConfig::default()
    };
    let running = spawn_projection(&store, Totals, config, &progress);
    wait_for_waiters(&mut admin, "advisory", 1, "the first commit to wait at the gate").await;
    // The client loses the connection mid-COMMIT: for the runner the outcome is unknown, while
    // the server goes on committing. The runner retries the batch (from its reloaded
    // checkpoint, which the unfinished commit has not moved yet).
    proxy.cut();
    wait_for_waiters(&mut admin, "", 2, "the retry to wait behind the first commit").await;
    sqlx::query("SELECT pg_advisory_unlock(4242)").execute(&mut admin).await.expect("open the gate");
    progress.wait_for("totals", last, Duration::from_secs(30)).await.expect("the projection caught up");
    let total: i64 = sqlx::query_scalar("SELECT n FROM totals").fetch_one(&mut admin).await.expect("total");
    assert_eq!(total, 3, "each event applied once");
    running.stop().await;
}
