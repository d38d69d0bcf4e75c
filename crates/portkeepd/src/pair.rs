//! The node's place in an active/backup pair, as the daemon holds it: the
//! sans-IO [`portkeep_ha::Node`] behind its lock, the term file, and the
//! flags the threads read. Every decision (when a reply may leave, role
//! changes, fencing, epochs on takeover) is the node's; this module only
//! keeps it and its durable term.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

use anyhow::Context;
use portkeep_ha::{Effect, LinkState, Node, NodeConfig, ReplicaWrite, Role, Term};
use portkeep_server::Timestamp;
use serde_json::{json, Value};

use crate::ha_config::HaSettings;
use crate::mmsg::SendBatch;

/// The replies of one job and the socket they leave from.
pub(crate) type Reply = (usize, SendBatch);

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

/// What the replica writer (`crate::node::replica_writer`) is asked to do.
#[derive(Debug)]
pub(crate) enum ReplicaCmd {
    /// Store `write`; once durable, position `seq` may be acknowledged.
    Write(u64, ReplicaWrite),
    /// Forget the replica (the node stopped being the backup it was).
    Clear,
}

/// The writes to a backup's stored replica, in the order the node handed
/// them out, for the one thread that stores them.
#[derive(Debug, Default)]
pub(crate) struct ReplicaQueue {
    state: Mutex<ReplicaQueueState>,
    /// Work arrived.
    work: Condvar,
    /// A batch is stored (or the writer failed).
    done: Condvar,
}

#[derive(Debug, Default)]
struct ReplicaQueueState {
    cmds: Vec<ReplicaCmd>,
    /// Commands ever pushed (the last one's ticket).
    pushed: u64,
    /// Tickets up to this one are stored.
    done: u64,
    failed: bool,
    /// No more work will come: the writer ends once the queue is empty.
    closed: bool,
    /// The position of the replica stored, if one is (`ctl status`).
    stored_seq: Option<u64>,
}

impl ReplicaQueue {
    fn lock(&self) -> MutexGuard<'_, ReplicaQueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `cmd`; returns its ticket ([`ReplicaQueue::wait`]).
    pub(crate) fn push(&self, cmd: ReplicaCmd) -> u64 {
        let mut g = self.lock();
        g.cmds.push(cmd);
        g.pushed += 1;
        let ticket = g.pushed;
        drop(g);
        self.work.notify_one();
        ticket
    }

    /// Everything queued, with the ticket of the last, waiting up to
    /// `wait` for something to arrive; `None` once the queue is closed
    /// and empty.
    pub(crate) fn take(&self, wait: std::time::Duration) -> Option<(Vec<ReplicaCmd>, u64)> {
        let mut g = self.lock();
        if g.cmds.is_empty() && !g.closed {
            g = self
                .work
                .wait_timeout(g, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        if g.cmds.is_empty() && g.closed {
            return None;
        }
        Some((std::mem::take(&mut g.cmds), g.pushed))
    }

    /// Nothing more will be queued (the committer ended): the writer
    /// stores what is queued, then ends.
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.work.notify_all();
    }

    /// Tickets up to `ticket` are stored; the replica stands at `seq`.
    pub(crate) fn stored(&self, ticket: u64, seq: Option<u64>) {
        let mut g = self.lock();
        g.done = g.done.max(ticket);
        g.stored_seq = seq;
        drop(g);
        self.done.notify_all();
    }

    /// The writer failed: nothing queued will ever be stored.
    pub(crate) fn failed(&self) {
        self.lock().failed = true;
        self.done.notify_all();
    }

    /// Waits until `ticket` is stored; false if the writer failed first.
    pub(crate) fn wait(&self, ticket: u64) -> bool {
        let mut g = self.lock();
        while g.done < ticket && !g.failed {
            g = self.done.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        g.done >= ticket
    }

    /// The position of the replica stored, if one is.
    pub(crate) fn stored_seq(&self) -> Option<u64> {
        self.lock().stored_seq
    }
}

/// Link refusals, for `ctl status`.
#[derive(Debug, Default)]
struct Refusals {
    count: u64,
    last: Option<String>,
}

/// The node's part in the pair.
pub(crate) struct Pair {
    pub(crate) settings: HaSettings,
    node: Mutex<Node<Reply>>,
    /// Mirrors `Node::serving` after every call into the node. It turns
    /// false only with the core lock held too (demotion) or when the node
    /// was deposed (then the node releases nothing anyway), so a worker
    /// that checks it under the core lock never answers for a node that
    /// stopped serving.
    serving: AtomicBool,
    /// With a coordinator: the instant (the daemon's clock, ms) from which
    /// this node must not answer PCP, as the witness's lease allows
    /// (`portkeep_ha::witness`); `u64::MAX` without one. Read on every
    /// batch and again before replies leave, against a clock that keeps
    /// running while the process is frozen, so a node that wakes after
    /// its lease ran out answers nothing it had queued.
    fence: AtomicU64,
    clock: crate::clock::Clock,
    /// Wakes the link's writer.
    pub(crate) wake: tokio::sync::Notify,
    term_path: PathBuf,
    /// Bumped on role changes, for the link thread's loops.
    role_gen: AtomicU64,
    /// Bumped by every accepted connection, so a superseded one ends.
    pub(crate) conn_gen: AtomicU64,
    refusals: Mutex<Refusals>,
    /// With a store: the backup's writes to its stored replica, queued
    /// under the node's lock. `None` in memory mode, where the replica
    /// lives in the node only.
    pub(crate) replica: Option<ReplicaQueue>,
}

impl std::fmt::Debug for Pair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pair")
            .field("serving", &self.serving.load(Ordering::Relaxed))
            .finish()
    }
}

