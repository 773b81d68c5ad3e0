"""`python -m mmagent_rl.launch` end to end on real Ray + vLLM + DeepSpeed (tiny model)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO

REQUIRED = ("step", "loss", "reward/mean", "acc/mean", "tool/use_rate", "tool/all_wrong_rate",
            "time/generate", "time/score", "time/learn", "time/sync", "tokens_per_s")


def launch(args: list[str], timeout: float = 900,
           module: str = "mmagent_rl.launch") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]))
    if not any(a.startswith(("model=", "model.path=")) for a in args):
        args = ["model=tiny", *args]  # the random tiny model unless a test names another
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_step_grpo_run_with_two_learners(tmp_path, tiny_model_path, zero_stage):
    run = tmp_path / "run"
    p = launch(["+algo=grpo", "trainer.total_steps=2", f"hydra.run.dir={run}",
                "learner.num_workers=2", f"learner.zero_stage={zero_stage}",
                "rollout.num_workers=1",
                "rollout.n=4", "trainer.prompts_per_step=2", "rollout.agent.max_new_tokens=24",
                "learner.lr=1e-3", "reward.fn=reward_plugins:shortness_reward"])
    assert p.returncode == 0, p.stderr[-4000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert all(k in r for k in REQUIRED), set(REQUIRED) - set(r)
        assert math.isfinite(r["loss"]) and r["samples"] == 8
        assert r["grad_norm"] > 0  # the plugin's rewards differ within groups
    assert "step 2:" in p.stdout + p.stderr  # per-step metrics printed
    final = load_file(run / "checkpoints" / "final" / "model.safetensors")
    start = load_file(os.path.join(tiny_model_path, "model.safetensors"))
    assert final.keys() == start.keys()
    assert all(final[k].shape == start[k].shape for k in start)  # ZeRO-3: gathered
    assert any(not torch.equal(final[k], start[k]) for k in start)  # the policy learned
    assert not (run / "checkpoints" / "final.tmp").exists()


def test_unknown_config_key_fails_at_start_naming_it(tmp_path):
    p = launch(["+algo=grpo", "trainer.total_stepz=2", f"hydra.run.dir={tmp_path}"],
               timeout=120)
    assert p.returncode != 0
    assert "total_stepz" in p.stderr and "Traceback" not in p.stderr.split("total_stepz")[0][-50:]


def test_missing_algo_fails_with_the_valid_choices(tmp_path):
    p = launch([f"hydra.run.dir={tmp_path}"], timeout=120)
    assert p.returncode != 0
    out = p.stderr + p.stdout
    assert "+algo=grpo" in out
    assert "registered: grpo, mapo, papo, axpo, gspo" in out  # every one, not one of five
