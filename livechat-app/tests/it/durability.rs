//! The chat's default store is a SQLite file: history survives a restart, and a process killed
//! with SIGKILL while messages are being sent loses no acknowledged message and duplicates none.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use uuid::Uuid;

use crate::support::{connect_as, connect_to, AppProcess, Next};

/// Every message of `room` as a fresh viewer sees it on joining: (position, body HTML).
async fn history(app: &AppProcess, room: &str) -> Vec<(u64, String)> {
    let mut viewer = connect_to(app.addr, "auditor").await;
    viewer
        .join_room(room, 0)
        .await
        .into_iter()
        .filter(|frame| frame.kind() == "msg")
        .map(|frame| (frame.pos(), frame.html))
        .collect()
}

fn body_of(html: &str) -> &str {
    let start = html.find("<p class=\"body\"").and_then(|i| html[i..].find('>').map(|j| i + j + 1)).unwrap_or(0);
    let end = html[start..].find("</p>").map_or(html.len(), |i| start + i);
    &html[start..end]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_database_url_history_is_kept_in_livechat_db() {
    let dir = tempfile::tempdir().expect("temp dir");
    let first = AppProcess::start_with(&["--listen", "127.0.0.1:0"], Some(dir.path())).await;
    let mut alice = connect_to(first.addr, "alice").await;
    alice.join_room("kept", 0).await;
    alice.send_message(1, Uuid::new_v4(), "remember me").await;
    assert_eq!(alice.recv_kind("ack").await.head["ok"], true);
    drop(alice);
    drop(first);
    assert!(dir.path().join("livechat.db").exists(), "the default store is ./livechat.db");
    let second = AppProcess::start_with(&["--listen", "127.0.0.1:0"], Some(dir.path())).await;
    let kept = history(&second, "kept").await;
    assert_eq!(kept.len(), 1);
    assert_eq!(body_of(&kept[0].1), "remember me");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_sending_loses_no_acknowledged_message() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("chat.db").display());
    let mut app = AppProcess::start(&url).await;
    let acknowledged = Arc::new(Mutex::new(HashSet::new()));
    let acks_seen = Arc::new(tokio::sync::Notify::new());
    // 16 senders (the rate limits are per sender and per address: each comes through the
    // loopback proxy from its own address), each sending as fast as acks come back.
    let mut senders = Vec::new();
    for s in 0..16 {
        let mut client = connect_as(app.addr, &format!("sender{s}"), &format!("198.51.100.{}", s + 1)).await;
        client.join_room("crash", 0).await;
        let acknowledged = Arc::clone(&acknowledged);
        let acks_seen = Arc::clone(&acks_seen);
        senders.push(tokio::spawn(async move {
            let mut in_flight = HashMap::new();
            for i in 0..5u64 {
                let text = format!("s{s}-m{i}");
                in_flight.insert(i, text.clone());
                client.send_message(i, Uuid::new_v4(), &text).await;
                loop {
                    match client.next().await {
                        Next::Frame(frame) if frame.kind() == "ack" => {
                            if frame.head["ok"] == true {
                                acknowledged.lock().await.insert(text.clone());
                                acks_seen.notify_one();
                            }
                            break;
                        }
                        Next::Frame(_) => continue,
                        Next::Closed(_) => return,
                    }
                }
            }
        }));
    }
    // Kill the server mid-stream: after 30 acknowledgements, with sends still in flight.
    loop {
        if acknowledged.lock().await.len() >= 30 {
            break;
        }
        tokio::time::timeout(Duration::from_secs(10), acks_seen.notified()).await.expect("acks arrive");
    }
    app.child.start_kill().expect("SIGKILL");
    app.child.wait().await.expect("killed");
    for sender in senders {
        let _ = sender.await;
    }
    let acknowledged = acknowledged.lock().await.clone();
    assert!(acknowledged.len() >= 30);

    let restarted = AppProcess::start(&url).await;
    let stored = history(&restarted, "crash").await;
    let bodies: Vec<&str> = stored.iter().map(|(_, html)| body_of(html)).collect();
    let unique: HashSet<&str> = bodies.iter().copied().collect();
    assert_eq!(unique.len(), bodies.len(), "no duplicates");
    for text in &acknowledged {
        assert!(unique.contains(text.as_str()), "acknowledged {text:?} was lost");
    }
    println!("{} acknowledged before kill -9, {} stored after restart", acknowledged.len(), stored.len());
}
