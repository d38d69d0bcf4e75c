//! Replication messages and their framing on an ordered byte stream.
//!
//! A frame is `length (u32, big-endian) | type (u8) | payload`, the length
//! counting type and payload. Frames longer than [`MAX_FRAME`] are refused,
//! so a peer cannot make the other allocate without bound.

use portkeep_server::record::{
    decode_mapping, decode_requester, decode_subscriber, encode_mapping, encode_requester,
    encode_requester_v1, encode_subscriber, key_of, Reader,
};
use portkeep_server::{
    Change, ChangeRecord, MappingRecord, RequesterState, SubscriberId, SubscriberKeying, Timestamp,
};

use crate::Term;

/// Largest frame accepted.
pub const MAX_FRAME: usize = 4 << 20;

/// What a node can vouch for: the term of the pair in which its state
/// was served and the log position it reaches. Ordered by term, then
/// position: after a double failure the greater one is served
/// (failure-scenarios draft section 2.6). The default is nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    /// The term the state was served in.
    pub term: Term,
    /// The log position.
    pub seq: u64,
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "term {}, log position {}", self.term, self.seq)
    }
}

/// Terms at or above this are refused on the link ([`FrameError`]): far
/// beyond any count of promotions, and so far below `u64::MAX` that the
/// next term always exists.
pub const MAX_TERM: Term = 1 << 62;

/// The link protocol version this release speaks: 2 added the fields of a
/// Hello after `now` and [`Message::Handover`]; 3 added
/// [`Item::Requester`] and mapping records that name their THIRD_PARTY
/// manager ([`MappingRecord::manager`]); 4 added when volatile state ends
/// ([`Item::Volatile`]'s `until`, [`RequesterState::volatile_until`]);
/// 5 added [`Item::PortHeld`].
/// Each side speaks the lower of its own and its peer's version
/// ([`Message::encode_for`]), so a pair can be upgraded one node at a time
/// from version 2 on.
pub const LINK_VERSION: u16 = 5;

/// One unit of replicated state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A mapping the backup follows, created or changed: check-pointed, or
    /// one that was check-pointed and lost its flag.
    Upsert(MappingRecord),
    /// A mapping that is gone (deleted or expired), by its stored key.
    Remove(Vec<u8>),
    /// A subscriber's epoch restarted.
    Epoch {
        /// Whose.
        subscriber: SubscriberId,
        /// When its epoch began.
        anchor: Timestamp,
    },
    /// The server-wide epoch restarted.
    ServerEpoch {
        /// When it began.
        anchor: Timestamp,
    },
    /// Which of a subscriber's hosts hold volatile (not check-pointed)
    /// mappings, empty when none do, and when the last of those mappings
    /// expires. If any still live when the backup takes over, that
    /// subscriber lost state: its epoch resets and those hosts are sent an
    /// ANNOUNCE (failure-scenarios draft section 2.6); if all ended before,
    /// it lost nothing, even if their expiry never reached the backup.
    Volatile {
        /// Whose.
        subscriber: SubscriberId,
        /// Its hosts with volatile mappings.
        hosts: Vec<std::net::IpAddr>,
        /// When the last of them expires, in the active's clock
        /// (`Timestamp(u64::MAX)` from a peer of link version 3 or
        /// earlier, which does not say: as if they never did).
        until: Timestamp,
    },
    /// Which of a subscriber's hosts are owed an ANNOUNCE after a loss,
    /// until when (`portkeep_server::Change::AnnounceOwed`): a node that
    /// takes over before then tells them again.
    AnnounceOwed {
        /// Whose.
        subscriber: SubscriberId,
        /// The hosts (empty: none any more).
        hosts: Vec<std::net::IpAddr>,
        /// Until when, in the active's clock.
        until: Timestamp,
    },
    /// An external endpoint freed and held back from other clients
    /// (`portkeep_server::Change::PortHeld`, RFC 6887 section 15), so a
    /// node that takes over does not hand it to someone else early. Link
    /// version 5 and later.
    PortHeld(portkeep_server::PortHold),
    /// A THIRD_PARTY requester's state (`portkeep_server::Change::Requester`):
    /// where its ANNOUNCEs go, its own epoch, and whether it holds state a
    /// takeover would lose. Link version 3 and later.
    Requester {
        /// Its address.
        ip: std::net::IpAddr,
        /// Its state; `None`: forgotten.
        state: Option<RequesterState>,
    },
}

