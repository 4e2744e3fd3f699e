//! Search: the form (in each room and on the lobby), the results page, and one result.

use maud::{html, Markup};

use super::assets::Assets;
use super::format::utc;
use super::page::layout;
use crate::domain::ChatId;
use crate::search::{Hit, MATCH_END, MATCH_START, MAX_QUERY_CHARS};

/// `form#search`: a GET form to `/search` (with the room, when in one); the page's script
/// also shows its results as one types.
pub fn search_form(room: Option<&ChatId>, query: &str) -> Markup {
    html! {
        form #search method="get" action="/search" role="search" {
            label {
                @if let Some(room) = room { "Search #" (room) " " } @else { "Search every room " }
                input type="search" name="q" value=(query) maxlength=(MAX_QUERY_CHARS) required
                    autocomplete="off" placeholder="Words to find";
            }
            @if let Some(room) = room { input type="hidden" name="room" value=(room); }
            button type="submit" { "Search" }
        }
    }
}

/// A snippet with its matched words in `<mark>` (everything else escaped as text).
fn snippet(text: &str) -> Markup {
    html! {
        @for (index, part) in text.split(MATCH_START).enumerate() {
            @if index == 0 {
                (part)
            } @else {
                @let (matched, rest) = part.split_once(MATCH_END).unwrap_or((part, ""));
                mark { (matched) } (rest)
            }
        }
    }
}

/// The link that opens `hit`'s room at its message: the page of messages up to it, the
/// message as the page's target (highlighted).
pub fn result_href(hit: &Hit) -> String {
    format!("/{}?before={}&v={}#m-{}", hit.room, hit.position.0 + 1, hit.version + 1, hit.position.0)
}

/// The results (or what went wrong): `ol#search-results`, one `li` per message with
/// `data-search-result`, `data-room` and `data-version`.
pub fn search_results(hits: &[Hit], error: Option<&str>, searched: bool) -> Markup {
    html! {
        div #search-results-region {
            @if let Some(error) = error {
                p.error role="alert" { (error) }
            } @else if searched && hits.is_empty() {
                p.empty { "No message matches." }
            }
            ol #search-results {
                @for hit in hits {
                    @let (date, time) = utc(hit.sent_at.0);
                    li data-search-result="" data-room=(hit.room) data-version=(hit.version) {
                        a href=(result_href(hit)) {
                            span.room { "#" (hit.room) } " "
                            b.sender dir="auto" { (hit.sender) } " "
                            time datetime={ (date) "T" (time) "Z" } { (date) " " (time[..5]) }
                        }
                        p.body dir="auto" { (snippet(&hit.snippet)) }
                    }
                }
            }
        }
    }
}

/// `/search`: the form and the results, newest first.
pub fn search_page(assets: &Assets, room: Option<&ChatId>, query: &str, results: &Markup) -> Markup {
    let content = html! {
        main.search {
            h1 { @if let Some(room) = room { "Search #" (room) } @else { "Search" } }
            (search_form(room, query))
            (results)
            @if let Some(room) = room { p { a href={ "/" (room) } { "Back to #" (room) } } }
        }
    };
    layout(assets, "Search · Live chat", "none", None, content)
}

#[cfg(test)]
mod tests {
    use cqrs_core::{Position, Timestamp};

    use super::*;

    #[test]
    fn results_carry_their_room_and_version_and_escape_the_text() {
        let hit = Hit {
            room: ChatId::parse("lounge").expect("room"),
            version: 7,
            position: Position(42),
            sender: "<b>bob</b>".into(),
            sent_at: Timestamp(0),
            snippet: "pizza \u{2}<script>\u{3} tonight \u{2}party\u{3}".into(),
        };
        let html = search_results(std::slice::from_ref(&hit), None, true).into_string();
        assert!(html.contains("data-search-result=\"\" data-room=\"lounge\" data-version=\"7\""), "{html}");
        assert!(html.contains("<mark>&lt;script&gt;</mark> tonight <mark>party</mark>"), "{html}");
        assert!(html.contains("&lt;b&gt;bob&lt;/b&gt;"), "{html}");
        assert!(html.contains("href=\"/lounge?before=43&amp;v=8#m-42\""), "{html}");
        assert!(search_results(&[], None, true).into_string().contains("No message matches."));
    }
}
