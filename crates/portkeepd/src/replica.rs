//! A backup's replica in stable storage, on redb, in its own file beside
//! the store (`replica.redb`).
//!
//! RFC 7767 section 3.2: a backup acknowledges a check-point only once it
//! is stored, so that it survives the backup's crash too; the node
//! (`portkeep_ha::Backup`) says what to store with every position it will
//! acknowledge ([`ReplicaWrite`]), and this module only stores it and
//! reads it back. The stream's writes go to a write-ahead log beside the
//! file (`replica.wal/`, [`crate::wal`]): one `fdatasync` for everything
//! queued (group commit), folded into the tables while the writer is idle;
//! a snapshot (a replacement) goes to the tables directly, durably, and
//! starts a new generation of the log. A restart reads the tables, then
//! the log past them.
//!
//! Tables: the mappings (key as [`key_of`] -> [`encode_mapping`]), the
//! subscribers' epoch anchors, the subscribers' hosts with volatile state,
//! and one meta row (format, position, clock offset, server-wide anchor).
//! Anchors and hosts have their own rows rather than living in the meta
//! row, so a write costs what it changes, not the number of subscribers.
//! The replica exists once the meta row does. A file or a record that
//! does not read back is refused as a whole ([`ReplicaError::Damaged`]),
//! never half-loaded.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use portkeep_ha::{Item, Replica, ReplicaWrite};
use portkeep_proto::addr::to_wire;
use portkeep_server::record::{
    decode_mapping, decode_requester, decode_subscriber, encode_mapping, encode_requester,
    encode_subscriber, key_of, Reader,
};
use portkeep_server::{SubscriberId, SubscriberKeying, Timestamp};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::wal::{FsDir, Wal, WalDir, WalError};

const MAPPINGS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("replica_mappings");
const ANCHORS: TableDefinition<&[u8], u64> = TableDefinition::new("replica_anchors");
/// Hosts with volatile state, per subscriber: the hosts (16 octets each),
/// then when that state ends (8 octets). Rows written before the end was
/// recorded have the hosts only: read as state that never ends.
const VOLATILE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("replica_volatile");
/// Hosts owed an ANNOUNCE, per subscriber: until when (8 octets), then the
/// hosts. Files written before it existed lack the table: read as empty.
const OWED: TableDefinition<&[u8], &[u8]> = TableDefinition::new("replica_announce_owed");
/// THIRD_PARTY requesters, by address (16 octets), as
/// `record::encode_requester` writes them. Files written before it existed
/// lack the table: read as empty.
const REQUESTERS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("replica_requesters");
/// Held external endpoints, by `record::hold_key`, as
/// `record::encode_hold` writes them. Files written before it existed lack
/// the table: read as empty.
const HOLDS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("replica_port_holds");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("replica_meta");
const META_KEY: &str = "replica";
/// The write-ahead log's generation (4 octets, big-endian).
const GENERATION_KEY: &str = "log_generation";

/// Log options of the replica: it is small next to the store, and nothing
/// reads its log by position.
const LOG: crate::store::LogOptions = crate::store::LogOptions {
    segment_bytes: 8 << 20,
    retention_bytes: 0,
};

/// Writes logged before the tables take them even while busy.
const FOLD_BOUND: usize = 65_536;
/// Writes folded per step while idle.
pub const FOLD_IDLE: usize = 4_096;

/// Name of the replica file, beside the store in the data directory.
pub const FILE: &str = "replica.redb";

/// Version of the meta row's format; bumped on any incompatible change.
/// Format 2 added the term of the replicated state; a format 1 row reads
/// as term 0 (not known).
const FORMAT: u8 = 2;

/// Page cache of the replica file: it is written far more than read.
const CACHE_BYTES: usize = 16 << 20;

/// Why the replica cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// The file exists but does not read back as a replica.
    #[error("backup replica {path} is damaged ({detail}); refusing to load part of it")]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// Reading or writing failed.
    #[error("backup replica {path}: {detail}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        detail: String,
    },
}

fn io(path: &Path, e: impl std::fmt::Display) -> ReplicaError {
    ReplicaError::Io {
        path: path.to_owned(),
        detail: e.to_string(),
    }
}

fn damaged(path: &Path, e: impl std::fmt::Display) -> ReplicaError {
    ReplicaError::Damaged {
        path: path.to_owned(),
        detail: e.to_string(),
    }
}

fn wal_error(path: &Path, e: WalError) -> ReplicaError {
    match e {
        WalError::Damaged(d) => damaged(path, format!("its log: {d}")),
        WalError::Io(e) => io(path, e),
    }
}

/// Where the write-ahead log of the replica at `path` lives.
pub fn log_dir_of(path: &Path) -> PathBuf {
    path.with_extension("wal")
}

/// A logged write: its position, the clock offset, its items.
fn encode_apply(offset_ms: i64, items: &[Item]) -> Vec<u8> {
    let mut v = Vec::with_capacity(64);
    v.extend_from_slice(&offset_ms.to_be_bytes());
    portkeep_ha::wire::encode_items(items, &mut v);
    v
}

fn decode_apply(b: &[u8], keying: &SubscriberKeying) -> Option<(i64, Vec<Item>)> {
    let off = i64::from_be_bytes(b.get(..8)?.try_into().ok()?);
    Some((off, portkeep_ha::wire::decode_items(&b[8..], keying)?))
}

/// The meta row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Meta {
    term: u64,
    seq: u64,
    offset_ms: i64,
    server_anchor: Option<Timestamp>,
}

