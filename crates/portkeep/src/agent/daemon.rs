//! `portkeep agent run`: the tokio driver around a [`Session`], the local
//! API, the store, and the triggers that re-create mappings.
//!
//! One task owns everything (the session, the table of applications'
//! mappings, the store); sockets and API connections feed it through
//! channels, so there are no locks. Triggers (DESIGN.md "Client"):
//!
//! - a failed epoch check on any response (RFC 6887 section 8.5);
//! - an ANNOUNCE on the listening sockets (section 14.1.1; port 5350 and
//!   224.0.0.1 by default);
//! - expiry without a successful renewal (section 11.2.1);
//! - a new server address in the config file on SIGHUP, a new PCP server
//!   in the DHCP leases with `--server-from-dhcp` (RFC 7291), or a new
//!   default gateway with `--server-from-gateway` (failure-scenarios
//!   draft section 2.1);
//! - a new source address towards the server (draft section 2.4), noticed
//!   through netlink address and route notifications ([`super::watch`]);
//! - the agent's own restart: mappings resume from the store without a
//!   request (draft section 2.3), checked by one ANNOUNCE;
//! - a lost store: GET/NEXT finds what the server holds for this agent
//!   (tagged by DESCRIPTION); applications that ask again within the
//!   grace period get their mapping back as it was, the rest is deleted.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket as StdUdpSocket};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use portkeep_client::{
    Client, ClientConfig, GetFilter, Grant, GrantKind, MappingId, RecreateReason, RequestBuilder,
    RequestOptions, Session, SessionConfig, SessionEvent,
};
use portkeep_proto::{CodePoints, PcpOption, Protocol};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UdpSocket, UnixListener, UnixStream};
use tokio::sync::{broadcast, mpsc, oneshot};

use super::dhcp::Discovery;
use super::policy::{Policy, Source};
use super::store::{self, AgentKey, Store, StoredGrant, StoredMapping, StoredOrphan};
use super::watch::AddressWatch;
use portkeep::api::{AddRequest, ApiRequest};

/// How long a crash-looping application keeps short lifetimes after its
/// last restart (failure-scenarios draft section 2.3).
const CRASH_WINDOW: Duration = Duration::from_secs(600);
/// Re-adds within [`CRASH_WINDOW`] that mark an application as crashing.
const CRASH_ADDS: usize = 3;
/// The short lifetime a crashing application gets, seconds.
const CRASH_LIFETIME: u32 = 120;
/// Longest API request line accepted, octets.
/// How often the source address (and gateway) towards the server is
/// re-checked without a notification: the fallback when netlink cannot be
/// opened, and a safety net against lost notifications otherwise.
const ADDRESS_POLL: Duration = Duration::from_secs(30);
/// After an address or route notification, the re-check waits this long
/// so that the rest of a multi-step change (address, then route) lands.
const ADDRESS_SETTLE: Duration = Duration::from_millis(20);
/// Store writes are batched this long while grants change.
const FLUSH_DELAY: Duration = Duration::from_millis(250);

/// `agent run` settings.
#[derive(Debug, Clone)]
pub(crate) struct RunOptions {
    pub(crate) state_dir: PathBuf,
    pub(crate) server: SocketAddr,
    pub(crate) config: Option<PathBuf>,
    pub(crate) policy: Option<PathBuf>,
    pub(crate) bind: Option<IpAddr>,
    pub(crate) announce_listen: Vec<SocketAddr>,
    pub(crate) adopt_grace: Duration,
    /// How long mappings outlive their application's session (`None`:
    /// forever).
    pub(crate) app_grace: Option<Duration>,
    pub(crate) recreate_jitter: Duration,
    pub(crate) rate: u32,
    pub(crate) lifetime: u32,
    pub(crate) code_points: CodePoints,
    /// Follow the default gateway as the server (re-checked on route
    /// changes).
    pub(crate) server_from_gateway: bool,
    /// Take the server from the DHCP client's leases (RFC 7291), else
    /// the default gateway (re-checked on route changes).
    pub(crate) server_from_dhcp: bool,
    /// Where the DHCP clients' lease files are.
    pub(crate) dhcp_lease_dirs: Vec<PathBuf>,
    /// Where to serve Prometheus metrics.
    pub(crate) metrics_listen: Option<SocketAddr>,
}

/// The boundary's clocks, each read in one place; `Instant`s are mapped
/// to wall-clock milliseconds for the store.
#[derive(Debug, Clone, Copy)]
struct Clock {
    base: Instant,
    base_wall_ms: u64,
}

impl Clock {
    #[allow(clippy::disallowed_methods)]
    fn new() -> Clock {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Clock {
            base: Instant::now(),
            base_wall_ms: wall,
        }
    }

    #[allow(clippy::disallowed_methods)]
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn wall_ms(&self, i: Instant) -> u64 {
        if i >= self.base {
            let d = u64::try_from((i - self.base).as_millis()).unwrap_or(u64::MAX);
            self.base_wall_ms.saturating_add(d)
        } else {
            let d = u64::try_from((self.base - i).as_millis()).unwrap_or(u64::MAX);
            self.base_wall_ms.saturating_sub(d)
        }
    }

    fn instant_of(&self, ms: u64) -> Instant {
        if ms >= self.base_wall_ms {
            self.base + Duration::from_millis(ms - self.base_wall_ms)
        } else {
            self.base
                .checked_sub(Duration::from_millis(self.base_wall_ms - ms))
                .unwrap_or(self.base)
        }
    }
}

/// One application's mapping.
#[derive(Debug, Clone)]
struct AppMapping {
    app: String,
    protocol: Protocol,
    port: u16,
    lifetime: u32,
    app_checkpoint: Option<bool>,
    /// The application marked the check-point mandatory (RFC 7767
    /// section 4, example 3).
    app_mandatory: bool,
    /// Who added it: only that user, or root, may remove it (`None`: added
    /// before the agent kept it, so root only).
    owner_uid: Option<u32>,
    /// Kept until removed, whatever becomes of the application.
    persistent: bool,
    /// The host it is made for with THIRD_PARTY (`None`: this host).
    host: Option<IpAddr>,
    /// The API connection that last added it, while open.
    conn: Option<u64>,
    /// Its application's session ended (or it was restored from the
    /// store): deleted at this time unless the application comes back.
    grace_until: Option<Instant>,
    checkpoint: bool,
    source: Source,
    nonce: [u8; 12],
    grant: Option<StoredGrant>,
    state: &'static str,
    last_result: Option<u8>,
    adds: Vec<u64>,
}

