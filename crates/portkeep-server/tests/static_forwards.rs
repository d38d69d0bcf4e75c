//! Static port forwards (`ServerConfig::static_forwards`): mappings the
//! operator configures, that never expire and that no client may change
//! or delete (RFC 6887 section 11.3: only the nonce holder may, and no
//! client holds the operator's).

#![allow(clippy::unwrap_used, clippy::panic)]

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use portkeep_proto::addr::to_wire;
use portkeep_proto::natpmp::{NatPmpProtocol, NatPmpReply, NatPmpRequest, NatPmpResult};
use portkeep_proto::{
    CodePoints, MapData, OpData, Protocol, Request, RequestHeader, Response, ResultCode,
};
use portkeep_server::{
    Change, ClearSelector, MappingRecord, Outcome, Restored, Server, ServerConfig, StaticForward,
    Timestamp, STATIC_NONCE,
};

const HOST: &str = "192.168.1.20";
const T0: Timestamp = Timestamp(1_000_000);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn forward() -> StaticForward {
    StaticForward {
        protocol: Protocol::TCP,
        internal: "192.168.1.20:22".parse().unwrap(),
        external: "192.0.2.1:2000".parse().unwrap(),
        description: Some("ssh".into()),
    }
}

fn cfg(forwards: Vec<StaticForward>) -> ServerConfig {
    ServerConfig {
        external_addresses: vec![ip("192.0.2.1")],
        port_min: 2000,
        port_max: 2002,
        max_lifetime: 3600,
        static_forwards: forwards,
        ..ServerConfig::default()
    }
}

/// A server as a node starts serving it.
fn serving(forwards: Vec<StaticForward>) -> Server {
    let mut s = Server::new(cfg(forwards), T0);
    assert!(s.install_static_forwards(T0).is_empty());
    s
}

fn at(s: u64) -> Timestamp {
    Timestamp(T0.0 + s * 1000)
}

fn map(port: u16, lifetime: u32, nonce: [u8; 12]) -> Vec<u8> {
    Request {
        header: RequestHeader {
            lifetime,
            client_ip: to_wire(ip(HOST)),
        },
        data: OpData::Map(MapData {
            nonce,
            protocol: Protocol::TCP,
            internal_port: port,
            external_port: 0,
            external_ip: Ipv6Addr::UNSPECIFIED,
        }),
        options: Vec::new(),
    }
    .to_bytes(&CodePoints::default())
    .unwrap()
}

fn send(s: &mut Server, now: Timestamp, bytes: &[u8]) -> Response {
    let mut out = Vec::new();
    assert_eq!(
        s.handle(now, SocketAddr::new(ip(HOST), 5000), bytes, &mut out),
        Outcome::Reply
    );
    Response::parse(&out, &CodePoints::default()).unwrap()
}

fn the_forward(s: &Server) -> MappingRecord {
    s.mappings()
        .into_iter()
        .find(|m| m.nonce == STATIC_NONCE)
        .expect("the forward is in the table")
}

#[test]
fn rfc6887_s11_3_no_client_renews_or_deletes_a_static_forward() {
    let mut s = serving(vec![forward()]);
    assert_eq!(s.static_forward_count(), 1);
    let m = the_forward(&s);
    assert_eq!(m.external, "192.0.2.1:2000".parse().unwrap());
    assert_eq!(m.description.as_deref(), Some("ssh"));
    // A renewal, a take-over with the operator's nonce itself, a delete.
    for (lifetime, nonce) in [
        (600, [9; 12]),
        (600, STATIC_NONCE),
        (0, STATIC_NONCE),
        (0, [9; 12]),
    ] {
        let r = send(&mut s, at(1), &map(22, lifetime, nonce));
        assert_eq!(
            r.header.result,
            ResultCode::NOT_AUTHORIZED,
            "lifetime {lifetime}"
        );
    }
    // NAT-PMP has no nonce to offer: result 2, "not authorized/refused".
    let mut out = Vec::new();
    let req = NatPmpRequest::Map {
        protocol: NatPmpProtocol::Tcp,
        internal_port: 22,
        suggested_external_port: 0,
        lifetime: 0,
    }
    .to_bytes();
    s.handle(at(1), SocketAddr::new(ip(HOST), 5000), &req, &mut out);
    let NatPmpReply::Map { result, .. } = NatPmpReply::parse(&out).unwrap() else {
        panic!("not a map reply")
    };
    assert_eq!(result, NatPmpResult::NOT_AUTHORIZED);
    assert_eq!(the_forward(&s), m, "the forward is unchanged");
    s.check_invariants().unwrap();
}

