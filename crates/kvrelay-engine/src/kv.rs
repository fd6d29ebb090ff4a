//! The engine's paged KV cache: kvrelay's [`HostKvCache`] in any of the core's layouts,
//! read and written one head row at a time.

use std::sync::Arc;

use half::{bf16, f16};
use kvrelay::device::{EngineMemory, HostKvCache};
use kvrelay::layout::KvLayout;
use kvrelay::KvDtype;

use crate::EngineError;

/// One head of one token in the paged cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadSlot {
    pub layer: usize,
    /// 0 = K, 1 = V.
    pub plane: usize,
    pub block: u32,
    /// Token position inside the block.
    pub slot: usize,
    pub head: usize,
}

/// Paged KV memory the forward pass writes and the connector copies.
///
/// Access goes through raw pointers, one head row at a time, never through a slice of a
/// whole buffer: the connector may be writing other blocks of the same buffer from its
/// loader thread while the forward pass runs.
pub struct PagedKv {
    layout: KvLayout,
    cache: Arc<HostKvCache>,
    bases: Vec<*mut u8>,
}

// SAFETY: the pointers are into `cache`, which the struct keeps alive; concurrent access is
// ruled out per block by the connector contract (see `write_head`/`read_head`).
unsafe impl Send for PagedKv {}
// SAFETY: as for Send.
unsafe impl Sync for PagedKv {}

impl PagedKv {
    /// Allocates zeroed KV memory in `layout`. The dtype must be one the engine computes
    /// with (f32, f16, bf16).
    pub fn new(layout: KvLayout) -> Result<Self, EngineError> {
        let dtype = layout.spec().dtype;
        if !matches!(dtype, KvDtype::F32 | KvDtype::F16 | KvDtype::Bf16) {
            return Err(EngineError::Config(format!(
                "the reference engine stores KV as f32, f16 or bf16, not {dtype}"
            )));
        }
        let cache =
            HostKvCache::new(layout).map_err(|e| EngineError::Config(format!("KV cache: {e}")))?;
        let bases = cache
            .engine_memory()
            .regions()
            .iter()
            .map(|r| r.addr as *mut u8)
            .collect();
        Ok(PagedKv {
            layout,
            cache,
            bases,
        })
    }

    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    /// The registration a connector takes.
    pub fn engine_memory(&self) -> EngineMemory {
        self.cache.engine_memory()
    }

    fn head_ptr(&self, at: HeadSlot) -> *mut u8 {
        let spec = self.layout.spec();
        assert!(
            (at.block as usize) < spec.num_blocks && at.slot < spec.block_size,
            "block {} slot {} is outside the KV cache",
            at.block,
            at.slot
        );
        let at = self
            .layout
            .locate(at.layer, at.plane, at.block as usize, at.slot, at.head);
        debug_assert!(at.offset + spec.head_bytes() <= self.layout.buffer_bytes());
        // SAFETY: locate() of in-range indices is inside the buffer (checked above and by
        // the layout's construction).
        unsafe { self.buffer_ptr(at.buffer).add(at.offset) }
    }

    /// The first byte of layout buffer `buffer` (`buffer_bytes()` long).
    pub(crate) fn buffer_ptr(&self, buffer: usize) -> *mut u8 {
        self.bases[buffer]
    }

    /// The bytes `blocks` occupy, as `(buffer, offset, len)` ranges, sorted and with
    /// adjacent ranges merged: one range per block and buffer in the RBLN layouts (a whole
    /// block of each plane, or of both), more in layouts that interleave blocks.
    #[cfg(any(feature = "rbln", feature = "ascend"))]
    pub(crate) fn block_ranges(&self, blocks: &[u32]) -> Vec<(usize, usize, usize)> {
        let spec = self.layout.spec();
        let head = spec.head_bytes();
        let mut heads = Vec::new();
        for &block in blocks {
            for layer in 0..spec.num_layers {
                for plane in 0..spec.kv_planes() {
                    for slot in 0..spec.block_size {
                        for h in 0..spec.num_kv_heads {
                            let at = self.layout.locate(layer, plane, block as usize, slot, h);
                            heads.push((at.buffer, at.offset));
                        }
                    }
                }
            }
        }
        heads.sort_unstable();
        let mut ranges: Vec<(usize, usize, usize)> = Vec::new();
        for (buffer, offset) in heads {
            match ranges.last_mut() {
                Some((b, start, len)) if *b == buffer && offset <= *start + *len => {
                    *len = (*len).max(offset + head - *start);
                }
                _ => ranges.push((buffer, offset, head)),
            }
        }
        ranges
    }

