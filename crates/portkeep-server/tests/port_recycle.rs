//! The external port recycle delay (RFC 6887 section 15, last paragraph):
//! a freed external port is not handed to another client for a while, so
//! late packets for its old holder never reach a new one, but the same
//! client (same internal address, internal port and nonce) may reclaim it.
//! The sans-IO core with a fake clock.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use portkeep_proto::addr::{from_wire, to_wire};
use portkeep_proto::{
    CodePoints, MapData, Nonce, OpData, PeerData, Protocol, Request, RequestHeader, Response,
    ResultCode,
};
use portkeep_server::{
    Change, ClearSelector, Outcome, PortHold, RemoveReason, Restored, Server, ServerConfig,
    Timestamp,
};

const T0: Timestamp = Timestamp(1_700_000_000_000);
const PORT: u16 = 20000;

fn at(ms: u64) -> Timestamp {
    Timestamp(T0.0 + ms)
}

/// One external address with one port, or two: every allocation shows
/// exactly which endpoints are free.
fn cfg(ports: u16, delay: Duration) -> ServerConfig {
    ServerConfig {
        external_addresses: vec!["192.0.2.1".parse().unwrap()],
        port_min: PORT,
        port_max: PORT + ports - 1,
        port_recycle_delay: delay,
        ..ServerConfig::default()
    }
}

struct Ask<'a> {
    client: &'a str,
    port: u16,
    nonce: u8,
    suggest: u16,
    lifetime: u32,
    peer: Option<SocketAddr>,
}

fn ask(client: &str, nonce: u8) -> Ask<'_> {
    Ask {
        client,
        port: 80,
        nonce,
        suggest: 0,
        lifetime: 3600,
        peer: None,
    }
}

/// The reply: result code and external endpoint.
fn send(s: &mut Server, now: Timestamp, a: &Ask<'_>) -> (ResultCode, SocketAddr) {
    let ip: IpAddr = a.client.parse().unwrap();
    let map = MapData {
        nonce: [a.nonce; 12] as Nonce,
        protocol: Protocol::TCP,
        internal_port: a.port,
        external_port: a.suggest,
        external_ip: if a.suggest == 0 {
            Ipv6Addr::UNSPECIFIED
        } else {
            to_wire("192.0.2.1".parse().unwrap())
        },
    };
    let data = match a.peer {
        None => OpData::Map(map),
        Some(remote) => OpData::Peer(PeerData {
            map,
            remote_port: remote.port(),
            remote_ip: to_wire(remote.ip()),
        }),
    };
    let req = Request {
        header: RequestHeader {
            lifetime: a.lifetime,
            client_ip: to_wire(ip),
        },
        data,
        options: vec![],
    }
    .to_bytes(&CodePoints::default())
    .unwrap();
    let mut out = Vec::new();
    assert_eq!(
        s.handle(now, SocketAddr::new(ip, 5000), &req, &mut out),
        Outcome::Reply
    );
    let r = Response::parse(&out, &CodePoints::default()).unwrap();
    let ext = match r.data {
        OpData::Map(m) => SocketAddr::new(from_wire(m.external_ip), m.external_port),
        OpData::Peer(p) => SocketAddr::new(from_wire(p.map.external_ip), p.map.external_port),
        _ => panic!("not a MAP or PEER reply"),
    };
    (r.header.result, ext)
}

fn holds_logged(s: &mut Server) -> Vec<PortHold> {
    s.drain_changes()
        .filter_map(|c| match c.change {
            Change::PortHeld(h) => Some(h),
            _ => None,
        })
        .collect()
}

fn ext(port: u16) -> SocketAddr {
    SocketAddr::new("192.0.2.1".parse().unwrap(), port)
}

fn snapshot(s: &Server) -> Restored {
    Restored {
        anchor: s.anchor(),
        subscriber_anchors: s.subscriber_anchors(),
        mappings: s.mappings(),
        last_seq: s.last_seq(),
        holds: s.port_holds(),
        ..Restored::default()
    }
}

