//! The simulated world: clients, two nodes, the network, the faults, and
//! the invariants, on one virtual clock.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use portkeep_client::{EpochTracker, RequestBuilder, Session, SessionConfig, SessionEvent};
use portkeep_ha::witness::{Record, Verdict, Witness, WitnessConfig};
use portkeep_ha::{
    strip_checkpoint, ActiveConfig, Effect, Grant, Message, Node, NodeConfig, Replica,
    ReplicaWrite, Role, SnapshotSource, TakeoverKind,
};
use portkeep_proto::{Nonce, Protocol};
use portkeep_server::record::key_of;
use portkeep_server::{
    Announcement, BackupState, Change, ChangeRecord, MappingKind, MappingRecord, Outcome, Prefix,
    Refused, RequesterState, Restored, Server, ServerConfig, SubscriberId, SubscriberKeying,
    Timestamp,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::etcd::{self, Etcd};
use crate::{Invariant, Options, PlantedBug, Report, Schedule, Violation};

/// Virtual time 0 as the cores see it (a wall-clock-like origin, as the
/// daemon's clock gives).
const T0: u64 = 1_700_000_000_000;
/// The address keepalived moves between the nodes.
const VIP: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 255, 0, 1)), 5351);
/// The daemon's active retries its connection this often (`link.rs`).
const CONNECT_RETRY_MS: u64 = 200;
/// How long a node configured active waits for its peer at start before it
/// serves what it stored (`NodeConfig::peer_wait`).
const PEER_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
/// A node that is active and accepts a connection tells its term, then
/// closes after this long (`link.rs`, `tell_term`).
const TELL_TERM_CLOSE_MS: u64 = 200;
/// Bounds of invariant 5.
/// Longest a reply may wait between its request's handling and its
/// release: the acknowledgement bound plus the backup's lease, plus the
/// time a commit takes, with a margin.
const WAIT_BOUND_MS: u64 = 3_000;
const HELD_BOUND: usize = 10_000;
const STORE_QUEUE_BOUND: usize = 10_000;
const LINK_BUFFER_BOUND: usize = 8 << 20;
/// After a client's epoch check failed for a loss, late answers of the old
/// node may fail it again for this long.
const EXCUSE_GRACE_MS: u64 = 5_000;
/// An excuse not used within this long is forgotten.
const EXCUSE_TTL_MS: u64 = 15 * 60 * 1000;
/// A loss the epoch check cannot see must be ANNOUNCEd within this long.
const ANNOUNCE_DEADLINE_MS: u64 = 10_000;
/// Violations kept per invariant per run (all are counted).
const KEEP_PER_INVARIANT: usize = 3;
/// Witness mode: the lease's time to live at etcd (`ttl_s`, its lowest
/// allowed value).
const WITNESS_TTL_MS: u64 = 2_000;
/// Witness mode: how much sooner than the lease can end the holder stops
/// (`margin_ms`, its default).
const WITNESS_MARGIN_MS: u64 = 500;
/// Witness mode: how long a node elected behind the record waits for its
/// peer (`peer_wait_ms`, its default): both nodes of a `both-down` are
/// back within it.
const WITNESS_PEER_WAIT_MS: u64 = 10_000;
/// Witness mode: `coordinator.rs`'s `call_timeout` (a sixth of the TTL, at
/// least 200 ms).
const CALL_TIMEOUT_MS: u64 = WITNESS_TTL_MS / 6;
/// Witness mode: etcd members the coordinator knows (`keep_alive` tries as
/// many, at least two, before it gives up on a renewal).
const ETCD_ENDPOINTS: u8 = 3;

type MapKey = (IpAddr, u8, u16);

#[derive(Debug)]
enum Ev {
    /// A PCP datagram from a client reaches the VIP.
    ToVip {
        client: usize,
        bytes: Vec<u8>,
    },
    /// A PCP datagram from a node reaches a host.
    ToHost {
        host: IpAddr,
        bytes: Vec<u8>,
        handled_at: u64,
    },
    LinkDeliver {
        conn: u64,
        dir: usize,
    },
    LinkEstablish {
        conn: u64,
    },
    LinkFailed {
        node: usize,
        gen: u64,
    },
    TellTermClose {
        conn: u64,
    },
    ConnectRetry {
        node: usize,
        gen: u64,
    },
    FsyncDone {
        node: usize,
        gen: u64,
    },
    ReplicaFsyncDone {
        node: usize,
        gen: u64,
    },
    Work(Work),
    Fault(Fault, u32),
    Restart {
        node: usize,
        gen: u64,
    },
    PromoterAct {
        early: bool,
        target: Option<usize>,
    },
    /// A PCP datagram that reached the VIP while its node was frozen: it
    /// waits in that node's socket.
    ToNode {
        node: usize,
        gen: u64,
        client: usize,
        bytes: Vec<u8>,
    },
    /// A frozen node's process resumes.
    Thaw {
        node: usize,
        gen: u64,
    },
    /// A node's call reaches etcd (witness mode).
    ToEtcd {
        node: usize,
        gen: u64,
        req: etcd::Req,
    },
    /// etcd's answer reaches a node.
    FromEtcd {
        node: usize,
        gen: u64,
        resp: etcd::Resp,
    },
    /// A lease may expire at etcd.
    EtcdExpire {
        lease: u64,
    },
    /// A timer of a node's coordinator.
    Coord {
        node: usize,
        gen: u64,
        t: CoordTimer,
    },
    /// Witness mode: keepalived's check script sees a node serve (`ctl
    /// status`) and moves the address to it.
    VipFollow {
        node: usize,
        gen: u64,
    },
}

/// A timer of the coordinator.
#[derive(Debug, Clone, Copy)]
enum CoordTimer {
    /// The end of a sleep (`run`'s between sessions, a pause after a
    /// failed campaign), named by its token.
    Wake(u64),
    /// A call's `call_timeout`.
    Timeout(u64),
    /// The renewal due at this virtual ms.
    Renew(u64),
}

#[derive(Debug, Clone, Copy)]
enum Work {
    Create { client: usize, m: usize },
    Delete { client: usize, m: usize },
    Depart { client: usize },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    PcpLoss,
    PcpDelay,
    PcpDup,
    PcpReorder,
    LinkReset,
    LinkPartition,
    LinkDelay,
    CrashActive,
    CrashBackup,
    FsyncFailure,
    // Named schedules.
    BothDown,
    EmptyCrashBackup,
    EmptyCrashActive,
    PartitionOldActive,
    PartitionPromote,
    // Default faults made of two steps.
    PartitionLoss,
    PartitionLossCrash,
    BackupRestartLoss,
    BackupRestartLossCrash,
    BackupDiskStall,
    /// The operator clears one subscriber's mappings (failure-scenarios
    /// draft section 2.6.2).
    OperatorClear,
    /// A node's process is paused for 0.5 to 6 s (witness mode).
    Freeze,
    /// etcd's answers to one node take 150 to 700 ms more for 2 to 10 s
    /// (witness mode): its calls time out, its requests still arrive.
    EtcdSlow,
    /// The named schedule frozen-old-active: the active's process paused
    /// long enough for the backup to be promoted.
    FreezeOldActive,
    /// For 2 to 6 s the active's dataplane refuses some of the changes it
    /// is given: a renewal whose mapping it keeps (`Refused::Kept`), a
    /// creation it never installed (`Refused::NotInstalled`), a mapping
    /// the NAT lost (`Refused::Lost`).
    DataplaneRefusal,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::PcpLoss => "pcp-loss",
            Fault::PcpDelay => "pcp-delay",
            Fault::PcpDup => "pcp-dup",
            Fault::PcpReorder => "pcp-reorder",
            Fault::LinkReset => "link-reset",
            Fault::LinkPartition => "link-partition",
            Fault::LinkDelay => "link-delay",
            Fault::CrashActive => "crash-active",
            Fault::CrashBackup => "crash-backup",
            Fault::FsyncFailure => "fsync-failure",
            Fault::BothDown => "both-down",
            Fault::EmptyCrashBackup => "promote-empty",
            Fault::EmptyCrashActive => "promote-empty-crash-active",
            Fault::PartitionOldActive => "partitioned-old-active",
            Fault::PartitionPromote => "partitioned-old-active-promote",
            Fault::PartitionLoss => "partition-then-active-loss",
            Fault::PartitionLossCrash => "partition-then-active-loss-crash",
            Fault::BackupRestartLoss => "backup-restart-then-active-loss",
            Fault::BackupRestartLossCrash => "backup-restart-then-active-loss-crash",
            Fault::BackupDiskStall => "backup-disk-stall",
            Fault::OperatorClear => "operator-clear",
            Fault::Freeze => "freeze",
            Fault::EtcdSlow => "etcd-slow",
            Fault::FreezeOldActive => "frozen-old-active",
            Fault::DataplaneRefusal => "dataplane-refusal",
        }
    }
}

#[derive(Debug)]
struct Scheduled {
    at: u64,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Scheduled {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

/// The replies of one job, as the node's handle for them.
#[derive(Debug, Default)]
struct Reply {
    /// When the server handled the request (its mapping's expiry counts
    /// from here).
    handled_at: u64,
    out: Vec<(IpAddr, Vec<u8>)>,
    announce: bool,
}

#[derive(Debug, Default)]
struct Job {
    changes: Vec<ChangeRecord>,
    volatile: Vec<(SubscriberId, Vec<IpAddr>, Timestamp)>,
    reply: Reply,
    reset: Option<Restored>,
    after: u64,
}

/// The store: what an fsync made durable, and the jobs not yet durable.
#[derive(Debug, Default)]
struct Store {
    exists: bool,
    anchor: Timestamp,
    subs: BTreeMap<SubscriberId, Timestamp>,
    maps: BTreeMap<Vec<u8>, MappingRecord>,
    owed: BTreeMap<SubscriberId, (Vec<IpAddr>, Timestamp)>,
    requesters: BTreeMap<IpAddr, RequesterState>,
    holds: BTreeMap<[u8; 19], portkeep_server::PortHold>,
    last_seq: u64,
    /// The term its state was served in.
    term: u64,
    queue: VecDeque<Job>,
    /// The jobs of the fsync under way (group commit).
    syncing: Option<Vec<Job>>,
}

impl Store {
    fn apply(&mut self, changes: &[ChangeRecord]) {
        for c in changes {
            match &c.change {
                Change::Upserted(m) => {
                    self.maps.insert(key_of(m), m.clone());
                }
                Change::Removed { mapping, .. } => {
                    self.maps.remove(&key_of(mapping));
                }
                Change::EpochReset { subscriber, anchor } => {
                    self.subs.insert(*subscriber, *anchor);
                }
                Change::ServerEpochReset { anchor } => {
                    self.anchor = *anchor;
                    self.subs.clear();
                }
                Change::AnnounceOwed {
                    subscriber,
                    hosts,
                    until,
                } => {
                    if hosts.is_empty() {
                        self.owed.remove(subscriber);
                    } else {
                        self.owed.insert(*subscriber, (hosts.clone(), *until));
                    }
                }
                Change::Requester { ip, state } => match state {
                    Some(st) => {
                        self.requesters.insert(*ip, *st);
                    }
                    None => {
                        self.requesters.remove(ip);
                    }
                },
                Change::PortHeld(h) => {
                    self.holds.insert(portkeep_server::record::hold_key(h), *h);
                }
            }
            self.last_seq = self.last_seq.max(c.seq);
        }
    }

    fn replace(&mut self, r: &Restored) {
        self.anchor = r.anchor;
        self.subs = r.subscriber_anchors.iter().copied().collect();
        self.maps = r.mappings.iter().map(|m| (key_of(m), m.clone())).collect();
        self.owed = r
            .owed
            .iter()
            .map(|(s, h, u)| (*s, (h.clone(), *u)))
            .collect();
        self.requesters = r.requesters.iter().copied().collect();
        self.holds = r
            .holds
            .iter()
            .map(|h| (portkeep_server::record::hold_key(h), *h))
            .collect();
        self.last_seq = r.last_seq;
        self.term = r.term;
    }

    fn restored(&self) -> Restored {
        Restored {
            anchor: self.anchor,
            subscriber_anchors: self.subs.iter().map(|(s, a)| (*s, *a)).collect(),
            mappings: self.maps.values().cloned().collect(),
            last_seq: self.last_seq,
            term: self.term,
            owed: self
                .owed
                .iter()
                .map(|(s, (h, u))| (*s, h.clone(), *u))
                .collect(),
            requesters: self.requesters.iter().map(|(ip, r)| (*ip, *r)).collect(),
            holds: self.holds.values().copied().collect(),
        }
    }
}

/// A backup's stored replica: what its fsyncs made durable, and the writes
/// not yet durable (lost at a crash).
#[derive(Debug, Default)]
struct ReplicaDisk {
    durable: Option<Replica>,
    queue: Vec<(u64, ReplicaWrite)>,
    /// The writes of the fsync under way (group commit).
    syncing: Option<Vec<(u64, ReplicaWrite)>>,
}

/// What a node's coordinator (`portkeepd`'s `coordinator.rs`, one
/// sequential task) waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// `run`: asleep between sessions until its timer (`token`).
    Idle { token: u64 },
    /// `Session::start`: the lease grant sent at `sent`.
    Granting { call: u64, sent: u64 },
    /// `hold`: the campaign, under `alive` (renewals go on).
    Campaigning { call: u64 },
    /// `hold`: the 100 ms pause after a failed campaign, under `alive`.
    Pausing { token: u64 },
    /// `read_record`, first try (0) or after the member rotated (1).
    Reading { call: u64, attempt: u8 },
    /// `record_now`'s guarded write, first try or second.
    Writing {
        call: u64,
        attempt: u8,
        record: Record,
        term_start: bool,
    },
    /// `resign`, after which `hold` returns.
    Resigning { call: u64, then: AfterResign },
    /// `hold`'s loop: asleep until the next renewal.
    Holding,
    /// The lease revoked as the session ends.
    Revoking { call: u64 },
}

/// Why a coordinator resigned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterResign {
    /// `Verdict::Yield`: the lease is given back, the session ends well.
    Yielded,
    /// The promotion was refused: the session fails.
    Refused,
    /// Deposed by a higher term over the link.
    Deposed,
}

/// What `alive` did not poll while a renewal ran (it resumes with it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stash {
    Won(u64),
    CampaignFailed,
    PauseOver,
}

/// A node's coordinator: the real `Witness` and where the daemon's task
/// stands.
#[derive(Debug)]
struct Coord {
    w: Witness,
    step: Step,
    /// The session's lease at etcd.
    lease: Option<u64>,
    /// The leader key's revision, once elected.
    rev: Option<u64>,
    /// When the lease is renewed next (virtual ms).
    renew_at: u64,
    /// The renewal a timer is set for.
    renew_armed: u64,
    /// A keepalive under way: (call, sent at, attempt).
    renewing: Option<(u64, u64, u8)>,
    stash: Option<Stash>,
    /// The record read when elected, then as last recorded.
    record: Option<Record>,
    /// Renewals while holding (`hold`'s `n`).
    renewals: u64,
    /// `Pair::fence`: the virtual ms from which the node must not answer
    /// PCP (0: it may not), set where `coordinator.rs` sets it.
    fence: u64,
}

impl Coord {
    fn new() -> Coord {
        Coord {
            w: Witness::new(WitnessConfig {
                ttl: Duration::from_millis(WITNESS_TTL_MS),
                margin: Duration::from_millis(WITNESS_MARGIN_MS),
                peer_wait: Duration::from_millis(WITNESS_PEER_WAIT_MS),
            }),
            step: Step::Idle { token: 0 },
            lease: None,
            rev: None,
            renew_at: 0,
            renew_armed: 0,
            renewing: None,
            stash: None,
            record: None,
            renewals: 0,
            fence: 0,
        }
    }

    /// The call the task awaits, if it awaits one.
    fn step_call(&self) -> Option<u64> {
        match self.step {
            Step::Granting { call, .. }
            | Step::Campaigning { call }
            | Step::Reading { call, .. }
            | Step::Writing { call, .. }
            | Step::Resigning { call, .. }
            | Step::Revoking { call } => Some(call),
            Step::Idle { .. } | Step::Pausing { .. } | Step::Holding => None,
        }
    }

    /// Whether the task is inside `alive` or `hold`'s loop, where the
    /// lease is renewed.
    fn renews(&self) -> bool {
        matches!(
            self.step,
            Step::Campaigning { .. } | Step::Pausing { .. } | Step::Holding
        )
    }
}

#[derive(Debug)]
struct SimNode {
    name: &'static str,
    cfg_role: Role,
    up: bool,
    /// Bumped at every crash and restart: stale events are ignored.
    gen: u64,
    server: Server,
    ha: Node<Reply>,
    store: Store,
    replica: ReplicaDisk,
    /// Until when its replica's fsyncs take seconds (a stalled disk).
    replica_stall_until: u64,
    /// Resumes its current active link end reported so far.
    resumes_seen: u64,
    /// The durable term.
    term: u64,
    /// The connection this node's link end is attached to.
    link: Option<u64>,
    connecting: bool,
    last_rx: u64,
    /// A backup that completed a snapshot since it started.
    ever_synced: bool,
    /// Its table as the change log describes it (every mutation of the
    /// core goes through the log: the store and the backup are built from
    /// it); compared with the real table every virtual second.
    shadow: HashMap<MapKey, (Nonce, SocketAddr, SubscriberId)>,
    /// Which mappings hold each external endpoint (invariant 4).
    owners: HashMap<(u8, SocketAddr), Vec<(MapKey, SubscriberId)>>,
    full_check_at: u64,
    /// When the table's own check (`Server::check_invariants`) next runs.
    table_check_at: u64,
    dirty: bool,
    fail_next_fsync: bool,
    was_serving: bool,
    holder_at_crash: bool,
    /// Down in a double failure: it comes back whatever its peer does
    /// (a site's power returns to both).
    both_down: bool,
    /// The kind of the takeover that made it active, until it serves.
    takeover: Option<TakeoverKind>,
    next_timer_floor: u64,
    /// Frozen until then (virtual ms; not frozen at or after it).
    frozen_until: u64,
    /// Every freeze of this node: (from, until).
    freezes: Vec<(u64, u64)>,
    /// Witness mode: the coordinator, while the process runs.
    coord: Option<Coord>,
    /// Witness mode: the election it won last (world-wide numbering; 0:
    /// none).
    tenure: u64,
    /// A `dataplane-refusal` window: until when (virtual ms), how likely
    /// each changed mapping is refused, and the process it is for (`gen`).
    refusing: (u64, f64, u64),
    /// Witness mode: until when etcd's answers to it are slow, and by how
    /// much (ms).
    etcd_slow: (u64, u64),
}

