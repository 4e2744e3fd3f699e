//! An operator's console for [`cqrs_core`], as an axum [`Router`] any application mounts under
//! a path of its choosing: handlers and process managers (placement, holder, position, lag,
//! rate, state) with pause, resume, reset and parked events; process instances and schedules;
//! the event log by position, stream and category, with an event's correlation chain; and
//! projection rebuilds beside the live version ([`cqrs_core::rebuild`]).
//!
//! Pages are rendered on the server and kept live by refresh (every two seconds on the lists;
//! `?live=0` turns it off). No JavaScript.
//!
//! # Mount it
//!
//! ```no_run
//! use std::sync::Arc;
//! use cqrs_console::{router, Access, ConsoleConfig};
//! use cqrs_core::{Progress, Store};
//!
//! async fn serve(store: Arc<dyn Store>, progress: Progress) -> std::io::Result<()> {
//!     let config = ConsoleConfig::new(Access::bearer(std::env::var("OPS_TOKEN").unwrap_or_default()))
//!         .with_processes(["order-fulfilment"]);
//!     let app = axum::Router::new().nest("/ops", router(store, progress, config));
//!     let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//!     axum::serve(listener, app).await
//! }
//! ```
//!
//! # Who may use it
//!
//! Nobody, by default ([`Access::deny_all`]): the application decides. [`Access::bearer`]
//! admits a request carrying the token as `Authorization: Bearer TOKEN`, or in the cookie set
//! by the console's login form (`{mount}/login`), which a browser needs. [`Access::custom`]
//! adds the application's own rule. There is no "loopback means admin" default: behind a proxy
//! every client is loopback. A form posted with the cookie or the custom rule must carry an
//! `Origin` naming this host, so a page elsewhere cannot post through an operator's browser.

mod access;
mod error;
mod layout;
mod pages;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::routing::{get, post};
use axum::Router;
use cqrs_core::rebuild::Rebuilds;
use cqrs_core::{HandlerControl, ParkedEvents, ProcessAdmin, Progress, Store};

pub use access::{Access, Grant};
pub use error::ConsoleError;

/// What the console shows and who may use it.
#[derive(Clone)]
pub struct ConsoleConfig {
    access: Access,
    processes: Vec<String>,
    rebuilds: Option<Rebuilds>,
    title: String,
    refresh: Duration,
    reset_wait: Duration,
}

impl std::fmt::Debug for ConsoleConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleConfig")
            .field("processes", &self.processes)
            .field("title", &self.title)
            .field("refresh", &self.refresh)
            .finish_non_exhaustive()
    }
}

impl ConsoleConfig {
    /// A console admitting whom `access` admits; no process managers, no rebuilds.
    pub fn new(access: Access) -> Self {
        Self {
            access,
            processes: Vec::new(),
            rebuilds: None,
            title: "Console".to_owned(),
            refresh: Duration::from_secs(2),
            reset_wait: Duration::from_secs(10),
        }
    }

    /// The process managers whose instances and schedules the processes page lists.
    #[must_use]
    pub fn with_processes<I, S>(mut self, processes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.processes = processes.into_iter().map(Into::into).collect();
        self
    }

    /// The rebuildable projections the rebuilds page shows and acts on.
    #[must_use]
    pub fn with_rebuilds(mut self, rebuilds: Rebuilds) -> Self {
        self.rebuilds = Some(rebuilds);
        self
    }

    /// The name in the pages' titles. Default: "Console".
    #[must_use]
    pub fn with_title(mut self, title: impl Into<String>) -> Self {
        self.title = title.into();
        self
    }

    /// How often the list pages refresh themselves (`Duration::ZERO`: never). Default: 2 s.
    #[must_use]
    pub fn with_refresh(mut self, refresh: Duration) -> Self {
        self.refresh = refresh;
        self
    }

    /// How long a reset waits for the process running the handler to give it up. Default: 10 s.
    #[must_use]
    pub fn with_reset_wait(mut self, wait: Duration) -> Self {
        self.reset_wait = wait;
        self
    }
}

/// The console's shared state.
pub(crate) struct Console {
    store: Arc<dyn Store>,
    progress: Progress,
    config: ConsoleConfig,
    control: HandlerControl<dyn Store>,
    parked: ParkedEvents<dyn Store>,
    processes: ProcessAdmin<dyn Store>,
    /// The last position seen of each handler and when, for its rate.
    samples: Mutex<HashMap<String, pages::handlers::Sample>>,
}

/// The console's routes, to mount with [`Router::nest`]. Every route but the login form
/// answers only to whom `config`'s [`Access`] admits (401 or 403 otherwise).
///
/// - `GET /` and `GET /handlers`: every handler and process manager; `POST
///   /handlers/{name}/pause`, `/resume`, `/reset` (after `GET /handlers/{name}/reset?to=P`, the
///   confirmation naming what will be handled again); `GET /handlers/{name}/parked`, `POST
///   /handlers/{name}/parked/retry` and `/discard`.
/// - `GET /processes`: instances, pending and set-aside schedules; `POST
///   /processes/{process}/scheduled/retry` and `/discard`.
/// - `GET /streams` (`?after=P`, `?stream=ID`, `?category=C`), `GET /events/{position}`, `GET
///   /correlations/{id}`.
/// - `GET /rebuilds`; `POST /rebuilds/{name}/build`, `/switch`, `/drop`.
/// - `GET /login`, `POST /login`, `POST /logout`; `GET /console.css` (open to all: the login
///   page uses it).
pub fn router(store: Arc<dyn Store>, progress: Progress, config: ConsoleConfig) -> Router {
    let console = Arc::new(Console {
        control: HandlerControl::new(Arc::clone(&store)),
        parked: ParkedEvents::new(Arc::clone(&store)),
        processes: ProcessAdmin::new(Arc::clone(&store)),
        store,
        progress,
        config,
        samples: Mutex::default(),
    });
    let guarded = Router::new()
        .route("/", get(pages::handlers::list))
        .route("/handlers", get(pages::handlers::list))
        .route("/handlers/{name}/pause", post(pages::handlers::pause))
        .route("/handlers/{name}/resume", post(pages::handlers::resume))
        .route("/handlers/{name}/reset", get(pages::handlers::confirm_reset).post(pages::handlers::reset))
        .route("/handlers/{name}/parked", get(pages::handlers::parked))
        .route("/handlers/{name}/parked/retry", post(pages::handlers::retry_parked))
        .route("/handlers/{name}/parked/discard", post(pages::handlers::discard_parked))
        .route("/processes", get(pages::processes::list))
        .route("/processes/{process}/scheduled/retry", post(pages::processes::retry))
        .route("/processes/{process}/scheduled/discard", post(pages::processes::discard))
        .route("/streams", get(pages::streams::browse))
        .route("/events/{position}", get(pages::streams::event))
        .route("/correlations/{id}", get(pages::streams::correlation))
        .route("/rebuilds", get(pages::rebuilds::list))
        .route("/rebuilds/{name}/build", post(pages::rebuilds::build))
        .route("/rebuilds/{name}/switch", post(pages::rebuilds::switch))
        .route("/rebuilds/{name}/drop", post(pages::rebuilds::drop_version))
        .route("/logout", post(access::logout))
        .route_layer(axum::middleware::from_fn_with_state(Arc::clone(&console), access::require));
    Router::new()
        .route("/login", get(access::login_form).post(access::login))
        .route("/console.css", get(layout::style))
        .merge(guarded)
        .with_state(console)
}
