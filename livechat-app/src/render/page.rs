//! The page frame every page shares, and the self-reloading notice page.

use maud::{html, Markup, DOCTYPE};

use super::assets::Assets;

/// The page frame. `view` names the live view the script joins (`room`, `lobby`, `dashboard`).
pub(super) fn layout(assets: &Assets, title: &str, view: &str, room: Option<(&str, &str)>, content: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) }
                link rel="stylesheet" href=(assets.style);
                script src=(assets.script) defer {}
            }
            body data-view=(view) data-live="connecting" data-room=[room.map(|r| r.0)] data-me=[room.map(|r| r.1)] {
                header.top {
                    a.brand href="/" { "Live chat" }
                    p #status role="status" { "Connecting…" }
                }
                (content)
            }
        }
    }
}

/// A plain page with one message that reloads itself after a few seconds (a 503 while the
/// read model is rebuilding or the store is unreachable).
pub fn notice_page(assets: &Assets, title: &str, text: &str) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta http-equiv="refresh" content="3";
                title { (title) }
                link rel="stylesheet" href=(assets.style);
            }
            body data-view="none" {
                main.lobby { h1 { (title) } p role="alert" { (text) } }
            }
        }
    }
}