#[derive(Debug)]
struct Conn {
    connector: usize,
    acceptor: usize,
    tell_term: bool,
    open: [bool; 2],
    /// Segments per direction: 0 connector to acceptor, 1 the other way.
    q: [VecDeque<(u64, Option<Vec<u8>>)>; 2],
    scheduled: [bool; 2],
    bytes: [usize; 2],
}

#[derive(Debug, Clone)]
struct MapSpec {
    id: u64,
    host: IpAddr,
    protocol: Protocol,
    port: u16,
    nonce: Nonce,
    checkpoint: bool,
    lifetime: u32,
    in_session: bool,
    /// Asked to be deleted, the delete not yet answered (or given up).
    deleting: bool,
    /// Found lost at a node that started serving (and the client was
    /// told, or could see it), not granted since.
    lost_told: bool,
    /// Lower bound of the server's expiry after the last success the
    /// client accepted.
    server_expires: u64,
}

impl MapSpec {
    fn key(&self) -> MapKey {
        (self.host, self.protocol.0, self.port)
    }
}

#[derive(Debug)]
struct Client {
    ip: IpAddr,
    third_party: bool,
    session: Session,
    departed: bool,
    maps: Vec<MapSpec>,
    epoch_failures: u64,
    excused_at: Option<u64>,
    grace_until: u64,
}

#[derive(Debug, Clone)]
struct Promise {
    /// A reply without the option for this mapping left a node after the
    /// promise, but the client never accepted it.
    downgrade_sent: bool,
    nonce: Nonce,
    external: Option<SocketAddr>,
    expires: u64,
    client: usize,
}

#[derive(Debug, Clone, Copy, Default)]
struct Window {
    until: u64,
    value: f64,
}

impl Window {
    fn get(&self, now: u64) -> f64 {
        if now < self.until {
            self.value
        } else {
            0.0
        }
    }
}

/// The world of one seed.
#[derive(Debug)]
pub struct World {
    opts: Options,
    rng: ChaCha8Rng,
    base: Instant,
    now: u64,
    end: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<Scheduled>>,
    nodes: Vec<SimNode>,
    clients: Vec<Client>,
    by_ip: HashMap<IpAddr, usize>,
    by_nonce: HashMap<Nonce, MapKey>,
    conns: BTreeMap<u64, Conn>,
    next_conn: u64,
    vip: usize,
    partition_until: u64,
    link_delay: Window,
    base_loss: f64,
    base_dup: f64,
    loss: Window,
    dup: Window,
    delay: Window,
    reorder: Window,
    promoter_pending: bool,
    guards: bool,
    promises: BTreeMap<MapKey, Promise>,
    promises_dirty: bool,
    /// Clients owed an ANNOUNCE: (address, deadline, node, since when).
    obligations: Vec<(IpAddr, u64, usize, u64)>,
    max_term_sent: u64,
    two_serving: bool,
    /// The table of the node that served last, when it stopped.
    last_served: HashMap<MapKey, (Nonce, SocketAddr)>,
    /// When an operator last cleared each subscriber.
    cleared: HashMap<SubscriberId, u64>,
    /// When a node's NAT last lost each mapping (`Refused::Lost`).
    nat_lost: HashMap<MapKey, u64>,
    /// The `dataplane-refusal` fault's own randomness: seeds it is not
    /// planted in never draw from it, so they replay as before.
    drng: ChaCha8Rng,
    server_seeds: [u64; 2],
    report: Report,
    kept: BTreeMap<Invariant, usize>,
    /// Witness mode's own randomness (message delays, freezes): the default
    /// mode never draws from it, so its seeds replay as before.
    wrng: ChaCha8Rng,
    /// Witness mode: etcd.
    etcd: Option<Etcd>,
    next_call: u64,
    next_tenure: u64,
    /// Invariant 6: the (node, tenure) that answered last, and when.
    answering: Option<((usize, u64), u64)>,
    /// Tenures another tenure answered after: they must not answer again.
    closed_tenures: BTreeSet<(usize, u64)>,
    flagged: BTreeSet<((usize, u64), (usize, u64))>,
}

fn ip4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

fn link_cfg() -> ActiveConfig {
    ActiveConfig::default()
}

fn stale_after() -> Duration {
    Duration::from_millis(1500)
}

impl World {
    /// A world for `opts`, nothing run yet.
    #[allow(clippy::disallowed_methods)] // One reading, as an origin: only offsets from it matter.
    pub fn new(opts: Options) -> World {
        let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
        let keepalived = rng.gen_bool(0.5);
        let server_seeds = [rng.gen(), rng.gen()];
        let base = Instant::now();
        let end = opts.duration_ms;
        let guards = !opts.enable.iter().any(|s| s.lifts_guards());
        let mut w = World {
            rng,
            base,
            now: 0,
            end,
            seq: 0,
            queue: BinaryHeap::new(),
            nodes: Vec::new(),
            clients: Vec::new(),
            by_ip: HashMap::new(),
            by_nonce: HashMap::new(),
            conns: BTreeMap::new(),
            next_conn: 1,
            vip: 0,
            partition_until: 0,
            link_delay: Window::default(),
            base_loss: 0.0,
            base_dup: 0.0,
            loss: Window::default(),
            dup: Window::default(),
            delay: Window::default(),
            reorder: Window::default(),
            promoter_pending: false,
            guards,
            promises: BTreeMap::new(),
            promises_dirty: false,
            obligations: Vec::new(),
            max_term_sent: 0,
            two_serving: false,
            last_served: HashMap::new(),
            cleared: HashMap::new(),
            nat_lost: HashMap::new(),
            drng: ChaCha8Rng::seed_from_u64(opts.seed ^ 0xDA7A_0000_4EF0_0004),
            server_seeds,
            report: Report {
                seed: opts.seed,
                ..Report::default()
            },
            kept: BTreeMap::new(),
            wrng: ChaCha8Rng::seed_from_u64(opts.seed ^ 0x3E7C_D000_F1E2_0003),
            etcd: opts.witness.then(|| Etcd::new(WITNESS_TTL_MS)),
            next_call: 1,
            next_tenure: 1,
            answering: None,
            closed_tenures: BTreeSet::new(),
            flagged: BTreeSet::new(),
            opts,
        };
        w.base_loss = w.rng.gen_range(0.0..0.03);
        w.base_dup = w.rng.gen_range(0.0..0.03);
        // With the witness both nodes are configured `backup`
        // (docs/config.md, `[ha.coordinator]`): the coordinator promotes.
        let roles = if keepalived || w.opts.witness {
            [Role::Backup, Role::Backup]
        } else {
            [Role::Active, Role::Backup]
        };
        w.trace(format!(
            "layout: {} (node a {}, node b {}); base loss {:.3}, dup {:.3}",
            if w.opts.witness {
                "etcd witness"
            } else if keepalived {
                "keepalived"
            } else {
                "active+backup"
            },
            roles[0].as_str(),
            roles[1].as_str(),
            w.base_loss,
            w.base_dup
        ));
        for (i, role) in roles.into_iter().enumerate() {
            let name = if i == 0 { "a" } else { "b" };
            let server = Server::new(w.server_cfg(i), w.ts());
            let ha = Node::new(w.node_cfg(role), 0, SubscriberKeying::default());
            w.nodes.push(SimNode {
                name,
                cfg_role: role,
                up: false,
                gen: 0,
                server,
                ha,
                store: Store::default(),
                replica: ReplicaDisk::default(),
                replica_stall_until: 0,
                resumes_seen: 0,
                term: 0,
                link: None,
                connecting: false,
                last_rx: 0,
                ever_synced: false,
                shadow: HashMap::new(),
                owners: HashMap::new(),
                full_check_at: 0,
                table_check_at: 0,
                dirty: true,
                fail_next_fsync: false,
                was_serving: false,
                holder_at_crash: false,
                both_down: false,
                takeover: None,
                next_timer_floor: 0,
                frozen_until: 0,
                freezes: Vec::new(),
                coord: None,
                tenure: 0,
                refusing: (0, 0.0, 0),
                etcd_slow: (0, 0),
            });
        }
        w.plant(0);
        w.plant(1);
        w.start_node(0);
        w.start_node(1);
        if keepalived && !w.opts.witness {
            // keepalived elects a master at start and its notify hook
            // promotes it.
            w.schedule(
                100,
                Ev::PromoterAct {
                    early: false,
                    target: Some(0),
                },
            );
            w.promoter_pending = true;
        }
        w.make_clients();
        w.plan_faults();
        w
    }

    fn ts(&self) -> Timestamp {
        Timestamp(T0 + self.now)
    }

    fn inst(&self, ms: u64) -> Instant {
        self.base + Duration::from_millis(ms)
    }

    fn ms_of(&self, t: Instant) -> u64 {
        let d = t.saturating_duration_since(self.base);
        let ms = d.as_millis() as u64;
        if Duration::from_millis(ms) < d {
            ms + 1
        } else {
            ms
        }
    }

    fn trace(&mut self, line: String) {
        if self.opts.trace {
            let t = self.now;
            self.report
                .trace
                .push(format!("{:>4}.{:03} {line}", t / 1000, t % 1000));
        }
    }

    fn violation(&mut self, inv: Invariant, what: String) {
        self.report.violation_count += 1;
        let kept = self.kept.entry(inv).or_default();
        let line = format!("VIOLATION invariant {}: {what}", inv.number());
        if *kept < KEEP_PER_INVARIANT {
            *kept += 1;
            self.report.violations.push(Violation {
                seed: self.opts.seed,
                at_ms: self.now,
                invariant: inv,
                what,
            });
        }
        self.trace(line);
    }

    fn count_fault(&mut self, kind: &'static str) {
        *self.report.faults.entry(kind).or_default() += 1;
    }

