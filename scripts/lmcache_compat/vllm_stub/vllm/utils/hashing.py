import hashlib

import cbor2


def sha256_cbor(obj) -> bytes:
    return hashlib.sha256(cbor2.dumps(obj, canonical=True)).digest()


def get_hash_fn_by_name(name):
    if name == "sha256_cbor":
        return sha256_cbor
    raise ValueError(f"unknown hash function {name!r}")
