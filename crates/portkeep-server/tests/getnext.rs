//! GET / NEXT (PCP failure-scenarios draft, section 4) against the server
//! core, driven with made-up time: the draft's examples (section 5),
//! ordering and walk guarantees (4.3, 4.6), embedded options (4.4),
//! authorisation (6) and every malformed input. Tests are named after the
//! section they check.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use portkeep_proto::addr::{to_af_wire, to_wire};
use portkeep_proto::{
    CodePoints, Filter, GetData, MapData, Next, NextItems, OpData, OptionCode, PcpOption, PeerData,
    Protocol, Request, RequestHeader, Response, ResultCode, MAX_MESSAGE_LEN,
};
use portkeep_server::{Outcome, Server, ServerConfig, Timestamp};

const T0: Timestamp = Timestamp(5_000_000);
const CP: CodePoints = CodePoints {
    get_opcode: portkeep_proto::Opcode::GET,
    next_option: OptionCode::NEXT,
    nonexist_map: ResultCode::NONEXIST_MAP,
};
const H1: &str = "198.51.100.1";
const H2: &str = "198.51.100.2";
const EXT: &str = "192.0.2.1";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn cfg() -> ServerConfig {
    ServerConfig {
        external_addresses: vec![ip(EXT)],
        port_min: 1024,
        port_max: 65535,
        max_lifetime: 86_400,
        ..ServerConfig::default()
    }
}

fn handle(s: &mut Server, now: Timestamp, from: &str, bytes: &[u8]) -> (Vec<u8>, Response) {
    let mut out = Vec::new();
    let src = SocketAddr::new(ip(from), 40000);
    assert_eq!(s.handle(now, src, bytes, &mut out), Outcome::Reply);
    assert!(out.len() <= MAX_MESSAGE_LEN, "{} octets", out.len());
    let r = Response::parse(&out, &CP).unwrap();
    (out, r)
}

fn request(from: &str, lifetime: u32, data: OpData, options: Vec<PcpOption>) -> Vec<u8> {
    Request {
        header: RequestHeader {
            lifetime,
            client_ip: to_wire(ip(from)),
        },
        data,
        options,
    }
    .to_bytes(&CP)
    .unwrap()
}

/// A MAP from `host` itself, suggesting `EXT:ext_port`.
fn map_req(
    host: &str,
    proto: Protocol,
    port: u16,
    ext_port: u16,
    lifetime: u32,
    opts: Vec<PcpOption>,
) -> Vec<u8> {
    request(
        host,
        lifetime,
        OpData::Map(MapData {
            nonce: nonce_of(host, proto, port),
            protocol: proto,
            internal_port: port,
            external_port: ext_port,
            external_ip: to_wire(ip(EXT)),
        }),
        opts,
    )
}

fn nonce_of(host: &str, proto: Protocol, port: u16) -> [u8; 12] {
    let mut n = [0u8; 12];
    if let IpAddr::V4(a) = ip(host) {
        n[..4].copy_from_slice(&a.octets());
    }
    n[4] = proto.0;
    n[5..7].copy_from_slice(&port.to_be_bytes());
    n
}

fn create(
    s: &mut Server,
    now: Timestamp,
    host: &str,
    proto: Protocol,
    port: u16,
    ext_port: u16,
    lifetime: u32,
) {
    let (_, r) = handle(
        s,
        now,
        host,
        &map_req(host, proto, port, ext_port, lifetime, vec![]),
    );
    assert_eq!(r.header.result, ResultCode::SUCCESS);
    if ext_port != 0 {
        assert_eq!(r.data.map_part().unwrap().external_port, ext_port);
    }
}

fn delete(s: &mut Server, now: Timestamp, host: &str, proto: Protocol, port: u16) {
    let (_, r) = handle(s, now, host, &map_req(host, proto, port, 0, 0, vec![]));
    assert_eq!(r.header.result, ResultCode::SUCCESS);
}

/// A GET filter: everything zero except what is given.
#[derive(Default, Clone, Copy)]
struct F {
    proto: u8,
    internal: Option<&'static str>,
    internal_port: u16,
    external: Option<&'static str>,
    external_port: u16,
}

fn get_data(f: F) -> GetData {
    let (internal_af, internal_ip) = f
        .internal
        .map_or((0, Ipv6Addr::UNSPECIFIED), |a| to_af_wire(ip(a)));
    let (external_af, external_ip) = f
        .external
        .map_or((0, Ipv6Addr::UNSPECIFIED), |a| to_af_wire(ip(a)));
    GetData {
        protocol: Protocol(f.proto),
        internal_af,
        external_af,
        internal_ip,
        external_ip,
        internal_port: f.internal_port,
        external_port: f.external_port,
    }
}

fn undefined(end: bool, codes: Vec<OptionCode>) -> Next {
    Next {
        protocol: Protocol::ALL,
        internal_af: 0,
        external_af: 0,
        more_end: u8::from(end),
        internal_ip: Ipv6Addr::UNSPECIFIED,
        external_ip: Ipv6Addr::UNSPECIFIED,
        lifetime: 0,
        internal_port: 0,
        external_port: 0,
        items: NextItems::Codes(codes),
    }
}

/// Section 4.5: a Defined locator is the last mapping received, with its
/// lifetime and options "reseted".
fn locator_of(n: &Next, end: bool, codes: Vec<OptionCode>) -> Next {
    Next {
        more_end: u8::from(end),
        lifetime: 0,
        items: NextItems::Codes(codes),
        ..n.clone()
    }
}

