//! `--dcb`: conditional appends (Dynamic Consistency Boundaries) per second with 1, 32 and 256
//! concurrent deciders, and reads by tag query, on each store asked for.
//!
//! Each decider owns one tag (`decider:{run}-{n}`), reads its events once, then appends one
//! event at a time with the condition "no event tagged like mine after the last position I
//! stored": every append is conditional and checked by the store, none conflicts, so the rate is
//! the store's conditional-append throughput. The read case then reads one decider's events by
//! tag query, page by page, many times over.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use cqrs_core::{
    AppendCondition, EventId, EventStore, ExpectedVersion, Metadata, NewEvent, Position, Query, QueryItem, StoreError,
    StreamId, Tag,
};

/// One conditional-append run.
#[derive(Debug)]
pub struct DcbRun {
    /// The store's name.
    pub store: &'static str,
    /// Concurrent deciders.
    pub deciders: usize,
    /// Conditional appends committed.
    pub appends: u64,
    /// Conditions that failed (none expected: each decider owns its tag).
    pub conflicts: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Latency of one conditional append, 50th and 99th percentile.
    pub p50: Duration,
    /// See `p50`.
    pub p99: Duration,
}

impl DcbRun {
    /// Conditional appends per second.
    pub fn rate(&self) -> f64 {
        self.appends as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Prints its line and its JSON line.
    pub fn print(&self) {
        println!(
            "dcb {:<8} {:>4} deciders: {:>9.0} conditional appends/s  p50 {:>7.2} ms  p99 {:>7.2} ms  conflicts {}",
            self.store,
            self.deciders,
            self.rate(),
            self.p50.as_secs_f64() * 1e3,
            self.p99.as_secs_f64() * 1e3,
            self.conflicts
        );
        println!(
            "{{\"case\":\"dcb_{}_{}\",\"appends\":{},\"appends_per_s\":{:.0},\"p50_ms\":{:.3},\"p99_ms\":{:.3},\"conflicts\":{}}}",
            self.store,
            self.deciders,
            self.appends,
            self.rate(),
            self.p50.as_secs_f64() * 1e3,
            self.p99.as_secs_f64() * 1e3,
            self.conflicts
        );
    }
}

fn event(tag: &Tag, n: u64) -> NewEvent {
    NewEvent {
        event_id: EventId::new(),
        event_type: "SeatTaken".to_owned(),
        schema_version: 1,
        payload: serde_json::json!({ "n": n, "note": "x".repeat(100) }),
        metadata: Metadata::default(),
        tags: vec![tag.clone()],
    }
}

/// `deciders` tasks sharing `appends` conditional appends.
pub async fn conditional_appends<S: EventStore + ?Sized>(
    store: Arc<S>,
    name: &'static str,
    deciders: usize,
    appends: u64,
) -> anyhow::Result<DcbRun> {
    let run = uuid::Uuid::new_v4().simple().to_string();
    let per_decider = (appends / deciders as u64).max(1);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(deciders);
    for decider in 0..deciders {
        let store = Arc::clone(&store);
        let tag = Tag::new("decider", format!("{run}-{decider}"));
        let stream = StreamId::new(format!("decider-{run}.{decider}")).context("stream id")?;
        tasks.push(tokio::spawn(async move {
            let query = Query::from_items([QueryItem::tags([tag.clone()])]);
            let mut after = store.head().await?;
            let mut latencies = Vec::with_capacity(per_decider as usize);
            let mut conflicts = 0u64;
            let mut n = 0;
            while n < per_decider {
                let condition = AppendCondition::new(query.clone(), Some(after));
                let sent = Instant::now();
                match store
                    .append_with_condition(&stream, ExpectedVersion::Any, vec![event(&tag, n)], Some(condition))
                    .await
                {
                    Ok(outcome) => {
                        latencies.push(sent.elapsed());
                        after = outcome.result().last_position;
                        n += 1;
                    }
                    Err(StoreError::ConditionFailed { position }) => {
                        conflicts += 1;
                        after = position;
                    }
                    Err(error) => return Err(error),
                }
            }
            Ok::<_, StoreError>((latencies, conflicts))
        }));
    }
    let mut latencies = Vec::new();
    let mut conflicts = 0;
    for task in tasks {
        let (mine, lost) = task.await.context("decider task")??;
        latencies.extend(mine);
        conflicts += lost;
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    let at = |q: f64| latencies.get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)));
    Ok(DcbRun {
        store: name,
        deciders,
        appends: latencies.len() as u64,
        conflicts,
        elapsed,
        p50: at(0.50).copied().unwrap_or_default(),
        p99: at(0.99).copied().unwrap_or_default(),
    })
}

