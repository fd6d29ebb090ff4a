//! Recognizes the KV cache tensors vLLM hands to `register_kv_caches`. The Python shell
//! reads each tensor's data pointer, shape, strides, dtype and device and passes plain
//! values; this module decides which kvrelay layout they are, on which device, or refuses
//! them with what it saw. Per layer, with the engine's geometry (`NB` blocks of `BS`
//! tokens, `H` KV heads of `D` elements), and strides in elements:
//!
//! | registered per layer | backend | layout |
//! |---|---|---|
//! | `[NB, H, BS, 2D]`, contiguous | `CPU_ATTN` (vLLM CPU) | opaque blocks packed for the ISA |
//! | `[2, NB, BS, H, D]`, contiguous | not FlashInfer / Triton | `flash_attn_nhd` |
//! | `[2, NB, BS, H, D]`, strides of `[2, NB, H, BS, D]` | not FlashInfer / Triton | `flash_attn_hnd` |
//! | `[NB, 2, BS, H, D]`, contiguous | not FlashAttention | `flash_infer_nhd` |
//! | `[NB, 2, BS, H, D]`, strides of `[NB, 2, H, BS, D]` | not FlashAttention | `flash_infer_hnd` |
//! | `(K, V)`, each `[NB, BS, H, D]`, contiguous | any (vllm-ascend) | `ascend_separate_kv` |
//! | `[2, NB, H, 1, BS, D]`, contiguous | any (vllm-rbln) | `rbln_kv_first` |
//! | `[NB, 2, H, 1, BS, D]`, contiguous | any (vllm-rbln) | `rbln_blocks_first` |
//!
//! Sources: vLLM's `FlashAttentionBackend` / `FlashInferBackend.get_kv_cache_shape` and
//! `get_kv_cache_stride_order` (HND keeps the logical shape and permutes the strides), and
//! `../shared/reference/vllm_cpu.md` for `CPU_ATTN`; `reference/ascend.md` §4.1
//! (vllm-ascend's `_reshape_kv_cache_tensors`: one `(k_cache, v_cache)` tuple per layer);
//! `reference/rbln.md` §3.1 (`RBLNAttentionBackend.get_kv_cache_shape`, `num_blocks` at
//! axis 1 for the triton kernels, axis 0 for the custom kernels). The stride of a
//! dimension of size 1 is not compared: it addresses no second element.
//!
//! Devices, by `tensor.device.type`: `cpu` is host memory; `npu` is the Ascend device and
//! `rbln` the RBLN device, when kvrelay is built with the `ascend` / `rbln` feature.

use std::fmt;

use kvrelay::device::Region;
use kvrelay::layout::{BlockPacking, CpuAttnIsa, KvCacheSpec, KvLayout, LayoutKind};
use kvrelay::KvDtype;

/// One registered tensor as the Python shell describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// vLLM's layer name, e.g. `model.layers.3.self_attn.attn`.
    pub name: String,
    /// The tensor's place in the layer's `(K, V)` tuple (vllm-ascend), `None` when vLLM
    /// registered one tensor for the layer.
    pub part: Option<usize>,
    /// `tensor.device.type`: `cpu`, `cuda`, `npu`, ...
    pub device: String,
    /// `tensor.device.index`: which NPU (`npu:1` → 1); `None` for host memory.
    pub device_index: Option<u32>,
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
        write!(f, "{}", self.name)?;
        if let Some(part) = self.part {
            write!(f, "[{part}]")?;
        }
        write!(
            f,
            ": shape {:?}, strides {:?}, dtype {}, device {}",
            self.shape, self.strides, self.dtype, self.device
        )?;
        if let Some(index) = self.device_index {
            write!(f, ":{index}")?;
        }
        write!(f, ", backend {}", self.backend)
    }
}

/// Where the registered KV cache lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum KvDevice {
    /// Host memory (`cpu`).
    Host,
    /// Ascend NPU `n` (`npu:n`), in a build with the `ascend` feature.
    Ascend(u32),
    /// RBLN NPU `n` (`rbln:n`), in a build with the `rbln` feature.
    Rbln(u32),
}

