//! Interop: the `portkeep` binary against miniupnpd, a real PCP server,
//! across two network namespaces.
//!
//! ```text
//!  pkc-<pid> (client)            pkn-<pid> (NAT, runs miniupnpd)
//!  pk-cli 10.231.0.2/24 ─veth─ pk-lan 10.231.0.1/24
//!                                pk-ext 198.51.101.1/24 ─veth─ pk-ext-peer
//! ```
//!
//! Needs root (namespaces, nftables), `ip`, `nft` and Debian's
//! `miniupnpd-nftables`: under CI (`CI=true`) it fails without them;
//! elsewhere it prints `SKIPPED: <reason>`, records the skip
//! (`PORTKEEP_SKIP_LOG`) and passes. No packet leaves the
//! two namespaces: neither has a route anywhere else, and the external
//! interface's peer is in the NAT namespace too.

// Test helpers outside #[test] fns: a failed setup should abort loudly.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use portkeep_test_support::netns::{ip, run, setup, Lab};
use portkeep_test_support::skip::skip;

const BIN: &str = env!("CARGO_BIN_EXE_portkeep");
const MINIUPNPD: &str = "/usr/sbin/miniupnpd";
const NAT_IP: &str = "10.231.0.1";
const CLIENT_IP: &str = "10.231.0.2";
/// miniupnpd 2.3.1 refuses every special-purpose IPv4 block as its
/// external address, TEST-NET-2 included (getifaddr.c `addr_is_reserved`:
/// "Reserved / private IP address ... Port forwarding is impossible", and
/// every MAP then fails with NO_RESOURCES). So the external interface gets
/// an ordinary-looking address next to TEST-NET-2. It exists only on a veth
/// pair inside the NAT namespace and nothing ever sends to it.
const EXT_IP: &str = "198.51.101.1";
const NONCE: &str = "5eed00112233445566778899";
const WRONG_NONCE: &str = "ffffffffffffffffffffffff";

/// Everything the test created, torn down on drop even when an assertion
/// fails half-way.
struct Topology {
    client_ns: String,
    nat_ns: String,
    dir: PathBuf,
    miniupnpd: Option<Child>,
    // Last: the namespaces (their veths and nft tables with them) and the
    // directory go once miniupnpd is reaped.
    lab: Lab,
}