fn get_req(from: &str, f: F, next: Option<Next>, mut extra: Vec<PcpOption>) -> Vec<u8> {
    extra.extend(next.map(PcpOption::Next));
    request(from, 0, OpData::Get(get_data(f)), extra)
}

fn nexts(r: &Response) -> Vec<Next> {
    r.options
        .iter()
        .filter_map(|o| match o {
            PcpOption::Next(n) => Some(n.clone()),
            _ => None,
        })
        .collect()
}

/// (protocol, internal ip, internal port, external ip, external port,
/// remaining lifetime, END?) of a response NEXT.
type Row = (u8, IpAddr, u16, IpAddr, u16, u32, bool);

fn row(n: &Next) -> Row {
    let v4 = |w: Ipv6Addr| {
        let o = w.octets();
        IpAddr::from([o[0], o[1], o[2], o[3]])
    };
    assert_eq!((n.internal_af, n.external_af), (1, 1));
    (
        n.protocol.0,
        v4(n.internal_ip),
        n.internal_port,
        v4(n.external_ip),
        n.external_port,
        n.lifetime,
        n.is_end(),
    )
}

fn r(proto: Protocol, i: &str, ip_: u16, ep: u16, life: u32, end: bool) -> Row {
    (proto.0, ip(i), ip_, ip(EXT), ep, life, end)
}

/// Table 1 of the draft (section 5), verbatim: remaining lifetimes are
/// the requested lifetimes, read at the same instant.
fn table1() -> Server {
    let mut s = Server::new(cfg(), T0);
    create(&mut s, T0, H1, Protocol::UDP, 25655, 15659, 1659);
    create(&mut s, T0, H2, Protocol::TCP, 12354, 32654, 3600);
    create(&mut s, T0, H2, Protocol::TCP, 8596, 25659, 6000);
    create(&mut s, T0, H1, Protocol::UDP, 19856, 42654, 7200);
    create(&mut s, T0, H1, Protocol::TCP, 15775, 32652, 9000);
    s
}

// ---- Section 5: the draft's flow examples ------------------------------

/// Figure 3: a pure GET of a mapping that does not exist is NONEXIST_MAP,
/// with no NEXT (section 4.6).
#[test]
fn draft_s5_fig3_failed_get_is_nonexist_map() {
    let mut s = table1();
    let f = F {
        proto: 6,
        internal: Some(H1),
        internal_port: 59864,
        ..F::default()
    };
    let (_, resp) = handle(
        &mut s,
        T0,
        H1,
        &get_req(H1, f, Some(undefined(true, vec![])), vec![]),
    );
    assert_eq!(resp.header.result, ResultCode::NONEXIST_MAP);
    assert!(nexts(&resp).is_empty());
    assert_eq!(resp.data, OpData::Get(get_data(f)));
}

/// Figure 4: a pure GET (END, Undefined locator, filter naming the
/// mapping) returns it with its remaining lifetime; a MAP with lifetime 0
/// then deletes it. The figure's request says TCP but its answer (external
/// port 15659, lifetime 1659) is Table 1's UDP row, the only mapping on
/// internal port 25655: we ask for UDP. Asked literally (TCP 25655), Table
/// 1 has no such mapping, so the answer is NONEXIST_MAP.
#[test]
fn draft_s5_fig4_pure_get_then_delete() {
    let mut s = table1();
    let udp = F {
        proto: 17,
        internal: Some(H1),
        internal_port: 25655,
        ..F::default()
    };
    let (_, resp) = handle(
        &mut s,
        T0,
        H1,
        &get_req(H1, udp, Some(undefined(true, vec![])), vec![]),
    );
    assert_eq!(resp.header.result, ResultCode::SUCCESS);
    let got: Vec<Row> = nexts(&resp).iter().map(row).collect();
    assert_eq!(got, vec![r(Protocol::UDP, H1, 25655, 15659, 1659, true)]);

    let literal = F { proto: 6, ..udp };
    let (_, resp) = handle(
        &mut s,
        T0,
        H1,
        &get_req(H1, literal, Some(undefined(true, vec![])), vec![]),
    );
    assert_eq!(resp.header.result, ResultCode::NONEXIST_MAP);

    // (3) MAP with lifetime 0 deletes it; the same GET then finds nothing.
    delete(&mut s, T0, H1, Protocol::UDP, 25655);
    let (_, resp) = handle(
        &mut s,
        T0,
        H1,
        &get_req(H1, udp, Some(undefined(true, vec![])), vec![]),
    );
    assert_eq!(resp.header.result, ResultCode::NONEXIST_MAP);
}

/// Figure 5: a MORE GET filtered on internal address 198.51.100.2 returns
/// both of its mappings in one response, the last marked END. The draft's
/// server sorts by remaining lifetime; ours is lexicographic (section
/// 4.3 leaves the choice to the implementer), so internal port 8596 comes
/// before 12354. Same mappings, same lifetimes.
#[test]
fn draft_s5_fig5_more_returns_the_hosts_mappings() {
    let mut s = table1();
    let f = F {
        internal: Some(H2),
        ..F::default()
    };
    let (_, resp) = handle(
        &mut s,
        T0,
        H2,
        &get_req(H2, f, Some(undefined(false, vec![])), vec![]),
    );
    assert_eq!(resp.header.result, ResultCode::SUCCESS);
    let got: Vec<Row> = nexts(&resp).iter().map(row).collect();
    assert_eq!(
        got,
        vec![
            r(Protocol::TCP, H2, 8596, 25659, 6000, false),
            r(Protocol::TCP, H2, 12354, 32654, 3600, true),
        ]
    );
}

