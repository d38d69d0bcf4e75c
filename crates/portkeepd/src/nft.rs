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
//! Each call to [`Dataplane::apply`] is one `nft -f -` process and one
//! kernel transaction, whatever the number of changes: the committer calls
//! it once per group commit. The first call after start replaces the whole
//! table in that same transaction (delete + re-create + load), so leftovers
//! of an earlier run vanish and nothing is installed twice. Removed
//! mappings also lose their conntrack entries (one `conntrack -R` process
//! per batch), or an established flow would keep forwarding.
//!
//! The dataplane remembers which elements each mapping installed, so an
//! update deletes exactly what it replaces and a delete never names an
//! element that is not there (nft 1.0.6 has no `destroy element`, and a
//! failed `delete element` would fail the whole transaction).

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
    /// The `nft` binary.
    pub nft: PathBuf,
    /// The `conntrack` binary; `None` skips conntrack cleanup.
    pub conntrack: Option<PathBuf>,
}

impl Default for NftSettings {
    fn default() -> Self {
        NftSettings {
            table: "portkeep".into(),
            on_stop: OnStop::Keep,
            external_interfaces: Vec::new(),
            internal_interfaces: Vec::new(),
            nft: PathBuf::from("nft"),
            conntrack: Some(PathBuf::from("conntrack")),
        }
    }
}

/// Which mapping an element belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Ident {
    kind: MappingKind,
    key: MappingKey,
}

/// One element of one of the table's maps or sets.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Elem {
    set: &'static str,
    key: String,
    /// The mapped value (maps only).
    value: Option<String>,
}

impl Elem {
    fn new(set: &'static str, key: String, value: Option<String>) -> Elem {
        Elem { set, key, value }
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
                    Elem::new(
                        f.pick("pinhole4_all", "pinhole6_all"),
                        ext.to_string(),
                        None,
                    )
                } else if iport == 0 {
                    Elem::new(
                        f.pick("pinhole4_proto", "pinhole6_proto"),
                        format!("{p} . {ext}"),
                        None,
                    )
                } else {
                    Elem::new(
                        f.pick("pinhole4", "pinhole6"),
                        format!("{p} . {ext} . {eport}"),
                        None,
                    )
                });
            } else if p == 0 {
                out.push(Elem::new(
                    f.pick("dnat4_all", "dnat6_all"),
                    ext.to_string(),
                    Some(int.to_string()),
                ));
                out.push(Elem::new(
                    f.pick("snat4_all", "snat6_all"),
                    int.to_string(),
                    Some(ext.to_string()),
                ));
            } else if iport == 0 || eport == 0 {
                out.push(Elem::new(
                    f.pick("dnat4_proto", "dnat6_proto"),
                    format!("{p} . {ext}"),
                    Some(int.to_string()),
                ));
                out.push(Elem::new(
                    f.pick("snat4_proto", "snat6_proto"),
                    format!("{p} . {int}"),
                    Some(ext.to_string()),
                ));
            } else {
                out.push(Elem::new(
                    f.pick("dnat4", "dnat6"),
                    format!("{p} . {ext} . {eport}"),
                    Some(format!("{int} . {iport}")),
                ));
                out.push(Elem::new(
                    f.pick("snat4", "snat6"),
                    format!("{p} . {int} . {iport}"),
                    Some(format!("{ext} . {eport}")),
                ));
            }
            if !m.filters.is_empty() {
                out.push(Elem::new(
                    f.pick("filtered4", "filtered6"),
                    format!("{p} . {ext} . {eport}"),
                    None,
                ));
                for r in &m.filters {
                    let addr = canonical(r.prefix.addr());
                    if addr.is_ipv4() != ext.is_ipv4() {
                        // A peer of the other family can never reach this
                        // mapping: nothing to allow.
                        continue;
                    }
                    let ports = if r.port == 0 {
                        "0-65535".to_owned()
                    } else {
                        r.port.to_string()
                    };
                    out.push(Elem::new(
                        f.pick("allow4", "allow6"),
                        format!(
                            "{p} . {ext} . {eport} . {addr}/{} . {ports}",
                            r.prefix.len()
                        ),
                        None,
                    ));
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
                // Nothing to translate.
                return Ok(out);
            }
            out.push(Elem::new(
                f.pick("peer4", "peer6"),
                format!("{p} . {int} . {iport} . {r} . {}", remote.port()),
                Some(format!("{ext} . {eport}")),
            ));
        }
    }
    Ok(out)
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
             \tset pinhole{n}_all {{ type {a}; }}"
        );
    }
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
    let _ = writeln!(
        d,
        "\t}}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority filter; policy accept;\n\
         \t\tct status dnat accept"
    );
    for (n, ip) in [("4", "ip"), ("6", "ip6")] {
        let _ = writeln!(
            d,
            "\t\tmeta l4proto . {ip} daddr . th dport @pinhole{n} accept\n\
             \t\tmeta l4proto . {ip} daddr @pinhole{n}_proto accept\n\
             \t\t{ip} daddr @pinhole{n}_all accept"
        );
    }
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

