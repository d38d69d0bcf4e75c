//! The change log: every mutation of server state, as data.
//!
//! DESIGN.md: the core returns `Change`s with the response, and the
//! runtime hands them to the store, the replica link and the dataplane,
//! releasing a response only once the sinks it needs have acknowledged.
//! Storage recovery, backup synchronisation and NAT programming are all
//! replays of this one log.

use std::net::{IpAddr, SocketAddr};

use portkeep_proto::{Nonce, Protocol};

use crate::prefix::Prefix;
use crate::{SubscriberId, Timestamp};

/// What identifies a MAP mapping (RFC 6887 section 11.1: internal address,
/// protocol, internal port).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MappingKey {
    /// Internal address (IPv4 as IPv4, never IPv4-mapped).
    pub internal_ip: IpAddr,
    /// Protocol; [`Protocol::ALL`] for all protocols.
    pub protocol: Protocol,
    /// Internal port; 0 for all ports.
    pub internal_port: u16,
}

/// Whether a mapping was made by MAP or PEER.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MappingKind {
    /// An inbound mapping (RFC 6887 section 11).
    Map,
    /// An outbound flow to one remote peer (RFC 6887 section 12).
    Peer {
        /// The remote peer.
        remote: SocketAddr,
    },
}

/// A FILTER rule kept with a MAP mapping (RFC 6887 section 13.3): only
/// remote peers in `prefix` (and on `port`, unless 0) may use the mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FilterRule {
    /// Permitted remote prefix.
    pub prefix: Prefix,
    /// Permitted remote port; 0 means any.
    pub port: u16,
}

/// A mapping as the rest of the system sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappingRecord {
    /// MAP or PEER.
    pub kind: MappingKind,
    /// Internal side.
    pub key: MappingKey,
    /// Assigned external address and port (port 0: all ports).
    pub external: SocketAddr,
    /// The nonce that owns the mapping (RFC 6887 section 11.1).
    pub nonce: Nonce,
    /// When it expires.
    pub expires: Timestamp,
    /// The lifetime granted by the last request, in seconds.
    pub lifetime: u32,
    /// Tagged for check-pointing (RFC 7767 section 3.2).
    pub checkpoint: bool,
    /// FILTER rules (MAP only).
    pub filters: Vec<FilterRule>,
    /// DESCRIPTION text (RFC 7220).
    pub description: Option<String>,
    /// The subscriber the mapping counts against.
    pub subscriber: SubscriberId,
    /// Made on behalf of another host with THIRD_PARTY (RFC 6887 section 13.1).
    pub third_party: bool,
    /// The THIRD_PARTY client that made or last renewed it (`None` for a
    /// host's own mapping, and for a THIRD_PARTY mapping stored before
    /// this was kept): the requester told when it is lost.
    pub manager: Option<IpAddr>,
    /// Not check-pointed now, but the backup follows it: an earlier
    /// check-point of it stands until the lifetime then granted ends (RFC
    /// 7767 section 3.2), so it stays replicated across a restart too.
    pub followed: bool,
}

/// Why a mapping went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoveReason {
    /// The dataplane could not install it: the request that made it is
    /// answered NETWORK_FAILURE instead (RFC 6887 section 7.4).
    Failed,
    /// Deleted by its owner (lifetime 0, RFC 6887 section 15).
    Deleted,
    /// Its lifetime ran out (RFC 6887 section 15).
    Expired,
    /// Cleared by the operator (failure-scenarios draft section 2.6.2).
    Cleared,
}

