//! The store's write-ahead log: checksummed frames appended to zero-filled
//! segment files, one `fdatasync` per group commit.
//!
//! Failure-scenarios draft section 6 asks for state in stable storage; the
//! cost of that is paid on every reply, so the critical path is one
//! sequential write and one `fdatasync` of a file whose size does not
//! change (segments are written full of zeros when created, not
//! fallocated: unwritten extents would turn every `fdatasync` into a
//! journal commit). The tables in redb are brought up to date from this
//! log later, off the critical path ([`crate::store`]).
//!
//! A frame is `magic, generation, length, CRC-32` then its records
//! (`seq`, length, entry) and padding to 8 octets. Each group commit writes
//! one frame per segment it touches and syncs before the next write, so at
//! a crash at most the last frame is incomplete. Reading stops at the first
//! frame that does not verify: if no valid frame follows it anywhere, it is
//! that torn tail (never acknowledged) and is cut off; if one does, the log
//! is damaged in the middle and is refused, never half-loaded.
//!
//! Segments of a log are numbered; the store's generation number is in
//! every segment's name and frame, so the segments of a state that was
//! replaced (a promotion, a demotion) are never replayed into the new one.
//! Segments already folded into the tables are kept up to a configured
//! size, readable by log position ([`Wal::read_from`]), for a backup's
//! resume.

use std::io;
use std::path::{Path, PathBuf};

const MAGIC: u32 = 0x504b_574c;
const HEADER: usize = 16;
const RECORD_HEADER: usize = 12;
const SUFFIX: &str = ".wal";

/// A segment file.
pub trait WalFile: Send {
    /// Reads up to `buf.len()` octets at `off` (fewer only at the end).
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize>;
    /// Writes all of `buf` at `off`.
    fn write_all_at(&mut self, buf: &[u8], off: u64) -> io::Result<()>;
    /// Makes what was written durable (`fdatasync`).
    fn sync_data(&mut self) -> io::Result<()>;
    /// The file's length.
    fn size(&self) -> io::Result<u64>;
}

/// The directory of segments.
pub trait WalDir: Send {
    /// The names in it.
    fn list(&self) -> io::Result<Vec<String>>;
    /// Creates `name`, `size` octets of zeros, durably (the file and its
    /// directory entry), in a way a crash cannot leave half-made.
    fn create(&mut self, name: &str, size: u64) -> io::Result<Box<dyn WalFile>>;
    /// Opens an existing segment for reading and writing.
    fn open(&mut self, name: &str) -> io::Result<Box<dyn WalFile>>;
    /// Removes `name`. Not synced: a segment that comes back after a crash
    /// is of an older generation, or holds only records already folded.
    fn remove(&mut self, name: &str) -> io::Result<()>;
    /// Where it is, for messages.
    fn label(&self) -> PathBuf;
}

/// Segments as files in a directory.
#[derive(Debug)]
pub struct FsDir {
    path: PathBuf,
}

impl FsDir {
    /// The directory at `path`, created if missing.
    pub fn open(path: &Path) -> io::Result<FsDir> {
        std::fs::create_dir_all(path)?;
        Ok(FsDir {
            path: path.to_owned(),
        })
    }

    fn sync_dir(&self) -> io::Result<()> {
        std::fs::File::open(&self.path)?.sync_all()
    }
}

struct FsFile(std::fs::File);

impl WalFile for FsFile {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let mut done = 0;
        while done < buf.len() {
            match self.0.read_at(&mut buf[done..], off + done as u64)? {
                0 => break,
                n => done += n,
            }
        }
        Ok(done)
    }

    fn write_all_at(&mut self, buf: &[u8], off: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.0.write_all_at(buf, off)
    }

    fn sync_data(&mut self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
}

impl WalDir for FsDir {
    fn list(&self) -> io::Result<Vec<String>> {
        let mut v = Vec::new();
        for e in std::fs::read_dir(&self.path)? {
            if let Some(n) = e?.file_name().to_str() {
                v.push(n.to_owned());
            }
        }
        Ok(v)
    }

