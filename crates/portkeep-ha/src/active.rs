//! The active node's end of the replication link.

use std::collections::VecDeque;
use std::time::Duration;

use portkeep_server::{SubscriberKeying, Timestamp};

use crate::wire::{FrameError, Item, Message, Position};
use crate::Term;

/// Timing of the link.
#[derive(Debug, Clone, Copy)]
pub struct ActiveConfig {
    /// How long a change may wait for the backup's acknowledgement before
    /// the backup counts as out of sync (RFC 7767 section 3.2: honoured
    /// check-points wait for the backup, within this bound).
    pub ack_timeout: Duration,
    /// Interval of heartbeats when there is nothing else to send.
    pub heartbeat: Duration,
    /// The backup is considered gone after this long without a word.
    pub dead_after: Duration,
    /// Items per snapshot message.
    pub snapshot_part: usize,
    /// How long each [`Message::Lease`] promises the backup that nothing
    /// it has not acknowledged reaches a client: replies that depend on
    /// unacknowledged changes wait up to this long after the last grant
    /// when the backup falls silent or behind, and a backup promoted
    /// within it keeps the epochs. Zero grants nothing (every takeover
    /// resets every epoch). Kept under 2 s, so a held reply still passes
    /// its client's RFC 6887 section 8.5 check.
    pub lease: Duration,
    /// Items of recent changes kept so that a backup that reconnects (its
    /// link failed, or it restarted from its stored replica) catches up
    /// from its position instead of taking a whole snapshot. Zero keeps
    /// none.
    pub resume_items: usize,
}

impl Default for ActiveConfig {
    fn default() -> Self {
        ActiveConfig {
            ack_timeout: Duration::from_millis(200),
            heartbeat: Duration::from_millis(100),
            dead_after: Duration::from_millis(1000),
            snapshot_part: 512,
            lease: Duration::from_millis(1500),
            resume_items: 262_144,
        }
    }
}

/// Where the link stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// No connection to a backup.
    Disconnected,
    /// Connected; waiting for the backup's hello.
    Handshake,
    /// The backup asked to be brought up to date: the daemon must call
    /// [`Active::send_snapshot`].
    NeedSnapshot,
    /// Snapshot sent; waiting for the backup to acknowledge it.
    Resyncing {
        /// Log position of the snapshot.
        seq: u64,
    },
    /// Every change sent was acknowledged within the bound: check-points
    /// can be honoured.
    InSync,
    /// An acknowledgement is overdue: honour nothing until it catches up.
    Lagging,
    /// A node with a higher term exists: this node must stop acting as
    /// active.
    Fenced {
        /// The higher term.
        term: Term,
    },
}

/// What the daemon must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActiveEvent {
    /// Everything up to this log position is on the backup: responses
    /// waiting for it can be released.
    Acked(u64),
    /// The backup is in sync (again).
    InSync,
    /// The backup is not in sync: responses still waiting must be answered
    /// as not honoured, and nothing new honoured.
    OutOfSync(&'static str),
    /// The backup asked for a full snapshot.
    NeedSnapshot,
    /// A higher term was seen: stop acting as active.
    Fenced(Term),
    /// The backup holds fresher state than this active, which had not
    /// served yet ([`Active::connected`] with `may_hand_over`): a
    /// [`Message::Handover`] was sent; stop acting as active.
    HandedOver {
        /// What the backup holds.
        peer_holds: Position,
    },
}

/// The frames of a snapshot of `items` as of log position `seq`, in parts
/// of `part` items, for a peer speaking link `version`
/// ([`Message::encode_for`]).
pub fn encode_snapshot(
    term: Term,
    seq: u64,
    items: Vec<Item>,
    part: usize,
    version: u16,
) -> Vec<u8> {
    let mut out = Vec::new();
    Message::SnapshotBegin { term, seq }.encode(&mut out);
    // Front to back without moving the rest each time (`split_off` at the
    // front would copy the remainder per part: quadratic in the snapshot).
    let mut it = items.into_iter();
    loop {
        let items: Vec<Item> = it.by_ref().take(part.max(1)).collect();
        if items.is_empty() {
            break;
        }
        Message::SnapshotPart { term, items }.encode_for(version, &mut out);
    }
    Message::SnapshotEnd { term, seq }.encode(&mut out);
    out
}