#[test]
fn static_forwards_never_expire() {
    let mut s = serving(vec![forward()]);
    s.drain_changes().for_each(drop);
    // Past its lifetime twice over: renewed by the server, and logged so
    // the store and the dataplane follow.
    for t in [3600, 7200, 7201] {
        while let Some(due) = s.poll_timeout().filter(|d| *d <= at(t)) {
            s.handle_timeout(due);
        }
    }
    let m = the_forward(&s);
    assert!(m.expires > at(7201), "{m:?}");
    let logged: Vec<_> = s.drain_changes().map(|c| c.change).collect();
    assert!(logged
        .iter()
        .all(|c| matches!(c, Change::Upserted(r) if r.nonce == STATIC_NONCE)));
    assert_eq!(logged.len(), 2, "{logged:?}");
    s.check_invariants().unwrap();
}

#[test]
fn a_clear_leaves_static_forwards_and_allocation_never_hands_out_their_port() {
    let mut s = serving(vec![forward()]);
    // The pool is 2000-2002 on one address; 2000 is the forward's.
    let a = send(&mut s, at(1), &map(80, 600, [1; 12]));
    let b = send(&mut s, at(1), &map(81, 600, [1; 12]));
    let c = send(&mut s, at(1), &map(82, 600, [1; 12]));
    let port = |r: &Response| match r.data {
        OpData::Map(m) => m.external_port,
        _ => 0,
    };
    assert_eq!(a.header.result, ResultCode::SUCCESS);
    assert_eq!(b.header.result, ResultCode::SUCCESS);
    assert_ne!(port(&a), 2000);
    assert_ne!(port(&b), 2000);
    assert_eq!(c.header.result, ResultCode::NO_RESOURCES);
    s.clear(at(2), ClearSelector::All);
    assert_eq!(s.mapping_count(), 1, "only the forward is left");
    the_forward(&s);
    s.check_invariants().unwrap();
}

fn restored_from(s: &Server, extra: Vec<MappingRecord>) -> Restored {
    let mut mappings = s.mappings();
    mappings.extend(extra);
    Restored {
        anchor: s.anchor(),
        mappings,
        last_seq: s.last_seq(),
        ..Restored::default()
    }
}

#[test]
fn draft_s2_6_a_restore_keeps_configured_forwards_and_drops_unconfigured_ones() {
    let s = serving(vec![forward()]);
    // Restarted with the same configuration: kept as it was, and nobody's
    // epoch moves (it is no duplicate).
    let (mut again, report) =
        Server::restore(cfg(vec![forward()]), at(10), restored_from(&s, vec![]));
    assert!(report.dropped.is_empty() && report.forwards_skipped.is_empty());
    assert_eq!(the_forward(&again), the_forward(&s));
    assert!(again.drain_changes().next().is_none(), "nothing to store");
    assert_eq!(again.epoch_of(at(10), None), 10, "the epoch continues");
    // Restarted after the operator removed it: gone, and the removal logged.
    let (mut gone, _) = Server::restore(cfg(vec![]), at(10), restored_from(&s, vec![]));
    assert_eq!(gone.mapping_count(), 0);
    assert!(gone.drain_changes().any(
        |c| matches!(c.change, Change::Removed { mapping, .. } if mapping.nonce == STATIC_NONCE)
    ));
    gone.check_invariants().unwrap();
}

#[test]
fn a_forward_whose_endpoint_a_client_holds_is_not_installed() {
    // A client was granted 192.0.2.1:2000 before the operator configured
    // the forward on it: the client keeps what it was granted.
    let mut before = serving(vec![]);
    let mut out = Vec::new();
    let mut granted = None;
    for p in 0..50u16 {
        before.handle(
            at(1),
            SocketAddr::new(ip(HOST), 5000),
            &map(100 + p, 600, [3; 12]),
            &mut out,
        );
        let r = Response::parse(&out, &CodePoints::default()).unwrap();
        if let OpData::Map(m) = r.data {
            if m.external_port == 2000 {
                granted = Some(100 + p);
                break;
            }
        }
        before.clear(at(1), ClearSelector::All);
    }
    let port = granted.expect("the allocator handed out 2000 in 50 tries");
    let (s, report) = Server::restore(cfg(vec![forward()]), at(10), restored_from(&before, vec![]));
    assert_eq!(report.forwards_skipped, vec![forward()]);
    assert!(s.mappings().iter().any(|m| m.key.internal_port == port));
    assert!(s.mappings().iter().all(|m| m.nonce != STATIC_NONCE));
    s.check_invariants().unwrap();
}
