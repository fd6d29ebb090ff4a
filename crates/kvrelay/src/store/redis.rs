//! The Redis/Valkey remote tier, in LMCache's Redis layout so kvrelay and LMCache engines
//! can share one server.
//!
//! Each chunk is three string keys, named by the key's LMCache string form `<key>`:
//!
//! | key | value | read by |
//! |---|---|---|
//! | `<key>kv_bytes` | the raw chunk bytes (`KV_2LTD` or `KV_MLA_FMT`) | LMCache and kvrelay |
//! | `<key>metadata` | LMCache's 28-byte `RemoteMetadata` ([`RemoteMetadata`]) | LMCache and kvrelay |
//! | `<key>kvrelay` | kvrelay's 64-byte check record (below) | kvrelay only |
//!
//! The checksums live in a key of their own because LMCache takes both of its values whole:
//! `kv_bytes` is the chunk, `metadata.length` bytes long, and the multi-group form of
//! `RemoteMetadata` counts its shape groups by the value's length, so bytes appended to
//! either would be misread by an LMCache reader. A key it never asks for is invisible to it.
//!
//! Check record (little-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `KVRREDIS` |
//! | 8 | 2 | version (1) |
//! | 10 | 2 | reserved, zero |
//! | 12 | 4 | tokens in the chunk |
//! | 16 | 8 | layout fingerprint |
//! | 24 | 8 | `kv_bytes` length |
//! | 32 | 8 | xxh3-64 of `kv_bytes` |
//! | 40 | 8 | xxh3-64 of `metadata` |
//! | 48 | 8 | xxh3-64 of the key string (a record copied to another key fails) |
//! | 56 | 8 | xxh3-64 of bytes 0..56 |
//!
//! A chunk with a record is loaded only if all three values are present and agree; a value
//! of the wrong size or checksum (say, `kv_bytes` LMCache overwrote after kvrelay wrote the
//! record) is a counted, logged miss.
//!
//! A chunk without a record was written by LMCache (or another client that speaks its
//! layout). It has no checksum, so it is loaded only when its metadata is exactly what this
//! tier would write for the same number of tokens (format, dtype code, shape, length) and
//! `kv_bytes` is exactly `length` bytes, and it is counted as `unchecked`. With
//! [`RemoteOptions::accept_unchecked`] off, such chunks are absent to lookups and a get of
//! one is a counted miss.
//!
//! A put writes the three keys in one MULTI/EXEC on a single server;
//! in a cluster the keys live in different slots, so a reader racing a put may see a mix,
//! which the checksums turn into a miss.
//!
//! Failures never block for long: connections have connect, read and write timeouts, and
//! after a transport failure the tier answers "unavailable" at once for
//! [`RemoteOptions::retry_after`] before it dials again. While unavailable, lookups are
//! misses and puts fail (the stack still stores in the local tiers).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Condvar, Mutex};
use redis::{Cmd, RedisError, RedisResult, Value};
use xxhash_rust::xxh3::xxh3_64;

use super::remote::{RemoteMetadata, RemoteOptions};
use super::{Chunk, ChunkMeta, StoreError, Tier, TierStats};
use crate::keys::CacheKey;
use crate::layout::KvCacheSpec;

const METADATA_SUFFIX: &str = "metadata";
const KV_SUFFIX: &str = "kv_bytes";
const RECORD_SUFFIX: &str = "kvrelay";

const RECORD_MAGIC: [u8; 8] = *b"KVRREDIS";
const RECORD_VERSION: u16 = 1;
const RECORD_LEN: usize = 64;
const RECORD_SUMMED: usize = 56;

/// URL schemes of a Redis Cluster: `redis-cluster://[user:pass@]host:port,host:port,...`.
const CLUSTER_SCHEMES: [(&str, &str); 2] =
    [("redis-cluster", "redis"), ("rediss-cluster", "rediss")];

