//! End to end: the real `portkeepd` and `portkeep` binaries as processes,
//! talking PCP over real UDP sockets on loopback.
//!
//! Every test starts its own daemon on ephemeral ports with its own
//! temporary directory, waits for it by polling with ANNOUNCE, and kills it
//! on the way out (also on failure), so the tests run in parallel. The
//! `portkeep` CLI is taken from the same target directory as `portkeepd`:
//! build it first with `cargo build --workspace --bins`.
//!
//! 127.0.0.0/8 is all loopback, so 127.0.0.2, 127.0.0.3 ... stand in for
//! other hosts (other subscribers: the default keys IPv4 subscribers by /32).

#![allow(clippy::unwrap_used, clippy::panic, clippy::expect_used)]

use std::net::{SocketAddr, UdpSocket};
use std::sync::LazyLock;
use std::time::Duration;

use portkeep_client::{RequestBuilder, RetransmitParams, Transaction};
use portkeep_proto::{
    CodePoints, OpData, Opcode, OptionCode, PcpOption, Protocol, Request, Response, ResultCode,
};
use portkeep_test_support::daemon::{examples_dir, CliRun, Daemon, DaemonSpec};
use portkeep_test_support::pcp::{bindable, exchange, request, v4, LOCALHOST, LOCALHOST6};
use portkeep_test_support::process::{now, Bins};
use portkeep_test_support::skip::skip;
use serde_json::Value;

static BINS: LazyLock<Bins> = LazyLock::new(|| Bins::from_daemon(env!("CARGO_BIN_EXE_portkeepd")));

/// The default external address (TEST-NET-1, RFC 5737).
const EXTERNAL: &str = "192.0.2.1";

/// Exit statuses of the CLI.
const EXIT_OK: i32 = 0;
const EXIT_PCP_ERROR: i32 = 2;
/// sysexits EX_CONFIG, the daemon's status for configuration errors.
const EXIT_CONFIG: i32 = 78;

fn external_port(j: &Value) -> u16 {
    u16::try_from(j["external_port"].as_u64().unwrap()).unwrap()
}

fn nonce(j: &Value) -> String {
    j["nonce"].as_str().unwrap().to_owned()
}

/// A successful CLI run's JSON, with context on failure.
fn ok_json(run: &CliRun, d: &Daemon) -> Value {
    assert_eq!(
        run.code,
        Some(EXIT_OK),
        "portkeep failed: {run:?}\ndaemon log:\n{}",
        d.log()
    );
    let j = run.json();
    assert_eq!(j["result"], "SUCCESS", "{j}");
    j
}

/// A CLI run that must end with the PCP error `result`.
fn pcp_error(run: &CliRun, result: &str, d: &Daemon) -> Value {
    assert_eq!(
        run.code,
        Some(EXIT_PCP_ERROR),
        "expected exit 2 ({result}): {run:?}\ndaemon log:\n{}",
        d.log()
    );
    let j = run.json();
    assert_eq!(j["result"], result, "{j}");
    assert!(run.stderr.contains(result), "stderr names it: {run:?}");
    j
}

fn map_builder(port: u16) -> RequestBuilder {
    RequestBuilder::map(Protocol::TCP, port).lifetime(600)
}

fn map_data(r: &Response) -> portkeep_proto::MapData {
    *r.data
        .map_part()
        .unwrap_or_else(|| panic!("no MAP body: {r:?}"))
}

/// A port in the middle of the default range that is unlikely to be what
/// the allocator hands out on its own.
fn some_port() -> u16 {
    20000 + (std::process::id() % 20000) as u16
}

// ---------------------------------------------------------------------------
// The zero-configuration promise.

