//! The nftables dataplane: mappings become elements of nft maps and sets
//! in one table that Portkeep owns (`table inet portkeep` by default).
//!
//! The rules are fixed and few (O(1) in the number of mappings); every
//! mapping is one or a few map elements, looked up by concatenated keys:
//!
//! - MAP (RFC 6887 section 11) -> a DNAT element keyed by
//!   `l4proto . external address . external port` plus an SNAT element
//!   keyed by the internal endpoint, so the internal host's own outbound
//!   flows leave from the same external endpoint (endpoint-independent
//!   mapping, RFC 6887 section 11.1 and RFC 4787 REQ-1). Protocol 0 (all
//!   protocols) and port 0 (all ports) use their own maps keyed by the
//!   address alone, or by protocol and address.
//! - An IPv6 MAP whose external endpoint equals its internal one (no
//!   translation, RFC 6887 section 1 "firewall" case) is a pinhole: a
//!   forward-accept set element only.
//! - FILTER (RFC 6887 section 13.3) -> the external endpoint goes into a
//!   `filtered` set and each permitted `remote prefix . remote ports` into
//!   an interval `allow` set keyed by the external endpoint too; one rule
//!   drops original-direction packets to a filtered endpoint from anyone
//!   not allowed.
//! - PEER (RFC 6887 section 12) -> an SNAT pin keyed by the flow's 5-tuple,
//!   which wins over the MAP SNAT and over the operator's own masquerade
//!   (its chain runs at `srcnat - 1`).
//!
//! The table's definition (its sets and rules) is loaded once with
//! `nft -f`, judged by its exit status alone. Elements, the hot path, go
//! over netlink ([`crate::nfnl`]): each [`Dataplane::apply`] is one
//! nf_tables batch (one kernel transaction; several for very large
//! applies) of element messages, each acknowledged on its own. A refused
//! message of one element names that element and so the changes it
//! belongs to; the elements of a larger refused message are sent one per
//! message next time, which names the refused one. A batch is all or
//! nothing: when one message fails the kernel aborts the batch, so it is
//! sent again without the mappings whose elements failed, and exactly
//! those are reported.
//!
//! The first call after start (and after anything that leaves the table
//! in doubt) rebuilds: `nft -f` deletes and re-creates the table, then
//! every known element is loaded over netlink, so leftovers of an earlier
//! run vanish and nothing is installed twice. Removed mappings also lose
//! their conntrack entries, deleted over ctnetlink, or an established flow
//! would keep forwarding.
//!
//! The dataplane remembers which elements each mapping installed, so an
//! update deletes exactly what it replaces and a delete never names an
//! element that is not there.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use portkeep_server::prefix::canonical;
use portkeep_server::{
    Change, ChangeRecord, Dataplane, DataplaneError, MappingKey, MappingKind, MappingRecord,
};

use crate::nfnl::{self, reg, CtMatch, Dir, ElemRef, Op, Outcome};

/// What to do with the table when the daemon stops cleanly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStop {
    /// Leave the rules in place: forwarding continues while the daemon
    /// restarts, and the next start reconciles the table from the store.
    Keep,
    /// Delete the table.
    Flush,
}

/// Settings of the nftables dataplane (`[dataplane]` in the config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftSettings {
    /// Table name (family `inet`).
    pub table: String,
    /// What a clean stop does.
    pub on_stop: OnStop,
    /// Interfaces inbound mappings apply on (empty: any).
    pub external_interfaces: Vec<String>,
    /// Interfaces whose traffic the SNAT pins apply to (empty: any).
    pub internal_interfaces: Vec<String>,
    /// The `nft` binary, which loads the table's definition.
    pub nft: PathBuf,
    /// Whether the conntrack entries of removed mappings are deleted.
    pub conntrack_cleanup: bool,
    /// How long the committer waits for one batch (see
    /// [`crate::bounded`]).
    pub timeout: std::time::Duration,
    /// Firewall mode (`mode = "firewall"`), or `None` for NAT only.
    pub firewall: Option<FirewallSettings>,
}

/// Firewall mode: Portkeep is the IPv6 firewall of these prefixes (RFC
/// 6887 section 1), and its mappings are the pinholes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirewallSettings {
    /// The internal IPv6 prefixes new inbound flows to are dropped unless
    /// a mapping lets them in.
    pub prefixes: Vec<portkeep_server::Prefix>,
    /// The packet mark bits Portkeep's forward chain sets on what it
    /// accepts, so that an operator's own forward chain can accept it too
    /// (an accept in one table does not stop another table's drop).
    pub accept_mark: u32,
}

/// The default [`FirewallSettings::accept_mark`]: one bit, high enough to
/// stay clear of the low bits routing daemons and VPNs commonly use.
pub const DEFAULT_ACCEPT_MARK: u32 = 0x1000_0000;

impl Default for NftSettings {
    fn default() -> Self {
        NftSettings {
            table: "portkeep".into(),
            on_stop: OnStop::Keep,
            external_interfaces: Vec::new(),
            internal_interfaces: Vec::new(),
            nft: PathBuf::from("nft"),
            conntrack_cleanup: true,
            timeout: std::time::Duration::from_millis(2000),
            firewall: None,
        }
    }
}

/// Which mapping an element belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Ident {
    kind: MappingKind,
    key: MappingKey,
}

/// One element of one of the table's maps or sets, as the kernel holds it
/// (see [`nfnl::ElemRef`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Elem {
    set: &'static str,
    key: Box<[u8]>,
    /// The upper end of a range (the `allow` sets only).
    key_end: Option<Box<[u8]>>,
    /// The mapped value (maps only).
    value: Option<Box<[u8]>>,
}

impl Elem {
    fn as_ref(&self) -> ElemRef<'_> {
        ElemRef {
            key: &self.key,
            key_end: self.key_end.as_deref(),
            data: self.value.as_deref(),
        }
    }
}

/// A field of a set's key or value, as the table definition types it.
#[derive(Debug, Clone, Copy)]
enum Field {
    Proto,
    Addr,
    Port,
}

/// The fields of the keys and values of each set (see [`table_definition`]);
/// used only to show elements in nft's syntax in logs.
fn layout(set: &str) -> (&'static [Field], &'static [Field]) {
    use Field::*;
    match set.replace(['4', '6'], "").as_str() {
        "dnat" | "snat" => (&[Proto, Addr, Port], &[Addr, Port]),
        "dnat_proto" | "snat_proto" => (&[Proto, Addr], &[Addr]),
        "dnat_all" | "snat_all" => (&[Addr], &[Addr]),
        "peer" => (&[Proto, Addr, Port, Addr, Port], &[Addr, Port]),
        "allow" | "peer_allow" => (&[Proto, Addr, Port, Addr, Port], &[]),
        "pinhole_proto" => (&[Proto, Addr], &[]),
        "pinhole_all" => (&[Addr], &[]),
        _ => (&[Proto, Addr, Port], &[]),
    }
}

/// Registers shown as nft would print the values they hold.
fn show(out: &mut String, fields: &[Field], v6: bool, lo: &[u8], hi: Option<&[u8]>) {
    let mut at = 0usize;
    for (i, f) in fields.iter().enumerate() {
        if i > 0 {
            out.push_str(" . ");
        }
        let width = match f {
            Field::Addr if v6 => 16,
            _ => 4,
        };
        let one = |b: &[u8]| -> String {
            match (f, b.len()) {
                (Field::Proto, _) => b.first().map_or_else(String::new, |p| p.to_string()),
                (Field::Port, _) => match b {
                    [a, b, ..] => u16::from_be_bytes([*a, *b]).to_string(),
                    _ => String::new(),
                },
                (Field::Addr, 4) => <[u8; 4]>::try_from(b)
                    .map(|a| std::net::Ipv4Addr::from(a).to_string())
                    .unwrap_or_default(),
                (Field::Addr, _) => <[u8; 16]>::try_from(b)
                    .map(|a| std::net::Ipv6Addr::from(a).to_string())
                    .unwrap_or_default(),
            }
        };
        let a = lo.get(at..at + width).unwrap_or_default();
        out.push_str(&one(a));
        if let Some(b) = hi.and_then(|h| h.get(at..at + width)) {
            if a != b {
                out.push('-');
                out.push_str(&one(b));
            }
        }
        at += width;
    }
}

impl std::fmt::Display for Elem {
    /// `SET { KEY : VALUE }` in nft's syntax, for messages.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (k, v) = layout(self.set);
        let v6 = self.set.contains('6');
        let mut s = String::new();
        show(&mut s, k, v6, &self.key, self.key_end.as_deref());
        if let Some(val) = &self.value {
            s.push_str(" : ");
            show(&mut s, v, v6, val, None);
        }
        write!(f, "{} {{ {s} }}", self.set)
    }
}

/// The per-family names and types.
struct Fam {
    v6: bool,
}

impl Fam {
    fn of(ip: IpAddr) -> Fam {
        Fam { v6: ip.is_ipv6() }
    }
    fn pick(&self, v4: &'static str, v6: &'static str) -> &'static str {
        if self.v6 {
            v6
        } else {
            v4
        }
    }
}

/// An error message for one mapping.
fn unsupported(m: &MappingRecord, why: &str) -> String {
    format!(
        "cannot program {} {}:{} -> {}: {why}",
        m.key.protocol, m.key.internal_ip, m.key.internal_port, m.external
    )
}

/// Registers of `fields`, built by `f`.
fn regs(f: impl FnOnce(&mut Vec<u8>)) -> Box<[u8]> {
    let mut v = Vec::with_capacity(44);
    f(&mut v);
    v.into_boxed_slice()
}

