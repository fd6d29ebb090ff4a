//! Copy plans: what moves a request's KV between a paged layout and LMCache's chunk format,
//! or between two paged layouts.
//!
//! A plan only names buffers by index and bytes by offset, so the same plan drives a host
//! copy kernel, a device's batched async copies and a network scatter/gather. It is held as
//! tiles, one per (chunk, plane, layer, block) at most: the layout's block pattern placed
//! by the block table. Building one costs a few operations per block, however many
//! contiguous runs its tiles hold; the runs are materialised only for the devices that
//! issue one call per run, on first use.

use std::ops::Range;
use std::sync::OnceLock;

use crate::layout::{KvCacheSpec, KvLayout};

/// One contiguous copy of `len` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopyRun {
    pub src_buffer: u32,
    pub src_offset: usize,
    pub dst_buffer: u32,
    pub dst_offset: usize,
    pub len: usize,
}

impl CopyRun {
    /// Whether `next` starts where this run ends, on both sides: the two are one run.
    fn continued_by(&self, next: &CopyRun) -> bool {
        self.src_buffer == next.src_buffer
            && self.dst_buffer == next.dst_buffer
            && self.src_offset + self.len == next.src_offset
            && self.dst_offset + self.len == next.dst_offset
    }
}

/// `rows × cols` copy units of `unit` bytes each. Unit (r, c) moves from
/// `src_offset + r * src_strides[0] + c * src_strides[1]` of source buffer `src_buffer` to
/// the same place, by `dst_strides`, in destination buffer `dst_buffer`. Plan order is row
/// by row. A tile with `rows == cols == 1` is one contiguous run; a head-major layout's
/// block is a tile of tokens × heads whose units are one head of one token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopyTile {
    pub src_buffer: u32,
    pub src_offset: usize,
    pub dst_buffer: u32,
    pub dst_offset: usize,
    pub unit: usize,
    pub rows: usize,
    pub cols: usize,
    pub src_strides: [usize; 2],
    pub dst_strides: [usize; 2],
}

impl CopyTile {
    /// Bytes the tile moves.
    pub fn bytes(&self) -> usize {
        self.unit * self.rows * self.cols
    }

    /// Source and destination offsets of unit (`row`, `col`).
    pub fn unit_offsets(&self, row: usize, col: usize) -> (usize, usize) {
        let at = |base: usize, s: [usize; 2]| base + row * s[0] + col * s[1];
        (
            at(self.src_offset, self.src_strides),
            at(self.dst_offset, self.dst_strides),
        )
    }

    /// Source and destination offsets of every unit, in plan order.
    pub fn units(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        (0..self.rows).flat_map(move |r| (0..self.cols).map(move |c| self.unit_offsets(r, c)))
    }

    fn unit_run(&self, row: usize, col: usize) -> CopyRun {
        let (src_offset, dst_offset) = self.unit_offsets(row, col);
        CopyRun {
            src_buffer: self.src_buffer,
            src_offset,
            dst_buffer: self.dst_buffer,
            dst_offset,
            len: self.unit,
        }
    }

    /// The same tile with units that continue each other on both sides merged into wider
    /// units: heads of a token-major layout into a row, rows into one run.
    fn normalized(mut self) -> Self {
        let both = |s: [usize; 2], d: [usize; 2], axis: usize, unit: usize| {
            s[axis] == unit && d[axis] == unit
        };
        if self.cols == 1 || both(self.src_strides, self.dst_strides, 1, self.unit) {
            self.unit *= self.cols;
            self.cols = 1;
            if self.rows == 1 || both(self.src_strides, self.dst_strides, 0, self.unit) {
                self.unit *= self.rows;
                self.rows = 1;
            }
        }
        // Strides along an axis of one unit are never used: keep them canonical.
        for axis in 0..2 {
            if [self.rows, self.cols][axis] == 1 {
                self.src_strides[axis] = self.unit;
                self.dst_strides[axis] = self.unit;
            }
        }
        self
    }

    /// Runs the tile adds to a plan on its own: one per unit, less one for each row whose
    /// last unit continues into the next row's first.
    fn runs(&self) -> usize {
        let wraps = |s: [usize; 2]| s[0] == (self.cols - 1) * s[1] + self.unit;
        let units = self.rows * self.cols;
        if self.rows > 1 && wraps(self.src_strides) && wraps(self.dst_strides) {
            units - (self.rows - 1)
        } else {
            units
        }
    }

    /// One past the last byte the tile touches on a side.
    fn extent(&self, offset: usize, strides: [usize; 2]) -> usize {
        offset + (self.rows - 1) * strides[0] + (self.cols - 1) * strides[1] + self.unit
    }

    fn inverse(&self) -> CopyTile {
        CopyTile {
            src_buffer: self.dst_buffer,
            src_offset: self.dst_offset,
            dst_buffer: self.src_buffer,
            dst_offset: self.src_offset,
            src_strides: self.dst_strides,
            dst_strides: self.src_strides,
            ..*self
        }
    }
}

