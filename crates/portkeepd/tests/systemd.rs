//! systemd integration: the units in `packaging/systemd/` pass
//! `systemd-analyze verify` with no warning, and `portkeepd` speaks the
//! sd_notify(3) protocol to a socket the test reads (CI has no systemd as
//! PID 1): READY=1 once serving, WATCHDOG=1 while its loops turn and at
//! about half `WATCHDOG_USEC`, STOPPING=1 on SIGTERM. Under CI a missing
//! `systemd-analyze` fails the test.

#![allow(clippy::unwrap_used, clippy::panic, clippy::disallowed_methods)]

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::sync::LazyLock;
use std::time::Duration;

use portkeep_test_support::daemon::examples_dir;
use portkeep_test_support::pcp::{free_port, v4};
use portkeep_test_support::process::{now, Bins};
use portkeep_test_support::skip::{find_tool, skip};

static BINS: LazyLock<Bins> = LazyLock::new(|| Bins::from_daemon(env!("CARGO_BIN_EXE_portkeepd")));

#[test]
fn systemd_units_verify_without_warnings() {
    let Some(analyze) = find_tool("systemd-analyze") else {
        skip(
            "systemd-analyze verify",
            "`systemd-analyze` not found (apt-get install systemd)",
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let src = examples_dir().join("../packaging/systemd");
    let mut units = Vec::new();
    for name in ["portkeepd.service", "portkeep-agent.service"] {
        // The installed paths, pointed at the binaries this build made
        // (verify checks that each command exists and is executable).
        let text = std::fs::read_to_string(src.join(name))
            .unwrap()
            .replace("/usr/sbin/portkeepd", BINS.daemon().to_str().unwrap())
            .replace("/usr/bin/portkeep ", &format!("{} ", BINS.cli().display()));
        assert!(
            text.contains("NoNewPrivileges=yes"),
            "{name}: hardening missing"
        );
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        units.push(path);
    }
    let out = Command::new(analyze)
        .args(["verify", "--man=no"])
        .args(&units)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );
    let daemon = std::fs::read_to_string(src.join("portkeepd.service")).unwrap();
    for line in [
        "Type=notify",
        "WatchdogSec=",
        "StateDirectory=portkeep",
        "User=portkeep",
        "CapabilityBoundingSet=CAP_NET_ADMIN\n",
    ] {
        assert!(daemon.contains(line), "portkeepd.service lacks {line}");
    }
}

fn next_message(sock: &UnixDatagram, within: Duration) -> Option<String> {
    sock.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[test]
fn sd_notify_ready_watchdog_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&notify).unwrap();
    let port = free_port(v4("127.0.0.1"));
    let mut child = Command::new(BINS.daemon())
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--data-dir", dir.path().join("data").to_str().unwrap()])
        .env("NOTIFY_SOCKET", &notify)
        .env("WATCHDOG_USEC", "1000000")
        .env_remove("WATCHDOG_PID")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ready = next_message(&sock, Duration::from_secs(20)).expect("no READY=1 within 20 s");
    assert!(ready.starts_with("READY=1\n"), "{ready:?}");
    assert!(ready.contains("STATUS=serving PCP"), "{ready:?}");
    // Half of WATCHDOG_USEC, twice in a row.
    let t = now();
    for _ in 0..2 {
        let m = next_message(&sock, Duration::from_secs(3)).expect("no WATCHDOG=1");
        assert_eq!(m, "WATCHDOG=1");
    }
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let mut stopping = false;
    while let Some(m) = next_message(&sock, Duration::from_secs(10)) {
        if m == "STOPPING=1" {
            stopping = true;
            break;
        }
        assert_eq!(m, "WATCHDOG=1");
    }
    assert!(stopping, "no STOPPING=1 after SIGTERM");
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
}

/// `--log-format json`: every line on stderr is one JSON object, and each
/// mapping's start, renewal and end is one record carrying what an operator keeps
/// (who held which external endpoint, when, until when, why it ended).
#[test]
fn json_logs_carry_one_record_per_mapping_event() {
    use portkeep_client::RequestBuilder;
    use portkeep_proto::{Protocol, ResultCode};
    use portkeep_test_support::pcp::request;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port(v4("127.0.0.1"));
    let server: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let log = dir.path().join("stderr.log");
    let mut child = Command::new(BINS.daemon())
        .args(["--log-format", "json", "--listen", &server.to_string()])
        .args(["--data-dir", dir.path().join("data").to_str().unwrap()])
        .env_remove("JOURNAL_STREAM")
        .env_remove("PORTKEEPD_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let client = v4("127.0.0.1");
    let map = RequestBuilder::map(Protocol::TCP, 7777)
        .nonce([5; 12])
        .lifetime(600);
    let granted = request(client, server, &map);
    assert_eq!(granted.header.result, ResultCode::SUCCESS);
    let renewed = request(client, server, &map);
    assert_eq!(renewed.header.result, ResultCode::SUCCESS);
    let gone = request(
        client,
        server,
        &RequestBuilder::delete(Protocol::TCP, 7777, [5; 12]),
    );
    assert_eq!(gone.header.result, ResultCode::SUCCESS);
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    child.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines
        .iter()
        .all(|l| l["timestamp"].is_string() && l["level"].is_string()));
    let of = |event: &str| {
        lines
            .iter()
            .find(|l| {
                l["record"] == "mapping" && l["event"] == event && l["internal"] == "127.0.0.1:7777"
            })
            .unwrap_or_else(|| panic!("no `{event}` record in:\n{text}"))
            .clone()
    };
    let count = |event: &str| {
        lines
            .iter()
            .filter(|l| l["record"] == "mapping" && l["event"] == event)
            .count()
    };
    assert_eq!(
        (count("started"), count("renewed"), count("ended")),
        (1, 1, 1),
        "one start, one renewal, one end:\n{text}"
    );
    let held = of("started");
    let renewal = of("renewed");
    assert_eq!(renewal["external"], held["external"]);
    assert!(renewal["seq"].as_u64() > held["seq"].as_u64(), "{renewal}");
    assert_eq!(held["protocol"], 6);
    assert_eq!(held["lifetime"], 600);
    assert_eq!(held["checkpoint"], false);
    assert_eq!(held["subscriber"], "127.0.0.1/32");
    assert_eq!(held["class"], "default", "the built-in check-point class");
    assert!(
        held["external"].as_str().unwrap().starts_with("192.0.2.1:"),
        "{held}"
    );
    assert!(held["expires_ms"].as_u64().unwrap() > 0);
    let ended = of("ended");
    assert_eq!(ended["reason"], "deleted");
    assert_eq!(ended["external"], held["external"]);
}
