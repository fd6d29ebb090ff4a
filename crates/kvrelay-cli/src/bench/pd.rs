//! `kvrelay bench pd`: one long prompt prefilled with chunked prefill on the reference
//! engine (tiny-random) by a PD prefiller whose async sender pushes the KV into a decoder
//! engine's PD buffer over loopback, timed from the engine's side: the prefill steps'
//! compute time, and the KV-ready delay (the proxy's notification after the end of the
//! prompt's last step; negative when it came before the step returned). A second run in
//! the same process gives the scale: the same prompt in one step, all of its KV sent after
//! the step, whose delay is the whole transfer's time; one chunk's transfer time is that
//! divided by the chunks (a one-chunk prompt's delay is lost in the step's own tail on the
//! tiny model). The goal is an overlapped delay ≤ one chunk's transfer. The prefiller
//! sends each layer of a step's chunks as the forward computes it and commits after the
//! last layer of the last step (`layered_chunks` counts the chunks that went so).
//! Each pair first moves a one-chunk warm-up request, so no figure holds a handshake.
//! After each run the decoder decodes the prompt and must load all of it but the last
//! token and agree with the prefiller's first token.

use std::io::BufReader;
use std::net::TcpListener;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kvrelay::config::{KvTransferConfig, LmcacheConfig};
use kvrelay::transfer::{read_notification, KvReady, TransferError};
use kvrelay_engine::{Engine, EngineConfig, Model, SamplingParams};

use super::print_result;

#[derive(clap::Args)]
pub struct PdArgs {
    /// Prompt tokens.
    #[arg(long, default_value_t = 8192)]
    prompt_tokens: usize,
    /// The prefiller's token budget per step (chunked prefill).
    #[arg(long, default_value_t = 512)]
    max_num_batched_tokens: usize,
    /// Timed prompts per configuration; each figure is the median.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// `tcp` or `shm`.
    #[arg(long, default_value = "tcp")]
    transport: String,
}

/// LMCache's default chunk size: one chunk of the one-chunk run.
const CHUNK_TOKENS: usize = 256;

/// What one prefill timed.
struct Run {
    /// Summed duration of the steps that computed the prompt.
    compute: Duration,
    steps: usize,
    /// From the end of the prompt's last step to the proxy's KV-ready notification, ms;
    /// negative when the notification came before the step returned.
    delay_ms: f64,
}

/// The median of `runs` by `figure`.
fn median(runs: &[Run], figure: impl Fn(&Run) -> f64) -> f64 {
    let mut values: Vec<f64> = runs.iter().map(figure).collect();
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

pub fn run(args: PdArgs) -> Result<(), String> {
    if args.rounds == 0 || args.prompt_tokens == 0 {
        return Err("--rounds and --prompt-tokens must be at least 1".into());
    }
    let n = args.prompt_tokens;
    let (overlapped, layered_chunks) = prefill(&args, n, args.max_num_batched_tokens)?;
    let (whole, _) = prefill(&args, n, n)?;
    let round3 = |ms: f64| (ms * 1e3).round() / 1e3;
    let delay = |runs: &[Run]| round3(median(runs, |r| r.delay_ms));
    let (overlapped_ms, total_ms) = (delay(&overlapped), delay(&whole));
    // One chunk's share of the whole prompt's transfer, measured in this run.
    let one_chunk_ms = round3(total_ms / n.div_ceil(CHUNK_TOKENS) as f64);
    print_result(
        "pd",
        "kv_ready_delay_ms",
        overlapped_ms,
        one_chunk_ms,
        serde_json::json!({
            "transport": args.transport,
            "prompt_tokens": n,
            "max_num_batched_tokens": args.max_num_batched_tokens,
            "rounds": args.rounds,
            "prefill_steps": overlapped[0].steps,
            "prefill_compute_ms": round3(median(&overlapped, |r| r.compute.as_secs_f64() * 1e3)),
            "total_transfer_ms": total_ms,
            "layered_chunks": layered_chunks,
            "one_chunk_transfer_ms": one_chunk_ms,
            "baseline_is": "one_chunk_transfer_ms = total_transfer_ms / chunks; total_transfer_ms: the KV-ready delay of the same prompt prefilled in one step (all its KV sent after that step)",
            "goal_met": overlapped_ms <= one_chunk_ms,
        }),
    );
    Ok(())
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("finding a free port: {e}"))
}

