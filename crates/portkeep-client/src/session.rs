//! A session with one PCP server holding many mappings, sans-IO.
//!
//! [`Session`] keeps every mapping a client wants alive on one server and
//! repairs them after failures:
//!
//! - creation with the retransmission rules of RFC 6887 section 8.1.1
//!   (one [`Transaction`] per mapping);
//! - renewal at a random point in 1/2..5/8 of the lifetime, then in
//!   3/4..3/4+1/16, 7/8..7/8+1/32 and so on, never less than 4 s apart
//!   (section 11.2.1), each attempt one datagram;
//! - the epoch check of section 8.5 on every matched response and on every
//!   ANNOUNCE from the server's address (section 14.1.1): a failed check
//!   re-creates every mapping held there after a random delay in
//!   `0..recreate_jitter`, so a fleet told at once does not stampede;
//! - error lifetimes (section 7.4): after an error the same request is not
//!   sent again before the response's lifetime has passed;
//! - a bound on the rate at which new transactions start, so re-creating
//!   thousands of mappings does not flood the server.
//!
//! The contract follows quinn-proto: feed datagrams to
//! [`Session::handle_input`], call [`Session::handle_timeout`] when
//! [`Session::poll_timeout`] is reached (or after any call that changes
//! the mappings), send what [`Session::poll_transmit`] returns to
//! [`Session::server`], and drain [`Session::poll_event`].
//!
//! Timers are data: one ordered index of `(when, mapping)` pairs, so
//! [`Session::poll_timeout`] is a lookup and a session with 10,000 mappings
//! wakes only when one of them has something to do.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use portkeep_proto::{CodePoints, Nonce, OpData, Opcode, PcpOption, Response, ResultCode};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::epoch::{EpochInvalid, EpochTracker};
use crate::request::{BuildError, RequestBuilder};
use crate::retransmit::RetransmitParams;
use crate::transaction::{Event, Transaction};

/// The caller's name for a mapping.
pub type MappingId = u64;

/// Renewal attempts are never closer than this (RFC 6887 section 11.2.1).
pub const MIN_RENEWAL_SPACING: Duration = Duration::from_secs(4);

/// How a [`Session`] behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionConfig {
    /// Code points of the unassigned extensions.
    pub code_points: CodePoints,
    /// Retransmission of creations and re-creations (RFC 6887 section
    /// 8.1.1: unbounded unless the caller bounds MRC or MRD).
    pub retransmit: RetransmitParams,
    /// Re-creations after a failed epoch check start at a uniformly random
    /// delay in `0..recreate_jitter` (RFC 6887 section 14.1.1 asks clients
    /// to spread their reaction to an ANNOUNCE).
    pub recreate_jitter: Duration,
    /// New transactions (creations, renewals, deletes) per second; 0 is
    /// unlimited. Retransmissions are not counted: their own back-off
    /// bounds them.
    pub rate: u32,
    /// Burst allowance of `rate`.
    pub burst: u32,
    /// MRD of a delete and of an ANNOUNCE query.
    pub query_timeout: Duration,
    /// Shortest hold-off after an error response, whatever its lifetime
    /// says, so a lifetime of 0 does not become a busy loop.
    pub min_error_holdoff: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            code_points: CodePoints::default(),
            retransmit: RetransmitParams::default(),
            recreate_jitter: Duration::from_secs(1),
            rate: 4000,
            burst: 400,
            query_timeout: Duration::from_secs(10),
            min_error_holdoff: Duration::from_secs(1),
        }
    }
}

/// What the server granted for a mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// Assigned external address and port.
    pub external: Option<SocketAddr>,
    /// Granted lifetime, seconds.
    pub lifetime: u32,
    /// When the response arrived; the lifetime counts from here.
    pub granted_at: Instant,
    /// Whether the server echoed CHECKPOINT_REQUIRED (RFC 7767 section 3.2).
    pub checkpoint_honoured: bool,
}

impl Grant {
    /// When the server will drop the mapping unless it is renewed.
    pub fn expires(&self) -> Instant {
        self.granted_at + Duration::from_secs(u64::from(self.lifetime))
    }
}

/// Why a mapping was granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantKind {
    /// First creation.
    Created,
    /// A renewal of a mapping still held.
    Renewed,
    /// A creation after the mapping was lost (epoch failure, expiry,
    /// server change).
    Recreated,
}

/// Why mappings are being re-created (more reasons may come).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RecreateReason {
    /// A response's epoch failed the check of RFC 6887 section 8.5.
    Epoch(EpochInvalid),
    /// An unsolicited ANNOUNCE's epoch failed the check (section 14.1.1).
    Announce(EpochInvalid),
    /// The server's address changed (failure-scenarios draft section 2.1).
    ServerChanged,
    /// The client's own address changed (failure-scenarios draft
    /// section 2.4).
    ClientAddressChanged,
    /// A host the client maps for with THIRD_PARTY changed its address
    /// (failure-scenarios draft section 2.4).
    ThirdPartyHostChanged,
}

/// Something the session's owner should know.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionEvent {
    /// The server granted (or renewed) a mapping.
    Granted {
        /// Which mapping.
        id: MappingId,
        /// Creation, renewal or re-creation.
        kind: GrantKind,
        /// What was granted.
        grant: Grant,
        /// Whether the request carried CHECKPOINT_REQUIRED.
        checkpoint_requested: bool,
        /// The epoch the response carried.
        epoch: u32,
    },
    /// The server answered with an error; no retry before `retry_at`
    /// (RFC 6887 section 7.4).
    Failed {
        /// Which mapping.
        id: MappingId,
        /// The result code, kept as a number when unknown.
        result: ResultCode,
        /// Whether the code is one RFC 6887 (or the draft) defines.
        known: bool,
        /// The error lifetime, seconds.
        lifetime: u32,
        /// When the request will be tried again.
        retry_at: Instant,
    },
    /// The mapping is presumed gone from the server: it expired without a
    /// successful renewal, or the server lost state. It is being re-created.
    Lost {
        /// Which mapping.
        id: MappingId,
    },
    /// Every mapping is being re-created.
    Recreating {
        /// Why.
        reason: RecreateReason,
        /// How many mappings.
        count: usize,
    },
    /// A mapping asked to be removed is gone from the session; `confirmed`
    /// says whether the server acknowledged the delete.
    Removed {
        /// Which mapping.
        id: MappingId,
        /// Whether the server answered the delete with SUCCESS.
        confirmed: bool,
    },
    /// A response carried options the codec does not know; they are
    /// reported, not fatal (RFC 6887 section 7.3: unknown optional
    /// options are ignored).
    UnknownOptions {
        /// Which mapping.
        id: MappingId,
        /// The option codes.
        codes: Vec<u8>,
    },
    /// A creation bounded by the caller's MRC/MRD got no answer.
    TimedOut {
        /// Which mapping.
        id: MappingId,
    },
}

/// Why the session refused a call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The id is in use.
    #[error("mapping id {0} is already in the session")]
    DuplicateId(MappingId),
    /// Another mapping has the nonce; responses could not be told apart.
    #[error("another mapping has the same nonce")]
    DuplicateNonce,
    /// Only MAP requests are kept alive by a session.
    #[error("a session keeps MAP requests only")]
    NotAMap,
    /// The request cannot be built.
    #[error(transparent)]
    Build(#[from] BuildError),
}

/// Counters for status reports and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionCounters {
    /// Datagrams handed out by [`Session::poll_transmit`].
    pub datagrams_sent: u64,
    /// Creation transactions started (first creations).
    pub creates: u64,
    /// Re-creation transactions started.
    pub recreates: u64,
    /// Renewal attempts.
    pub renewals: u64,
    /// Delete transactions started.
    pub deletes: u64,
    /// Responses matched to a mapping.
    pub responses: u64,
    /// Datagrams that matched nothing.
    pub ignored: u64,
    /// Failed epoch checks.
    pub epoch_failures: u64,
    /// Mappings put up for re-creation, by why.
    pub recreated: RecreateCounts,
}

