//! `kvrelay bench soak`: ordinary PD traffic for a long while, as an operator runs it. It
//! starts a decoder, a prefiller (both `kvrelay serve` over the embedded `tiny-random`
//! model, LMCache PD over tcp or shm, the seed's connector flags) and `kvrelay proxy`, sends
//! many short and long completions through the proxy, checks that every answer is a 200
//! whose tokens equal the engine run alone, and that the decoder's PD buffer ends with no
//! page in use: the failure this bench exists for is pages that outlive their requests.
//! Prints one JSON line with the throughput, latencies and the decoder's PD figures.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::Args;
use kvrelay_engine::{load_model, Engine, EngineConfig, SamplingParams, Tokenizer, TINY_RANDOM};
use serde_json::{json, Value};

#[derive(Args, Debug)]
pub struct SoakArgs {
    /// Completions sent through the proxy.
    #[arg(long, default_value_t = 3000)]
    requests: usize,
    /// Clients sending at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Distinct prompts the requests cycle through (short and long ones, alternating
    /// lengths); equal prompts in flight at once share chunk keys in the PD buffer.
    #[arg(long, default_value_t = 48)]
    prompts: usize,
    /// Tokens each completion generates.
    #[arg(long, default_value_t = 4)]
    max_tokens: usize,
    /// The PD channel: tcp or shm.
    #[arg(long, default_value = "tcp")]
    channel: String,
    /// The decoder's PD buffer, MiB. The default holds a few requests, not the whole run,
    /// so pages that are never freed stop the traffic long before the end.
    #[arg(long, default_value_t = 64)]
    pd_buffer_mib: u64,
}

const MAX_MODEL_LEN: usize = 2048;
const CHUNK_SIZE: usize = 256;

/// The seed's decoder `--kv-transfer-config` (skip_last_n_tokens 1).
const CONSUMER: &str = r#"{"kv_connector":"LMCacheConnectorV1","kv_role":"kv_consumer","kv_connector_extra_config":{"discard_partial_chunks":false,"lmcache_rpc_port":"consumer1","skip_last_n_tokens":1}}"#;
/// The seed's prefiller `--kv-transfer-config`.
const PRODUCER: &str = r#"{"kv_connector":"LMCacheConnectorV1","kv_role":"kv_producer","kv_connector_extra_config":{"discard_partial_chunks":false,"lmcache_rpc_port":"producer1"}}"#;

/// A child `kvrelay` process, killed when dropped.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    /// Starts this executable with `args` and waits (bounded) for its "listening on" line.
    fn start(what: &str, args: &[&str], envs: &[(&str, &Path)]) -> Result<Server, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut child = Command::new(exe)
            .args(args)
            .envs(envs.iter().copied())
            .env("PYTHONHASHSEED", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting the {what}: {e}"))?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let (lines, said) = mpsc::channel();
        std::thread::spawn(move || {
            // Drained to the end so the child never blocks on a full pipe; only the first
            // lines are of interest.
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = lines.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match said.recv_timeout(left) {
                Ok(line) => match line.split_once("listening on ") {
                    Some((_, url)) => {
                        return Ok(Server {
                            child,
                            url: url.trim().to_string(),
                        })
                    }
                    None => seen.push(line),
                },
                Err(_) => {
                    let _ = child.kill();
                    return Err(format!(
                        "the {what} did not start within 120 s; it said: {}",
                        seen.join(" | ")
                    ));
                }
            }
        }
    }

    fn port(&self) -> &str {
        self.url.rsplit(':').next().unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("finding a free port: {e}"))
}

/// Prompt `i` of the run: lengths from a few tokens to several chunks, alternating short
/// and long so both kinds are in flight together.
fn prompt(i: usize) -> String {
    let sentence = format!("Soak prompt {i}: why does the decoder free its pages? ");
    let repeats = if i.is_multiple_of(2) {
        1 + i % 5
    } else {
        12 + 2 * (i % 7)
    };
    sentence.repeat(repeats)
}

/// What the engine alone generates for each prompt: the answers the run must equal.
fn colocated(prompts: &[Vec<u32>], max_tokens: usize) -> Result<Vec<Vec<u32>>, String> {
    let (model, _) = load_model(TINY_RANDOM, MAX_MODEL_LEN).map_err(|e| e.to_string())?;
    let config = EngineConfig {
        max_model_len: MAX_MODEL_LEN,
        ..EngineConfig::default()
    };
    let mut engine = Engine::new(model, config).map_err(|e| e.to_string())?;
    Ok(engine
        .generate(prompts, SamplingParams::greedy(max_tokens))
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|o| o.output_token_ids)
        .collect())
}

/// The value of an unlabelled Prometheus sample.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or(0.0)
}

