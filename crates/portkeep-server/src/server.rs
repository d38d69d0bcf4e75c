//! The PCP server state machine (RFC 6887 sections 8.2, 11-15).

use hashbrown::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use portkeep_proto::addr::{from_wire, is_unspecified, to_wire};
use portkeep_proto::{
    build_error_response, Disposition, Filter, GetData, MapData, Next, Nonce, OpData, PcpOption,
    PeerData, Protocol, Request, Response, ResponseHeader, ResultCode, CLIENT_PORT, GET_BODY_LEN,
    HEADER_LEN, MAX_MESSAGE_LEN, VERSION,
};

use crate::announce::{Announcer, Audience};
use crate::change::{
    Change, ChangeRecord, FilterRule, MappingKey, MappingKind, MappingRecord, PortHold,
    RemoveReason, RequesterState,
};
use crate::getnext::{self, Answer, GetFilter, Query};
use crate::policy::{
    self, Ask, BackupState, CheckpointClass, CheckpointMode, CheckpointStats, Decision, TokenBucket,
};
use crate::prefix::{canonical, Prefix};
use crate::table::{AllocError, Entry, Extra, Id, Pool, Suggestion, Table};
use crate::{ServerConfig, SubscriberId, Timestamp};

mod forwards;
mod invariants;
mod natpmp;
mod reconfigure;
pub use forwards::STATIC_NONCE;
pub use natpmp::NATPMP_NONCE;

/// What to do with a datagram after [`Server::handle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Send the bytes written to `out` back to the source.
    Reply,
    /// Send nothing (RFC 6887 section 8.2 says to drop this datagram).
    Drop,
}

/// Per-subscriber state: how many mappings it holds and, if its epoch was
/// reset independently of the server's, when its epoch began; how many of
/// its mappings are check-pointed and its check-point rate (RFC 7767
/// section 3.2: both limited "per network attachment point").
#[derive(Debug, Default, Clone, Copy)]
struct Subscriber {
    mappings: u32,
    anchor: Option<Timestamp>,
    checkpointed: u32,
    bucket: TokenBucket,
}

/// A THIRD_PARTY client as the server tracks it ([`RequesterState`], with
/// counts that are rebuilt from the mappings on restore).
#[derive(Debug, Clone)]
struct Requester {
    port: u16,
    anchor: Option<Timestamp>,
    /// Mappings it manages.
    mappings: u32,
    /// The expiries of those the backup does not follow.
    volatile: Expiries,
}

impl Requester {
    fn new(port: u16) -> Requester {
        Requester {
            port,
            anchor: None,
            mappings: 0,
            volatile: Expiries::default(),
        }
    }

    fn state(&self) -> RequesterState {
        RequesterState {
            port: self.port,
            anchor: self.anchor,
            volatile_until: self.volatile.latest(),
        }
    }
}

/// The expiries of a set of volatile mappings (a multiset), and the
/// latest of them: when the last of that state would end by itself.
///
/// A backup must know not only who holds volatile state but until when:
/// state that ended before a takeover was not lost there, and resetting
/// an epoch for it tells a client an untruth (failure-scenarios draft
/// section 2.6.1: the epoch resets exactly when state was lost).
#[derive(Debug, Clone, Default)]
struct Expiries {
    /// Each expiry with how many mappings end then: an ordered multiset,
    /// so a renewal of one of a subscriber's thousands of mappings costs a
    /// logarithm, not a scan.
    all: std::collections::BTreeMap<Timestamp, u32>,
}

impl Expiries {
    fn add(&mut self, t: Timestamp) {
        *self.all.entry(t).or_insert(0) += 1;
    }

    fn remove(&mut self, t: Timestamp) {
        if let std::collections::btree_map::Entry::Occupied(mut e) = self.all.entry(t) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }

    fn latest(&self) -> Option<Timestamp> {
        self.all.last_key_value().map(|(t, _)| *t)
    }

    /// Every expiry, once per mapping, in order.
    fn sorted(&self) -> Vec<Timestamp> {
        self.all
            .iter()
            .flat_map(|(t, n)| std::iter::repeat_n(*t, *n as usize))
            .collect()
    }
}

/// A subscriber's hosts that hold volatile mappings, with how many each
/// holds, and those mappings' expiries.
#[derive(Debug, Clone, Default)]
struct VolatileSet {
    hosts: Vec<(IpAddr, u32)>,
    expiries: Expiries,
}

/// An unsolicited ANNOUNCE due now ([`Server::poll_announcements`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Announcement {
    /// To one client, with the epoch it sees.
    Unicast {
        /// Where: the client's address, and its request port if it is a
        /// THIRD_PARTY client, else 5350.
        to: SocketAddr,
        /// The ANNOUNCE.
        bytes: Vec<u8>,
    },
    /// To every client, with the server-wide epoch: multicast on the
    /// configured interfaces and unicast to the configured addresses.
    Everyone {
        /// The ANNOUNCE.
        bytes: Vec<u8>,
    },
}

/// Counters for the control interface and logs.
#[derive(Debug, Clone)]
pub struct Stats {
    /// Datagrams handled.
    pub received: u64,
    /// Datagrams dropped without a reply.
    pub dropped: u64,
    /// MAP and PEER mappings made anew (not found by a renewal): after a
    /// loss, how many a client re-created.
    pub created: u64,
    /// Replies by result code.
    pub results: [u64; 256],
    /// CHECKPOINT_REQUIRED decisions (RFC 7767).
    pub checkpoint: CheckpointStats,
    /// The same, by the name of the class that decided (RFC 7767 section
    /// 4: the operator's policy per subscriber); a class a reload removed
    /// keeps its counts.
    pub checkpoint_by_class: std::collections::BTreeMap<Box<str>, CheckpointStats>,
    /// Datagrams dropped because their subscriber sent faster than
    /// [`ServerConfig::request_rate`].
    pub rate_limited: u64,
    /// Error responses not sent, beyond [`ServerConfig::error_rate`].
    pub errors_suppressed: u64,
    /// Datagrams from addresses outside [`ServerConfig::clients`].
    pub not_clients: u64,
    /// Datagrams that arrived on an interface outside
    /// [`ServerConfig::interfaces`].
    pub wrong_interface: u64,
    /// NAT-PMP requests answered (RFC 6886).
    pub natpmp: u64,
    /// PCP requests received, by opcode (the seven bits after the R bit
    /// of a version-2 datagram with the R bit clear).
    pub by_opcode: [u64; 128],
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            received: 0,
            dropped: 0,
            created: 0,
            rate_limited: 0,
            errors_suppressed: 0,
            not_clients: 0,
            wrong_interface: 0,
            natpmp: 0,
            results: [0; 256],
            checkpoint: CheckpointStats::default(),
            checkpoint_by_class: std::collections::BTreeMap::new(),
            by_opcode: [0; 128],
        }
    }
}

/// The options of a MAP or PEER request, after RFC 6887 section 7.3 checks.
#[derive(Debug, Default)]
struct ReqOptions {
    third_party: Option<IpAddr>,
    prefer_failure: bool,
    filters: Vec<Filter>,
    description: Option<String>,
    checkpoint: bool,
    /// GET only: the request's NEXT (failure-scenarios draft section 4.4).
    next: Option<Next>,
}

/// A request failed with this result code; `parsed` says whether the
/// request was understood (RFC 6887 section 7.2: the reserved 96 bits of
/// the response are then zero rather than a copy of the client address).
#[derive(Debug, Clone, Copy)]
struct Fail {
    code: ResultCode,
    parsed: bool,
}

impl Fail {
    fn parsed(code: ResultCode) -> Fail {
        Fail { code, parsed: true }
    }
    fn unparsed(code: ResultCode) -> Fail {
        Fail {
            code,
            parsed: false,
        }
    }
}

/// What a server restarting from stable storage starts from.
#[derive(Debug, Clone, Default)]
pub struct Restored {
    /// When the server-wide epoch began.
    pub anchor: Timestamp,
    /// Subscribers whose epoch began at their own time.
    pub subscriber_anchors: Vec<(SubscriberId, Timestamp)>,
    /// The mappings as last stored.
    pub mappings: Vec<MappingRecord>,
    /// The last log sequence number written.
    pub last_seq: u64,
    /// The term of the pair in which this state was served (0 before any
    /// promotion): with `last_seq`, the position a node can vouch for when
    /// it comes back after a double failure (failure-scenarios draft
    /// section 2.6: the freshest state is served).
    pub term: u64,
    /// Hosts owed an ANNOUNCE, per subscriber, and until when
    /// ([`Change::AnnounceOwed`]).
    pub owed: Vec<(SubscriberId, Vec<IpAddr>, Timestamp)>,
    /// THIRD_PARTY requesters ([`Change::Requester`]).
    pub requesters: Vec<(IpAddr, RequesterState)>,
    /// External endpoints held back after they were freed
    /// ([`Change::PortHeld`]); those that ended are ignored.
    pub holds: Vec<PortHold>,
}

/// What [`Server::restore`] did with the stored state.
#[derive(Debug, Clone, Default)]
pub struct RestoreReport {
    /// Mappings back in the table.
    pub restored: usize,
    /// Mappings that expired while the server was down (dropped).
    pub expired: usize,
    /// Mappings that could not be restored (their external address left the
    /// pool, or their endpoint was claimed twice); their subscribers' epochs
    /// were reset, because those subscribers lost state.
    pub dropped: Vec<MappingRecord>,
    /// Static forwards not installed: a client's mapping holds their
    /// internal or external endpoint (the configuration changed while it
    /// was granted).
    pub forwards_skipped: Vec<crate::config::StaticForward>,
}

/// Which subscribers `portkeepd ctl clear` clears.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClearSelector {
    /// Every mapping; the server-wide epoch restarts.
    All,
    /// One subscriber.
    Subscriber(SubscriberId),
    /// Every mapping whose internal address is in the prefix.
    Prefix(Prefix),
    /// One MAP mapping, by its internal address, protocol and port (RFC
    /// 6887 section 11.1), and every PEER mapping of that internal
    /// endpoint (they share its external endpoint, section 12.3).
    Mapping(MappingKey),
}

/// A subscriber whose state `clear` removed: who to send an ANNOUNCE to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cleared {
    /// The subscriber.
    pub subscriber: SubscriberId,
    /// Internal addresses its mappings had (its clients' addresses).
    pub hosts: Vec<IpAddr>,
    /// Mappings removed.
    pub mappings: usize,
}

/// The sans-IO PCP server.
///
/// Feed it datagrams with [`Server::handle`] and the passage of time with
/// [`Server::handle_timeout`]; take the state changes it made with
/// [`Server::drain_changes`]. It never reads a clock or touches a socket.
#[derive(Debug)]
pub struct Server {
    cfg: ServerConfig,
    table: Table,
    subscribers: HashMap<SubscriberId, Subscriber>,
    /// When the server's own epoch began (RFC 6887 section 8.5).
    anchor: Timestamp,
    log: Vec<ChangeRecord>,
    seq: u64,
    stats: Stats,
    /// The latest `now` seen, for bookkeeping inside calls that take none.
    now: Timestamp,
    /// The link to the backup (RFC 7767: where check-pointed state goes).
    backup: BackupState,
    /// Check-pointed mappings held, against `checkpoint.max_mappings`.
    checkpointed: u32,
    /// Mappings held by the subscribers of each check-point class (by
    /// index in the policy's classes; RFC 7767 section 4), for the
    /// metrics: kept as mappings come and go, rebuilt by a restore.
    by_class: Vec<u64>,
    /// Whether any class check-points without being asked; when none does,
    /// requests without the option skip the policy entirely.
    any_always: bool,
    /// Rate buckets of subscribers that hold no mapping any more but have
    /// not refilled: deleting every mapping must not reset the rate
    /// (RFC 7767 section 5: the abuse stays confined to the abuser).
    idle_buckets: HashMap<SubscriberId, TokenBucket>,
    /// Size of `idle_buckets` at which full buckets are swept out.
    idle_sweep_at: usize,
    /// Per subscriber, its hosts holding volatile (not check-pointed)
    /// mappings, with how many each holds, and until when the last of them
    /// lives. RFC 7767 saves replicating volatile mappings, but the backup
    /// must still know who holds them: on takeover exactly those
    /// subscribers lost state whose volatile mappings were still alive
    /// (failure-scenarios draft section 2.6).
    volatile: HashMap<SubscriberId, VolatileSet>,
    /// Subscribers whose set of volatile hosts or its end changed since
    /// [`Server::drain_volatile`] was last called.
    volatile_dirty: Vec<SubscriberId>,
    /// Hosts owed an ANNOUNCE after a loss, per subscriber, and until when
    /// ([`Server::owe_announce`]).
    owed: HashMap<SubscriberId, (Vec<IpAddr>, Timestamp)>,
    /// THIRD_PARTY clients, by address ([`RequesterState`]).
    requesters: HashMap<IpAddr, Requester>,
    /// When requesters with nothing left to keep were last forgotten.
    requesters_swept: Timestamp,
    /// The ANNOUNCEs scheduled: one place that knows who to tell after
    /// any loss, when, and how often.
    announcer: Announcer,
    /// Per subscriber, its rate of requests ([`ServerConfig::request_rate`]);
    /// full buckets are swept out as for `idle_buckets`.
    request_buckets: HashMap<SubscriberId, TokenBucket>,
    request_sweep_at: usize,
    /// The server's rate of error responses ([`ServerConfig::error_rate`]).
    error_bucket: TokenBucket,
    /// Planted defects ([`Server::plant`]), in builds with their feature.
    #[cfg(any(
        feature = "planted-refused-kept-removes",
        feature = "planted-refused-lost-keeps-epoch"
    ))]
    planted: Planted,
}

