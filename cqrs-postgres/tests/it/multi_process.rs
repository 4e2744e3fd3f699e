//! Two store instances (two processes) append to the same streams at once, through two
//! dispatchers and through raw appends: nothing is lost and every stream stays contiguous.

use std::collections::HashSet;
use std::sync::Arc;

use cqrs_core::testing::conformance::event;
use cqrs_core::testing::counter::{Counter, CounterCommand};
use cqrs_core::{Dispatcher, EventId, EventStore, ExpectedVersion, StreamId, Version};
use cqrs_postgres::{PgEventStore, PgStoreConfig};

use crate::support::{read_everything, stream, TestDb};

const COMMAND_TASKS: u64 = 6;
const COMMANDS_PER_TASK: u64 = 20;
const RAW_TASKS: u64 = 4;
const RAW_PER_TASK: u64 = 25;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_store_instances_share_streams_safely() {
    let db = TestDb::create().await;
    // The second process runs three writer tasks: concurrent batches from one instance too.
    let processes = [
        Arc::new(db.store().await),
        Arc::new(db.store_with(PgStoreConfig::default().with_max_connections(6).with_writer_tasks(3)).await),
    ];
    let dispatchers = [
        Dispatcher::<Counter, PgEventStore>::new(Arc::clone(&processes[0])),
        Dispatcher::<Counter, PgEventStore>::new(Arc::clone(&processes[1])),
    ];
    let counters: Vec<u32> =
        (0..3).map(|i| 7_000 + i + u32::try_from(crate::support::random_below(1_000_000)).expect("small")).collect();
    let raw_streams: Vec<StreamId> = (0..2).map(|i| stream(&format!("raw{i}"))).collect();

    let mut tasks = Vec::new();
    for task in 0..COMMAND_TASKS {
        let dispatcher = dispatchers[usize::try_from(task % 2).expect("small")].clone();
        let counters = counters.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..COMMANDS_PER_TASK {
                let id = counters[usize::try_from((task + i) % 3).expect("small")];
                dispatcher.dispatch(CounterCommand::increment(id, 1)).await.expect("increment");
            }
            Vec::new()
        }));
    }
    for task in 0..RAW_TASKS {
        let store = Arc::clone(&processes[usize::try_from(task % 2).expect("small")]);
        let raw_streams = raw_streams.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..RAW_PER_TASK {
                let sent = event(task * 1000 + i);
                ids.push(sent.event_id);
                let s = &raw_streams[usize::try_from(i % 2).expect("small")];
                store.append(s, ExpectedVersion::Any, vec![sent]).await.expect("raw append");
            }
            ids
        }));
    }
    let mut raw_ids: HashSet<EventId> = HashSet::new();
    for task in tasks {
        raw_ids.extend(task.await.expect("task"));
    }

    let mut total = 0;
    for id in &counters {
        let fresh = Dispatcher::<Counter, PgEventStore>::new(Arc::clone(&processes[0]));
        let (state, version) = fresh.load(&Counter::stream_id(*id)).await.expect("load");
        assert_eq!(state.value, version.0, "one event per increment on counter {id}");
        total += state.value;
        let events = processes[1].read_stream(&Counter::stream_id(*id), Version(1), usize::MAX).await.expect("read");
        assert!(events.iter().enumerate().all(|(i, e)| e.version == Version(i as u64 + 1)), "contiguous");
    }
    assert_eq!(total, COMMAND_TASKS * COMMANDS_PER_TASK, "every command applied exactly once");

    let mut stored_raw = HashSet::new();
    for s in &raw_streams {
        let events = processes[0].read_stream(s, Version(1), usize::MAX).await.expect("read");
        assert!(events.iter().enumerate().all(|(i, e)| e.version == Version(i as u64 + 1)), "{s} contiguous");
        stored_raw.extend(events.iter().map(|e| e.event_id));
    }
    assert_eq!(stored_raw, raw_ids, "every raw append stored once");
    let all = read_everything(&*processes[1]).await;
    assert_eq!(all.len() as u64, COMMAND_TASKS * COMMANDS_PER_TASK + RAW_TASKS * RAW_PER_TASK);
}
