//! The nftables dataplane with real traffic, in network namespaces.
//!
//! ```text
//!  pk8i-<id> (inside)          pk8n-<id> (NAT: portkeepd)              pk8o-<id> (outside)
//!  in0 10.77.0.2/24 ─veth─ lan0 10.77.0.1/24
//!                           wan0 198.51.100.1/24 ─veth─ out0 198.51.100.2/24, 198.51.100.3/24
//! ```
//!
//! The real `portkeepd` runs in the NAT namespace with `kind = "nftables"`
//! and serves PCP on 10.77.0.1; the real `portkeep` CLI asks it for
//! mappings from the inside namespace; TCP and UDP traffic goes between
//! sockets that the test opens inside the namespaces (a thread joins a
//! namespace with `setns`, and a socket stays in the namespace it was
//! made in). The outside host has no route to 10.77.0.0/24, so anything
//! that reaches it from inside was translated.
//!
//! Needs root, `ip`, `nft` and `conntrack`: under CI (`CI=true`) it fails
//! without them; elsewhere it prints `SKIPPED: <reason>`, records the skip
//! (`PORTKEEP_SKIP_LOG`) and passes. Everything it creates is removed on
//! drop, even when an assertion fails.

#![allow(clippy::unwrap_used, clippy::panic, clippy::expect_used)]

use std::fs;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use portkeep_test_support::netns::{self, assert_gone, in_ns, ip, run, Lab};
use portkeep_test_support::process::{now, Bins};

static BINS: LazyLock<Bins> = LazyLock::new(|| Bins::from_daemon(env!("CARGO_BIN_EXE_portkeepd")));
const INSIDE: &str = "10.77.0.2";
const NAT_LAN: &str = "10.77.0.1";
const EXT: &str = "198.51.100.1";
const OUT_A: &str = "198.51.100.2";
const OUT_B: &str = "198.51.100.3";

/// Everything one test made; removed on drop.
struct Topo {
    inside: String,
    nat: String,
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
        self.kill_daemon();
    }
}

