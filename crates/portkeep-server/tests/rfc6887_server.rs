//! The server core against RFC 6887 (sections 7-15) and RFC 7767, driven
//! with made-up time. Each test is named after the rule it checks.

#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use portkeep_proto::addr::{from_wire, to_wire};
use portkeep_proto::{
    CodePoints, Filter, MapData, OpData, PcpOption, PeerData, Protocol, Request, RequestHeader,
    Response, ResultCode,
};
use portkeep_server::{
    Change, Dataplane, MappingKind, MemoryDataplane, Outcome, RemoveReason, Server, ServerConfig,
    Timestamp,
};

const CLIENT: &str = "198.51.100.10";
const T0: Timestamp = Timestamp(1_000_000);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn src(s: &str) -> SocketAddr {
    SocketAddr::new(ip(s), 40000)
}

fn cfg() -> ServerConfig {
    ServerConfig {
        external_addresses: vec![ip("192.0.2.1"), ip("192.0.2.2")],
        port_min: 20000,
        port_max: 20999,
        ..ServerConfig::default()
    }
}

fn server() -> Server {
    Server::new(cfg(), T0)
}

fn nonce(n: u8) -> [u8; 12] {
    [n; 12]
}

fn map_data(proto: Protocol, port: u16, n: u8) -> MapData {
    MapData {
        nonce: nonce(n),
        protocol: proto,
        internal_port: port,
        external_port: 0,
        external_ip: Ipv6Addr::UNSPECIFIED,
    }
}

fn request(client: &str, lifetime: u32, data: OpData, options: Vec<PcpOption>) -> Vec<u8> {
    Request {
        header: RequestHeader {
            lifetime,
            client_ip: to_wire(ip(client)),
        },
        data,
        options,
    }
    .to_bytes(&CodePoints::default())
    .unwrap()
}

fn map(client: &str, port: u16, lifetime: u32, n: u8, options: Vec<PcpOption>) -> Vec<u8> {
    request(
        client,
        lifetime,
        OpData::Map(map_data(Protocol::TCP, port, n)),
        options,
    )
}

fn peer(client: &str, port: u16, remote: &str, lifetime: u32, n: u8) -> Vec<u8> {
    let r: SocketAddr = remote.parse().unwrap();
    request(
        client,
        lifetime,
        OpData::Peer(PeerData {
            map: map_data(Protocol::TCP, port, n),
            remote_port: r.port(),
            remote_ip: to_wire(r.ip()),
        }),
        vec![],
    )
}

/// Sends `bytes` from `from` at `now` and parses the reply.
fn send(s: &mut Server, now: Timestamp, from: &str, bytes: &[u8]) -> Response {
    let mut out = Vec::new();
    assert_eq!(s.handle(now, src(from), bytes, &mut out), Outcome::Reply);
    Response::parse(&out, &CodePoints::default()).unwrap()
}

fn raw(s: &mut Server, from: &str, bytes: &[u8]) -> (Outcome, Vec<u8>) {
    let mut out = Vec::new();
    let o = s.handle(T0, src(from), bytes, &mut out);
    (o, out)
}

fn ext(r: &Response) -> SocketAddr {
    let m = r.data.map_part().unwrap();
    SocketAddr::new(from_wire(m.external_ip), m.external_port)
}

fn result(r: &Response) -> ResultCode {
    r.header.result
}

// ---- Section 8.2: validation order and silent drops -------------------

#[test]
fn rfc6887_s8_2_runt_and_r_bit_are_dropped() {
    let mut s = server();
    assert_eq!(raw(&mut s, CLIENT, &[2]).0, Outcome::Drop);
    assert_eq!(raw(&mut s, CLIENT, &[]).0, Outcome::Drop);
    let mut m = map(CLIENT, 80, 3600, 1, vec![]);
    m[1] |= 0x80;
    assert_eq!(raw(&mut s, CLIENT, &m).0, Outcome::Drop);
    assert_eq!(s.stats().dropped, 3);
}

#[test]
fn rfc6887_s8_2_supported_version_shorter_than_24_is_dropped() {
    let mut s = server();
    let m = map(CLIENT, 80, 3600, 1, vec![]);
    assert_eq!(raw(&mut s, CLIENT, &m[..20]).0, Outcome::Drop);
}

#[test]
fn rfc6887_s9_unsupported_version_answers_version_2() {
    let mut s = server();
    let mut m = map(CLIENT, 80, 3600, 1, vec![]);
    m[0] = 1;
    let (o, out) = raw(&mut s, CLIENT, &m);
    assert_eq!(o, Outcome::Reply);
    assert_eq!(out[0], 2, "response carries the version we speak");
    assert_eq!(out[3], ResultCode::UNSUPP_VERSION.0);
    assert_eq!(u32::from_be_bytes(out[4..8].try_into().unwrap()), 1800);
}

#[test]
fn rfc6887_appendix_a_natpmp_request_reads_as_unsupported_version() {
    // With NAT-PMP turned off (RFC 6886 section 5's switch; on, version 0
    // is answered in NAT-PMP: tests/rfc6886_natpmp.rs).
    let mut s = Server::new(
        ServerConfig {
            natpmp: false,
            ..cfg()
        },
        T0,
    );
    // NAT-PMP external address request: version 0, opcode 0.
    let (o, out) = raw(&mut s, CLIENT, &[0, 0]);
    assert_eq!(o, Outcome::Reply);
    assert_eq!(out.len(), 24);
    // NAT-PMP reads octets 2-3 as a 16-bit result code: 1 = unsupported version.
    assert_eq!(u16::from_be_bytes([out[2], out[3]]), 1);
    assert_eq!(out[1], 0x80);
}

#[test]
fn rfc6887_s8_2_bad_length_is_malformed_request_copying_the_request() {
    let mut s = server();
    let mut m = map(CLIENT, 80, 3600, 1, vec![]);
    m.push(0); // not a multiple of 4
    let (_, out) = raw(&mut s, CLIENT, &m);
    assert_eq!(out[3], ResultCode::MALFORMED_REQUEST.0);
    assert_eq!(out.len(), m.len() + 3, "copy padded to a multiple of 4");
    // Section 7.2: an unparsed request's last 96 client-address bits are kept.
    assert_eq!(out[12..24], m[12..24]);
    assert_eq!(out[24..60], m[24..60], "opcode body copied");
    let big = vec![0u8; 1104];
    let mut big = big;
    big[..m.len() - 1].copy_from_slice(&m[..m.len() - 1]);
    let (_, out) = raw(&mut s, CLIENT, &big);
    assert_eq!(out[3], ResultCode::MALFORMED_REQUEST.0);
    assert_eq!(out.len(), 1100, "truncated to 1100 octets");
}

#[test]
fn rfc6887_s8_2_address_mismatch() {
    let mut s = server();
    let m = map("198.51.100.99", 80, 3600, 1, vec![]);
    let r = send(&mut s, T0, CLIENT, &m);
    assert_eq!(result(&r), ResultCode::ADDRESS_MISMATCH);
    assert_eq!(r.header.lifetime, 1800, "long-lifetime error");
    assert_eq!(s.mapping_count(), 0);
}

