//! The serving node: the core behind its lock, the committer that makes
//! every change durable and installed before its reply leaves, and the
//! driver of the pair's sans-IO state machine ([`portkeep_ha::Node`]),
//! whose effects it carries out.
//!
//! With a store (the default), a worker's batch of changes and replies goes
//! to the committer thread. The committer takes everything queued, writes
//! it in one transaction (group commit: one fsync for many requests),
//! applies it to the dataplane, and hands the replies to the node, which
//! says which leave now, which wait for the backup, and which must be
//! rewritten. Without a store and without a pair, the worker applies the
//! changes and sends the replies itself.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use portkeep_ha::{Effect, Grant, SnapshotSource, Term};
use portkeep_server::{
    Change, ChangeRecord, Dataplane, DataplaneError, MappingKind, MemoryDataplane, RemoveReason,
    Restored, Server, ServerConfig, SubscriberId, Timestamp,
};
use serde_json::{json, Value};

use crate::clock::{Clock, Stopwatch};
use crate::config::DataplaneKind;
use crate::mmsg::SendBatch;
use crate::pair::{Pair, ReplicaCmd, Reply};
use crate::replica::ReplicaStore;
use crate::store::Store;

/// How often threads look up from waiting to check for shutdown.
pub(crate) const POLL: Duration = Duration::from_millis(100);

/// The core, behind one lock.
pub(crate) struct Core {
    pub(crate) server: Server,
}

/// Work for the committer: changes to make durable and install, then the
/// replies that report them.
pub(crate) struct Job {
    changes: Vec<ChangeRecord>,
    replies: SendBatch,
    socket: usize,
    /// Subscribers whose hosts with volatile mappings changed (for the
    /// backup; see `Server::drain_volatile`).
    volatile: Vec<(SubscriberId, Vec<IpAddr>, Timestamp)>,
    /// Replace the store and the dataplane with this state first
    /// (promotion and demotion), in log order.
    reset: Option<Reset>,
    /// A log position the replies depend on besides their own changes
    /// (`portkeep_ha::JobMeta::after`).
    after: u64,
    /// When it reached the committer's queue.
    queued: Stopwatch,
    /// When its replies were made (`portkeep_ha::JobMeta::made_at`).
    made: portkeep_server::Timestamp,
}

/// The whole state a node switches to on promotion or demotion.
#[derive(Debug)]
pub(crate) struct Reset {
    pub(crate) state: Restored,
    /// Clear the backup's stored replica once `state` is stored, before
    /// anything after the reset is committed (promotion).
    pub(crate) clear_replica: bool,
}

#[derive(Default)]
pub(crate) struct Queue {
    jobs: VecDeque<Job>,
}

pub(crate) struct Shared {
    pub(crate) core: Mutex<Core>,
    /// The check-point classes served (RFC 7767 section 4), for the class
    /// field of mapping log records: read by the committer without the
    /// core's lock, replaced by a reload.
    pub(crate) classes: std::sync::RwLock<Arc<portkeep_server::CheckpointPolicy>>,
    pub(crate) dataplane: Mutex<Box<dyn Dataplane>>,
    pub(crate) stop: AtomicBool,
    /// Set once the workers have stopped: the committer then drains the
    /// queue and exits.
    pub(crate) drained: AtomicBool,
    /// Set when the store failed: the daemon stops rather than answer
    /// without durability.
    pub(crate) failed: AtomicBool,
    pub(crate) clock: Clock,
    pub(crate) listen: Vec<SocketAddr>,
    /// Every PCP socket, for sending replies and ANNOUNCEs.
    pub(crate) sockets: Vec<UdpSocket>,
    /// `None` in memory mode.
    pub(crate) queue: Option<(Mutex<Queue>, Condvar)>,
    /// How long the committer waits for more work before committing.
    pub(crate) commit_delay: Duration,
    /// Role in an active/backup pair, and the replication link.
    pub(crate) pair: Pair,
    /// Which dataplane to build again on promotion and demotion.
    pub(crate) dataplane_kind: DataplaneKind,
    /// ANNOUNCEs to repeat: when, to whom, the interval after that, and how
    /// many more.
    /// Where ANNOUNCEs to everyone go: (socket, interface index, group)
    /// per interface and family (`runtime::multicast_senders`)...
    pub(crate) announce_multicast: Vec<(usize, u32, IpAddr)>,
    /// ...and these addresses (`[announce] unicast`).
    pub(crate) announce_unicast: Mutex<Vec<SocketAddr>>,
    /// Bound of each reply queue (`[limits] max_queued_replies`).
    pub(crate) max_queued: usize,
    /// Replies handled by the core and waiting for the committer.
    pub(crate) queued: AtomicUsize,
    /// Workers holding received datagrams whose job is not queued yet, or
    /// whose last receive filled its batch: more work for the committer
    /// is on its way (`runtime::worker`).
    pub(crate) handling: AtomicUsize,
    /// Datagrams shed because a queue was full.
    pub(crate) shed: AtomicU64,
    /// Microseconds from a job's arrival at the committer to its replies'
    /// release by the commit (`ctl counters`: `commit_latency_us`).
    pub(crate) commit_latency: Mutex<hdrhistogram::Histogram<u64>>,
    /// The same, in seconds, and the jobs of each commit: the metrics
    /// endpoint's histograms (`docs/metrics.md`).
    pub(crate) commit_seconds: prometheus_client::metrics::histogram::Histogram,
    pub(crate) commit_group: prometheus_client::metrics::histogram::Histogram,
    /// Seconds each dataplane batch took, and changes it failed.
    pub(crate) dataplane_seconds: prometheus_client::metrics::histogram::Histogram,
    pub(crate) dataplane_failures: AtomicU64,
    /// One counter per serving loop, moved at every turn: what the
    /// systemd watchdog is fed from ([`Beats`]).
    pub(crate) beats: Beats,
    /// `ctl reload` asked the process to read its configuration again
    /// (the process, which knows the file, does it: `Daemon::reload`).
    pub(crate) reload_requested: AtomicBool,
    /// The outcome of the last reload, and how many there were.
    pub(crate) last_reload: Mutex<(u64, serde_json::Value)>,
}

/// The serving loops' progress: each loop (a PCP worker, the committer)
/// moves its counter at every turn, idle turns included (each
/// waits at most [`POLL`]), so a loop that stopped turning (a deadlock, a
/// hang on a lock or a disk) shows as a counter that stood still.
#[derive(Debug, Default)]
pub(crate) struct Beats {
    loops: Vec<(String, AtomicU64)>,
}

