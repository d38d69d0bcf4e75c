//! Bad input from the network: nothing panics, every reply is a valid PCP
//! response, and the table stays within its configured bounds.

#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr};

use portkeep_proto::addr::to_wire;
use portkeep_proto::{CodePoints, MapData, OpData, Protocol, Request, RequestHeader, Response};
use portkeep_server::{Outcome, Server, ServerConfig, Timestamp};
use proptest::prelude::*;

fn valid_map(client: IpAddr, port: u16) -> Vec<u8> {
    Request {
        header: RequestHeader {
            lifetime: 3600,
            client_ip: to_wire(client),
        },
        data: OpData::Map(MapData {
            nonce: [7; 12],
            protocol: Protocol::TCP,
            internal_port: port,
            external_port: 0,
            external_ip: std::net::Ipv6Addr::UNSPECIFIED,
        }),
        options: vec![],
    }
    .to_bytes(&CodePoints::default())
    .unwrap()
}

fn check_reply(outcome: Outcome, out: &[u8]) {
    if outcome == Outcome::Reply && out.first() == Some(&0) {
        // A version-0 request answered in NAT-PMP (RFC 6886 section 3):
        // 8, 12 or 16 octets, the response bit set, readable.
        assert!([8, 12, 16].contains(&out.len()), "{}", out.len());
        assert_ne!(out[1] & 0x80, 0, "response bit set");
        assert!(portkeep_proto::natpmp::NatPmpReply::parse(out).is_some());
        return;
    }
    if outcome == Outcome::Reply {
        assert!(
            out.len() >= 24 && out.len() <= 1100 && out.len().is_multiple_of(4),
            "{}",
            out.len()
        );
        assert_eq!(out[0], 2);
        assert_ne!(out[1] & 0x80, 0, "R bit set");
        // Every reply is something a client can parse or at least read the
        // result code of.
        let _ = Response::parse(out, &CodePoints::default());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn rfc6887_s8_2_arbitrary_datagrams_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1200)) {
        let mut s = Server::new(ServerConfig::default(), Timestamp(0));
        let mut out = Vec::new();
        let o = s.handle(Timestamp(0), "198.51.100.1:5000".parse().unwrap(), &bytes, &mut out);
        check_reply(o, &out);
        s.check_invariants().unwrap();
    }

    #[test]
    fn rfc6887_s8_2_mutated_requests_never_panic(
        flips in proptest::collection::vec((0usize..200, any::<u8>()), 1..8),
        extra in proptest::collection::vec(any::<u8>(), 0..64),
        cut in 0usize..120,
    ) {
        let client: IpAddr = "198.51.100.1".parse().unwrap();
        let mut m = valid_map(client, 80);
        m.extend_from_slice(&extra);
        for (i, b) in flips {
            let n = m.len();
            m[i % n] ^= b;
        }
        m.truncate(m.len().saturating_sub(cut % 8));
        let mut s = Server::new(ServerConfig::default(), Timestamp(0));
        let mut out = Vec::new();
        let o = s.handle(Timestamp(0), SocketAddr::new(client, 5000), &m, &mut out);
        check_reply(o, &out);
        s.check_invariants().unwrap();
    }
}

#[test]
fn design_flood_of_requests_stays_within_quota() {
    let mut s = Server::new(
        ServerConfig {
            max_mappings_per_subscriber: 64,
            max_mappings: 1000,
            ..ServerConfig::default()
        },
        Timestamp(0),
    );
    let mut out = Vec::new();
    for host in 0..40u8 {
        let client = IpAddr::from([198, 51, 100, host]);
        for port in 1..=200u16 {
            s.handle(
                Timestamp(0),
                SocketAddr::new(client, 5000),
                &valid_map(client, port),
                &mut out,
            );
        }
    }
    assert_eq!(s.mapping_count(), 1000, "server-wide cap");
    s.check_invariants().unwrap();
    let per_host = s.mappings().into_iter().fold(
        std::collections::HashMap::<IpAddr, u32>::new(),
        |mut m, r| {
            *m.entry(r.key.internal_ip).or_default() += 1;
            m
        },
    );
    assert!(per_host.values().all(|&n| n <= 64));
}
