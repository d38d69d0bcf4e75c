//! One node of the pair: its role and term, its end of the replication
//! link, and every decision about when a reply may leave.
//!
//! RFC 7767 section 3.2: the state of an honoured check-point should be on
//! the backup before the response is sent. The daemon hands each group
//! commit to [`Node::handle_commit`] and sends exactly the replies the node
//! gives back as [`Effect::Release`]; a reply whose check-point the backup
//! cannot confirm comes back as [`Effect::Rewrite`] (the mapping loses its
//! flag, the option is stripped) and a reply of a node that was deposed is
//! never given back at all. Promotion and demotion, with their epoch
//! decisions (failure-scenarios draft section 2.6), are inputs too.
//!
//! The node is generic over `R`, the daemon's handle for the replies of one
//! job (the simulator uses its own), and does no I/O: it takes `now` and
//! bytes and returns effects, like the link ends it drives.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::net::IpAddr;
use std::time::Duration;

use portkeep_proto::Nonce;
use portkeep_server::record::key_of;
use portkeep_server::{
    BackupState, Change, ChangeRecord, MappingKey, MappingKind, MappingRecord, RequesterState,
    SubscriberId, Timestamp,
};

use crate::active::{encode_snapshot, Active, ActiveConfig, ActiveEvent, LinkState};
use crate::backup::{Backup, Replica, ReplicaWrite, Takeover};
use crate::wire::{FrameError, Item, Position};
use crate::Term;

/// A node's part in the pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// No pair: check-points are never honoured.
    Standalone,
    /// Serves PCP and replicates check-pointed state to the backup.
    Active,
    /// Receives the state and answers no PCP until promoted.
    Backup,
}

impl Role {
    /// As the config and the control interface spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Standalone => "standalone",
            Role::Active => "active",
            Role::Backup => "backup",
        }
    }
}

/// How a node is set up.
#[derive(Debug, Clone, Copy)]
pub struct NodeConfig {
    /// The role it starts in.
    pub role: Role,
    /// Timing of the link, when a peer is configured (`None`: an active
    /// node without a peer replicates nothing and honours nothing).
    pub link: Option<ActiveConfig>,
    /// The lease an active grants its backup ([`ActiveConfig::lease`],
    /// which this overrides): a backup promoted after the last one ended
    /// cannot vouch for the epochs ([`crate::TakeoverKind::Stale`]).
    pub stale_after: Duration,
    /// How long a node configured active that cannot reach its peer at
    /// start waits before serving what it stored: a peer that comes back
    /// within it with fresher state is handed the service instead
    /// (failure-scenarios draft section 2.6). Zero serves at once.
    pub peer_wait: Duration,
    /// Planted defects, for showing that the simulator finds them. Only
    /// builds with the matching cargo feature have these switches.
    #[cfg(any(
        feature = "planted-release-before-ack",
        feature = "planted-skip-term-check",
        feature = "planted-ack-before-persist"
    ))]
    pub planted: Planted,
}

impl NodeConfig {
    fn leased(&self, mut t: ActiveConfig) -> ActiveConfig {
        t.lease = self.stale_after;
        t
    }

    /// A node in `role` with the given link timing.
    pub fn new(role: Role, link: Option<ActiveConfig>, stale_after: Duration) -> NodeConfig {
        NodeConfig {
            role,
            link,
            stale_after,
            peer_wait: Duration::ZERO,
            #[cfg(any(
                feature = "planted-release-before-ack",
                feature = "planted-skip-term-check",
                feature = "planted-ack-before-persist"
            ))]
            planted: Planted::default(),
        }
    }
}

/// Defects that can be switched on in test builds, each behind its own
/// cargo feature, so that a test can show the simulator catches it.
#[cfg(any(
    feature = "planted-release-before-ack",
    feature = "planted-skip-term-check",
    feature = "planted-ack-before-persist"
))]
#[derive(Debug, Clone, Copy, Default)]
pub struct Planted {
    /// Replies are released without waiting for the backup's
    /// acknowledgement.
    #[cfg(feature = "planted-release-before-ack")]
    pub release_before_ack: bool,
    /// A higher term seen on the link is ignored (no fencing).
    #[cfg(feature = "planted-skip-term-check")]
    pub skip_term_check: bool,
    /// The backup acknowledges changes before they are persisted.
    #[cfg(feature = "planted-ack-before-persist")]
    pub ack_before_persist: bool,
}

/// A check-point granted in a reply: taken back if never confirmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The mapping's key.
    pub key: MappingKey,
    /// MAP or PEER (with its remote peer).
    pub kind: MappingKind,
    /// The nonce it was granted to.
    pub nonce: Nonce,
}

/// An item with the hash of its mapping key (upserts and removals).
type HashedItem = (Item, Option<u64>);

/// What replication needs from one job's changes (see [`Node::prepare`]).
#[derive(Debug, Default, Clone)]
pub struct JobMeta {
    last_seq: Option<u64>,
    /// Items with the hash of their mapping key (upserts and removals).
    items: Vec<HashedItem>,
    grants: Vec<Grant>,
    /// A log position the replies depend on besides the job's own.
    after: u64,
    /// When the replies were made.
    made: Option<Timestamp>,
}

impl JobMeta {
    /// The check-points the job's replies report.
    pub fn grants(&self) -> &[Grant] {
        &self.grants
    }

    /// The job's replies also depend on log position `seq` (see
    /// [`Effect::Rewrite`]).
    pub fn after(mut self, seq: u64) -> JobMeta {
        self.after = self.after.max(seq);
        self
    }

    /// The job's replies were made at `at` (when the server core handled
    /// their requests): a wait for the backup counts from there, since the
    /// epoch and lifetime in them are as of then (RFC 6887 section 8.5).
    /// Without it, from the commit.
    pub fn made_at(mut self, at: Timestamp) -> JobMeta {
        self.made = Some(at);
        self
    }
}