impl Beats {
    /// Counters for loops with these names.
    pub(crate) fn new(names: impl IntoIterator<Item = String>) -> Beats {
        Beats {
            loops: names.into_iter().map(|n| (n, AtomicU64::new(0))).collect(),
        }
    }

    /// Loop `name` turned.
    pub(crate) fn beat(&self, name: &str) {
        if let Some((_, c)) = self.loops.iter().find(|(n, _)| n == name) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Loop number `i` turned.
    pub(crate) fn beat_at(&self, i: usize) {
        if let Some((_, c)) = self.loops.get(i) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The loops whose counter did not move since `last` (updated).
    pub(crate) fn stalled(&self, last: &mut Vec<u64>) -> Vec<String> {
        last.resize(self.loops.len(), u64::MAX);
        let mut out = Vec::new();
        for ((name, c), seen) in self.loops.iter().zip(last.iter_mut()) {
            let now = c.load(Ordering::Relaxed);
            if now == *seen {
                out.push(name.clone());
            }
            *seen = now;
        }
        out
    }
}

/// A digest of the policy a node serves (`ctl status`, the metrics'
/// `portkeep_config_info`): the core's whole configuration but its port
/// randomisation seed, so the two nodes of a pair, whose listen addresses
/// and link settings differ by design, show the same digest exactly when
/// they would answer a client alike. CRC-32 of its debug form: stable for
/// one build, enough to spot a difference at a glance.
pub(crate) fn policy_digest(cfg: &ServerConfig) -> String {
    let mut c = cfg.clone();
    c.seed = 0;
    format!("{:08x}", crc32fast::hash(format!("{c:?}").as_bytes()))
}

/// Buckets of [`Shared::commit_seconds`]: 50 µs to about 3.3 s, doubling.
pub(crate) fn commit_seconds_histogram() -> prometheus_client::metrics::histogram::Histogram {
    prometheus_client::metrics::histogram::Histogram::new(
        prometheus_client::metrics::histogram::exponential_buckets(50e-6, 2.0, 17),
    )
}

/// Buckets of [`Shared::commit_group`]: 1 to 4,096 jobs, doubling.
pub(crate) fn commit_group_histogram() -> prometheus_client::metrics::histogram::Histogram {
    prometheus_client::metrics::histogram::Histogram::new(
        prometheus_client::metrics::histogram::exponential_buckets(1.0, 2.0, 13),
    )
}

/// A PEER mapping's remote peer, empty for MAP.
fn peer_of(m: &portkeep_server::MappingRecord) -> String {
    match m.kind {
        MappingKind::Map => String::new(),
        MappingKind::Peer { remote } => remote.to_string(),
    }
}

fn log_change(c: &ChangeRecord, classes: &portkeep_server::CheckpointPolicy) {
    let class_of = |m: &portkeep_server::MappingRecord| {
        classes
            .class(classes.class_of(m.subscriber))
            .map_or("", |c| c.name.as_str())
            .to_owned()
    };
    match &c.change {
        Change::Upserted(m) => {
            let kind = match m.kind {
                MappingKind::Map => "MAP".to_owned(),
                MappingKind::Peer { remote } => format!("PEER to {remote}"),
            };
            // The fields are what a CGN operator keeps to answer who held
            // an address and port when (docs/operations.md, "Logs").
            tracing::info!(
                seq = c.seq,
                record = "mapping",
                event = if c.started { "started" } else { "renewed" },
                protocol = m.key.protocol.0,
                internal = %std::net::SocketAddr::new(m.key.internal_ip, m.key.internal_port),
                external = %m.external,
                remote = peer_of(m).as_str(),
                subscriber = %m.subscriber,
                class = class_of(m),
                lifetime = m.lifetime,
                expires_ms = m.expires.as_millis(),
                checkpoint = m.checkpoint,
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
                record = "mapping",
                event = "ended",
                reason = why,
                protocol = m.key.protocol.0,
                internal = %std::net::SocketAddr::new(m.key.internal_ip, m.key.internal_port),
                external = %m.external,
                remote = peer_of(m).as_str(),
                subscriber = %m.subscriber,
                class = class_of(m),
                checkpoint = m.checkpoint,
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
        Change::Requester {
            ip,
            state: Some(st),
        } => {
            tracing::debug!(
                seq = c.seq,
                "THIRD_PARTY requester {ip} (port {}){}",
                st.port,
                if st.anchor.is_some() {
                    ", its own epoch"
                } else {
                    ""
                }
            );
        }
        Change::Requester { ip, state: None } => {
            tracing::debug!(seq = c.seq, "THIRD_PARTY requester {ip} forgotten");
        }
        Change::AnnounceOwed {
            subscriber, hosts, ..
        } => {
            tracing::info!(
                seq = c.seq,
                "{} hosts of subscriber {subscriber} owed an ANNOUNCE",
                hosts.len()
            );
        }
        Change::PortHeld(h) => {
            tracing::debug!(
                seq = c.seq,
                "{} {} held for {}:{} until {} ms",
                h.owner.protocol,
                h.external,
                h.owner.internal_ip,
                h.owner.internal_port,
                h.until.as_millis()
            );
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

    /// Applies changes to the dataplane; returns what did not take effect.
    fn apply(&self, changes: &[ChangeRecord]) -> Option<DataplaneError> {
        // Formatting costs more than the request itself; skip it when
        // nobody will read the lines.
        if tracing::enabled!(tracing::Level::INFO) {
            let classes = self
                .classes
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            for c in changes {
                log_change(c, &classes);
            }
        }
        let watch = crate::clock::Stopwatch::start();
        let failed = apply_guarded(&mut **self.dataplane(), changes);
        self.dataplane_seconds.observe(watch.micros() as f64 / 1e6);
        if let Some(e) = &failed {
            self.dataplane_failures
                .fetch_add(e.failed.len().max(1) as u64, Ordering::Relaxed);
        }
        failed
    }

    /// RFC 6887 section 7.4: a change the dataplane refused is answered
    /// NETWORK_FAILURE ("a network failure ... unable to create mapping";
    /// a short-lifetime error: the client may retry soon), and the core
    /// decides what that leaves (`Server::refused`): a refused renewal
    /// keeps the mapping the NAT still holds, a mapping the NAT lost is a
    /// loss (its epoch restarts), a failed creation is taken back.
    /// `replies` are rewritten in place, with the epoch their client now
    /// sees. A failed removal needs nothing here: the core dropped the
    /// mapping already, and the dataplane itself makes sure its rules go
    /// (the nftables one rebuilds its table without them;
    /// [`crate::bounded`] keeps removals it could not hand over for the
    /// next batch).
    fn undo_failed(
        &self,
        core: &mut Core,
        changes: &[ChangeRecord],
        failed: &DataplaneError,
        replies: &mut [&mut SendBatch],
    ) {
        let now = self.clock.now();
        let mut undone: Vec<(portkeep_proto::Nonce, portkeep_proto::Protocol, u16)> = Vec::new();
        let mut lost = false;
        for c in changes.iter().filter(|c| failed.failed.contains(&c.seq)) {
            if let Change::Upserted(m) = &c.change {
                let how = failed.refused(c.seq);
                if core.server.refused(now, &m.key, m.kind, m.nonce, how) {
                    undone.push((m.nonce, m.key.protocol, m.key.internal_port));
                    lost |= how == portkeep_server::Refused::Lost;
                }
            }
        }
        if undone.is_empty() {
            return;
        }
        if lost {
            // A reply made before the loss and still waiting for the
            // backup would grant what the NAT lost: like an operator's
            // clear, every reply made before now is made again at its
            // release, which drops one whose mapping is gone (lock order:
            // the core, then the node).
            self.pair.node().cleared(now);
        }
        let server = &core.server;
        let cfg = server.config();
        let cp = cfg.code_points;
        let lifetime = cfg.short_error_lifetime;
        for r in replies.iter_mut() {
            **r = r.rewrite(|to, bytes| {
                let epoch = server.requester_epoch(now, to.ip());
                network_failure(bytes, &cp, lifetime, epoch, &undone)
            });
        }
    }

    /// Whether a reply queue is past its bound: new datagrams are then
    /// shed before the core handles them (their clients retransmit, RFC
    /// 6887 section 8.1.1), never after, so no change the core applied is
    /// ever dropped. Each queue stays within its bound plus one batch per
    /// worker.
    pub(crate) fn overloaded(&self) -> bool {
        self.queued.load(Ordering::Relaxed) >= self.max_queued
    }

    /// Hands the core's pending changes and the replies that depend on them
    /// on. Called with the core locked, so jobs queue in log order.
    pub(crate) fn submit(&self, core: MutexGuard<'_, Core>, replies: SendBatch, socket: usize) {
        self.submit_after(core, replies, socket, 0);
    }

    /// Hands the core's pending changes on, with no replies.
    pub(crate) fn submit_changes(&self, core: MutexGuard<'_, Core>) {
        self.submit(core, SendBatch::default(), 0);
    }

    /// [`Shared::submit`] for replies that also depend on log position
    /// `after` (`portkeep_ha::Effect::Rewrite`).
    pub(crate) fn submit_after(
        &self,
        mut core: MutexGuard<'_, Core>,
        mut replies: SendBatch,
        socket: usize,
        after: u64,
    ) {
        let changes: Vec<ChangeRecord> = core.server.drain_changes().collect();
        let volatile = if changes.is_empty() {
            Vec::new()
        } else {
            core.server.drain_volatile()
        };
        match &self.queue {
            None => {
                if let Some(failed) = self.apply(&changes) {
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
                self.queued.fetch_add(replies.len(), Ordering::Relaxed);
                q.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .jobs
                    .push_back(Job {
                        changes,
                        replies,
                        socket,
                        volatile,
                        reset: None,
                        after,
                        queued: Stopwatch::start(),
                        made: self.clock.now(),
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
                        after: 0,
                        queued: Stopwatch::start(),
                        made: self.clock.now(),
                    });
                drop(core);
                cv.notify_one();
            }
        }
    }

    /// Rebuilds the dataplane from scratch holding exactly `state`'s
    /// mappings (a new instance rebuilds its nftables table on first use).
    fn reset_dataplane(&self, state: &Restored) {
        // The old instance goes first: with `on_stop = "flush"` dropping it
        // deletes the table, which must not happen after the new one has
        // filled it. Dropping it waits for its thread, also while a late
        // batch or a rebuild still runs there: either would otherwise
        // program the table the new instance fills.
        let mut slot = self.dataplane();
        drop(std::mem::replace(
            &mut *slot,
            Box::new(MemoryDataplane::new()) as Box<dyn Dataplane>,
        ));
        let mut dp = new_dataplane(&self.dataplane_kind);
        if let Err(e) = dp.apply(&installs(&state.mappings)) {
            tracing::error!(error = %e, "dataplane rejected the state taken over");
        }
        *slot = bounded(dp, &self.dataplane_kind);
    }

    /// Sends replies whose changes are committed (and, for check-points,
    /// acknowledged by the backup), from the thread that released them:
    /// the committer, or the link's for a reply that waited for the
    /// backup. A hand-off to another thread would cost each reply a
    /// wake-up (a tenth of the durable path's throughput, measured), and
    /// a UDP send does not wait for the peer. A node frozen after the
    /// commit and woken after the witness's lease ran out sends nothing:
    /// another node may serve by now.
    pub(crate) fn send_committed(&self, batches: Vec<(usize, SendBatch)>) {
        if batches.is_empty() || !self.pair.lease_allows() {
            return;
        }
        for (socket, mut replies) in batches {
            if let Some(s) = self.sockets.get(socket) {
                let _ = replies.flush(s);
            }
        }
    }

    /// A socket of the family of `dest`, to send ANNOUNCEs from.
    pub(crate) fn socket_for(&self, dest: SocketAddr) -> Option<usize> {
        self.sockets
            .iter()
            .position(|s| s.local_addr().is_ok_and(|a| a.is_ipv4() == dest.is_ipv4()))
    }

    /// Sends the unsolicited ANNOUNCEs the core says are due
    /// (`Server::poll_announcements`; RFC 6887 section 14.1.3): unicast
    /// ones queued behind the changes that caused them, from a socket of
    /// their family; those to everyone also multicast on the configured
    /// interfaces, from the socket requests arrive on. A node that does
    /// not serve sends none: a backup (or a deposed node) forgets what was
    /// scheduled, its successor tells the clients; an active node that
    /// does not serve yet (waiting for its peer) keeps them for when it
    /// does.
    pub(crate) fn send_announcements(&self, mut core: MutexGuard<'_, Core>) {
        if !self.pair.serving() {
            if self.pair.role() == portkeep_ha::Role::Backup {
                core.server.stop_announcing();
            }
            return;
        }
        let due = core.server.poll_announcements(self.clock.now());
        if due.is_empty() {
            return;
        }
        let mut by_socket: std::collections::BTreeMap<usize, SendBatch> = Default::default();
        let mut multicast = Vec::new();
        for a in due {
            match a {
                portkeep_server::Announcement::Unicast { to, bytes } => {
                    if let Some(i) = self.socket_for(to) {
                        by_socket.entry(i).or_default().push(to, &bytes);
                    }
                }
                portkeep_server::Announcement::Everyone { bytes } => {
                    let unicast = self
                        .announce_unicast
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone();
                    for &to in &unicast {
                        if let Some(i) = self.socket_for(to) {
                            by_socket.entry(i).or_default().push(to, &bytes);
                        }
                    }
                    multicast.push(bytes);
                }
            }
        }
        let mut core = Some(core);
        for (i, batch) in by_socket {
            let guard = match core.take() {
                Some(c) => c,
                None => self.lock(),
            };
            self.submit(guard, batch, i);
        }
        // NAT-PMP clients listen on the same group and port and learn of
        // a lost state from their own announcement (RFC 6886 section
        // 3.2.1), IPv4 only; the core says whether there is one.
        let natpmp = if multicast.is_empty() {
            None
        } else {
            let c = core.take().unwrap_or_else(|| self.lock());
            c.server.natpmp_announcement(self.clock.now())
        };
        drop(core);
        for bytes in multicast {
            for &(i, ifindex, group) in &self.announce_multicast {
                let Some(s) = self.sockets.get(i) else {
                    continue;
                };
                let port = portkeep_proto::CLIENT_PORT;
                if let Err(e) = crate::mmsg::send_multicast(s, &bytes, ifindex, group, port) {
                    tracing::debug!(%group, ifindex, error = %e, "ANNOUNCE not sent");
                }
                if let (Some(n), true) = (&natpmp, group.is_ipv4()) {
                    if let Err(e) = crate::mmsg::send_multicast(s, n, ifindex, group, port) {
                        tracing::debug!(%group, ifindex, error = %e, "NAT-PMP announcement not sent");
                    }
                }
            }
        }
    }
}

/// Applies `changes` to `dp`; returns what did not take effect. A
/// dataplane that panics installed nothing this node can vouch for: every
/// change of the batch counts as failed, so no client is told SUCCESS for
/// a mapping the NAT may not have, and as lost, so every client that held
/// one of them is told (fail closed).
pub(crate) fn apply_guarded(
    dp: &mut dyn Dataplane,
    changes: &[ChangeRecord],
) -> Option<DataplaneError> {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| dp.apply(changes)));
    match r {
        Ok(Ok(())) => None,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "dataplane did not apply {} change(s)", e.failed.len());
            Some(e)
        }
        Err(_) => {
            tracing::error!(
                "the dataplane panicked: all {} change(s) of the batch count as failed",
                changes.len()
            );
            Some(in_doubt("the dataplane panicked", changes))
        }
    }
}

/// Every change of `changes` failed, and what the NAT holds for each is in
/// doubt.
pub(crate) fn in_doubt(why: &str, changes: &[ChangeRecord]) -> DataplaneError {
    let all: Vec<u64> = changes.iter().map(|c| c.seq).collect();
    DataplaneError {
        dataplane: "dataplane",
        message: why.to_owned(),
        failed: all.clone(),
        kept: Vec::new(),
        lost: all,
    }
}

/// `bytes` (a reply) turned into NETWORK_FAILURE if it reports one of the
/// `undone` mappings (by nonce, protocol and internal port, as a client
/// matches it: RFC 6887 section 11.4); `None` (drop it) if it cannot be
/// read or written again, since it might report an undone mapping.
fn network_failure(
    bytes: &[u8],
    cp: &portkeep_proto::CodePoints,
    lifetime: u32,
    epoch: u32,
    undone: &[(portkeep_proto::Nonce, portkeep_proto::Protocol, u16)],
) -> Option<Vec<u8>> {
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
            r.header.epoch = epoch;
            r.options.retain(|o| *o != PcpOption::CheckpointRequired);
        }
        hit
    })
}

