//! The command path: route a command to its aggregate instance, decide, append, retry on
//! conflict, and optionally wait for read models (read-your-writes).
//!
//! Concurrency design: a short `std` mutex guards only the LRU map of instances; each instance
//! has its own async mutex, held while its command runs. Commands to one instance are therefore
//! serialised within this process, commands to different instances run in parallel, and no lock
//! is held across the whole dispatcher. Other processes writing the same stream are caught by
//! the store's expected-version check; the dispatcher then reads only the missing events and
//! decides again.
//!
//! A hot instance (commands queueing on its mutex) is served in batches: the command that
//! holds the mutex takes every command waiting for it, decides them one after another, each on
//! the state the previous ones leave, and stores them with one [`EventStore::append_chain`]
//! (one round trip and one commit on PostgreSQL), which stores a link only right after the
//! links before it. A command whose decision stores nothing, or whose link was not stored, is
//! then run on its own as before. So every stored command was decided on a state that includes
//! every earlier event of its stream, and one stream is no longer limited to one command per
//! commit. `DispatcherConfig::batch_commands` turns it off.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::Instrument;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::oneshot;
use tokio::sync::Mutex as AsyncMutex;

use crate::aggregate::{Aggregate, Command, CommandEnvelope};
use crate::cache::LruCache;
use crate::event::{DecodeError, DomainEvent, NewEvent, Upcasters};
use crate::handler::{HandlerError, Progress, ProgressError};
use crate::ids::{CommandId, StreamId, StreamIdError, Version};
use crate::store::{AppendOutcome, AppendResult, EventStore, ExpectedVersion, Snapshot, StoreError};

/// Tuning for a [`Dispatcher`].
#[derive(Debug, Clone)]
pub struct DispatcherConfig {
    /// How many aggregate instances stay warm in memory.
    pub cache_capacity: usize,
    /// How many times a command is decided again after a version conflict before giving up.
    pub max_conflict_retries: u32,
    /// How many events are read per store call when loading an instance.
    pub load_page_size: usize,
    /// Whether commands queued on one instance are decided and stored together (see the module
    /// docs); at most this many per batch (0 or 1: one at a time).
    pub batch_commands: usize,
}

impl Default for DispatcherConfig {
    fn default() -> Self {
        Self { cache_capacity: 10_000, max_conflict_retries: 10, load_page_size: 1_000, batch_commands: 64 }
    }
}

/// When and how a [`Dispatcher`] snapshots its aggregates' state, so that loading a long
/// stream reads only the events after the latest snapshot. Needs a store that keeps snapshots
/// ([`EventStore::supports_snapshots`]) and an aggregate state that is serde.
pub struct SnapshotPolicy<A> {
    every: u64,
    schema_version: u32,
    encode: fn(&A) -> Result<serde_json::Value, serde_json::Error>,
    decode: fn(&serde_json::Value) -> Result<A, serde_json::Error>,
}

impl<A> Clone for SnapshotPolicy<A> {
    fn clone(&self) -> Self {
        Self { every: self.every, schema_version: self.schema_version, encode: self.encode, decode: self.decode }
    }
}

impl<A> fmt::Debug for SnapshotPolicy<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SnapshotPolicy")
            .field("every", &self.every)
            .field("schema_version", &self.schema_version)
            .finish()
    }
}

impl<A: Serialize + DeserializeOwned> SnapshotPolicy<A> {
    /// Snapshot each instance whenever its version crosses a multiple of `events` (at least 1).
    pub fn every(events: u64) -> Self {
        Self {
            every: events.max(1),
            schema_version: 1,
            encode: |state| serde_json::to_value(state),
            decode: |value| A::deserialize(value),
        }
    }

    /// Sets the state's format version. Raise it whenever the state's serde shape changes:
    /// older snapshots are then ignored and streams are replayed.
    #[must_use]
    pub fn with_schema_version(mut self, schema_version: u32) -> Self {
        self.schema_version = schema_version;
        self
    }
}

/// How long a dispatch waits for read models.
#[derive(Debug, Clone, Default)]
pub enum Consistency {
    /// Return as soon as the events are stored.
    #[default]
    Eventual,
    /// Return once each named handler has processed the command's events (read-your-writes),
    /// or fail with [`DispatchError::ConsistencyTimeout`] after `timeout`.
    Strong {
        /// Names of the handlers to wait for.
        handlers: Vec<String>,
        /// The longest wait.
        timeout: Duration,
    },
}

