//! [`Payload`]: a stored event's JSON, kept as the store returned it until something decodes it.

use std::fmt;
use std::ops::Index;
use std::sync::{Arc, OnceLock};

use serde::de::DeserializeOwned;
use serde_json::Value;

/// A recorded event's JSON payload.
///
/// SQL stores hand over the stored text as it is: nothing parses it until a handler or an
/// aggregate decodes it, and then it is parsed once, straight into the event type
/// ([`Payload::decode`]), never through a [`serde_json::Value`] first. The in-memory store keeps
/// the `Value` it was given and decodes from that. Either way a payload is decoded in one pass.
///
/// Text that is not JSON (a damaged row) is found when it is decoded: [`Payload::decode`] and
/// [`Payload::value`] return the parser's error, and a handler sees it as a
/// [`DecodeError::Payload`](crate::DecodeError::Payload) for that event.
///
/// Cloning is cheap (shared). `payload["key"]` reads a field as [`Value`] indexing does
/// (`Value::Null` when missing, or when the text is not JSON).
#[derive(Clone)]
pub struct Payload {
    repr: Repr,
    /// A text payload's value, once [`Payload::value`] parsed it (no allocation until then).
    parsed: OnceLock<Arc<Value>>,
}

/// One allocation per payload: the shared value, or the shared text.
#[derive(Clone)]
enum Repr {
    Value(Arc<Value>),
    Text(Arc<str>),
}

static NULL: Value = Value::Null;

impl Payload {
    /// A payload holding a value (the in-memory store's form).
    pub fn from_value(value: Value) -> Self {
        Self { repr: Repr::Value(Arc::new(value)), parsed: OnceLock::new() }
    }

    /// A payload holding JSON text as a store read it. The text is not checked here: it is
    /// parsed when decoded.
    pub fn from_json_text(text: impl Into<Arc<str>>) -> Self {
        Self { repr: Repr::Text(text.into()), parsed: OnceLock::new() }
    }

    /// Decodes the payload into `T` in one pass: from the stored text, or from the held value.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        match &self.repr {
            Repr::Value(value) => T::deserialize(&**value),
            Repr::Text(text) => match self.parsed.get() {
                Some(value) => T::deserialize(&**value),
                None => serde_json::from_str(text),
            },
        }
    }

    /// The payload as a [`Value`], parsed on first use and kept. For code that walks JSON
    /// it does not know the type of (upcasters, consoles); typed code should use
    /// [`Payload::decode`].
    pub fn value(&self) -> Result<&Value, serde_json::Error> {
        match &self.repr {
            Repr::Value(value) => Ok(value),
            Repr::Text(text) => {
                if let Some(value) = self.parsed.get() {
                    return Ok(value);
                }
                let value = Arc::new(serde_json::from_str(text)?);
                Ok(self.parsed.get_or_init(|| value))
            }
        }
    }

    /// The payload as JSON text: the stored text itself, or the held value written out.
    pub fn json(&self) -> std::borrow::Cow<'_, str> {
        match &self.repr {
            Repr::Value(value) => std::borrow::Cow::Owned(value.to_string()),
            Repr::Text(text) => std::borrow::Cow::Borrowed(text),
        }
    }

    /// The stored text, if the payload holds text (SQL stores), for code that splits it
    /// without parsing every value (the derive's field reader).
    pub(crate) fn text(&self) -> Option<&str> {
        match &self.repr {
            Repr::Value(_) => None,
            Repr::Text(text) => Some(text),
        }
    }

    /// The held value, if the payload holds one (the in-memory store, or text already parsed).
    pub(crate) fn held_value(&self) -> Option<&Value> {
        match &self.repr {
            Repr::Value(value) => Some(value),
            Repr::Text(_) => self.parsed.get().map(|value| &**value),
        }
    }
}

impl From<Value> for Payload {
    fn from(value: Value) -> Self {
        Self::from_value(value)
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.repr {
            Repr::Value(value) => fmt::Debug::fmt(value, f),
            Repr::Text(text) => match self.value() {
                Ok(value) => fmt::Debug::fmt(value, f),
                Err(_) => write!(f, "Payload(not JSON: {text:?})"),
            },
        }
    }
}

/// Two payloads are equal when their JSON values are; a payload that is not JSON equals only
/// the same text.
impl PartialEq for Payload {
    fn eq(&self, other: &Self) -> bool {
        if let (Some(a), Some(b)) = (self.text(), other.text()) {
            if a == b {
                return true;
            }
        }
        match (self.value(), other.value()) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        }
    }
}

impl PartialEq<Value> for Payload {
    fn eq(&self, other: &Value) -> bool {
        self.value().is_ok_and(|value| value == other)
    }
}

impl<'k> Index<&'k str> for Payload {
    type Output = Value;

    fn index(&self, key: &'k str) -> &Value {
        self.value().map_or(&NULL, |value| &value[key])
    }
}

impl Index<usize> for Payload {
    type Output = Value;

    fn index(&self, index: usize) -> &Value {
        self.value().map_or(&NULL, |value| &value[index])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_json::json;

    #[derive(Debug, PartialEq, Deserialize)]
    struct Sent {
        text: String,
        n: u64,
    }

    #[test]
    fn text_and_value_decode_alike() {
        let value = json!({"text": "hi \"there\"", "n": 7});
        let from_text = Payload::from_json_text(value.to_string());
        let copy = from_text.clone();
        let from_value = Payload::from_value(value.clone());
        let expected = Sent { text: "hi \"there\"".into(), n: 7 };
        assert_eq!(from_text.decode::<Sent>().expect("text"), expected);
        assert_eq!(from_value.decode::<Sent>().expect("value"), expected);
        assert_eq!(from_text, from_value);
        assert_eq!(from_text, value);
        assert_eq!(from_text["n"], json!(7));
        assert_eq!(from_text["missing"], Value::Null);
        // Parsed once and kept: later decodes read the kept value.
        assert!(from_text.held_value().is_some());
        assert_eq!(from_text.decode::<Sent>().expect("kept"), expected);
        // A clone made before the parse parses on its own, to the same value.
        assert!(copy.held_value().is_none());
        assert_eq!(copy.value().expect("copy"), from_text.value().expect("original"));
        assert_eq!(from_value.json(), value.to_string());
    }

    #[test]
    fn text_that_is_not_json_fails_when_decoded() {
        let broken = Payload::from_json_text("{not json");
        assert!(broken.decode::<Sent>().is_err());
        assert!(broken.value().is_err());
        assert_eq!(broken["text"], Value::Null);
        assert_eq!(broken.json(), "{not json");
        assert_ne!(broken, Payload::from_value(json!({})));
        assert_eq!(broken, Payload::from_json_text("{not json"));
        assert!(format!("{broken:?}").contains("not JSON"));
    }
}
