//! `--replay N`: a new handler catching up from position 0 over `N` stored events, against a
//! bare `SELECT * FROM cqrs_events ORDER BY position` of the same rows on the same store.
//!
//! This is the speed at which a new projection (or the chat's read model, when it replays)
//! is rebuilt. Ours is a [`Subscription`] over the whole log with its default page size, as
//! the handler runner feeds a handler, the handler doing nothing but count: every event is read
//! through [`EventStore::read_all`] into a `RecordedEvent` (its payload kept as the stored
//! text), then decoded into the handler's type ([`Message`]): one parse per payload. The bare
//! side streams every row twice: touching one column (the database's and the driver's share
//! alone), and decoding each payload into [`Message`] (the least any reader of these rows must
//! do). PostgreSQL: sqlx; SQLite: its own C API through rusqlite. All run twice, alternating;
//! the best of each is reported.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use cqrs_core::{EventId, EventStore, ExpectedVersion, Metadata, NewEvent, Position, StreamId, Subscription};
use futures_util::TryStreamExt;
use serde_json::json;
use sqlx::Row;

/// Events per append (and per stream) when filling the store.
pub const PER_APPEND: u64 = 250;

/// The handler's type of a replayed event: each replayed event is decoded into it, as a
/// handler's `Event` type would be.
#[derive(Debug, serde::Deserialize)]
pub struct Message {
    /// The chat.
    pub chat_id: String,
    /// Who sent it.
    pub sender: String,
    /// What was said.
    pub text: String,
}

/// A message-like payload of about 200 bytes of JSON.
pub fn message(stream: u64, n: u64) -> serde_json::Value {
    json!({
        "chat_id": format!("chat-{stream}"),
        "sender": "replay",
        "text": format!("message {n} of a replayed log, padded to about two hundred bytes of JSON ........"),
    })
}

/// One store's replay figures.
#[derive(Debug)]
pub struct Replay {
    /// `postgres` or `sqlite`.
    pub store: &'static str,
    /// Events stored and replayed.
    pub events: u64,
    /// How long filling the store took.
    pub fill: Duration,
    /// The bare SELECT's best rate, rows/s.
    pub bare_per_s: f64,
    /// The bare SELECT's best rate with each payload decoded into [`Message`], rows/s.
    pub bare_decoded_per_s: f64,
    /// Our subscription's best rate, events/s.
    pub ours_per_s: f64,
}

impl Replay {
    /// Prints the figures and the target (ours ≥ 50 % of the bare SELECT).
    pub fn print(&self) {
        println!(
            "replay {}: {} events (filled in {:.1} s): bare SELECT {:.0} rows/s, with each payload decoded {:.0} rows/s, ours (Subscription from 0) {:.0} events/s",
            self.store,
            self.events,
            self.fill.as_secs_f64(),
            self.bare_per_s,
            self.bare_decoded_per_s,
            self.ours_per_s
        );
        crate::judge(
            &format!("replay_{} ours / bare SELECT in position order", self.store),
            self.ours_per_s / self.bare_per_s,
            0.5,
        );
        crate::judge(
            &format!("replay_{} ours / bare SELECT with each payload decoded", self.store),
            self.ours_per_s / self.bare_decoded_per_s,
            0.8,
        );
        if self.store == "sqlite" {
            crate::judge("replay_sqlite ours, million events/s decoded", self.ours_per_s / 1e6, 1.0);
        }
    }
}

/// A message-like event of about 200 bytes of JSON, as the other cases store.
fn event(stream: u64, n: u64) -> NewEvent {
    NewEvent {
        event_id: EventId::new(),
        event_type: "MessageSent".to_owned(),
        schema_version: 1,
        payload: message(stream, n),
        metadata: Metadata::default(),
        tags: Vec::new(),
    }
}

/// Stores `events` events in appends of [`PER_APPEND`], one stream per append.
async fn fill<S: EventStore>(store: &S, events: u64) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut stored = 0;
    let mut stream = 0;
    while stored < events {
        let count = PER_APPEND.min(events - stored);
        let id = StreamId::new(format!("replay-{stream}")).context("stream id")?;
        let batch: Vec<NewEvent> = (0..count).map(|n| event(stream, stored + n)).collect();
        store.append(&id, ExpectedVersion::NoStream, batch).await.context("fill the store")?;
        stored += count;
        stream += 1;
    }
    Ok(started.elapsed())
}

/// Our side: a subscription from position 0 until it has delivered `events`.
async fn ours<S: EventStore>(store: Arc<S>, events: u64) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut subscription = Subscription::all(store, Position::START);
    let mut seen = 0u64;
    let mut last = Position::START;
    while seen < events {
        let event = subscription.next().await.context("replay")?.context("the store closed during the replay")?;
        anyhow::ensure!(event.position > last, "positions went backwards");
        last = event.position;
        let message: Message = event.payload.decode()?;
        std::hint::black_box(message.chat_id.len() + message.sender.len() + message.text.len());
        seen += 1;
    }
    Ok(events as f64 / started.elapsed().as_secs_f64())
}