/// Mappings put up for re-creation, by [`RecreateReason`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecreateCounts {
    /// A response's epoch failed its check (RFC 6887 section 8.5).
    pub epoch: u64,
    /// An ANNOUNCE's epoch failed its check (section 14.1.1).
    pub announce: u64,
    /// The server's address changed (failure-scenarios draft section 2.1).
    pub server_changed: u64,
    /// The client's address changed (draft section 2.4).
    pub client_address_changed: u64,
    /// A THIRD_PARTY host's address changed (draft section 2.4).
    pub third_party_host_changed: u64,
}

impl RecreateCounts {
    fn count(&mut self, reason: RecreateReason, n: u64) {
        let slot = match reason {
            RecreateReason::Epoch(_) => &mut self.epoch,
            RecreateReason::Announce(_) => &mut self.announce,
            RecreateReason::ServerChanged => &mut self.server_changed,
            RecreateReason::ClientAddressChanged => &mut self.client_address_changed,
            RecreateReason::ThirdPartyHostChanged => &mut self.third_party_host_changed,
        };
        *slot += n;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    Create,
    Renew,
    Delete,
}

#[derive(Debug)]
struct Entry {
    request: RequestBuilder,
    nonce: Nonce,
    grant: Option<Grant>,
    /// The last external endpoint, suggested again on re-creation
    /// (RFC 6887 section 11.2.1 hints at re-asking for what was held).
    last_external: Option<SocketAddr>,
    /// The next creation re-creates a mapping held before.
    recreate: bool,
    tx: Option<(Transaction<StdRng>, Purpose)>,
    /// When to start the next transaction, and which.
    next: Option<(Instant, Purpose)>,
    /// Renewal step k of section 11.2.1 for the current grant.
    renew_step: u32,
    last_renewal: Option<Instant>,
    /// No new request before this (an error's lifetime, section 7.4).
    hold_until: Option<Instant>,
    removing: bool,
    /// The transaction in flight is the delete of a mapping this one
    /// replaced (same nonce); the creation starts once it is answered.
    create_after_delete: bool,
    /// The key of this entry in the timer index.
    scheduled: Option<Instant>,
}

impl Entry {
    fn wake(&self) -> Option<Instant> {
        let tx = self.tx.as_ref().and_then(|(t, _)| t.poll_timeout());
        let next = self.next.map(|(t, _)| t);
        let expiry = if self.removing {
            None
        } else {
            self.grant.map(|g| g.expires())
        };
        [tx, next, expiry].into_iter().flatten().min()
    }
}

/// A GCRA-like token bucket in floating seconds.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Option<Instant>,
}

impl Bucket {
    fn new(rate: u32, burst: u32) -> Bucket {
        let burst = f64::from(burst.max(1));
        Bucket {
            rate: f64::from(rate),
            burst,
            tokens: burst,
            last: None,
        }
    }

    /// Takes one token, or says when one will be there.
    fn take(&mut self, now: Instant) -> Result<(), Instant> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        if let Some(last) = self.last {
            let dt = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        }
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - self.tokens) / self.rate;
            Err(now + Duration::from_secs_f64(wait.max(1e-6)))
        }
    }
}

/// Many mappings with one PCP server, sans-IO (see the module docs).
#[derive(Debug)]
pub struct Session {
    server: SocketAddr,
    client_ip: IpAddr,
    config: SessionConfig,
    rng: StdRng,
    epoch: EpochTracker,
    entries: HashMap<MappingId, Entry>,
    by_nonce: HashMap<Nonce, MappingId>,
    timers: BTreeSet<(Instant, MappingId)>,
    announce: Option<Transaction<StdRng>>,
    bucket: Bucket,
    out: VecDeque<Vec<u8>>,
    events: VecDeque<SessionEvent>,
    counters: SessionCounters,
}

impl Session {
    /// A session with `server`, writing `client_ip` into requests (the
    /// source address the server will see, RFC 6887 section 8.1). `seed`
    /// drives jitter only; nonces come from the requests.
    pub fn new(server: SocketAddr, client_ip: IpAddr, config: SessionConfig, seed: u64) -> Self {
        Session {
            server,
            client_ip,
            config,
            rng: StdRng::seed_from_u64(seed),
            epoch: EpochTracker::new(),
            entries: HashMap::new(),
            by_nonce: HashMap::new(),
            timers: BTreeSet::new(),
            announce: None,
            bucket: Bucket::new(config.rate, config.burst),
            out: VecDeque::new(),
            events: VecDeque::new(),
            counters: SessionCounters::default(),
        }
    }

    /// Where datagrams go.
    pub fn server(&self) -> SocketAddr {
        self.server
    }

    /// The client address written into requests.
    pub fn client_ip(&self) -> IpAddr {
        self.client_ip
    }

    /// The last epoch seen and when (to persist for [`Self::resume_epoch`]).
    pub fn epoch(&self) -> Option<(u32, Instant)> {
        self.epoch.previous()
    }

    /// Seeds the epoch check with an epoch seen before a restart, so the
    /// next answer is compared with it (RFC 6887 section 8.5).
    pub fn resume_epoch(&mut self, epoch: u32, received: Instant) {
        self.epoch = EpochTracker::resume(epoch, received);
    }

    /// Counters.
    pub fn counters(&self) -> SessionCounters {
        self.counters
    }

    /// Number of mappings (including ones being removed).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the session holds no mapping.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The current grant of a mapping, if it is held.
    pub fn grant(&self, id: MappingId) -> Option<Grant> {
        self.entries.get(&id).and_then(|e| e.grant)
    }

    /// The request a mapping is kept with.
    pub fn request(&self, id: MappingId) -> Option<&RequestBuilder> {
        self.entries.get(&id).map(|e| &e.request)
    }

    /// Whether a mapping is in the session.
    pub fn contains(&self, id: MappingId) -> bool {
        self.entries.contains_key(&id)
    }

    /// A mapping being removed gives its nonce up to a new one: the
    /// application came back (e.g. restarted) before the delete finished.
    /// The old mapping is reported removed (unconfirmed); a delete already
    /// sent is returned, to be seen through before the new request: the
    /// server handles requests in the order they arrive, and a delete that
    /// overtook the creation would leave the server holding nothing while
    /// the session believed the grant.
    fn reclaim_nonce(
        &mut self,
        request: &RequestBuilder,
    ) -> Option<(Transaction<StdRng>, Purpose)> {
        let nonce = request.nonce_value()?;
        let &old = self.by_nonce.get(&nonce)?;
        if !self.entries.get(&old).is_some_and(|e| e.removing) {
            return None;
        }
        let tx = self.entries.get_mut(&old).and_then(|e| e.tx.take());
        self.drop_entry(old);
        self.events.push_back(SessionEvent::Removed {
            id: old,
            confirmed: false,
        });
        tx.filter(|(_, p)| *p == Purpose::Delete)
    }

    fn check_new(&self, id: MappingId, request: &RequestBuilder) -> Result<Nonce, SessionError> {
        if self.entries.contains_key(&id) {
            return Err(SessionError::DuplicateId(id));
        }
        let (true, Some(nonce)) = (request.is_map(), request.nonce_value()) else {
            return Err(SessionError::NotAMap);
        };
        if self.by_nonce.contains_key(&nonce) {
            return Err(SessionError::DuplicateNonce);
        }
        request.build(self.client_ip)?;
        Ok(nonce)
    }

    fn new_entry(request: RequestBuilder, nonce: Nonce) -> Entry {
        Entry {
            request,
            nonce,
            grant: None,
            last_external: None,
            recreate: false,
            tx: None,
            next: None,
            renew_step: 0,
            last_renewal: None,
            hold_until: None,
            removing: false,
            create_after_delete: false,
            scheduled: None,
        }
    }

