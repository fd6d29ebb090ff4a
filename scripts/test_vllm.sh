#!/usr/bin/env bash
# kvrelay inside real vLLM (vLLM 0.32's CPU build): makes or reuses the cached vLLM venv
# (scripts/vllm_venv.sh), builds the kvrelay wheel and installs it there, then runs
#   1. the register/config refusal tests through the wheel,
#   2. the seed-000 smoke: prefill and decode as two vLLM processes through kvrelay's
#      disk tier (decode hits >= 256 tokens; token ids equal a plain run, logprobs equal
#      vLLM's own ExampleConnector run bit for bit),
#   3. the same with a prefill batch of 3 prompts of different lengths,
#   4. the same with a corrupted chunk between the phases (recomputed; equals the plain run).
# Needs no network once the venv is cached. scripts/test.sh runs it last.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$("$ROOT/scripts/vllm_venv.sh")"
PYTHON="$VENV/bin/python"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/kvrelay-vllm-test.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
step() { echo "== $* ($(date -u +%H:%M:%S))" >&2; }

step "building the kvrelay wheel"
(cd "$ROOT/crates/kvrelay-py" && "$VENV/bin/maturin" build --release --quiet -i "$PYTHON" -o "$WORK/wheels")
"$PYTHON" -m pip install --disable-pip-version-check --no-deps --force-reinstall --quiet "$WORK"/wheels/kvrelay-*.whl

step "refusal tests"
"$PYTHON" "$ROOT/crates/kvrelay-py/tests/test_register_refusals.py"

export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
SMOKE=("$PYTHON" "$ROOT/examples/vllm/disagg_lmcache_smoke.py" --role both --strict-lmcache --require-lmcache-hit)
summarize() {
    "$PYTHON" -c 'import json, sys
s = json.load(open(sys.argv[1]))
print(json.dumps({k: s[k] for k in ("lmcache_hit_tokens", "loaded_tokens", "failed_load_tokens", "max_logprob_difference_to_plain", "problems")} | {k: v for k, v in s.items() if k.startswith("equal_to_")}))' "$1"
}

step "seed-000 smoke: one prompt of 315 tokens"
"${SMOKE[@]}" --min-lmcache-hit-tokens 256 --work-dir "$WORK/one" >"$WORK/one.json"
summarize "$WORK/one.json"

step "seed-000 smoke: a prefill batch of 3 prompts (315, 357, 399 tokens)"
"${SMOKE[@]}" --min-lmcache-hit-tokens 256 --prefill-batch-size 3 --prefill-repeat-stride 2 \
    --work-dir "$WORK/batch" >"$WORK/batch.json"
summarize "$WORK/batch.json"

step "seed-000 smoke with a corrupted chunk between the phases"
"${SMOKE[@]}" --min-lmcache-hit-tokens 256 --corrupt-chunk --reference-json "$WORK/one.json" \
    --model "$WORK/one/tiny-llama" --work-dir "$WORK/corrupt" >"$WORK/corrupt.json"
summarize "$WORK/corrupt.json"
step "all vLLM tests passed"
