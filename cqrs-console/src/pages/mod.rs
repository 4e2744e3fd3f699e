//! The console's pages, one module per section.

pub(crate) mod handlers;
pub(crate) mod processes;
pub(crate) mod rebuilds;
pub(crate) mod streams;

use axum::response::Redirect;
use serde::Deserialize;

/// `?live=0` turns a list's refresh off (to read it quietly).
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Live {
    live: Option<String>,
}

impl Live {
    /// The refresh for this request.
    pub(crate) fn refresh(&self, configured: std::time::Duration) -> std::time::Duration {
        if self.live.as_deref() == Some("0") {
            std::time::Duration::ZERO
        } else {
            configured
        }
    }
}

/// A position typed into a form or a path: a whole number, else a 400 naming what was sent.
pub(crate) fn position(text: &str) -> Result<cqrs_core::Position, crate::error::ConsoleError> {
    text.trim()
        .parse::<u64>()
        .map(cqrs_core::Position)
        .map_err(|_| crate::error::ConsoleError::BadRequest(format!("{text:?} is not a position (a whole number)")))
}

/// Back to a page after an action (303: the browser follows with a GET).
pub(crate) fn back(base: &str, path: &str) -> Redirect {
    Redirect::to(&format!("{base}{path}"))
}