    fn create(&mut self, name: &str, size: u64) -> io::Result<Box<dyn WalFile>> {
        use std::io::Write;
        // Zeros under a temporary name, synced, then renamed: a crash
        // leaves either no segment or a whole one.
        let tmp = self.path.join(format!("{name}.tmp"));
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        let zeros = vec![0u8; 1 << 20];
        let mut left = size;
        while left > 0 {
            let n = left.min(zeros.len() as u64) as usize;
            f.write_all(&zeros[..n])?;
            left -= n as u64;
        }
        f.sync_all()?;
        std::fs::rename(&tmp, self.path.join(name))?;
        self.sync_dir()?;
        Ok(Box::new(FsFile(f)))
    }

    fn open(&mut self, name: &str) -> io::Result<Box<dyn WalFile>> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.path.join(name))?;
        Ok(Box::new(FsFile(f)))
    }

    fn remove(&mut self, name: &str) -> io::Result<()> {
        std::fs::remove_file(self.path.join(name))
    }

    fn label(&self) -> PathBuf {
        self.path.clone()
    }
}

/// Removes every segment in `dir`: a new store starts with no log, whatever
/// an earlier one at the same place left.
pub fn wipe(dir: &mut dyn WalDir) -> io::Result<()> {
    for name in dir.list()? {
        if name.ends_with(SUFFIX) || name.ends_with(".tmp") {
            dir.remove(&name)?;
        }
    }
    Ok(())
}

/// Why a log cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// The log is inconsistent somewhere before its end.
    #[error("{0}")]
    Damaged(String),
    /// Reading or writing failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// One segment of the current generation.
struct Segment {
    index: u32,
    file: Box<dyn WalFile>,
    /// Positions of the first and last record in it.
    seqs: Option<(u64, u64)>,
    /// Where the next frame goes.
    head: u64,
    /// Written since its last sync.
    dirty: bool,
}

/// A record read back: its log position and the entry as appended.
pub type Record = (u64, Vec<u8>);

/// The log of one store.
pub struct Wal {
    dir: Box<dyn WalDir>,
    gen: u32,
    segment_size: u64,
    retention: u64,
    segments: Vec<Segment>,
    /// A zero-filled segment made ahead of need (see [`Wal::prepare`]).
    spare: Option<(u32, Box<dyn WalFile>)>,
    buf: Vec<u8>,
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wal")
            .field("dir", &self.dir.label())
            .field("gen", &self.gen)
            .field("segments", &self.segments.len())
            .finish()
    }
}

fn name_of(gen: u32, index: u32) -> String {
    format!("{gen:08x}-{index:08x}{SUFFIX}")
}

fn parse_name(name: &str) -> Option<(u32, u32)> {
    let stem = name.strip_suffix(SUFFIX)?;
    let (g, i) = stem.split_once('-')?;
    if g.len() != 8 || i.len() != 8 {
        return None;
    }
    Some((
        u32::from_str_radix(g, 16).ok()?,
        u32::from_str_radix(i, 16).ok()?,
    ))
}

fn pad8(n: usize) -> usize {
    n.div_ceil(8) * 8
}

fn crc(gen: u32, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&gen.to_le_bytes());
    h.update(&(payload.len() as u32).to_le_bytes());
    h.update(payload);
    h.finalize()
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// What a scan of one segment's octets found.
enum Scan {
    /// Frames up to `end`, then zeros.
    Clean { end: usize, records: Vec<Record> },
    /// Frames up to `end`, then a frame that does not verify.
    Bad { end: usize, records: Vec<Record> },
}

/// The frame at `at`, if one of generation `gen` verifies there: its
/// records and its padded length.
fn frame_at(img: &[u8], at: usize, gen: u32) -> Option<(Vec<Record>, usize)> {
    let head = img.get(at..at + HEADER)?;
    if u32_at(head, 0) != MAGIC || u32_at(head, 4) != gen {
        return None;
    }
    let len = u32_at(head, 8) as usize;
    let payload = img.get(at + HEADER..at + HEADER + len)?;
    if crc(gen, payload) != u32_at(head, 12) {
        return None;
    }
    let mut records = Vec::new();
    let mut p = 0;
    while p < payload.len() {
        let h = payload.get(p..p + RECORD_HEADER)?;
        let seq = u64_at(h, 0);
        let n = u32_at(h, 8) as usize;
        let entry = payload.get(p + RECORD_HEADER..p + RECORD_HEADER + n)?;
        records.push((seq, entry.to_vec()));
        p += RECORD_HEADER + n;
    }
    Some((records, pad8(HEADER + len)))
}

