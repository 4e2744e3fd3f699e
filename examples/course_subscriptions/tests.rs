//! The example's rules, given/when/then, and under a race on the memory and SQLite stores.

use std::sync::Arc;

use cqrs_core::testing::DecisionTest;
use cqrs_core::{CommandEnvelope, Decider, DispatchError, Dispatcher, EventStore};

use crate::domain::{
    students_of, Course, CourseCommand, Refused, Subscribe, SubscriptionCommand, SubscriptionFact,
    MAX_COURSES_PER_STUDENT,
};

fn subscribe(course: &str, student: u32) -> SubscriptionCommand {
    SubscriptionCommand::Subscribe { course: course.into(), student }
}

fn defined(course: &str, capacity: u32) -> SubscriptionFact {
    SubscriptionFact::CourseDefined { course: course.into(), capacity }
}

fn subscribed(course: &str, student: u32) -> SubscriptionFact {
    SubscriptionFact::StudentSubscribed { course: course.into(), student }
}

#[test]
fn the_rules() {
    DecisionTest::<Subscribe>::given(vec![defined("c", 1)])
        .when(subscribe("c", 1))
        .then_events(vec![subscribed("c", 1)]);
    DecisionTest::<Subscribe>::given(vec![defined("c", 1), subscribed("c", 2)])
        .when(subscribe("c", 1))
        .then_error(Refused::CourseFull);
    DecisionTest::<Subscribe>::given(vec![defined("c", 9), subscribed("a", 1), subscribed("b", 1), subscribed("d", 1)])
        .when(subscribe("c", 1))
        .then_error(Refused::TooManyCourses);
    DecisionTest::<Subscribe>::given(vec![]).when(subscribe("c", 1)).then_error(Refused::NoSuchCourse);
    DecisionTest::<Subscribe>::given(vec![defined("c", 9), subscribed("c", 1)])
        .when(subscribe("c", 1))
        .then_error(Refused::AlreadySubscribed);
    // A raised capacity, written by the course aggregate, frees a seat.
    DecisionTest::<Subscribe>::given(vec![
        defined("c", 1),
        subscribed("c", 2),
        SubscriptionFact::CourseCapacityChanged { course: "c".into(), capacity: 2 },
    ])
    .when(subscribe("c", 1))
    .then_events(vec![subscribed("c", 1)]);
}

/// Many students race for few seats: no course over capacity, no student over the limit, and
/// the aggregate's capacity change is seen by the decisions.
async fn race<S: EventStore>(store: Arc<S>) {
    let courses = Dispatcher::<Course, S>::new(Arc::clone(&store));
    for course in ["a", "b", "c"] {
        courses.dispatch(CourseCommand::Define { course: course.into(), capacity: 3 }).await.expect("define");
    }
    courses.dispatch(CourseCommand::ChangeCapacity { course: "c".into(), capacity: 5 }).await.expect("change");
    let decider = Decider::<Subscribe, S>::new(Arc::clone(&store));
    let mut tasks = Vec::new();
    for student in 0..8u32 {
        for course in ["a", "b", "c", "a"] {
            let decider = decider.clone();
            tasks.push(tokio::spawn(
                async move { decider.decide(CommandEnvelope::new(subscribe(course, student))).await },
            ));
        }
    }
    for task in tasks {
        match task.await.expect("task") {
            Ok(_) | Err(DispatchError::Rejected(_)) => {}
            Err(other) => panic!("unexpected error: {other}"),
        }
    }
    let (a, b, c) = (
        students_of(&*store, "a").await.expect("a"),
        students_of(&*store, "b").await.expect("b"),
        students_of(&*store, "c").await.expect("c"),
    );
    assert_eq!((a.len(), b.len(), c.len()), (3, 3, 5), "every seat is taken, none twice: {a:?} {b:?} {c:?}");
    for student in 0..8u32 {
        let courses = [&a, &b, &c].iter().filter(|students| students.contains(&student)).count();
        assert!(courses <= MAX_COURSES_PER_STUDENT);
    }
    // Leaving frees the seat for someone else.
    let leaver = a[0];
    let leave = SubscriptionCommand::Unsubscribe { course: "a".into(), student: leaver };
    decider.decide(CommandEnvelope::new(leave)).await.expect("leave");
    let newcomer = (0..8).find(|s| !a.contains(s) && [&b, &c].iter().filter(|x| x.contains(s)).count() < 3);
    let newcomer = newcomer.expect("someone can still join a");
    decider.decide(CommandEnvelope::new(subscribe("a", newcomer))).await.expect("the freed seat");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_race_on_memory() {
    race(Arc::new(cqrs_memory::MemoryStore::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_race_on_sqlite() {
    let dir = tempfile::tempdir().expect("temp dir");
    race(Arc::new(cqrs_sqlite::SqliteEventStore::open(dir.path().join("c.db")).await.expect("open"))).await;
}
