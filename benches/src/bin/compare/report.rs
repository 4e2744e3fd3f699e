//! Results: one [`Side`] per framework and case, printed as a table and as one JSON line per
//! case, and the targets judged against them.

use std::time::Duration;

use serde_json::{json, Value};

use crate::drive::Run;

/// One framework's result on one case.
#[derive(Debug)]
pub struct Side {
    /// "ours" or "cqrs-es".
    pub system: &'static str,
    /// Which event store.
    pub store: &'static str,
    /// What the callers saw.
    pub run: Run,
    /// Ours only: how long after the last reply the counting handler had seen every event.
    /// Counted in the throughput, so the read model's work is inside the measured time on both
    /// sides (the peer's query runs inside each command).
    pub settle: Duration,
    /// Events in the store after the run.
    pub stored: u64,
    /// Events the counting read model saw (`None`: run without it).
    pub read_model: Option<u64>,
    /// Anything the reader must know, e.g. that the run was capped.
    pub note: Option<String>,
    /// PostgreSQL cases: what the server did for this side; SQLite cases: what the store's
    /// writer did (its own statistics).
    pub server: Option<ServerWork>,
}

/// Durable work of one side: on PostgreSQL from the server's statistics, on SQLite from the
/// store's (`SqliteEventStore::stats`).
#[derive(Debug, Clone, Copy)]
pub struct ServerWork {
    /// PostgreSQL: transactions committed in the case's database (read-only ones included).
    /// SQLite: write transactions the store committed.
    pub transactions: u64,
    /// PostgreSQL: WAL flushes (fsyncs) on the whole server during the side's run. SQLite:
    /// the same as `transactions` (each `COMMIT` is one WAL fsync at `synchronous=FULL`).
    pub wal_syncs: u64,
}

impl Side {
    /// Acknowledged commands per second, from the first send until the read model caught up.
    pub fn rate(&self) -> f64 {
        per_second(self.run.acked, self.run.elapsed + self.settle)
    }

    /// Acknowledged commands whose event is not in the store.
    pub fn lost(&self) -> u64 {
        self.run.acked.saturating_sub(self.stored)
    }

    /// Sequential runs: the first and last window's rates.
    pub fn window_rates(&self) -> Option<(u64, f64, f64)> {
        self.run.windows.map(|w| (w.size, per_second(w.size, w.first), per_second(w.size, w.last)))
    }

    /// Server work per acknowledged command, as text.
    fn server_line(&self) -> Option<String> {
        let work = self.server?;
        let acked = self.run.acked.max(1) as f64;
        Some(format!(
            "{}: {:.2} transactions and {:.2} WAL flushes per acknowledged command",
            self.system,
            work.transactions as f64 / acked,
            work.wal_syncs as f64 / acked
        ))
    }

    /// What is wrong, if anything, for a side that promises no loss and no errors.
    pub fn faults(&self) -> Vec<String> {
        let mut faults = Vec::new();
        if self.run.errors > 0 {
            faults.push(format!(
                "{} errors, first: {}",
                self.run.errors,
                self.run.first_error.as_deref().unwrap_or("?")
            ));
        }
        if self.stored != self.run.acked {
            faults.push(format!("{} events stored for {} acknowledged commands", self.stored, self.run.acked));
        }
        if let Some(read_model) = self.read_model.filter(|&counted| counted != self.run.acked) {
            faults.push(format!("read model counted {read_model} events for {} acknowledged", self.run.acked));
        }
        faults
    }

