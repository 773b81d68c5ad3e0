"""eval: pass@k counting and the eval.json figures on hand-made outcomes."""
from __future__ import annotations

import math

import pytest

from mmagent_rl.eval import pass_at_k, summarize
from mmagent_rl.trajectory import ToolCall, Trajectory


def test_pass_at_k_hand_counts():
    assert pass_at_k(4, 0, 1) == 0.0
    assert pass_at_k(4, 4, 2) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    # n=4, c=1, k=2: 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    # n=5, c=2, k=3: 1 - C(3,3)/C(5,3) = 1 - 1/10
    assert pass_at_k(5, 2, 3) == pytest.approx(0.9)
    assert pass_at_k(3, 1, 3) == 1.0  # n - c < k
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def _t(pid, correct, calls=(), target=(100, 100, 200, 200)):
    t = Trajectory(prompt_id=pid, sample_idx=0, token_ids=[1, 2], loss_mask=[0, 1],
                   logprobs=[0.0, 0.0], images=[], prompt_len=1)
    t.reward_info = {"correct": float(correct), "has_answer": 1.0}
    t.image_size, t.target_box, t.turns = (1024, 1024), target, 1 + len(calls)
    t.tool_calls = [ToolCall(turn=0, raw="", bbox=b, error=None if b else "Error: x")
                    for b in calls]
    return t


def test_summary_figures_on_hand_made_outcomes():
    trajs = [
        _t("a", 1, [(64, 64, 256, 256)]),  # valid, hits the target
        _t("a", 0, [(300, 300, 400, 400)]),  # valid, misses
        _t("b", 0, [(10, 10, 2000, 50)]),  # outside the image: invalid
        _t("b", 0, [None]),  # JSON failed
        _t("c", 1), _t("c", 1),  # no tool
    ]
    s = summarize(trajs, k=2)
    assert s["n_examples"] == 3 and s["n_samples"] == 2
    assert s["accuracy"] == pytest.approx(3 / 6)
    assert s["pass@1"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert s["pass@k"] == pytest.approx((1 + 0 + 1) / 3)
    assert s["tool_call_rate"] == pytest.approx(4 / 6)
    assert s["format_rate"] == pytest.approx(2 / 4)
    assert s["box_hit_rate"] == pytest.approx(1 / 4)
    assert s["accuracy_with_tool"] == pytest.approx(1 / 4)
    assert s["accuracy_without_tool"] == 1.0
    assert all(math.isfinite(v) for v in s.values() if not isinstance(v, dict))