/// A mapping found on the server with this agent's tag after the store
/// was lost.
#[derive(Debug, Clone)]
struct Orphan {
    app: String,
    protocol: Protocol,
    port: u16,
    external: SocketAddr,
    lifetime: u32,
    checkpoint: bool,
}

/// Who sent an API request: the user id of the process (`SO_PEERCRED`;
/// `None` if the kernel would not say) and its connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Caller {
    uid: Option<u32>,
    conn: u64,
}

impl Caller {
    /// The metrics endpoint: no user (it may only ask for the status), on
    /// a connection number no API connection gets.
    pub(crate) fn metrics() -> Caller {
        Caller {
            uid: None,
            conn: u64::MAX,
        }
    }
}

/// A request, who sent it, and where its answer goes.
pub(crate) type Command = (ApiRequest, Caller, oneshot::Sender<Value>);

struct Agent {
    opts: RunOptions,
    clock: Clock,
    key: AgentKey,
    tag: String,
    session: Session,
    policy: Policy,
    mappings: BTreeMap<MappingId, AppMapping>,
    /// (protocol, internal port) to mapping: the server's key for this host.
    /// (THIRD_PARTY host, protocol, internal port) to mapping: the
    /// server's key (its own host's mappings have no host here).
    by_port: HashMap<(Option<IpAddr>, Protocol, u16), MappingId>,
    next_id: u64,
    /// Orphans awaiting adoption, until `adopt_deadline`.
    orphans: Vec<Orphan>,
    adopt_deadline: Option<Instant>,
    /// Session ids of orphans being deleted.
    deleting_orphans: HashMap<MappingId, Orphan>,
    dirty: Option<Instant>,
    events: broadcast::Sender<String>,
    /// Reads the DHCP leases for `--server-from-dhcp`.
    dhcp: Discovery,
}

fn proto_name(p: Protocol) -> String {
    p.name()
        .map_or_else(|| p.0.to_string(), str::to_ascii_lowercase)
}

fn err(message: impl Into<String>) -> Value {
    json!({"ok": false, "error": message.into()})
}

impl Agent {
    fn description(&self, app: &str) -> String {
        format!("{}{app}", self.tag)
    }

    fn builder(&self, m: &AppMapping) -> RequestBuilder {
        let mut b = RequestBuilder::map(m.protocol, m.port)
            .nonce(m.nonce)
            .lifetime(m.lifetime)
            .description(self.description(&m.app));
        if let Some(h) = m.host {
            b = b.third_party(h);
        }
        if m.checkpoint {
            b = b.checkpoint_required();
        }
        b
    }

    fn emit(&self, v: Value) {
        // No subscriber is not an error.
        let _ = self.events.send(v.to_string());
    }

    fn mark_dirty(&mut self, now: Instant) {
        if self.dirty.is_none() {
            self.dirty = Some(now + FLUSH_DELAY);
        }
    }

    fn to_store(&self) -> Store {
        Store {
            version: 1,
            server: Some(self.session.server()),
            client_ip: Some(self.session.client_ip()),
            epoch: self
                .session
                .epoch()
                .map(|(e, at)| (e, self.clock.wall_ms(at))),
            next_id: self.next_id,
            mappings: self
                .mappings
                .iter()
                .map(|(&id, m)| StoredMapping {
                    id,
                    app: m.app.clone(),
                    protocol: m.protocol.0,
                    port: m.port,
                    lifetime: m.lifetime,
                    app_checkpoint: m.app_checkpoint,
                    app_mandatory: m.app_mandatory,
                    owner_uid: m.owner_uid,
                    persistent: m.persistent,
                    host: m.host,
                    nonce: hex::encode(m.nonce),
                    grant: m.grant.clone(),
                    adds_unix_ms: m.adds.clone(),
                })
                .collect(),
            orphans: self
                .orphans
                .iter()
                .map(|o| StoredOrphan {
                    app: o.app.clone(),
                    protocol: o.protocol.0,
                    port: o.port,
                    external: o.external,
                    lifetime: o.lifetime,
                    checkpoint: o.checkpoint,
                })
                .collect(),
        }
    }

    fn flush(&mut self) {
        self.dirty = None;
        if let Err(e) = self.to_store().save(&self.opts.state_dir) {
            eprintln!("portkeep agent: cannot write the store: {e}");
        }
    }

    fn stored_grant(&self, g: &Grant) -> StoredGrant {
        StoredGrant {
            external: g.external,
            lifetime: g.lifetime,
            granted_unix_ms: self.clock.wall_ms(g.granted_at),
            checkpoint_honoured: g.checkpoint_honoured,
        }
    }

    fn mapping_json(&self, id: MappingId, m: &AppMapping, now: Instant) -> Value {
        let expires_in = m.grant.as_ref().map(|g| {
            let exp = self.clock.instant_of(g.granted_unix_ms)
                + Duration::from_secs(u64::from(g.lifetime));
            exp.saturating_duration_since(now).as_secs()
        });
        json!({
            "id": id,
            "app": m.app,
            "protocol": proto_name(m.protocol),
            "port": m.port,
            "host": m.host.map(|h| h.to_string()),
            "lifetime": m.lifetime,
            "state": m.state,
            "external": m.grant.as_ref().and_then(|g| g.external).map(|e| e.to_string()),
            "expires_in": expires_in,
            "checkpoint": m.checkpoint,
            "checkpoint_source": m.source,
            "checkpoint_honoured": m.grant.as_ref().is_some_and(|g| g.checkpoint_honoured),
            "last_result": m.last_result,
            "nonce": hex::encode(m.nonce),
        })
    }

    fn event_base(&self, id: MappingId) -> Value {
        match self.mappings.get(&id) {
            Some(m) => {
                json!({"id": id, "app": m.app, "protocol": proto_name(m.protocol), "port": m.port})
            }
            None => json!({"id": id}),
        }
    }

