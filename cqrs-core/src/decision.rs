//! Decisions: command handlers whose consistency boundary is a [`Query`] over tagged events
//! (Dynamic Consistency Boundaries), beside [`Aggregate`](crate::Aggregate)s whose boundary is
//! one stream, over the same store.
//!
//! A [`Decision`] names the events its command depends on ([`Decision::query`]), folds them into
//! its state ([`Decision::apply`]) and decides new events ([`Decision::decide`]). The
//! [`Decider`] reads the matching events, decides, and appends with the condition "fail if an
//! event matching the query was stored after the last position I read"; on a failed condition
//! it reads the newer events and decides again, a bounded number of times. Command ids,
//! telemetry and read-your-writes work as for aggregates.
//!
//! Pick an aggregate when one entity owns its rules (an account's balance, a chat room's
//! messages); pick a decision when a rule spans entities (a course's capacity and a student's
//! course limit in one decision, a unique user name, gapless invoice numbers).
//!
//! ```
//! use std::sync::Arc;
//! use cqrs_core::{CommandEnvelope, Decider, Decision, DomainEvent, Query, QueryItem, StreamId, StreamIdError, Tag};
//! use cqrs_memory::MemoryStore;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
//! #[event(category = "*")]
//! enum UserEvent {
//!     UserRegistered { #[event(tag = "username")] name: String },
//! }
//!
//! /// A user name is taken once.
//! #[derive(Debug, Default, Clone)]
//! struct Register { taken: bool }
//!
//! #[derive(Debug, thiserror::Error)]
//! #[error("the name is taken")]
//! struct Taken;
//!
//! impl Decision for Register {
//!     const NAME: &'static str = "register";
//!     type Command = String;
//!     type Event = UserEvent;
//!     type Error = Taken;
//!     fn query(name: &String) -> Query {
//!         Query::from_items([QueryItem::types(["UserRegistered"]).with_tags([Tag::new("username", name)])])
//!     }
//!     fn stream_id(name: &String) -> Result<StreamId, StreamIdError> {
//!         StreamId::new(format!("user-{name}"))
//!     }
//!     fn decide(&self, name: &String) -> Result<Vec<UserEvent>, Taken> {
//!         if self.taken { return Err(Taken) }
//!         Ok(vec![UserEvent::UserRegistered { name: name.clone() }])
//!     }
//!     fn apply(self, _event: &UserEvent) -> Self {
//!         Register { taken: true }
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let decider = Decider::<Register, _>::new(Arc::new(MemoryStore::new()));
//! decider.decide(CommandEnvelope::new("ada".to_owned())).await.expect("free");
//! assert!(decider.decide(CommandEnvelope::new("ada".to_owned())).await.is_err());
//! # }
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use tracing::Instrument;

use crate::aggregate::CommandEnvelope;
use crate::dispatcher::{check_handlers, encode_events, record_outcome, wait_for_handlers, DispatchMetrics};
use crate::dispatcher::{Consistency, DispatchError, DispatchOutcome};
use crate::event::{DomainEvent, Upcasters};
use crate::handler::Progress;
use crate::ids::{Position, StreamId, StreamIdError};
use crate::query::{AppendCondition, Query};
use crate::store::{AppendOutcome, EventStore, ExpectedVersion, StoreError};

/// A command handler whose consistency boundary is a query (see the [module docs](self)).
///
/// Like [`Aggregate`](crate::Aggregate), its functions are pure: the state is folded from the
/// events the query matches, in log order, and the decision is made on it.
pub trait Decision: Default + Clone + Send + Sync + 'static {
    /// A name for telemetry (the `category` label of the dispatch metrics).
    const NAME: &'static str;
    /// The commands it decides.
    type Command: Send + Sync + 'static;
    /// The events it reads and writes. Events the query matches whose type this type does not
    /// declare ([`DomainEvent::EVENT_TYPES`]) are passed over.
    type Event: DomainEvent;
    /// Its domain errors: the command is refused and nothing is stored.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The events the decision on `command` depends on.
    fn query(command: &Self::Command) -> Query;

    /// The stream its events are stored in (and its command ids remembered for). Any stream
    /// works; consistency comes from the query, not the stream.
    fn stream_id(command: &Self::Command) -> Result<StreamId, StreamIdError>;

    /// Decides: the events `command` produces in this state, or why it is refused.
    fn decide(&self, command: &Self::Command) -> Result<Vec<Self::Event>, Self::Error>;

    /// Evolves: the state after one matching event.
    fn apply(self, event: &Self::Event) -> Self;
}

/// Runs [`Decision`]s against a store: read by query, decide, append with a condition, retry.
///
/// Cheap to clone.
pub struct Decider<D: Decision, S: EventStore + ?Sized> {
    store: Arc<S>,
    upcasters: Upcasters,
    progress: Progress,
    max_conflict_retries: u32,
    page_size: usize,
    metrics: DispatchMetrics,
    _decision: std::marker::PhantomData<fn() -> D>,
}

impl<D: Decision, S: EventStore + ?Sized> Clone for Decider<D, S> {
    fn clone(&self) -> Self {
        Self {
            store: Arc::clone(&self.store),
            upcasters: self.upcasters.clone(),
            progress: self.progress.clone(),
            max_conflict_retries: self.max_conflict_retries,
            page_size: self.page_size,
            metrics: self.metrics.clone(),
            _decision: std::marker::PhantomData,
        }
    }
}

impl<D: Decision, S: EventStore + ?Sized> fmt::Debug for Decider<D, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Decider").field("decision", &D::NAME).finish()
    }
}

/// What a decision read: its state and the position its condition starts after.
struct Facts<D> {
    state: D,
    after: Position,
}