/// The active node's end of one replication link.
#[derive(Debug)]
pub struct Active {
    term: Term,
    cfg: ActiveConfig,
    keying: SubscriberKeying,
    state: LinkState,
    out: Vec<u8>,
    inbuf: crate::wire::FrameReader,
    events: VecDeque<ActiveEvent>,
    /// Highest position the backup acknowledged.
    acked: u64,
    /// Highest position sent.
    sent: u64,
    /// The highest position sent that a reply must wait for even when it
    /// carries nothing of its own: everything sent except what
    /// [`Active::push_depending`] said no reply depends on.
    awaited: u64,
    /// Sent, unacknowledged positions with when they were sent.
    pending: VecDeque<(u64, Timestamp)>,
    last_heard: Timestamp,
    last_sent: Timestamp,
    /// The term of a peer that answered our hello claiming to be active.
    peer_active: Option<Term>,
    /// The log position of the state this node vouches for, told in
    /// its Hello.
    holds: Position,
    /// Whether this connection may end in a handover (the node has not
    /// served yet).
    may_hand_over: bool,
    /// The link version the backup speaks (from its Hello; this release's
    /// until then).
    peer_version: u16,
    /// Until when this node promised (by [`Message::Lease`]) to release
    /// nothing the backup has not acknowledged; it outlives the
    /// connection that carried it.
    lease_until: Option<Timestamp>,
    /// When the last grant was made.
    granted_at: Option<Timestamp>,
    /// Recent changes' items by log position, for a backup's resume.
    ring: VecDeque<(u64, Vec<Item>)>,
    /// Items in `ring`.
    ring_items: usize,
    /// Every change after this position is in `ring` (none while `None`:
    /// no snapshot of this term was sent yet, or changes were dropped).
    ring_floor: Option<u64>,
    /// Backups that resumed instead of taking a snapshot.
    resumes: u64,
}

impl Active {
    /// A link end for an active node in `term`.
    pub fn new(term: Term, cfg: ActiveConfig, keying: SubscriberKeying) -> Active {
        Active {
            term,
            cfg,
            keying,
            state: LinkState::Disconnected,
            out: Vec::new(),
            inbuf: crate::wire::FrameReader::default(),
            events: VecDeque::new(),
            acked: 0,
            sent: 0,
            awaited: 0,
            pending: VecDeque::new(),
            last_heard: Timestamp(0),
            last_sent: Timestamp(0),
            peer_active: None,
            holds: Position::default(),
            may_hand_over: false,
            peer_version: crate::wire::LINK_VERSION,
            lease_until: None,
            granted_at: None,
            ring: VecDeque::new(),
            ring_items: 0,
            ring_floor: None,
            resumes: 0,
        }
    }

    /// Keeps the items of the change at `seq` for a later resume (every
    /// change, streamed or not: the ring must hold all of them after its
    /// floor).
    pub fn record(&mut self, seq: u64, items: &[Item]) {
        let Some(floor) = self.ring_floor else {
            return;
        };
        let top = self.ring.back().map_or(floor, |e| e.0);
        if seq <= top || self.cfg.resume_items == 0 {
            return;
        }
        self.ring.push_back((seq, items.to_vec()));
        self.ring_items += items.len().max(1);
        while self.ring_items > self.cfg.resume_items {
            let Some((s, it)) = self.ring.pop_front() else {
                break;
            };
            self.ring_items -= it.len().max(1);
            self.ring_floor = Some(s);
        }
    }

    /// Changes were committed that the ring does not hold: no backup can
    /// resume until the next snapshot.
    pub fn forget_ring(&mut self) {
        self.ring.clear();
        self.ring_items = 0;
        self.ring_floor = None;
    }

    /// Backups that resumed from their position.
    pub fn resumes(&self) -> u64 {
        self.resumes
    }

    /// Answers a backup's hello from position `applied` with the changes
    /// after it, if the ring holds all of them: true if it did. The
    /// backup's state at `applied` is this node's log at `applied` only if
    /// it followed this node in this term (a backup in another term may
    /// hold another node's history).
    fn resume(&mut self, now: Timestamp, term: Term, applied: u64) -> bool {
        let Some(floor) = self.ring_floor else {
            return false;
        };
        let top = self.ring.back().map_or(floor, |e| e.0);
        // Position 0 asks for a snapshot (and one of an empty log is cheap).
        if term != self.term
            || applied == 0
            || applied < floor
            || applied > top
            || self.cfg.resume_items == 0
        {
            return false;
        }
        let t = self.term;
        self.send(
            now,
            &Message::Resume {
                term: t,
                from: applied,
            },
        );
        let missed: Vec<(u64, Vec<Item>)> = self
            .ring
            .iter()
            .filter(|e| e.0 > applied)
            .cloned()
            .collect();
        for (seq, items) in missed {
            self.send(
                now,
                &Message::Changes {
                    term: t,
                    seq,
                    items,
                },
            );
        }
        self.sent = top.max(applied);
        self.awaited = self.sent;
        self.pending.push_back((self.sent, now));
        self.state = LinkState::Resyncing { seq: self.sent };
        self.resumes += 1;
        true
    }