/// A reply changed after it was built: `edit` returns whether it changed
/// the parsed response, which is then encoded again; unchanged replies go
/// out as they were. `None` when the reply cannot be parsed or encoded
/// again: the caller drops it (its client retransmits) rather than send
/// something the edit was meant to correct.
pub(crate) fn rewrite_response(
    bytes: &[u8],
    cp: &portkeep_proto::CodePoints,
    edit: impl FnOnce(&mut portkeep_proto::Response) -> bool,
) -> Option<Vec<u8>> {
    let mut r = portkeep_proto::Response::parse(bytes, cp).ok()?;
    if !edit(&mut r) {
        return Some(bytes.to_vec());
    }
    let mut out = Vec::with_capacity(bytes.len());
    r.encode(cp, &mut out).ok()?;
    Some(out)
}

/// Carries out what the node asked for. Called without the node's lock
/// (it takes the core's).
pub(crate) fn act(shared: &Arc<Shared>, effects: Vec<Effect<Reply>>) {
    if effects.is_empty() {
        return;
    }
    let mut release = Vec::new();
    let mut rewrite = Vec::new();
    for e in effects {
        match e {
            Effect::Release(r) => release.push(r),
            Effect::ReleaseAged {
                reply: (socket, replies),
                waited_ms,
            } => {
                let now = shared.clock.now();
                let core = shared.lock();
                let aged = replies.rewrite(|to, b| core.server.restamp(now, to.ip(), b, waited_ms));
                drop(core);
                release.push((socket, aged));
            }
            Effect::Rewrite {
                reply,
                grants,
                after,
            } => rewrite.push((reply, grants, after)),
            Effect::BackupState(st) => shared.lock().server.set_backup_state(st),
            Effect::NeedSnapshot => {
                let shared = shared.clone();
                let spawned = std::thread::Builder::new()
                    .name("snapshot".into())
                    .spawn(move || send_snapshot(&shared));
                if let Err(e) = spawned {
                    tracing::error!("cannot start the snapshot: {e}");
                }
            }
            Effect::PersistTerm(term) => {
                if let Err(e) = shared.pair.persist_term(term) {
                    tracing::error!("cannot persist term {term}: {e}");
                }
            }
            Effect::Deposed { term } => deposed(shared, term),
            Effect::HandedOver {
                term,
                held,
                peer_holds,
            } => {
                tracing::warn!(
                    term,
                    "the backup holds fresher state ({peer_holds}) than this node's store ({held}): handed it the service; now backup"
                );
                deposed(shared, term);
            }
            Effect::TakeOver => {
                tracing::warn!("the active handed this node the service: taking over");
                let r = promote(shared);
                if r["ok"] != json!(true) {
                    tracing::error!("taking over failed: {r}");
                }
            }
            Effect::Persist { seq, .. } => {
                // Memory mode (with a store, these went to the replica's
                // writer): the replica lives in the node, applied is
                // persisted.
                shared.pair.node().persisted(seq);
                shared.pair.wake.notify_one();
            }
        }
    }
    release.retain(|(_, r): &Reply| !r.is_empty());
    shared.send_committed(release);
    reject(shared, rewrite);
}

