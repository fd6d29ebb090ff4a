//! Each step's [`ConnectorMetadata`] as bytes: vLLM pickles the metadata object from the
//! EngineCore process to each Worker process, so the Python shell carries these bytes.
//! The encoding is JSON (one object per step, chunk keys in LMCache's key-string form),
//! versioned so a worker never guesses at bytes from another kvrelay.

use kvrelay::connector::{ChunkTransfer, ConnectorMetadata, RequestTransfer};
use kvrelay::keys::CacheKey;
use kvrelay::plan::ChunkWindow;
use serde::{Deserialize, Serialize};

/// Bumped whenever the encoding changes. 3: requests carry `pd_plan`.
const VERSION: u32 = 3;

/// Bytes that are not metadata of this kvrelay.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MetadataError {
    #[error("connector metadata is not valid: {0}")]
    Malformed(String),
    #[error("connector metadata has version {found}, this kvrelay reads version {VERSION}; run one kvrelay version in every vLLM process")]
    Version { found: u32 },
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireMetadata {
    version: u32,
    requests: Vec<WireRequest>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireRequest {
    id: String,
    block_ids: Vec<u32>,
    loads: Vec<WireChunk>,
    load_async: bool,
    saves: Vec<WireChunk>,
    flush_saves: bool,
    pd_plan: Vec<WireChunk>,
    prompt_tokens: usize,
    kv_transfer_params: Option<serde_json::Value>,
}

/// A chunk as `[key, start, tokens, skip_leading]`.
#[derive(Serialize, Deserialize)]
struct WireChunk(String, usize, usize, usize);

fn to_wire(chunks: &[ChunkTransfer]) -> Vec<WireChunk> {
    chunks
        .iter()
        .map(|c| {
            let w = c.window;
            WireChunk(c.key.to_string(), w.start, w.tokens, w.skip_leading)
        })
        .collect()
}

fn from_wire(chunks: Vec<WireChunk>) -> Result<Vec<ChunkTransfer>, MetadataError> {
    chunks
        .into_iter()
        .map(|WireChunk(key, start, tokens, skip_leading)| {
            let key: CacheKey = key
                .parse()
                .map_err(|e| MetadataError::Malformed(format!("chunk key {key:?}: {e}")))?;
            Ok(ChunkTransfer {
                key,
                window: ChunkWindow {
                    start,
                    tokens,
                    skip_leading,
                },
            })
        })
        .collect()
}

/// Encodes one step's metadata.
pub fn encode(metadata: &ConnectorMetadata) -> Vec<u8> {
    let wire = WireMetadata {
        version: VERSION,
        requests: metadata
            .requests
            .iter()
            .map(|r| WireRequest {
                id: r.request_id.clone(),
                block_ids: r.block_ids.clone(),
                loads: to_wire(&r.loads),
                load_async: r.load_async,
                saves: to_wire(&r.saves),
                flush_saves: r.flush_saves,
                pd_plan: to_wire(&r.pd_plan),
                prompt_tokens: r.prompt_tokens,
                kv_transfer_params: r.kv_transfer_params.clone(),
            })
            .collect(),
    };
    serde_json::to_vec(&wire).expect("metadata of strings, integers and JSON values serializes")
}

/// Decodes what [`encode`] produced.
pub fn decode(bytes: &[u8]) -> Result<ConnectorMetadata, MetadataError> {
    let wire: WireMetadata =
        serde_json::from_slice(bytes).map_err(|e| MetadataError::Malformed(e.to_string()))?;
    if wire.version != VERSION {
        return Err(MetadataError::Version {
            found: wire.version,
        });
    }
    let requests = wire
        .requests
        .into_iter()
        .map(|r| {
            Ok(RequestTransfer {
                request_id: r.id,
                block_ids: r.block_ids,
                loads: from_wire(r.loads)?,
                load_async: r.load_async,
                saves: from_wire(r.saves)?,
                flush_saves: r.flush_saves,
                pd_plan: from_wire(r.pd_plan)?,
                prompt_tokens: r.prompt_tokens,
                kv_transfer_params: r.kv_transfer_params,
            })
        })
        .collect::<Result<_, MetadataError>>()?;
    Ok(ConnectorMetadata { requests })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvrelay::KvDtype;

    fn chunk(hash: u64, start: usize, skip_leading: usize) -> ChunkTransfer {
        ChunkTransfer {
            key: CacheKey::new("/models/tiny", 1, 0, hash, KvDtype::F32).unwrap(),
            window: ChunkWindow {
                start,
                tokens: 256,
                skip_leading,
            },
        }
    }

    #[test]
    fn metadata_round_trips() {
        let metadata = ConnectorMetadata {
            requests: vec![
                RequestTransfer {
                    request_id: "cmpl-1-0".into(),
                    block_ids: vec![1, 2, 7],
                    loads: vec![chunk(0xfeed, 0, 128), chunk(u64::MAX, 256, 0)],
                    load_async: false,
                    saves: vec![],
                    flush_saves: false,
                    pd_plan: vec![],
                    prompt_tokens: 300,
                    kv_transfer_params: None,
                },
                RequestTransfer {
                    request_id: "cmpl-2-0".into(),
                    block_ids: vec![3],
                    loads: vec![],
                    load_async: true,
                    saves: vec![chunk(7, 0, 0)],
                    flush_saves: false,
                    pd_plan: vec![chunk(7, 0, 0), chunk(8, 256, 0)],
                    prompt_tokens: 17,
                    kv_transfer_params: Some(serde_json::json!({"ret_first_tok": true})),
                },
            ],
        };
        assert_eq!(decode(&encode(&metadata)).unwrap(), metadata);
        let empty = ConnectorMetadata::default();
        assert_eq!(decode(&encode(&empty)).unwrap(), empty);
    }

    #[test]
    fn foreign_bytes_are_errors() {
        assert!(matches!(
            decode(b"\x80\x04pickle"),
            Err(MetadataError::Malformed(_))
        ));
        assert!(matches!(
            decode(br#"{"version":2,"requests":[]}"#),
            Err(MetadataError::Version { found: 2 })
        ));
        let bad_key = br#"{"version":3,"requests":[{"id":"r","block_ids":[],"loads":[],"load_async":false,"saves":[],"flush_saves":false,"pd_plan":[["not a key",0,1,0]],"prompt_tokens":3,"kv_transfer_params":null}]}"#;
        let message = decode(bad_key).unwrap_err().to_string();
        assert!(message.contains("not a key"), "{message}");
        assert!(matches!(
            decode(br#"{"version":3,"requests":[],"extra":0}"#),
            Err(MetadataError::Malformed(_))
        ));
    }
}
