//! Loading an instance: its latest snapshot, then the events after it; saving snapshots.

use super::slots::Instance;
use super::{DispatchError, Dispatcher};
use crate::aggregate::Aggregate;
use crate::ids::{StreamId, Version};
use crate::store::{EventStore, Snapshot, StoreError};

impl<A: Aggregate, S: EventStore + ?Sized> Dispatcher<A, S> {
    /// Reads the events after the instance's version and applies them (starting from the
    /// latest snapshot when the instance is empty and snapshots are on).
    pub(super) async fn catch_up(
        &self,
        stream_id: &StreamId,
        instance: &mut Instance<A>,
    ) -> Result<(), DispatchError<A::Error>> {
        if instance.version == Version::NONE {
            self.restore_snapshot(stream_id, instance).await?;
        }
        loop {
            let page = self.store.read_stream(stream_id, instance.version.next(), self.config.load_page_size).await?;
            let page_len = page.len();
            for recorded in &page {
                if recorded.version != instance.version.next() {
                    return Err(StoreError::Corrupt(format!(
                        "{stream_id}: read {} while expecting {}",
                        recorded.version,
                        instance.version.next()
                    ))
                    .into());
                }
                let event = self.upcasters.decode_payload::<A::Event>(recorded)?;
                let loaded = instance.loaded;
                instance.evolve(|state| state.apply(&event), recorded.version);
                instance.loaded = loaded;
            }
            if page_len < self.config.load_page_size.max(1) {
                instance.loaded = true;
                return Ok(());
            }
        }
    }

    pub(super) async fn restore_snapshot(
        &self,
        stream_id: &StreamId,
        instance: &mut Instance<A>,
    ) -> Result<(), DispatchError<A::Error>> {
        let Some(policy) = &self.snapshots else { return Ok(()) };
        let Some(snapshot) = self.store.load_snapshot(stream_id).await? else { return Ok(()) };
        if snapshot.schema_version != policy.schema_version {
            tracing::debug!(%stream_id, stored = snapshot.schema_version, "ignoring snapshot of another schema version");
            return Ok(());
        }
        match (policy.decode)(&snapshot.state) {
            Ok(state) => {
                instance.state = state;
                instance.version = snapshot.version;
            }
            Err(error) => tracing::warn!(%stream_id, %error, "ignoring undecodable snapshot; replaying the stream"),
        }
        Ok(())
    }

    /// Saves a snapshot if the instance's version crossed a multiple of the policy's interval.
    /// A failure only costs load time later, so it is logged, not returned.
    pub(super) async fn maybe_snapshot(&self, stream_id: &StreamId, previous: Version, instance: &Instance<A>) {
        let Some(policy) = &self.snapshots else { return };
        if instance.version.0 / policy.every == previous.0 / policy.every {
            return;
        }
        let state = match (policy.encode)(&instance.state) {
            Ok(state) => state,
            Err(error) => return tracing::warn!(%stream_id, %error, "cannot serialize snapshot"),
        };
        let snapshot = Snapshot {
            stream_id: stream_id.clone(),
            version: instance.version,
            schema_version: policy.schema_version,
            state,
        };
        if let Err(error) = self.store.save_snapshot(snapshot).await {
            tracing::warn!(%stream_id, %error, "saving snapshot failed");
        }
    }
}
