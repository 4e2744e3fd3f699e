//! The `Chat` aggregate's rules with the given/when/then harness. The clock is the command's
//! `sent_at`, so the rate limit is tested with fixed times.

use cqrs_core::testing::AggregateTest;
use cqrs_core::Timestamp;
use livechat_app::domain::{
    reaction_tag, Chat, ChatCommand, ChatError, ChatEvent, ChatId, ChatIdError, MessageDeleted, MessageEdited,
    MessageSent, Reaction, SendMessage, REACTIONS, REACTION_RATE_LIMIT,
};

const SECOND: i64 = 1_000_000;

fn room() -> ChatId {
    ChatId::parse("elixir-fans").expect("valid")
}

fn send(sender: &str, content: &str, at: i64) -> ChatCommand {
    SendMessage { chat_id: room(), sender: sender.into(), content: content.into(), sent_at: Timestamp(at) }.into()
}

/// The event of the first message of a room (number 1).
fn sent(sender: &str, content: &str, at: i64) -> ChatEvent {
    sent_n(sender, content, at, 1)
}

fn sent_n(sender: &str, content: &str, at: i64, number: u64) -> ChatEvent {
    ChatEvent::MessageSent(MessageSent {
        chat_id: room(),
        sender: sender.into(),
        content: content.into(),
        sent_at: Timestamp(at),
        number,
        mentions: vec![],
    })
}

#[test]
fn a_message_is_sent_trimmed() {
    AggregateTest::<Chat>::given_no_events().when(send("  alice ", "\n hello there  \n", 10)).then_events(vec![sent(
        "alice",
        "hello there",
        10,
    )]);
}

#[test]
fn empty_and_blank_messages_are_refused() {
    for content in ["", "   ", "\n\t\n"] {
        AggregateTest::<Chat>::given_no_events().when(send("alice", content, 0)).then_error(ChatError::EmptyContent);
    }
}

#[test]
fn messages_up_to_4000_characters_pass() {
    let longest = "é".repeat(4_000); // characters, not bytes
    AggregateTest::<Chat>::given_no_events()
        .when(send("alice", &longest, 0))
        .then_events(vec![sent("alice", &longest, 0)]);
    AggregateTest::<Chat>::given_no_events()
        .when(send("alice", &"x".repeat(4_001), 0))
        .then_error(ChatError::ContentTooLong { len: 4_001, max: 4_000 });
}

#[test]
fn control_characters_are_refused_but_newlines_and_tabs_pass() {
    AggregateTest::<Chat>::given_no_events()
        .when(send("alice", "bell\u{7}", 0))
        .then_error(ChatError::ContentControlCharacters);
    AggregateTest::<Chat>::given_no_events().when(send("alice", "line one\n\tline two", 0)).then_events(vec![sent(
        "alice",
        "line one\n\tline two",
        0,
    )]);
}

#[test]
fn sender_names_are_checked() {
    AggregateTest::<Chat>::given_no_events().when(send("   ", "hi", 0)).then_error(ChatError::EmptySender);
    AggregateTest::<Chat>::given_no_events()
        .when(send(&"n".repeat(33), "hi", 0))
        .then_error(ChatError::SenderTooLong { max: 32 });
    AggregateTest::<Chat>::given_no_events()
        .when(send(&format!("  {}  ", "n".repeat(32)), "hi", 0))
        .then_events(vec![sent(&"n".repeat(32), "hi", 0)]);
    AggregateTest::<Chat>::given_no_events()
        .when(send("ev\u{1b}[31mil", "hi", 0))
        .then_error(ChatError::SenderControlCharacters);
}

#[test]
fn five_messages_per_five_seconds_per_sender() {
    let history: Vec<ChatEvent> = (0..5).map(|i| sent("alice", "spam", i * SECOND / 2)).collect();
    // The sixth within 5 s of the first is refused, with the wait until the first leaves the window.
    AggregateTest::<Chat>::given(history.clone())
        .when(send("alice", "one more", 4 * SECOND))
        .then_error(ChatError::RateLimited { retry_after_ms: 1_000 });
    // Another sender is not limited by alice.
    AggregateTest::<Chat>::given(history.clone()).when(send("bob", "hi", 4 * SECOND)).then_events(vec![sent_n(
        "bob",
        "hi",
        4 * SECOND,
        6,
    )]);
    // Exactly 5 s after the first, the window has moved on.
    AggregateTest::<Chat>::given(history).when(send("alice", "later", 5 * SECOND)).then_events(vec![sent_n(
        "alice",
        "later",
        5 * SECOND,
        6,
    )]);
}