fn scan(img: &[u8], gen: u32) -> Scan {
    let mut at = 0;
    let mut records = Vec::new();
    while at + HEADER <= img.len() {
        if img[at..at + HEADER].iter().all(|&b| b == 0) {
            return Scan::Clean { end: at, records };
        }
        match frame_at(img, at, gen) {
            Some((mut r, len)) => {
                records.append(&mut r);
                at += len;
            }
            None => return Scan::Bad { end: at, records },
        }
    }
    Scan::Clean { end: at, records }
}

/// Whether a frame of `gen` verifies anywhere after `from`.
fn any_frame_after(img: &[u8], from: usize, gen: u32) -> bool {
    let mut at = pad8(from + 1);
    while at + HEADER <= img.len() {
        if u32_at(img, at) == MAGIC && frame_at(img, at, gen).is_some() {
            return true;
        }
        at += 8;
    }
    false
}

fn read_all(file: &dyn WalFile) -> io::Result<Vec<u8>> {
    let len = file.size()? as usize;
    let mut img = vec![0u8; len];
    let n = file.read_at(&mut img, 0)?;
    img.truncate(n);
    Ok(img)
}

impl Wal {
    /// Opens the log of generation `gen` in `dir`, with every record it
    /// holds in order. Segments of older generations are removed (their
    /// state was replaced); a newer one means the store file is older
    /// than its log, and is refused.
    pub fn open(
        mut dir: Box<dyn WalDir>,
        gen: u32,
        segment_size: u64,
        retention: u64,
    ) -> Result<(Wal, Vec<Record>), WalError> {
        let segment_size = segment_size.max(64 << 10);
        let label = dir.label();
        let mut mine = Vec::new();
        let mut stale = Vec::new();
        for name in dir.list()? {
            if name.ends_with(".tmp") {
                stale.push(name);
                continue;
            }
            match parse_name(&name) {
                Some((g, i)) if g == gen => mine.push(i),
                Some((g, _)) if g < gen => stale.push(name),
                Some((g, _)) => {
                    return Err(WalError::Damaged(format!(
                        "{} holds log generation {g}, newer than the store's {gen}: \
                         the store file is older than its log",
                        label.display()
                    )))
                }
                None => {}
            }
        }
        for name in stale {
            dir.remove(&name)?;
        }
        mine.sort_unstable();
        let mut images = Vec::new();
        for &i in &mine {
            let file = dir.open(&name_of(gen, i))?;
            let img = read_all(file.as_ref())?;
            images.push((i, file, img));
        }
        let mut segments = Vec::new();
        let mut records = Vec::new();
        let mut torn = None;
        for (index, _, img) in &images {
            let (end, mut r, bad) = match scan(img, gen) {
                Scan::Clean { end, records } => (end, records, false),
                Scan::Bad { end, records } => (end, records, true),
            };
            if torn.is_some() && (!r.is_empty() || bad) {
                return Err(WalError::Damaged(format!(
                    "{}: frames follow a damaged one in segment {index:08x}",
                    label.display()
                )));
            }
            if bad {
                if any_frame_after(img, end, gen) {
                    return Err(WalError::Damaged(format!(
                        "{}: segment {index:08x} is damaged at octet {end}, before its end",
                        label.display()
                    )));
                }
                // A frame that does not verify with nothing valid after
                // it: the write a crash cut short (never acknowledged).
                torn = Some((*index, end, img.len()));
            }
            if let (Some(prev), Some(first)) = (records.last(), r.first()) {
                let (p, f): (&Record, &Record) = (prev, first);
                if f.0 <= p.0 {
                    return Err(WalError::Damaged(format!(
                        "{}: log positions go back from {} to {} in segment {index:08x}",
                        label.display(),
                        p.0,
                        f.0
                    )));
                }
            }
            let seqs = r.first().map(|f| f.0).zip(r.last().map(|l| l.0));
            records.append(&mut r);
            segments.push((*index, seqs, end as u64));
        }
        let mut wal = Wal {
            dir,
            gen,
            segment_size,
            retention,
            segments: Vec::new(),
            spare: None,
            buf: Vec::new(),
        };
        for ((index, seqs, head), (_, file, _)) in segments.into_iter().zip(images) {
            wal.segments.push(Segment {
                index,
                file,
                seqs,
                head,
                dirty: false,
            });
        }
        if let Some((index, end, len)) = torn {
            // Zero the cut-off octets, so that frames written after them
            // are never followed by stale ones; segments after it hold
            // nothing (checked above) and are dropped.
            let zeros = vec![0u8; len - end];
            if let Some(pos) = wal.segments.iter().position(|s| s.index == index) {
                let s = &mut wal.segments[pos];
                s.file.write_all_at(&zeros, end as u64)?;
                s.file.sync_data()?;
                s.head = end as u64;
                for s in wal.segments.drain(pos + 1..) {
                    wal.dir.remove(&name_of(gen, s.index))?;
                }
            }
        }
        // Trailing segments with nothing in them but one (made ahead of
        // need) are kept as the spare.
        while wal.segments.len() > 1 && wal.segments.last().is_some_and(|s| s.seqs.is_none()) {
            let s = wal.segments.pop().expect("checked non-empty");
            if wal.spare.is_none() {
                wal.spare = Some((s.index, s.file));
            } else {
                wal.dir.remove(&name_of(gen, s.index))?;
            }
        }
        if let Some((i, _)) = &wal.spare {
            // A spare must come right after the last segment.
            let want = wal.segments.last().map_or(0, |s| s.index + 1);
            if *i != want {
                let (i, _) = wal.spare.take().expect("checked");
                wal.dir.remove(&name_of(gen, i))?;
            }
        }
        if wal.segments.is_empty() {
            let f = wal.take_or_create(0)?;
            wal.segments.push(Segment {
                index: 0,
                file: f,
                seqs: None,
                head: 0,
                dirty: false,
            });
        }
        Ok((wal, records))
    }

