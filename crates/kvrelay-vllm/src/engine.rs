//! Builds the kvrelay connector for one vLLM process from vLLM's `kv_transfer_config` and
//! LMCache's config (`LMCACHE_CONFIG_FILE` and `LMCACHE_*`), with the same strict parsing
//! as everywhere else, and refuses what vLLM's two processes cannot share yet.

use std::sync::Arc;

use kvrelay::config::{ConfigError, ConnectorKind, KvTransferConfig, LmcacheConfig, PdRole};
use kvrelay::connector::{
    build_connector_with, BuildOptions, Connector, ConnectorError, EngineIdentity,
};
use kvrelay::device::{Device, HostDevice};
use kvrelay::layout::{AttentionKind, BlockPacking, CpuAttnIsa, KvCacheSpec};
use kvrelay::store::Tier;
use kvrelay::KvDtype;

use crate::lookup::{LookupClient, LookupEndpoint, LookupError, LookupServer, DIR_ENV};

/// What vLLM's config says about the engine a connector half serves. Both halves describe
/// the same engine; the worker half checks it against the tensors it is handed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VllmEngine {
    /// `model_config.model`: part of every chunk key, so prefill and decode must agree.
    pub model: String,
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_size: usize,
    /// The KV cache element type as vLLM names it (`float32`, `bfloat16`, `fp8_e4m3`, ...).
    pub kv_dtype: String,
    pub block_size: usize,
    pub num_blocks: usize,
    /// `parallel_config.world_size`: tensor × pipeline parallel ranks.
    pub world_size: u32,
    pub rank: u32,
    /// `current_platform.device_type`: `cpu` for vLLM's CPU build.
    pub device_type: String,
    /// vLLM CPU: the instruction set its attention kernel packs KV blocks for (`vec`,
    /// `amx`, ...), as vLLM's own `_get_attn_isa` answers for this config.
    pub cpu_attn_isa: Option<String>,
}

