#![doc = include_str!("../README.md")]
//!
//! # Modules
//! - [`ids`]: stream ids, versions, positions and message ids.
//! - [`event`]: the event trait, envelopes, metadata and upcasting.
//! - [`aggregate`]: the write model and command envelopes.
//! - [`query`]: Dynamic Consistency Boundaries: tags, queries and append conditions.
//! - [`store`]: for store authors: the [`EventStore`] (event log) and [`Coordination`] traits,
//!   joined by [`Store`], with their errors, the append checks, row helpers and the group-commit
//!   queue ([`store::batching`]).
//! - [`coordination`]: claims, parked events, process state and schedules kept by the store.
//! - [`subscription`]: catch-up-then-live feeds over any store.
//! - [`decision`]: command handlers whose consistency boundary is a query (DCB).
//! - [`dispatcher`]: the command path with caching, retries and read-your-writes.
//! - [`handler`]: projections and side effects, driven from durable checkpoints; one active
//!   consumer across processes, partitions, parked events, transactional batches.
//! - [`process`]: process managers (sagas) with durable state and scheduled commands.
//! - [`rebuild`]: projections rebuilt beside the live one and switched in one step.
//! - [`clock`]: the clock of schedules (system, or a test clock).
//! - [`telemetry`]: the spans and metrics the framework emits (every name in one table).
//! - `testing` (feature `testing`): the given/when/then harness and the store conformance suite.

// The derive macros name `::cqrs_core`; this lets them work inside this crate too (the test
// domain and the conformance suite use them).
#[allow(unused_extern_crates)]
extern crate self as cqrs_core;

pub mod aggregate;
mod cache;
pub mod clock;
pub mod coordination;
pub mod decision;
pub mod dispatcher;
pub mod event;
pub mod handler;
pub mod ids;
pub mod process;
pub mod query;
pub mod rebuild;
pub mod store;
pub mod subscription;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;

/// Re-exported so [`EventStore`] and [`Coordination`] implementations need no extra dependency:
/// `#[cqrs_core::async_trait]`.
pub use async_trait::async_trait;

/// The derive macros (feature `derive`, on by default): `#[derive(DomainEvent)]` and
/// `#[derive(Command)]`. They share their names with the traits, as serde's do, so one `use`
/// brings both. See [`DomainEvent`] and [`Command`] for the attributes.
#[cfg(feature = "derive")]
pub use cqrs_derive::{Command, DomainEvent};

/// What the derive macros' generated code calls. Not a public API: it may change in any
/// release.
#[doc(hidden)]
pub mod __private {
    pub use serde_json::{Error, Map, Value};

    use std::borrow::Cow;
    use std::fmt;

    use serde::de::{DeserializeOwned, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};
    use serde::{Deserialize, Serialize};
    use serde_json::value::RawValue;

    use crate::event::Payload;

    /// A value as JSON.
    pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Value, Error> {
        serde_json::to_value(value)
    }

    /// A value from a payload, in one pass.
    pub fn decode<T: DeserializeOwned>(payload: &Payload) -> Result<T, Error> {
        payload.decode()
    }

    /// A struct variant's fields: the held object, or the stored text split into its fields'
    /// raw JSON (each parsed only by the field that reads it).
    pub enum Fields<'a> {
        /// The payload held a value.
        Value(&'a Map<String, Value>),
        /// The payload held text.
        Text(Vec<(Cow<'a, str>, &'a RawValue)>),
    }

