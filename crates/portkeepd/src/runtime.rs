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

use std::fs::File;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use anyhow::Context;
use portkeep_server::{ChangeRecord, Outcome, Server};
use socket2::{Domain, Protocol, Socket, Type};

use crate::clock::Clock;
use crate::config::Settings;
use crate::control;
use crate::ha_config::Role;
use crate::link;
use crate::mmsg::{self, RecvBatch, SendBatch};
use crate::node::{self, Core, Queue, Shared, POLL};
use crate::pair::Pair;
use crate::replica::{ReplicaError, ReplicaStore};
use crate::store::{Opened, Store};

/// A running server.
pub struct Daemon {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    committer: Option<JoinHandle<()>>,
    /// Stores the backup's replica (with a store, in a pair).
    replica_writer: Option<JoinHandle<()>>,
    local_addrs: Vec<SocketAddr>,
    data: DataDir,
    /// What it was started with: what a reload may not change.
    started: Settings,
}

/// What [`Daemon::reload`] did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Reloaded {
    /// Settings that differ from the running ones but take a restart
    /// (listen addresses, data directory, store, role, ...): not applied.
    pub need_restart: Vec<&'static str>,
    /// Mappings the new policy ended (their external address left the
    /// pool): their subscribers' epochs reset and they are announced to.
    pub ended: usize,
    /// Static forwards a client's mapping keeps out.
    pub forwards_skipped: usize,
    /// The digest of the policy now served.
    pub config_digest: String,
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
    /// Whether state was restored (then no start-up ANNOUNCE storm: the
    /// restore scheduled ANNOUNCEs to the few that lost mappings in it).
    restored: bool,
    /// A backup's store holding state it served before (it was active
    /// last: a node's store is emptied when it is demoted or deposed).
    served_before: Option<portkeep_server::Restored>,
    /// The term the state served from was served in (the store's).
    served_term: u64,
}

