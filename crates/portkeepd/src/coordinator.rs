//! `[ha.coordinator]`: etcd as the pair's witness. The right to answer PCP
//! is an etcd lease held through etcd's election; this module only talks
//! to etcd and carries out what [`portkeep_ha::witness::Witness`] decides
//! (until when the node may serve, and what it does once elected).
//!
//! Keys, under the configured prefix (one prefix per pair):
//! - `<prefix>/leader`: the election (etcd's v3election API); each
//!   candidate's key lives on its own lease.
//! - `<prefix>/record`: `{"term":T,"seq":S}`, the term last served and the
//!   position its backup acknowledged, written by the leader only (a
//!   transaction guarded by its election key), at each term change and
//!   every few keepalives, never per commit.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, Identity, LeaderKey,
    LeaseKeepAliveStream, LeaseKeeper, ResignOptions, TlsOptions, Txn, TxnOp,
};
use portkeep_ha::witness::{Record, Verdict, Witness};
use portkeep_ha::{Position, Role};
use serde_json::json;

use crate::ha_config::CoordinatorSettings;
use crate::node::Shared;

/// Runs the coordinator on its own thread until the daemon stops.
pub(crate) fn spawn(
    shared: Arc<Shared>,
    cfg: CoordinatorSettings,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("coordinator".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!("coordinator: cannot start its runtime: {e}");
                    return;
                }
            };
            rt.block_on(run(&shared, &cfg));
            shared.pair.set_fence(None);
        })
}

/// How long a connection attempt or one call may take.
fn call_timeout(cfg: &CoordinatorSettings) -> Duration {
    (cfg.timing.ttl / 6).max(Duration::from_millis(200))
}

/// A connection to one member of the cluster, moved to the next member
/// when this one fails. One member per client, not etcd-client's balanced
/// channel: that one keeps sending calls to a member that is down, and a
/// holder must reach a live member well within its lease.
struct Etcd {
    client: Client,
    index: usize,
}

impl Etcd {
    /// A client of the first member, from `start` on, that accepts one.
    async fn connect(cfg: &CoordinatorSettings, start: usize) -> Result<Etcd, String> {
        let mut last = String::new();
        let n = cfg.endpoints.len();
        for k in 0..n {
            let index = (start + k) % n;
            let endpoint = &cfg.endpoints[index];
            let mut opts = ConnectOptions::new()
                .with_connect_timeout(call_timeout(cfg))
                // No timeout for every call: a campaign waits as long as
                // the peer holds the lease. Each other call has its own.
                .with_keep_alive(Duration::from_secs(1), call_timeout(cfg));
            if let Some(t) = &cfg.tls {
                let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(&t.ca));
                if let Some((cert, key)) = &t.identity {
                    tls = tls.identity(Identity::from_pem(cert, key));
                }
                opts = opts.with_tls(tls);
            }
            match Client::connect([endpoint], Some(opts)).await {
                Ok(client) => return Ok(Etcd { client, index }),
                Err(e) => last = format!("{endpoint}: {e}"),
            }
        }
        Err(format!("cannot connect to any etcd member ({last})"))
    }

    /// Moves to the next member that accepts (stays if none does).
    async fn rotate(&mut self, cfg: &CoordinatorSettings) {
        if let Ok(next) = Etcd::connect(cfg, self.index + 1).await {
            tracing::debug!(endpoint = %cfg.endpoints[next.index], "coordinator: switched etcd member");
            *self = next;
        }
    }
}

async fn run(shared: &Arc<Shared>, cfg: &CoordinatorSettings) {
    let mut witness = Witness::new(cfg.timing);
    while !shared.stop.load(Ordering::Relaxed) {
        let result = match Etcd::connect(cfg, 0).await {
            Ok(etcd) => Session::start(shared, cfg, etcd, &mut witness).await,
            Err(e) => Err(e),
        };
        witness.lost();
        shared.pair.set_fence(witness.serve_until());
        match result {
            Ok(()) => {}
            Err(e) => tracing::warn!("coordinator: {e}; not serving"),
        }
        // A node that yielded, or lost the lease, gives its peer the time
        // to take it before campaigning again.
        tokio::time::sleep(cfg.timing.ttl / 2).await;
    }
}