/// The README's "Run it": `portkeepd` with no arguments serves PCP on
/// 127.0.0.1:5351 and [::1]:5351 (RFC 6887 section 19.1: port 5351), and
/// `portkeep map tcp 8080` with no `--server` reaches it and gets the
/// default external address 192.0.2.1; the README's PEER and delete
/// commands work as written.
#[test]
fn rfc6887_s19_1_no_arguments_serves_loopback_port_5351() {
    let v4_addr = SocketAddr::new(LOCALHOST, 5351);
    let v6_addr = SocketAddr::new(LOCALHOST6, 5351);
    if !bindable(v4_addr) || !bindable(v6_addr) {
        skip(
            "no-argument daemon on port 5351",
            "port 5351 busy (or [::1] unavailable)",
        );
        return;
    }
    // Someone may take the port between the check and the start.
    let d = match Daemon::try_spawn(
        &BINS,
        &DaemonSpec {
            raw_args: Some(Vec::new()),
            fixed_addrs: vec![v4_addr, v6_addr],
            ..DaemonSpec::default()
        },
    ) {
        Ok(d) => d,
        Err(log) => {
            skip(
                "no-argument daemon on port 5351",
                &format!("port 5351 busy:\n{log}"),
            );
            return;
        }
    };
    let run = BINS.run_cli(&["map", "tcp", "8080"]);
    assert_eq!(run.code, Some(EXIT_OK), "{run:?}\n{}", d.log());
    assert!(run.stdout.contains("result: SUCCESS"), "{run:?}");
    let external = run
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("external: "))
        .unwrap_or_else(|| panic!("no external line: {run:?}"));
    let ext: SocketAddr = external.parse().unwrap();
    assert_eq!(ext.ip(), v4(EXTERNAL), "{run:?}");
    assert_ne!(ext.port(), 0);
    // "logging each mapping".
    assert!(d.log().contains(&ext.to_string()), "{}", d.log());

    // The README's other two commands.
    let peer = BINS.run_cli(&["--json", "peer", "udp", "5000", "203.0.113.9:3478"]);
    assert_eq!(peer.code, Some(EXIT_OK), "{peer:?}\n{}", d.log());
    assert_eq!(peer.json()["external_ip"], EXTERNAL);
    let nonce = run
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("nonce: "))
        .unwrap_or_else(|| panic!("no nonce line: {run:?}"));
    let del = BINS.run_cli(&["delete", "tcp", "8080", "--nonce", nonce]);
    assert_eq!(del.code, Some(EXIT_OK), "{del:?}\n{}", d.log());
    assert!(del.stdout.contains("result: SUCCESS"), "{del:?}");
}

// ---------------------------------------------------------------------------
// MAP, renewal, delete, PEER.

/// RFC 6887 section 11.3: a renewal with the creator's nonce keeps the
/// external port; section 15: a delete (lifetime 0) needs that nonce too,
/// another nonce is NOT_AUTHORIZED and leaves the mapping alone.
#[test]
fn rfc6887_s11_3_renew_and_delete_need_the_nonce() {
    let d = Daemon::start(&BINS);
    let s = d.server();
    let first = ok_json(&BINS.cli_at(&s, &["map", "tcp", "8080", "--json"]), &d);
    assert_eq!(first["opcode"], "MAP");
    assert_eq!(first["external_ip"], EXTERNAL);
    let port = external_port(&first);
    let n = nonce(&first);
    assert_eq!(n.len(), 24);

    let renewed = ok_json(
        &BINS.cli_at(&s, &["map", "tcp", "8080", "--nonce", &n, "--json"]),
        &d,
    );
    assert_eq!(external_port(&renewed), port, "renewal keeps the port");
    assert_eq!(renewed["nonce"], n.as_str());

    // Another nonce may neither take over nor delete the mapping.
    let other = "00112233445566778899aabb";
    assert_ne!(n, other);
    pcp_error(
        &BINS.cli_at(&s, &["map", "tcp", "8080", "--nonce", other, "--json"]),
        "NOT_AUTHORIZED",
        &d,
    );
    let j = pcp_error(
        &BINS.cli_at(&s, &["delete", "tcp", "8080", "--nonce", other, "--json"]),
        "NOT_AUTHORIZED",
        &d,
    );
    assert_eq!(j["lifetime"], 1800, "long-lifetime error (section 7.4)");
    let still = ok_json(
        &BINS.cli_at(&s, &["map", "tcp", "8080", "--nonce", &n, "--json"]),
        &d,
    );
    assert_eq!(external_port(&still), port, "the failed delete kept it");

    let deleted = ok_json(
        &BINS.cli_at(&s, &["delete", "tcp", "8080", "--nonce", &n, "--json"]),
        &d,
    );
    assert_eq!(deleted["lifetime"], 0);
    // Gone: a stranger's nonce now creates a fresh mapping.
    ok_json(
        &BINS.cli_at(&s, &["map", "tcp", "8080", "--nonce", other, "--json"]),
        &d,
    );
}

