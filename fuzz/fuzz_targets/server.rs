//! A structure-aware target for the server core (`portkeep-server`):
//! sequences of well-formed but arbitrary requests from sources the
//! server accepts (MAP, PEER, GET/NEXT, ANNOUNCE, NAT-PMP, every option,
//! THIRD_PARTY from allowed and refused clients, any lifetime), mixed with
//! the passage of time, operator clears, backup state changes, dataplane
//! refusals and restamped replies. After every step the server's
//! invariants must hold (`Server::check_invariants`: the GET/NEXT order
//! equals the table, no external endpoint held twice, quotas kept), every
//! reply must parse, and the mappings rebuilt from the change log alone
//! must equal the table: nothing changes without a change record.
#![no_main]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use portkeep_proto::addr::to_wire;
use portkeep_proto::{
    CodePoints, Filter, GetData, MapData, Next, NextItems, OpData, OptionCode, PcpOption, PeerData,
    Protocol, Request, RequestHeader, Response, ResultCode,
};
use portkeep_server::StaticForward;
use portkeep_server::{
    BackupState, Change, CheckpointClass, CheckpointMode, CheckpointPolicy, ClearSelector,
    MappingKey, MappingKind, MappingRecord, Outcome, Prefix, RateLimit, Refused, Restored, Server,
    ServerConfig, SubscriberKeying, Timestamp, NATPMP_NONCE, STATIC_NONCE,
};

/// Sources: two hosts of one IPv4 subscriber (/24 keying), one of
/// another, a THIRD_PARTY client, two hosts of one IPv6 /56, another
/// IPv6 host, and an address outside the client prefixes.
const HOSTS: [IpAddr; 8] = [
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
    IpAddr::V4(Ipv4Addr::new(10, 0, 1, 5)),
    IpAddr::V4(Ipv4Addr::new(10, 0, 2, 9)),
    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, 1)),
    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, 2)),
    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 7)),
    IpAddr::V4(Ipv4Addr::new(192, 0, 2, 77)),
];

const EXTERNAL: [IpAddr; 2] = [
    IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)),
    IpAddr::V4(Ipv4Addr::new(198, 51, 100, 2)),
];

