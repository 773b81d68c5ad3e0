"""AXPO end to end from the shipped agent, which calls the zoom tool on most prompts,
with a reward under which only "red" is correct: most groups are then all wrong, so the
trigger fires (the shipped agent was built by the same SFT that `mmagent_rl.sft` runs,
tests/test_sft.py)."""
from __future__ import annotations

import json
import math

import pytest

from test_launch import launch

AXPO_KEYS = ("axpo/triggered_prompts", "axpo/resampled_prefixes", "axpo/recovery_rate",
             "axpo/extra_token_share", "tool/use_rate", "tool/all_wrong_rate")


@pytest.mark.slow
def test_two_step_axpo_run_resamples_prefixes(tmp_path):
    run = tmp_path / "axpo"
    p = launch(["+algo=axpo", "model=embedded", "reward.fn=reward_plugins:red_is_correct_reward",
                "trainer.total_steps=2",
                "trainer.prompts_per_step=4", "rollout.n=4", "rollout.agent.max_new_tokens=96",
                "learner.num_workers=2", f"hydra.run.dir={run}"])
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for r in rows:
        assert math.isfinite(r["loss"])
        assert all(k in r for k in AXPO_KEYS), [k for k in AXPO_KEYS if k not in r]
    assert rows[0]["tool/use_rate"] > 0.5  # the shipped agent calls tools
    assert sum(r["axpo/resampled_prefixes"] for r in rows) >= 1
    assert any(r["samples"] > 16 for r in rows)  # continuations joined the batch