#[test]
fn rfc6887_s8_2_unknown_opcode_is_unsupp_opcode() {
    let mut s = server();
    let req = request(
        CLIENT,
        0,
        OpData::Opaque {
            opcode: portkeep_proto::Opcode(5),
            payload: vec![1, 2, 3, 4],
        },
        vec![],
    );
    let r = send(&mut s, T0, CLIENT, &req);
    assert_eq!(result(&r), ResultCode::UNSUPP_OPCODE);
    assert_eq!(
        r.data,
        OpData::Opaque {
            opcode: portkeep_proto::Opcode(5),
            payload: vec![1, 2, 3, 4]
        }
    );
}

// ---- Section 7.3: options ---------------------------------------------

#[test]
fn rfc6887_s7_3_unknown_mandatory_option_is_unsupp_option() {
    let mut s = server();
    let opt = PcpOption::Unknown {
        code: portkeep_proto::OptionCode(77),
        data: vec![],
    };
    let r = send(&mut s, T0, CLIENT, &map(CLIENT, 80, 3600, 1, vec![opt]));
    assert_eq!(result(&r), ResultCode::UNSUPP_OPTION);
    assert_eq!(s.mapping_count(), 0);
}

/// RFC 7652 section 5.4: AUTHENTICATION_TAG is in the mandatory range, so
/// a server without PCP authentication sessions answers a tagged request
/// UNSUPP_OPTION (RFC 6887 section 7.3) and makes nothing; a PA message
/// (opcode AUTHENTICATION) gets UNSUPP_OPCODE.
#[test]
fn rfc7652_s5_4_without_sessions_a_tagged_request_is_unsupp_option() {
    let cp = portkeep_proto::CodePoints::default();
    let mut s = server();
    let mut req = map(CLIENT, 80, 3600, 1, vec![]);
    let k = portkeep_proto::auth::transport_key(
        portkeep_proto::auth::Prf::HmacSha256,
        &[1; 64],
        1,
        2,
        1,
    );
    let key = portkeep_proto::auth::TagKey::new(
        portkeep_proto::auth::MacAlgorithm::HmacSha256_128,
        &k,
        1,
    )
    .unwrap();
    portkeep_proto::auth::sign(&mut req, &key, (1, 0), &cp).unwrap();
    let r = send(&mut s, T0, CLIENT, &req);
    assert_eq!(result(&r), ResultCode::UNSUPP_OPTION);
    assert_eq!(s.mapping_count(), 0);
    let mut pa = Vec::new();
    portkeep_proto::auth::PaMessage {
        response: false,
        result: ResultCode::INITIATION,
        lifetime: 0,
        epoch: 0,
        client_ip: portkeep_proto::addr::to_wire(ip(CLIENT)),
        session_id: 0,
        seq: 0,
        options: vec![portkeep_proto::auth::PaOption::Nonce(7)],
    }
    .encode(&mut pa)
    .unwrap();
    let r = send(&mut s, T0, CLIENT, &pa);
    assert_eq!(result(&r), ResultCode::UNSUPP_OPCODE);
}

#[test]
fn rfc6887_s7_3_unknown_optional_option_is_ignored_and_not_echoed() {
    let mut s = server();
    let opt = PcpOption::Unknown {
        code: portkeep_proto::OptionCode(200),
        data: vec![9, 9],
    };
    let r = send(&mut s, T0, CLIENT, &map(CLIENT, 80, 3600, 1, vec![opt]));
    assert_eq!(result(&r), ResultCode::SUCCESS);
    assert!(r.options.is_empty());
}

#[test]
fn rfc6887_s7_3_too_many_occurrences_is_malformed_option() {
    let mut s = server();
    for opt in [
        PcpOption::PreferFailure,
        PcpOption::CheckpointRequired,
        PcpOption::Description("x".into()),
    ] {
        let r = send(
            &mut s,
            T0,
            CLIENT,
            &map(CLIENT, 80, 3600, 1, vec![opt.clone(), opt]),
        );
        assert_eq!(result(&r), ResultCode::MALFORMED_OPTION);
    }
    assert_eq!(s.mapping_count(), 0);
}

#[test]
fn rfc7767_s3_1_checkpoint_with_length_is_malformed_option() {
    let mut s = server();
    let mut m = map(CLIENT, 80, 3600, 1, vec![PcpOption::CheckpointRequired]);
    // Option header at 60: code 192, reserved, length 0 -> length 4 plus data.
    m[62..64].copy_from_slice(&4u16.to_be_bytes());
    m.extend_from_slice(&[0, 0, 0, 0]);
    let r = send(&mut s, T0, CLIENT, &m);
    assert_eq!(result(&r), ResultCode::MALFORMED_OPTION);
}

// ---- Section 11: MAP ---------------------------------------------------

#[test]
fn rfc6887_s11_3_map_assigns_from_pool_and_range() {
    let mut s = server();
    let r = send(&mut s, T0, CLIENT, &map(CLIENT, 8080, 3600, 1, vec![]));
    assert_eq!(result(&r), ResultCode::SUCCESS);
    let e = ext(&r);
    assert!(cfg().external_addresses.contains(&e.ip()), "{e}");
    assert!((20000..=20999).contains(&e.port()), "{e}");
    assert_eq!(r.header.lifetime, 3600);
    let m = r.data.map_part().unwrap();
    assert_eq!(m.nonce, nonce(1));
    assert_eq!(m.internal_port, 8080);
    assert_eq!(s.mapping_count(), 1);
}

#[test]
fn rfc6887_s11_3_suggested_external_honoured_when_free() {
    let mut s = server();
    let mut d = map_data(Protocol::TCP, 8080, 1);
    d.external_port = 20500;
    d.external_ip = to_wire(ip("192.0.2.2"));
    let r = send(
        &mut s,
        T0,
        CLIENT,
        &request(CLIENT, 3600, OpData::Map(d), vec![]),
    );
    assert_eq!(ext(&r), "192.0.2.2:20500".parse().unwrap());
    // Another client suggesting the same endpoint gets something else.
    let other = "198.51.100.11";
    let mut d2 = d;
    d2.nonce = nonce(2);
    let r2 = send(
        &mut s,
        T0,
        other,
        &request(other, 3600, OpData::Map(d2), vec![]),
    );
    assert_eq!(result(&r2), ResultCode::SUCCESS);
    assert_ne!(ext(&r2), ext(&r));
}

#[test]
fn rfc6887_s13_2_prefer_failure_gives_cannot_provide_external() {
    let mut s = server();
    let mut d = map_data(Protocol::TCP, 8080, 1);
    d.external_port = 20500;
    send(
        &mut s,
        T0,
        CLIENT,
        &request(CLIENT, 3600, OpData::Map(d), vec![]),
    );
    let other = "198.51.100.11";
    let mut d2 = d;
    d2.nonce = nonce(2);
    d2.external_ip = to_wire(ip("192.0.2.1"));
    // Taken on 192.0.2.1? Ask for the exact endpoint the first one got.
    let first = s.mappings()[0].external;
    d2.external_ip = to_wire(first.ip());
    let r = send(
        &mut s,
        T0,
        other,
        &request(other, 3600, OpData::Map(d2), vec![PcpOption::PreferFailure]),
    );
    assert_eq!(result(&r), ResultCode::CANNOT_PROVIDE_EXTERNAL);
    assert_eq!(r.header.lifetime, 30, "short-lifetime error");
    assert_eq!(s.mapping_count(), 1);
    // An address outside the pool cannot be provided either.
    let mut d3 = d2;
    d3.external_ip = to_wire(ip("203.0.113.1"));
    d3.external_port = 0;
    let r = send(
        &mut s,
        T0,
        other,
        &request(other, 3600, OpData::Map(d3), vec![PcpOption::PreferFailure]),
    );
    assert_eq!(result(&r), ResultCode::CANNOT_PROVIDE_EXTERNAL);
}

