//! GET and NEXT: retrieving the mapping table over PCP (failure-scenarios
//! draft section 4; code points in `docs/extensions.md`).
//!
//! What a GET returns:
//!
//! - **MAP mappings only** (the draft's "explicit dynamic mappings").
//!   PEER entries share their MAP's binding, and NEXT has no field for the
//!   remote peer, so two PEERs of one internal endpoint would be the same
//!   mapping under the draft's equality (section 4.3) and a locator could
//!   not tell them apart.
//! - **Only the requester's own mappings** (section 6: a client retrieves
//!   what it may delete): those whose internal address is the request's
//!   source, or, for a client on the THIRD_PARTY allow-list, the host a
//!   THIRD_PARTY option names (RFC 6887 section 13.1). Other mappings are
//!   invisible: they never match, which leaks nothing about them.
//! - **In [`OrderKey`] order**, lexicographic (section 4.3).
//!
//! How a walk continues (section 4.6): the list of matching mappings
//! "begins by the mapping equals to the Locator followed by greater
//! mappings". So a Defined locator that still exists comes back as the
//! first NEXT of the response, and the client drops it (it has it
//! already); a locator that no longer exists is followed by the first
//! mapping greater than it. Either way, every mapping that exists through
//! the whole walk is returned exactly once: each response is a contiguous
//! run of the current ordered list, starting at the locator.

use std::net::IpAddr;

use portkeep_proto::addr::{from_af_wire, to_af_wire, to_wire};
use portkeep_proto::{
    GetData, Next, NextItems, OptionCode, PcpOption, Protocol, NEXT_END, NEXT_FIXED_LEN,
};

use crate::table::{Id, OrderKey, Table};
use crate::Timestamp;

/// A GET body checked for soundness (draft section 4.1).
#[derive(Debug, Clone, Copy)]
pub(crate) struct GetFilter {
    protocol: Protocol,
    /// Internal address family required (1 IPv4, 2 IPv6), if any.
    internal_af: u8,
    /// Internal address required, if specified.
    internal: Option<IpAddr>,
    external_af: u8,
    external: Option<IpAddr>,
    internal_port: u16,
    external_port: u16,
}

/// Why a GET body is not a sound filter; answered MALFORMED_REQUEST.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Unsound(pub(crate) &'static str);

/// Reads one address of a filter: `None` for "any". Section 4.1: an
/// address with family 0 (any) is unsound, an IPv4 address is followed by
/// 96 zero bits, and the unspecified address of a family (0.0.0.0, `::`)
/// matches any address of that family.
fn filter_addr(af: u8, ip: std::net::Ipv6Addr) -> Result<Option<IpAddr>, Unsound> {
    if af == 0 {
        if !ip.is_unspecified() {
            return Err(Unsound("address with address family 'any'"));
        }
        return Ok(None);
    }
    match from_af_wire(af, ip).map_err(Unsound)? {
        Some(a) if !a.is_unspecified() => Ok(Some(a)),
        _ => Ok(None),
    }
}

impl GetFilter {
    /// Section 4.1: zero is a wildcard, and the filter must be sound: no
    /// port with protocol "any", no address with family "any", known
    /// families only, IPv4 addresses followed by 96 zero bits. The
    /// reserved octet is ignored.
    pub(crate) fn parse(g: &GetData) -> Result<GetFilter, Unsound> {
        if g.protocol == Protocol::ALL && (g.internal_port != 0 || g.external_port != 0) {
            return Err(Unsound("port with protocol 'any'"));
        }
        Ok(GetFilter {
            protocol: g.protocol,
            internal_af: g.internal_af,
            internal: filter_addr(g.internal_af, g.internal_ip)?,
            external_af: g.external_af,
            external: filter_addr(g.external_af, g.external_ip)?,
            internal_port: g.internal_port,
            external_port: g.external_port,
        })
    }

    /// Whether `host` (the only internal address the requester may see)
    /// can match the filter's internal side at all.
    fn admits_host(&self, host: IpAddr) -> bool {
        family_ok(self.internal_af, host) && self.internal.is_none_or(|a| a == host)
    }

    /// The external side and the fields the range scan did not narrow.
    fn matches(
        &self,
        protocol: Protocol,
        internal_port: u16,
        ext_ip: IpAddr,
        ext_port: u16,
    ) -> bool {
        (self.protocol == Protocol::ALL || self.protocol == protocol)
            && (self.internal_port == 0 || self.internal_port == internal_port)
            && family_ok(self.external_af, ext_ip)
            && self.external.is_none_or(|a| a == ext_ip)
            && (self.external_port == 0 || self.external_port == ext_port)
    }
}

fn family_ok(af: u8, ip: IpAddr) -> bool {
    match af {
        0 => true,
        1 => ip.is_ipv4(),
        _ => ip.is_ipv6(),
    }
}

