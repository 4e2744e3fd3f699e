//! Choosing the event store from a URL, binding the listener, and serving until shutdown.
//!
//! The accept loop is our own, over hyper's HTTP/1 connection, because axum's `serve` sets no
//! header-read timeout: a client that sends half a request head would hold its connection
//! for ever. Here every connection
//! - takes a place under the global connection cap and, unless it comes from a trusted proxy,
//!   under its address's cap (refused with a short HTTP answer saying which limit); the global
//!   cap is kept under the open-files limit ([`crate::limits::cap_for_open_files`]), and past
//!   it a connection may still ask `/health` (in the [`HEALTH_RESERVE`]), anything else is
//!   refused;
//! - must send each request head within [`HttpConfig::header_read_timeout`], which also bounds
//!   how long a keep-alive connection may sit idle;
//! - keeps its places for as long as it is open, websockets included.
//!
//! An optional second listener, the admin listener (`--admin-listen`, loopback only), serves
//! the same routes; its requests are marked [`Listener::Admin`], which is what opens the admin
//! routes without a token ([`crate::web::admin`]), and no `X-Forwarded-*` is believed there.
//!
//! [`HttpConfig::header_read_timeout`]: crate::state::HttpConfig
//! [`HEALTH_RESERVE`]: crate::limits::HEALTH_RESERVE

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use cqrs_core::Store;
use cqrs_memory::MemoryStore;
use cqrs_postgres::PgEventStore;
use cqrs_sqlite::SqliteEventStore;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tower_service::Service;

