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

    /// Octets the option takes in a message: the 4-octet header, the data
    /// and its padding to a 4-octet boundary (RFC 6887 section 7.3). Lets a
    /// server size a response before building it (the 1100-octet limit of
    /// section 7).
    pub fn wire_len(&self) -> usize {
        let data = match self {
            PcpOption::ThirdParty(_) => 16,
            PcpOption::PreferFailure | PcpOption::CheckpointRequired => 0,
            PcpOption::Filter(_) => 20,
            PcpOption::Description(s) => s.len(),
            PcpOption::Next(n) => {
                NEXT_FIXED_LEN
                    + match &n.items {
                        NextItems::Codes(c) => c.len(),
                        NextItems::Options(o) => o.iter().map(PcpOption::wire_len).sum(),
                    }
            }
            PcpOption::Unknown { data, .. } => data.len(),
        };
        4 + ((data + 3) & !3)
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
        // RFC 7767 section 3.1: length 0, valid for MAP and PEER only. A
        // wrong length is malformed only where the option is valid, which
        // the codec cannot know (RFC 6887 section 7.3: an optional option
        // not valid for the opcode is ignored): it is kept as an unknown
        // option, and the server answers MALFORMED_OPTION for MAP and PEER.
        OptionCode::CHECKPOINT_REQUIRED if data.is_empty() => PcpOption::CheckpointRequired,
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

#[cfg(test)]
mod tests {
    //! One hand-written vector per option, both directions, then the ways an
    //! option can be malformed (RFC 6887 section 7.3: MALFORMED_OPTION).

    use super::*;
    use crate::{Disposition, ResultCode};

    fn unhex(s: &str) -> Vec<u8> {
        hex::decode(s.split_whitespace().collect::<String>()).unwrap()
    }

    const CP: CodePoints = CodePoints {
        get_opcode: crate::Opcode::GET,
        next_option: OptionCode::NEXT,
        nonexist_map: crate::ResultCode::NONEXIST_MAP,
    };

    /// `bytes` is exactly `opt`, in a message going `dir`.
    fn check(bytes: &str, dir: Direction, opt: PcpOption) {
        let bytes = unhex(bytes);
        assert_eq!(
            parse_options(&bytes, dir, &CP, false),
            Ok(vec![opt.clone()]),
            "parse"
        );
        let mut out = Vec::new();
        opt.emit(&CP, &mut out);
        assert_eq!(hex::encode(&out), hex::encode(&bytes), "encode");
        assert_eq!(opt.wire_len(), out.len(), "wire_len");
    }

    fn both(bytes: &str, opt: PcpOption) {
        check(bytes, Direction::Request, opt.clone());
        check(bytes, Direction::Response, opt);
    }

    fn err(bytes: &str, dir: Direction, code: u8, reason: &'static str) {
        let e = parse_options(&unhex(bytes), dir, &CP, false).unwrap_err();
        assert_eq!(
            e,
            ParseError::MalformedOption {
                code: OptionCode(code),
                reason
            }
        );
        assert_eq!(
            e.disposition(),
            Disposition::Respond(ResultCode::MALFORMED_OPTION)
        );
    }

    const WRONG_LEN: &str = "option length does not match its definition";

    #[test]
    fn rfc6887_s13_1_third_party_vector() {
        both(
            concat!(
                "01",                                  // option code 1 (THIRD_PARTY)
                "00",                                  // reserved
                "0010",                                // option length 16
                "20010db8 00000000 00000000 00000099", // internal IP 2001:db8::99
            ),
            PcpOption::ThirdParty("2001:db8::99".parse().unwrap()),
        );
    }

    #[test]
    fn rfc6887_s13_2_prefer_failure_vector() {
        both(
            "02 00 0000", // code 2 (PREFER_FAILURE), reserved, length 0
            PcpOption::PreferFailure,
        );
    }

    #[test]
    fn rfc6887_s13_3_filter_vector() {
        both(
            concat!(
                "03 00 0014",                          // code 3 (FILTER), reserved, length 20
                "00",                                  // reserved
                "78",                                  // prefix length 120 (an IPv4 /24)
                "0050",                                // remote peer port 80
                "00000000 00000000 0000ffff c6336400", // remote peer IP ::ffff:198.51.100.0
            ),
            PcpOption::Filter(Filter {
                prefix_len: 120,
                remote_port: 80,
                remote_ip: std::net::Ipv4Addr::new(198, 51, 100, 0).to_ipv6_mapped(),
            }),
        );
    }

    /// RFC 7220: free UTF-8, length without padding, zero padding to 4.
    #[test]
    fn rfc7220_description_vector_with_padding() {
        both(
            concat!(
                "80 00 0005", // code 128 (DESCRIPTION), reserved, length 5
                "68656c6c6f", // "hello"
                "000000",     // padding to a 4-octet boundary
            ),
            PcpOption::Description("hello".into()),
        );
        // Multi-octet UTF-8: "cafe" with e-acute is 5 octets.
        both(
            "80 00 0005 636166c3a9 000000",
            PcpOption::Description("caf\u{e9}".into()),
        );
        // Empty description: length 0, nothing else.
        both("80 00 0000", PcpOption::Description(String::new()));
        // Exactly 4 octets: no padding.
        both("80 00 0004 74657374", PcpOption::Description("test".into()));
    }

    #[test]
    fn rfc7767_s3_1_checkpoint_required_vector() {
        both(
            "c0 00 0000", // code 192 (CHECKPOINT_REQUIRED), reserved, length 0
            PcpOption::CheckpointRequired,
        );
        assert!(!OptionCode::CHECKPOINT_REQUIRED.is_mandatory());
    }

    #[test]
    fn rfc6887_s7_3_unknown_optional_option_vector() {
        both(
            "81 00 0003 aabbcc 00", // code 129 (unassigned, optional), length 3, data, padding
            PcpOption::Unknown {
                code: OptionCode(0x81),
                data: vec![0xaa, 0xbb, 0xcc],
            },
        );
        assert!(!OptionCode(0x81).is_mandatory());
    }

    #[test]
    fn rfc6887_s7_3_unknown_mandatory_option_vector() {
        both(
            "7f 00 0004 deadbeef", // code 127 (mandatory range), length 4, data
            PcpOption::Unknown {
                code: OptionCode(0x7f),
                data: vec![0xde, 0xad, 0xbe, 0xef],
            },
        );
        assert!(OptionCode(0x7f).is_mandatory());
        // PORT_SET (RFC 7753) is named but not interpreted.
        both(
            "82 00 0004 0010 c000",
            PcpOption::Unknown {
                code: OptionCode::PORT_SET,
                data: vec![0, 0x10, 0xc0, 0],
            },
        );
    }

    #[test]
    fn rfc6887_s7_3_reserved_and_padding_octets_ignored() {
        // Reserved octet and padding are "sent as 0, ignored when received".
        let bytes = unhex("80 ff 0001 41 ffffff");
        assert_eq!(
            parse_options(&bytes, Direction::Request, &CP, false),
            Ok(vec![PcpOption::Description("A".into())])
        );
    }

    #[test]
    fn draft_s4_4_next_request_codes_vector() {
        check(
            concat!(
                "60 00 002d",  // code 96 (NEXT), reserved, length 45 = 44 + 1 code
                "06 02 01 01", // TCP, internal AF IPv6, external AF IPv4, END
                "20010db8 00000000 00000000 00000010", // internal 2001:db8::10
                "cb007107 00000000 00000000 00000000", // external 203.0.113.7 + 96 zero bits
                "00000000",    // remaining lifetime (0 in requests)
                "0016 1f90",   // internal port 22, external port 8080
                "80",          // wanted: DESCRIPTION
                "000000",      // padding
            ),
            Direction::Request,
            PcpOption::Next(Next {
                protocol: Protocol::TCP,
                internal_af: crate::addr::AF_IPV6,
                external_af: crate::addr::AF_IPV4,
                more_end: NEXT_END,
                internal_ip: "2001:db8::10".parse().unwrap(),
                external_ip: "cb00:7107::".parse().unwrap(),
                lifetime: 0,
                internal_port: 22,
                external_port: 8080,
                items: NextItems::Codes(vec![OptionCode::DESCRIPTION]),
            }),
        );
    }

    #[test]
    fn draft_s4_4_next_response_embedded_options_vector() {
        let bytes = concat!(
            "60 00 0038", // NEXT, length 56 = 44 + 12
            "11 01 01 00",
            "c0000201 00000000 00000000 00000000", // internal 192.0.2.1
            "cb007107 00000000 00000000 00000000", // external 203.0.113.7
            "00000e10",                            // remaining lifetime 3600
            "1f90 c350",                           // 8080 -> 50000
            "c0 00 0000",                          // embedded CHECKPOINT_REQUIRED
            "80 00 0002 6869 0000",                // embedded DESCRIPTION "hi"
        );
        let next = Next {
            protocol: Protocol::UDP,
            internal_af: 1,
            external_af: 1,
            more_end: 0,
            internal_ip: "c000:201::".parse().unwrap(),
            external_ip: "cb00:7107::".parse().unwrap(),
            lifetime: 3600,
            internal_port: 8080,
            external_port: 50000,
            items: NextItems::Options(vec![
                PcpOption::CheckpointRequired,
                PcpOption::Description("hi".into()),
            ]),
        };
        check(bytes, Direction::Response, PcpOption::Next(next.clone()));
        // In a request the same tail is read as 12 one-octet codes.
        let parsed = parse_options(&unhex(bytes), Direction::Request, &CP, false).unwrap();
        let [PcpOption::Next(n)] = &parsed[..] else {
            panic!("{parsed:?}")
        };
        assert_eq!(
            n.items,
            NextItems::Codes(
                unhex("c0000000 80000002 68690000")
                    .into_iter()
                    .map(OptionCode)
                    .collect()
            )
        );
    }

    // --- MALFORMED_OPTION cases ---------------------------------------------

    #[test]
    fn rfc6887_s7_3_option_overruns_message() {
        // Length 8 but only 4 octets follow.
        err(
            "81 00 0008 00000000",
            Direction::Request,
            0x81,
            "option data overruns the message",
        );
        // Length 5 needs 8 with padding; only 5 follow (padding missing).
        err(
            "81 00 0005 0000000000",
            Direction::Request,
            0x81,
            "option data overruns the message",
        );
        // A length near 65535 must not overflow anything.
        err(
            "81 00 ffff 00000000",
            Direction::Response,
            0x81,
            "option data overruns the message",
        );
    }

    #[test]
    fn rfc6887_s7_3_option_header_truncated() {
        err("c0 00", Direction::Request, 0xc0, "option header truncated");
        // After a valid option.
        err(
            "02 00 0000 01",
            Direction::Request,
            0x01,
            "option header truncated",
        );
    }

    #[test]
    fn rfc6887_s13_wrong_option_lengths() {
        // THIRD_PARTY must be 16 octets (13.1).
        err(
            "01 00 000c 00000000 00000000 00000000",
            Direction::Request,
            1,
            WRONG_LEN,
        );
        err(
            "01 00 0014 00000000 00000000 00000000 00000000 00000000",
            Direction::Request,
            1,
            WRONG_LEN,
        );
        // PREFER_FAILURE carries no data (13.2).
        err("02 00 0004 00000000", Direction::Request, 2, WRONG_LEN);
        // FILTER must be 20 octets (13.3).
        err(
            "03 00 0010 00000000 00000000 00000000 00000000",
            Direction::Request,
            3,
            WRONG_LEN,
        );
    }

    #[test]
    fn rfc7767_s3_1_checkpoint_with_data_is_left_to_the_opcode() {
        // Length 0 is the option; with data it is kept as unknown, for the
        // server to reject on MAP/PEER and ignore elsewhere.
        for (bytes, data) in [
            ("c0 00 0004 01020304", vec![1, 2, 3, 4]),
            ("c0 00 0001 05000000", vec![5]),
        ] {
            let got = parse_options(&unhex(bytes), Direction::Request, &CP, false).unwrap();
            assert_eq!(
                got,
                vec![PcpOption::Unknown {
                    code: OptionCode::CHECKPOINT_REQUIRED,
                    data
                }]
            );
        }
    }

    #[test]
    fn rfc7220_description_must_be_utf8() {
        err(
            "80 00 0002 fffe 0000",
            Direction::Request,
            0x80,
            "DESCRIPTION is not UTF-8 (RFC 7220)",
        );
        // A UTF-8 sequence cut by the length is not UTF-8 either.
        err(
            "80 00 0001 c3a9 0000",
            Direction::Response,
            0x80,
            "DESCRIPTION is not UTF-8 (RFC 7220)",
        );
    }

    #[test]
    fn draft_s4_4_next_shorter_than_fixed_part() {
        let short = concat!(
            "60 00 0028",
            "00000000 00000000 00000000 00000000 00000000",
            "00000000 00000000 00000000 00000000 00000000"
        ); // length 40
        err(
            short,
            Direction::Request,
            0x60,
            "NEXT shorter than its 44-octet fixed part",
        );
        err(
            short,
            Direction::Response,
            0x60,
            "NEXT shorter than its 44-octet fixed part",
        );
    }

    #[test]
    fn draft_s4_4_next_nested_in_next() {
        let zeros44 = "00000000".repeat(11);
        // Outer length 92 = 44 + an inner NEXT of 4 + 44.
        let bytes = ["60 00 005c", &zeros44, "60 00 002c", &zeros44].concat();
        err(&bytes, Direction::Response, 0x60, "NEXT embedded in NEXT");
        // An embedded option that is itself malformed is reported as such.
        // Length 46: two octets of tail, then padding.
        let bytes = ["60 00 002e", &zeros44, "c0 00 0000"].concat();
        err(&bytes, Direction::Response, 0xc0, "option header truncated");
        let bytes = ["60 00 0034", &zeros44, "01 00 0004 00000000"].concat();
        err(&bytes, Direction::Response, 0x01, WRONG_LEN);
    }
}
