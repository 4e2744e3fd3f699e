//! [`AppError`]: the ways a request fails, each with its status, as axum's `error-handling`
//! example does it. Handlers return `Result<Response, AppError>` and write `?`; a 4xx says why
//! in its text, an internal error is a plain 500 whose details go to the log only.

use std::sync::LazyLock;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};

use crate::render::{self, Assets};
use crate::rooms::RoomError;

/// Why a request failed. The text of every variant but [`AppError::Internal`] is sent, with
/// a line break, as the body.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// 400: the request is malformed; the text says how.
    #[error("{0}")]
    BadRequest(String),
    /// 403: refused from where it came (another origin, no admin access); the text says why.
    #[error("{0}")]
    Forbidden(&'static str),
    /// 404: the text names what does not exist.
    #[error("{0}")]
    NotFound(String),
    /// 421: a `Host` this server does not answer to (DNS rebinding).
    #[error("unknown host: this server answers only to its own names")]
    UnknownHost,
    /// 429: a limit was reached; the text says which.
    #[error("{0}")]
    Limited(String),
    /// 503 in plain text: the store cannot answer now; the text says what failed.
    #[error("{0}")]
    Unavailable(String),
    /// 503 as a page that reloads itself, with `Retry-After: 1`: a room cannot be read now
    /// (the read model is rebuilding, the store is unreachable or slow).
    #[error(transparent)]
    Room(#[from] RoomError),
    /// 500: a failure the client can do nothing about. Logged with its details; the response
    /// says only "internal server error".
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl AppError {
    /// The status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::UnknownHost => StatusCode::MISDIRECTED_REQUEST,
            Self::Limited(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) | Self::Room(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// The assets the notice page links (the same URLs as every `AppState`'s: they depend only
/// on the files compiled in).
static ASSETS: LazyLock<Assets> = LazyLock::new(Assets::new);

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status = self.status();
        match self {
            Self::Room(error) => {
                let markup = render::notice_page(&ASSETS, "Try again in a moment", &error.to_string());
                let mut response = (status, Html(markup.into_string())).into_response();
                response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                response
            }
            Self::Internal(error) => {
                tracing::error!(error = format!("{error:#}"), "internal error answering a request");
                (status, "internal server error\n").into_response()
            }
            other => (status, format!("{other}\n")).into_response(),
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::body::to_bytes;

    use super::*;

    async fn answer(error: AppError) -> (StatusCode, Option<HeaderValue>, String) {
        let response = error.into_response();
        let retry = response.headers().get(header::RETRY_AFTER).cloned();
        let status = response.status();
        let body = to_bytes(response.into_body(), 1 << 20).await.unwrap_or_default();
        (status, retry, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn a_client_error_says_why() {
        let (status, _, body) = answer(AppError::NotFound("no such room: x".into())).await;
        assert_eq!((status, body.as_str()), (StatusCode::NOT_FOUND, "no such room: x\n"));
        let (status, _, body) = answer(AppError::UnknownHost).await;
        assert_eq!(status, StatusCode::MISDIRECTED_REQUEST);
        assert!(body.starts_with("unknown host"), "{body}");
    }

    #[tokio::test]
    async fn an_internal_error_is_a_plain_500_without_its_details() {
        let error = anyhow::anyhow!("password=hunter2 at /srv/secret");
        let (status, _, body) = answer(AppError::Internal(error)).await;
        assert_eq!((status, body.as_str()), (StatusCode::INTERNAL_SERVER_ERROR, "internal server error\n"));
    }

    #[tokio::test]
    async fn an_unreadable_room_is_a_page_that_asks_to_retry() {
        let (status, retry, body) = answer(AppError::Room(RoomError::Rebuilding)).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(retry, Some(HeaderValue::from_static("1")));
        assert!(body.contains("rebuilding its read model") && body.contains("http-equiv=\"refresh\""), "{body}");
    }
}
