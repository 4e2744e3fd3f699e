//! The extractors the routes share, as sqlx's `axum-social-with-tests` example writes them:
//! [`Client`] (who made the request), [`SameOrigin`] (the browser's `Origin` is one of ours)
//! and [`RoomPath`] (the room named in the path). A refusal is an [`AppError`].

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use axum::extract::{FromRequestParts, Path};
use axum::http::header;
use axum::http::request::Parts;

use super::error::AppError;
use super::security::{client_address, is_https, origin_allowed, ClientAddress, Listener, Peer, TrustedProxies};
use crate::domain::ChatId;
use crate::state::AppState;

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

/// Proof that a request from a browser comes from one of our pages (see
/// [`origin_allowed`]): taken by every route that changes something or opens a websocket, so
/// a page elsewhere cannot post forms or listen through a visitor's browser.
#[derive(Debug, Clone, Copy)]
pub struct SameOrigin;

impl FromRequestParts<Arc<AppState>> for SameOrigin {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        if origin_allowed(&parts.headers, &state.config.allowed_origins) {
            return Ok(Self);
        }
        let websocket =
            parts.headers.get(header::UPGRADE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
        Err(AppError::Forbidden(if websocket {
            "websocket from another origin refused"
        } else {
            "cross-origin form refused"
        }))
    }
}

/// The room named by the path's `{chat_id}`: a name that cannot be a room is a 404.
#[derive(Debug, Clone)]
pub struct RoomPath(pub ChatId);

impl<S: Send + Sync> FromRequestParts<S> for RoomPath {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(chat_id) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|rejection| AppError::BadRequest(rejection.body_text()))?;
        ChatId::parse(&chat_id).map(Self).map_err(|error| AppError::NotFound(format!("no such room: {error}")))
    }
}
