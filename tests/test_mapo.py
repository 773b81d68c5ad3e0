"""MAPO math, checked against numbers worked out by hand (no model, no CLIP)."""
from __future__ import annotations

import math

import pytest
import torch

from mmagent_rl.algos.grpo import GRPOConfig, group_advantages
from mmagent_rl.algos.mapo import (
    MAPOConfig, alignment_metrics, check_description, compute_mapo_advantages,
    effective_scores, mapo_trajectory_rewards,
    mapo_turn_advantages, trajectory_score, turn_returns,
)
from mmagent_rl.trajectory import (
    ToolCall, Trajectory, description_for_call, extract_post_description,
)

torch.set_num_threads(1)


def make_traj(segments, prompt_id="p", reward=0.0, labels=None):
    """segments: ("prompt"|"obs"|"pad", n) masked, ("call", n) a tool-call turn,
    ("answer", n) a final turn; generated segments have mask 1."""
    mask, calls, pos = [], [], 0
    for turn_kind, n in segments:
        gen = turn_kind in ("call", "answer")
        mask += [int(gen)] * n
        if turn_kind == "call":  # one call per assistant turn, turns counted from 0
            k = len(calls)
            calls.append(ToolCall(turn=k, raw="", span=(pos, pos + n), label=(labels or {}).get(k)))
        pos += n
    return Trajectory(prompt_id=prompt_id, sample_idx=0, token_ids=list(range(pos)),
                      loss_mask=mask, logprobs=[0.0] * pos, images=[], prompt_len=0,
                      reward=reward, tool_calls=calls)


def three_rollouts(prompt_id="p"):
    """A: 3 tool turns + answer, r=1. B: 1 tool turn + answer, r=0. C: no tools, r=0."""
    a = make_traj([("prompt", 4), ("call", 3), ("obs", 2), ("call", 2), ("obs", 2),
                   ("call", 2), ("obs", 2), ("answer", 3), ("pad", 2)], prompt_id, 1.0)
    b = make_traj([("prompt", 4), ("call", 2), ("obs", 2), ("answer", 2)], prompt_id, 0.0)
    c = make_traj([("prompt", 4), ("answer", 3)], prompt_id, 0.0)
    return [a, b, c]


# Hand numbers. Raw cos [1, 0, -1] -> rescaled [1, 0.5, 0]; None -> 0 (not 0.5).
# lam=0.5: G_A = [1 + .5*.5 + 0, .5 + 0, 0] = [1.25, 0.5, 0]; G_B = [0].
# Pool [1.25, .5, 0, 0]: mean .4375, sum sq dev 1.046875, std = sqrt(1.046875/3) = .5907270
Z = [0.8125 / 0.590727, 0.0625 / 0.590727, -0.4375 / 0.590727]  # 1.375422, 0.105802, -0.740612
# Rewards [1, 0, 0]: mean 1/3, std sqrt(1/3) -> A_task = [2/sqrt(3), -1/sqrt(3), -1/sqrt(3)]
A_TASK = [2 / math.sqrt(3), -1 / math.sqrt(3), -1 / math.sqrt(3)]
RAW = [[1.0, 0.0, -1.0], [None], []]


def test_turn_returns_discount():
    assert turn_returns([1.0, 0.5, 0.0], 0.5) == pytest.approx([1.25, 0.5, 0.0])
    assert turn_returns([1.0, 1.0, 1.0], 1.0) == pytest.approx([3.0, 2.0, 1.0])
    assert turn_returns([0.2], 0.95) == pytest.approx([0.2])
    assert turn_returns([], 0.95) == []


def test_effective_scores_rescale_and_invalid_zero():
    cfg = MAPOConfig()
    assert effective_scores([[1.0, 0.0, -1.0, None, 0.6]], cfg) == [
        pytest.approx([1.0, 0.5, 0.0, 0.0, 0.8])]
    # a too-long / missing description scores 0 even if a number was passed
    assert effective_scores([[0.6, 0.6]], cfg, [["too_long", "ok"]]) == [pytest.approx([0.0, 0.8])]
    # rescale=False: ClipScorer output (already (cos+1)/2, 0 for invalid) passes through
    assert effective_scores([[0.8, 0.0, None]], MAPOConfig(rescale=False)) == [
        pytest.approx([0.8, 0.0, 0.0])]


