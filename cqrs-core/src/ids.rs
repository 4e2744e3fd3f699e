//! Identifiers, versions and positions: small newtypes so that a stream id is never confused
//! with an event type, nor a per-stream version with a global position.

use std::fmt;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The longest stream id accepted, in bytes.
pub const MAX_STREAM_ID_BYTES: usize = 256;

/// Why a string was refused as a [`StreamId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StreamIdError {
    /// The id was empty; give the stream a name.
    #[error("stream id is empty")]
    Empty,
    /// The id was longer than [`MAX_STREAM_ID_BYTES`]; use a shorter key (a UUID fits).
    #[error("stream id is {len} bytes, longer than the limit of {max} bytes")]
    TooLong {
        /// Length of the refused id, in bytes.
        len: usize,
        /// The limit, [`MAX_STREAM_ID_BYTES`].
        max: usize,
    },
    /// The id contained a control character.
    #[error("stream id contains a control character")]
    ControlCharacter,
}

/// The identity of one event stream, which holds the events of one aggregate instance.
///
/// By convention an aggregate's streams are named `{category}-{id}` (see
/// [`StreamId::for_aggregate`]), so handlers can select a category by prefix. Cloning is cheap
/// (the string is shared).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct StreamId(Arc<str>);

impl StreamId {
    /// Checks and wraps a stream id: non-empty, at most [`MAX_STREAM_ID_BYTES`], no control
    /// characters.
    pub fn new(id: impl AsRef<str>) -> Result<Self, StreamIdError> {
        let id = id.as_ref();
        if id.is_empty() {
            return Err(StreamIdError::Empty);
        }
        if id.len() > MAX_STREAM_ID_BYTES {
            return Err(StreamIdError::TooLong { len: id.len(), max: MAX_STREAM_ID_BYTES });
        }
        if id.chars().any(char::is_control) {
            return Err(StreamIdError::ControlCharacter);
        }
        Ok(Self(Arc::from(id)))
    }

    /// The stream of aggregate instance `id` in `category`: `"{category}-{id}"`.
    pub fn for_aggregate(category: &str, id: impl fmt::Display) -> Result<Self, StreamIdError> {
        Self::new(format!("{category}-{id}"))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The category: the part before the first `-`, or the whole id if there is none.
    pub fn category(&self) -> &str {
        self.0.split_once('-').map_or(&self.0, |(category, _)| category)
    }

    /// The instance's id within its category: the part after the first `-` (`"42"` in
    /// `"account-42"`), or `""` if there is none.
    ///
    /// ```
    /// # use cqrs_core::StreamId;
    /// let stream = StreamId::for_aggregate("order", "2026-0001")?;
    /// assert_eq!((stream.category(), stream.aggregate_id()), ("order", "2026-0001"));
    /// # Ok::<(), cqrs_core::StreamIdError>(())
    /// ```
    pub fn aggregate_id(&self) -> &str {
        self.0.split_once('-').map_or("", |(_, id)| id)
    }
}

impl<'de> Deserialize<'de> for StreamId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        StreamId::new(raw).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StreamId({:?})", &*self.0)
    }
}

impl AsRef<str> for StreamId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// A version within one stream. The first event of a stream has version 1; `Version(0)` means
/// "the stream has no events".
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Version(pub u64);

impl Version {
    /// The version of a stream that has no events.
    pub const NONE: Version = Version(0);

    /// The next version.
    #[must_use]
    pub fn next(self) -> Version {
        Version(self.0 + 1)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}", self.0)
    }
}

impl fmt::Debug for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Version({})", self.0)
    }
}

/// A position in the global log of all events, in commit order across streams.
///
/// Positions strictly increase in the order readers see events; they may have gaps (a store may
/// burn numbers on rolled-back transactions). `Position(0)` is "before the first event", so a
/// reader that starts after `Position::START` sees everything.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Position(pub u64);

impl Position {
    /// Before the first event.
    pub const START: Position = Position(0);
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "@{}", self.0)
    }
}

impl fmt::Debug for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Position({})", self.0)
    }
}

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A fresh id: a UUID v7 (a millisecond timestamp, then random bits), so that ids
            /// made one after another sort one after another and a store's unique index on
            /// them takes each new one next to the last instead of on a random page.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }

        impl From<Uuid> for $name {
            fn from(id: Uuid) -> Self {
                Self(id)
            }
        }
    };
}

