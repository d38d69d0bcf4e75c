//! NAT-PMP (RFC 6886) answered by the server core on the PCP port, into
//! the one mapping table (../shared/spec/NATPMP.md section 9.5).

#![allow(clippy::unwrap_used, clippy::panic)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use portkeep_proto::addr::to_wire;
use portkeep_proto::natpmp::{NatPmpProtocol, NatPmpReply, NatPmpRequest, NatPmpResult};
use portkeep_proto::{
    CodePoints, MapData, OpData, Protocol, Request, RequestHeader, Response, ResultCode,
};
use portkeep_server::{
    BackupState, CheckpointClass, CheckpointMode, CheckpointPolicy, ClearSelector, Outcome, Server,
    ServerConfig, Timestamp,
};

const HOST: &str = "192.168.1.20";
const T0: Timestamp = Timestamp(1_000_000);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn cfg() -> ServerConfig {
    ServerConfig {
        external_addresses: vec![ip("192.0.2.1")],
        port_min: 20000,
        port_max: 20999,
        ..ServerConfig::default()
    }
}

fn server() -> Server {
    Server::new(cfg(), T0)
}

fn at(s: u64) -> Timestamp {
    Timestamp(T0.0 + s * 1000)
}

fn send(s: &mut Server, now: Timestamp, from: &str, bytes: &[u8]) -> Option<NatPmpReply> {
    let mut out = Vec::new();
    match s.handle(now, SocketAddr::new(ip(from), 5000), bytes, &mut out) {
        Outcome::Reply => Some(NatPmpReply::parse(&out).unwrap()),
        Outcome::Drop => None,
    }
}

fn map(proto: NatPmpProtocol, internal: u16, suggested: u16, lifetime: u32) -> Vec<u8> {
    NatPmpRequest::Map {
        protocol: proto,
        internal_port: internal,
        suggested_external_port: suggested,
        lifetime,
    }
    .to_bytes()
}

/// (result, external port, lifetime, epoch) of a map reply.
fn mapped(r: Option<NatPmpReply>) -> (NatPmpResult, u16, u32, u32) {
    match r {
        Some(NatPmpReply::Map {
            result,
            external_port,
            lifetime,
            epoch,
            ..
        }) => (result, external_port, lifetime, epoch),
        other => panic!("not a map reply: {other:?}"),
    }
}

fn pcp_map(s: &mut Server, now: Timestamp, port: u16, nonce: u8, lifetime: u32) -> Response {
    let req = Request {
        header: RequestHeader {
            lifetime,
            client_ip: to_wire(ip(HOST)),
        },
        data: OpData::Map(MapData {
            nonce: [nonce; 12],
            protocol: Protocol::TCP,
            internal_port: port,
            external_port: 0,
            external_ip: Ipv6Addr::UNSPECIFIED,
        }),
        options: vec![],
    }
    .to_bytes(&CodePoints::default())
    .unwrap();
    let mut out = Vec::new();
    s.handle(now, SocketAddr::new(ip(HOST), 5000), &req, &mut out);
    Response::parse(&out, &CodePoints::default()).unwrap()
}

#[test]
fn rfc6886_s3_2_external_address_and_the_hosts_epoch() {
    let mut s = server();
    let r = send(
        &mut s,
        at(5),
        HOST,
        &NatPmpRequest::ExternalAddress.to_bytes(),
    );
    assert_eq!(
        r,
        Some(NatPmpReply::ExternalAddress {
            result: NatPmpResult::SUCCESS,
            epoch: 5,
            address: Ipv4Addr::new(192, 0, 2, 1),
        })
    );
}

#[test]
fn rfc6886_s3_3_map_creates_and_a_retransmission_or_renewal_keeps_the_port() {
    let mut s = server();
    let (res, port, life, _) = mapped(send(
        &mut s,
        T0,
        HOST,
        &map(NatPmpProtocol::Tcp, 8080, 0, 7200),
    ));
    assert_eq!(res, NatPmpResult::SUCCESS);
    assert!((20000..=20999).contains(&port));
    assert_eq!(life, 7200);
    let again = mapped(send(
        &mut s,
        at(1),
        HOST,
        &map(NatPmpProtocol::Tcp, 8080, 0, 7200),
    ));
    assert_eq!(
        (again.0, again.1),
        (NatPmpResult::SUCCESS, port),
        "idempotent"
    );
    let renewed = mapped(send(
        &mut s,
        at(3600),
        HOST,
        &map(NatPmpProtocol::Tcp, 8080, port, 7200),
    ));
    assert_eq!((renewed.0, renewed.1), (NatPmpResult::SUCCESS, port));
    assert_eq!(s.mapping_count(), 1);
    // UDP is a mapping of its own (section 3.3: never made implicitly).
    let udp = mapped(send(
        &mut s,
        at(3600),
        HOST,
        &map(NatPmpProtocol::Udp, 8080, 0, 7200),
    ));
    assert_eq!(udp.0, NatPmpResult::SUCCESS);
    assert_eq!(s.mapping_count(), 2);
}