fn host(i: u8) -> IpAddr {
    HOSTS[usize::from(i) % HOSTS.len()]
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Proto {
    Tcp,
    Udp,
    All,
    Other(u8),
}

impl Proto {
    fn get(self) -> Protocol {
        match self {
            Proto::Tcp => Protocol::TCP,
            Proto::Udp => Protocol::UDP,
            Proto::All => Protocol::ALL,
            Proto::Other(p) => Protocol(p),
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Life {
    Delete,
    Short(u8),
    Normal,
    Any(u32),
}

impl Life {
    fn get(self) -> u32 {
        match self {
            Life::Delete => 0,
            Life::Short(s) => u32::from(s),
            Life::Normal => 3600,
            Life::Any(v) => v,
        }
    }
}

/// A port from a small range (so mappings collide), zero, or any.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Port {
    Zero,
    Small(u8),
    Pool(u8),
    Any(u16),
}

impl Port {
    fn get(self) -> u16 {
        match self {
            Port::Zero => 0,
            Port::Small(p) => 5000 + u16::from(p % 8),
            Port::Pool(p) => 2000 + u16::from(p % 20),
            Port::Any(p) => p,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Addr {
    Unspecified,
    Host(u8),
    External(u8),
    V4Unspecified,
    Any([u8; 16]),
}

impl Addr {
    fn get(self) -> Ipv6Addr {
        match self {
            Addr::Unspecified => Ipv6Addr::UNSPECIFIED,
            Addr::Host(i) => to_wire(host(i)),
            Addr::External(i) => to_wire(EXTERNAL[usize::from(i) % 2]),
            Addr::V4Unspecified => to_wire(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            Addr::Any(b) => Ipv6Addr::from(b),
        }
    }
}

#[derive(Arbitrary, Debug, Clone)]
enum Opt {
    ThirdParty(u8),
    PreferFailure,
    Filter {
        len: u8,
        port: Port,
        ip: Addr,
    },
    Description(String),
    Checkpoint,
    Next {
        proto: Proto,
        internal: Addr,
        external: Addr,
        internal_port: Port,
        external_port: Port,
        end: bool,
        codes: Vec<u8>,
    },
    Unknown {
        code: u8,
        data: Vec<u8>,
    },
}

impl Opt {
    fn get(&self, cp: &CodePoints) -> PcpOption {
        match self {
            Opt::ThirdParty(i) => PcpOption::ThirdParty(to_wire(host(*i))),
            Opt::PreferFailure => PcpOption::PreferFailure,
            Opt::Filter { len, port, ip } => PcpOption::Filter(Filter {
                prefix_len: *len,
                remote_port: port.get(),
                remote_ip: ip.get(),
            }),
            Opt::Description(s) => PcpOption::Description(s.chars().take(64).collect()),
            Opt::Checkpoint => PcpOption::CheckpointRequired,
            Opt::Next {
                proto,
                internal,
                external,
                internal_port,
                external_port,
                end,
                codes,
            } => PcpOption::Next(Next {
                protocol: proto.get(),
                internal_af: 0,
                external_af: 0,
                more_end: u8::from(*end),
                internal_ip: internal.get(),
                external_ip: external.get(),
                lifetime: 0,
                internal_port: internal_port.get(),
                external_port: external_port.get(),
                items: NextItems::Codes(codes.iter().take(4).map(|c| OptionCode(*c)).collect()),
            }),
            Opt::Unknown { code, data } => {
                let code = if *code == cp.next_option.0 {
                    0x7f
                } else {
                    *code
                };
                PcpOption::Unknown {
                    code: OptionCode(code),
                    data: data.iter().take(16).copied().collect(),
                }
            }
        }
    }
}

#[derive(Arbitrary, Debug, Clone)]
struct Map {
    proto: Proto,
    port: Port,
    ext_port: Port,
    ext_ip: Addr,
    nonce: u8,
    /// A client IP field other than the source (ADDRESS_MISMATCH, RFC
    /// 6887 section 8.3), when the first octet is below 16: rare, or
    /// nearly every request would stop there.
    mismatch: (u8, Addr),
}

#[derive(Arbitrary, Debug, Clone)]
enum Step {
    Map {
        from: u8,
        life: Life,
        m: Map,
        opts: Vec<Opt>,
    },
    Peer {
        from: u8,
        life: Life,
        m: Map,
        remote: Addr,
        remote_port: Port,
        opts: Vec<Opt>,
    },
    Get {
        from: u8,
        proto: Proto,
        internal: Addr,
        external: Addr,
        internal_port: Port,
        external_port: Port,
        af: (u8, u8),
        opts: Vec<Opt>,
    },
    Announce {
        from: u8,
        opts: Vec<Opt>,
    },
    NatPmp {
        from: u8,
        op: u8,
        port: Port,
        ext_port: Port,
        life: Life,
    },
    Raw {
        from: u8,
        bytes: Vec<u8>,
    },
    Mutated {
        from: u8,
        life: Life,
        m: Map,
        opts: Vec<Opt>,
        flips: Vec<(u8, u8)>,
    },
    Advance {
        ms: u16,
        secs: u16,
    },
    Timeout,
    Clear {
        which: u8,
        from: u8,
    },
    ResetEveryEpoch,
    Backup(u8),
    Refuse {
        from: u8,
        proto: Proto,
        port: Port,
        nonce: u8,
        how: u8,
    },
    Announcements,
    /// A restart from the state the change log describes (a store's
    /// restore), or a takeover from it (a backup's replica).
    Restart {
        replica: bool,
    },
    /// A new configuration while serving (`portkeepd` reload): quotas up
    /// or down, the second external address in or out of the pool, the
    /// forwards on or off.
    Reconfigure {
        quota: u8,
        second_address: bool,
        forwards: bool,
    },
}

fn config(variant: u8) -> ServerConfig {
    let p = |s: &str| s.parse::<Prefix>().expect("prefix");
    let rate = |count, burst| RateLimit {
        count,
        per: Duration::from_secs(1),
        burst,
    };
    let mut cfg = ServerConfig {
        external_addresses: EXTERNAL.to_vec(),
        port_min: 2000,
        port_max: 2000 + 15,
        min_lifetime: 60,
        max_lifetime: 7200,
        subscriber_keying: SubscriberKeying {
            ipv4_prefix_len: 24,
            ipv6_prefix_len: 56,
            named: Vec::new(),
        },
        max_mappings_per_subscriber: 6,
        max_mappings: 20,
        third_party_clients: vec![p("10.0.2.0/24")],
        clients: vec![p("10.0.0.0/8"), p("2001:db8::/32")],
        checkpoint: CheckpointPolicy {
            max_mappings: 8,
            classes: vec![
                CheckpointClass {
                    name: "default".into(),
                    mode: CheckpointMode::OnRequest,
                    max: Some(3),
                    rate: Some(rate(5, 5)),
                },
                CheckpointClass {
                    name: "gold".into(),
                    mode: CheckpointMode::Always,
                    max: None,
                    rate: None,
                },
                CheckpointClass {
                    name: "none".into(),
                    mode: CheckpointMode::Never,
                    max: None,
                    rate: None,
                },
            ],
            default_class: 0,
            assign: vec![(p("10.0.1.0/24"), 1), (p("2001:db8:1::/48"), 2)],
        },
        ..ServerConfig::default()
    };
    if variant & 1 != 0 {
        // The draft's second set of code points: GET and NEXT elsewhere.
        cfg.code_points.get_opcode = portkeep_proto::Opcode(100);
        cfg.code_points.next_option = OptionCode(97);
        cfg.code_points.nonexist_map = portkeep_proto::ResultCode(200);
    }
    if variant & 2 != 0 {
        cfg.request_rate = Some(rate(20, 10));
        cfg.error_rate = Some(rate(5, 5));
    }
    if variant & 4 != 0 {
        cfg.natpmp = false;
    }
    if variant & 8 != 0 {
        // The operator's forwards: one to a host the steps map from, on
        // a port the steps use, and one outside the PCP port range.
        cfg.static_forwards = vec![
            StaticForward {
                protocol: Protocol::TCP,
                internal: SocketAddr::new(HOSTS[0], 5001),
                external: SocketAddr::new(EXTERNAL[0], 2003),
                description: Some("fwd".into()),
            },
            StaticForward {
                protocol: Protocol::UDP,
                internal: SocketAddr::new(HOSTS[4], 53),
                external: SocketAddr::new(EXTERNAL[1], 53),
                description: None,
            },
        ];
    }
    cfg
}

fn build(step: &Step, cp: &CodePoints) -> Option<(IpAddr, Vec<u8>)> {
    let opts = |o: &[Opt]| o.iter().take(6).map(|x| x.get(cp)).collect::<Vec<_>>();
    let map_data = |m: &Map| MapData {
        nonce: [m.nonce % 4; 12],
        protocol: m.proto.get(),
        internal_port: m.port.get(),
        external_port: m.ext_port.get(),
        external_ip: m.ext_ip.get(),
    };
    let header = |from: IpAddr, life: Life, m: Option<&Map>| RequestHeader {
        lifetime: life.get(),
        client_ip: m
            .filter(|m| m.mismatch.0 < 16)
            .map_or(to_wire(from), |m| m.mismatch.1.get()),
    };
    let (from, req) = match step {
        Step::Map {
            from,
            life,
            m,
            opts: o,
        }
        | Step::Mutated {
            from,
            life,
            m,
            opts: o,
            ..
        } => {
            let from = host(*from);
            let req = Request {
                header: header(from, *life, Some(m)),
                data: OpData::Map(map_data(m)),
                options: opts(o),
            };
            (from, req)
        }
        Step::Peer {
            from,
            life,
            m,
            remote,
            remote_port,
            opts: o,
        } => {
            let from = host(*from);
            let req = Request {
                header: header(from, *life, Some(m)),
                data: OpData::Peer(PeerData {
                    map: map_data(m),
                    remote_port: remote_port.get(),
                    remote_ip: remote.get(),
                }),
                options: opts(o),
            };
            (from, req)
        }
        Step::Get {
            from,
            proto,
            internal,
            external,
            internal_port,
            external_port,
            af,
            opts: o,
        } => {
            let from = host(*from);
            let req = Request {
                header: header(from, Life::Delete, None),
                data: OpData::Get(GetData {
                    protocol: proto.get(),
                    internal_af: af.0 % 3 * 2,
                    external_af: af.1 % 3 * 2,
                    internal_ip: internal.get(),
                    external_ip: external.get(),
                    internal_port: internal_port.get(),
                    external_port: external_port.get(),
                }),
                options: opts(o),
            };
            (from, req)
        }
        Step::Announce { from, opts: o } => {
            let from = host(*from);
            let req = Request {
                header: header(from, Life::Delete, None),
                data: OpData::Announce,
                options: opts(o),
            };
            (from, req)
        }
        Step::NatPmp {
            from,
            op,
            port,
            ext_port,
            life,
        } => {
            let mut b = vec![0u8, op % 4];
            if op % 4 != 0 {
                b.extend_from_slice(&[0, 0]);
                b.extend_from_slice(&port.get().to_be_bytes());
                b.extend_from_slice(&ext_port.get().to_be_bytes());
                b.extend_from_slice(&life.get().to_be_bytes());
            }
            return Some((host(*from), b));
        }
        Step::Raw { from, bytes } => return Some((host(*from), bytes.clone())),
        _ => return None,
    };
    let mut bytes = req.to_bytes(cp).ok()?;
    if let Step::Mutated { flips, .. } = step {
        for (i, x) in flips.iter().take(4) {
            let n = bytes.len();
            bytes[usize::from(*i) % n] ^= *x;
        }
    }
    Some((from, bytes))
}

fn check_reply(out: &[u8], cp: &CodePoints) -> Option<Response> {
    if out.first() == Some(&0) {
        assert!(
            [8, 12, 16].contains(&out.len()),
            "NAT-PMP reply of {} octets",
            out.len()
        );
        assert!(portkeep_proto::natpmp::NatPmpReply::parse(out).is_some());
        return None;
    }
    assert!(
        out.len() >= 24 && out.len() <= 1100 && out.len() % 4 == 0,
        "reply of {} octets",
        out.len()
    );
    assert_eq!(out[0], 2, "version");
    assert_ne!(out[1] & 0x80, 0, "R bit");
    Response::parse(out, cp).ok()
}

type Key = (MappingKind, MappingKey);

fn key(r: &MappingRecord) -> Key {
    (r.kind, r.key)
}

/// Holds on freed ports as the log has them (RFC 6887 section 15), by
/// endpoint: what a store restarted from the log would read back.
type Holds = BTreeMap<[u8; 19], portkeep_server::PortHold>;

fn apply(mirror: &mut BTreeMap<Key, MappingRecord>, holds: &mut Holds, s: &mut Server) {
    for c in s.drain_changes() {
        match c.change {
            Change::PortHeld(h) => {
                holds.insert(portkeep_server::record::hold_key(&h), h);
            }
            Change::Upserted(r) => {
                mirror.insert(key(&r), r);
            }
            Change::Removed { mapping, .. } => {
                let gone = mirror.remove(&key(&mapping));
                assert!(
                    gone.is_some(),
                    "removal of a mapping never logged: {mapping:?}"
                );
            }
            _ => {}
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Input {
    variant: u8,
    steps: Vec<Step>,
}

fuzz_target!(|input: Input| {
    let cfg = config(input.variant);
    let cp = cfg.code_points;
    let mut now = Timestamp(1_000_000);
    let mut s = Server::new(cfg, now);
    assert!(s.install_static_forwards(now).is_empty());
    let mut mirror = BTreeMap::new();
    let mut holds = Holds::new();
    let mut reconfigured = false;
    let mut out = Vec::new();
    for step in input.steps.iter().take(64) {
        if let Some((from, bytes)) = build(step, &cp) {
            let src = SocketAddr::new(from, 40_000);
            if s.handle(now, src, &bytes, &mut out) == Outcome::Reply {
                let parsed = check_reply(&out, &cp);
                // A request the codec wrote gets a reply the codec reads.
                let well_formed = matches!(
                    step,
                    Step::Map { .. } | Step::Peer { .. } | Step::Get { .. } | Step::Announce { .. }
                );
                if well_formed && out.first() == Some(&2) {
                    assert!(parsed.is_some(), "the reply to {step:?} does not parse");
                }
                // A reply held while a backup acknowledges is restamped
                // when released: a success that grants a mapping the
                // table holds is restamped, never dropped.
                let again = s.restamp(now, from, &out, 1500);
                if let Some(a) = &again {
                    check_reply(a, &cp);
                }
                if let Some(r) = parsed.filter(|r| {
                    r.header.result == ResultCode::SUCCESS
                        && r.header.lifetime > 0
                        && matches!(r.data, OpData::Map(_) | OpData::Peer(_))
                }) {
                    assert!(again.is_some(), "a granted {:?} was not restamped", r.data);
                }
            }
        }
        match step {
            Step::Advance { ms, secs } => {
                now = Timestamp(now.0 + u64::from(*ms) + u64::from(*secs) * 1000);
            }
            Step::Timeout => {
                if let Some(t) = s.poll_timeout() {
                    now = now.max(t);
                }
                s.handle_timeout(now);
            }
            Step::Clear { which, from } => {
                let h = host(*from);
                let sel = match which & 3 {
                    0 => ClearSelector::All,
                    1 => ClearSelector::Subscriber(s.config().subscriber_keying.subscriber_of(h)),
                    2 => ClearSelector::Prefix(
                        Prefix::new(h, if h.is_ipv4() { 24 } else { 56 }).expect("prefix"),
                    ),
                    _ => ClearSelector::Mapping(MappingKey {
                        internal_ip: h,
                        protocol: if which & 4 == 0 {
                            Protocol::TCP
                        } else {
                            Protocol::UDP
                        },
                        internal_port: 5000 + u16::from(which >> 3 & 7),
                    }),
                };
                s.clear(now, sel);
            }
            Step::ResetEveryEpoch => s.reset_every_epoch(now),
            Step::Backup(b) => s.set_backup_state(match b % 4 {
                0 => BackupState::Standalone,
                1 => BackupState::Disconnected,
                2 => BackupState::Syncing,
                _ => BackupState::InSync,
            }),
            Step::Refuse {
                from,
                proto,
                port,
                nonce,
                how,
            } => {
                let k = MappingKey {
                    internal_ip: host(*from),
                    protocol: proto.get(),
                    internal_port: port.get(),
                };
                let how = match how % 3 {
                    0 => Refused::Kept,
                    1 => Refused::NotInstalled,
                    _ => Refused::Lost,
                };
                let nonce = match nonce % 6 {
                    4 => NATPMP_NONCE,
                    5 => STATIC_NONCE,
                    n => [n; 12],
                };
                s.refused(now, &k, MappingKind::Map, nonce, how);
            }
            Step::Announcements => {
                let _ = s.poll_announcements(now);
                let _ = s.drain_volatile();
            }
            Step::Restart { replica } => {
                let state = Restored {
                    anchor: s.anchor(),
                    subscriber_anchors: s.subscriber_anchors(),
                    mappings: mirror.values().cloned().collect(),
                    last_seq: s.last_seq(),
                    term: 0,
                    owed: s.owed_announces(now),
                    requesters: s.requesters(),
                    holds: holds.values().copied().collect(),
                };
                let cfg = s.config().clone();
                if *replica {
                    // A takeover writes the whole state it serves into the
                    // node's store (`Store::replace`), replicated marks
                    // included: the log starts again from it.
                    s = Server::restore_replica(cfg, now, state).0;
                    s.drain_changes().for_each(drop);
                    mirror = s.mappings().into_iter().map(|m| (key(&m), m)).collect();
                    holds = s
                        .port_holds()
                        .into_iter()
                        .map(|h| (portkeep_server::record::hold_key(&h), h))
                        .collect();
                } else {
                    s = Server::restore(cfg, now, state).0;
                }
            }
            Step::Reconfigure {
                quota,
                second_address,
                forwards,
            } => {
                let mut cfg = config(input.variant | if *forwards { 8 } else { 0 });
                if !*forwards {
                    cfg.static_forwards.clear();
                }
                cfg.max_mappings_per_subscriber = u32::from(*quota % 8);
                if !*second_address {
                    cfg.external_addresses.truncate(1);
                    cfg.static_forwards
                        .retain(|f| f.external.ip() == EXTERNAL[0]);
                }
                let _ = s.reconfigure(now, cfg);
                // What was granted under a higher quota stays (a lowered
                // quota only refuses new grants): from here on the table
                // is checked for consistency, not against the quotas.
                reconfigured = true;
            }
            _ => {}
        }
        apply(&mut mirror, &mut holds, &mut s);
        let checked = if reconfigured {
            s.check_consistency()
        } else {
            s.check_invariants()
        };
        if let Err(e) = checked {
            panic!("invariant broken after {step:?}: {e}");
        }
        let mut table: Vec<MappingRecord> = s.mappings();
        table.sort_by_key(key);
        let logged: Vec<&MappingRecord> = mirror.values().collect();
        assert_eq!(
            table.iter().collect::<Vec<_>>(),
            logged,
            "the change log does not rebuild the table after {step:?}"
        );
    }
});
