//! A new configuration while serving (`Server::reconfigure`): the state
//! carries over as across a restart; what the new policy no longer allows
//! ends as a restore ends it (failure-scenarios draft section 2.6.1: the
//! epoch resets exactly for whom lost state).

#![allow(clippy::unwrap_used, clippy::panic)]

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use portkeep_proto::addr::to_wire;
use portkeep_proto::{
    CodePoints, MapData, OpData, Protocol, Request, RequestHeader, Response, ResultCode,
};
use portkeep_server::{Change, RemoveReason, Server, ServerConfig, Timestamp};

const T0: Timestamp = Timestamp(1_000_000);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn at(s: u64) -> Timestamp {
    Timestamp(T0.0 + s * 1000)
}

fn cfg(pool: &[&str], quota: u32) -> ServerConfig {
    ServerConfig {
        external_addresses: pool.iter().map(|a| ip(a)).collect(),
        port_min: 2000,
        port_max: 2999,
        max_mappings_per_subscriber: quota,
        ..ServerConfig::default()
    }
}

fn map(s: &mut Server, now: Timestamp, host: &str, port: u16, ext: Option<&str>) -> Response {
    let req = Request {
        header: RequestHeader {
            lifetime: 3600,
            client_ip: to_wire(ip(host)),
        },
        data: OpData::Map(MapData {
            nonce: [1; 12],
            protocol: Protocol::TCP,
            internal_port: port,
            external_port: 0,
            external_ip: ext.map_or(Ipv6Addr::UNSPECIFIED, |e| to_wire(ip(e))),
        }),
        options: vec![],
    }
    .to_bytes(&CodePoints::default())
    .unwrap();
    let mut out = Vec::new();
    s.handle(now, SocketAddr::new(ip(host), 5000), &req, &mut out);
    Response::parse(&out, &CodePoints::default()).unwrap()
}

#[test]
fn draft_s2_6_a_lowered_quota_keeps_what_was_granted_and_refuses_more() {
    let mut s = Server::new(cfg(&["192.0.2.1"], 3), T0);
    for p in 1..=3 {
        assert_eq!(
            map(&mut s, at(1), "10.0.0.1", p, None).header.result,
            ResultCode::SUCCESS
        );
    }
    s.drain_changes().for_each(drop);
    let epoch = s.epoch_of(at(5), None);
    s.reconfigure(at(5), cfg(&["192.0.2.1"], 1)).unwrap();
    assert_eq!(s.mapping_count(), 3, "nothing granted is taken away");
    assert_eq!(s.epoch_of(at(5), None), epoch, "the epoch continues");
    assert!(s
        .drain_changes()
        .all(|c| !matches!(c.change, Change::Removed { .. })));
    // A renewal of one held is fine; a new one is over the new quota.
    assert_eq!(
        map(&mut s, at(6), "10.0.0.1", 1, None).header.result,
        ResultCode::SUCCESS
    );
    assert_eq!(
        map(&mut s, at(6), "10.0.0.1", 9, None).header.result,
        ResultCode::USER_EX_QUOTA
    );
    s.reconfigure(at(7), cfg(&["192.0.2.1"], 10)).unwrap();
    assert_eq!(
        map(&mut s, at(8), "10.0.0.1", 9, None).header.result,
        ResultCode::SUCCESS
    );
}

#[test]
fn draft_s2_6_1_an_external_address_removed_ends_its_mappings_and_resets_exactly_their_epochs() {
    let mut s = Server::new(cfg(&["192.0.2.1", "192.0.2.2"], 10), T0);
    assert_eq!(
        map(&mut s, at(1), "10.0.0.1", 80, Some("192.0.2.1"))
            .header
            .result,
        ResultCode::SUCCESS
    );
    assert_eq!(
        map(&mut s, at(1), "10.0.0.2", 80, Some("192.0.2.2"))
            .header
            .result,
        ResultCode::SUCCESS
    );
    let seq = s.last_seq();
    s.drain_changes().for_each(drop);
    let report = s.reconfigure(at(100), cfg(&["192.0.2.1"], 10)).unwrap();
    assert_eq!(report.dropped.len(), 1);
    assert_eq!(report.dropped[0].key.internal_ip, ip("10.0.0.2"));
    let logged: Vec<_> = s.drain_changes().collect();
    assert!(
        logged.iter().all(|c| c.seq > seq),
        "the log goes on from where it was"
    );
    assert!(logged.iter().any(|c| matches!(
        &c.change,
        Change::Removed { mapping, reason: RemoveReason::Cleared } if mapping.key.internal_ip == ip("10.0.0.2")
    )));
    let keying = s.config().subscriber_keying.clone();
    let lost = keying.subscriber_of(ip("10.0.0.2"));
    let kept = keying.subscriber_of(ip("10.0.0.1"));
    assert_eq!(
        s.epoch_of(at(100), Some(lost)),
        0,
        "who lost state sees a new epoch"
    );
    assert_eq!(
        s.epoch_of(at(100), Some(kept)),
        100,
        "nobody else's epoch moves"
    );
    // And is told at once (RFC 6887 section 14.1.3).
    let told = s.poll_announcements(at(100));
    assert!(
        !told.is_empty(),
        "no ANNOUNCE scheduled for the host that lost its mapping"
    );
    s.check_invariants().unwrap();
}

#[test]
fn subscriber_keying_cannot_change_while_serving() {
    let mut s = Server::new(cfg(&["192.0.2.1"], 10), T0);
    map(&mut s, at(1), "10.0.0.1", 80, None);
    let mut other = cfg(&["192.0.2.1"], 10);
    other.subscriber_keying.ipv4_prefix_len = 24;
    let e = s.reconfigure(at(2), other).unwrap_err();
    assert!(e.contains("[subscribers]"), "{e}");
    assert_eq!(s.mapping_count(), 1);
    assert_eq!(s.config().max_mappings_per_subscriber, 10);
}
