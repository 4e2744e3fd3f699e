//! Hot-instance batching: the command holding an instance's mutex takes the commands queued
//! for it, decides them one after another and stores them with one
//! [`EventStore::append_chain`](crate::store::EventStore::append_chain) (see the module docs
//! of [`dispatcher`](super)).

use std::sync::Arc;

use tokio::sync::oneshot;

use super::slots::{Answer, Instance, Job, Slot};
use super::{DispatchError, DispatchOutcome, Dispatcher};
use crate::aggregate::{Aggregate, CommandEnvelope};
use crate::event::NewEvent;
use crate::ids::StreamId;
use crate::store::{AppendOutcome, EventStore, StoreError};

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

impl<A: Aggregate, S: EventStore + ?Sized> Dispatcher<A, S> {
    /// Queues a command behind the one running on its instance, then either takes its answer
    /// (decided in that command's batch) or runs it, with the commands queued behind it as
    /// a batch.
    pub(super) async fn wait_in_queue(
        &self,
        stream_id: &StreamId,
        slot: &Slot<A>,
        envelope: &Arc<CommandEnvelope<A::Command>>,
    ) -> Answer<A> {
        let (reply, mut answer) = oneshot::channel();
        Self::waiting(slot).push(Job { envelope: Arc::clone(envelope), reply });
        // If this future is dropped while waiting, the command leaves the queue (unless a batch
        // already took it): a dispatch dropped before it ran is not run later by another.
        let queued = Queued { slot, envelope };
        let mut instance = Self::lock(slot).await;
        std::mem::forget(queued);
        match answer.try_recv() {
            // Decided and stored by the command before us, in its batch.
            Ok(answer) => return answer,
            // Taken into a batch whose command was dropped before answering: run it here (its
            // append may have happened; its command id makes a second one a duplicate).
            Err(oneshot::error::TryRecvError::Closed) => return self.run(stream_id, &mut instance, envelope).await,
            Err(oneshot::error::TryRecvError::Empty) => {}
        }
        // Ours is still waiting, so it is among these: take it and those queued behind it.
        let jobs: Vec<Job<A>> = {
            let mut waiting = Self::waiting(slot);
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
            return self.run(stream_id, &mut instance, envelope).await;
        }
        self.run_batch(stream_id, &mut instance, jobs).await
    }

    /// Decides `jobs` (the first is the caller's) one after another on the state each leaves,
    /// stores those that produce events with one [`EventStore::append_chain`], then runs the
    /// rest one by one; answers the others through their replies and returns the first's.
    pub(super) async fn run_batch(
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
        let (planned, links) = Self::plan(instance.state.clone(), jobs, &mut answers, &mut deferred);
        if !planned.is_empty() {
            self.store_planned(stream_id, instance, planned, links, &mut answers, &mut deferred).await;
        }
        for job in deferred {
            let answer = self.run(stream_id, instance, &job.envelope).await;
            answers.push((job, answer));
        }
        Self::reply(&own, answers)
    }

    /// Decides the jobs one after another, each on the state the previous ones leave: those
    /// that produce events are planned (returned with their encoded links, in order), those
    /// whose events cannot be encoded are answered, and those that store nothing are deferred.
    fn plan(
        mut state: A,
        jobs: Vec<Job<A>>,
        answers: &mut Vec<(Job<A>, Answer<A>)>,
        deferred: &mut Vec<Job<A>>,
    ) -> (Vec<Planned<A>>, Vec<Vec<NewEvent>>) {
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
        (planned, links)
    }

    /// Stores the planned links with one [`EventStore::append_chain`] and answers each planned
    /// job from its link's result (a conflicting one is deferred). The instance takes the new
    /// state only if every link was stored after the ones before it; otherwise it is emptied.
    async fn store_planned(
        &self,
        stream_id: &StreamId,
        instance: &mut Instance<A>,
        planned: Vec<Planned<A>>,
        links: Vec<Vec<NewEvent>>,
        answers: &mut Vec<(Job<A>, Answer<A>)>,
        deferred: &mut Vec<Job<A>>,
    ) {
        let start = instance.version;
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

    /// Sends each answer to its waiting caller and returns the one for `own`.
    fn reply(own: &Arc<CommandEnvelope<A::Command>>, answers: Vec<(Job<A>, Answer<A>)>) -> Answer<A> {
        let mut own_answer = None;
        for (job, answer) in answers {
            if Arc::ptr_eq(&job.envelope, own) {
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
}