    fn schedule(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse(Scheduled {
            at,
            seq: self.seq,
            ev,
        }));
    }

    fn server_cfg(&self, node: usize) -> ServerConfig {
        ServerConfig {
            external_addresses: vec![ip4(198, 51, 100, 1), ip4(198, 51, 100, 2)],
            port_min: 20_000,
            port_max: 20_999,
            min_lifetime: 20,
            max_lifetime: 3600,
            third_party_clients: vec![Prefix::new(ip4(10, 1, 0, 0), 24)
                .unwrap_or_else(|_| Prefix::host(ip4(10, 1, 0, 1)))],
            seed: self.server_seeds[node],
            ..ServerConfig::default()
        }
    }

    fn node_cfg(&self, role: Role) -> NodeConfig {
        let mut c = NodeConfig::new(role, Some(link_cfg()), stale_after());
        c.peer_wait = PEER_WAIT;
        match self.opts.planted {
            Some(PlantedBug::ReleaseBeforeAck) => c.planted.release_before_ack = true,
            Some(PlantedBug::SkipTermCheck) => c.planted.skip_term_check = true,
            Some(PlantedBug::AckBeforePersist) => c.planted.ack_before_persist = true,
            Some(PlantedBug::RefusedKeptRemoves | PlantedBug::RefusedLostKeepsEpoch) | None => {}
        }
        c
    }

    fn other(n: usize) -> usize {
        1 - n
    }

    /// Switches the run's planted defect of `portkeep_server` (if any) on
    /// in node `n`'s core, after every new core.
    fn plant(&mut self, n: usize) {
        let mut p = portkeep_server::Planted::default();
        match self.opts.planted {
            Some(PlantedBug::RefusedKeptRemoves) => p.refused_kept_removes = true,
            Some(PlantedBug::RefusedLostKeepsEpoch) => p.refused_lost_keeps_epoch = true,
            _ => return,
        }
        self.nodes[n].server.plant(p);
    }

    // ------------------------------------------------------------------
    // Set-up: clients and the fault plan.

    fn make_clients(&mut self) {
        let n = self.opts.clients;
        let tp = self.opts.third_party_clients;
        let end = self.end;
        let mut next_id = 0u64;
        for i in 0..n + tp {
            let third_party = i >= n;
            let ip = if third_party {
                ip4(10, 1, 0, (i - n + 1) as u8)
            } else {
                ip4(10, 0, (i / 200) as u8, (i % 200 + 1) as u8)
            };
            let cfg = SessionConfig {
                rate: 50,
                burst: 10,
                ..SessionConfig::default()
            };
            let session = Session::new(VIP, ip, cfg, self.rng.gen());
            // Profiles: every mapping check-pointed, none, or a mix.
            let profile = self.rng.gen_range(0..3u8);
            let count = self.rng.gen_range(3..=6usize);
            let mut maps = Vec::new();
            for k in 0..count {
                let host = if third_party {
                    ip4(10, 2, (i - n) as u8, (k + 1) as u8)
                } else {
                    ip
                };
                let checkpoint = match profile {
                    0 => true,
                    1 => false,
                    _ => self.rng.gen_bool(0.5),
                };
                let lifetime = if self.rng.gen_bool(0.2) {
                    self.rng.gen_range(20..=60)
                } else {
                    self.rng.gen_range(120..=600)
                };
                let mut nonce = [0u8; 12];
                self.rng.fill(&mut nonce);
                let protocol = if self.rng.gen_bool(0.5) {
                    Protocol::TCP
                } else {
                    Protocol::UDP
                };
                maps.push(MapSpec {
                    id: next_id,
                    host,
                    protocol,
                    port: 1000 + k as u16 * 7 + self.rng.gen_range(0..5u16),
                    nonce,
                    checkpoint,
                    lifetime,
                    in_session: false,
                    deleting: false,
                    lost_told: false,
                    server_expires: 0,
                });
                next_id += 1;
            }
            let idx = self.clients.len();
            for k in 0..maps.len() {
                let start = self.rng.gen_range(1_000..end.clamp(2_000, 120_000));
                self.schedule(start, Ev::Work(Work::Create { client: idx, m: k }));
                if self.rng.gen_bool(0.3) {
                    let del = self
                        .rng
                        .gen_range(start + 5_000..end.max(start + 5_001) + 1);
                    if del < end {
                        self.schedule(del, Ev::Work(Work::Delete { client: idx, m: k }));
                        // Some come back later (a new transaction, same
                        // mapping).
                        if self.rng.gen_bool(0.5) {
                            let again = del + self.rng.gen_range(1_000..60_000);
                            if again < end {
                                self.schedule(again, Ev::Work(Work::Create { client: idx, m: k }));
                            }
                        }
                    }
                }
            }
            if self.rng.gen_bool(0.1) {
                let at = self.rng.gen_range(60_000..end.max(60_001) + 1);
                self.schedule(at, Ev::Work(Work::Depart { client: idx }));
            }
            self.by_ip.insert(ip, idx);
            for m in &maps {
                self.by_nonce.insert(m.nonce, m.key());
            }
            self.clients.push(Client {
                ip,
                third_party,
                session,
                departed: false,
                maps,
                epoch_failures: 0,
                excused_at: None,
                grace_until: 0,
            });
        }
    }

    fn plan_faults(&mut self) {
        let end = self.end;
        let lo = 20_000.min(end / 4);
        let hi = end.saturating_sub(30_000).max(lo + 1);
        let n = self.rng.gen_range(6..=12);
        let kinds = [
            (Fault::PcpLoss, 2),
            (Fault::PcpDelay, 1),
            (Fault::PcpDup, 1),
            (Fault::PcpReorder, 1),
            (Fault::LinkReset, 2),
            (Fault::LinkPartition, 2),
            (Fault::LinkDelay, 2),
            (Fault::CrashActive, 3),
            (Fault::CrashBackup, 2),
            (Fault::FsyncFailure, 1),
            (Fault::PartitionLoss, 1),
            (Fault::BackupRestartLoss, 1),
            (Fault::BackupDiskStall, 1),
        ];
        let total: u32 = kinds.iter().map(|(_, w)| w).sum();
        for _ in 0..n {
            let mut pick = self.rng.gen_range(0..total);
            let mut kind = Fault::PcpLoss;
            for (k, w) in kinds {
                if pick < w {
                    kind = k;
                    break;
                }
                pick -= w;
            }
            let at = self.rng.gen_range(lo..hi);
            self.schedule(at, Ev::Fault(kind, 0));
        }
        // Both nodes down at once, in a good third of the seeds. Drawn from
        // a generator of its own, so that seeds without it run exactly as
        // they did before it was added (a seed a soak once found keeps
        // replaying the same run).
        let mut own = ChaCha8Rng::seed_from_u64(self.opts.seed ^ 0xB07D_0000_D0A1_0001);
        if own.gen_bool(0.4) {
            let at = own.gen_range(lo..hi);
            self.schedule(at, Ev::Fault(Fault::BothDown, 0));
        }
        // An operator clears one subscriber, in a good third of the seeds,
        // from a generator of its own too.
        let mut own = ChaCha8Rng::seed_from_u64(self.opts.seed ^ 0xC1EA_0000_5B5C_0002);
        if own.gen_bool(0.4) {
            let at = own.gen_range(lo..hi);
            self.schedule(at, Ev::Fault(Fault::OperatorClear, 0));
        }
        // The active's dataplane refuses changes for a few seconds, once
        // or twice, in a third of the seeds (every seed with the schedule
        // dataplane-refusal), from the fault's own generator, which also
        // draws everything the fault does after: seeds without it run
        // exactly as they did before it was added.
        if self.opts.enable.contains(&Schedule::DataplaneRefusal) || self.drng.gen_bool(0.35) {
            let n = self.drng.gen_range(1..=2);
            for _ in 0..n {
                let at = self.drng.gen_range(lo..hi);
                self.schedule(at, Ev::Fault(Fault::DataplaneRefusal, 0));
            }
        }
        // Witness mode: one to three freezes of a node's process in every
        // seed, from witness mode's own generator.
        if self.opts.witness {
            let n = self.wrng.gen_range(1..=3);
            for _ in 0..n {
                let at = self.wrng.gen_range(lo..hi);
                self.schedule(at, Ev::Fault(Fault::Freeze, 0));
            }
        }
        let enabled = self.opts.enable.clone();
        let hi = end.saturating_sub(60_000).max(120_001);
        for s in enabled {
            let at = self.rng.gen_range(120_000..hi.clamp(120_001, 400_000));
            let f = match s {
                Schedule::PromoteEmpty => Fault::EmptyCrashBackup,
                Schedule::PartitionedOldActive => Fault::PartitionOldActive,
                Schedule::FrozenOldActive => Fault::FreezeOldActive,
                // Planted above, from its own generator.
                Schedule::DataplaneRefusal => continue,
                Schedule::EtcdSlow => {
                    // Three times, from witness mode's generator (nothing
                    // without a witness).
                    if self.opts.witness {
                        for _ in 0..3 {
                            let at = self.wrng.gen_range(lo..hi);
                            self.schedule(at, Ev::Fault(Fault::EtcdSlow, 0));
                        }
                    }
                    continue;
                }
            };
            self.schedule(at, Ev::Fault(f, 0));
        }
    }

    // ------------------------------------------------------------------
    // The loop.

    /// Runs to the end of the workload.
    pub fn run(&mut self) {
        loop {
            let next_ev = self.queue.peek().map(|Reverse(s)| s.at);
            let next_timer = self.next_timer();
            let next = match (next_ev, next_timer) {
                (Some(a), Some(b)) => a.min(b),
                (Some(a), None) => a,
                (None, Some(b)) => b,
                (None, None) => break,
            };
            if next > self.end {
                break;
            }
            self.now = self.now.max(next);
            self.report.steps += 1;
            if next_ev.is_some_and(|t| t <= self.now) {
                if let Some(Reverse(s)) = self.queue.pop() {
                    self.handle(s.ev);
                }
            } else {
                self.fire_timers();
            }
            self.check();
        }
        self.now = self.end;
    }

    fn next_timer(&self) -> Option<u64> {
        let mut t: Option<u64> = None;
        let mut put = |x: u64| t = Some(t.map_or(x, |y: u64| y.min(x)));
        for c in &self.clients {
            if c.departed {
                continue;
            }
            if let Some(i) = c.session.poll_timeout() {
                put(self.ms_of(i));
            }
        }
        for (i, n) in self.nodes.iter().enumerate() {
            // A frozen process sets no timer: its thaw is an event.
            if !n.up || self.now < n.frozen_until {
                continue;
            }
            if let Some(x) = n.ha.poll_timeout() {
                put(x.0.saturating_sub(T0).max(n.next_timer_floor));
            }
            if let Some(x) = n.server.poll_timeout() {
                // ANNOUNCEs held until the node serves wait for a later
                // event (the daemon's housekeeping polls).
                let held = !(n.ha.serving() && self.fence_allows(i));
                let floor = if held {
                    n.next_timer_floor.max(self.now + 100)
                } else {
                    n.next_timer_floor
                };
                put(x.0.saturating_sub(T0).max(floor));
            }
            if n.link.is_some() && n.ha.role() == Role::Backup {
                put((n.last_rx + link_cfg().dead_after.as_millis() as u64).max(n.next_timer_floor));
            }
        }
        t
    }

    fn fire_timers(&mut self) {
        let now = self.now;
        for c in 0..self.clients.len() {
            if self.clients[c].departed {
                continue;
            }
            let due = self.clients[c]
                .session
                .poll_timeout()
                .is_some_and(|i| self.ms_of(i) <= now);
            if due {
                let at = self.inst(now);
                self.clients[c].session.handle_timeout(at);
                self.client_after(c, None);
            }
        }
        for n in 0..2 {
            if !self.nodes[n].up || self.nodes[n].next_timer_floor > now || self.frozen(n) {
                continue;
            }
            let ts = self.ts();
            let mut fired = false;
            if self.nodes[n].ha.poll_timeout().is_some_and(|t| t <= ts) {
                fired = true;
                self.nodes[n].ha.handle_timeout(ts);
                self.after_ha(n);
                // The daemon's timer task: a silent backup ends the
                // connection, and the active reconnects.
                if self.nodes[n].ha.role() == Role::Active
                    && self.nodes[n].ha.link_down()
                    && self.nodes[n].link.is_some()
                {
                    if let Some(c) = self.nodes[n].link {
                        self.close_conn_side(c, n, true);
                    }
                    self.active_link_ended(n);
                }
            }
            if self.nodes[n].server.poll_timeout().is_some_and(|t| t <= ts) {
                fired = true;
                self.nodes[n].server.handle_timeout(ts);
                self.nodes[n].dirty = true;
                self.submit(n, Reply::default(), None);
                self.send_announcements(n);
            }
            let dead = link_cfg().dead_after.as_millis() as u64;
            if self.nodes[n].ha.role() == Role::Backup
                && self.nodes[n].link.is_some()
                && now >= self.nodes[n].last_rx + dead
            {
                // serve_backup's read timed out: "the active went silent".
                fired = true;
                if let Some(c) = self.nodes[n].link {
                    self.close_conn_side(c, n, true);
                }
                self.nodes[n].ha.link_lost(ts);
                self.after_ha(n);
            }
            if fired {
                // Active::poll_timeout keeps returning an overdue
                // acknowledgement's deadline while the link lags (the
                // daemon's timer task then spins): step at most once per
                // millisecond.
                self.nodes[n].next_timer_floor = now + 1;
            }
        }
    }

    /// Until when `ev` must wait because the process it is for is frozen
    /// (its timers, datagrams and link bytes queue up).
    fn deferred_until(&self, ev: &Ev) -> Option<u64> {
        let frozen = |n: usize| self.frozen(n).then_some(self.nodes[n].frozen_until);
        match ev {
            Ev::ToNode { node, .. }
            | Ev::LinkFailed { node, .. }
            | Ev::ConnectRetry { node, .. }
            | Ev::FsyncDone { node, .. }
            | Ev::ReplicaFsyncDone { node, .. }
            | Ev::Coord { node, .. } => frozen(*node),
            Ev::LinkDeliver { conn, dir } => {
                let c = self.conns.get(conn)?;
                frozen(if *dir == 0 { c.acceptor } else { c.connector })
            }
            Ev::LinkEstablish { conn } => {
                let c = self.conns.get(conn)?;
                frozen(c.connector).max(frozen(c.acceptor))
            }
            Ev::TellTermClose { conn } => frozen(self.conns.get(conn)?.acceptor),
            _ => None,
        }
    }

    fn handle(&mut self, ev: Ev) {
        if let Some(until) = self.deferred_until(&ev) {
            self.schedule(until, ev);
            return;
        }
        match ev {
            Ev::ToVip { client, bytes } => {
                let n = self.vip;
                if self.frozen(n) {
                    // It waits in the frozen node's socket.
                    let gen = self.nodes[n].gen;
                    let at = self.nodes[n].frozen_until;
                    self.schedule(
                        at,
                        Ev::ToNode {
                            node: n,
                            gen,
                            client,
                            bytes,
                        },
                    );
                } else {
                    self.pcp_at(n, client, &bytes);
                }
            }
            Ev::ToNode {
                node,
                gen,
                client,
                bytes,
            } => {
                if self.nodes[node].gen == gen {
                    self.pcp_at(node, client, &bytes);
                }
            }
            Ev::Thaw { node, gen } => {
                if self.nodes[node].gen == gen && self.nodes[node].up {
                    self.trace(format!("node {}: thaws", self.nodes[node].name));
                    // An active that finds its peer active in a later term
                    // was replaced while frozen.
                    let p = Self::other(node);
                    if self.nodes[node].ha.role() == Role::Active
                        && self.nodes[p].up
                        && self.nodes[p].ha.role() == Role::Active
                        && self.nodes[p].ha.term() > self.nodes[node].ha.term()
                    {
                        self.count_fault("freeze-takeover");
                    }
                    self.coord_thawed(node);
                }
            }
            Ev::ToEtcd { node, gen, req } => {
                let now = self.now;
                if let Some(e) = self.etcd.as_mut() {
                    let out = e.handle(node, gen, req, now);
                    self.etcd_out(out);
                }
            }
            Ev::EtcdExpire { lease } => {
                let now = self.now;
                if let Some(e) = self.etcd.as_mut() {
                    let before = e.leader();
                    let out = e.expire(lease, now);
                    let after = e.leader();
                    if before != after {
                        self.trace(format!(
                            "etcd: a lease expired; leader now {}",
                            after.map_or("none", |n| self.nodes[n].name)
                        ));
                    }
                    self.etcd_out(out);
                }
            }
            Ev::FromEtcd { node, gen, resp } => self.coord_answer(node, gen, resp),
            Ev::VipFollow { node, gen } => {
                if self.nodes[node].gen == gen && self.serving_now(node) && self.vip != node {
                    self.vip = node;
                    self.trace(format!(
                        "the address moves to node {}",
                        self.nodes[node].name
                    ));
                }
            }
            Ev::Coord { node, gen, t } => self.coord_timer(node, gen, t),
            Ev::ToHost {
                host,
                bytes,
                handled_at,
            } => {
                let Some(&c) = self.by_ip.get(&host) else {
                    return;
                };
                if self.clients[c].departed {
                    return;
                }
                let at = self.inst(self.now);
                self.clients[c].session.handle_input(at, VIP, &bytes);
                self.client_after(c, Some(handled_at));
            }
            Ev::LinkDeliver { conn, dir } => self.link_deliver(conn, dir),
            Ev::LinkEstablish { conn } => self.link_establish(conn),
            Ev::LinkFailed { node, gen } => {
                if self.nodes[node].gen == gen && self.nodes[node].up {
                    self.nodes[node].connecting = false;
                    self.active_link_ended(node);
                }
            }
            Ev::TellTermClose { conn } => {
                if let Some(c) = self.conns.get(&conn) {
                    let acceptor = c.acceptor;
                    self.close_conn_side(conn, acceptor, false);
                }
            }
            Ev::ConnectRetry { node, gen } => {
                if self.nodes[node].gen == gen {
                    self.try_connect(node);
                }
            }
            Ev::ReplicaFsyncDone { node, gen } => {
                if self.nodes[node].gen == gen && self.nodes[node].up {
                    self.replica_fsync_done(node);
                }
            }
            Ev::FsyncDone { node, gen } => {
                if self.nodes[node].gen == gen && self.nodes[node].up {
                    self.fsync_done(node);
                }
            }
            Ev::Work(w) => self.work(w),
            Ev::Fault(f, attempt) => self.fault(f, attempt),
            Ev::Restart { node, gen } => {
                if self.nodes[node].gen == gen && !self.nodes[node].up {
                    self.restart(node);
                }
            }
            Ev::PromoterAct { early, target } => self.promoter_act(early, target),
        }
    }

    // ------------------------------------------------------------------
    // Clients.

    fn work(&mut self, w: Work) {
        let now = self.now;
        match w {
            Work::Create { client, m } => {
                if self.clients[client].departed || self.clients[client].maps[m].in_session {
                    return;
                }
                if self.clients[client].maps[m].server_expires > 0 {
                    // Made again after its delete: a new mapping, so a new
                    // nonce (RFC 6887 section 11.1 ties a nonce to one
                    // mapping). With the old one, a retransmission of the
                    // delete still in the network would remove the new
                    // mapping, and PCP has no sequence numbers to tell.
                    // Derived, not drawn: the seed's schedule stays as it was.
                    let mut nonce = self.clients[client].maps[m].nonce;
                    for (i, b) in nonce.iter_mut().enumerate() {
                        *b = b.wrapping_add(0x9d ^ i as u8);
                    }
                    let key = self.clients[client].maps[m].key();
                    self.clients[client].maps[m].nonce = nonce;
                    self.by_nonce.insert(nonce, key);
                }
                let c = &mut self.clients[client];
                let spec = c.maps[m].clone();
                let mut b = RequestBuilder::map(spec.protocol, spec.port)
                    .nonce(spec.nonce)
                    .lifetime(spec.lifetime);
                if spec.checkpoint {
                    b = b.checkpoint_required();
                }
                if c.third_party {
                    b = b.third_party(spec.host);
                }
                let at = self.base + Duration::from_millis(now);
                if c.session.insert(at, spec.id, b).is_ok() {
                    c.maps[m].in_session = true;
                }
                self.client_after(client, None);
            }
            Work::Delete { client, m } => {
                let c = &mut self.clients[client];
                if c.departed || !c.maps[m].in_session {
                    return;
                }
                let at = self.base + Duration::from_millis(now);
                let id = c.maps[m].id;
                c.session.remove(at, id);
                c.maps[m].in_session = false;
                c.maps[m].deleting = true;
                let key = c.maps[m].key();
                self.promises.remove(&key);
                self.promises_dirty = true;
                self.client_after(client, None);
            }
            Work::Depart { client } => {
                // The client stops: its mappings expire on the server (its
                // promises hold until then).
                self.clients[client].departed = true;
                self.trace(format!("client {} departs", self.clients[client].ip));
            }
        }
    }

    fn client_after(&mut self, c: usize, handled_at: Option<u64>) {
        while let Some(d) = self.clients[c].session.poll_transmit() {
            self.send_pcp(c, d);
        }
        while let Some(e) = self.clients[c].session.poll_event() {
            if let SessionEvent::Removed { id, .. } = e {
                if let Some(m) = self.clients[c].maps.iter_mut().find(|m| m.id == id) {
                    m.deleting = false;
                }
                continue;
            }
            if let SessionEvent::Granted { id, grant, .. } = e {
                let Some(m) = self.clients[c].maps.iter().position(|m| m.id == id) else {
                    continue;
                };
                let spec = self.clients[c].maps[m].clone();
                let key = spec.key();
                if let Some(h) = handled_at {
                    let exp = h + u64::from(grant.lifetime) * 1000;
                    self.clients[c].maps[m].server_expires = exp;
                    self.clients[c].maps[m].lost_told = false;
                    if self.opts.trace {
                        self.trace(format!(
                            "client {}: {}/{}:{} granted {:?} for {} s (handled at {}.{:03}){}",
                            self.clients[c].ip,
                            key.0,
                            key.1,
                            key.2,
                            grant.external,
                            grant.lifetime,
                            h / 1000,
                            h % 1000,
                            if grant.checkpoint_honoured {
                                ", check-pointed"
                            } else {
                                ""
                            }
                        ));
                    }
                    // A reply made before an operator cleared the
                    // mapping's subscriber promises nothing: the operator
                    // took it away after (failure-scenarios draft 2.6.2).
                    // Nor does one made before the NAT lost the mapping
                    // (`Refused::Lost`): that loss is told by the epoch.
                    let voided = self
                        .cleared
                        .get(&SubscriberKeying::default().subscriber_of(key.0))
                        .is_some_and(|&t| h <= t)
                        || self.nat_lost.get(&key).is_some_and(|&t| h <= t);
                    if grant.checkpoint_honoured && !voided {
                        self.report.checkpoints_promised += 1;
                        self.promises.insert(
                            key,
                            Promise {
                                downgrade_sent: false,
                                nonce: spec.nonce,
                                external: grant.external,
                                expires: exp,
                                client: c,
                            },
                        );
                    } else {
                        self.promises.remove(&key);
                    }
                    self.promises_dirty = true;
                }
            }
        }
        let f = self.clients[c].session.counters().epoch_failures;
        while self.clients[c].epoch_failures < f {
            self.clients[c].epoch_failures += 1;
            self.obligations.retain(|o| o.0 != self.clients[c].ip);
            let now = self.now;
            let cl = &mut self.clients[c];
            if let Some(t) = cl.excused_at.take() {
                if now <= t + EXCUSE_TTL_MS {
                    cl.grace_until = now + EXCUSE_GRACE_MS;
                    continue;
                }
            }
            if now <= cl.grace_until {
                continue;
            }
            let ip = cl.ip;
            self.violation(
                Invariant::Epochs,
                format!(
                    "client {ip}: RFC 6887 s8.5 epoch check failed, but none of its state was lost"
                ),
            );
        }
    }

    fn send_pcp(&mut self, c: usize, d: Vec<u8>) {
        let now = self.now;
        let loss = self.base_loss + self.loss.get(now);
        if self.rng.gen_bool(loss.min(0.95)) {
            return;
        }
        let copies = if self
            .rng
            .gen_bool((self.base_dup + self.dup.get(now)).min(0.9))
        {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let at = now + self.pcp_delay();
            self.schedule(
                at,
                Ev::ToVip {
                    client: c,
                    bytes: d.clone(),
                },
            );
        }
    }

    fn pcp_delay(&mut self) -> u64 {
        let now = self.now;
        let mut d = self.rng.gen_range(1..20u64);
        let r = self.reorder.get(now);
        if r > 0.0 {
            d += self.rng.gen_range(0..r as u64 + 1);
        }
        let x = self.delay.get(now);
        if x > 0.0 {
            d += x as u64 + self.rng.gen_range(0..50);
        }
        d
    }

    fn send_to_host(&mut self, host: IpAddr, bytes: Vec<u8>, handled_at: u64) {
        let now = self.now;
        if self
            .rng
            .gen_bool((self.base_loss + self.loss.get(now)).min(0.95))
        {
            return;
        }
        let copies = if self
            .rng
            .gen_bool((self.base_dup + self.dup.get(now)).min(0.9))
        {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let at = now + self.pcp_delay();
            self.schedule(
                at,
                Ev::ToHost {
                    host,
                    bytes: bytes.clone(),
                    handled_at,
                },
            );
        }
    }

    // ------------------------------------------------------------------
    // Nodes: PCP, the committer, effects.

    fn pcp_at(&mut self, n: usize, client: usize, bytes: &[u8]) {
        // Workers drop datagrams unless the node serves and, with a
        // witness, its lease allows (runtime.rs, `Pair::serving`).
        if !self.nodes[n].up || !self.nodes[n].ha.serving() || !self.fence_allows(n) {
            return;
        }
        let src = SocketAddr::new(self.clients[client].ip, portkeep_proto::CLIENT_PORT);
        let ts = self.ts();
        let mut out = Vec::new();
        let node = &mut self.nodes[n];
        let outcome = node.server.handle(ts, src, bytes, &mut out);
        node.dirty = true;
        let mut reply = Reply {
            handled_at: self.now,
            ..Reply::default()
        };
        if outcome == Outcome::Reply {
            reply.out.push((src.ip(), out));
        }
        self.submit(n, reply, None);
    }

    /// Whether the ANNOUNCE `bytes`, sent at `now` for a loss found at
    /// `since`, carries an epoch that restarted then (within rounding): the
    /// most an epoch can say. One that did not restart tells the client
    /// nothing (RFC 6887 section 14.1.3: it re-creates only on an epoch
    /// outside the expected range).
    fn announce_shows_reset(bytes: &[u8], now: u64, since: u64) -> bool {
        portkeep_proto::Response::parse(bytes, &portkeep_proto::CodePoints::default())
            .is_ok_and(|r| u64::from(r.header.epoch) <= now.saturating_sub(since) / 1000 + 2)
    }

    /// `Shared::submit`: the core's changes and the replies that depend on
    /// them queue for the committer, in log order.
    fn submit(&mut self, n: usize, reply: Reply, reset: Option<Restored>) {
        self.submit_after(n, reply, reset, 0);
    }

    fn submit_after(&mut self, n: usize, reply: Reply, reset: Option<Restored>, after: u64) {
        let node = &mut self.nodes[n];
        let changes: Vec<ChangeRecord> = node.server.drain_changes().collect();
        let volatile = if changes.is_empty() || reset.is_some() {
            let _ = node.server.drain_volatile();
            Vec::new()
        } else {
            node.server.drain_volatile()
        };
        if !changes.is_empty() {
            self.shadow_apply(n, &changes);
        }
        let node = &mut self.nodes[n];
        if changes.is_empty() && reply.out.is_empty() && reset.is_none() {
            return;
        }
        node.store.queue.push_back(Job {
            changes,
            volatile,
            reply,
            reset,
            after,
        });
        self.maybe_fsync(n);
    }

    /// Rebuilds the shadow from the real table (after the core was
    /// replaced, and every virtual second).
    fn resync(&mut self, n: usize) {
        let node = &mut self.nodes[n];
        node.shadow.clear();
        node.owners.clear();
        node.dirty = true;
        let all = node.server.mappings();
        self.shadow_insert(n, all.iter());
    }

    fn shadow_apply(&mut self, n: usize, changes: &[ChangeRecord]) {
        for c in changes {
            match &c.change {
                Change::Upserted(m) => self.shadow_insert(n, std::iter::once(m)),
                Change::Removed { mapping: m, .. } if m.kind == MappingKind::Map => {
                    let key = (m.key.internal_ip, m.key.protocol.0, m.key.internal_port);
                    let node = &mut self.nodes[n];
                    if let Some((_, ext, _)) = node.shadow.remove(&key) {
                        if let Some(v) = node.owners.get_mut(&(key.1, ext)) {
                            v.retain(|(k, _)| *k != key);
                        }
                    }
                    node.dirty = true;
                }
                _ => {}
            }
        }
    }

    fn shadow_insert<'a>(&mut self, n: usize, ms: impl Iterator<Item = &'a MappingRecord>) {
        let mut clash = None;
        let node = &mut self.nodes[n];
        for m in ms {
            if m.kind != MappingKind::Map {
                continue;
            }
            let key = (m.key.internal_ip, m.key.protocol.0, m.key.internal_port);
            if let Some((_, ext, _)) = node.shadow.insert(key, (m.nonce, m.external, m.subscriber))
            {
                if let Some(v) = node.owners.get_mut(&(key.1, ext)) {
                    v.retain(|(k, _)| *k != key);
                }
            }
            let v = node.owners.entry((key.1, m.external)).or_default();
            if v.iter().any(|(_, s)| *s != m.subscriber) {
                clash = Some((key.1, m.external));
            }
            v.push((key, m.subscriber));
            node.dirty = true;
        }
        if let Some((p, e)) = clash {
            let what = format!(
                "node {}: external {p}/{e} held by two subscribers",
                self.nodes[n].name
            );
            self.violation(Invariant::UniqueExternal, what);
        }
    }

    fn maybe_fsync(&mut self, n: usize) {
        let node = &mut self.nodes[n];
        if node.store.syncing.is_some() || node.store.queue.is_empty() {
            return;
        }
        // Group commit: everything queued while the last fsync ran.
        let jobs: Vec<Job> = node.store.queue.drain(..).collect();
        node.store.syncing = Some(jobs);
        let gen = node.gen;
        let d = self.rng.gen_range(2..=8);
        self.schedule(self.now + d, Ev::FsyncDone { node: n, gen });
    }

    fn maybe_replica_fsync(&mut self, n: usize) {
        let r = &mut self.nodes[n].replica;
        if r.syncing.is_some() || r.queue.is_empty() {
            return;
        }
        r.syncing = Some(std::mem::take(&mut r.queue));
        let gen = self.nodes[n].gen;
        let d = if self.now < self.nodes[n].replica_stall_until {
            self.rng.gen_range(1_000..6_000)
        } else {
            self.rng.gen_range(2..=8)
        };
        self.schedule(self.now + d, Ev::ReplicaFsyncDone { node: n, gen });
    }

    /// The backup's writes are durable: only now is their last position
    /// acknowledged (RFC 7767 section 3.2).
    fn replica_fsync_done(&mut self, n: usize) {
        let Some(writes) = self.nodes[n].replica.syncing.take() else {
            return;
        };
        let mut last = None;
        let r = &mut self.nodes[n].replica;
        for (seq, w) in writes {
            r.durable.get_or_insert_with(Replica::default).apply(w);
            last = Some(seq);
        }
        if let Some(seq) = last {
            self.nodes[n].ha.persisted(seq);
        }
        self.after_ha(n);
        self.maybe_replica_fsync(n);
    }

    fn fsync_done(&mut self, n: usize) {
        let p = Self::other(n);
        let peer_ready = self.nodes[p].up
            && self.nodes[p].ha.role() == Role::Backup
            && self.nodes[p].ever_synced;
        // An armed failure waits (in the default faults) until losing
        // this node leaves a synced backup to promote.
        if self.nodes[n].fail_next_fsync && (peer_ready || !self.guards) {
            // The store failed: the daemon stops (fail-stop), sending no
            // reply for what is not stored.
            self.nodes[n].fail_next_fsync = false;
            self.trace(format!(
                "node {}: fsync failed: fail-stop",
                self.nodes[n].name
            ));
            self.crash(n);
            return;
        }
        let Some(jobs) = self.nodes[n].store.syncing.take() else {
            return;
        };
        let ts = self.ts();
        let mut segment: Vec<(Reply, portkeep_ha::JobMeta)> = Vec::new();
        // Only while a `dataplane-refusal` window is open: the changes of
        // the segment, and whether the dataplane held each changed mapping
        // before it (the store is applied in the same order).
        let refusing = {
            let (until, _, gen) = self.nodes[n].refusing;
            self.now < until && gen == self.nodes[n].gen
        };
        let mut applied: Vec<ChangeRecord> = Vec::new();
        let mut installed: HashMap<Vec<u8>, bool> = HashMap::new();
        for mut job in jobs {
            if let Some(r) = job.reset.take() {
                let mut seg = std::mem::take(&mut segment);
                if refusing {
                    self.dataplane_apply(n, &applied, &installed, &mut seg);
                    applied.clear();
                    installed.clear();
                }
                self.commit_segment(n, seg, ts);
                self.nodes[n].store.replace(&r);
            }
            let node = &mut self.nodes[n];
            if refusing {
                for c in &job.changes {
                    if let Change::Upserted(m) = &c.change {
                        let k = key_of(m);
                        let held = node.store.maps.contains_key(&k);
                        installed.entry(k).or_insert(held);
                    }
                }
                applied.extend(job.changes.iter().cloned());
            }
            node.store.apply(&job.changes);
            let mut meta = node
                .ha
                .prepare(&job.changes, std::mem::take(&mut job.volatile))
                .after(job.after);
            if !job.reply.out.is_empty() {
                meta = meta.made_at(Timestamp(T0 + job.reply.handled_at));
            }
            segment.push((job.reply, meta));
        }
        if refusing {
            self.dataplane_apply(n, &applied, &installed, &mut segment);
        }
        self.commit_segment(n, segment, ts);
        self.maybe_fsync(n);
    }

    fn commit_segment(&mut self, n: usize, seg: Vec<(Reply, portkeep_ha::JobMeta)>, ts: Timestamp) {
        if seg.is_empty() {
            return;
        }
        let before = self.nodes[n].ha.stats().extensions_unawaited;
        self.nodes[n].ha.handle_commit(ts, seg);
        let after = self.nodes[n].ha.stats().extensions_unawaited;
        self.report.extensions_unawaited += after.saturating_sub(before);
        self.after_ha(n);
    }

    /// The dataplane of the daemon's committer while a `dataplane-refusal`
    /// window is open (`node.rs`: `commit`, then `Shared::undo_failed`):
    /// the segment's changes are applied once stored, before the node
    /// commits them (it replicates them as they were). Some changed
    /// mappings are refused: one the dataplane held before the segment is
    /// kept as it was (`Refused::Kept`) or was lost by the NAT
    /// (`Refused::Lost`), one it did not hold is not installed
    /// (`Refused::NotInstalled`). The core decides what that leaves
    /// (`Server::refused`); every reply of the segment that grants a
    /// refused mapping becomes NETWORK_FAILURE (RFC 6887 section 7.4), with
    /// the epoch its client now sees and without CHECKPOINT_REQUIRED; the
    /// removals the core made are committed in the next round.
    fn dataplane_apply(
        &mut self,
        n: usize,
        changes: &[ChangeRecord],
        installed: &HashMap<Vec<u8>, bool>,
        seg: &mut [(Reply, portkeep_ha::JobMeta)],
    ) {
        let ts = self.ts();
        let p = self.nodes[n].refusing.1;
        // One fate per mapping and batch, as the nftables dataplane gives
        // (its changes in one batch load together).
        let mut fate: HashMap<Vec<u8>, Option<Refused>> = HashMap::new();
        let mut undone: Vec<(Nonce, Protocol, u16)> = Vec::new();
        for c in changes {
            let Change::Upserted(m) = &c.change else {
                continue;
            };
            let k = key_of(m);
            let how = match fate.get(&k) {
                Some(h) => *h,
                None => {
                    let h = if !self.drng.gen_bool(p) {
                        None
                    } else if !installed.get(&k).copied().unwrap_or(false) {
                        Some(Refused::NotInstalled)
                    } else if self.drng.gen_bool(0.3) {
                        Some(Refused::Lost)
                    } else {
                        Some(Refused::Kept)
                    };
                    fate.insert(k, h);
                    h
                }
            };
            let Some(how) = how else {
                continue;
            };
            if self.refuse(n, m, how) {
                undone.push((m.nonce, m.key.protocol, m.key.internal_port));
            }
        }
        if undone.is_empty() {
            return;
        }
        let node = &mut self.nodes[n];
        let server = &node.server;
        let cfg = server.config();
        let cp = cfg.code_points;
        let lifetime = cfg.short_error_lifetime;
        // The batch's replies, and those of jobs handled since and still
        // queued (a retransmission answered from the state the refusal
        // just took back), as the daemon's committer does.
        let queued = node.store.queue.iter_mut().map(|j| &mut j.reply);
        for reply in seg.iter_mut().map(|(r, _)| r).chain(queued) {
            let out = std::mem::take(&mut reply.out);
            reply.out = out
                .into_iter()
                .filter_map(|(h, b)| {
                    let epoch = server.requester_epoch(ts, h);
                    network_failure(&b, &cp, lifetime, epoch, &undone).map(|b| (h, b))
                })
                .collect();
        }
        self.nodes[n].dirty = true;
        self.submit(n, Reply::default(), None);
    }

    /// `Server::refused` for one change the dataplane refused, held to what
    /// the dataplane says (invariant 7): after `Kept` the core still holds
    /// the mapping the NAT forwards, after `NotInstalled` or `Lost` it
    /// holds it no more; only `Lost` moves epochs: its subscriber's
    /// restarts (and its THIRD_PARTY manager's), nobody else's, and its
    /// host is owed an ANNOUNCE. Whether the core took the change back.
    fn refuse(&mut self, n: usize, m: &MappingRecord, how: Refused) -> bool {
        let ts = self.ts();
        let keying = SubscriberKeying::default();
        let sub = keying.subscriber_of(m.key.internal_ip);
        let epochs = |w: &World| -> Vec<u32> {
            w.clients
                .iter()
                .map(|c| w.nodes[n].server.requester_epoch(ts, c.ip))
                .collect()
        };
        let before = epochs(self);
        if !self.nodes[n]
            .server
            .refused(ts, &m.key, m.kind, m.nonce, how)
        {
            return false;
        }
        self.nodes[n].dirty = true;
        if how == Refused::Lost {
            // As the daemon's committer: replies made before the loss are
            // made again at their release (`Node::cleared`).
            self.nodes[n].ha.cleared(ts);
        }
        match how {
            Refused::Kept => self.report.refused_kept += 1,
            Refused::NotInstalled => self.report.refused_not_installed += 1,
            Refused::Lost => self.report.refused_lost += 1,
        }
        let name = self.nodes[n].name;
        let what = format!(
            "{}/{}:{}",
            m.key.internal_ip, m.key.protocol.0, m.key.internal_port
        );
        self.trace(format!(
            "node {name}: the dataplane refused a change of {what} ({how:?})"
        ));
        let server = &self.nodes[n].server;
        let holds = server.mappings().iter().any(|r| {
            r.kind == m.kind && r.key == m.key && r.nonce == m.nonce && r.external == m.external
        });
        let after = epochs(self);
        let moved: Vec<usize> = (0..self.clients.len())
            .filter(|&c| before[c] != after[c])
            .collect();
        let mut wrong = Vec::new();
        if holds != (how == Refused::Kept) {
            wrong.push(format!(
                "the NAT {} it, the core {}",
                if how == Refused::Kept {
                    "holds"
                } else {
                    "does not hold"
                },
                if holds { "does" } else { "does not" }
            ));
        }
        if how == Refused::Lost {
            if server.epoch_of(ts, Some(sub)) != 0 {
                wrong.push(format!("subscriber {sub}'s epoch did not restart"));
            }
            let owed = server
                .owed_announces(ts)
                .iter()
                .any(|(s, hosts, _)| *s == sub && hosts.contains(&m.key.internal_ip));
            if !owed {
                wrong.push("its host is owed no ANNOUNCE".to_owned());
            }
        }
        let stray: Vec<IpAddr> = moved
            .iter()
            .map(|&c| self.clients[c].ip)
            .filter(|ip| {
                how != Refused::Lost || (keying.subscriber_of(*ip) != sub && m.manager != Some(*ip))
            })
            .collect();
        if !stray.is_empty() {
            wrong.push(format!("the epochs of {stray:?} moved"));
        }
        for w in wrong {
            let line = format!("node {name}: the dataplane refused {what} ({how:?}): {w}");
            self.violation(Invariant::Dataplane, line);
        }
        if how == Refused::Lost {
            self.nat_lost(n, m);
        }
        true
    }

    /// Node `n`'s NAT lost mapping `m` (`Refused::Lost`): every client with
    /// that mapping, or whose epoch restarted with it (the host's own, the
    /// THIRD_PARTY client managing it), lost state, so its epoch check may
    /// fail; a loss its check cannot see must be told by an ANNOUNCE whose
    /// epoch restarted (as after an operator's clear).
    fn nat_lost(&mut self, n: usize, m: &MappingRecord) {
        let now = self.now;
        let ts = self.ts();
        let keying = SubscriberKeying::default();
        let sub = keying.subscriber_of(m.key.internal_ip);
        let key: MapKey = (m.key.internal_ip, m.key.protocol.0, m.key.internal_port);
        if m.kind == MappingKind::Map {
            self.nat_lost.insert(key, now);
            if self.promises.get(&key).is_some_and(|p| p.nonce == m.nonce) {
                self.promises.remove(&key);
                self.promises_dirty = true;
            }
        }
        for c in 0..self.clients.len() {
            if self.clients[c].departed {
                continue;
            }
            let hit: Vec<usize> = (0..self.clients[c].maps.len())
                .filter(|&i| {
                    let s = &self.clients[c].maps[i];
                    m.kind == MappingKind::Map && s.key() == key && s.nonce == m.nonce
                })
                .collect();
            let ip = self.clients[c].ip;
            let own = !self.clients[c].third_party && keying.subscriber_of(ip) == sub;
            if hit.is_empty() && !own && m.manager != Some(ip) {
                continue;
            }
            self.client_lost(n, c, &hit, ts);
        }
    }

    /// Client `c` lost state on node `n` (its mappings `hit`, or only its
    /// epoch): its next failed epoch check is excused, and if it held a
    /// lost mapping its check cannot see the loss, node `n` owes it an
    /// ANNOUNCE that shows it (RFC 6887 section 14.1.3) within
    /// [`ANNOUNCE_DEADLINE_MS`].
    fn client_lost(&mut self, n: usize, c: usize, hit: &[usize], ts: Timestamp) {
        let now = self.now;
        let held = hit.iter().any(|&i| {
            let m = &self.clients[c].maps[i];
            m.in_session && self.clients[c].session.grant(m.id).is_some()
        });
        for &i in hit {
            self.clients[c].maps[i].lost_told = true;
        }
        self.clients[c].excused_at = Some(now);
        if !held {
            return;
        }
        let cl = &self.clients[c];
        let visible = match cl.session.epoch() {
            Some((e, t)) => EpochTracker::resume(e, t)
                .observe(
                    self.inst(now),
                    self.nodes[n].server.requester_epoch(ts, cl.ip),
                )
                .is_invalid(),
            None => true,
        };
        if !visible {
            self.obligations
                .push((cl.ip, now + ANNOUNCE_DEADLINE_MS, n, now));
        }
    }

    /// Executes the node's effects, then moves its link bytes.
    fn after_ha(&mut self, n: usize) {
        let resumes = self.nodes[n].ha.active().map_or(0, |a| a.resumes());
        if resumes > self.nodes[n].resumes_seen {
            self.report.resumes += resumes - self.nodes[n].resumes_seen;
            self.nodes[n].resumes_seen = resumes;
            let line = format!(
                "node {}: the backup caught up from its position (no snapshot)",
                self.nodes[n].name
            );
            self.trace(line);
        }
        while let Some(e) = self.nodes[n].ha.poll_effect() {
            match e {
                Effect::Release(r) => self.release(n, r),
                Effect::ReleaseAged { reply, waited_ms } => {
                    if !self.fence_allows(n) {
                        // Nothing leaves that the lease no longer
                        // allows (`node.rs`, `send_committed`).
                        continue;
                    }
                    if !reply.out.is_empty() {
                        self.check_wait(n, reply.handled_at);
                    }
                    let now = self.ts();
                    let server = &self.nodes[n].server;
                    let out = reply
                        .out
                        .into_iter()
                        .filter_map(|(h, b)| server.restamp(now, h, &b, waited_ms).map(|b| (h, b)))
                        .collect();
                    // As if handled when its lifetime was cut to: what the
                    // client is told expires when the server's mapping does.
                    let r = Reply {
                        handled_at: reply.handled_at + waited_ms.div_ceil(1000) * 1000,
                        out,
                        announce: reply.announce,
                    };
                    self.release(n, r);
                }
                Effect::Rewrite {
                    reply,
                    grants,
                    after,
                } => self.reject(n, reply, &grants, after),
                Effect::BackupState(s) => {
                    self.nodes[n].server.set_backup_state(s);
                    if s == BackupState::InSync {
                        self.trace(format!("node {}: backup in sync", self.nodes[n].name));
                    }
                }
                Effect::NeedSnapshot => {
                    let node = &self.nodes[n];
                    let src = SnapshotSource {
                        term: node.ha.term(),
                        seq: node.server.last_seq(),
                        anchor: node.server.anchor(),
                        subscriber_anchors: node.server.subscriber_anchors(),
                        mappings: node.server.replicated_mappings(),
                        volatile: node.server.volatile_hosts(),
                        owed: node.server.owed_announces(self.ts()),
                        requesters: node.server.requesters(),
                        holds: node.server.port_holds(),
                        version: node.ha.peer_version(),
                    };
                    let ts = self.ts();
                    let line = format!(
                        "node {}: snapshot of {} check-pointed mappings at seq {} (of {} mappings)",
                        node.name,
                        src.mappings.len(),
                        src.seq,
                        node.server.mapping_count()
                    );
                    self.trace(line);
                    let part = self.nodes[n].ha.snapshot_part();
                    self.nodes[n].ha.send_snapshot(ts, src.encode(part));
                }
                Effect::PersistTerm(t) => {
                    // A synchronous durable write in the daemon.
                    self.nodes[n].term = self.nodes[n].term.max(t);
                }
                Effect::Deposed { term } => {
                    if self.nodes[n].was_serving {
                        self.last_served = self.table(n);
                    }
                    self.trace(format!(
                        "node {}: deposed by term {term}: state dropped, now backup",
                        self.nodes[n].name
                    ));
                    self.stand_down(n);
                }
                Effect::Persist { seq, write } => {
                    self.nodes[n].replica.queue.push((seq, write));
                    self.maybe_replica_fsync(n);
                }
                Effect::HandedOver {
                    term,
                    held,
                    peer_holds,
                } => {
                    self.trace(format!(
                        "node {}: handed over in term {term}: it held position {held}, its backup {peer_holds}; now backup",
                        self.nodes[n].name
                    ));
                    self.report.handovers += 1;
                    // The handover goes out before the connection closes.
                    self.pump(n);
                    self.stand_down(n);
                }
                Effect::TakeOver => {
                    // keepalived's check script moves the address to the
                    // node that serves (with a witness, once it serves:
                    // the coordinator decides that).
                    self.trace(format!(
                        "node {}: handed the service by its active",
                        self.nodes[n].name
                    ));
                    if !self.opts.witness {
                        self.vip = n;
                    }
                    self.promote(n);
                }
            }
        }
        if let Some(b) = self.nodes[n].ha.backup() {
            if b.in_sync() && !self.nodes[n].ever_synced {
                self.nodes[n].ever_synced = true;
            }
        }
        self.pump(n);
    }

    /// What the daemon does when its node stops being active: an empty
    /// core, store, replica and dataplane; the link it streamed on ends
    /// (as a backup it waits for the active's).
    fn stand_down(&mut self, n: usize) {
        let cfg = self.server_cfg(n);
        let ts = self.ts();
        self.nodes[n].server = Server::new(cfg, ts);
        self.plant(n);
        self.nodes[n].replica = ReplicaDisk::default();
        // An empty backup now: it has not synced since (the guards ask
        // that of a backup before its active is lost). In the default
        // faults a node only stands down after a restart, which resets
        // this too; with a witness a frozen holder is deposed without one.
        self.nodes[n].ever_synced = false;
        self.resync(n);
        let empty = Restored {
            anchor: ts,
            ..Restored::default()
        };
        self.submit(n, Reply::default(), Some(empty));
        if let Some(c) = self.nodes[n].link {
            self.close_conn_side(c, n, false);
        }
        self.nodes[n].connecting = false;
    }

    fn release(&mut self, n: usize, r: Reply) {
        if r.out.is_empty() {
            return;
        }
        if !self.fence_allows(n) {
            // The fence is read again as replies leave: a node frozen
            // after their commit, woken after its lease ran out, sends
            // none of them (`node.rs`, `send_committed`).
            return;
        }
        if self.opts.witness {
            self.note_answer(n);
        }
        self.check_wait(n, r.handled_at);
        let term = self.nodes[n].ha.term();
        if term < self.max_term_sent {
            let what = format!(
                "node {} sent a reply in term {term} after one in term {} left",
                self.nodes[n].name, self.max_term_sent
            );
            self.violation(Invariant::OneServer, what);
        }
        self.max_term_sent = self.max_term_sent.max(term);
        for (host, bytes) in r.out {
            if r.announce {
                // An ANNOUNCE discharges the obligation only if its epoch
                // shows the loss to the client's section 8.5 check: one
                // carrying an epoch that did not reset tells nothing.
                let now = self.now;
                let shows = |since: u64| Self::announce_shows_reset(&bytes, now, since);
                self.obligations.retain(|o| o.0 != host || !shows(o.3));
            } else {
                self.note_downgrade(&bytes);
            }
            self.send_to_host(host, bytes, r.handled_at);
        }
    }

    /// A success without CHECKPOINT_REQUIRED for a mapping the client
    /// holds a promise for: the server told it the check-point is gone.
    fn note_downgrade(&mut self, bytes: &[u8]) {
        let cp = portkeep_proto::CodePoints::default();
        let Ok(r) = portkeep_proto::Response::parse(bytes, &cp) else {
            return;
        };
        if r.header.result != portkeep_proto::ResultCode::SUCCESS || r.checkpoint_honoured() {
            return;
        }
        let Some(m) = r.data.map_part() else {
            return;
        };
        let Some(key) = self.by_nonce.get(&m.nonce) else {
            return;
        };
        if let Some(p) = self.promises.get_mut(key) {
            if p.nonce == m.nonce {
                p.downgrade_sent = true;
            }
        }
    }

    /// `ha::reject`: the mappings lose their flag (a stored change), and
    /// the replies leave without the option behind that change.
    fn reject(&mut self, n: usize, reply: Reply, grants: &[Grant], after: u64) {
        let node = &mut self.nodes[n];
        for g in grants {
            node.server.unflag(&g.key, g.kind, g.nonce);
        }
        node.dirty = true;
        let cp = node.server.config().code_points;
        let out = reply
            .out
            .into_iter()
            .filter_map(|(h, b)| strip_checkpoint(&b, &cp).map(|b| (h, b)))
            .collect();
        let r = Reply {
            handled_at: reply.handled_at,
            out,
            announce: reply.announce,
        };
        self.submit_after(n, r, None, after);
    }

    /// `Shared::send_announcements`: the ANNOUNCEs the core says are due,
    /// queued behind the changes that caused them; those to everyone reach
    /// every client (multicast on the clients' segment). A node that does
    /// not serve sends none: a backup forgets what was scheduled, an
    /// active node not serving yet keeps them.
    fn send_announcements(&mut self, n: usize) {
        let ts = self.ts();
        if !self.nodes[n].ha.serving() || !self.fence_allows(n) {
            if self.nodes[n].ha.role() == Role::Backup {
                self.nodes[n].server.stop_announcing();
            }
            return;
        }
        let due = self.nodes[n].server.poll_announcements(ts);
        if due.is_empty() {
            return;
        }
        let mut r = Reply {
            handled_at: self.now,
            out: Vec::new(),
            announce: true,
        };
        for a in due {
            match a {
                Announcement::Unicast { to, bytes } => r.out.push((to.ip(), bytes)),
                Announcement::Everyone { bytes } => {
                    for c in self.clients.iter().filter(|c| !c.departed) {
                        r.out.push((c.ip, bytes.clone()));
                    }
                }
            }
        }
        self.submit(n, r, None);
    }

    // ------------------------------------------------------------------
    // Life and death of nodes.

    fn start_node(&mut self, n: usize) {
        let ts = self.ts();
        let cfg = self.server_cfg(n);
        let ncfg = self.node_cfg(self.nodes[n].cfg_role);
        let node = &mut self.nodes[n];
        node.up = true;
        node.gen += 1;
        node.ha = Node::new(ncfg, node.term, SubscriberKeying::default());
        node.resumes_seen = 0;
        if node.cfg_role != Role::Backup {
            // The daemon clears the replica of a node that starts in
            // another role.
            node.replica = ReplicaDisk::default();
        } else if let Some(r) = node.replica.durable.clone() {
            // The daemon's backup starts from its stored replica.
            node.ha.resume_replica(r);
        } else if node.store.exists && node.store.last_seq > 0 {
            // It served last (a backup's store is emptied when it is
            // deposed): what it served is what it can vouch for.
            node.ha
                .resume_replica(Replica::of_served(&node.store.restored()));
        }
        node.link = None;
        node.connecting = false;
        node.ever_synced = false;
        node.dirty = true;
        node.was_serving = false;
        node.takeover = None;
        node.next_timer_floor = 0;
        if node.cfg_role == Role::Active && node.store.exists {
            node.ha.set_position(portkeep_ha::Position {
                term: node.store.term,
                seq: node.store.last_seq,
            });
            let (mut server, _) = Server::restore(cfg, ts, node.store.restored());
            // Expiries found while restoring are stored before serving.
            let changes: Vec<ChangeRecord> = server.drain_changes().collect();
            node.store.apply(&changes);
            // The restore scheduled an ANNOUNCE to whoever lost a mapping
            // in it, sent once this node serves.
            node.server = server;
        } else {
            if !node.store.exists {
                node.store.exists = true;
                node.store.anchor = ts;
            }
            node.server = Server::new(cfg, ts);
        }
        if node.cfg_role == Role::Active {
            // RFC 7767 section 3.2: nothing is honoured until the backup
            // is in sync.
            node.server.set_backup_state(BackupState::Disconnected);
        }
        let name = node.name;
        let role = node.cfg_role;
        let term = node.term;
        self.plant(n);
        self.trace(format!(
            "node {name}: starts as {} in term {term}",
            role.as_str()
        ));
        self.resync(n);
        self.send_announcements(n);
        if role == Role::Active {
            self.try_connect(n);
        }
        if self.opts.witness {
            // The daemon starts its coordinator at once (`run`).
            self.nodes[n].coord = Some(Coord::new());
            self.coord_sleep(n, 0);
        }
    }

    fn crash(&mut self, n: usize) {
        if !self.nodes[n].up {
            // Already down: its return stays as scheduled.
            return;
        }
        let holder = self.vip == n && self.nodes[n].ha.role() == Role::Active;
        let node = &mut self.nodes[n];
        node.up = false;
        node.gen += 1;
        node.frozen_until = 0;
        node.coord = None;
        node.holder_at_crash = holder;
        node.fail_next_fsync = false;
        node.store.queue.clear();
        node.store.syncing = None;
        node.replica.queue.clear();
        node.replica.syncing = None;
        node.link = None;
        node.connecting = false;
        let ids: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.connector == n || c.acceptor == n)
            .map(|(id, _)| *id)
            .collect();
        let partitioned = self.partitioned();
        let now = self.now;
        for id in ids {
            // A machine that dies sends no FIN: the peer finds out by its
            // own timeouts. What it wrote and had not yet put on the wire
            // dies with it: a segment leaves the sender 1 ms before it
            // arrives (a link-delay window's extra latency is the sender's
            // socket buffer filling on a slow path), and across a partition
            // nothing written since has left (TCP would retransmit it).
            if let Some(c) = self.conns.get_mut(&id) {
                let side = usize::from(c.acceptor == n);
                c.open[side] = false;
                c.q[1 - side].clear();
                c.bytes[1 - side] = 0;
                if partitioned {
                    c.q[side].clear();
                } else {
                    c.q[side].retain(|(t, _)| t.saturating_sub(1) <= now);
                }
                c.bytes[side] = c.q[side]
                    .iter()
                    .map(|(_, seg)| seg.as_ref().map_or(0, Vec::len))
                    .sum();
            }
            self.gc_conn(id);
        }
        let name = self.nodes[n].name;
        self.trace(format!("node {name}: down"));
        let down = self.rng.gen_range(1_000..20_000);
        let gen = self.nodes[n].gen;
        self.schedule(self.now + down, Ev::Restart { node: n, gen });
        if holder {
            self.holder_lost();
        }
    }

    /// keepalived notices the holder is gone (dead or frozen) and its
    /// promoter acts, early or late. With a witness nobody does: the lease
    /// expires.
    fn holder_lost(&mut self) {
        if !self.promoter_pending && !self.opts.witness {
            self.promoter_pending = true;
            let early = self.rng.gen_bool(0.4);
            let dead = link_cfg().dead_after.as_millis() as u64;
            let d = if early {
                self.rng.gen_range(50..dead - 100)
            } else {
                dead + self.rng.gen_range(200..3_000)
            };
            self.schedule(
                self.now + d,
                Ev::PromoterAct {
                    early,
                    target: None,
                },
            );
        }
    }

    fn restart(&mut self, n: usize) {
        // After a double failure the node comes back whatever its peer
        // does, unless the link is cut too (without a witness a partition
        // then is split brain: the partitioned-old-active schedule).
        let both_down = self.nodes[n].both_down && self.now >= self.partition_until;
        if both_down {
            self.nodes[n].both_down = false;
        }
        if self.guards && !both_down && self.nodes[n].cfg_role == Role::Active {
            // A node configured active learns whether it was deposed at
            // its first contact; without one it serves what it stored. An
            // operator (or keepalived) brings it back only when the peer
            // serves and can be reached (the named schedules lift this).
            let p = Self::other(n);
            let ok =
                self.nodes[p].up && self.nodes[p].ha.serving() && self.now >= self.partition_until;
            if !ok {
                let gen = self.nodes[n].gen;
                self.schedule(self.now + 500, Ev::Restart { node: n, gen });
                return;
            }
        }
        if self.nodes[n].holder_at_crash {
            self.count_fault("old-active-return");
            self.nodes[n].holder_at_crash = false;
        }
        self.start_node(n);
    }

    fn promoter_act(&mut self, early: bool, target: Option<usize>) {
        let holder = self.vip;
        if target.is_none()
            && self.nodes[holder].up
            && self.nodes[holder].ha.role() == Role::Active
            && !self.frozen(holder)
        {
            // The old active came back first: keepalived sees it again.
            self.promoter_pending = false;
            return;
        }
        let candidates: Vec<usize> = match target {
            Some(t) => vec![t],
            None => vec![Self::other(holder), holder],
        };
        // A node that refuses (it handed the service to a fresher peer) is
        // passed over, as keepalived's check script moves the address on.
        let pick = candidates.into_iter().find(|&c| {
            self.nodes[c].up
                && !self.frozen(c)
                && self.nodes[c].ha.role() == Role::Backup
                && self.nodes[c].ha.promotion_term().is_ok()
        });
        let Some(c) = pick else {
            // Nobody to promote yet: keepalived keeps trying.
            self.schedule(self.now + 500, Ev::PromoterAct { early, target });
            return;
        };
        self.promoter_pending = false;
        if target.is_none() {
            self.count_fault(if early {
                "promote-early"
            } else {
                "promote-late"
            });
        }
        self.vip = c;
        self.promote(c);
    }

    /// `ha::promote`: persist the next term, take over, restore the core
    /// from the replica, replace the store, ANNOUNCE to the hosts that
    /// lost state.
    fn promote(&mut self, n: usize) {
        let ts = self.ts();
        let Ok(term) = self.nodes[n].ha.promotion_term() else {
            return;
        };
        self.nodes[n].term = term;
        let Ok(t) = self.nodes[n].ha.promote(ts) else {
            return;
        };
        // Cleared before serving: a replica resumed later would vouch for
        // check-points this node, once active, may have dropped since.
        self.nodes[n].replica = ReplicaDisk::default();
        self.nodes[n].resumes_seen = 0;
        self.report.takeovers += 1;
        let cfg = self.server_cfg(n);
        let state = t.state.clone();
        let (mut server, report) = Server::restore_replica(cfg, ts, state.clone());
        let targets = t.announce_targets(&report.dropped);
        server.owe_announce(ts, &targets);
        if matches!(t.kind, TakeoverKind::Cold | TakeoverKind::Stale) {
            server.announce_everyone(ts);
        }
        let name = self.nodes[n].name;
        self.trace(format!(
            "node {name}: promoted to term {} ({:?}, {} mappings, {} hosts to announce to, {} owed since an earlier loss)",
            t.term,
            t.kind,
            report.restored,
            targets.len(),
            t.state.owed.iter().map(|(_, h, _)| h.len()).sum::<usize>()
        ));
        let node = &mut self.nodes[n];
        node.server = server;
        node.takeover = Some(t.kind);
        // The backup's connection is superseded.
        if let Some(c) = node.link {
            self.close_conn_side(c, n, false);
        }
        self.plant(n);
        self.resync(n);
        self.after_ha(n);
        self.submit(n, Reply::default(), Some(state));
        self.send_announcements(n);
        let gen = self.nodes[n].gen;
        self.schedule(self.now + 20, Ev::ConnectRetry { node: n, gen });
    }

    // ------------------------------------------------------------------
    // The replication link: an ordered byte stream per connection.

    fn partitioned(&self) -> bool {
        self.now < self.partition_until
    }

    fn link_latency(&mut self) -> u64 {
        let mut d = self.rng.gen_range(1..=3u64);
        let x = self.link_delay.get(self.now);
        if x > 0.0 {
            d += x as u64;
        }
        d
    }

    fn try_connect(&mut self, n: usize) {
        let node = &self.nodes[n];
        if !node.up || node.ha.role() != Role::Active || node.link.is_some() || node.connecting {
            return;
        }
        self.nodes[n].connecting = true;
        let p = Self::other(n);
        let lat = self.link_latency();
        let gen = self.nodes[n].gen;
        if self.partitioned() {
            // connect times out after dead_after.
            let d = link_cfg().dead_after.as_millis() as u64;
            self.schedule(self.now + d, Ev::LinkFailed { node: n, gen });
        } else if !self.nodes[p].up {
            // Refused.
            self.schedule(self.now + 2 * lat, Ev::LinkFailed { node: n, gen });
        } else {
            let id = self.next_conn;
            self.next_conn += 1;
            self.conns.insert(
                id,
                Conn {
                    connector: n,
                    acceptor: p,
                    tell_term: false,
                    open: [true, true],
                    q: [VecDeque::new(), VecDeque::new()],
                    scheduled: [false, false],
                    bytes: [0, 0],
                },
            );
            self.schedule(self.now + lat, Ev::LinkEstablish { conn: id });
        }
    }

    fn link_establish(&mut self, id: u64) {
        let Some(c) = self.conns.get(&id) else {
            return;
        };
        let (n, p) = (c.connector, c.acceptor);
        let ts = self.ts();
        let connector_ok = self.nodes[n].up && self.nodes[n].connecting && c.open[0];
        if !connector_ok {
            self.conns.remove(&id);
            return;
        }
        self.nodes[n].connecting = false;
        if !self.nodes[p].up || self.partitioned() || !c.open[1] {
            self.conns.remove(&id);
            self.active_link_ended(n);
            return;
        }
        self.nodes[n].link = Some(id);
        self.nodes[n].ha.link_connected(ts);
        self.after_ha(n);
        match self.nodes[p].ha.role() {
            Role::Backup => {
                // A newer connection supersedes the one being served.
                if let Some(old) = self.nodes[p].link {
                    self.close_conn_side(old, p, false);
                }
                self.nodes[p].link = Some(id);
                self.nodes[p].last_rx = self.now;
                self.nodes[p].ha.link_connected(ts);
                self.after_ha(p);
            }
            _ => {
                // A node that is active and accepts a connection tells its
                // term (active: true) and closes: that fences a returning
                // old active.
                if let Some(c) = self.conns.get_mut(&id) {
                    c.tell_term = true;
                }
                let mut out = Vec::new();
                Message::Hello {
                    term: self.nodes[p].ha.term(),
                    active: true,
                    applied: 0,
                    now: ts,
                    version: portkeep_ha::wire::LINK_VERSION,
                    holds: portkeep_ha::Position::default(),
                }
                .encode(&mut out);
                self.write(id, 1, out);
                self.schedule(
                    self.now + TELL_TERM_CLOSE_MS,
                    Ev::TellTermClose { conn: id },
                );
            }
        }
    }

    /// The active's connection ended (closed, failed or timed out): the
    /// link end learns it, and the daemon retries after 200 ms.
    fn active_link_ended(&mut self, n: usize) {
        if !self.nodes[n].up {
            return;
        }
        self.nodes[n].link = None;
        if self.nodes[n].ha.role() == Role::Active {
            let ts = self.ts();
            self.nodes[n].ha.link_lost(ts);
            self.after_ha(n);
            let gen = self.nodes[n].gen;
            self.schedule(
                self.now + CONNECT_RETRY_MS,
                Ev::ConnectRetry { node: n, gen },
            );
        }
    }

    fn pump(&mut self, n: usize) {
        while let Some(bytes) = self.nodes[n].ha.poll_transmit() {
            let Some(id) = self.nodes[n].link else {
                continue;
            };
            let Some(c) = self.conns.get(&id) else {
                continue;
            };
            let side = usize::from(c.acceptor == n);
            self.write(id, side, bytes);
        }
    }

    /// Writes from `side` (0 connector, 1 acceptor): the bytes arrive in
    /// order, split into chunks at random points.
    fn write(&mut self, id: u64, side: usize, bytes: Vec<u8>) {
        let lat = self.link_latency();
        let pieces = self.rng.gen_range(1..=3usize).min(bytes.len().max(1));
        let mut cuts: Vec<usize> = (1..pieces)
            .map(|_| self.rng.gen_range(0..=bytes.len()))
            .collect();
        cuts.sort_unstable();
        let now = self.now;
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        if !c.open[side] {
            return;
        }
        let mut last = c.q[side].back().map_or(0, |(t, _)| *t);
        let mut start = 0;
        cuts.push(bytes.len());
        for cut in cuts {
            if cut <= start {
                continue;
            }
            last = last.max(now + lat);
            c.q[side].push_back((last, Some(bytes[start..cut].to_vec())));
            c.bytes[side] += cut - start;
            start = cut;
        }
        if !c.scheduled[side] {
            if let Some(&(t, _)) = c.q[side].front() {
                c.scheduled[side] = true;
                self.schedule(
                    t,
                    Ev::LinkDeliver {
                        conn: id,
                        dir: side,
                    },
                );
            }
        }
    }

    fn link_deliver(&mut self, id: u64, dir: usize) {
        if self.partitioned() {
            // TCP retransmits across the partition: the bytes are late.
            let at = self.partition_until + 1;
            self.schedule(at, Ev::LinkDeliver { conn: id, dir });
            return;
        }
        let now = self.now;
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        c.scheduled[dir] = false;
        let mut data = Vec::new();
        let mut fin = false;
        while c.q[dir].front().is_some_and(|(t, _)| *t <= now) {
            if let Some((_, seg)) = c.q[dir].pop_front() {
                match seg {
                    Some(b) => {
                        c.bytes[dir] -= b.len();
                        data.extend_from_slice(&b);
                    }
                    None => {
                        fin = true;
                        break;
                    }
                }
            }
        }
        let to = if dir == 0 { c.acceptor } else { c.connector };
        let to_side = 1 - dir;
        let open = c.open[to_side];
        let tell = c.tell_term;
        if let Some(&(t, _)) = c.q[dir].front() {
            c.scheduled[dir] = true;
            self.schedule(t, Ev::LinkDeliver { conn: id, dir });
        }
        let attached = self.nodes[to].up && self.nodes[to].link == Some(id);
        if open && attached && !data.is_empty() && !(tell && to_side == 1) {
            let ts = self.ts();
            self.nodes[to].last_rx = now;
            let r = self.nodes[to].ha.handle_link_input(ts, &data);
            self.after_ha(to);
            if r.is_err() {
                self.trace(format!("node {}: link frame error", self.nodes[to].name));
                self.close_conn_side(id, to, true);
                self.link_ended_at(to);
            }
        }
        if fin {
            // The peer closed: this end closes too.
            self.conns.remove(&id);
            if open && attached {
                self.nodes[to].link = None;
                self.link_ended_at(to);
            }
        }
    }

    /// A connection of `n` ended from the other side (or on an error).
    fn link_ended_at(&mut self, n: usize) {
        self.nodes[n].link = None;
        match self.nodes[n].ha.role() {
            Role::Active => self.active_link_ended(n),
            _ => {
                let ts = self.ts();
                self.nodes[n].ha.link_lost(ts);
                self.after_ha(n);
            }
        }
    }

    /// `n` closes its side: a FIN follows its data (unless `reset`, which
    /// drops what is in flight both ways and tells the peer at once).
    fn close_conn_side(&mut self, id: u64, n: usize, reset: bool) {
        let lat = self.link_latency();
        let now = self.now;
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        let side = usize::from(c.acceptor == n);
        if !c.open[side] {
            return;
        }
        c.open[side] = false;
        if self.nodes[n].link == Some(id) {
            self.nodes[n].link = None;
        }
        if reset {
            c.q = [VecDeque::new(), VecDeque::new()];
            c.bytes = [0, 0];
        } else {
            let last = c.q[side].back().map_or(0, |(t, _)| *t).max(now + lat);
            c.q[side].push_back((last, None));
            if !c.scheduled[side] {
                c.scheduled[side] = true;
                self.schedule(
                    last,
                    Ev::LinkDeliver {
                        conn: id,
                        dir: side,
                    },
                );
            }
        }
        self.gc_conn(id);
    }

    fn gc_conn(&mut self, id: u64) {
        if self
            .conns
            .get(&id)
            .is_some_and(|c| !c.open[0] && !c.open[1])
        {
            self.conns.remove(&id);
        }
    }

    /// A connection reset (both ends learn it at once).
    fn reset_link(&mut self) -> bool {
        let Some((&id, c)) = self
            .conns
            .iter()
            .find(|(_, c)| !c.tell_term && c.open[0] && c.open[1])
        else {
            return false;
        };
        let (a, b) = (c.connector, c.acceptor);
        self.conns.remove(&id);
        for n in [a, b] {
            if self.nodes[n].link == Some(id) {
                self.link_ended_at(n);
            }
        }
        true
    }

    // ------------------------------------------------------------------
    // Faults.

    fn first_contact_pending(&self) -> bool {
        self.nodes
            .iter()
            .any(|n| n.up && n.ha.role() == Role::Active && !n.ha.serving())
    }

    fn fault(&mut self, f: Fault, attempt: u32) {
        let now = self.now;
        let holder = self.vip;
        let other = Self::other(holder);
        let postpone = |w: &mut World| {
            if attempt < 20 {
                let d = w.rng.gen_range(2_000..5_000);
                w.schedule(w.now + d, Ev::Fault(f, attempt + 1));
            }
        };
        // The default faults stay within what the design assumes: the
        // promoter only acts after the active is lost; a backup is only
        // promoted once it has synced; a returning node configured active
        // can reach its peer at its first contact.
        // With a witness, the holder also holds the lease, and neither
        // process is frozen.
        let pair_healthy = self.nodes[holder].up
            && self.nodes[holder].ha.role() == Role::Active
            && self.nodes[holder].ha.serving()
            && self.fence_allows(holder)
            && !self.frozen(holder)
            && self.nodes[other].up
            && !self.frozen(other)
            && self.nodes[other].ha.role() == Role::Backup
            && !self.promoter_pending;
        match f {
            Fault::PcpLoss => {
                let d = self.rng.gen_range(5_000..30_000);
                self.loss = Window {
                    until: now + d,
                    value: self.rng.gen_range(0.2..0.5),
                };
            }
            Fault::PcpDelay => {
                let d = self.rng.gen_range(5_000..30_000);
                self.delay = Window {
                    until: now + d,
                    value: self.rng.gen_range(100.0..800.0),
                };
            }
            Fault::PcpDup => {
                let d = self.rng.gen_range(5_000..30_000);
                self.dup = Window {
                    until: now + d,
                    value: self.rng.gen_range(0.2..0.5),
                };
            }
            Fault::PcpReorder => {
                let d = self.rng.gen_range(5_000..30_000);
                self.reorder = Window {
                    until: now + d,
                    value: self.rng.gen_range(100.0..1000.0),
                };
            }
            Fault::LinkDelay => {
                let d = self.rng.gen_range(2_000..20_000);
                self.link_delay = Window {
                    until: now + d,
                    value: self.rng.gen_range(20.0..400.0),
                };
                // Half the time the active is lost inside the window, with
                // changes written and not yet acknowledged: the moment
                // that tells whether replies wait for the backup.
                if self.rng.gen_bool(0.5) {
                    let at = now + self.rng.gen_range(200..d);
                    self.schedule(at, Ev::Fault(Fault::CrashActive, 0));
                }
            }
            Fault::LinkReset => {
                if self.guards && self.first_contact_pending() {
                    return postpone(self);
                }
                // Both ends learn a reset at once: not a frozen one.
                if self.frozen(0) || self.frozen(1) {
                    return postpone(self);
                }
                if !self.reset_link() {
                    return postpone(self);
                }
            }
            Fault::LinkPartition => {
                if self.guards && (self.first_contact_pending() || self.partitioned()) {
                    return postpone(self);
                }
                let d = self.rng.gen_range(500..20_000);
                self.partition_until = now + d;
            }
            Fault::OperatorClear => {
                if !(self.nodes[holder].up
                    && self.nodes[holder].ha.serving()
                    && self.fence_allows(holder)
                    && !self.frozen(holder))
                {
                    return postpone(self);
                }
                self.operator_clear(holder);
            }
            Fault::DataplaneRefusal => {
                if !(self.nodes[holder].up
                    && self.nodes[holder].ha.role() == Role::Active
                    && self.nodes[holder].ha.serving()
                    && self.fence_allows(holder)
                    && !self.frozen(holder))
                {
                    if attempt < 20 {
                        let d = self.drng.gen_range(2_000..5_000);
                        self.schedule(now + d, Ev::Fault(f, attempt + 1));
                    }
                    return;
                }
                let d = self.drng.gen_range(2_000..=6_000);
                let p = self.drng.gen_range(0.3..0.8);
                let gen = self.nodes[holder].gen;
                self.nodes[holder].refusing = (now + d, p, gen);
                self.trace(format!(
                    "fault: node {}'s dataplane refuses {:.0} % of the changed mappings for {d} ms",
                    self.nodes[holder].name,
                    p * 100.0
                ));
            }
            Fault::CrashActive | Fault::FsyncFailure => {
                if self.guards && !(pair_healthy && self.nodes[other].ever_synced) {
                    return postpone(self);
                }
                if f == Fault::CrashActive {
                    self.trace(format!(
                        "fault: crash of the active (node {})",
                        self.nodes[holder].name
                    ));
                    self.crash(holder);
                } else {
                    self.trace(format!(
                        "fault: the next fsync of node {} fails",
                        self.nodes[holder].name
                    ));
                    self.nodes[holder].fail_next_fsync = true;
                }
            }
            Fault::CrashBackup => {
                if self.guards && !pair_healthy {
                    return postpone(self);
                }
                self.trace(format!(
                    "fault: crash of the backup (node {})",
                    self.nodes[other].name
                ));
                self.crash(other);
            }
            Fault::BothDown => {
                if self.guards && !pair_healthy {
                    return postpone(self);
                }
                self.trace("fault: both nodes crash (a site's power loss)".to_owned());
                for n in [holder, other] {
                    if self.nodes[n].up {
                        self.crash(n);
                        self.nodes[n].both_down = true;
                        // A site's power comes back: both nodes boot
                        // within a few seconds of each other, in either
                        // order (within the peer wait).
                        let back = now + self.rng.gen_range(1_000..8_000);
                        let gen = self.nodes[n].gen;
                        self.schedule(back, Ev::Restart { node: n, gen });
                    }
                }
            }
            Fault::EmptyCrashBackup => {
                if !self.nodes[other].up || self.nodes[other].ha.role() != Role::Backup {
                    return postpone(self);
                }
                self.trace(
                    "schedule promote-empty: the backup restarts on an empty disk, then the active is lost"
                        .to_owned(),
                );
                self.crash(other);
                // A replaced machine: its stored replica is gone too.
                self.nodes[other].replica = ReplicaDisk::default();
                // Back within a second, empty, and the active is lost
                // before it synced.
                let gen = self.nodes[other].gen;
                self.schedule(now + 1_000, Ev::Restart { node: other, gen });
                self.schedule(now + 1_020, Ev::Fault(Fault::EmptyCrashActive, 0));
            }
            Fault::EmptyCrashActive => {
                if self.nodes[holder].up {
                    self.crash(holder);
                }
            }
            Fault::PartitionOldActive => {
                self.trace("schedule partitioned-old-active: link cut, backup promoted".to_owned());
                self.partition_until = now + 30_000;
                self.schedule(now + 2_500, Ev::Fault(Fault::PartitionPromote, 0));
            }
            Fault::PartitionLoss => {
                // The link is cut and the active lost while cut: the
                // active answered volatile requests the backup never heard
                // of, unless the backup's lease still ran.
                if !pair_healthy
                    || !self.nodes[other].ever_synced
                    || self.partitioned()
                    || self.first_contact_pending()
                {
                    return postpone(self);
                }
                self.partition_until = now + 20_000;
                let d = self.rng.gen_range(500..2_500);
                self.schedule(now + d, Ev::Fault(Fault::PartitionLossCrash, 0));
            }
            Fault::PartitionLossCrash => {
                // Not when another fault took the backup meanwhile (both
                // down is a named schedule).
                if !(pair_healthy && self.nodes[other].ever_synced) {
                    return;
                }
                self.crash(holder);
            }
            Fault::BackupRestartLoss => {
                // The backup restarts (an upgrade, a crash) and the active
                // is lost around the moment it is back: promoted from its
                // stored replica, before or after the resync completes.
                if self.guards && !(pair_healthy && self.nodes[other].ever_synced) {
                    return postpone(self);
                }
                // Most of the time the backup dies while a write of its
                // replica is being stored: the moment that tells whether it
                // acknowledged only what was durable.
                // (Attempts from 1,000 on are that wait, for a few seconds.)
                let wait = attempt >= 1_000 || self.rng.gen_bool(0.8);
                if wait && self.nodes[other].replica.syncing.is_none() && attempt < 3_000 {
                    let at = now + self.rng.gen_range(1..4);
                    self.schedule(at, Ev::Fault(f, attempt.max(1_000) + 1));
                    return;
                }
                self.trace(format!(
                    "fault: the backup (node {}) restarts, then the active is lost",
                    self.nodes[other].name
                ));
                self.crash(other);
                let back = now + self.rng.gen_range(500..3_000);
                let gen = self.nodes[other].gen;
                self.schedule(back, Ev::Restart { node: other, gen });
                let lost = back + self.rng.gen_range(0..40);
                self.schedule(lost, Ev::Fault(Fault::BackupRestartLossCrash, 0));
            }
            Fault::BackupDiskStall => {
                // The backup stays up and keeps answering heartbeats, but
                // its disk takes seconds per fsync: it acknowledges late.
                if self.guards && !pair_healthy {
                    return postpone(self);
                }
                let d = self.rng.gen_range(2_000..15_000);
                self.nodes[other].replica_stall_until = now + d;
            }
            Fault::BackupRestartLossCrash => {
                // Not when another fault took a node meanwhile.
                // A backup with nothing stored is the named schedule
                // promote-empty.
                if !(self.nodes[holder].up
                    && self.nodes[holder].ha.serving()
                    && self.nodes[other].up
                    && self.nodes[other].ha.role() == Role::Backup
                    && self.nodes[other].replica.durable.is_some())
                {
                    return;
                }
                self.crash(holder);
            }
            Fault::PartitionPromote => {
                if !self.nodes[other].up
                    || self.frozen(other)
                    || self.nodes[other].ha.role() != Role::Backup
                {
                    return postpone(self);
                }
                // With a witness nobody promotes behind its back: the cut
                // alone is left, which it settles.
                if !self.opts.witness {
                    self.promoter_pending = false;
                    self.vip = other;
                    self.promote(other);
                }
            }
            Fault::Freeze => {
                // The holder most of the time (the case the fence is for),
                // else the backup. In the default faults a holder is only
                // frozen while its backup has synced, as it is only lost
                // then.
                let target = if self.wrng.gen_bool(0.7) {
                    holder
                } else {
                    other
                };
                let ok = pair_healthy && (target == other || self.nodes[other].ever_synced);
                if self.guards && !ok {
                    return postpone(self);
                }
                if !self.nodes[target].up || self.frozen(target) {
                    return postpone(self);
                }
                let d = self.wrng.gen_range(500..=6_000);
                self.freeze(target, d);
            }
            Fault::EtcdSlow => {
                let target = if self.wrng.gen_bool(0.7) {
                    holder
                } else {
                    other
                };
                // Its holder may lose the lease: as for a crash, only while
                // the backup has synced.
                let ok = pair_healthy && (target == other || self.nodes[other].ever_synced);
                if self.guards && !ok {
                    return postpone(self);
                }
                let d = self.wrng.gen_range(2_000..=10_000);
                let extra = self.wrng.gen_range(150..=500);
                self.nodes[target].etcd_slow = (now + d, extra);
                self.trace(format!(
                    "fault: etcd answers node {} {extra} to {} ms late for {d} ms",
                    self.nodes[target].name,
                    extra + 200
                ));
            }
            Fault::FreezeOldActive => {
                if !(pair_healthy && self.nodes[other].ever_synced) {
                    return postpone(self);
                }
                // Long enough for the promoter (or the lease) to act.
                let d = self.wrng.gen_range(4_500..=6_000);
                self.freeze(holder, d);
                self.holder_lost();
            }
        }
        let name = f.name();
        self.count_fault(name);
        if !matches!(
            f,
            Fault::CrashActive | Fault::CrashBackup | Fault::FsyncFailure
        ) {
            self.trace(format!("fault: {name}"));
        }
    }

    // ------------------------------------------------------------------
    // Invariants, after every step.

    fn check(&mut self) {
        let now = self.now;
        let ts = self.ts();
        // 2: one node answers PCP at a time. With a witness a node serves
        // only while its lease allows too (`Pair::serving`).
        let serving: Vec<usize> = (0..2).filter(|&n| self.serving_now(n)).collect();
        if serving.len() > 1 {
            if !self.two_serving {
                self.two_serving = true;
                let what = format!(
                    "both nodes serve PCP (terms {} and {})",
                    self.nodes[0].ha.term(),
                    self.nodes[1].ha.term()
                );
                self.violation(Invariant::OneServer, what);
            }
        } else {
            self.two_serving = false;
        }
        for n in 0..2 {
            let s = serving.contains(&n);
            if s && !self.nodes[n].was_serving {
                self.serving_started(n);
            }
            if !s && self.nodes[n].was_serving && self.opts.witness {
                let why = if !self.nodes[n].up {
                    "down"
                } else if self.nodes[n].ha.serving() {
                    "its lease no longer allows it"
                } else {
                    "no longer active"
                };
                self.trace(format!(
                    "node {}: stops serving PCP ({why})",
                    self.nodes[n].name
                ));
            }
            if !s && self.nodes[n].was_serving && self.nodes[n].ha.role() == Role::Active {
                // Stopped serving with its state (a crash, a failed
                // fsync): what a successor must hold.
                self.last_served = self.table(n);
            }
            self.nodes[n].was_serving = s;
        }
        // 1: every promised check-point is served.
        for &n in &serving {
            if now >= self.nodes[n].full_check_at {
                // The real table, every virtual second.
                self.nodes[n].full_check_at = now + 1_000;
                let before = std::mem::take(&mut self.nodes[n].shadow);
                self.resync(n);
                let after = &self.nodes[n].shadow;
                if before.len() != after.len()
                    || before.iter().any(|(k, v)| after.get(k) != Some(v))
                {
                    let what = format!(
                        "node {}: its table differs from what its change log says",
                        self.nodes[n].name
                    );
                    self.violation(Invariant::CheckpointServed, what);
                }
            }
        }
        if self.promises_dirty || serving.iter().any(|&n| self.nodes[n].dirty) {
            self.promises.retain(|_, p| p.expires > now);
            for &n in &serving {
                let table = &self.nodes[n].shadow;
                let mut broken = Vec::new();
                for (k, p) in &self.promises {
                    let ok = table.get(k).is_some_and(|(nonce, ext, _)| {
                        *nonce == p.nonce && Some(*ext) == p.external
                    });
                    if !ok {
                        broken.push((*k, p.clone()));
                    }
                }
                for (k, p) in broken {
                    self.promises.remove(&k);
                    if p.downgrade_sent {
                        // A node answered a later request for it without
                        // the option (RFC 7767 section 3.2: not honoured
                        // then), and that answer was lost: the server did
                        // report it; the client learns at its next
                        // exchange. Counted, not a violation.
                        self.report.unseen_downgrades += 1;
                        let line = format!(
                            "client {}: check-point of {}/{}:{} ended by an answer it never received",
                            self.clients[p.client].ip, k.0, k.1, k.2
                        );
                        self.trace(line);
                        continue;
                    }
                    let what = format!(
                        "node {} serves without the check-pointed mapping {}/{}:{} of client {} (promised external {:?}, {} s of lifetime left)",
                        self.nodes[n].name,
                        k.0,
                        k.1,
                        k.2,
                        self.clients[p.client].ip,
                        p.external,
                        (p.expires - now) / 1000,
                    );
                    self.violation(Invariant::CheckpointServed, what);
                }
            }
            self.promises_dirty = false;
        }
        // 3: losses the epoch check cannot see are ANNOUNCEd.
        if !self.obligations.is_empty() {
            let due: Vec<(IpAddr, u64, usize, u64)> = self
                .obligations
                .iter()
                .filter(|o| o.1 <= now)
                .copied()
                .collect();
            self.obligations.retain(|o| o.1 > now);
            for (host, _, n, _) in due {
                if !self.serving_now(n) {
                    continue;
                }
                self.violation(
                    Invariant::Epochs,
                    format!(
                        "client {host} lost state its epoch check cannot see, and got no ANNOUNCE that shows it"
                    ),
                );
            }
        }
        // 4 and 5, per node.
        for n in 0..2 {
            if !self.nodes[n].up {
                continue;
            }
            // 4 is checked as the log is applied to the shadow, and every
            // 5 virtual seconds with the table's own check (linear in the
            // table: every step would double the soak's time).
            if now >= self.nodes[n].table_check_at {
                self.nodes[n].table_check_at = now + 5_000;
                if let Err(e) = self.nodes[n].server.check_invariants() {
                    let what = format!("node {}: {e}", self.nodes[n].name);
                    self.violation(Invariant::UniqueExternal, what);
                }
            }
            self.nodes[n].dirty = false;
            let held = self.nodes[n].ha.held();
            let q = self.nodes[n].store.queue.len();
            if held > HELD_BOUND || q > STORE_QUEUE_BOUND {
                let what = format!(
                    "node {}: {held} replies held, {q} jobs queued for the store",
                    self.nodes[n].name
                );
                self.violation(Invariant::Bounded, what);
            }
        }
        let over = self
            .conns
            .values()
            .any(|c| c.bytes[0] > LINK_BUFFER_BOUND || c.bytes[1] > LINK_BUFFER_BOUND);
        if over {
            self.violation(
                Invariant::Bounded,
                "a link buffer is over its bound".to_owned(),
            );
        }
        let _ = ts;
    }

    /// 5: no reply waits longer than the acknowledgement bound and the
    /// backup's lease allow, whatever the backup does (a backup that
    /// answers heartbeats but acknowledges nothing included).
    fn check_wait(&mut self, n: usize, handled_at: u64) {
        // A frozen process holds everything: its own pause is not a wait
        // the pair imposed.
        let frozen: u64 = self.nodes[n]
            .freezes
            .iter()
            .map(|&(a, b)| b.min(self.now).saturating_sub(a.max(handled_at)))
            .sum();
        let waited = self.now.saturating_sub(handled_at).saturating_sub(frozen);
        if waited > WAIT_BOUND_MS {
            let what = format!(
                "node {}: a reply waited {waited} ms for its release",
                self.nodes[n].name
            );
            self.violation(Invariant::Bounded, what);
        }
    }

    /// Node `n`'s MAP mappings, keyed as the clients know them.
    fn maps_of(&self, n: usize) -> impl Iterator<Item = (MapKey, MappingRecord)> {
        self.nodes[n]
            .server
            .mappings()
            .into_iter()
            .filter(|m| m.kind == MappingKind::Map)
            .map(|m| {
                (
                    (m.key.internal_ip, m.key.protocol.0, m.key.internal_port),
                    m,
                )
            })
    }

    fn table(&self, n: usize) -> HashMap<MapKey, (Nonce, SocketAddr)> {
        self.maps_of(n)
            .map(|(k, m)| (k, (m.nonce, m.external)))
            .collect()
    }

    /// When each MAP mapping of node `n` expires, in virtual ms.
    fn expiries(&self, n: usize) -> HashMap<MapKey, u64> {
        self.maps_of(n)
            .map(|(k, m)| (k, m.expires.as_millis().saturating_sub(T0)))
            .collect()
    }

    /// `portkeepd ctl clear --subscriber`: node `n` clears the subscriber of
    /// one host a random client maps for. Every client with a mapping of
    /// that subscriber (the host itself, or the THIRD_PARTY client that
    /// manages it) lost state, so its epoch check may fail; nobody else's
    /// may. Their check-points end with the mappings; a loss their check
    /// cannot see must be told by an ANNOUNCE whose epoch restarted.
    fn operator_clear(&mut self, n: usize) {
        let ts = self.ts();
        let now = self.now;
        let live: Vec<usize> = (0..self.clients.len())
            .filter(|&c| !self.clients[c].departed && !self.clients[c].maps.is_empty())
            .collect();
        if live.is_empty() {
            return;
        }
        let c = live[self.rng.gen_range(0..live.len())];
        let host = {
            let maps = &self.clients[c].maps;
            maps[self.rng.gen_range(0..maps.len())].host
        };
        let keying = SubscriberKeying::default();
        let sub = keying.subscriber_of(host);
        // Only what the node holds is cleared: a mapping already lost (and
        // not yet re-created) is no second loss.
        let held_before = self.table(n);
        let cleared = self.nodes[n]
            .server
            .clear(ts, portkeep_server::ClearSelector::Subscriber(sub));
        self.nodes[n].ha.cleared(ts);
        let removed: usize = cleared.iter().map(|c| c.mappings).sum();
        self.cleared.insert(sub, now);
        self.trace(format!(
            "fault: operator clears subscriber {sub} on node {} ({removed} mappings)",
            self.nodes[n].name
        ));
        self.nodes[n].dirty = true;
        self.submit(n, Reply::default(), None);
        self.promises
            .retain(|k, _| keying.subscriber_of(k.0) != sub);
        self.promises_dirty = true;
        self.last_served = self.table(n);
        for c in 0..self.clients.len() {
            let hit: Vec<usize> = (0..self.clients[c].maps.len())
                .filter(|&i| {
                    let m = &self.clients[c].maps[i];
                    keying.subscriber_of(m.host) == sub
                        && held_before
                            .get(&m.key())
                            .is_some_and(|(nonce, _)| *nonce == m.nonce)
                })
                .collect();
            // The clear restarts the subscriber's epoch even when the node
            // held nothing of it (`Server::clear`; docs/config.md: "clearing
            // one subscriber's state resets only that subscriber's epoch"),
            // so a host of that subscriber may see its check fail, though it
            // lost nothing it must be told of (seeds 2260 and 2781). A
            // THIRD_PARTY client's own epoch moves only if it managed a
            // mapping that was cleared.
            let own =
                !self.clients[c].third_party && keying.subscriber_of(self.clients[c].ip) == sub;
            if (hit.is_empty() && !own) || self.clients[c].departed {
                continue;
            }
            self.client_lost(n, c, &hit, ts);
        }
        self.send_announcements(n);
    }

    /// A node starts serving: which clients lost state there, and can
    /// their epoch check see it?
    fn serving_started(&mut self, n: usize) {
        let now = self.now;
        let ts = self.ts();
        let table = self.table(n);
        let expiries = self.expiries(n);
        let kind = self.nodes[n].takeover.take();
        let resets_all = matches!(kind, Some(TakeoverKind::Stale | TakeoverKind::Cold));
        let name = self.nodes[n].name;
        let term = self.nodes[n].ha.term();
        self.trace(format!("node {name}: serves PCP in term {term}"));
        for c in 0..self.clients.len() {
            let cl = &self.clients[c];
            if cl.departed {
                continue;
            }
            let lost: Vec<usize> = (0..cl.maps.len())
                .filter(|&i| {
                    let m = &cl.maps[i];
                    // A mapping being deleted counts as held until the
                    // delete is answered: its loss is a loss too.
                    m.in_session
                        && m.server_expires > now + 1_000
                        && cl.session.grant(m.id).is_some()
                        && (table.get(&m.key()).is_none_or(|(nonce, ext)| {
                            *nonce != m.nonce
                                || cl.session.grant(m.id).and_then(|g| g.external) != Some(*ext)
                        })
                            // Held, but ending well before the lifetime
                            // last granted (a renewal this node never
                            // heard of): gone before the client renews.
                            || expiries
                                .get(&m.key())
                                .is_some_and(|&e| e + 2_000 < m.server_expires))
                })
                .collect();
            // A mapping being deleted counts as held until the delete is
            // answered: losing it may reset the epoch (the client wants it
            // gone, so nobody owes it an ANNOUNCE).
            let deleting = cl
                .maps
                .iter()
                .any(|m| m.deleting && !table.contains_key(&m.key()));
            // State the last node to serve held for this client's hosts
            // (its own address, or those it manages with THIRD_PARTY) and
            // this one lacks (including creations whose answer never came).
            let dropped = self.last_served.iter().any(|(k, v)| {
                cl.maps.iter().any(|m| m.host == k.0)
                    && table.get(k).is_none_or(|w| w.0 != v.0 || w.1 != v.1)
            });
            let missing = !lost.is_empty() || dropped || deleting;
            // A loss found before (and ANNOUNCEd then, or visible) that
            // the client has not repaired yet is not a new one.
            // Only losses the client knows of need telling: a creation
            // whose answer never came is retransmitted anyway.
            let fresh = lost.iter().any(|&i| !cl.maps[i].lost_told);
            for &i in &lost {
                self.clients[c].maps[i].lost_told = true;
            }
            if missing || resets_all {
                self.clients[c].excused_at = Some(now);
            }
            if missing && self.opts.trace {
                let cl = &self.clients[c];
                let lost: Vec<String> = lost
                    .iter()
                    .map(|&i| {
                        let m = &cl.maps[i];
                        match expiries.get(&m.key()) {
                            Some(&e) if e + 2_000 < m.server_expires => format!(
                                "{}/{}:{} (held until {:.3}, granted until {:.3})",
                                m.host,
                                m.protocol.0,
                                m.port,
                                e as f64 / 1000.0,
                                m.server_expires as f64 / 1000.0
                            ),
                            _ => format!("{}/{}:{}", m.host, m.protocol.0, m.port),
                        }
                    })
                    .collect();
                let line = format!("client {}: lost {} at node {name}", cl.ip, lost.join(" "));
                self.trace(line);
            }
            if fresh {
                let cl = &self.clients[c];
                let visible = match cl.session.epoch() {
                    Some((e, t)) => {
                        let fresh = self.nodes[n].server.requester_epoch(ts, cl.ip);
                        EpochTracker::resume(e, t)
                            .observe(self.inst(now), fresh)
                            .is_invalid()
                    }
                    None => true,
                };
                if !visible {
                    self.obligations
                        .push((cl.ip, now + ANNOUNCE_DEADLINE_MS, n, now));
                }
            }
        }
    }

    /// The report, once run.
    pub fn into_report(self) -> Report {
        self.report
    }
}

