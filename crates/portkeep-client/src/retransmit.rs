//! The retransmission schedule of RFC 6887 section 8.1.1.
//!
//! ```text
//! RT for the first message transmission is based on IRT:
//!     RT = (1 + RAND) * IRT
//! RT for each subsequent message transmission is based on the previous
//! value of RT:
//!     RT = (1 + RAND) * MIN (2 * RTprev, MRT)
//! ```
//!
//! with RAND uniformly distributed in [-0.1, +0.1] and IRT = 3 s,
//! MRT = 1024 s, MRC = 0, MRD = 0. MRC and MRD of 0 mean "no limit", so by
//! default a client retransmits forever, about every 17 minutes once the
//! cap is reached. RFC 6887 differs here from DHCPv6 (RFC 3315 section 14),
//! which jitters RTprev additively and re-draws RAND around MRT.
//!
//! This type also reads an MRT of 0 as "uncapped", which the RFC never
//! needs (its MRT is fixed) but keeps the four parameters uniform.

use std::time::Duration;

use rand::Rng;

/// Initial retransmission time, IRT (RFC 6887 section 8.1.1).
pub const IRT: Duration = Duration::from_secs(3);
/// Maximum retransmission time, MRT (RFC 6887 section 8.1.1).
pub const MRT: Duration = Duration::from_secs(1024);
/// Maximum retransmission count, MRC; 0 means unbounded (RFC 6887 section 8.1.1).
pub const MRC: u32 = 0;
/// Maximum retransmission duration, MRD; 0 means unbounded (RFC 6887 section 8.1.1).
pub const MRD: Duration = Duration::ZERO;

/// Smallest IRT the schedule accepts: a zero IRT would make every RT zero
/// and turn the transaction into a busy loop.
const MIN_IRT: Duration = Duration::from_millis(1);

/// The four parameters of RFC 6887 section 8.1.1. A zero value of `mrt`,
/// `mrc` or `mrd` means "no limit", exactly as in the RFC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetransmitParams {
    /// Initial retransmission time (IRT). Values under 1 ms are raised to 1 ms.
    pub irt: Duration,
    /// Cap on RT before randomisation (MRT); zero means uncapped.
    pub mrt: Duration,
    /// Maximum number of transmissions (MRC); zero means unbounded.
    pub mrc: u32,
    /// Maximum time from the first transmission (MRD); zero means unbounded.
    pub mrd: Duration,
}

impl Default for RetransmitParams {
    /// The RFC 6887 section 8.1.1 values: retransmit forever, doubling from
    /// 3 s up to about 1024 s.
    fn default() -> Self {
        RetransmitParams {
            irt: IRT,
            mrt: MRT,
            mrc: MRC,
            mrd: MRD,
        }
    }
}

/// Draws RAND, uniform in [-0.1, +0.1] (RFC 6887 section 8.1.1).
fn rand_factor<R: Rng + ?Sized>(rng: &mut R) -> f64 {
    rng.gen_range(-0.1..=0.1)
}

/// Scales a duration by a positive factor without ever panicking: results
/// too large for a `Duration` saturate (they can only arise when MRT is 0
/// and the schedule has doubled for centuries).
fn scale(d: Duration, factor: f64) -> Duration {
    Duration::try_from_secs_f64(d.as_secs_f64() * factor).unwrap_or(Duration::MAX)
}

impl RetransmitParams {
    /// RT before the first retransmission: `(1 + RAND) * IRT`.
    pub(crate) fn first_rt<R: Rng + ?Sized>(&self, rng: &mut R) -> Duration {
        let irt = self.irt.max(MIN_IRT);
        scale(irt, 1.0 + rand_factor(rng))
    }

    /// RT after `prev`: `(1 + RAND) * MIN(2 * RTprev, MRT)`.
    pub(crate) fn next_rt<R: Rng + ?Sized>(&self, prev: Duration, rng: &mut R) -> Duration {
        let doubled = prev.saturating_mul(2);
        let base = if self.mrt.is_zero() {
            doubled
        } else {
            doubled.min(self.mrt)
        };
        scale(base, 1.0 + rand_factor(rng))
    }
}