/// The remote tier over one Redis or Valkey server, or one Redis Cluster.
pub struct RedisTier {
    pool: Pool,
    spec: KvCacheSpec,
    fingerprint: u64,
    max_value_bytes: Option<u64>,
    /// `SET ... PX` argument, milliseconds.
    ttl_ms: Option<u64>,
    accept_unchecked: bool,
    counters: Counters,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    corrupt: AtomicU64,
    rejected: AtomicU64,
    unavailable: AtomicU64,
    unchecked: AtomicU64,
}

/// The three Redis keys of one chunk.
struct ChunkKeys {
    name: String,
    metadata: String,
    kv: String,
    record: String,
}

impl ChunkKeys {
    fn new(key: &CacheKey) -> Self {
        let name = key.to_string();
        ChunkKeys {
            metadata: format!("{name}{METADATA_SUFFIX}"),
            kv: format!("{name}{KV_SUFFIX}"),
            record: format!("{name}{RECORD_SUFFIX}"),
            name,
        }
    }
}

impl ChunkKeys {
    /// `EXISTS` of the record, the metadata and the kv_bytes, in that order.
    fn exists(self) -> [Cmd; 3] {
        [self.record, self.metadata, self.kv].map(|name| {
            let mut cmd = redis::cmd("EXISTS");
            cmd.arg(name);
            cmd
        })
    }
}

/// The replies to [`ChunkKeys::exists`].
fn existing(replies: &[Value]) -> [bool; 3] {
    [0, 1, 2].map(|i| matches!(replies.get(i), Some(Value::Int(1))))
}

/// What the check record says about a chunk.
#[derive(Debug, PartialEq, Eq)]
struct Record {
    num_tokens: u32,
    layout_fingerprint: u64,
    kv_len: u64,
    kv_checksum: u64,
    metadata_checksum: u64,
    key_checksum: u64,
}

impl Record {
    fn encode(&self) -> [u8; RECORD_LEN] {
        let mut r = [0u8; RECORD_LEN];
        r[0..8].copy_from_slice(&RECORD_MAGIC);
        r[8..10].copy_from_slice(&RECORD_VERSION.to_le_bytes());
        r[12..16].copy_from_slice(&self.num_tokens.to_le_bytes());
        r[16..24].copy_from_slice(&self.layout_fingerprint.to_le_bytes());
        r[24..32].copy_from_slice(&self.kv_len.to_le_bytes());
        r[32..40].copy_from_slice(&self.kv_checksum.to_le_bytes());
        r[40..48].copy_from_slice(&self.metadata_checksum.to_le_bytes());
        r[48..56].copy_from_slice(&self.key_checksum.to_le_bytes());
        let sum = xxh3_64(&r[..RECORD_SUMMED]);
        r[RECORD_SUMMED..].copy_from_slice(&sum.to_le_bytes());
        r
    }