    fn take_or_create(&mut self, index: u32) -> io::Result<Box<dyn WalFile>> {
        match self.spare.take() {
            Some((i, f)) if i == index => Ok(f),
            other => {
                if let Some((i, _)) = other {
                    self.dir.remove(&name_of(self.gen, i))?;
                }
                self.dir
                    .create(&name_of(self.gen, index), self.segment_size)
            }
        }
    }

    /// The generation it writes.
    pub fn generation(&self) -> u32 {
        self.gen
    }

    /// Appends `records` (position, entry) in order, unsynced: call
    /// [`Wal::sync`] before acknowledging any of them.
    pub fn append<'a>(
        &mut self,
        records: impl IntoIterator<Item = (u64, &'a [u8])>,
    ) -> io::Result<()> {
        let mut records = records.into_iter().peekable();
        while records.peek().is_some() {
            let room = {
                let s = self.segments.last().expect("a log has a segment");
                self.segment_size.saturating_sub(s.head) as usize
            };
            self.buf.clear();
            self.buf.resize(HEADER, 0);
            let (mut first, mut last) = (None, 0);
            while let Some(&(seq, entry)) = records.peek() {
                let need = RECORD_HEADER + entry.len();
                if pad8(self.buf.len() + need) > room {
                    break;
                }
                self.buf.extend_from_slice(&seq.to_le_bytes());
                self.buf
                    .extend_from_slice(&(entry.len() as u32).to_le_bytes());
                self.buf.extend_from_slice(entry);
                first.get_or_insert(seq);
                last = seq;
                records.next();
            }
            let Some(first) = first else {
                if self.segments.last().is_some_and(|s| s.head == 0) {
                    return Err(io::Error::other(
                        "a log record is larger than a whole segment",
                    ));
                }
                self.roll()?;
                continue;
            };
            let len = self.buf.len() - HEADER;
            let sum = crc(self.gen, &self.buf[HEADER..]);
            self.buf[0..4].copy_from_slice(&MAGIC.to_le_bytes());
            self.buf[4..8].copy_from_slice(&self.gen.to_le_bytes());
            self.buf[8..12].copy_from_slice(&(len as u32).to_le_bytes());
            self.buf[12..16].copy_from_slice(&sum.to_le_bytes());
            self.buf.resize(pad8(self.buf.len()), 0);
            let s = self.segments.last_mut().expect("a log has a segment");
            s.file.write_all_at(&self.buf, s.head)?;
            s.head += self.buf.len() as u64;
            s.dirty = true;
            s.seqs = Some(s.seqs.map_or((first, last), |(f, _)| (f, last)));
        }
        Ok(())
    }