    /// Adds a mapping to create now and keep alive. The request's nonce
    /// identifies it on the server for its whole life.
    pub fn insert(
        &mut self,
        now: Instant,
        id: MappingId,
        request: RequestBuilder,
    ) -> Result<(), SessionError> {
        let pending_delete = self.reclaim_nonce(&request);
        let nonce = self.check_new(id, &request)?;
        let mut e = Self::new_entry(request, nonce);
        match pending_delete {
            Some(tx) => {
                e.tx = Some(tx);
                e.create_after_delete = true;
            }
            None => e.next = Some((now, Purpose::Create)),
        }
        self.by_nonce.insert(nonce, id);
        self.entries.insert(id, e);
        self.reschedule(id);
        Ok(())
    }

    /// Adds a mapping the server already holds (from the client's store,
    /// or found with GET): nothing is sent until its renewal is due
    /// (failure-scenarios draft section 2.3: a client that kept its
    /// mappings needs no query after its own restart). A renewal point
    /// already passed is spread over `0..recreate_jitter` from now.
    pub fn resume(
        &mut self,
        now: Instant,
        id: MappingId,
        request: RequestBuilder,
        grant: Grant,
    ) -> Result<(), SessionError> {
        let pending_delete = self.reclaim_nonce(&request);
        let nonce = self.check_new(id, &request)?;
        let mut e = Self::new_entry(request, nonce);
        e.grant = Some(grant);
        e.last_external = grant.external;
        e.renew_step = 1;
        if let Some(tx) = pending_delete {
            // The delete may already have been handled: re-create once it
            // is answered.
            e.grant = None;
            e.recreate = true;
            e.tx = Some(tx);
            e.create_after_delete = true;
        } else if grant.expires() <= now {
            e.grant = None;
            e.recreate = true;
            e.next = Some((now, Purpose::Create));
        } else {
            let at = renewal_at(&grant, 1, None, &mut self.rng);
            let at = match at {
                Some(t) if t > now => t,
                _ => now + self.jitter(),
            };
            e.next = Some((at, Purpose::Renew));
        }
        self.by_nonce.insert(nonce, id);
        self.entries.insert(id, e);
        self.reschedule(id);
        Ok(())
    }

    /// Changes what renewals ask for (lifetime, CHECKPOINT_REQUIRED)
    /// keeping the nonce; takes effect at the next request (RFC 7767
    /// section 3.2: a renewal with the option asks again, one without it
    /// clears the flag).
    pub fn update_request(
        &mut self,
        id: MappingId,
        f: impl FnOnce(RequestBuilder) -> RequestBuilder,
    ) {
        if let Some(e) = self.entries.get_mut(&id) {
            let nonce = e.nonce;
            e.request = f(e.request.clone()).nonce(nonce);
        }
    }

    /// Renews a held mapping now rather than at its scheduled point, so a
    /// changed request (shorter lifetime, check-pointing) applies at once.
    /// Nothing happens to a mapping that is not held or is in the middle
    /// of an exchange or an error hold-off.
    pub fn renew_now(&mut self, now: Instant, id: MappingId) {
        let Some(e) = self.entries.get_mut(&id) else {
            return;
        };
        let held = e.grant.is_some() && !e.removing && e.tx.is_none();
        if held && e.hold_until.is_none_or(|h| h <= now) {
            e.next = Some((now, Purpose::Renew));
            self.reschedule(id);
        }
    }

    /// Stops keeping a mapping and deletes it on the server (a MAP with
    /// lifetime 0 and its nonce, RFC 6887 section 15). A mapping never
    /// sent is dropped at once.
    pub fn remove(&mut self, now: Instant, id: MappingId) {
        let Some(e) = self.entries.get_mut(&id) else {
            return;
        };
        if e.removing {
            return;
        }
        let sent = e.tx.is_some() || e.grant.is_some() || e.recreate || e.last_external.is_some();
        if !sent {
            self.drop_entry(id);
            self.events.push_back(SessionEvent::Removed {
                id,
                confirmed: true,
            });
            return;
        }
        e.removing = true;
        e.create_after_delete = false;
        e.tx = None;
        e.grant = None;
        e.next = Some((now, Purpose::Delete));
        self.reschedule(id);
    }

    /// Sends an ANNOUNCE request (RFC 6887 section 14.1) to learn the
    /// server's epoch, e.g. after the client's own restart.
    pub fn announce(&mut self, now: Instant) {
        let Ok(req) = RequestBuilder::announce().build(self.client_ip) else {
            return;
        };
        let params = RetransmitParams {
            mrd: self.config.query_timeout,
            ..self.config.retransmit
        };
        let rng = StdRng::seed_from_u64(self.rng.gen());
        if let Ok(tx) = Transaction::new(now, &req, self.config.code_points, params, rng) {
            self.announce = Some(tx);
        }
    }

    /// Moves to a new server address and re-creates every mapping there
    /// (failure-scenarios draft section 2.1); the epoch check starts
    /// afresh (RFC 6887 section 8.5 compares responses of one server).
    pub fn set_server(&mut self, now: Instant, server: SocketAddr) {
        if server == self.server {
            return;
        }
        self.server = server;
        self.epoch.reset();
        self.announce = None;
        self.recreate_all(now, None, RecreateReason::ServerChanged);
    }

    /// The client's address changed (failure-scenarios draft section 2.4):
    /// every mapping is installed again from `ip`, and the returned
    /// datagrams delete the stale ones (MAP, lifetime 0, same nonce, the
    /// old address in the header, RFC 6887 section 15). They must leave
    /// from the old address, or the server answers ADDRESS_MISMATCH; they
    /// are best effort (a stale mapping nobody deletes simply expires).
    pub fn set_client_ip(&mut self, now: Instant, ip: IpAddr) -> Vec<Vec<u8>> {
        if ip == self.client_ip {
            return Vec::new();
        }
        let old = self.client_ip;
        let cp = self.config.code_points;
        let stale: Vec<Vec<u8>> = self
            .entries
            .values()
            .filter(|e| e.grant.is_some() || e.tx.is_some())
            .filter_map(|e| e.request.delete_of()?.build(old).ok()?.to_bytes(&cp).ok())
            .collect();
        self.client_ip = ip;
        self.announce = None;
        self.recreate_all(now, None, RecreateReason::ClientAddressChanged);
        self.counters.deletes += stale.len() as u64;
        stale
    }

    /// A host this client maps for with THIRD_PARTY moved from `old` to
    /// `new` (failure-scenarios draft section 2.4, for a client that
    /// manages other hosts' mappings): each of its mappings is installed
    /// again for `new` (same nonce, suggesting the external endpoint it
    /// had), and the returned datagrams delete those of `old` (MAP,
    /// lifetime 0, same nonce, THIRD_PARTY `old`: RFC 6887 section 15),
    /// for the caller to send now, before the re-creations: the old
    /// address may soon be another host's, and must not keep receiving
    /// this one's traffic. Best effort: a stale mapping nobody deletes
    /// expires. Mappings of other hosts are untouched.
    pub fn set_third_party_host(&mut self, now: Instant, old: IpAddr, new: IpAddr) -> Vec<Vec<u8>> {
        if old == new {
            return Vec::new();
        }
        let cp = self.config.code_points;
        let client = self.client_ip;
        let mut stale = Vec::new();
        let mut moved = Vec::new();
        for (id, e) in &mut self.entries {
            if e.request.third_party_host() != Some(old) || e.removing {
                continue;
            }
            if e.grant.is_some() || e.tx.is_some() {
                if let Some(d) = e
                    .request
                    .delete_of()
                    .and_then(|d| d.build(client).ok())
                    .and_then(|r| r.to_bytes(&cp).ok())
                {
                    stale.push(d);
                }
            }
            e.request = e.request.clone().third_party(new);
            moved.push(*id);
        }
        self.counters.deletes += stale.len() as u64;
        self.recreate(now, moved, RecreateReason::ThirdPartyHostChanged);
        stale
    }