// ----------------------------------------------------------------------
// Witness mode: freezes, the fence, etcd's messages and the coordinator.

impl World {
    /// Whether node `n`'s process is frozen now.
    fn frozen(&self, n: usize) -> bool {
        self.nodes[n].up && self.now < self.nodes[n].frozen_until
    }

    /// Whether node `n`'s fence lets it answer PCP now: always without a
    /// witness (or with the fence switched off); with one, `Pair::fence`
    /// as the coordinator set it, and `Witness::may_serve`.
    fn fence_allows(&self, n: usize) -> bool {
        if !self.opts.witness || !self.opts.witness_fence {
            return true;
        }
        let ts = self.ts();
        self.nodes[n]
            .coord
            .as_ref()
            .is_some_and(|c| self.now < c.fence && c.w.may_serve(ts))
    }

    /// Whether node `n` answers PCP now (`Pair::serving`).
    fn serving_now(&self, n: usize) -> bool {
        self.nodes[n].up && self.nodes[n].ha.serving() && self.fence_allows(n)
    }

    /// Pauses node `n`'s process for `d` ms: nothing meant for it is
    /// handled until it thaws, and its clock runs on.
    fn freeze(&mut self, n: usize, d: u64) {
        let until = self.now + d;
        self.nodes[n].frozen_until = until;
        self.nodes[n].freezes.push((self.now, until));
        let gen = self.nodes[n].gen;
        self.schedule(until, Ev::Thaw { node: n, gen });
        let role = self.nodes[n].ha.role().as_str();
        self.trace(format!(
            "fault: node {} ({role}) frozen for {d} ms",
            self.nodes[n].name
        ));
    }

