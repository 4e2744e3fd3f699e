//! Stock per SKU, and its reservations per order.

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
