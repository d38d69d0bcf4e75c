//! [`Session`] against the real server core on a simulated network in
//! virtual time, with loss, duplication and reordering (STYLE.md: neqo's
//! `test-fixture/src/sim`, smoltcp's netsim). Deterministic: one seed.
//!
//! Scenarios: mappings survive hours of renewals over a lossy link
//! (RFC 6887 sections 8.1.1 and 11.2.1); a server that loses state and
//! sends unsolicited ANNOUNCEs gets everything back within seconds
//! (sections 8.5, 14.1.1); one that loses state silently gets it back at
//! the first renewal answered under the new epoch; ANNOUNCEs with a
//! consistent epoch cause no re-creation at all.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use portkeep_client::{RequestBuilder, Session, SessionConfig, SessionEvent};
use portkeep_proto::Protocol;
use portkeep_server::{Outcome, Server, ServerConfig, Timestamp};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const N: u16 = 300;
const LIFETIME: u32 = 600;

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Dir {
    ToServer,
    ToClient,
}

/// A datagram in flight: delivery time, sequence (ties), direction, octets.
type InFlight = Reverse<(Duration, u64, Dir, Vec<u8>)>;

struct Sim {
    t0: Instant,
    now: Duration,
    server: Server,
    session: Session,
    net: BinaryHeap<InFlight>,
    seq: u64,
    rng: StdRng,
    loss: f64,
    dup: f64,
    client: SocketAddr,
    server_addr: SocketAddr,
    events: Vec<(Duration, SessionEvent)>,
}

fn server_config() -> ServerConfig {
    ServerConfig {
        max_mappings_per_subscriber: 10_000,
        ..ServerConfig::default()
    }
}

impl Sim {
    #[allow(clippy::disallowed_methods)]
    fn new(seed: u64, loss: f64) -> Sim {
        let t0 = Instant::now();
        let client: SocketAddr = "10.0.0.2:5350".parse().unwrap();
        let server_addr: SocketAddr = "10.0.0.1:5351".parse().unwrap();
        let cfg = SessionConfig {
            rate: 500,
            burst: 50,
            ..SessionConfig::default()
        };
        let mut session = Session::new(server_addr, client.ip(), cfg, seed);
        let mut rng = StdRng::seed_from_u64(seed);
        for i in 0..N {
            let mut nonce = [0u8; 12];
            rng.fill(&mut nonce);
            let b = RequestBuilder::map(Protocol::UDP, 10_000 + i)
                .nonce(nonce)
                .lifetime(LIFETIME);
            session.insert(t0, u64::from(i), b).unwrap();
        }
        Sim {
            t0,
            now: Duration::ZERO,
            server: Server::new(server_config(), Timestamp(0)),
            session,
            net: BinaryHeap::new(),
            seq: 0,
            rng,
            loss,
            dup: 0.05,
            client,
            server_addr,
            events: Vec::new(),
        }
    }

    fn ts(&self) -> Timestamp {
        Timestamp(u64::try_from(self.now.as_millis()).unwrap())
    }

    /// Puts a datagram on the wire: lost, duplicated, delayed 1..80 ms
    /// (so reordered).
    fn send(&mut self, dir: Dir, d: Vec<u8>) {
        if self.rng.gen_bool(self.loss) {
            return;
        }
        let copies = if self.rng.gen_bool(self.dup) { 2 } else { 1 };
        for _ in 0..copies {
            let delay = Duration::from_millis(self.rng.gen_range(1..80));
            self.seq += 1;
            let dir = if dir == Dir::ToServer {
                Dir::ToServer
            } else {
                Dir::ToClient
            };
            self.net
                .push(Reverse((self.now + delay, self.seq, dir, d.clone())));
        }
    }

    /// Sends one unsolicited ANNOUNCE from the server.
    fn announce(&mut self) {
        let mut out = Vec::new();
        self.server.unsolicited_announce(self.ts(), &mut out);
        self.send(Dir::ToClient, out);
    }

    /// Runs until `until`, stepping from event to event.
    fn run(&mut self, until: Duration) {
        loop {
            let now_i = self.t0 + self.now;
            self.session.handle_timeout(now_i);
            while let Some(d) = self.session.poll_transmit() {
                self.send(Dir::ToServer, d);
            }
            while let Some(e) = self.session.poll_event() {
                self.events.push((self.now, e));
            }
            let next_timer = self.session.poll_timeout().map(|t| t - self.t0);
            let next_net = self.net.peek().map(|Reverse((t, ..))| *t);
            let next = [next_timer, next_net, Some(until)]
                .into_iter()
                .flatten()
                .min()
                .unwrap();
            if next >= until && next_net.is_none_or(|t| t >= until) {
                self.now = until;
                self.server.handle_timeout(self.ts());
                return;
            }
            self.now = next.max(self.now);
            self.server.handle_timeout(self.ts());
            while self
                .net
                .peek()
                .is_some_and(|Reverse((t, ..))| *t <= self.now)
            {
                let Reverse((_, _, dir, d)) = self.net.pop().unwrap();
                match dir {
                    Dir::ToServer => {
                        let mut out = Vec::new();
                        let ts = self.ts();
                        if self.server.handle(ts, self.client, &d, &mut out) == Outcome::Reply {
                            self.send(Dir::ToClient, out);
                        }
                    }
                    Dir::ToClient => {
                        let at = self.t0 + self.now;
                        let from = self.server_addr;
                        self.session.handle_input(at, from, &d);
                    }
                }
            }
        }
    }

    fn held(&self) -> usize {
        self.server.mapping_count()
    }

