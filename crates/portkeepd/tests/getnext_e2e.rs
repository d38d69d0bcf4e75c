//! End to end: GET / NEXT (PCP failure-scenarios draft, section 4) with
//! the real `portkeepd` and the real `portkeep list` / `portkeep get`.
//!
//! 127.0.0.2 stands in for another subscriber (IPv4 subscribers are keyed
//! by /32 by default). Build the CLI first: `cargo build --workspace --bins`.

#![allow(clippy::unwrap_used, clippy::panic, clippy::expect_used)]

use std::sync::LazyLock;

use portkeep_client::RequestBuilder;
use portkeep_proto::{Protocol, ResultCode};
use portkeep_test_support::daemon::Daemon;
use portkeep_test_support::pcp::{request, v4, LOCALHOST};
use portkeep_test_support::process::Bins;
use serde_json::Value;

static BINS: LazyLock<Bins> = LazyLock::new(|| Bins::from_daemon(env!("CARGO_BIN_EXE_portkeepd")));

fn populate(d: &Daemon) {
    for p in 0..30u16 {
        let proto = if p % 3 == 0 {
            Protocol::UDP
        } else {
            Protocol::TCP
        };
        let mut b = RequestBuilder::map(proto, 8000 + p).lifetime(3600);
        if p == 1 {
            b = b.description("web server");
        }
        assert_eq!(
            request(LOCALHOST, d.addr(), &b).header.result,
            ResultCode::SUCCESS
        );
    }
    for p in 0..5u16 {
        let b = RequestBuilder::map(Protocol::TCP, 8000 + p).lifetime(3600);
        assert_eq!(
            request(v4("127.0.0.2"), d.addr(), &b).header.result,
            ResultCode::SUCCESS
        );
    }
}

/// `list` walks the whole table of this host (draft sections 4.5, 4.6)
/// and never shows another subscriber's mappings (section 6); `--json`
/// prints one array; filters narrow it (section 4.1).
#[test]
fn draft_s4_list_walks_this_hosts_mappings() {
    let d = Daemon::start(&BINS);
    populate(&d);
    let server = d.server();
    let run = BINS.cli_at(&server, &["list", "--json"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    let all = run.json();
    let all = all.as_array().unwrap();
    assert_eq!(all.len(), 30, "{all:?}");
    let mut ports: Vec<u64> = Vec::new();
    for m in all {
        let internal: std::net::SocketAddr = m["internal"].as_str().unwrap().parse().unwrap();
        assert_eq!(
            internal.ip(),
            LOCALHOST,
            "another subscriber's mapping: {m}"
        );
        assert!(m["lifetime"].as_u64().unwrap() > 3500);
        ports.push(u64::from(internal.port()));
    }
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), 30, "each mapping once");
    let web: Vec<&Value> = all
        .iter()
        .filter(|m| m["description"] == "web server")
        .collect();
    assert_eq!(web.len(), 1);
    assert_eq!(web[0]["internal"], "127.0.0.1:8001");

    let run = BINS.cli_at(&server, &["list"]);
    assert_eq!(run.code, Some(0));
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 31, "header + 30: {}", run.stdout);
    assert!(lines[0].starts_with("PROTO"));
    assert!(run.stdout.contains("web server"));

    let udp = BINS
        .cli_at(&server, &["list", "--protocol", "udp", "--json"])
        .json();
    assert_eq!(udp.as_array().unwrap().len(), 10);
    let one = BINS
        .cli_at(
            &server,
            &[
                "list",
                "--protocol",
                "tcp",
                "--internal",
                "127.0.0.1:8002",
                "--json",
            ],
        )
        .json();
    assert_eq!(one.as_array().unwrap().len(), 1);
    let other = BINS
        .cli_at(&server, &["list", "--internal", "127.0.0.2", "--json"])
        .json();
    assert_eq!(
        other.as_array().unwrap().len(),
        0,
        "invisible, not an error"
    );

    // Section 4.1: a port without a protocol is unsound: usage error.
    let run = BINS.cli_at(&server, &["list", "--internal", "127.0.0.1:8002"]);
    assert_eq!(run.code, Some(64), "{run:?}");
}

/// `get` is the pure GET (section 4.5): one mapping, or exit 2 with
/// NONEXIST_MAP.
#[test]
fn draft_s4_5_get_shows_one_mapping_or_nonexist_map() {
    let d = Daemon::start(&BINS);
    populate(&d);
    let server = d.server();
    let run = BINS.cli_at(&server, &["get", "tcp", "8001", "--json"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    let m = run.json();
    assert_eq!(m["internal"], "127.0.0.1:8001");
    assert_eq!(m["protocol"], "tcp");
    assert_eq!(m["description"], "web server");
    let run = BINS.cli_at(&server, &["get", "udp", "8001"]);
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(run.stderr.contains("NONEXIST_MAP"), "{run:?}");
}

/// The code points are configurable on both sides (docs/extensions.md):
/// with matching values `list` works, with the defaults against a server
/// using others the GET is an unknown opcode.
#[test]
fn draft_s4_code_points_configured_on_both_sides() {
    let d = Daemon::with_config(
        &BINS,
        "[extensions]\nget_opcode = 100\nnext_option = 99\nnonexist_map_result = 200\n",
    );
    populate(&d);
    let server = d.server();
    let flags = [
        "--get-opcode",
        "100",
        "--next-option",
        "99",
        "--nonexist-map",
        "200",
    ];
    let mut args = flags.to_vec();
    args.extend(["list", "--json"]);
    let run = BINS.cli_at(&server, &args);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(run.json().as_array().unwrap().len(), 30);
    let mut args = flags.to_vec();
    args.extend(["get", "sctp", "1"]);
    let run = BINS.cli_at(&server, &args);
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(run.stderr.contains("NONEXIST_MAP"), "{run:?}");
    let run = BINS.cli_at(&server, &["list"]);
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(run.stderr.contains("UNSUPP_OPCODE"), "{run:?}");
}