    fn jitter(&mut self) -> Duration {
        let max = self.config.recreate_jitter;
        if max.is_zero() {
            Duration::ZERO
        } else {
            max.mul_f64(self.rng.gen_range(0.0..1.0))
        }
    }

    fn reschedule(&mut self, id: MappingId) {
        let Some(e) = self.entries.get_mut(&id) else {
            return;
        };
        let wake = e.wake();
        if e.scheduled == wake {
            return;
        }
        if let Some(old) = e.scheduled.take() {
            self.timers.remove(&(old, id));
        }
        if let Some(w) = wake {
            self.timers.insert((w, id));
            e.scheduled = Some(w);
        }
    }

    fn drop_entry(&mut self, id: MappingId) {
        if let Some(e) = self.entries.remove(&id) {
            if let Some(t) = e.scheduled {
                self.timers.remove(&(t, id));
            }
            self.by_nonce.remove(&e.nonce);
        }
    }

    /// When [`Self::handle_timeout`] should next run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let first = self.timers.first().map(|(t, _)| *t);
        let ann = self.announce.as_ref().and_then(Transaction::poll_timeout);
        [first, ann].into_iter().flatten().min()
    }

    /// The next datagram to send to [`Self::server`].
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        let d = self.out.pop_front()?;
        self.counters.datagrams_sent += 1;
        Some(d)
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<SessionEvent> {
        self.events.pop_front()
    }

    /// Runs every timer due at `now`: starts creations, renewals and
    /// deletes, retransmits, notices expiries.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(tx) = self.announce.as_mut() {
            tx.handle_timeout(now);
            while let Some(d) = tx.poll_transmit(now) {
                self.out.push_back(d);
            }
            if tx.is_finished() {
                self.announce = None;
            }
        }
        while let Some(&(t, id)) = self.timers.first() {
            if t > now {
                break;
            }
            self.timers.pop_first();
            if let Some(e) = self.entries.get_mut(&id) {
                e.scheduled = None;
            }
            self.process(id, now);
            self.reschedule(id);
        }
    }

    fn process(&mut self, id: MappingId, now: Instant) {
        let Some(e) = self.entries.get_mut(&id) else {
            return;
        };
        // Retransmissions of the transaction in flight.
        let mut timed_out = None;
        if let Some((tx, purpose)) = e.tx.as_mut() {
            tx.handle_timeout(now);
            while let Some(d) = tx.poll_transmit(now) {
                self.out.push_back(d);
            }
            while let Some(ev) = tx.poll_event() {
                if matches!(ev, Event::TimedOut(_)) {
                    timed_out = Some(*purpose);
                }
            }
            if tx.is_finished() {
                e.tx = None;
            }
        }
        match timed_out {
            Some(Purpose::Delete) if e.create_after_delete => {
                e.create_after_delete = false;
                e.next = Some((now, Purpose::Create));
            }
            Some(Purpose::Delete) => {
                self.drop_entry(id);
                self.events.push_back(SessionEvent::Removed {
                    id,
                    confirmed: false,
                });
                return;
            }
            Some(Purpose::Create) => self.events.push_back(SessionEvent::TimedOut { id }),
            // A renewal is one datagram; the next step is already planned.
            Some(Purpose::Renew) | None => {}
        }
        let Some(e) = self.entries.get_mut(&id) else {
            return;
        };
        // Section 11.2.1: no successful renewal before expiry means the
        // mapping is gone; create it again.
        if let Some(g) = e.grant {
            if !e.removing && now >= g.expires() {
                e.grant = None;
                e.recreate = true;
                e.tx = None;
                let at = e.hold_until.map_or(now, |h| h.max(now));
                e.next = Some((at, Purpose::Create));
                self.events.push_back(SessionEvent::Lost { id });
            }
        }
        let Some((at, purpose)) = e.next else {
            return;
        };
        if at > now {
            return;
        }
        if let Err(later) = self.bucket.take(now) {
            e.next = Some((later, purpose));
            return;
        }
        e.next = None;
        self.start(id, now, purpose);
    }

    fn start(&mut self, id: MappingId, now: Instant, purpose: Purpose) {
        let seed = self.rng.gen();
        let jitter_draw: f64 = self.rng.gen_range(0.0..1.0);
        let config = self.config;
        let client_ip = self.client_ip;
        let Some(e) = self.entries.get_mut(&id) else {
            return;
        };
        let (builder, params) = match purpose {
            Purpose::Create => {
                let mut b = e.request.clone();
                if let Some(ext) = e.last_external {
                    b = b.suggest(Some(ext.ip()), ext.port());
                }
                if e.recreate {
                    self.counters.recreates += 1;
                } else {
                    self.counters.creates += 1;
                }
                (b, config.retransmit)
            }
            Purpose::Renew => {
                self.counters.renewals += 1;
                // One datagram per attempt: the schedule of section
                // 11.2.1 replaces retransmission.
                let params = RetransmitParams {
                    irt: Duration::from_secs(86_400 * 365),
                    mrt: Duration::ZERO,
                    mrc: 1,
                    mrd: Duration::ZERO,
                };
                (e.request.clone(), params)
            }
            Purpose::Delete => {
                self.counters.deletes += 1;
                let Some(d) = e.request.delete_of() else {
                    return;
                };
                let params = RetransmitParams {
                    mrd: config.query_timeout,
                    ..config.retransmit
                };
                (d, params)
            }
        };
        let Ok(req) = builder.build(client_ip) else {
            return;
        };
        let Ok(mut tx) = Transaction::new(
            now,
            &req,
            config.code_points,
            params,
            StdRng::seed_from_u64(seed),
        ) else {
            return;
        };
        while let Some(d) = tx.poll_transmit(now) {
            self.out.push_back(d);
        }
        if purpose == Purpose::Renew {
            e.last_renewal = Some(now);
            e.renew_step += 1;
            if let Some(g) = e.grant {
                e.next = renewal_at_draw(&g, e.renew_step, Some(now), jitter_draw)
                    .map(|t| (t, Purpose::Renew));
            }
        }
        e.tx = Some((tx, purpose));
    }

    /// Offers a datagram that arrived from `from`: a response to one of the
    /// mappings, or an ANNOUNCE (solicited or not). Never panics.
    pub fn handle_input(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) {
        let cp = self.config.code_points;
        let Ok(response) = Response::parse(datagram, &cp) else {
            self.counters.ignored += 1;
            return;
        };
        if response.data.opcode(&cp) == Opcode::ANNOUNCE {
            self.handle_announce(now, from, datagram, &response);
            return;
        }
        if from.ip() != self.server.ip() {
            self.counters.ignored += 1;
            return;
        }
        let nonce = match &response.data {
            OpData::Opaque { payload, .. } => {
                let mut n: Nonce = Default::default();
                match payload.get(..n.len()) {
                    Some(p) => n.copy_from_slice(p),
                    None => {
                        self.counters.ignored += 1;
                        return;
                    }
                }
                n
            }
            other => match other.map_part() {
                Some(m) => m.nonce,
                None => {
                    self.counters.ignored += 1;
                    return;
                }
            },
        };
        let Some(&id) = self.by_nonce.get(&nonce) else {
            self.counters.ignored += 1;
            return;
        };
        let Some(e) = self.entries.get_mut(&id) else {
            return;
        };
        let Some((tx, purpose)) = e.tx.as_mut() else {
            // A late duplicate (section 8.1.1 retransmissions can each be
            // answered): nothing outstanding to complete.
            self.counters.ignored += 1;
            return;
        };
        let purpose = *purpose;
        if !tx.handle_input(now, datagram) {
            self.counters.ignored += 1;
            return;
        }
        e.tx = None;
        self.counters.responses += 1;
        self.on_response(id, now, purpose, &response);
        self.reschedule(id);
    }

    fn handle_announce(&mut self, now: Instant, from: SocketAddr, datagram: &[u8], r: &Response) {
        // Section 14.1.1: only the server's own ANNOUNCE counts; anyone
        // else could otherwise make the client re-create everything.
        if from.ip() != self.server.ip() || r.header.result != ResultCode::SUCCESS {
            self.counters.ignored += 1;
            return;
        }
        if let Some(tx) = self.announce.as_mut() {
            tx.handle_input(now, datagram);
            while tx.poll_event().is_some() {}
            if tx.is_finished() {
                self.announce = None;
            }
        }
        if let crate::epoch::EpochVerdict::Invalid(why) = self.epoch.observe(now, r.header.epoch) {
            self.counters.epoch_failures += 1;
            self.recreate_all(now, None, RecreateReason::Announce(why));
        }
    }

    fn on_response(&mut self, id: MappingId, now: Instant, purpose: Purpose, r: &Response) {
        let verdict = self.epoch.observe(now, r.header.epoch);
        let result = r.header.result;
        let success = result == ResultCode::SUCCESS;
        let draw: f64 = self.rng.gen_range(0.0..1.0);
        let min_hold = self.config.min_error_holdoff;
        let Some(e) = self.entries.get_mut(&id) else {
            return;
        };
        match (purpose, success) {
            (Purpose::Delete, true) if r.header.lifetime != 0 => {
                // A late answer to the creation (same nonce and key):
                // the delete is still to be acknowledged.
                e.next = Some((now, Purpose::Delete));
            }
            (Purpose::Delete, _) if e.create_after_delete => {
                e.create_after_delete = false;
                e.next = Some((now, Purpose::Create));
            }
            (Purpose::Delete, _) => {
                self.drop_entry(id);
                self.events.push_back(SessionEvent::Removed {
                    id,
                    confirmed: success,
                });
            }
            (_, true) if r.header.lifetime == 0 => {
                // Section 15.1: an assigned lifetime of zero answers a delete.
                // With the same nonce and key it is the answer to one this
                // session abandoned (the mapping was removed and added back)
                // that the server handled after this request: whatever was
                // granted before, the server now holds nothing. Create it
                // again; a server that keeps answering so is asked no faster
                // than the error hold-off.
                let again = e.recreate && e.grant.is_none();
                let had = e.grant.take().is_some();
                e.recreate = true;
                e.renew_step = 0;
                e.last_renewal = None;
                e.next = Some((if again { now + min_hold } else { now }, Purpose::Create));
                if had {
                    self.events.push_back(SessionEvent::Lost { id });
                }
            }
            (_, true) => {
                let external = r.data.map_part().and_then(|m| {
                    (!portkeep_proto::addr::is_unspecified(m.external_ip)).then(|| {
                        SocketAddr::new(
                            portkeep_proto::addr::from_wire(m.external_ip),
                            m.external_port,
                        )
                    })
                });
                let requested = e.request.checkpoint_requested();
                let grant = Grant {
                    external,
                    lifetime: r.header.lifetime,
                    granted_at: now,
                    checkpoint_honoured: requested && r.checkpoint_honoured(),
                };
                let kind = match purpose {
                    Purpose::Renew if e.grant.is_some() => GrantKind::Renewed,
                    _ if e.recreate => GrantKind::Recreated,
                    _ => GrantKind::Created,
                };
                e.grant = Some(grant);
                e.last_external = external.or(e.last_external);
                e.recreate = false;
                e.hold_until = None;
                e.renew_step = 1;
                e.last_renewal = None;
                e.next = renewal_at_draw(&grant, 1, None, draw).map(|t| (t, Purpose::Renew));
                self.events.push_back(SessionEvent::Granted {
                    id,
                    kind,
                    grant,
                    checkpoint_requested: requested,
                    epoch: r.header.epoch,
                });
                let codes: Vec<u8> = r
                    .options
                    .iter()
                    .filter_map(|o| match o {
                        PcpOption::Unknown { code, .. } => Some(code.0),
                        _ => None,
                    })
                    .collect();
                if !codes.is_empty() {
                    self.events
                        .push_back(SessionEvent::UnknownOptions { id, codes });
                }
            }
            (_, false) => {
                // Section 7.4: the error lifetime says how long the same
                // request will keep failing; do not ask before it ends.
                let hold = Duration::from_secs(u64::from(r.header.lifetime)).max(min_hold);
                let retry_at = now + hold;
                e.hold_until = Some(retry_at);
                let still_held = e.grant.is_some_and(|g| g.expires() > retry_at);
                let next_kind = if still_held {
                    Purpose::Renew
                } else {
                    Purpose::Create
                };
                // A renewal planned earlier than the hold-off waits for it.
                e.next = Some(match e.next {
                    Some((t, p)) if t >= retry_at => (t, p),
                    _ => (retry_at, next_kind),
                });
                self.events.push_back(SessionEvent::Failed {
                    id,
                    result,
                    known: result.name().is_some()
                        || result == self.config.code_points.nonexist_map,
                    lifetime: r.header.lifetime,
                    retry_at,
                });
            }
        }
        if let crate::epoch::EpochVerdict::Invalid(why) = verdict {
            self.counters.epoch_failures += 1;
            // The mapping that carried the new epoch was just granted
            // under it; every other one may be gone (section 8.5).
            let except = success.then_some(id);
            self.recreate_all(now, except, RecreateReason::Epoch(why));
        }
    }

    fn recreate_all(&mut self, now: Instant, except: Option<MappingId>, reason: RecreateReason) {
        let ids: Vec<MappingId> = self
            .entries
            .iter()
            .filter(|(id, e)| Some(**id) != except && !e.removing)
            .map(|(id, _)| *id)
            .collect();
        self.recreate(now, ids, reason);
    }

    /// Re-creates the mappings `ids` (each after its own jitter).
    fn recreate(&mut self, now: Instant, mut ids: Vec<MappingId>, reason: RecreateReason) {
        // Jitter is drawn per mapping: in id order, so a seeded session
        // replays exactly (the map's iteration order is random).
        ids.sort_unstable();
        self.counters.recreated.count(reason, ids.len() as u64);
        self.events.push_back(SessionEvent::Recreating {
            reason,
            count: ids.len(),
        });
        for id in ids {
            let delay = self.jitter();
            let Some(e) = self.entries.get_mut(&id) else {
                continue;
            };
            let was_held = e.grant.take().is_some();
            // Errors the lost state gave no longer say anything.
            e.hold_until = None;
            if e.create_after_delete {
                // Its creation already waits for the delete in flight.
                e.recreate = true;
                continue;
            }
            e.tx = None;
            e.recreate = e.recreate || was_held || e.last_external.is_some();
            e.next = Some((now + delay, Purpose::Create));
            if was_held {
                self.events.push_back(SessionEvent::Lost { id });
            }
            self.reschedule(id);
        }
    }
}

