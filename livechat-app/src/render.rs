//! HTML, rendered on the server with maud. One function per fragment, used by both the first
//! render of a page and the live updates, so the two cannot drift. maud escapes every
//! interpolated string, so user text always shows as text; links are made only from
//! `http://` and `https://` URLs.

use maud::{html, Markup, PreEscaped, DOCTYPE};

use crate::charts;
use crate::domain::{mention_at, MAX_CHAT_ID_LEN, MAX_CONTENT_LEN, MAX_SENDER_LEN};
use crate::metrics::{History, Snapshot};
use crate::rooms::{Body, MessageData, RoomSummary};

/// Where the client script and stylesheet are served, with a content hash for caching.
pub struct Assets {
    /// URL of `live.js`.
    pub script: String,
    /// URL of `app.css`.
    pub style: String,
}

/// The hand-written client script.
pub const LIVE_JS: &str = include_str!("../assets/live.js");
/// The stylesheet.
pub const APP_CSS: &str = include_str!("../assets/app.css");

impl Assets {
    /// URLs carrying a hash of each file, so browsers may cache them forever.
    pub fn new() -> Self {
        Self {
            script: format!("/assets/live.js?v={:016x}", fnv1a(LIVE_JS.as_bytes())),
            style: format!("/assets/app.css?v={:016x}", fnv1a(APP_CSS.as_bytes())),
        }
    }
}

impl Default for Assets {
    fn default() -> Self {
        Self::new()
    }
}

/// FNV-1a, 64 bits: a stable content hash for cache busting (not for security).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// The page frame. `view` names the live view the script joins (`room`, `lobby`, `dashboard`).
fn layout(assets: &Assets, title: &str, view: &str, room: Option<(&str, &str)>, content: Markup) -> Markup {
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

/// `/`: the join form and the live list of active rooms.
pub fn lobby_page(assets: &Assets, name: Option<&str>, room: &str, error: Option<&str>, rooms: &Markup) -> Markup {
    let content = html! {
        main.lobby {
            h1 { "Join a room" }
            (join_form(name, room, error))
            section aria-labelledby="rooms-title" {
                h2 #rooms-title { "Active rooms" }
                div #rooms { (rooms) }
            }
        }
    };
    layout(assets, "Live chat", "lobby", None, content)
}

/// `form#join`: a name and a room; posts to `/join`.
pub fn join_form(name: Option<&str>, room: &str, error: Option<&str>) -> Markup {
    html! {
        form #join method="post" action="/join" {
            label { "Your name "
                input name="name" required maxlength=(MAX_SENDER_LEN) autocomplete="nickname" value=[name];
            }
            label { "Room "
                input name="room" required maxlength=(MAX_CHAT_ID_LEN) pattern="[A-Za-z0-9_\\-]+" value=(room);
            }
            button type="submit" { "Join" }
            @if let Some(error) = error {
                p.error role="alert" { (error) }
            }
        }
    }
}

/// The list of active rooms with their message counts and viewers.
pub fn room_list(rooms: &[RoomSummary]) -> Markup {
    html! {
        @if rooms.is_empty() {
            p.empty { "No rooms yet: name one above to start it." }
        } @else {
            ul.rooms {
                @for room in rooms {
                    li data-room=(room.id) {
                        a href={ "/" (room.id) } { "#" (room.id) }
                        " "
                        span.count { (room.messages) @if room.messages == 1 { " message" } @else { " messages" } }
                        @if room.viewers > 0 {
                            " · " span.viewers { (room.viewers) " here" }
                        }
                    }
                }
            }
        }
    }
}

/// A room page that asks for a name first.
pub fn name_page(assets: &Assets, room: &crate::domain::ChatId, error: Option<&str>) -> Markup {
    let content = html! {
        main.lobby {
            h1 { "Join #" (room) }
            (join_form(None, room.as_str(), error))
        }
    };
    layout(assets, "Choose a name", "none", None, content)
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

/// The first render of a room: the latest messages, presence and the composer.
pub struct RoomPage<'a> {
    /// The room.
    pub room: &'a crate::domain::ChatId,
    /// The reader's name.
    pub me: &'a str,
    /// The messages' HTML, oldest first (the reader's own with their controls).
    pub messages: &'a [String],
    /// Position and version of the first message shown, and the last position.
    pub first: (u64, u64),
    /// Position of the last message shown.
    pub last: u64,
    /// Whether older messages exist.
    pub has_more: bool,
    /// The presence list's HTML.
    pub presence: &'a str,
    /// How many people are here.
    pub presence_count: usize,
    /// The command id of the no-JavaScript form: fresh, or the one of a message whose outcome
    /// is unknown (so sending again posts it once).
    pub command_id: uuid::Uuid,
    /// Text to put back in the composer (after a refusal or an unknown outcome).
    pub draft: &'a str,
    /// An error or notice to show beside the composer (no-JavaScript path).
    pub error: Option<&'a str>,
}