impl Topo {
    fn build() -> Result<Topo, String> {
        let mut lab = Lab::new("nft")?;
        let id = lab.id.clone();
        let (i, n, o) = (
            format!("pk8i-{id}"),
            format!("pk8n-{id}"),
            format!("pk8o-{id}"),
        );
        for ns in [&i, &n, &o] {
            lab.add_ns(ns)?;
        }
        let t = Topo {
            inside: i.clone(),
            nat: n.clone(),
            outside: o.clone(),
            dir: lab.dir.clone(),
            daemon: None,
            stop: Arc::new(AtomicBool::new(false)),
            lab,
        };
        t.lab.veth(&n, "lan0", &i, "in0")?;
        t.lab.veth(&n, "wan0", &o, "out0")?;
        ip(&[
            "-n",
            &i,
            "addr",
            "add",
            &format!("{INSIDE}/24"),
            "dev",
            "in0",
        ])?;
        ip(&[
            "-n",
            &n,
            "addr",
            "add",
            &format!("{NAT_LAN}/24"),
            "dev",
            "lan0",
        ])?;
        ip(&["-n", &n, "addr", "add", &format!("{EXT}/24"), "dev", "wan0"])?;
        ip(&[
            "-n",
            &o,
            "addr",
            "add",
            &format!("{OUT_A}/24"),
            "dev",
            "out0",
        ])?;
        ip(&[
            "-n",
            &o,
            "addr",
            "add",
            &format!("{OUT_B}/24"),
            "dev",
            "out0",
        ])?;
        for (ns, dev) in [(&i, "in0"), (&n, "lan0"), (&n, "wan0"), (&o, "out0")] {
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        ip(&["-n", &i, "route", "add", "default", "via", NAT_LAN])?;
        run(Command::new("ip").args([
            "netns",
            "exec",
            &n,
            "sysctl",
            "-qw",
            "net.ipv4.conf.all.forwarding=1",
        ]))?;
        Ok(t)
    }

    fn config(&self, extra: &str) -> PathBuf {
        let path = self.dir.join("portkeepd.toml");
        fs::write(
            &path,
            format!(
                "listen = [\"{NAT_LAN}:5351\"]\n\
                 external_addresses = [\"{EXT}\"]\n\
                 port_range = \"30000-30999\"\n\
                 [lifetime]\nmin = 1\n\
                 [dataplane]\nkind = \"nftables\"\n\
                 external_interfaces = [\"wan0\"]\n\
                 internal_interfaces = [\"lan0\"]\n\
                 {extra}"
            ),
        )
        .unwrap();
        path
    }

    fn start_daemon(&mut self, extra: &str) {
        let conf = self.config(extra);
        let log = fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.join("portkeepd.log"))
            .unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.nat])
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
        // Serving once ANNOUNCE is answered.
        for _ in 0..100 {
            let out = self.portkeep(&["announce"]);
            if out["result"] == "SUCCESS" {
                return;
            }
            if let Some(Ok(Some(st))) = self.daemon.as_mut().map(Child::try_wait) {
                panic!("portkeepd exited ({st}):\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("portkeepd did not answer:\n{}", self.log());
    }

    /// SIGTERM (a clean stop), then wait.
    fn stop_daemon(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            // `ip netns exec` execs the daemon: this is its pid.
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .output();
            let st = c.wait().unwrap();
            assert!(st.success(), "portkeepd exit {st}:\n{}", self.log());
        }
    }

    fn kill_daemon(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("portkeepd.log")).unwrap_or_default()
    }

    /// `portkeep ARGS --server NAT_LAN --json` in the inside namespace.
    fn portkeep(&self, args: &[&str]) -> serde_json::Value {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.inside])
            .arg(BINS.cli())
            .args(args)
            .args(["--server", NAT_LAN, "--json", "--timeout", "2"])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    }

    /// A MAP that must succeed; returns the external endpoint.
    fn map(&self, args: &[&str]) -> SocketAddr {
        let mut a = vec!["map"];
        a.extend_from_slice(args);
        let v = self.portkeep(&a);
        assert_eq!(v["result"], "SUCCESS", "map {args:?}: {v}\n{}", self.log());
        let ext: IpAddr = v["external_ip"].as_str().unwrap().parse().unwrap();
        SocketAddr::new(ext, v["external_port"].as_u64().unwrap() as u16)
    }

    fn nft_list(&self) -> String {
        run(Command::new("ip").args([
            "netns", "exec", &self.nat, "nft", "list", "table", "inet", "portkeep",
        ]))
        .unwrap_or_default()
    }

    fn nft(&self, script: &str) {
        run(Command::new("ip").args(["netns", "exec", &self.nat, "nft", script])).unwrap();
    }

    /// A TCP echo server on `addr` in the inside namespace.
    fn tcp_echo(&self, addr: &str) {
        let addr: SocketAddr = addr.parse().unwrap();
        let l = in_ns(&self.inside, move || TcpListener::bind(addr).unwrap());
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

    /// A UDP echo server on `addr` in the inside namespace.
    fn udp_echo(&self, addr: &str) {
        let addr: SocketAddr = addr.parse().unwrap();
        let s = in_ns(&self.inside, move || UdpSocket::bind(addr).unwrap());
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

    /// A TCP connection from the outside host at `from` to `to`.
    fn tcp_from_outside(&self, from: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
        let from: SocketAddr = format!("{from}:0").parse().unwrap();
        in_ns(&self.outside, move || {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            s.bind(&from.into())?;
            s.connect_timeout(&to.into(), Duration::from_secs(1))?;
            let s: TcpStream = s.into();
            s.set_read_timeout(Some(Duration::from_secs(1)))?;
            Ok(s)
        })
    }

    fn udp_from_outside(&self) -> UdpSocket {
        let s = in_ns(&self.outside, || {
            UdpSocket::bind(format!("{OUT_A}:0").as_str()).unwrap()
        });
        s.set_read_timeout(Some(Duration::from_millis(700)))
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

fn udp_echoes(s: &UdpSocket, to: SocketAddr, msg: &[u8]) -> bool {
    let mut buf = [0u8; 512];
    // A couple of tries: the first datagram of a flow may race ARP.
    for _ in 0..3 {
        let _ = s.send_to(msg, to);
        if let Ok((n, from)) = s.recv_from(&mut buf) {
            if from == to && &buf[..n] == msg {
                return true;
            }
        }
    }
    false
}

/// The topology, or `None` (after saying why, and failing under CI) if
/// this machine cannot build it.
fn setup(name: &str) -> Option<Topo> {
    netns::setup(name, &["ip", "nft", "conntrack", "sysctl"], Topo::build)
}

#[test]
fn map_peer_filter_delete_and_expiry_with_real_traffic() {
    let Some(mut t) = setup("nft map/peer/filter") else {
        return;
    };
    let names = t.lab.names();
    t.start_daemon("[store]\nmode = \"memory\"\n");
    t.tcp_echo(&format!("{INSIDE}:8080"));
    t.udp_echo(&format!("{INSIDE}:5353"));
    t.tcp_echo(&format!("{INSIDE}:9090"));

    // MAP (RFC 6887 section 11): the inside TCP and UDP services are
    // reachable from outside at the assigned external address and port.
    let tcp_ext = t.map(&[
        "tcp",
        "8080",
        "--nonce",
        "000000000000000000000001",
        "--lifetime",
        "600",
    ]);
    let udp_ext = t.map(&[
        "udp",
        "5353",
        "--nonce",
        "000000000000000000000002",
        "--lifetime",
        "4",
    ]);
    let mapped_at = now();
    assert_eq!(tcp_ext.ip().to_string(), EXT);
    let rules = t.nft_list();
    assert!(
        rules.contains(&format!(
            "tcp . {EXT} . {} : {INSIDE} . 8080",
            tcp_ext.port()
        )),
        "{rules}"
    );
    let mut established = t
        .tcp_from_outside(OUT_A, tcp_ext)
        .unwrap_or_else(|e| panic!("connect {tcp_ext}: {e}\n{}", t.nft_list()));
    assert!(
        echoes(&mut established, b"hello"),
        "no TCP echo via {tcp_ext}"
    );
    let udp = t.udp_from_outside();
    assert!(
        udp_echoes(&udp, udp_ext, b"ping"),
        "no UDP echo via {udp_ext}"
    );

    // PEER (RFC 6887 section 12): the inside client's flow leaves with
    // the external port the server reported.
    let peer_listener = in_ns(&t.outside, || {
        TcpListener::bind(format!("{OUT_A}:7000")).unwrap()
    });
    let v = t.portkeep(&[
        "peer",
        "tcp",
        "40001",
        &format!("{OUT_A}:7000"),
        "--nonce",
        "000000000000000000000003",
        "--lifetime",
        "600",
    ]);
    assert_eq!(v["result"], "SUCCESS", "{v}");
    let peer_ext = SocketAddr::new(
        v["external_ip"].as_str().unwrap().parse().unwrap(),
        v["external_port"].as_u64().unwrap() as u16,
    );
    assert_ne!(
        peer_ext.port(),
        40001,
        "port range 30000-30999 must translate"
    );
    let remote: SocketAddr = format!("{OUT_A}:7000").parse().unwrap();
    let _client = in_ns(&t.inside, move || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_reuse_address(true).unwrap();
        let local: SocketAddr = format!("{INSIDE}:40001").parse().unwrap();
        s.bind(&local.into()).unwrap();
        s.connect_timeout(&remote.into(), Duration::from_secs(2))
            .unwrap();
        TcpStream::from(s)
    });
    let (_accepted, seen) = peer_listener.accept().unwrap();
    assert_eq!(seen, peer_ext, "the outside host saw the flow from {seen}");

    // FILTER (RFC 6887 section 13.3): only the permitted prefix gets in.
    let filtered = t.map(&[
        "tcp",
        "9090",
        "--nonce",
        "000000000000000000000004",
        "--lifetime",
        "600",
        "--filter",
        &format!("{OUT_A}/32"),
    ]);
    let mut ok = t.tcp_from_outside(OUT_A, filtered).unwrap();
    assert!(echoes(&mut ok, b"allowed"));
    let denied = t.tcp_from_outside(OUT_B, filtered);
    assert!(
        denied.is_err(),
        "{OUT_B} reached the filtered mapping {filtered}"
    );

    // Delete (RFC 6887 section 15): new connections fail, and so does
    // the established one (its conntrack entry is gone with the rule).
    let v = t.portkeep(&[
        "delete",
        "tcp",
        "8080",
        "--nonce",
        "000000000000000000000001",
    ]);
    assert_eq!(v["result"], "SUCCESS", "{v}");
    assert!(!t.nft_list().contains(&format!("{INSIDE} . 8080")));
    assert!(
        !echoes(&mut established, b"still there?"),
        "established flow survived delete"
    );
    assert!(
        t.tcp_from_outside(OUT_A, tcp_ext).is_err(),
        "new flow after delete"
    );

    // Expiry: the UDP mapping had 4 s; its flow, used a moment ago, stops
    // forwarding too.
    assert!(udp_echoes(&udp, udp_ext, b"before expiry"));
    let left = Duration::from_millis(5500).saturating_sub(mapped_at.elapsed());
    std::thread::sleep(left);
    assert!(
        !t.nft_list().contains(&format!("{INSIDE} . 5353")),
        "{}",
        t.nft_list()
    );
    assert!(
        !udp_echoes(&udp, udp_ext, b"after expiry"),
        "UDP flow survived expiry"
    );

    // The filtered mapping is untouched by the others' removal.
    let mut again = t.tcp_from_outside(OUT_A, filtered).unwrap();
    assert!(echoes(&mut again, b"still allowed"));

    drop(t);
    assert_gone(&names);
}

#[test]
fn restart_with_a_store_installs_every_rule_exactly_once() {
    let Some(mut t) = setup("nft restart") else {
        return;
    };
    let names = t.lab.names();
    t.start_daemon("");
    t.tcp_echo(&format!("{INSIDE}:8080"));
    let ext = t.map(&[
        "tcp",
        "8080",
        "--nonce",
        "000000000000000000000005",
        "--lifetime",
        "600",
    ]);
    let udp_ext = t.map(&[
        "udp",
        "5353",
        "--nonce",
        "000000000000000000000006",
        "--lifetime",
        "600",
    ]);
    // One that expires while the daemon is down: the store still holds it,
    // the restart must not install it.
    t.map(&[
        "tcp",
        "9191",
        "--nonce",
        "000000000000000000000007",
        "--lifetime",
        "2",
    ]);
    assert!(t.nft_list().contains(&format!(": {INSIDE} . 9191")));
    t.stop_daemon();
    std::thread::sleep(Duration::from_millis(2500));
    // `on_stop = "keep"` (the default): the rules outlive the daemon.
    assert!(t.nft_list().contains(&format!(": {INSIDE} . 8080")));
    // Leftovers a previous run could have left: a stale element and a
    // stray rule. The next start must remove both.
    t.nft(&format!(
        "add element inet portkeep dnat4 {{ 6 . {EXT} . 30999 : 10.77.0.9 . 1 }}"
    ));
    t.nft("add rule inet portkeep prerouting counter");

    t.start_daemon("");
    let rules = t.nft_list();
    let once = |needle: &str| {
        assert_eq!(
            rules.matches(needle).count(),
            1,
            "`{needle}` not exactly once in\n{rules}"
        );
    };
    once(&format!("tcp . {EXT} . {} : {INSIDE} . 8080", ext.port()));
    once(&format!(
        "udp . {EXT} . {} : {INSIDE} . 5353",
        udp_ext.port()
    ));
    once(&format!("tcp . {INSIDE} . 8080 : {EXT} . {}", ext.port()));
    once("map @dnat4\n");
    once("table inet portkeep");
    assert!(
        !rules.contains("10.77.0.9"),
        "stale element survived:\n{rules}"
    );
    assert!(
        !rules.contains(&format!("{INSIDE} . 9191")),
        "a mapping that expired while down was installed:\n{rules}"
    );
    assert!(!rules.contains("counter"), "stray rule survived:\n{rules}");
    let mut s = t.tcp_from_outside(OUT_A, ext).unwrap();
    assert!(echoes(&mut s, b"after restart"));

    // `on_stop = "flush"`: a clean stop removes the table.
    t.stop_daemon();
    t.start_daemon("on_stop = \"flush\"\n");
    assert!(t.nft_list().contains(&format!(": {INSIDE} . 8080")));
    t.stop_daemon();
    assert_eq!(t.nft_list(), "", "table left after on_stop = flush");

    drop(t);
    assert_gone(&names);
}
