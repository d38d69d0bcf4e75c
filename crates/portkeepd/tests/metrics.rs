//! The Prometheus endpoint (`docs/metrics.md`) against the real daemon:
//! what a scrape exposes is exactly the documented list, the counters
//! follow the traffic, and a scrape taken under load passes `promtool
//! check metrics` (Debian `prometheus`; under CI a missing `promtool`
//! fails the test).

#![allow(clippy::unwrap_used, clippy::panic, clippy::disallowed_methods)]

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::LazyLock;

use portkeep_client::RequestBuilder;
use portkeep_proto::{Protocol, ResultCode};
use portkeep_test_support::daemon::{examples_dir, Daemon, DaemonSpec};
use portkeep_test_support::pcp::{free_port, request, v4};
use portkeep_test_support::process::Bins;
use portkeep_test_support::skip::{find_tool, skip};

static BINS: LazyLock<Bins> = LazyLock::new(|| Bins::from_daemon(env!("CARGO_BIN_EXE_portkeepd")));

/// A scrape in the Prometheus text format, or in OpenMetrics as a
/// scraper asking for it with `Accept` gets.
fn scrape_as(addr: SocketAddr, openmetrics: bool) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    let accept = if openmetrics {
        "Accept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\n"
    } else {
        ""
    };
    write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\n{accept}\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let kind = if openmetrics {
        "application/openmetrics-text"
    } else {
        "text/plain; version=0.0.4"
    };
    assert!(head.contains(kind), "{head}");
    body.to_owned()
}

fn scrape(addr: SocketAddr) -> String {
    scrape_as(addr, false)
}

/// The metric names of a scrape (`# TYPE` lines; counters carry `_total`
/// on their samples, as the table writes them).
fn exposed(body: &str) -> BTreeSet<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| {
            let mut p = l.split_whitespace();
            let (name, kind) = (p.next().unwrap(), p.next().unwrap());
            if kind == "counter" && !name.ends_with("_total") {
                format!("{name}_total")
            } else {
                name.to_owned()
            }
        })
        .collect()
}

fn documented() -> BTreeSet<String> {
    let doc = std::fs::read_to_string(examples_dir().join("../docs/metrics.md")).unwrap();
    doc.lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .filter(|n| n.starts_with("portkeep_"))
        .map(str::to_owned)
        .collect()
}

fn sample(body: &str, prefix: &str) -> f64 {
    body.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .map_or(0.0, |v| v.parse().unwrap())
}

