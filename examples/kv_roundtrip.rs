//! The main job on embedded defaults: a "prefill" process saves a paged KV cache through
//! the LMCache connector into a shared local-disk tier, then a second, separate "decode"
//! process with another layout and other block ids loads it and checks every byte.
//!
//! `cargo run --release --example kv_roundtrip [-- --dir DIR --tokens N]`

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Arc;

use kvrelay::config::{KvTransferConfig, LmcacheConfig};
use kvrelay::connector::{build_connector, EngineIdentity, RequestView, ScheduledRequest};
use kvrelay::device::{HostDevice, HostKvCache};
use kvrelay::layout::{AttentionKind, KvCacheSpec, KvLayout, LayoutKind};
use kvrelay::plan::{paged_to_chunks, ChunkWindow};
use kvrelay::KvDtype;

fn spec(block_size: usize) -> KvCacheSpec {
    KvCacheSpec {
        num_layers: 16,
        num_kv_heads: 8,
        head_size: 64,
        dtype: KvDtype::Bf16,
        block_size,
        num_blocks: 512,
        attention: AttentionKind::Mha,
    }
}

/// The prompt and its KV, both derived from the token count so the two processes agree.
fn prompt(tokens: usize) -> Vec<u32> {
    (0..tokens as u32)
        .map(|i| i.wrapping_mul(2654435761) % 128_256)
        .collect()
}

/// The request's KV in the layout-independent chunk format.
fn request_kv(cache: &Arc<HostKvCache>, blocks: &[u32], tokens: usize) -> Result<Vec<u8>, String> {
    let window = ChunkWindow {
        start: 0,
        tokens,
        skip_leading: 0,
    };
    let plan = paged_to_chunks(cache.layout(), blocks, &[window]).map_err(|e| e.to_string())?;
    let mut out = vec![0u8; cache.layout().spec().chunk_bytes(tokens)];
    // SAFETY: this process runs no copy concurrently with the read.
    let src: Vec<&[u8]> = (0..cache.layout().num_buffers())
        .map(|i| unsafe { cache.buffer(i) })
        .collect();
    plan.execute(&src, &mut [&mut out])
        .map_err(|e| e.to_string())?;
    Ok(out)
}

/// A deterministic stand-in for the prefill forward pass: fills the request's blocks.
fn fill(cache: &Arc<HostKvCache>, blocks: &[u32], tokens: usize) -> Result<(), String> {
    let s = *cache.layout().spec();
    let mut chunk = vec![0u8; s.chunk_bytes(tokens)];
    chunk
        .iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = (i.wrapping_mul(31) >> 3) as u8);
    let window = ChunkWindow {
        start: 0,
        tokens,
        skip_leading: 0,
    };
    let plan = paged_to_chunks(cache.layout(), blocks, &[window])
        .map_err(|e| e.to_string())?
        .inverse();
    // SAFETY: the engine owns the cache exclusively while it writes.
    let mut dst: Vec<&mut [u8]> = (0..cache.layout().num_buffers())
        .map(|i| unsafe { cache.buffer_mut(i) })
        .collect();
    plan.execute(&[&chunk], &mut dst).map_err(|e| e.to_string())
}

