//! The UDP service around the sans-IO core.
//!
//! Each worker thread owns one `SO_REUSEPORT` socket per listen address,
//! receives a batch of datagrams, and runs the whole batch through the core
//! under one lock. What happens next depends on the store:
//!
//! - with a store (the default), the batch's changes and replies go to the
//!   committer thread, and the worker goes back to receiving. The committer
//!   takes everything queued, writes it in one transaction (group commit:
//!   one fsync for many requests), applies it to the dataplane, and only
//!   then sends the replies. No response ever leaves before the change it
//!   reports is durable and installed.
//! - without one (`[store] mode = "memory"`), the worker applies the
//!   changes to the dataplane and sends the replies itself.
//!
//! A housekeeping thread expires mappings on the core's timer, and the
//! control thread serves `portkeepd ctl`.

use std::collections::VecDeque;
use std::fs::File;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use portkeep_server::{
    Change, ChangeRecord, Dataplane, MappingKind, MemoryDataplane, Outcome, RemoveReason, Restored,
    Server, ServerConfig, SubscriberId,
};
use socket2::{Domain, Protocol, Socket, Type};

use crate::clock::Clock;
use crate::config::{DataplaneKind, Settings};
use crate::control;
use crate::ha::{self, Ha};
use crate::ha_config::Role;
use crate::mmsg::{self, RecvBatch, SendBatch};
use crate::store::{Opened, Store};

/// How often threads look up from waiting to check for shutdown.
const POLL: Duration = Duration::from_millis(100);

/// The core, behind one lock.
pub(crate) struct Core {
    pub(crate) server: Server,
}

/// Work for the committer: changes to make durable and install, then the
/// replies that report them.
struct Job {
    changes: Vec<ChangeRecord>,
    replies: SendBatch,
    socket: usize,
    /// Subscribers whose hosts with volatile mappings changed (for the
    /// backup; see `Server::drain_volatile`).
    volatile: Vec<(SubscriberId, Vec<IpAddr>)>,
    /// Replace the store and the dataplane with this state first
    /// (promotion and demotion), in log order.
    reset: Option<Reset>,
}

/// The whole state a node switches to on promotion or demotion.
#[derive(Debug)]
pub(crate) struct Reset {
    pub(crate) state: Restored,
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
}

/// Replies whose changes are committed, waiting to be sent.
#[derive(Default)]
struct Outbox {
    batches: VecDeque<(usize, SendBatch)>,
    closed: bool,
}

pub(crate) struct Shared {
    pub(crate) core: Mutex<Core>,
    pub(crate) dataplane: Mutex<Box<dyn Dataplane>>,
    pub(crate) stop: AtomicBool,
    /// Set once the workers have stopped: the committer then drains the
    /// queue and exits.
    drained: AtomicBool,
    /// Set when the store failed: the daemon stops rather than answer
    /// without durability.
    pub(crate) failed: AtomicBool,
    pub(crate) clock: Clock,
    pub(crate) listen: Vec<SocketAddr>,
    /// Every PCP socket, for sending replies and ANNOUNCEs.
    sockets: Vec<UdpSocket>,
    /// `None` in memory mode.
    queue: Option<(Mutex<Queue>, Condvar)>,
    /// Committed replies for the sender thread.
    outbox: (Mutex<Outbox>, Condvar),
    /// How long the committer waits for more work before committing.
    commit_delay: Duration,
    /// Role in an active/backup pair, and the replication link.
    pub(crate) ha: Ha,
    /// The core's configuration, for the state a promotion or demotion
    /// starts from.
    pub(crate) server_cfg: ServerConfig,
    /// Which dataplane to build again on promotion and demotion.
    dataplane_kind: DataplaneKind,
    /// ANNOUNCEs to repeat: when, to whom, the interval after that, and how
    /// many more.
    announces: Mutex<Vec<Repeat>>,
}

/// A repeated unsolicited ANNOUNCE to hosts that lost state.
struct Repeat {
    due: portkeep_server::Timestamp,
    interval: Duration,
    left: u32,
    targets: Vec<(SubscriberId, IpAddr)>,
}