/// Figure 6: one internal port used for TCP and UDP. Table 1's TCP row of
/// 198.51.100.1 has internal port 15775 while the figure shows 25655 (the
/// draft contradicts itself); we build the table the figure describes.
/// The figure's filter gives a port without a protocol, which section 4.1
/// itself calls unsound, so that literal request is MALFORMED_REQUEST; the
/// same mappings come back for the host's whole table and per protocol.
#[test]
fn draft_s5_fig6_same_internal_port_for_tcp_and_udp() {
    let mut s = Server::new(cfg(), T0);
    create(&mut s, T0, H1, Protocol::UDP, 25655, 15659, 1659);
    create(&mut s, T0, H2, Protocol::TCP, 12354, 32654, 3600);
    create(&mut s, T0, H2, Protocol::TCP, 8596, 25659, 6000);
    create(&mut s, T0, H1, Protocol::TCP, 25655, 32652, 9000);

    let literal = F {
        internal: Some(H1),
        internal_port: 25655,
        ..F::default()
    };
    let (_, resp) = handle(
        &mut s,
        T0,
        H1,
        &get_req(H1, literal, Some(undefined(false, vec![])), vec![]),
    );
    assert_eq!(resp.header.result, ResultCode::MALFORMED_REQUEST);

    let host = F {
        internal: Some(H1),
        ..F::default()
    };
    let (_, resp) = handle(
        &mut s,
        T0,
        H1,
        &get_req(H1, host, Some(undefined(false, vec![])), vec![]),
    );
    let got: Vec<Row> = nexts(&resp).iter().map(row).collect();
    // Lexicographic: TCP (6) before UDP (17).
    assert_eq!(
        got,
        vec![
            r(Protocol::TCP, H1, 25655, 32652, 9000, false),
            r(Protocol::UDP, H1, 25655, 15659, 1659, true),
        ]
    );
    for (proto, want) in [
        (6u8, r(Protocol::TCP, H1, 25655, 32652, 9000, true)),
        (17, r(Protocol::UDP, H1, 25655, 15659, 1659, true)),
    ] {
        let f = F { proto, ..literal };
        let (_, resp) = handle(
            &mut s,
            T0,
            H1,
            &get_req(H1, f, Some(undefined(false, vec![])), vec![]),
        );
        assert_eq!(nexts(&resp).iter().map(row).collect::<Vec<_>>(), vec![want]);
    }
}

// ---- Section 4.1: the filter -------------------------------------------

/// Responses copy the GET body bit for bit, the reserved octet included
/// (its value is otherwise ignored).
#[test]
fn draft_s4_1_response_copies_the_body_bit_for_bit() {
    let mut s = table1();
    let mut bytes = get_req(
        H1,
        F {
            proto: 17,
            ..F::default()
        },
        Some(undefined(false, vec![])),
        vec![],
    );
    bytes[24 + 3] = 0xa5; // reserved
    for b in [
        bytes.clone(),
        get_req(
            H1,
            F {
                proto: 6,
                internal_port: 1,
                ..F::default()
            },
            None,
            vec![],
        ),
    ] {
        let (out, _) = handle(&mut s, T0, H1, &b);
        assert_eq!(out[24..64], b[24..64]);
    }
    let (_, resp) = handle(&mut s, T0, H1, &bytes);
    assert_eq!(resp.header.result, ResultCode::SUCCESS);
    assert_eq!(nexts(&resp).len(), 2, "reserved octet is ignored");
}

/// Unsound filters are MALFORMED_REQUEST: a port with protocol "any", an
/// address with family "any", unknown families, an IPv4 address not
/// followed by 96 zero bits, on either side.
#[test]
fn draft_s4_1_unsound_filters_are_malformed_request() {
    let mut s = table1();
    let mut cases: Vec<(&str, GetData)> = Vec::new();
    cases.push((
        "internal port, protocol any",
        get_data(F {
            internal_port: 25655,
            ..F::default()
        }),
    ));
    cases.push((
        "external port, protocol any",
        get_data(F {
            external_port: 15659,
            ..F::default()
        }),
    ));
    let mut g = get_data(F::default());
    g.internal_ip = to_wire(ip(H1));
    cases.push(("internal address, family any", g));
    let mut g = get_data(F::default());
    g.external_ip = "2001:db8::1".parse().unwrap();
    cases.push(("external address, family any", g));
    let mut g = get_data(F {
        internal: Some(H1),
        ..F::default()
    });
    g.internal_af = 3;
    cases.push(("internal family 3", g));
    let mut g = get_data(F {
        external: Some(EXT),
        ..F::default()
    });
    g.external_af = 9;
    cases.push(("external family 9", g));
    let mut g = get_data(F::default());
    g.internal_af = 1;
    g.internal_ip = to_wire(ip(H1)); // IPv4-mapped: the tail is not zero
    cases.push(("internal IPv4 not followed by 96 zero bits", g));
    let mut g = get_data(F::default());
    g.external_af = 1;
    let mut o = [0u8; 16];
    o[..4].copy_from_slice(&[192, 0, 2, 1]);
    o[15] = 1;
    g.external_ip = Ipv6Addr::from(o);
    cases.push(("external IPv4 not followed by 96 zero bits", g));
    for (what, g) in cases {
        for next in [None, Some(undefined(false, vec![]))] {
            let mut opts = Vec::new();
            opts.extend(next.map(PcpOption::Next));
            let (_, resp) = handle(&mut s, T0, H1, &request(H1, 0, OpData::Get(g), opts));
            assert_eq!(resp.header.result, ResultCode::MALFORMED_REQUEST, "{what}");
        }
    }
    // Family with the unspecified address is sound: any address of it.
    let f = F {
        internal: Some("0.0.0.0"),
        external: Some("0.0.0.0"),
        ..F::default()
    };
    let (_, resp) = handle(
        &mut s,
        T0,
        H1,
        &get_req(H1, f, Some(undefined(false, vec![])), vec![]),
    );
    assert_eq!(nexts(&resp).len(), 3);
    let f = F {
        internal: Some("::"),
        ..F::default()
    };
    let (_, resp) = handle(
        &mut s,
        T0,
        H1,
        &get_req(H1, f, Some(undefined(false, vec![])), vec![]),
    );
    assert_eq!(
        resp.header.result,
        ResultCode::NONEXIST_MAP,
        "no IPv6 mappings"
    );
}

