//! `portkeep-bench`: drives virtual PCP clients against a server over
//! loopback and reports throughput, latency percentiles and server memory.
//!
//! Each virtual client has its own loopback address (127.1.x.y), so the
//! server sees it as a separate subscriber with its own quota, exactly as
//! distinct hosts would be. Requests are MAP creates (first pass over a
//! client's ports) and refreshes (every later pass, same nonce), sent and
//! received in batches with `sendmmsg`/`recvmmsg`.
//!
//! With `--server`, `--client-base` and `--disjoint-ports` it loads any PCP
//! server, for example one in another network namespace
//! (scripts/bench-vs-miniupnpd.sh).

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use hdrhistogram::Histogram;
use portkeep_proto::addr::to_wire;
use portkeep_proto::{CodePoints, MapData, OpData, PcpOption, Protocol, Request, RequestHeader};
use portkeepd::mmsg::{recv_batch, RecvBatch, SendBatch};

#[derive(Debug, Parser)]
#[command(name = "portkeep-bench", version)]
struct Args {
    /// Server to load (ignored with --spawn).
    #[arg(long, default_value = "127.0.0.1:5351")]
    server: SocketAddr,
    /// Start this portkeepd binary on a free loopback port for the run, and
    /// measure its memory.
    #[arg(long, value_name = "PORTKEEPD")]
    spawn: Option<PathBuf>,
    /// Measure the memory of an already running server with this pid.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Server worker threads when spawning.
    #[arg(long, default_value_t = 1)]
    server_workers: usize,
    /// Virtual clients (each a distinct loopback address and subscriber).
    #[arg(long, default_value_t = 256)]
    clients: usize,
    /// Mappings per client (distinct internal ports).
    #[arg(long, default_value_t = 64)]
    mappings_per_client: usize,
    /// Seconds of refresh load after the create pass (0: create pass only).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Load threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Requests sent to one client's server socket per round.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Clients with a batch in flight at once, per load thread.
    #[arg(long, default_value_t = 4)]
    inflight: usize,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    /// Every request carries CHECKPOINT_REQUIRED (RFC 7767). With
    /// --spawn, the server gets a class whose quota and rate never bite,
    /// so each request runs the whole policy (class, capacity, quota, token
    /// bucket) up to the backup gate.
    #[arg(long)]
    checkpoint: bool,
    /// The load speaks NAT-PMP (RFC 6886 map requests, TCP, 3600 s)
    /// instead of PCP MAP, to the same server on the same port.
    #[arg(long, conflicts_with = "checkpoint")]
    natpmp: bool,
    /// Instead of loading a server over UDP, run the sans-IO core in this
    /// process and alternate short slices of refreshes without and with
    /// CHECKPOINT_REQUIRED (A/B in the same moments, so machine noise hits
    /// both alike); prints both rates and their ratio.
    #[arg(long, conflicts_with_all = ["spawn", "server_pid", "checkpoint"])]
    core_ab: bool,
    /// Store of the spawned server: memory, durable or relaxed.
    #[arg(long, default_value = "memory")]
    store: String,
    /// After the run, kill -9 the spawned server, start it again on the
    /// same store, and time how long until it serves every mapping again.
    #[arg(long, requires = "spawn")]
    restart: bool,
    /// Walk mode (GET/NEXT, failure-scenarios draft section 4): create
    /// this many mappings for one client (127.1.0.1; TCP then UDP ports),
    /// then time one full MORE walk of them with the client library's
    /// walker. Replaces the MAP load phases.
    #[arg(long, value_name = "MAPPINGS")]
    walk: Option<usize>,
    /// nftables: install this many mappings through the nftables
    /// dataplane in one batch (table `inet pkbench`, in the current network
    /// namespace; needs root), time it, remove them, and exit.
    #[arg(long, value_name = "MAPPINGS")]
    nft_install: Option<usize>,
    /// Paced mode: send MAP creates at this many per second, one at a
    /// time, and report reply latency percentiles (replaces the load phases).
    #[arg(long, value_name = "PER_SECOND")]
    rate: Option<f64>,
    /// Paced mode: how many requests.
    #[arg(long, default_value_t = 10000)]
    count: usize,
    /// Dataplane of the spawned server: memory or nftables (nftables needs
    /// root; run the bench in a scratch network namespace).
    #[arg(long, default_value = "memory")]
    dataplane: String,
    /// With --spawn: start an active/backup pair (mutual TLS link on
    /// loopback) and load the active once the backup is in sync; with
    /// --checkpoint every honoured response waited for the backup's
    /// acknowledgement (RFC 7767 section 3.2).
    #[arg(long, requires = "spawn")]
    ha: bool,
    /// With --ha: after the load, restart the backup empty and time its
    /// resync (snapshot of every check-pointed mapping) until in sync.
    #[arg(long, requires = "ha")]
    resync: bool,
    /// With --ha: kill -9 the backup after the create pass, run the
    /// refresh phase without it, then restart it (from its stored replica)
    /// and time until it is in sync again: the changes it missed arrive
    /// as a resume when the active kept them, as a snapshot otherwise.
    #[arg(long, requires = "ha")]
    resume: bool,
    /// With --ha: after the load, kill -9 the active, send `ctl promote` to
    /// the backup, and time until it answers a refresh of a check-pointed
    /// mapping with its state installed.
    #[arg(long, requires = "ha")]
    takeover: bool,
    /// `[store] commit_delay_us` of the spawned server (its default: 500).
    #[arg(long, value_name = "MICROSECONDS")]
    commit_delay_us: Option<u64>,
    /// Address of the first virtual client; client N binds this address
    /// plus N. The addresses must be local (127.0.0.0/8 always is).
    #[arg(long, default_value = "127.1.0.1")]
    client_base: Ipv4Addr,
    /// First internal port of each client (the paced mode's first port).
    #[arg(long, default_value_t = 1000)]
    port_base: u16,
    /// Each client's internal ports follow the previous client's, so no two
    /// clients ask for the same internal port (for servers that try the
    /// internal port as the external one first, such as miniupnpd).
    #[arg(long)]
    disjoint_ports: bool,
    /// Load a zero-work echo server run in this process instead of a PCP
    /// server: `--server-workers` threads, each with its own SO_REUSEPORT
    /// socket, receiving and sending with the same batched calls as
    /// portkeepd, answering each request with itself marked as a SUCCESS
    /// response. The floor of the UDP path on this machine, for ratios.
    #[arg(long, conflicts_with_all = ["spawn", "server_pid"])]
    echo: bool,
    /// Time `--count` 512-octet appends, each followed by fdatasync, to a
    /// new file in this directory (removed afterwards): what one durable
    /// commit costs the disk at least. Replaces the load phases.
    #[arg(long, value_name = "DIR")]
    fsync_probe: Option<PathBuf>,
    /// After the load phases, flood the server for this many seconds with
    /// hostile datagrams (`portkeep_test_support::flood`: random,
    /// quota-exhausting MAPs, NEXT walks, oversized, unauthorised
    /// THIRD_PARTY) at `--flood-share` of the refresh phase's rate (the
    /// server's capacity, measured in the same run), while a paced client
    /// sends a MAP every millisecond; the same client runs
    /// `--flood-baseline` seconds without the flood first. Reports both
    /// clients' latency percentiles and the server's memory after the flood.
    #[arg(long, value_name = "SECONDS")]
    flood: Option<f64>,
    /// With --flood: the flood's rate as a share of capacity.
    #[arg(long, default_value_t = 0.8)]
    flood_share: f64,
    /// With --flood: seconds of the paced client alone, before the flood.
    #[arg(long, default_value_t = 10.0)]
    flood_baseline: f64,
    /// With --spawn: serve Prometheus metrics and scrape them every second
    /// while the load runs (the cost of the endpoint, docs/metrics.md).
    #[arg(long, requires = "spawn")]
    scrape_metrics: bool,
    /// Pipelined load: each client keeps up to this many requests
    /// outstanding, sending a new batch (`--batch`) as soon as that many
    /// replies are in, instead of waiting for whole rounds (`--inflight`
    /// is then unused). Needs one client per load thread, and at most
    /// `--mappings-per-client`.
    #[arg(long, value_name = "REQUESTS")]
    window: Option<usize>,
    /// How long to wait for the replies of a batch before counting the rest
    /// as lost.
    #[arg(long, default_value_t = 200)]
    reply_timeout_ms: u64,
}

