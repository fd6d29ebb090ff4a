//! The Redis tier against real `redis-server` processes on loopback ports: exact round
//! trips in LMCache's layout, batched lookups, corruption, a server that dies and comes
//! back, TTL, the size limit, and a three-node cluster. Each test starts its own servers.
//!
//! `redis-server` must be installed (`scripts/test.sh` installs it); without it these tests
//! fail rather than skip, so a suite that ran nothing cannot look green.
#![cfg(feature = "redis")]

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread::sleep;
use std::time::{Duration, Instant};

use kvrelay::config::{KvTransferConfig, LmcacheConfig};
use kvrelay::connector::{build_connector, EngineIdentity};
use kvrelay::device::HostDevice;
use kvrelay::keys::CacheKey;
use kvrelay::layout::{AttentionKind, KvCacheSpec};
use kvrelay::store::remote::RemoteMetadata;
use kvrelay::store::{ChunkMeta, CpuTier, RedisTier, RemoteOptions, StoreError, Tier, TierStack};
use kvrelay::KvDtype;
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use tempfile::TempDir;

const SPEC: KvCacheSpec = KvCacheSpec {
    num_layers: 4,
    num_kv_heads: 4,
    head_size: 32,
    dtype: KvDtype::Bf16,
    block_size: 16,
    num_blocks: 64,
    attention: AttentionKind::Mha,
};

/// One `redis-server` on a loopback port, killed on drop.
struct Server {
    child: Child,
    port: u16,
    _dir: TempDir,
}

impl Server {
    fn start() -> Server {
        Self::start_on(free_port(), false)
    }