/// RFC 6887 section 12 (PEER) with endpoint-independent mapping (RFC 4787
/// REQ-1, which section 12.3 assumes): the flow's external port is the
/// one the MAP of the same internal port got, whatever the remote peer.
#[test]
fn rfc6887_s12_3_peer_shares_the_endpoint_independent_mapping() {
    let d = Daemon::start(&BINS);
    let s = d.server();
    let map = ok_json(&BINS.cli_at(&s, &["map", "tcp", "5000", "--json"]), &d);
    let peer = ok_json(
        &BINS.cli_at(&s, &["peer", "tcp", "5000", "203.0.113.9:443", "--json"]),
        &d,
    );
    assert_eq!(peer["opcode"], "PEER");
    assert_eq!(peer["remote"], "203.0.113.9:443");
    assert_eq!(peer["external_ip"], map["external_ip"]);
    assert_eq!(external_port(&peer), external_port(&map), "{map}\n{peer}");
    let peer2 = ok_json(
        &BINS.cli_at(&s, &["peer", "tcp", "5000", "198.51.100.20:80", "--json"]),
        &d,
    );
    assert_eq!(external_port(&peer2), external_port(&map), "{peer2}");
    // Another internal port gets another external port.
    let other = ok_json(&BINS.cli_at(&s, &["map", "tcp", "5001", "--json"]), &d);
    assert_ne!(external_port(&other), external_port(&map));
}

// ---------------------------------------------------------------------------
// Suggestions and PREFER_FAILURE.

/// RFC 6887 section 11.3: a free suggested external port is honoured;
/// section 13.2: with PREFER_FAILURE a taken one is CANNOT_PROVIDE_EXTERNAL
/// (a short-lifetime error, section 7.4) instead of another port, while
/// without it the server assigns another port.
#[test]
fn rfc6887_s13_2_suggestion_honoured_and_prefer_failure_fails_when_taken() {
    let d = Daemon::start(&BINS);
    let s = d.server();
    let want = some_port();
    let sug = format!("{EXTERNAL}:{want}");
    let first = ok_json(
        &BINS.cli_at(&s, &["map", "tcp", "7000", "--suggest", &sug, "--json"]),
        &d,
    );
    assert_eq!(external_port(&first), want, "free suggestion honoured");
    assert_eq!(first["external_ip"], EXTERNAL);

    // The same host, another internal port, the taken suggestion.
    let j = pcp_error(
        &BINS.cli_at(
            &s,
            &[
                "map",
                "tcp",
                "7001",
                "--suggest",
                &sug,
                "--prefer-failure",
                "--json",
            ],
        ),
        "CANNOT_PROVIDE_EXTERNAL",
        &d,
    );
    assert_eq!(j["lifetime"], 30, "short-lifetime error (section 7.4)");

    // Another host asking for the same external port.
    let host2 = v4("127.0.0.2");
    let r = request(
        host2,
        d.addr(),
        &map_builder(7000)
            .suggest(Some(v4(EXTERNAL)), want)
            .prefer_failure(),
    );
    assert_eq!(
        r.header.result,
        ResultCode::CANNOT_PROVIDE_EXTERNAL,
        "{r:?}"
    );
    // Without PREFER_FAILURE it gets some other port.
    let r = request(
        host2,
        d.addr(),
        &map_builder(7000).suggest(Some(v4(EXTERNAL)), want),
    );
    assert_eq!(r.header.result, ResultCode::SUCCESS, "{r:?}");
    let m = map_data(&r);
    assert_ne!(m.external_port, want);
    assert_ne!(m.external_port, 0);

    // A free suggestion with PREFER_FAILURE succeeds exactly.
    let free = if want == 65535 { want - 1 } else { want + 1 };
    let j = ok_json(
        &BINS.cli_at(
            &s,
            &[
                "map",
                "tcp",
                "7002",
                "--suggest",
                &format!(":{free}"),
                "--prefer-failure",
                "--json",
            ],
        ),
        &d,
    );
    assert_eq!(external_port(&j), free);
}

// ---------------------------------------------------------------------------
// THIRD_PARTY.