/// KV cache tensors kvrelay cannot move.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TensorError {
    #[error("register_kv_caches got no KV cache tensors")]
    NoTensors,
    #[error("KV cache tensor {seen} is on device '{device}', which kvrelay does not support: it moves KV caches on 'cpu', and on 'npu' (Ascend) or 'rbln' when built with the ascend or rbln feature")]
    UnsupportedDevice { seen: String, device: String },
    #[error("KV cache tensor {seen} is on device '{device}', but this kvrelay was built without the {feature} feature")]
    BuiltWithout {
        seen: String,
        device: String,
        feature: &'static str,
    },
    #[error("KV cache tensor {seen} is on another device than {first}")]
    MixedDevices { seen: String, first: String },
    #[error("KV cache tensor {seen} is not a layout kvrelay knows: {why}")]
    UnknownLayout { seen: String, why: String },
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
    #[error("KV cache layers are not all of one layout: {first} is {first_kind}, {other} is {other_kind}")]
    MixedLayouts {
        first: String,
        first_kind: LayoutKind,
        other: String,
        other_kind: LayoutKind,
    },
    #[error("KV cache tensors {first} and {second} overlap in memory")]
    Overlap { first: String, second: String },
    #[error("vLLM CPU attention ISA {isa:?} is not known to kvrelay: {reason}")]
    UnknownIsa { isa: String, reason: String },
    #[error("the vLLM connector did not name the CPU attention ISA its KV blocks are packed for")]
    NoIsa,
}

/// The layout, the device and one memory region per buffer of the layout (in the
/// layout's buffer order: by layer, and K before V where they are separate) that
/// `tensors` hold.
#[derive(Debug)]
pub struct RecognizedKv {
    pub layout: KvLayout,
    pub device: KvDevice,
    pub regions: Vec<Region>,
}

/// The attention backend whose blocks are packed per instruction set.
const CPU_ATTN: &str = "CPU_ATTN";

/// A layer's registered tensors (one, or vllm-ascend's K and V) in the order vLLM gave.
struct Layer<'a> {
    index: usize,
    tensors: Vec<&'a TensorInfo>,
}

/// Recognizes the KV cache of an engine of geometry `expected`. `isa` is the instruction
/// set vLLM CPU packs `CPU_ATTN` blocks for (`cpu_attn._get_attn_isa`), needed only for
/// that backend.
pub fn recognize_kv_caches(
    tensors: &[TensorInfo],
    isa: Option<&str>,
    expected: &KvCacheSpec,
) -> Result<RecognizedKv, TensorError> {
    let first = tensors.first().ok_or(TensorError::NoTensors)?;
    let device = device_of(first)?;
    let mut layers: Vec<Layer<'_>> = Vec::new();
    for tensor in tensors {
        if device_of(tensor)? != device {
            return Err(TensorError::MixedDevices {
                seen: tensor.to_string(),
                first: first.to_string(),
            });
        }
        let index = layer_index(&tensor.name)?;
        match layers.iter_mut().find(|l| l.index == index) {
            Some(layer) => layer.tensors.push(tensor),
            None => layers.push(Layer {
                index,
                tensors: vec![tensor],
            }),
        }
    }
    layers.sort_by_key(|l| l.index);
    let found: Vec<usize> = layers.iter().map(|l| l.index).collect();
    if !found.iter().copied().eq(0..expected.num_layers) {
        return Err(TensorError::Layers {
            found,
            num_layers: expected.num_layers,
        });
    }
    let kinds = layers
        .iter()
        .map(|layer| layer_kind(layer, isa, expected))
        .collect::<Result<Vec<_>, _>>()?;
    for (layer, kind) in layers.iter().zip(&kinds).skip(1) {
        if *kind != kinds[0] {
            return Err(TensorError::MixedLayouts {
                first: layers[0].tensors[0].name.clone(),
                first_kind: kinds[0],
                other: layer.tensors[0].name.clone(),
                other_kind: *kind,
            });
        }
    }
    let layout = KvLayout::new(*expected, kinds[0]).map_err(|e| TensorError::Mismatch {
        seen: first.to_string(),
        expected: e.to_string(),
    })?;
    let buffers: Vec<&TensorInfo> = layers.iter().flat_map(|l| l.tensors.clone()).collect();
    check_disjoint(&buffers, layout.buffer_bytes())?;
    let regions = buffers
        .iter()
        .map(|t| Region {
            addr: t.data_ptr,
            len: layout.buffer_bytes(),
        })
        .collect();
    Ok(RecognizedKv {
        layout,
        device,
        regions,
    })
}