    fn start_on(port: u16, cluster: bool) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if cluster {
            cmd.args(["--cluster-enabled", "yes", "--cluster-node-timeout", "5000"]);
        }
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot run redis-server ({e}); these tests need it on PATH: apt-get install -y redis-server (scripts/test.sh does this)"
            )
        });
        let mut server = Server {
            child,
            port,
            _dir: dir,
        };
        server.wait_for_ping();
        server
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn client(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection_with_timeout(Duration::from_secs(1))
            .unwrap()
    }

    fn wait_for_ping(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let client = redis::Client::open(self.url()).unwrap();
        loop {
            let pong = client
                .get_connection_with_timeout(Duration::from_millis(200))
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
            if pong.is_ok() {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("redis-server on port {} exited: {status}", self.port);
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not answer PING",
                self.port
            );
            sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn opts() -> RemoteOptions {
    RemoteOptions {
        connect_timeout: Duration::from_millis(500),
        io_timeout: Duration::from_secs(2),
        retry_after: Duration::from_millis(100),
        ..RemoteOptions::default()
    }
}

fn tier(url: &str, opts: RemoteOptions) -> RedisTier {
    RedisTier::new(url, SPEC, opts).unwrap()
}

fn key(i: u64) -> CacheKey {
    CacheKey::new(
        "meta-llama/Llama-3.1-8B",
        2,
        1,
        i.wrapping_mul(0x9e37_79b9_7f4a_7c15),
        KvDtype::Bf16,
    )
    .unwrap()
}

fn meta(tokens: u32) -> ChunkMeta {
    ChunkMeta {
        layout_fingerprint: SPEC.chunk_fingerprint(),
        num_tokens: tokens,
    }
}

/// Chunk bytes derived from the key, so a mixed-up chunk shows.
fn content(k: &CacheKey, tokens: u32) -> Vec<u8> {
    let mut data = vec![0u8; SPEC.chunk_bytes(tokens as usize)];
    StdRng::seed_from_u64(k.chunk_hash ^ u64::from(tokens)).fill_bytes(&mut data);
    data
}

fn put(t: &dyn Tier, k: &CacheKey, tokens: u32) -> Vec<u8> {
    let data = content(k, tokens);
    t.put(k, meta(tokens), &data).unwrap();
    data
}

fn get_data(t: &dyn Tier, k: &CacheKey) -> Option<Vec<u8>> {
    t.get(k, SPEC.chunk_fingerprint())
        .unwrap()
        .map(|c| c.data.to_vec())
}

#[test]
fn round_trip_is_bit_exact_in_lmcache_layout() {
    let server = Server::start();
    let t = tier(&server.url(), opts());
    for (i, tokens) in [(0u64, 256u32), (1, 256), (2, 7), (3, 1)] {
        let k = key(i);
        let data = put(&t, &k, tokens);
        let chunk = t.get(&k, SPEC.chunk_fingerprint()).unwrap().unwrap();
        assert_eq!(chunk.meta, meta(tokens));
        assert!(chunk.data[..] == data[..], "chunk {i} differs");
        // An LMCache reader finds its two keys with exactly what it expects.
        let name = k.to_string();
        assert_eq!(t.raw_get(&format!("{name}kv_bytes")).unwrap(), Some(data));
        let lm = t.raw_get(&format!("{name}metadata")).unwrap().unwrap();
        let expected: Vec<u8> = [
            SPEC.chunk_bytes(tokens as usize) as i32,
            1,
            3,
            2,
            4,
            tokens as i32,
            128,
        ]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
        assert_eq!(lm, expected);
        assert_eq!(
            RemoteMetadata::decode(&lm).unwrap().shape,
            [2, 4, tokens as i32, 128]
        );
    }
    assert!(t.get(&key(99), SPEC.chunk_fingerprint()).unwrap().is_none());
    let stats = t.stats();
    assert_eq!(
        (stats.hits, stats.misses, stats.corrupt, stats.unavailable),
        (4, 1, 0, 0)
    );
    // Overwrite and remove.
    put(&t, &key(0), 3);
    assert_eq!(get_data(&t, &key(0)), Some(content(&key(0), 3)));
    assert!(t.remove(&key(0)).unwrap());
    assert!(!t.remove(&key(0)).unwrap());
    assert!(!t.contains(&key(0)));
}

#[test]
fn prefix_hits_counts_leading_chunks_across_tiers() {
    let server = Server::start();
    let redis: Arc<dyn Tier> = Arc::new(tier(&server.url(), opts()));
    let keys: Vec<CacheKey> = (0..64).map(key).collect();
    for k in keys.iter().take(40).filter(|k| **k != keys[20]) {
        put(redis.as_ref(), k, 16);
    }
    let alone = TierStack::new(vec![Arc::clone(&redis)]);
    assert_eq!(alone.prefix_hits(&keys), 20);
    assert_eq!(alone.prefix_hits(&keys[21..]), 19);
    assert_eq!(alone.prefix_hits(&[]), 0);
    // The gap filled by the tier above: the stack counts through to the end of Redis' run.
    let cpu = Arc::new(CpuTier::new(1 << 20, SPEC.chunk_bytes(16)).unwrap());
    put(cpu.as_ref(), &keys[20], 16);
    let stack = TierStack::new(vec![cpu as Arc<dyn Tier>, Arc::clone(&redis)]);
    assert_eq!(stack.prefix_hits(&keys), 40);
    // The remaining chunks load from Redis through the stack, bit-exact.
    let chunk = stack.get(&keys[39], SPEC.chunk_fingerprint()).unwrap();
    assert_eq!(chunk.data.to_vec(), content(&keys[39], 16));
}

#[test]
fn corrupt_wrong_size_and_foreign_values_are_counted_misses() {
    let server = Server::start();
    let t = Arc::new(tier(&server.url(), opts()));
    let stack = TierStack::new(vec![Arc::clone(&t) as Arc<dyn Tier>]);
    let fp = SPEC.chunk_fingerprint();
    type Damage = fn(&[u8]) -> Vec<u8>;
    let cases: [(&str, Damage); 4] = [
        // Same length, one flipped bit.
        ("kv_bytes", |v| {
            let mut v = v.to_vec();
            let mid = v.len() / 2;
            v[mid] ^= 0x10;
            v
        }),
        ("kv_bytes", |v| v[..v.len() - 1].to_vec()),
        ("metadata", |v| {
            let mut v = v.to_vec();
            v[20] ^= 1;
            v
        }),
        ("kvrelay", |_| b"not a record".to_vec()),
    ];
    for (i, (suffix, damage)) in cases.iter().enumerate() {
        let k = key(i as u64);
        put(t.as_ref(), &k, 32);
        let name = format!("{k}{suffix}");
        let original = t.raw_get(&name).unwrap().unwrap();
        t.raw_set(&name, &damage(&original)).unwrap();
        let err = t.get(&k, fp).unwrap_err();
        assert!(
            matches!(err, StoreError::Corrupt { .. }),
            "{suffix}: {err:?}"
        );
        assert!(stack.get(&k, fp).is_none(), "{suffix}");
    }
    // A check record copied from another key does not vouch for this one.
    let (a, b) = (key(11), key(12));
    put(t.as_ref(), &a, 32);
    put(t.as_ref(), &b, 32);
    let record_a = t.raw_get(&format!("{a}kvrelay")).unwrap().unwrap();
    t.raw_set(&format!("{b}kvrelay"), &record_a).unwrap();
    assert!(matches!(t.get(&b, fp), Err(StoreError::Corrupt { .. })));

    assert_eq!(t.stats().corrupt, 4 * 2 + 1);
    assert_eq!(stack.stats().corrupt, 4);
    assert_eq!(stack.stats().hits, 0);
    // Saved under another layout: rejected, not corrupt.
    let err = t.get(&a, fp ^ 1).unwrap_err();
    assert!(
        matches!(err, StoreError::FingerprintMismatch { .. }),
        "{err:?}"
    );
    assert_eq!(t.stats().rejected, 1);
}

/// Writes a chunk as LMCache's RedisConnector does: `<key>metadata` and `<key>kv_bytes`,
/// no kvrelay record. Returns the bytes.
fn lmcache_put(t: &RedisTier, k: &CacheKey, tokens: u32, meta: RemoteMetadata) -> Vec<u8> {
    let data = content(k, tokens);
    t.raw_set(&format!("{k}kv_bytes"), &data).unwrap();
    t.raw_set(&format!("{k}metadata"), &meta.encode()).unwrap();
    data
}

fn lmcache_meta(tokens: u32) -> RemoteMetadata {
    RemoteMetadata::for_chunk(&SPEC, tokens, SPEC.chunk_bytes(tokens as usize)).unwrap()
}

#[test]
fn lmcache_written_chunks_are_counted_unchecked_hits_that_load_bit_for_bit() {
    let server = Server::start();
    let t = Arc::new(tier(&server.url(), opts()));
    let fp = SPEC.chunk_fingerprint();
    let keys: Vec<CacheKey> = (0..3).map(key).collect();
    let full = lmcache_put(&t, &keys[0], 256, lmcache_meta(256));
    lmcache_put(&t, &keys[1], 256, lmcache_meta(256));
    let partial = lmcache_put(&t, &keys[2], 7, lmcache_meta(7));
    let stack = TierStack::new(vec![Arc::clone(&t) as Arc<dyn Tier>]);
    assert_eq!(stack.prefix_hits(&keys), 3);
    let chunk = stack.get(&keys[0], fp).unwrap();
    assert!(chunk.data[..] == full[..]);
    assert_eq!(chunk.meta, meta(256));
    let chunk = t.get(&keys[2], fp).unwrap().unwrap();
    assert!(chunk.data[..] == partial[..]);
    assert_eq!(chunk.meta, meta(7));
    let stats = t.stats();
    assert_eq!(
        (stats.hits, stats.unchecked, stats.corrupt, stats.misses),
        (2, 2, 0, 0)
    );
    // Checksummed chunks are hits, not unchecked ones.
    put(t.as_ref(), &key(9), 16);
    assert!(t.get(&key(9), fp).unwrap().is_some());
    assert_eq!((t.stats().hits, t.stats().unchecked), (3, 2));
    // Asked for another layout: rejected, whatever the metadata says.
    assert!(matches!(
        t.get(&keys[1], fp ^ 1),
        Err(StoreError::FingerprintMismatch { .. })
    ));
}

#[test]
fn lmcache_written_chunks_must_match_the_geometry_exactly() {
    let server = Server::start();
    let t = tier(&server.url(), opts());
    let fp = SPEC.chunk_fingerprint();
    let m = lmcache_meta(32);
    let mismatches = [
        (
            "length",
            RemoteMetadata {
                length: m.length - 2,
                ..m
            },
        ),
        ("format", RemoteMetadata { fmt: 6, ..m }),
        ("dtype", RemoteMetadata { dtype: 4, ..m }),
        (
            "layers",
            RemoteMetadata {
                shape: [2, 5, 32, 128],
                ..m
            },
        ),
        (
            "hidden",
            RemoteMetadata {
                shape: [2, 4, 32, 64],
                ..m
            },
        ),
        (
            "tokens",
            RemoteMetadata {
                shape: [2, 4, 31, 128],
                ..m
            },
        ),
        (
            "no tokens",
            RemoteMetadata {
                shape: [2, 4, 0, 128],
                length: 0,
                ..m
            },
        ),
    ];
    for (i, (what, bad)) in mismatches.iter().enumerate() {
        let k = key(i as u64);
        lmcache_put(&t, &k, 32, *bad);
        let err = t.get(&k, fp).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{what}: {err:?}");
    }
    // The metadata is right but the value is not that long.
    let k = key(20);
    lmcache_put(&t, &k, 31, m);
    let err = t.get(&k, fp).unwrap_err();
    assert!(err.to_string().contains("metadata says"), "{err}");
    // Metadata of another size than LMCache's one-group record.
    let k = key(21);
    lmcache_put(&t, &k, 32, m);
    t.raw_set(&format!("{k}metadata"), &[0u8; 56]).unwrap();
    assert!(matches!(t.get(&k, fp), Err(StoreError::Corrupt { .. })));
    let stats = t.stats();
    assert_eq!((stats.corrupt, stats.unchecked, stats.hits), (9, 0, 0));
}

#[test]
fn refusing_unchecked_chunks_makes_them_counted_misses() {
    let server = Server::start();
    let t = Arc::new(tier(
        &server.url(),
        RemoteOptions {
            accept_unchecked: false,
            ..opts()
        },
    ));
    let k = key(0);
    lmcache_put(&t, &k, 256, lmcache_meta(256));
    let stack = TierStack::new(vec![Arc::clone(&t) as Arc<dyn Tier>]);
    assert_eq!(stack.prefix_hits(std::slice::from_ref(&k)), 0);
    assert!(t.get(&k, SPEC.chunk_fingerprint()).unwrap().is_none());
    assert!(stack.get(&k, SPEC.chunk_fingerprint()).is_none());
    let stats = t.stats();
    assert_eq!(
        (stats.misses, stats.hits, stats.unchecked, stats.corrupt),
        (2, 0, 0, 0)
    );
    assert_eq!(stack.stats().misses, 1);
    // The lookup can say why it stopped.
    let why = stack.why_absent(&k).unwrap();
    assert!(
        why.starts_with("redis: ") && why.contains("remote_accept_unchecked"),
        "{why}"
    );
    // Checksummed chunks still load.
    let data = put(t.as_ref(), &key(1), 16);
    assert_eq!(get_data(t.as_ref(), &key(1)), Some(data));
    assert_eq!(stack.why_absent(&key(2)), None);
}

/// LMCache overwrote a chunk kvrelay wrote: the record no longer matches, so even with
/// unchecked chunks accepted it is a counted miss, not LMCache's bytes passed as checked.
#[test]
fn a_stale_kvrelay_record_is_still_a_miss() {
    let server = Server::start();
    let t = Arc::new(tier(&server.url(), opts()));
    let stack = TierStack::new(vec![Arc::clone(&t) as Arc<dyn Tier>]);
    let k = key(0);
    put(t.as_ref(), &k, 32);
    lmcache_put(&t, &k, 16, lmcache_meta(16));
    assert!(matches!(
        t.get(&k, SPEC.chunk_fingerprint()),
        Err(StoreError::Corrupt { .. })
    ));
    assert!(stack.get(&k, SPEC.chunk_fingerprint()).is_none());
    // Same length, other bytes: the checksum catches it.
    put(t.as_ref(), &k, 32);
    let mut other = content(&k, 32);
    other[0] ^= 1;
    t.raw_set(&format!("{k}kv_bytes"), &other).unwrap();
    assert!(stack.get(&k, SPEC.chunk_fingerprint()).is_none());
    assert_eq!(
        (t.stats().corrupt, t.stats().unchecked, t.stats().hits),
        (3, 0, 0)
    );
    assert_eq!(stack.stats().corrupt, 2);
}

#[test]
fn puts_that_do_not_fit_are_refused() {
    let server = Server::start();
    let max = SPEC.chunk_bytes(16) as u64;
    let t = tier(
        &server.url(),
        RemoteOptions {
            max_value_bytes: Some(max),
            ..opts()
        },
    );
    put(&t, &key(0), 16);
    let err = t.put(&key(1), meta(17), &content(&key(1), 17)).unwrap_err();
    assert!(
        matches!(err, StoreError::TooLarge { size, budget } if budget == max && size == SPEC.chunk_bytes(17) as u64),
        "{err:?}"
    );
    assert!(!t.contains(&key(1)));
    // Bytes that do not match the token count, and another layout's chunks.
    let err = t.put(&key(2), meta(8), &content(&key(2), 7)).unwrap_err();
    assert!(
        matches!(err, StoreError::ChunkSize { num_tokens: 8, .. }),
        "{err:?}"
    );
    let other = ChunkMeta {
        layout_fingerprint: 1,
        num_tokens: 8,
    };
    let err = t.put(&key(3), other, &content(&key(3), 8)).unwrap_err();
    assert!(
        matches!(err, StoreError::FingerprintMismatch { .. }),
        "{err:?}"
    );
}

#[test]
fn ttl_expires_chunks() {
    let server = Server::start();
    let t = tier(
        &server.url(),
        RemoteOptions {
            ttl: Some(Duration::from_millis(400)),
            ..opts()
        },
    );
    let data = put(&t, &key(0), 16);
    for suffix in ["kv_bytes", "metadata", "kvrelay"] {
        let pttl: i64 = redis::cmd("PTTL")
            .arg(format!("{}{suffix}", key(0)))
            .query(&mut server.client())
            .unwrap();
        assert!((1..=400).contains(&pttl), "{suffix}: PTTL {pttl}");
    }
    assert_eq!(get_data(&t, &key(0)), Some(data));
    sleep(Duration::from_millis(600));
    assert!(!t.contains(&key(0)));
    assert_eq!(get_data(&t, &key(0)), None);
}

#[test]
fn a_dead_server_is_misses_within_the_timeout_and_a_restarted_one_serves_again() {
    let mut server = Server::start();
    let port = server.port;
    let url = server.url();
    let redis = Arc::new(tier(&url, opts()));
    let stack = TierStack::new(vec![Arc::clone(&redis) as Arc<dyn Tier>]);
    let keys: Vec<CacheKey> = (0..4).map(key).collect();
    for k in &keys {
        put(redis.as_ref(), k, 16);
    }
    assert_eq!(stack.prefix_hits(&keys), 4);

    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let start = Instant::now();
    assert!(stack.get(&keys[0], SPEC.chunk_fingerprint()).is_none());
    assert_eq!(stack.prefix_hits(&keys), 0);
    let err = redis
        .put(&keys[0], meta(16), &content(&keys[0], 16))
        .unwrap_err();
    assert!(matches!(err, StoreError::Remote { .. }), "{err:?}");
    // While marked down, calls fail at once instead of dialing again.
    for _ in 0..100 {
        assert!(!redis.contains(&keys[1]));
    }
    assert!(start.elapsed() < opts().io_timeout, "{:?}", start.elapsed());
    let down = redis.stats().unavailable;
    assert!(down >= 103, "unavailable = {down}");
    assert_eq!(stack.stats().io_errors, 1);

    // Same port, empty server: misses until chunks are put again, then hits.
    let _server = Server::start_on(port, false);
    sleep(opts().retry_after);
    assert_eq!(stack.prefix_hits(&keys), 0);
    for k in &keys {
        put(redis.as_ref(), k, 16);
    }
    assert_eq!(stack.prefix_hits(&keys), 4);
    assert_eq!(
        get_data(redis.as_ref(), &keys[3]),
        Some(content(&keys[3], 16))
    );
}

#[test]
fn an_unreachable_server_at_startup_is_not_an_error() {
    // Nothing listens on this port.
    let url = format!("redis://127.0.0.1:{}", free_port());
    let t = tier(&url, opts());
    let start = Instant::now();
    assert!(!t.contains(&key(0)));
    assert!(matches!(
        t.get(&key(0), SPEC.chunk_fingerprint()),
        Err(StoreError::Remote { .. })
    ));
    assert!(start.elapsed() < opts().connect_timeout * 2);
    assert_eq!(t.stats().unavailable, 2);
}

#[test]
fn bad_urls_are_typed_errors() {
    for url in ["redis://host:notaport", "redis-cluster://", "http://host"] {
        let err = RedisTier::new(url, SPEC, opts()).err().unwrap();
        assert!(matches!(err, StoreError::Remote { .. }), "{url}: {err:?}");
    }
    let t = tier("redis://user:hunter2@127.0.0.1:1", opts());
    assert_eq!(t.endpoint(), "redis://user:***@127.0.0.1:1");
    // TLS and unix-socket URLs build; with nothing listening they are misses, not panics.
    for url in ["rediss://127.0.0.1:1", "unix:///nonexistent/redis.sock"] {
        let t = tier(url, opts());
        assert!(!t.contains(&key(0)), "{url}");
        assert_eq!(t.stats().unavailable, 1, "{url}");
    }
}

/// Set in the re-executed test binary that runs the TLS client half.
const TLS_URL_ENV: &str = "KVRELAY_TEST_TLS_URL";

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run openssl ({e}); the TLS test needs it"));
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `rediss://` against a TLS redis-server whose certificate a test CA signed. The client
/// half runs in a re-executed copy of this test binary with `SSL_CERT_FILE` naming the CA,
/// so the process environment of the other tests is left alone.
#[test]
fn tls_round_trip() {
    if let Ok(url) = std::env::var(TLS_URL_ENV) {
        let t = tier(&url, opts());
        let data = put(&t, &key(0), 16);
        assert_eq!(get_data(&t, &key(0)), Some(data));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=kvrelay test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
    );
    openssl(
        d,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    );
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "san.ext",
            "-out",
            "server.pem",
        ],
    );
    let port = free_port();
    let mut server = Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .args([
            "--save",
            "",
            "--appendonly",
            "no",
            "--tls-auth-clients",
            "no",
        ])
        .arg("--tls-cert-file")
        .arg(d.join("server.pem"))
        .arg("--tls-key-file")
        .arg(d.join("server.key"))
        .arg("--tls-ca-cert-file")
        .arg(d.join("ca.pem"))
        .arg("--dir")
        .arg(d)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Readiness: the TLS port accepts connections.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "TLS redis-server did not listen");
        sleep(Duration::from_millis(20));
    }
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "tls_round_trip", "--nocapture"])
        .env(TLS_URL_ENV, format!("rediss://127.0.0.1:{port}"))
        .env("SSL_CERT_FILE", d.join("ca.pem"))
        .output()
        .unwrap();
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        child.status.success(),
        "TLS client half failed:\n{}{}",
        String::from_utf8_lossy(&child.stdout),
        String::from_utf8_lossy(&child.stderr)
    );
    // The child ran the test rather than filtering it out.
    assert!(String::from_utf8_lossy(&child.stdout).contains("1 passed"));
}

