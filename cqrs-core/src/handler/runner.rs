//! The handler runner: one feeder task that reads the store and keeps the checkpoint, and one
//! or more worker tasks that handle events.
//!
//! ```text
//! claim keeper (exclusive runners) ──lease──► feeder ◄──done── workers
//! feeder: checkpoint → Subscription::all → upcast, interest, decode, partition key
//!         → worker[hash(key) % workers] (bounded queue)  ; not interested: done at once
//!         checkpoint = highest position below which every event is done (handled, passed
//!         over, or parked durably), saved fenced by the claim
//! worker: per event, in its queue's order: handle with retries; park after N failures (and
//!         park behind it every later event of the same sequence); retry parked sequences on
//!         request
//! ```
//!
//! With one worker and nothing to park (`ErrorPolicy::RetryForever`, the default), the feeder
//! handles each event itself with the same delivery code, and a page of events takes one turn
//! of its loop: no hop to a worker task and back per event.
//!
//! An exclusive runner acts only while its lease is valid: when it lapses, the feeder aborts
//! the workers at once and stands by again (see `claim.rs`).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::claim::{self, ClaimKeeper, Lease};
use super::{
    Checkpoints, ErrorPolicy, EventHandler, HandlerError, HandlerMetrics, HandlerState, HandlerStatus, Placement,
    RunnerConfig, StartFrom, CURRENT_CLAIM,
};
use crate::coordination::{Claim, ParkedEvent, ParkedStatus};
use crate::event::DomainEvent;
use crate::event::{Envelope, RecordedEvent};
use crate::ids::{Position, Timestamp};
use crate::store::{Store, StoreError};
use crate::subscription::Subscription;

/// Events queued per worker (read ahead of the handler).
const QUEUE_PER_WORKER: usize = 64;

/// How long one turn of the feeder's loop may handle buffered events inline before it shows
/// progress, saves a due checkpoint and looks at the lease and the stop signal again.
const INLINE_TURN: Duration = Duration::from_millis(5);

/// What one runner shares between its feeder and workers.
struct Shared<S: ?Sized, H> {
    store: Arc<S>,
    handler: H,
    config: RunnerConfig,
    name: String,
    status: watch::Sender<HandlerStatus>,
    metrics: HandlerMetrics,
}

impl<S: Store + ?Sized, H: EventHandler> Shared<S, H> {
    fn set_state(&self, state: HandlerState) {
        self.status.send_if_modified(|status| {
            let changed = status.state != state;
            status.state = state;
            changed
        });
    }

    fn parking(&self) -> Option<u32> {
        match self.config.on_error {
            ErrorPolicy::RetryForever => None,
            ErrorPolicy::ParkAfter { attempts } => Some(attempts.max(1)),
        }
    }

    /// Shows the handled position and the parked count in the status (and the metrics) if
    /// either changed; true if the position moved.
    fn show_progress(&self, handled: Position, parked: u64, newest: &watch::Receiver<Position>) -> bool {
        let (shown_position, shown_parked) = {
            let status = self.status.borrow();
            (status.position, status.parked)
        };
        if handled != shown_position || parked != shown_parked {
            self.status.send_modify(|status| {
                status.position = handled;
                status.parked = parked;
            });
            self.metrics.progress(handled, *newest.borrow(), parked);
        }
        handled != shown_position
    }

    fn report_failure(&self, position: Position, failures: &Failures, error: &str) {
        let attempts = failures.attempts;
        let stuck = failures.since.elapsed() >= self.config.stuck_after;
        if stuck {
            tracing::error!(handler = %self.name, %position, attempts, error, "handler is stuck");
        } else {
            tracing::warn!(handler = %self.name, %position, attempts, error, "handler failed, retrying");
        }
        let error = error.to_owned();
        self.set_state(if stuck {
            HandlerState::Stuck { position, attempts, error }
        } else {
            HandlerState::Retrying { position, attempts, error }
        });
    }
}

/// Why an active period ended.
pub(super) enum End {
    Stopped,
    LeaseLost,
}

/// Resolves once the stop flag is set (or its sender is gone).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await.map(|_| ());
}

fn stop_requested(stop: &watch::Receiver<bool>) -> bool {
    *stop.borrow() || stop.has_changed().is_err()
}

/// Sleeps until `at`, or forever without one.
pub(super) async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Resolves when the tenure `claim` ends; never for a runner without a claim.
pub(crate) async fn lease_lost(lease: &mut Option<watch::Receiver<Lease>>, claim: Option<&Claim>) {
    match (lease, claim) {
        (Some(lease), Some(claim)) => claim::lost(lease, claim.token).await,
        _ => std::future::pending().await,
    }
}

/// Consecutive failures of one step, with exponential back-off.
pub(super) struct Failures {
    pub(super) attempts: u32,
    pub(super) since: Instant,
    next_delay: Duration,
    initial_delay: Duration,
    max_delay: Duration,
}

impl Failures {
    pub(super) fn new(config: &RunnerConfig) -> Self {
        Self {
            attempts: 0,
            since: Instant::now(),
            next_delay: config.initial_backoff,
            initial_delay: config.initial_backoff,
            max_delay: config.max_backoff,
        }
    }

    /// Forgets the failures after a success (cheap when there were none: once per event).
    pub(super) fn clear(&mut self) {
        if self.attempts != 0 {
            self.attempts = 0;
            self.next_delay = self.initial_delay;
        }
    }

    /// Records one more failure and returns how long to wait before the next attempt.
    pub(super) fn record(&mut self) -> Duration {
        if self.attempts == 0 {
            self.since = Instant::now();
        }
        self.attempts += 1;
        let delay = self.next_delay;
        self.next_delay = (self.next_delay * 2).min(self.max_delay);
        delay
    }
}