/// RFC 6887 section 13.1: THIRD_PARTY from a client the policy does not
/// allow is NOT_AUTHORIZED (the default allows nobody).
#[test]
fn rfc6887_s13_1_third_party_refused_by_default() {
    let d = Daemon::start(&BINS);
    let j = pcp_error(
        &BINS.cli_at(
            &d.server(),
            &["map", "tcp", "9000", "--third-party", "127.0.0.9", "--json"],
        ),
        "NOT_AUTHORIZED",
        &d,
    );
    assert_eq!(j["lifetime"], 1800);
    // Nothing was created for 127.0.0.9: it can map the port itself.
    let r = request(v4("127.0.0.9"), d.addr(), &map_builder(9000));
    assert_eq!(r.header.result, ResultCode::SUCCESS, "{r:?}");
}

/// RFC 6887 section 13.1: with `[third_party] allow` covering the client,
/// THIRD_PARTY creates the mapping for the named internal host, and the
/// response echoes the option (section 13: it appeared in the request).
#[test]
fn rfc6887_s13_1_third_party_allowed_by_config() {
    let d = Daemon::with_config(&BINS, "[third_party]\nallow = [\"127.0.0.0/8\"]\n");
    let s = d.server();
    let j = ok_json(
        &BINS.cli_at(
            &s,
            &["map", "tcp", "9000", "--third-party", "127.0.0.9", "--json"],
        ),
        &d,
    );
    let opts = j["options"].as_array().unwrap();
    assert!(
        opts.iter()
            .any(|o| o["name"] == "THIRD_PARTY" && o["value"] == "127.0.0.9"),
        "{j}"
    );
    // The mapping belongs to 127.0.0.9, not to the CLI's own address:
    // 127.0.0.9 itself cannot take it over with another nonce ...
    let r = request(v4("127.0.0.9"), d.addr(), &map_builder(9000));
    assert_eq!(r.header.result, ResultCode::NOT_AUTHORIZED, "{r:?}");
    // ... while the CLI's own address has no mapping on that port.
    let mine = ok_json(&BINS.cli_at(&s, &["map", "tcp", "9000", "--json"]), &d);
    assert_ne!(external_port(&mine), external_port(&j));
    // The third party's creator deletes it with the nonce.
    let n = nonce(&j);
    ok_json(
        &BINS.cli_at(
            &s,
            &[
                "delete",
                "tcp",
                "9000",
                "--nonce",
                &n,
                "--third-party",
                "127.0.0.9",
                "--json",
            ],
        ),
        &d,
    );
    let r = request(v4("127.0.0.9"), d.addr(), &map_builder(9000));
    assert_eq!(r.header.result, ResultCode::SUCCESS, "deleted: {r:?}");
}

// ---------------------------------------------------------------------------
// CHECKPOINT_REQUIRED.

/// RFC 7767 section 3.2: a server that cannot check-point (a standalone
/// server has no backup) still processes the MAP and leaves the option
/// out of the response.
#[test]
fn rfc7767_s3_2_standalone_server_does_not_honour_checkpoint() {
    let d = Daemon::start(&BINS);
    let j = ok_json(
        &BINS.cli_at(
            &d.server(),
            &["map", "tcp", "8443", "--checkpoint", "--json"],
        ),
        &d,
    );
    assert_eq!(j["checkpoint_requested"], true);
    assert_eq!(j["checkpoint_honoured"], false, "{j}");
    assert!(
        j["options"]
            .as_array()
            .unwrap()
            .iter()
            .all(|o| o["code"] != u64::from(OptionCode::CHECKPOINT_REQUIRED.0)),
        "option not echoed: {j}"
    );
    assert_eq!(j["external_ip"], EXTERNAL);
}

// ---------------------------------------------------------------------------
// Lifetimes and expiry.

