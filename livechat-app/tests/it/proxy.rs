//! Behind a proxy: who the client is when the proxy does or does not say, that admin routes are
//! never open by address through one, and that clients a proxy does not name are limited apart
//! from every real address.

use std::sync::Arc;

use livechat_app::AppConfig;
use uuid::Uuid;

use crate::support::{connect_as, TestServer};
use crate::websocket::ack;

/// The ways a proxy may fail to name the client: no header, and last hops that are not a bare
/// IP address.
const UNNAMED: [&str; 6] = ["", "1.2.3.4:5678", "unknown", "[::1]:80", "[2001:db8::1]", "garbage"];

fn forwarded(hop: &str) -> String {
    if hop.is_empty() {
        String::new()
    } else {
        format!("X-Forwarded-For: {hop}\r\n")
    }
}

#[tokio::test]
async fn admin_routes_are_not_open_by_address_through_a_proxy() {
    let server = TestServer::start().await;
    // The test's connections come from 127.0.0.1, a trusted proxy by default: as nginx's do.
    for hop in UNNAMED.iter().chain(&["127.0.0.1", "::1"]) {
        let headers = forwarded(hop);
        let get = server
            .request(&format!(
                "GET /admin/parked HTTP/1.1\r\nHost: {}\r\n{headers}Connection: close\r\n\r\n",
                server.addr
            ))
            .await;
        assert_eq!(get.status, 403, "GET through a proxy with {hop:?}: {}", get.body);
        let post = server.post("/admin/parked/retry", "handler=mention-notifier&all=1", &headers).await;
        assert_eq!(post.status, 403, "POST without Origin through a proxy with {hop:?}: {}", post.body);
    }
    // The admin listener answers this machine without a token.
    assert_eq!(server.admin_get("/admin/parked").await.status, 200);
    server.stop().await;
}

#[tokio::test]
async fn clients_a_proxy_does_not_name_share_a_bucket_apart_from_the_proxys_machine() {
    let mut config = AppConfig::default();
    config.limits.commands_burst = 2;
    config.limits.commands_per_second = 0.001;
    config.limits.rooms_per_minute = 100;
    let server = TestServer::start_with(Arc::new(cqrs_memory::MemoryStore::new()), config).await;
    let mut statuses = Vec::new();
    for (i, hop) in ["unknown", "1.2.3.4:5678", "[::1]:80"].into_iter().enumerate() {
        let mut client = connect_as(server.addr, &format!("u{i}"), hop).await;
        client.join_room("lounge", 0).await;
        client.send_message(1, Uuid::new_v4(), "hello").await;
        statuses.push(ack(&mut client).await["status"].as_str().unwrap_or("").to_owned());
    }
    assert_eq!(statuses, ["stored", "stored", "refused"], "one bucket for every unnamed client");
    // A client on the proxy's own machine, and any named client, has a bucket of its own.
    for (i, hop) in ["127.0.0.1", "198.51.100.4"].into_iter().enumerate() {
        let mut client = connect_as(server.addr, &format!("k{i}"), hop).await;
        client.join_room("lounge", 0).await;
        client.send_message(1, Uuid::new_v4(), "hello").await;
        assert_eq!(ack(&mut client).await["status"], "stored", "{hop} is not in the unknown bucket");
    }
    let metrics = server.get("/metrics", None).await.body;
    let unknown = livechat_app::metrics::Reading::parse(&metrics).value("livechat_unknown_clients_total");
    assert!(unknown >= 3.0, "requests from unnamed clients are counted: {unknown}");
    server.stop().await;
}
