//! The live chat: a `Chat` aggregate on cqrs-core, a read model of the rooms in use (each with
//! a bounded window of its latest messages, older pages read from the store), and an HTTP
//! server that renders HTML on the server and keeps each page live over a websocket.
//!
//! The flow of one message (names as in ARCHITECTURE.md):
//! 1. a room page's script sends `{"t":"send",…}` over its websocket to its view task
//!    ([`live::view`]);
//! 2. the view hands it to the command path ([`commands`]), which dispatches
//!    [`domain::ChatCommand::SendMessage`] through the [`cqrs_core::Dispatcher`]; the
//!    [`domain::Chat`] aggregate checks it and emits [`domain::MessageSent`], appended to the
//!    event store with the client's command id (a resend posts once);
//! 3. the read model ([`rooms::ChatReadModel`]), fed by a store subscription in global order
//!    from the store's head at start, applies it to the room's window if the room is in use,
//!    has it shown once ([`live::present`]), and publishes it on the room's channel;
//! 4. every view of the room (in this process, or in another process sharing the database,
//!    through its own subscription) pushes that one frame to its browser.
//!
//! # Embedding the chat
//!
//! The binary is a thin wrapper over this library: open a store, start the [`App`], serve it.
//!
//! ```
//! use std::time::Duration;
//!
//! use cqrs_core::Consistency;
//! use livechat_app::commands::{Outcome, RoomFacts, Sender};
//! use livechat_app::domain::ChatId;
//! use livechat_app::rooms::HANDLER_NAME;
//! use livechat_app::server::{bind, open_store, serve};
//! use livechat_app::web::security::ClientAddress;
//! use livechat_app::{App, AppConfig};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = open_store("memory").await?; // or "sqlite://livechat.db", "postgres://…"
//! let app = App::start(store, AppConfig::default(), Duration::from_secs(5)).await;
//! let state = std::sync::Arc::clone(app.state());
//!
//! // The command path a websocket `send` takes, with read-your-writes on the read model.
//! let room = ChatId::parse("lobby-talk")?;
//! let alice = Sender { name: "alice", address: ClientAddress::Known([127, 0, 0, 1].into()) };
//! let strong = Consistency::strong([HANDLER_NAME]);
//! let outcome = state.commands.send(&room, alice, uuid::Uuid::new_v4(), "hello".into(), &RoomFacts::default(), &strong).await;
//! assert_eq!(outcome, Outcome::Stored);
//! let shown = state.model.room(&room).await?;
//! let (messages, _) = shown.latest(state.model.present(), 100, 1 << 20);
//! assert!(messages[0].shown.html().contains("hello"));
//!
//! // Serve it (here on a free port, stopped at once).
//! let listener = bind("127.0.0.1:0".parse()?)?;
//! serve(listener, app, async {}).await?;
//! # Ok(())
//! # }
//! ```

pub mod app;
pub mod cluster;
pub mod commands;
pub mod dashboard;
pub mod domain;
pub mod limits;
pub mod live;
pub mod metrics;
pub mod notify;
#[cfg(feature = "otel")]
pub mod otel;
pub mod render;
pub mod rooms;
pub mod search;
pub mod server;
pub mod state;
pub mod web;

pub use app::App;
pub use state::{AppConfig, AppState};
