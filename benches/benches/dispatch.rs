//! The command path: dispatch on a warm instance for several stream lengths (the cost must not
//! grow with the stream), a cold load of a stream of fixed length for comparison, parallel dispatch over many instances,
//! read-your-writes, and the raw append of the memory store.
//! Run with: `cargo bench -p benches --bench dispatch`

// criterion_group! generates undocumented public functions.
#![allow(missing_docs)]

use std::sync::Arc;
use std::time::Instant;

use cqrs_core::testing::conformance::event;
use cqrs_core::testing::counter::{Counter, CounterCommand};
use cqrs_core::{
    spawn_handler, CommandEnvelope, Consistency, Dispatcher, EventStore, ExpectedVersion, Progress, RunnerConfig,
};
use cqrs_memory::MemoryStore;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tokio::runtime::Runtime;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime")
}

/// A store whose counter 1 already has `length` events.
fn store_with_stream(runtime: &Runtime, length: u64) -> Arc<MemoryStore> {
    let store = Arc::new(MemoryStore::new());
    runtime.block_on(async {
        let dispatcher = Dispatcher::<Counter, _>::new(Arc::clone(&store));
        for chunk in 0..length.div_ceil(1000) {
            let count = (length - chunk * 1000).min(1000);
            let events = (0..count)
                .map(|_| {
                    cqrs_core::NewEvent::from_domain(
                        &cqrs_core::testing::counter::CounterEvent::Incremented { by: 1 },
                        Default::default(),
                    )
                    .expect("serializable")
                })
                .collect();
            store.append(&Counter::stream_id(1), ExpectedVersion::Any, events).await.expect("prefill");
        }
        drop(dispatcher);
    });
    store
}

fn warm_dispatch(c: &mut Criterion) {
    let runtime = runtime();
    let mut group = c.benchmark_group("dispatch_warm_by_stream_length");
    group.throughput(Throughput::Elements(1));
    for length in [0u64, 1_000, 100_000] {
        let store = store_with_stream(&runtime, length);
        let dispatcher = Dispatcher::<Counter, _>::new(store);
        runtime.block_on(dispatcher.dispatch(CounterCommand::increment(1, 1))).expect("warm up");
        group.bench_with_input(BenchmarkId::from_parameter(length), &length, |b, _| {
            b.to_async(&runtime).iter(|| async {
                dispatcher.dispatch(CounterCommand::increment(1, 1)).await.expect("dispatch");
            });
        });
    }
    group.finish();
}

fn cold_dispatch(c: &mut Criterion) {
    let runtime = runtime();
    let mut group = c.benchmark_group("dispatch_cold_by_stream_length");
    group.throughput(Throughput::Elements(1));
    for length in [10u64, 1_000] {
        let store = store_with_stream(&runtime, length);
        let dispatcher = Dispatcher::<Counter, _>::new(store);
        group.bench_with_input(BenchmarkId::from_parameter(length), &length, |b, _| {
            // A no-op command: the instance is loaded in full, but the stream keeps its length.
            b.to_async(&runtime).iter(|| async {
                dispatcher.clear_cache();
                dispatcher.dispatch(CounterCommand::Noop { id: 1 }).await.expect("dispatch");
            });
        });
    }
    group.finish();
}

fn parallel_dispatch(c: &mut Criterion) {
    let runtime = runtime();
    let mut group = c.benchmark_group("dispatch_parallel_instances");
    const TASKS: u64 = 32;
    const PER_TASK: u64 = 100;
    group.throughput(Throughput::Elements(TASKS * PER_TASK));
    let dispatcher = Dispatcher::<Counter, _>::new(Arc::new(MemoryStore::new()));
    group.bench_function(BenchmarkId::new("tasks", TASKS), |b| {
        b.to_async(&runtime).iter(|| async {
            let tasks: Vec<_> = (0..TASKS)
                .map(|task| {
                    let dispatcher = dispatcher.clone();
                    tokio::spawn(async move {
                        for _ in 0..PER_TASK {
                            let id = u32::try_from(task).expect("small");
                            dispatcher.dispatch(CounterCommand::increment(id, 1)).await.expect("dispatch");
                        }
                    })
                })
                .collect();
            for task in tasks {
                task.await.expect("task");
            }
        });
    });
    group.finish();
}

fn read_your_writes(c: &mut Criterion) {
    let runtime = runtime();
    let mut group = c.benchmark_group("dispatch_strong_consistency");
    group.throughput(Throughput::Elements(1));
    let store = Arc::new(MemoryStore::new());
    let progress = Progress::new();
    let _runner = runtime
        .block_on(async { spawn_handler(Arc::clone(&store), NoopProjection, RunnerConfig::default(), &progress) });
    let dispatcher = Dispatcher::<Counter, _>::new(store).with_progress(progress);
    let strong = Consistency::strong(["noop"]);
    group.bench_function("one_handler", |b| {
        b.to_async(&runtime).iter(|| async {
            let command = CommandEnvelope::new(CounterCommand::increment(1, 1));
            dispatcher.dispatch_with(command, &strong).await.expect("dispatch");
        });
    });
    group.finish();
}

struct NoopProjection;

impl cqrs_core::EventHandler for NoopProjection {
    type Event = cqrs_core::testing::counter::CounterEvent;
    fn name(&self) -> &str {
        "noop"
    }
    async fn handle(&self, _event: cqrs_core::Envelope<Self::Event>) -> Result<(), cqrs_core::HandlerError> {
        Ok(())
    }
}

fn memory_append(c: &mut Criterion) {
    let runtime = runtime();
    let mut group = c.benchmark_group("memory_store_append");
    for batch in [1u64, 10, 100] {
        group.throughput(Throughput::Elements(batch));
        let store = MemoryStore::new();
        let stream = Counter::stream_id(9);
        group.bench_with_input(BenchmarkId::new("events_per_append", batch), &batch, |b, &batch| {
            b.iter_custom(|iterations| {
                let events: Vec<Vec<_>> = (0..iterations).map(|_| (0..batch).map(event).collect()).collect();
                let start = Instant::now();
                runtime.block_on(async {
                    for batch in events {
                        store.append(&stream, ExpectedVersion::Any, batch).await.expect("append");
                    }
                });
                start.elapsed()
            });
        });
    }
    group.finish();
}

criterion_group!(benches, warm_dispatch, cold_dispatch, parallel_dispatch, read_your_writes, memory_append);
criterion_main!(benches);