/// What a plan side addresses: engine KV memory in a paged layout, or chunk buffers (one
/// per [`ChunkWindow`], in LMCache's `KV_2LTD` / `KV_MLA_FMT` format).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Paged,
    Chunks,
}

/// One chunk of a request: tokens `start..start + tokens` of the request, of which the first
/// `skip_leading` are not copied (the engine already holds them, e.g. from its own prefix
/// cache). The chunk buffer always has room for all `tokens`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkWindow {
    pub start: usize,
    pub tokens: usize,
    pub skip_leading: usize,
}

/// A plan that cannot be built or executed safely.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    #[error("block id {block_id} is out of range: the cache has {num_blocks} blocks")]
    BlockOutOfRange { block_id: u32, num_blocks: usize },
    #[error(
        "{tokens} tokens need {needed} blocks of {block_size}, but the block table has {available}"
    )]
    BlockTableTooShort {
        tokens: usize,
        needed: usize,
        available: usize,
        block_size: usize,
    },
    #[error("chunk window {index} is invalid: {reason}")]
    BadWindow { index: usize, reason: String },
    #[error("layers {layers:?} are not a non-empty range of the cache's {num_layers} layers")]
    BadLayers {
        layers: Range<usize>,
        num_layers: usize,
    },
    #[error("layouts hold different KV geometry (layers, heads, head size, dtype or attention kind): {src:?} vs {dst:?}")]
    GeometryMismatch {
        src: Box<KvCacheSpec>,
        dst: Box<KvCacheSpec>,
    },
    #[error("plan {side} side needs {expected} buffers, {found} were given")]
    BufferCount {
        side: &'static str,
        expected: usize,
        found: usize,
    },
    #[error("plan {side} buffer {buffer} needs {needed} bytes but has {len}")]
    BufferTooSmall {
        side: &'static str,
        buffer: usize,
        needed: usize,
        len: usize,
    },
}

/// A plan's tiles, with the extent each buffer must have.
#[derive(Clone, Debug)]
pub struct CopyPlan {
    tiles: Vec<CopyTile>,
    /// The coalesced runs, made from `tiles` on first use.
    runs: OnceLock<Vec<CopyRun>>,
    num_runs: usize,
    source: Endpoint,
    dest: Endpoint,
    src_extents: Vec<usize>,
    dst_extents: Vec<usize>,
    total_bytes: usize,
}

impl CopyPlan {
    /// The plan's tiles, in plan order. A contiguous tile that continues the one before it
    /// on both sides is merged into it; other tiles may still touch at their ends.
    pub fn tiles(&self) -> &[CopyTile] {
        &self.tiles
    }

    /// The plan as coalesced contiguous runs (each as long as both sides allow), in plan
    /// order. The first call materialises them, one entry per run: devices that issue one
    /// call per run use this, the host kernel copies [`CopyPlan::tiles`] instead.
    pub fn runs(&self) -> &[CopyRun] {
        self.runs.get_or_init(|| {
            let mut runs: Vec<CopyRun> = Vec::with_capacity(self.num_runs);
            for tile in &self.tiles {
                for row in 0..tile.rows {
                    for col in 0..tile.cols {
                        let run = tile.unit_run(row, col);
                        match runs.last_mut() {
                            Some(last) if last.continued_by(&run) => last.len += run.len,
                            _ => runs.push(run),
                        }
                    }
                }
            }
            runs
        })
    }

    /// How many runs [`CopyPlan::runs`] holds, known without materialising them.
    pub fn num_runs(&self) -> usize {
        self.num_runs
    }

    pub fn source(&self) -> Endpoint {
        self.source
    }

    pub fn dest(&self) -> Endpoint {
        self.dest
    }

    /// Bytes moved by the whole plan.
    pub fn total_bytes(&self) -> usize {
        self.total_bytes
    }

    /// For each source buffer, how many bytes from its start the plan reads.
    pub fn src_extents(&self) -> &[usize] {
        &self.src_extents
    }

    /// For each destination buffer, how many bytes from its start the plan writes.
    pub fn dst_extents(&self) -> &[usize] {
        &self.dst_extents
    }

    /// The plan that copies the same bytes back: a scatter from a gather and vice versa.
    pub fn inverse(&self) -> CopyPlan {
        CopyPlan {
            tiles: self.tiles.iter().map(CopyTile::inverse).collect(),
            runs: OnceLock::new(),
            num_runs: self.num_runs,
            source: self.dest,
            dest: self.source,
            src_extents: self.dst_extents.clone(),
            dst_extents: self.src_extents.clone(),
            total_bytes: self.total_bytes,
        }
    }

    /// Checks buffer counts and sizes for both sides before any byte moves, so a plan can
    /// never read or write outside the buffers it is given.
    pub fn check_buffers(
        &self,
        src_lens: impl ExactSizeIterator<Item = usize>,
        dst_lens: impl ExactSizeIterator<Item = usize>,
    ) -> Result<(), PlanError> {
        check_side("source", &self.src_extents, src_lens)?;
        check_side("destination", &self.dst_extents, dst_lens)
    }

