//! The PostgreSQL server of the run: a fresh database per case, the peer's schema, and the
//! plain INSERT + COMMIT anchor.

use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::Context;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, Executor, PgConnection};

use crate::report::{Anchor, ServerWork};

/// The peer's tables, as postgres-es 0.5 documents them (`db/init.sql`: the `events` and
/// `snapshots` tables; its sample view table, row and user are left out).
pub const PEER_SCHEMA: &str = "
CREATE TABLE events
(
    aggregate_type text                         NOT NULL,
    aggregate_id   text                         NOT NULL,
    sequence       bigint CHECK (sequence >= 0) NOT NULL,
    event_type     text                         NOT NULL,
    event_version  text                         NOT NULL,
    payload        json                         NOT NULL,
    metadata       json                         NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
);
CREATE TABLE snapshots
(
    aggregate_type   text                                 NOT NULL,
    aggregate_id     text                                 NOT NULL,
    last_sequence    bigint CHECK (last_sequence >= 0)    NOT NULL,
    current_snapshot bigint CHECK (current_snapshot >= 0) NOT NULL,
    payload          json                                 NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, last_sequence)
);
";

/// Bytes of JSON in each anchor row.
const ANCHOR_ROW_BYTES: usize = 200;
/// Time for a case's closed connections to exit: a backend reports its statistics on exit.
const STATS_SETTLE: Duration = Duration::from_millis(500);

/// The server named by `DATABASE_URL`.
#[derive(Debug)]
pub struct PgServer {
    url: String,
    options: PgConnectOptions,
}

/// A database created for one case and dropped after it.
#[derive(Debug)]
pub struct Database {
    /// Its name.
    pub name: String,
    /// A URL that connects to it.
    pub url: String,
    /// Options that connect to it.
    pub options: PgConnectOptions,
}

impl PgServer {
    /// The server in `DATABASE_URL`, or an error that says how to start one.
    pub fn from_env() -> anyhow::Result<Self> {
        let url = std::env::var("DATABASE_URL").map_err(|_| {
            anyhow::anyhow!(
                "DATABASE_URL is not set, so the PostgreSQL cases cannot run. Start a server first \
                 (`source scripts/postgres.sh; PG_FSYNC=on pg_start`), or pass `--only memory`"
            )
        })?;
        let options = PgConnectOptions::from_str(&url).context("DATABASE_URL is not a PostgreSQL URL")?;
        Ok(Self { url, options })
    }

    /// Server version and durability settings, for the report header.
    pub async fn describe(&self) -> anyhow::Result<String> {
        let mut connection = self.options.connect().await.context("connect to DATABASE_URL")?;
        let version: String = sqlx::query_scalar("SHOW server_version").fetch_one(&mut connection).await?;
        let fsync: String = sqlx::query_scalar("SHOW fsync").fetch_one(&mut connection).await?;
        let sync: String = sqlx::query_scalar("SHOW synchronous_commit").fetch_one(&mut connection).await?;
        connection.close().await?;
        Ok(format!("PostgreSQL {version}, fsync={fsync}, synchronous_commit={sync}"))
    }

