"""AXPO end to end from a cold-started agent that calls tools (so triggers happen)."""
from __future__ import annotations

import json
import math

import pytest

from test_launch import launch

AXPO_KEYS = ("axpo/triggered_prompts", "axpo/resampled_prefixes", "axpo/recovery_rate",
             "axpo/extra_token_share", "tool/use_rate", "tool/all_wrong_rate")


@pytest.fixture(scope="session")
def cold_started_agent(tmp_path_factory):
    """A short SFT on generated demonstrations (the documented `mmagent_rl.sft`): the
    agent learns to call the zoom tool, not yet to read the image, so its tool-using
    rollouts are mostly wrong, which is what AXPO's trigger needs."""
    run = tmp_path_factory.mktemp("sft_agent")
    p = launch(["sft.steps=80", "sft.batch_size=8", "sft.lr=3e-3", "learner.num_workers=1",
                "learner.lr_schedule=cosine", "learner.warmup_steps=5",
                "trainer.progress=false", f"hydra.run.dir={run}"], module="mmagent_rl.sft")
    assert p.returncode == 0, p.stderr[-3000:]
    return str(run / "checkpoints" / "final")


@pytest.mark.slow
def test_two_step_axpo_run_resamples_prefixes(tmp_path, cold_started_agent):
    run = tmp_path / "axpo"
    p = launch(["+algo=axpo", f"model.path={cold_started_agent}", "trainer.total_steps=2",
                "trainer.prompts_per_step=4", "rollout.n=4", "rollout.agent.max_new_tokens=96",
                "learner.num_workers=2", f"hydra.run.dir={run}"])
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for r in rows:
        assert math.isfinite(r["loss"])
        assert all(k in r for k in AXPO_KEYS), [k for k in AXPO_KEYS if k not in r]
    assert rows[0]["tool/use_rate"] > 0.5  # the cold start calls tools
    assert sum(r["axpo/resampled_prefixes"] for r in rows) >= 1
    assert any(r["samples"] > 16 for r in rows)  # continuations joined the batch
