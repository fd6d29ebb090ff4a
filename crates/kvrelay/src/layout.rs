//! Paged KV-cache layouts: where each (layer, K/V, block, slot, head) lives in engine memory.
//!
//! Engine KV memory is a set of buffers (one per layer, one per layer and K/V, or one for
//! the whole cache). Every layout kvrelay knows is a stride pattern over those buffers, so
//! one [`KvLayout`] type describes them all and the copy planner never special-cases an
//! engine. The innermost `head_size` elements of one head are always contiguous.

use std::fmt;

use crate::dtype::KvDtype;

/// Standard multi-head/grouped-query attention (separate K and V planes), or MLA (one
/// latent vector per token).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AttentionKind {
    Mha,
    Mla,
}

/// The geometry of an engine's KV cache, independent of how it is laid out in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KvCacheSpec {
    pub num_layers: usize,
    /// KV heads per rank; 1 for MLA.
    pub num_kv_heads: usize,
    /// Elements per head; for MLA the latent size (kv_lora_rank + rope dim, e.g. 576).
    pub head_size: usize,
    pub dtype: KvDtype,
    /// Tokens per block.
    pub block_size: usize,
    pub num_blocks: usize,
    pub attention: AttentionKind,
}

/// A spec or layout that cannot describe real memory.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LayoutError {
    #[error("KV cache spec field {field} is 0; every dimension must be at least 1")]
    ZeroDimension { field: &'static str },
    #[error("MLA caches have one latent head, but num_kv_heads is {0}")]
    MlaHeads(usize),
    #[error("layout {kind} does not support {attention:?} attention")]
    AttentionUnsupported {
        kind: LayoutKind,
        attention: AttentionKind,
    },
    #[error("KV cache of this spec does not fit in the address space ({what} overflows)")]
    TooLarge { what: &'static str },
    #[error("unknown layout name {name:?}; known: {known}")]
    UnknownName { name: String, known: String },
}

impl KvCacheSpec {
    /// Checks that every dimension is usable and that the whole cache is addressable.
    pub fn validate(&self) -> Result<(), LayoutError> {
        for (field, value) in [
            ("num_layers", self.num_layers),
            ("num_kv_heads", self.num_kv_heads),
            ("head_size", self.head_size),
            ("block_size", self.block_size),
            ("num_blocks", self.num_blocks),
        ] {
            if value == 0 {
                return Err(LayoutError::ZeroDimension { field });
            }
        }
        if self.attention == AttentionKind::Mla && self.num_kv_heads != 1 {
            return Err(LayoutError::MlaHeads(self.num_kv_heads));
        }
        [
            self.num_layers,
            self.kv_planes(),
            self.num_blocks,
            self.block_size,
            self.num_kv_heads,
            self.head_size,
            self.dtype.size_bytes(),
        ]
        .into_iter()
        .try_fold(1usize, |acc, x| acc.checked_mul(x))
        .filter(|total| isize::try_from(*total).is_ok())
        .map(|_| ())
        .ok_or(LayoutError::TooLarge {
            what: "total bytes",
        })
    }

    /// 2 (K and V) for MHA, 1 (the latent) for MLA.
    pub const fn kv_planes(&self) -> usize {
        match self.attention {
            AttentionKind::Mha => 2,
            AttentionKind::Mla => 1,
        }
    }

    /// Bytes of one head of one token in one plane: the innermost contiguous unit.
    pub const fn head_bytes(&self) -> usize {
        self.head_size * self.dtype.size_bytes()
    }

    /// Bytes of all heads of one token in one plane of one layer (`H*D*elem`).
    pub const fn row_bytes(&self) -> usize {
        self.num_kv_heads * self.head_bytes()
    }

    /// Bytes of `tokens` tokens in LMCache's chunk format (`KV_2LTD` or `KV_MLA_FMT`).
    pub const fn chunk_bytes(&self, tokens: usize) -> usize {
        self.kv_planes() * self.num_layers * tokens * self.row_bytes()
    }

    /// Bytes of layers `layers` of `tokens` tokens in the chunk format: their slice of
    /// each plane, as a piece of a chunk saved layer by layer holds them (see
    /// [`KvCacheSpec::chunk_layer_ranges`]).
    pub fn chunk_layers_bytes(&self, tokens: usize, layers: std::ops::Range<usize>) -> usize {
        self.kv_planes() * layers.len() * tokens * self.row_bytes()
    }

    /// Where layers `layers` lie in a chunk of `tokens` tokens: one byte range per plane,
    /// in plane order. A piece of a chunk gathered for those layers alone holds the same
    /// planes back to back, so the piece's `p`-th range of this length is plane `p`'s.
    pub fn chunk_layer_ranges(
        &self,
        tokens: usize,
        layers: std::ops::Range<usize>,
    ) -> impl Iterator<Item = std::ops::Range<usize>> {
        let plane_bytes = tokens * self.row_bytes();
        let num_layers = self.num_layers;
        (0..self.kv_planes()).map(move |plane| {
            let first = plane * num_layers;
            (first + layers.start) * plane_bytes..(first + layers.end) * plane_bytes
        })
    }

    /// Names what makes chunk bytes differ: element type, layer count, heads, head size and
    /// attention kind. Chunks are stored in the layout-independent chunk format, so engines
    /// with different paged layouts or block sizes can share them; engines whose
    /// fingerprints differ cannot.
    pub fn chunk_fingerprint(&self) -> u64 {
        let mut bytes = Vec::with_capacity(48);
        bytes.extend_from_slice(b"kvrelay-chunk-v1");
        bytes.push(self.dtype.code());
        bytes.push(self.kv_planes() as u8);
        for dim in [self.num_layers, self.num_kv_heads, self.head_size] {
            bytes.extend_from_slice(&(dim as u64).to_le_bytes());
        }
        xxhash_rust::xxh3::xxh3_64(&bytes)
    }
}

/// The chunk fingerprint of a cache of geometry `spec` whose blocks are packed as
/// `packing` and move whole: [`KvLayout::chunk_fingerprint`] of such a layout, known
/// before the engine hands its tensors over (a PD channel checks it from the start).
pub fn opaque_blocks_fingerprint(spec: &KvCacheSpec, packing: BlockPacking) -> u64 {
    let mut bytes = Vec::with_capacity(64);
    bytes.extend_from_slice(b"kvrelay-opaque-blocks-v1");
    bytes.extend_from_slice(&spec.chunk_fingerprint().to_le_bytes());
    bytes.extend_from_slice(&(spec.block_size as u64).to_le_bytes());
    bytes.extend_from_slice(packing.name().as_bytes());
    xxhash_rust::xxh3::xxh3_64(&bytes)
}

/// Physical order of vLLM 0.33's fused `[L,B,H,N,C]` cache (K and V packed in `C`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FusedOrder {
    Lbnhc,
    Lbhnc,
    Blnhc,
    Blhnc,
}