impl Item {
    /// What, if anything, a change means for the backup.
    ///
    /// Upserts travel whole, check-pointed or not (the active sends a
    /// volatile one only for a mapping the backup follows, see
    /// `portkeep_server::Server::replicated_mappings`); removals (deleted,
    /// expired) travel; epoch resets travel.
    pub fn from_change(change: &Change) -> Option<Item> {
        Some(match change {
            Change::Upserted(m) => Item::Upsert(m.clone()),
            Change::Removed { mapping, .. } => Item::Remove(key_of(mapping)),
            Change::EpochReset { subscriber, anchor } => Item::Epoch {
                subscriber: *subscriber,
                anchor: *anchor,
            },
            Change::ServerEpochReset { anchor } => Item::ServerEpoch { anchor: *anchor },
            Change::AnnounceOwed {
                subscriber,
                hosts,
                until,
            } => Item::AnnounceOwed {
                subscriber: *subscriber,
                hosts: hosts.clone(),
                until: *until,
            },
            Change::Requester { ip, state } => Item::Requester {
                ip: *ip,
                state: *state,
            },
            Change::PortHeld(h) => Item::PortHeld(*h),
        })
    }

    /// Whether a peer speaking link `version` can read this item.
    fn speaks(&self, version: u16) -> bool {
        match self {
            Item::Requester { .. } => version >= 3,
            Item::PortHeld(_) => version >= 5,
            _ => true,
        }
    }

    fn encode(&self, out: &mut Vec<u8>, version: u16) {
        match self {
            Item::Upsert(m) => {
                out.push(1);
                let v = if version < 3 && m.manager.is_some() {
                    // A version-2 peer reads record version 1 only.
                    encode_mapping(&MappingRecord {
                        manager: None,
                        ..m.clone()
                    })
                } else {
                    encode_mapping(m)
                };
                out.extend_from_slice(&(v.len() as u32).to_be_bytes());
                out.extend_from_slice(&v);
            }
            Item::Remove(k) => {
                out.push(2);
                out.push(k.len() as u8);
                out.extend_from_slice(k);
            }
            Item::Epoch { subscriber, anchor } => {
                out.push(3);
                out.extend_from_slice(&encode_subscriber(subscriber));
                out.extend_from_slice(&anchor.as_millis().to_be_bytes());
            }
            Item::ServerEpoch { anchor } => {
                out.push(4);
                out.extend_from_slice(&anchor.as_millis().to_be_bytes());
            }
            Item::Volatile {
                subscriber,
                hosts,
                until,
            } => {
                if version >= 4 {
                    out.push(8);
                    out.extend_from_slice(&encode_subscriber(subscriber));
                    out.extend_from_slice(&until.as_millis().to_be_bytes());
                } else {
                    out.push(5);
                    out.extend_from_slice(&encode_subscriber(subscriber));
                }
                encode_hosts(hosts, out);
            }
            Item::AnnounceOwed {
                subscriber,
                hosts,
                until,
            } => {
                out.push(6);
                out.extend_from_slice(&encode_subscriber(subscriber));
                out.extend_from_slice(&until.as_millis().to_be_bytes());
                encode_hosts(hosts, out);
            }
            Item::PortHeld(h) => {
                out.push(9);
                out.extend_from_slice(&portkeep_server::record::hold_key(h));
                out.extend_from_slice(&portkeep_server::record::encode_hold(h));
            }
            Item::Requester { ip, state } => {
                out.push(7);
                out.extend_from_slice(&portkeep_proto_addr(*ip));
                match state {
                    None => out.push(0),
                    Some(st) => {
                        let v = if version >= 4 {
                            encode_requester(st)
                        } else {
                            encode_requester_v1(st).to_vec()
                        };
                        out.push(v.len() as u8);
                        out.extend_from_slice(&v);
                    }
                }
            }
        }
    }

