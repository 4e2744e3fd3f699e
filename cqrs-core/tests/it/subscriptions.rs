//! How often a caught-up subscription reads the store: once per wake-up, not once more after
//! every delivered page.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use cqrs_core::testing::conformance::event;
use cqrs_core::{EventStore, ExpectedVersion, NewEvent, Position, StreamId, Subscription};

use crate::dispatcher::Instrumented;

fn stream() -> StreamId {
    StreamId::new("counted-1").expect("valid")
}

#[tokio::test]
async fn a_caught_up_subscription_reads_once_per_notification() {
    let store = Arc::new(Instrumented::default());
    store.append(&stream(), ExpectedVersion::Any, vec![event(1), event(2)]).await.expect("append");
    let mut feed = Subscription::all(Arc::clone(&store), Position::START);
    assert_eq!(feed.next().await.expect("read").map(|e| e.position), Some(Position(1)));
    assert_eq!(feed.next().await.expect("read").map(|e| e.position), Some(Position(2)));
    assert_eq!(store.all_reads.load(Ordering::SeqCst), 1, "one short page holds both events");
    // Caught up: waiting reads nothing more until something is appended.
    assert!(tokio::time::timeout(Duration::from_millis(50), feed.next()).await.is_err());
    assert_eq!(store.all_reads.load(Ordering::SeqCst), 1, "no read after a short page without a notification");
    assert_eq!(feed.try_next().await.expect("read").map(|e| e.position), None);
    assert_eq!(store.all_reads.load(Ordering::SeqCst), 1);
    // A new event: one notification, one read, delivered.
    store.append(&stream(), ExpectedVersion::Any, vec![event(3)]).await.expect("append");
    assert_eq!(feed.next().await.expect("read").map(|e| e.position), Some(Position(3)));
    assert_eq!(store.all_reads.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_full_page_is_followed_by_another_read() {
    let store = Arc::new(Instrumented::default());
    let events: Vec<NewEvent> = (1..=5).map(event).collect();
    store.append(&stream(), ExpectedVersion::Any, events).await.expect("append");
    let mut feed = Subscription::all(Arc::clone(&store), Position::START).with_page_size(2);
    let mut positions = Vec::new();
    while let Ok(Some(event)) =
        tokio::time::timeout(Duration::from_millis(50), feed.next()).await.map(|r| r.expect("read"))
    {
        positions.push(event.position.0);
    }
    assert_eq!(positions, [1, 2, 3, 4, 5]);
    assert_eq!(store.all_reads.load(Ordering::SeqCst), 3, "pages of 2, 2 and 1; the short one ends the catch-up");
}

#[tokio::test]
async fn a_failed_read_does_not_lose_the_wake_up() {
    let store = Arc::new(Instrumented::default());
    store.append(&stream(), ExpectedVersion::Any, vec![event(1)]).await.expect("append");
    let mut feed = Subscription::all(Arc::clone(&store), Position::START);
    assert_eq!(feed.next().await.expect("read").map(|e| e.position), Some(Position(1)));
    // Caught up. An event arrives, and the read it triggers fails.
    store.fail_next_read_all.store(true, Ordering::SeqCst);
    store.append(&stream(), ExpectedVersion::Any, vec![event(2)]).await.expect("append");
    assert!(feed.next().await.is_err(), "the read failed");
    // The memory store has no poll tick: only the pending wake-up can bring the event.
    let next = tokio::time::timeout(Duration::from_secs(5), feed.next()).await;
    assert_eq!(next.expect("the event still comes").expect("read").map(|e| e.position), Some(Position(2)));
}

#[tokio::test]
async fn a_cancelled_read_does_not_lose_the_wake_up() {
    let store = Arc::new(Instrumented::default());
    store.append(&stream(), ExpectedVersion::Any, vec![event(1)]).await.expect("append");
    let mut feed = Subscription::all(Arc::clone(&store), Position::START);
    assert_eq!(feed.next().await.expect("read").map(|e| e.position), Some(Position(1)));
    // A slow read, given up by the caller (as the handler runner's checkpoint timer does).
    store.hold_read_all.store(true, Ordering::SeqCst);
    store.append(&stream(), ExpectedVersion::Any, vec![event(2)]).await.expect("append");
    assert!(tokio::time::timeout(Duration::from_millis(50), feed.next()).await.is_err(), "cancelled mid-read");
    store.hold_read_all.store(false, Ordering::SeqCst);
    let next = tokio::time::timeout(Duration::from_secs(5), feed.next()).await;
    assert_eq!(next.expect("the event still comes").expect("read").map(|e| e.position), Some(Position(2)));
}

/// While catching up, the next page is read ahead in a task of its own. Through slow reads
/// given up by the caller, failed reads and a subscription dropped mid-catch-up, every event
/// still arrives once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_ahead_while_catching_up_delivers_every_event_once_in_order() {
    let store = Arc::new(Instrumented::default());
    for chunk in 0..20u64 {
        let events: Vec<NewEvent> = (0..10).map(|n| event(chunk * 10 + n)).collect();
        store.append(&stream(), ExpectedVersion::Any, events).await.expect("append");
    }
    // Dropped mid-catch-up with a read ahead in flight: nothing hangs, nothing is left behind.
    {
        let mut feed = Subscription::all(Arc::clone(&store), Position::START).with_page_size(7);
        assert_eq!(feed.next().await.expect("read").map(|e| e.position), Some(Position(1)));
    }
    let mut feed = Subscription::all(Arc::clone(&store), Position::START).with_page_size(7);
    let mut positions = Vec::new();
    for round in 0u32..10_000 {
        if positions.len() == 200 {
            break;
        }
        match round % 5 {
            0 => store.hold_read_all.store(true, Ordering::SeqCst),
            3 => store.fail_next_read_all.store(true, Ordering::SeqCst),
            _ => {}
        }
        let next = tokio::time::timeout(Duration::from_millis(2), feed.next()).await;
        store.hold_read_all.store(false, Ordering::SeqCst);
        if let Ok(Ok(Some(event))) = next {
            positions.push(event.position.0);
        }
    }
    store.fail_next_read_all.store(false, Ordering::SeqCst);
    assert_eq!(positions, (1..=200).collect::<Vec<u64>>());
    assert!(tokio::time::timeout(Duration::from_millis(50), feed.next()).await.is_err(), "nothing more");
}
