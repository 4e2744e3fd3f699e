//! The never-skip harness: readers of the whole log (live and catching up) that collect every
//! event while writers append, then prove that each saw every acknowledged event once, in
//! position order, and that their gap audits found nothing committed behind them.
//!
//! A store's own test makes commits finish out of position order on purpose (a trigger that
//! stalls some transactions after they took their positions, writers in several processes)
//! and runs these readers through it. The field's most repeated production bug is a reader
//! that skips an event committed late; this is the test that would catch it.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::event::RecordedEvent;
use crate::ids::{EventId, Position, StreamId};
use crate::store::{EventStore, ExpectedVersion};
use crate::subscription::Subscription;
use crate::testing::conformance::event;

/// How a reader reads: its name (in failure messages), its page size, a pause after each
/// event (to fall behind the writers), and the gap audit delay of its subscription.
#[derive(Debug, Clone)]
pub struct ReaderSpec {
    /// Named in failure messages.
    pub name: String,
    /// Events per store read.
    pub page_size: usize,
    /// A pause after each event, so the reader lags and catches up with plain reads.
    pub pause: Option<Duration>,
}

impl ReaderSpec {
    /// A reader without pauses.
    pub fn new(name: &str, page_size: usize) -> Self {
        Self { name: name.to_owned(), page_size, pause: None }
    }

    /// A reader that pauses `pause` after each event.
    #[must_use]
    pub fn lagging(mut self, pause: Duration) -> Self {
        self.pause = Some(pause);
        self
    }
}

/// A subscription of the whole log from the start, run in a task of its own.
pub struct Reader {
    name: String,
    seen: Arc<AtomicUsize>,
    stop: watch::Sender<bool>,
    task: JoinHandle<(Vec<RecordedEvent>, u64)>,
}

/// Gap audits run this soon after a reader passes a gap, so a late commit is found while the
/// test still runs (and every pending audit runs again when the reader stops).
const AUDIT_DELAY: Duration = Duration::from_millis(300);

impl Reader {
    /// Starts reading `store` from the start.
    pub fn spawn<S: EventStore + ?Sized>(store: Arc<S>, spec: ReaderSpec) -> Self {
        let seen = Arc::new(AtomicUsize::new(0));
        let (stop, mut stopped) = watch::channel(false);
        let counted = Arc::clone(&seen);
        let name = spec.name.clone();
        let task = tokio::spawn(async move {
            let mut feed = Subscription::all(store, Position::START)
                .with_page_size(spec.page_size)
                .with_gap_audit_delay(AUDIT_DELAY);
            let mut events = Vec::new();
            loop {
                // `next` is cancel-safe: a stop between reads loses nothing.
                let next = tokio::select! {
                    next = feed.next() => next,
                    _ = stopped.changed() => break,
                };
                match next {
                    Ok(Some(event)) => events.push(event),
                    Ok(None) => break,
                    Err(error) => panic!("reader {} failed: {error}", spec.name),
                }
                counted.store(events.len(), Ordering::Release);
                if let Some(pause) = spec.pause {
                    tokio::time::sleep(pause).await;
                }
            }
            let skipped = feed.audit_gaps_now().await.unwrap_or_else(|error| panic!("{}: audit: {error}", spec.name));
            (events, skipped)
        });
        Self { name, seen, stop, task }
    }

    /// How many events the reader has delivered so far.
    pub fn seen(&self) -> usize {
        self.seen.load(Ordering::Acquire)
    }

    /// Waits (until `deadline`) for `count` events, stops, audits every gap the reader passed,
    /// and returns what it delivered and how many events its audits found skipped.
    pub async fn finish(self, count: usize, deadline: tokio::time::Instant) -> (String, Vec<RecordedEvent>, u64) {
        while self.seen() < count && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Anything extra (a duplicate) would arrive quickly.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _ = self.stop.send(true);
        let (events, skipped) = self.task.await.unwrap_or_else(|error| panic!("reader {}: {error}", self.name));
        (self.name, events, skipped)
    }
}

/// Asserts what every reader must have seen: exactly the `committed` events, each once, in
/// the store's position order (`stored`, read at the end), with no skip found by an audit.
pub fn assert_never_skipped(
    readers: &[(String, Vec<RecordedEvent>, u64)],
    committed: &HashSet<EventId>,
    stored: &[RecordedEvent],
) {
    let stored_ids: Vec<EventId> = stored.iter().map(|event| event.event_id).collect();
    let stored_set: HashSet<EventId> = stored_ids.iter().copied().collect();
    let lost = committed.difference(&stored_set).count();
    let unacknowledged = stored_set.difference(committed).count();
    assert!(
        lost == 0 && unacknowledged == 0,
        "the log must hold exactly the {} acknowledged events: {lost} missing, {unacknowledged} never acknowledged",
        committed.len()
    );
    for (name, events, skipped) in readers {
        let ids: Vec<EventId> = events.iter().map(|event| event.event_id).collect();
        let delivered: HashSet<EventId> = ids.iter().copied().collect();
        let missing = committed.difference(&delivered).count();
        assert_eq!(*skipped, 0, "reader {name}: its gap audits found {skipped} skipped events");
        assert_eq!(missing, 0, "reader {name} never delivered {missing} acknowledged events");
        assert!(events.windows(2).all(|pair| pair[0].position < pair[1].position), "reader {name}: positions increase");
        let first_difference = ids.iter().zip(&stored_ids).position(|(seen, stored)| seen != stored);
        assert!(
            ids.len() == stored_ids.len() && first_difference.is_none(),
            "reader {name}: every event once, in the stored order: {} delivered of {}, first difference at {:?}",
            ids.len(),
            stored_ids.len(),
            first_difference
        );
    }
}