    /// The fields of a struct variant's payload.
    pub fn fields(payload: &Payload) -> Result<Fields<'_>, Error> {
        if let Some(value) = payload.held_value() {
            return match value {
                Value::Object(object) => Ok(Fields::Value(object)),
                other => Err(Error::custom(format!("expected an object, found {}", kind(other)))),
            };
        }
        let text = payload.text().unwrap_or("null");
        let mut deserializer = serde_json::Deserializer::from_str(text);
        let fields = deserializer.deserialize_map(FieldsVisitor)?;
        deserializer.end()?;
        Ok(Fields::Text(fields))
    }

    impl Fields<'_> {
        /// One field; an absent key reads as `null` (so an `Option` field added later decodes
        /// old events as `None`). A repeated key: the last one counts, as in a `Value`.
        pub fn field<T: DeserializeOwned>(&self, key: &str) -> Result<T, Error> {
            let found = match self {
                Fields::Value(object) => object.get(key).map(T::deserialize),
                Fields::Text(fields) => {
                    fields.iter().rev().find(|(name, _)| name == key).map(|(_, raw)| serde_json::from_str(raw.get()))
                }
            };
            match found {
                Some(result) => result.map_err(|error| Error::custom(format!("field `{key}`: {error}"))),
                None => T::deserialize(&Value::Null).map_err(|_| Error::custom(format!("missing field `{key}`"))),
            }
        }
    }

    struct FieldsVisitor;

    impl<'de> Visitor<'de> for FieldsVisitor {
        type Value = Vec<(Cow<'de, str>, &'de RawValue)>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an object")
        }

        fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
            let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(4));
            while let Some((Key(name), raw)) = map.next_entry::<Key<'de>, &'de RawValue>()? {
                fields.push((name, raw));
            }
            Ok(fields)
        }
    }

    /// An object key, borrowed from the text unless it has escapes.
    struct Key<'de>(Cow<'de, str>);

    impl<'de> Deserialize<'de> for Key<'de> {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            struct KeyVisitor;
            impl<'de> Visitor<'de> for KeyVisitor {
                type Value = Key<'de>;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a key")
                }
                fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                    Ok(Key(Cow::Borrowed(v)))
                }
                fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                    Ok(Key(Cow::Owned(v.to_owned())))
                }
                fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Key<'de>, E> {
                    Ok(Key(Cow::Owned(v)))
                }
            }
            deserializer.deserialize_str(KeyVisitor)
        }
    }

    /// A tuple variant's elements: the held array, or the stored text split into raw elements.
    pub enum Elements<'a> {
        /// The payload held a value.
        Value(&'a [Value]),
        /// The payload held text.
        Text(Vec<&'a RawValue>),
    }

    /// The `len` elements of a tuple variant's payload.
    pub fn elements(payload: &Payload, len: usize) -> Result<Elements<'_>, Error> {
        let wrong = |found: &str| Error::custom(format!("expected an array of {len} elements, found {found}"));
        if let Some(value) = payload.held_value() {
            return match value {
                Value::Array(items) if items.len() == len => Ok(Elements::Value(items)),
                Value::Array(items) => Err(wrong(&format!("{} elements", items.len()))),
                other => Err(wrong(kind(other))),
            };
        }
        let text = payload.text().unwrap_or("null");
        let mut deserializer = serde_json::Deserializer::from_str(text);
        let items = deserializer.deserialize_seq(ElementsVisitor).map_err(|error| wrong(&error.to_string()))?;
        deserializer.end()?;
        if items.len() != len {
            return Err(wrong(&format!("{} elements", items.len())));
        }
        Ok(Elements::Text(items))
    }

    impl Elements<'_> {
        /// Element `index` (below the length [`elements`] checked).
        pub fn element<T: DeserializeOwned>(&self, index: usize) -> Result<T, Error> {
            match self {
                Elements::Value(items) => items.get(index).map_or_else(|| T::deserialize(&Value::Null), T::deserialize),
                Elements::Text(items) => match items.get(index) {
                    Some(raw) => serde_json::from_str(raw.get()),
                    None => T::deserialize(&Value::Null),
                },
            }
        }
    }

    struct ElementsVisitor;

    impl<'de> Visitor<'de> for ElementsVisitor {
        type Value = Vec<&'de RawValue>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an array")
        }

        fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<Self::Value, S::Error> {
            let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(4));
            while let Some(raw) = seq.next_element::<&'de RawValue>()? {
                items.push(raw);
            }
            Ok(items)
        }
    }

    /// The error for a stored type name the event type does not know.
    pub fn unknown_event_type(event_type: &str) -> Error {
        Error::custom(format!("unknown event type {event_type:?}"))
    }

    fn kind(value: &Value) -> &'static str {
        match value {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Number(_) => "a number",
            Value::String(_) => "a string",
            Value::Array(_) => "an array",
            Value::Object(_) => "an object",
        }
    }
}

pub use aggregate::{Aggregate, Command, CommandEnvelope};
pub use clock::{Clock, TestClock};
pub use coordination::{
    default_owner, Claim, ClaimOutcome, ParkedEvent, ParkedStatus, ProcessInstance, ProcessState, Scheduled,
    SetAsideCommand, DEFAULT_CLAIM_RETRY, DEFAULT_CLAIM_TTL, MAX_FIRING_ATTEMPTS,
};
pub use decision::{Decider, Decision};
pub use dispatcher::{Consistency, DispatchError, DispatchOutcome, Dispatcher, DispatcherConfig, SnapshotPolicy};
pub use event::{
    DecodeError, DomainEvent, Envelope, FnUpcaster, Metadata, NewEvent, Payload, RecordedEvent, UpcastResult, Upcaster,
    Upcasters,
};
pub use handler::{
    current_claim, spawn_batch_handler, spawn_handler, BatchHandler, Checkpoints, ControlError, ErrorPolicy,
    EventHandler, HandlerControl, HandlerError, HandlerState, HandlerStatus, ParkedEvents, Placement, Progress,
    ProgressError, RunnerConfig, RunningHandler, StartFrom, DEFAULT_MAX_BATCH,
};
pub use ids::{CausationId, CommandId, CorrelationId, EventId, Position, StreamId, StreamIdError, Timestamp, Version};
pub use process::{
    spawn_process_manager, CommandRouter, CompensationRefused, Effects, ProcessAdmin, ProcessManager, Rejection,
    RepeatedStep, Route, RouteError, RunningProcess,
};
pub use query::{AppendCondition, Query, QueryItem, Tag, TagError};
pub use store::{
    AppendOutcome, AppendResult, Coordination, EventStore, ExpectedVersion, Snapshot, Store, StoreError, StreamAppend,
    DEFAULT_COMMAND_RETENTION, MAX_EVENTS_PER_APPEND, MAX_STREAMS_PER_APPEND,
};
pub use subscription::Subscription;