def test_turn_coupling_token_placement():
    trajs = three_rollouts()
    cfg = MAPOConfig(lam=0.5, beta=0.4)
    task = compute_mapo_advantages(trajs, RAW, cfg, GRPOConfig())
    assert task.tolist() == pytest.approx(A_TASK, abs=1e-5)
    a, b, c = (t.advantages for t in trajs)
    ta, tb, tc = A_TASK
    sem = [ta + 0.4 * z for z in Z]
    # A: prompt(4) | turn0(3) | obs(2) | turn1(2) | obs(2) | turn2(2) | obs(2) | answer(3) | pad(2)
    expect_a = ([0] * 4 + [sem[0]] * 3 + [0] * 2 + [sem[1]] * 2 + [0] * 2 + [sem[2]] * 2 + [0] * 2
                + [ta] * 3 + [0] * 2)  # the answer turn gets A_task only
    assert a == pytest.approx(expect_a, abs=1e-5)
    # B: its single G=0 is normalised in the same pool as A's: Z[2]
    assert b == pytest.approx([0] * 4 + [tb + 0.4 * Z[2]] * 2 + [0] * 2 + [tb] * 2, abs=1e-5)
    # C: no tool call -> A_task only
    assert c == pytest.approx([0] * 4 + [tc] * 3, abs=1e-5)


def test_turn_coupling_masked_token_inside_span_stays_zero():
    trajs = three_rollouts()
    trajs[0].loss_mask[5] = 0  # e.g. a forced (scripted) token inside turn 0
    mapo_turn_advantages(trajs, RAW, torch.tensor(A_TASK), MAPOConfig(lam=0.5))
    assert trajs[0].advantages[5] == 0.0
    assert trajs[0].advantages[4] == pytest.approx(A_TASK[0] + 0.4 * Z[0], abs=1e-5)


def test_turn_coupling_groups_are_normalised_separately():
    g1, g2 = three_rollouts("p1"), three_rollouts("p2")
    g2[0].reward = 0.0  # group 2: all rewards equal -> A_task = 0
    compute_mapo_advantages(g1 + g2, RAW + RAW, MAPOConfig(lam=0.5))
    # group 1 unchanged by group 2's presence
    assert g1[0].advantages[4] == pytest.approx(A_TASK[0] + 0.4 * Z[0], abs=1e-5)
    # group 2: only the semantic term
    assert g2[0].advantages[4] == pytest.approx(0.4 * Z[0], abs=1e-5)
    assert g2[0].advantages[-4] == 0.0  # answer token
    assert g2[2].advantages == [0.0] * 4 + [0.0] * 3


def test_all_equal_group_gives_exact_zero():
    trajs = [make_traj([("prompt", 2), ("call", 2), ("obs", 1), ("answer", 1)], reward=1.0)
             for _ in range(3)]
    task = compute_mapo_advantages(trajs, [[0.2], [0.2], [0.2]], MAPOConfig())
    assert task.tolist() == [0.0, 0.0, 0.0]
    for t in trajs:
        assert t.advantages == [0.0] * 6


def test_single_pooled_value_gets_no_semantic_term():
    trajs = three_rollouts()
    trajs[0].tool_calls = trajs[0].tool_calls[:1]  # A keeps 1 call, B none: pool = [G_A0]
    trajs[1].tool_calls = []
    compute_mapo_advantages(trajs, [[0.9], [], []], MAPOConfig())
    assert trajs[0].advantages[4] == pytest.approx(A_TASK[0], abs=1e-5)
    # turns that no longer carry a call count as non-tool generated tokens: A_task only
    assert trajs[0].advantages[9] == pytest.approx(A_TASK[0], abs=1e-5)


def test_trajectory_coupling():
    # S_A = (1*1 + .5*.5 + .25*0) / (1 + .5 + .25) = 1.25/1.75 = 5/7; raw .6 -> S_B = .8
    # R = [1 + .4*5/7, 0 + .4*.8, 0] = [1.2857143, 0.32, 0]
    trajs = three_rollouts()
    raw = [[1.0, 0.0, -1.0], [0.6], []]
    cfg = MAPOConfig(coupling="trajectory", lam=0.5, beta=0.4)
    assert trajectory_score([1.0, 0.5, 0.0], 0.5) == pytest.approx(5 / 7)
    assert trajectory_score([], 0.5) == 0.0
    R = mapo_trajectory_rewards(trajs, raw, cfg)
    assert R.tolist() == pytest.approx([1 + 0.4 * 5 / 7, 0.32, 0.0])
    # GRPO on R: mean .5352381, std .6693362 -> A = [1.1212230, -0.3215690, -0.7996539]
    adv = compute_mapo_advantages(trajs, raw, cfg, GRPOConfig())
    expect = [1.1212230, -0.3215690, -0.7996539]
    assert adv.tolist() == pytest.approx(expect, abs=1e-5)
    for t, e in zip(trajs, expect):  # broadcast to every generated token, 0 elsewhere
        assert t.advantages == pytest.approx([e if m else 0.0 for m in t.loss_mask], abs=1e-5)


