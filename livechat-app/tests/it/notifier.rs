//! The mention notifier (an exclusive durable handler with parking), the admin routes for
//! parked events, and who holds each handler on `/metrics` and `/dashboard`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cqrs_core::{HandlerState, Store};
use cqrs_memory::MemoryStore;
use livechat_app::notify::{Deliver, DeliveryError, Notification, Notifications, NotifierConfig, NOTIFIER_NAME};
use livechat_app::AppConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

use crate::support::{request_to, TestServer, TIMEOUT};
use crate::websocket::ack;

/// Records what it delivers; fails while `failing` is set.
#[derive(Default)]
struct Recorder {
    delivered: Mutex<Vec<Notification>>,
    attempts: Mutex<usize>,
    failing: AtomicBool,
}

#[async_trait]
impl Deliver for Recorder {
    async fn deliver(&self, notification: &Notification) -> Result<(), DeliveryError> {
        *self.attempts.lock().expect("lock") += 1;
        if self.failing.load(Ordering::SeqCst) {
            return Err(DeliveryError::Status(503));
        }
        self.delivered.lock().expect("lock").push(notification.clone());
        Ok(())
    }
}

impl Recorder {
    fn to(&self) -> Vec<String> {
        self.delivered.lock().expect("lock").iter().map(|n| format!("{}@{}", n.to, n.room)).collect()
    }
}

fn config(recorder: &Arc<Recorder>, node: &str) -> AppConfig {
    AppConfig {
        notifier: NotifierConfig {
            notifications: Notifications::Custom(Arc::clone(recorder) as Arc<dyn Deliver>),
            attempts_before_parking: 2,
            initial_backoff: Duration::from_millis(10),
        },
        node: node.to_owned(),
        ..AppConfig::default()
    }
}

async fn eventually(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the notifier's status satisfies `check`.
async fn status_until(server: &TestServer, what: &str, check: impl Fn(&cqrs_core::HandlerStatus) -> bool) {
    eventually(what, || server.state.progress.status(NOTIFIER_NAME).is_some_and(|status| check(&status))).await;
}

async fn until_running(server: &TestServer) {
    status_until(server, "the notifier runs", |s| s.state == HandlerState::Running).await;
}

/// Alice (in `room`, with bob present) writes `text`; returns once it is acknowledged.
async fn mention(server: &TestServer, room: &str, text: &str) {
    let (_bob, _) = server.join("bob", room, 0).await;
    let (mut alice, _) = server.join("alice", room, 0).await;
    alice.send_message(1, Uuid::new_v4(), text).await;
    assert_eq!(ack(&mut alice).await["ok"], true);
}

#[tokio::test]
async fn a_mention_is_notified_once_and_the_holder_is_on_metrics_and_the_dashboard() {
    let recorder = Arc::new(Recorder::default());
    let server = TestServer::start_with(Arc::new(MemoryStore::new()), config(&recorder, "node-a:1:aaaa")).await;
    until_running(&server).await;
    mention(&server, "lounge", "hello @bob, and @nobody").await;
    eventually("bob is notified", || recorder.to() == ["bob@lounge"]).await;

    let metrics = server.get("/metrics", None).await.body;
    assert!(metrics.contains("livechat_mentions_notified_total 1\n"), "{metrics}");
    assert!(
        metrics.contains("livechat_handler_holder{handler=\"mention-notifier\",holder=\"node-a:1:aaaa\"} 1\n"),
        "{metrics}"
    );
    assert!(metrics.contains("node=\"node-a:1:aaaa\""), "the process names itself: {metrics}");
    assert!(metrics.contains("cqrs_handler_active{handler=\"mention-notifier\"} 1\n"), "{metrics}");
    let mut dashboard = server.state.dashboard.clone();
    let shown = tokio::time::timeout(
        TIMEOUT,
        dashboard.wait_for(|html| html.contains("data-handler=\"mention-notifier\"") && html.contains("running")),
    )
    .await;
    assert!(shown.is_ok(), "the dashboard lists the notifier as running");
    server.stop().await;
}

#[tokio::test]
async fn two_processes_on_one_store_notify_once_and_the_other_stands_by() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let (first, second) = (Arc::new(Recorder::default()), Arc::new(Recorder::default()));
    let one = TestServer::start_with(Arc::clone(&store), config(&first, "node-1:1:1111")).await;
    until_running(&one).await;
    let two = TestServer::start_with(Arc::clone(&store), config(&second, "node-2:2:2222")).await;
    status_until(&two, "the second process stands by", |s| matches!(s.state, HandlerState::Standby { .. })).await;

    for (i, server) in [&one, &two, &one, &two].into_iter().enumerate() {
        mention(server, &format!("room{i}"), "ping @bob").await;
    }
    eventually("four notifications", || first.to().len() + second.to().len() == 4).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(first.to(), ["bob@room0", "bob@room1", "bob@room2", "bob@room3"], "all by the holder, once each");
    assert!(second.to().is_empty(), "none by the standby: {:?}", second.to());
    let metrics = two.get("/metrics", None).await.body;
    assert!(
        metrics.contains("livechat_handler_holder{handler=\"mention-notifier\",holder=\"node-1:1:1111\"} 1\n"),
        "the standby's /metrics names the holder: {metrics}"
    );
    assert!(!metrics.contains("cqrs.standby"), "the framework's markers are not handlers on /metrics");
    // Either node's console shows the holder and the standby, from the store's claims.
    for server in [&one, &two] {
        let page = server.admin_get("/admin/handlers?live=0").await.body;
        assert!(
            page.contains("data-holder=\"node-1:1:1111\" data-parked=\"0\" data-standbys=\"node-2:2:2222\""),
            "{page}"
        );
    }
    two.stop().await;
    one.stop().await;
}

