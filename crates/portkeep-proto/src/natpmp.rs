//! NAT-PMP (RFC 6886) messages, which share UDP port 5351 with PCP: the
//! first octet (version 0) tells them apart (RFC 6886 section 1.1, RFC
//! 6887 appendix A). Every number is big-endian (RFC 6886 section 3).

use std::net::Ipv4Addr;

use crate::NATPMP_VERSION;

/// Opcode of the external address request (RFC 6886 section 3.2).
pub const OP_EXTERNAL_ADDRESS: u8 = 0;
/// Opcode of a UDP map request (section 3.3).
pub const OP_MAP_UDP: u8 = 1;
/// Opcode of a TCP map request (section 3.3).
pub const OP_MAP_TCP: u8 = 2;
/// Set in every response's opcode (section 3.2; erratum 3618).
pub const RESPONSE_BIT: u8 = 0x80;

/// A result code (RFC 6886 section 3.5): 16 bits, unlike PCP's 8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatPmpResult(pub u16);

impl NatPmpResult {
    /// Success.
    pub const SUCCESS: NatPmpResult = NatPmpResult(0);
    /// Unsupported version.
    pub const UNSUPPORTED_VERSION: NatPmpResult = NatPmpResult(1);
    /// Not authorized / refused (disabled, a mapping made otherwise,
    /// policy).
    pub const NOT_AUTHORIZED: NatPmpResult = NatPmpResult(2);
    /// Network failure (no external address, a dataplane that failed).
    pub const NETWORK_FAILURE: NatPmpResult = NatPmpResult(3);
    /// Out of resources (no port, over quota).
    pub const OUT_OF_RESOURCES: NatPmpResult = NatPmpResult(4);
    /// Unsupported opcode.
    pub const UNSUPPORTED_OPCODE: NatPmpResult = NatPmpResult(5);
}

/// A map request's protocol (RFC 6886 section 3.3: opcode 1 UDP, 2 TCP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatPmpProtocol {
    /// Opcode 1.
    Udp,
    /// Opcode 2.
    Tcp,
}

impl NatPmpProtocol {
    /// The request opcode.
    pub fn opcode(self) -> u8 {
        match self {
            NatPmpProtocol::Udp => OP_MAP_UDP,
            NatPmpProtocol::Tcp => OP_MAP_TCP,
        }
    }

    /// The IANA protocol number.
    pub fn number(self) -> u8 {
        match self {
            NatPmpProtocol::Udp => 17,
            NatPmpProtocol::Tcp => 6,
        }
    }
}

/// A NAT-PMP request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatPmpRequest {
    /// Opcode 0 (section 3.2).
    ExternalAddress,
    /// Opcodes 1 and 2 (section 3.3): lifetime 0 deletes (section 3.4),
    /// and with internal port 0 too, deletes every mapping of the client
    /// for that protocol.
    Map {
        /// UDP or TCP.
        protocol: NatPmpProtocol,
        /// The port the client listens on.
        internal_port: u16,
        /// A hint (0: the gateway picks).
        suggested_external_port: u16,
        /// Requested lifetime, seconds.
        lifetime: u32,
    },
}

/// What to do with a datagram that is not a request this codec takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatPmpReject {
    /// Drop silently: a response (opcode 128 or above; section 3), or too
    /// short to be a request (fewer than 2 octets, or a map request under
    /// 12: RFC 6886 sets no rule; miniupnpd drops them).
    Drop,
    /// Answer [`NatPmpReply::unsupported_opcode`] (section 3.5).
    UnsupportedOpcode(u8),
}

impl NatPmpRequest {
    /// Parses a version-0 datagram.
    pub fn parse(b: &[u8]) -> Result<NatPmpRequest, NatPmpReject> {
        if b.len() < 2 || b[0] != NATPMP_VERSION || b[1] & RESPONSE_BIT != 0 {
            return Err(NatPmpReject::Drop);
        }
        let protocol = match b[1] {
            OP_EXTERNAL_ADDRESS => return Ok(NatPmpRequest::ExternalAddress),
            OP_MAP_UDP => NatPmpProtocol::Udp,
            OP_MAP_TCP => NatPmpProtocol::Tcp,
            op => return Err(NatPmpReject::UnsupportedOpcode(op)),
        };
        if b.len() < 12 {
            return Err(NatPmpReject::Drop);
        }
        // Octets 2-3 are reserved: ignored on receipt.
        Ok(NatPmpRequest::Map {
            protocol,
            internal_port: u16::from_be_bytes([b[4], b[5]]),
            suggested_external_port: u16::from_be_bytes([b[6], b[7]]),
            lifetime: u32::from_be_bytes([b[8], b[9], b[10], b[11]]),
        })
    }