/// The tenures of a runner: for an exclusive one, each period in which it holds its claim
/// (kept by a [`ClaimKeeper`]); for an every-process one, a single endless tenure.
pub(crate) struct Tenures {
    keeper: Option<ClaimKeeper>,
    started: bool,
    /// How long giving the claim up may take.
    release_within: Duration,
}

impl Tenures {
    pub(crate) fn new<S: Store + ?Sized>(store: &Arc<S>, name: &str, config: &RunnerConfig) -> Self {
        let placement = config.placement.resolve(config.checkpoints);
        let keeper = (placement == Placement::Exclusive).then(|| {
            ClaimKeeper::spawn(
                Arc::clone(store),
                name.to_owned(),
                config.owner.clone(),
                config.claim_ttl,
                config.claim_retry,
            )
        });
        Self { keeper, started: false, release_within: config.stop_timeout }
    }

    /// Waits for the next tenure: the claim and the lease to watch (both `None` without a
    /// claim); `None` once stopped. `set_state` reports `Standby` meanwhile.
    pub(crate) async fn next(
        &mut self,
        set_state: impl Fn(HandlerState),
        stop: &mut watch::Receiver<bool>,
    ) -> Option<(Option<Claim>, Option<watch::Receiver<Lease>>)> {
        match &self.keeper {
            None if self.started => None,
            None => {
                self.started = true;
                Some((None, None))
            }
            Some(keeper) => {
                let claim = wait_for_claim(&set_state, keeper.lease(), stop).await?;
                Some((Some(claim), Some(keeper.lease())))
            }
        }
    }

    /// Gives the claim up (so a standby takes over at once); waits at most the runner's
    /// `stop_timeout` for the store (a store that is down lets the claim lapse instead).
    pub(crate) async fn finish<S: Store + ?Sized>(self, store: &S) {
        if let Some(keeper) = self.keeper {
            keeper.release(store, self.release_within).await;
        }
    }
}

/// Runs a handler until stopped: waits for its claim (exclusive runners), then feeds it until
/// the claim is lost (and waits again) or it is stopped.
pub(super) async fn run<S, H>(
    store: Arc<S>,
    handler: H,
    config: RunnerConfig,
    status: watch::Sender<HandlerStatus>,
    mut stop: watch::Receiver<bool>,
) where
    S: Store + ?Sized,
    H: EventHandler,
{
    let name = handler.name().to_owned();
    let mut tenures = Tenures::new(&store, &name, &config);
    let metrics = HandlerMetrics::new(&name);
    let shared = Arc::new(Shared { store, handler, config, name, status, metrics });
    // For in-memory checkpoints: where this process got to, kept across tenures.
    let mut memory_checkpoint = None;
    while let Some((claim, lease)) = tenures.next(|state| shared.set_state(state), &mut stop).await {
        if let Some(claim) = &claim {
            tracing::info!(handler = %shared.name, owner = %claim.owner, token = claim.token, "active: claim taken");
            shared.metrics.takeovers.increment(1);
        }
        shared.metrics.active.set(1.0);
        let end = active(&shared, claim, lease, &mut stop, &mut memory_checkpoint).await;
        shared.metrics.active.set(0.0);
        match end {
            End::Stopped => break,
            End::LeaseLost => {
                tracing::warn!(handler = %shared.name, "claim lost; standing by");
                shared.set_state(HandlerState::Standby { holder: None });
            }
        }
    }
    tenures.finish(&*shared.store).await;
    shared.set_state(HandlerState::Stopped);
}

/// Waits until the keeper holds the claim (reporting `Standby` meanwhile); `None` if stopped.
async fn wait_for_claim(
    set_state: &impl Fn(HandlerState),
    mut lease: watch::Receiver<Lease>,
    stop: &mut watch::Receiver<bool>,
) -> Option<Claim> {
    loop {
        match &*lease.borrow_and_update() {
            // A lease that already ran out (the tenure just lost) does not count: wait for the
            // keeper's next answer.
            Lease::Held { claim, valid_until } if *valid_until > Instant::now() => return Some(claim.clone()),
            Lease::Held { .. } => {}
            Lease::Standby { holder } => set_state(HandlerState::Standby { holder: holder.clone() }),
            Lease::Paused { by } => set_state(HandlerState::Paused { by: by.clone() }),
        }
        tokio::select! {
            changed = lease.changed() => if changed.is_err() { return None },
            () = stopped(stop) => return None,
        }
    }
}

/// A job for a worker.
enum Job<E> {
    /// Handle this event (its decoded form if decoding worked in the feeder).
    Event { event: RecordedEvent, decoded: Option<Envelope<E>>, key: Option<String> },
    /// Retry the sequence's parked events, oldest first, stopping at the first failure.
    Retry { key: String },
    /// An operator discarded these parked events of the sequence.
    Forget { key: String, positions: Vec<Position> },
}

/// What a worker reports for a position.
#[derive(Debug)]
enum Done {
    /// Handled, or passed over as not of interest.
    Handled(Position),
    /// Failed too often: park it.
    Park { event: RecordedEvent, key: String, error: String, attempts: u32 },
    /// Its sequence has a parked event: park it behind.
    ParkBehind { event: RecordedEvent, key: String, first: Position },
    /// A parked event was retried successfully.
    Unparked(Position),
    /// A parked event's retry failed; the rest of its sequence stays parked.
    RetryFailed { position: Position, key: String, error: String },
}