/// One lease at etcd, from its grant until it is gone.
struct Session<'a> {
    shared: &'a Arc<Shared>,
    cfg: &'a CoordinatorSettings,
    etcd: Etcd,
    witness: &'a mut Witness,
    lease: i64,
    keeper: LeaseKeeper,
    stream: LeaseKeepAliveStream,
    /// When the lease is renewed next.
    renew_at: portkeep_server::Timestamp,
}

impl<'a> Session<'a> {
    async fn start(
        shared: &'a Arc<Shared>,
        cfg: &'a CoordinatorSettings,
        mut etcd: Etcd,
        witness: &'a mut Witness,
    ) -> Result<(), String> {
        let ttl = i64::try_from(cfg.timing.ttl.as_secs()).unwrap_or(60);
        let sent = shared.clock.now();
        let grant = tokio::time::timeout(call_timeout(cfg), etcd.client.lease_grant(ttl, None))
            .await
            .map_err(|_| "lease grant timed out".to_string())?
            .map_err(|e| format!("lease grant failed: {e}"))?;
        witness.confirmed(sent, Duration::from_secs(grant.ttl().max(0) as u64));
        let (keeper, stream) =
            tokio::time::timeout(call_timeout(cfg), etcd.client.lease_keep_alive(grant.id()))
                .await
                .map_err(|_| "lease keepalive timed out".to_string())?
                .map_err(|e| format!("lease keepalive failed: {e}"))?;
        let mut s = Session {
            shared,
            cfg,
            etcd,
            witness,
            lease: grant.id(),
            keeper,
            stream,
            renew_at: shared.clock.now() + cfg.timing.ttl / 4,
        };
        let r = s.hold().await;
        // The fence closes before the lease is given back: etcd hands the
        // lease to the peer the moment the revoke arrives, and this node
        // must not be answering then (the simulator found both serving
        // while a slow revoke was still waiting for its answer).
        s.witness.lost();
        s.shared.pair.set_fence(s.witness.serve_until());
        // Whatever ended it, the lease goes at once rather than at its
        // expiry, so the peer need not wait (best effort: a lease that
        // cannot be revoked expires anyway).
        let _ = tokio::time::timeout(call_timeout(cfg), s.etcd.client.lease_revoke(s.lease)).await;
        r
    }

    fn key(&self, what: &str) -> String {
        format!("{}/{what}", self.cfg.prefix)
    }

    /// Renews the lease; the witness learns what etcd confirmed. A member
    /// that does not answer is left for the next at once.
    async fn keep_alive(&mut self) -> Result<(), String> {
        for _ in 0..self.cfg.endpoints.len().max(2) {
            let sent = self.shared.clock.now();
            let answer = tokio::time::timeout(call_timeout(self.cfg), async {
                self.keeper.keep_alive().await?;
                self.stream.message().await
            })
            .await;
            match answer {
                Ok(Ok(Some(r))) => {
                    self.witness
                        .confirmed(sent, Duration::from_secs(r.ttl().max(0) as u64));
                    if r.ttl() <= 0 {
                        return Err("the lease expired at etcd".into());
                    }
                    return Ok(());
                }
                other => {
                    // The deadline already confirmed still holds.
                    tracing::debug!("coordinator: keepalive not answered: {other:?}");
                    self.etcd.rotate(self.cfg).await;
                    if let Ok(Ok((k, s))) = tokio::time::timeout(
                        call_timeout(self.cfg),
                        self.etcd.client.lease_keep_alive(self.lease),
                    )
                    .await
                    {
                        self.keeper = k;
                        self.stream = s;
                    }
                }
            }
        }
        Ok(())
    }

    /// Until the next renewal is due.
    fn until_renewal(&self) -> Duration {
        let now = self.shared.clock.now().as_millis();
        Duration::from_millis(self.renew_at.as_millis().saturating_sub(now))
    }

