#!/usr/bin/env bash
# The seed's 1p1d on one host with kvrelay: a prefiller (7100) pushes KV into the
# decoder's (7200) PD buffer (init 7300, alloc 7400) and notifies the proxy (9100,
# notifications 7500); the proxy then streams the decoder's answer. Sends the seed's
# request (its prompt repeated 100 times, max_tokens 100) and prints the answer.
#
#   examples/pd_1p1d/launch.sh                 # tiny-random, tcp
#   MODEL=/data/Llama-3.2-1B CHANNEL=shm examples/pd_1p1d/launch.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

MODEL="${MODEL:-tiny-random}"
CHANNEL="${CHANNEL:-tcp}"
cargo build --release -q -p kvrelay-cli
KVRELAY=target/release/kvrelay
WORK="$(mktemp -d)"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

for role in prefiller decoder; do
  sed "s/^transfer_channel: .*/transfer_channel: $CHANNEL/" \
    "examples/pd_1p1d/lmcache-$role-config.yaml" > "$WORK/$role.yaml"
done

serve() { # role port kv-transfer-config
  LMCACHE_CONFIG_FILE="$WORK/$1.yaml" PYTHONHASHSEED=0 "$KVRELAY" serve \
    --port "$2" --model "$MODEL" --enforce-eager --no-enable-prefix-caching \
    --block-size 128 --max-model-len 32768 --kv-transfer-config "$3" \
    > "$WORK/$1.log" 2>&1 &
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
serve decoder 7200 '{"kv_connector":"LMCacheAscendConnectorV1Dynamic","kv_role":"kv_consumer","kv_connector_extra_config":{"discard_partial_chunks":false,"lmcache_rpc_port":"consumer1","skip_last_n_tokens":1}}'
wait_healthy 7200
serve prefiller 7100 '{"kv_connector":"LMCacheAscendConnectorV1Dynamic","kv_role":"kv_producer","kv_connector_extra_config":{"discard_partial_chunks":false,"lmcache_rpc_port":"producer1"}}'
wait_healthy 7100
"$KVRELAY" proxy --host localhost --port 9100 \
  --prefiller-host localhost --prefiller-port 7100 --num-prefillers 1 \
  --decoder-host localhost --decoder-port 7200 \
  --decoder-init-port 7300 --decoder-alloc-port 7400 \
  --proxy-host localhost --proxy-port 7500 --num-decoders 1 \
  > "$WORK/proxy.log" 2>&1 &
PIDS+=($!)
wait_healthy 9100

PROMPT="$(printf 'Explain the significance of KV cache in language models in English.%.0s' {1..100})"
curl -sS -X POST http://localhost:9100/v1/completions \
  -H "Content-Type: application/json" \
  -d "{\"prompt\": \"$PROMPT\", \"max_tokens\": 100}"
echo
echo "decoder: $(curl -s http://localhost:7200/metrics | grep -E '^kvrelay_connector_(hit_tokens|loaded_bytes)_total')" >&2
