//! The tokio driver: one UDP socket connected to one PCP server, running
//! the sans-IO [`Transaction`] against the real clock.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use portkeep_proto::{CodePoints, PcpOption, Request, ResultCode, MAX_MESSAGE_LEN};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::net::UdpSocket;
use tokio::sync::Mutex;

use crate::epoch::EpochTracker;
use crate::error::ClientError;
use crate::reply::Reply;
use crate::request::RequestBuilder;
use crate::retransmit::RetransmitParams;
use crate::transaction::{Event, Transaction};
use crate::walk::{GetFilter, MappedEntry, Walker};

/// The driver's single clock read.
///
/// The sans-IO core takes `now` as an argument so tests can drive it with
/// a fake clock, and clippy.toml bans `Instant::now` to keep it that way;
/// the runtime boundary is the one place that must read the real clock.
#[allow(clippy::disallowed_methods)]
fn clock_now() -> Instant {
    Instant::now()
}

/// How a [`Client`] behaves; the defaults are the RFC's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClientConfig {
    /// Code points of the unassigned extensions (GET/NEXT).
    pub code_points: CodePoints,
    /// Retransmission parameters (RFC 6887 section 8.1.1); per-request
    /// [`RequestOptions`] may bound them further.
    pub retransmit: RetransmitParams,
    /// Seed for the jitter RNG; `None` seeds from the OS. Nonces never come
    /// from this generator.
    pub jitter_seed: Option<u64>,
}

/// Per-request bounds on retransmission (RFC 6887 section 8.1.1 leaves
/// MRC and MRD at 0, unbounded, unless the caller sets them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RequestOptions {
    /// MRD: give up this long after the first transmission.
    pub max_duration: Option<Duration>,
    /// MRC: give up after this many unanswered transmissions.
    pub max_transmissions: Option<u32>,
}

#[derive(Debug)]
struct Shared {
    rng: StdRng,
    epoch: EpochTracker,
}

/// A PCP client talking to one server.
///
/// Requests are serialised: the socket is shared, and one transaction at a
/// time keeps every response unambiguous.
#[derive(Debug)]
pub struct Client {
    socket: UdpSocket,
    server: SocketAddr,
    local: SocketAddr,
    config: ClientConfig,
    shared: Mutex<Shared>,
}

impl Client {
    /// Opens a UDP socket connected to `server` (usually port 5351,
    /// RFC 6887 section 19.1) with the RFC's retransmission parameters.
    pub async fn connect(server: SocketAddr) -> Result<Client, ClientError> {
        Self::connect_with(server, ClientConfig::default()).await
    }

    /// Like [`Client::connect`], with explicit configuration.
    pub async fn connect_with(
        server: SocketAddr,
        config: ClientConfig,
    ) -> Result<Client, ClientError> {
        let any: IpAddr = match server {
            SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
            SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
        };
        Self::connect_from(server, SocketAddr::new(any, 0), config).await
    }