/// Feeds events to the workers and keeps the checkpoint, for one tenure (or for ever, without
/// a claim).
async fn active<S, H>(
    shared: &Arc<Shared<S, H>>,
    claim: Option<Claim>,
    lease: Option<watch::Receiver<Lease>>,
    stop: &mut watch::Receiver<bool>,
    memory_checkpoint: &mut Option<Position>,
) -> End
where
    S: Store + ?Sized,
    H: EventHandler,
{
    shared.set_state(HandlerState::Starting);
    let mut guard = Guard { lease, claim: claim.clone(), stop };
    let mut feeder = Feeder { shared: Arc::clone(shared), claim, parked: HashMap::new() };
    let (start, parked) = match feeder.begin(&mut guard, *memory_checkpoint).await {
        Ok(begun) => begun,
        Err(end) => return end,
    };
    let workers = shared.config.workers.max(1);
    let needs_key = workers > 1 || feeder.parking_on();
    let crew = Crew::spawn(shared, feeder.claim.as_ref(), &parked, &guard.lease, workers);
    // One worker and nothing to park: the feeder handles each event itself, with no hop to a
    // worker task and back (two task wake-ups per event saved).
    let inline = (!needs_key).then(|| Inline {
        worker: Worker {
            shared: Arc::clone(shared),
            claim: feeder.claim.clone(),
            blocked: HashMap::new(),
            done: mpsc::unbounded_channel().0,
            shows_progress: true,
        },
        halt: guard.stop.clone(),
    });
    let mut feeding = FeedLoop {
        feed: Subscription::all(Arc::clone(&shared.store), start).with_page_size(shared.config.page_size),
        newest: shared.store.notifications(),
        books: Books { in_flight: BTreeSet::new(), read_up_to: start, saved: start },
        since_save: 0,
        save_at: None,
        read_failures: Failures::new(&shared.config),
        workers,
        needs_key,
        inline,
        shared: Arc::clone(shared),
        feeder,
        crew,
        guard,
        memory_checkpoint,
    };
    let end = feeding.feed_until_end().await;
    let FeedLoop { crew, mut feeder, books, mut guard, memory_checkpoint, .. } = feeding;
    crew.wind_down(end, &mut feeder, books, &mut guard.lease, memory_checkpoint).await
}

/// What ends a tenure early: its lease running out, or the runner being stopped.
struct Guard<'a> {
    lease: Option<watch::Receiver<Lease>>,
    /// The tenure's claim (`None` for a runner without one).
    claim: Option<Claim>,
    stop: &'a mut watch::Receiver<bool>,
}

impl Guard<'_> {
    /// Runs `work` unless the tenure ends first (see [`guarded`]).
    async fn run<T>(&mut self, work: impl std::future::Future<Output = T>) -> Result<T, End> {
        guarded(&mut self.lease, self.claim.as_ref(), self.stop, work).await
    }

    /// Resolves when the tenure ends: the lease lost (looked at first), or the runner stopped.
    async fn ended(&mut self) -> End {
        tokio::select! {
            biased;
            () = lease_lost(&mut self.lease, self.claim.as_ref()) => End::LeaseLost,
            () = stopped(self.stop) => End::Stopped,
        }
    }
}

/// The feeder's loop over one tenure: reads events, hands them to the crew, settles what the
/// workers report, and saves the checkpoint when due.
struct FeedLoop<'a, S: Store + ?Sized, H: EventHandler> {
    shared: Arc<Shared<S, H>>,
    feeder: Feeder<S, H>,
    crew: Crew<H::Event>,
    guard: Guard<'a>,
    feed: Subscription<S>,
    /// The store's newest position, for the lag metric.
    newest: watch::Receiver<Position>,
    books: Books,
    /// Progress steps shown since the last save.
    since_save: u32,
    /// When to save a position that has not reached `checkpoint_every` steps.
    save_at: Option<Instant>,
    read_failures: Failures,
    workers: usize,
    /// Whether jobs need a partition key (several workers, or parking).
    needs_key: bool,
    /// Set when the feeder handles events itself (one worker, no parking).
    inline: Option<Inline<S, H>>,
    memory_checkpoint: &'a mut Option<Position>,
}