    fn json(&self) -> Value {
        let mut value = json!({
            "system": self.system,
            "store": self.store,
            "sent": self.run.sent,
            "acked": self.run.acked,
            "errors": self.run.errors,
            "stored": self.stored,
            "lost": self.lost(),
            "read_model": self.read_model,
            "seconds": (self.run.elapsed + self.settle).as_secs_f64(),
            "settle_seconds": self.settle.as_secs_f64(),
            "commands_per_s": self.rate().round(),
            "p50_us": self.run.latency(0.50).as_micros() as u64,
            "p99_us": self.run.latency(0.99).as_micros() as u64,
        });
        if let (Some((size, first, last)), Some(windows)) = (self.window_rates(), self.run.windows) {
            value["window"] = json!(size);
            value["first_window_per_s"] = json!(first.round());
            value["last_window_per_s"] = json!(last.round());
            value["first_window_p50_us"] = json!(windows.first_p50.as_secs_f64() * 1e6);
            value["last_window_p50_us"] = json!(windows.last_p50.as_secs_f64() * 1e6);
        }
        if let Some(error) = &self.run.first_error {
            value["first_error"] = json!(error);
        }
        if let Some(note) = &self.note {
            value["note"] = json!(note);
        }
        if let Some(work) = self.server {
            value["server_transactions"] = json!(work.transactions);
            value["server_wal_syncs"] = json!(work.wal_syncs);
        }
        value
    }
}

/// Both frameworks on one case.
#[derive(Debug)]
pub struct Case {
    /// Short machine-readable name.
    pub name: &'static str,
    /// Chats (aggregate instances) the commands go to.
    pub chats: u32,
    /// Concurrent sending tasks.
    pub tasks: usize,
    /// This project.
    pub ours: Side,
    /// cqrs-es; `None` where it has no store of this kind (SQLite).
    pub peer: Option<Side>,
}

/// What the output says where the peer has no store for a case.
pub const PEER_NA: &str = "n/a: cqrs-es 0.5 has no SQLite event store among the crates this comparison depends on";

impl Case {
    /// Our rate over the peer's, if the peer ran.
    pub fn ratio(&self) -> Option<f64> {
        self.peer.as_ref().map(|peer| self.ours.rate() / peer.rate())
    }

    /// The case as one JSON line.
    pub fn json_line(&self) -> String {
        json!({
            "case": self.name,
            "chats": self.chats,
            "tasks": self.tasks,
            "ours": self.ours.json(),
            "peer": self.peer.as_ref().map_or_else(|| json!("n/a"), Side::json),
            "ratio": self.ratio().map(|ratio| (ratio * 100.0).round() / 100.0),
        })
        .to_string()
    }
}

/// Plain single-row INSERT + COMMIT on the same server (or SQLite file system, with the
/// store's settings): the physical ceiling.
#[derive(Debug, Clone, Copy)]
pub struct Anchor {
    /// "postgres" or "sqlite".
    pub store: &'static str,
    /// Connections, one task each.
    pub connections: usize,
    /// Commits in all.
    pub commits: u64,
    /// How long.
    pub elapsed: Duration,
    /// "before" or "after" the case it anchors.
    pub when: &'static str,
}

impl Anchor {
    /// Commits per second.
    pub fn rate(&self) -> f64 {
        per_second(self.commits, self.elapsed)
    }

    /// The anchor as one JSON line.
    pub fn json_line(&self) -> String {
        json!({
            "case": format!("{}_anchor_insert_commit", self.store),
            "connections": self.connections,
            "when": self.when,
            "commits": self.commits,
            "seconds": self.elapsed.as_secs_f64(),
            "commits_per_s": self.rate().round(),
        })
        .to_string()
    }
}

/// Everything measured in one run.
#[derive(Debug, Default)]
pub struct Report {
    /// The cases, in the order run.
    pub cases: Vec<Case>,
    /// The anchors, in the order run.
    pub anchors: Vec<Anchor>,
}

impl Report {
    /// The case named `name`.
    pub fn case(&self, name: &str) -> Option<&Case> {
        self.cases.iter().find(|case| case.name == name)
    }

    /// The mean rate of the `store`'s anchors with `connections` connections.
    pub fn anchor_rate(&self, store: &str, connections: usize) -> Option<f64> {
        let rates: Vec<f64> = self
            .anchors
            .iter()
            .filter(|anchor| anchor.store == store && anchor.connections == connections)
            .map(Anchor::rate)
            .collect();
        (!rates.is_empty()).then(|| rates.iter().sum::<f64>() / rates.len() as f64)
    }

