//! The vLLM-shaped connector API: a scheduler half that decides what to load and save, and
//! a worker half that moves the bytes. CONTRACT.md beside this file says who calls what,
//! in which order and on which thread.
//!
//! Both connectors share the worker ([`KvWorker`]); they differ only in the scheduler
//! policy: [`SharedStorageScheduler`] keeps vLLM's baseline semantics,
//! [`LmcacheScheduler`] LMCache's chunked, prefix-chained ones.

mod build;
mod lmcache;
mod shared_storage;
mod worker;

use std::sync::Arc;

pub use build::{build_connector, build_connector_with, BuildOptions, Connector, EngineIdentity};
pub use lmcache::{LmcachePolicy, LmcacheScheduler};
pub use shared_storage::SharedStorageScheduler;
pub use worker::{ConnectorStats, KvWorker};

use crate::config::{ConfigError, KvRole};
use crate::device::DeviceError;
use crate::keys::{CacheKey, KeyError};
use crate::plan::{ChunkWindow, PlanError};
use crate::store::{RequestIdScope, StoreError};

/// A connector call that cannot be carried out.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectorError {
    #[error("the worker has no KV caches registered; call register_kv_caches first")]
    NotRegistered,
    #[error("registered KV caches hold other geometry than the connector was built for: {0}")]
    GeometryMismatch(String),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Hash(String),
    #[error("asynchronous KV loader: {0}")]
    Loader(String),
    #[error(transparent)]
    Transfer(#[from] crate::transfer::TransferError),
}

/// What makes one engine's chunk keys: the fields of LMCache's `CacheEngineKey` other
/// than the hash.
#[derive(Clone, Debug)]
pub struct KeyPrefix {
    pub model: Arc<str>,
    pub world_size: u32,
    pub worker_id: u32,
    pub dtype: crate::KvDtype,
    /// Hashes are Python's signed ints (`builtin`), printed with a sign when negative.
    pub signed_hash: bool,
}

impl KeyPrefix {
    pub fn key(&self, chunk_hash: u64) -> Result<CacheKey, KeyError> {
        let key = CacheKey::with_model(
            Arc::clone(&self.model),
            self.world_size,
            self.worker_id,
            chunk_hash,
            self.dtype,
        )?;
        Ok(key.signed(self.signed_hash))
    }
}

/// The scheduler's view of a request.
#[derive(Clone, Copy, Debug)]
pub struct RequestView<'a> {
    pub id: &'a str,
    /// Every token so far: the prompt, then generated tokens.
    pub tokens: &'a [u32],
    pub num_prompt_tokens: usize,
    /// The request's `kv_transfer_params` (vLLM carries them in the sampling params); a PD
    /// prefiller reads its `disagg_spec` receiver from them.
    pub kv_transfer_params: Option<&'a serde_json::Value>,
}

/// A request scheduled in this step, as `build_connector_meta` sees it.
#[derive(Clone, Copy, Debug)]
pub struct ScheduledRequest<'a> {
    pub request: RequestView<'a>,
    /// The request's whole block table.
    pub block_ids: &'a [u32],
    /// Tokens whose KV will be in the paged cache once this step's forward has run.
    pub num_computed_tokens: usize,
}

/// One chunk to move: its key and where its tokens sit in the request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkTransfer {
    pub key: CacheKey,
    pub window: ChunkWindow,
}

