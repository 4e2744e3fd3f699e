//! A given/when/then harness for [`Decision`]s.

use std::fmt;

use crate::decision::Decision;

/// Starts a decision test: `DecisionTest::<D>::given(events).when(command)`. The given events
/// are the ones the command's query matches, in log order.
///
/// ```
/// use cqrs_core::testing::DecisionTest;
/// # use cqrs_core::{Decision, DomainEvent, Query, QueryItem, StreamId, StreamIdError, Tag};
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
/// # #[event(category = "*")]
/// # enum Invoice { InvoiceCreated { number: u64 } }
/// # #[derive(Debug, Default, Clone)]
/// # struct NextInvoice { last: u64 }
/// # #[derive(Debug, PartialEq, thiserror::Error)]
/// # #[error("never")]
/// # struct Never;
/// # impl Decision for NextInvoice {
/// #     const NAME: &'static str = "invoice";
/// #     type Command = ();
/// #     type Event = Invoice;
/// #     type Error = Never;
/// #     fn query(_: &()) -> Query { Query::from_items([QueryItem::types(["InvoiceCreated"])]) }
/// #     fn stream_id(_: &()) -> Result<StreamId, StreamIdError> { StreamId::new("invoices-all") }
/// #     fn decide(&self, _: &()) -> Result<Vec<Invoice>, Never> {
/// #         Ok(vec![Invoice::InvoiceCreated { number: self.last + 1 }])
/// #     }
/// #     fn apply(self, Invoice::InvoiceCreated { number }: &Invoice) -> Self { NextInvoice { last: *number } }
/// # }
/// DecisionTest::<NextInvoice>::given(vec![Invoice::InvoiceCreated { number: 41 }])
///     .when(())
///     .then_events(vec![Invoice::InvoiceCreated { number: 42 }]);
/// ```
pub struct DecisionTest<D: Decision> {
    state: D,
}

impl<D: Decision> DecisionTest<D> {
    /// The decision's state after these events.
    pub fn given(events: Vec<D::Event>) -> Self {
        Self { state: events.iter().fold(D::default(), D::apply) }
    }

    /// The state with no matching event.
    pub fn given_no_events() -> Self {
        Self::given(Vec::new())
    }

    /// Decides the command on the state.
    pub fn when(self, command: D::Command) -> DecisionThen<D> {
        let result = self.state.decide(&command);
        DecisionThen { result }
    }
}

/// The outcome of [`DecisionTest::when`], to assert on.
pub struct DecisionThen<D: Decision> {
    result: Result<Vec<D::Event>, D::Error>,
}

impl<D: Decision> DecisionThen<D> {
    /// Asserts the decision produced exactly these events, in order.
    #[track_caller]
    pub fn then_events(self, expected: Vec<D::Event>)
    where
        D::Event: PartialEq,
    {
        match self.result {
            Ok(events) => assert_eq!(events, expected, "the decision produced other events than expected"),
            Err(error) => panic!("expected events {expected:?}, but the command was refused: {error}"),
        }
    }

    /// Asserts the command was refused with exactly this error.
    #[track_caller]
    pub fn then_error(self, expected: D::Error)
    where
        D::Error: PartialEq + fmt::Debug,
    {
        match self.result {
            Ok(events) => panic!("expected error {expected:?}, but the decision produced {events:?}"),
            Err(error) => assert_eq!(error, expected, "the command was refused with another error"),
        }
    }
}
