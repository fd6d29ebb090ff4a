//! The scheduler half's state between vLLM's hooks. vLLM hands `get_num_new_matched_tokens`
//! a whole `Request`, but `build_connector_meta` only the step's `SchedulerOutput` (new
//! requests with their block tables, cached ones with the blocks added since the last
//! step), so the prompt and the block table of each request are kept here.
//!
//! An asynchronous load (`enable_async_loading`) is the one piece of work for a request
//! vLLM does not schedule: it allocates the blocks, calls `update_state_after_alloc` and
//! parks the request in `WAITING_FOR_REMOTE_KVS` until the worker reports the load in
//! `get_finished`. The request is then in no `SchedulerOutput`, so its load goes into the
//! next step's metadata from here.

use std::collections::HashMap;

use kvrelay::connector::{ConnectorMetadata, RequestView, ScheduledRequest, SchedulerConnector};

use crate::AdapterError;

/// A request the connector has looked up and not yet seen finish.
struct TrackedRequest {
    prompt: Vec<u32>,
    block_ids: Vec<u32>,
    kv_transfer_params: Option<serde_json::Value>,
    /// The last lookup answered "load asynchronously": the tokens vLLM had computed then.
    async_lookup: Option<usize>,
}

impl TrackedRequest {
    fn view<'a>(&'a self, id: &'a str) -> RequestView<'a> {
        RequestView {
            id,
            tokens: &self.prompt,
            num_prompt_tokens: self.prompt.len(),
            kv_transfer_params: self.kv_transfer_params.as_ref(),
        }
    }
}

/// A request scheduled for the first time (vLLM's `scheduled_new_reqs`).
#[derive(Clone, Debug)]
pub struct NewStep {
    pub id: String,
    /// The request's whole block table (first KV cache group).
    pub block_ids: Vec<u32>,
    /// Tokens computed once this step's forward ran: `num_computed_tokens` plus the
    /// tokens scheduled now.
    pub num_computed_tokens: usize,
}

/// A request scheduled again (vLLM's `scheduled_cached_reqs`).
#[derive(Clone, Debug)]
pub struct CachedStep {
    pub id: String,
    /// Blocks added since the last step; with `resumed`, the whole new block table.
    pub new_block_ids: Vec<u32>,
    /// Resumed from preemption: `new_block_ids` replaces the block table.
    pub resumed: bool,
    pub num_computed_tokens: usize,
}

/// vLLM's scheduler-role connector: one [`SchedulerConnector`] plus the requests it tracks.
pub struct SchedulerHalf {
    scheduler: Box<dyn SchedulerConnector>,
    requests: HashMap<String, TrackedRequest>,
    /// Requests parked in `WAITING_FOR_REMOTE_KVS` whose load is not yet in any metadata,
    /// in the order vLLM allocated them, with the tokens computed before the load.
    async_loads: Vec<(String, usize)>,
}

impl SchedulerHalf {
    pub fn new(scheduler: Box<dyn SchedulerConnector>) -> Self {
        SchedulerHalf {
            scheduler,
            requests: HashMap::new(),
            async_loads: Vec::new(),
        }
    }

    /// Looks the prompt up; remembers it for the steps that follow. Only the prompt is
    /// looked up (generated tokens are never saved: `save_decode_cache` is refused).
    pub fn get_num_new_matched_tokens(
        &mut self,
        id: &str,
        prompt: Vec<u32>,
        kv_transfer_params: Option<serde_json::Value>,
        num_computed_tokens: usize,
    ) -> Result<Option<(usize, bool)>, AdapterError> {
        let request = self
            .requests
            .entry(id.to_string())
            .or_insert_with(|| TrackedRequest {
                prompt: Vec::new(),
                block_ids: Vec::new(),
                kv_transfer_params: None,
                async_lookup: None,
            });
        request.prompt = prompt;
        request.kv_transfer_params = kv_transfer_params;
        let matched = self
            .scheduler
            .get_num_new_matched_tokens(&request.view(id), num_computed_tokens)?;
        request.async_lookup =
            matches!(matched, Some((n, true)) if n > 0).then_some(num_computed_tokens);
        Ok(matched)
    }

    pub fn update_state_after_alloc(
        &mut self,
        id: &str,
        block_ids: Vec<u32>,
        num_external_tokens: usize,
    ) -> Result<(), AdapterError> {
        let request = self
            .requests
            .get_mut(id)
            .ok_or_else(|| AdapterError::UnknownRequest(id.to_string()))?;
        request.block_ids = block_ids;
        self.scheduler.update_state_after_alloc(
            &request.view(id),
            &request.block_ids,
            num_external_tokens,
        );
        // vLLM parks the request until the load lands: this step's metadata carries it.
        match request.async_lookup.take() {
            Some(computed) if num_external_tokens > 0 => {
                self.async_loads.retain(|(parked, _)| parked != id);
                self.async_loads.push((id.to_string(), computed));
            }
            _ => {}
        }
        Ok(())
    }

