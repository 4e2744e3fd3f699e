//! The Dynamic Consistency Boundary part of the conformance suite: tags, reads by query and
//! conditional appends, with the specification's examples (dcb.events) and the concurrent race
//! every store must win. Re-exported by [`conformance`](super::conformance) and run by
//! [`conformance_tests!`](crate::conformance_tests).

use std::collections::HashSet;
use std::sync::Arc;

use serde_json::json;

use crate::event::{Metadata, NewEvent, RecordedEvent};
use crate::ids::{CommandId, EventId, Position, StreamId};
use crate::query::{AppendCondition, Query, QueryItem, Tag};
use crate::store::{AppendOutcome, AppendResult, EventStore, ExpectedVersion, StoreError};

/// A test event of `event_type` with `tags` and a JSON payload.
pub fn tagged(event_type: &str, tags: &[Tag], payload: serde_json::Value) -> NewEvent {
    NewEvent {
        event_id: EventId::new(),
        event_type: event_type.to_owned(),
        schema_version: 1,
        payload,
        metadata: Metadata::default(),
        tags: tags.to_vec(),
    }
}

/// A tag unique to this run, so tests sharing a database never see each other's events.
fn fresh(kind: &str, name: &str) -> Tag {
    Tag::new(kind, format!("{name}-{}", uuid::Uuid::new_v4().simple()))
}

fn dcb_stream(name: &str) -> StreamId {
    StreamId::new(format!("dcb-{name}-{}", uuid::Uuid::new_v4().simple())).expect("valid stream id")
}

/// Every event `query` matches after `after`, page by page.
pub async fn read_query_all<S: EventStore + ?Sized>(store: &S, query: &Query, after: Position) -> Vec<RecordedEvent> {
    let mut all: Vec<RecordedEvent> = Vec::new();
    let mut from = after;
    loop {
        let page = store.read_query(query, from, 7).await.expect("read_query");
        let Some(last) = page.last() else { return all };
        from = last.position;
        all.extend(page);
    }
}

/// Every event of the log, by `read_all` pages.
async fn read_log<S: EventStore + ?Sized>(store: &S) -> Vec<RecordedEvent> {
    let mut all: Vec<RecordedEvent> = Vec::new();
    loop {
        let after = all.last().map_or(Position::START, |last| last.position);
        let page = store.read_all(after, 500).await.expect("read_all");
        if page.is_empty() {
            return all;
        }
        all.extend(page);
    }
}

/// The decision loop a decider runs, as a store user would write it without the dispatcher:
/// read what `query` matches, let `decide` turn it into events (or refuse), append them with the
/// condition `after` = the newest position read; on a failed condition, read and decide again.
/// Returns the outcome, or `Err(reason)` when `decide` refused.
pub async fn decide_and_append<S, F>(
    store: &S,
    stream_id: &StreamId,
    query: Query,
    decide: F,
) -> Result<AppendResult, String>
where
    S: EventStore + ?Sized,
    F: Fn(&[RecordedEvent]) -> Result<Vec<NewEvent>, String>,
{
    for _ in 0..1_000 {
        // The head first: every event at or below it is readable, so a read that returns
        // nothing newer still proves the decision saw everything up to the head.
        let head = store.head().await.expect("head");
        let facts = read_query_all(store, &query, Position::START).await;
        let after = facts.iter().map(|event| event.position).max().unwrap_or(Position::START).max(head);
        let events = decide(&facts)?;
        // Let the other deciders read the same facts: the race is the point.
        tokio::task::yield_now().await;
        let condition = AppendCondition::new(query.clone(), Some(after));
        match store.append_with_condition(stream_id, ExpectedVersion::Any, events, Some(condition)).await {
            Ok(outcome) => return Ok(outcome.result()),
            Err(StoreError::ConditionFailed { position }) => {
                assert!(position > after, "a failed condition names a position after `after`");
            }
            Err(other) => panic!("conditional append failed: {other}"),
        }
    }
    panic!("a decision lost 1000 races in a row")
}