fn log_change(c: &ChangeRecord) {
    // Formatting costs more than the request itself; skip it when nobody
    // will read the line.
    if !tracing::enabled!(tracing::Level::INFO) {
        return;
    }
    match &c.change {
        Change::Upserted(m) => {
            let kind = match m.kind {
                MappingKind::Map => "MAP".to_owned(),
                MappingKind::Peer { remote } => format!("PEER to {remote}"),
            };
            tracing::info!(
                seq = c.seq,
                "{kind} {} {}:{} -> {} lifetime {}s{}",
                m.key.protocol,
                m.key.internal_ip,
                m.key.internal_port,
                m.external,
                m.lifetime,
                if m.checkpoint { " check-pointed" } else { "" }
            );
        }
        Change::Removed { mapping: m, reason } => {
            let why = match reason {
                RemoveReason::Deleted => "deleted",
                RemoveReason::Expired => "expired",
                RemoveReason::Cleared => "cleared",
                RemoveReason::Failed => "not installed (dataplane failure)",
            };
            tracing::info!(
                seq = c.seq,
                "{why}: {} {}:{} -> {}",
                m.key.protocol,
                m.key.internal_ip,
                m.key.internal_port,
                m.external
            );
        }
        Change::EpochReset { subscriber, .. } => {
            tracing::info!(seq = c.seq, "epoch reset for subscriber {subscriber}");
        }
        Change::ServerEpochReset { .. } => {
            tracing::info!(seq = c.seq, "server-wide epoch reset");
        }
    }
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Core> {
        // A worker that panicked cannot have left the core half-updated in a
        // way later requests would trip over more than a restart would, and
        // keeping the rest serving is better than taking the daemon down.
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn dataplane(&self) -> MutexGuard<'_, Box<dyn Dataplane>> {
        self.dataplane.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies changes to the dataplane; returns the sequence numbers of
    /// those that did not take effect.
    fn apply(&self, changes: &[ChangeRecord]) -> Vec<u64> {
        for c in changes {
            log_change(c);
        }
        match self.dataplane().apply(changes) {
            Ok(()) => Vec::new(),
            Err(e) => {
                tracing::error!(error = %e, "dataplane did not apply {} change(s)", e.failed.len());
                e.failed
            }
        }
    }

    /// RFC 6887 section 7.4: a mapping the dataplane could not install is
    /// answered NETWORK_FAILURE ("a network failure ... unable to create
    /// mapping"; a short-lifetime error: the client may retry soon) and
    /// taken back from the core, so that what the server holds and what the
    /// NAT does stay the same. `replies` are rewritten in place.
    fn undo_failed(
        &self,
        core: &mut Core,
        changes: &[ChangeRecord],
        failed: &[u64],
        replies: &mut [&mut SendBatch],
    ) {
        let mut undone: Vec<(portkeep_proto::Nonce, portkeep_proto::Protocol, u16)> = Vec::new();
        for c in changes.iter().filter(|c| failed.contains(&c.seq)) {
            if let Change::Upserted(m) = &c.change {
                if core.server.remove_failed(&m.key, m.kind, m.nonce) {
                    undone.push((m.nonce, m.key.protocol, m.key.internal_port));
                }
            }
        }
        if undone.is_empty() {
            return;
        }
        let cfg = core.server.config();
        let cp = cfg.code_points;
        let lifetime = cfg.short_error_lifetime;
        for r in replies.iter_mut() {
            **r = r.rewrite(|bytes| network_failure(bytes, &cp, lifetime, &undone));
        }
    }

    /// Hands the core's pending changes and the replies that depend on them
    /// on. Called with the core locked, so jobs queue in log order.
    pub(crate) fn submit(
        &self,
        mut core: MutexGuard<'_, Core>,
        mut replies: SendBatch,
        socket: usize,
    ) {
        let changes: Vec<ChangeRecord> = core.server.drain_changes().collect();
        let volatile = if changes.is_empty() {
            Vec::new()
        } else {
            core.server.drain_volatile()
        };
        match &self.queue {
            None => {
                let failed = self.apply(&changes);
                if !failed.is_empty() {
                    self.undo_failed(&mut core, &changes, &failed, &mut [&mut replies]);
                    let undo: Vec<ChangeRecord> = core.server.drain_changes().collect();
                    self.apply(&undo);
                }
                drop(core);
                if let Some(s) = self.sockets.get(socket) {
                    let _ = replies.flush(s);
                }
            }
            Some((q, cv)) => {
                if changes.is_empty() && replies.is_empty() {
                    return;
                }
                q.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .jobs
                    .push_back(Job {
                        changes,
                        replies,
                        socket,
                        volatile,
                        reset: None,
                    });
                drop(core);
                cv.notify_one();
            }
        }
    }

    /// Queues a switch of the store and dataplane to `reset` (plus any
    /// changes the core made since), behind everything queued before and
    /// ahead of every reply to come.
    pub(crate) fn submit_reset(&self, mut core: MutexGuard<'_, Core>, reset: Reset) {
        let changes: Vec<ChangeRecord> = core.server.drain_changes().collect();
        let _ = core.server.drain_volatile();
        match &self.queue {
            None => {
                self.reset_dataplane(&reset.state);
                let _ = self.apply(&changes);
            }
            Some((q, cv)) => {
                q.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .jobs
                    .push_back(Job {
                        changes,
                        replies: SendBatch::default(),
                        socket: 0,
                        volatile: Vec::new(),
                        reset: Some(reset),
                    });
                drop(core);
                cv.notify_one();
            }
        }
    }

    /// Rebuilds the dataplane from scratch holding exactly `state`'s
    /// mappings (a new instance rebuilds its nftables table on first use).
    fn reset_dataplane(&self, state: &Restored) {
        let mut dp = new_dataplane(&self.dataplane_kind);
        let install: Vec<ChangeRecord> = state
            .mappings
            .iter()
            .map(|m| ChangeRecord {
                seq: 0,
                change: Change::Upserted(m.clone()),
            })
            .collect();
        if let Err(e) = dp.apply(&install) {
            tracing::error!(error = %e, "dataplane rejected the state taken over");
        }
        *self.dataplane() = dp;
    }

    /// Hands replies whose changes are committed (and, for check-points,
    /// acknowledged by the backup) to the sender thread.
    pub(crate) fn send_committed(&self, batches: Vec<(usize, SendBatch)>) {
        if batches.is_empty() {
            return;
        }
        let (oq, ocv) = &self.outbox;
        oq.lock()
            .unwrap_or_else(|p| p.into_inner())
            .batches
            .extend(batches);
        ocv.notify_one();
    }

    /// Repeats the ANNOUNCE just sent to `targets` three more times, after
    /// 250 ms, 750 ms and 1.75 s (the start of the schedule RFC 6886
    /// section 3.2.1 uses for the same purpose): one lost datagram must
    /// not leave a client unaware that its state is gone until its next
    /// renewal (RFC 6887 section 14.1.1 lets the server send it more than
    /// once).
    pub(crate) fn schedule_announce(&self, targets: Vec<(SubscriberId, IpAddr)>) {
        if targets.is_empty() {
            return;
        }
        let interval = Duration::from_millis(250);
        self.announces
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Repeat {
                due: self.clock.now() + interval,
                interval,
                left: 3,
                targets,
            });
    }

    /// Sends the repeats that are due.
    fn repeat_announces(&self) {
        let now = self.clock.now();
        let due: Vec<Vec<(SubscriberId, IpAddr)>> = {
            let mut g = self.announces.lock().unwrap_or_else(|p| p.into_inner());
            if g.is_empty() {
                return;
            }
            let mut due = Vec::new();
            for r in g.iter_mut().filter(|r| r.due <= now) {
                due.push(r.targets.clone());
                r.left -= 1;
                r.interval *= 2;
                r.due = now + r.interval;
            }
            g.retain(|r| r.left > 0);
            due
        };
        for targets in due {
            self.announce_to(self.lock(), &targets);
        }
    }

    /// A socket of the family of `dest`, to send ANNOUNCEs from.
    pub(crate) fn socket_for(&self, dest: SocketAddr) -> Option<usize> {
        self.sockets
            .iter()
            .position(|s| s.local_addr().is_ok_and(|a| a.is_ipv4() == dest.is_ipv4()))
    }

    /// Queues an ANNOUNCE (with `sub`'s epoch) to each host's port 5350
    /// (RFC 6887 section 14.1.1), behind the changes that caused it.
    pub(crate) fn announce_to(
        &self,
        core: MutexGuard<'_, Core>,
        targets: &[(SubscriberId, IpAddr)],
    ) {
        let now = self.clock.now();
        let mut by_socket: std::collections::BTreeMap<usize, SendBatch> = Default::default();
        let mut out = Vec::new();
        for &(sub, host) in targets {
            let dest = SocketAddr::new(host, portkeep_proto::CLIENT_PORT);
            let Some(i) = self.socket_for(dest) else {
                continue;
            };
            core.server.announce_for(now, Some(sub), &mut out);
            by_socket.entry(i).or_default().push(dest, &out);
        }
        let mut core = Some(core);
        if by_socket.is_empty() {
            if let Some(c) = core.take() {
                self.submit(c, SendBatch::default(), 0);
            }
            return;
        }
        for (i, batch) in by_socket {
            let guard = match core.take() {
                Some(c) => c,
                None => self.lock(),
            };
            self.submit(guard, batch, i);
        }
    }
}

