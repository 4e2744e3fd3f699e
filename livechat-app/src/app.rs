//! Starting the app: the read model's live feed (from the store's head: nothing is replayed),
//! the dispatcher and command path, and the ticker that evicts idle rooms, expires typing, and
//! re-renders the lobby and the dashboard. The routes are in [`crate::web::routes`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use cqrs_core::rebuild::{RebuildError, Rebuildable, Rebuilds};
use cqrs_core::{
    spawn_handler, Checkpoints, Dispatcher, EventStore, HandlerState, Position, Progress, RunnerConfig, RunningHandler,
    StartFrom, Store, Upcasters,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::commands::Commands;
use crate::dashboard::{History, Snapshot};
use crate::domain::{Chat, ChatEvent, ChatId};
use crate::limits::Limits;
use crate::live::present::{LivePresent, Model};
use crate::metrics::Metrics;
pub use crate::render::handler_state;
use crate::render::{self, Assets, HandlerLine};
use crate::state::levels;
pub use crate::state::{AppConfig, AppState};

/// Events at the log's end read at start to fill the lobby with the rooms active last.
const LOBBY_SEED_EVENTS: u64 = 2_000;

/// A running app: its state, the read model's live feed, the mention notifier and the ticker.
pub struct App {
    state: Arc<AppState>,
    handler: RunningHandler,
    notifier: Option<RunningHandler>,
    tasks: Vec<JoinHandle<()>>,
    /// The cluster's announcer and listener, if this node joined one.
    cluster: Vec<JoinHandle<()>>,
    /// The search projection, once started.
    /// Whether the search index was started (its runners belong to `state.rebuilds`).
    search: bool,
    shutdown: watch::Sender<bool>,
}

/// The mention notifier, when configured; a failure to start it is logged, not fatal.
fn start_notifier(
    store: &Arc<dyn Store>,
    config: &AppConfig,
    metrics: &Metrics,
    progress: &Progress,
) -> Option<RunningHandler> {
    let started = crate::notify::spawn_notifier(
        Arc::clone(store),
        &config.notifier,
        &config.node,
        metrics.mentions_notified.clone(),
        progress,
    );
    started.unwrap_or_else(|error| {
        tracing::error!(%error, "mention notifier not started");
        None
    })
}

impl App {
    /// Starts the read model's live feed and the ticker, and waits up to `ready_timeout` for
    /// the feed to reach the store's head (it starts there, so this is quick; until then
    /// `/health` and room pages answer 503 "rebuilding").
    pub async fn start(store: Arc<dyn Store>, mut config: AppConfig, ready_timeout: Duration) -> Self {
        if config.node.is_empty() {
            config.node = cqrs_core::default_owner();
        }
        let progress = Progress::new();
        let model = Model::new(Arc::clone(&store) as Arc<dyn EventStore>, LivePresent, config.rooms.clone());
        let runner = RunnerConfig {
            start_from: StartFrom::Current,
            checkpoints: Checkpoints::InMemory,
            page_size: 512,
            ..RunnerConfig::default()
        };
        let handler = spawn_handler(Arc::clone(&store), model.clone(), runner, &progress);
        let ready = tokio::spawn(become_ready(Arc::clone(&store), model.clone(), handler.watch()));
        let metrics = Arc::new(Metrics::default());
        metrics.set_node(&config.node);
        let notifier = start_notifier(&store, &config, &metrics, &progress);
        cap_connections(&mut config);
        let limits = Arc::new(Limits::new(config.limits.clone()));
        let dispatcher = Dispatcher::<Chat, dyn EventStore>::new(Arc::clone(&store) as Arc<dyn EventStore>)
            .with_progress(progress.clone());
        let commands = Commands::new(dispatcher.clone(), Arc::clone(&metrics), Arc::clone(&limits));
        let (lobby_tx, lobby) = watch::channel(Arc::from(render::room_list(&[]).into_string()));
        let empty = render::metrics(&Snapshot::default(), &History::default(), &[]).into_string();
        let (dashboard_tx, dashboard) = watch::channel(Arc::from(empty));
        let (snapshot_tx, snapshot) = watch::channel(Snapshot::default());
        let (shutdown_tx, shutdown) = watch::channel(false);
        let ticker = tokio::spawn(tick(Ticker {
            store: Arc::clone(&store),
            model: model.clone(),
            metrics: Arc::clone(&metrics),
            limits: Arc::clone(&limits),
            progress: progress.clone(),
            lobby: lobby_tx,
            dashboard: dashboard_tx,
            snapshot: snapshot_tx,
        }));
        let rebuilds = Rebuilds::new(Arc::clone(&store), progress.clone(), config.node.clone());
        let state = Arc::new(AppState {
            rebuilds,
            store,
            commands,
            dispatcher,
            model,
            progress,
            metrics,
            limits,
            assets: Assets::new(),
            lobby,
            dashboard,
            snapshot,
            shutdown,
            live: config.live.clone(),
            config,
            search: std::sync::OnceLock::new(),
        });
        let started = Instant::now();
        let mut watch_ready = state.model.ready();
        if tokio::time::timeout(ready_timeout, watch_ready.wait_for(|ready| *ready)).await.is_ok() {
            tracing::info!(elapsed = ?started.elapsed(), "live feed at the store's head; serving");
        } else {
            tracing::warn!("live feed not at the store's head yet; serving 503 \"rebuilding\" until it is");
        }
        Self {
            state,
            handler,
            notifier,
            tasks: vec![ticker, ready],
            cluster: Vec::new(),
            search: false,
            shutdown: shutdown_tx,
        }
    }

    /// Starts the search read model on `backend` (the store's own database) and serves
    /// `/search` from it. Call once, after `start`.
    /// Its live version (version 1, `chat_search`, until one is built beside it and switched
    /// to from the console) is served; the one beside, if any, is resumed.
    pub async fn start_search(&mut self, backend: crate::search::Backend) -> Result<(), RebuildError> {
        if !self.search {
            let versions = Arc::new(crate::search::SearchVersions::new(backend));
            self.state.rebuilds.register(Arc::clone(&versions) as Arc<dyn Rebuildable>).await?;
            let _ = self.state.search.set(versions);
            self.search = true;
        }
        Ok(())
    }

    /// Makes presence and typing cluster-wide: this node and every other one on `pool`'s
    /// database see each other's people (see [`crate::cluster`]). Call once, after `start`.
    pub fn join_cluster(&mut self, pool: sqlx::PgPool) {
        if self.cluster.is_empty() {
            let (node, model, shutdown) =
                (self.state.config.node.clone(), self.state.model.clone(), self.shutdown.subscribe());
            self.cluster = crate::cluster::spawn(pool, node, model, shutdown);
        }
    }

    /// The shared state.
    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// The HTTP routes.
    pub fn router(&self) -> Router {
        crate::web::routes::router(Arc::clone(&self.state))
    }

    /// Tells every view to close ("going away"), stops the ticker and the read model.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for task in &self.tasks {
            task.abort();
        }
        let mut cluster = self.cluster.into_iter();
        if let Some(announcer) = cluster.next() {
            // It says goodbye to the other nodes, so they drop this node's people at once.
            let _ = tokio::time::timeout(Duration::from_secs(1), announcer).await;
        }
        for task in cluster {
            task.abort();
        }
        if let Some(notifier) = self.notifier {
            notifier.stop().await;
        }
        self.state.rebuilds.stop().await;
        self.handler.stop().await;
    }
}

