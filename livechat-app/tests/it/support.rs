//! A real server on 127.0.0.1 with the in-memory store, and small HTTP and websocket clients.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cqrs_core::EventStore;
use cqrs_memory::MemoryStore;
use futures_util::{SinkExt, StreamExt};
use livechat_app::server::{bind, serve};
use livechat_app::{App, AppConfig, AppState};
use serde_json::Value;
use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const TIMEOUT: Duration = Duration::from_secs(10);

pub struct TestServer {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(Arc::new(MemoryStore::new()), AppConfig::default()).await
    }

    pub async fn start_with(store: Arc<dyn EventStore>, config: AppConfig) -> Self {
        let app = App::start(store, config, TIMEOUT).await;
        let state = Arc::clone(app.state());
        let listener = bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            serve(listener, app, async {
                let _ = stopped.await;
            })
            .await
            .expect("serve");
        });
        Self { addr, state, stop: Some(stop), task: Some(task) }
    }

    /// Shuts the server down gracefully and waits for it.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(TIMEOUT, task).await.expect("server stops in time").expect("server task");
        }
    }

    pub async fn connect(&self, name: Option<&str>) -> Client {
        let mut headers = vec![("origin".to_owned(), format!("http://{}", self.addr))];
        if let Some(name) = name {
            headers.push(("cookie".to_owned(), format!("livechat_name={name}")));
        }
        self.connect_with(&headers).await.expect("websocket upgrade")
    }

    pub async fn connect_with(&self, headers: &[(String, String)]) -> Result<Client, tungstenite::Error> {
        let mut request = format!("ws://{}/live", self.addr).into_client_request()?;
        for (key, value) in headers {
            request.headers_mut().insert(
                tungstenite::http::HeaderName::from_bytes(key.as_bytes()).expect("header name"),
                value.parse().expect("header value"),
            );
        }
        let (ws, _) = tokio_tungstenite::connect_async(request).await?;
        Ok(Client { ws })
    }

    /// A room client of `name` that has joined `room` after `after`; returns the frames it got
    /// before `joined` (the catch-up).
    pub async fn join(&self, name: &str, room: &str, after: u64) -> (Client, Vec<Frame>) {
        let mut client = self.connect(Some(name)).await;
        let catch_up = client.join_room(room, after).await;
        (client, catch_up)
    }

    /// `GET path` with an optional name cookie: (status, headers lower-cased, body).
    pub async fn get(&self, path: &str, name: Option<&str>) -> Response {
        let cookie = name.map(|n| format!("Cookie: livechat_name={n}\r\n")).unwrap_or_default();
        self.request(&format!("GET {path} HTTP/1.1\r\nHost: {}\r\n{cookie}Connection: close\r\n\r\n", self.addr)).await
    }

    /// `POST path` of a urlencoded form.
    pub async fn post(&self, path: &str, form: &str, headers: &str) -> Response {
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/x-www-form-urlencoded\r\n\
             Content-Length: {}\r\n{headers}Connection: close\r\n\r\n{form}",
            self.addr,
            form.len()
        );
        self.request(&request).await
    }

    async fn request(&self, request: &str) -> Response {
        let mut stream = TcpStream::connect(self.addr).await.expect("connect");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut raw = Vec::new();
        tokio::time::timeout(TIMEOUT, stream.read_to_end(&mut raw)).await.expect("response in time").expect("read");
        let raw = String::from_utf8(raw).expect("utf-8 response");
        let (head, body) = raw.split_once("\r\n\r\n").expect("head and body");
        let mut lines = head.lines();
        let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|s| s.parse().ok()).expect("status");
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        Response { status, headers, body: body.to_owned() }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A `livechat-app` process, killed on drop.
pub struct AppProcess {
    pub child: Child,
    #[allow(dead_code)] // used by the browser test
    pub base: String,
    pub addr: SocketAddr,
}

impl AppProcess {
    pub async fn start(database_url: &str) -> Self {
        Self::start_with(&["--listen", "127.0.0.1:0", "--database-url", database_url], None).await
    }

