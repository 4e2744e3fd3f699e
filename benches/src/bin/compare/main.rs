//! Side-by-side comparison of this project with its Rust peer, cqrs-es 0.5 (and postgres-es
//! 0.5 for PostgreSQL), on one chat workload, in one process, one framework after the other
//! on each case; and this project alone on its SQLite store, for which cqrs-es has no
//! counterpart (the output says "peer: n/a").
//!
//! Run with:
//! ```sh
//! source scripts/postgres.sh; PG_FSYNC=on pg_start    # throwaway server; sets DATABASE_URL
//! cargo run --release -p benches --bin compare                  # full run, several minutes
//! cargo run --release -p benches --bin compare -- --quick       # CI smoke run, well under 2 min
//! cargo run --release -p benches --bin compare -- --only memory # no PostgreSQL needed
//! cargo run --release -p benches --bin compare -- --only sqlite # no PostgreSQL needed
//! cargo run --release -p benches --bin compare -- --replay 1000000 # replay only (PostgreSQL and SQLite)
//! cargo run --release -p benches --bin compare -- --dcb         # conditional appends, reads by tag (dcb.rs)
//! scripts/umadb && cargo run --release -p benches --features umadb --bin compare -- --dcb --peer umadb
//! cargo run --release -p benches --features umadb --bin compare -- --only sqlite --writers --peer umadb
//! cargo run --release -p benches --features umadb --bin compare -- --only sqlite --replay 1000000 --peer umadb
//! ```
//!
//! `--writers` (writers.rs): plain appends, one event each, at 1 to 1 024 concurrent writers
//! each on its own stream, with no framework above the store. `--peer umadb` runs the writer,
//! replay and DCB cases through UmaDB's server and Rust client first, alone on the machine.
//!
//! The workload: aggregate `Chat`, command `SendMessage { sender, content }` with 120 bytes of
//! content, event `MessageSent`, and a read model that counts events (ours: an `EventHandler`
//! run by `spawn_handler`; the peer: a `Query`). One `Chat` type implements both frameworks'
//! `Aggregate` traits with the same decision, so both do the same domain work. Cases (full run;
//! `--quick` scales the counts down):
//!
//! - `memory_sequential`: 1 chat, one client, 100 000 commands; overall rate and the rates of
//!   the first and last 10 000 (a tenth of the run when shorter). The peer's `MemStore` copies
//!   the whole stream twice per command, so its run is capped at 10 000 commands (the output
//!   says so); nothing is extrapolated.
//! - `memory_concurrent`: 1 000 chats, 64 tasks, 200 000 commands; rate, p50/p99 latency, and
//!   events lost (acknowledged commands minus events in the store afterwards).
//! - `postgres_sequential`: 1 chat, one client, 5 000 commands.
//! - `postgres_concurrent`: 100 chats, 32 tasks, 20 000 commands; rate, p50/p99, errors
//!   returned to callers.
//! - `postgres_hot_room`: 1 chat, 32 tasks, 5 000 commands: every command on one stream, so
//!   the dispatcher serialises them on one instance; compared with the sequential case's rate.
//! - the anchor: plain single-row INSERT + COMMIT of a 200-byte JSON row on the same server,
//!   1 and 32 connections, each measured just before the PostgreSQL case it anchors.
//! - `sqlite_sequential`, `sqlite_concurrent` and `sqlite_hot_room`: the PostgreSQL cases' counts on our
//!   `SqliteEventStore` (opened with its defaults, a fresh file per case in a temporary
//!   directory; `TMPDIR` picks the disk). Ours only: the peer's ecosystem that this program
//!   depends on has no SQLite store, and none is invented. Each case between two anchors of
//!   its own: plain single-row INSERT + COMMIT of the same 200-byte JSON row into a fresh file
//!   with the store's settings (WAL, `synchronous=FULL`), on 1 connection and on 32 connections
//!   (one task each) contending for SQLite's write lock. The ratios to the anchors are printed
//!   as information; the only SQLite targets are zero errors and zero lost events.
//!
//! Each PostgreSQL case (and each side) gets a fresh database, dropped afterwards: ours is
//! migrated by `PgEventStore::migrate`, the peer's gets postgres-es's documented `events` and
//! `snapshots` tables. A rate counts acknowledged commands from the first send until the read
//! model has seen every event (the peer's query runs inside each command, ours after it).
//!
//! Output: a table, one JSON line per case (`{"case": ...}`), and the targets met or missed.
//! The exit status is non-zero if OUR side returned an error to a caller, lost an event, or
//! its read model missed one; the peer's faults are reported, not fatal. No timing is asserted.
//!
//! Profiling aid: `--ours-without-read-model` runs our side without its handler (the peer keeps
//! its query), to show what the read model costs; such a run is not a like-for-like comparison.

