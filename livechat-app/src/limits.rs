//! Limits that keep one client from growing the server without bound: a global connection cap
//! and one per client address (the mini-redis pattern: a semaphore whose permit lives as long
//! as the connection), commands per address, and new rooms per address per minute. Each limit
//! that is hit is counted on `/metrics` ([`crate::metrics::Limit`]) and answered with a message
//! that says which limit it was. Per-address limits are keyed by [`ClientAddress`]: clients a
//! trusted proxy does not name ([`ClientAddress::Unknown`]) share one bucket of each, apart
//! from every real address (the proxy's own included).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::web::security::ClientAddress;

/// File descriptors kept out of the connection cap: the listeners, the store's pool (a
/// PostgreSQL pool of 10 and its listener, or SQLite's files), stdio and logs, the runtime,
/// the webhook and OTLP clients, and the [`HEALTH_RESERVE`].
pub const RESERVED_DESCRIPTORS: u64 = 64;

/// Connections beyond the cap that may still ask `/health` (and nothing else): a load
/// balancer's check is answered while the cap is reached. When all are taken, a newer
/// connection takes the place of the oldest (so connections that hold half a request head
/// cannot keep `/health` out); each has [`RESERVE_HEAD_TIMEOUT`] to send its request head.
pub const HEALTH_RESERVE: usize = 4;

/// How long a connection in the [`HEALTH_RESERVE`] may take to send its request head.
pub const RESERVE_HEAD_TIMEOUT: Duration = Duration::from_secs(2);

/// The connection cap for `max_connections` under an open-files soft limit of `open_files`
/// (`None`: unknown, not capped): at most `open_files - RESERVED_DESCRIPTORS`, at least 1.
pub fn cap_for_open_files(max_connections: usize, open_files: Option<u64>) -> usize {
    let Some(open_files) = open_files else { return max_connections };
    let room = usize::try_from(open_files.saturating_sub(RESERVED_DESCRIPTORS)).unwrap_or(usize::MAX);
    max_connections.min(room).max(1)
}

/// The process's open-files soft limit, if it can be read.
pub fn open_files_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        rlimit::getrlimit(rlimit::Resource::NOFILE).ok().map(|(soft, _)| soft)
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// The limits' settings.
#[derive(Debug, Clone)]
pub struct LimitsConfig {
    /// Connections (HTTP and websocket) open at once; `App::start` lowers it to fit under the
    /// open-files limit ([`cap_for_open_files`]).
    pub max_connections: usize,
    /// Connections open at once from one client address.
    pub max_connections_per_address: usize,
    /// Commands (send, edit, delete) one address may make in a burst.
    pub commands_burst: u32,
    /// Commands per second one address may make on average.
    pub commands_per_second: f64,
    /// New rooms (a first message in an empty room) one address may create per minute.
    pub rooms_per_minute: u32,
    /// Searches one address may make in a burst (a search reads an index; typing in the
    /// live search box makes at most five a second).
    pub searches_burst: u32,
    /// Searches per second one address may make on average.
    pub searches_per_second: f64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            max_connections_per_address: 128,
            commands_burst: 30,
            commands_per_second: 3.0,
            rooms_per_minute: 10,
            searches_burst: 30,
            searches_per_second: 4.0,
        }
    }
}

/// A token bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets per key, forgetting full ones when there are too many keys.
#[derive(Debug)]
struct Buckets<K> {
    buckets: Mutex<HashMap<K, Bucket>>,
    burst: f64,
    per_second: f64,
}

/// Most keys a bucket map holds before full buckets are forgotten.
const MAX_KEYS: usize = 100_000;

impl<K: std::hash::Hash + Eq + Clone> Buckets<K> {
    fn new(burst: f64, per_second: f64) -> Self {
        Self { buckets: Mutex::new(HashMap::new()), burst: burst.max(1.0), per_second }
    }

    /// Takes one token for `key` at `now`; `Err(wait)` when there is none.
    fn take(&self, key: &K, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_KEYS {
            let (burst, rate) = (self.burst, self.per_second);
            buckets.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < burst);
        }
        let bucket = buckets.entry(key.clone()).or_insert(Bucket { tokens: self.burst, at: now });
        bucket.tokens = (bucket.tokens + now.duration_since(bucket.at).as_secs_f64() * self.per_second).min(self.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            let missing = 1.0 - bucket.tokens;
            Err(Duration::from_secs_f64(if self.per_second > 0.0 { missing / self.per_second } else { 60.0 }))
        }
    }
}

/// Open connections per client address.
#[derive(Debug, Default)]
pub struct AddressCounts {
    counts: Mutex<HashMap<ClientAddress, usize>>,
}