/// A locked node; dropping it mirrors `serving` and hands back nothing:
/// callers drain effects with [`NodeGuard::effects`] and act on them once
/// the lock is gone.
pub(crate) struct NodeGuard<'a> {
    pair: &'a Pair,
    node: MutexGuard<'a, Node<Reply>>,
}

impl std::ops::Deref for NodeGuard<'_> {
    type Target = Node<Reply>;
    fn deref(&self) -> &Node<Reply> {
        &self.node
    }
}

impl std::ops::DerefMut for NodeGuard<'_> {
    fn deref_mut(&mut self) -> &mut Node<Reply> {
        &mut self.node
    }
}

impl NodeGuard<'_> {
    /// Everything the node asked for so far. With a stored replica, the
    /// writes to it go to its queue here, under the node's lock, so they
    /// queue in the order the node made them, and behind the clear of a
    /// node that was deposed (its new, empty backup's writes must never
    /// be wiped by the clear of the old state): whichever thread drains
    /// the effects, a write of one backup never lands on another's.
    pub(crate) fn effects(&mut self) -> Vec<Effect<Reply>> {
        let mut out = Vec::new();
        while let Some(e) = self.node.poll_effect() {
            match (e, &self.pair.replica) {
                (Effect::Persist { seq, write }, Some(q)) => {
                    q.push(ReplicaCmd::Write(seq, write));
                }
                (e @ (Effect::Deposed { .. } | Effect::HandedOver { .. }), Some(q)) => {
                    q.push(ReplicaCmd::Clear);
                    out.push(e);
                }
                (e, _) => out.push(e),
            }
        }
        out
    }

    /// Queues the clear of the stored replica, in order with the writes
    /// (see [`NodeGuard::effects`]); returns its ticket.
    pub(crate) fn clear_replica(&self) -> Option<u64> {
        self.pair
            .replica
            .as_ref()
            .map(|q| q.push(ReplicaCmd::Clear))
    }
}

impl Drop for NodeGuard<'_> {
    fn drop(&mut self) {
        self.pair
            .serving
            .store(self.node.serving(), Ordering::SeqCst);
    }
}

impl Pair {
    pub(crate) fn new(
        settings: HaSettings,
        data_dir: &Path,
        keying: portkeep_server::SubscriberKeying,
        stored_replica: bool,
        clock: crate::clock::Clock,
    ) -> anyhow::Result<Pair> {
        let term_path = data_dir.join("term");
        let term = read_term(&term_path)?;
        let mut cfg = NodeConfig::new(
            settings.role,
            settings.link.as_ref().map(|l| l.timing),
            settings
                .link
                .as_ref()
                .map_or(std::time::Duration::ZERO, |l| l.stale_after),
        );
        cfg.peer_wait = settings
            .link
            .as_ref()
            .map_or(std::time::Duration::ZERO, |l| l.peer_wait);
        let node = Node::new(cfg, term, keying);
        // With a witness, nothing is served before its lease is held.
        let fence = if settings.coordinator.is_some() {
            0
        } else {
            u64::MAX
        };
        Ok(Pair {
            serving: AtomicBool::new(node.serving()),
            fence: AtomicU64::new(fence),
            clock,
            node: Mutex::new(node),
            settings,
            wake: tokio::sync::Notify::new(),
            term_path,
            role_gen: AtomicU64::new(0),
            conn_gen: AtomicU64::new(0),
            refusals: Mutex::new(Refusals::default()),
            replica: stored_replica.then(ReplicaQueue::default),
        })
    }

