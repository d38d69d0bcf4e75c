//! The UDP service around the sans-IO core.
//!
//! Each worker thread owns one `SO_REUSEPORT` socket per listen address,
//! receives a batch of datagrams, runs the whole batch through the core
//! under one lock, hands the resulting changes to the dataplane, and sends
//! the replies in one batch. The kernel spreads clients over the workers by
//! their address, so one lock acquisition serves up to [`mmsg::BATCH`]
//! requests. A housekeeping thread expires mappings on the core's timer.

use std::fs::File;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use portkeep_server::{
    Change, ChangeRecord, Dataplane, MappingKind, MemoryDataplane, Outcome, RemoveReason, Server,
};
use socket2::{Domain, Protocol, Socket, Type};

use crate::config::{DataplaneKind, Settings};
use crate::mmsg::{self, RecvBatch, SendBatch};
use crate::{clock, control};

/// How often workers look up from a quiet socket to check for shutdown.
const POLL: Duration = Duration::from_millis(100);

/// The core and its effects, behind one lock.
pub(crate) struct Core {
    pub(crate) server: Server,
    pub(crate) dataplane: Box<dyn Dataplane>,
    scratch: Vec<ChangeRecord>,
}

impl Core {
    /// Hands the changes made so far to the dataplane and the log.
    fn commit(&mut self) {
        self.scratch.clear();
        self.scratch.extend(self.server.drain_changes());
        if self.scratch.is_empty() {
            return;
        }
        for c in &self.scratch {
            log_change(c);
        }
        if let Err(e) = self.dataplane.apply(&self.scratch) {
            tracing::error!(error = %e, "dataplane rejected a batch of changes");
        }
    }
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
    }
}

pub(crate) struct Shared {
    pub(crate) core: Mutex<Core>,
    pub(crate) stop: AtomicBool,
    pub(crate) origin: Instant,
    pub(crate) listen: Vec<SocketAddr>,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Core> {
        // A worker that panicked cannot have left the core half-updated in a
        // way later requests would trip over more than a restart would, and
        // keeping the rest serving is better than taking the daemon down.
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running server.
pub struct Daemon {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    local_addrs: Vec<SocketAddr>,
    data: DataDir,
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

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("local_addrs", &self.local_addrs)
            .finish()
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
    // Bursts of requests should queue, not drop; the kernel caps this at
    // net.core.rmem_max.
    let _ = s.set_recv_buffer_size(4 << 20);
    let _ = s.set_send_buffer_size(4 << 20);
    s.bind(&addr.into())
        .with_context(|| format!("cannot listen on {addr}"))?;
    s.set_read_timeout(Some(POLL))?;
    Ok(s.into())
}

impl Daemon {
    /// Binds every listen address and starts serving.
    pub fn start(settings: Settings) -> anyhow::Result<Daemon> {
        let data = DataDir::open(&settings.data_dir, &settings.control_socket)?;
        let control = UnixListener::bind(&settings.control_socket).with_context(|| {
            format!(
                "cannot create control socket {}",
                settings.control_socket.display()
            )
        })?;
        let origin = clock::origin();
        let now = clock::now(origin);
        let dataplane: Box<dyn Dataplane> = match settings.dataplane {
            DataplaneKind::Memory => Box::new(MemoryDataplane::new()),
        };
        let server = Server::new(settings.server.clone(), now);
        let workers = settings.workers.max(1);
        // Bind every worker's socket before serving, so a port conflict is
        // reported at start and an ephemeral port (`:0`) is shared.
        let mut sockets: Vec<Vec<UdpSocket>> = (0..workers).map(|_| Vec::new()).collect();
        let mut local_addrs = Vec::new();
        for &addr in &settings.listen {
            let first = bind(addr, workers > 1)?;
            let actual = first.local_addr()?;
            local_addrs.push(actual);
            sockets[0].push(first);
            for w in sockets.iter_mut().skip(1) {
                w.push(bind(actual, true)?);
            }
        }
        let shared = Arc::new(Shared {
            core: Mutex::new(Core {
                server,
                dataplane,
                scratch: Vec::new(),
            }),
            stop: AtomicBool::new(false),
            origin,
            listen: local_addrs.clone(),
        });
        let announce_from: Vec<UdpSocket> = sockets[0]
            .iter()
            .map(|s| s.try_clone())
            .collect::<Result<_, _>>()?;
        let mut threads = Vec::new();
        for (i, socks) in sockets.into_iter().enumerate() {
            for (j, sock) in socks.into_iter().enumerate() {
                let shared = shared.clone();
                threads.push(
                    std::thread::Builder::new()
                        .name(format!("pcp-{i}-{j}"))
                        .spawn(move || worker(&shared, &sock))?,
                );
            }
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
            let unicast = settings.announce_unicast.clone();
            let ifaces = settings.announce_interfaces.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("announce".into())
                    .spawn(move || announce(&shared, &announce_from, &unicast, &ifaces))?,
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
        Ok(Daemon {
            shared,
            threads,
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

    /// Stops every thread and waits for them.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
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

fn worker(shared: &Shared, sock: &UdpSocket) {
    let mut rb = RecvBatch::default();
    let mut sb = SendBatch::default();
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
        {
            let now = clock::now(shared.origin);
            let mut core = shared.lock();
            for (src, data) in rb.iter() {
                if core.server.handle(now, src, data, &mut out) == Outcome::Reply {
                    sb.push(src, &out);
                }
            }
            core.commit();
        }
        if let Err(e) = sb.flush(sock) {
            tracing::error!(error = %e, "send failed");
        }
    }
}

/// Expires mappings when the core's timer says so (RFC 6887 section 15).
fn housekeeping(shared: &Shared) {
    while !shared.stop.load(Ordering::Relaxed) {
        let wait = {
            let now = clock::now(shared.origin);
            let mut core = shared.lock();
            core.server.handle_timeout(now);
            core.commit();
            core.server
                .poll_timeout()
                .map_or(POLL, |t| (t - now).clamp(Duration::from_millis(1), POLL))
        };
        std::thread::sleep(wait);
    }
}

/// Sends unsolicited ANNOUNCEs after start (RFC 6887 section 14.1.1): to
/// the configured unicast clients and to the all-hosts groups on the
/// configured interfaces, ten times at doubling intervals from 250 ms, the
/// schedule NAT-PMP uses for the same purpose (RFC 6886 section 3.2.1).
fn announce(shared: &Shared, listen: &[UdpSocket], unicast: &[SocketAddr], ifaces: &[String]) {
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
            .unsolicited_announce(clock::now(shared.origin), &mut out);
        for dest in unicast {
            let from = listen
                .iter()
                .find(|s| s.local_addr().is_ok_and(|a| a.is_ipv4() == dest.is_ipv4()));
            if let Some(s) = from {
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
