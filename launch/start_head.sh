#!/usr/bin/env bash
# Starts the Ray head on this node. Ports and sizes come from the environment (defaults
# are Ray's); any extra argument goes to `ray start` as is, and a repeated option
# wins over the default here (e.g. --port 6380, --block, --resources '{"a": 1}').
#   RAY_PORT=6379 RAY_DASHBOARD_PORT=8265 launch/start_head.sh [--num-gpus 8] [...]
# Workers join with launch/start_worker.sh HEAD_IP:RAY_PORT; jobs go to
# http://HEAD_IP:RAY_DASHBOARD_PORT (launch/submit.sh).
# Ray's token auth is on when RAY_AUTH_MODE=token or ~/.ray/auth_token exists; then
# every node, `ray job submit` and the job driver need the same token (RAY_AUTH_TOKEN
# in the environment, or that file). launch/slurm.sbatch sets one per job.
set -euo pipefail
RAY=${RAY:-ray}
args=(start --head
      --port "${RAY_PORT:-6379}"
      --dashboard-host "${RAY_DASHBOARD_HOST:-0.0.0.0}"  # job submission from other hosts
      --dashboard-port "${RAY_DASHBOARD_PORT:-8265}")
[ -n "${RAY_NODE_IP:-}" ] && args+=(--node-ip-address "$RAY_NODE_IP")
[ -n "${RAY_NUM_CPUS:-}" ] && args+=(--num-cpus "$RAY_NUM_CPUS")
[ -n "${RAY_NUM_GPUS:-}" ] && args+=(--num-gpus "$RAY_NUM_GPUS")
[ -n "${RAY_TEMP_DIR:-}" ] && args+=(--temp-dir "$RAY_TEMP_DIR")
exec "$RAY" "${args[@]}" "$@"
