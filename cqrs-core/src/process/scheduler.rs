//! The scheduler of a process manager: fires its due commands, in one process at a time.
//!
//! It holds a claim of its own (`{process}:scheduler`), so it runs where the claim is held,
//! like an exclusive handler. Each due command goes out with its stored id (so a second firing,
//! after a crash between sending and removing it, is a duplicate) and is removed only if it was
//! not scheduled anew meanwhile. A command refused by its aggregate is removed too (logged): a
//! deadline that no longer applies ("cancel if unpaid" on a paid order) is an ordinary refusal.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::handler::StoredCommand;
use super::{CommandRouter, ProcessManager, RouteError};
use crate::aggregate::CommandEnvelope;
use crate::clock::Clock;
use crate::coordination::Scheduled;
use crate::handler::{self, runner_tenures, HandlerState, RunnerConfig};
use crate::ids::Timestamp;
use crate::store::EventStore;

/// How often the scheduler looks for due commands (a test clock wakes it at once).
const TICK: Duration = Duration::from_millis(500);

/// Most due commands fired per look.
const BATCH: usize = 100;

/// How often (by the scheduler's clock) it prunes the tombstones of ended instances at or below
/// the process manager's checkpoint; also once at the start of every tenure.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// A running scheduler.
#[derive(Debug)]
pub(super) struct RunningScheduler {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl RunningScheduler {
    pub(super) fn abort(self) {
        self.task.abort();
    }

    pub(super) async fn stop(self) {
        let _ = self.stop.send(true);
        if let Err(error) = self.task.await {
            tracing::error!(%error, "scheduler task ended abnormally");
        }
    }
}

pub(super) fn spawn<S, P, R>(
    store: Arc<S>,
    manager: Arc<P>,
    router: Arc<R>,
    config: RunnerConfig,
    clock: Clock,
) -> RunningScheduler
where
    S: EventStore + ?Sized,
    P: ProcessManager,
    R: CommandRouter<P::Command>,
{
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(run(store, manager, router, config, clock, stop_rx));
    RunningScheduler { stop, task }
}

async fn run<S, P, R>(
    store: Arc<S>,
    manager: Arc<P>,
    router: Arc<R>,
    config: RunnerConfig,
    clock: Clock,
    mut stop: watch::Receiver<bool>,
) where
    S: EventStore + ?Sized,
    P: ProcessManager,
    R: CommandRouter<P::Command>,
{
    let name = format!("{}:scheduler", manager.name());
    let mut tenures = runner_tenures(&store, &name, &config);
    let quiet = |_state: HandlerState| {};
    while let Some((claim, mut lease)) = tenures.next(quiet, &mut stop).await {
        let mut next_prune = Timestamp(i64::MIN);
        loop {
            tokio::select! {
                biased;
                () = handler::lease_ended(&mut lease, claim.as_ref()) => break,
                () = handler::stop_signal(&mut stop) => {
                    tenures.finish(&*store).await;
                    return;
                }
                () = async {
                    fire_due(&*store, &*manager, &*router, &clock).await;
                    if clock.now() >= next_prune {
                        prune_tombstones(&*store, manager.name()).await;
                        next_prune = clock.now().plus(PRUNE_EVERY);
                    }
                } => {}
            }
            tokio::select! {
                () = clock.tick(TICK) => {}
                () = handler::stop_signal(&mut stop) => {
                    tenures.finish(&*store).await;
                    return;
                }
            }
        }
    }
    tenures.finish(&*store).await;
}

/// Removes the tombstones of ended instances that no replay can reach: at or below the
/// checkpoint (a replay starts after it).
async fn prune_tombstones<S: EventStore + ?Sized>(store: &S, process: &str) {
    let checkpoint = match store.load_checkpoint(process).await {
        Ok(Some(checkpoint)) => checkpoint,
        Ok(None) => return,
        Err(error) => {
            tracing::warn!(process, %error, "cannot read the checkpoint to prune tombstones; will retry");
            return;
        }
    };
    match store.prune_processes(process, checkpoint).await {
        Ok(pruned) => tracing::debug!(process, pruned, "pruned the tombstones of ended instances"),
        Err(error) => tracing::warn!(process, %error, "cannot prune the tombstones of ended instances; will retry"),
    }
}

/// Fires every command due now (in batches).
async fn fire_due<S, P, R>(store: &S, manager: &P, router: &R, clock: &Clock)
where
    S: EventStore + ?Sized,
    P: ProcessManager,
    R: CommandRouter<P::Command>,
{
    loop {
        let due = match store.due(manager.name(), clock.now(), BATCH).await {
            Ok(due) => due,
            Err(error) => {
                tracing::warn!(process = manager.name(), %error, "cannot read due commands; will retry");
                return;
            }
        };
        let fired = due.len();
        for scheduled in due {
            fire(store, manager, router, scheduled).await;
        }
        if fired < BATCH {
            return;
        }
    }
}

async fn fire<S, P, R>(store: &S, manager: &P, router: &R, scheduled: Scheduled)
where
    S: EventStore + ?Sized,
    P: ProcessManager,
    R: CommandRouter<P::Command>,
{
    let process = manager.name();
    let stored = match StoredCommand::<P::Command>::deserialize(&scheduled.command) {
        Ok(stored) => stored,
        Err(error) => {
            // Kept, and reported: an operator must look (a command type changed its shape).
            tracing::error!(process, key = %scheduled.key, name = %scheduled.name, %error, "unreadable scheduled command");
            return;
        }
    };
    let envelope = CommandEnvelope {
        command: stored.command,
        command_id: scheduled.command_id,
        causation_id: stored.causation,
        correlation_id: stored.correlation,
        headers: stored.headers,
    };
    match router.route(envelope).await {
        Ok(()) => {}
        Err(RouteError::Rejected(error)) => {
            tracing::debug!(process, key = %scheduled.key, name = %scheduled.name, %error, "a scheduled command was refused");
        }
        Err(RouteError::Failed(error)) => {
            tracing::warn!(process, key = %scheduled.key, name = %scheduled.name, %error, "a scheduled command failed; will retry");
            return;
        }
    }
    if let Err(error) = store.unschedule(process, &scheduled.key, &scheduled.name, Some(scheduled.command_id)).await {
        tracing::warn!(process, key = %scheduled.key, name = %scheduled.name, %error, "cannot remove a fired command; it fires again (a duplicate)");
    }
}
