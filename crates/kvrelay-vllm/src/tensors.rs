//! Recognizes the KV cache tensors vLLM hands to `register_kv_caches`. The Python shell
//! reads each tensor's data pointer, shape, strides, dtype and device and passes plain
//! values; this module decides which kvrelay layout they are, or refuses them with what
//! it saw.
//!
//! Known so far: vLLM CPU's `CPU_ATTN` cache, each layer `[num_blocks, num_kv_heads,
//! block_size, 2 * head_size]`, contiguous. Inside a block the bytes are packed for the
//! attention kernel's instruction set, so it maps to an opaque-block layout.

use std::fmt;

use kvrelay::device::Region;
use kvrelay::layout::{BlockPacking, CpuAttnIsa, KvCacheSpec, KvLayout, LayoutKind};
use kvrelay::KvDtype;

/// One registered tensor as the Python shell describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// vLLM's layer name, e.g. `model.layers.3.self_attn.attn`.
    pub name: String,
    /// `tensor.device.type`: `cpu`, `cuda`, `npu`, ...
    pub device: String,
    /// `str(tensor.dtype)` without the `torch.` prefix: `float32`, `bfloat16`, ...
    pub dtype: String,
    pub element_size: usize,
    pub shape: Vec<usize>,
    /// In elements, as `tensor.stride()` gives them.
    pub strides: Vec<usize>,
    /// `tensor.data_ptr()`: the address of element 0.
    pub data_ptr: u64,
    /// The attention backend of the layer (`attn_backend.get_name()`), e.g. `CPU_ATTN`.
    pub backend: String,
}

impl fmt::Display for TensorInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: shape {:?}, strides {:?}, dtype {}, device {}, backend {}",
            self.name, self.shape, self.strides, self.dtype, self.device, self.backend
        )
    }
}

/// KV cache tensors kvrelay cannot move.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TensorError {
    #[error("register_kv_caches got no KV cache tensors")]
    NoTensors,
    #[error("KV cache tensor {seen} is on device '{device}', which kvrelay's vLLM connector does not support: it moves vLLM CPU's KV cache (device 'cpu') only so far")]
    UnsupportedDevice { seen: String, device: String },
    #[error("KV cache tensor {seen} is not a layout kvrelay knows: expected vLLM CPU's CPU_ATTN layout, contiguous [num_blocks, num_kv_heads, block_size, 2 * head_size]")]
    UnknownLayout { seen: String },
    #[error(
        "KV cache tensor {seen} does not match the engine vLLM's config describes ({expected})"
    )]
    Mismatch { seen: String, expected: String },
    #[error("KV cache layer name {0:?} does not hold exactly one layer index (as in model.layers.3.self_attn.attn)")]
    LayerName(String),
    #[error("KV cache layers {found:?} are not the layers 0..{num_layers} the model has")]
    Layers {
        found: Vec<usize>,
        num_layers: usize,
    },
    #[error("KV cache tensors {first} and {second} overlap in memory")]
    Overlap { first: String, second: String },
    #[error("vLLM CPU attention ISA {isa:?} is not known to kvrelay: {reason}")]
    UnknownIsa { isa: String, reason: String },
    #[error("the vLLM connector did not name the CPU attention ISA its KV blocks are packed for")]
    NoIsa,
}

/// The layout and one memory region per layer (in layer order) that `tensors` hold.
#[derive(Debug)]
pub struct RecognizedKv {
    pub layout: KvLayout,
    pub regions: Vec<Region>,
}

/// The attention backend whose cache this module recognizes.
const CPU_ATTN: &str = "CPU_ATTN";

