//! The dispatcher's instance slots: one per warm aggregate instance, holding its state behind
//! the async mutex that serialises its commands, and the commands waiting for that mutex.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;
use tokio::sync::Mutex as AsyncMutex;

use super::{DispatchError, DispatchOutcome, Dispatcher};
use crate::aggregate::{Aggregate, CommandEnvelope};
use crate::ids::{StreamId, Version};
use crate::store::EventStore;

/// One aggregate instance kept warm: its state and the version it reflects.
#[derive(Debug, Default)]
pub(super) struct Instance<A> {
    pub(super) state: A,
    pub(super) version: Version,
    pub(super) loaded: bool,
}

impl<A: Aggregate> Instance<A> {
    /// Replaces the state by `evolve(state)` and sets the version. If `evolve` panics (a bug
    /// in `apply`), the instance is left empty and unloaded, so the next command reloads it
    /// from the store instead of deciding on a half-applied state.
    pub(super) fn evolve(&mut self, evolve: impl FnOnce(A) -> A, version: Version) {
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
pub(super) struct Slot<A: Aggregate> {
    pub(super) instance: AsyncMutex<Instance<A>>,
    pub(super) stale: AtomicBool,
    pub(super) waiting: Mutex<Vec<Job<A>>>,
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

pub(super) type Answer<A> = Result<DispatchOutcome, DispatchError<<A as Aggregate>::Error>>;

/// A command waiting for its instance's mutex, and where its answer goes if the command
/// holding the mutex handles it in its batch.
pub(super) struct Job<A: Aggregate> {
    pub(super) envelope: Arc<CommandEnvelope<A::Command>>,
    pub(super) reply: oneshot::Sender<Answer<A>>,
}

pub(super) type InstanceSlot<A> = Arc<Slot<A>>;

impl<A: Aggregate, S: EventStore + ?Sized> Dispatcher<A, S> {
    pub(super) fn waiting(slot: &Slot<A>) -> std::sync::MutexGuard<'_, Vec<Job<A>>> {
        slot.waiting.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Locks a slot's instance; an instance marked stale by [`clear_cache`](Self::clear_cache)
    /// is emptied first, so it is reloaded.
    pub(super) async fn lock(slot: &Slot<A>) -> tokio::sync::MutexGuard<'_, Instance<A>> {
        Self::fresh(slot, slot.instance.lock().await)
    }

    /// The instance behind a just-taken lock, reset if [`Dispatcher::clear_cache`] marked it.
    pub(super) fn fresh<'a>(
        slot: &Slot<A>,
        mut instance: tokio::sync::MutexGuard<'a, Instance<A>>,
    ) -> tokio::sync::MutexGuard<'a, Instance<A>> {
        if slot.stale.swap(false, Ordering::AcqRel) {
            *instance = Instance::default();
        }
        instance
    }

    pub(super) fn slot(&self, stream_id: &StreamId) -> InstanceSlot<A> {
        let mut instances = self.instances.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // An instance whose slot is held elsewhere (a command is running on it) stays cached:
        // evicting it would let a second slot for the same stream run concurrently.
        instances.get_or_insert_with(stream_id, || Arc::new(Slot::default()), |slot| Arc::strong_count(slot) == 1)
    }
}
