//! Stable storage of the server's state, on redb.
//!
//! Every [`Change`] the core makes is written here before the response that
//! depends on it leaves the daemon (the runtime's committer groups many
//! requests into one transaction). The store holds exactly what a restart
//! needs (failure-scenarios draft sections 2.6 and 6): the mappings with
//! their external endpoints (which are the port allocations), every
//! subscriber's epoch anchor, the server-wide anchor, and the last log
//! sequence number, from which the HA link can resume.
//!
//! Records are a small versioned binary format, read with bounds checks:
//! a record that does not decode means the store is damaged, and the daemon
//! refuses to half-load it.
//!
//! Writing is log-structured. A commit appends its changes to the
//! write-ahead log ([`crate::wal`]: one sequential write and one
//! `fdatasync`), and a checkpoint later folds the oldest part of the log
//! into the redb tables, keeping only the latest change of each mapping.
//! Checkpoints run when the committer is idle or the log grows past a
//! bound. They commit without an fsync, except when one lets log segments
//! go: a segment is removed only once the tables hold everything in it
//! durably, so whatever a crash takes from the tables the log still holds.
//! A restart loads the tables and replays the log on top, in order.
//!
//! Format 1 (earlier releases) kept the log in a redb table and had no
//! write-ahead log; such a store is read as it is and rewritten as format 2
//! at once.

use std::path::{Path, PathBuf};

use portkeep_server::record::{
    decode_hold, decode_mapping, decode_requester, decode_subscriber, encode_hold, encode_mapping,
    encode_requester, encode_subscriber, hold_key, key_of, Reader,
};
use portkeep_server::{Change, ChangeRecord, Restored, SubscriberKeying, Timestamp};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::wal::{FsDir, Wal, WalDir, WalError};

const MAPPINGS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("mappings");
const SUBSCRIBERS: TableDefinition<&[u8], u64> = TableDefinition::new("subscriber_anchors");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
/// Hosts owed an ANNOUNCE, per subscriber: until when (8 octets), then
/// the hosts (16 octets each). Stores written before it existed lack the
/// table: read as empty.
const OWED: TableDefinition<&[u8], &[u8]> = TableDefinition::new("announce_owed");
/// THIRD_PARTY requesters, by address (16 octets): their state as
/// `record::encode_requester` writes it. Stores written before it existed
/// lack the table: read as empty.
const REQUESTERS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("requesters");
/// External endpoints held after they were freed (RFC 6887 section 15),
/// by `record::hold_key`: `record::encode_hold`. One row per endpoint
/// (bounded by the pool); rows whose hold ended are ignored when read
/// and dropped when the store is replaced. Stores written before it
/// existed lack the table: read as empty.
const HOLDS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("port_holds");

/// Most log entries folded by one checkpoint while requests are waiting.
pub const CHECKPOINT_BUSY: usize = 16_384;
/// Log entries folded per checkpoint step while idle: small, so a burst
/// that arrives meanwhile waits only a few milliseconds.
pub const CHECKPOINT_IDLE: usize = 4_096;
/// Past this many log entries, checkpoints run even while busy.
const LOG_BOUND: u64 = 131_072;

const LOG_UPSERT: u8 = 1;
const LOG_REMOVE: u8 = 2;
const LOG_EPOCH: u8 = 3;
const LOG_SERVER_EPOCH: u8 = 4;
const LOG_OWED: u8 = 5;
const LOG_REQUESTER: u8 = 6;
const LOG_HOLD: u8 = 7;

/// Meta key set (to 1) while the store is served in relaxed mode and
/// cleared by a clean stop ([`Store::mark_serving`], [`Store::close`]).
const UNCLEAN: &str = "relaxed_unclean";

/// Version of the store's layout; bumped on any incompatible change.
const FORMAT: u64 = 2;
/// The layout of earlier releases, migrated when opened.
const FORMAT_LOG_TABLE: u64 = 1;

/// How the write-ahead log is kept.
#[derive(Debug, Clone, Copy)]
pub struct LogOptions {
    /// Size of each segment file.
    pub segment_bytes: u64,
    /// How much of the log already folded into the tables is kept,
    /// readable by position (a backup's resume).
    pub retention_bytes: u64,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            segment_bytes: 16 << 20,
            retention_bytes: 64 << 20,
        }
    }
}

/// A change read back from the log by position ([`Store::read_log`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Logged {
    /// A mapping as it was created or changed.
    Upsert(portkeep_server::MappingRecord),
    /// A mapping went away (its key, as `record::key_of` gives it).
    Remove(Vec<u8>),
    /// A subscriber's epoch restarted.
    Epoch {
        /// Whose.
        subscriber: portkeep_server::SubscriberId,
        /// From when.
        anchor: Timestamp,
    },
    /// The server-wide epoch restarted.
    ServerEpoch {
        /// From when.
        anchor: Timestamp,
    },
    /// Hosts owed an ANNOUNCE (`Change::AnnounceOwed`).
    AnnounceOwed {
        /// Whose.
        subscriber: portkeep_server::SubscriberId,
        /// The hosts (empty: none any more).
        hosts: Vec<std::net::IpAddr>,
        /// Until when.
        until: Timestamp,
    },
    /// A THIRD_PARTY requester's state (`Change::Requester`).
    Requester {
        /// Its address.
        ip: std::net::IpAddr,
        /// Its state; `None`: forgotten.
        state: Option<portkeep_server::RequesterState>,
    },
    /// An endpoint held after it was freed (`Change::PortHeld`).
    PortHeld(portkeep_server::PortHold),
}

/// How hard each commit works to survive a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Every commit is on disk (fsync) before any response that depends on
    /// it is sent: nothing acknowledged is ever lost.
    Durable,
    /// Commits reach the disk at most about a second later: faster, but a
    /// crash of the machine (or of the daemon) can lose the last second of
    /// acknowledged changes. For labs and benchmarks.
    Relaxed,
}

/// What to do with a store that cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// Stop with an error (the default): a damaged store is never silently
    /// half-loaded.
    Fail,
    /// Move the damaged file aside and start fresh (all epochs reset).
    Fresh,
}

/// Why the store cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file exists but cannot be read as a store.
    #[error(
        "store {path} is damaged ({detail}); refusing to load part of it. \
         Either restore it from a backup, or restart with --store-recovery=fresh \
         to move it aside and start with no mappings (every client's epoch resets)"
    )]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// Reading or writing failed.
    #[error("store {path}: {detail}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        detail: String,
    },
}

/// An open store.
pub struct Store {
    db: Database,
    path: PathBuf,
    durability: Durability,
    /// Relaxed mode: whether commits since the last durable one exist.
    dirty: bool,
    last_durable: Timestamp,
    /// Entries logged and not yet folded into the tables.
    log_len: u64,
    wal: Wal,
    /// Those entries, encoded, in log order.
    pending: std::collections::VecDeque<(u64, Vec<u8>)>,
    /// The last position the tables hold.
    folded: u64,
    /// Tables committed without an fsync since the last durable commit.
    tables_dirty: bool,
    keying: SubscriberKeying,
    /// The store was last served in relaxed mode and not closed cleanly:
    /// acknowledged changes may be missing ([`Store::lost_unknown`]).
    lost_unknown: bool,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

/// What opening found.
#[derive(Debug)]
pub enum Opened {
    /// No store existed (or a damaged one was moved aside): a fresh start,
    /// whose epoch begins now.
    Fresh {
        /// Where a damaged file was moved, if one was.
        moved_aside: Option<PathBuf>,
    },
    /// The state as last committed.
    Restored(Restored),
}

fn io(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::Io {
        path: path.to_owned(),
        detail: e.to_string(),
    }
}

fn damaged(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::Damaged {
        path: path.to_owned(),
        detail: e.to_string(),
    }
}

fn wal_error(path: &Path, e: WalError) -> StoreError {
    match e {
        WalError::Damaged(d) => damaged(path, format!("its log: {d}")),
        WalError::Io(e) => io(path, e),
    }
}

/// Where the write-ahead log of the store at `path` lives.
pub fn log_dir_of(path: &Path) -> PathBuf {
    path.with_extension("wal")
}

/// Runs `open` (the open of an existing redb file, before any other
/// thread starts), turning a panic of the storage engine into `Err` with
/// its message. redb trusts the structure it finds and panics on some
/// corruptions; a damaged file must give a clear error, never a crash.
/// The default panic message is silenced for its duration.
pub(crate) fn contain_engine_panic<T>(open: impl FnOnce() -> T) -> Result<T, String> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(open));
    std::panic::set_hook(hook);
    result.map_err(|payload| {
        payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "internal inconsistency".to_owned())
    })
}

