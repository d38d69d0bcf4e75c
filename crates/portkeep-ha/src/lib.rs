//! Replication of check-pointed state from the active node to the backup,
//! sans-IO.
//!
//! RFC 7767 section 1 defines check-pointing as "a process of state
//! replication and synchronization between active and backup PCP-controlled
//! devices", and section 3.2 recommends that an honoured request's state be
//! on the backup before the response is sent. This crate is that process,
//! without sockets or clocks: the daemon moves the bytes (over TLS) and
//! passes the time in.
//!
//! - [`Node`] is one node of the pair: role, term, link end, and the
//!   replies held until the backup acknowledged them. The daemon drives it
//!   and sends exactly what it releases.
//! - [`Active`] streams, to one backup, a snapshot of the check-pointed
//!   state and then every relevant change, and reports which log sequence
//!   numbers the backup has acknowledged; responses that depend on them can
//!   then be released. It knows whether the backup is in sync.
//! - [`Backup`] applies the stream, acknowledges it, and on promotion hands
//!   over a [`Takeover`]: the mappings to install, the epochs that continue,
//!   and the subscribers whose epochs must reset.
//! - Every message carries a term; a node that sees a higher term than its
//!   own stops acting as active ([`wire::Message`], fencing).
//!
//! What travels (and what does not) is decided by [`Item::from_change`]:
//! check-pointed mappings, their removal or loss of the flag, epoch anchors,
//! and per subscriber whether it holds volatile state. Volatile mappings do
//! not travel: that is the resource RFC 7767 saves.

mod active;
mod backup;
mod node;
pub mod wire;
pub mod witness;

pub use active::{encode_snapshot, Active, ActiveConfig, ActiveEvent, LinkState};
pub use backup::{Backup, Replica, ReplicaWrite, Takeover, TakeoverKind};
#[cfg(any(
    feature = "planted-release-before-ack",
    feature = "planted-skip-term-check",
    feature = "planted-ack-before-persist"
))]
pub use node::Planted;
pub use node::{
    strip_checkpoint, Effect, EncodedSnapshot, Grant, JobMeta, Node, NodeConfig, NodeStats,
    PromoteError, Role, SnapshotSource,
};
pub use wire::{FrameError, Item, Message, Position};

/// A replication term: promotion increments it, and a node that learns of
/// a higher one stops answering as active (fencing).
pub type Term = u64;