    fn roll(&mut self) -> io::Result<()> {
        // What went into the full segment is synced before anything goes
        // into the next: at most one frame, the last, is ever unsynced, so
        // a frame that does not verify followed by one that does can only
        // be damage.
        if let Some(s) = self.segments.last_mut() {
            if s.dirty {
                s.file.sync_data()?;
                s.dirty = false;
            }
        }
        let index = self.segments.last().map_or(0, |s| s.index + 1);
        let file = self.take_or_create(index)?;
        self.segments.push(Segment {
            index,
            file,
            seqs: None,
            head: 0,
            dirty: false,
        });
        Ok(())
    }

    /// Makes everything appended durable: one `fdatasync` per segment
    /// written since the last call (one, unless a group filled a segment).
    pub fn sync(&mut self) -> io::Result<()> {
        for s in self.segments.iter_mut().filter(|s| s.dirty) {
            s.file.sync_data()?;
            s.dirty = false;
        }
        Ok(())
    }

    /// Work for idle moments: makes the next segment ahead of need once
    /// the current one is half full, so a group commit never waits for
    /// a segment to be zero-filled.
    pub fn prepare(&mut self) -> io::Result<()> {
        let Some(s) = self.segments.last() else {
            return Ok(());
        };
        if self.spare.is_none() && s.head * 2 >= self.segment_size {
            let index = s.index + 1;
            let f = self
                .dir
                .create(&name_of(self.gen, index), self.segment_size)?;
            self.spare = Some((index, f));
        }
        Ok(())
    }

    /// The segments [`Wal::release`] would remove for `folded`: all up to
    /// the returned index.
    fn droppable(&self, folded: u64) -> Option<usize> {
        let last = self.segments.len().saturating_sub(1);
        let done = (0..last)
            .take_while(|&k| self.segments[k].seqs.is_none_or(|(_, l)| l <= folded))
            .count();
        // The newest of them stay, up to the retained size.
        let keep = (self.retention / self.segment_size) as usize;
        done.checked_sub(keep + 1)
    }

    /// Whether folding up to `folded` lets a segment go (only then must
    /// the tables' commit be durable).
    pub fn releasable(&self, folded: u64) -> bool {
        self.droppable(folded).is_some()
    }

    /// Everything up to `folded` is durably in the tables: removes the
    /// segments entirely at or below it, except the newest of them up to
    /// the retained size (kept for [`Wal::read_from`]).
    pub fn release(&mut self, folded: u64) -> io::Result<()> {
        if let Some(k) = self.droppable(folded) {
            for s in self.segments.drain(..=k) {
                self.dir.remove(&name_of(self.gen, s.index))?;
            }
        }
        Ok(())
    }

    /// The oldest log position still held, if any.
    pub fn oldest(&self) -> Option<u64> {
        self.segments.iter().find_map(|s| s.seqs.map(|(f, _)| f))
    }

    /// Every record from position `from` on, in order; `None` when the log
    /// no longer holds `from` (a backup that far behind needs a snapshot).
    pub fn read_from(&self, from: u64) -> Result<Option<Vec<Record>>, WalError> {
        match self.oldest() {
            Some(o) if o <= from => {}
            // Nothing at all was logged in this generation: only a
            // position past the end is served (with nothing).
            None if self.segments.iter().all(|s| s.seqs.is_none()) => {}
            _ => return Ok(None),
        }
        let mut out = Vec::new();
        for s in &self.segments {
            if s.seqs.is_none_or(|(_, l)| l < from) {
                continue;
            }
            let img = read_all(s.file.as_ref())?;
            let upto = &img[..(s.head as usize).min(img.len())];
            match scan(upto, self.gen) {
                Scan::Clean { records, .. } => {
                    out.extend(records.into_iter().filter(|r| r.0 >= from));
                }
                Scan::Bad { end, .. } => {
                    return Err(WalError::Damaged(format!(
                        "{}: segment {:08x} no longer verifies at octet {end}",
                        self.dir.label().display(),
                        s.index
                    )))
                }
            }
        }
        Ok(Some(out))
    }