/// Recognizes vLLM CPU's `CPU_ATTN` cache for an engine of geometry `expected`, packed
/// for the attention ISA vLLM chose (`isa`, from `cpu_attn._get_attn_isa`; the shell
/// asks only when every tensor is on the CPU).
pub fn recognize_kv_caches(
    tensors: &[TensorInfo],
    isa: Option<&str>,
    expected: &KvCacheSpec,
) -> Result<RecognizedKv, TensorError> {
    if tensors.is_empty() {
        return Err(TensorError::NoTensors);
    }
    let mut layers = Vec::with_capacity(tensors.len());
    for tensor in tensors {
        if tensor.device != "cpu" {
            return Err(TensorError::UnsupportedDevice {
                seen: tensor.to_string(),
                device: tensor.device.clone(),
            });
        }
        if tensor.backend != CPU_ATTN {
            return Err(TensorError::UnknownLayout {
                seen: tensor.to_string(),
            });
        }
        check_cpu_attn_tensor(tensor, expected)?;
        layers.push((layer_index(&tensor.name)?, tensor));
    }
    layers.sort_by_key(|(index, _)| *index);
    let found: Vec<usize> = layers.iter().map(|(index, _)| *index).collect();
    if !found.iter().copied().eq(0..expected.num_layers) {
        return Err(TensorError::Layers {
            found,
            num_layers: expected.num_layers,
        });
    }
    let isa = isa.ok_or(TensorError::NoIsa)?;
    let isa: CpuAttnIsa = isa.parse().map_err(|e| TensorError::UnknownIsa {
        isa: isa.to_string(),
        reason: format!("{e}"),
    })?;
    let kind = LayoutKind::OpaqueBlocks(BlockPacking::CpuAttn(isa));
    let layout = KvLayout::new(*expected, kind).map_err(|e| TensorError::Mismatch {
        seen: layers[0].1.to_string(),
        expected: e.to_string(),
    })?;
    let regions: Vec<Region> = layers
        .iter()
        .map(|(_, t)| Region {
            addr: t.data_ptr,
            len: layout.buffer_bytes(),
        })
        .collect();
    check_disjoint(&layers, layout.buffer_bytes())?;
    Ok(RecognizedKv { layout, regions })
}

/// `[num_blocks, num_kv_heads, block_size, 2 * head_size]`, contiguous, of the engine's
/// geometry and element type.
fn check_cpu_attn_tensor(tensor: &TensorInfo, expected: &KvCacheSpec) -> Result<(), TensorError> {
    let unknown = || TensorError::UnknownLayout {
        seen: tensor.to_string(),
    };
    let &[blocks, heads, block_size, cell] = tensor.shape.as_slice() else {
        return Err(unknown());
    };
    let contiguous = [heads * block_size * cell, block_size * cell, cell, 1];
    if tensor.strides != contiguous {
        return Err(unknown());
    }
    let dtype: Option<KvDtype> = tensor.dtype.parse().ok();
    let wanted = [
        expected.num_blocks,
        expected.num_kv_heads,
        expected.block_size,
        2 * expected.head_size,
    ];
    if [blocks, heads, block_size, cell] != wanted
        || dtype != Some(expected.dtype)
        || tensor.element_size != expected.dtype.size_bytes()
    {
        return Err(TensorError::Mismatch {
            seen: tensor.to_string(),
            expected: format!("shape {wanted:?}, dtype {}", expected.dtype),
        });
    }
    Ok(())
}

/// The one integer component of a dotted layer name (vLLM's `extract_layer_index`).
fn layer_index(name: &str) -> Result<usize, TensorError> {
    let mut numbers = name
        .split('.')
        .filter_map(|part| part.parse::<usize>().ok());
    match (numbers.next(), numbers.next()) {
        (Some(index), None) => Ok(index),
        _ => Err(TensorError::LayerName(name.to_string())),
    }
}

