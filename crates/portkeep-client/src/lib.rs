//! PCP client (RFC 6887, with RFC 7767 CHECKPOINT_REQUIRED).
//!
//! Two layers:
//!
//! - a sans-IO core that never touches a socket or reads a clock:
//!   [`Transaction`] (one request with the retransmission rules of RFC 6887
//!   section 8.1.1 and the response matching of sections 8.3, 11.4, 12.4)
//!   and [`EpochTracker`] (the epoch check of section 8.5);
//! - [`Client`], a small tokio driver around them, [`RequestBuilder`]
//!   for MAP, PEER, ANNOUNCE and delete requests, and [`Mapping`], a
//!   granted mapping that [`Client::renew`] renews with the same nonce and
//!   options (so a CHECKPOINT_REQUIRED refused at first can be won later);
//! - [`Session`] (sans-IO): every mapping a client keeps with one server,
//!   renewed per RFC 6887 section 11.2.1 and re-created after a failed
//!   epoch check, an ANNOUNCE, expiry or a server change;
//! - [`Walker`] (sans-IO) and [`Client::walk`]: retrieving the client's
//!   mappings with GET / NEXT (PCP failure-scenarios draft, section 4).
//!
//! ```no_run
//! # async fn demo() -> Result<(), portkeep_client::ClientError> {
//! use portkeep_client::{Client, RequestBuilder, RequestOptions};
//! use portkeep_proto::Protocol;
//! use std::time::Duration;
//!
//! let client = Client::connect("192.0.2.1:5351".parse().unwrap()).await?;
//! let map = RequestBuilder::map(Protocol::TCP, 8080).checkpoint_required();
//! let opts = RequestOptions { max_duration: Some(Duration::from_secs(10)), ..Default::default() };
//! let reply = client.send(&map, opts).await?;
//! println!("{:?} for {} s", reply.external(), reply.lifetime());
//! # Ok(()) }
//! ```

/// How to embed the client: `docs/library.md`, whose examples compile as
/// this module's doctests.
#[doc = include_str!("../../../docs/library.md")]
pub mod guide {
    #[allow(unused_imports)]
    use crate::{Client, EpochTracker, Mapping, Session, Transaction};
}

mod driver;
mod epoch;
mod error;
mod mapping;
pub mod natpmp;
mod reply;
mod request;
mod retransmit;
mod session;
mod transaction;
mod walk;

pub use driver::{Client, ClientConfig, RequestOptions, Walk};
pub use epoch::{EpochInvalid, EpochTracker, EpochVerdict};
pub use error::ClientError;
pub use mapping::Mapping;
pub use reply::{result_name, Reply};
pub use request::{
    filter, random_nonce, random_nonce_from, BuildError, RequestBuilder, DEFAULT_LIFETIME,
};
pub use retransmit::{RetransmitParams, IRT, MRC, MRD, MRT};
pub use session::{
    Grant, GrantKind, MappingId, RecreateCounts, RecreateReason, Session, SessionConfig,
    SessionCounters, SessionError, SessionEvent, MIN_RENEWAL_SPACING,
};
pub use transaction::{Event, Ignored, MappingKey, ResponseKey, TimedOut, Transaction};
pub use walk::{same_mapping, GetFilter, MappedEntry, WalkError, Walker};
