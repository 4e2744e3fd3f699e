//! The search index as a [`Rebuildable`] projection: each version in tables of its own
//! (`chat_search` for version 1, `chat_search_v{n}` after), built beside the live one from the
//! console, and `/search` served from the live one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use async_trait::async_trait;
use cqrs_core::rebuild::{version_name, RebuildError, Rebuildable};
use cqrs_core::{Progress, RunningHandler};

use super::{Backend, Hit, PgSearch, SearchError, SearchIndex, SqliteSearch, Terms, PROJECTION_NAME};
use crate::domain::ChatId;

/// The table (prefix) of a version of the index.
pub fn table_name(version: u32) -> String {
    if version <= 1 {
        "chat_search".to_owned()
    } else {
        format!("chat_search_v{version}")
    }
}

/// Every version of the search index started here, and the one `/search` reads.
pub struct SearchVersions {
    backend: Backend,
    indexes: Mutex<HashMap<u32, Arc<dyn SearchIndex>>>,
    served: RwLock<Option<Arc<dyn SearchIndex>>>,
}

impl std::fmt::Debug for SearchVersions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SearchVersions").field("backend", &self.backend).finish_non_exhaustive()
    }
}

impl SearchVersions {
    /// Versions of the index in `backend`'s database; none started yet.
    pub fn new(backend: Backend) -> Self {
        Self { backend, indexes: Mutex::default(), served: RwLock::new(None) }
    }
}

#[async_trait]
impl SearchIndex for SearchVersions {
    async fn search(&self, terms: &Terms, room: Option<&ChatId>, limit: usize) -> Result<Vec<Hit>, SearchError> {
        let served = self.served.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        match served {
            Some(index) => index.search(terms, room, limit).await,
            None => Err(SearchError::Starting),
        }
    }
}

#[async_trait]
impl Rebuildable for SearchVersions {
    fn name(&self) -> &str {
        PROJECTION_NAME
    }

    async fn start(&self, version: u32, progress: &Progress) -> Result<RunningHandler, RebuildError> {
        let (name, table) = (version_name(PROJECTION_NAME, version), table_name(version));
        let search = match &self.backend {
            Backend::Sqlite { url, store } => SqliteSearch::start_named(url, store, &name, &table, progress).await,
            Backend::Postgres(store) => PgSearch::start_named(store, &name, &table, progress).await,
        }
        .map_err(RebuildError::projection)?;
        self.indexes.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(version, search.index);
        Ok(search.running)
    }

    fn serve(&self, version: u32) {
        let index = self.indexes.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&version).cloned();
        if index.is_some() {
            *self.served.write().unwrap_or_else(std::sync::PoisonError::into_inner) = index;
        }
    }

    async fn drop_version(&self, version: u32) -> Result<(), RebuildError> {
        self.indexes.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&version);
        let table = table_name(version);
        match &self.backend {
            Backend::Sqlite { url, .. } => SqliteSearch::drop_tables(url, &table).await,
            Backend::Postgres(store) => PgSearch::drop_tables(store, &table).await,
        }
        .map_err(RebuildError::projection)
    }
}