    /// Executes the plan with host memcpy, unit by unit, after checking every buffer.
    pub fn execute(&self, src: &[&[u8]], dst: &mut [&mut [u8]]) -> Result<(), PlanError> {
        self.check_buffers(src.iter().map(|b| b.len()), dst.iter().map(|b| b.len()))?;
        for tile in &self.tiles {
            let (from, to) = (
                src[tile.src_buffer as usize],
                &mut dst[tile.dst_buffer as usize],
            );
            for (s, d) in tile.units() {
                to[d..d + tile.unit].copy_from_slice(&from[s..s + tile.unit]);
            }
        }
        Ok(())
    }
}

fn check_side(
    side: &'static str,
    extents: &[usize],
    lens: impl ExactSizeIterator<Item = usize>,
) -> Result<(), PlanError> {
    if lens.len() != extents.len() {
        return Err(PlanError::BufferCount {
            side,
            expected: extents.len(),
            found: lens.len(),
        });
    }
    for (buffer, (&needed, len)) in extents.iter().zip(lens).enumerate() {
        if len < needed {
            return Err(PlanError::BufferTooSmall {
                side,
                buffer,
                needed,
                len,
            });
        }
    }
    Ok(())
}

/// Accumulates tiles, merging a contiguous run with the previous one when both sides
/// continue it, and counts the runs they hold.
struct PlanBuilder {
    tiles: Vec<CopyTile>,
    num_runs: usize,
    src_extents: Vec<usize>,
    dst_extents: Vec<usize>,
    total_bytes: usize,
}

impl PlanBuilder {
    /// A builder for at most `tiles` tiles, allocated once.
    fn new(src_buffers: usize, dst_buffers: usize, tiles: usize) -> Self {
        PlanBuilder {
            tiles: Vec::with_capacity(tiles),
            num_runs: 0,
            src_extents: vec![0; src_buffers],
            dst_extents: vec![0; dst_buffers],
            total_bytes: 0,
        }
    }

    fn push(&mut self, tile: CopyTile) {
        debug_assert!(tile.rows > 0 && tile.cols > 0 && tile.unit > 0);
        let tile = tile.normalized();
        self.total_bytes += tile.bytes();
        let src_end = &mut self.src_extents[tile.src_buffer as usize];
        *src_end = (*src_end).max(tile.extent(tile.src_offset, tile.src_strides));
        let dst_end = &mut self.dst_extents[tile.dst_buffer as usize];
        *dst_end = (*dst_end).max(tile.extent(tile.dst_offset, tile.dst_strides));
        let mut runs = tile.runs();
        if let Some(last) = self.tiles.last_mut() {
            let last_unit = last.unit_run(last.rows - 1, last.cols - 1);
            if last_unit.continued_by(&tile.unit_run(0, 0)) {
                runs -= 1;
                if last.bytes() == last.unit && tile.bytes() == tile.unit {
                    *last = CopyTile {
                        unit: last.unit + tile.unit,
                        ..*last
                    }
                    .normalized();
                    return;
                }
            }
        }
        self.num_runs += runs;
        self.tiles.push(tile);
    }

    fn finish(self, source: Endpoint, dest: Endpoint) -> CopyPlan {
        CopyPlan {
            tiles: self.tiles,
            runs: OnceLock::new(),
            num_runs: self.num_runs,
            source,
            dest,
            src_extents: self.src_extents,
            dst_extents: self.dst_extents,
            total_bytes: self.total_bytes,
        }
    }
}

/// Maps request token positions to (block id, slot) through a checked block table.
struct BlockTable<'a> {
    block_ids: &'a [u32],
    block_size: usize,
}

impl<'a> BlockTable<'a> {
    /// Checks that `block_ids` covers `tokens` tokens and that every id used is in range.
    fn new(layout: &KvLayout, block_ids: &'a [u32], tokens: usize) -> Result<Self, PlanError> {
        let spec = layout.spec();
        let needed = tokens.div_ceil(spec.block_size);
        if needed > block_ids.len() {
            return Err(PlanError::BlockTableTooShort {
                tokens,
                needed,
                available: block_ids.len(),
                block_size: spec.block_size,
            });
        }
        if let Some(&block_id) = block_ids[..needed]
            .iter()
            .find(|&&id| id as usize >= spec.num_blocks)
        {
            return Err(PlanError::BlockOutOfRange {
                block_id,
                num_blocks: spec.num_blocks,
            });
        }
        Ok(BlockTable {
            block_ids,
            block_size: spec.block_size,
        })
    }

    fn slot(&self, token: usize) -> (usize, usize) {
        (
            self.block_ids[token / self.block_size] as usize,
            token % self.block_size,
        )
    }
}

