//! Holder crate for the workspace examples; see `bank_account.rs`.
