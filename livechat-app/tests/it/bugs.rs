//! Regression tests of issue 13's eight bugs, against the real server on 127.0.0.1.

use std::sync::Arc;
use std::time::Duration;

use cqrs_core::Consistency;
use livechat_app::commands::{Outcome, RoomFacts, Sender};
use livechat_app::domain::ChatId;
use livechat_app::rooms::HANDLER_NAME;
use livechat_app::web::security::ClientAddress;
use livechat_app::AppConfig;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use uuid::Uuid;

use crate::support::{FaultyStore, RawSocket, TestServer, TIMEOUT};
use crate::websocket::{ack, seed_with, stored_messages};

// ---- 1. a message stored but reported as failed is posted twice ----

#[tokio::test]
async fn an_append_stored_but_reported_unavailable_is_retried_by_the_server_and_posted_once() {
    let store = FaultyStore::new();
    let server = TestServer::start_with(store.clone(), AppConfig::default()).await;
    let (mut alice, _) = server.join("alice", "lounge", 0).await;
    store.fail_next_appends(1);
    alice.send_message(1, Uuid::new_v4(), "only once").await;
    assert_eq!(ack(&mut alice).await, json!({"t": "ack", "ref": 1, "ok": true, "status": "stored"}));
    assert_eq!(stored_messages(&server, "lounge").await, 1);
    assert_eq!(server.state.metrics.reading().value("livechat_commands_retried_total"), 1.0, "the server retried once");
    server.stop().await;
}

#[tokio::test]
async fn an_unknown_outcome_is_said_and_a_resend_with_the_same_id_posts_once() {
    let store = FaultyStore::new();
    let server = TestServer::start_with(store.clone(), AppConfig::default()).await;
    let (mut alice, _) = server.join("alice", "lounge", 0).await;
    let (mut bob, _) = server.join("bob", "lounge", 0).await;
    let id = Uuid::new_v4();
    store.fail_next_appends(2);
    alice.send_message(1, id, "maybe stored").await;
    let reply = ack(&mut alice).await;
    assert_eq!((reply["ok"].clone(), reply["status"].clone()), (json!(false), json!("unknown")), "{reply}");
    assert!(reply["error"].as_str().is_some_and(|e| e.contains("retrying")), "{reply}");
    // The client keeps the id and sends again: stored, once.
    alice.send_message(2, id, "maybe stored").await;
    assert_eq!(ack(&mut alice).await["status"], "stored");
    alice.send_message(3, Uuid::new_v4(), "after").await;
    assert_eq!(ack(&mut alice).await["status"], "stored");
    let seen: Vec<String> = bob.messages(2).await.into_iter().map(|m| m.html).collect();
    assert!(seen[0].contains("maybe stored") && seen[1].contains("after"), "{seen:?}");
    assert_eq!(stored_messages(&server, "lounge").await, 2);
    server.stop().await;
}

#[tokio::test]
async fn the_form_keeps_its_id_and_text_when_the_outcome_is_unknown() {
    let store = FaultyStore::new();
    let server = TestServer::start_with(store.clone(), AppConfig::default()).await;
    let id = Uuid::new_v4();
    let form = format!("message=kept+text&id={id}");
    let cookie = "Cookie: livechat_name=bob\r\n";
    store.fail_next_appends(2);
    let unknown = server.post("/lounge/send", &form, cookie).await;
    assert_eq!(unknown.status, 503);
    assert!(unknown.body.contains(&format!("name=\"id\" value=\"{id}\"")), "the same id: {}", unknown.body);
    assert!(unknown.body.contains(">kept text</textarea>"), "the text is kept");
    assert!(unknown.body.contains("Press Send again"));
    let again = server.post("/lounge/send", &form, cookie).await;
    assert_eq!(again.status, 303);
    let page = server.get("/lounge", Some("bob")).await;
    assert_eq!(page.body.matches("kept text").count(), 1, "{}", page.body);
    assert_eq!(stored_messages(&server, "lounge").await, 1);
    server.stop().await;
}

// ---- 2. a catch-up frame over the socket's write-buffer cap can never be sent ----

