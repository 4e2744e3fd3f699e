//! The claim keeper of an exclusive runner: takes the handler's claim, renews it every third of
//! its ttl, and tells the runner whether it holds it and until when it may act on it.
//!
//! **No two active consumers.** The store sets a claim's expiry to its own `now + ttl` while
//! answering; the keeper asked *before* that, at local instant `asked`, so `asked + ttl` is no
//! later than the store's expiry (clocks measure durations alike). The runner acts only until
//! `asked + ttl × 0.9` (the margin covers clock-rate drift) and its workers are aborted at that
//! instant unless the claim was renewed; another process can take the claim only after the
//! store's expiry. So their active periods cannot overlap. Writes the store makes on the
//! runner's behalf are fenced by the claim's token on top of that
//! ([`Coordination::save_checkpoint_claimed`](crate::Coordination::save_checkpoint_claimed),
//! and the fenced parked-event writes).
//!
//! "The runner acts" covers every path: the feeder's reads and their back-off, each worker's
//! handling and retries (a worker ends its own work when the lease ends, whatever the feeder
//! is doing), park writes, and a graceful stop's last events and saves.
//!
//! **Assumption**: the store's clock (the database server's, for a shared store) does not
//! step by more than a tenth of the ttl while a claim is held, and the two clocks' rates
//! differ by less than that: a clock stepped forward expires the claim early and lets a
//! standby in while the holder still acts. Run NTP so that it slews rather than steps.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::coordination::{Claim, ClaimOutcome};
use crate::store::Store;

/// The fraction of the ttl a runner may act on a claim after asking for it.
const SAFE_FRACTION: f64 = 0.9;

/// What the keeper knows about the claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Lease {
    /// Not held by this process; `holder` holds it (if known).
    Standby { holder: Option<String> },
    /// Held: the runner may act until `valid_until` unless it is renewed first.
    Held { claim: Claim, valid_until: Instant },
    /// An operator paused the handler ([`HandlerControl::pause`](crate::HandlerControl::pause)):
    /// the keeper gave the claim up and does not take it until the pause is lifted.
    Paused { by: String },
}

/// Keeps an exclusive runner's claim; releases it when stopped.
pub(crate) struct ClaimKeeper {
    lease: watch::Receiver<Lease>,
    /// `None` once released.
    task: Option<JoinHandle<()>>,
}

impl ClaimKeeper {
    /// Starts keeping the claim on `name` for `owner`.
    pub(crate) fn spawn<S: Store + ?Sized>(
        store: Arc<S>,
        name: String,
        owner: String,
        ttl: Duration,
        retry: Duration,
    ) -> Self {
        let (lease_tx, lease) = watch::channel(Lease::Standby { holder: None });
        let task = tokio::spawn(keep(store, name, owner, ttl, retry, lease_tx));
        Self { lease, task: Some(task) }
    }

    /// A receiver of the lease's changes.
    pub(crate) fn lease(&self) -> watch::Receiver<Lease> {
        self.lease.clone()
    }

    /// Stops renewing and gives the claim up, so a standby takes over at once.
    pub(crate) async fn release<S: Store + ?Sized>(mut self, store: &S, within: Duration) {
        if let Some(task) = self.task.take() {
            task.abort();
            // Wait until it is gone, so no renewal in flight lands after the release.
            let _ = task.await;
        }
        let held = match &*self.lease.borrow() {
            Lease::Held { claim, .. } => Some(claim.clone()),
            Lease::Standby { .. } | Lease::Paused { .. } => None,
        };
        if let Some(claim) = held {
            match tokio::time::timeout(within, store.release_claim(&claim)).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    tracing::debug!(handler = %claim.name, %error, "releasing the claim failed; it will lapse");
                }
                Err(_) => tracing::debug!(handler = %claim.name, "releasing the claim timed out; it will lapse"),
            }
        }
    }
}

impl Drop for ClaimKeeper {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

async fn keep<S: Store + ?Sized>(
    store: Arc<S>,
    name: String,
    owner: String,
    ttl: Duration,
    retry: Duration,
    lease: watch::Sender<Lease>,
) {
    let renew_every = ttl / 3;
    let marker = super::control::pause_marker(&name);
    let standby = super::control::standby_marker(&name, &owner);
    loop {
        let asked = Instant::now();
        match paused_by(&*store, &marker).await {
            Ok(Some(by)) => {
                // Paused: stop acting at once (the runner sees the lease end), then give the
                // claim up, so an operator's reset can take it.
                let held = match lease.send_replace(Lease::Paused { by }) {
                    Lease::Held { claim, .. } => Some(claim),
                    Lease::Standby { .. } | Lease::Paused { .. } => None,
                };
                if let Some(claim) = held {
                    tracing::info!(handler = %name, "paused by an operator: claim given up");
                    if let Err(error) = store.release_claim(&claim).await {
                        tracing::debug!(handler = %name, %error, "releasing the claim failed; it will lapse");
                    }
                }
                tokio::time::sleep(retry.min(renew_every)).await;
                continue;
            }
            Ok(None) => {}
            // The claim below fails too if the store is down; if only this read failed, a pause
            // is noticed at the next renewal.
            Err(error) => tracing::debug!(handler = %name, %error, "cannot read whether the handler is paused"),
        }
        let pause = match store.claim(&name, &owner, ttl).await {
            Ok(ClaimOutcome::Held(claim)) => {
                let valid_until = asked + ttl.mul_f64(SAFE_FRACTION);
                lease.send_replace(Lease::Held { claim, valid_until });
                renew_every
            }
            Ok(ClaimOutcome::Taken { holder, .. }) => {
                lease.send_replace(Lease::Standby { holder: Some(holder).filter(|holder| !holder.is_empty()) });
                // Announced in the claims (lapsing with the ttl), so operators see the standbys.
                if let Err(error) = store.claim(&standby, &owner, ttl).await {
                    tracing::debug!(handler = %name, %error, "cannot announce this standby");
                }
                retry
            }
            Err(error) => {
                tracing::warn!(handler = %name, %error, "cannot renew or take the claim");
                // While held, the lease simply runs out at `valid_until` unless a renewal
                // succeeds first; the runner watches that instant itself.
                renew_every.min(retry) / 2
            }
        };
        tokio::time::sleep(pause).await;
    }
}

/// Who paused the handler whose pause marker is `marker`, if anyone.
async fn paused_by<S: Store + ?Sized>(store: &S, marker: &str) -> Result<Option<String>, crate::StoreError> {
    let claims = store.claims().await?;
    Ok(claims.into_iter().find(|claim| claim.name == marker).map(|claim| claim.owner))
}

/// Resolves when the lease of tenure `token` ends: its `valid_until` passes without renewal,
/// or the keeper reports another tenure or none.
pub(crate) async fn lost(lease: &mut watch::Receiver<Lease>, token: u64) {
    loop {
        let deadline = match &*lease.borrow_and_update() {
            Lease::Held { claim, valid_until } if claim.token == token => *valid_until,
            _ => return,
        };
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => {
                let renewed = matches!(
                    &*lease.borrow(),
                    Lease::Held { claim, valid_until } if claim.token == token && *valid_until > deadline
                );
                if !renewed {
                    return;
                }
            }
            changed = lease.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}
