//! The workflow of one order.

use std::collections::BTreeSet;

use super::inventory::{InventoryCommand, Reservation};
use super::order::{Line, OrderCommand};
use super::payment::PaymentCommand;
use super::*;

/// How long an order may stay unpaid.
pub(crate) const PAYMENT_DEADLINE: Duration = Duration::from_secs(15 * 60);

/// The events it listens to, from three aggregates (a category per variant).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
pub(crate) enum FulfilmentEvent {
    /// An order was placed: start.
    #[event(category = "order", name = "OrderPlaced")]
    OrderPlaced(order::Placed),
    /// Confirmed: done.
    #[event(category = "order", name = "OrderConfirmed")]
    OrderConfirmed(order::Confirmed),
    /// Cancelled (by us, or by the deadline): undo, done.
    #[event(category = "order", name = "OrderCancelled")]
    OrderCancelled(order::Cancelled),
    /// A line was reserved.
    #[event(category = "inventory", name = "StockReserved")]
    StockReserved(Reservation),
    /// A line could not be reserved.
    #[event(category = "inventory", name = "ReservationRefused")]
    ReservationRefused(Reservation),
    /// Paid.
    #[event(category = "payment", name = "PaymentTaken")]
    PaymentTaken(payment::Payment),
    /// The card was declined.
    #[event(category = "payment", name = "PaymentDeclined")]
    PaymentDeclined(payment::Declined),
}

/// The commands it sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) enum FulfilmentCommand {
    /// To an order.
    Order(OrderCommand),
    /// To a SKU.
    Inventory(InventoryCommand),
    /// To a payment.
    Payment(PaymentCommand),
}

/// One order's workflow state.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Progress {
    /// The order.
    pub(crate) order_id: String,
    /// Its lines.
    pub(crate) lines: Vec<Line>,
    /// Its price.
    pub(crate) total_cents: u64,
    /// Its card.
    pub(crate) card: String,
    /// SKUs reserved so far.
    pub(crate) reserved: BTreeSet<String>,
    /// A line was refused or the payment declined: the order is being cancelled.
    pub(crate) failing: bool,
    /// Paid.
    pub(crate) paid: bool,
}

/// The process manager.
pub(crate) struct Fulfilment;

fn release(order_id: &str, sku: &str) -> FulfilmentCommand {
    FulfilmentCommand::Inventory(InventoryCommand::Release { sku: sku.to_owned(), order_id: order_id.to_owned() })
}

fn cancel(order_id: &str, reason: String) -> FulfilmentCommand {
    FulfilmentCommand::Order(OrderCommand::Cancel { order_id: order_id.to_owned(), reason })
}

impl ProcessManager for Fulfilment {
    type Event = FulfilmentEvent;
    type State = Progress;
    type Command = FulfilmentCommand;

    fn name(&self) -> &str {
        "fulfilment"
    }

    fn route(&self, event: &Envelope<FulfilmentEvent>) -> Route {
        use FulfilmentEvent as E;
        match &event.event {
            E::OrderPlaced(placed) => Route::Start(placed.order_id.clone()),
            E::OrderConfirmed(done) => Route::Stop(done.order_id.clone()),
            E::OrderCancelled(cancelled) => Route::Stop(cancelled.order_id.clone()),
            E::StockReserved(line) | E::ReservationRefused(line) => Route::Continue(line.order_id.clone()),
            E::PaymentTaken(payment) => Route::Continue(payment.order_id.clone()),
            E::PaymentDeclined(declined) => Route::Continue(declined.order_id.clone()),
        }
    }

    fn handle(&self, state: &Progress, event: &Envelope<FulfilmentEvent>, effects: &mut Effects<FulfilmentCommand>) {
        use FulfilmentEvent as E;
        match &event.event {
            E::OrderPlaced(placed) => {
                for line in &placed.lines {
                    let reserve = InventoryCommand::Reserve {
                        sku: line.sku.clone(),
                        order_id: placed.order_id.clone(),
                        quantity: line.quantity,
                    };
                    effects.dispatch(format!("reserve:{}", line.sku), FulfilmentCommand::Inventory(reserve));
                }
                // From the event's time, not the clock's: a replay schedules the same.
                let due = event.recorded_at.plus(PAYMENT_DEADLINE);
                let deadline = OrderCommand::CancelIfUnpaid { order_id: placed.order_id.clone() };
                effects.schedule("payment-deadline", due, FulfilmentCommand::Order(deadline));
            }
            E::StockReserved(line) if state.failing => {
                // Reserved after the order started failing: give it back at once.
                effects.dispatch(format!("release:{}", line.sku), release(&state.order_id, &line.sku));
            }
            E::StockReserved(line) => {
                let reserved = state.reserved.len() + usize::from(!state.reserved.contains(&line.sku));
                if reserved == state.lines.len() {
                    let take = PaymentCommand::Take {
                        order_id: state.order_id.clone(),
                        amount_cents: state.total_cents,
                        card: state.card.clone(),
                    };
                    effects.dispatch("pay", FulfilmentCommand::Payment(take));
                }
            }
            E::ReservationRefused(line) if !state.failing => {
                effects.dispatch("cancel", cancel(&state.order_id, format!("out of stock: {}", line.sku)));
            }
            E::ReservationRefused(_) => {}
            E::PaymentTaken(_) => {
                let confirm = OrderCommand::Confirm { order_id: state.order_id.clone() };
                effects.dispatch("confirm", FulfilmentCommand::Order(confirm));
                effects.cancel("payment-deadline");
            }
            E::PaymentDeclined(declined) => {
                effects.dispatch("cancel", cancel(&state.order_id, format!("payment: {}", declined.reason)));
            }
            E::OrderCancelled(_) => {
                for sku in &state.reserved {
                    effects.dispatch(format!("release:{sku}"), release(&state.order_id, sku));
                }
                if state.paid {
                    let refund = PaymentCommand::Refund { order_id: state.order_id.clone() };
                    effects.dispatch("refund", FulfilmentCommand::Payment(refund));
                }
            }
            E::OrderConfirmed(_) => {}
        }
    }

    fn apply(&self, mut state: Progress, event: &Envelope<FulfilmentEvent>) -> Progress {
        use FulfilmentEvent as E;
        match &event.event {
            E::OrderPlaced(placed) => {
                state.order_id = placed.order_id.clone();
                state.lines = placed.lines.clone();
                state.total_cents = placed.total_cents;
                state.card = placed.card.clone();
            }
            E::StockReserved(line) if !state.failing => {
                state.reserved.insert(line.sku.clone());
            }
            E::ReservationRefused(_) | E::PaymentDeclined(_) => state.failing = true,
            E::PaymentTaken(_) => state.paid = true,
            E::StockReserved(_) | E::OrderConfirmed(_) | E::OrderCancelled(_) => {}
        }
        state
    }

    /// Our own cancel can be refused when the order was confirmed meanwhile (the payment
    /// went through first): then nothing is undone.
    fn rejected(
        &self,
        _state: &Progress,
        step: &str,
        _command: &FulfilmentCommand,
        error: &Rejection,
        _effects: &mut Effects<FulfilmentCommand>,
    ) {
        println!("    (fulfilment: {step} refused: {error})");
    }
}
