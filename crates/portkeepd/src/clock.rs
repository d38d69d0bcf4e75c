//! The one place the daemon reads the clock; the cores are handed `now`.

use std::time::Instant;

use portkeep_server::Timestamp;

/// Monotonic milliseconds since `origin`, as the core's [`Timestamp`].
#[allow(clippy::disallowed_methods)] // The runtime boundary: see clippy.toml.
pub fn now(origin: Instant) -> Timestamp {
    Timestamp(u64::try_from(Instant::now().duration_since(origin).as_millis()).unwrap_or(u64::MAX))
}

/// The origin for [`now`].
#[allow(clippy::disallowed_methods)] // The runtime boundary: see clippy.toml.
pub fn origin() -> Instant {
    Instant::now()
}
