"""vLLM as LMCache's token database sees it, for "LMCache with vLLM importable".

Only the two calls LMCache makes are here, with vLLM 0.11's behaviour (reference
lmcache_vllm.md §3.2): `get_hash_fn_by_name` knows `sha256_cbor` (so "builtin" falls back
to Python's hash, as in vLLM), and `init_none_hash(hash_fn)` sets
`NONE_HASH = hash_fn($PYTHONHASHSEED)`.
"""
