//! Retrieving mappings with GET / NEXT (PCP failure-scenarios draft,
//! section 4): [`Walker`], a sans-IO walk of the server's table, and the
//! requests for a "pure" GET of one mapping.
//!
//! A walk (draft section 4.5) sends MORE requests: the first with the
//! Undefined locator, each next one with a Defined locator copied from
//! the last mapping received (lifetime and options reset). Section 4.6
//! has the server start its answer with the mapping equal to the locator
//! when it still exists, so the walker drops a first NEXT equal to the
//! locator (section 4.3 equality): it was returned already. The walk ends
//! on a NEXT marked END, or on NONEXIST_MAP (nothing matches any more
//! from the locator on).

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use portkeep_proto::addr::{from_af_wire, from_wire, to_af_wire, to_wire};
use portkeep_proto::{
    CodePoints, GetData, Next, NextItems, OpData, OptionCode, PcpOption, Protocol, Request,
    RequestHeader, Response, ResultCode, NEXT_END,
};

/// What to retrieve: the GET filter (draft section 4.1; `None` and 0 are
/// wildcards), the host to act for, and the options to embed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GetFilter {
    /// Protocol; [`Protocol::ALL`] for any.
    pub protocol: Protocol,
    /// Internal address.
    pub internal_ip: Option<IpAddr>,
    /// Internal port; needs a protocol (section 4.1).
    pub internal_port: u16,
    /// External address.
    pub external_ip: Option<IpAddr>,
    /// External port; needs a protocol (section 4.1).
    pub external_port: u16,
    /// Retrieve this host's mappings (THIRD_PARTY option; the server
    /// must authorise the client, RFC 6887 section 13.1).
    pub third_party: Option<IpAddr>,
    /// Option codes to embed in each returned mapping (section 4.4).
    pub options: Vec<OptionCode>,
}

impl Default for GetFilter {
    /// Everything visible to the client, no options embedded.
    fn default() -> Self {
        GetFilter {
            protocol: Protocol::ALL,
            internal_ip: None,
            internal_port: 0,
            external_ip: None,
            external_port: 0,
            third_party: None,
            options: Vec::new(),
        }
    }
}

impl GetFilter {
    /// Everything visible to the client, with FILTER, DESCRIPTION,
    /// THIRD_PARTY and CHECKPOINT_REQUIRED embedded.
    pub fn all() -> GetFilter {
        GetFilter {
            options: vec![
                OptionCode::FILTER,
                OptionCode::DESCRIPTION,
                OptionCode::THIRD_PARTY,
                OptionCode::CHECKPOINT_REQUIRED,
            ],
            ..GetFilter::default()
        }
    }

    /// The GET body (section 4.1: families say which address form).
    pub fn get_data(&self) -> GetData {
        let side = |ip: Option<IpAddr>| ip.map_or((0, Ipv6Addr::UNSPECIFIED), to_af_wire);
        let (internal_af, internal_ip) = side(self.internal_ip);
        let (external_af, external_ip) = side(self.external_ip);
        GetData {
            protocol: self.protocol,
            internal_af,
            external_af,
            internal_ip,
            external_ip,
            internal_port: self.internal_port,
            external_port: self.external_port,
        }
    }

    /// A GET request carrying `next`, from `client_ip`.
    fn request(&self, client_ip: IpAddr, next: Next) -> Request {
        let mut options = Vec::new();
        if let Some(tp) = self.third_party {
            options.push(PcpOption::ThirdParty(to_wire(tp)));
        }
        options.push(PcpOption::Next(next));
        Request {
            header: RequestHeader {
                lifetime: 0,
                client_ip: to_wire(client_ip),
            },
            data: OpData::Get(self.get_data()),
            options,
        }
    }

    /// A "pure" GET (section 4.5): END, Undefined locator, the filter
    /// naming the mapping.
    pub fn pure_get(&self, client_ip: IpAddr) -> Request {
        self.request(client_ip, undefined_locator(true, self.options.clone()))
    }
}

fn undefined_locator(end: bool, codes: Vec<OptionCode>) -> Next {
    Next {
        protocol: Protocol::ALL,
        internal_af: 0,
        external_af: 0,
        more_end: if end { NEXT_END } else { 0 },
        internal_ip: Ipv6Addr::UNSPECIFIED,
        external_ip: Ipv6Addr::UNSPECIFIED,
        lifetime: 0,
        internal_port: 0,
        external_port: 0,
        items: NextItems::Codes(codes),
    }
}

/// One mapping retrieved with GET (a response NEXT, section 4.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappedEntry {
    /// Protocol.
    pub protocol: Protocol,
    /// Internal address and port.
    pub internal: SocketAddr,
    /// External address and port.
    pub external: SocketAddr,
    /// Remaining lifetime in seconds when the server answered.
    pub lifetime: u32,
    /// The embedded options asked for that the mapping has.
    pub options: Vec<PcpOption>,
}