mod dcb;
mod drive;
mod ours;
mod peer;
mod pg;
mod replay;
mod report;
mod sqlite;
#[cfg(feature = "umadb")]
mod umadb;
mod workload;
mod writers;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use cqrs_memory::MemoryStore;
use cqrs_postgres::PgEventStore;
use cqrs_sqlite::SqliteEventStore;

use crate::ours::ReadModel;
use crate::pg::PgServer;
use crate::report::{Anchor, Case, Report};

/// Which cases to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Only {
    All,
    Memory,
    Postgres,
    Sqlite,
}

impl Only {
    fn memory(self) -> bool {
        matches!(self, Only::All | Only::Memory)
    }

    fn postgres(self) -> bool {
        matches!(self, Only::All | Only::Postgres)
    }

    fn sqlite(self) -> bool {
        matches!(self, Only::All | Only::Sqlite)
    }
}

/// What the command line asked for.
#[derive(Debug, Clone, Copy)]
struct Options {
    quick: bool,
    /// `--replay N`: only the replay cases, over `N` events.
    replay: Option<u64>,
    /// `--dcb`: only the Dynamic Consistency Boundary cases.
    dcb: bool,
    /// `--peer umadb`: the DCB, writer and replay cases through UmaDB too (feature `umadb`).
    umadb: bool,
    /// `--writers`: only the plain appends at 1 to 1 024 concurrent writers.
    writers: bool,
    only: Only,
    read_model: ReadModel,
}

const USAGE: &str =
    "usage: compare [--quick] [--only memory|postgres|sqlite] [--ours-without-read-model] [--replay EVENTS] [--dcb] [--writers] [--peer umadb]";

/// The sizes of one run.
#[derive(Debug, Clone, Copy)]
struct Scale {
    memory_sequential: u64,
    /// The peer's memory sequential run stops here (its cost is quadratic in the stream).
    memory_sequential_peer_cap: u64,
    memory_concurrent: u64,
    memory_chats: u32,
    memory_tasks: usize,
    postgres_sequential: u64,
    postgres_concurrent: u64,
    postgres_chats: u32,
    postgres_tasks: usize,
    /// Commands of the hot-room cases (1 chat, `postgres_tasks` / `sqlite_tasks` tasks).
    hot_room: u64,
    sqlite_sequential: u64,
    sqlite_concurrent: u64,
    sqlite_chats: u32,
    sqlite_tasks: usize,
    anchor_duration: Duration,
}

/// The largest window of a sequential run; shorter runs use a tenth of their length.
const MAX_WINDOW: u64 = 10_000;

impl Scale {
    fn new(quick: bool) -> Self {
        let full = Scale {
            memory_sequential: 100_000,
            memory_sequential_peer_cap: 10_000,
            memory_concurrent: 200_000,
            memory_chats: 1_000,
            memory_tasks: 64,
            postgres_sequential: 5_000,
            postgres_concurrent: 20_000,
            postgres_chats: 100,
            postgres_tasks: 32,
            hot_room: 5_000,
            sqlite_sequential: 5_000,
            sqlite_concurrent: 20_000,
            sqlite_chats: 100,
            sqlite_tasks: 32,
            anchor_duration: Duration::from_secs(5),
        };
        if !quick {
            return full;
        }
        Scale {
            memory_sequential: 10_000,
            memory_sequential_peer_cap: 2_000,
            memory_concurrent: 20_000,
            postgres_sequential: 300,
            postgres_concurrent: 2_000,
            hot_room: 500,
            sqlite_sequential: 300,
            sqlite_concurrent: 2_000,
            anchor_duration: Duration::from_secs(1),
            ..full
        }
    }
}

fn window(commands: u64) -> u64 {
    (commands / 10).clamp(1, MAX_WINDOW)
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("compare: {error:#}");
            ExitCode::from(2)
        }
    }
}