/// `bytes` (a reply) turned into NETWORK_FAILURE if it reports one of the
/// `undone` mappings (by nonce, protocol and internal port, as a client
/// matches it: RFC 6887 section 11.4).
fn network_failure(
    bytes: &[u8],
    cp: &portkeep_proto::CodePoints,
    lifetime: u32,
    undone: &[(portkeep_proto::Nonce, portkeep_proto::Protocol, u16)],
) -> Vec<u8> {
    use portkeep_proto::{PcpOption, ResultCode};
    rewrite_response(bytes, cp, |r| {
        let hit = r.header.result == ResultCode::SUCCESS
            && r.data.map_part().is_some_and(|m| {
                undone.iter().any(|(n, p, port)| {
                    m.nonce == *n && m.protocol == *p && m.internal_port == *port
                })
            });
        if hit {
            r.header.result = ResultCode::NETWORK_FAILURE;
            r.header.lifetime = lifetime;
            r.options.retain(|o| *o != PcpOption::CheckpointRequired);
        }
        hit
    })
}

/// A reply changed after it was built: `edit` returns whether it changed
/// the parsed response, which is then encoded again; otherwise (or if the
/// bytes do not parse) the reply goes out as it was.
pub(crate) fn rewrite_response(
    bytes: &[u8],
    cp: &portkeep_proto::CodePoints,
    edit: impl FnOnce(&mut portkeep_proto::Response) -> bool,
) -> Vec<u8> {
    let Ok(mut r) = portkeep_proto::Response::parse(bytes, cp) else {
        return bytes.to_vec();
    };
    if !edit(&mut r) {
        return bytes.to_vec();
    }
    let mut out = Vec::with_capacity(bytes.len());
    match r.encode(cp, &mut out) {
        Ok(()) => out,
        Err(_) => bytes.to_vec(),
    }
}