/// Tags survive the store, every way of reading returns them, and reads by query follow the
/// specification: an item matches on one of its types and all of its tags, a query on any of
/// its items, `Query::all` on everything, no items on nothing; `after` and `max_count` hold.
pub async fn dcb_tags_round_trip_and_read_by_query<S: EventStore + ?Sized>(store: Arc<S>) {
    let (c1, c2, s7) = (fresh("course", "c1"), fresh("course", "c2"), fresh("student", "s7"));
    let stream = dcb_stream("tags");
    let events = vec![
        tagged("CourseDefined", std::slice::from_ref(&c1), json!({"capacity": 2})),
        tagged("CourseDefined", std::slice::from_ref(&c2), json!({"capacity": 9})),
        tagged("StudentSubscribed", &[c1.clone(), s7.clone()], json!({})),
        tagged("StudentSubscribed", &[c2.clone(), s7.clone(), s7.clone()], json!({})),
        tagged("Untagged", &[], json!({})),
    ];
    let stored = store.append(&stream, ExpectedVersion::NoStream, events).await.expect("append").result();
    let first = stored.first_position.0;
    let by_stream = store.read_stream(&stream, crate::ids::Version(1), 10).await.expect("read_stream");
    assert_eq!(&*by_stream[2].tags, &[c1.clone(), s7.clone()], "tags come back in the stored order");
    assert!(by_stream[4].tags.is_empty());
    let positions = |events: &[RecordedEvent]| events.iter().map(|e| e.position.0 - first).collect::<Vec<_>>();

    let course_c1 = Query::from_items([QueryItem::tags([c1.clone()])]);
    assert_eq!(positions(&read_query_all(&*store, &course_c1, Position::START).await), [0, 2]);
    let subscriptions_of_s7 = Query::from_items([QueryItem::types(["StudentSubscribed"]).with_tags([s7.clone()])]);
    assert_eq!(positions(&read_query_all(&*store, &subscriptions_of_s7, Position::START).await), [2, 3]);
    let both = Query::from_items([QueryItem::tags([c2.clone(), s7.clone()])]);
    assert_eq!(positions(&read_query_all(&*store, &both, Position::START).await), [3], "all of an item's tags");
    let either = Query::from_items([
        QueryItem::types(["CourseDefined"]).with_tags([c2.clone()]),
        QueryItem::types(["StudentSubscribed"]).with_tags([c1.clone()]),
    ]);
    assert_eq!(positions(&read_query_all(&*store, &either, Position::START).await), [1, 2], "any item");
    let wrong_type = Query::from_items([QueryItem::types(["Nope"]).with_tags([c1.clone()])]);
    assert!(read_query_all(&*store, &wrong_type, Position::START).await.is_empty());
    assert!(read_query_all(&*store, &Query::none(), Position::START).await.is_empty());
    let all = read_query_all(&*store, &Query::all(), Position(first - 1)).await;
    assert_eq!(positions(&all), [0, 1, 2, 3, 4], "Query::all reads everything after `after`");
    let untagged_type = Query::from_items([QueryItem::types(["Untagged", "CourseDefined"])]);
    let found = store.read_query(&untagged_type, Position(first), 10).await.expect("read_query");
    assert_eq!(positions(&found), [1, 4], "types only, and strictly after `after`");
    let limited = store.read_query(&Query::all(), Position(first - 1), 2).await.expect("read_query");
    assert_eq!(positions(&limited), [0, 1], "max_count");
    let huge = Query::from_items((0..1_000).map(|n| QueryItem::types([format!("T{n}")])));
    assert!(matches!(store.read_query(&huge, Position::START, 1).await, Err(StoreError::InvalidQuery(_))));
}

