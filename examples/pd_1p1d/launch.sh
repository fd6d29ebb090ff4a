#!/usr/bin/env bash
# The seed's 1p1d on one host with kvrelay: a prefiller (7100) pushes KV into the
# decoder's (7200) PD buffer (init 7300, alloc 7400) and notifies the proxy (9100,
# notifications 7500); the proxy then streams the decoder's answer. Sends the seed's
# request (its prompt repeated 100 times, max_tokens 100) and prints the answer.
#
# With TP=N both engines run N tensor-parallel ranks (--tensor-parallel-size N), as the
# seed does with 2: prefiller rank i sends to decoder rank i on init port 7300+i and
# alloc port 7400+i, and the proxy waits for every rank's notification. The answer's
# token ids are then checked against a colocated one-rank engine (port 7000) given the
# same request, and the decoder must have loaded KV (hit tokens above 0).
#
# With DEVICE=ascend both engines keep their KV on NPUs (serve --device ascend; rank i on
# NPU i of its process, as the seed's ASCEND_RT_VISIBLE_DEVICES=4,5 and 6,7 give it) with
# the seed's PD settings (pd_buffer_device: npu; CHANNEL=hccl, hcomm_onesided or hixl). A
# kvrelay built with the `ascend` feature runs on the CANN that KVRELAY_ASCENDCL_LIB /
# KVRELAY_HCCL_LIB (or ascend-sys's search order) finds; without KVRELAY_ASCENDCL_LIB it
# runs on the ascend-emu test double (ASCEND_EMU_CANN_VERSION, default 9.1.0). The answer's
# token ids and logits digest are then checked against a colocated one-rank engine, and the
# decoder must have loaded all its KV device to device from its PD pages (with
# ASCEND_EMU_FAIL_D2D_AFTER=0 on the double those copies fail: it must recompute instead).
#
#   examples/pd_1p1d/launch.sh                 # tiny-random, tcp, one rank
#   TP=2 CHANNEL=shm examples/pd_1p1d/launch.sh
#   DEVICE=ascend CHANNEL=hccl TP=2 examples/pd_1p1d/launch.sh
#   DECODER_BLOCK_SIZE=64 TP=2 examples/pd_1p1d/launch.sh   # decoder pages unlike the prefiller's
#   MODEL=/data/Llama-3.2-1B CHANNEL=shm examples/pd_1p1d/launch.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

MODEL="${MODEL:-tiny-random}"
CHANNEL="${CHANNEL:-tcp}"
TP="${TP:-1}"
DEVICE="${DEVICE:-host}"
BLOCK_SIZE=128
DECODER_BLOCK_SIZE="${DECODER_BLOCK_SIZE:-$BLOCK_SIZE}"
RELEASE="${CARGO_TARGET_DIR:-target}/release"
KVRELAY="$RELEASE/kvrelay"
BUFFER_DEVICE=cpu
case "$DEVICE" in
  host) cargo build --release -q -p kvrelay-cli ;;
  ascend)
    cargo build --release -q -p kvrelay-cli --features ascend
    BUFFER_DEVICE=npu
    if [ -z "${KVRELAY_ASCENDCL_LIB:-}" ]; then
      cargo build --release -q -p ascend-emu
      export KVRELAY_ASCENDCL_LIB="$RELEASE/libascend_emu.so" KVRELAY_HCCL_LIB="$RELEASE/libascend_emu.so" \
        KVRELAY_HCOMM_LIB="$RELEASE/libascend_emu.so" KVRELAY_HIXL_LIB="$RELEASE/libascend_emu.so"
      export ASCEND_EMU_CANN_VERSION="${ASCEND_EMU_CANN_VERSION:-9.1.0}" ASCEND_EMU_DEVICES=$((2 * TP))
    fi
    ;;
  *) echo "DEVICE must be host or ascend, not $DEVICE" >&2; exit 2 ;;
esac
# One init and one alloc port per rank: "7300,7301" and "7400,7401" for TP=2.
INIT_PORTS="$(seq -s, 7300 $((7300 + TP - 1)))"
ALLOC_PORTS="$(seq -s, 7400 $((7400 + TP - 1)))"
WORK="$(mktemp -d)"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

for role in prefiller decoder; do
  sed -e "s/^transfer_channel: .*/transfer_channel: $CHANNEL/" \
    -e "s/^pd_peer_init_port: .*/pd_peer_init_port: [${INIT_PORTS//,/, }]/" \
    -e "s/^pd_peer_alloc_port: .*/pd_peer_alloc_port: [${ALLOC_PORTS//,/, }]/" \
    -e "s/^pd_buffer_device: .*/pd_buffer_device: $BUFFER_DEVICE/" \
    "examples/pd_1p1d/lmcache-$role-config.yaml" > "$WORK/$role.yaml"
done

