//! The chat's pages and fragments: the lobby and its join form, the room list, a room page,
//! one message, the presence list.

use maud::{html, Markup, PreEscaped};

use super::assets::Assets;
use super::format::utc;
use super::links::text_with_links;
use super::page::layout;
use crate::domain::{MAX_CHAT_ID_LEN, MAX_CONTENT_LEN, MAX_SENDER_LEN, REACTIONS};
use crate::rooms::{Body, MessageData, RoomSummary};

/// `/`: the join form and the live list of active rooms.
pub fn lobby_page(assets: &Assets, name: Option<&str>, room: &str, error: Option<&str>, rooms: &Markup) -> Markup {
    let content = html! {
        main.lobby {
            h1 { "Join a room" }
            (join_form(name, room, error))
            (super::search::search_form(None, ""))
            div #search-panel {}
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
            (super::search::search_form(Some(page.room), ""))
            div #search-panel {}
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
                    (reactions(message))
                }
                Body::Deleted => { p.body.tombstone { em { "message deleted" } } }
            }
        }
    }
}

/// The reaction buttons of a message: one per offered emoji, its count (empty at zero) in the
/// `data-reaction` element and, once someone reacted, who in its title and, one name per line,
/// in `data-by` (the page's script marks the reader's own and sends add or take back). Kept
/// short: every message carries six.
fn reactions(message: &MessageData) -> Markup {
    html! {
        div.reactions {
            @for emoji in REACTIONS {
                @let names = message.reactions.iter().find(|(shown, _)| *shown == emoji).map(|(_, names)| names.as_slice()).unwrap_or_default();
                @let by = (!names.is_empty()).then(|| names.join("\n"));
                @let title = (!names.is_empty()).then(|| names.join(", "));
                button type="button" class=[by.as_ref().map(|_| "reacted")] data-react=(emoji) data-by=[by] title=[title] {
                    (emoji) span data-reaction=(emoji) { @if !names.is_empty() { (names.len()) } }
                }
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
            reactions: vec![],
            revision: at,
        }
    }

    #[test]
    fn message_shows_sender_time_and_content() {
        let html = message(&data("alice", "hello"), false).into_string();
        let (start, reactions) = html.split_at(html.find("<div class=\"reactions\">").expect("reactions"));
        assert_eq!(
            start,
            "<li class=\"msg\" id=\"m-42\" data-pos=\"42\" data-version=\"3\" data-rev=\"3\" data-sender=\"alice\">\
             <b class=\"sender\" dir=\"auto\">alice</b> <time datetime=\"2025-11-27T04:00:00Z\">04:00</time>\
             <p class=\"body\" dir=\"auto\">hello</p>"
        );
        assert_eq!(reactions.matches("<button").count(), REACTIONS.len());
        assert!(
            reactions
                .contains("<button type=\"button\" data-react=\"👍\">👍<span data-reaction=\"👍\"></span></button>"),
            "{reactions}"
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
    fn reactions_show_counts_and_who() {
        let mut reacted = data("alice", "hello");
        reacted.reactions = vec![("❤️", vec!["bob".into(), "<i>eve</i>".into()])];
        let html = message(&reacted, false).into_string();
        assert!(html.contains("<span data-reaction=\"❤️\">2</span>"), "{html}");
        assert!(html.contains("title=\"bob, &lt;i&gt;eve&lt;/i&gt;\""), "{html}");
        assert!(html.contains("<span data-reaction=\"👍\"></span>"), "zero is empty: {html}");
        let mut deleted = reacted;
        deleted.body = Body::Deleted;
        assert!(!message(&deleted, false).into_string().contains("data-react"), "no reactions on a deleted message");
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
    fn presence_lists_the_names_given_and_hints_at_more() {
        let names: Vec<String> = (0..50).map(|i| format!("user{i}")).collect();
        let shown: Vec<&str> = names.iter().map(String::as_str).collect();
        let html = presence(&shown, 60).into_string();
        assert_eq!(html.matches("<li").count(), 50);
        assert!(html.contains("and others"));
        assert!(!presence(&shown, 50).into_string().contains("and others"));
    }
}