    fn handle_event(&mut self, now: Instant, ev: SessionEvent) {
        match ev {
            SessionEvent::Granted {
                id,
                kind,
                grant,
                checkpoint_requested,
                epoch,
            } => {
                let sg = self.stored_grant(&grant);
                // Renewals are the steady-state work: build the event only
                // for someone listening.
                let listening = self.events.receiver_count() > 0;
                let mut v = if listening {
                    self.event_base(id)
                } else {
                    Value::Null
                };
                let mut changed = kind != GrantKind::Renewed;
                if let Some(m) = self.mappings.get_mut(&id) {
                    // A renewal that changes nothing but the expiry is not
                    // written: after a restart the mapping is merely renewed
                    // sooner. This keeps an idle agent's disk and CPU quiet.
                    changed |= m.grant.as_ref().is_none_or(|g| {
                        g.external != sg.external || g.checkpoint_honoured != sg.checkpoint_honoured
                    });
                    m.grant = Some(sg);
                    m.state = "granted";
                    m.last_result = Some(0);
                }
                if listening {
                    v["event"] = json!("granted");
                    v["kind"] = json!(match kind {
                        GrantKind::Created => "created",
                        GrantKind::Renewed => "renewed",
                        GrantKind::Recreated => "recreated",
                    });
                    v["external"] = json!(grant.external.map(|e| e.to_string()));
                    v["lifetime"] = json!(grant.lifetime);
                    v["epoch"] = json!(epoch);
                    v["checkpoint_requested"] = json!(checkpoint_requested);
                    v["checkpoint_honoured"] = json!(grant.checkpoint_honoured);
                    self.emit(v);
                }
                if changed {
                    self.mark_dirty(now);
                }
            }
            SessionEvent::Failed {
                id,
                result,
                known,
                lifetime,
                retry_at,
            } => {
                let mut v = self.event_base(id);
                if let Some(m) = self.mappings.get_mut(&id) {
                    m.state = "failed";
                    m.last_result = Some(result.0);
                }
                v["event"] = json!("failed");
                v["result"] = json!(result.0);
                v["result_name"] = json!(if known {
                    portkeep_client::result_name(result)
                } else {
                    "UNKNOWN"
                });
                v["known"] = json!(known);
                v["error_lifetime"] = json!(lifetime);
                v["retry_in_ms"] = json!(u64::try_from(
                    retry_at.saturating_duration_since(now).as_millis()
                )
                .unwrap_or(u64::MAX));
                self.emit(v);
            }
            SessionEvent::Lost { id } => {
                let mut v = self.event_base(id);
                if let Some(m) = self.mappings.get_mut(&id) {
                    m.grant = None;
                    m.state = "recreating";
                }
                v["event"] = json!("lost");
                self.emit(v);
                self.mark_dirty(now);
            }
            SessionEvent::Recreating { reason, count } => {
                let reason = match reason {
                    RecreateReason::Epoch(_) => "epoch",
                    RecreateReason::Announce(_) => "announce",
                    RecreateReason::ServerChanged => "server_changed",
                    RecreateReason::ClientAddressChanged => "client_address_changed",
                    RecreateReason::ThirdPartyHostChanged => "third_party_host_changed",
                    _ => "other",
                };
                self.emit(json!({"event": "recreating", "reason": reason, "count": count}));
            }
            SessionEvent::Removed { id, confirmed } => {
                if let Some(o) = self.deleting_orphans.remove(&id) {
                    self.emit(json!({"event": "orphan_deleted", "app": o.app, "protocol": proto_name(o.protocol), "port": o.port, "confirmed": confirmed}));
                } else {
                    self.emit(json!({"event": "removed", "id": id, "confirmed": confirmed}));
                }
            }
            SessionEvent::UnknownOptions { id, codes } => {
                let mut v = self.event_base(id);
                v["event"] = json!("unknown_options");
                v["codes"] = json!(codes);
                self.emit(v);
            }
            SessionEvent::TimedOut { id } => {
                let mut v = self.event_base(id);
                v["event"] = json!("timed_out");
                self.emit(v);
            }
            _ => {}
        }
    }

    fn add(&mut self, now: Instant, req: AddRequest, caller: Caller) -> Value {
        let protocol = match req.check() {
            Ok(p) => p,
            Err(e) => return err(e),
        };
        let AddRequest {
            app,
            protocol: _,
            port,
            checkpoint,
            mandatory,
            lifetime,
            persistent,
            host,
        } = req;
        let wall = self.clock.wall_ms(now);
        let (cp, source) = self.policy.checkpoint(&app, checkpoint, mandatory);
        let asked_life = self.policy.lifetime(&app, lifetime, self.opts.lifetime);
        // The same application asking again for what it holds: it restarted.
        let existing = self
            .by_port
            .get(&(host, protocol, port))
            .and_then(|id| Some((*id, self.mappings.get(id)?.app.clone())));
        if let Some((id, owner)) = existing {
            if owner != app {
                return err(format!(
                    "{} {port} is held by app {owner}",
                    proto_name(protocol)
                ));
            }
            let Some(m) = self.mappings.get_mut(&id) else {
                return err("internal: mapping vanished");
            };
            m.adds
                .retain(|&t| wall.saturating_sub(t) < CRASH_WINDOW.as_millis() as u64);
            m.adds.push(wall);
            let life_before = m.lifetime;
            let crashing = m.adds.len() >= CRASH_ADDS;
            // Failure-scenarios draft section 2.3: a crash-looping
            // application gets short lifetimes until it stays up.
            m.lifetime = if crashing {
                asked_life.min(CRASH_LIFETIME)
            } else {
                asked_life
            };
            let changed = m.lifetime != life_before || m.checkpoint != cp;
            m.app_checkpoint = checkpoint;
            m.app_mandatory = mandatory;
            m.checkpoint = cp;
            m.source = source;
            // Back within the grace period: its session is this one.
            m.persistent = persistent;
            m.conn = Some(caller.conn);
            m.grace_until = None;
            let (life, want) = (m.lifetime, cp);
            self.session
                .update_request(id, |b| b.lifetime(life).checkpoint(want));
            if changed {
                self.session.renew_now(now, id);
            }
            self.mark_dirty(now);
            return json!({"ok": true, "id": id, "existing": true, "lifetime": life, "crash_looping": crashing, "checkpoint": cp, "checkpoint_source": source});
        }
        let id = self.next_id;
        self.next_id += 1;
        let m = AppMapping {
            nonce: self.key.nonce_for(&app, protocol, port, host),
            app,
            protocol,
            port,
            lifetime: asked_life,
            app_checkpoint: checkpoint,
            app_mandatory: mandatory,
            owner_uid: caller.uid,
            persistent,
            host,
            conn: Some(caller.conn),
            grace_until: None,
            checkpoint: cp,
            source,
            grant: None,
            state: "pending",
            last_result: None,
            adds: vec![wall],
        };
        let builder = self.builder(&m);
        // An orphan found with GET after a lost store: take it back as it
        // is. (The walk finds this host's own mappings; THIRD_PARTY ones
        // are not adopted.)
        let orphan = self.orphans.iter().position(|o| {
            host.is_none() && o.app == m.app && o.protocol == protocol && o.port == port
        });
        let result = match orphan {
            Some(i) => {
                let o = self.orphans.swap_remove(i);
                let grant = Grant {
                    external: Some(o.external),
                    lifetime: o.lifetime,
                    granted_at: now,
                    checkpoint_honoured: o.checkpoint,
                };
                self.emit(json!({"event": "adopted", "id": id, "app": o.app, "protocol": proto_name(protocol), "port": port, "external": o.external.to_string()}));
                self.session
                    .resume(now, id, builder, grant)
                    .map(|()| Some(grant))
            }
            None => self.session.insert(now, id, builder).map(|()| None),
        };
        match result {
            Ok(grant) => {
                let nonce = hex::encode(m.nonce);
                let mut m = m;
                if let Some(g) = grant {
                    m.grant = Some(self.stored_grant(&g));
                    m.state = "granted";
                }
                self.by_port.insert((host, protocol, port), id);
                self.mappings.insert(id, m);
                // Written within FLUSH_DELAY, not before the request leaves:
                // the nonce derives from the key, so a crash in between
                // loses nothing the application's next `add` cannot redo.
                self.mark_dirty(now);
                json!({"ok": true, "id": id, "nonce": nonce, "checkpoint": cp, "checkpoint_source": source, "lifetime": asked_life})
            }
            Err(e) => err(e.to_string()),
        }
    }