#[test]
fn rfc6887_s11_3_refresh_with_same_nonce_keeps_external() {
    let mut s = server();
    let a = send(&mut s, T0, CLIENT, &map(CLIENT, 8080, 3600, 1, vec![]));
    let later = Timestamp(T0.0 + 1_000_000);
    let b = send(&mut s, later, CLIENT, &map(CLIENT, 8080, 7200, 1, vec![]));
    assert_eq!(result(&b), ResultCode::SUCCESS);
    assert_eq!(ext(&a), ext(&b));
    assert_eq!(b.header.lifetime, 7200);
    assert_eq!(s.mapping_count(), 1);
    assert_eq!(s.mappings()[0].expires, Timestamp(later.0 + 7_200_000));
}

/// The change log says which upsert began a mapping (sections 11.3 and
/// 12.3: a request with no mapping creates one, one with it renews it):
/// the daemon's `started` and `renewed` log records.
#[test]
fn rfc6887_s11_3_s12_3_the_change_log_marks_a_creation_apart_from_a_renewal() {
    let mut s = server();
    let upserts = |s: &mut Server| -> Vec<bool> {
        s.drain_changes()
            .filter(|c| matches!(c.change, Change::Upserted(_)))
            .map(|c| c.started)
            .collect()
    };
    send(&mut s, T0, CLIENT, &map(CLIENT, 8080, 3600, 1, vec![]));
    assert_eq!(upserts(&mut s), [true], "a MAP creation");
    send(&mut s, T0, CLIENT, &map(CLIENT, 8080, 3600, 1, vec![]));
    assert_eq!(upserts(&mut s), [false], "a MAP renewal");
    send(
        &mut s,
        T0,
        CLIENT,
        &peer(CLIENT, 9090, "203.0.113.5:443", 600, 2),
    );
    assert_eq!(upserts(&mut s), [true], "a PEER creation");
    send(
        &mut s,
        T0,
        CLIENT,
        &peer(CLIENT, 9090, "203.0.113.5:443", 600, 2),
    );
    assert_eq!(upserts(&mut s), [false], "a PEER renewal");
    // Deleted and made again: a new holding begins.
    send(&mut s, T0, CLIENT, &map(CLIENT, 8080, 0, 1, vec![]));
    send(&mut s, T0, CLIENT, &map(CLIENT, 8080, 3600, 1, vec![]));
    assert_eq!(upserts(&mut s), [true], "a MAP made again after its delete");
}

#[test]
fn rfc6887_s11_3_nonce_mismatch_is_not_authorized_and_mapping_untouched() {
    let mut s = server();
    send(&mut s, T0, CLIENT, &map(CLIENT, 8080, 3600, 1, vec![]));
    let before = s.mappings();
    s.drain_changes().for_each(drop);
    for lifetime in [7200, 0] {
        let r = send(&mut s, T0, CLIENT, &map(CLIENT, 8080, lifetime, 2, vec![]));
        assert_eq!(result(&r), ResultCode::NOT_AUTHORIZED);
        assert_eq!(r.header.lifetime, 1800);
        // Section 7.2: a parsed request's reserved bits are zero.
        let mut out = Vec::new();
        s.handle(
            T0,
            src(CLIENT),
            &map(CLIENT, 8080, lifetime, 2, vec![]),
            &mut out,
        );
        assert!(out[12..24].iter().all(|&b| b == 0));
    }
    assert_eq!(s.mappings(), before);
    assert_eq!(s.drain_changes().count(), 0);
}

#[test]
fn rfc6887_s15_lifetime_zero_deletes() {
    let mut s = server();
    let a = send(&mut s, T0, CLIENT, &map(CLIENT, 8080, 3600, 1, vec![]));
    let r = send(&mut s, T0, CLIENT, &map(CLIENT, 8080, 0, 1, vec![]));
    assert_eq!(result(&r), ResultCode::SUCCESS);
    assert_eq!(r.header.lifetime, 0);
    assert_eq!(ext(&r), ext(&a));
    assert_eq!(s.mapping_count(), 0);
    // Deleting what does not exist succeeds.
    let r = send(&mut s, T0, CLIENT, &map(CLIENT, 8080, 0, 1, vec![]));
    assert_eq!(result(&r), ResultCode::SUCCESS);
    // The port is free again: another host can be given exactly it.
    let mut d = map_data(Protocol::TCP, 22, 3);
    d.external_ip = to_wire(ext(&a).ip());
    d.external_port = ext(&a).port();
    let other = "198.51.100.12";
    let r = send(
        &mut s,
        T0,
        other,
        &request(other, 3600, OpData::Map(d), vec![PcpOption::PreferFailure]),
    );
    assert_eq!(ext(&r), ext(&a));
}

#[test]
fn rfc6887_s11_1_delete_all_with_protocol_zero() {
    let mut s = server();
    for port in [80, 443, 8080] {
        send(&mut s, T0, CLIENT, &map(CLIENT, port, 3600, 1, vec![]));
    }
    let udp = request(
        CLIENT,
        3600,
        OpData::Map(map_data(Protocol::UDP, 53, 1)),
        vec![],
    );
    send(&mut s, T0, CLIENT, &udp);
    // Another nonce's mapping on the same host is not ours to delete.
    send(&mut s, T0, CLIENT, &map(CLIENT, 9000, 3600, 7, vec![]));
    let other = "198.51.100.11";
    send(&mut s, T0, other, &map(other, 80, 3600, 1, vec![]));
    assert_eq!(s.mapping_count(), 6);
    let all = request(
        CLIENT,
        0,
        OpData::Map(map_data(Protocol::ALL, 0, 1)),
        vec![],
    );
    let r = send(&mut s, T0, CLIENT, &all);
    assert_eq!(result(&r), ResultCode::SUCCESS);
    let left: Vec<_> = s
        .mappings()
        .into_iter()
        .map(|m| (m.key.internal_ip, m.key.internal_port))
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(left.contains(&(ip(CLIENT), 9000)));
    assert!(left.contains(&(ip(other), 80)));
}

#[test]
fn rfc6887_s11_1_delete_all_ports_of_one_protocol() {
    let mut s = server();
    send(&mut s, T0, CLIENT, &map(CLIENT, 80, 3600, 1, vec![]));
    let udp = request(
        CLIENT,
        3600,
        OpData::Map(map_data(Protocol::UDP, 53, 1)),
        vec![],
    );
    send(&mut s, T0, CLIENT, &udp);
    let tcp_all = map(CLIENT, 0, 0, 1, vec![]);
    assert_eq!(
        result(&send(&mut s, T0, CLIENT, &tcp_all)),
        ResultCode::SUCCESS
    );
    let left = s.mappings();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].key.protocol, Protocol::UDP);
}

