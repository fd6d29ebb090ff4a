//! The local disk tier: one immutable, checksummed file per chunk, shared by every process
//! on the host that opens the same directory.
//!
//! Crash safety comes from the write protocol, not from locks: a put writes a unique temp
//! file (`.tmp-<pid>-<n>`) in the directory and renames it over the chunk's name, so a chunk
//! is either wholly visible or not at all. A killed writer leaves only a temp file, which
//! `open` and `gc` remove once its process is gone. Files are never modified after the rename
//! and kvrelay only ever unlinks them, so a reader that read a file's length of bytes read
//! one whole chunk. A reader that finds a chunk damaged unlinks it at once.
//!
//! Only regular files are ever read. Every open uses `O_NOFOLLOW | O_NONBLOCK` and checks
//! the open file's type, so a symlink is never followed out of the directory and a FIFO
//! under a chunk's name cannot block a reader waiting for a writer. Such an entry is a
//! [`ForeignEntry`]: the tier removes it where it meets it; `list` and `verify` report it.
//!
//! File format (little-endian), one file per chunk, named `<xxh3-128 of the key string>.kvc`
//! so that no key can name a path outside the directory:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `KVRCHUNK` |
//! | 8 | 2 | format version (1) |
//! | 10 | 2 | reserved, zero |
//! | 12 | 4 | header length (fixed part + key, padded to 64 bytes) |
//! | 16 | 4 | key length |
//! | 20 | 4 | tokens in the chunk |
//! | 24 | 8 | layout fingerprint |
//! | 32 | 8 | payload length |
//! | 40 | 8 | payload checksum, xxh3-64 |
//! | 48 | 8 | header checksum, xxh3-64 of bytes 0..48, then (as seed) of 56..header length |
//! | 56 | key length | the key's LMCache string form |

use std::ffi::OsStr;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::hash::Hasher;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use parking_lot::{Condvar, Mutex};
use twox_hash::XxHash3_64;
use xxhash_rust::xxh3::{xxh3_128, xxh3_64, xxh3_64_with_seed};

use super::arena::SlotMut;
use super::lru::LruIndex;
use super::{Chunk, ChunkMeta, CpuTier, StoreError, Tier, TierStats};
use crate::device::{HostBuffer, StagingPool};
use crate::keys::CacheKey;
use crate::process::process_alive;

const MAGIC: [u8; 8] = *b"KVRCHUNK";
const FORMAT_VERSION: u16 = 1;
const FIXED_HEADER: usize = 56;
const HEADER_ALIGN: usize = 64;
/// Longer keys are refused: a real key is a model name and four short fields.
const MAX_KEY_LEN: usize = 4096;
const MAX_HEADER: usize = (FIXED_HEADER + MAX_KEY_LEN).next_multiple_of(HEADER_ALIGN);
const CHUNK_EXT: &str = "kvc";
const TEMP_PREFIX: &str = ".tmp-";
/// A directory without this file is not a kvrelay tier: `open` refuses to manage (and so
/// possibly delete) files there.
const MARKER: &str = ".kvrelay-disk-tier";
const MARKER_TEXT: &str = "kvrelay disk tier, chunk format 1\n";

/// Idle read buffers a tier keeps for its gets (the largest ones): a loader holds a request's
/// chunks at once, then drops them all; four spare buffers of a few chunks' size cost little.
const READ_BUFFERS_KEPT: usize = 4;
/// Bytes of a chunk file read (then hashed) at a time: small enough to be hashed while still
/// in the core's cache, large enough that the system calls do not count.
const READ_PIECE: usize = 256 << 10;
// A file's first piece holds any valid header.
const _: () = assert!(MAX_HEADER <= READ_PIECE);

/// Makes temp file names unique among the tiers of one process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// How to open a disk tier.
#[derive(Clone, Debug)]
pub struct DiskTierOptions {
    /// Bytes of chunk files (headers included) this process keeps in the directory. Across
    /// processes the budget is approximate: each evicts from what it has seen.
    pub budget_bytes: u64,
    /// fsync each chunk and the directory on put. Off by default: the checksums catch data a
    /// power loss tore, and a torn chunk is a miss.
    pub fsync: bool,
    /// Create the directory (and mark it as a tier) if it is missing or empty.
    pub create: bool,
    /// Permission bits of chunk files; the directory gets the matching execute bits.
    /// Owner-only (0o600) by default.
    pub file_mode: u32,
    /// A temp file whose writer is still alive is left alone until it is this old.
    pub stale_temp_after: Duration,
    /// Remove stale temp files and foreign entries on open. Inspection tools turn it off so
    /// that only `gc` changes the directory.
    pub clean_on_open: bool,
}

impl DiskTierOptions {
    pub fn new(budget_bytes: u64) -> Self {
        DiskTierOptions {
            budget_bytes,
            fsync: false,
            create: true,
            file_mode: 0o600,
            stale_temp_after: Duration::from_secs(3600),
            clean_on_open: true,
        }
    }

    fn dir_mode(&self) -> u32 {
        // Read permission on the directory without execute is useless: add x wherever r is.
        self.file_mode | ((self.file_mode & 0o444) >> 2) | 0o700
    }
}

/// One chunk file as `list` or `verify` saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskEntry {
    pub key: String,
    pub path: PathBuf,
    pub num_tokens: u32,
    pub layout_fingerprint: u64,
    pub payload_bytes: u64,
    pub file_bytes: u64,
    /// Last write or successful read by any process.
    pub modified: SystemTime,
}

/// A chunk file that failed a check, and why.
#[derive(Debug)]
pub struct BadChunk {
    pub path: PathBuf,
    pub error: StoreError,
}

/// An entry under a chunk's name that is not a regular file: a symlink, FIFO, socket,
/// device or directory. kvrelay never writes one, so it is never read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForeignEntry {
    pub path: PathBuf,
    /// What it is, in words ("FIFO", "symbolic link", ...).
    pub kind: &'static str,
}

/// The entries of a directory under chunk names: valid chunks sorted by key, regular files
/// that failed the check, and foreign entries, each sorted by path.
#[derive(Debug, Default)]
pub struct Listing {
    pub entries: Vec<DiskEntry>,
    pub bad: Vec<BadChunk>,
    pub foreign: Vec<ForeignEntry>,
}