    /// Starts generation `gen` (the store's state was replaced and that
    /// replacement committed): every segment of the old one goes.
    pub fn reset(&mut self, gen: u32) -> io::Result<()> {
        let old = self.gen;
        for s in self.segments.drain(..) {
            self.dir.remove(&name_of(old, s.index))?;
        }
        if let Some((i, _)) = self.spare.take() {
            self.dir.remove(&name_of(old, i))?;
        }
        self.gen = gen;
        let file = self.dir.create(&name_of(gen, 0), self.segment_size)?;
        self.segments.push(Segment {
            index: 0,
            file,
            seqs: None,
            head: 0,
            dirty: false,
        });
        Ok(())
    }
}

/// A directory of segments in memory that keeps what was synced apart from
/// what was only written, so a test can crash it the ways a machine can
/// (`kill -9` keeps the page cache, and so cannot show a missing sync).
#[cfg(test)]
pub(crate) mod mem {
    use super::{WalDir, WalFile};
    use std::collections::BTreeMap;
    use std::io;
    use std::path::PathBuf;
    use std::sync::{Arc, Mutex};

    #[derive(Debug, Default, Clone)]
    struct Image {
        synced: Vec<u8>,
        current: Vec<u8>,
        unsynced: Vec<(u64, Vec<u8>)>,
    }

    #[derive(Debug, Default)]
    struct State {
        files: BTreeMap<String, Image>,
        fail_syncs: bool,
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

    /// The directory; clones share it.
    #[derive(Debug, Default, Clone)]
    pub(crate) struct MemDir(Arc<Mutex<State>>);

    fn put(img: &mut Vec<u8>, off: u64, data: &[u8]) {
        let off = off as usize;
        if img.len() < off + data.len() {
            img.resize(off + data.len(), 0);
        }
        img[off..off + data.len()].copy_from_slice(data);
    }

    impl MemDir {
        /// Makes every sync fail (EIO) from now on, or not.
        pub(crate) fn fail_syncs(&self, on: bool) {
            self.0.lock().unwrap().fail_syncs = on;
        }

        /// The directory a restart finds.
        pub(crate) fn crash(&self, how: Crash) -> MemDir {
            let st = self.0.lock().unwrap();
            let mut files = BTreeMap::new();
            let mut x = match how {
                Crash::SomeUnsynced(seed) => seed | 1,
                _ => 1,
            };
            for (name, f) in &st.files {
                let mut img = f.synced.clone();
                match how {
                    Crash::DropUnsynced => {}
                    Crash::TearLast => {
                        if let Some(((off, data), rest)) = f.unsynced.split_last() {
                            for (o, d) in rest {
                                put(&mut img, *o, d);
                            }
                            let sectors = data.len() / 512;
                            let keep = (sectors / 2).max(usize::from(sectors == 0)) * 512;
                            put(&mut img, *off, &data[..keep.min(data.len())]);
                        }
                    }
                    Crash::SomeUnsynced(_) => {
                        for (o, d) in &f.unsynced {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            if x & 1 == 0 {
                                put(&mut img, *o, d);
                            }
                        }
                    }
                }
                files.insert(
                    name.clone(),
                    Image {
                        synced: img.clone(),
                        current: img,
                        unsynced: Vec::new(),
                    },
                );
            }
            MemDir(Arc::new(Mutex::new(State {
                files,
                fail_syncs: false,
            })))
        }

        /// Flips octet `at` (counted over every file's synced image, in
        /// name order) of the disk: bit rot under a closed log. Returns
        /// false when `at` is past the end.
        pub(crate) fn corrupt(&self, mut at: usize) -> bool {
            let mut st = self.0.lock().unwrap();
            for f in st.files.values_mut() {
                if at < f.synced.len() {
                    f.synced[at] ^= 0x5a;
                    f.current = f.synced.clone();
                    return true;
                }
                at -= f.synced.len();
            }
            false
        }
    }

    struct MemFile {
        dir: MemDir,
        name: String,
    }

    impl WalFile for MemFile {
        fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
            let st = self.dir.0.lock().unwrap();
            let img = &st
                .files
                .get(&self.name)
                .ok_or(io::ErrorKind::NotFound)?
                .current;
            let off = (off as usize).min(img.len());
            let n = buf.len().min(img.len() - off);
            buf[..n].copy_from_slice(&img[off..off + n]);
            Ok(n)
        }