fn new_dataplane(kind: &DataplaneKind) -> Box<dyn Dataplane> {
    match kind {
        DataplaneKind::Memory => Box::new(MemoryDataplane::new()),
        DataplaneKind::Nftables(n) => Box::new(crate::nft::NftDataplane::new(n.clone())),
    }
}

/// A running server.
pub struct Daemon {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    committer: Option<(JoinHandle<()>, JoinHandle<()>)>,
    local_addrs: Vec<SocketAddr>,
    data: DataDir,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("local_addrs", &self.local_addrs)
            .finish()
    }
}

/// The data directory, locked for this daemon's lifetime.
struct DataDir {
    control_socket: PathBuf,
    /// Held open: the advisory lock lives as long as the handle.
    _lock: File,
}

impl DataDir {
    /// Creates (mode 0700) and locks the data directory, so that two
    /// daemons never share one store or control socket.
    fn open(dir: &Path, control_socket: &Path) -> anyhow::Result<DataDir> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create data directory {}", dir.display()))?;
        let lock_path = dir.join("lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("cannot open {}", lock_path.display()))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
                "data directory {} is in use by another portkeepd (lock {} is held); give each daemon its own --data-dir",
                dir.display(),
                lock_path.display()
            ),
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", lock_path.display()))
            }
        }
        // We hold the lock, so a socket file left here is from a daemon
        // that died without cleaning up.
        let _ = std::fs::remove_file(control_socket);
        Ok(DataDir {
            control_socket: control_socket.to_owned(),
            _lock: lock,
        })
    }
}

fn bind(addr: SocketAddr, reuse_port: bool) -> anyhow::Result<UdpSocket> {
    let domain = Domain::for_address(addr);
    let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    if reuse_port {
        s.set_reuse_port(true)?;
    }
    // A backup binds the pair's virtual address before keepalived moves it
    // here, so that on promotion it answers from that address at once.
    if addr.is_ipv6() {
        let _ = s.set_freebind_ipv6(true);
    } else {
        let _ = s.set_freebind(true);
    }
    // Bursts of requests should queue, not drop; the kernel caps this at
    // net.core.rmem_max.
    let _ = s.set_recv_buffer_size(4 << 20);
    let _ = s.set_send_buffer_size(4 << 20);
    s.bind(&addr.into())
        .with_context(|| format!("cannot listen on {addr}"))?;
    s.set_read_timeout(Some(POLL))?;
    Ok(s.into())
}

/// What the daemon starts from.
struct Start {
    server: Server,
    store: Option<Store>,
    /// Whether state was restored (then no start-up ANNOUNCE storm).
    restored: bool,
    /// Hosts whose state was lost in the restore, to ANNOUNCE to.
    lost: Vec<(SubscriberId, IpAddr)>,
}

