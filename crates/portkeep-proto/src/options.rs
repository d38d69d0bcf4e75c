//! PCP options (RFC 6887 section 7.3) and the option bodies this codec knows.
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |  Option Code  |  Reserved     |       Option Length           |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! :                       (optional) data                         :
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```
//!
//! The length counts the data without its padding to a 4-octet boundary.

use std::net::Ipv6Addr;

use crate::{CodePoints, OptionCode, ParseError, Protocol, NEXT_FIXED_LEN};

/// One PCP option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PcpOption {
    /// THIRD_PARTY (RFC 6887 section 13.1): the internal address the request
    /// is made for.
    ThirdParty(Ipv6Addr),
    /// PREFER_FAILURE (RFC 6887 section 13.2): fail rather than assign a
    /// different external address/port than suggested.
    PreferFailure,
    /// FILTER (RFC 6887 section 13.3).
    Filter(Filter),
    /// DESCRIPTION (RFC 7220): free UTF-8 text.
    Description(String),
    /// CHECKPOINT_REQUIRED (RFC 7767 section 3.1): no data.
    CheckpointRequired,
    /// NEXT (failure-scenarios draft section 4.4).
    Next(Next),
    /// An option this codec does not interpret, kept byte for byte.
    Unknown {
        /// The option code.
        code: OptionCode,
        /// The option data without padding.
        data: Vec<u8>,
    },
}

/// FILTER option data (RFC 6887 section 13.3).
///
/// ```text
/// |    Reserved   | Prefix Length |      Remote Peer Port         |
/// |               Remote Peer IP Address (128 bits)               |
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Filter {
    /// Prefix length over the 128-bit field (an IPv4 /24 is 120).
    pub prefix_len: u8,
    /// Remote port; 0 means all ports.
    pub remote_port: u16,
    /// Remote address (IPv4-mapped for IPv4).
    pub remote_ip: Ipv6Addr,
}

/// NEXT option data (failure-scenarios draft section 4.4).
///
/// ```text
/// |   Protocol    |  Internal_AF  |  External_AF  |   MORE/END    |
/// :        Mapping internal IP address (always 128 bits)          :
/// :        Mapping external IP address (always 128 bits)          :
/// |                  Mapping remaining lifetime                   |
/// |     Mapping internal port     |     Mapping external port     |
/// :                       Mapping Options                         :
/// ```
///
/// Addresses are in the draft's family form (see [`crate::addr::to_af_wire`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Next {
    /// Protocol of the mapping (or of the locator).
    pub protocol: Protocol,
    /// Address family of `internal_ip` (0 any, 1 IPv4, 2 IPv6).
    pub internal_af: u8,
    /// Address family of `external_ip`.
    pub external_af: u8,
    /// 0 means MORE; any other value END (1 recommended).
    pub more_end: u8,
    /// Internal address.
    pub internal_ip: Ipv6Addr,
    /// External address.
    pub external_ip: Ipv6Addr,
    /// Remaining lifetime in seconds (0 in requests).
    pub lifetime: u32,
    /// Internal port.
    pub internal_port: u16,
    /// External port.
    pub external_port: u16,
    /// The tail: option codes wanted (requests) or embedded options (responses).
    pub items: NextItems,
}

/// The variable tail of a NEXT option, whose format depends on direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NextItems {
    /// In a request: the codes of the options the client wants embedded
    /// (one octet each, like RFC 6887's former UNPROCESSED option).
    Codes(Vec<OptionCode>),
    /// In a response: the options of the returned mapping.
    Options(Vec<PcpOption>),
}

/// Value of the MORE/END field meaning END (draft section 4.4 recommends 1).
pub const NEXT_END: u8 = 1;

impl Next {
    /// Whether this is an END (rather than MORE) NEXT.
    pub fn is_end(&self) -> bool {
        self.more_end != 0
    }

    /// The "Undefined" locator: every field zero (draft section 4.4).
    pub fn is_undefined_locator(&self) -> bool {
        self.protocol.0 == 0
            && self.internal_af == 0
            && self.external_af == 0
            && self.internal_ip.is_unspecified()
            && self.external_ip.is_unspecified()
            && self.internal_port == 0
            && self.external_port == 0
    }
}

impl PcpOption {
    /// The option's wire code under the given code points.
    pub fn code(&self, cp: &CodePoints) -> OptionCode {
        match self {
            PcpOption::ThirdParty(_) => OptionCode::THIRD_PARTY,
            PcpOption::PreferFailure => OptionCode::PREFER_FAILURE,
            PcpOption::Filter(_) => OptionCode::FILTER,
            PcpOption::Description(_) => OptionCode::DESCRIPTION,
            PcpOption::CheckpointRequired => OptionCode::CHECKPOINT_REQUIRED,
            PcpOption::Next(_) => cp.next_option,
            PcpOption::Unknown { code, .. } => *code,
        }
    }