/// What the daemon must do.
#[derive(Debug)]
pub enum Effect<R> {
    /// Send these replies: whatever they report is as durable and
    /// replicated as it must be.
    Release(R),
    /// [`Effect::Release`] for replies that waited (for the backup, or for
    /// the end of a lease) a quarter of a second or more after they were
    /// made: send each
    /// as it would read if made now (`portkeep_server::Server::restamp`:
    /// its epoch made again, its lifetime shorter by the wait), so its
    /// client's RFC 6887 section 8.5 check does not take the wait for a
    /// lost state and the mapping does not outlive what the server holds.
    /// A reply that cannot be restamped is dropped (its client retransmits).
    ReleaseAged {
        /// The replies.
        reply: R,
        /// How long they waited, in milliseconds.
        waited_ms: u64,
    },
    /// These replies report check-points the backup did not confirm: take
    /// the flag off each granted mapping (a stored change like any other),
    /// then send the replies with CHECKPOINT_REQUIRED removed
    /// ([`strip_checkpoint`]) after that change is committed. A reply that
    /// cannot be rewritten is dropped (its client retransmits), never sent
    /// as it was (RFC 7767 section 3.2).
    Rewrite {
        /// The replies.
        reply: R,
        /// The check-points to take back.
        grants: Vec<Grant>,
        /// The log position the replies depend on: give it to
        /// [`JobMeta::after`] for the job that carries them again, so they
        /// wait for the backup as their first version did (the unflagging
        /// may change nothing: a retransmission answered twice).
        after: u64,
    },
    /// Tell the server core what the backup allows now (the input of its
    /// check-point decision).
    BackupState(BackupState),
    /// The backup asked for the whole check-pointed state: take a
    /// [`SnapshotSource`] of the core and pass it to
    /// [`Node::send_snapshot`].
    NeedSnapshot,
    /// Store this term durably: a node must never come back in a term
    /// lower than one it saw (fencing).
    PersistTerm(Term),
    /// A node in a higher term serves: this node stopped serving (its held
    /// replies were dropped) and is a backup now. Replace the core, the
    /// store and the dataplane with an empty state.
    Deposed {
        /// The higher term.
        term: Term,
    },
    /// This node, configured active, had not served yet and found its
    /// backup holding fresher state: it handed the service over
    /// ([`crate::Message::Handover`], which [`Node::poll_transmit`] still
    /// yields: send it before closing the connection) and is a backup now.
    /// As for [`Effect::Deposed`], replace the state with an empty one.
    HandedOver {
        /// The term (unchanged: the backup takes over into the next).
        term: Term,
        /// What this node held.
        held: Position,
        /// What the backup holds.
        peer_holds: Position,
    },
    /// The active handed this backup the service: promote it now, as
    /// `ctl promote` does (and, with keepalived, the address follows the
    /// node that serves).
    TakeOver,
    /// The backup's replica changed up to `seq`: make `write` durable (in
    /// the order given), then call [`Node::persisted`] (only then is it
    /// acknowledged), and start the node from the stored replica next
    /// time ([`Node::resume_replica`]).
    Persist {
        /// Log position.
        seq: u64,
        /// What to store.
        write: ReplicaWrite,
    },
}

/// The core's check-pointed state as of a log position, copied under the
/// core lock (encoding happens outside it, in [`Node::send_snapshot`]).
#[derive(Debug, Clone)]
pub struct SnapshotSource {
    /// Term the snapshot was requested in.
    pub term: Term,
    /// Log position the copy stands for.
    pub seq: u64,
    /// Server-wide epoch anchor.
    pub anchor: Timestamp,
    /// Subscribers' own anchors.
    pub subscriber_anchors: Vec<(SubscriberId, Timestamp)>,
    /// Check-pointed mappings.
    pub mappings: Vec<MappingRecord>,
    /// Subscribers' hosts with volatile mappings, and when those end.
    pub volatile: Vec<(SubscriberId, Vec<IpAddr>, Timestamp)>,
    /// Subscribers' hosts owed an ANNOUNCE, until when
    /// (`portkeep_server::Server::owed_announces`).
    pub owed: Vec<(SubscriberId, Vec<IpAddr>, Timestamp)>,
    /// THIRD_PARTY requesters (`portkeep_server::Server::requesters`).
    pub requesters: Vec<(IpAddr, RequesterState)>,
    /// Held external endpoints (`portkeep_server::Server::port_holds`).
    pub holds: Vec<portkeep_server::PortHold>,
    /// The link version of the backup it is for ([`Node::peer_version`]
    /// when it was copied).
    pub version: u16,
}

impl SnapshotSource {
    /// The snapshot's frames, in parts of `part` items (pure: run it
    /// outside every lock, so a large snapshot stalls nobody).
    pub fn encode(self, part: usize) -> EncodedSnapshot {
        let mut items = Vec::with_capacity(
            2 + self.subscriber_anchors.len()
                + self.mappings.len()
                + self.volatile.len()
                + self.owed.len()
                + self.requesters.len()
                + self.holds.len(),
        );
        items.push(Item::ServerEpoch {
            anchor: self.anchor,
        });
        for (subscriber, anchor) in self.subscriber_anchors {
            items.push(Item::Epoch { subscriber, anchor });
        }
        let hasher = BuildHasherDefault::<DefaultHasher>::default();
        let hashes: HashSet<u64> = self
            .mappings
            .iter()
            .map(|m| hasher.hash_one(key_of(m)))
            .collect();
        items.extend(self.mappings.into_iter().map(Item::Upsert));
        for (subscriber, hosts, until) in self.volatile {
            items.push(Item::Volatile {
                subscriber,
                hosts,
                until,
            });
        }
        for (subscriber, hosts, until) in self.owed {
            items.push(Item::AnnounceOwed {
                subscriber,
                hosts,
                until,
            });
        }
        for (ip, state) in self.requesters {
            items.push(Item::Requester {
                ip,
                state: Some(state),
            });
        }
        items.extend(self.holds.into_iter().map(Item::PortHeld));
        let n = items.len();
        EncodedSnapshot {
            term: self.term,
            seq: self.seq,
            version: self.version,
            bytes: encode_snapshot(self.term, self.seq, items, part, self.version),
            hashes,
            items: n,
        }
    }
}

