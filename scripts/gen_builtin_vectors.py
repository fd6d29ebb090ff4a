#!/usr/bin/env python3
"""Generate LMCache `builtin` chunk-hash test vectors with CPython's own hash().

LMCache's token database with pre_caching_hash_algorithm "builtin" computes
  NONE_HASH = hash(os.environ["PYTHONHASHSEED"])  with vLLM importable, else 0
  hash_i    = hash((prefix, tuple(chunk), ())),  prefix = NONE_HASH for chunk 0
  key       = f"{model}@{world_size}@{worker_id}@{hash:x}@{dtype}"   (signed hex)

CPython 3.11+ (this interpreter): every value comes from the real hash() of a child
interpreter started with the case's PYTHONHASHSEED.

CPython 3.10 differs only in the str hash (SipHash-2-4 instead of SipHash-1-3), so only
NONE_HASH differs. It is computed with the reference SipHash below, which is checked first:
  - with 1-3 rounds and CPython's PYTHONHASHSEED key derivation, against the real hash() of
    several strings (Latin-1, UCS-2, UCS-4) under seeds 0 and 42;
  - with 2-4 rounds, against the published SipHash-2-4 vectors (key 00..0f).
The chain after NONE_HASH uses the real int/tuple hash(), which is the same in 3.8..3.13.

Usage: python3.11 scripts/gen_builtin_vectors.py
Writes crates/kvrelay/tests/data/builtin_vectors.json (deterministic: fixed RNG seed).
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

MODEL = "meta-llama/Llama-3.2-1B"
DTYPE = "bfloat16"
LENGTHS = [1, 255, 256, 257, 1000]
CHUNK_SIZES = [16, 256]
SEEDS = ["0", "42"]
M64 = 2**64 - 1

# The first published SipHash-2-4 outputs, key 00..0f, message 00..len-1.
SIPHASH24_VECTORS = [0x726FDB47DD0E0E31, 0x74F839C593DC67FD, 0x0D6C8009D9A94F5A, 0x85676696D7FB7E2D]
STR_SAMPLES = ["0", "42", "vllm-none-hash", "é", "€uro", "😀x", "a" * 17]


def rotl(x, b):
    return ((x << b) | (x >> (64 - b))) & M64


def siphash(c, d, k0, k1, data: bytes) -> int:
    v0, v1 = k0 ^ 0x736F6D6570736575, k1 ^ 0x646F72616E646F6D
    v2, v3 = k0 ^ 0x6C7967656E657261, k1 ^ 0x7465646279746573

    def rounds(n):
        nonlocal v0, v1, v2, v3
        for _ in range(n):
            v0 = (v0 + v1) & M64; v1 = rotl(v1, 13) ^ v0; v0 = rotl(v0, 32)
            v2 = (v2 + v3) & M64; v3 = rotl(v3, 16) ^ v2
            v0 = (v0 + v3) & M64; v3 = rotl(v3, 21) ^ v0
            v2 = (v2 + v1) & M64; v1 = rotl(v1, 17) ^ v2; v2 = rotl(v2, 32)

    tail = len(data) % 8
    words = [int.from_bytes(data[i:i + 8], "little") for i in range(0, len(data) - tail, 8)]
    words.append(int.from_bytes(data[len(data) - tail:], "little") | ((len(data) & 0xFF) << 56))
    for m in words:
        v3 ^= m
        rounds(c)
        v0 ^= m
    v2 ^= 0xFF
    rounds(d)
    return v0 ^ v1 ^ v2 ^ v3


def secret(seed: int):
    """CPython's SipHash key for PYTHONHASHSEED=seed (0: all zero; else its LCG bytes)."""
    out = bytearray(16)
    if seed:
        x = seed
        for i in range(16):
            x = (x * 214013 + 2531011) & 0xFFFFFFFF
            out[i] = (x >> 16) & 0xFF
    return int.from_bytes(out[:8], "little"), int.from_bytes(out[8:], "little")


