//! Prefill and decode processes sharing KV through Redis alone (LMCache `remote_url`),
//! against a real redis-server on loopback: decode equals the colocated run, also when
//! Redis dies, comes back, or holds garbage.
#![cfg(feature = "redis")]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

mod common;
use common::{assert_same_output, colocated, json_of, run, strict_phase};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A redis-server on a loopback port, killed on drop.
struct Redis {
    port: u16,
    child: Child,
}

impl Redis {
    fn start(port: u16) -> Redis {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is not installed (scripts/test.sh installs it)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while command(port, &[b"PING"]).as_deref() != Some(b"+PONG\r\n".as_slice()) {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Redis { port, child }
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One RESP command; the raw reply, or None when Redis cannot be reached.
fn command(port: u16, args: &[&[u8]]) -> Option<Vec<u8>> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut request = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        request.extend(format!("${}\r\n", arg.len()).bytes());
        request.extend_from_slice(arg);
        request.extend(b"\r\n");
    }
    stream.write_all(&request).ok()?;
    stream.shutdown(std::net::Shutdown::Write).ok()?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).ok()?;
    Some(reply)
}

/// The keys matching `pattern` (parses a RESP array of bulk strings).
fn keys(port: u16, pattern: &str) -> Vec<Vec<u8>> {
    let reply = command(port, &[b"KEYS", pattern.as_bytes()]).unwrap();
    let mut lines = reply
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let header = lines.next().unwrap();
    assert_eq!(
        header.first(),
        Some(&b'*'),
        "{}",
        String::from_utf8_lossy(&reply)
    );
    let mut out = Vec::new();
    while let (Some(len), Some(key)) = (lines.next(), lines.next()) {
        if len.starts_with(b"$") {
            out.push(key.to_vec());
        }
    }
    out
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn yaml(dir: &Path, port: u16) -> PathBuf {
    yaml_hashed(dir, port, "sha256_cbor")
}

fn yaml_hashed(dir: &Path, port: u16, hash: &str) -> PathBuf {
    let path = dir.join("lmcache-redis.yaml");
    std::fs::write(
        &path,
        format!(
            "chunk_size: 256\nlocal_cpu: false\nremote_url: \"redis://127.0.0.1:{port}\"\n\
             pre_caching_hash_algorithm: {hash}\nsave_unfull_chunk: true\n\
             blocking_timeout_secs: 2\n"
        ),
    )
    .unwrap();
    path
}

fn smoke(role: &str, yaml: &Path, extra: &[&str]) -> Output {
    let mut args = strict_phase(role);
    args.extend(extra);
    run(
        "disagg_lmcache_smoke",
        &args,
        &[("LMCACHE_CONFIG_FILE", yaml.as_os_str())],
    )
}

fn reference() -> Value {
    colocated("6", "1", "1")
}

/// LMCache's default `builtin` hash with PYTHONHASHSEED=0, as LMCache deployments run it.
#[test]
fn builtin_hash_keys_share_kv_through_redis() {
    let redis = Redis::start(free_port());
    let dir = tempfile::tempdir().unwrap();
    let yaml = yaml_hashed(dir.path(), redis.port, "builtin");
    let mut args = strict_phase("both");
    args.push("--require-lmcache-hit");
    let out = run(
        "disagg_lmcache_smoke",
        &args,
        &[
            ("LMCACHE_CONFIG_FILE", yaml.as_os_str()),
            ("PYTHONHASHSEED", "0".as_ref()),
        ],
    );
    let summary = json_of(&out);
    assert!(
        summary["lmcache_hit_tokens"]["decode"].as_u64().unwrap() >= 256,
        "{summary}"
    );
    assert_same_output(&summary["decode"], &reference(), "redis builtin");
    assert!(!keys(redis.port, "*kv_bytes").is_empty());
}

#[test]
fn prefill_and_decode_share_kv_through_redis_alone() {
    let redis = Redis::start(free_port());
    let dir = tempfile::tempdir().unwrap();
    let yaml = yaml(dir.path(), redis.port);
    let summary = json_of(&smoke("both", &yaml, &["--require-lmcache-hit"]));
    assert!(
        summary["lmcache_hit_tokens"]["decode"].as_u64().unwrap() >= 256,
        "{summary}"
    );
    assert_same_output(&summary["decode"], &reference(), "redis");
    assert!(!keys(redis.port, "*kv_bytes").is_empty());
}

#[test]
fn decode_recomputes_when_redis_dies_and_hits_again_once_it_is_back() {
    let port = free_port();
    let mut redis = Redis::start(port);
    let dir = tempfile::tempdir().unwrap();
    let yaml = yaml(dir.path(), port);
    let reference = reference();
    json_of(&smoke("prefill", &yaml, &[]));
    redis.stop();
    let decode = json_of(&smoke("decode", &yaml, &[]));
    assert_eq!(decode["lmcache_hit_tokens"], 0, "{decode}");
    assert_same_output(&decode, &reference, "redis");
    // Back (empty: no persistence); the next prefill stores again and decode hits.
    let redis = Redis::start(port);
    json_of(&smoke("prefill", &yaml, &[]));
    let decode = json_of(&smoke("decode", &yaml, &[]));
    assert!(
        decode["lmcache_hit_tokens"].as_u64().unwrap() >= 256,
        "{decode}"
    );
    assert_same_output(&decode, &reference, "redis");
    drop(redis);
}

#[test]
fn a_value_overwritten_with_garbage_is_a_miss_and_decode_still_matches() {
    let redis = Redis::start(free_port());
    let dir = tempfile::tempdir().unwrap();
    let yaml = yaml(dir.path(), redis.port);
    json_of(&smoke("prefill", &yaml, &[]));
    let stored = keys(redis.port, "*kv_bytes");
    assert!(!stored.is_empty());
    for key in &stored {
        let garbage = vec![0xa5u8; 4096];
        command(redis.port, &[b"SET", key, &garbage]).unwrap();
    }
    let decode = json_of(&smoke("decode", &yaml, &[]));
    assert!(
        decode["recomputed_tokens"].as_u64().unwrap() > 0,
        "{decode}"
    );
    assert_same_output(&decode, &reference(), "garbage");
}

/// An LMCache prefiller feeding a kvrelay decoder: chunks with LMCache's two keys and no
/// kvrelay check record (here kvrelay's own with the records deleted: the same bytes and
/// metadata LMCache writes) are unchecked hits, and decode still equals `generate`. With
/// `remote_accept_unchecked: false` they are misses and decode recomputes.
#[test]
fn chunks_without_kvrelay_records_feed_decode_unless_refused() {
    let redis = Redis::start(free_port());
    let dir = tempfile::tempdir().unwrap();
    let yaml = yaml_hashed(dir.path(), redis.port, "builtin");
    json_of(&smoke("prefill", &yaml, &[]));
    let records = keys(redis.port, "*kvrelay");
    assert!(!records.is_empty());
    for key in &records {
        command(redis.port, &[b"DEL", key]).unwrap();
    }
    assert!(keys(redis.port, "*kvrelay").is_empty());
    let decode = json_of(&smoke("decode", &yaml, &["--require-lmcache-hit"]));
    assert!(
        decode["lmcache_hit_tokens"].as_u64().unwrap() >= 256,
        "{decode}"
    );
    assert_same_output(&decode, &reference(), "unchecked");

    let refusing = dir.path().join("refusing.yaml");
    let text = std::fs::read_to_string(&yaml).unwrap();
    std::fs::write(
        &refusing,
        format!("{text}extra_config: {{remote_accept_unchecked: false}}\n"),
    )
    .unwrap();
    let decode = json_of(&smoke("decode", &refusing, &[]));
    assert_eq!(decode["lmcache_hit_tokens"], 0, "{decode}");
    assert_same_output(&decode, &reference(), "refused");
}