fn run_role(role: &str, dir: &Path, tokens: usize) -> Result<serde_json::Value, String> {
    let (kv_role, layout, block_size, first_block) = match role {
        "prefill" => ("kv_producer", LayoutKind::FlashAttnNhd, 16, 3),
        _ => ("kv_consumer", LayoutKind::RblnKvFirst, 32, 7),
    };
    let transfer = KvTransferConfig::from_json_str(&format!(
        r#"{{"kv_connector":"LMCacheConnectorV1","kv_role":"{kv_role}"}}"#
    ))
    .map_err(|e| e.to_string())?;
    let lmcache = LmcacheConfig::from_yaml_str(&format!(
        "chunk_size: 256\nlocal_cpu: true\nmax_local_cpu_size: 1\nlocal_disk: \"file://{}\"\nmax_local_disk_size: 4\nsave_unfull_chunk: true\npre_caching_hash_algorithm: sha256_cbor\n",
        dir.display()
    ))
    .map_err(|e| e.to_string())?;
    let identity = EngineIdentity {
        model: "kvrelay/tiny".into(),
        world_size: 1,
        worker_id: 0,
    };
    let mut connector = build_connector(
        &transfer,
        &lmcache,
        &identity,
        spec(block_size),
        Arc::new(HostDevice),
    )
    .map_err(|e| e.to_string())?;
    let cache =
        HostKvCache::new(KvLayout::new(spec(block_size), layout).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    connector
        .worker
        .register_kv_caches(cache.engine_memory())
        .map_err(|e| e.to_string())?;
    let tokens_ids = prompt(tokens);
    let blocks: Vec<u32> = (0..tokens.div_ceil(block_size) as u32)
        .map(|i| (first_block + i * 3) % 512)
        .collect();
    let request = RequestView {
        id: role,
        tokens: &tokens_ids,
        num_prompt_tokens: tokens,
        kv_transfer_params: None,
    };
    let (external, _) = connector
        .scheduler
        .get_num_new_matched_tokens(&request, 0)
        .map_err(|e| e.to_string())?
        .unwrap_or((0, false));
    connector
        .scheduler
        .update_state_after_alloc(&request, &blocks, external);
    let scheduled = [ScheduledRequest {
        request,
        block_ids: &blocks,
        num_computed_tokens: tokens,
    }];
    let meta = connector
        .scheduler
        .build_connector_meta(&scheduled)
        .map_err(|e| e.to_string())?;
    connector.worker.bind_connector_metadata(meta);
    connector
        .worker
        .start_load_kv()
        .map_err(|e| e.to_string())?;
    if role == "prefill" {
        fill(&cache, &blocks, tokens)?;
    }
    connector
        .worker
        .wait_for_save()
        .map_err(|e| e.to_string())?;
    connector.worker.clear_connector_metadata();
    let stats = connector.worker.stats().clone();
    let mut summary = serde_json::json!({
        "role": role,
        "layout": layout.name(),
        "hit_tokens": external,
        "saved_bytes": stats.saved_bytes,
        "loaded_bytes": stats.loaded_bytes,
        "save_ms": stats.save_time.as_secs_f64() * 1e3,
        "load_ms": stats.load_time.as_secs_f64() * 1e3,
    });
    if role == "decode" {
        if !connector.worker.get_block_ids_with_load_errors().is_empty() || external != tokens - 1 {
            return Err(format!("decode loaded {external} of {} tokens", tokens - 1));
        }
        // The decoder recomputes only the last token; compare everything it loaded.
        let expected = {
            let reference = HostKvCache::new(
                KvLayout::new(spec(block_size), layout).map_err(|e| e.to_string())?,
            )
            .map_err(|e| e.to_string())?;
            fill(&reference, &blocks, tokens)?;
            request_kv(&reference, &blocks, tokens - 1)?
        };
        let matched = request_kv(&cache, &blocks, tokens - 1)? == expected;
        summary["bytes_match"] = matched.into();
        if !matched {
            return Err("decode's KV differs from prefill's".into());
        }
    }
    Ok(summary)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let tokens: usize = flag("--tokens")
        .and_then(|t| t.parse().ok())
        .unwrap_or(1000);
    let result = match flag("--role") {
        Some(role) => {
            let dir = PathBuf::from(flag("--dir").unwrap_or_default());
            run_role(&role, &dir, tokens).map(|summary| println!("{summary}"))
        }
        None => orchestrate(flag("--dir").map(PathBuf::from), tokens),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("kv_roundtrip: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Runs prefill, then decode, each as its own OS process sharing only the disk directory.
fn orchestrate(dir: Option<PathBuf>, tokens: usize) -> Result<(), String> {
    let temp = tempfile::tempdir().map_err(|e| e.to_string())?;
    let dir = dir.unwrap_or_else(|| temp.path().join("tier"));
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    for role in ["prefill", "decode"] {
        let status = Command::new(&exe)
            .args(["--role", role, "--dir"])
            .arg(&dir)
            .args(["--tokens", &tokens.to_string()])
            .status()
            .map_err(|e| format!("cannot start the {role} process: {e}"))?;
        if !status.success() {
            return Err(format!("the {role} process failed ({status})"));
        }
    }
    Ok(())
}
