//! A dataplane that cannot install a mapping: the request is answered
//! NETWORK_FAILURE (RFC 6887 section 7.4) and the mapping does not exist,
//! while the other mappings of the same batch are installed and granted.
//!
//! The daemon runs in a network namespace of its own with the real
//! nftables dataplane; the `nft` it runs (to load the table definition) is
//! a wrapper around the real one that, once the table is defined, puts in
//! a DNAT element for the bad port's external endpoint that points
//! elsewhere. The kernel then refuses the daemon's element for that
//! endpoint (`EEXIST`), as it would refuse any element it cannot take,
//! and the rest of the batch must go in regardless.
//!
//! A renewal the kernel refuses is answered NETWORK_FAILURE too, but the
//! mapping it renews stays, as the NAT still does it, and no epoch moves.
//! Copies of a refused creation answered while its batch was applied are
//! answered NETWORK_FAILURE as well (before the committer rewrote the
//! replies queued behind a refused batch, 973 of 1,000 were grants).
//!
//! Needs root, `ip` and `nft`: under CI (`CI=true`) it fails without them;
//! elsewhere it prints `SKIPPED: <reason>` and passes.

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
use portkeep_test_support::netns::{self, in_ns, Lab};
use portkeep_test_support::pcp::LOCALHOST;
use portkeep_test_support::process::Bins;
use portkeep_test_support::skip::find_tool;

static BINS: LazyLock<Bins> = LazyLock::new(|| Bins::from_daemon(env!("CARGO_BIN_EXE_portkeepd")));

const BAD_PORT: u16 = 6666;