impl Meta {
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(26);
        v.push(FORMAT);
        v.extend_from_slice(&self.seq.to_be_bytes());
        v.extend_from_slice(&self.offset_ms.to_be_bytes());
        match self.server_anchor {
            Some(a) => {
                v.push(1);
                v.extend_from_slice(&a.as_millis().to_be_bytes());
            }
            None => v.push(0),
        }
        v.extend_from_slice(&self.term.to_be_bytes());
        v
    }

    fn decode(b: &[u8]) -> Result<Meta, String> {
        let mut r = Reader(b);
        let format = r.u8().ok_or("the meta row is empty")?;
        if format != FORMAT && format != 1 {
            return Err(format!(
                "format {format}, this portkeepd reads formats 1 and {FORMAT}"
            ));
        }
        let short = "the meta row is cut short";
        let seq = r.u64().ok_or(short)?;
        let offset_ms = r.u64().ok_or(short)? as i64;
        let server_anchor = match r.u8().ok_or(short)? {
            0 => None,
            1 => Some(Timestamp(r.u64().ok_or(short)?)),
            x => return Err(format!("the meta row has a bad anchor flag {x}")),
        };
        let term = if format == 1 {
            0
        } else {
            r.u64().ok_or(short)?
        };
        if !r.0.is_empty() {
            return Err("the meta row has trailing bytes".into());
        }
        Ok(Meta {
            term,
            seq,
            offset_ms,
            server_anchor,
        })
    }
}

fn encode_hosts(hosts: &[IpAddr]) -> Vec<u8> {
    hosts.iter().flat_map(|h| to_wire(*h).octets()).collect()
}

fn encode_volatile(hosts: &[IpAddr], until: Timestamp) -> Vec<u8> {
    let mut v = encode_hosts(hosts);
    v.extend_from_slice(&until.as_millis().to_be_bytes());
    v
}

/// Reads what [`encode_volatile`] wrote, or a row of hosts alone.
fn decode_volatile(b: &[u8]) -> Option<(Vec<IpAddr>, Timestamp)> {
    if b.len() % 16 == 8 {
        let (hosts, until) = b.split_at(b.len() - 8);
        let until = u64::from_be_bytes(until.try_into().ok()?);
        Some((decode_hosts(hosts)?, Timestamp(until)))
    } else {
        Some((decode_hosts(b)?, Timestamp(u64::MAX)))
    }
}

fn decode_hosts(b: &[u8]) -> Option<Vec<IpAddr>> {
    if b.is_empty() || !b.len().is_multiple_of(16) {
        return None;
    }
    let mut r = Reader(b);
    let mut hosts = Vec::with_capacity(b.len() / 16);
    while !r.0.is_empty() {
        hosts.push(r.ip()?);
    }
    Some(hosts)
}

/// The backup's replica file, open.
pub struct ReplicaStore {
    db: Database,
    path: PathBuf,
    /// The replica's meta row as of everything logged; `None`: no replica
    /// stored.
    meta: Option<Meta>,
    wal: Wal,
    /// Logged writes not yet in the tables, in order.
    pending: std::collections::VecDeque<ReplicaWrite>,
}

impl std::fmt::Debug for ReplicaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaStore")
            .field("path", &self.path)
            .field("seq", &self.seq())
            .finish()
    }
}

impl ReplicaStore {
    fn builder() -> redb::Builder {
        let mut b = Database::builder();
        b.set_cache_size(CACHE_BYTES);
        // As for the store: a flipped bit must be refused, not read as a
        // replica with mappings missing.
        b.set_check_integrity_on_open(true);
        b
    }

    /// Opens (or creates) the replica at `path`, with what it holds
    /// (`None`: no replica stored). `keying` rebuilds each mapping's
    /// subscriber under the configuration in force now. A file that does
    /// not read back whole is [`ReplicaError::Damaged`]: the caller moves
    /// it aside ([`move_aside`]) or stops.
    pub fn open(
        path: &Path,
        keying: &SubscriberKeying,
    ) -> Result<(ReplicaStore, Option<Replica>), ReplicaError> {
        let log_dir = log_dir_of(path);
        let dir = || -> Result<Box<dyn WalDir>, ReplicaError> {
            Ok(Box::new(
                FsDir::open(&log_dir).map_err(|e| io(&log_dir, e))?,
            ))
        };
        if !path.exists() {
            let db = Self::builder().create(path).map_err(|e| io(path, e))?;
            return Self::init(db, path, dir()?).map(|s| (s, None));
        }
        Self::guarded(path, || {
            let db = Self::builder().open(path).map_err(|e| damaged(path, e))?;
            Self::load(db, path, dir()?, keying)
        })
    }

    /// [`ReplicaStore::open`] on `backend` instead of a file (the tests'
    /// faulty disk); `label` names it in errors.
    pub fn open_on(
        backend: impl redb::StorageBackend,
        log: Box<dyn WalDir>,
        label: &Path,
        keying: &SubscriberKeying,
    ) -> Result<(ReplicaStore, Option<Replica>), ReplicaError> {
        if backend.len().map_err(|e| io(label, e))? == 0 {
            let db = Self::builder()
                .create_with_backend(backend)
                .map_err(|e| io(label, e))?;
            return Self::init(db, label, log).map(|s| (s, None));
        }
        Self::guarded(label, || {
            let db = Self::builder()
                .create_with_backend(backend)
                .map_err(|e| damaged(label, e))?;
            Self::load(db, label, log, keying)
        })
    }

    fn guarded(
        path: &Path,
        open: impl FnOnce() -> Result<(ReplicaStore, Option<Replica>), ReplicaError>,
    ) -> Result<(ReplicaStore, Option<Replica>), ReplicaError> {
        crate::store::contain_engine_panic(open).unwrap_or_else(|what| {
            Err(damaged(
                path,
                format!("the storage engine failed reading it: {what}"),
            ))
        })
    }