/// Answers replies whose check-point the backup never confirmed: the
/// mappings lose their flag (logged and stored like any change) and the
/// replies go out without the option, after that change is committed; a
/// reply that cannot be rewritten is dropped ([`portkeep_ha::strip_checkpoint`]).
fn reject(shared: &Shared, held: Vec<(Reply, Vec<Grant>, u64)>) {
    if held.is_empty() {
        return;
    }
    let mut core = shared.lock();
    let cp = core.server.config().code_points;
    let mut n = 0u64;
    for (_, grants, _) in &held {
        for g in grants {
            if core.server.unflag(&g.key, g.kind, g.nonce) {
                n += 1;
            }
        }
    }
    tracing::warn!(
        responses = held.len(),
        unflagged = n,
        "backup did not confirm check-points in time: answered as not honoured"
    );
    let mut core = Some(core);
    for ((socket, replies), _, after) in held {
        let replies = replies.rewrite(|_, b| portkeep_ha::strip_checkpoint(b, &cp));
        let guard = core.take().unwrap_or_else(|| shared.lock());
        shared.submit_after(guard, replies, socket, after);
    }
}

/// The full check-pointed state for a backup that (re)connected (RFC 7767
/// section 1): copied a page at a time under the core lock, encoded
/// outside every lock; changes after the copy's position follow it (the
/// node keeps them), so the backup ends at the table's exact state.
fn send_snapshot(shared: &Arc<Shared>) {
    let (term, part, version) = {
        let n = shared.pair.node();
        match n.active() {
            Some(a) if a.state() == portkeep_ha::LinkState::NeedSnapshot => {
                (a.term(), n.snapshot_part(), n.peer_version())
            }
            _ => return,
        }
    };
    // A page of the table at a time, each under its own short hold of the
    // core lock: the copy stands for the first page's position, and the
    // node sends every change after that position behind it (it keeps
    // them while the snapshot is pending), which brings each mapping
    // copied later to its latest state (`Server::replicated_page`).
    let mut src = {
        let core = shared.lock();
        let (mappings, next) = core.server.replicated_page(0, SNAPSHOT_PAGE_SLOTS);
        (
            SnapshotSource {
                term,
                seq: core.server.last_seq(),
                anchor: core.server.anchor(),
                subscriber_anchors: core.server.subscriber_anchors(),
                mappings,
                volatile: core.server.volatile_hosts(),
                owed: core.server.owed_announces(shared.clock.now()),
                requesters: core.server.requesters(),
                holds: core.server.port_holds(),
                version,
            },
            next,
        )
    };
    while let Some(from) = src.1 {
        let (page, next) = shared
            .lock()
            .server
            .replicated_page(from, SNAPSHOT_PAGE_SLOTS);
        src.0.mappings.extend(page);
        src.1 = next;
    }
    let src = src.0;
    let snap = src.encode(part);
    let (items, seq) = (snap.items(), snap.seq());
    let effects = {
        let mut n = shared.pair.node();
        n.send_snapshot(shared.clock.now(), snap);
        n.effects()
    };
    act(shared, effects);
    tracing::info!(items, seq, "resync: snapshot sent to the backup");
    shared.pair.wake.notify_one();
}