    /// Whether a lease granted to the backup still runs at `now`: replies
    /// that depend on changes it has not acknowledged must wait.
    pub fn lease_holds(&self, now: Timestamp) -> bool {
        self.lease_until.is_some_and(|t| now < t)
    }

    /// When the last lease granted ends.
    pub fn lease_until(&self) -> Option<Timestamp> {
        self.lease_until
    }

    /// Answers a frame the backup sent at `since` (its clock) with a
    /// lease, while it is synced on this connection. Grants are spaced
    /// (an eighth of the lease apart), and the promise is recorded before
    /// the grant leaves, counted from when the frame arrived here: the
    /// backup counts from when it sent it, earlier, so its lease ends
    /// first.
    ///
    /// Only a backup in sync earns one. One whose acknowledgements are
    /// overdue (a stalled disk, a slow link) is alive but not current: a
    /// lease for its heartbeats, or even for acknowledgements of older
    /// changes, would hold the replies that wait for it for as long as it
    /// stays so. Without one they wait at most the acknowledgement bound
    /// plus one lease.
    fn grant(&mut self, now: Timestamp, since: Timestamp) {
        let len = self.cfg.lease;
        if len.is_zero() || self.state != LinkState::InSync {
            return;
        }
        // Nor one whose acknowledgement is overdue, even before the timer
        // that marks it lagging has run: a hot takeover then always
        // follows the send of anything unacknowledged by less than the
        // acknowledgement bound plus one lease (which
        // `Node::handle_commit` counts on).
        if self
            .pending
            .front()
            .is_some_and(|&(_, t)| now >= t + self.cfg.ack_timeout)
        {
            return;
        }
        if self.granted_at.is_some_and(|g| now < g + len / 8) {
            return;
        }
        let until = now + len;
        self.lease_until = Some(self.lease_until.map_or(until, |t| t.max(until)));
        self.granted_at = Some(now);
        let term = self.term;
        self.send(
            now,
            &Message::Lease {
                term,
                since,
                for_ms: len.as_millis() as u64,
            },
        );
    }

    /// The term this node acts in.
    pub fn term(&self) -> Term {
        self.term
    }

    /// Where the link stands.
    pub fn state(&self) -> LinkState {
        self.state
    }

    /// Whether check-points can be honoured now (the `InSync` input of the
    /// server's check-point decision).
    pub fn in_sync(&self) -> bool {
        self.state == LinkState::InSync
    }

    /// Highest log position the backup acknowledged.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Highest log position sent.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// Highest log position sent that replies depend on: a reply with no
    /// change of its own for the backup still waits for it (it may report
    /// state that change made).
    pub fn awaited(&self) -> u64 {
        self.awaited
    }

    /// The term of the peer if, on this connection, it answered our hello
    /// claiming to be active itself (in a term not above ours: a higher
    /// one fences at once).
    pub fn peer_claims_active(&self) -> Option<Term> {
        self.peer_active
    }

    /// A connection to the backup is up: introduce ourselves, with the log
    /// position of the state we serve from (`holds`). With
    /// `may_hand_over` (this node has not served since it started), a
    /// backup that holds a later position in our term is handed the
    /// service ([`ActiveEvent::HandedOver`]).
    pub fn connected(&mut self, now: Timestamp, holds: Position, may_hand_over: bool) {
        self.peer_active = None;
        self.holds = holds;
        self.may_hand_over = may_hand_over;
        self.peer_version = crate::wire::LINK_VERSION;
        self.out.clear();
        self.inbuf.clear();
        self.pending.clear();
        self.state = LinkState::Handshake;
        self.last_heard = now;
        self.send(
            now,
            &Message::Hello {
                term: self.term,
                active: true,
                applied: holds.seq,
                now,
                version: crate::wire::LINK_VERSION,
                holds,
            },
        );
    }

