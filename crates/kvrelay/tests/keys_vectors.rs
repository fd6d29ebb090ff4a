//! sha256_cbor chunk hashes and key strings against vectors computed by Python's cbor2
//! (scripts/gen_sha256_cbor_vectors.py), exactly as vLLM/LMCache compute them, and LMCache's
//! `builtin` hashes against CPython's hash() (scripts/gen_builtin_vectors.py).

use kvrelay::keys::{BuiltinHash, CacheKey, ChunkHasher, CpythonVersion, HashAlgorithm};
use kvrelay::KvDtype;
use serde::Deserialize;

#[derive(Deserialize)]
struct Vectors {
    model: String,
    world_size: u32,
    worker_id: u32,
    dtype: String,
    token_lists: Vec<Vec<u32>>,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    tokens: usize,
    chunk_size: usize,
    seed: String,
    none_hash: String,
    chunk_hashes: Vec<String>,
    keys: Vec<String>,
}

fn vectors() -> Vectors {
    let text = include_str!("data/sha256_cbor_vectors.json");
    serde_json::from_str(text).expect("vector file parses")
}

fn hex(s: &str) -> u64 {
    u64::from_str_radix(s, 16).expect("hex hash")
}

#[test]
fn every_vector_matches_cbor2() {
    let v = vectors();
    assert_eq!(v.cases.len(), 45);
    let dtype: KvDtype = v.dtype.parse().unwrap();
    let model = CacheKey::model_name(&v.model).unwrap();
    for case in &v.cases {
        let tokens = &v.token_lists[case.tokens];
        let what = format!(
            "seed {:?}, {} tokens, chunk {}",
            case.seed,
            tokens.len(),
            case.chunk_size
        );
        let hasher = ChunkHasher::new(HashAlgorithm::Sha256Cbor, &case.seed, case.chunk_size)
            .expect("valid hasher");
        assert_eq!(hasher.none_hash(), hex(&case.none_hash), "{what}");
        let expected: Vec<u64> = case.chunk_hashes.iter().map(|h| hex(h)).collect();
        assert_eq!(hasher.chunk_hashes(tokens), expected, "{what}");
        let keys: Vec<String> = hasher
            .chunks(tokens)
            .map(|(_, hash)| {
                CacheKey::with_model(model.clone(), v.world_size, v.worker_id, hash, dtype)
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(keys, case.keys, "{what}");
        for key in &case.keys {
            assert_eq!(&key.parse::<CacheKey>().unwrap().to_string(), key);
        }
    }
}

#[test]
fn vectors_cover_every_cbor_width() {
    let v = vectors();
    let all: Vec<u32> = v.token_lists.concat();
    let has = |lo: u32, hi: u32| all.iter().any(|&t| (lo..=hi).contains(&t));
    assert!(has(0, 23) && has(24, 255) && has(256, 65535) && has(65536, u32::MAX));
    assert!(all.contains(&u32::MAX) && all.contains(&0));
    let lens: Vec<usize> = v.token_lists.iter().map(Vec::len).collect();
    assert_eq!(lens, [1, 255, 256, 257, 4097]);
}

/// LMCache `builtin` vectors from CPython's own hash() (scripts/gen_builtin_vectors.py):
/// CPython 3.11 and 3.10, with and without vLLM, PYTHONHASHSEED 0 and 42.
#[derive(Deserialize)]
struct BuiltinVectors {
    model: String,
    dtype: String,
    token_lists: Vec<Vec<u32>>,
    cases: Vec<BuiltinCase>,
}

#[derive(Deserialize)]
struct BuiltinCase {
    cpython: String,
    with_vllm: bool,
    seed: String,
    tokens: usize,
    chunk_size: usize,
    none_hash: i64,
    chunk_hashes: Vec<i64>,
    keys: Vec<String>,
}

#[test]
fn every_builtin_vector_matches_cpython() {
    let v: BuiltinVectors =
        serde_json::from_str(include_str!("data/builtin_vectors.json")).expect("vectors parse");
    assert_eq!(v.cases.len(), 96);
    let dtype: KvDtype = v.dtype.parse().unwrap();
    let model = CacheKey::model_name(&v.model).unwrap();
    let mut negative = 0;
    for case in &v.cases {
        let tokens = &v.token_lists[case.tokens];
        let what = format!(
            "CPython {} vLLM {} seed {} {} tokens chunk {}",
            case.cpython,
            case.with_vllm,
            case.seed,
            tokens.len(),
            case.chunk_size
        );
        let algorithm = HashAlgorithm::Builtin(BuiltinHash {
            cpython: CpythonVersion::parse(&case.cpython).unwrap(),
            with_vllm: case.with_vllm,
        });
        let hasher = ChunkHasher::new(algorithm, &case.seed, case.chunk_size).unwrap();
        assert_eq!(hasher.none_hash() as i64, case.none_hash, "{what}");
        let hashes: Vec<i64> = hasher
            .chunk_hashes(tokens)
            .into_iter()
            .map(|h| h as i64)
            .collect();
        assert_eq!(hashes, case.chunk_hashes, "{what}");
        for ((_, hash), expected) in hasher.chunks(tokens).zip(&case.keys) {
            let key = CacheKey::with_model(model.clone(), 1, 0, hash, dtype)
                .unwrap()
                .signed(true);
            assert_eq!(&key.to_string(), expected, "{what}");
            assert_eq!(expected.parse::<CacheKey>().unwrap(), key, "{what}");
            negative += usize::from(expected.contains("@-"));
        }
    }
    assert!(negative > 100, "only {negative} negative keys");
}