impl<S: Store + ?Sized, H: EventHandler> FeedLoop<'_, S, H> {
    /// Runs the loop until the tenure ends, the runner stops, or the feed or the crew closes.
    async fn feed_until_end(&mut self) -> End {
        let mut poll = tokio::time::interval(self.shared.config.parked_poll);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let max_in_flight = self.workers * QUEUE_PER_WORKER;
        loop {
            let handled = self.books.handled();
            if let Err(end) = self.save_if_due(handled).await {
                return end;
            }
            let turn = tokio::select! {
                biased;
                end = self.guard.ended() => Err(end),
                done = self.crew.done.recv() => self.settle_all(done).await,
                next = self.feed.next(), if self.books.in_flight.len() < max_in_flight => match next {
                    Ok(Some(event)) => self.hand_out_page(event, max_in_flight).await,
                    Ok(None) => Err(End::Stopped),
                    Err(error) => self.back_off(&error).await,
                },
                () = sleep_until_some(self.save_at), if handled != self.books.saved => self.save_late(handled).await,
                _ = poll.tick(), if self.feeder.parked_count() > 0 => {
                    self.guard.run(self.feeder.poll_parked(&self.crew.queues, self.workers)).await
                }
            };
            if let Err(end) = turn {
                return end;
            }
        }
    }

    /// Shows the progress, and saves it once `checkpoint_every` steps were shown (at once
    /// without a `checkpoint_delay`); a failed save is tried again later.
    async fn save_if_due(&mut self, handled: Position) -> Result<(), End> {
        let config = &self.shared.config;
        if self.shared.show_progress(handled, self.feeder.parked_count(), &self.newest) {
            self.since_save += 1;
            self.save_at = Some(Instant::now() + config.checkpoint_delay);
        }
        let due = self.since_save >= config.checkpoint_every || config.checkpoint_delay.is_zero();
        if handled != self.books.saved && due && self.save(handled).await? {
            self.save_at = None;
        }
        Ok(())
    }

    /// Saves a position that waited `checkpoint_delay`; after a failure, tries again shortly.
    async fn save_late(&mut self, handled: Position) -> Result<(), End> {
        self.save_at = None;
        if !self.save(handled).await? {
            self.save_at = Some(Instant::now() + self.shared.config.max_backoff.min(Duration::from_secs(1)));
        }
        Ok(())
    }

    /// Saves the checkpoint at `handled`: true once saved, false if the store failed; a lost
    /// claim ends the tenure.
    async fn save(&mut self, handled: Position) -> Result<bool, End> {
        match self.guard.run(self.feeder.save(handled, self.memory_checkpoint)).await? {
            Ok(()) => {
                (self.books.saved, self.since_save) = (handled, 0);
                Ok(true)
            }
            Err(StoreError::ClaimLost { .. }) => Err(End::LeaseLost),
            Err(_) => Ok(false),
        }
    }

    /// Records what a worker reports, and every other report already waiting: one turn of the
    /// loop for all of them, not one each. A closed report channel ends the tenure as stopped.
    async fn settle_all(&mut self, done: Option<Done>) -> Result<(), End> {
        let Some(mut done) = done else { return Err(End::Stopped) };
        loop {
            self.settle(done).await?;
            match self.crew.done.try_recv() {
                Ok(next) => done = next,
                Err(_empty_or_closed) => return Ok(()),
            }
        }
    }

    /// Records one report. A handled event needs no store write, so no guard either.
    async fn settle(&mut self, done: Done) -> Result<(), End> {
        let settled = match done {
            Done::Handled(position) => Some(position),
            other => self.guard.run(self.feeder.settle(other)).await??,
        };
        if let Some(position) = settled {
            self.books.in_flight.remove(&position);
        }
        Ok(())
    }

    /// Passes a read event to its worker, then the rest of the page already read, while the
    /// workers have room: one turn of the loop per page, not per event. A stop is noticed
    /// between events.
    async fn hand_out_page(&mut self, event: RecordedEvent, max_in_flight: usize) -> Result<(), End> {
        let turn = Instant::now();
        self.hand_out(event).await?;
        while self.books.in_flight.len() < max_in_flight && !stop_requested(self.guard.stop) {
            // Handling inline, a turn ends after INLINE_TURN so that slow handlers still show
            // progress and save checkpoints between events; the rest stays buffered.
            if self.inline.is_some() && turn.elapsed() >= INLINE_TURN {
                break;
            }
            let Some(event) = self.feed.next_buffered() else { break };
            self.hand_out(event).await?;
        }
        Ok(())
    }

    /// Passes a read event to its worker (or over it, if the handler does not take it), or
    /// handles it here when the runner handles inline.
    async fn hand_out(&mut self, event: RecordedEvent) -> Result<(), End> {
        self.read_failures.clear();
        let position = event.position;
        let Some((event, decoded, key)) = prepare(&self.shared, event, self.needs_key) else {
            self.books.read_up_to = position;
            return Ok(());
        };
        if let Some(inline) = &mut self.inline {
            inline.handle(&event, decoded, &mut self.guard).await?;
            // Done only once handled: a stop or a lost lease mid-event leaves the checkpoint
            // below it, so the event is handled again.
            self.books.read_up_to = position;
            return Ok(());
        }
        self.books.read_up_to = position;
        let index = key.as_deref().map_or(0, |key| worker_of(key, self.workers));
        let job = Job::Event { event, decoded, key };
        self.books.in_flight.insert(position);
        // A queue with room takes the job at once; a full one waits for its worker, never past
        // the tenure's end.
        let job = match self.crew.queues[index].try_send(job) {
            Ok(()) => return Ok(()),
            Err(mpsc::error::TrySendError::Full(job)) => job,
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(End::Stopped),
        };
        match self.guard.run(self.crew.queues[index].send(job)).await? {
            Ok(()) => Ok(()),
            Err(_closed) => Err(End::Stopped),
        }
    }

    /// Reports a failed read and waits out its back-off. The back-off ends with the tenure: a
    /// feeder that cannot read must not leave its workers handling past the lease.
    async fn back_off(&mut self, error: &StoreError) -> Result<(), End> {
        let delay = self.read_failures.record();
        self.shared.report_failure(self.books.read_up_to, &self.read_failures, &error.to_string());
        self.guard.run(tokio::time::sleep(delay)).await
    }
}

/// Where the feeder has got to: the events handed to workers and not yet done, the last
/// position read, and the last checkpoint saved.
struct Books {
    in_flight: BTreeSet<Position>,
    read_up_to: Position,
    saved: Position,
}

impl Books {
    /// The highest position below which every event is done: the checkpoint to keep.
    fn handled(&self) -> Position {
        self.in_flight.first().map_or(self.read_up_to, |first| Position(first.0 - 1))
    }
}

/// A tenure's workers: their queues, their tasks, what they report, and the halt flag.
struct Crew<E> {
    queues: Vec<mpsc::Sender<Job<E>>>,
    tasks: JoinSet<()>,
    done: mpsc::UnboundedReceiver<Done>,
    halt: watch::Sender<bool>,
}

impl<E: DomainEvent> Crew<E> {
    /// Spawns `workers` workers under `claim`, each blocked on the parked sequences its
    /// partitions hold.
    fn spawn<S, H>(
        shared: &Arc<Shared<S, H>>,
        claim: Option<&Claim>,
        parked: &HashMap<String, Vec<Position>>,
        lease: &Option<watch::Receiver<Lease>>,
        workers: usize,
    ) -> Self
    where
        S: Store + ?Sized,
        H: EventHandler<Event = E>,
    {
        let (done_tx, done) = mpsc::unbounded_channel();
        let (halt, halted) = watch::channel(false);
        let mut queues = Vec::with_capacity(workers);
        let mut tasks = JoinSet::new();
        for index in 0..workers {
            let (queue, jobs) = mpsc::channel(QUEUE_PER_WORKER);
            queues.push(queue);
            let blocked: HashMap<String, Vec<Position>> = parked
                .iter()
                .filter(|(key, _)| worker_of(key, workers) == index)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let worker = Worker {
                shared: Arc::clone(shared),
                claim: claim.cloned(),
                blocked,
                done: done_tx.clone(),
                shows_progress: false,
            };
            tasks.spawn(worker.run(jobs, halted.clone(), lease.clone()));
        }
        Self { queues, tasks, done, halt }
    }

