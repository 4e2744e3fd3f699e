//! The live-view layer: server-held view state per connection, pushed to the browser as small
//! frames. [`protocol`] is the wire format, [`socket`] the websocket with its limits and
//! closing rules, [`present`] how the read model's states become frames, [`view`] the
//! per-connection task.

pub mod present;
pub mod protocol;
pub mod socket;
pub mod view;

pub use socket::LiveConfig;