#[test]
fn rfc6887_s11_1_protocol_zero_maps_a_whole_address() {
    let mut s = server();
    let all = request(
        CLIENT,
        3600,
        OpData::Map(map_data(Protocol::ALL, 0, 1)),
        vec![],
    );
    let r = send(&mut s, T0, CLIENT, &all);
    assert_eq!(result(&r), ResultCode::SUCCESS);
    assert_eq!(ext(&r).port(), 0);
    let whole = ext(&r).ip();
    // Nobody else gets a port on that address while it is held.
    for i in 0..50u16 {
        let c = format!("198.51.100.{}", 100 + i);
        let r = send(&mut s, T0, &c, &map(&c, 1000 + i, 3600, 2, vec![]));
        assert_ne!(ext(&r).ip(), whole);
    }
    // A second whole-address request takes the other pool address, a third fails.
    let c2 = "198.51.100.200";
    let r = send(
        &mut s,
        T0,
        c2,
        &request(c2, 3600, OpData::Map(map_data(Protocol::ALL, 0, 3)), vec![]),
    );
    assert_eq!(
        result(&r),
        ResultCode::NO_RESOURCES,
        "the other address has ports in use"
    );
}

#[test]
fn rfc6887_s15_lifetime_is_clamped() {
    let mut s = server();
    let r = send(&mut s, T0, CLIENT, &map(CLIENT, 1, 10, 1, vec![]));
    assert_eq!(r.header.lifetime, 120);
    let r = send(&mut s, T0, CLIENT, &map(CLIENT, 2, u32::MAX, 1, vec![]));
    assert_eq!(r.header.lifetime, 86400);
    let mut short = Server::new(
        ServerConfig {
            min_lifetime: 2,
            max_lifetime: 5,
            ..cfg()
        },
        T0,
    );
    let r = send(&mut short, T0, CLIENT, &map(CLIENT, 1, 1, 1, vec![]));
    assert_eq!(r.header.lifetime, 2);
}

#[test]
fn rfc6887_s15_mappings_expire_on_the_timer() {
    let mut s = server();
    send(&mut s, T0, CLIENT, &map(CLIENT, 1, 200, 1, vec![]));
    send(&mut s, T0, CLIENT, &map(CLIENT, 2, 300, 1, vec![]));
    s.drain_changes().for_each(drop);
    assert_eq!(s.poll_timeout(), Some(Timestamp(T0.0 + 200_000)));
    s.handle_timeout(Timestamp(T0.0 + 199_999));
    assert_eq!(s.mapping_count(), 2);
    s.handle_timeout(Timestamp(T0.0 + 200_000));
    assert_eq!(s.mapping_count(), 1);
    let ch: Vec<_> = s.drain_changes().collect();
    assert!(
        matches!(&ch[..], [c, h] if matches!(&c.change, Change::Removed { reason: RemoveReason::Expired, mapping } if mapping.key.internal_port == 1)
            && matches!(&h.change, Change::PortHeld(p) if p.owner.internal_port == 1))
    );
    assert_eq!(s.poll_timeout(), Some(Timestamp(T0.0 + 300_000)));
}

#[test]
fn rfc6887_s13_3_filters_are_stored_and_prefix_zero_clears_them() {
    let mut s = server();
    let f = |ip_s: &str, len: u8, port: u16| {
        PcpOption::Filter(Filter {
            prefix_len: len,
            remote_port: port,
            remote_ip: to_wire(ip(ip_s)),
        })
    };
    let r = send(
        &mut s,
        T0,
        CLIENT,
        &map(
            CLIENT,
            80,
            3600,
            1,
            vec![f("203.0.113.0", 120, 0), f("2001:db8::", 32, 443)],
        ),
    );
    assert_eq!(result(&r), ResultCode::SUCCESS);
    assert_eq!(r.options.len(), 2, "FILTERs echoed");
    let m = &s.mappings()[0];
    assert_eq!(m.filters.len(), 2);
    assert_eq!(m.filters[0].prefix.to_string(), "203.0.113.0/24");
    assert_eq!(m.filters[1].port, 443);
    send(
        &mut s,
        T0,
        CLIENT,
        &map(CLIENT, 80, 3600, 1, vec![f("::", 0, 0)]),
    );
    assert!(s.mappings()[0].filters.is_empty());
    // An IPv4 filter shorter than 96 bits over the mapped form is malformed.
    let r = send(
        &mut s,
        T0,
        CLIENT,
        &map(CLIENT, 81, 3600, 1, vec![f("203.0.113.0", 24, 0)]),
    );
    assert_eq!(result(&r), ResultCode::MALFORMED_OPTION);
    let r = send(
        &mut s,
        T0,
        CLIENT,
        &map(CLIENT, 81, 3600, 1, vec![f("2001:db8::", 129, 0)]),
    );
    assert_eq!(result(&r), ResultCode::MALFORMED_OPTION);
}

#[test]
fn rfc6887_s7_4_too_many_filters_is_excessive_remote_peers() {
    let mut s = server();
    let filters: Vec<_> = (0..9u8)
        .map(|i| {
            PcpOption::Filter(Filter {
                prefix_len: 128,
                remote_port: 0,
                remote_ip: to_wire(IpAddr::from([203, 0, 113, i])),
            })
        })
        .collect();
    let r = send(&mut s, T0, CLIENT, &map(CLIENT, 80, 3600, 1, filters));
    assert_eq!(result(&r), ResultCode::EXCESSIVE_REMOTE_PEERS);
}

// ---- Section 12: PEER --------------------------------------------------

#[test]
fn rfc6887_s12_3_peer_creates_and_shares_the_endpoint_with_map() {
    let mut s = server();
    let p = send(
        &mut s,
        T0,
        CLIENT,
        &peer(CLIENT, 5000, "203.0.113.9:443", 600, 1),
    );
    assert_eq!(result(&p), ResultCode::SUCCESS);
    assert_eq!(p.header.lifetime, 600);
    let p2 = send(
        &mut s,
        T0,
        CLIENT,
        &peer(CLIENT, 5000, "203.0.113.10:443", 600, 1),
    );
    assert_eq!(
        ext(&p2),
        ext(&p),
        "endpoint-independent: one external port per internal endpoint"
    );
    let m = send(&mut s, T0, CLIENT, &map(CLIENT, 5000, 600, 1, vec![]));
    assert_eq!(ext(&m), ext(&p));
    assert_eq!(s.mapping_count(), 3);
    let peers: Vec<_> = s
        .mappings()
        .into_iter()
        .filter(|m| matches!(m.kind, MappingKind::Peer { .. }))
        .collect();
    assert_eq!(peers.len(), 2);
}