/// `(protocol, address)`.
fn pa(p: u8, a: IpAddr) -> Box<[u8]> {
    regs(|v| {
        reg::proto(v, p);
        reg::addr(v, a);
    })
}

/// `(protocol, address, port)`.
fn pap(p: u8, a: IpAddr, port: u16) -> Box<[u8]> {
    regs(|v| {
        reg::proto(v, p);
        reg::addr(v, a);
        reg::port(v, port);
    })
}

/// `(address, port)`.
fn ap(a: IpAddr, port: u16) -> Box<[u8]> {
    regs(|v| {
        reg::addr(v, a);
        reg::port(v, port);
    })
}

/// `address`.
fn a(a: IpAddr) -> Box<[u8]> {
    regs(|v| reg::addr(v, a))
}

/// The first and last address of a FILTER prefix, in the family of
/// `canonical(addr)` (an IPv4-mapped prefix counts as the IPv4 one).
fn prefix_range(addr: IpAddr, len: u8) -> (IpAddr, IpAddr) {
    match (addr, canonical(addr)) {
        (orig, IpAddr::V4(v4)) => {
            let len = if orig.is_ipv6() {
                len.saturating_sub(96)
            } else {
                len
            };
            let m = u32::MAX
                .checked_shl(32 - u32::from(len.min(32)))
                .unwrap_or(0);
            let lo = u32::from(v4) & m;
            (
                IpAddr::V4(lo.into()),
                IpAddr::V4(std::net::Ipv4Addr::from(lo | !m)),
            )
        }
        (_, IpAddr::V6(v6)) => {
            let m = u128::MAX
                .checked_shl(128 - u32::from(len.min(128)))
                .unwrap_or(0);
            let lo = u128::from(v6) & m;
            (
                IpAddr::V6(lo.into()),
                IpAddr::V6(std::net::Ipv6Addr::from(lo | !m)),
            )
        }
    }
}

fn elem(set: &'static str, key: Box<[u8]>, value: Option<Box<[u8]>>) -> Elem {
    Elem {
        set,
        key,
        key_end: None,
        value,
    }
}

/// The elements that implement one mapping.
fn elements(m: &MappingRecord) -> Result<Vec<Elem>, String> {
    let int = canonical(m.key.internal_ip);
    let ext = canonical(m.external.ip());
    if int.is_ipv4() != ext.is_ipv4() {
        return Err(unsupported(
            m,
            "the nftables dataplane does not translate between IPv4 and IPv6",
        ));
    }
    let f = Fam::of(int);
    let p = m.key.protocol.0;
    let (iport, eport) = (m.key.internal_port, m.external.port());
    let mut out = Vec::new();
    match m.kind {
        MappingKind::Map => {
            let pinhole = int == ext && iport == eport;
            if !m.filters.is_empty() && (p == 0 || eport == 0) {
                // Dropping the filters would open more than was asked.
                return Err(unsupported(
                    m,
                    "FILTER on an all-protocols or all-ports mapping is not supported",
                ));
            }
            if pinhole {
                out.push(if p == 0 {
                    elem(f.pick("pinhole4_all", "pinhole6_all"), a(ext), None)
                } else if iport == 0 {
                    elem(f.pick("pinhole4_proto", "pinhole6_proto"), pa(p, ext), None)
                } else {
                    elem(f.pick("pinhole4", "pinhole6"), pap(p, ext, eport), None)
                });
            } else if p == 0 {
                out.push(elem(f.pick("dnat4_all", "dnat6_all"), a(ext), Some(a(int))));
                out.push(elem(f.pick("snat4_all", "snat6_all"), a(int), Some(a(ext))));
            } else if iport == 0 || eport == 0 {
                out.push(elem(
                    f.pick("dnat4_proto", "dnat6_proto"),
                    pa(p, ext),
                    Some(a(int)),
                ));
                out.push(elem(
                    f.pick("snat4_proto", "snat6_proto"),
                    pa(p, int),
                    Some(a(ext)),
                ));
            } else {
                out.push(elem(
                    f.pick("dnat4", "dnat6"),
                    pap(p, ext, eport),
                    Some(ap(int, iport)),
                ));
                out.push(elem(
                    f.pick("snat4", "snat6"),
                    pap(p, int, iport),
                    Some(ap(ext, eport)),
                ));
            }
            if !m.filters.is_empty() {
                out.push(elem(
                    f.pick("filtered4", "filtered6"),
                    pap(p, ext, eport),
                    None,
                ));
                for r in &m.filters {
                    if canonical(r.prefix.addr()).is_ipv4() != ext.is_ipv4() {
                        // A peer of the other family can never reach this
                        // mapping: nothing to allow.
                        continue;
                    }
                    let (lo, hi) = prefix_range(r.prefix.addr(), r.prefix.len());
                    let (plo, phi) = if r.port == 0 {
                        (0, u16::MAX)
                    } else {
                        (r.port, r.port)
                    };
                    let half = |addr: IpAddr, port: u16| {
                        regs(|v| {
                            reg::proto(v, p);
                            reg::addr(v, ext);
                            reg::port(v, eport);
                            reg::addr(v, addr);
                            reg::port(v, port);
                        })
                    };
                    // A concatenated range is one element from KEY to
                    // KEY_END (nftables' pipapo sets, Linux 5.6+).
                    out.push(Elem {
                        set: f.pick("allow4", "allow6"),
                        key: half(lo, plo),
                        key_end: Some(half(hi, phi)),
                        value: None,
                    });
                }
            }
        }
        MappingKind::Peer { remote } => {
            let r = canonical(remote.ip());
            if r.is_ipv4() != int.is_ipv4() {
                return Err(unsupported(m, "remote peer of the other address family"));
            }
            if p == 0 || iport == 0 || eport == 0 || remote.port() == 0 {
                return Err(unsupported(m, "PEER needs a protocol and ports"));
            }
            if int == ext && iport == eport {
                // Nothing to translate, but the peer may speak first:
                // RFC 6887 section 12 has PEER create a mapping that lets
                // the remote peer's traffic in, and in firewall mode only
                // this element lets a first inbound packet through.
                out.push(elem(
                    f.pick("peer4_allow", "peer6_allow"),
                    regs(|v| {
                        reg::proto(v, p);
                        reg::addr(v, r);
                        reg::port(v, remote.port());
                        reg::addr(v, int);
                        reg::port(v, iport);
                    }),
                    None,
                ));
                return Ok(out);
            }
            out.push(elem(
                f.pick("peer4", "peer6"),
                regs(|v| {
                    reg::proto(v, p);
                    reg::addr(v, int);
                    reg::port(v, iport);
                    reg::addr(v, r);
                    reg::port(v, remote.port());
                }),
                Some(ap(ext, eport)),
            ));
        }
    }
    Ok(out)
}

/// The netlink messages (`NFT_MSG_NEWSETELEM`, one per element, sequence
/// numbers from 1) that install mapping `m` into `table`: what the
/// dataplane sends for it, exposed for tests that compare it with nft's.
pub fn element_messages(m: &MappingRecord, table: &str) -> Result<Vec<Vec<u8>>, String> {
    elements(m)?
        .iter()
        .zip(1u32..)
        .map(|(e, seq)| {
            let mut b = Vec::new();
            nfnl::setelem(&mut b, Op::Add, seq, table, e.set, e.as_ref())
                .map_err(|e| e.to_string())?;
            Ok(b)
        })
        .collect()
}

/// Interface names as an nft anonymous set, or `None` for any.
fn ifset(names: &[String]) -> Option<String> {
    if names.is_empty() {
        return None;
    }
    let quoted: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
    Some(format!("{{ {} }}", quoted.join(", ")))
}