    /// Held on the server and known granted by the client.
    fn usable(&self) -> bool {
        self.held() == usize::from(N)
            && (0..u64::from(N)).all(|id| self.session.grant(id).is_some())
    }

    fn count(&self, since: Duration, f: impl Fn(&SessionEvent) -> bool) -> usize {
        self.events
            .iter()
            .filter(|(t, e)| *t >= since && f(e))
            .count()
    }
}

/// Runs until every mapping is usable again (held by the server, granted
/// as far as the client knows); returns how long it took.
fn time_to_full(sim: &mut Sim, limit: Duration) -> Duration {
    let start = sim.now;
    while !sim.usable() {
        assert!(
            sim.now - start < limit,
            "only {} of {N} held after {limit:?}",
            sim.held()
        );
        let step = sim.now + Duration::from_millis(50);
        sim.run(step);
    }
    sim.now - start
}

#[test]
fn rfc6887_s11_2_1_mappings_survive_hours_of_lossy_renewals() {
    // 10% loss each way: a renewal attempt fails 19% of the time, and
    // section 11.2.1 fits 7 attempts (1/2, 3/4, 7/8, ... at least 4 s
    // apart) into a 600 s lifetime. All 7 failing is rare but happens:
    // this run (seed 1) sees it once in about 10,000 renewals, and that
    // mapping is re-created at expiry, 60 ms of outage.
    let mut sim = Sim::new(1, 0.1);
    let took = time_to_full(&mut sim, Duration::from_secs(60));
    assert!(
        took < Duration::from_secs(30),
        "creation over 10% loss took {took:?}"
    );
    // Three hours: 18 lifetimes. Every renewal window is checked.
    for minute in 1..=180u64 {
        sim.run(Duration::from_secs(minute * 60));
        assert_eq!(
            sim.held(),
            usize::from(N),
            "lost a mapping by minute {minute}"
        );
    }
    let c = sim.session.counters();
    assert!(c.recreates <= 2, "{c:?}");
    let lost = sim.count(Duration::ZERO, |e| matches!(e, SessionEvent::Lost { .. }));
    assert_eq!(
        u64::try_from(lost).unwrap(),
        c.recreates,
        "each re-creation follows an expiry"
    );
    assert_eq!(sim.session.counters().epoch_failures, 0);
}

/// The server loses everything and announces it; returns the recovery time.
fn announce_recovery(seed: u64, loss: f64) -> Duration {
    let mut sim = Sim::new(seed, loss);
    time_to_full(&mut sim, Duration::from_secs(60));
    sim.run(Duration::from_secs(400));
    // The server crashes and comes back empty, announcing itself the way
    // portkeepd does (ten times from 250 ms, doubling).
    sim.server = Server::new(server_config(), sim.ts());
    let lost_at = sim.now;
    let mut announce_at = lost_at;
    let mut gap = Duration::from_millis(250);
    let mut sent = 0;
    while !sim.usable() {
        if sent < 10 && sim.now >= announce_at {
            sim.announce();
            sent += 1;
            announce_at += gap;
            gap *= 2;
        }
        assert!(
            sim.now - lost_at < Duration::from_secs(120),
            "not recovered"
        );
        let step = sim.now + Duration::from_millis(50);
        sim.run(step);
    }
    let recovery = sim.now - lost_at;
    eprintln!("ANNOUNCE recovery of {N} mappings at {loss} loss: {recovery:?}");
    let recreated = sim.count(lost_at, |e| {
        matches!(
            e,
            SessionEvent::Granted {
                kind: portkeep_client::GrantKind::Recreated,
                ..
            }
        )
    });
    assert_eq!(recreated, usize::from(N), "every mapping re-created");
    recovery
}

#[test]
fn rfc6887_s14_1_1_state_loss_with_announce_recovers_within_seconds() {
    // No loss (but duplication and reordering): the 1 s jitter plus
    // 300 mappings at the 500/s bound.
    let r = announce_recovery(2, 0.0);
    assert!(r < Duration::from_millis(2000), "{r:?}");
    // 10% loss each way: retransmissions at 3, 9, 21 s (section 8.1.1)
    // catch the unlucky ones.
    let r = announce_recovery(5, 0.1);
    assert!(r < Duration::from_secs(30), "{r:?}");
}

#[test]
fn rfc6887_s8_5_silent_state_loss_recovers_at_the_first_renewal() {
    let mut sim = Sim::new(3, 0.0);
    time_to_full(&mut sim, Duration::from_secs(30));
    sim.run(Duration::from_secs(100));
    sim.server = Server::new(server_config(), sim.ts());
    // No ANNOUNCE. The first renewal (at 1/2..5/8 of 600 s after the
    // grant) is answered under epoch 0, and everything else follows.
    let took = time_to_full(&mut sim, Duration::from_secs(LIFETIME.into()));
    eprintln!("silent loss: all {N} back {took:?} after the loss");
    assert!(took < Duration::from_secs(300), "{took:?}");
    assert!(sim.session.counters().epoch_failures >= 1);
}

#[test]
fn rfc6887_s8_5_consistent_announces_recreate_nothing() {
    let mut sim = Sim::new(4, 0.05);
    time_to_full(&mut sim, Duration::from_secs(60));
    sim.run(Duration::from_secs(2000));
    // ANNOUNCEs with a consistent epoch, as a CPE-style server that kept
    // its state may multicast after a restart.
    for _ in 0..5 {
        sim.announce();
        let next = sim.now + Duration::from_secs(1);
        sim.run(next);
    }
    sim.run(Duration::from_secs(4000));
    assert_eq!(sim.session.counters().recreates, 0);
    assert_eq!(sim.held(), usize::from(N));
}
