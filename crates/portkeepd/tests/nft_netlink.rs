//! The nftables dataplane's netlink path against the kernel and against
//! nft itself, each test in a network namespace of its own:
//!
//! - the element messages the daemon sends are the ones `nft
//!   --debug=netlink` sends for the same `add element` statement (nft's
//!   debug text is read here, in the test, and nowhere in the daemon);
//! - elements added and deleted over netlink are exactly there / gone
//!   (`nft -j list table`), and one refused element fails exactly its
//!   change while the rest of the batch is applied;
//! - removing a mapping deletes its conntrack entries over ctnetlink.
//!
//! Needs root, `ip`, `nft` and `conntrack`: under CI (`CI=true`) it fails
//! without them; elsewhere it prints `SKIPPED: <reason>` and passes. The
//! namespace is deleted on drop, also when an assertion fails.

#![allow(clippy::unwrap_used, clippy::panic, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;

use portkeep_proto::Protocol;
use portkeep_server::{
    Change, ChangeRecord, Dataplane, FilterRule, MappingKey, MappingKind, MappingRecord,
    RemoveReason, SubscriberKeying, Timestamp,
};
use portkeep_test_support::netns::{self, in_ns, run, Lab};
use portkeepd::nft::{element_messages, table_definition, NftDataplane, NftSettings};

const TABLE: &str = "pknl";

/// One namespace, deleted with the lab.
struct Ns {
    name: String,
    _lab: Lab,
}

fn setup(what: &str, tools: &[&str]) -> Option<Ns> {
    netns::setup(what, tools, || {
        let mut lab = Lab::new("nfnl")?;
        let name = format!("pknl-{}", lab.id);
        lab.add_ns(&name)?;
        Ok(Ns { name, _lab: lab })
    })
}

impl Ns {
    fn exec(&self, args: &[&str]) -> Result<String, String> {
        run(Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args))
    }

    fn nft(&self, script: &str) {
        self.exec(&["nft", script]).unwrap();
    }

    /// `nft -j list table`: the elements of each set, as nft prints them
    /// in JSON (one value per element).
    fn elements(&self) -> BTreeMap<String, Vec<serde_json::Value>> {
        let out = self
            .exec(&["nft", "-j", "list", "table", "inet", TABLE])
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let mut sets = BTreeMap::new();
        for item in v["nftables"].as_array().unwrap() {
            for kind in ["set", "map"] {
                if let Some(s) = item.get(kind) {
                    let elems = s
                        .get("elem")
                        .and_then(|e| e.as_array().cloned())
                        .unwrap_or_default();
                    sets.insert(s["name"].as_str().unwrap().to_owned(), elems);
                }
            }
        }
        sets
    }

    fn count(&self, set: &str) -> usize {
        self.elements().get(set).map_or(0, Vec::len)
    }
}

fn settings() -> NftSettings {
    NftSettings {
        table: TABLE.into(),
        ..NftSettings::default()
    }
}

fn map(proto: Protocol, internal: &str, external: &str) -> MappingRecord {
    let i: SocketAddr = internal.parse().unwrap();
    MappingRecord {
        kind: MappingKind::Map,
        key: MappingKey {
            internal_ip: i.ip(),
            protocol: proto,
            internal_port: i.port(),
        },
        external: external.parse().unwrap(),
        nonce: [0; 12],
        expires: Timestamp(0),
        lifetime: 60,
        checkpoint: false,
        filters: vec![],
        description: None,
        subscriber: SubscriberKeying::default().subscriber_of(i.ip()),
        third_party: false,
        followed: false,
        manager: None,
    }
}

fn peer(internal: &str, external: &str, remote: &str) -> MappingRecord {
    let mut m = map(Protocol::UDP, internal, external);
    m.kind = MappingKind::Peer {
        remote: remote.parse().unwrap(),
    };
    m
}

fn filtered(internal: &str, external: &str, prefix: &str, port: u16) -> MappingRecord {
    let mut m = map(Protocol::TCP, internal, external);
    m.filters = vec![FilterRule {
        prefix: prefix.parse().unwrap(),
        port,
    }];
    m
}

fn up(seq: u64, m: &MappingRecord) -> ChangeRecord {
    ChangeRecord {
        started: false,
        seq,
        change: Change::Upserted(m.clone()),
    }
}