    /// Whether `app`'s mappings live only as long as its session with the
    /// agent (failure-scenarios draft section 2.2): not when the grace is
    /// off, nor for an application the user's config declares.
    fn bound(&self, app: &str) -> bool {
        self.opts.app_grace.is_some() && !self.policy.user.apps.contains_key(app)
    }

    fn remove(&mut self, now: Instant, id: MappingId) {
        if let Some(m) = self.mappings.remove(&id) {
            self.by_port.remove(&(m.host, m.protocol, m.port));
        }
        self.session.remove(now, id);
        self.mark_dirty(now);
    }

    /// An API connection closed: the mappings it added (and no later
    /// connection took over) outlive it by the grace period.
    fn connection_closed(&mut self, now: Instant, conn: u64) {
        let Some(grace) = self.opts.app_grace else {
            return;
        };
        let ids: Vec<MappingId> = self
            .mappings
            .iter()
            .filter(|(_, m)| m.conn == Some(conn))
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            let bound = self.mappings.get(&id).is_some_and(|m| self.bound(&m.app));
            if let Some(m) = self.mappings.get_mut(&id) {
                m.conn = None;
                if bound && !m.persistent {
                    m.grace_until = Some(now + grace);
                }
            }
        }
    }

    /// Deletes the mappings whose application did not come back in time
    /// (failure-scenarios draft section 2.2: an application's liveness
    /// bounds its mappings).
    fn expire_apps(&mut self, now: Instant) {
        let gone: Vec<MappingId> = self
            .mappings
            .iter()
            .filter(|(_, m)| m.grace_until.is_some_and(|t| t <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            if let Some(m) = self.mappings.get(&id) {
                self.emit(json!({"event": "app_gone", "id": id, "app": m.app, "protocol": proto_name(m.protocol), "port": m.port}));
            }
            self.remove(now, id);
        }
    }

    /// When [`Agent::expire_apps`] next has work.
    fn next_app_expiry(&self) -> Option<Instant> {
        self.mappings.values().filter_map(|m| m.grace_until).min()
    }

    /// One API request.
    fn api(&mut self, now: Instant, req: ApiRequest, caller: Caller) -> Value {
        let uid = caller.uid;
        match req {
            ApiRequest::Add(req) => self.add(now, req, caller),
            ApiRequest::Remove {
                app,
                protocol,
                port,
                host,
            } => {
                let Ok(protocol) = crate::parse::protocol(&protocol) else {
                    return err(format!("bad protocol {protocol}"));
                };
                let id = self
                    .by_port
                    .get(&(host, protocol, port))
                    .copied()
                    .filter(|id| self.mappings.get(id).is_some_and(|m| m.app == app));
                let Some(id) = id else {
                    return err(format!(
                        "app {app} has no {} {port} mapping",
                        proto_name(protocol)
                    ));
                };
                // Any local process can reach the socket: one may remove
                // only what its own user added (root anything), so that
                // one user cannot take another's mappings away.
                let owner = self.mappings.get(&id).and_then(|m| m.owner_uid);
                if uid != Some(0) && (uid.is_none() || owner != uid) {
                    return err(format!(
                        "{} {port} of app {app} was added by {}; only that user or root may remove it",
                        proto_name(protocol),
                        owner.map_or_else(|| "another user".to_owned(), |u| format!("user {u}"))
                    ));
                }
                self.remove(now, id);
                json!({"ok": true, "id": id})
            }
            ApiRequest::Heartbeat { app } => {
                let bound = self.bound(&app);
                let until = self.opts.app_grace.map(|g| now + g);
                let mut n = 0;
                for m in self.mappings.values_mut().filter(|m| m.app == app) {
                    n += 1;
                    if bound && !m.persistent && m.conn.is_none() {
                        m.grace_until = until;
                    }
                }
                json!({"ok": true, "mappings": n})
            }
            ApiRequest::List => {
                let list: Vec<Value> = self
                    .mappings
                    .iter()
                    .map(|(&id, m)| self.mapping_json(id, m, now))
                    .collect();
                json!({"ok": true, "mappings": list})
            }
            ApiRequest::Status => {
                let c = self.session.counters();
                json!({
                    "ok": true,
                    "agent_id": self.key.id(),
                    "server": self.session.server().to_string(),
                    "client_ip": self.session.client_ip().to_string(),
                    "epoch": self.session.epoch().map(|(e, _)| e),
                    "mappings": self.mappings.len(),
                    "granted": self.mappings.values().filter(|m| m.grant.is_some()).count(),
                    "orphans_pending": self.orphans.len(),
                    "counters": {
                        "datagrams_sent": c.datagrams_sent,
                        "creates": c.creates,
                        "recreates": c.recreates,
                        "renewals": c.renewals,
                        "deletes": c.deletes,
                        "responses": c.responses,
                        "ignored": c.ignored,
                        "epoch_failures": c.epoch_failures,
                    },
                    "recreated": {
                        "epoch": c.recreated.epoch,
                        "announce": c.recreated.announce,
                        "server_changed": c.recreated.server_changed,
                        "client_address_changed": c.recreated.client_address_changed,
                        "third_party_host_changed": c.recreated.third_party_host_changed,
                    },
                })
            }
            // Handled by the connection task.
            ApiRequest::Subscribe => json!({"ok": true}),
        }
    }

    /// The grace period after a lost store is over: delete every orphan no
    /// application asked for (failure-scenarios draft section 2.3).
    fn delete_orphans(&mut self, now: Instant) {
        self.adopt_deadline = None;
        self.mark_dirty(now);
        for o in std::mem::take(&mut self.orphans) {
            let id = self.next_id;
            self.next_id += 1;
            let b = RequestBuilder::map(o.protocol, o.port)
                .nonce(self.key.nonce(&o.app, o.protocol, o.port))
                .lifetime(1);
            let grant = Grant {
                external: Some(o.external),
                lifetime: o.lifetime.max(1),
                granted_at: now,
                checkpoint_honoured: false,
            };
            if self.session.resume(now, id, b, grant).is_ok() {
                self.session.remove(now, id);
                self.deleting_orphans.insert(id, o);
            }
        }
    }

    /// Crash-looping applications that stayed up long enough get their
    /// lifetime back.
    fn relax_crashers(&mut self, now: Instant) {
        let wall = self.clock.wall_ms(now);
        let window = u64::try_from(CRASH_WINDOW.as_millis()).unwrap_or(u64::MAX);
        let mut changed = Vec::new();
        for (&id, m) in &mut self.mappings {
            if m.lifetime == CRASH_LIFETIME
                && m.adds
                    .last()
                    .is_some_and(|&t| wall.saturating_sub(t) >= window)
            {
                m.adds.clear();
                m.lifetime = self.policy.lifetime(&m.app, None, self.opts.lifetime);
                changed.push((id, m.lifetime));
            }
        }
        for (id, life) in changed {
            self.session.update_request(id, |b| b.lifetime(life));
        }
    }

    fn reload(&mut self, now: Instant) {
        let policy = match self.policy.reload() {
            Ok(p) => p,
            Err(e) => {
                eprintln!("portkeep agent: reload failed, keeping the old settings: {e}");
                return;
            }
        };
        self.policy = policy;
        let mut updates = Vec::new();
        for (&id, m) in &mut self.mappings {
            let (cp, source) = self
                .policy
                .checkpoint(&m.app, m.app_checkpoint, m.app_mandatory);
            m.source = source;
            if cp != m.checkpoint {
                m.checkpoint = cp;
                updates.push((id, cp));
            }
        }
        for (id, cp) in updates {
            self.session.update_request(id, |b| b.checkpoint(cp));
        }
        if let Some(s) = self.policy.user.server.clone() {
            match crate::parse::server(&s) {
                Ok(addr) if addr != self.session.server() => {
                    eprintln!("portkeep agent: server is now {addr}; re-creating every mapping");
                    self.session.set_server(now, addr);
                    self.emit(json!({"event": "server_changed", "server": addr.to_string()}));
                }
                Ok(_) => {}
                Err(e) => eprintln!("portkeep agent: bad server in config: {e}"),
            }
        }
        self.flush();
    }
}