async fn run() -> anyhow::Result<ExitCode> {
    let options = parse_args()?;
    let (quick, only) = (options.quick, options.only);
    let scale = Scale::new(quick);
    // Fail before any work when PostgreSQL cases are asked for without a server.
    let server = if only.postgres() { Some(PgServer::from_env()?) } else { None };
    println!(
        "compare: this project vs cqrs-es 0.5 / postgres-es 0.5; {} run; {} cores",
        if quick { "quick" } else { "full" },
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    if let Some(events) = options.replay {
        return replay_cases(server.as_ref(), only, events, options.umadb).await;
    }
    if options.writers {
        return writers_cases(server.as_ref(), only, quick, options.umadb).await;
    }
    if options.dcb {
        return dcb_cases(server.as_ref(), only, quick, options.umadb).await;
    }
    let mut report = Report::default();
    if only.memory() {
        report.cases.push(memory_sequential(&scale, options.read_model).await?);
        report.cases.push(memory_concurrent(&scale, options.read_model).await?);
    }
    if let Some(server) = &server {
        println!("server: {}", server.describe().await?);
        postgres_cases(server, &scale, options.read_model, &mut report).await?;
    }
    if only.sqlite() {
        println!("sqlite: {}", sqlite::describe().await?);
        sqlite_cases(&scale, options.read_model, &mut report).await?;
    }
    println!();
    report.print_table();
    println!();
    print_targets(&report, quick);
    if quick && (only.postgres() || only.sqlite()) {
        // The replay cases, small: they check that a catch-up from 0 delivers every event in
        // order; their ratio means little at this size.
        println!();
        replay_cases(server.as_ref(), only, QUICK_REPLAY_EVENTS, false).await?;
    }
    let faults: Vec<String> = report
        .cases
        .iter()
        .flat_map(|case| case.ours.faults().into_iter().map(move |fault| format!("{}: {fault}", case.name)))
        .collect();
    if faults.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    for fault in &faults {
        eprintln!("compare: OUR SIDE FAILED: {fault}");
    }
    Ok(ExitCode::FAILURE)
}

/// Events the quick run's replay cases store and replay.
const QUICK_REPLAY_EVENTS: u64 = 20_000;

/// `--dcb`: conditional appends and reads by tag query on each store asked for.
async fn dcb_cases(server: Option<&PgServer>, only: Only, quick: bool, umadb: bool) -> anyhow::Result<ExitCode> {
    let (levels, appends) = dcb::levels(quick);
    let read_events = if quick { 2_000 } else { 100_000 };
    if umadb {
        umadb_cases(levels, appends, read_events).await?;
    }
    if only.memory() {
        let store = Arc::new(MemoryStore::new());
        for &deciders in levels {
            dcb::conditional_appends(Arc::clone(&store), "memory", deciders, appends * 10).await?.print();
        }
    }
    if only.sqlite() {
        println!("sqlite: {}", sqlite::describe().await?);
        for &deciders in levels {
            let scratch = tempfile::NamedTempFile::new().context("temp file")?;
            let store = Arc::new(SqliteEventStore::open(scratch.path()).await.context("open our SQLite store")?);
            dcb::conditional_appends(store, "sqlite", deciders, appends).await?.print();
        }
        let scratch = tempfile::NamedTempFile::new().context("temp file")?;
        let store = SqliteEventStore::open(scratch.path()).await.context("open our SQLite store")?;
        let ours = dcb_reads(&store, "sqlite", read_events).await?;
        let (read, bare) = dcb::bare_sqlite_tag_reads(scratch.path(), &wanted_tag(), 3).await?;
        print_bare("sqlite", read, bare, ours, read_events)?;
    }
    if let Some(server) = server {
        println!("server: {}", server.describe().await?);
        for &deciders in levels {
            let database = server.create_database(&format!("dcb{deciders}")).await?;
            let store = our_pg_store(&database.url).await?;
            dcb::conditional_appends(Arc::clone(&store), "postgres", deciders, appends).await?.print();
            drop(store);
            server.drop_database(database).await?;
        }
        let database = server.create_database("dcbreads").await?;
        let store = our_pg_store(&database.url).await?;
        let ours = dcb_reads(&*store, "postgres", read_events).await?;
        drop(store);
        let (read, bare) = dcb::bare_pg_tag_reads(&database.url, &wanted_tag(), 3).await?;
        print_bare("postgres", read, bare, ours, read_events)?;
        server.drop_database(database).await?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The DCB cases through UmaDB, first (its server runs alone on the machine).
#[cfg(feature = "umadb")]
async fn umadb_cases(levels: &[usize], appends: u64, read_events: u64) -> anyhow::Result<()> {
    println!("umadb: {}", umadb::Server::describe().await?);
    for &deciders in levels {
        umadb::conditional_appends(deciders, appends).await?.print();
    }
    let rate = umadb::tag_reads(read_events).await?;
    println!(
        "dcb {:<8} read by tag query: {rate:>9.0} events/s ({read_events} of {} events match)",
        "umadb",
        2 * read_events
    );
    println!("{{\"case\":\"dcb_umadb_tag_read\",\"events\":{read_events},\"events_per_s\":{rate:.0}}}");
    Ok(())
}

#[cfg(not(feature = "umadb"))]
async fn umadb_cases(_levels: &[usize], _appends: u64, _read_events: u64) -> anyhow::Result<()> {
    bail!("--peer umadb needs the umadb feature: cargo run --release -p benches --features umadb --bin compare -- --dcb --peer umadb")
}

/// The tag the read cases read.
fn wanted_tag() -> cqrs_core::Tag {
    cqrs_core::Tag::new("reader", "wanted")
}

/// The bare `SELECT`'s line, and ours over it.
fn print_bare(name: &str, read: u64, bare: f64, ours: f64, events: u64) -> anyhow::Result<()> {
    anyhow::ensure!(read == 3 * events, "the bare read read {read} events, expected {}", 3 * events);
    println!("dcb {name:<8} bare indexed SELECT: {bare:>9.0} events/s; ours / bare {:.2}×", ours / bare);
    println!("{{\"case\":\"dcb_{name}_tag_read_bare\",\"events_per_s\":{bare:.0},\"ratio\":{:.3}}}", ours / bare);
    Ok(())
}

/// One tag's `events` among as many of other tags, read back by query; events per second.
async fn dcb_reads<S: cqrs_core::EventStore + ?Sized>(store: &S, name: &str, events: u64) -> anyhow::Result<f64> {
    let wanted = wanted_tag();
    dcb::fill_tag(store, &cqrs_core::Tag::new("reader", "other"), events).await?;
    dcb::fill_tag(store, &wanted, events).await?;
    let (read, rate) = dcb::tag_reads(store, &wanted, 3).await?;
    anyhow::ensure!(read == 3 * events, "read {read} events by tag, expected {}", 3 * events);
    println!("dcb {name:<8} read by tag query: {rate:>9.0} events/s ({events} of {} events match)", 2 * events);
    println!("{{\"case\":\"dcb_{name}_tag_read\",\"events\":{events},\"events_per_s\":{rate:.0}}}");
    Ok(rate)
}

/// `--replay N`: the replay case of each durable store asked for (there is no peer side).
async fn replay_cases(server: Option<&PgServer>, only: Only, events: u64, umadb: bool) -> anyhow::Result<ExitCode> {
    // UmaDB first: its server runs alone on the machine.
    let peer = if umadb { Some(umadb_replay(events).await?) } else { None };
    let mut replays = Vec::new();
    if let Some(server) = server {
        println!("server: {}", server.describe().await?);
        replays.push(replay::postgres(server, events).await?);
    }
    if only.sqlite() {
        println!("sqlite: {}", sqlite::describe().await?);
        replays.push(replay::sqlite(events).await?);
    }
    println!();
    for replay in &replays {
        replay.print();
    }
    if let Some((fill, rate)) = peer {
        println!(
            "replay umadb: {events} events (filled in {:.1} s): UmaDB's client from 0, each event decoded into the handler's type: {rate:.0} events/s",
            fill.as_secs_f64()
        );
        println!("{{\"case\":\"replay_umadb\",\"events\":{events},\"events_per_s\":{rate:.0}}}");
        for replay in &replays {
            println!("replay {} / umadb: {:.2}x", replay.store, replay.ours_per_s / rate);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `--writers`: plain appends at each concurrency level, through UmaDB first when asked, then
/// our SQLite store (and PostgreSQL when asked), a fresh file or database per level.
async fn writers_cases(server: Option<&PgServer>, only: Only, quick: bool, umadb: bool) -> anyhow::Result<ExitCode> {
    let (levels, appends) = writers::levels(quick);
    let mut runs = Vec::new();
    if umadb {
        runs.extend(umadb_writers(levels, appends).await?);
    }
    if only.sqlite() {
        println!("sqlite: {}", sqlite::describe().await?);
        for &writers in levels {
            let scratch = sqlite::Scratch::new(&format!("writers{writers}"))?;
            let store = Arc::new(SqliteEventStore::open(scratch.path()).await.context("open our SQLite store")?);
            let run = writers::ours(store, "sqlite", writers, appends(writers)).await;
            run.print();
            runs.push(run);
        }
    }
    if let Some(server) = server {
        println!("server: {}", server.describe().await?);
        for &writers in levels {
            let database = server.create_database(&format!("writers{writers}")).await?;
            let store = our_pg_store(&database.url).await?;
            let run = writers::ours(Arc::clone(&store), "postgres", writers, appends(writers)).await;
            run.print();
            runs.push(run);
            drop(store);
            server.drop_database(database).await?;
        }
    }
    println!();
    for run in runs.iter().filter(|run| run.store != "umadb") {
        if let Some(peer) = runs.iter().find(|peer| peer.store == "umadb" && peer.writers == run.writers) {
            println!(
                "writers {} / umadb at {:>5} writers: {:.2}x appends/s, p99 {:.2} ms vs {:.2} ms",
                run.store,
                run.writers,
                run.rate() / peer.rate(),
                run.p99.as_secs_f64() * 1e3,
                peer.p99.as_secs_f64() * 1e3
            );
        }
    }
    let failed = runs.iter().any(|run| run.errors > 0 && run.store != "umadb");
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

#[cfg(feature = "umadb")]
async fn umadb_writers(levels: &[usize], appends: fn(usize) -> u64) -> anyhow::Result<Vec<writers::WritersRun>> {
    println!("umadb: {}", umadb::Server::describe().await?);
    let mut runs = Vec::new();
    for &writers in levels {
        let run = umadb::writers(writers, appends(writers)).await?;
        run.print();
        runs.push(run);
    }
    Ok(runs)
}

#[cfg(not(feature = "umadb"))]
async fn umadb_writers(_levels: &[usize], _appends: fn(usize) -> u64) -> anyhow::Result<Vec<writers::WritersRun>> {
    bail!("--peer umadb needs the umadb feature: cargo run --release -p benches --features umadb --bin compare -- --writers --peer umadb")
}

#[cfg(feature = "umadb")]
async fn umadb_replay(events: u64) -> anyhow::Result<(Duration, f64)> {
    println!("umadb: {}", umadb::Server::describe().await?);
    umadb::replay(events).await
}

#[cfg(not(feature = "umadb"))]
async fn umadb_replay(_events: u64) -> anyhow::Result<(Duration, f64)> {
    bail!("--peer umadb needs the umadb feature: cargo run --release -p benches --features umadb --bin compare -- --replay N --peer umadb")
}

fn parse_args() -> anyhow::Result<Options> {
    let mut options = Options {
        quick: false,
        replay: None,
        dcb: false,
        umadb: false,
        writers: false,
        only: Only::All,
        read_model: ReadModel::Counting,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => options.quick = true,
            "--dcb" => options.dcb = true,
            "--writers" => options.writers = true,
            "--peer" => match args.next().as_deref() {
                Some("umadb") => options.umadb = true,
                other => bail!("--peer takes `umadb`, not {other:?}"),
            },
            "--ours-without-read-model" => options.read_model = ReadModel::Off,
            "--replay" => {
                let events = args.next().context("--replay takes a number of events")?;
                let events: u64 = events.parse().with_context(|| format!("--replay {events:?}: not a number"))?;
                anyhow::ensure!(events > 0, "--replay takes at least 1 event");
                options.replay = Some(events);
            }
            "--only" => {
                options.only = match args.next().as_deref() {
                    Some("memory") => Only::Memory,
                    Some("postgres") => Only::Postgres,
                    Some("sqlite") => Only::Sqlite,
                    other => bail!("--only takes `memory`, `postgres` or `sqlite`, not {other:?}"),
                }
            }
            "-h" | "--help" => {
                println!("{USAGE}\n(see the doc comment of benches/src/bin/compare/main.rs)");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}; {USAGE}"),
        }
    }
    Ok(options)
}

/// Prints a case as it finishes: progress on stderr, its JSON line on stdout.
fn finished(case: Case) -> Case {
    match case.ratio() {
        Some(ratio) => eprintln!("compare: {} done: ours/peer {ratio:.1}×", case.name),
        None => eprintln!("compare: {} done: {:.0} commands/s; peer n/a", case.name, case.ours.rate()),
    }
    println!("{}", case.json_line());
    case
}

async fn memory_sequential(scale: &Scale, read_model: ReadModel) -> anyhow::Result<Case> {
    let commands = scale.memory_sequential;
    eprintln!("compare: memory_sequential: ours, {commands} commands");
    let ours = ours::sequential(Arc::new(MemoryStore::new()), "memory", read_model, commands, window(commands)).await;
    let peer_commands = commands.min(scale.memory_sequential_peer_cap);
    let note = (peer_commands < commands).then(|| {
        format!(
            "cqrs-es capped at {peer_commands} of {commands} commands (MemStore copies the whole stream twice per \
             command: quadratic); its figures are for its own shorter run, nothing is extrapolated"
        )
    });
    eprintln!("compare: memory_sequential: cqrs-es, {peer_commands} commands");
    let peer = peer::memory_sequential(peer_commands, window(peer_commands), note).await?;
    Ok(finished(Case { name: "memory_sequential", chats: 1, tasks: 1, ours, peer: Some(peer) }))
}

async fn memory_concurrent(scale: &Scale, read_model: ReadModel) -> anyhow::Result<Case> {
    let (commands, chats, tasks) = (scale.memory_concurrent, scale.memory_chats, scale.memory_tasks);
    eprintln!("compare: memory_concurrent: ours, {commands} commands");
    let ours = ours::concurrent(Arc::new(MemoryStore::new()), "memory", read_model, commands, chats, tasks).await;
    eprintln!("compare: memory_concurrent: cqrs-es, {commands} commands");
    let peer = peer::memory_concurrent(commands, chats, tasks).await?;
    Ok(finished(Case { name: "memory_concurrent", chats, tasks, ours, peer: Some(peer) }))
}

async fn postgres_cases(
    server: &PgServer,
    scale: &Scale,
    read_model: ReadModel,
    report: &mut Report,
) -> anyhow::Result<()> {
    // Each case between two anchors of its connection count: the machine's state drifts.
    for (case, connections) in
        [(PgCase::Sequential, 1), (PgCase::Concurrent, scale.postgres_tasks), (PgCase::HotRoom, scale.postgres_tasks)]
    {
        report.anchors.push(anchor(server, connections, scale.anchor_duration, "before").await?);
        report.cases.push(postgres_case(server, scale, read_model, case).await?);
        report.anchors.push(anchor(server, connections, scale.anchor_duration, "after").await?);
    }
    Ok(())
}

async fn sqlite_cases(scale: &Scale, read_model: ReadModel, report: &mut Report) -> anyhow::Result<()> {
    for (case, connections) in
        [(PgCase::Sequential, 1), (PgCase::Concurrent, scale.sqlite_tasks), (PgCase::HotRoom, scale.sqlite_tasks)]
    {
        report.anchors.push(sqlite_anchor(connections, scale.anchor_duration, "before").await?);
        report.cases.push(sqlite_case(scale, read_model, case).await?);
        report.anchors.push(sqlite_anchor(connections, scale.anchor_duration, "after").await?);
    }
    Ok(())
}

async fn sqlite_anchor(connections: usize, duration: Duration, when: &'static str) -> anyhow::Result<Anchor> {
    eprintln!("compare: sqlite anchor: INSERT+COMMIT on {connections} connection(s)");
    let anchor = sqlite::insert_commit_rate(connections, duration, when).await?;
    println!("{}", anchor.json_line());
    Ok(anchor)
}

/// Ours on a fresh `SqliteEventStore` file, opened with its defaults as a user would; the
/// peer has no SQLite store.
async fn sqlite_case(scale: &Scale, read_model: ReadModel, case: PgCase) -> anyhow::Result<Case> {
    let (name, commands, chats, tasks) = match case {
        PgCase::Sequential => ("sqlite_sequential", scale.sqlite_sequential, 1, 1),
        PgCase::Concurrent => ("sqlite_concurrent", scale.sqlite_concurrent, scale.sqlite_chats, scale.sqlite_tasks),
        PgCase::HotRoom => ("sqlite_hot_room", scale.hot_room, 1, scale.sqlite_tasks),
    };
    eprintln!("compare: {name}: ours, {commands} commands (peer: n/a)");
    let scratch = sqlite::Scratch::new("ours")?;
    let store = Arc::new(SqliteEventStore::open(scratch.path()).await.context("open our SQLite store")?);
    let mut ours = match case {
        PgCase::Sequential => {
            ours::sequential(Arc::clone(&store), "sqlite", read_model, commands, window(commands)).await
        }
        PgCase::Concurrent | PgCase::HotRoom => {
            ours::concurrent(Arc::clone(&store), "sqlite", read_model, commands, chats, tasks).await
        }
    };
    let stats = store.stats();
    // Each committed write transaction is one WAL fsync at synchronous=FULL.
    ours.server = Some(report::ServerWork { transactions: stats.transactions, wal_syncs: stats.transactions });
    if stats.failed_transactions > 0 {
        let note = format!("{} write transactions failed", stats.failed_transactions);
        ours.note = Some(match ours.note.take() {
            Some(previous) => format!("{previous}; {note}"),
            None => note,
        });
    }
    drop(store);
    drop(scratch);
    Ok(finished(Case { name, chats, tasks, ours, peer: None }))
}

/// The two cases of a durable store (PostgreSQL or SQLite).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PgCase {
    Sequential,
    Concurrent,
    /// Many tasks, one chat.
    HotRoom,
}

async fn anchor(
    server: &PgServer,
    connections: usize,
    duration: Duration,
    when: &'static str,
) -> anyhow::Result<Anchor> {
    eprintln!("compare: anchor: INSERT+COMMIT on {connections} connection(s)");
    let database = server.create_database("anchor").await?;
    let anchor = pg::insert_commit_rate(&database, connections, duration, when).await;
    server.drop_database(database).await?;
    let anchor = anchor?;
    println!("{}", anchor.json_line());
    Ok(anchor)
}

/// Ours, then the peer, each in a fresh database, each with the server's work counted.
async fn postgres_case(server: &PgServer, scale: &Scale, read_model: ReadModel, case: PgCase) -> anyhow::Result<Case> {
    let (name, commands, chats, tasks) = match case {
        PgCase::Sequential => ("postgres_sequential", scale.postgres_sequential, 1, 1),
        PgCase::Concurrent => {
            ("postgres_concurrent", scale.postgres_concurrent, scale.postgres_chats, scale.postgres_tasks)
        }
        PgCase::HotRoom => ("postgres_hot_room", scale.hot_room, 1, scale.postgres_tasks),
    };
    eprintln!("compare: {name}: ours, {commands} commands");
    let database = server.create_database("ours").await?;
    // Diagnostics only (pg_stat_wal needs PostgreSQL 14+): a failure leaves them out.
    let wal_syncs = server.wal_syncs().await.ok();
    let ours = match (our_pg_store(&database.url).await, case) {
        (Ok(store), PgCase::Sequential) => {
            Ok(ours::sequential(store, "postgres", read_model, commands, window(commands)).await)
        }
        (Ok(store), PgCase::Concurrent | PgCase::HotRoom) => {
            Ok(ours::concurrent(store, "postgres", read_model, commands, chats, tasks).await)
        }
        (Err(error), _) => Err(error),
    };
    let work = server_work(server, &database, wal_syncs).await;
    server.drop_database(database).await?;
    let mut ours = ours?;
    ours.server = work;

    eprintln!("compare: {name}: cqrs-es, {commands} commands");
    let database = server.create_database("peer").await?;
    let wal_syncs = server.wal_syncs().await.ok();
    let peer = match case {
        PgCase::Sequential => peer::postgres_sequential(&database, commands, window(commands)).await,
        PgCase::Concurrent | PgCase::HotRoom => peer::postgres_concurrent(&database, commands, chats, tasks).await,
    };
    let work = server_work(server, &database, wal_syncs).await;
    server.drop_database(database).await?;
    let mut peer = peer?;
    peer.server = work;
    Ok(finished(Case { name, chats, tasks, ours, peer: Some(peer) }))
}

/// The server's work for one side, if its statistics can be read.
async fn server_work(server: &PgServer, database: &pg::Database, wal_syncs: Option<u64>) -> Option<report::ServerWork> {
    server.work(database, wal_syncs?).await.ok()
}

/// Our PostgreSQL store with its default configuration, as a user would open it.
async fn our_pg_store(url: &str) -> anyhow::Result<Arc<PgEventStore>> {
    let store = PgEventStore::connect(url).await.context("connect our store")?;
    store.migrate().await.context("migrate our store")?;
    Ok(Arc::new(store))
}

/// One target: `actual` against `wanted`, with what missing it by means.
fn judge(label: &str, actual: f64, wanted: f64) {
    let verdict = if actual >= wanted {
        "met".to_owned()
    } else {
        format!("MISSED by {:.0} %", (wanted - actual) / wanted * 100.0)
    };
    println!("target {label}: {actual:.2} vs ≥ {wanted:.2}: {verdict}");
}

fn print_targets(report: &Report, quick: bool) {
    println!("targets{}:", if quick { " (quick run: counts too small to judge)" } else { "" });
    if let Some(case) = report.case("memory_sequential") {
        if let Some((_, first, last)) = case.ours.window_rates() {
            judge("memory_sequential ours last-window / first-window rate", last / first, 1.0);
        }
        if let Some(windows) = case.ours.run.windows {
            // The same question asked of the windows' median latencies, which a few preemptions
            // by other processes hardly move.
            let (first, last) = (windows.first_p50.as_secs_f64(), windows.last_p50.as_secs_f64());
            judge("memory_sequential ours first-window p50 / last-window p50 latency", first / last.max(1e-9), 1.0);
        }
        if let Some(ratio) = case.ratio() {
            judge("memory_sequential ours/peer throughput (peer capped, see note)", ratio, 100.0);
        }
    }
    if let Some(case) = report.case("memory_concurrent") {
        if let Some(ratio) = case.ratio() {
            judge("memory_concurrent ours/peer throughput", ratio, 10.0);
        }
        println!("target memory_concurrent ours lost events: {} (want 0)", case.ours.lost());
    }
    if let (Some(case), Some(anchor)) = (report.case("postgres_sequential"), report.anchor_rate("postgres", 1)) {
        judge(
            "postgres_sequential ours / INSERT+COMMIT on 1 connection (mean of before/after)",
            case.ours.rate() / anchor,
            0.8,
        );
    }
    if let Some(case) = report.case("postgres_concurrent") {
        let connections = case.tasks;
        if let Some(anchor) = report.anchor_rate("postgres", connections) {
            judge(
                &format!(
                    "postgres_concurrent ours / INSERT+COMMIT on {connections} connections (mean of before/after)"
                ),
                case.ours.rate() / anchor,
                2.0,
            );
        }
        println!("target postgres_concurrent ours errors: {} (want 0)", case.ours.run.errors);
    }
    for (hot_name, sequential_name) in
        [("postgres_hot_room", "postgres_sequential"), ("sqlite_hot_room", "sqlite_sequential")]
    {
        if let (Some(hot), Some(sequential)) = (report.case(hot_name), report.case(sequential_name)) {
            judge(
                &format!("{hot_name} ours / {sequential_name} ours throughput"),
                hot.ours.rate() / sequential.ours.rate(),
                5.0,
            );
            println!(
                "target {hot_name} ours errors: {}, lost events: {} (want 0 and 0)",
                hot.ours.run.errors,
                hot.ours.lost()
            );
        }
    }
    for name in ["sqlite_sequential", "sqlite_concurrent", "sqlite_hot_room"] {
        let Some(case) = report.case(name) else { continue };
        let connections = case.tasks;
        if let Some(anchor) = report.anchor_rate("sqlite", connections) {
            let label = format!(
                "{name} ours / SQLite INSERT+COMMIT on {connections} connection(s) (mean of before/after; peer: n/a)"
            );
            match name {
                "sqlite_sequential" => judge(&label, case.ours.rate() / anchor, 0.8),
                "sqlite_concurrent" => judge(&label, case.ours.rate() / anchor, 2.0),
                _ => println!("info {label}: {:.2} (no target)", case.ours.rate() / anchor),
            }
        }
        println!(
            "target {name} ours errors: {}, lost events: {} (want 0 and 0): {}",
            case.ours.run.errors,
            case.ours.lost(),
            if case.ours.faults().is_empty() { "met" } else { "MISSED" }
        );
    }
}
