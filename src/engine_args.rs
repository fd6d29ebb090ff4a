//! Flags and output shared by the examples that run the reference engine: which model,
//! how the engine batches and lays out KV, which prompts, and the per-request JSON.

use std::str::FromStr;

use clap::{Args, ValueEnum};
use kvrelay::layout::LayoutKind;
use kvrelay::KvDtype;
use kvrelay_engine::{
    load_model, Engine, EngineConfig, KvPlacement, Model, RequestOutput, Tokenizer,
};
use serde_json::{json, Value};

pub use kvrelay_engine::TINY_RANDOM;

/// Where the engine's KV cache lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DeviceKind {
    /// Host memory.
    Host,
    /// RBLN device memory (feature `rbln`): the first device of RBLN_DEVICES (default 0),
    /// through the runtime rbln-sys finds (RBLN_RUNTIME_LIB first).
    Rbln,
    /// Ascend NPU memory (feature `ascend`): logical device 0 (the first of
    /// ASCEND_RT_VISIBLE_DEVICES), through the CANN runtime ascend-sys finds
    /// (KVRELAY_ASCENDCL_LIB first, then ASCEND_HOME_PATH).
    Ascend,
}

#[derive(Args, Clone, Debug)]
pub struct EngineArgs {
    /// `tiny-random` (embedded) or a Hugging Face Llama checkpoint directory.
    #[arg(long, default_value = TINY_RANDOM)]
    pub model: String,
    #[arg(long, default_value_t = 4096)]
    pub max_model_len: usize,
    /// Token budget per engine step; longer prompts are prefilled in chunks.
    #[arg(long, default_value_t = 512)]
    pub max_num_batched_tokens: usize,
    #[arg(long, default_value_t = 1)]
    pub max_num_seqs: usize,
    /// Tokens per KV block; default 1024, or 128 (vllm-ascend's) with --device ascend.
    #[arg(long)]
    pub block_size: Option<usize>,
    /// Where the KV cache lives: host, rbln or ascend (the engine computes on the host and
    /// keeps a working copy in step with the device cache).
    #[arg(long, value_enum, default_value = "host")]
    pub device: DeviceKind,
    /// Paged KV layout, any kvrelay layout name; default flash_attn_nhd (vLLM's) on the
    /// host, rbln_kv_first (vllm-rbln's) with --device rbln, ascend_separate_kv
    /// (vllm-ascend's) with --device ascend.
    #[arg(long, value_parser = LayoutKind::from_str)]
    pub layout: Option<LayoutKind>,
    /// KV cache dtype: bfloat16, float16 or float32.
    #[arg(long, default_value = "bfloat16", value_parser = KvDtype::from_str)]
    pub kv_dtype: KvDtype,
    /// Accepted for compatibility with the vLLM scripts; the host engine sizes its cache
    /// from max_model_len and max_num_seqs.
    #[arg(long, default_value_t = 0.9)]
    pub gpu_memory_utilization: f64,
    /// Accepted for compatibility (the engine runs no remote code).
    #[arg(long)]
    pub trust_remote_code: bool,
    /// Accepted for compatibility (the engine is always eager).
    #[arg(long)]
    pub enforce_eager: bool,
}

#[derive(Args, Clone, Debug)]
pub struct PromptArgs {
    #[arg(
        long,
        default_value = "Summarize why prefill-decode disaggregation improves throughput."
    )]
    pub prompt: String,
    /// The prompt is this many copies of --prompt joined by spaces.
    #[arg(long, default_value_t = 32)]
    pub prompt_repeat: usize,
}

impl PromptArgs {
    /// Prompt i repeats the text `prompt_repeat + i * stride` times.
    pub fn texts(&self, count: usize, stride: usize) -> Vec<String> {
        (0..count)
            .map(|i| vec![self.prompt.as_str(); self.prompt_repeat + i * stride].join(" "))
            .collect()
    }
}

impl EngineArgs {
    /// The paged layout: --layout, or the device's default.
    pub fn layout(&self) -> LayoutKind {
        self.layout.unwrap_or(match self.device {
            DeviceKind::Host => LayoutKind::FlashAttnNhd,
            DeviceKind::Rbln => LayoutKind::RblnKvFirst,
            DeviceKind::Ascend => LayoutKind::AscendSeparateKv,
        })
    }

    /// Tokens per block: --block-size, or the device's default.
    pub fn block_size(&self) -> usize {
        self.block_size.unwrap_or(match self.device {
            DeviceKind::Host | DeviceKind::Rbln => 1024,
            DeviceKind::Ascend => 128,
        })
    }

    /// The engine configuration, with the KV cache on --device (opened here).
    pub fn engine_config(&self, max_num_seqs: usize) -> Result<EngineConfig, String> {
        Ok(EngineConfig {
            max_num_seqs,
            max_num_batched_tokens: self.max_num_batched_tokens,
            max_model_len: self.max_model_len,
            block_size: self.block_size(),
            num_blocks: None,
            layout: self.layout(),
            kv_dtype: self.kv_dtype,
            kv_placement: self.placement()?,
            ..EngineConfig::default()
        })
    }

    fn placement(&self) -> Result<KvPlacement, String> {
        match self.device {
            DeviceKind::Host => Ok(KvPlacement::Host),
            DeviceKind::Rbln => rbln_placement(),
            DeviceKind::Ascend => ascend_placement(),
        }
    }

    /// The model and its tokenizer.
    pub fn load(&self) -> Result<(Model, Tokenizer), String> {
        load_model(&self.model, self.max_model_len).map_err(|e| format!("--model {e}"))
    }

