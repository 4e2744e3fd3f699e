//! Deciding one command on its instance and appending its events, retrying on conflicts.

use std::time::Duration;

use super::slots::Instance;
use super::{DispatchError, DispatchOutcome, Dispatcher};
use crate::aggregate::{Aggregate, CommandEnvelope};
use crate::event::{DomainEvent, NewEvent};
use crate::ids::{StreamId, Version};
use crate::store::{AppendOutcome, AppendResult, EventStore, ExpectedVersion, StoreError};

impl<A: Aggregate, S: EventStore + ?Sized> Dispatcher<A, S> {
    /// Decides and appends, retrying on conflicts. The caller holds the instance lock.
    ///
    /// A decision that stores nothing (a refusal, or no events) is trusted only when it was
    /// made on state read from the store during this call; on cached state the instance first
    /// catches up, and if another writer had moved it, decides again. A decision that stores
    /// events needs no such check: the append's expected version catches stale state.
    pub(super) async fn run(
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
                    self.lost_race(stream_id, instance, attempts).await?;
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

    /// Another writer appended to the stream first: catches up, to decide again.
    async fn lost_race(
        &self,
        stream_id: &StreamId,
        instance: &mut Instance<A>,
        attempts: u32,
    ) -> Result<(), DispatchError<A::Error>> {
        tracing::debug!(%stream_id, attempts, "version conflict, catching up and deciding again");
        metrics::counter!("cqrs_command_conflicts_total", "category" => A::CATEGORY).increment(1);
        if attempts > 1 {
            // Repeated losses: another process keeps winning the race for this stream. A short
            // random pause breaks the lockstep.
            tokio::time::sleep(conflict_backoff(attempts)).await;
        }
        self.catch_up(stream_id, instance).await?;
        Ok(())
    }

    /// Serializes the events a command produced, refusing any its event type does not declare
    /// for this aggregate's category (handlers would silently pass it over).
    pub(super) fn encode(
        events: &[A::Event],
        envelope: &CommandEnvelope<A::Command>,
    ) -> Result<Vec<NewEvent>, DispatchError<A::Error>> {
        encode_events(events, envelope, A::CATEGORY, |event_type| A::Event::accepts(A::CATEGORY, event_type))
    }

    /// The outcome of the first handling of this command id, if it was stored before.
    pub(super) async fn previous_outcome(
        &self,
        stream_id: &StreamId,
        envelope: &CommandEnvelope<A::Command>,
    ) -> Result<Option<DispatchOutcome>, DispatchError<A::Error>> {
        let first = self.store.find_command(stream_id, envelope.command_id).await?;
        Ok(first.map(|first| self.outcome(stream_id, envelope, Some(first), first.last_version, true)))
    }

    pub(super) fn outcome(
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

/// Encodes `events` with the command's metadata (and the trace context), refusing any whose
/// type `E` does not declare or `accepted` refuses: the dispatcher's and the decider's encoding.
pub(crate) fn encode_events<E: DomainEvent, C, Err: std::error::Error + 'static>(
    events: &[E],
    envelope: &CommandEnvelope<C>,
    category: &'static str,
    accepted: impl Fn(&str) -> bool,
) -> Result<Vec<NewEvent>, DispatchError<Err>> {
    let mut metadata = envelope.event_metadata();
    if let Some(propagation) = crate::telemetry::trace_context() {
        propagation.inject(&mut metadata.headers);
    }
    events
        .iter()
        .map(|event| {
            let event_type = event.event_type();
            if !E::EVENT_TYPES.contains(&event_type) || !accepted(event_type) {
                return Err(DispatchError::UndeclaredEventType { event_type, category });
            }
            NewEvent::from_domain(event, metadata.clone()).map_err(DispatchError::Encode)
        })
        .collect()
}

/// A random pause of up to 2^attempts ms, capped at 50 ms.
fn conflict_backoff(attempts: u32) -> Duration {
    use std::hash::BuildHasher;
    let ceiling_ms = (1u64 << attempts.min(6)).min(50);
    // RandomState is freshly keyed per call: a cheap source of jitter without a rand dependency.
    let random = std::collections::hash_map::RandomState::new().hash_one(attempts);
    Duration::from_millis(random % (ceiling_ms + 1))
}