/// What `gc` removed.
#[derive(Debug, Default)]
pub struct GcReport {
    pub removed_bad: Vec<BadChunk>,
    /// Foreign entries unlinked. A directory under a chunk's name is left in place (kvrelay
    /// does not delete trees it did not write) and stays in the listings.
    pub removed_foreign: Vec<ForeignEntry>,
    pub removed_temp: Vec<PathBuf>,
    /// Valid chunks evicted, least recently used first, to meet `max_bytes`.
    pub evicted: Vec<DiskEntry>,
    pub bytes_freed: u64,
}

struct Inner {
    /// File id (xxh3-128 of the key string) → file bytes.
    index: LruIndex<u128, u64>,
    bytes: u64,
    hits: u64,
    misses: u64,
    evictions: u64,
    corrupt: u64,
    rejected: u64,
}

/// Chunks in files under one directory, with a byte budget and LRU eviction.
pub struct DiskTier {
    dir: PathBuf,
    opts: DiskTierOptions,
    inner: Mutex<Inner>,
    /// Buffers that gets read chunk files into, reused once their chunk is dropped.
    reads: Arc<StagingPool<HostBuffer>>,
    /// The CPU tier above, whose slots `get` reads into (see [`DiskTier::reading_into`]).
    read_into: Option<Arc<CpuTier>>,
}

/// A pooled buffer that a chunk file was read into; back in the pool once dropped.
struct PooledRead {
    /// `Some` until the drop gives it back.
    buffer: Option<HostBuffer>,
    pool: Arc<StagingPool<HostBuffer>>,
}

impl AsRef<[u8]> for PooledRead {
    fn as_ref(&self) -> &[u8] {
        self.buffer.as_deref().unwrap_or_default()
    }
}

impl Drop for PooledRead {
    fn drop(&mut self) {
        if let Some(buffer) = self.buffer.take() {
            self.pool.give_back(buffer);
        }
    }
}

/// Where `get` reads a chunk file: a slot of the CPU tier above, which then keeps the
/// chunk without a copy, or else a pooled buffer.
enum ReadBuffer {
    Pooled(PooledRead),
    Slot(SlotMut),
}

impl ReadBuffer {
    /// The bytes from `start` on, as a chunk's data; they keep the memory while they live.
    fn into_bytes(self, start: usize) -> Bytes {
        match self {
            ReadBuffer::Pooled(pooled) => Bytes::from_owner(pooled).slice(start..),
            ReadBuffer::Slot(slot) => {
                let len = slot.len();
                slot.freeze().bytes(start..len)
            }
        }
    }
}

impl std::ops::Deref for ReadBuffer {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            ReadBuffer::Pooled(pooled) => pooled.as_ref(),
            ReadBuffer::Slot(slot) => slot,
        }
    }
}

impl std::ops::DerefMut for ReadBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        match self {
            ReadBuffer::Pooled(pooled) => pooled.buffer.as_deref_mut().unwrap_or_default(),
            ReadBuffer::Slot(slot) => slot,
        }
    }
}

struct Header {
    key: String,
    header_len: usize,
    num_tokens: u32,
    layout_fingerprint: u64,
    payload_len: u64,
    payload_checksum: u64,
}

enum DirItem {
    Chunk(PathBuf),
    Temp { path: PathBuf, pid: Option<i32> },
}

/// How far `scan_chunks` checks each file.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Check {
    Header,
    Full,
}