#[test]
fn the_rate_limit_slides() {
    // 5 at t = 0, 1, 2, 3, 4 s; then one at 5 s is fine (0 s left the window), one at 5.5 s is not.
    let mut history: Vec<ChatEvent> = (0..5).map(|i| sent("alice", "m", i * SECOND)).collect();
    history.push(sent("alice", "m", 5 * SECOND));
    AggregateTest::<Chat>::given(history)
        .when(send("alice", "m", 5 * SECOND + SECOND / 2))
        .then_error(ChatError::RateLimited { retry_after_ms: 500 });
}

#[test]
fn quiet_senders_are_forgotten() {
    let mut history: Vec<ChatEvent> = (0..100).map(|i| sent(&format!("user{i}"), "hi", 0)).collect();
    history.push(sent("late", "hi", 60 * SECOND));
    let state = AggregateTest::<Chat>::given(history)
        .when(send("late", "again", 60 * SECOND))
        .then_events(vec![sent_n("late", "again", 60 * SECOND, 102)]);
    assert!(state.tracked_senders() < 10, "tracked {}", state.tracked_senders());
    assert_eq!(state.messages, 102);
}

#[test]
fn chat_ids() {
    assert!(ChatId::parse("Room_1-a").is_ok());
    assert!(ChatId::parse(&"a".repeat(64)).is_ok());
    assert_eq!(ChatId::parse(""), Err(ChatIdError::Empty));
    assert_eq!(ChatId::parse(&"a".repeat(65)), Err(ChatIdError::TooLong));
    for bad in ["a b", "a/b", "ä", "a.b", "<x>"] {
        assert_eq!(ChatId::parse(bad), Err(ChatIdError::BadCharacter), "{bad}");
    }
    assert_eq!(room().stream_id().as_str(), "chat-elixir-fans");
    assert_eq!(ChatId::from_stream(&room().stream_id()), Some(room()));
}

fn edit(sender: &str, version: u64, content: &str, at: i64) -> ChatCommand {
    ChatCommand::EditMessage {
        chat_id: room(),
        version,
        sender: sender.into(),
        content: content.into(),
        mentions: vec![],
        edited_at: Timestamp(at),
    }
}

fn delete(sender: &str, version: u64, at: i64) -> ChatCommand {
    ChatCommand::DeleteMessage { chat_id: room(), version, sender: sender.into(), deleted_at: Timestamp(at) }
}

fn edited(version: u64, content: &str, at: i64) -> ChatEvent {
    ChatEvent::MessageEdited(MessageEdited {
        chat_id: room(),
        version,
        sender: "alice".into(),
        content: content.into(),
        mentions: vec![],
        edited_at: Timestamp(at),
    })
}

fn deleted(version: u64, at: i64) -> ChatEvent {
    ChatEvent::MessageDeleted(MessageDeleted {
        chat_id: room(),
        version,
        sender: "alice".into(),
        deleted_at: Timestamp(at),
    })
}

#[test]
fn a_sender_edits_their_message_within_15_minutes() {
    let history = vec![sent("alice", "helo", 0)];
    AggregateTest::<Chat>::given(history.clone())
        .when(edit("alice", 1, " hello ", 60 * SECOND))
        .then_events(vec![edited(1, "hello", 60 * SECOND)]);
    AggregateTest::<Chat>::given(history.clone())
        .when(edit("alice", 1, "too late", 15 * 60 * SECOND + 1))
        .then_error(ChatError::EditWindowClosed);
    AggregateTest::<Chat>::given(history.clone())
        .when(edit("bob", 1, "mine now", SECOND))
        .then_error(ChatError::NotYourMessage);
    AggregateTest::<Chat>::given(history.clone())
        .when(edit("alice", 2, "nothing there", SECOND))
        .then_error(ChatError::NoSuchMessage);
    AggregateTest::<Chat>::given(history).when(edit("alice", 1, "   ", SECOND)).then_error(ChatError::EmptyContent);
}

