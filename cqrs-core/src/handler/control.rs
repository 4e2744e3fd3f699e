//! [`HandlerControl`]: an operator pauses, resumes or resets an exclusive handler, whichever
//! process runs it.
//!
//! **How a pause reaches every process.** A pause is a claim under the handler's pause marker
//! (`cqrs.paused:{handler}`), held by the operator for [`PAUSE_TTL`]. Every exclusive runner's
//! claim keeper reads the claims before it takes or renews its own (every third of its ttl, 1 s
//! by default), and while the marker is held it stops acting, gives its claim up and stands by
//! as [`HandlerState::Paused`](crate::HandlerState::Paused). Resuming releases the marker. So a
//! pause needs no store method of its own, survives restarts, and is seen by processes started
//! later.
//!
//! **Why a reset cannot race the runner.** [`HandlerControl::reset`] writes the checkpoint under
//! a claim of its own on the handler's name, taken only once the paused runner has given its
//! claim up: every checkpoint write is fenced by the claim it is made under
//! ([`Coordination::save_checkpoint_claimed`](crate::Coordination::save_checkpoint_claimed)), so a runner's late save cannot overwrite the
//! reset, and the next holder loads the reset position when its tenure begins.
//!
//! Every-process runners (checkpoints in memory, no claim) are not paused: each process rebuilds
//! their state from history on start.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::coordination::ClaimOutcome;
use crate::ids::Position;
use crate::store::{Store, StoreError};

/// How long a pause lasts unless lifted: ten years, for ever in practice.
pub const PAUSE_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// The prefix of the names the framework keeps in the claims table and among checkpoints for
/// itself (pause and standby markers, projection versions); a handler's name never starts with
/// it.
pub const RESERVED_PREFIX: &str = "cqrs.";

/// The prefix of pause markers in the claims table.
pub const PAUSE_PREFIX: &str = "cqrs.paused:";

/// The prefix of standby markers: each process standing by for an exclusive handler holds a
/// claim named `cqrs.standby:{owner}|{handler}` (renewed at each of its attempts, lapsing with
/// its ttl), so operators see every standby, not only the holder.
pub const STANDBY_PREFIX: &str = "cqrs.standby:";

/// Whether `name` is one the framework keeps for itself (see [`RESERVED_PREFIX`]), not a
/// handler's.
pub fn is_reserved(name: &str) -> bool {
    name.starts_with(RESERVED_PREFIX)
}

/// The claim name that announces `owner` standing by for `handler`.
pub(crate) fn standby_marker(handler: &str, owner: &str) -> String {
    format!("{STANDBY_PREFIX}{owner}|{handler}")
}

/// The paused handlers among `claims` (as [`Coordination::claims`](crate::Coordination::claims)
/// lists them), with who paused each, by name: for a caller that reads the claims once for
/// several purposes.
pub fn paused_in(claims: &[crate::Claim]) -> Vec<(String, String)> {
    let mut paused: Vec<(String, String)> = claims
        .iter()
        .filter_map(|claim| claim.name.strip_prefix(PAUSE_PREFIX).map(|name| (name.to_owned(), claim.owner.clone())))
        .collect();
    paused.sort();
    paused
}

/// The processes standing by for each exclusive handler among `claims` (their announcements,
/// which lapse with the claim ttl), by handler, without the current holder.
pub fn standbys_in(claims: &[crate::Claim]) -> Vec<(String, Vec<String>)> {
    let holders: std::collections::HashMap<&str, &str> = claims
        .iter()
        .filter(|claim| !is_reserved(&claim.name))
        .map(|claim| (claim.name.as_str(), claim.owner.as_str()))
        .collect();
    let mut standbys: std::collections::BTreeMap<String, Vec<String>> = std::collections::BTreeMap::new();
    for claim in claims {
        if let Some(handler) = standby_of(claim) {
            if holders.get(handler) != Some(&claim.owner.as_str()) {
                standbys.entry(handler.to_owned()).or_default().push(claim.owner.clone());
            }
        }
    }
    for owners in standbys.values_mut() {
        owners.sort();
    }
    standbys.into_iter().collect()
}

/// The handler a standby marker claim is for, if `claim` is one.
fn standby_of(claim: &crate::Claim) -> Option<&str> {
    claim.name.strip_prefix(STANDBY_PREFIX)?.strip_prefix(claim.owner.as_str())?.strip_prefix('|')
}

/// How long a reset's own claim on the handler lasts (it is released at once when done).
const RESET_CLAIM_TTL: Duration = Duration::from_secs(10);

/// The claim name that marks `handler` paused.
pub(crate) fn pause_marker(handler: &str) -> String {
    format!("{PAUSE_PREFIX}{handler}")
}

