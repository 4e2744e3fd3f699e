//! Reactions: live in place for every viewer, one of each per person, gone with their message,
//! and found for old messages (far past the edit window) by their tags.

use std::sync::Arc;

use cqrs_core::{CommandEnvelope, Timestamp};
use livechat_app::domain::{ChatCommand, ChatId, MAX_EDIT_DISTANCE};
use livechat_app::AppConfig;
use serde_json::json;
use uuid::Uuid;

use crate::support::{Client, Frame, TestServer};
use crate::websocket::{ack, seed};

fn react_frame(reference: u64, version: u64, emoji: &str, add: bool) -> serde_json::Value {
    json!({"t": "react", "ref": reference, "id": Uuid::new_v4(), "version": version, "emoji": emoji, "add": add})
}

/// The count shown for `emoji` in a message's HTML ("" at zero).
fn count(html: &str, emoji: &str) -> String {
    let marker = format!("<span data-reaction=\"{emoji}\">");
    let start = html.find(&marker).map(|at| at + marker.len()).unwrap_or_else(|| panic!("no {emoji} in {html}"));
    html[start..].split('<').next().unwrap_or_default().to_owned()
}

/// Sends a reaction and returns the ack and the sender's own `msg` frame.
async fn react(client: &mut Client, reference: u64, version: u64, emoji: &str, add: bool) -> Frame {
    client.send_json(react_frame(reference, version, emoji, add)).await;
    let [reply, message] = <[Frame; 2]>::try_from(client.until_each(&["ack", "msg"]).await).expect("two frames");
    assert_eq!(reply.head["status"], "stored", "{}", reply.head);
    message
}

#[tokio::test]
async fn reactions_reach_every_viewer_in_place_one_of_each_per_person() {
    let server = TestServer::start().await;
    let (mut alice, _) = server.join("alice", "lounge", 0).await;
    let (mut bob, _) = server.join("bob", "lounge", 0).await;
    alice.send_message(1, Uuid::new_v4(), "pizza tonight?").await;
    assert_eq!(alice.until_each(&["ack", "msg"]).await[0].head["status"], "stored");
    let original = bob.recv_kind("msg").await;
    let version = 1;
    assert_eq!(count(&original.html, "👍"), "");

    let mine = react(&mut bob, 1, version, "👍", true).await;
    let theirs = alice.recv_kind("msg").await;
    for frame in [&mine, &theirs] {
        assert_eq!(frame.pos(), original.pos(), "the same message, updated in place");
        assert_eq!(count(&frame.html, "👍"), "1");
        assert!(frame.html.contains("title=\"bob\""), "{}", frame.html);
        assert!(frame.html.contains("pizza tonight?"), "the text stays");
    }
    // One of each per person: adding again changes nothing that is shown.
    assert_eq!(count(&react(&mut bob, 2, version, "👍", true).await.html, "👍"), "1");
    alice.recv_kind("msg").await;
    let both = react(&mut alice, 3, version, "👍", true).await;
    assert_eq!(count(&both.html, "👍"), "2");
    assert!(both.html.contains("title=\"alice, bob\""), "{}", both.html);
    bob.recv_kind("msg").await;
    let hearts = react(&mut alice, 4, version, "❤️", true).await;
    assert_eq!((count(&hearts.html, "👍").as_str(), count(&hearts.html, "❤️").as_str()), ("2", "1"));
    bob.recv_kind("msg").await;
    let taken_back = react(&mut bob, 5, version, "👍", false).await;
    assert_eq!(count(&taken_back.html, "👍"), "1");
    assert_eq!(count(&alice.recv_kind("msg").await.html, "👍"), "1");

    for (reference, frame, error) in [
        (6, react_frame(6, version, "👎", true), "that reaction is not offered"),
        (7, react_frame(7, 2, "👍", true), "there is no such message"),
        (8, react_frame(8, 99, "👍", true), "there is no such message"),
    ] {
        bob.send_json(frame).await;
        let refused = ack(&mut bob).await;
        assert_eq!((refused["ref"].as_u64(), refused["status"].as_str()), (Some(reference), Some("refused")));
        assert!(refused["error"].as_str().is_some_and(|e| e.starts_with(error)), "{refused}");
    }

    // A new viewer and the server-rendered page show the same counts.
    let (_, catch_up) = server.join("carol", "lounge", 0).await;
    assert_eq!((count(&catch_up[0].html, "👍").as_str(), count(&catch_up[0].html, "❤️").as_str()), ("1", "1"));
    let page = server.get("/lounge", Some("dave")).await;
    assert_eq!(count(&page.body, "❤️"), "1");

    // Deleted: the reactions go with the text, and no more can be added.
    alice.send_json(json!({"t": "delete", "ref": 9, "id": Uuid::new_v4(), "version": version})).await;
    assert_eq!(alice.until_each(&["ack", "msg"]).await[0].head["status"], "stored");
    let tombstone = bob.recv_kind("msg").await;
    assert!(tombstone.html.contains("message deleted") && !tombstone.html.contains("data-react"), "{}", tombstone.html);
    bob.send_json(react_frame(10, version, "😂", true)).await;
    assert_eq!(ack(&mut bob).await["error"], "the message was deleted");
    server.stop().await;
}

/// A reaction to message `version` of `room`, stored through the dispatcher.
async fn react_directly(server: &TestServer, room: &str, version: u64, sender: &str) {
    let command = ChatCommand::React {
        chat_id: ChatId::parse(room).expect("room"),
        version,
        sender: sender.into(),
        emoji: "🎉".into(),
        add: true,
        reacted_at: Timestamp::now(),
    };
    server.state.dispatcher.dispatch(CommandEnvelope::new(command)).await.expect("stored");
}

#[tokio::test]
async fn reactions_to_old_messages_are_found_by_their_tag_on_older_pages_and_live() {
    let mut config = AppConfig::default();
    config.rooms.window.messages = 10;
    let store = Arc::new(cqrs_memory::MemoryStore::new());
    let server = TestServer::start_with(store.clone(), config.clone()).await;
    // Message 5 is far outside the window and past the edit look-ahead of any page.
    seed(&server, "hist", MAX_EDIT_DISTANCE as usize + 300).await;
    react_directly(&server, "hist", 5, "early").await;
    server.stop().await;
    // A fresh read model: nothing of message 5 in memory.
    let server = TestServer::start_with(store, config).await;
    for path in ["/hist/older?before=20", "/hist?before=20"] {
        let page = server.get(path, Some("bob")).await;
        assert_eq!(page.status, 200, "{path}");
        let message_5 = page.body.split("data-version=\"5\"").nth(1).expect("message 5 on the page");
        assert_eq!(count(message_5, "🎉"), "1", "{path}");
        assert!(message_5.contains("title=\"early\""), "{path}");
    }
    // Live: a viewer gets message 5's new state with the earlier reaction folded in.
    let (mut viewer, _) = server.join("viewer", "hist", 0).await;
    react_directly(&server, "hist", 5, "late").await;
    let update = viewer.recv_kind("msg").await;
    assert!(update.html.contains("data-version=\"5\""), "{}", update.html);
    assert_eq!(count(&update.html, "🎉"), "2");
    assert!(update.html.contains("title=\"early, late\""), "{}", update.html);
    server.stop().await;
}
