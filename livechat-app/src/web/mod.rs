//! The HTTP side: [`routes`] (pages, forms, the websocket upgrade, health, metrics, assets),
//! [`admin`] (parked events: list, retry, discard) and [`security`] (client address through
//! trusted proxies, `Host` and `Origin` checks, the name cookie, security headers).

pub mod admin;
pub mod routes;
pub mod security;
