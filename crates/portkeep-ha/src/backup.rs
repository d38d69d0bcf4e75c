//! The backup node's end of the replication link.

use std::collections::BTreeMap;
use std::net::IpAddr;

use portkeep_server::record::{hold_key, key_of};
use portkeep_server::{
    MappingRecord, PortHold, RequesterState, Restored, SubscriberId, SubscriberKeying, Timestamp,
};

use crate::wire::{FrameError, Item, Message, Position};
use crate::Term;

/// The replicated state.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct State {
    mappings: BTreeMap<Vec<u8>, MappingRecord>,
    anchors: BTreeMap<SubscriberId, Timestamp>,
    server_anchor: Option<Timestamp>,
    volatile: BTreeMap<SubscriberId, (Vec<IpAddr>, Timestamp)>,
    owed: BTreeMap<SubscriberId, (Vec<IpAddr>, Timestamp)>,
    requesters: BTreeMap<IpAddr, RequesterState>,
    /// By `record::hold_key`: a later hold on an endpoint replaces one.
    holds: BTreeMap<[u8; 19], PortHold>,
}

impl State {
    fn to_replica(&self, term: Term, seq: u64, offset_ms: i64) -> Replica {
        Replica {
            term,
            seq,
            offset_ms,
            server_anchor: self.server_anchor,
            anchors: self.anchors.iter().map(|(s, a)| (*s, *a)).collect(),
            mappings: self.mappings.values().cloned().collect(),
            volatile: self
                .volatile
                .iter()
                .map(|(s, (h, u))| (*s, h.clone(), *u))
                .collect(),
            owed: self
                .owed
                .iter()
                .map(|(s, (h, u))| (*s, h.clone(), *u))
                .collect(),
            requesters: self.requesters.iter().map(|(ip, r)| (*ip, *r)).collect(),
            holds: self.holds.values().copied().collect(),
        }
    }

    fn from_replica(r: Replica) -> State {
        State {
            mappings: r.mappings.into_iter().map(|m| (key_of(&m), m)).collect(),
            anchors: r.anchors.into_iter().collect(),
            server_anchor: r.server_anchor,
            volatile: r
                .volatile
                .into_iter()
                .map(|(s, h, u)| (s, (h, u)))
                .collect(),
            owed: r.owed.into_iter().map(|(s, h, u)| (s, (h, u))).collect(),
            requesters: r.requesters.into_iter().collect(),
            holds: r.holds.into_iter().map(|h| (hold_key(&h), h)).collect(),
        }
    }

    fn apply(&mut self, item: Item) {
        match item {
            Item::Upsert(m) => {
                self.mappings.insert(key_of(&m), m);
            }
            Item::Remove(k) => {
                self.mappings.remove(&k);
            }
            Item::Epoch { subscriber, anchor } => {
                self.anchors.insert(subscriber, anchor);
            }
            Item::ServerEpoch { anchor } => {
                self.server_anchor = Some(anchor);
                self.anchors.clear();
            }
            Item::Volatile {
                subscriber,
                hosts,
                until,
            } => {
                if hosts.is_empty() {
                    self.volatile.remove(&subscriber);
                } else {
                    self.volatile.insert(subscriber, (hosts, until));
                }
            }
            Item::AnnounceOwed {
                subscriber,
                hosts,
                until,
            } => {
                if hosts.is_empty() {
                    self.owed.remove(&subscriber);
                } else {
                    self.owed.insert(subscriber, (hosts, until));
                }
            }
            Item::PortHeld(h) => {
                self.holds.insert(hold_key(&h), h);
            }
            Item::Requester { ip, state } => match state {
                Some(st) => {
                    self.requesters.insert(ip, st);
                }
                None => {
                    self.requesters.remove(&ip);
                }
            },
        }
    }
}