/// `/{chat_id}`.
pub fn room_page(assets: &Assets, page: &RoomPage<'_>) -> Markup {
    let (first, first_version) = page.first;
    let content = html! {
        main.room {
            h1 { "#" (page.room) }
            section.log aria-label="Messages" {
                p #older {
                    @if page.has_more {
                        a href={ "/" (page.room) "?before=" (first) "&v=" (first_version) } { "Older messages" }
                    }
                }
                ol #messages role="log" aria-live="polite" data-has-more=(page.has_more) data-first-pos=(first)
                    data-first-version=(first_version) data-last-pos=(page.last) {
                    @for message in page.messages { (PreEscaped(message)) }
                }
                p #typing .typing data-typing="" aria-live="polite" {}
            }
            aside.presence aria-labelledby="presence-title" {
                h2 #presence-title { "Here now " span #presence-count .count { (page.presence_count) } }
                div #presence { (PreEscaped(page.presence)) }
            }
            form #send method="post" action={ "/" (page.room) "/send" } {
                label for="message" { "Message as " b dir="auto" { (page.me) } }
                textarea #message name="message" rows="2" maxlength=(MAX_CONTENT_LEN) required autofocus
                    placeholder="Write a message. Enter sends, Shift-Enter adds a line." { (page.draft) }
                input type="hidden" name="id" value=(page.command_id);
                button type="submit" { "Send" }
                p #composer-error role="alert" { @if let Some(error) = page.error { (error) } }
            }
        }
    };
    layout(assets, &format!("#{} · Live chat", page.room), "room", Some((page.room.as_str(), page.me)), content)
}

/// The `rel` of every link made from a message.
pub const LINK_REL: &str = "noopener noreferrer nofollow ugc";

/// One message, as it appears in the log: sender, time and content (or "message deleted").
/// `mine` adds the edit and delete controls of the reader's own message.
pub fn message(message: &MessageData, mine: bool) -> Markup {
    let (date, time) = utc(message.sent_at.0);
    let position = message.sent.position.0;
    let (edited, deleted) = match &message.body {
        Body::Text { edited, .. } => (*edited, false),
        Body::Deleted => (false, true),
    };
    html! {
        li.msg.deleted[deleted] id={ "m-" (position) } data-pos=(position) data-version=(message.sent.version)
            data-rev=(message.revision.version) data-sender=(message.sender)
            data-edited=[edited.then_some("")] data-deleted=[deleted.then_some("")] {
            b.sender dir="auto" { (message.sender) }
            " "
            time datetime={ (date) "T" (time) "Z" } { (time[..5]) }
            @match &message.body {
                Body::Text { content, mentions, edited } => {
                    p.body dir="auto" { (text_with_links(content, mentions)) }
                    @if *edited { " " span.edited title="edited" { "(edited)" } }
                    @if mine {
                        " "
                        span.actions {
                            button type="button" data-action="edit" { "Edit" }
                            " "
                            button type="button" data-action="delete" { "Delete" }
                        }
                    }
                }
                Body::Deleted => { p.body.tombstone { em { "message deleted" } } }
            }
        }
    }
}

/// A piece of a message's text.
#[derive(Debug, PartialEq, Eq)]
enum Piece<'a> {
    Text(&'a str),
    Link(&'a str),
    Mention(&'a str),
}

/// Splits `text` into plain text, `http(s)://` links and `@name` mentions of `mentions`.
fn pieces<'a>(text: &'a str, mentions: &[String]) -> Vec<Piece<'a>> {
    let mut out = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let link = find_link(rest);
        let mention = mentions
            .iter()
            .filter_map(|name| mention_at(rest, name).map(|at| (at, name.as_str())))
            .min_by_key(|(at, name)| (*at, std::cmp::Reverse(name.len())));
        match (link, mention) {
            (Some((start, end)), mention) if mention.is_none_or(|(at, _)| start <= at) => {
                out.push(Piece::Text(&rest[..start]));
                out.push(Piece::Link(&rest[start..end]));
                rest = &rest[end..];
            }
            (_, Some((at, name))) => {
                out.push(Piece::Text(&rest[..at]));
                out.push(Piece::Mention(&rest[at..at + 1 + name.len()]));
                rest = &rest[at + 1 + name.len()..];
            }
            _ => {
                out.push(Piece::Text(rest));
                break;
            }
        }
    }
    out.retain(|piece| *piece != Piece::Text(""));
    out
}

