//! The course aggregate, the subscription decision and their events.

use cqrs_core::{
    Aggregate, Command, Decision, DomainEvent, EventStore, Position, Query, QueryItem, StoreError, StreamId,
    StreamIdError, Tag,
};
use serde::{Deserialize, Serialize};

/// The most courses one student may take.
pub const MAX_COURSES_PER_STUDENT: usize = 3;

/// A course, a stream aggregate (`course-{id}`).
#[derive(Debug, Default, Clone)]
pub struct Course {
    defined: bool,
}

/// Commands of a course.
#[derive(Debug, Command)]
#[command(aggregate = Course, id = course)]
pub enum CourseCommand {
    /// Opens a course with a capacity.
    Define { course: String, capacity: u32 },
    /// Changes the capacity of a defined course.
    ChangeCapacity { course: String, capacity: u32 },
}

/// What happens to a course. Tagged `course:{id}`, so the subscription decision reads them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(category = "course")]
pub enum CourseEvent {
    /// The course exists.
    CourseDefined {
        #[event(tag = "course")]
        course: String,
        capacity: u32,
    },
    /// Its capacity changed.
    CourseCapacityChanged {
        #[event(tag = "course")]
        course: String,
        capacity: u32,
    },
}

/// Why a course command was refused.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum CourseError {
    /// Defined twice.
    #[error("the course exists")]
    AlreadyDefined,
    /// Not defined yet.
    #[error("no such course")]
    NotDefined,
}

impl Aggregate for Course {
    const CATEGORY: &'static str = "course";
    type Command = CourseCommand;
    type Event = CourseEvent;
    type Error = CourseError;

    fn execute(&self, command: &CourseCommand) -> Result<Vec<CourseEvent>, CourseError> {
        match command {
            CourseCommand::Define { .. } if self.defined => Err(CourseError::AlreadyDefined),
            CourseCommand::Define { course, capacity } => {
                Ok(vec![CourseEvent::CourseDefined { course: course.clone(), capacity: *capacity }])
            }
            CourseCommand::ChangeCapacity { .. } if !self.defined => Err(CourseError::NotDefined),
            CourseCommand::ChangeCapacity { course, capacity } => {
                Ok(vec![CourseEvent::CourseCapacityChanged { course: course.clone(), capacity: *capacity }])
            }
        }
    }

    fn apply(self, _event: &CourseEvent) -> Self {
        Course { defined: true }
    }
}

/// Every fact a subscription decision reads: the course's events (stored by the aggregate,
/// decoded here by their stored names) and the subscriptions (stored by the decision).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(category = "*")]
pub enum SubscriptionFact {
    /// A course's definition (written by [`Course`]).
    CourseDefined { course: String, capacity: u32 },
    /// A course's new capacity (written by [`Course`]).
    CourseCapacityChanged { course: String, capacity: u32 },
    /// A student joined a course.
    StudentSubscribed {
        #[event(tag = "course")]
        course: String,
        #[event(tag = "student")]
        student: u32,
    },
    /// A student left a course.
    StudentUnsubscribed {
        #[event(tag = "course")]
        course: String,
        #[event(tag = "student")]
        student: u32,
    },
}

/// Commands of the subscription decision.
#[derive(Debug, Clone)]
pub enum SubscriptionCommand {
    /// Joins a course, if it has a seat and the student has fewer than 3 courses.
    Subscribe { course: String, student: u32 },
    /// Leaves a course.
    Unsubscribe { course: String, student: u32 },
}

impl SubscriptionCommand {
    fn parts(&self) -> (&str, u32) {
        match self {
            SubscriptionCommand::Subscribe { course, student }
            | SubscriptionCommand::Unsubscribe { course, student } => (course, *student),
        }
    }
}

/// Why a subscription was refused.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum Refused {
    /// The course was never defined.
    #[error("no such course")]
    NoSuchCourse,
    /// Every seat is taken.
    #[error("the course is full")]
    CourseFull,
    /// The student has their 3 courses.
    #[error("the student already takes {MAX_COURSES_PER_STUDENT} courses")]
    TooManyCourses,
    /// Subscribed already.
    #[error("already subscribed")]
    AlreadySubscribed,
    /// Not subscribed.
    #[error("not subscribed")]
    NotSubscribed,
}

