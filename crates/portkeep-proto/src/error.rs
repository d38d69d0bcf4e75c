use crate::{OptionCode, ResultCode};

/// Why a datagram is not a well-formed PCP message, and what the RFC says to
/// do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    /// Fewer than two octets: RFC 6887 section 8.3 says drop silently.
    #[error("datagram of {0} octets is too short to carry a PCP version and opcode")]
    Runt(usize),
    /// A request arrived with the R bit set, or a response without it:
    /// drop silently (RFC 6887 sections 8.3, 8.4).
    #[error("wrong direction: R bit is {0}")]
    WrongDirection(bool),
    /// Version other than 2 (RFC 6887 section 9).
    #[error("unsupported PCP version {0}")]
    UnsupportedVersion(u8),
    /// Length over 1100, under 24, not a multiple of 4, or too short for the
    /// opcode (RFC 6887 section 7, 8.3).
    #[error("malformed message: {0}")]
    Malformed(&'static str),
    /// An option that overruns the message, has a length its definition does
    /// not allow, or carries invalid data (RFC 6887 section 7.3).
    #[error("malformed option {code}: {reason}")]
    MalformedOption {
        /// The option's code.
        code: OptionCode,
        /// What was wrong.
        reason: &'static str,
    },
}

/// What a server does with a request that failed to parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Drop without answering.
    Drop,
    /// Answer with this result code.
    Respond(ResultCode),
}

impl ParseError {
    /// The server's reaction prescribed by RFC 6887 section 8.3.
    pub fn disposition(&self) -> Disposition {
        match self {
            ParseError::Runt(_) | ParseError::WrongDirection(_) => Disposition::Drop,
            ParseError::UnsupportedVersion(_) => Disposition::Respond(ResultCode::UNSUPP_VERSION),
            ParseError::Malformed(_) => Disposition::Respond(ResultCode::MALFORMED_REQUEST),
            ParseError::MalformedOption { .. } => {
                Disposition::Respond(ResultCode::MALFORMED_OPTION)
            }
        }
    }
}
