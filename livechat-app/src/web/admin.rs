//! The operator's console ([`cqrs_console`]), mounted at `/admin`: handlers (pause, resume,
//! reset, parked events), the event log, and rebuilds of the search index beside the live one.
//!
//! Who may use it ([`access`]):
//! - a request with the admin token (`--admin-token TOKEN`) as `Authorization: Bearer TOKEN`,
//!   or in the cookie the console's login form (`/admin/login`) sets, on any listener;
//! - a request on the admin listener (`--admin-listen`, loopback only, never a proxy's target)
//!   from a loopback peer: admin by address;
//! - nobody else. In particular the chat's own listener never grants admin by address: a proxy
//!   on this machine (nginx's plain `proxy_pass`) connects from loopback for every client on
//!   the Internet, so a loopback peer there proves nothing.
//!
//! A form posted by address or with the cookie must carry an `Origin` naming the host it was
//! sent to (browsers send one on every form post), so a page elsewhere cannot post it through
//! the operator's browser; one posted with the bearer header needs none.

use std::net::IpAddr;
use std::sync::Arc;

use axum::http::request::Parts;
use axum::Router;
use cqrs_console::{Access, ConsoleConfig, Grant};

use super::security::{Listener, Peer};
use crate::state::AppState;

/// Who may use the console: the token, or admin by address on the admin listener.
pub fn access(admin_token: Option<&str>) -> Access {
    Access::bearer(admin_token.unwrap_or_default()).or(by_address)
}

/// Admin by address: the admin listener, from this machine.
fn by_address(parts: &Parts) -> Option<Grant> {
    let listener = parts.extensions.get::<Listener>().copied().unwrap_or(Listener::Public);
    let peer = parts.extensions.get::<Peer>()?.0.ip();
    let loopback =
        peer.is_loopback() || matches!(peer, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()));
    (listener == Listener::Admin && loopback)
        .then(|| Grant { operator: format!("admin listener ({peer})"), needs_origin: true })
}

/// The console's routes, to nest at `/admin`.
pub fn console(state: &AppState) -> Router {
    let config = ConsoleConfig::new(access(state.config.admin_token.as_deref()))
        .with_title(format!("livechat {}", state.config.node))
        .with_rebuilds(state.rebuilds.clone());
    cqrs_console::router(Arc::clone(&state.store), state.progress.clone(), config)
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    fn parts(peer: &str, listener: Listener) -> Parts {
        let mut parts = axum::http::Request::builder().uri("/admin").body(()).expect("request").into_parts().0;
        let peer: SocketAddr = peer.parse().expect("peer");
        parts.extensions.insert(Peer(peer));
        parts.extensions.insert(listener);
        parts
    }

    #[test]
    fn admin_by_address_only_on_the_admin_listener_from_loopback() {
        // The chat's listener: a loopback peer may be a proxy for anyone.
        assert_eq!(by_address(&parts("127.0.0.1:5000", Listener::Public)), None);
        assert_eq!(by_address(&parts("[::1]:5000", Listener::Public)), None);
        // The admin listener, from this machine; its forms need an Origin.
        for peer in ["127.0.0.1:5000", "[::1]:5000", "[::ffff:127.0.0.1]:5000"] {
            let grant = by_address(&parts(peer, Listener::Admin)).expect("admin by address");
            assert!(grant.needs_origin);
        }
        assert_eq!(by_address(&parts("203.0.113.9:5000", Listener::Admin)), None);
    }
}