/// A snapshot ready for the link ([`Node::send_snapshot`]).
#[derive(Debug)]
pub struct EncodedSnapshot {
    term: Term,
    seq: u64,
    version: u16,
    bytes: Vec<u8>,
    hashes: HashSet<u64>,
    items: usize,
}

impl EncodedSnapshot {
    /// Items it holds.
    pub fn items(&self) -> usize {
        self.items
    }

    /// Log position it stands for.
    pub fn seq(&self) -> u64 {
        self.seq
    }
}

/// Why a node cannot be promoted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PromoteError {
    /// Already active.
    #[error("this node is already active")]
    AlreadyActive,
    /// Standalone nodes have no replica to take over.
    #[error("this node is standalone: configure [ha] role = \"backup\" to make it promotable")]
    Standalone,
    /// This node handed the service to its peer, whose state is fresher,
    /// and has not synced from an active since: promoting it would serve
    /// the older state (failure-scenarios draft section 2.6).
    #[error("this node handed the service to its peer, which holds fresher state ({peer}, against {own}): promote the peer")]
    PeerFresher {
        /// What this node held.
        own: Position,
        /// What its peer holds.
        peer: Position,
    },
}

/// Counters for status and metrics.
#[derive(Debug, Default, Clone)]
pub struct NodeStats {
    /// Responses released after the backup's acknowledgement.
    pub released: u64,
    /// Check-points confirmed by the backup.
    pub checkpoints_acked: u64,
    /// Check-points answered as not honoured because the backup did not
    /// confirm them in time.
    pub checkpoints_rewritten: u64,
    /// Replies dropped because this node was deposed while holding them.
    pub dropped_deposed: u64,
    /// Replies released with changes the backup had not acknowledged,
    /// once no lease ran (a promotion would then reset every epoch).
    pub released_unconfirmed: u64,
    /// Snapshots sent.
    pub resyncs: u64,
    /// Items in the last snapshot.
    pub snapshot_items: usize,
    /// When the last snapshot was queued.
    pub snapshot_sent: Option<Timestamp>,
    /// How long the last snapshot took to be acknowledged.
    pub snapshot_acked_ms: Option<u64>,
    /// Takeovers done by this node.
    pub takeovers: u64,
    /// Extensions of volatile state streamed without a reply waiting for
    /// them (the backup's end lay far enough ahead).
    pub extensions_unawaited: u64,
}

struct Held<R> {
    seq: u64,
    reply: R,
    grants: Vec<Grant>,
    /// When it was made ([`JobMeta::made_at`]).
    at: Timestamp,
}

/// How long a held reply may wait before it is made again at release.
const RESTAMP_AFTER_MS: u64 = 250;

impl<R> Held<R> {
    /// Its release: replies that waited [`RESTAMP_AFTER_MS`] or more are
    /// made again as of their release (see [`Effect::ReleaseAged`]). A
    /// client's RFC 6887 section 8.5 check tolerates about 2 s of a reply
    /// arriving behind a newer one; the network's delay takes part of it,
    /// so a hold may add only a little (a 0.9 s hold and 0.8 s of network
    /// delay failed a check in the simulator, seeds 50872 and 66095).
    /// Shorter waits are the common case (the backup's acknowledgement)
    /// and skip the parse and encode.
    ///
    /// So is any reply made before an operator cleared mappings
    /// ([`Node::cleared`]), however short its wait: what it grants may be
    /// gone, and `Server::restamp` drops it then (RFC 6887 section 8.5: a
    /// client that believes in a mapping the server lost can never learn
    /// of it; simulator seeds 60350 and 90583).
    fn release(self, now: Timestamp, cleared_at: Option<Timestamp>) -> Effect<R> {
        release_made(self.reply, self.at, now, cleared_at)
    }
}

/// [`Held::release`] for a reply made at `made`.
fn release_made<R>(
    reply: R,
    made: Timestamp,
    now: Timestamp,
    cleared_at: Option<Timestamp>,
) -> Effect<R> {
    let waited_ms = now.as_millis().saturating_sub(made.as_millis());
    if waited_ms < RESTAMP_AFTER_MS && cleared_at.is_none_or(|c| made > c) {
        Effect::Release(reply)
    } else {
        Effect::ReleaseAged { reply, waited_ms }
    }
}

/// The node.
pub struct Node<R> {
    cfg: NodeConfig,
    keying: portkeep_server::SubscriberKeying,
    role: Role,
    term: Term,
    serving: bool,
    /// An active node with a peer first learns whether it was deposed
    /// while away: it serves after the first contact (or failed attempt).
    first_contact: bool,
    /// When the first attempt to reach the peer failed, while
    /// `first_contact` (see [`NodeConfig::peer_wait`]).
    first_failure: Option<Timestamp>,
    /// What this node serves from.
    position: Position,
    /// Bytes still to send to the old peer after standing down (the
    /// handover).
    parting: Option<Vec<u8>>,
    /// Set when this node handed over: the positions it and its peer
    /// held. Promotion is refused until it syncs from an active.
    handed_over: Option<(Position, Position)>,
    active: Option<Active>,
    backup: Option<Backup>,
    held: VecDeque<Held<R>>,
    /// Hashes of the keys of the mappings the backup holds, so volatile
    /// mappings (whose upserts are removals for the backup) do not travel
    /// at all. A collision only sends a harmless extra removal.
    replicated: HashSet<u64>,
    /// Items committed while a requested snapshot is being copied: those
    /// after the snapshot's position follow it on the stream.
    deferred: Vec<(u64, Vec<HashedItem>)>,
    /// Per subscriber, the volatile hosts and end last streamed to the
    /// backup on this connection since its snapshot or resume (see
    /// [`Node::handle_commit`]); forgotten whenever that chain breaks.
    volatile_sent: HashMap<SubscriberId, (Vec<IpAddr>, Timestamp)>,
    /// When an operator last cleared mappings ([`Node::cleared`]).
    cleared_at: Option<Timestamp>,
    /// A deterministic hasher: runs replay exactly (simulator seeds).
    hasher: BuildHasherDefault<DefaultHasher>,
    effects: VecDeque<Effect<R>>,
    stats: NodeStats,
}

