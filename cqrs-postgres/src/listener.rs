//! The LISTEN task: turns NOTIFYs into changes of the store's `watch` channel, and wakes every
//! subscriber after each (re)connect, because notifications sent while the listening
//! connection was down are lost.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use cqrs_core::Position;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::watch;

use crate::config::NOTIFY_CHANNEL;

/// Longest pause between reconnect attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// First pause after a failed connect.
const FIRST_BACKOFF: Duration = Duration::from_millis(50);

/// Runs until aborted (when the store is dropped). `pool` is a one-connection pool reserved
/// for listening.
pub(crate) async fn run_listener(pool: PgPool, head: Arc<watch::Sender<Position>>, announced: Arc<Announced>) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        let mut listener = match connect(&pool).await {
            Ok(listener) => listener,
            Err(error) => {
                tracing::debug!(%error, "listener cannot connect, retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        backoff = FIRST_BACKOFF;
        // LISTEN is active from here on: anything committed earlier is found by re-reading.
        wake(&head, None);
        loop {
            match listener.try_recv().await {
                Ok(Some(notification)) => {
                    let position = notification.payload().parse().ok().map(Position);
                    // This process's writer already woke everyone after that commit: a second
                    // wake-up would only cost every subscriber an empty read.
                    if !position.is_some_and(|position| announced.take(position)) {
                        wake(&head, position);
                    }
                }
                // The connection was lost. sqlx would reconnect inside the next `try_recv`, but
                // we could not wake subscribers *after* LISTEN is active again; so reconnect
                // here, and wake them (above) once it is: notifications sent in between are
                // lost, and every subscriber must re-read from its own position.
                Ok(None) => {
                    tracing::debug!("listener connection lost, reconnecting");
                    break;
                }
                Err(error) => {
                    tracing::debug!(%error, "listener connection failed, reconnecting");
                    break;
                }
            }
        }
    }
}

async fn connect(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(NOTIFY_CHANNEL).await?;
    Ok(listener)
}

/// The newest positions of batches this process's writers committed and announced on `head`
/// themselves (after the commit, so their events, and any held back by their watermark lock,
/// were readable). The listener skips the NOTIFY of such a batch. Bounded: the oldest entries
/// are dropped, which only costs an extra wake-up.
#[derive(Debug, Default)]
pub(crate) struct Announced(std::sync::Mutex<VecDeque<Position>>);

impl Announced {
    const CAPACITY: usize = 1024;

    /// Records a batch's newest position, announced locally.
    pub(crate) fn record(&self, position: Position) {
        let mut positions = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if positions.len() >= Self::CAPACITY {
            positions.pop_front();
        }
        positions.push_back(position);
    }

    /// Whether `position` was announced locally (forgetting it).
    pub(crate) fn take(&self, position: Position) -> bool {
        let mut positions = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match positions.iter().position(|&p| p == position) {
            Some(index) => {
                positions.remove(index);
                true
            }
            None => false,
        }
    }
}

/// Always wakes receivers (`send_modify` notifies even when the value does not change).
fn wake(head: &watch::Sender<Position>, position: Option<Position>) {
    head.send_modify(|current| {
        if let Some(position) = position {
            *current = (*current).max(position);
        }
    });
}