fn load(settings: &Settings, clock: &Clock) -> anyhow::Result<Start> {
    let now = clock.now();
    let backup = settings.ha.role == Role::Backup;
    let cfg = settings.server.clone();
    let Some(path) = settings.store.path.as_ref() else {
        return Ok(Start {
            server: Server::new(cfg, now),
            store: None,
            restored: false,
            lost: Vec::new(),
        });
    };
    let (mut store, opened) = Store::open(
        path,
        settings.store.durability,
        settings.store.recovery,
        settings.store.cache_bytes,
        now,
        &cfg.subscriber_keying,
    )?;
    let (mut server, restored, lost) = match opened {
        Opened::Fresh { moved_aside } => {
            tracing::info!(
                "no usable store at {}: starting fresh, every epoch at 0{}",
                path.display(),
                moved_aside.map_or_else(String::new, |p| format!(
                    " (damaged store moved to {})",
                    p.display()
                ))
            );
            (Server::new(cfg, now), false, Vec::new())
        }
        Opened::Restored(_) if backup => {
            // A backup serves nothing of its own: what it will serve comes
            // from the active, and replaces this store on promotion.
            tracing::info!(
                "starting as backup: the store at {} is not served",
                path.display()
            );
            (Server::new(cfg, now), true, Vec::new())
        }
        Opened::Restored(state) => {
            let stored = state.mappings.len();
            let (server, report) = Server::restore(cfg, now, state);
            tracing::info!(
                "restored {} of {stored} mappings from {} ({} expired while down, {} dropped); epochs continue",
                report.restored,
                path.display(),
                report.expired,
                report.dropped.len()
            );
            let lost: Vec<(SubscriberId, IpAddr)> = report
                .dropped
                .iter()
                .map(|m| (m.subscriber, m.key.internal_ip))
                .collect();
            (server, true, lost)
        }
    };
    // Expiries and resets found while restoring are stored before serving.
    let changes: Vec<ChangeRecord> = server.drain_changes().collect();
    if !changes.is_empty() {
        store.write(&changes, now)?;
    }
    Ok(Start {
        server,
        store: Some(store),
        restored,
        lost,
    })
}

impl Daemon {
    /// Opens the data directory and store, binds every listen address and
    /// starts serving.
    pub fn start(settings: Settings) -> anyhow::Result<Daemon> {
        let data = DataDir::open(&settings.data_dir, &settings.control_socket)?;
        let control = UnixListener::bind(&settings.control_socket).with_context(|| {
            format!(
                "cannot create control socket {}",
                settings.control_socket.display()
            )
        })?;
        let clock = Clock::start();
        let ha = Ha::new(
            settings.ha.clone(),
            &settings.data_dir,
            settings.server.subscriber_keying.clone(),
        )?;
        let mut start = load(&settings, &clock)?;
        if settings.ha.role == Role::Active {
            // RFC 7767 section 3.2: nothing is honoured until the backup is
            // in sync.
            start
                .server
                .set_backup_state(portkeep_server::BackupState::Disconnected);
        }
        // The link listens before anything is served, so a port conflict
        // is reported at start.
        let link_listener = match &settings.ha.link {
            Some(l) => {
                let t = std::net::TcpListener::bind(l.listen).with_context(|| {
                    format!("cannot listen for the replication link on {}", l.listen)
                })?;
                t.set_nonblocking(true)?;
                Some((l.clone(), t))
            }
            None => None,
        };
        let mut dataplane = new_dataplane(&settings.dataplane);
        // Re-install what was restored, before anyone is answered. The
        // first apply also builds (or rebuilds) the nftables table, so it
        // runs even with nothing to install.
        let installed: Vec<ChangeRecord> = start
            .server
            .mappings()
            .into_iter()
            .map(|m| ChangeRecord {
                seq: 0,
                change: Change::Upserted(m),
            })
            .collect();
        dataplane.apply(&installed)?;
        let workers = settings.workers.max(1);
        // Bind every worker's socket before serving, so a port conflict is
        // reported at start and an ephemeral port (`:0`) is shared.
        let mut per_worker: Vec<Vec<UdpSocket>> = (0..workers).map(|_| Vec::new()).collect();
        let mut local_addrs = Vec::new();
        for &addr in &settings.listen {
            let first = bind(addr, workers > 1)?;
            let actual = first.local_addr()?;
            local_addrs.push(actual);
            per_worker[0].push(first);
            for w in per_worker.iter_mut().skip(1) {
                w.push(bind(actual, true)?);
            }
        }
        let flat: Vec<UdpSocket> = per_worker.into_iter().flatten().collect();
        let sockets = flat
            .iter()
            .map(UdpSocket::try_clone)
            .collect::<Result<Vec<_>, _>>()?;
        // Replies go through the committer whenever something must happen
        // before they are sent: a store commit, or the backup's
        // acknowledgement.
        let queue = (start.store.is_some() || settings.ha.role != Role::Standalone)
            .then(|| (Mutex::new(Queue::default()), Condvar::new()));
        let shared = Arc::new(Shared {
            core: Mutex::new(Core {
                server: start.server,
            }),
            dataplane: Mutex::new(dataplane),
            stop: AtomicBool::new(false),
            drained: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            clock,
            listen: local_addrs.clone(),
            sockets,
            queue,
            outbox: (Mutex::new(Outbox::default()), Condvar::new()),
            commit_delay: settings.store.commit_delay,
            ha,
            server_cfg: settings.server.clone(),
            dataplane_kind: settings.dataplane.clone(),
            announces: Mutex::new(Vec::new()),
        });
        let committer = match (start.store, &shared.queue) {
            (store, Some(_)) => {
                let s1 = shared.clone();
                let s2 = shared.clone();
                let c = std::thread::Builder::new()
                    .name("committer".into())
                    .spawn(move || committer(&s1, store))?;
                let s = std::thread::Builder::new()
                    .name("sender".into())
                    .spawn(move || sender(&s2))?;
                Some((c, s))
            }
            (_, None) => None,
        };
        let mut threads = Vec::new();
        if let Some((link, listener)) = link_listener {
            let shared = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("replication".into())
                    .spawn(move || ha::run(shared, link, listener))?,
            );
        }
        for (i, sock) in flat.into_iter().enumerate() {
            let shared = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("pcp-{i}"))
                    .spawn(move || worker(&shared, &sock, i))?,
            );
        }
        {
            let shared = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("expiry".into())
                    .spawn(move || housekeeping(&shared))?,
            );
        }
        {
            let shared = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("control".into())
                    .spawn(move || control::serve(&shared, &control))?,
            );
        }
        if settings.ha.role == Role::Backup {
            // Not serving: nothing to announce until promoted.
        } else if start.restored {
            // State survived: no storm of ANNOUNCEs, except to the few
            // subscribers that lost mappings in the restore.
            if !start.lost.is_empty() {
                shared.announce_to(shared.lock(), &start.lost);
            }
        } else {
            let shared = shared.clone();
            let unicast = settings.announce_unicast.clone();
            let ifaces = settings.announce_interfaces.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("announce".into())
                    .spawn(move || announce(&shared, &unicast, &ifaces))?,
            );
        }
        Ok(Daemon {
            shared,
            threads,
            committer,
            local_addrs,
            data,
        })
    }

    /// The addresses actually bound (ephemeral ports resolved).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    /// Number of mappings held.
    pub fn mapping_count(&self) -> usize {
        self.shared.lock().server.mapping_count()
    }

    /// Whether the daemon stopped itself because its store failed.
    pub fn has_failed(&self) -> bool {
        self.shared.failed.load(Ordering::SeqCst)
    }

    /// Stops every thread and waits for them; everything queued is
    /// committed first.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // The committer drains what the workers queued before they stopped.
        self.shared.drained.store(true, Ordering::SeqCst);
        if let Some((_, cv)) = &self.shared.queue {
            cv.notify_all();
        }
        if let Some((c, s)) = self.committer.take() {
            let _ = c.join();
            let (q, cv) = &self.shared.outbox;
            q.lock().unwrap_or_else(|p| p.into_inner()).closed = true;
            cv.notify_all();
            let _ = s.join();
        }
        let _ = std::fs::remove_file(&self.data.control_socket);
    }

    /// The control socket's path.
    pub fn control_socket(&self) -> &Path {
        &self.data.control_socket
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

fn worker(shared: &Shared, sock: &UdpSocket, index: usize) {
    let mut rb = RecvBatch::default();
    let mut out = Vec::with_capacity(mmsg::BUF);
    while !shared.stop.load(Ordering::Relaxed) {
        match mmsg::recv_batch(sock, &mut rb) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(e) => {
                tracing::error!(error = %e, "receive failed");
                std::thread::sleep(POLL);
                continue;
            }
        }
        if !shared.ha.serving.load(Ordering::Relaxed) {
            // A backup, or an active node not yet sure it was not deposed:
            // clients retransmit (RFC 6887 section 8.1.1) and reach
            // whichever node serves.
            continue;
        }
        let now = shared.clock.now();
        let mut replies = SendBatch::default();
        let mut core = shared.lock();
        for (src, data) in rb.iter() {
            if core.server.handle(now, src, data, &mut out) == Outcome::Reply {
                replies.push(src, &out);
            }
        }
        shared.submit(core, replies, index);
    }
}

