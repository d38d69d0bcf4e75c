//! The epoch a THIRD_PARTY client sees (RFC 6887 sections 8.5 and 13.1;
//! failure-scenarios draft section 2.6.1): one epoch per requester, which
//! restarts exactly when a host it manages loses state through it.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use portkeep_proto::addr::to_wire;
use portkeep_proto::{
    CodePoints, MapData, OpData, PcpOption, Protocol, Request, RequestHeader, Response, ResultCode,
};
use portkeep_server::record::key_of;
use portkeep_server::{
    Announcement, Change, ChangeRecord, ClearSelector, MappingRecord, Outcome, RequesterState,
    Restored, Server, ServerConfig, SubscriberKeying, Timestamp,
};

const T0: Timestamp = Timestamp(1_000_000);
/// The THIRD_PARTY client (an interworking function, a CPE proxying for
/// its LAN) and the port its requests come from.
const MANAGER: &str = "10.1.0.1";
const MANAGER_PORT: u16 = 41_000;
/// Another THIRD_PARTY client, managing a host of its own.
const OTHER_MANAGER: &str = "10.1.0.2";
/// The hosts `MANAGER` maps for, each its own subscriber.
const HOSTS: [&str; 3] = ["10.2.0.1", "10.2.0.2", "10.2.0.3"];
/// The host `OTHER_MANAGER` maps for.
const OTHER_HOST: &str = "10.2.0.9";
/// A host that maps for itself.
const SELF_MAPPER: &str = "10.3.0.1";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn at(secs: u64) -> Timestamp {
    Timestamp(T0.0 + secs * 1000)
}

fn server() -> Server {
    Server::new(
        ServerConfig {
            external_addresses: vec![ip("192.0.2.1")],
            port_min: 20000,
            port_max: 20999,
            third_party_clients: vec!["10.1.0.0/24".parse().unwrap()],
            ..ServerConfig::default()
        },
        T0,
    )
}

/// A MAP from `client` (for `host` with THIRD_PARTY when it differs).
fn map(client: &str, host: &str, port: u16, nonce: u8, lifetime: u32) -> Vec<u8> {
    let mut options = Vec::new();
    if client != host {
        options.push(PcpOption::ThirdParty(to_wire(ip(host))));
    }
    Request {
        header: RequestHeader {
            lifetime,
            client_ip: to_wire(ip(client)),
        },
        data: OpData::Map(MapData {
            nonce: [nonce; 12],
            protocol: Protocol::TCP,
            internal_port: port,
            external_port: 0,
            external_ip: Ipv6Addr::UNSPECIFIED,
        }),
        options,
    }
    .to_bytes(&CodePoints::default())
    .unwrap()
}

fn send(s: &mut Server, now: Timestamp, from: SocketAddr, bytes: &[u8]) -> Response {
    let mut out = Vec::new();
    assert_eq!(s.handle(now, from, bytes, &mut out), Outcome::Reply);
    Response::parse(&out, &CodePoints::default()).unwrap()
}

/// Where the ANNOUNCEs due at `now` go.
fn told(s: &mut Server, now: Timestamp) -> Vec<SocketAddr> {
    s.poll_announcements(now)
        .into_iter()
        .filter_map(|a| match a {
            Announcement::Unicast { to, .. } => Some(to),
            Announcement::Everyone { .. } => None,
        })
        .collect()
}

fn from(client: &str) -> SocketAddr {
    let port = if client == MANAGER {
        MANAGER_PORT
    } else {
        portkeep_proto::CLIENT_PORT
    };
    SocketAddr::new(ip(client), port)
}

/// A client's RFC 6887 section 8.5 check, one per server, as a client
/// keeps it: `observe` says whether an epoch is invalid (state lost).
#[derive(Default)]
struct EpochCheck {
    prev: Option<(u32, u64)>,
}

impl EpochCheck {
    fn observe(&mut self, now: Timestamp, epoch: u32) -> bool {
        let client = now.as_millis() / 1000;
        let invalid = match self.prev {
            None => false,
            Some((pe, pc)) => {
                let (cur, prev) = (i64::from(epoch), i64::from(pe));
                if cur < prev - 1 {
                    true
                } else {
                    let cd = (client - pc) as i64;
                    let sd = cur - prev;
                    cd + 2 < sd - sd / 16 || sd + 2 < cd - cd / 16
                }
            }
        };
        self.prev = Some((epoch, client));
        invalid
    }
}

