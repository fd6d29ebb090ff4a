//! Storage tiers: the [`Tier`] trait and the ordered [`TierStack`] that an engine saves to
//! and loads from.
//!
//! Tiers follow LMCache's storage manager (reference §3.6): a put writes through to every
//! tier, a lookup counts leading hits across tiers in order, and a hit in a lower tier is
//! promoted into the tiers above it. Unlike LMCache's local disk backend, the disk tier keeps
//! a checksummed header in every file, so it survives restarts and is shared by processes.
//!
//! Exactness comes first (DESIGN invariant 1): a tier that finds a chunk it cannot trust
//! returns an error, and the stack turns that error into a counted, logged miss.
//!
//! The remote tier, [`redis::RedisTier`] (feature `redis`), stores chunks in LMCache's Redis
//! layout so kvrelay and LMCache engines can share a server.

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;

use crate::keys::CacheKey;

mod arena;
pub mod cpu;
pub mod disk;
mod lru;
#[cfg(feature = "redis")]
pub mod redis;
pub mod remote;

pub use cpu::CpuTier;
pub use disk::{BadChunk, DiskEntry, DiskTier, DiskTierOptions, ForeignEntry, GcReport, Listing};
#[cfg(feature = "redis")]
pub use redis::RedisTier;
pub use remote::RemoteOptions;

/// What a reader must know about a chunk besides its key to use its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChunkMeta {
    /// Identifies the engine layout the bytes were gathered from; a reader with a different
    /// layout must not load them.
    pub layout_fingerprint: u64,
    /// Tokens the chunk covers (the last chunk of a request may be partial).
    pub num_tokens: u32,
}

/// One chunk of KV as a tier returns it. `data` may borrow the tier's memory (a CPU entry or
/// a disk mapping); while it is alive, the CPU tier will not evict that entry.
#[derive(Clone, Debug)]
pub struct Chunk {
    pub meta: ChunkMeta,
    pub data: Bytes,
    /// Where the same bytes live in device memory, when the tier keeps them there too (the
    /// PD buffer on an NPU, whose `data` is the page's host copy): a load may copy from
    /// there device to device.
    pub device: Option<crate::device::DevicePage>,
}

/// `contains` for a tier whose lookups are batched round trips: one key asked through
/// its `contains_many`, so both share one path.
pub fn contains_by_batch<T: Tier + ?Sized>(tier: &T, key: &CacheKey) -> bool {
    let mut found = [false];
    tier.contains_many(std::slice::from_ref(key), &mut found);
    found[0]
}

/// Why a tier could not store or return a chunk.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: corrupt chunk: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    /// A symlink, FIFO, socket, device or directory under a chunk's name; never read.
    #[error("{path}: a {kind} where a chunk file belongs; only regular files are read")]
    NotRegularFile { path: PathBuf, kind: &'static str },
    #[error("chunk {key}: layout fingerprint {found:#018x} does not match the expected {expected:#018x} (saved by another model or layout)")]
    FingerprintMismatch {
        key: String,
        expected: u64,
        found: u64,
    },
    #[error("chunk of {size} bytes is larger than the tier's whole budget of {budget} bytes")]
    TooLarge { size: u64, budget: u64 },
    /// A chunk larger than the CPU tier's slots, which are sized for a whole chunk.
    #[error("chunk of {size} bytes is larger than the CPU tier's slots of {slot} bytes")]
    LargerThanSlot { size: u64, slot: u64 },
    #[error("could not allocate the CPU tier's {bytes} bytes: {reason}")]
    ArenaAlloc { bytes: u64, reason: String },
    #[error("no room for {needed} bytes: budget {budget} bytes, {in_use} bytes held by readers cannot be evicted")]
    BudgetExhausted {
        needed: u64,
        budget: u64,
        in_use: u64,
    },
    #[error("{path} is not a usable kvrelay disk tier directory: {reason}")]
    BadDirectory { path: PathBuf, reason: String },
    #[error("key string of {len} bytes is longer than the {max} bytes a chunk header holds")]
    KeyTooLong { len: usize, max: usize },
    #[error("the tier stack has no tiers")]
    NoTiers,
    #[error("the {tier} tier is read-only here: {reason}")]
    ReadOnly {
        tier: &'static str,
        reason: &'static str,
    },
    /// A remote store could not be reached or failed a request.
    #[error("{endpoint}: {reason}")]
    Remote { endpoint: String, reason: String },
    /// A put whose bytes do not match its token count in the tier's KV geometry.
    #[error("chunk {key}: {len} bytes, but {num_tokens} tokens of this tier's KV geometry are {expected} bytes")]
    ChunkSize {
        key: String,
        len: u64,
        num_tokens: u32,
        expected: u64,
    },
}