    /// Renews the lease (due every quarter of its time to live, across
    /// every call of the session) and moves the fence; fails once the
    /// lease is gone or the daemon stops. Never raced against anything: a
    /// keepalive abandoned halfway would leave its answer to be read as
    /// the answer to a later one, whose later send time would overstate
    /// the lease.
    async fn renew(&mut self) -> Result<(), String> {
        if self.shared.stop.load(Ordering::Relaxed) {
            return Err("stopping".into());
        }
        self.keep_alive().await?;
        self.renew_at = self.shared.clock.now() + self.cfg.timing.ttl / 4;
        if self.witness.serve_until().is_some() {
            self.shared.pair.set_fence(self.witness.serve_until());
        }
        if self.witness.valid_until_passed(self.shared.clock.now()) {
            return Err("the lease ran out (etcd unreachable)".into());
        }
        Ok(())
    }

    /// Awaits `fut` while keeping the lease alive; fails once the lease
    /// is gone.
    async fn alive<T>(&mut self, fut: impl Future<Output = T>) -> Result<T, String> {
        let mut fut = std::pin::pin!(fut);
        loop {
            tokio::select! {
                v = &mut fut => return Ok(v),
                () = tokio::time::sleep(self.until_renewal()) => self.renew().await?,
            }
        }
    }

    async fn read_record(&mut self) -> Result<Option<Record>, String> {
        let key = self.key("record");
        let mut r = tokio::time::timeout(
            call_timeout(self.cfg),
            self.etcd.client.get(key.clone(), None),
        )
        .await;
        if !matches!(r, Ok(Ok(_))) {
            self.etcd.rotate(self.cfg).await;
            r = tokio::time::timeout(call_timeout(self.cfg), self.etcd.client.get(key, None)).await;
        }
        let r = r
            .map_err(|_| "reading the record timed out".to_string())?
            .map_err(|e| format!("reading the record failed: {e}"))?;
        let Some(kv) = r.kvs().first() else {
            return Ok(None);
        };
        let v: serde_json::Value = serde_json::from_slice(kv.value())
            .map_err(|e| format!("{} is not a record: {e}", self.key("record")))?;
        let (Some(term), Some(seq), Some(pterm)) = (
            v["term"].as_u64(),
            v["seq"].as_u64(),
            v["position_term"].as_u64(),
        ) else {
            return Err(format!("{} is not a record: {v}", self.key("record")));
        };
        if term >= portkeep_ha::wire::MAX_TERM || pterm >= portkeep_ha::wire::MAX_TERM {
            // As on the link: no next term would be left to fence with.
            return Err(format!(
                "{} names a term no pair reaches: {v}",
                self.key("record")
            ));
        }
        Ok(Some(Record {
            term,
            position: Position { term: pterm, seq },
        }))
    }

    /// Writes the record, if this node still leads.
    async fn write_record(&mut self, leader: &LeaderKey, record: Record) -> Result<(), String> {
        let value = json!({
            "term": record.term,
            "position_term": record.position.term,
            "seq": record.position.seq,
            "by": self.cfg.name,
        })
        .to_string();
        let txn = Txn::new()
            .when([Compare::create_revision(
                leader.key(),
                CompareOp::Equal,
                leader.rev(),
            )])
            .and_then([TxnOp::put(self.key("record"), value, None)]);
        let mut r =
            tokio::time::timeout(call_timeout(self.cfg), self.etcd.client.txn(txn.clone())).await;
        if !matches!(r, Ok(Ok(_))) {
            self.etcd.rotate(self.cfg).await;
            r = tokio::time::timeout(call_timeout(self.cfg), self.etcd.client.txn(txn)).await;
        }
        let r = r
            .map_err(|_| "writing the record timed out".to_string())?
            .map_err(|e| format!("writing the record failed: {e}"))?;
        if !r.succeeded() {
            return Err("no longer the leader at etcd".into());
        }
        Ok(())
    }

    async fn resign(&mut self, leader: LeaderKey) {
        let opts = ResignOptions::new().with_leader(leader);
        let _ =
            tokio::time::timeout(call_timeout(self.cfg), self.etcd.client.resign(Some(opts))).await;
    }