/// Reads the clock; the bench is all I/O, the cores never do this.
#[allow(clippy::disallowed_methods)]
fn now() -> Instant {
    Instant::now()
}

struct VClient {
    sock: UdpSocket,
    index: usize,
    /// Internal port of this client's first mapping.
    port0: u16,
    next: usize,
    /// An encoded MAP request for this client; the nonce and internal port
    /// are patched in per mapping.
    template: Vec<u8>,
    /// Send time of each mapping's outstanding request.
    sent_at: Vec<Option<Instant>>,
    /// Requests of the current round still unanswered.
    waiting: usize,
    /// Still in the first pass over the ports (creates, not refreshes).
    creating: bool,
    /// Speaks NAT-PMP (RFC 6886) instead of PCP.
    natpmp: bool,
}

/// Offsets in a NAT-PMP map request and response (RFC 6886 section 3.3).
const NATPMP_REQ_PORT_AT: usize = 4;
const NATPMP_RESP_PORT_AT: usize = 8;
const NATPMP_MAP_RESPONSE_LEN: usize = 16;

/// Offsets in a MAP request (RFC 6887 sections 7.1, 11.1).
const NONCE_AT: usize = 24;
const INTERNAL_PORT_AT: usize = 40;

#[derive(Default)]
struct PhaseResult {
    sent: u64,
    ok: u64,
    errors: u64,
    lost: u64,
    /// Successes whose response carried CHECKPOINT_REQUIRED.
    honoured: u64,
    /// When the `ok` count reached each multiple of `mark_every`.
    marks: Vec<Instant>,
    mark_every: u64,
    /// Successes per second in each tenth of a single thread's create pass.
    tenths: Vec<u64>,
}

/// Length of a MAP response without options (RFC 6887 sections 7.2, 11.1).
const MAP_RESPONSE_LEN: usize = 60;

/// The address of virtual client `i`: `base` plus `i`.
fn client_ip(base: Ipv4Addr, i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base).wrapping_add(i as u32))
}

fn nonce(client: usize, port: u16) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&(client as u64).to_be_bytes());
    n[8..10].copy_from_slice(&port.to_be_bytes());
    n[10] = 0x5a;
    n
}

fn map_request(ip: Ipv4Addr, client: usize, port: u16, checkpoint: bool) -> Vec<u8> {
    Request {
        header: RequestHeader {
            lifetime: 3600,
            client_ip: to_wire(IpAddr::V4(ip)),
        },
        data: OpData::Map(MapData {
            nonce: nonce(client, port),
            protocol: Protocol::TCP,
            internal_port: port,
            external_port: 0,
            external_ip: std::net::Ipv6Addr::UNSPECIFIED,
        }),
        // After the MAP body, so the nonce and port offsets do not move.
        options: if checkpoint {
            vec![PcpOption::CheckpointRequired]
        } else {
            vec![]
        },
    }
    .to_bytes(&CodePoints::default())
    .unwrap_or_default()
}

/// Sends one batch of requests for `c`.
/// Answer times (µs) of volatile MAPs for `ports` internal ports in turn
/// (creations, then renewals), sent from `ip` to `server` once a
/// millisecond until `stop`, open loop (a request leaves on time whether or
/// not earlier ones were answered, as independent clients' requests do, so
/// a stall delays every request sent during it): what clients see while
/// something else happens on the server. A MAP unanswered within 2 s of
/// the end counts as 2 s.
fn probe(
    server: SocketAddr,
    ip: Ipv4Addr,
    ports: u16,
    stop: &AtomicBool,
) -> anyhow::Result<Histogram<u64>> {
    let ports = ports.clamp(1, 20_000);
    let sock = UdpSocket::bind(SocketAddr::new(IpAddr::V4(ip), 0))?;
    sock.set_read_timeout(Some(Duration::from_millis(20)))?;
    let rx = sock.try_clone()?;
    let sent: std::sync::Mutex<Vec<Option<Instant>>> =
        std::sync::Mutex::new(vec![None; usize::from(ports)]);
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let sending_done = AtomicBool::new(false);
    std::thread::scope(|sc| -> anyhow::Result<()> {
        let sender = sc.spawn(|| -> anyhow::Result<()> {
            let start = now();
            let mut n: u64 = 0;
            while !stop.load(Ordering::Relaxed) {
                let port = 40_000 + (n % u64::from(ports)) as u16;
                let req = map_request(ip, usize::MAX, port, false);
                if let Ok(mut g) = sent.lock() {
                    g[usize::from(port - 40_000)] = Some(now());
                }
                sock.send_to(&req, server)?;
                n += 1;
                let due = start + Duration::from_millis(n);
                let t = now();
                if due > t {
                    std::thread::sleep(due - t);
                }
            }
            sending_done.store(true, Ordering::Relaxed);
            Ok(())
        });
        let mut buf = [0u8; 1100];
        let mut quiet_since: Option<Instant> = None;
        loop {
            match rx.recv_from(&mut buf) {
                Ok((n, _)) if n >= 42 => {
                    let port = u16::from_be_bytes([buf[40], buf[41]]);
                    let t0 = port
                        .checked_sub(40_000)
                        .and_then(|i| sent.lock().ok()?.get_mut(usize::from(i))?.take());
                    if let Some(t0) = t0 {
                        h.record(t0.elapsed().as_micros().max(1) as u64)?;
                    }
                }
                _ => {}
            }
            if sending_done.load(Ordering::Relaxed) {
                let q = *quiet_since.get_or_insert_with(now);
                let pending = sent.lock().map_or(0, |g| g.iter().flatten().count());
                if pending == 0 || q.elapsed() > Duration::from_secs(2) {
                    for _ in 0..pending {
                        h.record(2_000_000)?;
                    }
                    break;
                }
            }
        }
        sender
            .join()
            .map_err(|_| anyhow::anyhow!("probe sender panicked"))?
    })?;
    Ok(h)
}

fn probe_json(h: &Histogram<u64>) -> serde_json::Value {
    serde_json::json!({
        "requests": h.len(),
        "p50_us": h.value_at_quantile(0.5),
        "p99_us": h.value_at_quantile(0.99),
        "max_us": h.max(),
    })
}