impl Store {
    /// Opens (or creates) the store at `path`, with the default log
    /// options.
    ///
    /// `now` becomes the epoch anchor of a fresh store; `keying` rebuilds
    /// each mapping's subscriber under the configuration in force now.
    pub fn open(
        path: &Path,
        durability: Durability,
        recovery: Recovery,
        cache_bytes: usize,
        now: Timestamp,
        keying: &SubscriberKeying,
    ) -> Result<(Store, Opened), StoreError> {
        Self::open_with(
            path,
            durability,
            recovery,
            cache_bytes,
            now,
            keying,
            LogOptions::default(),
        )
    }

    /// [`Store::open`] with the write-ahead log's options.
    pub fn open_with(
        path: &Path,
        durability: Durability,
        recovery: Recovery,
        cache_bytes: usize,
        now: Timestamp,
        keying: &SubscriberKeying,
        log: LogOptions,
    ) -> Result<(Store, Opened), StoreError> {
        let log_dir = log_dir_of(path);
        let dir = |p: &Path| -> Result<Box<dyn WalDir>, StoreError> {
            Ok(Box::new(FsDir::open(p).map_err(|e| io(p, e))?))
        };
        if path.exists() {
            let opened = Self::guarded(path, || {
                let db = Self::builder(cache_bytes)
                    .open(path)
                    .map_err(|e| damaged(path, e))?;
                Self::load(db, path, dir(&log_dir)?, durability, now, keying, log)
            });
            match opened {
                Ok(r) => return Ok(r),
                Err(StoreError::Damaged { detail, .. }) if recovery == Recovery::Fresh => {
                    let aside = path.with_extension(format!("redb.damaged-{}", now.as_millis()));
                    std::fs::rename(path, &aside).map_err(|e| io(path, e))?;
                    if log_dir.exists() {
                        let log_aside =
                            path.with_extension(format!("wal.damaged-{}", now.as_millis()));
                        std::fs::rename(&log_dir, &log_aside).map_err(|e| io(&log_dir, e))?;
                    }
                    tracing::warn!(
                        "store {} was damaged ({detail}); moved to {} and starting fresh",
                        path.display(),
                        aside.display()
                    );
                    let db = Self::builder(cache_bytes)
                        .create(path)
                        .map_err(|e| io(path, e))?;
                    let store = Self::init(db, path, dir(&log_dir)?, durability, now, keying, log)?;
                    return Ok((
                        store,
                        Opened::Fresh {
                            moved_aside: Some(aside),
                        },
                    ));
                }
                Err(e) => return Err(e),
            }
        }
        let db = Self::builder(cache_bytes)
            .create(path)
            .map_err(|e| io(path, e))?;
        let store = Self::init(db, path, dir(&log_dir)?, durability, now, keying, log)?;
        Ok((store, Opened::Fresh { moved_aside: None }))
    }

    fn builder(cache_bytes: usize) -> redb::Builder {
        let mut b = Database::builder();
        b.set_cache_size(cache_bytes);
        // Verify every page's checksum at open: a flipped bit in a page
        // can otherwise make records vanish from a table silently (found
        // by the corrupting disk in the tests), and a store is never
        // half-loaded.
        b.set_check_integrity_on_open(true);
        b
    }

    /// Opens (or creates) a store on `backend` and `log` instead of files:
    /// how the tests put a disk that loses, tears and fails writes under it
    /// (all of redb's I/O goes through the backend, all of the log's
    /// through `log`). `label` names it in errors.
    #[allow(clippy::too_many_arguments)]
    pub fn open_on(
        backend: impl redb::StorageBackend,
        log: Box<dyn WalDir>,
        label: &Path,
        durability: Durability,
        cache_bytes: usize,
        now: Timestamp,
        keying: &SubscriberKeying,
        options: LogOptions,
    ) -> Result<(Store, Opened), StoreError> {
        if backend.len().map_err(|e| io(label, e))? == 0 {
            let db = Self::builder(cache_bytes)
                .create_with_backend(backend)
                .map_err(|e| io(label, e))?;
            let store = Self::init(db, label, log, durability, now, keying, options)?;
            return Ok((store, Opened::Fresh { moved_aside: None }));
        }
        Self::guarded(label, || {
            let db = Self::builder(cache_bytes)
                .create_with_backend(backend)
                .map_err(|e| damaged(label, e))?;
            Self::load(db, label, log, durability, now, keying, options)
        })
    }