/// Never more connections than descriptors: beyond them accepting fails and nothing,
/// `/health` included, gets an answer.
fn cap_connections(config: &mut AppConfig) {
    let open_files = crate::limits::open_files_limit();
    let cap = crate::limits::cap_for_open_files(config.limits.max_connections, open_files);
    if cap < config.limits.max_connections {
        tracing::warn!(
            max_connections = config.limits.max_connections,
            open_files,
            cap,
            "the open-files limit is below the connection cap: connections are capped at the limit less a reserve"
        );
        config.limits.max_connections = cap;
    }
}

/// Marks the model ready once the feed runs from the store's head, after filling the lobby
/// from the log's last events.
async fn become_ready(store: Arc<dyn Store>, model: Model, mut status: watch::Receiver<cqrs_core::HandlerStatus>) {
    let Ok(running) = status.wait_for(|s| s.state == HandlerState::Running).await.map(|s| s.position) else { return };
    let mut after = Position(running.0.saturating_sub(LOBBY_SEED_EVENTS));
    while after < running {
        let page = match store.read_all(after, 512).await {
            Ok(page) if !page.is_empty() => page,
            Ok(_) => break,
            Err(error) => {
                tracing::warn!(%error, "cannot read the log's tail for the lobby");
                break;
            }
        };
        for recorded in page.iter().filter(|r| r.position <= running) {
            if recorded.event_type.as_ref() != "MessageSent" {
                continue;
            }
            if let (Ok(ChatEvent::MessageSent(sent)), Some(_)) =
                (Upcasters::new().decode_payload::<ChatEvent>(recorded), ChatId::from_stream(&recorded.stream_id))
            {
                let number = if sent.number > 0 { sent.number } else { recorded.version.0 };
                model.remember_room(&sent.chat_id, number);
            }
        }
        after = page.last().map_or(running, |r| r.position);
    }
    model.mark_ready();
}

struct Ticker {
    store: Arc<dyn Store>,
    model: Model,
    metrics: Arc<Metrics>,
    limits: Arc<Limits>,
    progress: Progress,
    lobby: watch::Sender<Arc<str>>,
    dashboard: watch::Sender<Arc<str>>,
    snapshot: watch::Sender<Snapshot>,
}

/// Every 500 ms: evicts idle rooms and expires typing; re-renders the lobby when something
/// changed. Every second: samples the metrics and re-renders the dashboard.
async fn tick(ticker: Ticker) {
    let mut changes = ticker.model.changes();
    let mut interval = tokio::time::interval(Duration::from_millis(500));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let head = ticker.store.notifications();
    let mut last_sample = Instant::now();
    let mut previous: Option<Snapshot> = None;
    let mut history = History::default();
    loop {
        interval.tick().await;
        ticker.model.sweep();
        if changes.has_changed().unwrap_or(false) {
            changes.mark_unchanged();
            let html = render::room_list(&ticker.model.rooms(50)).into_string();
            ticker.lobby.send_if_modified(|current| {
                let changed = **current != *html;
                if changed {
                    *current = Arc::from(html);
                }
                changed
            });
        }
        if last_sample.elapsed() >= Duration::from_millis(950) {
            let interval = last_sample.elapsed();
            ticker.metrics.set_levels(&levels(&ticker.model, head.borrow().0, &ticker.limits));
            let now = Snapshot::of(&ticker.metrics.reading(), previous.as_ref(), interval);
            last_sample = Instant::now();
            history.record(&now, interval);
            let handlers: Vec<HandlerLine> = ticker
                .progress
                .statuses()
                .into_iter()
                .map(|status| HandlerLine {
                    state: handler_state(&status.state),
                    name: status.name,
                    position: status.position.0,
                    parked: status.parked,
                })
                .collect();
            let html: Arc<str> = Arc::from(render::metrics(&now, &history, &handlers).into_string());
            ticker.dashboard.send_replace(html);
            ticker.snapshot.send_replace(now.clone());
            previous = Some(now);
        }
    }
}
