//! One payment per order.

use super::*;

/// What a payment's events carry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Payment {
    /// The order.
    pub(crate) order_id: String,
    /// How much.
    pub(crate) amount_cents: u64,
}

/// The card was declined.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Declined {
    /// The order.
    pub(crate) order_id: String,
    /// Why.
    pub(crate) reason: String,
}

/// A payment's events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(category = "payment")]
pub(crate) enum PaymentEvent {
    /// Paid.
    #[event(name = "PaymentTaken")]
    Taken(Payment),
    /// Refused by the bank.
    #[event(name = "PaymentDeclined")]
    Declined(Declined),
    /// Waiting for a bank transfer (which never comes in this demo).
    #[event(name = "AwaitingTransfer")]
    Awaiting(Payment),
    /// Paid back.
    #[event(name = "PaymentRefunded")]
    Refunded(Payment),
}

/// A payment's commands, routed to `payment-{order_id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Command)]
#[command(aggregate = PaymentState, id = order_id)]
pub(crate) enum PaymentCommand {
    /// Take the money.
    Take { order_id: String, amount_cents: u64, card: String },
    /// Give it back.
    Refund { order_id: String },
}

/// Never refuses: a declined card is an event.
#[derive(Debug, thiserror::Error)]
#[error("never")]
pub(crate) struct Never;

/// Where a payment is.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PaymentState {
    /// Not asked for.
    #[default]
    None,
    /// Paid (this much).
    Taken(u64),
    /// Declined.
    Declined,
    /// Waiting.
    Awaiting,
    /// Paid back.
    Refunded,
}

impl Aggregate for PaymentState {
    const CATEGORY: &'static str = "payment";
    type Command = PaymentCommand;
    type Event = PaymentEvent;
    type Error = Never;

    fn execute(&self, command: &PaymentCommand) -> Result<Vec<PaymentEvent>, Never> {
        Ok(match (command, *self) {
            // Every Take charges, as a payment provider would: a Take sent twice (with two
            // ids) charges twice. Command ids are what prevent it.
            (PaymentCommand::Take { order_id, amount_cents, card }, _) => match card.as_str() {
                "declined" => {
                    vec![PaymentEvent::Declined(Declined {
                        order_id: order_id.clone(),
                        reason: "card declined".into(),
                    })]
                }
                "transfer" => {
                    vec![PaymentEvent::Awaiting(Payment { order_id: order_id.clone(), amount_cents: *amount_cents })]
                }
                _ => vec![PaymentEvent::Taken(Payment { order_id: order_id.clone(), amount_cents: *amount_cents })],
            },
            (PaymentCommand::Refund { order_id }, PaymentState::Taken(amount_cents)) => {
                vec![PaymentEvent::Refunded(Payment { order_id: order_id.clone(), amount_cents })]
            }
            _ => vec![],
        })
    }

    fn apply(self, event: &PaymentEvent) -> Self {
        match event {
            PaymentEvent::Taken(payment) => match self {
                PaymentState::Taken(before) => PaymentState::Taken(before + payment.amount_cents),
                _ => PaymentState::Taken(payment.amount_cents),
            },
            PaymentEvent::Declined(_) => PaymentState::Declined,
            PaymentEvent::Awaiting(_) => PaymentState::Awaiting,
            PaymentEvent::Refunded(_) => PaymentState::Refunded,
        }
    }
}