/// One statement per set, in order of first appearance: nft parses one
/// statement of many elements far faster than many statements.
fn push_grouped(out: &mut String, op: &str, table: &str, elems: &[&Elem]) {
    let mut sets: Vec<(&'static str, Vec<&Elem>)> = Vec::new();
    for e in elems {
        match sets.iter_mut().find(|(s, _)| *s == e.set) {
            Some((_, v)) => v.push(e),
            None => sets.push((e.set, vec![e])),
        }
    }
    for (set, v) in sets {
        let _ = write!(out, "{op} element inet {table} {set} {{ ");
        for (i, e) in v.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            out.push_str(&e.key);
            if let Some(val) = &e.value {
                out.push_str(" : ");
                out.push_str(val);
            }
        }
        out.push_str(" }\n");
    }
}

/// `conntrack -p` names for the protocols that have ports.
fn ct_proto(p: u8) -> Option<&'static str> {
    match p {
        6 => Some("tcp"),
        17 => Some("udp"),
        33 => Some("dccp"),
        132 => Some("sctp"),
        136 => Some("udplite"),
        _ => None,
    }
}

/// `conntrack` command lines (for `conntrack -R`) that delete the flows
/// a removed mapping was carrying: inbound flows to its external
/// endpoint, and flows NATed to it on the way out.
pub(crate) fn conntrack_lines(m: &MappingRecord, out: &mut Vec<String>) {
    let int = canonical(m.key.internal_ip);
    let ext = canonical(m.external.ip());
    let family = if int.is_ipv6() { "-f ipv6 " } else { "" };
    let p = m.key.protocol.0;
    let proto = ct_proto(p);
    let (iport, eport) = (m.key.internal_port, m.external.port());
    // A port only narrows the match for a protocol conntrack knows ports of.
    let with_ports = proto.is_some() && iport != 0 && eport != 0;
    let pflag = match (p, proto) {
        (0, _) => String::new(),
        (_, Some(name)) => format!("-p {name} "),
        (n, None) => format!("-p {n} "),
    };
    match m.kind {
        MappingKind::Map => {
            if with_ports {
                out.push(format!(
                    "-D {family}{pflag}--orig-dst {ext} --orig-port-dst {eport}"
                ));
                out.push(format!(
                    "-D {family}{pflag}--reply-dst {ext} --reply-port-dst {eport}"
                ));
                if int != ext {
                    out.push(format!(
                        "-D {family}{pflag}--reply-src {int} --reply-port-src {iport}"
                    ));
                }
            } else {
                out.push(format!("-D {family}{pflag}--orig-dst {ext}"));
                out.push(format!("-D {family}{pflag}--reply-dst {ext}"));
            }
        }
        MappingKind::Peer { remote } => {
            if let Some(name) = proto {
                out.push(format!(
                    "-D {family}-p {name} --orig-src {int} --orig-port-src {iport} --orig-dst {} --orig-port-dst {}",
                    canonical(remote.ip()),
                    remote.port()
                ));
            }
        }
    }
}