uuid_id!(
    /// The unique id of one stored event.
    EventId
);
uuid_id!(
    /// The id of one command. Dispatching the same command id twice to the same stream has the
    /// effect of dispatching it once (idempotency key).
    CommandId
);
uuid_id!(
    /// Groups every command and event that stems from one original request.
    CorrelationId
);
uuid_id!(
    /// The id of the message (command or event) that directly caused this one.
    CausationId
);

/// The namespace of [`CommandId::derived`] ids (a fixed random UUID: derived ids never collide
/// with another system's v5 ids of the same input).
const DERIVED_COMMAND_NAMESPACE: Uuid = Uuid::from_u128(0x8f0e_4a5c_93d1_4c6e_b7a2_5e1f_0c9d_3a47);

impl CommandId {
    /// The id of the command that reacting to event `cause` at `step` sends: a name-based
    /// (v5) UUID of the two, the same on every call.
    ///
    /// This is what makes a follow-up command safe under at-least-once delivery: a handler (or
    /// process manager) that sees the same event again dispatches the same id again, and the
    /// store answers it as a duplicate. `step` tells apart the commands sent for one event
    /// (and the handlers that send them): `"billing:charge-card"`, `"stock:reserve-line-2"`.
    ///
    /// ```
    /// # use cqrs_core::{CommandId, EventId};
    /// let event = EventId::new();
    /// assert_eq!(CommandId::derived(event, "charge"), CommandId::derived(event, "charge"));
    /// assert_ne!(CommandId::derived(event, "charge"), CommandId::derived(event, "refund"));
    /// assert_ne!(CommandId::derived(event, "charge"), CommandId::derived(EventId::new(), "charge"));
    /// ```
    pub fn derived(cause: EventId, step: &str) -> Self {
        let mut name = Vec::with_capacity(16 + step.len());
        name.extend_from_slice(cause.0.as_bytes());
        name.extend_from_slice(step.as_bytes());
        Self(Uuid::new_v5(&DERIVED_COMMAND_NAMESPACE, &name))
    }
}

impl From<CommandId> for CausationId {
    fn from(id: CommandId) -> Self {
        Self(id.0)
    }
}

impl From<EventId> for CausationId {
    fn from(id: EventId) -> Self {
        Self(id.0)
    }
}

/// A wall-clock time in microseconds since the Unix epoch, as recorded by the store.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// The current time according to the system clock.
    pub fn now() -> Self {
        let micros = match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(elapsed) => i64::try_from(elapsed.as_micros()).unwrap_or(i64::MAX),
            Err(before) => -i64::try_from(before.duration().as_micros()).unwrap_or(i64::MAX),
        };
        Self(micros)
    }

    /// Microseconds since the Unix epoch.
    pub fn as_micros(self) -> i64 {
        self.0
    }

    /// The time `duration` before this one (saturating at the earliest representable time).
    #[must_use]
    pub fn minus(self, duration: std::time::Duration) -> Self {
        Self(self.0.saturating_sub(i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)))
    }

    /// The time `duration` after this one (saturating).
    #[must_use]
    pub fn plus(self, duration: std::time::Duration) -> Self {
        Self(self.0.saturating_add(i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)))
    }
}

/// In UTC, to the second: `2026-12-07 13:30:05 UTC`.
impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let seconds = self.0.div_euclid(1_000_000);
        let (days, secs_of_day) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
        // Howard Hinnant's civil_from_days.
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        let (hours, minutes, secs) = (secs_of_day / 3600, secs_of_day % 3600 / 60, secs_of_day % 60);
        write!(f, "{year:04}-{month:02}-{day:02} {hours:02}:{minutes:02}:{secs:02} UTC")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_id_rejects_bad_input() {
        assert_eq!(StreamId::new(""), Err(StreamIdError::Empty));
        assert!(matches!(StreamId::new("x".repeat(257)), Err(StreamIdError::TooLong { len: 257, .. })));
        assert_eq!(StreamId::new("a\nb"), Err(StreamIdError::ControlCharacter));
        let id = StreamId::for_aggregate("account", 42).expect("valid id");
        assert_eq!(id.as_str(), "account-42");
        assert_eq!(id.category(), "account");
        assert_eq!(id.aggregate_id(), "42");
        assert_eq!(StreamId::new("solo").expect("valid").aggregate_id(), "");
    }

    #[test]
    fn stream_id_deserialization_validates() {
        assert!(serde_json::from_str::<StreamId>("\"\"").is_err());
        let id: StreamId = serde_json::from_str("\"chat-1\"").expect("valid json id");
        assert_eq!(id.as_str(), "chat-1");
    }
}
