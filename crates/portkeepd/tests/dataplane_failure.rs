//! A dataplane that cannot install a mapping: the request is answered
//! NETWORK_FAILURE (RFC 6887 section 7.4) and the mapping does not exist,
//! while the other mappings of the same batch are installed and granted.
//!
//! The `nft` the daemon runs is a stand-in script that refuses any
//! statement naming port 6666 (as nft refuses a statement it cannot
//! apply) and accepts the rest, so the daemon's reaction is tested without
//! root or a real table; the real nftables path is covered by
//! nft_dataplane.rs.

#![allow(clippy::unwrap_used, clippy::panic, clippy::disallowed_methods)]

use std::net::{IpAddr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::sync::LazyLock;
use std::time::Duration;

use portkeep_proto::addr::to_wire;
use portkeep_proto::{
    CodePoints, MapData, OpData, Protocol, Request, RequestHeader, Response, ResultCode,
};
use portkeep_test_support::daemon::{Daemon, DaemonSpec};
use portkeep_test_support::pcp::LOCALHOST;
use portkeep_test_support::process::Bins;

static BINS: LazyLock<Bins> = LazyLock::new(|| Bins::from_daemon(env!("CARGO_BIN_EXE_portkeepd")));

const BAD_PORT: u16 = 6666;

/// Accepts every nft input except a statement that mentions the bad port,
/// which it refuses the way nft does (error on stderr; exit 1 with `-f`).
/// With `-i` it speaks the daemon's session protocol: each batch is
/// followed by a `list` of a table that does not exist, whose error marks
/// the end of the batch's output.
fn fake_nft(dir: &std::path::Path) -> std::path::PathBuf {
    let p = dir.join("nft");
    std::fs::write(
        &p,
        format!(
            r#"#!/bin/sh
if [ "$1" = "-i" ]; then
    while IFS= read -r line; do
        case "$line" in
            "list table inet pksync"*) printf 'Error: No such file or directory\n%s\n^^^^^\n' "$line" >&2 ;;
            *{BAD_PORT}*) printf 'Error: Could not process rule: Invalid argument\n%s\n^^^^^\n' "$line" >&2 ;;
        esac
    done
    exit 0
fi
in=$(cat)
case "$in" in *{BAD_PORT}*) echo "Error: Could not process rule: Invalid argument" >&2; echo "$in" >&2; exit 1 ;; esac
exit 0
"#
        ),
    )
    .unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

fn map_request(client: IpAddr, port: u16, nonce: u8) -> Vec<u8> {
    Request {
        header: RequestHeader {
            lifetime: 3600,
            client_ip: to_wire(client),
        },
        data: OpData::Map(MapData {
            nonce: [nonce; 12],
            protocol: Protocol::TCP,
            internal_port: port,
            // Suggest the internal port, so the bad port is in the
            // external element too.
            external_port: port,
            external_ip: Ipv6Addr::UNSPECIFIED,
        }),
        options: vec![],
    }
    .to_bytes(&CodePoints::default())
    .unwrap()
}

#[test]
fn rfc6887_s7_4_dataplane_failure_is_answered_network_failure_and_undone() {
    let dir = tempfile::tempdir().unwrap();
    let nft = fake_nft(dir.path());
    let d = Daemon::spawn(
        &BINS,
        &DaemonSpec {
            config: Some(&format!(
                "[dataplane]\nkind = \"nftables\"\nnft_path = \"{}\"\nconntrack_cleanup = false\n",
                nft.display()
            )),
            ..DaemonSpec::default()
        },
    );
    let client = LOCALHOST;
    let sock = UdpSocket::bind(SocketAddr::new(client, 0)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    // Ten good requests and the bad one back to back: they share batches,
    // so the failing transaction is split and only the bad change fails.
    let ports: Vec<u16> = (5000..5010).chain([BAD_PORT]).collect();
    for (i, &p) in ports.iter().enumerate() {
        sock.send_to(&map_request(client, p, i as u8 + 1), d.addr())
            .unwrap();
    }
    let mut results = std::collections::HashMap::new();
    let mut buf = [0u8; 1100];
    while results.len() < ports.len() {
        let (n, _) = sock.recv_from(&mut buf).expect("every request answered");
        let r = Response::parse(&buf[..n], &CodePoints::default()).unwrap();
        let m = r.data.map_part().unwrap();
        results.insert(m.internal_port, (r.header.result, r.header.lifetime));
    }
    for p in 5000..5010 {
        assert_eq!(
            results[&p].0,
            ResultCode::SUCCESS,
            "port {p}; log:\n{}",
            d.log()
        );
    }
    let (code, lifetime) = results[&BAD_PORT];
    assert_eq!(code, ResultCode::NETWORK_FAILURE);
    assert_eq!(
        lifetime, 30,
        "a short-lifetime error: the client may retry soon"
    );
    // The server does not hold what the NAT does not do.
    let out = d.ctl(&["--json", "mappings"]);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let held: Vec<u64> = v["mappings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["internal_port"].as_u64().unwrap())
        .collect();
    assert_eq!(held.len(), 10, "{held:?}");
    assert!(!held.contains(&u64::from(BAD_PORT)));
    assert!(
        d.log().contains("Could not process rule"),
        "the failing statement is logged"
    );
    // A retry fails the same way, and nothing is left behind.
    sock.send_to(&map_request(client, BAD_PORT, 11), d.addr())
        .unwrap();
    let (n, _) = sock.recv_from(&mut buf).unwrap();
    let r = Response::parse(&buf[..n], &CodePoints::default()).unwrap();
    assert_eq!(r.header.result, ResultCode::NETWORK_FAILURE);
}
