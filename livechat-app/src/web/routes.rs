//! The HTTP routes: pages, forms, the websocket upgrade, health, metrics and assets.

use std::sync::Arc;

use axum::extract::{Form, Query, Request, State};
use axum::http::header::{self, HeaderMap};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use cqrs_core::{Consistency, HandlerState, Position};
use serde::Deserialize;

use super::error::AppError;
pub use super::extract::Client;
use super::extract::{RoomPath, SameOrigin};
use super::security::{host_allowed, name_cookie, name_from_cookie, security_headers};
use crate::commands::{Outcome, RoomFacts, Sender};
use crate::domain::{validate_sender, ChatId};
use crate::live::socket;
use crate::live::view::{self, Visitor};
use crate::metrics::Limit;
use crate::render::{self, RoomPage};
use crate::rooms::HANDLER_NAME;
use crate::state::AppState;

/// The routes over `state`, with the `Host` check and the security headers.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(lobby))
        .route("/join", post(join))
        .route("/search", get(search))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/dashboard", get(dashboard))
        .route("/live", get(live))
        .route("/assets/live.js", get(script))
        .route("/assets/app.css", get(style))
        .route("/{chat_id}", get(room))
        .route("/{chat_id}/older", get(older))
        .route("/{chat_id}/send", post(send))
        .with_state(Arc::clone(&state))
        .nest("/admin", super::admin::console(&state))
        .layer(middleware::from_fn_with_state(Arc::clone(&state), check_host))
        .layer(middleware::map_response(security_headers))
}

/// Refuses requests whose `Host` is not one this server answers to (DNS rebinding). `/health`
/// is exempt: a load balancer may ask for it by any name, and it tells nothing.
async fn check_host(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    if request.uri().path() != "/health" && !host_allowed(request.headers(), &state.config.allowed_origins) {
        return AppError::UnknownHost.into_response();
    }
    next.run(request).await
}

fn page(markup: maud::Markup) -> Response {
    Html(markup.into_string()).into_response()
}

async fn lobby(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let name = name_from_cookie(&headers);
    let rooms = maud::PreEscaped(state.lobby.borrow().to_string());
    page(render::lobby_page(&state.assets, name.as_deref(), "", None, &rooms))
}

/// `/search?q=…[&room=…]`.
#[derive(Debug, Deserialize)]
pub struct SearchQuery {
    #[serde(default)]
    q: String,
    #[serde(default)]
    room: Option<String>,
}

/// The search page: the form and the newest matching messages (of the room, or of every
/// room), their matched words highlighted. Works without JavaScript; the page's script fetches
/// it to show results as one types.
async fn search(
    State(state): State<Arc<AppState>>,
    client: Client,
    Query(query): Query<SearchQuery>,
) -> Result<Response, AppError> {
    let room = match query.room.as_deref().filter(|room| !room.is_empty()) {
        Some(room) => Some(ChatId::parse(room).map_err(|error| AppError::BadRequest(error.to_string()))?),
        None => None,
    };
    let Some(index) = state.search.get() else {
        return Err(AppError::Unavailable("search needs a SQLite or PostgreSQL store".into()));
    };
    let q = query.q.trim();
    if !q.is_empty() {
        if let Err(refusal) = state.limits.search(client.address) {
            state.metrics.limited(crate::metrics::Limit::AddressSearches);
            return Err(AppError::Limited(refusal.to_string()));
        }
    }
    let (hits, error, status) = if q.is_empty() {
        (Vec::new(), None, StatusCode::OK)
    } else {
        match crate::search::Terms::parse(q) {
            Ok(terms) => match index.search(&terms, room.as_ref(), crate::search::RESULTS).await {
                Ok(hits) => (hits, None, StatusCode::OK),
                Err(error) => {
                    tracing::warn!(%error, "search failed");
                    (Vec::new(), Some(error.to_string()), StatusCode::SERVICE_UNAVAILABLE)
                }
            },
            Err(error) => (Vec::new(), Some(error.to_string()), StatusCode::UNPROCESSABLE_ENTITY),
        }
    };
    let results = render::search_results(&hits, error.as_deref(), !q.is_empty());
    let html = render::search_page(&state.assets, room.as_ref(), q, &results);
    Ok((status, Html(html.into_string())).into_response())
}

