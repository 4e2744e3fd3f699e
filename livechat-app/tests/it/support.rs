//! A real server on 127.0.0.1 with the in-memory store, and small HTTP and websocket clients.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use std::sync::atomic::{AtomicUsize, Ordering};

use cqrs_core::{
    AppendOutcome, AppendResult, CommandId, EventStore, ExpectedVersion, NewEvent, Position, RecordedEvent, Store,
    StoreError, StreamId, Timestamp, Version,
};
use cqrs_memory::MemoryStore;
use futures_util::{SinkExt, StreamExt};
use livechat_app::server::{bind, bind_admin, serve_with_admin};
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

/// A store that, for each of the next `n` appends it is told to fail, stores the append and
/// then answers `Unavailable`: the outcome a client cannot know (a connection lost during the
/// commit). While held, `head()` waits (a read model that cannot reach the head yet).
pub struct FaultyStore {
    pub inner: MemoryStore,
    failing_appends: AtomicUsize,
    pub appends: AtomicUsize,
    head_open: tokio::sync::watch::Sender<bool>,
}

impl FaultyStore {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            inner: MemoryStore::new(),
            failing_appends: AtomicUsize::new(0),
            appends: AtomicUsize::new(0),
            head_open: tokio::sync::watch::channel(true).0,
        })
    }

    /// The next `n` appends are stored, then answered with `Unavailable`.
    pub fn fail_next_appends(&self, n: usize) {
        self.failing_appends.store(n, Ordering::SeqCst);
    }

    /// `head()` waits until [`release_head`](Self::release_head).
    pub fn hold_head(&self) {
        self.head_open.send_replace(false);
    }

    pub fn release_head(&self) {
        self.head_open.send_replace(true);
    }
}

#[cqrs_core::async_trait]
impl EventStore for FaultyStore {
    async fn append_with_condition(
        &self,
        stream_id: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        condition: Option<cqrs_core::AppendCondition>,
    ) -> Result<AppendOutcome, StoreError> {
        self.appends.fetch_add(1, Ordering::SeqCst);
        let outcome = self.inner.append_with_condition(stream_id, expected, events, condition).await?;
        let fail = self.failing_appends.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
        if fail {
            return Err(StoreError::Unavailable("injected: the connection dropped during the commit".into()));
        }
        Ok(outcome)
    }
    async fn read_stream(
        &self,
        stream_id: &StreamId,
        from: Version,
        max: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.inner.read_stream(stream_id, from, max).await
    }
    async fn append_atomic(
        &self,
        appends: Vec<cqrs_core::StreamAppend>,
        condition: Option<cqrs_core::AppendCondition>,
    ) -> Result<Vec<AppendOutcome>, StoreError> {
        self.inner.append_atomic(appends, condition).await
    }

    async fn read_query(
        &self,
        query: &cqrs_core::Query,
        after: Position,
        max_count: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.inner.read_query(query, after, max_count).await
    }

    async fn read_all(&self, after: Position, max: usize) -> Result<Vec<RecordedEvent>, StoreError> {
        self.inner.read_all(after, max).await
    }
    async fn head(&self) -> Result<Position, StoreError> {
        let mut open = self.head_open.subscribe();
        let _ = open.wait_for(|open| *open).await;
        self.inner.head().await
    }
    async fn stream_version(&self, stream_id: &StreamId) -> Result<Version, StoreError> {
        self.inner.stream_version(stream_id).await
    }
    async fn find_command(
        &self,
        stream_id: &StreamId,
        command_id: CommandId,
    ) -> Result<Option<AppendResult>, StoreError> {
        self.inner.find_command(stream_id, command_id).await
    }
    async fn load_checkpoint(&self, name: &str) -> Result<Option<Position>, StoreError> {
        self.inner.load_checkpoint(name).await
    }
    async fn save_checkpoint(&self, name: &str, position: Position) -> Result<(), StoreError> {
        self.inner.save_checkpoint(name, position).await
    }
    async fn prune_commands(&self, older_than: Timestamp) -> Result<u64, StoreError> {
        self.inner.prune_commands(older_than).await
    }
    fn notifications(&self) -> tokio::sync::watch::Receiver<Position> {
        self.inner.notifications()
    }
}

