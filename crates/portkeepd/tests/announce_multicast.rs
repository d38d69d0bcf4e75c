//! RFC 6887 section 14.1.1 over a real link: after start, `portkeepd`
//! multicasts unsolicited ANNOUNCE responses to 224.0.0.1:5350 and
//! [ff02::1]:5350 out of each `[announce] multicast_interfaces` entry.
//!
//! ```text
//!  pkmA-<pid> (runs portkeepd)                  pkmB-<pid> (listener)
//!  pkm-a 10.231.77.1/24 + fe80::/64  ─veth─  pkm-b 10.231.77.2/24 + fe80::/64
//!  pkm-x 10.231.78.1/24 ─veth─ pkm-y (both in A; the default and
//!                                multicast routes point at pkm-x)
//! ```
//!
//! The listener is this test binary again, run in namespace B with
//! `PK_MCAST_LISTENER` set: it binds the groups themselves (224.0.0.1:5350
//! and [ff02::1%pkm-b]:5350), so only datagrams addressed to the groups
//! reach it, and prints each one. The second veth pair in A carries the
//! routes an unpinned multicast send would follow, and nftables counters in
//! A count port-5350 datagrams per output interface, so a send on any
//! interface but `pkm-a` is seen.
//!
//! Needs root, `ip`, `nft` and an IPv6 kernel: under CI (`CI=true`) it
//! fails without them; elsewhere it prints `SKIPPED: <reason>`, records
//! the skip (`PORTKEEP_SKIP_LOG`) and passes (without `nft` it runs, minus
//! the per-interface counts). Nothing leaves the two namespaces: B has no
//! route off its link, and A's default route points at a veth whose peer
//! is also in A.

// Test helpers outside #[test] fns: a failed setup should abort loudly.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use portkeep_proto::{CodePoints, OpData, Response, ResultCode, CLIENT_PORT};
use portkeep_test_support::netns::{assert_gone, ip, ns_exec, Lab};
use portkeep_test_support::process::now;
use portkeep_test_support::skip::{find_tool, missing, skip};
use socket2::{Domain, Protocol, Socket, Type};

const TEST_NAME: &str = "rfc6887_s14_1_1_unsolicited_announce_multicast_on_interface";
/// Names the test in skips.
const WHAT: &str = "multicast ANNOUNCE";
/// Set (to the interface name) in the re-executed listener.
const LISTENER_ENV: &str = "PK_MCAST_LISTENER";
/// How long the listener listens, milliseconds.
const LISTEN_MS_ENV: &str = "PK_MCAST_LISTEN_MS";
/// Marks the listener's report lines. libtest prints its own output too,
/// and its `test NAME ... ` may share a line with the first report.
const MARK: &str = "@@pkm@@";

const DEV_A: &str = "pkm-a";
const DEV_B: &str = "pkm-b";
const DEV_X: &str = "pkm-x";
const DEV_Y: &str = "pkm-y";
const IP_A: &str = "10.231.77.1";
const IP_B: &str = "10.231.77.2";
const IP_X: &str = "10.231.78.1";
const GROUP4: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 1);
const GROUP6: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

/// What is asserted: announcements seen within this long after spawning.
const WINDOW: Duration = Duration::from_millis(2500);
/// Schedule check: sends at 0, 0.25, 0.75, 1.75 s, the next at 3.75 s.
const SCHEDULE_CHECK_AT: Duration = Duration::from_millis(2000);
const MAX_BY_SCHEDULE_CHECK: usize = 4;

// ---------------------------------------------------------------------------
// Environment.

/// Why the test cannot run here, if it cannot.
fn skip_reason() -> Option<String> {
    if let Some(r) = missing(&["ip"]) {
        return Some(r);
    }
    if !Path::new("/proc/net/if_inet6").exists() {
        return Some("the kernel has no IPv6".into());
    }
    None
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    s.as_bytes()
        .chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok())
        .collect::<Option<Vec<u8>>>()
        .filter(|v| v.len() * 2 == s.len())
}

