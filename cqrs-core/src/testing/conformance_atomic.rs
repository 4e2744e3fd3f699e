//! The atomic-append part of the conformance suite: one append across several streams (or
//! none), all or nothing, with its command id and its condition. Re-exported by
//! [`conformance`](super::conformance) and run by [`conformance_tests!`](crate::conformance_tests).

use std::sync::Arc;

use serde_json::json;

use crate::event::{Metadata, NewEvent};
use crate::ids::{CommandId, Position, StreamId, Version};
use crate::query::{AppendCondition, Query, QueryItem, Tag};
use crate::store::{AppendOutcome, EventStore, ExpectedVersion, StoreError, StreamAppend, UNSTREAMED_PREFIX};
use crate::testing::conformance_dcb::{read_query_all, tagged};

fn stream(name: &str) -> StreamId {
    StreamId::new(format!("atomic-{name}-{}", uuid::Uuid::new_v4().simple())).expect("valid stream id")
}

fn fresh(kind: &str) -> Tag {
    Tag::new(kind, uuid::Uuid::new_v4().simple().to_string())
}

fn with_command(mut event: NewEvent, command_id: CommandId) -> NewEvent {
    event.metadata = Metadata { command_id: Some(command_id), ..event.metadata };
    event
}

/// Every answer of an atomic append that must have been appended, in order.
fn appended(outcomes: &[AppendOutcome]) -> Vec<crate::store::AppendResult> {
    outcomes
        .iter()
        .map(|outcome| match outcome {
            AppendOutcome::Appended(result) => *result,
            AppendOutcome::Duplicate(result) => panic!("expected a fresh append, got a duplicate of {result:?}"),
        })
        .collect()
}

/// One append writes several streams at once: every part at its expected version, one answer
/// per part in order, the events readable by stream and by position; a refused part (a version
/// conflict, a reused event id) leaves every stream and the log as they were.
pub async fn atomic_appends_write_every_stream_or_none<S: EventStore + ?Sized>(store: Arc<S>) {
    let (order, stock, invoice) = (stream("order"), stream("stock"), stream("invoice"));
    store
        .append(&stock, ExpectedVersion::NoStream, vec![tagged("Stocked", &[], json!({"n": 5}))])
        .await
        .expect("stock");
    let parts = vec![
        StreamAppend::new(order.clone(), ExpectedVersion::NoStream, vec![tagged("Placed", &[], json!({}))]),
        StreamAppend::new(
            stock.clone(),
            ExpectedVersion::Exact(Version(1)),
            vec![tagged("Reserved", &[], json!({})), tagged("Reserved", &[], json!({}))],
        ),
    ];
    let results = appended(&store.append_atomic(parts, None).await.expect("atomic append"));
    assert_eq!(results.len(), 2, "one answer per part");
    assert_eq!((results[0].first_version, results[0].last_version), (Version(1), Version(1)));
    assert_eq!((results[1].first_version, results[1].last_version), (Version(2), Version(3)));
    let mut positions: Vec<u64> = results.iter().flat_map(|r| r.first_position.0..=r.last_position.0).collect();
    positions.sort_unstable();
    assert!(positions.windows(2).all(|pair| pair[1] == pair[0] + 1), "one append takes consecutive positions");
    let log = store.read_all(Position(positions[0] - 1), 3).await.expect("read_all");
    assert_eq!(log.iter().map(|event| event.position.0).collect::<Vec<_>>(), positions);
    assert_eq!(store.stream_version(&stock).await.expect("version"), Version(3));

    let head = store.head().await.expect("head");
    let conflicting = vec![
        StreamAppend::new(invoice.clone(), ExpectedVersion::NoStream, vec![tagged("Invoiced", &[], json!({}))]),
        StreamAppend::new(stock.clone(), ExpectedVersion::Exact(Version(1)), vec![tagged("Reserved", &[], json!({}))]),
    ];
    match store.append_atomic(conflicting, None).await {
        Err(StoreError::Conflict { stream_id, actual, .. }) => {
            assert_eq!((stream_id, actual), (stock.clone(), Version(3)), "the conflict names its stream");
        }
        other => panic!("a stale part must refuse the whole append, got {other:?}"),
    }
    let reused = log[0].event_id;
    let mut old_id = tagged("Invoiced", &[], json!({}));
    old_id.event_id = reused;
    let reusing = vec![
        StreamAppend::new(invoice.clone(), ExpectedVersion::NoStream, vec![tagged("Invoiced", &[], json!({}))]),
        StreamAppend::new(order.clone(), ExpectedVersion::Any, vec![old_id]),
    ];
    match store.append_atomic(reusing, None).await {
        Err(StoreError::DuplicateEventId(id)) => assert_eq!(id, reused),
        other => panic!("a reused event id must refuse the whole append, got {other:?}"),
    }
    assert_eq!(store.stream_version(&invoice).await.expect("version"), Version(0), "nothing of a refusal is stored");
    assert_eq!(store.read_all(head, 10).await.expect("read_all").len(), 0, "the log did not move");
}

