//! The operator's routes: parked events of every handler, with retry and discard.
//!
//! `GET /admin/parked` lists them; `POST /admin/parked/retry` (`handler`, and `position` or
//! `all=1`) asks the handler for another attempt; `POST /admin/parked/discard` (`handler`,
//! `position`) drops one for good (logged at warn level with the event). Only for a client on
//! this machine (its address, after trusted proxies, is loopback: nginx in front forwards the
//! real address, so the world is refused), or a request with `Authorization: Bearer TOKEN`
//! when the app was started with `--admin-token TOKEN`. Forms from another origin are refused.

use std::sync::Arc;

use axum::extract::{Form, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use cqrs_core::{ParkedEvent, ParkedEvents, Position, StoreError};
use serde::Deserialize;

use crate::render;
use crate::state::AppState;
use crate::web::routes::Client;
use crate::web::security::origin_allowed;

/// Whether this request may use the admin routes.
pub fn allowed(state: &AppState, client: &Client, headers: &HeaderMap) -> bool {
    if client.address.is_loopback() {
        return true;
    }
    let Some(token) = state.config.admin_token.as_deref().filter(|t| !t.is_empty()) else { return false };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .unwrap_or_default();
    constant_time_eq(presented.as_bytes(), token.as_bytes())
}

/// Compares without stopping at the first difference (no timing hint about the token).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

fn refused() -> Response {
    (StatusCode::FORBIDDEN, "admin routes answer only on this machine, or with the admin token\n").into_response()
}

/// The handlers whose parked events are listed: every handler this process runs.
fn handlers(state: &AppState) -> Vec<String> {
    let mut names: Vec<String> = state.progress.statuses().into_iter().map(|status| status.name).collect();
    names.sort();
    names.dedup();
    names
}

/// Every handler's parked events (a store without parked events lists none).
pub async fn parked(state: &AppState) -> Result<Vec<(String, Vec<ParkedEvent>)>, StoreError> {
    let parked = ParkedEvents::new(Arc::clone(&state.store));
    let mut all = Vec::new();
    for handler in handlers(state) {
        match parked.list(&handler).await {
            Ok(events) => all.push((handler, events)),
            Err(StoreError::Unsupported(_)) => all.push((handler, Vec::new())),
            Err(error) => return Err(error),
        }
    }
    Ok(all)
}

/// `GET /admin/parked`.
pub async fn list(State(state): State<Arc<AppState>>, client: Client, headers: HeaderMap) -> Response {
    if !allowed(&state, &client, &headers) {
        return refused();
    }
    match parked(&state).await {
        Ok(all) => Html(render::parked_page(&state.assets, &all).into_string()).into_response(),
        Err(error) => {
            (StatusCode::SERVICE_UNAVAILABLE, format!("cannot read parked events: {error}\n")).into_response()
        }
    }
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
    client: Client,
    headers: HeaderMap,
    Form(form): Form<ParkedForm>,
) -> Response {
    act(&state, &client, &headers, form, Action::Retry).await
}

/// `POST /admin/parked/discard`.
pub async fn discard(
    State(state): State<Arc<AppState>>,
    client: Client,
    headers: HeaderMap,
    Form(form): Form<ParkedForm>,
) -> Response {
    act(&state, &client, &headers, form, Action::Discard).await
}

#[derive(Debug, Clone, Copy)]
enum Action {
    Retry,
    Discard,
}

async fn act(state: &AppState, client: &Client, headers: &HeaderMap, form: ParkedForm, action: Action) -> Response {
    if !allowed(state, client, headers) {
        return refused();
    }
    if !origin_allowed(headers, &state.config.allowed_origins) {
        return (StatusCode::FORBIDDEN, "cross-origin form refused\n").into_response();
    }
    if !handlers(state).contains(&form.handler) {
        return (StatusCode::NOT_FOUND, format!("no handler {:?} runs here\n", form.handler)).into_response();
    }
    let parked = ParkedEvents::new(Arc::clone(&state.store));
    let done = match (action, form.position, form.all.is_some()) {
        (Action::Retry, _, true) => parked.retry_all(&form.handler).await.map(|n| n > 0),
        (Action::Retry, Some(position), false) => parked.retry(&form.handler, Position(position)).await,
        (Action::Discard, Some(position), false) => parked.discard(&form.handler, Position(position)).await,
        _ => return (StatusCode::BAD_REQUEST, "say which event: position=N (or all=1 to retry all)\n").into_response(),
    };
    match done {
        Ok(true) => Redirect::to("/admin/parked").into_response(),
        Ok(false) => (StatusCode::NOT_FOUND, "no such parked event (retried or discarded already?)\n").into_response(),
        Err(error) => (StatusCode::SERVICE_UNAVAILABLE, format!("the store refused: {error}\n")).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret!"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