    /// The request's bytes (for clients and tests).
    pub fn to_bytes(&self) -> Vec<u8> {
        match *self {
            NatPmpRequest::ExternalAddress => vec![NATPMP_VERSION, OP_EXTERNAL_ADDRESS],
            NatPmpRequest::Map {
                protocol,
                internal_port,
                suggested_external_port,
                lifetime,
            } => {
                let mut b = vec![NATPMP_VERSION, protocol.opcode(), 0, 0];
                b.extend_from_slice(&internal_port.to_be_bytes());
                b.extend_from_slice(&suggested_external_port.to_be_bytes());
                b.extend_from_slice(&lifetime.to_be_bytes());
                b
            }
        }
    }
}

/// A NAT-PMP response, or an announcement (section 3.2.1: the external
/// address response, unsolicited).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatPmpReply {
    /// Opcode 128 (section 3.2).
    ExternalAddress {
        /// The result.
        result: NatPmpResult,
        /// Seconds since start of epoch (section 3.6).
        epoch: u32,
        /// Zero unless the result is success.
        address: Ipv4Addr,
    },
    /// Opcode 129 or 130 (section 3.3).
    Map {
        /// UDP or TCP.
        protocol: NatPmpProtocol,
        /// The result.
        result: NatPmpResult,
        /// Seconds since start of epoch.
        epoch: u32,
        /// Copied from the request, also on errors.
        internal_port: u16,
        /// Zero if no mapping exists or was created.
        external_port: u16,
        /// Zero if none.
        lifetime: u32,
    },
    /// Any other opcode: result and epoch (section 3.5: the request echoed
    /// with the response bit set and result 5; for requests of fewer than
    /// 4 octets there is nowhere to put it, so 8 octets, as miniupnpd).
    Other {
        /// The request's opcode.
        opcode: u8,
        /// The result.
        result: NatPmpResult,
        /// Seconds since start of epoch.
        epoch: u32,
    },
}

impl NatPmpReply {
    /// The unsupported-opcode response to `request` (section 3.5).
    pub fn unsupported_opcode(opcode: u8, epoch: u32) -> NatPmpReply {
        NatPmpReply::Other {
            opcode,
            result: NatPmpResult::UNSUPPORTED_OPCODE,
            epoch,
        }
    }