#[test]
fn rfc6887_s12_3_peer_cannot_shorten_a_mapping() {
    let mut s = server();
    send(
        &mut s,
        T0,
        CLIENT,
        &peer(CLIENT, 5000, "203.0.113.9:443", 3000, 1),
    );
    let later = Timestamp(T0.0 + 1_000_000);
    let r = send(
        &mut s,
        later,
        CLIENT,
        &peer(CLIENT, 5000, "203.0.113.9:443", 0, 1),
    );
    assert_eq!(result(&r), ResultCode::SUCCESS);
    assert_eq!(r.header.lifetime, 2000, "remaining lifetime, not shortened");
    assert_eq!(s.mapping_count(), 1);
}

#[test]
fn rfc6887_s12_1_peer_field_rules_are_malformed_request() {
    let mut s = server();
    for (port, remote) in [
        (5000, "203.0.113.9:0"),
        (0, "203.0.113.9:443"),
        (5000, "0.0.0.0:443"),
    ] {
        let r = send(&mut s, T0, CLIENT, &peer(CLIENT, port, remote, 600, 1));
        assert_eq!(result(&r), ResultCode::MALFORMED_REQUEST, "{port} {remote}");
    }
    let mut d = PeerData {
        map: map_data(Protocol::ALL, 0, 1),
        remote_port: 443,
        remote_ip: to_wire(ip("203.0.113.9")),
    };
    let r = send(
        &mut s,
        T0,
        CLIENT,
        &request(CLIENT, 600, OpData::Peer(d), vec![]),
    );
    assert_eq!(result(&r), ResultCode::MALFORMED_REQUEST);
    d.map = map_data(Protocol::TCP, 5000, 1);
    let r = send(
        &mut s,
        T0,
        CLIENT,
        &request(CLIENT, 600, OpData::Peer(d), vec![PcpOption::PreferFailure]),
    );
    assert_eq!(result(&r), ResultCode::MALFORMED_REQUEST, "section 12.1");
    assert_eq!(s.mapping_count(), 0);
}

// ---- Sections 8.5 and 14.1: epoch and ANNOUNCE -------------------------

#[test]
fn rfc6887_s14_1_announce_returns_the_epoch() {
    let mut s = server();
    let a = request(CLIENT, 0, OpData::Announce, vec![]);
    let r = send(&mut s, T0, CLIENT, &a);
    assert_eq!(result(&r), ResultCode::SUCCESS);
    assert_eq!(r.header.epoch, 0);
    let r = send(&mut s, Timestamp(T0.0 + 61_500), CLIENT, &a);
    assert_eq!(r.header.epoch, 61, "section 8.5: seconds since state began");
    assert_eq!(r.data, OpData::Announce);
    // Section 14.1: the requested lifetime is ignored.
    let r = send(
        &mut s,
        T0,
        CLIENT,
        &request(CLIENT, 99, OpData::Announce, vec![]),
    );
    assert_eq!(result(&r), ResultCode::SUCCESS);
    assert_eq!(r.header.lifetime, 0);
    let mut out = Vec::new();
    s.unsolicited_announce(Timestamp(T0.0 + 5_000), &mut out);
    let u = Response::parse(&out, &CodePoints::default()).unwrap();
    assert_eq!(
        (u.header.result, u.header.epoch, u.data),
        (ResultCode::SUCCESS, 5, OpData::Announce)
    );
}

// ---- Section 13.1: THIRD_PARTY ----------------------------------------

#[test]
fn rfc6887_s13_1_third_party_needs_authorisation() {
    let host = "198.51.100.50";
    let tp = PcpOption::ThirdParty(to_wire(ip(host)));
    let mut s = server();
    let r = send(
        &mut s,
        T0,
        CLIENT,
        &map(CLIENT, 80, 3600, 1, vec![tp.clone()]),
    );
    assert_eq!(result(&r), ResultCode::NOT_AUTHORIZED);
    let mut s = Server::new(
        ServerConfig {
            third_party_clients: vec!["198.51.100.0/28".parse().unwrap()],
            max_mappings_per_subscriber: 1,
            ..cfg()
        },
        T0,
    );
    let r = send(
        &mut s,
        T0,
        CLIENT,
        &map(CLIENT, 80, 3600, 1, vec![tp.clone()]),
    );
    assert_eq!(result(&r), ResultCode::SUCCESS);
    assert_eq!(r.options, vec![tp.clone()], "THIRD_PARTY echoed");
    let m = &s.mappings()[0];
    assert_eq!(m.key.internal_ip, ip(host));
    assert!(m.third_party);
    assert_eq!(
        m.subscriber.to_string(),
        "198.51.100.50/32",
        "counts against the host named"
    );
    // The named host's quota is used; the requester's own is not.
    let r = send(&mut s, T0, CLIENT, &map(CLIENT, 81, 3600, 1, vec![tp]));
    assert_eq!(result(&r), ResultCode::USER_EX_QUOTA);
    let r = send(&mut s, T0, CLIENT, &map(CLIENT, 81, 3600, 1, vec![]));
    assert_eq!(result(&r), ResultCode::SUCCESS);
    // Naming yourself is malformed.
    let me = PcpOption::ThirdParty(to_wire(ip(CLIENT)));
    let r = send(&mut s, T0, CLIENT, &map(CLIENT, 82, 3600, 1, vec![me]));
    assert_eq!(result(&r), ResultCode::MALFORMED_REQUEST);
}

// ---- Quotas and bounded memory ---------------------------------------

#[test]
fn rfc6887_s7_4_user_ex_quota_is_per_subscriber() {
    let mut s = Server::new(
        ServerConfig {
            max_mappings_per_subscriber: 3,
            ..cfg()
        },
        T0,
    );
    for p in 1..=3 {
        assert_eq!(
            result(&send(&mut s, T0, CLIENT, &map(CLIENT, p, 3600, 1, vec![]))),
            ResultCode::SUCCESS
        );
    }
    let r = send(&mut s, T0, CLIENT, &map(CLIENT, 4, 3600, 1, vec![]));
    assert_eq!(result(&r), ResultCode::USER_EX_QUOTA);
    assert_eq!(r.header.lifetime, 30, "short-lifetime error");
    // A refresh of an existing mapping is not a new mapping.
    assert_eq!(
        result(&send(&mut s, T0, CLIENT, &map(CLIENT, 3, 3600, 1, vec![]))),
        ResultCode::SUCCESS
    );
    let other = "198.51.100.11";
    assert_eq!(
        result(&send(&mut s, T0, other, &map(other, 4, 3600, 1, vec![]))),
        ResultCode::SUCCESS
    );
}

#[test]
fn rfc6887_s7_4_ipv6_subscribers_share_a_56() {
    let mut s = Server::new(
        ServerConfig {
            max_mappings_per_subscriber: 2,
            ..cfg()
        },
        T0,
    );
    let a = "2001:db8:0:100::1";
    let b = "2001:db8:0:1ff::2";
    let c = "2001:db8:0:200::3";
    assert_eq!(
        result(&send(&mut s, T0, a, &map(a, 1, 3600, 1, vec![]))),
        ResultCode::SUCCESS
    );
    assert_eq!(
        result(&send(&mut s, T0, b, &map(b, 1, 3600, 1, vec![]))),
        ResultCode::SUCCESS
    );
    assert_eq!(
        result(&send(&mut s, T0, b, &map(b, 2, 3600, 1, vec![]))),
        ResultCode::USER_EX_QUOTA
    );
    assert_eq!(
        result(&send(&mut s, T0, c, &map(c, 2, 3600, 1, vec![]))),
        ResultCode::SUCCESS
    );
}

