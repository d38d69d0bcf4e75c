//! The active/backup pair around the sans-IO replication in `portkeep-ha`:
//! the node's role, the TLS link, responses held until the backup
//! acknowledged their check-point, and promotion and demotion.
//!
//! RFC 7767 section 3.2: for an honoured request the state should be on
//! the backup before the response is sent. The committer hands each group
//! commit's changes to [`Ha::after_commit`], which streams the relevant
//! ones to the backup and holds the replies that depend on them until the
//! backup's acknowledgement covers their sequence number. A reply still
//! held when the link falls out of sync is rewritten without the option
//! and its mapping unflagged ([`reject`]): an unconfirmed check-point is
//! never reported as honoured.
//!
//! One thread runs a small tokio runtime for the link: it connects to the
//! peer while this node is active, and accepts the active's connection
//! while it is the backup. Both ends authenticate each other with TLS
//! certificates from the pair's own CA, unless the configuration asks for
//! plaintext (a dedicated cable).

use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context;
use portkeep_ha::{Active, ActiveEvent, Backup, Item, LinkState, Term};
use portkeep_proto::{CodePoints, PcpOption};
use portkeep_server::record::key_of;
use portkeep_server::{
    BackupState, Change, ChangeRecord, MappingKey, MappingKind, Restored, Server, SubscriberId,
    Timestamp,
};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::ha_config::{HaSettings, LinkSettings, Role};
use crate::mmsg::SendBatch;
use crate::runtime::{Reset, Shared};

/// A check-point granted in a held reply: undone if never confirmed.
#[derive(Debug, Clone)]
pub(crate) struct Grant {
    key: MappingKey,
    kind: MappingKind,
    nonce: portkeep_proto::Nonce,
}

/// What replication needs from one job's changes, computed before the
/// committer folds them into one transaction.
#[derive(Debug, Default)]
pub(crate) struct JobMeta {
    last_seq: Option<u64>,
    /// Items with the hash of their mapping key (for upserts and removals).
    items: Vec<(Item, Option<u64>)>,
    grants: Vec<Grant>,
}

/// Replies waiting for the backup's acknowledgement of `seq`.
#[derive(Debug)]
pub(crate) struct Held {
    seq: u64,
    pub(crate) socket: usize,
    pub(crate) replies: SendBatch,
    pub(crate) grants: Vec<Grant>,
}

/// Counters for `ctl status`.
#[derive(Debug, Default)]
struct Stats {
    /// Responses released after the backup's acknowledgement.
    released: u64,
    /// Check-points confirmed by the backup.
    checkpoints_acked: u64,
    /// Check-points answered as not honoured because the backup did not
    /// confirm them in time.
    checkpoints_rewritten: u64,
    /// Snapshots sent.
    resyncs: u64,
    /// Items in the last snapshot, and when it was sent and acknowledged.
    snapshot_items: usize,
    snapshot_sent: Option<Timestamp>,
    snapshot_acked_ms: Option<u64>,
    /// Connections refused (authentication failed or protocol error).
    refused: u64,
    last_refusal: Option<String>,
    /// Takeovers done by this node.
    takeovers: u64,
}

struct State {
    role: Role,
    term: Term,
    active: Option<Active>,
    backup: Option<Backup>,
    held: VecDeque<Held>,
    /// Hashes of the keys of the mappings the backup holds, so that
    /// volatile mappings (whose upserts are removals for the backup) do not
    /// travel at all. A collision only sends a harmless extra removal.
    replicated: HashSet<u64>,
    /// Bumped by every role change and every accepted connection, so a
    /// superseded connection notices and ends.
    generation: u64,
    stats: Stats,
}

/// The node's part in the pair.
pub(crate) struct Ha {
    pub(crate) settings: HaSettings,
    state: Mutex<State>,
    /// Whether workers answer PCP: only an active (or standalone) node
    /// does, and an active one only once it knows it is not deposed.
    pub(crate) serving: AtomicBool,
    /// Wakes the link's writer.
    wake: tokio::sync::Notify,
    term_path: PathBuf,
    hasher: RandomState,
    keying: portkeep_server::SubscriberKeying,
    /// Bumped on role changes, for the link thread's loops.
    role_gen: AtomicU64,
}

impl std::fmt::Debug for Ha {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ha")
            .field("role", &self.lock().role)
            .finish()
    }
}