/// Batches of more elements than this go through `nft -f -` (one process);
/// smaller ones through the long-lived `nft -i` session, which takes one
/// line per transaction and saves the ~5 ms of a process start.
const SESSION_MAX_ELEMENTS: usize = 2000;
/// How long a session batch may take before the session is abandoned.
const SESSION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A long-lived `nft -i`. Each batch is written as one line (statements
/// joined by `;`), which nft runs as one transaction. nft says nothing on
/// success, so each batch is followed by a command that is sure to fail,
/// naming a table that does not exist: its error on stderr marks the end
/// of the batch's output, and any other error before it is the batch's.
#[derive(Debug)]
struct Session {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stderr: std::sync::mpsc::Receiver<String>,
    seq: u64,
}

impl Session {
    fn start(nft: &std::path::Path) -> Result<Session, String> {
        let mut child = Command::new(nft)
            .arg("-i")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run {} -i: {e}", nft.display()))?;
        let stdin = child.stdin.take().ok_or("nft -i: no stdin")?;
        let mut err = child.stderr.take().ok_or("nft -i: no stderr")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("nft-stderr".into())
            .spawn(move || {
                use std::io::Read as _;
                let mut buf = [0u8; 8192];
                while let Ok(n) = err.read(&mut buf) {
                    if n == 0
                        || tx
                            .send(String::from_utf8_lossy(&buf[..n]).into_owned())
                            .is_err()
                    {
                        break;
                    }
                }
            })
            .map_err(|e| format!("cannot start nft reader: {e}"))?;
        Ok(Session {
            child,
            stdin,
            stderr: rx,
            seq: 0,
        })
    }

    /// Runs one batch. `Ok(Err(msg))`: nft refused it (nothing applied);
    /// `Err(msg)`: the session is broken.
    fn run(&mut self, statements: &[&str]) -> Result<Result<(), String>, String> {
        self.seq += 1;
        let marker = format!("list table inet pksync{}", self.seq);
        let mut line = statements.join("; ");
        line.push('\n');
        line.push_str(&marker);
        line.push('\n');
        self.stdin
            .write_all(line.as_bytes())
            .and_then(|()| self.stdin.flush())
            .map_err(|e| format!("writing to nft -i: {e}"))?;
        let mut out = String::new();
        loop {
            match self.stderr.recv_timeout(SESSION_TIMEOUT) {
                Ok(chunk) => out.push_str(&chunk),
                Err(_) => return Err(format!("nft -i stopped answering: {out}")),
            }
            // The marker's own error ends with its caret line.
            if let Some(at) = out.find(&format!("\n{marker}\n")) {
                if out[at + 1..].contains("^\n") {
                    let before = &out[..at];
                    // Drop the marker's "Error: ..." line.
                    let before = before.rfind("Error:").map_or(before, |e| &before[..e]);
                    let before = before.trim_end();
                    return Ok(if before.is_empty() {
                        Ok(())
                    } else {
                        Err(format!("nft refused the batch: {before}"))
                    });
                }
            }
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The nftables dataplane.
#[derive(Debug)]
pub struct NftDataplane {
    settings: NftSettings,
    /// The `nft -i` session for small batches, started on first use.
    session: Option<Session>,
    /// What each mapping has installed, as of the last successful batch.
    installed: HashMap<Ident, Vec<Elem>>,
    /// Whether the table has been (re)built since start.
    built: bool,
}

/// A batch turned into nft input.
#[derive(Debug, Default)]
pub struct Batch {
    /// The `nft -f` input.
    pub script: String,
    /// `conntrack -R` input, one command per line.
    pub conntrack: Vec<String>,
    /// The per-mapping state after the batch.
    updates: Vec<(Ident, Option<Vec<Elem>>)>,
    /// Changes that cannot be programmed, with why.
    pub rejected: Vec<(u64, String)>,
    /// Elements added or deleted.
    pub elements: usize,
}

impl NftDataplane {
    /// A dataplane that programs `settings.table`; nothing runs until the
    /// first [`Dataplane::apply`], which builds the table.
    pub fn new(settings: NftSettings) -> NftDataplane {
        NftDataplane {
            settings,
            session: None,
            installed: HashMap::new(),
            built: false,
        }
    }

    /// The settings.
    pub fn settings(&self) -> &NftSettings {
        &self.settings
    }

    /// Turns changes into nft input, against the installed state; when the
    /// table is to be (re)built, the script first re-creates it with every
    /// installed element (none at start).
    pub fn plan(&self, changes: &[ChangeRecord]) -> Batch {
        let t = &self.settings.table;
        let mut b = Batch::default();
        // Each mapping's state after the batch, in first-touched order.
        let mut order: Vec<Ident> = Vec::new();
        let mut overlay: HashMap<Ident, Option<Vec<Elem>>> = HashMap::new();
        for c in changes {
            let (m, new) = match &c.change {
                Change::Upserted(m) => match elements(m) {
                    Ok(e) => (m, Some(e)),
                    Err(why) => {
                        b.rejected.push((c.seq, why));
                        continue;
                    }
                },
                Change::Removed { mapping, .. } => {
                    conntrack_lines(mapping, &mut b.conntrack);
                    (mapping, None)
                }
                Change::EpochReset { .. } | Change::ServerEpochReset { .. } => continue,
            };
            let id = Ident {
                kind: m.kind,
                key: m.key,
            };
            if overlay.insert(id, new).is_none() {
                order.push(id);
            }
        }
        // The net difference: what goes, then what comes. Deletes first,
        // so an element that moves from one mapping to another in the
        // same batch (an external port reused) is deleted before it is
        // added again.
        let empty: Vec<Elem> = Vec::new();
        let mut dels: Vec<&Elem> = Vec::new();
        let mut adds: Vec<&Elem> = Vec::new();
        if self.built {
            for id in &order {
                let old = self.installed.get(id).unwrap_or(&empty);
                let new = overlay.get(id).and_then(Option::as_ref).unwrap_or(&empty);
                dels.extend(old.iter().filter(|e| !new.contains(e)));
                adds.extend(new.iter().filter(|e| !old.contains(e)));
            }
        } else {
            // One transaction: make sure the table exists, delete it with
            // everything in it, and build it afresh with every mapping
            // (after a failure, what is known to be installed comes back).
            let _ = writeln!(b.script, "add table inet {t}\ndelete table inet {t}");
            b.script.push_str(&table_definition(&self.settings));
            for (id, els) in &self.installed {
                if !overlay.contains_key(id) {
                    adds.extend(els);
                }
            }
            for id in &order {
                adds.extend(overlay.get(id).and_then(Option::as_ref).unwrap_or(&empty));
            }
        }
        b.elements = dels.len() + adds.len();
        push_grouped(&mut b.script, "delete", t, &dels);
        push_grouped(&mut b.script, "add", t, &adds);
        b.updates = order
            .into_iter()
            .map(|id| {
                let v = overlay.remove(&id).flatten();
                (id, v)
            })
            .collect();
        b
    }

    /// Runs a batch as one transaction: through the session when it is a
    /// plain list of element statements of modest size, else `nft -f -`.
    fn run_script(&mut self, script: &str, elements: usize) -> Result<(), String> {
        let statements: Vec<&str> = script.lines().collect();
        if !self.built || elements > SESSION_MAX_ELEMENTS {
            return self.run_nft(script);
        }
        if self.session.is_none() {
            match Session::start(&self.settings.nft) {
                Ok(s) => self.session = Some(s),
                Err(e) => {
                    tracing::warn!("{e}; using nft -f");
                    return self.run_nft(script);
                }
            }
        }
        let Some(session) = self.session.as_mut() else {
            return self.run_nft(script);
        };
        match session.run(&statements) {
            Ok(result) => result,
            Err(e) => {
                // A broken session may or may not have applied the batch:
                // the next batch rebuilds the table from what is known to
                // be installed, in one transaction.
                tracing::warn!("{e}; restarting nft -i");
                self.session = None;
                self.built = false;
                Err(e)
            }
        }
    }

    /// Runs `nft -f -` with `script`.
    fn run_nft(&self, script: &str) -> Result<(), String> {
        let mut child = Command::new(&self.settings.nft)
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.settings.nft.display()))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(script.as_bytes())
                .map_err(|e| format!("writing to nft: {e}"))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| format!("waiting for nft: {e}"))?;
        if out.status.success() {
            return Ok(());
        }
        // nft names the failing statement: "/dev/stdin:LINE:COL-COL: Error: ...",
        // then the statement and a marker line.
        Err(format!(
            "nft -f failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end()
        ))
    }

    /// Deletes the flows of removed mappings: one `conntrack -R` for the
    /// whole batch. Failures are logged, not returned: the rules are gone
    /// already, and a flow left behind ends on its own timeout.
    fn flush_conntrack(&self, lines: &[String]) {
        let Some(bin) = &self.settings.conntrack else {
            return;
        };
        if lines.is_empty() {
            return;
        }
        let mut text = lines.join("\n");
        text.push('\n');
        let run = || -> Result<std::process::Output, String> {
            let mut child = Command::new(bin)
                .args(["-R", "/dev/stdin"])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
            if let Some(mut stdin) = child.stdin.take() {
                stdin
                    .write_all(text.as_bytes())
                    .map_err(|e| format!("writing to conntrack: {e}"))?;
            }
            child
                .wait_with_output()
                .map_err(|e| format!("waiting for conntrack: {e}"))
        };
        match run() {
            Ok(o) if o.status.success() => {}
            Ok(o) => tracing::warn!(
                "conntrack cleanup failed ({}): {}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim_end()
            ),
            Err(e) => tracing::warn!("conntrack cleanup failed: {e}"),
        }
    }

    fn commit(&mut self, b: Batch) {
        self.built = true;
        for (id, v) in b.updates {
            match v {
                Some(v) if !v.is_empty() => {
                    self.installed.insert(id, v);
                }
                _ => {
                    self.installed.remove(&id);
                }
            }
        }
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

    fn apply(&mut self, changes: &[ChangeRecord]) -> Result<(), DataplaneError> {
        let mut b = self.plan(changes);
        let rejected = std::mem::take(&mut b.rejected);
        let lines = std::mem::take(&mut b.conntrack);
        let mut failed: Vec<u64> = rejected.iter().map(|(seq, _)| *seq).collect();
        let mut why: Vec<String> = rejected
            .iter()
            .map(|(seq, w)| format!("change {seq}: {w}"))
            .collect();
        if b.script.is_empty() {
            self.commit(b);
        } else {
            match self.run_script(&b.script, b.elements) {
                Ok(()) => self.commit(b),
                Err(e) if changes.len() > 1 => {
                    // One bad change must not take the batch down with it
                    // (a transaction is all or nothing): apply them one by
                    // one, so that exactly the failing ones are reported
                    // and answered NETWORK_FAILURE.
                    tracing::warn!(
                        "nft transaction of {} changes failed ({e}); applying them one by one",
                        changes.len()
                    );
                    for c in changes {
                        if failed.contains(&c.seq) {
                            continue;
                        }
                        let mut one = self.plan(std::slice::from_ref(c));
                        one.conntrack.clear();
                        if one.script.is_empty() {
                            self.commit(one);
                            continue;
                        }
                        match self.run_script(&one.script, one.elements) {
                            Ok(()) => self.commit(one),
                            Err(e) => {
                                failed.push(c.seq);
                                why.push(format!("change {}: {e}", c.seq));
                            }
                        }
                    }
                }
                Err(e) => {
                    failed.extend(changes.iter().map(|c| c.seq));
                    why.push(e);
                }
            }
        }
        self.flush_conntrack(&lines);
        if failed.is_empty() {
            return Ok(());
        }
        Err(DataplaneError {
            dataplane: "nftables",
            message: why.join("; "),
            failed,
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
        }
    }

    fn up(seq: u64, m: &MappingRecord) -> ChangeRecord {
        ChangeRecord {
            seq,
            change: Change::Upserted(m.clone()),
        }
    }

    fn down(seq: u64, m: &MappingRecord) -> ChangeRecord {
        ChangeRecord {
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

    #[test]
    fn map_is_one_dnat_and_one_snat_element() {
        let dp = built();
        let m = map(Protocol::TCP, "10.0.0.2:8080", "198.51.100.1:30000");
        let b = dp.plan(&[up(1, &m)]);
        assert_eq!(
            b.script,
            "add element inet portkeep dnat4 { 6 . 198.51.100.1 . 30000 : 10.0.0.2 . 8080 }\n\
             add element inet portkeep snat4 { 6 . 10.0.0.2 . 8080 : 198.51.100.1 . 30000 }\n"
        );
        assert!(b.rejected.is_empty());
        assert!(b.conntrack.is_empty());
    }

    #[test]
    fn all_protocols_and_all_ports() {
        let dp = built();
        let all = map(Protocol::ALL, "10.0.0.3:0", "198.51.100.2:0");
        let ports = map(Protocol::UDP, "10.0.0.4:0", "198.51.100.3:0");
        let b = dp.plan(&[up(1, &all), up(2, &ports)]);
        assert_eq!(
            b.script,
            "add element inet portkeep dnat4_all { 198.51.100.2 : 10.0.0.3 }\n\
             add element inet portkeep snat4_all { 10.0.0.3 : 198.51.100.2 }\n\
             add element inet portkeep dnat4_proto { 17 . 198.51.100.3 : 10.0.0.4 }\n\
             add element inet portkeep snat4_proto { 17 . 10.0.0.4 : 198.51.100.3 }\n"
        );
    }

    #[test]
    fn filters_become_allow_intervals() {
        let dp = built();
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
            b.script,
            "add element inet portkeep dnat4 { 6 . 198.51.100.1 . 30022 : 10.0.0.2 . 22 }\n\
             add element inet portkeep snat4 { 6 . 10.0.0.2 . 22 : 198.51.100.1 . 30022 }\n\
             add element inet portkeep filtered4 { 6 . 198.51.100.1 . 30022 }\n\
             add element inet portkeep allow4 { 6 . 198.51.100.1 . 30022 . 203.0.113.0/24 . 0-65535, 6 . 198.51.100.1 . 30022 . 192.0.2.7/32 . 5000 }\n"
        );
        // Filters on an all-ports mapping cannot be expressed: refused,
        // never silently dropped (that would open more than was asked).
        let mut wide = map(Protocol::ALL, "10.0.0.3:0", "198.51.100.2:0");
        wide.filters = m.filters.clone();
        let b = dp.plan(&[up(7, &wide)]);
        assert_eq!(b.script, "");
        assert_eq!(b.rejected.len(), 1);
        assert_eq!(b.rejected[0].0, 7);
    }

    #[test]
    fn peer_is_a_five_tuple_snat_pin() {
        let dp = built();
        let mut m = map(Protocol::UDP, "10.0.0.2:5000", "198.51.100.1:40000");
        m.kind = MappingKind::Peer {
            remote: "203.0.113.9:3478".parse().unwrap(),
        };
        let b = dp.plan(&[up(1, &m)]);
        assert_eq!(
            b.script,
            "add element inet portkeep peer4 { 17 . 10.0.0.2 . 5000 . 203.0.113.9 . 3478 : 198.51.100.1 . 40000 }\n"
        );
        let b = dp.plan(&[down(2, &m)]);
        assert_eq!(
            b.conntrack,
            vec!["-D -p udp --orig-src 10.0.0.2 --orig-port-src 5000 --orig-dst 203.0.113.9 --orig-port-dst 3478"]
        );
    }

    #[test]
    fn ipv6_pinhole_and_cross_family() {
        let dp = built();
        let pin = map(Protocol::TCP, "[2001:db8::5]:443", "[2001:db8::5]:443");
        let nat66 = map(
            Protocol::UDP,
            "[2001:db8::6]:53",
            "[2001:db8:ffff::1]:30053",
        );
        let nat64 = map(Protocol::TCP, "[2001:db8::7]:80", "198.51.100.1:30080");
        let b = dp.plan(&[up(1, &pin), up(2, &nat66), up(3, &nat64)]);
        assert_eq!(
            b.script,
            "add element inet portkeep pinhole6 { 6 . 2001:db8::5 . 443 }\n\
             add element inet portkeep dnat6 { 17 . 2001:db8:ffff::1 . 30053 : 2001:db8::6 . 53 }\n\
             add element inet portkeep snat6 { 17 . 2001:db8::6 . 53 : 2001:db8:ffff::1 . 30053 }\n"
        );
        assert_eq!(b.rejected.len(), 1);
        assert_eq!(b.rejected[0].0, 3);
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
        dp.commit(b);
        // A refresh that changes nothing changes nothing.
        assert_eq!(dp.plan(&[up(2, &m)]).script, "");
        // New filters: the old allow element goes, the new one comes.
        m.filters[0].prefix = "192.0.2.0/24".parse().unwrap();
        let b = dp.plan(&[up(3, &m)]);
        assert_eq!(
            b.script,
            "delete element inet portkeep allow4 { 6 . 198.51.100.1 . 30022 . 203.0.113.0/24 . 0-65535 }\n\
             add element inet portkeep allow4 { 6 . 198.51.100.1 . 30022 . 192.0.2.0/24 . 0-65535 }\n"
        );
        dp.commit(b);
        // Delete: every element, and the mapping's flows.
        let b = dp.plan(&[down(4, &m)]);
        assert_eq!(
            b.script,
            "delete element inet portkeep dnat4 { 6 . 198.51.100.1 . 30022 : 10.0.0.2 . 22 }\n\
             delete element inet portkeep snat4 { 6 . 10.0.0.2 . 22 : 198.51.100.1 . 30022 }\n\
             delete element inet portkeep filtered4 { 6 . 198.51.100.1 . 30022 }\n\
             delete element inet portkeep allow4 { 6 . 198.51.100.1 . 30022 . 192.0.2.0/24 . 0-65535 }\n"
        );
        assert_eq!(
            b.conntrack,
            vec![
                "-D -p tcp --orig-dst 198.51.100.1 --orig-port-dst 30022",
                "-D -p tcp --reply-dst 198.51.100.1 --reply-port-dst 30022",
                "-D -p tcp --reply-src 10.0.0.2 --reply-port-src 22",
            ]
        );
        dp.commit(b);
        assert!(dp.installed.is_empty());
        // A delete of something never installed names no element.
        assert_eq!(dp.plan(&[down(5, &m)]).script, "");
    }

    #[test]
    fn an_external_port_reused_in_one_batch_is_deleted_before_added() {
        let mut dp = built();
        let a = map(Protocol::TCP, "10.0.0.2:22", "198.51.100.1:30022");
        let b = dp.plan(&[up(1, &a)]);
        dp.commit(b);
        let c = map(Protocol::TCP, "10.0.0.3:22", "198.51.100.1:30022");
        let d = map(Protocol::TCP, "10.0.0.4:80", "198.51.100.1:30080");
        let b = dp.plan(&[down(2, &a), up(3, &c), up(4, &d)]);
        assert_eq!(
            b.script,
            "delete element inet portkeep dnat4 { 6 . 198.51.100.1 . 30022 : 10.0.0.2 . 22 }\n\
             delete element inet portkeep snat4 { 6 . 10.0.0.2 . 22 : 198.51.100.1 . 30022 }\n\
             add element inet portkeep dnat4 { 6 . 198.51.100.1 . 30022 : 10.0.0.3 . 22, 6 . 198.51.100.1 . 30080 : 10.0.0.4 . 80 }\n\
             add element inet portkeep snat4 { 6 . 10.0.0.3 . 22 : 198.51.100.1 . 30022, 6 . 10.0.0.4 . 80 : 198.51.100.1 . 30080 }\n"
        );
        assert_eq!(b.elements, 6);
    }

    #[test]
    fn create_and_delete_in_one_batch_cancel_out() {
        let dp = built();
        let m = map(Protocol::TCP, "10.0.0.2:22", "198.51.100.1:30022");
        let b = dp.plan(&[up(1, &m), down(2, &m)]);
        assert_eq!(b.script, "");
        assert_eq!(b.updates.len(), 1);
        assert!(b.updates[0].1.is_none());
    }

    #[test]
    fn first_apply_rebuilds_the_table_in_the_same_transaction() {
        let dp = NftDataplane::new(NftSettings {
            external_interfaces: vec!["wan0".into()],
            internal_interfaces: vec!["lan0".into()],
            ..NftSettings::default()
        });
        let m = map(Protocol::TCP, "10.0.0.2:8080", "198.51.100.1:30000");
        let s = dp.plan(&[up(1, &m)]).script;
        assert!(
            s.starts_with(
                "add table inet portkeep\ndelete table inet portkeep\ntable inet portkeep {\n"
            ),
            "{s}"
        );
        assert!(s.ends_with(
            "add element inet portkeep snat4 { 6 . 10.0.0.2 . 8080 : 198.51.100.1 . 30000 }\n"
        ));
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
    }
}