/// Appends `appends` times (1 to 3 events each, to random `streams`), recording each
/// acknowledged event id in `acked` and calling `on_ack` with them.
pub async fn write_randomly<S: EventStore + ?Sized>(
    store: &S,
    streams: &[StreamId],
    appends: u64,
    marker: u64,
    acked: &Mutex<HashSet<EventId>>,
    mut on_ack: impl FnMut(&[EventId]),
) {
    for i in 0..appends {
        let size = 1 + random_below(3);
        let events: Vec<_> = (0..size).map(|n| event(marker * 100_000 + i * 10 + n)).collect();
        let ids: Vec<EventId> = events.iter().map(|event| event.event_id).collect();
        let stream = &streams[usize::try_from(random_below(streams.len() as u64)).unwrap_or(0)];
        store.append(stream, ExpectedVersion::Any, events).await.unwrap_or_else(|error| panic!("append: {error}"));
        acked.lock().unwrap_or_else(std::sync::PoisonError::into_inner).extend(ids.iter().copied());
        on_ack(&ids);
    }
}

/// A number below `bound` (rough randomness is enough here).
pub fn random_below(bound: u64) -> u64 {
    let bytes = uuid::Uuid::new_v4().into_bytes();
    u64::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3], bytes[4], bytes[5], bytes[7], bytes[9]]) % bound.max(1)
}

/// Starts `tasks` writer tasks on `store`, each making `appends` appends (see
/// [`write_randomly`]) to streams `{prefix}0` to `{prefix}3`; returns the set the acknowledged
/// event ids go into and the tasks. With `print`, each id is also printed for a parent process
/// ([`print_acked`]).
pub fn spawn_writers<S: EventStore + ?Sized>(
    store: &Arc<S>,
    prefix: &str,
    tasks: u64,
    appends: u64,
    print: bool,
) -> (Arc<Mutex<HashSet<EventId>>>, Vec<JoinHandle<()>>) {
    let acked = Arc::new(Mutex::new(HashSet::new()));
    let streams: Vec<StreamId> = (0..4)
        .map(|i| StreamId::new(format!("{prefix}{i}-{}", uuid::Uuid::new_v4().simple())))
        .collect::<Result<_, _>>()
        .unwrap_or_else(|error| panic!("stream id: {error}"));
    let handles = (0..tasks)
        .map(|task| {
            let (store, streams, acked) = (Arc::clone(store), streams.clone(), Arc::clone(&acked));
            tokio::spawn(async move {
                let on_ack: fn(&[EventId]) = if print { print_acked } else { |_| () };
                write_randomly(&*store, &streams, appends, task, &acked, on_ack).await;
            })
        })
        .collect();
    (acked, handles)
}

/// This test binary again, running only the test `test` (its full path), with `env` set: a
/// writer in another process, whose stdout carries [`print_acked`]'s lines.
pub fn spawn_child(test: &str, env: &[(&str, &std::ffi::OsStr)]) -> tokio::process::Child {
    let exe = std::env::current_exe().unwrap_or_else(|error| panic!("the test binary: {error}"));
    let mut command = tokio::process::Command::new(exe);
    command
        .args(["--exact", test, "--nocapture", "--test-threads", "1"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    for (key, value) in env {
        command.env(key, value);
    }
    command.spawn().unwrap_or_else(|error| panic!("spawn a child writer: {error}"))
}

/// Waits for a child writer of [`spawn_child`]; the event ids it acknowledged. Panics if it
/// failed or acknowledged nothing.
pub async fn acked_by_child(child: tokio::process::Child) -> Vec<EventId> {
    let output = child.wait_with_output().await.unwrap_or_else(|error| panic!("child writer: {error}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "child writer failed: {stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    let ids = acked_in_output(&stdout);
    assert!(!ids.is_empty(), "child writer acknowledged nothing: {stdout}");
    ids
}

/// Parses the `acked <event id>` lines a writer child process printed.
pub fn acked_in_output(stdout: &str) -> Vec<EventId> {
    stdout
        .lines()
        // Not only at the start: libtest may print `test NAME ... ` before the first line.
        .filter_map(|line| line.split_once("acked ").map(|(_, id)| id))
        .filter_map(|id| uuid::Uuid::parse_str(id.trim()).ok())
        .map(EventId)
        .collect()
}

/// Prints `acked <event id>` for each id: what a writer child process reports to its parent.
pub fn print_acked(ids: &[EventId]) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    for id in ids {
        let _ = writeln!(out, "acked {}", id.0);
    }
    let _ = out.flush();
}