    /// Stores one head of one token.
    ///
    /// # Safety
    /// No connector copy may be writing or reading this block concurrently (the engine only
    /// writes blocks of requests it is computing, the connector only those in its metadata).
    pub unsafe fn write_head(&self, at: HeadSlot, values: &[f32]) {
        let spec = self.layout.spec();
        debug_assert_eq!(values.len(), spec.head_size);
        let ptr = self.head_ptr(at);
        // SAFETY: head_ptr points at head_bytes() bytes of this cache; the caller excludes
        // concurrent access to the block.
        let bytes = unsafe { std::slice::from_raw_parts_mut(ptr, spec.head_bytes()) };
        match spec.dtype {
            KvDtype::F32 => encode(bytes, values, |v| v.to_le_bytes()),
            KvDtype::F16 => encode(bytes, values, |v| f16::from_f32(v).to_le_bytes()),
            _ => encode(bytes, values, |v| bf16::from_f32(v).to_le_bytes()),
        }
    }

    /// Reads one head of one token.
    ///
    /// # Safety
    /// As for [`PagedKv::write_head`].
    pub unsafe fn read_head(&self, at: HeadSlot, out: &mut [f32]) {
        let spec = self.layout.spec();
        let ptr = self.head_ptr(at);
        // SAFETY: as in write_head.
        let bytes = unsafe { std::slice::from_raw_parts(ptr, spec.head_bytes()) };
        match spec.dtype {
            KvDtype::F32 => decode(bytes, out, f32::from_le_bytes),
            KvDtype::F16 => decode(bytes, out, |b| f16::from_le_bytes(b).to_f32()),
            _ => decode(bytes, out, |b| bf16::from_le_bytes(b).to_f32()),
        }
    }
}

fn encode<const N: usize>(bytes: &mut [u8], values: &[f32], to_bytes: impl Fn(f32) -> [u8; N]) {
    for (dst, v) in bytes.chunks_exact_mut(N).zip(values) {
        dst.copy_from_slice(&to_bytes(*v));
    }
}

fn decode<const N: usize>(bytes: &[u8], out: &mut [f32], from_bytes: impl Fn([u8; N]) -> f32) {
    for (src, o) in bytes.chunks_exact(N).zip(out) {
        *o = from_bytes(src.try_into().expect("chunks_exact yields N bytes"));
    }
}

#[cfg(all(test, feature = "rbln"))]
mod tests {
    use kvrelay::layout::{AttentionKind, KvCacheSpec, LayoutKind};

    use super::*;

    fn cache(kind: LayoutKind) -> PagedKv {
        let spec = KvCacheSpec {
            num_layers: 3,
            num_kv_heads: 2,
            head_size: 8,
            dtype: KvDtype::Bf16,
            block_size: 4,
            num_blocks: 6,
            attention: AttentionKind::Mha,
        };
        PagedKv::new(KvLayout::new(spec, kind).unwrap()).unwrap()
    }

    #[test]
    fn block_ranges_cover_whole_blocks_in_few_runs() {
        // 2 planes x 4 slots x 2 heads x 16 bytes per block and layer.
        let per_block_layer = 2 * 4 * 2 * 16;
        for (kind, runs_per_block_layer) in [
            (LayoutKind::RblnBlocksFirst, 1),
            (LayoutKind::RblnKvFirst, 2),
            (LayoutKind::FlashAttnNhd, 2),
        ] {
            let kv = cache(kind);
            let ranges = kv.block_ranges(&[4, 1]);
            assert_eq!(ranges.len(), 2 * 3 * runs_per_block_layer, "{kind}");
            let total: usize = ranges.iter().map(|r| r.2).sum();
            assert_eq!(total, 2 * 3 * per_block_layer, "{kind}");
            assert!(ranges.windows(2).all(|w| w[0] < w[1]), "{kind}");
        }
        // Neighbouring blocks merge into one range per buffer.
        let kv = cache(LayoutKind::RblnBlocksFirst);
        assert_eq!(kv.block_ranges(&[2, 3]), {
            (0..3)
                .map(|layer| (layer, 2 * per_block_layer, 2 * per_block_layer))
                .collect::<Vec<_>>()
        });
    }
}
