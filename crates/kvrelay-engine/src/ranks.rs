//! Tensor parallelism: the engine's ranks. Each rank holds its share of the KV heads (its
//! own paged cache) and its own connector (worker id = rank), as each vLLM TP worker does.
//! The scheduler's questions go to every rank's connector and are combined the way vLLM
//! and LMCache combine them: a lookup hits as far as every rank hits (LMCache's lookup
//! client takes the minimum over ranks), and a request's transfer is finished once every
//! rank reported it (vLLM's `KVOutputAggregator` counts down from the world size).

use std::collections::{HashMap, HashSet};

use kvrelay::connector::{
    Connector, ConnectorMetadata, ConnectorStats, RequestView, ScheduledRequest,
};
use kvrelay::layout::KvLayout;

use crate::backing::{KvBacking, KvPlacement};
use crate::kv::PagedKv;
use crate::EngineError;

/// One TP rank.
pub(crate) struct Rank {
    pub kv: PagedKv,
    pub connector: Option<Connector>,
    /// The cache `kv` is the working copy of. Declared after `connector`, which must drop
    /// first: its loader thread may still be writing the cache.
    pub backing: Box<dyn KvBacking>,
}

impl Rank {
    pub fn new(layout: KvLayout, placement: &KvPlacement) -> Result<Self, EngineError> {
        Ok(Rank {
            kv: PagedKv::new(layout)?,
            connector: None,
            backing: placement.backing(&layout)?,
        })
    }
}

/// Request ids each rank reports once; an id is complete when every rank reported it.
#[derive(Default)]
pub(crate) struct Countdown {
    heard: HashMap<String, usize>,
}

impl Countdown {
    /// Counts one rank's report of `ids`; returns those every one of `world` ranks reported.
    pub fn arrive(&mut self, ids: HashSet<String>, world: usize) -> Vec<String> {
        ids.into_iter()
            .filter(|id| {
                let heard = self.heard.entry(id.clone()).or_insert(0);
                *heard += 1;
                let done = *heard == world;
                if done {
                    self.heard.remove(id);
                }
                done
            })
            .collect()
    }
}

/// The ranks' connectors, seen as the one connector the scheduler talks to.
pub(crate) fn matched_tokens(
    ranks: &mut [Rank],
    request: &RequestView<'_>,
) -> Result<Option<(usize, bool)>, EngineError> {
    let mut answers = Vec::with_capacity(ranks.len());
    for connector in ranks.iter_mut().filter_map(|r| r.connector.as_mut()) {
        match connector.scheduler.get_num_new_matched_tokens(request, 0)? {
            // A rank not ready yet: ask all of them again next step.
            None => return Ok(None),
            Some(answer) => answers.push(answer),
        }
    }
    let Some(&first) = answers.first() else {
        return Ok(Some((0, false)));
    };
    if answers.iter().all(|a| *a == first) {
        return Ok(Some(first));
    }
    // Each rank loads the prefix it found, so a load shorter than one rank's hit would
    // land in the wrong positions: the ranks disagree, so nothing is loaded and the
    // request computes its prompt (correct, only slower).
    tracing::warn!(
        request = request.id,
        ?answers,
        "TP ranks found different prefixes of this request; loading none"
    );
    Ok(Some((0, false)))
}

pub(crate) fn update_state_after_alloc(
    ranks: &mut [Rank],
    request: &RequestView<'_>,
    block_ids: &[u32],
    num_external_tokens: usize,
) {
    for connector in ranks.iter_mut().filter_map(|r| r.connector.as_mut()) {
        connector
            .scheduler
            .update_state_after_alloc(request, block_ids, num_external_tokens);
    }
}

/// Each rank's metadata for this step, in rank order (none without connectors).
pub(crate) fn build_connector_meta(
    ranks: &mut [Rank],
    scheduled: &[ScheduledRequest<'_>],
) -> Result<Vec<ConnectorMetadata>, EngineError> {
    let mut metas = Vec::with_capacity(ranks.len());
    for connector in ranks.iter_mut().filter_map(|r| r.connector.as_mut()) {
        metas.push(connector.scheduler.build_connector_meta(scheduled)?);
    }
    Ok(metas)
}

/// What the request's end means for its blocks and response: they stay allocated while
/// any rank still sends them, and the response carries rank 0's `kv_transfer_params` (every
/// rank answers alike). Also returns the request's transfers, summed over the ranks.
pub(crate) fn request_finished(
    ranks: &mut [Rank],
    request: &RequestView<'_>,
    block_ids: &[u32],
) -> (bool, Option<serde_json::Value>, ConnectorStats) {
    let mut delay_free = false;
    let mut params = None;
    let mut stats = ConnectorStats::default();
    for (rank, connector) in ranks
        .iter_mut()
        .filter_map(|r| r.connector.as_mut())
        .enumerate()
    {
        let (delay, rank_params) = connector.scheduler.request_finished(request, block_ids);
        delay_free |= delay;
        if rank == 0 {
            params = rank_params;
        }
        stats.add(&connector.worker.take_request_stats(request.id));
    }
    (delay_free, params, stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(names: &[&str]) -> HashSet<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn a_request_is_finished_once_every_rank_reported_it() {
        let mut countdown = Countdown::default();
        assert!(countdown.arrive(ids(&["a", "b"]), 2).is_empty());
        assert_eq!(countdown.arrive(ids(&["b"]), 2), vec!["b".to_string()]);
        assert_eq!(countdown.arrive(ids(&["a", "c"]), 2), vec!["a".to_string()]);
        // One rank: every report is complete at once.
        assert_eq!(countdown.arrive(ids(&["d"]), 1), vec!["d".to_string()]);
        // A finished id starts over: a later report counts from zero.
        assert!(countdown.arrive(ids(&["b"]), 2).is_empty());
    }
}
