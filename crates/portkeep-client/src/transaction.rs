//! One PCP request/response exchange, sans-IO (RFC 6887 sections 8.1.1
//! and 8.3): retransmission of the identical datagram, response matching,
//! and failure after MRC transmissions or MRD elapsed.
//!
//! The caller owns the socket and the clock. The contract follows
//! quinn-proto: call [`Transaction::poll_transmit`] until it returns `None`
//! and send what it returns; sleep until [`Transaction::poll_timeout`] and
//! then call [`Transaction::handle_timeout`]; feed every datagram from the
//! server to [`Transaction::handle_input`]; drain [`Transaction::poll_event`].

use std::collections::VecDeque;
use std::net::Ipv6Addr;
use std::time::{Duration, Instant};

use portkeep_proto::{
    CodePoints, EncodeError, GetData, Nonce, OpData, Opcode, ParseError, Protocol, Request,
    Response, ResultCode, GET_BODY_LEN, MAP_BODY_LEN, NONCE_LEN, PEER_BODY_LEN,
};
use rand::Rng;

use crate::retransmit::RetransmitParams;

/// What a response must echo to belong to a request.
///
/// RFC 6887 section 8.3 (client side): the opcode must be that of an
/// outstanding request. Section 11.4 (MAP) and 12.4 (PEER): the mapping
/// nonce, protocol and internal port must match too, and for PEER the remote
/// peer address and port, which the server copies from the request
/// (section 12.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseKey {
    /// Opcode of the request.
    pub opcode: Opcode,
    /// MAP/PEER fields, absent for ANNOUNCE and opcodes without a nonce.
    pub mapping: Option<MappingKey>,
    /// PEER only: remote peer port and address.
    pub remote: Option<(u16, Ipv6Addr)>,
    /// GET only: the filter, which a response copies bit for bit
    /// (failure-scenarios draft section 4.1).
    pub get: Option<GetData>,
}

/// The MAP-shaped fields a MAP or PEER response must echo (RFC 6887 section 11.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MappingKey {
    /// Mapping nonce.
    pub nonce: Nonce,
    /// Protocol.
    pub protocol: Protocol,
    /// Internal port.
    pub internal_port: u16,
}

impl ResponseKey {
    /// The key of `request`.
    pub fn of(request: &Request, cp: &CodePoints) -> ResponseKey {
        let mapping = request.data.map_part().map(|m| MappingKey {
            nonce: m.nonce,
            protocol: m.protocol,
            internal_port: m.internal_port,
        });
        let remote = match &request.data {
            OpData::Peer(p) => Some((p.remote_port, p.remote_ip)),
            _ => None,
        };
        let get = match &request.data {
            OpData::Get(g) => Some(*g),
            _ => None,
        };
        ResponseKey {
            opcode: request.data.opcode(cp),
            mapping,
            remote,
            get,
        }
    }

    /// Checks a parsed response against the key.
    pub fn check(&self, response: &Response, cp: &CodePoints) -> Result<(), Ignored> {
        let opcode = response.data.opcode(cp);
        if opcode != self.opcode {
            return Err(Ignored::OpcodeMismatch {
                expected: self.opcode,
                got: opcode,
            });
        }
        if let Some(want) = &self.mapping {
            if let OpData::Opaque { payload, .. } = &response.data {
                return self.check_opaque(response.header.result, payload, want);
            }
            let Some(got) = response.data.map_part() else {
                return Err(Ignored::MissingBody);
            };
            if got.nonce != want.nonce {
                return Err(Ignored::NonceMismatch);
            }
            if got.protocol != want.protocol {
                return Err(Ignored::ProtocolMismatch {
                    expected: want.protocol,
                    got: got.protocol,
                });
            }
            if got.internal_port != want.internal_port {
                return Err(Ignored::InternalPortMismatch {
                    expected: want.internal_port,
                    got: got.internal_port,
                });
            }
        }
        if let Some(want) = self.remote {
            match &response.data {
                OpData::Peer(p) if (p.remote_port, p.remote_ip) == want => {}
                _ => return Err(Ignored::RemotePeerMismatch),
            }
        }
        if let Some(want) = &self.get {
            let echoed = match &response.data {
                OpData::Get(g) => g == want,
                // An error copy of a GET whose options did not parse.
                OpData::Opaque { payload, .. } if response.header.result != ResultCode::SUCCESS => {
                    let mut body = Vec::with_capacity(GET_BODY_LEN);
                    OpData::Get(*want).emit_body(&mut body);
                    payload.get(..GET_BODY_LEN).is_some_and(|p| {
                        // The reserved octet is not compared.
                        p[..3] == body[..3] && p[4..] == body[4..]
                    })
                }
                _ => false,
            };
            if !echoed {
                return Err(Ignored::GetFilterMismatch);
            }
        }
        Ok(())
    }

