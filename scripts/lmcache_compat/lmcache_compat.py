#!/usr/bin/env python3
"""Runs LMCache 0.5.6's own code for kvrelay's compatibility test (store_redis.rs,
`lmcache_code_*`, run by scripts/test_lmcache_compat.sh in a venv with lmcache installed).

  keys  --algorithm A --chunk-size N --save-unfull-chunk true|false [--with-vllm]
        --model M --world-size W --worker-id R --dtype D     < token ids (JSON)
      One key per line from LMCache's ChunkedTokenDatabase.process_tokens.
  put   --url U --model M --world-size W --worker-id R --hash H --dtype D --fmt F
        --shape A,B,C,E
      Writes a chunk as LMCache's RedisConnector does: SET <key>kv_bytes, then SET
      <key>metadata (LMCache's RemoteMetadata), <key> being CacheEngineKey.to_string().
      The bytes are pattern(length); prints the key.
  get   --url U --key K
      Reads a chunk as LMCache's RedisConnector does and prints what LMCache decodes
      (RemoteMetadata fields) and the bytes' SHA-256, as JSON.

torch and transformers are stubbed (stubs/); with --with-vllm, vllm_stub/ provides the two
vLLM calls LMCache's token database makes.
"""

import argparse
import hashlib
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def import_lmcache(with_vllm: bool):
    sys.path.insert(0, os.path.join(HERE, "stubs"))
    if with_vllm:
        sys.path.insert(0, os.path.join(HERE, "vllm_stub"))
    import lmcache
    import torch

    # The compute backend (native, needs real torch) is not used by keys or metadata, but
    # some modules read attributes of it while importing.
    lmcache.device_ops = torch._Inert()


def pattern(length: int) -> bytes:
    """The chunk bytes both sides expect: byte i is (i * 131 + 7) mod 251."""
    return bytes((i * 131 + 7) % 251 for i in range(length))


def keys(args):
    import_lmcache(args.with_vllm)
    import torch
    from lmcache.v1.config import LMCacheEngineConfig
    from lmcache.v1.metadata import LMCacheMetadata
    from lmcache.v1.token_database import ChunkedTokenDatabase

    config = LMCacheEngineConfig.from_defaults(
        chunk_size=args.chunk_size,
        pre_caching_hash_algorithm=args.algorithm,
        save_unfull_chunk=args.save_unfull_chunk == "true",
    )
    metadata = LMCacheMetadata(
        model_name=args.model,
        world_size=args.world_size,
        local_world_size=args.world_size,
        worker_id=args.worker_id,
        local_worker_id=args.worker_id,
        kv_dtype=getattr(torch, args.dtype),
        kv_shape=(1, 2, args.chunk_size, 1, 1),
        chunk_size=args.chunk_size,
    )
    db = ChunkedTokenDatabase(config, metadata)
    tokens = json.load(sys.stdin)
    for _, _, key in db.process_tokens(tokens=tokens):
        print(key.to_string())


def redis_client(url):
    import redis

    return redis.Redis.from_url(url)


def put(args):
    import_lmcache(False)
    import torch
    from lmcache.utils import CacheEngineKey
    from lmcache.v1.memory_management import MemoryFormat
    from lmcache.v1.protocol import RemoteMetadata, init_remote_metadata_info

    init_remote_metadata_info(1)
    shape = torch.Size(int(d) for d in args.shape.split(","))
    dtype = getattr(torch, args.dtype)
    length = 1
    for d in shape:
        length *= d
    length *= {"bfloat16": 2, "float16": 2, "float32": 4}[args.dtype]
    key = CacheEngineKey(args.model, args.world_size, args.worker_id, args.hash, dtype)
    meta = RemoteMetadata(length, [shape], [dtype], MemoryFormat[args.fmt])
    client = redis_client(args.url)
    name = key.to_string()
    client.set(name + "kv_bytes", pattern(length))
    client.set(name + "metadata", meta.serialize())
    print(name)


def get(args):
    import_lmcache(False)
    from lmcache.v1.protocol import RemoteMetadata, init_remote_metadata_info

    init_remote_metadata_info(1)
    client = redis_client(args.url)
    meta = RemoteMetadata.deserialize(memoryview(client.get(args.key + "metadata")))
    kv = client.get(args.key + "kv_bytes")
    json.dump(
        {
            "length": meta.length,
            "fmt": meta.fmt.name,
            "dtypes": [repr(d) for d in meta.dtypes],
            "shapes": [list(s) for s in meta.shapes],
            "kv_len": len(kv),
            "kv_sha256": hashlib.sha256(kv).hexdigest(),
        },
        sys.stdout,
    )


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    k = sub.add_parser("keys")
    k.add_argument("--algorithm", required=True)
    k.add_argument("--chunk-size", type=int, required=True)
    k.add_argument("--save-unfull-chunk", choices=["true", "false"], required=True)
    k.add_argument("--with-vllm", action="store_true")
    p = sub.add_parser("put")
    p.add_argument("--url", required=True)
    p.add_argument("--hash", type=int, required=True)
    p.add_argument("--fmt", required=True)
    p.add_argument("--shape", required=True)
    for cmd in (k, p):
        cmd.add_argument("--model", required=True)
        cmd.add_argument("--world-size", type=int, required=True)
        cmd.add_argument("--worker-id", type=int, required=True)
        cmd.add_argument("--dtype", required=True)
    g = sub.add_parser("get")
    g.add_argument("--url", required=True)
    g.add_argument("--key", required=True)
    args = parser.parse_args()
    {"keys": keys, "put": put, "get": get}[args.command](args)


if __name__ == "__main__":
    main()