cqrs_core::store::forward_coordination!(impl FaultyStore => inner);

pub struct TestServer {
    pub addr: SocketAddr,
    /// The admin listener (loopback only; admin routes answer there without a token).
    pub admin: SocketAddr,
    pub state: Arc<AppState>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(Arc::new(MemoryStore::new()), AppConfig::default()).await
    }

    pub async fn start_with(store: Arc<dyn Store>, config: AppConfig) -> Self {
        Self::start_waiting(store, config, TIMEOUT).await
    }

    /// Starts without waiting for the read model to reach the store's head.
    pub async fn start_unready(store: Arc<dyn Store>, config: AppConfig) -> Self {
        Self::start_waiting(store, config, Duration::ZERO).await
    }

    /// Starts with the search index on `search` (the store's own database).
    pub async fn start_searching(store: Arc<dyn Store>, search: livechat_app::search::Backend) -> Self {
        Self::start_searching_with(store, search, AppConfig::default()).await
    }

    /// [`start_searching`](Self::start_searching) with `config`.
    pub async fn start_searching_with(
        store: Arc<dyn Store>,
        search: livechat_app::search::Backend,
        config: AppConfig,
    ) -> Self {
        Self::start_full(store, config, TIMEOUT, Some(search)).await
    }

    async fn start_waiting(store: Arc<dyn Store>, config: AppConfig, ready: Duration) -> Self {
        Self::start_full(store, config, ready, None).await
    }

    async fn start_full(
        store: Arc<dyn Store>,
        config: AppConfig,
        ready: Duration,
        search: Option<livechat_app::search::Backend>,
    ) -> Self {
        let mut app = App::start(store, config, ready).await;
        if let Some(search) = search {
            app.start_search(search).await.expect("search starts");
        }
        let state = Arc::clone(app.state());
        let listener = bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let admin_listener = bind_admin("127.0.0.1:0".parse().expect("addr")).expect("bind admin");
        let admin = admin_listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            serve_with_admin(listener, Some(admin_listener), app, async {
                let _ = stopped.await;
            })
            .await
            .expect("serve");
        });
        Self { addr, admin, state, stop: Some(stop), task: Some(task) }
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

    /// `GET path` on the admin listener.
    pub async fn admin_get(&self, path: &str) -> Response {
        request_to(self.admin, &format!("GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", self.admin))
            .await
    }

    /// `POST path` of a urlencoded form on the admin listener, from its own page (`Origin`).
    pub async fn admin_post(&self, path: &str, form: &str, headers: &str) -> Response {
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {admin}\r\nOrigin: http://{admin}\r\nContent-Type: \
             application/x-www-form-urlencoded\r\nContent-Length: {}\r\n{headers}Connection: close\r\n\r\n{form}",
            form.len(),
            admin = self.admin,
        );
        request_to(self.admin, &request).await
    }

    /// Sends a raw HTTP request and reads the whole answer.
    pub async fn request(&self, request: &str) -> Response {
        request_to(self.addr, request).await
    }
}

/// Sends a raw HTTP request to `addr` and reads the whole answer.
pub async fn request_to(addr: SocketAddr, request: &str) -> Response {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
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
    /// The admin listener's address, as printed (none with `--admin-listen off`).
    #[allow(dead_code)] // used by the proxy tests
    pub admin: Option<SocketAddr>,
}

impl AppProcess {
    pub async fn start(database_url: &str) -> Self {
        Self::start_with(&["--listen", "127.0.0.1:0", "--database-url", database_url], None).await
    }

