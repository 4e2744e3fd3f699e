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

mod batch;
mod decide;

pub(crate) use decide::encode_events;
mod load;
mod slots;

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;
use tracing::Instrument;

use self::slots::InstanceSlot;
use crate::aggregate::{Aggregate, Command, CommandEnvelope};
use crate::cache::LruCache;
use crate::event::{DecodeError, Upcasters};
use crate::handler::{HandlerError, Progress, ProgressError};
use crate::ids::{CommandId, StreamId, StreamIdError, Version};
use crate::store::{AppendResult, EventStore, StoreError};

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
    /// aggregate's category ([`DomainEvent::accepts`](crate::event::DomainEvent::accepts)):
    /// handlers would never see it, so it was not stored. A bug in a hand-written
    /// [`DomainEvent`](crate::event::DomainEvent) impl (the derive cannot make it).
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
    metrics: DispatchMetrics,
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
            metrics: self.metrics.clone(),
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
            metrics: DispatchMetrics::new(A::CATEGORY),
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
        record_outcome(&self.metrics, &span, started, &result);
        wait_for_handlers(&self.progress, consistency, result?).await
    }

    /// Routes, decides and stores one command (inside its `dispatch` span).
    async fn decide_and_store(
        &self,
        envelope: &Arc<CommandEnvelope<A::Command>>,
        consistency: &Consistency,
    ) -> Result<DispatchOutcome, DispatchError<A::Error>> {
        let stream_id = envelope.command.stream_id().map_err(DispatchError::InvalidStreamId)?;
        tracing::Span::current().record("stream", tracing::field::display(&stream_id));
        check_handlers(&self.progress, consistency)?;
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
        self.wait_in_queue(&stream_id, &slot, envelope).await
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

    /// How many aggregate instances are warm in the cache.
    pub fn cached_instances(&self) -> usize {
        self.instances.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len()
    }
}

/// Refuses a [`Consistency::Strong`] that names a handler no runner reports to `progress`.
pub(crate) fn check_handlers<E: std::error::Error + 'static>(
    progress: &Progress,
    consistency: &Consistency,
) -> Result<(), DispatchError<E>> {
    if let Consistency::Strong { handlers, .. } = consistency {
        if let Some(unknown) = handlers.iter().find(|name| !progress.is_registered(name)) {
            return Err(DispatchError::UnknownHandler(unknown.clone()));
        }
    }
    Ok(())
}

/// The outcomes `cqrs_commands_total` counts, in [`DispatchMetrics`]'s order.
const OUTCOMES: [&str; 7] = ["duplicate", "no_events", "stored", "rejected", "invalid", "too_many_conflicts", "error"];

/// One aggregate category's dispatch metrics, registered once when its dispatcher (or decider)
/// is built, with the recorder installed then (as handlers' metrics are when spawned): a
/// metric with a label that is not a literal would otherwise build its key, a heap-allocated
/// label list, on every command.
#[derive(Clone)]
pub(crate) struct DispatchMetrics {
    commands: Arc<[metrics::Counter; OUTCOMES.len()]>,
    duration: metrics::Histogram,
}

impl DispatchMetrics {
    pub(crate) fn new(category: &'static str) -> Self {
        Self {
            commands: Arc::new(
                OUTCOMES.map(
                    |outcome| metrics::counter!("cqrs_commands_total", "category" => category, "outcome" => outcome),
                ),
            ),
            duration: metrics::histogram!("cqrs_dispatch_duration_seconds", "category" => category),
        }
    }
}

/// Records a command's outcome on its span and in its category's dispatch metrics.
pub(crate) fn record_outcome<E: std::error::Error + 'static>(
    metrics: &DispatchMetrics,
    span: &tracing::Span,
    started: Instant,
    result: &Result<DispatchOutcome, DispatchError<E>>,
) {
    let index = match result {
        Ok(outcome) if outcome.duplicate => 0,
        Ok(outcome) if outcome.appended.is_none() => 1,
        Ok(_) => 2,
        Err(DispatchError::Rejected(_)) => 3,
        Err(
            DispatchError::InvalidStreamId(_)
            | DispatchError::UnknownHandler(_)
            | DispatchError::UndeclaredEventType { .. },
        ) => 4,
        Err(DispatchError::TooManyConflicts { .. }) => 5,
        Err(_) => 6,
    };
    span.record("outcome", OUTCOMES[index]);
    metrics.commands[index].increment(1);
    metrics.duration.record(started.elapsed().as_secs_f64());
}

/// With [`Consistency::Strong`], waits until every named handler has passed the outcome's
/// events (read-your-writes); else returns at once.
pub(crate) async fn wait_for_handlers<E: std::error::Error + 'static>(
    progress: &Progress,
    consistency: &Consistency,
    outcome: DispatchOutcome,
) -> Result<DispatchOutcome, DispatchError<E>> {
    if let (Consistency::Strong { handlers, timeout }, Some(appended)) = (consistency, outcome.appended) {
        for handler in handlers {
            if let Err(source) = progress.wait_for(handler, appended.last_position, *timeout).await {
                return Err(DispatchError::ConsistencyTimeout { outcome: Box::new(outcome), source });
            }
        }
    }
    Ok(outcome)
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
