//! Durable commit cost of the store: batches of MAP refreshes, as the
//! group committer writes them. `cargo bench -p portkeepd --bench store`.

#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use portkeep_proto::Protocol;
use portkeep_server::{
    Change, ChangeRecord, MappingKey, MappingKind, MappingRecord, SubscriberKeying, Timestamp,
};
use portkeepd::store::{Durability, Recovery, Store};

fn record(i: u32, expires: u64) -> MappingRecord {
    let ip = IpAddr::from([10, (i >> 16) as u8, (i >> 8) as u8, i as u8]);
    MappingRecord {
        kind: MappingKind::Map,
        key: MappingKey {
            internal_ip: ip,
            protocol: Protocol::TCP,
            internal_port: 1000 + (i % 1000) as u16,
        },
        external: SocketAddr::new(
            IpAddr::from([192, 0, 2, (i % 64) as u8]),
            (1024 + i % 60000) as u16,
        ),
        nonce: [i as u8; 12],
        expires: Timestamp(expires),
        lifetime: 3600,
        checkpoint: false,
        filters: vec![],
        description: None,
        subscriber: SubscriberKeying::default().subscriber_of(ip),
        third_party: false,
        followed: false,
        manager: None,
    }
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let keying = SubscriberKeying::default();
    let (mut store, _) = Store::open(
        &path,
        Durability::Durable,
        Recovery::Fail,
        64 << 20,
        Timestamp(0),
        &keying,
    )
    .unwrap();
    let total: u32 = 100_000;
    let mut seq = 0;
    let fill: Vec<ChangeRecord> = (0..total)
        .map(|i| {
            seq += 1;
            ChangeRecord {
                started: false,
                seq,
                change: Change::Upserted(record(i, 1)),
            }
        })
        .collect();
    for chunk in fill.chunks(10_000) {
        store.write(chunk, Timestamp(0)).unwrap();
    }
    while store.checkpoint(65_536).unwrap() > 0 {}
    println!("store with {total} mappings; durable commits of refresh batches:");
    for batch in [1usize, 64, 256, 1024, 4096] {
        let commits = (20_000 / batch).clamp(20, 400);
        let mut lat = Vec::with_capacity(commits);
        let start = Instant::now();
        for c in 0..commits {
            let changes: Vec<ChangeRecord> = (0..batch)
                .map(|k| {
                    seq += 1;
                    let i = ((c * batch + k) as u32 * 7919) % total;
                    ChangeRecord {
                        started: false,
                        seq,
                        change: Change::Upserted(record(i, 2 + c as u64)),
                    }
                })
                .collect();
            let t = Instant::now();
            store.write(&changes, Timestamp(0)).unwrap();
            lat.push(t.elapsed());
        }
        let elapsed = start.elapsed();
        let logged = store.log_len();
        let t = Instant::now();
        while store.checkpoint(65_536).unwrap() > 0 {}
        let cp = t.elapsed();
        lat.sort();
        println!(
            "  batch {batch:>5}: {commits:>4} commits, median {:>7.2} ms per commit, {:>9.0} records/s; then checkpoint of {logged} log entries {:>7.1} ms",
            lat[lat.len() / 2].as_secs_f64() * 1000.0,
            (commits * batch) as f64 / elapsed.as_secs_f64(),
            cp.as_secs_f64() * 1000.0,
        );
    }
}
