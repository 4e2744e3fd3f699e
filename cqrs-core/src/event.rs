//! Events: the [`DomainEvent`] trait, the metadata every event carries, the raw
//! [`NewEvent`]/[`RecordedEvent`] forms that stores keep, the typed [`Envelope`] that handlers
//! see, and the [`Upcasters`] that bring old stored shapes up to date.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

mod payload;

pub use payload::Payload;

use crate::ids::{CausationId, CommandId, CorrelationId, EventId, Position, StreamId, Timestamp, Version};
use crate::query::Tag;

/// A domain event: a type with a stable stored name per variant and a schema version, decoded
/// from the store by that name.
///
/// Derive it (feature `derive`, on by default): each name is then written once.
///
/// ```
/// use cqrs_core::{DomainEvent, Payload};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
/// #[event(category = "account")]
/// enum AccountEvent {
///     #[event(name = "AccountOpened")]
///     Opened { owner: String },
///     #[event(name = "MoneyDeposited", version = 2)]
///     Deposited { amount_cents: u64 },
/// }
///
/// let deposit = AccountEvent::Deposited { amount_cents: 5 };
/// assert_eq!(deposit.event_type(), "MoneyDeposited");
/// assert_eq!(deposit.schema_version(), 2);
/// assert_eq!(AccountEvent::EVENT_TYPES, ["AccountOpened", "MoneyDeposited"]);
/// // The payload is the variant's content; the stored name says which variant it is.
/// let payload = deposit.encode()?;
/// assert_eq!(payload, serde_json::json!({ "amount_cents": 5 }));
/// assert_eq!(AccountEvent::decode("MoneyDeposited", &Payload::from_value(payload))?, deposit);
/// // A SQL store hands over the stored text, parsed once, straight into the variant.
/// let stored = Payload::from_json_text(r#"{"amount_cents":5}"#);
/// assert_eq!(AccountEvent::decode("MoneyDeposited", &stored)?, deposit);
/// // Handlers take an event only from streams of its aggregate's category.
/// assert!(AccountEvent::accepts("account", "AccountOpened"));
/// assert!(!AccountEvent::accepts("door", "AccountOpened"));
/// # Ok::<(), serde_json::Error>(())
/// ```
///
/// The attributes: on the enum, `#[event(category = "...")]` (required: the stream category of
/// the aggregate that emits these events, `"*"` for any) and optionally `version = N` (the
/// default schema version); on a variant, `name = "..."` (default: the variant's name),
/// `version = N` and `category = "..."`. The stored name is the contract: keep it stable
/// forever, and the Rust variant can be renamed freely, because stored events are decoded by
/// the name stored with them. A newtype variant `Opened(Opened)` stores the inner value as
/// serde writes it (with all its serde attributes); a struct variant stores one key per field.
/// When the shape of an event changes, raise its `version` and register an [`Upcaster`] that
/// turns the old stored JSON into the new shape. The derive also works on a struct, which is
/// then the one event type (`#[event(name = "...", category = "...")]` on the struct).
///
/// # Writing it by hand
///
/// Hand-written impls give [`EVENT_TYPES`](DomainEvent::EVENT_TYPES) and
/// [`event_type`](DomainEvent::event_type), and by default store the value as serde writes it
/// and decode it with serde (so the serde representation, not the stored name, picks the
/// variant) and accept the event types in any stream category. Override
/// [`encode`](DomainEvent::encode), [`decode`](DomainEvent::decode) and
/// [`accepts`](DomainEvent::accepts) to get what the derive does. The dispatcher refuses to
/// store an event whose type name is missing from `EVENT_TYPES` (handlers would never see it).
pub trait DomainEvent: Serialize + DeserializeOwned + Clone + fmt::Debug + Send + Sync + 'static {
    /// Every name [`event_type`](DomainEvent::event_type) can return.
    const EVENT_TYPES: &'static [&'static str];

    /// The stable stored name of this event.
    fn event_type(&self) -> &'static str;

    /// The schema version this code writes for this event. Starts at 1.
    fn schema_version(&self) -> u32 {
        1
    }

    /// Whether a stored event named `event_type`, in a stream of `category`, is one of this
    /// type's events: what handlers of this type subscribe to. By default, any of
    /// [`EVENT_TYPES`](DomainEvent::EVENT_TYPES) in any category; the derive also checks the
    /// category.
    fn accepts(category: &str, event_type: &str) -> bool {
        let _ = category;
        Self::EVENT_TYPES.contains(&event_type)
    }

    /// The [`Tag`]s stored with this event, which place it in the consistency boundaries that
    /// [`Query`](crate::Query)s select (`course:c1`, `student:s7`). By default none; the derive
    /// collects the fields marked `#[event(tag = "kind")]` and the tags of a
    /// `#[event(tags = path)]` function.
    fn tags(&self) -> Vec<Tag> {
        Vec::new()
    }

    /// The payload to store. By default, the value as serde writes it.
    fn encode(&self) -> Result<Value, serde_json::Error> {
        serde_json::to_value(self)
    }

    /// The event from a stored (and upcast) payload and its stored type name. By default,
    /// serde reads the payload in one pass ([`Payload::decode`]) and the name is not consulted.
    fn decode(event_type: &str, payload: &Payload) -> Result<Self, serde_json::Error> {
        let _ = event_type;
        payload.decode()
    }
}

