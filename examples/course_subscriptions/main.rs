//! Course subscriptions, the Dynamic Consistency Boundary example of dcb.events, beside a
//! stream aggregate on the same store.
//!
//! - A `Course` is a stream aggregate (`course-{id}`): it is defined and its capacity changes.
//! - Subscribing a student is a [`Decision`]: it spans the course (its capacity, its students)
//!   and the student (at most 3 courses), so no single stream can hold the rule. It reads the
//!   events tagged `course:{id}` or `student:{id}`, decides, and appends only if none of them
//!   changed meanwhile. No saga, no reservation aggregate.
//!
//! Run with: `cargo run -p examples --example course_subscriptions` (a SQLite file in a temp
//! directory; `-- --memory` for the in-memory store). It defines two courses, races 40
//! subscriptions from 10 students, and prints who got in.

mod domain;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use anyhow::Context;
use cqrs_core::{CommandEnvelope, Decider, DispatchError, Dispatcher, EventStore};

use crate::domain::{Course, CourseCommand, Refused, Subscribe, SubscriptionCommand};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let memory = std::env::args().any(|arg| arg == "--memory");
    if memory {
        run(Arc::new(cqrs_memory::MemoryStore::new())).await
    } else {
        let dir = tempfile::tempdir().context("temp dir")?;
        let path = dir.path().join("courses.db");
        println!("store: SQLite file {}", path.display());
        run(Arc::new(cqrs_sqlite::SqliteEventStore::open(&path).await.context("open the SQLite store")?)).await
    }
}

/// The story: courses through their aggregate, subscriptions through the decision.
async fn run<S: EventStore>(store: Arc<S>) -> anyhow::Result<()> {
    let courses = Dispatcher::<Course, S>::new(Arc::clone(&store));
    courses.dispatch(CourseCommand::Define { course: "rust101".into(), capacity: 5 }).await?;
    courses.dispatch(CourseCommand::Define { course: "dcb201".into(), capacity: 3 }).await?;
    courses.dispatch(CourseCommand::ChangeCapacity { course: "dcb201".into(), capacity: 4 }).await?;

    let decider = Decider::<Subscribe, S>::new(Arc::clone(&store));
    let mut tasks = Vec::new();
    for student in 1..=10u32 {
        for course in ["rust101", "dcb201", "rust101", "nosuch"] {
            let decider = decider.clone();
            let command = SubscriptionCommand::Subscribe { course: course.into(), student };
            tasks.push(tokio::spawn(
                async move { (student, course, decider.decide(CommandEnvelope::new(command)).await) },
            ));
        }
    }
    let (mut admitted, mut refused) = (0, 0);
    for task in tasks {
        let (student, course, result) = task.await?;
        match result {
            Ok(outcome) if outcome.appended.is_some() => admitted += 1,
            Ok(_) => {}
            Err(DispatchError::Rejected(reason)) => {
                refused += 1;
                if matches!(reason, Refused::NoSuchCourse) {
                    continue;
                }
                println!("student {student:>2} not in {course}: {reason}");
            }
            Err(error) => return Err(error.into()),
        }
    }
    // A student leaves a full course; the freed seat goes to the next one who asks.
    let before = domain::students_of(&*store, "rust101").await?;
    if let (Some(&leaver), Some(newcomer)) = (before.first(), (1..=10u32).find(|s| !before.contains(s))) {
        let leave = SubscriptionCommand::Unsubscribe { course: "rust101".into(), student: leaver };
        decider.decide(CommandEnvelope::new(leave)).await?;
        let join = SubscriptionCommand::Subscribe { course: "rust101".into(), student: newcomer };
        match decider.decide(CommandEnvelope::new(join)).await {
            Ok(_) => println!("student {leaver:>2} left rust101; student {newcomer} took the seat"),
            Err(DispatchError::Rejected(reason)) => println!("student {newcomer} not in rust101: {reason}"),
            Err(error) => return Err(error.into()),
        }
    }
    let rust101 = domain::students_of(&*store, "rust101").await?;
    let dcb201 = domain::students_of(&*store, "dcb201").await?;
    println!("rust101 (capacity 5): {rust101:?}");
    println!("dcb201 (capacity 4): {dcb201:?}");
    println!("{admitted} subscriptions stored, {refused} refused; every rule held under the race");
    anyhow::ensure!(rust101.len() <= 5 && dcb201.len() <= 4, "a course went over its capacity");
    Ok(())
}
