//! Append throughput of `PgEventStore` against the plain commit rate of the same server.
//!
//! Run with: `source scripts/postgres.sh; PG_FSYNC=on pg_start; cargo bench -p cqrs-tokio-postgres --bench append_throughput`
//!
//! Measures appends per second (1-event appends, `ExpectedVersion::Any`, one stream per writer
//! task) with 1 and 32 concurrent writer tasks on one store instance (with 1 and 4 group-commit
//! writer tasks), then single-row
//! autocommit `INSERT`s (one INSERT + COMMIT per round trip) on 1 and 32 connections. Each
//! run lasts `BENCH_SECONDS` (default 5) in a fresh database that is dropped afterwards.

use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use cqrs_core::testing::conformance::event;
use cqrs_core::{EventStore, ExpectedVersion, StreamId};
use cqrs_postgres::{PgEventStore, PgStoreConfig};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, Executor, PgConnection};

const WRITER_COUNTS: [usize; 2] = [1, 32];

fn main() -> anyhow::Result<()> {
    let Ok(server_url) = std::env::var("DATABASE_URL") else {
        eprintln!(
            "append_throughput: DATABASE_URL is not set. Start a server first, e.g. \
             `source scripts/postgres.sh; PG_FSYNC=on pg_start`, then run the bench again."
        );
        std::process::exit(2);
    };
    let seconds: u64 = std::env::var("BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(run(&server_url, Duration::from_secs(seconds)))
}

async fn run(server_url: &str, duration: Duration) -> anyhow::Result<()> {
    let server = PgConnectOptions::from_str(server_url).context("DATABASE_URL")?;
    let database = format!("cqrs_bench_{}", uuid::Uuid::new_v4().simple());
    let mut admin = server.connect().await.context("connect to DATABASE_URL")?;
    admin.execute(format!("CREATE DATABASE {database}").as_str()).await?;
    let options = server.clone().database(&database).options([("synchronous_commit", "on")]);
    let result = measure(&options, duration).await;
    admin.execute(format!("DROP DATABASE {database} WITH (FORCE)").as_str()).await?;
    result
}

async fn measure(options: &PgConnectOptions, duration: Duration) -> anyhow::Result<()> {
    let mut probe = options.connect().await?;
    let fsync: String = sqlx::query_scalar("SHOW fsync").fetch_one(&mut probe).await?;
    let sync: String = sqlx::query_scalar("SHOW synchronous_commit").fetch_one(&mut probe).await?;
    println!("server: fsync={fsync} synchronous_commit={sync}; {} s per measurement", duration.as_secs());
    for (writers, writer_tasks) in [(1, 1), (32, 1), (32, 4)] {
        let rate = store_appends(options, writers, writer_tasks, duration).await?;
        println!(
            "PgEventStore append (1 event, Any)   writers={writers:>2}  {rate:>9.0} appends/s  (writer_tasks={writer_tasks})"
        );
    }
    probe.execute("CREATE TABLE bench_rows (id bigserial PRIMARY KEY, payload jsonb NOT NULL)").await?;
    for connections in WRITER_COUNTS {
        let rate = plain_inserts(options, connections, duration).await?;
        println!("plain INSERT + COMMIT (autocommit)   conns={connections:>2}    {rate:>9.0} commits/s");
    }
    Ok(())
}

async fn store_appends(
    options: &PgConnectOptions,
    writers: usize,
    writer_tasks: usize,
    duration: Duration,
) -> anyhow::Result<f64> {
    let pool = PgPoolOptions::new().max_connections(8).connect_with(options.clone()).await?;
    let store = PgEventStore::from_pool(pool, PgStoreConfig::default().with_writer_tasks(writer_tasks));
    store.migrate().await?;
    let store = Arc::new(store);
    let start = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|_| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let stream_id = StreamId::new(format!("bench-{}", uuid::Uuid::new_v4().simple()))?;
                let mut appends = 0u64;
                while start.elapsed() < duration {
                    store.append(&stream_id, ExpectedVersion::Any, vec![event(appends)]).await?;
                    appends += 1;
                }
                anyhow::Ok(appends)
            })
        })
        .collect();
    let mut total = 0;
    for task in tasks {
        total += task.await??;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

async fn plain_inserts(options: &PgConnectOptions, connections: usize, duration: Duration) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let mut connection: PgConnection = options.connect().await?;
        tasks.push(tokio::spawn(async move {
            let mut inserts = 0u64;
            while start.elapsed() < duration {
                sqlx::query("INSERT INTO bench_rows (payload) VALUES ($1)")
                    .bind(sqlx::types::Json(serde_json::json!({"n": inserts, "note": "plain insert"})))
                    .execute(&mut connection)
                    .await?;
                inserts += 1;
            }
            connection.close().await?;
            anyhow::Ok(inserts)
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await??;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}