/// Group commit: everything queued goes into one transaction, then to the
/// dataplane and (for an active node) to the backup; the replies then go to
/// the sender thread, so the next commit starts while they are sent. A
/// reply whose check-point the backup must confirm waits for that first.
fn committer(shared: &Shared, mut store: Option<Store>) {
    let Some((q, cv)) = &shared.queue else {
        return;
    };
    loop {
        let mut waited = false;
        let jobs: Vec<Job> = {
            let mut g = q.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(st) = store.as_mut() {
                if g.jobs.is_empty() && st.log_len() > 0 && !shared.drained.load(Ordering::Relaxed)
                {
                    // Idle: fold a little of the log into the tables now,
                    // while nobody is waiting for a commit.
                    drop(g);
                    if let Err(e) = st.checkpoint(crate::store::CHECKPOINT_IDLE) {
                        fail(shared, &e);
                        return;
                    }
                    continue;
                }
            }
            while g.jobs.is_empty() && !shared.drained.load(Ordering::Relaxed) {
                let (ng, _) = cv.wait_timeout(g, POLL).unwrap_or_else(|p| p.into_inner());
                g = ng;
                waited = true;
                if g.jobs.is_empty()
                    && store
                        .as_ref()
                        .is_some_and(|s| s.flush_due(shared.clock.now()))
                {
                    break;
                }
            }
            if waited && !g.jobs.is_empty() && !shared.commit_delay.is_zero() && store.is_some() {
                // Work arrived after a quiet spell: give the rest of its
                // burst a moment to join the same fsync.
                let (ng, _) = cv
                    .wait_timeout(g, shared.commit_delay)
                    .unwrap_or_else(|p| p.into_inner());
                g = ng;
            }
            g.jobs.drain(..).collect()
        };
        let now = shared.clock.now();
        if jobs.is_empty() {
            if let Some(st) = store.as_mut() {
                if let Err(e) = st.flush(now) {
                    fail(shared, &e);
                    return;
                }
            }
            if shared.drained.load(Ordering::Relaxed) {
                return;
            }
            continue;
        }
        // A reset (promotion, demotion) splits the batch: what came before
        // it is committed first.
        let mut segment = Vec::with_capacity(jobs.len());
        for mut job in jobs {
            if let Some(reset) = job.reset.take() {
                if !commit(shared, &mut store, std::mem::take(&mut segment), now) {
                    return;
                }
                if let Some(st) = store.as_mut() {
                    if let Err(e) = st.replace(&reset.state) {
                        fail(shared, &e);
                        return;
                    }
                }
                shared.reset_dataplane(&reset.state);
            }
            segment.push(job);
        }
        if !commit(shared, &mut store, segment, now) {
            return;
        }
    }
}