/// Metadata carried by every event: where it came from and what it belongs to.
///
/// The dispatcher fills it in from the [`CommandEnvelope`](crate::CommandEnvelope):
/// `command_id` is the command that produced the event, `causation_id` is what caused that
/// command (the triggering event's id for a command made with [`Envelope::cause`]; `None` for
/// a command from outside), and `correlation_id` is inherited from the command (which inherits
/// it from the event that caused it). So a chain of steps can be followed backwards: event →
/// its `command_id` → that command's cause, stored as the event's `causation_id` → the event
/// before it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// The command whose handling produced this event.
    pub command_id: Option<CommandId>,
    /// What caused the command that produced this event: an event id for a follow-up command,
    /// `None` for a command from outside.
    pub causation_id: Option<CausationId>,
    /// The conversation this event belongs to.
    pub correlation_id: Option<CorrelationId>,
    /// Free-form application headers (user id, tenant, trace id...). Keep them small.
    #[serde(default, skip_serializing_if = "HashMap::is_empty")]
    pub headers: HashMap<String, String>,
}

/// An event ready to append: serialized, with its id and metadata, but not yet given a version
/// or position.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// Unique id of the event; stores reject a duplicate.
    pub event_id: EventId,
    /// Stable event name, from [`DomainEvent::event_type`].
    pub event_type: String,
    /// Schema version of `payload`.
    pub schema_version: u32,
    /// The serialized event.
    pub payload: Value,
    /// Where the event came from.
    pub metadata: Metadata,
    /// The tags stored with the event (see [`DomainEvent::tags`]).
    pub tags: Vec<Tag>,
}

impl NewEvent {
    /// Encodes a domain event ([`DomainEvent::encode`]) with a fresh id and the given metadata.
    pub fn from_domain<E: DomainEvent>(event: &E, metadata: Metadata) -> Result<Self, serde_json::Error> {
        Ok(Self {
            event_id: EventId::new(),
            event_type: event.event_type().to_owned(),
            schema_version: event.schema_version(),
            payload: event.encode()?,
            metadata,
            tags: event.tags(),
        })
    }
}

/// An event as stored: the raw payload plus everything the store assigned.
///
/// Cloning is cheap: the stream id, event type and payload are shared.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedEvent {
    /// Unique id of the event.
    pub event_id: EventId,
    /// The stream the event belongs to.
    pub stream_id: StreamId,
    /// Version within the stream: 1 for the first event, then contiguous.
    pub version: Version,
    /// Position in the global log; strictly increasing in read order.
    pub position: Position,
    /// When the store recorded the event.
    pub recorded_at: Timestamp,
    /// Stable event name.
    pub event_type: Arc<str>,
    /// Schema version of `payload` as stored (before upcasting).
    pub schema_version: u32,
    /// The serialized event, as the store returned it: decoded in one pass when read.
    pub payload: Payload,
    /// Where the event came from.
    pub metadata: Arc<Metadata>,
    /// The tags stored with the event.
    pub tags: Arc<[Tag]>,
}

impl RecordedEvent {
    /// Starts a command caused by this event at `step` (see [`Envelope::cause`]).
    pub fn cause<C>(&self, step: &str, command: C) -> crate::CommandEnvelope<C> {
        crate::CommandEnvelope::new(command).caused_by(self.event_id, &self.metadata, step)
    }

    /// The category of the event's stream (see [`StreamId::category`]).
    pub fn category(&self) -> &str {
        self.stream_id.category()
    }
}

/// A decoded event with its envelope: what handlers and tests see.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope<E> {
    /// The decoded (and upcast) event.
    pub event: E,
    /// Unique id of the event.
    pub event_id: EventId,
    /// The stream the event belongs to.
    pub stream_id: StreamId,
    /// Version within the stream.
    pub version: Version,
    /// Position in the global log.
    pub position: Position,
    /// When the store recorded the event.
    pub recorded_at: Timestamp,
    /// Where the event came from.
    pub metadata: Arc<Metadata>,
}

