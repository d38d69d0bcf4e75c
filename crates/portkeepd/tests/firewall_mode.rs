//! IPv6 firewall mode (`[dataplane] mode = "firewall"`) with real
//! traffic, IPv6 only, in network namespaces.
//!
//! ```text
//!  pkfi-<id> (inside)             pkfr-<id> (router: portkeepd)           pkfo-<id> (outside)
//!  in0 2001:db8:1::2/64 ─veth─ lan0 2001:db8:1::1/64
//!                              wan0 2001:db8:ff::1/64 ─veth─ out0 2001:db8:ff::2/64, ::3/64
//! ```
//!
//! The router forwards without translating; `2001:db8:1::/48` is
//! firewalled. The real `portkeepd` runs in the router namespace, the real
//! `portkeep` CLI asks it for mappings from the inside host, and the test
//! opens TCP and UDP sockets inside the namespaces. Two layouts:
//!
//! - Portkeep's table is the only firewall;
//! - the operator has a forward chain of their own that drops by default,
//!   and adds the one rule docs/config.md gives (accept Portkeep's mark).
//!
//! Needs root, `ip`, `nft`, `conntrack` and `sysctl`: under CI
//! (`CI=true`) it fails without them; elsewhere it prints
//! `SKIPPED: <reason>` and passes. Everything it creates is removed on
//! drop, even when an assertion fails.

#![allow(clippy::unwrap_used, clippy::panic, clippy::expect_used)]

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use portkeep_test_support::netns::{self, assert_gone, in_ns, ip, run, Lab};
use portkeep_test_support::process::{now, Bins};

static BINS: LazyLock<Bins> = LazyLock::new(|| Bins::from_daemon(env!("CARGO_BIN_EXE_portkeepd")));
const INSIDE: &str = "2001:db8:1::2";
const ROUTER_LAN: &str = "2001:db8:1::1";
const ROUTER_WAN: &str = "2001:db8:ff::1";
const OUT_A: &str = "2001:db8:ff::2";
const OUT_B: &str = "2001:db8:ff::3";
/// The mark Portkeep sets on what it accepts (set explicitly here, so the
/// operator's rule below is the documented one with this value).
const MARK: &str = "0x10000000";

/// Everything one test made; removed on drop.
struct Topo {
    inside: String,
    router: String,
    outside: String,
    dir: PathBuf,
    daemon: Option<Child>,
    stop: Arc<AtomicBool>,
    // Last: dropped after the daemon is killed.
    lab: Lab,
}

impl Drop for Topo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(mut c) = self.daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

