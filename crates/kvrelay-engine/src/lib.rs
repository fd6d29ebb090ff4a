//! A small reference inference engine for Llama models with a paged KV cache: the host
//! kvrelay's connector is linked into in examples, tests and `kvrelay serve`.
//!
//! It computes in f32 on the CPU, stores KV in any of kvrelay's layouts, samples greedily,
//! and calls the connector's hooks in vLLM's order. Every token's result depends only on
//! its own inputs and the KV bytes in the cache, never on how requests were batched or
//! chunked, so a disaggregated run (prefill here, KV through kvrelay, decode there) is
//! bit-exact with a colocated one. With [`EngineConfig::tensor_parallel_size`] N the KV
//! heads are split over N ranks, each with its own cache and connector worker; only
//! attention is split, so the logits are those of one rank bit for bit.

pub mod backing;
pub mod chat_template;
pub mod config;
pub mod engine;
pub mod kv;
pub mod load;
pub mod model;
pub mod ops;
mod ranks;
pub mod tokenizer;
pub mod weights;

pub use backing::KvPlacement;
pub use chat_template::{ChatMessage, ChatTemplate, ChatTemplateError};
pub use config::LlamaConfig;
pub use engine::{
    AbortOutcome, Engine, EngineConfig, EngineStats, FinishReason, RequestOutput, SamplingParams,
};
pub use load::{load_chat_template, load_model, TINY_RANDOM};
pub use model::Model;
pub use tokenizer::Tokenizer;

use kvrelay::connector::ConnectorError;
use kvrelay::device::DeviceError;

/// Why the engine cannot load a model, accept a request or make progress.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    #[error("model: {0}")]
    Model(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("engine configuration: {0}")]
    Config(String),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("connector: {0}")]
    Connector(#[from] ConnectorError),
    /// Allocating the KV cache on its device, or copying blocks between it and the
    /// engine's host working copy, failed.
    #[error("KV cache memory: {0}")]
    KvMemory(#[from] DeviceError),
    #[error("engine stalled: {0}")]
    Stalled(String),
}