/// RFC 6887 section 15: the server clamps the requested lifetime into its
/// configured range; when the mapping's lifetime runs out the mapping ends
/// and its external port is held from other hosts for the recycle delay,
/// while its own client (same internal address, port and nonce) may take
/// it back; after the delay it is anyone's.
#[test]
fn rfc6887_s15_mapping_expires_and_frees_its_external_port() {
    let d = Daemon::with_config(
        &BINS,
        "[lifetime]\nmin = 1\nmax = 2\n[limits]\nport_recycle_delay = 2\n",
    );
    let s = d.server();
    // Asking for an hour gets the configured maximum.
    let j = ok_json(
        &BINS.cli_at(&s, &["map", "tcp", "7100", "--lifetime", "3600", "--json"]),
        &d,
    );
    let mapped_at = now();
    assert_eq!(j["lifetime"], 2, "clamped to lifetime.max: {j}");
    let port = external_port(&j);
    let n = nonce(&j);
    let short = ok_json(
        &BINS.cli_at(&s, &["map", "tcp", "7101", "--lifetime", "1", "--json"]),
        &d,
    );
    assert_eq!(short["lifetime"], 1, "{short}");

    // Another host wanting exactly that port: refused while it is held ...
    let probe = |host: &str| {
        request(
            v4(host),
            d.addr(),
            &map_builder(7200)
                .suggest(Some(v4(EXTERNAL)), port)
                .prefer_failure(),
        )
    };
    let r = probe("127.0.0.2");
    assert_eq!(
        r.header.result,
        ResultCode::CANNOT_PROVIDE_EXTERNAL,
        "taken for {:?} of its 2 s: {r:?}",
        mapped_at.elapsed()
    );
    // ... and, once its lifetime has run out, for the recycle delay too.
    std::thread::sleep(Duration::from_millis(2500).saturating_sub(mapped_at.elapsed()));
    let r = probe("127.0.0.3");
    assert_eq!(
        r.header.result,
        ResultCode::CANNOT_PROVIDE_EXTERNAL,
        "port handed on {:?} after a 2 s mapping, within the 2 s delay: {r:?}\n{}",
        mapped_at.elapsed(),
        d.log()
    );
    let counters = d.ctl(&["--json", "counters"]).json();
    assert_eq!(counters["ports_held"], 2, "both expired ports: {counters}");

    // The old owner re-creates with its nonce and its port: the same
    // client reclaims it within the delay.
    let again = ok_json(
        &BINS.cli_at(
            &s,
            &[
                "map",
                "tcp",
                "7100",
                "--nonce",
                &n,
                "--suggest",
                &format!("{EXTERNAL}:{port}"),
                "--lifetime",
                "1",
                "--json",
            ],
        ),
        &d,
    );
    let again_at = now();
    assert_eq!(external_port(&again), port, "{again}");

    // It expires after 1 s; 2 s later the port is anyone's.
    std::thread::sleep(Duration::from_millis(3500).saturating_sub(again_at.elapsed()));
    let r = probe("127.0.0.3");
    assert_eq!(
        r.header.result,
        ResultCode::SUCCESS,
        "port still held {:?} after a 1 s mapping and a 2 s delay: {r:?}\n{}",
        again_at.elapsed(),
        d.log()
    );
    assert_eq!(map_data(&r).external_port, port);
}

// ---------------------------------------------------------------------------
// Header checks.

/// RFC 6887 section 8.2: a request whose client address field is not the
/// packet's source gets ADDRESS_MISMATCH, a long-lifetime error (1800 s by
/// default, section 7.4), with the request copied and the reserved field
/// zeroed (section 7.2: the request was parsed).
#[test]
fn rfc6887_s8_2_address_mismatch() {
    let d = Daemon::start(&BINS);
    let req = map_builder(6000)
        .nonce([0xab; 12])
        .build(v4("127.0.0.77"))
        .unwrap();
    let cp = CodePoints::default();
    let (bytes, from) = exchange(LOCALHOST, d.addr(), &req.to_bytes(&cp).unwrap());
    assert_eq!(from, d.addr());
    assert_eq!(bytes[0], 2, "version");
    assert_eq!(bytes[1], 0x80 | Opcode::MAP.0, "R bit and opcode");
    assert_eq!(bytes[3], ResultCode::ADDRESS_MISMATCH.0, "{bytes:02x?}");
    assert_eq!(bytes[3], 12);
    assert_eq!(u32::from_be_bytes(bytes[4..8].try_into().unwrap()), 1800);
    assert_eq!(&bytes[12..24], &[0; 12], "reserved");
    let r = Response::parse(&bytes, &cp).unwrap();
    assert_eq!(map_data(&r).nonce, [0xab; 12], "request body copied");
    // Nothing was created: the real 127.0.0.77 can map the port.
    let r = request(v4("127.0.0.77"), d.addr(), &map_builder(6000));
    assert_eq!(r.header.result, ResultCode::SUCCESS, "{r:?}");
}

// ---------------------------------------------------------------------------
// Quotas.