impl Topo {
    fn build() -> Result<Topo, String> {
        let mut lab = Lab::new("fw")?;
        let id = lab.id.clone();
        let (i, r, o) = (
            format!("pkfi-{id}"),
            format!("pkfr-{id}"),
            format!("pkfo-{id}"),
        );
        for ns in [&i, &r, &o] {
            lab.add_ns(ns)?;
        }
        let t = Topo {
            inside: i.clone(),
            router: r.clone(),
            outside: o.clone(),
            dir: lab.dir.clone(),
            daemon: None,
            stop: Arc::new(AtomicBool::new(false)),
            lab,
        };
        t.lab.veth(&r, "lan0", &i, "in0")?;
        t.lab.veth(&r, "wan0", &o, "out0")?;
        for (ns, addr, dev) in [
            (&i, INSIDE, "in0"),
            (&r, ROUTER_LAN, "lan0"),
            (&r, ROUTER_WAN, "wan0"),
            (&o, OUT_A, "out0"),
            (&o, OUT_B, "out0"),
        ] {
            // No duplicate address detection: the addresses are usable at
            // once instead of after a second or two.
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}/64"),
                "dev",
                dev,
                "nodad",
            ])?;
        }
        for (ns, dev) in [(&i, "in0"), (&r, "lan0"), (&r, "wan0"), (&o, "out0")] {
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        ip(&["-n", &i, "-6", "route", "add", "default", "via", ROUTER_LAN])?;
        ip(&[
            "-n",
            &o,
            "-6",
            "route",
            "add",
            "2001:db8:1::/48",
            "via",
            ROUTER_WAN,
        ])?;
        run(Command::new("ip").args([
            "netns",
            "exec",
            &r,
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.forwarding=1",
        ]))?;
        Ok(t)
    }

    fn start_daemon(&mut self) {
        let conf = self.dir.join("portkeepd.toml");
        fs::write(
            &conf,
            format!(
                "listen = [\"[{ROUTER_LAN}]:5351\"]\n\
                 external_addresses = [\"{ROUTER_WAN}\"]\n\
                 port_range = \"30000-30999\"\n\
                 [lifetime]\nmin = 1\n\
                 [store]\nmode = \"memory\"\n\
                 [dataplane]\nkind = \"nftables\"\n\
                 mode = \"firewall\"\n\
                 firewall_prefixes = [\"2001:db8:1::/48\"]\n\
                 accept_mark = {MARK}\n\
                 external_interfaces = [\"wan0\"]\n\
                 internal_interfaces = [\"lan0\"]\n"
            ),
        )
        .unwrap();
        let log = fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.join("portkeepd.log"))
            .unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.router])
            .arg(BINS.daemon())
            .arg("--config")
            .arg(&conf)
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.daemon = Some(child);
        for _ in 0..100 {
            if self.portkeep(&["announce"])["result"] == "SUCCESS" {
                return;
            }
            if let Some(Ok(Some(st))) = self.daemon.as_mut().map(Child::try_wait) {
                panic!("portkeepd exited ({st}):\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("portkeepd did not answer:\n{}", self.log());
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("portkeepd.log")).unwrap_or_default()
    }

    /// `portkeep ARGS --server ROUTER_LAN --json` in the inside namespace.
    fn portkeep(&self, args: &[&str]) -> serde_json::Value {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.inside])
            .arg(BINS.cli())
            .args(args)
            .args(["--server", ROUTER_LAN, "--json", "--timeout", "2"])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    }

    /// A request that must succeed; returns the external endpoint.
    fn ok(&self, args: &[&str]) -> SocketAddr {
        let v = self.portkeep(args);
        assert_eq!(v["result"], "SUCCESS", "{args:?}: {v}\n{}", self.log());
        SocketAddr::new(
            v["external_ip"].as_str().unwrap().parse().unwrap(),
            v["external_port"].as_u64().unwrap() as u16,
        )
    }

    fn nft_list(&self) -> String {
        run(Command::new("ip").args([
            "netns",
            "exec",
            &self.router,
            "nft",
            "list",
            "table",
            "inet",
            "portkeep",
        ]))
        .unwrap_or_default()
    }

    fn nft(&self, script: &str) {
        run(Command::new("ip").args(["netns", "exec", &self.router, "nft", script])).unwrap();
    }

    /// A TCP echo server on `port` of the inside host.
    fn tcp_echo(&self, port: u16) {
        let l = in_ns(&self.inside, move || {
            TcpListener::bind(sa(INSIDE, port)).unwrap()
        });
        l.set_nonblocking(true).unwrap();
        let stop = self.stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((mut s, _)) => {
                        s.set_nonblocking(false).unwrap();
                        std::thread::spawn(move || {
                            let mut buf = [0u8; 512];
                            while let Ok(n) = s.read(&mut buf) {
                                if n == 0 || s.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
    }

    /// A UDP echo server on `port` of the inside host.
    fn udp_echo(&self, port: u16) {
        let s = in_ns(&self.inside, move || {
            UdpSocket::bind(sa(INSIDE, port)).unwrap()
        });
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let stop = self.stop.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !stop.load(Ordering::SeqCst) {
                if let Ok((n, from)) = s.recv_from(&mut buf) {
                    let _ = s.send_to(&buf[..n], from);
                }
            }
        });
    }

    /// A new TCP connection from the outside host at `from` to `to`
    /// (1 s to connect: a dropped SYN is a timeout).
    fn connect(&self, from: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
        let from = sa(from, 0);
        in_ns(&self.outside, move || {
            let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None)?;
            s.bind(&from.into())?;
            s.connect_timeout(&to.into(), Duration::from_secs(1))?;
            let s: TcpStream = s.into();
            s.set_read_timeout(Some(Duration::from_secs(1)))?;
            Ok(s)
        })
    }

    /// Whether a new connection from `from` to the inside `port` echoes.
    fn reachable(&self, from: &str, port: u16) -> bool {
        self.connect(from, sa(INSIDE, port))
            .is_ok_and(|mut s| echoes(&mut s, b"hello"))
    }

    /// A UDP socket on the outside host at `from`.
    fn udp_outside(&self, from: SocketAddr) -> UdpSocket {
        let s = in_ns(&self.outside, move || UdpSocket::bind(from).unwrap());
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        s
    }
}

