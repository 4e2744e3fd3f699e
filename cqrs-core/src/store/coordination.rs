//! The [`Coordination`] trait: what handler runners, process managers and schedulers keep in
//! the store beside the event log, and [`Store`], a store that keeps both.

use std::time::Duration;

use async_trait::async_trait;

use crate::coordination::{
    Claim, ClaimOutcome, ParkedEvent, ParkedStatus, ProcessInstance, ProcessState, Scheduled, SetAsideCommand,
};
use crate::ids::{CommandId, Position, Timestamp};
use crate::store::{EventStore, StoreError};

/// What handler runners, process managers and schedulers keep beside the event log: claims
/// (one active consumer per handler across processes), checkpoints fenced by a claim, parked
/// events, process-manager state and scheduled commands.
///
/// A backend implements it next to [`EventStore`]; together they make a [`Store`], which is
/// what [`spawn_handler`](crate::spawn_handler), [`spawn_process_manager`](crate::spawn_process_manager)
/// and the admin handles ([`ParkedEvents`](crate::ParkedEvents), [`ProcessAdmin`](crate::ProcessAdmin))
/// need. A decorator (a test's fault injector, an instrumenting wrapper) implements it by
/// forwarding each method to the store it wraps; one that implements only [`EventStore`] can
/// serve a [`Dispatcher`](crate::Dispatcher) or a [`Subscription`](crate::Subscription) but not a
/// runner, and using it for one is a compile error.
///
/// Contract, checked by [`crate::testing::conformance`] for every backend: a claim has one
/// holder at a time and lapses by the store's own clock (the database's, for a shared store);
/// every write fenced by a claim is atomic with its check of the claim, and writes nothing
/// once the claim is lost.
///
/// Object-safe like [`EventStore`], and written with [`macro@async_trait`] for the same reason.
#[async_trait]
pub trait Coordination: Send + Sync + 'static {
    /// Takes or renews the claim on `name` for `owner`, lasting `ttl` from now by the store's
    /// own clock (the database's, for a shared store), so that at most one process at a time
    /// is the active consumer of a handler. Held by `owner` and not expired: renewed (same
    /// token). Expired, released or never taken: taken (a new, larger token). Held by another
    /// owner and not expired: [`ClaimOutcome::Taken`].
    async fn claim(&self, name: &str, owner: &str, ttl: Duration) -> Result<ClaimOutcome, StoreError>;

    /// Gives a claim up (if `claim`'s owner and token still hold it), so a standby can take
    /// over at once instead of waiting for it to expire.
    async fn release_claim(&self, claim: &Claim) -> Result<(), StoreError>;

    /// The claims currently held (not expired), by name.
    async fn claims(&self) -> Result<Vec<Claim>, StoreError>;

    /// Saves checkpoint `name` if `claim` is still held (same owner and token, not expired),
    /// atomically with that check; otherwise writes nothing and fails with
    /// [`StoreError::ClaimLost`]. A process that lost its claim cannot move the checkpoint.
    async fn save_checkpoint_claimed(&self, name: &str, position: Position, claim: &Claim) -> Result<(), StoreError>;

    /// Stores a parked event (replacing one of the same handler and position). With `fence`,
    /// only while that claim is held, atomically with the check (else
    /// [`StoreError::ClaimLost`], nothing written): a runner's park that lands after its lease
    /// ended must not block a sequence the next holder has already handled.
    async fn park(&self, event: ParkedEvent, fence: Option<&Claim>) -> Result<(), StoreError>;

    /// The events `handler` has parked, in position order.
    async fn parked(&self, handler: &str) -> Result<Vec<ParkedEvent>, StoreError>;

    /// Sets a parked event's status (an operator asks for a retry, or the handler's retry
    /// failed); false if no such parked event (it never inserts one). `fence` as for
    /// [`park`](Coordination::park); operators pass `None`.
    async fn set_parked_status(
        &self,
        handler: &str,
        position: Position,
        status: ParkedStatus,
        fence: Option<&Claim>,
    ) -> Result<bool, StoreError>;

    /// Records that a retry of a parked event failed with `error`: its error is replaced, its
    /// attempts counted one more and its status set back to [`ParkedStatus::Parked`]. Only
    /// updates: false if the event is no longer parked (an operator discarded it meanwhile,
    /// which this must never undo). `fence` as for [`park`](Coordination::park).
    async fn parked_retry_failed(
        &self,
        handler: &str,
        position: Position,
        error: &str,
        fence: Option<&Claim>,
    ) -> Result<bool, StoreError>;

    /// Removes a parked event (handled after a retry, or discarded by an operator); false if
    /// there was none. `fence` as for [`park`](Coordination::park); operators pass `None`.
    async fn unpark(&self, handler: &str, position: Position, fence: Option<&Claim>) -> Result<bool, StoreError>;

    /// A process manager instance's state.
    async fn load_process(&self, process: &str, key: &str) -> Result<Option<ProcessState>, StoreError>;

    /// Saves (or, with `None`, deletes) a process manager instance's state (running, or the
    /// tombstone of an ended one: [`ProcessState::ended`]). With `fence`, only
    /// while that claim is held (else [`StoreError::ClaimLost`], nothing written).
    async fn save_process(
        &self,
        process: &str,
        key: &str,
        state: Option<&ProcessState>,
        fence: Option<&Claim>,
    ) -> Result<(), StoreError>;

    /// Up to `max` of `process`'s instances (running, and ended ones not yet pruned) with keys
    /// after `after` (from the first without), in key order: page with the last key.
    async fn process_instances(
        &self,
        process: &str,
        after: Option<&str>,
        max: usize,
    ) -> Result<Vec<ProcessInstance>, StoreError>;

    /// Removes the tombstones of `process`'s ended instances at or below `position` (its saved
    /// checkpoint: no replay reaches them); returns how many. Running instances are kept.
    async fn prune_processes(&self, process: &str, position: Position) -> Result<u64, StoreError>;

    /// Stores a scheduled command, replacing one with the same owner, key and name.
    async fn schedule(&self, scheduled: Scheduled) -> Result<(), StoreError>;

    /// Removes a scheduled command (fired, or cancelled); false if there was none. With
    /// `only`, only if it is still the one with that command id (not scheduled anew since).
    async fn unschedule(&self, owner: &str, key: &str, name: &str, only: Option<CommandId>)
        -> Result<bool, StoreError>;

    /// Up to `max` of `owner`'s scheduled commands due at `now`, earliest first; set-aside ones
    /// are not due.
    async fn due(&self, owner: &str, now: Timestamp, max: usize) -> Result<Vec<Scheduled>, StoreError>;

    /// Records a failed firing of `scheduled` with `error`, if it is still the one with that
    /// command id (not scheduled anew since); false otherwise. With `retry_at`: one more
    /// attempt, due again at `retry_at`. Without: set aside (not due until retried).
    async fn scheduled_failed(
        &self,
        scheduled: &Scheduled,
        error: &str,
        retry_at: Option<Timestamp>,
    ) -> Result<bool, StoreError>;

    /// `owner`'s set-aside scheduled commands, by key and name.
    async fn set_aside_scheduled(&self, owner: &str) -> Result<Vec<SetAsideCommand>, StoreError>;

    /// Makes a set-aside scheduled command due again (at its due time, attempts reset); false
    /// if there is no such set-aside command.
    async fn retry_scheduled(&self, owner: &str, key: &str, name: &str) -> Result<bool, StoreError>;
}