/// Splits `tokens` into (first token, token count) pieces that each stay inside one block
/// of every table.
fn block_pieces<'a>(
    tables: &'a [&BlockTable],
    tokens: Range<usize>,
) -> impl Iterator<Item = (usize, usize)> + 'a {
    let end = tokens.end;
    let mut next = tokens.start;
    std::iter::from_fn(move || {
        let t = next;
        let n = tables
            .iter()
            .map(|table| table.block_size - t % table.block_size)
            .fold(end.checked_sub(t).filter(|&n| n > 0)?, usize::min);
        next += n;
        Some((t, n))
    })
}

/// A layout that moves whole blocks only (opaque packing) cannot copy part of a block:
/// the tokens copied must start and end on block boundaries.
fn check_whole_blocks(layout: &KvLayout, tokens: Range<usize>) -> Result<(), String> {
    let block_size = layout.spec().block_size;
    if !layout.kind().moves_whole_blocks()
        || (tokens.start.is_multiple_of(block_size) && tokens.end.is_multiple_of(block_size))
    {
        return Ok(());
    }
    Err(format!(
        "layout {} moves whole blocks of {block_size} tokens only, but tokens {}..{} were asked for",
        layout.kind(),
        tokens.start,
        tokens.end
    ))
}

/// Plans the gather of `windows` of a request whose tokens live in `block_ids` (the
/// request's block table, token `t` in block `block_ids[t / block_size]`) into one chunk
/// buffer per window. Invert the plan for the scatter.
pub fn paged_to_chunks(
    layout: &KvLayout,
    block_ids: &[u32],
    windows: &[ChunkWindow],
) -> Result<CopyPlan, PlanError> {
    paged_to_chunk_layers(layout, block_ids, windows, 0..layout.spec().num_layers)
}

/// Like [`paged_to_chunks`] for the layers in `layers` only: one buffer per window holding
/// each plane's rows of those layers back to back (for all layers, the chunk itself; for
/// one layer, the piece a layer-by-layer save sends as soon as the layer is computed, see
/// [`KvCacheSpec::chunk_layer_ranges`](crate::layout::KvCacheSpec::chunk_layer_ranges)).
pub fn paged_to_chunk_layers(
    layout: &KvLayout,
    block_ids: &[u32],
    windows: &[ChunkWindow],
    layers: Range<usize>,
) -> Result<CopyPlan, PlanError> {
    let spec = layout.spec();
    if layers.is_empty() || layers.end > spec.num_layers {
        return Err(PlanError::BadLayers {
            layers,
            num_layers: spec.num_layers,
        });
    }
    let mut last_token = 0;
    for (index, w) in windows.iter().enumerate() {
        let bad = |reason: String| PlanError::BadWindow { index, reason };
        if w.tokens == 0 {
            return Err(bad("it holds no tokens".into()));
        }
        if w.skip_leading > w.tokens {
            return Err(bad(format!(
                "skip_leading {} exceeds its {} tokens",
                w.skip_leading, w.tokens
            )));
        }
        let end = w
            .start
            .checked_add(w.tokens)
            .ok_or_else(|| bad("its token range overflows".into()))?;
        check_whole_blocks(layout, w.start + w.skip_leading..end).map_err(bad)?;
        last_token = last_token.max(end);
    }
    let table = BlockTable::new(layout, block_ids, last_token)?;
    // In a chunk, a token's heads follow each other and so do a (plane, layer)'s tokens.
    let chunk_strides = [spec.row_bytes(), spec.head_bytes()];
    // A window's tokens touch at most one block more than they fill.
    let pieces: usize = windows
        .iter()
        .map(|w| (w.tokens - w.skip_leading).div_ceil(spec.block_size) + 1)
        .sum();
    let planes_layers = spec.kv_planes() * layers.len();
    let mut plan = PlanBuilder::new(layout.num_buffers(), windows.len(), pieces * planes_layers);
    for (chunk, w) in windows.iter().enumerate() {
        for plane in 0..spec.kv_planes() {
            for layer in layers.clone() {
                let first_row = (plane * layers.len() + layer - layers.start) * w.tokens;
                let tokens = w.start + w.skip_leading..w.start + w.tokens;
                for (t, rows) in block_pieces(&[&table], tokens) {
                    let (block, slot) = table.slot(t);
                    let at = layout.locate(layer, plane, block, slot, 0);
                    plan.push(CopyTile {
                        src_buffer: at.buffer as u32,
                        src_offset: at.offset,
                        dst_buffer: chunk as u32,
                        dst_offset: (first_row + t - w.start) * spec.row_bytes(),
                        unit: spec.head_bytes(),
                        rows,
                        cols: spec.num_kv_heads,
                        src_strides: layout.slot_and_head_strides(),
                        dst_strides: chunk_strides,
                    });
                }
            }
        }
    }
    Ok(plan.finish(Endpoint::Paged, Endpoint::Chunks))
}

