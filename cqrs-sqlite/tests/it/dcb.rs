//! Dynamic Consistency Boundaries on SQLite, beyond the shared conformance cases: conditions
//! inside one group-commit batch see the batch's earlier appends, and tags are stored in order
//! and indexed on every write path (set-based, step by step, chains).

use cqrs_core::testing::conformance::tagged;
use cqrs_core::{
    AppendCondition, AppendOutcome, EventStore, ExpectedVersion, Position, Query, QueryItem, StoreError, Tag, Version,
};
use serde_json::json;

use crate::support::{in_one_batch, stream, temp_store, Append};

fn tag(name: &str) -> Tag {
    Tag::new("seat", format!("{name}-{}", uuid::Uuid::new_v4().simple()))
}

/// Conditional appends queued into one batch with overlapping queries: the first commits, and
/// every later one fails on the first's event (or on a plain append earlier in the batch),
/// although none of those was committed when the batch began. Unconditional appends between
/// them all commit.
#[tokio::test]
async fn conditions_in_one_batch_see_the_batch_s_earlier_appends() {
    let temp = temp_store().await;
    let store = &temp.store;
    let (seat, other) = (tag("shared"), tag("other"));
    let on = |tag: &Tag| Query::from_items([QueryItem::tags([tag.clone()])]);
    let after = store.head().await.expect("head");
    let conditional = |tag: &Tag| -> Append<'_> {
        let condition = AppendCondition::new(on(tag), Some(after));
        let events = vec![tagged("SeatTaken", std::slice::from_ref(tag), json!({}))];
        let stream = stream("racer");
        Box::pin(
            async move { store.append_with_condition(&stream, ExpectedVersion::Any, events, Some(condition)).await },
        )
    };
    let plain = |tags: Vec<Tag>| -> Append<'_> {
        let stream = stream("plain");
        Box::pin(async move {
            store.append(&stream, ExpectedVersion::NoStream, vec![tagged("Plain", &tags, json!({}))]).await
        })
    };
    let mut appends = vec![conditional(&seat)];
    for _ in 0..6 {
        appends.push(plain(Vec::new()));
        appends.push(conditional(&seat));
    }
    // A plain append of a tag, then a condition on it, in the same batch.
    appends.push(plain(vec![other.clone()]));
    appends.push(conditional(&other));
    let total = appends.len();
    let before = store.stats();
    let answers = in_one_batch(&temp, appends).await;

    let stats = store.stats();
    assert_eq!(stats.transactions - before.transactions, 2, "the first append's, then one batch: {stats:?}");
    assert_eq!(stats.largest_batch, total as u64);
    let first = answers[0].as_ref().expect("the first conditional append commits").result();
    for (n, answer) in answers.iter().enumerate().take(13).skip(1) {
        match answer {
            Ok(AppendOutcome::Appended(_)) if n % 2 == 1 => {}
            Err(StoreError::ConditionFailed { position }) if n % 2 == 0 => assert_eq!(*position, first.first_position),
            other => panic!("append {n}: {other:?}"),
        }
    }
    let tagged_plain = answers[13].as_ref().expect("plain").result();
    match &answers[14] {
        Err(StoreError::ConditionFailed { position }) => assert_eq!(*position, tagged_plain.first_position),
        other => panic!("the condition on the plain append's tag: {other:?}"),
    }
    assert_eq!(store.read_query(&on(&seat), Position::START, 10).await.expect("read").len(), 1);
}

/// One conditional append of an event tagged `tags`, on `query` after `after`.
fn decide<'a>(store: &'a cqrs_sqlite::SqliteEventStore, query: Query, after: Position, tags: Vec<Tag>) -> Append<'a> {
    let events = vec![tagged("SeatTaken", &tags, json!({}))];
    let condition = AppendCondition::new(query, Some(after));
    let stream = stream("decider");
    Box::pin(async move { store.append_with_condition(&stream, ExpectedVersion::Any, events, Some(condition)).await })
}

/// The position a conditional append of a batch was refused at.
fn failed_at(answer: &Result<AppendOutcome, StoreError>) -> Position {
    match answer {
        Err(StoreError::ConditionFailed { position }) => *position,
        other => panic!("expected a failed condition: {other:?}"),
    }
}