/// The table's definition: its maps, sets and the handful of rules.
pub fn table_definition(s: &NftSettings) -> String {
    let t = &s.table;
    let iif = ifset(&s.external_interfaces).map_or_else(String::new, |v| format!("iifname {v} "));
    let oif = ifset(&s.external_interfaces).map_or_else(String::new, |v| format!("oifname {v} "));
    let inif = ifset(&s.internal_interfaces).map_or_else(String::new, |v| format!("iifname {v} "));
    let mut d = String::new();
    let _ = writeln!(d, "table inet {t} {{");
    for (n, a) in [("4", "ipv4_addr"), ("6", "ipv6_addr")] {
        let _ = writeln!(
            d,
            "\tmap dnat{n} {{ type inet_proto . {a} . inet_service : {a} . inet_service; }}\n\
             \tmap dnat{n}_proto {{ type inet_proto . {a} : {a}; }}\n\
             \tmap dnat{n}_all {{ type {a} : {a}; }}\n\
             \tmap snat{n} {{ type inet_proto . {a} . inet_service : {a} . inet_service; }}\n\
             \tmap snat{n}_proto {{ type inet_proto . {a} : {a}; }}\n\
             \tmap snat{n}_all {{ type {a} : {a}; }}\n\
             \tmap peer{n} {{ type inet_proto . {a} . inet_service . {a} . inet_service : {a} . inet_service; }}\n\
             \tset filtered{n} {{ type inet_proto . {a} . inet_service; }}\n\
             \tset allow{n} {{ type inet_proto . {a} . inet_service . {a} . inet_service; flags interval; }}\n\
             \tset pinhole{n} {{ type inet_proto . {a} . inet_service; }}\n\
             \tset pinhole{n}_proto {{ type inet_proto . {a}; }}\n\
             \tset pinhole{n}_all {{ type {a}; }}\n\
             \tset peer{n}_allow {{ type inet_proto . {a} . inet_service . {a} . inet_service; }}"
        );
    }
    // The firewalled prefixes are part of the definition: they change
    // only with the configuration, which rebuilds the table. Overlapping
    // prefixes are merged rather than refused.
    let _ = write!(
        d,
        "\tset firewalled6 {{ type ipv6_addr; flags interval; auto-merge;"
    );
    if let Some(fw) = s.firewall.as_ref().filter(|f| !f.prefixes.is_empty()) {
        let list: Vec<String> = fw.prefixes.iter().map(ToString::to_string).collect();
        let _ = write!(d, " elements = {{ {} }};", list.join(", "));
    }
    let _ = writeln!(d, " }}");
    let _ = writeln!(
        d,
        "\tchain filter_in {{\n\
         \t\ttype filter hook prerouting priority dstnat - 10; policy accept;"
    );
    for (n, ip) in [("4", "ip"), ("6", "ip6")] {
        let _ = writeln!(
            d,
            "\t\t{iif}ct direction original meta l4proto . {ip} daddr . th dport @filtered{n} \
             meta l4proto . {ip} daddr . th dport . {ip} saddr . th sport != @allow{n} drop"
        );
    }
    let _ = writeln!(
        d,
        "\t}}\n\
         \tchain prerouting {{\n\
         \t\ttype nat hook prerouting priority dstnat; policy accept;"
    );
    for (n, ip) in [("4", "ip"), ("6", "ip6")] {
        let _ = writeln!(
            d,
            "\t\t{iif}dnat {ip} to meta l4proto . {ip} daddr . th dport map @dnat{n}\n\
             \t\t{iif}dnat {ip} to meta l4proto . {ip} daddr map @dnat{n}_proto\n\
             \t\t{iif}dnat {ip} to {ip} daddr map @dnat{n}_all"
        );
    }
    forward_chain(&mut d, s, &iif);
    let _ = writeln!(
        d,
        "\t}}\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat - 1; policy accept;"
    );
    for (n, ip) in [("4", "ip"), ("6", "ip6")] {
        let _ = writeln!(
            d,
            "\t\t{inif}{oif}snat {ip} to meta l4proto . {ip} saddr . th sport . {ip} daddr . th dport map @peer{n}\n\
             \t\t{inif}{oif}snat {ip} to meta l4proto . {ip} saddr . th sport map @snat{n}\n\
             \t\t{inif}{oif}snat {ip} to meta l4proto . {ip} saddr map @snat{n}_proto\n\
             \t\t{inif}{oif}snat {ip} to {ip} saddr map @snat{n}_all"
        );
    }
    let _ = writeln!(d, "\t}}\n}}");
    d
}

/// The forward chain.
///
/// NAT mode: mappings are let through (policy accept; an operator's
/// forward chain decides the rest).
///
/// Firewall mode (RFC 6887 section 1, the "simple firewall" case; the
/// shape of RFC 6092's recommendations): to a firewalled prefix, the
/// replies of flows the inside opened pass (and ICMPv6 errors related to
/// them), a mapping's traffic passes (a MAP pinhole, section 11; a PEER's remote
/// peer, section 12; FILTER, section 13.3, already dropped the sources it
/// excludes in `filter_in`), and everything else is dropped, new and
/// invalid alike. A flow the outside opened passes only while its mapping
/// lets it, established or not: its inbound packets stop the moment the
/// mapping goes (RFC 6887 section 15), whatever becomes of its conntrack
/// entry. The chain runs just before the `filter` priority and
/// marks what it accepts with `accept_mark`: an accept here does not stop
/// another table's forward chain, so an operator whose own chain drops by
/// default accepts the mark with one rule (docs/config.md).
fn forward_chain(d: &mut String, s: &NftSettings, iif: &str) {
    let fw = s.firewall.as_ref();
    let prio = if fw.is_some() { "filter - 1" } else { "filter" };
    let acc = fw.map_or_else(
        || "accept".to_owned(),
        |f| format!("meta mark set meta mark | 0x{:x} accept", f.accept_mark),
    );
    let _ = writeln!(
        d,
        "\t}}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority {prio}; policy accept;"
    );
    if fw.is_some() {
        let _ = writeln!(
            d,
            "\t\tip6 daddr @firewalled6 ct direction reply ct state established,related {acc}\n\
             \t\tip6 saddr @firewalled6 ct state established,related {acc}"
        );
    }
    let _ = writeln!(d, "\t\tct status dnat {acc}");
    for (n, ip) in [("4", "ip"), ("6", "ip6")] {
        let _ = writeln!(
            d,
            "\t\tmeta l4proto . {ip} daddr . th dport @pinhole{n} {acc}\n\
             \t\tmeta l4proto . {ip} daddr @pinhole{n}_proto {acc}\n\
             \t\t{ip} daddr @pinhole{n}_all {acc}\n\
             \t\tmeta l4proto . {ip} saddr . th sport . {ip} daddr . th dport @peer{n}_allow {acc}"
        );
    }
    if fw.is_some() {
        let _ = writeln!(d, "\t\t{iif}ip6 daddr @firewalled6 drop");
    }
}

/// Protocols whose conntrack tuples carry ports (the ones `conntrack -p`
/// knows by name: TCP, UDP, DCCP, SCTP, UDP-Lite).
fn has_ports(p: u8) -> bool {
    matches!(p, 6 | 17 | 33 | 132 | 136)
}

/// The conntrack entries that carried a removed mapping's flows: inbound
/// flows to its external endpoint, and flows NATed to it on the way out.
pub(crate) fn conntrack_matches(m: &MappingRecord, out: &mut Vec<CtMatch>) {
    let int = canonical(m.key.internal_ip);
    let ext = canonical(m.external.ip());
    let v6 = int.is_ipv6();
    let p = m.key.protocol.0;
    let (iport, eport) = (m.key.internal_port, m.external.port());
    // A port only narrows the match for a protocol whose tuples have ports.
    let with_ports = has_ports(p) && iport != 0 && eport != 0;
    let proto = (p != 0).then_some(p);
    let none = CtMatch {
        dir: Dir::Orig,
        v6,
        proto,
        src: None,
        sport: None,
        dst: None,
        dport: None,
    };
    match m.kind {
        MappingKind::Map => {
            let port = with_ports.then_some(eport);
            out.push(CtMatch {
                dst: Some(ext),
                dport: port,
                ..none
            });
            out.push(CtMatch {
                dir: Dir::Reply,
                dst: Some(ext),
                dport: port,
                ..none
            });
            if with_ports && int != ext {
                out.push(CtMatch {
                    dir: Dir::Reply,
                    src: Some(int),
                    sport: Some(iport),
                    ..none
                });
            }
        }
        MappingKind::Peer { remote } => {
            if has_ports(p) {
                out.push(CtMatch {
                    src: Some(int),
                    sport: Some(iport),
                    dst: Some(canonical(remote.ip())),
                    dport: Some(remote.port()),
                    ..none
                });
                if int == ext && iport == eport {
                    // Untranslated, the peer may have opened the flow.
                    out.push(CtMatch {
                        src: Some(canonical(remote.ip())),
                        sport: Some(remote.port()),
                        dst: Some(int),
                        dport: Some(iport),
                        ..none
                    });
                }
            }
        }
    }
}