/// Plans copying request tokens `tokens` from one paged cache to another, each with its
/// own layout, block size and block table.
pub fn paged_to_paged(
    src: &KvLayout,
    src_block_ids: &[u32],
    dst: &KvLayout,
    dst_block_ids: &[u32],
    tokens: Range<usize>,
) -> Result<CopyPlan, PlanError> {
    let spec = src.spec();
    // Layout fingerprints: opaque blocks copy only into the same packing and block size.
    if src.chunk_fingerprint() != dst.chunk_fingerprint() {
        return Err(PlanError::GeometryMismatch {
            src: Box::new(*spec),
            dst: Box::new(*dst.spec()),
        });
    }
    for layout in [src, dst] {
        check_whole_blocks(layout, tokens.clone())
            .map_err(|reason| PlanError::BadWindow { index: 0, reason })?;
    }
    let src_table = BlockTable::new(src, src_block_ids, tokens.end)?;
    let dst_table = BlockTable::new(dst, dst_block_ids, tokens.end)?;
    // Each block boundary of either table starts a piece.
    let len = tokens.len();
    let pieces = len.div_ceil(spec.block_size) + len.div_ceil(dst.spec().block_size) + 1;
    let planes_layers = spec.kv_planes() * spec.num_layers;
    let mut plan = PlanBuilder::new(src.num_buffers(), dst.num_buffers(), pieces * planes_layers);
    for plane in 0..spec.kv_planes() {
        for layer in 0..spec.num_layers {
            for (t, rows) in block_pieces(&[&src_table, &dst_table], tokens.clone()) {
                let (src_block, src_slot) = src_table.slot(t);
                let (dst_block, dst_slot) = dst_table.slot(t);
                let from = src.locate(layer, plane, src_block, src_slot, 0);
                let to = dst.locate(layer, plane, dst_block, dst_slot, 0);
                plan.push(CopyTile {
                    src_buffer: from.buffer as u32,
                    src_offset: from.offset,
                    dst_buffer: to.buffer as u32,
                    dst_offset: to.offset,
                    unit: spec.head_bytes(),
                    rows,
                    cols: spec.num_kv_heads,
                    src_strides: src.slot_and_head_strides(),
                    dst_strides: dst.slot_and_head_strides(),
                });
            }
        }
    }
    Ok(plan.finish(Endpoint::Paged, Endpoint::Paged))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::dtype::KvDtype;
    use crate::layout::{AttentionKind, LayoutKind};
    use rand::seq::SliceRandom;
    use rand::Rng;

    /// Llama-3-8B's KV heads (8 of 128 bf16 elements: 256-byte units), blocks of 16 tokens.
    pub(crate) fn llama_spec(num_layers: usize, num_blocks: usize) -> KvCacheSpec {
        KvCacheSpec {
            num_layers,
            num_kv_heads: 8,
            head_size: 128,
            dtype: KvDtype::Bf16,
            block_size: 16,
            num_blocks,
            attention: AttentionKind::Mha,
        }
    }

    /// A random request on a random small cache: any layout, odd block sizes and counts,
    /// units from 1 to 512 bytes, scattered blocks, windows that start inside blocks and
    /// skip leading tokens.
    pub(crate) fn random_request(rng: &mut impl Rng) -> (KvLayout, Vec<u32>, Vec<ChunkWindow>) {
        let kind = LayoutKind::ALL[rng.gen_range(0..LayoutKind::ALL.len())];
        let attention = match kind {
            LayoutKind::Mla => AttentionKind::Mla,
            LayoutKind::Fused(_) if rng.gen_bool(0.3) => AttentionKind::Mla,
            _ => AttentionKind::Mha,
        };
        let spec = KvCacheSpec {
            num_layers: rng.gen_range(1..=3),
            num_kv_heads: match attention {
                AttentionKind::Mla => 1,
                AttentionKind::Mha => rng.gen_range(1..=5),
            },
            head_size: [1, 4, 40, 64, 128][rng.gen_range(0..5)],
            dtype: [KvDtype::Int8, KvDtype::Bf16, KvDtype::F32][rng.gen_range(0..3)],
            block_size: rng.gen_range(1..=7),
            num_blocks: rng.gen_range(1..=9),
            attention,
        };
        let layout = KvLayout::new(spec, kind).unwrap();
        let mut blocks: Vec<u32> = (0..spec.num_blocks as u32).collect();
        blocks.shuffle(rng);
        let tokens = rng.gen_range(1..=spec.num_blocks * spec.block_size);
        let mut windows = Vec::new();
        let mut start = 0;
        while start < tokens {
            let len = rng.gen_range(1..=tokens - start);
            let skip_leading = if rng.gen_bool(0.3) {
                rng.gen_range(0..=len)
            } else {
                0
            };
            windows.push(window(start, len, skip_leading));
            start += len;
        }
        (layout, blocks, windows)
    }

    /// The plan as the planner once built it: one push per (token, head), each merged into
    /// the previous run where both sides continue it.
    fn unit_by_unit(units: impl Iterator<Item = CopyRun>) -> Vec<CopyRun> {
        let mut runs: Vec<CopyRun> = Vec::new();
        for run in units {
            match runs.last_mut() {
                Some(last) if last.continued_by(&run) => last.len += run.len,
                _ => runs.push(run),
            }
        }
        runs
    }

    #[test]
    fn tiles_hold_the_runs_of_a_unit_by_unit_plan() {
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(15);
        for case in 0..400 {
            let (layout, blocks, windows) = random_request(&mut rng);
            let spec = *layout.spec();
            let plan = paged_to_chunks(&layout, &blocks, &windows).unwrap();
            let (layout_ref, blocks_ref) = (&layout, &blocks);
            let units = windows.iter().enumerate().flat_map(|(chunk, w)| {
                (0..spec.kv_planes() * spec.num_layers).flat_map(move |pl| {
                    let (plane, layer) = (pl / spec.num_layers, pl % spec.num_layers);
                    (w.skip_leading..w.tokens).flat_map(move |t| {
                        let token = w.start + t;
                        let (block, slot) = (
                            blocks_ref[token / spec.block_size] as usize,
                            token % spec.block_size,
                        );
                        (0..spec.num_kv_heads).map(move |head| {
                            let at = layout_ref.locate(layer, plane, block, slot, head);
                            CopyRun {
                                src_buffer: at.buffer as u32,
                                src_offset: at.offset,
                                dst_buffer: chunk as u32,
                                dst_offset: (pl * w.tokens + t) * spec.row_bytes()
                                    + head * spec.head_bytes(),
                                len: spec.head_bytes(),
                            }
                        })
                    })
                })
            });
            let expected = unit_by_unit(units);
            let what = format!("case {case}: {} {spec:?} {windows:?}", layout.kind());
            assert_eq!(plan.num_runs(), expected.len(), "{what}");
            assert_eq!(plan.runs(), &expected[..], "{what}");
            let moved: usize = expected.iter().map(|r| r.len).sum();
            assert_eq!(plan.total_bytes(), moved, "{what}");
            for (i, extent) in plan.src_extents().iter().enumerate() {
                let end = expected.iter().filter(|r| r.src_buffer as usize == i);
                let end = end.map(|r| r.src_offset + r.len).max().unwrap_or(0);
                assert_eq!(*extent, end, "{what}");
            }
            let inverse = plan.inverse();
            assert_eq!(inverse.num_runs(), expected.len(), "{what}");
            assert_eq!(inverse.runs().len(), expected.len(), "{what}");

            // The same request into another layout with another block size and table.
            let mut other_spec = spec;
            other_spec.block_size = rng.gen_range(1..=7);
            other_spec.num_blocks = spec.num_blocks * spec.block_size;
            let kinds = LayoutKind::ALL.iter();
            let kinds: Vec<_> = kinds
                .filter(|k| KvLayout::new(other_spec, **k).is_ok())
                .collect();
            let other = KvLayout::new(other_spec, *kinds[rng.gen_range(0..kinds.len())]).unwrap();
            let mut other_blocks: Vec<u32> = (0..other_spec.num_blocks as u32).collect();
            other_blocks.shuffle(&mut rng);
            let tokens = windows[0].start..windows.last().map_or(0, |w| w.start + w.tokens);
            let tokens = rng.gen_range(0..=tokens.end)..tokens.end;
            let plan =
                paged_to_paged(&layout, &blocks, &other, &other_blocks, tokens.clone()).unwrap();
            let units = (0..spec.kv_planes() * spec.num_layers).flat_map(|pl| {
                let (plane, layer) = (pl / spec.num_layers, pl % spec.num_layers);
                let (layout, other, blocks, other_blocks) =
                    (&layout, &other, &blocks, &other_blocks);
                tokens.clone().flat_map(move |t| {
                    (0..spec.num_kv_heads).map(move |head| {
                        let slot = |bs: usize, ids: &[u32]| (ids[t / bs] as usize, t % bs);
                        let (b, s) = slot(spec.block_size, blocks);
                        let from = layout.locate(layer, plane, b, s, head);
                        let (b, s) = slot(other_spec.block_size, other_blocks);
                        let to = other.locate(layer, plane, b, s, head);
                        CopyRun {
                            src_buffer: from.buffer as u32,
                            src_offset: from.offset,
                            dst_buffer: to.buffer as u32,
                            dst_offset: to.offset,
                            len: spec.head_bytes(),
                        }
                    })
                })
            });
            let expected = unit_by_unit(units);
            let what = format!("{what} into {} {other_spec:?} {tokens:?}", other.kind());
            assert_eq!(plan.num_runs(), expected.len(), "{what}");
            assert_eq!(plan.runs(), &expected[..], "{what}");
        }
    }

    /// A request's plan is one tile per (chunk, plane, layer, block) at most, whatever the
    /// layout: building it costs nothing per token or head.
    #[test]
    fn a_plan_holds_a_tile_per_block_at_most() {
        let spec = llama_spec(4, 64);
        let blocks: Vec<u32> = (0..32).map(|i| (i * 37 + 5) % 64).collect();
        let windows: Vec<_> = (0..4).map(|i| window(i * 128, 128, 0)).collect();
        for kind in LayoutKind::ALL
            .into_iter()
            .filter(|k| *k != LayoutKind::Mla)
        {
            let layout = KvLayout::new(spec, kind).unwrap();
            let plan = paged_to_chunks(&layout, &blocks, &windows).unwrap();
            assert!(
                plan.tiles().len() <= 2 * 4 * 32,
                "{kind}: {}",
                plan.tiles().len()
            );
            assert_eq!(plan.total_bytes(), spec.chunk_bytes(512), "{kind}");
        }
    }

    fn layout(kind: LayoutKind) -> KvLayout {
        let spec = KvCacheSpec {
            num_layers: 2,
            num_kv_heads: 2,
            head_size: 8,
            dtype: KvDtype::F16,
            block_size: 4,
            num_blocks: 6,
            attention: AttentionKind::Mha,
        };
        KvLayout::new(spec, kind).unwrap()
    }

    fn window(start: usize, tokens: usize, skip_leading: usize) -> ChunkWindow {
        ChunkWindow {
            start,
            tokens,
            skip_leading,
        }
    }

    #[test]
    fn nhd_runs_coalesce_across_a_block_and_adjacent_blocks() {
        let layout = layout(LayoutKind::FlashAttnNhd);
        // Blocks 2 and 3 are adjacent in memory: one run per (plane, layer).
        let plan = paged_to_chunks(&layout, &[2, 3], &[window(0, 8, 0)]).unwrap();
        assert_eq!(plan.runs().len(), 4);
        assert_eq!(plan.total_bytes(), layout.spec().chunk_bytes(8));
        // Blocks 3 then 1 are not: two runs per (plane, layer).
        let plan = paged_to_chunks(&layout, &[3, 1], &[window(0, 8, 0)]).unwrap();
        assert_eq!(plan.runs().len(), 8);
    }

    /// Gathering a request in runs of layers, each piece's planes put where
    /// `chunk_layer_ranges` says, makes the same chunks as gathering it whole.
    #[test]
    fn layer_pieces_make_the_whole_chunks() {
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(11);
        for case in 0..300 {
            let (layout, blocks, windows) = random_request(&mut rng);
            let spec = *layout.spec();
            let whole = paged_to_chunks(&layout, &blocks, &windows).unwrap();
            let paged: Vec<Vec<u8>> = (0..layout.num_buffers())
                .map(|b| {
                    (0..layout.buffer_bytes())
                        .map(|i| (i * 31 + b) as u8)
                        .collect()
                })
                .collect();
            let src: Vec<&[u8]> = paged.iter().map(|b| &b[..]).collect();
            let mut expected: Vec<Vec<u8>> = windows
                .iter()
                .map(|w| vec![0; spec.chunk_bytes(w.tokens)])
                .collect();
            let mut dst: Vec<&mut [u8]> = expected.iter_mut().map(|b| &mut b[..]).collect();
            whole.execute(&src, &mut dst).unwrap();
            let mut assembled: Vec<Vec<u8>> = windows
                .iter()
                .map(|w| vec![0; spec.chunk_bytes(w.tokens)])
                .collect();
            // The layers in runs cut at random, as a save does that sends each layer it saw
            // computed and the rest at the end.
            let mut cuts: Vec<usize> = (1..spec.num_layers).filter(|_| rng.gen_bool(0.5)).collect();
            cuts.push(spec.num_layers);
            let mut first = 0;
            for end in cuts {
                let layers = first..end;
                first = end;
                let plan = paged_to_chunk_layers(&layout, &blocks, &windows, layers.clone());
                let plan = plan.unwrap();
                let mut pieces: Vec<Vec<u8>> = windows
                    .iter()
                    .map(|w| vec![0; spec.chunk_layers_bytes(w.tokens, layers.clone())])
                    .collect();
                let mut dst: Vec<&mut [u8]> = pieces.iter_mut().map(|b| &mut b[..]).collect();
                plan.execute(&src, &mut dst).unwrap();
                for ((chunk, piece), w) in assembled.iter_mut().zip(&pieces).zip(&windows) {
                    let ranges = spec.chunk_layer_ranges(w.tokens, layers.clone());
                    let mut at = 0;
                    for range in ranges {
                        let len = range.len();
                        chunk[range].copy_from_slice(&piece[at..at + len]);
                        at += len;
                    }
                    assert_eq!(at, piece.len());
                }
            }
            assert_eq!(
                assembled,
                expected,
                "case {case}: {} {spec:?} {windows:?}",
                layout.kind()
            );
        }
        let layout = layout(LayoutKind::FlashAttnNhd);
        for layers in [0..0, 1..3, 2..3] {
            assert!(matches!(
                paged_to_chunk_layers(&layout, &[0], &[window(0, 4, 0)], layers),
                Err(PlanError::BadLayers { num_layers: 2, .. })
            ));
        }
    }

    #[test]
    fn bad_block_tables_and_windows_are_errors() {
        let layout = layout(LayoutKind::FlashAttnNhd);
        assert!(matches!(
            paged_to_chunks(&layout, &[0], &[window(0, 5, 0)]),
            Err(PlanError::BlockTableTooShort { needed: 2, .. })
        ));
        assert!(matches!(
            paged_to_chunks(&layout, &[6], &[window(0, 4, 0)]),
            Err(PlanError::BlockOutOfRange { block_id: 6, .. })
        ));
        assert!(matches!(
            paged_to_chunks(&layout, &[0], &[window(0, 2, 3)]),
            Err(PlanError::BadWindow { index: 0, .. })
        ));
        assert!(matches!(
            paged_to_chunks(&layout, &[0], &[window(usize::MAX, 2, 0)]),
            Err(PlanError::BadWindow { .. })
        ));
        let plan = paged_to_chunks(&layout, &[0], &[window(0, 4, 0)]).unwrap();
        let src = vec![0u8; layout.buffer_bytes()];
        let mut small = vec![0u8; 8];
        assert!(matches!(
            plan.execute(&[&src, &src], &mut [&mut small]),
            Err(PlanError::BufferTooSmall { .. })
        ));
        assert!(matches!(
            plan.execute(&[&src], &mut [&mut small]),
            Err(PlanError::BufferCount { .. })
        ));
    }

    #[test]
    fn opaque_blocks_move_whole_blocks_only() {
        use crate::layout::{BlockPacking, CpuAttnIsa};
        let opaque = {
            let kind = LayoutKind::OpaqueBlocks(BlockPacking::CpuAttn(CpuAttnIsa::Vec));
            KvLayout::new(*layout(LayoutKind::FlashAttnNhd).spec(), kind).unwrap()
        };
        // Two whole blocks (block size 4): each block's bytes go out and come back unchanged.
        let blocks = [4, 1];
        let plan = paged_to_chunks(&opaque, &blocks, &[window(0, 8, 0)]).unwrap();
        let paged: Vec<Vec<u8>> = (0..2)
            .map(|layer| {
                (0..opaque.buffer_bytes())
                    .map(|i| (i * 7 + layer) as u8)
                    .collect()
            })
            .collect();
        let mut chunk = vec![0u8; opaque.spec().chunk_bytes(8)];
        let src: Vec<&[u8]> = paged.iter().map(|b| &b[..]).collect();
        plan.execute(&src, &mut [&mut chunk]).unwrap();
        let mut restored = vec![vec![0u8; opaque.buffer_bytes()]; 2];
        let mut dst: Vec<&mut [u8]> = restored.iter_mut().map(|b| &mut b[..]).collect();
        plan.inverse().execute(&[&chunk], &mut dst).unwrap();
        let block_bytes = opaque.buffer_bytes() / opaque.spec().num_blocks;
        for layer in 0..2 {
            for block in 0..opaque.spec().num_blocks {
                let bytes = block * block_bytes..(block + 1) * block_bytes;
                let expected = if blocks.contains(&(block as u32)) {
                    &paged[layer][bytes.clone()]
                } else {
                    &vec![0u8; block_bytes][..]
                };
                assert_eq!(
                    &restored[layer][bytes], expected,
                    "layer {layer} block {block}"
                );
            }
        }
        // Part of a block, at either end, is refused.
        for w in [window(0, 6, 0), window(0, 8, 2), window(2, 6, 0)] {
            assert!(matches!(
                paged_to_chunks(&opaque, &blocks, &[w]),
                Err(PlanError::BadWindow { .. })
            ));
        }
        // Opaque blocks are no other layout's bytes.
        let nhd = layout(LayoutKind::FlashInferNhd);
        assert!(matches!(
            paged_to_paged(&opaque, &[0], &nhd, &[0], 0..4),
            Err(PlanError::GeometryMismatch { .. })
        ));
        assert!(paged_to_paged(&opaque, &[0], &opaque, &[1], 0..4).is_ok());
        assert!(matches!(
            paged_to_paged(&opaque, &[0], &opaque, &[1], 0..3),
            Err(PlanError::BadWindow { .. })
        ));
    }

    #[test]
    fn paged_to_paged_rejects_other_geometry() {
        let a = layout(LayoutKind::FlashAttnNhd);
        let mut spec = *a.spec();
        spec.head_size = 16;
        let b = KvLayout::new(spec, LayoutKind::FlashAttnNhd).unwrap();
        assert!(matches!(
            paged_to_paged(&a, &[0], &b, &[0], 0..4),
            Err(PlanError::GeometryMismatch { .. })
        ));
    }
}