/// Every field of the filter narrows the result.
#[test]
fn draft_s4_1_each_filter_field_narrows() {
    let mut s = table1();
    let count = |s: &mut Server, f: F| {
        let (_, resp) = handle(
            s,
            T0,
            H1,
            &get_req(H1, f, Some(undefined(false, vec![])), vec![]),
        );
        nexts(&resp).len()
    };
    assert_eq!(count(&mut s, F::default()), 3);
    assert_eq!(
        count(
            &mut s,
            F {
                proto: 17,
                ..F::default()
            }
        ),
        2
    );
    assert_eq!(
        count(
            &mut s,
            F {
                proto: 17,
                internal_port: 19856,
                ..F::default()
            }
        ),
        1
    );
    assert_eq!(
        count(
            &mut s,
            F {
                proto: 6,
                external_port: 32652,
                ..F::default()
            }
        ),
        1
    );
    assert_eq!(
        count(
            &mut s,
            F {
                proto: 6,
                external_port: 32654,
                ..F::default()
            }
        ),
        0
    );
    assert_eq!(
        count(
            &mut s,
            F {
                external: Some(EXT),
                ..F::default()
            }
        ),
        3
    );
    assert_eq!(
        count(
            &mut s,
            F {
                external: Some("192.0.2.9"),
                ..F::default()
            }
        ),
        0
    );
    assert_eq!(
        count(
            &mut s,
            F {
                internal: Some(H1),
                proto: 6,
                ..F::default()
            }
        ),
        1
    );
}

// ---- Sections 4.4-4.6: NEXT, locators, MORE and END -----------------------

/// Section 4.5: a GET without NEXT says whether at least one mapping
/// matches: SUCCESS without NEXT, or NONEXIST_MAP.
#[test]
fn draft_s4_5_get_without_next_asks_whether_one_exists() {
    let mut s = table1();
    let (_, resp) = handle(&mut s, T0, H1, &get_req(H1, F::default(), None, vec![]));
    assert_eq!(resp.header.result, ResultCode::SUCCESS);
    assert!(nexts(&resp).is_empty());
    let (_, resp) = handle(
        &mut s,
        T0,
        "198.51.100.3",
        &get_req("198.51.100.3", F::default(), None, vec![]),
    );
    assert_eq!(resp.header.result, ResultCode::NONEXIST_MAP);
}

/// Section 4.6: an END request returns the first mapping of the list from
/// the locator, the locator itself when it exists, marked END only if
/// nothing follows; a locator that no longer exists continues with the
/// first mapping greater than it.
#[test]
fn draft_s4_6_end_request_and_locators() {
    let mut s = table1();
    let (_, resp) = handle(
        &mut s,
        T0,
        H1,
        &get_req(H1, F::default(), Some(undefined(true, vec![])), vec![]),
    );
    let first = nexts(&resp);
    assert_eq!(
        first.iter().map(row).collect::<Vec<_>>(),
        vec![r(Protocol::TCP, H1, 15775, 32652, 9000, false)]
    );
    // Defined locator equal to an existing mapping: that mapping again.
    let (_, resp) = handle(
        &mut s,
        T0,
        H1,
        &get_req(
            H1,
            F::default(),
            Some(locator_of(&first[0], true, vec![])),
            vec![],
        ),
    );
    assert_eq!(
        nexts(&resp).iter().map(row).collect::<Vec<_>>(),
        vec![r(Protocol::TCP, H1, 15775, 32652, 9000, false)]
    );
    // Once deleted, the same locator leads to the next mapping.
    delete(&mut s, T0, H1, Protocol::TCP, 15775);
    let (_, resp) = handle(
        &mut s,
        T0,
        H1,
        &get_req(
            H1,
            F::default(),
            Some(locator_of(&first[0], false, vec![])),
            vec![],
        ),
    );
    assert_eq!(
        nexts(&resp).iter().map(row).collect::<Vec<_>>(),
        vec![
            r(Protocol::UDP, H1, 19856, 42654, 7200, false),
            r(Protocol::UDP, H1, 25655, 15659, 1659, true)
        ]
    );
    // The greatest mapping as locator: itself, marked END.
    let last = nexts(&resp)[1].clone();
    let (_, resp) = handle(
        &mut s,
        T0,
        H1,
        &get_req(
            H1,
            F::default(),
            Some(locator_of(&last, false, vec![])),
            vec![],
        ),
    );
    assert_eq!(
        nexts(&resp).iter().map(row).collect::<Vec<_>>(),
        vec![r(Protocol::UDP, H1, 25655, 15659, 1659, true)]
    );
    // Past the greatest mapping nothing is left: NONEXIST_MAP.
    delete(&mut s, T0, H1, Protocol::UDP, 25655);
    let (_, resp) = handle(
        &mut s,
        T0,
        H1,
        &get_req(
            H1,
            F::default(),
            Some(locator_of(&last, false, vec![])),
            vec![],
        ),
    );
    assert_eq!(resp.header.result, ResultCode::NONEXIST_MAP);
    assert!(nexts(&resp).is_empty());
    // Any non-zero MORE/END value means END (section 4.4).
    let mut n = undefined(true, vec![]);
    n.more_end = 7;
    let (_, resp) = handle(&mut s, T0, H1, &get_req(H1, F::default(), Some(n), vec![]));
    assert_eq!(nexts(&resp).len(), 1);
}