impl<R> std::fmt::Debug for Node<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("role", &self.role)
            .field("term", &self.term)
            .field("serving", &self.serving)
            .field("held", &self.held.len())
            .finish()
    }
}

impl<R> Node<R> {
    /// A node starting in `cfg.role`, in `term` (as persisted by its last
    /// run).
    pub fn new(cfg: NodeConfig, term: Term, keying: portkeep_server::SubscriberKeying) -> Self {
        let role = cfg.role;
        let active = match (role, cfg.link) {
            (Role::Active, Some(t)) => Some(Active::new(term, cfg.leased(t), keying.clone())),
            _ => None,
        };
        let backup =
            (role == Role::Backup).then(|| with_planted(&cfg, Backup::new(term, keying.clone())));
        Node {
            serving: role == Role::Standalone || (role == Role::Active && cfg.link.is_none()),
            first_contact: role == Role::Active && cfg.link.is_some(),
            first_failure: None,
            position: Position::default(),
            parting: None,
            handed_over: None,
            cfg,
            keying,
            role,
            term,
            active,
            backup,
            held: VecDeque::new(),
            replicated: HashSet::new(),
            deferred: Vec::new(),
            volatile_sent: HashMap::new(),
            cleared_at: None,
            hasher: BuildHasherDefault::default(),
            effects: VecDeque::new(),
            stats: NodeStats::default(),
        }
    }

    /// The role now.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The highest term this node acted in or saw.
    pub fn term(&self) -> Term {
        self.term
    }

    /// Whether this node answers PCP now. Only an active (or standalone)
    /// node does, and an active one with a peer only once it knows it was
    /// not deposed while away.
    pub fn serving(&self) -> bool {
        self.serving
    }

    /// Whether this node replicates (an active node with a peer).
    pub fn replicates(&self) -> bool {
        self.active.is_some()
    }

    /// Whether a link is configured at all.
    pub fn has_peer(&self) -> bool {
        self.cfg.link.is_some()
    }

    /// The link end of an active node.
    pub fn active(&self) -> Option<&Active> {
        self.active.as_ref()
    }

    /// The link end of a backup.
    pub fn backup(&self) -> Option<&Backup> {
        self.backup.as_ref()
    }

    /// Replies waiting for the backup.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Counters.
    pub fn stats(&self) -> &NodeStats {
        &self.stats
    }

    /// The core's view of the link (RFC 7767 section 3.2's "resources
    /// available": only an in-sync backup lets a check-point be honoured).
    pub fn backup_state(&self) -> BackupState {
        match (&self.role, &self.active) {
            (Role::Active, Some(a)) => match a.state() {
                LinkState::InSync => BackupState::InSync,
                LinkState::Resyncing { .. } | LinkState::NeedSnapshot | LinkState::Lagging => {
                    BackupState::Syncing
                }
                _ => BackupState::Disconnected,
            },
            (Role::Active, None) => BackupState::Disconnected,
            _ => BackupState::Standalone,
        }
    }

    /// The next thing the daemon must do.
    pub fn poll_effect(&mut self) -> Option<Effect<R>> {
        self.effects.pop_front()
    }

    fn key_hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    /// The replication view of one job's changes and volatile markers
    /// (pure: the committer computes it before folding the jobs' changes
    /// into one store transaction).
    pub fn prepare(
        &self,
        changes: &[ChangeRecord],
        volatile: Vec<(SubscriberId, Vec<IpAddr>, Timestamp)>,
    ) -> JobMeta {
        let mut m = JobMeta {
            last_seq: changes.last().map(|c| c.seq),
            ..JobMeta::default()
        };
        for c in changes {
            if let Change::Upserted(r) = &c.change {
                if r.checkpoint {
                    m.grants.push(Grant {
                        key: r.key,
                        kind: r.kind,
                        nonce: r.nonce,
                    });
                }
            }
            let Some(item) = Item::from_change(&c.change) else {
                continue;
            };
            let hash = match &item {
                Item::Upsert(r) => Some(self.key_hash(&key_of(r))),
                Item::Remove(k) => Some(self.key_hash(k)),
                _ => None,
            };
            m.items.push((item, hash));
        }
        for (subscriber, hosts, until) in volatile {
            let item = Item::Volatile {
                subscriber,
                hosts,
                until,
            };
            m.items.push((item, None));
        }
        m
    }

