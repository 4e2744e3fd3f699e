//! [`ConsoleError`]: every failure of a console route, as a page with the right status.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use cqrs_core::rebuild::RebuildError;
use cqrs_core::{ControlError, StoreError};
use maud::html;

use crate::layout;

/// Why a console request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConsoleError {
    /// Not admitted.
    #[error("forbidden: {0}")]
    Forbidden(&'static str),
    /// No such page or item.
    #[error("not found: {0}")]
    NotFound(&'static str),
    /// A form or query that makes no sense.
    #[error("{0}")]
    BadRequest(String),
    /// A pause, resume or reset was refused.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// A rebuild action was refused or failed.
    #[error(transparent)]
    Rebuild(#[from] RebuildError),
    /// The store failed.
    #[error("the store failed: {0}")]
    Store(#[from] StoreError),
}

impl IntoResponse for ConsoleError {
    fn into_response(self) -> Response {
        let status = match &self {
            ConsoleError::Forbidden(_) => StatusCode::FORBIDDEN,
            ConsoleError::NotFound(_) => StatusCode::NOT_FOUND,
            ConsoleError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ConsoleError::Control(ControlError::NotPaused(_)) | ConsoleError::Rebuild(RebuildError::Busy { .. }) => {
                StatusCode::CONFLICT
            }
            ConsoleError::Rebuild(RebuildError::Unknown(_) | RebuildError::NotBeside { .. }) => StatusCode::NOT_FOUND,
            ConsoleError::Control(ControlError::StillActive { .. })
            | ConsoleError::Rebuild(RebuildError::NotCaughtUp { .. }) => StatusCode::SERVICE_UNAVAILABLE,
            ConsoleError::Control(_) | ConsoleError::Rebuild(_) | ConsoleError::Store(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        if status.is_server_error() {
            tracing::warn!(error = %self, "console request failed");
        }
        // The request's mount path is not known here: no style sheet.
        let page = layout::bare("Console: refused", None, html! { h1 { "Refused" } p #error { (self.to_string()) } });
        (status, page).into_response()
    }
}