    /// Makes the tables and the anchor of a new store in `db`.
    fn init(
        db: Database,
        path: &Path,
        mut log: Box<dyn WalDir>,
        durability: Durability,
        now: Timestamp,
        keying: &SubscriberKeying,
        options: LogOptions,
    ) -> Result<Store, StoreError> {
        // Tables and the anchor exist from the first commit, so a restart
        // right away continues this epoch.
        let txn = db.begin_write().map_err(|e| io(path, e))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| io(path, e))?;
            meta.insert("format", FORMAT).map_err(|e| io(path, e))?;
            meta.insert("anchor", now.as_millis())
                .map_err(|e| io(path, e))?;
            meta.insert("last_seq", 0).map_err(|e| io(path, e))?;
            meta.insert("log_generation", 0).map_err(|e| io(path, e))?;
            txn.open_table(MAPPINGS).map_err(|e| io(path, e))?;
            txn.open_table(SUBSCRIBERS).map_err(|e| io(path, e))?;
            txn.open_table(LOG).map_err(|e| io(path, e))?;
            txn.open_table(OWED).map_err(|e| io(path, e))?;
            txn.open_table(REQUESTERS).map_err(|e| io(path, e))?;
            txn.open_table(HOLDS).map_err(|e| io(path, e))?;
        }
        txn.commit().map_err(|e| io(path, e))?;
        crate::wal::wipe(log.as_mut()).map_err(|e| io(path, e))?;
        let (wal, _) = Wal::open(log, 0, options.segment_bytes, options.retention_bytes)
            .map_err(|e| wal_error(path, e))?;
        Ok(Store {
            db,
            path: path.to_owned(),
            durability,
            dirty: false,
            last_durable: now,
            log_len: 0,
            wal,
            pending: Default::default(),
            folded: 0,
            tables_dirty: false,
            keying: keying.clone(),
            lost_unknown: false,
        })
    }

    /// Runs `open`, turning a panic of the storage engine into
    /// [`StoreError::Damaged`].
    ///
    /// redb trusts the structure it finds; on some corruptions it panics
    /// rather than returning an error. A damaged file must produce the
    /// clear "damaged store" error, never a crash, so the open (which runs
    /// before any other thread starts) is isolated, with the default panic
    /// message silenced for its duration.
    fn guarded(
        path: &Path,
        open: impl FnOnce() -> Result<(Store, Opened), StoreError>,
    ) -> Result<(Store, Opened), StoreError> {
        contain_engine_panic(open).unwrap_or_else(|what| {
            Err(damaged(
                path,
                format!("the storage engine failed reading it: {what}"),
            ))
        })
    }

    /// Reads what `db` holds: the tables, then the log on top (the log
    /// table of format 1, then the write-ahead log).
    fn load(
        db: Database,
        path: &Path,
        log: Box<dyn WalDir>,
        durability: Durability,
        now: Timestamp,
        keying: &SubscriberKeying,
        options: LogOptions,
    ) -> Result<(Store, Opened), StoreError> {
        let txn = db.begin_read().map_err(|e| damaged(path, e))?;
        let meta = txn.open_table(META).map_err(|e| damaged(path, e))?;
        let get = |k: &str| -> Result<u64, StoreError> {
            meta.get(k)
                .map_err(|e| damaged(path, e))?
                .map(|v| v.value())
                .ok_or_else(|| damaged(path, format!("missing meta key `{k}`")))
        };
        // Absent in stores written before it, and in stores only ever
        // served durably.
        let lost_unknown = meta
            .get(UNCLEAN)
            .map_err(|e| damaged(path, e))?
            .is_some_and(|v| v.value() != 0);
        let format = get("format")?;
        if format != FORMAT && format != FORMAT_LOG_TABLE {
            return Err(damaged(
                path,
                format!(
                    "format {format}, this portkeepd reads formats {FORMAT_LOG_TABLE} and {FORMAT}"
                ),
            ));
        }
        let generation = if format == FORMAT {
            u32::try_from(get("log_generation")?)
                .map_err(|_| damaged(path, "log generation out of range"))?
        } else {
            0
        };
        let mut anchor = Timestamp(get("anchor")?);
        // The term the state was served in: written at each takeover
        // (`Store::replace`); absent in stores that never had one.
        let served_term = meta
            .get("term")
            .map_err(|e| damaged(path, e))?
            .map_or(0, |v| v.value());
        let folded = get("last_seq")?;
        let mut last_seq = folded;
        // The table as of the last checkpoint, keyed as stored...
        let mut maps: std::collections::BTreeMap<Vec<u8>, Vec<u8>> = Default::default();
        let table = txn.open_table(MAPPINGS).map_err(|e| damaged(path, e))?;
        for item in table.iter().map_err(|e| damaged(path, e))? {
            let (k, v) = item.map_err(|e| damaged(path, e))?;
            maps.insert(k.value().to_vec(), v.value().to_vec());
        }
        let mut subs_map: std::collections::BTreeMap<Vec<u8>, u64> = Default::default();
        let subs = txn.open_table(SUBSCRIBERS).map_err(|e| damaged(path, e))?;
        for item in subs.iter().map_err(|e| damaged(path, e))? {
            let (k, v) = item.map_err(|e| damaged(path, e))?;
            subs_map.insert(k.value().to_vec(), v.value());
        }
        let mut owed_map: std::collections::BTreeMap<Vec<u8>, Vec<u8>> = optional_rows(&txn, OWED)
            .map_err(|e| damaged(path, e))?
            .into_iter()
            .collect();
        let mut requesters_map: std::collections::BTreeMap<Vec<u8>, Vec<u8>> =
            optional_rows(&txn, REQUESTERS)
                .map_err(|e| damaged(path, e))?
                .into_iter()
                .collect();
        let mut holds_map: std::collections::BTreeMap<Vec<u8>, Vec<u8>> =
            optional_rows(&txn, HOLDS)
                .map_err(|e| damaged(path, e))?
                .into_iter()
                .collect();
        let mut replay = |entry: LogEntry| match entry {
            LogEntry::Upsert { key, value } => {
                maps.insert(key, value);
            }
            LogEntry::Remove { key } => {
                maps.remove(&key);
            }
            LogEntry::Epoch { sub, anchor } => {
                subs_map.insert(sub, anchor);
            }
            LogEntry::ServerEpoch { anchor: a } => {
                anchor = Timestamp(a);
                subs_map.clear();
            }
            LogEntry::Owed { sub, value } => {
                if value.len() > 8 {
                    owed_map.insert(sub, value);
                } else {
                    owed_map.remove(&sub);
                }
            }
            LogEntry::Requester { ip, value } => {
                if value.is_empty() {
                    requesters_map.remove(&ip);
                } else {
                    requesters_map.insert(ip, value);
                }
            }
            LogEntry::Hold { key, value } => {
                holds_map.insert(key, value);
            }
        };
        // ...then every change logged since, in order: format 1's log
        // table (empty in format 2)...
        let log_table = txn.open_table(LOG).map_err(|e| damaged(path, e))?;
        for item in log_table.iter().map_err(|e| damaged(path, e))? {
            let (k, v) = item.map_err(|e| damaged(path, e))?;
            let entry = decode_log(v.value())
                .ok_or_else(|| damaged(path, "a log entry does not decode"))?;
            replay(entry);
            last_seq = last_seq.max(k.value());
        }
        // ...and the write-ahead log past what the tables hold.
        let (wal, records) = Wal::open(
            log,
            generation,
            options.segment_bytes,
            options.retention_bytes,
        )
        .map_err(|e| wal_error(path, e))?;
        let mut pending = std::collections::VecDeque::new();
        for (seq, bytes) in records {
            if seq <= folded {
                continue;
            }
            let entry = decode_log(&bytes)
                .ok_or_else(|| damaged(path, format!("log entry {seq} does not decode")))?;
            replay(entry);
            last_seq = seq;
            pending.push_back((seq, bytes));
        }
        let mut mappings = Vec::with_capacity(maps.len());
        for (k, v) in &maps {
            let m = decode_mapping(v, keying).ok_or_else(|| {
                damaged(
                    path,
                    format!("mapping record {} does not decode", hex::encode(k)),
                )
            })?;
            if key_of(&m) != *k {
                return Err(damaged(path, "a mapping is stored under the wrong key"));
            }
            mappings.push(m);
        }
        let mut subscriber_anchors = Vec::new();
        for (k, v) in &subs_map {
            let sub = decode_subscriber(k)
                .ok_or_else(|| damaged(path, "a subscriber anchor does not decode"))?;
            subscriber_anchors.push((sub, Timestamp(*v)));
        }
        let mut owed = Vec::with_capacity(owed_map.len());
        for (k, v) in &owed_map {
            let bad = || damaged(path, "a record of hosts owed an ANNOUNCE does not decode");
            let sub = decode_subscriber(k).ok_or_else(bad)?;
            let (hosts, until) = decode_owed(v).ok_or_else(bad)?;
            owed.push((sub, hosts, until));
        }
        let mut requesters = Vec::with_capacity(requesters_map.len());
        for (k, v) in &requesters_map {
            let bad = || damaged(path, "a THIRD_PARTY requester's record does not decode");
            let ip = Reader(k).ip().ok_or_else(bad)?;
            requesters.push((ip, decode_requester(v).ok_or_else(bad)?));
        }
        let mut holds = Vec::with_capacity(holds_map.len());
        for (k, v) in &holds_map {
            let bad = || damaged(path, "a record of a held external port does not decode");
            holds.push(decode_hold(k, v).ok_or_else(bad)?);
        }
        drop((meta, table, subs, log_table, txn));
        let restored = Restored {
            anchor,
            subscriber_anchors,
            mappings,
            last_seq,
            term: served_term,
            owed,
            requesters,
            holds,
        };
        let mut store = Store {
            db,
            path: path.to_owned(),
            durability,
            dirty: false,
            last_durable: now,
            log_len: pending.len() as u64,
            wal,
            pending,
            folded,
            tables_dirty: false,
            keying: keying.clone(),
            lost_unknown,
        };
        if format == FORMAT_LOG_TABLE {
            // Written once in this release's layout: from now on the
            // tables and the write-ahead log hold it.
            store.replace(&restored)?;
            tracing::info!(
                "store {} converted from format {FORMAT_LOG_TABLE} to format {FORMAT}",
                path.display()
            );
        }
        Ok((store, Opened::Restored(restored)))
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes a batch of changes to the log. In durable mode they are on
    /// disk when this returns (one `fdatasync`); in relaxed mode at most
    /// about a second later (`now` drives that).
    pub fn write(&mut self, changes: &[ChangeRecord], now: Timestamp) -> Result<(), StoreError> {
        if changes.is_empty() && !self.dirty {
            return Ok(());
        }
        let durable = match self.durability {
            Durability::Durable => true,
            Durability::Relaxed => now.as_millis() >= self.last_durable.as_millis() + 1000,
        };
        let first = self.pending.len();
        for c in changes {
            let mut buf = Vec::with_capacity(128);
            encode_log(&c.change, &mut buf);
            self.pending.push_back((c.seq, buf));
        }
        let appended = self
            .wal
            .append(self.pending.range(first..).map(|(s, b)| (*s, b.as_slice())))
            .and_then(|()| if durable { self.wal.sync() } else { Ok(()) });
        if let Err(e) = appended {
            // Never retried: after a failed fsync what reached the disk is
            // unknown (the daemon stops).
            self.pending.truncate(first);
            return Err(io(&self.path, e));
        }
        self.log_len += changes.len() as u64;
        if durable {
            self.dirty = false;
            self.last_durable = now;
        } else {
            self.dirty = true;
        }
        Ok(())
    }

    /// Entries logged and not yet folded into the tables.
    pub fn log_len(&self) -> u64 {
        self.log_len
    }

    /// Whether a checkpoint should run even though work is waiting.
    pub fn checkpoint_due(&self) -> bool {
        self.log_len >= LOG_BOUND
    }

    /// Folds the oldest part of the log into the tables (see the module
    /// documentation), and makes the next log segment ahead of need.
    /// Returns the number of log entries folded.
    pub fn checkpoint(&mut self, max_entries: usize) -> Result<usize, StoreError> {
        let p = self.path.clone();
        let e = |err: &dyn std::fmt::Display| io(&p, err);
        self.wal.prepare().map_err(|x| e(&x))?;
        if self.pending.is_empty() {
            return Ok(0);
        }
        let n = max_entries.min(self.pending.len());
        let upto = self.pending[n - 1].0;
        // Durable only when it lets a log segment go: until then the log
        // holds what a lost commit of the tables would take.
        let durable = self.wal.releasable(upto);
        let mut txn = self.db.begin_write().map_err(|x| e(&x))?;
        txn.set_durability(if durable {
            redb::Durability::Immediate
        } else {
            redb::Durability::None
        })
        .map_err(|x| e(&x))?;
        txn.set_quick_repair(true);
        {
            // Latest change per mapping within the chunk, in log order
            // otherwise (epoch changes are few and applied as they come).
            let mut latest: std::collections::HashMap<&[u8], Option<&[u8]>> = Default::default();
            let mut epochs = Vec::new();
            let mut decoded = Vec::with_capacity(n);
            for (seq, bytes) in self.pending.range(..n) {
                let entry = decode_log(bytes)
                    .ok_or_else(|| damaged(&p, format!("log entry {seq} does not decode")))?;
                decoded.push(entry);
            }
            for entry in &decoded {
                match entry {
                    LogEntry::Upsert { key, value } => {
                        latest.insert(key, Some(value));
                    }
                    LogEntry::Remove { key } => {
                        latest.insert(key, None);
                    }
                    other => {
                        // An epoch change orders against mappings only
                        // through the log; applying mappings first is safe
                        // because the two never touch the same rows.
                        epochs.push(other);
                    }
                }
            }
            let mut maps = txn.open_table(MAPPINGS).map_err(|x| e(&x))?;
            for (key, value) in &latest {
                match value {
                    Some(v) => {
                        maps.insert(*key, *v).map_err(|x| e(&x))?;
                    }
                    None => {
                        maps.remove(*key).map_err(|x| e(&x))?;
                    }
                }
            }
            let mut subs = txn.open_table(SUBSCRIBERS).map_err(|x| e(&x))?;
            let mut meta = txn.open_table(META).map_err(|x| e(&x))?;
            let mut owed = txn.open_table(OWED).map_err(|x| e(&x))?;
            let mut requesters = txn.open_table(REQUESTERS).map_err(|x| e(&x))?;
            let mut holds = txn.open_table(HOLDS).map_err(|x| e(&x))?;
            for ep in epochs {
                match ep {
                    LogEntry::Hold { key, value } => {
                        holds
                            .insert(key.as_slice(), value.as_slice())
                            .map_err(|x| e(&x))?;
                    }
                    LogEntry::Requester { ip, value } if value.is_empty() => {
                        requesters.remove(ip.as_slice()).map_err(|x| e(&x))?;
                    }
                    LogEntry::Requester { ip, value } => {
                        requesters
                            .insert(ip.as_slice(), value.as_slice())
                            .map_err(|x| e(&x))?;
                    }
                    LogEntry::Owed { sub, value } if value.len() > 8 => {
                        owed.insert(sub.as_slice(), value.as_slice())
                            .map_err(|x| e(&x))?;
                    }
                    LogEntry::Owed { sub, .. } => {
                        owed.remove(sub.as_slice()).map_err(|x| e(&x))?;
                    }
                    LogEntry::Epoch { sub, anchor } => {
                        subs.insert(sub.as_slice(), *anchor).map_err(|x| e(&x))?;
                    }
                    LogEntry::ServerEpoch { anchor } => {
                        meta.insert("anchor", *anchor).map_err(|x| e(&x))?;
                        subs.retain(|_, _| false).map_err(|x| e(&x))?;
                    }
                    LogEntry::Upsert { .. } | LogEntry::Remove { .. } => {}
                }
            }
            meta.insert("last_seq", upto).map_err(|x| e(&x))?;
        }
        txn.commit().map_err(|x| e(&x))?;
        self.pending.drain(..n);
        self.log_len = self.pending.len() as u64;
        self.folded = upto;
        if durable {
            self.tables_dirty = false;
            self.wal.release(upto).map_err(|x| e(&x))?;
        } else {
            self.tables_dirty = true;
        }
        Ok(n)
    }

    /// Every change from log position `from` on, in order, as the log
    /// holds them; `None` when the log no longer reaches back to `from`
    /// (what is older lives only in the tables).
    pub fn read_log(&self, from: u64) -> Result<Option<Vec<(u64, Logged)>>, StoreError> {
        let Some(records) = self
            .wal
            .read_from(from)
            .map_err(|e| wal_error(&self.path, e))?
        else {
            return Ok(None);
        };
        let mut out = Vec::with_capacity(records.len());
        for (seq, bytes) in records {
            let bad = || damaged(&self.path, format!("log entry {seq} does not decode"));
            let logged = match decode_log(&bytes).ok_or_else(bad)? {
                LogEntry::Upsert { value, .. } => {
                    Logged::Upsert(decode_mapping(&value, &self.keying).ok_or_else(bad)?)
                }
                LogEntry::Remove { key } => Logged::Remove(key),
                LogEntry::Epoch { sub, anchor } => Logged::Epoch {
                    subscriber: decode_subscriber(&sub).ok_or_else(bad)?,
                    anchor: Timestamp(anchor),
                },
                LogEntry::ServerEpoch { anchor } => Logged::ServerEpoch {
                    anchor: Timestamp(anchor),
                },
                LogEntry::Owed { sub, value } => {
                    let (hosts, until) = decode_owed(&value).ok_or_else(bad)?;
                    Logged::AnnounceOwed {
                        subscriber: decode_subscriber(&sub).ok_or_else(bad)?,
                        hosts,
                        until,
                    }
                }
                LogEntry::Requester { ip, value } => Logged::Requester {
                    ip: Reader(&ip).ip().ok_or_else(bad)?,
                    state: if value.is_empty() {
                        None
                    } else {
                        Some(decode_requester(&value).ok_or_else(bad)?)
                    },
                },
                LogEntry::Hold { key, value } => {
                    Logged::PortHeld(decode_hold(&key, &value).ok_or_else(bad)?)
                }
            };
            out.push((seq, logged));
        }
        Ok(Some(out))
    }

    /// Replaces everything stored with `state`, durably, in one
    /// transaction: a promoted backup's store becomes the state it took
    /// over (sequence numbers and all), and a demoted node's store forgets
    /// what is no longer true. The log starts a new generation, so nothing
    /// logged before is ever replayed into the new state.
    pub fn replace(&mut self, state: &Restored) -> Result<(), StoreError> {
        let p = self.path.clone();
        let e = |err: &dyn std::fmt::Display| io(&p, err);
        let generation = self.wal.generation().wrapping_add(1);
        let mut txn = self.db.begin_write().map_err(|x| e(&x))?;
        txn.set_durability(redb::Durability::Immediate)
            .map_err(|x| e(&x))?;
        txn.set_quick_repair(true);
        {
            let mut log = txn.open_table(LOG).map_err(|x| e(&x))?;
            log.retain(|_, _| false).map_err(|x| e(&x))?;
            let mut maps = txn.open_table(MAPPINGS).map_err(|x| e(&x))?;
            maps.retain(|_, _| false).map_err(|x| e(&x))?;
            let mut entries: Vec<(Vec<u8>, Vec<u8>)> = state
                .mappings
                .iter()
                .map(|m| (key_of(m), encode_mapping(m)))
                .collect();
            // Sorted keys insert fastest into the B-tree.
            entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            for (k, v) in &entries {
                maps.insert(k.as_slice(), v.as_slice()).map_err(|x| e(&x))?;
            }
            let mut subs = txn.open_table(SUBSCRIBERS).map_err(|x| e(&x))?;
            subs.retain(|_, _| false).map_err(|x| e(&x))?;
            for (sub, anchor) in &state.subscriber_anchors {
                subs.insert(encode_subscriber(sub).as_slice(), anchor.as_millis())
                    .map_err(|x| e(&x))?;
            }
            let mut owed = txn.open_table(OWED).map_err(|x| e(&x))?;
            owed.retain(|_, _| false).map_err(|x| e(&x))?;
            for (sub, hosts, until) in &state.owed {
                let mut v = Vec::new();
                encode_owed(hosts, *until, &mut v);
                owed.insert(encode_subscriber(sub).as_slice(), v.as_slice())
                    .map_err(|x| e(&x))?;
            }
            let mut requesters = txn.open_table(REQUESTERS).map_err(|x| e(&x))?;
            requesters.retain(|_, _| false).map_err(|x| e(&x))?;
            for (ip, st) in &state.requesters {
                requesters
                    .insert(
                        portkeep_proto::addr::to_wire(*ip).octets().as_slice(),
                        encode_requester(st).as_slice(),
                    )
                    .map_err(|x| e(&x))?;
            }
            let mut holds = txn.open_table(HOLDS).map_err(|x| e(&x))?;
            holds.retain(|_, _| false).map_err(|x| e(&x))?;
            for h in &state.holds {
                holds
                    .insert(hold_key(h).as_slice(), encode_hold(h).as_slice())
                    .map_err(|x| e(&x))?;
            }
            let mut meta = txn.open_table(META).map_err(|x| e(&x))?;
            meta.insert("format", FORMAT).map_err(|x| e(&x))?;
            meta.insert("anchor", state.anchor.as_millis())
                .map_err(|x| e(&x))?;
            meta.insert("last_seq", state.last_seq).map_err(|x| e(&x))?;
            meta.insert("term", state.term).map_err(|x| e(&x))?;
            meta.insert("log_generation", u64::from(generation))
                .map_err(|x| e(&x))?;
        }
        txn.commit().map_err(|x| e(&x))?;
        // Committed: the old generation's segments are garbage now (a
        // crash before they go leaves them to the next open, which
        // removes them).
        self.wal.reset(generation).map_err(|x| e(&x))?;
        self.pending.clear();
        self.log_len = 0;
        self.folded = state.last_seq;
        self.tables_dirty = false;
        self.dirty = false;
        Ok(())
    }

    /// Whether acknowledged changes may be missing from what was read: the
    /// store was last served in relaxed mode and its server did not stop
    /// cleanly, so up to a second of commits may never have reached the
    /// disk. Which clients lost state then cannot be named; the server
    /// resets every epoch (failure-scenarios draft section 2.6.1).
    pub fn lost_unknown(&self) -> bool {
        self.lost_unknown
    }

    /// Records, durably, how the store is served from now on (after what
    /// was read, and any reset that followed, is durable): in relaxed
    /// mode, that an unclean stop may lose acknowledged changes, until
    /// [`Store::close`] says otherwise.
    pub fn mark_serving(&mut self, now: Timestamp) -> Result<(), StoreError> {
        self.flush(now)?;
        self.set_unclean(self.durability == Durability::Relaxed)?;
        self.lost_unknown = false;
        Ok(())
    }

    /// A clean stop: everything committed is made durable, and a relaxed
    /// store is marked as having lost nothing.
    pub fn close(&mut self, now: Timestamp) -> Result<(), StoreError> {
        self.flush(now)?;
        if self.durability == Durability::Relaxed {
            self.set_unclean(false)?;
        }
        Ok(())
    }

    fn set_unclean(&mut self, on: bool) -> Result<(), StoreError> {
        let p = self.path.clone();
        let e = |err: &dyn std::fmt::Display| io(&p, err);
        let mut txn = self.db.begin_write().map_err(|x| e(&x))?;
        txn.set_durability(redb::Durability::Immediate)
            .map_err(|x| e(&x))?;
        txn.open_table(META)
            .map_err(|x| e(&x))?
            .insert(UNCLEAN, u64::from(on))
            .map_err(|x| e(&x))?;
        txn.commit().map_err(|x| e(&x))?;
        Ok(())
    }

    /// Relaxed mode: makes everything committed so far durable.
    pub fn flush(&mut self, now: Timestamp) -> Result<(), StoreError> {
        if !self.dirty {
            return Ok(());
        }
        self.last_durable = Timestamp(0);
        self.write(&[], now)
    }

    /// Relaxed mode: whether a flush is due.
    pub fn flush_due(&self, now: Timestamp) -> bool {
        self.dirty && now.as_millis() >= self.last_durable.as_millis() + 1000
    }
}

