"""MAPO / PAPO end to end on real Ray + vLLM + DeepSpeed, and the reward actor's CLIP."""
from __future__ import annotations

import json
import math

import pytest

from mmagent_rl.algos.mapo import MAPOConfig
from mmagent_rl.data.synthetic import COLOR_RGB, SyntheticConfig, SyntheticDataset
from mmagent_rl.reward.worker import RewardScorer
from mmagent_rl.tools.zoom import zoom
from mmagent_rl.trajectory import ToolCall, Trajectory
from test_launch import launch

COMMON = ["trainer.total_steps=2", "rollout.agent.max_new_tokens=24", "learner.num_workers=2",
          "trainer.prompts_per_step=2", "rollout.n=4", "reward.fn=reward_plugins:shortness_reward"]


def _rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _traj(ex, label):
    crop, box = zoom(ex.image, ex.target_box, out_max_side=112)  # as the agent loop does
    t = Trajectory(prompt_id=ex.id, sample_idx=0, token_ids=[1, 2], loss_mask=[0, 1],
                   logprobs=[0.0, 0.0], images=[ex.image, crop], prompt_len=1,
                   ground_truth=ex.answer)
    t.tool_calls = [ToolCall(turn=0, raw="", label=label, crop_box=box, image_index=1,
                             span=(1, 2))]
    return t


@pytest.mark.parametrize("target_size", [(20, 32), (8, 12)])  # default split, testbed
def test_reward_actor_alignment_prefers_the_true_description_on_heldout_crops(target_size):
    # label mode: the test's descriptions ride on the calls' labels
    scorer = RewardScorer(alignment=MAPOConfig(description="label"))
    ds = SyntheticDataset(SyntheticConfig(target_size=target_size), seed=0, size=30,
                          split="test")
    true, wrong = [], []
    for ex in ds:
        other = next(c for c in COLOR_RGB if c != ex.answer)
        true.append(_traj(ex, f"a {ex.answer} square inside a black ring"))
        wrong.append(_traj(ex, f"a {other} square inside a black ring"))
    scorer.score(true + wrong)
    good = [t.align_scores[0] for t in true]
    bad = [t.align_scores[0] for t in wrong]
    # The wrong colour is the palette's first other one (mostly red), a hard fixed pair:
    # 22/30 on the testbed's 8-12 px squares. Against a random other colour the testbed
    # accuracy is 0.99 (120 examples; docs/learning.md, MAPO).
    assert sum(g > b for g, b in zip(good, bad)) / len(good) >= (
        0.9 if target_size == (20, 32) else 0.7)
    assert all(0.0 <= s <= 1.0 for s in good + bad)
    one_by_one = []
    for t in true[:5]:
        scorer.score([t])
        one_by_one.append(t.align_scores[0])
    assert one_by_one == pytest.approx(good[:5], abs=1e-5)
    missing = _traj(ds[0], None)
    too_long = _traj(ds[0], "word " * 17)
    scorer.score([missing, too_long])
    assert missing.align_scores == [0.0] and too_long.align_scores == [0.0]
    assert missing.align_statuses == ["missing"]
    assert too_long.align_statuses == ["too_long"]


@pytest.mark.slow
def test_two_step_mapo_run_logs_alignment_metrics(tmp_path):
    run = tmp_path / "mapo"
    p = launch(["+algo=mapo", f"hydra.run.dir={run}", *COMMON])
    assert p.returncode == 0, p.stderr[-3000:]
    rows = _rows(run)
    assert len(rows) == 2
    for r in rows:
        assert math.isfinite(r["loss"])
        for k in ("mapo/alignment", "mapo/missing_description_rate",
                  "mapo/alignment_reward_corr", "grad/variance"):
            assert k in r and math.isfinite(float(r[k])), k


@pytest.mark.slow
def test_two_step_papo_run(tmp_path):
    """The default entropy mode (a second forward with grad). The other mode runs a real
    learner step in tests/test_papo_step.py and a whole run in bench/algo_cost.py's
    quick mode (tests/test_bench_quick.py)."""
    run = tmp_path / "papo"
    p = launch(["+algo=papo", f"hydra.run.dir={run}", *COMMON])
    assert p.returncode == 0, p.stderr[-3000:]
    rows = _rows(run)
    assert len(rows) == 2
    for r in rows:
        assert math.isfinite(r["loss"])
        for k in ("papo/kl_prcp", "papo/entropy_ori", "papo/entropy_aug",
                  "clip/upper_fraction", "papo/hacking_alarm", "grad/variance"):
            assert k in r and math.isfinite(float(r[k])), k
        assert r["papo/kl_prcp"] > 0  # the masked image really changed the log-probs
