import os

NONE_HASH = None


def init_none_hash(hash_fn):
    global NONE_HASH
    seed = os.getenv("PYTHONHASHSEED")
    if seed is None:
        raise RuntimeError("the compatibility test always sets PYTHONHASHSEED with vLLM")
    NONE_HASH = hash_fn(seed)
