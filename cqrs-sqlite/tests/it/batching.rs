//! Group commit: concurrent appends share transactions, and one append's refusal inside a
//! batch does not affect the others.

use std::sync::Arc;
use std::time::Duration;

use cqrs_core::testing::conformance::event;
use cqrs_core::{
    AppendOutcome, ClaimOutcome, Coordination, EventStore, ExpectedVersion, StoreError, StreamId, Version,
};
use cqrs_sqlite::SqliteStoreConfig;

use crate::support::{in_one_batch, stream, temp_store, Append, Pending};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_append_does_not_fail_its_batch() {
    let temp = temp_store().await;
    let store = &temp.store;
    let taken = stream("taken");
    let reused = cqrs_core::testing::conformance::event(0);
    store.append(&taken, ExpectedVersion::Any, vec![reused.clone()]).await.expect("setup");
    let before = store.stats();

    let first = stream("first");
    let (good, dup) = ((0..10).map(|_| stream("good")).collect::<Vec<_>>(), stream("dup"));
    let mut appends: Vec<Append<'_>> = vec![store.append(&first, ExpectedVersion::Any, vec![event(1)])];
    for (n, good) in (0..10u64).zip(&good) {
        appends.push(store.append(good, ExpectedVersion::NoStream, vec![event(n)]));
        appends.push(store.append(&taken, ExpectedVersion::NoStream, vec![event(100 + n)]));
    }
    appends.push(store.append(&dup, ExpectedVersion::Any, vec![event(7), reused.clone()]));
    let mut answers = in_one_batch(&temp, appends).await.into_iter();

    assert!(matches!(answers.next(), Some(Ok(AppendOutcome::Appended(_)))));
    for _ in 0..10 {
        let outcome = answers.next().expect("answer");
        assert!(matches!(outcome, Ok(AppendOutcome::Appended(_))), "a good append failed: {outcome:?}");
        match answers.next().expect("answer") {
            Err(StoreError::Conflict { actual, .. }) => assert_eq!(actual, Version(1)),
            other => panic!("expected a conflict, got {other:?}"),
        }
    }
    match answers.next().expect("answer") {
        Err(StoreError::DuplicateEventId(id)) => assert_eq!(id, reused.event_id),
        other => panic!("expected a duplicate event id, got {other:?}"),
    }
    let stats = store.stats();
    assert_eq!(stats.transactions - before.transactions, 2, "the first append's, then one batch: {stats:?}");
    assert_eq!(stats.largest_batch, 22);
    assert_eq!(stats.appends - before.appends, 12);
    assert_eq!(stats.refused_appends, 11);
    // The refused appends left nothing behind, and the stream of the reused id is empty.
    assert_eq!(store.stream_version(&taken).await.expect("version"), Version(1));
    assert_eq!(store.stream_version(&dup).await.expect("version"), Version(0));
    let all = store.read_all(cqrs_core::Position::START, 10_000).await.expect("read_all");
    assert_eq!(all.len(), 1 + SqliteStoreConfig::default().max_batch_events + 11);
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

/// What a call of the mixed batch below answered.
#[derive(Debug)]
enum Answered {
    Append(Result<AppendOutcome, StoreError>),
    Claim(Result<ClaimOutcome, StoreError>),
}

/// Ops (here claims, run on sqlx's side of the write connection) between appends (run by the
/// writer directly) in one batch: all in one transaction, each seeing what the ones before it
/// wrote, answered in order after the one commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_between_appends_share_the_batch_and_its_commit() {
    let temp = temp_store().await;
    let store = &temp.store;
    let (a, b, c) = (stream("a"), stream("b"), stream("c"));
    let ttl = Duration::from_secs(30);
    let append = |stream: &StreamId, n: u64| -> Pending<'_, Answered> {
        let stream = stream.clone();
        Box::pin(
            async move { Answered::Append(store.append(&stream, ExpectedVersion::NoStream, vec![event(n)]).await) },
        )
    };
    let claim = |owner: &'static str| -> Pending<'_, Answered> {
        Box::pin(async move { Answered::Claim(store.claim("mixed", owner, ttl).await) })
    };
    let before = store.stats();
    let calls = vec![append(&a, 1), claim("first"), append(&b, 2), append(&a, 3), claim("second"), append(&c, 4)];
    let answers = in_one_batch(&temp, calls).await;

    let stats = store.stats();
    assert_eq!(stats.transactions - before.transactions, 2, "the first append's, then one batch: {stats:?}");
    assert_eq!(stats.largest_batch, 6);
    let appended = |answer: &Answered| matches!(answer, Answered::Append(Ok(AppendOutcome::Appended(_))));
    assert!(appended(&answers[0]) && appended(&answers[2]) && appended(&answers[5]), "{answers:?}");
    assert!(
        matches!(&answers[1], Answered::Claim(Ok(ClaimOutcome::Held(held))) if held.owner == "first"),
        "{answers:?}"
    );
    assert!(matches!(&answers[3], Answered::Append(Err(StoreError::Conflict { .. }))), "{answers:?}");
    // The second claim sees the first, written earlier in the same transaction.
    assert!(
        matches!(&answers[4], Answered::Claim(Ok(ClaimOutcome::Taken { holder, .. })) if holder == "first"),
        "{answers:?}"
    );
    let claims = store.claims().await.expect("claims");
    assert!(claims.iter().any(|held| held.name == "mixed" && held.owner == "first"), "{claims:?}");
    for (stream, version) in [(&a, 1), (&b, 1), (&c, 1)] {
        assert_eq!(store.stream_version(stream).await.expect("version"), Version(version));
    }
}