/// Defects that can be switched on in test builds, each behind its own
/// cargo feature, so that a test can show the simulator catches it.
#[cfg(any(
    feature = "planted-refused-kept-removes",
    feature = "planted-refused-lost-keeps-epoch"
))]
#[derive(Debug, Clone, Copy, Default)]
pub struct Planted {
    /// [`Server::refused`] takes a refused renewal back as if it had never
    /// been installed (the mapping goes, no epoch moves), though the NAT
    /// still holds it: its client loses it without being told.
    #[cfg(feature = "planted-refused-kept-removes")]
    pub refused_kept_removes: bool,
    /// [`Server::refused`] removes a mapping the NAT lost without resetting
    /// its subscriber's epoch or owing its host an ANNOUNCE.
    #[cfg(feature = "planted-refused-lost-keeps-epoch")]
    pub refused_lost_keeps_epoch: bool,
}

fn sorted_hosts(hosts: &[(IpAddr, u32)]) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = hosts.iter().map(|(h, _)| *h).collect();
    v.sort_unstable();
    v
}

/// A granted lifetime shortened by a hold of `waited_ms`, rounded up to
/// whole seconds, so the client's mapping never outlives the server's
/// (never below one second: zero would read as a delete).
fn lifetime_after_wait(lifetime: u32, waited_ms: u64) -> u32 {
    let waited = u32::try_from(waited_ms.div_ceil(1000)).unwrap_or(u32::MAX);
    lifetime.saturating_sub(waited).max(1)
}

/// Size of `idle_buckets` below which it is never swept.
const IDLE_SWEEP_MIN: usize = 1024;