    /// Ends the tenure's work: on a lost lease, aborts the workers at once; on a stop, lets
    /// them finish the events in hand and saves the checkpoint, within `stop_timeout` and the
    /// tenure.
    async fn wind_down<S, H>(
        mut self,
        end: End,
        feeder: &mut Feeder<S, H>,
        mut books: Books,
        lease: &mut Option<watch::Receiver<Lease>>,
        memory_checkpoint: &mut Option<Position>,
    ) -> End
    where
        S: Store + ?Sized,
        H: EventHandler<Event = E>,
    {
        let shared = Arc::clone(&feeder.shared);
        let tenure = feeder.claim.clone();
        let tenure = tenure.as_ref();
        match end {
            End::LeaseLost => {
                // Nothing more may happen under this tenure: abort the handlers mid-event (their
                // events will be handled again by the next holder).
                self.tasks.abort_all();
                while self.tasks.join_next().await.is_some() {}
                End::LeaseLost
            }
            End::Stopped => {
                // Let the workers finish the events in hand (but not their queues), then save; all
                // of it bounded by `stop_timeout` and by the tenure (a store that is down must not
                // hold the stop, nor let it run past the lease).
                let _ = self.halt.send(true);
                drop(self.queues);
                let deadline = Instant::now() + shared.config.stop_timeout;
                let drain = async {
                    while self.tasks.join_next().await.is_some() {}
                    while let Ok(done) = self.done.try_recv() {
                        if let Ok(Some(position)) = feeder.settle(done).await {
                            books.in_flight.remove(&position);
                        }
                    }
                    // Events still queued were not handled: the checkpoint stays below them.
                    let handled = books.handled().max(books.saved);
                    shared.status.send_modify(|status| status.position = handled);
                    if handled != books.saved {
                        let _ = feeder.save(handled, memory_checkpoint).await;
                    }
                };
                let drained = tokio::select! {
                    biased;
                    () = lease_lost(lease, tenure) => false,
                    () = tokio::time::sleep_until(deadline) => false,
                    () = drain => true,
                };
                if !drained {
                    tracing::warn!(
                        handler = %shared.name,
                        timeout = ?shared.config.stop_timeout,
                        "graceful stop did not finish in time (or the claim ran out); the events in hand are handled again by the next holder"
                    );
                    self.tasks.abort_all();
                    while self.tasks.join_next().await.is_some() {}
                }
                End::Stopped
            }
        }
    }
}

/// Runs `work` unless the tenure ends or the runner is stopped first: the feeder never waits
/// (on a full queue, on a store that is down) past the end of its claim.
async fn guarded<T>(
    lease: &mut Option<watch::Receiver<Lease>>,
    claim: Option<&Claim>,
    stop: &mut watch::Receiver<bool>,
    work: impl std::future::Future<Output = T>,
) -> Result<T, End> {
    tokio::select! {
        biased;
        () = lease_lost(lease, claim) => Err(End::LeaseLost),
        () = stopped(stop) => Err(End::Stopped),
        value = work => Ok(value),
    }
}

/// The worker a partition key goes to (a fixed hash, the same in every process and run).
fn worker_of(key: &str, workers: usize) -> usize {
    if workers <= 1 {
        return 0;
    }
    let mut hasher = std::hash::DefaultHasher::new();
    key.hash(&mut hasher);
    usize::try_from(hasher.finish() % workers as u64).unwrap_or(0)
}

/// Upcasts an event and decides interest and partition key; `None` when the handler does not
/// take it (it is done at once).
fn prepare<S, H>(shared: &Shared<S, H>, event: RecordedEvent, needs_key: bool) -> Option<Prepared<H::Event>>
where
    S: Store + ?Sized,
    H: EventHandler,
{
    match shared.config.upcasters.upcast(&event) {
        Ok(current) if !shared.handler.interested(&current) => None,
        Ok(current) => {
            let decoded = shared.config.upcasters.decode::<H::Event>(&current).ok();
            let key = needs_key.then(|| match &decoded {
                Some(envelope) => shared.handler.partition_key(envelope),
                None => event.stream_id.as_str().to_owned(),
            });
            Some((event, decoded, key))
        }
        // Interest unknown until the upcast works: the worker retries it.
        Err(_) => {
            let key = needs_key.then(|| event.stream_id.as_str().to_owned());
            Some((event, None, key))
        }
    }
}

/// An event to handle: as read, decoded if decoding worked in the feeder, and its partition
/// key when one is needed.
type Prepared<E> = (RecordedEvent, Option<Envelope<E>>, Option<String>);

/// The feeder's state that outlives one loop turn.
struct Feeder<S: ?Sized, H> {
    shared: Arc<Shared<S, H>>,
    claim: Option<Claim>,
    /// Parked positions by sequence, as stored.
    parked: HashMap<String, Vec<Position>>,
}

impl<S: Store + ?Sized, H: EventHandler> Feeder<S, H> {
    fn parking_on(&self) -> bool {
        self.shared.parking().is_some() || self.parked_count() > 0
    }

    /// How many events are parked, as this runner knows them: counted from the positions it
    /// holds, so an event that leaves twice (handled by a retry and discarded at once) is not
    /// subtracted twice.
    fn parked_count(&self) -> u64 {
        self.parked.values().map(|positions| positions.len() as u64).sum()
    }

    /// Forgets a parked position (handled by a retry, or discarded); false if it was not known.
    fn forget_parked(&mut self, position: Position) -> bool {
        let mut known = false;
        for positions in self.parked.values_mut() {
            let before = positions.len();
            positions.retain(|parked| *parked != position);
            known |= positions.len() != before;
        }
        self.parked.retain(|_, positions| !positions.is_empty());
        known
    }

