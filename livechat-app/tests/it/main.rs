//! Integration tests of the chat: the aggregate's rules, and the live views over real
//! websockets against the real router.

mod bugs;
mod capacity;
mod cluster;
mod domain;
mod durability;
mod features;
mod notifier;
mod proxy;
mod reactions;
mod search;
mod support;
mod websocket;