impl Server {
    /// A server with an empty table whose epoch starts at `now`. A node
    /// that starts serving it puts the operator's forwards in with
    /// [`Server::install_static_forwards`]; a restore does that itself.
    pub fn new(cfg: ServerConfig, now: Timestamp) -> Server {
        let classes = cfg.checkpoint.classes.len();
        let pool = Pool {
            addrs: cfg
                .external_addresses
                .iter()
                .copied()
                .map(canonical)
                .collect(),
            port_lo: cfg.port_min.min(cfg.port_max),
            port_hi: cfg.port_max.max(cfg.port_min),
        };
        let any_always = cfg
            .checkpoint
            .classes
            .iter()
            .any(|c| c.mode == CheckpointMode::Always);
        let announcer = Announcer::new(cfg.announce);
        let mut table = Table::new(pool, cfg.seed);
        table.set_hold_delay(cfg.port_recycle_delay);
        Server {
            table,
            cfg,
            subscribers: HashMap::new(),
            anchor: now,
            log: Vec::new(),
            seq: 0,
            stats: Stats::default(),
            now,
            backup: BackupState::Standalone,
            checkpointed: 0,
            by_class: vec![0; classes],
            any_always,
            idle_buckets: HashMap::new(),
            idle_sweep_at: IDLE_SWEEP_MIN,
            volatile: HashMap::new(),
            volatile_dirty: Vec::new(),
            owed: HashMap::new(),
            requesters: HashMap::new(),
            requesters_swept: now,
            announcer,
            request_buckets: HashMap::new(),
            request_sweep_at: IDLE_SWEEP_MIN,
            error_bucket: TokenBucket::default(),
            #[cfg(any(
                feature = "planted-refused-kept-removes",
                feature = "planted-refused-lost-keeps-epoch"
            ))]
            planted: Planted::default(),
        }
    }

    /// Switches planted defects on (test builds with their feature).
    #[cfg(any(
        feature = "planted-refused-kept-removes",
        feature = "planted-refused-lost-keeps-epoch"
    ))]
    pub fn plant(&mut self, planted: Planted) {
        self.planted = planted;
    }

    /// Rebuilds a server from stable storage (failure-scenarios draft
    /// section 2.6: with its state intact the server keeps every epoch, so
    /// clients see no reset and re-create nothing). Mappings that expired
    /// while the server was down are dropped and logged as expired, so the
    /// store forgets them too. Every other mapping gets back exactly the
    /// external endpoint it had; one that cannot (its address left the pool,
    /// or a second record of the same mapping) is dropped and its
    /// subscriber's epoch reset, as that subscriber did lose state.
    pub fn restore(cfg: ServerConfig, now: Timestamp, state: Restored) -> (Server, RestoreReport) {
        Self::restore_as(cfg, now, state, false)
    }

    /// [`Server::restore`] from a backup's replica on takeover: the backup
    /// followed every one of these mappings, including those no longer
    /// check-pointed, so they stay [replicated](Server::replicated_mappings)
    /// and reach this node's own backup in turn (their clients may still
    /// hold a check-point granted before, RFC 7767 section 3.2).
    pub fn restore_replica(
        cfg: ServerConfig,
        now: Timestamp,
        state: Restored,
    ) -> (Server, RestoreReport) {
        Self::restore_as(cfg, now, state, true)
    }

    fn restore_as(
        cfg: ServerConfig,
        now: Timestamp,
        state: Restored,
        replica: bool,
    ) -> (Server, RestoreReport) {
        let mut s = Server::new(cfg, state.anchor);
        s.table.prune_holds(now);
        s.seq = state.last_seq;
        for (sub, anchor) in state.subscriber_anchors {
            s.subscriber_mut(sub).anchor = Some(anchor);
        }
        for (ip, r) in state.requesters {
            s.requesters.insert(
                ip,
                Requester {
                    anchor: r.anchor,
                    ..Requester::new(r.port)
                },
            );
        }
        let mut report = RestoreReport::default();
        let mut lost = Vec::new();
        let mut lost_managers = Vec::new();
        for m in state.mappings {
            let sub = s.cfg.subscriber_keying.subscriber_of(m.key.internal_ip);
            if m.expires <= now {
                report.expired += 1;
                // Its endpoint was freed when it expired: held from then
                // (RFC 6887 section 15), if that has not ended yet.
                let hold = PortHold {
                    owner: m.key,
                    nonce: m.nonce,
                    external: m.external,
                    until: m.expires + s.cfg.port_recycle_delay,
                };
                s.push(Change::Removed {
                    mapping: m,
                    reason: RemoveReason::Expired,
                });
                if hold.until > now && !s.cfg.port_recycle_delay.is_zero() {
                    s.table.restore_hold(&hold);
                    s.push(Change::PortHeld(hold));
                }
                continue;
            }
            let remote = match m.kind {
                crate::MappingKind::Map => None,
                crate::MappingKind::Peer { remote } => Some(remote),
            };
            let duplicate = match remote {
                None => s.table.map_entry(&m.key).is_some(),
                Some(r) => s.table.peer_entry(&m.key, r).is_some(),
            };
            if duplicate {
                // Two records for one mapping (a damaged or merged state):
                // the first stands; whoever held the other lost it, so its
                // subscriber's epoch resets (failure-scenarios draft
                // section 2.6.1). No removal is logged: it would remove the
                // one kept, stored under the same key.
                lost.push(sub);
                lost_managers.extend(m.manager);
                report.dropped.push(m);
                continue;
            }
            let bound = if s.cfg.is_firewalled(m.key.internal_ip) {
                // Its endpoint must still be its own: a mapping made
                // before the prefix became firewalled translated.
                let own = SocketAddr::new(m.key.internal_ip, m.key.internal_port);
                if m.external == own {
                    s.table.bind_identity(m.key)
                } else {
                    Err(crate::table::AllocError::CannotProvide)
                }
            } else {
                s.table.bind_exact(m.key, m.external)
            };
            let Ok(binding) = bound else {
                lost.push(sub);
                lost_managers.extend(m.manager);
                s.push(Change::Removed {
                    mapping: m.clone(),
                    reason: RemoveReason::Cleared,
                });
                report.dropped.push(m);
                continue;
            };
            s.table.insert(Entry {
                binding,
                nonce: m.nonce,
                expires: m.expires,
                lifetime: m.lifetime,
                checkpoint: m.checkpoint,
                replicated: m.checkpoint || m.followed || replica,
                third_party: m.third_party,
                extra: make_extra(
                    m.filters,
                    m.description.map(String::into_boxed_str),
                    remote,
                    m.manager,
                ),
            });
            // RFC 7767 section 3.2: a restored check-pointed mapping holds
            // its slot in the server's capacity and its subscriber's quota;
            // its next renewal is decided afresh.
            s.count_in_class(sub, true);
            let state = s.subscriber_mut(sub);
            state.mappings += 1;
            if m.checkpoint {
                state.checkpointed += 1;
                s.checkpointed += 1;
            }
            let followed = Some((m.checkpoint || m.followed || replica, m.expires));
            s.note_volatile(sub, m.key.internal_ip, None, followed);
            if let Some(ip) = m.manager {
                let port = s.requesters.get(&ip).map_or(CLIENT_PORT, |r| r.port);
                s.note_manager(ip, port, None, followed, false);
            }
            report.restored += 1;
        }
        lost.sort();
        lost.dedup();
        for sub in lost {
            s.reset_subscriber_epoch(now, sub);
        }
        let hosts: Vec<(SubscriberId, IpAddr)> = report
            .dropped
            .iter()
            .map(|m| (m.subscriber, m.key.internal_ip))
            .collect();
        s.owe_announce(now, &hosts);
        s.requesters_lost(now, lost_managers);
        // A requester stored with nothing left to keep (its mappings
        // expired while down, its epoch its subscriber's) is forgotten.
        let idle: Vec<IpAddr> = s
            .requesters
            .iter()
            .filter(|(_, r)| r.mappings == 0 && r.anchor.is_none())
            .map(|(ip, _)| *ip)
            .collect();
        for ip in idle {
            s.requesters.remove(&ip);
            s.push(Change::Requester { ip, state: None });
        }
        // What the counts say now supersedes what was stored.
        let mut known: Vec<IpAddr> = s.requesters.keys().copied().collect();
        known.sort_unstable();
        for ip in known {
            s.push_requester(ip);
        }
        for (sub, hosts, until) in state.owed {
            if until > now && !hosts.is_empty() {
                s.owed.insert(sub, (hosts, until));
            }
        }
        for h in &state.holds {
            s.table.restore_hold(h);
        }
        report.forwards_skipped = s.install_static_forwards(now);
        (s, report)
    }

    /// Removes mappings by operator command and resets the epoch of exactly
    /// the subscribers affected (failure-scenarios draft section 2.6.2:
    /// clearing mappings is a loss of state for their owners, so their
    /// clients must see a new epoch; nobody else's epoch moves). Returns the
    /// affected subscribers and their hosts, to send ANNOUNCEs to.
    pub fn clear(&mut self, now: Timestamp, which: ClearSelector) -> Vec<Cleared> {
        let keying = &self.cfg.subscriber_keying;
        let victims: Vec<(Id, MappingRecord)> = self
            .table
            .entries
            .iter()
            .filter(|(_, e)| e.nonce != STATIC_NONCE)
            .filter_map(|(id, _)| Some((id, self.table.record(id, keying)?)))
            .filter(|(_, m)| match which {
                ClearSelector::All => true,
                ClearSelector::Subscriber(sub) => m.subscriber == sub,
                ClearSelector::Prefix(p) => p.contains(m.key.internal_ip),
                ClearSelector::Mapping(k) => m.key == k,
            })
            .collect();
        // Before the removals, which may leave a requester with nothing to
        // keep: it lost state, so its epoch moves and it stays known for
        // its ANNOUNCEs. Clearing everything resets every requester.
        let managers: Vec<IpAddr> = if which == ClearSelector::All {
            self.requesters.keys().copied().collect()
        } else {
            victims.iter().filter_map(|(_, m)| m.manager).collect()
        };
        self.requesters_lost(now, managers);
        let mut affected: std::collections::BTreeMap<SubscriberId, Cleared> =
            std::collections::BTreeMap::new();
        if let ClearSelector::Subscriber(sub) = which {
            affected.insert(
                sub,
                Cleared {
                    subscriber: sub,
                    hosts: Vec::new(),
                    mappings: 0,
                },
            );
        }
        for (id, m) in victims {
            let c = affected.entry(m.subscriber).or_insert_with(|| Cleared {
                subscriber: m.subscriber,
                hosts: Vec::new(),
                mappings: 0,
            });
            c.mappings += 1;
            if !c.hosts.contains(&m.key.internal_ip) {
                c.hosts.push(m.key.internal_ip);
            }
            self.remove_entry(id, RemoveReason::Cleared);
        }
        let owed: Vec<(SubscriberId, IpAddr)> = affected
            .values()
            .flat_map(|c| c.hosts.iter().map(|h| (c.subscriber, *h)))
            .collect();
        self.owe_announce(now, &owed);
        if which == ClearSelector::All {
            self.anchor = now;
            self.subscribers.retain(|_, s| {
                s.anchor = None;
                s.mappings > 0
            });
            self.push(Change::ServerEpochReset { anchor: now });
        } else {
            for sub in affected.keys().copied().collect::<Vec<_>>() {
                self.reset_subscriber_epoch(now, sub);
            }
        }
        affected.into_values().collect()
    }

    /// Restarts every epoch at `now` and tells everyone, keeping the
    /// mappings: state may have been lost that no one can name (a store
    /// served in relaxed mode that stopped uncleanly may lack up to a
    /// second of acknowledged changes). Failure-scenarios draft section
    /// 2.6.1: every client that may have lost state must see a reset;
    /// each host and THIRD_PARTY client known is owed an ANNOUNCE, and
    /// everyone is told by multicast (RFC 6887 section 14.1.3).
    pub fn reset_every_epoch(&mut self, now: Timestamp) {
        let keying = &self.cfg.subscriber_keying;
        let mut told: Vec<(SubscriberId, IpAddr)> = self
            .table
            .entries
            .iter()
            .filter_map(|(id, _)| self.table.record(id, keying))
            .map(|m| (m.subscriber, m.key.internal_ip))
            .chain(
                self.requesters
                    .keys()
                    .map(|ip| (keying.subscriber_of(*ip), *ip)),
            )
            .collect();
        told.sort_unstable();
        told.dedup();
        self.anchor = now;
        self.subscribers.retain(|_, s| {
            s.anchor = None;
            s.mappings > 0
        });
        self.push(Change::ServerEpochReset { anchor: now });
        let mut ips: Vec<IpAddr> = self.requesters.keys().copied().collect();
        ips.sort_unstable();
        for ip in ips {
            // Anchored at the new server epoch (the same epoch), so it
            // stays known for its ANNOUNCEs with no mapping left.
            if let Some(r) = self.requesters.get_mut(&ip) {
                r.anchor = Some(now);
            }
            self.push_requester(ip);
        }
        self.owe_announce(now, &told);
        self.announce_everyone(now);
    }

    /// Restarts one subscriber's epoch at `now` (RFC 6887 section 8.5).
    fn reset_subscriber_epoch(&mut self, now: Timestamp, sub: SubscriberId) {
        self.subscriber_mut(sub).anchor = Some(now);
        self.push(Change::EpochReset {
            subscriber: sub,
            anchor: now,
        });
    }

    /// When the server-wide epoch began.
    pub fn anchor(&self) -> Timestamp {
        self.anchor
    }

    /// Subscribers whose epoch began at their own time.
    pub fn subscriber_anchors(&self) -> Vec<(SubscriberId, Timestamp)> {
        self.subscribers
            .iter()
            .filter_map(|(id, s)| Some((*id, s.anchor?)))
            .collect()
    }

    /// The configuration in force.
    pub fn config(&self) -> &ServerConfig {
        &self.cfg
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Number of mappings (MAP and PEER) held.
    pub fn mapping_count(&self) -> usize {
        self.table.len()
    }

    /// MAP and PEER mappings held: `(map, peer)`.
    pub fn mapping_count_by_kind(&self) -> (usize, usize) {
        let map = self.table.map_len();
        (map, self.table.len().saturating_sub(map))
    }

    /// Subscribers the core keeps state for: those holding a mapping or an
    /// epoch of their own (RFC 6887 section 8.5, failure-scenarios draft
    /// section 2.6.2).
    pub fn subscriber_count(&self) -> usize {
        self.subscribers.len()
    }

    /// Tells the core the state of its link to the backup, the last check
    /// of RFC 7767 section 3.2's "resources available for check-pointing":
    /// only [`BackupState::InSync`] lets a check-point be honoured. A
    /// server starts [`BackupState::Standalone`]: nowhere to check-point
    /// to, so it honours nothing and never echoes the option. Mappings
    /// already check-pointed keep their flag; each one's next renewal is
    /// decided afresh.
    pub fn set_backup_state(&mut self, state: BackupState) {
        self.backup = state;
    }

    /// The backup link state last set.
    pub fn backup_state(&self) -> BackupState {
        self.backup
    }

    /// Number of check-pointed mappings held.
    pub fn checkpointed_count(&self) -> u32 {
        self.checkpointed
    }

    /// The check-point class of a subscriber (RFC 7767 section 4).
    pub fn checkpoint_class_of(&self, sub: SubscriberId) -> Option<&CheckpointClass> {
        let p = &self.cfg.checkpoint;
        p.class(p.class_of(sub))
    }

    /// All mappings, in no particular order.
    pub fn mappings(&self) -> Vec<MappingRecord> {
        let keying = &self.cfg.subscriber_keying;
        self.table
            .entries
            .iter()
            .filter_map(|(id, _)| self.table.record(id, keying))
            .collect()
    }

    /// The epoch a subscriber's client sees at `now` (RFC 6887 section 8.5):
    /// seconds since its state began, wrapping at 2^32.
    pub fn epoch_of(&self, now: Timestamp, sub: Option<SubscriberId>) -> u32 {
        let anchor = sub
            .and_then(|s| self.subscribers.get(&s))
            .and_then(|s| s.anchor)
            .unwrap_or(self.anchor);
        now.secs_since(anchor) as u32
    }

    /// The server-wide epoch at `now`.
    pub fn epoch(&self, now: Timestamp) -> u32 {
        self.epoch_of(now, None)
    }

    /// Last log sequence number handed out.
    pub fn last_seq(&self) -> u64 {
        self.seq
    }

    /// Takes the changes made since the last call, in log order.
    pub fn drain_changes(&mut self) -> std::vec::Drain<'_, ChangeRecord> {
        self.log.drain(..)
    }

    /// Every subscriber holding volatile mappings (neither check-pointed
    /// nor [replicated](Server::replicated_mappings)), with the hosts that
    /// hold them and when the last of those mappings expires: what a
    /// backup needs to know to reset exactly the right epochs on takeover
    /// (failure-scenarios draft section 2.6; RFC 7767 section 3.2 keeps
    /// the mappings themselves off the link). A takeover after that time
    /// lost nothing of theirs, even if their expiry never reached it.
    pub fn volatile_hosts(&self) -> Vec<(SubscriberId, Vec<IpAddr>, Timestamp)> {
        self.volatile
            .iter()
            .map(|(s, v)| {
                (
                    *s,
                    sorted_hosts(&v.hosts),
                    v.expiries.latest().unwrap_or_default(),
                )
            })
            .collect()
    }

    /// The subscribers whose set of volatile hosts, or the time their
    /// volatile state ends, changed since the last call, each as
    /// [`Server::volatile_hosts`] gives it (no hosts: none any more).
    ///
    /// A renewal that makes volatile state live longer changes it: the
    /// backup must hear that before the renewal is answered, or a takeover
    /// after the old end would lose a mapping without resetting its epoch.
    pub fn drain_volatile(&mut self) -> Vec<(SubscriberId, Vec<IpAddr>, Timestamp)> {
        if self.volatile_dirty.is_empty() {
            return Vec::new();
        }
        let mut dirty = std::mem::take(&mut self.volatile_dirty);
        dirty.sort_unstable();
        dirty.dedup();
        dirty
            .into_iter()
            .map(|s| match self.volatile.get(&s) {
                Some(v) => (
                    s,
                    sorted_hosts(&v.hosts),
                    v.expiries.latest().unwrap_or_default(),
                ),
                None => (s, Vec::new(), Timestamp::default()),
            })
            .collect()
    }

    /// The unsolicited ANNOUNCEs due at `now` (RFC 6887 section 14.1.3),
    /// each made now: to each client owed one after a loss
    /// ([`Server::owe_announce`], which every loss the core sees calls: a
    /// clear, a restore that drops mappings, a takeover's losses), and to
    /// everyone after [`Server::announce_everyone`]. Each is repeated at
    /// intervals that double from 250 ms, as often as
    /// [`crate::AnnounceConfig::sends`] says, and all are paced by its
    /// rate (late, never dropped). [`Server::poll_timeout`] says when the
    /// next is due.
    pub fn poll_announcements(&mut self, now: Timestamp) -> Vec<Announcement> {
        self.now = self.now.max(now);
        let due = self.announcer.poll(now);
        let mut out = Vec::with_capacity(due.len());
        for audience in due {
            let mut bytes = Vec::with_capacity(24);
            out.push(match audience {
                Audience::Client(host) => Announcement::Unicast {
                    to: self.announce_to(now, host, &mut bytes),
                    bytes,
                },
                Audience::Everyone => {
                    self.write_announce(self.epoch(now), &mut bytes);
                    Announcement::Everyone { bytes }
                }
            });
        }
        out
    }

    /// Tells every client, by multicast and the configured unicast
    /// addresses, the server-wide epoch (RFC 6887 section 14.1.3: after a
    /// start, or a takeover, that may have lost state nobody can name).
    pub fn announce_everyone(&mut self, now: Timestamp) {
        self.announcer.schedule(now, Audience::Everyone);
    }

    /// Forgets every ANNOUNCE scheduled: a node that stops serving tells no
    /// one anything (its successor does).
    pub fn stop_announcing(&mut self) {
        self.announcer.clear();
    }

    /// ANNOUNCE series under way (for the control interface and tests).
    pub fn announcing(&self) -> usize {
        self.announcer.pending()
    }

    /// Writes the unsolicited ANNOUNCE for `host` (RFC 6887 section
    /// 14.1.3), carrying the epoch every other reply to it carries
    /// ([`Server::requester_epoch`]), and returns where it goes: a
    /// THIRD_PARTY client's request port, or the port clients listen on
    /// for announcements (5350).
    pub fn announce_to(&self, now: Timestamp, host: IpAddr, out: &mut Vec<u8>) -> SocketAddr {
        let host = canonical(host);
        self.write_announce(self.requester_epoch(now, host), out);
        let port = self.requesters.get(&host).map_or(CLIENT_PORT, |r| r.port);
        SocketAddr::new(host, port)
    }

    /// The epoch every reply to `requester` carries (RFC 6887 section 8.5):
    /// its subscriber's, unless it is a THIRD_PARTY client whose own
    /// epoch restarted later because a host it manages lost state
    /// ([`RequesterState`]). One value per requester, whatever the reply is
    /// about, so a client that keeps one epoch per server, as section 8.5
    /// has it, never sees one reply contradict another.
    pub fn requester_epoch(&self, now: Timestamp, requester: IpAddr) -> u32 {
        let requester = canonical(requester);
        let sub = self.cfg.subscriber_keying.subscriber_of(requester);
        self.epoch_of_requester(now, requester, sub)
    }

    /// [`Server::requester_epoch`] of a canonical `requester` whose
    /// subscriber `sub` the caller already knows.
    fn epoch_of_requester(&self, now: Timestamp, requester: IpAddr, sub: SubscriberId) -> u32 {
        let mut anchor = self
            .subscribers
            .get(&sub)
            .and_then(|s| s.anchor)
            .unwrap_or(self.anchor);
        if !self.requesters.is_empty() {
            if let Some(a) = self.requesters.get(&requester).and_then(|r| r.anchor) {
                anchor = anchor.max(a);
            }
        }
        now.secs_since(anchor) as u32
    }

    /// THIRD_PARTY requesters known (for a snapshot to the backup).
    pub fn requesters(&self) -> Vec<(IpAddr, RequesterState)> {
        let mut v: Vec<_> = self
            .requesters
            .iter()
            .map(|(ip, r)| (*ip, r.state()))
            .collect();
        v.sort_unstable_by_key(|(ip, _)| *ip);
        v
    }

    /// These THIRD_PARTY clients lost state they manage (failure-scenarios
    /// draft section 2.6.1): their epochs restart now and each is owed an
    /// ANNOUNCE at its request port.
    fn requesters_lost(&mut self, now: Timestamp, mut ips: Vec<IpAddr>) {
        ips.sort_unstable();
        ips.dedup();
        if ips.is_empty() {
            return;
        }
        let keying = &self.cfg.subscriber_keying;
        let owed: Vec<(SubscriberId, IpAddr)> = ips
            .iter()
            .map(|ip| (keying.subscriber_of(*ip), *ip))
            .collect();
        for ip in ips {
            self.requesters
                .entry(ip)
                .or_insert_with(|| Requester::new(CLIENT_PORT))
                .anchor = Some(now);
            self.push_requester(ip);
        }
        self.owe_announce(now, &owed);
    }

    fn push_requester(&mut self, ip: IpAddr) {
        let state = self.requesters.get(&ip).map(Requester::state);
        self.push(Change::Requester { ip, state });
    }

    /// Counts a mapping of requester `ip` (asking from `port`) going from
    /// `before` to `after` (`None`: absent; `Some((followed, expires))`:
    /// present, whether the backup follows it, and when it expires),
    /// logging the requester's state when
    /// what it stores changed. `touch`: a request from it just came, so
    /// its port is current.
    fn note_manager(
        &mut self,
        ip: IpAddr,
        port: u16,
        before: Option<(bool, Timestamp)>,
        after: Option<(bool, Timestamp)>,
        touch: bool,
    ) {
        let r = self
            .requesters
            .entry(ip)
            .or_insert_with(|| Requester::new(port));
        let old = r.state();
        let fresh = r.mappings == 0 && before.is_none();
        if touch {
            r.port = port;
        }
        match (before, after) {
            (None, Some(_)) => r.mappings += 1,
            (Some(_), None) => r.mappings = r.mappings.saturating_sub(1),
            _ => {}
        }
        if let Some((false, t)) = before {
            r.volatile.remove(t);
        }
        if let Some((false, t)) = after {
            r.volatile.add(t);
        }
        if r.mappings == 0 && r.anchor.is_none() {
            self.requesters.remove(&ip);
            self.push(Change::Requester { ip, state: None });
        } else if fresh || r.state() != old {
            self.push_requester(ip);
        }
    }

    /// Forgets, once a minute at most, requesters that hold no mapping and
    /// whose epoch is their subscriber's anyway (no anchor of their own,
    /// or one no later than the subscriber's): forgetting one then moves
    /// no epoch. One whose own epoch is later stays known, however long
    /// it is idle: falling back to the subscriber's older epoch would jump
    /// its epoch forward, which its client's section 8.5 check reads as
    /// lost state. Bounded by the THIRD_PARTY clients that ever lost state.
    fn sweep_requesters(&mut self, now: Timestamp) {
        if self.requesters.is_empty() || now < self.requesters_swept + Duration::from_secs(60) {
            return;
        }
        self.requesters_swept = now;
        let keying = &self.cfg.subscriber_keying;
        let idle: Vec<IpAddr> = self
            .requesters
            .iter()
            .filter(|(ip, r)| {
                let sub = self
                    .subscribers
                    .get(&keying.subscriber_of(**ip))
                    .and_then(|s| s.anchor)
                    .unwrap_or(self.anchor);
                r.mappings == 0 && r.anchor.is_none_or(|a| a <= sub)
            })
            .map(|(ip, _)| *ip)
            .collect();
        for ip in idle {
            self.requesters.remove(&ip);
            self.push(Change::Requester { ip, state: None });
        }
    }

    /// Records that these hosts lost state and are sent an ANNOUNCE now
    /// (RFC 6887 section 14.1.3; failure-scenarios draft section 2.6): they
    /// stay owed one until the longest lifetime this server grants has
    /// passed, the longest a client may go on believing in a mapping it
    /// lost without asking again, and each subscriber's set is logged
    /// ([`Change::AnnounceOwed`]) so it reaches the backup and a node that
    /// takes over within that time announces to them again. Expired sets
    /// are forgotten here, which bounds the table by the hosts announced to
    /// within one maximum lifetime.
    pub fn owe_announce(&mut self, now: Timestamp, targets: &[(SubscriberId, IpAddr)]) {
        self.owed.retain(|_, (_, until)| *until > now);
        if targets.is_empty() {
            return;
        }
        for (_, host) in targets {
            self.announcer
                .schedule(now, Audience::Client(canonical(*host)));
        }
        let until = now + self.cfg.max_lifetime_duration();
        let mut by: std::collections::BTreeMap<SubscriberId, Vec<IpAddr>> =
            std::collections::BTreeMap::new();
        for (sub, host) in targets {
            by.entry(*sub).or_default().push(*host);
        }
        for (sub, mut hosts) in by {
            if let Some((before, _)) = self.owed.get(&sub) {
                hosts.extend(before.iter().copied());
            }
            hosts.sort_unstable();
            hosts.dedup();
            self.owed.insert(sub, (hosts.clone(), until));
            self.push(Change::AnnounceOwed {
                subscriber: sub,
                hosts,
                until,
            });
        }
    }

    /// The hosts owed an ANNOUNCE at `now` ([`Server::owe_announce`]), per
    /// subscriber, with until when: for a snapshot to the backup.
    pub fn owed_announces(&self, now: Timestamp) -> Vec<(SubscriberId, Vec<IpAddr>, Timestamp)> {
        let mut v: Vec<_> = self
            .owed
            .iter()
            .filter(|(_, (_, until))| *until > now)
            .map(|(s, (h, u))| (*s, h.clone(), *u))
            .collect();
        v.sort_unstable_by_key(|(s, _, _)| *s);
        v
    }

    /// The check-pointed mappings, in no particular order.
    pub fn checkpointed_mappings(&self) -> Vec<MappingRecord> {
        let keying = &self.cfg.subscriber_keying;
        self.table
            .entries
            .iter()
            .filter(|(_, e)| e.checkpoint)
            .filter_map(|(id, _)| self.table.record(id, keying))
            .collect()
    }

    /// The mappings a backup follows, in no particular order: those that
    /// are check-pointed, and those check-pointed earlier in their life
    /// here (a renewal the backup could not confirm in time unflagged them,
    /// RFC 7767 section 3.2). The backup keeps following the latter until
    /// they are removed: their clients may not have heard yet that the
    /// check-point ended, and their records on the backup stay exact, so
    /// they are not counted as volatile state (failure-scenarios draft
    /// section 2.6). The state a backup receives on (re)connection (RFC
    /// 7767 section 1).
    pub fn replicated_mappings(&self) -> Vec<MappingRecord> {
        let keying = &self.cfg.subscriber_keying;
        self.table
            .entries
            .iter()
            .filter(|(_, e)| e.replicated)
            .filter_map(|(id, _)| self.table.record(id, keying))
            .collect()
    }

    /// The [replicated mappings](Server::replicated_mappings) among `slots`
    /// table slots from `from`, in slot order, and the slot the next page
    /// starts at (`None`: done).
    ///
    /// For copying a large table a page at a time, each page under its own
    /// short hold of whatever guards the server: a mapping made, changed
    /// or removed between pages carries a later sequence number, so a copy
    /// that is then brought forward by every change after the first page's
    /// position ends exactly at the table's state (upserts and removals by
    /// key are idempotent). Slots never move while their mapping lives.
    pub fn replicated_page(&self, from: u32, slots: usize) -> (Vec<MappingRecord>, Option<u32>) {
        let keying = &self.cfg.subscriber_keying;
        let from = from as usize;
        let page = self
            .table
            .entries
            .iter_range(from, slots)
            .filter(|(_, e)| e.replicated)
            .filter_map(|(id, _)| self.table.record(id, keying))
            .collect();
        let next = from.saturating_add(slots);
        let more = (next < self.table.entries.slots()).then(|| u32::try_from(next).ok());
        (page, more.flatten())
    }

    /// Clears the check-point flag of a mapping whose check-point could not
    /// be confirmed by the backup in time (RFC 7767 section 3.2: if the
    /// state cannot be check-pointed, the request is not honoured and the
    /// mapping is not flagged). Only a mapping that still has `nonce` and
    /// the flag is changed; the change is logged like any other. Returns
    /// whether it was.
    pub fn unflag(&mut self, key: &MappingKey, kind: MappingKind, nonce: Nonce) -> bool {
        let id = match kind {
            MappingKind::Map => self.table.map_entry(key),
            MappingKind::Peer { remote } => self.table.peer_entry(key, remote),
        };
        let Some(id) = id else {
            return false;
        };
        if !self
            .table
            .get(id)
            .is_some_and(|e| e.checkpoint && e.nonce == nonce)
        {
            return false;
        }
        self.table.update(id, |e| e.checkpoint = false);
        let sub = self.cfg.subscriber_keying.subscriber_of(key.internal_ip);
        self.checkpointed = self.checkpointed.saturating_sub(1);
        if let Some(s) = self.subscribers.get_mut(&sub) {
            s.checkpointed = s.checkpointed.saturating_sub(1);
        }
        // Still replicated: the backup holds its record and hears its
        // unflagging, so it is not counted as volatile.
        if let Some(r) = self.record(id) {
            self.push(Change::Upserted(r));
        }
        true
    }

    /// The dataplane refused the change that made the mapping `key` (of
    /// `kind`, owned by `nonce`) what it is; its request is answered
    /// NETWORK_FAILURE (RFC 6887 section 7.4: "a network failure"; the
    /// client may retry soon). `how` says what the refusal left:
    ///
    /// - [`Refused::Kept`]: the forwarding plane still holds the mapping as
    ///   it was before (a refused renewal). The mapping stays, and the
    ///   client's earlier grant stands; nothing was lost, so no epoch
    ///   moves (failure-scenarios draft section 2.6.1: the epoch MUST NOT
    ///   reset otherwise). The core keeps what the renewal asked for (a
    ///   later expiry, new filters), never less than the client holds;
    ///   the next renewal the dataplane takes brings the two together.
    /// - [`Refused::Lost`]: the forwarding plane held it and holds it no
    ///   more (or may not): the mapping is taken back, and since its client
    ///   held it, that is a loss: the subscriber's epoch restarts (and its
    ///   THIRD_PARTY manager's), and the host is owed an ANNOUNCE.
    /// - [`Refused::NotInstalled`]: a creation that failed; the mapping is
    ///   taken back, and the client, which never held it, lost nothing.
    ///
    /// Only the mapping `nonce` still owns is touched. Returns whether it
    /// was found (its reply then reports the failure).
    pub fn refused(
        &mut self,
        now: Timestamp,
        key: &MappingKey,
        kind: MappingKind,
        nonce: Nonce,
        how: crate::Refused,
    ) -> bool {
        let id = match kind {
            MappingKind::Map => self.table.map_entry(key),
            MappingKind::Peer { remote } => self.table.peer_entry(key, remote),
        };
        let Some(id) = id.filter(|&id| self.table.get(id).is_some_and(|e| e.nonce == nonce)) else {
            return false;
        };
        #[cfg(feature = "planted-refused-kept-removes")]
        let how = match how {
            crate::Refused::Kept if self.planted.refused_kept_removes => {
                crate::Refused::NotInstalled
            }
            how => how,
        };
        #[cfg(feature = "planted-refused-lost-keeps-epoch")]
        let how = match how {
            crate::Refused::Lost if self.planted.refused_lost_keeps_epoch => {
                crate::Refused::NotInstalled
            }
            how => how,
        };
        match how {
            crate::Refused::Kept => {}
            crate::Refused::NotInstalled => self.remove_entry(id, RemoveReason::Failed),
            crate::Refused::Lost => {
                let manager = self.table.get(id).and_then(Entry::manager);
                let sub = self.cfg.subscriber_keying.subscriber_of(key.internal_ip);
                self.requesters_lost(now, manager.into_iter().collect());
                // It was installed and carried traffic: its port is held
                // for its client, who is told to re-create it (section 15).
                self.remove_entry_holding(id, RemoveReason::Failed, true);
                self.reset_subscriber_epoch(now, sub);
                self.owe_announce(now, &[(sub, key.internal_ip)]);
            }
        }
        true
    }

    /// When [`Server::handle_timeout`] next has work (the earliest expiry)
    /// or [`Server::poll_announcements`] has an ANNOUNCE due, whichever
    /// comes first.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        match (self.table.next_expiry(), self.announcer.poll_timeout()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Removes every mapping whose lifetime ended by `now` (RFC 6887 section 15).
    pub fn handle_timeout(&mut self, now: Timestamp) {
        self.now = self.now.max(now);
        self.table.prune_holds(now);
        while let Some(id) = self.table.first_expired(now) {
            if self.is_static(id) {
                self.renew_static(now, id);
            } else {
                self.remove_entry(id, RemoveReason::Expired);
            }
        }
        self.sweep_requesters(now);
    }

    /// Writes an unsolicited ANNOUNCE response with the server-wide epoch
    /// (RFC 6887 section 14.1.1), for sending after the server starts or
    /// loses state.
    pub fn unsolicited_announce(&self, now: Timestamp, out: &mut Vec<u8>) {
        self.announce_for(now, None, out);
    }

    /// Writes an unsolicited ANNOUNCE carrying `sub`'s epoch (the server's
    /// with `None`), for telling one subscriber's clients that their state
    /// was lost (RFC 6887 section 14.1.1; failure-scenarios draft 2.6.2).
    pub fn announce_for(&self, now: Timestamp, sub: Option<SubscriberId>, out: &mut Vec<u8>) {
        self.write_announce(self.epoch_of(now, sub), out);
    }

    fn write_announce(&self, epoch: u32, out: &mut Vec<u8>) {
        out.clear();
        let resp = Response {
            header: ResponseHeader {
                result: ResultCode::SUCCESS,
                lifetime: 0,
                epoch,
            },
            data: OpData::Announce,
            options: Vec::new(),
        };
        // A bare ANNOUNCE is 24 octets; encoding cannot exceed the limit.
        let _ = resp.encode(&self.cfg.code_points, out);
    }

    /// `reply`, a response this server made `waited_ms` before `now` for
    /// the client at `to` and held since (until the backup confirmed what it
    /// reports), as it reads if made at `now`: the epoch is made again from
    /// the subscriber's epoch (RFC 6887 section 8.5: the epoch time is the
    /// server's when the response is sent), and the lifetime is shortened by
    /// the wait rounded up to whole seconds, so the client's mapping never
    /// outlives the server's. Making the epoch again rather than adding the
    /// wait to it is exact: the epoch in the reply was truncated when it was
    /// made, and the server alone knows where its seconds begin (adding a
    /// truncated or rounded wait erred by up to a second either way, enough
    /// for a client's section 8.5 check to fail with nothing lost).
    ///
    /// The epoch is `to`'s ([`Server::requester_epoch`]), as when the reply
    /// was made. `None` if the mapping a success grants is gone by now
    /// (cleared while the reply waited: the client must not believe in
    /// it), or if the reply cannot be parsed and encoded again: the
    /// caller drops it (the client retransmits) rather than send a stale one.
    pub fn restamp(
        &self,
        now: Timestamp,
        to: IpAddr,
        reply: &[u8],
        waited_ms: u64,
    ) -> Option<Vec<u8>> {
        if reply.first() == Some(&portkeep_proto::NATPMP_VERSION) {
            return self.restamp_natpmp(now, to, reply, waited_ms);
        }
        let cp = &self.cfg.code_points;
        let mut r = Response::parse(reply, cp).ok()?;
        if r.header.result == ResultCode::SUCCESS
            && r.header.lifetime > 0
            && !self.still_holds(to, &r)
        {
            // The mapping it grants went while it waited (an operator
            // cleared it): sent, it would leave the client believing in a
            // mapping the server no longer has. Dropped, the client asks
            // again and makes it anew.
            return None;
        }
        r.header.epoch = self.requester_epoch(now, to);
        if r.header.lifetime > 0 {
            r.header.lifetime = lifetime_after_wait(r.header.lifetime, waited_ms);
        }
        let mut out = Vec::with_capacity(reply.len());
        r.encode(cp, &mut out).ok()?;
        Some(out)
    }

    /// Whether the MAP or PEER mapping a success reply to `to` grants is
    /// still held, with that nonce (other replies: always).
    fn still_holds(&self, to: IpAddr, r: &Response) -> bool {
        let host = r
            .options
            .iter()
            .find_map(|o| match o {
                PcpOption::ThirdParty(a) => Some(canonical(from_wire(*a))),
                _ => None,
            })
            .unwrap_or_else(|| canonical(to));
        let (m, remote) = match &r.data {
            OpData::Map(m) => (m, None),
            OpData::Peer(p) => (
                &p.map,
                Some(SocketAddr::new(from_wire(p.remote_ip), p.remote_port)),
            ),
            _ => return true,
        };
        let internal_port = if m.protocol == Protocol::ALL {
            0
        } else {
            m.internal_port
        };
        let key = MappingKey {
            internal_ip: host,
            protocol: m.protocol,
            internal_port,
        };
        let id = match remote {
            None => self.table.map_entry(&key),
            Some(remote) => self.table.peer_entry(&key, remote),
        };
        id.and_then(|id| self.table.get(id))
            .is_some_and(|e| e.nonce == m.nonce)
    }

    /// Handles one datagram from `source`, writing any reply into `out`.
    pub fn handle(
        &mut self,
        now: Timestamp,
        source: SocketAddr,
        datagram: &[u8],
        out: &mut Vec<u8>,
    ) -> Outcome {
        self.handle_on(now, source, None, datagram, out)
    }

    /// [`Server::handle`] for a datagram that arrived on the interface
    /// numbered `arrived_on` (`None`: not known). With
    /// [`ServerConfig::interfaces`] set, one that did not arrive on one of
    /// them, or whose interface is not known, gets no answer at all (RFC
    /// 6887 section 8.2: a PCP server never answers the external side,
    /// and a source address alone can be forged from there).
    pub fn handle_on(
        &mut self,
        now: Timestamp,
        source: SocketAddr,
        arrived_on: Option<u32>,
        datagram: &[u8],
        out: &mut Vec<u8>,
    ) -> Outcome {
        out.clear();
        self.stats.received += 1;
        if let [2, op, ..] = datagram {
            if op & 0x80 == 0 {
                self.stats.by_opcode[usize::from(*op)] += 1;
            }
        }
        self.now = self.now.max(now);
        self.table.prune_holds(now);
        if !self.cfg.interfaces.is_empty()
            && !arrived_on.is_some_and(|i| self.cfg.interfaces.contains(&i))
        {
            self.stats.wrong_interface += 1;
            self.stats.dropped += 1;
            return Outcome::Drop;
        }
        let src = canonical(source.ip());
        if !self.cfg.clients.is_empty() && !self.cfg.clients.iter().any(|p| p.contains(src)) {
            // Not one of ours: no answer, not even an error, which would
            // tell a scanner a PCP server is here.
            self.stats.not_clients += 1;
            self.stats.dropped += 1;
            return Outcome::Drop;
        }
        if !self.admit_request(now, src) {
            self.stats.rate_limited += 1;
            self.stats.dropped += 1;
            return Outcome::Drop;
        }
        let outcome = match self.process(now, src, source.port(), datagram, out) {
            Ok(()) => Outcome::Reply,
            Err(None) => Outcome::Drop,
            Err(Some(_))
                if self
                    .cfg
                    .error_rate
                    .is_some_and(|l| !self.error_bucket.take(now, &l)) =>
            {
                // Fail closed on reflection: silence, which the client
                // treats as loss and retransmits into (section 8.1.1).
                out.clear();
                self.stats.errors_suppressed += 1;
                Outcome::Drop
            }
            Err(Some(fail)) => {
                let lifetime = if fail.code.is_long_lifetime_error() {
                    self.cfg.long_error_lifetime
                } else {
                    self.cfg.short_error_lifetime
                };
                out.clear();
                build_error_response(
                    datagram,
                    fail.code,
                    lifetime,
                    self.requester_epoch(now, src),
                    out,
                );
                if fail.parsed {
                    out[12..HEADER_LEN].fill(0);
                }
                Outcome::Reply
            }
        };
        match outcome {
            Outcome::Reply => {
                let code = out.get(3).copied().unwrap_or(0);
                self.stats.results[usize::from(code)] += 1;
            }
            Outcome::Drop => self.stats.dropped += 1,
        }
        outcome
    }

    /// Whether a datagram from `src` is within its subscriber's request
    /// rate ([`ServerConfig::request_rate`], checked before anything else
    /// so a flood costs one lookup per datagram).
    fn admit_request(&mut self, now: Timestamp, src: IpAddr) -> bool {
        let Some(limit) = self.cfg.request_rate else {
            return true;
        };
        let sub = self.cfg.subscriber_keying.subscriber_of(src);
        if !self
            .request_buckets
            .entry(sub)
            .or_default()
            .take(now, &limit)
        {
            return false;
        }
        if self.request_buckets.len() >= self.request_sweep_at {
            // Only full buckets go: forgetting one hands nobody a token.
            self.request_buckets.retain(|_, b| !b.is_full(now));
            self.request_sweep_at = (self.request_buckets.len() * 2).max(IDLE_SWEEP_MIN);
        }
        true
    }

    /// RFC 6887 section 8.2, in its order. `Err(None)` drops silently.
    fn process(
        &mut self,
        now: Timestamp,
        src: IpAddr,
        port: u16,
        datagram: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), Option<Fail>> {
        let cp = self.cfg.code_points;
        // Section 8.2: a supported version but fewer than 24 octets is
        // dropped, not answered; the version check comes first so that a
        // short NAT-PMP request still learns the version we speak.
        if datagram.len() >= 2
            && datagram[1] & 0x80 == 0
            && datagram[0] == VERSION
            && datagram.len() < HEADER_LEN
        {
            return Err(None);
        }
        if self.cfg.natpmp && datagram.first() == Some(&portkeep_proto::NATPMP_VERSION) {
            if let IpAddr::V4(v4) = src {
                return self.natpmp(now, v4, port, datagram, out);
            }
        }
        if !self.cfg.pcp {
            return self.natpmp_only(now, src, datagram, out);
        }
        let req = match Request::parse(datagram, &cp) {
            Ok(r) => r,
            Err(e) => {
                return Err(match e.disposition() {
                    Disposition::Drop => None,
                    // Section 9 and appendix A: a NAT-PMP (version 0) request
                    // gets a PCP UNSUPP_VERSION response, whose first four
                    // octets a NAT-PMP client reads as result 1, "unsupported
                    // version"; a PCP client learns we speak version 2.
                    Disposition::Respond(code) => Some(Fail::unparsed(code)),
                });
            }
        };
        // Section 8.2: the client address field must be the packet's
        // source, which detects a NAT between client and server. THIRD_PARTY
        // names the internal host but does not lift this rule.
        if canonical(from_wire(req.header.client_ip)) != src {
            return Err(Some(Fail::parsed(ResultCode::ADDRESS_MISMATCH)));
        }
        match &req.data {
            OpData::Announce => self.announce(now, src, &req, out),
            OpData::Map(m) => {
                let m = *m;
                self.map(now, (src, port), &req, &m, false, out)
            }
            OpData::Peer(p) => {
                let p = *p;
                self.peer(now, (src, port), &req, &p, out)
            }
            OpData::Get(g) => {
                let g = *g;
                self.get(now, src, &req, &g, datagram, out)
            }
            OpData::Opaque { .. } => Err(Some(Fail::unparsed(ResultCode::UNSUPP_OPCODE))),
        }
    }

    /// RFC 6887 section 7.3: unknown mandatory options are UNSUPP_OPTION,
    /// unknown optional ones ignored; repeats beyond an option's maximum and
    /// invalid contents are MALFORMED_OPTION. An option known but not valid
    /// for the opcode is MALFORMED_OPTION when mandatory and ignored when
    /// optional (so CHECKPOINT_REQUIRED on ANNOUNCE is ignored, as RFC 7767
    /// section 3.1 lists it for MAP and PEER only), except PREFER_FAILURE
    /// in PEER, which section 12.1 makes MALFORMED_REQUEST. GET takes
    /// THIRD_PARTY (to name the host whose mappings an authorised client
    /// retrieves, failure-scenarios draft section 6) and at most one NEXT
    /// (draft section 4.4: "at most one in requests").
    fn check_options(&self, req: &Request, src: IpAddr) -> Result<ReqOptions, Fail> {
        let is_map = matches!(req.data, OpData::Map(_));
        let is_get = matches!(req.data, OpData::Get(_));
        let is_mapish = is_map || matches!(req.data, OpData::Peer(_));
        let mut o = ReqOptions::default();
        let malformed = || Fail::parsed(ResultCode::MALFORMED_OPTION);
        let mut seen_third_party = false;
        for opt in &req.options {
            let code = opt.code(&self.cfg.code_points);
            let valid = match opt {
                PcpOption::ThirdParty(_) => is_mapish || is_get,
                PcpOption::Description(_) => is_mapish,
                PcpOption::CheckpointRequired => is_mapish,
                PcpOption::PreferFailure | PcpOption::Filter(_) => is_map,
                PcpOption::Next(_) => is_get,
                // RFC 7767 section 3.1: CHECKPOINT_REQUIRED has length 0;
                // with data (kept as unknown by the codec) it is malformed
                // where it is valid, and ignored elsewhere.
                PcpOption::Unknown { code: c, .. }
                    if *c == portkeep_proto::OptionCode::CHECKPOINT_REQUIRED && is_mapish =>
                {
                    return Err(malformed());
                }
                PcpOption::Unknown { .. } => {
                    if code.is_mandatory() {
                        return Err(Fail::parsed(ResultCode::UNSUPP_OPTION));
                    }
                    continue;
                }
            };
            if !valid {
                if matches!(opt, PcpOption::PreferFailure) && !is_map && is_mapish {
                    return Err(Fail::parsed(ResultCode::MALFORMED_REQUEST));
                }
                if code.is_mandatory() {
                    return Err(malformed());
                }
                continue;
            }
            match opt {
                PcpOption::ThirdParty(ip) => {
                    if seen_third_party {
                        return Err(malformed());
                    }
                    seen_third_party = true;
                    let ip = canonical(from_wire(*ip));
                    // Section 13.1: naming yourself is malformed.
                    if ip == src {
                        return Err(Fail::parsed(ResultCode::MALFORMED_REQUEST));
                    }
                    if is_unspecified(to_wire(ip)) {
                        return Err(malformed());
                    }
                    o.third_party = Some(ip);
                }
                PcpOption::PreferFailure => {
                    if o.prefer_failure {
                        return Err(malformed());
                    }
                    o.prefer_failure = true;
                }
                PcpOption::Filter(f) => {
                    // Section 13.3: prefix length counts over 128 bits, so
                    // an IPv4 filter is 96..=128; 0 means "remove filters".
                    let v4 = f.remote_ip.to_ipv4_mapped().is_some();
                    let ok =
                        f.prefix_len == 0 || f.prefix_len <= 128 && (!v4 || f.prefix_len >= 96);
                    if !ok {
                        return Err(malformed());
                    }
                    o.filters.push(*f);
                }
                PcpOption::Description(d) => {
                    if o.description.is_some() {
                        return Err(malformed());
                    }
                    o.description = Some(d.clone());
                }
                PcpOption::CheckpointRequired => {
                    // RFC 7767 section 3.1: at most once.
                    if o.checkpoint {
                        return Err(malformed());
                    }
                    o.checkpoint = true;
                }
                PcpOption::Next(n) => {
                    if o.next.is_some() {
                        return Err(malformed());
                    }
                    o.next = Some(n.clone());
                }
                PcpOption::Unknown { .. } => {}
            }
        }
        if o.third_party.is_some() {
            // Section 13.1: only authorised clients may act for others.
            if !self.cfg.third_party_clients.iter().any(|p| p.contains(src)) {
                return Err(Fail::parsed(ResultCode::NOT_AUTHORIZED));
            }
        }
        if o.filters.len() > self.cfg.max_filters_per_mapping {
            return Err(Fail::parsed(ResultCode::EXCESSIVE_REMOTE_PEERS));
        }
        Ok(o)
    }

    /// GET (failure-scenarios draft section 4), after the checks of RFC
    /// 6887 section 8.2 and the option checks of section 7.3: an unsound
    /// filter is MALFORMED_REQUEST (draft 4.1), a locator that is not a
    /// mapping's fields MALFORMED_OPTION (RFC 6887 7.3). The answer copies
    /// the request's GET body bit for bit (draft 4.1), echoes THIRD_PARTY
    /// (RFC 6887 section 13) and carries the NEXT options of
    /// [`getnext::answer`], or is NONEXIST_MAP without NEXT (draft 4.6).
    /// The header lifetime is 0: each NEXT carries its mapping's remaining
    /// lifetime, and a NONEXIST_MAP may stop being true at any moment.
    fn get(
        &mut self,
        now: Timestamp,
        src: IpAddr,
        req: &Request,
        g: &GetData,
        datagram: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), Option<Fail>> {
        let o = self.check_options(req, src).map_err(Some)?;
        let filter = GetFilter::parse(g).map_err(|e| {
            tracing::debug!(reason = e.0, "unsound GET filter");
            Some(Fail::parsed(ResultCode::MALFORMED_REQUEST))
        })?;
        let next = match &o.next {
            Some(n) => {
                let locator = getnext::parse_locator(n, &self.table).map_err(|reason| {
                    tracing::debug!(reason, "malformed NEXT locator");
                    Some(Fail::parsed(ResultCode::MALFORMED_OPTION))
                })?;
                Some((n, locator))
            }
            None => None,
        };
        // Draft section 6: without THIRD_PARTY a client sees the mappings
        // of its own address; check_options has checked the allow-list.
        let host = o.third_party.unwrap_or(src);
        let echo: Vec<PcpOption> = req
            .options
            .iter()
            .filter(|opt| matches!(opt, PcpOption::ThirdParty(_)))
            .cloned()
            .collect();
        let fixed = HEADER_LEN + GET_BODY_LEN + echo.iter().map(PcpOption::wire_len).sum::<usize>();
        let query = Query {
            host,
            filter,
            next,
            room: MAX_MESSAGE_LEN.saturating_sub(fixed),
        };
        let cp = self.cfg.code_points;
        let (result, nexts) = match getnext::answer(&self.table, now, &query) {
            Answer::Found(n) => (ResultCode::SUCCESS, n),
            Answer::Nonexistent => (cp.nonexist_map, Vec::new()),
        };
        let mut options = echo;
        options.extend(nexts);
        let resp = Response {
            header: ResponseHeader {
                result,
                lifetime: 0,
                epoch: self.requester_epoch(now, src),
            },
            data: OpData::Get(*g),
            options,
        };
        self.encode(&resp, out)?;
        // Draft 4.1: "a bit-to-bit copy of the OpCode", reserved octet too.
        let body = HEADER_LEN..HEADER_LEN + GET_BODY_LEN;
        if let (Some(dst), Some(src)) = (out.get_mut(body.clone()), datagram.get(body)) {
            dst.copy_from_slice(src);
        }
        Ok(())
    }

    /// Section 14.1: ANNOUNCE carries no body; its lifetime is ignored.
    fn announce(
        &mut self,
        now: Timestamp,
        src: IpAddr,
        req: &Request,
        out: &mut Vec<u8>,
    ) -> Result<(), Option<Fail>> {
        self.check_options(req, src).map_err(Some)?;
        self.write_announce(self.requester_epoch(now, src), out);
        Ok(())
    }

    /// The requester of a MAP or PEER from `src` about a mapping of
    /// subscriber `sub`, with its subscriber: without THIRD_PARTY the
    /// mapping's own, so the hot path keys no subscriber twice.
    fn requester_of(
        &self,
        src: IpAddr,
        sub: SubscriberId,
        third_party: Option<IpAddr>,
    ) -> (IpAddr, SubscriberId) {
        match third_party {
            None => (src, sub),
            Some(_) => (src, self.cfg.subscriber_keying.subscriber_of(src)),
        }
    }

    /// Writes a SUCCESS response to `requester` (with its subscriber),
    /// carrying its epoch ([`Server::requester_epoch`]).
    fn success(
        &self,
        now: Timestamp,
        (requester, sub): (IpAddr, SubscriberId),
        lifetime: u32,
        data: OpData,
        options: Vec<PcpOption>,
        out: &mut Vec<u8>,
    ) -> Result<(), Option<Fail>> {
        let resp = Response {
            header: ResponseHeader {
                result: ResultCode::SUCCESS,
                lifetime,
                epoch: self.epoch_of_requester(now, requester, sub),
            },
            data,
            options,
        };
        self.encode(&resp, out)
    }

    fn encode(&self, resp: &Response, out: &mut Vec<u8>) -> Result<(), Option<Fail>> {
        out.clear();
        resp.encode(&self.cfg.code_points, out)
            .map_err(|_| Some(Fail::parsed(ResultCode::NO_RESOURCES)))
    }

    fn clamp_lifetime(&self, requested: u32) -> u32 {
        requested.clamp(
            self.cfg.min_lifetime,
            self.cfg.max_lifetime.max(self.cfg.min_lifetime),
        )
    }

    fn suggestion(m: &MapData, prefer_failure: bool) -> Suggestion {
        let ip = if is_unspecified(m.external_ip) {
            None
        } else {
            Some(from_wire(m.external_ip))
        };
        Suggestion {
            ip,
            port: m.external_port,
            prefer_failure,
        }
    }

    /// The options echoed in a success response: those the server acted on
    /// (RFC 6887 section 13: THIRD_PARTY, PREFER_FAILURE and FILTER appear
    /// in a response only if they were in the request), and
    /// CHECKPOINT_REQUIRED only when honoured (RFC 7767 section 3.2).
    fn echo_options(req: &Request, checkpoint_honoured: bool) -> Vec<PcpOption> {
        req.options
            .iter()
            .filter(|o| match o {
                PcpOption::ThirdParty(_)
                | PcpOption::PreferFailure
                | PcpOption::Filter(_)
                | PcpOption::Description(_) => true,
                PcpOption::CheckpointRequired => checkpoint_honoured,
                PcpOption::Next(_) | PcpOption::Unknown { .. } => false,
            })
            .cloned()
            .collect()
    }

    /// Section 11.3 (MAP), with deletion per section 15.
    ///
    /// `natpmp`: the request came as NAT-PMP (`natpmp::handle`), which
    /// grants no more than asked but may grant less than PCP's minimum
    /// (RFC 6886 section 3.3: "SHOULD NOT" grant more).
    fn map(
        &mut self,
        now: Timestamp,
        (src, port): (IpAddr, u16),
        req: &Request,
        m: &MapData,
        natpmp: bool,
        out: &mut Vec<u8>,
    ) -> Result<(), Option<Fail>> {
        let o = self.check_options(req, src).map_err(Some)?;
        let internal_ip = o.third_party.unwrap_or(src);
        // Section 11.1: with protocol 0 the internal port "MUST be ignored
        // on reception".
        let internal_port = if m.protocol == Protocol::ALL {
            0
        } else {
            m.internal_port
        };
        let key = MappingKey {
            internal_ip,
            protocol: m.protocol,
            internal_port,
        };
        let sub = self.cfg.subscriber_keying.subscriber_of(internal_ip);
        if req.header.lifetime == 0 {
            let external = self.delete_map(key, m.nonce).map_err(Some)?;
            let data = OpData::Map(assigned(*m, external));
            let by = self.requester_of(src, sub, o.third_party);
            return self.success(now, by, 0, data, Self::echo_options(req, false), out);
        }
        let lifetime = if natpmp {
            req.header.lifetime.min(self.cfg.max_lifetime)
        } else {
            self.clamp_lifetime(req.header.lifetime)
        };
        let expires = now + Duration::from_secs(u64::from(lifetime));
        let suggestion = Self::suggestion(m, o.prefer_failure);
        let checkpoint;
        let started = self.table.map_entry(&key).is_none();
        let id = match self.table.map_entry(&key) {
            Some(id) => {
                // Section 11.3: a refresh must come with the creator's nonce.
                // A PCP request from the host takes over a mapping NAT-PMP
                // made (which has no nonce to prove anything with); the
                // other way round NAT-PMP gets NOT_AUTHORIZED, its result 2
                // (docs/design.md, "NAT-PMP").
                let owner = self.table.get(id).map(|e| e.nonce);
                let taken_over = owner == Some(natpmp::NATPMP_NONCE) && !natpmp;
                if self.is_static(id) || owner != Some(m.nonce) && !taken_over {
                    return Err(Some(Fail::parsed(ResultCode::NOT_AUTHORIZED)));
                }
                let filters = apply_filters(
                    self.table
                        .get(id)
                        .and_then(|e| e.extra.as_ref())
                        .map(|x| x.filters.clone())
                        .unwrap_or_default(),
                    &o.filters,
                );
                if filters.len() > self.cfg.max_filters_per_mapping {
                    return Err(Some(Fail::parsed(ResultCode::EXCESSIVE_REMOTE_PEERS)));
                }
                let was = self.table.get(id).is_some_and(|e| e.replicated);
                let old = self.table.get(id).map_or(expires, |e| e.expires);
                checkpoint = self.renew_checkpoint(now, sub, id, o.checkpoint);
                let after = (was || checkpoint, expires);
                self.note_volatile(sub, internal_ip, Some((was, old)), Some(after));
                let manager = self.renew_manager(id, (src, port), o.third_party, (was, old), after);
                let description = o.description.clone();
                let nonce = m.nonce;
                self.table.update(id, |e| {
                    e.nonce = nonce;
                    e.expires = expires;
                    e.lifetime = lifetime;
                    e.checkpoint = checkpoint;
                    e.replicated |= checkpoint;
                    let desc = description
                        .map(String::into_boxed_str)
                        .or_else(|| e.extra.as_ref().and_then(|x| x.description.clone()));
                    e.extra = make_extra(filters, desc, None, manager);
                });
                id
            }
            None => {
                self.admit(sub)?;
                let binding = self.bind(key, suggestion, m.nonce)?;
                // An existing binding (made by PEER) keeps its external
                // endpoint; PREFER_FAILURE then fails if that is not what
                // was suggested (section 13.2).
                if o.prefer_failure && !self.table.binding_matches(binding, &suggestion) {
                    self.table.unbind_if_unused(binding);
                    return Err(Some(Fail::parsed(ResultCode::CANNOT_PROVIDE_EXTERNAL)));
                }
                checkpoint = self.new_checkpoint(now, sub, o.checkpoint);
                let filters = apply_filters(Vec::new(), &o.filters);
                let id = self.table.insert(Entry {
                    binding,
                    nonce: m.nonce,
                    expires,
                    lifetime,
                    checkpoint,
                    replicated: checkpoint,
                    third_party: o.third_party.is_some(),
                    extra: make_extra(
                        filters,
                        o.description.clone().map(String::into_boxed_str),
                        None,
                        o.third_party.map(|_| src),
                    ),
                });
                self.subscriber_mut(sub).mappings += 1;
                self.count_in_class(sub, true);
                self.stats.created += 1;
                self.note_volatile(sub, internal_ip, None, Some((checkpoint, expires)));
                if o.third_party.is_some() {
                    self.note_manager(src, port, None, Some((checkpoint, expires)), true);
                }
                id
            }
        };
        let record = self.record(id);
        let external = record.as_ref().map(|r| r.external);
        if let Some(r) = record {
            self.push_upsert(r, started);
        }
        let data = OpData::Map(assigned(*m, external));
        let options = Self::echo_options(req, checkpoint && o.checkpoint);
        let by = self.requester_of(src, sub, o.third_party);
        self.success(now, by, lifetime, data, options, out)
    }

    /// Section 12.3 (PEER).
    fn peer(
        &mut self,
        now: Timestamp,
        (src, port): (IpAddr, u16),
        req: &Request,
        p: &PeerData,
        out: &mut Vec<u8>,
    ) -> Result<(), Option<Fail>> {
        // Section 12.1: protocol, internal port and remote port must not be
        // zero, and the remote address must be a real address.
        if p.map.protocol == Protocol::ALL
            || p.map.internal_port == 0
            || p.remote_port == 0
            || is_unspecified(p.remote_ip)
        {
            return Err(Some(Fail::parsed(ResultCode::MALFORMED_REQUEST)));
        }
        let o = self.check_options(req, src).map_err(Some)?;
        let internal_ip = o.third_party.unwrap_or(src);
        let key = MappingKey {
            internal_ip,
            protocol: p.map.protocol,
            internal_port: p.map.internal_port,
        };
        let remote = SocketAddr::new(from_wire(p.remote_ip), p.remote_port);
        let sub = self.cfg.subscriber_keying.subscriber_of(internal_ip);
        // Section 12.3: PEER cannot shorten or delete a mapping, so the
        // expiry only ever moves later; lifetime 0 is clamped like any other.
        let lifetime = self.clamp_lifetime(req.header.lifetime);
        let expires = now + Duration::from_secs(u64::from(lifetime));
        // Section 12.3: a PEER behaves as if PREFER_FAILURE were present.
        let suggestion = Self::suggestion(&p.map, true);
        let checkpoint;
        let started = self.table.peer_entry(&key, remote).is_none();
        let id = match self.table.peer_entry(&key, remote) {
            Some(id) => {
                if self.table.get(id).map(|e| e.nonce) != Some(p.map.nonce) {
                    return Err(Some(Fail::parsed(ResultCode::NOT_AUTHORIZED)));
                }
                let was = self.table.get(id).is_some_and(|e| e.replicated);
                let old = self.table.get(id).map_or(expires, |e| e.expires);
                checkpoint = self.renew_checkpoint(now, sub, id, o.checkpoint);
                // Section 12.3: the expiry only ever moves later.
                let after = (was || checkpoint, expires.max(old));
                self.note_volatile(sub, internal_ip, Some((was, old)), Some(after));
                let manager = self.renew_manager(id, (src, port), o.third_party, (was, old), after);
                let description = o.description.clone();
                self.table.update(id, |e| {
                    e.replicated |= checkpoint;
                    if expires > e.expires {
                        e.expires = expires;
                        e.lifetime = lifetime;
                    }
                    e.checkpoint = checkpoint;
                    // Rebuilt only when something in it changes: a PEER
                    // renewal is the common case and allocates nothing.
                    if description.is_some() || e.manager() != manager {
                        let desc = description
                            .map(String::into_boxed_str)
                            .or_else(|| e.extra.as_ref().and_then(|x| x.description.clone()));
                        e.extra = make_extra(Vec::new(), desc, Some(remote), manager);
                    }
                });
                id
            }
            None => {
                self.admit(sub)?;
                let binding = self.bind(key, suggestion, p.map.nonce)?;
                if !self.table.binding_matches(binding, &suggestion) {
                    self.table.unbind_if_unused(binding);
                    return Err(Some(Fail::parsed(ResultCode::CANNOT_PROVIDE_EXTERNAL)));
                }
                checkpoint = self.new_checkpoint(now, sub, o.checkpoint);
                let id = self.table.insert(Entry {
                    binding,
                    nonce: p.map.nonce,
                    expires,
                    lifetime,
                    checkpoint,
                    replicated: checkpoint,
                    third_party: o.third_party.is_some(),
                    extra: make_extra(
                        Vec::new(),
                        o.description.clone().map(String::into_boxed_str),
                        Some(remote),
                        o.third_party.map(|_| src),
                    ),
                });
                self.subscriber_mut(sub).mappings += 1;
                self.count_in_class(sub, true);
                self.stats.created += 1;
                self.note_volatile(sub, internal_ip, None, Some((checkpoint, expires)));
                if o.third_party.is_some() {
                    self.note_manager(src, port, None, Some((checkpoint, expires)), true);
                }
                id
            }
        };
        let record = self.record(id);
        let (external, granted) = match &record {
            Some(r) => (Some(r.external), r.expires - now),
            None => (None, Duration::ZERO),
        };
        if let Some(r) = record {
            self.push_upsert(r, started);
        }
        let data = OpData::Peer(PeerData {
            map: assigned(p.map, external),
            ..*p
        });
        let lifetime = u32::try_from(granted.as_secs()).unwrap_or(u32::MAX);
        let options = Self::echo_options(req, checkpoint && o.checkpoint);
        let by = self.requester_of(src, sub, o.third_party);
        self.success(now, by, lifetime, data, options, out)
    }

    /// The manager of entry `id` after a renewal from `src` (naming
    /// `third_party`, if any), with the requesters' counts moved: the
    /// THIRD_PARTY client that renews a mapping manages it from then on
    /// (RFC 6887 section 13.1 lets any authorised one, with the nonce); a
    /// renewal by the host itself leaves it unmanaged. `was` and `after`:
    /// whether the backup follows it, and its expiry, before and after.
    fn renew_manager(
        &mut self,
        id: Id,
        (src, port): (IpAddr, u16),
        third_party: Option<IpAddr>,
        was: (bool, Timestamp),
        after: (bool, Timestamp),
    ) -> Option<IpAddr> {
        let old = self.table.get(id).and_then(Entry::manager);
        let new = third_party.map(|_| src);
        match (old, new) {
            (Some(o), Some(n)) if o == n => {
                self.note_manager(n, port, Some(was), Some(after), true);
            }
            _ => {
                if let Some(o) = old {
                    let p = self.requesters.get(&o).map_or(CLIENT_PORT, |r| r.port);
                    self.note_manager(o, p, Some(was), None, false);
                }
                if let Some(n) = new {
                    self.note_manager(n, port, None, Some(after), true);
                }
            }
        }
        new
    }

    /// Quotas checked before a new mapping is made: the subscriber's own
    /// (USER_EX_QUOTA) and the server's (NO_RESOURCES), which together bound
    /// the memory any flood of requests can take.
    fn admit(&self, sub: SubscriberId) -> Result<(), Option<Fail>> {
        if self.table.len() >= self.cfg.max_mappings as usize {
            return Err(Some(Fail::parsed(ResultCode::NO_RESOURCES)));
        }
        let held = self.subscribers.get(&sub).map_or(0, |s| s.mappings);
        if held >= self.cfg.max_mappings_per_subscriber {
            return Err(Some(Fail::parsed(ResultCode::USER_EX_QUOTA)));
        }
        Ok(())
    }

    /// The binding of a new mapping: its own endpoint for a host the
    /// server is a firewall for (RFC 6887 section 1, "the external address
    /// is the internal address"; a suggestion of anything else is then
    /// ignored, section 11.3, or fails with PREFER_FAILURE, section 13.2),
    /// else an endpoint of the pool, where `nonce` may reclaim one held for
    /// it (section 15).
    fn bind(
        &mut self,
        key: MappingKey,
        s: Suggestion,
        nonce: portkeep_proto::Nonce,
    ) -> Result<Id, Option<Fail>> {
        let bound = if self.cfg.is_firewalled(key.internal_ip) {
            self.table.bind_identity(key)
        } else {
            self.table.bind(key, s, nonce)
        };
        bound.map_err(|e| {
            Some(Fail::parsed(match e {
                AllocError::CannotProvide => ResultCode::CANNOT_PROVIDE_EXTERNAL,
                AllocError::Exhausted => ResultCode::NO_RESOURCES,
            }))
        })
    }

    /// Deletes the MAP mapping `key` (or, with internal port 0, every MAP
    /// mapping of the internal address for that protocol, all protocols
    /// when it is 0; section 11.1) whose nonce matches. Deleting nothing is
    /// success; a mapping owned by another nonce is NOT_AUTHORIZED
    /// (section 11.3) and stays. Returns the external endpoint of a single
    /// deleted mapping.
    fn delete_map(
        &mut self,
        key: MappingKey,
        nonce: portkeep_proto::Nonce,
    ) -> Result<Option<SocketAddr>, Fail> {
        let exact = self.table.map_entry(&key);
        let targets: Vec<Id> = match exact {
            Some(id) => vec![id],
            None if key.internal_port == 0 => self
                .table
                .map_entries_of(key.internal_ip)
                .into_iter()
                .filter(|&id| {
                    key.protocol == Protocol::ALL
                        || self
                            .table
                            .get(id)
                            .and_then(|e| self.table.bindings.get(e.binding))
                            .is_some_and(|b| b.key.protocol == key.protocol)
                })
                .collect(),
            None => Vec::new(),
        };
        // A PCP request may delete what NAT-PMP made, as it may take it
        // over (see `map`).
        let (mine, theirs): (Vec<Id>, Vec<Id>) = targets.into_iter().partition(|&id| {
            let owner = self.table.get(id).map(|e| e.nonce);
            !self.is_static(id) && (owner == Some(nonce) || owner == Some(natpmp::NATPMP_NONCE))
        });
        if mine.is_empty() && !theirs.is_empty() {
            return Err(Fail::parsed(ResultCode::NOT_AUTHORIZED));
        }
        let mut external = None;
        for id in &mine {
            external = self
                .table
                .get(*id)
                .and_then(|e| self.table.external_of(e.binding));
            self.remove_entry(*id, RemoveReason::Deleted);
        }
        Ok(if mine.len() == 1 { external } else { None })
    }

    fn record(&self, id: Id) -> Option<MappingRecord> {
        self.table.record(id, &self.cfg.subscriber_keying)
    }

    fn remove_entry(&mut self, id: Id, reason: RemoveReason) {
        // A mapping the dataplane never installed carried no traffic that
        // could arrive late: nothing to hold.
        self.remove_entry_holding(id, reason, reason != RemoveReason::Failed);
    }

    /// Removes an entry; with `hold`, its endpoint, if that frees it, is
    /// held for its client (RFC 6887 section 15).
    fn remove_entry_holding(&mut self, id: Id, reason: RemoveReason, hold: bool) {
        let Some(record) = self.record(id) else {
            return;
        };
        let was = self.table.get(id).map(|e| (e.replicated, e.expires));
        let held = self.table.remove(id, hold).and_then(|(_, h)| h);
        let sub = record.subscriber;
        self.note_volatile(sub, record.key.internal_ip, was, None);
        if let Some(ip) = record.manager {
            let port = self.requesters.get(&ip).map_or(CLIENT_PORT, |r| r.port);
            self.note_manager(ip, port, was, None, false);
        }
        // RFC 7767 section 3.2: a deleted or expired mapping gives its
        // check-point back to the server's capacity and the subscriber's quota.
        if record.checkpoint {
            self.checkpointed = self.checkpointed.saturating_sub(1);
        }
        self.count_in_class(sub, false);
        if let Some(s) = self.subscribers.get_mut(&sub) {
            s.mappings = s.mappings.saturating_sub(1);
            if record.checkpoint {
                s.checkpointed = s.checkpointed.saturating_sub(1);
            }
            if s.mappings == 0 && s.anchor.is_none() {
                let bucket = s.bucket;
                self.subscribers.remove(&sub);
                self.park_bucket(sub, bucket);
            }
        }
        self.push(Change::Removed {
            mapping: record,
            reason,
        });
        if let Some(h) = held {
            self.push(Change::PortHeld(h));
        }
    }

    /// A mapping of `sub` was made (`added`) or went: its class's count.
    fn count_in_class(&mut self, sub: SubscriberId, added: bool) {
        let class = self.cfg.checkpoint.class_of(sub);
        if let Some(n) = self.by_class.get_mut(class) {
            *n = if added { *n + 1 } else { n.saturating_sub(1) };
        }
    }

    /// External endpoints freed recently and held back from other clients
    /// (RFC 6887 section 15), in the order they end.
    pub fn port_holds(&self) -> Vec<PortHold> {
        self.table.holds()
    }

    /// How many [`Server::port_holds`] there are.
    pub fn port_hold_count(&self) -> usize {
        self.table.hold_count()
    }

    /// Mappings held by the subscribers of each check-point class, by the
    /// class's name (RFC 7767 section 4).
    pub fn mapping_count_by_class(&self) -> Vec<(&str, u64)> {
        self.cfg
            .checkpoint
            .classes
            .iter()
            .zip(&self.by_class)
            .map(|(c, &n)| (c.name.as_str(), n))
            .collect()
    }

    fn subscriber_mut(&mut self, sub: SubscriberId) -> &mut Subscriber {
        let idle = &mut self.idle_buckets;
        self.subscribers.entry(sub).or_insert_with(|| Subscriber {
            bucket: idle.remove(&sub).unwrap_or_default(),
            ..Subscriber::default()
        })
    }

    /// Keeps the rate bucket of a subscriber that no longer holds mappings
    /// until it has refilled, so that deleting and re-creating mappings
    /// does not reset the rate (RFC 7767 section 3.2). Full buckets are
    /// swept whenever the set has doubled, so it stays bounded by the
    /// subscribers that asked within the last refill time.
    fn park_bucket(&mut self, sub: SubscriberId, bucket: TokenBucket) {
        let now = self.now;
        if bucket.is_full(now) {
            return;
        }
        self.idle_buckets.insert(sub, bucket);
        if self.idle_buckets.len() >= self.idle_sweep_at {
            self.idle_buckets.retain(|_, b| !b.is_full(now));
            self.idle_sweep_at = (self.idle_buckets.len() * 2).max(IDLE_SWEEP_MIN);
        }
    }

    /// The check-point decision for a new mapping (RFC 7767 section 3.2).
    /// The caller inserts the mapping next, so a grant takes its slot now.
    fn new_checkpoint(&mut self, now: Timestamp, sub: SubscriberId, requested: bool) -> bool {
        self.checkpoint_flag(now, sub, requested, false)
    }

    /// The check-point decision for a renewal of mapping `id` (RFC 7767
    /// section 3.2: "it is set if a CHECKPOINT_REQUIRED option was included
    /// in the update request or it is cleared if no CHECKPOINT_REQUIRED
    /// option was included"). Clearing gives the slot back.
    fn renew_checkpoint(
        &mut self,
        now: Timestamp,
        sub: SubscriberId,
        id: Id,
        requested: bool,
    ) -> bool {
        let before = self.table.get(id).is_some_and(|e| e.checkpoint);
        self.checkpoint_flag(now, sub, requested, before)
    }

    /// Runs [`policy::decide`] for `sub`, counts the outcome and moves the
    /// capacity and quota counts when the flag changes from `before`. Only
    /// called once the MAP or PEER itself is sure to succeed, so a token is
    /// never spent on a request that fails for other reasons. One lookup of
    /// the subscriber: this runs for every request carrying the option.
    fn checkpoint_flag(
        &mut self,
        now: Timestamp,
        sub: SubscriberId,
        requested: bool,
        before: bool,
    ) -> bool {
        if !requested && !self.any_always && !before {
            return false;
        }
        let p = &self.cfg.checkpoint;
        let class = p.class(p.class_of(sub));
        let idle = &mut self.idle_buckets;
        let state = self.subscribers.entry(sub).or_insert_with(|| Subscriber {
            bucket: idle.remove(&sub).unwrap_or_default(),
            ..Subscriber::default()
        });
        let decision = match class {
            Some(class) => {
                let ask = Ask {
                    requested,
                    already: before,
                    server_held: self.checkpointed,
                    subscriber_held: state.checkpointed,
                };
                policy::decide(p, class, self.backup, ask, &mut state.bucket, now)
            }
            None => Decision::NotWanted,
        };
        let after = matches!(decision, Decision::Grant);
        let counted = match decision {
            Decision::NotWanted => None,
            Decision::Grant => Some(None),
            Decision::Refuse(_) if !requested => None,
            Decision::Refuse(reason) => Some(Some(reason)),
        };
        if let (Some(outcome), Some(class)) = (counted, class) {
            let by_class = &mut self.stats.checkpoint_by_class;
            if !by_class.contains_key(class.name.as_str()) {
                by_class.insert(class.name.as_str().into(), CheckpointStats::default());
            }
            let per_class = by_class.get_mut(class.name.as_str());
            for stats in std::iter::once(&mut self.stats.checkpoint).chain(per_class) {
                match outcome {
                    None if requested => stats.granted += 1,
                    None => stats.forced += 1,
                    Some(reason) => stats.count_refusal(reason),
                }
            }
        }
        match (before, after) {
            (false, true) => {
                self.checkpointed += 1;
                state.checkpointed += 1;
            }
            (true, false) => {
                self.checkpointed = self.checkpointed.saturating_sub(1);
                state.checkpointed = state.checkpointed.saturating_sub(1);
            }
            _ => {}
        }
        after
    }

    /// Keeps [`Server::volatile_hosts`] current as mapping `host` of `sub`
    /// goes from `before` to `after` (`None`: absent;
    /// `Some((replicated, expires))`: present,
    /// [replicated](Server::replicated_mappings) or not, and when it
    /// expires).
    fn note_volatile(
        &mut self,
        sub: SubscriberId,
        host: IpAddr,
        before: Option<(bool, Timestamp)>,
        after: Option<(bool, Timestamp)>,
    ) {
        let was = before.and_then(|(r, t)| (!r).then_some(t));
        let is = after.and_then(|(r, t)| (!r).then_some(t));
        if was == is {
            return;
        }
        let set = self.volatile.entry(sub).or_default();
        let end = set.expiries.latest();
        if let Some(t) = was {
            set.expiries.remove(t);
        }
        if let Some(t) = is {
            set.expiries.add(t);
        }
        let i = set.hosts.iter().position(|(h, _)| *h == host);
        let hosts_changed = match (i, was.is_some(), is.is_some()) {
            (Some(i), false, true) => {
                set.hosts[i].1 += 1;
                false
            }
            (None, false, true) => {
                set.hosts.push((host, 1));
                true
            }
            (Some(i), true, false) => {
                set.hosts[i].1 = set.hosts[i].1.saturating_sub(1);
                if set.hosts[i].1 == 0 {
                    set.hosts.swap_remove(i);
                    true
                } else {
                    false
                }
            }
            _ => false,
        };
        let changed = hosts_changed || set.expiries.latest() != end;
        if set.hosts.is_empty() {
            self.volatile.remove(&sub);
        }
        if changed {
            self.volatile_dirty.push(sub);
        }
    }

    fn push(&mut self, change: Change) {
        self.seq += 1;
        self.log.push(ChangeRecord {
            started: false,
            seq: self.seq,
            change,
        });
    }

    /// Logs mapping `r` as it now is; `started`: this change made it.
    pub(crate) fn push_upsert(&mut self, r: MappingRecord, started: bool) {
        self.seq += 1;
        self.log.push(ChangeRecord {
            seq: self.seq,
            change: Change::Upserted(r),
            started,
        });
    }
}