    /// Runs a store call until it succeeds, backing off on errors; a lost claim ends the
    /// tenure instead (a fenced write will never succeed again under it).
    async fn retrying<T, F, Fut>(&self, position: Position, mut call: F) -> Result<T, End>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        let mut failures = Failures::new(&self.shared.config);
        loop {
            match call().await {
                Ok(value) => return Ok(value),
                Err(StoreError::ClaimLost { .. }) => return Err(End::LeaseLost),
                Err(error) => {
                    let delay = failures.record();
                    self.shared.report_failure(position, &failures, &error.to_string());
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Starts a tenure: finds its start position and the parked events (by sequence), and
    /// shows them in the status with the `Running` state.
    async fn begin(
        &mut self,
        guard: &mut Guard<'_>,
        memory_checkpoint: Option<Position>,
    ) -> Result<(Position, HashMap<String, Vec<Position>>), End> {
        let start = guard.run(self.start_position(memory_checkpoint)).await??;
        let parked = guard.run(self.load_parked()).await??;
        self.shared.status.send_modify(|status| {
            status.position = start;
            status.state = HandlerState::Running;
            status.parked = self.parked_count();
        });
        Ok((start, parked))
    }

    async fn start_position(&self, memory_checkpoint: Option<Position>) -> Result<Position, End> {
        let store = &self.shared.store;
        let name = &self.shared.name;
        let durable = self.shared.config.checkpoints == Checkpoints::Store;
        if durable {
            if let Some(position) = self.retrying(Position::START, || store.load_checkpoint(name)).await? {
                return Ok(position);
            }
        } else if let Some(position) = memory_checkpoint {
            return Ok(position);
        }
        match self.shared.config.start_from {
            StartFrom::Origin => Ok(Position::START),
            StartFrom::Current => {
                let head = self.retrying(Position::START, || store.head()).await?;
                // Saved at once: a restart before the first event must not move the start past
                // events stored since this first start.
                if durable {
                    self.retrying(head, || self.write_checkpoint(head)).await?;
                }
                Ok(head)
            }
        }
    }

    async fn write_checkpoint(&self, position: Position) -> Result<(), StoreError> {
        match &self.claim {
            Some(claim) => self.shared.store.save_checkpoint_claimed(&self.shared.name, position, claim).await,
            None => self.shared.store.save_checkpoint(&self.shared.name, position).await,
        }
    }

    async fn save(&self, position: Position, memory_checkpoint: &mut Option<Position>) -> Result<(), StoreError> {
        if self.shared.config.checkpoints == Checkpoints::InMemory {
            *memory_checkpoint = Some(position);
            return Ok(());
        }
        let result = self.write_checkpoint(position).await;
        if let Err(error) = &result {
            tracing::warn!(handler = %self.shared.name, %position, %error, "saving checkpoint failed");
        }
        result
    }

    /// The parked events at the start of a tenure, by sequence.
    async fn load_parked(&mut self) -> Result<HashMap<String, Vec<Position>>, End> {
        let parked = self.retrying(Position::START, || self.shared.store.parked(&self.shared.name)).await?;
        self.parked.clear();
        for event in &parked {
            self.parked.entry(event.sequence.clone()).or_default().push(event.position);
        }
        Ok(self.parked.clone())
    }

    /// Parks an event, fenced by this tenure's claim.
    async fn park(&mut self, event: &RecordedEvent, key: &str, error: String, attempts: u32) -> Result<(), End> {
        let parked = ParkedEvent {
            handler: self.shared.name.clone(),
            position: event.position,
            event_id: event.event_id,
            stream_id: event.stream_id.clone(),
            event_type: event.event_type.to_string(),
            sequence: key.to_owned(),
            error,
            attempts,
            parked_at: Timestamp::now(),
            status: ParkedStatus::Parked,
        };
        let fence = self.claim.as_ref();
        self.retrying(event.position, || self.shared.store.park(parked.clone(), fence)).await?;
        let positions = self.parked.entry(key.to_owned()).or_default();
        if !positions.contains(&event.position) {
            positions.push(event.position);
        }
        Ok(())
    }

    /// Records what a worker did; returns the position that is now done, if any.
    async fn settle(&mut self, done: Done) -> Result<Option<Position>, End> {
        // The common case, once per event: nothing to write.
        let done = match done {
            Done::Handled(position) => return Ok(Some(position)),
            parking => parking,
        };
        // Owned, because the arms below borrow `self` mutably.
        let fence = self.claim.clone();
        let fence = fence.as_ref();
        let store = Arc::clone(&self.shared.store);
        let name = self.shared.name.clone();
        match done {
            Done::Handled(position) => Ok(Some(position)),
            Done::Park { event, key, error, attempts } => {
                tracing::error!(handler = %name, position = %event.position, attempts, error, "event parked");
                self.park(&event, &key, error, attempts).await?;
                self.shared.set_state(HandlerState::Running);
                Ok(Some(event.position))
            }
            Done::ParkBehind { event, key, first } => {
                self.park(&event, &key, format!("waiting behind the parked event at {first}"), 0).await?;
                Ok(Some(event.position))
            }
            Done::Unparked(position) => {
                // Already gone if an operator discarded it meanwhile: then this removes nothing.
                self.retrying(position, || store.unpark(&name, position, fence)).await?;
                self.forget_parked(position);
                Ok(None)
            }
            Done::RetryFailed { position, key, error } => {
                tracing::warn!(handler = %name, %position, error, "retrying a parked event failed");
                // The failed one records its error; its whole sequence goes back to parked (a
                // retry request must not spin). Updates only: an event an operator discarded
                // meanwhile stays discarded.
                self.retrying(position, || store.parked_retry_failed(&name, position, &error, fence)).await?;
                let rest: Vec<Position> = self
                    .parked
                    .get(&key)
                    .map(|positions| positions.iter().copied().filter(|p| *p != position).collect())
                    .unwrap_or_default();
                for parked in rest {
                    self.retrying(parked, || store.set_parked_status(&name, parked, ParkedStatus::Parked, fence))
                        .await?;
                }
                Ok(None)
            }
        }
    }

    /// Looks for operators' retry requests and discards, and passes them to the workers.
    async fn poll_parked(&mut self, queues: &[mpsc::Sender<Job<H::Event>>], workers: usize) {
        let Ok(stored) = self.shared.store.parked(&self.shared.name).await else { return };
        let mut retry: HashSet<String> = HashSet::new();
        let mut present: HashMap<String, HashSet<Position>> = HashMap::new();
        for event in &stored {
            present.entry(event.sequence.clone()).or_default().insert(event.position);
            if event.status == ParkedStatus::RetryRequested {
                retry.insert(event.sequence.clone());
            }
        }
        // Discarded by an operator: gone from the store.
        for (key, positions) in &mut self.parked {
            let here = present.get(key);
            let gone: Vec<Position> =
                positions.iter().copied().filter(|p| !here.is_some_and(|here| here.contains(p))).collect();
            if !gone.is_empty() {
                positions.retain(|p| !gone.contains(p));
                let _ = queues[worker_of(key, workers)].send(Job::Forget { key: key.clone(), positions: gone }).await;
            }
        }
        self.parked.retain(|_, positions| !positions.is_empty());
        for key in retry {
            let _ = queues[worker_of(&key, workers)].send(Job::Retry { key }).await;
        }
    }
}

/// One worker: handles the events of its partitions in order.
struct Worker<S: ?Sized, H> {
    shared: Arc<Shared<S, H>>,
    claim: Option<Claim>,
    /// Sequences with parked events, and those positions in order.
    blocked: HashMap<String, Vec<Position>>,
    done: mpsc::UnboundedSender<Done>,
    /// The feeder's inline worker: it shows the handled position itself before reporting a
    /// failure (everything before the failing event is handled; the feeder is busy here).
    shows_progress: bool,
}

/// The feeder's own worker, when it handles events itself: the same delivery (retries,
/// back-off, spans, metrics) as a worker task's, stopped by the runner's stop signal.
struct Inline<S: ?Sized, H> {
    worker: Worker<S, H>,
    halt: watch::Receiver<bool>,
}

impl<S: Store + ?Sized, H: EventHandler> Inline<S, H> {
    /// Handles one event; a lost lease cancels it mid-event (like aborting a worker), a stop
    /// lets it finish unless it is waiting to retry.
    async fn handle(
        &mut self,
        event: &RecordedEvent,
        decoded: Option<Envelope<H::Event>>,
        guard: &mut Guard<'_>,
    ) -> Result<(), End> {
        let deliver = self.worker.deliver(event, decoded, &mut self.halt);
        tokio::pin!(deliver);
        let delivered = tokio::select! {
            biased;
            () = lease_lost(&mut guard.lease, guard.claim.as_ref()) => return Err(End::LeaseLost),
            delivered = &mut deliver => delivered,
            // Stopped mid-event: the event may finish within the stop timeout, as a worker's
            // would; past it, it is cancelled and handled again by the next run.
            () = stopped(guard.stop) => tokio::select! {
                biased;
                () = lease_lost(&mut guard.lease, guard.claim.as_ref()) => return Err(End::LeaseLost),
                delivered = &mut deliver => delivered,
                () = tokio::time::sleep(self.worker.shared.config.stop_timeout) => {
                    tracing::warn!(
                        handler = %self.worker.shared.name,
                        timeout = ?self.worker.shared.config.stop_timeout,
                        "graceful stop did not finish in time; the event in hand is handled again by the next run"
                    );
                    return Err(End::Stopped);
                }
            },
        };
        match delivered {
            Some(Ok(())) => Ok(()),
            // Stopped while waiting to retry. (A failure to park cannot come: nothing parks
            // when handling inline.)
            Some(Err(_)) | None => Err(End::Stopped),
        }
    }
}

impl<S: Store + ?Sized, H: EventHandler> Worker<S, H> {
    /// Handles jobs until halted, its queue closes, or its tenure ends: a worker never handles
    /// an event (nor waits to retry one) past its claim, whatever the feeder is doing.
    async fn run(
        mut self,
        mut jobs: mpsc::Receiver<Job<H::Event>>,
        mut halt: watch::Receiver<bool>,
        mut lease: Option<watch::Receiver<Lease>>,
    ) {
        let claim = self.claim.clone();
        tokio::select! {
            biased;
            // Dropping the work mid-event cancels the handler's call and any back-off: the
            // next holder handles that event again (at-least-once, never by two at once).
            () = lease_lost(&mut lease, claim.as_ref()) => {}
            () = self.work(&mut jobs, &mut halt) => {}
        }
    }

    async fn work(&mut self, jobs: &mut mpsc::Receiver<Job<H::Event>>, halt: &mut watch::Receiver<bool>) {
        loop {
            let job = tokio::select! {
                biased;
                () = stopped(halt) => return,
                job = jobs.recv() => match job { Some(job) => job, None => return },
            };
            let done = match job {
                Job::Event { event, decoded, key } => match self.blocked_by(key.as_deref()) {
                    Some(first) => {
                        let key = key.unwrap_or_default();
                        if let Some(positions) = self.blocked.get_mut(&key) {
                            positions.push(event.position);
                        }
                        Done::ParkBehind { event, key, first }
                    }
                    None => match self.deliver(&event, decoded, halt).await {
                        Some(Ok(())) => Done::Handled(event.position),
                        Some(Err((error, attempts))) => {
                            let key = key.unwrap_or_else(|| event.stream_id.as_str().to_owned());
                            self.blocked.entry(key.clone()).or_default().push(event.position);
                            Done::Park { event, key, error, attempts }
                        }
                        None => return,
                    },
                },
                Job::Retry { key } => {
                    if !self.retry(&key, halt).await {
                        return;
                    }
                    continue;
                }
                Job::Forget { key, positions } => {
                    if let Some(parked) = self.blocked.get_mut(&key) {
                        parked.retain(|p| !positions.contains(p));
                        if parked.is_empty() {
                            self.blocked.remove(&key);
                        }
                    }
                    continue;
                }
            };
            if self.done.send(done).is_err() {
                return;
            }
        }
    }

    /// The first parked position of this event's sequence, if it has any.
    fn blocked_by(&self, key: Option<&str>) -> Option<Position> {
        key.and_then(|key| self.blocked.get(key)).and_then(|positions| positions.first().copied())
    }

    /// Upcasts, decodes and handles one event, retrying failures with back-off: `Ok` once
    /// handled (or found not of interest), `Err((error, attempts))` when the error policy
    /// parks it, `None` when halted.
    async fn deliver(
        &self,
        event: &RecordedEvent,
        mut decoded: Option<Envelope<H::Event>>,
        halt: &mut watch::Receiver<bool>,
    ) -> Option<Result<(), (String, u32)>> {
        let shared = &self.shared;
        let mut failures = Failures::new(&shared.config);
        loop {
            let attempt = failures.attempts + 1;
            let result = match decoded.take() {
                Some(envelope) => self.handle(envelope, attempt).await,
                None => match self.decode_and_handle(event, attempt).await {
                    Some(result) => result,
                    None => return Some(Ok(())),
                },
            };
            match result {
                Ok(()) => {
                    shared.metrics.events.increment(1);
                    if failures.attempts > 0 {
                        shared.set_state(HandlerState::Running);
                    }
                    return Some(Ok(()));
                }
                Err(error) => {
                    shared.metrics.failures.increment(1);
                    let delay = failures.record();
                    let error = error.to_string();
                    if shared.parking().is_some_and(|limit| failures.attempts >= limit) {
                        return Some(Err((error, failures.attempts)));
                    }
                    if self.shows_progress {
                        let handled = Position(event.position.0.saturating_sub(1));
                        shared.show_progress(handled, 0, &shared.store.notifications());
                    }
                    shared.report_failure(event.position, &failures, &error);
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = stopped(halt) => return None,
                    }
                    if stop_requested(halt) {
                        return None;
                    }
                }
            }
        }
    }

    /// Upcasts and decodes a stored event and runs the handler on it: `None` when the handler is
    /// not interested in the upcast event (nothing to handle), otherwise the handling's result,
    /// an upcast or decode failure counting as a handler failure.
    async fn decode_and_handle(&self, event: &RecordedEvent, attempt: u32) -> Option<Result<(), HandlerError>> {
        let upcasters = &self.shared.config.upcasters;
        let result = match upcasters.upcast(event) {
            Ok(current) if !self.shared.handler.interested(&current) => return None,
            Ok(current) => match upcasters.decode::<H::Event>(&current) {
                Ok(envelope) => self.handle(envelope, attempt).await,
                Err(error) => Err(HandlerError::new(error)),
            },
            Err(error) => Err(HandlerError::new(error)),
        };
        Some(result)
    }

    /// Runs the handler on one event, inside its `handle` span (a child of the trace context
    /// in the event's headers, when propagation is installed), under this tenure's claim.
    async fn handle(&self, envelope: Envelope<H::Event>, attempt: u32) -> Result<(), HandlerError> {
        let span = tracing::info_span!(
            "handle",
            handler = %self.shared.name,
            position = envelope.position.0,
            event_type = envelope.event.event_type(),
            stream = %envelope.stream_id,
            attempt,
            correlation_id = ?envelope.metadata.correlation_id,
            causation_id = ?envelope.metadata.causation_id,
        );
        if let Some(propagation) = crate::telemetry::trace_context() {
            propagation.extract(&envelope.metadata.headers, &span);
        }
        let handling = CURRENT_CLAIM.scope(self.claim.clone(), self.shared.handler.handle(envelope));
        tracing::Instrument::instrument(handling, span).await
    }

    /// Retries the parked events of sequence `key`, oldest first; stops at the first failure.
    /// False when halted.
    async fn retry(&mut self, key: &str, halt: &mut watch::Receiver<bool>) -> bool {
        let positions = self.blocked.get(key).cloned().unwrap_or_default();
        for position in positions {
            let read = self.shared.store.read_all(Position(position.0.saturating_sub(1)), 1).await;
            let event = match read {
                Ok(mut page) if page.first().is_some_and(|event| event.position == position) => page.remove(0),
                Ok(_) => {
                    let error = format!("the event at {position} is not in the store");
                    let _ = self.done.send(Done::RetryFailed { position, key: key.to_owned(), error });
                    return true;
                }
                Err(error) => {
                    let _ =
                        self.done.send(Done::RetryFailed { position, key: key.to_owned(), error: error.to_string() });
                    return true;
                }
            };
            // Not of interest (any more): nothing to handle, so the retry succeeds.
            let outcome = self.decode_and_handle(&event, 1).await.unwrap_or(Ok(())).map_err(|error| error.to_string());
            if stop_requested(halt) {
                return false;
            }
            match outcome {
                Ok(()) => {
                    if let Some(parked) = self.blocked.get_mut(key) {
                        parked.retain(|p| *p != position);
                        if parked.is_empty() {
                            self.blocked.remove(key);
                        }
                    }
                    if self.done.send(Done::Unparked(position)).is_err() {
                        return false;
                    }
                }
                Err(error) => {
                    let _ = self.done.send(Done::RetryFailed { position, key: key.to_owned(), error });
                    return true;
                }
            }
        }
        true
    }
}