/// One conntrack delete: by a match, or of one entry of a dump.
#[derive(Debug)]
enum CtRequest<'a> {
    Match(&'a CtMatch),
    Entry(&'a nfnl::CtEntry),
}

/// Elements per nf_tables batch (one kernel transaction), at most; larger
/// applies take several batches. The kernel also queues every ack of a
/// batch before the first can be read, so its messages must fit the
/// socket's receive buffer ([`nfnl::Socket::max_acks`]), even with each
/// element in a message of its own: a batch has no more elements than
/// that either.
const BATCH_ELEMENTS: usize = 32768;
/// Elements of one set per message. Each message is acked on its own, and
/// an ack costs the kernel and this process about what an element does,
/// so elements share messages; a refused message is sent again with its
/// elements one per message, which names the refused one. 128 of the
/// largest (`allow6`, about 150 bytes) stay well under the 64 KiB a
/// message's element list can hold.
const ELEMENTS_PER_MESSAGE: usize = 128;
/// Conntrack deletes per datagram (each is acked).
const BATCH_MESSAGES: usize = 16384;
/// How often a batch is sent again, first with the elements of refused
/// messages one per message, then without the mappings whose elements
/// were refused, before the rest of it is given up.
const BATCH_ATTEMPTS: usize = 5;

/// One mapping a batch touches, or, on a rebuild, one already installed.
#[derive(Debug)]
struct Owner {
    id: Ident,
    /// The changes that touched it (none: re-installed by a rebuild).
    seqs: Vec<u64>,
    /// Its elements after the batch (`None`: none).
    new: Option<Vec<Elem>>,
    /// It had elements installed before the batch.
    was_installed: bool,
}

/// One element message: an element of `owner`, added from its new
/// elements or deleted from its installed ones.
#[derive(Debug, Clone, Copy)]
struct ElemOp {
    op: Op,
    owner: u32,
    elem: u32,
}

/// A batch of changes turned into element messages.
#[derive(Debug, Default)]
pub struct Batch {
    /// The table is (re)built first.
    rebuild: bool,
    owners: Vec<Owner>,
    /// Deletes first, then adds: an element that moves from one mapping to
    /// another in the same batch (an external port reused) is deleted
    /// before it is added again.
    ops: Vec<ElemOp>,
    /// Conntrack entries to delete afterwards.
    conntrack: Vec<CtMatch>,
    /// Changes that cannot be programmed, with why.
    rejected: Vec<(u64, String)>,
    /// Of those, changes to an installed mapping, which keeps what it had.
    rejected_kept: Vec<u64>,
}

impl Batch {
    /// Element messages in the batch.
    pub fn elements(&self) -> usize {
        self.ops.len()
    }
}

/// The nftables dataplane.
#[derive(Debug)]
pub struct NftDataplane {
    settings: NftSettings,
    /// Opened on first use, in the network namespace of the caller.
    socket: Option<nfnl::Socket>,
    /// What each mapping has installed, as of the last batch.
    installed: HashMap<Ident, Vec<Elem>>,
    /// Whether the table has been (re)built and holds `installed`.
    built: bool,
    /// Whether the kernel refused a conntrack filter (logged once).
    ct_filter_unsupported: bool,
    /// How long `nft -f` may run before it is killed.
    nft_deadline: std::time::Duration,
}

/// How long `nft -f` may run: it loads the table's definition only (a
/// few KiB, whatever the number of mappings), normally in milliseconds.
const NFT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

/// What loading a batch's elements came to.
#[derive(Debug, Default)]
struct Loaded {
    /// Per owner: why it failed (`None`: its elements are in).
    failed: Vec<Option<String>>,
    /// The table may now differ from what `installed` will say.
    doubt: bool,
}

impl NftDataplane {
    /// A dataplane that programs `settings.table`; nothing runs until the
    /// first [`Dataplane::apply`], which builds the table.
    pub fn new(settings: NftSettings) -> NftDataplane {
        NftDataplane {
            settings,
            socket: None,
            installed: HashMap::new(),
            built: false,
            ct_filter_unsupported: false,
            nft_deadline: NFT_DEADLINE,
        }
    }

    /// The settings.
    pub fn settings(&self) -> &NftSettings {
        &self.settings
    }

    /// What `nft -f` loads to (re)build the table: make sure it exists,
    /// delete it with everything in it, define it afresh (one transaction).
    pub fn rebuild_script(&self) -> String {
        let t = &self.settings.table;
        let mut s = format!("add table inet {t}\ndelete table inet {t}\n");
        s.push_str(&table_definition(&self.settings));
        s
    }

    /// Turns changes into element messages against the installed state.
    /// When the table is to be rebuilt every installed mapping is loaded
    /// again, so the installed state moves into the batch.
    pub fn plan(&mut self, changes: &[ChangeRecord]) -> Batch {
        let mut b = Batch {
            rebuild: !self.built,
            ..Batch::default()
        };
        let mut index: HashMap<Ident, usize> = HashMap::new();
        for c in changes {
            let (m, new) = match &c.change {
                Change::Upserted(m) => match elements(m) {
                    Ok(e) => (m, Some(e)),
                    Err(why) => {
                        let id = Ident {
                            kind: m.kind,
                            key: m.key,
                        };
                        if self.installed.contains_key(&id) && !b.rebuild {
                            // Nothing is sent for it: what it had stays.
                            b.rejected_kept.push(c.seq);
                        }
                        b.rejected.push((c.seq, why));
                        continue;
                    }
                },
                Change::Removed { mapping, .. } => {
                    if self.settings.conntrack_cleanup {
                        conntrack_matches(mapping, &mut b.conntrack);
                    }
                    (mapping, None)
                }
                Change::EpochReset { .. }
                | Change::ServerEpochReset { .. }
                | Change::AnnounceOwed { .. }
                | Change::PortHeld(_)
                | Change::Requester { .. } => continue,
            };
            let id = Ident {
                kind: m.kind,
                key: m.key,
            };
            match index.get(&id) {
                Some(&i) => {
                    b.owners[i].seqs.push(c.seq);
                    b.owners[i].new = new;
                }
                None => {
                    index.insert(id, b.owners.len());
                    b.owners.push(Owner {
                        id,
                        seqs: vec![c.seq],
                        new,
                        was_installed: self.installed.contains_key(&id),
                    });
                }
            }
        }
        if b.rebuild {
            // Everything known goes back in, the batch's own state winning.
            for (id, els) in self.installed.drain() {
                if !index.contains_key(&id) {
                    b.owners.push(Owner {
                        id,
                        seqs: Vec::new(),
                        new: Some(els),
                        was_installed: true,
                    });
                }
            }
            for (i, o) in b.owners.iter().enumerate() {
                for j in 0..o.new.as_ref().map_or(0, Vec::len) {
                    b.ops.push(ElemOp {
                        op: Op::Add,
                        owner: i as u32,
                        elem: j as u32,
                    });
                }
            }
            return b;
        }
        let empty: Vec<Elem> = Vec::new();
        let mut adds = Vec::new();
        for (i, o) in b.owners.iter().enumerate() {
            let old = self.installed.get(&o.id).unwrap_or(&empty);
            let new = o.new.as_ref().unwrap_or(&empty);
            for (j, e) in old.iter().enumerate() {
                if !new.contains(e) {
                    b.ops.push(ElemOp {
                        op: Op::Del,
                        owner: i as u32,
                        elem: j as u32,
                    });
                }
            }
            for (j, e) in new.iter().enumerate() {
                if !old.contains(e) {
                    adds.push(ElemOp {
                        op: Op::Add,
                        owner: i as u32,
                        elem: j as u32,
                    });
                }
            }
        }
        b.ops.extend(adds);
        b
    }

    /// The element an op names.
    fn elem_of<'a>(&'a self, b: &'a Batch, o: ElemOp) -> Option<&'a Elem> {
        let owner = b.owners.get(o.owner as usize)?;
        match o.op {
            Op::Del => self.installed.get(&owner.id)?.get(o.elem as usize),
            Op::Add => owner.new.as_ref()?.get(o.elem as usize),
        }
    }

    /// Describes an op, for messages.
    fn describe(&self, b: &Batch, o: ElemOp) -> String {
        let verb = match o.op {
            Op::Add => "add",
            Op::Del => "delete",
        };
        match self.elem_of(b, o) {
            Some(e) => format!("{verb} element inet {} {e}", self.settings.table),
            None => format!("{verb} element (unknown)"),
        }
    }

    /// How long the socket waits for the kernel's answers: well within
    /// the committer's bound, so that a silent kernel fails the batch
    /// (and puts the table in doubt) before the batch is late.
    fn reply_timeout(&self) -> std::time::Duration {
        self.settings.timeout / 2
    }

    fn open_socket(&self) -> std::io::Result<nfnl::Socket> {
        nfnl::Socket::open_with(self.reply_timeout())
    }

    fn socket(&mut self) -> Result<&mut nfnl::Socket, String> {
        if self.socket.is_none() {
            let s = self
                .open_socket()
                .map_err(|e| format!("netlink socket: {e}"))?;
            self.socket = Some(s);
        }
        self.socket
            .as_mut()
            .ok_or_else(|| "netlink socket: not open".to_owned())
    }

    /// Sends the batch's element messages, as few nf_tables transactions
    /// as fit, each sent again without the mappings that failed in it.
    fn load(&mut self, b: &Batch) -> Loaded {
        let mut out = Loaded {
            failed: vec![None; b.owners.len()],
            doubt: false,
        };
        let mut committed = vec![false; b.owners.len()];
        // Deletes the kernel answered ENOENT: the element is gone already,
        // which is what the delete wanted; they are not sent again.
        let mut gone: std::collections::HashSet<(u32, u32)> = std::collections::HashSet::new();
        // Owners whose elements go one per message, so that a refusal
        // names its element.
        let mut alone = vec![false; b.owners.len()];
        let table = self.settings.table.clone();
        let mut buf = Vec::new();
        let mut sent: Vec<ElemOp> = Vec::new();
        let mut msgs: Vec<std::ops::Range<usize>> = Vec::new();
        let mut refs: Vec<ElemRef<'_>> = Vec::new();
        // Out of `self` while the elements (in `self`) are encoded.
        let mut sock = match self.socket.take().map_or_else(|| self.open_socket(), Ok) {
            Ok(s) => s,
            Err(e) => {
                let why = format!("netlink socket: {e}");
                for o in &b.ops {
                    out.failed[o.owner as usize].get_or_insert_with(|| why.clone());
                }
                return out;
            }
        };
        let mut broken = false;
        // Elements, not messages, bound a chunk: a refused message's
        // elements go one per message, and every message of the chunk (and
        // its begin and end) must still be acked within the buffer.
        let size = sock.max_acks().saturating_sub(2).clamp(1, BATCH_ELEMENTS);
        'chunks: for (ci, chunk) in b.ops.chunks(size).enumerate() {
            for attempt in 1..=BATCH_ATTEMPTS {
                buf.clear();
                sent.clear();
                msgs.clear();
                sent.extend(
                    chunk
                        .iter()
                        .filter(|o| out.failed[o.owner as usize].is_none())
                        .filter(|o| o.op == Op::Add || !gone.contains(&(o.owner, o.elem))),
                );
                if sent.is_empty() {
                    break;
                }
                // Deletes stay before adds; within each, one message per
                // run of elements of one set.
                let set_of = |o: &ElemOp| self.elem_of(b, *o).map_or("", |e| e.set);
                sent.sort_by_key(|o| (o.op == Op::Add, set_of(o)));
                for (i, o) in sent.iter().enumerate() {
                    let joins = msgs.last().is_some_and(|m| {
                        let prev = sent[m.start];
                        m.len() < ELEMENTS_PER_MESSAGE
                            && prev.op == o.op
                            && set_of(&prev) == set_of(o)
                            && !alone[prev.owner as usize]
                            && !alone[o.owner as usize]
                    });
                    match msgs.last_mut() {
                        Some(m) if joins => m.end = i + 1,
                        _ => msgs.push(i..i + 1),
                    }
                }
                let n = msgs.len() as u32;
                let begin = sock.seqs(n + 2);
                let first = begin + 1;
                nfnl::batch_begin(&mut buf, begin);
                let mut oversize = false;
                for (k, m) in msgs.iter().enumerate() {
                    refs.clear();
                    refs.extend(
                        sent[m.clone()]
                            .iter()
                            .filter_map(|o| self.elem_of(b, *o).map(Elem::as_ref)),
                    );
                    let o = sent[m.start];
                    let seq = first + k as u32;
                    if let Err(e) = nfnl::setelems(&mut buf, o.op, seq, &table, set_of(&o), &refs) {
                        // Too long for one message: its elements go one
                        // per message; one element too long fails.
                        oversize = true;
                        if let [o] = &sent[m.clone()] {
                            let why = format!("{}: {e}", self.describe(b, *o));
                            out.failed[o.owner as usize].get_or_insert(why);
                        } else {
                            for o in &sent[m.clone()] {
                                alone[o.owner as usize] = true;
                            }
                        }
                    }
                }
                refs.clear();
                if oversize {
                    if attempt == BATCH_ATTEMPTS {
                        for o in &sent {
                            out.failed[o.owner as usize].get_or_insert_with(|| {
                                format!("not applied: the batch still failed after {BATCH_ATTEMPTS} attempts")
                            });
                        }
                    }
                    continue;
                }
                nfnl::batch_end(&mut buf, first + n);
                match sock.transact(&buf, first, n, Some(begin)) {
                    Ok(Outcome::Answered(errors)) if errors.is_empty() => {
                        for o in &sent {
                            committed[o.owner as usize] = true;
                        }
                        continue 'chunks;
                    }
                    Ok(Outcome::Answered(errors)) => {
                        // The kernel aborted the whole batch; the acks say
                        // which messages it refused. A message of one
                        // element names it; the elements of a larger one
                        // go one per message next time.
                        for a in &errors {
                            let Some(m) = msgs.get(a.seq.wrapping_sub(first) as usize) else {
                                continue;
                            };
                            if let [o] = &sent[m.clone()] {
                                if o.op == Op::Del && a.error == nfnl::ENOENT {
                                    gone.insert((o.owner, o.elem));
                                    continue;
                                }
                                let why = format!(
                                    "{}: {}",
                                    self.describe(b, *o),
                                    nfnl::errno_text(a.error)
                                );
                                out.failed[o.owner as usize].get_or_insert(why);
                            } else {
                                for o in &sent[m.clone()] {
                                    alone[o.owner as usize] = true;
                                }
                            }
                        }
                        if attempt == BATCH_ATTEMPTS {
                            for o in &sent {
                                out.failed[o.owner as usize].get_or_insert_with(|| {
                                    format!(
                                        "not applied: the batch still failed after {BATCH_ATTEMPTS} attempts"
                                    )
                                });
                            }
                        }
                    }
                    Ok(Outcome::Refused(err)) => {
                        let why = format!("nf_tables refused the batch: {}", nfnl::errno_text(err));
                        for o in &sent {
                            out.failed[o.owner as usize].get_or_insert_with(|| why.clone());
                        }
                        continue 'chunks;
                    }
                    Err(e) => {
                        // The batch may or may not have been applied: the
                        // table is in doubt, and so is the socket.
                        let why = format!("netlink: {e}");
                        for o in b.ops.get(ci * size..).unwrap_or_default() {
                            out.failed[o.owner as usize].get_or_insert_with(|| why.clone());
                        }
                        broken = true;
                        out.doubt = true;
                        break 'chunks;
                    }
                }
            }
        }
        if !broken {
            self.socket = Some(sock);
        }
        // A mapping that failed after part of it went in with an earlier
        // transaction is half installed.
        out.doubt |= out
            .failed
            .iter()
            .zip(&committed)
            .any(|(f, c)| f.is_some() && *c);
        out
    }

    /// Deletes the flows of removed mappings over ctnetlink, one message
    /// per match, all in one datagram. The kernel filters IPv6 addresses
    /// wrongly (see [`CtMatch::kernel_filters`]): IPv6 entries of partial
    /// matches are found in a dump of the IPv6 table instead, and each is
    /// deleted by its own tuple. Failures are logged, not returned: the
    /// rules are gone already, and a flow left behind ends on its own
    /// timeout.
    fn flush_conntrack(&mut self, matches: &[CtMatch]) {
        if matches.is_empty() {
            return;
        }
        if let Err(e) = self.socket() {
            tracing::warn!("conntrack cleanup failed: {e}");
            return;
        }
        let Some(sock) = self.socket.as_mut() else {
            return;
        };
        let mut broken = false;
        let dumped = nfnl::CtMatchSet::new(matches.iter().filter(|m| !m.kernel_filters()));
        let mut entries = Vec::new();
        if !dumped.is_empty() {
            let r = sock.ct_dump(true, |e| {
                if dumped.matches(&e) {
                    entries.push(e);
                }
            });
            if let Err(e) = r {
                // What is left of the dump would be read as acks.
                tracing::warn!("conntrack cleanup of IPv6 flows failed: netlink: {e}");
                broken = true;
            }
        }
        let mut requests: Vec<CtRequest<'_>> = matches
            .iter()
            .filter(|m| m.kernel_filters())
            .map(CtRequest::Match)
            .collect();
        if !broken {
            requests.extend(entries.iter().map(CtRequest::Entry));
        }
        let mut unsupported = false;
        let size = sock.max_acks().min(BATCH_MESSAGES);
        for chunk in requests.chunks(size) {
            if broken {
                break;
            }
            let first = sock.seqs(chunk.len() as u32);
            let mut buf = Vec::with_capacity(chunk.len() * 80);
            let mut kept: Vec<&CtRequest<'_>> = Vec::with_capacity(chunk.len());
            for r in chunk {
                let seq = first + kept.len() as u32;
                let encoded = match r {
                    CtRequest::Match(m) => nfnl::ct_delete(&mut buf, seq, m),
                    CtRequest::Entry(e) => nfnl::ct_delete_entry(&mut buf, seq, e),
                };
                match encoded {
                    Ok(()) => kept.push(r),
                    Err(e) => tracing::warn!("conntrack cleanup of {r:?} failed: {e}"),
                }
            }
            let n = kept.len() as u32;
            if n == 0 {
                continue;
            }
            match sock.transact(&buf, first, n, None) {
                Ok(Outcome::Answered(errors)) => {
                    for a in errors {
                        // ENOENT: the flow is gone already.
                        if a.error == nfnl::ENOENT {
                            continue;
                        }
                        let what = kept.get(a.seq.wrapping_sub(first) as usize);
                        // A kernel without CTA_FILTER on deletes answers a
                        // partial tuple EOPNOTSUPP, or, older, EINVAL.
                        let filtered =
                            what.is_some_and(|r| matches!(r, CtRequest::Match(m) if !m.exact()));
                        if a.error == nfnl::EOPNOTSUPP || (filtered && a.error == nfnl::EINVAL) {
                            unsupported = true;
                            continue;
                        }
                        tracing::warn!(
                            "conntrack cleanup of {what:?} failed: {}",
                            nfnl::errno_text(a.error)
                        );
                    }
                }
                Ok(Outcome::Refused(e)) => {
                    tracing::warn!("conntrack cleanup failed: {}", nfnl::errno_text(e));
                }
                Err(e) => {
                    tracing::warn!("conntrack cleanup failed: netlink: {e}");
                    broken = true;
                }
            }
        }
        if broken {
            self.socket = None;
        }
        if unsupported && !self.ct_filter_unsupported {
            self.ct_filter_unsupported = true;
            tracing::warn!(
                "this kernel cannot delete conntrack entries by a partial tuple \
                 (CTA_FILTER on IPCTNL_MSG_CT_DELETE, Linux 6.11+): IPv4 flows of \
                 removed mappings end on their own timeouts"
            );
        }
    }

    /// The installed state after a batch: the owners whose elements went
    /// in take their new state; the others keep theirs, except that:
    ///
    /// - a rebuild emptied the table: there a failed mapping has nothing
    ///   installed, unless it was only being re-installed (the server
    ///   still holds it), which keeps it for the next rebuild to try
    ///   again (the table is then in doubt: see [`Self::doubt_after`]);
    /// - a removal that failed leaves nothing the server holds: the
    ///   mapping is forgotten, and the next rebuild leaves it out.
    fn commit(&mut self, b: Batch, loaded: &Loaded) {
        for (i, o) in b.owners.into_iter().enumerate() {
            let ok = loaded.failed.get(i).is_none_or(Option::is_none);
            let keep = b.rebuild && o.seqs.is_empty();
            if ok || keep {
                match o.new {
                    Some(v) if !v.is_empty() => {
                        self.installed.insert(o.id, v);
                    }
                    _ => {
                        self.installed.remove(&o.id);
                    }
                }
            } else if b.rebuild || o.new.is_none() {
                self.installed.remove(&o.id);
            }
        }
    }

    /// Whether the table may hold other than what [`Self::commit`] makes
    /// `installed` say: besides what loading found, a removal that failed
    /// may have left its elements in (they must go, so the table is
    /// rebuilt without them), and a re-install that failed during a
    /// rebuild left out a mapping the server holds.
    fn doubt_after(b: &Batch, loaded: &Loaded) -> bool {
        loaded.doubt
            || b.owners
                .iter()
                .zip(&loaded.failed)
                .any(|(o, f)| f.is_some() && (o.seqs.is_empty() || o.new.is_none()))
    }

    /// Runs `nft -f -` with `script`; only its exit status counts. An
    /// `nft` still running after [`NftDataplane::nft_deadline`] is killed,
    /// and that is a failure (a rebuild that fails leaves the table in
    /// doubt).
    fn run_nft(&self, script: &str) -> Result<(), String> {
        use std::io::Read as _;
        let mut child = Command::new(&self.settings.nft)
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.settings.nft.display()))?;
        // Read aside, so that an nft that writes much cannot block on a
        // full pipe while it is waited for.
        let stderr = child.stderr.take().map(|mut e| {
            std::thread::spawn(move || {
                let mut s = Vec::new();
                let _ = e.read_to_end(&mut s);
                s
            })
        });
        if let Some(mut stdin) = child.stdin.take() {
            if let Err(e) = stdin.write_all(script.as_bytes()) {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("writing to nft: {e}"));
            }
        }
        let until = crate::clock::Deadline::after(self.nft_deadline);
        let status = loop {
            match child.try_wait() {
                Ok(Some(st)) => break st,
                Ok(None) if until.left().is_zero() => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!(
                        "nft -f did not finish within {:?}: killed",
                        self.nft_deadline
                    ));
                }
                Ok(None) => std::thread::sleep(std::time::Duration::from_millis(5)),
                Err(e) => {
                    let _ = child.kill();
                    return Err(format!("waiting for nft: {e}"));
                }
            }
        };
        if status.success() {
            return Ok(());
        }
        let err = stderr.and_then(|h| h.join().ok()).unwrap_or_default();
        // Passed on for the operator to read, never interpreted.
        Err(format!(
            "nft -f failed ({status}): {}",
            String::from_utf8_lossy(&err).trim_end()
        ))
    }

    /// Deletes the table (on a clean stop with `on_stop = "flush"`).
    pub fn flush(&mut self) -> Result<(), String> {
        let t = &self.settings.table;
        self.run_nft(&format!("add table inet {t}\ndelete table inet {t}\n"))?;
        self.installed.clear();
        self.built = false;
        Ok(())
    }
}