#[tokio::test]
async fn a_reset_after_a_long_absence_is_bounded_by_bytes_with_100_maximum_size_messages() {
    let mut config = AppConfig::default();
    config.live.max_replay = 10;
    let server = TestServer::start_with(Arc::new(cqrs_memory::MemoryStore::new()), config).await;
    // 4 000 characters each, multi-byte and full of quotes: about 16 KB of HTML per message.
    let text = |i: usize| format!("{i:04}{}", "\"é".repeat(1_998));
    seed_with(&server, "big", 100, text).await;
    let (_bob, catch_up) = server.join("bob", "big", 0).await;
    assert_eq!(catch_up.len(), 1, "one reset frame, then joined");
    let reset = &catch_up[0];
    assert_eq!(reset.kind(), "reset");
    assert_eq!(reset.head["more"], true);
    assert!(reset.len <= server.state.live.page_bytes + 1024, "{} bytes", reset.len);
    let shown = reset.html.matches("<li").count();
    assert!((1..100).contains(&shown), "{shown} messages");
    assert!(reset.html.contains("0099"), "the newest is there");
    // The page is bounded the same way.
    let page = server.get("/big", Some("carol")).await;
    assert_eq!(page.status, 200);
    assert!(page.body.len() < 2 * server.state.live.page_bytes, "{} bytes", page.body.len());
    server.stop().await;
}

// ---- 3. /health says ok while the read model is still rebuilding ----

#[tokio::test]
async fn health_and_pages_say_rebuilding_until_the_read_model_reaches_the_head() {
    let store = FaultyStore::new();
    store.hold_head();
    let server = TestServer::start_unready(store.clone(), AppConfig::default()).await;
    let health = server.get("/health", None).await;
    assert_eq!(health.status, 503);
    assert!(health.body.contains("rebuilding"), "{}", health.body);
    let page = server.get("/lounge", Some("bob")).await;
    assert_eq!(page.status, 503);
    assert!(page.body.contains("rebuilding"), "{}", page.body);
    store.release_head();
    let mut ready = server.state.model.ready();
    tokio::time::timeout(TIMEOUT, ready.wait_for(|ready| *ready)).await.expect("ready in time").expect("ready");
    assert_eq!(server.get("/health", None).await.status, 200);
    assert_eq!(server.get("/lounge", Some("bob")).await.status, 200);
    server.stop().await;
}

// ---- 4. a room's first message can land in a room that was just forgotten ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_message_sent_as_the_last_viewer_leaves_is_shown() {
    let mut config = AppConfig::default();
    config.rooms.idle_eviction = Duration::ZERO;
    let server = TestServer::start_with(Arc::new(cqrs_memory::MemoryStore::new()), config).await;
    for i in 0..30u8 {
        // A new room per address each time: the room-creation cap is per address.
        let sender = Sender { name: "alice", address: ClientAddress::Known([198, 51, 100, i].into()) };
        let room = format!("fresh-{i}");
        let (viewer, _) = server.join("visitor", &room, 0).await;
        let id = ChatId::parse(&room).expect("room");
        let state = Arc::clone(&server.state);
        let leave = tokio::spawn(async move {
            drop(viewer);
            for _ in 0..50 {
                state.model.sweep();
                tokio::task::yield_now().await;
            }
        });
        let strong = Consistency::strong([HANDLER_NAME]);
        let text = format!("first words in {room}");
        let facts = RoomFacts { names: vec![], is_new: true };
        let outcome = server.state.commands.send(&id, sender, Uuid::new_v4(), text.clone(), &facts, &strong).await;
        assert_eq!(outcome, Outcome::Stored);
        leave.await.expect("left");
        let page = server.get(&format!("/{room}"), Some("bob")).await;
        assert!(page.body.contains(&text), "iteration {i}: the first message is shown");
        let (_, catch_up) = server.join("late", &room, 0).await;
        assert_eq!(catch_up.len(), 1, "iteration {i}: a new view gets it too");
    }
    server.stop().await;
}

// ---- 5. no HTTP header-read or idle timeout ----

