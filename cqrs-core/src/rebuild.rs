//! Projections rebuilt beside the live one: version 2 is built from the origin into its own
//! tables while version 1 keeps serving and stays current; once 2 has caught up, the switch is
//! one step, and 1 is kept (current, for a rollback) until an operator drops it.
//!
//! - A [`Rebuildable`] projection knows how to start any version of itself (its tables named
//!   by version, its runner named by [`version_name`]) and which one the application reads
//!   ([`Rebuildable::serve`]).
//! - [`Rebuilds`] keeps, per projection, the live version and at most one version beside it,
//!   in the store (so every process of a cluster agrees, and a restart resumes a build), and
//!   runs their runners. Each process looks at those records every [`REFRESH`] and follows:
//!   it starts the runners of new versions, serves the new live one, stops dropped ones.
//!
//! **No re-fired side effects.** A rebuild is one more runner, for the new version only, with
//! a checkpoint of its own: no other handler or process manager sees history again because a
//! projection is rebuilt.
//!
//! **No partial model.** [`Rebuilds::switch`] pauses the live version
//! ([`HandlerControl::pause`]) and waits for its runner to give its claim up, so its checkpoint
//! stops moving; waits for the new version to reach that checkpoint; records the new live
//! version and serves it; then resumes the old one. Readers of this process therefore go from
//! the old model to a new one at least as far along, never to one still catching up. Other
//! processes switch within [`REFRESH`], when the old version may have moved a few events on.
//!
//! The records are checkpoints under reserved names (`cqrs.projection:{name}:live`, `:beside`
//! and `:last`), so they need no store method of their own. Version numbers are never reused.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::handler::{ControlError, HandlerControl, HandlerStatus, Progress, RunningHandler};
use crate::ids::Position;
use crate::store::{Store, StoreError};

/// How often every process looks at the projections' version records.
pub const REFRESH: Duration = Duration::from_secs(1);

/// The runner (and checkpoint) name of `version` of projection `name`: the name itself for
/// version 1, so a projection that becomes rebuildable keeps its checkpoint; `{name}@v{n}`
/// after.
pub fn version_name(name: &str, version: u32) -> String {
    if version <= 1 {
        name.to_owned()
    } else {
        format!("{name}@v{version}")
    }
}

/// A projection that can be built again beside itself: each version in tables of its own.
#[async_trait]
pub trait Rebuildable: Send + Sync + 'static {
    /// The projection's name (its version 1's runner name).
    fn name(&self) -> &str;

    /// Creates `version`'s tables if missing and starts its runner, named
    /// [`version_name`]`(self.name(), version)`, reporting to `progress`. A new version starts
    /// from the origin (its checkpoint is new).
    async fn start(&self, version: u32, progress: &Progress) -> Result<RunningHandler, RebuildError>;

    /// From now on the application reads `version` (already started here).
    fn serve(&self, version: u32);

    /// Drops `version`'s tables; its runners are stopped everywhere.
    async fn drop_version(&self, version: u32) -> Result<(), RebuildError>;
}

/// Why a rebuild action failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RebuildError {
    /// No projection of that name is registered.
    #[error("no rebuildable projection named {0:?}")]
    Unknown(String),
    /// Only one version is built beside the live one at a time.
    #[error("{name:?} already has version {version} beside the live one: switch to it or drop it first")]
    Busy {
        /// The projection.
        name: String,
        /// The version beside.
        version: u32,
    },
    /// The version asked for is not the one beside the live one.
    #[error("{name:?} has no version {version} beside the live one")]
    NotBeside {
        /// The projection.
        name: String,
        /// The version asked for.
        version: u32,
    },
    /// The new version did not reach the live one's position in time; nothing was switched.
    #[error("version {version} of {name:?} has not caught up with the live one ({behind}); nothing switched")]
    NotCaughtUp {
        /// The projection.
        name: String,
        /// The version that is behind.
        version: u32,
        /// How far it is.
        behind: String,
    },
    /// The projection's own work (creating or dropping tables) failed.
    #[error("projection: {0}")]
    Projection(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Pausing or resuming a version failed.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl RebuildError {
    /// Wraps a projection's own error.
    pub fn projection(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Projection(error.into())
    }
}

/// What an operator sees of one rebuildable projection.
#[derive(Debug, Clone)]
pub struct ProjectionView {
    /// Its name.
    pub name: String,
    /// The version the application reads.
    pub live: u32,
    /// The version built (or kept) beside it, if any.
    pub beside: Option<u32>,
    /// The status of each version's runner in this process, by version.
    pub versions: Vec<(u32, HandlerStatus)>,
}

impl ProjectionView {
    /// The status of `version`'s runner here.
    pub fn status(&self, version: u32) -> Option<&HandlerStatus> {
        self.versions.iter().find(|(v, _)| *v == version).map(|(_, status)| status)
    }
}

/// The version records of a projection, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Records {
    live: u32,
    beside: Option<u32>,
    last: u32,
}