/// An atomic append's command id is remembered on every stream it wrote: the same append again
/// answers every part a duplicate with its first result and writes nothing; the id reused for
/// another set of streams is refused. Malformed appends are refused before anything is written.
pub async fn atomic_appends_answer_a_repeated_command_with_its_first_outcome<S: EventStore + ?Sized>(store: Arc<S>) {
    let (a, b, c) = (stream("a"), stream("b"), stream("c"));
    let command_id = CommandId::new();
    let parts = |streams: &[&StreamId]| -> Vec<StreamAppend> {
        streams
            .iter()
            .map(|&id| {
                let event = with_command(tagged("Moved", &[], json!({})), command_id);
                StreamAppend::new(id.clone(), ExpectedVersion::Any, vec![event])
            })
            .collect()
    };
    let first = appended(&store.append_atomic(parts(&[&a, &b]), None).await.expect("first"));
    let head = store.head().await.expect("head");
    let again = store.append_atomic(parts(&[&a, &b]), None).await.expect("again");
    assert_eq!(again, first.iter().map(|result| AppendOutcome::Duplicate(*result)).collect::<Vec<_>>());
    match store.append_atomic(parts(&[&a, &c]), None).await {
        Err(StoreError::InvalidAppend(_)) => {}
        other => panic!("a command id reused for other streams must be refused, got {other:?}"),
    }

    let event = || tagged("Moved", &[], json!({}));
    let malformed: Vec<Vec<StreamAppend>> = vec![
        Vec::new(),
        vec![StreamAppend::new(c.clone(), ExpectedVersion::Any, Vec::new())],
        vec![
            StreamAppend::new(c.clone(), ExpectedVersion::Any, vec![event()]),
            StreamAppend::new(c.clone(), ExpectedVersion::Any, vec![event()]),
        ],
        vec![
            StreamAppend::new(c.clone(), ExpectedVersion::Any, vec![with_command(event(), CommandId::new())]),
            StreamAppend::new(stream("d"), ExpectedVersion::Any, vec![with_command(event(), CommandId::new())]),
        ],
    ];
    for parts in malformed {
        match store.append_atomic(parts, None).await {
            Err(StoreError::InvalidAppend(_)) => {}
            other => panic!("a malformed atomic append must be refused, got {other:?}"),
        }
    }
    assert_eq!(store.stream_version(&c).await.expect("version"), Version(0));
    assert_eq!(store.head().await.expect("head"), head, "nothing was written");
}