/// The zero-work server of `--echo`: its address and threads.
fn echo_server(
    workers: usize,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<(SocketAddr, Vec<std::thread::JoinHandle<()>>)> {
    let bind = |addr: SocketAddr| -> anyhow::Result<UdpSocket> {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
        s.set_reuse_port(true)?;
        let _ = s.set_recv_buffer_size(4 << 20);
        let _ = s.set_send_buffer_size(4 << 20);
        s.bind(&addr.into())?;
        let s: UdpSocket = s.into();
        s.set_read_timeout(Some(Duration::from_millis(100)))?;
        Ok(s)
    };
    let first = bind("127.0.0.1:0".parse()?)?;
    let addr = first.local_addr()?;
    let mut socks = vec![first];
    for _ in 1..workers {
        socks.push(bind(addr)?);
    }
    let threads = socks
        .into_iter()
        .map(|sock| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut rb = RecvBatch::default();
                let mut sb = SendBatch::default();
                let mut out = Vec::with_capacity(1100);
                while !stop.load(Ordering::Relaxed) {
                    if !matches!(recv_batch(&sock, &mut rb), Ok(n) if n > 0) {
                        continue;
                    }
                    for (from, d) in rb.iter() {
                        if d.len() < 24 {
                            continue;
                        }
                        out.clear();
                        out.extend_from_slice(d);
                        // R bit: a response; result 0: SUCCESS.
                        out[1] |= 0x80;
                        out[3] = 0;
                        sb.push(from, &out);
                    }
                    let _ = sb.flush(&sock);
                }
            })
        })
        .collect();
    Ok((addr, threads))
}

/// `--fsync-probe`: 512-octet appends, each made durable with fdatasync.
fn fsync_probe(dir: &std::path::Path, count: usize, json: bool) -> anyhow::Result<()> {
    use std::io::Write;
    let path = dir.join(format!("portkeep-fsync-probe.{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    let block = [0x5au8; 512];
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let result = (|| -> anyhow::Result<()> {
        for _ in 0..count {
            let t = now();
            f.write_all(&block)?;
            f.sync_data()?;
            h.record(t.elapsed().as_micros().max(1) as u64)?;
        }
        Ok(())
    })();
    drop(f);
    let _ = std::fs::remove_file(&path);
    result?;
    let v = serde_json::json!({
        "fsync_probe": {
            "dir": dir.display().to_string(),
            "appends": count,
            "p50_us": h.value_at_quantile(0.5),
            "p99_us": h.value_at_quantile(0.99),
            "max_us": h.max(),
        }
    });
    if json {
        println!("{v}");
    } else {
        println!(
            "fdatasync probe in {}: {} appends of 512 octets, p50 {} us, p99 {} us, max {} us",
            dir.display(),
            count,
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.99),
            h.max()
        );
    }
    Ok(())
}

fn send_round(
    c: &mut VClient,
    server: SocketAddr,
    per_client: usize,
    batch: usize,
    sb: &mut SendBatch,
    res: &mut PhaseResult,
) {
    c.waiting = send_requests(c, server, per_client, batch, sb, res);
}

/// Sends up to `batch` requests for `c`'s next ports (during the create
/// pass, only ports not yet asked for); returns how many left.
fn send_requests(
    c: &mut VClient,
    server: SocketAddr,
    per_client: usize,
    batch: usize,
    sb: &mut SendBatch,
    res: &mut PhaseResult,
) -> usize {
    let start = now();
    let n = batch.min(per_client);
    // The create pass covers each port exactly once.
    let n = if c.creating {
        n.min(per_client - c.next)
    } else {
        n
    };
    for k in 0..n {
        let idx = (c.next + k) % per_client;
        let port = c.port0.wrapping_add(idx as u16);
        if c.natpmp {
            c.template[NATPMP_REQ_PORT_AT..NATPMP_REQ_PORT_AT + 2]
                .copy_from_slice(&port.to_be_bytes());
        } else {
            c.template[NONCE_AT..NONCE_AT + 12].copy_from_slice(&nonce(c.index, port));
            c.template[INTERNAL_PORT_AT..INTERNAL_PORT_AT + 2].copy_from_slice(&port.to_be_bytes());
        }
        sb.push(server, &c.template);
        c.sent_at[idx] = Some(start);
    }
    c.next = (c.next + n) % per_client;
    if c.next == 0 {
        c.creating = false;
    }
    if sb.flush(&c.sock).is_err() {
        res.lost += n as u64;
        return 0;
    }
    res.sent += n as u64;
    n
}

/// Counts one reply `d`, received at `t`, to one of `c`'s requests.
fn take_reply(
    c: &mut VClient,
    d: &[u8],
    t: Instant,
    hist: &mut Histogram<u64>,
    res: &mut PhaseResult,
) {
    // Result 0 in octet 3 (PCP; octet 2 reserved) or octets 2-3
    // (NAT-PMP's 16-bit result).
    let (min, port_at) = if c.natpmp {
        (NATPMP_MAP_RESPONSE_LEN, NATPMP_RESP_PORT_AT)
    } else {
        (44, INTERNAL_PORT_AT)
    };
    if d.len() < min || d[2] != 0 || d[3] != 0 {
        res.errors += 1;
        return;
    }
    res.ok += 1;
    // The only option the server echoes here: CHECKPOINT_REQUIRED.
    if d.len() > MAP_RESPONSE_LEN && d[MAP_RESPONSE_LEN] == 192 {
        res.honoured += 1;
    }
    if res.mark_every > 0 && res.ok.is_multiple_of(res.mark_every) {
        res.marks.push(t);
    }
    let port = u16::from_be_bytes([d[port_at], d[port_at + 1]]);
    let idx = usize::from(port.wrapping_sub(c.port0));
    if let Some(Some(s)) = c.sent_at.get_mut(idx).map(Option::take) {
        let _ = hist.record(t.duration_since(s).as_micros() as u64);
    }
}

/// Collects the replies to `c`'s outstanding batch.
fn recv_round(
    c: &mut VClient,
    hist: &mut Histogram<u64>,
    rb: &mut RecvBatch,
    res: &mut PhaseResult,
) {
    while c.waiting > 0 {
        match recv_batch(&c.sock, rb) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let t = now();
        for (_, d) in rb.iter() {
            c.waiting = c.waiting.saturating_sub(1);
            take_reply(c, d, t, hist, res);
        }
    }
    res.lost += c.waiting as u64;
    c.waiting = 0;
}

fn run_phase(
    clients: &mut [VClient],
    args: &Args,
    server: SocketAddr,
    deadline: Option<Instant>,
    stop: &AtomicBool,
) -> (PhaseResult, Histogram<u64>) {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap_or_else(|_| {
        Histogram::new(3).unwrap_or_else(|_| unreachable!("valid histogram precision"))
    });
    let mut rb = RecvBatch::default();
    let mut sb = SendBatch::default();
    let mut res = PhaseResult::default();
    let per = args.mappings_per_client;
    if deadline.is_none() && args.threads == 1 {
        // The create pass of a single load thread: time each tenth, to show
        // whether the rate holds as the table grows.
        res.mark_every = (clients.len() * per / 10) as u64;
    }
    if let (Some(w), [c]) = (args.window, &mut *clients) {
        run_window(c, args, w, server, deadline, stop, &mut hist, &mut res);
        return (res, hist);
    }
    let window = args.inflight.max(1);
    // Rounds per client: one pass over its ports for the create phase,
    // unbounded (until the deadline) for the refresh phase.
    let passes = per.div_ceil(args.batch);
    let mut pass = 0;
    'outer: loop {
        if deadline.is_none() && pass == passes {
            break;
        }
        for group in clients.chunks_mut(window) {
            if stop.load(Ordering::Relaxed) || deadline.is_some_and(|d| now() >= d) {
                break 'outer;
            }
            for c in group.iter_mut() {
                send_round(c, server, per, args.batch, &mut sb, &mut res);
            }
            for c in group.iter_mut() {
                recv_round(c, &mut hist, &mut rb, &mut res);
            }
        }
        pass += 1;
    }
    (res, hist)
}