/// Table slots copied per hold of the core lock while a snapshot is taken:
/// about a millisecond of copying, so PCP requests wait at most that long.
const SNAPSHOT_PAGE_SLOTS: usize = 8_192;

/// An empty state: what a node that stopped serving keeps.
fn empty_state(now: Timestamp) -> Restored {
    Restored {
        anchor: now,
        ..Restored::default()
    }
}

/// A node in a higher term serves: the node already stopped serving; its
/// state goes (the new active's is the truth; a stale copy must never be
/// served again) and it waits for the active's link as a backup.
fn deposed(shared: &Shared, term: Term) {
    let now = shared.clock.now();
    let mut core = shared.lock();
    core.server = Server::new(core.server.config().clone(), now);
    // The stored replica was cleared when the deposed effect was drained
    // (`NodeGuard::effects`), in order with the new backup's writes.
    shared.submit_reset(
        core,
        Reset {
            state: empty_state(now),
            clear_replica: false,
        },
    );
    shared.pair.bump_role();
    tracing::warn!(
        term,
        "a node in term {term} is active: demoted to backup; state dropped"
    );
}

/// Stops acting as active (`ctl demote`): the node answers no more PCP,
/// forgets its state and waits for the active's link as a backup.
pub(crate) fn demote(shared: &Arc<Shared>) -> Value {
    let now = shared.clock.now();
    let mut core = shared.lock();
    let (changed, role, term, effects) = {
        let mut n = shared.pair.node();
        let changed = n.demote();
        if changed {
            // Under the node's lock, so it queues before any write of the
            // new (empty) backup: whatever replica is stored is not its.
            n.clear_replica();
        }
        (changed, n.role(), n.term(), n.effects())
    };
    if !changed {
        return json!({"ok": true, "role": role.as_str(), "term": term, "changed": false});
    }
    core.server = Server::new(core.server.config().clone(), now);
    shared.submit_reset(
        core,
        Reset {
            state: empty_state(now),
            clear_replica: false,
        },
    );
    act(shared, effects);
    shared.pair.bump_role();
    tracing::warn!(term, "demoted to backup by the operator; state dropped");
    json!({"ok": true, "role": "backup", "term": term, "changed": true})
}