#[tokio::test]
async fn a_failing_notification_is_parked_and_an_operator_retries_or_discards_it() {
    let recorder = Arc::new(Recorder::default());
    recorder.failing.store(true, Ordering::SeqCst);
    let server = TestServer::start_with(Arc::new(MemoryStore::new()), config(&recorder, "node-a:1:aaaa")).await;
    until_running(&server).await;
    mention(&server, "broken", "are you there @bob?").await;
    status_until(&server, "the event is parked", |s| s.parked == 1).await;
    assert!(*recorder.attempts.lock().expect("lock") >= 2, "parked after its attempts");

    let page = server.admin_get("/admin/handlers/mention-notifier/parked").await;
    assert_eq!(page.status, 200);
    let position: u64 = page
        .body
        .split("data-parked=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("a parked row: {}", page.body));
    assert!(page.body.contains("data-status=\"parked\""));
    assert!(page.body.contains("the webhook answered 503"), "the error is shown: {}", page.body);
    let metrics = server.get("/metrics", None).await.body;
    assert!(metrics.contains("cqrs_handler_parked_events{handler=\"mention-notifier\"} 1\n"), "{metrics}");

    // The handler went on: another room's mention is delivered once deliveries work again.
    recorder.failing.store(false, Ordering::SeqCst);
    mention(&server, "fine", "hi @bob").await;
    eventually("the next mention is delivered", || recorder.to() == ["bob@fine"]).await;

    // Refused on the chat's listener (even from loopback: a proxy's address), from a foreign
    // origin, and without an origin.
    let form = format!("handler={NOTIFIER_NAME}&position={position}");
    for forwarded in ["X-Forwarded-For: 203.0.113.9\r\n", "", "X-Forwarded-For: 127.0.0.1\r\n"] {
        assert_eq!(
            server.post("/admin/handlers/mention-notifier/parked/retry", &form, forwarded).await.status,
            403,
            "{forwarded:?}"
        );
    }
    let without_origin = format!(
        "POST /admin/handlers/mention-notifier/parked/retry HTTP/1.1\r\nHost: {admin}\r\nContent-Type: application/x-www-form-urlencoded\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{form}",
        form.len(),
        admin = server.admin
    );
    assert_eq!(request_to(server.admin, &without_origin).await.status, 403);
    let foreign =
        request_to(server.admin, &without_origin.replace("Host:", "Origin: http://evil.example\r\nHost:")).await;
    assert_eq!(foreign.status, 403);
    assert_eq!(server.admin_post("/admin/handlers/nope/parked/retry", "position=1", "").await.status, 404);

    let retried = server.admin_post("/admin/handlers/mention-notifier/parked/retry", &form, "").await;
    assert_eq!(retried.status, 303, "{}", retried.body);
    eventually("the parked mention is delivered", || recorder.to() == ["bob@fine", "bob@broken"]).await;
    status_until(&server, "nothing is parked", |s| s.parked == 0).await;
    assert!(!server.admin_get("/admin/handlers/mention-notifier/parked").await.body.contains("data-parked=\""));

    // A discarded one is never delivered.
    recorder.failing.store(true, Ordering::SeqCst);
    mention(&server, "dropped", "@bob?").await;
    status_until(&server, "the event is parked again", |s| s.parked == 1).await;
    recorder.failing.store(false, Ordering::SeqCst);
    let page = server.admin_get("/admin/handlers/mention-notifier/parked").await.body;
    let position = page.split("data-parked=\"").nth(1).and_then(|r| r.split('"').next()).expect("row").to_owned();
    let discarded = server
        .admin_post(
            "/admin/handlers/mention-notifier/parked/discard",
            &format!("handler={NOTIFIER_NAME}&position={position}"),
            "",
        )
        .await;
    assert_eq!(discarded.status, 303);
    assert_eq!(
        server
            .admin_post(
                "/admin/handlers/mention-notifier/parked/discard",
                &format!("handler={NOTIFIER_NAME}&position={position}"),
                ""
            )
            .await
            .status,
        404
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(recorder.to(), ["bob@fine", "bob@broken"], "the discarded mention is not delivered");
    server.stop().await;
}

#[tokio::test]
async fn the_admin_token_opens_the_admin_routes_from_elsewhere() {
    let config = AppConfig { admin_token: Some("s3cret".into()), ..AppConfig::default() };
    let server = TestServer::start_with(Arc::new(MemoryStore::new()), config).await;
    let ask = |headers: &str| {
        format!("GET /admin/handlers HTTP/1.1\r\nHost: {}\r\nX-Forwarded-For: 203.0.113.9\r\n{headers}Connection: close\r\n\r\n", server.addr)
    };
    assert_eq!(server.request(&ask("")).await.status, 401, "the console offers its login");
    assert_eq!(server.request(&ask("Authorization: Bearer wrong\r\n")).await.status, 401);
    let page = server.request(&ask("Authorization: Bearer s3cret\r\n")).await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("data-handler=\"mention-notifier\""), "{}", page.body);
    server.stop().await;
}

/// A webhook receiver on 127.0.0.1 that answers 500 to the first request and 204 after,
/// and keeps every request it read.
async fn webhook_receiver() -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    let requests = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&requests);
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { return };
            let seen = Arc::clone(&seen);
            tokio::spawn(async move {
                let mut raw = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let Ok(n) = stream.read(&mut buf).await else { return };
                    if n == 0 {
                        return;
                    }
                    raw.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&raw).to_string();
                    let Some((head, body)) = text.split_once("\r\n\r\n") else { continue };
                    let length: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned())
                        })
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    if body.len() < length {
                        continue;
                    }
                    let first = {
                        let mut seen = seen.lock().expect("lock");
                        seen.push(text.clone());
                        seen.len() == 1
                    };
                    let answer: &[u8] = if first {
                        b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n"
                    } else {
                        b"HTTP/1.1 204 No Content\r\n\r\n"
                    };
                    let _ = stream.write_all(answer).await;
                    raw.clear();
                }
            });
        }
    });
    (url, requests)
}