/// Commits one run of jobs; false if the store failed.
fn commit(
    shared: &Shared,
    store: &mut Option<Store>,
    mut jobs: Vec<Job>,
    now: portkeep_server::Timestamp,
) -> bool {
    if jobs.is_empty() {
        return true;
    }
    let role = shared.ha.role();
    let replicating = shared.ha.replicates(role);
    let mut changes: Vec<ChangeRecord> = Vec::new();
    let mut metas = Vec::with_capacity(if replicating { jobs.len() } else { 0 });
    for j in &mut jobs {
        if replicating {
            metas.push(shared.ha.meta(&j.changes, std::mem::take(&mut j.volatile)));
        }
        changes.append(&mut j.changes);
    }
    if !changes.is_empty() {
        // nftables takes about as long as an fsync: run the two side by
        // side rather than one after the other (replies wait for both). If
        // the store then fails, the daemon stops, and on restart the table
        // is rebuilt from the store, so nothing unstored stays installed.
        let parallel =
            store.is_some() && matches!(shared.dataplane_kind, DataplaneKind::Nftables(_));
        let (written, failed) = if parallel {
            std::thread::scope(|s| {
                let dp = s.spawn(|| shared.apply(&changes));
                let w = store.as_mut().map_or(Ok(()), |st| st.write(&changes, now));
                (w, dp.join().unwrap_or_default())
            })
        } else {
            let w = store.as_mut().map_or(Ok(()), |st| st.write(&changes, now));
            match w {
                Ok(()) => (Ok(()), shared.apply(&changes)),
                Err(e) => (Err(e), Vec::new()),
            }
        };
        if let Err(e) = written {
            fail(shared, &e);
            return false;
        }
        if !failed.is_empty() {
            let mut core = shared.lock();
            let mut all: Vec<&mut SendBatch> = jobs.iter_mut().map(|j| &mut j.replies).collect();
            shared.undo_failed(&mut core, &changes, &failed, &mut all);
            // The removals are committed (and taken off the dataplane) in
            // the next round, like any change.
            shared.submit(core, SendBatch::default(), 0);
        }
    }
    let checkpoint_due = store.as_ref().is_some_and(Store::checkpoint_due);
    let committed = changes.len();
    let mut release = Vec::with_capacity(jobs.len());
    let rejected = if replicating {
        let jobs = jobs
            .into_iter()
            .zip(metas)
            .map(|(j, m)| (j.socket, j.replies, m))
            .collect();
        shared.ha.after_commit(now, jobs, &mut release)
    } else if role == Role::Backup {
        // Demoted while these were queued: a backup answers nothing.
        Vec::new()
    } else {
        release.extend(
            jobs.into_iter()
                .filter(|j| !j.replies.is_empty())
                .map(|j| (j.socket, j.replies)),
        );
        Vec::new()
    };
    release.retain(|(_, r)| !r.is_empty());
    shared.send_committed(release);
    ha::reject(shared, rejected);
    // Under sustained load the committer is never idle: keep the log
    // bounded anyway (the replies above are already on their way),
    // folding about twice what was just written, so the log shrinks
    // while each step stays short.
    if checkpoint_due {
        let step =
            (2 * committed).clamp(crate::store::CHECKPOINT_IDLE, crate::store::CHECKPOINT_BUSY);
        if let Some(st) = store.as_mut() {
            if let Err(e) = st.checkpoint(step) {
                fail(shared, &e);
                return false;
            }
        }
    }
    true
}