#[test]
fn a_deleted_message_cannot_be_edited_or_deleted_again() {
    let history = vec![sent("alice", "oops", 0), deleted(1, SECOND)];
    AggregateTest::<Chat>::given(vec![sent("alice", "oops", 0)])
        .when(delete("alice", 1, SECOND))
        .then_events(vec![deleted(1, SECOND)]);
    AggregateTest::<Chat>::given(history.clone())
        .when(edit("alice", 1, "back", 2 * SECOND))
        .then_error(ChatError::AlreadyDeleted);
    AggregateTest::<Chat>::given(history).when(delete("alice", 1, 2 * SECOND)).then_error(ChatError::AlreadyDeleted);
    AggregateTest::<Chat>::given(vec![sent("alice", "x", 0)])
        .when(delete("bob", 1, SECOND))
        .then_error(ChatError::NotYourMessage);
    // An edit event is not a message.
    AggregateTest::<Chat>::given(vec![sent("alice", "x", 0), edited(1, "y", SECOND)])
        .when(edit("alice", 2, "z", 2 * SECOND))
        .then_error(ChatError::EditWindowClosed);
}

#[test]
fn only_the_last_500_events_of_a_busy_room_are_editable() {
    // 501 messages from 101 senders in one minute: the first one is 500 events back.
    let mut history: Vec<ChatEvent> = vec![sent("alice", "first", 0)];
    history.extend((1..=500).map(|i| sent(&format!("user{}", i % 100), "busy", i * 100_000)));
    AggregateTest::<Chat>::given(history.clone())
        .when(edit("alice", 1, "edited", 60 * SECOND))
        .then_error(ChatError::EditWindowClosed);
    let state = history.iter().fold(Chat::default(), cqrs_core::Aggregate::apply);
    assert!(state.editable_messages() <= 500, "the edit state is bounded: {}", state.editable_messages());
    history.truncate(499);
    AggregateTest::<Chat>::given(history).when(edit("alice", 1, "edited", 60 * SECOND)).then_events(vec![edited(
        1,
        "edited",
        60 * SECOND,
    )]);
}

#[test]
fn mentions_are_kept_only_when_the_text_mentions_them() {
    let command = ChatCommand::SendMessage {
        chat_id: room(),
        sender: "alice".into(),
        content: "hi @bob and @carol!".into(),
        mentions: vec!["bob".into(), "dave".into(), "carol".into()],
        sent_at: Timestamp(0),
    };
    let mut expected = MessageSent {
        chat_id: room(),
        sender: "alice".into(),
        content: "hi @bob and @carol!".into(),
        sent_at: Timestamp(0),
        number: 1,
        mentions: vec!["bob".into(), "carol".into()],
    };
    AggregateTest::<Chat>::given_no_events().when(command).then_events(vec![ChatEvent::MessageSent(expected.clone())]);
    expected.mentions.clear();
    assert!(!livechat_app::domain::mentioned("mail me@bob.test", ["bob"]).contains(&"bob".to_owned()));
}

#[test]
fn names_with_invisible_or_direction_characters_are_refused() {
    for name in ["ev\u{202E}il", "a\u{200B}b", "\u{2066}x\u{2069}", "x\u{FEFF}"] {
        AggregateTest::<Chat>::given_no_events()
            .when(send(name, "hi", 0))
            .then_error(ChatError::SenderInvisibleCharacters);
    }
    assert!(livechat_app::domain::validate_sender("Zoë Müller").is_ok());
    assert!(livechat_app::domain::validate_sender("محمد").is_ok(), "right-to-left letters themselves are fine");
}

#[test]
fn room_ids_that_are_routes_are_refused() {
    for reserved in ["dashboard", "metrics", "health", "assets", "live", "join", "Dashboard"] {
        assert!(matches!(ChatId::parse(reserved), Err(ChatIdError::Reserved(_))), "{reserved}");
    }
    assert!(ChatId::parse("dashboards").is_ok());
}

fn react(sender: &str, version: u64, emoji: &str, add: bool, at: i64) -> ChatCommand {
    ChatCommand::React {
        chat_id: room(),
        version,
        sender: sender.into(),
        emoji: emoji.into(),
        add,
        reacted_at: Timestamp(at),
    }
}

fn reaction(sender: &str, version: u64, emoji: &str, at: i64) -> Reaction {
    Reaction { chat_id: room(), version, sender: sender.into(), emoji: emoji.into(), at: Timestamp(at) }
}

