//! What a person expects from the chat (edit, delete, typing, links, mentions), the limits,
//! the HTTP edge (headers, Host, Origin, cookies), the bounded read model and the dashboard.

use std::sync::Arc;
use std::time::Duration;

use cqrs_core::{CommandEnvelope, Dispatcher, Store, Timestamp};
use livechat_app::domain::{Chat, ChatCommand, ChatId, SendMessage};
use livechat_app::metrics::Limit;
use livechat_app::AppConfig;
use serde_json::json;
use uuid::Uuid;

use crate::support::{connect_as, Client, Frame, TestServer, TIMEOUT};
use crate::websocket::{ack, seed, stored_messages};

fn edit_frame(reference: u64, version: u64, text: &str) -> serde_json::Value {
    json!({"t": "edit", "ref": reference, "id": Uuid::new_v4(), "version": version, "message": text})
}

fn delete_frame(reference: u64, version: u64) -> serde_json::Value {
    json!({"t": "delete", "ref": reference, "id": Uuid::new_v4(), "version": version})
}

/// The body text of a message's HTML.
fn version_of(frame: &Frame) -> u64 {
    frame
        .html
        .split("data-version=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .and_then(|v| v.parse().ok())
        .expect("version")
}

#[tokio::test]
async fn edits_and_deletes_update_every_viewer_in_place_and_the_text_is_gone() {
    let server = TestServer::start().await;
    let (mut alice, _) = server.join("alice", "lounge", 0).await;
    let (mut bob, _) = server.join("bob", "lounge", 0).await;
    alice.send_message(1, Uuid::new_v4(), "helo wrld").await;
    let [reply, _] = <[Frame; 2]>::try_from(alice.until_each(&["ack", "msg"]).await).expect("two frames");
    assert_eq!(reply.head["status"], "stored");
    let original = bob.recv_kind("msg").await;
    let version = version_of(&original);

    alice.send_json(edit_frame(2, version, "hello world")).await;
    let [reply, mine] = <[Frame; 2]>::try_from(alice.until_each(&["ack", "msg"]).await).expect("two frames");
    assert_eq!(reply.head["status"], "stored");
    let theirs = bob.recv_kind("msg").await;
    for edited in [mine, theirs] {
        assert_eq!(edited.pos(), original.pos(), "the same message, updated in place");
        assert!(edited.html.contains("hello world") && edited.html.contains("(edited)"), "{}", edited.html);
        assert!(edited.html.contains("data-edited") && edited.html.matches("<li").count() == 1);
        assert!(edited.len <= edited.html.len() + 64, "one message, a short header");
    }

    bob.send_json(edit_frame(1, version, "bob was here")).await;
    let refused = ack(&mut bob).await;
    assert_eq!(refused["status"], "refused");
    assert_eq!(refused["error"], "you can only edit or delete your own messages");

    alice.send_json(delete_frame(3, version)).await;
    assert_eq!(alice.until_each(&["ack", "msg"]).await[0].head["status"], "stored");
    let tombstone = bob.recv_kind("msg").await;
    assert!(tombstone.html.contains("message deleted") && !tombstone.html.contains("hello"), "{}", tombstone.html);
    alice.send_json(edit_frame(4, version, "back from the dead")).await;
    assert_eq!(ack(&mut alice).await["error"], "the message was deleted");

    let (_, catch_up) = server.join("carol", "lounge", 0).await;
    assert_eq!(catch_up.len(), 1);
    assert!(catch_up[0].html.contains("message deleted") && !catch_up[0].html.contains("hel"), "{}", catch_up[0].html);
    let page = server.get("/lounge", Some("dave")).await;
    assert!(page.body.contains("message deleted") && !page.body.contains("helo") && !page.body.contains("hello world"));
    server.stop().await;
}

#[tokio::test]
async fn older_pages_read_from_the_store_show_edits_and_never_a_deleted_text() {
    let mut config = AppConfig::default();
    config.rooms.window.messages = 10;
    let server = TestServer::start_with(Arc::new(cqrs_memory::MemoryStore::new()), config).await;
    seed(&server, "hist", 50).await;
    // Message 5 (by seed4, sent at 8 s) is edited and message 6 (seed5, 10 s) deleted, right after.
    let room = ChatId::parse("hist").expect("room");
    let edit = ChatCommand::EditMessage {
        chat_id: room.clone(),
        version: 5,
        sender: "seed4".into(),
        content: "edited long ago".into(),
        mentions: vec![],
        edited_at: Timestamp(9_000_000),
    };
    let delete = ChatCommand::DeleteMessage {
        chat_id: room.clone(),
        version: 6,
        sender: "seed5".into(),
        deleted_at: Timestamp(11_000_000),
    };
    for command in [edit, delete] {
        server.state.dispatcher.dispatch(CommandEnvelope::new(command)).await.expect("stored");
    }
    server
        .state
        .progress
        .wait_for("chat-read-model", server.state.store.head().await.expect("head"), TIMEOUT)
        .await
        .expect("applied");
    let huge = format!("/hist/older?before=20&v={}", u64::MAX);
    let page = server.get(&huge, None).await;
    assert_eq!(page.status, 200, "a version hint past the end is clamped");
    for path in ["/hist/older?before=20", "/hist/older?before=20&v=20", "/hist?before=20"] {
        let page = server.get(path, Some("bob")).await;
        assert_eq!(page.status, 200, "{path}");
        assert!(page.body.contains("edited long ago") && page.body.contains("(edited)"), "{path}: {}", page.body);
        assert!(page.body.contains("message deleted"), "{path}");
        assert!(!page.body.contains("seeded message 5<") && !page.body.contains("seeded message 4<"), "{path}");
        assert!(page.body.contains("seeded message 3<"), "{path}");
    }
    assert_eq!(stored_messages(&server, "hist").await, 50);
    server.stop().await;
}

#[tokio::test]
async fn typing_is_shown_to_the_others_throttled_and_ends_with_the_message() {
    let server = TestServer::start().await;
    let (mut alice, _) = server.join("alice", "lounge", 0).await;
    let (mut bob, _) = server.join("bob", "lounge", 0).await;
    alice.send_json(json!({"t": "typing"})).await;
    assert_eq!(bob.recv_kind("typing").await.head["names"], json!(["alice"]));
    alice.send_json(json!({"t": "typing"})).await; // more of the same: no new frame for bob
    alice.send_message(1, Uuid::new_v4(), "done typing").await;
    assert_eq!(ack(&mut alice).await["status"], "stored");
    assert_eq!(bob.recv_kind("typing").await.head["names"], json!([]), "sending ends typing");
    // (The one-a-second throttle is tested with a fixed clock in rooms::presence.)
    assert!(server.get("/metrics", None).await.body.contains("livechat_limited_total{limit=\"typing\"}"));
    server.stop().await;
}

#[tokio::test]
async fn links_and_mentions_of_people_in_the_room() {
    let server = TestServer::start().await;
    let (mut alice, _) = server.join("alice", "lounge", 0).await;
    let (mut bob, _) = server.join("bob", "lounge", 0).await;
    alice
        .send_message(1, Uuid::new_v4(), "@bob see https://example.com/x?a=1 not javascript:alert(1) or @nobody")
        .await;
    assert_eq!(ack(&mut alice).await["status"], "stored");
    let message = bob.recv_kind("msg").await;
    assert!(message.html.contains("<span class=\"mention\" data-name=\"bob\">@bob</span>"), "{}", message.html);
    assert!(!message.html.contains("data-name=\"nobody\""));
    assert!(message
        .html
        .contains("<a href=\"https://example.com/x?a=1\" rel=\"noopener noreferrer nofollow ugc\" target=\"_blank\">"));
    assert!(!message.html.contains("href=\"javascript"));
    server.stop().await;
}

// ---- limits ----

#[tokio::test]
async fn commands_are_limited_per_address_whatever_the_name() {
    let mut config = AppConfig::default();
    config.limits.commands_burst = 3;
    config.limits.commands_per_second = 0.001;
    let server = TestServer::start_with(Arc::new(cqrs_memory::MemoryStore::new()), config).await;
    let mut replies = Vec::new();
    for (i, name) in ["ann", "ben", "cat", "dan"].iter().enumerate() {
        let mut client = connect_as(server.addr, name, "198.51.100.7").await;
        client.join_room("lounge", 0).await;
        client.send_message(i as u64, Uuid::new_v4(), "hello").await;
        replies.push(ack(&mut client).await);
    }
    let statuses: Vec<&str> = replies.iter().map(|r| r["status"].as_str().unwrap_or("")).collect();
    assert_eq!(statuses, ["stored", "stored", "stored", "refused"]);
    assert!(replies[3]["error"].as_str().is_some_and(|e| e.contains("too many messages from your network")));
    let mut other = connect_as(server.addr, "eve", "198.51.100.8").await;
    other.join_room("lounge", 0).await;
    other.send_message(1, Uuid::new_v4(), "another address").await;
    assert_eq!(ack(&mut other).await["status"], "stored");
    assert!(server.get("/metrics", None).await.body.contains("livechat_limited_total{limit=\"address_commands\"} 1\n"));
    server.stop().await;
}

#[tokio::test]
async fn room_creation_is_capped_per_address() {
    let mut config = AppConfig::default();
    config.limits.rooms_per_minute = 2;
    let server = TestServer::start_with(Arc::new(cqrs_memory::MemoryStore::new()), config).await;
    let mut statuses = Vec::new();
    for room in ["new-1", "new-2", "new-3"] {
        let mut client = connect_as(server.addr, "ann", "198.51.100.9").await;
        client.join_room(room, 0).await;
        client.send_message(1, Uuid::new_v4(), "first!").await;
        let reply = ack(&mut client).await;
        statuses.push(reply["status"].as_str().unwrap_or("").to_owned());
        if room == "new-3" {
            assert!(reply["error"].as_str().is_some_and(|e| e.contains("too many new rooms")), "{reply}");
        }
    }
    assert_eq!(statuses, ["stored", "stored", "refused"]);
    // An existing room is no creation.
    let mut client = connect_as(server.addr, "ann", "198.51.100.9").await;
    client.join_room("new-1", 0).await;
    client.send_message(2, Uuid::new_v4(), "again").await;
    assert_eq!(ack(&mut client).await["status"], "stored");
    assert!(server.get("/metrics", None).await.body.contains("livechat_limited_total{limit=\"room_creation\"} 1\n"));
    server.stop().await;
}

#[tokio::test]
async fn connections_are_capped_per_address_with_a_message() {
    let mut config = AppConfig::default();
    config.limits.max_connections_per_address = 2;
    let server = TestServer::start_with(Arc::new(cqrs_memory::MemoryStore::new()), config).await;
    let _first = connect_as(server.addr, "ann", "198.51.100.10").await;
    let _second = connect_as(server.addr, "ann", "198.51.100.10").await;
    let headers = [
        ("cookie".to_owned(), "livechat_name=ann".to_owned()),
        ("x-forwarded-for".to_owned(), "198.51.100.10".to_owned()),
    ];
    match server.connect_with(&headers).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 429);
            let body = String::from_utf8_lossy(response.body().as_deref().unwrap_or_default()).to_string();
            assert!(body.contains("too many connections from your address"), "{body}");
        }
        Err(other) => panic!("expected a 429, got {other}"),
        Ok(_) => panic!("a third connection from one address was accepted"),
    }
    let _other = connect_as(server.addr, "ben", "198.51.100.11").await;
    assert_eq!(server.state.metrics.limited_count(Limit::AddressConnections), 1);
    server.stop().await;
}

