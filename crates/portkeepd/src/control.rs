//! The control interface: a Unix socket in the data directory that
//! `portkeepd ctl` (or any script: one JSON object per line) talks to.
//!
//! A request is one line, `{"command": "NAME", ...arguments}`; the reply is
//! one line, `{"ok": true, ...}` or `{"ok": false, "error": "..."}`. The
//! socket lives in the data directory, which is created mode 0700, so only
//! its owner can reach it.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use portkeep_proto::ResultCode;

use portkeep_server::{
    ClearSelector, MappingKey, MappingKind, MappingRecord, Prefix, RefusalReason, Server,
    SubscriberId, Timestamp,
};
use serde_json::{json, Value};

use std::sync::Arc;

use crate::node::Shared;

/// Longest request line accepted; anything longer is refused.
const MAX_REQUEST: u64 = 64 * 1024;

/// Serves control connections until the daemon stops.
pub(crate) fn serve(shared: &Arc<Shared>, listener: &UnixListener) {
    if let Err(e) = listener.set_nonblocking(true) {
        tracing::error!(error = %e, "control socket unusable");
        return;
    }
    while !shared.stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                if let Err(e) = handle_connection(shared, stream) {
                    tracing::debug!(error = %e, "control connection failed");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                tracing::warn!(error = %e, "control accept failed");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

fn handle_connection(shared: &Arc<Shared>, stream: UnixStream) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?.take(MAX_REQUEST));
    let mut writer = stream;
    let mut line = String::new();
    while reader.read_line(&mut line)? > 0 {
        let reply = match serde_json::from_str::<Value>(&line) {
            Ok(req) => dispatch(shared, &req),
            Err(e) => error(format!("request is not JSON: {e}")),
        };
        writer.write_all(reply.to_string().as_bytes())?;
        writer.write_all(b"\n")?;
        line.clear();
    }
    Ok(())
}

fn error(message: impl Into<String>) -> Value {
    json!({ "ok": false, "error": message.into() })
}

/// Runs one command.
pub(crate) fn dispatch(shared: &Arc<Shared>, req: &Value) -> Value {
    let Some(command) = req.get("command").and_then(Value::as_str) else {
        return error("missing \"command\"");
    };
    match command {
        "status" => status(shared),
        "mappings" => mappings(shared),
        "counters" => counters(shared),
        "clear" => clear(shared, req),
        "promote" | "demote" if shared.pair.settings.coordinator.is_some() => json!({
            "ok": false,
            "error": "the etcd coordinator ([ha.coordinator]) decides which node serves: promote and demote are its",
        }),
        "reload" => reload(shared),
        "promote" => crate::node::promote(shared),
        "demote" => crate::node::demote(shared),
        other => error(format!(
            "unknown command `{other}` (known: status, mappings, counters, clear, reload, promote, demote)"
        )),
    }
}

/// `reload`: asks the process to read its configuration again (SIGHUP
/// does the same) and answers how it went, within 10 s.
fn reload(shared: &Shared) -> Value {
    let before = shared
        .last_reload
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .0;
    shared
        .reload_requested
        .store(true, std::sync::atomic::Ordering::SeqCst);
    for _ in 0..100 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let g = shared.last_reload.lock().unwrap_or_else(|p| p.into_inner());
        if g.0 != before {
            return g.1.clone();
        }
    }
    error("the reload was requested but did not finish within 10 s")
}

fn status(shared: &Shared) -> Value {
    let now = shared.clock.now();
    let dataplane = shared.dataplane.lock().map_or("unknown", |d| d.name());
    let ha = shared.pair.status(now);
    let core = shared.lock();
    json!({
        "ok": true,
        "version": env!("CARGO_PKG_VERSION"),
        "role": ha["role"].clone(),
        "term": ha["term"].clone(),
        "ha": ha,
        "uptime_s": shared.clock.uptime_ms() / 1000,
        "epoch": core.server.epoch(now),
        "mappings": core.server.mapping_count(),
        "checkpointed": core.server.checkpointed_count(),
        "backup": core.server.backup_state().as_str(),
        "last_seq": core.server.last_seq(),
        "listen": shared.listen.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "dataplane": dataplane,
        "config_digest": crate::node::policy_digest(core.server.config()),
        "last_reload": shared.last_reload.lock().map(|g| g.1.clone()).unwrap_or_default(),
    })
}

