//! Epoch Time validation, RFC 6887 section 8.5 (client side).
//!
//! ```text
//! If this is the first PCP response the client has received from this
//! PCP server, the Epoch Time value is treated as necessarily valid,
//! otherwise
//!    If Curr_Server_Time < Prev_Server_Time - 1, then the client
//!    treats the Epoch Time value as obviously invalid (time has gone
//!    backwards beyond what can be explained by rounding), otherwise
//!       Client_Delta = Curr_Client_Time - Prev_Client_Time;
//!       Server_Delta = Curr_Server_Time - Prev_Server_Time;
//!       If Client_Delta+2 < Server_Delta - Server_Delta/16
//!       or Server_Delta+2 < Client_Delta - Client_Delta/16,
//!       then the client treats the Epoch Time value as invalid,
//!       else the client treats the Epoch Time value as valid.
//! The PCP client records the current time values for use in its next
//! comparison.
//! ```
//!
//! An invalid epoch means the server may have lost state: the client
//! re-creates its mappings there (section 8.5, and the failure-scenarios
//! draft section 3).

use std::time::{Duration, Instant};

/// The outcome of checking one response's epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EpochVerdict {
    /// The first epoch seen from this server: valid by definition.
    First,
    /// Consistent with the previous response.
    Valid,
    /// Inconsistent: the server may have lost state.
    Invalid(EpochInvalid),
}

impl EpochVerdict {
    /// Whether the server may have lost state.
    pub fn is_invalid(self) -> bool {
        matches!(self, EpochVerdict::Invalid(_))
    }
}

/// Why an epoch was judged invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EpochInvalid {
    /// `Curr_Server_Time < Prev_Server_Time - 1`.
    WentBackwards {
        /// Previous epoch.
        previous: u32,
        /// New epoch.
        current: u32,
    },
    /// The server's clock advanced too far for the client's elapsed time
    /// (`Client_Delta+2 < Server_Delta - Server_Delta/16`).
    ServerTooFast {
        /// Server_Delta, seconds.
        server_delta: i64,
        /// Client_Delta.
        client_delta: Duration,
    },
    /// The server's clock advanced too little
    /// (`Server_Delta+2 < Client_Delta - Client_Delta/16`): typically a
    /// restart that happened long enough ago for the epoch to have grown
    /// past the previous value again.
    ServerTooSlow {
        /// Server_Delta, seconds.
        server_delta: i64,
        /// Client_Delta.
        client_delta: Duration,
    },
}

/// Per-server epoch state: the previous epoch and when the client received it.
///
/// Pure: the caller passes the receipt time of each response.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EpochTracker {
    prev: Option<(u32, Instant)>,
}

const NANOS_PER_SEC: i128 = 1_000_000_000;

impl EpochTracker {
    /// A tracker that has seen no response yet.
    pub fn new() -> Self {
        EpochTracker::default()
    }

    /// The last epoch observed and the client time it was received at.
    pub fn previous(&self) -> Option<(u32, Instant)> {
        self.prev
    }

    /// A tracker that remembers `epoch`, received at `received`: a client
    /// restarting from its store checks the server's next answer against
    /// what it saw before (RFC 6887 section 8.5; failure-scenarios draft
    /// section 2.3: after its own restart the client needs no query, but
    /// must still notice a server that lost state meanwhile).
    pub fn resume(epoch: u32, received: Instant) -> Self {
        EpochTracker {
            prev: Some((epoch, received)),
        }
    }

    /// Forgets the server (RFC 6887 section 8.5 compares responses from
    /// one server; a new server address starts afresh).
    pub fn reset(&mut self) {
        self.prev = None;
    }

    /// Checks `epoch`, received at `received`, against the previous
    /// response, then records it for the next comparison (section 8.5
    /// records the values whatever the verdict).
    pub fn observe(&mut self, received: Instant, epoch: u32) -> EpochVerdict {
        let verdict = match self.prev {
            None => EpochVerdict::First,
            Some((prev_epoch, prev_time)) => judge(prev_epoch, prev_time, epoch, received),
        };
        self.prev = Some((epoch, received));
        verdict
    }
}