#[test]
fn rfc6887_s7_4_server_capacity_and_pool_exhaustion_are_no_resources() {
    let mut s = Server::new(
        ServerConfig {
            max_mappings: 2,
            ..cfg()
        },
        T0,
    );
    send(&mut s, T0, CLIENT, &map(CLIENT, 1, 3600, 1, vec![]));
    send(&mut s, T0, CLIENT, &map(CLIENT, 2, 3600, 1, vec![]));
    assert_eq!(
        result(&send(&mut s, T0, CLIENT, &map(CLIENT, 3, 3600, 1, vec![]))),
        ResultCode::NO_RESOURCES
    );
    let mut s = Server::new(
        ServerConfig {
            external_addresses: vec![ip("192.0.2.1")],
            port_min: 30000,
            port_max: 30003,
            ..cfg()
        },
        T0,
    );
    let mut ports = Vec::new();
    for p in 1..=4 {
        let r = send(&mut s, T0, CLIENT, &map(CLIENT, p, 3600, 1, vec![]));
        ports.push(ext(&r).port());
    }
    ports.sort();
    assert_eq!(ports, vec![30000, 30001, 30002, 30003]);
    assert_eq!(
        result(&send(&mut s, T0, CLIENT, &map(CLIENT, 5, 3600, 1, vec![]))),
        ResultCode::NO_RESOURCES
    );
    // UDP has its own port space.
    let udp = request(
        CLIENT,
        3600,
        OpData::Map(map_data(Protocol::UDP, 5, 1)),
        vec![],
    );
    assert_eq!(result(&send(&mut s, T0, CLIENT, &udp)), ResultCode::SUCCESS);
}

// ---- RFC 7767 hook and the change log ---------------------------------

#[test]
fn rfc7767_s3_2_standalone_server_does_not_echo_checkpoint() {
    let mut s = server();
    let r = send(
        &mut s,
        T0,
        CLIENT,
        &map(CLIENT, 80, 3600, 1, vec![PcpOption::CheckpointRequired]),
    );
    assert_eq!(result(&r), ResultCode::SUCCESS, "the MAP itself succeeds");
    assert!(!r.checkpoint_honoured());
    assert!(!s.mappings()[0].checkpoint);
}

#[test]
fn rfc7767_s3_2_honoured_checkpoint_is_echoed_and_renewal_without_it_clears() {
    let mut s = server();
    s.set_backup_state(portkeep_server::BackupState::InSync);
    let r = send(
        &mut s,
        T0,
        CLIENT,
        &map(CLIENT, 80, 3600, 1, vec![PcpOption::CheckpointRequired]),
    );
    assert!(r.checkpoint_honoured());
    assert!(s.mappings()[0].checkpoint);
    let r = send(&mut s, T0, CLIENT, &map(CLIENT, 80, 3600, 1, vec![]));
    assert!(!r.checkpoint_honoured(), "never echoed when not requested");
    assert!(!s.mappings()[0].checkpoint);
}

