//! Orders: placed, then confirmed or cancelled.

use super::*;

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Line {
    /// The product.
    pub(crate) sku: String,
    /// How many.
    pub(crate) quantity: u32,
}

/// What an order's events carry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Placed {
    /// The order.
    pub(crate) order_id: String,
    /// What was ordered.
    pub(crate) lines: Vec<Line>,
    /// The price.
    pub(crate) total_cents: u64,
    /// How it is paid ("ok", "declined" or "transfer" in this demo).
    pub(crate) card: String,
}

/// The order is confirmed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Confirmed {
    /// The order.
    pub(crate) order_id: String,
}

/// The order is cancelled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Cancelled {
    /// The order.
    pub(crate) order_id: String,
    /// Why.
    pub(crate) reason: String,
}

/// An order's events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(category = "order")]
pub(crate) enum OrderEvent {
    /// Placed.
    #[event(name = "OrderPlaced")]
    Placed(Placed),
    /// Confirmed.
    #[event(name = "OrderConfirmed")]
    Confirmed(Confirmed),
    /// Cancelled.
    #[event(name = "OrderCancelled")]
    Cancelled(Cancelled),
}

/// An order's commands, routed to `order-{order_id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Command)]
#[command(aggregate = Order, id = order_id)]
pub(crate) enum OrderCommand {
    /// Place it.
    Place { order_id: String, lines: Vec<Line>, total_cents: u64, card: String },
    /// Confirm it (paid and reserved).
    Confirm { order_id: String },
    /// Cancel it.
    Cancel { order_id: String, reason: String },
    /// The payment deadline: cancel it unless it is confirmed by now.
    CancelIfUnpaid { order_id: String },
}

/// Why an order refused a command.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OrderError {
    /// Placed twice.
    #[error("order already placed")]
    AlreadyPlaced,
    /// Not placed.
    #[error("no such order")]
    NotPlaced,
    /// Confirm after cancel.
    #[error("the order was cancelled")]
    Cancelled,
    /// Cancel after confirm.
    #[error("the order was confirmed")]
    Confirmed,
}

/// Where an order is.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Order {
    /// Not placed.
    #[default]
    New,
    /// Placed, waiting.
    Placed,
    /// Done.
    Confirmed,
    /// Undone.
    Cancelled,
}

impl Aggregate for Order {
    const CATEGORY: &'static str = "order";
    type Command = OrderCommand;
    type Event = OrderEvent;
    type Error = OrderError;

    fn execute(&self, command: &OrderCommand) -> Result<Vec<OrderEvent>, OrderError> {
        use OrderCommand as C;
        Ok(match (command, *self) {
            (C::Place { .. }, Order::New) => {
                let C::Place { order_id, lines, total_cents, card } = command.clone() else { unreachable!() };
                vec![OrderEvent::Placed(Placed { order_id, lines, total_cents, card })]
            }
            (C::Place { .. }, _) => return Err(OrderError::AlreadyPlaced),
            (_, Order::New) => return Err(OrderError::NotPlaced),
            (C::Confirm { order_id }, Order::Placed) => {
                vec![OrderEvent::Confirmed(Confirmed { order_id: order_id.clone() })]
            }
            (C::Confirm { .. }, Order::Confirmed) => vec![],
            (C::Confirm { .. }, Order::Cancelled) => return Err(OrderError::Cancelled),
            (C::Cancel { order_id, reason }, Order::Placed) => {
                vec![OrderEvent::Cancelled(Cancelled { order_id: order_id.clone(), reason: reason.clone() })]
            }
            (C::CancelIfUnpaid { order_id }, Order::Placed) => vec![OrderEvent::Cancelled(Cancelled {
                order_id: order_id.clone(),
                reason: "payment deadline passed".into(),
            })],
            (C::Cancel { .. }, Order::Confirmed) => return Err(OrderError::Confirmed),
            (C::Cancel { .. } | C::CancelIfUnpaid { .. }, _) => vec![],
        })
    }

    fn apply(self, event: &OrderEvent) -> Self {
        match event {
            OrderEvent::Placed(_) => Order::Placed,
            OrderEvent::Confirmed(_) => Order::Confirmed,
            OrderEvent::Cancelled(_) => Order::Cancelled,
        }
    }
}