/// A table's rows, key and value.
pub(crate) type Rows = Vec<(Vec<u8>, Vec<u8>)>;

/// Every row of `table`, none if the file was written before the table
/// existed.
pub(crate) fn optional_rows(
    txn: &redb::ReadTransaction,
    table: TableDefinition<&[u8], &[u8]>,
) -> Result<Rows, redb::Error> {
    let t = match txn.open_table(table) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut rows = Vec::new();
    for item in t.iter()? {
        let (k, v) = item?;
        rows.push((k.value().to_vec(), v.value().to_vec()));
    }
    Ok(rows)
}

/// One decoded log entry.
enum LogEntry {
    Upsert {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Remove {
        key: Vec<u8>,
    },
    Epoch {
        sub: Vec<u8>,
        anchor: u64,
    },
    ServerEpoch {
        anchor: u64,
    },
    /// `value` as the owed table stores it ([`encode_owed`]).
    Owed {
        sub: Vec<u8>,
        value: Vec<u8>,
    },
    /// `value` as the requesters table stores it; empty: forgotten.
    Requester {
        ip: Vec<u8>,
        value: Vec<u8>,
    },
    /// A hold's key and value as the holds table stores them.
    Hold {
        key: Vec<u8>,
        value: Vec<u8>,
    },
}

/// Until when, then the hosts, 16 octets each.
fn encode_owed(hosts: &[std::net::IpAddr], until: Timestamp, out: &mut Vec<u8>) {
    out.extend_from_slice(&until.as_millis().to_be_bytes());
    for h in hosts {
        out.extend_from_slice(&portkeep_proto::addr::to_wire(*h).octets());
    }
}

fn decode_owed(b: &[u8]) -> Option<(Vec<std::net::IpAddr>, Timestamp)> {
    let mut r = Reader(b);
    let until = Timestamp(r.u64()?);
    let mut hosts = Vec::with_capacity(r.0.len() / 16);
    while !r.0.is_empty() {
        hosts.push(r.ip()?);
    }
    Some((hosts, until))
}

fn encode_log(change: &Change, out: &mut Vec<u8>) {
    out.clear();
    match change {
        Change::Upserted(m) => {
            out.push(LOG_UPSERT);
            let key = key_of(m);
            out.push(key.len() as u8);
            out.extend_from_slice(&key);
            out.extend_from_slice(&encode_mapping(m));
        }
        Change::Removed { mapping, .. } => {
            out.push(LOG_REMOVE);
            out.extend_from_slice(&key_of(mapping));
        }
        Change::EpochReset { subscriber, anchor } => {
            out.push(LOG_EPOCH);
            out.extend_from_slice(&anchor.as_millis().to_be_bytes());
            out.extend_from_slice(&encode_subscriber(subscriber));
        }
        Change::ServerEpochReset { anchor } => {
            out.push(LOG_SERVER_EPOCH);
            out.extend_from_slice(&anchor.as_millis().to_be_bytes());
        }
        Change::AnnounceOwed {
            subscriber,
            hosts,
            until,
        } => {
            out.push(LOG_OWED);
            out.extend_from_slice(&encode_subscriber(subscriber));
            encode_owed(hosts, *until, out);
        }
        Change::Requester { ip, state } => {
            out.push(LOG_REQUESTER);
            out.extend_from_slice(&portkeep_proto::addr::to_wire(*ip).octets());
            if let Some(st) = state {
                out.extend_from_slice(&encode_requester(st));
            }
        }
        Change::PortHeld(h) => {
            out.push(LOG_HOLD);
            out.extend_from_slice(&hold_key(h));
            out.extend_from_slice(&encode_hold(h));
        }
    }
}

fn decode_log(b: &[u8]) -> Option<LogEntry> {
    let mut r = Reader(b);
    Some(match r.u8()? {
        LOG_UPSERT => {
            let n = usize::from(r.u8()?);
            let key = r.take(n)?.to_vec();
            LogEntry::Upsert {
                key,
                value: r.0.to_vec(),
            }
        }
        LOG_REMOVE => LogEntry::Remove { key: r.0.to_vec() },
        LOG_EPOCH => {
            let anchor = r.u64()?;
            LogEntry::Epoch {
                sub: r.0.to_vec(),
                anchor,
            }
        }
        LOG_SERVER_EPOCH => {
            let anchor = r.u64()?;
            if !r.0.is_empty() {
                return None;
            }
            LogEntry::ServerEpoch { anchor }
        }
        LOG_OWED => {
            // A subscriber is 16 address octets and a prefix length.
            let sub = r.take(17)?.to_vec();
            let value = r.0.to_vec();
            decode_owed(&value)?;
            LogEntry::Owed { sub, value }
        }
        LOG_REQUESTER => {
            let ip = r.take(16)?.to_vec();
            let value = r.0.to_vec();
            if !value.is_empty() {
                decode_requester(&value)?;
            }
            LogEntry::Requester { ip, value }
        }
        LOG_HOLD => {
            let key = r.take(19)?.to_vec();
            let value = r.0.to_vec();
            decode_hold(&key, &value)?;
            LogEntry::Hold { key, value }
        }
        _ => return None,
    })
}

/// A disk model for the tests of the redb files (the store, the backup's
/// replica).
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod faulty_disk {
    /// A disk under redb that keeps what was synced apart from what was
    /// only written, so a test can crash it the ways a machine can: every
    /// write not yet synced lost, the last one torn, or any subset of them
    /// reaching the platter in any order; and fail its syncs (EIO). `kill
    /// -9` keeps the page cache, so only this shows that each
    /// acknowledged commit was synced.
    #[derive(Debug, Clone, Default)]
    pub(crate) struct FaultyDisk(std::sync::Arc<std::sync::Mutex<DiskState>>);

    #[derive(Debug, Default)]
    pub(crate) struct DiskState {
        pub(crate) synced: Vec<u8>,
        pub(crate) current: Vec<u8>,
        unsynced: Vec<DiskOp>,
        pub(crate) fail_syncs: bool,
    }

    #[derive(Debug, Clone)]
    enum DiskOp {
        Write(u64, Vec<u8>),
        SetLen(u64),
    }

    fn apply(img: &mut Vec<u8>, op: &DiskOp) {
        match op {
            DiskOp::Write(off, data) => {
                let off = *off as usize;
                if img.len() < off + data.len() {
                    img.resize(off + data.len(), 0);
                }
                img[off..off + data.len()].copy_from_slice(data);
            }
            DiskOp::SetLen(len) => img.resize(*len as usize, 0),
        }
    }

    /// How the machine went down.
    #[derive(Debug, Clone, Copy)]
    pub(crate) enum Crash {
        /// Nothing written since the last sync reached the disk.
        DropUnsynced,
        /// Everything but the last write did; of that one, only its first
        /// sectors.
        TearLast,
        /// Each write since the last sync reached the disk or not (seeded).
        SomeUnsynced(u64),
    }

    /// The same crash of the machine, for the write-ahead log beside it.
    impl From<Crash> for crate::wal::mem::Crash {
        fn from(how: Crash) -> Self {
            match how {
                Crash::DropUnsynced => Self::DropUnsynced,
                Crash::TearLast => Self::TearLast,
                Crash::SomeUnsynced(s) => Self::SomeUnsynced(s),
            }
        }
    }

    impl FaultyDisk {
        pub(crate) fn state(&self) -> std::sync::MutexGuard<'_, DiskState> {
            self.0.lock().unwrap()
        }

        /// The disk a restart finds.
        pub(crate) fn crash(&self, how: Crash) -> FaultyDisk {
            let st = self.state();
            let mut img = st.synced.clone();
            match how {
                Crash::DropUnsynced => {}
                Crash::TearLast => {
                    if let Some((last, rest)) = st.unsynced.split_last() {
                        for op in rest {
                            apply(&mut img, op);
                        }
                        match last {
                            DiskOp::Write(off, data) => {
                                let sectors = data.len() / 512;
                                let keep = (sectors / 2).max(usize::from(sectors == 0)) * 512;
                                apply(
                                    &mut img,
                                    &DiskOp::Write(*off, data[..keep.min(data.len())].to_vec()),
                                );
                            }
                            op => apply(&mut img, op),
                        }
                    }
                }
                Crash::SomeUnsynced(seed) => {
                    let mut x = seed | 1;
                    for op in &st.unsynced {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        if x & 1 == 0 {
                            apply(&mut img, op);
                        }
                    }
                }
            }
            FaultyDisk(std::sync::Arc::new(std::sync::Mutex::new(DiskState {
                synced: img.clone(),
                current: img,
                ..DiskState::default()
            })))
        }
    }

