//! Choosing the event store from a URL, binding the listener, and serving until shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use cqrs_core::EventStore;
use cqrs_memory::MemoryStore;
use cqrs_postgres::PgEventStore;
use cqrs_sqlite::SqliteEventStore;
use tokio::net::{TcpListener, TcpSocket};

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
pub async fn open_store(url: &str) -> Result<Arc<dyn EventStore>, ServerError> {
    if url == "memory" {
        return Ok(Arc::new(MemoryStore::new()));
    }
    if url.starts_with("sqlite://") {
        return Ok(Arc::new(SqliteEventStore::connect(url).await?));
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let store = PgEventStore::connect(url).await?;
        store.migrate().await?;
        return Ok(Arc::new(store));
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

/// Serves `app` on `listener` until `shutdown` resolves, then closes every live view and stops
/// the app's tasks.
pub async fn serve(
    listener: TcpListener,
    app: App,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let router = app.router();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = stop_rx.await;
            })
            .await
    });
    shutdown.await;
    // Views close first (they are upgraded connections, outside the HTTP server's drain).
    let state = std::sync::Arc::clone(app.state());
    app.shutdown().await;
    let _ = stop_tx.send(());
    let served = server.await.map_err(|e| ServerError::Serve(std::io::Error::other(e)))?;
    drop(state);
    served.map_err(ServerError::Serve)
}