/// Three masters on loopback, slots split evenly, joined with CLUSTER MEET.
fn start_cluster() -> Vec<Server> {
    let nodes: Vec<Server> = (0..3)
        .map(|_| Server::start_on(free_port(), true))
        .collect();
    let ranges = [(0, 5460), (5461, 10922), (10923, 16383)];
    for (node, (lo, hi)) in nodes.iter().zip(ranges) {
        let _: () = redis::cmd("CLUSTER")
            .arg("ADDSLOTSRANGE")
            .arg(lo)
            .arg(hi)
            .query(&mut node.client())
            .unwrap();
    }
    let mut first = nodes[0].client();
    for node in &nodes[1..] {
        let _: () = redis::cmd("CLUSTER")
            .arg("MEET")
            .arg("127.0.0.1")
            .arg(node.port)
            .query(&mut first)
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for node in &nodes {
        loop {
            let info: String = redis::cmd("CLUSTER")
                .arg("INFO")
                .query(&mut node.client())
                .unwrap();
            if info.contains("cluster_state:ok") && info.contains("cluster_known_nodes:3") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "cluster did not converge:\n{info}"
            );
            sleep(Duration::from_millis(50));
        }
    }
    nodes
}

#[test]
fn cluster_round_trip_and_prefix() {
    let nodes = start_cluster();
    let url = format!(
        "redis-cluster://{}",
        nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    );
    let redis: Arc<dyn Tier> = Arc::new(tier(&url, opts()));
    let keys: Vec<CacheKey> = (0..24).map(key).collect();
    for k in &keys[..16] {
        put(redis.as_ref(), k, 16);
    }
    let stack = TierStack::new(vec![Arc::clone(&redis)]);
    assert_eq!(stack.prefix_hits(&keys), 16);
    for k in &keys[..16] {
        assert_eq!(get_data(redis.as_ref(), k), Some(content(k, 16)), "{k}");
    }
    // The chunks are spread over the nodes, not all on one.
    let per_node: Vec<i64> = nodes
        .iter()
        .map(|n| redis::cmd("DBSIZE").query(&mut n.client()).unwrap())
        .collect();
    assert_eq!(per_node.iter().sum::<i64>(), 16 * 3);
    assert!(per_node.iter().all(|&n| n > 0), "{per_node:?}");
    assert!(redis.remove(&keys[0]).unwrap());
    assert_eq!(stack.prefix_hits(&keys), 0);
    assert_eq!(get_data(redis.as_ref(), &keys[0]), None);
}