impl DiskTier {
    /// Opens (or, with `opts.create`, creates) the tier in `dir`, removes stale temp files
    /// (unless `opts.clean_on_open` is off), and rebuilds the index from the chunk headers so the cache survives restarts.
    pub fn open(dir: impl AsRef<Path>, opts: DiskTierOptions) -> Result<Self, StoreError> {
        let dir = dir.as_ref().to_path_buf();
        prepare_dir(&dir, &opts)?;
        let tier = DiskTier {
            dir,
            opts,
            reads: Arc::new(StagingPool::keeping(READ_BUFFERS_KEPT)),
            read_into: None,
            inner: Mutex::new(Inner {
                index: LruIndex::new(),
                bytes: 0,
                hits: 0,
                misses: 0,
                evictions: 0,
                corrupt: 0,
                rejected: 0,
            }),
        };
        let listing = tier.list()?;
        if tier.opts.clean_on_open {
            tier.remove_stale_temps()?;
            for entry in &listing.foreign {
                remove_foreign(&entry.path)?;
            }
        }
        tier.rebuild_index(listing);
        Ok(tier)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path a key's chunk has in this tier.
    pub fn chunk_path(&self, key: &CacheKey) -> PathBuf {
        self.path_of(file_id(&key.to_string()))
    }

    fn path_of(&self, id: u128) -> PathBuf {
        self.dir.join(format!("{id:032x}.{CHUNK_EXT}"))
    }

    /// Every chunk file with its header checked (not the payload checksum). Changes nothing:
    /// foreign entries are reported, not removed.
    pub fn list(&self) -> Result<Listing, StoreError> {
        self.scan_chunks(Check::Header)
    }

    /// Every chunk file with every check a reader makes, payload checksum included. Changes
    /// nothing, like [`DiskTier::list`], and lists the same set of files.
    pub fn verify(&self) -> Result<Listing, StoreError> {
        self.scan_chunks(Check::Full)
    }

    /// Removes chunks that fail `verify`, foreign entries and stale temp files; with
    /// `max_bytes`, then evicts the least recently used chunks until the files total at most
    /// that many bytes.
    pub fn gc(&self, max_bytes: Option<u64>) -> Result<GcReport, StoreError> {
        let mut report = GcReport::default();
        let listing = self.verify()?;
        for bad in listing.bad {
            report.bytes_freed += fs::symlink_metadata(&bad.path)
                .map(|m| m.len())
                .unwrap_or(0);
            if unlink(&bad.path)? {
                report.removed_bad.push(bad);
            }
        }
        for entry in listing.foreign {
            if remove_foreign(&entry.path)? {
                report.removed_foreign.push(entry);
            }
        }
        report.removed_temp = self.remove_stale_temps()?;
        if let Some(max_bytes) = max_bytes {
            let mut entries = listing.entries;
            entries.sort_by_key(|e| e.modified);
            let mut total: u64 = entries.iter().map(|e| e.file_bytes).sum();
            for entry in entries {
                if total <= max_bytes {
                    break;
                }
                total -= entry.file_bytes;
                if unlink(&entry.path)? {
                    report.bytes_freed += entry.file_bytes;
                    report.evicted.push(entry);
                }
            }
        }
        self.rebuild_index(self.list()?);
        Ok(report)
    }

    fn read_dir(&self) -> Result<Vec<DirItem>, StoreError> {
        let entries = fs::read_dir(&self.dir).map_err(|e| StoreError::io(&self.dir, e))?;
        let mut items = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| StoreError::io(&self.dir, e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(rest) = name.strip_prefix(TEMP_PREFIX) {
                let pid = rest.split('-').next().and_then(|p| p.parse().ok());
                items.push(DirItem::Temp {
                    path: entry.path(),
                    pid,
                });
            } else if parse_file_id(name).is_some() {
                items.push(DirItem::Chunk(entry.path()));
            }
        }
        Ok(items)
    }

    fn scan_chunks(&self, check: Check) -> Result<Listing, StoreError> {
        let mut listing = Listing::default();
        for item in self.read_dir()? {
            let DirItem::Chunk(path) = item else { continue };
            let result = match check {
                Check::Header => read_header(&path),
                Check::Full => self.verify_file(&path),
            };
            match result {
                Ok(entry) => listing.entries.push(entry),
                // Unlinked by another process since the directory was read: not a chunk now.
                Err(StoreError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
                Err(StoreError::NotRegularFile { path, kind }) => {
                    listing.foreign.push(ForeignEntry { path, kind })
                }
                Err(error) => listing.bad.push(BadChunk { path, error }),
            }
        }
        listing.entries.sort_by(|a, b| a.key.cmp(&b.key));
        listing.bad.sort_by(|a, b| a.path.cmp(&b.path));
        listing.foreign.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(listing)
    }

    /// Removes temp files whose writer is gone or that are older than `stale_temp_after`.
    fn remove_stale_temps(&self) -> Result<Vec<PathBuf>, StoreError> {
        let own_pid = std::process::id() as i32;
        let now = SystemTime::now();
        let mut removed = Vec::new();
        for item in self.read_dir()? {
            let DirItem::Temp { path, pid } = item else {
                continue;
            };
            let Ok(meta) = fs::symlink_metadata(&path) else {
                continue;
            };
            let age = meta
                .modified()
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .unwrap_or_default();
            let writer_gone = pid.is_some_and(|pid| pid != own_pid && !process_alive(pid));
            if (writer_gone || age >= self.opts.stale_temp_after) && unlink(&path)? {
                removed.push(path);
            }
        }
        Ok(removed)
    }

    /// Replaces the index with the valid chunks of `listing`.
    fn rebuild_index(&self, listing: Listing) {
        for bad in &listing.bad {
            tracing::warn!(path = %bad.path.display(), error = %bad.error, "bad chunk left out of the index; `kvrelay store gc` removes it");
        }
        let mut entries = listing.entries;
        entries.sort_by_key(|e| e.modified);
        let mut inner = self.inner.lock();
        inner.index.clear();
        inner.bytes = 0;
        for entry in entries {
            inner.index.insert(file_id(&entry.key), entry.file_bytes);
            inner.bytes += entry.file_bytes;
        }
    }

    /// Removes a chunk file that failed a reader's checks. It is a cache entry, so nothing
    /// is lost; left in place, every lookup would claim it as a hit and every load would
    /// fail on it and recompute. Only the file that was read goes: one a writer renamed
    /// over it since is kept. The reason is logged; `kvrelay store verify` finds damage
    /// that no reader has met yet.
    fn discard_corrupt(&self, id: u128, path: &Path, read: &File, error: &StoreError) {
        let same_file = match (read.metadata(), fs::symlink_metadata(path)) {
            (Ok(read), Ok(now)) => read.dev() == now.dev() && read.ino() == now.ino(),
            _ => false,
        };
        if same_file {
            match unlink(path) {
                Ok(_) => {
                    tracing::warn!(path = %path.display(), %error, "removed a corrupt chunk; its tokens will be recomputed and saved again")
                }
                Err(unlink_error) => {
                    tracing::warn!(path = %path.display(), %error, %unlink_error, "corrupt chunk could not be removed")
                }
            }
        }
        self.forget(id);
    }

    /// Records that the file `id` exists with `file_bytes`, as the most recently used.
    fn note_present(&self, id: u128, file_bytes: u64) {
        let mut inner = self.inner.lock();
        if let Some(old) = inner.index.insert(id, file_bytes) {
            inner.bytes -= old;
        }
        inner.bytes += file_bytes;
    }

    fn forget(&self, id: u128) {
        let mut inner = self.inner.lock();
        if let Some(old) = inner.index.remove(&id) {
            inner.bytes -= old;
        }
    }

    /// Reserves `file_bytes` for `id` in the index, choosing least recently used victims to
    /// stay within budget. Returns the victims' paths, to unlink outside the lock.
    fn reserve(&self, id: u128, file_bytes: u64) -> Result<Vec<PathBuf>, StoreError> {
        let budget = self.opts.budget_bytes;
        if file_bytes > budget {
            return Err(StoreError::TooLarge {
                size: file_bytes,
                budget,
            });
        }
        let mut inner = self.inner.lock();
        if let Some(old) = inner.index.remove(&id) {
            inner.bytes -= old;
        }
        let mut victims = Vec::new();
        while inner.bytes + file_bytes > budget {
            let Some((&victim, &size)) = inner.index.iter_lru().next() else {
                break;
            };
            inner.index.remove(&victim);
            inner.bytes -= size;
            inner.evictions += 1;
            victims.push(self.path_of(victim));
        }
        inner.index.insert(id, file_bytes);
        inner.bytes += file_bytes;
        Ok(victims)
    }

    /// A buffer of exactly `file_len` bytes to read a chunk file into: a pooled one, which is
    /// already faulted in, when one is idle.
    fn read_buffer(&self, path: &Path, file_len: u64) -> Result<ReadBuffer, StoreError> {
        let len = usize::try_from(file_len).map_err(|_| {
            corrupt(
                path,
                format!("{file_len} bytes do not fit this machine's memory"),
            )
        })?;
        let buffer = self
            .reads
            .take_exact(len, HostBuffer::zeroed)
            .map_err(|e| StoreError::io(path, io::Error::new(io::ErrorKind::OutOfMemory, e)))?;
        Ok(ReadBuffer::Pooled(PooledRead {
            buffer: Some(buffer),
            pool: Arc::clone(&self.reads),
        }))
    }

    /// Makes `get` read chunk files into slots of `cpu`, the CPU tier above this one in a
    /// stack, so the promotion that follows keeps them without a copy, in memory that is
    /// already faulted in. Its slots must hold [`DiskTier::file_bytes`] of a chunk; a file
    /// larger than a slot, or a CPU tier whose slots are all held by readers, is read into
    /// a pooled buffer as without it.
    pub fn reading_into(mut self, cpu: Arc<CpuTier>) -> Self {
        self.read_into = Some(cpu);
        self
    }

    /// The largest chunk file of `payload_bytes`: payload plus the longest header.
    pub const fn file_bytes(payload_bytes: usize) -> usize {
        payload_bytes + MAX_HEADER
    }

    /// The buffer `get` reads a chunk file into: a slot of the CPU tier it reads into, if
    /// one is free or can be freed, else a pooled buffer.
    fn get_buffer(&self, path: &Path, file_len: u64) -> Result<ReadBuffer, StoreError> {
        let slot = self.read_into.as_ref().and_then(|cpu| {
            let len = usize::try_from(file_len).ok()?;
            cpu.reserve(len)
                .inspect_err(|err| tracing::debug!(%err, "reading a chunk beside the CPU tier"))
                .ok()
        });
        match slot {
            Some(slot) => Ok(ReadBuffer::Slot(slot)),
            None => self.read_buffer(path, file_len),
        }
    }

    /// Runs every check on a chunk file, as `get` would.
    fn verify_file(&self, path: &Path) -> Result<DiskEntry, StoreError> {
        let (file, meta) = open_regular(path)?;
        let mut contents = self.read_buffer(path, meta.len())?;
        let header = read_and_check(path, &file, &mut contents, None)?;
        Ok(entry_of(path, header, &meta))
    }

    /// Writes the payload in pieces, then the header, which needs the payload's checksum,
    /// at the start. From [`HASH_BESIDE_FROM`] bytes on, a helper thread hashes the payload
    /// while the caller writes it; below, each piece is hashed just before it is written,
    /// while it is still in cache.
    fn write_chunk(
        &self,
        path: &Path,
        key: &str,
        meta: ChunkMeta,
        data: &[u8],
    ) -> Result<(), StoreError> {
        let at = header_len(key.len());
        write_atomically(&self.dir, path, &self.opts, |file| {
            let checksum = if data.len() < HASH_BESIDE_FROM {
                let mut hasher = XxHash3_64::new();
                write_payload(file, data, at, |piece| hasher.write(piece))?;
                hasher.finish()
            } else {
                let (checksum, written) = beside(
                    "kvrelay-disk-hash",
                    || XxHash3_64::oneshot(data),
                    || write_payload(file, data, at, |_| {}),
                )?;
                written?;
                checksum
            };
            file.write_all_at(&encode_header(key, meta, data.len(), checksum), 0)
        })
    }
}

impl Tier for DiskTier {
    fn name(&self) -> &str {
        "disk"
    }

    /// Checks the file system, not only the index, so chunks written or evicted by other
    /// processes are seen. Only a regular file counts: anything else under the name is
    /// removed now, or every lookup would claim it as a hit that no load can use.
    fn contains(&self, key: &CacheKey) -> bool {
        let id = file_id(&key.to_string());
        let path = self.path_of(id);
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_file() => {
                self.note_present(id, meta.len());
                return true;
            }
            Ok(_) => {
                if let Err(error) = remove_foreign(&path) {
                    tracing::warn!(%error, "removing an entry that is not a chunk file failed");
                }
            }
            Err(_) => {}
        }
        self.forget(id);
        false
    }

    fn get(&self, key: &CacheKey, expected_fingerprint: u64) -> Result<Option<Chunk>, StoreError> {
        let key_str = key.to_string();
        let id = file_id(&key_str);
        let path = self.path_of(id);
        let (file, file_meta) = match open_regular(&path) {
            Ok(opened) => opened,
            Err(StoreError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                self.forget(id);
                self.inner.lock().misses += 1;
                return Ok(None);
            }
            Err(err @ StoreError::NotRegularFile { .. }) => {
                self.inner.lock().corrupt += 1;
                if let Err(error) = remove_foreign(&path) {
                    tracing::warn!(%error, "removing an entry that is not a chunk file failed");
                }
                self.forget(id);
                return Err(err);
            }
            Err(err) => return Err(err),
        };
        let expect = Some((key_str.as_str(), expected_fingerprint));
        let file_len = file_meta.len();
        let mut contents = self.get_buffer(&path, file_len)?;
        let header = match read_and_check(&path, &file, &mut contents, expect) {
            Ok(header) => header,
            Err(err) => {
                match err {
                    StoreError::FingerprintMismatch { .. } => self.inner.lock().rejected += 1,
                    StoreError::Corrupt { .. } => {
                        self.inner.lock().corrupt += 1;
                        self.discard_corrupt(id, &path, &file, &err);
                    }
                    _ => {}
                }
                return Err(err);
            }
        };
        // Records the access for LRU across processes and restarts; best effort, as a
        // read-only reader may not own the file.
        let _ = file.set_modified(SystemTime::now());
        self.note_present(id, file_len);
        self.inner.lock().hits += 1;
        let meta = ChunkMeta {
            layout_fingerprint: header.layout_fingerprint,
            num_tokens: header.num_tokens,
        };
        // The chunk owns a copy of the verified bytes, in a CPU tier slot or a pooled buffer,
        // either free again when the last `Bytes` of it drops; the file may go at any time.
        let data = contents.into_bytes(header.header_len);
        Ok(Some(Chunk {
            meta,
            data,
            device: None,
        }))
    }

    fn put(&self, key: &CacheKey, meta: ChunkMeta, data: &[u8]) -> Result<(), StoreError> {
        let key_str = key.to_string();
        let id = file_id(&key_str);
        if key_str.len() > MAX_KEY_LEN {
            return Err(StoreError::KeyTooLong {
                len: key_str.len(),
                max: MAX_KEY_LEN,
            });
        }
        let file_bytes = (header_len(key_str.len()) + data.len()) as u64;
        for victim in self.reserve(id, file_bytes)? {
            if let Err(err) = unlink(&victim) {
                tracing::warn!(error = %err, "evicting a chunk failed");
            }
        }
        let path = self.path_of(id);
        self.write_chunk(&path, &key_str, meta, data)
            .inspect_err(|_| self.forget(id))
    }

    fn remove(&self, key: &CacheKey) -> Result<bool, StoreError> {
        let id = file_id(&key.to_string());
        self.forget(id);
        unlink(&self.path_of(id))
    }

    fn stats(&self) -> TierStats {
        let inner = self.inner.lock();
        TierStats {
            entries: inner.index.len() as u64,
            bytes: inner.bytes,
            budget: self.opts.budget_bytes,
            hits: inner.hits,
            misses: inner.misses,
            evictions: inner.evictions,
            corrupt: inner.corrupt,
            rejected: inner.rejected,
            unavailable: 0,
            unchecked: 0,
        }
    }
}

fn file_id(key: &str) -> u128 {
    xxh3_128(key.as_bytes())
}

fn parse_file_id(name: &str) -> Option<u128> {
    let stem = name.strip_suffix(CHUNK_EXT)?.strip_suffix('.')?;
    if stem.len() != 32 {
        return None;
    }
    u128::from_str_radix(stem, 16).ok()
}

fn prepare_dir(dir: &Path, opts: &DiskTierOptions) -> Result<(), StoreError> {
    let bad = |reason: String| StoreError::BadDirectory {
        path: dir.to_path_buf(),
        reason,
    };
    match fs::metadata(dir) {
        Ok(meta) if !meta.is_dir() => return Err(bad("not a directory".into())),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound && opts.create => {
            DirBuilder::new()
                .recursive(true)
                .mode(opts.dir_mode())
                .create(dir)
                .map_err(|e| StoreError::io(dir, e))?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(bad("it does not exist".into()))
        }
        Err(e) => return Err(StoreError::io(dir, e)),
    }
    let marker = dir.join(MARKER);
    match read_marker(&marker) {
        Ok(text) if text == MARKER_TEXT => Ok(()),
        Ok(text) => Err(bad(format!(
            "{MARKER} says {:?}; expected {MARKER_TEXT:?}",
            text.trim_end()
        ))),
        Err(StoreError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            // Temp files do not count: another process may be writing the marker right now.
            let empty = fs::read_dir(dir)
                .map_err(|e| StoreError::io(dir, e))?
                .filter_map(Result::ok)
                .all(|e| e.file_name().to_string_lossy().starts_with(TEMP_PREFIX));
            if !(opts.create && empty) {
                return Err(bad(format!(
                    "no {MARKER} file, so it is not a kvrelay disk tier (kvrelay only takes over empty directories)"
                )));
            }
            // Atomic, so a process opening the directory at the same time sees all or nothing.
            write_atomically(dir, &marker, opts, |mut file| {
                file.write_all(MARKER_TEXT.as_bytes())
            })
        }
        Err(StoreError::NotRegularFile { kind, .. }) => {
            Err(bad(format!("{MARKER} is a {kind}, not a regular file")))
        }
        Err(e) => Err(e),
    }
}

/// The marker's text, or as much of it as shows that it is not ours.
fn read_marker(marker: &Path) -> Result<String, StoreError> {
    let (file, _) = open_regular(marker)?;
    let mut text = String::new();
    file.take(MARKER_TEXT.len() as u64 + 1)
        .read_to_string(&mut text)
        .map_err(|e| StoreError::io(marker, e))?;
    Ok(text)
}

/// Opens an entry of the tier for reading if, and only if, it is a regular file, without
/// ever blocking: `O_NOFOLLOW` fails on a symlink instead of reading outside the directory,
/// and `O_NONBLOCK` returns at once from opening a FIFO that has no writer. Regular files
/// ignore `O_NONBLOCK`, so reads of the returned file work as usual. The
/// metadata is the open file's (fstat), so the check and the reads concern the same file.
fn open_regular(path: &Path) -> Result<(File, fs::Metadata), StoreError> {
    let opened = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path);
    let file = match opened {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(StoreError::io(path, e)),
        // A symlink (ELOOP) or a socket (ENXIO) fails to open this way: say what it is.
        Err(e) => {
            return Err(match fs::symlink_metadata(path) {
                Ok(meta) if !meta.is_file() => not_regular(path, meta.file_type()),
                _ => StoreError::io(path, e),
            })
        }
    };
    let meta = file.metadata().map_err(|e| StoreError::io(path, e))?;
    if !meta.is_file() {
        return Err(not_regular(path, meta.file_type()));
    }
    Ok((file, meta))
}

