//! The connection cap under the process's descriptor limit: connections that hold half a
//! request head cannot take every descriptor, a fresh `/health` is still answered, and the
//! store (in memory, a SQLite file, PostgreSQL) still has descriptors for its pool.

use std::time::{Duration, Instant};

use livechat_app::dashboard::Reading;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::process::Command;
use uuid::Uuid;

use crate::support::{connect_to, fresh_database, request_to, AppProcess, TIMEOUT};
use crate::websocket::ack;

/// The open-files limit the app is started with (soft and hard: it raises soft to hard).
const NOFILE: usize = 256;
/// Connections that send half a request head and wait: more than the limit.
const ATTACKERS: usize = 300;
/// Connections beyond the cap kept for `/health` (`livechat_app::limits::HEALTH_RESERVE`).
const RESERVE: usize = 4;

/// The number in a refusal's "limit of N connections", if it is one.
fn refusal_cap(answer: &[u8]) -> Option<usize> {
    let text = std::str::from_utf8(answer).ok()?;
    if !text.starts_with("HTTP/1.1 503") {
        return None;
    }
    text.split("limit of ").nth(1)?.split(' ').next()?.parse().ok()
}

#[tokio::test]
async fn with_few_descriptors_half_heads_are_refused_and_health_still_answers() {
    half_heads_under_few_descriptors("memory").await;
}

#[tokio::test]
async fn with_few_descriptors_a_sqlite_store_keeps_working() {
    let dir = tempfile::tempdir().expect("temp dir");
    half_heads_under_few_descriptors(&format!("sqlite://{}", dir.path().join("chat.db").display())).await;
}

#[tokio::test]
async fn with_few_descriptors_a_postgres_store_keeps_working() {
    half_heads_under_few_descriptors(&fresh_database().await).await;
}

/// The app on `database_url` under `ulimit -n NOFILE`; a reader who joined before; then more
/// half heads than descriptors.
async fn half_heads_under_few_descriptors(database_url: &str) {
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(format!("ulimit -n {NOFILE} && exec \"$0\" \"$@\""))
        .arg(AppProcess::binary())
        .args(["--listen", "127.0.0.1:0", "--database-url", database_url])
        .env_remove("DATABASE_URL")
        .env_remove("LISTEN")
        .env("RUST_LOG", "warn");
    let app = AppProcess::start_command(command).await;
    let mut reader = connect_to(app.addr, "ann").await;
    reader.join_room("lounge", 0).await;

    let mut held = Vec::with_capacity(ATTACKERS);
    for _ in 0..ATTACKERS {
        let mut stream = TcpStream::connect(app.addr).await.expect("connect");
        stream.write_all(b"GET /lounge HTTP/1.1\r\nHost: 127.0.0.1\r\n").await.expect("half a head");
        held.push(stream);
    }
    // Far sooner than the 15 s header timeout that would free the held ones.
    let health = "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    let answer = tokio::time::timeout(TIMEOUT, request_to(app.addr, health))
        .await
        .expect("a fresh /health is answered while the cap is reached");
    assert_eq!(answer.status, 200, "{}", answer.body);
    // The store has descriptors: a message from the reader who got in before is stored.
    reader.send_message(1, Uuid::new_v4(), "still here").await;
    assert_eq!(ack(&mut reader).await["status"], "stored");

    // The excess got the refusal the connection cap uses, naming a cap below the limit.
    let deadline = Instant::now() + TIMEOUT;
    let mut answers = vec![Vec::new(); ATTACKERS];
    let (cap, refused) = loop {
        for (stream, answer) in held.iter_mut().zip(&mut answers) {
            let mut buffer = [0u8; 1024];
            if let Ok(read) = stream.try_read(&mut buffer) {
                answer.extend_from_slice(&buffer[..read]);
            }
        }
        let caps: Vec<usize> = answers.iter().filter_map(|a| refusal_cap(a)).collect();
        if let Some(&cap) = caps.first() {
            if caps.len() + cap + RESERVE >= ATTACKERS {
                break (cap, caps.len());
            }
        }
        assert!(Instant::now() < deadline, "refusals so far: {caps:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(cap + 32 <= NOFILE, "the cap {cap} keeps a reserve under the limit {NOFILE}");
    assert!(refused <= ATTACKERS - cap, "{refused} refused: no more than the excess over {cap}");

    // Counted: once the held connections are gone, /metrics says so.
    drop(held);
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let metrics = "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
        let metrics = request_to(app.addr, metrics).await;
        let counted = Reading::parse(&metrics.body).labelled("livechat_limited_total", "limit", "connections");
        if metrics.status == 200 && counted >= refused as f64 {
            break;
        }
        assert!(Instant::now() < deadline, "{} {}", metrics.status, metrics.body);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