/// The k-th renewal time of RFC 6887 section 11.2.1, with `draw` in
/// [0, 1) choosing the point in the window:
///
/// ```text
/// It is RECOMMENDED that PCP clients send a single renewal request packet
/// at a time chosen with uniform random distribution in the range 1/2 to
/// 5/8 of expiration time. If no SUCCESS response is received, then the
/// next renewal request should be sent 3/4 to 3/4 + 1/16 to expiration,
/// and then another 7/8 to 7/8 + 1/32 to expiration, and so on, subject
/// to the constraint that renewal requests MUST NOT be sent less than
/// four seconds apart.
/// ```
///
/// Step k covers `1 - 2^-k .. 1 - 2^-k + 2^-(k+2)` of the lifetime. `None`
/// when the point would be at or past expiry.
fn renewal_at_draw(g: &Grant, k: u32, last: Option<Instant>, draw: f64) -> Option<Instant> {
    if k == 0 || k > 30 {
        return None;
    }
    let lo = 1.0 - 0.5f64.powi(i32::try_from(k).ok()?);
    let width = 0.5f64.powi(i32::try_from(k + 2).ok()?);
    let frac = lo + width * draw.clamp(0.0, 1.0);
    let life = Duration::from_secs(u64::from(g.lifetime));
    let mut t = g.granted_at + life.mul_f64(frac);
    if let Some(l) = last {
        t = t.max(l + MIN_RENEWAL_SPACING);
    }
    (t < g.expires()).then_some(t)
}