    /// Campaigns, decides, serves while the lease lasts.
    async fn hold(&mut self) -> Result<(), String> {
        // Campaigning again with the same lease is the same candidacy (the
        // election key is named after the lease): a member lost while
        // waiting costs nothing but the switch to another.
        let won = loop {
            let mut election = self.etcd.client.election_client();
            let name = self.key("leader");
            let value = self.cfg.name.clone();
            let lease = self.lease;
            match self
                .alive(async move { election.campaign(name, value, lease).await })
                .await?
            {
                Ok(won) => break won,
                Err(e) => {
                    tracing::debug!("coordinator: campaign interrupted: {e}");
                    self.etcd.rotate(self.cfg).await;
                    let pause = tokio::time::sleep(Duration::from_millis(100));
                    self.alive(pause).await?;
                }
            }
        };
        let leader = won
            .leader()
            .cloned()
            .ok_or("etcd elected without a leader key")?;
        self.witness.elected();
        let record = self.read_record().await?;
        // Decide, standing down first if another node served since.
        let verdict = loop {
            let (role, term, holds) = {
                let n = self.shared.pair.node();
                (n.role(), n.term(), n.holds())
            };
            let v = self
                .witness
                .decide(self.shared.clock.now(), role, term, holds, record);
            if v == Verdict::StandDown {
                tracing::warn!(
                    term,
                    recorded = record.map_or(0, |r| r.term),
                    "coordinator: elected, but a later term was served since: standing down first"
                );
                let shared = self.shared.clone();
                self.alive(tokio::task::spawn_blocking(move || {
                    crate::node::demote(&shared)
                }))
                .await?
                .map_err(|e| format!("demotion failed: {e}"))?;
                continue;
            }
            break v;
        };
        match verdict {
            Verdict::Yield => {
                tracing::warn!(
                    holds = ?self.shared.pair.node().holds(),
                    record = ?record,
                    "coordinator: elected, but the peer recorded more than this node holds: yielding to it"
                );
                self.resign(leader).await;
                self.witness.lost();
                return Ok(());
            }
            Verdict::Promote { floor } => {
                self.shared.pair.node().observe_term(floor);
                let shared = self.shared.clone();
                let r = self
                    .alive(tokio::task::spawn_blocking(move || {
                        crate::node::promote(&shared)
                    }))
                    .await?
                    .map_err(|e| format!("promotion failed: {e}"))?;
                if r["ok"] != json!(true) {
                    self.resign(leader).await;
                    return Err(format!("elected, but promotion was refused: {r}"));
                }
                tracing::warn!(term = %r["term"], takeover = %r["takeover"], "coordinator: elected and promoted");
            }
            Verdict::Resume | Verdict::StandDown => {
                tracing::warn!(
                    term = self.shared.pair.node().term(),
                    "coordinator: elected; serving"
                );
            }
        }
        self.witness.settled();
        let mut last = self.record_now(&leader, record, true).await?;
        self.shared.pair.set_fence(self.witness.serve_until());
        // Held: renew, record now and then, until the lease is gone or
        // another node's term deposes this one.
        let mut n: u64 = 0;
        loop {
            tokio::time::sleep(self.until_renewal()).await;
            if let Err(e) = self.renew().await {
                if self.shared.stop.load(Ordering::Relaxed) {
                    self.shared.pair.set_fence(None);
                    self.resign(leader).await;
                    return Ok(());
                }
                return Err(e);
            }
            if self.shared.pair.node().role() != Role::Active {
                // Deposed by a higher term over the link: that node
                // serves; this one must not hold the lease it needs.
                self.shared.pair.set_fence(None);
                self.resign(leader).await;
                return Ok(());
            }
            n += 1;
            if n.is_multiple_of(3) {
                last = self.record_now(&leader, last, false).await?;
            }
        }
    }

    async fn record_now(
        &mut self,
        leader: &LeaderKey,
        previous: Option<Record>,
        term_start: bool,
    ) -> Result<Option<Record>, String> {
        // At the start of a term, the position it starts from (a backup
        // that syncs to this node holds at least that); then what the
        // backup acknowledged, which a hot backup always holds, so the
        // record never makes a synced backup look behind.
        let (term, at) = {
            let n = self.shared.pair.node();
            let at = match n.acknowledged() {
                Some(a) if !term_start => a,
                _ => n.holds(),
            };
            (n.term(), at)
        };
        let record = Witness::record(term, at, previous);
        if previous != Some(record) {
            self.write_record(leader, record).await?;
        }
        Ok(Some(record))
    }
}