    /// After a group commit (store written, dataplane applied): streams
    /// what the backup must hear and decides, per job, whether its replies
    /// leave now ([`Effect::Release`]), wait for the backup's
    /// acknowledgement, or report check-points that can no longer be
    /// confirmed ([`Effect::Rewrite`]). The jobs come in log order.
    ///
    /// A node that does not serve (a backup, or an active node deposed
    /// meanwhile) releases nothing: whatever it handled before it learned
    /// that is not answered, and its clients retransmit to the node that
    /// serves (RFC 6887 section 8.1.1).
    pub fn handle_commit(&mut self, now: Timestamp, jobs: Vec<(R, JobMeta)>) {
        if !self.serving {
            self.stats.dropped_deposed += jobs.len() as u64;
            return;
        }
        let cleared_at = self.cleared_at;
        let Some(active) = self.active.as_mut() else {
            // Standalone, or active without a peer: nothing to wait for
            // (and the core honoured no check-point).
            for (r, meta) in jobs {
                let made = meta.made.map_or(now, |m| m.min(now));
                self.effects
                    .push_back(release_made(r, made, now, cleared_at));
            }
            return;
        };
        let streaming = matches!(
            active.state(),
            LinkState::Resyncing { .. } | LinkState::InSync | LinkState::Lagging
        );
        let snapshot_pending = active.state() == LinkState::NeedSnapshot;
        let in_sync = active.in_sync();
        let leased = active.lease_holds(now);
        let sent = active.sent();
        // Failure-scenarios draft 2.6.1 has a takeover reset an epoch
        // exactly when volatile state was lost, so the backup must never
        // believe volatile state ended while it lives. A renewal that only
        // moves a subscriber's end later need not wait for the backup if
        // the end the backup already has lies beyond any hot takeover
        // that could follow: no lease is granted while an acknowledgement
        // is overdue (`Active::grant`), so a takeover that did not hear of
        // this change comes within the acknowledgement bound plus one
        // lease of its send, and the backup, still holding the old end,
        // resets the subscriber then as it must. A second of margin covers
        // the translation between the two clocks.
        let headroom = self
            .cfg
            .link
            .map(|l| l.ack_timeout + self.cfg.stale_after + Duration::from_secs(1));
        let mut items = Vec::new();
        let mut top = 0;
        let mut depends = 0;
        let mut sorted = Vec::with_capacity(jobs.len());
        for (reply, meta) in jobs {
            let seq = meta.last_seq.unwrap_or(0);
            self.position = self.position.max(Position {
                term: self.term,
                seq,
            });
            let mut needs = false;
            if streaming && seq > sent {
                // Jobs at or below the snapshot's position are in it.
                for (item, hash) in meta.items {
                    if keep_for_backup(&mut self.replicated, &item, hash) {
                        if extends_far_enough(&mut self.volatile_sent, &item, now, headroom) {
                            self.stats.extensions_unawaited += 1;
                        } else if !matches!(item, Item::PortHeld(_)) {
                            // A hold travels without being waited for: no
                            // reply reports it, and a takeover that misses
                            // one hands a port on early (RFC 6887 section
                            // 15's SHOULD), which is all it prevents.
                            needs = true;
                        }
                        items.push(item);
                    }
                }
                top = top.max(seq);
                if needs {
                    depends = depends.max(seq);
                }
            } else {
                for (item, _) in &meta.items {
                    if let Item::Volatile { subscriber, .. } = item {
                        self.volatile_sent.remove(subscriber);
                    }
                }
                needs = !meta.items.is_empty();
                if snapshot_pending && !meta.items.is_empty() {
                    // The snapshot being copied may stand for a position
                    // before this job: keep its items to follow it.
                    self.deferred.push((seq, meta.items));
                } else if !meta.items.is_empty() && seq > sent {
                    // Not streamed now, but kept, so that a backup that
                    // reconnects from its position catches up from it.
                    let kept: Vec<Item> = meta
                        .items
                        .into_iter()
                        .filter(|(item, hash)| keep_for_backup(&mut self.replicated, item, *hash))
                        .map(|(item, _)| item)
                        .collect();
                    active.record(seq, &kept);
                }
            }
            // Released once the backup has everything the replies
            // depend on: their own changes and, for rewritten replies, what
            // their first version did.
            let needs = needs || meta.after > 0;
            let made = meta.made.map_or(now, |m| m.min(now));
            sorted.push((reply, meta.grants, seq.max(meta.after), needs, made));
        }
        if !items.is_empty() {
            // Streamed jobs are all past `sent`, so `top` is the position.
            active.push_depending(now, top.max(sent + 1), items, depends);
        }
        // A reply with nothing of its own for the backup may still report
        // state that is: a retransmission answered again after the first
        // answer's change went out, a mapping made volatile by a change
        // still in flight. It waits for everything sent before it that
        // replies depend on.
        let sent_after = active.awaited();
        #[allow(unused_mut)]
        let mut acked = active.acked();
        #[cfg(feature = "planted-release-before-ack")]
        if self.cfg.planted.release_before_ack {
            acked = u64::MAX;
        }
        for (reply, grants, seq, needs, made) in sorted {
            let seq = if needs || !grants.is_empty() {
                seq
            } else {
                sent_after
            };
            if seq <= acked {
                self.stats.released += 1;
                self.stats.checkpoints_acked += grants.len() as u64;
                self.effects
                    .push_back(release_made(reply, made, now, cleared_at));
            } else if in_sync || (leased && grants.is_empty()) {
                // In sync, or out of sync but leased: the backup may still
                // be promoted hot, so nothing it has not heard of leaves
                // until it acknowledges or the lease ends.
                self.held.push_back(Held {
                    seq,
                    reply,
                    grants,
                    at: made,
                });
            } else if grants.is_empty() {
                // Out of sync and no lease: nothing is waited for; the
                // backup learns the rest from the next snapshot, and a
                // promotion now resets every epoch.
                self.stats.released_unconfirmed += 1;
                self.effects
                    .push_back(release_made(reply, made, now, cleared_at));
            } else {
                self.stats.checkpoints_rewritten += grants.len() as u64;
                self.effects.push_back(Effect::Rewrite {
                    reply,
                    grants,
                    after: seq,
                });
            }
        }
    }

    /// A connection to the peer is up (the active connected, or the backup
    /// accepted the active's connection).
    pub fn link_connected(&mut self, now: Timestamp) {
        let may_hand_over = self.first_contact && self.role == Role::Active;
        self.volatile_sent.clear();
        if let Some(a) = self.active.as_mut() {
            a.connected(now, self.position, may_hand_over);
        } else if let Some(b) = self.backup.as_mut() {
            b.connected(now);
        }
    }

