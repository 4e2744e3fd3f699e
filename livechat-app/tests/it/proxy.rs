//! Behind a proxy: who the client is when the proxy does or does not say, that admin routes are
//! never open by address through one, and that clients a proxy does not name are limited apart
//! from every real address. The last tests run the real binary behind a real nginx of their
//! own (Debian's; `scripts/test` installs it when missing).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use livechat_app::dashboard::Reading;
use livechat_app::AppConfig;
use tokio::process::{Child, Command};
use uuid::Uuid;

use crate::support::{connect_as, request_to, AppProcess, Response, TestServer, TIMEOUT};
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
                "GET /admin/handlers HTTP/1.1\r\nHost: {}\r\n{headers}Connection: close\r\n\r\n",
                server.addr
            ))
            .await;
        assert_eq!(get.status, 403, "GET through a proxy with {hop:?}: {}", get.body);
        let post = server.post("/admin/handlers/mention-notifier/parked/retry", "all=1", &headers).await;
        assert_eq!(post.status, 403, "POST without Origin through a proxy with {hop:?}: {}", post.body);
    }
    // The admin listener answers this machine without a token.
    assert_eq!(server.admin_get("/admin/handlers").await.status, 200);
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
    let unknown = Reading::parse(&metrics).value("livechat_unknown_clients_total");
    assert!(unknown >= 3.0, "requests from unnamed clients are counted: {unknown}");
    server.stop().await;
}

// ---- end to end through a real nginx ----

/// nginx: `NGINX`, or Debian's (`scripts/test` installs `nginx-light` when missing).
fn nginx_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("NGINX") {
        return path.into();
    }
    let in_path =
        std::env::var_os("PATH").into_iter().flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>());
    in_path
        .map(|dir| dir.join("nginx"))
        .chain([PathBuf::from("/usr/sbin/nginx")])
        .find(|candidate| candidate.is_file())
        .expect("nginx not found (set NGINX); install Debian's nginx-light (./scripts/test installs it when missing)")
}

/// An nginx of its own on a free loopback port, in the foreground as one process, proxying
/// everything to `upstream`; killed on drop.
struct Nginx {
    _child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Nginx {
    /// `location_lines` go into `location /` after `proxy_pass` (none: the plain `proxy_pass`
    /// that sends no `X-Forwarded-For` of its own, and passes on the client's).
    async fn start(upstream: SocketAddr, location_lines: &str) -> Self {
        let binary = nginx_binary();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let dir = tempfile::tempdir().expect("temp dir");
            let port =
                std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
            let d = dir.path().display();
            let config = format!(
                "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
                 events {{ worker_connections 64; }}\n\
                 http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  \
                 fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  \
                 server {{\n    listen 127.0.0.1:{port};\n    location / {{\n      proxy_pass http://{upstream};\n      \
                 {location_lines}\n    }}\n  }}\n}}\n"
            );
            let config_path = dir.path().join("nginx.conf");
            std::fs::write(&config_path, config).expect("write nginx.conf");
            let mut child = Command::new(&binary)
                .arg("-p")
                .arg(dir.path())
                .arg("-c")
                .arg(&config_path)
                .arg("-e")
                .arg(dir.path().join("error.log"))
                .kill_on_drop(true)
                .spawn()
                .expect("start nginx");
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let deadline = Instant::now() + TIMEOUT;
            loop {
                if tokio::net::TcpStream::connect(addr).await.is_ok() {
                    return Self { _child: child, addr, _dir: dir };
                }
                let exited = child.try_wait().expect("nginx status");
                if exited.is_some() || Instant::now() > deadline {
                    let log = std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default();
                    // The free port may have been taken in between: try another, a few times.
                    assert!(attempts < 3, "nginx did not start ({exited:?}): {log}");
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    /// `METHOD path` through nginx with `headers`, and `form` as a urlencoded body if not empty.
    async fn request(&self, method: &str, path: &str, headers: &str, form: &str) -> Response {
        let body = if form.is_empty() {
            String::new()
        } else {
            format!("Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n", form.len())
        };
        let raw = format!(
            "{method} {path} HTTP/1.1\r\nHost: chat.example.test\r\n{headers}{body}Connection: close\r\n\r\n{form}"
        );
        request_to(self.addr, &raw).await
    }
}

fn unknown_clients(metrics: &str) -> f64 {
    Reading::parse(metrics).value("livechat_unknown_clients_total")
}

#[tokio::test]
async fn admin_routes_are_refused_through_a_plain_nginx_and_open_on_the_admin_listener() {
    let app = AppProcess::start_with(
        &["--listen", "127.0.0.1:0", "--database-url", "memory", "--admin-token", "s3cret"],
        None,
    )
    .await;
    let nginx = Nginx::start(app.addr, "").await;
    // Every header form a client (or nothing) may send; plain proxy_pass passes them on as they are.
    for hop in UNNAMED.iter().chain(&["127.0.0.1", "::1", "203.0.113.9"]) {
        let headers = forwarded(hop);
        let page = nginx.request("GET", "/admin/handlers", &headers, "").await;
        assert_eq!(page.status, 401, "GET through nginx with {hop:?}: {}", page.body);
        let post = nginx.request("POST", "/admin/handlers/mention-notifier/parked/retry", &headers, "all=1").await;
        assert_eq!(post.status, 401, "POST without the token through nginx with {hop:?}: {}", post.body);
        // A route that names its client, for the count of unknown ones below.
        nginx.request("GET", "/search?q=hi", &headers, "").await;
    }
    // The token works through the proxy; the admin listener works on this machine.
    let bearer = "Authorization: Bearer s3cret\r\n";
    let page = nginx.request("GET", "/admin/handlers", bearer, "").await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.body.contains("data-handler=\"mention-notifier\""), "{}", page.body);
    let post = nginx.request("POST", "/admin/handlers/nope/parked/retry", bearer, "position=1").await;
    assert_eq!(post.status, 404, "past the token check: {}", post.body);
    let admin = app.admin.expect("the admin listener's address is printed");
    let local =
        request_to(admin, &format!("GET /admin/handlers HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n")).await;
    assert_eq!(local.status, 200, "{}", local.body);
    // Clients that nginx did not name were counted as unknown.
    let metrics = nginx.request("GET", "/metrics", "", "").await;
    assert!(unknown_clients(&metrics.body) >= 1.0, "{}", metrics.body);
}

#[tokio::test]
async fn through_the_readmes_nginx_config_clients_are_named_and_still_not_admin() {
    let app = AppProcess::start_with(&["--listen", "127.0.0.1:0", "--database-url", "memory"], None).await;
    let nginx = Nginx::start(app.addr, "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;").await;
    let before = unknown_clients(&nginx.request("GET", "/metrics", "", "").await.body);
    // nginx appends the client's own address, 127.0.0.1 here (the test runs on nginx's machine,
    // a trusted proxy's, so hops before it are walked to: a client there can say anything).
    for hop in ["", "127.0.0.1", "198.51.100.7"] {
        let page = nginx.request("GET", "/admin/handlers", &forwarded(hop), "").await;
        assert_eq!(page.status, 403, "GET through nginx with {hop:?}: {}", page.body);
    }
    let after = unknown_clients(&nginx.request("GET", "/metrics", "", "").await.body);
    assert_eq!(before, after, "nginx appended the real address: no client was unknown");
}