    /// Starts the binary with `args`, in `dir` if given, without `DATABASE_URL` or `LISTEN` from
    /// the environment.
    pub async fn start_with(args: &[&str], dir: Option<&std::path::Path>) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_livechat-app"));
        if let Some(dir) = dir {
            command.current_dir(dir);
        }
        let mut child = command
            .args(args)
            .env_remove("DATABASE_URL")
            .env_remove("LISTEN")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start livechat-app");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let base = tokio::time::timeout(TIMEOUT, async {
            while let Some(line) = lines.next_line().await.expect("read stdout") {
                if let Some(url) = line.strip_prefix("livechat: open ") {
                    return url.trim_end_matches('/').to_owned();
                }
            }
            panic!("livechat-app exited before printing its address");
        })
        .await
        .expect("livechat-app starts in time");
        // Keep draining stdout so the process never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let addr = base.trim_start_matches("http://").parse().expect("printed address");
        Self { child, base, addr }
    }
}

/// A websocket client of `name` at a server's `addr`.
pub async fn connect_to(addr: SocketAddr, name: &str) -> Client {
    let mut request = format!("ws://{addr}/live").into_client_request().expect("request");
    request.headers_mut().insert("cookie", format!("livechat_name={name}").parse().expect("header"));
    let (ws, _) = tokio_tungstenite::connect_async(request).await.expect("websocket upgrade");
    Client { ws }
}

pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// A server frame: its JSON header, its HTML body, and its size on the wire.
#[derive(Debug, Clone)]
pub struct Frame {
    pub head: Value,
    pub html: String,
    pub len: usize,
}

impl Frame {
    pub fn kind(&self) -> &str {
        self.head["t"].as_str().unwrap_or("")
    }
    pub fn pos(&self) -> u64 {
        self.head["pos"].as_u64().expect("frame has pos")
    }
}

pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

pub enum Next {
    Frame(Frame),
    Closed(Option<CloseFrame>),
}

impl Client {
    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::Text(text.into())).await.expect("send");
    }

    pub async fn send_json(&mut self, value: Value) {
        self.send_text(&value.to_string()).await;
    }

    pub async fn join_room(&mut self, room: &str, after: u64) -> Vec<Frame> {
        self.send_json(serde_json::json!({"t": "join", "view": "room", "room": room, "after": after})).await;
        let mut before = Vec::new();
        loop {
            let frame = self.recv().await;
            if frame.kind() == "joined" {
                return before;
            }
            before.push(frame);
        }
    }

    pub async fn send_message(&mut self, reference: u64, id: uuid::Uuid, message: &str) {
        self.send_json(serde_json::json!({"t": "send", "ref": reference, "id": id, "message": message})).await;
    }

    /// The next frame or the close, within the timeout.
    pub async fn next(&mut self) -> Next {
        loop {
            let message = tokio::time::timeout(TIMEOUT, self.ws.next()).await.expect("a frame in time");
            match message {
                None | Some(Err(_)) => return Next::Closed(None),
                Some(Ok(Message::Close(frame))) => return Next::Closed(frame),
                Some(Ok(Message::Text(text))) => {
                    let text = text.as_str();
                    let (head, html) = text.split_once('\n').unwrap_or((text, ""));
                    let head = serde_json::from_str(head).expect("frame header is JSON");
                    return Next::Frame(Frame { head, html: html.to_owned(), len: text.len() });
                }
                Some(Ok(_)) => continue,
            }
        }
    }

    pub async fn recv(&mut self) -> Frame {
        match self.next().await {
            Next::Frame(frame) => frame,
            Next::Closed(close) => panic!("closed: {close:?}"),
        }
    }

    /// The next frame of kind `kind`, skipping others (presence updates...).
    pub async fn recv_kind(&mut self, kind: &str) -> Frame {
        loop {
            let frame = self.recv().await;
            if frame.kind() == kind {
                return frame;
            }
        }
    }

    /// Waits for the close, skipping frames; returns the close frame.
    pub async fn closed(&mut self) -> Option<CloseFrame> {
        loop {
            if let Next::Closed(close) = self.next().await {
                return close;
            }
        }
    }

    /// Messages received (skipping other frames) until `count` have arrived.
    pub async fn messages(&mut self, count: usize) -> Vec<Frame> {
        let mut messages = Vec::new();
        while messages.len() < count {
            messages.push(self.recv_kind("msg").await);
        }
        messages
    }
}
