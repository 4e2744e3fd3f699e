//! What the writer is asked to write: a queued append, and the names the SQL side gives its
//! parts. Shared by the writer and the single-append statements, which both read requests.

use cqrs_core::store::batching::QueuedWrite;
use cqrs_core::{
    AppendCondition, AppendOutcome, CommandId, ExpectedVersion, NewEvent, QueryItem, StoreError, StreamId, Tag,
};
use serde::Serialize;
use tokio::sync::oneshot;

/// One queued append and where to send its answer. The head of a chain
/// (`EventStore::append_chain`) carries the chain's other links in `followers`; the writer puts
/// them right after it in the batch, each marked `continues`.
pub(crate) struct AppendRequest {
    pub(crate) stream_id: StreamId,
    pub(crate) expected: ExpectedVersion,
    pub(crate) command_id: Option<CommandId>,
    pub(crate) events: Vec<NewEvent>,
    /// Checked after the command id and the version, under the batch's boundary locks.
    pub(crate) condition: Option<AppendCondition>,
    pub(crate) reply: oneshot::Sender<Result<AppendOutcome, StoreError>>,
    /// Written only if the append just before it (the previous link) was appended.
    pub(crate) continues: bool,
    pub(crate) followers: Vec<AppendRequest>,
}

impl QueuedWrite for AppendRequest {
    fn append_key(&self) -> Option<(&StreamId, Option<CommandId>)> {
        Some((&self.stream_id, self.command_id))
    }

    fn event_count(&self) -> usize {
        self.events.len() + self.followers.iter().map(|follower| follower.events.len()).sum::<usize>()
    }
}

/// A condition's query item as `cqrs_first_match` reads it.
#[derive(Serialize)]
pub(crate) struct ItemJson<'a> {
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    t: &'a [String],
    #[serde(skip_serializing_if = "<[Tag]>::is_empty")]
    g: &'a [Tag],
}

impl<'a> From<&'a QueryItem> for ItemJson<'a> {
    fn from(item: &'a QueryItem) -> Self {
        ItemJson { t: &item.types, g: &item.tags }
    }
}

/// An expected version as both batch functions name it.
pub(crate) fn expected_json(expected: ExpectedVersion) -> (&'static str, Option<u64>) {
    match expected {
        ExpectedVersion::Any => ("any", None),
        ExpectedVersion::NoStream => ("no_stream", None),
        ExpectedVersion::StreamExists => ("exists", None),
        ExpectedVersion::Exact(version) => ("exact", Some(version.0)),
    }
}