impl MappedEntry {
    /// Reads a response NEXT; `None` if its families or addresses are
    /// not a mapping's (section 4.4).
    pub fn from_next(n: &Next) -> Option<MappedEntry> {
        let internal = from_af_wire(n.internal_af, n.internal_ip).ok()??;
        let external = from_af_wire(n.external_af, n.external_ip).ok()??;
        let options = match &n.items {
            NextItems::Options(o) => o.clone(),
            NextItems::Codes(_) => Vec::new(),
        };
        Some(MappedEntry {
            protocol: n.protocol,
            internal: SocketAddr::new(internal, n.internal_port),
            external: SocketAddr::new(external, n.external_port),
            lifetime: n.lifetime,
            options,
        })
    }

    /// The DESCRIPTION (RFC 7220), if embedded.
    pub fn description(&self) -> Option<&str> {
        self.options.iter().find_map(|o| match o {
            PcpOption::Description(d) => Some(d.as_str()),
            _ => None,
        })
    }

    /// Whether CHECKPOINT_REQUIRED was embedded (RFC 7767: check-pointed).
    pub fn checkpoint(&self) -> bool {
        self.options
            .iter()
            .any(|o| matches!(o, PcpOption::CheckpointRequired))
    }

    /// The THIRD_PARTY host, if embedded (mapping made with THIRD_PARTY).
    pub fn third_party(&self) -> Option<IpAddr> {
        self.options.iter().find_map(|o| match o {
            PcpOption::ThirdParty(ip) => Some(from_wire(*ip)),
            _ => None,
        })
    }
}

/// Why a walk stopped short.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WalkError {
    /// The server answered SUCCESS to a MORE request without a NEXT
    /// (section 4.6 says at least one comes back).
    #[error("GET response without NEXT")]
    NoNext,
    /// A NEXT whose families or addresses are not a mapping's.
    #[error("malformed NEXT in a GET response")]
    BadNext,
    /// A response that returned nothing new and did not end the walk: the
    /// walk would loop.
    #[error("GET response made no progress")]
    NoProgress,
}

/// A walk of the server's mapping table, sans-IO: ask
/// [`Walker::request`] for the next GET, send it as a transaction, feed
/// the response to [`Walker::handle`], until [`Walker::is_done`].
#[derive(Debug, Clone)]
pub struct Walker {
    filter: GetFilter,
    locator: Option<Next>,
    done: bool,
    requests: u32,
}

impl Walker {
    /// A walk over the mappings matching `filter`.
    pub fn new(filter: GetFilter) -> Walker {
        Walker {
            filter,
            locator: None,
            done: false,
            requests: 0,
        }
    }

    /// Whether the walk has ended.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// GET requests made so far.
    pub fn requests(&self) -> u32 {
        self.requests
    }

    /// The next GET request (MORE), or `None` once the walk is over.
    pub fn request(&mut self, client_ip: IpAddr) -> Option<Request> {
        if self.done {
            return None;
        }
        self.requests += 1;
        let codes = self.filter.options.clone();
        let next = match &self.locator {
            None => undefined_locator(false, codes),
            // Section 4.5: "a copy of the last returned mapping with the
            // Lifetime and Option fields reseted".
            Some(l) => Next {
                more_end: 0,
                lifetime: 0,
                items: NextItems::Codes(codes),
                ..l.clone()
            },
        };
        Some(self.filter.request(client_ip, next))
    }

    /// Takes the response to the last request; returns the mappings it
    /// brought that the walk had not returned yet. NONEXIST_MAP ends the
    /// walk (section 4.6); other error results are the caller's to report.
    pub fn handle(
        &mut self,
        response: &Response,
        cp: &CodePoints,
    ) -> Result<Vec<MappedEntry>, WalkError> {
        if response.header.result == cp.nonexist_map {
            self.done = true;
            return Ok(Vec::new());
        }
        if response.header.result != ResultCode::SUCCESS {
            self.done = true;
            return Ok(Vec::new());
        }
        let nexts: Vec<&Next> = response
            .options
            .iter()
            .filter_map(|o| match o {
                PcpOption::Next(n) => Some(n),
                _ => None,
            })
            .collect();
        let Some(last) = nexts.last() else {
            self.done = true;
            return Err(WalkError::NoNext);
        };
        let mut out = Vec::with_capacity(nexts.len());
        for (i, n) in nexts.iter().enumerate() {
            if i == 0 && self.locator.as_ref().is_some_and(|l| same_mapping(l, n)) {
                continue;
            }
            out.push(MappedEntry::from_next(n).ok_or(WalkError::BadNext)?);
        }
        if last.is_end() {
            self.done = true;
        } else if out.is_empty() {
            self.done = true;
            return Err(WalkError::NoProgress);
        }
        self.locator = Some((*last).clone());
        Ok(out)
    }
}

/// Section 4.3 equality: protocol, families, addresses and ports.
pub fn same_mapping(a: &Next, b: &Next) -> bool {
    (
        a.protocol,
        a.internal_af,
        a.external_af,
        a.internal_ip,
        a.external_ip,
        a.internal_port,
        a.external_port,
    ) == (
        b.protocol,
        b.internal_af,
        b.external_af,
        b.internal_ip,
        b.external_ip,
        b.internal_port,
        b.external_port,
    )
}