#[test]
fn design_every_state_change_is_in_the_change_log() {
    let mut s = server();
    let mut dp = MemoryDataplane::new();
    let a = send(&mut s, T0, CLIENT, &map(CLIENT, 80, 3600, 1, vec![]));
    send(&mut s, T0, CLIENT, &map(CLIENT, 80, 3600, 1, vec![]));
    send(
        &mut s,
        T0,
        CLIENT,
        &peer(CLIENT, 5000, "203.0.113.9:443", 600, 1),
    );
    let changes: Vec<_> = s.drain_changes().collect();
    assert_eq!(
        changes.iter().map(|c| c.seq).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    dp.apply(&changes).unwrap();
    assert_eq!(
        dp.inbound(Protocol::TCP, ext(&a)),
        Some(SocketAddr::new(ip(CLIENT), 80))
    );
    assert_eq!(dp.outbound_len(), 1);
    send(&mut s, T0, CLIENT, &map(CLIENT, 80, 0, 1, vec![]));
    s.handle_timeout(Timestamp(T0.0 + 601_000));
    let changes: Vec<_> = s.drain_changes().collect();
    // Each removal, then the hold on the endpoint it freed (section 15).
    assert_eq!(changes.len(), 4);
    assert_eq!(changes[0].seq, 4);
    assert!(matches!(changes[1].change, Change::PortHeld(_)));
    assert!(matches!(changes[3].change, Change::PortHeld(_)));
    dp.apply(&changes).unwrap();
    assert_eq!(dp.inbound_len(), 0);
    assert_eq!(dp.outbound_len(), 0);
    assert_eq!(s.mapping_count(), 0);
}

// ---- Section 8.5: a held reply leaves as if made when sent ------------

/// Encodes `r` with the default code points.
fn wire(r: &Response) -> Vec<u8> {
    let mut out = Vec::new();
    r.encode(&CodePoints::default(), &mut out).unwrap();
    out
}

#[test]
fn rfc6887_s8_5_a_held_reply_leaves_with_the_epoch_of_its_release() {
    let mut s = server();
    let ms = |m: u64| Timestamp(T0.0 + m);
    // Made 1.9 s into the epoch (epoch 1), released 1.2 s later: the
    // server's epoch is then 3. Adding the wait truncated (1) or rounded
    // (1) reads 2, a second behind what any reply made then says.
    let made = send(&mut s, ms(1900), CLIENT, &map(CLIENT, 80, 3600, 1, vec![]));
    assert_eq!(made.header.epoch, 1);
    let out = s.restamp(ms(3100), ip(CLIENT), &wire(&made), 1200).unwrap();
    let r = Response::parse(&out, &CodePoints::default()).unwrap();
    assert_eq!(r.header.epoch, 3);
    // The wait is taken off the lifetime rounded up: the client's mapping
    // never outlives the server's.
    assert_eq!(r.header.lifetime, 3598);
    assert_eq!(r.data, made.data);
    // Made 1.1 s in (epoch 1), released 1.8 s later: epoch 2, where a
    // rounded wait (2) would put the reply a second ahead of the server.
    let made = send(&mut s, ms(1100), CLIENT, &map(CLIENT, 81, 3600, 2, vec![]));
    let out = s.restamp(ms(2900), ip(CLIENT), &wire(&made), 1800).unwrap();
    let r = Response::parse(&out, &CodePoints::default()).unwrap();
    assert_eq!(r.header.epoch, 2);
}

#[test]
fn rfc6887_s8_5_a_held_reply_takes_the_one_epoch_of_its_requester() {
    let host = "198.51.100.50";
    let tp = PcpOption::ThirdParty(to_wire(ip(host)));
    let mut s = Server::new(
        ServerConfig {
            third_party_clients: vec!["198.51.100.0/28".parse().unwrap()],
            ..cfg()
        },
        T0,
    );
    let ms = |m: u64| Timestamp(T0.0 + m);
    let made = send(
        &mut s,
        ms(10_000),
        CLIENT,
        &map(CLIENT, 80, 3600, 1, vec![tp.clone()]),
    );
    let own = send(
        &mut s,
        ms(10_000),
        CLIENT,
        &map(CLIENT, 81, 3600, 2, vec![]),
    );
    let other = PcpOption::ThirdParty(to_wire(ip("198.51.100.51")));
    let for_other = send(
        &mut s,
        ms(10_000),
        CLIENT,
        &map(CLIENT, 82, 3600, 3, vec![other.clone()]),
    );
    let restamped = |s: &Server, reply: &Response| {
        let out = s
            .restamp(ms(13_500), ip(CLIENT), &wire(reply), 3500)
            .unwrap();
        Response::parse(&out, &CodePoints::default()).unwrap()
    };
    // Nothing lost yet: both replies carry the requester's epoch.
    assert_eq!(restamped(&s, &made).header.epoch, 13);
    assert_eq!(restamped(&s, &own).header.epoch, 13);
    // The named host lost its state at 11 s (an operator clear), and with
    // it the mapping the requester made for it: the requester's one epoch
    // restarted, and every reply to it says so, whichever host it names
    // (a client keeps one epoch per server, section 8.5).
    let sub = s
        .mappings()
        .iter()
        .find(|m| m.key.internal_ip == ip(host))
        .unwrap()
        .subscriber;
    s.clear(ms(11_000), portkeep_server::ClearSelector::Subscriber(sub));
    let r = restamped(&s, &for_other);
    assert_eq!(
        r.header.epoch, 2,
        "the requester's epoch, restarted at 11 s"
    );
    assert_eq!(r.options, vec![other]);
    assert_eq!(restamped(&s, &own).header.epoch, 2, "the same epoch");
    // The cleared mapping's own reply is not sent at all.
    assert!(s
        .restamp(ms(13_500), ip(CLIENT), &wire(&made), 3500)
        .is_none());
    let _ = tp;
}

#[test]
fn rfc6887_s15_restamping_never_turns_a_grant_into_a_deletion() {
    let mut s = server();
    // The grant must be one the server still holds, or it is not sent at all.
    let granted = send(&mut s, T0, CLIENT, &map(CLIENT, 80, 600, 1, vec![]));
    let reply = |lifetime: u32| {
        wire(&Response {
            header: portkeep_proto::ResponseHeader {
                result: ResultCode::SUCCESS,
                lifetime,
                epoch: 0,
            },
            data: granted.data.clone(),
            options: vec![],
        })
    };
    let later = Timestamp(T0.0 + 3000);
    let r = s.restamp(later, ip(CLIENT), &reply(2), 3000).unwrap();
    let r = Response::parse(&r, &CodePoints::default()).unwrap();
    assert_eq!(r.header.lifetime, 1, "zero would mean deleted");
    let r = s.restamp(later, ip(CLIENT), &reply(0), 3000).unwrap();
    let r = Response::parse(&r, &CodePoints::default()).unwrap();
    assert_eq!(r.header.lifetime, 0, "a deletion stays one");
    assert!(s.restamp(T0, ip(CLIENT), &[1, 2, 3], 3000).is_none());
}

// ---- Section 7.4: what a change the dataplane refused leaves -----------

fn refused_setup() -> (Server, portkeep_server::MappingRecord) {
    let mut s = server();
    let r = send(&mut s, T0, CLIENT, &map(CLIENT, 80, 600, 1, vec![]));
    assert_eq!(result(&r), ResultCode::SUCCESS);
    s.drain_changes().for_each(drop);
    // A renewal, 100 s later, that the dataplane then refuses.
    let later = Timestamp(T0.0 + 100_000);
    let r = send(&mut s, later, CLIENT, &map(CLIENT, 80, 600, 1, vec![]));
    assert_eq!(result(&r), ResultCode::SUCCESS);
    let m = s.mappings().pop().unwrap();
    (s, m)
}

#[test]
fn rfc6887_s7_4_a_refused_renewal_keeps_the_mapping_and_every_epoch() {
    let (mut s, m) = refused_setup();
    let now = Timestamp(T0.0 + 100_000);
    assert!(s.refused(now, &m.key, m.kind, m.nonce, portkeep_server::Refused::Kept));
    assert_eq!(
        s.mapping_count(),
        1,
        "the NAT still holds it: so does the server"
    );
    assert!(
        !s.drain_changes()
            .any(|c| matches!(c.change, Change::Removed { .. } | Change::EpochReset { .. })),
        "nothing removed, no epoch reset"
    );
    assert_eq!(s.requester_epoch(now, ip(CLIENT)), 100);
    assert!(s.poll_announcements(now).is_empty(), "nobody lost anything");
}

#[test]
fn rfc6887_s7_4_a_renewal_whose_mapping_the_nat_lost_resets_its_epoch_and_is_announced() {
    let (mut s, m) = refused_setup();
    let now = Timestamp(T0.0 + 100_000);
    assert!(s.refused(now, &m.key, m.kind, m.nonce, portkeep_server::Refused::Lost));
    assert_eq!(s.mapping_count(), 0, "taken back");
    let changes: Vec<_> = s.drain_changes().collect();
    assert!(changes.iter().any(|c| matches!(
        c.change,
        Change::Removed {
            reason: RemoveReason::Failed,
            ..
        }
    )));
    assert!(changes
        .iter()
        .any(|c| matches!(c.change, Change::EpochReset { .. })));
    // It carried traffic: its port is held for its client (section 15).
    assert!(changes
        .iter()
        .any(|c| matches!(&c.change, Change::PortHeld(h) if h.external == m.external)));
    assert_eq!(s.requester_epoch(now, ip(CLIENT)), 0, "its client lost it");
    let told = s.poll_announcements(now);
    assert!(
        matches!(&told[..], [portkeep_server::Announcement::Unicast { to, .. }] if to.ip() == ip(CLIENT)),
        "{told:?}"
    );
}

#[test]
fn rfc6887_s7_4_a_failed_creation_is_taken_back_and_loses_nothing() {
    let mut s = server();
    let r = send(&mut s, T0, CLIENT, &map(CLIENT, 80, 600, 1, vec![]));
    assert_eq!(result(&r), ResultCode::SUCCESS);
    let m = s.mappings().pop().unwrap();
    let now = Timestamp(T0.0 + 5_000);
    assert!(s.refused(
        now,
        &m.key,
        m.kind,
        m.nonce,
        portkeep_server::Refused::NotInstalled
    ));
    assert_eq!(s.mapping_count(), 0);
    let changes: Vec<_> = s.drain_changes().collect();
    assert!(!changes
        .iter()
        .any(|c| matches!(c.change, Change::EpochReset { .. })));
    // Never installed, so nothing can arrive late for it: no hold.
    assert!(!changes
        .iter()
        .any(|c| matches!(c.change, Change::PortHeld(_))));
    assert_eq!(s.requester_epoch(now, ip(CLIENT)), 5);
    assert!(s.poll_announcements(now).is_empty());
    // Another nonce's mapping is never touched.
    let r = send(&mut s, now, CLIENT, &map(CLIENT, 81, 600, 2, vec![]));
    assert_eq!(result(&r), ResultCode::SUCCESS);
    let other = s.mappings().pop().unwrap();
    assert!(!s.refused(
        now,
        &other.key,
        other.kind,
        [9; 12],
        portkeep_server::Refused::Lost
    ));
    assert_eq!(s.mapping_count(), 1);
}

// ---- Carrier controls: request and error-response rates ---------------

fn rate(count: u32, burst: u32) -> Option<portkeep_server::RateLimit> {
    Some(portkeep_server::RateLimit {
        count,
        per: std::time::Duration::from_secs(1),
        burst,
    })
}

/// RFC 6887 section 8.1.1 lets a server drop what it cannot serve (the
/// client retransmits): one subscriber sending faster than its request
/// rate is dropped, others are not, and it gets through again as its
/// bucket refills.
#[test]
fn rfc6887_s8_1_1_a_subscriber_over_its_request_rate_is_dropped_alone() {
    let mut s = Server::new(
        ServerConfig {
            request_rate: rate(5, 5),
            ..cfg()
        },
        T0,
    );
    let at = |ms: u64| Timestamp(T0.0 + ms);
    let mut out = Vec::new();
    for n in 0..5u8 {
        let req = map(CLIENT, 80 + u16::from(n), 600, n, vec![]);
        assert_eq!(s.handle(at(0), src(CLIENT), &req, &mut out), Outcome::Reply);
    }
    let req = map(CLIENT, 90, 600, 9, vec![]);
    assert_eq!(s.handle(at(0), src(CLIENT), &req, &mut out), Outcome::Drop);
    assert!(out.is_empty());
    assert_eq!(s.stats().rate_limited, 1);
    let other = "198.51.100.11";
    let req = map(other, 80, 600, 1, vec![]);
    assert_eq!(s.handle(at(0), src(other), &req, &mut out), Outcome::Reply);
    // One token every 200 ms.
    let req = map(CLIENT, 90, 600, 9, vec![]);
    assert_eq!(
        s.handle(at(150), src(CLIENT), &req, &mut out),
        Outcome::Drop
    );
    assert_eq!(
        s.handle(at(200), src(CLIENT), &req, &mut out),
        Outcome::Reply
    );
    assert_eq!(s.stats().rate_limited, 2);
}

/// An error response answers even a 2-octet datagram with 24 octets
/// (RFC 6887 section 8.2), a reflector for forged sources: past the
/// server's error rate, such requests get no answer; successes are not
/// limited by it.
#[test]
fn rfc6887_s8_2_error_responses_beyond_the_error_rate_are_not_sent() {
    let mut s = Server::new(
        ServerConfig {
            error_rate: rate(3, 3),
            ..cfg()
        },
        T0,
    );
    let mut out = Vec::new();
    // Version 1: never PCP, never NAT-PMP (RFC 6886 section 1.1).
    let bad = [1u8, 0];
    let mut answered = 0;
    for n in 0..5u8 {
        let from = format!("198.51.100.{}", 20 + n);
        if s.handle(T0, src(&from), &bad, &mut out) == Outcome::Reply {
            answered += 1;
            assert_eq!(out.len(), 24, "an UNSUPP_VERSION answer");
        }
    }
    assert_eq!(answered, 3);
    assert_eq!(s.stats().errors_suppressed, 2);
    let r = send(&mut s, T0, CLIENT, &map(CLIENT, 80, 600, 1, vec![]));
    assert_eq!(result(&r), ResultCode::SUCCESS);
    let later = Timestamp(T0.0 + 400);
    assert_eq!(
        s.handle(later, src("198.51.100.30"), &bad, &mut out),
        Outcome::Reply
    );
}

/// RFC 6887 section 8.2 leaves who may use the server to its policy: with
/// a client list, a datagram from anywhere else gets no answer at all,
/// not even an error.
#[test]
fn rfc6887_s8_2_only_the_configured_clients_are_answered() {
    let mut s = Server::new(
        ServerConfig {
            clients: vec!["198.51.100.0/28".parse().unwrap()],
            ..cfg()
        },
        T0,
    );
    let mut out = Vec::new();
    let inside = map(CLIENT, 80, 600, 1, vec![]);
    assert_eq!(s.handle(T0, src(CLIENT), &inside, &mut out), Outcome::Reply);
    let outsider = "203.0.113.5";
    let req = map(outsider, 80, 600, 1, vec![]);
    assert_eq!(s.handle(T0, src(outsider), &req, &mut out), Outcome::Drop);
    assert!(out.is_empty());
    assert_eq!(
        s.handle(T0, src(outsider), &[0, 0], &mut out),
        Outcome::Drop
    );
    assert_eq!(s.stats().not_clients, 2);
    assert_eq!(s.mapping_count(), 1);
}

/// RFC 6887 section 8.2: a PCP server never answers the external side.
/// With the interfaces it serves configured, a datagram that arrived on
/// another one, or on one not known, gets no answer at all, whatever
/// source address it carries (one from the inside can be forged).
#[test]
fn rfc6887_s8_2_only_the_configured_interfaces_are_answered() {
    let mut s = Server::new(
        ServerConfig {
            interfaces: vec![3, 7],
            ..cfg()
        },
        T0,
    );
    let mut out = Vec::new();
    let req = map(CLIENT, 80, 600, 1, vec![]);
    assert_eq!(
        s.handle_on(T0, src(CLIENT), Some(7), &req, &mut out),
        Outcome::Reply
    );
    let forged = map(CLIENT, 81, 600, 1, vec![]);
    assert_eq!(
        s.handle_on(T0, src(CLIENT), Some(2), &forged, &mut out),
        Outcome::Drop,
        "arrived on the external side"
    );
    assert!(out.is_empty());
    assert_eq!(
        s.handle_on(T0, src(CLIENT), None, &forged, &mut out),
        Outcome::Drop,
        "interface not known: fail closed"
    );
    assert_eq!(s.handle(T0, src(CLIENT), &[0, 0], &mut out), Outcome::Drop);
    assert_eq!(s.stats().wrong_interface, 3);
    assert_eq!(s.mapping_count(), 1);
}

/// A reply held for the backup (RFC 7767 section 3.2) whose mapping an
/// operator cleared meanwhile (failure-scenarios draft 2.6.2) is not sent
/// as made: the client would believe in a mapping the server no longer
/// has. It is dropped, and the client's retransmission makes it anew.
#[test]
fn rfc6887_s8_5_a_held_reply_whose_mapping_was_cleared_is_not_sent() {
    let mut s = server();
    let made = send(&mut s, T0, CLIENT, &map(CLIENT, 80, 3600, 1, vec![]));
    let kept = send(&mut s, T0, CLIENT, &map(CLIENT, 81, 3600, 2, vec![]));
    let later = Timestamp(T0.0 + 300);
    assert!(s.restamp(later, ip(CLIENT), &wire(&made), 300).is_some());
    let key = s
        .mappings()
        .iter()
        .find(|m| m.key.internal_port == 80)
        .unwrap()
        .key;
    s.clear(later, portkeep_server::ClearSelector::Mapping(key));
    assert!(
        s.restamp(later, ip(CLIENT), &wire(&made), 300).is_none(),
        "its mapping is gone"
    );
    assert!(s.restamp(later, ip(CLIENT), &wire(&kept), 300).is_some());
}
