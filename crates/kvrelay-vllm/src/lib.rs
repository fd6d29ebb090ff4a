//! kvrelay inside vLLM: everything the Python connector (`crates/kvrelay-py`,
//! `kvrelay.vllm.KvrelayConnector`) needs that is not Python.
//!
//! vLLM runs a connector's scheduler half in its EngineCore process and its worker half in
//! each Worker process. [`engine`] builds either half from vLLM's configs and refuses what
//! two processes cannot share yet; [`scheduler`] keeps the per-request state the scheduler
//! half needs between vLLM's hooks; [`lookup`] lets the scheduler half see the tiers only
//! the worker half holds (a PD decoder's PD buffer, a CPU tier alone); [`metadata`] carries each step's
//! [`kvrelay::connector::ConnectorMetadata`] across the process boundary as bytes;
//! [`tensors`] recognizes the KV cache tensors vLLM registers, and [`worker`] builds the
//! worker half over them on their device.

pub mod engine;
pub mod lookup;
pub mod metadata;
pub mod scheduler;
pub mod tensors;
pub mod worker;

#[cfg(test)]
mod cpu_tier_tests;

pub use engine::{build_half, check_half, AdapterError, BuiltHalf, Half, VllmEngine};
pub use scheduler::{CachedStep, NewStep, SchedulerHalf};
pub use tensors::{recognize_kv_caches, KvDevice, RecognizedKv, TensorError, TensorInfo};
pub use worker::{build_worker_half, RegisteredWorker};

#[cfg(test)]
mod test_support {
    use crate::VllmEngine;

    /// The smoke's tiny Llama on vLLM CPU: 2 layers, 4 KV heads of 32, blocks of 128.
    pub(crate) fn engine() -> VllmEngine {
        VllmEngine {
            model: "/models/tiny-llama".into(),
            num_layers: 2,
            num_kv_heads: 4,
            head_size: 32,
            kv_dtype: "float32".into(),
            block_size: 128,
            num_blocks: 16,
            world_size: 1,
            rank: 0,
            device_type: "cpu".into(),
            cpu_attn_isa: Some("vec".into()),
        }
    }
}