pub use crate::limits::ConnectionGuard;
use crate::limits::{Refusal, ReservedPlace, RESERVE_HEAD_TIMEOUT};
use crate::metrics::Limit;
use crate::web::security::{ClientAddress, Listener, Peer};
use crate::App;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The store URL is not one this app knows.
    #[error("unsupported database URL {0:?}: use `sqlite://PATH`, `memory` or `postgres://…`")]
    UnsupportedUrl(String),
    /// The SQLite file could not be opened or migrated.
    #[error("SQLite: {0}")]
    Sqlite(#[from] cqrs_sqlite::SqliteStoreError),
    /// PostgreSQL could not be reached or migrated.
    #[error("PostgreSQL: {0}")]
    Postgres(#[from] cqrs_postgres::PgStoreError),
    /// The listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The admin listener was given an address that is not loopback.
    #[error("--admin-listen {0}: the admin listener opens the admin routes to every peer, so it must be a loopback address (127.0.0.1:PORT or [::1]:PORT)")]
    AdminNotLoopback(SocketAddr),
    /// Serving failed.
    #[error("server: {0}")]
    Serve(#[source] std::io::Error),
}

/// The store of a chat started without `--database-url`: a SQLite file in the working
/// directory.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://livechat.db";

/// Which store a URL names, for printing.
pub fn describe_store(url: &str) -> String {
    if url == "memory" {
        "in-memory store (nothing is kept after exit)".to_owned()
    } else if let Some(path) = url.strip_prefix("sqlite://") {
        let path = std::path::Path::new(path);
        let shown = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        format!("SQLite file {}", shown.display())
    } else {
        let without_password = match (url.find("://"), url.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => format!("{}://…{}", &url[..scheme], &url[at..]),
            _ => url.to_owned(),
        };
        format!("PostgreSQL at {without_password}")
    }
}

/// Opens the store a URL names: `sqlite://PATH` (created if missing), `memory`, or
/// `postgres://…` (migrated on open).
pub async fn open_store(url: &str) -> Result<Arc<dyn Store>, ServerError> {
    Ok(open(url).await?.store)
}

/// An opened store, and its PostgreSQL pool when it is one (the nodes of a cluster talk
/// through that database: [`App::join_cluster`](crate::app::App::join_cluster)).
pub struct Opened {
    /// The store.
    pub store: Arc<dyn Store>,
    /// The database's pool, for a PostgreSQL store.
    pub postgres: Option<sqlx::PgPool>,
    /// Where the search index goes (none on the memory store).
    pub search: Option<crate::search::Backend>,
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opened").field("postgres", &self.postgres.is_some()).finish_non_exhaustive()
    }
}

/// [`open_store`], keeping the PostgreSQL pool.
pub async fn open(url: &str) -> Result<Opened, ServerError> {
    if url == "memory" {
        return Ok(Opened { store: Arc::new(MemoryStore::new()), postgres: None, search: None });
    }
    if url.starts_with("sqlite://") {
        let store = SqliteEventStore::connect(url).await?;
        let search = Some(crate::search::Backend::Sqlite { url: url.to_owned(), store: store.clone() });
        return Ok(Opened { store: Arc::new(store), postgres: None, search });
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let store = PgEventStore::connect(url).await?;
        store.migrate().await?;
        let postgres = Some(store.pool().clone());
        let search = Some(crate::search::Backend::Postgres(store.clone()));
        return Ok(Opened { store: Arc::new(store), postgres, search });
    }
    Err(ServerError::UnsupportedUrl(url.to_owned()))
}

/// Binds `addr` with a listen backlog of 4096 (tokio's default of 128 overflows when thousands
/// of browsers connect at once).
pub fn bind(addr: SocketAddr) -> Result<TcpListener, ServerError> {
    let bind = || -> std::io::Result<TcpListener> {
        let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
        socket.set_nodelay(true)?;
        socket.bind(addr)?;
        socket.listen(4096)
    };
    bind().map_err(|source| ServerError::Bind { addr, source })
}

/// Binds the admin listener at `addr`, which must be a loopback address (every peer of it is
/// admin).
pub fn bind_admin(addr: SocketAddr) -> Result<TcpListener, ServerError> {
    if !addr.ip().is_loopback() {
        return Err(ServerError::AdminNotLoopback(addr));
    }
    bind(addr)
}

/// Serves `app` on `listener` until `shutdown` resolves, then closes every live view, lets
/// open requests finish (10 s at most) and stops the app's tasks.
pub async fn serve(
    listener: TcpListener,
    app: App,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    serve_with_admin(listener, None, app, shutdown).await
}

/// [`serve`], and the admin listener `admin` (from [`bind_admin`]) beside it.
pub async fn serve_with_admin(
    listener: TcpListener,
    admin: Option<TcpListener>,
    app: App,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let state = Arc::clone(app.state());
    let router = app.router();
    let (stop_tx, stop) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (accepted, entry) = tokio::select! {
            accepted = listener.accept() => (accepted, Listener::Public),
            accepted = accept_on(admin.as_ref()) => (accepted, Listener::Admin),
            () = &mut shutdown => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors, or a connection reset before it was accepted:
                // wait a little rather than spin.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let direct = entry == Listener::Admin || !state.config.trusted_proxies.contains(peer.ip());
        let permit = match state.limits.connect(direct.then_some(ClientAddress::Known(peer.ip()))) {
            Ok(permit) => ConnectionGuard::new(permit),
            Err(refusal @ Refusal::ServerFull(_)) => {
                tokio::spawn(reserved(stream, state.limits.reserve(), refusal, Arc::clone(&state)));
                continue;
            }
            Err(refusal) => {
                state.metrics.limited(Limit::AddressConnections);
                tokio::spawn(refuse(stream, refusal));
                continue;
            }
        };
        tokio::spawn(connection(stream, peer, entry, permit, router.clone(), Arc::clone(&state), stop.clone()));
    }
    drop(admin);
    drop(listener);
    // Views close first (they are upgraded connections, outside the HTTP server's drain).
    let _ = stop_tx.send(true);
    let limits = Arc::clone(&state.limits);
    app.shutdown().await;
    tracing::debug!(open = limits.open_connections(), "app stopped; waiting for connections to close");
    let drained = async {
        while limits.open_connections() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(10), drained).await.is_err() {
        tracing::warn!(open = limits.open_connections(), "connections still open after 10 s; stopping anyway");
    }
    Ok(())
}

/// Accepts on `listener`, or never when there is none.
async fn accept_on(listener: Option<&TcpListener>) -> std::io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(listener) => listener.accept().await,
        None => std::future::pending().await,
    }
}

