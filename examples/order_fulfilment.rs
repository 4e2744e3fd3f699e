//! Order fulfilment across three aggregates, driven by a process manager: an `Order` is
//! placed; `Inventory` (one instance per SKU) reserves each line; `Payment` takes the money;
//! the order is confirmed. When a reservation is refused, the card is declined, or the payment
//! deadline (15 minutes) passes, the order is cancelled and what was done is undone (stock
//! released, payment refunded). A transactional projection keeps the orders by status in a
//! table of the store's database.
//!
//! Run with: `cargo run -p examples --example order_fulfilment [-- STORE_URL]`, where
//! `STORE_URL` is `sqlite://PATH` or `postgres://…` (default: a SQLite file in a temporary
//! directory). The payment deadline is shown with a test clock moved 16 minutes forward.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context;
#[cfg(test)]
use cqrs_core::TestClock;
use cqrs_core::{
    spawn_process_manager, Aggregate, Clock, Command, CommandEnvelope, CommandRouter, Dispatcher, DomainEvent, Effects,
    Envelope, EventStore, HandlerError, ProcessManager, Progress, Rejection, Route, RouteError, RunnerConfig,
    RunningHandler, RunningProcess, Store, StreamId,
};
use serde::{Deserialize, Serialize};

// ----------------------------------------------------------------------------------------------
// The aggregates.

/// Orders: placed, then confirmed or cancelled.
pub(crate) mod order {
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
}

/// Stock per SKU, and its reservations per order.
pub(crate) mod inventory {
    use std::collections::BTreeMap;

    use super::*;

    /// Stock arrived.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub(crate) struct Restocked {
        /// The product.
        pub(crate) sku: String,
        /// How many more.
        pub(crate) quantity: u32,
    }

    /// Stock reserved for an order (or refused, or released).
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub(crate) struct Reservation {
        /// The product.
        pub(crate) sku: String,
        /// The order.
        pub(crate) order_id: String,
        /// How many.
        pub(crate) quantity: u32,
    }

    /// A SKU's events. A refused reservation is an event too: the process manager reacts to
    /// it like to any other answer.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
    #[event(category = "inventory")]
    pub(crate) enum InventoryEvent {
        /// More stock.
        Restocked(Restocked),
        /// Reserved.
        #[event(name = "StockReserved")]
        Reserved(Reservation),
        /// Not enough stock.
        #[event(name = "ReservationRefused")]
        Refused(Reservation),
        /// Given back.
        #[event(name = "StockReleased")]
        Released(Reservation),
    }

    /// A SKU's commands, routed to `inventory-{sku}`.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Command)]
    #[command(aggregate = Inventory, id = sku)]
    pub(crate) enum InventoryCommand {
        /// Add stock.
        Restock { sku: String, quantity: u32 },
        /// Reserve for an order.
        Reserve { sku: String, order_id: String, quantity: u32 },
        /// Give an order's reservation back (if it has one).
        Release { sku: String, order_id: String },
    }

    /// Never refuses: an impossible reservation is a `Refused` event.
    #[derive(Debug, thiserror::Error)]
    #[error("never")]
    pub(crate) struct Never;

    /// A SKU: what is free, and what is reserved by which order.
    #[derive(Debug, Default, Clone, PartialEq, Eq)]
    pub(crate) struct Inventory {
        /// Free stock.
        pub(crate) available: u32,
        /// Reserved, by order.
        pub(crate) reserved: BTreeMap<String, u32>,
    }

    impl Aggregate for Inventory {
        const CATEGORY: &'static str = "inventory";
        type Command = InventoryCommand;
        type Event = InventoryEvent;
        type Error = Never;

        fn execute(&self, command: &InventoryCommand) -> Result<Vec<InventoryEvent>, Never> {
            Ok(match command {
                InventoryCommand::Restock { sku, quantity } => {
                    vec![InventoryEvent::Restocked(Restocked { sku: sku.clone(), quantity: *quantity })]
                }
                // Not idempotent on purpose: a reservation sent twice (with two ids) reserves
                // twice, as a careless integration would. Command ids are what prevent it.
                InventoryCommand::Reserve { sku, order_id, quantity } => {
                    let reservation = Reservation { sku: sku.clone(), order_id: order_id.clone(), quantity: *quantity };
                    if *quantity > self.available {
                        vec![InventoryEvent::Refused(reservation)]
                    } else {
                        vec![InventoryEvent::Reserved(reservation)]
                    }
                }
                InventoryCommand::Release { sku, order_id } => match self.reserved.get(order_id) {
                    Some(quantity) => vec![InventoryEvent::Released(Reservation {
                        sku: sku.clone(),
                        order_id: order_id.clone(),
                        quantity: *quantity,
                    })],
                    None => vec![],
                },
            })
        }

        fn apply(mut self, event: &InventoryEvent) -> Self {
            match event {
                InventoryEvent::Restocked(restocked) => self.available += restocked.quantity,
                InventoryEvent::Reserved(reservation) => {
                    self.available -= reservation.quantity;
                    *self.reserved.entry(reservation.order_id.clone()).or_default() += reservation.quantity;
                }
                InventoryEvent::Refused(_) => {}
                InventoryEvent::Released(reservation) => {
                    self.available += reservation.quantity;
                    self.reserved.remove(&reservation.order_id);
                }
            }
            self
        }
    }
}

