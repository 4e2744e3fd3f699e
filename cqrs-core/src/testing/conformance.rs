//! The store conformance suite: one `pub async fn` per property of the [`EventStore`] and
//! [`Coordination`](crate::Coordination) contracts. Every backend runs all of them, usually through
//! [`conformance_tests!`](crate::conformance_tests), which emits one `#[tokio::test]` per property.
//!
//! Each function takes a fresh, empty store and panics with a message naming the broken rule.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::aggregate::CommandEnvelope;
use crate::coordination::ClaimOutcome;
use crate::dispatcher::{Dispatcher, SnapshotPolicy};
use crate::event::{Metadata, NewEvent, RecordedEvent, Upcasters};
use crate::ids::{CausationId, CommandId, CorrelationId, EventId, Position, StreamId, Timestamp, Version};
use crate::store::{AppendOutcome, AppendResult, EventStore, ExpectedVersion, Snapshot, Store, StoreError};
use crate::subscription::Subscription;
use crate::testing::counter::{Counter, CounterCommand};
use crate::testing::saga;

pub use crate::testing::conformance_atomic::*;
pub use crate::testing::conformance_dcb::*;

/// Emits one `#[tokio::test]` per conformance property for a store.
///
/// `$make` is an expression evaluating to an async closure-like `Fn() -> impl Future<Output =
/// Arc<S>>` that returns a fresh, empty store. The calling crate needs `tokio` with the `macros`
/// and `rt-multi-thread` features as a dev-dependency.
///
/// ```text
/// cqrs_core::conformance_tests!(|| async { std::sync::Arc::new(MemoryStore::new()) });
/// ```
#[macro_export]
macro_rules! conformance_tests {
    ($make:expr) => {
        $crate::conformance_tests!(@each $make;
            round_trip_and_stream_order,
            unknown_streams_are_empty,
            expected_version_rules,
            invalid_appends_are_refused,
            concurrent_appends_at_same_version_exactly_one_wins,
            concurrent_appends_with_any_version_lose_nothing,
            mixed_concurrent_appends_are_answered_as_stored,
            read_all_is_in_global_order,
            subscription_from_start_catches_up_then_goes_live,
            subscription_from_middle_sees_only_later_events,
            stream_subscription_catches_up_then_goes_live,
            slow_subscriber_sees_everything,
            checkpoints_round_trip,
            idempotent_command_ids,
            metadata_round_trip,
            dispatcher_idempotency_survives_restart,
            dispatcher_state_matches_store_under_concurrency,
            snapshots_round_trip,
            dispatcher_snapshots_give_the_same_state,
            head_is_the_last_readable_event,
            events_decode_by_their_stored_name,
            handlers_take_their_category_only,
            command_ids_are_forgotten_when_pruned,
            follow_up_commands_are_idempotent_and_traceable,
            strong_consistency_from_a_standby_process,
            claims_have_one_holder_at_a_time,
            claims_expire_and_fence_checkpoints,
            parked_events_round_trip,
            parked_writes_are_fenced_by_the_claim,
            process_state_and_schedules_round_trip,
            chains_store_a_link_only_right_after_the_links_before_it,
            hot_stream_commands_are_decided_on_every_earlier_event,
            process_repeated_step_is_refused,
            process_replay_over_a_stopped_instance_sends_nothing,
            process_cancel_and_schedule_of_one_name_moves_it,
            process_a_failed_firing_is_retried_without_moving_the_clock,
            process_tombstones_round_trip_and_prune,
            process_refusals_are_compensated_from_the_decided_state,
            scheduled_commands_are_set_aside_and_retried,
            process_unfireable_scheduled_commands_do_not_block_the_rest,
            process_instances_end_from_a_reaction_and_are_listed,
            process_renamed_manager_continues_where_the_old_name_stopped,
            dcb_tags_round_trip_and_read_by_query,
            dcb_conditions_fail_only_on_later_matching_events,
            dcb_course_subscriptions_respect_capacity_and_student_limit,
            dcb_unique_user_names_are_released_on_deletion,
            dcb_invoice_numbers_are_gapless_under_concurrency,
            dcb_once_tokens_store_an_operation_once,
            dcb_overlapping_conditional_appends_exactly_one_commits,
            dcb_stream_appends_are_seen_by_conditions,
            dcb_random_conditional_appends_commit_exactly_when_valid,
            atomic_appends_write_every_stream_or_none,
            atomic_appends_answer_a_repeated_command_with_its_first_outcome,
            atomic_appends_check_their_condition_and_take_unstreamed_events,
            atomic_appends_with_overlapping_conditions_exactly_one_commits,
        );
    };
    (@each $make:expr; $($property:ident),+ $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $property() {
                let make = $make;
                let store = make().await;
                $crate::testing::conformance::$property(store).await;
            }
        )+
    };
}

/// A test event with a marker `n`.
pub fn event(n: u64) -> NewEvent {
    event_with(n, Metadata::default())
}

/// A test event with a marker `n` and metadata.
pub fn event_with(n: u64, metadata: Metadata) -> NewEvent {
    NewEvent {
        event_id: EventId::new(),
        event_type: "TestHappened".to_owned(),
        schema_version: 1,
        payload: json!({ "n": n, "note": format!("event number {n}") }),
        metadata,
        tags: Vec::new(),
    }
}

fn marker(event: &RecordedEvent) -> u64 {
    event.payload["n"].as_u64().unwrap_or_else(|| panic!("test event without marker: {:?}", event.payload))
}

fn stream(name: &str) -> StreamId {
    StreamId::new(format!("test-{name}-{}", uuid::Uuid::new_v4().simple())).expect("valid stream id")
}

async fn append_ok<S: EventStore + ?Sized>(
    store: &S,
    stream_id: &StreamId,
    expected: ExpectedVersion,
    events: Vec<NewEvent>,
) -> AppendResult {
    match store.append(stream_id, expected, events).await {
        Ok(AppendOutcome::Appended(result)) => result,
        other => panic!("append to {stream_id} with {expected:?} should succeed, got {other:?}"),
    }
}

/// Every event of the log, by `read_all` pages.
pub async fn read_everything<S: EventStore + ?Sized>(store: &S) -> Vec<RecordedEvent> {
    let mut all = Vec::new();
    let mut after = Position::START;
    loop {
        let page = store.read_all(after, 100).await.expect("read_all");
        match page.last() {
            Some(last) => after = last.position,
            None => return all,
        }
        all.extend(page);
    }
}

async fn read_whole_stream<S: EventStore + ?Sized>(store: &S, stream_id: &StreamId) -> Vec<RecordedEvent> {
    store.read_stream(stream_id, Version(1), usize::MAX).await.expect("read_stream")
}

