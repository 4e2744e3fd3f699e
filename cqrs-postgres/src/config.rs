//! Settings of a [`PgEventStore`](crate::PgEventStore).

use std::time::Duration;

/// The NOTIFY channel on which appends announce their last position.
pub const NOTIFY_CHANNEL: &str = "cqrs_events";

/// How a [`PgEventStore`](crate::PgEventStore) uses its database. Start from
/// [`PgStoreConfig::default`] and change what you need.
///
/// ```
/// use std::time::Duration;
/// use cqrs_postgres::PgStoreConfig;
///
/// let config = PgStoreConfig::default().with_max_connections(4).with_poll_interval(Duration::from_millis(500));
/// assert_eq!(config.max_connections, 4);
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PgStoreConfig {
    /// Connections in the pool used for appends, reads and checkpoints (the listener has its
    /// own). Each writer task keeps one; the rest serve readers (`connect_with` makes the pool
    /// at least `writer_tasks + 1`; with `from_pool`, size your pool likewise).
    pub max_connections: u32,
    /// How long a call waits for a pooled connection before failing with
    /// `StoreError::Unavailable`.
    pub acquire_timeout: Duration,
    /// Group-commit writer tasks, each with at most one batch transaction in flight (default
    /// 1: on a small machine more tasks mean smaller batches and more commits). Each batch
    /// locks its streams in stream id order, so concurrent batches cannot deadlock.
    pub writer_tasks: usize,
    /// The most appends written in one group-commit transaction.
    pub max_batch_appends: usize,
    /// A writer stops adding appends to a batch once it holds this many events (a single
    /// larger append is still written, alone).
    pub max_batch_events: usize,
    /// How often a waiting subscriber re-reads without a notification: the safety net for a
    /// lost NOTIFY.
    pub poll_interval: Duration,
    /// `application_name` of the store's pooled connections.
    pub application_name: String,
    /// `application_name` of the LISTEN connection (visible in `pg_stat_activity`).
    pub listener_application_name: String,
    /// How long command ids are remembered (the idempotency promise holds that long); a
    /// background task forgets older ones. `None`: for ever. Default: 7 days
    /// ([`cqrs_core::DEFAULT_COMMAND_RETENTION`]).
    pub command_retention: Option<Duration>,
    /// How many of the events this process's writers just committed are kept in memory, so
    /// that a local subscriber at the head reads the next ones without a round trip (only a
    /// run of consecutive positions, all of them this process's; see `read_all`). 0: every
    /// read goes to the database. Default 4096.
    pub recent_events: usize,
    /// At most how often this process's writers send the NOTIFY that wakes other processes'
    /// subscribers: a commit inside the interval goes without one, and a NOTIFY follows it at
    /// most two intervals after the last one (sooner if a later commit carries it). Every
    /// NOTIFY costs a transaction in each listening backend, so under load this trades that
    /// many transactions for up to `2 × notify_interval` of latency in other processes; under
    /// a light load every commit notifies at once. Zero: a NOTIFY with every commit. Default
    /// 10 ms.
    pub notify_interval: Duration,
}

impl Default for PgStoreConfig {
    fn default() -> Self {
        Self {
            max_connections: 10,
            acquire_timeout: Duration::from_secs(5),
            writer_tasks: 1,
            max_batch_appends: 256,
            max_batch_events: 4096,
            poll_interval: Duration::from_secs(1),
            application_name: "cqrs-postgres".to_owned(),
            listener_application_name: "cqrs-postgres-listener".to_owned(),
            command_retention: Some(cqrs_core::DEFAULT_COMMAND_RETENTION),
            recent_events: 4096,
            notify_interval: Duration::from_millis(10),
        }
    }
}

impl PgStoreConfig {
    /// Sets [`max_connections`](Self::max_connections) (at least 2: one writer, one reader).
    #[must_use]
    pub fn with_max_connections(mut self, max_connections: u32) -> Self {
        self.max_connections = max_connections.max(2);
        self
    }

    /// Sets [`acquire_timeout`](Self::acquire_timeout).
    #[must_use]
    pub fn with_acquire_timeout(mut self, acquire_timeout: Duration) -> Self {
        self.acquire_timeout = acquire_timeout;
        self
    }

    /// Sets [`max_batch_appends`](Self::max_batch_appends) (at least 1).
    #[must_use]
    pub fn with_max_batch_appends(mut self, max_batch_appends: usize) -> Self {
        self.max_batch_appends = max_batch_appends.max(1);
        self
    }

    /// Sets [`writer_tasks`](Self::writer_tasks) (at least 1).
    #[must_use]
    pub fn with_writer_tasks(mut self, writer_tasks: usize) -> Self {
        self.writer_tasks = writer_tasks.max(1);
        self
    }

    /// Sets [`poll_interval`](Self::poll_interval).
    #[must_use]
    pub fn with_poll_interval(mut self, poll_interval: Duration) -> Self {
        self.poll_interval = poll_interval;
        self
    }

    /// Sets [`application_name`](Self::application_name).
    #[must_use]
    pub fn with_application_name(mut self, application_name: impl Into<String>) -> Self {
        self.application_name = application_name.into();
        self
    }

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

    /// Sets [`recent_events`](Self::recent_events).
    #[must_use]
    pub fn with_recent_events(mut self, recent_events: usize) -> Self {
        self.recent_events = recent_events;
        self
    }

    /// Sets [`notify_interval`](Self::notify_interval).
    #[must_use]
    pub fn with_notify_interval(mut self, notify_interval: Duration) -> Self {
        self.notify_interval = notify_interval;
        self
    }

    /// Sets [`listener_application_name`](Self::listener_application_name).
    #[must_use]
    pub fn with_listener_application_name(mut self, listener_application_name: impl Into<String>) -> Self {
        self.listener_application_name = listener_application_name.into();
        self
    }
}
