//! Holder crate for the workspace examples (`bank_account.rs`, `order_fulfilment/`) and the
//! `exclusive_handler` demo program (`src/bin/exclusive_handler.rs`).
