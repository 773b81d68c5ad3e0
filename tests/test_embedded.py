"""The shipped embedded agent: its targets through the real eval (vLLM), and the
determinism that its rebuild command relies on."""
from __future__ import annotations

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


def _short_build(work) -> str:
    """Every stage of the shipped curriculum, 3 steps each, through the build command
    (the same code path, seconds long); the first stage's gate set to open at once."""
    steps = [f"sft.stages.{i}.steps=3" for i in range(5)]
    gate = ["sft.stages.0.advance_at=0.0", "sft.stages.0.advance_window=1"]
    run = subprocess.run(
        [sys.executable, "-m", "mmagent_rl.models.embedded", "build", "--work", str(work),
         "--out", str(work / "agent"), "sft.steps=15", *steps, *gate,
         "trainer.progress=false"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    stages = json.loads((work / "stages.json").read_text())
    assert [s["name"] for s in stages] == ["big_clean", "big", "mid", "task", "act"]
    first = stages[0]  # ends at its first locate batch, the gate's metric's first report
    rows = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    first_locate = next(r["step"] for r in rows if "locate/near_xy1" in r)
    assert first["gate_passed"] and first["end_step"] == first_locate, stages
    recorded = (work / "agent" / "SHA256").read_text().split()[0]
    assert recorded == weights_sha256(work / "agent")
    return recorded


@pytest.mark.slow
def test_build_is_bit_for_bit(tmp_path):
    """Two runs of `python -m mmagent_rl.models.embedded build` give the same weight
    bytes (the shipped agent's rebuild claim, checked on a 15-step prefix)."""
    from concurrent.futures import ThreadPoolExecutor

    # side by side (mostly one-threaded start-up each): half the wall time of one after
    # the other; the sharing of the cores cannot change the bytes
    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(_short_build, [tmp_path / "a", tmp_path / "b"])
    assert a == b