    impl redb::StorageBackend for FaultyDisk {
        fn len(&self) -> std::io::Result<u64> {
            Ok(self.state().current.len() as u64)
        }

        fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
            let st = self.state();
            let off = offset as usize;
            let src = st
                .current
                .get(off..off + out.len())
                .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
            out.copy_from_slice(src);
            Ok(())
        }

        fn set_len(&self, len: u64) -> std::io::Result<()> {
            let mut st = self.state();
            let op = DiskOp::SetLen(len);
            apply(&mut st.current, &op);
            st.unsynced.push(op);
            Ok(())
        }

        fn sync_data(&self) -> std::io::Result<()> {
            let mut st = self.state();
            if st.fail_syncs {
                // Linux may drop the dirty pages of a failed fsync: what
                // was written is in no known state, and nothing more
                // reaches the disk.
                return Err(std::io::Error::other("injected EIO on fsync"));
            }
            st.synced = st.current.clone();
            st.unsynced.clear();
            Ok(())
        }

        fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            let mut st = self.state();
            let op = DiskOp::Write(offset, data.to_vec());
            apply(&mut st.current, &op);
            st.unsynced.push(op);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::faulty_disk::{Crash, FaultyDisk};
    use super::*;
    use crate::wal::mem::{Crash as LogCrash, MemDir};
    use portkeep_proto::Protocol;
    use portkeep_server::{FilterRule, MappingKey, MappingKind, MappingRecord, SubscriberId};
    use std::net::{IpAddr, SocketAddr};

