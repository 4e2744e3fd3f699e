//! The `Chat` aggregate's rules with the given/when/then harness. The clock is the command's
//! `sent_at`, so the rate limit is tested with fixed times.

use cqrs_core::testing::AggregateTest;
use cqrs_core::Timestamp;
use livechat_app::domain::{Chat, ChatError, ChatEvent, ChatId, ChatIdError, MessageSent, SendMessage};

const SECOND: i64 = 1_000_000;

fn room() -> ChatId {
    ChatId::parse("elixir-fans").expect("valid")
}

fn send(sender: &str, content: &str, at: i64) -> SendMessage {
    SendMessage { chat_id: room(), sender: sender.into(), content: content.into(), sent_at: Timestamp(at) }
}

fn sent(sender: &str, content: &str, at: i64) -> ChatEvent {
    ChatEvent::MessageSent(MessageSent {
        chat_id: room(),
        sender: sender.into(),
        content: content.into(),
        sent_at: Timestamp(at),
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
    AggregateTest::<Chat>::given(history.clone()).when(send("bob", "hi", 4 * SECOND)).then_events(vec![sent(
        "bob",
        "hi",
        4 * SECOND,
    )]);
    // Exactly 5 s after the first, the window has moved on.
    AggregateTest::<Chat>::given(history).when(send("alice", "later", 5 * SECOND)).then_events(vec![sent(
        "alice",
        "later",
        5 * SECOND,
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
    let state = AggregateTest::<Chat>::given(history).when(send("late", "again", 60 * SECOND)).then_events(vec![sent(
        "late",
        "again",
        60 * SECOND,
    )]);
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