/// Becomes active (`ctl promote`, keepalived's notify hook): the node
/// decides the takeover (term, state, epochs; failure-scenarios draft
/// section 2.6) once its term is persisted; this installs it, ANNOUNCEs to
/// the hosts that lost state, then serves.
pub(crate) fn promote(shared: &Arc<Shared>) -> Value {
    let watch = crate::clock::Stopwatch::start();
    let mut core = shared.lock();
    let mut n = shared.pair.node();
    let next = match n.promotion_term() {
        Ok(t) => t,
        Err(portkeep_ha::PromoteError::AlreadyActive) => {
            return json!({"ok": true, "role": "active", "term": n.term(), "changed": false})
        }
        Err(e) => return json!({"ok": false, "error": e.to_string()}),
    };
    // Fencing depends on never acting twice in one term: persist first.
    if let Err(e) = shared.pair.persist_term(next) {
        return json!({"ok": false, "error": format!("cannot persist term {next}: {e}")});
    }
    let now = shared.clock.now();
    let takeover = match n.promote(now) {
        Ok(t) => t,
        Err(e) => return json!({"ok": false, "error": e.to_string()}),
    };
    let effects = n.effects();
    drop(n);
    let state = takeover.state.clone();
    let (server, report) =
        Server::restore_replica(core.server.config().clone(), now, state.clone());
    core.server = server;
    let targets = takeover.announce_targets(&report.dropped);
    core.server.owe_announce(now, &targets);
    if matches!(
        takeover.kind,
        portkeep_ha::TakeoverKind::Cold | portkeep_ha::TakeoverKind::Stale
    ) {
        // Every epoch restarted, and clients this node never heard of may
        // have lost state: everyone is told (RFC 6887 section 14.1.3).
        core.server.announce_everyone(now);
    }
    let mut rest = Vec::new();
    for e in effects {
        match e {
            Effect::BackupState(st) => core.server.set_backup_state(st),
            other => rest.push(other),
        }
    }
    let kind = format!("{:?}", takeover.kind).to_lowercase();
    let restored = report.restored;
    // The store and the dataplane are replaced in log order, before any
    // request handled from now on is answered.
    // The stored replica goes once `state` is stored, before anything
    // served (see `clear_replica` for why this order is safe).
    shared.submit_reset(
        core,
        Reset {
            state,
            clear_replica: true,
        },
    );
    act(shared, rest);
    shared.send_announcements(shared.lock());
    shared.pair.bump_role();
    let took = watch.micros();
    tracing::warn!(
        term = takeover.term,
        kind,
        mappings = restored,
        reset = targets.len(),
        took_us = took,
        "promoted to active"
    );
    json!({
        "ok": true,
        "role": "active",
        "term": takeover.term,
        "changed": true,
        "takeover": kind,
        "mappings": restored,
        "reset_subscribers": takeover.reset.len(),
        "announced_hosts": targets.len(),
        "took_us": took,
    })
}

/// `mappings` as the changes that install them in an empty dataplane.
pub(crate) fn installs(mappings: &[portkeep_server::MappingRecord]) -> Vec<ChangeRecord> {
    mappings
        .iter()
        .map(|m| ChangeRecord {
            started: false,
            seq: 0,
            change: Change::Upserted(m.clone()),
        })
        .collect()
}

pub(crate) fn new_dataplane(kind: &DataplaneKind) -> Box<dyn Dataplane> {
    match kind {
        DataplaneKind::Memory => Box::new(MemoryDataplane::new()),
        DataplaneKind::Nftables(n) => Box::new(crate::nft::NftDataplane::new(n.clone())),
    }
}

/// `dp` as the committer uses it: an nftables dataplane behind the bounded
/// wait of [`crate::bounded`] (the memory dataplane cannot stall). The
/// full installs of a start or a takeover happen before, unbounded: they
/// may legitimately take seconds, and answer no request.
pub(crate) fn bounded(dp: Box<dyn Dataplane>, kind: &DataplaneKind) -> Box<dyn Dataplane> {
    let DataplaneKind::Nftables(n) = kind else {
        return dp;
    };
    match crate::bounded::Bounded::new(dp, n.timeout) {
        Ok(b) => Box::new(b),
        Err(e) => {
            // The dataplane went with the thread that could not start: a
            // fresh one rebuilds the table on its first batch.
            tracing::error!("cannot start the dataplane thread ({e}): its waits are unbounded");
            new_dataplane(kind)
        }
    }
}

/// Group commit: everything queued goes into one transaction, then to the
/// dataplane and (for an active node) to the backup; the committer then
/// sends the replies itself. A reply whose check-point the backup must
/// confirm waits for that first.
pub(crate) fn committer(shared: &Arc<Shared>, mut store: Option<Store>) {
    commit_loop(shared, &mut store);
    if shared.failed.load(Ordering::SeqCst) {
        // After a failed write nothing more goes to the disk, not even
        // the storage engine's own sync when it is closed: what reached
        // the disk is unknown, and the restart reads what is there.
        std::mem::forget(store);
    }
}

fn commit_loop(shared: &Arc<Shared>, store: &mut Option<Store>) {
    let Some((q, cv)) = &shared.queue else {
        return;
    };
    loop {
        shared.beats.beat("committer");
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
                shared.beats.beat("committer");
                waited = true;
                if g.jobs.is_empty()
                    && store
                        .as_ref()
                        .is_some_and(|s| s.flush_due(shared.clock.now()))
                {
                    break;
                }
            }
            if waited
                && !g.jobs.is_empty()
                && !shared.commit_delay.is_zero()
                && store.is_some()
                && shared.handling.load(Ordering::SeqCst) > 0
            {
                // Work arrived after a quiet spell and a worker is still
                // reading or answering more of the burst: give it a moment
                // (until its job is queued) to join the same fsync. When
                // nothing more is on its way, waiting would only delay
                // these replies: a client with a window of requests in
                // flight sends no more until it has them.
                let (ng, _) = cv
                    .wait_timeout(g, shared.commit_delay)
                    .unwrap_or_else(|p| p.into_inner());
                g = ng;
            }
            g.jobs.drain(..).collect()
        };
        let n: usize = jobs.iter().map(|j| j.replies.len()).sum();
        shared.queued.fetch_sub(n, Ordering::Relaxed);
        let now = shared.clock.now();
        if jobs.is_empty() {
            if let Some(st) = store.as_mut() {
                if let Err(e) = st.flush(now) {
                    fail(shared, &e);
                    return;
                }
            }
            if shared.drained.load(Ordering::Relaxed) {
                // A clean stop: nothing acknowledged is missing.
                if let Some(st) = store.as_mut() {
                    if let Err(e) = st.close(now) {
                        fail(shared, &e);
                    }
                }
                return;
            }
            continue;
        }
        // A reset (promotion, demotion) splits the batch: what came before
        // it is committed first.
        let mut segment = Vec::with_capacity(jobs.len());
        for mut job in jobs {
            if let Some(reset) = job.reset.take() {
                if !commit(shared, store, std::mem::take(&mut segment), now) {
                    return;
                }
                if let Some(st) = store.as_mut() {
                    if let Err(e) = st.replace(&reset.state) {
                        fail(shared, &e);
                        return;
                    }
                }
                if reset.clear_replica && !clear_replica(shared) {
                    return;
                }
                shared.reset_dataplane(&reset.state);
            }
            segment.push(job);
        }
        if !commit(shared, store, segment, now) {
            return;
        }
    }
}

