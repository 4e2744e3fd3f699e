//! The demo's story: its orders, placing them, and waiting until the shop settles.

use super::*;

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
pub(crate) fn orders() -> Vec<(&'static str, Vec<Line>, &'static str)> {
    let line = |sku: &str, quantity| Line { sku: sku.to_owned(), quantity };
    vec![
        ("order-1", vec![line("tea", 2), line("mug", 1)], "ok"),
        ("order-2", vec![line("tea", 1), line("mug", 5)], "ok"),
        ("order-3", vec![line("tea", 1)], "declined"),
        ("order-4", vec![line("tea", 1), line("mug", 1)], "transfer"),
    ]
}

/// The ids of the demo's orders and SKUs.
pub(crate) const ORDER_IDS: [&str; 4] = ["order-1", "order-2", "order-3", "order-4"];
pub(crate) const SKUS: [&str; 2] = ["tea", "mug"];

/// Restocks and places the demo's orders.
pub(crate) async fn place_orders(shop: &Shop) -> anyhow::Result<()> {
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
pub(crate) fn settled(summary: &Summary, deadline_passed: bool) -> bool {
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
pub(crate) async fn wait_settled(shop: &Shop, deadline_passed: bool) -> anyhow::Result<Summary> {
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
pub(crate) async fn run_story(shop: &Shop, clock: &TestClock) -> anyhow::Result<Summary> {
    place_orders(shop).await?;
    wait_settled(shop, false).await?;
    clock.advance(fulfilment::PAYMENT_DEADLINE + Duration::from_secs(60));
    wait_settled(shop, true).await
}
