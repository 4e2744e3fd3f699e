//! Decisions (Dynamic Consistency Boundaries) through the `Decider`, and tags declared with the
//! `DomainEvent` derive.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use cqrs_core::testing::DecisionTest;
use cqrs_core::{
    async_trait, AppendCondition, AppendOutcome, CommandEnvelope, CommandId, Decider, Decision, DispatchError,
    DomainEvent, EventStore, ExpectedVersion, NewEvent, Position, Query, QueryItem, RecordedEvent, StoreError,
    StreamId, StreamIdError, Tag, Version,
};
use cqrs_memory::MemoryStore;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(category = "*", tags = course_tags)]
enum CourseEvent {
    CourseDefined {
        #[event(tag = "course")]
        course: String,
        capacity: u32,
    },
    StudentSubscribed {
        #[event(tag = "course")]
        course: String,
        #[event(tag = "student")]
        student: u32,
    },
    Note(String),
}

/// A computed tag: every event of a course in the "spring" term carries `term:spring`.
fn course_tags(event: &CourseEvent) -> Vec<Tag> {
    match event {
        CourseEvent::CourseDefined { course, .. } | CourseEvent::StudentSubscribed { course, .. }
            if course.starts_with("spring") =>
        {
            vec![Tag::new("term", "spring")]
        }
        _ => Vec::new(),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(name = "Renamed", category = "person")]
struct Renamed(#[event(tag = "person")] u64, String);

#[test]
fn the_derive_tags_events_from_fields_and_a_function() {
    let subscribed = CourseEvent::StudentSubscribed { course: "spring-c1".into(), student: 7 };
    let tags: Vec<String> = subscribed.tags().iter().map(|tag| tag.to_string()).collect();
    assert_eq!(tags, ["course:spring-c1", "student:7", "term:spring"]);
    assert!(CourseEvent::Note("x".into()).tags().is_empty());
    assert_eq!(Renamed(9, "ada".into()).tags(), vec![Tag::new("person", 9)]);
    let new = NewEvent::from_domain(&subscribed, Default::default()).expect("encode");
    assert_eq!(new.tags, subscribed.tags(), "tags travel with the encoded event");
}

/// Subscribes a student to a course: the course's capacity and the student's limit of 2
/// courses, in one decision.
#[derive(Debug, Default, Clone)]
struct Subscribe {
    capacity: Option<u32>,
    /// Every (course, student) subscription the query matched.
    subscriptions: Vec<(String, u32)>,
}

#[derive(Debug, Clone)]
struct SubscribeCommand {
    course: String,
    student: u32,
}

#[derive(Debug, PartialEq, thiserror::Error)]
enum Refused {
    #[error("no such course")]
    NoCourse,
    #[error("the course is full")]
    Full,
    #[error("the student has 2 courses")]
    StudentLimit,
}

thread_local! {
    static DECIDING: std::cell::Cell<Option<u32>> = const { std::cell::Cell::new(None) };
}

impl Decision for Subscribe {
    const NAME: &'static str = "subscribe";
    type Command = SubscribeCommand;
    type Event = CourseEvent;
    type Error = Refused;

    fn query(command: &SubscribeCommand) -> Query {
        Query::from_items([
            QueryItem::types(["CourseDefined", "StudentSubscribed"]).with_tags([Tag::new("course", &command.course)]),
            QueryItem::types(["StudentSubscribed"]).with_tags([Tag::new("student", command.student)]),
        ])
    }

    fn stream_id(command: &SubscribeCommand) -> Result<StreamId, StreamIdError> {
        StreamId::new(format!("subscription-{}", command.course))
    }

    fn decide(&self, command: &SubscribeCommand) -> Result<Vec<CourseEvent>, Refused> {
        DECIDING.with(|cell| cell.set(Some(cell.get().unwrap_or(0) + 1)));
        let capacity = self.capacity.ok_or(Refused::NoCourse)?;
        let taken = self.subscriptions.iter().filter(|(course, _)| *course == command.course).count();
        let courses = self.subscriptions.iter().filter(|(_, student)| *student == command.student).count();
        if taken >= capacity as usize {
            return Err(Refused::Full);
        }
        if courses >= 2 {
            return Err(Refused::StudentLimit);
        }
        Ok(vec![CourseEvent::StudentSubscribed { course: command.course.clone(), student: command.student }])
    }

    fn apply(mut self, event: &CourseEvent) -> Self {
        match event {
            CourseEvent::CourseDefined { capacity, .. } => self.capacity = Some(*capacity),
            CourseEvent::StudentSubscribed { course, student } => self.subscriptions.push((course.clone(), *student)),
            CourseEvent::Note(_) => {}
        }
        self
    }
}

fn subscribe(course: &str, student: u32) -> CommandEnvelope<SubscribeCommand> {
    CommandEnvelope::new(SubscribeCommand { course: course.to_owned(), student })
}

async fn define(store: &MemoryStore, course: &str, capacity: u32) {
    let event = CourseEvent::CourseDefined { course: course.to_owned(), capacity };
    let new = NewEvent::from_domain(&event, Default::default()).expect("encode");
    store
        .append(&StreamId::new(format!("course-{course}")).expect("id"), ExpectedVersion::NoStream, vec![new])
        .await
        .expect("define");
}

#[test]
fn decisions_are_tested_given_when_then() {
    DecisionTest::<Subscribe>::given(vec![CourseEvent::CourseDefined { course: "c".into(), capacity: 1 }])
        .when(SubscribeCommand { course: "c".into(), student: 1 })
        .then_events(vec![CourseEvent::StudentSubscribed { course: "c".into(), student: 1 }]);
    DecisionTest::<Subscribe>::given_no_events()
        .when(SubscribeCommand { course: "c".into(), student: 1 })
        .then_error(Refused::NoCourse);
}

#[tokio::test]
async fn a_decision_reads_its_query_decides_and_stores_with_its_tags() {
    let store = Arc::new(MemoryStore::new());
    define(&store, "c1", 2).await;
    let decider = Decider::<Subscribe, _>::new(Arc::clone(&store));
    let first = decider.decide(subscribe("c1", 1)).await.expect("a seat is free");
    let appended = first.appended.expect("stored");
    let stored = store.read_all(Position(appended.first_position.0 - 1), 1).await.expect("read");
    assert_eq!(&*stored[0].tags, &[Tag::new("course", "c1"), Tag::new("student", 1)]);
    assert_eq!(stored[0].stream_id.as_str(), "subscription-c1");
    decider.decide(subscribe("c1", 2)).await.expect("the second seat");
    match decider.decide(subscribe("c1", 3)).await {
        Err(DispatchError::Rejected(Refused::Full)) => {}
        other => panic!("the course is full, got {other:?}"),
    }
    // An unknown course is refused; a stream id that cannot be made is an invalid command.
    assert!(matches!(decider.decide(subscribe("nope", 1)).await, Err(DispatchError::Rejected(Refused::NoCourse))));
    let long = "x".repeat(1_000);
    assert!(matches!(decider.decide(subscribe(&long, 1)).await, Err(DispatchError::InvalidStreamId(_))));
}

#[tokio::test]
async fn a_repeated_command_id_answers_its_first_outcome() {
    let store = Arc::new(MemoryStore::new());
    define(&store, "c1", 1).await;
    let decider = Decider::<Subscribe, _>::new(Arc::clone(&store));
    let command_id = CommandId::new();
    let first = decider.decide(subscribe("c1", 1).with_command_id(command_id)).await.expect("stored");
    // The course is now full, yet the same command id is answered with its first outcome.
    let again = decider.decide(subscribe("c1", 1).with_command_id(command_id)).await.expect("duplicate");
    assert!(again.duplicate);
    assert_eq!(again.appended, first.appended);
    assert_eq!(store.len(), 2);
}

/// A store whose first `n` conditional appends see a competing event land first: the decider
/// must read it, decide again, and store on the new facts.
struct Competitor {
    inner: MemoryStore,
    races_left: AtomicUsize,
}

#[async_trait]
impl EventStore for Competitor {
    async fn append_with_condition(
        &self,
        stream_id: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        condition: Option<AppendCondition>,
    ) -> Result<AppendOutcome, StoreError> {
        if condition.is_some() && self.races_left.load(Ordering::SeqCst) > 0 {
            self.races_left.fetch_sub(1, Ordering::SeqCst);
            let rival = CourseEvent::StudentSubscribed { course: "c1".into(), student: 99 };
            let new = NewEvent::from_domain(&rival, Default::default()).expect("encode");
            self.inner.append(&StreamId::new("rival-1").expect("id"), ExpectedVersion::Any, vec![new]).await?;
        }
        self.inner.append_with_condition(stream_id, expected, events, condition).await
    }
    async fn append_atomic(
        &self,
        appends: Vec<cqrs_core::StreamAppend>,
        condition: Option<AppendCondition>,
    ) -> Result<Vec<AppendOutcome>, StoreError> {
        self.inner.append_atomic(appends, condition).await
    }

    async fn read_query(&self, query: &Query, after: Position, max: usize) -> Result<Vec<RecordedEvent>, StoreError> {
        self.inner.read_query(query, after, max).await
    }
    async fn read_stream(&self, s: &StreamId, from: Version, max: usize) -> Result<Vec<RecordedEvent>, StoreError> {
        self.inner.read_stream(s, from, max).await
    }
    async fn read_all(&self, after: Position, max: usize) -> Result<Vec<RecordedEvent>, StoreError> {
        self.inner.read_all(after, max).await
    }
    async fn head(&self) -> Result<Position, StoreError> {
        self.inner.head().await
    }
    async fn stream_version(&self, s: &StreamId) -> Result<Version, StoreError> {
        self.inner.stream_version(s).await
    }
    async fn find_command(&self, s: &StreamId, c: CommandId) -> Result<Option<cqrs_core::AppendResult>, StoreError> {
        self.inner.find_command(s, c).await
    }
    async fn load_checkpoint(&self, name: &str) -> Result<Option<Position>, StoreError> {
        self.inner.load_checkpoint(name).await
    }
    async fn save_checkpoint(&self, name: &str, position: Position) -> Result<(), StoreError> {
        self.inner.save_checkpoint(name, position).await
    }
    fn notifications(&self) -> watch::Receiver<Position> {
        self.inner.notifications()
    }
}

#[tokio::test]
async fn a_failed_condition_is_decided_again_on_the_newer_facts() {
    let inner = MemoryStore::new();
    define(&inner, "c1", 2).await;
    let store = Arc::new(Competitor { inner: inner.clone(), races_left: AtomicUsize::new(1) });
    let decider = Decider::<Subscribe, _>::new(Arc::clone(&store));
    DECIDING.with(|cell| cell.set(None));
    decider.decide(subscribe("c1", 1)).await.expect("one seat is left after the rival's");
    assert_eq!(DECIDING.with(std::cell::Cell::get), Some(2), "decided twice: before and after the rival");
    // Now full: the next one loses the race to a rival and is then refused on the new facts.
    store.races_left.store(1, Ordering::SeqCst);
    let result = decider.decide(subscribe("c1", 2)).await;
    assert!(matches!(result, Err(DispatchError::Rejected(Refused::Full))), "got {result:?}");
    // A rival on every attempt: bounded retries.
    store.races_left.store(usize::MAX, Ordering::SeqCst);
    let stubborn = Decider::<Subscribe, _>::new(Arc::new(Competitor {
        inner: {
            let fresh = MemoryStore::new();
            define(&fresh, "c1", 1_000).await;
            fresh
        },
        races_left: AtomicUsize::new(usize::MAX),
    }))
    .with_max_conflict_retries(3);
    match stubborn.decide(subscribe("c1", 5)).await {
        Err(DispatchError::TooManyConflicts { attempts, .. }) => assert_eq!(attempts, 4),
        other => panic!("expected TooManyConflicts, got {other:?}"),
    }
}
