//! End-to-end connector flows: a prefill engine saves through one connector, a decode
//! engine with another layout and other block ids loads through a second connector over
//! the same directory, and after recomputing what it could not load its KV cache is
//! byte-identical to the prefill engine's.

use std::collections::HashSet;
use std::sync::Arc;

use kvrelay::config::{KvTransferConfig, LmcacheConfig};
use kvrelay::connector::{
    build_connector, Connector, EngineIdentity, RequestView, ScheduledRequest,
};
use kvrelay::device::{HostDevice, HostKvCache};
use kvrelay::keys::{default_seed, CacheKey, ChunkHasher, HashAlgorithm};
use kvrelay::layout::{AttentionKind, KvCacheSpec, KvLayout, LayoutKind};
use kvrelay::plan::{paged_to_chunks, ChunkWindow};
use kvrelay::store::{ChunkMeta, DiskTier, DiskTierOptions, Tier};
use kvrelay::KvDtype;

const BLOCK: usize = 4;
const CHUNK: usize = 16;

fn spec(block_size: usize) -> KvCacheSpec {
    KvCacheSpec {
        num_layers: 3,
        num_kv_heads: 2,
        head_size: 8,
        dtype: KvDtype::Bf16,
        block_size,
        num_blocks: 64,
        attention: AttentionKind::Mha,
    }
}

/// A stand-in for a forward pass: token t's KV depends on every token up to t.
fn forward(cache: &HostKvCache, tokens: &[u32], blocks: &[u32], range: std::ops::Range<usize>) {
    let layout = cache.layout();
    let s = *layout.spec();
    for t in range {
        let seed = xxhash_rust::xxh3::xxh3_64(bytemuck_tokens(&tokens[..=t]).as_slice());
        let (block, slot) = (blocks[t / s.block_size] as usize, t % s.block_size);
        for layer in 0..s.num_layers {
            for plane in 0..s.kv_planes() {
                for head in 0..s.num_kv_heads {
                    let at = layout.locate(layer, plane, block, slot, head);
                    // SAFETY: no connector copy runs during the forward.
                    let buf = unsafe { cache.buffer_mut(at.buffer) };
                    for (i, b) in buf[at.offset..at.offset + s.head_bytes()]
                        .iter_mut()
                        .enumerate()
                    {
                        *b = (seed >> ((layer + plane + head + i) % 8 * 8)) as u8 ^ i as u8;
                    }
                }
            }
        }
    }
}

fn bytemuck_tokens(tokens: &[u32]) -> Vec<u8> {
    tokens.iter().flat_map(|t| t.to_le_bytes()).collect()
}

/// The request's KV in chunk format, layout-independent.
fn request_kv(cache: &Arc<HostKvCache>, blocks: &[u32], len: usize) -> Vec<u8> {
    let window = ChunkWindow {
        start: 0,
        tokens: len,
        skip_leading: 0,
    };
    let plan = paged_to_chunks(cache.layout(), blocks, &[window]).unwrap();
    let mut out = vec![0u8; cache.layout().spec().chunk_bytes(len)];
    // SAFETY: no copy runs concurrently.
    let src: Vec<&[u8]> = (0..cache.layout().num_buffers())
        .map(|i| unsafe { cache.buffer(i) })
        .collect();
    plan.execute(&src, &mut [&mut out]).unwrap();
    out
}

fn connector(kind: &str, role: &str, dir: &std::path::Path, block_size: usize) -> Connector {
    let transfer = KvTransferConfig::from_json_str(&format!(
        r#"{{"kv_connector":"{kind}","kv_role":"{role}","kv_connector_extra_config":{{"shared_storage_path":"{}"}}}}"#,
        dir.display()
    ))
    .unwrap();
    let lmcache = LmcacheConfig::from_yaml_str(&format!(
        "chunk_size: {CHUNK}\nlocal_cpu: true\nmax_local_cpu_size: 0.01\nlocal_disk: \"file://{}\"\nmax_local_disk_size: 1\nsave_unfull_chunk: true\npre_caching_hash_algorithm: sha256_cbor\n",
        dir.display()
    ))
    .unwrap();
    let identity = EngineIdentity {
        model: "tiny-llama".into(),
        world_size: 1,
        worker_id: 0,
    };
    build_connector(
        &transfer,
        &lmcache,
        &identity,
        spec(block_size),
        Arc::new(HostDevice),
    )
    .unwrap()
}

