//! The axum application: state, routes, pages, the websocket upgrade, and the background tasks
//! (the read model's runner and the ticker that re-renders the lobby and the dashboard).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Form, Path, Query, State};
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use cqrs_core::{
    spawn_handler, Checkpoints, Consistency, Dispatcher, EventStore, HandlerState, Position, Progress, RunnerConfig,
    RunningHandler, StartFrom,
};
use serde::Deserialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::domain::{validate_sender, Chat, ChatId};
use crate::live::{view, LiveConfig};
use crate::metrics::{prometheus, Metrics, Snapshot};
use crate::read_model::{ChatReadModel, Presence, HANDLER_NAME};
use crate::render::{self, Assets, RoomPage};

/// The cookie that remembers the reader's name.
pub const NAME_COOKIE: &str = "livechat_name";

/// How the app is set up.
#[derive(Debug, Clone, Default)]
pub struct AppConfig {
    /// Limits of live connections.
    pub live: LiveConfig,
    /// Extra origins (`scheme://host:port`) allowed to open websockets and post forms; the
    /// page's own origin is always allowed.
    pub allowed_origins: Vec<String>,
}

/// Everything a request or a view task needs. Shared behind an `Arc`.
pub struct AppState {
    /// The event store.
    pub store: Arc<dyn EventStore>,
    /// The command path.
    pub dispatcher: Dispatcher<Chat, dyn EventStore>,
    /// Rooms and messages in RAM.
    pub model: ChatReadModel,
    /// Handler progress, for read-your-writes.
    pub progress: Progress,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Client script and stylesheet URLs.
    pub assets: Assets,
    /// The rendered room list, updated by the ticker.
    pub lobby: watch::Receiver<Arc<str>>,
    /// The rendered dashboard table, updated by the ticker.
    pub dashboard: watch::Receiver<Arc<str>>,
    /// The latest metrics reading.
    pub snapshot: watch::Receiver<Snapshot>,
    /// Turns true when the server shuts down; views close with "going away".
    pub shutdown: watch::Receiver<bool>,
    /// Live connection limits.
    pub live: LiveConfig,
    /// Extra allowed origins.
    pub allowed_origins: Vec<String>,
}

/// A running app: its state, the read model's runner and the ticker.
pub struct App {
    state: Arc<AppState>,
    handler: RunningHandler,
    ticker: JoinHandle<()>,
    shutdown: watch::Sender<bool>,
}

impl App {
    /// Starts the read model (rebuilt from the store's history) and the ticker, and waits up
    /// to `rebuild_timeout` for the read model to reach the store's head.
    pub async fn start(store: Arc<dyn EventStore>, config: AppConfig, rebuild_timeout: Duration) -> Self {
        let model = ChatReadModel::new();
        let progress = Progress::new();
        let runner = RunnerConfig {
            start_from: StartFrom::Origin,
            checkpoints: Checkpoints::InMemory,
            page_size: 1024,
            ..RunnerConfig::default()
        };
        let handler = spawn_handler(Arc::clone(&store), model.clone(), runner, &progress);
        // Where the log ends now: the read model is rebuilt once it has applied everything up
        // to here. (The notification channel cannot tell: it starts at 0 on PostgreSQL.)
        let head = match store.head().await {
            Ok(head) => head,
            Err(error) => {
                tracing::warn!(%error, "cannot read the store's head; not waiting for the read model");
                Position::START
            }
        };
        let started = Instant::now();
        if let Err(error) = progress.wait_for(HANDLER_NAME, head, rebuild_timeout).await {
            tracing::warn!(%error, "read model still rebuilding; serving anyway");
        } else {
            tracing::info!(events = model.events(), rooms = model.room_count(), elapsed = ?started.elapsed(), "read model rebuilt");
        }
        let dispatcher = Dispatcher::<Chat, dyn EventStore>::new(Arc::clone(&store)).with_progress(progress.clone());
        let metrics = Arc::new(Metrics::default());
        let (lobby_tx, lobby) = watch::channel(Arc::from(render::room_list(&model.rooms(50)).into_string()));
        let (dashboard_tx, dashboard) = watch::channel(Arc::from(render::metrics(&Snapshot::default()).into_string()));
        let (snapshot_tx, snapshot) = watch::channel(Snapshot::default());
        let (shutdown_tx, shutdown) = watch::channel(false);
        let ticker = tokio::spawn(tick(
            Arc::clone(&store),
            model.clone(),
            Arc::clone(&metrics),
            lobby_tx,
            dashboard_tx,
            snapshot_tx,
        ));
        let state = Arc::new(AppState {
            store,
            dispatcher,
            model,
            progress,
            metrics,
            assets: Assets::new(),
            lobby,
            dashboard,
            snapshot,
            shutdown,
            live: config.live,
            allowed_origins: config.allowed_origins,
        });
        Self { state, handler, ticker, shutdown: shutdown_tx }
    }