struct Entry {
    projection: Arc<dyn Rebuildable>,
    records: Records,
    runners: BTreeMap<u32, RunningHandler>,
}

struct Inner {
    store: Arc<dyn Store>,
    progress: Progress,
    control: HandlerControl<dyn Store>,
    /// Who pauses a live version during a switch (shown on the pause).
    owner: String,
    /// The projections; held only briefly (never across a wait for a version to catch up), so
    /// views and refreshes go on during a switch.
    entries: Mutex<BTreeMap<String, Entry>>,
    /// One build, switch or drop at a time in this process.
    actions: Mutex<()>,
}

/// The rebuildable projections of this process: registers them, builds new versions beside
/// the live ones, switches and drops versions, and follows what other processes did. Cheap to
/// clone; the refresh task ends when the last clone is dropped.
#[derive(Clone)]
pub struct Rebuilds {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Rebuilds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rebuilds").field("owner", &self.inner.owner).finish_non_exhaustive()
    }
}

impl Rebuilds {
    /// Rebuilds over `store`, whose runners report to `progress`; `owner` names this process in
    /// the pause a switch takes. Starts the refresh task (on the current tokio runtime).
    pub fn new(store: Arc<dyn Store>, progress: Progress, owner: impl Into<String>) -> Self {
        let control = HandlerControl::new(Arc::clone(&store));
        let inner = Arc::new(Inner {
            store,
            progress,
            control,
            owner: owner.into(),
            entries: Mutex::new(BTreeMap::new()),
            actions: Mutex::new(()),
        });
        tokio::spawn(refresh_loop(Arc::downgrade(&inner)));
        Self { inner }
    }

    /// Registers `projection`: starts its live version (and the one beside, if a build is under
    /// way or a version is kept) and serves the live one.
    pub async fn register(&self, projection: Arc<dyn Rebuildable>) -> Result<(), RebuildError> {
        let name = projection.name().to_owned();
        let records = self.load(&name).await?;
        let mut entry = Entry { projection, records, runners: BTreeMap::new() };
        self.start_missing(&mut entry).await?;
        entry.projection.serve(records.live);
        self.inner.entries.lock().await.insert(name, entry);
        Ok(())
    }

    /// Every registered projection, by name.
    pub async fn views(&self) -> Vec<ProjectionView> {
        let entries = self.inner.entries.lock().await;
        entries
            .iter()
            .map(|(name, entry)| ProjectionView {
                name: name.clone(),
                live: entry.records.live,
                beside: entry.records.beside,
                versions: entry.runners.iter().map(|(version, running)| (*version, running.status())).collect(),
            })
            .collect()
    }

    /// Starts building a new version of `name` beside the live one, from the origin; returns
    /// its number.
    pub async fn build(&self, name: &str) -> Result<u32, RebuildError> {
        let _action = self.inner.actions.lock().await;
        let mut entries = self.inner.entries.lock().await;
        let entry = entries.get_mut(name).ok_or_else(|| RebuildError::Unknown(name.to_owned()))?;
        entry.records = self.load(name).await?;
        if let Some(version) = entry.records.beside {
            return Err(RebuildError::Busy { name: name.to_owned(), version });
        }
        let version = entry.records.last + 1;
        self.save(name, "last", version).await?;
        self.save(name, "beside", version).await?;
        entry.records.last = version;
        entry.records.beside = Some(version);
        self.start_missing(entry).await?;
        tracing::info!(projection = %name, version, "building a new version beside the live one");
        Ok(version)
    }

