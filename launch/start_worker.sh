#!/usr/bin/env bash
# Joins this node to a running Ray cluster. The head's GCS address is the first
# argument or RAY_HEAD_ADDRESS (HEAD_IP:PORT, the port given to start_head.sh);
# any further argument goes to `ray start` as is (e.g. --num-gpus 8, --block).
#   launch/start_worker.sh 10.0.0.1:6379 [--num-gpus 8] [...]
set -euo pipefail
RAY=${RAY:-ray}
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
  ADDRESS=$1; shift
else
  ADDRESS=${RAY_HEAD_ADDRESS:?usage: start_worker.sh HEAD_IP:PORT [ray start args] (or set RAY_HEAD_ADDRESS)}
fi
args=(start --address "$ADDRESS")
[ -n "${RAY_NODE_IP:-}" ] && args+=(--node-ip-address "$RAY_NODE_IP")
[ -n "${RAY_NUM_CPUS:-}" ] && args+=(--num-cpus "$RAY_NUM_CPUS")
[ -n "${RAY_NUM_GPUS:-}" ] && args+=(--num-gpus "$RAY_NUM_GPUS")
[ -n "${RAY_TEMP_DIR:-}" ] && args+=(--temp-dir "$RAY_TEMP_DIR")
exec "$RAY" "${args[@]}" "$@"
