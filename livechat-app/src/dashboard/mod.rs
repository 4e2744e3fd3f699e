//! What `/dashboard` shows, as data: the app's exposition text parsed ([`exposition`]), the
//! numbers of one moment ([`snapshot`]) and the last 15 minutes of them ([`history`]). The
//! metrics themselves are recorded in [`crate::metrics`]; the page and its charts are
//! rendered in [`crate::render::dashboard`] and [`crate::render::charts`].

pub mod exposition;
pub mod history;
pub mod snapshot;

pub use exposition::{Buckets, Reading};
pub use history::{History, Sample};
pub use snapshot::Snapshot;