fn not_regular(path: &Path, file_type: fs::FileType) -> StoreError {
    StoreError::NotRegularFile {
        path: path.to_path_buf(),
        kind: file_kind(file_type),
    }
}

fn file_kind(file_type: fs::FileType) -> &'static str {
    if file_type.is_symlink() {
        "symbolic link"
    } else if file_type.is_fifo() {
        "FIFO"
    } else if file_type.is_socket() {
        "socket"
    } else if file_type.is_dir() {
        "directory"
    } else if file_type.is_block_device() {
        "block device"
    } else if file_type.is_char_device() {
        "character device"
    } else {
        "special file"
    }
}

/// Unlinks an entry under a chunk's name that is not a regular file; returns whether it did.
///
/// Removed rather than quarantined: the directory is kvrelay's (it holds the marker), and
/// a chunk name only ever holds a cache entry that can be recomputed. A FIFO, socket or
/// symlink holds no data worth keeping, while a quarantine directory would collect
/// entries nobody cleans. `unlink` removes a symlink itself, never its target. A directory
/// is left in place and reported each time: kvrelay does not delete trees it did not write.
fn remove_foreign(path: &Path) -> Result<bool, StoreError> {
    // Looked at again just before the unlink, so a chunk a writer renamed over the entry
    // since it was seen is kept. (Losing that race costs one cache entry, nothing more.)
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(StoreError::io(path, e)),
    };
    if meta.is_file() {
        return Ok(false);
    }
    if meta.is_dir() {
        tracing::warn!(path = %path.display(), "a directory under a chunk's name is not a chunk; kvrelay leaves it for you to remove");
        return Ok(false);
    }
    let removed = unlink(path)?;
    if removed {
        let kind = file_kind(meta.file_type());
        tracing::warn!(path = %path.display(), kind, "removed an entry that is not a chunk file");
    }
    Ok(removed)
}