    /// The connection is gone, or an attempt to make one failed.
    pub fn link_lost(&mut self, now: Timestamp) {
        if let Some(a) = self.active.as_mut() {
            a.disconnected();
            self.deferred.clear();
            self.volatile_sent.clear();
            self.drain_active_events(now);
            if self.first_contact {
                // The peer cannot be reached: nobody deposed us (as far
                // as this node can know; an external witness is what
                // settles a partition). After a double failure the peer
                // may come back with fresher state: it is waited for a
                // while before this node serves what it stored.
                let first = *self.first_failure.get_or_insert(now);
                if now >= first + self.cfg.peer_wait {
                    self.first_contact = false;
                    self.serving = self.role == Role::Active;
                }
            }
        } else if let Some(b) = self.backup.as_mut() {
            b.disconnected(now);
        }
    }

    /// Bytes from the peer.
    pub fn handle_link_input(&mut self, now: Timestamp, bytes: &[u8]) -> Result<(), FrameError> {
        if let Some(a) = self.active.as_mut() {
            let r = a.handle_input(now, bytes);
            let claimed = a.peer_claims_active();
            let heard = self.drain_active_events(now);
            if self.first_contact && self.role == Role::Active {
                if let Some(t) = claimed.filter(|t| *t >= self.term) {
                    // The peer is active in our own term: it was promoted
                    // into it while we were away (a node deposed by term t
                    // persists t, and comes back configured active in it).
                    // Two actives in one term must not both serve; the one
                    // returning stands down, as for a higher term.
                    self.step_down(Some(t));
                    self.effects.push_back(Effect::Deposed { term: self.term });
                    return r;
                }
                if heard {
                    self.first_contact = false;
                    self.serving = true;
                }
            }
            return r;
        }
        if let Some(b) = self.backup.as_mut() {
            let before = b.term();
            let r = b.handle_input(now, bytes);
            let term = b.term();
            let service_handed = b.take_service_handed();
            if b.in_sync() {
                // Synced from the active since it handed over: what this
                // node holds is current.
                self.handed_over = None;
            }
            for (seq, write) in b.take_unpersisted() {
                self.effects.push_back(Effect::Persist { seq, write });
            }
            if term > before {
                self.term = term;
                self.effects.push_back(Effect::PersistTerm(term));
            }
            if service_handed {
                self.effects.push_back(Effect::TakeOver);
            }
            return r;
        }
        Ok(())
    }

    /// What this node serves from as it starts (its store's term and
    /// position): a node configured active tells it its backup at the
    /// first contact, and hands over to a backup that holds more.
    pub fn set_position(&mut self, position: Position) {
        self.position = position;
    }

    /// A backup starts from the replica it stored in an earlier run
    /// ([`Backup::resume`]); nothing happens to a node in another role.
    pub fn resume_replica(&mut self, replica: Replica) {
        if self.role != Role::Backup {
            return;
        }
        let b = Backup::resume(self.term, self.keying.clone(), replica);
        self.backup = Some(with_planted(&self.cfg, b));
    }

    /// A backup's replica is persisted up to `seq`: acknowledge it.
    pub fn persisted(&mut self, seq: u64) {
        if let Some(b) = self.backup.as_mut() {
            b.persisted(seq);
        }
    }