    /// The node, locked. Lock order: the core first, then the node.
    pub(crate) fn node(&self) -> NodeGuard<'_> {
        NodeGuard {
            pair: self,
            node: self.node.lock().unwrap_or_else(|p| p.into_inner()),
        }
    }

    /// Whether this node answers PCP (see [`Pair::serving`]'s field), and
    /// the witness's lease, if there is one, allows it now.
    pub(crate) fn serving(&self) -> bool {
        self.serving.load(Ordering::SeqCst) && self.lease_allows()
    }

    /// Whether the witness's lease (if any) allows answering PCP now.
    pub(crate) fn lease_allows(&self) -> bool {
        self.clock.now().as_millis() < self.fence.load(Ordering::SeqCst)
    }

    /// Sets the fence (see the field): `None` serves nothing.
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    pub(crate) fn set_fence(&self, until: Option<Timestamp>) {
        self.fence
            .store(until.map_or(0, |t| t.as_millis()), Ordering::SeqCst);
    }

    /// The fence, for `ctl status`: ms of service left (`None`: no
    /// coordinator).
    fn fence_left_ms(&self) -> Option<u64> {
        let f = self.fence.load(Ordering::SeqCst);
        (f != u64::MAX).then(|| f.saturating_sub(self.clock.now().as_millis()))
    }

    /// The role now.
    pub(crate) fn role(&self) -> Role {
        self.node().role()
    }

    /// Persists a term.
    pub(crate) fn persist_term(&self, term: Term) -> std::io::Result<()> {
        write_term(&self.term_path, term)
    }

    /// The role generation (see [`Pair::bump_role`]).
    pub(crate) fn role_gen(&self) -> u64 {
        self.role_gen.load(Ordering::SeqCst)
    }

    /// Tells the link thread the role changed.
    pub(crate) fn bump_role(&self) {
        self.role_gen.fetch_add(1, Ordering::SeqCst);
        self.wake.notify_one();
    }

    /// Records a refused link peer.
    pub(crate) fn refused(&self, from: std::net::SocketAddr, why: &str) {
        tracing::warn!(%from, "replication peer refused: {why}");
        let mut r = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
        r.count += 1;
        r.last = Some(format!("{from}: {why}"));
    }

    /// The replication link's state as the active sees it (`None` on a
    /// backup or a standalone node), named as `ctl status` names it.
    pub(crate) fn link_state(&self) -> Option<&'static str> {
        let n = self.node();
        n.active().map(|a| match a.state() {
            LinkState::Disconnected => "disconnected",
            LinkState::Handshake => "handshake",
            LinkState::NeedSnapshot => "snapshot_requested",
            LinkState::Resyncing { .. } => "resyncing",
            LinkState::InSync => "in_sync",
            LinkState::Lagging => "lagging",
            LinkState::Fenced { .. } => "fenced",
        })
    }

    /// Link connections refused so far.
    pub(crate) fn refused_count(&self) -> u64 {
        self.refusals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .count
    }

    /// Status for `ctl status`.
    pub(crate) fn status(&self, now: Timestamp) -> Value {
        let (count, last) = {
            let r = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
            (r.count, r.last.clone())
        };
        let n = self.node();
        let s = n.stats();
        let link = self.settings.link.as_ref();
        let mut v = json!({
            "role": n.role().as_str(),
            "term": n.term(),
            "serving": n.serving(),
            "link": link.map(|l| json!({
                "listen": l.listen.to_string(),
                "peer": l.peer.to_string(),
                "tls": l.tls.is_some(),
            })),
            "held_responses": n.held(),
            "responses_released_after_ack": s.released,
            "checkpoints_acknowledged": s.checkpoints_acked,
            "checkpoints_not_confirmed": s.checkpoints_rewritten,
            "responses_dropped_deposed": s.dropped_deposed,
            "resyncs": s.resyncs,
            "last_snapshot_items": s.snapshot_items,
            "last_snapshot_ack_ms": s.snapshot_acked_ms,
            "refused_connections": count,
            "last_refusal": last,
            "takeovers": s.takeovers,
            "responses_held": n.held(),
            "responses_released_unconfirmed": s.released_unconfirmed,
            "volatile_extensions_unawaited": s.extensions_unawaited,
        });
        if let Some(left) = self.fence_left_ms() {
            // With a coordinator: how much longer the lease lets it serve.
            v["lease_serve_left_ms"] = json!(left);
            v["coordinator"] = json!(self.settings.coordinator.as_ref().map(|c| c.name.clone()));
        }
        if let Some(a) = n.active() {
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
            // Reconnections caught up from the kept changes, not a snapshot.
            v["resumes"] = json!(a.resumes());
            // How much longer the backup could still be promoted hot.
            v["lease_left_ms"] = json!(a
                .lease_until()
                .map_or(0, |t| t.as_millis().saturating_sub(now.as_millis())));
            if let (LinkState::Resyncing { .. }, Some(t)) = (a.state(), s.snapshot_sent) {
                v["resync_elapsed_ms"] = json!((now - t).as_millis() as u64);
            }
        }
        if let Some(b) = n.backup() {
            v["link_state"] = json!(if b.in_sync() {
                "in sync"
            } else if b.staging_count().is_some() {
                "resyncing"
            } else {
                "not in sync"
            });
            v["in_sync"] = json!(b.in_sync());
            v["applied_seq"] = json!(b.applied());
            // What survives this node's crash (RFC 7767 section 3.2):
            // `null` with no replica stored (or in memory mode).
            v["replica_seq"] = json!(self.replica.as_ref().and_then(ReplicaQueue::stored_seq));
            v["checkpointed_mappings"] = json!(b.mapping_count());
            v["volatile_subscribers"] = json!(b.volatile_count());
            v["clock_offset_ms"] = json!(b.clock_offset_ms());
            // A promotion now is hot only while this runs.
            v["lease_left_ms"] = json!(b
                .lease_until()
                .map_or(0, |t| t.as_millis().saturating_sub(now.as_millis())));
            if let Some(n) = b.staging_count() {
                v["resync_received_mappings"] = json!(n);
            }
        }
        v
    }
}