/// Why an operator's action on a handler was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// A reset needs the handler paused first, so no process moves its checkpoint meanwhile.
    #[error("handler {0:?} is not paused: pause it before resetting it")]
    NotPaused(String),
    /// The process that ran the handler has not given its claim up in time (it notices a pause
    /// within a third of its claim ttl, or its claim lapses).
    #[error("handler {handler:?} is still held by {holder:?}; try again in a moment")]
    StillActive {
        /// The handler.
        handler: String,
        /// Who holds it.
        holder: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Pauses, resumes and resets exclusive handlers across every process sharing the store (see
/// the [module docs](self) for how). Cheap to clone.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use cqrs_core::{ControlError, HandlerControl, Position, Store};
///
/// /// Makes "mailer" send again what followed position 41.
/// async fn resend<S: Store>(store: Arc<S>) -> Result<(), ControlError> {
///     let control = HandlerControl::new(store);
///     control.pause("mailer", "ops:alice").await?;
///     control.reset("mailer", Position(41), Duration::from_secs(5)).await?;
///     control.resume("mailer").await?;
///     Ok(())
/// }
/// ```
#[derive(Debug)]
pub struct HandlerControl<S: ?Sized> {
    store: Arc<S>,
}

impl<S: ?Sized> Clone for HandlerControl<S> {
    fn clone(&self) -> Self {
        Self { store: Arc::clone(&self.store) }
    }
}

impl<S: Store + ?Sized> HandlerControl<S> {
    /// Control over the handlers of `store`.
    pub fn new(store: Arc<S>) -> Self {
        Self { store }
    }

    /// Pauses `handler` in every process, recording `by` (who asked). The process running it
    /// stops within a third of its claim ttl: what it had in hand is handled again on resume.
    /// Pausing a paused handler changes nothing (the first `by` stays).
    pub async fn pause(&self, handler: &str, by: &str) -> Result<(), ControlError> {
        match self.store.claim(&pause_marker(handler), by, PAUSE_TTL).await? {
            ClaimOutcome::Held(_) | ClaimOutcome::Taken { .. } => Ok(()),
        }
    }

    /// Lifts the pause of `handler`; false if it was not paused. A standby takes it up within
    /// its claim retry interval.
    pub async fn resume(&self, handler: &str) -> Result<bool, ControlError> {
        let marker = pause_marker(handler);
        let claims = self.store.claims().await?;
        let Some(pause) = claims.into_iter().find(|claim| claim.name == marker) else {
            return Ok(false);
        };
        self.store.release_claim(&pause).await?;
        Ok(true)
    }

    /// Who paused `handler`, if it is paused.
    pub async fn paused_by(&self, handler: &str) -> Result<Option<String>, ControlError> {
        Ok(self.paused().await?.into_iter().find(|(name, _)| name == handler).map(|(_, by)| by))
    }

    /// The processes standing by for each exclusive handler (see [`standbys_in`]).
    pub async fn standbys(&self) -> Result<Vec<(String, Vec<String>)>, ControlError> {
        Ok(standbys_in(&self.store.claims().await?))
    }

    /// Every paused handler, with who paused it, by name (see [`paused_in`]).
    pub async fn paused(&self) -> Result<Vec<(String, String)>, ControlError> {
        Ok(paused_in(&self.store.claims().await?))
    }

    /// Moves the checkpoint of paused `handler` to `to`: once resumed, it handles again every
    /// event after `to` (or, with a higher `to`, passes over the events up to it). Waits up to
    /// `within` for the process that ran it to give its claim up. Returns the checkpoint it had.
    pub async fn reset(&self, handler: &str, to: Position, within: Duration) -> Result<Option<Position>, ControlError> {
        if self.paused_by(handler).await?.is_none() {
            return Err(ControlError::NotPaused(handler.to_owned()));
        }
        let owner = format!("{PAUSE_PREFIX}reset:{}", uuid::Uuid::new_v4());
        let deadline = Instant::now() + within;
        loop {
            match self.store.claim(handler, &owner, RESET_CLAIM_TTL).await? {
                ClaimOutcome::Held(claim) => {
                    let before = self.store.load_checkpoint(handler).await;
                    let saved = self.store.save_checkpoint_claimed(handler, to, &claim).await;
                    if let Err(error) = self.store.release_claim(&claim).await {
                        tracing::debug!(%handler, %error, "releasing the reset's claim failed; it will lapse");
                    }
                    saved?;
                    tracing::warn!(%handler, from = ?before.as_ref().ok(), %to, "handler reset by an operator");
                    return Ok(before?);
                }
                ClaimOutcome::Taken { holder, .. } => {
                    if Instant::now() >= deadline {
                        return Err(ControlError::StillActive { handler: handler.to_owned(), holder });
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}