impl StoreError {
    /// Wraps an IO error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        StoreError::Io {
            path: path.into(),
            source,
        }
    }

    /// A short, stable name for the kind of failure, used in counters and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            StoreError::Io { .. } => "io",
            StoreError::Corrupt { .. } => "corrupt",
            StoreError::NotRegularFile { .. } => "not_regular_file",
            StoreError::FingerprintMismatch { .. } => "fingerprint_mismatch",
            StoreError::TooLarge { .. } => "too_large",
            StoreError::LargerThanSlot { .. } => "larger_than_slot",
            StoreError::ArenaAlloc { .. } => "arena_alloc",
            StoreError::BudgetExhausted { .. } => "budget_exhausted",
            StoreError::BadDirectory { .. } => "bad_directory",
            StoreError::KeyTooLong { .. } => "key_too_long",
            StoreError::ReadOnly { .. } => "read_only",
            StoreError::NoTiers => "no_tiers",
            StoreError::Remote { .. } => "remote",
            StoreError::ChunkSize { .. } => "chunk_size",
        }
    }
}

/// A snapshot of one tier's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TierStats {
    pub entries: u64,
    /// Payload bytes held (the disk tier counts whole files).
    pub bytes: u64,
    pub budget: u64,
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    /// Chunks found but unusable: bad checksum, truncated, torn, wrong key in the header,
    /// not a regular file.
    pub corrupt: u64,
    /// Chunks found but saved under another layout fingerprint.
    pub rejected: u64,
    /// Operations that failed because the tier could not be reached (remote tiers).
    pub unavailable: u64,
    /// Hits (also counted in `hits`) loaded without a kvrelay checksum: chunks another
    /// writer, such as LMCache, stored, accepted because their metadata matched exactly.
    pub unchecked: u64,
}

/// One storage tier. Implementations are shared between threads.
pub trait Tier: Send + Sync {
    fn name(&self) -> &str;
    fn contains(&self, key: &CacheKey) -> bool;
    /// Sets `found[i]` for each `keys[i]` present; entries already true are not asked
    /// again. Tiers with a round trip per lookup override it to ask for all keys at once.
    fn contains_many(&self, keys: &[CacheKey], found: &mut [bool]) {
        for (key, found) in keys.iter().zip(found) {
            if !*found {
                *found = self.contains(key);
            }
        }
    }
    /// `Ok(None)`: absent. `Err`: present but unusable (corrupt, truncated, torn, saved with
    /// another layout fingerprint, IO error).
    fn get(&self, key: &CacheKey, expected_fingerprint: u64) -> Result<Option<Chunk>, StoreError>;
    /// `get` on behalf of the request that will load the chunk. A tier that holds copies
    /// per request (the PD buffer) hands the request its own copy first; the others do
    /// not care whose load it is.
    fn get_for_request(
        &self,
        key: &CacheKey,
        expected_fingerprint: u64,
        _request_id: &str,
    ) -> Result<Option<Chunk>, StoreError> {
        self.get(key, expected_fingerprint)
    }
    fn put(&self, key: &CacheKey, meta: ChunkMeta, data: &[u8]) -> Result<(), StoreError>;
    /// `put` of bytes another tier's `get` returned (a promotion). A tier that keeps
    /// chunks in memory may keep a reference to them instead of a copy.
    fn put_shared(&self, key: &CacheKey, meta: ChunkMeta, data: &Bytes) -> Result<(), StoreError> {
        self.put(key, meta, data)
    }
    /// Returns whether the key was present.
    fn remove(&self, key: &CacheKey) -> Result<bool, StoreError>;
    fn stats(&self) -> TierStats;
    /// A request ended (finished, aborted or failed): free whatever this tier reserved for
    /// it. Most tiers hold nothing per request; a PD buffer holds the KV a prefiller sent
    /// for it, which the request may not have consumed whole.
    fn release_request(&self, _request_id: &str, _scope: RequestIdScope) {}
    /// Why `contains` says `key` is absent, when it is more than "not stored" (something
    /// is there but unusable, or the tier cannot be reached). Asked once per lookup that
    /// stops, so it may take a round trip.
    fn why_absent(&self, _key: &CacheKey) -> Option<String> {
        None
    }
}