    /// Invariant 6: node `n` sends a reply now. The replies of one tenure
    /// (from an election won to the next) span an interval; two tenures'
    /// intervals must not overlap: once another tenure answered, an
    /// earlier one never answers again, and tenures of two nodes never
    /// answer in the same millisecond.
    fn note_answer(&mut self, n: usize) {
        let label = (n, self.nodes[n].tenure);
        let now = self.now;
        let prev = self.answering;
        self.answering = Some((label, now));
        let Some((last, at)) = prev else {
            return;
        };
        if last == label {
            return;
        }
        self.closed_tenures.insert(last);
        let overlap = self.closed_tenures.contains(&label) || (last.0 != n && at >= now);
        if overlap && self.flagged.insert((label, last)) {
            let what = format!(
                "node {} answered PCP (tenure {}) while node {} (tenure {}) answered too, last at {}.{:03}s",
                self.nodes[n].name,
                label.1,
                self.nodes[last.0].name,
                last.1,
                at / 1000,
                at % 1000
            );
            self.violation(Invariant::OneAnswers, what);
        }
    }

    fn next_call(&mut self) -> u64 {
        self.next_call += 1;
        self.next_call
    }

    fn coord(&self, n: usize) -> Option<&Coord> {
        self.nodes[n].coord.as_ref()
    }

