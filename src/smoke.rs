//! The seed's disaggregation smoke flows (vllm-rbln's `run_disagg_shared_storage_smoke.py`
//! and `run_disagg_lmcache_smoke.py`, reference/rbln.md §4) on the reference engine: a
//! prefill process saves KV through a connector, a separate decode process loads it, and
//! one JSON summary reports both phases.

use std::ffi::OsString;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::{Args, Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use kvrelay::config::{KvTransferConfig, LmcacheConfig};
use kvrelay_engine::{Engine, RequestOutput, SamplingParams};
use serde_json::{json, Value};

use crate::engine_args::{phase_json, DeviceKind, EngineArgs, PromptArgs};
use crate::verify;

/// The LMCache YAML the LMCache smoke uses when neither --lmcache-config-file nor
/// LMCACHE_CONFIG_FILE names one: a local-disk tier both processes share, sha256_cbor keys.
pub const DEFAULT_LMCACHE_CONFIG: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/examples/configs/lmcache-shared-disk.yaml"
);

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Role {
    Both,
    Prefill,
    Decode,
    /// The engine alone, without a connector, on decode's prompts and token budget: what
    /// decode must equal (`--role both` runs it to verify decode).
    Colocated,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Both => "both",
            Role::Prefill => "prefill",
            Role::Decode => "decode",
            Role::Colocated => "colocated",
        }
    }
}

/// Flags both smoke scripts share.
#[derive(Args, Clone, Debug)]
pub struct SmokeArgs {
    #[arg(long, value_enum, default_value = "both")]
    pub role: Role,
    /// Directory of the SharedStorageConnector's files (and of the LMCache smoke's host
    /// fallback).
    #[arg(long)]
    pub shared_storage_path: Option<PathBuf>,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub prompt: PromptArgs,
    #[arg(long, default_value_t = 1)]
    pub prefill_max_tokens: usize,
    #[arg(long, default_value_t = 32)]
    pub decode_max_tokens: usize,
    /// Prefill runs this many prompts as one batch; decode processes every one of them.
    #[arg(long, default_value_t = 1)]
    pub prefill_batch_size: usize,
    /// Prompt i repeats the text prompt_repeat + i * stride times.
    #[arg(long, default_value_t = 1)]
    pub prefill_repeat_stride: usize,
    /// Shared by both phases; generated under --role both when empty.
    #[arg(long, default_value = "")]
    pub engine_id: String,
    /// Each phase of --role both must finish within this many seconds.
    #[arg(long, default_value_t = 1800)]
    pub phase_timeout_sec: u64,
    /// Where a single phase writes its JSON (stdout when empty).
    #[arg(long, default_value = "")]
    pub result_json: String,
    /// Under --role both, check that decode equals a colocated run of the same engine
    /// (token ids and logits digest); a mismatch is an error exit. On by default.
    #[arg(long, overrides_with = "no_verify")]
    pub verify: bool,
    /// Under --role both, skip the colocated run and the check.
    #[arg(long)]
    pub no_verify: bool,
    /// Under --role both, verify decode against this JSON (from the `generate` example or
    /// `--role colocated`) instead of running the engine alone.
    #[arg(long)]
    pub verify_against: Option<PathBuf>,
}

/// The LMCache smoke's own flags.
#[derive(Args, Clone, Debug)]
pub struct LmcacheArgs {
    #[arg(long, default_value = "LMCacheConnectorV1")]
    pub connector: String,
    /// LMCache YAML; LMCACHE_CONFIG_FILE, then the shared-disk example YAML, otherwise.
    #[arg(long, default_value = "")]
    pub lmcache_config_file: String,
    /// Use the LMCache connector or fail: no fallback to the shared-storage connector.
    #[arg(long)]
    pub strict_lmcache: bool,
    /// Fail unless decode loads at least --min-lmcache-hit-tokens tokens (needs --strict-lmcache).
    #[arg(long)]
    pub require_lmcache_hit: bool,
    #[arg(long, default_value_t = 1)]
    pub min_lmcache_hit_tokens: usize,
    #[arg(long, default_value = "producer1")]
    pub producer_rpc_port: String,
    #[arg(long, default_value = "consumer1")]
    pub consumer_rpc_port: String,
    #[arg(long)]
    pub discard_partial_chunks: bool,
}

#[derive(Parser, Debug)]
#[command(about = "Prefill and decode in separate processes through SharedStorageConnector")]
pub struct SharedStorageSmoke {
    #[command(flatten)]
    pub common: SmokeArgs,
}