#[tokio::test]
async fn connections_are_capped_in_all_with_a_message() {
    let mut config = AppConfig::default();
    config.limits.max_connections = 2;
    let server = TestServer::start_with(Arc::new(cqrs_memory::MemoryStore::new()), config).await;
    let _first = connect_as(server.addr, "ann", "198.51.100.10").await;
    let _second = connect_as(server.addr, "ben", "198.51.100.11").await;
    let full = server.get("/lounge", Some("cy")).await;
    assert_eq!(full.status, 503);
    assert!(full.body.contains("limit of 2 connections"), "{}", full.body);
    assert_eq!(server.state.metrics.limited_count(Limit::Connections), 1);
    // A load balancer's check still gets its answer, from the reserve past the cap.
    let health = server.get("/health", None).await;
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
    assert_eq!(server.state.metrics.limited_count(Limit::Connections), 1);
    server.stop().await;
}

// ---- the HTTP edge ----

#[tokio::test]
async fn pages_carry_security_headers() {
    let server = TestServer::start().await;
    for path in ["/", "/lounge", "/dashboard", "/health"] {
        let response = server.get(path, Some("bob")).await;
        let csp = response.header("content-security-policy").expect("a CSP");
        assert!(csp.contains("frame-ancestors 'none'") && csp.contains("script-src 'self'"), "{csp}");
        assert!(!csp.contains("unsafe-inline"), "{csp}");
        assert_eq!(response.header("x-content-type-options"), Some("nosniff"));
        assert_eq!(response.header("x-frame-options"), Some("DENY"));
        if path != "/health" {
            assert!(
                !response.body.contains("<script>") && !response.body.contains("style=\""),
                "no inline script or style"
            );
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn an_unknown_host_is_refused_so_a_rebound_name_gets_nothing() {
    let mut config = AppConfig::default();
    config.allowed_origins.push("https://chat.example.test".to_owned());
    let server = TestServer::start_with(Arc::new(cqrs_memory::MemoryStore::new()), config).await;
    let raw = |host: &str, extra: &str| {
        format!("GET /lounge HTTP/1.1\r\nHost: {host}\r\nCookie: livechat_name=bob\r\n{extra}Connection: close\r\n\r\n")
    };
    assert_eq!(server.request(&raw("evil.test:4000", "")).await.status, 421);
    assert_eq!(server.request(&raw("chat.example.test", "")).await.status, 200);
    assert_eq!(server.request(&raw("localhost:4000", "")).await.status, 200);
    let health = "GET /health HTTP/1.1\r\nHost: chat-backend:4000\r\nConnection: close\r\n\r\n";
    assert_eq!(server.request(health).await.status, 200, "a load balancer may ask by any name");
    // A websocket from a page on the rebound name: Host and Origin agree, and are refused.
    let headers = [
        ("host".to_owned(), "evil.test:4000".to_owned()),
        ("origin".to_owned(), "http://evil.test:4000".to_owned()),
        ("cookie".to_owned(), "livechat_name=eve".to_owned()),
    ];
    match server.connect_with(&headers).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => assert_eq!(response.status(), 421),
        Err(other) => panic!("expected a refusal, got {other}"),
        Ok(_) => panic!("a rebound origin opened a websocket"),
    }
    server.stop().await;
}

#[tokio::test]
async fn refusals_keep_their_status_and_say_why() {
    let server = TestServer::start().await;
    let evil = "Origin: http://evil.test\r\n";
    let join = server.post("/join", "name=ann&room=lounge", evil).await;
    assert_eq!((join.status, join.body.as_str()), (403, "cross-origin form refused\n"));
    let send = server
        .post(
            "/lounge/send",
            "message=hi&id=0b2a4c1e-5f0d-4b7e-9a51-4f6e3d2c1b0a",
            &format!("{evil}Cookie: livechat_name=ann\r\n"),
        )
        .await;
    assert_eq!((send.status, send.body.as_str()), (403, "cross-origin form refused\n"));
    let ours = server.post("/join", "name=ann&room=lounge", &format!("Origin: http://{}\r\n", server.addr)).await;
    assert_eq!(ours.status, 303, "a form from our own page passes");
    let bad_room = server.get("/a.b", Some("ann")).await;
    assert_eq!(bad_room.status, 404);
    assert!(bad_room.body.starts_with("no such room: "), "{}", bad_room.body);
    let older = server.get("/lounge/older", Some("ann")).await;
    assert_eq!((older.status, older.body.as_str()), (400, "?before=POSITION is required\n"));
    let admin = server.get("/admin/handlers", None).await;
    assert_eq!(admin.status, 403);
    assert!(admin.body.contains("this console admits nobody here"), "{}", admin.body);
    server.stop().await;
}

#[tokio::test]
async fn the_name_cookie_is_secure_over_tls() {
    let server = TestServer::start().await;
    let plain = server.post("/join", "name=ann&room=lounge", "").await;
    assert!(!plain.header("set-cookie").expect("cookie").contains("Secure"));
    let forwarded = server.post("/join", "name=ann&room=lounge", "X-Forwarded-Proto: https\r\n").await;
    assert!(forwarded.header("set-cookie").expect("cookie").contains("; Secure"), "a trusted proxy says https");
    server.stop().await;
    let config = AppConfig { behind_tls: true, ..AppConfig::default() };
    let server = TestServer::start_with(Arc::new(cqrs_memory::MemoryStore::new()), config).await;
    assert!(server
        .post("/join", "name=ann&room=lounge", "")
        .await
        .header("set-cookie")
        .expect("cookie")
        .contains("; Secure"));
    server.stop().await;
}

#[tokio::test]
async fn reserved_room_names_and_deceptive_names_are_refused() {
    let server = TestServer::start().await;
    let reserved = server.post("/join", "name=ann&room=dashboard", "").await;
    assert_eq!(reserved.status, 400);
    assert!(reserved.body.contains("reserved"), "{}", reserved.body);
    let bidi = server.post("/join", "name=ann%E2%80%AEnimda&room=lounge", "").await;
    assert_eq!(bidi.status, 400);
    assert!(bidi.body.contains("invisible or text-direction"), "{}", bidi.body);
    assert_eq!(
        server.get("/metrics", Some("bob")).await.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    server.stop().await;
}

// ---- bounded by design ----

/// A store holding `rooms` rooms of `messages` messages each, written before the app starts.
async fn filled_store(rooms: usize, messages: usize) -> Arc<dyn Store> {
    let store: Arc<dyn Store> = Arc::new(cqrs_memory::MemoryStore::new());
    let dispatcher = Dispatcher::<Chat, dyn Store>::new(Arc::clone(&store));
    for room in 0..rooms {
        for i in 0..messages {
            let command = SendMessage {
                chat_id: ChatId::parse(&format!("old-{room}")).expect("room"),
                sender: format!("u{}", i % 9),
                content: format!("old message {i}"),
                sent_at: Timestamp(i as i64 * 2_000_000),
            };
            dispatcher.dispatch(CommandEnvelope::new(ChatCommand::from(command))).await.expect("stored");
        }
    }
    store
}

#[tokio::test]
async fn start_up_replays_nothing_and_rooms_load_on_demand_then_leave_memory() {
    let mut config = AppConfig::default();
    config.rooms.idle_eviction = Duration::ZERO;
    let server = TestServer::start_with(filled_store(5, 40).await, config).await;
    assert_eq!(server.state.model.events(), 0, "nothing replayed at start");
    assert_eq!(server.state.model.resident_rooms(), 0);
    let page = server.get("/old-3", Some("bob")).await;
    assert_eq!(page.status, 200);
    assert_eq!(page.body.matches("<li class=\"msg\"").count(), 40);
    assert_eq!(server.state.model.resident_rooms(), 1);
    assert_eq!(server.state.model.loaded_rooms(), 1);
    // The lobby knows the rooms from the log's tail.
    assert!(server.state.model.rooms(50).iter().any(|r| r.id.as_str() == "old-3" && r.messages == 40));
    server.state.model.sweep();
    assert_eq!(server.state.model.resident_rooms(), 0, "an idle room without viewers leaves memory");
    let (mut bob, catch_up) = server.join("bob", "old-3", 0).await;
    assert_eq!(catch_up.len(), 40, "and comes back from the store");
    bob.send_message(1, Uuid::new_v4(), "new in an old room").await;
    assert_eq!(ack(&mut bob).await["status"], "stored");
    assert!(bob.recv_kind("msg").await.html.contains("new in an old room"));
    server.state.model.sweep();
    assert_eq!(server.state.model.resident_rooms(), 1, "a room with a viewer stays");
    server.stop().await;
}

#[tokio::test]
async fn the_lobby_keeps_a_bounded_set_of_the_most_recent_rooms() {
    let mut config = AppConfig::default();
    config.rooms.lobby_rooms = 5;
    let server = TestServer::start_with(Arc::new(cqrs_memory::MemoryStore::new()), config).await;
    for room in 0..8 {
        seed(&server, &format!("r{room}"), 1).await;
    }
    let rooms: Vec<String> = server.state.model.rooms(50).into_iter().map(|r| r.id.to_string()).collect();
    assert_eq!(rooms, ["r7", "r6", "r5", "r4", "r3"]);
    server.stop().await;
}

#[tokio::test]
async fn the_dashboard_charts_the_last_15_minutes_and_lists_handlers() {
    let server = TestServer::start().await;
    let mut dashboard: Client = server.connect(None).await;
    dashboard.send_json(json!({"t": "join", "view": "dashboard"})).await;
    loop {
        let frame = dashboard.recv_kind("morph").await;
        if frame.html.contains("<polyline") {
            for chart in ["commands", "p50", "p99", "views", "events", "lag", "frames", "bytes"] {
                assert!(frame.html.contains(&format!("data-chart=\"{chart}\"")), "{chart}");
            }
            assert!(frame.html.contains("data-handler=\"chat-read-model\"") && frame.html.contains("running"));
            assert!(frame.html.contains("Connected views"), "the numbers are still there");
            break;
        }
    }
    server.stop().await;
}