impl Consistency {
    /// Waits for the given handlers, up to 5 seconds. Name them by their names (`&str`,
    /// `String`, a constant) or by the [`RunningHandler`](crate::RunningHandler) that
    /// [`spawn_handler`](crate::spawn_handler) returned. A name no runner reports to the
    /// dispatcher's [`Progress`] is refused before the command runs
    /// ([`DispatchError::UnknownHandler`]).
    pub fn strong<I>(handlers: I) -> Self
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        Consistency::Strong {
            handlers: handlers.into_iter().map(|name| name.as_ref().to_owned()).collect(),
            timeout: Duration::from_secs(5),
        }
    }

    /// The same, with another longest wait.
    #[must_use]
    pub fn with_timeout(self, timeout: Duration) -> Self {
        match self {
            Consistency::Eventual => Consistency::Eventual,
            Consistency::Strong { handlers, .. } => Consistency::Strong { handlers, timeout },
        }
    }
}

/// The result of a dispatched command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatchOutcome {
    /// The instance that handled the command.
    pub stream_id: StreamId,
    /// The command id (the caller's idempotency key, or a generated one).
    pub command_id: CommandId,
    /// Where the command's events were stored; `None` if the command produced no events.
    pub appended: Option<AppendResult>,
    /// The stream's version after the command (for a duplicate: after its first handling).
    pub version: Version,
    /// True if this command id had already been handled: nothing new was stored and `appended`
    /// is the first result.
    pub duplicate: bool,
}

/// Why a command was not handled. `E` is the aggregate's domain error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DispatchError<E: std::error::Error + 'static> {
    /// The aggregate refused the command; nothing was stored. Show it to the user (a 4xx).
    #[error("command rejected: {0}")]
    Rejected(#[source] E),
    /// The command names no valid stream ([`Command::stream_id`] failed, for example an id
    /// from a request that is too long); nothing was decided or stored. A 4xx.
    #[error("the command names no valid stream: {0}")]
    InvalidStreamId(#[source] StreamIdError),
    /// [`Consistency::Strong`] named a handler that no runner reports to this dispatcher's
    /// [`Progress`] (a misspelt name, or a handler not started); nothing was decided or
    /// stored. A bug in the caller.
    #[error("no handler named {0:?} reports progress to this dispatcher; check the name")]
    UnknownHandler(String),
    /// The aggregate produced an event that its event type does not declare for the
    /// aggregate's category ([`DomainEvent::accepts`]): handlers would never see it, so it
    /// was not stored. A bug in a hand-written [`DomainEvent`] impl (the derive cannot make it).
    #[error("event type {event_type:?} is not declared for category {category:?}; it was not stored")]
    UndeclaredEventType {
        /// The event's type name.
        event_type: &'static str,
        /// The aggregate's category.
        category: &'static str,
    },
    /// Other writers kept changing the stream; the command was decided `attempts` times. Retry
    /// later or reduce contention on this instance.
    #[error("gave up on {stream_id} after {attempts} version conflicts")]
    TooManyConflicts {
        /// The contended stream.
        stream_id: StreamId,
        /// How many times the command was decided.
        attempts: u32,
    },
    /// The store failed. If transient ([`StoreError::is_transient`]) retry with the same command
    /// id: it is idempotent, so a retry after an unknown outcome cannot double-apply.
    #[error("event store: {0}")]
    Store(#[from] StoreError),
    /// A stored event of this stream could not be decoded (missing upcaster?).
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// An event produced by the aggregate could not be serialized. A bug in the event type.
    #[error("cannot serialize event: {0}")]
    Encode(#[source] serde_json::Error),
    /// The events were stored, but a read model did not catch up in time. The command succeeded;
    /// only the read-your-writes promise could not be kept.
    #[error("events stored at {outcome:?}, but read models did not catch up: {source}")]
    ConsistencyTimeout {
        /// The successful outcome.
        outcome: Box<DispatchOutcome>,
        /// Which handler and why.
        #[source]
        source: ProgressError,
    },
}

/// One aggregate instance kept warm: its state and the version it reflects.
#[derive(Debug, Default)]
struct Instance<A> {
    state: A,
    version: Version,
    loaded: bool,
}

impl<A: Aggregate> Instance<A> {
    /// Replaces the state by `evolve(state)` and sets the version. If `evolve` panics (a bug
    /// in `apply`), the instance is left empty and unloaded, so the next command reloads it
    /// from the store instead of deciding on a half-applied state.
    fn evolve(&mut self, evolve: impl FnOnce(A) -> A, version: Version) {
        let state = std::mem::take(&mut self.state);
        self.version = Version::NONE;
        self.loaded = false;
        self.state = evolve(state);
        self.version = version;
        self.loaded = true;
    }
}

/// One cached instance: its state behind the async mutex that serialises its commands, a
/// flag set by [`Dispatcher::clear_cache`] while a command holds the mutex, so the next
/// command starts from the store, and the commands waiting for the mutex (which the command
/// holding it may take into its batch).
struct Slot<A: Aggregate> {
    instance: AsyncMutex<Instance<A>>,
    stale: AtomicBool,
    waiting: Mutex<Vec<Job<A>>>,
}

impl<A: Aggregate> Default for Slot<A> {
    fn default() -> Self {
        Self { instance: AsyncMutex::default(), stale: AtomicBool::new(false), waiting: Mutex::new(Vec::new()) }
    }
}

impl<A: Aggregate> fmt::Debug for Slot<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Slot").field("stale", &self.stale).finish_non_exhaustive()
    }
}

type Answer<A> = Result<DispatchOutcome, DispatchError<<A as Aggregate>::Error>>;

/// A command waiting for its instance's mutex, and where its answer goes if the command
/// holding the mutex handles it in its batch.
struct Job<A: Aggregate> {
    envelope: Arc<CommandEnvelope<A::Command>>,
    reply: oneshot::Sender<Answer<A>>,
}

/// Removes a waiting command from its slot's queue when its dispatch is dropped while waiting.
struct Queued<'a, A: Aggregate> {
    slot: &'a Slot<A>,
    envelope: &'a Arc<CommandEnvelope<A::Command>>,
}

