//! PCP requests and responses (RFC 6887 sections 7.1, 7.2) and the opcode
//! bodies: MAP (section 11.1), PEER (section 12.1), ANNOUNCE (section 14.1)
//! and GET (failure-scenarios draft section 4.1).

use std::net::Ipv6Addr;

use crate::options::{ip_at, parse_options, Direction};
use crate::{
    CodePoints, Nonce, Opcode, ParseError, PcpOption, Protocol, ResultCode, GET_BODY_LEN,
    HEADER_LEN, MAP_BODY_LEN, MAX_MESSAGE_LEN, NONCE_LEN, PEER_BODY_LEN, VERSION,
};

/// MAP opcode body (RFC 6887 section 11.1).
///
/// ```text
/// |                 Mapping Nonce (96 bits)                       |
/// |   Protocol    |          Reserved (24 bits)                   |
/// |        Internal Port          |    Suggested External Port    |
/// :           Suggested External IP Address (128 bits)            :
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MapData {
    /// Random nonce tying renewals and deletes to the creator (section 11.1).
    pub nonce: Nonce,
    /// IANA protocol number; 0 means all protocols.
    pub protocol: Protocol,
    /// Internal port; 0 means all ports.
    pub internal_port: u16,
    /// Suggested (request) or assigned (response) external port.
    pub external_port: u16,
    /// Suggested (request) or assigned (response) external address.
    pub external_ip: Ipv6Addr,
}

/// PEER opcode body (RFC 6887 section 12.1): the MAP fields, then
///
/// ```text
/// |       Remote Peer Port        |     Reserved (16 bits)        |
/// :               Remote Peer IP Address (128 bits)               :
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerData {
    /// The MAP-shaped part of the body.
    pub map: MapData,
    /// Remote peer port.
    pub remote_port: u16,
    /// Remote peer address.
    pub remote_ip: Ipv6Addr,
}

/// GET opcode body (failure-scenarios draft section 4.1): a filter in which
/// zero means "any".
///
/// ```text
/// |   Protocol    |  Internal_AF  |  External_AF  |   Reserved    |
/// :          Filter internal IP address (always 128 bits)         :
/// :          Filter external IP address (always 128 bits)         :
/// |     Filter internal port      |     Filter external port      |
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GetData {
    /// Protocol filter; 0 = any.
    pub protocol: Protocol,
    /// Address family of `internal_ip`; 0 = any.
    pub internal_af: u8,
    /// Address family of `external_ip`; 0 = any.
    pub external_af: u8,
    /// Internal address filter, in the draft's family form.
    pub internal_ip: Ipv6Addr,
    /// External address filter, in the draft's family form.
    pub external_ip: Ipv6Addr,
    /// Internal port filter; 0 = any.
    pub internal_port: u16,
    /// External port filter; 0 = any.
    pub external_port: u16,
}

/// The opcode and its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpData {
    /// ANNOUNCE has no body (RFC 6887 section 14.1).
    Announce,
    /// MAP.
    Map(MapData),
    /// PEER.
    Peer(PeerData),
    /// GET (opcode from [`CodePoints::get_opcode`]).
    Get(GetData),
    /// An opcode this codec does not know, or an error response whose body
    /// is too short for its opcode or whose options do not parse (it copies
    /// a request that failed to parse): everything after the header, verbatim.
    Opaque {
        /// The opcode.
        opcode: Opcode,
        /// The octets after the common header.
        payload: Vec<u8>,
    },
}

impl OpData {
    /// The opcode on the wire.
    pub fn opcode(&self, cp: &CodePoints) -> Opcode {
        match self {
            OpData::Announce => Opcode::ANNOUNCE,
            OpData::Map(_) => Opcode::MAP,
            OpData::Peer(_) => Opcode::PEER,
            OpData::Get(_) => cp.get_opcode,
            OpData::Opaque { opcode, .. } => *opcode,
        }
    }

    /// The MAP-shaped part of a MAP or PEER body.
    pub fn map_part(&self) -> Option<&MapData> {
        match self {
            OpData::Map(m) => Some(m),
            OpData::Peer(p) => Some(&p.map),
            _ => None,
        }
    }

    /// Appends the body as it goes on the wire after the common header
    /// (reserved fields zero).
    pub fn emit_body(&self, out: &mut Vec<u8>) {
        self.emit(out);
    }

    fn emit(&self, out: &mut Vec<u8>) {
        match self {
            OpData::Announce => {}
            OpData::Map(m) => emit_map(m, out),
            OpData::Peer(p) => {
                emit_map(&p.map, out);
                out.extend_from_slice(&p.remote_port.to_be_bytes());
                out.extend_from_slice(&[0, 0]);
                out.extend_from_slice(&p.remote_ip.octets());
            }
            OpData::Get(g) => {
                out.extend_from_slice(&[g.protocol.0, g.internal_af, g.external_af, 0]);
                out.extend_from_slice(&g.internal_ip.octets());
                out.extend_from_slice(&g.external_ip.octets());
                out.extend_from_slice(&g.internal_port.to_be_bytes());
                out.extend_from_slice(&g.external_port.to_be_bytes());
            }
            OpData::Opaque { payload, .. } => out.extend_from_slice(payload),
        }
    }
}

fn emit_map(m: &MapData, out: &mut Vec<u8>) {
    out.extend_from_slice(&m.nonce);
    out.extend_from_slice(&[m.protocol.0, 0, 0, 0]);
    out.extend_from_slice(&m.internal_port.to_be_bytes());
    out.extend_from_slice(&m.external_port.to_be_bytes());
    out.extend_from_slice(&m.external_ip.octets());
}

fn parse_map(b: &[u8]) -> MapData {
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&b[..NONCE_LEN]);
    MapData {
        nonce,
        protocol: Protocol(b[12]),
        internal_port: u16::from_be_bytes([b[16], b[17]]),
        external_port: u16::from_be_bytes([b[18], b[19]]),
        external_ip: ip_at(b, 20),
    }
}