/// Commits one run of jobs; false if the store failed.
fn commit(
    shared: &Arc<Shared>,
    store: &mut Option<Store>,
    mut jobs: Vec<Job>,
    now: portkeep_server::Timestamp,
) -> bool {
    if jobs.is_empty() {
        return true;
    }
    let mut changes: Vec<ChangeRecord> = Vec::new();
    let metas: Vec<portkeep_ha::JobMeta> = {
        let node = shared.pair.node();
        let replicating = node.replicates();
        jobs.iter_mut()
            .map(|j| {
                let volatile = std::mem::take(&mut j.volatile);
                // Only a replicating node needs the view (it clones the
                // check-pointed records); the others honour no check-point.
                let m = if replicating {
                    node.prepare(&j.changes, volatile)
                        .after(j.after)
                        .made_at(j.made)
                } else {
                    portkeep_ha::JobMeta::default()
                };
                changes.append(&mut j.changes);
                m
            })
            .collect()
    };
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
                // A dataplane thread that panicked installed nothing we can
                // vouch for: every change of the batch failed.
                let failed = dp.join().unwrap_or_else(|_| {
                    tracing::error!("the dataplane panicked: the whole batch counts as failed");
                    Some(in_doubt("the dataplane thread panicked", &changes))
                });
                (w, failed)
            })
        } else {
            let w = store.as_mut().map_or(Ok(()), |st| st.write(&changes, now));
            match w {
                Ok(()) => (Ok(()), shared.apply(&changes)),
                Err(e) => (Err(e), None),
            }
        };
        if let Err(e) = written {
            fail(shared, &e);
            return false;
        }
        if let Some(failed) = failed {
            let mut core = shared.lock();
            // The batch's replies, and those of jobs handled since and
            // still queued: a retransmission answered from the state the
            // refusal now takes back must not leave as a grant (lock
            // order: the core, then the queue, as `submit` takes them).
            let mut queued = shared
                .queue
                .as_ref()
                .map(|(q, _)| q.lock().unwrap_or_else(|p| p.into_inner()));
            let mut all: Vec<&mut SendBatch> = jobs.iter_mut().map(|j| &mut j.replies).collect();
            if let Some(g) = queued.as_mut() {
                all.extend(g.jobs.iter_mut().map(|j| &mut j.replies));
            }
            shared.undo_failed(&mut core, &changes, &failed, &mut all);
            drop(all);
            drop(queued);
            // The removals are committed (and taken off the dataplane) in
            // the next round, like any change.
            shared.submit(core, SendBatch::default(), 0);
        }
    }
    let checkpoint_due = store.as_ref().is_some_and(Store::checkpoint_due);
    let committed = changes.len();
    let arrived: Vec<Stopwatch> = jobs
        .iter()
        .filter(|j| !j.replies.is_empty())
        .map(|j| j.queued)
        .collect();
    let effects = {
        let mut node = shared.pair.node();
        node.handle_commit(
            now,
            jobs.into_iter()
                .zip(metas)
                .map(|(j, m)| ((j.socket, j.replies), m))
                .collect(),
        );
        node.effects()
    };
    // What the node queued for the backup leaves now, not at the link's
    // next timer tick.
    shared.pair.wake.notify_one();
    act(shared, effects);
    // Sent (or, for a reply that waits for the backup, handed to the
    // pair's state machine).
    if !arrived.is_empty() {
        let mut h = shared
            .commit_latency
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        shared.commit_group.observe(arrived.len() as f64);
        for t in arrived {
            let us = t.micros();
            h.saturating_record(us);
            shared.commit_seconds.observe(us as f64 / 1e6);
        }
    }
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

/// A promoted node's stored replica goes, durably, after the state it took
/// over is stored (the caller did that) and before anything it serves is
/// committed: no reply, ANNOUNCE or NAT rule of the new active exists
/// before. False if the replica's writer failed (the daemon stops).
///
/// Why this order is safe whenever the node crashes, RFC 7767 section 3.2
/// (an acknowledged check-point survives) against the failure-scenarios
/// draft section 2.6 (a stale copy is never served):
/// - before the replica is cleared: the node served nothing yet, so the
///   replica is still exactly what it acknowledged; restarted as backup it
///   resumes it, and a promotion from it is stale (every epoch resets).
///   Its store holds the state taken over too, for a restart as active.
/// - after: this node may serve and change what the replica said (delete
///   a mapping, give its port to another host), so it must never resume
///   it; it comes back a cold backup, or active from its store.
///
/// No write of the old backup can land after the clear: the node stopped
/// handing them out at promotion, and the queue is in order.
fn clear_replica(shared: &Shared) -> bool {
    let Some(q) = &shared.pair.replica else {
        return true;
    };
    let ticket = q.push(ReplicaCmd::Clear);
    q.wait(ticket)
}

/// Stores a backup's replica writes, as the node handed them out
/// ([`crate::pair::NodeGuard::effects`] queues them in order), one
/// durable transaction for everything queued (group commit), and only
/// then lets the node acknowledge them (RFC 7767 section 3.2: an
/// acknowledged check-point survives this node's crash too). The fsync
/// runs under no lock of the core or the node. A failed write stops the
/// daemon, as a failed store commit does: nothing it held is acknowledged,
/// and an fsync is never retried (the kernel may have dropped the pages).
pub(crate) fn replica_writer(shared: &Shared, mut store: ReplicaStore) {
    replica_loop(shared, &mut store);
    if shared.failed.load(Ordering::SeqCst) {
        // As for the store: after a failed write nothing more goes to the
        // disk, not even the storage engine's sync when it is closed.
        std::mem::forget(store);
    }
}