/// A minimal walker over the sans-IO core (the real one is in
/// portkeep-client): MORE requests, the locator copy dropped.
fn walk(
    s: &mut Server,
    from: &str,
    f: F,
    codes: Vec<OptionCode>,
    mut between: impl FnMut(&mut Server, usize),
) -> (Vec<Next>, usize) {
    let mut got = Vec::new();
    let mut loc: Option<Next> = None;
    let mut requests = 0;
    loop {
        let next = match &loc {
            None => undefined(false, codes.clone()),
            Some(l) => locator_of(l, false, codes.clone()),
        };
        let (out, resp) = handle(s, T0, from, &get_req(from, f, Some(next), vec![]));
        requests += 1;
        assert!(out.len() <= MAX_MESSAGE_LEN);
        if resp.header.result == ResultCode::NONEXIST_MAP {
            break;
        }
        assert_eq!(resp.header.result, ResultCode::SUCCESS);
        let ns = nexts(&resp);
        assert!(!ns.is_empty());
        let mut fresh = 0;
        for n in &ns {
            let dup = loc.as_ref().is_some_and(|l| same_mapping(l, n));
            if !dup {
                got.push(n.clone());
                fresh += 1;
            }
        }
        assert!(
            fresh > 0 || ns.last().unwrap().is_end(),
            "a walk always progresses"
        );
        let last = ns.last().unwrap().clone();
        if last.is_end() {
            break;
        }
        loc = Some(last);
        between(s, requests);
        assert!(requests < 100_000);
    }
    (got, requests)
}

/// Section 4.3 equality.
fn same_mapping(a: &Next, b: &Next) -> bool {
    (
        a.protocol,
        a.internal_af,
        a.external_af,
        a.internal_ip,
        a.external_ip,
        a.internal_port,
        a.external_port,
    ) == (
        b.protocol,
        b.internal_af,
        b.external_af,
        b.internal_ip,
        b.external_ip,
        b.internal_port,
        b.external_port,
    )
}

/// Section 4.6: a MORE response packs as many NEXTs as fit in 1100
/// octets (64 of header and body, 48 per bare NEXT: 21), marks them MORE
/// while more follow, and the walk ends on END with each mapping once.
#[test]
fn draft_s4_6_more_packs_until_1100_octets() {
    let mut s = Server::new(cfg(), T0);
    for p in 0..50u16 {
        create(&mut s, T0, H1, Protocol::UDP, 2000 + p, 0, 3600);
    }
    let (out, resp) = handle(
        &mut s,
        T0,
        H1,
        &get_req(H1, F::default(), Some(undefined(false, vec![])), vec![]),
    );
    let ns = nexts(&resp);
    assert_eq!(ns.len(), 21);
    assert_eq!(out.len(), 64 + 21 * 48);
    assert!(out.len() + 48 > MAX_MESSAGE_LEN, "a 22nd would not fit");
    assert!(ns.iter().all(|n| !n.is_end()));
    let ports: Vec<u16> = ns.iter().map(|n| n.internal_port).collect();
    assert_eq!(
        ports,
        (2000..2021).collect::<Vec<_>>(),
        "lexicographic order"
    );
    let (all, requests) = walk(&mut s, H1, F::default(), vec![], |_, _| {});
    let ports: Vec<u16> = all.iter().map(|n| n.internal_port).collect();
    assert_eq!(ports, (2000..2050).collect::<Vec<_>>());
    assert_eq!(requests, 3, "21 + 20 new (+ the locator copy) + 9");
    assert!(all.last().unwrap().is_end());
}

/// Section 4.4: each returned mapping embeds the options listed in the
/// request NEXT that it has: FILTER (one per rule, 128-bit prefix
/// length), DESCRIPTION, THIRD_PARTY (for mappings made with it),
/// CHECKPOINT_REQUIRED (when check-pointed). Unknown codes are ignored,
/// and nothing is embedded unless asked for.
#[test]
fn draft_s4_4_embedded_options() {
    let mut c = cfg();
    c.third_party_clients = vec!["198.51.100.200/32".parse().unwrap()];
    let mut s = Server::new(c, T0);
    s.set_backup_state(portkeep_server::BackupState::InSync);
    let filter = |a: &str, len: u8, port: u16| {
        PcpOption::Filter(Filter {
            prefix_len: len,
            remote_port: port,
            remote_ip: to_wire(ip(a)),
        })
    };
    let opts = vec![
        filter("203.0.113.0", 120, 0),
        filter("203.0.113.77", 128, 443),
        PcpOption::Description("web".into()),
        PcpOption::CheckpointRequired,
    ];
    let (_, resp) = handle(
        &mut s,
        T0,
        H1,
        &map_req(H1, Protocol::TCP, 80, 0, 3600, opts),
    );
    assert_eq!(resp.header.result, ResultCode::SUCCESS);
    create(&mut s, T0, H1, Protocol::TCP, 81, 0, 3600);
    // A THIRD_PARTY mapping of H1 made by the allow-listed client.
    let mut tp = map_req(
        "198.51.100.200",
        Protocol::TCP,
        82,
        0,
        3600,
        vec![PcpOption::ThirdParty(to_wire(ip(H1)))],
    );
    tp[8..24].copy_from_slice(&to_wire(ip("198.51.100.200")).octets());
    let (_, resp) = handle(&mut s, T0, "198.51.100.200", &tp);
    assert_eq!(resp.header.result, ResultCode::SUCCESS);

    let codes = vec![
        OptionCode::FILTER,
        OptionCode::DESCRIPTION,
        OptionCode(200), // unknown: ignored
        OptionCode::THIRD_PARTY,
        OptionCode::CHECKPOINT_REQUIRED,
        OptionCode::FILTER, // repeated: once
    ];
    let (_, resp) = handle(
        &mut s,
        T0,
        H1,
        &get_req(H1, F::default(), Some(undefined(false, codes)), vec![]),
    );
    let ns = nexts(&resp);
    assert_eq!(ns.len(), 3);
    let items = |n: &Next| match &n.items {
        NextItems::Options(o) => o.clone(),
        NextItems::Codes(_) => panic!("codes in a response"),
    };
    assert_eq!(
        items(&ns[0]),
        vec![
            filter("203.0.113.0", 120, 0),
            filter("203.0.113.77", 128, 443),
            PcpOption::Description("web".into()),
            PcpOption::CheckpointRequired,
        ]
    );
    assert_eq!(items(&ns[1]), vec![]);
    assert_eq!(items(&ns[2]), vec![PcpOption::ThirdParty(to_wire(ip(H1)))]);
    // Not asked for: nothing embedded.
    let (_, resp) = handle(
        &mut s,
        T0,
        H1,
        &get_req(H1, F::default(), Some(undefined(false, vec![])), vec![]),
    );
    assert!(nexts(&resp).iter().all(|n| items(n).is_empty()));
}