    /// This step's metadata, over the block tables as vLLM has them after this step, with
    /// the asynchronous loads vLLM parked since the last step (over the blocks allocated
    /// for them, with nothing computed beyond what was computed before the load).
    pub fn build_connector_meta(
        &mut self,
        new: Vec<NewStep>,
        cached: Vec<CachedStep>,
    ) -> Result<ConnectorMetadata, AdapterError> {
        let mut computed = Vec::with_capacity(new.len() + cached.len() + self.async_loads.len());
        for (id, before_load) in std::mem::take(&mut self.async_loads) {
            self.tracked(&id)?;
            computed.push((id, before_load));
        }
        for step in new {
            let request = self.tracked(&step.id)?;
            request.block_ids = step.block_ids;
            computed.push((step.id, step.num_computed_tokens));
        }
        for step in cached {
            let request = self.tracked(&step.id)?;
            if step.resumed {
                request.block_ids = step.new_block_ids;
            } else {
                request.block_ids.extend_from_slice(&step.new_block_ids);
            }
            computed.push((step.id, step.num_computed_tokens));
        }
        let scheduled: Vec<ScheduledRequest<'_>> = computed
            .iter()
            .map(|(id, num_computed_tokens)| {
                let request = &self.requests[id];
                ScheduledRequest {
                    request: request.view(id),
                    block_ids: &request.block_ids,
                    num_computed_tokens: *num_computed_tokens,
                }
            })
            .collect();
        Ok(self.scheduler.build_connector_meta(&scheduled)?)
    }

    fn tracked(&mut self, id: &str) -> Result<&mut TrackedRequest, AdapterError> {
        self.requests
            .get_mut(id)
            .ok_or_else(|| AdapterError::UnknownRequest(id.to_string()))
    }

    /// The request ended; forgets it. Returns whether vLLM must keep its blocks and the
    /// `kv_transfer_params` for the response.
    pub fn request_finished(&mut self, id: &str) -> (bool, Option<serde_json::Value>) {
        let Some(request) = self.requests.remove(id) else {
            return (false, None);
        };
        let view = request.view(id);
        self.scheduler.request_finished(&view, &request.block_ids)
    }

