//! `--dcb --peer umadb` (cargo feature `umadb`): the same conditional-append and tag-read cases
//! through UmaDB, the Rust DCB event store, on this machine: a local `umadb` server on a fresh
//! database file in a temporary directory, driven by its own Rust client (`umadb-client`).
//!
//! The server binary comes from `scripts/umadb` (`cargo install umadb --locked` into
//! `target/umadb`), or from `UMADB_BIN`. UmaDB fsyncs each commit (its default), like our SQLite
//! store's `synchronous=FULL` and PostgreSQL with `fsync=on`.

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use umadb_client::AsyncUmaDbClient;
use umadb_dcb::{DcbAppendCondition, DcbError, DcbEvent, DcbEventStoreAsync, DcbQuery, DcbQueryItem};

use crate::dcb::DcbRun;

/// A running UmaDB server, killed on drop.
pub struct Server {
    child: tokio::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// The server binary: `UMADB_BIN`, else `target/umadb/bin/umadb` (from `scripts/umadb`).
fn binary() -> anyhow::Result<String> {
    if let Ok(path) = std::env::var("UMADB_BIN") {
        return Ok(path);
    }
    let local = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/umadb/bin/umadb");
    if local.exists() {
        return Ok(local.display().to_string());
    }
    bail!("no UmaDB server: run scripts/umadb first, or set UMADB_BIN")
}

impl Server {
    /// Starts a server on a free port and a fresh file; waits until a client connects.
    pub async fn start() -> anyhow::Result<(Self, AsyncUmaDbClient)> {
        let dir = tempfile::tempdir().context("temp dir")?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let listen = format!("127.0.0.1:{port}");
        let child = tokio::process::Command::new(binary()?)
            .args(["--listen", &listen, "--db-path"])
            .arg(dir.path().join("uma.db"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("start umadb")?;
        let url = format!("http://{listen}");
        let server = Server { child, url: url.clone(), _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match AsyncUmaDbClient::connect(url.clone(), None, None, None).await {
                Ok(client) => return Ok((server, client)),
                Err(error) if Instant::now() > deadline => bail!("umadb did not answer on {url}: {error}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Its version, as `umadb --version` prints it.
    pub async fn describe() -> anyhow::Result<String> {
        let output = tokio::process::Command::new(binary()?).arg("--version").output().await?;
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }
}

fn event(tag: &str, n: u64) -> DcbEvent {
    let payload = serde_json::json!({ "n": n, "note": "x".repeat(100) }).to_string();
    DcbEvent::new().event_type("SeatTaken").data(payload.into_bytes()).tags([tag.to_owned()]).uuid(uuid::Uuid::new_v4())
}

/// The conditional-append case of `dcb.rs`, through UmaDB: `deciders` tasks, each with its own
/// tag and client connection, sharing `appends` appends.
pub async fn conditional_appends(deciders: usize, appends: u64) -> anyhow::Result<DcbRun> {
    let (server, _first) = Server::start().await?;
    let run = uuid::Uuid::new_v4().simple().to_string();
    let per_decider = (appends / deciders as u64).max(1);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(deciders);
    for decider in 0..deciders {
        let url = server.url.clone();
        let tag = format!("decider:{run}-{decider}");
        tasks.push(tokio::spawn(async move {
            let client = AsyncUmaDbClient::connect(url, None, None, None).await?;
            let query = DcbQuery::new().item(DcbQueryItem::new().tags([tag.clone()]));
            let mut after = client.head().await?;
            let mut latencies = Vec::with_capacity(per_decider as usize);
            let mut conflicts = 0u64;
            let mut n = 0;
            while n < per_decider {
                let condition = DcbAppendCondition::new(query.clone()).after(after);
                let sent = Instant::now();
                match client.append(vec![event(&tag, n)], Some(condition), None).await {
                    Ok(position) => {
                        latencies.push(sent.elapsed());
                        after = Some(position);
                        n += 1;
                    }
                    Err(DcbError::IntegrityError(_)) => {
                        conflicts += 1;
                        after = client.head().await?;
                    }
                    Err(error) => return Err(error),
                }
            }
            Ok::<_, DcbError>((latencies, conflicts))
        }));
    }
    let mut latencies = Vec::new();
    let mut conflicts = 0;
    for task in tasks {
        let (mine, lost) = task.await.context("decider task")?.context("umadb")?;
        latencies.extend(mine);
        conflicts += lost;
    }
    let elapsed = started.elapsed();
    drop(server);
    latencies.sort_unstable();
    let at = |q: f64| latencies.get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)));
    Ok(DcbRun {
        store: "umadb",
        deciders,
        appends: latencies.len() as u64,
        conflicts,
        elapsed,
        p50: at(0.50).copied().unwrap_or_default(),
        p99: at(0.99).copied().unwrap_or_default(),
    })
}

/// The tag-read case of `dcb.rs`, through UmaDB: one tag's `events` among as many others,
/// read back by query three times; events per second.
pub async fn tag_reads(events: u64) -> anyhow::Result<f64> {
    let (_server, client) = Server::start().await?;
    let client = Arc::new(client);
    for tag in ["reader:other", "reader:wanted"] {
        let mut n = 0;
        while n < events {
            let batch: Vec<DcbEvent> = (n..(n + 100).min(events)).map(|i| event(tag, i)).collect();
            n += batch.len() as u64;
            client.append(batch, None, None).await.context("umadb append")?;
        }
    }
    let query = DcbQuery::new().item(DcbQueryItem::new().tags(["reader:wanted".to_owned()]));
    let started = Instant::now();
    let mut read = 0u64;
    for _ in 0..3 {
        let (found, _head) = client.read_with_head(Some(query.clone()), None, false, None).await?;
        read += found.len() as u64;
    }
    anyhow::ensure!(read == 3 * events, "umadb read {read} events by tag, expected {}", 3 * events);
    Ok(read as f64 / started.elapsed().as_secs_f64().max(1e-9))
}

/// Clients the writer cases open at most; more writers share them (each is an HTTP/2
/// channel that multiplexes its calls).
const MAX_CLIENTS: usize = 64;

/// The `--writers` case through UmaDB: `writers` tasks, each appending one event at a time
/// tagged with its own `stream:` tag (UmaDB has no streams), no condition.
pub async fn writers(writers: usize, appends: u64) -> anyhow::Result<crate::writers::WritersRun> {
    let (server, _first) = Server::start().await?;
    let mut clients = Vec::new();
    for _ in 0..writers.min(MAX_CLIENTS) {
        clients.push(Arc::new(AsyncUmaDbClient::connect(server.url.clone(), None, None, None).await?));
    }
    let per_writer = (appends / writers as u64).max(1);
    let run = uuid::Uuid::new_v4().simple().to_string();
    let started = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|writer| {
            let client = Arc::clone(&clients[writer % clients.len()]);
            let tag = format!("stream:writer-{run}-{writer}");
            tokio::spawn(async move {
                let (mut latencies, mut errors) = (Vec::with_capacity(per_writer as usize), 0u64);
                for n in 0..per_writer {
                    let data = crate::writers::payload(writer, n).to_string().into_bytes();
                    let event =
                        DcbEvent::new().event_type("Written").data(data).tags([tag.clone()]).uuid(uuid::Uuid::new_v4());
                    let sent = Instant::now();
                    match client.append(vec![event], None, None).await {
                        Ok(_) => latencies.push(sent.elapsed()),
                        Err(_) => errors += 1,
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let (mut latencies, mut errors) = (Vec::new(), 0);
    for task in tasks {
        let (mine, failed) = task.await.context("writer task")?;
        latencies.extend(mine);
        errors += failed;
    }
    let elapsed = started.elapsed();
    drop(server);
    Ok(crate::writers::WritersRun::from_latencies("umadb", writers, latencies, errors, elapsed))
}

/// The replay case through UmaDB: `events` message events stored in appends of 250, then
/// every event read from the start, twice, each decoded from its bytes into the handler's
/// type; the better rate, events/s, and the fill time.
pub async fn replay(events: u64) -> anyhow::Result<(Duration, f64)> {
    let (_server, client) = Server::start().await?;
    let started = Instant::now();
    let mut stored = 0;
    while stored < events {
        let count = crate::replay::PER_APPEND.min(events - stored);
        let stream = stored / crate::replay::PER_APPEND;
        let batch: Vec<DcbEvent> = (0..count)
            .map(|n| {
                let data = crate::replay::message(stream, stored + n).to_string().into_bytes();
                DcbEvent::new()
                    .event_type("MessageSent")
                    .data(data)
                    .tags([format!("stream:replay-{stream}")])
                    .uuid(uuid::Uuid::new_v4())
            })
            .collect();
        client.append(batch, None, None).await.context("umadb fill")?;
        stored += count;
    }
    let fill = started.elapsed();
    let mut best = 0f64;
    for round in 1..=2 {
        eprintln!("compare: replay umadb: round {round}");
        let started = Instant::now();
        let mut response = client.read(None, None, false, None).await?;
        let (mut seen, mut last) = (0u64, 0u64);
        loop {
            let batch = response.next_batch().await?;
            if batch.is_empty() {
                break;
            }
            for sequenced in batch {
                anyhow::ensure!(sequenced.position > last, "umadb positions went backwards");
                last = sequenced.position;
                let message: crate::replay::Message = serde_json::from_slice(&sequenced.event.data)?;
                std::hint::black_box(message.chat_id.len() + message.sender.len() + message.text.len());
                seen += 1;
            }
        }
        anyhow::ensure!(seen == events, "umadb replayed {seen} events, not {events}");
        best = best.max(events as f64 / started.elapsed().as_secs_f64().max(1e-9));
    }
    Ok((fill, best))
}