/// The device a tensor's `device.type` and `device.index` name, if this build can move
/// it. An NPU tensor without an index is on NPU 0 (torch gives NPU tensors an index).
fn device_of(tensor: &TensorInfo) -> Result<KvDevice, TensorError> {
    let if_built = |built: bool, feature, device| {
        built.then_some(device).ok_or(TensorError::BuiltWithout {
            seen: tensor.to_string(),
            device: tensor.device.clone(),
            feature,
        })
    };
    let index = tensor.device_index.unwrap_or(0);
    match tensor.device.as_str() {
        "cpu" => Ok(KvDevice::Host),
        "npu" => if_built(cfg!(feature = "ascend"), "ascend", KvDevice::Ascend(index)),
        "rbln" => if_built(cfg!(feature = "rbln"), "rbln", KvDevice::Rbln(index)),
        other => Err(TensorError::UnsupportedDevice {
            seen: tensor.to_string(),
            device: other.to_string(),
        }),
    }
}

/// One layout a layer's tensors may be in: the shape of each tensor over the engine's
/// geometry, and the order in which its dimensions are laid out in memory (outermost
/// first; the identity when contiguous).
struct Candidate {
    kind: LayoutKind,
    tensors: usize,
    shape: Vec<usize>,
    memory_order: [usize; 6],
}

const CONTIGUOUS: [usize; 6] = [0, 1, 2, 3, 4, 5];
/// A 5-D NHD view of an HND buffer: dimensions 2 (tokens) and 3 (heads) swapped.
const HEADS_OUTSIDE_TOKENS: [usize; 6] = [0, 1, 3, 2, 4, 5];

/// The token-addressable layouts a layer of `backend` may be in.
fn candidates(backend: &str, s: &KvCacheSpec) -> Vec<Candidate> {
    let (nb, bs, h, d) = (s.num_blocks, s.block_size, s.num_kv_heads, s.head_size);
    let flashinfer = backend.starts_with("FLASHINFER") || backend.starts_with("TRITON");
    let flash_attn = backend.starts_with("FLASH_ATTN");
    let candidate = |kind, tensors, shape: &[usize], memory_order| Candidate {
        kind,
        tensors,
        shape: shape.to_vec(),
        memory_order,
    };
    let mut all = Vec::new();
    if !flashinfer {
        all.push(candidate(
            LayoutKind::FlashAttnNhd,
            1,
            &[2, nb, bs, h, d],
            CONTIGUOUS,
        ));
        all.push(candidate(
            LayoutKind::FlashAttnHnd,
            1,
            &[2, nb, bs, h, d],
            HEADS_OUTSIDE_TOKENS,
        ));
    }
    if !flash_attn {
        all.push(candidate(
            LayoutKind::FlashInferNhd,
            1,
            &[nb, 2, bs, h, d],
            CONTIGUOUS,
        ));
        all.push(candidate(
            LayoutKind::FlashInferHnd,
            1,
            &[nb, 2, bs, h, d],
            HEADS_OUTSIDE_TOKENS,
        ));
    }
    all.push(candidate(
        LayoutKind::AscendSeparateKv,
        2,
        &[nb, bs, h, d],
        CONTIGUOUS,
    ));
    all.push(candidate(
        LayoutKind::RblnKvFirst,
        1,
        &[2, nb, h, 1, bs, d],
        CONTIGUOUS,
    ));
    all.push(candidate(
        LayoutKind::RblnBlocksFirst,
        1,
        &[nb, 2, h, 1, bs, d],
        CONTIGUOUS,
    ));
    all
}

