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
    /// is too short for its opcode: everything after the header, verbatim.
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
    if len % 4 != 0 {
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
    /// An error response whose body is too short for its opcode (the server
    /// copied a short request) parses as [`OpData::Opaque`], as does an
    /// unknown opcode; the client still learns the result code.
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
        let options = parse_options(rest, Direction::Response, cp, false)?;
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