impl Dataplane for NftDataplane {
    fn name(&self) -> &'static str {
        "nftables"
    }

    /// The next apply rebuilds the table from what is known to be
    /// installed.
    fn invalidate(&mut self) {
        self.built = false;
    }

    fn in_doubt(&self) -> bool {
        !self.built
    }

    fn apply(&mut self, changes: &[ChangeRecord]) -> Result<(), DataplaneError> {
        let mut b = self.plan(changes);
        let rejected = std::mem::take(&mut b.rejected);
        let rejected_kept = std::mem::take(&mut b.rejected_kept);
        let cts = std::mem::take(&mut b.conntrack);
        let mut failed: Vec<u64> = rejected.iter().map(|(seq, _)| *seq).collect();
        let mut why: Vec<String> = rejected
            .iter()
            .map(|(seq, w)| format!("change {seq}: {w}"))
            .collect();
        let loaded = if b.rebuild {
            match self.run_nft(&self.rebuild_script()) {
                Ok(()) => {
                    self.built = true;
                    self.load(&b)
                }
                Err(e) => Loaded {
                    failed: vec![Some(e); b.owners.len()],
                    doubt: true,
                },
            }
        } else {
            self.load(&b)
        };
        for (o, f) in b.owners.iter().zip(&loaded.failed) {
            let Some(f) = f else { continue };
            if o.seqs.is_empty() {
                tracing::error!("mapping {:?} not re-installed: {f}", o.id.key);
            }
            for seq in &o.seqs {
                failed.push(*seq);
                why.push(format!("change {seq}: {f}"));
            }
        }
        let doubt = Self::doubt_after(&b, &loaded);
        let refused: Vec<(Ident, bool, Vec<u64>)> = b
            .owners
            .iter()
            .zip(&loaded.failed)
            .filter(|(o, f)| f.is_some() && !o.seqs.is_empty() && o.was_installed)
            .map(|(o, _)| (o.id, o.new.is_some(), o.seqs.clone()))
            .collect();
        self.commit(b, &loaded);
        // A refused change to a mapping that was installed: what it had
        // before is still there unless the table was rebuilt without it.
        let (mut kept, mut lost) = (rejected_kept, Vec::new());
        for (id, upsert, seqs) in refused {
            if !upsert {
                continue;
            }
            if self.installed.contains_key(&id) {
                kept.extend(seqs);
            } else {
                lost.extend(seqs);
            }
        }
        if doubt {
            tracing::warn!("nft table in doubt: rebuilding it on the next batch");
            self.built = false;
        }
        self.flush_conntrack(&cts);
        if failed.is_empty() {
            return Ok(());
        }
        failed.sort_unstable();
        failed.dedup();
        // One line per failure would flood the log on a large batch.
        let total = why.len();
        why.truncate(20);
        if total > why.len() {
            why.push(format!("and {} more", total - why.len()));
        }
        Err(DataplaneError {
            dataplane: "nftables",
            message: why.join("; "),
            failed,
            kept,
            lost,
        })
    }
}