/// One mutation of server state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A mapping was created or its state (lifetime, flags, filters) changed.
    Upserted(MappingRecord),
    /// A mapping was removed; the record is the mapping as it last was.
    Removed {
        /// The mapping that went away.
        mapping: MappingRecord,
        /// Why.
        reason: RemoveReason,
    },
    /// A subscriber's epoch restarted at `anchor` (RFC 6887 section 8.5).
    EpochReset {
        /// Whose epoch.
        subscriber: SubscriberId,
        /// The time its epoch counts from.
        anchor: Timestamp,
    },
    /// The server-wide epoch restarted at `anchor`: every subscriber
    /// without an epoch of its own now counts from there (failure-scenarios
    /// draft section 2.6: all state was lost or cleared).
    ServerEpochReset {
        /// The time the server's epoch counts from.
        anchor: Timestamp,
    },
    /// These hosts of `subscriber` lost state and are owed an unsolicited
    /// ANNOUNCE until `until` (replacing what the subscriber was owed
    /// before): a node that takes over before then announces to them again
    /// (RFC 6887 section 14.1.3), since a client still repairing the first
    /// loss, with an epoch too young for its section 8.5 check to see a
    /// second reset, learns of the second only this way. It is kept apart
    /// from volatile state: a host owed an ANNOUNCE may since hold only
    /// check-pointed mappings, and its epoch must not reset for nothing.
    AnnounceOwed {
        /// Whose hosts.
        subscriber: SubscriberId,
        /// The hosts (empty: none any more).
        hosts: Vec<IpAddr>,
        /// Until when.
        until: Timestamp,
    },
    /// An external endpoint was freed and is held back from other
    /// clients until the hold ends ([`PortHold`]).
    PortHeld(PortHold),
    /// A THIRD_PARTY requester's state changed; `None`: forgotten (it
    /// holds no mapping and its epoch is the subscriber's again).
    Requester {
        /// The requester's address.
        ip: IpAddr,
        /// Its state.
        state: Option<RequesterState>,
    },
}

/// What the server keeps about a THIRD_PARTY client (RFC 6887 section
/// 13.1), a requester that manages other hosts' mappings: where to send
/// it an ANNOUNCE, and its own epoch.
///
/// RFC 6887 section 8.5 has a client keep one epoch per server, and a
/// THIRD_PARTY client's mappings belong to other hosts (other subscribers,
/// often). Its epoch therefore resets whenever a host it manages loses
/// state through it, and only then: every reply to it, success, error or
/// ANNOUNCE, carries that one epoch (failure-scenarios draft section
/// 2.6.1: reset exactly when the client's state was lost).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequesterState {
    /// The UDP port its requests last came from: ANNOUNCEs go there (RFC
    /// 6887 section 14.1.3: "the IP address(es) and port(s) of its PCP
    /// clients").
    pub port: u16,
    /// When its epoch restarted, if later than its subscriber's epoch.
    pub anchor: Option<Timestamp>,
    /// It holds mappings the backup does not follow, the last of which
    /// expires then: a takeover before that loses them, so its epoch
    /// resets then (failure-scenarios draft 2.6); a takeover after it
    /// lost nothing of its own. `Timestamp(u64::MAX)` when the end is
    /// unknown (state written before it was recorded).
    pub volatile_until: Option<Timestamp>,
}

/// An external endpoint freed recently, and the client that held it.
///
/// RFC 6887 section 15: a freed external port "SHOULD NOT be reused for
/// an interval" (late packets for the old holder would reach a new one),
/// "however, within these time windows, the PCP server SHOULD allow an
/// external port to be reclaimed by the same client, where 'same client'
/// means 'same internal IP address, internal port, and mapping nonce'".
/// Stored and replicated, so a restart or a takeover does not hand the
/// port to someone else early. At most one hold exists per external
/// endpoint, so the holds are bounded by the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortHold {
    /// The client that held it: its internal address, protocol and port.
    pub owner: MappingKey,
    /// The nonce that owned the mapping.
    pub nonce: Nonce,
    /// The external endpoint held; port 0: the whole address (a mapping
    /// for all ports, RFC 6887 section 11.1).
    pub external: SocketAddr,
    /// When another client may have it.
    pub until: Timestamp,
}

/// A change with its position in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeRecord {
    /// Log sequence number, strictly increasing from 1.
    pub seq: u64,
    /// The change.
    pub change: Change,
    /// An [`Change::Upserted`] that made the mapping anew, rather than
    /// renewing or updating one: a mapping record's `started` event in the
    /// daemon's log (operators keep when each holding began). What the core
    /// said as it handled the request; neither stored nor replicated, so
    /// a record read back from either says false.
    pub started: bool,
}