    /// Makes the tables of a new file, durably: a later open then tells a
    /// file with no replica from a damaged one.
    fn init(
        db: Database,
        path: &Path,
        mut log: Box<dyn WalDir>,
    ) -> Result<ReplicaStore, ReplicaError> {
        let txn = db.begin_write().map_err(|e| io(path, e))?;
        for t in [MAPPINGS, VOLATILE, OWED, REQUESTERS] {
            txn.open_table(t).map_err(|e| io(path, e))?;
        }
        txn.open_table(ANCHORS).map_err(|e| io(path, e))?;
        txn.open_table(META)
            .map_err(|e| io(path, e))?
            .insert(GENERATION_KEY, 0u32.to_be_bytes().as_slice())
            .map_err(|e| io(path, e))?;
        txn.commit().map_err(|e| io(path, e))?;
        // A new file starts with no log, whatever an earlier one left.
        crate::wal::wipe(log.as_mut()).map_err(|e| io(path, e))?;
        let (wal, _) = Wal::open(log, 0, LOG.segment_bytes, LOG.retention_bytes)
            .map_err(|e| wal_error(path, e))?;
        Ok(ReplicaStore {
            db,
            path: path.to_owned(),
            meta: None,
            wal,
            pending: Default::default(),
        })
    }

    fn load(
        db: Database,
        path: &Path,
        log: Box<dyn WalDir>,
        keying: &SubscriberKeying,
    ) -> Result<(ReplicaStore, Option<Replica>), ReplicaError> {
        let (mut store, stored) = Self::load_tables(db, path, log, keying)?;
        // The log past the tables, in order.
        let records = std::mem::take(&mut store.pending);
        let mut replica = stored;
        let base = store.meta.map_or(0, |m| m.seq);
        for w in records {
            let ReplicaWrite::Apply { seq, .. } = &w else {
                continue;
            };
            if *seq <= base {
                continue;
            }
            replica
                .get_or_insert_with(Replica::default)
                .apply(w.clone());
            store.pending.push_back(w);
        }
        if let Some(r) = &replica {
            store.meta = Some(Meta {
                term: r.term,
                seq: r.seq,
                offset_ms: r.offset_ms,
                server_anchor: r.server_anchor,
            });
        }
        Ok((store, replica))
    }