#[test]
fn anyone_reacts_to_any_message_with_an_offered_emoji_and_takes_it_back() {
    let given = vec![sent("alice", "hi", 0)];
    for emoji in REACTIONS {
        AggregateTest::<Chat>::given(given.clone())
            .when(react(" bob ", 1, emoji, true, SECOND))
            .then_events(vec![ChatEvent::ReactionAdded(reaction("bob", 1, emoji, SECOND))]);
    }
    AggregateTest::<Chat>::given(given.clone())
        .when(react("alice", 1, "😢", false, SECOND))
        .then_events(vec![ChatEvent::ReactionRemoved(reaction("alice", 1, "😢", SECOND))]);
    // Long after the edit window: reactions have none.
    AggregateTest::<Chat>::given(given)
        .when(react("bob", 1, "🎉", true, 3_600 * SECOND))
        .then_events(vec![ChatEvent::ReactionAdded(reaction("bob", 1, "🎉", 3_600 * SECOND))]);
}

#[test]
fn reactions_name_a_live_message_and_an_offered_emoji() {
    let edited = ChatEvent::MessageEdited(MessageEdited {
        chat_id: room(),
        version: 1,
        sender: "alice".into(),
        content: "hello".into(),
        mentions: vec![],
        edited_at: Timestamp(SECOND),
    });
    let given = vec![sent("alice", "hi", 0), edited];
    for (version, error) in
        [(0, ChatError::NoSuchMessage), (2, ChatError::NoSuchMessage), (3, ChatError::NoSuchMessage)]
    {
        AggregateTest::<Chat>::given(given.clone()).when(react("bob", version, "👍", true, SECOND)).then_error(error);
    }
    for emoji in ["👎", "", "👍👍", "<b>"] {
        AggregateTest::<Chat>::given(given.clone())
            .when(react("bob", 1, emoji, true, SECOND))
            .then_error(ChatError::UnknownReaction);
    }
    let deleted = ChatEvent::MessageDeleted(MessageDeleted {
        chat_id: room(),
        version: 1,
        sender: "alice".into(),
        deleted_at: Timestamp(2 * SECOND),
    });
    AggregateTest::<Chat>::given(vec![sent("alice", "hi", 0), deleted])
        .when(react("bob", 1, "👍", true, 3 * SECOND))
        .then_error(ChatError::AlreadyDeleted);
    AggregateTest::<Chat>::given(vec![sent("alice", "hi", 0)])
        .when(react("  ", 1, "👍", true, SECOND))
        .then_error(ChatError::EmptySender);
}

#[test]
fn reactions_are_rate_limited_per_person_apart_from_messages() {
    let mut given = vec![sent("alice", "hi", 0)];
    for i in 0..REACTION_RATE_LIMIT {
        given.push(ChatEvent::ReactionAdded(reaction("bob", 1, "👍", SECOND + i as i64)));
    }
    AggregateTest::<Chat>::given(given.clone())
        .when(react("bob", 1, "😮", true, 2 * SECOND))
        .then_error(ChatError::ReactingTooFast { retry_after_ms: 4_000 });
    // Others, and bob once the window has passed, react; bob may still send messages.
    AggregateTest::<Chat>::given(given.clone())
        .when(react("carol", 1, "😮", true, 2 * SECOND))
        .then_events(vec![ChatEvent::ReactionAdded(reaction("carol", 1, "😮", 2 * SECOND))]);
    AggregateTest::<Chat>::given(given.clone())
        .when(react("bob", 1, "😮", true, 7 * SECOND))
        .then_events(vec![ChatEvent::ReactionAdded(reaction("bob", 1, "😮", 7 * SECOND))]);
    AggregateTest::<Chat>::given(given).when(send("bob", "still here", 2 * SECOND)).then_events(vec![sent_n(
        "bob",
        "still here",
        2 * SECOND,
        2,
    )]);
}

#[test]
fn reactions_are_tagged_with_their_message() {
    use cqrs_core::DomainEvent;
    let event = ChatEvent::ReactionAdded(reaction("bob", 7, "👍", 0));
    assert_eq!(event.tags(), vec![reaction_tag(&room(), 7)]);
    assert_eq!(reaction_tag(&room(), 7).as_str(), "reaction:elixir-fans/7");
    assert!(sent("alice", "hi", 0).tags().is_empty());
}
