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

pub mod app;
pub mod domain;
pub mod live;
pub mod metrics;
pub mod read_model;
pub mod render;
pub mod server;

pub use app::{App, AppConfig, AppState};