/// How an engine packs the bytes inside one block when kvrelay cannot address the tokens
/// in it. Such blocks move whole and unchanged, and only an engine with the same packing
/// may load them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlockPacking {
    /// vLLM CPU's `CPU_ATTN` cache, per layer `[NB, H, BS, 2*D]`, each (block, head) packed
    /// for the attention kernel's instruction set (`CpuPlatform.pack_kv_cache`).
    CpuAttn(CpuAttnIsa),
}

/// The instruction sets vLLM's CPU attention packs KV for; each packs differently.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CpuAttnIsa {
    /// AVX-512 without AMX.
    Vec,
    /// AVX2 and other 16-wide vector paths.
    Vec16,
    /// AVX-512 with AMX tiles.
    Amx,
    /// Arm NEON.
    Neon,
    /// RISC-V vector extension.
    Rvv,
    /// IBM Z vector extension.
    Vxe,
    /// POWER VSX.
    Vsx,
}

impl CpuAttnIsa {
    pub const ALL: [CpuAttnIsa; 7] = [
        CpuAttnIsa::Vec,
        CpuAttnIsa::Vec16,
        CpuAttnIsa::Amx,
        CpuAttnIsa::Neon,
        CpuAttnIsa::Rvv,
        CpuAttnIsa::Vxe,
        CpuAttnIsa::Vsx,
    ];