#[test]
fn rfc6887_s15_a_deleted_mapping_s_port_is_not_handed_to_another_client_within_the_delay() {
    let mut s = Server::new(cfg(1, Duration::from_secs(120)), T0);
    assert_eq!(
        send(&mut s, at(0), &ask("10.0.0.1", 1)),
        (ResultCode::SUCCESS, ext(PORT))
    );
    let delete = Ask {
        lifetime: 0,
        ..ask("10.0.0.1", 1)
    };
    assert_eq!(send(&mut s, at(1_000), &delete).0, ResultCode::SUCCESS);
    let held = holds_logged(&mut s);
    assert_eq!(held.len(), 1, "the freed endpoint is held, and logged");
    assert_eq!(held[0].external, ext(PORT));
    assert_eq!(held[0].until, at(121_000));
    assert_eq!(held[0].nonce, [1; 12]);
    assert_eq!(s.port_hold_count(), 1);
    // Another host: the only port is held.
    assert_eq!(
        send(&mut s, at(2_000), &ask("10.0.0.2", 2)).0,
        ResultCode::NO_RESOURCES
    );
    assert_eq!(
        send(&mut s, at(120_999), &ask("10.0.0.2", 2)).0,
        ResultCode::NO_RESOURCES
    );
    // The interval is over: anyone's again.
    assert_eq!(
        send(&mut s, at(121_000), &ask("10.0.0.2", 2)),
        (ResultCode::SUCCESS, ext(PORT))
    );
    assert_eq!(s.port_hold_count(), 0);
    s.check_invariants().unwrap();
}

#[test]
fn rfc6887_s15_the_same_client_reclaims_its_port_and_no_other_does() {
    let mut s = Server::new(cfg(2, Duration::from_secs(120)), T0);
    let (_, first) = send(&mut s, at(0), &ask("10.0.0.1", 1));
    let delete = Ask {
        lifetime: 0,
        ..ask("10.0.0.1", 1)
    };
    send(&mut s, at(1_000), &delete);
    // Another client suggesting the held port gets the other one.
    let thief = Ask {
        suggest: first.port(),
        ..ask("10.0.0.2", 2)
    };
    let (code, other) = send(&mut s, at(2_000), &thief);
    assert_eq!(code, ResultCode::SUCCESS);
    assert_ne!(other, first);
    // Same internal address and port, another nonce: not the same client.
    let relaunched = Ask {
        suggest: first.port(),
        ..ask("10.0.0.1", 9)
    };
    assert_eq!(
        send(&mut s, at(3_000), &relaunched).0,
        ResultCode::NO_RESOURCES,
        "the only other port is taken"
    );
    // Same address, port and nonce: reclaimed, and the hold ends.
    let back = Ask {
        suggest: first.port(),
        ..ask("10.0.0.1", 1)
    };
    assert_eq!(send(&mut s, at(4_000), &back), (ResultCode::SUCCESS, first));
    assert_eq!(s.port_hold_count(), 0);
    s.check_invariants().unwrap();
}

/// Failure-scenarios draft section 2.4: a host whose internal address
/// changed re-creates its mapping from the new address with its nonce and
/// its old external endpoint; the nonce proves it is the client the port
/// is held for (RFC 6887 sections 11.3 and 15).
#[test]
fn rfc6887_s15_a_client_that_moved_reclaims_its_port_with_its_nonce() {
    let mut s = Server::new(cfg(1, Duration::from_secs(120)), T0);
    send(&mut s, at(0), &ask("10.0.0.1", 1));
    let delete = Ask {
        lifetime: 0,
        ..ask("10.0.0.1", 1)
    };
    send(&mut s, at(1_000), &delete);
    let moved = Ask {
        suggest: PORT,
        ..ask("10.0.0.9", 1)
    };
    assert_eq!(
        send(&mut s, at(2_000), &moved),
        (ResultCode::SUCCESS, ext(PORT))
    );
    // Another internal port with that nonce is another mapping.
    let mut s = Server::new(cfg(1, Duration::from_secs(120)), T0);
    send(&mut s, at(0), &ask("10.0.0.1", 1));
    send(&mut s, at(1_000), &delete);
    let other_port = Ask {
        port: 81,
        suggest: PORT,
        ..ask("10.0.0.9", 1)
    };
    assert_eq!(
        send(&mut s, at(2_000), &other_port).0,
        ResultCode::NO_RESOURCES
    );
}