/// The first `http://` or `https://` URL in `text` (scheme case-insensitive, at a word start),
/// as a byte range; trailing punctuation stays text.
fn find_link(text: &str) -> Option<(usize, usize)> {
    let lower = text.to_ascii_lowercase();
    let mut from = 0;
    while let Some(found) = lower[from..].find("http") {
        let start = from + found;
        let scheme_end = if lower[start..].starts_with("https://") {
            start + 8
        } else if lower[start..].starts_with("http://") {
            start + 7
        } else {
            from = start + 4;
            continue;
        };
        let at_word_start = text[..start].chars().next_back().is_none_or(|c| !c.is_alphanumeric());
        let end = text[scheme_end..]
            .find(|c: char| c.is_whitespace() || c.is_control() || matches!(c, '<' | '>' | '"' | '`'))
            .map_or(text.len(), |i| scheme_end + i);
        let mut end = end;
        while end > scheme_end {
            let last = text[..end].chars().next_back().unwrap_or(' ');
            let unbalanced_paren =
                last == ')' && text[start..end].matches('(').count() < text[start..end].matches(')').count();
            if matches!(last, '.' | ',' | ';' | ':' | '!' | '?' | '\'' | ']' | '}') || unbalanced_paren {
                end -= last.len_utf8();
            } else {
                break;
            }
        }
        if at_word_start && end > scheme_end {
            return Some((start, end));
        }
        from = scheme_end;
    }
    None
}

/// A message's text with its links and mentions marked up (everything escaped by maud).
pub fn text_with_links(text: &str, mentions: &[String]) -> Markup {
    html! {
        @for piece in pieces(text, mentions) {
            @match piece {
                Piece::Text(text) => (text),
                Piece::Link(url) => a href=(url) rel=(LINK_REL) target="_blank" { (url) },
                Piece::Mention(shown) => span.mention data-name=(&shown[1..]) { (shown) },
            }
        }
    }
}

/// The people in a room now: the first names, sorted; `total` people in all.
pub fn presence(names: &[&str], total: usize) -> Markup {
    html! {
        @if names.is_empty() {
            p.empty { "Nobody" }
        } @else {
            ul.people {
                @for name in names { li data-name=(name) dir="auto" { (name) } }
            }
            @if total > names.len() { p.more { "and others" } }
        }
    }
}

/// `/dashboard`.
pub fn dashboard_page(assets: &Assets, metrics: &Markup) -> Markup {
    let content = html! {
        main.dashboard {
            h1 { "Dashboard" }
            div #metrics { (metrics) }
        }
    };
    layout(assets, "Dashboard · Live chat", "dashboard", None, content)
}

