//! The operator's routes: parked events of every handler, with retry and discard.
//!
//! `GET /admin/parked` lists them; `POST /admin/parked/retry` (`handler`, and `position` or
//! `all=1`) asks the handler for another attempt; `POST /admin/parked/discard` (`handler`,
//! `position`) drops one for good (logged at warn level with the event).
//!
//! Who may use them ([`access`]):
//! - a request on the admin listener (`--admin-listen`, loopback only, never a proxy's
//!   target) from a loopback peer: admin by address;
//! - a request with `Authorization: Bearer TOKEN` when the app was started with
//!   `--admin-token TOKEN`, on any listener, from anywhere;
//! - nobody else. In particular the chat's own listener never grants admin by address: a
//!   proxy on this machine (nginx's plain `proxy_pass`) connects from loopback for every client
//!   on the Internet, so a loopback peer there proves nothing.
//!
//! The forms (`POST`) of an admin by address must carry an allowed `Origin` (browsers send one
//! on every form post): a page elsewhere cannot post them through the operator's browser, and
//! a request without `Origin` is refused. A bearer token is never sent by a browser on its own,
//! so requests with it need no `Origin` (but a foreign one is still refused).

use std::sync::Arc;

use axum::extract::{Form, FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use axum::response::{Html, IntoResponse, Redirect, Response};
use cqrs_core::{ParkedEvent, ParkedEvents, Position, StoreError};
use serde::Deserialize;

use super::error::AppError;
use super::extract::Client;
use super::security::{origin_allowed, Listener};
use crate::render;
use crate::state::AppState;

/// How a request got admin rights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// On the admin listener, from this machine.
    Address,
    /// With the admin token.
    Token,
}

/// Whether this request may use the admin routes, and how; `None`: it may not.
pub fn access(client: &Client, admin_token: Option<&str>, headers: &HeaderMap) -> Option<Access> {
    if let Some(token) = admin_token.filter(|t| !t.is_empty()) {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .unwrap_or_default();
        if constant_time_eq(presented.as_bytes(), token.as_bytes()) {
            return Some(Access::Token);
        }
    }
    let peer = client.peer.ip();
    let loopback = peer.is_loopback()
        || matches!(peer, std::net::IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()));
    (client.listener == Listener::Admin && !client.proxied && loopback).then_some(Access::Address)
}

/// Whether an admin form may be acted on: an allowed `Origin`, required unless the token was
/// presented.
pub fn form_allowed(access: Access, headers: &HeaderMap, allowed_origins: &[String]) -> bool {
    let has_origin = headers.contains_key(header::ORIGIN);
    (has_origin || access == Access::Token) && origin_allowed(headers, allowed_origins)
}

/// Compares without stopping at the first difference (no timing hint about the token).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

/// Why a request without admin access is refused.
const NOT_ADMIN: &str = "admin routes answer on the admin listener (--admin-listen, this machine only), or with the \
                         admin token (--admin-token) in `Authorization: Bearer TOKEN`";

/// A request with admin access ([`access`]); without it, a 403.
#[derive(Debug, Clone, Copy)]
pub struct Admin(pub Access);

impl FromRequestParts<Arc<AppState>> for Admin {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        let client = Client::from_request_parts(parts, state).await.unwrap_or_else(|never| match never {});
        access(&client, state.config.admin_token.as_deref(), &parts.headers)
            .map(Self)
            .ok_or(AppError::Forbidden(NOT_ADMIN))
    }
}

/// An admin form that may be acted on: admin access, and an allowed `Origin`, required
/// unless the token was presented ([`form_allowed`]); else a 403.
#[derive(Debug, Clone, Copy)]
pub struct AdminForm(pub Access);

impl FromRequestParts<Arc<AppState>> for AdminForm {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        let Admin(access) = Admin::from_request_parts(parts, state).await?;
        if !form_allowed(access, &parts.headers, &state.config.allowed_origins) {
            return Err(AppError::Forbidden("cross-origin form, or one without an Origin header, refused"));
        }
        Ok(Self(access))
    }
}

/// The handlers whose parked events are listed: every handler this process runs.
fn handlers(state: &AppState) -> Vec<String> {
    let mut names: Vec<String> = state.progress.statuses().into_iter().map(|status| status.name).collect();
    names.sort();
    names.dedup();
    names
}

/// Every handler's parked events.
pub async fn parked(state: &AppState) -> Result<Vec<(String, Vec<ParkedEvent>)>, StoreError> {
    let parked = ParkedEvents::new(Arc::clone(&state.store));
    let mut all = Vec::new();
    for handler in handlers(state) {
        let events = parked.list(&handler).await?;
        all.push((handler, events));
    }
    Ok(all)
}

/// `GET /admin/parked`.
pub async fn list(State(state): State<Arc<AppState>>, _: Admin) -> Result<Response, AppError> {
    let all =
        parked(&state).await.map_err(|error| AppError::Unavailable(format!("cannot read parked events: {error}")))?;
    Ok(Html(render::parked_page(&state.assets, &all).into_string()).into_response())
}

