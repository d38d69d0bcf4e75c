//! The `portkeep` command line speaking NAT-PMP (RFC 6886) to a real
//! `portkeepd` on loopback: forced with `--natpmp`, and as the automatic
//! fall-back when the server answers PCP as a NAT-PMP-only gateway
//! (`[natpmp] only`, RFC 6887 section 9 step 4 and appendix A).

#![allow(clippy::unwrap_used, clippy::panic, clippy::disallowed_methods)]

use std::sync::LazyLock;

use portkeep_test_support::daemon::Daemon;
use portkeep_test_support::process::Bins;

static BINS: LazyLock<Bins> = LazyLock::new(|| Bins::from_cli(env!("CARGO_BIN_EXE_portkeep")));

const CONFIG: &str = "external_addresses = [\"192.0.2.7\"]\nport_range = \"40000-40999\"\n";

fn nonces(d: &Daemon) -> Vec<String> {
    let m = d.ctl(&["--json", "mappings"]).json();
    m["mappings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["nonce"].as_str().unwrap().to_owned())
        .collect()
}

/// RFC 6886 sections 3.2 to 3.4 from our client: the external address, a
/// TCP mapping with the suggested port (made with NAT-PMP's ownership in
/// the server's table), and its deletion.
#[test]
fn rfc6886_portkeep_natpmp_maps_and_deletes() {
    let d = Daemon::with_config(&BINS, CONFIG);
    let server = d.server();
    let r = BINS.cli_at(&server, &["--natpmp", "announce"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(r.stdout.contains("external address 192.0.2.7"), "{r:?}");
    let r = BINS.cli_at(
        &server,
        &[
            "--natpmp",
            "--json",
            "map",
            "tcp",
            "8080",
            "--suggest",
            ":40123",
            "--lifetime",
            "600",
        ],
    );
    assert_eq!(r.code, Some(0), "{r:?}");
    let j = r.json();
    assert_eq!(j["protocol"], "nat-pmp");
    assert_eq!(j["external"], "192.0.2.7:40123");
    assert_eq!(j["lifetime"], 600);
    assert_eq!(nonces(&d), [hex::encode(b"NAT-PMP\0\0\0\0\0")]);
    let r = BINS.cli_at(&server, &["--natpmp", "delete", "tcp", "8080"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(r.stdout.contains("deleted"), "{r:?}");
    assert!(nonces(&d).is_empty());
    // What NAT-PMP cannot say is refused before anything is sent.
    let r = BINS.cli_at(&server, &["--natpmp", "map", "tcp", "8080", "--checkpoint"]);
    assert_eq!(r.code, Some(64), "{r:?}");
    assert!(r.stderr.contains("--checkpoint"), "{r:?}");
}

/// A NAT-PMP refusal exits 2 and names the result: a mapping PCP made is
/// not NAT-PMP's to renew (result 2).
#[test]
fn rfc6886_s3_5_a_natpmp_error_exits_2() {
    let d = Daemon::with_config(&BINS, CONFIG);
    let server = d.server();
    let r = BINS.cli_at(&server, &["map", "tcp", "9090"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    let r = BINS.cli_at(&server, &["--natpmp", "map", "tcp", "9090"]);
    assert_eq!(r.code, Some(2), "{r:?}");
    assert!(r.stderr.contains("NAT-PMP result 2"), "{r:?}");
}

/// RFC 6887 section 9 step 4: a server that speaks NAT-PMP only answers a
/// PCP MAP with version 0; `portkeep map` asks again in NAT-PMP at once,
/// and gets the mapping (not a 10 s timeout).
#[test]
fn rfc6887_s9_a_natpmp_only_server_gets_the_request_in_natpmp() {
    let d = Daemon::with_config(&BINS, &format!("{CONFIG}[natpmp]\nonly = true\n"));
    let server = d.server();
    let started = std::time::Instant::now();
    let r = BINS.cli_at(&server, &["--json", "map", "udp", "5353"]);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(r.stderr.contains("answers NAT-PMP only"), "{r:?}");
    let j = r.json();
    assert_eq!(j["protocol"], "nat-pmp");
    assert_eq!(j["proto"], "udp");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(4),
        "fell back late"
    );
    assert_eq!(nonces(&d).len(), 1);
    // A PEER cannot be said in NAT-PMP: the PCP error stands.
    let r = BINS.cli_at(&server, &["peer", "udp", "5353", "198.51.100.1:3478"]);
    assert_ne!(r.code, Some(0), "{r:?}");
    assert!(r.stderr.contains("does not speak PCP"), "{r:?}");
}