/// Who else knows a request id: what a tier may conclude from it when the request ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestIdScope {
    /// The id a PD proxy gave the request (`disagg_spec.req_id`); its prefiller sends KV
    /// under the same id, so KV arriving for it after the end can be refused.
    Shared,
    /// The engine's own id: KV held under it is the request's only by the convention that
    /// a server names a PD request by its proxy id, and an unknown id may be another
    /// engine's request, so nothing is remembered about it.
    Local,
}

/// A snapshot of the stack's lookup counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StackStats {
    pub hits: u64,
    pub misses: u64,
    /// Chunks copied from a lower tier into a higher one.
    pub promotions: u64,
    /// Tier errors met during `get`, by reason; each made that tier a miss.
    pub corrupt: u64,
    pub fingerprint_mismatch: u64,
    pub io_errors: u64,
    pub other_errors: u64,
}

#[derive(Default)]
struct StackCounters {
    hits: AtomicU64,
    misses: AtomicU64,
    promotions: AtomicU64,
    corrupt: AtomicU64,
    fingerprint_mismatch: AtomicU64,
    io_errors: AtomicU64,
    other_errors: AtomicU64,
}

/// An ordered list of tiers, highest (fastest) first.
pub struct TierStack {
    tiers: Vec<Arc<dyn Tier>>,
    counters: StackCounters,
}

impl fmt::Debug for TierStack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.tiers.iter().map(|t| t.name()).collect();
        f.debug_struct("TierStack").field("tiers", &names).finish()
    }
}

impl TierStack {
    pub fn new(tiers: Vec<Arc<dyn Tier>>) -> Self {
        TierStack {
            tiers,
            counters: StackCounters::default(),
        }
    }

    pub fn tiers(&self) -> &[Arc<dyn Tier>] {
        &self.tiers
    }

    /// Number of leading keys present in some tier; stops at the first key found nowhere
    /// (a chunk after a gap is useless: its KV depends on the missing prefix). Each tier is
    /// asked once, for the keys the tiers above it lack, so a remote tier costs one round
    /// trip per lookup rather than one per key.
    pub fn prefix_hits(&self, keys: &[CacheKey]) -> usize {
        let mut found = vec![false; keys.len()];
        for tier in &self.tiers {
            let Some(first_missing) = found.iter().position(|f| !f) else {
                break;
            };
            tier.contains_many(&keys[first_missing..], &mut found[first_missing..]);
        }
        found.iter().take_while(|f| **f).count()
    }

    /// Why no tier has `key`, tier by tier, for a log line: `None` when every tier simply
    /// does not store it.
    pub fn why_absent(&self, key: &CacheKey) -> Option<String> {
        let reasons: Vec<String> = self
            .tiers
            .iter()
            .filter_map(|t| t.why_absent(key).map(|r| format!("{}: {r}", t.name())))
            .collect();
        (!reasons.is_empty()).then(|| reasons.join("; "))
    }

