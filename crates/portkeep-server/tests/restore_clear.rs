//! Restoring from stable storage and clearing by command, against the
//! failure-scenarios draft (sections 2.6 and 2.6.2) and RFC 6887 section 8.5.

#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use portkeep_proto::addr::to_wire;
use portkeep_proto::{CodePoints, MapData, OpData, Protocol, Request, RequestHeader, Response};
use portkeep_server::{
    Change, ClearSelector, Outcome, Prefix, RemoveReason, Restored, Server, ServerConfig,
    SubscriberKeying, Timestamp,
};

const T0: Timestamp = Timestamp(1_700_000_000_000);

fn at(secs: u64) -> Timestamp {
    Timestamp(T0.0 + secs * 1000)
}

fn cfg() -> ServerConfig {
    ServerConfig {
        external_addresses: vec!["192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap()],
        port_min: 20000,
        port_max: 29999,
        ..ServerConfig::default()
    }
}

fn map(s: &mut Server, now: Timestamp, client: &str, port: u16, lifetime: u32) -> Response {
    let ip: IpAddr = client.parse().unwrap();
    let req = Request {
        header: RequestHeader {
            lifetime,
            client_ip: to_wire(ip),
        },
        data: OpData::Map(MapData {
            nonce: [port as u8; 12],
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
    assert_eq!(
        s.handle(now, SocketAddr::new(ip, 5000), &req, &mut out),
        Outcome::Reply
    );
    Response::parse(&out, &CodePoints::default()).unwrap()
}

fn announce_epoch(s: &mut Server, now: Timestamp, client: &str) -> u32 {
    let ip: IpAddr = client.parse().unwrap();
    let req = Request {
        header: RequestHeader {
            lifetime: 0,
            client_ip: to_wire(ip),
        },
        data: OpData::Announce,
        options: vec![],
    }
    .to_bytes(&CodePoints::default())
    .unwrap();
    let mut out = Vec::new();
    s.handle(now, SocketAddr::new(ip, 5000), &req, &mut out);
    Response::parse(&out, &CodePoints::default())
        .unwrap()
        .header
        .epoch
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
fn draft_s2_6_restore_keeps_mappings_endpoints_and_epoch() {
    let mut a = Server::new(cfg(), T0);
    let r1 = map(&mut a, at(10), "198.51.100.1", 80, 3600);
    map(&mut a, at(10), "198.51.100.2", 443, 3600);
    map(&mut a, at(10), "198.51.100.2", 22, 200);
    let before = a.mappings();
    let seq = a.last_seq();
    // Down from t=10 s to t=300 s: the 200 s mapping expired meanwhile.
    let (mut b, report) = Server::restore(cfg(), at(300), snapshot(&a));
    assert_eq!(report.restored, 2);
    assert_eq!(report.expired, 1);
    assert!(report.dropped.is_empty());
    let mut after = b.mappings();
    after.sort_by_key(|m| m.key);
    let mut expected: Vec<_> = before
        .into_iter()
        .filter(|m| m.key.internal_port != 22)
        .collect();
    expected.sort_by_key(|m| m.key);
    assert_eq!(after, expected, "same endpoints, nonces, expiry, flags");
    // The expiry is logged so the store forgets it, and so is the hold on
    // its endpoint (RFC 6887 section 15); numbering continues.
    let changes: Vec<_> = b.drain_changes().collect();
    assert_eq!(changes.len(), 2);
    assert_eq!(changes[0].seq, seq + 1);
    assert!(
        matches!(&changes[0].change, Change::Removed { reason: RemoveReason::Expired, mapping } if mapping.key.internal_port == 22)
    );
    assert!(matches!(&changes[1].change, Change::PortHeld(h) if h.owner.internal_port == 22));
    // RFC 6887 section 8.5: the epoch continues (300 s since T0).
    assert_eq!(announce_epoch(&mut b, at(300), "198.51.100.1"), 300);
    // A refresh with the same nonce keeps the external endpoint.
    let again = map(&mut b, at(301), "198.51.100.1", 80, 3600);
    assert_eq!(
        again.data.map_part().unwrap().external_port,
        r1.data.map_part().unwrap().external_port
    );
    // The restored endpoints are taken: nobody else is handed them.
    for p in 1000..1400 {
        let r = map(&mut b, at(302), "198.51.100.9", p, 3600);
        let m = r.data.map_part().unwrap();
        assert!(after.iter().all(|x| x.external.port() != m.external_port
            || portkeep_proto::addr::from_wire(m.external_ip) != x.external.ip()));
    }
}

/// A MAP pinned to one external address with PREFER_FAILURE.
fn map_on(s: &mut Server, now: Timestamp, client: &str, port: u16, external: &str) {
    let ip: IpAddr = client.parse().unwrap();
    let req = Request {
        header: RequestHeader {
            lifetime: 3600,
            client_ip: to_wire(ip),
        },
        data: OpData::Map(MapData {
            nonce: [1; 12],
            protocol: Protocol::TCP,
            internal_port: port,
            external_port: 0,
            external_ip: to_wire(external.parse().unwrap()),
        }),
        options: vec![portkeep_proto::PcpOption::PreferFailure],
    };
    let mut out = Vec::new();
    s.handle(
        now,
        SocketAddr::new(ip, 1),
        &req.to_bytes(&CodePoints::default()).unwrap(),
        &mut out,
    );
    assert_eq!(out[3], 0, "mapping on {external}");
}

#[test]
fn draft_s2_6_mapping_whose_address_left_the_pool_resets_only_its_subscriber() {
    let mut a = Server::new(cfg(), T0);
    map_on(&mut a, at(1), "198.51.100.1", 80, "192.0.2.2");
    map_on(&mut a, at(1), "198.51.100.7", 80, "192.0.2.1");
    let mut smaller = cfg();
    smaller
        .external_addresses
        .retain(|a| a.to_string() != "192.0.2.2");
    let (mut b, report) = Server::restore(smaller, at(100), snapshot(&a));
    assert_eq!(report.restored, 1);
    assert_eq!(report.dropped.len(), 1);
    assert_eq!(
        report.dropped[0].key.internal_ip.to_string(),
        "198.51.100.1"
    );
    assert_eq!(
        announce_epoch(&mut b, at(100), "198.51.100.1"),
        0,
        "lost state: new epoch"
    );
    assert_eq!(
        announce_epoch(&mut b, at(100), "198.51.100.7"),
        100,
        "untouched"
    );
}

#[test]
fn draft_s2_6_2_clear_one_subscriber_resets_only_its_epoch() {
    let mut s = Server::new(cfg(), T0);
    map(&mut s, at(1), "198.51.100.1", 80, 3600);
    map(&mut s, at(1), "198.51.100.1", 81, 3600);
    map(&mut s, at(1), "198.51.100.2", 80, 3600);
    s.drain_changes().for_each(drop);
    let sub = SubscriberKeying::default().subscriber_of("198.51.100.1".parse().unwrap());
    let cleared = s.clear(at(50), ClearSelector::Subscriber(sub));
    assert_eq!(cleared.len(), 1);
    assert_eq!(cleared[0].mappings, 2);
    assert_eq!(
        cleared[0].hosts,
        vec!["198.51.100.1".parse::<IpAddr>().unwrap()]
    );
    assert_eq!(s.mapping_count(), 1);
    assert_eq!(
        announce_epoch(&mut s, at(60), "198.51.100.1"),
        10,
        "reset at t=50"
    );
    assert_eq!(
        announce_epoch(&mut s, at(60), "198.51.100.2"),
        60,
        "untouched"
    );
    let changes: Vec<_> = s.drain_changes().collect();
    assert_eq!(
        changes
            .iter()
            .filter(|c| matches!(
                c.change,
                Change::Removed {
                    reason: RemoveReason::Cleared,
                    ..
                }
            ))
            .count(),
        2
    );
    assert!(changes.iter().any(|c| c.change
        == Change::EpochReset {
            subscriber: sub,
            anchor: at(50)
        }));
    // The reset anchor survives a restart.
    let (mut b, _) = Server::restore(cfg(), at(70), snapshot(&s));
    assert_eq!(announce_epoch(&mut b, at(70), "198.51.100.1"), 20);
    assert_eq!(announce_epoch(&mut b, at(70), "198.51.100.2"), 70);
}

#[test]
fn draft_s2_6_2_clear_prefix_and_all() {
    let mut s = Server::new(cfg(), T0);
    for host in ["198.51.100.1", "198.51.100.2", "203.0.113.5"] {
        map(&mut s, at(1), host, 80, 3600);
    }
    let p: Prefix = "198.51.100.0/24".parse().unwrap();
    let cleared = s.clear(at(10), ClearSelector::Prefix(p));
    assert_eq!(cleared.len(), 2);
    assert_eq!(s.mapping_count(), 1);
    assert_eq!(announce_epoch(&mut s, at(20), "203.0.113.5"), 20);
    assert_eq!(announce_epoch(&mut s, at(20), "198.51.100.2"), 10);
    let cleared = s.clear(at(30), ClearSelector::All);
    assert_eq!(cleared.len(), 1);
    assert_eq!(s.mapping_count(), 0);
    for host in ["198.51.100.1", "203.0.113.5", "192.168.0.1"] {
        assert_eq!(
            announce_epoch(&mut s, at(35), host),
            5,
            "{host}: server-wide reset"
        );
    }
    assert!(s
        .drain_changes()
        .any(|c| c.change == Change::ServerEpochReset { anchor: at(30) }));
}

/// Failure-scenarios draft section 2.6.1: a state holding two records of
/// one mapping (a damaged or merged store) restores the first; whoever held
/// the second lost it, so its subscriber's epoch resets.
#[test]
fn draft_s2_6_1_a_second_record_of_one_mapping_resets_its_subscribers_epoch() {
    let mut a = Server::new(cfg(), T0);
    map(&mut a, at(10), "198.51.100.1", 80, 3600);
    map(&mut a, at(10), "198.51.100.2", 80, 3600);
    let mut state = snapshot(&a);
    let mut second = state
        .mappings
        .iter()
        .find(|m| m.key.internal_ip == "198.51.100.1".parse::<IpAddr>().unwrap())
        .unwrap()
        .clone();
    second.nonce = [9; 12];
    second.external = SocketAddr::new("192.0.2.2".parse().unwrap(), 29_999);
    state.mappings.push(second.clone());
    let (mut b, report) = Server::restore(cfg(), at(20), state);
    assert_eq!(report.restored, 2);
    assert_eq!(report.dropped, vec![second.clone()]);
    assert_eq!(
        announce_epoch(&mut b, at(20), "198.51.100.1"),
        0,
        "the subscriber that lost a mapping starts a new epoch"
    );
    assert_eq!(
        announce_epoch(&mut b, at(20), "198.51.100.2"),
        20,
        "nobody else's epoch moves"
    );
}

#[test]
fn rfc6887_s14_1_3_hosts_told_of_a_loss_stay_owed_an_announce() {
    let mut s = Server::new(cfg(), T0);
    map(&mut s, at(1), "198.51.100.1", 80, 3600);
    map(&mut s, at(1), "198.51.100.2", 80, 3600);
    s.drain_changes().for_each(drop);
    let k = SubscriberKeying::default();
    let h1: IpAddr = "198.51.100.1".parse().unwrap();
    let h3: IpAddr = "198.51.100.3".parse().unwrap();
    let sub1 = k.subscriber_of(h1);
    // A clear tells its hosts, and owes them an ANNOUNCE for as long as
    // their clients may hold the mappings they lost (the longest lifetime).
    s.clear(at(50), ClearSelector::Subscriber(sub1));
    let until = at(50) + cfg().max_lifetime_duration();
    assert_eq!(s.owed_announces(at(60)), vec![(sub1, vec![h1], until)]);
    let changes: Vec<_> = s.drain_changes().collect();
    assert!(
        changes.iter().any(|c| c.change
            == Change::AnnounceOwed {
                subscriber: sub1,
                hosts: vec![h1],
                until
            }),
        "logged, so the backup and the store learn of it: {changes:?}"
    );
    // A takeover's targets add to a subscriber's set and extend it.
    let sub3 = k.subscriber_of(h3);
    s.owe_announce(at(100), &[(sub3, h3), (sub1, h1)]);
    let later = at(100) + cfg().max_lifetime_duration();
    assert_eq!(
        s.owed_announces(at(110)),
        vec![(sub1, vec![h1], later), (sub3, vec![h3], later)]
    );
    // They survive a restart, and lapse.
    let (b, _) = Server::restore(cfg(), at(120), snapshot(&s));
    assert_eq!(b.owed_announces(at(120)).len(), 2);
    assert!(b.owed_announces(later).is_empty());
    let (b, _) = Server::restore(cfg(), later, snapshot(&s));
    assert!(b.owed_announces(later).is_empty());
}