    /// Matches a MAP/PEER response the codec could not parse into a body
    /// ([`OpData::Opaque`]), the opcode having matched already.
    ///
    /// An error response is a copy of the request (RFC 6887 sections 7.2
    /// and 8.2), so when the request failed to parse on the server (a
    /// MALFORMED_OPTION reply echoes the bad option), the copy does not
    /// parse either, yet it is the answer the client waits for: ignoring it
    /// would turn every such error into a timeout. The rule:
    ///
    /// - a SUCCESS response must parse: an unparsable one is never ours
    ///   ([`Ignored::MissingBody`]);
    /// - an error response must start with the request's mapping nonce
    ///   (the first 12 octets of the MAP and PEER bodies, RFC 6887
    ///   sections 11.1 and 12.1). The nonce is the client's defence against
    ///   spoofed and stale responses (section 8.3: a response that does not
    ///   match an outstanding request is ignored; section 11.4: the nonce
    ///   must match), so it is never skipped: a different one is
    ///   [`Ignored::NonceMismatch`];
    /// - the copy must hold our whole opcode body (36 octets for MAP, 56
    ///   for PEER). Our requests always carry it and the server copies up
    ///   to 1100 octets, so a shorter payload, even one that starts with our
    ///   nonce, is not a copy of our request ([`Ignored::MissingBody`]);
    /// - protocol, internal port and (PEER) remote peer port and address
    ///   must match too, as sections 11.4 and 12.4 ask of parsed responses.
    fn check_opaque(
        &self,
        result: ResultCode,
        payload: &[u8],
        want: &MappingKey,
    ) -> Result<(), Ignored> {
        if result == ResultCode::SUCCESS {
            return Err(Ignored::MissingBody);
        }
        let body_len = if self.remote.is_some() {
            PEER_BODY_LEN
        } else {
            MAP_BODY_LEN
        };
        let Some(body) = payload.get(..body_len) else {
            return Err(Ignored::MissingBody);
        };
        // MAP body: nonce (12) | protocol (1) | reserved (3) |
        // internal port (2) | external port (2) | external IP (16); PEER
        // continues: remote port (2) | reserved (2) | remote IP (16).
        if body[..NONCE_LEN] != want.nonce {
            return Err(Ignored::NonceMismatch);
        }
        let protocol = Protocol(body[12]);
        if protocol != want.protocol {
            return Err(Ignored::ProtocolMismatch {
                expected: want.protocol,
                got: protocol,
            });
        }
        let internal_port = u16::from_be_bytes([body[16], body[17]]);
        if internal_port != want.internal_port {
            return Err(Ignored::InternalPortMismatch {
                expected: want.internal_port,
                got: internal_port,
            });
        }
        if let Some(want) = self.remote {
            let mut ip = [0u8; 16];
            ip.copy_from_slice(&body[40..56]);
            let got = (u16::from_be_bytes([body[36], body[37]]), Ipv6Addr::from(ip));
            if got != want {
                return Err(Ignored::RemotePeerMismatch);
            }
        }
        Ok(())
    }
}

/// Why a datagram did not complete the transaction. The datagram is dropped
/// and the transaction goes on (RFC 6887 section 8.3: responses that do
/// not match an outstanding request are ignored).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Ignored {
    /// The datagram is not a well-formed PCP response.
    Unparsable(ParseError),
    /// A response to another opcode.
    OpcodeMismatch {
        /// Opcode of our request.
        expected: Opcode,
        /// Opcode of the response.
        got: Opcode,
    },
    /// A MAP/PEER response without a body to compare.
    MissingBody,
    /// The mapping nonce differs.
    NonceMismatch,
    /// The protocol differs.
    ProtocolMismatch {
        /// Protocol of our request.
        expected: Protocol,
        /// Protocol of the response.
        got: Protocol,
    },
    /// The internal port differs.
    InternalPortMismatch {
        /// Internal port of our request.
        expected: u16,
        /// Internal port of the response.
        got: u16,
    },
    /// A PEER response for another remote peer.
    RemotePeerMismatch,
    /// A GET response whose body is not a copy of our filter.
    GetFilterMismatch,
    /// The transaction already completed or failed.
    Finished,
}

