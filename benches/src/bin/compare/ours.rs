//! This project's side, generic over the event store: `Dispatcher<Chat, S>` for commands and a
//! counting `EventHandler` run by `spawn_handler` for the read model. Any `S: EventStore` runs
//! the same cases (memory and PostgreSQL today; a new store is one more call in `main`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cqrs_core::{spawn_handler, Dispatcher, EventStore, Position, Progress, RunnerConfig, RunningHandler, Store};

use crate::drive::{self, Contender, Run};
use crate::report::Side;
use crate::workload::{Chat, MessageCount, SendMessage, COUNT_HANDLER};

/// The longest wait for the read model to catch up after the last command.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Events per `read_all` call when counting the store.
const COUNT_PAGE: usize = 10_000;

/// The dispatcher plus the newest position it has appended, so the run can wait for the
/// read model to reach it.
struct Ours<S: Store> {
    dispatcher: Dispatcher<Chat, S>,
    head: AtomicU64,
}

impl<S: Store> Contender for Ours<S> {
    async fn send(&self, command: SendMessage) -> Result<(), String> {
        let outcome = self.dispatcher.dispatch(command).await.map_err(|error| error.to_string())?;
        if let Some(appended) = outcome.appended {
            self.head.fetch_max(appended.last_position.0, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// Whether our side runs its counting read model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadModel {
    /// The workload as specified: a counting `EventHandler` run by `spawn_handler`.
    Counting,
    /// Profiling aid (`--ours-without-read-model`): commands only, to show what the read
    /// model costs. Not a fair comparison: the peer keeps its query.
    Off,
}

/// A started read model and dispatcher on `store`.
struct Setup<S: Store> {
    store: Arc<S>,
    ours: Arc<Ours<S>>,
    progress: Progress,
    runner: Option<RunningHandler>,
    count: MessageCount,
}

fn setup<S: Store>(store: Arc<S>, read_model: ReadModel) -> Setup<S> {
    let progress = Progress::new();
    let count = MessageCount::default();
    let runner = (read_model == ReadModel::Counting)
        .then(|| spawn_handler(Arc::clone(&store), count.clone(), RunnerConfig::default(), &progress));
    let dispatcher = Dispatcher::new(Arc::clone(&store)).with_progress(progress.clone());
    Setup { store, ours: Arc::new(Ours { dispatcher, head: AtomicU64::new(0) }), progress, runner, count }
}

/// One client, chat 0, `commands` commands in sequence.
pub async fn sequential<S: Store>(
    store: Arc<S>,
    store_name: &'static str,
    read_model: ReadModel,
    commands: u64,
    window: u64,
) -> Side {
    let setup = setup(store, read_model);
    let run = drive::sequential(&*setup.ours, commands, window).await;
    finish(setup, store_name, run).await
}

/// `tasks` tasks, `chats` chats, `commands` commands in all.
pub async fn concurrent<S: Store>(
    store: Arc<S>,
    store_name: &'static str,
    read_model: ReadModel,
    commands: u64,
    chats: u32,
    tasks: usize,
) -> Side {
    let setup = setup(store, read_model);
    let run = drive::concurrent(Arc::clone(&setup.ours), commands, chats, tasks).await;
    finish(setup, store_name, run).await
}

/// Waits for the read model, then counts the events in the store.
async fn finish<S: Store>(setup: Setup<S>, store_name: &'static str, mut run: Run) -> Side {
    let settle_start = Instant::now();
    let head = Position(setup.ours.head.load(Ordering::Relaxed));
    let mut note = None;
    let counted = setup.runner.is_some();
    if let Some(runner) = setup.runner {
        if head > Position::START {
            if let Err(error) = setup.progress.wait_for(COUNT_HANDLER, head, SETTLE_TIMEOUT).await {
                note = Some(format!("read model did not catch up: {error}"));
            }
        }
        runner.stop().await;
    } else {
        note = Some("ours ran WITHOUT its read model (--ours-without-read-model): not a like-for-like case".to_owned());
    }
    let settle = settle_start.elapsed();
    let stored = match count_events(&*setup.store).await {
        Ok(stored) => stored,
        Err(error) => {
            run.errors += 1;
            run.first_error.get_or_insert(format!("counting the store failed: {error}"));
            0
        }
    };
    let read_model = counted.then(|| setup.count.0.load(Ordering::Relaxed));
    Side { system: "ours", store: store_name, run, settle, stored, read_model, note, server: None }
}

/// Every event in the store, counted through `read_all`.
async fn count_events<S: EventStore + ?Sized>(store: &S) -> Result<u64, cqrs_core::StoreError> {
    let mut after = Position::START;
    let mut total = 0u64;
    loop {
        let page = store.read_all(after, COUNT_PAGE).await?;
        let Some(last) = page.last() else { return Ok(total) };
        after = last.position;
        total += page.len() as u64;
    }
}
