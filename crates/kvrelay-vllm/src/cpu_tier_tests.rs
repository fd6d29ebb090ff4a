//! A CPU tier alone under vLLM: both halves in one process, as vLLM's EngineCore and
//! Worker processes would hold them. The worker half saves a prompt into its CPU tier; the
//! scheduler half, which has no CPU tier of its own, sees the hit through the lookup
//! channel; the worker loads it bit for bit; once the worker is gone, lookups are misses.

use crate::test_support::engine;
use crate::{build_half, Half, NewStep, SchedulerHalf};
use kvrelay::device::HostKvCache;
use kvrelay::layout::{BlockPacking, CpuAttnIsa, KvLayout, LayoutKind};

/// The bytes of `block` in each of the cache's buffers (vLLM CPU: one buffer per layer,
/// blocks outermost).
fn block_bytes(cache: &HostKvCache, block: usize) -> Vec<Vec<u8>> {
    let layout = cache.layout();
    let per_block = layout.buffer_bytes() / layout.spec().num_blocks;
    (0..layout.num_buffers())
        .map(|i| {
            // SAFETY: no connector copy runs while the test reads.
            let buffer = unsafe { cache.buffer(i) };
            buffer[block * per_block..(block + 1) * per_block].to_vec()
        })
        .collect()
}

#[test]
fn the_scheduler_half_sees_the_workers_cpu_tier_and_the_load_is_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("lmcache.yaml");
    std::fs::write(
        &config,
        "chunk_size: 256\nlocal_cpu: true\nmax_local_cpu_size: 0.05\n",
    )
    .unwrap();
    let env = || {
        [
            (
                "LMCACHE_CONFIG_FILE".to_string(),
                config.display().to_string(),
            ),
            (
                crate::lookup::DIR_ENV.to_string(),
                dir.path().join("lookup").display().to_string(),
            ),
        ]
    };
    let transfer = r#"{"kv_connector":"KvrelayConnector","kv_connector_module_path":"kvrelay.vllm","kv_role":"kv_both","engine_id":"cpu-alone"}"#;
    let engine = engine();
    let mut worker = build_half(&engine, transfer, env(), Half::Worker).unwrap();
    let scheduler = build_half(&engine, transfer, env(), Half::Scheduler).unwrap();
    assert!(scheduler.lookup_server.is_none());
    let mut scheduler = SchedulerHalf::new(scheduler.connector.scheduler);

    let layout = KvLayout::new(
        engine.spec().unwrap(),
        LayoutKind::OpaqueBlocks(BlockPacking::CpuAttn(CpuAttnIsa::Vec)),
    )
    .unwrap();
    let cache = HostKvCache::new(layout).unwrap();
    for i in 0..layout.num_buffers() {
        // SAFETY: the connector has not been handed the cache yet.
        let buffer = unsafe { cache.buffer_mut(i) };
        let half = buffer.len() / 2;
        // Blocks 0..8 hold the first request's KV; 8..16 stay zero for the second.
        for (j, b) in buffer[..half].iter_mut().enumerate() {
            *b = (j.wrapping_mul(2_654_435_761) >> 13) as u8 ^ i as u8;
        }
    }
    worker
        .connector
        .worker
        .register_kv_caches(cache.engine_memory())
        .unwrap();
    let prompt: Vec<u32> = (0..600).map(|t| t * 7 + 3).collect();

    // The first request computes the prompt; the worker saves its two whole chunks.
    assert_eq!(
        scheduler
            .get_num_new_matched_tokens("first", prompt.clone(), None, 0)
            .unwrap(),
        Some((0, false))
    );
    scheduler
        .update_state_after_alloc("first", vec![0, 1, 2, 3, 4], 0)
        .unwrap();
    let step = NewStep {
        id: "first".into(),
        block_ids: vec![0, 1, 2, 3, 4],
        num_computed_tokens: 600,
    };
    let saves = scheduler.build_connector_meta(vec![step], vec![]).unwrap();
    let kv = &mut worker.connector.worker;
    kv.bind_connector_metadata(saves);
    kv.start_load_kv().unwrap();
    kv.wait_for_save().unwrap();
    kv.clear_connector_metadata();
    scheduler.request_finished("first");

    // The same prompt again: the scheduler half finds 512 tokens in the worker's CPU tier.
    assert_eq!(
        scheduler
            .get_num_new_matched_tokens("second", prompt.clone(), None, 0)
            .unwrap(),
        Some((512, false))
    );
    let blocks = vec![9, 10, 11, 12, 13];
    scheduler
        .update_state_after_alloc("second", blocks.clone(), 512)
        .unwrap();
    let step = NewStep {
        id: "second".into(),
        block_ids: blocks,
        num_computed_tokens: 600,
    };
    let loads = scheduler.build_connector_meta(vec![step], vec![]).unwrap();
    assert_eq!(loads.requests[0].loads.len(), 2);
    kv.bind_connector_metadata(loads);
    kv.start_load_kv().unwrap();
    kv.wait_for_save().unwrap();
    kv.clear_connector_metadata();
    assert!(kv.get_block_ids_with_load_errors().is_empty());
    for (from, to) in [(0, 9), (1, 10), (2, 11), (3, 12)] {
        assert_eq!(
            block_bytes(&cache, from),
            block_bytes(&cache, to),
            "block {to}"
        );
    }
    // The trailing partial chunk was neither saved nor loaded.
    assert!(block_bytes(&cache, 13).iter().flatten().all(|&b| b == 0));
    scheduler.request_finished("second");

    // The worker is gone (its process died): the lookup is a miss and vLLM recomputes.
    drop(worker);
    assert_eq!(
        scheduler
            .get_num_new_matched_tokens("third", prompt, None, 0)
            .unwrap(),
        Some((0, false))
    );
}