/// Whether `s` echoes `msg` back.
fn echoes(s: &mut TcpStream, msg: &[u8]) -> bool {
    if s.write_all(msg).is_err() {
        return false;
    }
    let mut buf = vec![0u8; msg.len()];
    s.read_exact(&mut buf).is_ok() && buf == msg
}

/// Whether the inside host echoes a datagram the outside socket `s`
/// sends first to `to`.
fn udp_echoes(s: &UdpSocket, to: SocketAddr, msg: &[u8]) -> bool {
    let mut buf = [0u8; 512];
    for _ in 0..2 {
        let _ = s.send_to(msg, to);
        if let Ok((n, from)) = s.recv_from(&mut buf) {
            if from == to && &buf[..n] == msg {
                return true;
            }
        }
    }
    false
}

fn setup(name: &str) -> Option<Topo> {
    netns::setup(name, &["ip", "nft", "conntrack", "sysctl"], Topo::build)
}

const N1: &str = "000000000000000000000001";
const N2: &str = "000000000000000000000002";
const N3: &str = "000000000000000000000003";
const N4: &str = "000000000000000000000004";

/// The checks both layouts share: no way in without a mapping; a MAP
/// pinhole opens exactly its endpoint (RFC 6887 section 11) and FILTER
/// narrows it (section 13.3); an established flow keeps flowing; a PEER's
/// remote peer gets in first (section 12); delete (section 15) closes
/// the pinhole, flows included.
fn pinholes_open_filter_and_close(t: &Topo) {
    t.tcp_echo(8080);
    t.tcp_echo(9090);
    t.udp_echo(40001);
    // The inside host can reach the outside (the firewall only holds new
    // inbound flows), but nothing gets in uninvited.
    assert!(!t.reachable(OUT_A, 8080), "reached without a pinhole");

    // MAP: the firewalled host gets its own endpoint, and it opens.
    let ext = t.ok(&["map", "tcp", "8080", "--nonce", N1, "--lifetime", "600"]);
    assert_eq!(ext, sa(INSIDE, 8080), "a firewall does not translate");
    assert!(
        t.nft_list().contains(&format!("tcp . {INSIDE} . 8080")),
        "{}",
        t.nft_list()
    );
    let mut established = t.connect(OUT_A, ext).unwrap_or_else(|e| {
        panic!("connect {ext}: {e}\n{}", t.nft_list());
    });
    assert!(echoes(&mut established, b"first"));
    assert!(t.reachable(OUT_B, 8080), "the pinhole admits anyone");
    // Only that endpoint: the other service stays closed.
    assert!(!t.reachable(OUT_A, 9090), "a pinhole opened another port");

    // FILTER: only the permitted remote prefix gets in.
    let filtered = t.ok(&[
        "map",
        "tcp",
        "9090",
        "--nonce",
        N2,
        "--lifetime",
        "600",
        "--filter",
        &format!("{OUT_A}/128"),
    ]);
    assert_eq!(filtered, sa(INSIDE, 9090));
    assert!(
        t.reachable(OUT_A, 9090),
        "FILTER shut out the permitted peer"
    );
    assert!(!t.reachable(OUT_B, 9090), "FILTER let {OUT_B} in");

    // PEER: the remote peer's first datagram gets in (and its answer
    // back), from that peer endpoint only.
    let peer = t.ok(&[
        "peer",
        "udp",
        "40001",
        &format!("[{OUT_A}]:7000"),
        "--nonce",
        N3,
        "--lifetime",
        "600",
    ]);
    assert_eq!(peer, sa(INSIDE, 40001));
    let remote = t.udp_outside(sa(OUT_A, 7000));
    assert!(
        udp_echoes(&remote, peer, b"peer first"),
        "the PEER's remote peer was kept out\n{}",
        t.nft_list()
    );
    let stranger = t.udp_outside(sa(OUT_A, 7001));
    assert!(
        !udp_echoes(&stranger, peer, b"not the peer"),
        "PEER let another port in"
    );

    // The connection made through the pinhole still flows.
    assert!(echoes(&mut established, b"later"), "established flow cut");

    // Delete: the pinhole closes, and so does the flow through it.
    let v = t.portkeep(&["delete", "tcp", "8080", "--nonce", N1]);
    assert_eq!(v["result"], "SUCCESS", "{v}");
    assert!(!t.nft_list().contains(&format!("tcp . {INSIDE} . 8080")));
    assert!(!t.reachable(OUT_A, 8080), "reached after delete");
    assert!(
        !echoes(&mut established, b"after delete"),
        "flow survived delete\n{}\n{}",
        t.log(),
        run(Command::new("ip").args(["netns", "exec", &t.router, "conntrack", "-L", "-f", "ipv6"]))
            .unwrap_or_default()
    );
    // The others are untouched.
    assert!(t.reachable(OUT_A, 9090));
}

