//! A THIRD_PARTY client against the real daemon (RFC 6887 sections 8.5,
//! 13.1 and 14.1.3; failure-scenarios draft section 2.6.1): the client
//! library's session, on a real socket, keeps mappings for three hosts
//! through several renewal cycles while the operator clears one host.

#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use portkeep_client::{MappingId, RequestBuilder, Session, SessionConfig};
use portkeep_proto::{CodePoints, OpData, Protocol, Response};
use portkeep_test_support::daemon::Daemon;
use portkeep_test_support::process::Bins;

static BINS: LazyLock<Bins> = LazyLock::new(|| Bins::from_daemon(env!("CARGO_BIN_EXE_portkeepd")));

/// The hosts the client maps for; each is its own subscriber (one IPv4
/// address per subscriber by default).
const HOSTS: [&str; 3] = ["127.0.0.11", "127.0.0.12", "127.0.0.13"];
/// The lifetime asked for and granted: a renewal every few seconds.
const LIFETIME: u32 = 4;

#[allow(clippy::disallowed_methods)]
fn now() -> Instant {
    Instant::now()
}

/// A datagram the client received.
struct Received {
    from: SocketAddr,
    announce: bool,
}

/// Runs the session on `sock` until `until`, returning what arrived.
fn drive(session: &mut Session, sock: &UdpSocket, until: Instant) -> Vec<Received> {
    let mut got = Vec::new();
    let cp = CodePoints::default();
    loop {
        let t = now();
        session.handle_timeout(t);
        while let Some(d) = session.poll_transmit() {
            sock.send_to(&d, session.server()).unwrap();
        }
        if t >= until {
            return got;
        }
        let wake = session.poll_timeout().unwrap_or(until).min(until);
        let wait = wake
            .saturating_duration_since(t)
            .clamp(Duration::from_millis(1), Duration::from_millis(200));
        sock.set_read_timeout(Some(wait)).unwrap();
        let mut buf = [0u8; 1100];
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            let announce =
                Response::parse(&buf[..n], &cp).is_ok_and(|r| r.data == OpData::Announce);
            got.push(Received { from, announce });
            session.handle_input(now(), from, &buf[..n]);
        }
        while session.poll_event().is_some() {}
    }
}

fn created(d: &Daemon) -> u64 {
    let run = d.ctl(&["--json", "counters"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    run.json()["created"].as_u64().unwrap()
}

#[test]
fn draft_s2_6_1_third_party_client_recreates_exactly_the_cleared_hosts_mapping_once() {
    let d = Daemon::with_config(
        &BINS,
        &format!("[third_party]\nallow = [\"127.0.0.0/8\"]\n[lifetime]\nmin = {LIFETIME}\n"),
    );
    // The client's socket has an ephemeral port: the server's ANNOUNCE
    // must find it there (RFC 6887 section 14.1.3).
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let client_ip: IpAddr = "127.0.0.1".parse().unwrap();
    let mut session = Session::new(
        d.addr(),
        client_ip,
        SessionConfig {
            recreate_jitter: Duration::from_millis(200),
            ..SessionConfig::default()
        },
        7,
    );
    let start = now();
    for (i, h) in HOSTS.iter().enumerate() {
        let req = RequestBuilder::map(Protocol::TCP, 7000 + i as u16)
            .lifetime(LIFETIME)
            .third_party(h.parse().unwrap());
        session.insert(start, i as MappingId, req).unwrap();
    }
    // Two renewal cycles with nothing lost.
    drive(&mut session, &sock, start + Duration::from_secs(5));
    for i in 0..HOSTS.len() {
        assert!(
            session.grant(i as MappingId).is_some(),
            "mapping {i} granted\n{}",
            d.log()
        );
    }
    assert_eq!(session.counters().epoch_failures, 0, "{}", d.log());
    assert_eq!(created(&d), 3);
    // The operator clears one managed host (failure-scenarios draft
    // section 2.6.2).
    let run = d.ctl(&["clear", "--subscriber", &format!("{}/32", HOSTS[0])]);
    assert_eq!(run.code, Some(0), "{run:?}");
    // Four more renewal cycles.
    let got = drive(&mut session, &sock, now() + Duration::from_secs(4 * 2 + 1));
    // Told at once, from the address and port requests go to, at the
    // port its requests come from.
    assert!(
        got.iter().any(|r| r.announce && r.from == d.addr()),
        "an ANNOUNCE from {}\n{}",
        d.addr(),
        d.log()
    );
    // The section 8.5 verdict failed once (no loop), and the server made
    // exactly one mapping anew: the cleared host's.
    assert_eq!(
        session.counters().epoch_failures,
        1,
        "epoch check failures after one clear\n{}",
        d.log()
    );
    assert_eq!(created(&d), 4, "mappings made anew\n{}", d.log());
    let run = d.ctl(&["--json", "mappings"]);
    let list = run.json()["mappings"].as_array().unwrap().clone();
    assert_eq!(list.len(), 3, "{list:?}");
    for h in HOSTS {
        assert!(
            list.iter().any(|m| m["internal_ip"] == h),
            "{h} held: {list:?}"
        );
    }
}

/// The server's table: internal address and port -> external port.
fn held(d: &Daemon) -> std::collections::BTreeMap<(String, u64), String> {
    let run = d.ctl(&["--json", "mappings"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    run.json()["mappings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                (
                    m["internal_ip"].as_str().unwrap().to_owned(),
                    m["internal_port"].as_u64().unwrap(),
                ),
                m["external"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn draft_s2_4_a_managed_host_that_moves_keeps_its_mappings_at_its_new_address() {
    let d = Daemon::with_config(&BINS, "[third_party]\nallow = [\"127.0.0.0/8\"]\n");
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut session = Session::new(
        d.addr(),
        "127.0.0.1".parse().unwrap(),
        SessionConfig {
            recreate_jitter: Duration::from_millis(100),
            ..SessionConfig::default()
        },
        9,
    );
    let (h1, h2, moved) = ("127.0.0.31", "127.0.0.32", "127.0.0.33");
    let start = now();
    for (i, h) in [h1, h1, h2].iter().enumerate() {
        let req = RequestBuilder::map(Protocol::TCP, 7100 + i as u16)
            .lifetime(600)
            .third_party(h.parse().unwrap());
        session.insert(start, i as MappingId, req).unwrap();
    }
    drive(&mut session, &sock, start + Duration::from_secs(1));
    let before = held(&d);
    assert_eq!(before.len(), 3, "{before:?}");
    // h1 moves (a new DHCP lease): the client learns of it.
    let stale = session.set_third_party_host(now(), h1.parse().unwrap(), moved.parse().unwrap());
    assert_eq!(stale.len(), 2);
    for s in &stale {
        sock.send_to(s, d.addr()).unwrap();
    }
    drive(&mut session, &sock, now() + Duration::from_secs(2));
    let after = held(&d);
    let hosts: std::collections::BTreeSet<&str> = after.keys().map(|(h, _)| h.as_str()).collect();
    assert_eq!(
        hosts,
        [h2, moved].into_iter().collect(),
        "the old address holds nothing: {after:?}"
    );
    for port in [7100u64, 7101] {
        assert_eq!(
            after[&(moved.to_owned(), port)],
            before[&(h1.to_owned(), port)],
            "the same external endpoint at the new address"
        );
    }
    assert_eq!(
        after[&(h2.to_owned(), 7102)],
        before[&(h2.to_owned(), 7102)]
    );
}