/// A condition fails, naming the first matching position, when a matching event was stored
/// after `after`, and writes nothing; events that do not match, or came before `after`, do not
/// make it fail; a repeated command id answers its first outcome before the condition is
/// looked at.
pub async fn dcb_conditions_fail_only_on_later_matching_events<S: EventStore + ?Sized>(store: Arc<S>) {
    let (user, other) = (fresh("username", "ada"), fresh("username", "grace"));
    let stream = dcb_stream("cond");
    let query = Query::from_items([QueryItem::types(["UserRegistered"]).with_tags([user.clone()])]);
    let first = store
        .append_with_condition(
            &stream,
            ExpectedVersion::Any,
            vec![tagged("UserRegistered", std::slice::from_ref(&user), json!({}))],
            Some(AppendCondition::new(query.clone(), None)),
        )
        .await
        .expect("nothing matches yet")
        .result();
    let head_before = store.head().await.expect("head");
    let again = store
        .append_with_condition(
            &stream,
            ExpectedVersion::Any,
            vec![tagged("UserRegistered", std::slice::from_ref(&user), json!({}))],
            Some(AppendCondition::new(query.clone(), None)),
        )
        .await;
    match again {
        Err(StoreError::ConditionFailed { position }) => assert_eq!(position, first.first_position),
        other => panic!("a matching event after `after` must fail the condition, got {other:?}"),
    }
    assert_eq!(store.head().await.expect("head"), head_before, "a failed condition writes nothing");
    // Stored before `after`: no conflict. Not matching (other tag, other type): no conflict.
    store
        .append(&stream, ExpectedVersion::Any, vec![tagged("UserRegistered", std::slice::from_ref(&other), json!({}))])
        .await
        .expect("append");
    store
        .append(&stream, ExpectedVersion::Any, vec![tagged("UserRenamed", std::slice::from_ref(&user), json!({}))])
        .await
        .expect("append");
    let command_id = CommandId::new();
    let mut with_command = tagged("UserRegistered", std::slice::from_ref(&user), json!({}));
    with_command.metadata.command_id = Some(command_id);
    let condition = AppendCondition::new(query.clone(), Some(first.last_position));
    let stored = store
        .append_with_condition(&stream, ExpectedVersion::Any, vec![with_command.clone()], Some(condition.clone()))
        .await
        .expect("only earlier or non-matching events: the condition holds");
    assert!(matches!(stored, AppendOutcome::Appended(_)));
    // The same command again: its first outcome, although the condition now fails.
    with_command.event_id = EventId::new();
    let repeated = store
        .append_with_condition(&stream, ExpectedVersion::Any, vec![with_command], Some(condition))
        .await
        .expect("a repeated command id answers its first outcome");
    assert_eq!(repeated, AppendOutcome::Duplicate(stored.result()));
    // A version conflict is reported before the condition.
    let stale = store
        .append_with_condition(
            &stream,
            ExpectedVersion::NoStream,
            vec![tagged("UserRegistered", std::slice::from_ref(&user), json!({}))],
            Some(AppendCondition::new(query, None)),
        )
        .await;
    assert!(matches!(stale, Err(StoreError::Conflict { .. })), "got {stale:?}");
}

/// The specification's course subscriptions: a course holds at most its capacity, a student
/// at most 3 courses, both in one decision with no saga; many students race for few seats.
pub async fn dcb_course_subscriptions_respect_capacity_and_student_limit<S: EventStore + ?Sized>(store: Arc<S>) {
    let courses: Vec<Tag> = (0..3).map(|n| fresh("course", &format!("c{n}"))).collect();
    for course in &courses {
        let defined = tagged("CourseDefined", std::slice::from_ref(course), json!({"capacity": 4}));
        store.append(&dcb_stream("course"), ExpectedVersion::Any, vec![defined]).await.expect("define");
    }
    let students: Vec<Tag> = (0..6).map(|n| fresh("student", &format!("s{n}"))).collect();
    let mut tasks = Vec::new();
    for student in students.clone() {
        for course in courses.clone() {
            let store = store.clone();
            let student = student.clone();
            tasks.push(tokio::spawn(async move {
                let query = Query::from_items([
                    QueryItem::types(["CourseDefined", "StudentSubscribed"]).with_tags([course.clone()]),
                    QueryItem::types(["StudentSubscribed"]).with_tags([student.clone()]),
                ]);
                decide_and_append(&*store, &dcb_stream("sub"), query, |facts| {
                    let capacity = facts
                        .iter()
                        .find(|e| &*e.event_type == "CourseDefined")
                        .and_then(|e| e.payload["capacity"].as_u64())
                        .ok_or("no such course")?;
                    let subscribed = |tag: &Tag| {
                        facts.iter().filter(|e| &*e.event_type == "StudentSubscribed" && e.tags.contains(tag)).count()
                    };
                    if subscribed(&course) as u64 >= capacity {
                        return Err("course full".into());
                    }
                    if subscribed(&student) >= 2 {
                        return Err("student at their limit".into());
                    }
                    Ok(vec![tagged("StudentSubscribed", &[course.clone(), student.clone()], json!({}))])
                })
                .await
            }));
        }
    }
    let mut admitted = 0;
    for task in tasks {
        if task.await.expect("task").is_ok() {
            admitted += 1;
        }
    }
    let subscribed = |tag: &Tag| {
        let store = store.clone();
        let query = Query::from_items([QueryItem::types(["StudentSubscribed"]).with_tags([tag.clone()])]);
        async move { read_query_all(&*store, &query, Position::START).await.len() }
    };
    let mut total = 0;
    for course in &courses {
        let seats = subscribed(course).await;
        assert!(seats <= 4, "course {course} holds {seats} students, over its capacity of 4");
        total += seats;
    }
    for student in &students {
        assert!(subscribed(student).await <= 2, "student {student} over their limit");
    }
    assert_eq!(total, admitted, "every admitted subscription is stored, no other");
    assert!(total >= 8, "at least two courses fill up: {total} subscriptions");
}