/// `/admin/parked`: every handler's parked events, with retry and discard forms (plain HTML
/// forms: no script). Each event is a row `tr[data-parked=POSITION][data-status]` inside
/// `section[data-handler=NAME]`.
pub fn parked_page(assets: &Assets, handlers: &[(String, Vec<cqrs_core::ParkedEvent>)]) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { "Parked events · Live chat" }
                link rel="stylesheet" href=(assets.style);
            }
            body data-view="admin" {
                header.top { a.brand href="/" { "Live chat" } a href="/dashboard" { "Dashboard" } }
                main.dashboard {
                    h1 { "Parked events" }
                    p {
                        "An event a handler failed on too often is parked: kept with its error while the handler "
                        "goes on (later events of the same room wait behind it, in order). Retry asks the running "
                        "handler for another attempt; discard drops it for good."
                    }
                    @for (handler, events) in handlers {
                        section data-handler=(handler) data-count=(events.len()) {
                            h2 { (handler) " · " (events.len()) " parked" }
                            @if events.is_empty() {
                                p { "None." }
                            } @else {
                                form method="post" action="/admin/parked/retry" {
                                    input type="hidden" name="handler" value=(handler);
                                    input type="hidden" name="all" value="1";
                                    button type="submit" { "Retry all" }
                                }
                                table.parked {
                                    thead { tr { th { "Position" } th { "Room" } th { "Event" } th { "Attempts" } th { "Error" } th { "Parked at (UTC)" } th { "Status" } th {} } }
                                    tbody {
                                        @for event in events {
                                            @let (day, time) = utc(event.parked_at.0);
                                            tr data-parked=(event.position.0) data-status=(event.status.as_str()) {
                                                td { (event.position.0) }
                                                td { (event.stream_id) }
                                                td { (event.event_type) }
                                                td { (event.attempts) }
                                                td { (event.error) }
                                                td { (day) " " (time) }
                                                td { (event.status.as_str()) }
                                                td {
                                                    form method="post" action="/admin/parked/retry" {
                                                        input type="hidden" name="handler" value=(handler);
                                                        input type="hidden" name="position" value=(event.position.0);
                                                        button type="submit" { "Retry" }
                                                    }
                                                    form method="post" action="/admin/parked/discard" {
                                                        input type="hidden" name="handler" value=(handler);
                                                        input type="hidden" name="position" value=(event.position.0);
                                                        button type="submit" { "Discard" }
                                                    }
                                                }
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// A handler's state as the dashboard lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerLine {
    /// The handler.
    pub name: String,
    /// Its state, in words.
    pub state: String,
    /// The position it reached.
    pub position: u64,
    /// Its events parked (known to this process's runner).
    pub parked: u64,
}

/// The dashboard's region: the numbers, the charts of the last 15 minutes, the handlers.
pub fn metrics(snapshot: &Snapshot, history: &History, handlers: &[HandlerLine]) -> Markup {
    let rows: [(&str, String); 12] = [
        ("Connected views", snapshot.views.to_string()),
        ("Rooms", snapshot.rooms.to_string()),
        ("Commands per second", format!("{:.1}", snapshot.commands_per_second)),
        ("Commands accepted / refused", format!("{} / {}", snapshot.commands_ok, snapshot.commands_refused)),
        ("Dispatch latency p50", micros(snapshot.dispatch_p50_micros)),
        ("Dispatch latency p99", micros(snapshot.dispatch_p99_micros)),
        ("Events stored", snapshot.store_head.to_string()),
        ("Events projected", snapshot.projected.to_string()),
        ("Projection lag (events)", snapshot.projection_lag.to_string()),
        ("Frames sent", snapshot.frames_sent.to_string()),
        ("Bytes sent", snapshot.bytes_sent.to_string()),
        ("Resyncs of lagging views", snapshot.resyncs.to_string()),
    ];
    html! {
        table {
            tbody {
                @for (name, value) in &rows {
                    tr { th scope="row" { (name) } td { (value) } }
                }
            }
        }
        section #charts aria-label="The last 15 minutes" {
            @for chart in charts::dashboard_charts(history) { (chart) }
        }
        table #handlers {
            thead { tr { th { "Handler" } th { "State" } th { "Position" } th { "Parked" } } }
            tbody {
                @for handler in handlers {
                    tr data-handler=(handler.name) data-parked=(handler.parked) {
                        td { (handler.name) } td { (handler.state) } td { (handler.position) }
                        td { @if handler.parked > 0 { a href="/admin/parked" { (handler.parked) } } @else { "0" } }
                    }
                }
            }
        }
        p { a href="/admin/parked" { "Parked events" } " (this machine, or with the admin token)" }
    }
}

/// A duration in µs as text.
pub fn micros(value: u64) -> String {
    if value >= 10_000 {
        format!("{:.1} ms", value as f64 / 1000.0)
    } else {
        format!("{value} µs")
    }
}

/// `(YYYY-MM-DD, HH:MM:SS)` in UTC of microseconds since the Unix epoch.
pub fn utc(micros: i64) -> (String, String) {
    let seconds = micros.div_euclid(1_000_000);
    let (days, secs_of_day) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (
        format!("{year:04}-{month:02}-{day:02}"),
        format!("{:02}:{:02}:{:02}", secs_of_day / 3600, secs_of_day % 3600 / 60, secs_of_day % 60),
    )
}

#[cfg(test)]
mod tests {
    use cqrs_core::{Position, Timestamp};

    use super::*;
    use crate::rooms::Revision;

    fn data(sender: &str, content: &str) -> MessageData {
        let at = Revision { version: 3, position: Position(42) };
        MessageData {
            sent: at,
            number: 1,
            sender: sender.into(),
            sent_at: Timestamp(1_764_216_000_123_456),
            body: Body::Text { content: content.into(), mentions: vec![], edited: false },
            revision: at,
        }
    }

    #[test]
    fn message_shows_sender_time_and_content() {
        let html = message(&data("alice", "hello"), false).into_string();
        assert_eq!(
            html,
            "<li class=\"msg\" id=\"m-42\" data-pos=\"42\" data-version=\"3\" data-rev=\"3\" data-sender=\"alice\">\
             <b class=\"sender\" dir=\"auto\">alice</b> <time datetime=\"2025-11-27T04:00:00Z\">04:00</time>\
             <p class=\"body\" dir=\"auto\">hello</p></li>"
        );
        let mine = message(&data("alice", "hello"), true).into_string();
        assert!(mine.contains("data-action=\"edit\"") && mine.contains("data-action=\"delete\""), "{mine}");
    }

    #[test]
    fn edited_and_deleted_messages() {
        let mut edited = data("alice", "better");
        edited.body = Body::Text { content: "better".into(), mentions: vec![], edited: true };
        let html = message(&edited, true).into_string();
        assert!(html.contains("data-edited") && html.contains("(edited)"), "{html}");
        let mut deleted = data("alice", "secret");
        deleted.body = Body::Deleted;
        let html = message(&deleted, true).into_string();
        assert!(html.contains("message deleted") && html.contains("data-deleted"), "{html}");
        assert!(!html.contains("data-action"), "no controls on a deleted message: {html}");
    }

    #[test]
    fn user_text_is_escaped_everywhere() {
        let html =
            message(&data("<img src=x onerror=alert(1)>", "<script>alert('x')</script> & \"q\""), false).into_string();
        assert!(!html.contains("<script"), "{html}");
        assert!(!html.contains("<img"), "{html}");
        assert!(html.contains("&lt;script&gt;alert('x')&lt;/script&gt; &amp; &quot;q&quot;"), "{html}");
        assert!(html.contains("data-sender=\"&lt;img src=x onerror=alert(1)&gt;\""), "{html}");
        let presence = presence(&["<b>x</b>"], 1).into_string();
        assert!(presence.contains("&lt;b&gt;x&lt;/b&gt;"), "{presence}");
    }

    #[test]
    fn only_http_and_https_urls_become_links() {
        let html =
            text_with_links("see https://example.com/a?b=1&c=2. and HTTP://x.test/(y) or http://", &[]).into_string();
        assert_eq!(
            html,
            "see <a href=\"https://example.com/a?b=1&amp;c=2\" rel=\"noopener noreferrer nofollow ugc\" \
             target=\"_blank\">https://example.com/a?b=1&amp;c=2</a>. and <a href=\"HTTP://x.test/(y)\" \
             rel=\"noopener noreferrer nofollow ugc\" target=\"_blank\">HTTP://x.test/(y)</a> or http://"
        );
        for text in
            ["javascript:alert(1)", "data:text/html,<b>x</b>", "JaVaScRiPt:alert(1)", "vbscript:x", "xhttp://evil.test"]
        {
            let html = text_with_links(text, &[]).into_string();
            assert!(!html.contains("<a "), "{html}");
        }
        let markup = text_with_links("<a href=\"javascript:x\">", &[]).into_string();
        assert_eq!(markup, "&lt;a href=&quot;javascript:x&quot;&gt;");
        let quoted = text_with_links("http://a.test/\"onmouseover=alert(1)", &[]).into_string();
        assert!(quoted.starts_with("<a href=\"http://a.test/\" "), "{quoted}");
    }

    #[test]
    fn mentions_of_known_names_are_marked() {
        let mentions = vec!["ann marie".to_owned(), "bob".to_owned()];
        let html = text_with_links("hi @ann marie and @bob, not @bobby or me@bob", &mentions).into_string();
        assert_eq!(
            html,
            "hi <span class=\"mention\" data-name=\"ann marie\">@ann marie</span> and \
             <span class=\"mention\" data-name=\"bob\">@bob</span>, not @bobby or me@bob"
        );
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), ("1970-01-01".into(), "00:00:00".into()));
        assert_eq!(utc(951_782_400_000_000), ("2000-02-29".into(), "00:00:00".into()));
        assert_eq!(utc(-1), ("1969-12-31".into(), "23:59:59".into()));
    }

    #[test]
    fn presence_lists_the_names_given_and_hints_at_more() {
        let names: Vec<String> = (0..50).map(|i| format!("user{i}")).collect();
        let shown: Vec<&str> = names.iter().map(String::as_str).collect();
        let html = presence(&shown, 60).into_string();
        assert_eq!(html.matches("<li").count(), 50);
        assert!(html.contains("and others"));
        assert!(!presence(&shown, 50).into_string().contains("and others"));
    }

    #[test]
    fn asset_urls_carry_a_content_hash() {
        let assets = Assets::new();
        assert!(assets.script.starts_with("/assets/live.js?v="));
        assert_eq!(assets.script.len(), "/assets/live.js?v=".len() + 16);
    }
}