/// The decision's state: the course's capacity and every subscription its query matched.
#[derive(Debug, Default, Clone)]
pub struct Subscribe {
    capacity: Option<u32>,
    subscriptions: Vec<(String, u32)>,
}

impl Decision for Subscribe {
    const NAME: &'static str = "subscribe";
    type Command = SubscriptionCommand;
    type Event = SubscriptionFact;
    type Error = Refused;

    fn query(command: &SubscriptionCommand) -> Query {
        let (course, student) = command.parts();
        Query::from_items([
            QueryItem::types(["CourseDefined", "CourseCapacityChanged", "StudentSubscribed", "StudentUnsubscribed"])
                .with_tags([Tag::new("course", course)]),
            QueryItem::types(["StudentSubscribed", "StudentUnsubscribed"]).with_tags([Tag::new("student", student)]),
        ])
    }

    fn stream_id(command: &SubscriptionCommand) -> Result<StreamId, StreamIdError> {
        let (course, student) = command.parts();
        StreamId::new(format!("subscription-{course}.{student}"))
    }

    fn decide(&self, command: &SubscriptionCommand) -> Result<Vec<SubscriptionFact>, Refused> {
        let (course, student) = command.parts();
        let capacity = self.capacity.ok_or(Refused::NoSuchCourse)?;
        let subscribed = self.subscriptions.iter().any(|(c, s)| c == course && *s == student);
        let fact = match command {
            SubscriptionCommand::Subscribe { .. } => {
                if subscribed {
                    return Err(Refused::AlreadySubscribed);
                }
                if self.subscriptions.iter().filter(|(c, _)| c == course).count() >= capacity as usize {
                    return Err(Refused::CourseFull);
                }
                if self.subscriptions.iter().filter(|(_, s)| *s == student).count() >= MAX_COURSES_PER_STUDENT {
                    return Err(Refused::TooManyCourses);
                }
                SubscriptionFact::StudentSubscribed { course: course.to_owned(), student }
            }
            SubscriptionCommand::Unsubscribe { .. } if !subscribed => return Err(Refused::NotSubscribed),
            SubscriptionCommand::Unsubscribe { .. } => {
                SubscriptionFact::StudentUnsubscribed { course: course.to_owned(), student }
            }
        };
        Ok(vec![fact])
    }

    fn apply(mut self, event: &SubscriptionFact) -> Self {
        match event {
            SubscriptionFact::CourseDefined { capacity, .. }
            | SubscriptionFact::CourseCapacityChanged { capacity, .. } => {
                self.capacity = Some(*capacity);
            }
            SubscriptionFact::StudentSubscribed { course, student } => {
                self.subscriptions.push((course.clone(), *student))
            }
            SubscriptionFact::StudentUnsubscribed { course, student } => {
                self.subscriptions.retain(|(c, s)| !(c == course && s == student));
            }
        }
        self
    }
}

/// The students of a course now, read by query (a read model would keep this in a table).
pub async fn students_of<S: EventStore + ?Sized>(store: &S, course: &str) -> Result<Vec<u32>, StoreError> {
    let query = Query::from_items([
        QueryItem::types(["StudentSubscribed", "StudentUnsubscribed"]).with_tags([Tag::new("course", course)])
    ]);
    let mut students = Vec::new();
    let mut after = Position::START;
    loop {
        let page = store.read_query(&query, after, 500).await?;
        let Some(last) = page.last() else { break };
        after = last.position;
        for event in &page {
            let Some(student) = event.payload["student"].as_u64().and_then(|s| u32::try_from(s).ok()) else {
                continue;
            };
            if &*event.event_type == "StudentSubscribed" {
                students.push(student);
            } else {
                students.retain(|s| *s != student);
            }
        }
    }
    students.sort_unstable();
    Ok(students)
}