/// RFC 6887 section 7.4 (USER_EX_QUOTA, a short-lifetime error): the
/// per-subscriber quota stops the fourth mapping of one host, while
/// another host (another subscriber) is unaffected and renewals of held
/// mappings still work.
#[test]
fn rfc6887_s7_4_user_ex_quota_per_subscriber() {
    let d = Daemon::with_config(&BINS, "[subscribers]\nmax_mappings = 3\n");
    let s = d.server();
    let mut held = Vec::new();
    for port in ["7301", "7302", "7303"] {
        held.push(ok_json(
            &BINS.cli_at(&s, &["map", "tcp", port, "--json"]),
            &d,
        ));
    }
    let j = pcp_error(
        &BINS.cli_at(&s, &["map", "tcp", "7304", "--json"]),
        "USER_EX_QUOTA",
        &d,
    );
    assert_eq!(j["lifetime"], 30, "short-lifetime error: {j}");
    // A PEER would be a fourth mapping too.
    pcp_error(
        &BINS.cli_at(&s, &["peer", "tcp", "7305", "203.0.113.9:443", "--json"]),
        "USER_EX_QUOTA",
        &d,
    );
    // Renewing one already held is not a new mapping.
    let n = nonce(&held[0]);
    let renewed = ok_json(
        &BINS.cli_at(&s, &["map", "tcp", "7301", "--nonce", &n, "--json"]),
        &d,
    );
    assert_eq!(external_port(&renewed), external_port(&held[0]));
    // Another host is another subscriber.
    let r = request(v4("127.0.0.2"), d.addr(), &map_builder(7304));
    assert_eq!(r.header.result, ResultCode::SUCCESS, "{r:?}");
    // Deleting one frees a slot.
    ok_json(
        &BINS.cli_at(
            &s,
            &[
                "delete",
                "tcp",
                "7302",
                "--nonce",
                &nonce(&held[1]),
                "--json",
            ],
        ),
        &d,
    );
    ok_json(&BINS.cli_at(&s, &["map", "tcp", "7304", "--json"]), &d);
}

// ---------------------------------------------------------------------------
// Unsolicited ANNOUNCE.

/// RFC 6887 section 14.1.1: after starting, the server sends unsolicited
/// ANNOUNCE responses (opcode 0, R set, SUCCESS, its new epoch) to the
/// configured clients, from its PCP address, several times.
#[test]
fn rfc6887_s14_1_1_unsolicited_announce_after_start() {
    let client = UdpSocket::bind((LOCALHOST, 0)).unwrap();
    let client_addr = client.local_addr().unwrap();
    let config = format!("[announce]\nunicast = [\"{client_addr}\"]\n");
    let started = now();
    let d = Daemon::with_config(&BINS, &config);
    client
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let cp = CodePoints::default();
    let mut got = Vec::new();
    while started.elapsed() < Duration::from_millis(2200) {
        let mut buf = [0u8; 1100];
        let Ok((n, from)) = client.recv_from(&mut buf) else {
            continue;
        };
        got.push((buf[..n].to_vec(), from, started.elapsed()));
    }
    assert!(
        got.len() >= 2,
        "{} unsolicited ANNOUNCEs within 2 s: {got:?}\n{}",
        got.len(),
        d.log()
    );
    let mut last_epoch = 0;
    for (i, (bytes, from, at)) in got.iter().enumerate() {
        assert_eq!(*from, d.addr(), "sent from the PCP address");
        assert_eq!(bytes.len(), 24, "{bytes:02x?}");
        assert_eq!(bytes[0], 2);
        assert_eq!(bytes[1], 0x80, "R bit, opcode ANNOUNCE");
        let r = Response::parse(bytes, &cp).unwrap();
        assert_eq!(r.header.result, ResultCode::SUCCESS);
        assert_eq!(r.data, OpData::Announce);
        assert!(r.header.epoch >= last_epoch, "epoch goes forward: {got:?}");
        last_epoch = r.header.epoch;
        if i < 2 {
            assert!(
                r.header.epoch <= 1,
                "a fresh server's epoch, got {} at {at:?}",
                r.header.epoch
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Configuration and command line.

#[test]
fn daemon_check_config_accepts_the_example() {
    let path = examples_dir().join("portkeepd.toml");
    let run = BINS.run_daemon_to_exit(
        &["--config", path.to_str().unwrap(), "--check-config"],
        Duration::from_secs(10),
    );
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stdout.starts_with("configuration OK"), "{run:?}");
}

#[test]
fn daemon_config_errors_exit_78_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("unknown.toml", "listne = [\"127.0.0.1\"]\n", "listne"),
        ("type.toml", "[lifetime]\nmin = \"x\"\n", "lifetime.min"),
        ("range.toml", "port_range = \"9-2\"\n", "port_range"),
        (
            "rate.toml",
            "[limits]\nsubscriber_rate = \"5/sec\"\n",
            "limits.subscriber_rate",
        ),
        (
            "burst.toml",
            "[limits]\nsubscriber_rate = \"5/s\"\nsubscriber_burst = 0\n",
            "limits.subscriber_burst",
        ),
    ];
    for (name, text, key) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let p = path.to_str().unwrap();
        for extra in [&["--check-config"][..], &["--listen", "127.0.0.1:0"][..]] {
            let mut args = vec!["--config", p];
            args.extend_from_slice(extra);
            let run = BINS.run_daemon_to_exit(&args, Duration::from_secs(10));
            assert_eq!(run.code, Some(EXIT_CONFIG), "{text:?} {extra:?}: {run:?}");
            assert!(run.stderr.contains(key), "{text:?} names `{key}`: {run:?}");
        }
    }
    let missing = dir.path().join("no-such-file.toml");
    let p = missing.to_str().unwrap();
    let run = BINS.run_daemon_to_exit(
        &["--config", p, "--listen", "127.0.0.1:0"],
        Duration::from_secs(10),
    );
    assert_eq!(run.code, Some(EXIT_CONFIG), "{run:?}");
    assert!(run.stderr.contains(p), "names the path: {run:?}");
}