/// The specification's unique user name: a name is taken once; deleting the user releases it.
pub async fn dcb_unique_user_names_are_released_on_deletion<S: EventStore + ?Sized>(store: Arc<S>) {
    let name = fresh("username", "ada");
    let query = Query::from_items([QueryItem::types(["UserRegistered", "UserDeleted"]).with_tags([name.clone()])]);
    let register = {
        let name = name.clone();
        move |facts: &[RecordedEvent]| {
            let taken = facts.last().is_some_and(|e| &*e.event_type == "UserRegistered");
            if taken {
                Err("name taken".to_owned())
            } else {
                Ok(vec![tagged("UserRegistered", std::slice::from_ref(&name), json!({}))])
            }
        }
    };
    let mut racers = Vec::new();
    for _ in 0..8 {
        let (store, query, register) = (store.clone(), query.clone(), register.clone());
        racers
            .push(tokio::spawn(async move { decide_and_append(&*store, &dcb_stream("user"), query, register).await }));
    }
    let mut winners = 0;
    for racer in racers {
        winners += usize::from(racer.await.expect("task").is_ok());
    }
    assert_eq!(winners, 1, "one registration of a name among 8 concurrent ones");
    decide_and_append(&*store, &dcb_stream("user"), query.clone(), |facts| {
        assert_eq!(facts.len(), 1);
        Ok(vec![tagged("UserDeleted", std::slice::from_ref(&name), json!({}))])
    })
    .await
    .expect("delete");
    decide_and_append(&*store, &dcb_stream("user"), query.clone(), register).await.expect("the name is free again");
}

/// The specification's gapless invoice numbers: concurrent invoices get 1, 2, 3... with no gap
/// and no number twice, decided on the last `InvoiceCreated` alone.
pub async fn dcb_invoice_numbers_are_gapless_under_concurrency<S: EventStore + ?Sized>(store: Arc<S>) {
    let series = uuid::Uuid::new_v4().simple().to_string();
    let event_type = format!("InvoiceCreated{series}");
    let query = Query::from_items([QueryItem::types([event_type.clone()])]);
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (store, query, event_type) = (store.clone(), query.clone(), event_type.clone());
        tasks.push(tokio::spawn(async move {
            decide_and_append(&*store, &dcb_stream("invoice"), query, |facts| {
                let next = facts.last().and_then(|e| e.payload["number"].as_u64()).unwrap_or(0) + 1;
                Ok(vec![tagged(&event_type, &[Tag::new("invoice", next)], json!({ "number": next }))])
            })
            .await
        }));
    }
    for task in tasks {
        task.await.expect("task").expect("an invoice is always decided");
    }
    let numbers: Vec<u64> = read_query_all(&*store, &query, Position::START)
        .await
        .iter()
        .map(|e| e.payload["number"].as_u64().expect("number"))
        .collect();
    assert_eq!(numbers, (1..=16).collect::<Vec<_>>(), "gapless, in log order");
}

/// The specification's opt-in "once" constraint: an operation carrying an idempotency token is
/// stored once however many times (and however concurrently) it is submitted.
pub async fn dcb_once_tokens_store_an_operation_once<S: EventStore + ?Sized>(store: Arc<S>) {
    let token = fresh("once", "payment");
    let query = Query::from_items([QueryItem::tags([token.clone()])]);
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let (store, query, token) = (store.clone(), query.clone(), token.clone());
        tasks.push(tokio::spawn(async move {
            decide_and_append(&*store, &dcb_stream("once"), query, |facts| {
                if facts.is_empty() {
                    Ok(vec![tagged("PaymentMade", std::slice::from_ref(&token), json!({}))])
                } else {
                    Err("already done".into())
                }
            })
            .await
        }));
    }
    let mut done = 0;
    for task in tasks {
        done += usize::from(task.await.expect("task").is_ok());
    }
    assert_eq!(done, 1);
    assert_eq!(read_query_all(&*store, &query, Position::START).await.len(), 1);
}

