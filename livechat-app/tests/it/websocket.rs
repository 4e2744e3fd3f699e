//! Live views over real websockets against the real router: join, send, acknowledgement,
//! rejection, bad frames, origin, resume, lag, presence, frame sizes; and the HTTP pages.

use std::time::Duration;

use cqrs_core::{CommandEnvelope, Position, Timestamp};
use livechat_app::domain::{ChatCommand, ChatId, SendMessage};
use livechat_app::live::LiveConfig;
use livechat_app::rooms::HANDLER_NAME;
use livechat_app::AppConfig;
use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use uuid::Uuid;

use crate::support::{Client, Next, TestServer, TIMEOUT};

/// Stores `count` messages in `room` directly through the dispatcher (2 s apart, so the rate
/// limit never applies) and waits for the read model; returns the last position.
pub async fn seed(server: &TestServer, room: &str, count: usize) -> u64 {
    seed_with(server, room, count, |i| format!("seeded message {i}")).await
}

/// Like [`seed`], with the text of message `i` from `text`.
pub async fn seed_with(server: &TestServer, room: &str, count: usize, text: impl Fn(usize) -> String) -> u64 {
    let mut last = 0;
    for i in 0..count {
        let command = SendMessage {
            chat_id: ChatId::parse(room).expect("room"),
            sender: format!("seed{}", i % 7),
            content: text(i),
            sent_at: Timestamp(i as i64 * 2_000_000),
        };
        let command = ChatCommand::from(command);
        let outcome = server.state.dispatcher.dispatch(CommandEnvelope::new(command)).await.expect("seed");
        last = outcome.appended.expect("stored").last_position.0;
    }
    server.state.progress.wait_for(HANDLER_NAME, Position(last), TIMEOUT).await.expect("projected");
    last
}

pub async fn ack(client: &mut Client) -> serde_json::Value {
    client.recv_kind("ack").await.head
}

/// How many messages the store holds for `room`.
pub async fn stored_messages(server: &TestServer, room: &str) -> usize {
    let stream = ChatId::parse(room).expect("room").stream_id();
    let events = server.state.store.read_stream(&stream, cqrs_core::Version(1), 100_000).await.expect("read");
    events.iter().filter(|e| e.event_type.as_ref() == "MessageSent").count()
}

#[tokio::test]
async fn a_message_reaches_every_viewer_once_with_an_ack_to_the_sender() {
    let server = TestServer::start().await;
    let (mut alice, _) = server.join("alice", "lounge", 0).await;
    let (mut bob, _) = server.join("bob", "lounge", 0).await;
    alice.send_message(1, Uuid::new_v4(), "hello <b>bob</b>").await;
    let reply = ack(&mut alice).await;
    assert_eq!(reply, json!({"t": "ack", "ref": 1, "ok": true, "status": "stored"}));
    for client in [&mut alice, &mut bob] {
        let message = client.recv_kind("msg").await;
        assert!(message.html.contains("hello &lt;b&gt;bob&lt;/b&gt;"), "{}", message.html);
        assert!(message.html.contains("data-sender=\"alice\""));
        assert!(message.len <= message.html.len() + 64, "header of {} bytes", message.len - message.html.len());
    }
    server.stop().await;
}

#[tokio::test]
async fn refusals_come_back_in_the_ack_and_store_nothing() {
    let server = TestServer::start().await;
    let (mut alice, _) = server.join("alice", "lounge", 0).await;
    alice.send_message(1, Uuid::new_v4(), "   ").await;
    assert_eq!(
        ack(&mut alice).await,
        json!({"t": "ack", "ref": 1, "ok": false, "status": "refused", "error": "the message is empty"})
    );
    alice.send_message(2, Uuid::new_v4(), &"x".repeat(4001)).await;
    let reply = ack(&mut alice).await;
    assert_eq!(reply["ok"], false);
    assert!(reply["error"].as_str().expect("error").contains("4001 characters"), "{reply}");
    for i in 0..5 {
        alice.send_message(10 + i, Uuid::new_v4(), "quick").await;
        assert_eq!(ack(&mut alice).await["ok"], true);
    }
    alice.send_message(20, Uuid::new_v4(), "one too many").await;
    let reply = ack(&mut alice).await;
    assert!(reply["error"].as_str().expect("error").starts_with("slow down"), "{reply}");
    assert_eq!(stored_messages(&server, "lounge").await, 5, "only the accepted messages are stored");
    server.stop().await;
}

