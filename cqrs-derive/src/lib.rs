//! Derive macros for [`cqrs-core`](https://docs.rs/cqrs-core): `#[derive(DomainEvent)]` names
//! each event once, and `#[derive(Command)]` routes a command to its stream.
//!
//! Use them through `cqrs-core`, which re-exports both behind its default `derive` feature
//! (the way `serde` re-exports `serde_derive`): `use cqrs_core::{Command, DomainEvent};`
//! brings the trait and its derive together. The generated code names `::cqrs_core`, so the
//! crate using them must depend on `cqrs-core` under that name.
//!
//! # `#[derive(DomainEvent)]`
//!
//! On an enum, one variant per stored event type. Attributes:
//! - on the enum, `#[event(category = "account")]` (required): the stream category of the
//!   aggregate that emits these events. Handlers of this type then take only events of that
//!   category, so two aggregates that both emit an `Opened` never feed each other's handlers.
//!   `category = "*"` accepts any category. `#[event(version = N)]` sets the default schema
//!   version of every variant (1 if absent).
//! - on a variant, `#[event(name = "AccountOpened")]`: the stored type name, the variant's
//!   name by default. Keep it stable forever; the Rust variant can then be renamed freely,
//!   since stored events are decoded by this name. `#[event(version = N)]`: the schema version
//!   this code writes for the variant. `#[event(category = "...")]`: the category of this one
//!   variant, for an enum that gathers events of several aggregates.
//!
//! The stored payload is the variant's content only, never the Rust variant's name: a newtype
//! variant `Opened(Opened)` stores the inner value as serde writes it (all serde attributes
//! apply); a struct variant `Opened { owner: String }` stores an object with one key per
//! field (missing keys decode as `null`, so `Option` fields may be absent in old events); a
//! tuple variant stores an array; a unit variant stores `{}`. Unknown keys are ignored.
//!
//! On a struct, the struct is the one event: `#[event(name = "...", version = N, category =
//! "...")]` on the struct (name defaults to the struct's name); the payload is the struct as
//! serde writes it.
//!
//! # `#[derive(Command)]`
//!
//! On a struct or an enum of commands: `#[command(aggregate = Account)]` (the category is
//! `Account::CATEGORY`) or `#[command(category = "account")]`, and `id = field` naming the
//! field that identifies the instance (`id` by default). A field marked `#[command(id)]`
//! overrides it for its struct or variant (also for tuple fields). The stream is
//! `{category}-{id}` through `StreamId::for_aggregate`, so an id that is too long or holds a
//! control character is a `StreamIdError`, which the dispatcher returns as
//! `DispatchError::InvalidStreamId` without deciding anything.

mod command;
mod event;

use proc_macro::TokenStream;
use syn::{parse_macro_input, DeriveInput};

/// Implements `cqrs_core::DomainEvent`: stored names, their list, schema versions, the
/// category filter, and encoding/decoding by the stored name. See the crate docs.
#[proc_macro_derive(DomainEvent, attributes(event))]
pub fn derive_domain_event(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    event::expand(&input).unwrap_or_else(syn::Error::into_compile_error).into()
}

/// Implements `cqrs_core::Command`: routes the command to `{category}-{id}`. See the crate
/// docs.
#[proc_macro_derive(Command, attributes(command))]
pub fn derive_command(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    command::expand(&input).unwrap_or_else(syn::Error::into_compile_error).into()
}