/// The race: many conditional appends whose queries overlap, all made after the same read;
/// exactly one commits per round. Appends with disjoint queries made after the same read all
/// commit. (Marten's READ COMMITTED bug let two overlapping ones commit.)
pub async fn dcb_overlapping_conditional_appends_exactly_one_commits<S: EventStore + ?Sized>(store: Arc<S>) {
    for round in 0..10 {
        let shared = fresh("seat", &format!("r{round}"));
        let after = store.head().await.expect("head");
        let barrier = Arc::new(tokio::sync::Barrier::new(16));
        let mut tasks = Vec::new();
        for n in 0..16 {
            let (store, shared, barrier) = (store.clone(), shared.clone(), barrier.clone());
            tasks.push(tokio::spawn(async move {
                // Half the racers write the shared tag with their own query, half query it and
                // write an event of their own: each pair still overlaps one way.
                let own = fresh("racer", &n.to_string());
                let (query, tags) = if n % 2 == 0 {
                    (Query::from_items([QueryItem::tags([shared.clone()])]), vec![shared.clone(), own])
                } else {
                    (
                        Query::from_items([QueryItem::types(["SeatTaken"]).with_tags([shared.clone()])]),
                        vec![shared.clone()],
                    )
                };
                barrier.wait().await;
                store
                    .append_with_condition(
                        &dcb_stream("race"),
                        ExpectedVersion::Any,
                        vec![tagged("SeatTaken", &tags, json!({ "n": n }))],
                        Some(AppendCondition::new(query, Some(after))),
                    )
                    .await
            }));
        }
        let mut committed = 0;
        for task in tasks {
            match task.await.expect("task") {
                Ok(_) => committed += 1,
                Err(StoreError::ConditionFailed { position }) => assert!(position > after),
                Err(other) => panic!("unexpected error: {other}"),
            }
        }
        assert_eq!(committed, 1, "round {round}: overlapping conditional appends, exactly one commits");
    }
    let after = store.head().await.expect("head");
    let mut tasks = Vec::new();
    for n in 0..16 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let own = fresh("disjoint", &n.to_string());
            let query = Query::from_items([QueryItem::tags([own.clone()])]);
            store
                .append_with_condition(
                    &dcb_stream("disjoint"),
                    ExpectedVersion::Any,
                    vec![tagged("SeatTaken", &[own], json!({}))],
                    Some(AppendCondition::new(query, Some(after))),
                )
                .await
        }));
    }
    for task in tasks {
        task.await.expect("task").expect("disjoint queries all commit");
    }
}

/// Stream appends (tagged by their events) and conditional appends over the same log: a
/// conditional append never commits past a matching event stored through a stream append.
pub async fn dcb_stream_appends_are_seen_by_conditions<S: EventStore + ?Sized>(store: Arc<S>) {
    let account = fresh("account", "a1");
    let stream = dcb_stream("account");
    let query = Query::from_items([QueryItem::tags([account.clone()])]);
    let after = store.head().await.expect("head");
    store
        .append(
            &stream,
            ExpectedVersion::NoStream,
            vec![tagged("AccountOpened", std::slice::from_ref(&account), json!({}))],
        )
        .await
        .expect("stream append");
    let stale = store
        .append_with_condition(
            &dcb_stream("decision"),
            ExpectedVersion::Any,
            vec![tagged("Decided", std::slice::from_ref(&account), json!({}))],
            Some(AppendCondition::new(query.clone(), Some(after))),
        )
        .await;
    assert!(matches!(stale, Err(StoreError::ConditionFailed { .. })), "got {stale:?}");
    // Concurrently: each round, stream appenders and conditional appenders on one tag; every
    // committed conditional append must have no matching event between its `after` and itself.
    random_conditional_appends(store, 3, 4, 6, 0x5eed).await;
}