/// Reads the events of one tag by query, `rounds` times; events per second.
pub async fn tag_reads<S: EventStore + ?Sized>(store: &S, tag: &Tag, rounds: usize) -> anyhow::Result<(u64, f64)> {
    let query = Query::from_items([QueryItem::tags([tag.clone()])]);
    let started = Instant::now();
    let mut read = 0u64;
    for _ in 0..rounds {
        let mut after = Position::START;
        loop {
            let page = store.read_query(&query, after, 1_000).await?;
            let Some(last) = page.last() else { break };
            after = last.position;
            read += page.len() as u64;
        }
    }
    Ok((read, read as f64 / started.elapsed().as_secs_f64().max(1e-9)))
}

/// The decider counts of a run.
pub fn levels(quick: bool) -> (&'static [usize], u64) {
    if quick {
        (&[1, 32], 200)
    } else {
        (&[1, 32, 256], 4_000)
    }
}

/// Fills one tag with `events` events (for the read case), in appends of 100.
pub async fn fill_tag<S: EventStore + ?Sized>(store: &S, tag: &Tag, events: u64) -> anyhow::Result<()> {
    let stream = StreamId::new(format!("reads-{}", uuid::Uuid::new_v4().simple())).context("stream id")?;
    let mut n = 0;
    while n < events {
        let batch: Vec<NewEvent> = (n..(n + 100).min(events)).map(|i| event(tag, i)).collect();
        n += batch.len() as u64;
        store.append(&stream, ExpectedVersion::Any, batch).await?;
    }
    Ok(())
}

/// The anchor of the tag-read case on SQLite: the bare indexed `SELECT` a hand-written program
/// would page with through sqlx (the same driver as the store), every column fetched and the
/// payload read as text, nothing decoded further. Events per second.
pub async fn bare_sqlite_tag_reads(path: &std::path::Path, tag: &Tag, rounds: usize) -> anyhow::Result<(u64, f64)> {
    use sqlx::Row;
    let options = sqlx::sqlite::SqliteConnectOptions::new().filename(path).read_only(true);
    let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect_with(options).await?;
    let sql = "SELECT e.* FROM cqrs_event_tags t JOIN cqrs_events e ON e.position = t.position \
               WHERE t.tag = ?1 AND t.position > ?2 ORDER BY t.position LIMIT 1000";
    bare_reads(rounds, |after| {
        let pool = pool.clone();
        async move {
            let rows = sqlx::query(sql).bind(tag.as_str()).bind(after).fetch_all(&pool).await?;
            rows.iter()
                .map(|row| Ok((row.try_get::<i64, _>("position")?, row.try_get::<String, _>("payload")?.len())))
                .collect()
        }
    })
    .await
}

/// The anchor of the tag-read case on PostgreSQL: the bare `SELECT … FROM cqrs_event_tags t(tag,
/// at) CROSS JOIN LATERAL (SELECT * FROM cqrs_events e WHERE e.position = t.at OFFSET 0) e WHERE
/// t.tag = $1 AND t.at > $2` (the store's plan for a one-tag query: an ordered range of the tag
/// index, each event probed by position), paged by position, every column fetched, the payload
/// read as text.
pub async fn bare_pg_tag_reads(url: &str, tag: &Tag, rounds: usize) -> anyhow::Result<(u64, f64)> {
    use sqlx::Row;
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(1).connect(url).await?;
    let sql = "SELECT position, event_id, stream_id, version, event_type, schema_version, payload::text AS payload, \
               command_id, causation_id, correlation_id, headers::text AS headers, recorded_at, tags \
               FROM cqrs_event_tags t(tag, at) CROSS JOIN LATERAL \
               (SELECT * FROM cqrs_events e WHERE e.position = t.at OFFSET 0) e \
               WHERE t.tag = $1 AND t.at > $2 ORDER BY t.at LIMIT 1000";
    bare_reads(rounds, |after| {
        let pool = pool.clone();
        async move {
            let rows = sqlx::query(sql).bind(tag.as_str()).bind(after).fetch_all(&pool).await?;
            rows.iter()
                .map(|row| Ok((row.try_get::<i64, _>("position")?, row.try_get::<String, _>("payload")?.len())))
                .collect()
        }
    })
    .await
}

/// Pages through `page(after)` (position, payload length per row) `rounds` times.
async fn bare_reads<F, Fut>(rounds: usize, page: F) -> anyhow::Result<(u64, f64)>
where
    F: Fn(i64) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<(i64, usize)>, sqlx::Error>>,
{
    let started = Instant::now();
    let mut read = 0u64;
    let mut bytes = 0usize;
    for _ in 0..rounds {
        let mut after = 0i64;
        loop {
            let rows = page(after).await?;
            let Some(&(last, _)) = rows.last() else { break };
            after = last;
            read += rows.len() as u64;
            bytes += rows.iter().map(|(_, len)| len).sum::<usize>();
        }
    }
    anyhow::ensure!(bytes > 0, "the bare read read no payload");
    Ok((read, read as f64 / started.elapsed().as_secs_f64().max(1e-9)))
}