fn connector_tiers(lmcache_yaml: &str) -> Vec<String> {
    let transfer = KvTransferConfig::from_json_str(
        r#"{"kv_connector":"LMCacheConnectorV1","kv_role":"kv_both"}"#,
    )
    .unwrap();
    let lmcache = LmcacheConfig::from_yaml_str(lmcache_yaml).unwrap();
    let identity = EngineIdentity {
        model: "tiny".into(),
        world_size: 1,
        worker_id: 0,
    };
    let c = build_connector(&transfer, &lmcache, &identity, SPEC, Arc::new(HostDevice)).unwrap();
    c.tiers
        .tiers()
        .iter()
        .map(|t| t.name().to_string())
        .collect()
}

#[test]
fn lmcache_config_puts_redis_after_the_local_tiers() {
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk");
    let url = server.url();
    assert_eq!(
        connector_tiers(&format!(
            "remote_url: \"{url}\"\nlocal_disk: \"file://{}\"\nmax_local_disk_size: 1\nmax_local_cpu_size: 0.01\n",
            Path::new(&disk).display()
        )),
        ["cpu", "disk", "redis"]
    );
    // Remote only.
    assert_eq!(
        connector_tiers(&format!(
            "remote_url: \"{url}\"\nlocal_cpu: false\nextra_config: {{remote_ttl_secs: 60, remote_pool_size: 2}}\n"
        )),
        ["redis"]
    );
}