/// One payment per order.
pub(crate) mod payment {
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
                        vec![PaymentEvent::Awaiting(Payment {
                            order_id: order_id.clone(),
                            amount_cents: *amount_cents,
                        })]
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
}

// ----------------------------------------------------------------------------------------------
// The process manager.

/// The workflow of one order.
pub(crate) mod fulfilment {
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

        fn handle(
            &self,
            state: &Progress,
            event: &Envelope<FulfilmentEvent>,
            effects: &mut Effects<FulfilmentCommand>,
        ) {
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
}

// ----------------------------------------------------------------------------------------------
// Wiring: the router, the projection, the shop.

use fulfilment::{Fulfilment, FulfilmentCommand};
use inventory::{Inventory, InventoryCommand};
use order::{Line, Order, OrderCommand};
use payment::PaymentState;

/// Sends the process manager's commands to the three aggregates' dispatchers.
pub(crate) struct Router {
    orders: Dispatcher<Order, dyn EventStore>,
    inventory: Dispatcher<Inventory, dyn EventStore>,
    payments: Dispatcher<PaymentState, dyn EventStore>,
    /// For the crash tests: after this many commands, the next new one never returns.
    crash_after: Option<(usize, Arc<tokio::sync::Notify>)>,
    /// The ids of the commands routed so far (a command sent again after a retry has the
    /// same id, so this counts each command once).
    routed: Arc<Mutex<HashSet<cqrs_core::CommandId>>>,
}

impl CommandRouter<FulfilmentCommand> for Router {
    async fn route(&self, envelope: CommandEnvelope<FulfilmentCommand>) -> Result<(), RouteError> {
        if let Some((after, crashed)) = &self.crash_after {
            let crash = {
                let routed = self.routed.lock().unwrap_or_else(PoisonError::into_inner);
                !routed.contains(&envelope.command_id) && routed.len() >= *after
            };
            if crash {
                crashed.notify_one();
                std::future::pending::<()>().await;
            }
        }
        let id = envelope.command_id;
        match envelope.command.clone() {
            FulfilmentCommand::Order(command) => {
                self.orders.dispatch(envelope.map(|_| command)).await?;
            }
            FulfilmentCommand::Inventory(command) => {
                self.inventory.dispatch(envelope.map(|_| command)).await?;
            }
            FulfilmentCommand::Payment(command) => {
                self.payments.dispatch(envelope.map(|_| command)).await?;
            }
        }
        self.routed.lock().unwrap_or_else(PoisonError::into_inner).insert(id);
        Ok(())
    }
}

/// Orders by status, in table `orders_by_status`: a transactional projection.
pub(crate) struct OrdersByStatus;

/// The row an order event leaves in `orders_by_status`.
fn status_of(event: &order::OrderEvent) -> (&str, &'static str, String, i64) {
    match event {
        order::OrderEvent::Placed(placed) => {
            (&placed.order_id, "placed", String::new(), i64::try_from(placed.total_cents).unwrap_or(i64::MAX))
        }
        order::OrderEvent::Confirmed(done) => (&done.order_id, "confirmed", String::new(), 0),
        order::OrderEvent::Cancelled(cancelled) => (&cancelled.order_id, "cancelled", cancelled.reason.clone(), 0),
    }
}

impl cqrs_sqlite::SqliteProjection for OrdersByStatus {
    type Event = order::OrderEvent;
    fn name(&self) -> &str {
        "orders-by-status"
    }
    async fn apply(
        &self,
        transaction: &mut sqlx::SqliteConnection,
        events: &[Envelope<order::OrderEvent>],
    ) -> Result<(), HandlerError> {
        for event in events {
            let (order_id, status, reason, total) = status_of(&event.event);
            sqlx::query(
                "INSERT INTO orders_by_status (order_id, status, reason, total_cents) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (order_id) DO UPDATE SET status = excluded.status, reason = excluded.reason",
            )
            .bind(order_id)
            .bind(status)
            .bind(reason)
            .bind(total)
            .execute(&mut *transaction)
            .await
            .map_err(HandlerError::new)?;
        }
        Ok(())
    }
}

impl cqrs_postgres::PgProjection for OrdersByStatus {
    type Event = order::OrderEvent;
    fn name(&self) -> &str {
        "orders-by-status"
    }
    async fn apply(
        &self,
        transaction: &mut sqlx::PgConnection,
        events: &[Envelope<order::OrderEvent>],
    ) -> Result<(), HandlerError> {
        for event in events {
            let (order_id, status, reason, total) = status_of(&event.event);
            sqlx::query(
                "INSERT INTO orders_by_status (order_id, status, reason, total_cents) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (order_id) DO UPDATE SET status = EXCLUDED.status, reason = EXCLUDED.reason",
            )
            .bind(order_id)
            .bind(status)
            .bind(reason)
            .bind(total)
            .execute(&mut *transaction)
            .await
            .map_err(HandlerError::new)?;
        }
        Ok(())
    }
}

const ORDERS_TABLE: &str = "CREATE TABLE IF NOT EXISTS orders_by_status \
    (order_id TEXT PRIMARY KEY, status TEXT NOT NULL, reason TEXT NOT NULL, total_cents BIGINT NOT NULL)";

/// The store, as either backend.
#[derive(Clone)]
pub(crate) enum Backend {
    /// An embedded file.
    Sqlite(cqrs_sqlite::SqliteEventStore),
    /// A shared database.
    Postgres(cqrs_postgres::PgEventStore),
}

impl Backend {
    /// Opens `url` (`sqlite://PATH` or `postgres://…`) and creates the projection's table.
    pub(crate) async fn open(url: &str) -> anyhow::Result<Self> {
        use sqlx::Connection;
        if url.starts_with("sqlite://") {
            let mut ddl = sqlx::SqliteConnection::connect(&format!("{url}?mode=rwc")).await.context("open the file")?;
            sqlx::query(ORDERS_TABLE).execute(&mut ddl).await.context("create orders_by_status")?;
            ddl.close().await?;
            Ok(Backend::Sqlite(cqrs_sqlite::SqliteEventStore::connect(url).await.context("open the store")?))
        } else {
            let store = cqrs_postgres::PgEventStore::connect(url).await.context("connect")?;
            store.migrate().await.context("migrate")?;
            sqlx::query(ORDERS_TABLE).execute(store.pool()).await.context("create orders_by_status")?;
            Ok(Backend::Postgres(store))
        }
    }