/// Why a connector half cannot be built or cannot do what vLLM asks.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdapterError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Connector(#[from] ConnectorError),
    #[error("kvrelay's vLLM connector does not support this yet: {0}")]
    NotYetSupported(String),
    #[error("the vLLM engine description is not usable: {0}")]
    BadEngine(String),
    #[error(transparent)]
    Tensors(#[from] crate::tensors::TensorError),
    #[error(transparent)]
    Metadata(#[from] crate::metadata::MetadataError),
    #[error("vLLM scheduled request {0:?}, which the connector never looked up")]
    UnknownRequest(String),
    #[error(transparent)]
    Lookup(#[from] LookupError),
}

/// Which of vLLM's two connector objects a build is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Half {
    /// The EngineCore process's: answers lookups, plans each step.
    Scheduler,
    /// A Worker process's: moves the bytes, holds process-local tiers.
    Worker,
}

/// A built half: the connector and, for the worker half of a config whose tiers are all
/// process-local (a PD receiver, a CPU tier alone), the lookup channel it serves them on
/// (dropping it closes the channel).
pub struct BuiltHalf {
    pub connector: Connector,
    pub lookup_server: Option<LookupServer>,
}

/// The device whose KV cache vLLM's CPU build hands over.
const CPU_DEVICE: &str = "cpu";

/// The vLLM platforms (`current_platform.device_type`) this build serves: CPU, and
/// vllm-ascend (`npu`) / vllm-rbln (`rbln`) with the `ascend` / `rbln` feature.
fn platform_built(device_type: &str) -> bool {
    device_type == CPU_DEVICE
        || (device_type == "npu" && cfg!(feature = "ascend"))
        || (device_type == "rbln" && cfg!(feature = "rbln"))
}

impl VllmEngine {
    /// The cache geometry vLLM's config describes.
    pub fn spec(&self) -> Result<KvCacheSpec, AdapterError> {
        let dtype: KvDtype = self
            .kv_dtype
            .parse()
            .map_err(|e| AdapterError::BadEngine(format!("KV cache dtype: {e}")))?;
        let spec = KvCacheSpec {
            num_layers: self.num_layers,
            num_kv_heads: self.num_kv_heads,
            head_size: self.head_size,
            dtype,
            block_size: self.block_size,
            num_blocks: self.num_blocks,
            attention: AttentionKind::Mha,
        };
        spec.validate()
            .map_err(|e| AdapterError::BadEngine(e.to_string()))?;
        Ok(spec)
    }
}

/// Builds the connector for one process of `engine`. `kv_transfer_config_json` is vLLM's
/// `kv_transfer_config` as a JSON object; `env` is the process environment, of which
/// `LMCACHE_CONFIG_FILE` and the `LMCACHE_*` variables are read as LMCache reads them, and
/// `KVRELAY_LOOKUP_DIR` names the lookup channel's directory. When every tier is
/// process-local (a PD receiver's PD buffer, a CPU tier alone), the worker half holds them
/// and serves them on the lookup channel; the scheduler half binds and allocates nothing
/// and looks them up through that channel. Shared tiers (disk) are read by both directly.
/// The worker half moves host memory; [`crate::worker::build_worker_half`] builds one over
/// the registered tensors' device instead.
pub fn build_half(
    engine: &VllmEngine,
    kv_transfer_config_json: &str,
    env: impl IntoIterator<Item = (String, String)>,
    half: Half,
) -> Result<BuiltHalf, AdapterError> {
    build_half_on(
        engine,
        kv_transfer_config_json,
        env,
        half,
        Arc::new(HostDevice),
    )
}

/// Refuses what [`build_half`] would refuse from the configs alone, binding nothing: a
/// worker half built only once vLLM registers its KV cache checks its config up front.
pub fn check_half(
    engine: &VllmEngine,
    kv_transfer_config_json: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), AdapterError> {
    let transfer = KvTransferConfig::from_json_str(kv_transfer_config_json)?;
    let lmcache = LmcacheConfig::load_with_env(env)?;
    if check_supported(engine, &transfer, &lmcache)? {
        lookup_name(&transfer)?;
    }
    engine.spec()?;
    Ok(())
}

/// [`build_half`] moving KV with `device`.
pub(crate) fn build_half_on(
    engine: &VllmEngine,
    kv_transfer_config_json: &str,
    env: impl IntoIterator<Item = (String, String)>,
    half: Half,
    device: Arc<dyn Device>,
) -> Result<BuiltHalf, AdapterError> {
    let env: Vec<(String, String)> = env.into_iter().collect();
    let transfer = KvTransferConfig::from_json_str(kv_transfer_config_json)?;
    let lmcache = LmcacheConfig::load_with_env(env.iter().cloned())?;
    let worker_tiers_only = check_supported(engine, &transfer, &lmcache)?;
    let lookup = if worker_tiers_only {
        let dir = env
            .iter()
            .find(|(name, _)| name == DIR_ENV)
            .map(|(_, dir)| dir.into());
        Some(LookupEndpoint::new(
            dir,
            &lookup_name(&transfer)?,
            engine.rank,
        )?)
    } else {
        None
    };
    let remote_local_tiers = match (half, &lookup) {
        (Half::Scheduler, Some(endpoint)) => {
            Some(Arc::new(LookupClient::new(endpoint.clone())) as Arc<dyn Tier>)
        }
        _ => None,
    };
    let block_packing = engine
        .cpu_attn_isa
        .as_deref()
        .map(|isa| {
            isa.parse::<CpuAttnIsa>()
                .map(BlockPacking::CpuAttn)
                .map_err(|e| AdapterError::BadEngine(format!("CPU attention ISA {isa:?}: {e}")))
        })
        .transpose()?;
    let identity = EngineIdentity {
        model: engine.model.clone(),
        world_size: engine.world_size,
        worker_id: engine.rank,
    };
    let connector = build_connector_with(
        &transfer,
        &lmcache,
        &identity,
        engine.spec()?,
        device,
        BuildOptions {
            remote_local_tiers,
            block_packing,
        },
    )?;
    let lookup_server = match (half, lookup) {
        (Half::Worker, Some(endpoint)) => {
            Some(LookupServer::start(endpoint, Arc::clone(&connector.tiers))?)
        }
        _ => None,
    };
    Ok(BuiltHalf {
        connector,
        lookup_server,
    })
}

/// What tells this engine's lookup channel from other engines' on the host: LMCache's
/// `lmcache_rpc_port` (its lookup socket's suffix), else vLLM's `engine_id`, which vLLM
/// generates per server and hands both processes.
fn lookup_name(transfer: &KvTransferConfig) -> Result<String, AdapterError> {
    transfer
        .kv_connector_extra_config
        .lmcache_rpc_port
        .clone()
        .or_else(|| transfer.engine_id.clone())
        .ok_or_else(|| {
            AdapterError::Config(ConfigError::Invalid {
                reason: "a PD receiver or a CPU tier alone lives in the worker process and needs lmcache_rpc_port or engine_id in kv_transfer_config to name the lookup channel the scheduler process asks it on".into(),
            })
        })
}

/// Refuses configurations this slice of the vLLM adapter cannot run correctly. Returns
/// whether every tier is process-local (a PD receiver's buffer, or a CPU tier with no
/// shared tier), so that the halves need the lookup channel.
fn check_supported(
    engine: &VllmEngine,
    transfer: &KvTransferConfig,
    lmcache: &LmcacheConfig,
) -> Result<bool, AdapterError> {
    let not_yet = |what: String| Err(AdapterError::NotYetSupported(what));
    if !platform_built(&engine.device_type) {
        return not_yet(format!(
            "vLLM on device '{}': kvrelay serves vLLM's CPU build (device 'cpu'), and vllm-ascend ('npu') / vllm-rbln ('rbln') when built with the ascend / rbln feature",
            engine.device_type
        ));
    }
    if engine.world_size != 1 {
        return not_yet(format!(
            "world size {} (tensor × pipeline parallel): the scheduler half looks up one rank's chunks only",
            engine.world_size
        ));
    }
    if transfer.connector_kind()? != ConnectorKind::Lmcache {
        return not_yet("kvrelay.vllm implements LMCache's connector semantics only".into());
    }
    let mut effective = lmcache.clone();
    transfer.apply_lmcache_overrides(&mut effective)?;
    if effective.remote_url.is_some() {
        return not_yet(
            "remote_url: the remote tier holds LMCache's KV_2LTD chunks, which LMCache reads too, and vLLM CPU's ISA-packed blocks are not in that format"
                .into(),
        );
    }
    if effective.save_decode_cache {
        return not_yet(
            "save_decode_cache: the scheduler half is handed prompt tokens only, not generated ones"
                .into(),
        );
    }
    let process_local_only = if effective.enable_pd {
        effective.pd_role == Some(PdRole::Receiver)
    } else {
        effective.local_disk_path().is_none()
            && effective.local_cpu
            && effective.max_local_cpu_size > 0.0
    };
    if engine.device_type != CPU_DEVICE {
        return Ok(process_local_only);
    }
    // vLLM CPU packs each block for its attention ISA: chunks must be whole blocks.
    let why = "vLLM CPU packs each KV block for its attention kernel's instruction set, so kvrelay moves whole blocks only";
    if !effective.chunk_size.is_multiple_of(engine.block_size) {
        return Err(ConfigError::Invalid {
            reason: format!(
                "chunk_size {} is not a multiple of vLLM's block_size {}: {why}",
                effective.chunk_size, engine.block_size
            ),
        }
        .into());
    }
    let discards_partial =
        transfer.kv_connector_extra_config.discard_partial_chunks || !effective.save_unfull_chunk;
    if transfer.is_producer() && !discards_partial {
        return Err(ConfigError::Invalid {
            reason: format!(
                "save_unfull_chunk: true saves a prompt's trailing partial chunk, which ends inside a block: {why}; set save_unfull_chunk: false"
            ),
        }
        .into());
    }
    Ok(process_local_only)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::engine;

    const PRODUCER: &str = r#"{"kv_connector":"KvrelayConnector","kv_connector_module_path":"kvrelay.vllm","kv_role":"kv_producer"}"#;

    fn build_with(
        engine: &VllmEngine,
        transfer: &str,
        yaml: &str,
    ) -> Result<Connector, AdapterError> {
        build_half_with(engine, transfer, yaml, Half::Scheduler).map(|built| built.connector)
    }

    fn build_half_with(
        engine: &VllmEngine,
        transfer: &str,
        yaml: &str,
        half: Half,
    ) -> Result<BuiltHalf, AdapterError> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("lmcache.yaml");
        let yaml = yaml.replace("DISK", &dir.path().join("disk").display().to_string());
        std::fs::write(&file, yaml).unwrap();
        let env = [
            (
                "LMCACHE_CONFIG_FILE".to_string(),
                file.display().to_string(),
            ),
            (
                DIR_ENV.to_string(),
                dir.path().join("lookup").display().to_string(),
            ),
        ];
        // No test keeps a lookup server running past `dir`.
        build_half(engine, transfer, env, half)
    }

    fn refusal(engine: &VllmEngine, transfer: &str, yaml: &str) -> String {
        match build_with(engine, transfer, yaml) {
            Ok(_) => panic!("{yaml} was accepted"),
            Err(e) => e.to_string(),
        }
    }

    const DISK: &str =
        "chunk_size: 256\nlocal_cpu: false\nlocal_disk: \"file://DISK\"\nmax_local_disk_size: 1\n";

    #[test]
    fn a_shared_disk_config_builds_both_halves() {
        let connector = build_with(&engine(), PRODUCER, DISK).unwrap();
        assert_eq!(connector.tiers.tiers().len(), 1);
        // The seed's layout: CPU tier in front of the shared disk.
        let both = PRODUCER.replace("kv_producer", "kv_both");
        let seed = DISK.replace("local_cpu: false", "local_cpu: true\nmax_local_cpu_size: 1");
        assert_eq!(
            build_with(&engine(), &both, &seed)
                .unwrap()
                .tiers
                .tiers()
                .len(),
            2
        );
    }

    const PD: &str = "chunk_size: 256\nlocal_cpu: false\nenable_pd: true\npd_role: ROLE\npd_buffer_size: 1000000\npd_buffer_device: cpu\npd_peer_host: localhost\npd_peer_init_port: [PORT]\npd_peer_alloc_port: [PORT]\npd_proxy_host: localhost\npd_proxy_port: 7500\ntransfer_channel: tcp\n";

    /// A CPU tier alone lives in the worker: its worker half serves it on the lookup
    /// channel, its scheduler half allocates no CPU tier and asks through the channel,
    /// whose name comes from lmcache_rpc_port or engine_id.
    #[test]
    fn a_cpu_tier_alone_is_served_to_the_scheduler_on_the_lookup_channel() {
        let cpu_only = "chunk_size: 256\nlocal_cpu: true\nmax_local_cpu_size: 1\n";
        let named = PRODUCER.replace(r#""kv_role""#, r#""engine_id":"e1","kv_role""#);
        let worker = build_half_with(&engine(), &named, cpu_only, Half::Worker).unwrap();
        assert!(worker.lookup_server.is_some());
        assert_eq!(worker.connector.tiers.tiers()[0].name(), "cpu");
        let scheduler = build_half_with(&engine(), &named, cpu_only, Half::Scheduler).unwrap();
        assert!(scheduler.lookup_server.is_none());
        let tiers = scheduler.connector.tiers.tiers();
        assert_eq!(tiers.len(), 1);
        assert_eq!(tiers[0].name(), "worker tiers (lookup channel)");
        let message = refusal(&engine(), PRODUCER, cpu_only);
        assert!(
            message.contains("CPU tier alone") && message.contains("engine_id"),
            "{message}"
        );
        // No tier at all is still the config's error, not the channel's.
        let message = refusal(&engine(), PRODUCER, "chunk_size: 256\nlocal_cpu: false\n");
        assert!(message.contains("no storage tier"), "{message}");
    }

    /// A PD sender builds in both processes (it sends from the worker); a receiver's
    /// scheduler half binds no port and looks up through the lookup channel, whose name
    /// comes from lmcache_rpc_port or engine_id.
    #[test]
    fn pd_halves_build_and_the_receivers_scheduler_binds_nothing() {
        let sender = PD.replace("ROLE", "sender").replace("PORT", "7300");
        let discarding = PRODUCER.replace(
            r#""kv_role""#,
            r#""kv_connector_extra_config":{"discard_partial_chunks":true},"kv_role""#,
        );
        let built = build_half_with(&engine(), &discarding, &sender, Half::Worker).unwrap();
        assert!(built.lookup_server.is_none());
        // A port taken by someone else: the scheduler half must not try to bind it.
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port().to_string();
        let receiver = PD
            .replace("ROLE", "receiver")
            .replace("PORT", &port)
            .replace("localhost", "127.0.0.1");
        let consumer = r#"{"kv_connector":"KvrelayConnector","kv_role":"kv_consumer","engine_id":"e1","kv_connector_extra_config":{"skip_last_n_tokens":1}}"#;
        let built = build_half_with(&engine(), consumer, &receiver, Half::Scheduler).unwrap();
        assert!(built.lookup_server.is_none() && built.connector.pd_receiver.is_none());
        let tiers = built.connector.tiers.tiers();
        assert_eq!(tiers.len(), 1);
        assert_eq!(tiers[0].name(), "worker tiers (lookup channel)");
        // Its worker half does bind, and so fails on the taken port.
        let error = build_half_with(&engine(), consumer, &receiver, Half::Worker)
            .err()
            .unwrap();
        assert!(error.to_string().contains(&port), "{error}");
        let anonymous = consumer.replace(r#""engine_id":"e1","#, "");
        let error = build_half_with(&engine(), &anonymous, &receiver, Half::Scheduler)
            .err()
            .unwrap();
        // A config error, which Python gets as KvrelayConfigError.
        assert!(
            matches!(&error, AdapterError::Config(_)) && error.to_string().contains("engine_id"),
            "{error}"
        );
    }

    #[test]
    fn opaque_blocks_need_whole_block_chunks() {
        let message = refusal(&engine(), PRODUCER, &DISK.replace("256", "200"));
        assert!(
            message.contains("chunk_size 200 is not a multiple of vLLM's block_size 128"),
            "{message}"
        );
        let unfull = format!("{DISK}save_unfull_chunk: true\n");
        let message = refusal(&engine(), PRODUCER, &unfull);
        assert!(message.contains("save_unfull_chunk"), "{message}");
        // A consumer saves nothing, and discard_partial_chunks drops the tail: both fine.
        let consumer = PRODUCER.replace("kv_producer", "kv_consumer");
        build_with(&engine(), &consumer, &unfull).unwrap();
        let discarding = PRODUCER.replace(
            r#""kv_role""#,
            r#""kv_connector_extra_config":{"discard_partial_chunks":true},"kv_role""#,
        );
        build_with(&engine(), &discarding, &unfull).unwrap();
    }

    #[test]
    fn other_devices_ranks_and_unbuilt_features_are_refused() {
        let mut cuda = engine();
        cuda.device_type = "cuda".into();
        assert!(refusal(&cuda, PRODUCER, DISK).contains("device 'cuda'"));
        let mut tp2 = engine();
        tp2.world_size = 2;
        assert!(refusal(&tp2, PRODUCER, DISK).contains("world size 2"));
        let message = refusal(
            &engine(),
            PRODUCER,
            &format!("{DISK}save_decode_cache: true\n"),
        );
        assert!(message.contains("save_decode_cache"), "{message}");
        let redis = format!("{DISK}remote_url: redis://localhost:6379\n");
        assert!(refusal(&engine(), PRODUCER, &redis).contains("remote_url"));
        let mut bad_dtype = engine();
        bad_dtype.kv_dtype = "complex64".into();
        assert!(refusal(&bad_dtype, PRODUCER, DISK).contains("complex64"));
    }

    #[test]
    fn config_errors_are_the_strict_parsers() {
        let typo = PRODUCER.replace("kv_role", "kv_rolle");
        assert!(refusal(&engine(), &typo, DISK).contains("did you mean 'kv_role'"));
        let message = refusal(&engine(), PRODUCER, &format!("{DISK}chunck_size: 256\n"));
        assert!(message.contains("did you mean 'chunk_size'"), "{message}");
    }
}