/// Lets `fill` write a fresh temp file in `dir`, then renames it to `path`.
fn write_atomically(
    dir: &Path,
    path: &Path,
    opts: &DiskTierOptions,
    fill: impl FnOnce(&File) -> io::Result<()>,
) -> Result<(), StoreError> {
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!("{TEMP_PREFIX}{}-{n}", std::process::id()));
    let write = || -> io::Result<()> {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(opts.file_mode)
            .open(&tmp)?;
        fill(&file)?;
        if opts.fsync {
            file.sync_data()?;
        }
        fs::rename(&tmp, path)?;
        if opts.fsync {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        StoreError::io(path, e)
    })
}

/// Unlinks a file; `Ok(false)` if it was already gone.
fn unlink(path: &Path) -> Result<bool, StoreError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(StoreError::io(path, e)),
    }
}

fn header_len(key_len: usize) -> usize {
    (FIXED_HEADER + key_len).next_multiple_of(HEADER_ALIGN)
}

/// The header of a chunk; the caller has checked `key` against `MAX_KEY_LEN`.
fn encode_header(key: &str, meta: ChunkMeta, payload_len: usize, payload_checksum: u64) -> Vec<u8> {
    let header_len = header_len(key.len());
    let mut h = vec![0u8; header_len];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(header_len as u32).to_le_bytes());
    h[16..20].copy_from_slice(&(key.len() as u32).to_le_bytes());
    h[20..24].copy_from_slice(&meta.num_tokens.to_le_bytes());
    h[24..32].copy_from_slice(&meta.layout_fingerprint.to_le_bytes());
    h[32..40].copy_from_slice(&(payload_len as u64).to_le_bytes());
    h[40..48].copy_from_slice(&payload_checksum.to_le_bytes());
    h[FIXED_HEADER..FIXED_HEADER + key.len()].copy_from_slice(key.as_bytes());
    let checksum = header_checksum(&h);
    h[48..56].copy_from_slice(&checksum.to_le_bytes());
    h
}

