#!/usr/bin/env bash
# Starts the whole stack on the given model: a gateway in front of replicas (2 by default;
# SLOSERVE_REPLICAS=N for more), as local processes. It prints the endpoints; Ctrl-C stops
# everything (the gateway drains first). `make up` runs this.
set -euo pipefail
model=${1:?usage: up.sh MODEL_DIR}
exec .venv/bin/sloserve up --model "$model" --replicas "${SLOSERVE_REPLICAS:-2}"