        fn write_all_at(&mut self, buf: &[u8], off: u64) -> io::Result<()> {
            let mut st = self.dir.0.lock().unwrap();
            let f = st
                .files
                .get_mut(&self.name)
                .ok_or(io::ErrorKind::NotFound)?;
            put(&mut f.current, off, buf);
            f.unsynced.push((off, buf.to_vec()));
            Ok(())
        }

        fn sync_data(&mut self) -> io::Result<()> {
            let mut st = self.dir.0.lock().unwrap();
            if st.fail_syncs {
                return Err(io::Error::other("injected EIO on fsync"));
            }
            let f = st
                .files
                .get_mut(&self.name)
                .ok_or(io::ErrorKind::NotFound)?;
            f.synced = f.current.clone();
            f.unsynced.clear();
            Ok(())
        }

        fn size(&self) -> io::Result<u64> {
            let st = self.dir.0.lock().unwrap();
            Ok(st
                .files
                .get(&self.name)
                .ok_or(io::ErrorKind::NotFound)?
                .current
                .len() as u64)
        }
    }

    impl WalDir for MemDir {
        fn list(&self) -> io::Result<Vec<String>> {
            Ok(self.0.lock().unwrap().files.keys().cloned().collect())
        }

        fn create(&mut self, name: &str, size: u64) -> io::Result<Box<dyn WalFile>> {
            let mut st = self.0.lock().unwrap();
            if st.fail_syncs {
                return Err(io::Error::other("injected EIO on fsync"));
            }
            let img = vec![0u8; size as usize];
            st.files.insert(
                name.to_owned(),
                Image {
                    synced: img.clone(),
                    current: img,
                    unsynced: Vec::new(),
                },
            );
            drop(st);
            self.open(name)
        }

        fn open(&mut self, name: &str) -> io::Result<Box<dyn WalFile>> {
            if !self.0.lock().unwrap().files.contains_key(name) {
                return Err(io::ErrorKind::NotFound.into());
            }
            Ok(Box::new(MemFile {
                dir: self.clone(),
                name: name.to_owned(),
            }))
        }

        fn remove(&mut self, name: &str) -> io::Result<()> {
            self.0.lock().unwrap().files.remove(name);
            Ok(())
        }

