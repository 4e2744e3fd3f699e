//! A process manager as an operator handles it: its instances (listed), its set-aside scheduled
//! commands (list, retry, discard).

use std::sync::Arc;

use crate::coordination::{ProcessInstance, SetAsideCommand};
use crate::store::{Store, StoreError};

/// The operator's handle on process managers' durable state (a library API, like
/// [`ParkedEvents`](crate::ParkedEvents) for parked events).
///
/// ```
/// # use std::sync::Arc;
/// # use cqrs_core::{ProcessAdmin, Store};
/// # async fn demo<S: Store>(store: Arc<S>) -> Result<(), cqrs_core::StoreError> {
/// let admin = ProcessAdmin::new(store);
/// for instance in admin.instances("fulfilment", None, 100).await? {
///     println!("{} at {} ended: {}", instance.key, instance.state.position, instance.state.ended);
/// }
/// for command in admin.set_aside("fulfilment").await? {
///     let scheduled = &command.scheduled;
///     println!("{} {} due {:?}: {}", scheduled.key, scheduled.name, scheduled.due, command.error);
/// }
/// admin.retry("fulfilment", "order-1", "payment-deadline").await?; // fires at the next look
/// admin.discard("fulfilment", "order-2", "payment-deadline").await?; // never fires; logged
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct ProcessAdmin<S: ?Sized> {
    store: Arc<S>,
}

impl<S: ?Sized> Clone for ProcessAdmin<S> {
    fn clone(&self) -> Self {
        Self { store: Arc::clone(&self.store) }
    }
}

impl<S: Store + ?Sized> ProcessAdmin<S> {
    /// Process managers kept in `store`.
    pub fn new(store: Arc<S>) -> Self {
        Self { store }
    }

    /// Up to `max` of `process`'s instances, running or ended (a tombstone, kept until the
    /// checkpoint passes it), with keys after `after`, in key order; page with the last key.
    pub async fn instances(
        &self,
        process: &str,
        after: Option<&str>,
        max: usize,
    ) -> Result<Vec<ProcessInstance>, StoreError> {
        self.store.process_instances(process, after, max).await
    }

    /// The scheduled commands `process`'s scheduler set aside (unreadable, or failing
    /// [`MAX_FIRING_ATTEMPTS`](crate::MAX_FIRING_ATTEMPTS) times), with their errors. Their
    /// count is the operator's gauge (`cqrs_process_schedules_set_aside_total` counts them as
    /// they are set aside).
    pub async fn set_aside(&self, process: &str) -> Result<Vec<SetAsideCommand>, StoreError> {
        self.store.set_aside_scheduled(process).await
    }

    /// Makes a set-aside command due again: the scheduler fires it at its next look (with its
    /// stored id, so it applies once). False if there is no such set-aside command.
    pub async fn retry(&self, process: &str, key: &str, name: &str) -> Result<bool, StoreError> {
        let retried = self.store.retry_scheduled(process, key, name).await?;
        if retried {
            tracing::info!(process, key, name, "retry of a set-aside scheduled command requested");
        }
        Ok(retried)
    }

    /// Discards a set-aside command: it never fires. Logged at warn level. False if there is no
    /// such set-aside command (a pending one is not touched: cancel it from the process manager).
    pub async fn discard(&self, process: &str, key: &str, name: &str) -> Result<bool, StoreError> {
        let set_aside = self.store.set_aside_scheduled(process).await?;
        let Some(command) = set_aside.into_iter().find(|c| c.scheduled.key == key && c.scheduled.name == name) else {
            return Ok(false);
        };
        let only = Some(command.scheduled.command_id);
        let discarded = self.store.unschedule(process, key, name, only).await?;
        if discarded {
            tracing::warn!(process, key, name, error = %command.error, command = %command.scheduled.command, "a set-aside scheduled command was discarded");
        }
        Ok(discarded)
    }
}