    /// An engine for this model with `max_num_seqs` running requests at most.
    pub fn engine(&self, max_num_seqs: usize) -> Result<(Engine, Tokenizer), String> {
        let config = self.engine_config(max_num_seqs)?;
        let (model, tokenizer) = self.load()?;
        let engine = Engine::new(model, config).map_err(|e| e.to_string())?;
        Ok((engine, tokenizer))
    }
}

/// The RBLN device RBLN_DEVICES names first (device 0 when unset), opened through the
/// runtime rbln-sys finds.
#[cfg(feature = "rbln")]
fn rbln_placement() -> Result<KvPlacement, String> {
    use std::sync::Arc;

    let devices = std::env::var("RBLN_DEVICES").ok();
    let id = first_rbln_device(devices.as_deref())?;
    let device =
        kvrelay::device::RblnDevice::open(id).map_err(|e| format!("--device rbln: {e}"))?;
    Ok(KvPlacement::Rbln(Arc::new(device)))
}

#[cfg(not(feature = "rbln"))]
fn rbln_placement() -> Result<KvPlacement, String> {
    Err("--device rbln: this binary was built without the `rbln` feature (cargo build --features rbln)".into())
}

/// Logical Ascend device 0 (the runtime applies ASCEND_RT_VISIBLE_DEVICES), opened
/// through the CANN runtime ascend-sys finds.
#[cfg(feature = "ascend")]
fn ascend_placement() -> Result<KvPlacement, String> {
    let device =
        kvrelay::device::AscendDevice::open(0).map_err(|e| format!("--device ascend: {e}"))?;
    Ok(KvPlacement::Ascend(std::sync::Arc::new(device)))
}

#[cfg(not(feature = "ascend"))]
fn ascend_placement() -> Result<KvPlacement, String> {
    Err("--device ascend: this binary was built without the `ascend` feature (cargo build --features ascend)".into())
}

/// The first id of a comma-separated RBLN_DEVICES value; 0 when it is unset or empty.
#[cfg(feature = "rbln")]
fn first_rbln_device(devices: Option<&str>) -> Result<u32, String> {
    let devices = devices.map(str::trim).unwrap_or_default();
    if devices.is_empty() {
        return Ok(0);
    }
    let first = devices.split(',').next().unwrap_or_default().trim();
    first.parse().map_err(|_| {
        format!(
            "RBLN_DEVICES={devices}: {first:?} is not a device id (comma-separated numbers, e.g. 0,1)"
        )
    })
}

/// Bytes per second as GB/s (0 when nothing was timed).
fn gbps(bytes: usize, secs: f64) -> f64 {
    if secs > 0.0 {
        bytes as f64 / secs / 1e9
    } else {
        0.0
    }
}

/// One request's figures as the examples print them.
pub fn request_json(output: &RequestOutput, tokenizer: &Tokenizer) -> Value {
    let t = &output.transfer;
    let (load_sec, save_sec) = (t.load_time.as_secs_f64(), t.save_time.as_secs_f64());
    json!({
        "request_id": output.request_id,
        "prompt_token_count": output.prompt_token_count,
        "output_token_count": output.output_token_count,
        "output_token_ids": output.output_token_ids,
        "output_text": tokenizer.decode(&output.output_token_ids).unwrap_or_default(),
        "finish_reason": output.finish_reason,
        "logits_digest": output.logits_digest,
        "hit_tokens": output.hit_tokens,
        "recomputed_tokens": output.recomputed_tokens,
        "load_bytes": t.loaded_bytes,
        "load_sec": load_sec,
        "load_gbps": gbps(t.loaded_bytes, load_sec),
        "save_bytes": t.saved_bytes,
        "save_sec": save_sec,
        "save_gbps": gbps(t.saved_bytes, save_sec),
        "saved_chunks": t.saved_chunks,
        "time_to_first_token_sec": output.time_to_first_token_sec,
        "elapsed_sec": output.elapsed_sec,
    })
}

/// The seed's phase summary over the requests, plus every request's details.
pub fn phase_json(
    phase: &str,
    elapsed_sec: f64,
    outputs: &[RequestOutput],
    tokenizer: &Tokenizer,
) -> Value {
    let requests: Vec<Value> = outputs.iter().map(|o| request_json(o, tokenizer)).collect();
    let texts: Vec<&Value> = requests.iter().map(|r| &r["output_text"]).collect();
    let counts: Vec<usize> = outputs.iter().map(|o| o.output_token_count).collect();
    let reasons: Vec<&Value> = requests.iter().map(|r| &r["finish_reason"]).collect();
    json!({
        "phase": phase,
        "elapsed_sec": elapsed_sec,
        "num_requests": outputs.len(),
        "output_token_count": counts.iter().min().copied().unwrap_or(0),
        "output_token_counts": counts,
        "output_text": texts.first(),
        "output_texts": texts,
        "output_text_chars": texts.first().and_then(|t| t.as_str()).map_or(0, |t| t.chars().count()),
        "finish_reason": reasons.first(),
        "finish_reasons": reasons,
        "requests": requests,
    })
}

#[cfg(all(test, feature = "rbln"))]
mod tests {
    use super::first_rbln_device;

    #[test]
    fn rbln_devices_names_the_first_device() {
        assert_eq!(first_rbln_device(None), Ok(0));
        assert_eq!(first_rbln_device(Some("")), Ok(0));
        assert_eq!(first_rbln_device(Some("2")), Ok(2));
        assert_eq!(first_rbln_device(Some(" 3 ,1,0")), Ok(3));
        let err = first_rbln_device(Some("npu0,1")).unwrap_err();
        assert!(
            err.contains("RBLN_DEVICES=npu0,1") && err.contains("\"npu0\""),
            "{err}"
        );
        assert!(first_rbln_device(Some(",1")).is_err());
    }
}