    fn decode(r: &mut Reader<'_>, keying: &SubscriberKeying) -> Option<Item> {
        // A subscriber is 16 address octets and a prefix length.
        let sub = |r: &mut Reader<'_>| decode_subscriber(r.take(17)?);
        Some(match r.u8()? {
            1 => {
                let n = r.u32()? as usize;
                Item::Upsert(decode_mapping(r.take(n)?, keying)?)
            }
            2 => {
                let n = usize::from(r.u8()?);
                Item::Remove(r.take(n)?.to_vec())
            }
            3 => Item::Epoch {
                subscriber: sub(r)?,
                anchor: Timestamp(r.u64()?),
            },
            4 => Item::ServerEpoch {
                anchor: Timestamp(r.u64()?),
            },
            5 => Item::Volatile {
                subscriber: sub(r)?,
                hosts: decode_hosts(r)?,
                until: Timestamp(u64::MAX),
            },
            8 => Item::Volatile {
                subscriber: sub(r)?,
                until: Timestamp(r.u64()?),
                hosts: decode_hosts(r)?,
            },
            6 => Item::AnnounceOwed {
                subscriber: sub(r)?,
                until: Timestamp(r.u64()?),
                hosts: decode_hosts(r)?,
            },
            7 => {
                let ip = r.ip()?;
                let n = usize::from(r.u8()?);
                let state = match n {
                    0 => None,
                    n => Some(decode_requester(r.take(n)?)?),
                };
                Item::Requester { ip, state }
            }
            9 => {
                let key = r.take(19)?;
                Item::PortHeld(portkeep_server::record::decode_hold(key, r.take(38)?)?)
            }
            _ => return None,
        })
    }
}

/// A host list: a 16-bit count, then 16 octets each (at most 65,535 are
/// sent; a subscriber is one prefix, so that is never the limit).
fn encode_hosts(hosts: &[std::net::IpAddr], out: &mut Vec<u8>) {
    out.extend_from_slice(&(hosts.len().min(u16::MAX as usize) as u16).to_be_bytes());
    for h in hosts.iter().take(u16::MAX as usize) {
        out.extend_from_slice(&portkeep_proto_addr(*h));
    }
}

fn decode_hosts(r: &mut Reader<'_>) -> Option<Vec<std::net::IpAddr>> {
    let n = usize::from(r.u16()?);
    let mut hosts = Vec::with_capacity(n.min(r.0.len() / 16));
    for _ in 0..n {
        hosts.push(r.ip()?);
    }
    Some(hosts)
}