/// NAT-PMP mappings all carry one fixed nonce (docs/design.md): it proves
/// nothing, so a port held after a NAT-PMP mapping is reclaimed only from
/// the same internal address (RFC 6887 section 15's "same client").
#[test]
fn rfc6887_s15_a_shared_nonce_reclaims_only_from_the_same_address() {
    let mut s = Server::new(cfg(1, Duration::from_secs(120)), T0);
    let natpmp = |lifetime: u32| {
        let mut req = vec![0u8, 2, 0, 0];
        req.extend_from_slice(&80u16.to_be_bytes());
        req.extend_from_slice(&PORT.to_be_bytes());
        req.extend_from_slice(&lifetime.to_be_bytes());
        req
    };
    let mut out = Vec::new();
    let from = |ip: &str| SocketAddr::new(ip.parse().unwrap(), 5000);
    let result = |out: &[u8]| u16::from_be_bytes([out[2], out[3]]);
    s.handle(at(0), from("10.0.0.1"), &natpmp(3600), &mut out);
    assert_eq!(result(&out), 0, "mapped");
    s.handle(at(1_000), from("10.0.0.1"), &natpmp(0), &mut out);
    assert_eq!(s.port_hold_count(), 1);
    s.handle(at(2_000), from("10.0.0.2"), &natpmp(3600), &mut out);
    assert_eq!(
        result(&out),
        4,
        "another host: out of resources (RFC 6886 result 4)"
    );
    s.handle(at(3_000), from("10.0.0.1"), &natpmp(3600), &mut out);
    assert_eq!(result(&out), 0, "the same host reclaims it");
    assert_eq!(u16::from_be_bytes([out[10], out[11]]), PORT);
}

#[test]
fn rfc6887_s15_an_expired_mapping_and_a_peer_hold_their_ports_too() {
    let mut s = Server::new(cfg(1, Duration::from_secs(120)), T0);
    let short = Ask {
        lifetime: 120,
        ..ask("10.0.0.1", 1)
    };
    send(&mut s, at(0), &short);
    s.handle_timeout(at(120_000));
    let held = holds_logged(&mut s);
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].until, at(240_000));
    assert_eq!(
        send(&mut s, at(130_000), &ask("10.0.0.2", 2)).0,
        ResultCode::NO_RESOURCES
    );
    // A PEER mapping's endpoint is the binding's too (section 12.3).
    let mut s = Server::new(cfg(1, Duration::from_secs(120)), T0);
    // A PEER cannot delete (section 12.3): it expires.
    let peer = Ask {
        peer: Some("203.0.113.9:443".parse().unwrap()),
        lifetime: 120,
        ..ask("10.0.0.1", 1)
    };
    assert_eq!(send(&mut s, at(0), &peer).0, ResultCode::SUCCESS);
    s.handle_timeout(at(120_000));
    assert_eq!(holds_logged(&mut s).len(), 1);
    assert_eq!(
        send(&mut s, at(121_000), &ask("10.0.0.2", 2)).0,
        ResultCode::NO_RESOURCES
    );
}

#[test]
fn rfc6887_s15_an_operator_clear_holds_the_port_for_its_client() {
    let mut s = Server::new(cfg(1, Duration::from_secs(120)), T0);
    send(&mut s, at(0), &ask("10.0.0.1", 1));
    s.clear(at(1_000), ClearSelector::All);
    assert_eq!(
        send(&mut s, at(2_000), &ask("10.0.0.2", 2)).0,
        ResultCode::NO_RESOURCES
    );
    // The cleared client re-creates (failure-scenarios draft 2.6.2) with
    // its nonce and its previous port, and gets it back.
    let back = Ask {
        suggest: PORT,
        ..ask("10.0.0.1", 1)
    };
    assert_eq!(
        send(&mut s, at(3_000), &back),
        (ResultCode::SUCCESS, ext(PORT))
    );
}