/// A backup's replica as it is made durable, and read back when the node
/// starts again: it exists once a snapshot was completed, and every
/// position it acknowledged is in it (RFC 7767 section 3.2: an
/// acknowledged check-point must survive the backup's crash too).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replica {
    /// The term of the active whose state it is (0: not known, a replica
    /// stored by an earlier release).
    pub term: Term,
    /// The active's log position it stands for.
    pub seq: u64,
    /// The active's clock minus this node's, in milliseconds, as last
    /// measured: the timestamps below are in the active's clock.
    pub offset_ms: i64,
    /// The active's server-wide epoch anchor.
    pub server_anchor: Option<Timestamp>,
    /// Subscribers' own epoch anchors.
    pub anchors: Vec<(SubscriberId, Timestamp)>,
    /// The mappings the active replicates (check-pointed, or check-pointed
    /// once and not yet removed).
    pub mappings: Vec<MappingRecord>,
    /// Subscribers' hosts that hold volatile state on the active, and when
    /// the last of it expires (the active's clock).
    pub volatile: Vec<(SubscriberId, Vec<IpAddr>, Timestamp)>,
    /// Subscribers' hosts owed an ANNOUNCE after a loss, until when.
    pub owed: Vec<(SubscriberId, Vec<IpAddr>, Timestamp)>,
    /// THIRD_PARTY requesters (`portkeep_server::RequesterState`).
    pub requesters: Vec<(IpAddr, RequesterState)>,
    /// External endpoints held after they were freed (RFC 6887 section
    /// 15), until when in the active's clock.
    pub holds: Vec<PortHold>,
}

/// What a backup must make durable before it acknowledges `seq`
/// ([`Backup::take_unpersisted`]), in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaWrite {
    /// A completed snapshot: the stored replica is replaced by this one.
    Replace(Replica),
    /// The stream: apply these items to the stored replica, which then
    /// stands for `seq`.
    Apply {
        /// The position after the items.
        seq: u64,
        /// [`Replica::offset_ms`] as measured now.
        offset_ms: i64,
        /// The items, in order.
        items: Vec<Item>,
    },
}

impl Replica {
    /// The replica a node that served last starts from when it starts as a
    /// backup with none stored: the state it served, as of its last log
    /// position (a promotion from it is stale: every epoch resets).
    pub fn of_served(r: &portkeep_server::Restored) -> Replica {
        Replica {
            term: r.term,
            seq: r.last_seq,
            offset_ms: 0,
            server_anchor: Some(r.anchor),
            anchors: r.subscriber_anchors.clone(),
            mappings: r.mappings.clone(),
            volatile: Vec::new(),
            owed: r.owed.clone(),
            requesters: r.requesters.clone(),
            holds: r.holds.clone(),
        }
    }

    /// Applies a write to a stored replica: what a durable store does,
    /// for stores that keep the replica as one value (tests, the
    /// simulator).
    pub fn apply(&mut self, write: ReplicaWrite) {
        match write {
            ReplicaWrite::Replace(r) => *self = r,
            ReplicaWrite::Apply {
                seq,
                offset_ms,
                items,
            } => {
                let term = self.term;
                let mut st = State::from_replica(std::mem::take(self));
                for i in items {
                    st.apply(i);
                }
                *self = st.to_replica(term, seq, offset_ms);
            }
        }
    }
}

/// How much of the active's state a promoted backup can vouch for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TakeoverKind {
    /// In sync until the active was lost: check-pointed mappings and the
    /// epochs of fully check-pointed subscribers continue; subscribers
    /// that held volatile state reset (failure-scenarios draft 2.6).
    Hot,
    /// A snapshot was received once, but the active's lease had ended (or
    /// the link was resyncing) at promotion, so the active may have made
    /// volatile state this node never heard of: the check-pointed mappings
    /// continue (each was acknowledged), every epoch resets.
    Stale,
    /// No snapshot was ever completed (cold standby): nothing continues.
    Cold,
}