    /// The first tier holding a valid chunk wins, and the chunk is copied into the tiers
    /// above it. A tier error is a miss in that tier: counted, logged, and the search goes on
    /// to the next tier, so bad bytes are never returned.
    pub fn get(&self, key: &CacheKey, expected_fingerprint: u64) -> Option<Chunk> {
        self.get_from_tiers(key, |tier| tier.get(key, expected_fingerprint))
    }

    /// [`TierStack::get`] on behalf of `request_id` ([`Tier::get_for_request`]).
    pub fn get_for_request(
        &self,
        key: &CacheKey,
        expected_fingerprint: u64,
        request_id: &str,
    ) -> Option<Chunk> {
        self.get_from_tiers(key, |tier| {
            tier.get_for_request(key, expected_fingerprint, request_id)
        })
    }

    fn get_from_tiers(
        &self,
        key: &CacheKey,
        get: impl Fn(&dyn Tier) -> Result<Option<Chunk>, StoreError>,
    ) -> Option<Chunk> {
        for (level, tier) in self.tiers.iter().enumerate() {
            match get(tier.as_ref()) {
                Ok(Some(chunk)) => {
                    self.counters.hits.fetch_add(1, Ordering::Relaxed);
                    self.promote(key, &chunk, &self.tiers[..level]);
                    return Some(chunk);
                }
                Ok(None) => {}
                Err(err) => {
                    self.count_error(&err);
                    tracing::warn!(tier = tier.name(), %key, reason = err.reason(), error = %err, "unusable chunk treated as a miss");
                }
            }
        }
        self.counters.misses.fetch_add(1, Ordering::Relaxed);
        None
    }

    /// Writes through to every tier. Fails only if no tier stored the chunk (then with the
    /// first tier's error); partial failures are logged.
    pub fn put(&self, key: &CacheKey, meta: ChunkMeta, data: &[u8]) -> Result<(), StoreError> {
        let mut first_error = None;
        let mut stored = false;
        for tier in &self.tiers {
            match tier.put(key, meta, data) {
                Ok(()) => stored = true,
                Err(err) => {
                    tracing::warn!(tier = tier.name(), %key, reason = err.reason(), error = %err, "put failed in one tier");
                    first_error.get_or_insert(err);
                }
            }
        }
        match (stored, first_error) {
            (true, _) => Ok(()),
            (false, Some(err)) => Err(err),
            (false, None) => Err(StoreError::NoTiers),
        }
    }

    /// Tells every tier that `request_id` ended ([`Tier::release_request`]).
    pub fn release_request(&self, request_id: &str, scope: RequestIdScope) {
        for tier in &self.tiers {
            tier.release_request(request_id, scope);
        }
    }

    pub fn stats(&self) -> StackStats {
        let c = &self.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StackStats {
            hits: load(&c.hits),
            misses: load(&c.misses),
            promotions: load(&c.promotions),
            corrupt: load(&c.corrupt),
            fingerprint_mismatch: load(&c.fingerprint_mismatch),
            io_errors: load(&c.io_errors),
            other_errors: load(&c.other_errors),
        }
    }

    fn promote(&self, key: &CacheKey, chunk: &Chunk, above: &[Arc<dyn Tier>]) {
        for tier in above {
            match tier.put_shared(key, chunk.meta, &chunk.data) {
                Ok(()) => {
                    self.counters.promotions.fetch_add(1, Ordering::Relaxed);
                }
                // A full upper tier is normal under load; the chunk is still returned.
                Err(err) => {
                    tracing::debug!(tier = tier.name(), %key, error = %err, "promotion skipped")
                }
            }
        }
    }

    fn count_error(&self, err: &StoreError) {
        let c = &self.counters;
        let counter = match err {
            StoreError::Corrupt { .. } | StoreError::NotRegularFile { .. } => &c.corrupt,
            StoreError::FingerprintMismatch { .. } => &c.fingerprint_mismatch,
            StoreError::Io { .. } | StoreError::Remote { .. } => &c.io_errors,
            _ => &c.other_errors,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}
