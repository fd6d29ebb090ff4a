//! kvrelay: moves LLM KV cache between a prefill engine and a decode engine, and between
//! memory tiers.
//!
//! Data flows one way: [`layout`] describes engine KV memory, [`plan`] turns a request's
//! blocks into coalesced byte runs, and a [`device`], a [`store`] tier or a [`transfer`] channel
//! moves those runs. [`keys`] names chunks exactly as LMCache does; [`connector`] is the
//! vLLM-shaped API an engine calls; [`config`] reads LMCache YAML and vLLM's JSON.

pub mod config;
pub mod connector;
pub mod device;
pub mod dtype;
pub mod keys;
pub mod layout;
pub mod plan;
mod process;
pub mod store;
pub mod transfer;

pub use dtype::KvDtype;