/// Expiry (RFC 6887 section 15): a pinhole with a short lifetime closes
/// on its own.
fn pinhole_expires(t: &Topo) {
    t.tcp_echo(9191);
    let ext = t.ok(&["map", "tcp", "9191", "--nonce", N4, "--lifetime", "2"]);
    let mapped = now();
    assert_eq!(ext, sa(INSIDE, 9191));
    assert!(t.reachable(OUT_A, 9191), "the short pinhole did not open");
    std::thread::sleep(Duration::from_millis(3000).saturating_sub(mapped.elapsed()));
    assert!(
        !t.nft_list().contains(&format!("tcp . {INSIDE} . 9191")),
        "{}",
        t.nft_list()
    );
    assert!(!t.reachable(OUT_A, 9191), "reached after expiry");
}

#[test]
fn rfc6887_s11_firewall_mode_pinhole_opens_and_closes() {
    let Some(mut t) = setup("firewall mode, Portkeep's table alone") else {
        return;
    };
    let names = t.lab.names();
    t.start_daemon();
    pinholes_open_filter_and_close(&t);
    pinhole_expires(&t);
    drop(t);
    assert_gone(&names);
}

#[test]
fn rfc6887_s11_firewall_mode_behind_an_operator_drop_policy() {
    let Some(mut t) = setup("firewall mode behind an operator's firewall") else {
        return;
    };
    let names = t.lab.names();
    // The operator's own firewall: forward drops by default, replies and
    // the inside's own flows out pass.
    t.nft(
        "table inet opfw {
            chain forward {
                type filter hook forward priority filter; policy drop;
                ct state established,related accept
                iifname \"lan0\" oifname \"wan0\" accept
            }
        }",
    );
    t.start_daemon();
    t.tcp_echo(7070);
    // Portkeep's accept alone cannot override the operator's drop...
    let ext = t.ok(&["map", "tcp", "7070", "--nonce", N4, "--lifetime", "600"]);
    assert_eq!(ext, sa(INSIDE, 7070));
    assert!(
        !t.reachable(OUT_A, 7070),
        "the operator's drop was overridden"
    );
    // ...the one documented rule lets Portkeep's decisions through.
    t.nft(&format!(
        "add rule inet opfw forward meta mark & {MARK} == {MARK} accept"
    ));
    assert!(
        t.reachable(OUT_A, 7070),
        "the documented rule did not open the pinhole"
    );
    pinholes_open_filter_and_close(&t);
    drop(t);
    assert_gone(&names);
}
