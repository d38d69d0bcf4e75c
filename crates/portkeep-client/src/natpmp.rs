//! NAT-PMP (RFC 6886) client, sans-IO: one request with the protocol's own
//! retransmission schedule and response matching, and its epoch check.
//! Used when a server speaks only NAT-PMP (it answers PCP with version 0,
//! RFC 6887 section 9 and appendix A), or when asked to (`portkeep
//! --natpmp`). The tokio driver is `Client::natpmp`.

use std::time::{Duration, Instant};

use portkeep_proto::natpmp::{NatPmpReply, NatPmpRequest, NatPmpResult, RESPONSE_BIT};
use portkeep_proto::NATPMP_VERSION;

/// First wait (RFC 6886 section 3.1: 250 ms, doubling).
pub const NATPMP_FIRST_WAIT: Duration = Duration::from_millis(250);
/// Sends before giving up (section 3.1: "after 9 attempts").
pub const NATPMP_SENDS: u32 = 9;

/// What a datagram from the gateway meant for a [`NatPmpTransaction`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatPmpOutcome {
    /// The response to the request.
    Reply(NatPmpReply),
    /// The gateway does not speak NAT-PMP: it answered with PCP (version
    /// 2, RFC 6887 appendix A) or NAT-PMP's result 1.
    Unsupported,
}

/// One NAT-PMP request: sent at 0, 250 ms, 750 ms, ... (each wait twice
/// the last), nine times, then 64 s more of waiting (RFC 6886 section
/// 3.1), or until `max_wait` from the first send, whichever is first.
#[derive(Debug, Clone)]
pub struct NatPmpTransaction {
    request: NatPmpRequest,
    bytes: Vec<u8>,
    start: Instant,
    sends: u32,
    next: Option<Instant>,
    wait: Duration,
    give_up: Instant,
}

impl NatPmpTransaction {
    /// A request to send now; `max_wait` bounds it (zero: the RFC's own
    /// limit only).
    pub fn new(now: Instant, request: NatPmpRequest, max_wait: Duration) -> NatPmpTransaction {
        // The ninth send leaves 63.75 s after the first; 64 s of waiting
        // follow it.
        let rfc = now + Duration::from_millis(250 * 255) + Duration::from_secs(64);
        let give_up = if max_wait.is_zero() {
            rfc
        } else {
            rfc.min(now + max_wait)
        };
        NatPmpTransaction {
            bytes: request.to_bytes(),
            request,
            start: now,
            sends: 0,
            next: Some(now),
            wait: NATPMP_FIRST_WAIT,
            give_up,
        }
    }

    /// The request.
    pub fn request(&self) -> &NatPmpRequest {
        &self.request
    }

    /// How many times it was sent.
    pub fn sends(&self) -> u32 {
        self.sends
    }

    /// Since the first send.
    pub fn elapsed(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.start)
    }

    /// The datagram to send now, if one is due.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<&[u8]> {
        let due = self.next.filter(|&t| t <= now)?;
        self.sends += 1;
        self.next = (self.sends < NATPMP_SENDS).then(|| {
            let at = due.max(now) + self.wait;
            self.wait *= 2;
            at
        });
        Some(&self.bytes)
    }

    /// When to call [`NatPmpTransaction::poll_transmit`] or check
    /// [`NatPmpTransaction::timed_out`] next.
    pub fn poll_timeout(&self) -> Instant {
        self.next.map_or(self.give_up, |n| n.min(self.give_up))
    }

    /// Whether it is over without an answer.
    pub fn timed_out(&self, now: Instant) -> bool {
        now >= self.give_up
    }

    /// A datagram from the gateway: the response to this request (the
    /// response opcode for it, and for a map request the same internal
    /// port), a sign that the gateway does not speak NAT-PMP, or `None`
    /// (not for us: RFC 6886 section 3.1 has no transaction ID).
    pub fn handle_input(&self, datagram: &[u8]) -> Option<NatPmpOutcome> {
        let first = *datagram.first()?;
        let result = datagram.get(2..4).map(|r| u16::from_be_bytes([r[0], r[1]]));
        if first != NATPMP_VERSION {
            // A PCP server: its UNSUPP_VERSION reads as result 1.
            return (first == portkeep_proto::VERSION && result == Some(1))
                .then_some(NatPmpOutcome::Unsupported);
        }
        let op = match self.request {
            NatPmpRequest::ExternalAddress => portkeep_proto::natpmp::OP_EXTERNAL_ADDRESS,
            NatPmpRequest::Map { protocol, .. } => protocol.opcode(),
        };
        let got = *datagram.get(1)?;
        if result == Some(NatPmpResult::UNSUPPORTED_VERSION.0)
            && [0, RESPONSE_BIT, RESPONSE_BIT | op].contains(&got)
        {
            // Erratum 3618: some gateways send opcode 0 here.
            return Some(NatPmpOutcome::Unsupported);
        }
        if got != RESPONSE_BIT | op {
            return None;
        }
        let reply = NatPmpReply::parse(datagram)?;
        match (reply, self.request) {
            (
                NatPmpReply::Map { internal_port, .. },
                NatPmpRequest::Map {
                    internal_port: asked,
                    ..
                },
            ) if internal_port != asked => None,
            _ => Some(NatPmpOutcome::Reply(reply)),
        }
    }
}