    /// Appends the option, padded to 4 octets.
    pub(crate) fn emit(&self, cp: &CodePoints, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[self.code(cp).0, 0, 0, 0]);
        match self {
            PcpOption::ThirdParty(ip) => out.extend_from_slice(&ip.octets()),
            PcpOption::PreferFailure | PcpOption::CheckpointRequired => {}
            PcpOption::Filter(f) => {
                out.extend_from_slice(&[0, f.prefix_len]);
                out.extend_from_slice(&f.remote_port.to_be_bytes());
                out.extend_from_slice(&f.remote_ip.octets());
            }
            PcpOption::Description(s) => out.extend_from_slice(s.as_bytes()),
            PcpOption::Next(n) => {
                out.extend_from_slice(&[n.protocol.0, n.internal_af, n.external_af, n.more_end]);
                out.extend_from_slice(&n.internal_ip.octets());
                out.extend_from_slice(&n.external_ip.octets());
                out.extend_from_slice(&n.lifetime.to_be_bytes());
                out.extend_from_slice(&n.internal_port.to_be_bytes());
                out.extend_from_slice(&n.external_port.to_be_bytes());
                match &n.items {
                    NextItems::Codes(codes) => out.extend(codes.iter().map(|c| c.0)),
                    NextItems::Options(opts) => {
                        for o in opts {
                            o.emit(cp, out);
                        }
                    }
                }
            }
            PcpOption::Unknown { data, .. } => out.extend_from_slice(data),
        }
        let data_len = out.len() - start - 4;
        // A longer option cannot fit in a 1100-octet message; encoding
        // rejects the whole message afterwards, so saturating is harmless.
        let len = u16::try_from(data_len).unwrap_or(u16::MAX);
        out[start + 2..start + 4].copy_from_slice(&len.to_be_bytes());
        out.resize(out.len() + (4 - data_len % 4) % 4, 0);
    }
}

/// Which way a message travels; NEXT's tail differs between the two.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    Request,
    Response,
}

/// Parses a sequence of options filling `buf` exactly (RFC 6887 section 7.3).
pub(crate) fn parse_options(
    mut buf: &[u8],
    dir: Direction,
    cp: &CodePoints,
    nested: bool,
) -> Result<Vec<PcpOption>, ParseError> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let code = OptionCode(buf[0]);
        let malformed = |reason| ParseError::MalformedOption { code, reason };
        if buf.len() < 4 {
            return Err(malformed("option header truncated"));
        }
        let len = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
        let padded = (len + 3) & !3;
        if buf.len() - 4 < padded {
            return Err(malformed("option data overruns the message"));
        }
        let data = &buf[4..4 + len];
        out.push(parse_option(code, data, dir, cp, nested)?);
        buf = &buf[4 + padded..];
    }
    Ok(out)
}

fn parse_option(
    code: OptionCode,
    data: &[u8],
    dir: Direction,
    cp: &CodePoints,
    nested: bool,
) -> Result<PcpOption, ParseError> {
    let malformed = |reason| ParseError::MalformedOption { code, reason };
    let exact = |n: usize| {
        if data.len() == n {
            Ok(())
        } else {
            Err(malformed("option length does not match its definition"))
        }
    };
    if code == cp.next_option {
        if nested {
            return Err(malformed("NEXT embedded in NEXT"));
        }
        if data.len() < NEXT_FIXED_LEN {
            return Err(malformed("NEXT shorter than its 44-octet fixed part"));
        }
        let tail = &data[NEXT_FIXED_LEN..];
        let items = match dir {
            Direction::Request => NextItems::Codes(tail.iter().copied().map(OptionCode).collect()),
            Direction::Response => NextItems::Options(parse_options(tail, dir, cp, true)?),
        };
        return Ok(PcpOption::Next(Next {
            protocol: Protocol(data[0]),
            internal_af: data[1],
            external_af: data[2],
            more_end: data[3],
            internal_ip: ip_at(data, 4),
            external_ip: ip_at(data, 20),
            lifetime: u32::from_be_bytes([data[36], data[37], data[38], data[39]]),
            internal_port: u16::from_be_bytes([data[40], data[41]]),
            external_port: u16::from_be_bytes([data[42], data[43]]),
            items,
        }));
    }
    Ok(match code {
        OptionCode::THIRD_PARTY => {
            exact(16)?;
            PcpOption::ThirdParty(ip_at(data, 0))
        }
        OptionCode::PREFER_FAILURE => {
            exact(0)?;
            PcpOption::PreferFailure
        }
        OptionCode::FILTER => {
            exact(20)?;
            PcpOption::Filter(Filter {
                prefix_len: data[1],
                remote_port: u16::from_be_bytes([data[2], data[3]]),
                remote_ip: ip_at(data, 4),
            })
        }
        OptionCode::DESCRIPTION => match std::str::from_utf8(data) {
            Ok(s) => PcpOption::Description(s.to_owned()),
            Err(_) => return Err(malformed("DESCRIPTION is not UTF-8 (RFC 7220)")),
        },
        OptionCode::CHECKPOINT_REQUIRED => {
            exact(0)?;
            PcpOption::CheckpointRequired
        }
        _ => PcpOption::Unknown {
            code,
            data: data.to_vec(),
        },
    })
}

/// Reads a 128-bit address at `off`; callers have checked the length.
pub(crate) fn ip_at(buf: &[u8], off: usize) -> Ipv6Addr {
    let mut b = [0u8; 16];
    b.copy_from_slice(&buf[off..off + 16]);
    Ipv6Addr::from(b)
}
