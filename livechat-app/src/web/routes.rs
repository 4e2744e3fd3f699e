//! The HTTP routes: pages, forms, the websocket upgrade, health, metrics and assets.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use axum::extract::{Form, FromRequestParts, Path, Query, Request, State};
use axum::http::header::{self, HeaderMap};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use cqrs_core::{Consistency, HandlerState, Position};
use serde::Deserialize;

use super::security::{
    client_address, host_allowed, is_https, name_cookie, name_from_cookie, origin_allowed, security_headers,
    ClientAddress, Listener, Peer, TrustedProxies,
};
use crate::commands::{Outcome, RoomFacts, Sender};
use crate::domain::{validate_sender, ChatId};
use crate::live::socket;
use crate::live::view::{self, Visitor};
use crate::metrics::Limit;
use crate::render::{self, RoomPage};
use crate::rooms::{RoomError, HANDLER_NAME};
use crate::state::AppState;

/// The routes over `state`, with the `Host` check and the security headers.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(lobby))
        .route("/join", post(join))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/dashboard", get(dashboard))
        .route("/admin/parked", get(super::admin::list))
        .route("/admin/parked/retry", post(super::admin::retry))
        .route("/admin/parked/discard", post(super::admin::discard))
        .route("/live", get(live))
        .route("/assets/live.js", get(script))
        .route("/assets/app.css", get(style))
        .route("/{chat_id}", get(room))
        .route("/{chat_id}/older", get(older))
        .route("/{chat_id}/send", post(send))
        .layer(middleware::from_fn_with_state(Arc::clone(&state), check_host))
        .layer(middleware::map_response(security_headers))
        .with_state(state)
}

/// Refuses requests whose `Host` is not one this server answers to (DNS rebinding). `/health`
/// is exempt: a load balancer may ask for it by any name, and it tells nothing.
async fn check_host(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    if request.uri().path() != "/health" && !host_allowed(request.headers(), &state.config.allowed_origins) {
        return (StatusCode::MISDIRECTED_REQUEST, "unknown host: this server answers only to its own names\n")
            .into_response();
    }
    next.run(request).await
}

/// Who made a request: the client's address, whether it came over TLS, and through what.
#[derive(Debug, Clone, Copy)]
pub struct Client {
    /// The client's address (behind a trusted proxy: the forwarded one, or unknown).
    pub address: ClientAddress,
    /// Whether the request reached us over TLS.
    pub https: bool,
    /// The connection's own peer.
    pub peer: SocketAddr,
    /// Whether the peer is a trusted proxy: its requests are never admin by address.
    pub proxied: bool,
    /// The listener the request came in on.
    pub listener: Listener,
}

impl FromRequestParts<Arc<AppState>> for Client {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        let peer = parts.extensions.get::<Peer>().map_or(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), |peer| peer.0);
        let listener = parts.extensions.get::<Listener>().copied().unwrap_or(Listener::Public);
        // The admin listener is for this machine's own tools: no proxy speaks for anyone there.
        let none = TrustedProxies::none();
        let trusted = if listener == Listener::Admin { &none } else { &state.config.trusted_proxies };
        let address = client_address(peer, &parts.headers, trusted);
        if address == ClientAddress::Unknown {
            state.metrics.unknown_clients.increment(1);
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                tracing::warn!(
                    %peer,
                    "a trusted proxy sent a request without a usable X-Forwarded-For: such clients are `unknown` \
                     (never admin, one shared rate-limit bucket); make the proxy set it, e.g. nginx's \
                     `proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;`"
                );
            });
        }
        Ok(Self {
            address,
            https: is_https(peer, &parts.headers, trusted, state.config.behind_tls),
            peer,
            proxied: trusted.contains(peer.ip()),
            listener,
        })
    }
}

fn page(markup: maud::Markup) -> Response {
    Html(markup.into_string()).into_response()
}