/// Moves the agent to a new source address (failure-scenarios draft
/// section 2.4): a socket on `ip`, every mapping installed again from it,
/// the stale ones deleted from the old address while it still exists.
async fn rebind(agent: &mut Agent, sock: &mut UdpSocket, now: Instant, ip: IpAddr) {
    let new = match UdpSocket::bind((ip, 0)).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("portkeep agent: cannot bind the new address {ip}: {e}");
            return;
        }
    };
    let old_ip = agent.session.client_ip();
    let stale = agent.session.set_client_ip(now, ip);
    let server = agent.session.server();
    let deleted = match StdUdpSocket::bind((old_ip, 0)) {
        Ok(old) => stale
            .iter()
            .filter(|d| old.send_to(d, server).is_ok())
            .count(),
        Err(e) => {
            eprintln!(
                "portkeep agent: old address {old_ip} is gone ({e}); stale mappings will expire"
            );
            0
        }
    };
    *sock = new;
    eprintln!("portkeep agent: address {old_ip} -> {ip}; re-creating every mapping");
    agent.emit(json!({"event": "client_address_changed", "from": old_ip.to_string(), "to": ip.to_string(), "stale_deletes_sent": deleted}));
    agent.mark_dirty(now);
}

/// The address requests should come from: `bind` in the config file,
/// else `--bind`, else the route's source towards the server.
fn wanted_ip(agent: &Agent) -> Option<IpAddr> {
    agent
        .policy
        .user
        .bind
        .or(agent.opts.bind)
        .or_else(|| route_source(agent.session.server()).ok())
}

/// The IPv4 default gateway from `/proc/net/route` (RFC 6887 section
/// 8.1: absent other configuration, the PCP server is the default
/// router). `None` when there is none or the file cannot be read.
fn default_gateway() -> Option<IpAddr> {
    let text = std::fs::read_to_string("/proc/net/route").ok()?;
    parse_default_gateway(&text)
}

/// Parses `/proc/net/route`: the first up (`RTF_UP`) gateway
/// (`RTF_GATEWAY`) route to 0.0.0.0/0. Addresses are hex of the
/// address's octets read as a little-endian word.
fn parse_default_gateway(text: &str) -> Option<IpAddr> {
    text.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (dest, gw, flags, mask) = (f.get(1)?, f.get(2)?, f.get(3)?, f.get(7)?);
        let flags = u16::from_str_radix(flags, 16).ok()?;
        if *dest != "00000000" || *mask != "00000000" || flags & 0x3 != 0x3 {
            return None;
        }
        let gw = u32::from_str_radix(gw, 16).ok()?;
        Some(IpAddr::V4(Ipv4Addr::from(gw.to_le_bytes())))
    })
}

/// Where the server should be: `server` in the config file, else the
/// discovered one ([`discovered_server`]), else the command line's.
fn wanted_server(agent: &mut Agent) -> Option<SocketAddr> {
    if let Some(s) = agent.policy.user.server.as_deref() {
        return crate::parse::server(s).ok();
    }
    let now = agent.clock.wall_ms(agent.clock.now()) / 1000;
    discovered_server(&agent.opts, &mut agent.dhcp, now)
}