    fn coord_mut(&mut self, n: usize) -> Option<&mut Coord> {
        self.nodes[n].coord.as_mut()
    }

    /// A call of node `n` leaves for etcd.
    fn send_etcd(&mut self, n: usize, req: etcd::Req) {
        let d = self.wrng.gen_range(1..=20);
        let gen = self.nodes[n].gen;
        self.schedule(self.now + d, Ev::ToEtcd { node: n, gen, req });
    }

    /// etcd's answers leave; its expiry is scheduled.
    fn etcd_out(&mut self, out: etcd::Out) {
        for (node, gen, resp) in out.answers {
            let mut d = self.wrng.gen_range(1..=20);
            let (until, extra) = self.nodes[node].etcd_slow;
            if self.now < until {
                d += extra + self.wrng.gen_range(0..=200);
            }
            self.schedule(self.now + d, Ev::FromEtcd { node, gen, resp });
        }
        if let Some((lease, at)) = out.expiry {
            self.schedule(at, Ev::EtcdExpire { lease });
        }
    }

    fn coord_schedule(&mut self, n: usize, at: u64, t: CoordTimer) {
        let gen = self.nodes[n].gen;
        self.schedule(at, Ev::Coord { node: n, gen, t });
    }

    /// `call` is awaited for at most `call_timeout`.
    fn coord_call_timeout(&mut self, n: usize, call: u64) {
        self.coord_schedule(n, self.now + CALL_TIMEOUT_MS, CoordTimer::Timeout(call));
    }