        fn label(&self) -> PathBuf {
            PathBuf::from("memory-log")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::mem::{Crash, MemDir};
    use super::*;

    fn rec(seq: u64, n: usize) -> (u64, Vec<u8>) {
        (seq, (0..n).map(|i| (seq as usize * 31 + i) as u8).collect())
    }

    fn open(dir: &MemDir, gen: u32) -> Result<(Wal, Vec<Record>), WalError> {
        Wal::open(Box::new(dir.clone()), gen, 64 << 10, 128 << 10)
    }

    fn append(w: &mut Wal, recs: &[(u64, Vec<u8>)]) {
        w.append(recs.iter().map(|(s, b)| (*s, b.as_slice())))
            .unwrap();
    }

    /// Failure-scenarios draft section 6: what was synced is read back
    /// whole and in order after any crash; a torn last group is cut off
    /// (it was never acknowledged), across segment boundaries too.
    #[test]
    fn draft_s6_synced_groups_survive_and_a_torn_tail_is_cut() {
        for how in [
            Crash::DropUnsynced,
            Crash::TearLast,
            Crash::SomeUnsynced(3),
            Crash::SomeUnsynced(8),
        ] {
            let dir = MemDir::default();
            let (mut w, got) = open(&dir, 0).unwrap();
            assert!(got.is_empty());
            let mut all = Vec::new();
            let mut seq = 0;
            // Enough to fill several 64 KiB segments.
            for g in 0..60u64 {
                let group: Vec<_> = (0..20)
                    .map(|_| {
                        seq += 1;
                        rec(seq, 40 + (g as usize * 7) % 100)
                    })
                    .collect();
                append(&mut w, &group);
                w.sync().unwrap();
                all.extend(group);
                if g % 7 == 0 {
                    w.prepare().unwrap();
                }
            }
            let synced = all.clone();
            // One more group, written and not synced.
            let tail: Vec<_> = (0..40).map(|i| rec(seq + 1 + i, 300)).collect();
            append(&mut w, &tail);
            let crashed = dir.crash(how);
            let (mut w2, got) = open(&crashed, 0).unwrap_or_else(|e| panic!("{how:?}: {e}"));
            assert!(got.len() >= synced.len(), "{how:?}: lost synced records");
            assert_eq!(&got[..synced.len()], &synced[..], "{how:?}");
            // Whatever of the tail came back is a whole prefix of it.
            let extra = &got[synced.len()..];
            assert!(tail.starts_with(extra), "{how:?}: a half record came back");
            // Writing goes on after what was read, and reads back.
            let last = got.last().map_or(0, |r| r.0);
            let more = vec![rec(last + 1, 10), rec(last + 2, 10)];
            append(&mut w2, &more);
            w2.sync().unwrap();
            let (_, again) = open(&crashed.crash(Crash::DropUnsynced), 0).unwrap();
            assert_eq!(&again[got.len()..], &more[..], "{how:?}");
        }
    }

    /// A flipped octet in a synced frame followed by valid frames is damage
    /// in the middle of the log: refused, never half-loaded. A flip in the
    /// last frame reads as a torn tail, or as the whole log.
    #[test]
    fn draft_s6_a_damaged_log_is_refused_never_half_loaded() {
        let dir = MemDir::default();
        let (mut w, _) = open(&dir, 0).unwrap();
        let mut all = Vec::new();
        for g in 0..10u64 {
            let group: Vec<_> = (0..10).map(|i| rec(g * 10 + i + 1, 50)).collect();
            append(&mut w, &group);
            w.sync().unwrap();
            all.extend(group);
        }
        drop(w);
        let mut refused = 0;
        let mut at = 0;
        loop {
            let img = dir.crash(Crash::DropUnsynced);
            if !img.corrupt(at) {
                break;
            }
            match open(&img, 0) {
                Ok((_, got)) => assert!(
                    all.starts_with(&got),
                    "octet {at}: read back what was never written"
                ),
                Err(WalError::Damaged(_)) => refused += 1,
                Err(e) => panic!("octet {at}: {e}"),
            }
            at += 97;
        }
        assert!(refused > 0);
    }

    /// Segments of an older generation are never replayed; a newer one
    /// than the store's means the store is older than its log.
    #[test]
    fn draft_s6_a_replaced_generation_is_never_replayed() {
        let dir = MemDir::default();
        let (mut w, _) = open(&dir, 3).unwrap();
        append(&mut w, &[rec(1, 10), rec(2, 10)]);
        w.sync().unwrap();
        w.reset(4).unwrap();
        append(&mut w, &[rec(7, 10)]);
        w.sync().unwrap();
        let (_, got) = open(&dir, 4).unwrap();
        assert_eq!(got, vec![rec(7, 10)]);
        assert!(matches!(open(&dir, 2), Err(WalError::Damaged(_))));
    }

    /// The log is readable by position back to the retained size, then
    /// says it no longer reaches (a backup must take a snapshot).
    #[test]
    fn the_log_is_readable_by_position_within_its_retention() {
        let dir = MemDir::default();
        let (mut w, _) = open(&dir, 0).unwrap();
        let mut seq = 0;
        for _ in 0..100 {
            let group: Vec<_> = (0..20)
                .map(|_| {
                    seq += 1;
                    rec(seq, 100)
                })
                .collect();
            append(&mut w, &group);
            w.sync().unwrap();
        }
        let from = seq - 50;
        let got = w.read_from(from).unwrap().unwrap();
        assert_eq!(got.first().map(|r| r.0), Some(from));
        assert_eq!(got.len(), 51);
        assert!(w.releasable(seq));
        w.release(seq).unwrap();
        // 128 KiB retained of 64 KiB segments: two folded segments and the
        // current one stay.
        assert_eq!(w.segments.len(), 3);
        assert_eq!(w.read_from(1).unwrap(), None, "released");
        let oldest = w.oldest().unwrap();
        assert_eq!(
            w.read_from(oldest).unwrap().unwrap().len() as u64,
            seq - oldest + 1
        );
    }

    /// A failed sync is an error, never retried into success.
    #[test]
    fn a_failed_sync_fails() {
        let dir = MemDir::default();
        let (mut w, _) = open(&dir, 0).unwrap();
        append(&mut w, &[rec(1, 10)]);
        dir.fail_syncs(true);
        assert!(w.sync().is_err());
    }
}