#[derive(Parser, Debug)]
#[command(about = "Prefill and decode in separate processes through the LMCache connector")]
pub struct LmcacheSmoke {
    #[command(flatten)]
    pub common: SmokeArgs,
    #[command(flatten)]
    pub lmcache: LmcacheArgs,
}

/// Which connector a smoke run asks for: the shared-storage one, or LMCache's with its flags.
#[derive(Clone, Copy, Debug)]
pub enum Flow<'a> {
    SharedStorage,
    Lmcache(&'a LmcacheArgs),
}

impl Flow<'_> {
    fn default_storage_path(self) -> &'static str {
        match self {
            Flow::SharedStorage => "/tmp/kvrelay_disagg_shared_storage",
            Flow::Lmcache(_) => "/tmp/kvrelay_lmcache_host_shared",
        }
    }
}

/// Runs a smoke example: `--role both` launches the two phases as processes and prints
/// the summary; a single role runs its phase here.
pub fn main_with(common: &SmokeArgs, flow: Flow<'_>) -> ExitCode {
    let result = validate(common, flow).and_then(|()| match common.role {
        Role::Both => run_both(common, flow),
        role => run_phase(common, flow, role).and_then(|phase| emit(common, &phase)),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The seed's argument checks.
fn validate(common: &SmokeArgs, flow: Flow<'_>) -> Result<(), String> {
    if common.prefill_batch_size == 0 {
        return Err("--prefill-batch-size must be at least 1".into());
    }
    if common.prefill_batch_size > 1 && common.prefill_repeat_stride == 0 {
        return Err("--prefill-batch-size > 1 needs --prefill-repeat-stride >= 1, so that every prompt differs".into());
    }
    if common.no_verify && common.verify_against.is_some() {
        return Err("--no-verify and --verify-against contradict each other".into());
    }
    if common.engine.max_num_seqs == 0 {
        return Err("--max-num-seqs must be at least 1".into());
    }
    if let Flow::Lmcache(lm) = flow {
        if lm.require_lmcache_hit && !lm.strict_lmcache {
            return Err("--require-lmcache-hit needs --strict-lmcache (a fallback connector has no LMCache hits)".into());
        }
        if lm.min_lmcache_hit_tokens == 0 {
            return Err("--min-lmcache-hit-tokens must be at least 1".into());
        }
    }
    Ok(())
}

/// Writes a phase's JSON to --result-json, or prints it.
fn emit(common: &SmokeArgs, phase: &Value) -> Result<(), String> {
    let text = serde_json::to_string_pretty(phase).map_err(|e| e.to_string())?;
    if common.result_json.is_empty() {
        println!("{text}");
        return Ok(());
    }
    std::fs::write(&common.result_json, text)
        .map_err(|e| format!("--result-json {}: {e}", common.result_json))
}

/// The LMCache YAML path the run uses and the config read from it (with LMCACHE_* env).
fn lmcache_config(lm: &LmcacheArgs) -> (String, Result<LmcacheConfig, String>) {
    let path = if !lm.lmcache_config_file.is_empty() {
        lm.lmcache_config_file.clone()
    } else {
        std::env::var("LMCACHE_CONFIG_FILE").unwrap_or_else(|_| DEFAULT_LMCACHE_CONFIG.into())
    };
    let vars = std::env::vars()
        .filter(|(name, _)| name != "LMCACHE_CONFIG_FILE")
        .chain([("LMCACHE_CONFIG_FILE".to_string(), path.clone())]);
    let config = LmcacheConfig::load_with_env(vars).map_err(|e| format!("{path}: {e}"));
    (path, config)
}

fn transfer_config(
    connector: &str,
    role: Role,
    engine_id: &str,
    extra: Value,
) -> Result<KvTransferConfig, String> {
    let mut config = json!({
        "kv_connector": connector,
        "kv_role": if role == Role::Prefill { "kv_producer" } else { "kv_consumer" },
        // Blocks whose KV cannot be loaded are recomputed, never attended to.
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": extra,
    });
    if !engine_id.is_empty() {
        config["engine_id"] = json!(engine_id);
    }
    KvTransferConfig::from_json_value(&config).map_err(|e| e.to_string())
}

/// What vllm-rbln's platform routes `LMCacheConnectorV1` to (reference/rbln.md §2.2).
const RBLN_HOST_FALLBACK: &str = "RBLNHostConnector (host fallback for LMCacheConnectorV1)";
const RBLN_STRICT_LMCACHE: &str = "RBLNLMCacheConnectorV1";

/// True when the LMCache connector asked for is routed the RBLN way (--device rbln).
fn routed_on_rbln(common: &SmokeArgs, lm: &LmcacheArgs) -> bool {
    common.engine.device == DeviceKind::Rbln
        && matches!(
            lm.connector.as_str(),
            "LMCacheConnectorV1" | "LMCacheConnector"
        )
}

/// True when the RBLN routing picks RBLNHostConnector (no --strict-lmcache).
fn rbln_host_fallback(common: &SmokeArgs, lm: &LmcacheArgs) -> bool {
    routed_on_rbln(common, lm) && !lm.strict_lmcache
}

/// Links the connector the flow asks for into `engine`; returns its name. The connector
/// moves bytes with the engine's KV device (host memcpy, or the RBLN device).
///
/// On `--device rbln`, LMCache's connector is routed as vllm-rbln routes it: without
/// --strict-lmcache to RBLNHostConnector (the shared-storage connector, KV staged through
/// host memory into files at --shared-storage-path), with it to the RBLN-native LMCache
/// connector, which fails instead of falling back.
fn connect(
    engine: &mut Engine,
    common: &SmokeArgs,
    flow: Flow<'_>,
    role: Role,
) -> Result<String, String> {
    let storage = common
        .shared_storage_path
        .clone()
        .unwrap_or_else(|| PathBuf::from(flow.default_storage_path()));
    let storage = storage.to_string_lossy().into_owned();
    let model = common.engine.model.as_str();
    let shared_storage = |engine: &mut Engine, connector: &str| -> Result<(), String> {
        let transfer = transfer_config(
            connector,
            role,
            &common.engine_id,
            json!({ "shared_storage_path": storage }),
        )?;
        engine
            .connect(&transfer, &LmcacheConfig::default(), model)
            .map_err(|e| e.to_string())
    };
    let Flow::Lmcache(lm) = flow else {
        shared_storage(engine, "SharedStorageConnector")?;
        return Ok("SharedStorageConnector".into());
    };
    if rbln_host_fallback(common, lm) {
        eprintln!("warning: LMCacheConnectorV1 is not supported on the RBLN path without --strict-lmcache; using RBLNHostConnector (host fallback) at {storage}");
        shared_storage(engine, "RBLNHostConnector")?;
        return Ok(RBLN_HOST_FALLBACK.into());
    }
    let connector = if routed_on_rbln(common, lm) {
        RBLN_STRICT_LMCACHE
    } else {
        lm.connector.as_str()
    };
    let rpc_port = if role == Role::Prefill {
        &lm.producer_rpc_port
    } else {
        &lm.consumer_rpc_port
    };
    let (path, lmcache) = lmcache_config(lm);
    let attached = lmcache.and_then(|lmcache| {
        let transfer = transfer_config(
            connector,
            role,
            &common.engine_id,
            json!({
                "discard_partial_chunks": lm.discard_partial_chunks,
                "lmcache_rpc_port": rpc_port,
                "shared_storage_path": storage,
            }),
        )?;
        engine
            .connect(&transfer, &lmcache, model)
            .map_err(|e| format!("{path}: {e}"))
    });
    match attached {
        Ok(()) => Ok(connector.into()),
        Err(e) if lm.strict_lmcache => Err(format!("--strict-lmcache: {e}")),
        Err(e) => {
            eprintln!("warning: LMCache connector unavailable ({e}); falling back to SharedStorageConnector at {storage}");
            shared_storage(engine, "SharedStorageConnector")?;
            Ok("SharedStorageConnector".into())
        }
    }
}

/// Runs one phase in this process and returns its JSON.
fn run_phase(common: &SmokeArgs, flow: Flow<'_>, role: Role) -> Result<Value, String> {
    if matches!(flow, Flow::Lmcache(_)) && std::env::var_os("PYTHONHASHSEED").is_none() {
        // The seed pins Python's hash seed so both processes derive the same chunk keys;
        // kvrelay reads it for LMCache's NONE_HASH the same way. No thread runs yet.
        std::env::set_var("PYTHONHASHSEED", "0");
    }
    let texts = common
        .prompt
        .texts(common.prefill_batch_size, common.prefill_repeat_stride);
    let max_num_seqs = if role == Role::Prefill {
        common.engine.max_num_seqs.max(texts.len())
    } else {
        common.engine.max_num_seqs
    };
    let (mut engine, tokenizer) = common.engine.engine(max_num_seqs)?;
    let connector = match role {
        Role::Colocated => "none (colocated)".to_string(),
        _ => connect(&mut engine, common, flow, role)?,
    };
    let prompts = texts
        .iter()
        .map(|t| tokenizer.encode(t))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let max_tokens = if role == Role::Prefill {
        common.prefill_max_tokens
    } else {
        common.decode_max_tokens
    };
    let started = Instant::now();
    let outputs = engine
        .generate(&prompts, SamplingParams::greedy(max_tokens))
        .map_err(|e| e.to_string())?;
    let elapsed = started.elapsed().as_secs_f64();
    if role != Role::Colocated {
        for o in &outputs {
            // The line the seed's driver scans for.
            eprintln!(
                "LMCache hit tokens: {} (request {})",
                o.hit_tokens, o.request_id
            );
        }
    }
    check_outputs(role, &outputs)?;
    let mut phase = phase_json(role.name(), elapsed, &outputs, &tokenizer);
    let stats = engine
        .connector()
        .map(|c| c.worker.stats().clone())
        .unwrap_or_default();
    phase["connector"] = json!(connector);
    phase["engine_id"] = json!(common.engine_id);
    phase["lmcache_hit_tokens"] = json!(outputs.iter().map(|o| o.hit_tokens).max().unwrap_or(0));
    phase["recomputed_tokens"] = json!(outputs.iter().map(|o| o.recomputed_tokens).sum::<usize>());
    phase["connector_stats"] = json!({
        "loaded_tokens": stats.loaded_tokens,
        "loaded_bytes": stats.loaded_bytes,
        "load_sec": stats.load_time.as_secs_f64(),
        "failed_load_tokens": stats.failed_load_tokens,
        "saved_chunks": stats.saved_chunks,
        "saved_bytes": stats.saved_bytes,
        "save_sec": stats.save_time.as_secs_f64(),
        "skipped_saves": stats.skipped_saves,
    });
    Ok(phase)
}

fn check_outputs(role: Role, outputs: &[RequestOutput]) -> Result<(), String> {
    if outputs.is_empty() {
        return Err(format!("{} phase produced no outputs", role.name()));
    }
    if let Some(o) = outputs.iter().find(|o| o.output_token_count == 0) {
        return Err(format!(
            "{} phase: request {} produced 0 tokens ({:?})",
            role.name(),
            o.request_id,
            o.finish_reason
        ));
    }
    Ok(())
}

/// This process's arguments without the flags `--role both` sets for each phase.
fn phase_args(role: Role, engine_id: &str, result_json: &Path) -> Vec<OsString> {
    const SET_PER_PHASE: [&str; 3] = ["--role", "--engine-id", "--result-json"];
    let mut args: Vec<OsString> = Vec::new();
    let mut skip_value = false;
    for arg in std::env::args_os().skip(1) {
        if std::mem::take(&mut skip_value) {
            continue;
        }
        let text = arg.to_string_lossy();
        if SET_PER_PHASE.contains(&text.as_ref()) {
            skip_value = true;
            continue;
        }
        if SET_PER_PHASE
            .iter()
            .any(|flag| text.starts_with(&format!("{flag}=")))
        {
            continue;
        }
        args.push(arg);
    }
    args.extend(
        [
            "--role",
            role.name(),
            "--engine-id",
            engine_id,
            "--result-json",
        ]
        .map(OsString::from),
    );
    args.push(result_json.into());
    args
}

/// A spinner naming the running phase and its elapsed time, on stderr when that is a
/// terminal; hidden in logs and CI.
fn phase_spinner(role: Role) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let spinner = ProgressBar::new_spinner().with_message(match role {
        Role::Colocated => "colocated run (the engine alone, to verify decode)".to_string(),
        role => format!("{} phase", role.name()),
    });
    if let Ok(style) = ProgressStyle::with_template("{spinner} {msg}: {elapsed}") {
        spinner.set_style(style);
    }
    spinner.enable_steady_tick(Duration::from_millis(120));
    spinner
}

/// Runs one phase as a child process of this example, within the phase timeout.
fn spawn_phase(
    common: &SmokeArgs,
    role: Role,
    engine_id: &str,
    dir: &Path,
) -> Result<Value, String> {
    let result = dir.join(format!("{}.json", role.name()));
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .args(phase_args(role, engine_id, &result))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start the {} phase: {e}", role.name()))?;
    let deadline = Instant::now() + Duration::from_secs(common.phase_timeout_sec);
    let progress = phase_spinner(role);
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            progress.finish_and_clear();
            break status;
        }
        if Instant::now() > deadline {
            progress.finish_and_clear();
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "the {} phase did not finish within --phase-timeout-sec {}",
                role.name(),
                common.phase_timeout_sec
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if !status.success() {
        return Err(format!("the {} phase failed ({status})", role.name()));
    }
    let text =
        std::fs::read_to_string(&result).map_err(|e| format!("{}: {e}", result.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", result.display()))
}

/// Why decode could never hit with this LMCache config: no tier outlives the prefill process.
fn process_local_only(config: &LmcacheConfig) -> bool {
    config.local_disk_path().is_none() && config.remote_url.is_none()
}

fn run_both(common: &SmokeArgs, flow: Flow<'_>) -> Result<(), String> {
    let engine_id = if common.engine_id.is_empty() {
        format!(
            "kvrelay-disagg-{}",
            KvTransferConfig::default().engine_id_or_generate()
        )
    } else {
        common.engine_id.clone()
    };
    let mut summary = json!({ "engine_id": engine_id });
    // The LMCache tiers are not used when the RBLN path falls back to host storage.
    let lmcache = match flow {
        Flow::Lmcache(lm) if !rbln_host_fallback(common, lm) => Some(lm),
        _ => None,
    };
    if let Some(lm) = lmcache {
        let (path, config) = lmcache_config(lm);
        summary["lmcache_config_file"] = json!(path);
        if let Ok(config) = &config {
            if process_local_only(config) {
                let message = format!(
                    "{path}: the only tier is process-local (local_cpu), so the decode process can never hit; use a local_disk or remote_url tier both processes share"
                );
                if lm.require_lmcache_hit {
                    return Err(message);
                }
                eprintln!("warning: {message}");
            }
        }
    }
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let prefill = spawn_phase(common, Role::Prefill, &engine_id, dir.path())?;
    let decode = spawn_phase(common, Role::Decode, &engine_id, dir.path())?;
    let reference = match (&common.verify_against, common.no_verify) {
        (_, true) => None,
        (Some(path), false) => Some(read_phase(path)?),
        (None, false) => Some(spawn_phase(
            common,
            Role::Colocated,
            &engine_id,
            dir.path(),
        )?),
    };
    let verdict = reference
        .as_ref()
        .map(|reference| verify::compare(&decode, reference));
    let decode_hits = decode["lmcache_hit_tokens"].as_u64().unwrap_or(0) as usize;
    summary["connector"] = decode["connector"].clone();
    summary["lmcache_hit_tokens"] = json!({
        "prefill": prefill["lmcache_hit_tokens"],
        "decode": decode_hits,
    });
    eprint!(
        "{}",
        verify::human_summary(&prefill, &decode, verdict.as_ref(), &common.engine.model)
    );
    if let Flow::Lmcache(lm) = flow {
        if lm.require_lmcache_hit && decode_hits < lm.min_lmcache_hit_tokens {
            return Err(format!(
                "--require-lmcache-hit: decode hit {decode_hits} tokens, fewer than --min-lmcache-hit-tokens {}",
                lm.min_lmcache_hit_tokens
            ));
        }
    }
    summary["prefill"] = prefill;
    summary["decode"] = decode;
    println!(
        "{}",
        serde_json::to_string_pretty(&summary).map_err(|e| e.to_string())?
    );
    match verdict {
        Some(verify::Verdict::Differs(difference)) => Err(format!(
            "decode output differs from a single-engine run: {difference}"
        )),
        _ => Ok(()),
    }
}

/// A phase's JSON written by `--result-json`, `--role colocated` or the `generate` example.
fn read_phase(path: &Path) -> Result<Value, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("--verify-against {}: {e}", path.display()))?;
    let phase: Value = serde_json::from_str(&text)
        .map_err(|e| format!("--verify-against {}: not JSON: {e}", path.display()))?;
    if !phase["requests"].is_array() {
        return Err(format!(
            "--verify-against {}: no \"requests\" list; give the JSON of the generate example or of --role colocated",
            path.display()
        ));
    }
    Ok(phase)
}