    /// Requests looked up and not yet finished.
    pub fn tracked_requests(&self) -> usize {
        self.requests.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{build_half, Half};
    use crate::test_support::engine;
    use kvrelay::connector::ConnectorMetadata;

    fn half(dir: &std::path::Path, role: &str) -> SchedulerHalf {
        half_with(dir, role, "").0
    }

    /// A scheduler half over a shared disk tier with `extra` LMCache settings, and the tier.
    fn half_with(
        dir: &std::path::Path,
        role: &str,
        extra: &str,
    ) -> (SchedulerHalf, std::sync::Arc<kvrelay::store::TierStack>) {
        let yaml = format!(
            "chunk_size: 256\nlocal_cpu: false\nlocal_disk: \"file://{}\"\nmax_local_disk_size: 1\npre_caching_hash_algorithm: sha256_cbor\n{extra}",
            dir.join("disk").display()
        );
        let file = dir.join("lmcache.yaml");
        std::fs::write(&file, yaml).unwrap();
        let transfer = format!(r#"{{"kv_connector":"KvrelayConnector","kv_role":"{role}"}}"#);
        let env = [(
            "LMCACHE_CONFIG_FILE".to_string(),
            file.display().to_string(),
        )];
        let connector = build_half(&engine(), &transfer, env, Half::Scheduler)
            .unwrap()
            .connector;
        (SchedulerHalf::new(connector.scheduler), connector.tiers)
    }

    /// A prefill of 600 tokens scheduled in two steps (512 then 88 tokens) saves its two
    /// whole chunks over the block table as it grows, and forgets the request at the end.
    #[test]
    fn chunked_prefill_saves_whole_chunks_over_the_growing_block_table() {
        let dir = tempfile::tempdir().unwrap();
        let mut half = half(dir.path(), "kv_producer");
        let prompt: Vec<u32> = (0..600).collect();
        assert_eq!(
            half.get_num_new_matched_tokens("r", prompt, None, 0)
                .unwrap(),
            Some((0, false))
        );
        half.update_state_after_alloc("r", vec![5, 6, 7, 8], 0)
            .unwrap();
        let first = half
            .build_connector_meta(
                vec![NewStep {
                    id: "r".into(),
                    block_ids: vec![5, 6, 7, 8],
                    num_computed_tokens: 512,
                }],
                vec![],
            )
            .unwrap();
        assert_eq!(first.requests.len(), 1);
        let saves: Vec<_> = first.requests[0]
            .saves
            .iter()
            .map(|s| s.window.start)
            .collect();
        assert_eq!(saves, [0, 256]);
        assert_eq!(first.requests[0].block_ids, [5, 6, 7, 8]);
        // The rest of the prompt: a partial chunk, not saved (save_unfull_chunk: false).
        let second = half
            .build_connector_meta(
                vec![],
                vec![CachedStep {
                    id: "r".into(),
                    new_block_ids: vec![9],
                    resumed: false,
                    num_computed_tokens: 600,
                }],
            )
            .unwrap();
        assert_eq!(second, ConnectorMetadata::default());
        assert_eq!(half.tracked_requests(), 1);
        assert_eq!(half.request_finished("r"), (false, None));
        assert_eq!(half.tracked_requests(), 0);
        // Finishing twice, or a request never seen, is harmless.
        assert_eq!(half.request_finished("r"), (false, None));
    }

    #[test]
    fn a_request_never_looked_up_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut half = half(dir.path(), "kv_both");
        let step = NewStep {
            id: "ghost".into(),
            block_ids: vec![1],
            num_computed_tokens: 10,
        };
        assert!(matches!(
            half.build_connector_meta(vec![step], vec![]),
            Err(AdapterError::UnknownRequest(id)) if id == "ghost"
        ));
        assert!(matches!(
            half.update_state_after_alloc("ghost", vec![1], 0),
            Err(AdapterError::UnknownRequest(_))
        ));
    }

    /// With `enable_async_loading`, vLLM parks a hit request in WAITING_FOR_REMOTE_KVS
    /// after `update_state_after_alloc` and schedules nothing for it: the load must still
    /// reach the worker, in that step's metadata, once, and the request's later steps
    /// must neither load nor save it again.
    #[test]
    fn async_loads_of_parked_requests_go_into_the_next_metadata_once() {
        let dir = tempfile::tempdir().unwrap();
        let (mut half, tiers) = half_with(dir.path(), "kv_both", "enable_async_loading: true\n");
        let prompt: Vec<u32> = (0..600).collect();
        // A first request computes and saves the prompt's two whole chunks.
        assert_eq!(
            half.get_num_new_matched_tokens("first", prompt.clone(), None, 0)
                .unwrap(),
            Some((0, false))
        );
        half.update_state_after_alloc("first", vec![1, 2, 3, 4, 5], 0)
            .unwrap();
        let step = NewStep {
            id: "first".into(),
            block_ids: vec![1, 2, 3, 4, 5],
            num_computed_tokens: 600,
        };
        let saved = half.build_connector_meta(vec![step], vec![]).unwrap();
        let meta = kvrelay::store::ChunkMeta {
            layout_fingerprint: 1,
            num_tokens: 256,
        };
        for save in &saved.requests[0].saves {
            tiers.put(&save.key, meta, &[7; 64]).unwrap();
        }
        // The same prompt again: a hit of 512 tokens, loaded in the background.
        assert_eq!(
            half.get_num_new_matched_tokens("second", prompt.clone(), None, 0)
                .unwrap(),
            Some((512, true))
        );
        half.update_state_after_alloc("second", vec![6, 7, 8, 9], 512)
            .unwrap();
        // Parked: no SchedulerOutput names it, the metadata does.
        let parked = half.build_connector_meta(vec![], vec![]).unwrap();
        assert_eq!(parked.requests.len(), 1);
        let load = &parked.requests[0];
        assert_eq!(load.request_id, "second");
        assert!(load.load_async && load.saves.is_empty() && !load.flush_saves);
        assert_eq!(load.block_ids, [6, 7, 8, 9]);
        let loads: Vec<_> = load.loads.iter().map(|l| l.key.clone()).collect();
        let keys: Vec<_> = saved.requests[0]
            .saves
            .iter()
            .map(|s| s.key.clone())
            .collect();
        assert_eq!(loads, keys);
        // Once only, and nothing more once vLLM schedules the rest of the prompt.
        assert_eq!(
            half.build_connector_meta(vec![], vec![]).unwrap(),
            ConnectorMetadata::default()
        );
        half.update_state_after_alloc("second", vec![10], 0)
            .unwrap();
        let rest = NewStep {
            id: "second".into(),
            block_ids: vec![6, 7, 8, 9, 10],
            num_computed_tokens: 600,
        };
        assert_eq!(
            half.build_connector_meta(vec![rest], vec![]).unwrap(),
            ConnectorMetadata::default()
        );
        // An asynchronous answer vLLM overrode (it loads nothing, e.g. its own cache held
        // the tail), or never allocated for, parks nothing.
        half.get_num_new_matched_tokens("third", prompt.clone(), None, 0)
            .unwrap();
        half.update_state_after_alloc("third", vec![11], 0).unwrap();
        half.get_num_new_matched_tokens("fourth", prompt, None, 0)
            .unwrap();
        assert_eq!(
            half.build_connector_meta(vec![], vec![]).unwrap(),
            ConnectorMetadata::default()
        );
    }
}