pub fn run(args: SoakArgs) -> Result<(), String> {
    if args.requests == 0 || args.concurrency == 0 || args.prompts == 0 {
        return Err("--requests, --concurrency and --prompts must be at least 1".into());
    }
    if !matches!(args.channel.as_str(), "tcp" | "shm") {
        return Err(format!(
            "--channel {}: the soak runs tcp or shm",
            args.channel
        ));
    }
    let texts: Vec<String> = (0..args.prompts).map(prompt).collect();
    let ids = texts
        .iter()
        .map(|t| Tokenizer::Bytes.encode(t).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    let expected = colocated(&ids, args.max_tokens)?;

    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let (init, alloc, notify) = (free_port()?, free_port()?, free_port()?);
    let yaml = |name: &str, pd_role: &str| -> Result<std::path::PathBuf, String> {
        let path = dir.path().join(name);
        let text = format!(
            "chunk_size: {CHUNK_SIZE}\nlocal_cpu: false\npre_caching_hash_algorithm: sha256_cbor\n\
             enable_pd: true\npd_role: {pd_role}\npd_buffer_size: {}\npd_buffer_device: cpu\n\
             pd_peer_host: 127.0.0.1\npd_peer_init_port: [{init}]\npd_peer_alloc_port: [{alloc}]\n\
             pd_proxy_host: 127.0.0.1\npd_proxy_port: {notify}\ntransfer_channel: {}\n",
            args.pd_buffer_mib << 20,
            args.channel
        );
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(path)
    };
    let (decoder_yaml, prefiller_yaml) = (
        yaml("decoder.yaml", "receiver")?,
        yaml("prefiller.yaml", "sender")?,
    );
    let max_model_len = MAX_MODEL_LEN.to_string();
    let serve = |what: &str, config: &str, yaml: &Path| {
        Server::start(
            what,
            &[
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--model",
                TINY_RANDOM,
                "--block-size",
                "16",
                "--max-model-len",
                &max_model_len,
                "--kv-transfer-config",
                config,
            ],
            &[("LMCACHE_CONFIG_FILE", yaml)],
        )
    };
    // The decoder first: its PD buffer must listen before the prefiller sends.
    let decoder = serve("decoder", CONSUMER, &decoder_yaml)?;
    let prefiller = serve("prefiller", PRODUCER, &prefiller_yaml)?;
    let (init, alloc, notify) = (init.to_string(), alloc.to_string(), notify.to_string());
    let proxy = Server::start(
        "proxy",
        &[
            "proxy",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--prefiller-host",
            "127.0.0.1",
            "--prefiller-port",
            prefiller.port(),
            "--decoder-host",
            "127.0.0.1",
            "--decoder-port",
            decoder.port(),
            "--decoder-init-port",
            &init,
            "--decoder-alloc-port",
            &alloc,
            "--proxy-host",
            "127.0.0.1",
            "--proxy-port",
            &notify,
            "--timeout-sec",
            "60",
        ],
        &[],
    )?;

    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(120))
        .build();
    let url = format!("{}/v1/completions", proxy.url);
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    let results: Vec<Result<Vec<f64>, String>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..args.concurrency)
            .map(|_| {
                s.spawn(|| {
                    let mut latencies = Vec::new();
                    loop {
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        if n >= args.requests {
                            return Ok(latencies);
                        }
                        let p = n % texts.len();
                        let sent = Instant::now();
                        let answer = agent
                            .post(&url)
                            .send_json(json!({"prompt": texts[p], "max_tokens": args.max_tokens}));
                        let body: Value = match answer {
                            Ok(response) => response.into_json().map_err(|e| e.to_string())?,
                            Err(ureq::Error::Status(status, response)) => {
                                let body = response.into_string().unwrap_or_default();
                                return Err(format!("request {n} got {status}: {body}"));
                            }
                            Err(e) => return Err(format!("request {n}: {e}")),
                        };
                        latencies.push(sent.elapsed().as_secs_f64());
                        let tokens: Vec<u32> =
                            serde_json::from_value(body["choices"][0]["token_ids"].clone())
                                .map_err(|e| format!("request {n}: no token_ids ({e}): {body}"))?;
                        if tokens != expected[p] {
                            return Err(format!(
                                "request {n} (prompt {p}) answered {tokens:?}; the engine alone generates {:?}",
                                expected[p]
                            ));
                        }
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err("a client thread panicked".into()))
            })
            .collect()
    });
    let elapsed = started.elapsed().as_secs_f64();
    let mut latencies = Vec::with_capacity(args.requests);
    for result in results {
        latencies.extend(result?);
    }
    latencies.sort_by(f64::total_cmp);

    // Loads consume pages and request ends free the rest; the last requests' ends may
    // still be on their way, so the buffer gets a moment to drain.
    let metrics_url = format!("{}/metrics", decoder.url);
    let deadline = Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let text = agent
            .get(&metrics_url)
            .call()
            .map_err(|e| e.to_string())
            .and_then(|r| r.into_string().map_err(|e| e.to_string()))
            .map_err(|e| format!("reading the decoder's metrics: {e}"))?;
        let used = metric(&text, "kvrelay_pd_buffer_used_pages").unwrap_or(f64::NAN);
        if used == 0.0 || Instant::now() >= deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let figure = |name: &str| metric(&metrics, name).unwrap_or(f64::NAN);
    let used_pages = figure("kvrelay_pd_buffer_used_pages");
    let prompt_tokens: usize = (0..args.requests).map(|n| ids[n % ids.len()].len()).sum();
    println!(
        "{}",
        json!({
            "bench": "soak",
            "channel": args.channel,
            "requests": args.requests,
            "concurrency": args.concurrency,
            "all_ok_and_equal_to_colocated": true,
            "requests_per_s": (args.requests as f64 / elapsed * 10.0).round() / 10.0,
            "latency_p50_s": percentile(&latencies, 0.5),
            "latency_p99_s": percentile(&latencies, 0.99),
            "prompt_tokens": prompt_tokens,
            "decoder_hit_tokens": figure("kvrelay_connector_hit_tokens_total"),
            "decoder_pd_buffer_pages": figure("kvrelay_pd_buffer_pages"),
            "decoder_pd_buffer_used_pages_at_end": used_pages,
            "decoder_pd_buffer_requests_at_end": figure("kvrelay_pd_buffer_requests"),
            "elapsed_s": (elapsed * 10.0).round() / 10.0,
        })
    );
    if used_pages != 0.0 {
        return Err(format!(
            "every request answered and matched, but the decoder's PD buffer still holds {used_pages} pages 10 s after the last one: pages outlive their requests"
        ));
    }
    Ok(())
}