    /// `run`: asleep for `d` ms, then a new session.
    fn coord_sleep(&mut self, n: usize, d: u64) {
        let token = self.next_call();
        if let Some(c) = self.coord_mut(n) {
            c.step = Step::Idle { token };
        }
        self.coord_schedule(n, self.now + d, CoordTimer::Wake(token));
    }

    /// `Session::start`: a lease is granted.
    fn coord_start_session(&mut self, n: usize) {
        let call = self.next_call();
        let sent = self.now;
        if let Some(c) = self.coord_mut(n) {
            c.step = Step::Granting { call, sent };
        }
        self.send_etcd(n, etcd::Req::Grant { call });
        self.coord_call_timeout(n, call);
    }

    /// `hold`: campaigns (again, with the same lease: the same candidacy).
    fn coord_campaign(&mut self, n: usize) {
        let call = self.next_call();
        let Some(c) = self.coord_mut(n) else {
            return;
        };
        let Some(lease) = c.lease else {
            return;
        };
        c.step = Step::Campaigning { call };
        self.send_etcd(n, etcd::Req::Campaign { call, lease });
        self.coord_arm_renew(n);
    }

    /// `hold`: a campaign failed; a pause of 100 ms, under `alive`.
    fn coord_pause(&mut self, n: usize) {
        let token = self.next_call();
        if let Some(c) = self.coord_mut(n) {
            c.step = Step::Pausing { token };
        }
        self.coord_schedule(n, self.now + 100, CoordTimer::Wake(token));
        self.coord_arm_renew(n);
    }