/// Where a walk starts (draft section 4.4).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Locator {
    /// All fields zero: from the first mapping.
    Undefined,
    /// A position: the first mapping equal to or greater than `key`;
    /// `exact` is false when no mapping can equal it.
    Defined { key: OrderKey, exact: bool },
}

/// Reads a request's NEXT locator. `Err` (MALFORMED_OPTION, RFC 6887
/// section 7.3: invalid option contents) for a locator that is neither
/// all zero nor a mapping's fields with known families and IPv4 addresses
/// followed by 96 zero bits. Its lifetime "MUST be ignored" (section 4.4).
pub(crate) fn parse_locator(n: &Next, table: &Table) -> Result<Locator, &'static str> {
    if n.is_undefined_locator() {
        return Ok(Locator::Undefined);
    }
    let internal = from_af_wire(n.internal_af, n.internal_ip)?
        .ok_or("locator with internal address family 'any'")?;
    let external = from_af_wire(n.external_af, n.external_ip)?
        .ok_or("locator with external address family 'any'")?;
    let (key, exact) = table.locator_key(
        internal,
        n.protocol,
        n.internal_port,
        external,
        n.external_port,
    );
    Ok(Locator::Defined { key, exact })
}

/// What to answer to a valid GET.
#[derive(Debug)]
pub(crate) enum Answer {
    /// NONEXIST_MAP (section 4.2 and 4.6): nothing matches (from the
    /// locator on). Carries no NEXT.
    Nonexistent,
    /// SUCCESS with these NEXT options (none for a GET without NEXT).
    Found(Vec<PcpOption>),
}

/// A GET request, ready to run.
#[derive(Debug)]
pub(crate) struct Query<'a> {
    /// The internal address whose mappings the requester may see.
    pub(crate) host: IpAddr,
    pub(crate) filter: GetFilter,
    /// The request's NEXT, with its parsed locator; `None` for a GET
    /// without NEXT.
    pub(crate) next: Option<(&'a Next, Locator)>,
    /// Octets left for NEXT options within the 1100-octet message.
    pub(crate) room: usize,
}

/// The octets one NEXT takes with no embedded options.
const NEXT_MIN: usize = 4 + NEXT_FIXED_LEN;

/// Section 4.6: builds the (conceptual) ordered list of the host's
/// mappings matching the filter, skips to the locator, and returns one
/// mapping (END request) or as many as fit (MORE request), each NEXT
/// marked MORE when a greater matching mapping exists and END on the
/// greatest.
///
/// Sizing: mappings are added whole while they fit in `room`. The first
/// mapping the client does not have yet always goes in, with its embedded
/// options dropped from the last while it does not fit, so a walk always
/// progresses; the locator's own copy (which the client drops) loses its
/// embedded options when keeping them would crowd out the mapping after it.
pub(crate) fn answer(table: &Table, now: Timestamp, q: &Query<'_>) -> Answer {
    let mut it = matching(table, now, q).peekable();
    let Some((next_req, locator)) = q.next else {
        // Section 4.5: a GET without NEXT asks whether at least one
        // mapping matches.
        return match it.next() {
            Some(_) => Answer::Found(Vec::new()),
            None => Answer::Nonexistent,
        };
    };
    let codes = wanted_codes(next_req);
    let (exact_key, exact) = match locator {
        Locator::Defined { key, exact } => (Some(key), exact),
        Locator::Undefined => (None, false),
    };
    let mut out: Vec<PcpOption> = Vec::new();
    let mut used = 0usize;
    let mut fresh = 0usize;
    while let Some((key, id)) = it.next() {
        let Some(mut n) = to_next(table, now, id, &codes) else {
            continue;
        };
        let is_locator = out.is_empty() && exact && Some(key) == exact_key;
        let has_more = it.peek().is_some();
        n.more_end = if has_more { 0 } else { NEXT_END };
        if next_req.is_end() {
            // Section 4.6: an END request gets the first mapping of the
            // list only, marked END if it is the last one.
            trim_to(&mut n, q.room);
            out.push(PcpOption::Next(n));
            break;
        }
        let size = next_len(&n);
        if is_locator {
            // Room for the mapping after it, whole, comes first.
            let following = it
                .peek()
                .and_then(|&(_, id)| to_next(table, now, id, &codes))
                .map_or(0, |f| next_len(&f));
            if used + size + following > q.room {
                trim_to(&mut n, NEXT_MIN);
            }
        } else if used + size > q.room {
            if fresh > 0 {
                // Does not fit: it opens the next response. The last NEXT
                // already says MORE, since this one follows it.
                break;
            }
            trim_to(&mut n, q.room.saturating_sub(used));
        }
        if !is_locator {
            fresh += 1;
        }
        used += next_len(&n);
        out.push(PcpOption::Next(n));
        if used + NEXT_MIN > q.room {
            break;
        }
    }
    if out.is_empty() {
        Answer::Nonexistent
    } else {
        Answer::Found(out)
    }
}