/// The property: random concurrent conditional appends (random queries over a few tags and
/// types, random `after`s near the head) commit exactly when no event matching their query came
/// after their `after`.
pub async fn dcb_random_conditional_appends_commit_exactly_when_valid<S: EventStore + ?Sized>(store: Arc<S>) {
    random_conditional_appends(store, 4, 3, 12, 0xdcb).await;
}

/// One conditional append the property test made, and its answer.
struct Attempt {
    query: Query,
    after: Position,
    answer: Result<AppendResult, Position>,
}

async fn random_conditional_appends<S: EventStore + ?Sized>(
    store: Arc<S>,
    tag_count: usize,
    type_count: usize,
    tasks: usize,
    seed: u64,
) {
    let tags: Vec<Tag> = (0..tag_count).map(|n| fresh("t", &n.to_string())).collect();
    let types: Vec<String> = (0..type_count).map(|n| format!("Random{n}")).collect();
    let mut handles = Vec::new();
    for task in 0..tasks {
        let (store, tags, types) = (store.clone(), tags.clone(), types.clone());
        handles.push(tokio::spawn(async move {
            let mut rng = SplitMix(seed ^ (task as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut attempts = Vec::new();
            for _ in 0..12 {
                let pick_tags = |rng: &mut SplitMix, most: usize| -> Vec<Tag> {
                    let mut chosen: Vec<Tag> =
                        (0..rng.below(most + 1)).map(|_| tags[rng.below(tags.len())].clone()).collect();
                    chosen.dedup();
                    chosen
                };
                let event_tags = pick_tags(&mut rng, 2);
                let event_type = types[rng.below(types.len())].clone();
                let event = tagged(&event_type, &event_tags, json!({}));
                if rng.below(4) == 0 {
                    // A plain stream append, tagged: conditions must see it too.
                    store.append(&dcb_stream("plain"), ExpectedVersion::Any, vec![event]).await.expect("append");
                    continue;
                }
                let items = (0..1 + rng.below(2)).map(|_| {
                    let item_types: Vec<String> =
                        (0..rng.below(2)).map(|_| types[rng.below(types.len())].clone()).collect();
                    QueryItem { types: item_types, tags: pick_tags(&mut rng, 1) }
                });
                let query = Query::from_items(
                    items.filter(|item| !(item.tags.is_empty() && item.types.is_empty())).collect::<Vec<_>>(),
                );
                let head = store.head().await.expect("head").0;
                let after = Position(head.saturating_sub(rng.below(3) as u64));
                let condition = AppendCondition::new(query.clone(), Some(after));
                let answer = match store
                    .append_with_condition(&dcb_stream("cond"), ExpectedVersion::Any, vec![event], Some(condition))
                    .await
                {
                    Ok(outcome) => Ok(outcome.result()),
                    Err(StoreError::ConditionFailed { position }) => Err(position),
                    Err(other) => panic!("unexpected error: {other}"),
                };
                attempts.push(Attempt { query, after, answer });
            }
            attempts
        }));
    }
    let mut attempts = Vec::new();
    for handle in handles {
        attempts.extend(handle.await.expect("task"));
    }
    let log = read_log(&*store).await;
    check_attempts(&attempts, &log);
}

/// Each committed attempt had no matching event between its `after` and itself; each failed
/// one names a matching event after its `after`.
fn check_attempts(attempts: &[Attempt], log: &[RecordedEvent]) {
    let mut seen = HashSet::new();
    for attempt in attempts {
        let matching_after = |until: Position| {
            log.iter()
                .filter(|e| e.position > attempt.after && e.position < until)
                .find(|e| attempt.query.matches(&e.event_type, &e.tags))
                .map(|e| e.position)
        };
        match attempt.answer {
            Ok(result) => {
                assert!(seen.insert(result.first_position));
                assert_eq!(
                    matching_after(result.first_position),
                    None,
                    "a conditional append committed at {} although a matching event came after {}",
                    result.first_position,
                    attempt.after
                );
            }
            Err(position) => {
                let event = log.iter().find(|e| e.position == position).expect("the named position holds an event");
                assert!(position > attempt.after, "a failed condition names a position after `after`");
                assert!(attempt.query.matches(&event.event_type, &event.tags), "the named event matches the query");
            }
        }
    }
}

/// A small deterministic generator (SplitMix64), so a failing run can be repeated.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, bound: usize) -> usize {
        (self.next() % bound.max(1) as u64) as usize
    }
}
