//! Builds a connector from vLLM's `--kv-transfer-config` and LMCache's YAML.

use std::sync::Arc;

use super::{
    ConnectorError, KeyPrefix, KvWorker, LmcachePolicy, LmcacheScheduler, SchedulerConnector,
    SharedStorageScheduler,
};
use crate::config::{ConfigError, ConnectorKind, KvRole, KvTransferConfig, LmcacheConfig, PdRole};
use crate::device::Device;
use crate::keys::{default_seed, ChunkHasher, HashAlgorithm, KeyDerivation};
use crate::layout::{AttentionKind, BlockPacking, KvCacheSpec};
use crate::store::{CpuTier, DiskTier, DiskTierOptions, Tier, TierStack};
use crate::transfer::{PdConfig, PdReceiver, PdSink, ReceivedKv};

/// LMCache sizes are in GiB.
const GIB: f64 = (1u64 << 30) as f64;

/// Who this engine is, as chunk keys name it.
#[derive(Clone, Debug)]
pub struct EngineIdentity {
    /// The model name or path given to the engine; part of every key.
    pub model: String,
    pub world_size: u32,
    pub worker_id: u32,
}

/// Both halves of one connector, over one shared tier list.
pub struct Connector {
    pub scheduler: Box<dyn SchedulerConnector>,
    pub worker: KvWorker,
    pub tiers: Arc<TierStack>,
    /// A PD decoder's receiver (its PD buffer), for occupancy figures and cancellation.
    pub pd_receiver: Option<Arc<PdReceiver>>,
}

/// Builds the connector `transfer` names, for caches of geometry `spec` moved by `device`.
pub fn build_connector(
    transfer: &KvTransferConfig,
    lmcache: &LmcacheConfig,
    identity: &EngineIdentity,
    spec: KvCacheSpec,
    device: Arc<dyn Device>,
) -> Result<Connector, ConnectorError> {
    build_connector_with(
        transfer,
        lmcache,
        identity,
        spec,
        device,
        BuildOptions::default(),
    )
}

/// What an engine that is not kvrelay's own may need to say when a connector is built.
#[derive(Default)]
pub struct BuildOptions {
    /// The process-local tiers (a PD receiver's PD buffer, the local CPU tier) live in
    /// another process: given this, the connector binds no PD buffer and allocates no CPU
    /// tier of its own and looks this tier up in their place. An engine whose scheduler
    /// runs in another process than the worker that holds them (vLLM's EngineCore) passes
    /// a tier that asks that worker. Configurations with neither ignore it.
    pub remote_local_tiers: Option<Arc<dyn Tier>>,
    /// The engine's cache moves as opaque blocks packed this way (vLLM CPU): PD chunks then
    /// carry that layout's fingerprint ([`crate::layout::opaque_blocks_fingerprint`]).
    pub block_packing: Option<BlockPacking>,
}