/// Reads the term persisted in `path` (0 if none).
fn read_term(path: &Path) -> anyhow::Result<Term> {
    match std::fs::read_to_string(path) {
        Ok(s) => s
            .trim()
            .parse()
            .with_context(|| format!("{} does not hold a term", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Persists `term` atomically and durably: a node must never come back
/// in a lower term than one it acted in (fencing).
fn write_term(path: &Path, term: Term) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        writeln!(f, "{term}")?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

impl Ha {
    pub(crate) fn new(
        settings: HaSettings,
        data_dir: &Path,
        keying: portkeep_server::SubscriberKeying,
    ) -> anyhow::Result<Ha> {
        let term_path = data_dir.join("term");
        let term = read_term(&term_path)?;
        let role = settings.role;
        let timing = settings.link.as_ref().map(|l| l.timing);
        let active = match (role, timing) {
            (Role::Active, Some(t)) => Some(Active::new(term, t, keying.clone())),
            _ => None,
        };
        let backup = (role == Role::Backup).then(|| Backup::new(term, keying.clone()));
        Ok(Ha {
            // An active node with a peer first learns whether it was
            // deposed while away (the link thread opens the gate).
            serving: AtomicBool::new(role == Role::Standalone),
            settings,
            state: Mutex::new(State {
                role,
                term,
                active,
                backup,
                held: VecDeque::new(),
                replicated: HashSet::new(),
                generation: 0,
                stats: Stats::default(),
            }),
            wake: tokio::sync::Notify::new(),
            term_path,
            hasher: RandomState::new(),
            keying,
            role_gen: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The role now.
    pub(crate) fn role(&self) -> Role {
        self.lock().role
    }

    /// Whether a node in `role` replicates (an active node has a link end
    /// exactly when a link is configured).
    pub(crate) fn replicates(&self, role: Role) -> bool {
        role == Role::Active && self.settings.link.is_some()
    }

    fn key_hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    /// The replication view of one job's changes and volatile markers.
    pub(crate) fn meta(
        &self,
        changes: &[ChangeRecord],
        volatile: Vec<(SubscriberId, Vec<IpAddr>)>,
    ) -> JobMeta {
        let mut m = JobMeta {
            last_seq: changes.last().map(|c| c.seq),
            ..JobMeta::default()
        };
        for c in changes {
            if let Change::Upserted(r) = &c.change {
                if r.checkpoint {
                    m.grants.push(Grant {
                        key: r.key,
                        kind: r.kind,
                        nonce: r.nonce,
                    });
                }
            }
            let Some(item) = Item::from_change(&c.change) else {
                continue;
            };
            let hash = match &item {
                Item::Upsert(r) => Some(self.key_hash(&key_of(r))),
                Item::Remove(k) => Some(self.key_hash(k)),
                _ => None,
            };
            m.items.push((item, hash));
        }
        for (subscriber, hosts) in volatile {
            m.items.push((Item::Volatile { subscriber, hosts }, None));
        }
        m
    }

    /// After a group commit: streams what the backup must hear and sorts
    /// the jobs' replies into those to send now, those to hold for the
    /// backup's acknowledgement, and those whose check-point can no longer
    /// be confirmed (returned, to be rewritten by [`reject`]).
    pub(crate) fn after_commit(
        &self,
        now: Timestamp,
        jobs: Vec<(usize, SendBatch, JobMeta)>,
        release: &mut Vec<(usize, SendBatch)>,
    ) -> Vec<Held> {
        let mut rejected = Vec::new();
        let mut s = self.lock();
        match s.role {
            Role::Standalone => {
                release.extend(jobs.into_iter().map(|(i, r, _)| (i, r)));
                return rejected;
            }
            // Demoted meanwhile: this node no longer answers.
            Role::Backup => return rejected,
            Role::Active => {}
        }
        let st = &mut *s;
        let Some(active) = st.active.as_mut() else {
            release.extend(jobs.into_iter().map(|(i, r, _)| (i, r)));
            return rejected;
        };
        let streaming = matches!(
            active.state(),
            LinkState::Resyncing { .. } | LinkState::InSync | LinkState::Lagging
        );
        let in_sync = active.in_sync();
        let sent = active.sent();
        let mut items = Vec::new();
        let mut top = 0;
        let mut sorted = Vec::with_capacity(jobs.len());
        for (socket, replies, meta) in jobs {
            let seq = meta.last_seq.unwrap_or(0);
            let mut needs = false;
            // Jobs at or below the snapshot's position are in it.
            if streaming && seq > sent {
                for (item, hash) in meta.items {
                    let keep = match (&item, hash) {
                        (Item::Upsert(_), Some(h)) => {
                            st.replicated.insert(h);
                            true
                        }
                        (Item::Remove(_), Some(h)) => st.replicated.remove(&h),
                        _ => true,
                    };
                    if keep {
                        items.push(item);
                        needs = true;
                    }
                }
                top = top.max(seq);
            } else {
                needs = !meta.items.is_empty();
            }
            sorted.push((socket, replies, meta.grants, seq, needs));
        }
        if !items.is_empty() {
            active.push(now, top.max(sent + 1), items);
        }
        let acked = active.acked();
        for (socket, replies, grants, seq, needs) in sorted {
            if !needs && grants.is_empty() {
                // Nothing the backup must hear (volatile refreshes, errors,
                // GET answers).
                release.push((socket, replies));
            } else if seq <= acked {
                st.stats.released += 1;
                st.stats.checkpoints_acked += grants.len() as u64;
                release.push((socket, replies));
            } else if in_sync {
                st.held.push_back(Held {
                    seq,
                    socket,
                    replies,
                    grants,
                });
            } else if grants.is_empty() {
                // Out of sync: nothing is waited for; the backup learns
                // the rest from the next snapshot.
                release.push((socket, replies));
            } else {
                rejected.push(Held {
                    seq,
                    socket,
                    replies,
                    grants,
                });
            }
        }
        drop(s);
        self.wake.notify_one();
        rejected
    }

    /// Status for `ctl status`.
    pub(crate) fn status(&self, now: Timestamp) -> Value {
        let s = self.lock();
        let link = self.settings.link.as_ref();
        let mut v = json!({
            "role": s.role.as_str(),
            "term": s.term,
            "serving": self.serving.load(Ordering::Relaxed),
            "link": link.map(|l| json!({
                "listen": l.listen.to_string(),
                "peer": l.peer.to_string(),
                "tls": l.tls.is_some(),
            })),
            "held_responses": s.held.len(),
            "responses_released_after_ack": s.stats.released,
            "checkpoints_acknowledged": s.stats.checkpoints_acked,
            "checkpoints_not_confirmed": s.stats.checkpoints_rewritten,
            "resyncs": s.stats.resyncs,
            "last_snapshot_items": s.stats.snapshot_items,
            "last_snapshot_ack_ms": s.stats.snapshot_acked_ms,
            "refused_connections": s.stats.refused,
            "last_refusal": s.stats.last_refusal,
            "takeovers": s.stats.takeovers,
        });
        if let Some(a) = &s.active {
            let state = match a.state() {
                LinkState::Disconnected => "disconnected",
                LinkState::Handshake => "handshake",
                LinkState::NeedSnapshot => "snapshot requested",
                LinkState::Resyncing { .. } => "resyncing",
                LinkState::InSync => "in sync",
                LinkState::Lagging => "lagging",
                LinkState::Fenced { .. } => "fenced",
            };
            v["link_state"] = json!(state);
            v["in_sync"] = json!(a.in_sync());
            v["sent_seq"] = json!(a.sent());
            v["acked_seq"] = json!(a.acked());
            v["lag"] = json!(a.sent().saturating_sub(a.acked()));
            if let (LinkState::Resyncing { .. }, Some(t)) = (a.state(), s.stats.snapshot_sent) {
                v["resync_elapsed_ms"] = json!((now - t).as_millis() as u64);
            }
        }
        if let Some(b) = &s.backup {
            v["link_state"] = json!(if b.in_sync() {
                "in sync"
            } else if b.staging_count().is_some() {
                "resyncing"
            } else {
                "not in sync"
            });
            v["in_sync"] = json!(b.in_sync());
            v["applied_seq"] = json!(b.applied());
            v["checkpointed_mappings"] = json!(b.mapping_count());
            v["volatile_subscribers"] = json!(b.volatile_count());
            v["clock_offset_ms"] = json!(b.clock_offset_ms());
            if let Some(n) = b.staging_count() {
                v["resync_received_mappings"] = json!(n);
            }
        }
        v
    }

    fn bump_role(&self) {
        self.role_gen.fetch_add(1, Ordering::SeqCst);
        self.wake.notify_one();
    }
}

/// The core's view of the link (RFC 7767 section 3.2's "resources
/// available": only an in-sync backup lets a check-point be honoured).
fn backup_state_of(s: &State) -> BackupState {
    match (&s.role, &s.active) {
        (Role::Active, Some(a)) => match a.state() {
            LinkState::InSync => BackupState::InSync,
            LinkState::Resyncing { .. } | LinkState::NeedSnapshot | LinkState::Lagging => {
                BackupState::Syncing
            }
            _ => BackupState::Disconnected,
        },
        _ => BackupState::Standalone,
    }
}

/// Tells the core the link's state; core then HA lock, like everywhere.
fn sync_backup_state(shared: &Shared) {
    let mut core = shared.lock();
    let st = backup_state_of(&shared.ha.lock());
    core.server.set_backup_state(st);
}

/// Strips CHECKPOINT_REQUIRED from a response: the check-point it reported
/// was not confirmed by the backup (RFC 7767 section 3.2: a request that
/// cannot be honoured is processed as if the option were absent, and the
/// option is not echoed).
fn strip_checkpoint(bytes: &[u8], cp: &CodePoints) -> Vec<u8> {
    crate::runtime::rewrite_response(bytes, cp, |r| {
        let before = r.options.len();
        r.options.retain(|o| *o != PcpOption::CheckpointRequired);
        r.options.len() != before
    })
}

/// Answers held replies whose check-point the backup never confirmed: the
/// mappings lose their flag (logged and stored like any change) and the
/// replies go out without the option, after that change is committed.
pub(crate) fn reject(shared: &Shared, held: Vec<Held>) {
    if held.is_empty() {
        return;
    }
    let mut core = shared.lock();
    let cp = core.server.config().code_points;
    let mut n = 0u64;
    for h in &held {
        for g in &h.grants {
            if core.server.unflag(&g.key, g.kind, g.nonce) {
                n += 1;
            }
        }
    }
    shared.ha.lock().stats.checkpoints_rewritten += n;
    tracing::warn!(
        responses = held.len(),
        unflagged = n,
        "backup did not confirm check-points in time: answered as not honoured"
    );
    let mut core = Some(core);
    for h in held {
        let replies = h.replies.rewrite(|b| strip_checkpoint(b, &cp));
        let guard = core.take().unwrap_or_else(|| shared.lock());
        shared.submit(guard, replies, h.socket);
    }
}

fn handle_events(shared: &Arc<Shared>, events: Vec<ActiveEvent>) {
    for e in events {
        match e {
            ActiveEvent::Acked(seq) => {
                let mut released = Vec::new();
                {
                    let mut s = shared.ha.lock();
                    while s.held.front().is_some_and(|h| h.seq <= seq) {
                        if let Some(h) = s.held.pop_front() {
                            s.stats.released += 1;
                            s.stats.checkpoints_acked += h.grants.len() as u64;
                            released.push((h.socket, h.replies));
                        }
                    }
                }
                shared.send_committed(released);
            }
            ActiveEvent::InSync => {
                sync_backup_state(shared);
                let mut s = shared.ha.lock();
                if let Some(t) = s.stats.snapshot_sent {
                    if s.stats.snapshot_acked_ms.is_none() {
                        let ms = (shared.clock.now() - t).as_millis() as u64;
                        s.stats.snapshot_acked_ms = Some(ms);
                    }
                }
                tracing::info!(
                    items = s.stats.snapshot_items,
                    took_ms = s.stats.snapshot_acked_ms,
                    "backup in sync: check-points are honoured"
                );
            }
            ActiveEvent::OutOfSync(why) => {
                sync_backup_state(shared);
                let held: Vec<Held> = shared.ha.lock().held.drain(..).collect();
                tracing::warn!(
                    "backup out of sync ({why}): no check-point is honoured until it resyncs"
                );
                reject(shared, held);
            }
            ActiveEvent::NeedSnapshot => send_snapshot(shared),
            ActiveEvent::Fenced(term) => {
                demote(
                    shared,
                    Some(term),
                    &format!("a node in term {term} is active"),
                );
            }
        }
    }
}

/// The full check-pointed state, for a backup that (re)connected (RFC 7767
/// section 1), taken under the core lock so that it stands exactly for the
/// log position it names; later changes follow on the stream.
fn send_snapshot(shared: &Arc<Shared>) {
    // Encoding a million mappings takes a while: off the link's runtime, so
    // heartbeats keep both ends from declaring the other dead meanwhile.
    let shared = shared.clone();
    let spawned = std::thread::Builder::new()
        .name("snapshot".into())
        .spawn(move || build_snapshot(&shared));
    if let Err(e) = spawned {
        tracing::error!("cannot start the snapshot: {e}");
    }
}

fn build_snapshot(shared: &Shared) {
    let (term, part) = {
        let s = shared.ha.lock();
        let Some(a) = s.active.as_ref() else {
            return;
        };
        if a.state() != LinkState::NeedSnapshot {
            return;
        }
        let part = shared
            .ha
            .settings
            .link
            .as_ref()
            .map_or(512, |l| l.timing.snapshot_part);
        (a.term(), part)
    };
    // The core stays locked until the snapshot is queued on the link, so
    // that it stands exactly for `seq` and no later change is pushed
    // before it.
    let core = shared.lock();
    let now = shared.clock.now();
    let seq = core.server.last_seq();
    let mut items = vec![Item::ServerEpoch {
        anchor: core.server.anchor(),
    }];
    for (subscriber, anchor) in core.server.subscriber_anchors() {
        items.push(Item::Epoch { subscriber, anchor });
    }
    let maps = core.server.checkpointed_mappings();
    let hashes: HashSet<u64> = maps
        .iter()
        .map(|m| shared.ha.key_hash(&key_of(m)))
        .collect();
    items.extend(maps.into_iter().map(Item::Upsert));
    for (subscriber, hosts) in core.server.volatile_hosts() {
        items.push(Item::Volatile { subscriber, hosts });
    }
    let n = items.len();
    let bytes = portkeep_ha::encode_snapshot(term, seq, items, part);
    let mut s = shared.ha.lock();
    let Some(a) = s.active.as_mut() else {
        return;
    };
    if a.state() != LinkState::NeedSnapshot {
        // The link went down (or we were deposed) meanwhile.
        return;
    }
    a.send_encoded_snapshot(now, term, seq, bytes);
    s.replicated = hashes;
    s.stats.resyncs += 1;
    s.stats.snapshot_items = n;
    s.stats.snapshot_sent = Some(now);
    s.stats.snapshot_acked_ms = None;
    drop(s);
    drop(core);
    tracing::info!(items = n, seq, "resync: snapshot sent to the backup");
    shared.ha.wake.notify_one();
}

/// Stops acting as active (`ctl demote`, or a higher term was seen): the
/// node answers no more PCP, forgets its state (the new active's is the
/// truth; a stale copy must never be served again) and waits for the
/// active's link as a backup.
pub(crate) fn demote(shared: &Shared, seen: Option<Term>, why: &str) -> Value {
    let now = shared.clock.now();
    let mut core = shared.lock();
    let mut s = shared.ha.lock();
    if s.role != Role::Active {
        return json!({"ok": true, "role": s.role.as_str(), "term": s.term, "changed": false});
    }
    shared.ha.serving.store(false, Ordering::SeqCst);
    s.term = s.term.max(seen.unwrap_or(0));
    if let Err(e) = write_term(&shared.ha.term_path, s.term) {
        tracing::error!("cannot persist term {}: {e}", s.term);
    }
    s.role = Role::Backup;
    s.active = None;
    s.held.clear();
    s.replicated.clear();
    s.backup = Some(Backup::new(s.term, shared.ha.keying.clone()));
    s.generation += 1;
    let term = s.term;
    drop(s);
    core.server = Server::new(shared.server_cfg.clone(), now);
    shared.submit_reset(
        core,
        Reset {
            state: Restored {
                anchor: now,
                subscriber_anchors: Vec::new(),
                mappings: Vec::new(),
                last_seq: 0,
            },
        },
    );
    shared.ha.bump_role();
    tracing::warn!(term, "demoted to backup: {why}; state dropped");
    json!({"ok": true, "role": "backup", "term": term, "changed": true})
}

/// Becomes active (`ctl promote`, keepalived's notify hook): installs the
/// check-pointed state received as backup, resets the epochs of exactly
/// the subscribers that lost state and ANNOUNCEs it to their hosts
/// (failure-scenarios draft section 2.6), then serves.
pub(crate) fn promote(shared: &Shared) -> Value {
    let watch = crate::clock::Stopwatch::start();
    let mut core = shared.lock();
    let mut s = shared.ha.lock();
    match s.role {
        Role::Active => {
            return json!({"ok": true, "role": "active", "term": s.term, "changed": false})
        }
        Role::Standalone => {
            return json!({"ok": false, "error": "this node is standalone: configure [ha] role = \"backup\" to make it promotable"})
        }
        Role::Backup => {}
    }
    let backup = s
        .backup
        .take()
        .unwrap_or_else(|| Backup::new(s.term, shared.ha.keying.clone()));
    let next = backup.term() + 1;
    // Fencing depends on never acting twice in one term: persist first.
    if let Err(e) = write_term(&shared.ha.term_path, next) {
        s.backup = Some(backup);
        return json!({"ok": false, "error": format!("cannot persist term {next}: {e}")});
    }
    let stale_after = shared
        .ha
        .settings
        .link
        .as_ref()
        .map_or(Duration::ZERO, |l| l.stale_after);
    let now = shared.clock.now();
    let takeover = backup.promote(now, stale_after);
    let state = takeover.state.clone();
    let (server, report) = Server::restore(shared.server_cfg.clone(), now, takeover.state);
    core.server = server;
    let mut targets: Vec<(SubscriberId, IpAddr)> = takeover
        .reset
        .iter()
        .flat_map(|(sub, hosts)| hosts.iter().map(move |h| (*sub, *h)))
        .collect();
    targets.extend(
        report
            .dropped
            .iter()
            .map(|m| (m.subscriber, m.key.internal_ip)),
    );
    targets.sort();
    targets.dedup();
    s.role = Role::Active;
    s.term = takeover.term;
    s.active = shared
        .ha
        .settings
        .link
        .as_ref()
        .map(|l| Active::new(takeover.term, l.timing, shared.ha.keying.clone()));
    s.held.clear();
    s.replicated.clear();
    s.generation += 1;
    s.stats.takeovers += 1;
    let st = backup_state_of(&s);
    drop(s);
    core.server.set_backup_state(st);
    let kind = format!("{:?}", takeover.kind).to_lowercase();
    let restored = report.restored;
    // The store and the dataplane are replaced in log order, before any
    // request handled from now on is answered.
    shared.submit_reset(core, Reset { state });
    shared.ha.serving.store(true, Ordering::SeqCst);
    if !targets.is_empty() {
        shared.announce_to(shared.lock(), &targets);
        shared.schedule_announce(targets.clone());
    }
    shared.ha.bump_role();
    let took = watch.micros();
    tracing::warn!(
        term = takeover.term,
        kind,
        mappings = restored,
        reset = targets.len(),
        took_us = took,
        "promoted to active"
    );
    json!({
        "ok": true,
        "role": "active",
        "term": takeover.term,
        "changed": true,
        "takeover": kind,
        "mappings": restored,
        "reset_subscribers": takeover.reset.len(),
        "announced_hosts": targets.len(),
        "took_us": took,
    })
}

/// The link thread.
pub(crate) fn run(shared: Arc<Shared>, link: LinkSettings, listener: std::net::TcpListener) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("replication link cannot start: {e}");
            return;
        }
    };
    rt.block_on(async move {
        let listener = match TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("replication link cannot listen: {e}");
                return;
            }
        };
        let stop = {
            let shared = shared.clone();
            async move {
                while !shared.stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        tokio::select! {
            _ = accept_loop(shared.clone(), link.clone(), listener) => {}
            _ = active_loop(shared.clone(), link.clone()) => {}
            _ = stop => {}
        }
    });
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

async fn accept_loop(shared: Arc<Shared>, link: LinkSettings, listener: TcpListener) {
    loop {
        let (tcp, from) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("replication link: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let shared = shared.clone();
        let link = link.clone();
        tokio::spawn(async move {
            let stream: Box<dyn Stream> = match &link.tls {
                None => Box::new(tcp),
                Some(tls) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server.clone());
                    match tokio::time::timeout(Duration::from_secs(5), acceptor.accept(tcp)).await {
                        Ok(Ok(s)) => match tls.check_peer(s.get_ref().1) {
                            Ok(()) => Box::new(s),
                            Err(why) => return refused(&shared, from, &why),
                        },
                        Ok(Err(e)) => return refused(&shared, from, &e.to_string()),
                        Err(_) => return refused(&shared, from, "TLS handshake timed out"),
                    }
                }
            };
            let role = shared.ha.role();
            match role {
                Role::Backup => {
                    if let Err(e) = serve_backup(&shared, &link, stream).await {
                        tracing::info!(%from, "replication link from the active ended: {e}");
                    }
                }
                _ => {
                    // A node that believes it is active connected to us
                    // while we are active: tell it our term so the older
                    // one stands down (fencing), and take nothing from it.
                    tell_term(&shared, stream).await;
                }
            }
        });
    }
}

fn refused(shared: &Shared, from: std::net::SocketAddr, why: &str) {
    tracing::warn!(%from, "replication peer refused: {why}");
    let mut s = shared.ha.lock();
    s.stats.refused += 1;
    s.stats.last_refusal = Some(format!("{from}: {why}"));
}

async fn tell_term(shared: &Shared, mut stream: Box<dyn Stream>) {
    let mut out = Vec::new();
    let term = shared.ha.lock().term;
    portkeep_ha::Message::Hello {
        term,
        active: true,
        applied: 0,
        now: shared.clock.now(),
    }
    .encode(&mut out);
    let _ = stream.write_all(&out).await;
    let _ = stream.flush().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = stream.shutdown().await;
}

async fn serve_backup(
    shared: &Shared,
    link: &LinkSettings,
    mut stream: Box<dyn Stream>,
) -> anyhow::Result<()> {
    let gen = {
        let mut s = shared.ha.lock();
        s.generation += 1;
        let now = shared.clock.now();
        if let Some(b) = s.backup.as_mut() {
            b.connected(now);
        }
        s.generation
    };
    tracing::info!("replication link from the active is up");
    let mut buf = vec![0u8; 64 * 1024];
    let result: anyhow::Result<()> = async {
        loop {
            let out = {
                let mut s = shared.ha.lock();
                if s.generation != gen || s.role != Role::Backup {
                    anyhow::bail!("superseded");
                }
                s.backup.as_mut().and_then(Backup::poll_transmit)
            };
            if let Some(bytes) = out {
                stream.write_all(&bytes).await?;
                stream.flush().await?;
            }
            let n = match tokio::time::timeout(link.timing.dead_after, stream.read(&mut buf)).await
            {
                Ok(r) => r?,
                Err(_) => anyhow::bail!("the active went silent"),
            };
            if n == 0 {
                anyhow::bail!("closed by the active");
            }
            let now = shared.clock.now();
            let mut s = shared.ha.lock();
            if s.generation != gen || s.role != Role::Backup {
                anyhow::bail!("superseded");
            }
            let before = s.term;
            let Some(b) = s.backup.as_mut() else {
                anyhow::bail!("no longer a backup");
            };
            b.handle_input(now, &buf[..n])?;
            let term = b.term();
            if term > before {
                s.term = term;
                if let Err(e) = write_term(&shared.ha.term_path, term) {
                    tracing::error!("cannot persist term {term}: {e}");
                }
            }
        }
    }
    .await;
    let mut s = shared.ha.lock();
    if s.generation == gen {
        let now = shared.clock.now();
        if let Some(b) = s.backup.as_mut() {
            b.disconnected(now);
        }
    }
    result
}

async fn active_loop(shared: Arc<Shared>, link: LinkSettings) {
    let mut first = true;
    loop {
        if shared.ha.role() != Role::Active {
            first = false;
            let seen = shared.ha.role_gen.load(Ordering::SeqCst);
            while shared.ha.role() != Role::Active
                && shared.ha.role_gen.load(Ordering::SeqCst) == seen
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            continue;
        }
        let gen = shared.ha.role_gen.load(Ordering::SeqCst);
        let r = connect_and_stream(&shared, &link, gen, &mut first).await;
        {
            let mut s = shared.ha.lock();
            if let Some(a) = s.active.as_mut() {
                a.disconnected();
            }
        }
        let events = drain_events(&shared);
        handle_events(&shared, events);
        if first {
            // The peer could not be reached: nobody deposed us.
            first = false;
            open_gate(&shared);
        }
        if let Err(e) = r {
            tracing::debug!("replication link to the backup: {e}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn open_gate(shared: &Shared) {
    if shared.ha.role() == Role::Active && !shared.ha.serving.swap(true, Ordering::SeqCst) {
        tracing::info!("serving PCP as active");
    }
}

fn drain_events(shared: &Shared) -> Vec<ActiveEvent> {
    let mut s = shared.ha.lock();
    let Some(a) = s.active.as_mut() else {
        return Vec::new();
    };
    std::iter::from_fn(|| a.poll_event()).collect()
}

/// Writes whatever the link end has to send, sleeping until woken when it
/// has nothing; returns only on a write error.
async fn write_loop(
    shared: &Shared,
    wr: &mut tokio::io::WriteHalf<Box<dyn Stream>>,
) -> anyhow::Result<()> {
    loop {
        let out = {
            let mut s = shared.ha.lock();
            s.active.as_mut().and_then(Active::poll_transmit)
        };
        match out {
            Some(bytes) => {
                wr.write_all(&bytes).await?;
                wr.flush().await?;
            }
            None => shared.ha.wake.notified().await,
        }
    }
}

async fn connect_and_stream(
    shared: &Arc<Shared>,
    link: &LinkSettings,
    gen: u64,
    first: &mut bool,
) -> anyhow::Result<()> {
    let tcp = tokio::time::timeout(link.timing.dead_after, TcpStream::connect(link.peer))
        .await
        .context("connect timed out")??;
    tcp.set_nodelay(true)?;
    let stream: Box<dyn Stream> = match &link.tls {
        None => Box::new(tcp),
        Some(tls) => {
            let connector = tokio_rustls::TlsConnector::from(tls.client.clone());
            let s = tokio::time::timeout(
                Duration::from_secs(5),
                connector.connect(tls.peer_name.clone(), tcp),
            )
            .await
            .context("TLS handshake timed out")?
            .inspect_err(|e| refused(shared, link.peer, &e.to_string()))?;
            Box::new(s)
        }
    };
    {
        let mut s = shared.ha.lock();
        let now = shared.clock.now();
        if let Some(a) = s.active.as_mut() {
            a.connected(now, 0);
        }
    }
    tracing::info!(peer = %link.peer, "replication link to the backup is up");
    let (mut rd, mut wr) = tokio::io::split(stream);
    let writer = write_loop(shared, &mut wr);
    let reader = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = rd.read(&mut buf).await?;
            if n == 0 {
                anyhow::bail!("closed by the backup");
            }
            let now = shared.clock.now();
            {
                let mut s = shared.ha.lock();
                if let Some(a) = s.active.as_mut() {
                    a.handle_input(now, &buf[..n])?;
                }
            }
            let events = drain_events(shared);
            let handshake_done = !events.is_empty();
            handle_events(shared, events);
            if *first && handshake_done {
                *first = false;
                open_gate(shared);
            }
            shared.ha.wake.notify_one();
            if shared.ha.role() != Role::Active {
                anyhow::bail!("no longer active");
            }
        }
    };
    let timer = async {
        loop {
            let next = {
                let s = shared.ha.lock();
                s.active.as_ref().and_then(Active::poll_timeout)
            };
            let now = shared.clock.now();
            let wait = next.map_or(Duration::from_millis(50), |t| {
                if t > now {
                    (t - now).min(Duration::from_millis(50))
                } else {
                    Duration::ZERO
                }
            });
            tokio::time::sleep(wait).await;
            let now = shared.clock.now();
            let dead = {
                let mut s = shared.ha.lock();
                match s.active.as_mut() {
                    Some(a) => {
                        a.handle_timeout(now);
                        a.state() == LinkState::Disconnected
                    }
                    None => true,
                }
            };
            let events = drain_events(shared);
            handle_events(shared, events);
            shared.ha.wake.notify_one();
            if dead {
                anyhow::bail!("the backup went silent");
            }
            if shared.ha.role_gen.load(Ordering::SeqCst) != gen {
                anyhow::bail!("role changed");
            }
        }
    };
    tokio::select! {
        r = writer => r,
        r = reader => r,
        r = timer => r,
    }
}