    /// Appends the response's bytes to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match *self {
            NatPmpReply::ExternalAddress {
                result,
                epoch,
                address,
            } => {
                out.extend_from_slice(&[NATPMP_VERSION, RESPONSE_BIT | OP_EXTERNAL_ADDRESS]);
                out.extend_from_slice(&result.0.to_be_bytes());
                out.extend_from_slice(&epoch.to_be_bytes());
                let address = if result == NatPmpResult::SUCCESS {
                    address
                } else {
                    Ipv4Addr::UNSPECIFIED
                };
                out.extend_from_slice(&address.octets());
            }
            NatPmpReply::Map {
                protocol,
                result,
                epoch,
                internal_port,
                external_port,
                lifetime,
            } => {
                out.extend_from_slice(&[NATPMP_VERSION, RESPONSE_BIT | protocol.opcode()]);
                out.extend_from_slice(&result.0.to_be_bytes());
                out.extend_from_slice(&epoch.to_be_bytes());
                out.extend_from_slice(&internal_port.to_be_bytes());
                out.extend_from_slice(&external_port.to_be_bytes());
                out.extend_from_slice(&lifetime.to_be_bytes());
            }
            NatPmpReply::Other {
                opcode,
                result,
                epoch,
            } => {
                out.extend_from_slice(&[NATPMP_VERSION, RESPONSE_BIT | opcode]);
                out.extend_from_slice(&result.0.to_be_bytes());
                out.extend_from_slice(&epoch.to_be_bytes());
            }
        }
    }

    /// Parses a response (for clients and tests). A client accepts opcode
    /// 0 or 128 for the unsupported-version answer (erratum 3618).
    pub fn parse(b: &[u8]) -> Option<NatPmpReply> {
        if b.len() < 8 || b[0] != NATPMP_VERSION {
            return None;
        }
        let result = NatPmpResult(u16::from_be_bytes([b[2], b[3]]));
        let epoch = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
        let op = b[1] & !RESPONSE_BIT;
        match op {
            OP_EXTERNAL_ADDRESS if b.len() >= 12 => Some(NatPmpReply::ExternalAddress {
                result,
                epoch,
                address: Ipv4Addr::new(b[8], b[9], b[10], b[11]),
            }),
            OP_MAP_UDP | OP_MAP_TCP if b.len() >= 16 => Some(NatPmpReply::Map {
                protocol: if op == OP_MAP_UDP {
                    NatPmpProtocol::Udp
                } else {
                    NatPmpProtocol::Tcp
                },
                result,
                epoch,
                internal_port: u16::from_be_bytes([b[8], b[9]]),
                external_port: u16::from_be_bytes([b[10], b[11]]),
                lifetime: u32::from_be_bytes([b[12], b[13], b[14], b[15]]),
            }),
            _ => Some(NatPmpReply::Other {
                opcode: op,
                result,
                epoch,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc6886_s3_3_map_request_round_trips() {
        let r = NatPmpRequest::Map {
            protocol: NatPmpProtocol::Tcp,
            internal_port: 8080,
            suggested_external_port: 40000,
            lifetime: 7200,
        };
        let b = r.to_bytes();
        assert_eq!(b, [0, 2, 0, 0, 0x1f, 0x90, 0x9c, 0x40, 0, 0, 0x1c, 0x20]);
        assert_eq!(NatPmpRequest::parse(&b), Ok(r));
    }

    #[test]
    fn rfc6886_s3_responses_and_short_datagrams_are_dropped() {
        assert_eq!(NatPmpRequest::parse(&[0]), Err(NatPmpReject::Drop));
        assert_eq!(NatPmpRequest::parse(&[0, 128]), Err(NatPmpReject::Drop));
        assert_eq!(NatPmpRequest::parse(&[0, 1, 0, 0]), Err(NatPmpReject::Drop));
        assert_eq!(
            NatPmpRequest::parse(&[0, 0]),
            Ok(NatPmpRequest::ExternalAddress)
        );
        assert_eq!(
            NatPmpRequest::parse(&[0, 9]),
            Err(NatPmpReject::UnsupportedOpcode(9))
        );
    }

    #[test]
    fn rfc6886_s3_2_external_address_response_layout() {
        let mut out = Vec::new();
        NatPmpReply::ExternalAddress {
            result: NatPmpResult::SUCCESS,
            epoch: 0x01020304,
            address: Ipv4Addr::new(192, 0, 2, 1),
        }
        .encode(&mut out);
        assert_eq!(out, [0, 128, 0, 0, 1, 2, 3, 4, 192, 0, 2, 1]);
        let mut out = Vec::new();
        NatPmpReply::ExternalAddress {
            result: NatPmpResult::NETWORK_FAILURE,
            epoch: 1,
            address: Ipv4Addr::new(192, 0, 2, 1),
        }
        .encode(&mut out);
        assert_eq!(
            &out[8..],
            [0, 0, 0, 0],
            "zero when the result is not success"
        );
    }

    #[test]
    fn rfc6886_s3_3_map_response_layout_and_parse() {
        let reply = NatPmpReply::Map {
            protocol: NatPmpProtocol::Udp,
            result: NatPmpResult::SUCCESS,
            epoch: 5,
            internal_port: 1234,
            external_port: 40000,
            lifetime: 3600,
        };
        let mut out = Vec::new();
        reply.encode(&mut out);
        assert_eq!(out.len(), 16);
        assert_eq!(out[1], 129);
        assert_eq!(NatPmpReply::parse(&out), Some(reply));
    }

    #[test]
    fn rfc6886_s3_5_unsupported_opcode_is_eight_octets_with_result_5() {
        let mut out = Vec::new();
        NatPmpReply::unsupported_opcode(9, 7).encode(&mut out);
        assert_eq!(out, [0, 137, 0, 5, 0, 0, 0, 7]);
    }
}
