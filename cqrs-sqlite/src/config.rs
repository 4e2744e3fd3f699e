//! Settings of a [`SqliteEventStore`](crate::SqliteEventStore).

use std::time::Duration;

/// How a [`SqliteEventStore`](crate::SqliteEventStore) uses its file. Start from
/// [`SqliteStoreConfig::default`] and change what you need.
///
/// Durability is not configurable: every connection runs with `journal_mode=WAL` and
/// `synchronous=FULL` (see the crate documentation, "Durability").
///
/// ```
/// use std::time::Duration;
/// use cqrs_sqlite::SqliteStoreConfig;
///
/// let config = SqliteStoreConfig::default().with_read_connections(2).with_busy_timeout(Duration::from_secs(1));
/// assert_eq!(config.read_connections, 2);
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SqliteStoreConfig {
    /// Connections in the read pool (reads and checkpoint loads), and again as many for the
    /// page reads of `read_all` and `read_stream`. The writer has its own connection besides
    /// these.
    pub read_connections: u32,
    /// How long a call waits for a read connection (of either kind) before failing with
    /// `StoreError::Unavailable`.
    pub acquire_timeout: Duration,
    /// SQLite's `busy_timeout`: how long a connection waits for a lock held by another
    /// connection (another process writing the same file, a WAL checkpoint) before failing
    /// with `SQLITE_BUSY`.
    pub busy_timeout: Duration,
    /// The most requests (appends, checkpoint and snapshot saves) written in one transaction.
    pub max_batch_appends: usize,
    /// The writer stops adding appends to a batch once it holds this many events (a single
    /// larger append is still written, alone).
    pub max_batch_events: usize,
    /// How often a waiting subscriber re-reads without a notification. In one process the
    /// writer's notification is reliable; this is the safety net for appends made by another
    /// process on the same file, which this process is not told about.
    pub poll_interval: Duration,
    /// How long command ids are remembered (the idempotency promise holds that long); a
    /// background task forgets older ones. `None`: for ever. Default: 7 days
    /// ([`cqrs_core::DEFAULT_COMMAND_RETENTION`]).
    pub command_retention: Option<Duration>,
    /// How many bytes of the file the page readers (`read_all`, `read_stream`) map into memory
    /// (SQLite's `mmap_size`): they then read stored pages in place instead of copying each one
    /// through a `read` call, which is about a fifth of a replay's time. The writer never maps
    /// the file, so this changes nothing about what is written or when it is durable. The
    /// trade-off is SQLite's: an I/O error under a mapped read (a failing disk, a file cut
    /// short by another program) ends the process with `SIGBUS` rather than an error. `0` turns
    /// it off. Default: 1 GiB.
    pub read_mmap_size: u64,
}

impl Default for SqliteStoreConfig {
    fn default() -> Self {
        Self {
            read_connections: 4,
            acquire_timeout: Duration::from_secs(5),
            busy_timeout: Duration::from_secs(5),
            max_batch_appends: 256,
            max_batch_events: 4096,
            poll_interval: Duration::from_secs(1),
            command_retention: Some(cqrs_core::DEFAULT_COMMAND_RETENTION),
            read_mmap_size: 1 << 30,
        }
    }
}

impl SqliteStoreConfig {
    /// Sets [`command_retention`](Self::command_retention).
    #[must_use]
    pub fn with_command_retention(mut self, command_retention: Option<Duration>) -> Self {
        self.command_retention = command_retention;
        self
    }

    /// How often the background task forgets command ids past their retention: a quarter of
    /// the retention, between 1 second and 1 hour.
    pub(crate) fn prune_interval(&self) -> Option<Duration> {
        self.command_retention.map(|retention| (retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(3600)))
    }

    /// Sets [`read_mmap_size`](Self::read_mmap_size) (`0`: reads copy every page).
    #[must_use]
    pub fn with_read_mmap_size(mut self, read_mmap_size: u64) -> Self {
        self.read_mmap_size = read_mmap_size;
        self
    }

    /// Sets [`read_connections`](Self::read_connections) (at least 1).
    #[must_use]
    pub fn with_read_connections(mut self, read_connections: u32) -> Self {
        self.read_connections = read_connections.max(1);
        self
    }

    /// Sets [`acquire_timeout`](Self::acquire_timeout).
    #[must_use]
    pub fn with_acquire_timeout(mut self, acquire_timeout: Duration) -> Self {
        self.acquire_timeout = acquire_timeout;
        self
    }

    /// Sets [`busy_timeout`](Self::busy_timeout).
    #[must_use]
    pub fn with_busy_timeout(mut self, busy_timeout: Duration) -> Self {
        self.busy_timeout = busy_timeout;
        self
    }

    /// Sets [`max_batch_appends`](Self::max_batch_appends) (at least 1).
    #[must_use]
    pub fn with_max_batch_appends(mut self, max_batch_appends: usize) -> Self {
        self.max_batch_appends = max_batch_appends.max(1);
        self
    }

    /// Sets [`max_batch_events`](Self::max_batch_events) (at least 1).
    #[must_use]
    pub fn with_max_batch_events(mut self, max_batch_events: usize) -> Self {
        self.max_batch_events = max_batch_events.max(1);
        self
    }

    /// Sets [`poll_interval`](Self::poll_interval).
    #[must_use]
    pub fn with_poll_interval(mut self, poll_interval: Duration) -> Self {
        self.poll_interval = poll_interval;
        self
    }
}