/// Collects every event's level and fields on this thread.
#[derive(Clone, Default)]
struct LogLines(Arc<std::sync::Mutex<Vec<String>>>);

struct Fields(String);

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0 += &format!("{}={value:?} ", field.name());
    }
}

impl tracing::Subscriber for LogLines {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut fields = Fields(format!("{} ", event.metadata().level()));
        event.record(&mut fields);
        self.0.lock().unwrap().push(fields.0);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// A lookup that stops on a chunk the tier refuses says so, once per request.
#[test]
fn a_lookup_that_stops_logs_why_once_per_request() {
    use kvrelay::connector::RequestView;
    use kvrelay::keys::{default_seed, ChunkHasher, HashAlgorithm};

    let server = Server::start();
    let transfer = KvTransferConfig::from_json_str(
        r#"{"kv_connector":"LMCacheConnectorV1","kv_role":"kv_both"}"#,
    )
    .unwrap();
    let lmcache = LmcacheConfig::from_yaml_str(&format!(
        "chunk_size: 16\nlocal_cpu: false\nremote_url: \"{}\"\nsave_unfull_chunk: true\nextra_config: {{remote_accept_unchecked: false}}\n",
        server.url()
    ))
    .unwrap();
    let identity = EngineIdentity {
        model: "tiny".into(),
        world_size: 1,
        worker_id: 0,
    };
    let mut c =
        build_connector(&transfer, &lmcache, &identity, SPEC, Arc::new(HostDevice)).unwrap();
    let tokens: Vec<u32> = (100..140).collect();
    let hasher = ChunkHasher::new(HashAlgorithm::Sha256Cbor, &default_seed(), 16).unwrap();
    let first =
        CacheKey::new("tiny", 1, 0, hasher.chunk_hashes(&tokens)[0], KvDtype::Bf16).unwrap();
    let t = tier(&server.url(), opts());
    lmcache_put(&t, &first, 16, lmcache_meta(16));

    let logs = LogLines::default();
    let request = RequestView {
        id: "r1",
        tokens: &tokens,
        num_prompt_tokens: tokens.len(),
        kv_transfer_params: None,
    };
    tracing::subscriber::with_default(logs.clone(), || {
        for _ in 0..3 {
            let hit = c.scheduler.get_num_new_matched_tokens(&request, 0).unwrap();
            assert_eq!(hit, Some((0, false)));
        }
    });
    let stops = |lines: &[String]| -> Vec<String> {
        lines
            .iter()
            .filter(|l| l.contains("lookup stopped"))
            .cloned()
            .collect()
    };
    let lines = stops(&logs.0.lock().unwrap());
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].starts_with("INFO "), "{}", lines[0]);
    assert!(
        lines[0].contains("chunk 0 of 3") && lines[0].contains("remote_accept_unchecked"),
        "{}",
        lines[0]
    );
    // A finished request's next lookup (a new request with the same id) logs again; a
    // chunk stored nowhere is only a debug line.
    c.scheduler.request_finished(&request, &[]);
    t.remove(&first).unwrap();
    tracing::subscriber::with_default(logs.clone(), || {
        c.scheduler.get_num_new_matched_tokens(&request, 0).unwrap();
    });
    let lines = stops(&logs.0.lock().unwrap());
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(
        lines[1].starts_with("DEBUG ") && lines[1].contains("not stored in any tier"),
        "{}",
        lines[1]
    );
}