fn down(seq: u64, m: &MappingRecord) -> ChangeRecord {
    ChangeRecord {
        started: false,
        seq,
        change: Change::Removed {
            mapping: m.clone(),
            reason: RemoveReason::Deleted,
        },
    }
}

/// One element as `nft --debug=netlink` shows it: the set, then the key,
/// key end and data as 32-bit words in host order, and the flags.
#[derive(Debug, PartialEq, Eq)]
struct Shown {
    set: String,
    key: Vec<String>,
    key_end: Vec<String>,
    data: Vec<String>,
    flags: String,
}

/// Reads nft's debug output: `SET TABLE 0` lines, each followed by
/// `element K... [- E...] : [D...] FLAGS [end]` entries.
fn parse_nft_debug(out: &str) -> Vec<Shown> {
    let mut shown = Vec::new();
    let mut set = String::new();
    for line in out.lines() {
        if !line.starts_with('\t') {
            set = line
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned();
            continue;
        }
        for entry in line.split("[end]") {
            let Some(body) = entry.trim().strip_prefix("element ") else {
                continue;
            };
            let (before, after) = body.split_once(':').unwrap();
            let (key, key_end) = match before.split_once(" - ") {
                Some((k, e)) => (k, e),
                None => (before, ""),
            };
            let mut after: Vec<String> = after.split_whitespace().map(str::to_owned).collect();
            let flags = after.pop().unwrap();
            let words = |s: &str| s.split_whitespace().map(str::to_owned).collect();
            shown.push(Shown {
                set: set.clone(),
                key: words(key),
                key_end: words(key_end),
                data: after,
                flags,
            });
        }
    }
    shown
}

fn u16_at(b: &[u8], at: usize) -> usize {
    u16::from_ne_bytes([b[at], b[at + 1]]) as usize
}

/// The attributes of `b` as `(type without flags, payload)`.
fn attrs(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = u16_at(b, 0);
        let ty = u16_at(b, 2) as u16 & 0x3fff;
        out.push((ty, &b[4..len]));
        b = &b[((len + 3) & !3).min(b.len())..];
    }
    out
}

fn words(v: &[u8]) -> Vec<String> {
    v.chunks(4)
        .map(|c| {
            let mut w = [0u8; 4];
            w[..c.len()].copy_from_slice(c);
            format!("{:08x}", u32::from_ne_bytes(w))
        })
        .collect()
}

