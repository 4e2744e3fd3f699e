//! The orders-by-status projection, on either backend.

use super::*;

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

pub(crate) const ORDERS_TABLE: &str = "CREATE TABLE IF NOT EXISTS orders_by_status \
    (order_id TEXT PRIMARY KEY, status TEXT NOT NULL, reason TEXT NOT NULL, total_cents BIGINT NOT NULL)";
