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
    pd_yaml_ranks(role, channel, &[init], &[alloc], proxy)
}

/// A PD config whose ports list one entry per TP rank.
fn pd_yaml_ranks(role: &str, channel: &str, init: &[u16], alloc: &[u16], proxy: u16) -> String {
    let list = |ports: &[u16]| {
        ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "chunk_size: 32\nlocal_cpu: false\nmax_local_cpu_size: 0\nenable_pd: true\n\
         pd_role: {role}\npd_buffer_size: 4000000\npd_buffer_device: cpu\n\
         pd_peer_host: 127.0.0.1\npd_peer_init_port: [{}]\npd_peer_alloc_port: [{}]\n\
         pd_proxy_host: 127.0.0.1\npd_proxy_port: {proxy}\ntransfer_channel: {channel}\n\
         pre_caching_hash_algorithm: sha256_cbor\n",
        list(init),
        list(alloc)
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
    engine_with_extra(role, yaml, config, "{}")
}

/// An engine whose `kv_connector_extra_config` is `extra` (JSON).
fn engine_with_extra(role: &str, yaml: &str, config: EngineConfig, extra: &str) -> Engine {
    let mut engine = Engine::new(Model::tiny_random(4096), config).unwrap();
    let transfer = KvTransferConfig::from_json_str(&format!(
        r#"{{"kv_connector": "LMCacheConnectorV1", "kv_role": "{role}",
            "kv_load_failure_policy": "recompute", "kv_connector_extra_config": {extra}}}"#
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

/// What one engine of one rank computes for `ps`.
fn colocated(ps: &[Vec<u32>]) -> Vec<RequestOutput> {
    Engine::new(Model::tiny_random(4096), config())
        .unwrap()
        .generate(ps, SamplingParams::greedy(5))
        .unwrap()
}

/// A PD round over `channel` between engines of `ranks` TP ranks each (the decoder in
/// `decoder_config`, the YAMLs with the extra lines given): the prefiller pushes `ps`' KV,
/// every prefiller rank tells the proxy about every request, then the decoder decodes
/// them, equal to one colocated rank and with every prompt token but the last loaded, and
/// every rank's consumed pages come back.
fn pd_round(
    ps: &[Vec<u32>],
    channel: &str,
    ranks: usize,
    (decoder_config, decoder_yaml): (EngineConfig, &str),
    prefiller_yaml: &str,
) {
    let init: Vec<u16> = (0..ranks).map(|_| free_port()).collect();
    let alloc: Vec<u16> = (0..ranks).map(|_| free_port()).collect();
    let (proxy, notifications) = fake_proxy();
    let yaml = |role, extra| pd_yaml_ranks(role, channel, &init, &alloc, proxy) + extra;
    let mut decoder = engine(
        "kv_consumer",
        &yaml("receiver", decoder_yaml),
        tp(decoder_config, ranks),
    );
    let mut prefiller = engine(
        "kv_producer",
        &yaml("sender", prefiller_yaml),
        tp(config(), ranks),
    );
    let prefill = prefiller.generate(ps, SamplingParams::greedy(1)).unwrap();
    assert!(
        prefill.iter().all(|o| o.transfer.failed_sends == 0),
        "{prefill:?}"
    );
    let mut heard = Vec::new();
    for _ in 0..ranks * ps.len() {
        let ready = notifications
            .recv_timeout(Duration::from_secs(30))
            .expect("the proxy heard from every rank about every request");
        assert_eq!(ready.failure, None);
        heard.push((ready.request_id, ready.rank));
    }
    heard.sort();
    heard.dedup();
    assert_eq!(heard.len(), ranks * ps.len(), "{heard:?}");
    let decode = decoder.generate(ps, SamplingParams::greedy(5)).unwrap();
    assert_same(&decode, &colocated(ps));
    for (d, p) in decode.iter().zip(ps) {
        assert_eq!(d.hit_tokens, p.len() - 1, "{channel}: {d:?}");
    }
    assert_eq!(decoder.connectors().count(), ranks);
    for connector in decoder.connectors() {
        let receiver = connector.pd_receiver.as_ref().unwrap();
        assert_eq!(
            receiver.occupancy().used_pages,
            0,
            "{channel}: consumed pages come back"
        );
    }
}

#[test]
fn pd_over_tcp_and_shm_decodes_like_a_colocated_run() {
    // The last decoder also loads asynchronously (the engine's WaitingForRemoteKv path);
    // the shm prefiller sends from its save step (`sync`), the others from a sender thread.
    // The last decoder also has another block size and layout than its prefiller.
    for (channel, decoder_config, async_loading, backend_mode) in [
        ("tcp", config(), false, "async"),
        ("shm", config(), false, "sync"),
        ("tcp", other_config(), true, "async"),
    ] {
        pd_round(
            &prompts(),
            channel,
            1,
            (
                decoder_config,
                &format!("enable_async_loading: {async_loading}\n"),
            ),
            &format!("pd_backend_mode: {backend_mode}\n"),
        );
    }
}

/// Bytes of one PD buffer page (one 32-token chunk) of these engines.
fn page_bytes() -> usize {
    Engine::new(Model::tiny_random(4096), config())
        .unwrap()
        .kv_spec()
        .chunk_bytes(32)
}

/// A decoder and a prefiller whose PD buffer holds `pages` chunks; the decoder looks up
/// with LMCache's `skip_last_n_tokens: 1` and `decoder_yaml` appended to its config.
fn pd_pair(pages: usize, backend_mode: &str, decoder_yaml: &str) -> (Engine, Engine, Proxy) {
    let (init, alloc) = (free_port(), free_port());
    let (proxy, notifications) = fake_proxy();
    let small = |role| {
        pd_yaml(role, "tcp", init, alloc, proxy).replace(
            "pd_buffer_size: 4000000",
            &format!(
                "pd_buffer_size: {}\npd_allocation_timeout_sec: 1",
                pages * page_bytes()
            ),
        )
    };
    let decoder = engine_with_extra(
        "kv_consumer",
        &format!("{}{decoder_yaml}", small("receiver")),
        config(),
        r#"{"skip_last_n_tokens": 1}"#,
    );
    let prefiller = engine(
        "kv_producer",
        &format!("{}pd_backend_mode: {backend_mode}\n", small("sender")),
        config(),
    );
    (decoder, prefiller, notifications)
}

type Proxy = mpsc::Receiver<KvReady>;

/// Runs `prompts` under ids `{prefix}-{i}` to completion on `engine`, each with the
/// `disagg_spec.req_id` a PD proxy gives both of its engines.
fn run(
    engine: &mut Engine,
    prefix: &str,
    prompts: &[Vec<u32>],
    max_tokens: usize,
) -> Vec<RequestOutput> {
    for (i, prompt) in prompts.iter().enumerate() {
        let id = format!("{prefix}-{i}");
        let params = SamplingParams {
            kv_transfer_params: Some(serde_json::json!({"disagg_spec": {"req_id": id}})),
            ..SamplingParams::greedy(max_tokens)
        };
        engine.add_request(id, prompt.clone(), params).unwrap();
    }
    engine.run_to_completion().unwrap()
}

fn used_pages(decoder: &Engine) -> kvrelay::transfer::Occupancy {
    decoder
        .connector()
        .unwrap()
        .pd_receiver
        .as_ref()
        .unwrap()
        .occupancy()
}

/// Prompts of 5..=130 tokens: shorter than a chunk, whole chunks, partial tails.
fn varied_prompts(round: usize) -> Vec<Vec<u32>> {
    [5usize, 31, 32, 33, 64, 100, 130]
        .iter()
        .map(|&len| {
            (0..len)
                .map(|t| ((t * 13 + round * 7 + len) % 256) as u32)
                .collect()
        })
        .collect()
}

/// The regression of issue 11: with `skip_last_n_tokens: 1` the decoder never looked up a
/// prompt's last chunk, whose page then waited for the TTL; a buffer smaller than the
/// traffic filled up and every later request failed. Now the prefiller does not send what
/// the decoder will not look up, and every page comes back after each round.
#[test]
fn many_requests_with_skip_last_n_tokens_leave_no_page_behind() {
    let (mut decoder, mut prefiller, proxy) = pd_pair(12, "sync", "");
    let mut sent_short = false;
    for round in 0..8 {
        let prompts = varied_prompts(round);
        let id = format!("round{round}");
        let prefill = run(&mut prefiller, &id, &prompts, 1);
        for p in &prefill {
            assert_eq!(p.transfer.failed_sends, 0, "{p:?}");
            let note = proxy.recv_timeout(Duration::from_secs(30)).unwrap();
            assert_eq!(note.failure, None, "{note:?}");
            // The 5-token prompt: its only chunk ends past the decoder's 4-token lookup.
            if p.prompt_token_count == 5 {
                assert_eq!(p.transfer.pd_skipped_chunks, 1, "{p:?}");
                sent_short = true;
            }
        }
        let decode = run(&mut decoder, &id, &prompts, 3);
        for d in &decode {
            let prompt = d.prompt_token_count;
            // Every whole chunk inside the lookup was sent and loaded.
            assert_eq!(d.hit_tokens, (prompt - 1) / 32 * 32, "{d:?}");
            assert_eq!(d.recomputed_tokens, 0, "{d:?}");
        }
        let occ = used_pages(&decoder);
        assert_eq!((occ.used_pages, occ.requests), (0, 0), "round {round}");
        assert_eq!(occ.expired_requests, 0);
    }
    assert!(sent_short);
    let skipped = prefiller.connector().unwrap().worker.pd_skipped_chunks();
    // Per round: 5 (1 chunk), 32 (1), 64 (1), 100 (1: its 4-token tail) and 31, 33, 130
    // (each its tail or only chunk) are left out.
    assert_eq!(skipped, Some(8 * 7));
}

/// A decoder that loads less than it was sent (here `min_retrieve_tokens` makes it load
/// nothing) frees the rest when each request finishes, not at the TTL.
#[test]
fn a_decoder_request_that_does_not_load_its_kv_frees_it_when_it_finishes() {
    let (mut decoder, mut prefiller, proxy) = pd_pair(12, "async", "min_retrieve_tokens: 100000\n");
    for round in 0..6 {
        let prompts = varied_prompts(round);
        let id = format!("round{round}");
        run(&mut prefiller, &id, &prompts, 1);
        for _ in &prompts {
            let note = proxy.recv_timeout(Duration::from_secs(30)).unwrap();
            assert_eq!(note.failure, None, "round {round}: {note:?}");
        }
        assert!(used_pages(&decoder).used_pages > 0, "KV arrived and waits");
        let decode = run(&mut decoder, &id, &prompts, 2);
        assert!(decode.iter().all(|d| d.hit_tokens == 0));
        let occ = used_pages(&decoder);
        assert_eq!(
            (occ.used_pages, occ.requests, occ.expired_requests),
            (0, 0, 0)
        );
    }
}

/// A decoder request that ended before its KV arrived: the late transfer is refused at
/// allocation and holds no page.
#[test]
fn kv_for_a_request_the_decoder_already_finished_is_refused() {
    let (mut decoder, mut prefiller, proxy) = pd_pair(12, "sync", "");
    let prompts = vec![varied_prompts(0)[5].clone()];
    run(&mut decoder, "late", &prompts, 2);
    let prefill = run(&mut prefiller, "late", &prompts, 1);
    assert_eq!(prefill[0].transfer.failed_sends, 1, "{prefill:?}");
    assert!(
        proxy.recv_timeout(Duration::from_millis(200)).is_err(),
        "nothing was ready"
    );
    let occ = used_pages(&decoder);
    assert_eq!((occ.used_pages, occ.requests), (0, 0));
}

/// A request the decoder refuses at admission ends there: the KV sent for it is freed.
#[test]
fn kv_for_a_request_the_decoder_refuses_is_freed() {
    let (mut decoder, mut prefiller, proxy) = pd_pair(12, "sync", "");
    let prompt = varied_prompts(0)[5].clone();
    run(&mut prefiller, "refused", std::slice::from_ref(&prompt), 1);
    assert_eq!(
        proxy.recv_timeout(Duration::from_secs(30)).unwrap().failure,
        None
    );
    assert_eq!(used_pages(&decoder).used_pages, 3);
    let refusal = decoder.add_request("refused-0", prompt, SamplingParams::greedy(0));
    assert!(refusal.is_err());
    let occ = used_pages(&decoder);
    assert_eq!((occ.used_pages, occ.requests), (0, 0));
}

fn tp(config: EngineConfig, tensor_parallel_size: usize) -> EngineConfig {
    EngineConfig {
        tensor_parallel_size,
        ..config
    }
}

#[test]
fn two_tp_ranks_compute_the_logits_of_one_bit_for_bit() {
    let ps = prompts();
    let mut two = Engine::new(Model::tiny_random(4096), tp(config(), 2)).unwrap();
    assert_eq!(
        two.kv_spec().num_kv_heads,
        1,
        "each rank holds half the heads"
    );
    let outputs = two.generate(&ps, SamplingParams::greedy(5)).unwrap();
    assert_same(&outputs, &colocated(&ps));
    assert!(outputs.iter().all(|o| o.output_token_count == 5));
    // The digests are of real, differing logits: not a constant both runs share.
    assert_ne!(outputs[0].logits_digest, outputs[1].logits_digest);
}

#[test]
fn a_tp_size_that_does_not_divide_the_kv_heads_is_refused() {
    // tiny-random has 2 KV heads.
    for size in [0, 3, 4] {
        let error = Engine::new(Model::tiny_random(4096), tp(config(), size))
            .err()
            .unwrap_or_else(|| panic!("tensor_parallel_size {size} was accepted"));
        let text = error.to_string();
        assert!(
            text.contains(&format!("tensor_parallel_size {size} does not divide"))
                && text.contains("2 KV heads"),
            "{text}"
        );
    }
}

#[test]
fn pd_with_two_tp_ranks_decodes_like_a_one_rank_colocated_run() {
    // The last decoder has another block size and layout than its prefiller.
    for (channel, decoder_config) in [
        ("tcp", config()),
        ("shm", config()),
        ("tcp", other_config()),
    ] {
        pd_round(&prompts(), channel, 2, (decoder_config, ""), "");
    }
}

/// Chunked prefill overlaps the transfer: the decoder's pages are held from the prompt's
/// first step (each chunk then goes over in the step that computed it), nothing is
/// visible to the decoder before the prompt's end, and the decoded output still equals
/// a colocated run.
#[test]
fn chunked_prefill_reserves_the_decoders_pages_at_its_first_step() {
    for (mode, channel) in [("sync", "tcp"), ("async", "tcp"), ("async", "shm")] {
        let mode = format!("{mode} over {channel}");
        let (init, alloc) = (free_port(), free_port());
        let (proxy, notifications) = fake_proxy();
        let mut decoder = engine(
            "kv_consumer",
            &pd_yaml("receiver", channel, init, alloc, proxy),
            config(),
        );
        let sender_yaml = pd_yaml("sender", channel, init, alloc, proxy);
        let mut prefiller = engine(
            "kv_producer",
            &format!(
                "{sender_yaml}pd_backend_mode: {}\n",
                mode.split(' ').next().unwrap()
            ),
            config(),
        );
        // 100 tokens at 48 a step: three steps, the first saving one 32-token chunk.
        let prompt = prompts()[0].clone();
        prefiller
            .add_request("long", prompt.clone(), SamplingParams::greedy(1))
            .unwrap();
        assert!(prefiller.step().unwrap().is_empty());
        let receiver = decoder
            .connector()
            .unwrap()
            .pd_receiver
            .as_ref()
            .unwrap()
            .clone();
        let reserved = |r: &kvrelay::transfer::PdReceiver| {
            let occ = r.occupancy();
            occ.requests == 1 && occ.used_pages >= 3
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !reserved(&receiver) {
            assert!(
                std::time::Instant::now() < deadline,
                "{mode}: never reserved"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(notifications.try_recv().is_err(), "{mode}: ready too early");
        let prefill = prefiller.run_to_completion().unwrap();
        assert_eq!(prefill[0].transfer.failed_sends, 0, "{mode}");
        let ready = notifications.recv_timeout(Duration::from_secs(30)).unwrap();
        assert_eq!((ready.request_id.as_str(), ready.failure), ("long", None));
        // Counted once the commit returned, which is after the proxy heard of it.
        let reserved_sends = || prefiller.connector().unwrap().worker.pd_reserved_sends();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while reserved_sends() != Some(1) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(
            reserved_sends(),
            Some(1),
            "{mode}: not sent on its reservation"
        );
        // Each chunk the decoder looks up (three of 32 tokens, and tokens 96..99: its lookup
        // leaves out the last token) went over layer by layer during the forward that
        // computed it.
        let layered = prefiller.connector().unwrap().worker.pd_layered_chunks();
        assert_eq!(layered, Some(4), "{mode}");
        let ps = [prompt];
        let decode = decoder.generate(&ps, SamplingParams::greedy(5)).unwrap();
        assert_same(&decode, &colocated(&ps));
        assert_eq!(decode[0].hit_tokens, ps[0].len() - 1, "{mode}");
    }
}
