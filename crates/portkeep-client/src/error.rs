//! Errors of the tokio client.

use std::net::SocketAddr;
use std::time::Duration;

use portkeep_proto::EncodeError;

use crate::reply::{result_name, Reply};
use crate::request::BuildError;

/// Why a request did not produce a SUCCESS response.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// No matching response before MRD / MRC ran out (RFC 6887 section 8.1.1).
    #[error(
        "timeout: no response from PCP server {server} within {:.1} s ({transmissions} transmission{})",
        elapsed.as_secs_f64(),
        if *transmissions == 1 { "" } else { "s" }
    )]
    Timeout {
        /// The server asked.
        server: SocketAddr,
        /// How many times the request was sent.
        transmissions: u32,
        /// Time from the first transmission to giving up.
        elapsed: Duration,
    },
    /// The server answered with an error result (RFC 6887 section 7.4).
    /// The reply is kept whole: its lifetime says how long the same
    /// request will keep failing.
    #[error(
        "{} (result code {}), error lifetime {} s",
        result_name(reply.result()),
        reply.result().0,
        reply.lifetime()
    )]
    Pcp {
        /// The error response.
        reply: Box<Reply>,
    },
    /// The request is not one the RFC allows.
    #[error("invalid request: {0}")]
    Build(#[from] BuildError),
    /// The request does not fit in a PCP message.
    #[error("cannot encode request: {0}")]
    Encode(#[from] EncodeError),
    /// A GET / NEXT walk got a response it cannot continue from.
    #[error("GET/NEXT walk: {0}")]
    Walk(#[from] crate::walk::WalkError),
    /// [`crate::Client::create`] got SUCCESS for a request that makes no
    /// mapping (ANNOUNCE or a delete).
    #[error("the request made no mapping to renew (ANNOUNCE or delete)")]
    NotAMapping {
        /// The reply.
        reply: Box<Reply>,
    },
    /// The server does not speak this protocol: it answered PCP as a
    /// NAT-PMP-only gateway (version 0, RFC 6887 appendix A), or NAT-PMP
    /// as a PCP-only server. `portkeep` then tries the other.
    #[error("server {server} does not speak {asked} (it answered with version {version})")]
    UnsupportedVersion {
        /// The server.
        server: SocketAddr,
        /// What was asked: "PCP" or "NAT-PMP".
        asked: &'static str,
        /// The version it answered with.
        version: u8,
    },
    /// A NAT-PMP request failed (RFC 6886 section 3.5 result code).
    #[error("NAT-PMP result {result} from {server}")]
    NatPmp {
        /// The gateway.
        server: SocketAddr,
        /// Its result code (2 refused, 3 network failure, 4 out of
        /// resources, 5 unsupported opcode).
        result: u16,
    },
    /// A socket operation failed.
    #[error("I/O error talking to PCP server {server}: {source}")]
    Io {
        /// The server.
        server: SocketAddr,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl ClientError {
    /// The error response, for [`ClientError::Pcp`].
    pub fn reply(&self) -> Option<&Reply> {
        match self {
            ClientError::Pcp { reply } | ClientError::NotAMapping { reply } => Some(reply),
            _ => None,
        }
    }
}
