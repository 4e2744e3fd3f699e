//! `livechat-fill`: fills a store with chat history quickly, for measurements (BENCHMARKS.md:
//! memory and start-up time with 1 000 000 stored messages).
//!
//! ```text
//! cargo run --release -p livechat-app --bin livechat-fill -- --database-url URL [--rooms 1000] [--messages 1000]
//! ```
//! Appends `--messages` `MessageSent` events to each of `--rooms` rooms (`room-0000` …), one
//! `EventStore::append` of up to 1 000 events per call, straight through the store (no
//! dispatcher, no read model), with senders and times spread so the rooms look lived-in.
//! The events are the ones the app writes; earlier versions of the app read them too (the
//! fields added since have defaults).

use std::time::Instant;

use anyhow::{bail, Context, Result};
use cqrs_core::{ExpectedVersion, Metadata, NewEvent, Timestamp};
use livechat_app::domain::{ChatEvent, ChatId, MessageSent};
use livechat_app::server::open_store;

/// Events per append.
const BATCH: u64 = 1_000;

#[tokio::main]
async fn main() -> Result<()> {
    let mut database_url = None;
    let (mut rooms, mut messages) = (1_000u64, 1_000u64);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--database-url" => database_url = Some(value()?),
            "--rooms" => rooms = value()?.parse().context("--rooms")?,
            "--messages" => messages = value()?.parse().context("--messages")?,
            other => {
                bail!("unknown argument {other:?}; usage: livechat-fill --database-url URL [--rooms N] [--messages N]")
            }
        }
    }
    let url = database_url.context("--database-url is required")?;
    let store = open_store(&url).await?;
    let started = Instant::now();
    let start_micros = Timestamp::now().0 - i64::try_from(messages * 60_000_000).unwrap_or(i64::MAX / 2);
    for room in 0..rooms {
        let chat_id = ChatId::parse(&format!("room-{room:04}"))?;
        let stream = chat_id.stream_id();
        let mut number = 0;
        while number < messages {
            let batch = BATCH.min(messages - number);
            let events = (number..number + batch)
                .map(|n| {
                    let event = ChatEvent::MessageSent(MessageSent {
                        chat_id: chat_id.clone(),
                        sender: format!("user{}", (n * 7 + room) % 50),
                        content: format!(
                            "message {n} of room {room}: a line of ordinary chat, about eighty characters"
                        ),
                        sent_at: Timestamp(start_micros + i64::try_from(n).unwrap_or(0) * 60_000_000),
                        number: n + 1,
                        mentions: vec![],
                    });
                    NewEvent::from_domain(&event, Metadata::default())
                })
                .collect::<Result<Vec<_>, _>>()?;
            store.append(&stream, ExpectedVersion::Any, events).await?;
            number += batch;
        }
        if room % 100 == 99 {
            eprintln!("livechat-fill: {} rooms, {:.1} s", room + 1, started.elapsed().as_secs_f64());
        }
    }
    println!(
        "livechat-fill: {} messages in {rooms} rooms in {:.1} s; head {}",
        rooms * messages,
        started.elapsed().as_secs_f64(),
        store.head().await?
    );
    Ok(())
}