/// [`build_connector`] with [`BuildOptions`].
pub fn build_connector_with(
    transfer: &KvTransferConfig,
    lmcache: &LmcacheConfig,
    identity: &EngineIdentity,
    spec: KvCacheSpec,
    device: Arc<dyn Device>,
    options: BuildOptions,
) -> Result<Connector, ConnectorError> {
    spec.validate()
        .map_err(|e| ConnectorError::GeometryMismatch(e.to_string()))?;
    let role = transfer.kv_role.ok_or_else(|| ConfigError::Invalid {
        reason: "kv_role is required when kv_connector is set".into(),
    })?;
    let prefix = KeyPrefix {
        model: crate::keys::CacheKey::model_name(&identity.model)?,
        world_size: identity.world_size,
        worker_id: identity.worker_id,
        dtype: spec.dtype,
        signed_hash: false,
    };
    let extra = &transfer.kv_connector_extra_config;
    let mut pd_sink = None;
    let mut pd_receiver = None;
    let (tiers, scheduler): (Arc<TierStack>, Box<dyn SchedulerConnector>) = match transfer
        .connector_kind()?
    {
        ConnectorKind::SharedStorage => {
            let disk = DiskTier::open(&extra.shared_storage_path, DiskTierOptions::new(u64::MAX))?;
            let tiers = Arc::new(TierStack::new(vec![Arc::new(disk) as Arc<dyn Tier>]));
            let scheduler = SharedStorageScheduler::new(
                role,
                spec.block_size,
                HashAlgorithm::default(),
                default_seed(),
                prefix,
                Arc::clone(&tiers),
            );
            (tiers, Box::new(scheduler))
        }
        ConnectorKind::Lmcache => {
            let mut lmcache = lmcache.clone();
            transfer.apply_lmcache_overrides(&mut lmcache)?;
            let algorithm = lmcache.hash_algorithm()?;
            let hasher = ChunkHasher::from_env(algorithm, lmcache.chunk_size)
                .map_err(|e| ConnectorError::Hash(e.to_string()))?;
            let tiers = if lmcache.enable_pd {
                let keys =
                    KeyDerivation::new(&prefix.model, prefix.world_size, prefix.dtype, &hasher)?;
                let mut config = PdConfig::from_lmcache(&lmcache, &spec, keys)?;
                config.skip_last_n_tokens = extra.skip_last_n_tokens;
                config.block_packing = options.block_packing;
                // An Ascend channel runs on the NPU that holds this rank's KV.
                config.device = device.ordinal();
                let (tiers, sink, receiver) =
                    pd_tiers(config, &lmcache, role, identity, options.remote_local_tiers)?;
                pd_sink = sink;
                pd_receiver = receiver;
                Arc::new(tiers)
            } else {
                Arc::new(lmcache_tiers(&lmcache, spec, options.remote_local_tiers)?)
            };
            // LMCache's MLA rule: every rank's KV is the same, so keys name world size 1
            // (and rank 0), rank 0 alone saves and every rank loads. PD keeps per-rank
            // keys: each rank has its own PD buffer and peer.
            let first_rank_only = !lmcache.enable_pd
                && lmcache.save_only_first_rank(spec.attention == AttentionKind::Mla)?;
            let prefix = KeyPrefix {
                signed_hash: algorithm.signed(),
                world_size: if first_rank_only {
                    1
                } else {
                    prefix.world_size
                },
                worker_id: if first_rank_only { 0 } else { prefix.worker_id },
                ..prefix
            };
            let saving_role = if first_rank_only && identity.worker_id != 0 {
                KvRole::Consumer
            } else {
                role
            };
            let policy = LmcachePolicy {
                role: saving_role,
                discard_partial_chunks: extra.discard_partial_chunks || !lmcache.save_unfull_chunk,
                skip_last_n_tokens: extra.skip_last_n_tokens,
                save_decode_cache: lmcache.save_decode_cache,
                min_retrieve_tokens: lmcache.min_retrieve_tokens as usize,
                async_loading: lmcache.enable_async_loading,
                pd_sender: pd_sink.is_some(),
            };
            let scheduler = LmcacheScheduler::new(policy, hasher, prefix, Arc::clone(&tiers));
            (tiers, Box::new(scheduler))
        }
    };
    if role == KvRole::Consumer && tiers.tiers().is_empty() {
        return Err(ConfigError::Invalid {
            reason: "a kv_consumer needs at least one tier".into(),
        }
        .into());
    }
    let mut worker = KvWorker::new(device, Arc::clone(&tiers), spec);
    if let Some(sink) = pd_sink {
        worker = worker.with_pd_sink(sink);
    }
    Ok(Connector {
        scheduler,
        worker,
        tiers,
        pd_receiver,
    })
}

type PdSetup = (TierStack, Option<PdSink>, Option<Arc<PdReceiver>>);