#[tokio::test]
async fn a_client_that_sends_half_a_request_head_is_disconnected() {
    let mut config = AppConfig::default();
    config.http.header_read_timeout = Duration::from_millis(300);
    let server = TestServer::start_with(Arc::new(cqrs_memory::MemoryStore::new()), config).await;
    let mut slow = TcpStream::connect(server.addr).await.expect("connect");
    slow.write_all(format!("GET / HTTP/1.1\r\nHost: {}\r\nX-Slow: ", server.addr).as_bytes()).await.expect("write");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(TIMEOUT, slow.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the half-sent request head was cut off");
    // An idle keep-alive connection is closed too.
    let mut idle = TcpStream::connect(server.addr).await.expect("connect");
    idle.write_all(format!("GET /health HTTP/1.1\r\nHost: {}\r\n\r\n", server.addr).as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    let closed = tokio::time::timeout(TIMEOUT, idle.read_to_end(&mut answer)).await;
    assert!(closed.is_ok(), "an idle keep-alive connection is closed");
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"), "it was answered first");
    assert_eq!(server.get("/health", None).await.status, 200);
    assert!(server.state.metrics.reading().value("livechat_http_header_timeouts_total") >= 1.0);
    server.stop().await;
}

// ---- 6. an idempotency key reused with different content is answered "ok" ----

#[tokio::test]
async fn an_id_reused_with_different_text_is_refused_and_stores_nothing() {
    let server = TestServer::start().await;
    let (mut alice, _) = server.join("alice", "lounge", 0).await;
    let id = Uuid::new_v4();
    alice.send_message(1, id, "the first text").await;
    assert_eq!(ack(&mut alice).await["status"], "stored");
    alice.send_message(2, id, "a different text").await;
    let reply = ack(&mut alice).await;
    assert_eq!(reply["status"], "refused", "{reply}");
    assert!(reply["error"].as_str().is_some_and(|e| e.contains("already used")), "{reply}");
    alice.send_message(3, id, "  the first text ").await;
    assert_eq!(ack(&mut alice).await["status"], "stored", "the same text (as trimmed) is the same message");
    let form = |text: &str| format!("message={text}&id={id}");
    let cookie = "Cookie: livechat_name=alice\r\n";
    let refused = server.post("/lounge/send", &form("third+text"), cookie).await;
    assert_eq!(refused.status, 422);
    assert!(refused.body.contains("already used"));
    assert_eq!(stored_messages(&server, "lounge").await, 1);
    let page = server.get("/lounge", Some("bob")).await;
    assert!(page.body.contains("the first text") && !page.body.contains("a different text"));
    server.stop().await;
}

// ---- 7. close frames are lost; protocol violations end without a close code ----

#[tokio::test]
async fn a_close_frame_reaches_a_client_that_is_still_writing() {
    let server = TestServer::start().await;
    let mut raw = RawSocket::open(server.addr, "alice").await;
    raw.send_frame(0x1, br#"{"t":"join","view":"room","room":"lounge","after":0}"#, true).await;
    // A frame of 200 KiB, over the 64 KiB limit: its header is refused, its payload is still
    // on the way while the server closes.
    raw.send_frame(0x1, &vec![b'x'; 200 * 1024], true).await;
    let (code, _) = raw.close_code().await;
    assert_eq!(code, 1009);
    raw.send_frame(0x8, &1000u16.to_be_bytes(), true).await;
    raw.stream.shutdown().await.expect("shutdown");
    let mut rest = Vec::new();
    let end = tokio::time::timeout(TIMEOUT, raw.stream.read_to_end(&mut rest)).await.expect("closed in time");
    assert!(end.is_ok(), "the server closed with a FIN after the close handshake, not a reset: {end:?}");
    server.stop().await;
}

#[tokio::test]
async fn invalid_utf8_closes_with_1007_and_an_unmasked_frame_with_1002() {
    let server = TestServer::start().await;
    let mut raw = RawSocket::open(server.addr, "alice").await;
    raw.send_frame(0x1, &[b'{', 0xff, 0xfe, b'}'], true).await;
    assert_eq!(raw.close_code().await.0, 1007);
    let mut raw = RawSocket::open(server.addr, "bob").await;
    raw.send_frame(0x1, br#"{"t":"ping"}"#, false).await;
    assert_eq!(raw.close_code().await.0, 1002);
    server.stop().await;
}

#[tokio::test]
async fn frames_with_unknown_fields_are_refused() {
    let server = TestServer::start().await;
    let (mut alice, _) = server.join("alice", "lounge", 0).await;
    // The next frame that answers (presence updates aside).
    async fn answer(client: &mut crate::support::Client) -> crate::support::Frame {
        loop {
            let frame = client.recv().await;
            if frame.kind() != "morph" {
                return frame;
            }
        }
    }
    alice.send_text(r#"{"t":"ping","x":1}"#).await;
    let error = answer(&mut alice).await;
    assert_eq!(error.kind(), "error", "not a pong: {:?}", error.head);
    alice
        .send_text(r#"{"t":"send","ref":1,"id":"67e55044-10b1-426f-9247-bb680e5fe0c8","message":"hi","as":"eve"}"#)
        .await;
    assert_eq!(answer(&mut alice).await.kind(), "error");
    alice.send_text(r#"{"t":"ping"}"#).await;
    assert_eq!(answer(&mut alice).await.kind(), "pong");
    server.stop().await;
}