impl<E> Envelope<E> {
    /// Starts a command caused by this event, for a handler that reacts to it.
    ///
    /// The command's id is [`CommandId::derived`] from this event's id and `step`, so when the
    /// event is delivered again (delivery is at least once), the same command id is dispatched
    /// again and the store answers it as a duplicate: the follow-up is applied once. Give each
    /// command a handler sends for one event its own `step` (for example
    /// `"billing:charge-card"`), and two handlers reacting to the same event different steps.
    /// Causation (this event's id) and correlation (this event's) flow on to the command and
    /// its events, and so do this event's headers.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use cqrs_core::{CommandId, Envelope, EventId, Metadata, Position, StreamId, Timestamp, Version};
    /// # let envelope = Envelope { event: (), event_id: EventId::new(), stream_id: StreamId::new("order-1").unwrap(),
    /// #     version: Version(1), position: Position(1), recorded_at: Timestamp::now(), metadata: Arc::default() };
    /// let first = envelope.cause("shipping:reserve", "reserve order-1");
    /// let redelivered = envelope.cause("shipping:reserve", "reserve order-1");
    /// assert_eq!(first.command_id, redelivered.command_id);
    /// assert_eq!(first.command_id, CommandId::derived(envelope.event_id, "shipping:reserve"));
    /// assert_ne!(first.command_id, envelope.cause("billing:charge", "charge").command_id);
    /// ```
    pub fn cause<C>(&self, step: &str, command: C) -> crate::CommandEnvelope<C> {
        crate::CommandEnvelope::new(command).caused_by(self.event_id, &self.metadata, step)
    }

    /// The category of the event's stream (see [`StreamId::category`]).
    pub fn category(&self) -> &str {
        self.stream_id.category()
    }
}

/// Why a stored event could not be decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The payload did not match the event type after upcasting. The stored data or the event
    /// type changed without an upcaster; add one.
    #[error("cannot decode event {event_type} (schema v{schema_version}) at {position}: {source}")]
    Payload {
        /// Stored event name.
        event_type: String,
        /// Schema version after upcasting.
        schema_version: u32,
        /// Position of the event.
        position: Position,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
    /// An upcaster refused the stored payload.
    #[error("upcaster for {event_type} v{schema_version} failed: {message}")]
    Upcast {
        /// Stored event name.
        event_type: String,
        /// Schema version the upcaster was given.
        schema_version: u32,
        /// What the upcaster reported.
        message: String,
    },
}

/// Turns one stored (event type, schema version) shape into the next one.
///
/// Upcasters run on every read path (dispatcher loads, handlers, subscriptions) before the
/// payload is deserialized, so the domain code only ever sees the current shape.
pub trait Upcaster: Send + Sync + 'static {
    /// The stored event name this upcaster reads.
    fn event_type(&self) -> &str;
    /// The schema version it reads; it produces `source_version + 1` (or renames the type).
    fn source_version(&self) -> u32;
    /// Rewrites the payload; may also return a new event type name.
    fn upcast(&self, payload: Value) -> Result<UpcastResult, String>;
}

/// What an [`Upcaster`] produced.
#[derive(Debug, Clone, PartialEq)]
pub struct UpcastResult {
    /// The event type after upcasting (usually unchanged).
    pub event_type: String,
    /// The payload in the next schema version.
    pub payload: Value,
}

/// An upcaster made from a closure: `(event type, from version, fn(Value) -> Value)`.
pub struct FnUpcaster<F> {
    event_type: String,
    from_version: u32,
    upcast: F,
}

impl<F> FnUpcaster<F>
where
    F: Fn(Value) -> Result<Value, String> + Send + Sync + 'static,
{
    /// An upcaster for `event_type` at `from_version` that keeps the type name.
    pub fn new(event_type: impl Into<String>, from_version: u32, upcast: F) -> Self {
        Self { event_type: event_type.into(), from_version, upcast }
    }
}

impl<F> Upcaster for FnUpcaster<F>
where
    F: Fn(Value) -> Result<Value, String> + Send + Sync + 'static,
{
    fn event_type(&self) -> &str {
        &self.event_type
    }
    fn source_version(&self) -> u32 {
        self.from_version
    }
    fn upcast(&self, payload: Value) -> Result<UpcastResult, String> {
        Ok(UpcastResult { event_type: self.event_type.clone(), payload: (self.upcast)(payload)? })
    }
}

/// A chain of [`Upcaster`]s, applied step by step until none matches. Cheap to clone.
#[derive(Clone, Default)]
pub struct Upcasters {
    by_key: Arc<HashMap<(String, u32), Arc<dyn Upcaster>>>,
}