/// Splits `body` into the opcode's fixed body and the options after it.
/// `Ok(None)` for opcodes whose layout we do not know.
fn parse_body<'a>(
    opcode: Opcode,
    body: &'a [u8],
    cp: &CodePoints,
) -> Result<Option<(OpData, &'a [u8])>, ParseError> {
    let need = if opcode == cp.get_opcode {
        GET_BODY_LEN
    } else {
        match opcode {
            Opcode::ANNOUNCE => 0,
            Opcode::MAP => MAP_BODY_LEN,
            Opcode::PEER => PEER_BODY_LEN,
            _ => return Ok(None),
        }
    };
    if body.len() < need {
        return Err(ParseError::Malformed("message too short for its opcode"));
    }
    let (b, rest) = body.split_at(need);
    let data = if opcode == cp.get_opcode {
        OpData::Get(GetData {
            protocol: Protocol(b[0]),
            internal_af: b[1],
            external_af: b[2],
            internal_ip: ip_at(b, 4),
            external_ip: ip_at(b, 20),
            internal_port: u16::from_be_bytes([b[36], b[37]]),
            external_port: u16::from_be_bytes([b[38], b[39]]),
        })
    } else {
        match opcode {
            Opcode::ANNOUNCE => OpData::Announce,
            Opcode::MAP => OpData::Map(parse_map(b)),
            _ => OpData::Peer(PeerData {
                map: parse_map(b),
                remote_port: u16::from_be_bytes([b[36], b[37]]),
                remote_ip: ip_at(b, 40),
            }),
        }
    };
    Ok(Some((data, rest)))
}

/// Checks what RFC 6887 section 7 and 8.3 require of every message's size.
fn check_length(len: usize) -> Result<(), ParseError> {
    if len > MAX_MESSAGE_LEN {
        return Err(ParseError::Malformed("longer than 1100 octets"));
    }
    if len < HEADER_LEN {
        return Err(ParseError::Malformed("shorter than the 24-octet header"));
    }
    if !len.is_multiple_of(4) {
        return Err(ParseError::Malformed("length not a multiple of 4"));
    }
    Ok(())
}

/// Error from building a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The encoded message would exceed 1100 octets (RFC 6887 section 7).
    #[error("encoded message is {0} octets, over the 1100-octet limit")]
    TooLong(usize),
}

/// The request header fields (RFC 6887 section 7.1).
///
/// ```text
/// |  Version = 2  |R|   Opcode    |         Reserved              |
/// |                 Requested Lifetime (32 bits)                  |
/// :            PCP Client's IP Address (128 bits)                 :
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Requested lifetime in seconds.
    pub lifetime: u32,
    /// The client's own address as it believes it to be.
    pub client_ip: Ipv6Addr,
}

/// A PCP request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Header fields.
    pub header: RequestHeader,
    /// Opcode and body.
    pub data: OpData,
    /// Options, in wire order.
    pub options: Vec<PcpOption>,
}

impl Request {
    /// Parses a request, checking in the order of RFC 6887 section 8.3:
    /// size and direction (drop), version, length, opcode body, options.
    ///
    /// A known opcode with an unknown layout never occurs; an unknown opcode
    /// yields [`OpData::Opaque`] so the server can answer UNSUPP_OPCODE.
    pub fn parse(buf: &[u8], cp: &CodePoints) -> Result<Request, ParseError> {
        if buf.len() < 2 {
            return Err(ParseError::Runt(buf.len()));
        }
        if buf[1] & 0x80 != 0 {
            return Err(ParseError::WrongDirection(true));
        }
        if buf[0] != VERSION {
            return Err(ParseError::UnsupportedVersion(buf[0]));
        }
        check_length(buf.len())?;
        let opcode = Opcode(buf[1] & 0x7f);
        let header = RequestHeader {
            lifetime: u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]),
            client_ip: ip_at(buf, 8),
        };
        let body = &buf[HEADER_LEN..];
        let Some((data, rest)) = parse_body(opcode, body, cp)? else {
            return Ok(Request {
                header,
                data: OpData::Opaque {
                    opcode,
                    payload: body.to_vec(),
                },
                options: Vec::new(),
            });
        };
        let options = parse_options(rest, Direction::Request, cp, false)?;
        Ok(Request {
            header,
            data,
            options,
        })
    }

    /// Appends the encoded request to `out`.
    pub fn encode(&self, cp: &CodePoints, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let start = out.len();
        out.extend_from_slice(&[VERSION, self.data.opcode(cp).0 & 0x7f, 0, 0]);
        out.extend_from_slice(&self.header.lifetime.to_be_bytes());
        out.extend_from_slice(&self.header.client_ip.octets());
        self.data.emit(out);
        for o in &self.options {
            o.emit(cp, out);
        }
        finish(out, start)
    }

    /// Encodes into a new buffer.
    pub fn to_bytes(&self, cp: &CodePoints) -> Result<Vec<u8>, EncodeError> {
        let mut v = Vec::with_capacity(HEADER_LEN + PEER_BODY_LEN);
        self.encode(cp, &mut v)?;
        Ok(v)
    }
}

fn finish(out: &mut Vec<u8>, start: usize) -> Result<(), EncodeError> {
    let len = out.len() - start;
    if len > MAX_MESSAGE_LEN {
        out.truncate(start);
        return Err(EncodeError::TooLong(len));
    }
    // Opaque payloads are the only part not already 4-aligned.
    out.resize(start + ((len + 3) & !3), 0);
    Ok(())
}

/// The response header fields (RFC 6887 section 7.2).
///
/// ```text
/// |  Version = 2  |R|   Opcode    |   Reserved    |  Result Code  |
/// |                      Lifetime (32 bits)                       |
/// |                     Epoch Time (32 bits)                      |
/// :                      Reserved (96 bits)                       :
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseHeader {
    /// Result code.
    pub result: ResultCode,
    /// Granted lifetime (success) or error lifetime (failure), in seconds.
    pub lifetime: u32,
    /// The server's epoch time (section 8.5).
    pub epoch: u32,
}

/// A PCP response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Header fields.
    pub header: ResponseHeader,
    /// Opcode and body.
    pub data: OpData,
    /// Options, in wire order.
    pub options: Vec<PcpOption>,
}