def internal_bytes(s: str) -> bytes:
    width = max((1 if ord(ch) < 0x100 else 2 if ord(ch) < 0x10000 else 4) for ch in s)
    return b"".join(ord(ch).to_bytes(width, "little") for ch in s)


def str_hash(s: str, seed: int, rounds) -> int:
    if not s:
        return 0
    h = siphash(*rounds, *secret(seed), internal_bytes(s))
    h = h - 2**64 if h >= 2**63 else h
    return -2 if h == -1 else h


# Runs in a child interpreter under the case's PYTHONHASHSEED: real hash() only.
CHILD = r"""
import json, sys
req = json.load(sys.stdin)
out = {"strs": {s: hash(s) for s in req["strs"]}, "chains": []}
for none_hash, tokens, chunk in req["chains"]:
    prefix, hashes = none_hash, []
    for i in range(0, len(tokens), chunk):
        prefix = hash((prefix, tuple(tokens[i:i + chunk]), ()))
        hashes.append(prefix)
    out["chains"].append(hashes)
json.dump(out, sys.stdout)
"""


def real_hash(seed: str, strs, chains):
    env = dict(os.environ, PYTHONHASHSEED=seed)
    req = json.dumps({"strs": strs, "chains": chains})
    res = subprocess.run([sys.executable, "-c", CHILD], input=req, env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(res.stdout)


def self_check():
    assert sys.version_info >= (3, 11) and sys.hash_info.algorithm == "siphash13", sys.hash_info
    k0, k1 = int.from_bytes(bytes(range(8)), "little"), int.from_bytes(bytes(range(8, 16)), "little")
    for n, want in enumerate(SIPHASH24_VECTORS):
        assert siphash(2, 4, k0, k1, bytes(range(n))) == want, n
    for seed in SEEDS:
        real = real_hash(seed, STR_SAMPLES, [])["strs"]
        for s in STR_SAMPLES:
            assert str_hash(s, int(seed), (1, 3)) == real[s], (seed, s)
    # The check value from LMCache 0.5.6, CPython 3.11, vLLM, PYTHONHASHSEED=0.
    assert real_hash("0", ["0"], [])["strs"]["0"] == 5313149338359954478


def key(h: int) -> str:
    return f"{MODEL}@1@0@{h:x}@{DTYPE}"


def main():
    self_check()
    rng = random.Random(20261201)
    # Vocabulary-like ids; list 0 is tokens 0..255, the LMCache check case.
    token_lists = [list(range(256))] + [[rng.randrange(0, 200_000) for _ in range(n)] for n in LENGTHS]
    cases = []
    for cpython in ["3.11", "3.10"]:
        for with_vllm in [True, False]:
            for seed in SEEDS:
                if not with_vllm:
                    none_hash = 0
                elif cpython == "3.11":
                    none_hash = real_hash(seed, [seed], [])["strs"][seed]
                else:
                    none_hash = str_hash(seed, int(seed), (2, 4))
                chains = [(none_hash, t, c) for t in token_lists for c in CHUNK_SIZES]
                results = real_hash(seed, [], chains)["chains"]
                for (_, tokens, chunk), hashes in zip(chains, results):
                    cases.append({
                        "cpython": cpython,
                        "with_vllm": with_vllm,
                        "seed": seed,
                        "tokens": next(i for i, t in enumerate(token_lists) if t is tokens),
                        "chunk_size": chunk,
                        "none_hash": none_hash,
                        "chunk_hashes": hashes,
                        "keys": [key(h) for h in hashes],
                    })
    assert any(h < 0 for c in cases for h in c["chunk_hashes"]), "no negative hash"
    out = {
        "generator": "scripts/gen_builtin_vectors.py",
        "python": sys.version.split()[0],
        "model": MODEL,
        "dtype": DTYPE,
        "token_lists": token_lists,
        "cases": cases,
    }
    path = Path(__file__).resolve().parent.parent / "crates/kvrelay/tests/data/builtin_vectors.json"
    path.write_text(json.dumps(out, separators=(",", ":")) + "\n")
    print(f"wrote {len(cases)} cases to {path}")


if __name__ == "__main__":
    main()