/// Serves one connection until it closes, or gracefully ends it when the server stops.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    entry: Listener,
    permit: ConnectionGuard,
    router: axum::Router,
    state: Arc<crate::AppState>,
    mut stop: watch::Receiver<bool>,
) {
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(Peer(peer));
        request.extensions_mut().insert(entry);
        request.extensions_mut().insert(permit.clone());
        let mut router = router.clone();
        async move { router.call(request.map(Body::new)).await }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(state.config.http.header_read_timeout).keep_alive(true);
    let connection = builder.serve_connection(TokioIo::new(stream), service).with_upgrades();
    let mut connection = std::pin::pin!(connection);
    let served = tokio::select! {
        served = connection.as_mut() => served,
        () = async { let _ = stop.wait_for(|stop| *stop).await; } => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = served {
        if error.is_timeout() {
            state.metrics.http_timeouts.increment(1);
        }
        tracing::debug!(%error, "connection ended with an error");
    }
}

/// Most bytes of a request head read in the health reserve.
const RESERVE_HEAD_BYTES: usize = 4096;

/// A connection past the global cap, in the [`HEALTH_RESERVE`]: `GET /health` is answered
/// (then closed); anything else, a head not sent within [`RESERVE_HEAD_TIMEOUT`], or an
/// eviction by a newer connection gets `refusal` (counted).
///
/// [`HEALTH_RESERVE`]: crate::limits::HEALTH_RESERVE
async fn reserved(mut stream: TcpStream, mut place: ReservedPlace, refusal: Refusal, state: Arc<crate::AppState>) {
    let mut head = Vec::with_capacity(512);
    let read_head = async {
        let mut chunk = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < RESERVE_HEAD_BYTES {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(read) => head.extend_from_slice(&chunk[..read]),
            }
        }
        true
    };
    let complete = tokio::select! {
        read = tokio::time::timeout(RESERVE_HEAD_TIMEOUT, read_head) => read.unwrap_or(false),
        _ = &mut place.evicted => false,
    };
    let health = complete && (head.starts_with(b"GET /health HTTP/") || head.starts_with(b"GET /health?"));
    if !health {
        state.metrics.limited(Limit::Connections);
        drop(place);
        return refuse(stream, refusal).await;
    }
    let (status, text) = crate::web::routes::health_status(&state);
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\
         X-Content-Type-Options: nosniff\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n{text}",
        text.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// Answers a connection refused by a limit with a short HTTP response naming the limit.
async fn refuse(mut stream: TcpStream, refusal: Refusal) {
    let (status, text) = match refusal {
        Refusal::ServerFull(_) => ("503 Service Unavailable", refusal.to_string()),
        _ => ("429 Too Many Requests", refusal.to_string()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nRetry-After: 10\r\n\
         Connection: close\r\n\r\n{text}\n",
        text.len() + 1
    );
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_admin_listener_is_loopback_only() {
        for addr in ["0.0.0.0:0", "[::]:0", "192.0.2.1:4001"] {
            let addr: SocketAddr = addr.parse().expect("addr");
            assert!(matches!(bind_admin(addr), Err(ServerError::AdminNotLoopback(a)) if a == addr), "{addr}");
        }
    }

    #[tokio::test]
    async fn the_admin_listener_binds_on_loopback() {
        let listener = bind_admin("127.0.0.1:0".parse().expect("addr")).expect("bind");
        assert!(listener.local_addr().expect("addr").ip().is_loopback());
    }
}