/// One connection counted for an address; released on drop.
#[derive(Debug)]
pub struct AddressPermit {
    counts: Arc<AddressCounts>,
    address: ClientAddress,
}

impl Drop for AddressPermit {
    fn drop(&mut self) {
        let mut counts = self.counts.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = counts.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.address);
            }
        }
    }
}

/// A connection's places under the connection caps, in each of its requests' extensions: a
/// websocket keeps a clone for as long as it is open.
#[derive(Debug, Clone)]
pub struct ConnectionGuard(#[allow(dead_code)] Arc<ConnectionPermit>);

impl ConnectionGuard {
    /// Shares `permit` among the connection's requests.
    pub fn new(permit: ConnectionPermit) -> Self {
        Self(Arc::new(permit))
    }
}

/// What a connection holds for as long as it is open: its place under the global cap and,
/// when counted, under its address's.
#[derive(Debug)]
pub struct ConnectionPermit {
    _global: OwnedSemaphorePermit,
    _address: Option<AddressPermit>,
}

/// The [`HEALTH_RESERVE`]: places beyond the cap, oldest first, each with the sender whose
/// drop tells its connection it was evicted.
#[derive(Debug, Default)]
struct Reserve {
    places: Mutex<VecDeque<(u64, oneshot::Sender<()>)>>,
    next: AtomicU64,
}

/// A place in the [`HEALTH_RESERVE`]; released on drop.
#[derive(Debug)]
pub struct ReservedPlace {
    reserve: Arc<Reserve>,
    id: u64,
    /// Resolves when a newer connection took this place: answer with the refusal and close.
    pub evicted: oneshot::Receiver<()>,
}

impl Drop for ReservedPlace {
    fn drop(&mut self) {
        let mut places = self.reserve.places.lock().unwrap_or_else(|p| p.into_inner());
        places.retain(|(id, _)| *id != self.id);
    }
}

/// Which limit refused something, with the words shown to the person.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The server holds its maximum of connections.
    #[error("the server is at its limit of {0} connections; try again in a minute")]
    ServerFull(usize),
    /// This address holds its maximum of connections.
    #[error("too many connections from your address (the limit is {0}); close some tabs and try again")]
    AddressFull(usize),
    /// This address sent too many commands just now.
    #[error("slow down: too many messages from your network; try again in {0} s")]
    Commands(u64),
    /// This address created too many rooms in the last minute.
    #[error("too many new rooms from your network: at most {0} a minute; try again in {1} s")]
    Rooms(u32, u64),
    /// This address searched too often just now.
    #[error("slow down: too many searches from your network; try again in {0} s")]
    Searches(u64),
}

/// The limits, shared by every connection.
#[derive(Debug)]
pub struct Limits {
    config: LimitsConfig,
    connections: Arc<Semaphore>,
    addresses: Arc<AddressCounts>,
    reserve: Arc<Reserve>,
    commands: Buckets<ClientAddress>,
    rooms: Buckets<ClientAddress>,
    searches: Buckets<ClientAddress>,
}

impl Limits {
    /// Limits with these settings.
    pub fn new(config: LimitsConfig) -> Self {
        Self {
            connections: Arc::new(Semaphore::new(config.max_connections.max(1))),
            addresses: Arc::new(AddressCounts::default()),
            reserve: Arc::new(Reserve::default()),
            commands: Buckets::new(f64::from(config.commands_burst), config.commands_per_second),
            rooms: Buckets::new(f64::from(config.rooms_per_minute), f64::from(config.rooms_per_minute) / 60.0),
            searches: Buckets::new(f64::from(config.searches_burst), config.searches_per_second),
            config,
        }
    }

    /// The settings.
    pub fn config(&self) -> &LimitsConfig {
        &self.config
    }

    /// A place under the global cap, and under `address`'s if given.
    pub fn connect(&self, address: Option<ClientAddress>) -> Result<ConnectionPermit, Refusal> {
        let global = Arc::clone(&self.connections)
            .try_acquire_owned()
            .map_err(|_| Refusal::ServerFull(self.config.max_connections))?;
        let address = address.map(|address| self.count_address(address)).transpose()?;
        Ok(ConnectionPermit { _global: global, _address: address })
    }

    /// A place in the [`HEALTH_RESERVE`], for a connection refused by the global cap; when all
    /// are taken, the oldest holder is evicted for this one.
    pub fn reserve(&self) -> ReservedPlace {
        let id = self.reserve.next.fetch_add(1, Ordering::Relaxed);
        let (evict, evicted) = oneshot::channel();
        let mut places = self.reserve.places.lock().unwrap_or_else(|p| p.into_inner());
        while places.len() >= HEALTH_RESERVE {
            places.pop_front();
        }
        places.push_back((id, evict));
        ReservedPlace { reserve: Arc::clone(&self.reserve), id, evicted }
    }

