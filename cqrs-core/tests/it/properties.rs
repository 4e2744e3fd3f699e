//! Property tests: random interleavings of commands over several streams, from several
//! concurrent tasks and two dispatchers (as two processes would), keep the dispatcher's cached
//! state equal to the state rebuilt from the store, versions contiguous and positions strictly
//! increasing.

use std::collections::HashMap;
use std::sync::Arc;

use cqrs_core::testing::counter::{Counter, CounterCommand};
use cqrs_core::{DispatchError, Dispatcher, DispatcherConfig, EventStore, Position, Version};
use cqrs_memory::MemoryStore;
use proptest::prelude::*;

fn command() -> impl Strategy<Value = CounterCommand> {
    let id = 0u32..4;
    prop_oneof![
        (id.clone(), 1u64..5).prop_map(|(id, by)| CounterCommand::increment(id, by)),
        (id.clone(), 1u64..8).prop_map(|(id, by)| CounterCommand::decrement(id, by)),
        id.prop_map(|id| CounterCommand::Noop { id }),
    ]
}

async fn run_case(tasks: Vec<Vec<CounterCommand>>, cache_capacity: usize) {
    let store = Arc::new(MemoryStore::new());
    let config = DispatcherConfig { cache_capacity, ..DispatcherConfig::default() };
    let processes = [
        Dispatcher::<Counter, _>::with_config(Arc::clone(&store), config.clone()),
        Dispatcher::<Counter, _>::with_config(Arc::clone(&store), config),
    ];
    let handles: Vec<_> = tasks
        .into_iter()
        .enumerate()
        .map(|(index, commands)| {
            let dispatcher = processes[index % 2].clone();
            tokio::spawn(async move {
                for command in commands {
                    match dispatcher.dispatch(command).await {
                        Ok(_) | Err(DispatchError::Rejected(_)) => {}
                        Err(error) => panic!("unexpected dispatch error: {error}"),
                    }
                }
            })
        })
        .collect();
    for handle in handles {
        handle.await.expect("task");
    }

    let all = store.read_all(Position::START, usize::MAX).await.expect("read_all");
    assert!(all.windows(2).all(|w| w[0].position < w[1].position), "positions strictly increase");
    let mut last_version: HashMap<_, u64> = HashMap::new();
    for event in &all {
        let last = last_version.entry(event.stream_id.clone()).or_default();
        assert_eq!(event.version, Version(*last + 1), "versions are contiguous in global order");
        *last += 1;
    }
    for id in 0..4 {
        let stream_id = Counter::stream_id(id);
        let rebuilt = Dispatcher::<Counter, _>::new(Arc::clone(&store)).load(&stream_id).await.expect("rebuild");
        for process in &processes {
            assert_eq!(process.load(&stream_id).await.expect("cached"), rebuilt, "cache equals store for {stream_id}");
        }
        assert_eq!(rebuilt.1, Version(last_version.get(&stream_id).copied().unwrap_or(0)));
        assert_eq!(rebuilt.0.applied, rebuilt.1 .0);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn cached_state_equals_rebuilt_state(
        tasks in proptest::collection::vec(proptest::collection::vec(command(), 0..25), 1..5),
        cache_capacity in 1usize..6,
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        runtime.block_on(run_case(tasks, cache_capacity));
    }
}