#[test]
fn daemon_rejects_a_bad_listen_address() {
    let run = BINS.run_daemon_to_exit(&["--listen", "nonsense"], Duration::from_secs(10));
    assert_eq!(
        run.code,
        Some(64),
        "usage errors exit 64 (EX_USAGE): {run:?}"
    );
    assert!(run.stderr.contains("nonsense"), "{run:?}");
    assert!(run.stderr.contains("--listen"), "{run:?}");
}

// ---------------------------------------------------------------------------
// Shutdown.

fn clean_shutdown_on(signal: &str) {
    let mut d = Daemon::start(&BINS);
    // Some state to tear down.
    ok_json(
        &BINS.cli_at(&d.server(), &["map", "udp", "4500", "--json"]),
        &d,
    );
    let status = d.signal_and_wait(signal, Duration::from_secs(2));
    let log = d.log();
    let status = status.unwrap_or_else(|| panic!("still running 2 s after SIG{signal}:\n{log}"));
    assert!(
        status.success(),
        "exit status {status} after SIG{signal}:\n{log}"
    );
}

#[test]
fn daemon_sigterm_exits_0_within_2s() {
    clean_shutdown_on("TERM");
}

#[test]
fn daemon_sigint_exits_0_within_2s() {
    clean_shutdown_on("INT");
}

// ---------------------------------------------------------------------------
// Hostile input.