/// What a promoted backup starts from.
#[derive(Debug, Clone)]
pub struct Takeover {
    /// The new term (one above the highest seen).
    pub term: Term,
    /// The state to restore the server core from
    /// (`portkeep_server::Server::restore`), in this node's clock.
    pub state: Restored,
    /// Subscribers whose state was lost (they held volatile mappings, or
    /// every subscriber on a stale takeover), with the hosts to send an
    /// unsolicited ANNOUNCE to, and THIRD_PARTY requesters that lost state
    /// they manage (each as its own subscriber's one host). Their epochs
    /// (the requesters' own) are already reset in `state`.
    pub reset: Vec<(SubscriberId, Vec<IpAddr>)>,
    /// Hosts still owed an ANNOUNCE after an earlier loss
    /// (`Item::AnnounceOwed`): told again, their epochs left as they are
    /// (on a stale takeover they are in `reset` instead).
    pub owed: Vec<(SubscriberId, Vec<IpAddr>)>,
    /// Whether the backup was in sync ([`TakeoverKind::Hot`]).
    pub was_in_sync: bool,
    /// How much continues.
    pub kind: TakeoverKind,
}

impl Takeover {
    /// The hosts to send an unsolicited ANNOUNCE to once the state is
    /// restored (failure-scenarios draft section 2.6; RFC 6887 section
    /// 14.1.1): those of the subscribers whose epochs reset, and those of
    /// the mappings the restore had to drop (`RestoreReport::dropped`),
    /// each once.
    pub fn announce_targets(
        &self,
        dropped: &[portkeep_server::MappingRecord],
    ) -> Vec<(SubscriberId, IpAddr)> {
        let mut t: Vec<(SubscriberId, IpAddr)> = self
            .reset
            .iter()
            .chain(&self.owed)
            .flat_map(|(s, hosts)| hosts.iter().map(move |h| (*s, *h)))
            .chain(dropped.iter().map(|m| (m.subscriber, m.key.internal_ip)))
            .collect();
        t.sort();
        t.dedup();
        t
    }
}

/// The backup node's end of one replication link.
#[derive(Debug)]
pub struct Backup {
    term: Term,
    keying: SubscriberKeying,
    state: State,
    staging: Option<State>,
    applied: u64,
    /// A snapshot completed at some point: `state` holds real data.
    has_state: bool,
    /// The current connection delivered a complete snapshot.
    synced: bool,
    /// When the last connection was lost, if it is down.
    lost_at: Option<Timestamp>,
    /// The active's clock minus ours, in milliseconds, as last measured:
    /// the active's timestamps are translated by it on takeover, so the
    /// two nodes' clocks need not agree (the anchors travel, not the clocks).
    offset_ms: i64,
    /// Snapshot parts received on this connection.
    parts: u64,
    /// Positions applied but not yet handed out to be persisted, with
    /// what to write: acknowledged only once persisted
    /// ([`Backup::persisted`]).
    unpersisted: Vec<(u64, ReplicaWrite)>,
    /// Whether a connection is up (acknowledgements have somewhere to go).
    up: bool,
    /// The latest clock reading handed in: acknowledgements carry it, so
    /// a lease counted from it starts no later than the frame left.
    last_now: Timestamp,
    /// Until when the active promised to release nothing this node has not
    /// acknowledged ([`Message::Lease`]), in this node's clock.
    lease_until: Option<Timestamp>,
    /// A resume offered did not fit: the next hello asks for a snapshot.
    want_snapshot: bool,
    /// The active handed this backup the service ([`Message::Handover`]).
    service_handed: bool,
    /// The term of the active whose state `state` is.
    state_term: Term,
    #[cfg(feature = "planted-ack-before-persist")]
    ack_before_persist: bool,
    out: Vec<u8>,
    inbuf: crate::wire::FrameReader,
}

impl Backup {
    /// A backup in `term` (as stored from its last run).
    pub fn new(term: Term, keying: SubscriberKeying) -> Backup {
        Backup {
            term,
            keying,
            state: State::default(),
            staging: None,
            applied: 0,
            has_state: false,
            synced: false,
            lost_at: None,
            offset_ms: 0,
            parts: 0,
            unpersisted: Vec::new(),
            up: false,
            last_now: Timestamp(0),
            lease_until: None,
            want_snapshot: false,
            service_handed: false,
            state_term: 0,
            #[cfg(feature = "planted-ack-before-persist")]
            ack_before_persist: false,
            out: Vec::new(),
            inbuf: crate::wire::FrameReader::default(),
        }
    }