    /// Starts the binary with `args`, in `dir` if given, without `DATABASE_URL` or `LISTEN` from
    /// the environment.
    pub async fn start_with(args: &[&str], dir: Option<&std::path::Path>) -> Self {
        Self::start_command(Self::command(args, dir)).await
    }

    /// The command that starts the binary (`LIVECHAT_TEST_BIN` names another build of it, e.g.
    /// an older one to see a test fail) with `args`, in `dir` if given, without `DATABASE_URL`
    /// or `LISTEN` from the environment.
    pub fn command(args: &[&str], dir: Option<&std::path::Path>) -> Command {
        let binary =
            std::env::var("LIVECHAT_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_livechat-app").to_owned());
        let mut command = Command::new(binary);
        if let Some(dir) = dir {
            command.current_dir(dir);
        }
        command.args(args).env_remove("DATABASE_URL").env_remove("LISTEN").env("RUST_LOG", "warn");
        command
    }

    /// The binary: this build's, or `LIVECHAT_TEST_BIN`.
    pub fn binary() -> String {
        std::env::var("LIVECHAT_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_livechat-app").to_owned())
    }

    /// Starts `command` (from [`AppProcess::command`]) and waits for its address.
    pub async fn start_command(mut command: Command) -> Self {
        let mut child = command.stdout(Stdio::piped()).kill_on_drop(true).spawn().expect("start livechat-app");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let (base, admin) = tokio::time::timeout(TIMEOUT, async {
            let mut admin = None;
            while let Some(line) = lines.next_line().await.expect("read stdout") {
                if let Some(url) = line.strip_prefix("livechat: admin (this machine only): http://") {
                    admin = url.split('/').next().and_then(|addr| addr.parse().ok());
                }
                if let Some(url) = line.strip_prefix("livechat: open ") {
                    return (url.trim_end_matches('/').to_owned(), admin);
                }
            }
            panic!("livechat-app exited before printing its address");
        })
        .await
        .expect("livechat-app starts in time");
        // Keep draining stdout so the process never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let addr = base.trim_start_matches("http://").parse().expect("printed address");
        Self { child, base, addr, admin }
    }
}

/// A fresh database on the server of `DATABASE_URL`.
pub async fn fresh_database() -> String {
    let url = std::env::var("DATABASE_URL")
        .expect("DATABASE_URL must point at a PostgreSQL server for this test; ./scripts/test starts a throwaway one");
    let name = format!("livechat_e2e_{}", uuid::Uuid::new_v4().simple());
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&url).await.expect("connect to PostgreSQL");
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut admin).await.expect("create database");
    match url.rfind('/') {
        Some(slash) if url[..slash].contains("://") && !url[slash..].contains('@') => {
            let query = url[slash..].find('?').map_or("", |q| &url[slash + q..]);
            format!("{}/{name}{query}", &url[..slash])
        }
        _ => panic!("DATABASE_URL {url:?} has no database path"),
    }
}

/// A websocket client of `name` at a server's `addr`.
pub async fn connect_to(addr: SocketAddr, name: &str) -> Client {
    let mut request = format!("ws://{addr}/live").into_client_request().expect("request");
    request.headers_mut().insert("cookie", format!("livechat_name={name}").parse().expect("header"));
    let (ws, _) = tokio_tungstenite::connect_async(request).await.expect("websocket upgrade");
    Client { ws }
}

