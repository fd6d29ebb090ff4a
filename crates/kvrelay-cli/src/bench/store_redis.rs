//! `kvrelay bench store --tier redis`: Redis-tier put then get of Llama-3-8B-sized chunks
//! against plain SET then GET of the same values under the same key names, over the same
//! connection (the tier's pool), interleaved round by round.
//!
//! Without `--url` it starts its own `redis-server` (no persistence) on a free loopback
//! port and stops it at the end.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use kvrelay::layout::KvCacheSpec;
use kvrelay::store::{ChunkMeta, RedisTier, RemoteOptions, Tier};

use super::store::{random_chunks, StoreArgs};
use super::{best_of, gbps, print_result};

const SPEC: KvCacheSpec = super::LLAMA_8B_CHUNKS;

/// A `redis-server` this bench started; killed on drop.
struct OwnServer {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server() -> Result<(OwnServer, String), String> {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("no free loopback port: {e}"))?
        .port();
    let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start redis-server ({e}); install it or pass --url"))?;
    Ok((
        OwnServer { child, _dir: dir },
        format!("redis://127.0.0.1:{port}"),
    ))
}

/// Waits until the server answers, for a server that is still starting.
fn wait_ready(tier: &RedisTier) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match tier.raw_get("kvrelay-bench-probe") {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e.to_string()),
            Err(_) => sleep(Duration::from_millis(50)),
        }
    }
}

pub fn run(args: StoreArgs) -> Result<(), String> {
    let token_bytes = SPEC.chunk_bytes(1);
    if !args.chunk_bytes.is_multiple_of(token_bytes) {
        return Err(format!(
            "--chunk-bytes must be a multiple of {token_bytes} (one token of Llama-3-8B KV) for --tier redis"
        ));
    }
    let (data, keys) = random_chunks(&args)?;
    let total = data.len();
    let chunks: Vec<&[u8]> = data.chunks_exact(args.chunk_bytes).collect();
    let meta = ChunkMeta {
        layout_fingerprint: SPEC.chunk_fingerprint(),
        num_tokens: (args.chunk_bytes / token_bytes) as u32,
    };

    let (_server, url) = match &args.url {
        Some(url) => (None, url.clone()),
        None => {
            let (server, url) = start_server()?;
            (Some(server), url)
        }
    };
    let opts = RemoteOptions {
        // The bench's own server may still be starting: retry soon.
        retry_after: Duration::from_millis(20),
        ..RemoteOptions::default()
    };
    let tier = RedisTier::new(&url, SPEC, opts).map_err(|e| e.to_string())?;
    wait_ready(&tier)?;
    // The baseline uses the tier's value key names, so the tier's remove cleans both up.
    let raw_keys: Vec<String> = keys.iter().map(|k| format!("{k}kv_bytes")).collect();
    let clear = || -> Result<(), String> {
        for key in &keys {
            tier.remove(key).map_err(|e| e.to_string())?;
        }
        Ok(())
    };

    let (mut put, mut set, mut get, mut raw_get) =
        (Duration::MAX, Duration::MAX, Duration::MAX, Duration::MAX);
    let mut failure: Option<String> = None;
    // Interleaved rounds, so a noisy moment hurts both sides alike; best of each. Only one
    // side's values are in the server at a time.
    for _ in 0..args.rounds.max(1) {
        put = put.min(best_of(1, || {
            for (key, chunk) in keys.iter().zip(&chunks) {
                if let Err(e) = tier.put(key, meta, chunk) {
                    failure.get_or_insert(e.to_string());
                }
            }
        }));
        get = get.min(best_of(1, || {
            for (key, chunk) in keys.iter().zip(&chunks) {
                match tier.get(key, meta.layout_fingerprint) {
                    Ok(Some(got)) if got.data.len() == chunk.len() => {
                        drop(std::hint::black_box(got))
                    }
                    Ok(_) => {
                        failure.get_or_insert(format!("{key} missing or resized"));
                    }
                    Err(e) => {
                        failure.get_or_insert(e.to_string());
                    }
                }
            }
        }));
        clear()?;
        set = set.min(best_of(1, || {
            for (key, chunk) in raw_keys.iter().zip(&chunks) {
                if let Err(e) = tier.raw_set(key, chunk) {
                    failure.get_or_insert(e.to_string());
                }
            }
        }));
        raw_get = raw_get.min(best_of(1, || {
            for (key, chunk) in raw_keys.iter().zip(&chunks) {
                match tier.raw_get(key) {
                    Ok(Some(got)) if got.len() == chunk.len() => drop(std::hint::black_box(got)),
                    Ok(_) => {
                        failure.get_or_insert(format!("{key} missing or resized"));
                    }
                    Err(e) => {
                        failure.get_or_insert(e.to_string());
                    }
                }
            }
        }));
        clear()?;
        if let Some(failure) = failure.take() {
            return Err(failure);
        }
    }
    // One exactness check outside the timed loops.
    tier.put(&keys[0], meta, chunks[0])
        .map_err(|e| e.to_string())?;
    let back = tier
        .get(&keys[0], meta.layout_fingerprint)
        .map_err(|e| e.to_string())?;
    if back.as_ref().map(|c| &c.data[..]) != Some(chunks[0]) {
        return Err(format!("{} did not read back bit-exact", keys[0]));
    }
    clear()?;

    let extra = serde_json::json!({
        "bytes": total,
        "chunk_bytes": args.chunk_bytes,
        "url": tier.endpoint(),
    });
    print_result(
        "store_redis_put",
        "gbps",
        gbps(total, put),
        gbps(total, set),
        extra.clone(),
    );
    print_result(
        "store_redis_get",
        "gbps",
        gbps(total, get),
        gbps(total, raw_get),
        extra,
    );
    Ok(())
}