    /// Creates an empty database for one case.
    pub async fn create_database(&self, label: &str) -> anyhow::Result<Database> {
        let name = format!("bench_{label}_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let mut admin = self.options.connect().await.context("connect to DATABASE_URL")?;
        admin.execute(format!("CREATE DATABASE {name}").as_str()).await.with_context(|| format!("create {name}"))?;
        admin.close().await?;
        Ok(Database { url: with_database(&self.url, &name), options: self.options.clone().database(&name), name })
    }

    /// WAL flushes so far (`pg_stat_wal.wal_sync`), to take before a side runs.
    pub async fn wal_syncs(&self) -> anyhow::Result<u64> {
        let mut connection = self.options.connect().await?;
        let syncs: i64 = sqlx::query_scalar("SELECT wal_sync FROM pg_stat_wal").fetch_one(&mut connection).await?;
        connection.close().await?;
        Ok(u64::try_from(syncs)?)
    }

    /// What the server did for a side that ran on `database` (its connections closed), given
    /// the WAL flush count from before it ran. Diagnostic: counts all the server's WAL flushes.
    pub async fn work(&self, database: &Database, wal_syncs_before: u64) -> anyhow::Result<ServerWork> {
        tokio::time::sleep(STATS_SETTLE).await;
        let mut connection = self.options.connect().await?;
        let transactions: i64 = sqlx::query_scalar("SELECT xact_commit FROM pg_stat_database WHERE datname = $1")
            .bind(&database.name)
            .fetch_one(&mut connection)
            .await?;
        let syncs: i64 = sqlx::query_scalar("SELECT wal_sync FROM pg_stat_wal").fetch_one(&mut connection).await?;
        connection.close().await?;
        Ok(ServerWork {
            transactions: u64::try_from(transactions)?,
            wal_syncs: u64::try_from(syncs)?.saturating_sub(wal_syncs_before),
        })
    }

    /// Drops a case's database (closing any connection still open on it).
    pub async fn drop_database(&self, database: Database) -> anyhow::Result<()> {
        let mut admin = self.options.connect().await?;
        admin.execute(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", database.name).as_str()).await?;
        admin.close().await?;
        Ok(())
    }
}

/// `url` with its database (the path) replaced by `name`; the query string is kept.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |at| at + 3);
    let path_start = base[authority_start..].find('/').map_or(base.len(), |at| authority_start + at);
    let mut out = format!("{}/{name}", &base[..path_start]);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

/// Single-row autocommit INSERTs of a 200-byte JSON row for `duration`, on `connections`
/// connections (one task each): what the server does with nothing but a commit per row.
pub async fn insert_commit_rate(
    database: &Database,
    connections: usize,
    duration: Duration,
    when: &'static str,
) -> anyhow::Result<Anchor> {
    let mut setup = database.options.connect().await?;
    setup.execute("CREATE TABLE IF NOT EXISTS anchor_rows (id bigserial PRIMARY KEY, payload jsonb NOT NULL)").await?;
    setup.close().await?;
    let mut open = Vec::with_capacity(connections);
    for _ in 0..connections {
        open.push(database.options.connect().await?);
    }
    let start = Instant::now();
    let tasks: Vec<_> = open
        .into_iter()
        .map(|mut connection: PgConnection| {
            tokio::spawn(async move {
                let mut commits = 0u64;
                while start.elapsed() < duration {
                    sqlx::query("INSERT INTO anchor_rows (payload) VALUES ($1::jsonb)")
                        .bind(anchor_row(commits))
                        .execute(&mut connection)
                        .await?;
                    commits += 1;
                }
                connection.close().await?;
                anyhow::Ok(commits)
            })
        })
        .collect();
    let mut commits = 0;
    for task in tasks {
        commits += task.await??;
    }
    Ok(Anchor { store: "postgres", connections, commits, elapsed: start.elapsed(), when })
}

/// A JSON object of exactly [`ANCHOR_ROW_BYTES`] bytes (the SQLite anchor's row too).
pub fn anchor_row(index: u64) -> String {
    let head = format!("{{\"n\":\"{index:020}\",\"content\":\"");
    let padding = ANCHOR_ROW_BYTES - head.len() - 2;
    format!("{head}{}\"}}", "x".repeat(padding))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_is_replaced_in_urls() {
        assert_eq!(with_database("postgres://u@h:5/postgres", "b"), "postgres://u@h:5/b");
        assert_eq!(
            with_database("postgres://u@h:5/postgres?sslmode=disable", "b"),
            "postgres://u@h:5/b?sslmode=disable"
        );
        assert_eq!(with_database("postgres://u@h:5", "b"), "postgres://u@h:5/b");
    }

    #[test]
    fn anchor_rows_are_200_bytes_of_json() {
        let row = anchor_row(42);
        assert_eq!(row.len(), ANCHOR_ROW_BYTES);
        assert!(serde_json::from_str::<serde_json::Value>(&row).is_ok());
    }
}
