//! NAT-PMP (RFC 6886) interop: Debian's `natpmpc` (libnatpmp, the
//! reference client) against a real `portkeepd` serving PCP and NAT-PMP on
//! 127.0.0.1:5351 in a network namespace of its own (NAT-PMP clients talk
//! to port 5351 only). Needs root, `ip` and `natpmpc`: under CI it fails
//! without them.

#![allow(clippy::unwrap_used, clippy::panic, clippy::disallowed_methods)]

use std::fs::File;
use std::process::{Command, Stdio};
use std::sync::LazyLock;
use std::time::Duration;

use portkeep_test_support::netns::{ns_exec, setup, Lab};
use portkeep_test_support::process::{Bins, Portkeepd};

static BINS: LazyLock<Bins> = LazyLock::new(|| Bins::from_daemon(env!("CARGO_BIN_EXE_portkeepd")));

const EXTERNAL: &str = "192.0.2.7";

struct Gateway {
    // Field order: the daemon dies before its namespace goes.
    daemon: Portkeepd,
    ns: String,
    _lab: Lab,
}

impl Gateway {
    /// `portkeepd` on 127.0.0.1:5351 in a namespace of its own, with
    /// `extra` appended to its configuration.
    fn start(what: &str, extra: &str) -> Option<Gateway> {
        let (lab, ns) = setup(what, &["ip", "natpmpc"], || {
            let mut lab = Lab::new("npmp")?;
            let ns = format!("pknpmp-{}", lab.id);
            lab.add_ns(&ns)?;
            Ok((lab, ns))
        })?;
        let data = lab.dir.join("gw");
        std::fs::create_dir_all(&data).unwrap();
        let cfg = lab.dir.join("gw.toml");
        std::fs::write(
            &cfg,
            format!(
                "data_dir = \"{}\"\nlisten = [\"127.0.0.1:5351\"]\nexternal_addresses = [\"{EXTERNAL}\"]\nport_range = \"40000-40999\"\nworkers = 1\n[store]\nmode = \"memory\"\n{extra}",
                data.display()
            ),
        )
        .unwrap();
        let log = lab.dir.join("gw.log");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns])
            .arg(BINS.daemon())
            .args(["--config", cfg.to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap());
        let mut daemon = Portkeepd::spawn("gateway", BINS.daemon(), &mut cmd, data, log);
        daemon.wait(Duration::from_secs(10), "control socket", |s| {
            s["ok"] == true
        });
        Some(Gateway {
            daemon,
            ns,
            _lab: lab,
        })
    }

    /// `natpmpc -g 127.0.0.1 ARGS` in the namespace: (success, output).
    fn natpmpc(&self, args: &[&str]) -> (bool, String) {
        let mut full = vec!["natpmpc", "-g", "127.0.0.1"];
        full.extend_from_slice(args);
        match ns_exec(&self.ns, &full) {
            Ok(out) => (true, out),
            Err(e) => (false, e),
        }
    }

    fn mappings(&self) -> Vec<serde_json::Value> {
        self.daemon.ctl(&["mappings"])["mappings"]
            .as_array()
            .unwrap()
            .clone()
    }
}

/// RFC 6886 sections 3.2 to 3.4 with the reference client: the public
/// address, a TCP and a UDP mapping with the ports asked for (then in the
/// gateway's table, owned by NAT-PMP), the deletion of one, then of all.
#[test]
fn rfc6886_natpmpc_maps_and_deletes_through_portkeepd() {
    let Some(gw) = Gateway::start("NAT-PMP interop with natpmpc", "") else {
        return;
    };
    let (ok, out) = gw.natpmpc(&[]);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("Public IP address : {EXTERNAL}")),
        "{out}"
    );
    let (ok, out) = gw.natpmpc(&["-a", "40100", "8080", "tcp", "3600"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("Mapped public port 40100 protocol TCP to local port 8080"),
        "{out}"
    );
    let (ok, out) = gw.natpmpc(&["-a", "40200", "5353", "udp", "600"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("Mapped public port 40200 protocol UDP to local port 5353"),
        "{out}"
    );
    let table = gw.mappings();
    assert_eq!(table.len(), 2, "{table:?}");
    for m in &table {
        assert_eq!(m["internal_ip"], "127.0.0.1");
        assert_eq!(
            m["nonce"],
            hex::encode(portkeep_server::NATPMP_NONCE),
            "{m}"
        );
    }
    assert!(table
        .iter()
        .any(|m| m["internal_port"] == 8080 && m["external"] == format!("{EXTERNAL}:40100")));
    // Delete one (lifetime 0), then all of the host's UDP ones (port 0).
    let (ok, out) = gw.natpmpc(&["-a", "0", "8080", "tcp", "0"]);
    assert!(ok, "{out}");
    assert_eq!(gw.mappings().len(), 1);
    let (ok, out) = gw.natpmpc(&["-a", "0", "0", "udp", "0"]);
    assert!(ok, "{out}");
    assert!(gw.mappings().is_empty(), "{:?}", gw.mappings());
    let counters = gw.daemon.ctl(&["counters"]);
    assert!(counters["natpmp"].as_u64().unwrap() >= 7, "{counters}");
}

/// RFC 6886 section 5's switch: off, a NAT-PMP client is told "unsupported
/// version" (PCP's UNSUPP_VERSION, RFC 6887 appendix A) and nothing is
/// mapped.
#[test]
fn rfc6886_s5_turned_off_natpmpc_hears_unsupported_version() {
    let Some(gw) = Gateway::start("NAT-PMP turned off", "[natpmp]\nenabled = false\n") else {
        return;
    };
    let (ok, out) = gw.natpmpc(&["-a", "40100", "8080", "tcp", "3600"]);
    assert!(!ok, "{out}");
    assert!(out.contains("unsupported nat-pmp version"), "{out}");
    assert!(gw.mappings().is_empty());
}