#[test]
fn rfc6887_s15_without_a_delay_a_freed_port_is_free_at_once() {
    let mut s = Server::new(cfg(1, Duration::ZERO), T0);
    send(&mut s, at(0), &ask("10.0.0.1", 1));
    let delete = Ask {
        lifetime: 0,
        ..ask("10.0.0.1", 1)
    };
    send(&mut s, at(1_000), &delete);
    assert!(holds_logged(&mut s).is_empty());
    assert_eq!(
        send(&mut s, at(1_001), &ask("10.0.0.2", 2)),
        (ResultCode::SUCCESS, ext(PORT))
    );
}

#[test]
fn rfc6887_s15_a_hold_survives_a_restart_and_a_new_configuration() {
    let c = || cfg(1, Duration::from_secs(120));
    let mut a = Server::new(c(), T0);
    send(&mut a, at(0), &ask("10.0.0.1", 1));
    let delete = Ask {
        lifetime: 0,
        ..ask("10.0.0.1", 1)
    };
    send(&mut a, at(1_000), &delete);
    // Down from 1 s to 60 s: the stored hold still stands.
    let (mut b, _) = Server::restore(c(), at(60_000), snapshot(&a));
    assert_eq!(b.port_holds(), a.port_holds());
    assert_eq!(
        send(&mut b, at(60_000), &ask("10.0.0.2", 2)).0,
        ResultCode::NO_RESOURCES
    );
    // A reload keeps it.
    b.reconfigure(at(61_000), c()).unwrap();
    assert_eq!(
        send(&mut b, at(61_000), &ask("10.0.0.2", 2)).0,
        ResultCode::NO_RESOURCES
    );
    assert_eq!(
        send(&mut b, at(121_000), &ask("10.0.0.2", 2)).0,
        ResultCode::SUCCESS
    );
    // Down past its end: gone.
    let (c2, _) = Server::restore(c(), at(200_000), snapshot(&a));
    assert_eq!(c2.port_hold_count(), 0);
}

#[test]
fn rfc6887_s15_a_mapping_that_expired_while_down_holds_its_port_from_its_expiry() {
    let c = || cfg(1, Duration::from_secs(120));
    let mut a = Server::new(c(), T0);
    let short = Ask {
        lifetime: 120,
        ..ask("10.0.0.1", 1)
    };
    send(&mut a, at(0), &short);
    // It expired at 120 s while the server was down; back at 200 s.
    let (mut b, report) = Server::restore(c(), at(200_000), snapshot(&a));
    assert_eq!(report.expired, 1);
    let changes: Vec<Change> = b.drain_changes().map(|c| c.change).collect();
    assert!(matches!(
        &changes[0],
        Change::Removed {
            reason: RemoveReason::Expired,
            ..
        }
    ));
    assert_eq!(
        changes[1],
        Change::PortHeld(PortHold {
            owner: a.mappings()[0].key,
            nonce: [1; 12],
            external: ext(PORT),
            until: at(240_000),
        }),
        "held from its expiry, and stored"
    );
    assert_eq!(
        send(&mut b, at(200_000), &ask("10.0.0.2", 2)).0,
        ResultCode::NO_RESOURCES
    );
    assert_eq!(
        send(&mut b, at(240_000), &ask("10.0.0.2", 2)).0,
        ResultCode::SUCCESS
    );
}

#[test]
fn rfc6887_s15_a_restored_mapping_wins_over_a_stale_hold_on_its_endpoint() {
    let c = || cfg(1, Duration::from_secs(120));
    let mut a = Server::new(c(), T0);
    send(&mut a, at(0), &ask("10.0.0.1", 1));
    let mut state = snapshot(&a);
    state.holds.push(PortHold {
        owner: a.mappings()[0].key,
        nonce: [7; 12],
        external: ext(PORT),
        until: at(100_000),
    });
    let (b, report) = Server::restore(c(), at(10_000), state);
    assert_eq!(report.restored, 1);
    assert_eq!(b.port_hold_count(), 0);
    b.check_invariants().unwrap();
}
