//! The peer's side: cqrs-es 0.5's `CqrsFramework` with its `MemStore`, and with postgres-es's
//! `PostgresEventRepository` behind the default (non-snapshot) `PersistedEventStore` that
//! `postgres_cqrs` builds. The read model is a counting `Query`, which cqrs-es calls inside
//! `execute` after each commit.

use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use cqrs_es::mem_store::MemStore;
use cqrs_es::{CqrsFramework, EventStore as PeerEventStore};
use sqlx::postgres::PgPoolOptions;

use crate::drive::{self, Contender, Run};
use crate::pg::{Database, PEER_SCHEMA};
use crate::report::Side;
use crate::workload::{chat_id, Chat, PeerMessageCount, SendMessage};

/// postgres-es's `default_postgress_pool` size; concurrent runs get one connection per task
/// if that is more.
const PEER_POOL_CONNECTIONS: u32 = 10;

/// A framework plus its counting query.
struct Peer<ES: PeerEventStore<Chat>> {
    framework: CqrsFramework<Chat, ES>,
}

impl<ES> Contender for Peer<ES>
where
    ES: PeerEventStore<Chat> + 'static,
    ES::AC: Send,
{
    async fn send(&self, command: SendMessage) -> Result<(), String> {
        self.framework.execute(&chat_id(command.chat), command).await.map_err(|error| error.to_string())
    }
}

fn peer<ES: PeerEventStore<Chat>>(store: ES) -> (Arc<Peer<ES>>, PeerMessageCount) {
    let count = PeerMessageCount::default();
    let framework = CqrsFramework::new(store, vec![Box::new(count.clone())], ());
    (Arc::new(Peer { framework }), count)
}

/// Silences stdout while it lives: `MemStore` prints a line on every load and every commit.
/// The printing still costs the peer its `write` calls (to /dev/null), as it would in use.
struct Quiet {
    _stdout: gag::Gag,
}

impl Quiet {
    fn stdout() -> anyhow::Result<Self> {
        std::io::stdout().flush()?;
        Ok(Self { _stdout: gag::Gag::stdout().context("redirect stdout")? })
    }
}

/// One client, chat 0, on `MemStore`.
pub async fn memory_sequential(commands: u64, window: u64, note: Option<String>) -> anyhow::Result<Side> {
    let store = MemStore::<Chat>::default();
    let (peer, count) = peer(store.clone());
    let quiet = Quiet::stdout()?;
    let run = drive::sequential(&*peer, commands, window).await;
    let stored = memory_events(&store, 1).await;
    drop(quiet);
    Ok(side("memory", run, stored, &count, note))
}

/// `tasks` tasks over `chats` chats on `MemStore`.
pub async fn memory_concurrent(commands: u64, chats: u32, tasks: usize) -> anyhow::Result<Side> {
    let store = MemStore::<Chat>::default();
    let (peer, count) = peer(store.clone());
    let quiet = Quiet::stdout()?;
    let run = drive::concurrent(peer, commands, chats, tasks).await;
    let stored = memory_events(&store, chats).await;
    drop(quiet);
    Ok(side("memory", run, stored, &count, None))
}

/// Events in a `MemStore`, summed over the chats' streams.
async fn memory_events(store: &MemStore<Chat>, chats: u32) -> u64 {
    let mut total = 0;
    for chat in 0..chats {
        total += store.load_events(&chat_id(chat)).await.map_or(0, |events| events.len() as u64);
    }
    total
}

/// One client, chat 0, on PostgreSQL.
pub async fn postgres_sequential(database: &Database, commands: u64, window: u64) -> anyhow::Result<Side> {
    let pool = postgres_pool(database, 1).await?;
    let (peer, count) = peer(postgres_store(&pool));
    let run = drive::sequential(&*peer, commands, window).await;
    let stored = postgres_events(&pool).await?;
    pool.close().await;
    Ok(side("postgres", run, stored, &count, None))
}

/// `tasks` tasks over `chats` chats on PostgreSQL.
pub async fn postgres_concurrent(database: &Database, commands: u64, chats: u32, tasks: usize) -> anyhow::Result<Side> {
    let pool = postgres_pool(database, tasks).await?;
    let (peer, count) = peer(postgres_store(&pool));
    let run = drive::concurrent(peer, commands, chats, tasks).await;
    let stored = postgres_events(&pool).await?;
    pool.close().await;
    Ok(side("postgres", run, stored, &count, None))
}

/// What `postgres_es::postgres_cqrs` builds: the event-replaying store (no snapshots).
fn postgres_store(
    pool: &sqlx::PgPool,
) -> cqrs_es::persist::PersistedEventStore<postgres_es::PostgresEventRepository, Chat> {
    let repository = postgres_es::PostgresEventRepository::new(pool.clone());
    cqrs_es::persist::PersistedEventStore::new_event_store(repository)
}

async fn postgres_pool(database: &Database, tasks: usize) -> anyhow::Result<sqlx::PgPool> {
    let connections = PEER_POOL_CONNECTIONS.max(u32::try_from(tasks).unwrap_or(u32::MAX));
    let pool = PgPoolOptions::new()
        .max_connections(connections)
        .connect_with(database.options.clone())
        .await
        .context("connect the peer's pool")?;
    sqlx::raw_sql(PEER_SCHEMA).execute(&pool).await.context("create the peer's tables")?;
    Ok(pool)
}

async fn postgres_events(pool: &sqlx::PgPool) -> anyhow::Result<u64> {
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(pool).await?;
    Ok(u64::try_from(count)?)
}

fn side(store: &'static str, run: Run, stored: u64, count: &PeerMessageCount, note: Option<String>) -> Side {
    let read_model = Some(count.0.load(Ordering::Relaxed));
    Side { system: "cqrs-es", store, run, settle: Duration::ZERO, stored, read_model, note, server: None }
}