/// Conditional appends of one batch, some of whose queries match an earlier one's event and
/// some not (of one tag, or of types and tags, or of several items), with a condition failing on
/// a stored event among them: each is answered as if the appends ran one after the other (an
/// overlapping one fails on the first's event), and still in one transaction.
#[tokio::test]
async fn grouped_conditions_answer_as_if_run_one_by_one() {
    let temp = temp_store().await;
    let store = &temp.store;
    let (a, b, c, d, e) = (tag("a"), tag("b"), tag("c"), tag("d"), tag("e"));
    let on = |tag: &Tag| Query::from_items([QueryItem::tags([tag.clone()])]);
    let after = store.head().await.expect("head");
    let stored = store
        .append(
            &stream("stored"),
            ExpectedVersion::NoStream,
            vec![tagged("SeatTaken", std::slice::from_ref(&d), json!({}))],
        )
        .await
        .expect("append")
        .result()
        .first_position;
    let seat_d = Query::from_items([QueryItem::types(["SeatTaken"]).with_tags([d.clone()])]);
    let c_or_e = Query::from_items([QueryItem::tags([c.clone()]), QueryItem::tags([e.clone()])]);
    let appends = vec![
        decide(store, on(&a), after, vec![a.clone()]),         // 0: commits
        decide(store, on(&b), after, vec![b.clone()]),         // 1: commits
        decide(store, on(&a), after, vec![a.clone()]),         // 2: fails on 0
        decide(store, on(&d), after, vec![c.clone()]),         // 3: fails on the stored event
        decide(store, on(&b), after, vec![b.clone()]),         // 4: fails on 1
        decide(store, seat_d, after, vec![]),                  // 5: fails on the stored event
        decide(store, c_or_e.clone(), after, vec![e.clone()]), // 6: commits (3 was refused)
        decide(store, c_or_e, after, vec![]),                  // 7: fails on 6
    ];
    let total = appends.len() as u64;
    let before = store.stats();
    let answers = in_one_batch(&temp, appends).await;

    let stats = store.stats();
    assert_eq!(stats.transactions - before.transactions, 2, "the first append's, then one batch: {stats:?}");
    assert_eq!(stats.largest_batch, total);
    let committed = |n: usize| answers[n].as_ref().unwrap_or_else(|error| panic!("append {n}: {error}")).result();
    assert_eq!(failed_at(&answers[2]), committed(0).first_position);
    assert_eq!(failed_at(&answers[3]), stored);
    assert_eq!(failed_at(&answers[4]), committed(1).first_position);
    assert_eq!(failed_at(&answers[5]), stored);
    assert_eq!(failed_at(&answers[7]), committed(6).first_position);
    for tag in [&a, &b, &e] {
        assert_eq!(store.read_query(&on(tag), after, 10).await.expect("read").len(), 1, "{tag}");
    }
    assert!(store.read_query(&on(&c), after, 10).await.expect("read").is_empty());
}

/// A batch whose every conditional append fails writes nothing, answers each, and commits.
#[tokio::test]
async fn a_batch_of_failing_conditions_writes_nothing() {
    let temp = temp_store().await;
    let store = &temp.store;
    let seat = tag("taken");
    let on = Query::from_items([QueryItem::tags([seat.clone()])]);
    let after = store.head().await.expect("head");
    let taken = vec![tagged("SeatTaken", std::slice::from_ref(&seat), json!({}))];
    let stored = store.append(&stream("taken"), ExpectedVersion::NoStream, taken).await.expect("append").result();
    let before = store.stats();
    let answers = in_one_batch(
        &temp,
        vec![decide(store, on.clone(), after, vec![seat.clone()]), decide(store, on, after, vec![seat])],
    )
    .await;
    assert!(answers.iter().all(|answer| failed_at(answer) == stored.first_position), "{answers:?}");
    assert_eq!(store.stats().transactions - before.transactions, 2, "the first append's, then one batch");
    // After the taken seat, only the first append's events: the batch wrote nothing.
    let later = store.read_all(stored.last_position, 10_000).await.expect("read");
    assert!(later.iter().all(|event| &*event.event_type != "SeatTaken"), "{later:?}");
}