    fn store(&self) -> Arc<dyn Store> {
        match self {
            Backend::Sqlite(store) => Arc::new(store.clone()),
            Backend::Postgres(store) => Arc::new(store.clone()),
        }
    }

    fn spawn_projection(&self, config: RunnerConfig, progress: &Progress) -> RunningHandler {
        match self {
            Backend::Sqlite(store) => cqrs_sqlite::spawn_projection(store, OrdersByStatus, config, progress),
            Backend::Postgres(store) => cqrs_postgres::spawn_projection(store, OrdersByStatus, config, progress),
        }
    }

    /// The projection's rows: order id → (status, reason).
    pub(crate) async fn orders_by_status(&self) -> anyhow::Result<BTreeMap<String, (String, String)>> {
        use sqlx::Row;
        let rows = match self {
            Backend::Sqlite(store) => sqlx::query("SELECT order_id, status, reason FROM orders_by_status")
                .fetch_all(store.read_pool())
                .await?
                .iter()
                .map(|row| (row.get("order_id"), (row.get("status"), row.get("reason"))))
                .collect(),
            Backend::Postgres(store) => sqlx::query("SELECT order_id, status, reason FROM orders_by_status")
                .fetch_all(store.pool())
                .await?
                .iter()
                .map(|row| (row.get("order_id"), (row.get("status"), row.get("reason"))))
                .collect(),
        };
        Ok(rows)
    }
}

/// The running shop: dispatchers, the process manager, the projection.
pub(crate) struct Shop {
    /// The store.
    pub(crate) backend: Backend,
    /// Orders.
    pub(crate) orders: Dispatcher<Order, dyn EventStore>,
    /// Stock.
    pub(crate) inventory: Dispatcher<Inventory, dyn EventStore>,
    /// Payments.
    pub(crate) payments: Dispatcher<PaymentState, dyn EventStore>,
    process: RunningProcess,
    projection: RunningHandler,
    routed: Arc<Mutex<HashSet<cqrs_core::CommandId>>>,
}

impl Shop {
    /// How many commands the process manager has sent (each once, however often re-sent).
    pub(crate) fn commands_sent(&self) -> usize {
        self.routed.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Starts everything on `backend`; the process manager's router "crashes" after
    /// `crash_after` commands if given (for the tests).
    pub(crate) fn start(
        backend: Backend,
        clock: Clock,
        config: RunnerConfig,
        crash_after: Option<(usize, Arc<tokio::sync::Notify>)>,
    ) -> Self {
        let store = backend.store();
        // The dispatchers need only the event log; the process manager needs the whole store.
        let log: Arc<dyn EventStore> = store.clone();
        let progress = Progress::new();
        let orders = Dispatcher::<Order, dyn EventStore>::new(Arc::clone(&log));
        let inventory = Dispatcher::<Inventory, dyn EventStore>::new(Arc::clone(&log));
        let payments = Dispatcher::<PaymentState, dyn EventStore>::new(Arc::clone(&log));
        let routed = Arc::new(Mutex::new(HashSet::new()));
        let router = Router {
            orders: orders.clone(),
            inventory: inventory.clone(),
            payments: payments.clone(),
            crash_after,
            routed: Arc::clone(&routed),
        };
        let process = spawn_process_manager(Arc::clone(&store), Fulfilment, router, config.clone(), clock, &progress);
        let projection = backend.spawn_projection(config, &progress);
        Self { backend, orders, inventory, payments, process, projection, routed }
    }

    /// Stops everything cleanly.
    pub(crate) async fn stop(self) {
        self.process.stop().await;
        self.projection.stop().await;
    }

    /// Stops everything at once, as a crash would.
    #[cfg(test)]
    pub(crate) fn crash(self) {
        self.process.abort();
        self.projection.abort();
    }

    /// Where each order, SKU and payment is (read from the store).
    pub(crate) async fn summary(&self, orders: &[&str], skus: &[&str]) -> anyhow::Result<Summary> {
        let mut summary = Summary::default();
        for order in orders {
            let (state, _) = self.orders.load(&StreamId::for_aggregate("order", order)?).await?;
            let (payment, _) = self.payments.load(&StreamId::for_aggregate("payment", order)?).await?;
            summary.orders.insert((*order).to_owned(), format!("{state:?}"));
            summary.payments.insert((*order).to_owned(), format!("{payment:?}"));
        }
        for sku in skus {
            let (stock, _) = self.inventory.load(&StreamId::for_aggregate("inventory", sku)?).await?;
            summary.stock.insert((*sku).to_owned(), (stock.available, stock.reserved.len()));
        }
        let store = self.backend.store();
        let mut after = cqrs_core::Position::START;
        loop {
            let page = store.read_all(after, 500).await?;
            let Some(last) = page.last() else { break };
            after = last.position;
            for event in &page {
                *summary.events.entry(format!("{} {}", event.stream_id, event.event_type)).or_default() += 1;
            }
        }
        Ok(summary)
    }
}

/// What the store says happened: order, payment and stock states, and how many events of each
/// type each stream has (a command applied twice would show as one more).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Summary {
    /// Order → state.
    pub(crate) orders: BTreeMap<String, String>,
    /// Order → payment state.
    pub(crate) payments: BTreeMap<String, String>,
    /// SKU → (available, reservations).
    pub(crate) stock: BTreeMap<String, (u32, usize)>,
    /// "stream type" → events.
    pub(crate) events: BTreeMap<String, usize>,
}

/// The demo's orders: (id, lines, card).
fn orders() -> Vec<(&'static str, Vec<Line>, &'static str)> {
    let line = |sku: &str, quantity| Line { sku: sku.to_owned(), quantity };
    vec![
        ("order-1", vec![line("tea", 2), line("mug", 1)], "ok"),
        ("order-2", vec![line("tea", 1), line("mug", 5)], "ok"),
        ("order-3", vec![line("tea", 1)], "declined"),
        ("order-4", vec![line("tea", 1), line("mug", 1)], "transfer"),
    ]
}

/// The ids of the demo's orders and SKUs.
const ORDER_IDS: [&str; 4] = ["order-1", "order-2", "order-3", "order-4"];
const SKUS: [&str; 2] = ["tea", "mug"];

/// Restocks and places the demo's orders.
async fn place_orders(shop: &Shop) -> anyhow::Result<()> {
    for (sku, quantity) in [("tea", 10), ("mug", 4)] {
        let restock = InventoryCommand::Restock { sku: sku.to_owned(), quantity };
        // Fixed ids: running this again (after a crash) restocks once.
        let id = cqrs_core::CommandId::derived(cqrs_core::EventId(uuid::Uuid::nil()), &format!("restock:{sku}"));
        shop.inventory.dispatch(CommandEnvelope::new(restock).with_command_id(id)).await?;
    }
    for (order_id, lines, card) in orders() {
        let total_cents = lines.iter().map(|line| u64::from(line.quantity) * 450).sum();
        let place = OrderCommand::Place { order_id: order_id.to_owned(), lines, total_cents, card: card.to_owned() };
        let id = cqrs_core::CommandId::derived(cqrs_core::EventId(uuid::Uuid::nil()), order_id);
        shop.orders.dispatch(CommandEnvelope::new(place).with_command_id(id)).await?;
    }
    Ok(())
}

/// Whether every order is done: 1 confirmed, 2 and 3 cancelled with their stock back, and 4
/// waiting for its transfer (before the deadline) or cancelled (after it).
fn settled(summary: &Summary, deadline_passed: bool) -> bool {
    let order = |id: &str| summary.orders.get(id).map(String::as_str);
    let released = summary.events.get("inventory-tea StockReleased").copied().unwrap_or(0);
    let order_4 = if deadline_passed { "Cancelled" } else { "Placed" };
    order("order-1") == Some("Confirmed")
        && order("order-2") == Some("Cancelled")
        && order("order-3") == Some("Cancelled")
        && order("order-4") == Some(order_4)
        && summary.payments.get("order-4").map(String::as_str) == Some("Awaiting")
        // tea: order-2 and order-3 released before the deadline, order-4 after.
        && released == if deadline_passed { 3 } else { 2 }
}

/// Waits until the shop is settled and stays so: two readings 100 ms apart agree (one reading
/// may be torn, its aggregate states read before its events).
async fn wait_settled(shop: &Shop, deadline_passed: bool) -> anyhow::Result<Summary> {
    let give_up = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut previous: Option<Summary> = None;
    loop {
        let summary = shop.summary(&ORDER_IDS, &SKUS).await?;
        if settled(&summary, deadline_passed) {
            if previous.as_ref() == Some(&summary) {
                return Ok(summary);
            }
            previous = Some(summary);
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        previous = None;
        anyhow::ensure!(tokio::time::Instant::now() < give_up, "the shop did not settle: {summary:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The whole story: orders placed and settled, then the deadline passes for the unpaid one.
#[cfg(test)]
async fn run_story(shop: &Shop, clock: &TestClock) -> anyhow::Result<Summary> {
    place_orders(shop).await?;
    wait_settled(shop, false).await?;
    clock.advance(fulfilment::PAYMENT_DEADLINE + Duration::from_secs(60));
    wait_settled(shop, true).await
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let url = std::env::args().nth(1).unwrap_or_else(|| format!("sqlite://{}", dir.path().join("orders.db").display()));
    println!("store: {url}");
    let backend = Backend::open(&url).await?;
    let (clock, control) = Clock::test();
    let shop = Shop::start(backend, clock, RunnerConfig::default(), None);
    println!("placing 4 orders (10 tea and 4 mugs in stock; cards: ok, ok, declined, bank transfer)");
    place_orders(&shop).await?;
    wait_settled(&shop, false).await?;
    println!("moving the clock 16 minutes forward: the unpaid order's deadline passes");
    control.advance(fulfilment::PAYMENT_DEADLINE + Duration::from_secs(60));
    let summary = wait_settled(&shop, true).await?;
    tokio::time::sleep(Duration::from_millis(300)).await; // the projection commits its last batch
    let projected = shop.backend.orders_by_status().await?;
    println!("\nwhat happened to each order (orders_by_status, a transactional projection):");
    for (order_id, (status, reason)) in &projected {
        let payment = summary.payments.get(order_id).map_or("?", String::as_str);
        let why = if reason.is_empty() { String::new() } else { format!(" ({reason})") };
        println!("  {order_id}: {status}{why}; payment {payment}");
    }
    println!("stock (available, reservations): {:?}", summary.stock);
    println!("the process manager sent {} commands", shop.commands_sent());
    shop.stop().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use cqrs_core::testing::ProcessTest;

    use super::fulfilment::{FulfilmentEvent, Progress as State};
    use super::inventory::Reservation;
    use super::*;

    fn placed(order_id: &str, card: &str) -> FulfilmentEvent {
        let lines = vec![Line { sku: "tea".into(), quantity: 2 }, Line { sku: "mug".into(), quantity: 1 }];
        FulfilmentEvent::OrderPlaced(order::Placed {
            order_id: order_id.into(),
            lines,
            total_cents: 1350,
            card: card.into(),
        })
    }

    fn reserved(order_id: &str, sku: &str, quantity: u32) -> FulfilmentEvent {
        FulfilmentEvent::StockReserved(Reservation { sku: sku.into(), order_id: order_id.into(), quantity })
    }

    #[test]
    fn placing_reserves_every_line_and_schedules_the_deadline() {
        let then = ProcessTest::new(Fulfilment)
            .when("order-1", placed("order-1", "ok"))
            .then_routed(Route::Start("order-1".into()))
            .then_commands(vec![
                FulfilmentCommand::Inventory(InventoryCommand::Reserve {
                    sku: "tea".into(),
                    order_id: "order-1".into(),
                    quantity: 2,
                }),
                FulfilmentCommand::Inventory(InventoryCommand::Reserve {
                    sku: "mug".into(),
                    order_id: "order-1".into(),
                    quantity: 1,
                }),
            ])
            .then_scheduled(vec![(
                "payment-deadline",
                FulfilmentCommand::Order(OrderCommand::CancelIfUnpaid { order_id: "order-1".into() }),
            )]);
        let due = then.effects().scheduled()[0].1;
        assert_eq!(due, then.recorded_at().plus(fulfilment::PAYMENT_DEADLINE), "15 minutes after the order");
    }

    #[test]
    fn the_last_reservation_takes_the_payment() {
        ProcessTest::new(Fulfilment)
            .given(vec![("order-1", placed("order-1", "ok")), ("inventory-tea", reserved("order-1", "tea", 2))])
            .when("inventory-mug", reserved("order-1", "mug", 1))
            .then_commands(vec![FulfilmentCommand::Payment(payment::PaymentCommand::Take {
                order_id: "order-1".into(),
                amount_cents: 1350,
                card: "ok".into(),
            })]);
    }

    #[test]
    fn a_refused_line_cancels_the_order_and_the_cancellation_releases_what_was_reserved() {
        let refused = FulfilmentEvent::ReservationRefused(Reservation {
            sku: "mug".into(),
            order_id: "order-1".into(),
            quantity: 1,
        });
        let history = vec![("order-1", placed("order-1", "ok")), ("inventory-tea", reserved("order-1", "tea", 2))];
        ProcessTest::new(Fulfilment).given(history.clone()).when("inventory-mug", refused.clone()).then_commands(vec![
            FulfilmentCommand::Order(OrderCommand::Cancel {
                order_id: "order-1".into(),
                reason: "out of stock: mug".into(),
            }),
        ]);
        let cancelled = FulfilmentEvent::OrderCancelled(order::Cancelled {
            order_id: "order-1".into(),
            reason: "out of stock: mug".into(),
        });
        let mut history = history;
        history.push(("inventory-mug", refused));
        let then = ProcessTest::new(Fulfilment)
            .given(history)
            .when("order-1", cancelled)
            .then_routed(Route::Stop("order-1".into()))
            .then_commands(vec![FulfilmentCommand::Inventory(InventoryCommand::Release {
                sku: "tea".into(),
                order_id: "order-1".into(),
            })]);
        assert!(then.state().is_some_and(|state: &State| state.failing));
    }

    #[test]
    fn payment_confirms_and_cancels_the_deadline() {
        let taken = FulfilmentEvent::PaymentTaken(payment::Payment { order_id: "order-1".into(), amount_cents: 1350 });
        ProcessTest::new(Fulfilment)
            .given(vec![("order-1", placed("order-1", "ok"))])
            .when("payment-order-1", taken)
            .then_commands(vec![FulfilmentCommand::Order(OrderCommand::Confirm { order_id: "order-1".into() })])
            .then_cancelled(vec!["payment-deadline"]);
    }

    #[test]
    fn a_refused_cancel_undoes_nothing() {
        let declined = FulfilmentEvent::PaymentDeclined(payment::Declined {
            order_id: "order-1".into(),
            reason: "card declined".into(),
        });
        ProcessTest::new(Fulfilment)
            .given(vec![("order-1", placed("order-1", "bad"))])
            .when("payment-order-1", declined)
            .when_rejected("cancel", Rejection::from_message("the order is confirmed"))
            .then_no_commands()
            .then_cancelled(vec![]);
    }

    #[test]
    fn events_of_orders_never_started_are_ignored() {
        ProcessTest::new(Fulfilment).when("inventory-tea", reserved("order-9", "tea", 1)).then_no_commands();
    }

    /// Claims that lapse fast, so a restarted process takes over quickly after a crash.
    fn fast() -> RunnerConfig {
        RunnerConfig {
            claim_ttl: Duration::from_millis(300),
            claim_retry: Duration::from_millis(50),
            initial_backoff: Duration::from_millis(5),
            ..RunnerConfig::default()
        }
    }

    /// The story without a crash: its end state and how many commands the manager sent.
    async fn baseline(url: &str) -> (Summary, usize) {
        let backend = Backend::open(url).await.expect("open");
        let (clock, control) = Clock::test();
        let shop = Shop::start(backend, clock, fast(), None);
        let summary = run_story(&shop, &control).await.expect("the story");
        let sent = shop.commands_sent();
        shop.stop().await;
        (summary, sent)
    }

    /// Crashes the process manager after its `k`-th command (the next one never returns),
    /// drops everything, reopens the store and starts again; returns the end state.
    async fn crash_after(url: &str, k: usize) -> Summary {
        let backend = Backend::open(url).await.expect("open");
        let (clock, control) = Clock::test();
        let crashed = Arc::new(tokio::sync::Notify::new());
        let shop = Shop::start(backend, clock.clone(), fast(), Some((k, Arc::clone(&crashed))));
        let advanced = std::sync::atomic::AtomicBool::new(false);
        let story = async {
            place_orders(&shop).await.expect("place");
            if wait_settled(&shop, false).await.is_ok() {
                control.advance(fulfilment::PAYMENT_DEADLINE + Duration::from_secs(60));
                advanced.store(true, Ordering::SeqCst);
            }
            std::future::pending::<()>().await;
        };
        let advanced = &advanced;
        tokio::select! {
            () = crashed.notified() => {}
            () = story => {}
            () = tokio::time::sleep(Duration::from_secs(60)) => panic!("never reached command {k}"),
        }
        shop.crash();
        tokio::time::sleep(Duration::from_millis(50)).await;
        // A new process on the same store and clock: the clients retry what they sent.
        let backend = Backend::open(url).await.expect("reopen");
        let shop = Shop::start(backend, clock, fast(), None);
        place_orders(&shop).await.expect("place again (duplicates)");
        if !advanced.load(Ordering::SeqCst) {
            wait_settled(&shop, false).await.expect("settled after the restart");
            control.advance(fulfilment::PAYMENT_DEADLINE + Duration::from_secs(60));
        }
        let summary = wait_settled(&shop, true).await.expect("the deadline after the restart");
        shop.stop().await;
        summary
    }

    /// The story once without a crash, then with a crash after each command the process
    /// manager sends: every time the same end state, and no command applied twice (a payment
    /// taken twice, or a line reserved twice, would change it).
    async fn crashes_change_nothing<F, Fut>(mut url_for: F)
    where
        F: FnMut(usize) -> Fut,
        Fut: std::future::Future<Output = String>,
    {
        let (expected, commands) = baseline(&url_for(0).await).await;
        assert!(commands >= 10, "the story sends a dozen commands ({commands})");
        for k in 0..commands {
            let summary = crash_after(&url_for(k + 1).await, k).await;
            assert_eq!(summary, expected, "after a crash after command {k}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_crashing_after_any_step_changes_nothing() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().to_owned();
        crashes_change_nothing(|k| {
            let url = format!("sqlite://{}", path.join(format!("orders-{k}.db")).display());
            async move { url }
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_crashing_after_any_step_changes_nothing() {
        let server = std::env::var("DATABASE_URL")
            .expect("DATABASE_URL is not set: this test needs a PostgreSQL server (scripts/test starts one)");
        let base = server.rsplit_once('/').map_or(server.as_str(), |(base, _)| base).to_owned();
        let names = Arc::new(std::sync::Mutex::new(Vec::new()));
        let created = Arc::clone(&names);
        crashes_change_nothing(move |_| {
            let (server, base, created) = (server.clone(), base.clone(), Arc::clone(&created));
            async move {
                let name = format!("cqrs_orders_{}", uuid::Uuid::new_v4().simple());
                let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&server).await.expect("connect");
                sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut admin).await.expect("create");
                let url = format!("{base}/{name}");
                created.lock().expect("lock").push(name);
                url
            }
        })
        .await;
        let server = std::env::var("DATABASE_URL").expect("set");
        let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&server).await.expect("connect");
        let names: Vec<String> = names.lock().expect("lock").clone();
        for name in names {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut admin).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_projection_shows_each_order_s_status() {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("orders.db").display());
        let backend = Backend::open(&url).await.expect("open");
        let (clock, control) = Clock::test();
        let shop = Shop::start(backend, clock, fast(), None);
        run_story(&shop, &control).await.expect("story");
        let give_up = tokio::time::Instant::now() + Duration::from_secs(30);
        let expected: BTreeMap<String, (String, String)> = [
            ("order-1", "confirmed", ""),
            ("order-2", "cancelled", "out of stock: mug"),
            ("order-3", "cancelled", "payment: card declined"),
            ("order-4", "cancelled", "payment deadline passed"),
        ]
        .into_iter()
        .map(|(id, status, reason)| (id.to_owned(), (status.to_owned(), reason.to_owned())))
        .collect();
        loop {
            let projected = shop.backend.orders_by_status().await.expect("rows");
            if projected == expected {
                break;
            }
            assert!(tokio::time::Instant::now() < give_up, "projection: {projected:#?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        shop.stop().await;
    }
}