/// Opens the store and restores the server core from it, and loads what it
/// restored into `dataplane` (an empty state builds its table), before
/// anyone is answered.
fn load(
    settings: &Settings,
    clock: &Clock,
    dataplane: &mut Box<dyn portkeep_server::Dataplane>,
) -> anyhow::Result<Start> {
    let now = clock.now();
    let backup = settings.ha.role == Role::Backup;
    let cfg = settings.server.clone();
    let Some(path) = settings.store.path.as_ref() else {
        let mut server = Server::new(cfg, now);
        if !backup {
            warn_skipped(&server.install_static_forwards(now));
        }
        let changes: Vec<ChangeRecord> = server.drain_changes().collect();
        dataplane.apply(&changes)?;
        return Ok(Start {
            server,
            store: None,
            restored: false,
            served_before: None,
            served_term: 0,
        });
    };
    let opening = crate::clock::Stopwatch::start();
    let (mut store, opened) = Store::open_with(
        path,
        settings.store.durability,
        settings.store.recovery,
        settings.store.cache_bytes,
        now,
        &cfg.subscriber_keying,
        settings.store.log,
    )?;
    let mut served_before = None;
    let mut served_term = 0;
    let (mut server, restored) = match opened {
        Opened::Fresh { moved_aside } => {
            tracing::info!(
                "no usable store at {}: starting fresh, every epoch at 0{}",
                path.display(),
                moved_aside.map_or_else(String::new, |p| format!(
                    " (damaged store moved to {})",
                    p.display()
                ))
            );
            dataplane.apply(&[])?;
            (Server::new(cfg, now), false)
        }
        Opened::Restored(state) if backup => {
            // A backup serves nothing of its own: what it will serve comes
            // from the active, and replaces this store on promotion.
            tracing::info!(
                "starting as backup: the store at {} is not served",
                path.display()
            );
            if state.last_seq > 0 {
                served_before = Some(state);
            }
            dataplane.apply(&[])?;
            (Server::new(cfg, now), true)
        }
        Opened::Restored(state) => {
            let stored = state.mappings.len();
            served_term = state.term;
            let read_ms = opening.micros() / 1000;
            // The dataplane loads the stored mappings while the core
            // restores them: the two take seconds each for a million
            // mappings, on different cores. What the restore then drops
            // is corrected below, before anyone is answered.
            let stored_upserts = node::installs(&state.mappings);
            let (server, report, loaded) = std::thread::scope(|scope| {
                let loading = scope.spawn(|| {
                    let watch = crate::clock::Stopwatch::start();
                    dataplane
                        .apply(&stored_upserts)
                        .map(|()| watch.micros() / 1000)
                });
                let (server, report) = Server::restore(cfg, now, state);
                let loaded = loading.join().unwrap_or_else(|_| {
                    Err(portkeep_server::DataplaneError {
                        dataplane: "dataplane",
                        message: "panicked while loading the stored mappings".into(),
                        failed: Vec::new(),
                        kept: Vec::new(),
                        lost: Vec::new(),
                    })
                });
                (server, report, loaded)
            });
            let installed_ms = loaded?;
            tracing::info!(
                read_ms,
                restored_ms = opening.micros() / 1000 - read_ms,
                installed_ms,
                "restored {} of {stored} mappings from {} ({} expired while down, {} dropped); epochs continue",
                report.restored,
                path.display(),
                report.expired,
                report.dropped.len()
            );
            // The restore scheduled an ANNOUNCE to whoever lost a mapping
            // in it; the housekeeping thread sends them once serving.
            let mut server = server;
            if store.lost_unknown() {
                // Served in relaxed mode and not stopped cleanly: up to a
                // second of acknowledged changes may be missing, and whose
                // cannot be known (failure-scenarios draft section 2.6.1).
                tracing::warn!(
                    "the store was served in relaxed mode and not stopped cleanly: every epoch resets and every client is told"
                );
                server.reset_every_epoch(now);
            }
            warn_skipped(&report.forwards_skipped);
            (server, true)
        }
    };
    if !restored && !backup {
        warn_skipped(&server.install_static_forwards(now));
    }
    // Expiries and resets found while restoring are stored before serving,
    // and the dataplane, loaded with every stored mapping, follows: the
    // removals of those that expired while down or whose address left the
    // pool. (A store keys each mapping once, so the restore drops no
    // second record of one: nothing else differs.)
    let changes: Vec<ChangeRecord> = server.drain_changes().collect();
    if !changes.is_empty() {
        store.write(&changes, now)?;
        if !backup {
            dataplane.apply(&changes)?;
        }
    }
    // Durable before anyone is answered, and marked for how it is served.
    store.mark_serving(now)?;
    Ok(Start {
        server,
        store: Some(store),
        restored,
        served_before,
        served_term,
    })
}

/// Says which configured static forwards a client's mapping kept out.
fn warn_skipped(skipped: &[portkeep_server::StaticForward]) {
    for f in skipped {
        tracing::warn!(
            internal = %f.internal,
            external = %f.external,
            "static forward not installed: a client's mapping holds its internal or external endpoint; it is installed once that mapping is gone and portkeepd restarts"
        );
    }
}

/// Opens the backup's stored replica beside the store (a pair with a store
/// only; `None` otherwise), with what a backup resumes from.
///
/// A replica that cannot be read is moved aside and the node starts cold,
/// never from part of it: a cold backup promoted resets every epoch, which
/// is safe (RFC 6887 section 8.5), where a half-loaded one could claim
/// check-points it lost. A node that is not a backup clears it: it may
/// have served since, and a replica from before must never be resumed
/// later (failure-scenarios draft section 2.6).
fn open_replica(
    settings: &Settings,
    clock: &Clock,
) -> anyhow::Result<Option<(ReplicaStore, Option<portkeep_ha::Replica>)>> {
    let Some(store_path) = settings.store.path.as_ref() else {
        return Ok(None);
    };
    let path = store_path.with_file_name(crate::replica::FILE);
    let pair = settings.ha.role != Role::Standalone;
    if !pair && !path.exists() {
        return Ok(None);
    }
    let keying = &settings.server.subscriber_keying;
    let (mut store, replica) = match ReplicaStore::open(&path, keying) {
        Ok(r) => r,
        Err(ReplicaError::Damaged { detail, .. }) => {
            let aside = crate::replica::move_aside(&path, clock.now().as_millis())?;
            tracing::error!(
                "backup replica {} is damaged ({detail}); moved to {} and starting cold: \
                 a promotion before the next snapshot continues no mapping and resets every epoch",
                path.display(),
                aside.display()
            );
            ReplicaStore::open(&path, keying)?
        }
        Err(e) => return Err(e.into()),
    };
    match replica {
        Some(r) if settings.ha.role == Role::Backup => {
            tracing::info!(
                seq = r.seq,
                mappings = r.mappings.len(),
                "resuming from the backup replica at {}: a promotion before the next \
                 snapshot is stale (check-pointed mappings continue, every epoch resets)",
                path.display()
            );
            Ok(Some((store, Some(r))))
        }
        Some(r) => {
            store.clear()?;
            tracing::info!(
                seq = r.seq,
                "not a backup: the backup replica at {} is dropped",
                path.display()
            );
            Ok(pair.then_some((store, None)))
        }
        None => Ok(pair.then_some((store, None))),
    }
}

