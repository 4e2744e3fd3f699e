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

/// The lobby counts every node's people: a name on two nodes once, a room known only by its
/// people on another node listed, and both gone with that node.
#[tokio::test]
async fn the_lobby_counts_the_people_of_every_node() {
    let server = TestServer::start().await;
    let model = &server.state.model;
    let (lounge, attic) = (ChatId::parse("lounge").expect("room"), ChatId::parse("attic").expect("room"));
    let (mut alice, _) = server.join("alice", "lounge", 0).await;
    presence_until(&mut alice, |list, count| list.contains("alice") && count == "1").await;
    let viewers = |room: &ChatId| model.rooms(100).into_iter().find(|summary| &summary.id == room).map(|s| s.viewers);
    assert_eq!(viewers(&lounge), Some(1));

    model.remote_presence("node-b", &lounge, vec!["alice".into(), "bob".into()], 2);
    model.remote_presence("node-b", &attic, vec!["dora".into()], 3);
    assert_eq!(viewers(&lounge), Some(2), "alice here and on node-b counts once, bob once");
    assert_eq!(viewers(&attic), Some(3), "a room with people only on node-b is listed with them");

    model.forget_nodes(Some("node-b"));
    assert_eq!(viewers(&lounge), Some(1));
    assert_eq!(viewers(&attic), None, "no messages and nobody left: not listed");
    server.stop().await;
}