impl Response {
    /// Parses a response (RFC 6887 section 8.3, client side).
    ///
    /// An error response whose body is too short for its opcode, or whose
    /// options do not parse, parses as [`OpData::Opaque`], as does an
    /// unknown opcode; the client still learns the result code. Both happen
    /// in conforming traffic: an error response is a copy of the request
    /// (RFC 6887 sections 7.2 and 8.3), so a MALFORMED_OPTION answer carries
    /// the very option that was malformed, and the answer to an over-long
    /// request is cut at 1100 octets, possibly inside an option.
    pub fn parse(buf: &[u8], cp: &CodePoints) -> Result<Response, ParseError> {
        if buf.len() < 2 {
            return Err(ParseError::Runt(buf.len()));
        }
        if buf[1] & 0x80 == 0 {
            return Err(ParseError::WrongDirection(false));
        }
        if buf[0] != VERSION {
            return Err(ParseError::UnsupportedVersion(buf[0]));
        }
        check_length(buf.len())?;
        let opcode = Opcode(buf[1] & 0x7f);
        let header = ResponseHeader {
            result: ResultCode(buf[3]),
            lifetime: u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]),
            epoch: u32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]),
        };
        let body = &buf[HEADER_LEN..];
        let opaque = || OpData::Opaque {
            opcode,
            payload: body.to_vec(),
        };
        let parsed = match parse_body(opcode, body, cp) {
            Ok(p) => p,
            Err(_) if header.result != ResultCode::SUCCESS => None,
            Err(e) => return Err(e),
        };
        let Some((data, rest)) = parsed else {
            return Ok(Response {
                header,
                data: opaque(),
                options: Vec::new(),
            });
        };
        let options = match parse_options(rest, Direction::Response, cp, false) {
            Ok(o) => o,
            Err(_) if header.result != ResultCode::SUCCESS => {
                return Ok(Response {
                    header,
                    data: opaque(),
                    options: Vec::new(),
                })
            }
            Err(e) => return Err(e),
        };
        Ok(Response {
            header,
            data,
            options,
        })
    }

    /// Appends the encoded response to `out`.
    pub fn encode(&self, cp: &CodePoints, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let start = out.len();
        out.extend_from_slice(&[
            VERSION,
            0x80 | self.data.opcode(cp).0,
            0,
            self.header.result.0,
        ]);
        out.extend_from_slice(&self.header.lifetime.to_be_bytes());
        out.extend_from_slice(&self.header.epoch.to_be_bytes());
        out.extend_from_slice(&[0; 12]);
        self.data.emit(out);
        for o in &self.options {
            o.emit(cp, out);
        }
        finish(out, start)
    }

    /// Encodes into a new buffer.
    pub fn to_bytes(&self, cp: &CodePoints) -> Result<Vec<u8>, EncodeError> {
        let mut v = Vec::with_capacity(HEADER_LEN + PEER_BODY_LEN);
        self.encode(cp, &mut v)?;
        Ok(v)
    }

    /// Whether the response carries CHECKPOINT_REQUIRED (RFC 7767 section 3.2:
    /// the server honoured the check-point request).
    pub fn checkpoint_honoured(&self) -> bool {
        self.options
            .iter()
            .any(|o| matches!(o, PcpOption::CheckpointRequired))
    }
}

/// Builds an error response by copying the request (RFC 6887 sections 7.2
/// and 8.3): the first 1100 octets of the request, R set, the result code,
/// lifetime and epoch filled in. The 96 reserved bits thereby carry the last
/// 96 bits of the client's address field, as section 7.2 asks for requests
/// that were not successfully parsed. A request too short for a header is
/// zero-padded to one; any length is rounded up to a multiple of 4.
pub fn build_error_response(
    request: &[u8],
    result: ResultCode,
    lifetime: u32,
    epoch: u32,
    out: &mut Vec<u8>,
) {
    let start = out.len();
    let n = request.len().min(MAX_MESSAGE_LEN);
    out.extend_from_slice(&request[..n]);
    let len = ((n.max(HEADER_LEN)) + 3) & !3;
    out.resize(start + len, 0);
    let h = &mut out[start..];
    h[0] = VERSION;
    h[1] |= 0x80;
    h[2] = 0;
    h[3] = result.0;
    h[4..8].copy_from_slice(&lifetime.to_be_bytes());
    h[8..12].copy_from_slice(&epoch.to_be_bytes());
}

#[cfg(test)]
mod tests {
    //! Byte-exact vectors written by hand from the RFC 6887 layouts (and the
    //! failure-scenarios draft for GET/NEXT); every vector is checked in both
    //! directions.

    use super::*;
    use crate::{Disposition, Filter, Next, NextItems, OptionCode, NEXT_END};

    /// Hex with whitespace allowed, so a vector can be split field by field.
    fn unhex(s: &str) -> Vec<u8> {
        hex::decode(s.split_whitespace().collect::<String>()).unwrap()
    }

    fn ip(s: &str) -> Ipv6Addr {
        match s.parse::<std::net::IpAddr>().unwrap() {
            std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            std::net::IpAddr::V6(v6) => v6,
        }
    }

    const CP: CodePoints = CodePoints {
        get_opcode: Opcode::GET,
        next_option: crate::OptionCode::NEXT,
        nonexist_map: ResultCode::NONEXIST_MAP,
    };

