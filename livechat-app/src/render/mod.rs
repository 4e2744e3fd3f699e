//! HTML, rendered on the server with maud. One function per fragment, used by both the first
//! render of a page and the live updates, so the two cannot drift. maud escapes every
//! interpolated string, so user text always shows as text; links are made only from
//! `http://` and `https://` URLs.
//!
//! One file per concept: [`chat`] (the lobby, room pages, a message, presence), [`links`]
//! (link and mention finding), [`dashboard`] (the dashboard page and
//! region) with its SVG [`charts`], [`page`] (the frame every page shares), [`assets`] (fingerprinted asset URLs) and
//! [`format`](mod@format) (times and durations). Everything is re-exported here.

pub mod assets;
pub mod charts;
pub mod chat;
pub mod dashboard;
pub mod format;
pub mod links;
pub mod page;
pub mod search;

pub use assets::{Assets, APP_CSS, LIVE_JS};
pub use chat::{join_form, lobby_page, message, name_page, presence, room_list, room_page, RoomPage};
pub use dashboard::{dashboard_page, handler_state, metrics, HandlerLine};
pub use format::{micros, utc};
pub use links::{text_with_links, LINK_REL};
pub use page::notice_page;
pub use search::{search_form, search_page, search_results};