    /// The connection is gone.
    pub fn disconnected(&mut self) {
        if !matches!(
            self.state,
            LinkState::Disconnected | LinkState::Fenced { .. }
        ) {
            self.events.push_back(ActiveEvent::OutOfSync("link down"));
        }
        if !matches!(self.state, LinkState::Fenced { .. }) {
            self.state = LinkState::Disconnected;
        }
        self.pending.clear();
    }

    /// The link version the backup on this connection speaks.
    pub fn peer_version(&self) -> u16 {
        self.peer_version
    }

    fn send(&mut self, now: Timestamp, m: &Message) {
        m.encode_for(self.peer_version, &mut self.out);
        self.last_sent = now;
    }

    fn fence(&mut self, term: Term) {
        if term > self.term {
            self.state = LinkState::Fenced { term };
            self.events.push_back(ActiveEvent::Fenced(term));
            self.pending.clear();
        }
    }

    /// Sends the full check-pointed state as of `seq` (after
    /// [`ActiveEvent::NeedSnapshot`]); changes after `seq` are then streamed
    /// with [`Active::push`]. The items must hold the server-wide epoch
    /// anchor ([`Item::ServerEpoch`]), every subscriber's own anchor, every
    /// check-pointed mapping, and the volatile marker of every subscriber
    /// that holds volatile mappings: that is all a takeover needs.
    pub fn send_snapshot(&mut self, now: Timestamp, seq: u64, items: Vec<Item>) {
        let bytes = encode_snapshot(
            self.term,
            seq,
            items,
            self.cfg.snapshot_part,
            self.peer_version,
        );
        self.send_encoded_snapshot(now, self.term, seq, bytes);
    }

    /// [`Active::send_snapshot`] with the bytes encoded beforehand by
    /// [`encode_snapshot`] (for `term`), so that a large snapshot is
    /// encoded without holding whatever guards this link. Ignored if the
    /// term changed meanwhile.
    pub fn send_encoded_snapshot(&mut self, now: Timestamp, term: Term, seq: u64, bytes: Vec<u8>) {
        if term != self.term
            || matches!(
                self.state,
                LinkState::Disconnected | LinkState::Fenced { .. }
            )
        {
            return;
        }
        // Moved, not copied, when nothing else waits to be written: a
        // snapshot of a million mappings is about 100 MB, and copying it
        // here would hold up whoever holds this link end.
        if self.out.is_empty() {
            self.out = bytes;
        } else {
            self.out.extend_from_slice(&bytes);
        }
        self.last_sent = now;
        self.sent = seq;
        self.awaited = self.awaited.max(seq);
        self.pending.push_back((seq, now));
        self.state = LinkState::Resyncing { seq };
        if self.ring_floor.is_none() {
            // From here on every change is kept.
            self.ring.clear();
            self.ring_items = 0;
            self.ring_floor = Some(seq);
        }
    }

    /// Streams the items of the changes up to log position `seq`. Returns
    /// whether they were sent (nothing is sent while disconnected, fenced,
    /// or before the snapshot: the snapshot will carry the state).
    pub fn push(&mut self, now: Timestamp, seq: u64, items: Vec<Item>) -> bool {
        self.push_depending(now, seq, items, seq)
    }

    /// [`Active::push`], where replies depend on the items up to position
    /// `depends` only ([`Active::awaited`]): the rest are news no reply
    /// needs to wait for (an extension of volatile state the backup can
    /// do without until well after any takeover it could make hot, see
    /// `Node::handle_commit`).
    pub fn push_depending(
        &mut self,
        now: Timestamp,
        seq: u64,
        items: Vec<Item>,
        depends: u64,
    ) -> bool {
        self.record(seq, &items);
        match self.state {
            LinkState::Resyncing { .. } | LinkState::InSync | LinkState::Lagging => {}
            _ => return false,
        }
        if seq <= self.sent {
            return false;
        }
        let term = self.term;
        self.send(now, &Message::Changes { term, seq, items });
        self.sent = seq;
        self.awaited = self.awaited.max(depends.min(seq));
        self.pending.push_back((seq, now));
        true
    }