impl<D: Decision, S: EventStore + ?Sized> Decider<D, S> {
    /// A decider retrying a failed condition up to 10 times.
    pub fn new(store: Arc<S>) -> Self {
        Self {
            store,
            upcasters: Upcasters::new(),
            progress: Progress::new(),
            max_conflict_retries: 10,
            page_size: 1_000,
            metrics: DispatchMetrics::new(D::NAME),
            _decision: std::marker::PhantomData,
        }
    }

    /// Uses these upcasters when reading stored events.
    #[must_use]
    pub fn with_upcasters(mut self, upcasters: Upcasters) -> Self {
        self.upcasters = upcasters;
        self
    }

    /// Uses this progress registry for [`Consistency::Strong`].
    #[must_use]
    pub fn with_progress(mut self, progress: Progress) -> Self {
        self.progress = progress;
        self
    }

    /// How many times a decision is made again after a failed condition before
    /// [`DispatchError::TooManyConflicts`].
    #[must_use]
    pub fn with_max_conflict_retries(mut self, retries: u32) -> Self {
        self.max_conflict_retries = retries;
        self
    }

    /// Decides a command with eventual consistency.
    pub async fn decide(
        &self,
        command: impl Into<CommandEnvelope<D::Command>>,
    ) -> Result<DispatchOutcome, DispatchError<D::Error>> {
        self.decide_with(command.into(), &Consistency::Eventual).await
    }

    /// Decides a command and, with [`Consistency::Strong`], waits for the named handlers.
    pub async fn decide_with(
        &self,
        envelope: CommandEnvelope<D::Command>,
        consistency: &Consistency,
    ) -> Result<DispatchOutcome, DispatchError<D::Error>> {
        let started = Instant::now();
        let span = tracing::info_span!(
            "decide",
            decision = D::NAME,
            command_id = %envelope.command_id,
            correlation_id = ?envelope.correlation_id,
            attempts = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        check_handlers(&self.progress, consistency)?;
        let result = self.run(&envelope).instrument(span.clone()).await;
        record_outcome(&self.metrics, &span, started, &result);
        wait_for_handlers(&self.progress, consistency, result?).await
    }

    /// Reads, decides and appends, deciding again after each failed condition.
    async fn run(&self, envelope: &CommandEnvelope<D::Command>) -> Result<DispatchOutcome, DispatchError<D::Error>> {
        let stream_id = D::stream_id(&envelope.command).map_err(DispatchError::InvalidStreamId)?;
        let query = D::query(&envelope.command);
        let mut facts = Facts { state: D::default(), after: Position::START };
        self.read_newer(&query, &mut facts).await?;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            tracing::Span::current().record("attempts", attempts);
            let events = match facts.state.decide(&envelope.command) {
                Ok(events) if !events.is_empty() => events,
                decision => {
                    // A repeated command may be refused in the state it produced itself.
                    if let Some(first) = self.store.find_command(&stream_id, envelope.command_id).await? {
                        return Ok(outcome(&stream_id, envelope, Some(first), true));
                    }
                    return match decision {
                        Ok(_) => Ok(outcome(&stream_id, envelope, None, false)),
                        Err(rejection) => Err(DispatchError::Rejected(rejection)),
                    };
                }
            };
            let new_events = encode_events(&events, envelope, D::NAME, |_| true)?;
            let condition = AppendCondition::new(query.clone(), Some(facts.after));
            let answer =
                self.store.append_with_condition(&stream_id, ExpectedVersion::Any, new_events, Some(condition)).await;
            match answer {
                Ok(AppendOutcome::Appended(appended)) => {
                    return Ok(outcome(&stream_id, envelope, Some(appended), false))
                }
                Ok(AppendOutcome::Duplicate(first)) => return Ok(outcome(&stream_id, envelope, Some(first), true)),
                Err(StoreError::ConditionFailed { position }) if attempts <= self.max_conflict_retries => {
                    tracing::debug!(decision = D::NAME, %position, attempts, "condition failed, deciding again");
                    metrics::counter!("cqrs_command_conflicts_total", "category" => D::NAME).increment(1);
                    self.read_newer(&query, &mut facts).await?;
                }
                Err(StoreError::ConditionFailed { .. }) => {
                    return Err(DispatchError::TooManyConflicts { stream_id, attempts });
                }
                Err(error) => return Err(DispatchError::Store(error)),
            }
        }
    }

    /// Folds the events `query` matches after `facts.after` into the state, and moves `after`
    /// to the newest position read (or the head, when it is newer: every event up to the head
    /// that matches has then been read).
    async fn read_newer(&self, query: &Query, facts: &mut Facts<D>) -> Result<(), DispatchError<D::Error>> {
        let head = self.store.head().await?;
        loop {
            let page = self.store.read_query(query, facts.after, self.page_size).await?;
            let Some(last) = page.last() else { break };
            let last = last.position;
            for recorded in &page {
                if !D::Event::EVENT_TYPES.contains(&&*recorded.event_type) {
                    continue;
                }
                let event = self.upcasters.decode_payload::<D::Event>(recorded)?;
                facts.state = std::mem::take(&mut facts.state).apply(&event);
            }
            facts.after = last;
            if page.len() < self.page_size {
                break;
            }
        }
        facts.after = facts.after.max(head);
        Ok(())
    }
}

fn outcome<C>(
    stream_id: &StreamId,
    envelope: &CommandEnvelope<C>,
    appended: Option<crate::store::AppendResult>,
    duplicate: bool,
) -> DispatchOutcome {
    DispatchOutcome {
        stream_id: stream_id.clone(),
        command_id: envelope.command_id,
        appended,
        version: appended.map_or(crate::ids::Version::NONE, |appended| appended.last_version),
        duplicate,
    }
}
