//! The live chat: a `Chat` aggregate on cqrs-core, a `ChatReadModel` projection in RAM, and an
//! axum server that renders HTML on the server and keeps each page live over a websocket.
//!
//! The flow of one message (names as in ARCHITECTURE.md):
//! 1. a room page's script sends `{"t":"send",…}` over its websocket to its view task
//!    ([`live::view`]);
//! 2. the view dispatches [`domain::SendMessage`] through the [`cqrs_core::Dispatcher`]; the
//!    [`domain::Chat`] aggregate checks it and emits [`domain::MessageSent`], appended to the
//!    event store with the client's command id (a resend posts once);
//! 3. the [`read_model::ChatReadModel`] handler, fed by a store subscription in global order,
//!    applies it, renders its HTML once, and publishes it on the room's channel;
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
//! use cqrs_core::{Consistency, Position};
//! use livechat_app::domain::ChatId;
//! use livechat_app::live::view::send_message;
//! use livechat_app::read_model::HANDLER_NAME;
//! use livechat_app::server::{bind, open_store, serve};
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
//! let strong = Consistency::strong([HANDLER_NAME]);
//! send_message(&state, &room, "alice", uuid::Uuid::new_v4(), "hello".into(), &strong).await?;
//! let (messages, _) = state.model.room(&room).expect("room exists").latest(100);
//! assert!(messages[0].html().contains("hello"));
//! assert_eq!(state.model.position(), Position(1));
//!
//! // Serve it (here on a free port, stopped at once).
//! let listener = bind("127.0.0.1:0".parse()?)?;
//! serve(listener, app, async {}).await?;
//! # Ok(())
//! # }
//! ```

pub mod app;
pub mod domain;
pub mod live;
pub mod metrics;
pub mod read_model;
pub mod render;
pub mod server;

pub use app::{App, AppConfig, AppState};
