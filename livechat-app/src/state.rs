//! What the app is configured with, and the state every request and view task shares.

use std::sync::Arc;
use std::time::Duration;

use cqrs_core::{EventStore, Progress, Store};
use tokio::sync::watch;

use crate::commands::Commands;
use crate::dashboard::Snapshot;
use crate::limits::{Limits, LimitsConfig};
use crate::live::present::Model;
use crate::live::LiveConfig;
use crate::metrics::{Levels, Metrics};
use crate::notify::NotifierConfig;
use crate::render::Assets;
use crate::rooms::RoomsConfig;
use crate::web::security::TrustedProxies;

/// HTTP timeouts.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// A request head must arrive within this long of the connection being ready for it; on
    /// a keep-alive connection that includes the wait for the next request, so it is also the
    /// idle timeout.
    pub header_read_timeout: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self { header_read_timeout: Duration::from_secs(15) }
    }
}

/// How the app is set up.
#[derive(Debug, Clone, Default)]
pub struct AppConfig {
    /// Limits of live connections.
    pub live: LiveConfig,
    /// Extra origins (`scheme://host:port`) allowed to open websockets and post forms; the
    /// page's own origin is always allowed when its host is an IP literal or `localhost`.
    pub allowed_origins: Vec<String>,
    /// Bounds of the read model.
    pub rooms: RoomsConfig,
    /// Connection and rate limits.
    pub limits: LimitsConfig,
    /// HTTP timeouts.
    pub http: HttpConfig,
    /// Peers whose `X-Forwarded-For` / `X-Forwarded-Proto` are believed (default: loopback).
    pub trusted_proxies: TrustedProxies,
    /// Whether every request comes over TLS (a TLS-terminating proxy in front): the name cookie
    /// is then `Secure`.
    pub behind_tls: bool,
    /// The mention notifier: where notifications go, when an event is parked.
    pub notifier: NotifierConfig,
    /// This process's identity in handler claims (empty: `host:pid:random`).
    pub node: String,
    /// A bearer token that opens the admin routes on any listener, from anywhere (without it
    /// they answer only on the admin listener: see [`crate::web::admin`]).
    pub admin_token: Option<String>,
}

/// Everything a request or a view task needs. Shared behind an `Arc`.
pub struct AppState {
    /// The event store.
    pub store: Arc<dyn Store>,
    /// The command path (its dispatcher is `commands.dispatcher`).
    pub commands: Commands,
    /// The chat's dispatcher (the same as `commands.dispatcher`).
    pub dispatcher: cqrs_core::Dispatcher<crate::domain::Chat, dyn EventStore>,
    /// Rooms in use, with their recent windows.
    pub model: Model,
    /// Handler progress, for read-your-writes.
    pub progress: Progress,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Connection and rate limits.
    pub limits: Arc<Limits>,
    /// Client script and stylesheet URLs.
    pub assets: Assets,
    /// The rendered room list, updated by the ticker.
    pub lobby: watch::Receiver<Arc<str>>,
    /// The rendered dashboard region, updated by the ticker.
    pub dashboard: watch::Receiver<Arc<str>>,
    /// The latest metrics reading.
    pub snapshot: watch::Receiver<Snapshot>,
    /// Turns true when the server shuts down; views close with "going away".
    pub shutdown: watch::Receiver<bool>,
    /// Live connection limits.
    pub live: LiveConfig,
    /// The configuration (`config.node` is this process's claim identity, filled in at start).
    pub config: AppConfig,
    /// The search index, once started ([`App::start_search`](crate::app::App::start_search));
    /// none on the memory store.
    pub search: std::sync::OnceLock<Arc<dyn crate::search::SearchIndex>>,
    /// The rebuildable read models (the search index), shown and rebuilt in the console.
    pub rebuilds: cqrs_core::rebuild::Rebuilds,
}

/// The levels `/metrics` and the dashboard read from the app's parts.
pub fn levels(model: &Model, store_head: u64, limits: &Limits) -> Levels {
    Levels {
        rooms: model.resident_rooms() as u64,
        store_head,
        projected: model.position().0,
        connections_open: limits.open_connections() as u64,
        window_messages: model.window_messages() as u64,
        rooms_loaded: model.loaded_rooms(),
        rooms_evicted: model.evicted_rooms(),
    }
}