    const NONCE: Nonce = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];

    fn check_request(bytes: &[u8], expected: &Request) {
        assert_eq!(Request::parse(bytes, &CP).as_ref(), Ok(expected), "parse");
        assert_eq!(expected.to_bytes(&CP).unwrap(), bytes, "encode");
    }

    fn check_response(bytes: &[u8], expected: &Response) {
        assert_eq!(Response::parse(bytes, &CP).as_ref(), Ok(expected), "parse");
        assert_eq!(expected.to_bytes(&CP).unwrap(), bytes, "encode");
    }

    // --- RFC 6887 section 11.1: MAP ---------------------------------------

    const MAP_REQUEST: &str = concat!(
        "02",                                  // version 2
        "01",                                  // R=0, opcode 1 (MAP)
        "0000",                                // reserved
        "00001c20",                            // requested lifetime 7200 s
        "00000000 00000000 0000ffff c0000201", // client IP ::ffff:192.0.2.1
        "01020304 05060708 090a0b0c",          // mapping nonce (96 bits)
        "11",                                  // protocol 17 (UDP)
        "000000",                              // reserved (24 bits)
        "1f90",                                // internal port 8080
        "0000",                                // suggested external port 0 (none)
        "00000000 00000000 0000ffff 00000000", // suggested external IP ::ffff:0.0.0.0
    );

    fn map_request() -> Request {
        Request {
            header: RequestHeader {
                lifetime: 7200,
                client_ip: ip("192.0.2.1"),
            },
            data: OpData::Map(MapData {
                nonce: NONCE,
                protocol: Protocol::UDP,
                internal_port: 8080,
                external_port: 0,
                external_ip: ip("0.0.0.0"),
            }),
            options: vec![],
        }
    }

    #[test]
    fn rfc6887_s11_1_map_request_vector() {
        let bytes = unhex(MAP_REQUEST);
        assert_eq!(bytes.len(), HEADER_LEN + MAP_BODY_LEN);
        check_request(&bytes, &map_request());
    }

    #[test]
    fn rfc6887_s11_1_map_response_vector() {
        let bytes = unhex(concat!(
            "02",                                  // version 2
            "81",                                  // R=1, opcode 1 (MAP)
            "00",                                  // reserved
            "00",                                  // result code 0 (SUCCESS)
            "00000e10",                            // lifetime 3600 s
            "0000012c",                            // epoch time 300
            "00000000 00000000 00000000",          // reserved (96 bits)
            "01020304 05060708 090a0b0c",          // mapping nonce
            "06",                                  // protocol 6 (TCP)
            "000000",                              // reserved
            "1f90",                                // internal port 8080
            "c350",                                // assigned external port 50000
            "00000000 00000000 0000ffff cb007107", // assigned external IP ::ffff:203.0.113.7
        ));
        let expected = Response {
            header: ResponseHeader {
                result: ResultCode::SUCCESS,
                lifetime: 3600,
                epoch: 300,
            },
            data: OpData::Map(MapData {
                nonce: NONCE,
                protocol: Protocol::TCP,
                internal_port: 8080,
                external_port: 50000,
                external_ip: ip("203.0.113.7"),
            }),
            options: vec![],
        };
        check_response(&bytes, &expected);
        assert!(!expected.checkpoint_honoured());
    }

    /// A MAP request carrying every RFC 6887 section 13 option plus RFC 7220
    /// DESCRIPTION and RFC 7767 CHECKPOINT_REQUIRED, in wire order.
    #[test]
    fn rfc6887_s13_map_request_with_options_vector() {
        let bytes = unhex(concat!(
            "02 01 0000",                          // version 2, MAP request, reserved
            "00001c20",                            // requested lifetime 7200
            "00000000 00000000 0000ffff c0000201", // client IP ::ffff:192.0.2.1
            "01020304 05060708 090a0b0c",          // nonce
            "11 000000",                           // UDP, reserved
            "1f90 0000",                           // internal port 8080, suggested external 0
            "00000000 00000000 0000ffff 00000000", // suggested external IP ::ffff:0.0.0.0
            // THIRD_PARTY (13.1): code 1, reserved, length 16, internal IP
            "01 00 0010",
            "00000000 00000000 0000ffff c0000263", // ::ffff:192.0.2.99
            // PREFER_FAILURE (13.2): code 2, reserved, length 0
            "02 00 0000",
            // FILTER (13.3): code 3, reserved, length 20
            "03 00 0014",
            "00 78 01bb", // reserved, prefix length 120, remote peer port 443
            "00000000 00000000 0000ffff c6336400", // remote peer IP ::ffff:198.51.100.0
            // DESCRIPTION (RFC 7220): code 128, length 3, "web", 1 octet padding
            "80 00 0003 776562 00",
            // CHECKPOINT_REQUIRED (RFC 7767 section 3.1): code 192, length 0
            "c0 00 0000",
        ));
        assert_eq!(bytes.len(), 60 + 20 + 4 + 24 + 8 + 4);
        let mut expected = map_request();
        expected.options = vec![
            PcpOption::ThirdParty(ip("192.0.2.99")),
            PcpOption::PreferFailure,
            PcpOption::Filter(Filter {
                prefix_len: 120,
                remote_port: 443,
                remote_ip: ip("198.51.100.0"),
            }),
            PcpOption::Description("web".into()),
            PcpOption::CheckpointRequired,
        ];
        check_request(&bytes, &expected);
    }

    // --- RFC 6887 section 12.1: PEER --------------------------------------

    const PEER_BODY: &str = concat!(
        "a1a2a3a4 a5a6a7a8 a9aaabac",          // mapping nonce
        "06 000000",                           // protocol 6 (TCP), reserved
        "c000",                                // internal port 49152
        "0000",                                // suggested external port 0
        "00000000 00000000 00000000 00000000", // suggested external IP ::
        "01bb",                                // remote peer port 443
        "0000",                                // reserved (16 bits)
        "20010db8 00000000 00000000 00000080", // remote peer IP 2001:db8::80
    );

    fn peer_data(external_port: u16, external_ip: Ipv6Addr) -> OpData {
        OpData::Peer(PeerData {
            map: MapData {
                nonce: [
                    0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0xa8, 0xa9, 0xaa, 0xab, 0xac,
                ],
                protocol: Protocol::TCP,
                internal_port: 49152,
                external_port,
                external_ip,
            },
            remote_port: 443,
            remote_ip: ip("2001:db8::80"),
        })
    }

    #[test]
    fn rfc6887_s12_1_peer_request_vector() {
        let bytes = unhex(
            &[
                "02 02 0000",                          // version 2, R=0 opcode 2 (PEER), reserved
                "00000078",                            // requested lifetime 120
                "20010db8 00000000 00000000 00000010", // client IP 2001:db8::10
                PEER_BODY,
            ]
            .concat(),
        );
        assert_eq!(bytes.len(), HEADER_LEN + PEER_BODY_LEN);
        let expected = Request {
            header: RequestHeader {
                lifetime: 120,
                client_ip: ip("2001:db8::10"),
            },
            data: peer_data(0, Ipv6Addr::UNSPECIFIED),
            options: vec![],
        };
        check_request(&bytes, &expected);
    }

    #[test]
    fn rfc6887_s12_1_peer_response_vector() {
        let bytes = unhex(concat!(
            "02 82 00 00",                         // version 2, R=1 PEER, reserved, SUCCESS
            "00000078",                            // lifetime 120
            "00010000",                            // epoch 65536
            "00000000 00000000 00000000",          // reserved
            "a1a2a3a4 a5a6a7a8 a9aaabac",          // nonce
            "06 000000",                           // TCP, reserved
            "c000 9c40",                           // internal port 49152, assigned external 40000
            "20010db8 0000ffff 00000000 00000001", // assigned external IP 2001:db8:0:ffff::1
            "01bb 0000",                           // remote peer port 443, reserved
            "20010db8 00000000 00000000 00000080", // remote peer IP 2001:db8::80
            "c0 00 0000",                          // CHECKPOINT_REQUIRED echoed (RFC 7767 3.2)
        ));
        let expected = Response {
            header: ResponseHeader {
                result: ResultCode::SUCCESS,
                lifetime: 120,
                epoch: 65536,
            },
            data: peer_data(40000, ip("2001:db8:0:ffff::1")),
            options: vec![PcpOption::CheckpointRequired],
        };
        check_response(&bytes, &expected);
        assert!(expected.checkpoint_honoured());
    }

    // --- RFC 6887 section 14.1: ANNOUNCE ----------------------------------

    #[test]
    fn rfc6887_s14_1_announce_request_vector() {
        let bytes = unhex(concat!(
            "02 00 0000",                          // version 2, R=0 opcode 0 (ANNOUNCE), reserved
            "00000000",                            // requested lifetime 0
            "00000000 00000000 0000ffff c0000201", // client IP ::ffff:192.0.2.1
        ));
        let expected = Request {
            header: RequestHeader {
                lifetime: 0,
                client_ip: ip("192.0.2.1"),
            },
            data: OpData::Announce,
            options: vec![],
        };
        check_request(&bytes, &expected);
    }

    #[test]
    fn rfc6887_s14_1_announce_response_vector() {
        let bytes = unhex(concat!(
            "02 80 00 00",                // version 2, R=1 ANNOUNCE, reserved, SUCCESS
            "00000000",                   // lifetime 0
            "00000005",                   // epoch 5
            "00000000 00000000 00000000", // reserved
        ));
        let expected = Response {
            header: ResponseHeader {
                result: ResultCode::SUCCESS,
                lifetime: 0,
                epoch: 5,
            },
            data: OpData::Announce,
            options: vec![],
        };
        check_response(&bytes, &expected);
    }

    // --- Failure-scenarios draft section 4: GET / NEXT ----------------------

    const GET_BODY: &str = concat!(
        "11",                                  // protocol 17 (UDP)
        "01",                                  // internal AF 1 (IPv4)
        "00",                                  // external AF 0 (any)
        "00",                                  // reserved
        "c0000201 00000000 00000000 00000000", // filter internal IP 192.0.2.1 + 96 zero bits
        "00000000 00000000 00000000 00000000", // filter external IP (any)
        "0000",                                // filter internal port (any)
        "0000",                                // filter external port (any)
    );

    fn get_data() -> OpData {
        OpData::Get(GetData {
            protocol: Protocol::UDP,
            internal_af: crate::addr::AF_IPV4,
            external_af: 0,
            internal_ip: Ipv6Addr::from([192, 0, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            external_ip: Ipv6Addr::UNSPECIFIED,
            internal_port: 0,
            external_port: 0,
        })
    }

    fn af4(a: [u8; 4]) -> Ipv6Addr {
        crate::addr::to_af_wire(std::net::Ipv4Addr::from(a).into()).1
    }

    #[test]
    fn draft_s4_1_get_request_with_next_locator_vector() {
        let bytes = unhex(
            &[
                "02 60 0000",                          // version 2, R=0 opcode 96 (GET), reserved
                "00000000",                            // requested lifetime 0
                "00000000 00000000 0000ffff c0000201", // client IP ::ffff:192.0.2.1
                GET_BODY,
                // NEXT (draft 4.4): code 96, reserved, length 46 = 44 fixed + 2 codes
                "60 00 002e",
                "00 00 00 00", // protocol, internal AF, external AF any; MORE (0)
                "00000000 00000000 00000000 00000000", // locator internal IP (undefined)
                "00000000 00000000 00000000 00000000", // locator external IP (undefined)
                "00000000",    // remaining lifetime 0 in requests
                "0000 0000",   // internal port, external port
                "80 03",       // wanted codes: DESCRIPTION, FILTER
                "0000",        // padding to 4 octets
            ]
            .concat(),
        );
        assert_eq!(bytes.len(), 24 + 40 + 4 + 48);
        let expected = Request {
            header: RequestHeader {
                lifetime: 0,
                client_ip: ip("192.0.2.1"),
            },
            data: get_data(),
            options: vec![PcpOption::Next(Next {
                protocol: Protocol::ALL,
                internal_af: 0,
                external_af: 0,
                more_end: 0,
                internal_ip: Ipv6Addr::UNSPECIFIED,
                external_ip: Ipv6Addr::UNSPECIFIED,
                lifetime: 0,
                internal_port: 0,
                external_port: 0,
                items: NextItems::Codes(vec![OptionCode::DESCRIPTION, OptionCode::FILTER]),
            })],
        };
        check_request(&bytes, &expected);
        let PcpOption::Next(n) = &expected.options[0] else {
            unreachable!()
        };
        assert!(n.is_undefined_locator() && !n.is_end());
    }

    #[test]
    fn draft_s4_4_get_response_with_next_options_vector() {
        let bytes = unhex(
            &[
                "02 e0 00 00",                // version 2, R=1 opcode 96 (GET), reserved, SUCCESS
                "00000000",                   // lifetime 0
                "00000064",                   // epoch 100
                "00000000 00000000 00000000", // reserved
                GET_BODY,                     // bit-for-bit copy of the request's body (4.1)
                // NEXT #1, length 52 = 44 + one embedded option of 8
                "60 00 0034",
                "11 01 01 00", // UDP, internal AF IPv4, external AF IPv4, MORE
                "c0000201 00000000 00000000 00000000", // internal 192.0.2.1
                "cb007107 00000000 00000000 00000000", // external 203.0.113.7
                "00000dac",    // remaining lifetime 3500
                "1f90 c350",   // internal 8080, external 50000
                "80 00 0003 776562 00", // embedded DESCRIPTION "web" + padding
                // NEXT #2, length 76 = 44 + FILTER (24) + DESCRIPTION (8)
                "60 00 004c",
                "11 01 01 01",                         // UDP, IPv4, IPv4, END
                "c0000201 00000000 00000000 00000000", // internal 192.0.2.1
                "cb007107 00000000 00000000 00000000", // external 203.0.113.7
                "00000064",                            // remaining lifetime 100
                "14e9 c351",                           // internal 5353, external 50001
                "03 00 0014 00 80 0000",               // embedded FILTER: prefix 128, any port
                "20010db8 00000000 00000000 00000007", // remote peer IP 2001:db8::7
                "80 00 0004 6d646e73",                 // embedded DESCRIPTION "mdns", no padding
            ]
            .concat(),
        );
        assert_eq!(bytes.len(), 24 + 40 + 56 + 80);
        let next = |more_end, lifetime, internal_port, external_port, items| {
            PcpOption::Next(Next {
                protocol: Protocol::UDP,
                internal_af: crate::addr::AF_IPV4,
                external_af: crate::addr::AF_IPV4,
                more_end,
                internal_ip: af4([192, 0, 2, 1]),
                external_ip: af4([203, 0, 113, 7]),
                lifetime,
                internal_port,
                external_port,
                items: NextItems::Options(items),
            })
        };
        let expected = Response {
            header: ResponseHeader {
                result: ResultCode::SUCCESS,
                lifetime: 0,
                epoch: 100,
            },
            data: get_data(),
            options: vec![
                next(
                    0,
                    3500,
                    8080,
                    50000,
                    vec![PcpOption::Description("web".into())],
                ),
                next(
                    NEXT_END,
                    100,
                    5353,
                    50001,
                    vec![
                        PcpOption::Filter(Filter {
                            prefix_len: 128,
                            remote_port: 0,
                            remote_ip: ip("2001:db8::7"),
                        }),
                        PcpOption::Description("mdns".into()),
                    ],
                ),
            ],
        };
        check_response(&bytes, &expected);
    }

    /// Draft section 4.2: no mapping matches -> NONEXIST_MAP, no NEXT.
    #[test]
    fn draft_s4_2_get_nonexist_map_response_vector() {
        let bytes = unhex(
            &[
                "02 e0 00 c0", // R=1 GET, reserved, result 192 (NONEXIST_MAP)
                "00000708",    // lifetime 1800
                "00000064",    // epoch 100
                "00000000 00000000 00000000",
                GET_BODY,
            ]
            .concat(),
        );
        let expected = Response {
            header: ResponseHeader {
                result: CP.nonexist_map,
                lifetime: 1800,
                epoch: 100,
            },
            data: get_data(),
            options: vec![],
        };
        check_response(&bytes, &expected);
    }

    /// The draft's code points are configuration: the same octets parse
    /// differently under other values.
    #[test]
    fn draft_code_points_are_configurable() {
        let cp = CodePoints {
            get_opcode: Opcode(100),
            next_option: OptionCode(97),
            nonexist_map: ResultCode(200),
        };
        // GET under opcode 100, with a NEXT under option 97 (END, no codes).
        let next_fixed = concat!(
            "00 00 00 01",
            "00000000 00000000 00000000 00000000",
            "00000000 00000000 00000000 00000000",
            "00000000 0000 0000",
        );
        let req = unhex(
            &[
                "02 64 0000 00000000",
                "00000000 00000000 0000ffff c0000201",
                GET_BODY,
                "61 00 002c", // option 97, length 44
                next_fixed,
            ]
            .concat(),
        );
        let parsed = Request::parse(&req, &cp).unwrap();
        assert_eq!(parsed.data, get_data());
        assert!(matches!(&parsed.options[..], [PcpOption::Next(n)] if n.is_end()));
        assert_eq!(parsed.to_bytes(&cp).unwrap(), req);
        // With the defaults the same octets are an unknown opcode: opaque.
        let default = Request::parse(&req, &CP).unwrap();
        assert_eq!(
            default.data,
            OpData::Opaque {
                opcode: Opcode(100),
                payload: req[24..].to_vec()
            }
        );

        // Opcode 96 is no longer GET, and option 96 no longer NEXT.
        let mut req96 = req.clone();
        req96[1] = 96;
        assert!(matches!(
            Request::parse(&req96, &cp).unwrap().data,
            OpData::Opaque {
                opcode: Opcode(96),
                ..
            }
        ));
        let mut opt96 = req.clone();
        opt96[64] = 96;
        assert_eq!(
            Request::parse(&opt96, &cp).unwrap().options,
            vec![PcpOption::Unknown {
                code: OptionCode(96),
                data: req[68..].to_vec()
            }]
        );
        // ...and under the defaults option 97 is an unknown mandatory option
        // inside an otherwise valid GET.
        let mut get96 = req.clone();
        get96[1] = 96;
        let parsed = Request::parse(&get96, &CP).unwrap();
        assert!(matches!(
            &parsed.options[..],
            [PcpOption::Unknown {
                code: OptionCode(97),
                ..
            }]
        ));

        // NONEXIST_MAP 200: a GET error response with that result keeps it,
        // and the body is still interpreted (it is long enough).
        let rsp = unhex(
            &[
                "02 e4 00 c8 00000708 00000064",
                "00000000 00000000 00000000",
                GET_BODY,
            ]
            .concat(),
        );
        let parsed = Response::parse(&rsp, &cp).unwrap();
        assert_eq!(parsed.header.result, cp.nonexist_map);
        assert_ne!(parsed.header.result, ResultCode::NONEXIST_MAP);
        assert_eq!(parsed.data, get_data());
    }

    // --- Unknown code points (RFC 6887 section 7.3, 8.3) --------------------

    #[test]
    fn rfc6887_s7_unknown_opcode_round_trips_as_opaque() {
        let req = unhex(concat!(
            "02 05 0000",                          // R=0, opcode 5 (unassigned)
            "00000000",                            // lifetime
            "00000000 00000000 0000ffff c0000201", // client IP
            "deadbeef 00000001",                   // unknown body, kept verbatim
        ));
        let expected = Request {
            header: RequestHeader {
                lifetime: 0,
                client_ip: ip("192.0.2.1"),
            },
            data: OpData::Opaque {
                opcode: Opcode(5),
                payload: unhex("deadbeef 00000001"),
            },
            options: vec![],
        };
        check_request(&req, &expected);

        let rsp = unhex(concat!(
            "02 85 00 04", // R=1, opcode 5, reserved, UNSUPP_OPCODE
            "00000708 00000009",
            "00000000 0000ffff c0000201", // reserved: last 96 bits of the client IP
            "deadbeef 00000001",
        ));
        let parsed = Response::parse(&rsp, &CP).unwrap();
        assert_eq!(parsed.header.result, ResultCode::UNSUPP_OPCODE);
        assert_eq!(
            parsed.data,
            OpData::Opaque {
                opcode: Opcode(5),
                payload: unhex("deadbeef 00000001")
            }
        );
        // The reserved bits are not part of the value: re-encoding zeroes them.
        let mut zeroed = rsp.clone();
        zeroed[12..24].fill(0);
        assert_eq!(parsed.to_bytes(&CP).unwrap(), zeroed);
    }

    #[test]
    fn rfc6887_s7_4_unknown_result_code_kept() {
        let bytes = unhex(concat!(
            "02 81 00 2a",                         // R=1 MAP, reserved, result 42 (unassigned)
            "0000003c 00000001",                   // lifetime 60, epoch 1
            "00000000 00000000 00000000",          // reserved
            "01020304 05060708 090a0b0c",          // nonce
            "11 000000 1f90 0000",                 // UDP, internal 8080, external 0
            "00000000 00000000 0000ffff 00000000", // ::ffff:0.0.0.0
        ));
        let OpData::Map(map) = map_request().data else {
            unreachable!()
        };
        let expected = Response {
            header: ResponseHeader {
                result: ResultCode(42),
                lifetime: 60,
                epoch: 1,
            },
            data: OpData::Map(map),
            options: vec![],
        };
        check_response(&bytes, &expected);
        assert_eq!(ResultCode(42).to_string(), "ResultCode(42)");
        assert_eq!(ResultCode(42).name(), None);
    }

    // --- RFC 6887 sections 7.2 and 8.3: error responses ---------------------

    #[test]
    fn rfc6887_s7_2_build_error_response_copies_request() {
        let req = unhex(MAP_REQUEST);
        let mut out = vec![0xee]; // appends; existing content untouched
        build_error_response(&req, ResultCode::NOT_AUTHORIZED, 1800, 77, &mut out);
        let expected = unhex(concat!(
            "ee",                                  // pre-existing octet
            "02 81 00 02",                         // version 2, R=1 MAP, reserved, NOT_AUTHORIZED
            "00000708",                            // lifetime 1800
            "0000004d",                            // epoch 77
            "00000000 0000ffff c0000201",          // last 96 bits of the client IP (7.2)
            "01020304 05060708 090a0b0c",          // the MAP body, copied
            "11 000000 1f90 0000",                 //
            "00000000 00000000 0000ffff 00000000", //
        ));
        assert_eq!(out, expected);
        let rsp = Response::parse(&out[1..], &CP).unwrap();
        assert_eq!(rsp.header.result, ResultCode::NOT_AUTHORIZED);
        assert_eq!(rsp.data, map_request().data);
    }

    #[test]
    fn rfc6887_s8_3_error_response_for_short_request_is_padded() {
        // 10 octets: version 2, MAP, then part of the lifetime.
        let req = unhex("02 01 0000 00001c20 0000");
        let mut out = Vec::new();
        build_error_response(&req, ResultCode::MALFORMED_REQUEST, 1800, 3, &mut out);
        let expected = unhex(concat!(
            "02 81 00 03", // R=1 MAP, reserved, MALFORMED_REQUEST
            "00000708",    // lifetime 1800
            "00000003",    // epoch 3
            "00000000 00000000 00000000",
        ));
        assert_eq!(out, expected);
        // The client still learns the result; the body is too short for MAP.
        let rsp = Response::parse(&out, &CP).unwrap();
        assert_eq!(rsp.header.result, ResultCode::MALFORMED_REQUEST);
        assert_eq!(
            rsp.data,
            OpData::Opaque {
                opcode: Opcode::MAP,
                payload: vec![]
            }
        );

        // A length that is not a multiple of 4 is rounded up with zeros.
        let mut req = unhex(MAP_REQUEST);
        req.extend_from_slice(&[0xab, 0xcd, 0xef]);
        let mut out = Vec::new();
        build_error_response(&req, ResultCode::MALFORMED_REQUEST, 1800, 3, &mut out);
        assert_eq!(out.len(), 64);
        assert_eq!(out[60..], [0xab, 0xcd, 0xef, 0]);

        // A version-1 request answered UNSUPP_VERSION carries version 2.
        let mut req = unhex(MAP_REQUEST);
        req[0] = 1;
        let mut out = Vec::new();
        build_error_response(&req, ResultCode::UNSUPP_VERSION, 1800, 3, &mut out);
        assert_eq!(out[..4], [2, 0x81, 0, 1]);
    }

    #[test]
    fn rfc6887_s8_3_error_response_truncates_to_1100() {
        let mut req = unhex(MAP_REQUEST);
        req.resize(1500, 0x5a);
        let mut out = Vec::new();
        build_error_response(&req, ResultCode::MALFORMED_REQUEST, 1800, 3, &mut out);
        assert_eq!(out.len(), MAX_MESSAGE_LEN);
        assert_eq!(out[..4], [2, 0x81, 0, 3]);
        assert_eq!(out[12..], req[12..MAX_MESSAGE_LEN]);
        // The copy cuts 0x5a5a "options" mid-way; the client still gets the
        // result code (this used to fail with MalformedOption).
        let rsp = Response::parse(&out, &CP).unwrap();
        assert_eq!(rsp.header.result, ResultCode::MALFORMED_REQUEST);
        assert!(
            matches!(rsp.data, OpData::Opaque { opcode: Opcode::MAP, ref payload }
            if payload[..] == out[24..])
        );
    }

    /// The answer to a request with a malformed option copies that option
    /// (RFC 6887 section 8.3), so the client must be able to read it.
    #[test]
    fn rfc6887_s8_3_malformed_option_error_response_parses() {
        let mut req = unhex(MAP_REQUEST);
        req.extend_from_slice(&unhex("02 00 0004 00000000")); // PREFER_FAILURE, length 4
        let err = Request::parse(&req, &CP).unwrap_err();
        assert_eq!(
            err.disposition(),
            Disposition::Respond(ResultCode::MALFORMED_OPTION)
        );
        let mut out = Vec::new();
        build_error_response(&req, ResultCode::MALFORMED_OPTION, 1800, 3, &mut out);
        let rsp = Response::parse(&out, &CP).unwrap();
        assert_eq!(rsp.header.result, ResultCode::MALFORMED_OPTION);
        assert_eq!(
            rsp.data,
            OpData::Opaque {
                opcode: Opcode::MAP,
                payload: out[24..].to_vec()
            }
        );
        assert_eq!(Response::parse(&rsp.to_bytes(&CP).unwrap(), &CP), Ok(rsp));
        // A SUCCESS response with the same option is still rejected.
        out[3] = 0;
        assert_eq!(
            Response::parse(&out, &CP),
            Err(ParseError::MalformedOption {
                code: OptionCode::PREFER_FAILURE,
                reason: "option length does not match its definition"
            })
        );
    }

    // --- Negative tests: RFC 6887 sections 7 and 8.3 ------------------------

    fn req_err(bytes: &[u8], err: ParseError, disposition: Disposition) {
        let got = Request::parse(bytes, &CP).unwrap_err();
        assert_eq!(got, err);
        assert_eq!(got.disposition(), disposition);
    }

    #[test]
    fn rfc6887_s8_3_runt_is_dropped() {
        req_err(&[], ParseError::Runt(0), Disposition::Drop);
        req_err(&[2], ParseError::Runt(1), Disposition::Drop);
        assert_eq!(Response::parse(&[2], &CP), Err(ParseError::Runt(1)));
    }

    #[test]
    fn rfc6887_s8_3_r_bit_request_is_dropped() {
        let mut b = unhex(MAP_REQUEST);
        b[1] |= 0x80;
        req_err(&b, ParseError::WrongDirection(true), Disposition::Drop);
        // Even before the version is looked at.
        b[0] = 1;
        req_err(&b, ParseError::WrongDirection(true), Disposition::Drop);
        // And a response without R is not a response.
        let b = unhex(MAP_REQUEST);
        let e = Response::parse(&b, &CP).unwrap_err();
        assert_eq!(e, ParseError::WrongDirection(false));
        assert_eq!(e.disposition(), Disposition::Drop);
    }

    #[test]
    fn rfc6887_s9_unsupported_version() {
        let unsupp = Disposition::Respond(ResultCode::UNSUPP_VERSION);
        let mut b = unhex(MAP_REQUEST);
        b[0] = 1;
        req_err(&b, ParseError::UnsupportedVersion(1), unsupp);
        // NAT-PMP (RFC 6886) external-address request: version 0, opcode 0, 2 octets.
        req_err(&[0, 0], ParseError::UnsupportedVersion(0), unsupp);
        b[0] = 0;
        req_err(&b, ParseError::UnsupportedVersion(0), unsupp);
        b[0] = 3;
        req_err(&b, ParseError::UnsupportedVersion(3), unsupp);
    }

    #[test]
    fn rfc6887_s7_message_length_limits() {
        let malformed = Disposition::Respond(ResultCode::MALFORMED_REQUEST);
        let mut long = unhex(MAP_REQUEST);
        long.resize(1104, 0);
        req_err(
            &long,
            ParseError::Malformed("longer than 1100 octets"),
            malformed,
        );
        // Exactly 1100 is fine: 60 octets of MAP then 1040 of a large unknown option.
        let mut max = unhex(MAP_REQUEST);
        max.extend_from_slice(&[0x81, 0, 0x04, 0x0c]); // option 129, length 1036
        max.resize(1100, 0);
        assert!(Request::parse(&max, &CP).is_ok());

        let short = unhex("02 00 0000 00000000 00000000 00000000 00000000");
        assert_eq!(short.len(), 20);
        req_err(
            &short,
            ParseError::Malformed("shorter than the 24-octet header"),
            malformed,
        );
        req_err(
            &[2, 1],
            ParseError::Malformed("shorter than the 24-octet header"),
            malformed,
        );
        let mut odd = unhex(MAP_REQUEST);
        odd.extend_from_slice(&[0, 0]);
        req_err(
            &odd,
            ParseError::Malformed("length not a multiple of 4"),
            malformed,
        );
        assert_eq!(
            Response::parse(&[2, 0x81, 0, 0, 0], &CP),
            Err(ParseError::Malformed("shorter than the 24-octet header"))
        );
    }

    #[test]
    fn rfc6887_s8_3_body_too_short_for_opcode() {
        let malformed = Disposition::Respond(ResultCode::MALFORMED_REQUEST);
        let too_short = ParseError::Malformed("message too short for its opcode");
        // MAP with 32 of its 36 body octets.
        let map = unhex(MAP_REQUEST);
        req_err(&map[..56], too_short.clone(), malformed);
        // PEER carrying only a MAP-sized body (36 of 56).
        let mut peer = map.clone();
        peer[1] = 2;
        req_err(&peer, too_short.clone(), malformed);
        // GET carrying 36 of its 40 body octets.
        let mut get = map.clone();
        get[1] = 96;
        req_err(&get, too_short.clone(), malformed);
        // A SUCCESS response too short for MAP is malformed too (only error
        // responses may be short copies).
        let mut rsp = map[..56].to_vec();
        rsp[1] |= 0x80;
        assert_eq!(Response::parse(&rsp, &CP), Err(too_short));
    }

    /// Option errors surface through `Request::parse` as MALFORMED_OPTION
    /// (RFC 6887 section 7.3); the option-level cases are in `options.rs`.
    #[test]
    fn rfc6887_s7_3_malformed_option_in_request() {
        let bad = Disposition::Respond(ResultCode::MALFORMED_OPTION);
        let mut b = unhex(MAP_REQUEST);
        b.extend_from_slice(&unhex("01 00 0014 00000000")); // THIRD_PARTY claims 20, has 4
        req_err(
            &b,
            ParseError::MalformedOption {
                code: OptionCode::THIRD_PARTY,
                reason: "option data overruns the message",
            },
            bad,
        );
        // Unknown options are not an error for the codec: mandatory ones are
        // the server's UNSUPP_OPTION, optional ones are skipped.
        let mut b = unhex(MAP_REQUEST);
        b.extend_from_slice(&unhex("7f 00 0000 ff 00 0000"));
        let r = Request::parse(&b, &CP).unwrap();
        assert_eq!(
            r.options,
            vec![
                PcpOption::Unknown {
                    code: OptionCode(0x7f),
                    data: vec![]
                },
                PcpOption::Unknown {
                    code: OptionCode(0xff),
                    data: vec![]
                },
            ]
        );
    }

    #[test]
    fn rfc6887_s7_encode_rejects_over_1100() {
        let mut r = map_request();
        r.options = vec![PcpOption::Description("x".repeat(1100 - 60 - 4 + 1))];
        let mut out = vec![9];
        assert_eq!(r.encode(&CP, &mut out), Err(EncodeError::TooLong(1104)));
        assert_eq!(out, [9], "nothing appended on error");
        r.options = vec![PcpOption::Description("x".repeat(1100 - 60 - 4))];
        assert_eq!(r.to_bytes(&CP).unwrap().len(), 1100);
    }
}