/// An atomic append with a condition: refused (nothing written) when an event matching the query
/// came after `after`; committed otherwise, its own events not counting against it. Events of no
/// stream ([`StreamAppend::unstreamed`]) are found by query, each in a stream of its own.
pub async fn atomic_appends_check_their_condition_and_take_unstreamed_events<S: EventStore + ?Sized>(store: Arc<S>) {
    let (course, student) = (fresh("course"), fresh("student"));
    let query = Query::from_items([QueryItem::tags([course.clone()])]);
    let before = store.head().await.expect("head");
    store
        .append(
            &stream("course"),
            ExpectedVersion::Any,
            vec![tagged("CourseDefined", std::slice::from_ref(&course), json!({}))],
        )
        .await
        .expect("define");
    let subscribe = || {
        let event = tagged("StudentSubscribed", &[course.clone(), student.clone()], json!({}));
        StreamAppend::unstreamed(vec![event]).expect("unstreamed")
    };
    match store.append_atomic(subscribe(), Some(AppendCondition::new(query.clone(), Some(before)))).await {
        Err(StoreError::ConditionFailed { position }) => assert!(position > before),
        other => panic!("a stale atomic append must fail its condition, got {other:?}"),
    }
    assert_eq!(read_query_all(&*store, &query, Position::START).await.len(), 1, "nothing of it was stored");

    let after = store.head().await.expect("head");
    let results = appended(
        &store
            .append_atomic(subscribe(), Some(AppendCondition::new(query.clone(), Some(after))))
            .await
            .expect("subscribe"),
    );
    let found =
        read_query_all(&*store, &Query::from_items([QueryItem::tags([student.clone()])]), Position::START).await;
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].position, results[0].first_position);
    assert!(found[0].stream_id.as_str().starts_with(UNSTREAMED_PREFIX), "an unstreamed event has a stream of its own");
    assert_eq!(found[0].version, Version(1));
}

/// Many atomic appends race, each writing two streams of its own and the same tag, on the
/// condition that nothing with that tag came after the same position: exactly one commits, and
/// none of the losers' streams holds anything.
pub async fn atomic_appends_with_overlapping_conditions_exactly_one_commits<S: EventStore + ?Sized>(store: Arc<S>) {
    for round in 0..5 {
        let seat = fresh(&format!("seat{round}"));
        let after = store.head().await.expect("head");
        let barrier = Arc::new(tokio::sync::Barrier::new(12));
        let mut tasks = Vec::new();
        for n in 0..12 {
            let (store, seat, barrier) = (store.clone(), seat.clone(), barrier.clone());
            tasks.push(tokio::spawn(async move {
                let (booking, guest) = (stream("booking"), stream("guest"));
                let parts = vec![
                    StreamAppend::new(
                        booking.clone(),
                        ExpectedVersion::NoStream,
                        vec![tagged("Booked", std::slice::from_ref(&seat), json!({ "n": n }))],
                    ),
                    StreamAppend::new(
                        guest.clone(),
                        ExpectedVersion::NoStream,
                        vec![tagged("GuestBooked", &[], json!({ "n": n }))],
                    ),
                ];
                let condition = AppendCondition::new(Query::from_items([QueryItem::tags([seat])]), Some(after));
                barrier.wait().await;
                (store.append_atomic(parts, Some(condition)).await, booking, guest)
            }));
        }
        let mut committed = 0;
        for task in tasks {
            let (outcome, booking, guest) = task.await.expect("task");
            let versions = (
                store.stream_version(&booking).await.expect("version"),
                store.stream_version(&guest).await.expect("version"),
            );
            match outcome {
                Ok(outcomes) => {
                    appended(&outcomes);
                    assert_eq!(versions, (Version(1), Version(1)));
                    committed += 1;
                }
                Err(StoreError::ConditionFailed { position }) => {
                    assert!(position > after);
                    assert_eq!(versions, (Version(0), Version(0)), "a loser wrote neither stream");
                }
                Err(other) => panic!("unexpected error: {other}"),
            }
        }
        assert_eq!(committed, 1, "round {round}: overlapping atomic appends, exactly one commits");
    }
}
