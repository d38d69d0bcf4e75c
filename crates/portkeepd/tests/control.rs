//! The control interface (`portkeepd ctl`) and the data directory lock,
//! against the real daemon.

#![allow(clippy::unwrap_used)]

use std::sync::LazyLock;
use std::time::Duration;

use portkeep_test_support::daemon::Daemon;
use portkeep_test_support::process::Bins;

static BINS: LazyLock<Bins> = LazyLock::new(|| Bins::from_daemon(env!("CARGO_BIN_EXE_portkeepd")));

#[test]
fn control_mappings_lists_what_clients_created() {
    let d = Daemon::start(&BINS);
    let server = d.server();
    let map = BINS.cli_at(
        &server,
        &["--json", "map", "tcp", "8080", "--description", "web"],
    );
    assert_eq!(map.code, Some(0), "{map:?}");
    let peer = BINS.cli_at(
        &server,
        &["--json", "peer", "udp", "5000", "203.0.113.9:3478"],
    );
    assert_eq!(peer.code, Some(0), "{peer:?}");
    let run = d.ctl(&["--json", "mappings"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    let reply = run.json();
    let list = reply["mappings"].as_array().unwrap();
    assert_eq!(list.len(), 2, "{reply}");
    let m = list.iter().find(|m| m["kind"] == "map").unwrap();
    assert_eq!(m["internal_port"], 8080);
    assert_eq!(
        m["external"],
        map.json()["external_ip"].as_str().unwrap().to_owned()
            + ":"
            + &map.json()["external_port"].to_string()
    );
    assert_eq!(m["nonce"], map.json()["nonce"]);
    assert_eq!(m["description"], "web");
    assert_eq!(m["checkpoint"], false);
    let p = list.iter().find(|m| m["kind"] == "peer").unwrap();
    assert_eq!(p["remote"], "203.0.113.9:3478");
    // The human table names both.
    let table = d.ctl(&["mappings"]);
    assert!(
        table.stdout.contains("8080") && table.stdout.contains("203.0.113.9:3478"),
        "{table:?}"
    );
    assert!(table.stdout.contains("2 mappings"), "{table:?}");
}

#[test]
fn control_status_and_counters() {
    let d = Daemon::start(&BINS);
    let server = d.server();
    assert_eq!(BINS.cli_at(&server, &["map", "tcp", "1"]).code, Some(0));
    assert_eq!(
        BINS.cli_at(
            &server,
            &["delete", "tcp", "2", "--nonce", "000000000000000000000001"]
        )
        .code,
        Some(0)
    );
    let status = d.ctl(&["--json", "status"]).json();
    assert_eq!(status["role"], "standalone");
    assert_eq!(status["mappings"], 1);
    assert_eq!(status["listen"][0], server);
    let counters = d.ctl(&["--json", "counters"]).json();
    assert!(
        counters["results"]["SUCCESS"].as_u64().unwrap() >= 2,
        "{counters}"
    );
    assert_eq!(counters["mappings"], 1);
    // Both answers went through the group commit (the embedded default
    // keeps a durable store): its latency is measured.
    let lat = &counters["commit_latency_us"];
    assert!(lat["count"].as_u64().unwrap() >= 2, "{counters}");
    let (p50, max) = (lat["p50"].as_u64().unwrap(), lat["max"].as_u64().unwrap());
    assert!(p50 > 0 && p50 <= max, "{counters}");
}

#[test]
fn control_unknown_command_and_bad_json_are_refused() {
    use std::io::{BufRead, BufReader, Write};
    let d = Daemon::start(&BINS);
    let sock = d.data_dir().join("control.sock");
    let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    s.write_all(b"{\"command\":\"launch\"}\nnot json\n")
        .unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let lines: Vec<serde_json::Value> = BufReader::new(s)
        .lines()
        .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["ok"], false);
    assert!(lines[0]["error"]
        .as_str()
        .unwrap()
        .contains("unknown command `launch`"));
    assert_eq!(lines[1]["ok"], false);
    assert!(lines[1]["error"].as_str().unwrap().contains("not JSON"));
}

#[test]
fn control_without_a_daemon_exits_69_naming_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let run = BINS.run_daemon_to_exit(
        &["ctl", "--data-dir", dir.path().to_str().unwrap(), "status"],
        Duration::from_secs(10),
    );
    assert_eq!(run.code, Some(69), "{run:?}");
    assert!(run.stderr.contains("control.sock"), "{run:?}");
}

#[test]
fn data_dir_is_locked_against_a_second_daemon() {
    let d = Daemon::start(&BINS);
    let dir = d.data_dir();
    let run = BINS.run_daemon_to_exit(
        &[
            "--data-dir",
            dir.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
        Duration::from_secs(10),
    );
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.stderr.contains("in use by another portkeepd"),
        "{run:?}"
    );
    // The first daemon is untouched and still answers its control socket.
    assert_eq!(d.ctl(&["status"]).code, Some(0));
}