/// One mapping as the control interface shows it.
pub fn mapping_json(m: &MappingRecord, now: Timestamp) -> Value {
    let (kind, remote) = match m.kind {
        MappingKind::Map => ("map", None),
        MappingKind::Peer { remote } => ("peer", Some(remote.to_string())),
    };
    json!({
        "kind": kind,
        "protocol": m.key.protocol.0,
        "protocol_name": m.key.protocol.name(),
        "internal_ip": m.key.internal_ip.to_string(),
        "internal_port": m.key.internal_port,
        "external": m.external.to_string(),
        "remote": remote,
        "nonce": hex::encode(m.nonce),
        "lifetime": m.lifetime,
        "expires_in_s": m.expires.as_millis().saturating_sub(now.as_millis()) / 1000,
        "expires_at_ms": m.expires.as_millis(),
        "checkpoint": m.checkpoint,
        "third_party": m.third_party,
        "subscriber": m.subscriber.to_string(),
        "description": m.description,
        "filters": m.filters.iter().map(|f| json!({"prefix": f.prefix.to_string(), "port": f.port})).collect::<Vec<_>>(),
    })
}

/// `mappings`: every mapping with what the server knows about its
/// subscriber: the operator's name for it (`[[subscribers.named]]`) and its
/// check-point class (RFC 7767 section 4).
fn mappings(shared: &Shared) -> Value {
    let now = shared.clock.now();
    // Copied under the core lock, encoded outside it: a million mappings
    // take a while to serialise, and PCP waits for nobody's listing.
    let (mut list, names) = {
        let core = shared.lock();
        let list = core.server.mappings();
        let mut subs: Vec<SubscriberId> = list.iter().map(|m| m.subscriber).collect();
        subs.sort_unstable();
        subs.dedup();
        let names: std::collections::HashMap<SubscriberId, (Option<String>, Option<String>)> = subs
            .into_iter()
            .map(|s| {
                let name = core
                    .server
                    .config()
                    .subscriber_keying
                    .name_of(s)
                    .map(str::to_owned);
                let class = core.server.checkpoint_class_of(s).map(|c| c.name.clone());
                (s, (name, class))
            })
            .collect();
        (list, names)
    };
    list.sort_by_key(|m| (m.key, m.kind));
    json!({
        "ok": true,
        "mappings": list
            .iter()
            .map(|m| {
                let mut v = mapping_json(m, now);
                let (name, class) = names.get(&m.subscriber).cloned().unwrap_or_default();
                v["subscriber_name"] = json!(name);
                v["class"] = json!(class);
                v
            })
            .collect::<Vec<_>>(),
    })
}

/// RFC 7767 check-point decisions: requests granted, refused by reason
/// (stable names), and mappings an `always` class protected unasked.
fn checkpoint_counters(server: &Server) -> Value {
    let c = server.stats().checkpoint;
    let refused: serde_json::Map<String, Value> = RefusalReason::ALL
        .iter()
        .map(|r| (r.as_str().to_owned(), json!(c.refused(*r))))
        .collect();
    json!({
        "granted": c.granted,
        "refused": refused,
        "refused_total": c.refused_total(),
        "forced": c.forced,
        "checkpointed": server.checkpointed_count(),
    })
}

/// `clear`: removes mappings by operator command and resets the epoch of
/// exactly the subscribers affected, then tells their hosts with an
/// unsolicited ANNOUNCE (failure-scenarios draft section 2.6.2). Takes one
/// of `{"all": true}`, `{"subscriber": "198.51.100.7/32"}` (the subscriber
/// id as `ctl mappings` shows it) or `{"prefix": "198.51.100.0/24"}`.
fn clear(shared: &Shared, req: &Value) -> Value {
    let keying = shared.lock().server.config().subscriber_keying.clone();
    if let Some(m) = req.get("mapping").and_then(Value::as_str) {
        return match parse_mapping(m) {
            Ok(key) => clear_selected(shared, ClearSelector::Mapping(key)),
            Err(e) => error(format!("bad mapping `{m}`: {e}")),
        };
    }
    let which = match (
        req.get("all").and_then(Value::as_bool),
        req.get("subscriber").and_then(Value::as_str),
        req.get("prefix").and_then(Value::as_str),
    ) {
        (Some(true), None, None) => ClearSelector::All,
        (None, Some(s), None) => match s.parse::<Prefix>() {
            // A subscriber is named by its id (its prefix) or by any of its
            // addresses.
            Ok(p) => ClearSelector::Subscriber(keying.subscriber_of(p.addr())),
            // Or by its `[[subscribers.named]]` id.
            Err(e) => match keying.subscriber_named(s) {
                Some(sub) => ClearSelector::Subscriber(sub),
                None => return error(format!("bad subscriber: {e}")),
            },
        },
        (None, None, Some(p)) => match p.parse::<Prefix>() {
            Ok(p) => ClearSelector::Prefix(p),
            Err(e) => return error(format!("bad prefix: {e}")),
        },
        _ => return error(
            "clear takes exactly one of \"all\": true, \"subscriber\", \"prefix\" or \"mapping\"",
        ),
    };
    clear_selected(shared, which)
}