    fn load_tables(
        db: Database,
        path: &Path,
        log: Box<dyn WalDir>,
        keying: &SubscriberKeying,
    ) -> Result<(ReplicaStore, Option<Replica>), ReplicaError> {
        let d = |e: &dyn std::fmt::Display| damaged(path, e);
        let txn = db.begin_read().map_err(|e| d(&e))?;
        let meta_t = txn.open_table(META).map_err(|e| d(&e))?;
        let meta = match meta_t.get(META_KEY).map_err(|e| d(&e))? {
            Some(v) => Some(Meta::decode(v.value()).map_err(|e| d(&e))?),
            None => None,
        };
        let generation = match meta_t.get(GENERATION_KEY).map_err(|e| d(&e))? {
            Some(v) => u32::from_be_bytes(
                v.value()
                    .try_into()
                    .map_err(|_| d(&"the log generation row is not 4 octets"))?,
            ),
            None => 0,
        };
        let (wal, records) = Wal::open(log, generation, LOG.segment_bytes, LOG.retention_bytes)
            .map_err(|e| wal_error(path, e))?;
        let mut pending = std::collections::VecDeque::new();
        for (seq, bytes) in records {
            let (offset_ms, items) = decode_apply(&bytes, keying)
                .ok_or_else(|| d(&format!("logged write {seq} does not decode")))?;
            pending.push_back(ReplicaWrite::Apply {
                seq,
                offset_ms,
                items,
            });
        }
        let maps = txn.open_table(MAPPINGS).map_err(|e| d(&e))?;
        let anchors_t = txn.open_table(ANCHORS).map_err(|e| d(&e))?;
        let volatile_t = txn.open_table(VOLATILE).map_err(|e| d(&e))?;
        let owed_rows = crate::store::optional_rows(&txn, OWED).map_err(|e| d(&e))?;
        let requester_rows = crate::store::optional_rows(&txn, REQUESTERS).map_err(|e| d(&e))?;
        let hold_rows = crate::store::optional_rows(&txn, HOLDS).map_err(|e| d(&e))?;
        let Some(meta) = meta else {
            // No replica: the tables are empty unless the file is damaged.
            let rows = maps.len().map_err(|e| d(&e))?
                + anchors_t.len().map_err(|e| d(&e))?
                + volatile_t.len().map_err(|e| d(&e))?
                + owed_rows.len() as u64
                + requester_rows.len() as u64
                + hold_rows.len() as u64;
            if rows != 0 {
                return Err(d(&format!("{rows} rows without a meta row")));
            }
            drop((meta_t, maps, anchors_t, volatile_t, txn));
            return Ok((
                ReplicaStore {
                    db,
                    path: path.to_owned(),
                    meta: None,
                    wal,
                    pending,
                },
                None,
            ));
        };
        let mut mappings = Vec::new();
        for item in maps.iter().map_err(|e| d(&e))? {
            let (k, v) = item.map_err(|e| d(&e))?;
            let m = decode_mapping(v.value(), keying).ok_or_else(|| {
                d(&format!(
                    "mapping record {} does not decode",
                    hex::encode(k.value())
                ))
            })?;
            if key_of(&m) != k.value() {
                return Err(d(&format!(
                    "mapping {} is stored under the wrong key",
                    hex::encode(k.value())
                )));
            }
            mappings.push(m);
        }
        let mut anchors = Vec::new();
        for item in anchors_t.iter().map_err(|e| d(&e))? {
            let (k, v) = item.map_err(|e| d(&e))?;
            let sub = decode_subscriber(k.value()).ok_or_else(|| {
                d(&format!(
                    "subscriber {} of an epoch anchor does not decode",
                    hex::encode(k.value())
                ))
            })?;
            anchors.push((sub, Timestamp(v.value())));
        }
        let mut volatile = Vec::new();
        for item in volatile_t.iter().map_err(|e| d(&e))? {
            let (k, v) = item.map_err(|e| d(&e))?;
            let sub = decode_subscriber(k.value()).ok_or_else(|| {
                d(&format!(
                    "subscriber {} with volatile hosts does not decode",
                    hex::encode(k.value())
                ))
            })?;
            let (hosts, until) = decode_volatile(v.value()).ok_or_else(|| {
                d(&format!(
                    "the volatile hosts of subscriber {} do not decode",
                    hex::encode(k.value())
                ))
            })?;
            volatile.push((sub, hosts, until));
        }
        let mut owed = Vec::with_capacity(owed_rows.len());
        for (k, v) in &owed_rows {
            let bad = || {
                d(&format!(
                    "the hosts owed an ANNOUNCE of subscriber {} do not decode",
                    hex::encode(k)
                ))
            };
            let sub = decode_subscriber(k).ok_or_else(bad)?;
            let until = v.get(..8).ok_or_else(bad)?;
            let until = Timestamp(u64::from_be_bytes(until.try_into().map_err(|_| bad())?));
            let hosts = decode_hosts(&v[8..]).ok_or_else(bad)?;
            owed.push((sub, hosts, until));
        }
        let mut requesters = Vec::with_capacity(requester_rows.len());
        for (k, v) in &requester_rows {
            let bad = || {
                d(&format!(
                    "the record of THIRD_PARTY requester {} does not decode",
                    hex::encode(k)
                ))
            };
            let ip = Reader(k).ip().ok_or_else(bad)?;
            requesters.push((ip, decode_requester(v).ok_or_else(bad)?));
        }
        let mut holds = Vec::with_capacity(hold_rows.len());
        for (k, v) in &hold_rows {
            let bad = || {
                d(&format!(
                    "the record of held endpoint {} does not decode",
                    hex::encode(k)
                ))
            };
            holds.push(portkeep_server::record::decode_hold(k, v).ok_or_else(bad)?);
        }
        // The node keeps these ordered by subscriber, not by the stored
        // key's bytes.
        anchors.sort_by_key(|(s, _)| *s);
        volatile.sort_by_key(|(s, _, _)| *s);
        owed.sort_by_key(|(s, _, _)| *s);
        drop((meta_t, maps, anchors_t, volatile_t, txn));
        let replica = Replica {
            term: meta.term,
            seq: meta.seq,
            offset_ms: meta.offset_ms,
            server_anchor: meta.server_anchor,
            anchors,
            mappings,
            volatile,
            owed,
            requesters,
            holds,
        };
        Ok((
            ReplicaStore {
                db,
                path: path.to_owned(),
                meta: Some(meta),
                wal,
                pending,
            },
            Some(replica),
        ))
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The position of the replica stored, if one is.
    pub fn seq(&self) -> Option<u64> {
        self.meta.map(|m| m.seq)
    }

    /// Stores `writes`, in order: on disk (fsynced) when this returns
    /// `Ok`, so the positions they stand for may be acknowledged (RFC 7767
    /// section 3.2). The stream's writes are logged (one `fdatasync` for
    /// the batch); a snapshot goes to the tables in one durable
    /// transaction and starts a new generation of the log. After an error
    /// nothing of the batch may be acknowledged, and the replica is in no
    /// known state until it is opened again.
    pub fn write(&mut self, writes: &[ReplicaWrite]) -> Result<(), ReplicaError> {
        let p = self.path.clone();
        let e = |err: &dyn std::fmt::Display| io(&p, err);
        // A snapshot replaces everything before it.
        let from = writes
            .iter()
            .rposition(|w| matches!(w, ReplicaWrite::Replace(_)));
        if let Some(i) = from {
            self.replace_tables(&writes[i])?;
        }
        let mut logged = false;
        for w in &writes[from.map_or(0, |i| i + 1)..] {
            let ReplicaWrite::Apply {
                seq,
                offset_ms,
                items,
            } = w
            else {
                continue;
            };
            // Nothing new (a resumed stream's first write only orders its
            // acknowledgement after those before it).
            if self.meta.is_some_and(|m| *seq <= m.seq) {
                continue;
            }
            let bytes = encode_apply(*offset_ms, items);
            self.wal
                .append(std::iter::once((*seq, bytes.as_slice())))
                .map_err(|x| e(&x))?;
            self.meta = Some(advance(self.meta, w));
            self.pending.push_back(w.clone());
            logged = true;
        }
        if logged {
            self.wal.sync().map_err(|x| e(&x))?;
        }
        if self.pending.len() >= FOLD_BOUND {
            self.fold(FOLD_IDLE)?;
        }
        Ok(())
    }

    /// Work for idle moments: folds up to `max` logged writes into the
    /// tables (durably only when that lets a log segment go: until then
    /// the log holds whatever a lost commit of the tables would take), and
    /// makes the next log segment ahead of need.
    pub fn fold(&mut self, max: usize) -> Result<(), ReplicaError> {
        let p = self.path.clone();
        let e = |err: &dyn std::fmt::Display| io(&p, err);
        self.wal.prepare().map_err(|x| e(&x))?;
        let n = max.min(self.pending.len());
        if n == 0 {
            return Ok(());
        }
        let upto = match &self.pending[n - 1] {
            ReplicaWrite::Apply { seq, .. } => *seq,
            ReplicaWrite::Replace(r) => r.seq,
        };
        let durable = self.wal.releasable(upto);
        let mut txn = self.db.begin_write().map_err(|x| e(&x))?;
        txn.set_durability(if durable {
            redb::Durability::Immediate
        } else {
            redb::Durability::None
        })
        .map_err(|x| e(&x))?;
        txn.set_quick_repair(true);
        let chunk: Vec<ReplicaWrite> = self.pending.drain(..n).collect();
        apply_to_tables(&txn, &chunk, self.table_meta(&txn)?).map_err(|x| e(&x))?;
        txn.commit().map_err(|x| e(&x))?;
        if durable {
            self.wal.release(upto).map_err(|x| e(&x))?;
        }
        Ok(())
    }

    /// Logged writes not yet in the tables.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// The meta row the tables hold now.
    fn table_meta(&self, txn: &redb::WriteTransaction) -> Result<Option<Meta>, ReplicaError> {
        let t = txn.open_table(META).map_err(|x| io(&self.path, x))?;
        let v = t.get(META_KEY).map_err(|x| io(&self.path, x))?;
        match v {
            Some(v) => Meta::decode(v.value())
                .map(Some)
                .map_err(|x| damaged(&self.path, x)),
            None => Ok(None),
        }
    }

    /// A snapshot into the tables, durably, and a new log generation.
    fn replace_tables(&mut self, w: &ReplicaWrite) -> Result<(), ReplicaError> {
        let p = self.path.clone();
        let e = |err: &dyn std::fmt::Display| io(&p, err);
        let generation = self.wal.generation().wrapping_add(1);
        let mut txn = self.db.begin_write().map_err(|x| e(&x))?;
        txn.set_durability(redb::Durability::Immediate)
            .map_err(|x| e(&x))?;
        txn.set_quick_repair(true);
        let meta = apply_to_tables(&txn, std::slice::from_ref(w), None).map_err(|x| e(&x))?;
        txn.open_table(META)
            .map_err(|x| e(&x))?
            .insert(GENERATION_KEY, generation.to_be_bytes().as_slice())
            .map_err(|x| e(&x))?;
        txn.commit().map_err(|x| e(&x))?;
        // Committed: the old generation's writes are in the snapshot or
        // superseded by it.
        self.wal.reset(generation).map_err(|x| e(&x))?;
        self.pending.clear();
        self.meta = meta;
        Ok(())
    }

    /// Forgets the replica, durably: on return no later start resumes it.
    pub fn clear(&mut self) -> Result<(), ReplicaError> {
        let p = self.path.clone();
        let e = |err: &dyn std::fmt::Display| io(&p, err);
        let generation = self.wal.generation().wrapping_add(1);
        let mut txn = self.db.begin_write().map_err(|x| e(&x))?;
        txn.set_durability(redb::Durability::Immediate)
            .map_err(|x| e(&x))?;
        txn.set_quick_repair(true);
        {
            // The meta row first: without it no replica exists, whatever
            // else the transaction holds; the new generation leaves every
            // logged write behind.
            let mut meta_t = txn.open_table(META).map_err(|x| e(&x))?;
            meta_t.remove(META_KEY).map_err(|x| e(&x))?;
            meta_t
                .insert(GENERATION_KEY, generation.to_be_bytes().as_slice())
                .map_err(|x| e(&x))?;
            for t in [MAPPINGS, VOLATILE, OWED, REQUESTERS, HOLDS] {
                let mut t = txn.open_table(t).map_err(|x| e(&x))?;
                t.retain(|_, _| false).map_err(|x| e(&x))?;
            }
            let mut anchors = txn.open_table(ANCHORS).map_err(|x| e(&x))?;
            anchors.retain(|_, _| false).map_err(|x| e(&x))?;
        }
        txn.commit().map_err(|x| e(&x))?;
        self.wal.reset(generation).map_err(|x| e(&x))?;
        self.pending.clear();
        self.meta = None;
        Ok(())
    }
}

/// The meta row after `w` (a stream write's server-wide anchor is its last
/// [`Item::ServerEpoch`], or the one before).
fn advance(meta: Option<Meta>, w: &ReplicaWrite) -> Meta {
    match w {
        ReplicaWrite::Replace(r) => Meta {
            term: r.term,
            seq: r.seq,
            offset_ms: r.offset_ms,
            server_anchor: r.server_anchor,
        },
        ReplicaWrite::Apply {
            seq,
            offset_ms,
            items,
        } => {
            let mut server_anchor = meta.and_then(|m| m.server_anchor);
            for i in items {
                if let Item::ServerEpoch { anchor } = i {
                    server_anchor = Some(*anchor);
                }
            }
            Meta {
                term: meta.map_or(0, |m| m.term),
                seq: *seq,
                offset_ms: *offset_ms,
                server_anchor,
            }
        }
    }
}

/// Applies `writes` to the tables in `txn`, from the meta row `meta`;
/// returns the meta row written.
fn apply_to_tables(
    txn: &redb::WriteTransaction,
    writes: &[ReplicaWrite],
    mut meta: Option<Meta>,
) -> Result<Option<Meta>, redb::Error> {
    let mut maps = txn.open_table(MAPPINGS)?;
    let mut anchors = txn.open_table(ANCHORS)?;
    let mut volatile = txn.open_table(VOLATILE)?;
    let mut owed = txn.open_table(OWED)?;
    let mut requesters = txn.open_table(REQUESTERS)?;
    let mut holds = txn.open_table(HOLDS)?;
    for w in writes {
        match w {
            ReplicaWrite::Replace(r) => {
                maps.retain(|_, _| false)?;
                anchors.retain(|_, _| false)?;
                volatile.retain(|_, _| false)?;
                owed.retain(|_, _| false)?;
                requesters.retain(|_, _| false)?;
                holds.retain(|_, _| false)?;
                let mut entries: Vec<(Vec<u8>, Vec<u8>)> = r
                    .mappings
                    .iter()
                    .map(|m| (key_of(m), encode_mapping(m)))
                    .collect();
                // Sorted keys insert fastest into the B-tree.
                entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
                for (k, v) in &entries {
                    maps.insert(k.as_slice(), v.as_slice())?;
                }
                for (s, a) in &r.anchors {
                    anchors.insert(encode_subscriber(s).as_slice(), a.as_millis())?;
                }
                for (s, hosts, until) in &r.volatile {
                    put_volatile(&mut volatile, s, hosts, *until)?;
                }
                for (s, hosts, until) in &r.owed {
                    put_owed(&mut owed, s, hosts, *until)?;
                }
                for (ip, st) in &r.requesters {
                    put_requester(&mut requesters, *ip, Some(st))?;
                }
                for h in &r.holds {
                    put_hold(&mut holds, h)?;
                }
            }
            ReplicaWrite::Apply { items, .. } => {
                // As `Replica::apply` on a replica not yet stored: the
                // items apply to an empty one.
                for item in items {
                    match item {
                        Item::Upsert(m) => {
                            maps.insert(key_of(m).as_slice(), encode_mapping(m).as_slice())?;
                        }
                        Item::Remove(k) => {
                            maps.remove(k.as_slice())?;
                        }
                        Item::Epoch { subscriber, anchor } => {
                            anchors.insert(
                                encode_subscriber(subscriber).as_slice(),
                                anchor.as_millis(),
                            )?;
                        }
                        Item::ServerEpoch { .. } => {
                            anchors.retain(|_, _| false)?;
                        }
                        Item::Volatile {
                            subscriber,
                            hosts,
                            until,
                        } => {
                            put_volatile(&mut volatile, subscriber, hosts, *until)?;
                        }
                        Item::AnnounceOwed {
                            subscriber,
                            hosts,
                            until,
                        } => {
                            put_owed(&mut owed, subscriber, hosts, *until)?;
                        }
                        Item::Requester { ip, state } => {
                            put_requester(&mut requesters, *ip, state.as_ref())?;
                        }
                        Item::PortHeld(h) => put_hold(&mut holds, h)?,
                    }
                }
            }
        }
        meta = Some(advance(meta, w));
    }
    if let Some(m) = &meta {
        txn.open_table(META)?
            .insert(META_KEY, m.encode().as_slice())?;
    }
    Ok(meta)
}

fn put_hold(
    t: &mut redb::Table<&[u8], &[u8]>,
    h: &portkeep_server::PortHold,
) -> Result<(), redb::StorageError> {
    t.insert(
        portkeep_server::record::hold_key(h).as_slice(),
        portkeep_server::record::encode_hold(h).as_slice(),
    )?;
    Ok(())
}

fn put_volatile(
    t: &mut redb::Table<&[u8], &[u8]>,
    s: &SubscriberId,
    hosts: &[IpAddr],
    until: Timestamp,
) -> Result<(), redb::StorageError> {
    let k = encode_subscriber(s);
    if hosts.is_empty() {
        t.remove(k.as_slice())?;
    } else {
        t.insert(k.as_slice(), encode_volatile(hosts, until).as_slice())?;
    }
    Ok(())
}

fn put_requester(
    t: &mut redb::Table<&[u8], &[u8]>,
    ip: IpAddr,
    state: Option<&portkeep_server::RequesterState>,
) -> Result<(), redb::StorageError> {
    let k = to_wire(ip).octets();
    match state {
        Some(st) => {
            t.insert(k.as_slice(), encode_requester(st).as_slice())?;
        }
        None => {
            t.remove(k.as_slice())?;
        }
    }
    Ok(())
}

fn put_owed(
    t: &mut redb::Table<&[u8], &[u8]>,
    s: &SubscriberId,
    hosts: &[IpAddr],
    until: Timestamp,
) -> Result<(), redb::StorageError> {
    let k = encode_subscriber(s);
    if hosts.is_empty() {
        t.remove(k.as_slice())?;
    } else {
        let mut v = until.as_millis().to_be_bytes().to_vec();
        v.extend_from_slice(&encode_hosts(hosts));
        t.insert(k.as_slice(), v.as_slice())?;
    }
    Ok(())
}

/// Moves a replica file that cannot be read out of the way, to
/// `<path>.damaged-<stamp>`, and returns where it went: it is kept for
/// the operator, and never read again.
pub fn move_aside(path: &Path, stamp: u64) -> Result<PathBuf, ReplicaError> {
    let aside = path.with_extension(format!("redb.damaged-{stamp}"));
    std::fs::rename(path, &aside).map_err(|e| io(path, e))?;
    let log = log_dir_of(path);
    if log.exists() {
        let log_aside = path.with_extension(format!("wal.damaged-{stamp}"));
        std::fs::rename(&log, &log_aside).map_err(|e| io(&log, e))?;
    }
    Ok(aside)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::faulty_disk::{Crash, FaultyDisk};
    use crate::wal::mem::{Crash as LogCrash, MemDir};
    use portkeep_proto::Protocol;
    use portkeep_server::{MappingKey, MappingKind, MappingRecord};

    fn keying() -> SubscriberKeying {
        SubscriberKeying::default()
    }

    fn record(host: u8, port: u16, checkpoint: bool) -> MappingRecord {
        let ip: IpAddr = format!("198.51.100.{host}").parse().unwrap();
        MappingRecord {
            key: MappingKey {
                internal_ip: ip,
                protocol: Protocol::TCP,
                internal_port: port,
            },
            kind: MappingKind::Map,
            nonce: [host; 12],
            external: format!("192.0.2.1:{}", 40_000 + port).parse().unwrap(),
            expires: Timestamp(1_000_000 + u64::from(port)),
            lifetime: 600,
            checkpoint,
            filters: vec![],
            description: None,
            subscriber: keying().subscriber_of(ip),
            third_party: false,
            followed: false,
            manager: None,
        }
    }

    fn sub(host: u8) -> SubscriberId {
        keying().subscriber_of(format!("198.51.100.{host}").parse().unwrap())
    }

    /// A hold on port `port` of the pool until `until` (RFC 6887 section
    /// 15).
    fn hold(port: u16, until: u64) -> portkeep_server::PortHold {
        portkeep_server::PortHold {
            owner: portkeep_server::MappingKey {
                internal_ip: "10.0.0.9".parse().unwrap(),
                protocol: portkeep_proto::Protocol::UDP,
                internal_port: 5000,
            },
            nonce: [9; 12],
            external: std::net::SocketAddr::new("192.0.2.1".parse().unwrap(), port),
            until: Timestamp(until),
        }
    }

    /// A snapshot, then stream items of every kind, as a backup hands
    /// them out.
    fn writes() -> Vec<ReplicaWrite> {
        let mut mappings: Vec<MappingRecord> = (0..20)
            .map(|p| record(1 + (p % 3) as u8, p, true))
            .collect();
        // In the order a backup's replica holds them (by stored key), as
        // the store reads them back.
        mappings.sort_by_key(key_of);
        let mut w = vec![ReplicaWrite::Replace(Replica {
            term: 3,
            seq: 10,
            offset_ms: -5,
            server_anchor: Some(Timestamp(100)),
            anchors: vec![(sub(1), Timestamp(7)), (sub(2), Timestamp(8))],
            mappings,
            volatile: vec![(
                sub(3),
                vec!["198.51.100.3".parse().unwrap()],
                Timestamp(4_000),
            )],
            owed: vec![(
                sub(7),
                vec!["198.51.100.7".parse().unwrap()],
                Timestamp(5_000),
            )],
            requesters: vec![
                (
                    "10.1.0.1".parse().unwrap(),
                    portkeep_server::RequesterState {
                        port: 40_001,
                        anchor: Some(Timestamp(77)),
                        volatile_until: Some(Timestamp(6_000)),
                    },
                ),
                (
                    "10.1.0.2".parse().unwrap(),
                    portkeep_server::RequesterState {
                        port: 40_002,
                        anchor: None,
                        volatile_until: None,
                    },
                ),
            ],
            holds: vec![hold(20_001, 9_000), hold(20_002, 9_500)],
        })];
        let items = [
            vec![
                Item::Upsert(record(4, 500, true)),
                Item::Remove(key_of(&record(1, 0, true))),
                Item::Upsert(record(2, 1, false)),
            ],
            vec![
                Item::Epoch {
                    subscriber: sub(4),
                    anchor: Timestamp(9),
                },
                Item::Volatile {
                    subscriber: sub(3),
                    hosts: vec![],
                    until: Timestamp(0),
                },
                Item::Volatile {
                    subscriber: sub(5),
                    hosts: vec![
                        "198.51.100.5".parse().unwrap(),
                        "2001:db8::5".parse().unwrap(),
                    ],
                    until: Timestamp(8_000),
                },
            ],
            vec![
                Item::ServerEpoch {
                    anchor: Timestamp(200),
                },
                Item::Epoch {
                    subscriber: sub(1),
                    anchor: Timestamp(201),
                },
                Item::Remove(key_of(&record(9, 9, true))),
            ],
            vec![
                Item::Upsert(record(6, 600, true)),
                Item::AnnounceOwed {
                    subscriber: sub(8),
                    hosts: vec!["2001:db8::8".parse().unwrap()],
                    until: Timestamp(6_000),
                },
                Item::AnnounceOwed {
                    subscriber: sub(7),
                    hosts: vec![],
                    until: Timestamp(6_000),
                },
                Item::Requester {
                    ip: "10.1.0.2".parse().unwrap(),
                    state: None,
                },
                Item::PortHeld(hold(20_002, 12_000)),
                Item::PortHeld(hold(20_003, 12_500)),
                Item::Requester {
                    ip: "2001:db8::10".parse().unwrap(),
                    state: Some(portkeep_server::RequesterState {
                        port: 5350,
                        anchor: Some(Timestamp(6_001)),
                        volatile_until: None,
                    }),
                },
            ],
        ];
        for (i, items) in items.into_iter().enumerate() {
            w.push(ReplicaWrite::Apply {
                seq: 11 + i as u64,
                offset_ms: i as i64,
                items,
            });
        }
        w
    }

    fn open_disk(
        disk: &FaultyDisk,
        log: &MemDir,
    ) -> Result<(ReplicaStore, Option<Replica>), ReplicaError> {
        ReplicaStore::open_on(
            disk.clone(),
            Box::new(log.clone()),
            Path::new("faulty-disk"),
            &keying(),
        )
    }

    fn model(writes: &[ReplicaWrite]) -> Replica {
        let mut r = Replica::default();
        for w in writes {
            r.apply(w.clone());
        }
        r
    }

    /// RFC 7767 section 3.2: what a backup stored before acknowledging
    /// reads back as exactly the replica the same writes give applied in
    /// order (`Replica::apply`), whether written one by one or as one
    /// group commit, after a snapshot replaced what was there.
    #[test]
    fn rfc7767_s3_2_stored_writes_read_back_as_the_replica_they_make() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("replica.redb");
        let all = writes();
        {
            let (mut st, r) = ReplicaStore::open(&path, &keying()).unwrap();
            assert_eq!(r, None, "a new file holds no replica");
            // Something stale first, which the snapshot must replace.
            st.write(&[ReplicaWrite::Apply {
                seq: 3,
                offset_ms: 0,
                items: vec![Item::Upsert(record(8, 8, true))],
            }])
            .unwrap();
            st.write(&all[..2]).unwrap();
            for w in &all[2..] {
                st.write(std::slice::from_ref(w)).unwrap();
            }
            assert_eq!(st.seq(), Some(model(&all).seq));
        }
        let (mut st, r) = ReplicaStore::open(&path, &keying()).unwrap();
        assert_eq!(r, Some(model(&all)));
        st.clear().unwrap();
        drop(st);
        let (_, r) = ReplicaStore::open(&path, &keying()).unwrap();
        assert_eq!(r, None, "a cleared replica is never resumed");
    }