    fn decode(r: &[u8]) -> Result<Self, String> {
        if r.len() != RECORD_LEN {
            return Err(format!(
                "check record is {} bytes, expected {RECORD_LEN}",
                r.len()
            ));
        }
        if r[0..8] != RECORD_MAGIC {
            return Err("check record has a bad magic".into());
        }
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&r[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let (stored, computed) = (u64_at(RECORD_SUMMED), xxh3_64(&r[..RECORD_SUMMED]));
        if stored != computed {
            return Err(format!(
                "check record checksum mismatch: stored {stored:#018x}, computed {computed:#018x}"
            ));
        }
        let version = u16::from_le_bytes([r[8], r[9]]);
        if version != RECORD_VERSION {
            return Err(format!(
                "check record version {version}; this kvrelay reads {RECORD_VERSION}"
            ));
        }
        Ok(Record {
            num_tokens: u32::from_le_bytes([r[12], r[13], r[14], r[15]]),
            layout_fingerprint: u64_at(16),
            kv_len: u64_at(24),
            kv_checksum: u64_at(32),
            metadata_checksum: u64_at(40),
            key_checksum: u64_at(48),
        })
    }
}

impl RedisTier {
    /// A tier for chunks of `spec`'s geometry (it writes their LMCache metadata) at `url`:
    /// `redis://`, `rediss://` (TLS), `valkey://`, `valkeys://`, `unix:///path`, or
    /// `redis-cluster://host:port,host:port` (`rediss-cluster://` with TLS), with
    /// `user:password@` where the server needs them.
    ///
    /// Only the URL is checked here; connections are opened on first use, so a server that
    /// is down at startup makes misses, not an error.
    pub fn new(url: &str, spec: KvCacheSpec, opts: RemoteOptions) -> Result<Self, StoreError> {
        let endpoint = redact(url);
        let bad_url = |reason: String| StoreError::Remote {
            endpoint: endpoint.clone(),
            reason: format!("not a usable Redis URL: {reason}"),
        };
        if opts.pool_size == 0 {
            return Err(bad_url(
                "the connection pool size must be at least 1".into(),
            ));
        }
        // rustls needs a process-wide crypto provider; an error only means one is installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let cluster = url.split_once("://").and_then(|(scheme, rest)| {
            let (_, node_scheme) = CLUSTER_SCHEMES.iter().find(|(s, _)| *s == scheme)?;
            Some((*node_scheme, rest))
        });
        let target = match cluster {
            Some((node_scheme, rest)) => Target::Cluster(
                cluster_client(node_scheme, rest, &opts).map_err(|e| bad_url(e.to_string()))?,
            ),
            None => Target::Single(redis::Client::open(url).map_err(|e| bad_url(e.to_string()))?),
        };
        Ok(RedisTier {
            pool: Pool::new(target, endpoint, &opts),
            fingerprint: spec.chunk_fingerprint(),
            spec,
            max_value_bytes: opts.max_value_bytes,
            ttl_ms: opts
                .ttl
                .map(|ttl| u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)),
            accept_unchecked: opts.accept_unchecked,
            counters: Counters::default(),
        })
    }

    /// The URL, with any password replaced by `***`.
    pub fn endpoint(&self) -> &str {
        &self.pool.endpoint
    }

    /// Plain `SET key value` (with the tier's TTL) through the tier's connections: the
    /// baseline the tier is measured against, and a way for tests to plant foreign values.
    pub fn raw_set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let replies = self.run(vec![self.set(key, value)], false)?;
        self.expect_ok(&replies)
    }

    /// Plain `GET key` through the tier's connections.
    pub fn raw_get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let mut replies = self.run(vec![get(key)], false)?;
        self.bulk(key, replies.pop().unwrap_or(Value::Nil))
    }

    fn set(&self, key: &str, value: &[u8]) -> Cmd {
        let mut cmd = redis::cmd("SET");
        cmd.arg(key).arg(value);
        if let Some(ms) = self.ttl_ms {
            cmd.arg("PX").arg(ms);
        }
        cmd
    }

    /// Sends `cmds` as one pipeline. A failure is counted as unavailable; a transport
    /// failure also marks the server down for `retry_after`.
    fn run(&self, cmds: Vec<Cmd>, atomic: bool) -> Result<Vec<Value>, StoreError> {
        let count = cmds.len();
        let result = self.pool.with_conn(|conn| conn.pipeline(cmds, atomic));
        let replies = result.inspect_err(|_| {
            self.counters.unavailable.fetch_add(1, Ordering::Relaxed);
        })?;
        if replies.len() != count {
            return Err(self.pool.error(format!(
                "{} replies to a pipeline of {count} commands",
                replies.len()
            )));
        }
        Ok(replies)
    }

    fn expect_ok(&self, replies: &[Value]) -> Result<(), StoreError> {
        match replies.iter().find(|v| !matches!(v, Value::Okay)) {
            None => Ok(()),
            Some(other) => Err(self.pool.error(format!("SET replied {other:?}"))),
        }
    }

    /// A GET reply: `None` for a missing key.
    fn bulk(&self, key: &str, reply: Value) -> Result<Option<Vec<u8>>, StoreError> {
        match reply {
            Value::Nil => Ok(None),
            Value::BulkString(bytes) => Ok(Some(bytes)),
            other => Err(self.corrupt(key, format!("GET replied {other:?}, not a string"))),
        }
    }

    fn corrupt(&self, redis_key: &str, reason: String) -> StoreError {
        self.counters.corrupt.fetch_add(1, Ordering::Relaxed);
        StoreError::Corrupt {
            path: PathBuf::from(format!("{}/{redis_key}", self.pool.endpoint)),
            reason,
        }
    }

    fn miss(&self) -> Result<Option<Chunk>, StoreError> {
        self.counters.misses.fetch_add(1, Ordering::Relaxed);
        Ok(None)
    }

    /// Every check before a chunk is handed out; see the module docs.
    fn verify(
        &self,
        keys: &ChunkKeys,
        expected_fingerprint: u64,
        record: &[u8],
        metadata: &[u8],
        kv: Vec<u8>,
    ) -> Result<Chunk, StoreError> {
        let record = Record::decode(record).map_err(|r| self.corrupt(&keys.record, r))?;
        if record.key_checksum != xxh3_64(keys.name.as_bytes()) {
            return Err(self.corrupt(
                &keys.record,
                "check record was written for another key".into(),
            ));
        }
        if record.layout_fingerprint != expected_fingerprint {
            self.counters.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(StoreError::FingerprintMismatch {
                key: keys.name.clone(),
                expected: expected_fingerprint,
                found: record.layout_fingerprint,
            });
        }
        if record.metadata_checksum != xxh3_64(metadata) {
            return Err(self.corrupt(
                &keys.metadata,
                "metadata does not match its checksum".into(),
            ));
        }
        let expected_meta =
            RemoteMetadata::for_chunk(&self.spec, record.num_tokens, record.kv_len as usize)
                .map_err(|e| self.corrupt(&keys.metadata, e.to_string()))?;
        let found_meta = RemoteMetadata::decode(metadata)
            .map_err(|e| self.corrupt(&keys.metadata, e.to_string()))?;
        if !found_meta.matches(&expected_meta) {
            return Err(self.corrupt(
                &keys.metadata,
                format!("metadata {found_meta:?} does not describe {} tokens of this tier's geometry ({expected_meta:?})", record.num_tokens),
            ));
        }
        if kv.len() as u64 != record.kv_len {
            return Err(self.corrupt(
                &keys.kv,
                format!("{} bytes, check record says {}", kv.len(), record.kv_len),
            ));
        }
        let computed = xxh3_64(&kv);
        if computed != record.kv_checksum {
            return Err(self.corrupt(
                &keys.kv,
                format!(
                    "checksum mismatch: stored {:#018x}, computed {computed:#018x}",
                    record.kv_checksum
                ),
            ));
        }
        Ok(Chunk {
            meta: ChunkMeta {
                layout_fingerprint: record.layout_fingerprint,
                num_tokens: record.num_tokens,
            },
            data: Bytes::from(kv),
            device: None,
        })
    }

    /// The checks a chunk without a record (LMCache's) must pass: there is no checksum, so
    /// its metadata must be exactly what this tier writes for that many tokens, and the
    /// value exactly that long.
    fn verify_unchecked(
        &self,
        keys: &ChunkKeys,
        expected_fingerprint: u64,
        metadata: &[u8],
        kv: Vec<u8>,
    ) -> Result<Chunk, StoreError> {
        // The chunk carries no fingerprint: it can only be for this tier's own layout.
        if expected_fingerprint != self.fingerprint {
            self.counters.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(StoreError::FingerprintMismatch {
                key: keys.name.clone(),
                expected: expected_fingerprint,
                found: self.fingerprint,
            });
        }
        let found = RemoteMetadata::decode(metadata)
            .map_err(|e| self.corrupt(&keys.metadata, format!("LMCache-written chunk: {e}")))?;
        let tokens = u32::try_from(found.shape[2]).ok().filter(|&t| t > 0);
        let expected = tokens.and_then(|t| {
            RemoteMetadata::for_chunk(&self.spec, t, self.spec.chunk_bytes(t as usize)).ok()
        });
        let (Some(tokens), Some(expected)) = (tokens, expected) else {
            return Err(self.corrupt(
                &keys.metadata,
                format!("LMCache-written chunk: metadata {found:?} has no usable token count"),
            ));
        };
        if !found.matches(&expected) {
            return Err(self.corrupt(
                &keys.metadata,
                format!("LMCache-written chunk: metadata {found:?} does not describe {tokens} tokens of this tier's geometry ({expected:?})"),
            ));
        }
        if kv.len() != found.length as usize {
            return Err(self.corrupt(
                &keys.kv,
                format!(
                    "LMCache-written chunk: {} bytes, its metadata says {}",
                    kv.len(),
                    found.length
                ),
            ));
        }
        self.counters.unchecked.fetch_add(1, Ordering::Relaxed);
        Ok(Chunk {
            meta: ChunkMeta {
                layout_fingerprint: self.fingerprint,
                num_tokens: tokens,
            },
            data: Bytes::from(kv),
            device: None,
        })
    }

    /// Which of a chunk's keys exist: record, metadata, kv_bytes.
    fn existing(&self, keys: ChunkKeys) -> Result<[bool; 3], StoreError> {
        let replies = self.run(keys.exists().to_vec(), false)?;
        Ok(existing(&replies))
    }

    /// Whether a chunk with these keys present counts as present.
    fn present(&self, [record, metadata, kv]: [bool; 3]) -> bool {
        metadata && kv && (record || self.accept_unchecked)
    }
}

