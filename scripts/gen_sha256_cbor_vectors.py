#!/usr/bin/env python3
"""Generate sha256_cbor chunk-hash test vectors with the real cbor2 library.

The reference follows vLLM's `sha256_cbor` and LMCache's token database:
  hash_fn(obj)  = sha256(cbor2.dumps(obj, canonical=True)).digest()
  NONE_HASH     = int.from_bytes(hash_fn(seed_str)[:8], "big")
  chunk i       = tokens[i*chunk_size:(i+1)*chunk_size]   (last chunk may be partial)
  hash_i        = int.from_bytes(hash_fn((prefix, tuple(chunk), ()))[:8], "big"),
                  prefix = NONE_HASH for chunk 0, else hash_{i-1}
  key           = f"{model}@{world_size}@{worker_id}@{hash:x}@{dtype}"

Usage: pip install cbor2 && python3 scripts/gen_sha256_cbor_vectors.py
Writes crates/kvrelay/tests/data/sha256_cbor_vectors.json (deterministic: fixed RNG seed).
"""

import hashlib
import json
import random
from importlib.metadata import version
from pathlib import Path

import cbor2

MODEL = "meta-llama/Llama-3.2-1B"
WORLD_SIZE = 1
WORKER_ID = 0
DTYPE = "bfloat16"
LENGTHS = [1, 255, 256, 257, 4097]
CHUNK_SIZES = [16, 128, 256]
SEEDS = ["vllm-none-hash", "0", "42"]
U32_MAX = 2**32 - 1

# One range per CBOR uint width: inline, 1-byte, 2-byte, 4-byte (vocab-like), 4-byte near the top.
WIDTH_RANGES = [(0, 23), (24, 255), (256, 65535), (65536, 200000), (U32_MAX - 1000, U32_MAX)]
# Every width boundary, placed at the start of the longest list.
EDGES = [0, 1, 23, 24, 255, 256, 65535, 65536, 16777215, 16777216, U32_MAX - 1, U32_MAX]


def sha256_cbor(obj) -> bytes:
    return hashlib.sha256(cbor2.dumps(obj, canonical=True)).digest()


def to_u64(digest: bytes) -> int:
    return int.from_bytes(digest[:8], "big")


def chain(tokens, chunk_size, none_hash):
    hashes = []
    prefix = none_hash
    for start in range(0, len(tokens), chunk_size):
        chunk = tuple(tokens[start:start + chunk_size])
        prefix = to_u64(sha256_cbor((prefix, chunk, ())))
        hashes.append(prefix)
    return hashes


def token_list(rng: random.Random, length: int):
    tokens = [rng.randint(*rng.choice(WIDTH_RANGES)) for _ in range(length)]
    if length >= len(EDGES) * 4:
        tokens[: len(EDGES)] = EDGES
    return tokens


def self_check():
    """The values in the LMCache reference notes, so a broken environment fails loudly."""
    none_hash = to_u64(sha256_cbor("vllm-none-hash"))
    assert none_hash == 0x9BD96A485AD84EFD, hex(none_hash)
    assert chain(list(range(1, 257)) + [7, 8, 9], 256, none_hash) == [
        0xD32563AADEC44566,
        0x4F6C3C8690A1033C,
    ]


def main():
    self_check()
    rng = random.Random(20240917)
    token_lists = [token_list(rng, n) for n in LENGTHS]
    cases = []
    for seed in SEEDS:
        none_hash = to_u64(sha256_cbor(seed))
        for index, tokens in enumerate(token_lists):
            for chunk_size in CHUNK_SIZES:
                hashes = chain(tokens, chunk_size, none_hash)
                cases.append({
                    "tokens": index,
                    "chunk_size": chunk_size,
                    "seed": seed,
                    "none_hash": f"{none_hash:016x}",
                    "chunk_hashes": [f"{h:016x}" for h in hashes],
                    "keys": [f"{MODEL}@{WORLD_SIZE}@{WORKER_ID}@{h:x}@{DTYPE}" for h in hashes],
                })
    out = {
        "generator": "scripts/gen_sha256_cbor_vectors.py",
        "cbor2_version": version("cbor2"),
        "model": MODEL,
        "world_size": WORLD_SIZE,
        "worker_id": WORKER_ID,
        "dtype": DTYPE,
        "token_lists": token_lists,
        "cases": cases,
    }
    path = Path(__file__).resolve().parent.parent / "crates/kvrelay/tests/data/sha256_cbor_vectors.json"
    path.write_text(json.dumps(out, separators=(",", ":")) + "\n")
    print(f"wrote {len(cases)} cases to {path}")


if __name__ == "__main__":
    main()