/// Each item of a query reads at most a page of its own positions: read page by page, a query
/// of several items (one tag; two tags and a type; a type) interleaving in the log finds exactly
/// the events matching one of them, in order, as a filter of the whole log does.
#[tokio::test]
async fn paged_reads_of_several_items_match_a_filter_of_the_log() {
    let temp = temp_store().await;
    let store = &temp.store;
    let (a, b, c) = (tag("a"), tag("b"), tag("c"));
    let start = store.head().await.expect("head");
    let kinds = [vec![a.clone()], vec![b.clone(), c.clone()], vec![b.clone()], vec![c.clone()], vec![]];
    for n in 0..60 {
        let tags = &kinds[n % kinds.len()];
        let event_type = ["Odd", "Even", "Third"][n % 3];
        let events = vec![tagged(event_type, tags, json!({ "n": n }))];
        store.append(&stream("mixed"), ExpectedVersion::NoStream, events).await.expect("append");
    }
    let query = Query::from_items([
        QueryItem::tags([a.clone()]),
        QueryItem::types(["Even"]).with_tags([b.clone(), c.clone()]),
        QueryItem::types(["Third"]),
    ]);
    let paged = cqrs_core::testing::conformance::read_query_all(store, &query, start).await;
    let log = store.read_all(start, 1_000).await.expect("read_all");
    let expected: Vec<Position> =
        log.iter().filter(|event| query.matches(&event.event_type, &event.tags)).map(|event| event.position).collect();
    assert!(expected.len() > 20, "the items interleave: {}", expected.len());
    assert_eq!(paged.iter().map(|event| event.position).collect::<Vec<_>>(), expected);
}

/// The positions a tag is indexed at, read from the index table itself.
async fn indexed(store: &cqrs_sqlite::SqliteEventStore, tag: &Tag) -> Vec<i64> {
    sqlx::query_scalar("SELECT position FROM cqrs_event_tags WHERE tag = ?1 ORDER BY position")
        .bind(tag.as_str())
        .fetch_all(store.read_pool())
        .await
        .expect("index")
}

/// Tags come back in the order given (repeats included) from every read, and are indexed once
/// per event, whichever way the writer stored them: set-based, step by step (an append too big
/// for one statement), as a chain, or a conditional append.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_are_stored_in_order_and_indexed_on_every_write_path() {
    let temp = temp_store().await;
    let store = &temp.store;
    let (a, b) = (tag("a"), tag("b"));
    let s = stream("tags");
    // Set-based.
    let event = tagged("Tagged", &[b.clone(), a.clone(), b.clone()], json!({}));
    let one = store.append(&s, ExpectedVersion::NoStream, vec![event]).await.expect("append").result();
    let read = store.read_stream(&s, Version(1), 1).await.expect("read_stream");
    assert_eq!(&*read[0].tags, &[b.clone(), a.clone(), b.clone()]);
    let all = store.read_all(Position(one.first_position.0 - 1), 1).await.expect("read_all");
    assert_eq!(all[0].tags, read[0].tags);
    let position = i64::try_from(one.first_position.0).expect("position");
    assert_eq!(indexed(store, &a).await, [position]);
    assert_eq!(indexed(store, &b).await, [position], "a repeated tag is indexed once");

    // Step by step: more events than one set-based statement takes.
    let big = tag("big");
    let events: Vec<_> = (0..300).map(|n| tagged("Big", std::slice::from_ref(&big), json!({ "n": n }))).collect();
    let stored = store.append(&stream("big"), ExpectedVersion::NoStream, events).await.expect("append").result();
    let by_tag = Query::from_items([QueryItem::tags([big.clone()])]);
    let found = cqrs_core::testing::conformance::read_query_all(store, &by_tag, Position::START).await;
    assert_eq!(found.len(), 300);
    assert_eq!(found[0].position, stored.first_position);
    assert!(found.iter().all(|event| &*event.tags == std::slice::from_ref(&big)));
    assert_eq!(indexed(store, &big).await.len(), 300);

    // A chain.
    let linked = tag("chain");
    let links = (0..3).map(|n| vec![tagged("Linked", std::slice::from_ref(&linked), json!({ "n": n }))]).collect();
    let answers = store.append_chain(&stream("chain"), Version(0), links).await;
    assert!(answers.iter().all(Result::is_ok), "{answers:?}");
    assert_eq!(indexed(store, &linked).await.len(), 3);

    // A conditional append, then a read by type and tag.
    let decided = tag("decided");
    let condition = AppendCondition::new(Query::from_items([QueryItem::tags([decided.clone()])]), None);
    let events = vec![tagged("Decided", &[decided.clone(), a.clone()], json!({}))];
    store
        .append_with_condition(&stream("decided"), ExpectedVersion::Any, events, Some(condition))
        .await
        .expect("append");
    let query = Query::from_items([QueryItem::types(["Decided", "Tagged"]).with_tags([a.clone()])]);
    let found = store.read_query(&query, Position::START, 10).await.expect("read_query");
    assert_eq!(found.iter().map(|e| e.event_type.as_ref()).collect::<Vec<&str>>(), ["Tagged", "Decided"]);
}