impl Tier for RedisTier {
    fn name(&self) -> &str {
        "redis"
    }

    fn contains(&self, key: &CacheKey) -> bool {
        super::contains_by_batch(self, key)
    }

    /// One pipelined round trip: `EXISTS` of the three keys of every chunk asked about.
    /// An unreachable server answers "absent".
    fn contains_many(&self, keys: &[CacheKey], found: &mut [bool]) {
        let asked: Vec<usize> = (0..keys.len().min(found.len()))
            .filter(|&i| !found[i])
            .collect();
        if asked.is_empty() {
            return;
        }
        let cmds = asked
            .iter()
            .flat_map(|&i| ChunkKeys::new(&keys[i]).exists())
            .collect();
        match self.run(cmds, false) {
            Ok(replies) => {
                for (&i, replies) in asked.iter().zip(replies.chunks_exact(3)) {
                    found[i] = self.present(existing(replies));
                }
            }
            Err(err) => tracing::debug!(error = %err, "redis lookup failed; treated as absent"),
        }
    }

    fn get(&self, key: &CacheKey, expected_fingerprint: u64) -> Result<Option<Chunk>, StoreError> {
        let keys = ChunkKeys::new(key);
        let replies = self.run(
            vec![get(&keys.record), get(&keys.metadata), get(&keys.kv)],
            false,
        )?;
        let mut replies = replies.into_iter();
        let mut next = |name: &str| self.bulk(name, replies.next().unwrap_or(Value::Nil));
        let record = next(&keys.record)?;
        let metadata = next(&keys.metadata)?;
        let kv = next(&keys.kv)?;
        match (record, metadata, kv) {
            (None, None, None) => self.miss(),
            (Some(record), Some(metadata), Some(kv)) => {
                let chunk = self.verify(&keys, expected_fingerprint, &record, &metadata, kv)?;
                self.counters.hits.fetch_add(1, Ordering::Relaxed);
                Ok(Some(chunk))
            }
            (None, Some(metadata), Some(kv)) if self.accept_unchecked => {
                let chunk = self.verify_unchecked(&keys, expected_fingerprint, &metadata, kv)?;
                self.counters.hits.fetch_add(1, Ordering::Relaxed);
                Ok(Some(chunk))
            }
            (None, Some(_), Some(_)) => {
                tracing::debug!(key = %keys.name, "chunk without a kvrelay record (LMCache-written) refused: remote_accept_unchecked is false");
                self.miss()
            }
            // LMCache's own half-written or half-expired chunk: gone.
            (None, _, _) => self.miss(),
            // Part of a chunk expired or was evicted: gone, not corrupt.
            (Some(_), _, _) => {
                tracing::debug!(key = %keys.name, "chunk partly expired or evicted; a miss");
                self.miss()
            }
        }
    }

