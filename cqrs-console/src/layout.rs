//! The pages' shell: title, navigation, the style sheet (served at `{base}/console.css`, so an
//! app whose Content-Security-Policy forbids inline styles shows the console styled), the
//! refresh that keeps lists live.

use std::time::Duration;

use maud::{html, Markup, DOCTYPE};

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:0 1.5em 2em;color:#1d2330}\
nav{display:flex;gap:1.2em;padding:.8em 0;border-bottom:1px solid #d6dae3;margin-bottom:1em}\
nav a{text-decoration:none;color:#2f55c8}nav a.here{font-weight:600;color:#1d2330}\
table{border-collapse:collapse;width:100%;margin:.5em 0 1.5em}th,td{text-align:left;padding:.3em .6em;\
border-bottom:1px solid #eceef3;vertical-align:top}th{font-weight:600;background:#f6f7fa}\
form.inline{display:inline}button{font:inherit;padding:.1em .6em}.error{color:#b3261e}\
.muted{color:#6b7280}pre{background:#f6f7fa;padding:.6em;overflow:auto;max-width:100%}\
td.num{text-align:right;font-variant-numeric:tabular-nums}form.logout{margin-left:auto}\
td.d1{padding-left:2.1em}td.d2{padding-left:3.6em}td.d3{padding-left:5.1em}td.d4{padding-left:6.6em}\
td.d5{padding-left:8.1em}td.d6{padding-left:9.6em}td.d7{padding-left:11.1em}td.d8{padding-left:12.6em}";

/// `GET /console.css`.
pub(crate) async fn style() -> impl axum::response::IntoResponse {
    (
        [
            (axum::http::header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (axum::http::header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        STYLE,
    )
}

/// The deepest indentation the style sheet has (`td.d8`).
pub(crate) const MAX_DEPTH: usize = 8;

/// The sections of the navigation.
const SECTIONS: [(&str, &str); 4] =
    [("handlers", "Handlers"), ("processes", "Processes"), ("streams", "Streams"), ("rebuilds", "Rebuilds")];

/// A console page: `here` is the section it belongs to; `refresh` keeps it live (zero: no).
pub(crate) fn page(title: &str, base: &str, here: &str, refresh: Duration, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                @if !refresh.is_zero() { meta http-equiv="refresh" content=(refresh.as_secs().max(1)); }
                title { (title) }
                link rel="stylesheet" href={ (base) "/console.css" };
            }
            body data-console-section=(here) {
                nav {
                    @for (path, label) in SECTIONS {
                        a href={ (base) "/" (path) } class=[(path == here).then_some("here")] { (label) }
                    }
                    form.inline.logout method="post" action={ (base) "/logout" } {
                        button type="submit" { "Log out" }
                    }
                }
                (body)
            }
        }
    }
}

/// A page without navigation (login, errors); `base` for its style sheet, if known.
pub(crate) fn bare(title: &str, base: Option<&str>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { (title) }
                @if let Some(base) = base { link rel="stylesheet" href={ (base) "/console.css" }; }
            }
            body { (body) }
        }
    }
}