fn replica_loop(shared: &Shared, store: &mut ReplicaStore) {
    let Some(q) = &shared.pair.replica else {
        return;
    };
    loop {
        if shared.failed.load(Ordering::Relaxed) {
            // The store failed and the daemon stops: nothing more is
            // stored, and whoever waits for it must not go on.
            q.failed();
            return;
        }
        let Some((cmds, ticket)) = q.take(POLL) else {
            return;
        };
        if cmds.is_empty() {
            // Idle: bring the tables up to date with the log.
            if let Err(e) = store.fold(crate::replica::FOLD_IDLE) {
                fail(shared, &e);
                q.failed();
                return;
            }
            continue;
        }
        match store_replica(store, cmds) {
            Ok(last) => {
                q.stored(ticket, store.seq());
                if let Some(seq) = last {
                    shared.pair.node().persisted(seq);
                    shared.pair.wake.notify_one();
                }
            }
            Err(e) => {
                fail(shared, &e);
                q.failed();
                return;
            }
        }
    }
}

/// Carries out one batch of the replica's queue; returns the position the
/// last write stands for, if it has one.
fn store_replica(
    store: &mut ReplicaStore,
    cmds: Vec<ReplicaCmd>,
) -> Result<Option<u64>, crate::replica::ReplicaError> {
    // Writes before a clear belong to a backup that is gone.
    let from = match cmds.iter().rposition(|c| matches!(c, ReplicaCmd::Clear)) {
        Some(i) => {
            store.clear()?;
            i + 1
        }
        None => 0,
    };
    let mut last = None;
    let writes: Vec<portkeep_ha::ReplicaWrite> = cmds
        .into_iter()
        .skip(from)
        .filter_map(|c| match c {
            ReplicaCmd::Write(seq, w) => {
                last = Some(seq);
                Some(w)
            }
            ReplicaCmd::Clear => None,
        })
        .collect();
    store.write(&writes)?;
    Ok(last)
}

/// The store failed: answering on would acknowledge what might be lost,
/// so the daemon stops (fail-stop); queued replies are never sent.
fn fail(shared: &Shared, e: &dyn std::fmt::Display) {
    tracing::error!("{e}; stopping: no response is sent for changes that are not stored");
    shared.failed.store(true, Ordering::SeqCst);
    shared.stop.store(true, Ordering::SeqCst);
    if let Some((q, _)) = &shared.queue {
        q.lock().unwrap_or_else(|p| p.into_inner()).jobs.clear();
    }
}

/// Expires mappings when the core's timer says so (RFC 6887 section 15).
pub(crate) fn housekeeping(shared: &Shared) {
    while !shared.stop.load(Ordering::Relaxed) {
        let now = shared.clock.now();
        let mut core = shared.lock();
        core.server.handle_timeout(now);
        let wait = core
            .server
            .poll_timeout()
            .map_or(POLL, |t| (t - now).clamp(Duration::from_millis(1), POLL));
        shared.submit(core, SendBatch::default(), 0);
        shared.send_announcements(shared.lock());
        // An ANNOUNCE may be due before the next expiry (one held until
        // this node serves is not: it waits for the next round).
        let wait = if shared.pair.serving() {
            shared.lock().server.poll_timeout().map_or(wait, |t| {
                (t - shared.clock.now()).clamp(Duration::from_millis(1), wait)
            })
        } else {
            POLL
        };
        std::thread::sleep(wait);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]

    use super::*;

    #[test]
    fn a_loop_that_stops_turning_is_named_stalled() {
        let beats = Beats::new(["pcp-0".to_owned(), "committer".to_owned()]);
        let mut seen = Vec::new();
        assert!(
            beats.stalled(&mut seen).is_empty(),
            "the first look sees no history"
        );
        beats.beat_at(0);
        beats.beat("committer");
        assert!(beats.stalled(&mut seen).is_empty());
        beats.beat("committer");
        assert_eq!(beats.stalled(&mut seen), vec!["pcp-0".to_owned()]);
        assert_eq!(beats.stalled(&mut seen).len(), 2);
    }
    use portkeep_server::{DataplaneError, MappingKey};

    struct Panicking;

    impl Dataplane for Panicking {
        fn name(&self) -> &'static str {
            "panicking"
        }
        fn apply(&mut self, _: &[ChangeRecord]) -> Result<(), DataplaneError> {
            panic!("dataplane bug");
        }
    }

    fn upsert(seq: u64) -> ChangeRecord {
        let ip: IpAddr = "198.51.100.1".parse().unwrap();
        ChangeRecord {
            started: false,
            seq,
            change: Change::Upserted(portkeep_server::MappingRecord {
                key: MappingKey {
                    internal_ip: ip,
                    protocol: portkeep_proto::Protocol::TCP,
                    internal_port: 80 + seq as u16,
                },
                kind: MappingKind::Map,
                nonce: [1; 12],
                external: "192.0.2.1:40000".parse().unwrap(),
                expires: Timestamp(1_000_000),
                lifetime: 600,
                checkpoint: false,
                filters: vec![],
                description: None,
                subscriber: portkeep_server::SubscriberKeying::default().subscriber_of(ip),
                third_party: false,
                followed: false,
                manager: None,
            }),
        }
    }

    /// RFC 6887 section 7.4 (fail closed): a dataplane that panics
    /// installed nothing this node can vouch for, so every change of its
    /// batch is reported failed and answered NETWORK_FAILURE, never SUCCESS.
    #[test]
    fn rfc6887_s7_4_a_panicking_dataplane_fails_the_whole_batch() {
        let changes = [upsert(1), upsert(2), upsert(3)];
        let failed = apply_guarded(&mut Panicking, &changes).unwrap();
        assert_eq!(failed.failed, vec![1, 2, 3]);
        assert_eq!(failed.lost, vec![1, 2, 3], "in doubt: lost");
    }

    /// RFC 7767 section 3.2: a reply that cannot be re-encoded after an
    /// edit is dropped, never sent as it was (it might report a check-point
    /// or a mapping that is not true).
    #[test]
    fn rfc7767_s3_2_a_reply_that_cannot_be_rewritten_is_dropped() {
        let cp = portkeep_proto::CodePoints::default();
        assert_eq!(rewrite_response(&[0xff; 7], &cp, |_| true), None);
        let mut batch = SendBatch::default();
        let dest: SocketAddr = "127.0.0.1:5350".parse().unwrap();
        batch.push(dest, &[0xff; 7]);
        let out = batch.rewrite(|_, b| portkeep_ha::strip_checkpoint(b, &cp));
        assert!(out.is_empty(), "the unparsable reply must not be sent");
        let out = batch.rewrite(|_, b| {
            network_failure(
                b,
                &cp,
                30,
                0,
                &[([1; 12], portkeep_proto::Protocol::TCP, 80)],
            )
        });
        assert!(out.is_empty());
    }
}