    fn put(&self, key: &CacheKey, meta: ChunkMeta, data: &[u8]) -> Result<(), StoreError> {
        let size = data.len() as u64;
        if let Some(max) = self.max_value_bytes.filter(|&max| size > max) {
            return Err(StoreError::TooLarge { size, budget: max });
        }
        if meta.layout_fingerprint != self.fingerprint {
            return Err(StoreError::FingerprintMismatch {
                key: key.to_string(),
                expected: self.fingerprint,
                found: meta.layout_fingerprint,
            });
        }
        let expected = self.spec.chunk_bytes(meta.num_tokens as usize) as u64;
        if size != expected {
            return Err(StoreError::ChunkSize {
                key: key.to_string(),
                len: size,
                num_tokens: meta.num_tokens,
                expected,
            });
        }
        let lm_meta = RemoteMetadata::for_chunk(&self.spec, meta.num_tokens, data.len())
            .map_err(|_| StoreError::TooLarge {
                size,
                budget: i32::MAX as u64,
            })?
            .encode();
        let keys = ChunkKeys::new(key);
        let record = Record {
            num_tokens: meta.num_tokens,
            layout_fingerprint: meta.layout_fingerprint,
            kv_len: size,
            kv_checksum: xxh3_64(data),
            metadata_checksum: xxh3_64(&lm_meta),
            key_checksum: xxh3_64(keys.name.as_bytes()),
        }
        .encode();
        // LMCache probes `metadata`, so it goes last: an LMCache reader on a cluster never
        // finds metadata whose bytes are still on their way.
        let cmds = vec![
            self.set(&keys.kv, data),
            self.set(&keys.record, &record),
            self.set(&keys.metadata, &lm_meta),
        ];
        let replies = self.run(cmds, !self.pool.is_cluster())?;
        self.expect_ok(&replies)
    }