    /// Like [`Client::connect_with`], from the local address `local`
    /// (a host with several addresses must keep using the one its
    /// mappings were made from, failure-scenarios draft section 2.4).
    pub async fn connect_from(
        server: SocketAddr,
        local: SocketAddr,
        config: ClientConfig,
    ) -> Result<Client, ClientError> {
        let io = |source| ClientError::Io { server, source };
        let socket = UdpSocket::bind(local).await.map_err(io)?;
        socket.connect(server).await.map_err(io)?;
        // After connect() the kernel has chosen the source address the
        // server will see, which is what the client IP field must carry
        // (RFC 6887 section 8.1, checked by the server per section 8.3).
        let local = socket.local_addr().map_err(io)?;
        let rng = match config.jitter_seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_entropy(),
        };
        Ok(Client {
            socket,
            server,
            local,
            config,
            shared: Mutex::new(Shared {
                rng,
                epoch: EpochTracker::new(),
            }),
        })
    }

    /// The server's address.
    pub fn server(&self) -> SocketAddr {
        self.server
    }

    /// The socket's local address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The address written into the client IP field of requests.
    pub fn client_ip(&self) -> IpAddr {
        self.local.ip()
    }

    /// The code points in use.
    pub fn code_points(&self) -> &CodePoints {
        &self.config.code_points
    }

    /// Builds `builder` with this client's address and sends it.
    pub async fn send(
        &self,
        builder: &RequestBuilder,
        opts: RequestOptions,
    ) -> Result<Reply, ClientError> {
        let req = builder.build(self.client_ip())?;
        self.request(&req, opts).await
    }

    /// Sends a NAT-PMP request (RFC 6886) to the same server, with that
    /// protocol's retransmission (section 3.1) bounded by `max_wait`, and
    /// returns its response: a success, or [`ClientError::NatPmp`] with
    /// the result code, or [`ClientError::UnsupportedVersion`] from a
    /// PCP-only server. The NAT-PMP epoch check (section 3.6) is the
    /// caller's ([`crate::natpmp::NatPmpEpoch`]).
    pub async fn natpmp(
        &self,
        request: portkeep_proto::natpmp::NatPmpRequest,
        max_wait: Duration,
    ) -> Result<portkeep_proto::natpmp::NatPmpReply, ClientError> {
        use crate::natpmp::{NatPmpOutcome, NatPmpTransaction};
        use portkeep_proto::natpmp::{NatPmpReply, NatPmpResult};
        let io = |source| ClientError::Io {
            server: self.server,
            source,
        };
        let _serialised = self.shared.lock().await;
        let mut tx = NatPmpTransaction::new(clock_now(), request, max_wait);
        let mut buf = vec![0u8; MAX_MESSAGE_LEN + 512];
        while self.socket.try_recv(&mut buf).is_ok() {}
        loop {
            let now = clock_now();
            if tx.timed_out(now) {
                return Err(ClientError::Timeout {
                    server: self.server,
                    transmissions: tx.sends(),
                    elapsed: tx.elapsed(now),
                });
            }
            if let Some(d) = tx.poll_transmit(now) {
                match self.socket.send(d).await {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                    Err(e) => return Err(io(e)),
                }
            }
            let wake = tokio::time::Instant::from_std(tx.poll_timeout());
            tokio::select! {
                r = self.socket.recv(&mut buf) => match r {
                    Ok(n) => match tx.handle_input(buf.get(..n).unwrap_or_default()) {
                        Some(NatPmpOutcome::Reply(reply)) => {
                            let result = match reply {
                                NatPmpReply::ExternalAddress { result, .. }
                                | NatPmpReply::Map { result, .. }
                                | NatPmpReply::Other { result, .. } => result,
                            };
                            if result == NatPmpResult::SUCCESS {
                                return Ok(reply);
                            }
                            return Err(ClientError::NatPmp {
                                server: self.server,
                                result: result.0,
                            });
                        }
                        Some(NatPmpOutcome::Unsupported) => {
                            return Err(ClientError::UnsupportedVersion {
                                server: self.server,
                                asked: "NAT-PMP",
                                version: buf.first().copied().unwrap_or(0),
                            })
                        }
                        None => {}
                    },
                    // Section 3.1: ICMP port unreachable says at once that
                    // nothing listens.
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                        return Err(io(e))
                    }
                    Err(e) => return Err(io(e)),
                },
                () = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    /// Walks the server's table of this client's mappings matching
    /// `filter` with GET / NEXT (failure-scenarios draft section 4): each
    /// GET is an ordinary retransmitted transaction (RFC 6887 section
    /// 8.1.1) bounded by `opts`. Pull mappings with [`Walk::next`].
    pub fn walk(&self, filter: GetFilter, opts: RequestOptions) -> Walk<'_> {
        Walk {
            client: self,
            walker: Walker::new(filter),
            opts,
            buffered: std::collections::VecDeque::new(),
            failed: false,
        }
    }

    /// A "pure" GET (draft section 4.5): the first mapping matching
    /// `filter`, `None` on NONEXIST_MAP.
    pub async fn get_mapping(
        &self,
        filter: &GetFilter,
        opts: RequestOptions,
    ) -> Result<Option<MappedEntry>, ClientError> {
        let req = filter.pure_get(self.client_ip());
        let reply = match self.request(&req, opts).await {
            Ok(r) => r,
            Err(ClientError::Pcp { reply })
                if reply.result() == self.config.code_points.nonexist_map =>
            {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        let first = reply.response.options.iter().find_map(|o| match o {
            PcpOption::Next(n) => Some(n),
            _ => None,
        });
        match first {
            Some(n) => Ok(Some(
                MappedEntry::from_next(n).ok_or(crate::walk::WalkError::BadNext)?,
            )),
            None => Err(crate::walk::WalkError::NoNext.into()),
        }
    }

    /// Sends `req`, retransmitting per RFC 6887 section 8.1.1, and waits
    /// for the matching response.
    ///
    /// A SUCCESS response is `Ok`; any other result code is
    /// [`ClientError::Pcp`], which carries the whole reply.
    pub async fn request(&self, req: &Request, opts: RequestOptions) -> Result<Reply, ClientError> {
        let io = |source| ClientError::Io {
            server: self.server,
            source,
        };
        let mut shared = self.shared.lock().await;
        let mut params = self.config.retransmit;
        if let Some(d) = opts.max_duration {
            params.mrd = d;
        }
        if let Some(n) = opts.max_transmissions {
            params.mrc = n;
        }
        let rng = StdRng::seed_from_u64(shared.rng.gen());
        let start = clock_now();
        let mut tx = Transaction::new(start, req, self.config.code_points, params, rng)?;
        // Larger than any PCP message, so an oversized datagram arrives
        // whole and is rejected by the parser rather than truncated.
        let mut buf = vec![0u8; MAX_MESSAGE_LEN + 512];
        // Late duplicates answering an earlier transaction would otherwise
        // be read first, and a renewal reuses its nonce, so they could
        // match (RFC 6887 section 8.1.1 retransmissions can each be
        // answered). Whatever is queued before we send is not for us.
        while self.socket.try_recv(&mut buf).is_ok() {}
        loop {
            let now = clock_now();
            tx.handle_timeout(now);
            while let Some(datagram) = tx.poll_transmit(now) {
                match self.socket.send(&datagram).await {
                    Ok(_) => {}
                    // An ICMP error from an earlier send; the server may
                    // just not be up yet, and 8.1.1 says keep trying.
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                        tracing::debug!(server = %self.server, "send: connection refused");
                    }
                    Err(e) => return Err(io(e)),
                }
            }
            while let Some(event) = tx.poll_event() {
                match event {
                    Event::Response {
                        response,
                        received,
                        transmissions,
                    } => {
                        let epoch_verdict = shared.epoch.observe(received, response.header.epoch);
                        let reply = Reply {
                            opcode: tx.key().opcode,
                            nonce: tx.key().mapping.map(|m| m.nonce),
                            checkpoint_requested: req
                                .options
                                .iter()
                                .any(|o| matches!(o, PcpOption::CheckpointRequired)),
                            epoch_verdict,
                            transmissions,
                            elapsed: received.saturating_duration_since(start),
                            response,
                        };
                        if reply.result() == ResultCode::SUCCESS {
                            return Ok(reply);
                        }
                        return Err(ClientError::Pcp {
                            reply: Box::new(reply),
                        });
                    }
                    Event::TimedOut(t) => {
                        return Err(ClientError::Timeout {
                            server: self.server,
                            transmissions: t.transmissions,
                            elapsed: t.elapsed,
                        })
                    }
                    Event::Ignored(why) => {
                        tracing::debug!(server = %self.server, %why, "ignored datagram");
                    }
                }
            }
            let deadline = tx.poll_timeout();
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                r = self.socket.recv(&mut buf) => match r {
                    Ok(n) => {
                        let datagram = buf.get(..n).unwrap_or_default();
                        if is_natpmp_unsupported_version(datagram) {
                            // A NAT-PMP-only gateway (RFC 6887 section 9,
                            // appendix A): no PCP answer will come.
                            return Err(ClientError::UnsupportedVersion {
                                server: self.server,
                                asked: "PCP",
                                version: portkeep_proto::NATPMP_VERSION,
                            });
                        }
                        tx.handle_input(clock_now(), datagram);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                        tracing::debug!(server = %self.server, "recv: connection refused");
                    }
                    Err(e) => return Err(io(e)),
                },
                () = sleep => {}
            }
        }
    }
}