/// The section 8.5 comparison.
///
/// Epochs are u32 seconds that wrap after about 136 years; differences are
/// taken modulo 2^32 and read as signed, so a wrap is ordinary progress and
/// only a step back of more than 2^31 s could be misread.
/// The `/16` terms are evaluated exactly, in nanoseconds, by multiplying
/// through by 16: `C + 2 < S - S/16` is `16*C + 32 < 15*S`.
fn judge(prev_epoch: u32, prev_time: Instant, epoch: u32, received: Instant) -> EpochVerdict {
    // The sign of a wrapping difference is its top bit: that is the point.
    #[allow(clippy::cast_possible_wrap)]
    let server_delta = i64::from(epoch.wrapping_sub(prev_epoch) as i32);
    if server_delta < -1 {
        return EpochVerdict::Invalid(EpochInvalid::WentBackwards {
            previous: prev_epoch,
            current: epoch,
        });
    }
    // A receipt time earlier than the previous one (reordered calls) counts
    // as no elapsed time rather than a negative one.
    let client_delta = received.saturating_duration_since(prev_time);
    let c = i128::try_from(client_delta.as_nanos()).unwrap_or(i128::MAX / 64);
    let s = i128::from(server_delta) * NANOS_PER_SEC;
    let two = 2 * NANOS_PER_SEC;
    if 16 * (c + two) < 15 * s {
        EpochVerdict::Invalid(EpochInvalid::ServerTooFast {
            server_delta,
            client_delta,
        })
    } else if 16 * (s + two) < 15 * c {
        EpochVerdict::Invalid(EpochInvalid::ServerTooSlow {
            server_delta,
            client_delta,
        })
    } else {
        EpochVerdict::Valid
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// The tests' origin of fake time; only its arithmetic is used.
    #[allow(clippy::disallowed_methods)]
    fn t0() -> Instant {
        Instant::now()
    }

    #[test]
    fn rfc6887_s8_5_first_response_is_valid() {
        let t0 = t0();
        let mut e = EpochTracker::new();
        assert_eq!(e.observe(t0, 12345), EpochVerdict::First);
        assert_eq!(e.previous(), Some((12345, t0)));
    }

    #[test]
    fn rfc6887_s8_5_consistent_advance_is_valid() {
        let t0 = t0();
        let mut e = EpochTracker::new();
        e.observe(t0, 100);
        assert_eq!(e.observe(t0 + secs(60), 160), EpochVerdict::Valid);
        // Within 2 s + 1/16 either way.
        assert_eq!(e.observe(t0 + secs(120), 222), EpochVerdict::Valid);
        assert_eq!(e.observe(t0 + secs(180), 280), EpochVerdict::Valid);
        // Same second twice, and one second backwards (rounding), are fine.
        assert_eq!(e.observe(t0 + secs(180), 280), EpochVerdict::Valid);
        assert_eq!(e.observe(t0 + secs(180), 279), EpochVerdict::Valid);
    }

    #[test]
    fn rfc6887_s8_5_backwards_jump_is_invalid() {
        let t0 = t0();
        let mut e = EpochTracker::new();
        e.observe(t0, 1000);
        assert_eq!(
            e.observe(t0 + secs(5), 998),
            EpochVerdict::Invalid(EpochInvalid::WentBackwards {
                previous: 1000,
                current: 998
            })
        );
        // The new value is recorded: the next consistent one is valid.
        assert_eq!(e.observe(t0 + secs(15), 1008), EpochVerdict::Valid);
    }

    #[test]
    fn rfc6887_s8_5_server_too_fast_is_invalid() {
        let t0 = t0();
        let mut e = EpochTracker::new();
        e.observe(t0, 0);
        // Client 100 s: the bound is C + 2 >= 15/16 S, i.e. S <= 108.8.
        let mut ok = e;
        assert_eq!(ok.observe(t0 + secs(100), 108), EpochVerdict::Valid);
        assert!(matches!(
            e.observe(t0 + secs(100), 109),
            EpochVerdict::Invalid(EpochInvalid::ServerTooFast {
                server_delta: 109,
                ..
            })
        ));
    }

    #[test]
    fn rfc6887_s8_5_server_too_slow_is_invalid() {
        let t0 = t0();
        let mut e = EpochTracker::new();
        e.observe(t0, 0);
        // Client 1600 s: S + 2 >= 15/16 C = 1500, i.e. S >= 1498.
        let mut ok = e;
        assert_eq!(ok.observe(t0 + secs(1600), 1498), EpochVerdict::Valid);
        assert!(matches!(
            e.observe(t0 + secs(1600), 1497),
            EpochVerdict::Invalid(EpochInvalid::ServerTooSlow {
                server_delta: 1497,
                ..
            })
        ));
        // The classic lost-state case: a restart 10 s ago after an hour.
        let mut r = EpochTracker::new();
        r.observe(t0, 3600);
        assert!(r.observe(t0 + secs(3700), 10).is_invalid());
    }

    #[test]
    fn rfc6887_s8_5_fractional_client_delta_counts_exactly() {
        let t0 = t0();
        let mut e = EpochTracker::new();
        e.observe(t0, 0);
        // C = 1.9 s, S = 4: 16*(1.9+2) = 62.4 >= 60 -> valid.
        let mut ok = e;
        assert_eq!(
            ok.observe(t0 + Duration::from_millis(1900), 4),
            EpochVerdict::Valid
        );
        // C = 1.7 s: 16*3.7 = 59.2 < 60 -> too fast.
        assert!(e.observe(t0 + Duration::from_millis(1700), 4).is_invalid());
    }

    #[test]
    fn rfc6887_s8_5_wrap_around_is_progress() {
        let t0 = t0();
        let mut e = EpochTracker::new();
        e.observe(t0, u32::MAX - 5);
        assert_eq!(e.observe(t0 + secs(16), 10), EpochVerdict::Valid);
        // One second back across the wrap is rounding, two is a jump.
        let mut w = EpochTracker::new();
        w.observe(t0, 0);
        assert_eq!(w.observe(t0, u32::MAX), EpochVerdict::Valid);
        let mut w = EpochTracker::new();
        w.observe(t0, 0);
        assert!(matches!(
            w.observe(t0, u32::MAX - 1),
            EpochVerdict::Invalid(EpochInvalid::WentBackwards { .. })
        ));
    }

    #[test]
    fn rfc6887_s8_5_client_clock_going_backwards_never_panics() {
        let t0 = t0();
        let mut e = EpochTracker::new();
        e.observe(t0 + secs(10), 50);
        assert_eq!(e.observe(t0, 50), EpochVerdict::Valid);
    }
}