#[test]
fn the_metrics_endpoint_exposes_exactly_the_documented_metrics_and_follows_traffic() {
    let maddr = SocketAddr::new(v4("127.0.0.1"), free_port(v4("127.0.0.1")));
    let cfg = format!(
        "[metrics]\nlisten = \"{maddr}\"\n[checkpoint]\ndefault_class = \"open\"\n[checkpoint.classes.open]\ncheckpoint = \"on-request\"\n"
    );
    let d = Daemon::spawn(
        &BINS,
        &DaemonSpec {
            config: Some(&cfg),
            ..DaemonSpec::default()
        },
    );
    let before = scrape(maddr);
    let client = v4("127.0.0.1");
    for port in 0..20u16 {
        let r = request(
            client,
            d.addr(),
            &RequestBuilder::map(Protocol::TCP, 7000 + port),
        );
        assert_eq!(r.header.result, ResultCode::SUCCESS);
    }
    let peer = request(
        client,
        d.addr(),
        &RequestBuilder::peer(Protocol::TCP, 6000, "203.0.113.9:443".parse().unwrap()),
    );
    assert_eq!(peer.header.result, ResultCode::SUCCESS);
    let body = scrape(maddr);
    assert_eq!(exposed(&body), documented(), "scrape:\n{body}");
    assert_eq!(
        sample(&body, "portkeep_mappings_by_kind{kind=\"map\"}"),
        20.0,
        "{body}"
    );
    assert_eq!(
        sample(&body, "portkeep_mappings_by_kind{kind=\"peer\"}"),
        1.0,
        "{body}"
    );
    assert_eq!(sample(&body, "portkeep_subscribers "), 1.0, "{body}");
    assert_eq!(
        sample(&body, "portkeep_mappings_by_class{class=\"open\"}"),
        21.0,
        "{body}"
    );
    // A standalone node refuses every check-point (RFC 7767 section 3.2:
    // no backup), counted under the class that decided.
    let cp = request(
        client,
        d.addr(),
        &RequestBuilder::map(Protocol::TCP, 6500).checkpoint_required(),
    );
    assert_eq!(cp.header.result, ResultCode::SUCCESS);
    let after = scrape(maddr);
    assert_eq!(
        sample(
            &after,
            "portkeep_checkpoint_decisions_total{class=\"open\",outcome=\"refused_no_backup\"}"
        ),
        1.0,
        "{after}"
    );
    assert_eq!(
        sample(&body, "portkeep_replication_lag_records "),
        0.0,
        "{body}"
    );
    let om = scrape_as(maddr, true);
    assert_eq!(exposed(&om), documented(), "OpenMetrics scrape:\n{om}");
    assert!(om.ends_with("# EOF\n"), "{om}");
    let maps = |b: &str| sample(b, "portkeep_requests_total{opcode=\"MAP\"}");
    assert_eq!(maps(&body) - maps(&before), 20.0, "{body}");
    assert!(sample(&body, "portkeep_mappings ") >= 20.0, "{body}");
    assert_eq!(
        sample(&body, "portkeep_ha_role{role=\"standalone\"}"),
        1.0,
        "{body}"
    );
    // Under load: a scrape while requests keep arriving is still valid.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let under_load = std::thread::scope(|sc| {
        let load = sc.spawn(|| {
            let mut n = 0u16;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                request(
                    client,
                    d.addr(),
                    &RequestBuilder::map(Protocol::UDP, 9000 + n % 500),
                );
                n = n.wrapping_add(1);
            }
        });
        let mut last = String::new();
        for _ in 0..5 {
            last = scrape(maddr);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        load.join().unwrap();
        last
    });
    let Some(promtool) = find_tool("promtool") else {
        skip(
            "promtool check metrics",
            "`promtool` not found (apt-get install prometheus)",
        );
        return;
    };
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(under_load.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed: {}{}\n{under_load}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The metric names a query text uses (`portkeep_...`), a histogram's
/// series (`_bucket`, `_sum`, `_count`) read as the histogram.
fn names_in(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("portkeep_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let name = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        out.insert(name.to_owned());
        rest = &tail[end..];
    }
    out
}

#[test]
fn the_example_alert_rules_and_dashboard_use_only_documented_metrics() {
    let dir = examples_dir().join("monitoring");
    let rules = std::fs::read_to_string(dir.join("portkeep-alerts.yml")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("portkeep-dashboard.json")).unwrap(),
    )
    .unwrap();
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter())
        .map(|t| t["expr"].as_str().unwrap().to_owned())
        .collect();
    assert!(exprs.len() >= 9, "{exprs:?}");
    let doc = documented();
    for (what, used) in [
        ("alert rules", names_in(&rules)),
        ("dashboard", names_in(&exprs.join("\n"))),
    ] {
        assert!(!used.is_empty(), "{what} name no metric");
        let unknown: Vec<&String> = used.difference(&doc).collect();
        assert!(
            unknown.is_empty(),
            "{what} use metrics docs/metrics.md does not list: {unknown:?}"
        );
    }
    let Some(promtool) = find_tool("promtool") else {
        skip(
            "promtool check rules",
            "`promtool` not found (apt-get install prometheus)",
        );
        return;
    };
    let out = Command::new(promtool)
        .args(["check", "rules"])
        .arg(dir.join("portkeep-alerts.yml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `ctl status` and the metrics carry a digest of the policy served: two
/// nodes with the same policy (on different addresses and data
/// directories) show the same, a changed quota another.
#[test]
fn the_config_digest_is_the_policy_s() {
    let policy = "external_addresses = [\"192.0.2.1\"]\n[subscribers]\nmax_mappings = 100\n";
    let digest = |d: &Daemon| {
        d.ctl(&["--json", "status"]).json()["config_digest"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let a = Daemon::with_config(&BINS, policy);
    let b = Daemon::with_config(&BINS, policy);
    let c = Daemon::with_config(&BINS, &policy.replace("100", "101"));
    assert_ne!(a.addr(), b.addr());
    assert_eq!(digest(&a), digest(&b));
    assert_ne!(digest(&a), digest(&c));
    assert_eq!(digest(&a).len(), 8);
}
