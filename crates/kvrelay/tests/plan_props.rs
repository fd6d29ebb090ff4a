//! Property tests of copy plans: gather matches a position-by-position reference, scatter
//! after gather restores exactly the copied bytes and touches nothing else, and a
//! layout-to-layout copy preserves every token.

use kvrelay::layout::{AttentionKind, KvCacheSpec, KvLayout, LayoutKind};
use kvrelay::plan::{paged_to_chunks, paged_to_paged, ChunkWindow};
use kvrelay::KvDtype;
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone)]
struct Case {
    layout: KvLayout,
    block_ids: Vec<u32>,
    windows: Vec<ChunkWindow>,
    seed: u64,
}

fn spec_strategy() -> impl Strategy<Value = KvCacheSpec> {
    (
        1usize..4,
        1usize..4,
        prop::sample::select(vec![1usize, 2, 8]),
        prop::sample::select(KvDtype::ALL.to_vec()),
        1usize..9,
        any::<bool>(),
    )
        .prop_map(
            |(layers, heads, head_size, dtype, block_size, mla)| KvCacheSpec {
                num_layers: layers,
                num_kv_heads: if mla { 1 } else { heads },
                head_size,
                dtype,
                block_size,
                num_blocks: 24,
                attention: if mla {
                    AttentionKind::Mla
                } else {
                    AttentionKind::Mha
                },
            },
        )
}

fn layout_strategy() -> impl Strategy<Value = KvLayout> {
    (
        spec_strategy(),
        prop::sample::select(LayoutKind::ALL.to_vec()),
    )
        .prop_filter_map("layout supports the attention kind", |(spec, kind)| {
            KvLayout::new(spec, kind).ok()
        })
}

/// A request of `n` tokens in random distinct blocks, cut into chunks of `chunk` tokens (the
/// last one partial) with the first `skip` tokens of the request already held.
fn case_strategy() -> impl Strategy<Value = Case> {
    (layout_strategy(), 1usize..40, 1usize..17, any::<u64>())
        .prop_flat_map(|(layout, tokens, chunk, seed)| {
            let max_tokens = layout.spec().num_blocks * layout.spec().block_size;
            let tokens = tokens.min(max_tokens);
            (
                Just(layout),
                Just(tokens),
                Just(chunk),
                0..=tokens,
                Just(seed),
            )
        })
        .prop_map(|(layout, tokens, chunk, skip, seed)| {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut ids: Vec<u32> = (0..layout.spec().num_blocks as u32).collect();
            ids.shuffle(&mut rng);
            ids.truncate(tokens.div_ceil(layout.spec().block_size));
            let windows = (0..tokens)
                .step_by(chunk)
                .map(|start| {
                    let len = chunk.min(tokens - start);
                    ChunkWindow {
                        start,
                        tokens: len,
                        skip_leading: skip.saturating_sub(start).min(len),
                    }
                })
                .filter(|w| w.skip_leading < w.tokens)
                .collect();
            Case {
                layout,
                block_ids: ids,
                windows,
                seed,
            }
        })
}

fn random_buffers(layout: &KvLayout, rng: &mut StdRng) -> Vec<Vec<u8>> {
    (0..layout.num_buffers())
        .map(|_| (0..layout.buffer_bytes()).map(|_| rng.gen()).collect())
        .collect()
}

/// The chunk buffers a gather must produce, computed one head at a time with no coalescing.
fn reference_chunks(case: &Case, paged: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let spec = case.layout.spec();
    let head = spec.head_bytes();
    case.windows
        .iter()
        .map(|w| {
            let mut chunk = vec![0u8; spec.chunk_bytes(w.tokens)];
            for plane in 0..spec.kv_planes() {
                for layer in 0..spec.num_layers {
                    for t in w.skip_leading..w.tokens {
                        let token = w.start + t;
                        let block = case.block_ids[token / spec.block_size] as usize;
                        for h in 0..spec.num_kv_heads {
                            let at =
                                case.layout
                                    .locate(layer, plane, block, token % spec.block_size, h);
                            let out = ((plane * spec.num_layers + layer) * w.tokens + t)
                                * spec.row_bytes()
                                + h * head;
                            chunk[out..out + head]
                                .copy_from_slice(&paged[at.buffer][at.offset..at.offset + head]);
                        }
                    }
                }
            }
            chunk
        })
        .collect()
}