    /// A backup starting again from its stored replica: it can vouch for
    /// the check-pointed mappings in it (each was acknowledged only once
    /// stored), but for no epoch until a new snapshot completes: a
    /// promotion before that is [`TakeoverKind::Stale`].
    pub fn resume(term: Term, keying: SubscriberKeying, replica: Replica) -> Backup {
        let mut b = Backup::new(term, keying);
        b.applied = replica.seq;
        b.offset_ms = replica.offset_ms;
        b.state_term = replica.term;
        b.state = State::from_replica(replica);
        b.has_state = true;
        b
    }

    /// The replica as it stands (what [`ReplicaWrite`]s applied in order
    /// to a stored one give).
    pub fn replica(&self) -> Replica {
        self.state
            .to_replica(self.state_term, self.applied, self.offset_ms)
    }

    /// What this backup vouches for (the default: nothing): its
    /// replica's term and position, acknowledged or about to be.
    pub fn holds(&self) -> Position {
        if self.has_state {
            Position {
                term: self.state_term,
                seq: self.applied,
            }
        } else {
            Position::default()
        }
    }

    /// Whether the active handed this backup the service since the last
    /// call ([`Message::Handover`]): it should take over now.
    pub fn take_service_handed(&mut self) -> bool {
        std::mem::take(&mut self.service_handed)
    }

    /// `term` was served somewhere (an external witness says so): a
    /// promotion acts above it.
    pub fn observe_term(&mut self, term: Term) {
        self.term = self.term.max(term);
    }

    /// The highest term seen.
    pub fn term(&self) -> Term {
        self.term
    }

    /// Whether the current connection delivered a full snapshot and the
    /// stream since.
    pub fn in_sync(&self) -> bool {
        self.synced && self.lost_at.is_none()
    }

    /// Last log position applied.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// Number of check-pointed mappings held.
    pub fn mapping_count(&self) -> usize {
        self.state
            .mappings
            .values()
            .filter(|m| m.checkpoint)
            .count()
    }

    /// Number of subscribers known to hold volatile state.
    pub fn volatile_count(&self) -> usize {
        self.state.volatile.len()
    }

    /// Items of the snapshot being received, so far (resync progress).
    pub fn staging_count(&self) -> Option<usize> {
        self.staging.as_ref().map(|s| s.mappings.len())
    }

    /// The active's clock minus ours, in milliseconds.
    pub fn clock_offset_ms(&self) -> i64 {
        self.offset_ms
    }

    /// Planted defect: acknowledge on receipt, before persisting.
    #[cfg(feature = "planted-ack-before-persist")]
    pub fn set_ack_before_persist(&mut self, on: bool) {
        self.ack_before_persist = on;
    }

    /// Positions applied since the last call, each with what to write:
    /// the writes must be made durable in order, then reported with
    /// [`Backup::persisted`], before the position is acknowledged (an
    /// acknowledged check-point must survive this node's crash).
    pub fn take_unpersisted(&mut self) -> Vec<(u64, ReplicaWrite)> {
        std::mem::take(&mut self.unpersisted)
    }

    /// Everything applied up to `seq` is persisted: acknowledge it (one
    /// acknowledgement covers every position up to it).
    pub fn persisted(&mut self, seq: u64) {
        if !self.up || seq > self.applied {
            return;
        }
        #[cfg(feature = "planted-ack-before-persist")]
        if self.ack_before_persist {
            return;
        }
        Message::Ack {
            term: self.term,
            seq,
            now: self.last_now,
        }
        .encode(&mut self.out);
    }