/// What a room request cannot get now, as a response.
fn unavailable(state: &AppState, error: &RoomError) -> Response {
    let markup = render::notice_page(&state.assets, "Try again in a moment", &error.to_string());
    let mut response = (StatusCode::SERVICE_UNAVAILABLE, Html(markup.into_string())).into_response();
    response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    response
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

async fn join(
    State(state): State<Arc<AppState>>,
    client: Client,
    headers: HeaderMap,
    Form(form): Form<JoinForm>,
) -> Response {
    if !origin_allowed(&headers, &state.config.allowed_origins) {
        return (StatusCode::FORBIDDEN, "cross-origin form refused").into_response();
    }
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
        Some(other) => {
            (StatusCode::SERVICE_UNAVAILABLE, format!("read model: {}\n", crate::app::handler_state(&other)))
        }
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let head = state.store.notifications().borrow().0;
    state.metrics.set_levels(&crate::app::levels(&state.model, head, &state.limits));
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

async fn live(State(state): State<Arc<AppState>>, client: Client, mut request: Request) -> Response {
    if !origin_allowed(request.headers(), &state.config.allowed_origins) {
        return (StatusCode::FORBIDDEN, "websocket from another origin refused").into_response();
    }
    // Behind a trusted proxy every connection comes from the proxy: count live connections
    // per forwarded client address here (direct peers were counted when accepted).
    let address_permit = if client.proxied {
        match state.limits.count_address(client.address) {
            Ok(permit) => Some(permit),
            Err(refusal) => {
                state.metrics.limited(Limit::AddressConnections);
                return (StatusCode::TOO_MANY_REQUESTS, format!("{refusal}\n")).into_response();
            }
        }
    } else {
        None
    };
    let (response, on_upgrade) = match socket::accept(&mut request) {
        Ok(accepted) => accepted,
        Err(socket::BadUpgrade(why)) => return (StatusCode::BAD_REQUEST, why).into_response(),
    };
    let connection = request.extensions().get::<crate::server::ConnectionGuard>().cloned();
    let visitor = Visitor { name: name_from_cookie(request.headers()), address: client.address };
    tokio::spawn(async move {
        // The connection's permits live as long as the websocket.
        let _held = (connection, address_permit);
        if let Some(stream) = socket::open(on_upgrade, &state.live).await {
            view::run(stream, state, visitor).await;
        }
    });
    response
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
) -> Response {
    let room = match state.model.room(room_id).await {
        Ok(room) => room,
        Err(error) => return unavailable(state, &error),
    };
    let live = &state.live;
    let (messages, has_more) = match before {
        Some((position, version)) => match state.model.before(room_id, position, version, live.page_size).await {
            Ok(page) => page,
            Err(error) => return unavailable(state, &error),
        },
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
    (status, Html(render::room_page(&state.assets, &page).into_string())).into_response()
}

async fn older(
    State(state): State<Arc<AppState>>,
    Path(chat_id): Path<String>,
    Query(query): Query<Before>,
    headers: HeaderMap,
) -> Response {
    let room = match ChatId::parse(&chat_id) {
        Ok(room) => room,
        Err(error) => return not_found(error),
    };
    let Some(before) = query.before else {
        return (StatusCode::BAD_REQUEST, "?before=POSITION is required\n").into_response();
    };
    let (messages, has_more) = match state.model.before(&room, Position(before), query.v, state.live.page_size).await {
        Ok(page) => page,
        Err(error) => return unavailable(&state, &error),
    };
    let html: String = messages_html(&messages, name_from_cookie(&headers).as_deref()).concat();
    let more = if has_more { "true" } else { "false" };
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::HeaderName::from_static("x-has-more"), more)], html)
        .into_response()
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
    Path(chat_id): Path<String>,
    client: Client,
    headers: HeaderMap,
    Form(form): Form<SendForm>,
) -> Response {
    if !origin_allowed(&headers, &state.config.allowed_origins) {
        return (StatusCode::FORBIDDEN, "cross-origin form refused").into_response();
    }
    let room_id = match ChatId::parse(&chat_id) {
        Ok(room) => room,
        Err(error) => return not_found(error),
    };
    let Some(name) = name_from_cookie(&headers) else {
        return page(render::name_page(&state.assets, &room_id, Some("choose a name first")));
    };
    let room = match state.model.room(&room_id).await {
        Ok(room) => room,
        Err(error) => return unavailable(&state, &error),
    };
    let sender = Sender { name: &name, address: client.address };
    let consistency = Consistency::strong([HANDLER_NAME]);
    let outcome =
        state.commands.send(&room_id, sender, form.id, form.message.clone(), &RoomFacts::of(&room), &consistency).await;
    match outcome {
        Outcome::Stored => Redirect::to(&format!("/{room_id}")).into_response(),
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