    /// Feeds bytes received from the backup.
    pub fn handle_input(&mut self, now: Timestamp, bytes: &[u8]) -> Result<(), FrameError> {
        self.inbuf.push(bytes);
        while let Some(m) = self.inbuf.next(&self.keying)? {
            self.last_heard = now;
            if m.term() > self.term {
                self.fence(m.term());
                continue;
            }
            match m {
                Message::Hello {
                    active,
                    term,
                    applied,
                    version,
                    holds,
                    ..
                } if self.state == LinkState::Handshake => {
                    self.peer_version = version.min(crate::wire::LINK_VERSION);
                    if !active
                        && self.may_hand_over
                        && version >= 2
                        && term == self.term
                        && holds > self.holds
                    {
                        // Failure-scenarios draft section 2.6 after a
                        // double failure: the freshest state is served. We
                        // have answered nobody yet; the backup holds more.
                        let term = self.term;
                        self.send(now, &Message::Handover { term });
                        self.state = LinkState::Fenced { term };
                        self.pending.clear();
                        self.events
                            .push_back(ActiveEvent::HandedOver { peer_holds: holds });
                        continue;
                    }
                    if active {
                        self.peer_active = Some(term);
                        // Two actives in one term: neither may stream to the
                        // other; the operator's fencing must settle it.
                        self.events
                            .push_back(ActiveEvent::OutOfSync("peer claims to be active"));
                        continue;
                    }
                    // Its replica must be of this term (`holds.term`: a
                    // backup that heard this term without completing its
                    // snapshot still holds another term's history).
                    if self.resume(now, holds.term, applied) {
                        continue;
                    }
                    // Changes committed while the snapshot is copied are
                    // not in the ring: it starts again at the snapshot.
                    self.forget_ring();
                    self.state = LinkState::NeedSnapshot;
                    self.events.push_back(ActiveEvent::NeedSnapshot);
                }
                Message::Ack {
                    seq, now: since, ..
                } => {
                    self.on_ack(seq);
                    self.grant(now, since);
                }
                Message::Heartbeat { now: since, .. } => self.grant(now, since),
                _ => {}
            }
        }
        Ok(())
    }

    fn on_ack(&mut self, seq: u64) {
        while self.pending.front().is_some_and(|&(s, _)| s <= seq) {
            self.pending.pop_front();
        }
        if seq > self.acked {
            self.acked = seq;
            self.events.push_back(ActiveEvent::Acked(seq));
        }
        let caught_up = self.pending.is_empty();
        match self.state {
            // A snapshot of an empty log (position 0) is acknowledged at 0
            // too: compare against the snapshot, not the last ack.
            LinkState::Resyncing { seq: snap } if seq >= snap => {
                self.state = LinkState::InSync;
                self.events.push_back(ActiveEvent::InSync);
            }
            LinkState::Lagging if caught_up => {
                self.state = LinkState::InSync;
                self.events.push_back(ActiveEvent::InSync);
            }
            _ => {}
        }
    }

    /// When [`Active::handle_timeout`] next has work.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        if matches!(
            self.state,
            LinkState::Disconnected | LinkState::Fenced { .. }
        ) {
            return None;
        }
        let hb = self.last_sent + self.cfg.heartbeat;
        let dead = self.last_heard + self.cfg.dead_after;
        // An overdue acknowledgement matters only to a link in sync (it
        // then lags); once lagging, its deadline has passed and must not
        // wake the caller again and again.
        let ack = (self.state == LinkState::InSync)
            .then(|| self.pending.front().map(|&(_, t)| t + self.cfg.ack_timeout))
            .flatten();
        Some(ack.map_or(hb.min(dead), |a| a.min(hb).min(dead)))
    }

    /// Heartbeats, overdue acknowledgements, a silent backup.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        if matches!(
            self.state,
            LinkState::Disconnected | LinkState::Fenced { .. }
        ) {
            return;
        }
        if now >= self.last_heard + self.cfg.dead_after {
            self.events
                .push_back(ActiveEvent::OutOfSync("backup silent"));
            self.state = LinkState::Disconnected;
            self.pending.clear();
            return;
        }
        let overdue = self
            .pending
            .front()
            .is_some_and(|&(_, t)| now >= t + self.cfg.ack_timeout);
        if overdue && self.state == LinkState::InSync {
            self.state = LinkState::Lagging;
            self.events
                .push_back(ActiveEvent::OutOfSync("acknowledgement overdue"));
        }
        if now >= self.last_sent + self.cfg.heartbeat {
            let term = self.term;
            self.send(now, &Message::Heartbeat { term, now });
        }
    }

    /// Bytes to write to the backup.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        (!self.out.is_empty()).then(|| std::mem::take(&mut self.out))
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<ActiveEvent> {
        self.events.pop_front()
    }
}
