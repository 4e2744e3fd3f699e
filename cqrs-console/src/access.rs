//! Who may use the console: [`Access`] (a bearer token, the application's own rule, or nobody),
//! checked by [`require`] before every route but the login form; and [`Base`], the path the
//! console is mounted at, for its links.

use std::sync::Arc;

use axum::extract::{Form, FromRequestParts, OriginalUri, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use maud::html;
use serde::Deserialize;

use crate::error::ConsoleError;
use crate::layout;
use crate::Console;

/// The cookie the login form sets: the token, hex-encoded.
const COOKIE: &str = "cqrs_console";

/// The application's own rule: the operator a request is admitted as, or `None`.
type Rule = Arc<dyn Fn(&Parts) -> Option<Grant> + Send + Sync>;

/// Who may use the console. Nobody by default.
#[derive(Clone, Default)]
pub struct Access {
    token: Option<String>,
    rule: Option<Rule>,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("token", &self.token.as_ref().map(|_| "…"))
            .field("rule", &self.rule.is_some())
            .finish()
    }
}

/// A request the console admits: as whom (shown in pauses and logs), and whether its forms
/// must carry this host's `Origin` (true unless the request proved itself with a header a
/// browser never sends on its own).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The operator's name.
    pub operator: String,
    /// Forms must carry an `Origin` naming this host.
    pub needs_origin: bool,
}

impl Access {
    /// Nobody may use the console.
    pub fn deny_all() -> Self {
        Self::default()
    }

    /// Requests with `Authorization: Bearer {token}`, or with the cookie the login form sets
    /// after the token was typed in. An empty token admits nobody.
    pub fn bearer(token: impl Into<String>) -> Self {
        Self { token: Some(token.into()).filter(|token| !token.is_empty()), rule: None }
    }

    /// Requests the application's `rule` admits (for example: on an internal listener), besides
    /// the token if one is set. Forms of requests admitted by the rule need this host's
    /// `Origin` whatever the grant says, unless the rule looked at something a browser cannot
    /// be made to send; set [`Grant::needs_origin`] accordingly.
    #[must_use]
    pub fn or(mut self, rule: impl Fn(&Parts) -> Option<Grant> + Send + Sync + 'static) -> Self {
        self.rule = Some(Arc::new(rule));
        self
    }

    /// Only the application's `rule`.
    pub fn custom(rule: impl Fn(&Parts) -> Option<Grant> + Send + Sync + 'static) -> Self {
        Self::deny_all().or(rule)
    }

    /// Whether a login form makes sense (a token is set).
    fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// The grant of a request, if any.
    fn grant(&self, parts: &Parts) -> Option<Grant> {
        if let Some(token) = &self.token {
            let bearer = parts
                .headers
                .get(header::AUTHORIZATION)
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.strip_prefix("Bearer "));
            if bearer.is_some_and(|presented| same(presented.as_bytes(), token.as_bytes())) {
                return Some(Grant { operator: "token".to_owned(), needs_origin: false });
            }
            if cookie(&parts.headers).is_some_and(|presented| same(presented.as_bytes(), hex(token).as_bytes())) {
                return Some(Grant { operator: "token (browser)".to_owned(), needs_origin: true });
            }
        }
        self.rule.as_ref().and_then(|rule| rule(parts))
    }
}

/// The operator of an admitted request (a request extension set by [`require`]).
#[derive(Debug, Clone)]
pub(crate) struct Operator(pub(crate) String);

impl<S: Send + Sync> FromRequestParts<S> for Operator {
    type Rejection = ConsoleError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Operator>().cloned().ok_or(ConsoleError::Forbidden("no operator"))
    }
}

/// The path the console is mounted at (`/ops`), empty at the root: links are `{base}/handlers`.
#[derive(Debug, Clone)]
pub(crate) struct Base(pub(crate) String);

impl<S: Send + Sync> FromRequestParts<S> for Base {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let inner = parts.uri.path();
        let full = parts.extensions.get::<OriginalUri>().map_or(inner, |original| original.0.path());
        // Nested at `/ops`, the console's `/` answers `/ops` itself.
        let base = if inner == "/" { full } else { full.strip_suffix(inner).unwrap_or("") };
        let base = base.trim_end_matches('/');
        Ok(Self(base.to_owned()))
    }
}

/// Admits the request (recording its [`Operator`]) or refuses it: 401 with the login form when
/// a token is set, 403 otherwise, and 403 for a form without this host's `Origin` when the
/// grant needs one.
pub(crate) async fn require(State(console): State<Arc<Console>>, request: Request, next: Next) -> Response {
    let (mut parts, body) = request.into_parts();
    let access = &console.config.access;
    let Some(grant) = access.grant(&parts) else {
        if access.has_token() {
            let base = Base::from_request_parts(&mut parts, &()).await.unwrap_or_else(|never| match never {});
            let mut response = (StatusCode::UNAUTHORIZED, login_page(&base.0, None)).into_response();
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return response;
        }
        return ConsoleError::Forbidden("this console admits nobody here").into_response();
    };
    if parts.method != Method::GET && parts.method != Method::HEAD && grant.needs_origin && !same_origin(&parts.headers)
    {
        return ConsoleError::Forbidden("a form from another origin, or without an Origin header, is refused")
            .into_response();
    }
    parts.extensions.insert(Operator(grant.operator));
    next.run(Request::from_parts(parts, body)).await
}