    fn remove(&self, key: &CacheKey) -> Result<bool, StoreError> {
        let keys = ChunkKeys::new(key);
        let cmds = [keys.metadata, keys.record, keys.kv]
            .into_iter()
            .map(|name| {
                let mut cmd = redis::cmd("DEL");
                cmd.arg(name);
                cmd
            })
            .collect();
        let replies = self.run(cmds, !self.pool.is_cluster())?;
        Ok(replies.iter().any(|r| matches!(r, Value::Int(n) if *n > 0)))
    }

    /// A remote server's size is not this process's to count: `entries`, `bytes`,
    /// `budget` and `evictions` are 0.
    fn stats(&self) -> TierStats {
        let c = &self.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        TierStats {
            hits: load(&c.hits),
            misses: load(&c.misses),
            corrupt: load(&c.corrupt),
            rejected: load(&c.rejected),
            unavailable: load(&c.unavailable),
            unchecked: load(&c.unchecked),
            ..TierStats::default()
        }
    }

    fn why_absent(&self, key: &CacheKey) -> Option<String> {
        let exists = match self.existing(ChunkKeys::new(key)) {
            Ok(exists) => exists,
            Err(err) => return Some(format!("not asked: {err}")),
        };
        match exists {
            [false, false, false] => None,
            [false, true, true] if !self.accept_unchecked => Some(
                "LMCache's metadata and kv_bytes are there without a kvrelay check record, and remote_accept_unchecked is false".into(),
            ),
            exists if self.present(exists) => Some("present now (written after the lookup)".into()),
            [record, metadata, kv] => Some(format!(
                "only part of the chunk is there (kvrelay record: {record}, metadata: {metadata}, kv_bytes: {kv}): expired, evicted or being written"
            )),
        }
    }
}

fn get(key: &str) -> Cmd {
    let mut cmd = redis::cmd("GET");
    cmd.arg(key);
    cmd
}

