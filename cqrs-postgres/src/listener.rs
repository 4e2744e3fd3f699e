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
                    // Unless this process's writer already woke everyone after that commit: a
                    // second wake-up would only cost every subscriber an empty read.
                    let wanted = match position {
                        Some(position) if position > Position::START => announced.notified(position),
                        _ => true,
                    };
                    if wanted {
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

/// Which side has already woken subscribers for each of this process's recent batches: its
/// writer (after the commit, so its events, and any held back by its watermark lock, were
/// readable) or the listener, when the batch's NOTIFY (also sent only after the commit)
/// arrived before the writer had its answer. Whichever comes second skips its wake-up, which
/// would only cost every subscriber an empty read. The NOTIFYs of other processes are never
/// skipped: their positions are not among the writer's. Bounded: the oldest entries are
/// dropped, which only costs an extra wake-up.
#[derive(Debug, Default)]
pub(crate) struct Announced(std::sync::Mutex<Seen>);

#[derive(Debug, Default)]
struct Seen {
    /// Newest positions of batches the writers announced, whose NOTIFY has not come yet.
    by_writer: VecDeque<Position>,
    /// Positions of NOTIFYs the listener woke subscribers for, not (yet) matched by a writer.
    by_listener: VecDeque<Position>,
}

impl Announced {
    const CAPACITY: usize = 1024;

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A writer committed a batch whose newest position is `position`, with a NOTIFY of that
    /// payload or without one (see `notify`): whether it should wake subscribers (false when
    /// the listener already did, for this batch's NOTIFY).
    pub(crate) fn writer_committed(&self, position: Position, notified: bool) -> bool {
        if !notified {
            return true;
        }
        let mut seen = self.seen();
        if take(&mut seen.by_listener, position) {
            return false;
        }
        push(&mut seen.by_writer, position);
        true
    }

    /// This process is about to send a NOTIFY for `position` whose events its writers have
    /// already woken subscribers for: the listener need not wake them again.
    pub(crate) fn expect_notify(&self, position: Position) {
        push(&mut self.seen().by_writer, position);
    }

    /// A NOTIFY for `position` arrived: whether the listener should wake subscribers (false
    /// when this process's writer already did, for its own batch).
    pub(crate) fn notified(&self, position: Position) -> bool {
        let mut seen = self.seen();
        if take(&mut seen.by_writer, position) {
            return false;
        }
        push(&mut seen.by_listener, position);
        true
    }
}

fn push(positions: &mut VecDeque<Position>, position: Position) {
    if positions.len() >= Announced::CAPACITY {
        positions.pop_front();
    }
    positions.push_back(position);
}

fn take(positions: &mut VecDeque<Position>, position: Position) -> bool {
    match positions.iter().rposition(|&p| p == position) {
        Some(index) => {
            positions.remove(index);
            true
        }
        None => false,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_local_batch_wakes_subscribers_once_whichever_side_comes_first() {
        let announced = Announced::default();
        // The writer's answer first, then its NOTIFY.
        assert!(announced.writer_committed(Position(3), true));
        assert!(!announced.notified(Position(3)));
        // The NOTIFY first (the listener's connection was faster), then the writer's answer.
        assert!(announced.notified(Position(5)));
        assert!(!announced.writer_committed(Position(5), true));
        // Another process's batch: only its NOTIFY, which always wakes.
        assert!(announced.notified(Position(4)));
        assert!(announced.notified(Position(6)));
        // And a later local batch is not confused with them.
        assert!(announced.writer_committed(Position(7), true));
        assert!(!announced.notified(Position(7)));
        // A batch without a NOTIFY wakes them, and the deferred NOTIFY that follows does not.
        assert!(announced.writer_committed(Position(9), false));
        announced.expect_notify(Position(9));
        assert!(!announced.notified(Position(9)));
    }
}