/// `PROTO/IP:PORT` (`tcp/198.51.100.7:8080`, `udp/[2001:db8::7]:53`): a
/// MAP mapping's internal side.
fn parse_mapping(s: &str) -> Result<MappingKey, String> {
    let (proto, endpoint) = s
        .split_once('/')
        .ok_or("expected PROTO/IP:PORT, e.g. tcp/198.51.100.7:8080")?;
    let protocol = match proto.to_ascii_lowercase().as_str() {
        "tcp" => portkeep_proto::Protocol::TCP,
        "udp" => portkeep_proto::Protocol::UDP,
        other => portkeep_proto::Protocol(
            other
                .parse::<u8>()
                .map_err(|_| format!("unknown protocol `{proto}`"))?,
        ),
    };
    let internal: std::net::SocketAddr =
        endpoint.parse().map_err(|e| format!("`{endpoint}`: {e}"))?;
    Ok(MappingKey {
        internal_ip: portkeep_server::prefix::canonical(internal.ip()),
        protocol,
        internal_port: internal.port(),
    })
}

fn clear_selected(shared: &Shared, which: ClearSelector) -> Value {
    let now = shared.clock.now();
    let mut core = shared.lock();
    let cleared = core.server.clear(now, which);
    // Replies made before the clear and not yet sent are restamped, so one
    // granting a mapping the clear took is dropped (lock order: the core,
    // then the node).
    shared.pair.node().cleared(now);
    let removed: usize = cleared.iter().map(|c| c.mappings).sum();
    // The core scheduled ANNOUNCEs to the hosts cleared and the
    // THIRD_PARTY clients that managed them: the first ones go now.
    shared.submit_changes(core);
    shared.send_announcements(shared.lock());
    json!({
        "ok": true,
        "removed": removed,
        "subscribers": cleared.iter().map(|c| json!({
            "subscriber": c.subscriber.to_string(),
            "mappings": c.mappings,
            "announced_to": c.hosts.iter().map(ToString::to_string).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

fn counters(shared: &Shared) -> Value {
    let core = shared.lock();
    let stats = core.server.stats();
    let results: serde_json::Map<String, Value> = stats
        .results
        .iter()
        .enumerate()
        .filter(|(_, &n)| n > 0)
        .map(|(code, &n)| {
            let rc = ResultCode(code as u8);
            let name = rc.name().map_or_else(|| code.to_string(), str::to_owned);
            (name, json!(n))
        })
        .collect();
    json!({
        "ok": true,
        "received": stats.received,
        "dropped": stats.dropped,
        "created": stats.created,
        "rate_limited": stats.rate_limited,
        "errors_suppressed": stats.errors_suppressed,
        "not_clients": stats.not_clients,
        "wrong_interface": stats.wrong_interface,
        // NAT-PMP (RFC 6886) requests answered, errors included.
        "natpmp": stats.natpmp,
        "announcing": core.server.announcing(),
        "results": results,
        "mappings": core.server.mapping_count(),
        // External endpoints freed and held back from other clients (RFC
        // 6887 section 15, `[limits] port_recycle_delay`).
        "ports_held": core.server.port_hold_count(),
        // `[[forward]]` entries installed (RFC 6887 section 1's
        // operator-configured mappings; the rest were reported at start).
        "static_forwards": core.server.static_forward_count(),
        "checkpoint": checkpoint_counters(&core.server),
        "shed": shared.shed.load(Ordering::Relaxed),
        "queued_replies": shared.queued.load(Ordering::Relaxed),
        "commit_latency_us": commit_latency(shared),
    })
}

/// Percentiles, since the daemon started, of the time from a job's
/// arrival at the committer (a worker's batch of replies with the changes
/// they depend on) to its replies' release by the commit: the group
/// commit's latency, store write and dataplane included.
fn commit_latency(shared: &Shared) -> Value {
    let h = shared
        .commit_latency
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    json!({
        "count": h.len(),
        "p50": h.value_at_quantile(0.5),
        "p90": h.value_at_quantile(0.9),
        "p99": h.value_at_quantile(0.99),
        "max": h.max(),
    })
}

/// Sends one request to a running daemon and returns its reply.
pub fn request(socket: &Path, req: &Value) -> anyhow::Result<Value> {
    use anyhow::Context;
    let mut stream = UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot reach portkeepd's control socket {} (is the daemon running with this data directory?)",
            socket.display()
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(req.to_string().as_bytes())?;
    stream.write_all(b"\n")?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    serde_json::from_str(&line).context("daemon sent a reply that is not JSON")
}
