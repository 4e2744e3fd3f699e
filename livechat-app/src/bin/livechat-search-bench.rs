//! `livechat-search-bench`: how fast the search read model catches up over a store's whole
//! log, and how long searches take (BENCHMARKS.md, "Search").
//!
//! ```text
//! cargo run --release -p livechat-app --bin livechat-search-bench -- --database-url URL [--runs 50] [--rebuild]
//! ```
//! With `--rebuild`, only the rebuild: the live index brought to the head, then a new version
//! built beside it through `Rebuilds` (the console's "Build") and timed, then dropped.
//! Builds a fresh index beside the chat's own (projection `chat-search-bench-…`, its own tables)
//! from the log's start to its head, prints the events per second, then runs a few searches
//! `--runs` times each and prints their p50 and p99 (on PostgreSQL, again after `ANALYZE`),
//! then drops its tables. Fill the store
//! first with `livechat-fill` (1 000 rooms × 1 000 messages).

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use std::sync::Arc;

use cqrs_core::rebuild::{version_name, Rebuildable, Rebuilds};
use cqrs_core::{Position, Progress, Store};
use livechat_app::domain::ChatId;
use livechat_app::search::{Backend, PgSearch, Search, SearchVersions, SqliteSearch, Terms, PROJECTION_NAME, RESULTS};
use livechat_app::server::open;

#[tokio::main]
async fn main() -> Result<()> {
    let mut database_url = None;
    let mut runs = 50usize;
    let mut rebuild_only = false;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--database-url" => database_url = Some(value()?),
            "--runs" => runs = value()?.parse().context("--runs")?,
            "--rebuild" => rebuild_only = true,
            other => bail!(
                "unknown argument {other:?}; usage: livechat-search-bench --database-url URL [--runs N] [--rebuild]"
            ),
        }
    }
    let url = database_url.context("--database-url is required")?;
    let opened = open(&url).await?;
    let backend = opened.search.context("search needs a sqlite:// or postgres:// store")?;
    let suffix = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let (name, table) = (format!("chat-search-bench-{suffix}"), format!("chat_search_bench_{suffix}"));
    let head = opened.store.head().await?;
    if rebuild_only {
        return rebuild(opened.store, backend, head).await;
    }
    let progress = Progress::new();
    let started = Instant::now();
    let search = match &backend {
        Backend::Sqlite { url, store } => SqliteSearch::start_named(url, store, &name, &table, &progress).await?,
        Backend::Postgres(store) => PgSearch::start_named(store, &name, &table, &progress).await?,
    };
    progress.wait_for(&name, head, Duration::from_secs(24 * 3600)).await?;
    let elapsed = started.elapsed().as_secs_f64();
    println!("catch-up: {} events in {elapsed:.1} s: {:.0} events/s", head.0, head.0 as f64 / elapsed);
    measure(&search, runs).await?;
    if let Backend::Postgres(store) = &backend {
        // As autovacuum does soon after a bulk load: with statistics the planner walks the
        // newest rows for a common word instead of collecting all its matches.
        sqlx::raw_sql(&format!("ANALYZE {table}")).execute(store.pool()).await?;
        println!("after ANALYZE:");
        measure(&search, runs).await?;
    }
    search.running.stop().await;
    drop_tables(&backend, &table).await?;
    Ok(())
}

/// Runs each search `runs` times and prints its p50 and p99.
async fn measure(search: &Search, runs: usize) -> Result<()> {
    let room = ChatId::parse("room-0500")?;
    let cases: [(&str, Option<&ChatId>); 5] = [
        ("ordinary chat", None),
        ("ordinary", Some(&room)),
        ("message 999", None),
        ("999 room 500", None),
        ("nothing matches this", None),
    ];
    for (query, room) in cases {
        let terms = Terms::parse(query)?;
        let mut times = Vec::with_capacity(runs);
        let mut found = 0;
        for _ in 0..runs.max(1) {
            let started = Instant::now();
            found = search.index.search(&terms, room, RESULTS).await?.len();
            times.push(started.elapsed());
        }
        times.sort();
        let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1000.0;
        let place = room.map_or_else(|| "every room".to_owned(), |room| format!("#{room}"));
        println!("search {query:?} in {place}: {found} results, p50 {:.2} ms, p99 {:.2} ms", at(0.5), at(0.99));
    }
    Ok(())
}

async fn drop_tables(backend: &Backend, table: &str) -> Result<()> {
    match backend {
        Backend::Sqlite { url, .. } => SqliteSearch::drop_tables(url, table).await?,
        Backend::Postgres(store) => PgSearch::drop_tables(store, table).await?,
    }
    Ok(())
}

/// `--rebuild`: the search index's live version brought to the head first, then a new version
/// built beside it through [`Rebuilds`] (what the console's "Build" does) and timed to the
/// head, then dropped; the live version is left as it was.
async fn rebuild(store: Arc<dyn Store>, backend: Backend, head: Position) -> Result<()> {
    let progress = Progress::new();
    let rebuilds = Rebuilds::new(store, progress.clone(), "search-bench");
    rebuilds.register(Arc::new(SearchVersions::new(backend)) as Arc<dyn Rebuildable>).await?;
    let view = rebuilds.views().await.remove(0);
    let live = version_name(PROJECTION_NAME, view.live);
    progress.wait_for(&live, head, Duration::from_secs(24 * 3600)).await?;
    if let Some(beside) = view.beside {
        bail!("version {beside} is already beside the live one; drop it from the console first");
    }
    let started = Instant::now();
    let version = rebuilds.build(PROJECTION_NAME).await?;
    progress.wait_for(&version_name(PROJECTION_NAME, version), head, Duration::from_secs(24 * 3600)).await?;
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "rebuild beside (v{version} while v{} serves): {} events in {elapsed:.1} s: {:.0} events/s",
        view.live,
        head.0,
        head.0 as f64 / elapsed
    );
    rebuilds.drop_version(PROJECTION_NAME, version).await?;
    rebuilds.stop().await;
    Ok(())
}