/// The server the network names, at the `--server` port: with
/// `--server-from-dhcp`, the PCP server option of the DHCP leases (RFC
/// 7291; the first server, its other addresses and the other servers as
/// fallbacks, RFC 7488), else the default gateway (RFC 6887 section 8.1),
/// which is all `--server-from-gateway` looks at. `None`: neither asked
/// for nor found.
fn discovered_server(
    opts: &RunOptions,
    dhcp: &mut Discovery,
    now_unix_s: u64,
) -> Option<SocketAddr> {
    let port = opts.server.port();
    if opts.server_from_dhcp {
        let now = i64::try_from(now_unix_s).unwrap_or(i64::MAX);
        let routable = |ip: IpAddr| route_source(SocketAddr::new(ip, port)).is_ok();
        if let Some(ip) = dhcp.server(&opts.dhcp_lease_dirs, now, routable) {
            return Some(SocketAddr::new(ip, port));
        }
    }
    if opts.server_from_gateway || opts.server_from_dhcp {
        return default_gateway().map(|ip| SocketAddr::new(ip, port));
    }
    None
}

/// Binds a socket for unsolicited ANNOUNCEs; joins 224.0.0.1 (ff02::1)
/// when it listens on the IPv4 (IPv6) wildcard (RFC 6887 section 14.1.1).
fn announce_socket(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let s = StdUdpSocket::bind(addr)?;
    if addr.ip() == IpAddr::V4(Ipv4Addr::UNSPECIFIED) {
        if let Err(e) = s.join_multicast_v4(&Ipv4Addr::new(224, 0, 0, 1), &Ipv4Addr::UNSPECIFIED) {
            eprintln!("portkeep agent: cannot join 224.0.0.1: {e}");
        }
    }
    if addr.ip() == IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED) {
        // ff02::1 on the default interface (index 0).
        if let Err(e) =
            s.join_multicast_v6(&std::net::Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1), 0)
        {
            eprintln!("portkeep agent: cannot join ff02::1: {e}");
        }
    }
    s.set_nonblocking(true)?;
    UdpSocket::from_std(s)
}

/// The source address the kernel uses towards `server`.
fn route_source(server: SocketAddr) -> std::io::Result<IpAddr> {
    let any: IpAddr = if server.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    };
    let s = StdUdpSocket::bind((any, 0))?;
    s.connect(server)?;
    Ok(s.local_addr()?.ip())
}

/// Runs the agent until SIGTERM or SIGINT.
pub(crate) fn run(opts: RunOptions) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("portkeep agent: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(main_loop(opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("portkeep agent: {e}");
            ExitCode::from(1)
        }
    }
}

