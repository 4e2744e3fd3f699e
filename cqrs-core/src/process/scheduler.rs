//! The scheduler of a process manager: fires its due commands, in one process at a time.
//!
//! It holds a claim of its own (`{process}:scheduler`), so it runs where the claim is held,
//! like an exclusive handler. Each due command goes out with its stored id (so a second firing,
//! after a crash between sending and removing it, is a duplicate) and is removed only if it was
//! not scheduled anew meanwhile. A command refused by its aggregate is removed too (logged): a
//! deadline that no longer applies ("cancel if unpaid" on a paid order) is an ordinary refusal.
//!
//! A command that cannot fire is never retried in a busy loop, nor left to hold back the ones
//! due after it: one whose stored JSON cannot be read is set aside at once; one whose routing
//! fails is tried again after a back-off (1 s, 2 s, 4 s, ..., in real time or by the clock,
//! whichever passes first; its due time stays) and set aside after [`MAX_FIRING_ATTEMPTS`]
//! failures. A new tenure (another process) tries a backing-off command at once. Set-aside commands are not due; they are counted
//! (`cqrs_process_schedules_set_aside_total`) and listed, retried or discarded by an operator
//! with [`ProcessAdmin`](crate::ProcessAdmin), like parked events.
//!
//! **Granularity.** The scheduler looks for due commands every 500 ms (and at once when a
//! [`Clock::test`](crate::Clock::test) is advanced), so a command fires between its due time
//! and about half a second after it, plus the time to fire the ones due before it; after a
//! failover, within the claim's takeover time (`claim_ttl + claim_retry`). Never before it is
//! due. Schedules are for deadlines of seconds to days, not for sub-second timing.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::handler::StoredCommand;
use super::{CommandRouter, ProcessManager, RouteError};
use crate::aggregate::CommandEnvelope;
use crate::clock::Clock;
use crate::coordination::{Scheduled, MAX_FIRING_ATTEMPTS};
use crate::handler::{self, runner_tenures, HandlerState, RunnerConfig};
use crate::ids::{CommandId, Timestamp};
use crate::store::Store;

/// How often the scheduler looks for due commands (a test clock wakes it at once).
const TICK: Duration = Duration::from_millis(500);

/// Most due commands fired per look.
const BATCH: usize = 100;