impl<A: Aggregate> Drop for Queued<'_, A> {
    fn drop(&mut self) {
        let mut waiting = self.slot.waiting.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        waiting.retain(|job| !Arc::ptr_eq(&job.envelope, self.envelope));
    }
}

/// A command of a batch whose decision stores events.
struct Planned<A: Aggregate> {
    job: Job<A>,
    events: Vec<A::Event>,
}

type InstanceSlot<A> = Arc<Slot<A>>;

/// Routes commands of aggregate `A` to their instances in store `S`.
///
/// Cheap to clone; clones share the cache.
pub struct Dispatcher<A: Aggregate, S: EventStore + ?Sized> {
    store: Arc<S>,
    instances: Arc<Mutex<LruCache<StreamId, InstanceSlot<A>>>>,
    upcasters: Upcasters,
    progress: Progress,
    config: DispatcherConfig,
    snapshots: Option<SnapshotPolicy<A>>,
}

impl<A: Aggregate, S: EventStore + ?Sized> Clone for Dispatcher<A, S> {
    fn clone(&self) -> Self {
        Self {
            store: Arc::clone(&self.store),
            instances: Arc::clone(&self.instances),
            upcasters: self.upcasters.clone(),
            progress: self.progress.clone(),
            config: self.config.clone(),
            snapshots: self.snapshots.clone(),
        }
    }
}

impl<A: Aggregate, S: EventStore + ?Sized> fmt::Debug for Dispatcher<A, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dispatcher").field("aggregate", &A::CATEGORY).field("config", &self.config).finish()
    }
}

impl<A: Aggregate, S: EventStore + ?Sized> Dispatcher<A, S> {
    /// A dispatcher with the default configuration.
    pub fn new(store: Arc<S>) -> Self {
        Self::with_config(store, DispatcherConfig::default())
    }

    /// A dispatcher with the given configuration.
    pub fn with_config(store: Arc<S>, config: DispatcherConfig) -> Self {
        Self {
            store,
            instances: Arc::new(Mutex::new(LruCache::new(config.cache_capacity))),
            upcasters: Upcasters::new(),
            progress: Progress::new(),
            config,
            snapshots: None,
        }
    }

    /// Saves and uses snapshots according to `policy`.
    #[must_use]
    pub fn with_snapshots(mut self, policy: SnapshotPolicy<A>) -> Self {
        self.snapshots = Some(policy);
        self
    }