    /// vLLM's name for the instruction set (`_get_attn_isa` in vLLM 0.32's `cpu_attn.py`).
    pub const fn name(self) -> &'static str {
        match self {
            CpuAttnIsa::Vec => "vec",
            CpuAttnIsa::Vec16 => "vec16",
            CpuAttnIsa::Amx => "amx",
            CpuAttnIsa::Neon => "neon",
            CpuAttnIsa::Rvv => "rvv",
            CpuAttnIsa::Vxe => "vxe",
            CpuAttnIsa::Vsx => "vsx",
        }
    }
}

impl std::str::FromStr for CpuAttnIsa {
    type Err = LayoutError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CpuAttnIsa::ALL
            .into_iter()
            .find(|isa| isa.name() == s)
            .ok_or_else(|| LayoutError::UnknownName {
                name: s.to_string(),
                known: CpuAttnIsa::ALL.map(CpuAttnIsa::name).join(", "),
            })
    }
}

impl BlockPacking {
    /// A name for messages and fingerprints (`cpu_attn_vec`, ...).
    pub fn name(self) -> String {
        match self {
            BlockPacking::CpuAttn(isa) => format!("cpu_attn_{}", isa.name()),
        }
    }
}

/// The engine layouts kvrelay can read and write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LayoutKind {
    /// vLLM FlashAttention, per layer `[2, NB, BS, H, D]`, NHD strides.
    FlashAttnNhd,
    /// vLLM FlashAttention with HND strides: physical `[2, NB, H, BS, D]`.
    FlashAttnHnd,
    /// FlashInfer / Triton, per layer `[NB, 2, BS, H, D]`, NHD strides.
    FlashInferNhd,
    /// FlashInfer / Triton with HND strides: physical `[NB, 2, H, BS, D]`.
    FlashInferHnd,
    /// MLA, per layer `[NB, BS, D]` (vLLM and RBLN).
    Mla,
    /// vLLM 0.33 fused K‖V cache, one buffer `[L, B, H, N, C]` in the given physical order.
    Fused(FusedOrder),
    /// vllm-ascend: per layer separate K and V buffers, each `[NB, BS, H, D]`.
    AscendSeparateKv,
    /// RBLN K/V-first, per layer `[2, NB, H, 1, BS, D]`.
    RblnKvFirst,
    /// RBLN blocks-first, per layer `[NB, 2, H, 1, BS, D]`.
    RblnBlocksFirst,
    /// Per layer `[NB, <block bytes>]` whose block bytes are packed in a way kvrelay does
    /// not read: blocks move whole, as opaque bytes. Not in [`LayoutKind::ALL`], which
    /// lists the token-addressable layouts.
    OpaqueBlocks(BlockPacking),
}

impl LayoutKind {
    /// Every layout, for tests and for `--layout` help.
    pub const ALL: [LayoutKind; 12] = [
        LayoutKind::FlashAttnNhd,
        LayoutKind::FlashAttnHnd,
        LayoutKind::FlashInferNhd,
        LayoutKind::FlashInferHnd,
        LayoutKind::Mla,
        LayoutKind::Fused(FusedOrder::Lbnhc),
        LayoutKind::Fused(FusedOrder::Lbhnc),
        LayoutKind::Fused(FusedOrder::Blnhc),
        LayoutKind::Fused(FusedOrder::Blhnc),
        LayoutKind::AscendSeparateKv,
        LayoutKind::RblnKvFirst,
        LayoutKind::RblnBlocksFirst,
    ];