// ---------------------------------------------------------------------------
// Listener mode (namespace B).

/// Binds the all-hosts groups on port 5350 on `dev` and prints every
/// datagram as `PKM v4|v6 SRC_IP SRC_PORT HEX` until `millis` have passed.
fn run_listener(dev: &str, millis: u64) {
    let index: u32 = fs::read_to_string(format!("/sys/class/net/{dev}/ifindex"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let s4 = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
    s4.set_reuse_address(true).unwrap();
    s4.bind_device(Some(dev.as_bytes())).unwrap();
    // Bound to the group: only datagrams addressed to 224.0.0.1 arrive.
    // Linux hosts are members of 224.0.0.1 on every multicast interface.
    s4.bind(&SocketAddr::from((GROUP4, CLIENT_PORT)).into())
        .unwrap();
    let s6 = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP)).unwrap();
    s6.set_only_v6(true).unwrap();
    s6.set_reuse_address(true).unwrap();
    // Likewise ff02::1, scoped to (and so bound to) `dev`.
    s6.bind(&SocketAddr::V6(SocketAddrV6::new(GROUP6, CLIENT_PORT, 0, index)).into())
        .unwrap();
    let socks: [(&str, UdpSocket); 2] = [("v4", s4.into()), ("v6", s6.into())];
    let until = Duration::from_millis(millis);
    let started = now();
    println!("{MARK} READY");
    std::thread::scope(|scope| {
        for (family, sock) in &socks {
            scope.spawn(move || {
                sock.set_read_timeout(Some(Duration::from_millis(50)))
                    .unwrap();
                let mut buf = [0u8; 2048];
                while started.elapsed() < until {
                    if let Ok((n, from)) = sock.recv_from(&mut buf) {
                        println!(
                            "{MARK} {family} {} {} {}",
                            from.ip(),
                            from.port(),
                            to_hex(&buf[..n])
                        );
                    }
                }
            });
        }
    });
    println!("{MARK} DONE");
}

// ---------------------------------------------------------------------------
// Topology.

/// Everything the test created, torn down on drop even when an assertion
/// fails half-way.
struct Topology {
    ns_a: String,
    ns_b: String,
    daemon: Option<Child>,
    listener: Option<Child>,
    // Last: the namespaces (their veths and nft table with them) and the
    // directory go once the processes are reaped.
    lab: Lab,
}