/// A websocket client of `name` coming, through the loopback proxy, from `address`.
pub async fn connect_as(addr: SocketAddr, name: &str, address: &str) -> Client {
    let mut request = format!("ws://{addr}/live").into_client_request().expect("request");
    request.headers_mut().insert("cookie", format!("livechat_name={name}").parse().expect("header"));
    request.headers_mut().insert("x-forwarded-for", address.parse().expect("header"));
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

    /// Frames until one of each kind in `kinds` has arrived (in any order), the first of each.
    pub async fn until_each(&mut self, kinds: &[&str]) -> Vec<Frame> {
        let mut found: Vec<Option<Frame>> = vec![None; kinds.len()];
        while found.iter().any(Option::is_none) {
            let frame = self.recv().await;
            if let Some(i) = kinds.iter().position(|k| *k == frame.kind()) {
                if found[i].is_none() {
                    found[i] = Some(frame);
                }
            }
        }
        found.into_iter().flatten().collect()
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

/// A websocket client written by hand, to send what a well-behaved client never would (an
/// unmasked frame, invalid UTF-8, an oversized frame) and to see how the TCP connection ends.
pub struct RawSocket {
    pub stream: TcpStream,
    buffer: Vec<u8>,
}

impl RawSocket {
    /// Connects and upgrades as `name`.
    pub async fn open(addr: SocketAddr, name: &str) -> Self {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let request = format!(
            "GET /live HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Cookie: livechat_name={name}\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut buffer = Vec::new();
        let mut chunk = [0u8; 1024];
        let head_end = loop {
            if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            let read = tokio::time::timeout(TIMEOUT, stream.read(&mut chunk)).await.expect("answer").expect("read");
            assert!(read > 0, "closed during the handshake");
            buffer.extend_from_slice(&chunk[..read]);
        };
        let head = String::from_utf8_lossy(&buffer[..head_end]).to_string();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        buffer.drain(..head_end);
        Self { stream, buffer }
    }

    /// Sends one frame (FIN set) with `opcode`, masked or not.
    pub async fn send_frame(&mut self, opcode: u8, payload: &[u8], masked: bool) {
        let mut frame = vec![0x80 | opcode];
        let mask_bit = if masked { 0x80 } else { 0 };
        match payload.len() {
            len @ 0..=125 => frame.push(mask_bit | len as u8),
            len @ 126..=65_535 => {
                frame.push(mask_bit | 126);
                frame.extend_from_slice(&(len as u16).to_be_bytes());
            }
            len => {
                frame.push(mask_bit | 127);
                frame.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        let key = [0x12, 0x34, 0x56, 0x78];
        if masked {
            frame.extend_from_slice(&key);
            frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        } else {
            frame.extend_from_slice(payload);
        }
        // The server may close before it reads everything: a write error is its answer.
        let _ = self.stream.write_all(&frame).await;
    }

    /// Reads frames until a close frame; returns its code and reason.
    pub async fn close_code(&mut self) -> (u16, String) {
        loop {
            let (opcode, payload) = self.read_frame().await;
            if opcode == 0x8 {
                let code = payload.get(..2).map_or(1005, |b| u16::from_be_bytes([b[0], b[1]]));
                return (code, String::from_utf8_lossy(payload.get(2..).unwrap_or(&[])).to_string());
            }
        }
    }

    async fn fill(&mut self, at_least: usize) {
        let mut chunk = [0u8; 4096];
        while self.buffer.len() < at_least {
            let read = tokio::time::timeout(TIMEOUT, self.stream.read(&mut chunk))
                .await
                .expect("a frame in time")
                .expect("read a frame, not a reset");
            assert!(read > 0, "closed without a close frame");
            self.buffer.extend_from_slice(&chunk[..read]);
        }
    }

    /// The next frame from the server (servers do not mask).
    pub async fn read_frame(&mut self) -> (u8, Vec<u8>) {
        self.fill(2).await;
        let opcode = self.buffer[0] & 0x0f;
        let (len, start) = match self.buffer[1] & 0x7f {
            126 => {
                self.fill(4).await;
                (usize::from(u16::from_be_bytes([self.buffer[2], self.buffer[3]])), 4)
            }
            127 => {
                self.fill(10).await;
                let mut bytes = [0u8; 8];
                bytes.copy_from_slice(&self.buffer[2..10]);
                (usize::try_from(u64::from_be_bytes(bytes)).expect("size"), 10)
            }
            len => (usize::from(len), 2),
        };
        self.fill(start + len).await;
        let payload = self.buffer[start..start + len].to_vec();
        self.buffer.drain(..start + len);
        (opcode, payload)
    }
}