/// A walk of the server's mapping table in progress ([`Client::walk`]).
///
/// An async iterator rather than a `futures::Stream`, so that the client
/// needs no futures crate: `while let Some(m) = walk.next().await`.
#[derive(Debug)]
pub struct Walk<'c> {
    client: &'c Client,
    walker: Walker,
    opts: RequestOptions,
    buffered: std::collections::VecDeque<MappedEntry>,
    failed: bool,
}

impl Walk<'_> {
    /// The next mapping, `None` at the end of the walk. After an error the
    /// walk is over.
    pub async fn next(&mut self) -> Option<Result<MappedEntry, ClientError>> {
        loop {
            if let Some(e) = self.buffered.pop_front() {
                return Some(Ok(e));
            }
            if self.failed {
                return None;
            }
            let cp = self.client.config.code_points;
            let req = self.walker.request(self.client.client_ip())?;
            let response = match self.client.request(&req, self.opts).await {
                Ok(reply) => reply.response,
                // Draft section 4.6: NONEXIST_MAP means nothing (more) matches.
                Err(ClientError::Pcp { reply }) if reply.result() == cp.nonexist_map => {
                    reply.response
                }
                Err(e) => {
                    self.failed = true;
                    return Some(Err(e));
                }
            };
            match self.walker.handle(&response, &cp) {
                Ok(entries) => self.buffered.extend(entries),
                Err(e) => {
                    self.failed = true;
                    return Some(Err(e.into()));
                }
            }
        }
    }

    /// GET requests sent so far.
    pub fn requests(&self) -> u32 {
        self.walker.requests()
    }

    /// Runs the walk to its end.
    pub async fn collect(mut self) -> Result<Vec<MappedEntry>, ClientError> {
        let mut all = Vec::new();
        while let Some(m) = self.next().await {
            all.push(m?);
        }
        Ok(all)
    }
}

/// Whether `datagram` is a NAT-PMP gateway's "unsupported version" (version
/// 0, result 1; RFC 6886 section 3.5): the answer of a server that speaks
/// NAT-PMP only to a PCP request (RFC 6887 section 9, appendix A). Its
/// opcode octet is not checked: erratum 3618 notes gateways that send 0.
fn is_natpmp_unsupported_version(datagram: &[u8]) -> bool {
    datagram.len() >= 8 && datagram[0] == portkeep_proto::NATPMP_VERSION && datagram[2..4] == [0, 1]
}
