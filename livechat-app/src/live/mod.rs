//! The live-view layer: server-held view state per connection, pushed to the browser as small
//! frames. [`protocol`] is the wire format, [`view`] the per-connection task.

pub mod protocol;
pub mod view;

pub use view::LiveConfig;