#[tokio::test]
async fn a_resent_message_is_posted_once() {
    let server = TestServer::start().await;
    let (mut alice, _) = server.join("alice", "lounge", 0).await;
    let id = Uuid::new_v4();
    alice.send_message(1, id, "only once").await;
    assert_eq!(ack(&mut alice).await["ok"], true);
    // As after a reconnect: a new socket resends the same command id.
    let (mut again, catch_up) = server.join("alice", "lounge", 0).await;
    assert_eq!(catch_up.len(), 1);
    again.send_message(1, id, "only once").await;
    assert_eq!(ack(&mut again).await["ok"], true);
    again.send_message(2, Uuid::new_v4(), "second").await;
    assert_eq!(ack(&mut again).await["ok"], true);
    let next = again.recv_kind("msg").await;
    assert!(next.html.contains("second") && next.pos() == 2, "the resend stored nothing: {}", next.html);
    server.stop().await;
}

#[tokio::test]
async fn malformed_binary_and_unknown_frames_get_errors_and_the_view_lives_on() {
    let server = TestServer::start().await;
    let (mut bob, _) = server.join("bob", "lounge", 0).await;
    let (mut alice, _) = server.join("alice", "lounge", 0).await;
    for bad in
        ["not json", "{\"t\":\"dance\"}", "{\"t\":\"send\",\"ref\":1}", "[1,2]", "{\"t\":\"join\",\"view\":\"room\"}"]
    {
        alice.send_text(bad).await;
        let error = alice.recv_kind("error").await;
        assert!(!error.head["error"].as_str().expect("reason").is_empty(), "{bad}");
    }
    alice.ws.send(tokio_tungstenite::tungstenite::Message::Binary(vec![1, 2, 3].into())).await.expect("send");
    assert!(alice.recv_kind("error").await.head["error"].as_str().expect("reason").contains("binary"));
    alice.send_json(json!({"t": "ping"})).await;
    alice.recv_kind("pong").await;
    alice.send_message(1, Uuid::new_v4(), "still here").await;
    assert_eq!(ack(&mut alice).await["ok"], true);
    assert!(bob.recv_kind("msg").await.html.contains("still here"), "others are unaffected");
    server.stop().await;
}

use futures_util::SinkExt;

#[tokio::test]
async fn an_oversized_frame_closes_only_that_connection() {
    let server = TestServer::start().await;
    let (mut bob, _) = server.join("bob", "lounge", 0).await;
    let (mut alice, _) = server.join("alice", "lounge", 0).await;
    let huge = json!({"t": "send", "ref": 1, "id": Uuid::new_v4(), "message": "x".repeat(100 * 1024)}).to_string();
    let _ = alice.ws.send(tokio_tungstenite::tungstenite::Message::Text(huge.into())).await;
    let close = alice.closed().await.expect("a close frame, not a dropped connection");
    assert_eq!(close.code, CloseCode::Size, "{close:?}");
    let (mut carol, _) = server.join("carol", "lounge", 0).await;
    carol.send_message(1, Uuid::new_v4(), "after the big one").await;
    assert_eq!(ack(&mut carol).await["ok"], true);
    assert!(bob.recv_kind("msg").await.html.contains("after the big one"));
    assert_eq!(stored_messages(&server, "lounge").await, 1);
    server.stop().await;
}

#[tokio::test]
async fn a_websocket_from_another_origin_is_refused() {
    let server = TestServer::start().await;
    let headers = [
        ("origin".to_owned(), "http://evil.example".to_owned()),
        ("cookie".to_owned(), "livechat_name=eve".to_owned()),
    ];
    match server.connect_with(&headers).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => assert_eq!(response.status(), 403),
        Err(other) => panic!("expected a 403, got {other}"),
        Ok(_) => panic!("a foreign origin was upgraded"),
    }
    server.stop().await;
}

#[tokio::test]
async fn a_room_view_needs_a_name_and_a_valid_room() {
    let server = TestServer::start().await;
    let mut anonymous = server.connect(None).await;
    anonymous.send_json(json!({"t": "join", "view": "room", "room": "lounge"})).await;
    assert_eq!(anonymous.recv().await.head["error"], "choose a name first");
    assert!(matches!(anonymous.next().await, Next::Closed(_)));
    let mut bad = server.connect(Some("bob")).await;
    bad.send_json(json!({"t": "join", "view": "room", "room": "no spaces"})).await;
    assert_eq!(bad.recv().await.kind(), "error");
    server.stop().await;
}