# The NPUs each engine sees, as the seed's ASCEND_RT_VISIBLE_DEVICES: the prefiller's ranks
# on the first TP devices, the decoder's on the next (the colocated engine on the first).
visible() { # role tp
  if [ "$1" = decoder ]; then seq -s, "$2" $((2 * $2 - 1)); else seq -s, 0 $(($2 - 1)); fi
}
serve() { # role port tp block-size [kv-transfer-config]
  ASCEND_RT_VISIBLE_DEVICES="$(visible "$1" "$3")" \
  LMCACHE_CONFIG_FILE="$WORK/$1.yaml" PYTHONHASHSEED=0 "$KVRELAY" serve \
    --port "$2" --model "$MODEL" --enforce-eager --no-enable-prefix-caching \
    --tensor-parallel-size "$3" --block-size "$4" --max-model-len 32768 --device "$DEVICE" \
    ${5:+--kv-transfer-config "$5"} > "$WORK/$1.log" 2>&1 &
  PIDS+=($!)
}
wait_healthy() { # port
  for _ in $(seq 600); do
    if curl -sf "http://localhost:$1/health" >/dev/null; then return 0; fi
    sleep 0.2
  done
  echo "no answer on port $1; logs:" >&2
  cat "$WORK"/*.log >&2
  exit 1
}

# The decoder first: its PD buffer must listen before the prefiller sends.
# With injected device-copy failures the decoder recomputes what it could not load (vLLM's
# kv_load_failure_policy; the seed keeps the default, which fails the request).
POLICY=""
if [ -n "${ASCEND_EMU_FAIL_D2D_AFTER:-}" ]; then POLICY='"kv_load_failure_policy":"recompute",'; fi
serve decoder 7200 "$TP" "$DECODER_BLOCK_SIZE" '{"kv_connector":"LMCacheAscendConnectorV1Dynamic","kv_role":"kv_consumer",'"$POLICY"'"kv_connector_extra_config":{"discard_partial_chunks":false,"lmcache_rpc_port":"consumer1","skip_last_n_tokens":1}}'
wait_healthy 7200
serve prefiller 7100 "$TP" "$BLOCK_SIZE" '{"kv_connector":"LMCacheAscendConnectorV1Dynamic","kv_role":"kv_producer","kv_connector_extra_config":{"discard_partial_chunks":false,"lmcache_rpc_port":"producer1"}}'
wait_healthy 7100
"$KVRELAY" proxy --host localhost --port 9100 \
  --prefiller-host localhost --prefiller-port 7100 --num-prefillers 1 \
  --decoder-host localhost --decoder-port 7200 \
  --decoder-init-port "$INIT_PORTS" --decoder-alloc-port "$ALLOC_PORTS" \
  --proxy-host localhost --proxy-port 7500 --num-decoders 1 \
  > "$WORK/proxy.log" 2>&1 &
PIDS+=($!)
wait_healthy 9100

PROMPT="$(printf 'Explain the significance of KV cache in language models in English.%.0s' {1..100})"
REQUEST="{\"prompt\": \"$PROMPT\", \"max_tokens\": 100}"
complete() { # port
  curl -sS -X POST "http://localhost:$1/v1/completions" \
    -H "Content-Type: application/json" -d "$REQUEST"
}
ANSWER="$(complete 9100)"
echo "$ANSWER"
HITS="$(curl -s http://localhost:7200/metrics | grep -E '^kvrelay_connector_(hit_tokens|recomputed_tokens|loaded_bytes|device_loaded_bytes)_total')"
echo "decoder: $HITS" >&2
metric() { awk -v name="kvrelay_connector_$1_total" '$1 == name { print $2 }' <<<"$HITS"; }
fail() {
  echo "$1; logs:" >&2
  cat "$WORK"/*.log >&2
  exit 1
}
if [ -n "${ASCEND_EMU_FAIL_D2D_AFTER:-}" ]; then
  # The emulator fails the decoder's device-to-device loads: it recomputes instead, and the
  # answer must still equal the colocated one.
  if [ "$(metric recomputed_tokens)" = 0 ] || [ "$(metric device_loaded_bytes)" != 0 ]; then
    fail "ASCEND_EMU_FAIL_D2D_AFTER=$ASCEND_EMU_FAIL_D2D_AFTER: the decoder should have recomputed"
  fi
elif [ "$(metric hit_tokens)" = 0 ]; then
  fail "the decoder loaded no KV"
elif [ "$BUFFER_DEVICE" = npu ] && [ "$(metric device_loaded_bytes)" != "$(metric loaded_bytes)" ]; then
  # The decoder's KV and its PD buffer share each rank's NPU: every load is device to device.
  fail "with pd_buffer_device npu the decoder loaded some KV from host memory"
fi
if [ "$TP" != 1 ] || [ "$DEVICE" != host ] || [ "$DECODER_BLOCK_SIZE" != "$BLOCK_SIZE" ]; then
  # Splitting the heads over ranks (and the NPU path) must not change a bit of the
  # logits: the token ids and logits digest of a colocated one-rank engine.
  serve colocated 7000 1 "$BLOCK_SIZE"
  wait_healthy 7000
  fingerprint() { grep -o '"token_ids":\[[0-9,]*\]\|"logits_digest":"[0-9a-f]*"' | sort; }
  PD_RUN="$(fingerprint <<<"$ANSWER")"
  COLOCATED_RUN="$(complete 7000 | fingerprint)"
  if [ "$(wc -l <<<"$PD_RUN")" != 2 ] || [ "$PD_RUN" != "$COLOCATED_RUN" ]; then
    echo "DEVICE=$DEVICE TP=$TP DECODER_BLOCK_SIZE=$DECODER_BLOCK_SIZE PD answer differs from one colocated rank:" >&2
    echo "  pd:        $PD_RUN" >&2
    echo "  colocated: $COLOCATED_RUN" >&2
    exit 1
  fi
  echo "DEVICE=$DEVICE TP=$TP DECODER_BLOCK_SIZE=$DECODER_BLOCK_SIZE PD token ids and logits digest equal a colocated one-rank run's" >&2
fi
