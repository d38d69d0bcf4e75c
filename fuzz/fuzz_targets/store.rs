//! The store a damaged disk gives back (`portkeepd::store`): a store
//! written through the real code (mappings created, renewed and deleted
//! by a `Server`, some folded into redb's tables, the rest only in the
//! write-ahead log) is damaged by the input (tails cut, zeroed or
//! overwritten, octets flipped, in redb's file or in any log segment) and
//! opened again. Nothing may panic; a store that opens holds only
//! mappings that were written, exactly as written (a damaged record is
//! never loaded); and damage confined to the log past its last frame (a
//! torn write that was never acknowledged) loses nothing.
#![no_main]

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use portkeep_proto::addr::to_wire;
use portkeep_proto::{CodePoints, MapData, OpData, PcpOption, Protocol, Request, RequestHeader};
use portkeep_server::{Change, MappingRecord, Server, ServerConfig, SubscriberKeying, Timestamp};
use portkeepd::store::{Durability, LogOptions, Opened, Store};
use portkeepd::wal::{WalDir, WalFile};

/// redb's file, in memory.
#[derive(Debug, Clone, Default)]
struct Disk(Arc<Mutex<Vec<u8>>>);

impl redb::StorageBackend for Disk {
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.lock().unwrap().len() as u64)
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let d = self.0.lock().unwrap();
        let off = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let src = d
            .get(off..off.saturating_add(out.len()))
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        out.copy_from_slice(src);
        Ok(())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.lock().unwrap().resize(len as usize, 0);
        Ok(())
    }
    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut d = self.0.lock().unwrap();
        let off = offset as usize;
        if d.len() < off + data.len() {
            d.resize(off + data.len(), 0);
        }
        d[off..off + data.len()].copy_from_slice(data);
        Ok(())
    }
}

/// The log's directory, in memory.
#[derive(Debug, Clone, Default)]
struct Dir(Arc<Mutex<BTreeMap<String, Vec<u8>>>>);

struct File {
    dir: Dir,
    name: String,
}