/// Section 4.6 with large embedded options: every response stays within
/// 1100 octets, the locator's copy gives way, and the walk still returns
/// every mapping once, with its description whenever it fits.
#[test]
fn draft_s4_6_large_embedded_options_still_progress() {
    let mut s = Server::new(cfg(), T0);
    let long = "d".repeat(900);
    for p in 0..6u16 {
        let (_, resp) = handle(
            &mut s,
            T0,
            H1,
            &map_req(
                H1,
                Protocol::TCP,
                3000 + p,
                0,
                3600,
                vec![PcpOption::Description(long.clone())],
            ),
        );
        assert_eq!(resp.header.result, ResultCode::SUCCESS);
    }
    let (all, requests) = walk(
        &mut s,
        H1,
        F::default(),
        vec![OptionCode::DESCRIPTION],
        |_, _| {},
    );
    assert_eq!(
        all.iter().map(|n| n.internal_port).collect::<Vec<_>>(),
        (3000..3006).collect::<Vec<_>>()
    );
    assert_eq!(requests, 6);
    for n in &all {
        assert_eq!(
            n.items,
            NextItems::Options(vec![PcpOption::Description(long.clone())])
        );
    }
}

/// Section 4.3: lexicographic order, stable under renewals (a lifetime
/// order would move a renewed mapping), and PEER entries are not returned
/// (NEXT cannot express the remote peer).
#[test]
fn draft_s4_3_order_is_stable_and_peers_are_left_out() {
    let mut s = table1();
    let keys = |resp: &Response| -> Vec<(u8, u16, u16)> {
        nexts(resp)
            .iter()
            .map(|n| (n.protocol.0, n.internal_port, n.external_port))
            .collect()
    };
    let (_, resp) = handle(
        &mut s,
        T0,
        H1,
        &get_req(H1, F::default(), Some(undefined(false, vec![])), vec![]),
    );
    let before = keys(&resp);
    assert_eq!(
        before,
        vec![(6, 15775, 32652), (17, 19856, 42654), (17, 25655, 15659)]
    );
    let later = T0 + Duration::from_secs(10);
    create(&mut s, later, H1, Protocol::UDP, 25655, 15659, 20_000);
    let peer = request(
        H1,
        3600,
        OpData::Peer(PeerData {
            map: MapData {
                nonce: nonce_of(H1, Protocol::TCP, 4444),
                protocol: Protocol::TCP,
                internal_port: 4444,
                external_port: 0,
                external_ip: Ipv6Addr::UNSPECIFIED,
            },
            remote_port: 80,
            remote_ip: to_wire(ip("203.0.113.1")),
        }),
        vec![],
    );
    let (_, resp) = handle(&mut s, later, H1, &peer);
    assert_eq!(resp.header.result, ResultCode::SUCCESS);
    let mut out = Vec::new();
    s.handle(
        later,
        SocketAddr::new(ip(H1), 1),
        &get_req(H1, F::default(), Some(undefined(false, vec![])), vec![]),
        &mut out,
    );
    let resp = Response::parse(&out, &CP).unwrap();
    assert_eq!(before, keys(&resp), "renewal and PEER change nothing");
    let lifetimes: Vec<u32> = nexts(&resp).iter().map(|n| n.lifetime).collect();
    assert_eq!(lifetimes, vec![8990, 7190, 20_000]);
}

// ---- Section 6: authorisation -----------------------------------------------