/// The bare side: every row in position order, streamed, one column read; with `decode`, each
/// payload also decoded into [`Message`].
async fn bare<'e, E>(executor: E, events: u64, decode: bool) -> anyhow::Result<f64>
where
    E: sqlx::Executor<'e>,
    for<'r> i64: sqlx::Decode<'r, E::Database> + sqlx::Type<E::Database>,
    for<'r> sqlx::types::Json<Message>: sqlx::Decode<'r, E::Database> + sqlx::Type<E::Database>,
    for<'q> <E::Database as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, E::Database>,
    usize: sqlx::ColumnIndex<<E::Database as sqlx::Database>::Row>,
    for<'n> &'n str: sqlx::ColumnIndex<<E::Database as sqlx::Database>::Row>,
{
    let started = Instant::now();
    let mut rows = sqlx::query("SELECT * FROM cqrs_events ORDER BY position").fetch(executor);
    let mut seen = 0u64;
    let mut sum = 0i64;
    while let Some(row) = rows.try_next().await? {
        sum = sum.wrapping_add(row.try_get::<i64, _>(0)?);
        if decode {
            let message = row.try_get::<sqlx::types::Json<Message>, _>("payload")?.0;
            sum = sum.wrapping_add((message.chat_id.len() + message.sender.len() + message.text.len()) as i64);
        }
        seen += 1;
    }
    anyhow::ensure!(seen == events, "the bare SELECT returned {seen} rows, not {events}");
    std::hint::black_box(sum);
    Ok(events as f64 / started.elapsed().as_secs_f64())
}

/// SQLite's bare side: every row in position order through SQLite's own C API (rusqlite),
/// one column read (with `decode`, each payload decoded into [`Message`] too), on one
/// connection with the store's reader settings: the fastest read the library allows.
fn bare_sqlite(path: &std::path::Path, events: u64, decode: bool) -> anyhow::Result<f64> {
    let connection = rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let mmap_size = cqrs_sqlite::SqliteStoreConfig::default().read_mmap_size;
    connection.pragma_update(None, "mmap_size", i64::try_from(mmap_size).unwrap_or(i64::MAX))?;
    let started = Instant::now();
    let mut statement = connection.prepare("SELECT * FROM cqrs_events ORDER BY position")?;
    let payload = statement.column_index("payload")?;
    let mut rows = statement.query([])?;
    let (mut seen, mut sum) = (0u64, 0i64);
    while let Some(row) = rows.next()? {
        sum = sum.wrapping_add(row.get::<_, i64>(0)?);
        if decode {
            let message: Message = serde_json::from_str(row.get_ref(payload)?.as_str()?)?;
            sum = sum.wrapping_add((message.chat_id.len() + message.sender.len() + message.text.len()) as i64);
        }
        seen += 1;
    }
    anyhow::ensure!(seen == events, "the bare SELECT returned {seen} rows, not {events}");
    std::hint::black_box(sum);
    Ok(events as f64 / started.elapsed().as_secs_f64())
}

/// PostgreSQL: a fresh database, filled through our store.
pub async fn postgres(server: &crate::pg::PgServer, events: u64) -> anyhow::Result<Replay> {
    let database = server.create_database("replay").await?;
    let result = async {
        let store = crate::our_pg_store(&database.url).await?;
        eprintln!("compare: replay postgres: filling {events} events");
        let fill = fill(&*store, events).await?;
        let pool = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(&database.url).await?;
        let (mut bare_best, mut decoded_best, mut ours_best) = (0f64, 0f64, 0f64);
        for round in 1..=2 {
            eprintln!("compare: replay postgres: round {round}");
            bare_best = bare_best.max(bare(&pool, events, false).await?);
            decoded_best = decoded_best.max(bare(&pool, events, true).await?);
            ours_best = ours_best.max(ours(Arc::clone(&store), events).await?);
        }
        pool.close().await;
        Ok::<_, anyhow::Error>(Replay {
            store: "postgres",
            events,
            fill,
            bare_per_s: bare_best,
            bare_decoded_per_s: decoded_best,
            ours_per_s: ours_best,
        })
    }
    .await;
    server.drop_database(database).await?;
    result
}

/// SQLite: a fresh file, filled through our store, opened with its defaults.
pub async fn sqlite(events: u64) -> anyhow::Result<Replay> {
    let scratch = crate::sqlite::Scratch::new("replay")?;
    let store = Arc::new(cqrs_sqlite::SqliteEventStore::open(scratch.path()).await.context("open our SQLite store")?);
    eprintln!("compare: replay sqlite: filling {events} events");
    let fill = fill(&*store, events).await?;
    let (mut bare_best, mut decoded_best, mut ours_best) = (0f64, 0f64, 0f64);
    for round in 1..=2 {
        eprintln!("compare: replay sqlite: round {round}");
        let path = scratch.path();
        bare_best = bare_best.max(tokio::task::spawn_blocking(move || bare_sqlite(&path, events, false)).await??);
        let path = scratch.path();
        decoded_best = decoded_best.max(tokio::task::spawn_blocking(move || bare_sqlite(&path, events, true)).await??);
        ours_best = ours_best.max(ours(Arc::clone(&store), events).await?);
    }
    drop(store);
    drop(scratch);
    Ok(Replay {
        store: "sqlite",
        events,
        fill,
        bare_per_s: bare_best,
        bare_decoded_per_s: decoded_best,
        ours_per_s: ours_best,
    })
}