    /// When [`Node::handle_timeout`] next has work.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        let a = self.active.as_ref()?;
        let link = a.poll_timeout();
        // Replies held past the link's sync wait for the lease's end.
        let lease = (!self.held.is_empty() && !a.in_sync())
            .then(|| a.lease_until())
            .flatten();
        match (link, lease) {
            (Some(x), Some(y)) => Some(x.min(y)),
            (x, y) => x.or(y),
        }
    }

    /// Heartbeats, overdue acknowledgements, a silent backup, the end of
    /// a lease.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        a.handle_timeout(now);
        self.drain_active_events(now);
        self.release_after_lease(now);
    }

    /// Once the lease has ended and the link is out of sync, a promotion
    /// of the backup would reset every epoch: what waited for it leaves
    /// (check-points among it were rewritten when the link fell out of
    /// sync).
    fn release_after_lease(&mut self, now: Timestamp) {
        let Some(a) = self.active.as_ref() else {
            return;
        };
        if a.in_sync() || a.lease_holds(now) {
            return;
        }
        for h in std::mem::take(&mut self.held) {
            if h.grants.is_empty() {
                self.stats.released_unconfirmed += 1;
                self.effects.push_back(h.release(now, self.cleared_at));
            } else {
                self.stats.checkpoints_rewritten += h.grants.len() as u64;
                self.effects.push_back(Effect::Rewrite {
                    reply: h.reply,
                    grants: h.grants,
                    after: h.seq,
                });
            }
        }
    }

    /// Bytes to write to the peer.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        if let Some(p) = self.parting.take() {
            return Some(p);
        }
        if let Some(a) = self.active.as_mut() {
            return a.poll_transmit();
        }
        self.backup.as_mut().and_then(Backup::poll_transmit)
    }

    /// Whether bytes for the old peer are still to be sent after this
    /// node stood down ([`Effect::HandedOver`]): keep the connection open
    /// until [`Node::poll_transmit`] has yielded them.
    pub fn parting(&self) -> bool {
        self.parting.is_some()
    }

    /// Whether the active's link is down (the daemon should reconnect).
    pub fn link_down(&self) -> bool {
        self.active
            .as_ref()
            .is_some_and(|a| matches!(a.state(), LinkState::Disconnected))
    }

    /// The link version of the backup connected, for
    /// [`SnapshotSource::version`] (this release's when none is).
    pub fn peer_version(&self) -> u16 {
        self.active
            .as_ref()
            .map_or(crate::wire::LINK_VERSION, Active::peer_version)
    }

    /// Items per snapshot message, for [`SnapshotSource::encode`].
    pub fn snapshot_part(&self) -> usize {
        self.cfg.link.map_or(512, |l| l.snapshot_part)
    }

    /// Sends the snapshot the backup asked for ([`Effect::NeedSnapshot`]),
    /// copied under the core lock and encoded by
    /// [`SnapshotSource::encode`] outside every lock. Items of commits
    /// after its position that arrived meanwhile follow it. Ignored if the
    /// link went down or the term changed since.
    pub fn send_snapshot(&mut self, now: Timestamp, snap: EncodedSnapshot) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if active.state() != LinkState::NeedSnapshot || snap.term != active.term() {
            return;
        }
        if snap.version != active.peer_version() {
            // Copied for a backup of another version (the link was
            // re-established meanwhile): copy again for this one.
            self.effects.push_back(Effect::NeedSnapshot);
            return;
        }
        let src_seq = snap.seq;
        active.send_encoded_snapshot(now, snap.term, snap.seq, snap.bytes);
        self.replicated = snap.hashes;
        self.volatile_sent.clear();
        self.stats.resyncs += 1;
        self.stats.snapshot_items = snap.items;
        self.stats.snapshot_sent = Some(now);
        self.stats.snapshot_acked_ms = None;
        // What was committed after the copy's position follows it, in log
        // order, as one change.
        let deferred = std::mem::take(&mut self.deferred);
        let mut items = Vec::new();
        let mut top = 0;
        for (seq, its) in deferred {
            if seq <= src_seq {
                continue;
            }
            top = top.max(seq);
            for (item, hash) in its {
                if keep_for_backup(&mut self.replicated, &item, hash) {
                    items.push(item);
                }
            }
        }
        if top > 0 {
            if let Some(a) = self.active.as_mut() {
                a.push(now, top, items);
            }
        }
    }

    fn drain_active_events(&mut self, now: Timestamp) -> bool {
        let mut any = false;
        while let Some(e) = self.active.as_mut().and_then(Active::poll_event) {
            any = true;
            match e {
                ActiveEvent::Acked(seq) => {
                    while self.held.front().is_some_and(|h| h.seq <= seq) {
                        if let Some(h) = self.held.pop_front() {
                            self.stats.released += 1;
                            self.stats.checkpoints_acked += h.grants.len() as u64;
                            self.effects.push_back(h.release(now, self.cleared_at));
                        }
                    }
                }
                ActiveEvent::InSync => {
                    if let Some(t) = self.stats.snapshot_sent {
                        if self.stats.snapshot_acked_ms.is_none() {
                            self.stats.snapshot_acked_ms = Some((now - t).as_millis() as u64);
                        }
                    }
                    self.effects
                        .push_back(Effect::BackupState(self.backup_state()));
                }
                ActiveEvent::OutOfSync(_) => {
                    self.effects
                        .push_back(Effect::BackupState(self.backup_state()));
                    // Check-points can no longer be confirmed in time (RFC
                    // 7767 section 3.2): rewritten at once (the rewrite is a
                    // change of its own, held again under the lease). The
                    // rest wait for an acknowledgement or the lease's end.
                    let leased = self.active.as_ref().is_some_and(|a| a.lease_holds(now));
                    for h in std::mem::take(&mut self.held) {
                        if !h.grants.is_empty() {
                            self.stats.checkpoints_rewritten += h.grants.len() as u64;
                            self.effects.push_back(Effect::Rewrite {
                                reply: h.reply,
                                grants: h.grants,
                                after: h.seq,
                            });
                        } else if leased {
                            self.held.push_back(h);
                        } else {
                            self.stats.released_unconfirmed += 1;
                            self.effects.push_back(h.release(now, self.cleared_at));
                        }
                    }
                }
                ActiveEvent::NeedSnapshot => {
                    self.deferred.clear();
                    self.effects
                        .push_back(Effect::BackupState(self.backup_state()));
                    self.effects.push_back(Effect::NeedSnapshot);
                }
                ActiveEvent::HandedOver { peer_holds } => {
                    let parting = self.active.as_mut().and_then(Active::poll_transmit);
                    let held = self.position;
                    self.step_down(None);
                    self.parting = parting;
                    self.handed_over = Some((held, peer_holds));
                    self.effects.push_back(Effect::HandedOver {
                        term: self.term,
                        held,
                        peer_holds,
                    });
                    return any;
                }
                ActiveEvent::Fenced(term) => {
                    #[cfg(feature = "planted-skip-term-check")]
                    if self.cfg.planted.skip_term_check {
                        continue;
                    }
                    self.step_down(Some(term));
                    self.effects.push_back(Effect::Deposed { term: self.term });
                    return any;
                }
            }
        }
        any
    }

    /// Becomes a backup in `max(term, seen)`: serves nothing, drops what it
    /// held (those replies are never sent).
    fn step_down(&mut self, seen: Option<Term>) {
        self.serving = false;
        self.first_contact = false;
        self.term = self.term.max(seen.unwrap_or(0));
        self.role = Role::Backup;
        self.active = None;
        self.stats.dropped_deposed += self.held.len() as u64;
        self.held.clear();
        self.replicated.clear();
        self.deferred.clear();
        self.volatile_sent.clear();
        let b = Backup::new(self.term, self.keying.clone());
        self.backup = Some(with_planted(&self.cfg, b));
        self.effects.push_back(Effect::PersistTerm(self.term));
    }

    /// Stops acting as active (`ctl demote`, or keepalived moved the
    /// address away): serves nothing from now on. Returns whether the
    /// role changed; if so, the daemon replaces its state with an empty
    /// one, as for [`Effect::Deposed`].
    pub fn demote(&mut self) -> bool {
        if self.role != Role::Active {
            return false;
        }
        self.step_down(None);
        true
    }

    /// The (term, log position) of the state this node holds: an active's
    /// own log, a backup's replica (nothing: the zero position).
    pub fn holds(&self) -> Position {
        match (&self.role, &self.backup) {
            (Role::Backup, Some(b)) => b.holds(),
            (Role::Backup, None) => Position::default(),
            _ => self.position,
        }
    }

    /// What the backup has acknowledged of an active's state (its replica
    /// holds at least this), or, before any acknowledgement in this term,
    /// the position the term started from. `None` unless active.
    pub fn acknowledged(&self) -> Option<Position> {
        let a = self.active.as_ref()?;
        (self.role == Role::Active).then(|| Position {
            term: self.term,
            seq: a.acked(),
        })
    }

    /// An operator cleared mappings at `now` (under the core's lock, before
    /// any reply made after it): every reply made until then is restamped
    /// at its release, which drops one that grants a mapping the clear
    /// took (see [`Effect::ReleaseAged`]).
    pub fn cleared(&mut self, now: Timestamp) {
        self.cleared_at = Some(self.cleared_at.map_or(now, |c| c.max(now)));
    }

    /// A term above `floor` must be the next one this node acts in (an
    /// external witness knows `floor` was served): the next promotion
    /// takes the higher of the two.
    pub fn observe_term(&mut self, floor: Term) {
        if let Some(b) = self.backup.as_mut() {
            b.observe_term(floor);
        }
        if self.role != Role::Active {
            self.term = self.term.max(floor);
        }
    }

    /// The term a promotion would act in, to be persisted before
    /// [`Node::promote`] (fencing depends on never acting twice in one
    /// term).
    pub fn promotion_term(&self) -> Result<Term, PromoteError> {
        match self.role {
            Role::Active => Err(PromoteError::AlreadyActive),
            Role::Standalone => Err(PromoteError::Standalone),
            Role::Backup => match self.handed_over {
                Some((own, peer)) => Err(PromoteError::PeerFresher { own, peer }),
                None => Ok(self
                    .backup
                    .as_ref()
                    .map_or(self.term, Backup::term)
                    .saturating_add(1)),
            },
        }
    }

    /// Becomes active (`ctl promote`, keepalived's notify hook), after the
    /// term of [`Node::promotion_term`] was persisted. The takeover names
    /// the state to serve, the epochs that continue and the hosts to
    /// ANNOUNCE to (failure-scenarios draft section 2.6); the node serves
    /// at once.
    pub fn promote(&mut self, now: Timestamp) -> Result<Takeover, PromoteError> {
        self.promotion_term()?;
        let backup = self
            .backup
            .take()
            .unwrap_or_else(|| Backup::new(self.term, self.keying.clone()));
        let takeover = backup.promote(now);
        self.role = Role::Active;
        self.term = takeover.term;
        self.position = Position {
            term: takeover.term,
            seq: takeover.state.last_seq,
        };
        self.active = self
            .cfg
            .link
            .map(|t| Active::new(takeover.term, self.cfg.leased(t), self.keying.clone()));
        self.held.clear();
        self.replicated.clear();
        self.deferred.clear();
        self.volatile_sent.clear();
        self.serving = true;
        self.first_contact = false;
        self.stats.takeovers += 1;
        self.effects
            .push_back(Effect::BackupState(self.backup_state()));
        Ok(takeover)
    }
}

