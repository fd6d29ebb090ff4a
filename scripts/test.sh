#!/usr/bin/env bash
# The whole test suite on a fresh Debian machine: installs what it needs, then checks
# formatting, lints and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

# Toolchain components the checks use (no-ops where already installed).
if command -v rustup >/dev/null 2>&1; then
  rustup component add rustfmt clippy >/dev/null 2>&1 || true
fi
if ! command -v cc >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq build-essential
fi
# The Redis tier's tests start their own redis-server processes (openssl makes the TLS
# test's certificates).
if ! command -v redis-server >/dev/null 2>&1 || ! command -v openssl >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq redis-server openssl
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace --all-targets
# The Redis tier (feature `redis`) against real redis-server processes, cluster included.
cargo clippy -p kvrelay -p kvrelay-cli --features kvrelay/redis,kvrelay-cli/redis --all-targets -- -D warnings
cargo test -p kvrelay --features redis --test store_redis --test remote_config --lib
cargo test -p kvrelay-cli --features redis --test bench_redis
# The main job, end to end: two processes sharing a disk tier.
cargo run --release --example kv_roundtrip
