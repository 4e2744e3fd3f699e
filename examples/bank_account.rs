//! A bank account with a balance projection, read-your-writes and idempotent retries.
//! Run with: `cargo run -p examples --example bank_account`

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cqrs_core::{
    spawn_handler, Aggregate, Command, CommandEnvelope, CommandId, Consistency, DispatchError, Dispatcher, DomainEvent,
    Envelope, EventHandler, HandlerError, Progress, RunnerConfig,
};
use cqrs_memory::MemoryStore;
use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Clone)]
struct Account {
    open: bool,
    balance_cents: u64,
}

/// Routed to the stream `account-{id}`.
#[derive(Debug, Command)]
#[command(aggregate = Account)]
enum AccountCommand {
    Open { id: String, owner: String },
    Deposit { id: String, cents: u64 },
    Withdraw { id: String, cents: u64 },
}

/// Stored under the names in `#[event(name)]`: the Rust variants can be renamed freely.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(category = "account")]
enum AccountEvent {
    #[event(name = "AccountOpened")]
    Opened { owner: String },
    #[event(name = "MoneyDeposited")]
    Deposited { cents: u64 },
    #[event(name = "MoneyWithdrawn")]
    Withdrawn { cents: u64 },
}

#[derive(Debug, thiserror::Error)]
enum AccountError {
    #[error("account already open")]
    AlreadyOpen,
    #[error("account not open")]
    NotOpen,
    #[error("insufficient funds: balance {balance_cents} cents")]
    InsufficientFunds { balance_cents: u64 },
}

impl Aggregate for Account {
    const CATEGORY: &'static str = "account";
    type Command = AccountCommand;
    type Event = AccountEvent;
    type Error = AccountError;

    fn execute(&self, command: &AccountCommand) -> Result<Vec<AccountEvent>, AccountError> {
        match command {
            AccountCommand::Open { .. } if self.open => Err(AccountError::AlreadyOpen),
            AccountCommand::Open { owner, .. } => Ok(vec![AccountEvent::Opened { owner: owner.clone() }]),
            _ if !self.open => Err(AccountError::NotOpen),
            AccountCommand::Deposit { cents, .. } => Ok(vec![AccountEvent::Deposited { cents: *cents }]),
            AccountCommand::Withdraw { cents, .. } if *cents > self.balance_cents => {
                Err(AccountError::InsufficientFunds { balance_cents: self.balance_cents })
            }
            AccountCommand::Withdraw { cents, .. } => Ok(vec![AccountEvent::Withdrawn { cents: *cents }]),
        }
    }

    fn apply(mut self, event: &AccountEvent) -> Self {
        match event {
            AccountEvent::Opened { .. } => self.open = true,
            AccountEvent::Deposited { cents } => self.balance_cents += cents,
            AccountEvent::Withdrawn { cents } => self.balance_cents -= cents,
        }
        self
    }
}

/// The read model: balance per account, as a query side would serve it.
#[derive(Clone, Default)]
struct Balances(Arc<Mutex<HashMap<String, i64>>>);

impl EventHandler for Balances {
    type Event = AccountEvent;
    fn name(&self) -> &str {
        "balances"
    }
    async fn handle(&self, event: Envelope<AccountEvent>) -> Result<(), HandlerError> {
        let delta = match event.event {
            AccountEvent::Opened { .. } => 0,
            AccountEvent::Deposited { cents } => cents as i64,
            AccountEvent::Withdrawn { cents } => -(cents as i64),
        };
        *self.0.lock().map_err(|_| HandlerError::new("poisoned"))?.entry(event.stream_id.to_string()).or_default() +=
            delta;
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let store = Arc::new(MemoryStore::new());
    let progress = Progress::new();
    let balances = Balances::default();
    let runner = spawn_handler(Arc::clone(&store), balances.clone(), RunnerConfig::default(), &progress);
    let accounts = Dispatcher::<Account, _>::new(Arc::clone(&store)).with_progress(progress);
    // Wait for the projection, named by its running handle.
    let strong = Consistency::strong([&runner]);

    let id = || "alice".to_owned();
    accounts.dispatch(AccountCommand::Open { id: id(), owner: "Alice".into() }).await?;
    accounts.dispatch_with(CommandEnvelope::new(AccountCommand::Deposit { id: id(), cents: 10_000 }), &strong).await?;
    // Read-your-writes: the projection already shows the deposit.
    println!("balance after deposit: {:?}", balances.0.lock().expect("lock").get("account-alice"));

    // A client retrying a withdrawal (same command id) is charged once.
    let key = CommandId::new();
    for attempt in 1..=2 {
        let withdraw = CommandEnvelope::new(AccountCommand::Withdraw { id: id(), cents: 2_500 }).with_command_id(key);
        let outcome = accounts.dispatch_with(withdraw, &strong).await?;
        println!("withdraw attempt {attempt}: version {}, duplicate: {}", outcome.version, outcome.duplicate);
    }
    match accounts.dispatch(AccountCommand::Withdraw { id: id(), cents: 1_000_000 }).await {
        Err(DispatchError::Rejected(error)) => println!("refused: {error}"),
        other => anyhow::bail!("expected a refusal, got {other:?}"),
    }
    println!("final balance: {:?}", balances.0.lock().expect("lock").get("account-alice"));
    runner.stop().await;
    Ok(())
}
