//! The process manager's router: its commands to the three aggregates' dispatchers.

use super::*;

/// Sends the process manager's commands to the three aggregates' dispatchers.
pub(crate) struct Router {
    pub(crate) orders: Dispatcher<Order, dyn EventStore>,
    pub(crate) inventory: Dispatcher<Inventory, dyn EventStore>,
    pub(crate) payments: Dispatcher<PaymentState, dyn EventStore>,
    /// For the crash tests: after this many commands, the next new one never returns.
    pub(crate) crash_after: Option<(usize, Arc<tokio::sync::Notify>)>,
    /// The ids of the commands routed so far (a command sent again after a retry has the
    /// same id, so this counts each command once).
    pub(crate) routed: Arc<Mutex<HashSet<cqrs_core::CommandId>>>,
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
