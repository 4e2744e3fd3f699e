//! The store (either backend) and the running shop on it.

use super::*;

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