    /// The renewal starts now if it is due, else a timer is set for it.
    fn coord_arm_renew(&mut self, n: usize) {
        let now = self.now;
        let Some(c) = self.coord_mut(n) else {
            return;
        };
        if c.renewing.is_some() || !c.renews() {
            return;
        }
        if now >= c.renew_at {
            self.coord_start_renew(n);
        } else if c.renew_armed != c.renew_at {
            c.renew_armed = c.renew_at;
            let at = c.renew_at;
            self.coord_schedule(n, at, CoordTimer::Renew(at));
        }
    }

    /// `renew` / `keep_alive`: one keepalive, answered or not.
    fn coord_start_renew(&mut self, n: usize) {
        self.coord_keepalive(n, 0);
    }

    fn coord_keepalive(&mut self, n: usize, attempt: u8) {
        let call = self.next_call();
        let sent = self.now;
        let Some(c) = self.coord_mut(n) else {
            return;
        };
        let Some(lease) = c.lease else {
            return;
        };
        c.renewing = Some((call, sent, attempt));
        self.send_etcd(n, etcd::Req::KeepAlive { call, lease });
        self.coord_call_timeout(n, call);
    }

    /// `renew` returns: `lease_gone` when etcd answered that the lease
    /// expired.
    fn coord_renewed(&mut self, n: usize, lease_gone: bool) {
        let now = self.now;
        let ts = self.ts();
        let Some(c) = self.coord_mut(n) else {
            return;
        };
        c.renewing = None;
        if lease_gone {
            self.coord_end_session(n, "the lease expired at etcd");
            return;
        }
        c.renew_at = now + WITNESS_TTL_MS / 4;
        if let Some(u) = c.w.serve_until() {
            c.fence = u.as_millis().saturating_sub(T0);
        }
        if c.w.valid_until_passed(ts) {
            self.coord_end_session(n, "the lease ran out (etcd unreachable)");
            return;
        }
        let stash = c.stash.take();
        match c.step {
            Step::Campaigning { .. } => match stash {
                Some(Stash::Won(rev)) => self.coord_won(n, rev),
                Some(Stash::CampaignFailed) => self.coord_pause(n),
                _ => self.coord_arm_renew(n),
            },
            Step::Pausing { .. } => {
                if stash == Some(Stash::PauseOver) {
                    self.coord_campaign(n);
                } else {
                    self.coord_arm_renew(n);
                }
            }
            Step::Holding => self.coord_held_renewed(n),
            _ => {}
        }
    }

    /// `hold`'s loop after a renewal.
    fn coord_held_renewed(&mut self, n: usize) {
        if self.nodes[n].ha.role() != Role::Active {
            // Deposed by a higher term over the link: that node serves;
            // this one must not hold the lease it needs.
            if let Some(c) = self.coord_mut(n) {
                c.fence = 0;
            }
            self.trace(format!(
                "node {}: coordinator: deposed over the link; resigning",
                self.nodes[n].name
            ));
            self.coord_resign(n, AfterResign::Deposed);
            return;
        }
        let Some(c) = self.coord_mut(n) else {
            return;
        };
        c.renewals += 1;
        if c.renewals.is_multiple_of(3) {
            self.coord_record_now(n, false);
        } else {
            self.coord_arm_renew(n);
        }
    }

    /// The campaign returned: this node's key leads.
    fn coord_won(&mut self, n: usize, rev: u64) {
        let tenure = self.next_tenure;
        self.next_tenure += 1;
        self.nodes[n].tenure = tenure;
        self.report.elections += 1;
        if let Some(c) = self.coord_mut(n) {
            c.rev = Some(rev);
            c.w.elected();
        }
        self.trace(format!(
            "node {}: coordinator: elected at etcd (tenure {tenure})",
            self.nodes[n].name
        ));
        self.coord_read_record(n, 0);
    }

    fn coord_read_record(&mut self, n: usize, attempt: u8) {
        let call = self.next_call();
        if let Some(c) = self.coord_mut(n) {
            c.step = Step::Reading { call, attempt };
        }
        self.send_etcd(n, etcd::Req::Get { call });
        self.coord_call_timeout(n, call);
    }

    /// `ctl demote`'s path (`node::demote`): the node stops serving, its
    /// state goes, it waits for the active's link as a backup.
    fn demote(&mut self, n: usize) {
        if self.nodes[n].was_serving {
            self.last_served = self.table(n);
        }
        if !self.nodes[n].ha.demote() {
            return;
        }
        self.stand_down(n);
        self.after_ha(n);
    }

    /// Elected, the record read: decide, and carry the verdict out.
    fn coord_decide(&mut self, n: usize, record: Option<Record>) {
        let ts = self.ts();
        if let Some(c) = self.coord_mut(n) {
            c.record = record;
        }
        let verdict = loop {
            let (role, term, holds) = {
                let h = &self.nodes[n].ha;
                (h.role(), h.term(), h.holds())
            };
            let Some(c) = self.coord_mut(n) else {
                return;
            };
            let v = c.w.decide(ts, role, term, holds, record);
            if v == Verdict::StandDown {
                self.report.stand_downs += 1;
                self.trace(format!(
                    "node {}: coordinator: elected, but term {} was served since its term {term}: standing down first",
                    self.nodes[n].name,
                    record.map_or(0, |r| r.term)
                ));
                self.demote(n);
                continue;
            }
            break v;
        };
        match verdict {
            Verdict::Yield => {
                self.report.yields += 1;
                let holds = self.nodes[n].ha.holds();
                self.trace(format!(
                    "node {}: coordinator: elected, holding {holds} against the record {}: yielding",
                    self.nodes[n].name,
                    record.map_or_else(String::new, |r| format!("{} of term {}", r.position, r.term))
                ));
                self.coord_resign(n, AfterResign::Yielded);
                return;
            }
            Verdict::Promote { floor } => {
                self.nodes[n].ha.observe_term(floor);
                self.promote(n);
                if self.nodes[n].ha.role() != Role::Active {
                    self.trace(format!(
                        "node {}: coordinator: elected, but promotion was refused",
                        self.nodes[n].name
                    ));
                    self.coord_resign(n, AfterResign::Refused);
                    return;
                }
                self.trace(format!(
                    "node {}: coordinator: elected and promoted (floor {floor})",
                    self.nodes[n].name
                ));
            }
            Verdict::Resume | Verdict::StandDown => {
                self.trace(format!(
                    "node {}: coordinator: elected; serving on in term {}",
                    self.nodes[n].name,
                    self.nodes[n].ha.term()
                ));
            }
        }
        // The verdict is carried out: from now on the lease lets it serve.
        if let Some(c) = self.coord_mut(n) {
            c.w.settled();
        }
        self.coord_record_now(n, true);
    }

    /// `record_now`: at a term's start the position it starts from, then
    /// what the backup acknowledged; written if it changed.
    fn coord_record_now(&mut self, n: usize, term_start: bool) {
        let (term, at) = {
            let h = &self.nodes[n].ha;
            let at = match h.acknowledged() {
                Some(a) if !term_start => a,
                _ => h.holds(),
            };
            (h.term(), at)
        };
        let Some(c) = self.coord(n) else {
            return;
        };
        let previous = c.record;
        let record = Witness::record(term, at, previous);
        if previous == Some(record) {
            self.coord_recorded(n, term_start);
        } else {
            self.coord_write_record(n, record, term_start, 0);
        }
    }

    fn coord_write_record(&mut self, n: usize, record: Record, term_start: bool, attempt: u8) {
        let call = self.next_call();
        let Some(c) = self.coord_mut(n) else {
            return;
        };
        let (Some(lease), Some(rev)) = (c.lease, c.rev) else {
            return;
        };
        c.step = Step::Writing {
            call,
            attempt,
            record,
            term_start,
        };
        self.send_etcd(
            n,
            etcd::Req::Put {
                call,
                lease,
                rev,
                record,
            },
        );
        self.coord_call_timeout(n, call);
    }

    /// The record stands; at a term's start the fence opens.
    fn coord_recorded(&mut self, n: usize, term_start: bool) {
        let Some(c) = self.coord_mut(n) else {
            return;
        };
        if term_start {
            c.fence =
                c.w.serve_until()
                    .map_or(0, |u| u.as_millis().saturating_sub(T0));
            let (fence, record) = (c.fence, c.record);
            // The address follows the node that serves (`ctl status`),
            // once keepalived's check script notices.
            let lag = self.wrng.gen_range(0..=1_000);
            let gen = self.nodes[n].gen;
            self.schedule(self.now + lag, Ev::VipFollow { node: n, gen });
            let line = format!(
                "node {}: coordinator: serving until {}.{:03}s, recorded {:?}",
                self.nodes[n].name,
                fence / 1000,
                fence % 1000,
                record
            );
            self.trace(line);
        }
        if let Some(c) = self.coord_mut(n) {
            c.step = Step::Holding;
        }
        self.coord_arm_renew(n);
    }

    fn coord_resign(&mut self, n: usize, then: AfterResign) {
        let call = self.next_call();
        let Some(c) = self.coord_mut(n) else {
            return;
        };
        let (Some(lease), Some(rev)) = (c.lease, c.rev) else {
            self.coord_resigned(n, then);
            return;
        };
        c.step = Step::Resigning { call, then };
        self.send_etcd(n, etcd::Req::Resign { call, lease, rev });
        self.coord_call_timeout(n, call);
    }

    fn coord_resigned(&mut self, n: usize, then: AfterResign) {
        match then {
            AfterResign::Yielded => {
                if let Some(c) = self.coord_mut(n) {
                    c.w.lost();
                }
                self.coord_end_session(n, "yielded");
            }
            AfterResign::Refused => self.coord_end_session(n, "promotion refused"),
            AfterResign::Deposed => self.coord_end_session(n, "deposed"),
        }
    }

    /// `hold` returned: the lease is revoked (best effort), then the
    /// session is over.
    fn coord_end_session(&mut self, n: usize, why: &str) {
        let call = self.next_call();
        self.trace(format!(
            "node {}: coordinator: session ends: {why}",
            self.nodes[n].name
        ));
        let Some(c) = self.coord_mut(n) else {
            return;
        };
        // As `Session::start` does: the fence closes before the revoke,
        // which hands the lease to the peer on arrival (seeds 4 and 213 of
        // `etcd-slow` had both serving while the revoke waited).
        c.w.lost();
        c.fence =
            c.w.serve_until()
                .map_or(0, |u| u.as_millis().saturating_sub(T0));
        c.renewing = None;
        c.stash = None;
        match c.lease {
            Some(lease) => {
                c.step = Step::Revoking { call };
                self.send_etcd(n, etcd::Req::Revoke { call, lease });
                self.coord_call_timeout(n, call);
            }
            None => self.coord_finish_session(n),
        }
    }

    /// `run`, after a session: nothing is confirmed any more, the fence
    /// closes, and it sleeps half a TTL before the next.
    fn coord_finish_session(&mut self, n: usize) {
        let Some(c) = self.coord_mut(n) else {
            return;
        };
        c.w.lost();
        c.fence =
            c.w.serve_until()
                .map_or(0, |u| u.as_millis().saturating_sub(T0));
        c.lease = None;
        c.rev = None;
        c.renewing = None;
        c.stash = None;
        c.record = None;
        c.renewals = 0;
        self.coord_sleep(n, WITNESS_TTL_MS / 2);
    }

    fn coord_timer(&mut self, n: usize, gen: u64, t: CoordTimer) {
        if self.nodes[n].gen != gen || !self.nodes[n].up {
            return;
        }
        let Some(c) = self.coord_mut(n) else {
            return;
        };
        match t {
            CoordTimer::Wake(token) => match c.step {
                Step::Idle { token: t } if t == token => self.coord_start_session(n),
                Step::Pausing { token: t } if t == token => {
                    if c.renewing.is_some() {
                        c.stash = Some(Stash::PauseOver);
                    } else {
                        self.coord_campaign(n);
                    }
                }
                _ => {}
            },
            CoordTimer::Timeout(call) => self.coord_call_failed(n, call),
            CoordTimer::Renew(at) => {
                if c.renew_at == at && c.renewing.is_none() && c.renews() {
                    self.coord_start_renew(n);
                }
            }
        }
    }

    /// `call` failed: timed out, or its connection broke.
    fn coord_call_failed(&mut self, n: usize, call: u64) {
        let Some(c) = self.coord_mut(n) else {
            return;
        };
        if let Some((rc, _, attempt)) = c.renewing {
            if rc == call {
                // Not answered: the deadline already confirmed still
                // holds; the next member is tried, up to as many as there
                // are (at least two).
                if attempt + 1 < ETCD_ENDPOINTS.max(2) {
                    self.coord_keepalive(n, attempt + 1);
                } else {
                    self.coord_renewed(n, false);
                }
                return;
            }
        }
        if c.step_call() != Some(call) {
            return;
        }
        match c.step {
            Step::Granting { .. } => {
                self.trace(format!(
                    "node {}: coordinator: lease grant failed",
                    self.nodes[n].name
                ));
                // No session: nothing to revoke.
                self.coord_finish_session(n);
            }
            Step::Campaigning { .. } => {
                if c.renewing.is_some() {
                    c.stash = Some(Stash::CampaignFailed);
                } else {
                    self.coord_pause(n);
                }
            }
            Step::Reading { attempt, .. } => {
                if attempt == 0 {
                    self.coord_read_record(n, 1);
                } else {
                    self.coord_end_session(n, "reading the record failed");
                }
            }
            Step::Writing {
                attempt,
                record,
                term_start,
                ..
            } => {
                if attempt == 0 {
                    self.coord_write_record(n, record, term_start, 1);
                } else {
                    self.coord_end_session(n, "writing the record failed");
                }
            }
            Step::Resigning { then, .. } => self.coord_resigned(n, then),
            Step::Revoking { .. } => self.coord_finish_session(n),
            Step::Idle { .. } | Step::Pausing { .. } | Step::Holding => {}
        }
    }

    /// An answer from etcd reaches node `n`'s coordinator.
    fn coord_answer(&mut self, n: usize, gen: u64, resp: etcd::Resp) {
        if self.nodes[n].gen != gen || !self.nodes[n].up {
            return;
        }
        if self.frozen(n) {
            // Lost: the freeze breaks the connection (see `coord_thawed`).
            return;
        }
        let ts_of = |ms: u64| Timestamp(T0 + ms);
        let now = self.now;
        let Some(c) = self.coord_mut(n) else {
            return;
        };
        let call = resp.call();
        if let Some((rc, sent, _)) = c.renewing {
            if rc == call {
                if let etcd::Resp::KeptAlive { ttl_ms, .. } = resp {
                    c.w.confirmed(ts_of(sent), Duration::from_millis(ttl_ms));
                    self.coord_renewed(n, ttl_ms == 0);
                }
                return;
            }
        }
        if c.step_call() != Some(call) {
            return;
        }
        match (c.step, resp) {
            (Step::Granting { sent, .. }, etcd::Resp::Granted { lease, ttl_ms, .. }) => {
                c.w.confirmed(ts_of(sent), Duration::from_millis(ttl_ms));
                c.lease = Some(lease);
                c.renew_at = now + WITNESS_TTL_MS / 4;
                self.coord_campaign(n);
            }
            (Step::Campaigning { .. }, etcd::Resp::Campaign { won, .. }) => {
                let stash = match won {
                    Some(rev) => Stash::Won(rev),
                    None => Stash::CampaignFailed,
                };
                if c.renewing.is_some() {
                    c.stash = Some(stash);
                } else if let Some(rev) = won {
                    self.coord_won(n, rev);
                } else {
                    self.coord_pause(n);
                }
            }
            (Step::Reading { .. }, etcd::Resp::Got { record, .. }) => self.coord_decide(n, record),
            (
                Step::Writing {
                    record, term_start, ..
                },
                etcd::Resp::Put { ok, .. },
            ) => {
                if ok {
                    c.record = Some(record);
                    self.coord_recorded(n, term_start);
                } else {
                    self.coord_end_session(n, "no longer the leader at etcd");
                }
            }
            (Step::Resigning { then, .. }, etcd::Resp::Done { .. }) => self.coord_resigned(n, then),
            (Step::Revoking { .. }, etcd::Resp::Done { .. }) => self.coord_finish_session(n),
            _ => {}
        }
    }

    /// Node `n` thawed. The freeze broke its connection to etcd (the
    /// client's keepalive pings went unanswered): what etcd sent meanwhile
    /// was lost, and every call under way fails now.
    fn coord_thawed(&mut self, n: usize) {
        let Some(c) = self.coord(n) else {
            return;
        };
        let renewing = c.renewing.map(|r| r.0);
        let step = c.step_call();
        if let Some(call) = renewing {
            self.coord_call_failed(n, call);
        }
        if let Some(call) = step {
            self.coord_call_failed(n, call);
        }
    }
}

/// `portkeepd`'s `network_failure` (`node.rs`): a reply granting a mapping
/// the dataplane refused is rewritten as NETWORK_FAILURE (RFC 6887 section
/// 7.4) with the short error lifetime, the epoch its client now sees and
/// no CHECKPOINT_REQUIRED; other replies go out as they were. `None` (the
/// reply is dropped) when it cannot be parsed or encoded again.
fn network_failure(
    bytes: &[u8],
    cp: &portkeep_proto::CodePoints,
    lifetime: u32,
    epoch: u32,
    undone: &[(Nonce, Protocol, u16)],
) -> Option<Vec<u8>> {
    use portkeep_proto::{PcpOption, ResultCode};
    let mut r = portkeep_proto::Response::parse(bytes, cp).ok()?;
    let hit = r.header.result == ResultCode::SUCCESS
        && r.data.map_part().is_some_and(|m| {
            undone
                .iter()
                .any(|(n, p, port)| m.nonce == *n && m.protocol == *p && m.internal_port == *port)
        });
    if !hit {
        return Some(bytes.to_vec());
    }
    r.header.result = ResultCode::NETWORK_FAILURE;
    r.header.lifetime = lifetime;
    r.header.epoch = epoch;
    r.options.retain(|o| *o != PcpOption::CheckpointRequired);
    let mut out = Vec::with_capacity(bytes.len());
    r.encode(cp, &mut out).ok()?;
    Some(out)
}