impl Daemon {
    /// Opens the data directory and store, binds every listen address and
    /// starts serving.
    pub fn start(settings: Settings) -> anyhow::Result<Daemon> {
        let settings_at_start = settings.clone();
        let data = DataDir::open(&settings.data_dir, &settings.control_socket)?;
        let control = UnixListener::bind(&settings.control_socket).with_context(|| {
            format!(
                "cannot create control socket {}",
                settings.control_socket.display()
            )
        })?;
        let clock = Clock::start();
        let replica = open_replica(&settings, &clock)?;
        let pair = Pair::new(
            settings.ha.clone(),
            &settings.data_dir,
            settings.server.subscriber_keying.clone(),
            replica.is_some(),
            clock,
        )?;
        let (replica_store, resume) = replica.unzip();
        let resumed = matches!(resume, Some(Some(_)));
        if let Some(r) = resume.flatten() {
            if let Some(q) = &pair.replica {
                q.stored(0, Some(r.seq));
            }
            // Before the link starts: the backup says `applied` in its
            // first Hello, and stands for the replica if promoted at once.
            pair.node().resume_replica(r);
        }
        let mut dataplane = node::new_dataplane(&settings.dataplane);
        let mut start = load(&settings, &clock, &mut dataplane)?;
        if let (false, Some(state)) = (resumed, start.served_before.take()) {
            // No replica, but the store holds what this node served last
            // (it was active before a double failure): that is what it can
            // vouch for if promoted, never less (a promotion from it is
            // stale: every epoch resets).
            tracing::warn!(
                "starting as backup with no stored replica: the {} mappings this node served before stand for it until a snapshot",
                state.mappings.len()
            );
            pair.node()
                .resume_replica(portkeep_ha::Replica::of_served(&state));
        }
        if settings.ha.role == Role::Active {
            // Told to the backup at first contact: a backup holding more
            // is handed the service (failure-scenarios draft section 2.6).
            pair.node().set_position(portkeep_ha::Position {
                term: start.served_term,
                seq: start.server.last_seq(),
            });
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
        let dataplane = node::bounded(dataplane, &settings.dataplane);
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
        // `[limits] interfaces` needs each datagram's arrival interface.
        let by_interface = !settings.server.interfaces.is_empty();
        if by_interface {
            for s in &flat {
                mmsg::enable_pktinfo(s).context("cannot read the interface datagrams arrive on")?;
            }
        }
        let sockets = flat
            .iter()
            .map(UdpSocket::try_clone)
            .collect::<Result<Vec<_>, _>>()?;
        // Replies go through the committer whenever something must happen
        // before they are sent: a store commit, or the backup's
        // acknowledgement.
        let queue = (start.store.is_some() || settings.ha.role != Role::Standalone)
            .then(|| (Mutex::new(Queue::default()), Condvar::new()));
        let queue_present = queue.is_some();
        let interfaces = match &settings.announce_interfaces {
            Some(list) => list.clone(),
            None => listen_interfaces(&local_addrs),
        };
        let announce_multicast: Vec<(usize, u32, IpAddr)> = interfaces
            .iter()
            .flat_map(|i| match multicast_senders(&sockets, i) {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(interface = %i, error = %e, "cannot send ANNOUNCE on interface");
                    Vec::new()
                }
            })
            .collect();
        let mut start = start;
        if settings.ha.role != Role::Backup
            && !start.restored
            && !(announce_multicast.is_empty() && settings.announce_unicast.is_empty())
        {
            // A start without state: every client may have lost some.
            start.server.announce_everyone(clock.now());
        }
        let shared = Arc::new(Shared {
            classes: std::sync::RwLock::new(Arc::new(settings.server.checkpoint.clone())),
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
            commit_delay: settings.store.commit_delay,
            pair,
            dataplane_kind: settings.dataplane.clone(),
            announce_multicast,
            announce_unicast: Mutex::new(settings.announce_unicast.clone()),
            max_queued: settings.max_queued_replies,
            queued: std::sync::atomic::AtomicUsize::new(0),
            handling: std::sync::atomic::AtomicUsize::new(0),
            shed: std::sync::atomic::AtomicU64::new(0),
            // 1 us to 1 h, three significant digits: fixed bounds, so
            // the constructor cannot fail.
            commit_latency: std::sync::Mutex::new(
                hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 3)
                    .unwrap_or_else(|_| unreachable!("valid histogram bounds")),
            ),
            commit_seconds: node::commit_seconds_histogram(),
            commit_group: node::commit_group_histogram(),
            dataplane_seconds: node::commit_seconds_histogram(),
            dataplane_failures: std::sync::atomic::AtomicU64::new(0),
            reload_requested: AtomicBool::new(false),
            last_reload: Mutex::new((0, serde_json::Value::Null)),
            beats: node::Beats::new(
                (0..flat.len())
                    .map(|i| format!("pcp-{i}"))
                    .chain(queue_present.then(|| "committer".to_owned())),
            ),
        });
        let committer = match (start.store, &shared.queue) {
            (store, Some(_)) => {
                let s1 = shared.clone();
                Some(
                    std::thread::Builder::new()
                        .name("committer".into())
                        .spawn(move || node::committer(&s1, store))?,
                )
            }
            (_, None) => None,
        };
        let replica_writer = match replica_store {
            Some(st) => {
                let s = shared.clone();
                Some(
                    std::thread::Builder::new()
                        .name("replica".into())
                        .spawn(move || node::replica_writer(&s, st))?,
                )
            }
            None => None,
        };
        let mut threads = Vec::new();
        if let Some(addr) = settings.metrics_listen {
            let listener = crate::metrics::bind(addr)
                .with_context(|| format!("cannot listen for metrics on {addr}"))?;
            tracing::info!(%addr, "serving Prometheus metrics at /metrics");
            let shared = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("metrics".into())
                    .spawn(move || crate::metrics::serve(shared, listener))?,
            );
        }
        if let Some((link, listener)) = link_listener {
            let shared = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("replication".into())
                    .spawn(move || link::run(shared, link, listener))?,
            );
        }
        for (i, sock) in flat.into_iter().enumerate() {
            let shared = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("pcp-{i}"))
                    .spawn(move || worker(&shared, &sock, i, by_interface))?,
            );
        }
        {
            let shared = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("expiry".into())
                    .spawn(move || node::housekeeping(&shared))?,
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
        #[cfg(feature = "etcd")]
        if let Some(c) = settings.ha.coordinator.clone() {
            threads.push(crate::coordinator::spawn(shared.clone(), c)?);
        }
        Ok(Daemon {
            shared,
            threads,
            committer,
            replica_writer,
            local_addrs,
            data,
            started: settings_at_start,
        })
    }

    /// Whether `ctl reload` asked for a reload since the last call.
    pub fn take_reload_request(&self) -> bool {
        self.shared.reload_requested.swap(false, Ordering::SeqCst)
    }

    /// Records how a reload went, for `ctl reload` and `ctl status`.
    pub fn note_reload(&self, outcome: serde_json::Value) {
        let mut g = self
            .shared
            .last_reload
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        g.0 += 1;
        g.1 = outcome;
    }

    /// Serves `settings` from now on, as far as it can without a restart:
    /// the core's whole policy (subscribers' quotas and classes, limits,
    /// ACLs, lifetimes, the external pool, static forwards, NAT-PMP) and
    /// the unicast ANNOUNCE targets. Mappings, epochs and the HA link are
    /// untouched but for what the new policy no longer allows
    /// (`Server::reconfigure`). What takes a restart is named in the
    /// result and left as it runs. `Err` (and nothing changed) when the
    /// core refuses the change.
    pub fn reload(&self, settings: &Settings) -> anyhow::Result<Reloaded> {
        let s = &self.started;
        let mut need_restart = Vec::new();
        let differs =
            |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") != format!("{b:?}");
        for (name, changed) in [
            ("listen", differs(&s.listen, &settings.listen)),
            ("data_dir", differs(&s.data_dir, &settings.data_dir)),
            (
                "control_socket",
                differs(&s.control_socket, &settings.control_socket),
            ),
            ("workers", s.workers != settings.workers),
            ("dataplane", differs(&s.dataplane, &settings.dataplane)),
            (
                "dataplane.firewall_prefixes",
                s.server.firewall_prefixes != settings.server.firewall_prefixes,
            ),
            ("store", differs(&s.store, &settings.store)),
            ("ha", differs(&s.ha, &settings.ha)),
            ("metrics", s.metrics_listen != settings.metrics_listen),
            (
                "limits.max_queued_replies",
                s.max_queued_replies != settings.max_queued_replies,
            ),
            (
                "announce.multicast_interfaces",
                s.announce_interfaces != settings.announce_interfaces,
            ),
            (
                "limits.interfaces",
                s.server.interfaces != settings.server.interfaces,
            ),
        ] {
            if changed {
                need_restart.push(name);
            }
        }
        let now = self.shared.clock.now();
        let mut core = self.shared.lock();
        let mut server_cfg = settings.server.clone();
        // The sockets report arrival interfaces only if asked at start.
        server_cfg
            .interfaces
            .clone_from(&core.server.config().interfaces);
        if need_restart.contains(&"dataplane.firewall_prefixes") {
            // Which hosts the core answers as a firewall must match the
            // table the dataplane programs, which only a restart rebuilds.
            server_cfg
                .firewall_prefixes
                .clone_from(&core.server.config().firewall_prefixes);
        }
        let report = if self.shared.pair.role() == Role::Backup {
            // A backup serves nothing: its core is the empty state a
            // promotion replaces, built again under the new policy.
            core.server = Server::new(server_cfg, now);
            portkeep_server::RestoreReport::default()
        } else {
            core.server
                .reconfigure(now, server_cfg)
                .map_err(|e| anyhow::anyhow!(e))?
        };
        let digest = node::policy_digest(core.server.config());
        *self
            .shared
            .classes
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Arc::new(settings.server.checkpoint.clone());
        self.shared.submit_changes(core);
        *self
            .shared
            .announce_unicast
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = settings.announce_unicast.clone();
        self.shared.send_announcements(self.shared.lock());
        Ok(Reloaded {
            need_restart,
            ended: report.dropped.len(),
            forwards_skipped: report.forwards_skipped.len(),
            config_digest: digest,
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

    /// The serving loops (PCP workers, committer) that made no
    /// turn since the last call (`last` keeps what was seen): what the
    /// systemd watchdog is fed from. Each loop turns at least every 100 ms,
    /// busy or idle.
    pub fn stalled_loops(&self, last: &mut Vec<u64>) -> Vec<String> {
        self.shared.beats.stalled(last)
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
        if let Some(c) = self.committer.take() {
            let _ = c.join();
        }
        // After the committer: a promotion it was carrying out may still
        // clear the replica.
        if let Some(w) = self.replica_writer.take() {
            if let Some(q) = &self.shared.pair.replica {
                q.close();
            }
            let _ = w.join();
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

pub(crate) fn worker(shared: &Shared, sock: &UdpSocket, index: usize, by_interface: bool) {
    let mut rb = if by_interface {
        RecvBatch::with_pktinfo()
    } else {
        RecvBatch::default()
    };
    let mut out = Vec::with_capacity(mmsg::BUF);
    let mut held = Holding::new(&shared.handling);
    while !shared.stop.load(Ordering::Relaxed) {
        shared.beats.beat_at(index);
        let n = match mmsg::recv_batch(sock, &mut rb) {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(error = %e, "receive failed");
                std::thread::sleep(POLL);
                0
            }
        };
        if n == 0 {
            held.set(false);
            continue;
        }
        held.set(true);
        // A full batch means more are waiting in the socket: the worker
        // stays counted through its next receive. Otherwise nothing more
        // of this burst is in hand once its job is queued.
        let more = n == mmsg::BATCH;
        handle_batch(shared, &rb, &mut out, index, &mut held, more);
        held.set(more);
    }
}

/// A worker's share of [`Shared::handling`]: counted from a receive that
/// returned datagrams until their job is queued (or, after a full batch,
/// through the next receive), and given back however the worker ends,
/// a panic included, so the committer never waits for work that will not
/// come.
struct Holding<'a> {
    count: &'a std::sync::atomic::AtomicUsize,
    counted: bool,
}

impl<'a> Holding<'a> {
    fn new(count: &'a std::sync::atomic::AtomicUsize) -> Holding<'a> {
        Holding {
            count,
            counted: false,
        }
    }

    fn set(&mut self, counted: bool) {
        if counted && !self.counted {
            self.count.fetch_add(1, Ordering::SeqCst);
        } else if !counted && self.counted {
            self.count.fetch_sub(1, Ordering::SeqCst);
        }
        self.counted = counted;
    }
}

impl Drop for Holding<'_> {
    fn drop(&mut self) {
        self.set(false);
    }
}

/// Answers one batch of received datagrams through the core and queues
/// the replies behind the changes they depend on. Unless `more` are
/// waiting in the socket, the worker stops counting as holding work just
/// before the job is queued: the committer the queueing wakes then sees
/// that nothing else is on its way.
fn handle_batch(
    shared: &Shared,
    rb: &RecvBatch,
    out: &mut Vec<u8>,
    index: usize,
    held: &mut Holding<'_>,
    more: bool,
) {
    if !shared.pair.serving() {
        // A backup, or an active node not yet sure it was not deposed:
        // clients retransmit (RFC 6887 section 8.1.1) and reach
        // whichever node serves.
        return;
    }
    if shared.overloaded() {
        shared
            .shed
            .fetch_add(rb.iter().count() as u64, Ordering::Relaxed);
        return;
    }
    let now = shared.clock.now();
    let mut replies = SendBatch::default();
    let mut core = shared.lock();
    if !shared.pair.serving() {
        // Demoted while this thread waited for the core: the core is
        // now the empty state of a backup, and answering from it would
        // be a deposed node answering PCP. Serving only turns off with
        // the core locked (or, when deposed by a higher term, the node
        // releases nothing), so this check under the lock is final.
        return;
    }
    for (src, on, data) in rb.iter_on() {
        if core.server.handle_on(now, src, on, data, out) == Outcome::Reply {
            replies.push(src, out);
        }
    }
    held.set(more);
    shared.submit(core, replies, index);
}

/// Sends unsolicited ANNOUNCEs after a fresh start (RFC 6887 section
/// 14.1.1): to the configured unicast clients and to the all-hosts groups
/// on the configured interfaces, ten times at doubling intervals from
/// 250 ms, the schedule NAT-PMP uses for the same purpose (RFC 6886 section
/// 3.2.1).
/// The interfaces `[announce] multicast_interfaces` means when it is not
/// set: those that carry a `listen` address bound to one specific,
/// non-loopback address, so that the default configuration tells the
/// clients of a start that lost state (RFC 6887 section 14.1.3) on the
/// links it serves, and only there. A wildcard or loopback listen address
/// names no interface: set the list to choose.
fn listen_interfaces(listen: &[SocketAddr]) -> Vec<String> {
    let wanted: Vec<IpAddr> = listen
        .iter()
        .map(SocketAddr::ip)
        .filter(|ip| !ip.is_unspecified() && !ip.is_loopback())
        .collect();
    if wanted.is_empty() {
        return Vec::new();
    }
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut names: Vec<String> = addrs
        .filter(|a| {
            a.address.as_ref().is_some_and(|s| {
                let ip = s
                    .as_sockaddr_in()
                    .map(|v4| IpAddr::V4(v4.ip()))
                    .or_else(|| s.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())));
                ip.is_some_and(|ip| wanted.contains(&ip))
            })
        })
        .map(|a| a.interface_name)
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Where the ANNOUNCEs on `iface` leave from: for each address family
/// this node accepts PCP requests in on that interface (a listening socket
/// bound to the wildcard or to one of the interface's addresses), that
/// socket, the interface's index and the family's all-hosts group (RFC 6887
/// section 14.1.3: 224.0.0.1 for a server that accepts requests over IPv4,
/// ff02::1 over IPv6, sent from the address and port requests arrive on).
fn multicast_senders(
    sockets: &[UdpSocket],
    iface: &str,
) -> anyhow::Result<Vec<(usize, u32, IpAddr)>> {
    let index = nix::net::if_::if_nametoindex(iface)
        .with_context(|| format!("no interface named {iface}"))?;
    let on_iface: Vec<IpAddr> = nix::ifaddrs::getifaddrs()
        .context("cannot list the interface's addresses")?
        .filter(|a| a.interface_name == iface)
        .filter_map(|a| {
            let s = a.address?;
            if let Some(v4) = s.as_sockaddr_in() {
                return Some(IpAddr::V4(v4.ip()));
            }
            s.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
        })
        .collect();
    let mut v = Vec::new();
    for (v4, group) in [
        (true, IpAddr::from([224, 0, 0, 1])),
        (false, IpAddr::from([0xff02, 0, 0, 0, 0, 0, 0, 1])),
    ] {
        let found = sockets.iter().position(|s| {
            s.local_addr().is_ok_and(|a| {
                a.is_ipv4() == v4 && (a.ip().is_unspecified() || on_iface.contains(&a.ip()))
            })
        });
        match found {
            Some(i) => v.push((i, index, group)),
            None => tracing::info!(
                interface = %iface,
                "no {} PCP socket receives on this interface: no ANNOUNCE to {group} there",
                if v4 { "IPv4" } else { "IPv6" }
            ),
        }
    }
    if v.is_empty() {
        anyhow::bail!("no PCP socket receives requests on it (see `listen`)");
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]

    use std::net::Ipv6Addr;
    use std::time::Duration;

    use portkeep_proto::{
        CodePoints, MapData, OpData, PcpOption, Protocol, Request, RequestHeader,
    };

    use super::*;
    use crate::config::ConfigFile;

    /// A daemon with one worker on an ephemeral loopback port, configured
    /// by `toml`, in a temporary data directory (kept alive by the caller).
    fn daemon(toml: &str) -> (tempfile::TempDir, Daemon) {
        let dir = tempfile::tempdir().unwrap();
        let mut s = ConfigFile::parse(toml, "test.toml")
            .unwrap()
            .validate()
            .unwrap();
        s.set_data_dir(dir.path().join("data"));
        s.listen = vec!["127.0.0.1:0".parse().unwrap()];
        s.workers = 1;
        (dir, Daemon::start(s).unwrap())
    }

    fn map_request(client: SocketAddr) -> Vec<u8> {
        map_request_port(client, 8080)
    }

    fn map_request_port(client: SocketAddr, port: u16) -> Vec<u8> {
        let IpAddr::V4(v4) = client.ip() else {
            panic!("IPv4 expected")
        };
        Request {
            header: RequestHeader {
                lifetime: 600,
                client_ip: v4.to_ipv6_mapped(),
            },
            data: OpData::Map(MapData {
                nonce: [9; 12],
                protocol: Protocol::TCP,
                internal_port: port,
                external_port: 0,
                external_ip: Ipv6Addr::UNSPECIFIED,
            }),
            options: vec![PcpOption::CheckpointRequired],
        }
        .to_bytes(&CodePoints::default())
        .unwrap()
    }

    /// A deposed node never answers PCP: a worker that passed the serving
    /// check just before a demotion and then waited for the core must not
    /// handle its requests against the empty state the demotion installs
    /// (that would create mappings, and a reply, on a node that no longer
    /// serves).
    #[test]
    fn design_demotion_a_worker_waiting_for_the_core_does_not_serve_after_it() {
        // The peer is unreachable (nothing listens on the discard port):
        // with no wait for it, the node serves after its first attempt.
        let (_dir, d) = daemon(
            "[ha]\nrole = \"active\"\nlisten = \"127.0.0.1:0\"\npeer = \"127.0.0.1:9\"\nplaintext = true\npeer_wait_ms = 0\n[store]\nmode = \"memory\"\n",
        );
        for _ in 0..100 {
            if d.shared.pair.serving() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(d.shared.pair.serving());
        let server = d.local_addrs()[0];
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        // Hold the core as `ctl demote` does while a request arrives: the
        // worker passes its first check and waits for the lock.
        let mut core = d.shared.lock();
        client
            .send_to(&map_request(client.local_addr().unwrap()), server)
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        assert!(d.shared.pair.node().demote());
        let now = d.shared.clock.now();
        core.server = Server::new(core.server.config().clone(), now);
        drop(core);
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            d.mapping_count(),
            0,
            "the demoted node handled a request against its new empty state"
        );
        let mut buf = [0u8; 1100];
        assert!(
            client.recv_from(&mut buf).is_err(),
            "the demoted node answered"
        );
    }

    /// Holds every apply until released: a dataplane (or disk) that stalls.
    struct Stall(Arc<(Mutex<bool>, Condvar)>);

    impl portkeep_server::Dataplane for Stall {
        fn name(&self) -> &'static str {
            "stall"
        }
        fn apply(&mut self, _: &[ChangeRecord]) -> Result<(), portkeep_server::DataplaneError> {
            let (m, cv) = &*self.0;
            let mut open = m.lock().unwrap();
            while !*open {
                open = cv.wait(open).unwrap();
            }
            Ok(())
        }
    }

    /// Opens the stall when dropped, so a failing assertion ends the test
    /// instead of leaving the committer waiting forever.
    struct Release(Arc<(Mutex<bool>, Condvar)>);

    impl Drop for Release {
        fn drop(&mut self) {
            let (m, cv) = &*self.0;
            *m.lock().unwrap_or_else(|p| p.into_inner()) = true;
            cv.notify_all();
        }
    }

    /// A stalled committer does not let the queues grow without bound:
    /// past `[limits] max_queued_replies`, datagrams are shed before the
    /// core handles them (counted; their clients retransmit, RFC 6887
    /// section 8.1.1), and every request the core did handle is answered
    /// once the stall ends.
    #[test]
    fn queues_are_bounded_and_shed_only_before_the_core() {
        let (_dir, d) =
            daemon("[limits]\nmax_queued_replies = 64\n[subscribers]\nmax_mappings = 100000\n");
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        *d.shared.dataplane.lock().unwrap() = Box::new(Stall(gate.clone()));
        let release = Release(gate);
        let server = d.local_addrs()[0];
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        let me = client.local_addr().unwrap();
        let sent = 2_000u16;
        for p in 0..sent {
            client
                .send_to(&map_request_port(me, 1000 + p), server)
                .unwrap();
            if p % 64 == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        std::thread::sleep(Duration::from_millis(500));
        let shed = d.shared.shed.load(Ordering::Relaxed);
        let queued = d.shared.queued.load(Ordering::Relaxed);
        assert!(shed > 0, "nothing was shed while the committer stalled");
        assert!(
            queued <= 64 + 64,
            "{queued} replies queued: past the bound plus one batch per worker"
        );
        let handled = d.shared.lock().server.stats().received;
        assert_eq!(
            shed + handled,
            u64::from(sent),
            "every datagram handled or shed"
        );
        drop(release);
        client
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut buf = [0u8; 1100];
        let mut answered = 0u64;
        while client.recv_from(&mut buf).is_ok() {
            answered += 1;
        }
        assert_eq!(
            answered, handled,
            "a request the core handled went unanswered"
        );
    }
}
