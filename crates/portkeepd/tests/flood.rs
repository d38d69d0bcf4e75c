//! Serving under a flood (RFC 6887 sections 8.2 and 17.2: a server stays
//! available to its subscribers while others send garbage or try to
//! exhaust it). A real `portkeepd` on loopback, with the embedded durable
//! store, gets a flood of random and valid-but-hostile datagrams
//! (`portkeep_test_support::flood`: quota-exhausting MAPs from 256
//! sources, NEXT walks, oversized requests, THIRD_PARTY from sources not
//! allowed it) as fast as one thread sends them, while a well-behaved
//! client creates 8 mappings and renews them every second.
//!
//! Asserted: every request of the well-behaved client is answered with
//! SUCCESS within its retransmission schedule (RFC 6887 section 8.1.1:
//! 3 s, then 6 s, then 12 s; bounded here at four transmissions in 30 s);
//! the server's peak resident set stays under [`RSS_BOUND_KIB`]; every
//! flood source holds at most its quota, some hold all of it, and the
//! server said USER_EX_QUOTA; and the server still answers afterwards.
//!
//! One test in its own binary, so that it runs alone: `cargo test` (how
//! `scripts/test-all.sh` runs the suite) runs test binaries one at a
//! time, and nothing timing-sensitive shares the machine with the flood.

#![allow(clippy::unwrap_used, clippy::panic, clippy::disallowed_methods)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use portkeep_client::{Client, ClientConfig, RequestBuilder, RequestOptions};
use portkeep_proto::{Protocol, ResultCode};
use portkeep_test_support::daemon::Daemon;
use portkeep_test_support::flood::{flood, rss_kib, FloodConfig, KINDS};
use portkeep_test_support::process::{now, Bins};

static BINS: LazyLock<Bins> = LazyLock::new(|| Bins::from_daemon(env!("CARGO_BIN_EXE_portkeepd")));

/// How long the flood lasts.
const FLOOD: Duration = Duration::from_secs(15);

/// Flood sources (each a subscriber) and each one's quota.
const SOURCES: u16 = 256;
const QUOTA: u32 = 64;

/// The bound on the server's peak resident set: its table at most
/// `SOURCES * QUOTA` + 8 mappings (16,392; about 430 octets each with
/// their indices and the store's share, 7 MiB), its reply queue at most
/// `max_queued_replies` (4,096 here) replies of at most 1,100 octets
/// (5 MiB), redb's cache (its
/// default 64 MiB is not reached by so small a store), the runtime and
/// the binary: measured 36 MiB at the peak. The bound leaves room for the
/// allocator; it would not catch a slow leak, only a table or queue
/// growing with the flood.
const RSS_BOUND_KIB: u64 = 64 * 1024;

#[test]
fn rfc6887_s17_2_a_flood_leaves_a_well_behaved_client_served_within_bounded_memory() {
    let d = Daemon::with_config(
        &BINS,
        &format!(
            "external_addresses = [\"192.0.2.1\"]\nport_range = \"1024-65535\"\nworkers = 2\n\
             [subscribers]\nmax_mappings = {QUOTA}\n\
             [limits]\nmax_queued_replies = 4096\nerror_rate = \"1000/s\"\n"
        ),
    );
    let server = d.addr();
    let pid = d.pid();
    let (rss_before, _) = rss_kib(pid).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let flooder = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            flood(
                &FloodConfig {
                    server,
                    first_source: 0,
                    sources: SOURCES,
                    rate: None,
                },
                &stop,
            )
        })
    };

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let replies = rt.block_on(well_behaved(server));
    stop.store(true, Ordering::Relaxed);
    let sent = flooder.join().unwrap();
    let (rss_after, peak) = rss_kib(pid).unwrap();

    let transmissions: Vec<u32> = replies.iter().map(|r| r.2).collect();
    let slowest = replies.iter().map(|r| r.3).max().unwrap();
    eprintln!(
        "flood: {} datagrams in {FLOOD:?} ({}), {} send errors; client: {} requests, transmissions {:?}, slowest {slowest:?}; server RSS {rss_before} KiB before, {rss_after} after, peak {peak}",
        sent.total(),
        KINDS
            .iter()
            .zip(sent.sent)
            .map(|(k, n)| format!("{k} {n}"))
            .collect::<Vec<_>>()
            .join(", "),
        sent.send_errors,
        replies.len(),
        histogram(&transmissions),
    );
    for (what, result, n, _) in &replies {
        assert_eq!(
            *result,
            Ok(ResultCode::SUCCESS),
            "{what}: not answered with SUCCESS within {n} transmissions"
        );
    }
    assert!(
        sent.total() > 100_000,
        "the flood was too weak to show anything: {} datagrams",
        sent.total()
    );
    assert!(
        peak < RSS_BOUND_KIB,
        "peak RSS {peak} KiB, bound {RSS_BOUND_KIB} KiB"
    );
    let counters = d.ctl(&["--json", "counters"]).json();
    eprintln!("server counters: {counters}");
    // RFC 6887 section 17.2: one subscriber holds at most its quota, and
    // the flood did reach it.
    let list = d.ctl(&["--json", "mappings"]).json();
    let mut per_sub: std::collections::HashMap<String, u32> = Default::default();
    for m in list["mappings"].as_array().unwrap() {
        *per_sub
            .entry(m["subscriber"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    let most = per_sub.values().copied().max().unwrap_or(0);
    assert!(
        most <= QUOTA,
        "a subscriber holds {most} mappings, quota {QUOTA}"
    );
    assert_eq!(
        most, QUOTA,
        "no flood source reached its quota: the flood tested nothing"
    );
    assert!(
        counters["results"]["USER_EX_QUOTA"].as_u64().unwrap_or(0) > 0,
        "no USER_EX_QUOTA was sent: {counters}"
    );
    // Still serving once the flood is over.
    let after = rt.block_on(async {
        let c = Client::connect(server).await.unwrap();
        c.send(&RequestBuilder::announce(), bounded()).await
    });
    assert_eq!(after.unwrap().result(), ResultCode::SUCCESS);
}

fn bounded() -> RequestOptions {
    RequestOptions {
        max_duration: Some(Duration::from_secs(30)),
        max_transmissions: Some(4),
    }
}

/// Creates 8 mappings from 127.0.0.1, then renews them every second
/// while the flood lasts: (request, result, transmissions, time to answer)
/// of each.
async fn well_behaved(
    server: SocketAddr,
) -> Vec<(String, Result<ResultCode, String>, u32, Duration)> {
    let client = Client::connect_from(
        server,
        "127.0.0.1:0".parse().unwrap(),
        ClientConfig::default(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    let start = now();
    let builders: Vec<RequestBuilder> = (0..8u16)
        .map(|i| RequestBuilder::map(Protocol::TCP, 8000 + i).lifetime(120))
        .collect();
    let mut round = 0;
    while start.elapsed() < FLOOD {
        for b in &builders {
            let what = format!("round {round} MAP {}", b.internal_port_value());
            match client.send(b, bounded()).await {
                Ok(r) => out.push((what, Ok(r.result()), r.transmissions, r.elapsed)),
                Err(e) => out.push((what, Err(e.to_string()), 4, Duration::MAX)),
            }
        }
        round += 1;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    out
}

fn histogram(v: &[u32]) -> Vec<(u32, usize)> {
    let mut h: Vec<(u32, usize)> = Vec::new();
    for &x in v {
        match h.iter_mut().find(|(k, _)| *k == x) {
            Some(e) => e.1 += 1,
            None => h.push((x, 1)),
        }
    }
    h.sort_unstable();
    h
}
