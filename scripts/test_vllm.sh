#!/usr/bin/env bash
# kvrelay inside real vLLM (vLLM 0.32's CPU build): makes or reuses the cached vLLM venv
# (scripts/vllm_venv.sh), builds the kvrelay wheel and installs it there, then runs
#   1. the register/config refusal tests through the wheel,
#   2. the seed-000 smoke: prefill and decode as two vLLM processes through kvrelay's
#      disk tier (decode hits >= 256 tokens; token ids equal a plain run, logprobs equal
#      vLLM's own ExampleConnector run bit for bit),
#   2b. a CPU tier alone in one vLLM engine (prefix caching off): the same prompt twice, the
#      second hits >= 256 tokens in the Worker's CPU tier, looked up by the EngineCore
#      through the lookup channel, and equals the first run's tokens and logprobs exactly,
#   3. the same with a prefill batch of 3 prompts of different lengths,
#   4. the same with a corrupted chunk between the phases (recomputed; equals the plain run),
#   4b. steps 3 and 4 again with enable_async_loading (vLLM parks the request in
#      WAITING_FOR_REMOTE_KVS; kvrelay's background loader reports it in get_finished),
#   5. the seed-004 1p1d: two vLLM servers and `kvrelay proxy` (release build), PD over tcp,
#      the decoder loading asynchronously as in the seed;
#      the seed's request through the proxy equals one plain vLLM server's answer, the
#      decoder hits the prefiller's KV (looked up through the scheduler-to-worker lookup
#      channel), vLLM logs it from get_kv_connector_stats, and a killed decoder is a 502.
#      Uses the seed's ports (7100, 7200, 7300, 7400, 7500, 9100) and 7000 for the plain one,
#      each plus KVRELAY_PD_PORT_OFFSET when set (it refuses to start on a taken port).
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
print(json.dumps({k: s[k] for k in ("lmcache_hit_tokens", "loaded_tokens", "failed_load_tokens", "background_loader", "max_logprob_difference_to_plain", "problems")} | {k: v for k, v in s.items() if k.startswith("equal_to_")}))' "$1"
}

step "seed-000 smoke: one prompt of 315 tokens"
"${SMOKE[@]}" --min-lmcache-hit-tokens 256 --work-dir "$WORK/one" >"$WORK/one.json"
summarize "$WORK/one.json"

step "a CPU tier alone in one vLLM engine: the same prompt twice"
"$PYTHON" "$ROOT/examples/vllm/cpu_tier_smoke.py" --min-hit-tokens 256 --model "$WORK/one/tiny-llama" --work-dir "$WORK/cpu"

step "seed-000 smoke: a prefill batch of 3 prompts (315, 357, 399 tokens)"
"${SMOKE[@]}" --min-lmcache-hit-tokens 256 --prefill-batch-size 3 --prefill-repeat-stride 2 \
    --work-dir "$WORK/batch" >"$WORK/batch.json"
summarize "$WORK/batch.json"

step "seed-000 smoke with a corrupted chunk between the phases"
"${SMOKE[@]}" --min-lmcache-hit-tokens 256 --corrupt-chunk --reference-json "$WORK/one.json" \
    --model "$WORK/one/tiny-llama" --work-dir "$WORK/corrupt" >"$WORK/corrupt.json"
summarize "$WORK/corrupt.json"
step "seed-000 smoke, asynchronous loads: a prefill batch of 3 prompts"
"${SMOKE[@]}" --min-lmcache-hit-tokens 256 --prefill-batch-size 3 --prefill-repeat-stride 2 --async-loading \
    --reference-json "$WORK/batch.json" --model "$WORK/batch/tiny-llama" --work-dir "$WORK/async" >"$WORK/async.json"
summarize "$WORK/async.json"

step "seed-000 smoke, asynchronous loads, with a corrupted chunk between the phases"
"${SMOKE[@]}" --min-lmcache-hit-tokens 256 --corrupt-chunk --async-loading --reference-json "$WORK/one.json" \
    --model "$WORK/one/tiny-llama" --work-dir "$WORK/async-corrupt" >"$WORK/async-corrupt.json"
summarize "$WORK/async-corrupt.json"

step "seed-004 1p1d: prefiller + decoder vLLM servers and kvrelay proxy, PD over tcp"
(cd "$ROOT" && cargo build --release -q -p kvrelay-cli)
"$PYTHON" "$ROOT/examples/vllm/pd_1p1d.py" --kvrelay "${CARGO_TARGET_DIR:-$ROOT/target}/release/kvrelay" \
    --model "$WORK/one/tiny-llama" --work-dir "$WORK/pd" --port-offset "${KVRELAY_PD_PORT_OFFSET:-0}" >"$WORK/pd.json"
"$PYTHON" -c 'import json, sys
s = json.load(open(sys.argv[1]))
print(json.dumps({k: s[k] for k in ("prompt_tokens", "equal_token_ids", "equal_text", "decoder_hit_tokens", "decoder_loaded_tokens", "decoder_logged_loaded_tokens", "prefiller_reserved_sends", "prefiller_layered_chunks", "release", "problems")} | {"killed_decoder": {k: s["killed_decoder"][k] for k in ("status", "seconds")}}))' "$WORK/pd.json"
step "all vLLM tests passed"