/// Decodes one of the daemon's NEWSETELEM messages the way nft shows one.
fn show_message(msg: &[u8]) -> Shown {
    let len = u32::from_ne_bytes(msg[..4].try_into().unwrap()) as usize;
    assert_eq!(len, msg.len());
    // NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWSETELEM, family inet.
    assert_eq!(u16_at(msg, 4), 0x0a0c);
    assert_eq!(msg[16], 1);
    let top = attrs(&msg[20..]);
    let get = |a: &[(u16, &'static [u8])], t: u16| a.iter().find(|(ty, _)| *ty == t).map(|x| x.1);
    let top: Vec<(u16, &'static [u8])> = top
        .into_iter()
        .map(|(t, p)| (t, &*Box::leak(p.to_vec().into_boxed_slice())))
        .collect();
    assert_eq!(get(&top, 1).unwrap(), format!("{TABLE}\0").as_bytes());
    let set = String::from_utf8(get(&top, 2).unwrap().to_vec()).unwrap();
    let list = attrs(get(&top, 3).unwrap());
    assert_eq!(list.len(), 1, "one element per message");
    let el: Vec<(u16, &'static [u8])> = attrs(list[0].1)
        .into_iter()
        .map(|(t, p)| (t, &*Box::leak(p.to_vec().into_boxed_slice())))
        .collect();
    let value = |t: u16| {
        get(&el, t)
            .map(|n| {
                let v = attrs(n);
                assert_eq!(v[0].0, 1, "NFTA_DATA_VALUE");
                words(v[0].1)
            })
            .unwrap_or_default()
    };
    let flags = get(&el, 3).map_or(0, |f| u32::from_be_bytes(f.try_into().unwrap()));
    Shown {
        set: set.trim_end_matches('\0').to_owned(),
        key: value(1),
        key_end: value(10),
        data: value(2),
        flags: flags.to_string(),
    }
}

/// RFC 6887 sections 11, 12 and 13.3 and the IPv6 pinhole: for each kind
/// of element, the daemon's netlink message carries what nft sends for
/// the same statement, word for word.
#[test]
fn element_messages_match_what_nft_sends_for_the_same_statement() {
    let Some(ns) = setup(
        "netlink messages versus nft --debug=netlink",
        &["ip", "nft"],
    ) else {
        return;
    };
    ns.exec(&["nft", &table_definition(&settings())]).unwrap();
    let cases: Vec<(&str, MappingRecord, Vec<&str>)> = vec![
        (
            "RFC 6887 section 11 MAP: DNAT and SNAT",
            map(Protocol::TCP, "10.0.0.2:8080", "198.51.100.1:30000"),
            vec![
                "dnat4 { 6 . 198.51.100.1 . 30000 : 10.0.0.2 . 8080 }",
                "snat4 { 6 . 10.0.0.2 . 8080 : 198.51.100.1 . 30000 }",
            ],
        ),
        (
            "RFC 6887 section 11 MAP, all ports of one protocol",
            map(Protocol::UDP, "10.0.0.4:0", "198.51.100.3:0"),
            vec![
                "dnat4_proto { 17 . 198.51.100.3 : 10.0.0.4 }",
                "snat4_proto { 17 . 10.0.0.4 : 198.51.100.3 }",
            ],
        ),
        (
            "RFC 6887 section 12 PEER pin",
            peer("10.0.0.2:5000", "198.51.100.1:40000", "203.0.113.9:3478"),
            vec!["peer4 { 17 . 10.0.0.2 . 5000 . 203.0.113.9 . 3478 : 198.51.100.1 . 40000 }"],
        ),
        (
            "RFC 6887 section 13.3 FILTER interval",
            filtered("10.0.0.2:22", "198.51.100.1:30022", "203.0.113.0/24", 0),
            vec![
                "dnat4 { 6 . 198.51.100.1 . 30022 : 10.0.0.2 . 22 }",
                "snat4 { 6 . 10.0.0.2 . 22 : 198.51.100.1 . 30022 }",
                "filtered4 { 6 . 198.51.100.1 . 30022 }",
                "allow4 { 6 . 198.51.100.1 . 30022 . 203.0.113.0/24 . 0-65535 }",
            ],
        ),
        (
            "RFC 6887 section 13.3 FILTER, one host and port",
            filtered("10.0.0.2:23", "198.51.100.1:30023", "192.0.2.7/32", 5000),
            vec![
                "dnat4 { 6 . 198.51.100.1 . 30023 : 10.0.0.2 . 23 }",
                "snat4 { 6 . 10.0.0.2 . 23 : 198.51.100.1 . 30023 }",
                "filtered4 { 6 . 198.51.100.1 . 30023 }",
                "allow4 { 6 . 198.51.100.1 . 30023 . 192.0.2.7 . 5000 }",
            ],
        ),
        (
            "IPv6 pinhole",
            map(Protocol::TCP, "[2001:db8::5]:443", "[2001:db8::5]:443"),
            vec!["pinhole6 { 6 . 2001:db8::5 . 443 }"],
        ),
        (
            "IPv6 FILTER interval",
            {
                let mut m = filtered(
                    "[2001:db8::6]:22",
                    "[2001:db8:ffff::1]:30022",
                    "2001:db8:1::/48",
                    0,
                );
                m.key.internal_ip = "2001:db8::6".parse().unwrap();
                m
            },
            vec![
                "dnat6 { 6 . 2001:db8:ffff::1 . 30022 : 2001:db8::6 . 22 }",
                "snat6 { 6 . 2001:db8::6 . 22 : 2001:db8:ffff::1 . 30022 }",
                "filtered6 { 6 . 2001:db8:ffff::1 . 30022 }",
                "allow6 { 6 . 2001:db8:ffff::1 . 30022 . 2001:db8:1::/48 . 0-65535 }",
            ],
        ),
    ];
    for (what, m, statements) in cases {
        let ours: Vec<Shown> = element_messages(&m, TABLE)
            .unwrap()
            .iter()
            .map(|msg| show_message(msg))
            .collect();
        let mut nft = Vec::new();
        for s in &statements {
            let out = ns
                .exec(&[
                    "nft",
                    "--debug=netlink",
                    &format!("add element inet {TABLE} {s}"),
                ])
                .unwrap();
            nft.extend(parse_nft_debug(&out));
        }
        assert_eq!(nft.len(), statements.len(), "{what}: nft showed {nft:?}");
        assert_eq!(ours, nft, "{what}");
    }
}

/// Elements added and deleted over netlink are exactly in the table, then
/// gone; one element the kernel refuses fails exactly the change it
/// belongs to, while every other change of the batch is applied.
#[test]
fn netlink_batches_apply_exactly_and_fail_exactly_the_refused_change() {
    let Some(ns) = setup("nftables over netlink", &["ip", "nft"]) else {
        return;
    };
    let name = ns.name.clone();
    let a = map(Protocol::TCP, "10.0.0.2:8080", "198.51.100.1:30000");
    let p = peer("10.0.0.3:5000", "198.51.100.1:40000", "203.0.113.9:3478");
    let f = filtered("10.0.0.4:22", "198.51.100.1:30022", "203.0.113.0/24", 0);
    let pin = map(Protocol::TCP, "[2001:db8::5]:443", "[2001:db8::5]:443");
    let c = map(Protocol::TCP, "10.0.0.6:8080", "198.51.100.1:30001");
    let (a2, p2, f2, pin2, c2) = (a.clone(), p.clone(), f.clone(), pin.clone(), c.clone());
    let mut dp = in_ns(&name, move || {
        let mut dp = NftDataplane::new(settings());
        dp.apply(&[up(1, &a2), up(2, &p2), up(3, &f2), up(4, &pin2), up(5, &c2)])
            .unwrap();
        dp
    });
    for (set, n) in [
        ("dnat4", 3),
        ("snat4", 3),
        ("peer4", 1),
        ("filtered4", 1),
        ("allow4", 1),
        ("pinhole6", 1),
    ] {
        assert_eq!(ns.count(set), n, "{set}: {:?}", ns.elements());
    }
    let allow = &ns.elements()["allow4"][0];
    assert!(allow.to_string().contains("203.0.113.0"), "{allow}");

    // Behind the dataplane's back, a's DNAT element goes: deleting it
    // again is answered ENOENT, which means it is gone already: not a
    // failure. Then one batch removes a and c (their DNAT deletes share a
    // message, which the kernel refuses as a whole; one per message, a's
    // is dropped and the rest sent again), adds b and removes p. An
    // element for b's external endpoint, put there behind the
    // dataplane's back too, has the kernel refuse b's DNAT: b alone fails.
    ns.nft(&format!(
        "delete element inet {TABLE} dnat4 {{ 6 . 198.51.100.1 . 30000 : 10.0.0.2 . 8080 }}"
    ));
    ns.nft(&format!(
        "add element inet {TABLE} dnat4 {{ 17 . 198.51.100.1 . 30053 : 10.9.9.9 . 53 }}"
    ));
    let b = map(Protocol::UDP, "10.0.0.5:53", "198.51.100.1:30053");
    let (a2, b2, p2, c2) = (a.clone(), b.clone(), p.clone(), c.clone());
    let (r, dp) = in_ns(&name, move || {
        let r = dp.apply(&[down(10, &a2), up(11, &b2), down(12, &p2), down(13, &c2)]);
        (r, dp)
    });
    let mut dp = dp;
    let err = r.unwrap_err();
    assert_eq!(err.failed, [11], "{err}");
    assert!(err.message.contains("dnat4"), "{err}");
    // a (its SNAT too), p and c went out: nothing the server dropped is
    // left forwarding; b is not in; f and the foreign element stay.
    assert_eq!(ns.count("dnat4"), 2, "{:?}", ns.elements());
    assert_eq!(ns.count("snat4"), 1, "{:?}", ns.elements());
    assert_eq!(ns.count("peer4"), 0);

    // Deleting the rest empties the table.
    let (b2, f2, pin2) = (b.clone(), f.clone(), pin.clone());
    let r = in_ns(&name, move || {
        let r = dp.apply(&[down(20, &b2), down(21, &f2), down(22, &pin2)]);
        drop(dp);
        r
    });
    r.unwrap();
    for set in ["snat4", "peer4", "filtered4", "allow4", "pinhole6"] {
        assert_eq!(ns.count(set), 0, "{set}: {:?}", ns.elements());
    }
    // Only the element that was never the dataplane's is left.
    assert_eq!(ns.count("dnat4"), 1, "{:?}", ns.elements());
}

/// Conntrack entries in the namespace, as `conntrack -L` counts them.
fn flows(ns: &Ns) -> String {
    ns.exec(&["conntrack", "-L"]).unwrap_or_default()
}

/// RFC 6887 section 15 (a deleted mapping stops forwarding): removing a
/// MAP deletes, over ctnetlink, the conntrack entries of flows to its
/// external endpoint and from its internal one; a PEER's flow is deleted
/// by its exact tuple; unrelated flows stay.
#[test]
fn removed_mappings_lose_their_conntrack_entries_over_ctnetlink() {
    let Some(ns) = setup(
        "conntrack cleanup over ctnetlink",
        &["ip", "nft", "conntrack"],
    ) else {
        return;
    };
    let name = ns.name.clone();
    let m = map(Protocol::TCP, "10.0.0.2:8080", "198.51.100.1:30000");
    let p = peer("10.0.0.3:5000", "198.51.100.1:40000", "203.0.113.9:3478");
    let (m2, p2) = (m.clone(), p.clone());
    let dp = in_ns(&name, move || {
        let mut dp = NftDataplane::new(settings());
        dp.apply(&[up(1, &m2), up(2, &p2)]).unwrap();
        dp
    });
    let insert = |args: &str| {
        let mut v = vec!["conntrack", "-I"];
        v.extend(args.split_whitespace());
        v.extend(["-t", "300", "-u", "SEEN_REPLY"]);
        ns.exec(&v).unwrap();
    };
    // Inbound to the mapping, DNATed to 10.0.0.2:8080.
    insert("-p tcp -s 203.0.113.7 -d 198.51.100.1 --sport 41000 --dport 30000 -r 10.0.0.2 -q 203.0.113.7 --reply-port-src 8080 --reply-port-dst 41000 --state ESTABLISHED");
    // The PEER's flow, SNATed to 198.51.100.1:40000.
    insert("-p udp -s 10.0.0.3 -d 203.0.113.9 --sport 5000 --dport 3478 -r 203.0.113.9 -q 198.51.100.1 --reply-port-src 3478 --reply-port-dst 40000");
    // Someone else's flow.
    insert("-p tcp -s 203.0.113.7 -d 198.51.100.1 --sport 41001 --dport 30001 -r 10.0.0.9 -q 203.0.113.7 --reply-port-src 8080 --reply-port-dst 41001 --state ESTABLISHED");
    let before = flows(&ns);
    assert_eq!(before.lines().count(), 3, "{before}");
    let (m2, p2) = (m.clone(), p.clone());
    in_ns(&name, move || {
        let mut dp = dp;
        dp.apply(&[down(3, &m2), down(4, &p2)]).unwrap();
        // Deleting them again finds nothing: ENOENT is not an error.
        dp.apply(&[up(5, &m2), down(6, &m2)]).unwrap();
    });
    let after = flows(&ns);
    assert_eq!(after.lines().count(), 1, "{after}");
    assert!(after.contains("dport=30001"), "{after}");
}

/// RFC 6887 section 15, for IPv6: removing an IPv6 MAP deletes the
/// conntrack entries of flows to its external endpoint (ESTABLISHED and
/// TIME_WAIT alike) and of flows from its internal one; a flow to another
/// port of the same external address, and one to the same port of
/// another address, stay.
#[test]
fn rfc6887_s15_removed_ipv6_mapping_loses_its_conntrack_entries() {
    let Some(ns) = setup(
        "IPv6 conntrack cleanup over ctnetlink",
        &["ip", "nft", "conntrack"],
    ) else {
        return;
    };
    let name = ns.name.clone();
    let m = map(
        Protocol::TCP,
        "[2001:db8::2]:8080",
        "[2001:db8:ffff::1]:30000",
    );
    let m2 = m.clone();
    let dp = in_ns(&name, move || {
        let mut dp = NftDataplane::new(settings());
        dp.apply(&[up(1, &m2)]).unwrap();
        dp
    });
    let insert = |args: &str| {
        let mut v = vec!["conntrack", "-I"];
        v.extend(args.split_whitespace());
        v.extend(["-t", "300", "-u", "SEEN_REPLY"]);
        ns.exec(&v).unwrap();
    };
    // Inbound to the mapping, DNATed to [2001:db8::2]:8080.
    insert("-p tcp -s 2001:db8:aaaa::7 -d 2001:db8:ffff::1 --sport 41000 --dport 30000 -r 2001:db8::2 -q 2001:db8:aaaa::7 --reply-port-src 8080 --reply-port-dst 41000 --state ESTABLISHED");
    insert("-p tcp -s 2001:db8:aaaa::8 -d 2001:db8:ffff::1 --sport 41002 --dport 30000 -r 2001:db8::2 -q 2001:db8:aaaa::8 --reply-port-src 8080 --reply-port-dst 41002 --state TIME_WAIT");
    // Outbound from the internal endpoint, SNATed to the external one.
    insert("-p tcp -s 2001:db8::2 -d 2001:db8:bbbb::9 --sport 8080 --dport 443 -r 2001:db8:bbbb::9 -q 2001:db8:ffff::1 --reply-port-src 443 --reply-port-dst 30000 --state ESTABLISHED");
    // Someone else's flows: another port, another address.
    insert("-p tcp -s 2001:db8:aaaa::7 -d 2001:db8:ffff::1 --sport 41001 --dport 30001 -r 2001:db8::9 -q 2001:db8:aaaa::7 --reply-port-src 8080 --reply-port-dst 41001 --state ESTABLISHED");
    insert("-p tcp -s 2001:db8:aaaa::7 -d 2001:db8:ffff::2 --sport 41003 --dport 30000 -r 2001:db8::9 -q 2001:db8:aaaa::7 --reply-port-src 8080 --reply-port-dst 41003 --state ESTABLISHED");
    let v6 = || {
        ns.exec(&["conntrack", "-L", "-f", "ipv6"])
            .unwrap_or_default()
    };
    let before = v6();
    assert_eq!(before.lines().count(), 5, "{before}");
    in_ns(&name, move || {
        let mut dp = dp;
        dp.apply(&[down(2, &m)]).unwrap();
    });
    let after = v6();
    assert_eq!(after.lines().count(), 2, "{after}");
    assert!(after.contains("dport=30001"), "{after}");
    assert!(after.contains("dst=2001:db8:ffff::2"), "{after}");
}

/// An apply larger than one netlink batch (the acks of one batch must fit
/// the socket's receive buffer) installs every element, and a rebuild
/// loads them all again.
#[test]
fn an_apply_of_many_batches_installs_every_element() {
    let Some(ns) = setup("nftables over netlink, many batches", &["ip", "nft"]) else {
        return;
    };
    let n = 12_000usize;
    let maps: Vec<MappingRecord> = (0..n)
        .map(|i| {
            map(
                Protocol::TCP,
                &format!("10.1.{}.{}:8080", i / 250, i % 250 + 1),
                &format!("198.51.100.{}:{}", i / 50_000 + 1, 1024 + i % 50_000),
            )
        })
        .collect();
    let name = ns.name.clone();
    let ups: Vec<ChangeRecord> = maps.iter().zip(1..).map(|(m, s)| up(s, m)).collect();
    let dp = in_ns(&name, move || {
        let mut dp = NftDataplane::new(settings());
        dp.apply(&ups).unwrap();
        dp
    });
    assert_eq!(ns.count("dnat4"), n);
    assert_eq!(ns.count("snat4"), n);
    // Someone flushes a map behind the dataplane's back; after a doubt the
    // rebuild puts everything back.
    ns.nft(&format!("flush map inet {TABLE} snat4"));
    in_ns(&name, move || {
        let mut dp = dp;
        Dataplane::invalidate(&mut dp);
        dp.apply(&[]).unwrap();
    });
    assert_eq!(ns.count("dnat4"), n);
    assert_eq!(ns.count("snat4"), n);
}
