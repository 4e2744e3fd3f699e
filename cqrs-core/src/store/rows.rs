//! For store implementors: decoding rows.

use std::sync::Arc;

use crate::ids::StreamId;
use crate::store::StoreError;

/// For event stores: shares the stream id and event type between the consecutive rows of one
/// read. A page of events often holds runs of one stream and one type; a repeat costs a string
/// comparison instead of an allocation (and, for the stream id, its check).
#[derive(Debug, Default)]
pub struct RowNames {
    stream_id: Option<StreamId>,
    event_type: Option<Arc<str>>,
}

impl RowNames {
    /// The stream id stored in a row: the previous row's when equal, else checked and kept. A
    /// stored id that is not a valid [`StreamId`] is [`StoreError::Corrupt`].
    pub fn stream_id(&mut self, stored: &str) -> Result<StreamId, StoreError> {
        if let Some(previous) = &self.stream_id {
            if previous.as_str() == stored {
                return Ok(previous.clone());
            }
        }
        let stream_id = StreamId::new(stored)
            .map_err(|error| StoreError::Corrupt(format!("stored stream id {stored:?}: {error}")))?;
        Ok(self.stream_id.insert(stream_id).clone())
    }

    /// The event type stored in a row: the previous row's when equal, else kept.
    pub fn event_type(&mut self, stored: &str) -> Arc<str> {
        match &self.event_type {
            Some(previous) if **previous == *stored => Arc::clone(previous),
            _ => Arc::clone(self.event_type.insert(Arc::from(stored))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_names_share_repeats_and_refuse_a_bad_stream_id() {
        let mut names = RowNames::default();
        let first = names.event_type("MessageSent");
        assert!(Arc::ptr_eq(&first, &names.event_type("MessageSent")), "a repeat is shared");
        let other = names.event_type("MessageEdited");
        assert_eq!(&*other, "MessageEdited");
        assert!(!Arc::ptr_eq(&first, &names.event_type("MessageSent")), "only the previous row's is kept");
        assert_eq!(names.stream_id("chat-1").expect("valid").as_str(), "chat-1");
        assert_eq!(names.stream_id("chat-2").expect("valid").as_str(), "chat-2");
        assert!(matches!(names.stream_id(""), Err(StoreError::Corrupt(_))));
    }
}