impl Candidate {
    /// Element strides of a tensor of this shape laid out in `memory_order`.
    fn strides(&self) -> Vec<usize> {
        let order = &self.memory_order[..self.shape.len()];
        let mut strides = vec![0; self.shape.len()];
        let mut step = 1;
        for &dim in order.iter().rev() {
            strides[dim] = step;
            step *= self.shape[dim];
        }
        strides
    }

    fn matches(&self, layer: &Layer<'_>) -> bool {
        let strides = self.strides();
        layer.tensors.len() == self.tensors
            && layer.tensors.iter().all(|t| {
                t.shape == self.shape
                    && t.strides.len() == strides.len()
                    && (0..strides.len()).all(|i| self.shape[i] == 1 || t.strides[i] == strides[i])
            })
    }
}

/// Which layout one layer's tensors are in.
fn layer_kind(
    layer: &Layer<'_>,
    isa: Option<&str>,
    expected: &KvCacheSpec,
) -> Result<LayoutKind, TensorError> {
    let first = layer.tensors[0];
    check_dtype(layer, expected)?;
    if first.backend == CPU_ATTN {
        check_cpu_attn_layer(layer, expected)?;
        let isa = isa.ok_or(TensorError::NoIsa)?;
        let isa: CpuAttnIsa = isa.parse().map_err(|e| TensorError::UnknownIsa {
            isa: isa.to_string(),
            reason: format!("{e}"),
        })?;
        return Ok(LayoutKind::OpaqueBlocks(BlockPacking::CpuAttn(isa)));
    }
    let candidates = candidates(&first.backend, expected);
    let matched: Vec<LayoutKind> = candidates
        .iter()
        .filter(|c| c.matches(layer))
        .map(|c| c.kind)
        .collect();
    match matched.as_slice() {
        [kind] => Ok(*kind),
        [] => Err(TensorError::UnknownLayout {
            seen: describe_layer(layer),
            why: format!(
                "for this engine's geometry and backend {} kvrelay expects one of: {}",
                first.backend,
                candidates
                    .iter()
                    .map(|c| format!("{} {}", c.kind, c.describe()))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        }),
        several => Err(TensorError::UnknownLayout {
            seen: describe_layer(layer),
            why: format!(
                "the shape fits {several:?} alike; backend {} does not tell which",
                first.backend
            ),
        }),
    }
}

impl Candidate {
    /// `shape [..] strides [..]`, or `(K, V) each shape [..] strides [..]`.
    fn describe(&self) -> String {
        let one = format!("shape {:?} strides {:?}", self.shape, self.strides());
        match self.tensors {
            1 => one,
            _ => format!("(K, V) each {one}"),
        }
    }
}

/// Every tensor of a layer, for refusals.
fn describe_layer(layer: &Layer<'_>) -> String {
    layer
        .tensors
        .iter()
        .map(|t| t.to_string())
        .collect::<Vec<_>>()
        .join(" and ")
}

/// The engine's element type, in every tensor of the layer.
fn check_dtype(layer: &Layer<'_>, expected: &KvCacheSpec) -> Result<(), TensorError> {
    for tensor in &layer.tensors {
        let dtype: Option<KvDtype> = tensor.dtype.parse().ok();
        if dtype != Some(expected.dtype) || tensor.element_size != expected.dtype.size_bytes() {
            return Err(TensorError::Mismatch {
                seen: tensor.to_string(),
                expected: format!("dtype {}", expected.dtype),
            });
        }
    }
    Ok(())
}

/// vLLM CPU's cache: one tensor `[num_blocks, num_kv_heads, block_size, 2 * head_size]`,
/// contiguous, of the engine's geometry.
fn check_cpu_attn_layer(layer: &Layer<'_>, expected: &KvCacheSpec) -> Result<(), TensorError> {
    let tensor = layer.tensors[0];
    let unknown = |why: &str| TensorError::UnknownLayout {
        seen: describe_layer(layer),
        why: why.to_string(),
    };
    let expected_shape = "vLLM CPU's CPU_ATTN cache is one contiguous [num_blocks, num_kv_heads, block_size, 2 * head_size] tensor per layer";
    let &[blocks, heads, block_size, cell] = tensor.shape.as_slice() else {
        return Err(unknown(expected_shape));
    };
    if layer.tensors.len() != 1
        || tensor.strides != [heads * block_size * cell, block_size * cell, cell, 1]
    {
        return Err(unknown(expected_shape));
    }
    let wanted = [
        expected.num_blocks,
        expected.num_kv_heads,
        expected.block_size,
        2 * expected.head_size,
    ];
    if [blocks, heads, block_size, cell] != wanted {
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

/// Buffers must not share bytes: a load into one would overwrite another.
fn check_disjoint(buffers: &[&TensorInfo], len: usize) -> Result<(), TensorError> {
    let mut by_address = buffers.to_vec();
    by_address.sort_by_key(|t| t.data_ptr);
    for pair in by_address.windows(2) {
        if pair[0].data_ptr.saturating_add(len as u64) > pair[1].data_ptr {
            return Err(TensorError::Overlap {
                first: pair[0].to_string(),
                second: pair[1].to_string(),
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
                part: None,
                device: "cpu".into(),
                device_index: None,
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

    /// Two layers of `shape` with `strides` (elements), `parts` tensors each, float32 on
    /// `device`, one after another from 0x1000_0000.
    fn layers(
        backend: &str,
        device: &str,
        parts: usize,
        shape: &[usize],
        strides: &[usize],
    ) -> Vec<TensorInfo> {
        let bytes = shape.iter().product::<usize>() as u64 * 4;
        (0..2)
            .flat_map(|layer| (0..parts).map(move |part| (layer, part)))
            .map(|(layer, part)| TensorInfo {
                name: format!("model.layers.{layer}.self_attn.attn"),
                part: (parts > 1).then_some(part),
                device: device.into(),
                device_index: (device != "cpu").then_some(0),
                dtype: "float32".into(),
                element_size: 4,
                shape: shape.to_vec(),
                strides: strides.to_vec(),
                data_ptr: 0x1000_0000 + (layer * parts + part) as u64 * bytes,
                backend: backend.into(),
            })
            .collect()
    }

    /// Contiguous strides of `shape`.
    fn contiguous(shape: &[usize]) -> Vec<usize> {
        let mut strides = vec![1; shape.len()];
        for i in (0..shape.len() - 1).rev() {
            strides[i] = strides[i + 1] * shape[i + 1];
        }
        strides
    }

    fn kind_of(tensors: &[TensorInfo]) -> LayoutKind {
        let kv = recognize_kv_caches(tensors, None, &engine().spec().unwrap()).unwrap();
        assert_eq!(kv.device, KvDevice::Host);
        assert_eq!(kv.regions.len(), kv.layout.num_buffers());
        kv.layout.kind()
    }

    /// The engine: 16 blocks of 128 tokens, 4 heads of 32.
    const NHD: [usize; 5] = [2, 16, 128, 4, 32];

    #[test]
    fn gpu_layouts_are_recognized_from_shape_strides_and_backend() {
        // FlashAttention, [2, NB, BS, H, D]: NHD contiguous; HND is the same logical
        // shape over a [2, NB, H, BS, D] buffer (vLLM's get_kv_cache_stride_order).
        let hnd_strides = [16 * 4 * 128 * 32, 4 * 128 * 32, 32, 128 * 32, 1];
        let flash = layers("FLASH_ATTN", "cpu", 1, &NHD, &contiguous(&NHD));
        assert_eq!(kind_of(&flash), LayoutKind::FlashAttnNhd);
        let flash_hnd = layers("FLASH_ATTN", "cpu", 1, &NHD, &hnd_strides);
        assert_eq!(kind_of(&flash_hnd), LayoutKind::FlashAttnHnd);
        // FlashInfer, [NB, 2, BS, H, D], and its HND view of [NB, 2, H, BS, D].
        let fi = [16, 2, 128, 4, 32];
        let fi_hnd_strides = [2 * 4 * 128 * 32, 4 * 128 * 32, 32, 128 * 32, 1];
        for backend in ["FLASHINFER", "TRITON_ATTN"] {
            let nhd = layers(backend, "cpu", 1, &fi, &contiguous(&fi));
            assert_eq!(kind_of(&nhd), LayoutKind::FlashInferNhd);
            let hnd = layers(backend, "cpu", 1, &fi, &fi_hnd_strides);
            assert_eq!(kind_of(&hnd), LayoutKind::FlashInferHnd);
        }
        // Regions are per layer, in layer order, each the whole layer.
        let kv = recognize_kv_caches(&flash, None, &engine().spec().unwrap()).unwrap();
        let layer_bytes = 2 * 16 * 128 * 4 * 32 * 4;
        assert_eq!(kv.layout.buffer_bytes(), layer_bytes);
        assert_eq!(kv.regions[1].addr, 0x1000_0000 + layer_bytes as u64);
    }

    #[test]
    fn ascend_tuples_and_rbln_layouts_are_recognized() {
        // vllm-ascend: per layer a (K, V) tuple, each [NB, BS, H, D] (reference/ascend.md §4.1).
        let half = [16, 128, 4, 32];
        let ascend = layers("ASCEND", "cpu", 2, &half, &contiguous(&half));
        assert_eq!(kind_of(&ascend), LayoutKind::AscendSeparateKv);
        let kv = recognize_kv_caches(&ascend, None, &engine().spec().unwrap()).unwrap();
        // Buffers K0, V0, K1, V1.
        let plane_bytes = 16 * 128 * 4 * 32 * 4;
        let addrs: Vec<u64> = kv.regions.iter().map(|r| r.addr).collect();
        assert_eq!(
            addrs,
            [0, 1, 2, 3].map(|i| 0x1000_0000 + i * plane_bytes as u64)
        );
        // vllm-rbln: [2, NB, H, 1, BS, D] and [NB, 2, H, 1, BS, D] (reference/rbln.md §3.1);
        // the size-1 axis may carry any stride.
        let kv_first = [2, 16, 4, 1, 128, 32];
        let mut rbln = layers("RBLN_ATTN", "cpu", 1, &kv_first, &contiguous(&kv_first));
        assert_eq!(kind_of(&rbln), LayoutKind::RblnKvFirst);
        rbln.iter_mut().for_each(|t| t.strides[3] = 1);
        assert_eq!(kind_of(&rbln), LayoutKind::RblnKvFirst);
        let blocks_first = [16, 2, 4, 1, 128, 32];
        let rbln = layers(
            "RBLN_ATTN",
            "cpu",
            1,
            &blocks_first,
            &contiguous(&blocks_first),
        );
        assert_eq!(kind_of(&rbln), LayoutKind::RblnBlocksFirst);
    }

    #[test]
    fn gpu_shaped_refusals_say_what_was_seen_and_what_was_expected() {
        let spec = engine().spec().unwrap();
        // FlashInfer's shape behind FlashAttention: not FlashAttention's bytes.
        let fi = [16, 2, 128, 4, 32];
        let message = refusal(&layers("FLASH_ATTN", "cpu", 1, &fi, &contiguous(&fi)), None);
        assert!(message.contains("shape [16, 2, 128, 4, 32]"), "{message}");
        assert!(
            message.contains("flash_attn_nhd shape [2, 16, 128, 4, 32]"),
            "{message}"
        );
        // Another head count: no layout of this engine.
        let wrong = [2, 16, 128, 8, 32];
        let message = refusal(
            &layers("FLASH_ATTN", "cpu", 1, &wrong, &contiguous(&wrong)),
            None,
        );
        assert!(message.contains("not a layout kvrelay knows"), "{message}");
        // Strides of neither NHD nor HND (blocks innermost).
        let odd = layers("FLASH_ATTN", "cpu", 1, &NHD, &[1, 2, 32, 4096, 128]);
        assert!(refusal(&odd, None).contains("strides [1, 2, 32, 4096, 128]"));
        // An ascend tuple with only K, or V of another shape.
        let half = [16, 128, 4, 32];
        let mut lone = layers("ASCEND", "cpu", 2, &half, &contiguous(&half));
        lone.remove(1);
        assert!(refusal(&lone, None).contains("(K, V) each"));
        // A block count of 2: [2, 2, ...] fits FlashAttention and FlashInfer alike, and an
        // unknown backend name cannot tell which.
        let mut two = engine();
        two.num_blocks = 2;
        let spec2 = two.spec().unwrap();
        let shape = [2, 2, 128, 4, 32];
        let ambiguous = layers("CUSTOM", "cpu", 1, &shape, &contiguous(&shape));
        let message = recognize_kv_caches(&ambiguous, None, &spec2)
            .unwrap_err()
            .to_string();
        assert!(message.contains("alike"), "{message}");
        let named = layers("FLASHINFER", "cpu", 1, &shape, &contiguous(&shape));
        let kv = recognize_kv_caches(&named, None, &spec2).unwrap();
        assert_eq!(kv.layout.kind(), LayoutKind::FlashInferNhd);
        // Layers of different layouts.
        let mut mixed = layers("FLASH_ATTN", "cpu", 1, &NHD, &contiguous(&NHD));
        mixed[1].strides = vec![16 * 4 * 128 * 32, 4 * 128 * 32, 32, 128 * 32, 1];
        let message = recognize_kv_caches(&mixed, None, &spec)
            .unwrap_err()
            .to_string();
        assert!(message.contains("not all of one layout"), "{message}");
    }

    #[test]
    fn devices_by_tensor() {
        let flash = |device| layers("FLASH_ATTN", device, 1, &NHD, &contiguous(&NHD));
        let spec = engine().spec().unwrap();
        let npu = recognize_kv_caches(&flash("npu"), None, &spec);
        #[cfg(not(feature = "ascend"))]
        {
            let message = npu.unwrap_err().to_string();
            assert!(
                message.contains("built without the ascend feature"),
                "{message}"
            );
            assert!(message.contains("shape [2, 16, 128, 4, 32]"), "{message}");
        }
        #[cfg(feature = "ascend")]
        assert_eq!(npu.unwrap().device, KvDevice::Ascend(0));
        let rbln = recognize_kv_caches(&flash("rbln"), None, &spec);
        #[cfg(not(feature = "rbln"))]
        assert!(rbln
            .unwrap_err()
            .to_string()
            .contains("without the rbln feature"));
        #[cfg(feature = "rbln")]
        assert_eq!(rbln.unwrap().device, KvDevice::Rbln(0));
        for device in ["cuda", "xpu", "meta"] {
            let message = refusal(&flash(device), None);
            assert!(message.contains(&format!("device '{device}'")), "{message}");
            assert!(message.contains("does not support"), "{message}");
        }
        let mut mixed = flash("cpu");
        mixed[1].device = "npu".into();
        #[cfg(feature = "ascend")]
        assert!(refusal(&mixed, None).contains("another device"));
        #[cfg(not(feature = "ascend"))]
        assert!(refusal(&mixed, None).contains("without the ascend feature"));
        // Two NPUs: refused, naming both.
        let mut two = flash("npu");
        two[1].device_index = Some(1);
        #[cfg(feature = "ascend")]
        {
            let message = refusal(&two, None);
            assert!(
                message.contains("device npu:1") && message.contains("device npu:0"),
                "{message}"
            );
        }
        #[cfg(not(feature = "ascend"))]
        assert!(refusal(&two, None).contains("without the ascend feature"));
    }
}