    /// The flag-friendly name (`flash_attn_nhd`, `fused_blhnc`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            LayoutKind::FlashAttnNhd => "flash_attn_nhd",
            LayoutKind::FlashAttnHnd => "flash_attn_hnd",
            LayoutKind::FlashInferNhd => "flash_infer_nhd",
            LayoutKind::FlashInferHnd => "flash_infer_hnd",
            LayoutKind::Mla => "mla",
            LayoutKind::Fused(FusedOrder::Lbnhc) => "fused_lbnhc",
            LayoutKind::Fused(FusedOrder::Lbhnc) => "fused_lbhnc",
            LayoutKind::Fused(FusedOrder::Blnhc) => "fused_blnhc",
            LayoutKind::Fused(FusedOrder::Blhnc) => "fused_blhnc",
            LayoutKind::AscendSeparateKv => "ascend_separate_kv",
            LayoutKind::RblnKvFirst => "rbln_kv_first",
            LayoutKind::RblnBlocksFirst => "rbln_blocks_first",
            LayoutKind::OpaqueBlocks(_) => "opaque_blocks",
        }
    }

    /// Whether copies must move whole blocks: the layout cannot address one token.
    pub const fn moves_whole_blocks(self) -> bool {
        matches!(self, LayoutKind::OpaqueBlocks(_))
    }

    /// Which attention kinds the layout can hold.
    const fn supports(self, attention: AttentionKind) -> bool {
        match self {
            LayoutKind::Mla => matches!(attention, AttentionKind::Mla),
            LayoutKind::Fused(_) => true,
            _ => matches!(attention, AttentionKind::Mha),
        }
    }
}

impl fmt::Display for LayoutKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LayoutKind::OpaqueBlocks(packing) => write!(f, "opaque_blocks({})", packing.name()),
            _ => f.write_str(self.name()),
        }
    }
}

impl std::str::FromStr for LayoutKind {
    type Err = LayoutError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        LayoutKind::ALL
            .into_iter()
            .find(|kind| kind.name() == s)
            .ok_or_else(|| LayoutError::UnknownName {
                name: s.to_string(),
                known: LayoutKind::ALL.map(LayoutKind::name).join(", "),
            })
    }
}

/// Byte strides of one layout. A position's buffer is
/// `layer * layer_buffers + plane * plane_buffers`; its offset inside that buffer is the
/// dot product of (layer, plane, block, slot, head) with the byte strides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Strides {
    layer_buffers: usize,
    plane_buffers: usize,
    layer: usize,
    plane: usize,
    block: usize,
    slot: usize,
    head: usize,
}

/// Where one head of one token lives: a buffer index and a byte offset inside it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    pub buffer: usize,
    pub offset: usize,
}

/// A validated spec in a concrete memory layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KvLayout {
    spec: KvCacheSpec,
    kind: LayoutKind,
    num_buffers: usize,
    buffer_bytes: usize,
    strides: Strides,
}

