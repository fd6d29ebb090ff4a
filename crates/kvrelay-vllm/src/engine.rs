//! Builds the kvrelay connector for one vLLM process from vLLM's `kv_transfer_config` and
//! LMCache's config (`LMCACHE_CONFIG_FILE` and `LMCACHE_*`), with the same strict parsing
//! as everywhere else, and refuses what vLLM's two processes cannot share yet.

use std::sync::Arc;

use kvrelay::config::{ConfigError, ConnectorKind, KvTransferConfig, LmcacheConfig};
use kvrelay::connector::{build_connector, Connector, ConnectorError, EngineIdentity};
use kvrelay::device::HostDevice;
use kvrelay::layout::{AttentionKind, KvCacheSpec};
use kvrelay::KvDtype;

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
}

/// The device whose KV cache vLLM's CPU build hands over; the only one moved so far.
const CPU_DEVICE: &str = "cpu";

/// Why process-local tiers are refused: vLLM asks the scheduler process for hits while the
/// data would sit in a worker process.
const NEEDS_LOOKUP_CHANNEL: &str = "vLLM runs the connector's scheduler half (which answers lookups) in the EngineCore process and its worker half (which holds process-local tiers) in a Worker process; lookups into process-local tiers need the scheduler-to-worker lookup channel, which is not built yet";

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
/// `LMCACHE_CONFIG_FILE` and the `LMCACHE_*` variables are read as LMCache reads them.
/// The scheduler half uses the result's `scheduler`, the worker half its `worker`.
pub fn build_half(
    engine: &VllmEngine,
    kv_transfer_config_json: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Connector, AdapterError> {
    let transfer = KvTransferConfig::from_json_str(kv_transfer_config_json)?;
    let lmcache = LmcacheConfig::load_with_env(env)?;
    check_supported(engine, &transfer, &lmcache)?;
    let identity = EngineIdentity {
        model: engine.model.clone(),
        world_size: engine.world_size,
        worker_id: engine.rank,
    };
    Ok(build_connector(
        &transfer,
        &lmcache,
        &identity,
        engine.spec()?,
        Arc::new(HostDevice),
    )?)
}

/// Refuses configurations this first slice of the vLLM adapter cannot run correctly.
fn check_supported(
    engine: &VllmEngine,
    transfer: &KvTransferConfig,
    lmcache: &LmcacheConfig,
) -> Result<(), AdapterError> {
    let not_yet = |what: String| Err(AdapterError::NotYetSupported(what));
    if engine.device_type != CPU_DEVICE {
        return not_yet(format!(
            "vLLM on device '{}': only vLLM's CPU build (device 'cpu') is supported so far",
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
    if effective.enable_pd {
        return not_yet(format!(
            "LMCache PD (enable_pd): a decoder's PD buffer is process-local. {NEEDS_LOOKUP_CHANNEL}"
        ));
    }
    if effective.remote_url.is_some() {
        return not_yet(
            "remote_url: the remote tier holds LMCache's KV_2LTD chunks, which LMCache reads too, and vLLM CPU's ISA-packed blocks are not in that format"
                .into(),
        );
    }
    if effective.local_disk_path().is_none() {
        return not_yet(format!(
            "no shared tier is configured (set local_disk, which every process can open). {NEEDS_LOOKUP_CHANNEL}"
        ));
    }
    if effective.enable_async_loading {
        return not_yet(
            "enable_async_loading: asynchronous loads are not wired to vLLM's WAITING_FOR_REMOTE_KVS state yet"
                .into(),
        );
    }
    if effective.save_decode_cache {
        return not_yet(
            "save_decode_cache: the scheduler half is handed prompt tokens only, not generated ones"
                .into(),
        );
    }
    // The only device so far, vLLM CPU, packs each block for its attention ISA: chunks
    // must be whole blocks.
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
    Ok(())
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
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("lmcache.yaml");
        let yaml = yaml.replace("DISK", &dir.path().join("disk").display().to_string());
        std::fs::write(&file, yaml).unwrap();
        let env = [(
            "LMCACHE_CONFIG_FILE".to_string(),
            file.display().to_string(),
        )];
        build_half(engine, transfer, env)
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

    #[test]
    fn process_local_configs_are_refused_naming_the_lookup_channel() {
        let cpu_only = "chunk_size: 256\nlocal_cpu: true\nmax_local_cpu_size: 1\n";
        let message = refusal(&engine(), PRODUCER, cpu_only);
        assert!(
            message.contains("no shared tier") && message.contains("lookup channel"),
            "{message}"
        );
        let pd = "chunk_size: 256\nlocal_cpu: false\nenable_pd: true\npd_role: sender\npd_buffer_size: 1000000\npd_buffer_device: cpu\npd_peer_host: localhost\npd_peer_init_port: [7300]\npd_peer_alloc_port: [7400]\npd_proxy_host: localhost\npd_proxy_port: 7500\ntransfer_channel: tcp\n";
        let message = refusal(&engine(), PRODUCER, pd);
        assert!(
            message.contains("enable_pd") && message.contains("lookup channel"),
            "{message}"
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
        for key in ["enable_async_loading", "save_decode_cache"] {
            let message = refusal(&engine(), PRODUCER, &format!("{DISK}{key}: true\n"));
            assert!(message.contains(key), "{message}");
        }
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