/// RFC 6887 section 8.2: whatever arrives, the server drops or answers it
/// and keeps serving.
#[test]
fn rfc6887_s8_2_garbage_does_not_hurt_the_daemon() {
    use rand::{Rng, SeedableRng};
    let mut d = Daemon::start(&BINS);
    let cp = CodePoints::default();
    let sock = UdpSocket::bind((LOCALHOST, 0)).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x9a7b);
    for _ in 0..2000 {
        let len = rng.gen_range(0..1200);
        let junk: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        let _ = sock.send_to(&junk, d.addr());
    }
    // Structured garbage: every truncation of a MAP with options, then
    // single-octet corruptions, version and direction games, over-long
    // and misaligned requests, lying option lengths.
    let good = map_builder(6100)
        .description("hello")
        .filter(portkeep_client::filter(v4("198.51.100.0"), 24, 0).unwrap())
        .prefer_failure()
        .build(LOCALHOST)
        .unwrap()
        .to_bytes(&cp)
        .unwrap();
    let mut bad: Vec<Vec<u8>> = (0..good.len()).map(|n| good[..n].to_vec()).collect();
    for _ in 0..500 {
        let mut m = good.clone();
        let i = rng.gen_range(0..m.len());
        m[i] = rng.gen();
        bad.push(m);
    }
    for version in [0u8, 1, 3, 255] {
        let mut m = good.clone();
        m[0] = version;
        bad.push(m);
    }
    let mut r_set = good.clone();
    r_set[1] |= 0x80;
    bad.push(r_set);
    let mut long = good.clone();
    long.resize(1104, 0);
    bad.push(long);
    bad.push(vec![2; 4000]);
    let mut odd = good.clone();
    odd.push(0);
    bad.push(odd);
    let mut lying = good[..60].to_vec();
    lying.extend_from_slice(&[128, 0, 0xff, 0xff, b'x', 0, 0, 0]);
    bad.push(lying);
    for (i, b) in bad.iter().enumerate() {
        let _ = sock.send_to(b, d.addr());
        if i % 200 == 0 {
            // Give a 2-core machine's receive buffer a chance.
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    assert!(d.is_running(), "portkeepd died:\n{}", d.log());
    let j = ok_json(
        &BINS.cli_at(&d.server(), &["map", "tcp", "6200", "--json"]),
        &d,
    );
    assert_eq!(j["external_ip"], EXTERNAL);
    assert_ne!(external_port(&j), 0);
    let r = request(v4("127.0.0.2"), d.addr(), &map_builder(6200));
    assert_eq!(r.header.result, ResultCode::SUCCESS);
    assert!(d.is_running(), "portkeepd died:\n{}", d.log());
}

/// RFC 6887 sections 8.2 and 8.3: an error answer to a request with a
/// malformed option copies that option, so it does not parse as MAP; the
/// client must still recognise it by its nonce and finish with the error
/// instead of retransmitting until it times out.
#[test]
fn rfc6887_s8_3_client_accepts_the_daemons_malformed_option_copy() {
    use rand::SeedableRng;
    let d = Daemon::start(&BINS);
    let cp = CodePoints::default();
    let mut req: Request = map_builder(6300)
        .nonce([0x3c; 12])
        .build(LOCALHOST)
        .unwrap();
    // THIRD_PARTY must be 16 octets long (section 13.1).
    req.options.push(PcpOption::Unknown {
        code: OptionCode::THIRD_PARTY,
        data: vec![127, 0, 0, 9],
    });
    let start = now();
    let mut tx = Transaction::new(
        start,
        &req,
        cp,
        RetransmitParams::default(),
        rand::rngs::StdRng::seed_from_u64(1),
    )
    .unwrap();
    let datagram = tx.poll_transmit(start).unwrap();
    let (reply, _) = exchange(LOCALHOST, d.addr(), &datagram);
    assert_eq!(reply[3], ResultCode::MALFORMED_OPTION.0, "{reply:02x?}");
    assert_eq!(&reply[24..], &datagram[24..], "the request copied");
    assert!(
        tx.handle_input(now(), &reply),
        "ignored: {:?}",
        tx.poll_event()
    );
    match tx.poll_event() {
        Some(portkeep_client::Event::Response { response, .. }) => {
            assert_eq!(response.header.result, ResultCode::MALFORMED_OPTION);
            assert_eq!(response.header.lifetime, 1800);
        }
        other => panic!("expected the response, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// IPv6.

/// RFC 6887 section 5: PCP over IPv6 works the same; the client's IPv6
/// address gets a mapping from the (IPv4) external pool.
#[test]
fn rfc6887_s5_map_over_ipv6_loopback() {
    if !bindable(SocketAddr::new(LOCALHOST6, 0)) {
        skip("MAP over IPv6 loopback", "[::1] is not bindable");
        return;
    }
    let d = Daemon::spawn(
        &BINS,
        &DaemonSpec {
            listen_ips: vec![LOCALHOST6],
            ..DaemonSpec::default()
        },
    );
    assert!(d.addr().is_ipv6());
    let server = format!("[::1]:{}", d.addr().port());
    let j = ok_json(&BINS.cli_at(&server, &["map", "udp", "5353", "--json"]), &d);
    assert_eq!(j["opcode"], "MAP");
    assert_eq!(j["external_ip"], EXTERNAL);
    assert_ne!(external_port(&j), 0);
    let n = nonce(&j);
    let again = ok_json(
        &BINS.cli_at(&server, &["map", "udp", "5353", "--nonce", &n, "--json"]),
        &d,
    );
    assert_eq!(external_port(&again), external_port(&j));
}