/// One replication message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// First message in each direction: who I am and what I have.
    Hello {
        /// Sender's term.
        term: Term,
        /// Whether the sender believes it is active.
        active: bool,
        /// The log position the sender's stream should continue from (a
        /// backup says 0 to ask for a snapshot).
        applied: u64,
        /// The sender's clock, so the backup can translate the active's
        /// timestamps into its own clock on takeover.
        now: Timestamp,
        /// The highest link protocol version the sender speaks
        /// ([`LINK_VERSION`]); a Hello without one is version 1.
        version: u16,
        /// What the sender can vouch for (the default: nothing): an active
        /// that has not served yet hands over to a backup that holds more
        /// ([`Message::Handover`]).
        holds: Position,
    },
    /// Active to backup, once: the active had not served yet in this run
    /// and the backup holds fresher state (a later position in the same
    /// term); the active has stood down, and the backup takes over
    /// (failure-scenarios draft section 2.6: the freshest state is served
    /// after a double failure). Only sent to a peer of version 2 or later.
    Handover {
        /// Sender's term.
        term: Term,
    },
    /// Active to backup: the full check-pointed state as of `seq` follows.
    SnapshotBegin {
        /// Sender's term.
        term: Term,
        /// The log position the snapshot stands for.
        seq: u64,
    },
    /// Active to backup: part of the snapshot.
    SnapshotPart {
        /// Sender's term.
        term: Term,
        /// State items.
        items: Vec<Item>,
    },
    /// Active to backup: the snapshot is complete.
    SnapshotEnd {
        /// Sender's term.
        term: Term,
        /// The log position the snapshot stands for.
        seq: u64,
    },
    /// Active to backup: instead of a snapshot, the stream goes on after
    /// `from`, the position the backup said it holds: the changes it
    /// missed follow as [`Message::Changes`].
    Resume {
        /// Sender's term.
        term: Term,
        /// The backup's position the stream continues from.
        from: u64,
    },
    /// Active to backup: changes in log order, ending at `seq`.
    Changes {
        /// Sender's term.
        term: Term,
        /// Log position of the last change in this message.
        seq: u64,
        /// The items.
        items: Vec<Item>,
    },
    /// Backup to active: everything up to `seq` is applied.
    Ack {
        /// Sender's term.
        term: Term,
        /// Highest applied log position.
        seq: u64,
        /// The sender's clock at or before sending: what a
        /// [`Message::Lease`] in answer counts from.
        now: Timestamp,
    },
    /// Active to backup: until `since + for_ms` in the backup's own clock,
    /// the active releases no reply that depends on a change the backup has
    /// not acknowledged, so a backup promoted before then holds everything
    /// any client was told (failure-scenarios draft section 2.6: it may
    /// keep the epochs). `since` echoes the `now` of the backup's
    /// [`Message::Ack`] or [`Message::Heartbeat`] that the grant answers,
    /// so the backup's lease never outlasts the active's promise, however
    /// late the frames travel.
    Lease {
        /// Sender's term.
        term: Term,
        /// The backup's clock when it sent the frame answered.
        since: Timestamp,
        /// Length of the promise, in milliseconds.
        for_ms: u64,
    },
    /// Either way: still here.
    Heartbeat {
        /// Sender's term.
        term: Term,
        /// The sender's clock (see [`Message::Hello`]).
        now: Timestamp,
    },
}

/// The frames of a byte stream, read in place: each frame is decoded
/// where it lies, and the buffer is compacted only once what was read
/// makes up half of it, so a read that brings many frames (a snapshot)
/// costs time in proportion to its size, never to its size times its
/// frames.
#[derive(Debug, Default)]
pub struct FrameReader {
    buf: Vec<u8>,
    start: usize,
}

impl FrameReader {
    /// Appends bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start * 2 >= self.buf.len() {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole frame, if one is buffered.
    pub fn next(&mut self, keying: &SubscriberKeying) -> Result<Option<Message>, FrameError> {
        let rest = &self.buf[self.start..];
        if rest.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if len > MAX_FRAME {
            return Err(FrameError::TooLong(len));
        }
        if rest.len() < 4 + len {
            return Ok(None);
        }
        let msg = Message::parse(&rest[4..4 + len], keying);
        self.start += 4 + len;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        msg.map(Some)
    }

    /// Forgets everything buffered (a new connection).
    pub fn clear(&mut self) {
        self.buf.clear();
        self.start = 0;
    }

    /// Octets buffered and not yet read as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }
}

/// A frame that cannot be read: the link is closed and re-established.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Longer than [`MAX_FRAME`].
    #[error("replication frame of {0} octets exceeds the limit")]
    TooLong(usize),
    /// Malformed content.
    #[error("malformed replication frame (type {0})")]
    Malformed(u8),
}

impl Message {
    /// The sender's term.
    pub fn term(&self) -> Term {
        match self {
            Message::Hello { term, .. }
            | Message::Handover { term }
            | Message::SnapshotBegin { term, .. }
            | Message::SnapshotPart { term, .. }
            | Message::SnapshotEnd { term, .. }
            | Message::Resume { term, .. }
            | Message::Changes { term, .. }
            | Message::Ack { term, .. }
            | Message::Lease { term, .. }
            | Message::Heartbeat { term, .. } => *term,
        }
    }

