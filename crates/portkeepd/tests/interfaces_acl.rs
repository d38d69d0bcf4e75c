//! `[limits] interfaces` end to end (RFC 6887 section 8.2: a PCP server
//! never answers the external side), in network namespaces:
//!
//! ```text
//!  pkii-<id> (inside)            pkir-<id> (router: portkeepd on 0.0.0.0)    pkio-<id> (outside)
//!  in0 10.66.1.2/24 ─veth─ lan0 10.66.1.1/24
//!                          wan0 198.51.100.1/24 ─veth─ out0 198.51.100.2/24
//! ```
//!
//! The daemon listens on the wildcard address, so without the list it
//! would answer anyone who reaches it. With `interfaces = ["lan0"]`, PCP
//! and NAT-PMP from the inside are answered; from the outside, to the
//! router's external address or to its internal one, nothing is.
//!
//! Needs root and `ip`: under CI (`CI=true`) it fails without them;
//! elsewhere it is skipped, saying so. Everything it creates is removed
//! on drop.

#![allow(clippy::unwrap_used, clippy::panic, clippy::expect_used)]

use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::LazyLock;
use std::time::Duration;

use portkeep_test_support::netns::{in_ns, ip, setup, Lab};
use portkeep_test_support::process::Bins;

static BINS: LazyLock<Bins> = LazyLock::new(|| Bins::from_daemon(env!("CARGO_BIN_EXE_portkeepd")));

const INSIDE: &str = "10.66.1.2";
const ROUTER_LAN: &str = "10.66.1.1";
const ROUTER_WAN: &str = "198.51.100.1";
const OUTSIDE: &str = "198.51.100.2";

struct Topo {
    inside: String,
    router: String,
    outside: String,
    daemon: Option<Child>,
    // Last: dropped after the daemon is killed.
    lab: Lab,
}

impl Drop for Topo {
    fn drop(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Topo {
    fn build() -> Result<Topo, String> {
        let mut lab = Lab::new("ia")?;
        let id = lab.id.clone();
        let (i, r, o) = (
            format!("pkii-{id}"),
            format!("pkir-{id}"),
            format!("pkio-{id}"),
        );
        for ns in [&i, &r, &o] {
            lab.add_ns(ns)?;
        }
        lab.veth(&r, "lan0", &i, "in0")?;
        lab.veth(&r, "wan0", &o, "out0")?;
        for (ns, addr, dev) in [
            (&i, INSIDE, "in0"),
            (&r, ROUTER_LAN, "lan0"),
            (&r, ROUTER_WAN, "wan0"),
            (&o, OUTSIDE, "out0"),
        ] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        ip(&["-n", &r, "link", "set", "lo", "up"])?;
        // The outside can reach the router's internal address too: a
        // source address is no proof of where a datagram came from.
        ip(&["-n", &o, "route", "add", "10.66.1.0/24", "via", ROUTER_WAN])?;
        Ok(Topo {
            inside: i,
            router: r,
            outside: o,
            daemon: None,
            lab,
        })
    }

    fn start(&mut self) {
        let conf = self.lab.dir.join("portkeepd.toml");
        std::fs::write(
            &conf,
            format!(
                "listen = [\"0.0.0.0:5351\"]\n\
                 external_addresses = [\"{ROUTER_WAN}\"]\n\
                 [store]\nmode = \"memory\"\n\
                 [limits]\ninterfaces = [\"lan0\"]\n"
            ),
        )
        .unwrap();
        let log = std::fs::File::create(self.lab.dir.join("portkeepd.log")).unwrap();
        self.daemon = Some(
            Command::new("ip")
                .args(["netns", "exec", &self.router])
                .arg(BINS.daemon())
                .arg("--config")
                .arg(&conf)
                .arg("--data-dir")
                .arg(self.lab.dir.join("data"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.lab.dir.join("portkeepd.log")).unwrap_or_default()
    }

    /// Whether `datagram`, sent from namespace `ns` to `to`, is answered
    /// within `wait`.
    fn answered(&self, ns: &str, to: &str, datagram: &[u8], wait: Duration) -> bool {
        let to = SocketAddr::new(to.parse().unwrap(), 5351);
        let datagram = datagram.to_vec();
        in_ns(ns, move || {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let deadline = portkeep_test_support::process::now() + wait;
            let mut buf = [0u8; 1100];
            while portkeep_test_support::process::now() < deadline {
                s.send_to(&datagram, to).unwrap();
                if s.recv_from(&mut buf).is_ok() {
                    return true;
                }
            }
            false
        })
    }
}

/// A PCP ANNOUNCE request (RFC 6887 section 14.1) from `client`.
fn announce(client: &str) -> Vec<u8> {
    portkeep_client::RequestBuilder::announce()
        .build(client.parse().unwrap())
        .unwrap()
        .to_bytes(&portkeep_proto::CodePoints::default())
        .unwrap()
}

/// A NAT-PMP external address request (RFC 6886 section 3.2).
const NATPMP_ADDRESS: [u8; 2] = [0, 0];

#[test]
fn rfc6887_s8_2_no_answer_from_outside_the_configured_interfaces() {
    let Some(mut t) = setup("interfaces ACL", &["ip"], Topo::build) else {
        return;
    };
    t.start();
    // The inside is answered, PCP and NAT-PMP (waiting for the start).
    assert!(
        t.answered(
            &t.inside,
            ROUTER_LAN,
            &announce(INSIDE),
            Duration::from_secs(10)
        ),
        "the inside is not answered:\n{}",
        t.log()
    );
    assert!(t.answered(
        &t.inside,
        ROUTER_LAN,
        &NATPMP_ADDRESS,
        Duration::from_secs(2)
    ));
    // The outside is not, at either of the router's addresses, whatever
    // it asks.
    for to in [ROUTER_WAN, ROUTER_LAN] {
        for datagram in [announce(OUTSIDE), NATPMP_ADDRESS.to_vec(), vec![2, 0]] {
            assert!(
                !t.answered(&t.outside, to, &datagram, Duration::from_millis(600)),
                "answered the outside at {to}: {datagram:02x?}"
            );
        }
    }
    let out = Command::new("ip")
        .args(["netns", "exec", &t.router])
        .arg(BINS.daemon())
        .args(["ctl", "--data-dir"])
        .arg(t.lab.dir.join("data"))
        .args(["--json", "counters"])
        .output()
        .unwrap();
    let c: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        c["wrong_interface"].as_u64().unwrap() >= 6,
        "every outside datagram counted: {c}"
    );
}