/// What the worker must do for one request in one step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestTransfer {
    pub request_id: String,
    pub block_ids: Vec<u32>,
    /// Chunks to load before the forward, in token order.
    pub loads: Vec<ChunkTransfer>,
    /// Load in the background: the request waits (vLLM's `WAITING_FOR_REMOTE_KVS`) until
    /// the worker reports it in `get_finished`'s received set.
    pub load_async: bool,
    /// Chunks to save after the forward, in token order.
    pub saves: Vec<ChunkTransfer>,
    /// This step completes the request's prompt: a PD prefiller sends everything it
    /// gathered for the request now.
    pub flush_saves: bool,
    /// With `flush_saves`, or when they carry a PD id (`disagg_spec.req_id`): the
    /// request's `kv_transfer_params`, which may name the receiver
    /// ([`crate::transfer::PdTarget`]).
    pub kv_transfer_params: Option<serde_json::Value>,
    /// A PD prefiller's every prompt chunk, on the request's first save step when the
    /// prompt takes several steps (chunked prefill): the worker reserves the decoder's
    /// pages for them then and sends each chunk in the step that computed it. Empty
    /// otherwise (everything goes at `flush_saves`).
    pub pd_plan: Vec<ChunkTransfer>,
    /// The request's prompt length: with `flush_saves`, what a PD decoder is handed (with
    /// the first token too under `ret_first_tok`), which decides the chunks it looks up.
    pub prompt_tokens: usize,
}

impl RequestTransfer {
    /// Tokens a PD decoder is handed for this request: the prompt, plus the prefiller's
    /// first token when the proxy asked for it (`ret_first_tok`, LMCache's proxy then sends
    /// the decoder prompt + first token).
    pub fn decoder_tokens(&self) -> usize {
        self.prompt_tokens + usize::from(wants_first_token(self.kv_transfer_params.as_ref()))
    }

    /// The id this request's PD transfer travels under (see [`pd_request_id`]): what a
    /// prefiller sends and notifies the proxy under, and whose copy a decoder loads. An
    /// engine that names requests its own way (vLLM) differs from the proxy's id here.
    pub fn pd_request_id(&self) -> &str {
        pd_id(&self.request_id, self.kv_transfer_params.as_ref()).0
    }
}

/// Whether a request's `kv_transfer_params` ask for the first token (`ret_first_tok`).
pub(crate) fn wants_first_token(params: Option<&serde_json::Value>) -> bool {
    params
        .and_then(|p| p.get("ret_first_tok"))
        .and_then(serde_json::Value::as_bool)
        == Some(true)
}

/// The id a PD transfer for this request travels under: the proxy's
/// `kv_transfer_params.disagg_spec.req_id` when present, else the engine's request id.
pub(crate) fn pd_request_id<'a>(request: &RequestView<'a>) -> (&'a str, RequestIdScope) {
    pd_id(request.id, request.kv_transfer_params)
}

fn pd_id<'a>(
    id: &'a str,
    kv_transfer_params: Option<&'a serde_json::Value>,
) -> (&'a str, RequestIdScope) {
    kv_transfer_params
        .and_then(|p| p.get("disagg_spec"))
        .and_then(|spec| spec.get("req_id"))
        .and_then(serde_json::Value::as_str)
        .map_or((id, RequestIdScope::Local), |pd| {
            (pd, RequestIdScope::Shared)
        })
}

/// The per-step message from the scheduler half to the worker half.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnectorMetadata {
    pub requests: Vec<RequestTransfer>,
}

impl ConnectorMetadata {
    /// Adds a request's work for this step, if it has any.
    pub(crate) fn push(
        &mut self,
        scheduled: &ScheduledRequest<'_>,
        loads: Vec<ChunkTransfer>,
        load_async: bool,
        saves: Vec<ChunkTransfer>,
        flush_saves: bool,
        pd_plan: Vec<ChunkTransfer>,
    ) {
        if !loads.is_empty() || !saves.is_empty() || flush_saves {
            // A proxy's PD id (`disagg_spec.req_id`) names each of the request's sends and
            // loads; the rest of the params matter with `flush_saves` only.
            let pd = pd_request_id(&scheduled.request).1 == RequestIdScope::Shared;
            let with_params = flush_saves || pd || !pd_plan.is_empty();
            self.requests.push(RequestTransfer {
                request_id: scheduled.request.id.to_string(),
                block_ids: scheduled.block_ids.to_vec(),
                load_async: load_async && !loads.is_empty(),
                loads,
                saves,
                flush_saves,
                pd_plan,
                kv_transfer_params: with_params
                    .then(|| scheduled.request.kv_transfer_params.cloned())
                    .flatten(),
                prompt_tokens: scheduled.request.num_prompt_tokens,
            });
        }
    }
}

