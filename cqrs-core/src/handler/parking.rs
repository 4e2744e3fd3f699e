//! Parked events, as an operator handles them: list, retry, discard. The running handler (in
//! whichever process holds it) picks retry requests up within [`RunnerConfig::parked_poll`]
//! and retries each requested sequence from its oldest parked event, in order.
//!
//! [`RunnerConfig::parked_poll`]: crate::RunnerConfig::parked_poll

use std::sync::Arc;

use crate::coordination::{ParkedEvent, ParkedStatus};
use crate::ids::Position;
use crate::store::{Store, StoreError};

/// The operator's handle on parked events (a library API; the chat's dashboard uses it).
///
/// ```
/// # use std::sync::Arc;
/// # use cqrs_core::{ParkedEvents, Position, Store};
/// # async fn demo<S: Store>(store: Arc<S>) -> Result<(), cqrs_core::StoreError> {
/// let parked = ParkedEvents::new(store);
/// for event in parked.list("mailer").await? {
///     println!("{} {} {}: {}", event.position, event.stream_id, event.event_type, event.error);
/// }
/// parked.retry("mailer", Position(42)).await?; // it, and what waits behind it
/// parked.discard("mailer", Position(43)).await?; // never handled; logged
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct ParkedEvents<S: ?Sized> {
    store: Arc<S>,
}

impl<S: ?Sized> Clone for ParkedEvents<S> {
    fn clone(&self) -> Self {
        Self { store: Arc::clone(&self.store) }
    }
}

impl<S: Store + ?Sized> ParkedEvents<S> {
    /// Parked events of any handler in `store`.
    pub fn new(store: Arc<S>) -> Self {
        Self { store }
    }

    /// `handler`'s parked events, in position order.
    pub async fn list(&self, handler: &str) -> Result<Vec<ParkedEvent>, StoreError> {
        self.store.parked(handler).await
    }

    /// Asks for another attempt at the parked event at `position` and at everything parked
    /// behind it in its sequence (from the sequence's oldest parked event, in order: a later
    /// event is never handled before an earlier one of its sequence). False if no such event.
    pub async fn retry(&self, handler: &str, position: Position) -> Result<bool, StoreError> {
        let requested = self.store.set_parked_status(handler, position, ParkedStatus::RetryRequested, None).await?;
        if requested {
            tracing::info!(handler, %position, "retry of a parked event requested");
        }
        Ok(requested)
    }

    /// Asks for another attempt at every parked event of `handler`; returns how many.
    pub async fn retry_all(&self, handler: &str) -> Result<usize, StoreError> {
        let mut requested = 0;
        for event in self.store.parked(handler).await? {
            if self.store.set_parked_status(handler, event.position, ParkedStatus::RetryRequested, None).await? {
                requested += 1;
            }
        }
        Ok(requested)
    }

    /// Discards the parked event at `position`: the handler will never handle it. Logged at
    /// warn level, with the event. Events parked behind it stay parked (retry them). False if
    /// no such event.
    pub async fn discard(&self, handler: &str, position: Position) -> Result<bool, StoreError> {
        let event = self.store.parked(handler).await?.into_iter().find(|event| event.position == position);
        let Some(event) = event else { return Ok(false) };
        let discarded = self.store.unpark(handler, position, None).await?;
        if discarded {
            tracing::warn!(
                handler,
                %position,
                stream = %event.stream_id,
                event_type = %event.event_type,
                error = %event.error,
                "parked event discarded by an operator"
            );
        }
        Ok(discarded)
    }
}