#[test]
fn rfc6886_s3_3_suggested_port_is_honoured_when_free() {
    let mut s = server();
    let r = mapped(send(
        &mut s,
        T0,
        HOST,
        &map(NatPmpProtocol::Udp, 4000, 20500, 3600),
    ));
    assert_eq!((r.0, r.1), (NatPmpResult::SUCCESS, 20500));
}

#[test]
fn rfc6886_s3_3_lifetime_never_more_than_asked_and_clamped_to_the_maximum() {
    let mut s = server();
    // Below PCP's 120 s minimum: NAT-PMP "SHOULD NOT" grant more.
    let r = mapped(send(&mut s, T0, HOST, &map(NatPmpProtocol::Tcp, 1, 0, 30)));
    assert_eq!((r.0, r.2), (NatPmpResult::SUCCESS, 30));
    let r = mapped(send(
        &mut s,
        T0,
        HOST,
        &map(NatPmpProtocol::Tcp, 2, 0, 10_000_000),
    ));
    assert_eq!(r.2, 24 * 3600);
    // And it expires when said.
    s.handle_timeout(T0 + Duration::from_secs(31));
    assert_eq!(s.mapping_count(), 1);
}

#[test]
fn rfc6886_s3_4_lifetime_zero_deletes_and_deleting_nothing_succeeds() {
    let mut s = server();
    let (_, port, _, _) = mapped(send(
        &mut s,
        T0,
        HOST,
        &map(NatPmpProtocol::Tcp, 8080, 0, 7200),
    ));
    assert_ne!(port, 0);
    let r = mapped(send(
        &mut s,
        at(1),
        HOST,
        &map(NatPmpProtocol::Tcp, 8080, 0, 0),
    ));
    assert_eq!((r.0, r.1, r.2), (NatPmpResult::SUCCESS, 0, 0));
    assert_eq!(s.mapping_count(), 0);
    let r = mapped(send(
        &mut s,
        at(2),
        HOST,
        &map(NatPmpProtocol::Tcp, 8080, 0, 0),
    ));
    assert_eq!(
        (r.0, r.1, r.2),
        (NatPmpResult::SUCCESS, 0, 0),
        "identical response"
    );
}

#[test]
fn rfc6886_s3_4_delete_all_removes_the_hosts_natpmp_mappings_of_the_protocol() {
    let mut s = server();
    for p in [1, 2, 3] {
        mapped(send(
            &mut s,
            T0,
            HOST,
            &map(NatPmpProtocol::Tcp, p, 0, 7200),
        ));
    }
    mapped(send(
        &mut s,
        T0,
        HOST,
        &map(NatPmpProtocol::Udp, 1, 0, 7200),
    ));
    mapped(send(
        &mut s,
        T0,
        "192.168.1.21",
        &map(NatPmpProtocol::Tcp, 1, 0, 7200),
    ));
    let r = mapped(send(
        &mut s,
        at(1),
        HOST,
        &map(NatPmpProtocol::Tcp, 0, 0, 0),
    ));
    assert_eq!(r.0, NatPmpResult::SUCCESS);
    assert_eq!(
        s.mapping_count(),
        2,
        "the host's UDP one and the other host's stay"
    );
    // With a mapping PCP made among them, the rest go and the answer is
    // not a success (section 3.4).
    mapped(send(
        &mut s,
        at(2),
        HOST,
        &map(NatPmpProtocol::Tcp, 5, 0, 7200),
    ));
    assert_eq!(
        pcp_map(&mut s, at(2), 6, 9, 600).header.result,
        ResultCode::SUCCESS
    );
    let r = mapped(send(
        &mut s,
        at(3),
        HOST,
        &map(NatPmpProtocol::Tcp, 0, 0, 0),
    ));
    assert_eq!(r.0, NatPmpResult::NOT_AUTHORIZED);
    assert_eq!(
        s.mapping_count(),
        3,
        "the PCP mapping stays, the NAT-PMP one went"
    );
}

#[test]
fn natpmp_s9_5_a_natpmp_refresh_or_delete_of_a_pcp_mapping_is_refused_with_result_2() {
    let mut s = server();
    let pcp = pcp_map(&mut s, T0, 8080, 9, 600);
    assert_eq!(pcp.header.result, ResultCode::SUCCESS);
    let r = mapped(send(
        &mut s,
        at(1),
        HOST,
        &map(NatPmpProtocol::Tcp, 8080, 0, 7200),
    ));
    assert_eq!((r.0, r.1, r.2), (NatPmpResult::NOT_AUTHORIZED, 0, 0));
    let r = mapped(send(
        &mut s,
        at(1),
        HOST,
        &map(NatPmpProtocol::Tcp, 8080, 0, 0),
    ));
    assert_eq!(r.0, NatPmpResult::NOT_AUTHORIZED);
    assert_eq!(s.mapping_count(), 1);
}