impl std::fmt::Display for Ignored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ignored::Unparsable(e) => write!(f, "unparsable datagram: {e}"),
            Ignored::OpcodeMismatch { expected, got } => {
                write!(f, "response to opcode {got}, expected {expected}")
            }
            Ignored::MissingBody => f.write_str("response without a MAP/PEER body"),
            Ignored::NonceMismatch => f.write_str("mapping nonce does not match"),
            Ignored::ProtocolMismatch { expected, got } => {
                write!(f, "protocol {got} does not match {expected}")
            }
            Ignored::InternalPortMismatch { expected, got } => {
                write!(f, "internal port {got} does not match {expected}")
            }
            Ignored::RemotePeerMismatch => f.write_str("remote peer does not match"),
            Ignored::GetFilterMismatch => f.write_str("GET filter does not match"),
            Ignored::Finished => f.write_str("transaction already finished"),
        }
    }
}

/// Why a transaction gave up (RFC 6887 section 8.1.1: MRC or MRD reached).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimedOut {
    /// How many times the request was sent.
    pub transmissions: u32,
    /// Time from the first transmission to giving up.
    pub elapsed: Duration,
}

/// Something the caller should know about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A matching response arrived; the transaction is complete.
    Response {
        /// The response.
        response: Response,
        /// When it was handed to [`Transaction::handle_input`]; the epoch
        /// check of RFC 6887 section 8.5 needs the client's receipt time.
        received: Instant,
        /// How many times the request had been sent.
        transmissions: u32,
    },
    /// A datagram was dropped.
    Ignored(Ignored),
    /// No response within the limits; the transaction is over.
    TimedOut(TimedOut),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting to send, or waiting for a response.
    Active,
    /// Completed or failed; nothing more happens.
    Finished,
}

/// One request and its retransmissions, sans-IO.
///
/// Every transmission is the same octets (RFC 6887 section 8.1.1: a
/// retransmission reuses the nonce, so a server that saw the first copy
/// treats the next as a refresh of the same mapping).
#[derive(Debug)]
pub struct Transaction<R> {
    bytes: Vec<u8>,
    key: ResponseKey,
    cp: CodePoints,
    params: RetransmitParams,
    rng: R,
    state: State,
    /// When the next transmission is due.
    next_tx: Option<Instant>,
    /// RT used for the last scheduling decision.
    rt: Option<Duration>,
    /// Time of the first transmission: MRD counts from it.
    first_tx: Option<Instant>,
    transmissions: u32,
    events: VecDeque<Event>,
}

impl<R: Rng> Transaction<R> {
    /// Starts a transaction whose first transmission is due at `now`.
    ///
    /// `rng` supplies RAND for the jitter; pass a seeded generator for
    /// deterministic tests.
    pub fn new(
        now: Instant,
        request: &Request,
        cp: CodePoints,
        params: RetransmitParams,
        rng: R,
    ) -> Result<Self, EncodeError> {
        let bytes = request.to_bytes(&cp)?;
        Ok(Transaction {
            bytes,
            key: ResponseKey::of(request, &cp),
            cp,
            params,
            rng,
            state: State::Active,
            next_tx: Some(now),
            rt: None,
            first_tx: None,
            transmissions: 0,
            events: VecDeque::new(),
        })
    }

    /// The encoded request, as it goes on the wire each time.
    pub fn datagram(&self) -> &[u8] {
        &self.bytes
    }

    /// What a response must echo to complete this transaction.
    pub fn key(&self) -> &ResponseKey {
        &self.key
    }

    /// Whether the transaction completed or failed.
    pub fn is_finished(&self) -> bool {
        self.state == State::Finished
    }

    /// How many times the request has been handed out for sending.
    pub fn transmissions(&self) -> u32 {
        self.transmissions
    }

    /// The RT most recently chosen (the wait after the last transmission).
    pub fn current_rt(&self) -> Option<Duration> {
        self.rt
    }

    fn mrd_deadline(&self) -> Option<Instant> {
        if self.params.mrd.is_zero() {
            return None;
        }
        self.first_tx.and_then(|t| t.checked_add(self.params.mrd))
    }

    fn mrc_reached(&self) -> bool {
        self.params.mrc != 0 && self.transmissions >= self.params.mrc
    }

