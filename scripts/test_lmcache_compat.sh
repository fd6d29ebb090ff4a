#!/usr/bin/env bash
# kvrelay against LMCache 0.5.6's own Python code: chunk keys (builtin and sha256_cbor) from
# its ChunkedTokenDatabase, and Redis chunks both ways (its key strings, RemoteMetadata and
# RedisConnector layout) against a real redis-server.
#
# LMCache is installed without its heavy dependencies (no torch, no CUDA) into a venv cached
# outside the repository, $KVRELAY_LMCACHE_VENV (default ~/.cache/kvrelay/lmcache-0.5.6);
# the few imports its pure-Python modules need are stubbed in scripts/lmcache_compat/.
# Idempotent: a complete venv is reused as is.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${KVRELAY_LMCACHE_VENV:-$HOME/.cache/kvrelay/lmcache-0.5.6}"
if [ ! -f "$venv/.kvrelay-ready" ]; then
  # The keys test compares with CPython 3.11+'s str hash (kvrelay's default generation).
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    { echo "python3 must be CPython 3.11 or later for the LMCache test" >&2; exit 1; }
  if ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq python3-venv
  fi
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv"
  # LMCache itself without its dependencies, then the light ones its key, config and
  # metadata modules import, and the Redis client the test writes and reads with.
  "$venv/bin/pip" install -q --no-deps --no-warn-conflicts lmcache==0.5.6
  "$venv/bin/pip" install -q --no-warn-conflicts cbor2 pyyaml cachetools sortedcontainers prometheus_client \
    py-cpuinfo psutil aiohttp requests numpy redis
  touch "$venv/.kvrelay-ready"
fi

if ! command -v redis-server >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq redis-server
fi

KVRELAY_LMCACHE_PYTHON="$venv/bin/python" \
  cargo test -p kvrelay --features redis --test store_redis lmcache_code -- --ignored