    /// The shared state.
    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// The HTTP routes.
    pub fn router(&self) -> Router {
        router(Arc::clone(&self.state))
    }

    /// Tells every view to close ("going away"), stops the ticker and the read model.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        self.ticker.abort();
        self.handler.stop().await;
    }
}

/// Re-renders the lobby (at most twice a second, when something changed) and the dashboard
/// (every second).
async fn tick(
    store: Arc<dyn EventStore>,
    model: ChatReadModel,
    metrics: Arc<Metrics>,
    lobby: watch::Sender<Arc<str>>,
    dashboard: watch::Sender<Arc<str>>,
    snapshot: watch::Sender<Snapshot>,
) {
    let mut changes = model.changes();
    let mut interval = tokio::time::interval(Duration::from_millis(500));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let head = store.notifications();
    let mut last_sample = Instant::now();
    let mut previous_commands = 0;
    loop {
        interval.tick().await;
        if changes.has_changed().unwrap_or(false) {
            changes.mark_unchanged();
            let html = render::room_list(&model.rooms(50)).into_string();
            lobby.send_if_modified(|current| {
                let changed = **current != *html;
                if changed {
                    *current = Arc::from(html);
                }
                changed
            });
        }
        if last_sample.elapsed() >= Duration::from_millis(950) {
            let now = Snapshot::take(
                &metrics,
                model.room_count(),
                head.borrow().0,
                model.position().0,
                previous_commands,
                last_sample.elapsed(),
            );
            last_sample = Instant::now();
            previous_commands = now.commands();
            let html: Arc<str> = Arc::from(render::metrics(&now).into_string());
            dashboard.send_if_modified(|current| {
                let changed = **current != *html;
                if changed {
                    *current = html;
                }
                changed
            });
            snapshot.send_replace(now);
        }
    }
}

/// The routes over `state`.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(lobby))
        .route("/join", post(join))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/dashboard", get(dashboard))
        .route("/live", get(live))
        .route("/assets/live.js", get(script))
        .route("/assets/app.css", get(style))
        .route("/{chat_id}", get(room))
        .route("/{chat_id}/older", get(older))
        .route("/{chat_id}/send", post(send))
        .with_state(state)
}

/// The reader's name from the cookie, if set and valid.
pub fn name_from_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == NAME_COOKIE)
        .and_then(|(_, value)| percent_decode(value))
        .and_then(|name| validate_sender(&name).ok().map(str::to_owned))
}

fn name_cookie(name: &str) -> HeaderValue {
    let value = format!("{NAME_COOKIE}={}; Path=/; Max-Age=31536000; SameSite=Lax; HttpOnly", percent_encode(name));
    HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static("livechat_name=; Path=/"))
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn percent_decode(text: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(text.len());
    let mut input = text.bytes();
    while let Some(b) = input.next() {
        if b == b'%' {
            let hex = [input.next()?, input.next()?];
            bytes.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
        } else {
            bytes.push(b);
        }
    }
    String::from_utf8(bytes).ok()
}

/// Whether a request from a browser comes from one of our pages: its `Origin` (sent by
/// browsers on websocket upgrades and form posts) must name the host it was sent to, or an
/// allowed origin. Requests without `Origin` are not from a browser page and pass.
pub fn origin_allowed(headers: &HeaderMap, allowed: &[String]) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else { return true };
    let Ok(origin) = origin.to_str() else { return false };
    if allowed.iter().any(|a| a == origin) {
        return true;
    }
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let origin_host = origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://"));
    matches!((origin_host, host), (Some(o), Some(h)) if o.eq_ignore_ascii_case(h))
}

