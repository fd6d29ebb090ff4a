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
#   examples/pd_1p1d/launch.sh                 # tiny-random, tcp, one rank
#   TP=2 CHANNEL=shm examples/pd_1p1d/launch.sh
#   MODEL=/data/Llama-3.2-1B CHANNEL=shm examples/pd_1p1d/launch.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

MODEL="${MODEL:-tiny-random}"
CHANNEL="${CHANNEL:-tcp}"
TP="${TP:-1}"
cargo build --release -q -p kvrelay-cli
KVRELAY="${CARGO_TARGET_DIR:-target}/release/kvrelay"
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
    "examples/pd_1p1d/lmcache-$role-config.yaml" > "$WORK/$role.yaml"
done

serve() { # role port tp [kv-transfer-config]
  LMCACHE_CONFIG_FILE="$WORK/$1.yaml" PYTHONHASHSEED=0 "$KVRELAY" serve \
    --port "$2" --model "$MODEL" --enforce-eager --no-enable-prefix-caching \
    --tensor-parallel-size "$3" --block-size 128 --max-model-len 32768 \
    ${4:+--kv-transfer-config "$4"} > "$WORK/$1.log" 2>&1 &
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
serve decoder 7200 "$TP" '{"kv_connector":"LMCacheAscendConnectorV1Dynamic","kv_role":"kv_consumer","kv_connector_extra_config":{"discard_partial_chunks":false,"lmcache_rpc_port":"consumer1","skip_last_n_tokens":1}}'
wait_healthy 7200
serve prefiller 7100 "$TP" '{"kv_connector":"LMCacheAscendConnectorV1Dynamic","kv_role":"kv_producer","kv_connector_extra_config":{"discard_partial_chunks":false,"lmcache_rpc_port":"producer1"}}'
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
HITS="$(curl -s http://localhost:7200/metrics | grep -E '^kvrelay_connector_(hit_tokens|loaded_bytes)_total')"
echo "decoder: $HITS" >&2
if ! grep -Eq '^kvrelay_connector_hit_tokens_total [1-9]' <<<"$HITS"; then
  echo "the decoder loaded no KV; logs:" >&2
  cat "$WORK"/*.log >&2
  exit 1
fi
if [ "$TP" != 1 ]; then
  # Splitting the heads over ranks must not change a token: a colocated one-rank engine.
  serve colocated 7000 1
  wait_healthy 7000
  token_ids() { grep -o '"token_ids":\[[0-9,]*\]' | head -1; }
  PD_IDS="$(token_ids <<<"$ANSWER")"
  COLOCATED_IDS="$(complete 7000 | token_ids)"
  if [ -z "$PD_IDS" ] || [ "$PD_IDS" != "$COLOCATED_IDS" ]; then
    echo "TP=$TP PD answer differs from one colocated rank:" >&2
    echo "  pd:        $PD_IDS" >&2
    echo "  colocated: $COLOCATED_IDS" >&2
    exit 1
  fi
  echo "TP=$TP PD token ids equal a colocated one-rank run's" >&2
fi