impl WalFile for File {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        let files = self.dir.0.lock().unwrap();
        let img = files.get(&self.name).ok_or(io::ErrorKind::NotFound)?;
        let off = (off as usize).min(img.len());
        let n = buf.len().min(img.len() - off);
        buf[..n].copy_from_slice(&img[off..off + n]);
        Ok(n)
    }
    fn write_all_at(&mut self, buf: &[u8], off: u64) -> io::Result<()> {
        let mut files = self.dir.0.lock().unwrap();
        let img = files.get_mut(&self.name).ok_or(io::ErrorKind::NotFound)?;
        let off = off as usize;
        if img.len() < off + buf.len() {
            img.resize(off + buf.len(), 0);
        }
        img[off..off + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn sync_data(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn size(&self) -> io::Result<u64> {
        let files = self.dir.0.lock().unwrap();
        Ok(files.get(&self.name).ok_or(io::ErrorKind::NotFound)?.len() as u64)
    }
}

impl WalDir for Dir {
    fn list(&self) -> io::Result<Vec<String>> {
        Ok(self.0.lock().unwrap().keys().cloned().collect())
    }
    fn create(&mut self, name: &str, size: u64) -> io::Result<Box<dyn WalFile>> {
        self.0
            .lock()
            .unwrap()
            .insert(name.to_owned(), vec![0; size as usize]);
        self.open(name)
    }
    fn open(&mut self, name: &str) -> io::Result<Box<dyn WalFile>> {
        if !self.0.lock().unwrap().contains_key(name) {
            return Err(io::ErrorKind::NotFound.into());
        }
        Ok(Box::new(File {
            dir: self.clone(),
            name: name.to_owned(),
        }))
    }
    fn remove(&mut self, name: &str) -> io::Result<()> {
        self.0.lock().unwrap().remove(name);
        Ok(())
    }
    fn label(&self) -> PathBuf {
        PathBuf::from("mem.wal")
    }
}

const SEGMENT: u64 = 64 << 10;
const LOG: LogOptions = LogOptions {
    segment_bytes: SEGMENT,
    retention_bytes: SEGMENT,
};
const T0: u64 = 1_700_000_000_000;

fn open(disk: Disk, dir: Dir) -> Result<(Store, Opened), portkeepd::store::StoreError> {
    Store::open_on(
        disk,
        Box::new(dir),
        Path::new("mem.redb"),
        Durability::Durable,
        1 << 20,
        Timestamp(T0 + 10_000_000),
        &SubscriberKeying::default(),
        LOG,
    )
}

/// The undamaged images, every mapping record ever written, the final
/// table, and where each log segment's frames end.
struct Baseline {
    redb: Vec<u8>,
    segments: BTreeMap<String, Vec<u8>>,
    ever: Vec<MappingRecord>,
    last: Vec<MappingRecord>,
    frames_end: BTreeMap<String, usize>,
}

fn map(host: u8, port: u16, life: u32, checkpoint: bool) -> (SocketAddr, Vec<u8>) {
    let ip = IpAddr::from([10, 0, 0, host]);
    let req = Request {
        header: RequestHeader {
            lifetime: life,
            client_ip: to_wire(ip),
        },
        data: OpData::Map(MapData {
            nonce: [host; 12],
            protocol: if port % 2 == 0 {
                Protocol::TCP
            } else {
                Protocol::UDP
            },
            internal_port: port,
            external_port: 0,
            external_ip: std::net::Ipv6Addr::UNSPECIFIED,
        }),
        options: if checkpoint {
            vec![
                PcpOption::CheckpointRequired,
                PcpOption::Description(format!("m{port}")),
            ]
        } else {
            vec![]
        },
    };
    let bytes = req.to_bytes(&CodePoints::default()).expect("encodes");
    (SocketAddr::new(ip, 5000), bytes)
}

/// Where a segment's frames end: each frame is a 16-octet header
/// (magic, generation, payload length, CRC; little-endian) and its
/// payload, padded to 8 octets; zeros follow the last.
fn frames_end(img: &[u8]) -> usize {
    let mut at = 0;
    while at + 16 <= img.len() && img[at..at + 16].iter().any(|&b| b != 0) {
        let len = u32::from_le_bytes(img[at + 8..at + 12].try_into().expect("4 octets")) as usize;
        at += (16 + len).div_ceil(8) * 8;
    }
    at.min(img.len())
}

fn sorted(mut v: Vec<MappingRecord>) -> Vec<MappingRecord> {
    v.sort_by_key(|m| (m.kind, m.key));
    v
}

fn baseline() -> &'static Baseline {
    static B: OnceLock<Baseline> = OnceLock::new();
    B.get_or_init(|| {
        let disk = Disk::default();
        let dir = Dir::default();
        let (mut store, _) = open(disk.clone(), dir.clone()).expect("fresh store");
        let mut now = Timestamp(T0);
        let mut server = Server::new(ServerConfig::default(), now);
        let mut ever = Vec::new();
        let mut out = Vec::new();
        // Rounds of creations, renewals and deletions; the first rounds
        // are folded into the tables, the last stay only in the log, and
        // the log crosses a segment boundary.
        for round in 0..12u16 {
            for i in 0..40u16 {
                let host = (i % 7) as u8 + 1;
                let port = 1000 + (i * 13 + round) % 60;
                let life = if (i + round) % 9 == 0 { 0 } else { 3600 };
                let (src, req) = map(host, port, life, (i + round) % 3 == 0);
                server.handle(now, src, &req, &mut out);
            }
            let changes: Vec<_> = server.drain_changes().collect();
            for c in &changes {
                if let Change::Upserted(m) = &c.change {
                    ever.push(m.clone());
                }
            }
            store.write(&changes, now).expect("write");
            if round < 8 && store.checkpoint_due() || round == 5 {
                store.checkpoint(usize::MAX).expect("checkpoint");
            }
            now = Timestamp(now.0 + 1_000);
        }
        // A crash: the store is not closed (every write was synced).
        drop(store);
        let segments = dir.0.lock().unwrap().clone();
        let frames_end = segments
            .iter()
            .map(|(n, img)| (n.clone(), frames_end(img)))
            .collect();
        let redb = disk.0.lock().unwrap().clone();
        let (_, opened) = open(
            Disk(Arc::new(Mutex::new(redb.clone()))),
            Dir(Arc::new(Mutex::new(segments.clone()))),
        )
        .expect("the undamaged store opens");
        let Opened::Restored(r) = opened else {
            panic!("the undamaged store opened fresh")
        };
        let last = sorted(r.mappings);
        assert_eq!(
            last,
            sorted(server.mappings()),
            "the undamaged store restores the table"
        );
        Baseline {
            redb,
            segments,
            ever,
            last,
            frames_end,
        }
    })
}

#[derive(Arbitrary, Debug)]
enum Kind {
    /// The file ends early.
    Truncate,
    /// Zeros from `at` to the end.
    ZeroTail,
    /// These octets at `at`.
    Overwrite(Vec<u8>),
    /// One octet changed.
    Flip(u8),
}

#[derive(Arbitrary, Debug)]
struct Damage {
    /// 0: redb's file; else a log segment, in name order.
    file: u8,
    /// Where, from the end of the used part of the file backwards when
    /// `from_end` (tails are where crashes damage), else from the start.
    at: u32,
    from_end: bool,
    kind: Kind,
}

const MAGIC: [u8; 4] = 0x504b_574cu32.to_le_bytes();

/// Whether the damage is what a crash during the last write leaves: redb's
/// file and every segment as they were, but for the part of the last
/// segment holding frames past its last frame, where no frame could have
/// been forged (no magic number). A log torn there lost nothing that was
/// acknowledged. Segments roll over whole (a segment is synced before the
/// next is written), so damage past the frames of an earlier segment is
/// not a torn write but a damaged log, which is refused.
fn torn_tail_only(base: &Baseline, redb: &[u8], segments: &BTreeMap<String, Vec<u8>>) -> bool {
    if redb != base.redb.as_slice() {
        return false;
    }
    let last = base
        .frames_end
        .iter()
        .filter(|(_, end)| **end > 0)
        .map(|(n, _)| n)
        .last();
    base.segments.iter().all(|(name, was)| {
        let Some(now) = segments.get(name) else {
            return false;
        };
        if Some(name) != last {
            return now == was;
        }
        let end = base.frames_end[name];
        now.len() >= end && now[..end] == was[..end] && !now[end..].windows(4).any(|w| w == MAGIC)
    })
}

fuzz_target!(|damages: Vec<Damage>| {
    let base = baseline();
    let mut redb = base.redb.clone();
    let mut segments = base.segments.clone();
    let names: Vec<String> = segments.keys().cloned().collect();
    for d in damages.iter().take(4) {
        let (img, used) = if d.file == 0 || names.is_empty() {
            let used = redb.len();
            (&mut redb, used)
        } else {
            let name = &names[usize::from(d.file - 1) % names.len()];
            (
                segments.get_mut(name).expect("listed"),
                base.frames_end[name],
            )
        };
        if img.is_empty() {
            continue;
        }
        let at = if d.from_end {
            used.saturating_sub(d.at as usize % (used + 1))
        } else {
            d.at as usize % img.len()
        };
        let at = at.min(img.len());
        match &d.kind {
            Kind::Truncate => img.truncate(at),
            Kind::ZeroTail => img[at..].fill(0),
            Kind::Overwrite(bytes) => {
                let n = bytes.len().min(img.len() - at).min(4096);
                img[at..at + n].copy_from_slice(&bytes[..n]);
            }
            Kind::Flip(x) => {
                if at < img.len() {
                    img[at] ^= x | 1;
                }
            }
        }
    }
    let only_torn_tail = torn_tail_only(base, &redb, &segments);
    let result = open(
        Disk(Arc::new(Mutex::new(redb))),
        Dir(Arc::new(Mutex::new(segments))),
    );
    match result {
        Ok((_, Opened::Restored(r))) => {
            for m in &r.mappings {
                assert!(
                    base.ever.contains(m),
                    "a mapping never written was loaded: {m:?}"
                );
            }
            if only_torn_tail {
                let got = sorted(r.mappings);
                if got != base.last {
                    let missing = base.last.iter().filter(|m| !got.contains(m)).count();
                    let extra = got.iter().filter(|m| !base.last.contains(m)).count();
                    panic!(
                        "a torn log tail changed the table: {missing} of {} mappings missing, {extra} others; damage {damages:?}",
                        base.last.len()
                    );
                }
            }
        }
        Ok((_, Opened::Fresh { .. })) => {
            assert!(
                !only_torn_tail,
                "a torn log tail made the store start fresh"
            );
        }
        Err(e) => {
            assert!(!only_torn_tail, "a torn log tail was refused: {e}");
        }
    }
});
