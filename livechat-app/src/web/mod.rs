//! The HTTP side: [`routes`] (pages, forms, the websocket upgrade, health, metrics, assets),
//! [`admin`] (the operator's console at `/admin`, and who may use it), [`extract`] (the extractors routes share:
//! the client, the same-origin check, the room in the path), [`error`] (`AppError`, how a
//! request fails) and [`security`] (client address through trusted proxies, `Host` and
//! `Origin` checks, the name cookie, security headers).
//!
//! Arrows point one way: `routes` → `admin` → `security`; `routes` → `extract` → `error`, `security`.

pub mod admin;
pub mod error;
pub mod extract;
pub mod routes;
pub mod security;