#[test]
fn natpmp_s9_5_a_pcp_request_takes_over_a_natpmp_mapping() {
    let mut s = server();
    let (_, port, _, _) = mapped(send(
        &mut s,
        T0,
        HOST,
        &map(NatPmpProtocol::Tcp, 8080, 0, 7200),
    ));
    let r = pcp_map(&mut s, at(1), 8080, 9, 600);
    assert_eq!(r.header.result, ResultCode::SUCCESS);
    assert_eq!(
        r.data.map_part().unwrap().external_port,
        port,
        "the same mapping"
    );
    assert_eq!(s.mapping_count(), 1);
    // Now PCP's: NAT-PMP may not touch it, and another nonce may not.
    let n = mapped(send(
        &mut s,
        at(2),
        HOST,
        &map(NatPmpProtocol::Tcp, 8080, 0, 7200),
    ));
    assert_eq!(n.0, NatPmpResult::NOT_AUTHORIZED);
    assert_eq!(
        pcp_map(&mut s, at(2), 8080, 10, 600).header.result,
        ResultCode::NOT_AUTHORIZED
    );
    assert_eq!(
        pcp_map(&mut s, at(2), 8080, 9, 600).header.result,
        ResultCode::SUCCESS
    );
}

#[test]
fn rfc6886_s3_5_unknown_opcode_and_responses() {
    let mut s = server();
    assert_eq!(
        send(&mut s, at(4), HOST, &[0, 9, 0, 0]),
        Some(NatPmpReply::Other {
            opcode: 9,
            result: NatPmpResult::UNSUPPORTED_OPCODE,
            epoch: 4
        })
    );
    assert_eq!(
        send(&mut s, T0, HOST, &[0, 128, 0, 0, 0, 0, 0, 0]),
        None,
        "a response is dropped"
    );
    assert_eq!(
        send(&mut s, T0, HOST, &[0, 1, 0, 0]),
        None,
        "a short map request is dropped"
    );
    assert_eq!(send(&mut s, T0, HOST, &[0]), None);
    let r = mapped(send(&mut s, T0, HOST, &map(NatPmpProtocol::Tcp, 0, 0, 60)));
    assert_eq!(
        r.0,
        NatPmpResult::NOT_AUTHORIZED,
        "internal port 0 with a lifetime"
    );
}

/// RFC 6886 section 3.6: the seconds since start of epoch restart when the
/// host's mapping state was lost; they are the host's PCP epoch.
#[test]
fn rfc6886_s3_6_epoch_restarts_exactly_when_the_hosts_state_is_lost() {
    let mut s = server();
    let first = mapped(send(
        &mut s,
        at(100),
        HOST,
        &map(NatPmpProtocol::Tcp, 8080, 0, 7200),
    ));
    assert_eq!(first.3, 100);
    let other = "192.168.1.30";
    mapped(send(
        &mut s,
        at(100),
        other,
        &map(NatPmpProtocol::Tcp, 8080, 0, 7200),
    ));
    let sub = s.config().subscriber_keying.subscriber_of(ip(HOST));
    s.clear(at(200), ClearSelector::Subscriber(sub));
    let after = mapped(send(
        &mut s,
        at(210),
        HOST,
        &map(NatPmpProtocol::Tcp, 8080, 0, 7200),
    ));
    assert!(
        after.3 < 100,
        "the host lost its mapping: its epoch restarted ({})",
        after.3
    );
    let kept = mapped(send(
        &mut s,
        at(210),
        other,
        &map(NatPmpProtocol::Tcp, 8080, 0, 7200),
    ));
    assert_eq!(kept.3, 210, "another host lost nothing");
}

/// NAT-PMP has no CHECKPOINT_REQUIRED option: its mappings are
/// check-pointed by class, when the class says `always` (RFC 7767 section
/// 4's classes).
#[test]
fn rfc7767_s4_natpmp_mappings_are_checkpointed_by_an_always_class() {
    let class = |mode| CheckpointClass {
        name: "c".into(),
        mode,
        max: None,
        rate: None,
    };
    for (mode, want) in [
        (CheckpointMode::Always, true),
        (CheckpointMode::OnRequest, false),
    ] {
        let mut s = Server::new(
            ServerConfig {
                checkpoint: CheckpointPolicy {
                    max_mappings: 100,
                    classes: vec![class(mode)],
                    default_class: 0,
                    assign: Vec::new(),
                },
                ..cfg()
            },
            T0,
        );
        s.set_backup_state(BackupState::InSync);
        mapped(send(
            &mut s,
            T0,
            HOST,
            &map(NatPmpProtocol::Udp, 53, 0, 600),
        ));
        let m = s.mappings().pop().unwrap();
        assert_eq!(m.checkpoint, want, "{mode:?}");
        assert_eq!(m.nonce, portkeep_server::NATPMP_NONCE);
    }
}

