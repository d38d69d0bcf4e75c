//! `agent run --metrics-listen ADDR`: the agent's Prometheus metrics
//! (docs/agent.md, "Metrics"). Each scrape asks the agent's loop for its
//! status, as an API `status` does, and renders it in the Prometheus text
//! format 0.0.4; nothing is kept between scrapes, the counters being the
//! agent's own totals since it started. No label names a mapping, an
//! application or an address (cardinality).

use prometheus_client::encoding::prometheus_text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

use super::daemon::{Caller, Command};
use portkeep::api::ApiRequest;

/// Longest request head read: a scraper's is a few hundred octets.
const MAX_HEAD: usize = 8 * 1024;

type Labels = Vec<(&'static str, &'static str)>;

/// Scrapes served at once; more wait to be accepted. A scraper makes one
/// at a time: the bound keeps idle connections from using up the agent's
/// file descriptors.
const MAX_CONNECTIONS: usize = 8;

/// Serves scrapes until the agent's loop goes away.
pub(crate) async fn serve(listener: TcpListener, agent: mpsc::Sender<Command>) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of descriptors, say: try again later, not in a loop.
                eprintln!("portkeep agent: metrics: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let head =
                tokio::time::timeout(std::time::Duration::from_secs(5), read_head(&mut stream))
                    .await
                    .unwrap_or_default();
            let response = match head.split_whitespace().take(2).collect::<Vec<_>>()[..] {
                ["GET", "/metrics"] => match status(&agent).await {
                    Some(st) => http(
                        "200 OK",
                        "text/plain; version=0.0.4; charset=utf-8",
                        &render(&st),
                    ),
                    None => http("503 Service Unavailable", "text/plain", "agent stopping\n"),
                },
                _ => http("404 Not Found", "text/plain", "GET /metrics\n"),
            };
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

/// The request line and headers, up to the blank line (or what came of
/// them before the peer stopped or the bound was reached).
async fn read_head(stream: &mut tokio::net::TcpStream) -> String {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    while buf.len() < MAX_HEAD
        && !buf.windows(4).any(|w| w == b"\r\n\r\n")
        && !buf.windows(2).any(|w| w == b"\n\n")
    {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

async fn status(agent: &mpsc::Sender<Command>) -> Option<Value> {
    let (tx, rx) = oneshot::channel();
    agent
        .send((ApiRequest::Status, Caller::metrics(), tx))
        .await
        .ok()?;
    rx.await.ok()
}

fn http(status: &str, content_type: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// The metrics of an API `status` answer.
pub(crate) fn render(st: &Value) -> String {
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    let gauge = |v: u64| {
        let g = Gauge::<i64>::default();
        g.set(i64::try_from(v).unwrap_or(i64::MAX));
        g
    };
    let counter = |v: u64| {
        let c = Counter::<u64>::default();
        c.inc_by(v);
        c
    };
    let mut r = Registry::default();
    r.register(
        "portkeep_agent_mappings",
        "Mappings the agent keeps for applications",
        gauge(n(&st["mappings"])),
    );
    r.register(
        "portkeep_agent_granted_mappings",
        "Mappings the server currently grants",
        gauge(n(&st["granted"])),
    );
    r.register(
        "portkeep_agent_orphans_pending",
        "Mappings found on the server after a lost store that no application has claimed yet",
        gauge(n(&st["orphans_pending"])),
    );
    let recreated = Family::<Labels, Counter>::default();
    for cause in [
        "epoch",
        "announce",
        "server_changed",
        "client_address_changed",
        "third_party_host_changed",
    ] {
        recreated
            .get_or_create(&vec![("cause", cause)])
            .inc_by(n(&st["recreated"][cause]));
    }
    r.register(
        "portkeep_agent_recreated",
        "Mappings put up for re-creation, by what showed the server lost them or moved",
        recreated,
    );
    let c = &st["counters"];
    r.register(
        "portkeep_agent_epoch_failures",
        "Server epochs that failed the client's check (RFC 6887 section 8.5)",
        counter(n(&c["epoch_failures"])),
    );
    let transactions = Family::<Labels, Counter>::default();
    for (kind, key) in [
        ("create", "creates"),
        ("recreate", "recreates"),
        ("renew", "renewals"),
        ("delete", "deletes"),
    ] {
        transactions
            .get_or_create(&vec![("kind", kind)])
            .inc_by(n(&c[key]));
    }
    r.register(
        "portkeep_agent_transactions",
        "Request transactions started, by kind",
        transactions,
    );
    r.register(
        "portkeep_agent_datagrams_sent",
        "PCP datagrams sent to the server, retransmissions included",
        counter(n(&c["datagrams_sent"])),
    );
    r.register(
        "portkeep_agent_responses",
        "Responses matched to a mapping",
        counter(n(&c["responses"])),
    );
    r.register(
        "portkeep_agent_ignored_datagrams",
        "Datagrams that matched no request",
        counter(n(&c["ignored"])),
    );
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = encode(&mut out, &r);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_renders_every_family_with_its_values() {
        let st = serde_json::json!({
            "mappings": 3, "granted": 2, "orphans_pending": 0,
            "recreated": {"announce": 2},
            "counters": {"epoch_failures": 1, "creates": 3, "recreates": 2,
                         "renewals": 7, "deletes": 0, "datagrams_sent": 12,
                         "responses": 12, "ignored": 0},
        });
        let text = render(&st);
        for line in [
            "portkeep_agent_mappings 3",
            "portkeep_agent_granted_mappings 2",
            "portkeep_agent_recreated_total{cause=\"announce\"} 2",
            "portkeep_agent_recreated_total{cause=\"epoch\"} 0",
            "portkeep_agent_epoch_failures_total 1",
            "portkeep_agent_transactions_total{kind=\"renew\"} 7",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
        }
    }
}
