//! What handlers keep in the store besides their checkpoints: claims (one active consumer per
//! handler across processes), parked events, process-manager state and scheduled commands.
//! The [`Coordination`](crate::Coordination) methods that keep them take and return these types.

use std::fmt;
use std::time::Duration;

use serde_json::Value;

use crate::ids::{CommandId, EventId, Position, StreamId, Timestamp};

/// A claim held on a name: the right to be its one active consumer until `expires_at`,
/// unless renewed. `token` grows every time the claim changes hands, so a write fenced by a
/// token ([`Coordination::save_checkpoint_claimed`](crate::Coordination::save_checkpoint_claimed))
/// fails once another process has taken over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The claimed name (a handler's name).
    pub name: String,
    /// Who holds it (a process identity, see [`default_owner`]).
    pub owner: String,
    /// The fencing token of this tenure.
    pub token: u64,
    /// When the claim lapses unless renewed, by the store's clock.
    pub expires_at: Timestamp,
}

/// The answer to [`Coordination::claim`](crate::Coordination::claim).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// The caller holds the claim (newly taken, or renewed).
    Held(Claim),
    /// Another owner holds it until `until`.
    Taken {
        /// The current holder.
        holder: String,
        /// When its claim lapses unless renewed.
        until: Timestamp,
    },
}

/// A parked event's state, as an operator sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParkedStatus {
    /// Set aside after failing; the handler went on.
    Parked,
    /// An operator asked for another attempt; the running handler picks it up.
    RetryRequested,
}

impl ParkedStatus {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            ParkedStatus::Parked => "parked",
            ParkedStatus::RetryRequested => "retry",
        }
    }

    /// From the stored name.
    pub fn parse(status: &str) -> Option<Self> {
        match status {
            "parked" => Some(ParkedStatus::Parked),
            "retry" => Some(ParkedStatus::RetryRequested),
            _ => None,
        }
    }
}

impl fmt::Display for ParkedStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An event a handler set aside: it failed too often (see
/// [`ErrorPolicy`](crate::ErrorPolicy)), or it came after a parked event of the same sequence
/// (stream or partition) and waits behind it. Parked events are kept until an operator retries
/// them successfully or discards them; nothing is passed over silently.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParkedEvent {
    /// The handler that parked it.
    pub handler: String,
    /// The event's position.
    pub position: Position,
    /// The event's id.
    pub event_id: EventId,
    /// Its stream.
    pub stream_id: StreamId,
    /// Its stored type.
    pub event_type: String,
    /// The sequence it belongs to (the handler's partition key, by default its stream): later
    /// events of a sequence with a parked event are parked behind it, in order.
    pub sequence: String,
    /// The last error, or why it waits ("behind @N").
    pub error: String,
    /// Failed attempts so far.
    pub attempts: u32,
    /// When it was (last) parked.
    pub parked_at: Timestamp,
    /// Parked, or waiting for a retry.
    pub status: ParkedStatus,
}

/// A process manager instance's state, as stored.
///
/// An instance that ended (stopped by [`Route::Stop`](crate::Route::Stop)) leaves a tombstone:
/// `ended`, with the position of the event that ended it and a `null` state. It keeps a replay
/// (after a checkpoint that lagged behind) from starting the instance again: events at or below
/// its position were handled. Tombstones at or below the process manager's saved checkpoint
/// are pruned ([`Coordination::prune_processes`](crate::Coordination::prune_processes)), since no
/// replay reaches them.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessState {
    /// The serialized state (`null` once ended).
    pub state: Value,
    /// Position of the last event applied to it: an event at or below it was handled.
    pub position: Position,
    /// The instance has ended: a tombstone.
    pub ended: bool,
}

impl ProcessState {
    /// A running instance's state after the event at `position`.
    pub fn running(state: Value, position: Position) -> Self {
        Self { state, position, ended: false }
    }

    /// The tombstone of an instance ended by the event at `position`.
    pub fn ended(position: Position) -> Self {
        Self { state: Value::Null, position, ended: true }
    }
}

/// A process manager instance as an operator sees it ([`ProcessAdmin::instances`](crate::ProcessAdmin::instances)).
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessInstance {
    /// The instance's key.
    pub key: String,
    /// Its stored state: running, or ended (a tombstone, until pruned).
    pub state: ProcessState,
}

/// A command scheduled for later by a process manager instance, fired once by its runner.
#[derive(Debug, Clone, PartialEq)]
pub struct Scheduled {
    /// The process manager's name.
    pub owner: String,
    /// The instance's key.
    pub key: String,
    /// The schedule's name within the instance; scheduling the same name again replaces it.
    pub name: String,
    /// When it is due.
    pub due: Timestamp,
    /// The serialized command.
    pub command: Value,
    /// The id it is dispatched with (derived, so firing twice applies it once).
    pub command_id: CommandId,
    /// Failed firings so far (0 when scheduled; scheduling anew resets it).
    pub attempts: u32,
}

/// A scheduled command its scheduler set aside: unreadable (its command type changed shape), or
/// failing [`MAX_FIRING_ATTEMPTS`] times. It no longer fires (nor holds back others) until an
/// operator retries it ([`Coordination::retry_scheduled`](crate::Coordination::retry_scheduled)) or
/// discards it ([`Coordination::unschedule`](crate::Coordination::unschedule)); see
/// [`ProcessAdmin`](crate::ProcessAdmin).
#[derive(Debug, Clone, PartialEq)]
pub struct SetAsideCommand {
    /// The command, as stored.
    pub scheduled: Scheduled,
    /// Why it was set aside (the last error).
    pub error: String,
}

/// Failed firings of a scheduled command before its scheduler sets it aside; between attempts
/// it waits 1 s, 2 s, 4 s, ... (by the scheduler's clock).
pub const MAX_FIRING_ATTEMPTS: u32 = 5;

/// How long a claim lasts without renewal by default: a standby takes over at most this long
/// (plus one [`DEFAULT_CLAIM_RETRY`]) after the holder stops renewing.
pub const DEFAULT_CLAIM_TTL: Duration = Duration::from_secs(3);

/// How often a standby asks for a claim by default.
pub const DEFAULT_CLAIM_RETRY: Duration = Duration::from_secs(1);

/// A process identity for claims: `{host}:{pid}:{random}`, distinct for every run of a
/// process. `HOSTNAME` (or `/etc/hostname`) names the host.
pub fn default_owner() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|host| !host.is_empty())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|host| host.trim().to_owned()))
        .filter(|host| !host.is_empty())
        .unwrap_or_else(|| "host".to_owned());
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}:{}:{}", std::process::id(), &random[..8])
}