/// `host:port,host:port` after the scheme, with optional `user:pass@` in front, as node URLs.
fn cluster_client(
    node_scheme: &str,
    rest: &str,
    opts: &RemoteOptions,
) -> RedisResult<redis::cluster::ClusterClient> {
    let rest = rest.trim_end_matches('/');
    let (auth, hosts) = match rest.rsplit_once('@') {
        Some((auth, hosts)) => (format!("{auth}@"), hosts),
        None => (String::new(), rest),
    };
    let nodes: Vec<String> = hosts
        .split(',')
        .filter(|h| !h.is_empty())
        .map(|h| format!("{node_scheme}://{auth}{h}"))
        .collect();
    if nodes.is_empty() {
        return Err(RedisError::from((
            redis::ErrorKind::InvalidClientConfig,
            "no cluster nodes in the URL",
        )));
    }
    // Few, short retries: a slot move needs one, and each attempt is already bounded by the
    // timeouts, so an unreachable cluster fails in about (retries + 1) timeouts.
    redis::cluster::ClusterClient::builder(nodes)
        .connection_timeout(opts.connect_timeout)
        .response_timeout(opts.io_timeout)
        .retries(2)
        .min_retry_wait(10)
        .max_retry_wait(100)
        .build()
}

/// The URL with the password (between `user:` and `@`) replaced by `***`.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let Some((auth, hosts)) = rest.rsplit_once('@') else {
        return url.to_string();
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{hosts}"),
        None => format!("{scheme}://{auth}@{hosts}"),
    }
}

enum Target {
    Single(redis::Client),
    Cluster(redis::cluster::ClusterClient),
}

enum Conn {
    Single(redis::Connection),
    // Boxed: a cluster connection is several times the size of a single one.
    Cluster(Box<redis::cluster::ClusterConnection>),
}

impl Conn {
    /// One reply per command; `atomic` wraps the commands in MULTI/EXEC (single server only:
    /// a cluster cannot run a transaction across slots).
    fn pipeline(&mut self, cmds: Vec<Cmd>, atomic: bool) -> RedisResult<Vec<Value>> {
        match self {
            Conn::Single(conn) => {
                let mut pipe = redis::pipe();
                if atomic {
                    pipe.atomic();
                }
                for cmd in cmds {
                    pipe.add_command(cmd);
                }
                pipe.query(conn)
            }
            Conn::Cluster(conn) => {
                let mut pipe = redis::cluster::cluster_pipe();
                for cmd in cmds {
                    pipe.add_command(cmd);
                }
                pipe.query(conn.as_mut())
            }
        }
    }
}

struct PoolState {
    idle: Vec<Conn>,
    /// Connections in `idle` or lent out.
    open: usize,
    /// Set after a transport failure: until then, fail without dialing.
    down_until: Option<Instant>,
    /// Whether the last attempt failed, so that only changes are logged as warnings.
    down: bool,
}

/// At most `size` connections, opened on demand and dropped after a transport error.
struct Pool {
    target: Target,
    endpoint: String,
    size: usize,
    connect_timeout: Duration,
    io_timeout: Duration,
    retry_after: Duration,
    state: Mutex<PoolState>,
    returned: Condvar,
}

impl Pool {
    fn new(target: Target, endpoint: String, opts: &RemoteOptions) -> Self {
        Pool {
            target,
            endpoint,
            size: opts.pool_size,
            connect_timeout: opts.connect_timeout,
            io_timeout: opts.io_timeout,
            retry_after: opts.retry_after,
            state: Mutex::new(PoolState {
                idle: Vec::new(),
                open: 0,
                down_until: None,
                down: false,
            }),
            returned: Condvar::new(),
        }
    }

    fn is_cluster(&self) -> bool {
        matches!(self.target, Target::Cluster(_))
    }

    fn error(&self, reason: String) -> StoreError {
        StoreError::Remote {
            endpoint: self.endpoint.clone(),
            reason,
        }
    }

    /// Runs `f` on a pooled connection. A server error reply leaves the connection usable;
    /// any other failure (IO, timeout, protocol) drops it and marks the server down, since a
    /// connection that timed out mid-reply is out of step with the server.
    fn with_conn<T>(&self, f: impl FnOnce(&mut Conn) -> RedisResult<T>) -> Result<T, StoreError> {
        let mut conn = self.checkout()?;
        match f(&mut conn) {
            Ok(value) => {
                self.give_back(conn);
                Ok(value)
            }
            Err(err)
                if matches!(
                    err.kind(),
                    redis::ErrorKind::Server(_) | redis::ErrorKind::Extension
                ) =>
            {
                self.give_back(conn);
                Err(self.error(err.to_string()))
            }
            Err(err) => {
                drop(conn);
                self.failed(&err, "request failed");
                Err(self.error(err.to_string()))
            }
        }
    }