#[tokio::test]
async fn the_webhook_gets_a_json_post_retried_with_the_same_idempotency_key() {
    let (url, requests) = webhook_receiver().await;
    let config = AppConfig {
        notifier: NotifierConfig {
            notifications: Notifications::Webhook(url),
            attempts_before_parking: 5,
            initial_backoff: Duration::from_millis(10),
        },
        ..AppConfig::default()
    };
    let server = TestServer::start_with(Arc::new(MemoryStore::new()), config).await;
    until_running(&server).await;
    mention(&server, "hooked", "look @bob").await;
    eventually("the webhook is called twice (500, then 204)", || requests.lock().expect("lock").len() == 2).await;
    let requests = requests.lock().expect("lock").clone();
    let key = |request: &str| {
        request
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("idempotency-key:").map(|v| v.trim().to_owned()))
    };
    assert!(requests[0].starts_with("POST /hook HTTP/1.1"), "{}", requests[0]);
    assert!(requests[0].to_ascii_lowercase().contains("content-type: application/json"));
    assert_eq!(key(&requests[0]), key(&requests[1]), "a retry carries the same key");
    let body: serde_json::Value =
        serde_json::from_str(requests[1].split_once("\r\n\r\n").expect("body").1).expect("json body");
    assert_eq!(
        (body["to"].as_str(), body["from"].as_str(), body["room"].as_str()),
        (Some("bob"), Some("alice"), Some("hooked"))
    );
    assert_eq!(body["idempotency_key"].as_str(), key(&requests[1]).as_deref());
    server.stop().await;
}