impl fmt::Debug for Upcasters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upcasters").field("count", &self.by_key.len()).finish()
    }
}

/// The most upcasting steps applied to one event: a guard against an upcaster cycle.
const MAX_UPCAST_STEPS: u32 = 64;

impl Upcasters {
    /// No upcasters.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an upcaster; a later one for the same (type, version) replaces the earlier.
    #[must_use]
    pub fn with(self, upcaster: impl Upcaster) -> Self {
        let mut by_key: HashMap<_, _> = (*self.by_key).clone();
        by_key.insert(
            (upcaster.event_type().to_owned(), upcaster.source_version()),
            Arc::new(upcaster) as Arc<dyn Upcaster>,
        );
        Self { by_key: Arc::new(by_key) }
    }

    /// Decodes a stored event into `E`, upcasting the payload first if its schema is old.
    pub fn decode<E: DomainEvent>(&self, recorded: &RecordedEvent) -> Result<Envelope<E>, DecodeError> {
        let event = self.decode_payload::<E>(recorded)?;
        Ok(Envelope {
            event,
            event_id: recorded.event_id,
            stream_id: recorded.stream_id.clone(),
            version: recorded.version,
            position: recorded.position,
            recorded_at: recorded.recorded_at,
            metadata: Arc::clone(&recorded.metadata),
        })
    }

    /// Decodes only the payload of a stored event, upcasting first. The event is decoded by
    /// its stored (and upcast) type name ([`DomainEvent::decode`]).
    pub fn decode_payload<E: DomainEvent>(&self, recorded: &RecordedEvent) -> Result<E, DecodeError> {
        let current = self.upcast(recorded)?;
        E::decode(&current.event_type, &current.payload).map_err(|source| DecodeError::Payload {
            event_type: current.event_type.to_string(),
            schema_version: current.schema_version,
            position: current.position,
            source,
        })
    }

    /// The stored event in its current shape: type, schema version and payload after every
    /// matching upcaster. Cheap when no upcaster applies (the payload is shared). Handlers use
    /// it to decide interest by the *current* type, since an upcaster may rename an event.
    ///
    /// After an upcaster for `(type, v)` ran, the chain continues with the upcaster for
    /// `(its result's type, v + 1)`: a renamed event keeps counting versions from where it was.
    pub fn upcast(&self, recorded: &RecordedEvent) -> Result<RecordedEvent, DecodeError> {
        let mut event_type = recorded.event_type.to_string();
        let mut version = recorded.schema_version;
        let Some(first_step) = self.by_key.get(&(event_type.clone(), version)) else {
            return Ok(recorded.clone());
        };
        let mut payload = recorded
            .payload
            .value()
            .map_err(|source| DecodeError::Payload {
                event_type: event_type.clone(),
                schema_version: version,
                position: recorded.position,
                source,
            })?
            .clone();
        let mut step = Some(Arc::clone(first_step));
        let mut steps = 0;
        while let Some(upcaster) = step {
            steps += 1;
            if steps > MAX_UPCAST_STEPS {
                let message = "too many upcasting steps (cycle?)".to_owned();
                return Err(DecodeError::Upcast { event_type, schema_version: version, message });
            }
            let result = upcaster.upcast(payload).map_err(|message| DecodeError::Upcast {
                event_type: event_type.clone(),
                schema_version: version,
                message,
            })?;
            event_type = result.event_type;
            payload = result.payload;
            version += 1;
            step = self.by_key.get(&(event_type.clone(), version)).cloned();
        }
        Ok(RecordedEvent {
            event_type: Arc::from(event_type),
            schema_version: version,
            payload: Payload::from_value(payload),
            ..recorded.clone()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(tag = "type")]
    enum Ev {
        Renamed { full_name: String },
    }

    impl DomainEvent for Ev {
        const EVENT_TYPES: &'static [&'static str] = &["Renamed"];
        fn event_type(&self) -> &'static str {
            "Renamed"
        }
        fn schema_version(&self) -> u32 {
            3
        }
    }

    fn recorded(schema_version: u32, payload: Value) -> RecordedEvent {
        RecordedEvent {
            event_id: EventId::new(),
            stream_id: StreamId::new("person-1").expect("valid"),
            version: Version(1),
            position: Position(7),
            recorded_at: Timestamp::now(),
            event_type: Arc::from("Renamed"),
            schema_version,
            payload: Payload::from_value(payload),
            metadata: Arc::default(),
            tags: Arc::from([]),
        }
    }