fn gather(case: &Case, layout: &KvLayout, block_ids: &[u32], paged: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let plan = paged_to_chunks(layout, block_ids, &case.windows).unwrap();
    let mut chunks: Vec<Vec<u8>> = case
        .windows
        .iter()
        .map(|w| vec![0u8; layout.spec().chunk_bytes(w.tokens)])
        .collect();
    let src: Vec<&[u8]> = paged.iter().map(Vec::as_slice).collect();
    let mut dst: Vec<&mut [u8]> = chunks.iter_mut().map(Vec::as_mut_slice).collect();
    plan.execute(&src, &mut dst).unwrap();
    chunks
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn gather_matches_reference_and_scatter_restores_exactly(case in case_strategy()) {
        let mut rng = StdRng::seed_from_u64(case.seed);
        let paged = random_buffers(&case.layout, &mut rng);
        let chunks = gather(&case, &case.layout, &case.block_ids, &paged);
        prop_assert_eq!(&chunks, &reference_chunks(&case, &paged));

        // Scatter into zeroed memory: copied heads come back, every other byte stays 0.
        let gather_plan = paged_to_chunks(&case.layout, &case.block_ids, &case.windows).unwrap();
        let scatter = gather_plan.inverse();
        let mut restored = vec![vec![0u8; case.layout.buffer_bytes()]; case.layout.num_buffers()];
        let src: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
        let mut dst: Vec<&mut [u8]> = restored.iter_mut().map(Vec::as_mut_slice).collect();
        scatter.execute(&src, &mut dst).unwrap();
        let mut expected = vec![vec![0u8; case.layout.buffer_bytes()]; case.layout.num_buffers()];
        for run in gather_plan.runs() {
            let (b, o, n) = (run.src_buffer as usize, run.src_offset, run.len);
            expected[b][o..o + n].copy_from_slice(&paged[b][o..o + n]);
        }
        prop_assert_eq!(restored, expected);
    }

    #[test]
    fn layout_to_layout_copy_preserves_every_token(case in case_strategy(), other_kind in prop::sample::select(LayoutKind::ALL.to_vec()), other_block_size in 1usize..9) {
        let mut other_spec = *case.layout.spec();
        other_spec.block_size = other_block_size;
        prop_assume!(KvLayout::new(other_spec, other_kind).is_ok());
        let other = KvLayout::new(other_spec, other_kind).unwrap();
        let tokens = case.windows.last().map_or(0, |w| w.start + w.tokens);
        prop_assume!(tokens <= other_spec.num_blocks * other_block_size);
        let mut rng = StdRng::seed_from_u64(case.seed);
        let mut other_ids: Vec<u32> = (0..other_spec.num_blocks as u32).collect();
        other_ids.shuffle(&mut rng);
        other_ids.truncate(tokens.div_ceil(other_block_size));

        let paged = random_buffers(&case.layout, &mut rng);
        let plan = paged_to_paged(&case.layout, &case.block_ids, &other, &other_ids, 0..tokens).unwrap();
        let mut copied = vec![vec![0u8; other.buffer_bytes()]; other.num_buffers()];
        let src: Vec<&[u8]> = paged.iter().map(Vec::as_slice).collect();
        let mut dst: Vec<&mut [u8]> = copied.iter_mut().map(Vec::as_mut_slice).collect();
        plan.execute(&src, &mut dst).unwrap();
        prop_assert_eq!(
            gather(&case, &case.layout, &case.block_ids, &paged),
            gather(&case, &other, &other_ids, &copied)
        );
        prop_assert_eq!(plan.total_bytes(), case.layout.spec().chunk_bytes(tokens));
    }
}
