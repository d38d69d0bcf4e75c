//! The Prometheus/OpenMetrics endpoint (`[metrics] listen`,
//! `--metrics-listen`): `GET /metrics` over plain HTTP/1.1, one
//! connection at a time, in OpenMetrics text when the scraper's `Accept`
//! asks for it and in Prometheus text 0.0.4 otherwise.
//!
//! Nothing on the serving path counts for it: each scrape reads the
//! counters the core, the node and the pair already keep (the same ones
//! `ctl counters` and `ctl status` show) under their locks, and the
//! exposition is `prometheus-client`'s. Labels are bounded sets (opcodes,
//! result codes, reasons, roles), never a subscriber or an address.
//! `docs/metrics.md` lists every metric; a test holds the two equal.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::node::Shared;

type Labels = Vec<(&'static str, String)>;

/// The metric families, and the counter values last exported (counters
/// only go up: each scrape adds what was counted since).
struct Exporter {
    registry: Registry,
    requests: Family<Labels, Counter>,
    replies: Family<Labels, Counter>,
    dropped: Family<Labels, Counter>,
    natpmp: Counter,
    created: Counter,
    checkpoint: Family<Labels, Counter>,
    mappings: Gauge,
    checkpointed: Gauge,
    role: Family<Labels, Gauge>,
    term: Gauge,
    backup: Family<Labels, Gauge>,
    held: Gauge,
    queued: Gauge,
    by_kind: Family<Labels, Gauge>,
    by_class: Family<Labels, Gauge>,
    subscribers: Gauge,
    ports_held: Gauge,
    lag: Gauge,
    snapshot_items: Gauge,
    resync_received: Gauge,
    takeovers: Counter,
    not_confirmed: Counter,
    resyncs: Counter,
    refused_peers: Counter,
    info: Family<Labels, Gauge>,
    link: Family<Labels, Gauge>,
    dataplane_failures: Counter,
    last: std::collections::HashMap<String, u64>,
}

impl Exporter {
    fn new(shared: &Shared) -> Exporter {
        let mut registry = Registry::default();
        let requests = Family::<Labels, Counter>::default();
        let replies = Family::<Labels, Counter>::default();
        let dropped = Family::<Labels, Counter>::default();
        let checkpoint = Family::<Labels, Counter>::default();
        let role = Family::<Labels, Gauge>::default();
        let backup = Family::<Labels, Gauge>::default();
        let (natpmp, created, takeovers) =
            (Counter::default(), Counter::default(), Counter::default());
        let (mappings, checkpointed, term) = (Gauge::default(), Gauge::default(), Gauge::default());
        let (held, queued) = (Gauge::default(), Gauge::default());
        let by_kind = Family::<Labels, Gauge>::default();
        let by_class = Family::<Labels, Gauge>::default();
        registry.register(
            "portkeep_mappings_by_class",
            "Mappings in the table by the check-point class of their subscriber",
            by_class.clone(),
        );
        let (subscribers, lag, snapshot_items, resync_received) = (
            Gauge::default(),
            Gauge::default(),
            Gauge::default(),
            Gauge::default(),
        );
        registry.register(
            "portkeep_resync_received_mappings",
            "On a backup: mappings of the resynchronisation being received, so far",
            resync_received.clone(),
        );
        registry.register(
            "portkeep_mappings_by_kind",
            "Mappings in the table by kind (MAP, PEER)",
            by_kind.clone(),
        );
        registry.register(
            "portkeep_subscribers",
            "Subscribers holding a mapping or an epoch of their own",
            subscribers.clone(),
        );
        let ports_held = Gauge::default();
        registry.register(
            "portkeep_ports_held",
            "External endpoints freed recently and held back from other clients (RFC 6887 section 15)",
            ports_held.clone(),
        );
        registry.register(
            "portkeep_replication_lag_records",
            "Change-log records the active committed that the backup has not acknowledged",
            lag.clone(),
        );
        registry.register(
            "portkeep_snapshot_items",
            "Items (mappings and epochs) in the last full resynchronisation sent to the backup",
            snapshot_items.clone(),
        );
        let (not_confirmed, resyncs, refused_peers) =
            (Counter::default(), Counter::default(), Counter::default());
        registry.register(
            "portkeep_commit_latency_seconds",
            "From a job's arrival at the committer to its replies' release by the commit",
            shared.commit_seconds.clone(),
        );
        registry.register(
            "portkeep_commit_group_jobs",
            "Jobs (worker batches with replies) released by one commit",
            shared.commit_group.clone(),
        );
        registry.register(
            "portkeep_checkpoints_not_confirmed",
            "Check-points granted but answered without the option: the backup did not acknowledge in time (RFC 7767 section 3.2)",
            not_confirmed.clone(),
        );
        registry.register(
            "portkeep_resyncs",
            "Full resynchronisations of the backup",
            resyncs.clone(),
        );
        let link = Family::<Labels, Gauge>::default();
        let dataplane_failures = Counter::default();
        registry.register(
            "portkeep_link_state",
            "1 for the replication link's state, on an active node of a pair",
            link.clone(),
        );
        registry.register(
            "portkeep_dataplane_apply_seconds",
            "Time the dataplane took for each batch of changes",
            shared.dataplane_seconds.clone(),
        );
        registry.register(
            "portkeep_dataplane_failures",
            "Changes the dataplane did not apply (answered NETWORK_FAILURE, RFC 6887 section 7.4)",
            dataplane_failures.clone(),
        );
        let info = Family::<Labels, Gauge>::default();
        registry.register(
            "portkeep_config_info",
            "1, labelled with the digest of the policy served (equal on the two nodes of a pair when they answer alike)",
            info.clone(),
        );
        registry.register(
            "portkeep_refused_peers",
            "Replication link connections refused (TLS, name, term, handshake limits)",
            refused_peers.clone(),
        );
        registry.register(
            "portkeep_requests",
            "PCP requests received, by opcode (RFC 6887 section 7.1)",
            requests.clone(),
        );
        registry.register(
            "portkeep_replies",
            "PCP and NAT-PMP replies sent, by result code",
            replies.clone(),
        );
        registry.register(
            "portkeep_dropped_datagrams",
            "Datagrams not answered, by reason",
            dropped.clone(),
        );
        registry.register(
            "portkeep_natpmp_requests",
            "NAT-PMP requests answered (RFC 6886)",
            natpmp.clone(),
        );
        registry.register(
            "portkeep_mappings_created",
            "MAP and PEER mappings made anew (not renewals)",
            created.clone(),
        );
        registry.register(
            "portkeep_checkpoint_decisions",
            "CHECKPOINT_REQUIRED decisions (RFC 7767 section 3.2), by class and outcome",
            checkpoint.clone(),
        );
        registry.register(
            "portkeep_mappings",
            "Mappings in the table",
            mappings.clone(),
        );
        registry.register(
            "portkeep_checkpointed_mappings",
            "Check-pointed mappings in the table",
            checkpointed.clone(),
        );
        registry.register(
            "portkeep_ha_role",
            "1 for the node's role in the pair",
            role.clone(),
        );
        registry.register(
            "portkeep_ha_term",
            "The pair's term this node is in",
            term.clone(),
        );
        registry.register(
            "portkeep_backup_state",
            "1 for the state of the backup as the core sees it",
            backup.clone(),
        );
        registry.register(
            "portkeep_held_replies",
            "Replies waiting for the backup's acknowledgement",
            held.clone(),
        );
        registry.register(
            "portkeep_queued_replies",
            "Replies waiting for the store commit",
            queued.clone(),
        );
        registry.register(
            "portkeep_takeovers",
            "Takeovers this node made",
            takeovers.clone(),
        );
        Exporter {
            registry,
            requests,
            replies,
            dropped,
            natpmp,
            created,
            checkpoint,
            mappings,
            checkpointed,
            role,
            term,
            backup,
            held,
            queued,
            by_kind,
            by_class,
            subscribers,
            ports_held,
            lag,
            snapshot_items,
            resync_received,
            takeovers,
            not_confirmed,
            resyncs,
            refused_peers,
            info,
            link,
            dataplane_failures,
            last: Default::default(),
        }
    }

    /// Adds to `c` what `now` counts beyond what was exported under `key`.
    fn advance(&mut self, key: String, c: &Counter, now: u64) {
        let before = self.last.insert(key, now).unwrap_or(0);
        c.inc_by(now.saturating_sub(before));
    }

    /// The current values, in OpenMetrics text when `openmetrics`, else in
    /// the Prometheus text format 0.0.4 (what `promtool check metrics` and
    /// older scrapers read).
    fn scrape(&mut self, shared: &Shared, openmetrics: bool) -> String {
        let (
            stats,
            mappings,
            checkpointed,
            backup,
            digest,
            kinds,
            (subscribers, ports_held),
            classes,
            held_by,
        ) = {
            let core = shared.lock();
            let s = &core.server;
            (
                s.stats().clone(),
                s.mapping_count(),
                s.checkpointed_count(),
                s.backup_state(),
                crate::node::policy_digest(s.config()),
                s.mapping_count_by_kind(),
                (s.subscriber_count(), s.port_hold_count()),
                s.config()
                    .checkpoint
                    .classes
                    .iter()
                    .map(|c| c.name.clone())
                    .collect::<Vec<_>>(),
                s.mapping_count_by_class()
                    .into_iter()
                    .map(|(c, n)| (c.to_owned(), n))
                    .collect::<Vec<_>>(),
            )
        };
        // Only the classes served now: one a reload removed holds nothing.
        self.by_class.clear();
        for (class, n) in held_by {
            self.by_class
                .get_or_create(&vec![("class", class)])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        // One series: the digest of what is served now (a reload changes it).
        self.info.clear();
        self.info.get_or_create(&vec![("digest", digest)]).set(1);
        let (role, term, held, pair_stats, lag, resync_received) = {
            let n = shared.pair.node();
            // Only an active has a backup to lag behind it.
            let lag = n
                .acknowledged()
                .map_or(0, |acked| n.holds().seq.saturating_sub(acked.seq));
            let received = n.backup().and_then(|b| b.staging_count()).unwrap_or(0);
            (
                n.role(),
                n.term(),
                n.held(),
                n.stats().clone(),
                lag,
                received,
            )
        };
        let refused_peers = shared.pair.refused_count();
        let link = shared.pair.link_state();
        for st in [
            "disconnected",
            "handshake",
            "snapshot_requested",
            "resyncing",
            "in_sync",
            "lagging",
            "fenced",
        ] {
            let g = self
                .link
                .get_or_create(&vec![("state", st.to_owned())])
                .clone();
            g.set(i64::from(link == Some(st)));
        }
        let c = self.dataplane_failures.clone();
        self.advance(
            "dataplane_failures".into(),
            &c,
            shared.dataplane_failures.load(Ordering::Relaxed),
        );
        for (op, &n) in stats.by_opcode.iter().enumerate() {
            if n > 0 {
                let name = portkeep_proto::Opcode(op as u8)
                    .name()
                    .map_or_else(|| op.to_string(), str::to_owned);
                let c = self
                    .requests
                    .get_or_create(&vec![("opcode", name.clone())])
                    .clone();
                self.advance(format!("op{op}"), &c, n);
            }
        }
        for (code, &n) in stats.results.iter().enumerate() {
            if n > 0 {
                let name = portkeep_proto::ResultCode(code as u8)
                    .name()
                    .map_or_else(|| code.to_string(), str::to_owned);
                let c = self.replies.get_or_create(&vec![("result", name)]).clone();
                self.advance(format!("rc{code}"), &c, n);
            }
        }
        let silent = stats.dropped.saturating_sub(
            stats.rate_limited
                + stats.not_clients
                + stats.wrong_interface
                + stats.errors_suppressed,
        );
        for (reason, n) in [
            ("rate_limited", stats.rate_limited),
            ("not_client", stats.not_clients),
            ("wrong_interface", stats.wrong_interface),
            ("error_limited", stats.errors_suppressed),
            ("silent", silent),
            ("shed", shared.shed.load(Ordering::Relaxed)),
        ] {
            let c = self
                .dropped
                .get_or_create(&vec![("reason", reason.to_owned())])
                .clone();
            self.advance(format!("drop_{reason}"), &c, n);
        }
        let c = self.natpmp.clone();
        self.advance("natpmp".into(), &c, stats.natpmp);
        let c = self.created.clone();
        self.advance("created".into(), &c, stats.created);
        for (key, c, n) in [
            ("takeovers", self.takeovers.clone(), pair_stats.takeovers),
            (
                "not_confirmed",
                self.not_confirmed.clone(),
                pair_stats.checkpoints_rewritten,
            ),
            ("resyncs", self.resyncs.clone(), pair_stats.resyncs),
            ("refused_peers", self.refused_peers.clone(), refused_peers),
        ] {
            self.advance(key.into(), &c, n);
        }
        // By class: a handful of operator-named classes, never a label per
        // subscriber or address. Every configured class is shown from the
        // start (at 0), and one a reload removed keeps its counts.
        let mut by_class = stats.checkpoint_by_class.clone();
        for c in classes {
            by_class.entry(c.into_boxed_str()).or_default();
        }
        for (class, cp) in &by_class {
            let mut outcomes = vec![
                ("granted".to_owned(), cp.granted),
                ("forced".to_owned(), cp.forced),
            ];
            for r in portkeep_server::RefusalReason::ALL {
                outcomes.push((format!("refused_{}", r.as_str()), cp.refused(r)));
            }
            for (outcome, n) in outcomes {
                let c = self
                    .checkpoint
                    .get_or_create(&vec![
                        ("class", class.to_string()),
                        ("outcome", outcome.clone()),
                    ])
                    .clone();
                self.advance(format!("cp\u{1f}{class}\u{1f}{outcome}"), &c, n);
            }
        }
        self.mappings.set(mappings as i64);
        self.checkpointed.set(i64::from(checkpointed));
        for r in ["standalone", "active", "backup"] {
            let g = self
                .role
                .get_or_create(&vec![("role", r.to_owned())])
                .clone();
            g.set(i64::from(role.as_str() == r));
        }
        self.term.set(i64::try_from(term).unwrap_or(i64::MAX));
        for b in ["standalone", "disconnected", "syncing", "in_sync"] {
            let g = self
                .backup
                .get_or_create(&vec![("state", b.to_owned())])
                .clone();
            g.set(i64::from(backup.as_str().replace(' ', "_") == b));
        }
        self.held.set(held as i64);
        for (kind, n) in [("map", kinds.0), ("peer", kinds.1)] {
            self.by_kind
                .get_or_create(&vec![("kind", kind.to_owned())])
                .set(n as i64);
        }
        self.subscribers.set(subscribers as i64);
        self.ports_held.set(ports_held as i64);
        self.lag.set(i64::try_from(lag).unwrap_or(i64::MAX));
        self.snapshot_items.set(pair_stats.snapshot_items as i64);
        self.resync_received.set(resync_received as i64);
        self.queued
            .set(shared.queued.load(Ordering::Relaxed) as i64);
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = if openmetrics {
            prometheus_client::encoding::text::encode(&mut out, &self.registry)
        } else {
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        };
        out
    }
}

/// Serves `GET /metrics` on `listener` until the daemon stops.
pub(crate) fn serve(shared: Arc<Shared>, listener: TcpListener) {
    let mut exporter = Exporter::new(&shared);
    if let Err(e) = listener.set_nonblocking(true) {
        tracing::error!("metrics endpoint: {e}");
        return;
    }
    while !shared.stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, from)) => {
                if let Err(e) = answer(&shared, &mut exporter, stream) {
                    tracing::debug!(%from, "metrics request failed: {e}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                tracing::warn!("metrics endpoint: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn answer(shared: &Shared, exporter: &mut Exporter, mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    // The request head, at most 8 KiB: only its first line matters.
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head);
    let line = head.lines().next().unwrap_or_default();
    // Content negotiation as Prometheus does it: OpenMetrics when the
    // scraper asks for it, the classic text format otherwise.
    let openmetrics = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("accept:") && l.contains("application/openmetrics-text")
    });
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, kind, body) = match (method, path.split('?').next().unwrap_or("")) {
        ("GET", "/metrics") if openmetrics => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            exporter.scrape(shared, true),
        ),
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            exporter.scrape(shared, false),
        ),
        ("GET", _) => (
            "404 Not Found",
            "text/plain",
            "only /metrics is served\n".to_owned(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_owned(),
        ),
    };
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

/// Binds the metrics listener (at start, so a bad address fails the start).
pub(crate) fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
}