/// The retry and discard forms.
#[derive(Debug, Deserialize)]
pub struct ParkedForm {
    handler: String,
    position: Option<u64>,
    all: Option<String>,
}

/// `POST /admin/parked/retry`.
pub async fn retry(
    State(state): State<Arc<AppState>>,
    _: AdminForm,
    Form(form): Form<ParkedForm>,
) -> Result<Response, AppError> {
    act(&state, form, Action::Retry).await
}

/// `POST /admin/parked/discard`.
pub async fn discard(
    State(state): State<Arc<AppState>>,
    _: AdminForm,
    Form(form): Form<ParkedForm>,
) -> Result<Response, AppError> {
    act(&state, form, Action::Discard).await
}

#[derive(Debug, Clone, Copy)]
enum Action {
    Retry,
    Discard,
}

async fn act(state: &AppState, form: ParkedForm, action: Action) -> Result<Response, AppError> {
    if !handlers(state).contains(&form.handler) {
        return Err(AppError::NotFound(format!("no handler {:?} runs here", form.handler)));
    }
    let parked = ParkedEvents::new(Arc::clone(&state.store));
    let done = match (action, form.position, form.all.is_some()) {
        (Action::Retry, _, true) => parked.retry_all(&form.handler).await.map(|n| n > 0),
        (Action::Retry, Some(position), false) => parked.retry(&form.handler, Position(position)).await,
        (Action::Discard, Some(position), false) => parked.discard(&form.handler, Position(position)).await,
        _ => return Err(AppError::BadRequest("say which event: position=N (or all=1 to retry all)".to_owned())),
    };
    match done {
        Ok(true) => Ok(Redirect::to("/admin/parked").into_response()),
        Ok(false) => Err(AppError::NotFound("no such parked event (retried or discarded already?)".to_owned())),
        Err(error) => Err(AppError::Unavailable(format!("the store refused: {error}"))),
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use axum::http::HeaderValue;

    use super::*;
    use crate::web::security::ClientAddress;

    fn client(peer: &str, proxied: bool, listener: Listener) -> Client {
        let peer: SocketAddr = peer.parse().expect("peer");
        Client { address: ClientAddress::Known(peer.ip()), https: false, peer, proxied, listener }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (key, value) in pairs {
            map.append(*key, HeaderValue::from_str(value).expect("header"));
        }
        map
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret!"));
        assert!(!constant_time_eq(b"", b"x"));
    }

    #[test]
    fn admin_by_address_only_on_the_admin_listener_from_loopback() {
        let none = HeaderMap::new();
        // The chat's listener: a loopback peer may be a proxy for anyone, trusted or not.
        assert_eq!(access(&client("127.0.0.1:5000", true, Listener::Public), None, &none), None);
        assert_eq!(access(&client("127.0.0.1:5000", false, Listener::Public), None, &none), None);
        assert_eq!(access(&client("[::1]:5000", true, Listener::Public), None, &none), None);
        // The admin listener, from this machine.
        assert_eq!(access(&client("127.0.0.1:5000", false, Listener::Admin), None, &none), Some(Access::Address));
        assert_eq!(access(&client("[::1]:5000", false, Listener::Admin), None, &none), Some(Access::Address));
        assert_eq!(
            access(&client("[::ffff:127.0.0.1]:5000", false, Listener::Admin), None, &none),
            Some(Access::Address)
        );
        assert_eq!(access(&client("203.0.113.9:5000", false, Listener::Admin), None, &none), None);
        // The token, anywhere; a wrong or empty one opens nothing.
        let bearer = headers(&[("authorization", "Bearer s3cret")]);
        assert_eq!(
            access(&client("127.0.0.1:5000", true, Listener::Public), Some("s3cret"), &bearer),
            Some(Access::Token)
        );
        assert_eq!(
            access(&client("203.0.113.9:5000", false, Listener::Public), Some("s3cret"), &bearer),
            Some(Access::Token)
        );
        assert_eq!(access(&client("127.0.0.1:5000", true, Listener::Public), Some("other"), &bearer), None);
        let empty = headers(&[("authorization", "Bearer ")]);
        assert_eq!(access(&client("127.0.0.1:5000", true, Listener::Public), Some(""), &empty), None);
    }

    #[test]
    fn admin_forms_by_address_need_an_origin() {
        let host = ("host", "127.0.0.1:4001");
        let same = headers(&[host, ("origin", "http://127.0.0.1:4001")]);
        let foreign = headers(&[host, ("origin", "http://evil.test")]);
        let missing = headers(&[host]);
        assert!(form_allowed(Access::Address, &same, &[]));
        assert!(!form_allowed(Access::Address, &foreign, &[]));
        assert!(!form_allowed(Access::Address, &missing, &[]), "no Origin is no proof of a same-origin page");
        assert!(form_allowed(Access::Token, &missing, &[]), "a browser never adds the bearer token by itself");
        assert!(!form_allowed(Access::Token, &foreign, &[]));
    }
}
