//! nftables dataplane figures (docs/performance.md): the time to install
//! many mappings in one batch, and MAP latency under a paced request rate.
//! Both need root and are meant to run inside a scratch network namespace
//! (`ip netns exec NS portkeep-bench ...`).

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hdrhistogram::Histogram;
use portkeep_proto::Protocol;
use portkeep_server::{
    Change, ChangeRecord, Dataplane, MappingKey, MappingKind, MappingRecord, RemoveReason,
    SubscriberKeying, Timestamp,
};
use portkeepd::nft::{NftDataplane, NftSettings};

use crate::{map_request, now};

fn record(i: usize) -> MappingRecord {
    let internal = IpAddr::V4(Ipv4Addr::new(10, (i >> 16) as u8, (i >> 8) as u8, i as u8));
    MappingRecord {
        kind: MappingKind::Map,
        key: MappingKey {
            internal_ip: internal,
            protocol: if i.is_multiple_of(2) {
                Protocol::TCP
            } else {
                Protocol::UDP
            },
            internal_port: 8080,
        },
        external: SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(198, 51, 100, (i / 60000) as u8 + 1)),
            1024 + (i % 60000) as u16,
        ),
        nonce: [0; 12],
        expires: Timestamp(0),
        lifetime: 3600,
        checkpoint: false,
        filters: vec![],
        description: None,
        subscriber: SubscriberKeying::default().subscriber_of(internal),
        third_party: false,
        followed: false,
        manager: None,
    }
}

/// Installs `n` MAP mappings in one batch into table `inet pkbench`, then
/// removes them in one batch; prints both times.
pub(crate) fn install(n: usize, json: bool) -> anyhow::Result<()> {
    let mut dp = NftDataplane::new(NftSettings {
        table: "pkbench".into(),
        conntrack_cleanup: false,
        ..NftSettings::default()
    });
    // Build the (empty) table first, as the daemon's start does.
    dp.apply(&[])?;
    let ups: Vec<ChangeRecord> = (0..n)
        .map(|i| ChangeRecord {
            started: false,
            seq: i as u64 + 1,
            change: Change::Upserted(record(i)),
        })
        .collect();
    let t = now();
    dp.apply(&ups)?;
    let install = t.elapsed();
    let downs: Vec<ChangeRecord> = (0..n)
        .map(|i| ChangeRecord {
            started: false,
            seq: (n + i) as u64 + 1,
            change: Change::Removed {
                mapping: record(i),
                reason: RemoveReason::Expired,
            },
        })
        .collect();
    let t = now();
    dp.apply(&downs)?;
    let remove = t.elapsed();
    dp.flush().map_err(|e| anyhow::anyhow!(e))?;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "mappings": n,
                "install_s": install.as_secs_f64(),
                "remove_s": remove.as_secs_f64(),
            })
        );
    } else {
        println!(
            "nftables: {n} mappings installed in one batch in {:.3} s ({:.0}/s), removed in {:.3} s",
            install.as_secs_f64(),
            n as f64 / install.as_secs_f64(),
            remove.as_secs_f64()
        );
    }
    Ok(())
}

/// Sends `count` MAP creates (client `ip`, one new internal port each from
/// `port_base` up) at `rate` per second, each at its own time, and records
/// every reply's latency.
pub(crate) fn paced(
    server: SocketAddr,
    ip: Ipv4Addr,
    port_base: u16,
    rate: f64,
    count: usize,
    json: bool,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        rate > 0.0 && count > 0 && usize::from(port_base) + count <= 65536,
        "bad --rate/--count/--port-base"
    );
    let sock = UdpSocket::bind(SocketAddr::new(IpAddr::V4(ip), 0))
        .with_context(|| format!("bind {ip}"))?;
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    let rx = sock.try_clone()?;
    let start = now();
    let sent: Arc<Vec<AtomicU64>> = Arc::new((0..count).map(|_| AtomicU64::new(0)).collect());
    let sent2 = sent.clone();
    let receiver = std::thread::spawn(move || {
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).ok();
        let mut got = 0usize;
        let mut errors = 0usize;
        let mut buf = [0u8; 1100];
        let mut idle = 0;
        while got + errors < count && idle < 10 {
            let Ok(n) = rx.recv(&mut buf) else {
                idle += 1;
                continue;
            };
            idle = 0;
            let at = start.elapsed().as_micros() as u64;
            if n < 44 {
                continue;
            }
            if buf[3] != 0 {
                errors += 1;
                continue;
            }
            let port = u16::from_be_bytes([buf[40], buf[41]]) as usize;
            let Some(i) = port.checked_sub(usize::from(port_base)) else {
                continue;
            };
            let Some(s) = sent2.get(i) else { continue };
            let us = at.saturating_sub(s.load(Ordering::SeqCst)).max(1);
            if let Some(h) = h.as_mut() {
                let _ = h.record(us);
            }
            got += 1;
        }
        (h, got, errors)
    });
    for i in 0..count {
        let due = Duration::from_secs_f64(i as f64 / rate);
        while start.elapsed() < due {
            let left = due.saturating_sub(start.elapsed());
            if left > Duration::from_micros(200) {
                std::thread::sleep(left - Duration::from_micros(100));
            } else {
                std::hint::spin_loop();
            }
        }
        let port = port_base + i as u16;
        let req = map_request(ip, 0, port, false);
        let mut req = req;
        req[crate::INTERNAL_PORT_AT..crate::INTERNAL_PORT_AT + 2]
            .copy_from_slice(&port.to_be_bytes());
        sent[i].store(start.elapsed().as_micros() as u64, Ordering::SeqCst);
        let _ = sock.send_to(&req, server);
    }
    let sending = start.elapsed();
    let (h, got, errors) = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))?;
    let h = h.context("histogram")?;
    let q = |p: f64| h.value_at_quantile(p) as f64 / 1000.0;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "rate": rate, "sent": count, "ok": got, "errors": errors,
                "achieved_rate": count as f64 / sending.as_secs_f64(),
                "p50_ms": q(0.5), "p99_ms": q(0.99), "p999_ms": q(0.999), "max_ms": h.max() as f64 / 1000.0,
            })
        );
    } else {
        println!(
            "paced MAP creates: {count} at {rate}/s (achieved {:.0}/s): {got} ok, {errors} errors, {} lost; latency p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms",
            count as f64 / sending.as_secs_f64(),
            count - got - errors,
            q(0.5),
            q(0.99),
            q(0.999),
            h.max() as f64 / 1000.0
        );
    }
    Ok(())
}