fn page(markup: maud::Markup) -> Response {
    Html(markup.into_string()).into_response()
}

async fn lobby(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let name = name_from_cookie(&headers);
    let rooms = maud::PreEscaped(state.lobby.borrow().to_string());
    page(render::lobby_page(&state.assets, name.as_deref(), "", None, &rooms))
}

/// The join form.
#[derive(Debug, Deserialize)]
pub struct JoinForm {
    name: String,
    room: String,
}

async fn join(State(state): State<Arc<AppState>>, headers: HeaderMap, Form(form): Form<JoinForm>) -> Response {
    if !origin_allowed(&headers, &state.allowed_origins) {
        return (StatusCode::FORBIDDEN, "cross-origin form refused").into_response();
    }
    let checked = validate_sender(&form.name).map_err(|e| e.to_string()).and_then(|name| {
        ChatId::parse(form.room.trim()).map(|room| (name.to_owned(), room)).map_err(|e| e.to_string())
    });
    match checked {
        Ok((name, room)) => {
            let mut response = Redirect::to(&format!("/{room}")).into_response();
            response.headers_mut().insert(header::SET_COOKIE, name_cookie(&name));
            response
        }
        Err(error) => {
            let rooms = maud::PreEscaped(state.lobby.borrow().to_string());
            let markup = render::lobby_page(&state.assets, Some(&form.name), &form.room, Some(&error), &rooms);
            (StatusCode::BAD_REQUEST, Html(markup.into_string())).into_response()
        }
    }
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    match state.progress.status(HANDLER_NAME).map(|status| status.state) {
        Some(HandlerState::Running) => (StatusCode::OK, "ok\n").into_response(),
        Some(other) => (StatusCode::SERVICE_UNAVAILABLE, format!("read model: {other:?}\n")).into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "read model not started\n").into_response(),
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let snapshot = Snapshot::take(
        &state.metrics,
        state.model.room_count(),
        state.store.notifications().borrow().0,
        state.model.position().0,
        0,
        Duration::ZERO,
    );
    let text = prometheus(&state.metrics, &snapshot);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

async fn dashboard(State(state): State<Arc<AppState>>) -> Response {
    let snapshot = state.snapshot.borrow().clone();
    page(render::dashboard_page(&state.assets, &render::metrics(&snapshot)))
}

async fn live(State(state): State<Arc<AppState>>, headers: HeaderMap, upgrade: WebSocketUpgrade) -> Response {
    if !origin_allowed(&headers, &state.allowed_origins) {
        return (StatusCode::FORBIDDEN, "websocket from another origin refused").into_response();
    }
    let name = name_from_cookie(&headers);
    let max = state.live.max_frame_bytes;
    upgrade
        .read_buffer_size(4 * 1024)
        .write_buffer_size(4 * 1024)
        .max_write_buffer_size(1024 * 1024)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| view::run(socket, state, name))
}

async fn script() -> Response {
    asset("text/javascript; charset=utf-8", render::LIVE_JS)
}

async fn style() -> Response {
    asset("text/css; charset=utf-8", render::APP_CSS)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "public, max-age=31536000, immutable")], body)
        .into_response()
}

/// `?before=POS`.
#[derive(Debug, Deserialize)]
pub struct Before {
    before: Option<u64>,
}

fn not_found(error: impl std::fmt::Display) -> Response {
    (StatusCode::NOT_FOUND, format!("no such room: {error}\n")).into_response()
}

async fn room(
    State(state): State<Arc<AppState>>,
    Path(chat_id): Path<String>,
    Query(query): Query<Before>,
    headers: HeaderMap,
) -> Response {
    let room = match ChatId::parse(&chat_id) {
        Ok(room) => room,
        Err(error) => return not_found(error),
    };
    let Some(name) = name_from_cookie(&headers) else {
        return page(render::name_page(&state.assets, &room, None));
    };
    render_room(&state, &room, &name, query.before.map(Position), None, StatusCode::OK)
}