/// A client sees only the mappings it may delete: its own address's. A
/// filter naming another host matches nothing (no error that would leak
/// existence); THIRD_PARTY needs the allow-list (NOT_AUTHORIZED), and an
/// allow-listed client sees the host it names.
#[test]
fn draft_s6_other_hosts_mappings_are_invisible() {
    let mut c = cfg();
    c.third_party_clients = vec!["198.51.100.200/32".parse().unwrap()];
    let mut s = Server::new(c, T0);
    create(&mut s, T0, H1, Protocol::UDP, 25655, 15659, 1659);
    create(&mut s, T0, H2, Protocol::TCP, 12354, 32654, 3600);
    let hosts = |resp: &Response| nexts(resp).iter().map(|n| row(n).1).collect::<HashSet<_>>();

    let (_, resp) = handle(
        &mut s,
        T0,
        H2,
        &get_req(H2, F::default(), Some(undefined(false, vec![])), vec![]),
    );
    assert_eq!(hosts(&resp), HashSet::from([ip(H2)]));
    let f = F {
        internal: Some(H1),
        ..F::default()
    };
    let (_, resp) = handle(
        &mut s,
        T0,
        H2,
        &get_req(H2, f, Some(undefined(false, vec![])), vec![]),
    );
    assert_eq!(resp.header.result, ResultCode::NONEXIST_MAP);
    let (_, resp) = handle(&mut s, T0, H2, &get_req(H2, f, None, vec![]));
    assert_eq!(resp.header.result, ResultCode::NONEXIST_MAP);

    let tp = vec![PcpOption::ThirdParty(to_wire(ip(H1)))];
    let (_, resp) = handle(
        &mut s,
        T0,
        H2,
        &get_req(H2, F::default(), Some(undefined(false, vec![])), tp.clone()),
    );
    assert_eq!(resp.header.result, ResultCode::NOT_AUTHORIZED);

    let admin = "198.51.100.200";
    let (_, resp) = handle(
        &mut s,
        T0,
        admin,
        &get_req(
            admin,
            F::default(),
            Some(undefined(false, vec![])),
            tp.clone(),
        ),
    );
    assert_eq!(resp.header.result, ResultCode::SUCCESS);
    assert_eq!(hosts(&resp), HashSet::from([ip(H1)]));
    assert!(resp.options.contains(&tp[0]), "THIRD_PARTY echoed");
    let (_, resp) = handle(
        &mut s,
        T0,
        admin,
        &get_req(admin, F::default(), Some(undefined(false, vec![])), vec![]),
    );
    assert_eq!(
        resp.header.result,
        ResultCode::NONEXIST_MAP,
        "without THIRD_PARTY: its own, none"
    );
    let me = vec![PcpOption::ThirdParty(to_wire(ip(admin)))];
    let (_, resp) = handle(&mut s, T0, admin, &get_req(admin, F::default(), None, me));
    assert_eq!(
        resp.header.result,
        ResultCode::MALFORMED_REQUEST,
        "RFC 6887 13.1: naming itself"
    );
}

/// Sections 4.3 and 4.6 under churn: 10,000 mappings over 20 subscribers;
/// the caller walks its 2,000 while a writer, between GET requests,
/// creates and deletes mappings of the caller and of others and renews
/// some of the caller's. Every mapping of the caller that existed through
/// the whole walk comes back exactly once, nothing comes back twice, and
/// nothing of another subscriber appears.
#[test]
fn draft_s4_3_walk_of_10000_mappings_under_concurrent_writes() {
    let mut c = cfg();
    c.max_mappings_per_subscriber = 10_000;
    let mut s = Server::new(c, T0);
    let caller = "10.0.0.1";
    let others: Vec<String> = (2..=20).map(|i| format!("10.0.{i}.1")).collect();
    let host = |i: usize| -> &'static str { Box::leak(others[i].clone().into_boxed_str()) };
    // The caller's stable mappings on even ports, churn on odd ports.
    for k in 0..2000u16 {
        create(&mut s, T0, caller, Protocol::TCP, 10_000 + 2 * k, 0, 3600);
    }
    for (i, _) in others.iter().enumerate() {
        for k in 0..422u16 {
            create(
                &mut s,
                T0,
                host(i),
                if k % 2 == 0 {
                    Protocol::TCP
                } else {
                    Protocol::UDP
                },
                10_000 + k,
                0,
                3600,
            );
        }
    }
    assert!(s.mapping_count() >= 10_000);
    let stable: BTreeMap<u16, ()> = (0..2000u16).map(|k| (10_000 + 2 * k, ())).collect();
    let mut created_odd = Vec::new();
    let (got, requests) = walk(&mut s, caller, F::default(), vec![], |s, step| {
        let k = u16::try_from(step).unwrap();
        // Create caller mappings ahead of and behind the walk.
        for port in [
            10_001 + 2 * ((k * 37) % 2000),
            10_001 + 2 * ((k * 11) % 2000),
        ] {
            create(s, T0, caller, Protocol::TCP, port, 0, 3600);
            created_odd.push(port);
        }
        // Delete some of them again.
        if step % 3 == 0 {
            if let Some(p) = created_odd.pop() {
                delete(s, T0, caller, Protocol::TCP, p);
            }
        }
        // Renew a stable mapping (same nonce; the order must not move).
        create(
            s,
            T0,
            caller,
            Protocol::TCP,
            10_000 + 2 * ((k * 53) % 2000),
            0,
            7200,
        );
        // Other subscribers churn too, including a UDP mapping of the caller's port range.
        let o = host(usize::from(k) % 19);
        create(s, T0, o, Protocol::UDP, 30_000 + k, 0, 3600);
        delete(s, T0, o, Protocol::TCP, 10_000 + 2 * (k % 200));
    });
    assert!(requests > 90, "{requests} requests");
    let mut seen = HashSet::new();
    for n in &got {
        assert_eq!(row(n).1, ip(caller), "another subscriber's mapping");
        assert!(
            seen.insert((n.protocol.0, n.internal_port)),
            "repeated {}",
            n.internal_port
        );
    }
    for port in stable.keys() {
        assert!(seen.contains(&(6, *port)), "skipped {port}");
    }
    // The order of what came back is strictly increasing.
    let ports: Vec<u16> = got.iter().map(|n| n.internal_port).collect();
    assert!(ports.windows(2).all(|w| w[0] < w[1]));
}