    /// RFC 7767 section 3.2 below the process: after each way a machine
    /// can go down, the replica reads back as the state after a whole
    /// number of writes, no fewer than `write` returned `Ok` for (each may
    /// have been acknowledged), or, if nothing was, as no replica; a write
    /// whose fsync failed reports it.
    #[test]
    fn rfc7767_s3_2_a_crash_loses_no_acknowledged_write() {
        let all = writes();
        let mut crashes = 0;
        for fail_at in [None, Some(0), Some(2), Some(4)] {
            let disk = FaultyDisk::default();
            let log = MemDir::default();
            let (mut st, _) = open_disk(&disk, &log).unwrap();
            // states[i]: the replica after i writes.
            let mut states = vec![None];
            let mut acknowledged = 0;
            for (i, w) in all.iter().enumerate() {
                let failing = fail_at == Some(i);
                disk.state().fail_syncs = failing;
                log.fail_syncs(failing);
                let r = st.write(std::slice::from_ref(w));
                states.push(Some(model(&all[..=i])));
                if failing {
                    assert!(r.is_err(), "a failed fsync fails the write");
                    break;
                }
                r.unwrap();
                acknowledged = i + 1;
                // Some writes reach the tables before the crash.
                if i % 2 == 1 {
                    st.fold(1).unwrap();
                }
            }
            for how in [
                Crash::DropUnsynced,
                Crash::TearLast,
                Crash::SomeUnsynced(7),
                Crash::SomeUnsynced(12_345),
            ] {
                crashes += 1;
                let img = disk.crash(how);
                let log_img = log.crash(how.into());
                let (_, got) = open_disk(&img, &log_img)
                    .unwrap_or_else(|e| panic!("{fail_at:?}, {how:?}: {e}"));
                let whole = states.iter().position(|s| *s == got);
                assert!(
                    whole.is_some_and(|i| i >= acknowledged),
                    "{fail_at:?}, {how:?}: not the replica after {acknowledged} or more whole writes: {got:?}"
                );
            }
        }
        assert_eq!(crashes, 16);
    }