fn render_room(
    state: &AppState,
    room_id: &ChatId,
    name: &str,
    before: Option<Position>,
    error: Option<&str>,
    status: StatusCode,
) -> Response {
    let page_size = state.live.page_size;
    let (messages, has_more, presence) = match state.model.room(room_id) {
        Some(room) => {
            let (messages, has_more) = match before {
                Some(before) => room.before(before, page_size),
                None => room.latest(page_size),
            };
            let presence = room.presence().borrow().clone();
            (messages, has_more, presence)
        }
        None => (Vec::new(), false, Presence { list: Arc::from(render::presence(&[], 0).into_string()), count: 0 }),
    };
    let page = RoomPage {
        room: room_id,
        me: name,
        messages: &messages,
        has_more,
        presence: &presence,
        command_id: uuid::Uuid::new_v4(),
        error,
    };
    (status, Html(render::room_page(&state.assets, &page).into_string())).into_response()
}

async fn older(
    State(state): State<Arc<AppState>>,
    Path(chat_id): Path<String>,
    Query(query): Query<Before>,
) -> Response {
    let room = match ChatId::parse(&chat_id) {
        Ok(room) => room,
        Err(error) => return not_found(error),
    };
    let Some(before) = query.before else {
        return (StatusCode::BAD_REQUEST, "?before=POSITION is required\n").into_response();
    };
    let (messages, has_more) =
        state.model.room(&room).map_or((Vec::new(), false), |room| room.before(Position(before), state.live.page_size));
    let html: String = messages.iter().map(|m| m.html()).collect();
    let more = if has_more { "true" } else { "false" };
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::HeaderName::from_static("x-has-more"), more)], html)
        .into_response()
}

/// The composer without JavaScript.
#[derive(Debug, Deserialize)]
pub struct SendForm {
    message: String,
    id: uuid::Uuid,
}

async fn send(
    State(state): State<Arc<AppState>>,
    Path(chat_id): Path<String>,
    headers: HeaderMap,
    Form(form): Form<SendForm>,
) -> Response {
    if !origin_allowed(&headers, &state.allowed_origins) {
        return (StatusCode::FORBIDDEN, "cross-origin form refused").into_response();
    }
    let room = match ChatId::parse(&chat_id) {
        Ok(room) => room,
        Err(error) => return not_found(error),
    };
    let Some(name) = name_from_cookie(&headers) else {
        return page(render::name_page(&state.assets, &room, Some("choose a name first")));
    };
    let consistency = Consistency::strong([HANDLER_NAME]);
    match view::send_message(&state, &room, &name, form.id, form.message, &consistency).await {
        Ok(()) => Redirect::to(&format!("/{room}")).into_response(),
        Err(error) => render_room(&state, &room, &name, None, Some(&error), StatusCode::UNPROCESSABLE_ENTITY),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (key, value) in pairs {
            map.append(*key, HeaderValue::from_str(value).expect("header"));
        }
        map
    }

    #[test]
    fn cookie_names_round_trip() {
        for name in ["alice", "Zoë Müller", "a b;c=d", "<script>"] {
            let cookie = name_cookie(name);
            let pair = cookie.to_str().expect("ascii").split(';').next().expect("pair").to_owned();
            assert_eq!(name_from_cookie(&headers(&[("cookie", &pair)])).as_deref(), Some(name));
        }
        assert_eq!(name_from_cookie(&headers(&[("cookie", "livechat_name=%ZZ")])), None);
        assert_eq!(name_from_cookie(&headers(&[("cookie", "livechat_name=%20%20")])), None, "blank name");
        assert_eq!(name_from_cookie(&headers(&[("cookie", "other=1; livechat_name=bob")])).as_deref(), Some("bob"));
    }

    #[test]
    fn origins() {
        let allowed = vec!["http://example.test".to_owned()];
        assert!(origin_allowed(&headers(&[("host", "127.0.0.1:4000")]), &allowed), "no origin: not a browser");
        assert!(origin_allowed(&headers(&[("host", "127.0.0.1:4000"), ("origin", "http://127.0.0.1:4000")]), &allowed));
        assert!(origin_allowed(&headers(&[("host", "x:1"), ("origin", "http://example.test")]), &allowed));
        assert!(!origin_allowed(&headers(&[("host", "127.0.0.1:4000"), ("origin", "http://evil.test")]), &allowed));
        assert!(!origin_allowed(&headers(&[("host", "127.0.0.1:4000"), ("origin", "http://127.0.0.1:4001")]), &[]));
        assert!(!origin_allowed(&headers(&[("origin", "null")]), &[]));
    }
}