/// The scheduler half of a connector (vLLM's `KVConnectorRole.SCHEDULER`).
pub trait SchedulerConnector: Send {
    /// How many tokens beyond `num_computed_tokens` the connector can load, and whether the
    /// load is asynchronous. `None` asks the scheduler to try again next step. Free of side
    /// effects that matter: it may be called several times for one request.
    fn get_num_new_matched_tokens(
        &mut self,
        request: &RequestView<'_>,
        num_computed_tokens: usize,
    ) -> Result<Option<(usize, bool)>, ConnectorError>;

    /// Called once the request's blocks are allocated; `num_external_tokens` is what
    /// `get_num_new_matched_tokens` returned (0: nothing to load).
    fn update_state_after_alloc(
        &mut self,
        request: &RequestView<'_>,
        block_ids: &[u32],
        num_external_tokens: usize,
    );

    /// Builds this step's metadata and resets the per-step state.
    fn build_connector_meta(
        &mut self,
        scheduled: &[ScheduledRequest<'_>],
    ) -> Result<ConnectorMetadata, ConnectorError>;

    /// The request is done. Returns whether its blocks must stay allocated until the worker
    /// reports it in `finished_sending`, and the `kv_transfer_params` for the response.
    fn request_finished(
        &mut self,
        request: &RequestView<'_>,
        block_ids: &[u32],
    ) -> (bool, Option<serde_json::Value>);
}

/// Which direction a role moves KV in.
pub(crate) fn saves(role: KvRole) -> bool {
    role.is_producer()
}

/// Chunk windows of `len` tokens cut at multiples of `chunk_size`, for chunks that end
/// after `from`, with the tokens before `from` skipped.
pub(crate) fn windows_from(from: usize, len: usize, chunk_size: usize) -> Vec<ChunkWindow> {
    (from / chunk_size * chunk_size..len)
        .step_by(chunk_size)
        .map(|start| ChunkWindow {
            start,
            tokens: chunk_size.min(len - start),
            skip_leading: from.saturating_sub(start),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::CacheKey;
    use crate::plan::ChunkWindow;
    use crate::KvDtype;

    /// An engine that names requests its own way (vLLM's `cmpl-...`) still sends and loads
    /// a PD request under the proxy's `disagg_spec.req_id`, on every step with work.
    #[test]
    fn pd_transfers_travel_under_the_proxys_id() {
        let params = serde_json::json!({"disagg_spec": {"req_id": "pd-42"}});
        let tokens = [1u32; 300];
        let chunk = ChunkTransfer {
            key: CacheKey::new("/m", 1, 0, 7, KvDtype::F32).unwrap(),
            window: ChunkWindow {
                start: 0,
                tokens: 256,
                skip_leading: 0,
            },
        };
        let mut meta = ConnectorMetadata::default();
        for params in [Some(&params), None] {
            let scheduled = ScheduledRequest {
                request: RequestView {
                    id: "cmpl-1-0",
                    tokens: &tokens,
                    num_prompt_tokens: 300,
                    kv_transfer_params: params,
                },
                block_ids: &[1, 2, 3],
                num_computed_tokens: 256,
            };
            // A load, not the prompt's last step.
            meta.push(
                &scheduled,
                vec![chunk.clone()],
                false,
                vec![],
                false,
                vec![],
            );
        }
        assert_eq!(meta.requests[0].pd_request_id(), "pd-42");
        assert_eq!(meta.requests[0].kv_transfer_params.as_ref(), Some(&params));
        assert_eq!(meta.requests[1].pd_request_id(), "cmpl-1-0");
        assert_eq!(meta.requests[1].kv_transfer_params, None);
    }
}