fn renewal_at<R: Rng>(g: &Grant, k: u32, last: Option<Instant>, rng: &mut R) -> Option<Instant> {
    renewal_at_draw(g, k, last, rng.gen_range(0.0..1.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use portkeep_proto::{MapData, Protocol, Request, ResponseHeader};

    const SERVER: &str = "192.0.2.1:5351";

    #[allow(clippy::disallowed_methods)]
    fn t0() -> Instant {
        Instant::now()
    }

    fn server() -> SocketAddr {
        SERVER.parse().unwrap()
    }

    fn client_ip() -> IpAddr {
        "10.0.0.2".parse().unwrap()
    }

    fn nonce(i: u8) -> Nonce {
        [i; 12]
    }

    fn map(i: u8, port: u16) -> RequestBuilder {
        RequestBuilder::map(Protocol::TCP, port)
            .nonce(nonce(i))
            .lifetime(1000)
    }

    fn session(jitter_ms: u64) -> Session {
        let cfg = SessionConfig {
            recreate_jitter: Duration::from_millis(jitter_ms),
            ..SessionConfig::default()
        };
        Session::new(server(), client_ip(), cfg, 7)
    }

    fn drain(s: &mut Session) -> Vec<Request> {
        let cp = CodePoints::default();
        std::iter::from_fn(|| s.poll_transmit())
            .map(|d| Request::parse(&d, &cp).unwrap())
            .collect()
    }

    fn events(s: &mut Session) -> Vec<SessionEvent> {
        std::iter::from_fn(|| s.poll_event()).collect()
    }

    /// The server's answer to `req`.
    fn answer(req: &Request, result: u8, lifetime: u32, epoch: u32, ext_port: u16) -> Vec<u8> {
        let m = req.data.map_part().unwrap();
        let resp = Response {
            header: ResponseHeader {
                result: ResultCode(result),
                lifetime,
                epoch,
            },
            data: OpData::Map(MapData {
                external_port: ext_port,
                external_ip: portkeep_proto::addr::to_wire("203.0.113.9".parse().unwrap()),
                ..*m
            }),
            options: if req
                .options
                .iter()
                .any(|o| matches!(o, PcpOption::CheckpointRequired))
            {
                vec![PcpOption::CheckpointRequired]
            } else {
                vec![]
            },
        };
        resp.to_bytes(&CodePoints::default()).unwrap()
    }

    fn announce_bytes(epoch: u32) -> Vec<u8> {
        Response {
            header: ResponseHeader {
                result: ResultCode::SUCCESS,
                lifetime: 0,
                epoch,
            },
            data: OpData::Announce,
            options: vec![],
        }
        .to_bytes(&CodePoints::default())
        .unwrap()
    }

    /// Creates mappings 1..=n and grants them at `t`, epoch `epoch`.
    fn granted(n: u8, t: Instant, epoch: u32) -> Session {
        let mut s = session(500);
        for i in 1..=n {
            s.insert(t, u64::from(i), map(i, 8000 + u16::from(i)))
                .unwrap();
        }
        s.handle_timeout(t);
        for req in drain(&mut s) {
            s.handle_input(t, server(), &answer(&req, 0, 1000, epoch, 9000));
        }
        events(&mut s);
        s
    }

    #[test]
    fn rfc6887_s11_2_1_renewal_at_half_to_five_eighths() {
        let t = t0();
        let mut s = granted(1, t, 100);
        let due = s.poll_timeout().unwrap();
        let off = due - t;
        assert!(
            off >= Duration::from_secs(500) && off <= Duration::from_secs(625),
            "first renewal {off:?} not in 1/2..5/8 of 1000 s"
        );
        // Nothing is sent before it.
        s.handle_timeout(due - Duration::from_millis(1));
        assert!(drain(&mut s).is_empty());
        s.handle_timeout(due);
        let sent = drain(&mut s);
        assert_eq!(sent.len(), 1, "one renewal datagram");
        assert_eq!(
            sent[0].data.map_part().unwrap().nonce,
            nonce(1),
            "same nonce"
        );
        assert_eq!(s.counters().renewals, 1);
    }

    #[test]
    fn rfc6887_s11_2_1_unanswered_renewals_at_three_quarters_then_seven_eighths() {
        let t = t0();
        let mut s = granted(1, t, 100);
        let mut sends = Vec::new();
        // Nobody answers: follow the timers to expiry.
        while let Some(w) = s.poll_timeout() {
            if w > t + Duration::from_secs(1000) {
                break;
            }
            s.handle_timeout(w);
            for _ in drain(&mut s) {
                // The send at expiry is the re-creation, not a renewal.
                if w < t + Duration::from_secs(1000) {
                    sends.push(w - t);
                }
            }
            if w >= t + Duration::from_secs(1000) {
                break;
            }
        }
        let windows = [
            (500.0, 625.0),
            (750.0, 812.5),
            (875.0, 906.25),
            (937.5, 953.125),
        ];
        for (i, (lo, hi)) in windows.iter().enumerate() {
            let at = sends[i].as_secs_f64();
            assert!(
                at >= *lo && at <= *hi,
                "renewal {i} at {at} not in {lo}..{hi}"
            );
        }
        for w in sends.windows(2) {
            assert!(
                w[1] - w[0] >= MIN_RENEWAL_SPACING,
                "renewals closer than 4 s: {sends:?}"
            );
        }
        // At expiry the mapping is lost and re-created (one more send).
        let ev = events(&mut s);
        assert!(ev.contains(&SessionEvent::Lost { id: 1 }), "{ev:?}");
        assert_eq!(s.counters().recreates, 1);
    }

    #[test]
    fn rfc6887_s8_5_epoch_failure_recreates_all_after_jitter() {
        let t = t0();
        let mut s = granted(3, t, 5000);
        // 10 s later mapping 1 renews early (forced by a hold-off-free
        // path): simulate with an ANNOUNCE-free response: feed the renewal
        // answer by advancing to its due time instead.
        let due = s.poll_timeout().unwrap();
        s.handle_timeout(due);
        let sent = drain(&mut s);
        assert_eq!(sent.len(), 1);
        let renewed_id = u64::from(sent[0].data.map_part().unwrap().nonce[0]);
        // The server restarted meanwhile: epoch 3.
        s.handle_input(due, server(), &answer(&sent[0], 0, 1000, 3, 9100));
        let ev = events(&mut s);
        assert!(
            ev.iter().any(|e| matches!(
                e,
                SessionEvent::Recreating {
                    count: 2,
                    reason: RecreateReason::Epoch(_)
                }
            )),
            "{ev:?}"
        );
        assert_eq!(
            ev.iter()
                .filter(|e| matches!(e, SessionEvent::Lost { .. }))
                .count(),
            2
        );
        // Not at once: after a jitter in 0..500 ms, and the two apart.
        s.handle_timeout(due);
        assert!(
            drain(&mut s).is_empty(),
            "re-creation must wait for its jitter"
        );
        let mut at = Vec::new();
        while let Some(w) = s.poll_timeout() {
            if w > due + Duration::from_millis(500) {
                break;
            }
            s.handle_timeout(w);
            for r in drain(&mut s) {
                let id = u64::from(r.data.map_part().unwrap().nonce[0]);
                assert_ne!(id, renewed_id, "the mapping just granted is not re-created");
                // The old external port is suggested again.
                assert_eq!(r.data.map_part().unwrap().external_port, 9000);
                at.push(w);
            }
        }
        assert_eq!(
            at.len(),
            2,
            "both other mappings re-created within the jitter"
        );
        assert_eq!(s.counters().recreates, 2);
    }

    #[test]
    fn rfc6887_s14_1_1_unsolicited_announce_triggers_epoch_check() {
        let t = t0();
        let mut s = granted(2, t, 5000);
        // A consistent ANNOUNCE changes nothing.
        s.handle_input(t + Duration::from_secs(10), server(), &announce_bytes(5010));
        assert!(events(&mut s).is_empty());
        // From another address: ignored, even with a bad epoch.
        let other: SocketAddr = "192.0.2.99:5351".parse().unwrap();
        s.handle_input(t + Duration::from_secs(20), other, &announce_bytes(0));
        assert!(events(&mut s).is_empty());
        // From the server, epoch reset: re-create both.
        let now = t + Duration::from_secs(30);
        s.handle_input(now, server(), &announce_bytes(1));
        let ev = events(&mut s);
        assert!(ev.iter().any(|e| matches!(
            e,
            SessionEvent::Recreating {
                count: 2,
                reason: RecreateReason::Announce(_)
            }
        )));
        s.handle_timeout(now + Duration::from_millis(500));
        let sent = drain(&mut s);
        assert_eq!(sent.len(), 2);
        // Answers under the new epoch are consistent and report Recreated.
        for r in &sent {
            s.handle_input(
                now + Duration::from_millis(600),
                server(),
                &answer(r, 0, 1000, 1, 9000),
            );
        }
        let ev = events(&mut s);
        assert_eq!(
            ev.iter()
                .filter(|e| matches!(
                    e,
                    SessionEvent::Granted {
                        kind: GrantKind::Recreated,
                        ..
                    }
                ))
                .count(),
            2,
            "{ev:?}"
        );
        assert!(!ev
            .iter()
            .any(|e| matches!(e, SessionEvent::Recreating { .. })));
    }

    #[test]
    fn rfc6887_s7_4_error_lifetime_holds_off_retry() {
        let t = t0();
        let mut s = session(0);
        s.insert(t, 1, map(1, 80)).unwrap();
        s.handle_timeout(t);
        let sent = drain(&mut s);
        // NO_RESOURCES, short error lifetime 30 s.
        s.handle_input(t, server(), &answer(&sent[0], 8, 30, 10, 0));
        let ev = events(&mut s);
        assert!(matches!(
            ev[0],
            SessionEvent::Failed { id: 1, result: ResultCode::NO_RESOURCES, known: true, lifetime: 30, retry_at }
                if retry_at == t + Duration::from_secs(30)
        ));
        // Nothing before 30 s, not even a retransmission.
        let mut cursor = t;
        while let Some(w) = s.poll_timeout() {
            if w >= t + Duration::from_secs(30) {
                break;
            }
            s.handle_timeout(w);
            assert!(
                drain(&mut s).is_empty(),
                "sent during the hold-off at {:?}",
                w - t
            );
            cursor = w;
        }
        let _ = cursor;
        s.handle_timeout(t + Duration::from_secs(30));
        assert_eq!(
            drain(&mut s).len(),
            1,
            "retried once the error lifetime is over"
        );
    }

    #[test]
    fn rfc6887_s7_4_unknown_result_code_is_an_event_not_a_failure() {
        let t = t0();
        let mut s = session(0);
        s.insert(t, 1, map(1, 80)).unwrap();
        s.handle_timeout(t);
        let sent = drain(&mut s);
        s.handle_input(t, server(), &answer(&sent[0], 77, 60, 10, 0));
        let ev = events(&mut s);
        assert!(matches!(
            ev[0],
            SessionEvent::Failed {
                id: 1,
                result: ResultCode(77),
                known: false,
                lifetime: 60,
                ..
            }
        ));
    }

    #[test]
    fn rfc6887_s8_1_1_creation_retransmits_same_datagram() {
        let t = t0();
        let mut s = session(0);
        s.insert(t, 1, map(1, 80)).unwrap();
        s.handle_timeout(t);
        let first = drain(&mut s);
        let w = s.poll_timeout().unwrap();
        let rt = (w - t).as_secs_f64();
        assert!((2.7..=3.3).contains(&rt), "first RT {rt}");
        s.handle_timeout(w);
        assert_eq!(drain(&mut s), first, "retransmission is the same request");
    }

    #[test]
    fn rfc7767_s3_2_checkpoint_honoured_is_reported_and_reasked() {
        let t = t0();
        let mut s = session(0);
        s.insert(t, 1, map(1, 80).checkpoint_required()).unwrap();
        s.handle_timeout(t);
        let sent = drain(&mut s);
        // The server does not honour: answer without the option.
        let m = sent[0].data.map_part().unwrap();
        let resp = Response {
            header: ResponseHeader {
                result: ResultCode::SUCCESS,
                lifetime: 1000,
                epoch: 1,
            },
            data: OpData::Map(*m),
            options: vec![],
        };
        s.handle_input(t, server(), &resp.to_bytes(&CodePoints::default()).unwrap());
        assert!(matches!(
            events(&mut s)[0],
            SessionEvent::Granted {
                checkpoint_requested: true,
                grant: Grant {
                    checkpoint_honoured: false,
                    ..
                },
                ..
            }
        ));
        let due = s.poll_timeout().unwrap();
        s.handle_timeout(due);
        let renewal = drain(&mut s);
        assert!(
            renewal[0]
                .options
                .iter()
                .any(|o| matches!(o, PcpOption::CheckpointRequired)),
            "the renewal asks for check-pointing again"
        );
    }

    #[test]
    fn draft_s2_3_resume_sends_nothing_until_renewal() {
        let t = t0();
        let mut s = session(0);
        let grant = Grant {
            external: Some("203.0.113.9:9000".parse().unwrap()),
            lifetime: 1000,
            granted_at: t,
            checkpoint_honoured: false,
        };
        s.resume(t + Duration::from_secs(100), 1, map(1, 80), grant)
            .unwrap();
        s.handle_timeout(t + Duration::from_secs(100));
        assert!(drain(&mut s).is_empty());
        let due = s.poll_timeout().unwrap() - t;
        assert!(due >= Duration::from_secs(500) && due <= Duration::from_secs(625));
        assert_eq!(s.counters().creates + s.counters().recreates, 0);
    }

    #[test]
    fn rfc6887_s15_remove_sends_delete_with_nonce() {
        let t = t0();
        let mut s = granted(1, t, 1);
        s.remove(t, 1);
        s.handle_timeout(t);
        let sent = drain(&mut s);
        assert_eq!(sent[0].header.lifetime, 0);
        assert_eq!(sent[0].data.map_part().unwrap().nonce, nonce(1));
        s.handle_input(t, server(), &answer(&sent[0], 0, 0, 1, 0));
        assert_eq!(
            events(&mut s),
            vec![SessionEvent::Removed {
                id: 1,
                confirmed: true
            }]
        );
        assert!(s.is_empty());
    }

    #[test]
    fn draft_s2_4_new_client_address_reinstalls_and_deletes_stale() {
        let t = t0();
        let mut s = granted(2, t, 1);
        let new_ip: IpAddr = "10.0.0.3".parse().unwrap();
        let stale = s.set_client_ip(t, new_ip);
        assert_eq!(stale.len(), 2);
        for d in &stale {
            let r = Request::parse(d, &CodePoints::default()).unwrap();
            assert_eq!(r.header.lifetime, 0, "a delete");
            assert_eq!(
                portkeep_proto::addr::from_wire(r.header.client_ip),
                client_ip(),
                "from the old address"
            );
        }
        s.handle_timeout(t + Duration::from_millis(500));
        let sent = drain(&mut s);
        assert_eq!(sent.len(), 2);
        for r in &sent {
            assert_eq!(portkeep_proto::addr::from_wire(r.header.client_ip), new_ip);
            assert_eq!(r.header.lifetime, 1000);
        }
    }

    /// Failure-scenarios draft section 2.4 for a THIRD_PARTY client: one
    /// managed host moves; exactly its mappings are deleted at the old
    /// address and created at the new one, with the same nonce and the
    /// external port they had; the other host's are untouched.
    #[test]
    fn draft_s2_4_a_managed_host_that_moves_is_reinstalled_and_its_old_mappings_deleted() {
        let t = t0();
        let (h1, h2, moved): (IpAddr, IpAddr, IpAddr) = (
            "192.0.2.11".parse().unwrap(),
            "192.0.2.12".parse().unwrap(),
            "192.0.2.21".parse().unwrap(),
        );
        let mut s = session(500);
        s.insert(t, 1, map(1, 8001).third_party(h1)).unwrap();
        s.insert(t, 2, map(2, 8002).third_party(h1)).unwrap();
        s.insert(t, 3, map(3, 8003).third_party(h2)).unwrap();
        s.handle_timeout(t);
        for req in drain(&mut s) {
            s.handle_input(t, server(), &answer(&req, 0, 1000, 5, 9000));
        }
        events(&mut s);
        let third_party = |r: &Request| {
            r.options.iter().find_map(|o| match o {
                PcpOption::ThirdParty(a) => Some(portkeep_proto::addr::from_wire(*a)),
                _ => None,
            })
        };
        let stale = s.set_third_party_host(t, h1, moved);
        assert_eq!(stale.len(), 2, "one delete per mapping of the host");
        for d in &stale {
            let r = Request::parse(d, &CodePoints::default()).unwrap();
            assert_eq!(r.header.lifetime, 0, "a delete");
            assert_eq!(third_party(&r), Some(h1), "of the old address");
            assert_eq!(
                portkeep_proto::addr::from_wire(r.header.client_ip),
                client_ip(),
                "from the managing client"
            );
        }
        s.handle_timeout(t + Duration::from_millis(500));
        let sent = drain(&mut s);
        assert_eq!(sent.len(), 2, "only the moved host's mappings");
        for r in &sent {
            assert_eq!(third_party(r), Some(moved));
            assert_eq!(r.header.lifetime, 1000);
            let m = r.data.map_part().unwrap();
            assert!(m.nonce == nonce(1) || m.nonce == nonce(2));
            assert_eq!(m.external_port, 9000, "suggests what it had");
        }
        assert!(s.grant(3).is_some(), "the other host's mapping stands");
        assert!(s.set_third_party_host(t, h2, h2).is_empty());
    }

    /// The application removes a mapping and adds it back (same nonce)
    /// before the delete is answered. The creation waits for the delete:
    /// sent at once, it could reach the server first and be undone by the
    /// delete, leaving the session believing a grant the server dropped.
    #[test]
    fn rfc6887_s15_re_adding_during_a_delete_creates_after_it() {
        let t = t0();
        let mut s = granted(1, t, 1);
        s.remove(t, 1);
        s.handle_timeout(t);
        let delete = drain(&mut s).remove(0);
        assert_eq!(delete.header.lifetime, 0);
        s.insert(t, 2, map(1, 8001)).unwrap();
        assert_eq!(
            events(&mut s),
            vec![SessionEvent::Removed {
                id: 1,
                confirmed: false
            }]
        );
        s.handle_timeout(t);
        assert!(drain(&mut s).is_empty(), "no create before the delete ends");
        // A nonce a live mapping holds cannot be taken.
        assert_eq!(
            s.insert(t, 3, map(1, 8001)),
            Err(SessionError::DuplicateNonce)
        );
        let t1 = t + Duration::from_millis(20);
        s.handle_input(t1, server(), &answer(&delete, 0, 0, 2, 40001));
        assert!(events(&mut s).is_empty(), "{:?}", s.grant(2));
        s.handle_timeout(t1);
        let sent = drain(&mut s);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].header.lifetime, 1000, "a create, same nonce");
        s.handle_input(t1, server(), &answer(&sent[0], 0, 1000, 2, 40001));
        assert_eq!(s.grant(2).map(|g| g.lifetime), Some(1000));
        // A delete that is never answered delays the creation only until
        // it times out.
        let mut s = granted(1, t, 1);
        s.remove(t, 1);
        s.handle_timeout(t);
        drain(&mut s);
        s.insert(t, 2, map(1, 8001)).unwrap();
        let mut at = t;
        let mut created = false;
        for _ in 0..200 {
            at += Duration::from_millis(500);
            s.handle_timeout(at);
            if drain(&mut s).iter().any(|r| r.header.lifetime == 1000) {
                created = true;
                break;
            }
        }
        assert!(created, "the creation follows the delete's time-out");
    }

    /// An assigned lifetime of zero answers a delete (section 15.1): a
    /// renewal or creation answered so (a delete the server handled after
    /// it) leaves nothing held, and the mapping is created again.
    #[test]
    fn rfc6887_s15_1_a_lifetime_zero_answer_means_the_mapping_is_gone() {
        let t = t0();
        let mut s = granted(1, t, 1);
        s.renew_now(t, 1);
        s.handle_timeout(t);
        let renew = drain(&mut s).remove(0);
        events(&mut s);
        s.handle_input(t, server(), &answer(&renew, 0, 0, 2, 40001));
        let ev = events(&mut s);
        assert!(ev.contains(&SessionEvent::Lost { id: 1 }), "{ev:?}");
        assert!(
            !ev.iter().any(|e| matches!(e, SessionEvent::Granted { .. })),
            "an assigned lifetime of zero grants nothing: {ev:?}"
        );
        assert!(s.grant(1).is_none());
        s.handle_timeout(t);
        let again = drain(&mut s);
        assert_eq!(again.len(), 1, "the mapping is created again at once");
        assert_eq!(again[0].header.lifetime, 1000);
        // A server that keeps answering so is asked again only after the
        // error hold-off.
        s.handle_input(t, server(), &answer(&again[0], 0, 0, 2, 40001));
        s.handle_timeout(t + Duration::from_millis(999));
        assert!(drain(&mut s).is_empty(), "asked again within the hold-off");
        s.handle_timeout(t + Duration::from_secs(1));
        assert_eq!(drain(&mut s).len(), 1);
    }

    #[test]
    fn rate_bound_spreads_recreation() {
        let t = t0();
        let cfg = SessionConfig {
            recreate_jitter: Duration::ZERO,
            rate: 100,
            burst: 10,
            ..SessionConfig::default()
        };
        let mut s = Session::new(server(), client_ip(), cfg, 1);
        for i in 0..50u8 {
            s.insert(t, u64::from(i), map(i, 1000 + u16::from(i)))
                .unwrap();
        }
        s.handle_timeout(t);
        assert_eq!(drain(&mut s).len(), 10, "burst");
        s.handle_timeout(t + Duration::from_millis(100));
        assert_eq!(drain(&mut s).len(), 10, "100/s for 100 ms");
    }

    #[test]
    fn garbage_input_never_panics() {
        let t = t0();
        let mut s = granted(1, t, 1);
        for len in 0..64 {
            s.handle_input(t, server(), &vec![0xffu8; len]);
            let mut v = vec![2u8, 0x81, 0, 0];
            v.resize(len.max(4), 0);
            s.handle_input(t, server(), &v);
        }
    }
}
