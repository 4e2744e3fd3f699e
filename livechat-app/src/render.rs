//! HTML, rendered on the server with maud. One function per fragment, used by both the first
//! render of a page and the live updates, so the two cannot drift. maud escapes every
//! interpolated string, so user text always shows as text.

use maud::{html, Markup, PreEscaped, DOCTYPE};

use crate::domain::{ChatId, MessageSent, MAX_CHAT_ID_LEN, MAX_CONTENT_LEN, MAX_SENDER_LEN};
use crate::metrics::Snapshot;
use crate::read_model::{ChatMessage, RoomSummary};

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
pub fn name_page(assets: &Assets, room: &ChatId, error: Option<&str>) -> Markup {
    let content = html! {
        main.lobby {
            h1 { "Join #" (room) }
            (join_form(None, room.as_str(), error))
        }
    };
    layout(assets, "Choose a name", "none", None, content)
}

/// The first render of a room: the latest messages, presence and the composer.
pub struct RoomPage<'a> {
    /// The room.
    pub room: &'a ChatId,
    /// The reader's name.
    pub me: &'a str,
    /// Messages to show, oldest first.
    pub messages: &'a [std::sync::Arc<ChatMessage>],
    /// Whether older messages exist.
    pub has_more: bool,
    /// Who is here.
    pub presence: &'a crate::read_model::Presence,
    /// A fresh command id for the no-JavaScript form.
    pub command_id: uuid::Uuid,
    /// An error to show beside the composer (no-JavaScript path).
    pub error: Option<&'a str>,
}

/// `/{chat_id}`.
pub fn room_page(assets: &Assets, page: &RoomPage<'_>) -> Markup {
    let first = page.messages.first().map_or(0, |m| m.position.0);
    let last = page.messages.last().map_or(0, |m| m.position.0);
    let content = html! {
        main.room {
            h1 { "#" (page.room) }
            section.log aria-label="Messages" {
                p #older {
                    @if page.has_more {
                        a href={ "/" (page.room) "?before=" (first) } { "Older messages" }
                    }
                }
                ol #messages role="log" aria-live="polite" data-has-more=(page.has_more) data-first-pos=(first) data-last-pos=(last) {
                    @for message in page.messages { (PreEscaped(message.html())) }
                }
            }
            aside.presence aria-labelledby="presence-title" {
                h2 #presence-title { "Here now " span #presence-count .count { (page.presence.count) } }
                div #presence { (PreEscaped(&*page.presence.list)) }
            }
            form #send method="post" action={ "/" (page.room) "/send" } {
                label for="message" { "Message as " b { (page.me) } }
                textarea #message name="message" rows="2" maxlength=(MAX_CONTENT_LEN) required autofocus
                    placeholder="Write a message. Enter sends, Shift-Enter adds a line." {}
                input type="hidden" name="id" value=(page.command_id);
                button type="submit" { "Send" }
                p #composer-error role="alert" { @if let Some(error) = page.error { (error) } }
            }
        }
    };
    layout(assets, &format!("#{} · Live chat", page.room), "room", Some((page.room.as_str(), page.me)), content)
}

/// One message, as it appears in the log: sender, time and content.
pub fn message(position: u64, sent: &MessageSent) -> Markup {
    let (date, time) = utc(sent.sent_at.0);
    html! {
        li.msg id={ "m-" (position) } data-pos=(position) data-sender=(sent.sender) {
            b.sender { (sent.sender) }
            " "
            time datetime={ (date) "T" (time) "Z" } { (time[..5]) }
            p.body { (sent.content) }
        }
    }
}

/// Names shown in a room's presence list; the count shows everyone.
pub const PRESENCE_SHOWN: usize = 50;

/// The people in a room now: the first names, sorted; `total` people in all.
pub fn presence(names: &[&str], total: usize) -> Markup {
    html! {
        @if names.is_empty() {
            p.empty { "Nobody" }
        } @else {
            ul.people {
                @for name in names { li data-name=(name) { (name) } }
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

/// The metrics table of the dashboard.
pub fn metrics(snapshot: &Snapshot) -> Markup {
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
    }
}

fn micros(value: u64) -> String {
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
    use cqrs_core::Timestamp;

    use super::*;

    fn sent(sender: &str, content: &str) -> MessageSent {
        MessageSent {
            chat_id: ChatId::parse("room").expect("valid"),
            sender: sender.into(),
            content: content.into(),
            sent_at: Timestamp(1_764_216_000_123_456),
        }
    }

    #[test]
    fn message_shows_sender_time_and_content() {
        let html = message(42, &sent("alice", "hello")).into_string();
        assert_eq!(
            html,
            "<li class=\"msg\" id=\"m-42\" data-pos=\"42\" data-sender=\"alice\"><b class=\"sender\">alice</b> \
             <time datetime=\"2025-11-27T04:00:00Z\">04:00</time><p class=\"body\">hello</p></li>"
        );
    }

    #[test]
    fn user_text_is_escaped_everywhere() {
        let html =
            message(1, &sent("<img src=x onerror=alert(1)>", "<script>alert('x')</script> & \"q\"")).into_string();
        assert!(!html.contains("<script"), "{html}");
        assert!(!html.contains("<img"), "{html}");
        assert!(html.contains("&lt;script&gt;alert('x')&lt;/script&gt; &amp; &quot;q&quot;"), "{html}");
        assert!(html.contains("data-sender=\"&lt;img src=x onerror=alert(1)&gt;\""), "{html}");
        let presence = presence(&["<b>x</b>"], 1).into_string();
        assert!(presence.contains("&lt;b&gt;x&lt;/b&gt;"), "{presence}");
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