/// `--window`: keeps up to `window` of `c`'s requests outstanding,
/// topping up a batch at a time as replies come in, so the server always
/// has work queued (as it has from many independent clients) rather than
/// seeing a burst and then nothing while the client waits for the last
/// reply of a round. A receive that times out counts what is outstanding
/// as lost.
#[allow(clippy::too_many_arguments)]
fn run_window(
    c: &mut VClient,
    args: &Args,
    window: usize,
    server: SocketAddr,
    deadline: Option<Instant>,
    stop: &AtomicBool,
    hist: &mut Histogram<u64>,
    res: &mut PhaseResult,
) {
    let per = args.mappings_per_client;
    let batch = args.batch.clamp(1, window);
    let mut rb = RecvBatch::default();
    let mut sb = SendBatch::default();
    let mut outstanding = 0usize;
    loop {
        let ending = stop.load(Ordering::Relaxed) || deadline.is_some_and(|d| now() >= d);
        // The create pass sends each port once, then drains.
        let sending = !ending && (deadline.is_some() || c.creating);
        while sending && outstanding + batch <= window && (deadline.is_some() || c.creating) {
            let n = send_requests(c, server, per, batch, &mut sb, res);
            if n == 0 {
                break;
            }
            outstanding += n;
        }
        if outstanding == 0 {
            if ending || !sending {
                return;
            }
            continue;
        }
        match recv_batch(&c.sock, &mut rb) {
            Ok(n) if n > 0 => {}
            _ => {
                res.lost += outstanding as u64;
                outstanding = 0;
                continue;
            }
        }
        let t = now();
        for (_, d) in rb.iter() {
            outstanding = outstanding.saturating_sub(1);
            take_reply(c, d, t, hist, res);
        }
    }
}

