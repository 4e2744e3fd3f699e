//! The database goes away and comes back, simulated by a TCP proxy in front of the server
//! that drops every connection and refuses new ones while "down". Callers get
//! `StoreError::Unavailable`, a subscriber resumes where it was, and the store works again.

use std::collections::HashSet;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cqrs_core::testing::conformance::event;
use cqrs_core::{EventId, EventStore, ExpectedVersion, Position, StoreError, Subscription};
use cqrs_postgres::{PgEventStore, PgStoreConfig};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::support::{read_everything, stream, TestDb};

/// A TCP proxy that can be switched off (all connections cut, new ones refused) and on.
struct Proxy {
    port: u16,
    up: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
    acceptor: JoinHandle<()>,
}

impl Proxy {
    async fn start(target: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let up = Arc::new(AtomicBool::new(true));
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let acceptor = {
            let up = Arc::clone(&up);
            let connections = Arc::clone(&connections);
            tokio::spawn(async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    if !up.load(Ordering::SeqCst) {
                        continue; // dropped: the connection is refused
                    }
                    let target = target.clone();
                    let connection = tokio::spawn(async move {
                        if let Ok(mut server) = TcpStream::connect(&target).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    });
                    connections.lock().expect("lock").push(connection);
                }
            })
        };
        Proxy { port, up, connections, acceptor }
    }

    fn down(&self) {
        self.up.store(false, Ordering::SeqCst);
        for connection in self.connections.lock().expect("lock").drain(..) {
            connection.abort();
        }
    }

    fn up(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.down();
        self.acceptor.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_survives_a_database_outage() {
    let db = TestDb::create().await;
    let direct = db.store().await;
    let (proxy, store) = store_through_proxy(&db).await;
    let (seen, subscriber) = resuming_subscriber(&store);
    let mut written = Vec::new();
    append_each(&store, "before", 0..20, &mut written).await;

    proxy.down();
    let attempts: Vec<_> = (0..3)
        .map(|n| {
            let store = store.clone();
            tokio::spawn(async move { store.append(&stream("during"), ExpectedVersion::Any, vec![event(n)]).await })
        })
        .collect();
    for attempt in attempts {
        let result = attempt.await.expect("no panic");
        assert!(matches!(result, Err(StoreError::Unavailable(_))), "appends during the outage: {result:?}");
    }
    // What this process just committed is still read from memory; past it, the database.
    assert_eq!(store.read_all(Position::START, 10).await.map(|page| page.len()).ok(), Some(10));
    assert!(matches!(store.read_all(Position(20), 10).await, Err(StoreError::Unavailable(_))));
    // Other processes keep writing meanwhile.
    append_each(&direct, "elsewhere", 100..110, &mut written).await;

    proxy.up();
    written.push(append_once_back(&store).await);
    append_each(&store, "after", 300..310, &mut written).await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while seen.lock().expect("lock").len() < written.len() {
        assert!(tokio::time::Instant::now() < deadline, "subscriber did not resume after the outage");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    subscriber.abort();
    let seen = seen.lock().expect("lock").clone();
    let stored: Vec<EventId> = read_everything(&direct).await.iter().map(|e| e.event_id).collect();
    assert_eq!(seen, stored, "the subscriber saw every stored event once, in order");
    assert_eq!(seen.iter().copied().collect::<HashSet<_>>(), written.iter().copied().collect::<HashSet<_>>());
}

/// A proxy in front of the test database, and a store whose pool connects through it.
async fn store_through_proxy(db: &TestDb) -> (Proxy, PgEventStore) {
    let options = PgConnectOptions::from_str(&db.url).expect("url");
    let proxy = Proxy::start(format!("{}:{}", options.get_host(), options.get_port())).await;
    let config = PgStoreConfig::default().with_acquire_timeout(Duration::from_secs(1));
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(config.acquire_timeout)
        .connect_with(options.host("127.0.0.1").port(proxy.port))
        .await
        .expect("pool through the proxy");
    (proxy, PgEventStore::from_pool(pool, config))
}

/// A subscriber from the start that collects every event id, polling again after transient
/// errors (the outage).
fn resuming_subscriber(store: &PgEventStore) -> (Arc<Mutex<Vec<EventId>>>, JoinHandle<()>) {
    let seen: Arc<Mutex<Vec<EventId>>> = Arc::default();
    let collected = Arc::clone(&seen);
    let mut feed = Subscription::all(Arc::new(store.clone()), Position::START);
    let task = tokio::spawn(async move {
        loop {
            match feed.next().await {
                Ok(Some(event)) => collected.lock().expect("lock").push(event.event_id),
                Ok(None) => return,
                // The outage: a subscription can simply be polled again.
                Err(error) if error.is_transient() => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(error) => panic!("subscription failed: {error}"),
            }
        }
    });
    (seen, task)
}

/// Appends events numbered `numbers`, one per append, to a new stream named after `prefix`;
/// each must succeed, and its id is added to `written`.
async fn append_each(store: &PgEventStore, prefix: &str, numbers: std::ops::Range<u64>, written: &mut Vec<EventId>) {
    for n in numbers {
        let sent = event(n);
        written.push(sent.event_id);
        store
            .append(&stream(prefix), ExpectedVersion::Any, vec![sent])
            .await
            .unwrap_or_else(|error| panic!("append to {prefix}: {error}"));
    }
}

/// Appends one event once the store works again (retrying `Unavailable` for up to ~10 s);
/// returns its id.
async fn append_once_back(store: &PgEventStore) -> EventId {
    for _ in 0..100 {
        let sent = event(200);
        let id = sent.event_id;
        match store.append(&stream("after"), ExpectedVersion::Any, vec![sent]).await {
            Ok(_) => return id,
            Err(StoreError::Unavailable(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(other) => panic!("unexpected error after the outage: {other}"),
        }
    }
    panic!("the store must work again after the outage");
}