/// Sends replies whose changes are committed.
fn sender(shared: &Shared) {
    let (q, cv) = &shared.outbox;
    loop {
        let batches: Vec<(usize, SendBatch)> = {
            let mut g = q.lock().unwrap_or_else(|p| p.into_inner());
            while g.batches.is_empty() && !g.closed {
                g = cv.wait(g).unwrap_or_else(|p| p.into_inner());
            }
            if g.batches.is_empty() {
                return;
            }
            g.batches.drain(..).collect()
        };
        for (socket, mut replies) in batches {
            if let Some(s) = shared.sockets.get(socket) {
                let _ = replies.flush(s);
            }
        }
    }
}

/// The store failed: answering on would acknowledge what might be lost,
/// so the daemon stops (fail-stop); queued replies are never sent.
fn fail(shared: &Shared, e: &crate::store::StoreError) {
    tracing::error!("{e}; stopping: no response is sent for changes that are not stored");
    shared.failed.store(true, Ordering::SeqCst);
    shared.stop.store(true, Ordering::SeqCst);
    if let Some((q, _)) = &shared.queue {
        q.lock().unwrap_or_else(|p| p.into_inner()).jobs.clear();
    }
}

/// Expires mappings when the core's timer says so (RFC 6887 section 15).
fn housekeeping(shared: &Shared) {
    while !shared.stop.load(Ordering::Relaxed) {
        let now = shared.clock.now();
        let mut core = shared.lock();
        core.server.handle_timeout(now);
        let wait = core
            .server
            .poll_timeout()
            .map_or(POLL, |t| (t - now).clamp(Duration::from_millis(1), POLL));
        shared.submit(core, SendBatch::default(), 0);
        shared.repeat_announces();
        std::thread::sleep(wait);
    }
}

/// Sends unsolicited ANNOUNCEs after a fresh start (RFC 6887 section
/// 14.1.1): to the configured unicast clients and to the all-hosts groups
/// on the configured interfaces, ten times at doubling intervals from
/// 250 ms, the schedule NAT-PMP uses for the same purpose (RFC 6886 section
/// 3.2.1).
fn announce(shared: &Shared, unicast: &[SocketAddr], ifaces: &[String]) {
    if unicast.is_empty() && ifaces.is_empty() {
        return;
    }
    let multicast: Vec<(UdpSocket, SocketAddr)> = ifaces
        .iter()
        .flat_map(|i| match multicast_sockets(i) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(interface = %i, error = %e, "cannot send ANNOUNCE on interface");
                Vec::new()
            }
        })
        .collect();
    let mut out = Vec::new();
    let mut interval = Duration::from_millis(250);
    for _ in 0..10 {
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
        shared
            .lock()
            .server
            .unsolicited_announce(shared.clock.now(), &mut out);
        for dest in unicast {
            if let Some(s) = shared.socket_for(*dest).and_then(|i| shared.sockets.get(i)) {
                if let Err(e) = s.send_to(&out, dest) {
                    tracing::debug!(%dest, error = %e, "ANNOUNCE not sent");
                }
            }
        }
        for (s, dest) in &multicast {
            if let Err(e) = s.send_to(&out, dest) {
                tracing::debug!(%dest, error = %e, "ANNOUNCE not sent");
            }
        }
        let mut slept = Duration::ZERO;
        while slept < interval && !shared.stop.load(Ordering::Relaxed) {
            std::thread::sleep(POLL.min(interval - slept));
            slept += POLL.min(interval - slept);
        }
        interval *= 2;
    }
}

/// Sockets that send to 224.0.0.1:5350 and [ff02::1]:5350 out of `iface`.
fn multicast_sockets(iface: &str) -> anyhow::Result<Vec<(UdpSocket, SocketAddr)>> {
    let index: u32 = std::fs::read_to_string(format!("/sys/class/net/{iface}/ifindex"))
        .with_context(|| format!("no interface named {iface}"))?
        .trim()
        .parse()
        .context("unreadable interface index")?;
    let port = portkeep_proto::CLIENT_PORT;
    let mut v = Vec::new();
    let s4 = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s4.bind_device(Some(iface.as_bytes()))?;
    s4.set_multicast_ttl_v4(1)?;
    v.push((
        s4.into(),
        SocketAddr::new(IpAddr::from([224, 0, 0, 1]), port),
    ));
    let s6 = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
    s6.set_multicast_if_v6(index)?;
    s6.set_multicast_hops_v6(1)?;
    let dest = std::net::SocketAddrV6::new("ff02::1".parse()?, port, 0, index);
    v.push((s6.into(), SocketAddr::V6(dest)));
    Ok(v)
}