    /// Makes `version` (the one beside) the live version of `name`, once it has reached the live
    /// version's position (waiting up to `within`); the old live version is kept beside,
    /// current, for a rollback (switch back to it) until dropped.
    pub async fn switch(&self, name: &str, version: u32, within: Duration) -> Result<(), RebuildError> {
        let _action = self.inner.actions.lock().await;
        let old = {
            let mut entries = self.inner.entries.lock().await;
            let entry = entries.get_mut(name).ok_or_else(|| RebuildError::Unknown(name.to_owned()))?;
            entry.records = self.load(name).await?;
            if entry.records.beside != Some(version) {
                return Err(RebuildError::NotBeside { name: name.to_owned(), version });
            }
            entry.records.live
        };
        let old_name = version_name(name, old);
        // An operator's pause of the old version stays after the switch; ours is lifted.
        let paused_before = self.inner.control.paused_by(&old_name).await?.is_some();
        if !paused_before {
            self.inner.control.pause(&old_name, &format!("switch of {name} by {}", self.inner.owner)).await?;
        }
        // Waited for without the projections' lock: the pages that show them stay live.
        let mut outcome = self.catch_up(name, &old_name, version, within).await;
        if outcome.is_ok() {
            outcome = self.record_switch(name, old, version).await;
        }
        if !paused_before {
            self.inner.control.resume(&old_name).await?;
        }
        outcome
    }

    /// Records `version` live and `old` beside, and serves `version` here.
    async fn record_switch(&self, name: &str, old: u32, version: u32) -> Result<(), RebuildError> {
        let mut entries = self.inner.entries.lock().await;
        let entry = entries.get_mut(name).ok_or_else(|| RebuildError::Unknown(name.to_owned()))?;
        // The live record first: a crash before the second write leaves the new version live
        // and nothing beside (the old tables stay until dropped by hand).
        self.save(name, "live", version).await?;
        self.save(name, "beside", old).await?;
        entry.records.live = version;
        entry.records.beside = Some(old);
        entry.projection.serve(version);
        tracing::info!(projection = %name, from = old, to = version, "switched to the rebuilt version");
        Ok(())
    }

    /// Stops `version` of `name` (the one beside, not the live one) in every process and drops
    /// its tables.
    pub async fn drop_version(&self, name: &str, version: u32) -> Result<(), RebuildError> {
        let _action = self.inner.actions.lock().await;
        let runner = version_name(name, version);
        let running = {
            let mut entries = self.inner.entries.lock().await;
            let entry = entries.get_mut(name).ok_or_else(|| RebuildError::Unknown(name.to_owned()))?;
            entry.records = self.load(name).await?;
            if entry.records.beside != Some(version) {
                return Err(RebuildError::NotBeside { name: name.to_owned(), version });
            }
            // Paused first, so no process writes into the tables while they go.
            self.inner.control.pause(&runner, &format!("drop by {}", self.inner.owner)).await?;
            entry.runners.remove(&version)
        };
        if let Some(running) = running {
            running.stop().await;
        }
        self.wait_released(&runner, Duration::from_secs(10)).await?;
        let projection = {
            let mut entries = self.inner.entries.lock().await;
            let entry = entries.get_mut(name).ok_or_else(|| RebuildError::Unknown(name.to_owned()))?;
            self.save(name, "beside", 0).await?;
            entry.records.beside = None;
            Arc::clone(&entry.projection)
        };
        projection.drop_version(version).await?;
        tracing::info!(projection = %name, version, "version dropped");
        // Lift the pause once every process has followed the record and stopped its runner
        // (within a refresh), so no pause of a version that is gone stays listed.
        let control = self.inner.control.clone();
        tokio::spawn(async move {
            tokio::time::sleep(REFRESH * 3).await;
            if let Err(error) = control.resume(&runner).await {
                tracing::debug!(%runner, %error, "lifting the pause of a dropped version failed");
            }
        });
        Ok(())
    }

    /// Stops every version's runner in this process (after the events in hand), for a graceful
    /// shutdown; the records stay, so the next start resumes a build.
    pub async fn stop(&self) {
        let mut entries = self.inner.entries.lock().await;
        for entry in entries.values_mut() {
            for (_, running) in std::mem::take(&mut entry.runners) {
                running.stop().await;
            }
        }
    }

