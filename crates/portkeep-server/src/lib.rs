//! The Portkeep PCP server core, sans-IO.
//!
//! [`Server`] turns `(now, source, datagram)` into a reply and a list of
//! [`Change`]s. It owns the mapping table (RFC 6887 sections 11-15), the
//! external port allocator, per-subscriber quotas and epochs (section 8.5),
//! and validates requests in the order of section 8.2. It reads no clock
//! and does no I/O, so tests drive it with made-up time; the daemon wraps
//! it with sockets and hands its changes to the dataplane.

pub mod announce;
pub mod change;
mod config;
pub mod dataplane;
mod getnext;
pub mod policy;
pub mod prefix;
pub mod record;
mod server;
mod subscriber;
mod table;
mod time;

pub use announce::{AnnounceConfig, Audience};
pub use change::{
    Change, ChangeRecord, FilterRule, MappingKey, MappingKind, MappingRecord, PortHold,
    RemoveReason, RequesterState,
};
pub use config::{ServerConfig, StaticForward};
pub use dataplane::{Dataplane, DataplaneError, MemoryDataplane, Refused};
pub use policy::{
    BackupState, CheckpointClass, CheckpointMode, CheckpointPolicy, CheckpointStats, RateLimit,
    RefusalReason,
};
pub use prefix::Prefix;
#[cfg(any(
    feature = "planted-refused-kept-removes",
    feature = "planted-refused-lost-keeps-epoch"
))]
pub use server::Planted;
pub use server::{
    Announcement, ClearSelector, Cleared, Outcome, RestoreReport, Restored, Server, Stats,
    NATPMP_NONCE, STATIC_NONCE,
};
pub use subscriber::{NamedSubscriber, SubscriberId, SubscriberKeying};
pub use time::Timestamp;
