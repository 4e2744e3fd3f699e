//! Group commit: concurrent appends share transactions, and one append's refusal inside a
//! batch does not affect the others.

use std::sync::Arc;
use std::time::Duration;

use cqrs_core::testing::conformance::event;
use cqrs_core::{AppendOutcome, EventStore, ExpectedVersion, StoreError, Version};
use sqlx::{Connection, Executor, SqliteConnection};

use crate::support::{file_of, stream, temp_store};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_share_transactions() {
    const APPENDS: u64 = 200;
    let temp = Arc::new(temp_store().await);
    let tasks: Vec<_> = (0..APPENDS)
        .map(|n| {
            let temp = Arc::clone(&temp);
            tokio::spawn(
                async move { temp.store.append(&stream("batch"), ExpectedVersion::NoStream, vec![event(n)]).await },
            )
        })
        .collect();
    for task in tasks {
        assert!(matches!(task.await.expect("task"), Ok(AppendOutcome::Appended(_))));
    }
    let stats = temp.store.stats();
    println!("{APPENDS} concurrent appends: {stats:?}");
    assert_eq!(stats.appends, APPENDS);
    assert_eq!(stats.events, APPENDS);
    assert!(
        stats.transactions < APPENDS / 2,
        "{APPENDS} concurrent appends took {} transactions: group commit is not batching",
        stats.transactions
    );
    assert!(stats.largest_batch > 1);
}

/// Holds SQLite's write lock from another connection, so the store's writer waits in its
/// `BEGIN IMMEDIATE` while the test queues appends; releasing it lets them all go in one batch.
async fn lock_file(path: &std::path::Path) -> SqliteConnection {
    let url = format!("sqlite://{}", path.display());
    let mut connection = SqliteConnection::connect(&url).await.expect("second connection");
    connection.execute("BEGIN IMMEDIATE").await.expect("take the write lock");
    connection
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_append_does_not_fail_its_batch() {
    let temp = Arc::new(temp_store().await);
    let taken = stream("taken");
    let reused = cqrs_core::testing::conformance::event(0);
    temp.store.append(&taken, ExpectedVersion::Any, vec![reused.clone()]).await.expect("setup");
    let before = temp.store.stats();

    let mut lock = lock_file(&file_of(&temp)).await;
    // The writer takes this one and waits for the lock.
    let first = {
        let temp = Arc::clone(&temp);
        tokio::spawn(async move { temp.store.append(&stream("first"), ExpectedVersion::Any, vec![event(1)]).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut good = Vec::new();
    let mut conflicting = Vec::new();
    for n in 0..10u64 {
        let temp_good = Arc::clone(&temp);
        good.push(tokio::spawn(async move {
            temp_good.store.append(&stream("good"), ExpectedVersion::NoStream, vec![event(n)]).await
        }));
        let temp_bad = Arc::clone(&temp);
        let taken = taken.clone();
        conflicting.push(tokio::spawn(async move {
            temp_bad.store.append(&taken, ExpectedVersion::NoStream, vec![event(100 + n)]).await
        }));
    }
    let duplicate_id = {
        let temp = Arc::clone(&temp);
        let reused = reused.clone();
        tokio::spawn(
            async move { temp.store.append(&stream("dup"), ExpectedVersion::Any, vec![event(7), reused]).await },
        )
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    lock.execute("COMMIT").await.expect("release the write lock");

    assert!(matches!(first.await.expect("task"), Ok(AppendOutcome::Appended(_))));
    for task in good {
        let outcome = task.await.expect("task");
        assert!(matches!(outcome, Ok(AppendOutcome::Appended(_))), "a good append failed: {outcome:?}");
    }
    for task in conflicting {
        match task.await.expect("task") {
            Err(StoreError::Conflict { actual, .. }) => assert_eq!(actual, Version(1)),
            other => panic!("expected a conflict, got {other:?}"),
        }
    }
    match duplicate_id.await.expect("task") {
        Err(StoreError::DuplicateEventId(id)) => assert_eq!(id, reused.event_id),
        other => panic!("expected a duplicate event id, got {other:?}"),
    }
    let stats = temp.store.stats();
    assert_eq!(stats.transactions - before.transactions, 2, "the blocked append, then one batch: {stats:?}");
    assert_eq!(stats.largest_batch, 21);
    assert_eq!(stats.appends - before.appends, 11);
    assert_eq!(stats.refused_appends, 11);
    // The refused appends left nothing behind, and the stream of the reused id is empty.
    assert_eq!(temp.store.stream_version(&taken).await.expect("version"), Version(1));
    let all = temp.store.read_all(cqrs_core::Position::START, 100).await.expect("read_all");
    assert_eq!(all.len(), 12);
    assert!(all.windows(2).all(|w| w[1].position.0 == w[0].position.0 + 1), "no holes from the refused appends");
}

/// A chain (the dispatcher's batch of commands queued on one aggregate) is one request to the
/// writer, so one transaction; a link the database refuses (a reused event id) is answered
/// alone, and no later link is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_is_one_transaction_and_stops_at_a_refused_link() {
    use cqrs_core::testing::conformance::event_with;
    use cqrs_core::{CommandId, Metadata};
    let link = |n: u64| vec![event_with(n, Metadata { command_id: Some(CommandId::new()), ..Metadata::default() })];
    let temp = temp_store().await;
    let s = stream("chain");
    let before = temp.store.stats();
    let answers = temp.store.append_chain(&s, Version(0), (1..=10).map(link).collect()).await;
    assert!(answers.iter().all(|a| matches!(a, Ok(AppendOutcome::Appended(_)))), "{answers:?}");
    let after = temp.store.stats();
    assert_eq!(after.transactions - before.transactions, 1, "one chain, one commit: {after:?}");
    assert_eq!(after.appends - before.appends, 10);

    let reused = temp.store.read_stream(&s, Version(1), 1).await.expect("read")[0].event_id;
    let mut refused = link(12);
    refused[0].event_id = reused;
    let answers = temp.store.append_chain(&s, Version(10), vec![link(11), refused, link(13)]).await;
    assert!(matches!(answers[0], Ok(AppendOutcome::Appended(_))), "{answers:?}");
    assert!(matches!(answers[1], Err(StoreError::DuplicateEventId(id)) if id == reused), "{answers:?}");
    assert!(matches!(answers[2], Err(StoreError::Conflict { .. })), "{answers:?}");
    assert_eq!(temp.store.stream_version(&s).await.expect("version"), Version(11));
    assert_eq!(temp.store.stats().transactions - after.transactions, 1);
}