    /// Appends the framed message, as this release speaks it.
    pub fn encode(&self, out: &mut Vec<u8>) {
        self.encode_for(LINK_VERSION, out);
    }

    /// Appends the framed message as a peer speaking link `version` reads
    /// it: items it would not understand are left out (what they carry
    /// only sharpens which clients are told of a loss; the check-pointed
    /// mappings all travel).
    pub fn encode_for(&self, version: u16, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; 4]);
        let items = |out: &mut Vec<u8>, items: &[Item]| {
            let n = items.iter().filter(|i| i.speaks(version)).count();
            out.extend_from_slice(&(n as u32).to_be_bytes());
            for i in items.iter().filter(|i| i.speaks(version)) {
                i.encode(out, version);
            }
        };
        match self {
            Message::Hello {
                term,
                active,
                applied,
                now,
                version,
                holds,
            } => {
                out.push(1);
                out.extend_from_slice(&term.to_be_bytes());
                out.push(u8::from(*active));
                out.extend_from_slice(&applied.to_be_bytes());
                out.extend_from_slice(&now.as_millis().to_be_bytes());
                out.extend_from_slice(&version.to_be_bytes());
                out.extend_from_slice(&holds.term.to_be_bytes());
                out.extend_from_slice(&holds.seq.to_be_bytes());
            }
            Message::Handover { term } => {
                out.push(10);
                out.extend_from_slice(&term.to_be_bytes());
            }
            Message::SnapshotBegin { term, seq } => {
                out.push(2);
                out.extend_from_slice(&term.to_be_bytes());
                out.extend_from_slice(&seq.to_be_bytes());
            }
            Message::SnapshotPart { term, items: it } => {
                out.push(3);
                out.extend_from_slice(&term.to_be_bytes());
                items(out, it);
            }
            Message::SnapshotEnd { term, seq } => {
                out.push(4);
                out.extend_from_slice(&term.to_be_bytes());
                out.extend_from_slice(&seq.to_be_bytes());
            }
            Message::Changes {
                term,
                seq,
                items: it,
            } => {
                out.push(5);
                out.extend_from_slice(&term.to_be_bytes());
                out.extend_from_slice(&seq.to_be_bytes());
                items(out, it);
            }
            Message::Ack { term, seq, now } => {
                out.push(6);
                out.extend_from_slice(&term.to_be_bytes());
                out.extend_from_slice(&seq.to_be_bytes());
                out.extend_from_slice(&now.as_millis().to_be_bytes());
            }
            Message::Lease {
                term,
                since,
                for_ms,
            } => {
                out.push(8);
                out.extend_from_slice(&term.to_be_bytes());
                out.extend_from_slice(&since.as_millis().to_be_bytes());
                out.extend_from_slice(&for_ms.to_be_bytes());
            }
            Message::Resume { term, from } => {
                out.push(9);
                out.extend_from_slice(&term.to_be_bytes());
                out.extend_from_slice(&from.to_be_bytes());
            }
            Message::Heartbeat { term, now } => {
                out.push(7);
                out.extend_from_slice(&term.to_be_bytes());
                out.extend_from_slice(&now.as_millis().to_be_bytes());
            }
        }
        let len = (out.len() - start - 4) as u32;
        out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    }

    /// Takes one complete frame off the front of `buf`: `Ok(None)` when
    /// more bytes are needed.
    pub fn decode(
        buf: &mut Vec<u8>,
        keying: &SubscriberKeying,
    ) -> Result<Option<Message>, FrameError> {
        if buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len > MAX_FRAME {
            return Err(FrameError::TooLong(len));
        }
        if buf.len() < 4 + len {
            return Ok(None);
        }
        let msg = Self::parse(&buf[4..4 + len], keying);
        buf.drain(..4 + len);
        msg.map(Some)
    }

    fn parse(b: &[u8], keying: &SubscriberKeying) -> Result<Message, FrameError> {
        let kind = b.first().copied().unwrap_or(0);
        let bad = FrameError::Malformed(kind);
        let mut r = Reader(b.get(1..).ok_or(bad.clone())?);
        let items = |r: &mut Reader<'_>| -> Option<Vec<Item>> {
            let n = r.u32()? as usize;
            // Each item takes at least 9 octets: bound the allocation by
            // what the frame can hold.
            let mut v = Vec::with_capacity(n.min(r.0.len() / 9 + 1));
            for _ in 0..n {
                v.push(Item::decode(r, keying)?);
            }
            Some(v)
        };
        let m = (|| {
            Some(match kind {
                1 => {
                    let term = r.u64()?;
                    let active = r.u8()? != 0;
                    let applied = r.u64()?;
                    let now = Timestamp(r.u64()?);
                    // Version 1 ended here; later versions append fields,
                    // and a Hello may carry fields of versions newer than
                    // this one, ignored here (the lower version is spoken).
                    let (version, holds) = if r.0.is_empty() {
                        (1, Position { term, seq: applied })
                    } else {
                        let v = r.u16()?;
                        let h = Position {
                            term: r.u64()?,
                            seq: r.u64()?,
                        };
                        r.0 = &[];
                        (v, h)
                    };
                    Message::Hello {
                        term,
                        active,
                        applied,
                        now,
                        version,
                        holds,
                    }
                }
                10 => Message::Handover { term: r.u64()? },
                2 => Message::SnapshotBegin {
                    term: r.u64()?,
                    seq: r.u64()?,
                },
                3 => Message::SnapshotPart {
                    term: r.u64()?,
                    items: items(&mut r)?,
                },
                4 => Message::SnapshotEnd {
                    term: r.u64()?,
                    seq: r.u64()?,
                },
                5 => Message::Changes {
                    term: r.u64()?,
                    seq: r.u64()?,
                    items: items(&mut r)?,
                },
                6 => Message::Ack {
                    term: r.u64()?,
                    seq: r.u64()?,
                    now: Timestamp(r.u64()?),
                },
                8 => Message::Lease {
                    term: r.u64()?,
                    since: Timestamp(r.u64()?),
                    for_ms: r.u64()?,
                },
                7 => Message::Heartbeat {
                    term: r.u64()?,
                    now: Timestamp(r.u64()?),
                },
                9 => Message::Resume {
                    term: r.u64()?,
                    from: r.u64()?,
                },
                _ => return None,
            })
        })();
        match m {
            // A term no pair reaches (one per promotion) is refused: a peer
            // that could make a node adopt one would leave it no higher
            // term to fence with (found by fuzzing: u64::MAX overflowed
            // the next promotion's term).
            Some(m) if r.0.is_empty() && m.term() < MAX_TERM => Ok(m),
            _ => Err(bad),
        }
    }
}