struct Engine {
    connector: Connector,
    cache: Arc<HostKvCache>,
}

impl Engine {
    fn new(
        kind: &str,
        role: &str,
        dir: &std::path::Path,
        layout: LayoutKind,
        block_size: usize,
    ) -> Self {
        let mut connector = connector(kind, role, dir, block_size);
        let cache = HostKvCache::new(KvLayout::new(spec(block_size), layout).unwrap()).unwrap();
        connector
            .worker
            .register_kv_caches(cache.engine_memory())
            .unwrap();
        Engine { connector, cache }
    }

    /// Runs one request through the hooks in vLLM's order; returns tokens loaded.
    fn run(&mut self, id: &str, tokens: &[u32], blocks: &[u32]) -> (usize, HashSet<u32>) {
        let request = RequestView {
            id,
            tokens,
            num_prompt_tokens: tokens.len(),
            kv_transfer_params: None,
        };
        let c = &mut self.connector;
        let (external, is_async) = c
            .scheduler
            .get_num_new_matched_tokens(&request, 0)
            .unwrap()
            .unwrap();
        assert!(!is_async);
        c.scheduler
            .update_state_after_alloc(&request, blocks, external);
        let scheduled = [ScheduledRequest {
            request,
            block_ids: blocks,
            num_computed_tokens: tokens.len(),
        }];
        let meta = c.scheduler.build_connector_meta(&scheduled).unwrap();
        c.worker.bind_connector_metadata(meta);
        c.worker.start_load_kv().unwrap();
        let errors = c.worker.get_block_ids_with_load_errors();
        // Recompute from the first block whose load failed, as vLLM does.
        let first_bad = blocks
            .iter()
            .position(|b| errors.contains(b))
            .map(|i| i * self.cache.layout().spec().block_size);
        let loaded = first_bad.unwrap_or(external).min(external);
        forward(&self.cache, tokens, blocks, loaded..tokens.len());
        c.worker.wait_for_save().unwrap();
        c.worker.clear_connector_metadata();
        c.scheduler.request_finished(&request, blocks);
        (loaded, errors)
    }
}

fn tokens(len: usize, salt: u32) -> Vec<u32> {
    (0..len as u32)
        .map(|i| i.wrapping_mul(2654435761).wrapping_add(salt) % 128_000)
        .collect()
}

fn blocks(len: usize, block_size: usize, offset: u32) -> Vec<u32> {
    (0..len.div_ceil(block_size) as u32)
        .map(|i| (i * 5 + offset) % 64)
        .collect()
}