/// A store with both the event log and coordination: what handler runners and process managers
/// need. Every type that implements [`EventStore`] and [`Coordination`] is a `Store` (blanket
/// implementation); implement those two, never this one.
///
/// Object-safe, so an application that picks its store at run time holds an `Arc<dyn Store>`;
/// an `Arc<dyn Store>` (or `&dyn Store`) coerces to `Arc<dyn EventStore>` where only the log is
/// needed.
///
/// A store that keeps only the log cannot be given to what needs coordination; that is a
/// compile error, not a failure at run time:
///
/// ```compile_fail,E0277
/// # use std::sync::Arc;
/// # use cqrs_core::{EventStore, ParkedEvents};
/// async fn list<S: EventStore>(store: Arc<S>) {
///     let _ = ParkedEvents::new(store).list("mailer").await; // needs `S: Store`
/// }
/// ```
pub trait Store: EventStore + Coordination {}

impl<T: EventStore + Coordination + ?Sized> Store for T {}

/// Implements [`Coordination`] for a decorator by forwarding every method to one of its
/// fields: a fault injector or a store that carries a guard, which changes only the
/// [`EventStore`] side. `impl [generics] Type => field`, the generics without their angle
/// brackets (leave the brackets out when there are none). A decorator that changes some
/// coordination methods writes its impl by hand.
///
/// ```
/// use std::sync::Arc;
/// use cqrs_core::store::{forward_coordination, Coordination};
///
/// /// Counts nothing yet; forwards coordination untouched.
/// struct Counting<S> {
///     inner: Arc<S>,
/// }
///
/// forward_coordination!(impl [S: Coordination] Counting<S> => inner);
/// ```
#[macro_export]
macro_rules! forward_coordination {
    (impl [$($generics:tt)*] $ty:ty => $field:ident) => {
        #[$crate::async_trait]
        impl<$($generics)*> $crate::store::Coordination for $ty {
            async fn claim(
                &self,
                name: &str,
                owner: &str,
                ttl: ::std::time::Duration,
            ) -> ::std::result::Result<$crate::ClaimOutcome, $crate::StoreError> {
                #[allow(unused_imports)]
                use $crate::store::Coordination as _;
                self.$field.claim(name, owner, ttl).await
            }

            async fn release_claim(&self, claim: &$crate::Claim) -> ::std::result::Result<(), $crate::StoreError> {
                #[allow(unused_imports)]
                use $crate::store::Coordination as _;
                self.$field.release_claim(claim).await
            }

            async fn claims(&self) -> ::std::result::Result<::std::vec::Vec<$crate::Claim>, $crate::StoreError> {
                #[allow(unused_imports)]
                use $crate::store::Coordination as _;
                self.$field.claims().await
            }

            async fn save_checkpoint_claimed(
                &self,
                name: &str,
                position: $crate::Position,
                claim: &$crate::Claim,
            ) -> ::std::result::Result<(), $crate::StoreError> {
                #[allow(unused_imports)]
                use $crate::store::Coordination as _;
                self.$field.save_checkpoint_claimed(name, position, claim).await
            }

            async fn park(
                &self,
                event: $crate::ParkedEvent,
                fence: ::std::option::Option<&$crate::Claim>,
            ) -> ::std::result::Result<(), $crate::StoreError> {
                #[allow(unused_imports)]
                use $crate::store::Coordination as _;
                self.$field.park(event, fence).await
            }

            async fn parked(
                &self,
                handler: &str,
            ) -> ::std::result::Result<::std::vec::Vec<$crate::ParkedEvent>, $crate::StoreError> {
                #[allow(unused_imports)]
                use $crate::store::Coordination as _;
                self.$field.parked(handler).await
            }

            async fn set_parked_status(
                &self,
                handler: &str,
                position: $crate::Position,
                status: $crate::ParkedStatus,
                fence: ::std::option::Option<&$crate::Claim>,
            ) -> ::std::result::Result<bool, $crate::StoreError> {
                #[allow(unused_imports)]
                use $crate::store::Coordination as _;
                self.$field.set_parked_status(handler, position, status, fence).await
            }

            async fn parked_retry_failed(
                &self,
                handler: &str,
                position: $crate::Position,
                error: &str,
                fence: ::std::option::Option<&$crate::Claim>,
            ) -> ::std::result::Result<bool, $crate::StoreError> {
                #[allow(unused_imports)]
                use $crate::store::Coordination as _;
                self.$field.parked_retry_failed(handler, position, error, fence).await
            }

            async fn unpark(
                &self,
                handler: &str,
                position: $crate::Position,
                fence: ::std::option::Option<&$crate::Claim>,
            ) -> ::std::result::Result<bool, $crate::StoreError> {
                #[allow(unused_imports)]
                use $crate::store::Coordination as _;
                self.$field.unpark(handler, position, fence).await
            }

            async fn load_process(
                &self,
                process: &str,
                key: &str,
            ) -> ::std::result::Result<::std::option::Option<$crate::ProcessState>, $crate::StoreError> {
                #[allow(unused_imports)]
                use $crate::store::Coordination as _;
                self.$field.load_process(process, key).await
            }

            async fn save_process(
                &self,
                process: &str,
                key: &str,
                state: ::std::option::Option<&$crate::ProcessState>,
                fence: ::std::option::Option<&$crate::Claim>,
            ) -> ::std::result::Result<(), $crate::StoreError> {
                #[allow(unused_imports)]
                use $crate::store::Coordination as _;
                self.$field.save_process(process, key, state, fence).await
            }

            async fn process_instances(
                &self,
                process: &str,
                after: ::std::option::Option<&str>,
                max: usize,
            ) -> ::std::result::Result<::std::vec::Vec<$crate::ProcessInstance>, $crate::StoreError> {
                #[allow(unused_imports)]
                use $crate::store::Coordination as _;
                self.$field.process_instances(process, after, max).await
            }

            async fn prune_processes(
                &self,
                process: &str,
                position: $crate::Position,
            ) -> ::std::result::Result<u64, $crate::StoreError> {
                #[allow(unused_imports)]
                use $crate::store::Coordination as _;
                self.$field.prune_processes(process, position).await
            }

            async fn schedule(&self, scheduled: $crate::Scheduled) -> ::std::result::Result<(), $crate::StoreError> {
                #[allow(unused_imports)]
                use $crate::store::Coordination as _;
                self.$field.schedule(scheduled).await
            }

            async fn unschedule(
                &self,
                owner: &str,
                key: &str,
                name: &str,
                only: ::std::option::Option<$crate::CommandId>,
            ) -> ::std::result::Result<bool, $crate::StoreError> {
                #[allow(unused_imports)]
                use $crate::store::Coordination as _;
                self.$field.unschedule(owner, key, name, only).await
            }

            async fn due(
                &self,
                owner: &str,
                now: $crate::Timestamp,
                max: usize,
            ) -> ::std::result::Result<::std::vec::Vec<$crate::Scheduled>, $crate::StoreError> {
                #[allow(unused_imports)]
                use $crate::store::Coordination as _;
                self.$field.due(owner, now, max).await
            }

            async fn scheduled_failed(
                &self,
                scheduled: &$crate::Scheduled,
                error: &str,
                retry_at: ::std::option::Option<$crate::Timestamp>,
            ) -> ::std::result::Result<bool, $crate::StoreError> {
                #[allow(unused_imports)]
                use $crate::store::Coordination as _;
                self.$field.scheduled_failed(scheduled, error, retry_at).await
            }

            async fn set_aside_scheduled(
                &self,
                owner: &str,
            ) -> ::std::result::Result<::std::vec::Vec<$crate::SetAsideCommand>, $crate::StoreError> {
                #[allow(unused_imports)]
                use $crate::store::Coordination as _;
                self.$field.set_aside_scheduled(owner).await
            }

            async fn retry_scheduled(
                &self,
                owner: &str,
                key: &str,
                name: &str,
            ) -> ::std::result::Result<bool, $crate::StoreError> {
                #[allow(unused_imports)]
                use $crate::store::Coordination as _;
                self.$field.retry_scheduled(owner, key, name).await
            }
        }
    };
    (impl $ty:ty => $field:ident) => {
        $crate::forward_coordination!(impl [] $ty => $field);
    };
}