    /// A place under `address`'s connection cap.
    pub fn count_address(&self, address: ClientAddress) -> Result<AddressPermit, Refusal> {
        let mut counts = self.addresses.counts.lock().unwrap_or_else(|p| p.into_inner());
        let count = counts.entry(address).or_default();
        if *count >= self.config.max_connections_per_address {
            return Err(Refusal::AddressFull(self.config.max_connections_per_address));
        }
        *count += 1;
        Ok(AddressPermit { counts: Arc::clone(&self.addresses), address })
    }

    /// Takes one command from `address`'s budget.
    pub fn command(&self, address: ClientAddress) -> Result<(), Refusal> {
        self.commands.take(&address, Instant::now()).map_err(|wait| Refusal::Commands(wait.as_secs().max(1)))
    }

    /// Takes one new room from `address`'s budget.
    pub fn new_room(&self, address: ClientAddress) -> Result<(), Refusal> {
        self.rooms
            .take(&address, Instant::now())
            .map_err(|wait| Refusal::Rooms(self.config.rooms_per_minute, wait.as_secs().max(1)))
    }

    /// Takes one search from `address`'s budget.
    pub fn search(&self, address: ClientAddress) -> Result<(), Refusal> {
        self.searches.take(&address, Instant::now()).map_err(|wait| Refusal::Searches(wait.as_secs().max(1)))
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        self.config.max_connections.max(1) - self.connections.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_refill_over_time() {
        let buckets = Buckets::new(2.0, 1.0);
        let start = Instant::now();
        assert!(buckets.take(&1, start).is_ok());
        assert!(buckets.take(&1, start).is_ok());
        let wait = buckets.take(&1, start).expect_err("empty");
        assert!(wait <= Duration::from_secs(1));
        assert!(buckets.take(&2, start).is_ok(), "another key has its own bucket");
        assert!(buckets.take(&1, start + Duration::from_secs(1)).is_ok());
    }

    #[test]
    fn the_connection_cap_stays_under_the_open_files_limit() {
        assert_eq!(cap_for_open_files(10_000, Some(1024)), 1024 - RESERVED_DESCRIPTORS as usize);
        assert_eq!(cap_for_open_files(100, Some(1024)), 100, "a lower cap is kept");
        assert_eq!(cap_for_open_files(10_000, None), 10_000);
        assert_eq!(cap_for_open_files(10_000, Some(10)), 1);
        assert_eq!(cap_for_open_files(10_000, Some(u64::MAX)), 10_000, "RLIM_INFINITY");
    }

    #[tokio::test]
    async fn the_health_reserve_evicts_its_oldest_place() {
        let limits = Limits::new(LimitsConfig::default());
        let mut places: Vec<ReservedPlace> = (0..HEALTH_RESERVE).map(|_| limits.reserve()).collect();
        let mut newest = limits.reserve();
        assert!(places[0].evicted.try_recv().is_err_and(|e| e == oneshot::error::TryRecvError::Closed), "oldest out");
        for place in &mut places[1..] {
            assert_eq!(place.evicted.try_recv(), Err(oneshot::error::TryRecvError::Empty), "the others stay");
        }
        drop(places.remove(1));
        let _another = limits.reserve();
        assert_eq!(
            places[1].evicted.try_recv(),
            Err(oneshot::error::TryRecvError::Empty),
            "a freed place is used first"
        );
        assert_eq!(newest.evicted.try_recv(), Err(oneshot::error::TryRecvError::Empty));
    }

    #[test]
    fn connection_caps_are_released_with_their_permits() {
        let limits =
            Limits::new(LimitsConfig { max_connections: 3, max_connections_per_address: 2, ..LimitsConfig::default() });
        let a = ClientAddress::Known("10.0.0.1".parse().expect("ip"));
        let b = ClientAddress::Known("10.0.0.2".parse().expect("ip"));
        let first = limits.connect(Some(a)).expect("first");
        let _second = limits.connect(Some(a)).expect("second");
        assert_eq!(limits.connect(Some(a)).expect_err("third from a"), Refusal::AddressFull(2));
        let _third = limits.connect(Some(b)).expect("b has its own");
        assert_eq!(limits.connect(None).expect_err("server full"), Refusal::ServerFull(3));
        drop(first);
        assert!(limits.connect(Some(a)).is_ok(), "a place freed");
        drop(_third);
        let _unknown = limits.connect(Some(ClientAddress::Unknown)).expect("unknown has its own");
        assert_eq!(limits.command(ClientAddress::Unknown), Ok(()));
    }
}