/// The real nft, then, after the table's definition, a DNAT element for
/// the bad port's external endpoint (the default external address) that
/// the daemon's own element for it will clash with.
fn clashing_nft(dir: &std::path::Path) -> std::path::PathBuf {
    let real = find_tool("nft").unwrap();
    let p = dir.join("nft");
    std::fs::write(
        &p,
        format!(
            r#"#!/bin/sh
in=$(cat)
printf '%s\n' "$in" | {real} "$@" || exit $?
case "$in" in
    *"table inet portkeep {{"*)
        exec {real} add element inet portkeep dnat4 '{{ 6 . 192.0.2.1 . {BAD_PORT} : 10.9.9.9 . 9 }}' ;;
esac
"#,
            real = real.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

fn map_request(client: IpAddr, port: u16, nonce: u8) -> Vec<u8> {
    map_with(client, port, nonce, vec![])
}

/// A MAP as [`map_request`] makes it, with `options`.
fn map_with(
    client: IpAddr,
    port: u16,
    nonce: u8,
    options: Vec<portkeep_proto::PcpOption>,
) -> Vec<u8> {
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
        options,
    }
    .to_bytes(&CodePoints::default())
    .unwrap()
}

/// A lab with one namespace, `PREFIX-ID` (`None`: skipped, see
/// `netns::setup`).
fn one_namespace(what: &str, prefix: &str) -> Option<(Lab, String)> {
    netns::setup(what, &["ip", "nft"], || {
        let mut lab = Lab::new(prefix)?;
        let ns = format!("pk{prefix}-{}", lab.id);
        lab.add_ns(&ns)?;
        Ok((lab, ns))
    })
}

/// The mappings the daemon holds, by internal port.
fn held_ports(d: &Daemon) -> Vec<u64> {
    let out = d.ctl(&["--json", "mappings"]);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    v["mappings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["internal_port"].as_u64().unwrap())
        .collect()
}

#[test]
fn rfc6887_s7_4_dataplane_failure_is_answered_network_failure_and_undone() {
    let what = "dataplane failure answered NETWORK_FAILURE";
    let Some((lab, ns)) = one_namespace(what, "df") else {
        return;
    };
    let nft = clashing_nft(&lab.dir);
    // Everything below runs in the namespace: the daemon (a child of this
    // thread), its table, and the client's socket.
    in_ns(&ns, move || exercise(&nft));
    drop(lab);
}

fn exercise(nft: &std::path::Path) {
    let d = Daemon::spawn(
        &BINS,
        &DaemonSpec {
            config: Some(&format!(
                "[dataplane]\nkind = \"nftables\"\nnft_path = \"{}\"\non_stop = \"flush\"\n",
                nft.display()
            )),
            ..DaemonSpec::default()
        },
    );
    let client = LOCALHOST;
    let sock = UdpSocket::bind(SocketAddr::new(client, 0)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    // Ten good requests and the bad one back to back: they share batches,
    // so the refused element fails its own change and no other.
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
    assert_eq!(code, ResultCode::NETWORK_FAILURE, "log:\n{}", d.log());
    assert_eq!(
        lifetime, 30,
        "a short-lifetime error: the client may retry soon"
    );
    // The server does not hold what the NAT does not do.
    let held = held_ports(&d);
    assert_eq!(held.len(), 10, "{held:?}");
    assert!(!held.contains(&u64::from(BAD_PORT)));
    assert!(
        d.log().contains("192.0.2.1 . 6666") && d.log().contains("File exists"),
        "the refused element and the kernel's reason are logged:\n{}",
        d.log()
    );
    // A retry fails the same way, and nothing is left behind.
    sock.send_to(&map_request(client, BAD_PORT, 11), d.addr())
        .unwrap();
    let (n, _) = sock.recv_from(&mut buf).unwrap();
    let r = Response::parse(&buf[..n], &CodePoints::default()).unwrap();
    assert_eq!(r.header.result, ResultCode::NETWORK_FAILURE);
}

/// FILTER (RFC 6887 section 13.3) for an IPv4 prefix, any port.
fn filter(prefix: [u8; 4], len: u8) -> portkeep_proto::PcpOption {
    portkeep_proto::PcpOption::Filter(portkeep_proto::Filter {
        prefix_len: 96 + len,
        remote_port: 0,
        remote_ip: std::net::Ipv4Addr::from(prefix).to_ipv6_mapped(),
    })
}

#[test]
fn rfc6887_s7_4_a_refused_renewal_keeps_the_mapping_and_the_epoch() {
    let what = "refused renewal keeps the mapping";
    let Some((lab, ns)) = one_namespace(what, "dr") else {
        return;
    };
    let nft = find_tool("nft").unwrap();
    in_ns(&ns, move || refused_renewal(&nft));
    drop(lab);
}

fn refused_renewal(nft: &std::path::Path) {
    const PORT: u16 = 5100;
    let d = Daemon::spawn(
        &BINS,
        &DaemonSpec {
            config: Some("[dataplane]\nkind = \"nftables\"\non_stop = \"flush\"\n"),
            ..DaemonSpec::default()
        },
    );
    let client = LOCALHOST;
    let sock = UdpSocket::bind(SocketAddr::new(client, 0)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let ask = |options: Vec<portkeep_proto::PcpOption>| {
        sock.send_to(&map_with(client, PORT, 1, options), d.addr())
            .unwrap();
        let mut buf = [0u8; 1100];
        let (n, _) = sock.recv_from(&mut buf).expect("answered");
        Response::parse(&buf[..n], &CodePoints::default()).unwrap()
    };
    let made = ask(vec![filter([203, 0, 113, 0], 24)]);
    assert_eq!(made.header.result, ResultCode::SUCCESS, "{}", d.log());
    let ext = made.data.map_part().unwrap().external_port;
    let mut tracker = portkeep_client::EpochTracker::new();
    tracker.observe(std::time::Instant::now(), made.header.epoch);
    // An element the renewal's new filter will overlap: the kernel refuses
    // the daemon's.
    let clash = format!(
        "add element inet portkeep allow4 {{ 6 . 192.0.2.1 . {ext} . 198.51.100.0-198.51.100.127 . 0-65535 }}"
    );
    let out = std::process::Command::new(nft)
        .arg(&clash)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    std::thread::sleep(Duration::from_millis(2200));
    let renewed = ask(vec![filter([198, 51, 100, 0], 24)]);
    assert_eq!(
        renewed.header.result,
        ResultCode::NETWORK_FAILURE,
        "{}",
        d.log()
    );
    assert_eq!(renewed.header.lifetime, 30);
    assert_eq!(
        tracker.observe(std::time::Instant::now(), renewed.header.epoch),
        portkeep_client::EpochVerdict::Valid,
        "nothing lost: the epoch continues"
    );
    // The server still holds it, and the NAT still forwards it.
    let held = held_ports(&d);
    assert_eq!(held, vec![u64::from(PORT)], "{}", d.log());
    let list = std::process::Command::new(nft)
        .args(["list", "map", "inet", "portkeep", "dnat4"])
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(
        list.contains(&format!("192.0.2.1 . {ext}")),
        "still installed: {list}"
    );
    // Once the clash is gone, the next renewal goes in: same endpoint,
    // and still no reset.
    let del = clash.replacen("add", "delete", 1);
    let out = std::process::Command::new(nft).arg(&del).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let again = ask(vec![]);
    assert_eq!(again.header.result, ResultCode::SUCCESS, "{}", d.log());
    assert_eq!(again.data.map_part().unwrap().external_port, ext);
    assert_eq!(
        tracker.observe(std::time::Instant::now(), again.header.epoch),
        portkeep_client::EpochVerdict::Valid
    );
}

/// RFC 6887 section 7.4: a creation the kernel refuses is answered
/// NETWORK_FAILURE, and so is every copy of it (a retransmission, a
/// duplicate) the server answered while the refused batch was applied:
/// those waited in the committer's queue behind it, answered from the
/// mapping the refusal then took back, and must not leave as grants.
#[test]
fn rfc6887_s7_4_no_copy_of_a_refused_creation_is_granted() {
    let what = "copies of a refused creation answered NETWORK_FAILURE";
    let Some((lab, ns)) = one_namespace(what, "dq") else {
        return;
    };
    let nft = clashing_nft(&lab.dir);
    in_ns(&ns, move || copies_of_a_refused_creation(&nft));
    drop(lab);
}

fn copies_of_a_refused_creation(nft: &std::path::Path) {
    let d = Daemon::spawn(
        &BINS,
        &DaemonSpec {
            config: Some(&format!(
                "[dataplane]\nkind = \"nftables\"\nnft_path = \"{}\"\non_stop = \"flush\"\n",
                nft.display()
            )),
            ..DaemonSpec::default()
        },
    );
    let client = LOCALHOST;
    let sock = UdpSocket::bind(SocketAddr::new(client, 0)).unwrap();
    let _ = socket2::SockRef::from(&sock).set_recv_buffer_size(8 << 20);
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    // One request sent many times back to back: the first creates the
    // mapping and its batch is refused; copies the server answers while
    // that batch is being applied find the mapping and renew it.
    let req = map_request(client, BAD_PORT, 7);
    const COPIES: usize = 1_000;
    for _ in 0..COPIES {
        sock.send_to(&req, d.addr()).unwrap();
    }
    let mut codes = std::collections::BTreeMap::<u8, usize>::new();
    let mut buf = [0u8; 1100];
    while let Ok((n, _)) = sock.recv_from(&mut buf) {
        let r = Response::parse(&buf[..n], &CodePoints::default()).unwrap();
        *codes.entry(r.header.result.0).or_default() += 1;
    }
    eprintln!("replies by result code: {codes:?}");
    assert!(
        codes.contains_key(&ResultCode::NETWORK_FAILURE.0),
        "{codes:?}\n{}",
        d.log()
    );
    assert_eq!(
        codes.get(&ResultCode::SUCCESS.0),
        None,
        "a copy granted a mapping the NAT refused: {codes:?}"
    );
    assert!(!held_ports(&d).contains(&u64::from(BAD_PORT)));
}
