//! The SQLite cases' files and anchor: each case and each anchor gets a fresh file in its own
//! temporary directory (`TMPDIR` picks the disk), removed afterwards. The anchor is a bare
//! INSERT+COMMIT through rusqlite with the store's settings (WAL, `synchronous=FULL`), so a
//! commit costs the same fsync on both.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{ConnectOptions, Connection};
use tempfile::TempDir;

use crate::report::Anchor;

/// A fresh directory for one case or anchor, and the database file in it.
pub struct Scratch {
    dir: TempDir,
}

impl Scratch {
    /// A new empty directory under the system's temporary directory.
    pub fn new(label: &str) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("compare-sqlite-{label}-"))
            .tempdir()
            .context("create a temporary directory for SQLite")?;
        Ok(Self { dir })
    }

    /// The database file (not created yet).
    pub fn path(&self) -> PathBuf {
        self.dir.path().join("events.db")
    }
}

/// The settings the store uses for its connections.
fn options(path: &Path) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(30))
        .disable_statement_logging()
}

/// SQLite's version, settings and where the files go, for the report header.
pub async fn describe() -> anyhow::Result<String> {
    let scratch = Scratch::new("version")?;
    let mut connection = options(&scratch.path()).connect().await.context("open a SQLite file")?;
    let version: String = sqlx::query_scalar("SELECT sqlite_version()").fetch_one(&mut connection).await?;
    let journal: String = sqlx::query_scalar("PRAGMA journal_mode").fetch_one(&mut connection).await?;
    let synchronous: i64 = sqlx::query_scalar("PRAGMA synchronous").fetch_one(&mut connection).await?;
    connection.close().await?;
    let synchronous = match synchronous {
        0 => "OFF".to_owned(),
        1 => "NORMAL".to_owned(),
        2 => "FULL".to_owned(),
        3 => "EXTRA".to_owned(),
        other => other.to_string(),
    };
    Ok(format!(
        "SQLite {version}, journal_mode={journal}, synchronous={synchronous}, fresh files under {}",
        std::env::temp_dir().display()
    ))
}

/// Single-row autocommit INSERTs of a 200-byte JSON row for `duration` on a fresh file, on
/// `connections` connections (one thread each) contending for SQLite's write lock: one INSERT +
/// COMMIT, one WAL fsync, per row. Through SQLite's own C API (rusqlite, the same bundled
/// library the store links) with a prepared statement: the fastest a program doing one
/// durable write per request gets from the library, with the store's settings.
pub async fn insert_commit_rate(connections: usize, duration: Duration, when: &'static str) -> anyhow::Result<Anchor> {
    let scratch = Scratch::new("anchor")?;
    let path = scratch.path();
    open_bare(&path)?.execute("CREATE TABLE anchor_rows (id INTEGER PRIMARY KEY, payload TEXT NOT NULL)", [])?;
    let mut open = Vec::with_capacity(connections);
    for _ in 0..connections {
        open.push(open_bare(&path)?);
    }
    let start = Instant::now();
    let threads: Vec<_> = open
        .into_iter()
        .map(|connection| {
            std::thread::spawn(move || {
                let mut insert = connection.prepare("INSERT INTO anchor_rows (payload) VALUES (?1)")?;
                let mut commits = 0u64;
                while start.elapsed() < duration {
                    insert.execute([crate::pg::anchor_row(commits)])?;
                    commits += 1;
                }
                anyhow::Ok(commits)
            })
        })
        .collect();
    let mut commits = 0;
    for thread in threads {
        commits += thread.join().map_err(|_| anyhow::anyhow!("an anchor thread panicked"))??;
    }
    let elapsed = start.elapsed();
    drop(scratch);
    Ok(Anchor { store: "sqlite", connections, commits, elapsed, when })
}

/// A rusqlite connection with the store's settings: WAL, `synchronous=FULL`, a 30 s busy wait.
fn open_bare(path: &Path) -> anyhow::Result<rusqlite::Connection> {
    let connection = rusqlite::Connection::open(path).context("open a SQLite file")?;
    connection.busy_timeout(Duration::from_secs(30))?;
    connection.pragma_update(None, "journal_mode", "WAL")?;
    connection.pragma_update(None, "synchronous", "FULL")?;
    Ok(connection)
}