    fn checkout(&self) -> Result<Conn, StoreError> {
        let deadline = Instant::now() + self.io_timeout;
        let mut state = self.state.lock();
        loop {
            if let Some(until) = state.down_until {
                let now = Instant::now();
                if now < until {
                    return Err(self.error(format!(
                        "unreachable; next attempt in {} ms",
                        (until - now).as_millis()
                    )));
                }
            }
            if let Some(conn) = state.idle.pop() {
                return Ok(conn);
            }
            if state.open < self.size {
                state.open += 1;
                break;
            }
            if self.returned.wait_until(&mut state, deadline).timed_out() {
                return Err(self.error(format!(
                    "all {} connections stayed busy for {:?}",
                    self.size, self.io_timeout
                )));
            }
        }
        drop(state);
        match self.connect() {
            Ok(conn) => {
                let mut state = self.state.lock();
                if std::mem::take(&mut state.down) {
                    tracing::info!(endpoint = %self.endpoint, "redis tier reachable again");
                }
                state.down_until = None;
                Ok(conn)
            }
            Err(err) => {
                self.failed(&err, "cannot connect");
                Err(self.error(format!("cannot connect: {err}")))
            }
        }
    }

    fn give_back(&self, conn: Conn) {
        self.state.lock().idle.push(conn);
        self.returned.notify_one();
    }

    /// A connection was lost or never made: forget it and every idle one (they point at the
    /// same failed server), and fail fast for `retry_after`.
    fn failed(&self, err: &RedisError, what: &str) {
        let mut state = self.state.lock();
        let dropped = std::mem::take(&mut state.idle);
        state.open -= dropped.len() + 1;
        state.down_until = Some(Instant::now() + self.retry_after);
        let newly_down = !std::mem::replace(&mut state.down, true);
        drop(state);
        self.returned.notify_all();
        if newly_down {
            tracing::warn!(endpoint = %self.endpoint, error = %err, "redis tier unavailable ({what}); lookups miss until it is back");
        } else {
            tracing::debug!(endpoint = %self.endpoint, error = %err, "redis tier still unavailable");
        }
    }

    fn connect(&self) -> RedisResult<Conn> {
        let io = Some(self.io_timeout);
        match &self.target {
            Target::Single(client) => {
                let conn = client.get_connection_with_timeout(self.connect_timeout)?;
                conn.set_read_timeout(io)?;
                conn.set_write_timeout(io)?;
                Ok(Conn::Single(conn))
            }
            Target::Cluster(client) => {
                let conn = client.get_connection()?;
                conn.set_read_timeout(io)?;
                conn.set_write_timeout(io)?;
                Ok(Conn::Cluster(Box::new(conn)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            num_tokens: 256,
            layout_fingerprint: 0x1122_3344_5566_7788,
            kv_len: 1 << 25,
            kv_checksum: 1,
            metadata_checksum: 2,
            key_checksum: 3,
        }
    }

    #[test]
    fn record_round_trips_and_rejects_any_flipped_bit() {
        let bytes = record().encode();
        assert_eq!(Record::decode(&bytes), Ok(record()));
        for bit in 0..RECORD_LEN * 8 {
            let mut bad = bytes;
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(Record::decode(&bad).is_err(), "bit {bit}");
        }
        assert!(Record::decode(&bytes[..RECORD_LEN - 1]).is_err());
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("redis://user:secret@host:6379/0"),
            "redis://user:***@host:6379/0"
        );
        assert_eq!(
            redact("redis-cluster://:pw@a:1,b:2"),
            "redis-cluster://:***@a:1,b:2"
        );
        assert_eq!(redact("unix:///run/redis.sock"), "unix:///run/redis.sock");
    }
}