    /// The human-readable table.
    pub fn print_table(&self) {
        println!(
            "{:<28} {:<8} {:<8} {:>7} {:>7} {:>6} {:>6} {:>8} {:>9} {:>8} {:>8}  first/last window (cmds/s)",
            "case", "system", "store", "sent", "acked", "errors", "lost", "seconds", "cmds/s", "p50 ms", "p99 ms",
        );
        for case in &self.cases {
            let label = format!("{} ({}×{})", case.name, case.chats, case.tasks);
            for (index, side) in [Some(&case.ours), case.peer.as_ref()].into_iter().flatten().enumerate() {
                let windows = match (side.window_rates(), side.run.windows) {
                    (Some((size, first, last)), Some(windows)) => format!(
                        "{size}: {first:.0} / {last:.0} (p50 {:.1} / {:.1} µs)",
                        windows.first_p50.as_secs_f64() * 1e6,
                        windows.last_p50.as_secs_f64() * 1e6
                    ),
                    _ => String::new(),
                };
                println!(
                    "{:<28} {:<8} {:<8} {:>7} {:>7} {:>6} {:>6} {:>8.2} {:>9.0} {:>8.3} {:>8.3}  {}",
                    if index == 0 { label.as_str() } else { "" },
                    side.system,
                    side.store,
                    side.run.sent,
                    side.run.acked,
                    side.run.errors,
                    side.lost(),
                    (side.run.elapsed + side.settle).as_secs_f64(),
                    side.rate(),
                    millis(side.run.latency(0.50)),
                    millis(side.run.latency(0.99)),
                    windows
                );
            }
            match case.ratio() {
                Some(ratio) => println!("{:<28} ours/peer throughput: {ratio:.1}×", ""),
                None => println!("{:<28} peer: {PEER_NA}", ""),
            }
            let peer = case.peer.as_ref();
            for note in [case.ours.note.as_ref(), peer.and_then(|peer| peer.note.as_ref())].into_iter().flatten() {
                println!("{:<28} note: {note}", "");
            }
            for side in [Some(&case.ours), peer].into_iter().flatten() {
                if let Some(line) = side.server_line() {
                    let source = if side.store == "sqlite" { "store writer" } else { "server" };
                    println!("{:<28} {source}: {line}", "");
                }
            }
        }
        for anchor in &self.anchors {
            println!(
                "{:<28} plain INSERT+COMMIT of a 200-byte JSON row, {} connection(s), {} its case: {:.0} commits/s",
                format!("{} anchor", anchor.store),
                anchor.connections,
                anchor.when,
                anchor.rate()
            );
        }
    }
}

fn per_second(count: u64, elapsed: Duration) -> f64 {
    if elapsed.is_zero() {
        return 0.0;
    }
    count as f64 / elapsed.as_secs_f64()
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side(acked: u64, errors: u64, stored: u64, read_model: Option<u64>) -> Side {
        let run = Run {
            sent: acked + errors,
            acked,
            errors,
            first_error: (errors > 0).then(|| "boom".to_owned()),
            ..Run::default()
        };
        Side {
            system: "ours",
            store: "memory",
            run,
            settle: Duration::ZERO,
            stored,
            read_model,
            note: None,
            server: None,
        }
    }

    #[test]
    fn a_clean_side_has_no_faults() {
        assert!(side(10, 0, 10, Some(10)).faults().is_empty());
        assert!(side(10, 0, 10, None).faults().is_empty(), "no read model, nothing to check there");
    }

    #[test]
    fn errors_losses_and_read_model_gaps_are_faults() {
        assert_eq!(side(9, 1, 9, Some(9)).faults().len(), 1);
        let lost = side(10, 0, 8, Some(10));
        assert_eq!((lost.lost(), lost.faults().len()), (2, 1));
        assert_eq!(side(10, 0, 11, Some(10)).faults().len(), 1, "an extra stored event is a fault too");
        assert_eq!(side(10, 0, 10, Some(7)).faults().len(), 1);
    }
}
