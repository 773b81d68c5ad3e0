#!/usr/bin/env bash
# Submits a training run to a running Ray cluster as a Ray job. Every argument is a
# Hydra override for `python -m mmagent_rl.launch`:
#   RAY_ADDRESS=http://HEAD_IP:8265 launch/submit.sh +algo=grpo +cluster=multinode \
#       model=qwen2_5_vl_7b trainer.total_steps=200 hydra.run.dir=/shared/runs/g1
# The repo is uploaded as the job's working dir (.gitignore'd files are left out) and
# the driver runs there, on the head node: Hydra's relative default run dir would end
# up inside Ray's session folder. Without hydra.run.dir (or a multirun), the run dir
# is this checkout's outputs/DATE/TIME, which must exist on the head node (a shared
# disk, or submit from the head node).
# Optional: RUNTIME_ENV_JSON (e.g. '{"env_vars": {"HF_HOME": "/shared/hf"}}'; the
# trainer does not set again a variable the job's runtime env already sets),
# SUBMISSION_ID, NO_WAIT=1 (return at once; follow with `ray job logs -f ID`),
# JOB_PYTHON (the interpreter on the head node, default `python`).
set -euo pipefail
RAY=${RAY:-ray}
cd "$(dirname "$0")/.."
args=(job submit --address "${RAY_ADDRESS:-http://127.0.0.1:8265}"
      --working-dir "${WORKING_DIR:-.}")
[ -n "${RUNTIME_ENV_JSON:-}" ] && args+=(--runtime-env-json "$RUNTIME_ENV_JSON")
[ -n "${SUBMISSION_ID:-}" ] && args+=(--submission-id "$SUBMISSION_ID")
[ "${NO_WAIT:-0}" = 1 ] && args+=(--no-wait)
overrides=("$@")
case " $* " in
  *" hydra.run.dir="* | *" hydra.sweep.dir="* | *" -m "* | *" --multirun "*) ;;
  *) overrides+=("hydra.run.dir=$PWD/outputs/$(date +%Y-%m-%d/%H-%M-%S)") ;;
esac
exec "$RAY" "${args[@]}" -- "${JOB_PYTHON:-python}" -m mmagent_rl.launch "${overrides[@]}"