def test_turn_coupling_task_adv_is_plain_grpo():
    trajs = three_rollouts()
    adv = compute_mapo_advantages(trajs, RAW, MAPOConfig(), GRPOConfig(norm_by_std=False))
    ref = group_advantages(torch.tensor([1.0, 0.0, 0.0]), ["p"] * 3, norm_by_std=False)
    assert torch.equal(adv, ref)


def test_score_shape_mismatch_raises():
    with pytest.raises(ValueError, match="tool calls"):
        compute_mapo_advantages(three_rollouts(), [[1.0], [None], []], MAPOConfig())
    with pytest.raises(ValueError, match="score lists"):
        compute_mapo_advantages(three_rollouts(), [[1.0, 0, 0]], MAPOConfig())


def test_check_description():
    assert check_description("a red square", 16) == "ok"
    assert check_description(None, 16) == "missing"
    assert check_description("   ", 16) == "missing"
    assert check_description("", 16) == "missing"
    assert check_description("one two three", 2) == "too_long"
    assert check_description("one two", 2) == "ok"


def test_label_and_post_descriptions():
    t = make_traj([("prompt", 2), ("call", 2), ("obs", 1), ("call", 2), ("obs", 1), ("answer", 1)],
                  labels={0: "a red square", 1: "a blue circle"})
    texts = ['<tool_call>{"name": "image_zoom_in_tool"}</tool_call>',
             "<description>\n a green square </description> then <description>x</description>"
             '<tool_call>{"name": "image_zoom_in_tool"}</tool_call>',
             "<answer>green</answer>"]
    label, post = MAPOConfig(description="label"), MAPOConfig(description="post")
    assert description_for_call(t, 0, label.description) == "a red square"
    assert description_for_call(t, 1, label.description, texts) == "a blue circle"
    assert description_for_call(t, 0, post.description, texts) == "a green square"  # first one, next turn
    assert description_for_call(t, 1, post.description, texts) is None  # answer turn has none
    assert description_for_call(t, 0, post.description) is None  # no turn texts
    assert description_for_call(t, 1, post.description, texts[:2]) is None  # no next turn
    assert extract_post_description("<description>unclosed") is None
    assert extract_post_description("<description></description>") == ""
    assert check_description(extract_post_description("<description></description>"), 16) == "missing"


def test_alignment_metrics():
    scores = [[1.0, 0.5, 0.0], [0.0], [], [0.8]]
    statuses = [["ok", "ok", "too_long"], ["missing"], [], ["ok"]]
    m = alignment_metrics(scores, statuses, [1.0, 0.0, 1.0, 0.0])
    assert m["mapo/alignment"] == pytest.approx(2.3 / 3)  # (1 + .5 + .8) / 3 valid calls
    assert m["mapo/missing_description_rate"] == pytest.approx(0.4)  # 2 of 5 calls
    # per-rollout means x = [.5, 0, .8] vs r = [1, 0, 0] (rollout 3 has no call):
    # sxy = 1/15, sxx = .98/3, syy = 2/3 -> corr = 1/7
    assert m["mapo/alignment_reward_corr"] == pytest.approx(1 / 7)


def test_alignment_metrics_undefined_cases():
    m = alignment_metrics([[0.1], [0.1], [0.1]], [["ok"]] * 3, [1.0, 0.0, 1.0])
    assert m["mapo/alignment_reward_corr"] == 0.0  # constant alignment
    m = alignment_metrics([[0.2], [0.9]], [["ok"]] * 2, [1.0, 1.0])
    assert m["mapo/alignment_reward_corr"] == 0.0  # constant reward
    m = alignment_metrics([[], []], [[], []], [1.0, 0.0])
    assert m == {"mapo/alignment": 0.0, "mapo/missing_description_rate": 0.0,
                 "mapo/alignment_reward_corr": 0.0}


def test_invalid_config_raises():
    with pytest.raises(ValueError, match="label, post"):
        MAPOConfig(description="pre")
    with pytest.raises(ValueError, match="turn, trajectory"):
        MAPOConfig(coupling="token")
    with pytest.raises(ValueError, match="lam"):
        MAPOConfig(lam=1.5)
    with pytest.raises(ValueError):
        MAPOConfig(beta=-0.1)