/// The host's live MAP mappings that match the filter, from the locator
/// on, in order.
fn matching<'t>(
    table: &'t Table,
    now: Timestamp,
    q: &Query<'_>,
) -> impl Iterator<Item = (OrderKey, Id)> + 't {
    let f = q.filter;
    let (lo, hi) = OrderKey::host_range(q.host, f.protocol, f.internal_port);
    let from = match q.next.map(|(_, l)| l) {
        Some(Locator::Defined { key, .. }) if key > lo => key,
        _ => lo,
    };
    // Another host's mappings are invisible (section 6): a filter naming
    // one matches nothing.
    f.admits_host(q.host)
        .then(|| table.ordered(from, hi))
        .into_iter()
        .flatten()
        .filter(move |&(_, id)| {
            table.entry_and_binding(id).is_some_and(|(e, b)| {
                // An expired mapping not yet swept is gone (RFC 6887 section 15).
                e.expires > now
                    && f.matches(
                        b.key.protocol,
                        b.key.internal_port,
                        table.ext_ip_of(b),
                        b.ext_port,
                    )
            })
        })
}

/// The option codes a request's NEXT lists, each once, in its order
/// (section 4.4: "The Option Codes of the PCP Client wants to get").
fn wanted_codes(n: &Next) -> Vec<OptionCode> {
    let mut codes = Vec::new();
    if let NextItems::Codes(c) = &n.items {
        for &code in c {
            if !codes.contains(&code) {
                codes.push(code);
            }
        }
    }
    codes
}

/// A mapping as a response NEXT (section 4.4), MORE for now, carrying
/// those of the `codes` options it has: FILTER (one per rule, RFC 6887
/// section 13.3, prefix length over 128 bits), DESCRIPTION (RFC 7220),
/// THIRD_PARTY (the internal address, for mappings made with it,
/// RFC 6887 section 13.1), CHECKPOINT_REQUIRED (when the mapping is
/// check-pointed, RFC 7767). Other codes are ignored.
fn to_next(table: &Table, now: Timestamp, id: Id, codes: &[OptionCode]) -> Option<Next> {
    let (e, b) = table.entry_and_binding(id)?;
    let (internal_af, internal_ip) = to_af_wire(b.key.internal_ip);
    let (external_af, external_ip) = to_af_wire(table.ext_ip_of(b));
    let extra = e.extra.as_deref();
    let mut items = Vec::new();
    for &code in codes {
        match code {
            OptionCode::FILTER => {
                for r in extra.map(|x| x.filters.as_slice()).unwrap_or_default() {
                    let addr = r.prefix.addr();
                    let prefix_len = if addr.is_ipv4() {
                        r.prefix.len().saturating_add(96)
                    } else {
                        r.prefix.len()
                    };
                    items.push(PcpOption::Filter(portkeep_proto::Filter {
                        prefix_len,
                        remote_port: r.port,
                        remote_ip: to_wire(addr),
                    }));
                }
            }
            OptionCode::DESCRIPTION => {
                if let Some(d) = extra.and_then(|x| x.description.as_deref()) {
                    items.push(PcpOption::Description(d.to_owned()));
                }
            }
            OptionCode::THIRD_PARTY if e.third_party => {
                items.push(PcpOption::ThirdParty(to_wire(b.key.internal_ip)));
            }
            OptionCode::CHECKPOINT_REQUIRED if e.checkpoint => {
                items.push(PcpOption::CheckpointRequired);
            }
            _ => {}
        }
    }
    Some(Next {
        protocol: b.key.protocol,
        internal_af,
        external_af,
        more_end: 0,
        internal_ip,
        external_ip,
        lifetime: u32::try_from(e.expires.secs_since(now)).unwrap_or(u32::MAX),
        internal_port: b.key.internal_port,
        external_port: b.ext_port,
        items: NextItems::Options(items),
    })
}

/// Drops embedded options from the last until the NEXT takes at most
/// `room` octets (never below its fixed part).
fn trim_to(n: &mut Next, room: usize) {
    while next_len(n) > room.max(NEXT_MIN) {
        match &mut n.items {
            NextItems::Options(o) if !o.is_empty() => {
                o.pop();
            }
            _ => break,
        }
    }
}

/// Octets a response NEXT takes, padding included (RFC 6887 section 7.3).
fn next_len(n: &Next) -> usize {
    let items = match &n.items {
        NextItems::Options(o) => o.iter().map(PcpOption::wire_len).sum(),
        NextItems::Codes(c) => (c.len() + 3) & !3,
    };
    NEXT_MIN + items
}