/// LMCache PD (`enable_pd`): a receiver's only tier is its PD buffer, bound on
/// `pd_peer_host:pd_peer_*_port[rank]` (or `remote_local_tiers`, another process's buffer,
/// when given); a sender stores nothing locally and pushes each request's chunks to its
/// decoder.
fn pd_tiers(
    config: PdConfig,
    lmcache: &LmcacheConfig,
    role: KvRole,
    identity: &EngineIdentity,
    remote_local_tiers: Option<Arc<dyn Tier>>,
) -> Result<PdSetup, ConnectorError> {
    let rank = identity.worker_id;
    let mismatch = |pd_role: &str, kv_role: &str| ConfigError::Invalid {
        reason: format!("pd_role {pd_role} needs kv_role {kv_role}, got {role}"),
    };
    match lmcache.pd_role {
        Some(PdRole::Receiver) => {
            if !role.is_consumer() || role.is_producer() {
                return Err(mismatch("receiver", "kv_consumer").into());
            }
            if let Some(remote) = remote_local_tiers {
                return Ok((TierStack::new(vec![remote]), None, None));
            }
            let receiver = Arc::new(PdReceiver::bind(&config, rank)?);
            let tier = Arc::new(ReceivedKv::new(Arc::clone(&receiver))) as Arc<dyn Tier>;
            Ok((TierStack::new(vec![tier]), None, Some(receiver)))
        }
        Some(PdRole::Sender) => {
            if role != KvRole::Producer {
                return Err(mismatch("sender", "kv_producer").into());
            }
            Ok((
                TierStack::new(Vec::new()),
                Some(PdSink::new(config, rank)?),
                None,
            ))
        }
        None => Err(ConfigError::Invalid {
            reason: "enable_pd needs pd_role: sender or receiver".into(),
        }
        .into()),
    }
}

/// LMCache's tier order: local CPU (or `remote_local_tiers` in its place), then local
/// disk, then the remote tier.
fn lmcache_tiers(
    config: &LmcacheConfig,
    spec: KvCacheSpec,
    remote_local_tiers: Option<Arc<dyn Tier>>,
) -> Result<TierStack, ConnectorError> {
    let mut tiers: Vec<Arc<dyn Tier>> = Vec::new();
    let local_cpu = config.local_cpu && config.max_local_cpu_size > 0.0;
    let cpu = match remote_local_tiers {
        Some(remote) if local_cpu => {
            tiers.push(remote);
            None
        }
        _ if local_cpu => {
            // One slot per chunk, with room for a chunk file's header so the disk tier can
            // read whole files into it.
            let slot = DiskTier::file_bytes(spec.chunk_bytes(config.chunk_size));
            let budget = (config.max_local_cpu_size * GIB) as u64;
            let cpu = CpuTier::new(budget, slot).map_err(|e| ConfigError::Invalid {
                reason: format!("max_local_cpu_size {} GiB: {e}", config.max_local_cpu_size),
            })?;
            let cpu = Arc::new(cpu);
            tiers.push(Arc::clone(&cpu) as Arc<dyn Tier>);
            Some(cpu)
        }
        _ => None,
    };
    if let Some(dir) = config.local_disk_path() {
        let budget = (config.max_local_disk_size * GIB) as u64;
        let mut disk = DiskTier::open(dir, DiskTierOptions::new(budget))?;
        if let Some(cpu) = cpu {
            disk = disk.reading_into(cpu);
        }
        tiers.push(Arc::new(disk));
    }
    if let Some(url) = &config.remote_url {
        tiers.push(remote_tier(url, spec, config)?);
    }
    if tiers.is_empty() {
        return Err(ConfigError::Invalid {
            reason: "no storage tier is enabled: set local_cpu with max_local_cpu_size > 0, local_disk with max_local_disk_size > 0, or remote_url".into(),
        }
        .into());
    }
    Ok(TierStack::new(tiers))
}

/// The tier `remote_url` names; the config has checked its scheme.
#[cfg(feature = "redis")]
fn remote_tier(
    url: &str,
    spec: KvCacheSpec,
    config: &LmcacheConfig,
) -> Result<Arc<dyn Tier>, ConnectorError> {
    let tier = crate::store::RedisTier::new(url, spec, config.remote_options()?)?;
    Ok(Arc::new(tier))
}

#[cfg(not(feature = "redis"))]
fn remote_tier(
    url: &str,
    _spec: KvCacheSpec,
    _config: &LmcacheConfig,
) -> Result<Arc<dyn Tier>, ConnectorError> {
    Err(ConfigError::UnsupportedValue {
        key: "remote_url".into(),
        value: format!("{url:?}"),
        reason: "this kvrelay was built without the Redis tier; build it with `--features redis`"
            .into(),
    }
    .into())
}