/// Whether `item` must travel to the backup, keeping `replicated` (the
/// hashes of the keys the backup holds) up to date: check-pointed upserts
/// always travel; other upserts and removals only for a key the backup
/// holds, so volatile mappings cost the link nothing.
/// Whether `item`, streamed at `now`, only moves a subscriber's volatile
/// end later from one the backup already has at least `headroom` ahead
/// (see [`Node::handle_commit`]); records what the backup will have.
fn extends_far_enough(
    sent: &mut HashMap<SubscriberId, (Vec<IpAddr>, Timestamp)>,
    item: &Item,
    now: Timestamp,
    headroom: Option<Duration>,
) -> bool {
    let Item::Volatile {
        subscriber,
        hosts,
        until,
    } = item
    else {
        return false;
    };
    let far = match (sent.get(subscriber), headroom) {
        (Some((h, end)), Some(room)) => h == hosts && until > end && *end >= now + room,
        _ => false,
    };
    match sent.get_mut(subscriber) {
        _ if hosts.is_empty() => {
            sent.remove(subscriber);
        }
        // The common case, a renewal: only the end moves, nothing is
        // allocated.
        Some((h, end)) if h == hosts => *end = *until,
        _ => {
            sent.insert(*subscriber, (hosts.clone(), *until));
        }
    }
    far
}

fn keep_for_backup(replicated: &mut HashSet<u64>, item: &Item, hash: Option<u64>) -> bool {
    match (item, hash) {
        (Item::Upsert(r), Some(h)) if r.checkpoint => {
            replicated.insert(h);
            true
        }
        // A mapping that is not check-pointed travels only if the backup
        // follows it already (it was check-pointed earlier in its life).
        (Item::Upsert(_), Some(h)) => replicated.contains(&h),
        (Item::Remove(_), Some(h)) => replicated.remove(&h),
        _ => true,
    }
}

/// `bytes` (a PCP response) without CHECKPOINT_REQUIRED, or `None` if it
/// cannot be rewritten: the caller then drops it, since sending it as it
/// was would report a check-point the backup never confirmed (RFC 7767
/// section 3.2: a request that cannot be honoured is processed as if the
/// option were absent, and the option is not echoed).
///
/// A NAT-PMP reply (version 0) carries no option to strip: it never said
/// the mapping was check-pointed, and leaves as it is.
pub fn strip_checkpoint(bytes: &[u8], cp: &portkeep_proto::CodePoints) -> Option<Vec<u8>> {
    use portkeep_proto::{PcpOption, Response};
    if bytes.first() == Some(&portkeep_proto::NATPMP_VERSION) {
        return Some(bytes.to_vec());
    }
    let mut r = Response::parse(bytes, cp).ok()?;
    let before = r.options.len();
    r.options.retain(|o| *o != PcpOption::CheckpointRequired);
    if r.options.len() == before {
        return Some(bytes.to_vec());
    }
    let mut out = Vec::with_capacity(bytes.len());
    r.encode(cp, &mut out).ok()?;
    Some(out)
}

/// `b` with the node's planted defects (test builds).
#[allow(unused_mut)]
fn with_planted(cfg: &NodeConfig, mut b: Backup) -> Backup {
    #[cfg(feature = "planted-ack-before-persist")]
    b.set_ack_before_persist(cfg.planted.ack_before_persist);
    let _ = cfg;
    b
}