    fn upcasters() -> Upcasters {
        // v1 had `name`, v2 had `first` + `last`, v3 has `full_name`.
        Upcasters::new()
            .with(FnUpcaster::new("Renamed", 1, |mut v: Value| {
                let name = v["name"].take();
                Ok(json!({"type": "Renamed", "first": name, "last": ""}))
            }))
            .with(FnUpcaster::new("Renamed", 2, |v: Value| {
                let first = v["first"].as_str().ok_or("first missing")?;
                let last = v["last"].as_str().ok_or("last missing")?;
                Ok(json!({"type": "Renamed", "full_name": format!("{first} {last}").trim().to_owned()}))
            }))
    }

    #[test]
    fn upcasts_through_every_step() {
        let old = recorded(1, json!({"type": "Renamed", "name": "Ada"}));
        let current = upcasters().upcast(&old).expect("upcast");
        assert_eq!((&*current.event_type, current.schema_version), ("Renamed", 3));
        let envelope = upcasters().decode::<Ev>(&old).expect("upcast");
        assert_eq!(envelope.event, Ev::Renamed { full_name: "Ada".into() });
        assert_eq!(envelope.position, Position(7));

        let middle = recorded(2, json!({"type": "Renamed", "first": "Ada", "last": "Lovelace"}));
        assert_eq!(
            upcasters().decode_payload::<Ev>(&middle).expect("upcast"),
            Ev::Renamed { full_name: "Ada Lovelace".into() }
        );
    }

    #[test]
    fn current_schema_needs_no_upcaster() {
        let current = recorded(3, json!({"type": "Renamed", "full_name": "Grace"}));
        assert_eq!(
            Upcasters::new().decode_payload::<Ev>(&current).expect("decode"),
            Ev::Renamed { full_name: "Grace".into() }
        );
    }

    #[test]
    fn upcaster_errors_and_bad_payloads_are_typed() {
        let broken = recorded(2, json!({"type": "Renamed"}));
        assert!(matches!(
            upcasters().decode_payload::<Ev>(&broken),
            Err(DecodeError::Upcast { schema_version: 2, .. })
        ));
        let garbage = recorded(3, json!({"type": "Renamed", "full_name": 5}));
        assert!(matches!(upcasters().decode_payload::<Ev>(&garbage), Err(DecodeError::Payload { .. })));
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, crate::DomainEvent)]
    #[event(category = "*")]
    enum Shapes {
        Named { text: String, n: u64, note: Option<String> },
        Pair(String, u64),
        Inner(Vec<u32>),
        Unit,
    }

    /// The derive reads stored text without building a `Value`: each shape decodes from text as
    /// from the value, and a malformed payload is a typed error, never a panic.
    #[test]
    fn derived_events_decode_from_stored_text_as_from_values() {
        let cases = [
            Shapes::Named { text: "a \"quoted\" \u{e9}".into(), n: 3, note: Some("x".into()) },
            Shapes::Named { text: String::new(), n: 0, note: None },
            Shapes::Pair("p".into(), 9),
            Shapes::Inner(vec![1, 2, 3]),
            Shapes::Unit,
        ];
        for event in cases {
            let value = event.encode().expect("encode");
            let text = Payload::from_json_text(value.to_string());
            assert_eq!(Shapes::decode(event.event_type(), &text).expect("from text"), event);
            assert_eq!(Shapes::decode(event.event_type(), &Payload::from_value(value)).expect("from value"), event);
        }
        let decode = |event_type: &str, text: &str| Shapes::decode(event_type, &Payload::from_json_text(text));
        // An absent Option field reads as None; an escaped key is still found; of repeated keys
        // the last counts, as in a Value; unknown keys are passed over.
        assert_eq!(
            decode("Named", r#"{"n": 1, "te\u0078t": "t", "n": 2, "extra": [1, {"a": 2}]}"#).expect("decode"),
            Shapes::Named { text: "t".into(), n: 2, note: None }
        );
        for (event_type, text) in [
            ("Named", r#"{"text": "t"}"#),
            ("Named", r#"["t", 1]"#),
            ("Named", r#"{"text": "t", "n": -1}"#),
            ("Named", r#"{"text": "t", "n": 1"#),
            ("Named", r#"{"text": "t", "n": 1} trailing"#),
            ("Pair", r#"["p"]"#),
            ("Pair", r#"["p", 1, 2]"#),
            ("Pair", r#"{"0": "p"}"#),
            ("Inner", "[1, -2]"),
            ("Nope", "{}"),
            ("Named", "{not json"),
        ] {
            assert!(decode(event_type, text).is_err(), "{event_type} {text} should not decode");
        }
    }
}