/// Layers must not share bytes: a load into one would overwrite another.
fn check_disjoint(layers: &[(usize, &TensorInfo)], len: usize) -> Result<(), TensorError> {
    let mut by_address: Vec<&TensorInfo> = layers.iter().map(|(_, t)| *t).collect();
    by_address.sort_by_key(|t| t.data_ptr);
    for pair in by_address.windows(2) {
        if pair[0].data_ptr.saturating_add(len as u64) > pair[1].data_ptr {
            return Err(TensorError::Overlap {
                first: pair[0].name.clone(),
                second: pair[1].name.clone(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::engine;

    /// The tensors vLLM CPU registers for `engine()`: views into one buffer, layer-outermost.
    fn cpu_attn_tensors() -> Vec<TensorInfo> {
        let spec = engine().spec().unwrap();
        let (nb, h, bs, c) = (
            spec.num_blocks,
            spec.num_kv_heads,
            spec.block_size,
            2 * spec.head_size,
        );
        let layer_bytes = (nb * h * bs * c * 4) as u64;
        // vLLM's dict order need not be layer order.
        [1usize, 0]
            .into_iter()
            .map(|layer| TensorInfo {
                name: format!("model.layers.{layer}.self_attn.attn"),
                device: "cpu".into(),
                dtype: "float32".into(),
                element_size: 4,
                shape: vec![nb, h, bs, c],
                strides: vec![h * bs * c, bs * c, c, 1],
                data_ptr: 0x1000_0000 + layer as u64 * layer_bytes,
                backend: "CPU_ATTN".into(),
            })
            .collect()
    }

    #[test]
    fn cpu_attn_layers_become_opaque_blocks_in_layer_order() {
        let spec = engine().spec().unwrap();
        let kv = recognize_kv_caches(&cpu_attn_tensors(), Some("vec"), &spec).unwrap();
        assert_eq!(
            kv.layout.kind(),
            LayoutKind::OpaqueBlocks(BlockPacking::CpuAttn(CpuAttnIsa::Vec))
        );
        let layer_bytes = 16 * 4 * 128 * 64 * 4;
        assert_eq!(kv.layout.buffer_bytes(), layer_bytes);
        let addrs: Vec<u64> = kv.regions.iter().map(|r| r.addr).collect();
        assert_eq!(addrs, [0x1000_0000, 0x1000_0000 + layer_bytes as u64]);
        let amx = recognize_kv_caches(&cpu_attn_tensors(), Some("amx"), &spec).unwrap();
        assert_ne!(
            amx.layout.chunk_fingerprint(),
            kv.layout.chunk_fingerprint()
        );
    }

    fn refusal(tensors: &[TensorInfo], isa: Option<&str>) -> String {
        let spec = engine().spec().unwrap();
        recognize_kv_caches(tensors, isa, &spec)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn cuda_tensors_are_refused_saying_what_was_seen() {
        let mut tensors = cpu_attn_tensors();
        tensors[1].device = "cuda".into();
        let message = refusal(&tensors, Some("vec"));
        assert!(message.contains("device 'cuda'"), "{message}");
        assert!(
            message.contains("model.layers.0.self_attn.attn: shape [16, 4, 128, 64]"),
            "{message}"
        );
    }

    #[test]
    fn unknown_layouts_are_refused_saying_what_was_seen() {
        // vLLM's GPU FlashAttention layout, [2, num_blocks, block_size, heads, head_size].
        let mut flash = cpu_attn_tensors();
        for t in &mut flash {
            t.shape = vec![2, 16, 128, 4, 32];
            t.strides = vec![16 * 128 * 4 * 32, 128 * 4 * 32, 4 * 32, 32, 1];
        }
        let message = refusal(&flash, Some("vec"));
        assert!(message.contains("not a layout kvrelay knows"), "{message}");
        assert!(message.contains("shape [2, 16, 128, 4, 32]"), "{message}");
        // The right shape, but not contiguous (a permuted view).
        let mut permuted = cpu_attn_tensors();
        permuted[0].strides = vec![4 * 128 * 64, 64, 4 * 64, 1];
        assert!(refusal(&permuted, Some("vec")).contains("strides [32768, 64, 256, 1]"));
        // The right tensors behind another attention backend.
        let mut other_backend = cpu_attn_tensors();
        other_backend[0].backend = "FLASH_ATTN".into();
        let message = refusal(&other_backend, Some("vec"));
        assert!(
            message.contains("backend FLASH_ATTN") && message.contains("not a layout"),
            "{message}"
        );
    }

    #[test]
    fn tensors_of_another_geometry_names_or_isa_are_refused() {
        let mut wrong_heads = cpu_attn_tensors();
        wrong_heads[0].shape[1] = 8;
        wrong_heads[0].strides = vec![8 * 128 * 64, 128 * 64, 64, 1];
        assert!(refusal(&wrong_heads, Some("vec")).contains("does not match the engine"));
        let mut wrong_dtype = cpu_attn_tensors();
        wrong_dtype[0].dtype = "bfloat16".into();
        wrong_dtype[0].element_size = 2;
        assert!(refusal(&wrong_dtype, Some("vec")).contains("dtype bfloat16"));
        let mut unnamed = cpu_attn_tensors();
        unnamed[0].name = "attn".into();
        assert!(refusal(&unnamed, Some("vec")).contains("\"attn\""));
        let mut missing = cpu_attn_tensors();
        missing.pop();
        assert!(refusal(&missing, Some("vec")).contains("are not the layers 0..2"));
        let mut overlapping = cpu_attn_tensors();
        overlapping[0].data_ptr = overlapping[1].data_ptr + 4096;
        assert!(refusal(&overlapping, Some("vec")).contains("overlap"));
        assert!(refusal(&cpu_attn_tensors(), Some("avx9")).contains("avx9"));
        assert!(matches!(
            recognize_kv_caches(&[], Some("vec"), &engine().spec().unwrap()),
            Err(TensorError::NoTensors)
        ));
    }
}