    /// The datagram to send now, if one is due.
    ///
    /// Sending is the caller's job; the schedule assumes it happens at `now`.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Vec<u8>> {
        if self.state != State::Active || self.mrc_reached() {
            return None;
        }
        if self.mrd_deadline().is_some_and(|d| now >= d) {
            return None;
        }
        let due = self.next_tx?;
        if now < due {
            return None;
        }
        let rt = match self.rt {
            None => self.params.first_rt(&mut self.rng),
            Some(prev) => self.params.next_rt(prev, &mut self.rng),
        };
        self.rt = Some(rt);
        self.first_tx.get_or_insert(now);
        self.transmissions = self.transmissions.saturating_add(1);
        // An RT too large to add to `now` can only mean "never again".
        self.next_tx = now.checked_add(rt);
        Some(self.bytes.clone())
    }

    /// When [`Self::handle_timeout`] (and then [`Self::poll_transmit`])
    /// should next be called; `None` once the transaction is finished or
    /// has nothing left to wait for.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.state != State::Active {
            return None;
        }
        match (self.next_tx, self.mrd_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Advances time: gives up when MRD has elapsed since the first
    /// transmission, or when MRC transmissions went unanswered for the last
    /// RT (RFC 6887 section 8.1.1).
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.state != State::Active {
            return;
        }
        let mrd_over = self.mrd_deadline().is_some_and(|d| now >= d);
        let mrc_over = self.mrc_reached() && self.next_tx.is_some_and(|t| now >= t);
        if mrd_over || mrc_over {
            self.state = State::Finished;
            let elapsed = self
                .first_tx
                .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
            self.events.push_back(Event::TimedOut(TimedOut {
                transmissions: self.transmissions,
                elapsed,
            }));
        }
    }

    /// Offers a datagram received from the server. Returns whether it
    /// completed the transaction; details go to [`Self::poll_event`].
    ///
    /// Never panics, whatever the octets.
    pub fn handle_input(&mut self, now: Instant, datagram: &[u8]) -> bool {
        if self.state != State::Active {
            self.events.push_back(Event::Ignored(Ignored::Finished));
            return false;
        }
        let response = match Response::parse(datagram, &self.cp) {
            Ok(r) => r,
            Err(e) => {
                self.events
                    .push_back(Event::Ignored(Ignored::Unparsable(e)));
                return false;
            }
        };
        if let Err(why) = self.key.check(&response, &self.cp) {
            self.events.push_back(Event::Ignored(why));
            return false;
        }
        self.state = State::Finished;
        self.events.push_back(Event::Response {
            response,
            received: now,
            transmissions: self.transmissions,
        });
        true
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::RequestBuilder;
    use crate::retransmit::{IRT, MRT};
    use portkeep_proto::{MapData, PeerData, ResponseHeader, ResultCode};
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    const CLIENT: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 10));

    /// The tests' origin of fake time; only its arithmetic is used.
    #[allow(clippy::disallowed_methods)]
    fn t0() -> Instant {
        Instant::now()
    }

    fn map_request() -> Request {
        RequestBuilder::map(Protocol::TCP, 8080)
            .nonce([0x42; 12])
            .build(CLIENT)
            .unwrap()
    }

    fn tx_with(
        req: &Request,
        params: RetransmitParams,
        seed: u64,
        now: Instant,
    ) -> Transaction<StdRng> {
        Transaction::new(
            now,
            req,
            CodePoints::default(),
            params,
            StdRng::seed_from_u64(seed),
        )
        .unwrap()
    }

    fn response(data: OpData, result: ResultCode) -> Vec<u8> {
        Response {
            header: ResponseHeader {
                result,
                lifetime: 600,
                epoch: 77,
            },
            data,
            options: Vec::new(),
        }
        .to_bytes(&CodePoints::default())
        .unwrap()
    }

    fn success_for(req: &Request) -> Vec<u8> {
        response(req.data.clone(), ResultCode::SUCCESS)
    }

    /// Runs the transaction as a driver would, with nobody answering, and
    /// returns the transmission times and the event that ended it.
    fn run_unanswered(
        tx: &mut Transaction<StdRng>,
        start: Instant,
        max_tx: usize,
    ) -> (Vec<Instant>, Option<Event>) {
        let first = tx.datagram().to_vec();
        let mut times = Vec::new();
        let mut now = start;
        loop {
            tx.handle_timeout(now);
            while let Some(d) = tx.poll_transmit(now) {
                assert_eq!(d, first, "retransmissions must be identical");
                times.push(now);
            }
            if let Some(ev) = tx.poll_event() {
                return (times, Some(ev));
            }
            if times.len() >= max_tx {
                return (times, None);
            }
            match tx.poll_timeout() {
                Some(t) => {
                    assert!(t >= now, "timeouts never go back in time");
                    now = t;
                }
                None => return (times, None),
            }
        }
    }

    fn gaps(times: &[Instant]) -> Vec<f64> {
        times
            .windows(2)
            .map(|w| (w[1] - w[0]).as_secs_f64())
            .collect()
    }

    #[test]
    fn rfc6887_s8_1_1_first_transmission_is_immediate() {
        let start = t0();
        let req = map_request();
        let mut tx = tx_with(&req, RetransmitParams::default(), 1, start);
        assert_eq!(tx.poll_timeout(), Some(start));
        assert_eq!(tx.poll_transmit(start).as_deref(), Some(tx.datagram()));
        // Nothing more is due at the same instant.
        assert_eq!(tx.poll_transmit(start), None);
        assert_eq!(tx.transmissions(), 1);
        let next = tx.poll_timeout().unwrap();
        let rt = (next - start).as_secs_f64();
        assert!((2.7..=3.3).contains(&rt), "first RT {rt} not IRT +-10%");
        // Not yet due just before the timeout.
        assert_eq!(tx.poll_transmit(next - Duration::from_millis(1)), None);
    }

    #[test]
    fn rfc6887_s8_1_1_retransmission_doubles_with_jitter() {
        let start = t0();
        let req = map_request();
        for seed in 0..20 {
            let mut tx = tx_with(&req, RetransmitParams::default(), seed, start);
            let (times, ev) = run_unanswered(&mut tx, start, 16);
            assert_eq!(ev, None, "MRC and MRD are unbounded by default");
            assert_eq!(times.len(), 16);
            let g = gaps(&times);
            let irt = IRT.as_secs_f64();
            let mrt = MRT.as_secs_f64();
            assert!(
                (0.9 * irt..=1.1 * irt).contains(&g[0]),
                "seed {seed}: {g:?}"
            );
            let mut capped = false;
            for w in g.windows(2) {
                let (prev, rt) = (w[0], w[1]);
                // RT = (1 + RAND) * MIN(2 * RTprev, MRT).
                let base = (2.0 * prev).min(mrt);
                capped |= 2.0 * prev >= mrt;
                assert!(
                    (0.9 * base - 1e-6..=1.1 * base + 1e-6).contains(&rt),
                    "seed {seed}: {rt} not (1+RAND)*{base}: {g:?}"
                );
                assert!(rt <= 1.1 * mrt + 1e-6, "seed {seed}: above the cap: {g:?}");
            }
            assert!(capped, "seed {seed}: never reached MRT: {g:?}");
            // Jitter is real: the gaps are not exact powers of two of IRT.
            assert!(g.iter().any(|x| (x / irt).log2().fract().abs() > 1e-6));
        }
    }

    #[test]
    fn rfc6887_s8_1_1_jitter_rng_is_injectable_and_deterministic() {
        let start = t0();
        let req = map_request();
        let run = |seed| {
            let mut tx = tx_with(&req, RetransmitParams::default(), seed, start);
            gaps(&run_unanswered(&mut tx, start, 8).0)
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn rfc6887_s8_1_1_mrt_caps_rt() {
        let start = t0();
        let req = map_request();
        let params = RetransmitParams {
            mrt: Duration::from_secs(10),
            ..RetransmitParams::default()
        };
        let mut tx = tx_with(&req, params, 3, start);
        let (times, _) = run_unanswered(&mut tx, start, 12);
        let g = gaps(&times);
        // About 3, 6, ~10, then 2 * RTprev > MRT for good: (1 + RAND) * 10.
        assert!(g[1] < 7.3, "{g:?}");
        assert!(g[2] <= 11.0, "{g:?}");
        for rt in &g[3..] {
            assert!((9.0..=11.0).contains(rt), "{g:?}");
        }
    }

    #[test]
    fn rfc6887_s8_1_1_stops_at_mrd() {
        let start = t0();
        let req = map_request();
        let mrd = Duration::from_secs(20);
        for seed in 0..10 {
            let params = RetransmitParams {
                mrd,
                ..RetransmitParams::default()
            };
            let mut tx = tx_with(&req, params, seed, start);
            let (times, ev) = run_unanswered(&mut tx, start, 100);
            assert!(times.len() >= 3, "{seed}: 0 s, ~3 s, ~9 s at least");
            assert!(times.iter().all(|t| *t < start + mrd));
            let Some(Event::TimedOut(t)) = ev else {
                panic!("expected a timeout, got {ev:?}")
            };
            assert_eq!(t.elapsed, mrd, "gives up exactly at MRD");
            assert_eq!(t.transmissions as usize, times.len());
            assert!(tx.is_finished());
            assert_eq!(tx.poll_timeout(), None);
            assert_eq!(tx.poll_transmit(start + mrd * 100), None);
            // A late response no longer completes anything.
            assert!(!tx.handle_input(start + mrd, &success_for(&req)));
            assert_eq!(tx.poll_event(), Some(Event::Ignored(Ignored::Finished)));
        }
    }

    #[test]
    fn rfc6887_s8_1_1_mrc_bounds_transmissions() {
        let start = t0();
        let req = map_request();
        let params = RetransmitParams {
            mrc: 3,
            ..RetransmitParams::default()
        };
        let mut tx = tx_with(&req, params, 5, start);
        let (times, ev) = run_unanswered(&mut tx, start, 100);
        assert_eq!(times.len(), 3);
        let Some(Event::TimedOut(t)) = ev else {
            panic!("expected a timeout, got {ev:?}")
        };
        assert_eq!(t.transmissions, 3);
        // It waited out the last RT (about 12 s) before giving up.
        let last = times[2] - times[1];
        assert!(t.elapsed > times[2] - start + last, "{t:?}");
    }

    #[test]
    fn rfc6887_s8_1_1_response_stops_retransmission() {
        let start = t0();
        let req = map_request();
        let mut tx = tx_with(&req, RetransmitParams::default(), 1, start);
        assert!(tx.poll_transmit(start).is_some());
        let at = start + Duration::from_millis(30);
        assert!(tx.handle_input(at, &success_for(&req)));
        match tx.poll_event() {
            Some(Event::Response {
                response,
                received,
                transmissions,
            }) => {
                assert_eq!(received, at);
                assert_eq!(transmissions, 1);
                assert_eq!(response.header.epoch, 77);
            }
            other => panic!("expected a response, got {other:?}"),
        }
        assert!(tx.is_finished());
        assert_eq!(tx.poll_timeout(), None);
        assert_eq!(tx.poll_transmit(start + Duration::from_secs(3600)), None);
    }

    #[test]
    fn rfc6887_s11_4_response_must_match_opcode_nonce_protocol_and_port() {
        let start = t0();
        let req = map_request();
        let OpData::Map(m) = req.data.clone() else {
            unreachable!()
        };
        let mut tx = tx_with(&req, RetransmitParams::default(), 1, start);
        tx.poll_transmit(start);
        let wrong = [
            (
                OpData::Map(MapData {
                    nonce: [0x43; 12],
                    ..m
                }),
                Ignored::NonceMismatch,
            ),
            (
                OpData::Map(MapData {
                    protocol: Protocol::UDP,
                    ..m
                }),
                Ignored::ProtocolMismatch {
                    expected: Protocol::TCP,
                    got: Protocol::UDP,
                },
            ),
            (
                OpData::Map(MapData {
                    internal_port: 8081,
                    ..m
                }),
                Ignored::InternalPortMismatch {
                    expected: 8080,
                    got: 8081,
                },
            ),
            (
                OpData::Announce,
                Ignored::OpcodeMismatch {
                    expected: Opcode::MAP,
                    got: Opcode::ANNOUNCE,
                },
            ),
        ];
        for (data, why) in wrong {
            assert!(!tx.handle_input(start, &response(data, ResultCode::SUCCESS)));
            assert_eq!(tx.poll_event(), Some(Event::Ignored(why)));
        }
        // Not responses at all: runt, the request itself (R bit clear),
        // version 1, odd length.
        let mut v1 = success_for(&req);
        v1[0] = 1;
        let mut odd = success_for(&req);
        odd.push(0);
        for junk in [vec![], vec![2], tx.datagram().to_vec(), v1, odd] {
            assert!(!tx.handle_input(start, &junk));
            assert!(matches!(
                tx.poll_event(),
                Some(Event::Ignored(Ignored::Unparsable(_)))
            ));
        }
        assert!(!tx.is_finished());
        // The assigned external port and address may differ from the
        // suggestion: only the key fields matter.
        let assigned = OpData::Map(MapData {
            external_port: 40000,
            external_ip: "::ffff:198.51.100.7".parse().unwrap(),
            ..m
        });
        assert!(tx.handle_input(start, &response(assigned, ResultCode::SUCCESS)));
    }

    #[test]
    fn rfc6887_s8_3_error_response_completes_the_transaction() {
        let start = t0();
        let req = map_request();
        let mut tx = tx_with(&req, RetransmitParams::default(), 1, start);
        tx.poll_transmit(start);
        assert!(tx.handle_input(
            start,
            &response(req.data.clone(), ResultCode::NOT_AUTHORIZED)
        ));
        let Some(Event::Response { response, .. }) = tx.poll_event() else {
            panic!("expected the error response")
        };
        assert_eq!(response.header.result, ResultCode::NOT_AUTHORIZED);
    }

    /// A MAP request carrying a THIRD_PARTY option of the wrong length (4
    /// octets instead of 16), which a server answers MALFORMED_OPTION.
    fn request_with_bad_option(nonce: Nonce) -> Request {
        let mut req = RequestBuilder::map(Protocol::TCP, 8080)
            .nonce(nonce)
            .build(CLIENT)
            .unwrap();
        req.options.push(portkeep_proto::PcpOption::Unknown {
            code: portkeep_proto::OptionCode::THIRD_PARTY,
            data: vec![192, 0, 2, 99],
        });
        req
    }

    /// What the server sends for `datagram` (RFC 6887 section 8.2: a copy
    /// of the request with R, the result, the error lifetime and the epoch).
    fn error_copy(datagram: &[u8], result: ResultCode) -> Vec<u8> {
        let mut out = Vec::new();
        portkeep_proto::build_error_response(datagram, result, 1800, 9, &mut out);
        out
    }

    #[test]
    fn rfc6887_s8_3_malformed_option_reply_copying_the_request_completes_it() {
        let start = t0();
        let req = request_with_bad_option([0x5a; 12]);
        let mut tx = tx_with(&req, RetransmitParams::default(), 1, start);
        let sent = tx.poll_transmit(start).unwrap();
        let reply = error_copy(&sent, ResultCode::MALFORMED_OPTION);
        // The premise: the codec cannot parse the copied body.
        let parsed = Response::parse(&reply, &CodePoints::default()).unwrap();
        assert!(
            matches!(
                parsed.data,
                OpData::Opaque {
                    opcode: Opcode::MAP,
                    ..
                }
            ),
            "{parsed:?}"
        );
        assert!(tx.handle_input(start, &reply));
        let Some(Event::Response {
            response,
            transmissions,
            ..
        }) = tx.poll_event()
        else {
            panic!("expected the MALFORMED_OPTION response")
        };
        assert_eq!(response.header.result, ResultCode::MALFORMED_OPTION);
        assert_eq!(response.header.lifetime, 1800);
        assert_eq!(transmissions, 1);
        assert!(tx.is_finished());
    }

    #[test]
    fn rfc6887_s11_4_unparsable_error_reply_must_carry_our_nonce() {
        let start = t0();
        let req = request_with_bad_option([0x5a; 12]);
        let mut tx = tx_with(&req, RetransmitParams::default(), 1, start);
        let sent = tx.poll_transmit(start).unwrap();
        let cp = CodePoints::default();

        // The same reply to somebody else's request (another nonce): spoofed
        // or stale, ignored.
        let other = request_with_bad_option([0x5b; 12]).to_bytes(&cp).unwrap();
        assert!(!tx.handle_input(start, &error_copy(&other, ResultCode::MALFORMED_OPTION)));
        assert_eq!(
            tx.poll_event(),
            Some(Event::Ignored(Ignored::NonceMismatch))
        );

        // Our nonce but another internal port or protocol: not ours either.
        let mut port = sent.clone();
        port[24 + 16..24 + 18].copy_from_slice(&8081u16.to_be_bytes());
        assert!(!tx.handle_input(start, &error_copy(&port, ResultCode::MALFORMED_OPTION)));
        assert_eq!(
            tx.poll_event(),
            Some(Event::Ignored(Ignored::InternalPortMismatch {
                expected: 8080,
                got: 8081
            }))
        );
        let mut proto = sent.clone();
        proto[24 + 12] = Protocol::UDP.0;
        assert!(!tx.handle_input(start, &error_copy(&proto, ResultCode::MALFORMED_OPTION)));
        assert!(matches!(
            tx.poll_event(),
            Some(Event::Ignored(Ignored::ProtocolMismatch { .. }))
        ));

        // An error reply too short to hold a nonce cannot be checked, and
        // one holding our nonce but not our whole body is not a copy of our
        // request: both ignored.
        for cut in [24 + 8, 24 + 12, 24 + 32] {
            let short = error_copy(&sent[..cut], ResultCode::MALFORMED_REQUEST);
            assert!(matches!(
                Response::parse(&short, &cp).unwrap().data,
                OpData::Opaque { .. }
            ));
            assert!(!tx.handle_input(start, &short));
            assert_eq!(tx.poll_event(), Some(Event::Ignored(Ignored::MissingBody)));
        }

        // A SUCCESS response must parse in full; this one does not.
        let mut success = error_copy(&sent, ResultCode::SUCCESS);
        success[3] = 0;
        assert!(!tx.handle_input(start, &success));
        assert!(matches!(tx.poll_event(), Some(Event::Ignored(_))));

        assert!(!tx.is_finished());
        assert!(tx.handle_input(start, &error_copy(&sent, ResultCode::MALFORMED_OPTION)));
    }

    #[test]
    fn rfc6887_s12_4_unparsable_peer_error_reply_must_match_remote_peer() {
        let start = t0();
        let mut req =
            RequestBuilder::peer(Protocol::UDP, 5000, "198.51.100.9:3478".parse().unwrap())
                .nonce([0x77; 12])
                .build(CLIENT)
                .unwrap();
        req.options.push(portkeep_proto::PcpOption::Unknown {
            code: portkeep_proto::OptionCode::THIRD_PARTY,
            data: vec![1, 2],
        });
        let mut tx = tx_with(&req, RetransmitParams::default(), 1, start);
        let sent = tx.poll_transmit(start).unwrap();
        let mut other_peer = sent.clone();
        other_peer[24 + 36..24 + 38].copy_from_slice(&3479u16.to_be_bytes());
        assert!(!tx.handle_input(
            start,
            &error_copy(&other_peer, ResultCode::MALFORMED_OPTION)
        ));
        assert_eq!(
            tx.poll_event(),
            Some(Event::Ignored(Ignored::RemotePeerMismatch))
        );
        assert!(tx.handle_input(start, &error_copy(&sent, ResultCode::MALFORMED_OPTION)));
    }

    #[test]
    fn rfc6887_s12_4_peer_response_must_match_remote_peer() {
        let start = t0();
        let req = RequestBuilder::peer(Protocol::UDP, 5000, "198.51.100.9:3478".parse().unwrap())
            .build(CLIENT)
            .unwrap();
        let OpData::Peer(p) = req.data.clone() else {
            unreachable!()
        };
        let mut tx = tx_with(&req, RetransmitParams::default(), 1, start);
        tx.poll_transmit(start);
        let other = OpData::Peer(PeerData {
            remote_port: 3479,
            ..p
        });
        assert!(!tx.handle_input(start, &response(other, ResultCode::SUCCESS)));
        assert_eq!(
            tx.poll_event(),
            Some(Event::Ignored(Ignored::RemotePeerMismatch))
        );
        let as_map = OpData::Map(p.map);
        assert!(!tx.handle_input(start, &response(as_map, ResultCode::SUCCESS)));
        assert!(tx.handle_input(start, &success_for(&req)));
    }

    #[test]
    fn rfc6887_s14_1_announce_matches_on_opcode() {
        let start = t0();
        let req = RequestBuilder::announce().build(CLIENT).unwrap();
        let mut tx = tx_with(&req, RetransmitParams::default(), 1, start);
        tx.poll_transmit(start);
        assert!(tx.handle_input(start, &success_for(&req)));
    }

    #[test]
    fn rfc6887_s8_3_arbitrary_datagrams_never_panic() {
        use rand::Rng;
        let start = t0();
        let req = map_request();
        let good = success_for(&req);
        let mut rng = StdRng::seed_from_u64(99);
        let mut tx = tx_with(&req, RetransmitParams::default(), 1, start);
        tx.poll_transmit(start);
        for i in 0..5000 {
            let junk: Vec<u8> = if i % 2 == 0 {
                let len = rng.gen_range(0..1200);
                (0..len).map(|_| rng.gen()).collect()
            } else {
                // Mutations of a valid response, keeping the R bit and
                // version so they reach the deeper checks, but never the
                // nonce octets, so none can match by accident.
                let mut m = good.clone();
                let idx = rng.gen_range(2..m.len());
                if !(24..36).contains(&idx) {
                    m[idx] = rng.gen();
                }
                m.truncate(rng.gen_range(0..=m.len()));
                if m.len() > 36 {
                    m[24] ^= 0xff;
                }
                m
            };
            assert!(!tx.handle_input(start, &junk));
            while tx.poll_event().is_some() {}
        }
        assert!(tx.handle_input(start, &good));
    }

    #[test]
    fn rfc6887_s8_1_1_uncapped_schedule_never_overflows() {
        let start = t0();
        let req = map_request();
        let params = RetransmitParams {
            mrt: Duration::ZERO,
            ..RetransmitParams::default()
        };
        let mut tx = tx_with(&req, params, 1, start);
        // With no cap RT doubles until it no longer fits in an Instant;
        // the transaction must then simply wait, not panic.
        let (times, ev) = run_unanswered(&mut tx, start, 200);
        assert_eq!(ev, None);
        assert!(times.len() < 200);
        assert_eq!(tx.poll_timeout(), None);
        assert!(!tx.is_finished());
    }

    #[test]
    fn rfc6887_s8_1_1_zero_irt_is_not_a_busy_loop() {
        let start = t0();
        let req = map_request();
        let params = RetransmitParams {
            irt: Duration::ZERO,
            ..RetransmitParams::default()
        };
        let mut tx = tx_with(&req, params, 1, start);
        assert!(tx.poll_transmit(start).is_some());
        assert_eq!(tx.poll_transmit(start), None);
        assert!(tx.poll_timeout().unwrap() > start);
    }
}
