//! LMCache PD mode between two engines: the prefiller pushes each request's KV into the
//! decoder's PD buffer over a real channel, the proxy is notified, and the decoder's output
//! equals a colocated run.

use std::io::BufReader;
use std::net::TcpListener;
use std::sync::mpsc;
use std::time::Duration;

use kvrelay::config::{KvTransferConfig, LmcacheConfig};
use kvrelay::transfer::{read_notification, KvReady};
use kvrelay_engine::{Engine, EngineConfig, Model, RequestOutput, SamplingParams};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A stand-in for the PD proxy: collects KV-ready notifications.
fn fake_proxy() -> (u16, mpsc::Receiver<KvReady>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(stream);
            while let Ok(ready) = read_notification(&mut reader, None) {
                if tx.send(ready).is_err() {
                    return;
                }
            }
        }
    });
    (port, rx)
}

fn pd_yaml(role: &str, channel: &str, init: u16, alloc: u16, proxy: u16) -> String {
    format!(
        "chunk_size: 32\nlocal_cpu: false\nmax_local_cpu_size: 0\nenable_pd: true\n\
         pd_role: {role}\npd_buffer_size: 4000000\npd_buffer_device: cpu\n\
         pd_peer_host: 127.0.0.1\npd_peer_init_port: [{init}]\npd_peer_alloc_port: [{alloc}]\n\
         pd_proxy_host: 127.0.0.1\npd_proxy_port: {proxy}\ntransfer_channel: {channel}\n\
         pre_caching_hash_algorithm: sha256_cbor\n"
    )
}

fn config() -> EngineConfig {
    EngineConfig {
        block_size: 16,
        max_num_batched_tokens: 48,
        ..EngineConfig::default()
    }
}

/// A decoder unlike the prefiller: other block size, other paged layout.
fn other_config() -> EngineConfig {
    EngineConfig {
        block_size: 32,
        max_num_batched_tokens: 64,
        layout: kvrelay::layout::LayoutKind::RblnBlocksFirst,
        ..EngineConfig::default()
    }
}

fn engine(role: &str, yaml: &str, config: EngineConfig) -> Engine {
    let mut engine = Engine::new(Model::tiny_random(4096), config).unwrap();
    let transfer = KvTransferConfig::from_json_str(&format!(
        r#"{{"kv_connector": "LMCacheConnectorV1", "kv_role": "{role}",
            "kv_load_failure_policy": "recompute"}}"#
    ))
    .unwrap();
    let lmcache = LmcacheConfig::from_yaml_str(yaml).unwrap();
    engine.connect(&transfer, &lmcache, "tiny-random").unwrap();
    engine
}

fn prompts() -> Vec<Vec<u32>> {
    [100usize, 7, 64, 45]
        .iter()
        .enumerate()
        .map(|(i, &len)| (0..len).map(|t| ((t * 11 + i * 5) % 256) as u32).collect())
        .collect()
}

fn assert_same(decode: &[RequestOutput], colocated: &[RequestOutput]) {
    for (d, c) in decode.iter().zip(colocated) {
        assert_eq!(d.output_token_ids, c.output_token_ids, "{}", d.request_id);
        assert_eq!(d.logits_digest, c.logits_digest, "{}", d.request_id);
    }
}

#[test]
fn pd_over_tcp_and_shm_decodes_like_a_colocated_run() {
    let ps = prompts();
    let colocated = Engine::new(Model::tiny_random(4096), config())
        .unwrap()
        .generate(&ps, SamplingParams::greedy(5))
        .unwrap();
    // The last decoder also loads asynchronously (the engine's WaitingForRemoteKv path);
    // the shm prefiller sends from its save step (`sync`), the others from a sender thread.
    for (channel, decoder_config, async_loading, backend_mode) in [
        ("tcp", config(), false, "async"),
        ("shm", config(), false, "sync"),
        ("tcp", other_config(), true, "async"),
    ] {
        let (init, alloc) = (free_port(), free_port());
        let (proxy, notifications) = fake_proxy();
        let mut decoder = engine(
            "kv_consumer",
            &format!(
                "{}enable_async_loading: {async_loading}\n",
                pd_yaml("receiver", channel, init, alloc, proxy)
            ),
            decoder_config,
        );
        let mut prefiller = engine(
            "kv_producer",
            &format!(
                "{}pd_backend_mode: {backend_mode}\n",
                pd_yaml("sender", channel, init, alloc, proxy)
            ),
            config(),
        );
        let prefill = prefiller.generate(&ps, SamplingParams::greedy(1)).unwrap();
        assert!(
            prefill.iter().all(|o| o.transfer.failed_sends == 0),
            "{prefill:?}"
        );
        for _ in &ps {
            let ready = notifications
                .recv_timeout(Duration::from_secs(30))
                .expect("the proxy heard about every request");
            assert_eq!((ready.rank, ready.failure), (0, None));
        }
        let decode = decoder.generate(&ps, SamplingParams::greedy(5)).unwrap();
        assert_same(&decode, &colocated);
        for (d, p) in decode.iter().zip(&ps) {
            assert_eq!(d.hit_tokens, p.len() - 1, "{channel}: {d:?}");
        }
        let receiver = decoder.connector().unwrap().pd_receiver.as_ref().unwrap();
        assert_eq!(
            receiver.occupancy().used_pages,
            0,
            "{channel}: consumed pages come back"
        );
    }
}