    fn applied_up_to(&mut self, term: Term, seq: u64, write: ReplicaWrite) {
        self.unpersisted.push((seq, write));
        #[cfg(feature = "planted-ack-before-persist")]
        if self.ack_before_persist {
            let now = self.last_now;
            Message::Ack { term, seq, now }.encode(&mut self.out);
        }
        let _ = term;
    }

    /// Until when the active's last lease runs, in this node's clock.
    pub fn lease_until(&self) -> Option<Timestamp> {
        self.lease_until
    }

    /// A connection from the active is up.
    pub fn connected(&mut self, now: Timestamp) {
        self.up = true;
        self.last_now = self.last_now.max(now);
        self.unpersisted.clear();
        self.inbuf.clear();
        self.staging = None;
        // Until a new snapshot completes, this backup cannot vouch for
        // being current.
        self.synced = false;
        self.lost_at = None;
        // The position it holds (0 asks for a snapshot): an active that
        // kept every change since streams them instead.
        let applied = if self.want_snapshot || !self.has_state {
            0
        } else {
            self.applied
        };
        Message::Hello {
            term: self.term,
            active: false,
            applied,
            now,
            version: crate::wire::LINK_VERSION,
            holds: self.holds(),
        }
        .encode(&mut self.out);
    }

    /// The connection is gone.
    pub fn disconnected(&mut self, now: Timestamp) {
        self.up = false;
        self.unpersisted.clear();
        self.staging = None;
        self.out.clear();
        if self.lost_at.is_none() {
            self.lost_at = Some(now);
        }
    }

    fn measure(&mut self, now: Timestamp, theirs: Timestamp) {
        let d = i128::from(theirs.as_millis()) - i128::from(now.as_millis());
        self.offset_ms = d.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64;
    }

    /// Feeds bytes from the active, received at `now`.
    pub fn handle_input(&mut self, now: Timestamp, bytes: &[u8]) -> Result<(), FrameError> {
        self.last_now = self.last_now.max(now);
        self.inbuf.push(bytes);
        while let Some(m) = self.inbuf.next(&self.keying)? {
            if m.term() < self.term {
                // A deposed active still streaming: tell it the current
                // term, and take nothing from it (fencing).
                let (term, applied, holds) = (self.term, self.applied, self.holds());
                Message::Hello {
                    term,
                    active: false,
                    applied,
                    now,
                    version: crate::wire::LINK_VERSION,
                    holds,
                }
                .encode(&mut self.out);
                continue;
            }
            self.term = m.term();
            match m {
                Message::Hello { now: theirs, .. } => self.measure(now, theirs),
                Message::Handover { .. } => {
                    // The active of our term stood down for our fresher
                    // state (it checked; a backup with nothing is never
                    // handed anything).
                    self.service_handed = self.has_state;
                }
                Message::SnapshotBegin { .. } => self.staging = Some(State::default()),
                Message::SnapshotPart { items, term } => {
                    if let Some(s) = &mut self.staging {
                        for i in items {
                            s.apply(i);
                        }
                        // A large snapshot takes longer than the active's
                        // silence bound to arrive, and its heartbeats queue
                        // behind it: say we are alive as parts come in.
                        self.parts += 1;
                        if self.parts.is_multiple_of(16) {
                            Message::Heartbeat { term, now }.encode(&mut self.out);
                        }
                    }
                }
                Message::SnapshotEnd { seq, term } => {
                    if let Some(s) = self.staging.take() {
                        self.state = s;
                        self.state_term = term;
                        self.applied = seq;
                        self.synced = true;
                        self.has_state = true;
                        self.want_snapshot = false;
                        let write = ReplicaWrite::Replace(self.replica());
                        self.applied_up_to(term, seq, write);
                    }
                }
                Message::Resume { from, term } => {
                    if !self.has_state || from != self.applied || self.staging.is_some() {
                        // Cannot happen with a sound active: ask for a
                        // snapshot on the next connection rather than
                        // follow a stream that does not fit.
                        self.want_snapshot = true;
                        return Err(FrameError::Malformed(9));
                    }
                    // What it holds is the active's log up to `from`; the
                    // changes since follow. An empty write orders its
                    // acknowledgement after every write still being stored.
                    self.synced = true;
                    self.state_term = term;
                    let write = ReplicaWrite::Apply {
                        seq: from,
                        offset_ms: self.offset_ms,
                        items: Vec::new(),
                    };
                    self.applied_up_to(term, from, write);
                }
                Message::Changes { seq, items, term } => {
                    if !self.synced || seq <= self.applied {
                        continue;
                    }
                    for i in items.iter().cloned() {
                        self.state.apply(i);
                    }
                    self.applied = seq;
                    let offset_ms = self.offset_ms;
                    let write = ReplicaWrite::Apply {
                        seq,
                        offset_ms,
                        items,
                    };
                    self.applied_up_to(term, seq, write);
                }
                Message::Heartbeat { term, now: theirs } => {
                    self.measure(now, theirs);
                    Message::Heartbeat { term, now }.encode(&mut self.out);
                }
                Message::Lease { since, for_ms, .. } => {
                    // Only a synced replica can be vouched for. A
                    // thirty-second of the lease is left for the two
                    // clocks' rates to differ.
                    if self.synced {
                        let len = for_ms.saturating_sub(for_ms / 32);
                        let until = Timestamp(since.as_millis().saturating_add(len));
                        self.lease_until = Some(self.lease_until.map_or(until, |t| t.max(until)));
                    }
                }
                Message::Ack { .. } => {}
            }
        }
        Ok(())
    }