    /// Looks at every projection's records and follows them: what another process built,
    /// switched or dropped. Runs every [`REFRESH`] on its own; call it to follow at once.
    pub async fn refresh(&self) -> Result<(), RebuildError> {
        let mut entries = self.inner.entries.lock().await;
        for (name, entry) in entries.iter_mut() {
            let records = self.load(name).await?;
            if records == entry.records {
                continue;
            }
            let live_changed = records.live != entry.records.live;
            entry.records = records;
            self.start_missing(entry).await?;
            if live_changed {
                entry.projection.serve(records.live);
            }
            let gone: Vec<u32> =
                entry.runners.keys().copied().filter(|v| *v != records.live && Some(*v) != records.beside).collect();
            for version in gone {
                if let Some(running) = entry.runners.remove(&version) {
                    running.stop().await;
                }
            }
        }
        Ok(())
    }

    /// Waits until `old_name` (paused) has given its claim up and `version` has reached its
    /// checkpoint.
    async fn catch_up(&self, name: &str, old_name: &str, version: u32, within: Duration) -> Result<(), RebuildError> {
        let deadline = Instant::now() + within;
        self.wait_released(old_name, within).await?;
        // Its saved checkpoint (exact for a transactional projection, whose tables commit with
        // it), or how far it got here if further (a projection whose checkpoint trails its state).
        let saved = self.inner.store.load_checkpoint(old_name).await?.unwrap_or(Position::START);
        let here = self.inner.progress.status(old_name).map_or(Position::START, |status| status.position);
        let target = saved.max(here);
        let new_name = version_name(name, version);
        let left = deadline.saturating_duration_since(Instant::now());
        self.inner.progress.wait_for(&new_name, target, left).await.map_err(|error| RebuildError::NotCaughtUp {
            name: name.to_owned(),
            version,
            behind: error.to_string(),
        })
    }

    /// Waits until no process holds the claim on `runner`.
    async fn wait_released(&self, runner: &str, within: Duration) -> Result<(), RebuildError> {
        let deadline = Instant::now() + within;
        loop {
            let claims = self.inner.store.claims().await?;
            let Some(holder) = claims.into_iter().find(|claim| claim.name == runner) else {
                return Ok(());
            };
            if Instant::now() >= deadline {
                return Err(ControlError::StillActive { handler: runner.to_owned(), holder: holder.owner }.into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn start_missing(&self, entry: &mut Entry) -> Result<(), RebuildError> {
        for version in std::iter::once(entry.records.live).chain(entry.records.beside) {
            if !entry.runners.contains_key(&version) {
                let running = entry.projection.start(version, &self.inner.progress).await?;
                entry.runners.insert(version, running);
            }
        }
        Ok(())
    }

    async fn load(&self, name: &str) -> Result<Records, StoreError> {
        let read = |kind: &'static str| async move {
            let position = self.inner.store.load_checkpoint(&record_name(name, kind)).await?;
            Ok::<u32, StoreError>(position.map_or(0, |p| u32::try_from(p.0).unwrap_or(u32::MAX)))
        };
        let live = read("live").await?.max(1);
        let beside = Some(read("beside").await?).filter(|v| *v != 0 && *v != live);
        let last = read("last").await?.max(live).max(beside.unwrap_or(0));
        Ok(Records { live, beside, last })
    }

    async fn save(&self, name: &str, kind: &'static str, version: u32) -> Result<(), StoreError> {
        self.inner.store.save_checkpoint(&record_name(name, kind), Position(u64::from(version))).await
    }
}

/// The checkpoint name of one of a projection's version records.
fn record_name(name: &str, kind: &str) -> String {
    format!("cqrs.projection:{name}:{kind}")
}

async fn refresh_loop(inner: Weak<Inner>) {
    loop {
        tokio::time::sleep(REFRESH).await;
        let Some(inner) = inner.upgrade() else { return };
        let rebuilds = Rebuilds { inner };
        if let Err(error) = rebuilds.refresh().await {
            tracing::warn!(%error, "cannot follow the projections' version records");
        }
    }
}