#[test]
fn rfc6886_s5_turned_off_version_0_gets_pcp_unsupported_version() {
    let mut s = Server::new(
        ServerConfig {
            natpmp: false,
            ..cfg()
        },
        T0,
    );
    let mut out = Vec::new();
    let o = s.handle(
        T0,
        SocketAddr::new(ip(HOST), 5000),
        &map(NatPmpProtocol::Tcp, 1, 0, 60),
        &mut out,
    );
    assert_eq!(o, Outcome::Reply);
    assert_eq!(out[0], 2);
    assert_eq!(
        u16::from_be_bytes([out[2], out[3]]),
        1,
        "read by NAT-PMP as unsupported version"
    );
    assert_eq!(s.mapping_count(), 0);
}

/// A NAT-PMP reply held for the backup (RFC 7767 section 3.2, a mapping
/// check-pointed by class) leaves with the epoch of its release and its
/// lifetime shortened by the wait, and not at all once its mapping is
/// gone (RFC 6886 section 3.6: the client must not believe in a mapping
/// the gateway lost).
#[test]
fn rfc6886_s3_6_a_held_reply_is_restamped_at_release() {
    let mut s = server();
    let mut out = Vec::new();
    let req = map(NatPmpProtocol::Tcp, 8080, 0, 600);
    s.handle(T0, SocketAddr::new(ip(HOST), 5000), &req, &mut out);
    let later = s.restamp(at(3), ip(HOST), &out, 2_500).unwrap();
    let r = mapped(NatPmpReply::parse(&later));
    assert_eq!((r.0, r.2, r.3), (NatPmpResult::SUCCESS, 597, 3));
    let sub = s.config().subscriber_keying.subscriber_of(ip(HOST));
    s.clear(at(4), ClearSelector::Subscriber(sub));
    assert_eq!(s.restamp(at(5), ip(HOST), &out, 5_000), None);
}

/// RFC 6886 section 3.2.1: the announcement that goes with every ANNOUNCE
/// to everyone is the external address response with the server-wide
/// epoch; none with NAT-PMP turned off.
#[test]
fn rfc6886_s3_2_1_the_announcement_carries_the_address_and_the_epoch() {
    let s = server();
    let a = s.natpmp_announcement(at(7)).unwrap();
    assert_eq!(
        NatPmpReply::parse(&a),
        Some(NatPmpReply::ExternalAddress {
            result: NatPmpResult::SUCCESS,
            epoch: 7,
            address: Ipv4Addr::new(192, 0, 2, 1),
        })
    );
    let off = Server::new(
        ServerConfig {
            natpmp: false,
            ..cfg()
        },
        T0,
    );
    assert_eq!(off.natpmp_announcement(at(7)), None);
}

/// A gateway speaking NAT-PMP only answers PCP with NAT-PMP's 8-octet
/// "unsupported version" (RFC 6886 section 3.5, opcode 128 + the
/// request's), which a PCP client takes as "fall back" (RFC 6887 section
/// 9 step 4); NAT-PMP itself works as before.
#[test]
fn rfc6887_s9_a_natpmp_only_gateway_answers_pcp_with_version_0() {
    let mut s = Server::new(
        ServerConfig {
            pcp: false,
            ..cfg()
        },
        T0,
    );
    let pcp = Request {
        header: RequestHeader {
            lifetime: 600,
            client_ip: to_wire(ip(HOST)),
        },
        data: OpData::Map(MapData {
            nonce: [1; 12],
            protocol: Protocol::TCP,
            internal_port: 80,
            external_port: 0,
            external_ip: Ipv6Addr::UNSPECIFIED,
        }),
        options: vec![],
    }
    .to_bytes(&CodePoints::default())
    .unwrap();
    let mut out = Vec::new();
    assert_eq!(
        s.handle(at(3), SocketAddr::new(ip(HOST), 5000), &pcp, &mut out),
        Outcome::Reply
    );
    assert_eq!(out, [0, 128 + 1, 0, 1, 0, 0, 0, 3]);
    assert_eq!(s.mapping_count(), 0);
    let r = mapped(send(
        &mut s,
        at(3),
        HOST,
        &map(NatPmpProtocol::Tcp, 80, 0, 600),
    ));
    assert_eq!(r.0, NatPmpResult::SUCCESS);
}