/// `--scrape-metrics`: `GET /metrics` once a second until `stop`, as a
/// Prometheus server would; returns how many scrapes succeeded.
fn scrape_every_second(addr: SocketAddr, stop: &AtomicBool) -> anyhow::Result<u64> {
    use std::io::{Read, Write};
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let mut s = std::net::TcpStream::connect(addr)?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n")?;
        let mut body = Vec::new();
        s.read_to_end(&mut body)?;
        if body.starts_with(b"HTTP/1.1 200") {
            n += 1;
        }
        for _ in 0..10 {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(n)
}

/// `--flood`: the paced client alone for `baseline` seconds, then with a
/// hostile flood at `rate` datagrams/s for `secs` seconds (two sending
/// threads, 128 sources each); the server's memory around the flood.
fn flood_phase(
    server: SocketAddr,
    pid: Option<u32>,
    probe_ip: Ipv4Addr,
    rate: f64,
    baseline: f64,
    secs: f64,
) -> anyhow::Result<serde_json::Value> {
    use portkeep_test_support::flood::{flood, FloodConfig, FloodStats, KINDS};
    let timed_probe = |secs: f64| -> anyhow::Result<Histogram<u64>> {
        let stop = AtomicBool::new(false);
        std::thread::scope(|sc| {
            // 1,000 ports: created in the first second alone, renewed
            // every second after, within any quota.
            let h = sc.spawn(|| probe(server, probe_ip, 1_000, &stop));
            std::thread::sleep(Duration::from_secs_f64(secs));
            stop.store(true, Ordering::Relaxed);
            h.join().map_err(|_| anyhow::anyhow!("probe panicked"))?
        })
    };
    let alone = timed_probe(baseline)?;
    // The peak of the flood alone: reset the high-water mark (VmHWM).
    if let Some(pid) = pid {
        let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
    }
    let rss_before = pid.and_then(portkeep_test_support::flood::rss_kib);
    let stop = Arc::new(AtomicBool::new(false));
    let flooders: Vec<_> = (0..2u16)
        .map(|i| {
            let stop = stop.clone();
            let cfg = FloodConfig {
                server,
                first_source: i * 128,
                sources: 128,
                rate: Some(rate / 2.0),
            };
            std::thread::spawn(move || flood(&cfg, &stop))
        })
        .collect();
    let flooded = timed_probe(secs);
    stop.store(true, Ordering::Relaxed);
    let mut sent = FloodStats::default();
    for f in flooders {
        let s = f.join().map_err(|_| anyhow::anyhow!("flooder panicked"))?;
        for (a, b) in sent.sent.iter_mut().zip(s.sent) {
            *a += b;
        }
        sent.send_errors += s.send_errors;
    }
    let flooded = flooded?;
    let rss_after = pid.and_then(portkeep_test_support::flood::rss_kib);
    let by_kind: serde_json::Map<String, serde_json::Value> = KINDS
        .iter()
        .zip(sent.sent)
        .map(|(k, n)| ((*k).to_owned(), n.into()))
        .collect();
    Ok(serde_json::json!({
        "rate": rate.round(),
        "seconds": secs,
        "sent": sent.total(),
        "by_kind": by_kind,
        "send_errors": sent.send_errors,
        "client_alone": probe_json(&alone),
        "client": probe_json(&flooded),
        "p99_ratio": flooded.value_at_quantile(0.99) as f64 / alone.value_at_quantile(0.99).max(1) as f64,
        "rss_before_kib": rss_before.map(|r| r.0),
        "rss_after_kib": rss_after.map(|r| r.0),
        "rss_peak_kib": rss_after.map(|r| r.1),
    }))
}

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A server this run started; killed and its directory removed on drop.
struct Spawned {
    child: Child,
    dir: PathBuf,
    bin: PathBuf,
    cfg: PathBuf,
    addr: SocketAddr,
    /// With --ha: the backup, its config and PCP address.
    backup: Option<(Child, PathBuf, SocketAddr)>,
    /// With --scrape-metrics: the metrics endpoint.
    metrics: Option<SocketAddr>,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some((b, _, _)) = &mut self.backup {
            let _ = b.kill();
            let _ = b.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Spawned {
    fn start(bin: &PathBuf, args: &Args) -> anyhow::Result<Spawned> {
        let port = {
            let s = UdpSocket::bind("127.0.0.1:0")?;
            s.local_addr()?.port()
        };
        let addr: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
        let dir = std::env::temp_dir().join(format!("portkeep-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let cfg = dir.join("portkeepd.toml");
        let total = args.clients * args.mappings_per_client;
        // A class that never refuses before the backup gate: every request
        // reaches the last check (a standalone server has no backup).
        let checkpoint = if args.checkpoint {
            format!(
                "[checkpoint]\nmax_mappings = {}\n[checkpoint.classes.bench]\ncheckpoint = \"on-request\"\n\
                 max = {}\nrate = \"1000000/s\"\nburst = 1000000\n",
                total + 1,
                args.mappings_per_client.max(1),
            )
        } else {
            String::new()
        };
        let metrics_addr: Option<SocketAddr> = match args.scrape_metrics {
            true => Some(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?),
            false => None,
        };
        let metrics =
            metrics_addr.map_or_else(String::new, |a| format!("[metrics]\nlisten = \"{a}\"\n"));
        std::fs::write(
            &cfg,
            format!(
                "listen = [\"{addr}\"]\ndata_dir = \"{}\"\nexternal_addresses = [\"192.0.2.0/26\", \"198.18.0.0/26\"]\nworkers = {}\n\
                 [subscribers]\nmax_mappings = {}\n[limits]\nmax_mappings = {}\n[store]\nmode = \"{}\"\n{}\
                 [dataplane]\nkind = \"{}\"\n{checkpoint}{metrics}",
                dir.join("data").display(),
                args.server_workers,
                args.mappings_per_client
                    .max(args.walk.unwrap_or(0) + 1)
                    .max(args.count + 1)
                    .max(1024),
                (total + 1024).max(4_000_000),
                args.store,
                args.commit_delay_us
                    .map_or_else(String::new, |d| format!("commit_delay_us = {d}\n")),
                args.dataplane,
            ),
        )?;
        let backup = if args.ha {
            Some(Self::start_pair(bin, &dir, &cfg)?)
        } else {
            None
        };
        let child = Self::launch(bin, &cfg)?;
        let s = Spawned {
            child,
            dir,
            bin: bin.clone(),
            cfg,
            addr,
            backup,
            metrics: metrics_addr,
        };
        s.wait_serving(Duration::from_secs(10))?;
        if args.ha {
            s.wait_in_sync(Duration::from_secs(60))?;
        }
        Ok(s)
    }

    /// Adds `[ha]` to the active's config, writes the backup's (same
    /// policy, its own port and data directory), creates the pair's
    /// certificates and starts the backup.
    fn start_pair(
        bin: &PathBuf,
        dir: &std::path::Path,
        cfg: &PathBuf,
    ) -> anyhow::Result<(Child, PathBuf, SocketAddr)> {
        let certs = dir.join("certs");
        let ok = Command::new(bin)
            .arg("gen-certs")
            .arg(&certs)
            .args(["node-a", "node-b"])
            .stdout(Stdio::null())
            .status()?
            .success();
        if !ok {
            bail!("gen-certs failed");
        }
        let free_tcp = || -> anyhow::Result<SocketAddr> {
            Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
        };
        let (la, lb) = (free_tcp()?, free_tcp()?);
        let baddr: SocketAddr = UdpSocket::bind("127.0.0.1:0")?.local_addr()?;
        let ha = |role: &str, me: &str, peer: &str, l: SocketAddr, p: SocketAddr| {
            format!(
                "\n[ha]\nrole = \"{role}\"\nlisten = \"{l}\"\npeer = \"{p}\"\ntls_ca = \"{c}/ca.pem\"\n\
                 tls_cert = \"{c}/{me}.pem\"\ntls_key = \"{c}/{me}.key\"\npeer_name = \"{peer}\"\n",
                c = certs.display()
            )
        };
        let base = std::fs::read_to_string(cfg)?;
        let active_text = format!("{base}{}", ha("active", "node-a", "node-b", la, lb));
        let bcfg = dir.join("backup.toml");
        let backup_text = base
            .replace(
                &format!("data_dir = \"{}\"", dir.join("data").display()),
                &format!("data_dir = \"{}\"", dir.join("backup-data").display()),
            )
            .lines()
            .map(|l| {
                if l.starts_with("listen = ") {
                    format!("listen = [\"{baddr}\"]")
                } else {
                    l.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
            + &ha("backup", "node-b", "node-a", lb, la);
        std::fs::write(cfg, active_text)?;
        std::fs::write(&bcfg, backup_text)?;
        let child = Self::launch(bin, &bcfg)?;
        Ok((child, bcfg, baddr))
    }

    fn status_of(&self, cfg: &PathBuf) -> anyhow::Result<serde_json::Value> {
        let out = Command::new(&self.bin)
            .arg("--config")
            .arg(cfg)
            .args(["ctl", "--json", "status"])
            .output()?;
        serde_json::from_slice(&out.stdout)
            .with_context(|| String::from_utf8_lossy(&out.stderr).into_owned())
    }

    /// Polls the active's status until its backup is in sync.
    fn wait_in_sync(&self, within: Duration) -> anyhow::Result<Duration> {
        let start = now();
        while start.elapsed() < within {
            if self
                .status_of(&self.cfg)
                .is_ok_and(|v| v["ha"]["in_sync"] == true)
            {
                return Ok(start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        bail!("backup not in sync within {within:?}")
    }

    /// kill -9 the backup and wait until the active knows: the log
    /// position the backup had acknowledged.
    fn backup_down(&mut self) -> anyhow::Result<u64> {
        let Some((b, _, _)) = &mut self.backup else {
            bail!("no backup");
        };
        let _ = b.kill();
        let _ = b.wait();
        let start = now();
        loop {
            let st = self.status_of(&self.cfg)?;
            if st["ha"]["in_sync"] == false {
                return Ok(st["ha"]["acked_seq"].as_u64().unwrap_or(0));
            }
            if start.elapsed() > Duration::from_secs(30) {
                bail!("the active never noticed the backup's loss");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Starts the backup again (it resumes from its stored replica) and
    /// times it until the active reports it in sync.
    fn backup_back(&mut self, acked_before: u64) -> anyhow::Result<serde_json::Value> {
        let Some((_, bcfg, _)) = &self.backup else {
            bail!("no backup");
        };
        let bcfg = bcfg.clone();
        let before = self.status_of(&self.cfg)?;
        let resumes_before = before["ha"]["resumes"].as_u64().unwrap_or(0);
        let child = Self::launch(&self.bin, &bcfg)?;
        if let Some(b) = &mut self.backup {
            b.0 = child;
        }
        let t = self.wait_in_sync(Duration::from_secs(120))?;
        let st = self.status_of(&self.cfg)?;
        let resumed = st["ha"]["resumes"].as_u64().unwrap_or(0) > resumes_before;
        // What it caught up on: the log positions acknowledged since.
        let missed = st["ha"]["acked_seq"]
            .as_u64()
            .unwrap_or(0)
            .saturating_sub(acked_before);
        Ok(serde_json::json!({
            "log_positions_missed": missed,
            "resumed": resumed,
            "start_to_in_sync_ms": t.as_millis(),
        }))
    }

    /// Kills the backup, wipes its directory and starts it again: the
    /// time until the active reports it in sync, and the snapshot's size.
    fn resync(
        &mut self,
        probe_ip: Ipv4Addr,
    ) -> anyhow::Result<(Duration, serde_json::Value, serde_json::Value)> {
        let Some((b, bcfg, _)) = &mut self.backup else {
            bail!("no backup");
        };
        let _ = b.kill();
        let _ = b.wait();
        let bcfg = bcfg.clone();
        let _ = std::fs::remove_dir_all(self.dir.join("backup-data"));
        // The active notices the loss first, so the timing below is the
        // resync alone.
        let start = now();
        while self
            .status_of(&self.cfg)
            .is_ok_and(|v| v["ha"]["in_sync"] == true)
        {
            if start.elapsed() > Duration::from_secs(30) {
                bail!("the active never noticed the backup's loss");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        // A client's view, side by side: one second of probes with the
        // backup away, then probes from the backup's start until in sync.
        let server = self.addr;
        let quiet = {
            let stop = AtomicBool::new(false);
            std::thread::scope(|sc| {
                let h = sc.spawn(|| probe(server, probe_ip, 20_000, &stop));
                std::thread::sleep(Duration::from_secs(1));
                stop.store(true, Ordering::Relaxed);
                h.join().map_err(|_| anyhow::anyhow!("probe panicked"))?
            })?
        };
        let stop = AtomicBool::new(false);
        let (t, during) = std::thread::scope(|sc| -> anyhow::Result<_> {
            let h = sc.spawn(|| probe(server, probe_ip, 20_000, &stop));
            let child = Self::launch(&self.bin, &bcfg)?;
            if let Some(b) = &mut self.backup {
                b.0 = child;
            }
            let t = self.wait_in_sync(Duration::from_secs(120));
            stop.store(true, Ordering::Relaxed);
            let during = h.join().map_err(|_| anyhow::anyhow!("probe panicked"))??;
            Ok((t?, during))
        })?;
        let st = self.status_of(&self.cfg)?;
        let probes = serde_json::json!({
            "backup_away": probe_json(&quiet),
            "during_resync": probe_json(&during),
        });
        Ok((t, st["ha"].clone(), probes))
    }

    /// kill -9 the active, `ctl promote` the backup, and time until a
    /// refresh of check-pointed mapping `(client 0, port 1000)` succeeds on
    /// it.
    fn takeover(&mut self, args: &Args) -> anyhow::Result<serde_json::Value> {
        let Some((_, bcfg, baddr)) = &self.backup else {
            bail!("no backup");
        };
        let (bcfg, baddr) = (bcfg.clone(), *baddr);
        let _ = self.child.kill();
        let _ = self.child.wait();
        let ip = client_ip(args.client_base, 0);
        let sock = UdpSocket::bind(SocketAddr::new(IpAddr::V4(ip), 0))?;
        sock.set_read_timeout(Some(Duration::from_millis(5)))?;
        let req = map_request(ip, 0, args.port_base, args.checkpoint);
        let start = now();
        let out = Command::new(&self.bin)
            .arg("--config")
            .arg(&bcfg)
            .args(["ctl", "--json", "promote"])
            .output()?;
        let promote_cmd = start.elapsed();
        let promoted: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| String::from_utf8_lossy(&out.stderr).into_owned())?;
        let mut buf = [0u8; 1100];
        loop {
            if start.elapsed() > Duration::from_secs(30) {
                bail!("the promoted backup never answered");
            }
            sock.send_to(&req, baddr)?;
            if let Ok(n) = sock.recv(&mut buf) {
                if n >= MAP_RESPONSE_LEN && buf[3] == 0 {
                    break;
                }
                bail!("refresh after takeover failed with result {}", buf[3]);
            }
        }
        let serving = start.elapsed();
        Ok(serde_json::json!({
            "promote": promoted,
            "ctl_promote_ms": promote_cmd.as_secs_f64() * 1000.0,
            "promote_to_refresh_answered_ms": serving.as_secs_f64() * 1000.0,
        }))
    }

    /// Starts a server; its log (on this process's stderr) at the level
    /// `PORTKEEP_BENCH_DAEMON_LOG` names, `warn` by default (`info` shows
    /// how long each phase of a start took).
    fn launch(bin: &PathBuf, cfg: &PathBuf) -> anyhow::Result<Child> {
        Command::new(bin)
            .arg("--config")
            .arg(cfg)
            .arg("--log-level")
            .arg(std::env::var("PORTKEEP_BENCH_DAEMON_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))
    }

    /// Polls with ANNOUNCE until the server answers.
    fn wait_serving(&self, within: Duration) -> anyhow::Result<Duration> {
        let start = now();
        let probe = UdpSocket::bind("127.0.0.1:0")?;
        probe.set_read_timeout(Some(Duration::from_millis(20)))?;
        let announce = Request {
            header: RequestHeader {
                lifetime: 0,
                client_ip: to_wire(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            },
            data: OpData::Announce,
            options: vec![],
        }
        .to_bytes(&CodePoints::default())?;
        let mut buf = [0u8; 1100];
        while start.elapsed() < within {
            let _ = probe.send_to(&announce, self.addr);
            if probe.recv(&mut buf).is_ok() {
                return Ok(start.elapsed());
            }
        }
        bail!("server did not answer on {} within {within:?}", self.addr)
    }

    /// kill -9, then start again on the same store; the time from the new
    /// process's start to its first answer.
    fn kill_and_restart(&mut self) -> anyhow::Result<Duration> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Self::launch(&self.bin, &self.cfg)?;
        self.wait_serving(Duration::from_secs(60))
    }

    /// `ctl --json COMMAND` against the spawned daemon.
    fn ctl(&self, command: &str) -> anyhow::Result<serde_json::Value> {
        let out = Command::new(&self.bin)
            .arg("--config")
            .arg(&self.cfg)
            .args(["ctl", "--json", command])
            .output()?;
        serde_json::from_slice(&out.stdout)
            .with_context(|| String::from_utf8_lossy(&out.stderr).into_owned())
    }

    /// The daemon's group-commit latency percentiles (`ctl counters`).
    fn commit_latency(&self) -> anyhow::Result<serde_json::Value> {
        Ok(self.ctl("counters")?["commit_latency_us"].clone())
    }

    /// The mapping count the server reports through its control socket.
    fn mapping_count(&self) -> anyhow::Result<u64> {
        self.ctl("status")?["mappings"]
            .as_u64()
            .context("no mapping count in status")
    }
}

mod nft;
mod walk;
/// `--core-ab`: the core's MAP refresh rate without and with
/// CHECKPOINT_REQUIRED, measured in alternating 100 ms slices.
fn core_ab(args: &Args) -> anyhow::Result<()> {
    use portkeep_server::{
        CheckpointClass, CheckpointMode, CheckpointPolicy, Outcome, RateLimit, Server,
        ServerConfig, Timestamp,
    };
    let total = args.clients * args.mappings_per_client;
    let cfg = ServerConfig {
        external_addresses: (0..64u8)
            .map(|i| IpAddr::V4(Ipv4Addr::new(192, 0, 2, i)))
            .collect(),
        max_mappings_per_subscriber: u32::try_from(args.mappings_per_client.max(1024))?,
        max_mappings: u32::try_from(total + 1024)?,
        checkpoint: CheckpointPolicy {
            max_mappings: u32::try_from(total + 1)?,
            classes: vec![CheckpointClass {
                name: "bench".into(),
                mode: CheckpointMode::OnRequest,
                max: Some(u32::try_from(args.mappings_per_client)?),
                rate: Some(RateLimit {
                    count: 1_000_000,
                    per: Duration::from_secs(1),
                    burst: 1_000_000,
                }),
            }],
            default_class: 0,
            assign: Vec::new(),
        },
        ..ServerConfig::default()
    };
    let start = now();
    let stamp = || Timestamp(u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX));
    // Requests per side: [without, with].
    let mut reqs: [Vec<(SocketAddr, Vec<u8>)>; 2] = [Vec::new(), Vec::new()];
    for (side, cp) in [(0, false), (1, true)] {
        for c in 0..args.clients {
            let ip = client_ip(args.client_base, c);
            for m in 0..args.mappings_per_client {
                let port = 1000 + u16::try_from(m)?;
                reqs[side].push((
                    SocketAddr::new(IpAddr::V4(ip), 40000),
                    map_request(ip, c, port, cp),
                ));
            }
        }
    }
    let mut servers = [Server::new(cfg.clone(), stamp()), Server::new(cfg, stamp())];
    let mut out = Vec::with_capacity(1100);
    // Create pass, then alternate.
    for side in 0..2 {
        for (src, r) in &reqs[side] {
            servers[side].handle(stamp(), *src, r, &mut out);
        }
    }
    let mut done = [0u64; 2];
    let mut spent = [Duration::ZERO; 2];
    let mut next = [0usize; 2];
    let slice = Duration::from_millis(100);
    let deadline = now() + Duration::from_secs_f64(args.duration.max(0.2));
    while now() < deadline {
        for side in 0..2 {
            let t0 = now();
            while t0.elapsed() < slice {
                let ts = stamp();
                for _ in 0..256 {
                    let (src, r) = &reqs[side][next[side]];
                    next[side] = (next[side] + 1) % reqs[side].len();
                    if servers[side].handle(ts, *src, r, &mut out) != Outcome::Reply
                        || out.get(3) != Some(&0)
                    {
                        bail!("the core refused a refresh");
                    }
                    done[side] += 1;
                }
            }
            spent[side] += t0.elapsed();
        }
    }
    let rate = |side: usize| done[side] as f64 / spent[side].as_secs_f64();
    let refused = servers[1].stats().checkpoint.refused_total();
    let out = serde_json::json!({
        "mode": "core-ab",
        "clients": args.clients,
        "mappings": total,
        "without_checkpoint_per_second": rate(0).round(),
        "with_checkpoint_per_second": rate(1).round(),
        "ratio": rate(1) / rate(0),
        "checkpoint_refused": refused,
        "checkpoint_refused_no_backup": servers[1]
            .stats()
            .checkpoint
            .refused(portkeep_server::RefusalReason::NoBackup),
    });
    if args.json {
        println!("{out}");
    } else {
        println!(
            "core A/B, {total} mappings: without CHECKPOINT_REQUIRED {:.0} req/s, with {:.0} req/s, ratio {:.3} ({} refused, all at no_backup: {})",
            rate(0),
            rate(1),
            rate(1) / rate(0),
            refused,
            out["checkpoint_refused_no_backup"] == refused,
        );
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.batch == 0 || args.clients == 0 || args.mappings_per_client == 0 || args.threads == 0 {
        bail!("--batch, --clients, --mappings-per-client and --threads must be at least 1");
    }
    if args.core_ab {
        return core_ab(&args);
    }
    if let Some(n) = args.nft_install {
        return nft::install(n, args.json);
    }
    if args.mappings_per_client > 60000 {
        bail!("--mappings-per-client is at most 60000");
    }
    let ports_needed = if args.disjoint_ports {
        args.clients * args.mappings_per_client
    } else {
        args.mappings_per_client
    };
    if usize::from(args.port_base) + ports_needed > 65536 {
        bail!("--port-base plus the ports each client needs ({ports_needed}) passes 65535");
    }
    if let Some(dir) = &args.fsync_probe {
        return fsync_probe(dir, args.count, args.json);
    }
    let echo_stop = Arc::new(AtomicBool::new(false));
    let echo = if args.echo {
        Some(echo_server(args.server_workers.max(1), echo_stop.clone())?)
    } else {
        None
    };
    let (mut spawned, server, pid) = match &args.spawn {
        Some(bin) => {
            let s = Spawned::start(bin, &args)?;
            let (addr, pid) = (s.addr, s.child.id());
            (Some(s), addr, Some(pid))
        }
        None => match &echo {
            Some((addr, _)) => (None, *addr, None),
            None => (None, args.server, args.server_pid),
        },
    };
    let rss_before = pid.and_then(rss_kib);
    if let Some(n) = args.walk {
        return walk::run(server, n, args.json);
    }
    if let Some(rate) = args.rate {
        return nft::paced(
            server,
            client_ip(args.client_base, 0),
            args.port_base,
            rate,
            args.count,
            args.json,
        );
    }
    let mut clients = Vec::with_capacity(args.clients);
    for i in 0..args.clients {
        let ip = client_ip(args.client_base, i);
        let sock = UdpSocket::bind(SocketAddr::new(IpAddr::V4(ip), 0))
            .with_context(|| format!("cannot bind {ip} (not a local address)"))?;
        sock.set_read_timeout(Some(Duration::from_millis(args.reply_timeout_ms.max(1))))?;
        let s2 = socket2::SockRef::from(&sock);
        let _ = s2.set_recv_buffer_size(1 << 20);
        let port0 = if args.disjoint_ports {
            args.port_base + (i * args.mappings_per_client) as u16
        } else {
            args.port_base
        };
        clients.push(VClient {
            sock,
            index: i,
            port0,
            next: 0,
            template: if args.natpmp {
                portkeep_proto::natpmp::NatPmpRequest::Map {
                    protocol: portkeep_proto::natpmp::NatPmpProtocol::Tcp,
                    internal_port: port0,
                    suggested_external_port: 0,
                    lifetime: 3600,
                }
                .to_bytes()
            } else {
                map_request(ip, i, port0, args.checkpoint)
            },
            sent_at: vec![None; args.mappings_per_client],
            waiting: 0,
            creating: true,
            natpmp: args.natpmp,
        });
    }
    if let Some(w) = args.window {
        anyhow::ensure!(
            args.threads == args.clients,
            "--window needs one client per load thread (--threads {} --clients {})",
            args.threads,
            args.clients
        );
        anyhow::ensure!(
            (1..=args.mappings_per_client).contains(&w),
            "--window must be 1 to --mappings-per-client ({}), not {w}",
            args.mappings_per_client
        );
    }
    let stop = Arc::new(AtomicBool::new(false));
    let threads = args.threads.min(args.clients);
    let chunk = args.clients.div_ceil(threads);
    let mut groups: Vec<Vec<VClient>> = Vec::new();
    let mut it = clients.into_iter();
    loop {
        let g: Vec<VClient> = it.by_ref().take(chunk).collect();
        if g.is_empty() {
            break;
        }
        groups.push(g);
    }
    let args = Arc::new(args);
    let phase = |groups: Vec<Vec<VClient>>, secs: Option<f64>| {
        let start = now();
        let deadline = secs.map(|s| start + Duration::from_secs_f64(s));
        let handles: Vec<_> = groups
            .into_iter()
            .map(|mut g| {
                let args = args.clone();
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let r = run_phase(&mut g, &args, server, deadline, &stop);
                    (g, r)
                })
            })
            .collect();
        let mut back = Vec::new();
        let mut total = PhaseResult::default();
        let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
            .unwrap_or_else(|_| unreachable!("valid histogram bounds"));
        for h in handles {
            let Ok((g, (r, hi))) = h.join() else { continue };
            back.push(g);
            total.sent += r.sent;
            total.ok += r.ok;
            total.errors += r.errors;
            total.lost += r.lost;
            total.honoured += r.honoured;
            let mut prev = start;
            for m in &r.marks {
                let secs = m.duration_since(prev).as_secs_f64();
                total
                    .tenths
                    .push((r.mark_every as f64 / secs.max(1e-9)).round() as u64);
                prev = *m;
            }
            let _ = hist.add(&hi);
        }
        (back, total, hist, start.elapsed())
    };
    let scraper_stop = Arc::new(AtomicBool::new(false));
    let scraper = spawned.as_ref().and_then(|s| s.metrics).map(|addr| {
        let stop = scraper_stop.clone();
        std::thread::spawn(move || scrape_every_second(addr, &stop))
    });
    let (groups, create, create_hist, create_t) = phase(groups, None);
    let rss_after_create = pid.and_then(rss_kib);
    let acked_before = match (&mut spawned, args.resume) {
        (Some(s), true) => Some(s.backup_down()?),
        _ => None,
    };
    let (refresh, refresh_hist, refresh_t) = if args.duration > 0.0 {
        let (_, r, h, t) = phase(groups, Some(args.duration));
        (Some(r), Some(h), t)
    } else {
        (None, None, Duration::ZERO)
    };
    let rss_end = pid.and_then(rss_kib);
    scraper_stop.store(true, Ordering::Relaxed);
    let scrapes = match scraper {
        Some(t) => Some(
            t.join()
                .map_err(|_| anyhow::anyhow!("scraper panicked"))??,
        ),
        None => None,
    };
    let mappings = (args.clients * args.mappings_per_client) as u64;
    let report = |name: &str, r: &PhaseResult, h: &Histogram<u64>, t: Duration| {
        serde_json::json!({
            "phase": name,
            "requests": r.sent,
            "success": r.ok,
            "errors": r.errors,
            "lost": r.lost,
            "checkpoint_honoured": r.honoured,
            "seconds": t.as_secs_f64(),
            "requests_per_second": (r.ok as f64 / t.as_secs_f64()).round(),
            "tenths_per_second": r.tenths,
            "latency_us": {
                "p50": h.value_at_quantile(0.50),
                "p99": h.value_at_quantile(0.99),
                "p99.9": h.value_at_quantile(0.999),
                "max": h.max(),
            }
        })
    };
    let mut phases = vec![report("create", &create, &create_hist, create_t)];
    if let (Some(r), Some(h)) = (&refresh, &refresh_hist) {
        phases.push(report("refresh", r, h, refresh_t));
    }
    let memory = match (rss_before, rss_after_create) {
        (Some(b), Some(a)) => serde_json::json!({
            "rss_before_kib": b,
            "rss_after_create_kib": a,
            "rss_end_kib": rss_end,
            "bytes_per_mapping": ((a.saturating_sub(b)) as f64 * 1024.0 / mappings as f64).round(),
        }),
        _ => serde_json::Value::Null,
    };
    // Read before any restart or resync below starts a new daemon.
    let commit_latency = match &spawned {
        Some(s) => s.commit_latency()?,
        None => serde_json::Value::Null,
    };
    let flooded = match (args.flood, &refresh) {
        (Some(secs), Some(r)) => {
            let capacity = r.ok as f64 / refresh_t.as_secs_f64();
            flood_phase(
                server,
                pid,
                client_ip(args.client_base, args.clients),
                capacity * args.flood_share,
                args.flood_baseline,
                secs,
            )?
        }
        (Some(_), None) => {
            bail!("--flood needs a refresh phase (--duration > 0) to measure capacity")
        }
        _ => serde_json::Value::Null,
    };
    let resume = match (&mut spawned, acked_before) {
        (Some(s), Some(acked)) => s.backup_back(acked)?,
        _ => serde_json::Value::Null,
    };
    let resync = match (&mut spawned, args.resync) {
        (Some(s), true) => {
            let (t, st, probes) = s.resync(client_ip(args.client_base, args.clients))?;
            serde_json::json!({
                "snapshot_items": st["last_snapshot_items"],
                "start_to_in_sync_ms": t.as_millis(),
                "snapshot_sent_to_acked_ms": st["last_snapshot_ack_ms"],
                "pcp_probe": probes,
            })
        }
        _ => serde_json::Value::Null,
    };
    let takeover = match (&mut spawned, args.takeover) {
        (Some(s), true) => s.takeover(&args)?,
        _ => serde_json::Value::Null,
    };
    let restart = match (&mut spawned, args.restart) {
        (Some(s), true) => {
            let before = s.mapping_count()?;
            let t = s.kill_and_restart()?;
            let after = s.mapping_count()?;
            serde_json::json!({
                "mappings_before": before,
                "mappings_after": after,
                "kill_9_to_serving_ms": t.as_millis(),
            })
        }
        _ => serde_json::Value::Null,
    };
    let out = serde_json::json!({
        "server": server.to_string(),
        "store": args.store,
        "restart": restart,
        "ha": args.ha,
        "resync": resync,
        "resume": resume,
        "takeover": takeover,
        "clients": args.clients,
        "mappings": mappings,
        "threads": args.threads,
        "batch": args.batch,
        "checkpoint": args.checkpoint,
        "phases": phases,
        "metrics_scrapes": scrapes,
        "flood": flooded,
        "server_memory": memory,
        "commit_latency_us": commit_latency,
    });
    if args.json {
        println!("{out}");
    } else {
        println!(
            "portkeep-bench against {server}: {} clients x {} mappings = {mappings}{}",
            args.clients,
            args.mappings_per_client,
            if args.checkpoint {
                ", every request with CHECKPOINT_REQUIRED"
            } else {
                ""
            }
        );
        for p in out["phases"].as_array().into_iter().flatten() {
            println!(
                "  {:<8} {:>9} req/s  ({} ok, {} honoured, {} errors, {} lost in {:.2} s)  latency p50 {} us  p99 {} us  p99.9 {} us  max {} us",
                p["phase"].as_str().unwrap_or(""),
                p["requests_per_second"],
                p["success"],
                p["checkpoint_honoured"],
                p["errors"],
                p["lost"],
                p["seconds"].as_f64().unwrap_or(0.0),
                p["latency_us"]["p50"],
                p["latency_us"]["p99"],
                p["latency_us"]["p99.9"],
                p["latency_us"]["max"],
            );
            if let Some(t) = p["tenths_per_second"].as_array().filter(|t| !t.is_empty()) {
                let t: Vec<String> = t.iter().map(ToString::to_string).collect();
                println!("           req/s in each tenth: {}", t.join(" "));
            }
        }
        if let Some(n) = scrapes {
            println!("  metrics scraped {n} times, once a second, during the load");
        }
        if !flooded.is_null() {
            println!(
                "  flood at {} datagrams/s ({} sent: {}): a MAP every ms, p50 {} us p99 {} us (alone: p50 {} us p99 {} us; p99 ratio {:.2}); server RSS {} KiB before the flood, {} KiB after {} s of it (peak {} KiB)",
                flooded["rate"], flooded["sent"], flooded["by_kind"],
                flooded["client"]["p50_us"], flooded["client"]["p99_us"],
                flooded["client_alone"]["p50_us"], flooded["client_alone"]["p99_us"],
                flooded["p99_ratio"].as_f64().unwrap_or(0.0),
                flooded["rss_before_kib"], flooded["rss_after_kib"], flooded["seconds"], flooded["rss_peak_kib"],
            );
        }
        if !resume.is_null() {
            println!(
                "  resume: the backup missed {} log positions; restarted to in sync in {} ms ({})",
                resume["log_positions_missed"],
                resume["start_to_in_sync_ms"],
                if resume["resumed"] == true {
                    "resumed from its position"
                } else {
                    "by a snapshot"
                }
            );
        }
        if !resync.is_null() {
            println!(
                "  resync: {} items, backup started to in sync in {} ms (snapshot sent to acknowledged {} ms); a volatile MAP every ms: p99 {} µs (max {} µs) during the resync, {} µs (max {} µs) with the backup away",
                resync["snapshot_items"], resync["start_to_in_sync_ms"], resync["snapshot_sent_to_acked_ms"],
                resync["pcp_probe"]["during_resync"]["p99_us"], resync["pcp_probe"]["during_resync"]["max_us"],
                resync["pcp_probe"]["backup_away"]["p99_us"], resync["pcp_probe"]["backup_away"]["max_us"]
            );
        }
        if !takeover.is_null() {
            println!(
                "  takeover: ctl promote returned in {:.1} ms; a check-pointed mapping refreshed on the new active {:.1} ms after the command ({})",
                takeover["ctl_promote_ms"].as_f64().unwrap_or(0.0),
                takeover["promote_to_refresh_answered_ms"].as_f64().unwrap_or(0.0),
                takeover["promote"]
            );
        }
        if !restart.is_null() {
            println!(
                "  restart after kill -9: serving again in {} ms with {} of {} mappings",
                restart["kill_9_to_serving_ms"],
                restart["mappings_after"],
                restart["mappings_before"]
            );
        }
        if commit_latency["count"].as_u64().is_some_and(|n| n > 0) {
            println!(
                "  group commit (arrival at the committer to release): p50 {} us, p90 {} us, p99 {} us, max {} us over {} jobs",
                commit_latency["p50"],
                commit_latency["p90"],
                commit_latency["p99"],
                commit_latency["max"],
                commit_latency["count"]
            );
        }
        if !memory.is_null() {
            println!(
                "  server RSS {} KiB before, {} KiB after create: {} bytes per mapping",
                memory["rss_before_kib"],
                memory["rss_after_create_kib"],
                memory["bytes_per_mapping"]
            );
        }
    }
    echo_stop.store(true, Ordering::Relaxed);
    if let Some((_, threads)) = echo {
        for t in threads {
            let _ = t.join();
        }
    }
    Ok(())
}