#[test]
fn disaggregated_kv_equals_colocated_for_every_layout_and_both_connectors() {
    for kind in ["LMCacheConnectorV1", "SharedStorageConnector"] {
        for decode_layout in LayoutKind::ALL
            .into_iter()
            .filter(|k| *k != LayoutKind::Mla)
        {
            for len in [3, 5, 16, 37, 64] {
                let dir = tempfile::tempdir().unwrap();
                let prompt = tokens(len, len as u32);
                let mut prefill = Engine::new(
                    kind,
                    "kv_producer",
                    dir.path(),
                    LayoutKind::FlashAttnNhd,
                    BLOCK,
                );
                let p_blocks = blocks(len, BLOCK, 1);
                prefill.run("p", &prompt, &p_blocks);
                // The decoder pages differently: other layout, block size and block ids.
                // SharedStorage names an entry by its whole-block prefix: peers share a block size.
                let decode_block = if kind == "SharedStorageConnector" {
                    BLOCK
                } else {
                    8
                };
                let mut decode =
                    Engine::new(kind, "kv_consumer", dir.path(), decode_layout, decode_block);
                let d_blocks = blocks(len, decode_block, 3);
                let (loaded, errors) = decode.run("d", &prompt, &d_blocks);
                assert!(errors.is_empty(), "{kind} {decode_layout} {len}");
                let expected_loaded = match kind {
                    // Whole blocks of prompt minus 2 tokens (vLLM's lookup rule).
                    "SharedStorageConnector" => {
                        let lookup = (len.max(2) - 2) / BLOCK * BLOCK;
                        let stored = (len - 1) / BLOCK * BLOCK;
                        if lookup == stored {
                            lookup
                        } else {
                            0
                        }
                    }
                    _ => len - 1,
                };
                assert_eq!(loaded, expected_loaded, "{kind} {decode_layout} {len}");
                assert_eq!(
                    request_kv(&prefill.cache, &p_blocks, len),
                    request_kv(&decode.cache, &d_blocks, len),
                    "{kind} {decode_layout} {len}"
                );
                if loaded > 0 {
                    assert!(decode.connector.worker.stats().loaded_bytes > 0);
                }
            }
        }
    }
}

#[test]
fn a_corrupted_chunk_is_reported_recomputed_and_never_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let len = 40;
    let prompt = tokens(len, 9);
    let mut prefill = Engine::new(
        "LMCacheConnectorV1",
        "kv_producer",
        dir.path(),
        LayoutKind::FlashAttnNhd,
        BLOCK,
    );
    let p_blocks = blocks(len, BLOCK, 0);
    prefill.run("p", &prompt, &p_blocks);
    // Flip the last payload byte of every chunk file but the first chunk's.
    let hasher = ChunkHasher::new(HashAlgorithm::Sha256Cbor, &default_seed(), CHUNK).unwrap();
    let disk = DiskTier::open(dir.path(), DiskTierOptions::new(u64::MAX)).unwrap();
    let hashes = hasher.chunk_hashes(&prompt);
    assert_eq!(hashes.len(), 3, "chunks of 16, 16 and 8 tokens");
    for hash in &hashes[1..] {
        let key = CacheKey::new("tiny-llama", 1, 0, *hash, KvDtype::Bf16).unwrap();
        let file = disk.chunk_path(&key);
        let mut bytes = std::fs::read(&file).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        std::fs::write(&file, bytes).unwrap();
    }
    let mut decode = Engine::new(
        "LMCacheConnectorV1",
        "kv_consumer",
        dir.path(),
        LayoutKind::RblnKvFirst,
        BLOCK,
    );
    let d_blocks = blocks(len, BLOCK, 2);
    let (loaded, errors) = decode.run("d", &prompt, &d_blocks);
    assert_eq!(loaded, CHUNK);
    let expected: HashSet<u32> = d_blocks[CHUNK / BLOCK..].iter().copied().collect();
    assert_eq!(errors, expected);
    assert_eq!(
        request_kv(&prefill.cache, &p_blocks, len),
        request_kv(&decode.cache, &d_blocks, len)
    );
    assert!(
        decode.connector.tiers.stats().corrupt > 0,
        "corrupt chunks are counted"
    );
}

fn rank_spec(attention: AttentionKind) -> KvCacheSpec {
    KvCacheSpec {
        num_kv_heads: if attention == AttentionKind::Mla {
            1
        } else {
            2
        },
        attention,
        ..spec(BLOCK)
    }
}