/// How often (by the scheduler's clock) it prunes the tombstones of ended instances at or below
/// the process manager's checkpoint, the first time one period after a tenure starts (so an
/// ended instance stays listed for at least that long, and a test clock decides when).
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
    S: Store + ?Sized,
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
    S: Store + ?Sized,
    P: ProcessManager,
    R: CommandRouter<P::Command>,
{
    let name = format!("{}:scheduler", manager.name());
    let mut tenures = runner_tenures(&store, &name, &config);
    let quiet = |_state: HandlerState| {};
    while let Some((claim, mut lease)) = tenures.next(quiet, &mut stop).await {
        let mut next_prune = clock.now().plus(PRUNE_EVERY);
        // Commands whose firing failed, and when (real time) to try them again.
        let mut waiting = Waiting::new();
        loop {
            tokio::select! {
                biased;
                () = handler::lease_ended(&mut lease, claim.as_ref()) => break,
                () = handler::stop_signal(&mut stop) => {
                    tenures.finish(&*store).await;
                    return;
                }
                () = async {
                    // The previous names' pending schedules fire too (with their stored ids).
                    for owner in std::iter::once(manager.name()).chain(manager.previous_names().iter().copied()) {
                        fire_due::<S, P, R>(&*store, owner, &*router, &clock, &mut waiting).await;
                    }
                    if clock.now() >= next_prune {
                        for owner in std::iter::once(manager.name()).chain(manager.previous_names().iter().copied()) {
                            prune_tombstones(&*store, owner).await;
                        }
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
async fn prune_tombstones<S: Store + ?Sized>(store: &S, process: &str) {
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

/// Commands whose firing failed, and when each may be tried again: once its back-off has passed
/// in real time or by the scheduler's clock, whichever comes first (so a test clock that is not
/// moved still sees a transient failure retried, and one moved ahead retries at once). Their due
/// time stays as scheduled.
type Waiting = HashMap<CommandId, (Instant, Timestamp)>;

/// Fires every command of `owner` (the process manager, or one of its previous names) due now
/// (in batches). Each command is resolved before the next look: fired and removed, refused and
/// removed, failed and recorded (tried again after a back-off, or set aside). A command still
/// backing off is passed over, and a look asks for that many more rows, so failing commands
/// never hold back the ones due after them; a look never fires the same row twice, and it stops
/// early (until the next tick) if a row was left unresolved (a store write failed).
async fn fire_due<S, P, R>(store: &S, owner: &str, router: &R, clock: &Clock, waiting: &mut Waiting)
where
    S: Store + ?Sized,
    P: ProcessManager,
    R: CommandRouter<P::Command>,
{
    let mut seen = HashSet::new();
    loop {
        let (now, today) = (Instant::now(), clock.now());
        waiting.retain(|_, (at, on)| *at > now && *on > today);
        let max = BATCH + waiting.len();
        let due = match store.due(owner, clock.now(), max).await {
            Ok(due) => due,
            Err(error) => {
                tracing::warn!(process = owner, %error, "cannot read due commands; will retry");
                return;
            }
        };
        let full = due.len() == max;
        let mut resolved = true;
        for scheduled in due {
            if !seen.insert((scheduled.key.clone(), scheduled.name.clone(), scheduled.command_id)) {
                return;
            }
            if waiting.contains_key(&scheduled.command_id) {
                continue;
            }
            resolved &= fire::<S, P::Command, R>(store, router, clock, waiting, scheduled).await;
        }
        if !full || !resolved {
            return;
        }
    }
}

/// The wait before the next attempt after `attempts` failed ones: 1 s, 2 s, 4 s, ... at most
/// 5 minutes.
fn backoff(attempts: u32) -> Duration {
    Duration::from_secs(1u64 << attempts.min(8)).min(Duration::from_secs(300))
}

/// Fires one due command; true once it is resolved in the store (removed, or its failure
/// recorded).
async fn fire<S, C, R>(store: &S, router: &R, clock: &Clock, waiting: &mut Waiting, scheduled: Scheduled) -> bool
where
    S: Store + ?Sized,
    C: serde::de::DeserializeOwned,
    R: CommandRouter<C>,
{
    let process = scheduled.owner.as_str();
    let stored = match StoredCommand::<C>::deserialize(&scheduled.command) {
        Ok(stored) => stored,
        Err(error) => {
            // Set aside, and reported: an operator must look (a command type changed its shape).
            tracing::error!(process, key = %scheduled.key, name = %scheduled.name, %error, "unreadable scheduled command; set aside");
            return set_aside(store, process, &scheduled, &format!("unreadable: {error}")).await;
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
            let attempts = scheduled.attempts + 1;
            if attempts >= MAX_FIRING_ATTEMPTS {
                tracing::error!(process, key = %scheduled.key, name = %scheduled.name, attempts, %error, "a scheduled command keeps failing; set aside");
                return set_aside(store, process, &scheduled, &error.to_string()).await;
            }
            tracing::warn!(process, key = %scheduled.key, name = %scheduled.name, attempts, %error, "a scheduled command failed; will retry");
            let wait = backoff(attempts);
            waiting.insert(scheduled.command_id, (Instant::now() + wait, clock.now().plus(wait)));
            // Recorded (one more attempt, the error), still due when it was.
            return match store.scheduled_failed(&scheduled, &error.to_string(), Some(scheduled.due)).await {
                Ok(_) => true,
                Err(error) => {
                    tracing::warn!(process, key = %scheduled.key, name = %scheduled.name, %error, "cannot record a failed scheduled command");
                    false
                }
            };
        }
    }
    match store.unschedule(process, &scheduled.key, &scheduled.name, Some(scheduled.command_id)).await {
        Ok(_) => true,
        Err(error) => {
            tracing::warn!(process, key = %scheduled.key, name = %scheduled.name, %error, "cannot remove a fired command; it fires again (a duplicate)");
            false
        }
    }
}

/// Sets a scheduled command aside (counted); true once stored.
async fn set_aside<S: Store + ?Sized>(store: &S, process: &str, scheduled: &Scheduled, error: &str) -> bool {
    match store.scheduled_failed(scheduled, error, None).await {
        Ok(stored) => {
            if stored {
                metrics::counter!("cqrs_process_schedules_set_aside_total", "process" => process.to_owned())
                    .increment(1);
            }
            true
        }
        Err(error) => {
            tracing::warn!(process, key = %scheduled.key, name = %scheduled.name, %error, "cannot set a scheduled command aside; will retry");
            false
        }
    }
}