impl KvLayout {
    /// Builds the layout, rejecting a spec it cannot hold.
    pub fn new(spec: KvCacheSpec, kind: LayoutKind) -> Result<Self, LayoutError> {
        spec.validate()?;
        if !kind.supports(spec.attention) {
            return Err(LayoutError::AttentionUnsupported {
                kind,
                attention: spec.attention,
            });
        }
        let e = spec.dtype.size_bytes();
        let (l, p, nb, bs, h, d) = (
            spec.num_layers,
            spec.kv_planes(),
            spec.num_blocks,
            spec.block_size,
            spec.num_kv_heads,
            spec.head_size,
        );
        let head = d * e;
        // Per-layer buffers: one buffer per layer, `layer` stride 0.
        let per_layer = |plane: usize, block: usize, slot: usize, head_stride: usize| Strides {
            layer_buffers: 1,
            plane_buffers: 0,
            layer: 0,
            plane,
            block,
            slot,
            head: head_stride,
        };
        let (strides, num_buffers, buffer_bytes) = match kind {
            LayoutKind::FlashAttnNhd => (
                per_layer(nb * bs * h * head, bs * h * head, h * head, head),
                l,
                p * nb * bs * h * head,
            ),
            LayoutKind::FlashAttnHnd | LayoutKind::RblnKvFirst => (
                per_layer(nb * h * bs * head, h * bs * head, head, bs * head),
                l,
                p * nb * bs * h * head,
            ),
            // Opaque blocks get FlashInfer NHD strides only as a fixed bijection between a
            // block's bytes and its (plane, slot, head) cells: a whole block maps onto
            // whole-block chunk bytes and back unchanged, in runs of half a block.
            LayoutKind::FlashInferNhd | LayoutKind::OpaqueBlocks(_) => (
                per_layer(bs * h * head, p * bs * h * head, h * head, head),
                l,
                p * nb * bs * h * head,
            ),
            LayoutKind::FlashInferHnd | LayoutKind::RblnBlocksFirst => (
                per_layer(h * bs * head, p * h * bs * head, head, bs * head),
                l,
                p * nb * bs * h * head,
            ),
            LayoutKind::Mla => (per_layer(0, bs * head, head, 0), l, nb * bs * head),
            LayoutKind::AscendSeparateKv => (
                Strides {
                    layer_buffers: 2,
                    plane_buffers: 1,
                    ..per_layer(0, bs * h * head, h * head, head)
                },
                2 * l,
                nb * bs * h * head,
            ),
            LayoutKind::Fused(order) => {
                // C holds K then V of one (head, token) cell.
                let cell = p * head;
                let (layer, block, slot, head_stride) = match order {
                    FusedOrder::Lbnhc => (nb * bs * h * cell, bs * h * cell, h * cell, cell),
                    FusedOrder::Lbhnc => (nb * h * bs * cell, h * bs * cell, cell, bs * cell),
                    FusedOrder::Blnhc => (bs * h * cell, l * bs * h * cell, h * cell, cell),
                    FusedOrder::Blhnc => (h * bs * cell, l * h * bs * cell, cell, bs * cell),
                };
                (
                    Strides {
                        layer_buffers: 0,
                        plane_buffers: 0,
                        layer,
                        plane: head,
                        block,
                        slot,
                        head: head_stride,
                    },
                    1,
                    l * nb * bs * h * cell,
                )
            }
        };
        Ok(KvLayout {
            spec,
            kind,
            num_buffers,
            buffer_bytes,
            strides,
        })
    }

    pub fn spec(&self) -> &KvCacheSpec {
        &self.spec
    }

    pub fn kind(&self) -> LayoutKind {
        self.kind
    }

    /// How many separate buffers the engine registers (per layer, per layer and K/V, or one).
    pub fn num_buffers(&self) -> usize {
        self.num_buffers
    }

    /// Bytes of each buffer.
    pub fn buffer_bytes(&self) -> usize {
        self.buffer_bytes
    }

    /// Where head `head` of slot `slot` of block `block` lives, for `plane` (0 = K, 1 = V)
    /// of `layer`. Callers pass in-range indices (the planner checks block ids first).
    pub fn locate(
        &self,
        layer: usize,
        plane: usize,
        block: usize,
        slot: usize,
        head: usize,
    ) -> Location {
        let s = &self.strides;
        debug_assert!(layer < self.spec.num_layers && plane < self.spec.kv_planes());
        debug_assert!(block < self.spec.num_blocks && slot < self.spec.block_size);
        debug_assert!(head < self.spec.num_kv_heads);
        Location {
            buffer: layer * s.layer_buffers + plane * s.plane_buffers,
            offset: layer * s.layer
                + plane * s.plane
                + block * s.block
                + slot * s.slot
                + head * s.head,
        }
    }

    /// What chunks saved from this layout can be loaded into: the spec's
    /// [`KvCacheSpec::chunk_fingerprint`] for token-addressable layouts, which all share
    /// the `KV_2LTD` chunk format; for opaque blocks one that also names the packing and
    /// the block size, so only an engine packing blocks the same way loads them.
    pub fn chunk_fingerprint(&self) -> u64 {
        match self.kind {
            LayoutKind::OpaqueBlocks(packing) => opaque_blocks_fingerprint(&self.spec, packing),
            _ => self.spec.chunk_fingerprint(),
        }
    }

    /// Byte strides, inside one buffer, from a slot of a block to the next slot and from a
    /// head of a slot to the next head: with [`KvLayout::locate`] of a block's first cell,
    /// they place every (slot, head) cell of that block.
    pub fn slot_and_head_strides(&self) -> [usize; 2] {
        [self.strides.slot, self.strides.head]
    }