#[test]
fn data_dir_is_created_private_and_cleaned_on_stop() {
    use std::os::unix::fs::PermissionsExt;
    let mut d = Daemon::start(&BINS);
    let dir = d.data_dir();
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "only the owner may reach the control socket");
    assert!(dir.join("control.sock").exists());
    let status = d.signal_and_wait("TERM", Duration::from_secs(5)).unwrap();
    assert!(status.success());
    assert!(
        !dir.join("control.sock").exists(),
        "socket removed on clean stop"
    );
}

/// `[limits] subscriber_rate` and `error_rate` reach the server: a
/// subscriber over its rate and error responses over the server's are
/// dropped and counted in `ctl counters`; a bad rate names its key.
#[test]
fn carrier_controls_request_and_error_rates_are_applied_and_counted() {
    use std::net::UdpSocket;
    let d = Daemon::with_config(
        &BINS,
        "[limits]\nsubscriber_rate = \"5/s\"\nerror_rate = \"3/s\"\n",
    );
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    // Twenty 2-octet datagrams of version 1 (neither PCP nor NAT-PMP:
    // UNSUPP_VERSION errors) at once: at most five pass the subscriber's
    // rate, three of those are answered (the server's error rate).
    for _ in 0..20 {
        sock.send_to(&[1, 0], d.addr()).unwrap();
    }
    let mut answered = 0;
    let mut buf = [0u8; 64];
    while sock.recv_from(&mut buf).is_ok() {
        answered += 1;
    }
    assert_eq!(answered, 3);
    let c = d.ctl(&["--json", "counters"]).json();
    let n = |k: &str| c[k].as_u64().unwrap();
    // The readiness probe of the test's start took one token too.
    assert!((15..=16).contains(&n("rate_limited")), "{c}");
    assert_eq!(n("rate_limited") + n("errors_suppressed") + 3, 20, "{c}");
}

/// `[limits] clients`: a request from outside the list gets no answer at
/// all (RFC 6887 section 8.2: who is served is the server's policy), and
/// is counted; a client inside is served.
#[test]
fn carrier_controls_only_the_listed_clients_are_answered() {
    use std::net::{IpAddr, SocketAddr, UdpSocket};
    let d = Daemon::with_config(&BINS, "[limits]\nclients = [\"127.0.0.1/32\"]\n");
    let ask = |from: &str| {
        let ip: IpAddr = from.parse().unwrap();
        let sock = UdpSocket::bind(SocketAddr::new(ip, 0)).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(400)))
            .unwrap();
        let req = portkeep_test_support::pcp::map_request(ip, 8080, 600, [7; 12], false);
        sock.send_to(&req, d.addr()).unwrap();
        let mut buf = [0u8; 1100];
        sock.recv_from(&mut buf).is_ok()
    };
    assert!(ask("127.0.0.1"), "a listed client is served");
    assert!(!ask("127.0.0.77"), "another gets no answer");
    let c = d.ctl(&["--json", "counters"]).json();
    assert_eq!(c["not_clients"], 1, "{c}");
    assert_eq!(c["mappings"], 1, "{c}");
}

/// `[[forward]]`: the operator's static forward is in the table from the
/// start (shown by `ctl mappings`, with its description), and the host it
/// points at cannot delete it: NOT_AUTHORIZED, whatever nonce it sends
/// (RFC 6887 section 11.3), even with the CLI's own key.
#[test]
fn static_forward_is_served_and_no_client_deletes_it() {
    let d = Daemon::with_config(
        &BINS,
        "external_addresses = [\"192.0.2.1\"]\n\
         [[forward]]\nprotocol = \"tcp\"\ninternal = \"127.0.0.1:2222\"\nexternal = \"192.0.2.1:22\"\ndescription = \"ssh to the NAS\"\n",
    );
    let reply = d.ctl(&["--json", "mappings"]).json();
    let list = reply["mappings"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{reply}");
    assert_eq!(list[0]["internal_port"], 2222);
    assert_eq!(list[0]["external"], "192.0.2.1:22");
    assert_eq!(list[0]["description"], "ssh to the NAS");
    let delete = BINS.cli_at(&d.server(), &["--json", "delete", "tcp", "2222"]);
    assert_ne!(delete.code, Some(0), "{delete:?}");
    assert!(
        delete.stdout.contains("NOT_AUTHORIZED") || delete.stderr.contains("NOT_AUTHORIZED"),
        "{delete:?}"
    );
    let after = d.ctl(&["--json", "mappings"]).json();
    assert_eq!(after["mappings"].as_array().unwrap().len(), 1, "{after}");
    let counters = d.ctl(&["--json", "counters"]).json();
    assert_eq!(counters["static_forwards"], 1, "{counters}");
}