    /// A replica file that does not read back whole is refused as damaged
    /// (the node then starts cold), never half-loaded, never a panic:
    /// garbage in place of the file, a meta row of another format, and
    /// single flipped bytes anywhere.
    #[test]
    fn rfc7767_s3_2_a_corrupted_replica_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("replica.redb");
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        assert!(matches!(
            ReplicaStore::open(&path, &keying()),
            Err(ReplicaError::Damaged { .. })
        ));
        let aside = move_aside(&path, 1).unwrap();
        assert!(aside.exists() && !path.exists());

        assert!(Meta::decode(&[2; 18]).is_err());
        let good = Meta {
            term: 4,
            seq: 1,
            offset_ms: -1,
            server_anchor: Some(Timestamp(3)),
        }
        .encode();
        for cut in 0..good.len() {
            assert!(Meta::decode(&good[..cut]).is_err(), "cut at {cut}");
        }
        // A row of the previous format (no term) reads as term 0.
        let mut old = good[..good.len() - 8].to_vec();
        old[0] = 1;
        assert_eq!(
            Meta::decode(&old),
            Ok(Meta {
                term: 0,
                seq: 1,
                offset_ms: -1,
                server_anchor: Some(Timestamp(3)),
            })
        );
        assert_eq!(decode_hosts(&[0; 15]), None);
        // Volatile rows: with their end, or (written before the end was
        // recorded) without, read as never ending.
        let h: Vec<IpAddr> = vec!["198.51.100.3".parse().unwrap()];
        let row = encode_volatile(&h, Timestamp(4_000));
        assert_eq!(decode_volatile(&row), Some((h.clone(), Timestamp(4_000))));
        let old = encode_hosts(&h);
        assert_eq!(decode_volatile(&old), Some((h, Timestamp(u64::MAX))));
        for cut in [1, 9, 20] {
            assert_eq!(decode_volatile(&row[..row.len() - cut]), None, "cut {cut}");
        }