/// The epoch check of RFC 6886 section 3.6: a gateway's seconds since
/// start of epoch more than 2 s below what 7/8 of the local time elapsed
/// predicts means it lost its mappings. (PCP's check, RFC 6887 section
/// 8.5, also flags an epoch that runs too fast; this one does not.)
#[derive(Debug, Clone, Copy, Default)]
pub struct NatPmpEpoch {
    last: Option<(Instant, u32)>,
}

impl NatPmpEpoch {
    /// Nothing seen yet.
    pub fn new() -> NatPmpEpoch {
        NatPmpEpoch::default()
    }

    /// `epoch` received at `at`: false if the gateway lost state since
    /// the last one.
    pub fn observe(&mut self, at: Instant, epoch: u32) -> bool {
        let ok = match self.last {
            None => true,
            Some((then, prev)) => {
                let elapsed = at.saturating_duration_since(then).as_secs_f64();
                let expected = f64::from(prev) + elapsed * 7.0 / 8.0;
                f64::from(epoch) + 2.0 >= expected
            }
        };
        self.last = Some((at, epoch));
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use portkeep_proto::natpmp::NatPmpProtocol;

    /// The tests' origin of fake time; only its arithmetic is used.
    #[allow(clippy::disallowed_methods)]
    fn t0() -> Instant {
        Instant::now()
    }

    fn map() -> NatPmpRequest {
        NatPmpRequest::Map {
            protocol: NatPmpProtocol::Tcp,
            internal_port: 8080,
            suggested_external_port: 0,
            lifetime: 7200,
        }
    }

    #[test]
    fn rfc6886_s3_1_nine_sends_doubling_from_250_ms_then_64_s() {
        let t0 = t0();
        let mut tx = NatPmpTransaction::new(t0, map(), Duration::ZERO);
        let mut at = Vec::new();
        let mut now = t0;
        while !tx.timed_out(now) {
            if tx.poll_transmit(now).is_some() {
                at.push(now.duration_since(t0).as_millis());
            }
            now = tx.poll_timeout();
        }
        assert_eq!(at, [0, 250, 750, 1750, 3750, 7750, 15750, 31750, 63750]);
        assert_eq!(now.duration_since(t0), Duration::from_millis(63750 + 64000));
    }

    #[test]
    fn a_bound_cuts_the_schedule_short() {
        let t0 = t0();
        let tx = NatPmpTransaction::new(t0, map(), Duration::from_secs(2));
        assert!(tx.timed_out(t0 + Duration::from_secs(2)));
        assert!(!tx.timed_out(t0 + Duration::from_millis(1999)));
    }

    #[test]
    fn rfc6886_s3_1_only_the_response_to_the_request_matches() {
        let tx = NatPmpTransaction::new(t0(), map(), Duration::ZERO);
        let reply = |op: u8, port: u16| {
            let mut b = vec![0, op, 0, 0, 0, 0, 0, 9];
            b.extend_from_slice(&port.to_be_bytes());
            b.extend_from_slice(&[0x9c, 0x40, 0, 0, 0x1c, 0x20]);
            b
        };
        assert!(matches!(
            tx.handle_input(&reply(130, 8080)),
            Some(NatPmpOutcome::Reply(NatPmpReply::Map {
                external_port: 40000,
                ..
            }))
        ));
        assert_eq!(tx.handle_input(&reply(129, 8080)), None, "UDP, not TCP");
        assert_eq!(tx.handle_input(&reply(130, 8081)), None, "another port");
        assert_eq!(tx.handle_input(&[0, 2, 0, 0]), None, "a request");
    }

    #[test]
    fn rfc6887_appendix_a_a_pcp_only_or_unsupporting_gateway_is_recognised() {
        let tx = NatPmpTransaction::new(t0(), map(), Duration::ZERO);
        let mut pcp = vec![2, 0x80, 0, 1];
        pcp.extend_from_slice(&[0; 20]);
        assert_eq!(tx.handle_input(&pcp), Some(NatPmpOutcome::Unsupported));
        for op in [0, 128, 130] {
            assert_eq!(
                tx.handle_input(&[0, op, 0, 1, 0, 0, 0, 0]),
                Some(NatPmpOutcome::Unsupported),
                "opcode {op} (erratum 3618)"
            );
        }
    }

    #[test]
    fn rfc6886_s3_6_epoch_below_seven_eighths_of_elapsed_less_2_s_is_a_loss() {
        let t0 = t0();
        let mut e = NatPmpEpoch::new();
        assert!(e.observe(t0, 1000));
        // 80 s later: expected 1070; 1068 is within 2 s.
        assert!(e.observe(t0 + Duration::from_secs(80), 1068));
        // 80 s after that: expected 1138; 1135 is not.
        assert!(!e.observe(t0 + Duration::from_secs(160), 1135));
        // A gateway whose clock runs fast is not flagged (unlike PCP).
        assert!(e.observe(t0 + Duration::from_secs(161), 99_999));
    }
}