impl Drop for Topology {
    fn drop(&mut self) {
        if let Some(mut child) = self.miniupnpd.take() {
            // `ip netns exec` execs miniupnpd, so this is miniupnpd's pid.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Topology {
    fn build() -> Result<Topology, String> {
        let mut lab = Lab::new("interop")?;
        let (c, n) = (format!("pkc-{}", lab.id), format!("pkn-{}", lab.id));
        lab.add_ns(&c)?;
        lab.add_ns(&n)?;
        let topo = Topology {
            client_ns: c.clone(),
            nat_ns: n.clone(),
            dir: lab.dir.clone(),
            miniupnpd: None,
            lab,
        };
        // Both veth pairs are created inside the NAT namespace, so the
        // host's own namespace never sees them.
        topo.lab.veth(&n, "pk-lan", &c, "pk-cli")?;
        topo.lab.veth(&n, "pk-ext", &n, "pk-ext-peer")?;
        ip(&[
            "-n",
            &c,
            "addr",
            "add",
            &format!("{CLIENT_IP}/24"),
            "dev",
            "pk-cli",
        ])?;
        ip(&[
            "-n",
            &n,
            "addr",
            "add",
            &format!("{NAT_IP}/24"),
            "dev",
            "pk-lan",
        ])?;
        ip(&[
            "-n",
            &n,
            "addr",
            "add",
            &format!("{EXT_IP}/24"),
            "dev",
            "pk-ext",
        ])?;
        for (ns, dev) in [
            (&c, "pk-cli"),
            (&n, "pk-lan"),
            (&n, "pk-ext"),
            (&n, "pk-ext-peer"),
        ] {
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        // The chains miniupnpd's nftables backend writes into (its defaults:
        // table inet "filter", chains "miniupnpd", "prerouting_miniupnpd",
        // "postrouting_miniupnpd"), as Debian's nft_init.sh would create them.
        let ruleset = topo.dir.join("miniupnpd.nft");
        fs::write(
            &ruleset,
            "table inet filter {\n\
             chain forward { type filter hook forward priority 0; policy drop; jump miniupnpd; }\n\
             chain miniupnpd { }\n\
             chain prerouting { type nat hook prerouting priority -100; policy accept; jump prerouting_miniupnpd; }\n\
             chain postrouting { type nat hook postrouting priority 100; policy accept; jump postrouting_miniupnpd; }\n\
             chain prerouting_miniupnpd { }\n\
             chain postrouting_miniupnpd { }\n\
             }\n",
        )
        .map_err(|e| e.to_string())?;
        run(Command::new("ip")
            .args(["netns", "exec", &n, "nft", "-f"])
            .arg(&ruleset))?;
        Ok(topo)
    }

    fn start_miniupnpd(&mut self) -> Result<(), String> {
        let conf = self.dir.join("miniupnpd.conf");
        fs::write(
            &conf,
            format!(
                "ext_ifname=pk-ext\n\
                 listening_ip=pk-lan\n\
                 # PCP and NAT-PMP; this version calls the switch enable_natpmp.\n\
                 enable_natpmp=yes\n\
                 enable_upnp=no\n\
                 secure_mode=no\n\
                 system_uptime=no\n\
                 min_lifetime=120\n\
                 max_lifetime=86400\n\
                 uuid=8f1a6c55-4e0b-4d4e-9b1e-5e4b6f0c0a01\n\
                 allow 1024-65535 {CLIENT_IP}/24 1024-65535\n\
                 deny 0-65535 0.0.0.0/0 0-65535\n"
            ),
        )
        .map_err(|e| e.to_string())?;
        let log_path = self.dir.join("miniupnpd.log");
        let log = fs::File::create(&log_path).map_err(|e| e.to_string())?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.nat_ns, MINIUPNPD, "-d", "-f"])
            .arg(&conf)
            .arg("-P")
            .arg(self.dir.join("miniupnpd.pid"))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| format!("spawn miniupnpd: {e}"))?;
        self.miniupnpd = Some(child);
        // Up to 5 s, in 50 ms steps.
        for _ in 0..100 {
            let text = fs::read_to_string(&log_path).unwrap_or_default();
            if text.contains("Listening for NAT-PMP/PCP traffic") {
                return Ok(());
            }
            if let Some(Ok(Some(status))) = self.miniupnpd.as_mut().map(Child::try_wait) {
                return Err(format!("miniupnpd exited ({status}):\n{text}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!(
            "miniupnpd did not start listening:\n{}",
            self.log()
        ))
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("miniupnpd.log")).unwrap_or_default()
    }

    /// Runs `portkeep ARGS --server NAT_IP --json` in the client namespace.
    fn portkeep(&self, args: &[&str]) -> (Option<i32>, serde_json::Value, String) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.client_ns, BIN])
            .args(args)
            .args(["--server", NAT_IP, "--json", "--timeout", "5"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "portkeep {args:?}: stdout not JSON ({e}): {}\nstderr: {stderr}\nminiupnpd:\n{}",
                String::from_utf8_lossy(&out.stdout),
                self.log()
            )
        });
        (out.status.code(), v, stderr)
    }

    fn nat_rules(&self) -> String {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.nat_ns,
                "nft",
                "list",
                "table",
                "inet",
                "filter",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

#[test]
fn interop_miniupnpd_map_renew_delete() {
    if !Path::new(MINIUPNPD).is_file() {
        skip(
            "interop_miniupnpd",
            &format!("{MINIUPNPD} not installed (apt-get install miniupnpd-nftables)"),
        );
        return;
    }
    let Some(mut topo) = setup("interop_miniupnpd", &["ip", "nft"], Topology::build) else {
        return;
    };
    topo.start_miniupnpd().unwrap();

    // Create. RFC 6887 section 11.4: SUCCESS with the assigned external
    // address and port.
    let (code, v, err) = topo.portkeep(&[
        "map",
        "tcp",
        "8080",
        "--nonce",
        NONCE,
        "--lifetime",
        "600",
        "--checkpoint",
        // miniupnpd 2.3.1 mis-parses option padding (a 5-octet DESCRIPTION
        // comes back MALFORMED_OPTION, "parsePCPOptions: remain=3"), so the
        // description is a multiple of 4 octets long.
        "--description",
        "portkeep",
    ]);
    assert_eq!(code, Some(0), "{v}\n{err}\n{}", topo.log());
    assert_eq!(v["result"], "SUCCESS");
    assert_eq!(v["opcode"], "MAP");
    assert_eq!(v["nonce"], NONCE);
    assert_eq!(v["external_ip"], EXT_IP);
    let port = v["external_port"].as_u64().unwrap();
    assert_ne!(port, 0);
    assert_eq!(v["lifetime"], 600);
    // miniupnpd does not implement RFC 7767, yet it builds its response in
    // the request's buffer and so returns every option it did not strip,
    // CHECKPOINT_REQUIRED included. RFC 6887 section 7.3 says an unknown
    // optional option is ignored and left out; a client therefore reads
    // this as "honoured". Recorded here so a change in either is noticed.
    assert_eq!(v["checkpoint_requested"], true);
    assert_eq!(v["checkpoint_honoured"], true);
    let rules = topo.nat_rules();
    assert!(
        rules.contains(&format!("dport {port}")) && rules.contains(CLIENT_IP),
        "no DNAT rule for the mapping:\n{rules}"
    );

    // Renew with the same nonce (RFC 6887 section 11.3): same external port.
    let (code, v, err) =
        topo.portkeep(&["map", "tcp", "8080", "--nonce", NONCE, "--lifetime", "1200"]);
    assert_eq!(code, Some(0), "{v}\n{err}");
    assert_eq!(v["external_port"].as_u64(), Some(port));
    assert_eq!(v["lifetime"], 1200);
    assert_eq!(v["checkpoint_honoured"], false);

    // A delete with another nonce: miniupnpd enforces nonces and answers
    // NOT_AUTHORIZED (RFC 6887 section 11.3), with error lifetime 0.
    let (code, v, err) = topo.portkeep(&["delete", "tcp", "8080", "--nonce", WRONG_NONCE]);
    assert_eq!(code, Some(2), "{v}\n{err}");
    assert_eq!(v["result"], "NOT_AUTHORIZED");
    assert!(
        err.contains("error: NOT_AUTHORIZED (result code 2)"),
        "{err}"
    );
    assert!(
        topo.nat_rules().contains(&format!("dport {port}")),
        "mapping must survive"
    );

    // The real delete (RFC 6887 section 15): SUCCESS, lifetime 0.
    let (code, v, err) = topo.portkeep(&["delete", "tcp", "8080", "--nonce", NONCE]);
    assert_eq!(code, Some(0), "{v}\n{err}");
    assert_eq!(v["result"], "SUCCESS");
    assert_eq!(v["lifetime"], 0);
    let rules = topo.nat_rules();
    assert!(
        !rules.contains(&format!("dport {port}")),
        "rule left behind:\n{rules}"
    );

    // ANNOUNCE (RFC 6887 section 14.1) answers with the epoch.
    let (code, v, err) = topo.portkeep(&["announce"]);
    assert_eq!(code, Some(0), "{v}\n{err}");
    assert_eq!(v["opcode"], "ANNOUNCE");
    assert!(v["epoch"].is_u64());
}

/// RFC 6886 from our NAT-PMP client against miniupnpd's (sections 3.2 to
/// 3.4): the external address, a TCP mapping that miniupnpd installs as a
/// DNAT rule, a renewal that keeps its port, and the deletion that removes
/// the rule.
#[test]
fn rfc6886_interop_miniupnpd_natpmp_address_map_delete() {
    if !Path::new(MINIUPNPD).is_file() {
        skip(
            "rfc6886_interop_miniupnpd",
            &format!("{MINIUPNPD} not installed (apt-get install miniupnpd-nftables)"),
        );
        return;
    }
    let Some(mut topo) = setup("rfc6886_interop_miniupnpd", &["ip", "nft"], Topology::build) else {
        return;
    };
    topo.start_miniupnpd().unwrap();

    // Section 3.2: the external address, and the epoch.
    let (code, v, err) = topo.portkeep(&["--natpmp", "announce"]);
    assert_eq!(code, Some(0), "{v}\n{err}\n{}", topo.log());
    assert_eq!(v["protocol"], "nat-pmp");
    assert_eq!(v["result"], 0);
    assert_eq!(v["external_address"], EXT_IP);
    assert!(v["epoch"].is_u64());

    // Section 3.3: a TCP mapping; miniupnpd grants what was asked within
    // its bounds and installs the DNAT rule.
    let (code, v, err) = topo.portkeep(&["--natpmp", "map", "tcp", "8080", "--lifetime", "600"]);
    assert_eq!(code, Some(0), "{v}\n{err}\n{}", topo.log());
    assert_eq!(v["protocol"], "nat-pmp");
    assert_eq!(v["proto"], "tcp");
    assert_eq!(v["internal_port"], 8080);
    assert_eq!(v["lifetime"], 600);
    let external = v["external"].as_str().unwrap().to_owned();
    let (ext_ip, port) = external.rsplit_once(':').unwrap();
    assert_eq!(ext_ip, EXT_IP);
    let rules = topo.nat_rules();
    assert!(
        rules.contains(&format!("dport {port}")) && rules.contains(CLIENT_IP),
        "no DNAT rule for the mapping:\n{rules}"
    );

    // A renewal (the same request again) keeps the external port.
    let (code, v, err) = topo.portkeep(&["--natpmp", "map", "tcp", "8080", "--lifetime", "1200"]);
    assert_eq!(code, Some(0), "{v}\n{err}");
    assert_eq!(v["external"], external);
    assert_eq!(v["lifetime"], 1200);

    // Section 3.4: lifetime 0 deletes it, and the rule goes.
    let (code, v, err) = topo.portkeep(&["--natpmp", "delete", "tcp", "8080"]);
    assert_eq!(code, Some(0), "{v}\n{err}");
    assert_eq!(v["lifetime"], 0);
    assert!(v["external"].is_null());
    let rules = topo.nat_rules();
    assert!(
        !rules.contains(&format!("dport {port}")),
        "rule left behind:\n{rules}"
    );
}
