"""The shipped embedded agent: its targets through the real eval (vLLM), and the
determinism that its rebuild command relies on."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from mmagent_rl.models.embedded import EMBEDDED_DIR, embedded_path, weights_sha256

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_shipped_weights_match_their_recorded_hash():
    recorded = (EMBEDDED_DIR / "SHA256").read_text().split()[0]
    assert weights_sha256(EMBEDDED_DIR) == recorded


def test_embedded_agent_meets_tool_and_format_targets(tmp_path):
    """Held-out split, fixed seed, the real `python -m mmagent_rl.eval` with no checkpoint
    (= the embedded agent, the default model)."""
    run = subprocess.run(
        [sys.executable, "-m", "mmagent_rl.eval", "eval.max_examples=32", "eval.n_samples=2",
         "eval.k=2", f"hydra.run.dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads((tmp_path / "eval.json").read_text())
    assert res["checkpoint"] == embedded_path()
    assert res["n_examples"] == 32
    assert res["tool_call_rate"] >= 0.8, res
    assert res["format_rate"] >= 0.95, res
    assert res["box_hit_rate"] >= 0.5, res
    assert res["accuracy"] >= 2 / 6, res  # twice chance (6 colours)


def _short_recipe_run(out) -> str:
    # every stage of the shipped recipe, 3 steps each: the same code path, seconds long
    steps = [f"stages.{i}.steps=3" for i in range(5)]
    run = subprocess.run(
        [sys.executable, os.path.join(REPO, "bench", "sft_recipe.py"), "train",
         "--recipe", "ladder_q3", "--out", str(out), "--eval-n", "0", "--log-every", "5",
         *steps], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return hashlib.sha256((out / "model" / "model.safetensors").read_bytes()).hexdigest()


@pytest.mark.slow
def test_recipe_rebuild_is_bit_for_bit(tmp_path):
    """Two runs of the recipe give the same weight bytes (the shipped agent's rebuild
    claim, checked on a 15-step prefix of the same recipe)."""
    first = _short_recipe_run(tmp_path / "a")
    second = _short_recipe_run(tmp_path / "b")
    assert first == second