fn header_checksum(header: &[u8]) -> u64 {
    xxh3_64_with_seed(&header[FIXED_HEADER..], xxh3_64(&header[..48]))
}

fn corrupt(path: &Path, reason: String) -> StoreError {
    StoreError::Corrupt {
        path: path.to_path_buf(),
        reason,
    }
}

fn too_short(path: &Path, file_len: u64) -> StoreError {
    corrupt(
        path,
        format!("truncated: {file_len} bytes, shorter than the {FIXED_HEADER}-byte header"),
    )
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Parses and checks a header from the start of a file of `file_len` bytes: magic, version,
/// lengths, header checksum, and that the file is exactly header plus payload long.
fn decode_header(path: &Path, bytes: &[u8], file_len: u64) -> Result<Header, StoreError> {
    if bytes.len() < FIXED_HEADER {
        return Err(too_short(path, file_len));
    }
    if bytes[0..8] != MAGIC {
        return Err(corrupt(path, "bad magic: not a kvrelay chunk".into()));
    }
    let version = u16::from_le_bytes([bytes[8], bytes[9]]);
    if version != FORMAT_VERSION {
        return Err(corrupt(
            path,
            format!("format version {version}; this kvrelay reads {FORMAT_VERSION}"),
        ));
    }
    let header_len = le_u32(bytes, 12) as usize;
    let key_len = le_u32(bytes, 16) as usize;
    if key_len > MAX_KEY_LEN || header_len != self::header_len(key_len) {
        return Err(corrupt(
            path,
            format!("bad header: length {header_len} with a key of {key_len} bytes"),
        ));
    }
    if bytes.len() < header_len {
        return Err(corrupt(
            path,
            format!("truncated: {file_len} bytes, shorter than its {header_len}-byte header"),
        ));
    }
    let header = &bytes[..header_len];
    let (stored, computed) = (le_u64(header, 48), header_checksum(header));
    if stored != computed {
        return Err(corrupt(
            path,
            format!("header checksum mismatch: stored {stored:#018x}, computed {computed:#018x}"),
        ));
    }
    let key = std::str::from_utf8(&header[FIXED_HEADER..FIXED_HEADER + key_len])
        .map_err(|_| corrupt(path, "key in the header is not UTF-8".into()))?
        .to_string();
    let payload_len = le_u64(header, 32);
    let expected = (header_len as u64).checked_add(payload_len);
    if expected != Some(file_len) {
        let reason = match expected {
            Some(expected) if file_len < expected => {
                format!("truncated: {file_len} bytes, header says {expected}")
            }
            _ => format!("{file_len} bytes, but header says {payload_len} payload bytes"),
        };
        return Err(corrupt(path, reason));
    }
    Ok(Header {
        key,
        header_len,
        num_tokens: le_u32(header, 20),
        layout_fingerprint: le_u64(header, 24),
        payload_len,
        payload_checksum: le_u64(header, 40),
    })
}

/// Reads a whole chunk file into `contents` (exactly the file's length, from the open file's
/// metadata) and runs every check a reader needs. With `expect`, also checks that the header
/// names that key and layout fingerprint; without, that the file name matches the key in the
/// header. The header is checked as soon as the first piece is in, so another model's chunk
/// costs one piece's read; the rest is read and hashed by [`read_and_hash`].
fn read_and_check(
    path: &Path,
    file: &File,
    contents: &mut [u8],
    expect: Option<(&str, u64)>,
) -> Result<Header, StoreError> {
    let file_len = contents.len() as u64;
    if file_len < FIXED_HEADER as u64 {
        return Err(too_short(path, file_len));
    }
    let read_at = |buf: &mut [u8], offset: usize| {
        file.read_exact_at(buf, offset as u64)
            .map_err(|e| match e.kind() {
                // The length came from the same open file, and chunk files never shrink: only
                // a foreign writer can cut one short under the reader.
                io::ErrorKind::UnexpectedEof => corrupt(path, "truncated while being read".into()),
                _ => StoreError::io(path, e),
            })
    };
    // The first piece holds the header (`MAX_HEADER` < `READ_PIECE`); every read after it
    // starts at a multiple of `READ_PIECE` in the file and in the 2 MiB aligned buffer.
    let head = contents.len().min(READ_PIECE);
    read_at(&mut contents[..head], 0)?;
    let header = decode_header(path, &contents[..head], file_len)?;
    match expect {
        Some((key, fingerprint)) => {
            if header.key != key {
                return Err(corrupt(
                    path,
                    format!("header names key {:?}, expected {key:?}", header.key),
                ));
            }
            if header.layout_fingerprint != fingerprint {
                return Err(StoreError::FingerprintMismatch {
                    key: header.key,
                    expected: fingerprint,
                    found: header.layout_fingerprint,
                });
            }
        }
        None => {
            let name = path.file_name().and_then(OsStr::to_str);
            if name.and_then(parse_file_id) != Some(file_id(&header.key)) {
                return Err(corrupt(
                    path,
                    format!(
                        "file name does not match the key {:?} in its header",
                        header.key
                    ),
                ));
            }
        }
    }
    let (first, rest) = contents.split_at_mut(head);
    let computed = read_and_hash(path, &first[header.header_len..], rest, head, read_at)?;
    if computed != header.payload_checksum {
        return Err(corrupt(
            path,
            format!(
                "payload checksum mismatch: stored {:#018x}, computed {computed:#018x}",
                header.payload_checksum
            ),
        ));
    }
    Ok(header)
}

/// Payloads from this size on are read by two threads at once (see [`read_and_hash`]).
/// Starting the helper costs ~55 µs on this VM; measured on 2026-12-03 (`bench store`,
/// two runs each, ratio to a plain read), 2 MiB chunks read at 0.92–0.98 with it against
/// 0.76–0.77 in line, 4 MiB chunks at 1.08–1.09 against 0.79.
const TWO_READERS_FROM: usize = 2 << 20;

/// Payloads from this size on are hashed by a helper thread while the caller writes them.
/// Hashing in line cost a page-cache write a quarter of its speed (`kvrelay bench store`,
/// 32 MiB chunks, 2 cores: 0.74–0.76 of a plain write); beside it, 0.95–0.98. The thread
/// costs ~55 µs to start: at 2 MiB it already pays (0.99–1.08 against 0.78–0.79 in line);
/// at 1 MiB the two are alike in the noise (0.87–1.14).
const HASH_BESIDE_FROM: usize = 2 << 20;

/// Writes `data` at file offset `at` in 1 MiB pieces, calling `before_each` with each piece
/// just before it is written.
fn write_payload(
    file: &File,
    data: &[u8],
    at: usize,
    mut before_each: impl FnMut(&[u8]),
) -> io::Result<()> {
    const PIECE: usize = 1 << 20;
    for (i, piece) in data.chunks(PIECE).enumerate() {
        before_each(piece);
        file.write_all_at(piece, (at + i * PIECE) as u64)?;
    }
    Ok(())
}

/// Reads `rest` from file offset `at` in pieces of [`READ_PIECE`] and returns the xxh3-64 of
/// `hashed_first` followed by `rest`. Each piece is hashed right after it lands, by the
/// thread that read it, while it is still in that core's cache, so verifying costs no
/// second pass over memory.
///
/// From [`TWO_READERS_FROM`] bytes on, a helper thread reads the odd pieces and the caller
/// the even ones, both at once, and each hashes its own pieces in turn (the hash is one
/// stream, so hashes go in file order). Measured with 32 MiB chunk files (`kvrelay bench
/// store`, 2 cores): hashing in line cost a page-cache read ~30% of its speed (12.4–13.1
/// against 17.3–17.9 GB/s); a helper that hashed the pieces the caller read was slower
/// still (10.0–11.2), as every line crossed between cores; reads one at a time in turn,
/// each overlapping the other thread's hash, reached 0.84–0.88 of a plain read (the hash
/// turn handed over by spinning ([`HashTurn`]), not by waking a sleeping thread); reading
/// at once, 1.39–1.41 of it on 2026-12-03, as the kernel copies on both cores.
fn read_and_hash(
    path: &Path,
    hashed_first: &[u8],
    rest: &mut [u8],
    at: usize,
    read_at: impl Fn(&mut [u8], usize) -> Result<(), StoreError> + Sync,
) -> Result<u64, StoreError> {
    let mut hasher = XxHash3_64::new();
    hasher.write(hashed_first);
    if hashed_first.len() + rest.len() < TWO_READERS_FROM {
        for (i, piece) in rest.chunks_mut(READ_PIECE).enumerate() {
            read_at(piece, at + i * READ_PIECE)?;
            hasher.write(piece);
        }
        return Ok(hasher.finish());
    }
    let turns = HashTurn::new(hasher);
    let (mut caller_pieces, mut helper_pieces) = (Vec::new(), Vec::new());
    for (i, piece) in rest.chunks_mut(READ_PIECE).enumerate() {
        let pieces = if i % 2 == 0 {
            &mut caller_pieces
        } else {
            &mut helper_pieces
        };
        pieces.push((i, piece));
    }
    let work = |pieces: Vec<(usize, &mut [u8])>| {
        for (i, piece) in pieces {
            let read = read_at(piece, at + i * READ_PIECE);
            if let Err(err) = read {
                return turns.fail(err);
            }
            if !turns.wait(i) {
                return;
            }
            turns.hasher.lock().write(piece);
            turns.advance(i + 1);
        }
    };
    beside(
        "kvrelay-disk-read",
        || work(helper_pieces),
        || work(caller_pieces),
    )
    .map_err(|e| StoreError::io(path, e))?;
    match turns.error.into_inner() {
        Some(err) => Err(err),
        None => Ok(turns.hasher.into_inner().finish()),
    }
}

/// Runs `helper` on a thread named `name` while the calling thread runs `caller`, and
/// returns both results (the helper's first) once both are done; a panic on the helper is
/// raised again here. Fails only if the thread cannot be started.
fn beside<H: Send, C>(
    name: &str,
    helper: impl FnOnce() -> H + Send,
    caller: impl FnOnce() -> C,
) -> io::Result<(H, C)> {
    std::thread::scope(|scope| {
        let helper = std::thread::Builder::new()
            .name(name.into())
            .spawn_scoped(scope, helper)?;
        let ours = caller();
        let theirs = helper
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        Ok((theirs, ours))
    })
}

/// Whose turn it is to hash, for the two readers of [`read_and_hash`]. A turn passes every
/// ~10 µs; a sleeping thread takes longer than that to wake (on this VM), so a waiter spins
/// for up to [`HashTurn::SPIN`] before it sleeps.
struct HashTurn {
    /// The piece to hash next.
    next_hash: AtomicUsize,
    /// Set by the first read that fails; every waiter then gives up.
    failed: AtomicBool,
    error: Mutex<Option<StoreError>>,
    /// Only the thread whose turn it is to hash locks it.
    hasher: Mutex<XxHash3_64>,
    sleeping: Mutex<()>,
    wake: Condvar,
}

impl HashTurn {
    const SPIN: Duration = Duration::from_micros(50);

    fn new(hasher: XxHash3_64) -> Self {
        HashTurn {
            next_hash: AtomicUsize::new(0),
            failed: AtomicBool::new(false),
            error: Mutex::new(None),
            hasher: Mutex::new(hasher),
            sleeping: Mutex::new(()),
            wake: Condvar::new(),
        }
    }

    /// Waits until piece `i` is the one to hash; false if a read failed instead.
    fn wait(&self, i: usize) -> bool {
        let ready =
            || self.failed.load(Ordering::Acquire) || self.next_hash.load(Ordering::Acquire) == i;
        let spin_until = std::time::Instant::now() + Self::SPIN;
        while !ready() && std::time::Instant::now() < spin_until {
            std::hint::spin_loop();
        }
        let mut sleeping = self.sleeping.lock();
        while !ready() {
            self.wake.wait(&mut sleeping);
        }
        !self.failed.load(Ordering::Acquire)
    }

    fn advance(&self, to: usize) {
        self.next_hash.store(to, Ordering::Release);
        // Under the lock, so a waiter between its last check and its sleep hears it.
        let _sleeping = self.sleeping.lock();
        self.wake.notify_all();
    }

    fn fail(&self, err: StoreError) {
        self.error.lock().get_or_insert(err);
        self.failed.store(true, Ordering::Release);
        let _sleeping = self.sleeping.lock();
        self.wake.notify_all();
    }
}

fn entry_of(path: &Path, header: Header, meta: &fs::Metadata) -> DiskEntry {
    DiskEntry {
        path: path.to_path_buf(),
        num_tokens: header.num_tokens,
        layout_fingerprint: header.layout_fingerprint,
        payload_bytes: header.payload_len,
        file_bytes: meta.len(),
        modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        key: header.key,
    }
}

/// Reads and checks only the header of a chunk file.
fn read_header(path: &Path) -> Result<DiskEntry, StoreError> {
    let (file, meta) = open_regular(path)?;
    let mut buf = Vec::with_capacity(MAX_HEADER);
    file.take(MAX_HEADER as u64)
        .read_to_end(&mut buf)
        .map_err(|e| StoreError::io(path, e))?;
    let header = decode_header(path, &buf, meta.len())?;
    Ok(entry_of(path, header, &meta))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file of `len` bytes of a fixed pattern, read by `read_and_hash` through `read_at`,
    /// which fails for the piece at `fail_at` (if any).
    fn hash_of_reads(len: usize, fail_at: Option<usize>) -> Result<u64, StoreError> {
        let file: Vec<u8> = (0..len as u32).map(|i| (i ^ (i >> 11)) as u8).collect();
        let first = 1000;
        let mut rest = vec![0u8; len - first];
        let read_at = |buf: &mut [u8], offset: usize| {
            if fail_at.is_some_and(|at| (offset..offset + buf.len()).contains(&at)) {
                return Err(corrupt(Path::new("f"), "truncated while being read".into()));
            }
            buf.copy_from_slice(&file[offset..offset + buf.len()]);
            Ok(())
        };
        let hash = read_and_hash(Path::new("f"), &file[..first], &mut rest, first, read_at)?;
        assert!(rest == file[first..], "the bytes read are the file's");
        assert_eq!(hash, xxh3_64(&file));
        Ok(hash)
    }

    #[test]
    fn one_or_two_readers_hash_the_whole_file_and_report_a_failed_read() {
        for len in [
            READ_PIECE + 5,
            TWO_READERS_FROM - 1,
            TWO_READERS_FROM + 3 * READ_PIECE + 9,
        ] {
            hash_of_reads(len, None).unwrap();
            // A failed read in the first piece after the header, and one in a late piece
            // (the caller's and the helper's when two read).
            for fail_at in [
                1000,
                len - 10,
                (len - 10).saturating_sub(READ_PIECE).max(1000),
            ] {
                let err = hash_of_reads(len, Some(fail_at)).unwrap_err();
                assert!(
                    err.to_string().contains("truncated"),
                    "{len}, {fail_at}: {err}"
                );
            }
        }
    }
}