/// The join form.
#[derive(Debug, Deserialize)]
pub struct JoinForm {
    name: String,
    room: String,
}

async fn join(
    State(state): State<Arc<AppState>>,
    client: Client,
    _: SameOrigin,
    Form(form): Form<JoinForm>,
) -> Response {
    let checked = validate_sender(&form.name).map_err(|e| e.to_string()).and_then(|name| {
        ChatId::parse(form.room.trim()).map(|room| (name.to_owned(), room)).map_err(|e| e.to_string())
    });
    match checked {
        Ok((name, room)) => {
            let mut response = Redirect::to(&format!("/{room}")).into_response();
            response.headers_mut().insert(header::SET_COOKIE, name_cookie(&name, client.https));
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
    health_status(&state).into_response()
}

/// `/health`'s answer: 200 once the read model runs from the store's head, else 503 and why.
pub(crate) fn health_status(state: &AppState) -> (StatusCode, String) {
    let status = state.progress.status(HANDLER_NAME).map(|status| status.state);
    match status {
        Some(HandlerState::Running) if state.model.is_ready() => (StatusCode::OK, "ok\n".to_owned()),
        Some(HandlerState::Starting | HandlerState::Running) | None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "rebuilding: the read model has not reached the store's head yet\n".to_owned(),
        ),
        Some(other) => (StatusCode::SERVICE_UNAVAILABLE, format!("read model: {}\n", render::handler_state(&other))),
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let head = state.store.notifications().borrow().0;
    state.metrics.set_levels(&crate::state::levels(&state.model, head, &state.limits));
    let mut text = state.metrics.render();
    // Who holds each exclusive handler, as the store says (bounded: a scrape never hangs on it).
    match tokio::time::timeout(std::time::Duration::from_secs(1), state.store.claims()).await {
        Ok(Ok(claims)) => text.push_str(&crate::metrics::Metrics::render_claims(&claims, cqrs_core::Timestamp::now())),
        Ok(Err(error)) => tracing::debug!(%error, "claims not read for /metrics"),
        Err(_) => tracing::debug!("claims not read for /metrics within 1 s"),
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

async fn dashboard(State(state): State<Arc<AppState>>) -> Response {
    let region = maud::PreEscaped(state.dashboard.borrow().to_string());
    page(render::dashboard_page(&state.assets, &region))
}

async fn live(
    State(state): State<Arc<AppState>>,
    client: Client,
    _: SameOrigin,
    mut request: Request,
) -> Result<Response, AppError> {
    // Behind a trusted proxy every connection comes from the proxy: count live connections
    // per forwarded client address here (direct peers were counted when accepted).
    let address_permit = if client.proxied {
        match state.limits.count_address(client.address) {
            Ok(permit) => Some(permit),
            Err(refusal) => {
                state.metrics.limited(Limit::AddressConnections);
                return Err(AppError::Limited(refusal.to_string()));
            }
        }
    } else {
        None
    };
    let (response, on_upgrade) =
        socket::accept(&mut request).map_err(|socket::BadUpgrade(why)| AppError::BadRequest(why.to_owned()))?;
    let connection = request.extensions().get::<crate::limits::ConnectionGuard>().cloned();
    let visitor = Visitor { name: name_from_cookie(request.headers()), address: client.address };
    tokio::spawn(async move {
        // The connection's permits live as long as the websocket.
        let _held = (connection, address_permit);
        if let Some(stream) = socket::open(on_upgrade, &state.live).await {
            view::run(stream, state, visitor).await;
        }
    });
    Ok(response)
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

/// `?before=POS&v=VERSION`: the page before position `POS`; `v` (the version of the message
/// at `POS`, from the page) saves a search.
#[derive(Debug, Deserialize)]
pub struct Before {
    before: Option<u64>,
    v: Option<u64>,
}

async fn room(
    State(state): State<Arc<AppState>>,
    RoomPath(room): RoomPath,
    Query(query): Query<Before>,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    let Some(name) = name_from_cookie(&headers) else {
        return Ok(page(render::name_page(&state.assets, &room, None)));
    };
    let composer = Composer { command_id: uuid::Uuid::new_v4(), draft: "", notice: None };
    render_room(&state, &room, &name, query.before.map(|b| (Position(b), query.v)), &composer, StatusCode::OK).await
}

/// The composer of a rendered room page.
struct Composer<'a> {
    command_id: uuid::Uuid,
    draft: &'a str,
    notice: Option<&'a str>,
}

async fn render_room(
    state: &AppState,
    room_id: &ChatId,
    name: &str,
    before: Option<(Position, Option<u64>)>,
    composer: &Composer<'_>,
    status: StatusCode,
) -> Result<Response, AppError> {
    let room = state.model.room(room_id).await?;
    let live = &state.live;
    let (messages, has_more) = match before {
        Some((position, version)) => state.model.before(room_id, position, version, live.page_size).await?,
        None => room.latest(state.model.present(), live.page_size, live.page_bytes),
    };
    let html = messages_html(&messages, Some(name));
    let presence = room.presence().borrow().clone();
    let first = messages.first().map_or((0, 0), |m| (m.data.sent.position.0, m.data.sent.version));
    let page = RoomPage {
        room: room_id,
        me: name,
        messages: &html,
        first,
        last: messages.last().map_or(0, |m| m.data.sent.position.0),
        has_more,
        presence: &presence.shown,
        presence_count: presence.count,
        command_id: composer.command_id,
        draft: composer.draft,
        error: composer.notice,
    };
    Ok((status, Html(render::room_page(&state.assets, &page).into_string())).into_response())
}

async fn older(
    State(state): State<Arc<AppState>>,
    RoomPath(room): RoomPath,
    Query(query): Query<Before>,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    let before = query.before.ok_or_else(|| AppError::BadRequest("?before=POSITION is required".to_owned()))?;
    let (messages, has_more) = state.model.before(&room, Position(before), query.v, state.live.page_size).await?;
    let html: String = messages_html(&messages, name_from_cookie(&headers).as_deref()).concat();
    let more = if has_more { "true" } else { "false" };
    let headers =
        [(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::HeaderName::from_static("x-has-more"), more)];
    Ok((headers, html).into_response())
}

/// The HTML of `messages` for the reader `me`: the shared rendering, except the reader's own
/// messages, rendered again with their edit and delete controls.
fn messages_html(messages: &[crate::live::present::LiveShared], me: Option<&str>) -> Vec<String> {
    messages
        .iter()
        .map(|m| {
            if me == Some(m.data.sender.as_str()) && !m.data.is_deleted() {
                render::message(&m.data, true).into_string()
            } else {
                m.shown.html().to_owned()
            }
        })
        .collect()
}

/// The composer without JavaScript.
#[derive(Debug, Deserialize)]
pub struct SendForm {
    message: String,
    id: uuid::Uuid,
}

async fn send(
    State(state): State<Arc<AppState>>,
    client: Client,
    _: SameOrigin,
    RoomPath(room_id): RoomPath,
    headers: HeaderMap,
    Form(form): Form<SendForm>,
) -> Result<Response, AppError> {
    let Some(name) = name_from_cookie(&headers) else {
        return Ok(page(render::name_page(&state.assets, &room_id, Some("choose a name first"))));
    };
    let room = state.model.room(&room_id).await?;
    let sender = Sender { name: &name, address: client.address };
    let consistency = Consistency::strong([HANDLER_NAME]);
    let outcome =
        state.commands.send(&room_id, sender, form.id, form.message.clone(), &RoomFacts::of(&room), &consistency).await;
    match outcome {
        Outcome::Stored => Ok(Redirect::to(&format!("/{room_id}")).into_response()),
        Outcome::Refused(error) => {
            // A refusal stored nothing: a fresh id for what the reader sends next.
            let composer = Composer { command_id: uuid::Uuid::new_v4(), draft: &form.message, notice: Some(&error) };
            render_room(&state, &room_id, &name, None, &composer, StatusCode::UNPROCESSABLE_ENTITY).await
        }
        Outcome::Unknown(_) => {
            // Maybe stored: the same id, so that sending again posts it once.
            let notice = "We could not confirm that your message was stored. Press Send again: it will be posted once.";
            let composer = Composer { command_id: form.id, draft: &form.message, notice: Some(notice) };
            render_room(&state, &room_id, &name, None, &composer, StatusCode::SERVICE_UNAVAILABLE).await
        }
    }
}
