//! Batch handlers (the runner of transactional projections): batches of what has arrived, and
//! no event applied twice when a commit's outcome was unknown.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cqrs_core::testing::counter::{Counter, CounterCommand, CounterEvent};
use cqrs_core::{
    spawn_batch_handler, BatchHandler, Claim, Coordination, Dispatcher, Envelope, EventStore, HandlerError, Position,
    Progress, RunnerConfig,
};
use cqrs_memory::MemoryStore;

/// A "projection" whose transaction is: record the events, then save the checkpoint.
struct Ledger {
    store: Arc<MemoryStore>,
    applied: Arc<Mutex<Vec<u64>>>,
    batches: Arc<Mutex<Vec<usize>>>,
    /// The next commit succeeds but reports a failure (the acknowledgement of COMMIT lost).
    lose_ack: Arc<AtomicBool>,
}

impl BatchHandler for Ledger {
    type Event = CounterEvent;
    fn name(&self) -> &str {
        "ledger"
    }
    async fn commit(
        &self,
        events: Vec<Envelope<CounterEvent>>,
        through: Position,
        claim: Option<&Claim>,
    ) -> Result<(), HandlerError> {
        self.batches.lock().expect("lock").push(events.len());
        self.applied.lock().expect("lock").extend(events.iter().map(|event| event.position.0));
        match claim {
            Some(claim) => self.store.save_checkpoint_claimed("ledger", through, claim).await?,
            None => self.store.save_checkpoint("ledger", through).await?,
        }
        if self.lose_ack.swap(false, Ordering::SeqCst) {
            return Err(HandlerError::new("connection reset during COMMIT"));
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_answer_was_lost_is_not_applied_again() {
    let store = Arc::new(MemoryStore::new());
    let dispatcher = Dispatcher::<Counter, _>::new(Arc::clone(&store));
    for n in 0..20 {
        dispatcher.dispatch(CounterCommand::increment(n % 4, 1)).await.expect("dispatch");
    }
    let ledger = Ledger {
        store: Arc::clone(&store),
        applied: Arc::new(Mutex::new(Vec::new())),
        batches: Arc::new(Mutex::new(Vec::new())),
        lose_ack: Arc::new(AtomicBool::new(true)),
    };
    let (applied, batches) = (Arc::clone(&ledger.applied), Arc::clone(&ledger.batches));
    let progress = Progress::new();
    let config = RunnerConfig { initial_backoff: Duration::from_millis(1), ..RunnerConfig::default() };
    let running = spawn_batch_handler(Arc::clone(&store), ledger, config, 8, &progress);
    progress.wait_for("ledger", Position(20), Duration::from_secs(20)).await.expect("caught up");
    dispatcher.dispatch(CounterCommand::increment(9, 1)).await.expect("dispatch");
    progress.wait_for("ledger", Position(21), Duration::from_secs(20)).await.expect("live");
    running.stop().await;
    let applied = applied.lock().expect("lock").clone();
    assert_eq!(applied, (1..=21).collect::<Vec<_>>(), "each event applied once, in order");
    let batches = batches.lock().expect("lock").clone();
    assert!(batches.iter().all(|size| *size <= 8), "batches of at most 8: {batches:?}");
    assert!(batches.iter().any(|size| *size > 1), "history came in batches: {batches:?}");
    assert_eq!(store.load_checkpoint("ledger").await.expect("load"), Some(Position(21)));
}