    /// True when all heads of one token sit next to each other (NHD-like), so one token's
    /// row is a single contiguous run.
    pub fn heads_contiguous(&self) -> bool {
        self.spec.num_kv_heads == 1 || self.strides.head == self.spec.head_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(attention: AttentionKind) -> KvCacheSpec {
        KvCacheSpec {
            num_layers: 3,
            num_kv_heads: if attention == AttentionKind::Mla {
                1
            } else {
                2
            },
            head_size: 4,
            dtype: KvDtype::Bf16,
            block_size: 5,
            num_blocks: 7,
            attention,
        }
    }

    const CPU_VEC: LayoutKind = LayoutKind::OpaqueBlocks(BlockPacking::CpuAttn(CpuAttnIsa::Vec));

    /// Every (layer, plane, block, slot, head) maps to a distinct, in-bounds, head-sized range.
    #[test]
    fn every_position_is_distinct_and_in_bounds() {
        for kind in LayoutKind::ALL.into_iter().chain([CPU_VEC]) {
            for attention in [AttentionKind::Mha, AttentionKind::Mla] {
                let s = spec(attention);
                let Ok(layout) = KvLayout::new(s, kind) else {
                    assert!(!kind.supports(attention));
                    continue;
                };
                let mut seen = std::collections::HashSet::new();
                for layer in 0..s.num_layers {
                    for plane in 0..s.kv_planes() {
                        for block in 0..s.num_blocks {
                            for slot in 0..s.block_size {
                                for head in 0..s.num_kv_heads {
                                    let at = layout.locate(layer, plane, block, slot, head);
                                    assert!(at.buffer < layout.num_buffers(), "{kind}");
                                    assert!(at.offset + s.head_bytes() <= layout.buffer_bytes());
                                    assert_eq!(at.offset % s.head_bytes(), 0, "{kind}");
                                    assert!(seen.insert((at.buffer, at.offset)), "{kind} overlaps");
                                }
                            }
                        }
                    }
                }
                // The layout covers its buffers exactly: no padding, no gaps.
                let units = layout.num_buffers() * layout.buffer_bytes() / s.head_bytes();
                assert_eq!(seen.len(), units, "{kind}");
            }
        }
    }

    #[test]
    fn flash_attention_nhd_matches_the_tensor_shape() {
        let s = spec(AttentionKind::Mha);
        let layout = KvLayout::new(s, LayoutKind::FlashAttnNhd).unwrap();
        // [2, NB, BS, H, D] row-major, elements of 2 bytes.
        let index =
            |kv: usize, b: usize, t: usize, h: usize| (((kv * 7 + b) * 5 + t) * 2 + h) * 4 * 2;
        assert_eq!(layout.locate(2, 1, 6, 4, 1).offset, index(1, 6, 4, 1));
        assert_eq!(layout.locate(2, 1, 6, 4, 1).buffer, 2);
        assert!(layout.heads_contiguous());
        assert!(!KvLayout::new(s, LayoutKind::RblnKvFirst)
            .unwrap()
            .heads_contiguous());
    }

    #[test]
    fn impossible_specs_are_errors() {
        let mut s = spec(AttentionKind::Mha);
        s.num_blocks = 0;
        assert_eq!(
            KvLayout::new(s, LayoutKind::FlashAttnNhd),
            Err(LayoutError::ZeroDimension {
                field: "num_blocks"
            })
        );
        let mut s = spec(AttentionKind::Mla);
        s.num_kv_heads = 2;
        assert_eq!(s.validate(), Err(LayoutError::MlaHeads(2)));
        let s = spec(AttentionKind::Mha);
        assert!(matches!(
            KvLayout::new(s, LayoutKind::Mla),
            Err(LayoutError::AttentionUnsupported { .. })
        ));
        let mut s = spec(AttentionKind::Mha);
        s.num_blocks = usize::MAX / 2;
        assert!(matches!(s.validate(), Err(LayoutError::TooLarge { .. })));
        assert!("flash_attn".parse::<LayoutKind>().is_err());
        for kind in LayoutKind::ALL {
            assert_eq!(kind.name().parse::<LayoutKind>(), Ok(kind));
        }
    }

    /// vLLM CPU's `[NB, H, BS, 2*D]` layer tensor: block b is bytes
    /// `b * block_bytes..(b + 1) * block_bytes` of its layer's buffer, and the opaque layout's
    /// cells of block b cover exactly those bytes.
    #[test]
    fn opaque_blocks_cover_exactly_their_tensor_block() {
        let s = spec(AttentionKind::Mha);
        let layout = KvLayout::new(s, CPU_VEC).unwrap();
        let block_bytes = s.num_kv_heads * s.block_size * 2 * s.head_bytes();
        assert_eq!(layout.num_buffers(), s.num_layers);
        assert_eq!(layout.buffer_bytes(), s.num_blocks * block_bytes);
        for layer in 0..s.num_layers {
            for block in 0..s.num_blocks {
                let mut offsets: Vec<usize> = (0..2)
                    .flat_map(|plane| (0..s.block_size).map(move |slot| (plane, slot)))
                    .flat_map(|(plane, slot)| {
                        (0..s.num_kv_heads)
                            .map(move |head| layout.locate(layer, plane, block, slot, head))
                    })
                    .inspect(|at| assert_eq!(at.buffer, layer))
                    .map(|at| at.offset)
                    .collect();
                offsets.sort_unstable();
                let expected: Vec<usize> = (block * block_bytes..(block + 1) * block_bytes)
                    .step_by(s.head_bytes())
                    .collect();
                assert_eq!(offsets, expected);
            }
        }
        assert!(layout.kind().moves_whole_blocks());
        assert!(!LayoutKind::ALL.iter().any(|k| k.moves_whole_blocks()));
    }

    #[test]
    fn opaque_fingerprint_names_packing_and_block_size() {
        let s = spec(AttentionKind::Mha);
        let fingerprint =
            |spec: KvCacheSpec, kind| KvLayout::new(spec, kind).unwrap().chunk_fingerprint();
        let vec = fingerprint(s, CPU_VEC);
        // No token-addressable layout of the same geometry shares it ...
        for kind in LayoutKind::ALL
            .into_iter()
            .filter(|k| k.supports(s.attention))
        {
            assert_eq!(fingerprint(s, kind), s.chunk_fingerprint());
            assert_ne!(fingerprint(s, kind), vec, "{kind}");
        }
        // ... nor another instruction set's packing, nor another block size.
        for isa in CpuAttnIsa::ALL
            .into_iter()
            .filter(|i| *i != CpuAttnIsa::Vec)
        {
            let other = LayoutKind::OpaqueBlocks(BlockPacking::CpuAttn(isa));
            assert_ne!(fingerprint(s, other), vec, "{other}");
        }
        let mut other_blocks = s;
        other_blocks.block_size += 1;
        assert_ne!(fingerprint(other_blocks, CPU_VEC), vec);
        // Only the number of blocks may differ.
        let mut more_blocks = s;
        more_blocks.num_blocks += 3;
        assert_eq!(fingerprint(more_blocks, CPU_VEC), vec);
        for isa in CpuAttnIsa::ALL {
            assert_eq!(isa.name().parse::<CpuAttnIsa>(), Ok(isa));
        }
        assert!(matches!(
            "avx512".parse::<CpuAttnIsa>(),
            Err(LayoutError::UnknownName { .. })
        ));
    }

    #[test]
    fn fingerprint_ignores_paging_but_not_geometry() {
        let a = spec(AttentionKind::Mha);
        let mut paged_differently = a;
        paged_differently.block_size = 16;
        paged_differently.num_blocks = 100;
        assert_eq!(a.chunk_fingerprint(), paged_differently.chunk_fingerprint());
        let mut other_model = a;
        other_model.num_layers += 1;
        assert_ne!(a.chunk_fingerprint(), other_model.chunk_fingerprint());
        let mut other_dtype = a;
        other_dtype.dtype = KvDtype::F16;
        assert_ne!(a.chunk_fingerprint(), other_dtype.chunk_fingerprint());
    }
}
