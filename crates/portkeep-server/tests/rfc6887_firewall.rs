//! The server as a firewall for configured IPv6 prefixes (RFC 6887
//! section 1: "the external address is the internal address"), beside
//! NAT for everyone else.

#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use portkeep_proto::addr::{from_wire, to_wire};
use portkeep_proto::{
    CodePoints, MapData, OpData, PcpOption, PeerData, Protocol, Request, RequestHeader, Response,
    ResultCode,
};
use portkeep_server::{MappingKind, Outcome, Prefix, Restored, Server, ServerConfig, Timestamp};

const T0: Timestamp = Timestamp(1_700_000_000_000);
const HOST: &str = "2001:db8:1::10";
const NAT66_HOST: &str = "2001:db8:99::10";

fn at(secs: u64) -> Timestamp {
    Timestamp(T0.0 + secs * 1000)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn cfg() -> ServerConfig {
    ServerConfig {
        external_addresses: vec![ip("192.0.2.1"), ip("2001:db8:ffff::1")],
        port_min: 20000,
        port_max: 20999,
        firewall_prefixes: vec!["2001:db8:1::/48".parse::<Prefix>().unwrap()],
        ..ServerConfig::default()
    }
}

fn data(proto: Protocol, port: u16, suggested: Option<SocketAddr>) -> MapData {
    MapData {
        nonce: [7; 12],
        protocol: proto,
        internal_port: port,
        external_port: suggested.map_or(0, |s| s.port()),
        external_ip: suggested.map_or(Ipv6Addr::UNSPECIFIED, |s| to_wire(s.ip())),
    }
}

fn send(
    s: &mut Server,
    now: Timestamp,
    client: &str,
    life: u32,
    op: OpData,
    o: Vec<PcpOption>,
) -> Response {
    let req = Request {
        header: RequestHeader {
            lifetime: life,
            client_ip: to_wire(ip(client)),
        },
        data: op,
        options: o,
    }
    .to_bytes(&CodePoints::default())
    .unwrap();
    let mut out = Vec::new();
    let from = SocketAddr::new(ip(client), 5000);
    assert_eq!(s.handle(now, from, &req, &mut out), Outcome::Reply);
    Response::parse(&out, &CodePoints::default()).unwrap()
}

fn ext(r: &Response) -> SocketAddr {
    let m = r.data.map_part().unwrap();
    SocketAddr::new(from_wire(m.external_ip), m.external_port)
}

fn own(port: u16) -> SocketAddr {
    SocketAddr::new(ip(HOST), port)
}

#[test]
fn rfc6887_s11_3_firewalled_host_gets_its_own_endpoint() {
    let mut s = Server::new(cfg(), T0);
    let r = send(
        &mut s,
        T0,
        HOST,
        600,
        OpData::Map(data(Protocol::TCP, 8080, None)),
        vec![],
    );
    assert_eq!(r.header.result, ResultCode::SUCCESS);
    assert_eq!(ext(&r), own(8080));
    // A suggestion of another endpoint is a hint the firewall cannot follow
    // (section 11.3)...
    let other = Some("[2001:db8:ffff::1]:20001".parse().unwrap());
    let r = send(
        &mut s,
        T0,
        HOST,
        600,
        OpData::Map(data(Protocol::UDP, 53, other)),
        vec![],
    );
    assert_eq!(ext(&r), own(53));
    // ...and with PREFER_FAILURE it fails (section 13.2).
    let r = send(
        &mut s,
        T0,
        HOST,
        600,
        OpData::Map(data(Protocol::UDP, 54, other)),
        vec![PcpOption::PreferFailure],
    );
    assert_eq!(r.header.result, ResultCode::CANNOT_PROVIDE_EXTERNAL);
    // All ports and all protocols: the whole address, port 0.
    let r = send(
        &mut s,
        T0,
        HOST,
        600,
        OpData::Map(data(Protocol::ALL, 0, None)),
        vec![],
    );
    assert_eq!(ext(&r), own(0));
    // A host outside the prefixes still gets a pool endpoint (NAT66).
    let r = send(
        &mut s,
        T0,
        NAT66_HOST,
        600,
        OpData::Map(data(Protocol::TCP, 8080, None)),
        vec![],
    );
    assert_eq!(ext(&r).ip(), ip("2001:db8:ffff::1"));
    assert_ne!(ext(&r).port(), 0);
    // Identity mappings hold no pool port: another firewalled host may
    // have the same port number.
    let r = send(
        &mut s,
        T0,
        "2001:db8:1::11",
        600,
        OpData::Map(data(Protocol::TCP, 8080, None)),
        vec![],
    );
    assert_eq!(ext(&r), "[2001:db8:1::11]:8080".parse().unwrap());
    s.check_invariants().unwrap();
    let maps = s.mappings();
    assert!(maps
        .iter()
        .any(|m| m.external == own(8080) && m.key.internal_port == 8080));
}

#[test]
fn rfc6887_s12_3_peer_of_firewalled_host_does_not_translate() {
    let mut s = Server::new(cfg(), T0);
    let peer = OpData::Peer(PeerData {
        map: data(Protocol::TCP, 40000, None),
        remote_port: 443,
        remote_ip: to_wire(ip("2001:db8:2::1")),
    });
    let r = send(&mut s, T0, HOST, 600, peer, vec![]);
    assert_eq!(r.header.result, ResultCode::SUCCESS);
    assert_eq!(ext(&r), own(40000));
    let m = s.mappings();
    assert!(matches!(m[0].kind, MappingKind::Peer { .. }));
    assert_eq!(m[0].external, own(40000));
    s.check_invariants().unwrap();
}

#[test]
fn rfc6887_s15_delete_and_expiry_release_identity_mappings() {
    let mut s = Server::new(cfg(), T0);
    send(
        &mut s,
        T0,
        HOST,
        200,
        OpData::Map(data(Protocol::TCP, 22, None)),
        vec![],
    );
    send(
        &mut s,
        T0,
        HOST,
        600,
        OpData::Map(data(Protocol::TCP, 80, None)),
        vec![],
    );
    let r = send(
        &mut s,
        T0,
        HOST,
        0,
        OpData::Map(data(Protocol::TCP, 80, None)),
        vec![],
    );
    assert_eq!(r.header.result, ResultCode::SUCCESS);
    assert_eq!(s.mappings().len(), 1);
    s.handle_timeout(at(201));
    assert!(s.mappings().is_empty());
    s.check_invariants().unwrap();
    // And again: the released identity binding is created anew.
    let r = send(
        &mut s,
        at(202),
        HOST,
        600,
        OpData::Map(data(Protocol::TCP, 22, None)),
        vec![],
    );
    assert_eq!(ext(&r), own(22));
    s.check_invariants().unwrap();
}

fn snapshot(s: &Server) -> Restored {
    Restored {
        anchor: s.anchor(),
        subscriber_anchors: s.subscriber_anchors(),
        mappings: s.mappings(),
        last_seq: s.last_seq(),
        term: 0,
        owed: s.owed_announces(Timestamp(0)),
        requesters: Vec::new(),
        holds: s.port_holds(),
    }
}

#[test]
fn draft_s2_6_restore_keeps_identity_mappings_and_drops_stale_ones() {
    let mut a = Server::new(cfg(), T0);
    send(
        &mut a,
        T0,
        HOST,
        600,
        OpData::Map(data(Protocol::TCP, 80, None)),
        vec![],
    );
    send(
        &mut a,
        T0,
        NAT66_HOST,
        600,
        OpData::Map(data(Protocol::TCP, 80, None)),
        vec![],
    );
    let (b, report) = Server::restore(cfg(), at(1), snapshot(&a));
    assert!(report.dropped.is_empty());
    assert_eq!(b.mappings(), a.mappings());
    b.check_invariants().unwrap();
    // The NAT66 host's prefix becomes firewalled: its translated mapping
    // cannot stand, the identity one stays.
    let mut wider = cfg();
    wider.firewall_prefixes = vec!["2001:db8::/32".parse().unwrap()];
    let (c, report) = Server::restore(wider, at(1), snapshot(&a));
    assert_eq!(report.dropped.len(), 1);
    assert_eq!(report.dropped[0].key.internal_ip, ip(NAT66_HOST));
    assert_eq!(c.mappings().len(), 1);
    c.check_invariants().unwrap();
    // No longer firewalled: an identity mapping (outside the pool) is
    // dropped too.
    let mut none = cfg();
    none.firewall_prefixes.clear();
    let (d, report) = Server::restore(none, at(1), snapshot(&a));
    assert_eq!(report.dropped.len(), 1);
    assert_eq!(report.dropped[0].key.internal_ip, ip(HOST));
    d.check_invariants().unwrap();
}