        let all = writes();
        let disk = FaultyDisk::default();
        let log = MemDir::default();
        let (mut st, _) = open_disk(&disk, &log).unwrap();
        let mut states = vec![None];
        for (i, w) in all.iter().enumerate() {
            st.write(std::slice::from_ref(w)).unwrap();
            states.push(Some(model(&all[..=i])));
            if i == 2 {
                // Part in the tables, part only in the log.
                st.fold(2).unwrap();
            }
        }
        drop(st);
        let len = disk.state().synced.len();
        let mut refused = 0;
        for i in 0..128usize {
            let img = disk.crash(Crash::DropUnsynced);
            let log_img = log.crash(LogCrash::DropUnsynced);
            if i % 2 == 0 {
                let mut s = img.state();
                let at = (i * 7919 * 4099) % len;
                s.synced[at] ^= 0x5a;
                s.current = s.synced.clone();
            } else {
                // The log's frames are in its first kilobytes.
                assert!(log_img.corrupt((i * 7919) % 2_000));
            }
            match open_disk(&img, &log_img) {
                Ok((_, got)) => assert!(
                    states.contains(&got),
                    "byte {i}: opened to a replica no write made"
                ),
                Err(ReplicaError::Damaged { .. }) => refused += 1,
                Err(e) => panic!("byte {i}: {e}"),
            }
        }
        eprintln!("{refused} of 128 corrupted replicas refused, the rest opened whole");
    }
}