// ---- Malformed GET / NEXT inputs ------------------------------------------

/// Each malformed GET/NEXT input gets its defined error: two NEXT options
/// (at most one in requests, section 4.4) and a locator that is not a
/// mapping's fields (families, IPv4 tail) are MALFORMED_OPTION (RFC 6887
/// section 7.3), as are a NEXT too short for its fixed part, a NEXT in a
/// MAP request and a FILTER in a GET (mandatory options not valid for the
/// opcode); an unknown mandatory option is UNSUPP_OPTION; a GET too short
/// for its body is MALFORMED_REQUEST.
#[test]
fn draft_s4_4_malformed_next_inputs() {
    let mut s = table1();
    let code = |s: &mut Server, bytes: &[u8]| handle(s, T0, H1, bytes).1.header.result;

    let two = get_req(
        H1,
        F::default(),
        Some(undefined(false, vec![])),
        vec![PcpOption::Next(undefined(true, vec![]))],
    );
    assert_eq!(code(&mut s, &two), ResultCode::MALFORMED_OPTION);

    let good = {
        let (_, resp) = handle(
            &mut s,
            T0,
            H1,
            &get_req(H1, F::default(), Some(undefined(true, vec![])), vec![]),
        );
        locator_of(&nexts(&resp)[0], false, vec![])
    };
    let mut bad_af = good.clone();
    bad_af.internal_af = 3;
    let mut any_af = good.clone();
    any_af.external_af = 0;
    let mut v4_tail = good.clone();
    v4_tail.internal_ip = to_wire(ip(H1));
    let mut partial = undefined(false, vec![]);
    partial.internal_port = 25655;
    for (what, n) in [
        ("family 3", bad_af),
        ("family any", any_af),
        ("IPv4 tail", v4_tail),
        ("partly zero", partial),
    ] {
        assert_eq!(
            code(&mut s, &get_req(H1, F::default(), Some(n), vec![])),
            ResultCode::MALFORMED_OPTION,
            "{what}"
        );
    }
    // A locator's lifetime "MUST be ignored".
    let mut with_lifetime = good.clone();
    with_lifetime.lifetime = 77;
    assert_eq!(
        code(
            &mut s,
            &get_req(H1, F::default(), Some(with_lifetime), vec![])
        ),
        ResultCode::SUCCESS
    );

    // NEXT shorter than 44 octets.
    let mut short = request(H1, 0, OpData::Get(get_data(F::default())), vec![]);
    short.extend_from_slice(&[OptionCode::NEXT.0, 0, 0, 40]);
    short.extend_from_slice(&[0; 40]);
    assert_eq!(code(&mut s, &short), ResultCode::MALFORMED_OPTION);

    let next_in_map = map_req(
        H1,
        Protocol::TCP,
        5000,
        0,
        3600,
        vec![PcpOption::Next(undefined(false, vec![]))],
    );
    assert_eq!(code(&mut s, &next_in_map), ResultCode::MALFORMED_OPTION);
    let filter_in_get = get_req(
        H1,
        F::default(),
        None,
        vec![PcpOption::Filter(Filter {
            prefix_len: 128,
            remote_port: 0,
            remote_ip: to_wire(ip(EXT)),
        })],
    );
    assert_eq!(code(&mut s, &filter_in_get), ResultCode::MALFORMED_OPTION);
    let unknown = get_req(
        H1,
        F::default(),
        None,
        vec![PcpOption::Unknown {
            code: OptionCode(100),
            data: vec![],
        }],
    );
    assert_eq!(code(&mut s, &unknown), ResultCode::UNSUPP_OPTION);
    // Optional options not valid for GET are ignored (RFC 6887 7.3).
    let desc = get_req(
        H1,
        F::default(),
        None,
        vec![PcpOption::Description("x".into())],
    );
    assert_eq!(code(&mut s, &desc), ResultCode::SUCCESS);

    let mut truncated = request(H1, 0, OpData::Get(get_data(F::default())), vec![]);
    truncated.truncate(24 + 36);
    let mut out = Vec::new();
    s.handle(T0, SocketAddr::new(ip(H1), 1), &truncated, &mut out);
    assert_eq!(out[3], ResultCode::MALFORMED_REQUEST.0);
}

/// The code points come from configuration (docs/extensions.md): a server
/// configured with other values answers GET under them and treats the
/// default opcode as unknown.
#[test]
fn draft_s4_configured_code_points() {
    let cp = CodePoints {
        get_opcode: portkeep_proto::Opcode(100),
        next_option: OptionCode(99),
        nonexist_map: ResultCode(200),
    };
    let mut c = cfg();
    c.code_points = cp;
    let mut s = Server::new(c, T0);
    let req = Request {
        header: RequestHeader {
            lifetime: 0,
            client_ip: to_wire(ip(H1)),
        },
        data: OpData::Get(get_data(F::default())),
        options: vec![PcpOption::Next(undefined(false, vec![]))],
    };
    let mut out = Vec::new();
    s.handle(
        T0,
        SocketAddr::new(ip(H1), 1),
        &req.to_bytes(&cp).unwrap(),
        &mut out,
    );
    let resp = Response::parse(&out, &cp).unwrap();
    assert_eq!(resp.header.result, ResultCode(200));
    s.handle(
        T0,
        SocketAddr::new(ip(H1), 1),
        &req.to_bytes(&CP).unwrap(),
        &mut out,
    );
    assert_eq!(out[3], ResultCode::UNSUPP_OPCODE.0);
}
