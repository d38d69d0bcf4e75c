//! The one place the daemon reads the clock; the cores are handed `now`.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use portkeep_server::Timestamp;

/// The daemon's clock: wall-clock milliseconds since the Unix epoch at
/// start, advanced by a monotonic clock.
///
/// Wall-clock based values mean the same thing after a restart, so stored
/// expiry times and epoch anchors stay valid; advancing them monotonically
/// means a clock step while running never moves an epoch backwards or
/// expires mappings early.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    start: Instant,
    wall_ms: u64,
}

impl Clock {
    /// Reads both clocks once.
    #[allow(clippy::disallowed_methods)] // The runtime boundary: see clippy.toml.
    pub fn start() -> Clock {
        let wall_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Clock {
            start: Instant::now(),
            wall_ms,
        }
    }

    /// Now, as the core's [`Timestamp`].
    #[allow(clippy::disallowed_methods)] // The runtime boundary: see clippy.toml.
    pub fn now(&self) -> Timestamp {
        let elapsed = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        Timestamp(self.wall_ms.saturating_add(elapsed))
    }

    /// Milliseconds since this clock started.
    pub fn uptime_ms(&self) -> u64 {
        self.now().as_millis().saturating_sub(self.wall_ms)
    }
}

/// Times an operation to the microsecond, for logs and the control
/// interface (the core's clock only has milliseconds).
#[derive(Debug, Clone, Copy)]
pub struct Stopwatch(Instant);

impl Stopwatch {
    /// Starts timing.
    #[allow(clippy::disallowed_methods)] // The runtime boundary: see clippy.toml.
    pub fn start() -> Stopwatch {
        Stopwatch(Instant::now())
    }

    /// Microseconds since [`Stopwatch::start`].
    pub fn micros(&self) -> u64 {
        u64::try_from(self.0.elapsed().as_micros()).unwrap_or(u64::MAX)
    }
}

/// A point in monotonic time, for bounded waits (a wall-clock step must
/// neither cut a wait short nor stretch it).
#[derive(Debug, Clone, Copy)]
pub struct Deadline(Instant);

impl Deadline {
    /// `d` from now.
    #[allow(clippy::disallowed_methods)] // The runtime boundary: see clippy.toml.
    pub fn after(d: std::time::Duration) -> Deadline {
        Deadline(Instant::now() + d)
    }

    /// How long until the deadline (zero once it has passed).
    #[allow(clippy::disallowed_methods)] // The runtime boundary: see clippy.toml.
    pub fn left(&self) -> std::time::Duration {
        self.0.saturating_duration_since(Instant::now())
    }
}