/// A prefiller and a decoder of `tokens`-long prompts over fresh ports; `args.rounds`
/// prompts prefilled with `budget` tokens per step, each timed, then decoded and checked.
/// Also returns the prefiller's chunks that went over layer by layer.
fn prefill(args: &PdArgs, tokens: usize, budget: usize) -> Result<(Vec<Run>, u64), String> {
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|e| format!("binding the proxy: {e}"))?;
    let proxy = listener.local_addr().map_err(|e| e.to_string())?.port();
    let (tx, notes) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let ready = read_notification(&mut BufReader::new(stream), None);
            if tx.send((Instant::now(), ready)).is_err() {
                return;
            }
        }
    });
    let (init, alloc) = (free_port()?, free_port()?);
    let new_engine = |budget: usize| {
        let config = EngineConfig {
            max_num_batched_tokens: budget,
            max_model_len: tokens + 16,
            max_num_seqs: 2,
            ..EngineConfig::default()
        };
        Engine::new(Model::tiny_random(tokens + 16), config).map_err(|e| e.to_string())
    };
    let mut decoder = new_engine(tokens)?;
    let mut prefiller = new_engine(budget)?;
    // Room for every round's chunks and the warm-up's.
    let buffer = decoder.kv_spec().chunk_bytes(CHUNK_TOKENS)
        * ((tokens.div_ceil(CHUNK_TOKENS) + 1) * args.rounds + 1);
    let yaml = |role: &str| {
        format!(
            "chunk_size: {CHUNK_TOKENS}\nlocal_cpu: false\nmax_local_cpu_size: 0\nenable_pd: true\n\
             pd_role: {role}\npd_buffer_size: {buffer}\npd_buffer_device: cpu\n\
             pd_peer_host: 127.0.0.1\npd_peer_init_port: [{init}]\npd_peer_alloc_port: [{alloc}]\n\
             pd_proxy_host: 127.0.0.1\npd_proxy_port: {proxy}\ntransfer_channel: {}\n\
             pd_backend_mode: async\n",
            args.transport
        )
    };
    let connect = |engine: &mut Engine, role: &str, kv_role: &str| -> Result<(), String> {
        let transfer = KvTransferConfig::from_json_str(&format!(
            r#"{{"kv_connector": "LMCacheConnectorV1", "kv_role": "{kv_role}",
                "kv_load_failure_policy": "recompute"}}"#
        ))
        .map_err(|e| e.to_string())?;
        let lmcache = LmcacheConfig::from_yaml_str(&yaml(role)).map_err(|e| e.to_string())?;
        engine
            .connect(&transfer, &lmcache, "tiny-random")
            .map_err(|e| e.to_string())
    };
    connect(&mut decoder, "receiver", "kv_consumer")?;
    connect(&mut prefiller, "sender", "kv_producer")?;
    // A one-chunk request first, so the timed one finds the sender's connection made (no
    // handshake or mapping in any of the figures).
    let warm: Vec<u32> = (0..CHUNK_TOKENS).map(|t| (t % 13) as u32).collect();
    prefiller
        .generate(std::slice::from_ref(&warm), SamplingParams::greedy(1))
        .map_err(|e| e.to_string())?;
    let (_, warm_ready) = notes
        .recv_timeout(Duration::from_secs(120))
        .map_err(|_| "the proxy never heard of the warm-up request".to_string())?;
    warm_ready.map_err(|e| e.to_string())?;
    decoder
        .generate(&[warm], SamplingParams::greedy(1))
        .map_err(|e| e.to_string())?;
    let runs = (0..args.rounds)
        .map(|round| timed(&mut prefiller, &mut decoder, &notes, tokens, round))
        .collect::<Result<Vec<Run>, String>>()?;
    let layered = prefiller
        .connector()
        .and_then(|c| c.worker.pd_layered_chunks())
        .unwrap_or(0);
    Ok((runs, layered))
}

/// One prompt prefilled, timed to its KV-ready notification, then decoded and checked.
fn timed(
    prefiller: &mut Engine,
    decoder: &mut Engine,
    notes: &mpsc::Receiver<(Instant, Result<KvReady, TransferError>)>,
    tokens: usize,
    round: usize,
) -> Result<Run, String> {
    let prompt: Vec<u32> = (0..tokens)
        .map(|t| ((t * 7919 + round * 31) % 251) as u32)
        .collect();
    prefiller
        .add_request(
            format!("bench-pd-{round}"),
            prompt.clone(),
            SamplingParams::greedy(1),
        )
        .map_err(|e| e.to_string())?;
    let (mut compute, mut steps) = (Duration::ZERO, 0);
    let (last_step_end, first_token) = loop {
        let started = Instant::now();
        let finished = prefiller.step().map_err(|e| e.to_string())?;
        let ended = Instant::now();
        compute += ended - started;
        steps += 1;
        if let Some(out) = finished.into_iter().next() {
            if out.transfer.failed_sends > 0 {
                return Err(format!("the prefiller's send failed: {out:?}"));
            }
            break (ended, out.output_token_ids.first().copied());
        }
    };
    let (noted, ready) = notes
        .recv_timeout(Duration::from_secs(120))
        .map_err(|_| "the proxy never heard that the KV is ready".to_string())?;
    let ready = ready.map_err(|e| e.to_string())?;
    if let Some(failure) = ready.failure {
        return Err(format!("the prefiller reported a failed send: {failure}"));
    }
    let decoded = decoder
        .generate(&[prompt], SamplingParams::greedy(1))
        .map_err(|e| e.to_string())?;
    let out = &decoded[0];
    if out.hit_tokens != tokens - 1 || out.output_token_ids.first().copied() != first_token {
        return Err(format!(
            "the decoder loaded {} of {} tokens and sampled {:?}, the prefiller {first_token:?}",
            out.hit_tokens,
            tokens - 1,
            out.output_token_ids.first()
        ));
    }
    Ok(Run {
        compute,
        steps,
        delay_ms: if noted >= last_step_end {
            (noted - last_step_end).as_secs_f64() * 1e3
        } else {
            -(last_step_end - noted).as_secs_f64() * 1e3
        },
    })
}
