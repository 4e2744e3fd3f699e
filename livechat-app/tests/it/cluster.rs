//! Other nodes' presence and typing merged into a room (the transport, PostgreSQL's
//! LISTEN/NOTIFY, is tested end to end in the browser test with two processes).

use std::sync::Arc;
use std::time::Duration;

use livechat_app::domain::ChatId;
use livechat_app::live::LiveConfig;
use livechat_app::AppConfig;
use serde_json::json;

use crate::support::{Client, TestServer};

/// Reads presence frames until the list and count satisfy `done`; returns them.
async fn presence_until(client: &mut Client, done: impl Fn(&str, &str) -> bool) -> (String, String) {
    let (mut list, mut count) = (String::new(), String::new());
    while !done(&list, &count) {
        let frame = client.recv_kind("morph").await;
        match frame.head["id"].as_str() {
            Some("presence") => list = frame.html,
            Some("presence-count") => count = frame.html,
            other => panic!("unexpected region {other:?}"),
        }
    }
    (list, count)
}

#[tokio::test]
async fn other_nodes_people_and_typing_join_the_room_and_leave_with_their_node() {
    let config = AppConfig {
        live: LiveConfig { presence_interval: Duration::from_millis(10), ..LiveConfig::default() },
        ..Default::default()
    };
    let server = TestServer::start_with(Arc::new(cqrs_memory::MemoryStore::new()), config).await;
    let model = &server.state.model;
    let room = ChatId::parse("lounge").expect("room");
    let (mut alice, _) = server.join("alice", "lounge", 0).await;
    presence_until(&mut alice, |list, count| list.contains("alice") && count == "1").await;

    model.remote_presence("node-b", &room, vec!["bob".into(), "alice".into()], 2);
    model.remote_presence("node-c", &room, vec!["carol".into()], 41);
    // alice on two nodes counts once; node-c's 40 unnamed people count.
    let (list, _) = presence_until(&mut alice, |list, count| list.contains("carol") && count == "43").await;
    assert!(list.contains("bob") && list.contains("alice"), "{list}");

    model.remote_typing(&room, "bob");
    assert_eq!(alice.recv_kind("typing").await.head["names"], json!(["bob"]));

    model.remote_presence("node-c", &room, Vec::new(), 0);
    presence_until(&mut alice, |list, count| !list.contains("carol") && count == "2").await;
    model.forget_nodes(Some("node-b"));
    presence_until(&mut alice, |list, count| !list.contains("bob") && count == "1").await;

    // What this node would announce: alice here, nothing elsewhere.
    model.announce_to_cluster();
    let announced = model.local_presence(true);
    assert_eq!(announced.len(), 1);
    assert_eq!((announced[0].names.as_slice(), announced[0].count), (&["alice".to_owned()][..], 1));
    server.stop().await;
}