impl Drop for NftDataplane {
    fn drop(&mut self) {
        if self.settings.on_stop == OnStop::Flush && self.built {
            match self.flush() {
                Ok(()) => tracing::info!("deleted nft table inet {}", self.settings.table),
                Err(e) => tracing::error!("cannot delete nft table: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use portkeep_proto::Protocol;
    use portkeep_server::{FilterRule, RemoveReason, SubscriberKeying, Timestamp};
    use std::net::SocketAddr;

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

    /// A dataplane past its first apply, so plans hold only elements.
    fn built() -> NftDataplane {
        let mut dp = NftDataplane::new(NftSettings::default());
        dp.built = true;
        dp
    }

    /// The batch's element messages in nft's syntax, in order.
    fn ops(dp: &NftDataplane, b: &Batch) -> Vec<String> {
        b.ops.iter().map(|o| dp.describe(b, *o)).collect()
    }

    /// Commits a batch as if every element went in.
    fn ok(dp: &mut NftDataplane, b: Batch) {
        let loaded = Loaded {
            failed: vec![None; b.owners.len()],
            doubt: false,
        };
        dp.commit(b, &loaded);
    }

    #[test]
    fn rfc6887_s11_map_is_one_dnat_and_one_snat_element() {
        let mut dp = built();
        let m = map(Protocol::TCP, "10.0.0.2:8080", "198.51.100.1:30000");
        let b = dp.plan(&[up(1, &m)]);
        assert_eq!(
            ops(&dp, &b),
            [
                "add element inet portkeep dnat4 { 6 . 198.51.100.1 . 30000 : 10.0.0.2 . 8080 }",
                "add element inet portkeep snat4 { 6 . 10.0.0.2 . 8080 : 198.51.100.1 . 30000 }",
            ]
        );
        assert!(b.rejected.is_empty());
        assert!(b.conntrack.is_empty());
    }

    #[test]
    fn map_elements_are_registers_of_four_bytes() {
        let m = map(Protocol::TCP, "10.0.0.2:8080", "198.51.100.1:30000");
        let e = elements(&m).unwrap();
        assert_eq!(&*e[0].key, [6, 0, 0, 0, 198, 51, 100, 1, 0x75, 0x30, 0, 0]);
        assert_eq!(
            e[0].value.as_deref(),
            Some(&[10, 0, 0, 2, 0x1f, 0x90, 0, 0][..])
        );
    }

    #[test]
    fn rfc6887_s11_all_protocols_and_all_ports() {
        let mut dp = built();
        let all = map(Protocol::ALL, "10.0.0.3:0", "198.51.100.2:0");
        let ports = map(Protocol::UDP, "10.0.0.4:0", "198.51.100.3:0");
        let b = dp.plan(&[up(1, &all), up(2, &ports)]);
        assert_eq!(
            ops(&dp, &b),
            [
                "add element inet portkeep dnat4_all { 198.51.100.2 : 10.0.0.3 }",
                "add element inet portkeep snat4_all { 10.0.0.3 : 198.51.100.2 }",
                "add element inet portkeep dnat4_proto { 17 . 198.51.100.3 : 10.0.0.4 }",
                "add element inet portkeep snat4_proto { 17 . 10.0.0.4 : 198.51.100.3 }",
            ]
        );
    }

    #[test]
    fn rfc6887_s13_3_filters_become_allow_ranges() {
        let mut dp = built();
        let mut m = map(Protocol::TCP, "10.0.0.2:22", "198.51.100.1:30022");
        m.filters = vec![
            FilterRule {
                prefix: "203.0.113.0/24".parse().unwrap(),
                port: 0,
            },
            FilterRule {
                prefix: "192.0.2.7/32".parse().unwrap(),
                port: 5000,
            },
            // Another family can never match: nothing to allow.
            FilterRule {
                prefix: "2001:db8::/32".parse().unwrap(),
                port: 0,
            },
        ];
        let b = dp.plan(&[up(1, &m)]);
        assert_eq!(
            ops(&dp, &b),
            [
                "add element inet portkeep dnat4 { 6 . 198.51.100.1 . 30022 : 10.0.0.2 . 22 }",
                "add element inet portkeep snat4 { 6 . 10.0.0.2 . 22 : 198.51.100.1 . 30022 }",
                "add element inet portkeep filtered4 { 6 . 198.51.100.1 . 30022 }",
                "add element inet portkeep allow4 { 6 . 198.51.100.1 . 30022 . 203.0.113.0-203.0.113.255 . 0-65535 }",
                "add element inet portkeep allow4 { 6 . 198.51.100.1 . 30022 . 192.0.2.7 . 5000 }",
            ]
        );
        // Filters on an all-ports mapping cannot be expressed: refused,
        // never silently dropped (that would open more than was asked).
        let mut wide = map(Protocol::ALL, "10.0.0.3:0", "198.51.100.2:0");
        wide.filters = m.filters.clone();
        let b = dp.plan(&[up(7, &wide)]);
        assert!(b.ops.is_empty());
        assert_eq!(b.rejected.len(), 1);
        assert_eq!(b.rejected[0].0, 7);
    }

    #[test]
    fn ipv4_mapped_filter_prefixes_count_as_ipv4() {
        let (lo, hi) = prefix_range("::ffff:203.0.113.0".parse().unwrap(), 120);
        assert_eq!(lo, "203.0.113.0".parse::<IpAddr>().unwrap());
        assert_eq!(hi, "203.0.113.255".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn rfc6887_s12_peer_is_a_five_tuple_snat_pin() {
        let mut dp = built();
        let mut m = map(Protocol::UDP, "10.0.0.2:5000", "198.51.100.1:40000");
        m.kind = MappingKind::Peer {
            remote: "203.0.113.9:3478".parse().unwrap(),
        };
        let b = dp.plan(&[up(1, &m)]);
        assert_eq!(
            ops(&dp, &b),
            ["add element inet portkeep peer4 { 17 . 10.0.0.2 . 5000 . 203.0.113.9 . 3478 : 198.51.100.1 . 40000 }"]
        );
        let b = dp.plan(&[down(2, &m)]);
        assert_eq!(
            b.conntrack,
            [CtMatch {
                dir: Dir::Orig,
                v6: false,
                proto: Some(17),
                src: Some("10.0.0.2".parse().unwrap()),
                sport: Some(5000),
                dst: Some("203.0.113.9".parse().unwrap()),
                dport: Some(3478),
            }]
        );
        assert!(b.conntrack[0].exact());
    }

    #[test]
    fn ipv6_pinhole_and_cross_family() {
        let mut dp = built();
        let pin = map(Protocol::TCP, "[2001:db8::5]:443", "[2001:db8::5]:443");
        let nat66 = map(
            Protocol::UDP,
            "[2001:db8::6]:53",
            "[2001:db8:ffff::1]:30053",
        );
        let nat64 = map(Protocol::TCP, "[2001:db8::7]:80", "198.51.100.1:30080");
        let b = dp.plan(&[up(1, &pin), up(2, &nat66), up(3, &nat64)]);
        assert_eq!(
            ops(&dp, &b),
            [
                "add element inet portkeep pinhole6 { 6 . 2001:db8::5 . 443 }",
                "add element inet portkeep dnat6 { 17 . 2001:db8:ffff::1 . 30053 : 2001:db8::6 . 53 }",
                "add element inet portkeep snat6 { 17 . 2001:db8::6 . 53 : 2001:db8:ffff::1 . 30053 }",
            ]
        );
        assert_eq!(b.rejected.len(), 1);
        assert_eq!(b.rejected[0].0, 3);
    }

    #[test]
    fn rfc6887_s12_untranslated_peer_lets_the_peer_in() {
        let mut dp = built();
        let mut m = map(
            Protocol::TCP,
            "[2001:db8:1::5]:40000",
            "[2001:db8:1::5]:40000",
        );
        m.kind = MappingKind::Peer {
            remote: "[2001:db8:2::9]:443".parse().unwrap(),
        };
        let b = dp.plan(&[up(1, &m)]);
        assert_eq!(
            ops(&dp, &b),
            ["add element inet portkeep peer6_allow { 6 . 2001:db8:2::9 . 443 . 2001:db8:1::5 . 40000 }"]
        );
        ok(&mut dp, b);
        let b = dp.plan(&[down(2, &m)]);
        // Whichever side opened the flow, it goes.
        assert_eq!(b.conntrack.len(), 2);
        assert_eq!(b.conntrack[1].src, Some("2001:db8:2::9".parse().unwrap()));
        assert_eq!(b.conntrack[1].dport, Some(40000));
    }

    fn firewall_settings() -> NftSettings {
        NftSettings {
            external_interfaces: vec!["wan0".into()],
            firewall: Some(FirewallSettings {
                prefixes: vec![
                    "2001:db8:1::/48".parse().unwrap(),
                    "2001:db8:2::/48".parse().unwrap(),
                ],
                accept_mark: 0x100,
            }),
            ..NftSettings::default()
        }
    }

    #[test]
    fn rfc6887_s1_firewall_mode_forward_chain() {
        let d = table_definition(&firewall_settings());
        assert!(d.contains(
            "set firewalled6 { type ipv6_addr; flags interval; auto-merge; \
             elements = { 2001:db8:1::/48, 2001:db8:2::/48 }; }"
        ));
        let chain = d.split("chain forward {").nth(1).unwrap();
        let chain = chain.split("chain postrouting").next().unwrap();
        let rules: Vec<&str> = chain
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        assert_eq!(
            rules.first().copied(),
            Some("type filter hook forward priority filter - 1; policy accept;")
        );
        let acc = "meta mark set meta mark | 0x100 accept";
        assert_eq!(
            rules.get(1).copied(),
            Some(
                format!(
                    "ip6 daddr @firewalled6 ct direction reply ct state established,related {acc}"
                )
                .as_str()
            )
        );
        // Every accept carries the mark; the one drop comes last and
        // only for what arrives on the external interfaces.
        for r in &rules[1..rules.len() - 2] {
            assert!(r.ends_with(acc), "{r}");
        }
        assert!(rules
            .contains(&format!("meta l4proto . ip6 daddr . th dport @pinhole6 {acc}").as_str()));
        assert!(rules.contains(
            &format!(
                "meta l4proto . ip6 saddr . th sport . ip6 daddr . th dport @peer6_allow {acc}"
            )
            .as_str()
        ));
        assert_eq!(
            rules[rules.len() - 2],
            "iifname { \"wan0\" } ip6 daddr @firewalled6 drop"
        );
    }

    #[test]
    fn nat_mode_forward_chain_is_unchanged() {
        let d = table_definition(&NftSettings::default());
        assert!(d.contains("type filter hook forward priority filter; policy accept;"));
        assert!(d.contains("set firewalled6 { type ipv6_addr; flags interval; auto-merge; }"));
        assert!(!d.contains("drop\n\t}\n\tchain postrouting"));
        assert!(!d.contains("meta mark"));
    }

    #[test]
    fn table_definitions_pass_nft_check() {
        // `nft -c` parses and evaluates without touching the kernel's
        // ruleset; without nft (or the rights it needs) there is nothing
        // to check here: the netns tests load the table for real.
        for s in [NftSettings::default(), firewall_settings()] {
            let def = table_definition(&s);
            let child = Command::new("nft")
                .args(["-c", "-f", "-"])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn();
            let Ok(mut child) = child else { return };
            if let Some(mut i) = child.stdin.take() {
                i.write_all(def.as_bytes()).unwrap();
            }
            let out = child.wait_with_output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            if err.contains("Operation not permitted") {
                return;
            }
            assert!(out.status.success(), "{err}\n{def}");
        }
    }

    #[test]
    fn updates_delete_exactly_what_they_replace() {
        let mut dp = built();
        let mut m = map(Protocol::TCP, "10.0.0.2:22", "198.51.100.1:30022");
        m.filters = vec![FilterRule {
            prefix: "203.0.113.0/24".parse().unwrap(),
            port: 0,
        }];
        let b = dp.plan(&[up(1, &m)]);
        ok(&mut dp, b);
        // A refresh that changes nothing changes nothing.
        assert!(dp.plan(&[up(2, &m)]).ops.is_empty());
        // New filters: the old allow element goes, the new one comes.
        m.filters[0].prefix = "192.0.2.0/24".parse().unwrap();
        let b = dp.plan(&[up(3, &m)]);
        assert_eq!(
            ops(&dp, &b),
            [
                "delete element inet portkeep allow4 { 6 . 198.51.100.1 . 30022 . 203.0.113.0-203.0.113.255 . 0-65535 }",
                "add element inet portkeep allow4 { 6 . 198.51.100.1 . 30022 . 192.0.2.0-192.0.2.255 . 0-65535 }",
            ]
        );
        ok(&mut dp, b);
        // Delete: every element, and the mapping's flows.
        let b = dp.plan(&[down(4, &m)]);
        assert_eq!(
            ops(&dp, &b),
            [
                "delete element inet portkeep dnat4 { 6 . 198.51.100.1 . 30022 : 10.0.0.2 . 22 }",
                "delete element inet portkeep snat4 { 6 . 10.0.0.2 . 22 : 198.51.100.1 . 30022 }",
                "delete element inet portkeep filtered4 { 6 . 198.51.100.1 . 30022 }",
                "delete element inet portkeep allow4 { 6 . 198.51.100.1 . 30022 . 192.0.2.0-192.0.2.255 . 0-65535 }",
            ]
        );
        let ext: IpAddr = "198.51.100.1".parse().unwrap();
        let int: IpAddr = "10.0.0.2".parse().unwrap();
        let base = CtMatch {
            dir: Dir::Orig,
            v6: false,
            proto: Some(6),
            src: None,
            sport: None,
            dst: None,
            dport: None,
        };
        // The same flows `conntrack -D -p tcp --orig-dst .. --orig-port-dst
        // ..`, `--reply-dst .. --reply-port-dst ..` and `--reply-src ..
        // --reply-port-src ..` would delete.
        assert_eq!(
            b.conntrack,
            [
                CtMatch {
                    dst: Some(ext),
                    dport: Some(30022),
                    ..base
                },
                CtMatch {
                    dir: Dir::Reply,
                    dst: Some(ext),
                    dport: Some(30022),
                    ..base
                },
                CtMatch {
                    dir: Dir::Reply,
                    src: Some(int),
                    sport: Some(22),
                    ..base
                },
            ]
        );
        ok(&mut dp, b);
        assert!(dp.installed.is_empty());
        // A delete of something never installed names no element.
        assert!(dp.plan(&[down(5, &m)]).ops.is_empty());
    }

    #[test]
    fn an_external_port_reused_in_one_batch_is_deleted_before_added() {
        let mut dp = built();
        let a = map(Protocol::TCP, "10.0.0.2:22", "198.51.100.1:30022");
        let b = dp.plan(&[up(1, &a)]);
        ok(&mut dp, b);
        let c = map(Protocol::TCP, "10.0.0.3:22", "198.51.100.1:30022");
        let d = map(Protocol::TCP, "10.0.0.4:80", "198.51.100.1:30080");
        let b = dp.plan(&[down(2, &a), up(3, &c), up(4, &d)]);
        assert_eq!(
            ops(&dp, &b),
            [
                "delete element inet portkeep dnat4 { 6 . 198.51.100.1 . 30022 : 10.0.0.2 . 22 }",
                "delete element inet portkeep snat4 { 6 . 10.0.0.2 . 22 : 198.51.100.1 . 30022 }",
                "add element inet portkeep dnat4 { 6 . 198.51.100.1 . 30022 : 10.0.0.3 . 22 }",
                "add element inet portkeep snat4 { 6 . 10.0.0.3 . 22 : 198.51.100.1 . 30022 }",
                "add element inet portkeep dnat4 { 6 . 198.51.100.1 . 30080 : 10.0.0.4 . 80 }",
                "add element inet portkeep snat4 { 6 . 10.0.0.4 . 80 : 198.51.100.1 . 30080 }",
            ]
        );
        assert_eq!(b.elements(), 6);
    }

    #[test]
    fn create_and_delete_in_one_batch_cancel_out() {
        let mut dp = built();
        let m = map(Protocol::TCP, "10.0.0.2:22", "198.51.100.1:30022");
        let b = dp.plan(&[up(1, &m), down(2, &m)]);
        assert!(b.ops.is_empty());
        assert_eq!(b.owners.len(), 1);
        assert_eq!(b.owners[0].seqs, [1, 2]);
        assert!(b.owners[0].new.is_none());
    }

    #[test]
    fn a_failed_mapping_keeps_its_installed_state_and_the_rest_moves_on() {
        let mut dp = built();
        let a = map(Protocol::TCP, "10.0.0.2:22", "198.51.100.1:30022");
        let c = map(Protocol::TCP, "10.0.0.3:22", "198.51.100.1:30023");
        let b = dp.plan(&[up(1, &a), up(2, &c)]);
        let loaded = Loaded {
            failed: vec![None, Some("refused".into())],
            doubt: false,
        };
        dp.commit(b, &loaded);
        assert_eq!(dp.installed.len(), 1);
        // The failed one is planned afresh next time.
        assert_eq!(dp.plan(&[up(3, &c)]).elements(), 2);
    }

    /// A removal that failed leaves nothing the server holds: the mapping
    /// is forgotten and the table is in doubt, so the next batch rebuilds
    /// it without the mapping's elements, rather than keep forwarding them.
    #[test]
    fn a_failed_removal_forgets_the_mapping_and_the_rebuild_leaves_it_out() {
        let mut dp = built();
        let a = map(Protocol::TCP, "10.0.0.2:22", "198.51.100.1:30022");
        let c = map(Protocol::TCP, "10.0.0.3:22", "198.51.100.1:30023");
        let b = dp.plan(&[up(1, &a), up(2, &c)]);
        ok(&mut dp, b);
        let b = dp.plan(&[down(3, &a)]);
        let loaded = Loaded {
            failed: vec![Some("refused".into())],
            doubt: false,
        };
        assert!(NftDataplane::doubt_after(&b, &loaded));
        dp.commit(b, &loaded);
        assert_eq!(dp.installed.len(), 1);
        dp.invalidate();
        let b = dp.plan(&[]);
        assert!(b.rebuild);
        assert_eq!(ops(&dp, &b).len(), 2);
        assert!(
            ops(&dp, &b).iter().all(|o| !o.contains("30022")),
            "{:?}",
            ops(&dp, &b)
        );
    }

    /// A mapping that failed to go back in during a rebuild is still the
    /// server's: it stays known and the table in doubt, so the next
    /// rebuild tries it again.
    #[test]
    fn a_failed_reinstall_keeps_the_mapping_and_leaves_the_table_in_doubt() {
        let mut dp = built();
        let a = map(Protocol::TCP, "10.0.0.2:22", "198.51.100.1:30022");
        let b = dp.plan(&[up(1, &a)]);
        ok(&mut dp, b);
        dp.invalidate();
        let b = dp.plan(&[]);
        assert!(b.rebuild && b.owners[0].seqs.is_empty());
        let loaded = Loaded {
            failed: vec![Some("refused".into())],
            doubt: false,
        };
        assert!(NftDataplane::doubt_after(&b, &loaded));
        dp.commit(b, &loaded);
        assert_eq!(dp.installed.len(), 1);
    }

    /// A kernel that does not answer fails the batch (and leaves the
    /// table in doubt) before the committer's bound is up.
    #[test]
    fn the_reply_timeout_is_within_the_bound() {
        for ms in [20, 2000, 60_000] {
            let dp = NftDataplane::new(NftSettings {
                timeout: std::time::Duration::from_millis(ms),
                ..NftSettings::default()
            });
            assert!(dp.reply_timeout() < dp.settings.timeout);
        }
    }

    /// An `nft` that hangs is killed at its deadline: the rebuild fails,
    /// its changes with it, and the table stays in doubt.
    #[test]
    fn a_hanging_nft_is_killed_and_the_table_stays_in_doubt() {
        let dir = std::env::temp_dir().join(format!("pk-nft-hang-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let nft = dir.join("nft");
        std::fs::write(&nft, "#!/bin/sh\nexec sleep 60\n").unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&nft, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut dp = NftDataplane::new(NftSettings {
            nft: nft.clone(),
            ..NftSettings::default()
        });
        dp.nft_deadline = std::time::Duration::from_millis(200);
        let m = map(Protocol::TCP, "10.0.0.2:22", "198.51.100.1:30022");
        let t = crate::clock::Stopwatch::start();
        let e = dp.apply(&[up(1, &m)]).unwrap_err();
        assert!(t.micros() < 20_000_000, "{} us", t.micros());
        assert_eq!(e.failed, [1]);
        assert!(e.message.contains("killed"), "{e}");
        assert!(dp.in_doubt());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn first_apply_rebuilds_the_table_then_loads_every_known_element() {
        let mut dp = NftDataplane::new(NftSettings {
            external_interfaces: vec!["wan0".into()],
            internal_interfaces: vec!["lan0".into()],
            ..NftSettings::default()
        });
        let m = map(Protocol::TCP, "10.0.0.2:8080", "198.51.100.1:30000");
        let s = dp.rebuild_script();
        assert!(
            s.starts_with(
                "add table inet portkeep\ndelete table inet portkeep\ntable inet portkeep {\n"
            ),
            "{s}"
        );
        for stmt in [
            "\t\tiifname { \"wan0\" } dnat ip to meta l4proto . ip daddr . th dport map @dnat4\n",
            "\t\tiifname { \"lan0\" } oifname { \"wan0\" } snat ip to meta l4proto . ip saddr . th sport . ip daddr . th dport map @peer4\n",
            "\t\tiifname { \"wan0\" } ct direction original meta l4proto . ip daddr . th dport @filtered4 meta l4proto . ip daddr . th dport . ip saddr . th sport != @allow4 drop\n",
            "\t\ttype nat hook postrouting priority srcnat - 1; policy accept;\n",
            "\t\tct status dnat accept\n",
        ] {
            assert!(s.contains(stmt), "missing {stmt:?} in\n{s}");
        }
        // Exactly one DNAT rule per map, whatever the number of mappings.
        assert_eq!(s.matches("map @dnat4\n").count(), 1);
        let b = dp.plan(&[up(1, &m)]);
        assert!(b.rebuild);
        ok(&mut dp, b);
        dp.built = true;
        // After a doubt, the rebuild loads what is installed again.
        dp.invalidate();
        let other = map(Protocol::UDP, "10.0.0.9:53", "198.51.100.1:30053");
        let b = dp.plan(&[up(2, &other)]);
        assert!(b.rebuild);
        assert_eq!(b.elements(), 4);
        assert_eq!(b.owners.len(), 2);
    }
}
