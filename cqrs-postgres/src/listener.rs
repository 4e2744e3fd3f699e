//! The LISTEN task: turns NOTIFYs into changes of the store's `watch` channel, and wakes every
//! subscriber after each (re)connect, because notifications sent while the listening
//! connection was down are lost.

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
pub(crate) async fn run_listener(pool: PgPool, head: Arc<watch::Sender<Position>>) {
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
                Ok(Some(notification)) => wake(&head, notification.payload().parse().ok().map(Position)),
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

/// Always wakes receivers (`send_modify` notifies even when the value does not change).
fn wake(head: &watch::Sender<Position>, position: Option<Position>) {
    head.send_modify(|current| {
        if let Some(position) = position {
            *current = (*current).max(position);
        }
    });
}