/// Every client's mappings made at `start`, each lifetime `lifetime`.
fn populate(s: &mut Server, start: Timestamp, lifetime: u32) {
    for (i, h) in HOSTS.iter().enumerate() {
        for p in 0..2u16 {
            let r = send(
                s,
                start,
                from(MANAGER),
                &map(MANAGER, h, 1000 + p, (i * 2) as u8 + p as u8, lifetime),
            );
            assert_eq!(r.header.result, ResultCode::SUCCESS);
        }
    }
    let r = send(
        s,
        start,
        from(OTHER_MANAGER),
        &map(OTHER_MANAGER, OTHER_HOST, 1000, 50, lifetime),
    );
    assert_eq!(r.header.result, ResultCode::SUCCESS);
    let r = send(
        s,
        start,
        from(SELF_MAPPER),
        &map(SELF_MAPPER, SELF_MAPPER, 1000, 60, lifetime),
    );
    assert_eq!(r.header.result, ResultCode::SUCCESS);
}

/// One renewal cycle at `now`: every client renews every mapping it
/// made (recreating it if gone), and each reply's epoch goes through
/// its client's check. Returns the clients whose check failed, and how
/// many mappings were made anew (not found by their renewal).
fn renew_all(
    s: &mut Server,
    now: Timestamp,
    checks: &mut BTreeMap<&'static str, EpochCheck>,
    lifetime: u32,
) -> (Vec<&'static str>, usize) {
    let mut failed = Vec::new();
    let before: Vec<Vec<u8>> = s.mappings().iter().map(key_of).collect();
    let mut requests: Vec<(&'static str, Vec<u8>)> = Vec::new();
    for (i, h) in HOSTS.iter().enumerate() {
        for p in 0..2u16 {
            requests.push((
                MANAGER,
                map(MANAGER, h, 1000 + p, (i * 2) as u8 + p as u8, lifetime),
            ));
        }
    }
    requests.push((
        OTHER_MANAGER,
        map(OTHER_MANAGER, OTHER_HOST, 1000, 50, lifetime),
    ));
    requests.push((
        SELF_MAPPER,
        map(SELF_MAPPER, SELF_MAPPER, 1000, 60, lifetime),
    ));
    for (client, bytes) in requests {
        let r = send(s, now, from(client), &bytes);
        assert_eq!(r.header.result, ResultCode::SUCCESS);
        if checks
            .entry(client)
            .or_default()
            .observe(now, r.header.epoch)
        {
            failed.push(client);
        }
    }
    failed.dedup();
    let made = s
        .mappings()
        .iter()
        .filter(|m| !before.contains(&key_of(m)))
        .count();
    (failed, made)
}

#[test]
fn draft_s2_6_1_a_third_party_client_sees_one_reset_when_a_host_it_manages_is_cleared() {
    let mut s = server();
    let lifetime = 120;
    populate(&mut s, at(1), lifetime);
    let mut checks = BTreeMap::new();
    for c in [MANAGER, OTHER_MANAGER, SELF_MAPPER] {
        checks.insert(c, EpochCheck::default());
    }
    let (failed, made) = renew_all(&mut s, at(30), &mut checks, lifetime);
    assert!(failed.is_empty() && made == 0, "{failed:?} {made}");
    // One managed host's subscriber is cleared by the operator
    // (failure-scenarios draft section 2.6.2).
    let keying = SubscriberKeying::default();
    s.clear(
        at(45),
        ClearSelector::Subscriber(keying.subscriber_of(ip(HOSTS[0]))),
    );
    // Told at once, at the port its requests come from (RFC 6887 section
    // 14.1.3), with the epoch its next reply will carry.
    let mut to = told(&mut s, at(45));
    to.sort();
    assert_eq!(
        to,
        vec![
            SocketAddr::new(ip(MANAGER), MANAGER_PORT),
            SocketAddr::new(ip(HOSTS[0]), portkeep_proto::CLIENT_PORT),
        ]
    );
    let mut out = Vec::new();
    let to = s.announce_to(at(46), ip(MANAGER), &mut out);
    assert_eq!(to, SocketAddr::new(ip(MANAGER), MANAGER_PORT));
    let a = Response::parse(&out, &CodePoints::default()).unwrap();
    assert_eq!(a.data, OpData::Announce);
    assert_eq!(a.header.epoch, 1, "restarted at 45 s");
    // Four renewal cycles, as a client with a short lifetime runs them:
    // the manager's check fails once, in the first, and its re-creations
    // bring back exactly the two cleared mappings, once; nobody else's
    // check fails.
    let mut failures = Vec::new();
    let mut remade = Vec::new();
    for k in 0..4 {
        let (failed, made) = renew_all(&mut s, at(60 + k * 40), &mut checks, lifetime);
        failures.push(failed);
        remade.push(made);
    }
    assert_eq!(
        failures,
        vec![vec![MANAGER], vec![], vec![], vec![]],
        "section 8.5 verdicts per cycle"
    );
    assert_eq!(remade, vec![2, 0, 0, 0], "mappings made anew per cycle");
}

#[test]
fn rfc6887_s8_5_every_reply_to_a_third_party_client_carries_the_same_epoch() {
    let mut s = server();
    populate(&mut s, at(1), 600);
    let keying = SubscriberKeying::default();
    s.clear(
        at(100),
        ClearSelector::Subscriber(keying.subscriber_of(ip(HOSTS[1]))),
    );
    let now = at(130);
    // A success about each managed host, an error (a foreign nonce), and
    // an ANNOUNCE: one epoch, the manager's.
    let mut epochs = Vec::new();
    for (i, h) in HOSTS.iter().enumerate() {
        let r = send(
            &mut s,
            now,
            from(MANAGER),
            &map(MANAGER, h, 1000, (i * 2) as u8, 600),
        );
        epochs.push(r.header.epoch);
    }
    let err = send(
        &mut s,
        now,
        from(MANAGER),
        &map(MANAGER, HOSTS[2], 1000, 99, 600),
    );
    assert_eq!(err.header.result, ResultCode::NOT_AUTHORIZED);
    epochs.push(err.header.epoch);
    let mut out = Vec::new();
    s.announce_to(now, ip(MANAGER), &mut out);
    epochs.push(
        Response::parse(&out, &CodePoints::default())
            .unwrap()
            .header
            .epoch,
    );
    assert_eq!(epochs, vec![30; 5]);
    assert_eq!(s.requester_epoch(now, ip(MANAGER)), 30);
    // The hosts that lost nothing keep the server's epoch; the cleared one
    // restarted with the manager.
    assert_eq!(s.requester_epoch(now, ip(HOSTS[0])), 130);
    assert_eq!(s.requester_epoch(now, ip(HOSTS[1])), 30);
    assert_eq!(s.requester_epoch(now, ip(OTHER_MANAGER)), 130);
    assert_eq!(s.requester_epoch(now, ip(SELF_MAPPER)), 130);
}

#[test]
fn draft_s2_6_1_a_clear_of_hosts_a_client_does_not_manage_leaves_its_epoch() {
    let mut s = server();
    populate(&mut s, at(1), 600);
    let keying = SubscriberKeying::default();
    s.clear(
        at(100),
        ClearSelector::Subscriber(keying.subscriber_of(ip(OTHER_HOST))),
    );
    assert_eq!(s.requester_epoch(at(130), ip(MANAGER)), 130);
    assert_eq!(s.requester_epoch(at(130), ip(OTHER_MANAGER)), 30);
    let mut to = told(&mut s, at(100));
    to.sort();
    assert_eq!(
        to,
        vec![
            SocketAddr::new(ip(OTHER_MANAGER), portkeep_proto::CLIENT_PORT),
            SocketAddr::new(ip(OTHER_HOST), portkeep_proto::CLIENT_PORT),
        ],
        "the cleared host and the client that managed it; nobody else"
    );
}

/// What a store replays: the state the changes describe.
#[derive(Default)]
struct Model {
    anchor: Timestamp,
    subs: BTreeMap<portkeep_server::SubscriberId, Timestamp>,
    maps: BTreeMap<Vec<u8>, MappingRecord>,
    requesters: BTreeMap<IpAddr, portkeep_server::RequesterState>,
    last_seq: u64,
}

impl Model {
    fn apply(&mut self, changes: impl IntoIterator<Item = ChangeRecord>) {
        for c in changes {
            match c.change {
                Change::Upserted(m) => {
                    self.maps.insert(key_of(&m), m);
                }
                Change::Removed { mapping, .. } => {
                    self.maps.remove(&key_of(&mapping));
                }
                Change::EpochReset { subscriber, anchor } => {
                    self.subs.insert(subscriber, anchor);
                }
                Change::ServerEpochReset { anchor } => {
                    self.anchor = anchor;
                    self.subs.clear();
                }
                Change::AnnounceOwed { .. } | Change::PortHeld(_) => {}
                Change::Requester { ip, state } => match state {
                    Some(st) => {
                        self.requesters.insert(ip, st);
                    }
                    None => {
                        self.requesters.remove(&ip);
                    }
                },
            }
            self.last_seq = c.seq;
        }
    }

    fn restored(&self) -> Restored {
        Restored {
            anchor: self.anchor,
            subscriber_anchors: self.subs.iter().map(|(s, a)| (*s, *a)).collect(),
            mappings: self.maps.values().cloned().collect(),
            last_seq: self.last_seq,
            requesters: self.requesters.iter().map(|(i, r)| (*i, *r)).collect(),
            ..Restored::default()
        }
    }
}

#[test]
fn draft_s2_6_a_third_party_clients_epoch_and_port_survive_a_restart() {
    let mut s = server();
    let mut model = Model {
        anchor: T0,
        ..Model::default()
    };
    populate(&mut s, at(1), 600);
    let keying = SubscriberKeying::default();
    s.clear(
        at(100),
        ClearSelector::Subscriber(keying.subscriber_of(ip(HOSTS[2]))),
    );
    model.apply(s.drain_changes());
    // Every record names the client that manages it.
    let managed: Vec<_> = model
        .maps
        .values()
        .filter(|m| m.manager == Some(ip(MANAGER)))
        .map(|m| m.key.internal_ip)
        .collect();
    assert_eq!(managed.len(), 4);
    let before = s.requester_epoch(at(200), ip(MANAGER));
    assert_eq!(before, 100);
    let cfg = s.config().clone();
    let (mut back, report) = Server::restore(cfg, at(150), model.restored());
    assert_eq!(report.restored, 6);
    assert_eq!(back.requester_epoch(at(200), ip(MANAGER)), before);
    assert_eq!(back.requester_epoch(at(200), ip(OTHER_MANAGER)), 200);
    let mut out = Vec::new();
    assert_eq!(
        back.announce_to(at(200), ip(MANAGER), &mut out),
        SocketAddr::new(ip(MANAGER), MANAGER_PORT)
    );
    // Nothing was lost in the restart: nobody is owed an ANNOUNCE.
    assert!(told(&mut back, at(150)).is_empty());
    // The restored counts are right: deleting the manager's last mappings
    // keeps it known, however long it stays idle, as its epoch is its own
    // (later than its subscriber's): forgetting it would move its epoch.
    model.apply(back.drain_changes());
    for (i, h) in HOSTS.iter().enumerate().take(2) {
        for p in 0..2u16 {
            let r = send(
                &mut back,
                at(210),
                from(MANAGER),
                &map(MANAGER, h, 1000 + p, (i * 2) as u8 + p as u8, 0),
            );
            assert_eq!(r.header.result, ResultCode::SUCCESS);
        }
    }
    model.apply(back.drain_changes());
    assert!(model.requesters.contains_key(&ip(MANAGER)));
    let max = u64::from(back.config().max_lifetime);
    let late = at(100 + max + 61);
    back.handle_timeout(late);
    model.apply(back.drain_changes());
    assert!(model.requesters.contains_key(&ip(MANAGER)));
    assert_eq!(
        back.requester_epoch(late, ip(MANAGER)),
        u32::try_from(max + 61).unwrap(),
        "still counted from the clear at 100 s"
    );
    // The other manager lost nothing: its epoch is its subscriber's, and
    // once its mapping is gone (expired by then) it is forgotten.
    assert!(!model.requesters.contains_key(&ip(OTHER_MANAGER)));
}

/// A requester whose epoch is its own and who keeps a mapping of its own
/// (no THIRD_PARTY) goes on seeing that epoch long after its managed
/// mappings are gone: no jump for its section 8.5 check to read as a loss.
#[test]
fn rfc6887_s8_5_an_idle_requesters_own_epoch_never_jumps() {
    let mut s = Server::new(
        ServerConfig {
            max_lifetime: 300,
            ..server().config().clone()
        },
        T0,
    );
    let own = send(
        &mut s,
        at(1),
        from(MANAGER),
        &map(MANAGER, MANAGER, 9000, 90, 300),
    );
    assert_eq!(own.header.result, ResultCode::SUCCESS);
    let r = send(
        &mut s,
        at(1),
        from(MANAGER),
        &map(MANAGER, HOSTS[0], 1000, 1, 300),
    );
    assert_eq!(r.header.result, ResultCode::SUCCESS);
    let keying = SubscriberKeying::default();
    s.clear(
        at(4001),
        ClearSelector::Subscriber(keying.subscriber_of(ip(HOSTS[0]))),
    );
    let mut check = EpochCheck::default();
    for t in [4100u64, 4250, 4301, 4400, 4550] {
        s.handle_timeout(at(t));
        let r = send(
            &mut s,
            at(t),
            from(MANAGER),
            &map(MANAGER, MANAGER, 9000, 90, 300),
        );
        assert!(
            !check.observe(at(t), r.header.epoch),
            "at {t} s: epoch {}",
            r.header.epoch
        );
        assert_eq!(u64::from(r.header.epoch), t - 4001);
    }
}

/// After every epoch restarts, a requester whose last mapping then goes is
/// still told at its request port: it stays known.
#[test]
fn rfc6887_s14_1_3_after_every_epoch_restarts_requesters_are_told_at_their_port() {
    let mut s = server();
    populate(&mut s, at(1), 600);
    s.reset_every_epoch(at(50));
    assert!(told(&mut s, at(50)).contains(&SocketAddr::new(ip(MANAGER), MANAGER_PORT)));
    for (i, h) in HOSTS.iter().enumerate() {
        for p in 0..2u16 {
            send(
                &mut s,
                at(50),
                from(MANAGER),
                &map(MANAGER, h, 1000 + p, (i * 2) as u8 + p as u8, 0),
            );
        }
    }
    // The repeat, 250 ms later, still finds its port.
    assert!(told(&mut s, Timestamp(at(50).0 + 250))
        .contains(&SocketAddr::new(ip(MANAGER), MANAGER_PORT)));
}

#[test]
fn draft_s2_6_a_restore_that_drops_a_managed_mapping_resets_and_tells_its_manager() {
    let mut s = server();
    let mut model = Model {
        anchor: T0,
        ..Model::default()
    };
    populate(&mut s, at(1), 600);
    model.apply(s.drain_changes());
    // The pool shrank while the server was down: the mappings on the
    // address that left cannot come back.
    let mut cfg = s.config().clone();
    cfg.external_addresses = vec![ip("192.0.2.2")];
    let (mut back, report) = Server::restore(cfg, at(50), model.restored());
    assert_eq!(report.dropped.len(), 8);
    assert_eq!(back.requester_epoch(at(60), ip(MANAGER)), 10);
    let to = told(&mut back, at(50));
    assert!(to.contains(&SocketAddr::new(ip(MANAGER), MANAGER_PORT)));
    assert!(to.iter().any(|a| a.ip() == ip(OTHER_MANAGER)));
}

/// The requester's state as the latest logged change says it (`Some(None)`:
/// forgotten; `None`: nothing logged).
fn requester_state(s: &mut Server, requester: &str) -> Option<Option<RequesterState>> {
    let mut last = None;
    for c in s.drain_changes() {
        if let Change::Requester { ip: i, state } = c.change {
            if i == ip(requester) {
                last = Some(state);
            }
        }
    }
    last
}

/// Failure-scenarios draft section 2.6.1: the state stored and replicated
/// for a THIRD_PARTY client says until when it holds volatile mappings, so
/// a takeover after that resets nothing of it; renewing moves it later,
/// deleting the longest-lived mapping moves it back.
#[test]
fn draft_s2_6_1_a_requester_s_volatile_state_has_an_end() {
    let mut s = server();
    let ends = |now: Timestamp, r: &Response| {
        now + std::time::Duration::from_secs(u64::from(r.header.lifetime))
    };
    let r = send(
        &mut s,
        at(0),
        from(MANAGER),
        &map(MANAGER, HOSTS[0], 70, 1, 3000),
    );
    let long = ends(at(0), &r);
    let r = send(
        &mut s,
        at(0),
        from(MANAGER),
        &map(MANAGER, HOSTS[1], 71, 2, 600),
    );
    let short = ends(at(0), &r);
    assert!(short < long);
    let st = requester_state(&mut s, MANAGER).flatten().expect("logged");
    assert_eq!(st.volatile_until, Some(long));
    let r = send(
        &mut s,
        at(30),
        from(MANAGER),
        &map(MANAGER, HOSTS[0], 70, 1, 3000),
    );
    let later = ends(at(30), &r);
    let st = requester_state(&mut s, MANAGER).flatten();
    let st = st.expect("the renewal is logged");
    assert_eq!(st.volatile_until, Some(later));
    send(
        &mut s,
        at(30),
        from(MANAGER),
        &map(MANAGER, HOSTS[0], 70, 1, 0),
    );
    let st = requester_state(&mut s, MANAGER).flatten();
    let st = st.expect("the delete is logged");
    assert_eq!(st.volatile_until, Some(short));
    s.handle_timeout(short);
    let st = requester_state(&mut s, MANAGER).expect("the expiry is logged");
    assert_eq!(st.and_then(|st| st.volatile_until), None);
}