    /// Uses these upcasters when loading stored events.
    #[must_use]
    pub fn with_upcasters(mut self, upcasters: Upcasters) -> Self {
        self.upcasters = upcasters;
        self
    }

    /// Uses this progress registry for [`Consistency::Strong`]; pass the one the handler runners
    /// report to.
    #[must_use]
    pub fn with_progress(mut self, progress: Progress) -> Self {
        self.progress = progress;
        self
    }

    /// The store this dispatcher writes to.
    pub fn store(&self) -> &Arc<S> {
        &self.store
    }

    /// Dispatches a command with eventual consistency.
    pub async fn dispatch(
        &self,
        command: impl Into<CommandEnvelope<A::Command>>,
    ) -> Result<DispatchOutcome, DispatchError<A::Error>> {
        self.dispatch_with(command.into(), &Consistency::Eventual).await
    }

    /// Dispatches a command and, with [`Consistency::Strong`], waits for the named handlers.
    pub async fn dispatch_with(
        &self,
        envelope: CommandEnvelope<A::Command>,
        consistency: &Consistency,
    ) -> Result<DispatchOutcome, DispatchError<A::Error>> {
        let started = Instant::now();
        let span = tracing::info_span!(
            "dispatch",
            category = A::CATEGORY,
            stream = tracing::field::Empty,
            command_id = %envelope.command_id,
            correlation_id = ?envelope.correlation_id,
            causation_id = ?envelope.causation_id,
            attempts = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        let envelope = Arc::new(envelope);
        let result = self.decide_and_store(&envelope, consistency).instrument(span.clone()).await;
        let outcome = match &result {
            Ok(outcome) if outcome.duplicate => "duplicate",
            Ok(outcome) if outcome.appended.is_none() => "no_events",
            Ok(_) => "stored",
            Err(DispatchError::Rejected(_)) => "rejected",
            Err(
                DispatchError::InvalidStreamId(_)
                | DispatchError::UnknownHandler(_)
                | DispatchError::UndeclaredEventType { .. },
            ) => "invalid",
            Err(DispatchError::TooManyConflicts { .. }) => "too_many_conflicts",
            Err(_) => "error",
        };
        span.record("outcome", outcome);
        metrics::counter!("cqrs_commands_total", "category" => A::CATEGORY, "outcome" => outcome).increment(1);
        metrics::histogram!("cqrs_dispatch_duration_seconds", "category" => A::CATEGORY)
            .record(started.elapsed().as_secs_f64());
        let outcome = result?;
        if let (Consistency::Strong { handlers, timeout }, Some(appended)) = (consistency, outcome.appended) {
            for handler in handlers {
                if let Err(source) = self.progress.wait_for(handler, appended.last_position, *timeout).await {
                    return Err(DispatchError::ConsistencyTimeout { outcome: Box::new(outcome), source });
                }
            }
        }
        Ok(outcome)
    }

    /// Routes, decides and stores one command (inside its `dispatch` span).
    async fn decide_and_store(
        &self,
        envelope: &Arc<CommandEnvelope<A::Command>>,
        consistency: &Consistency,
    ) -> Result<DispatchOutcome, DispatchError<A::Error>> {
        let stream_id = envelope.command.stream_id().map_err(DispatchError::InvalidStreamId)?;
        tracing::Span::current().record("stream", tracing::field::display(&stream_id));
        if let Consistency::Strong { handlers, .. } = consistency {
            if let Some(unknown) = handlers.iter().find(|name| !self.progress.is_registered(name)) {
                return Err(DispatchError::UnknownHandler(unknown.clone()));
            }
        }
        let slot = self.slot(&stream_id);
        if self.config.batch_commands <= 1 {
            let mut instance = Self::lock(&slot).await;
            return self.run(&stream_id, &mut instance, envelope).await;
        }
        // Uncontended (the common case): no queue, no batch.
        if let Ok(instance) = slot.instance.try_lock() {
            let mut instance = Self::fresh(&slot, instance);
            return self.run(&stream_id, &mut instance, envelope).await;
        }
        let (reply, mut answer) = oneshot::channel();
        Self::waiting(&slot).push(Job { envelope: Arc::clone(envelope), reply });
        // If this future is dropped while waiting, the command leaves the queue (unless a batch
        // already took it): a dispatch dropped before it ran is not run later by another.
        let queued = Queued { slot: &slot, envelope };
        let mut instance = Self::lock(&slot).await;
        std::mem::forget(queued);
        match answer.try_recv() {
            // Decided and stored by the command before us, in its batch.
            Ok(answer) => return answer,
            // Taken into a batch whose command was dropped before answering: run it here (its
            // append may have happened; its command id makes a second one a duplicate).
            Err(oneshot::error::TryRecvError::Closed) => return self.run(&stream_id, &mut instance, envelope).await,
            Err(oneshot::error::TryRecvError::Empty) => {}
        }
        // Ours is still waiting, so it is among these: take it and those queued behind it.
        let jobs: Vec<Job<A>> = {
            let mut waiting = Self::waiting(&slot);
            let take = waiting.len().min(self.config.batch_commands);
            let mine = waiting.iter().position(|job| Arc::ptr_eq(&job.envelope, envelope));
            match mine {
                Some(index) if take > 1 => {
                    let mut jobs: Vec<Job<A>> = Vec::with_capacity(take);
                    jobs.push(waiting.remove(index));
                    let others = (take - 1).min(waiting.len());
                    jobs.extend(waiting.drain(..others));
                    jobs
                }
                Some(index) => {
                    waiting.remove(index);
                    Vec::new()
                }
                None => Vec::new(),
            }
        };
        if jobs.len() <= 1 {
            return self.run(&stream_id, &mut instance, envelope).await;
        }
        self.run_batch(&stream_id, &mut instance, jobs).await
    }

    fn waiting(slot: &Slot<A>) -> std::sync::MutexGuard<'_, Vec<Job<A>>> {
        slot.waiting.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Decides `jobs` (the first is the caller's) one after another on the state each leaves,
    /// stores those that produce events with one [`EventStore::append_chain`], then runs the
    /// rest one by one; answers the others through their replies and returns the first's.
    async fn run_batch(
        &self,
        stream_id: &StreamId,
        instance: &mut Instance<A>,
        jobs: Vec<Job<A>>,
    ) -> Result<DispatchOutcome, DispatchError<A::Error>> {
        let own = Arc::clone(&jobs[0].envelope);
        let mut answers: Vec<(Job<A>, Answer<A>)> = Vec::with_capacity(jobs.len());
        let mut deferred: Vec<Job<A>> = Vec::new();
        if !instance.loaded {
            // On failure the other jobs' replies are dropped: each then runs on its own.
            self.catch_up(stream_id, instance).await?;
        }
        let mut state = instance.state.clone();
        let start = instance.version;
        let mut planned: Vec<Planned<A>> = Vec::new();
        let mut links: Vec<Vec<NewEvent>> = Vec::new();
        for job in jobs {
            match state.execute(&job.envelope.command) {
                Ok(events) if !events.is_empty() => match Self::encode(&events, &job.envelope) {
                    Ok(encoded) => {
                        state = events.iter().fold(state, A::apply);
                        links.push(encoded);
                        planned.push(Planned { job, events });
                    }
                    Err(error) => answers.push((job, Err(error))),
                },
                // Stores nothing: decided again on its own, on state read from the store.
                _ => deferred.push(job),
            }
        }
        drop(state);
        if !planned.is_empty() {
            tracing::Span::current().record("attempts", 1);
            // Until the answers are applied, the cached state may lag the store (as in `run`).
            instance.loaded = false;
            let results = self.store.append_chain(stream_id, start, links).await;
            let mut state = std::mem::take(&mut instance.state);
            let mut version = start;
            let mut consistent = true;
            let mut results = results.into_iter();
            for Planned { job, events } in planned {
                let result = results
                    .next()
                    .unwrap_or_else(|| Err(StoreError::Corrupt("append_chain answered fewer links".to_owned())));
                match result {
                    Ok(AppendOutcome::Appended(appended)) if consistent => {
                        state = events.iter().fold(state, A::apply);
                        version = appended.last_version;
                        let outcome = self.outcome(stream_id, &job.envelope, Some(appended), version, false);
                        answers.push((job, Ok(outcome)));
                    }
                    Ok(AppendOutcome::Appended(appended)) => {
                        let last = appended.last_version;
                        let outcome = self.outcome(stream_id, &job.envelope, Some(appended), last, false);
                        answers.push((job, Ok(outcome)));
                    }
                    Ok(AppendOutcome::Duplicate(first)) => {
                        // Stored before (a resend): our state may be behind the store.
                        consistent = false;
                        let outcome = self.outcome(stream_id, &job.envelope, Some(first), first.last_version, true);
                        answers.push((job, Ok(outcome)));
                    }
                    Err(StoreError::Conflict { .. }) => {
                        consistent = false;
                        deferred.push(job);
                    }
                    Err(error) => {
                        consistent = false;
                        answers.push((job, Err(DispatchError::Store(error))));
                    }
                }
            }
            if consistent {
                instance.state = state;
                instance.version = version;
                instance.loaded = true;
                self.maybe_snapshot(stream_id, start, instance).await;
            } else {
                // Something else happened to the stream: the next decision starts from the store.
                *instance = Instance::default();
            }
        }
        for job in deferred {
            let answer = self.run(stream_id, instance, &job.envelope).await;
            answers.push((job, answer));
        }
        let mut own_answer = None;
        for (job, answer) in answers {
            if Arc::ptr_eq(&job.envelope, &own) {
                own_answer = Some(answer);
            } else {
                // The caller may have gone away; what was stored stays stored.
                let _ = job.reply.send(answer);
            }
        }
        own_answer.unwrap_or_else(|| {
            Err(DispatchError::Store(StoreError::Corrupt("a batch lost its own command".to_owned())))
        })
    }

    /// The state of an instance as this dispatcher sees it after catching up with the store,
    /// with its version. Useful for tests and for queries that must see the write model.
    pub async fn load(&self, stream_id: &StreamId) -> Result<(A, Version), DispatchError<A::Error>> {
        let slot = self.slot(stream_id);
        let mut instance = Self::lock(&slot).await;
        self.catch_up(stream_id, &mut instance).await?;
        Ok((instance.state.clone(), instance.version))
    }

    /// Drops every warm instance; the next command on each reloads from the store. An
    /// instance a command is running on stays in the cache (so commands on it stay one at a
    /// time) and is reloaded by the command after it.
    pub fn clear_cache(&self) {
        let mut instances = self.instances.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        instances.retain(|slot| {
            let in_use = Arc::strong_count(slot) > 1;
            if in_use {
                slot.stale.store(true, Ordering::Release);
            }
            in_use
        });
    }

    /// Locks a slot's instance; an instance marked stale by [`clear_cache`](Self::clear_cache)
    /// is emptied first, so it is reloaded.
    async fn lock(slot: &Slot<A>) -> tokio::sync::MutexGuard<'_, Instance<A>> {
        Self::fresh(slot, slot.instance.lock().await)
    }

    /// The instance behind a just-taken lock, reset if [`Dispatcher::clear_cache`] marked it.
    fn fresh<'a>(
        slot: &Slot<A>,
        mut instance: tokio::sync::MutexGuard<'a, Instance<A>>,
    ) -> tokio::sync::MutexGuard<'a, Instance<A>> {
        if slot.stale.swap(false, Ordering::AcqRel) {
            *instance = Instance::default();
        }
        instance
    }

    /// How many aggregate instances are warm in the cache.
    pub fn cached_instances(&self) -> usize {
        self.instances.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len()
    }

    fn slot(&self, stream_id: &StreamId) -> InstanceSlot<A> {
        let mut instances = self.instances.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // An instance whose slot is held elsewhere (a command is running on it) stays cached:
        // evicting it would let a second slot for the same stream run concurrently.
        instances.get_or_insert_with(stream_id, || Arc::new(Slot::default()), |slot| Arc::strong_count(slot) == 1)
    }

    /// Decides and appends, retrying on conflicts. The caller holds the instance lock.
    ///
    /// A decision that stores nothing (a refusal, or no events) is trusted only when it was
    /// made on state read from the store during this call; on cached state the instance first
    /// catches up, and if another writer had moved it, decides again. A decision that stores
    /// events needs no such check: the append's expected version catches stale state.
    async fn run(
        &self,
        stream_id: &StreamId,
        instance: &mut Instance<A>,
        envelope: &CommandEnvelope<A::Command>,
    ) -> Result<DispatchOutcome, DispatchError<A::Error>> {
        let mut fresh = false;
        if !instance.loaded {
            self.catch_up(stream_id, instance).await?;
            fresh = true;
        }
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            tracing::Span::current().record("attempts", attempts);
            let decision = instance.state.execute(&envelope.command);
            let events = match decision {
                Ok(events) if !events.is_empty() => events,
                decision => {
                    // A repeated command may be refused (or be a no-op) in the state it itself
                    // produced; answer with the first outcome instead.
                    if let Some(outcome) = self.previous_outcome(stream_id, envelope).await? {
                        return Ok(outcome);
                    }
                    // Never trust a decision that stores nothing on stale state: another process
                    // may have written since we cached. Only a decision on current state stands.
                    if !fresh {
                        let cached = instance.version;
                        self.catch_up(stream_id, instance).await?;
                        fresh = true;
                        if instance.version != cached && attempts <= self.config.max_conflict_retries {
                            continue;
                        }
                    }
                    return match decision {
                        Ok(_no_events) => Ok(self.outcome(stream_id, envelope, None, instance.version, false)),
                        Err(rejection) => Err(DispatchError::Rejected(rejection)),
                    };
                }
            };
            let new_events = Self::encode(&events, envelope)?;
            let expected = ExpectedVersion::Exact(instance.version);
            // Until the append's outcome is applied below, the cached state may lag the store: if
            // this future is dropped while the append is in flight, the next command catches up
            // before deciding.
            instance.loaded = false;
            match self.store.append(stream_id, expected, new_events).await {
                Ok(AppendOutcome::Appended(appended)) => {
                    let previous = instance.version;
                    instance.evolve(|state| events.iter().fold(state, A::apply), appended.last_version);
                    self.maybe_snapshot(stream_id, previous, instance).await;
                    return Ok(self.outcome(stream_id, envelope, Some(appended), appended.last_version, false));
                }
                Ok(AppendOutcome::Duplicate(first)) => {
                    // Possibly handled by another process: our state may be behind.
                    self.catch_up(stream_id, instance).await?;
                    return Ok(self.outcome(stream_id, envelope, Some(first), first.last_version, true));
                }
                Err(StoreError::Conflict { .. }) if attempts <= self.config.max_conflict_retries => {
                    tracing::debug!(%stream_id, attempts, "version conflict, catching up and deciding again");
                    metrics::counter!("cqrs_command_conflicts_total", "category" => A::CATEGORY).increment(1);
                    if attempts > 1 {
                        // Repeated losses: another process keeps winning the race for this
                        // stream. A short random pause breaks the lockstep.
                        tokio::time::sleep(conflict_backoff(attempts)).await;
                    }
                    self.catch_up(stream_id, instance).await?;
                    fresh = true;
                }
                Err(StoreError::Conflict { .. }) => {
                    self.catch_up(stream_id, instance).await?;
                    return Err(DispatchError::TooManyConflicts { stream_id: stream_id.clone(), attempts });
                }
                Err(error) => {
                    // The append may or may not have happened (e.g. the connection dropped during
                    // commit): forget the cached state so the next command reloads.
                    *instance = Instance::default();
                    return Err(DispatchError::Store(error));
                }
            }
        }
    }

    /// Serializes the events a command produced, refusing any its event type does not declare
    /// for this aggregate's category (handlers would silently pass it over).
    fn encode(
        events: &[A::Event],
        envelope: &CommandEnvelope<A::Command>,
    ) -> Result<Vec<NewEvent>, DispatchError<A::Error>> {
        let mut metadata = envelope.event_metadata();
        if let Some(propagation) = crate::telemetry::trace_context() {
            propagation.inject(&mut metadata.headers);
        }
        events
            .iter()
            .map(|event| {
                let event_type = event.event_type();
                if !A::Event::EVENT_TYPES.contains(&event_type) || !A::Event::accepts(A::CATEGORY, event_type) {
                    return Err(DispatchError::UndeclaredEventType { event_type, category: A::CATEGORY });
                }
                NewEvent::from_domain(event, metadata.clone()).map_err(DispatchError::Encode)
            })
            .collect()
    }

    /// Reads the events after the instance's version and applies them (starting from the
    /// latest snapshot when the instance is empty and snapshots are on).
    async fn catch_up(&self, stream_id: &StreamId, instance: &mut Instance<A>) -> Result<(), DispatchError<A::Error>> {
        if instance.version == Version::NONE {
            self.restore_snapshot(stream_id, instance).await?;
        }
        loop {
            let page = self.store.read_stream(stream_id, instance.version.next(), self.config.load_page_size).await?;
            let page_len = page.len();
            for recorded in &page {
                if recorded.version != instance.version.next() {
                    return Err(StoreError::Corrupt(format!(
                        "{stream_id}: read {} while expecting {}",
                        recorded.version,
                        instance.version.next()
                    ))
                    .into());
                }
                let event = self.upcasters.decode_payload::<A::Event>(recorded)?;
                let loaded = instance.loaded;
                instance.evolve(|state| state.apply(&event), recorded.version);
                instance.loaded = loaded;
            }
            if page_len < self.config.load_page_size.max(1) {
                instance.loaded = true;
                return Ok(());
            }
        }
    }

    async fn restore_snapshot(
        &self,
        stream_id: &StreamId,
        instance: &mut Instance<A>,
    ) -> Result<(), DispatchError<A::Error>> {
        let Some(policy) = &self.snapshots else { return Ok(()) };
        let Some(snapshot) = self.store.load_snapshot(stream_id).await? else { return Ok(()) };
        if snapshot.schema_version != policy.schema_version {
            tracing::debug!(%stream_id, stored = snapshot.schema_version, "ignoring snapshot of another schema version");
            return Ok(());
        }
        match (policy.decode)(&snapshot.state) {
            Ok(state) => {
                instance.state = state;
                instance.version = snapshot.version;
            }
            Err(error) => tracing::warn!(%stream_id, %error, "ignoring undecodable snapshot; replaying the stream"),
        }
        Ok(())
    }

    /// Saves a snapshot if the instance's version crossed a multiple of the policy's interval.
    /// A failure only costs load time later, so it is logged, not returned.
    async fn maybe_snapshot(&self, stream_id: &StreamId, previous: Version, instance: &Instance<A>) {
        let Some(policy) = &self.snapshots else { return };
        if instance.version.0 / policy.every == previous.0 / policy.every {
            return;
        }
        let state = match (policy.encode)(&instance.state) {
            Ok(state) => state,
            Err(error) => return tracing::warn!(%stream_id, %error, "cannot serialize snapshot"),
        };
        let snapshot = Snapshot {
            stream_id: stream_id.clone(),
            version: instance.version,
            schema_version: policy.schema_version,
            state,
        };
        if let Err(error) = self.store.save_snapshot(snapshot).await {
            tracing::warn!(%stream_id, %error, "saving snapshot failed");
        }
    }

    /// The outcome of the first handling of this command id, if it was stored before.
    async fn previous_outcome(
        &self,
        stream_id: &StreamId,
        envelope: &CommandEnvelope<A::Command>,
    ) -> Result<Option<DispatchOutcome>, DispatchError<A::Error>> {
        let first = self.store.find_command(stream_id, envelope.command_id).await?;
        Ok(first.map(|first| self.outcome(stream_id, envelope, Some(first), first.last_version, true)))
    }

    fn outcome(
        &self,
        stream_id: &StreamId,
        envelope: &CommandEnvelope<A::Command>,
        appended: Option<AppendResult>,
        version: Version,
        duplicate: bool,
    ) -> DispatchOutcome {
        DispatchOutcome { stream_id: stream_id.clone(), command_id: envelope.command_id, appended, version, duplicate }
    }
}

/// A random pause of up to 2^attempts ms, capped at 50 ms.
fn conflict_backoff(attempts: u32) -> Duration {
    use std::hash::BuildHasher;
    let ceiling_ms = (1u64 << attempts.min(6)).min(50);
    // RandomState is freshly keyed per call: a cheap source of jitter without a rand dependency.
    let random = std::collections::hash_map::RandomState::new().hash_one(attempts);
    Duration::from_millis(random % (ceiling_ms + 1))
}

impl<C> From<C> for CommandEnvelope<C>
where
    C: Command,
{
    fn from(command: C) -> Self {
        CommandEnvelope::new(command)
    }
}

/// A failed follow-up command is a handler failure: `dispatcher.dispatch(cmd).await?` works in
/// [`EventHandler::handle`](crate::EventHandler::handle).
impl<E: std::error::Error + Send + Sync + 'static> From<DispatchError<E>> for HandlerError {
    fn from(error: DispatchError<E>) -> Self {
        Self::new(error)
    }
}