#[tokio::test]
async fn a_resumed_view_gets_exactly_what_it_missed_in_order() {
    let server = TestServer::start().await;
    let last = seed(&server, "lounge", 5).await;
    seed(&server, "elsewhere", 2).await;
    let (_, catch_up) = server.join("bob", "lounge", 0).await;
    assert_eq!(catch_up.iter().map(|f| f.pos()).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
    let (mut bob, catch_up) = server.join("bob", "lounge", 2).await;
    let positions: Vec<u64> = catch_up.iter().map(|f| f.pos()).collect();
    assert_eq!(positions, [3, 4, 5]);
    assert!(catch_up.iter().all(|f| f.kind() == "msg"));
    let (_, nothing) = server.join("carol", "lounge", last).await;
    assert!(nothing.is_empty());
    bob.send_message(1, Uuid::new_v4(), "live again").await;
    assert_eq!(bob.recv_kind("msg").await.pos(), 8);
    server.stop().await;
}

#[tokio::test]
async fn a_long_absence_resets_the_list_to_the_latest_page() {
    let config =
        AppConfig { live: LiveConfig { max_replay: 10, page_size: 4, ..LiveConfig::default() }, ..Default::default() };
    let server = TestServer::start_with(std::sync::Arc::new(cqrs_memory::MemoryStore::new()), config).await;
    seed(&server, "lounge", 20).await;
    let (_, catch_up) = server.join("bob", "lounge", 3).await;
    assert_eq!(catch_up.len(), 1);
    let reset = &catch_up[0];
    assert_eq!(reset.kind(), "reset");
    assert_eq!(reset.head["more"], true);
    assert_eq!(reset.pos(), 20);
    assert_eq!(reset.html.matches("<li").count(), 4);
    server.stop().await;
}

/// The room's channel holds 256 updates; a view that cannot keep up resyncs from its own
/// position (here from the room's window, which holds all 600) and still shows every message
/// once, in order.
#[tokio::test]
async fn a_lagging_view_resyncs_without_gaps_or_duplicates() {
    let mut config = AppConfig::default();
    config.rooms.window.messages = 1_000;
    let server = TestServer::start_with(std::sync::Arc::new(cqrs_memory::MemoryStore::new()), config).await;
    let (mut bob, _) = server.join("bob", "lounge", 0).await;
    let room = ChatId::parse("lounge").expect("id");
    // Applied without yielding: on this single-threaded test runtime bob's view task cannot
    // run in between, so it falls 600 updates behind its 256-slot channel.
    for i in 1..=600u64 {
        let event = livechat_app::domain::ChatEvent::MessageSent(livechat_app::domain::MessageSent {
            chat_id: room.clone(),
            sender: "flood".into(),
            content: format!("m{i}"),
            sent_at: Timestamp(0),
            number: i,
            mentions: vec![],
        });
        let envelope = cqrs_core::Envelope {
            event,
            event_id: cqrs_core::EventId::new(),
            stream_id: room.stream_id(),
            version: cqrs_core::Version(i),
            position: Position(i),
            recorded_at: Timestamp(0),
            metadata: std::sync::Arc::default(),
        };
        server.state.model.apply(&envelope).await.expect("applied");
    }
    let positions: Vec<u64> = bob.messages(600).await.iter().map(|m| m.pos()).collect();
    assert_eq!(positions, (1..=600).collect::<Vec<_>>());
    assert!(server.state.metrics.reading().value("livechat_resyncs_total") >= 1.0);
    server.stop().await;
}

#[tokio::test]
async fn a_new_message_frame_is_the_same_size_in_a_room_of_10_and_of_10_000() {
    let server = TestServer::start().await;
    seed(&server, "small", 10).await;
    let last = seed(&server, "large", 10_000).await;
    let (mut small, _) = server.join("viewer", "small", last).await;
    let (mut large, _) = server.join("viewer", "large", last).await;
    let (mut sender, _) = server.join("alice", "small", last).await;
    sender.send_message(1, Uuid::new_v4(), &"a".repeat(120)).await;
    let in_small = small.recv_kind("msg").await;
    let (mut sender, _) = server.join("alice", "large", last).await;
    sender.send_message(2, Uuid::new_v4(), &"a".repeat(120)).await;
    let in_large = large.recv_kind("msg").await;
    assert_eq!(in_small.pos().to_string().len(), in_large.pos().to_string().len());
    // Only the message's number in its room (data-version, data-rev) has more digits.
    let digits = |frame: &crate::support::Frame| {
        let version = frame.html.split("data-version=\"").nth(1).and_then(|r| r.split('"').next()).expect("version");
        2 * version.len()
    };
    assert_eq!(
        in_small.len - digits(&in_small),
        in_large.len - digits(&in_large),
        "frame size does not depend on the room's history"
    );
    assert!(in_small.len <= in_small.html.len() + 64);
    println!("new-message frame: {} bytes ({} of HTML)", in_small.len, in_small.html.len());
    server.stop().await;
}

#[tokio::test]
async fn presence_shows_who_is_here_and_who_left() {
    let config = AppConfig {
        live: LiveConfig { presence_interval: Duration::from_millis(10), ..LiveConfig::default() },
        ..Default::default()
    };
    let server = TestServer::start_with(std::sync::Arc::new(cqrs_memory::MemoryStore::new()), config).await;
    let (mut bob, _) = server.join("bob", "lounge", 0).await;
    let (alice, _) = server.join("alice", "lounge", 0).await;
    // The list and the count are separate regions, each sent only when it changed.
    let (mut list, mut count) = (String::new(), String::new());
    while !(list.contains("alice") && list.contains("bob") && count == "2") {
        let frame = bob.recv_kind("morph").await;
        match frame.head["id"].as_str() {
            Some("presence") => list = frame.html,
            Some("presence-count") => count = frame.html,
            other => panic!("unexpected region {other:?}"),
        }
    }
    drop(alice);
    while list.contains("alice") || count != "1" {
        let frame = bob.recv_kind("morph").await;
        match frame.head["id"].as_str() {
            Some("presence") => list = frame.html,
            Some("presence-count") => count = frame.html,
            other => panic!("unexpected region {other:?}"),
        }
    }
    assert!(list.contains("bob"));
    server.stop().await;
}

#[tokio::test]
async fn the_lobby_and_dashboard_are_live() {
    let server = TestServer::start().await;
    let mut lobby = server.connect(None).await;
    lobby.send_json(json!({"t": "join", "view": "lobby"})).await;
    lobby.recv_kind("joined").await;
    let (mut alice, _) = server.join("alice", "lobby-test", 0).await;
    alice.send_message(1, Uuid::new_v4(), "hi").await;
    loop {
        let frame = lobby.recv_kind("morph").await;
        assert_eq!(frame.head["id"], "rooms");
        if frame.html.contains("lobby-test") && frame.html.contains("1 message") {
            break;
        }
    }
    let mut dashboard = server.connect(None).await;
    dashboard.send_json(json!({"t": "join", "view": "dashboard"})).await;
    let frame = dashboard.recv_kind("morph").await;
    assert_eq!(frame.head["id"], "metrics");
    assert!(frame.html.contains("Connected views"), "{}", frame.html);
    loop {
        // The table updates every second; it counts the commands sent above.
        let frame = dashboard.recv_kind("morph").await;
        if frame.html.contains("<th scope=\"row\">Commands accepted / refused</th><td>1 / 0</td>") {
            break;
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn too_many_frames_are_refused_then_the_connection_is_closed() {
    let config = AppConfig {
        live: LiveConfig { frames_per_second: 1.0, frame_burst: 2.0, max_refused_frames: 3, ..LiveConfig::default() },
        ..Default::default()
    };
    let server = TestServer::start_with(std::sync::Arc::new(cqrs_memory::MemoryStore::new()), config).await;
    let (mut flood, _) = server.join("flood", "lounge", 0).await;
    for _ in 0..10 {
        flood.send_json(json!({"t": "ping"})).await;
    }
    let mut errors = 0;
    let close = loop {
        match flood.next().await {
            Next::Frame(frame) if frame.kind() == "error" => errors += 1,
            Next::Frame(_) => {}
            Next::Closed(close) => break close,
        }
    };
    assert_eq!(errors, 3);
    assert_eq!(close.expect("close frame").code, CloseCode::Policy);
    server.stop().await;
}

#[tokio::test]
async fn a_view_that_never_joins_is_closed() {
    let config = AppConfig {
        live: LiveConfig { join_timeout: Duration::from_millis(100), ..LiveConfig::default() },
        ..Default::default()
    };
    let server = TestServer::start_with(std::sync::Arc::new(cqrs_memory::MemoryStore::new()), config).await;
    let mut idle = server.connect(Some("idle")).await;
    assert_eq!(idle.closed().await.expect("close frame").code, CloseCode::Policy);
    server.stop().await;
}

#[tokio::test]
async fn shutdown_closes_views_with_going_away() {
    let server = TestServer::start().await;
    let (mut bob, _) = server.join("bob", "lounge", 0).await;
    let stopping = tokio::spawn(server.stop());
    assert_eq!(bob.closed().await.expect("close frame").code, CloseCode::Away);
    stopping.await.expect("stopped");
}

// ---- HTTP pages ----

#[tokio::test]
async fn pages_render_on_the_server_with_escaped_text() {
    let server = TestServer::start().await;
    let lobby = server.get("/", None).await;
    assert_eq!(lobby.status, 200);
    assert!(lobby.body.contains("<form id=\"join\""));
    assert!(lobby.body.contains("name=\"name\"") && lobby.body.contains("name=\"room\""));

    let asks_name = server.get("/lounge", None).await;
    assert!(asks_name.body.contains("<form id=\"join\"") && asks_name.body.contains("value=\"lounge\""));

    let joined = server.post("/join", "name=Zo%C3%AB&room=lounge", "").await;
    assert_eq!(joined.status, 303);
    assert_eq!(joined.header("location"), Some("/lounge"));
    assert!(joined.header("set-cookie").expect("cookie").starts_with("livechat_name=Zo%C3%AB;"));
    let refused = server.post("/join", "name=&room=a%20b", "").await;
    assert_eq!(refused.status, 400);
    assert!(refused.body.contains("role=\"alert\""));

    let (mut eve, _) = server.join("eve", "lounge", 0).await;
    eve.send_message(1, Uuid::new_v4(), "<script>alert(1)</script><img src=x onerror=alert(2)>").await;
    assert_eq!(ack(&mut eve).await["ok"], true);
    eve.recv_kind("msg").await;
    let room = server.get("/lounge", Some("bob")).await;
    assert_eq!(room.status, 200);
    assert!(room.body.contains("role=\"log\""));
    assert!(room.body.contains("<form id=\"send\""));
    assert!(room.body.contains("&lt;script&gt;alert(1)&lt;/script&gt;&lt;img src=x onerror=alert(2)&gt;"));
    assert!(!room.body.contains("<script>alert"));
    assert!(room.body.contains("data-live=\"connecting\"") && room.body.contains("role=\"status\""));

    assert_eq!(server.get("/no%20such", Some("bob")).await.status, 404);
    assert_eq!(server.get("/health", None).await.status, 200);
    let metrics = server.get("/metrics", None).await;
    assert!(metrics.body.contains("livechat_commands_ok_total 1\n"), "{}", metrics.body);
    assert!(server.get("/dashboard", None).await.body.contains("id=\"metrics\""));
    let script = server.get(&server.state.assets.script, None).await;
    assert!(script.header("cache-control").expect("cached").contains("immutable"));
    server.stop().await;
}

#[tokio::test]
async fn the_page_shows_the_latest_100_and_older_pages_load_on_request() {
    let server = TestServer::start().await;
    seed(&server, "big", 250).await;
    let page = server.get("/big", Some("bob")).await;
    assert_eq!(page.body.matches("<li class=\"msg\"").count(), 100);
    assert!(page.body.contains("data-first-pos=\"151\"") && page.body.contains("data-last-pos=\"250\""));
    assert!(page.body.contains("data-has-more=\"true\""));
    let older = server.get("/big/older?before=151", None).await;
    assert_eq!(older.body.matches("<li").count(), 100);
    assert!(older.body.contains("id=\"m-51\"") && older.body.contains("id=\"m-150\""));
    assert_eq!(older.header("x-has-more"), Some("true"));
    let oldest = server.get("/big/older?before=51", None).await;
    assert_eq!(oldest.body.matches("<li").count(), 50);
    assert_eq!(oldest.header("x-has-more"), Some("false"));
    let no_js = server.get("/big?before=51", Some("bob")).await;
    assert_eq!(no_js.body.matches("<li class=\"msg\"").count(), 50);
    server.stop().await;
}

#[tokio::test]
async fn the_composer_works_without_javascript_and_refuses_foreign_origins() {
    let server = TestServer::start().await;
    let id = Uuid::new_v4();
    let form = format!("message=no+script+needed&id={id}");
    let cookie = "Cookie: livechat_name=bob\r\n";
    let posted = server.post("/lounge/send", &form, cookie).await;
    assert_eq!(posted.status, 303);
    let again = server.post("/lounge/send", &form, cookie).await;
    assert_eq!(again.status, 303, "a double submit is idempotent");
    let page = server.get("/lounge", Some("bob")).await;
    assert_eq!(page.body.matches("no script needed").count(), 1, "read your writes, once");
    let empty = server.post("/lounge/send", &format!("message=+&id={}", Uuid::new_v4()), cookie).await;
    assert_eq!(empty.status, 422);
    assert!(empty.body.contains("the message is empty"));
    let foreign = server
        .post(
            "/lounge/send",
            &format!("message=x&id={}", Uuid::new_v4()),
            &format!("{cookie}Origin: http://evil.example\r\n"),
        )
        .await;
    assert_eq!(foreign.status, 403);
    server.stop().await;
}
