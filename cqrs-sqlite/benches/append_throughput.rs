//! Append throughput of `SqliteEventStore` against the plain commit rate of SQLite with the
//! same settings (WAL, `synchronous=FULL`) on the same disk.
//!
//! Run with: `cargo bench -p cqrs-tokio-sqlite --bench append_throughput`
//!
//! Measures appends per second (1-event appends, `ExpectedVersion::Any`, one stream per writer
//! task) with 1 and 32 concurrent writer tasks on one store, then single-row autocommit
//! `INSERT`s (one INSERT + COMMIT, one fsync each) on 1 connection and on 32 connections
//! contending for the write lock. Each run lasts `BENCH_SECONDS` (default 5) on a fresh file
//! in a temporary directory (set `TMPDIR` to measure another disk).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cqrs_core::testing::conformance::event;
use cqrs_core::{EventStore, ExpectedVersion, StreamId};
use cqrs_sqlite::SqliteEventStore;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{ConnectOptions, Executor};

type BenchResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const WRITER_COUNTS: [usize; 2] = [1, 32];

fn main() -> BenchResult<()> {
    let seconds: u64 = std::env::var("BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(run(Duration::from_secs(seconds)))
}

async fn run(duration: Duration) -> BenchResult<()> {
    let dir = tempfile::tempdir()?;
    println!(
        "sqlite {} in {}; journal_mode=WAL synchronous=FULL; {} s per measurement",
        sqlite_version(&dir.path().join("version.db")).await?,
        dir.path().display(),
        duration.as_secs()
    );
    for writers in WRITER_COUNTS {
        let path = dir.path().join(format!("store-{writers}.db"));
        let (rate, transactions, appends) = store_appends(&path, writers, duration).await?;
        println!(
            "SqliteEventStore append (1 event, Any)  writers={writers:>2}  {rate:>9.0} appends/s  \
             ({transactions} transactions, {:.1} appends each)",
            appends as f64 / transactions.max(1) as f64
        );
    }
    for connections in WRITER_COUNTS {
        let path = dir.path().join(format!("plain-{connections}.db"));
        let rate = plain_inserts(&path, connections, duration).await?;
        println!("plain INSERT + COMMIT (autocommit)      conns={connections:>2}    {rate:>9.0} commits/s");
    }
    Ok(())
}

/// The settings the store uses.
fn options(path: &Path) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(30))
        .disable_statement_logging()
}

async fn sqlite_version(path: &Path) -> BenchResult<String> {
    let mut connection = options(path).connect().await?;
    Ok(sqlx::query_scalar("SELECT sqlite_version()").fetch_one(&mut connection).await?)
}

async fn store_appends(path: &Path, writers: usize, duration: Duration) -> BenchResult<(f64, u64, u64)> {
    let store = Arc::new(SqliteEventStore::open(path).await?);
    let start = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|writer| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let stream = StreamId::new(format!("bench-{writer}"))?;
                let mut appends = 0u64;
                while start.elapsed() < duration {
                    store.append(&stream, ExpectedVersion::Any, vec![event(appends)]).await?;
                    appends += 1;
                }
                BenchResult::Ok(appends)
            })
        })
        .collect();
    let mut total = 0;
    for task in tasks {
        total += task.await??;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let stats = store.stats();
    Ok((total as f64 / elapsed, stats.transactions, stats.appends))
}

async fn plain_inserts(path: &Path, connections: usize, duration: Duration) -> BenchResult<f64> {
    let mut setup = options(path).connect().await?;
    setup.execute("CREATE TABLE bench_rows (id INTEGER PRIMARY KEY, payload TEXT NOT NULL)").await?;
    let payload = event(0).payload.to_string();
    let start = Instant::now();
    let tasks: Vec<_> = (0..connections)
        .map(|_| {
            let options = options(path);
            let payload = payload.clone();
            tokio::spawn(async move {
                let mut connection = options.connect().await?;
                let mut commits = 0u64;
                while start.elapsed() < duration {
                    sqlx::query("INSERT INTO bench_rows (payload) VALUES (?1)")
                        .bind(&payload)
                        .execute(&mut connection)
                        .await?;
                    commits += 1;
                }
                BenchResult::Ok(commits)
            })
        })
        .collect();
    let mut total = 0;
    for task in tasks {
        total += task.await??;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}