    /// A durable store with a small cache and default keying.
    fn open_test_store(path: &Path, now: Timestamp) -> Result<(Store, Opened), StoreError> {
        Store::open(
            path,
            Durability::Durable,
            Recovery::Fail,
            1 << 20,
            now,
            &SubscriberKeying::default(),
        )
    }

    fn record(peer: bool) -> MappingRecord {
        let k = SubscriberKeying::default();
        MappingRecord {
            kind: if peer {
                MappingKind::Peer {
                    remote: "[2001:db8::9]:443".parse().unwrap(),
                }
            } else {
                MappingKind::Map
            },
            key: MappingKey {
                internal_ip: "198.51.100.7".parse().unwrap(),
                protocol: Protocol::TCP,
                internal_port: 8080,
            },
            external: "192.0.2.1:30000".parse().unwrap(),
            nonce: [7; 12],
            expires: Timestamp(1_700_000_123_456),
            lifetime: 3600,
            checkpoint: true,
            filters: vec![FilterRule {
                prefix: "203.0.113.0/24".parse().unwrap(),
                port: 443,
            }],
            description: Some("web ✓".into()),
            subscriber: k.subscriber_of("198.51.100.7".parse().unwrap()),
            third_party: true,
            followed: false,
            manager: None,
        }
    }

    #[test]
    fn records_round_trip() {
        let k = SubscriberKeying::default();
        for peer in [false, true] {
            let m = record(peer);
            assert_eq!(decode_mapping(&encode_mapping(&m), &k), Some(m));
        }
        let mut plain = record(false);
        plain.filters.clear();
        plain.description = None;
        plain.checkpoint = false;
        assert_eq!(
            decode_mapping(&encode_mapping(&plain), &k),
            Some(plain.clone())
        );
        // Followed by the backup after losing its flag: kept across a
        // restart (a flag bit, clear in records written before it).
        let mut followed = plain;
        followed.followed = true;
        assert_eq!(
            decode_mapping(&encode_mapping(&followed), &k),
            Some(followed.clone())
        );
        // Made with THIRD_PARTY by a client the record names (record
        // version 2); records without one stay version 1.
        let mut managed = followed.clone();
        managed.manager = Some("2001:db8::1:1".parse().unwrap());
        let bytes = encode_mapping(&managed);
        assert_eq!(bytes[0], portkeep_server::record::RECORD_VERSION_MANAGER);
        assert_eq!(decode_mapping(&bytes, &k), Some(managed));
        assert_eq!(
            encode_mapping(&followed)[0],
            portkeep_server::record::RECORD_VERSION
        );
        let sub = SubscriberId::from_parts("2001:db8:0:100::".parse().unwrap(), 56);
        assert_eq!(decode_subscriber(&encode_subscriber(&sub)), Some(sub));
    }

    /// What a reopened store must contain, computed independently.
    #[derive(Default, PartialEq, Debug)]
    struct Model {
        anchor: u64,
        maps: std::collections::BTreeMap<Vec<u8>, MappingRecord>,
        subs: std::collections::BTreeMap<SubscriberId, u64>,
        owed: std::collections::BTreeMap<SubscriberId, (Vec<IpAddr>, u64)>,
        requesters: std::collections::BTreeMap<IpAddr, portkeep_server::RequesterState>,
        holds: std::collections::BTreeMap<[u8; 19], portkeep_server::PortHold>,
        last_seq: u64,
    }

    fn reopen(path: &Path) -> Model {
        let (_, opened) = open_test_store(path, Timestamp(5)).unwrap();
        let Opened::Restored(r) = opened else {
            panic!("fresh")
        };
        Model {
            anchor: r.anchor.as_millis(),
            maps: r.mappings.into_iter().map(|m| (key_of(&m), m)).collect(),
            subs: r
                .subscriber_anchors
                .into_iter()
                .map(|(s, a)| (s, a.as_millis()))
                .collect(),
            owed: r
                .owed
                .into_iter()
                .map(|(s, h, u)| (s, (h, u.as_millis())))
                .collect(),
            requesters: r.requesters.into_iter().collect(),
            holds: r.holds.into_iter().map(|h| (hold_key(&h), h)).collect(),
            last_seq: r.last_seq,
        }
    }