/// Whether `Origin` names the host the request was sent to (`Host`, or `X-Forwarded-Host`
/// behind a proxy).
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|value| value.to_str().ok()) else {
        return false;
    };
    let Some(origin_host) = origin.split_once("://").map(|(_, host)| host.trim_end_matches('/')) else {
        return false;
    };
    ["x-forwarded-host", "host"]
        .iter()
        .filter_map(|name| headers.get(*name).and_then(|value| value.to_str().ok()))
        .any(|host| host.eq_ignore_ascii_case(origin_host))
}

/// The login form's field.
#[derive(Debug, Deserialize)]
pub(crate) struct Login {
    token: String,
}

/// `GET /login`.
pub(crate) async fn login_form(State(console): State<Arc<Console>>, base: Base) -> Response {
    if !console.config.access.has_token() {
        return ConsoleError::NotFound("this console has no login: the application admits its operators")
            .into_response();
    }
    login_page(&base.0, None).into_response()
}

/// `POST /login`: sets the cookie when the token matches.
pub(crate) async fn login(State(console): State<Arc<Console>>, base: Base, Form(login): Form<Login>) -> Response {
    let Some(token) = &console.config.access.token else {
        return ConsoleError::NotFound("this console has no login").into_response();
    };
    if !same(login.token.as_bytes(), token.as_bytes()) {
        tracing::warn!("console login with a wrong token");
        return (StatusCode::UNAUTHORIZED, login_page(&base.0, Some("That is not the token."))).into_response();
    }
    let path = if base.0.is_empty() { "/".to_owned() } else { base.0.clone() };
    let cookie = format!("{COOKIE}={}; Path={path}; HttpOnly; SameSite=Strict", hex(token));
    let mut response = Redirect::to(&format!("{}/handlers", base.0)).into_response();
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

/// `POST /logout`: clears the cookie.
pub(crate) async fn logout(base: Base) -> Response {
    let path = if base.0.is_empty() { "/".to_owned() } else { base.0.clone() };
    let mut response = Redirect::to(&format!("{}/login", base.0)).into_response();
    if let Ok(value) = HeaderValue::from_str(&format!("{COOKIE}=; Path={path}; Max-Age=0; HttpOnly; SameSite=Strict")) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

fn login_page(base: &str, error: Option<&str>) -> maud::Markup {
    layout::bare(
        "Console login",
        Some(base),
        html! {
            h1 { "Console" }
            @if let Some(error) = error { p.error #login-error { (error) } }
            form #login method="post" action={ (base) "/login" } {
                label { "Token " input type="password" name="token" autocomplete="current-password" autofocus; }
                " " button type="submit" { "Log in" }
            }
        },
    )
}

/// The console cookie's value, if sent.
fn cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .find_map(|pair| pair.trim().strip_prefix(COOKIE).and_then(|rest| rest.strip_prefix('=')))
}

fn hex(text: &str) -> String {
    text.bytes().map(|byte| format!("{byte:02x}")).collect()
}

/// Compares without stopping at the first difference (no timing hint about the token).
fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(headers: &[(&str, &str)]) -> Parts {
        let mut request = axum::http::Request::builder().uri("/handlers");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.body(()).expect("request").into_parts().0
    }

    #[test]
    fn the_token_admits_by_header_or_cookie_and_nothing_else_does() {
        let access = Access::bearer("s3cret");
        assert_eq!(access.grant(&parts(&[("authorization", "Bearer s3cret")])).map(|g| g.needs_origin), Some(false));
        assert_eq!(
            access.grant(&parts(&[("cookie", "a=1; cqrs_console=733363726574")])).map(|g| g.needs_origin),
            Some(true)
        );
        assert_eq!(access.grant(&parts(&[("authorization", "Bearer s3cre")])), None);
        assert_eq!(access.grant(&parts(&[("cookie", "cqrs_console=s3cret")])), None);
        assert_eq!(access.grant(&parts(&[])), None);
        assert_eq!(Access::deny_all().grant(&parts(&[("authorization", "Bearer ")])), None);
        assert_eq!(
            Access::bearer("").grant(&parts(&[("authorization", "Bearer ")])),
            None,
            "an empty token admits nobody"
        );
    }

    #[test]
    fn a_form_needs_the_origin_of_its_own_host() {
        let headers = |pairs: &[(&str, &str)]| parts(pairs).headers;
        assert!(same_origin(&headers(&[("origin", "http://chat.example:8080"), ("host", "chat.example:8080")])));
        assert!(same_origin(&headers(&[
            ("origin", "https://chat.example"),
            ("host", "127.0.0.1:3000"),
            ("x-forwarded-host", "chat.example")
        ])));
        assert!(!same_origin(&headers(&[("origin", "https://evil.example"), ("host", "chat.example")])));
        assert!(!same_origin(&headers(&[("host", "chat.example")])), "no Origin: refused");
        assert!(!same_origin(&headers(&[("origin", "null"), ("host", "chat.example")])));
    }
}