// ---- Against LMCache 0.5.6's own code ---------------------------------------------------
//
// These run LMCache's Python (scripts/lmcache_compat/lmcache_compat.py) in a venv that
// scripts/test_lmcache_compat.sh prepares and names in KVRELAY_LMCACHE_PYTHON; that script
// runs them with `--ignored`.

const NEEDS_LMCACHE: &str = "needs LMCache 0.5.6 in a venv: scripts/test_lmcache_compat.sh";

/// `lmcache_compat.py <args>` under the venv's python; stdout, failing loudly.
fn lmcache_code(args: &[&str], stdin: &str, hash_seed: Option<&str>) -> String {
    use std::io::Write;
    let python = std::env::var("KVRELAY_LMCACHE_PYTHON").unwrap_or_else(|_| {
        panic!("KVRELAY_LMCACHE_PYTHON must name a python with lmcache==0.5.6 ({NEEDS_LMCACHE})")
    });
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../scripts/lmcache_compat/lmcache_compat.py");
    let mut cmd = Command::new(python);
    cmd.arg(script).args(args).env_remove("PYTHONHASHSEED");
    if let Some(seed) = hash_seed {
        cmd.env("PYTHONHASHSEED", seed);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "lmcache_compat.py {args:?}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The bytes both sides write and expect: byte i is (i * 131 + 7) mod 251.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| ((i * 131 + 7) % 251) as u8).collect()
}

const MLA_SPEC: KvCacheSpec = KvCacheSpec {
    num_kv_heads: 1,
    head_size: 576,
    attention: AttentionKind::Mla,
    ..SPEC
};

/// LMCache's ChunkedTokenDatabase and kvrelay name every chunk alike: `builtin` (PYTHONHASHSEED
/// 0 and 42 with vLLM, and without vLLM with and without a seed) and `sha256_cbor`, with the
/// trailing partial chunk saved and not.
#[test]
#[ignore = "needs LMCache 0.5.6 in a venv: scripts/test_lmcache_compat.sh"]
fn lmcache_code_keys_equal_kvrelay_keys() {
    use kvrelay::keys::{BuiltinHash, ChunkHasher, CpythonVersion, HashAlgorithm};

    let mut rng = StdRng::seed_from_u64(14);
    let tokens: Vec<u32> = (0..1000).map(|_| rng.next_u32() % 200_000).collect();
    let json = serde_json::to_string(&tokens).unwrap();
    let builtin = |with_vllm| {
        HashAlgorithm::Builtin(BuiltinHash {
            cpython: CpythonVersion::Py311,
            with_vllm,
        })
    };
    let cases = [
        (builtin(true), Some("0")),
        (builtin(true), Some("42")),
        (builtin(false), Some("0")),
        (builtin(false), None),
        (HashAlgorithm::Sha256Cbor, Some("0")),
        (HashAlgorithm::Sha256Cbor, Some("42")),
    ];
    let mut negative = 0;
    for (algorithm, seed) in cases {
        let with_vllm = algorithm != builtin(false);
        for save_unfull in ["true", "false"] {
            let mut args = vec![
                "keys",
                "--algorithm",
                algorithm.name(),
                "--chunk-size",
                "256",
            ];
            args.extend(["--save-unfull-chunk", save_unfull]);
            args.extend(["--model", "meta-llama/Llama-3.1-8B", "--dtype", "bfloat16"]);
            args.extend(["--world-size", "2", "--worker-id", "1"]);
            if with_vllm {
                args.push("--with-vllm");
            }
            let theirs = lmcache_code(&args, &json, seed);
            let hasher = ChunkHasher::new(algorithm, seed.unwrap_or(""), 256).unwrap();
            let end = if save_unfull == "true" { 1000 } else { 768 };
            let ours: Vec<String> = hasher
                .chunk_hashes(&tokens[..end])
                .into_iter()
                .map(|h| {
                    CacheKey::new("meta-llama/Llama-3.1-8B", 2, 1, h, KvDtype::Bf16)
                        .unwrap()
                        .signed(algorithm.signed())
                        .to_string()
                })
                .collect();
            let theirs: Vec<&str> = theirs.lines().collect();
            assert_eq!(
                theirs, ours,
                "{algorithm:?} seed {seed:?} unfull {save_unfull}"
            );
            negative += ours.iter().filter(|k| k.contains("@-")).count();
        }
    }
    assert!(negative > 0, "no negative builtin key was compared");
}

/// Chunks LMCache's code writes (its key string, RemoteMetadata and bytes, set as its
/// RedisConnector does) load in kvrelay bit for bit, as counted unchecked hits.
#[test]
#[ignore = "needs LMCache 0.5.6 in a venv: scripts/test_lmcache_compat.sh"]
fn lmcache_code_writes_chunks_kvrelay_loads() {
    let server = Server::start();
    let hash = -0x2fdf_48fc_280e_fdec_i64;
    for (spec, fmt) in [(SPEC, "KV_2LTD"), (MLA_SPEC, "KV_MLA_FMT")] {
        let t = RedisTier::new(&server.url(), spec, opts()).unwrap();
        for tokens in [256u32, 7] {
            let model = format!("lm-{fmt}-{tokens}");
            let shape = format!(
                "{},{},{tokens},{}",
                spec.kv_planes(),
                spec.num_layers,
                spec.num_kv_heads * spec.head_size
            );
            let printed = lmcache_code(
                &[
                    "put",
                    "--url",
                    &server.url(),
                    "--model",
                    &model,
                    "--world-size",
                    "1",
                    "--worker-id",
                    "0",
                    "--hash",
                    &hash.to_string(),
                    "--dtype",
                    "bfloat16",
                    "--fmt",
                    fmt,
                    "--shape",
                    &shape,
                ],
                "",
                None,
            );
            let key = CacheKey::new(&model, 1, 0, hash as u64, KvDtype::Bf16)
                .unwrap()
                .signed(true);
            assert_eq!(printed.trim(), key.to_string());
            let chunk = t.get(&key, spec.chunk_fingerprint()).unwrap().unwrap();
            assert_eq!(chunk.meta.num_tokens, tokens);
            assert!(chunk.data[..] == pattern(spec.chunk_bytes(tokens as usize))[..]);
        }
        let stats = t.stats();
        assert_eq!((stats.hits, stats.unchecked, stats.corrupt), (2, 2, 0));
    }
}

/// Chunks kvrelay writes decode in LMCache's code: its RemoteMetadata fields and the bytes.
#[test]
#[ignore = "needs LMCache 0.5.6 in a venv: scripts/test_lmcache_compat.sh"]
fn lmcache_code_reads_chunks_kvrelay_writes() {
    use sha2::{Digest, Sha256};

    let server = Server::start();
    for (spec, fmt, planes) in [(SPEC, "KV_2LTD", 2), (MLA_SPEC, "KV_MLA_FMT", 1)] {
        let t = RedisTier::new(&server.url(), spec, opts()).unwrap();
        for tokens in [256u32, 7] {
            let key = CacheKey::new("kvrelay", 1, 0, (-(tokens as i64)) as u64, KvDtype::Bf16)
                .unwrap()
                .signed(true);
            let data = pattern(spec.chunk_bytes(tokens as usize));
            let meta = ChunkMeta {
                layout_fingerprint: spec.chunk_fingerprint(),
                num_tokens: tokens,
            };
            t.put(&key, meta, &data).unwrap();
            let text = lmcache_code(
                &["get", "--url", &server.url(), "--key", &key.to_string()],
                "",
                None,
            );
            let seen: serde_json::Value = serde_json::from_str(&text).unwrap();
            let hidden = spec.num_kv_heads * spec.head_size;
            assert_eq!(
                seen,
                serde_json::json!({
                    "length": data.len(),
                    "fmt": fmt,
                    "dtypes": ["torch.bfloat16"],
                    "shapes": [[planes, spec.num_layers, tokens, hidden]],
                    "kv_len": data.len(),
                    "kv_sha256": format!("{:x}", Sha256::digest(&data)),
                }),
                "{fmt} {tokens} tokens"
            );
        }
    }
}
