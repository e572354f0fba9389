#!/usr/bin/env bash
# Starts a replica on the given model, streams one generation from it, then stops it (SIGTERM
# drains it). `make up` runs this; `sloserve up` will replace it with the whole stack.
set -euo pipefail
model=${1:?usage: up.sh MODEL_DIR}
port=${SLOSERVE_PORT:-50051}
bin=.venv/bin

$bin/sloserve replica --model "$model" --port "$port" --metrics-port -1 --enforce-eager &
replica=$!
trap 'kill -TERM $replica 2>/dev/null; wait $replica' EXIT

echo "waiting for the replica on localhost:$port ..."
$bin/sloserve health --endpoint "localhost:$port" --wait 180
$bin/sloserve generate --endpoint "localhost:$port" --class chat --max-tokens 48 \
  "Write a haiku about latency objectives."