impl Drop for Topology {
    fn drop(&mut self) {
        // `ip netns exec` execs its command, so these are the real pids.
        for child in [self.daemon.take(), self.listener.take()]
            .into_iter()
            .flatten()
        {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Topology {
    fn build() -> Result<Topology, String> {
        let mut lab = Lab::new("pkm")?;
        let (ns_a, ns_b) = (format!("pkmA-{}", lab.id), format!("pkmB-{}", lab.id));
        lab.add_ns(&ns_a)?;
        lab.add_ns(&ns_b)?;
        let topo = Topology {
            ns_a,
            ns_b,
            daemon: None,
            listener: None,
            lab,
        };
        let (a, b) = (topo.ns_a.as_str(), topo.ns_b.as_str());
        topo.lab.veth(a, DEV_A, b, DEV_B)?;
        // The lure interface: a second veth pair with both ends in A (a
        // dummy interface would do, but its module is not always there).
        topo.lab.veth(a, DEV_X, a, DEV_Y)?;
        // No duplicate address detection on these private links: the
        // link-local addresses are usable as soon as the links are up. If
        // sysctl is unavailable, the wait below covers DAD.
        for (ns, dev) in [(a, DEV_A), (b, DEV_B), (a, DEV_X)] {
            let _ = ns_exec(
                ns,
                &[
                    "sysctl",
                    "-qw",
                    &format!("net.ipv6.conf.{dev}.accept_dad=0"),
                ],
            );
        }
        ip(&["-n", a, "addr", "add", &format!("{IP_A}/24"), "dev", DEV_A])?;
        ip(&["-n", b, "addr", "add", &format!("{IP_B}/24"), "dev", DEV_B])?;
        ip(&["-n", a, "addr", "add", &format!("{IP_X}/24"), "dev", DEV_X])?;
        for (ns, dev) in [(a, DEV_A), (a, DEV_X), (a, DEV_Y), (b, DEV_B)] {
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        // Lure: a multicast send not pinned to pkm-a would follow these
        // routes out of pkm-x instead.
        ip(&["-n", a, "route", "add", "default", "dev", DEV_X])?;
        ip(&["-n", a, "route", "add", "224.0.0.0/4", "dev", DEV_X])?;
        ip(&["-n", a, "-6", "route", "add", "default", "dev", DEV_X])?;
        Ok(topo)
    }

    fn dir(&self) -> &Path {
        &self.lab.dir
    }

    /// Waits until `dev` in `ns` has a link-local address that is no longer
    /// tentative, and returns it.
    fn link_local(ns: &str, dev: &str) -> Result<Ipv6Addr, String> {
        let deadline = now() + Duration::from_secs(5);
        loop {
            let out = ip(&["-n", ns, "-6", "addr", "show", "dev", dev, "scope", "link"])?;
            let addr = out.lines().find_map(|l| {
                let l = l.trim();
                let rest = l.strip_prefix("inet6 ")?;
                let a: Ipv6Addr = rest.split('/').next()?.parse().ok()?;
                Some((a, l.contains("tentative")))
            });
            if let Some((a, false)) = addr {
                return Ok(a);
            }
            if now() > deadline {
                return Err(format!("no usable link-local address on {dev}: {out}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Installs nftables counters of port-5350 datagrams by output interface
    /// in namespace A. `Ok(false)` when nft is unavailable (a skipped part
    /// of the test: under CI it fails).
    fn install_counters(&self) -> Result<bool, String> {
        if find_tool("nft").is_none() {
            skip(
                WHAT,
                "`nft` not found on PATH: datagrams not counted per interface (apt-get install nftables)",
            );
            return Ok(false);
        }
        let path = self.dir().join("counters.nft");
        fs::write(
            &path,
            format!(
                "table inet pkm {{\n\
                 counter on4 {{ }}\n\
                 counter on6 {{ }}\n\
                 counter off4 {{ }}\n\
                 counter off6 {{ }}\n\
                 chain out {{\n\
                 type filter hook output priority 0; policy accept;\n\
                 meta nfproto ipv4 udp dport {CLIENT_PORT} oifname \"{DEV_A}\" counter name \"on4\"\n\
                 meta nfproto ipv4 udp dport {CLIENT_PORT} oifname != \"{DEV_A}\" counter name \"off4\"\n\
                 meta nfproto ipv6 udp dport {CLIENT_PORT} oifname \"{DEV_A}\" counter name \"on6\"\n\
                 meta nfproto ipv6 udp dport {CLIENT_PORT} oifname != \"{DEV_A}\" counter name \"off6\"\n\
                 }}\n\
                 }}\n"
            ),
        )
        .map_err(|e| e.to_string())?;
        match ns_exec(&self.ns_a, &["nft", "-f", path.to_str().unwrap()]) {
            Ok(_) => Ok(true),
            Err(e) => {
                skip(
                    WHAT,
                    &format!("nftables unusable, datagrams not counted per interface: {e}"),
                );
                Ok(false)
            }
        }
    }

    fn counter(&self, name: &str) -> u64 {
        let out = ns_exec(&self.ns_a, &["nft", "list", "counter", "inet", "pkm", name]).unwrap();
        out.split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no packet count in {out}"))
    }

    fn daemon_log(&self) -> String {
        fs::read_to_string(self.dir().join("portkeepd.log")).unwrap_or_default()
    }
}

// ---------------------------------------------------------------------------
// The test.

/// One datagram the listener received.
#[derive(Debug)]
struct Seen {
    /// Since the daemon was spawned.
    at: Duration,
    v6: bool,
    src: IpAddr,
    port: u16,
    bytes: Vec<u8>,
}

fn parse_seen(line: &str, at: Duration) -> Option<Seen> {
    let mut w = line.split_whitespace();
    let v6 = match w.next()? {
        "v4" => false,
        "v6" => true,
        _ => return None,
    };
    Some(Seen {
        at,
        v6,
        src: w.next()?.parse().ok()?,
        port: w.next()?.parse().ok()?,
        bytes: from_hex(w.next()?)?,
    })
}

/// Checks one datagram is a bare ANNOUNCE response (RFC 6887 sections 7.2
/// and 14.1) from a server that started moments ago.
fn check_announce(s: &Seen) -> Result<u32, String> {
    let b = &s.bytes;
    if b.len() != 24 {
        return Err(format!("{} octets, expected 24", b.len()));
    }
    if b[0] != 2 {
        return Err(format!("version {}, expected 2", b[0]));
    }
    if b[1] != 0x80 {
        return Err(format!(
            "opcode byte {:#04x}, expected 0x80 (R, ANNOUNCE)",
            b[1]
        ));
    }
    if b[2] != 0 || b[12..24].iter().any(|&x| x != 0) {
        return Err("reserved octets not zero".into());
    }
    if b[3] != 0 {
        return Err(format!("result {}, expected SUCCESS (0)", b[3]));
    }
    let lifetime = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
    if lifetime != 0 {
        return Err(format!("lifetime {lifetime}, expected 0"));
    }
    let epoch = u32::from_be_bytes([b[8], b[9], b[10], b[11]]);
    if epoch > 2 {
        return Err(format!("epoch {epoch}, expected 0..=2 for a fresh server"));
    }
    let r = Response::parse(b, &CodePoints::default()).map_err(|e| format!("{e:?}"))?;
    if r.header.result != ResultCode::SUCCESS
        || r.data != OpData::Announce
        || r.header.epoch != epoch
    {
        return Err(format!("parsed as {r:?}"));
    }
    Ok(epoch)
}

/// RFC 6887 section 14.1.1: after starting, the server multicasts
/// unsolicited ANNOUNCE responses to 224.0.0.1:5350 and [ff02::1]:5350 on
/// each configured interface, from its address on that link and its PCP
/// port (section 14.1.3), on the schedule 0, 0.25, 0.75, 1.75 s, ...
#[test]
fn rfc6887_s14_1_1_unsolicited_announce_multicast_on_interface() {
    if let Ok(dev) = std::env::var(LISTENER_ENV) {
        let ms = std::env::var(LISTEN_MS_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(4000);
        run_listener(&dev, ms);
        return;
    }
    exercise(true);
}

/// The default configuration (no `[announce]`) tells the clients of a
/// start that lost state on the links of its specific listen addresses:
/// `pkm-a` carries `10.231.77.1`, and there it announces in every family
/// it accepts requests in (IPv4 from that address, IPv6 through the
/// wildcard socket), never on the lure interface.
#[test]
fn rfc6887_s14_1_3_the_default_config_announces_a_start_on_its_listen_links() {
    if std::env::var(LISTENER_ENV).is_ok() {
        return;
    }
    exercise(false);
}

/// Runs the daemon in A and the listener in B; `configured`: with
/// `multicast_interfaces = ["pkm-a"]`, else with no `[announce]` at all.
fn exercise(configured: bool) {
    if let Some(reason) = skip_reason() {
        skip(WHAT, &reason);
        return;
    }
    let test_started = now();
    let mut topo = Topology::build().unwrap_or_else(|e| panic!("building the topology: {e}"));
    let ll_a = Topology::link_local(&topo.ns_a, DEV_A).unwrap();
    Topology::link_local(&topo.ns_b, DEV_B).unwrap();
    let counting = topo.install_counters().unwrap();

    // The listener: this binary again, in namespace B.
    let exe = std::env::current_exe().unwrap();
    let mut listener = Command::new("ip")
        .args(["netns", "exec", &topo.ns_b])
        .arg(&exe)
        .args(["--exact", TEST_NAME, "--nocapture", "--test-threads=1"])
        .env(LISTENER_ENV, DEV_B)
        .env(LISTEN_MS_ENV, "4000")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = listener.stdout.take().unwrap();
    topo.listener = Some(listener);
    let (tx, rx) = mpsc::channel::<(Instant, String)>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some((_, rest)) = line.split_once(MARK) {
                if tx.send((now(), rest.trim().to_owned())).is_err() {
                    break;
                }
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(5)) {
        Ok((_, l)) if l == "READY" => {}
        other => panic!("listener in {} not ready: {other:?}", topo.ns_b),
    }

    // The daemon, in namespace A.
    let dir = topo.dir().to_owned();
    let config = dir.join("portkeepd.toml");
    fs::write(
        &config,
        format!(
            "listen = [\"{IP_A}:5351\", \"[::]:5351\"]\n\
             data_dir = \"{}\"\n\
             workers = 1\n\
             {}",
            dir.join("data").display(),
            if configured {
                format!("[announce]\nmulticast_interfaces = [\"{DEV_A}\"]\n")
            } else {
                String::new()
            }
        ),
    )
    .unwrap();
    let log = fs::File::create(dir.join("portkeepd.log")).unwrap();
    let spawned = now();
    let daemon = Command::new("ip")
        .args(["netns", "exec", &topo.ns_a])
        .arg(env!("CARGO_BIN_EXE_portkeepd"))
        .arg("--config")
        .arg(&config)
        .args(["--log-level", "debug"])
        .env_remove("PORTKEEPD_LOG")
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    topo.daemon = Some(daemon);

    let mut seen = Vec::new();
    loop {
        let left = (spawned + WINDOW).saturating_duration_since(now());
        if left.is_zero() {
            break;
        }
        match rx.recv_timeout(left) {
            Ok((_, line)) if line == "DONE" => break,
            Ok((at, line)) => {
                let at = at.saturating_duration_since(spawned);
                if at <= WINDOW {
                    let s = parse_seen(&line, at)
                        .unwrap_or_else(|| panic!("unreadable listener line {line:?}"));
                    seen.push(s);
                }
            }
            Err(_) => break,
        }
    }
    let exited = topo.daemon.as_mut().unwrap().try_wait().unwrap();
    let context = format!(
        "received within {WINDOW:?}: {seen:#?}\ndaemon exit status: {exited:?}\ndaemon log:\n{}",
        topo.daemon_log()
    );
    assert!(exited.is_none(), "portkeepd exited early\n{context}");
    assert!(
        !topo.daemon_log().contains("cannot send ANNOUNCE"),
        "the configured interface was rejected\n{context}"
    );

    let a4: IpAddr = IP_A.parse().unwrap();
    for v6 in [false, true] {
        let family = if v6 { "IPv6" } else { "IPv4" };
        let (want_src, group) = if v6 {
            (IpAddr::V6(ll_a), "[ff02::1]:5350")
        } else {
            (a4, "224.0.0.1:5350")
        };
        // NAT-PMP announcements (version 0) go with the IPv4 ones.
        let got: Vec<&Seen> = seen
            .iter()
            .filter(|s| s.v6 == v6 && s.bytes.first() != Some(&0))
            .collect();
        assert!(
            got.len() >= 2,
            "{family}: {} ANNOUNCEs to {group} within {WINDOW:?}, expected at least 2\n{context}",
            got.len()
        );
        let mut last_epoch = 0;
        for s in &got {
            assert_eq!(
                s.src, want_src,
                "{family}: sent from the daemon's address on {DEV_A}\n{context}"
            );
            // Section 14.1.3: from the address and port requests are
            // received on, or clients do not accept it (section 8.3).
            assert_eq!(
                s.port, 5351,
                "{family}: sent from the PCP server port\n{context}"
            );
            let epoch = check_announce(s).unwrap_or_else(|e| {
                panic!("{family}: not a valid ANNOUNCE response: {e}\n{s:?}\n{context}")
            });
            assert!(epoch >= last_epoch, "{family}: epoch went back\n{context}");
            last_epoch = epoch;
        }
        let early = got.iter().filter(|s| s.at <= SCHEDULE_CHECK_AT).count();
        assert!(
            early <= MAX_BY_SCHEDULE_CHECK,
            "{family}: {early} ANNOUNCEs by {SCHEDULE_CHECK_AT:?}; the schedule (0, 0.25, 0.75, 1.75 s) allows {MAX_BY_SCHEDULE_CHECK}\n{context}"
        );
        // Intervals double from 250 ms: no two sends closer than half that.
        for pair in got.windows(2) {
            let gap = pair[1].at.saturating_sub(pair[0].at);
            assert!(
                gap >= Duration::from_millis(125),
                "{family}: two ANNOUNCEs {gap:?} apart\n{context}"
            );
        }
        eprintln!(
            "{family}: {} ANNOUNCEs to {group} from {want_src} port(s) {:?} at {:?}",
            got.len(),
            got.iter().map(|s| s.port).collect::<Vec<_>>(),
            got.iter().map(|s| s.at).collect::<Vec<_>>()
        );
    }

    // RFC 6886 section 3.2.1: NAT-PMP clients on the link hear of the
    // start too, from the same address and port, with the external
    // address and the seconds since the start of the epoch.
    let natpmp: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.bytes.first() == Some(&0))
        .collect();
    assert!(
        natpmp.len() >= 2,
        "{} NAT-PMP announcements to 224.0.0.1:5350, expected at least 2\n{context}",
        natpmp.len()
    );
    for s in &natpmp {
        assert!(!s.v6, "a NAT-PMP announcement over IPv6\n{context}");
        assert_eq!((s.src, s.port), (a4, 5351), "{context}");
        match portkeep_proto::natpmp::NatPmpReply::parse(&s.bytes) {
            Some(portkeep_proto::natpmp::NatPmpReply::ExternalAddress {
                result,
                epoch,
                address,
            }) => {
                assert_eq!(result, portkeep_proto::natpmp::NatPmpResult::SUCCESS);
                assert!(epoch <= 2, "epoch {epoch} for a fresh server\n{context}");
                assert_eq!(
                    address,
                    "192.0.2.1".parse::<Ipv4Addr>().unwrap(),
                    "{context}"
                );
                assert_eq!(s.bytes.len(), 12);
            }
            other => panic!("not a NAT-PMP announcement: {other:?}\n{context}"),
        }
    }

    if counting {
        let (on4, on6, off4, off6) = (
            topo.counter("on4"),
            topo.counter("on6"),
            topo.counter("off4"),
            topo.counter("off6"),
        );
        let n4 = seen.iter().filter(|s| !s.v6).count() as u64;
        let n6 = seen.iter().filter(|s| s.v6).count() as u64;
        assert_eq!(
            (off4, off6),
            (0, 0),
            "port-5350 datagrams sent on an interface other than {DEV_A}\n{context}"
        );
        eprintln!(
            "nft in {}: {on4}/{on6} IPv4/IPv6 datagrams to port {CLIENT_PORT} out of {DEV_A}, {off4}/{off6} out of anything else",
            topo.ns_a
        );
        assert!(
            on4 >= n4 && on6 >= n6,
            "nft saw {on4}/{on6} datagrams on {DEV_A}, the listener {n4}/{n6}\n{context}"
        );
    } else {
        eprintln!(
            "NOTE: nft unavailable: the only-on-{DEV_A} check relied on the source addresses"
        );
    }

    let names = topo.lab.names();
    let dir = topo.dir().to_owned();
    drop(topo);
    assert_gone(&names);
    assert!(!dir.exists(), "{} left behind", dir.display());
    eprintln!("announce_multicast: done in {:?}", test_started.elapsed());
}
