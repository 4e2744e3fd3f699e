//! Live fan-out: one append reaching 1, 100 and 1000 live subscribers of the memory store.
//! Measures the time from the append until the last subscriber has the event.
//! Run with: `cargo bench -p benches --bench fanout`

// criterion_group! generates undocumented public functions.
#![allow(missing_docs)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cqrs_core::testing::conformance::event;
use cqrs_core::{EventStore, ExpectedVersion, Position, StreamId, Subscription};
use cqrs_memory::MemoryStore;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tokio::sync::Notify;

struct Fleet {
    store: Arc<MemoryStore>,
    delivered: Arc<AtomicUsize>,
    all_delivered: Arc<Notify>,
    subscribers: usize,
}

fn start_fleet(subscribers: usize) -> Fleet {
    let store = Arc::new(MemoryStore::new());
    let delivered = Arc::new(AtomicUsize::new(0));
    let all_delivered = Arc::new(Notify::new());
    for _ in 0..subscribers {
        let mut feed = Subscription::all(Arc::clone(&store), Position::START);
        let delivered = Arc::clone(&delivered);
        let all_delivered = Arc::clone(&all_delivered);
        tokio::spawn(async move {
            while let Ok(Some(_event)) = feed.next().await {
                if delivered.fetch_add(1, Ordering::AcqRel) + 1 == subscribers {
                    all_delivered.notify_one();
                }
            }
        });
    }
    Fleet { store, delivered, all_delivered, subscribers }
}

fn fanout(c: &mut Criterion) {
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime");
    let mut group = c.benchmark_group("fanout_one_append_to_all_subscribers");
    group.measurement_time(Duration::from_secs(5));
    let stream = StreamId::new("room-1").expect("stream id");
    for subscribers in [1usize, 100, 1000] {
        group.throughput(Throughput::Elements(subscribers as u64));
        let fleet = runtime.block_on(async { start_fleet(subscribers) });
        group.bench_with_input(BenchmarkId::new("subscribers", subscribers), &subscribers, |b, _| {
            b.iter_custom(|iterations| {
                runtime.block_on(async {
                    let mut total = Duration::ZERO;
                    for n in 0..iterations {
                        fleet.delivered.store(0, Ordering::Release);
                        let start = Instant::now();
                        fleet.store.append(&stream, ExpectedVersion::Any, vec![event(n)]).await.expect("append");
                        fleet.all_delivered.notified().await;
                        total += start.elapsed();
                        assert_eq!(fleet.delivered.load(Ordering::Acquire), fleet.subscribers);
                    }
                    total
                })
            });
        });
    }
    group.finish();
}

criterion_group!(benches, fanout);
criterion_main!(benches);
