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

mod fulfilment;
mod inventory;
mod order;
mod payment;
mod projection;
mod router;
mod shop;
mod story;
#[cfg(test)]
mod tests;

use fulfilment::{Fulfilment, FulfilmentCommand};
use inventory::{Inventory, InventoryCommand};
use order::{Line, Order, OrderCommand};
use payment::PaymentState;
use projection::{OrdersByStatus, ORDERS_TABLE};
use router::Router;
use shop::{Backend, Shop};
#[cfg(test)]
use story::run_story;
use story::{place_orders, wait_settled, Summary};

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