/// An address in its 128-bit wire form (IPv4-mapped for IPv4).
fn portkeep_proto_addr(ip: std::net::IpAddr) -> [u8; 16] {
    match ip {
        std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        std::net::IpAddr::V6(v6) => v6.octets(),
    }
}

/// Appends `items` as the link encodes them (a count, then each item):
/// how a backup logs what it applies ([`decode_items`] reads it back).
pub fn encode_items(items: &[Item], out: &mut Vec<u8>) {
    out.extend_from_slice(&(items.len() as u32).to_be_bytes());
    for i in items {
        i.encode(out, LINK_VERSION);
    }
}

/// Items written by [`encode_items`], all of `b` or nothing.
pub fn decode_items(b: &[u8], keying: &SubscriberKeying) -> Option<Vec<Item>> {
    let mut r = Reader(b);
    let n = r.u32()? as usize;
    let mut v = Vec::with_capacity(n.min(r.0.len() / 9 + 1));
    for _ in 0..n {
        v.push(Item::decode(&mut r, keying)?);
    }
    r.0.is_empty().then_some(v)
}

/// The items of a batch of changes.
pub fn items_of(changes: &[ChangeRecord]) -> Vec<Item> {
    changes
        .iter()
        .filter_map(|c| Item::from_change(&c.change))
        .collect()
}