#[allow(clippy::too_many_lines)]
async fn main_loop(opts: RunOptions) -> Result<(), String> {
    let dir = opts.state_dir.clone();
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let _lock = store::lock(&dir)?;
    let key = AgentKey::load_or_create(&dir).map_err(|e| format!("agent key: {e}"))?;
    let policy = Policy::load(opts.config.as_deref(), opts.policy.as_deref())?;
    let clock = Clock::new();
    let stored = match Store::load(&dir) {
        Ok(s) => s,
        Err(e) => {
            // Keep the unreadable file for a person to look at; rebuild
            // from the server.
            eprintln!("portkeep agent: unreadable store ({e}); reconstructing from the server");
            let _ = std::fs::rename(dir.join(store::STORE_FILE), dir.join("store.json.corrupt"));
            None
        }
    };
    let mut server = opts.server;
    let mut dhcp = Discovery::default();
    if (opts.server_from_gateway || opts.server_from_dhcp) && policy.user.server.is_none() {
        let now = clock.wall_ms(clock.now()) / 1000;
        match discovered_server(&opts, &mut dhcp, now) {
            Some(s) => server = s,
            None => eprintln!("portkeep agent: no default gateway yet; using {server}"),
        }
    }
    if let Some(s) = policy.user.server.as_deref() {
        server = crate::parse::server(s).map_err(|e| format!("config server: {e}"))?;
    }
    let client_ip = match policy.user.bind.or(opts.bind) {
        Some(ip) => ip,
        None => route_source(server).map_err(|e| format!("no route to {server}: {e}"))?,
    };
    let mut sock = UdpSocket::bind((client_ip, 0))
        .await
        .map_err(|e| format!("cannot bind {client_ip}: {e}"))?;
    let (ann_tx, mut ann_rx) = mpsc::channel::<(SocketAddr, Vec<u8>)>(1024);
    for &a in &opts.announce_listen {
        match announce_socket(a) {
            Ok(s) => {
                let tx = ann_tx.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 2048];
                    while let Ok((n, from)) = s.recv_from(&mut buf).await {
                        if tx.send((from, buf[..n].to_vec())).await.is_err() {
                            break;
                        }
                    }
                });
            }
            Err(e) => eprintln!("portkeep agent: not listening for ANNOUNCE on {a}: {e}"),
        }
    }
    drop(ann_tx);
    let session_cfg = SessionConfig {
        code_points: opts.code_points,
        recreate_jitter: opts.recreate_jitter,
        rate: opts.rate,
        burst: opts.rate / 10 + 1,
        ..SessionConfig::default()
    };
    let seed: u64 = rand::random();
    let now = clock.now();
    let stored_server = stored.as_ref().and_then(|s| s.server).unwrap_or(server);
    let (events, _) = broadcast::channel(65_536);
    let mut agent = Agent {
        tag: format!("pk-agent/{}/", key.id()),
        key,
        // Resumed mappings were made from the stored address; a change is
        // handled right after (draft section 2.4).
        session: Session::new(
            stored_server,
            stored
                .as_ref()
                .and_then(|s| s.client_ip)
                .unwrap_or(client_ip),
            session_cfg,
            seed,
        ),
        policy,
        mappings: BTreeMap::new(),
        by_port: HashMap::new(),
        next_id: 1,
        orphans: Vec::new(),
        adopt_deadline: None,
        deleting_orphans: HashMap::new(),
        dirty: None,
        events,
        dhcp,
        clock,
        opts: opts.clone(),
    };
    match stored {
        Some(st) => {
            agent.next_id = st.next_id.max(1);
            if let Some((e, at)) = st.epoch {
                agent.session.resume_epoch(e, clock.instant_of(at));
            }
            for sm in st.mappings {
                let protocol = Protocol(sm.protocol);
                let (cp, source) =
                    agent
                        .policy
                        .checkpoint(&sm.app, sm.app_checkpoint, sm.app_mandatory);
                let nonce: Option<[u8; 12]> =
                    hex::decode(&sm.nonce).ok().and_then(|b| b.try_into().ok());
                let bound = opts.app_grace.is_some()
                    && !sm.persistent
                    && !agent.policy.user.apps.contains_key(&sm.app);
                let m = AppMapping {
                    nonce: nonce.unwrap_or_else(|| {
                        agent.key.nonce_for(&sm.app, protocol, sm.port, sm.host)
                    }),
                    app: sm.app,
                    protocol,
                    port: sm.port,
                    lifetime: sm.lifetime,
                    app_checkpoint: sm.app_checkpoint,
                    app_mandatory: sm.app_mandatory,
                    owner_uid: sm.owner_uid,
                    persistent: sm.persistent,
                    host: sm.host,
                    conn: None,
                    // Its application must come back (or heartbeat) within
                    // the grace period, as after its session ended.
                    grace_until: opts.app_grace.filter(|_| bound).map(|g| now + g),
                    checkpoint: cp,
                    source,
                    grant: sm.grant.clone(),
                    state: if sm.grant.is_some() {
                        "granted"
                    } else {
                        "pending"
                    },
                    last_result: None,
                    adds: sm.adds_unix_ms,
                };
                let b = agent.builder(&m);
                let r = match &sm.grant {
                    Some(g) => {
                        let grant = Grant {
                            external: g.external,
                            lifetime: g.lifetime,
                            granted_at: clock.instant_of(g.granted_unix_ms),
                            checkpoint_honoured: g.checkpoint_honoured,
                        };
                        agent.session.resume(now, sm.id, b, grant)
                    }
                    None => agent.session.insert(now, sm.id, b),
                };
                match r {
                    Ok(()) => {
                        agent.next_id = agent.next_id.max(sm.id + 1);
                        agent.by_port.insert((m.host, m.protocol, m.port), sm.id);
                        agent.mappings.insert(sm.id, m);
                    }
                    Err(e) => eprintln!("portkeep agent: stored mapping {} dropped: {e}", sm.id),
                }
            }
            // A crash during the grace period: the grace starts again.
            agent.orphans = st
                .orphans
                .into_iter()
                .map(|o| Orphan {
                    app: o.app,
                    protocol: Protocol(o.protocol),
                    port: o.port,
                    external: o.external,
                    lifetime: o.lifetime,
                    checkpoint: o.checkpoint,
                })
                .collect();
            if !agent.orphans.is_empty() {
                agent.adopt_deadline = Some(now + opts.adopt_grace);
            }
            if stored_server != server {
                agent.session.set_server(now, server);
            } else if !agent.mappings.is_empty() {
                // One ANNOUNCE tells whether the server lost state while
                // the agent was down (RFC 6887 section 8.5).
                agent.session.announce(now);
            }
        }
        None => {
            // Failure-scenarios draft section 4: ask the server what it
            // holds for this host, keep what is ours (by tag).
            let cfg = ClientConfig {
                code_points: opts.code_points,
                ..ClientConfig::default()
            };
            match Client::connect_from(server, SocketAddr::new(client_ip, 0), cfg).await {
                Ok(client) => {
                    let ro = RequestOptions {
                        max_duration: Some(Duration::from_secs(5)),
                        max_transmissions: None,
                    };
                    match client.walk(GetFilter::all(), ro).collect().await {
                        Ok(found) => {
                            for e in found {
                                if e.internal.ip() != client_ip {
                                    continue;
                                }
                                let desc = e.options.iter().find_map(|o| match o {
                                    PcpOption::Description(d) => Some(d.clone()),
                                    _ => None,
                                });
                                let Some(app) = desc
                                    .as_deref()
                                    .and_then(|d| d.strip_prefix(agent.tag.as_str()))
                                else {
                                    continue;
                                };
                                agent.orphans.push(Orphan {
                                    app: app.to_owned(),
                                    protocol: e.protocol,
                                    port: e.internal.port(),
                                    external: e.external,
                                    lifetime: e.lifetime,
                                    checkpoint: e
                                        .options
                                        .iter()
                                        .any(|o| matches!(o, PcpOption::CheckpointRequired)),
                                });
                            }
                            eprintln!(
                                "portkeep agent: no store; found {} mapping(s) of this agent on the server",
                                agent.orphans.len()
                            );
                        }
                        Err(e) => {
                            eprintln!("portkeep agent: GET/NEXT failed ({e}); starting empty")
                        }
                    }
                }
                Err(e) => eprintln!("portkeep agent: cannot query the server: {e}"),
            }
            if !agent.orphans.is_empty() {
                agent.adopt_deadline = Some(now + opts.adopt_grace);
            }
            agent.flush();
        }
    }

    if agent.session.client_ip() != client_ip {
        rebind(&mut agent, &mut sock, now, client_ip).await;
    }
    let sock_path = store::socket_path(&dir);
    // We hold the lock: a socket file left behind is stale.
    let _ = std::fs::remove_file(&sock_path);
    let listener = UnixListener::bind(&sock_path)
        .map_err(|e| format!("cannot listen on {}: {e}", sock_path.display()))?;
    // Any local process may call the API (each caller's user id, from
    // SO_PEERCRED, decides what it may remove): connecting needs write
    // permission on the socket, whatever the agent's umask.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&sock_path, std::fs::Permissions::from_mode(0o666))
            .map_err(|e| format!("cannot open {} to every user: {e}", sock_path.display()))?;
    }
    let (cmd_tx, mut cmd_rx) = mpsc::channel::<Command>(256);
    if let Some(addr) = agent.opts.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))?;
        tokio::spawn(super::metrics::serve(listener, cmd_tx.clone()));
    }
    let (closed_tx, mut closed_rx) = mpsc::unbounded_channel::<u64>();
    let ev_tx = agent.events.clone();
    tokio::spawn(async move {
        let mut next_conn = 0u64;
        while let Ok((stream, _)) = listener.accept().await {
            // The kernel's word on who connected (SO_PEERCRED), taken
            // once: it cannot change for the connection's life.
            let caller = Caller {
                uid: stream.peer_cred().ok().map(|c| c.uid()),
                conn: next_conn,
            };
            next_conn += 1;
            let (cmds, events, closed) = (cmd_tx.clone(), ev_tx.clone(), closed_tx.clone());
            tokio::spawn(async move {
                serve_connection(stream, caller, cmds, events).await;
                // The application's session ended (failure-scenarios
                // draft section 2.2).
                let _ = closed.send(caller.conn);
            });
        }
    });
    use tokio::signal::unix::{signal, SignalKind};
    let mut sigterm = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let mut sighup = signal(SignalKind::hangup()).map_err(|e| e.to_string())?;
    eprintln!(
        "portkeep agent: id {} serving {} for {client_ip} towards {}",
        agent.key.id(),
        sock_path.display(),
        agent.session.server()
    );
    let mut watch = AddressWatch::open(ADDRESS_POLL);
    let mut buf = vec![0u8; 2048];
    let mut relax_at = clock.now() + Duration::from_secs(10);
    // A change between the start-up check and the subscription is caught
    // by one re-check once subscribed.
    let mut addr_check_at = clock.now()
        + if watch.is_active() {
            ADDRESS_SETTLE
        } else {
            ADDRESS_POLL
        };
    loop {
        let now = clock.now();
        agent.session.handle_timeout(now);
        while let Some(d) = agent.session.poll_transmit() {
            if let Err(e) = sock.send_to(&d, agent.session.server()).await {
                // 8.1.1: keep trying; the schedule will resend.
                eprintln!("portkeep agent: send to {}: {e}", agent.session.server());
            }
        }
        while let Some(ev) = agent.session.poll_event() {
            agent.handle_event(now, ev);
        }
        if agent.adopt_deadline.is_some_and(|d| now >= d) {
            agent.delete_orphans(now);
            continue;
        }
        if agent.next_app_expiry().is_some_and(|t| now >= t) {
            agent.expire_apps(now);
            continue;
        }
        if agent.dirty.is_some_and(|d| now >= d) {
            agent.flush();
        }
        if now >= relax_at {
            agent.relax_crashers(now);
            relax_at = now + Duration::from_secs(10);
        }
        if now >= addr_check_at {
            // After a netlink notification or the slow poll: ask the
            // kernel for the route's source (one connect() on a throw-away
            // socket) unless the address is fixed.
            addr_check_at = now + ADDRESS_POLL;
            // Draft section 2.1: a new gateway, or a new PCP server in the
            // DHCP leases, is a new server.
            if let Some(srv) = wanted_server(&mut agent).filter(|s| *s != agent.session.server()) {
                eprintln!("portkeep agent: server is now {srv}; re-creating every mapping");
                agent.session.set_server(now, srv);
                agent.emit(json!({"event": "server_changed", "server": srv.to_string()}));
                agent.mark_dirty(now);
                // The source towards the new server may differ too.
                addr_check_at = now;
                continue;
            }
            if let Some(ip) = wanted_ip(&agent).filter(|ip| *ip != agent.session.client_ip()) {
                rebind(&mut agent, &mut sock, now, ip).await;
                continue;
            }
        }
        let wake = [
            agent.session.poll_timeout(),
            agent.adopt_deadline,
            agent.next_app_expiry(),
            agent.dirty,
            Some(relax_at),
            Some(addr_check_at),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(relax_at);
        tokio::select! {
            r = sock.recv_from(&mut buf) => {
                if let Ok((n, from)) = r {
                    let now = clock.now();
                    agent.session.handle_input(now, from, &buf[..n]);
                    // Drain what else is queued, for throughput under load.
                    while let Ok((n, from)) = sock.try_recv_from(&mut buf) {
                        agent.session.handle_input(now, from, &buf[..n]);
                    }
                }
            }
            Some((from, d)) = ann_rx.recv() => {
                agent.session.handle_input(clock.now(), from, &d);
            }
            Some((req, caller, reply)) = cmd_rx.recv() => {
                let answer = agent.api(clock.now(), req, caller);
                let _ = reply.send(answer);
            }
            Some(conn) = closed_rx.recv() => {
                agent.connection_closed(clock.now(), conn);
            }
            () = watch.changed() => {
                // Draft sections 2.1 and 2.4: an address or route changed;
                // re-check soon, not later than already due.
                addr_check_at = addr_check_at.min(clock.now() + ADDRESS_SETTLE);
            }
            () = tokio::time::sleep_until(tokio::time::Instant::from_std(wake)) => {}
            _ = sighup.recv() => {
                agent.reload(clock.now());
                // A new `bind` in the config applies at once.
                addr_check_at = clock.now();
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    agent.flush();
    let _ = std::fs::remove_file(&sock_path);
    Ok(())
}

async fn serve_connection(
    stream: UnixStream,
    caller: Caller,
    cmds: mpsc::Sender<Command>,
    events: broadcast::Sender<String>,
) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        // A request is small; a client sending an endless line is cut off
        // rather than buffered without bound.
        let mut line = String::new();
        match (&mut reader)
            .take(portkeep::api::MAX_LINE as u64)
            .read_line(&mut line)
            .await
        {
            Ok(0) | Err(_) => return,
            Ok(_) if !line.ends_with('\n') && line.len() >= portkeep::api::MAX_LINE => {
                let _ = write
                    .write_all(b"{\"ok\":false,\"error\":\"request line too long\"}\n")
                    .await;
                return;
            }
            Ok(_) => {}
        }
        let req = match ApiRequest::parse_line(&line) {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            Err(e) => {
                let mut out = err(e).to_string();
                out.push('\n');
                if write.write_all(out.as_bytes()).await.is_err() {
                    return;
                }
                continue;
            }
        };
        if matches!(req, ApiRequest::Subscribe) {
            let mut rx = events.subscribe();
            if write.write_all(b"{\"ok\":true}\n").await.is_err() {
                return;
            }
            loop {
                let line = match rx.recv().await {
                    Ok(l) => l,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        json!({"event": "lagged", "missed": n}).to_string()
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                let mut out = line;
                out.push('\n');
                if write.write_all(out.as_bytes()).await.is_err() {
                    return;
                }
            }
        }
        let (tx, rx) = oneshot::channel();
        if cmds.send((req, caller, tx)).await.is_err() {
            return;
        }
        let Ok(answer) = rx.await else { return };
        let mut out = answer.to_string();
        out.push('\n');
        if write.write_all(out.as_bytes()).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc6887_s8_1_default_gateway_from_proc_net_route() {
        let text =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
            eth0\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
            eth0\t00000000\t0100A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n";
        assert_eq!(
            parse_default_gateway(text),
            Some("192.168.0.1".parse().unwrap())
        );
        assert_eq!(parse_default_gateway("Iface\n"), None);
        assert_eq!(
            parse_default_gateway("x\neth0 00000000 zz 0003 0 0 0 00000000"),
            None
        );
    }

    #[test]
    fn clock_round_trips_wall_time() {
        let c = Clock::new();
        let later = c.base + Duration::from_millis(1500);
        assert_eq!(c.instant_of(c.wall_ms(later)), later);
        let earlier = c.instant_of(c.base_wall_ms - 2000);
        assert_eq!(c.wall_ms(earlier), c.base_wall_ms - 2000);
    }
}
