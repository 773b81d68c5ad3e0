#!/usr/bin/env bash
# Creates .venv and installs the CPU stack (or the GPU one with ENGINE=gpu).
# Idempotent: a second run only checks. The CPU-only workarounds (see
# mmagent_rl/cpu_compat.py) are applied here, and only where torch is a CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
ENGINE=${ENGINE:-cpu}
VENV=.venv
STAMP="$VENV/.installed-$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-12)-$ENGINE"
if [ -f "$STAMP" ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
# torch first: outside this environment set PIP_EXTRA_INDEX_URL to PyTorch's CPU wheel
# index so that torch==2.13.0 resolves to the +cpu build (see docs/clusters.md).
$PIP install --quiet "torch==2.13.0"
$PIP install --quiet -e ".[$ENGINE,test]"
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
if "$VENV/bin/python" -c "import sys, torch; sys.exit(0 if torch.version.cuda is None else 1)"; then
  # PyPI's torchaudio/torchcodec are CUDA builds whose presence breaks vLLM on CPU;
  # triton is unused on CPU (~1 GB). `pip check` will report them missing: expected.
  $PIP uninstall --quiet -y torchaudio torchcodec triton 2>/dev/null || true
  echo "import mmagent_rl.cpu_compat as _m; _m.install_hook()" > "$SITE/zzz_mmagent_rl_cpu_compat.pth"
else
  rm -f "$SITE/zzz_mmagent_rl_cpu_compat.pth"
fi
"$VENV/bin/python" -c "import torchvision, open_clip, deepspeed, ray, hydra; from vllm import LLM" \
  >/dev/null 2>&1 || { echo "setup: import check failed" >&2; exit 1; }
rm -f "$VENV"/.installed-*
touch "$STAMP"
echo "setup: .venv ready ($ENGINE)"