    /// Failure-scenarios draft section 2.6.1: a store served in relaxed
    /// mode says, when opened, whether its last server stopped without
    /// closing it (then acknowledged changes may be missing); a durable
    /// store never does.
    #[test]
    fn draft_s2_6_1_a_relaxed_store_tells_an_unclean_stop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.redb");
        let open = |d: Durability| {
            Store::open(
                &path,
                d,
                Recovery::Fail,
                1 << 20,
                Timestamp(1),
                &SubscriberKeying::default(),
            )
            .unwrap()
            .0
        };
        let mut s = open(Durability::Relaxed);
        assert!(!s.lost_unknown(), "a new store");
        s.mark_serving(Timestamp(1)).unwrap();
        drop(s);
        let mut s = open(Durability::Relaxed);
        assert!(s.lost_unknown(), "dropped without a clean stop");
        s.mark_serving(Timestamp(2)).unwrap();
        s.close(Timestamp(2)).unwrap();
        drop(s);
        let mut s = open(Durability::Relaxed);
        assert!(!s.lost_unknown(), "closed cleanly");
        s.mark_serving(Timestamp(3)).unwrap();
        drop(s);
        // Served durably after an unclean relaxed stop: told once, then
        // never again.
        let mut s = open(Durability::Durable);
        assert!(s.lost_unknown());
        s.mark_serving(Timestamp(4)).unwrap();
        drop(s);
        assert!(!open(Durability::Durable).lost_unknown());
    }

    /// Failure-scenarios draft section 2.6: what a node can vouch for
    /// after a double failure is its store's term and position; the term
    /// is the one the state was taken over in, kept across restarts.
    #[test]
    fn draft_s2_6_the_store_keeps_the_term_its_state_was_served_in() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.redb");
        let (mut store, opened) = open_test_store(&path, Timestamp(1)).unwrap();
        assert!(matches!(opened, Opened::Fresh { .. }));
        drop(store);
        let (s, Opened::Restored(r)) = open_test_store(&path, Timestamp(2)).unwrap() else {
            panic!("fresh")
        };
        assert_eq!(r.term, 0, "never taken over");
        store = s;
        store
            .replace(&Restored {
                anchor: Timestamp(3),
                subscriber_anchors: Vec::new(),
                mappings: vec![record(false)],
                last_seq: 40,
                term: 5,
                owed: Vec::new(),
                requesters: Vec::new(),
                holds: Vec::new(),
            })
            .unwrap();
        drop(store);
        let (_, Opened::Restored(r)) = open_test_store(&path, Timestamp(4)).unwrap() else {
            panic!("fresh")
        };
        assert_eq!((r.term, r.last_seq), (5, 40));
    }

    #[test]
    fn draft_s6_log_and_checkpoints_restore_exactly_what_was_written() {
        let k = SubscriberKeying::default();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let (mut store, _) = open_test_store(&path, Timestamp(1)).unwrap();
        let mut model = Model {
            anchor: 1,
            ..Model::default()
        };
        let mut rng = 0x1234_5678_u64;
        let mut next = |n: u64| {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (rng >> 33) % n
        };
        let mut seq = 0;
        for round in 0..40 {
            let mut batch = Vec::new();
            for _ in 0..1 + next(300) {
                seq += 1;
                let mut m = record(next(2) == 0);
                m.key.internal_port = next(500) as u16;
                m.expires = Timestamp(seq);
                if next(4) == 0 {
                    m.manager = Some(IpAddr::from([10, 1, 0, next(4) as u8]));
                }
                let change = match next(12) {
                    11 => {
                        // RFC 6887 section 15: one hold per endpoint, the
                        // latest standing.
                        let h = portkeep_server::PortHold {
                            owner: m.key,
                            nonce: m.nonce,
                            external: SocketAddr::new(m.external.ip(), 20_000 + next(50) as u16),
                            until: Timestamp(seq + 120_000),
                        };
                        model.holds.insert(hold_key(&h), h);
                        Change::PortHeld(h)
                    }
                    10 => {
                        let ip = IpAddr::from([10, 1, 0, next(4) as u8]);
                        let state = (next(3) != 0).then(|| portkeep_server::RequesterState {
                            port: 40_000 + next(100) as u16,
                            anchor: (next(2) == 0).then_some(Timestamp(seq)),
                            volatile_until: (next(2) == 0).then_some(Timestamp(seq + 60_000)),
                        });
                        match state {
                            Some(st) => model.requesters.insert(ip, st),
                            None => model.requesters.remove(&ip),
                        };
                        Change::Requester { ip, state }
                    }
                    0..=5 => {
                        model.maps.insert(key_of(&m), m.clone());
                        Change::Upserted(m)
                    }
                    6..=8 => {
                        model.maps.remove(&key_of(&m));
                        Change::Removed {
                            mapping: m,
                            reason: portkeep_server::RemoveReason::Deleted,
                        }
                    }
                    _ if next(4) == 0 => {
                        model.anchor = seq;
                        model.subs.clear();
                        Change::ServerEpochReset {
                            anchor: Timestamp(seq),
                        }
                    }
                    _ if next(2) == 0 => {
                        let sub = k.subscriber_of(IpAddr::from([198, 51, 100, next(8) as u8]));
                        model.subs.insert(sub, seq);
                        Change::EpochReset {
                            subscriber: sub,
                            anchor: Timestamp(seq),
                        }
                    }
                    _ => {
                        let host = IpAddr::from([198, 51, 100, next(8) as u8]);
                        let sub = k.subscriber_of(host);
                        let hosts = if next(3) == 0 { vec![] } else { vec![host] };
                        if hosts.is_empty() {
                            model.owed.remove(&sub);
                        } else {
                            model.owed.insert(sub, (hosts.clone(), seq));
                        }
                        Change::AnnounceOwed {
                            subscriber: sub,
                            hosts,
                            until: Timestamp(seq),
                        }
                    }
                };
                batch.push(ChangeRecord {
                    started: false,
                    seq,
                    change,
                });
            }
            model.last_seq = seq;
            store.write(&batch, Timestamp(round)).unwrap();
            if next(3) == 0 {
                store.checkpoint(1 + next(400) as usize).unwrap();
            }
            if round % 10 == 9 {
                drop(store);
                assert_eq!(reopen(&path), model, "after round {round}");
                let (s, _) = open_test_store(&path, Timestamp(1)).unwrap();
                store = s;
            }
        }
        while store.log_len() > 0 {
            store.checkpoint(100).unwrap();
        }
        drop(store);
        assert_eq!(reopen(&path), model, "fully checkpointed");
    }

    #[test]
    fn draft_s6_damaged_log_entry_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        {
            let (store, _) = open_test_store(&path, Timestamp(1)).unwrap();
            let txn = store.db.begin_write().unwrap();
            txn.open_table(LOG)
                .unwrap()
                .insert(7, [9u8, 9, 9].as_slice())
                .unwrap();
            txn.commit().unwrap();
        }
        let err = open_test_store(&path, Timestamp(1)).unwrap_err();
        assert!(matches!(err, StoreError::Damaged { .. }), "{err}");
        assert!(err.to_string().contains("--store-recovery=fresh"));
    }

    fn open_disk(disk: &FaultyDisk, log: &MemDir) -> Result<(Store, Opened), StoreError> {
        Store::open_on(
            disk.clone(),
            Box::new(log.clone()),
            Path::new("faulty-disk"),
            Durability::Durable,
            1 << 20,
            Timestamp(1),
            &SubscriberKeying::default(),
            LogOptions {
                segment_bytes: 64 << 10,
                retention_bytes: 64 << 10,
            },
        )
    }

    fn model_of(opened: Opened) -> std::collections::BTreeMap<Vec<u8>, MappingRecord> {
        match opened {
            Opened::Restored(r) => r.mappings.into_iter().map(|m| (key_of(&m), m)).collect(),
            Opened::Fresh { .. } => Default::default(),
        }
    }

    /// Failure-scenarios draft section 6 (state in stable storage), below
    /// the process: after each way a machine can go down, the store opens
    /// with every acknowledged commit and nothing half-applied (the state
    /// after some whole number of commits, no fewer than were
    /// acknowledged); a commit whose fsync failed is reported as failed.
    #[test]
    fn draft_s6_a_crash_below_the_process_loses_nothing_acknowledged() {
        let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let modes = |seed: u64| {
            [
                Crash::DropUnsynced,
                Crash::TearLast,
                Crash::SomeUnsynced(seed),
                Crash::SomeUnsynced(seed.wrapping_mul(31) + 7),
            ]
        };
        let mut crashes = 0;
        for trial in 0..12u64 {
            let disk = FaultyDisk::default();
            let log = MemDir::default();
            let (mut store, _) = open_disk(&disk, &log).unwrap();
            // The state after each commit: states[i] after i commits.
            let mut states = vec![std::collections::BTreeMap::new()];
            let mut state = std::collections::BTreeMap::new();
            let mut seq = 0;
            let rounds = 3 + next(12);
            let mut acknowledged = 0;
            for round in 0..rounds {
                let mut batch = Vec::new();
                for _ in 0..1 + next(60) {
                    seq += 1;
                    let mut m = record(next(2) == 0);
                    m.key.internal_port = next(200) as u16;
                    m.expires = Timestamp(seq);
                    let change = if next(4) == 0 {
                        state.remove(&key_of(&m));
                        Change::Removed {
                            mapping: m,
                            reason: portkeep_server::RemoveReason::Deleted,
                        }
                    } else {
                        state.insert(key_of(&m), m.clone());
                        Change::Upserted(m)
                    };
                    batch.push(ChangeRecord {
                        started: false,
                        seq,
                        change,
                    });
                }
                let last = round + 1 == rounds;
                // The last commit of some trials hits a failing disk.
                let failing = last && trial % 3 == 2;
                disk.state().fail_syncs = failing;
                log.fail_syncs(failing);
                let r = store.write(&batch, Timestamp(round));
                states.push(state.clone());
                if failing {
                    assert!(r.is_err(), "a failed fsync fails the commit");
                } else {
                    r.unwrap();
                    acknowledged = states.len() - 1;
                }
                // Checkpoints mostly commit without an fsync: their writes
                // are what a crash catches half-done; some let log
                // segments go.
                if !failing && next(2) == 0 {
                    store.checkpoint(1 + next(400) as usize).unwrap();
                }
            }
            for how in modes(trial) {
                let img = disk.crash(how);
                let log_img = log.crash(how.into());
                crashes += 1;
                let (_, opened) = open_disk(&img, &log_img)
                    .unwrap_or_else(|e| panic!("trial {trial}, {how:?}: {e}"));
                let got = model_of(opened);
                let whole = states.iter().position(|s| *s == got);
                assert!(
                    whole.is_some_and(|i| i >= acknowledged),
                    "trial {trial}, {how:?}: the store holds {} mappings, not the state                      after {acknowledged} or more whole commits",
                    got.len()
                );
            }
        }
        assert_eq!(crashes, 48);
    }

    /// A store written by the previous release (format 1: the log in a
    /// redb table, no write-ahead log) opens with everything in it, is
    /// rewritten as format 2 at once, and goes on from there: an upgrade
    /// needs no cold start (failure-scenarios draft section 6).
    #[test]
    fn draft_s6_a_store_of_the_previous_format_is_upgraded_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.redb");
        let mut a = record(false);
        a.key.internal_port = 1;
        let mut b = record(true);
        b.key.internal_port = 2;
        let mut c = record(false);
        c.key.internal_port = 3;
        let sub = a.subscriber;
        {
            // Format 1 as the previous release wrote it: a folded table,
            // then the log table on top.
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut meta = txn.open_table(META).unwrap();
                meta.insert("format", FORMAT_LOG_TABLE).unwrap();
                meta.insert("anchor", 1_000).unwrap();
                // Format 1 kept the last logged position here.
                meta.insert("last_seq", 5).unwrap();
                let mut maps = txn.open_table(MAPPINGS).unwrap();
                maps.insert(key_of(&a).as_slice(), encode_mapping(&a).as_slice())
                    .unwrap();
                maps.insert(key_of(&c).as_slice(), encode_mapping(&c).as_slice())
                    .unwrap();
                txn.open_table(SUBSCRIBERS).unwrap();
                let mut log = txn.open_table(LOG).unwrap();
                let mut buf = Vec::new();
                encode_log(&Change::Upserted(b.clone()), &mut buf);
                log.insert(3, buf.as_slice()).unwrap();
                encode_log(
                    &Change::Removed {
                        mapping: c.clone(),
                        reason: portkeep_server::RemoveReason::Deleted,
                    },
                    &mut buf,
                );
                log.insert(4, buf.as_slice()).unwrap();
                encode_log(
                    &Change::EpochReset {
                        subscriber: sub,
                        anchor: Timestamp(5_000),
                    },
                    &mut buf,
                );
                log.insert(5, buf.as_slice()).unwrap();
            }
            txn.commit().unwrap();
        }
        let expect = |r: &Restored| {
            let mut ports: Vec<u16> = r.mappings.iter().map(|m| m.key.internal_port).collect();
            ports.sort_unstable();
            assert_eq!(ports, vec![1, 2]);
            assert_eq!(r.anchor, Timestamp(1_000));
            assert_eq!(r.subscriber_anchors, vec![(sub, Timestamp(5_000))]);
            assert_eq!(r.last_seq, 5);
        };
        let (mut store, opened) = open_test_store(&path, Timestamp(9)).unwrap();
        let Opened::Restored(r) = opened else {
            panic!("the old store was not read");
        };
        expect(&r);
        let format = store
            .db
            .begin_read()
            .unwrap()
            .open_table(META)
            .unwrap()
            .get("format")
            .unwrap()
            .unwrap()
            .value();
        assert_eq!(format, FORMAT);
        // It goes on in the new format, through the log.
        let mut d = record(false);
        d.key.internal_port = 4;
        store
            .write(
                &[ChangeRecord {
                    started: false,
                    seq: 6,
                    change: Change::Upserted(d),
                }],
                Timestamp(10),
            )
            .unwrap();
        drop(store);
        let (_, opened) = open_test_store(&path, Timestamp(11)).unwrap();
        let Opened::Restored(r) = opened else {
            panic!("not restored");
        };
        assert_eq!(r.mappings.len(), 3);
        assert_eq!(r.last_seq, 6);
    }

    /// A disk that returns garbage where the store was (bit rot, a torn
    /// page no checksum caught in time) is refused as damaged or opens to
    /// a whole earlier state; it never panics and never half-loads.
    #[test]
    fn draft_s6_corrupted_disk_is_refused_never_half_loaded() {
        let disk = FaultyDisk::default();
        let log = MemDir::default();
        let (mut store, _) = open_disk(&disk, &log).unwrap();
        let mut states = vec![std::collections::BTreeMap::new()];
        let mut state = std::collections::BTreeMap::new();
        for round in 0..5u64 {
            let mut batch = Vec::new();
            for i in 0..20u64 {
                let mut m = record(false);
                m.key.internal_port = (round * 20 + i) as u16;
                state.insert(key_of(&m), m.clone());
                batch.push(ChangeRecord {
                    started: false,
                    seq: round * 20 + i + 1,
                    change: Change::Upserted(m),
                });
            }
            store.write(&batch, Timestamp(round)).unwrap();
            if round == 2 {
                // Part in the tables, part only in the log.
                store.checkpoint(30).unwrap();
            }
            states.push(state.clone());
        }
        drop(store);
        let len = disk.state().synced.len();
        let mut refused = 0;
        for i in 0..128usize {
            let img = disk.crash(Crash::DropUnsynced);
            let log_img = log.crash(LogCrash::DropUnsynced);
            if i % 2 == 0 {
                let mut st = img.state();
                let at = (i * 7919 * 4099) % len;
                st.synced[at] ^= 0x5a;
                st.current = st.synced.clone();
            } else {
                // The log's frames are in its first kilobytes.
                assert!(log_img.corrupt((i * 7919) % 6_000));
            }
            match open_disk(&img, &log_img) {
                Ok((_, opened)) => {
                    let got = model_of(opened);
                    assert!(
                        states.contains(&got),
                        "byte {i}: opened to a state no commit made"
                    );
                }
                Err(StoreError::Damaged { .. }) => refused += 1,
                Err(e) => panic!("byte {i}: {e}"),
            }
        }
        eprintln!("{refused} of 128 corrupted disks refused, the rest opened whole");
    }

    #[test]
    fn damaged_records_never_decode_or_panic() {
        let k = SubscriberKeying::default();
        let good = encode_mapping(&record(true));
        for cut in 0..good.len() {
            assert_eq!(decode_mapping(&good[..cut], &k), None, "cut at {cut}");
        }
        let mut longer = good.clone();
        longer.push(0);
        assert_eq!(decode_mapping(&longer, &k), None);
        for i in 0..good.len() {
            let mut b = good.clone();
            b[i] ^= 0xff;
            let _ = decode_mapping(&b, &k);
        }
    }
}