/// The keys a connector of rank `worker_id` of 2 saves and loads for one request, over
/// a disk tier in `dir` shared by the ranks.
fn rank_keys(
    attention: AttentionKind,
    extra: &str,
    worker_id: u32,
    dir: &std::path::Path,
) -> (Vec<String>, Vec<String>) {
    let transfer = KvTransferConfig::from_json_str(
        r#"{"kv_connector":"LMCacheConnectorV1","kv_role":"kv_both"}"#,
    )
    .unwrap();
    let lmcache = LmcacheConfig::from_yaml_str(&format!(
        "chunk_size: {CHUNK}\nlocal_cpu: false\nlocal_disk: \"file://{}\"\nmax_local_disk_size: 1\nsave_unfull_chunk: true\npre_caching_hash_algorithm: sha256_cbor\n{extra}",
        dir.display()
    ))
    .unwrap();
    let identity = EngineIdentity {
        model: "tiny-mla".into(),
        world_size: 2,
        worker_id,
    };
    let mut c = build_connector(
        &transfer,
        &lmcache,
        &identity,
        rank_spec(attention),
        Arc::new(HostDevice),
    )
    .unwrap();
    let toks = tokens(2 * CHUNK, 7);
    let blocks = blocks(toks.len(), BLOCK, 0);
    let request = RequestView {
        id: "r",
        tokens: &toks,
        num_prompt_tokens: toks.len(),
        kv_transfer_params: None,
    };
    let (external, _) = c
        .scheduler
        .get_num_new_matched_tokens(&request, 0)
        .unwrap()
        .unwrap();
    c.scheduler
        .update_state_after_alloc(&request, &blocks, external);
    let meta = c
        .scheduler
        .build_connector_meta(&[ScheduledRequest {
            request,
            block_ids: &blocks,
            num_computed_tokens: toks.len(),
        }])
        .unwrap();
    let names =
        |f: fn(&kvrelay::connector::RequestTransfer) -> &Vec<kvrelay::connector::ChunkTransfer>| {
            meta.requests
                .iter()
                .flat_map(|r| f(r).iter().map(|c| c.key.to_string()))
                .collect::<Vec<_>>()
        };
    (names(|r| &r.saves), names(|r| &r.loads))
}

/// LMCache's MLA default `save_only_first_rank`: keys of world size 1 (rank 0's), only
/// rank 0 saves, every rank loads; MHA and an explicit `false` keep per-rank keys.
#[test]
fn mla_saves_only_on_the_first_rank_under_world_size_one_keys() {
    let dir = tempfile::tempdir().unwrap();
    let (saves, loads) = rank_keys(AttentionKind::Mla, "", 0, dir.path());
    assert_eq!(saves.len(), 2);
    assert!(loads.is_empty());
    assert!(
        saves.iter().all(|k| k.starts_with("tiny-mla@1@0@")),
        "{saves:?}"
    );
    // Rank 0's chunks land in the shared tier; rank 1 saves nothing and loads them.
    let mla = rank_spec(AttentionKind::Mla);
    let disk = DiskTier::open(dir.path(), DiskTierOptions::new(1 << 30)).unwrap();
    for key in &saves {
        let meta = ChunkMeta {
            layout_fingerprint: mla.chunk_fingerprint(),
            num_tokens: CHUNK as u32,
        };
        disk.put(
            &key.parse::<CacheKey>().unwrap(),
            meta,
            &vec![1; mla.chunk_bytes(CHUNK)],
        )
        .unwrap();
    }
    let (saves1, loads1) = rank_keys(AttentionKind::Mla, "", 1, dir.path());
    assert!(saves1.is_empty(), "{saves1:?}");
    assert_eq!(loads1, saves);
    for (attention, extra) in [
        (AttentionKind::Mha, ""),
        (
            AttentionKind::Mha,
            "extra_config: {save_only_first_rank: true}\n",
        ),
        (
            AttentionKind::Mla,
            "extra_config: {save_only_first_rank: false}\n",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (saves, _) = rank_keys(attention, extra, 1, dir.path());
        assert_eq!(saves.len(), 2, "{attention:?} {extra}");
        assert!(
            saves.iter().all(|k| k.starts_with("tiny-mla@2@1@")),
            "{saves:?}"
        );
    }
    let err =
        LmcacheConfig::from_yaml_str("extra_config: {save_only_first_rank: maybe}").unwrap_err();
    assert!(err.to_string().contains("save_only_first_rank"), "{err}");
}