/// Appended events come back intact, per stream, in version order from 1; `from` and
/// `max_count` are honoured; results carry contiguous versions and increasing positions.
pub async fn round_trip_and_stream_order<S: EventStore + ?Sized>(store: Arc<S>) {
    let a = stream("a");
    let b = stream("b");
    let first = append_ok(&*store, &a, ExpectedVersion::NoStream, vec![event(1), event(2), event(3)]).await;
    assert_eq!((first.first_version, first.last_version), (Version(1), Version(3)));
    assert!(first.first_position < first.last_position, "positions must increase within an append");
    let other = append_ok(&*store, &b, ExpectedVersion::Any, vec![event(10)]).await;
    assert!(other.first_position > first.last_position, "later append must have a later position");
    let sent = vec![event(4), event(5)];
    let second = append_ok(&*store, &a, ExpectedVersion::Exact(Version(3)), sent.clone()).await;
    assert_eq!((second.first_version, second.last_version), (Version(4), Version(5)));

    let events = read_whole_stream(&*store, &a).await;
    assert_eq!(events.iter().map(marker).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
    assert_eq!(events.iter().map(|e| e.version.0).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
    assert!(events.windows(2).all(|w| w[0].position < w[1].position), "stream positions must increase");
    assert!(events.iter().all(|e| e.stream_id == a));
    assert_eq!(events[3].event_id, sent[0].event_id);
    assert_eq!(&*events[3].event_type, "TestHappened");
    assert_eq!(events[3].schema_version, 1);
    assert_eq!(events[3].payload, sent[0].payload);
    assert_eq!(events[4].position, second.last_position);

    let tail = store.read_stream(&a, Version(3), 2).await.expect("read_stream from 3");
    assert_eq!(tail.iter().map(marker).collect::<Vec<_>>(), vec![3, 4]);
    assert_eq!(store.stream_version(&a).await.expect("version"), Version(5));
    assert_eq!(store.stream_version(&b).await.expect("version"), Version(1));
}

/// An unknown stream reads as empty with version 0.
pub async fn unknown_streams_are_empty<S: EventStore + ?Sized>(store: Arc<S>) {
    let nowhere = stream("nowhere");
    assert!(read_whole_stream(&*store, &nowhere).await.is_empty());
    assert_eq!(store.stream_version(&nowhere).await.expect("version"), Version::NONE);
    assert!(store.read_all(Position::START, 10).await.expect("read_all").is_empty());
    assert_eq!(store.find_command(&nowhere, CommandId::new()).await.expect("find_command"), None);
}

fn assert_conflict(result: Result<AppendOutcome, StoreError>, expected: ExpectedVersion, actual: Version) {
    match result {
        Err(StoreError::Conflict { expected: e, actual: a, .. }) => {
            assert_eq!((e, a), (expected, actual), "conflict must report what was expected and what is")
        }
        other => panic!("expected a conflict ({expected:?} vs {actual}), got {other:?}"),
    }
}

/// `Any`, `NoStream`, `StreamExists` and `Exact(n)` accept and refuse as documented, and a
/// refused append writes nothing.
pub async fn expected_version_rules<S: EventStore + ?Sized>(store: Arc<S>) {
    let s = stream("rules");
    assert_conflict(
        store.append(&s, ExpectedVersion::StreamExists, vec![event(0)]).await,
        ExpectedVersion::StreamExists,
        Version(0),
    );
    assert_conflict(
        store.append(&s, ExpectedVersion::Exact(Version(1)), vec![event(0)]).await,
        ExpectedVersion::Exact(Version(1)),
        Version(0),
    );
    append_ok(&*store, &s, ExpectedVersion::Exact(Version(0)), vec![event(1)]).await;
    assert_conflict(
        store.append(&s, ExpectedVersion::NoStream, vec![event(0)]).await,
        ExpectedVersion::NoStream,
        Version(1),
    );
    append_ok(&*store, &s, ExpectedVersion::StreamExists, vec![event(2)]).await;
    assert_conflict(
        store.append(&s, ExpectedVersion::Exact(Version(1)), vec![event(0)]).await,
        ExpectedVersion::Exact(Version(1)),
        Version(2),
    );
    assert_conflict(
        store.append(&s, ExpectedVersion::Exact(Version(9)), vec![event(0)]).await,
        ExpectedVersion::Exact(Version(9)),
        Version(2),
    );
    append_ok(&*store, &s, ExpectedVersion::Exact(Version(2)), vec![event(3)]).await;
    append_ok(&*store, &s, ExpectedVersion::Any, vec![event(4)]).await;
    let markers: Vec<_> = read_whole_stream(&*store, &s).await.iter().map(marker).collect();
    assert_eq!(markers, vec![1, 2, 3, 4], "refused appends must not write anything");
    assert_eq!(read_everything(&*store).await.len(), 4, "refused appends must not reach the global log");
}

/// Empty appends, mixed command ids and reused event ids are refused and write nothing.
pub async fn invalid_appends_are_refused<S: EventStore + ?Sized>(store: Arc<S>) {
    let s = stream("invalid");
    assert!(matches!(store.append(&s, ExpectedVersion::Any, Vec::new()).await, Err(StoreError::InvalidAppend(_))));
    let mixed = vec![
        event_with(1, Metadata { command_id: Some(CommandId::new()), ..Metadata::default() }),
        event_with(2, Metadata { command_id: Some(CommandId::new()), ..Metadata::default() }),
    ];
    assert!(matches!(store.append(&s, ExpectedVersion::Any, mixed).await, Err(StoreError::InvalidAppend(_))));
    let stored = event(3);
    append_ok(&*store, &s, ExpectedVersion::Any, vec![stored.clone()]).await;
    let reused = vec![event(4), stored.clone()];
    let other = stream("other");
    assert!(
        matches!(store.append(&other, ExpectedVersion::Any, reused).await, Err(StoreError::DuplicateEventId(id)) if id == stored.event_id)
    );
    let within = event(5);
    let twice = vec![within.clone(), within];
    assert!(matches!(store.append(&other, ExpectedVersion::Any, twice).await, Err(StoreError::DuplicateEventId(_))));
    assert_eq!(store.stream_version(&other).await.expect("version"), Version::NONE);
    assert_eq!(read_everything(&*store).await.len(), 1);
}

/// Many writers append at the same expected version at once: exactly one wins per round, the
/// others get a conflict, and the stream holds exactly the winners' events.
pub async fn concurrent_appends_at_same_version_exactly_one_wins<S: EventStore + ?Sized>(store: Arc<S>) {
    const WRITERS: u64 = 8;
    const ROUNDS: u64 = 10;
    let s = stream("race");
    let mut winners = Vec::new();
    for round in 0..ROUNDS {
        let expected = ExpectedVersion::Exact(Version(round));
        let tasks: Vec<_> = (0..WRITERS)
            .map(|writer| {
                let store = Arc::clone(&store);
                let s = s.clone();
                tokio::spawn(
                    async move { (writer, store.append(&s, expected, vec![event(round * 100 + writer)]).await) },
                )
            })
            .collect();
        let mut won = Vec::new();
        for task in tasks {
            let (writer, result) = task.await.expect("task");
            match result {
                Ok(AppendOutcome::Appended(result)) => {
                    assert_eq!(result.last_version, Version(round + 1));
                    won.push(round * 100 + writer);
                }
                Err(StoreError::Conflict { actual, .. }) => assert_eq!(actual, Version(round + 1)),
                other => panic!("unexpected append result {other:?}"),
            }
        }
        assert_eq!(won.len(), 1, "exactly one writer must win round {round}, winners: {won:?}");
        winners.extend(won);
    }
    let markers: Vec<_> = read_whole_stream(&*store, &s).await.iter().map(marker).collect();
    assert_eq!(markers, winners);
}

/// Many writers append with `Any` to a few streams at once: every event is stored once, and
/// every stream's versions are contiguous.
pub async fn concurrent_appends_with_any_version_lose_nothing<S: EventStore + ?Sized>(store: Arc<S>) {
    const WRITERS: u64 = 16;
    const PER_WRITER: u64 = 20;
    let streams: Vec<_> = (0..3).map(|i| stream(&format!("any{i}"))).collect();
    let tasks: Vec<_> = (0..WRITERS)
        .map(|writer| {
            let store = Arc::clone(&store);
            let streams = streams.clone();
            tokio::spawn(async move {
                for i in 0..PER_WRITER {
                    let s = &streams[usize::try_from((writer + i) % 3).expect("small")];
                    let events = vec![event(writer * 1000 + i * 2), event(writer * 1000 + i * 2 + 1)];
                    append_ok(&*store, s, ExpectedVersion::Any, events).await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("writer task");
    }
    let mut seen = HashSet::new();
    for s in &streams {
        let events = read_whole_stream(&*store, s).await;
        for (index, event) in events.iter().enumerate() {
            assert_eq!(event.version, Version(index as u64 + 1), "versions of {s} must be contiguous");
            assert!(seen.insert(marker(event)), "event {} stored twice", marker(event));
        }
        // The two events of one append stay adjacent.
        for pair in events.chunks(2) {
            assert_eq!(marker(&pair[0]) + 1, marker(&pair[1]), "an append must be contiguous in its stream");
        }
    }
    assert_eq!(seen.len() as u64, WRITERS * PER_WRITER * 2);
    assert_eq!(read_everything(&*store).await.len() as u64, WRITERS * PER_WRITER * 2);
}

/// Rounds of appends queued all at once (so a group-committing store writes each round in a
/// few batches), mixing streams that recur within a batch, every expected-version kind, a
/// command id stored before, a command id sent twice in one round, and an event id stored
/// before: every answer agrees with what is stored, and nothing unanswered is stored.
pub async fn mixed_concurrent_appends_are_answered_as_stored<S: EventStore + ?Sized>(store: Arc<S>) {
    let streams: Vec<StreamId> = (0..4).map(|i| stream(&format!("mixed{i}"))).collect();
    let stored_command = CommandId::new();
    let first = vec![mixed_event(0, Some(stored_command)), mixed_event(1, Some(stored_command))];
    let stored = append_ok(&*store, &streams[0], ExpectedVersion::NoStream, first).await;
    append_ok(&*store, &streams[1], ExpectedVersion::NoStream, vec![event(2)]).await;
    let reused_event = read_whole_stream(&*store, &streams[1]).await[0].event_id;
    let answers = send_mixed_rounds(&store, &streams, stored_command, reused_event).await;
    let log = stored_by_event_id(&*store, &streams).await;
    let mut by_command: HashMap<(usize, CommandId), AppendResult> = HashMap::from([((0, stored_command), stored)]);
    // The two appends before the rounds stored 3 events.
    let acknowledged = 3 + check_appended(&answers, &log, &streams, &mut by_command);
    check_refused(&answers, &log, &by_command, reused_event);
    assert_eq!(log.len(), acknowledged, "every stored event was acknowledged as appended");
}

/// One append of [`mixed_concurrent_appends_are_answered_as_stored`], as sent.
struct Sent {
    stream: usize,
    expected: ExpectedVersion,
    command_id: Option<CommandId>,
    event_ids: Vec<EventId>,
}

type Answers = Vec<(Sent, Result<AppendOutcome, StoreError>)>;

fn mixed_event(n: u64, command_id: Option<CommandId>) -> NewEvent {
    event_with(n, Metadata { command_id, ..Metadata::default() })
}

/// The rounds of [`mixed_concurrent_appends_are_answered_as_stored`], each sent all at once.
async fn send_mixed_rounds<S: EventStore + ?Sized>(
    store: &Arc<S>,
    streams: &[StreamId],
    stored_command: CommandId,
    reused_event: EventId,
) -> Answers {
    const ROUNDS: u64 = 6;
    const PER_ROUND: u64 = 24;
    let mut answers = Vec::new();
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut random = move |bound: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % bound
    };
    let mut n = 10;
    for round in 0..ROUNDS {
        let twice = CommandId::new();
        let mut tasks = Vec::new();
        for i in 0..PER_ROUND {
            let stream = usize::try_from(random(4)).expect("small");
            let expected = match random(5) {
                0 | 1 => ExpectedVersion::Any,
                2 => ExpectedVersion::NoStream,
                3 => ExpectedVersion::StreamExists,
                _ => ExpectedVersion::Exact(Version(random(round * 8 + 4))),
            };
            let (stream, expected, command_id) = match i {
                // The command id stored before: a duplicate whatever its expected version.
                3 => (0, expected, Some(stored_command)),
                // One command id twice in the round, on one stream.
                7 | 8 => (2, ExpectedVersion::Any, Some(twice)),
                _ => (stream, expected, (random(2) == 0).then(CommandId::new)),
            };
            let mut events: Vec<NewEvent> = (0..=random(3))
                .map(|_| {
                    n += 1;
                    mixed_event(n, command_id)
                })
                .collect();
            let expected = if i == 5 {
                // An event id stored before, in an append that would otherwise be stored.
                events[0].event_id = reused_event;
                ExpectedVersion::Any
            } else {
                expected
            };
            let sent = Sent { stream, expected, command_id, event_ids: events.iter().map(|e| e.event_id).collect() };
            let store = Arc::clone(store);
            let stream_id = streams[stream].clone();
            tasks.push(tokio::spawn(async move {
                let outcome = store.append(&stream_id, expected, events).await;
                (sent, outcome)
            }));
        }
        for task in tasks {
            answers.push(task.await.expect("append task"));
        }
    }
    answers
}

/// Every event of `streams` by id, checking versions are contiguous and positions increase.
async fn stored_by_event_id<S: EventStore + ?Sized>(
    store: &S,
    streams: &[StreamId],
) -> HashMap<EventId, RecordedEvent> {
    let mut log = HashMap::new();
    for (index, stream_id) in streams.iter().enumerate() {
        let events = read_whole_stream(store, stream_id).await;
        for (at, event) in events.iter().enumerate() {
            assert_eq!(event.version, Version(at as u64 + 1), "versions of stream {index} must be contiguous");
            if at > 0 {
                assert!(event.position > events[at - 1].position, "a stream's positions must increase");
            }
            assert!(log.insert(event.event_id, event.clone()).is_none(), "event {} stored twice", event.event_id);
        }
    }
    log
}

/// Checks every `Appended` answer against what is stored; returns how many events they stored
/// and records each command id's result in `by_command`.
fn check_appended(
    answers: &Answers,
    log: &HashMap<EventId, RecordedEvent>,
    streams: &[StreamId],
    by_command: &mut HashMap<(usize, CommandId), AppendResult>,
) -> usize {
    let mut acknowledged = 0;
    for (sent, outcome) in answers {
        let Ok(AppendOutcome::Appended(result)) = outcome else { continue };
        let events: Vec<&RecordedEvent> = sent
            .event_ids
            .iter()
            .map(|id| log.get(id).unwrap_or_else(|| panic!("appended event {id} is not stored")))
            .collect();
        assert!(events.iter().all(|e| e.stream_id == streams[sent.stream]), "stored in another stream");
        let versions: Vec<u64> = events.iter().map(|e| e.version.0).collect();
        let wanted: Vec<u64> = (result.first_version.0..=result.last_version.0).collect();
        assert_eq!(versions, wanted, "the answer's versions must be the stored ones");
        assert_eq!(events.first().map(|e| e.position), Some(result.first_position));
        assert_eq!(events.last().map(|e| e.position), Some(result.last_position));
        match sent.expected {
            ExpectedVersion::Any => {}
            ExpectedVersion::NoStream => assert_eq!(result.first_version, Version(1), "NoStream appended late"),
            ExpectedVersion::StreamExists => assert!(result.first_version > Version(1), "StreamExists appended first"),
            ExpectedVersion::Exact(version) => {
                assert_eq!(result.first_version, Version(version.0 + 1), "Exact appended elsewhere")
            }
        }
        acknowledged += sent.event_ids.len();
        if let Some(command_id) = sent.command_id {
            let earlier = by_command.insert((sent.stream, command_id), *result);
            assert!(earlier.is_none(), "command {command_id} appended twice");
        }
    }
    acknowledged
}

/// Checks every answer that is not `Appended`: it stored nothing, for the right reason.
fn check_refused(
    answers: &Answers,
    log: &HashMap<EventId, RecordedEvent>,
    by_command: &HashMap<(usize, CommandId), AppendResult>,
    reused_event: EventId,
) {
    let stored_count = |sent: &Sent| sent.event_ids.iter().filter(|id| log.contains_key(id)).count();
    for (sent, outcome) in answers {
        match outcome {
            Ok(AppendOutcome::Appended(_)) => {}
            Ok(AppendOutcome::Duplicate(result)) => {
                let command_id = sent.command_id.expect("a duplicate needs a command id");
                let first = by_command.get(&(sent.stream, command_id));
                assert_eq!(first, Some(result), "a duplicate answers the first result");
                assert_eq!(stored_count(sent), 0, "a duplicate stores nothing");
            }
            Err(StoreError::Conflict { .. }) => {
                assert_ne!(sent.expected, ExpectedVersion::Any, "Any never conflicts");
                assert_eq!(stored_count(sent), 0, "a conflict stores nothing");
            }
            Err(StoreError::DuplicateEventId(id)) => {
                assert_eq!(*id, reused_event);
                let others = sent.event_ids.iter().filter(|id| **id != reused_event && log.contains_key(id)).count();
                assert_eq!(others, 0, "a refused append stores nothing");
            }
            Err(error) => panic!("unexpected answer {error}"),
        }
        if sent.event_ids.contains(&reused_event) {
            assert!(
                matches!(outcome, Err(StoreError::DuplicateEventId(_))),
                "an append of a stored event id must be refused, got {outcome:?}"
            );
        }
    }
}

/// `read_all` returns every event once, in strictly increasing positions, agrees with each
/// stream's order, and resumes correctly from any position.
pub async fn read_all_is_in_global_order<S: EventStore + ?Sized>(store: Arc<S>) {
    let a = stream("a");
    let b = stream("b");
    for n in 0..30u64 {
        let s = if n % 3 == 0 { &b } else { &a };
        append_ok(&*store, s, ExpectedVersion::Any, vec![event(n)]).await;
    }
    let all = read_everything(&*store).await;
    assert_eq!(all.iter().map(marker).collect::<Vec<_>>(), (0..30).collect::<Vec<_>>(), "commit order");
    assert!(all.windows(2).all(|w| w[0].position < w[1].position));
    let middle = all[11].position;
    let rest = store.read_all(middle, 1000).await.expect("read_all");
    assert_eq!(rest.iter().map(marker).collect::<Vec<_>>(), (12..30).collect::<Vec<_>>());
    let limited = store.read_all(middle, 5).await.expect("read_all");
    assert_eq!(limited.len(), 5);
    let positions_of_a: Vec<_> = all.iter().filter(|e| e.stream_id == a).map(|e| e.version).collect();
    assert_eq!(positions_of_a, (1..=20).map(Version).collect::<Vec<_>>());
}

/// Writes `count` events from `writers` concurrent tasks over three streams.
fn spawn_writers<S: EventStore + ?Sized>(
    store: &Arc<S>,
    writers: u64,
    per_writer: u64,
    first_marker: u64,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..writers)
        .map(|writer| {
            let store = Arc::clone(store);
            tokio::spawn(async move {
                let streams: Vec<_> = (0..3).map(|i| stream(&format!("w{writer}s{i}"))).collect();
                for i in 0..per_writer {
                    let n = first_marker + writer * per_writer + i;
                    let s = &streams[usize::try_from(i % 3).expect("small")];
                    append_ok(&*store, s, ExpectedVersion::Any, vec![event(n)]).await;
                    if i % 7 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            })
        })
        .collect()
}

async fn collect<S: EventStore + ?Sized>(feed: &mut Subscription<S>, count: usize) -> Vec<RecordedEvent> {
    let mut got = Vec::with_capacity(count);
    while got.len() < count {
        let next = tokio::time::timeout(Duration::from_secs(30), feed.next())
            .await
            .unwrap_or_else(|_| panic!("subscription stalled after {} of {count} events", got.len()));
        got.push(next.expect("subscription error").expect("store closed"));
    }
    got
}

fn assert_same_feed(got: &[RecordedEvent], expected: &[RecordedEvent]) {
    assert_eq!(got.len(), expected.len(), "subscription must see every event exactly once");
    for (g, e) in got.iter().zip(expected) {
        assert_eq!((g.position, g.event_id), (e.position, e.event_id), "subscription order must match read_all");
    }
}

/// A subscription from the start sees stored events, then events appended by concurrent
/// writers while it runs: each exactly once, in `read_all` order.
pub async fn subscription_from_start_catches_up_then_goes_live<S: EventStore + ?Sized>(store: Arc<S>) {
    let s = stream("before");
    for n in 0..50 {
        append_ok(&*store, &s, ExpectedVersion::Any, vec![event(n)]).await;
    }
    let mut feed = Subscription::all(Arc::clone(&store), Position::START).with_page_size(16);
    let writers = spawn_writers(&store, 4, 50, 1000);
    let got = collect(&mut feed, 250).await;
    for writer in writers {
        writer.await.expect("writer");
    }
    assert_same_feed(&got, &read_everything(&*store).await);
    // Nothing more arrives, and nothing is delivered twice.
    let extra = tokio::time::timeout(Duration::from_millis(100), feed.next()).await;
    assert!(extra.is_err(), "no event may be delivered twice: {extra:?}");
    // Live again after idling.
    append_ok(&*store, &s, ExpectedVersion::Any, vec![event(9999)]).await;
    let last = collect(&mut feed, 1).await;
    assert_eq!(marker(&last[0]), 9999);
}

/// A subscription from a position in the middle sees only the later events, then live ones.
pub async fn subscription_from_middle_sees_only_later_events<S: EventStore + ?Sized>(store: Arc<S>) {
    let s = stream("mid");
    for n in 0..40 {
        append_ok(&*store, &s, ExpectedVersion::Any, vec![event(n)]).await;
    }
    let before = read_everything(&*store).await;
    let middle = before[19].position;
    let mut feed = Subscription::all(Arc::clone(&store), middle).with_page_size(7);
    let writers = spawn_writers(&store, 3, 30, 1000);
    let got = collect(&mut feed, 20 + 90).await;
    for writer in writers {
        writer.await.expect("writer");
    }
    let all = read_everything(&*store).await;
    assert_same_feed(&got, &all[20..]);
}

/// A subscription to one stream sees that stream's events from a version, in order, then new
/// ones, and nothing of other streams.
pub async fn stream_subscription_catches_up_then_goes_live<S: EventStore + ?Sized>(store: Arc<S>) {
    let s = stream("one");
    let noise = stream("noise");
    for n in 0..10 {
        append_ok(&*store, &s, ExpectedVersion::Any, vec![event(n)]).await;
        append_ok(&*store, &noise, ExpectedVersion::Any, vec![event(100 + n)]).await;
    }
    let mut feed = Subscription::stream(Arc::clone(&store), s.clone(), Version(4)).with_page_size(3);
    let writer = {
        let store = Arc::clone(&store);
        let s = s.clone();
        let noise = noise.clone();
        tokio::spawn(async move {
            for n in 10..30 {
                append_ok(&*store, &s, ExpectedVersion::Any, vec![event(n)]).await;
                append_ok(&*store, &noise, ExpectedVersion::Any, vec![event(100 + n)]).await;
            }
        })
    };
    let got = collect(&mut feed, 27).await;
    writer.await.expect("writer");
    assert_eq!(got.iter().map(marker).collect::<Vec<_>>(), (3..30).collect::<Vec<_>>());
    assert_eq!(got.iter().map(|e| e.version.0).collect::<Vec<_>>(), (4..=30).collect::<Vec<_>>());
}

/// A subscriber that is much slower than the writers still sees every event, in order.
pub async fn slow_subscriber_sees_everything<S: EventStore + ?Sized>(store: Arc<S>) {
    let mut feed = Subscription::all(Arc::clone(&store), Position::START).with_page_size(5);
    let writers = spawn_writers(&store, 4, 100, 0);
    let mut got = Vec::new();
    while got.len() < 400 {
        let next = tokio::time::timeout(Duration::from_secs(30), feed.next()).await.expect("stalled");
        got.push(next.expect("subscription error").expect("closed"));
        if got.len() % 50 == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for writer in writers {
        writer.await.expect("writer");
    }
    assert_same_feed(&got, &read_everything(&*store).await);
    assert_eq!(feed.audit_gaps_now().await.expect("gap audit"), 0, "no event committed in a gap it passed");
}

/// Checkpoints are stored per name, overwritten on save, and absent until saved.
pub async fn checkpoints_round_trip<S: EventStore + ?Sized>(store: Arc<S>) {
    let name = format!("projection-{}", uuid::Uuid::new_v4().simple());
    let other = format!("{name}-other");
    assert_eq!(store.load_checkpoint(&name).await.expect("load"), None);
    store.save_checkpoint(&name, Position(42)).await.expect("save");
    store.save_checkpoint(&other, Position(7)).await.expect("save");
    assert_eq!(store.load_checkpoint(&name).await.expect("load"), Some(Position(42)));
    store.save_checkpoint(&name, Position(43)).await.expect("save");
    assert_eq!(store.load_checkpoint(&name).await.expect("load"), Some(Position(43)));
    assert_eq!(store.load_checkpoint(&other).await.expect("load"), Some(Position(7)));
}

/// For durable stores: a checkpoint saved before the store is reopened is there afterwards.
/// `reopen` must return a new store instance over the same storage.
pub async fn checkpoints_survive_reopen<S, F, Fut>(store: Arc<S>, reopen: F)
where
    S: EventStore + ?Sized,
    F: FnOnce() -> Fut,
    Fut: Future<Output = Arc<S>>,
{
    let name = format!("durable-{}", uuid::Uuid::new_v4().simple());
    store.save_checkpoint(&name, Position(1234)).await.expect("save");
    drop(store);
    let reopened = reopen().await;
    assert_eq!(reopened.load_checkpoint(&name).await.expect("load"), Some(Position(1234)));
}

/// A command id already stored for a stream makes a second append a no-op that returns the
/// first result, whatever its expected version; other streams are independent.
pub async fn idempotent_command_ids<S: EventStore + ?Sized>(store: Arc<S>) {
    let s = stream("idem");
    let command_id = CommandId::new();
    let with_id = |n| event_with(n, Metadata { command_id: Some(command_id), ..Metadata::default() });
    let first = append_ok(&*store, &s, ExpectedVersion::NoStream, vec![with_id(1), with_id(2)]).await;
    append_ok(&*store, &s, ExpectedVersion::Any, vec![event(3)]).await;
    for expected in [ExpectedVersion::NoStream, ExpectedVersion::Exact(Version(1)), ExpectedVersion::Any] {
        match store.append(&s, expected, vec![with_id(99)]).await {
            Ok(AppendOutcome::Duplicate(result)) => assert_eq!(result, first),
            other => panic!("a repeated command id must be a duplicate, got {other:?}"),
        }
    }
    assert_eq!(store.find_command(&s, command_id).await.expect("find"), Some(first));
    assert_eq!(read_whole_stream(&*store, &s).await.iter().map(marker).collect::<Vec<_>>(), vec![1, 2, 3]);
    // The same id on another stream is a different command.
    let other = stream("idem-other");
    append_ok(&*store, &other, ExpectedVersion::Any, vec![with_id(4)]).await;
    // Concurrent duplicates: exactly one append happens.
    let racing = stream("idem-race");
    let race_id = CommandId::new();
    let tasks: Vec<_> = (0..8)
        .map(|n| {
            let store = Arc::clone(&store);
            let racing = racing.clone();
            let metadata = Metadata { command_id: Some(race_id), ..Metadata::default() };
            tokio::spawn(
                async move { store.append(&racing, ExpectedVersion::Any, vec![event_with(n, metadata)]).await },
            )
        })
        .collect();
    let mut appended = 0;
    for task in tasks {
        match task.await.expect("task") {
            Ok(AppendOutcome::Appended(_)) => appended += 1,
            Ok(AppendOutcome::Duplicate(_)) => {}
            // A loser may also see the winner's version first; that is a conflict, not a loss.
            Err(StoreError::Conflict { .. }) => {}
            Err(error) => panic!("unexpected error {error}"),
        }
    }
    assert_eq!(appended, 1, "exactly one of the racing duplicates may be stored");
    assert_eq!(read_whole_stream(&*store, &racing).await.len(), 1);
}

/// Event id, causation, correlation, command id, headers and recorded-at come back as stored.
pub async fn metadata_round_trip<S: EventStore + ?Sized>(store: Arc<S>) {
    let s = stream("meta");
    let metadata = Metadata {
        command_id: Some(CommandId::new()),
        causation_id: Some(CausationId::new()),
        correlation_id: Some(CorrelationId::new()),
        headers: HashMap::from([("user".to_owned(), "ada".to_owned()), ("tenant".to_owned(), "αβγ".to_owned())]),
    };
    let before = Timestamp::now();
    let sent = event_with(1, metadata.clone());
    append_ok(&*store, &s, ExpectedVersion::Any, vec![sent.clone()]).await;
    let after = Timestamp::now();
    let events = read_whole_stream(&*store, &s).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].event_id, sent.event_id);
    assert_eq!(*events[0].metadata, metadata);
    let slack = 5_000_000; // 5 s of clock difference between client and server
    assert!(
        events[0].recorded_at.as_micros() >= before.as_micros() - slack
            && events[0].recorded_at.as_micros() <= after.as_micros() + slack,
        "recorded_at {:?} outside [{before:?}, {after:?}]",
        events[0].recorded_at
    );
    let all = read_everything(&*store).await;
    assert_eq!(*all[0].metadata, metadata, "read_all must return the same metadata");
}

/// Through the dispatcher: a command id dispatched again, by a new dispatcher (a restarted
/// process with an empty cache), returns the first outcome and stores nothing, even when the
/// command would now be refused.
pub async fn dispatcher_idempotency_survives_restart<S: EventStore + ?Sized>(store: Arc<S>) {
    let id = rand_counter_id();
    let command_id = CommandId::new();
    let decrement = || CommandEnvelope::new(CounterCommand::decrement(id, 5)).with_command_id(command_id);
    let first_process = Dispatcher::<Counter, S>::new(Arc::clone(&store));
    first_process.dispatch(CounterCommand::increment(id, 5)).await.expect("increment");
    let first = first_process.dispatch(decrement()).await.expect("decrement");
    assert!(!first.duplicate);
    let again = first_process.dispatch(decrement()).await.expect("repeat in same process");
    assert!(again.duplicate);
    assert_eq!(again.appended, first.appended);

    let restarted = Dispatcher::<Counter, S>::new(Arc::clone(&store));
    // The counter is now 0, so a fresh decrement would be refused; the repeat is not.
    let after_restart = restarted.dispatch(decrement()).await.expect("repeat after restart");
    assert!(after_restart.duplicate);
    assert_eq!(after_restart.appended, first.appended);
    assert_eq!(after_restart.version, Version(2));
    let (state, version) = restarted.load(&Counter::stream_id(id)).await.expect("load");
    assert_eq!((state.value, version), (0, Version(2)), "the repeat must not store anything");
}

/// Through the dispatcher: two dispatchers (two processes) on one store hammer the same
/// counters; every command is applied exactly once and each cached state equals the state
/// rebuilt from the store.
pub async fn dispatcher_state_matches_store_under_concurrency<S: EventStore + ?Sized>(store: Arc<S>) {
    let ids: Vec<u32> = (0..3).map(|_| rand_counter_id()).collect();
    let processes =
        [Dispatcher::<Counter, S>::new(Arc::clone(&store)), Dispatcher::<Counter, S>::new(Arc::clone(&store))];
    let tasks: Vec<_> = (0..8u64)
        .map(|task| {
            let dispatcher = processes[usize::try_from(task % 2).expect("small")].clone();
            let ids = ids.clone();
            tokio::spawn(async move {
                for i in 0..25u64 {
                    let id = ids[usize::try_from((task + i) % 3).expect("small")];
                    dispatcher.dispatch(CounterCommand::increment(id, 1)).await.expect("increment");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("task");
    }
    let mut total = 0;
    for id in &ids {
        let fresh = Dispatcher::<Counter, S>::new(Arc::clone(&store));
        let (rebuilt, version) = fresh.load(&Counter::stream_id(*id)).await.expect("load");
        for process in &processes {
            let (cached, cached_version) = process.load(&Counter::stream_id(*id)).await.expect("load");
            assert_eq!((cached, cached_version), (rebuilt.clone(), version));
        }
        assert_eq!(rebuilt.value, version.0);
        total += rebuilt.value;
    }
    assert_eq!(total, 8 * 25, "every command applied exactly once");
}

/// `append_chain`: links are stored in order with contiguous versions; once a link is not
/// appended (conflict, duplicate command id), no later link is written, even one whose exact
/// version happens to match the stream's after someone else's write.
pub async fn chains_store_a_link_only_right_after_the_links_before_it<S: EventStore + ?Sized>(store: Arc<S>) {
    let link = |n: u64| vec![event_with(n, Metadata { command_id: Some(CommandId::new()), ..Metadata::default() })];
    let s = stream("chain");
    append_ok(&*store, &s, ExpectedVersion::NoStream, vec![event(1)]).await;
    let answers = store.append_chain(&s, Version(1), vec![link(2), link(3), link(4)]).await;
    let versions: Vec<u64> = answers
        .iter()
        .map(|answer| match answer {
            Ok(AppendOutcome::Appended(result)) => result.first_version.0,
            other => panic!("a chain on the current version is stored whole, got {other:?}"),
        })
        .collect();
    assert_eq!(versions, [2, 3, 4]);

    // Stale start: nothing is written.
    let answers = store.append_chain(&s, Version(1), vec![link(5), link(6)]).await;
    assert!(answers.iter().all(|a| matches!(a, Err(StoreError::Conflict { .. }))), "{answers:?}");

    // The hazard: the first link conflicts (someone wrote one event), and the second link's
    // exact version now matches the stream's. It must not be written.
    append_ok(&*store, &s, ExpectedVersion::Exact(Version(4)), vec![event(7)]).await;
    let answers = store.append_chain(&s, Version(4), vec![link(8), link(9)]).await;
    assert!(matches!(answers[0], Err(StoreError::Conflict { .. })), "{answers:?}");
    assert!(
        matches!(answers[1], Err(StoreError::Conflict { .. })),
        "a link after a conflict is not written: {answers:?}"
    );

    // A duplicate command id breaks the chain too.
    let resent = link(10);
    append_ok(&*store, &s, ExpectedVersion::Exact(Version(5)), resent.clone()).await;
    let again = vec![event_with(11, resent[0].metadata.clone())];
    let answers = store.append_chain(&s, Version(6), vec![link(12), again, link(13)]).await;
    assert!(matches!(answers[0], Ok(AppendOutcome::Appended(_))), "{answers:?}");
    assert!(matches!(answers[1], Ok(AppendOutcome::Duplicate(_))), "{answers:?}");
    assert!(matches!(answers[2], Err(StoreError::Conflict { .. })), "{answers:?}");
    let markers: Vec<u64> = read_whole_stream(&*store, &s).await.iter().map(marker).collect();
    assert_eq!(markers, [1, 2, 3, 4, 7, 10, 12]);
}

/// Many tasks in two dispatchers send commands to one counter at once (the dispatcher batches
/// commands queued on one instance): every stored command was decided on a state that includes
/// every earlier event of the stream, so the counter, replayed from the log, never goes below
/// zero; every accepted command is stored once; and both dispatchers' states match the log.
pub async fn hot_stream_commands_are_decided_on_every_earlier_event<S: EventStore + ?Sized>(store: Arc<S>) {
    let id = rand_counter_id();
    let processes =
        [Dispatcher::<Counter, S>::new(Arc::clone(&store)), Dispatcher::<Counter, S>::new(Arc::clone(&store))];
    let tasks: Vec<_> = (0..24u64)
        .map(|task| {
            let dispatcher = processes[usize::try_from(task % 2).expect("small")].clone();
            tokio::spawn(async move {
                let (mut up, mut down) = (0u64, 0u64);
                for i in 0..12u64 {
                    let command = if (task + i) % 3 == 0 {
                        CounterCommand::increment(id, 2)
                    } else {
                        CounterCommand::decrement(id, 1)
                    };
                    let is_up = matches!(command, CounterCommand::Increment { .. });
                    match dispatcher.dispatch(command).await {
                        Ok(outcome) if outcome.appended.is_some() && is_up => up += 1,
                        Ok(outcome) if outcome.appended.is_some() => down += 1,
                        Ok(outcome) => panic!("an accepted command stores its event: {outcome:?}"),
                        Err(crate::DispatchError::Rejected(_)) if !is_up => {}
                        Err(error) => panic!("unexpected dispatch error: {error}"),
                    }
                }
                (up, down)
            })
        })
        .collect();
    let (mut up, mut down) = (0u64, 0u64);
    for task in tasks {
        let (u, d) = task.await.expect("task");
        up += u;
        down += d;
    }
    assert_eq!(up, (0..24u64).map(|t| (0..12u64).filter(|i| (t + i) % 3 == 0).count() as u64).sum::<u64>());
    let log = read_whole_stream(&*store, &Counter::stream_id(id)).await;
    let mut value: i64 = 0;
    let (mut stored_up, mut stored_down) = (0u64, 0u64);
    for event in &log {
        match &*event.event_type {
            "Incremented" => {
                value += event.payload["by"].as_i64().expect("by");
                stored_up += 1;
            }
            "Decremented" => {
                value -= event.payload["by"].as_i64().expect("by");
                stored_down += 1;
            }
            other => panic!("unexpected event {other}"),
        }
        assert!(value >= 0, "a decrement was stored on a state that did not include every earlier event");
    }
    assert_eq!((stored_up, stored_down), (up, down), "every accepted command stored once, nothing else");
    let fresh = Dispatcher::<Counter, S>::new(Arc::clone(&store));
    let (rebuilt, version) = fresh.load(&Counter::stream_id(id)).await.expect("load");
    for process in &processes {
        assert_eq!(process.load(&Counter::stream_id(id)).await.expect("load"), (rebuilt.clone(), version));
    }
    assert_eq!(i64::try_from(rebuilt.value).expect("small"), value);
}

/// A store that keeps snapshots returns the newest one saved (an older one never replaces a
/// newer); a store that does not keep them finds none.
pub async fn snapshots_round_trip<S: EventStore + ?Sized>(store: Arc<S>) {
    let s = stream("snap");
    let snapshot = |version: u64| Snapshot {
        stream_id: s.clone(),
        version: Version(version),
        schema_version: 3,
        state: json!({ "value": version, "names": ["ada", "grace"] }),
    };
    assert_eq!(store.load_snapshot(&s).await.expect("load"), None);
    store.save_snapshot(snapshot(10)).await.expect("save");
    if !store.supports_snapshots() {
        assert_eq!(store.load_snapshot(&s).await.expect("load"), None, "a store without snapshots finds none");
        return;
    }
    assert_eq!(store.load_snapshot(&s).await.expect("load"), Some(snapshot(10)));
    store.save_snapshot(snapshot(20)).await.expect("save");
    store.save_snapshot(snapshot(15)).await.expect("save");
    assert_eq!(store.load_snapshot(&s).await.expect("load"), Some(snapshot(20)), "older snapshots never win");
    assert_eq!(store.load_snapshot(&stream("other")).await.expect("load"), None);
}

/// Through the dispatcher: with snapshots on, a restarted dispatcher rebuilds exactly the state
/// a full replay gives, snapshots of another schema version are ignored, and the snapshot (if
/// the store keeps them) is at the last multiple of the interval.
pub async fn dispatcher_snapshots_give_the_same_state<S: EventStore + ?Sized>(store: Arc<S>) {
    let id = rand_counter_id();
    let stream_id = Counter::stream_id(id);
    let writer = Dispatcher::<Counter, S>::new(Arc::clone(&store)).with_snapshots(SnapshotPolicy::every(10));
    for by in 1..=25 {
        writer.dispatch(CounterCommand::increment(id, by)).await.expect("increment");
    }
    let replayed = Dispatcher::<Counter, S>::new(Arc::clone(&store)).load(&stream_id).await.expect("replay");
    assert_eq!(replayed.0.value, (1..=25).sum::<u64>());
    let restored = Dispatcher::<Counter, S>::new(Arc::clone(&store))
        .with_snapshots(SnapshotPolicy::every(10))
        .load(&stream_id)
        .await
        .expect("restore");
    assert_eq!(restored, replayed, "snapshot + tail must equal a full replay");
    if store.supports_snapshots() {
        let snapshot = store.load_snapshot(&stream_id).await.expect("load").expect("a snapshot was saved");
        assert_eq!(snapshot.version, Version(20));
        // A corrupt snapshot is ignored, not trusted.
        let bogus = Snapshot { version: Version(21), state: json!("not a counter"), ..snapshot };
        store.save_snapshot(bogus).await.expect("save");
        let despite = Dispatcher::<Counter, S>::new(Arc::clone(&store))
            .with_snapshots(SnapshotPolicy::every(10))
            .load(&stream_id)
            .await
            .expect("load despite a bad snapshot");
        assert_eq!(despite, replayed);
    }
    let other_schema = Dispatcher::<Counter, S>::new(Arc::clone(&store))
        .with_snapshots(SnapshotPolicy::every(10).with_schema_version(2))
        .load(&stream_id)
        .await
        .expect("load with another schema");
    assert_eq!(other_schema, replayed);
}

/// `head` is `Position::START` on an empty store, then the position of the last event stored;
/// nothing is readable after it, and `read_all` ends exactly there.
pub async fn head_is_the_last_readable_event<S: EventStore + ?Sized>(store: Arc<S>) {
    assert_eq!(store.head().await.expect("head"), Position::START, "an empty store's head is START");
    let first = append_ok(&*store, &stream("head-a"), ExpectedVersion::Any, vec![event(1), event(2)]).await;
    assert_eq!(store.head().await.expect("head"), first.last_position);
    let second = append_ok(&*store, &stream("head-b"), ExpectedVersion::Any, vec![event(3)]).await;
    let head = store.head().await.expect("head");
    assert_eq!(head, second.last_position);
    assert!(store.read_all(head, 10).await.expect("read_all").is_empty(), "nothing after the head");
    assert_eq!(read_everything(&*store).await.last().map(|e| e.position), Some(head));
    // A refused append does not move it.
    let refused = store.append(&stream("head-a"), ExpectedVersion::Exact(Version(5)), vec![event(4)]).await;
    assert!(matches!(refused, Err(StoreError::Conflict { .. })), "{refused:?}");
    assert_eq!(store.head().await.expect("head"), head);
}

/// Stored events are decoded by the type name stored with them, not by the Rust variant: an
/// event enum whose variants were renamed (keeping their `#[event(name)]`) reads every event
/// the old enum wrote, of every shape (struct, newtype, tuple, unit variants).
pub async fn events_decode_by_their_stored_name<S: EventStore + ?Sized>(store: Arc<S>) {
    use crate::{DomainEvent, Upcasters};
    use serde::{Deserialize, Serialize};

    /// What the code wrote at first.
    mod before {
        use crate::DomainEvent;
        use serde::{Deserialize, Serialize};

        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        pub struct Removed {
            pub sku: String,
        }

        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
        #[event(category = "basket")]
        pub enum BasketEvent {
            #[event(name = "ItemAdded")]
            Added {
                sku: String,
                quantity: u32,
            },
            Removed(Removed),
            Priced(String, u64),
            Closed,
        }
    }

    /// The same events after a refactoring that renamed every variant.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
    #[event(category = "basket")]
    enum BasketEvent {
        #[event(name = "ItemAdded")]
        ItemPutInBasket { sku: String, quantity: u32, note: Option<String> },
        #[event(name = "Removed")]
        ItemTakenOut(Removed),
        #[event(name = "Priced")]
        PriceSet(String, u64),
        #[event(name = "Closed")]
        CheckedOut,
    }

    use before::Removed;
    let written = [
        before::BasketEvent::Added { sku: "tea".into(), quantity: 2 },
        before::BasketEvent::Removed(Removed { sku: "tea".into() }),
        before::BasketEvent::Priced("tea".into(), 450),
        before::BasketEvent::Closed,
    ];
    let basket = StreamId::new(format!("basket-{}", uuid::Uuid::new_v4().simple())).expect("valid stream id");
    let new_events: Vec<NewEvent> =
        written.iter().map(|event| NewEvent::from_domain(event, Metadata::default()).expect("encode")).collect();
    append_ok(&*store, &basket, ExpectedVersion::NoStream, new_events).await;
    let stored = read_whole_stream(&*store, &basket).await;
    let types: Vec<&str> = stored.iter().map(|event| &*event.event_type).collect();
    assert_eq!(types, ["ItemAdded", "Removed", "Priced", "Closed"], "the stored names are the #[event] names");
    let read: Vec<BasketEvent> = stored
        .iter()
        .map(|event| Upcasters::new().decode_payload::<BasketEvent>(event).expect("decode by stored name"))
        .collect();
    assert_eq!(
        read,
        vec![
            BasketEvent::ItemPutInBasket { sku: "tea".into(), quantity: 2, note: None },
            BasketEvent::ItemTakenOut(Removed { sku: "tea".into() }),
            BasketEvent::PriceSet("tea".into(), 450),
            BasketEvent::CheckedOut,
        ]
    );
    assert!(BasketEvent::accepts("basket", "ItemAdded") && !BasketEvent::accepts("door", "ItemAdded"));
}

/// Through a handler runner: a handler takes the events its type declares for their stream
/// category, so two aggregates that both emit `Opened` do not feed each other's handlers, and
/// the checkpoint still moves past the events it does not take.
pub async fn handlers_take_their_category_only<S: Store + ?Sized>(store: Arc<S>) {
    use crate::handler::{spawn_handler, Checkpoints, EventHandler, HandlerError, Progress, RunnerConfig};
    use crate::{DomainEvent, Envelope};
    use serde::{Deserialize, Serialize};
    use std::sync::Mutex;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
    #[event(category = "account")]
    enum AccountEvent {
        Opened { owner: String },
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
    #[event(category = "door")]
    enum DoorEvent {
        Opened { by: String },
    }

    struct Owners(Arc<Mutex<Vec<String>>>);
    impl EventHandler for Owners {
        type Event = AccountEvent;
        fn name(&self) -> &str {
            "account-owners"
        }
        async fn handle(&self, event: Envelope<AccountEvent>) -> Result<(), HandlerError> {
            let AccountEvent::Opened { owner } = event.event;
            self.0.lock().expect("lock").push(owner);
            Ok(())
        }
    }

    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let account = StreamId::for_aggregate("account", &suffix).expect("valid");
    let door = StreamId::for_aggregate("door", &suffix).expect("valid");
    let encode = |event: &dyn Fn() -> Result<NewEvent, serde_json::Error>| vec![event().expect("encode")];
    let opened = || NewEvent::from_domain(&AccountEvent::Opened { owner: "ada".into() }, Metadata::default());
    let door_opened = || NewEvent::from_domain(&DoorEvent::Opened { by: "grace".into() }, Metadata::default());
    append_ok(&*store, &door, ExpectedVersion::Any, encode(&door_opened)).await;
    append_ok(&*store, &account, ExpectedVersion::Any, encode(&opened)).await;
    let last = append_ok(&*store, &door, ExpectedVersion::Any, encode(&door_opened)).await;

    let seen = Arc::new(Mutex::new(Vec::new()));
    let progress = Progress::new();
    let config = RunnerConfig { checkpoints: Checkpoints::InMemory, ..RunnerConfig::default() };
    let runner = spawn_handler(Arc::clone(&store), Owners(Arc::clone(&seen)), config, &progress);
    progress.wait_for("account-owners", last.last_position, Duration::from_secs(10)).await.expect("caught up");
    runner.stop().await;
    assert_eq!(*seen.lock().expect("lock"), vec!["ada".to_owned()], "only the account's Opened is handled");
}

/// Read-your-writes through any process: a dispatch with
/// [`Consistency::Strong`](crate::Consistency) through a process whose runner of an exclusive
/// handler stands by (another process holds the claim) returns once the holder has handled
/// the command's events, learnt from the handler's checkpoint in the store; and a handler that
/// keeps failing makes the wait time out naming its error.
pub async fn strong_consistency_from_a_standby_process<S: Store + ?Sized>(store: Arc<S>) {
    use crate::dispatcher::{Consistency, DispatchError};
    use crate::handler::{spawn_handler, EventHandler, HandlerError, HandlerState, Progress, RunnerConfig};
    use crate::testing::counter::CounterEvent;
    use crate::Envelope;
    use std::sync::Mutex;

    struct Totals {
        name: String,
        seen: Arc<Mutex<Vec<Position>>>,
        failing: Option<&'static str>,
    }
    impl EventHandler for Totals {
        type Event = CounterEvent;
        fn name(&self) -> &str {
            &self.name
        }
        async fn handle(&self, event: Envelope<CounterEvent>) -> Result<(), HandlerError> {
            if let Some(error) = self.failing {
                return Err(HandlerError::new(error));
            }
            self.seen.lock().expect("lock").push(event.position);
            Ok(())
        }
    }

    let name = format!("totals-{}", uuid::Uuid::new_v4().simple());
    let config = |owner: &str| RunnerConfig {
        owner: owner.to_owned(),
        checkpoint_delay: Duration::from_millis(10),
        claim_retry: Duration::from_millis(50),
        initial_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(50),
        ..RunnerConfig::default()
    };
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (node_1, node_2) = (Progress::new(), Progress::new());
    let holder = Totals { name: name.clone(), seen: Arc::clone(&seen), failing: None };
    let holder = spawn_handler(Arc::clone(&store), holder, config("node-1"), &node_1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !holder.status().is_active() {
        assert!(tokio::time::Instant::now() < deadline, "node-1 never took the claim");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let standby = Totals { name: name.clone(), seen: Arc::default(), failing: None };
    let standby = spawn_handler(Arc::clone(&store), standby, config("node-2"), &node_2);
    while !matches!(standby.status().state, HandlerState::Standby { .. }) {
        assert!(tokio::time::Instant::now() < deadline, "node-2 never stood by: {:?}", standby.status());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let through_node_2 = Dispatcher::<Counter, S>::new(Arc::clone(&store)).with_progress(node_2.clone());
    let id = (uuid::Uuid::new_v4().as_u128() % 1_000_000) as u32;
    for n in 0..3 {
        let strong = Consistency::strong([&name]).with_timeout(Duration::from_secs(20));
        let outcome = through_node_2
            .dispatch_with(CounterCommand::Increment { id, by: n + 1 }.into(), &strong)
            .await
            .unwrap_or_else(|error| panic!("read-your-writes through the standby node: {error}"));
        let position = outcome.appended.expect("stored").last_position;
        assert!(seen.lock().expect("lock").contains(&position), "answered before the holder handled {position}");
    }
    assert!(matches!(standby.status().state, HandlerState::Standby { .. }), "node-2 still stands by");
    holder.stop().await;
    standby.stop().await;

    // A handler that keeps failing: the timeout says why.
    let broken = format!("broken-{}", uuid::Uuid::new_v4().simple());
    let progress = Progress::new();
    let failing = Totals { name: broken.clone(), seen: Arc::default(), failing: Some("no such table: totals") };
    let runner = spawn_handler(Arc::clone(&store), failing, config("node-3"), &progress);
    let dispatcher = Dispatcher::<Counter, S>::new(Arc::clone(&store)).with_progress(progress.clone());
    let strong = Consistency::strong([&broken]).with_timeout(Duration::from_millis(500));
    match dispatcher.dispatch_with(CounterCommand::Increment { id, by: 1 }.into(), &strong).await {
        Err(error @ DispatchError::ConsistencyTimeout { .. }) => {
            assert!(error.to_string().contains("no such table: totals"), "the cause is named: {error}");
        }
        other => panic!("expected a consistency timeout, got {other:?}"),
    }
    runner.stop().await;
}

/// Command ids are remembered until pruned: `prune_commands(t)` forgets those stored before
/// `t` (and only those), after which the same id is a new command.
pub async fn command_ids_are_forgotten_when_pruned<S: EventStore + ?Sized>(store: Arc<S>) {
    let s = stream("prune");
    let command_id = CommandId::new();
    let with_id = |n| event_with(n, Metadata { command_id: Some(command_id), ..Metadata::default() });
    let first = append_ok(&*store, &s, ExpectedVersion::Any, vec![with_id(1)]).await;
    let an_hour_ago = Timestamp::now().minus(Duration::from_secs(3600));
    store.prune_commands(an_hour_ago).await.expect("prune");
    assert_eq!(store.find_command(&s, command_id).await.expect("find"), Some(first), "kept: stored after the bound");
    assert!(matches!(store.append(&s, ExpectedVersion::Any, vec![with_id(2)]).await, Ok(AppendOutcome::Duplicate(_))));

    let pruned = store.prune_commands(Timestamp::now().plus(Duration::from_secs(1))).await.expect("prune");
    assert!(pruned >= 1, "the command stored before the bound is forgotten (pruned {pruned})");
    assert_eq!(store.find_command(&s, command_id).await.expect("find"), None);
    let again = append_ok(&*store, &s, ExpectedVersion::Any, vec![with_id(3)]).await;
    assert_eq!(again.first_version, Version(2), "after its retention, an id is a new command");
}

/// Through the dispatcher: a command sent in reaction to an event (`Envelope::cause`) has an
/// id derived from the event and the step, so the reaction to a redelivered event is a
/// duplicate; and its events carry the chain: their command id, their causation id (the
/// triggering event) and the triggering event's correlation id.
pub async fn follow_up_commands_are_idempotent_and_traceable<S: EventStore + ?Sized>(store: Arc<S>) {
    let dispatcher = Dispatcher::<Counter, S>::new(Arc::clone(&store));
    let (source, target) = (rand_counter_id(), rand_counter_id());
    let correlation = CorrelationId::new();
    let start = CommandEnvelope::new(CounterCommand::increment(source, 1)).with_correlation_id(correlation);
    dispatcher.dispatch(start).await.expect("first command");
    let trigger = read_whole_stream(&*store, &Counter::stream_id(source)).await.remove(0);
    assert_eq!(trigger.metadata.causation_id, None, "a command from outside has no cause");
    assert_eq!(trigger.metadata.correlation_id, Some(correlation));
    let envelope = Upcasters::new().decode::<crate::testing::counter::CounterEvent>(&trigger).expect("decode");

    let first =
        dispatcher.dispatch(envelope.cause("mirror", CounterCommand::increment(target, 1))).await.expect("follow");
    // The event is delivered again (at least once): the same reaction is a duplicate.
    let again =
        dispatcher.dispatch(envelope.cause("mirror", CounterCommand::increment(target, 1))).await.expect("again");
    assert!(!first.duplicate && again.duplicate, "a redelivered event's follow-up is applied once");
    assert_eq!(again.appended, first.appended);
    // Another step of the same event is another command.
    let other =
        dispatcher.dispatch(envelope.cause("double", CounterCommand::increment(target, 1))).await.expect("other");
    assert!(!other.duplicate);

    let followed = read_whole_stream(&*store, &Counter::stream_id(target)).await;
    assert_eq!(followed.len(), 2);
    let metadata = &followed[0].metadata;
    assert_eq!(metadata.command_id, Some(CommandId::derived(trigger.event_id, "mirror")));
    assert_eq!(metadata.causation_id, Some(CausationId::from(trigger.event_id)), "caused by the trigger");
    assert_eq!(metadata.correlation_id, Some(correlation), "the conversation carries on");
}

/// A claim has one holder at a time: another owner is told who holds it; the holder renews it
/// with the same token; after a release another owner takes it with a larger token.
pub async fn claims_have_one_holder_at_a_time<S: Store + ?Sized>(store: Arc<S>) {
    let name = format!("exclusive-{}", uuid::Uuid::new_v4().simple());
    let long = Duration::from_secs(60);
    let first = match store.claim(&name, "process-a", long).await.expect("claim") {
        ClaimOutcome::Held(claim) => claim,
        other => panic!("a free claim is taken, got {other:?}"),
    };
    assert_eq!((first.name.as_str(), first.owner.as_str()), (name.as_str(), "process-a"));
    match store.claim(&name, "process-b", long).await.expect("claim") {
        ClaimOutcome::Taken { holder, until } => {
            assert_eq!(holder, "process-a");
            assert!(until > Timestamp::now(), "held until a time in the future");
        }
        other => panic!("a held claim is not given to another owner, got {other:?}"),
    }
    match store.claim(&name, "process-a", long).await.expect("renew") {
        ClaimOutcome::Held(renewed) => {
            assert_eq!(renewed.token, first.token, "renewing keeps the token");
            assert!(renewed.expires_at >= first.expires_at);
        }
        other => panic!("the holder renews, got {other:?}"),
    }
    let listed = store.claims().await.expect("claims");
    assert!(listed.iter().any(|c| c.name == name && c.owner == "process-a"), "{listed:?}");
    store.release_claim(&first).await.expect("release");
    let second = match store.claim(&name, "process-b", long).await.expect("claim") {
        ClaimOutcome::Held(claim) => claim,
        other => panic!("a released claim is free, got {other:?}"),
    };
    assert!(second.token > first.token, "a new tenure has a larger token");
    assert!(!store.claims().await.expect("claims").iter().any(|c| c.name == name && c.owner == "process-a"));
    // Releasing with a stale claim changes nothing.
    store.release_claim(&first).await.expect("stale release");
    assert!(matches!(store.claim(&name, "process-a", long).await.expect("claim"), ClaimOutcome::Taken { .. }));
}

/// A claim not renewed lapses after its ttl and can then be taken; a checkpoint write fenced
/// by a claim succeeds only while that claim is held.
pub async fn claims_expire_and_fence_checkpoints<S: Store + ?Sized>(store: Arc<S>) {
    let name = format!("lapsing-{}", uuid::Uuid::new_v4().simple());
    let short = match store.claim(&name, "process-a", Duration::from_millis(300)).await.expect("claim") {
        ClaimOutcome::Held(claim) => claim,
        other => panic!("{other:?}"),
    };
    store.save_checkpoint_claimed(&name, Position(5), &short).await.expect("fenced save while held");
    assert_eq!(store.load_checkpoint(&name).await.expect("load"), Some(Position(5)));
    tokio::time::sleep(Duration::from_millis(600)).await;
    let next = match store.claim(&name, "process-b", Duration::from_secs(60)).await.expect("claim") {
        ClaimOutcome::Held(claim) => claim,
        other => panic!("a lapsed claim is free, got {other:?}"),
    };
    assert!(next.token > short.token);
    match store.save_checkpoint_claimed(&name, Position(9), &short).await {
        Err(StoreError::ClaimLost { name: lost }) => assert_eq!(lost, name),
        other => panic!("a fenced write with a lost claim must fail, got {other:?}"),
    }
    assert_eq!(store.load_checkpoint(&name).await.expect("load"), Some(Position(5)), "nothing written");
    store.save_checkpoint_claimed(&name, Position(9), &next).await.expect("the new holder saves");
    assert_eq!(store.load_checkpoint(&name).await.expect("load"), Some(Position(9)));
}

/// Parked events are kept per handler in position order, their status changes, and they are
/// removed when unparked.
pub async fn parked_events_round_trip<S: Store + ?Sized>(store: Arc<S>) {
    use crate::coordination::{ParkedEvent, ParkedStatus};
    let handler = format!("parking-{}", uuid::Uuid::new_v4().simple());
    let parked = |position: u64, error: &str| ParkedEvent {
        handler: handler.clone(),
        position: Position(position),
        event_id: EventId::new(),
        stream_id: stream("parked"),
        event_type: "TestHappened".to_owned(),
        sequence: "seq-1".to_owned(),
        error: error.to_owned(),
        attempts: 3,
        parked_at: Timestamp::now(),
        status: ParkedStatus::Parked,
    };
    assert!(store.parked(&handler).await.expect("list").is_empty());
    let (late, early) = (parked(20, "behind @10"), parked(10, "boom: \"quoted\" ünïcode"));
    store.park(late.clone(), None).await.expect("park");
    store.park(early.clone(), None).await.expect("park");
    store.park(parked(5, "another handler's"), None).await.expect("park");
    let listed = store.parked(&handler).await.expect("list");
    let positions: Vec<u64> = listed.iter().map(|p| p.position.0).collect();
    assert_eq!(positions, [5, 10, 20], "in position order");
    assert_eq!(listed[1].error, early.error);
    assert_eq!(listed[1].event_id, early.event_id);
    assert_eq!(listed[1].stream_id, early.stream_id);
    assert_eq!((listed[1].attempts, listed[1].status), (3, ParkedStatus::Parked));
    assert!(store.parked(&format!("{handler}-other")).await.expect("list").is_empty(), "per handler");

    let retry = ParkedStatus::RetryRequested;
    assert!(store.set_parked_status(&handler, Position(10), retry, None).await.expect("status"));
    assert!(!store.set_parked_status(&handler, Position(11), retry, None).await.expect("status"), "never inserts");
    assert_eq!(store.parked(&handler).await.expect("list").len(), 3);
    assert_eq!(store.parked(&handler).await.expect("list")[1].status, ParkedStatus::RetryRequested);
    // Parking the same position again replaces it.
    store.park(ParkedEvent { attempts: 4, error: "again".into(), ..early.clone() }, None).await.expect("park again");
    let again = store.parked(&handler).await.expect("list");
    assert_eq!((again.len(), again[1].attempts, again[1].error.as_str()), (3, 4, "again"));
    // A failed retry records its error, one more attempt, and parks it again.
    store.set_parked_status(&handler, Position(10), retry, None).await.expect("status");
    assert!(store.parked_retry_failed(&handler, Position(10), "still down", None).await.expect("failed"));
    let failed = store.parked(&handler).await.expect("list");
    assert_eq!(
        (failed[1].attempts, failed[1].error.as_str(), failed[1].status),
        (5, "still down", ParkedStatus::Parked)
    );

    assert!(store.unpark(&handler, Position(10), None).await.expect("unpark"));
    assert!(!store.unpark(&handler, Position(10), None).await.expect("unpark twice"));
    let left: Vec<u64> = store.parked(&handler).await.expect("list").iter().map(|p| p.position.0).collect();
    assert_eq!(left, [5, 20]);
    // A failed retry of an event discarded meanwhile does not bring it back.
    assert!(!store.parked_retry_failed(&handler, Position(10), "late", None).await.expect("failed"));
    assert!(!store.set_parked_status(&handler, Position(10), ParkedStatus::Parked, None).await.expect("status"));
    let left: Vec<u64> = store.parked(&handler).await.expect("list").iter().map(|p| p.position.0).collect();
    assert_eq!(left, [5, 20], "a discarded event stays discarded");
}

/// A runner's writes to parked events (park, status, failed retry, unpark) are fenced by its
/// claim like its checkpoints: once another process holds the claim they fail with
/// [`StoreError::ClaimLost`] and write nothing, so a park that lands after its lease ended
/// cannot block a sequence the new holder already handled.
pub async fn parked_writes_are_fenced_by_the_claim<S: Store + ?Sized>(store: Arc<S>) {
    use crate::coordination::{ParkedEvent, ParkedStatus};
    let handler = format!("fenced-parking-{}", uuid::Uuid::new_v4().simple());
    let long = Duration::from_secs(60);
    let first = match store.claim(&handler, "process-a", long).await.expect("claim") {
        ClaimOutcome::Held(claim) => claim,
        other => panic!("{other:?}"),
    };
    let parked = |position: u64| ParkedEvent {
        handler: handler.clone(),
        position: Position(position),
        event_id: EventId::new(),
        stream_id: stream("fenced"),
        event_type: "TestHappened".to_owned(),
        sequence: "seq-1".to_owned(),
        error: "boom".to_owned(),
        attempts: 1,
        parked_at: Timestamp::now(),
        status: ParkedStatus::Parked,
    };
    store.park(parked(3), Some(&first)).await.expect("fenced park while held");
    store.park(parked(4), Some(&first)).await.expect("fenced park while held");
    assert!(store.set_parked_status(&handler, Position(3), ParkedStatus::RetryRequested, None).await.expect("op"));
    store.release_claim(&first).await.expect("release");
    let next = match store.claim(&handler, "process-b", long).await.expect("claim") {
        ClaimOutcome::Held(claim) => claim,
        other => panic!("a released claim is free, got {other:?}"),
    };
    let lost = |result: Result<bool, StoreError>, what: &str| match result {
        Err(StoreError::ClaimLost { name }) => assert_eq!(name, handler),
        other => panic!("{what} with a lost claim must fail with ClaimLost, got {other:?}"),
    };
    match store.park(parked(7), Some(&first)).await {
        Err(StoreError::ClaimLost { .. }) => {}
        other => panic!("a park with a lost claim must fail with ClaimLost, got {other:?}"),
    }
    lost(store.set_parked_status(&handler, Position(3), ParkedStatus::Parked, Some(&first)).await, "a status");
    lost(store.parked_retry_failed(&handler, Position(3), "late", Some(&first)).await, "a failed retry");
    lost(store.unpark(&handler, Position(4), Some(&first)).await, "an unpark");
    let now = store.parked(&handler).await.expect("list");
    let positions: Vec<u64> = now.iter().map(|p| p.position.0).collect();
    assert_eq!(positions, [3, 4], "nothing written under the lost claim");
    assert_eq!((now[0].status, now[0].error.as_str()), (ParkedStatus::RetryRequested, "boom"));
    // The new holder writes.
    assert!(store.unpark(&handler, Position(4), Some(&next)).await.expect("the new holder unparks"));
    store.park(parked(7), Some(&next)).await.expect("the new holder parks");
    let positions: Vec<u64> = store.parked(&handler).await.expect("list").iter().map(|p| p.position.0).collect();
    assert_eq!(positions, [3, 7]);
}

/// Process manager state is saved, replaced, fenced by a claim and deleted; scheduled
/// commands are replaced by name, listed when due (earliest first, at most `max`) and removed.
pub async fn process_state_and_schedules_round_trip<S: Store + ?Sized>(store: Arc<S>) {
    use crate::coordination::{ProcessState, Scheduled};
    let process = format!("fulfilment-{}", uuid::Uuid::new_v4().simple());
    assert_eq!(store.load_process(&process, "order-1").await.expect("load"), None);
    let state = ProcessState::running(json!({ "step": "reserving", "lines": [1, 2] }), Position(7));
    store.save_process(&process, "order-1", Some(&state), None).await.expect("save");
    assert_eq!(store.load_process(&process, "order-1").await.expect("load"), Some(state.clone()));
    assert_eq!(store.load_process(&process, "order-2").await.expect("load"), None);
    let later = ProcessState::running(json!({ "step": "paying" }), Position(9));
    store.save_process(&process, "order-1", Some(&later), None).await.expect("replace");
    assert_eq!(store.load_process(&process, "order-1").await.expect("load"), Some(later.clone()));

    let claim_name = format!("{process}-claim");
    let lapsed = match store.claim(&claim_name, "a", Duration::from_millis(200)).await.expect("claim") {
        ClaimOutcome::Held(claim) => claim,
        other => panic!("{other:?}"),
    };
    store.save_process(&process, "order-1", Some(&later), Some(&lapsed)).await.expect("fenced while held");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let stale = ProcessState::running(json!({ "step": "stale" }), Position(10));
    assert!(matches!(
        store.save_process(&process, "order-1", Some(&stale), Some(&lapsed)).await,
        Err(StoreError::ClaimLost { .. })
    ));
    assert_eq!(store.load_process(&process, "order-1").await.expect("load"), Some(later), "nothing written");
    store.save_process(&process, "order-1", None, None).await.expect("delete");
    assert_eq!(store.load_process(&process, "order-1").await.expect("load"), None);

    let now = Timestamp::now();
    let minute = Duration::from_secs(60);
    let scheduled = |key: &str, name: &str, due: Timestamp| Scheduled {
        owner: process.clone(),
        key: key.to_owned(),
        name: name.to_owned(),
        due,
        command: json!({ "cancel": key }),
        command_id: CommandId::new(),
        attempts: 0,
    };
    store.schedule(scheduled("order-1", "payment-deadline", now.minus(minute))).await.expect("schedule");
    store.schedule(scheduled("order-2", "payment-deadline", now.minus(2 * minute))).await.expect("schedule");
    store.schedule(scheduled("order-3", "payment-deadline", now.plus(minute))).await.expect("schedule");
    let mut other_owner = scheduled("order-9", "payment-deadline", now.minus(minute));
    other_owner.owner = format!("{process}-other");
    store.schedule(other_owner).await.expect("schedule");
    let due = store.due(&process, now, 10).await.expect("due");
    let keys: Vec<&str> = due.iter().map(|s| s.key.as_str()).collect();
    assert_eq!(keys, ["order-2", "order-1"], "due ones only, earliest first, this owner's");
    assert_eq!(due[0].command, json!({ "cancel": "order-2" }));
    assert_eq!(store.due(&process, now, 1).await.expect("due").len(), 1, "at most max");
    // Scheduling the same name again replaces it: now order-1's deadline is in the future.
    let replaced = scheduled("order-1", "payment-deadline", now.plus(minute));
    let replaced_id = replaced.command_id;
    store.schedule(replaced).await.expect("replace");
    let due: Vec<String> = store.due(&process, now, 10).await.expect("due").into_iter().map(|s| s.key).collect();
    assert_eq!(due, ["order-2"]);
    let all = store.due(&process, now.plus(2 * minute), 10).await.expect("due");
    assert_eq!(all.len(), 3);
    let by_the_end_of_time = store.due(&process, Timestamp(i64::MAX), 10).await.expect("due at the end of i64");
    assert_eq!(by_the_end_of_time.len(), 3, "every pending command is due by the end of time");
    assert!(all.iter().any(|s| s.key == "order-1" && s.command_id == replaced_id));
    // Removing it only if it is still the given one: order-1's was scheduled anew.
    let first_id = all.iter().find(|s| s.key == "order-2").map(|s| s.command_id).expect("order-2");
    assert!(!store.unschedule(&process, "order-1", "payment-deadline", Some(CommandId::new())).await.expect("only"));
    assert!(store.unschedule(&process, "order-1", "payment-deadline", Some(replaced_id)).await.expect("only"));
    assert!(store.unschedule(&process, "order-2", "payment-deadline", Some(first_id)).await.expect("unschedule"));
    assert!(!store.unschedule(&process, "order-2", "payment-deadline", None).await.expect("unschedule twice"));
    assert!(store.unschedule(&process, "order-3", "payment-deadline", None).await.expect("unschedule any"));
    assert!(store.due(&process, now, 10).await.expect("due").is_empty());
}

fn rand_counter_id() -> u32 {
    let bytes = uuid::Uuid::new_v4().into_bytes();
    u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

// ----------------------------------------------------------------------------------------------
// Process managers run on the store (a test saga, see `testing::saga`).

/// A running test saga and what it takes to wait for it.
struct SagaRun {
    running: crate::process::RunningProcess,
    progress: crate::handler::Progress,
    name: String,
}

impl SagaRun {
    fn start<S: Store + ?Sized>(
        store: &Arc<S>,
        saga: saga::Saga,
        router: &saga::RecordingRouter,
        config: crate::handler::RunnerConfig,
        clock: crate::clock::Clock,
    ) -> Self {
        let progress = crate::handler::Progress::new();
        let name = saga.name.clone();
        let running =
            crate::process::spawn_process_manager(Arc::clone(store), saga, router.clone(), config, clock, &progress);
        Self { running, progress, name }
    }

    /// Waits until the saga has handled (or parked) every event stored so far.
    async fn caught_up<S: EventStore + ?Sized>(&self, store: &S) {
        let head = store.head().await.expect("head");
        self.progress.wait_for(&self.name, head, Duration::from_secs(20)).await.unwrap_or_else(|error| {
            panic!("saga {} did not reach {head:?}: {error} ({:?})", self.name, self.running.events().status())
        });
    }
}

/// Fast retries, parking after the first failure. The claim's ttl is long enough that a
/// loaded machine's slow renewal does not end a tenure mid-test (each run gives up its claim
/// when stopped, so no test waits for it to lapse).
fn saga_config() -> crate::handler::RunnerConfig {
    crate::handler::RunnerConfig {
        initial_backoff: Duration::from_millis(5),
        claim_ttl: Duration::from_secs(10),
        claim_retry: Duration::from_millis(50),
        checkpoint_delay: Duration::ZERO,
        on_error: crate::handler::ErrorPolicy::ParkAfter { attempts: 1 },
        ..crate::handler::RunnerConfig::default()
    }
}

/// Waits until `name`'s checkpoint in the store reaches `position`, and returns it.
async fn saved_checkpoint<S: EventStore + ?Sized>(store: &S, name: &str, position: Position) -> Position {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match store.load_checkpoint(name).await.expect("load checkpoint") {
            Some(saved) if saved >= position => return saved,
            saved => assert!(tokio::time::Instant::now() < deadline, "{name}'s checkpoint stayed at {saved:?}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn saga_key() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// A reaction that sends two commands under one step name is refused before anything of it is
/// sent (the second would get the first one's id and be dropped as its duplicate): the event
/// fails, and with `ParkAfter` it is parked with an error naming the step.
pub async fn process_repeated_step_is_refused<S: Store + ?Sized>(store: Arc<S>) {
    use saga::{append_saga, RecordingRouter, Saga, SagaEvent};
    let key = saga_key();
    append_saga(&*store, SagaEvent::Started { key: key.clone() }).await;
    append_saga(&*store, SagaEvent::AskedTwice { key: key.clone() }).await;
    let twice = store.head().await.expect("head");
    let router = RecordingRouter::default();
    let (clock, _control) = crate::clock::Clock::test();
    let run = SagaRun::start(&store, Saga::new("repeated"), &router, saga_config(), clock);
    run.caught_up(&*store).await;
    assert_eq!(router.whats(), ["hello"], "nothing of the faulty reaction is sent");
    let parked = store.parked("repeated").await.expect("parked");
    assert_eq!(parked.iter().map(|p| p.position).collect::<Vec<_>>(), [twice], "{parked:?}");
    assert!(parked[0].error.contains("step \"twice\" is used twice"), "{}", parked[0].error);
    run.running.stop().await;
}

/// An instance stopped by [`Route::Stop`](crate::Route::Stop) leaves a tombstone: a replay after
/// a checkpoint that lagged behind (a stuck partition, a failover) sends nothing for it and
/// schedules nothing, a later start begins a fresh instance, and tombstones at or below the
/// saved checkpoint are pruned.
pub async fn process_replay_over_a_stopped_instance_sends_nothing<S: Store + ?Sized>(store: Arc<S>) {
    use saga::{append_saga, RecordingRouter, Saga, SagaEvent};
    let (key, other) = (saga_key(), saga_key());
    for key in [&key, &other] {
        append_saga(&*store, SagaEvent::Started { key: key.clone() }).await;
        append_saga(&*store, SagaEvent::Stopped { key: key.clone() }).await;
    }
    let (clock, control) = crate::clock::Clock::test();
    let router = RecordingRouter::default();
    let run = SagaRun::start(&store, Saga::new("stopping"), &router, saga_config(), clock.clone());
    run.caught_up(&*store).await;
    assert_eq!(router.whats(), ["hello", "hello"]);
    let far = clock.now().plus(saga::SAGA_DEADLINE * 2);
    assert!(store.due("stopping", far, 10).await.expect("due").is_empty(), "stopping cancelled the deadlines");
    let tombstone = store.load_process("stopping", &key).await.expect("load").expect("a tombstone");
    assert!(tombstone.ended, "{tombstone:?}");
    run.running.stop().await;

    // The checkpoint lagged: everything is delivered again.
    store.save_checkpoint("stopping", Position::START).await.expect("reset the checkpoint");
    let replay = RecordingRouter::default();
    let run = SagaRun::start(&store, Saga::new("stopping"), &replay, saga_config(), clock.clone());
    run.caught_up(&*store).await;
    assert_eq!(replay.whats(), Vec::<String>::new(), "the replay restarted a stopped instance");
    assert!(store.due("stopping", far, 10).await.expect("due").is_empty(), "the replay scheduled a deadline");

    // A new start after the stop: a fresh instance.
    append_saga(&*store, SagaEvent::Started { key: key.clone() }).await;
    run.caught_up(&*store).await;
    assert_eq!(replay.whats(), ["hello"]);
    let restarted = store.load_process("stopping", &key).await.expect("load").expect("restarted");
    assert!(!restarted.ended);

    // The other instance's tombstone is below the saved checkpoint: the scheduler prunes it.
    control.advance(Duration::from_secs(120));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while store.load_process("stopping", &other).await.expect("load").is_some() {
        assert!(tokio::time::Instant::now() < deadline, "the tombstone below the checkpoint was never pruned");
        control.advance(Duration::from_secs(120));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(store.load_process("stopping", &key).await.expect("load").is_some(), "running instances stay");
    run.running.stop().await;
}

/// A reaction that cancels a schedule and schedules the same name again moves it (the
/// cancellation applies to what was pending before the reaction, not to its own schedule).
pub async fn process_cancel_and_schedule_of_one_name_moves_it<S: Store + ?Sized>(store: Arc<S>) {
    use saga::{append_saga, RecordingRouter, Saga, SagaEvent};
    let key = saga_key();
    append_saga(&*store, SagaEvent::Started { key: key.clone() }).await;
    append_saga(&*store, SagaEvent::Postponed { key: key.clone() }).await;
    let (clock, _control) = crate::clock::Clock::test();
    let router = RecordingRouter::default();
    let run = SagaRun::start(&store, Saga::new("postponing"), &router, saga_config(), clock.clone());
    run.caught_up(&*store).await;
    let once = clock.now().plus(saga::SAGA_DEADLINE + Duration::from_secs(60));
    assert!(store.due("postponing", once, 10).await.expect("due").is_empty(), "the first deadline was cancelled");
    let twice = clock.now().plus(saga::SAGA_DEADLINE * 2 + Duration::from_secs(60));
    let due = store.due("postponing", twice, 10).await.expect("due");
    assert_eq!(due.len(), 1, "the deadline was moved, not lost: {due:?}");
    assert_eq!((due[0].key.as_str(), due[0].name.as_str()), (key.as_str(), "deadline"));
    run.running.stop().await;
}

/// Tombstones ([`ProcessState::ended`](crate::ProcessState::ended)) are stored and read back,
/// and pruned at or below a position; running instances and other process managers' are kept.
pub async fn process_tombstones_round_trip_and_prune<S: Store + ?Sized>(store: Arc<S>) {
    use crate::coordination::ProcessState;
    let process = format!("pruning-{}", uuid::Uuid::new_v4().simple());
    let other = format!("{process}-other");
    store.save_process(&process, "a", Some(&ProcessState::ended(Position(5))), None).await.expect("save");
    store.save_process(&process, "b", Some(&ProcessState::ended(Position(9))), None).await.expect("save");
    store
        .save_process(&process, "c", Some(&ProcessState::running(json!({"n": 1}), Position(3))), None)
        .await
        .expect("save");
    store.save_process(&other, "a", Some(&ProcessState::ended(Position(1))), None).await.expect("save");
    assert_eq!(store.load_process(&process, "a").await.expect("load"), Some(ProcessState::ended(Position(5))));
    assert_eq!(store.prune_processes(&process, Position(5)).await.expect("prune"), 1);
    assert_eq!(store.load_process(&process, "a").await.expect("load"), None);
    assert!(store.load_process(&process, "b").await.expect("load").is_some_and(|b| b.ended));
    assert!(store.load_process(&process, "c").await.expect("load").is_some_and(|c| !c.ended));
    assert!(store.load_process(&other, "a").await.expect("load").is_some(), "another process manager's");
}

/// A refused command's compensation is decided on the state the reaction decided on (for the
/// event that starts the instance: the started state, not `State::default()`), with the typed
/// refusal; a refused compensation fails the event (here parked), instead of being logged only.
pub async fn process_refusals_are_compensated_from_the_decided_state<S: Store + ?Sized>(store: Arc<S>) {
    use saga::{append_saga, RecordingRouter, Saga, SagaEvent};
    let (key, other) = (saga_key(), saga_key());
    append_saga(&*store, SagaEvent::StartedAsking { key: key.clone(), what: "refuse-me".into() }).await;
    append_saga(&*store, SagaEvent::StartedAsking { key: other.clone(), what: "refuse-compensation".into() }).await;
    let refused_compensation = store.head().await.expect("head");
    let router = RecordingRouter::default();
    let (clock, _control) = crate::clock::Clock::test();
    let run = SagaRun::start(&store, Saga::new("refusals"), &router, saga_config(), clock);
    run.caught_up(&*store).await;
    let whats = router.whats();
    assert_eq!(
        whats[..2],
        ["refuse-me".to_owned(), format!("undo refuse-me of {key} (typed)")],
        "the compensation is built from the started state, with the typed refusal"
    );
    assert_eq!(
        whats[2..],
        ["refuse-compensation".to_owned(), format!("refuse: undo refuse-compensation of {other} (typed)")]
    );
    let parked = store.parked("refusals").await.expect("parked");
    assert_eq!(
        parked.iter().map(|p| p.position).collect::<Vec<_>>(),
        [refused_compensation],
        "a refused compensation fails its event (parked here): {parked:?}"
    );
    assert!(
        parked[0].error.contains("compensation at step \"refuse-compensation/rejected/undo\""),
        "{}",
        parked[0].error
    );
    let instance = store.load_process("refusals", &other).await.expect("load");
    assert_eq!(instance, None, "the failed event saved nothing");
    run.running.stop().await;
}

/// A scheduled command's failures are recorded (due again later, attempts counted) or it is set
/// aside: not due, listed with its error, retried (due again, attempts reset) or discarded;
/// scheduling the name anew clears it. Only the command with the given id is touched.
pub async fn scheduled_commands_are_set_aside_and_retried<S: Store + ?Sized>(store: Arc<S>) {
    use crate::coordination::Scheduled;
    let owner = format!("deadlines-{}", uuid::Uuid::new_v4().simple());
    let now = Timestamp::now();
    let minute = Duration::from_secs(60);
    let scheduled = |key: &str| Scheduled {
        owner: owner.clone(),
        key: key.to_owned(),
        name: "deadline".to_owned(),
        due: now.minus(minute),
        command: json!({ "cancel": key }),
        command_id: CommandId::new(),
        attempts: 0,
    };
    let (a, b) = (scheduled("a"), scheduled("b"));
    store.schedule(a.clone()).await.expect("schedule");
    store.schedule(b.clone()).await.expect("schedule");
    let stale = Scheduled { command_id: CommandId::new(), ..a.clone() };
    assert!(!store.scheduled_failed(&stale, "x", None).await.expect("failed"), "another command id: untouched");

    assert!(store.scheduled_failed(&a, "boom", Some(now.plus(minute))).await.expect("failed"));
    let due: Vec<String> = store.due(&owner, now, 10).await.expect("due").into_iter().map(|s| s.key).collect();
    assert_eq!(due, ["b"], "a failed one waits for its retry time");
    let later = store.due(&owner, now.plus(2 * minute), 10).await.expect("due");
    let retried = later.iter().find(|s| s.key == "a").expect("a is due at its retry time");
    assert_eq!((retried.attempts, retried.due), (1, now.plus(minute)));

    assert!(store.scheduled_failed(retried, "unreadable", None).await.expect("set aside"));
    let due: Vec<String> =
        store.due(&owner, now.plus(10 * minute), 10).await.expect("due").into_iter().map(|s| s.key).collect();
    assert_eq!(due, ["b"], "a set-aside one is never due");
    let aside = store.set_aside_scheduled(&owner).await.expect("set aside");
    assert_eq!(aside.len(), 1);
    assert_eq!(
        (aside[0].scheduled.key.as_str(), aside[0].scheduled.attempts, aside[0].error.as_str()),
        ("a", 2, "unreadable")
    );
    assert_eq!(aside[0].scheduled.command, json!({ "cancel": "a" }));

    assert!(store.retry_scheduled(&owner, "a", "deadline").await.expect("retry"));
    assert!(!store.retry_scheduled(&owner, "a", "deadline").await.expect("retry again"), "no longer set aside");
    let due = store.due(&owner, now.plus(10 * minute), 10).await.expect("due");
    assert_eq!(due.iter().find(|s| s.key == "a").map(|s| s.attempts), Some(0), "due again, attempts reset");
    assert!(store.set_aside_scheduled(&owner).await.expect("set aside").is_empty());

    // Scheduling anew clears a set-aside one; unscheduling removes one.
    assert!(store.scheduled_failed(&b, "bad", None).await.expect("set aside"));
    store.schedule(scheduled("b")).await.expect("schedule anew");
    assert!(store.set_aside_scheduled(&owner).await.expect("set aside").is_empty());
    assert!(store.due(&owner, now, 10).await.expect("due").iter().any(|s| s.key == "b" && s.attempts == 0));
    let b_now = store.due(&owner, now, 10).await.expect("due").into_iter().find(|s| s.key == "b").expect("b");
    assert!(store.scheduled_failed(&b_now, "bad", None).await.expect("set aside"));
    assert!(store.unschedule(&owner, "b", "deadline", None).await.expect("discard"));
    assert!(store.set_aside_scheduled(&owner).await.expect("set aside").is_empty());
}

/// 100 due commands that can never fire (unreadable) in front of a good one: the scheduler
/// sets them aside (listed for an operator) and fires the good one; a command whose routing
/// keeps failing is tried `MAX_FIRING_ATTEMPTS` times, with a back-off, then set aside.
pub async fn process_unfireable_scheduled_commands_do_not_block_the_rest<S: Store + ?Sized>(store: Arc<S>) {
    use crate::coordination::{Scheduled, MAX_FIRING_ATTEMPTS};
    use crate::process::ProcessAdmin;
    use saga::{RecordingRouter, Saga};
    let (clock, control) = crate::clock::Clock::test();
    let now = clock.now();
    let scheduled = |key: String, due: Timestamp, command: serde_json::Value| Scheduled {
        owner: "deadlines".to_owned(),
        key,
        name: "deadline".to_owned(),
        due,
        command,
        command_id: CommandId::new(),
        attempts: 0,
    };
    for n in 0..100 {
        let unreadable = scheduled(format!("bad-{n:03}"), now.minus(Duration::from_secs(60)), json!({ "renamed": n }));
        store.schedule(unreadable).await.expect("schedule");
    }
    let good = json!({ "command": { "key": "good", "what": "good" }, "causation": null, "correlation": null });
    store.schedule(scheduled("good".to_owned(), now.plus(Duration::from_secs(1)), good)).await.expect("schedule");

    let router = RecordingRouter::default();
    let run = SagaRun::start(&store, Saga::new("deadlines"), &router, saga_config(), clock.clone());
    control.advance(Duration::from_secs(2));
    router.wait_sent(1, Duration::from_secs(20)).await;
    assert_eq!(router.whats(), ["good"]);
    let admin = ProcessAdmin::new(Arc::clone(&store));
    let aside = admin.set_aside("deadlines").await.expect("set aside");
    assert_eq!(aside.len(), 100, "every unreadable one is set aside");
    assert!(aside[0].error.starts_with("unreadable"), "{}", aside[0].error);
    assert!(admin.discard("deadlines", "bad-000", "deadline").await.expect("discard"));
    assert!(!admin.discard("deadlines", "bad-000", "deadline").await.expect("discard twice"));
    assert_eq!(admin.set_aside("deadlines").await.expect("set aside").len(), 99);

    // Routing that keeps failing: retried with a back-off, then set aside.
    let failing = json!({ "command": { "key": "failing", "what": "fail" }, "causation": null, "correlation": null });
    store.schedule(scheduled("failing".to_owned(), clock.now(), failing)).await.expect("schedule");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !admin.set_aside("deadlines").await.expect("set aside").iter().any(|c| c.scheduled.key == "failing") {
        assert!(tokio::time::Instant::now() < deadline, "never set aside: {:?}", router.whats());
        control.advance(Duration::from_secs(600));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let attempts = router.whats().iter().filter(|what| *what == "fail").count();
    assert_eq!(attempts, MAX_FIRING_ATTEMPTS as usize);
    run.running.stop().await;
}

/// A scheduled command whose routing fails once is tried again after its back-off in real
/// time, even when the scheduler's clock does not move (a test clock, or a deadline long past):
/// a transient failure never strands it.
pub async fn process_a_failed_firing_is_retried_without_moving_the_clock<S: Store + ?Sized>(store: Arc<S>) {
    use crate::coordination::Scheduled;
    use crate::process::ProcessAdmin;
    use saga::{RecordingRouter, Saga};
    let (clock, _control) = crate::clock::Clock::test();
    let command = json!({ "command": { "key": "flaky", "what": "flaky" }, "causation": null, "correlation": null });
    let scheduled = Scheduled {
        owner: "retrying".to_owned(),
        key: "flaky".to_owned(),
        name: "deadline".to_owned(),
        due: clock.now().minus(Duration::from_secs(1)),
        command,
        command_id: CommandId::new(),
        attempts: 0,
    };
    store.schedule(scheduled).await.expect("schedule");
    let router = RecordingRouter::default();
    let run = SagaRun::start(&store, Saga::new("retrying"), &router, saga_config(), clock.clone());
    router.wait_sent(2, Duration::from_secs(20)).await;
    assert_eq!(router.whats(), ["flaky", "flaky"], "failed once, then fired");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !store.due("retrying", clock.now(), 10).await.expect("due").is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "the fired command was never removed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let admin = ProcessAdmin::new(Arc::clone(&store));
    assert!(admin.set_aside("retrying").await.expect("set aside").is_empty(), "not set aside");
    run.running.stop().await;
}

/// A reaction can end its instance ([`Effects::end`](crate::Effects::end)): like a stop, its
/// schedules are cancelled, later events for it are ignored, and it stays as a tombstone; an
/// operator lists a process manager's instances, running and ended, page by page.
pub async fn process_instances_end_from_a_reaction_and_are_listed<S: Store + ?Sized>(store: Arc<S>) {
    use crate::process::ProcessAdmin;
    use saga::{append_saga, RecordingRouter, Saga, SagaEvent};
    let (first, second) = ("instance-a".to_owned(), "instance-b".to_owned());
    append_saga(&*store, SagaEvent::Started { key: first.clone() }).await;
    append_saga(&*store, SagaEvent::Started { key: second.clone() }).await;
    append_saga(&*store, SagaEvent::Finished { key: first.clone() }).await;
    let finished = store.head().await.expect("head");
    append_saga(&*store, SagaEvent::Asked { key: first.clone(), what: "after the end".into() }).await;
    let (clock, _control) = crate::clock::Clock::test();
    let router = RecordingRouter::default();
    let run = SagaRun::start(&store, Saga::new("ending"), &router, saga_config(), clock.clone());
    run.caught_up(&*store).await;
    assert_eq!(router.whats(), ["hello", "hello"], "an ended instance ignores later events");
    let far = clock.now().plus(saga::SAGA_DEADLINE * 2);
    let due: Vec<String> = store.due("ending", far, 10).await.expect("due").into_iter().map(|s| s.key).collect();
    assert_eq!(due, std::slice::from_ref(&second), "ending cancelled the instance's deadline");

    let admin = ProcessAdmin::new(Arc::clone(&store));
    let listed = admin.instances("ending", None, 10).await.expect("instances");
    let summary: Vec<(&str, bool)> = listed.iter().map(|i| (i.key.as_str(), i.state.ended)).collect();
    assert_eq!(summary, [(first.as_str(), true), (second.as_str(), false)]);
    assert_eq!(listed[0].state.position, finished, "the tombstone is at the ending event");
    let page: Vec<String> =
        admin.instances("ending", Some(&first), 1).await.expect("page").into_iter().map(|i| i.key).collect();
    assert_eq!(page, [second]);
    assert!(admin.instances("other", None, 10).await.expect("instances").is_empty());
    run.running.stop().await;
}

/// A process manager renamed with `previous_names` continues where the old name stopped: it
/// does not handle again what the old name handled (no second command), takes over its
/// instances, derives command ids from the old name, and fires the old name's pending
/// schedule, once.
pub async fn process_renamed_manager_continues_where_the_old_name_stopped<S: Store + ?Sized>(store: Arc<S>) {
    use saga::{append_saga, RecordingRouter, Saga, SagaEvent};
    let (key, done) = (saga_key(), saga_key());
    append_saga(&*store, SagaEvent::Started { key: done.clone() }).await;
    append_saga(&*store, SagaEvent::Stopped { key: done.clone() }).await;
    append_saga(&*store, SagaEvent::Started { key: key.clone() }).await;
    let (clock, control) = crate::clock::Clock::test();
    let old = RecordingRouter::default();
    let run = SagaRun::start(&store, Saga::new("fulfilment"), &old, saga_config(), clock.clone());
    run.caught_up(&*store).await;
    assert_eq!(old.whats(), ["hello", "hello"]);
    // Caught up means handled; the checkpoint follows (at once: no checkpoint delay).
    let head = store.head().await.expect("head");
    let checkpoint = saved_checkpoint(&*store, "fulfilment", head).await;
    run.running.stop().await;
    // Only the old name's checkpoint remembers the ended instance.
    store.prune_processes("fulfilment", checkpoint).await.expect("prune");
    assert!(store.load_process("fulfilment", &done).await.expect("load").is_none());

    let renamed = RecordingRouter::default();
    let saga = Saga::renamed("fulfilment-v2", vec!["fulfilment"]);
    let run = SagaRun::start(&store, saga, &renamed, saga_config(), clock.clone());
    append_saga(&*store, SagaEvent::Asked { key: key.clone(), what: "more".into() }).await;
    run.caught_up(&*store).await;
    assert_eq!(renamed.whats(), ["more"], "the renamed manager handled an old event again, or lost the instance");
    let asked = store.read_all(Position::START, 100).await.expect("read").pop().expect("the Asked event");
    let expected = CommandId::derived(asked.event_id, &format!("fulfilment/{key}/more"));
    assert_eq!(renamed.sent()[0].command_id, expected, "ids are derived from the old name");
    assert!(store.load_process("fulfilment", &key).await.expect("load").is_none(), "moved from the old name");
    let moved = store.load_process("fulfilment-v2", &key).await.expect("load").expect("under the new name");
    assert_eq!(moved.state["state"]["asked"], json!(["more"]));

    // The old name's deadline fires once.
    control.advance(saga::SAGA_DEADLINE + Duration::from_secs(60));
    renamed.wait_sent(2, Duration::from_secs(20)).await;
    let far = clock.now().plus(saga::SAGA_DEADLINE * 2);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !store.due("fulfilment", far, 10).await.expect("due").is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "the fired deadline was never removed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    control.advance(Duration::from_secs(60));
    assert_eq!(renamed.whats(), ["more", "deadline"]);
    run.running.stop().await;
    assert_eq!(renamed.whats(), ["more", "deadline"], "fired once");
}
