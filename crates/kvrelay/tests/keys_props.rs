//! Chaining properties of `ChunkHasher`, for both algorithms.

use kvrelay::keys::{ChunkHasher, HashAlgorithm};
use proptest::prelude::*;

fn algorithm() -> impl Strategy<Value = HashAlgorithm> {
    prop_oneof![
        Just(HashAlgorithm::Sha256Cbor),
        Just(HashAlgorithm::Xxh3_128)
    ]
}

/// Token ids of every CBOR width, mostly vocabulary-sized.
fn token() -> impl Strategy<Value = u32> {
    prop_oneof![
        0u32..24,
        24u32..256,
        256u32..65536,
        65536u32..200_000,
        any::<u32>()
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn hashes_equal_chaining_one_chunk_at_a_time(
        algorithm in algorithm(),
        seed in "[a-z0-9-]{0,40}",
        chunk_size in prop_oneof![1usize..8, 200usize..600],
        tokens in prop::collection::vec(token(), 0..1500),
    ) {
        let hasher = ChunkHasher::new(algorithm, &seed, chunk_size).unwrap();
        let mut prefix = hasher.none_hash();
        let mut chained = Vec::new();
        for chunk in tokens.chunks(chunk_size) {
            prefix = hasher.hash_chunk(prefix, chunk);
            chained.push(prefix);
        }
        prop_assert_eq!(hasher.chunk_hashes(&tokens), chained);
    }

    #[test]
    fn hashes_of_a_prefix_are_a_prefix_of_the_hashes(
        algorithm in algorithm(),
        chunk_size in 1usize..300,
        tokens in prop::collection::vec(token(), 0..1200),
        cut in any::<prop::sample::Index>(),
    ) {
        let hasher = ChunkHasher::new(algorithm, "0", chunk_size).unwrap();
        let all = hasher.chunk_hashes(&tokens);
        // Cut at a chunk boundary: the full chunks before it keep their hashes.
        let chunks = tokens.len().div_ceil(chunk_size);
        let keep = cut.index(chunks + 1);
        let end = (keep * chunk_size).min(tokens.len());
        let prefix = hasher.chunk_hashes(&tokens[..end]);
        prop_assert_eq!(&prefix[..], &all[..keep]);
    }

    #[test]
    fn changing_any_token_changes_that_chunk_and_all_later(
        algorithm in algorithm(),
        tokens in prop::collection::vec(token(), 1..700),
        at in any::<prop::sample::Index>(),
    ) {
        let hasher = ChunkHasher::new(algorithm, "vllm-none-hash", 64).unwrap();
        let before = hasher.chunk_hashes(&tokens);
        let mut changed = tokens.clone();
        let i = at.index(tokens.len());
        changed[i] = changed[i].wrapping_add(1);
        let after = hasher.chunk_hashes(&changed);
        let first = i / 64;
        prop_assert_eq!(&before[..first], &after[..first]);
        for (b, a) in before[first..].iter().zip(&after[first..]) {
            prop_assert_ne!(b, a);
        }
    }
}

#[test]
fn seed_and_algorithm_change_every_hash() {
    let tokens: Vec<u32> = (0..1000).collect();
    let a = ChunkHasher::new(HashAlgorithm::Sha256Cbor, "0", 256).unwrap();
    let b = ChunkHasher::new(HashAlgorithm::Sha256Cbor, "1", 256).unwrap();
    let c = ChunkHasher::new(HashAlgorithm::Xxh3_128, "0", 256).unwrap();
    let (ha, hb, hc) = (
        a.chunk_hashes(&tokens),
        b.chunk_hashes(&tokens),
        c.chunk_hashes(&tokens),
    );
    for i in 0..ha.len() {
        assert_ne!(ha[i], hb[i]);
        assert_ne!(ha[i], hc[i]);
    }
}