/// Section 13.3: a FILTER with prefix length 0 removes all filters; the
/// others are added (a refresh may add more), ignoring exact repeats.
fn apply_filters(mut current: Vec<FilterRule>, new: &[Filter]) -> Vec<FilterRule> {
    for f in new {
        if f.prefix_len == 0 {
            current.clear();
            continue;
        }
        let ip = from_wire(f.remote_ip);
        let len = if ip.is_ipv4() {
            f.prefix_len.saturating_sub(96)
        } else {
            f.prefix_len
        };
        if let Ok(prefix) = Prefix::new(ip, len) {
            let rule = FilterRule {
                prefix,
                port: f.remote_port,
            };
            if !current.contains(&rule) {
                current.push(rule);
            }
        }
    }
    current
}

/// The request's MAP-shaped body with the external endpoint the server
/// assigned (RFC 6887 sections 11.3 and 12.3: the response copies the
/// request's fields, with the assigned address and port in place of the
/// suggested ones).
fn assigned(mut m: MapData, external: Option<SocketAddr>) -> MapData {
    if let Some(ext) = external {
        m.external_ip = to_wire(ext.ip());
        m.external_port = ext.port();
    }
    m
}

fn make_extra(
    filters: Vec<FilterRule>,
    description: Option<Box<str>>,
    remote: Option<SocketAddr>,
    manager: Option<IpAddr>,
) -> Option<Box<Extra>> {
    if filters.is_empty() && description.is_none() && remote.is_none() && manager.is_none() {
        None
    } else {
        Some(Box::new(Extra {
            filters,
            description,
            remote,
            manager,
        }))
    }
}
