//! What a completed request tells the caller.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use portkeep_proto::addr::{from_wire, is_unspecified};
use portkeep_proto::{CodePoints, Nonce, Opcode, PcpOption, Response, ResultCode};

use crate::epoch::EpochVerdict;

/// A response matched to its request, with the facts a caller asks about.
///
/// Unknown result codes and options are kept, never treated as decoding
/// failures: [`ResultCode`] keeps its number and unknown options stay in
/// [`Response::options`] as [`PcpOption::Unknown`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The server's response.
    pub response: Response,
    /// The request's opcode.
    pub opcode: Opcode,
    /// The request's nonce (MAP and PEER).
    pub nonce: Option<Nonce>,
    /// Whether the request carried CHECKPOINT_REQUIRED.
    pub checkpoint_requested: bool,
    /// The epoch check of RFC 6887 section 8.5 against the previous
    /// response from the same server (through the same [`crate::Client`]).
    pub epoch_verdict: EpochVerdict,
    /// How many times the request was sent.
    pub transmissions: u32,
    /// Time from the first transmission to the response.
    pub elapsed: Duration,
}

impl Reply {
    /// The result code.
    pub fn result(&self) -> ResultCode {
        self.response.header.result
    }

    /// Whether the result is SUCCESS.
    pub fn is_success(&self) -> bool {
        self.result() == ResultCode::SUCCESS
    }

    /// Granted lifetime on success, error lifetime on failure (RFC 6887
    /// section 7.2), in seconds.
    pub fn lifetime(&self) -> u32 {
        self.response.header.lifetime
    }

    /// The server's epoch time (RFC 6887 section 8.5).
    pub fn epoch(&self) -> u32 {
        self.response.header.epoch
    }

    /// The assigned external address of a MAP/PEER response, IPv4 unmapped
    /// (RFC 6887 sections 11.4, 12.4). `None` when the response has no
    /// MAP/PEER body or the field is the unspecified address.
    pub fn external_ip(&self) -> Option<IpAddr> {
        let m = self.response.data.map_part()?;
        (!is_unspecified(m.external_ip)).then(|| from_wire(m.external_ip))
    }

    /// The assigned external port of a MAP/PEER response.
    pub fn external_port(&self) -> Option<u16> {
        self.response.data.map_part().map(|m| m.external_port)
    }

    /// External address and port together, when both are known.
    pub fn external(&self) -> Option<SocketAddr> {
        Some(SocketAddr::new(self.external_ip()?, self.external_port()?))
    }

    /// Whether the response echoes CHECKPOINT_REQUIRED.
    pub fn checkpoint_echoed(&self) -> bool {
        self.response.checkpoint_honoured()
    }

    /// Whether the server honoured CHECKPOINT_REQUIRED: RFC 7767 section
    /// 3.2 says the server echoes the option in a SUCCESS response when it
    /// honours it and omits it when it does not. An echo the client never
    /// asked for (a server bug) does not count.
    pub fn checkpoint_honoured(&self) -> bool {
        self.checkpoint_requested && self.is_success() && self.checkpoint_echoed()
    }

    /// Options the codec does not interpret, as (code, data).
    pub fn unknown_options(&self) -> impl Iterator<Item = (u8, &[u8])> {
        self.response.options.iter().filter_map(|o| match o {
            PcpOption::Unknown { code, data } => Some((code.0, data.as_slice())),
            _ => None,
        })
    }

    /// The opcode name, or its number for opcodes the codec does not name.
    pub fn opcode_name(&self, cp: &CodePoints) -> String {
        if self.opcode == cp.get_opcode {
            return "GET".to_owned();
        }
        self.opcode
            .name()
            .map_or_else(|| self.opcode.0.to_string(), str::to_owned)
    }
}

/// The registered name of a result code, or `UNKNOWN` (RFC 6887 section 7.4).
pub fn result_name(code: ResultCode) -> &'static str {
    code.name().unwrap_or("UNKNOWN")
}
