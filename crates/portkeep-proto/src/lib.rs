//! Port Control Protocol wire codec.
//!
//! Converts between bytes and typed PCP messages: RFC 6887 requests and
//! responses (ANNOUNCE, MAP, PEER), the options THIRD_PARTY, PREFER_FAILURE,
//! FILTER (RFC 6887 section 13), DESCRIPTION (RFC 7220), CHECKPOINT_REQUIRED
//! (RFC 7767), the GET opcode with its NEXT option from the PCP
//! failure-scenarios draft (section 4), and RFC 7652's authentication
//! messages and tags ([`auth`]).
//!
//! The crate does no I/O and reads no clock. Parsing checks structure once
//! (lengths, padding, option framing); what a server *does* with a
//! structurally sound message (which options it accepts for which opcode,
//! how often) is policy and lives in `portkeep-server`.
//!
//! Code points are open: an opcode, option or result code this crate does not
//! know parses into a value that keeps its number and builds back to the same
//! bytes (RFC 6887 section 7.3: unknown optional options are skipped, unknown
//! opcodes answered with UNSUPP_OPCODE, both of which need the number).
//!
//! IP addresses are carried as [`Ipv6Addr`](std::net::Ipv6Addr), exactly as
//! on the wire (RFC 6887 section 5: IPv4 is IPv4-mapped); [`addr`] converts.

#![forbid(unsafe_code)]

pub mod addr;
pub mod auth;
mod codepoints;
mod error;
mod message;
pub mod natpmp;
mod options;

pub use codepoints::{CodePoints, Opcode, OptionCode, Protocol, ResultCode};
pub use error::{Disposition, ParseError};
pub use message::{
    build_error_response, EncodeError, GetData, MapData, OpData, PeerData, Request, RequestHeader,
    Response, ResponseHeader,
};
pub use options::{Filter, Next, NextItems, PcpOption, NEXT_END};

/// The only PCP version this codec speaks (RFC 6887 section 7).
pub const VERSION: u8 = 2;
/// NAT-PMP's version number (RFC 6886), which shares port 5351 with PCP.
pub const NATPMP_VERSION: u8 = 0;
/// Largest PCP message, in octets (RFC 6887 section 7).
pub const MAX_MESSAGE_LEN: usize = 1100;
/// Length of the request and of the response common header (RFC 6887 sections 7.1, 7.2).
pub const HEADER_LEN: usize = 24;
/// Length of the MAP opcode body (RFC 6887 section 11.1).
pub const MAP_BODY_LEN: usize = 36;
/// Length of the PEER opcode body (RFC 6887 section 12.1).
pub const PEER_BODY_LEN: usize = 56;
/// Length of the GET opcode body (failure-scenarios draft section 4.1).
pub const GET_BODY_LEN: usize = 40;
/// Length of the fixed part of a NEXT option's data (draft section 4.4;
/// the draft's "minimum 11" counts 32-bit words).
pub const NEXT_FIXED_LEN: usize = 44;
/// Length of a mapping nonce (RFC 6887 section 11.1).
pub const NONCE_LEN: usize = 12;
/// UDP port a PCP server listens on (RFC 6887 section 19.1).
pub const SERVER_PORT: u16 = 5351;
/// UDP port a PCP client listens on for unsolicited responses (RFC 6887 section 19.1).
pub const CLIENT_PORT: u16 = 5350;

/// A 96-bit mapping nonce (RFC 6887 section 11.1).
pub type Nonce = [u8; NONCE_LEN];