    /// Bytes to write to the active.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        (!self.out.is_empty()).then(|| std::mem::take(&mut self.out))
    }

    /// Becomes active (keepalived's notify hook, `portkeepd ctl promote`).
    ///
    /// Failure-scenarios draft section 2.6: a subscriber whose whole state
    /// was check-pointed keeps its epoch (the anchor travelled, and is
    /// translated into this node's clock, so the two clocks need not
    /// agree); one that held volatile mappings lost state: its epoch resets
    /// at `now` and its hosts get an ANNOUNCE.
    ///
    /// That needs the active's lease ([`Message::Lease`]) to run at `now`:
    /// until it ends the active released nothing this node has not
    /// acknowledged, but after it the active may have answered volatile
    /// requests this node never heard of, so every epoch resets instead
    /// ([`TakeoverKind::Stale`]; the check-pointed mappings still
    /// continue, each was acknowledged). Whether the link failed or the
    /// active died, and how late the frames travelled, does not matter. A
    /// backup that never completed a snapshot is a cold standby: every
    /// epoch resets.
    pub fn promote(self, now: Timestamp) -> Takeover {
        let term = self.term.saturating_add(1);
        if !self.has_state {
            return Takeover {
                term,
                state: Restored {
                    anchor: now,
                    subscriber_anchors: Vec::new(),
                    mappings: Vec::new(),
                    last_seq: self.applied,
                    term,
                    owed: Vec::new(),
                    requesters: Vec::new(),
                    holds: Vec::new(),
                },
                reset: Vec::new(),
                owed: Vec::new(),
                was_in_sync: false,
                kind: TakeoverKind::Cold,
            };
        }
        let leased = self.lease_until.is_some_and(|t| now < t);
        let kind = if self.synced && leased {
            TakeoverKind::Hot
        } else {
            TakeoverKind::Stale
        };
        let off = self.offset_ms;
        let local = |t: Timestamp| -> Timestamp {
            let v = i128::from(t.as_millis()) - i128::from(off);
            Timestamp(v.clamp(0, i128::from(u64::MAX)) as u64)
        };
        let st = self.state;
        // Owed ANNOUNCEs still due, in this node's clock.
        let owed: Vec<(SubscriberId, Vec<IpAddr>, Timestamp)> = st
            .owed
            .iter()
            .map(|(s, (h, u))| (*s, h.clone(), local(*u)))
            .filter(|(_, _, u)| *u > now)
            .collect();
        // Holds still running, in this node's clock: the endpoints stay
        // back from other clients across the takeover (RFC 6887 section 15).
        let holds: Vec<PortHold> = st
            .holds
            .values()
            .map(|h| PortHold {
                until: local(h.until),
                ..*h
            })
            .filter(|h| h.until > now)
            .collect();
        let mappings: Vec<_> = st
            .mappings
            .into_values()
            .map(|mut m| {
                m.expires = local(m.expires);
                m
            })
            .collect();
        if kind == TakeoverKind::Stale {
            // Every subscriber restarts its epoch: the server-wide anchor
            // moves to now and no subscriber keeps its own. Every host this
            // node knows of is told.
            let mut hosts: BTreeMap<SubscriberId, Vec<IpAddr>> = BTreeMap::new();
            for m in &mappings {
                hosts
                    .entry(m.subscriber)
                    .or_default()
                    .push(m.key.internal_ip);
            }
            for (sub, (v, _)) in &st.volatile {
                hosts.entry(*sub).or_default().extend(v.iter().copied());
            }
            for (sub, v, _) in &owed {
                hosts.entry(*sub).or_default().extend(v.iter().copied());
            }
            // Every requester is told too; its epoch is the new server
            // epoch like everyone's, anchored at it so that the requester
            // stays known (its port, for the ANNOUNCEs) even with no
            // mapping left.
            for ip in st.requesters.keys() {
                hosts
                    .entry(self.keying.subscriber_of(*ip))
                    .or_default()
                    .push(*ip);
            }
            let requesters = st
                .requesters
                .iter()
                .map(|(ip, r)| {
                    (
                        *ip,
                        RequesterState {
                            anchor: Some(now),
                            ..*r
                        },
                    )
                })
                .collect();
            let reset = hosts
                .into_iter()
                .map(|(s, mut v)| {
                    v.sort_unstable();
                    v.dedup();
                    (s, v)
                })
                .collect();
            return Takeover {
                term,
                state: Restored {
                    anchor: now,
                    subscriber_anchors: Vec::new(),
                    mappings,
                    last_seq: self.applied,
                    term,
                    owed,
                    requesters,
                    holds,
                },
                reset,
                owed: Vec::new(),
                was_in_sync: false,
                kind,
            };
        }
        let mut anchors: BTreeMap<SubscriberId, Timestamp> =
            st.anchors.iter().map(|(s, a)| (*s, local(*a))).collect();
        // Volatile state that expired before now was not lost here, even
        // if its expiry never reached this node (the active died first):
        // its epoch stays (failure-scenarios draft 2.6.1: reset exactly
        // when state was lost). The active made every later end known
        // before answering the renewal that set it.
        let alive = |until: Timestamp| local(until) > now;
        let mut reset = Vec::new();
        for (sub, (hosts, until)) in &st.volatile {
            if alive(*until) {
                anchors.insert(*sub, now);
                reset.push((*sub, hosts.clone()));
            }
        }
        // A THIRD_PARTY client that held volatile mappings lost them with
        // the active: its own epoch restarts and it is told, at the port
        // its requests came from (failure-scenarios draft 2.6.1).
        let mut requesters = Vec::with_capacity(st.requesters.len());
        for (ip, r) in &st.requesters {
            let anchor = if r.volatile_until.is_some_and(alive) {
                reset.push((self.keying.subscriber_of(*ip), vec![*ip]));
                Some(now)
            } else {
                r.anchor.map(local)
            };
            requesters.push((*ip, RequesterState { anchor, ..*r }));
        }
        // Subscribers the active never reset share its server anchor, which
        // the snapshot carries.
        let anchor = st.server_anchor.map_or(now, local);
        Takeover {
            term,
            state: Restored {
                anchor,
                subscriber_anchors: anchors.into_iter().collect(),
                mappings,
                last_seq: self.applied,
                term,
                owed: owed.clone(),
                requesters,
                holds,
            },
            reset,
            owed: owed.into_iter().map(|(s, h, _)| (s, h)).collect(),
            was_in_sync: true,
            kind,
        }
    }
}
