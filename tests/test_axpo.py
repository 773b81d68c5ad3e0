"""Tests for mmagent_rl.algos.axpo on hand-built trajectories (token ids are small ints)."""
import math
import random

import pytest
import torch
from PIL import Image

from mmagent_rl.algos import grpo_advantages
from mmagent_rl.algos.axpo import (
    AXPOConfig,
    Selection,
    axpo_advantages,
    axpo_metrics,
    call_confidence,
    fork_point,
    group_continuations,
    make_prefix,
    select_prefixes,
    triggered_groups,
)
from mmagent_rl.algos.grpo import GRPOConfig
from mmagent_rl.trajectory import ToolCall, Trajectory

torch.set_num_threads(1)
OPEN, CLOSE, OBS = 7, 8, 9
PROMPT = [100, 101, 102]
TEXT = {OPEN: "<tool_call>", CLOSE: "</tool_call>"}
NAME = "image_zoom_in_tool"


def img(c=0):
    return Image.new("RGB", (2, 2), (c, c, c))


def build(pid, idx, turns, correct=False, names=None, lps=None, masks=None, crop=True):
    """turns: generated token lists; a turn ending in CLOSE is a call followed by a
    2-token observation (mask 0) and, if ``crop``, a crop image."""
    ids, mask, lp = list(PROMPT), [0] * 3, [0.0] * 3
    images, calls, text = [img()], [], ""
    for k, turn in enumerate(turns):
        start = len(ids)
        ids += turn
        mask += masks[k] if masks else [1] * len(turn)
        lp += lps[k] if lps else [-0.1] * len(turn)
        text += "".join(TEXT.get(t, f"w{t} ") for t in turn)
        if turn and turn[-1] == CLOSE:
            name = names[k] if names else NAME
            call = ToolCall(turn=k, raw="{}", name=name, span=(start, len(ids)),
                            error=None if name and crop else "Error: x")
            if call.ok:
                call.image_index = len(images)
                images.append(img(k + 1))
            calls.append(call)
            ids += [OBS, OBS]
            mask += [0, 0]
            lp += [0.0, 0.0]
    return Trajectory(prompt_id=pid, sample_idx=idx, token_ids=ids, loss_mask=mask,
                      logprobs=lp, images=images, prompt_len=3, response_text=text,
                      tool_calls=calls, reward=float(correct),
                      reward_info={"correct": float(correct)}, turns=len(turns))


TOOL_WRONG = [[1, 2, OPEN, 3, CLOSE], [4, 5]]
NO_TOOL = [[1, 2, 3]]


# ---------------------------------------------------------------- config / trigger

@pytest.mark.parametrize("kw", [dict(budget_ratio=-0.1), dict(k=0), dict(k=1.5),
                                dict(selection="greedy"), dict(recovery_reward="max")])
def test_config_validation(kw):
    with pytest.raises(ValueError):
        AXPOConfig(**kw)


def test_triggered_groups():
    trajs = [
        build("notool", 0, NO_TOOL), build("notool", 1, NO_TOOL, correct=True),
        build("fine", 0, TOOL_WRONG), build("fine", 1, TOOL_WRONG, correct=True),
        build("bad", 0, TOOL_WRONG), build("bad", 1, NO_TOOL, correct=True),
        build("bad", 2, TOOL_WRONG),
        build("bad2", 0, TOOL_WRONG),
    ]
    assert triggered_groups(trajs) == ["bad", "bad2"]


# ---------------------------------------------------------------- fork / confidence

def test_fork_at_real_call_not_literal_in_thinking():
    # thinking holds a literal <tool_call> (index 4); the real opening is index 6
    t = build("p", 0, [[1, OPEN, 2, OPEN, 3, CLOSE], [4]])
    assert t.token_ids[3 + 3] == OPEN
    assert fork_point(t, OPEN) == 3 + 4


def test_fork_skips_unparsed_call_and_masked_tokens():
    # call 1: JSON did not parse (name None); call 2 is the fork; its turn starts at 10
    t = build("p", 0, [[OPEN, 1, CLOSE], [2, OPEN, 3, CLOSE], [5]], names=[None, NAME, None])
    assert t.tool_calls[1].span == (8, 12)
    assert fork_point(t, OPEN) == 10
    # an opening tag the policy did not generate (mask 0, e.g. scripted) is not a fork
    s = build("p", 1, [[2, OPEN, 3, CLOSE], [5]], masks=[[1, 0, 1, 1], [1]])
    assert fork_point(s, OPEN) is None
    assert fork_point(build("p", 2, NO_TOOL), OPEN) is None
    assert fork_point(build("p", 3, [[OPEN, 1, CLOSE]], names=[None]), OPEN) is None


def test_call_confidence_known_logprobs():
    lps = [[-0.1, math.log(0.9), math.log(0.5), math.log(0.25)], [0.0]]
    t = build("p", 0, [[1, OPEN, 3, CLOSE], [4]], lps=lps)
    fork = fork_point(t, OPEN)
    assert fork == 5
    end = t.tool_calls[0].span[1]
    assert call_confidence(t, fork, end) == pytest.approx((0.5 + 0.25) / 2)
    assert call_confidence(t, end, end) == 1.0  # no tokens: most confident


# ---------------------------------------------------------------- selection

def _wrong(pid, idx, p):
    """A wrong tool rollout whose call span has confidence p."""
    return build(pid, idx, [[1, OPEN, 3, CLOSE], [4]],
                 lps=[[-0.1, -0.1, math.log(p), math.log(p)], [0.0]])


def test_select_breadth_first_least_confident_first():
    trajs = [
        _wrong("a", 0, 0.6), _wrong("a", 1, 0.2), _wrong("a", 2, 0.3),
        _wrong("b", 0, 0.5), build("b", 1, NO_TOOL),
        _wrong("c", 0, 0.1), _wrong("c", 1, 0.9),
        build("d", 0, TOOL_WRONG, correct=True), _wrong("d", 1, 0.01),  # not triggered
        build("e", 0, NO_TOOL),  # no tool: not triggered
    ]
    cfg = AXPOConfig(budget_ratio=0.25, k=2)  # B=5, G=2 -> floor(2.5/2) = 1
    sel = select_prefixes(trajs, cfg, OPEN, batch_prompts=5, group_size=2)
    assert [(s.traj.prompt_id, s.traj.sample_idx) for s in sel] == [("c", 0)]
    assert sel[0].fork == 5 and sel[0].confidence == pytest.approx(0.1)
    # budget 4: round 1 = least confident of each prompt, c(0.1) a(0.2) b(0.5); round 2
    # = the next of each, by their own confidence: a(0.3) before c(0.9)
    cfg = AXPOConfig(budget_ratio=1.0, k=1)
    sel = select_prefixes(trajs, cfg, OPEN, batch_prompts=2, group_size=2)
    assert [(s.traj.prompt_id, s.traj.sample_idx) for s in sel] == [
        ("c", 0), ("a", 1), ("b", 0), ("a", 2)]
    # a budget larger than the candidates takes them all
    sel = select_prefixes(trajs, AXPOConfig(budget_ratio=10.0, k=1), OPEN, 5, 2)
    assert len(sel) == 6 and [s.traj.prompt_id for s in sel[3:]] == ["a", "c", "a"]


def test_select_orders_each_round_by_the_prefix_own_confidence():
    """The float64 re-implementation's case: the budget ends mid-round 2, where q3's
    .374 must win over q2's .58 (ordering rounds by the prompts' first-round confidence
    picked .58)."""
    trajs = [_wrong("q2", 0, 0.09), _wrong("q2", 1, 0.58), _wrong("q0", 0, 0.32),
             _wrong("q0", 1, 0.40), _wrong("q3", 0, 0.372), _wrong("q3", 1, 0.374)]
    sel = select_prefixes(trajs, AXPOConfig(budget_ratio=1.0, k=1), OPEN, batch_prompts=2,
                          group_size=2)
    assert [round(s.confidence, 3) for s in sel] == [0.09, 0.32, 0.372, 0.374]
    assert select_prefixes(trajs, AXPOConfig(budget_ratio=0.0), OPEN, 5, 2) == []


def test_select_random_is_breadth_first_and_seeded():
    trajs = [_wrong(p, i, 0.5) for p in "abc" for i in range(3)]
    cfg = AXPOConfig(budget_ratio=1.0, k=1, selection="random")
    s1 = select_prefixes(trajs, cfg, OPEN, 3, 1, rng=random.Random(3))
    s2 = select_prefixes(trajs, cfg, OPEN, 3, 1, rng=random.Random(3))
    assert sorted(s.traj.prompt_id for s in s1) == ["a", "b", "c"]
    assert [s.key for s in s1] == [s.key for s in s2]


# ---------------------------------------------------------------- prefix

def test_make_prefix_truncates_and_keeps_earlier_images():
    # turn 0: a completed call (crop 1); turn 1: the fork call (its crop must go)
    t = build("p", 0, [[1, OPEN, 2, CLOSE], [3, OPEN, 4, CLOSE], [5]],
              names=[None, NAME, None])
    t.tool_calls[0].error, t.tool_calls[0].image_index = None, 1  # pretend it produced a crop
    t.images = [img(), img(1), img(2)]
    t.tool_calls[1].image_index = 2
    t.advantages = [float(i) for i in range(len(t.token_ids))]
    fork = fork_point(t, OPEN)
    assert fork == 3 + 4 + 2 + 2  # prompt, turn 0, observation, "3 <tool_call>"
    p = make_prefix(t, fork)
    assert p.token_ids == t.token_ids[:fork] and p.loss_mask == t.loss_mask[:fork]
    assert p.logprobs == t.logprobs[:fork] and p.advantages == t.advantages[:fork]
    assert p.images == t.images[:2]
    assert p.turns == 1 and [c.turn for c in p.tool_calls] == [0]
    assert p.response_text == "w1 <tool_call>w2 </tool_call>w3 <tool_call>"
    assert p.partial_text == "w3 <tool_call>"
    assert p.meta["axpo_fork_turn_start"] == 9 and p.meta["axpo_prefix_text_ok"]
    assert p.reward is None and p.reward_info == {}
    assert t.token_ids[fork:] and len(t.images) == 3  # source untouched


def test_make_prefix_literal_tag_in_thinking_text():
    t = build("p", 0, [[1, OPEN, 2, OPEN, 3, CLOSE], [4]])
    p = make_prefix(t, fork_point(t, OPEN))
    assert p.response_text == "w1 <tool_call>w2 <tool_call>"
    assert p.turns == 0 and p.tool_calls == [] and len(p.images) == 1


# ---------------------------------------------------------------- advantages

def _cont(source, j, correct, n_new=3):
    pre = len(source.token_ids)
    return Trajectory(prompt_id=f"{source.prompt_id}/cont{source.sample_idx}", sample_idx=j,
                      token_ids=[1] * (pre + n_new), loss_mask=[0] * pre + [1] * n_new,
                      logprobs=[0.0] * (pre + n_new), images=[img()], prompt_len=pre,
                      reward=float(correct), reward_info={"correct": float(correct)})


def _group():
    # rewards [1 (no tool), 0, 0, 0]: triggered; GRPO A = [1.5, -0.5, -0.5, -0.5]
    g = [build("q", 0, NO_TOOL, correct=True)] + [_wrong("q", i, 0.5) for i in (1, 2, 3)]
    other = [build("o", 0, TOOL_WRONG, correct=True), build("o", 1, TOOL_WRONG)]
    trajs = g + other
    grpo_advantages(trajs, GRPOConfig())
    return trajs


def test_continuation_group_normalisation_and_prefix_credit_recovered():
    trajs = _group()
    before = {(t.prompt_id, t.sample_idx): list(t.advantages) for t in trajs}
    src = trajs[1]
    fork = fork_point(src, OPEN)
    sel = [Selection(src, fork, 0.5)]
    conts = [_cont(make_prefix(src, fork), j, correct=(j == 0)) for j in range(4)]
    by = group_continuations(sel, conts)
    assert by == {("q", 1): conts}
    out = axpo_advantages(trajs, by, sel, GRPOConfig())
    a = 0.75 / (math.sqrt(0.25) + 1e-6)  # [1,0,0,0]: mean .25, std .5
    for c, exp in zip(conts, [a * 1, -a / 3, -a / 3, -a / 3]):
        assert c.advantages[:fork] == [0.0] * fork  # prefix tokens carry nothing
        assert c.advantages[fork:] == pytest.approx([exp] * 3, abs=1e-5)
    # source reward 0 -> 1: group [1, 1, 0, 0] -> +0.866 on its prefix tokens only
    pa = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    assert out["prefix_advantage"][("q", 1)] == pytest.approx(pa, abs=1e-5)
    assert out["recovery"][("q", 1)] == 1.0
    for i, (m, adv) in enumerate(zip(src.loss_mask, src.advantages)):
        if not m:
            assert adv == 0.0
        elif i < fork:
            assert adv == pytest.approx(pa, abs=1e-5)
        else:
            assert adv == pytest.approx(before[("q", 1)][i])  # after the fork: original
    assert before[("q", 1)][5] == pytest.approx(-0.5, abs=1e-5)
    # every other ordinary rollout is unchanged
    for t in trajs:
        if t is not src:
            assert t.advantages == before[(t.prompt_id, t.sample_idx)]
    # weights: token-mean keeps the ordinary normaliser
    n_ord = sum(t.num_generated for t in trajs)
    assert out["loss_weight"] == pytest.approx((n_ord + 12) / n_ord)


def test_prefix_credit_without_recovery_and_two_sources():
    trajs = _group()
    s1, s2 = trajs[1], trajs[2]
    sel = [Selection(s, fork_point(s, OPEN), 0.5) for s in (s1, s2)]
    by = {("q", 1): [_cont(s1, j, False) for j in range(2)],
          ("q", 2): [_cont(s2, j, j == 1) for j in range(2)]}
    out = axpo_advantages(trajs, by, sel, GRPOConfig(agg="seq-mean-token-mean"))
    # one renormalisation with both replaced: [1, 0, 1, 0] -> +-0.866
    pa = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    assert out["prefix_advantage"][("q", 1)] == pytest.approx(-pa, abs=1e-5)
    assert out["prefix_advantage"][("q", 2)] == pytest.approx(pa, abs=1e-5)
    # all-wrong continuations: identical rewards -> 0 advantage on them
    assert all(a == 0.0 for c in by[("q", 1)] for a in c.advantages)
    assert out["loss_weight"] == pytest.approx((6 + 4) / 6)  # seq-mean: sequences


def test_advantages_need_grpo_first_and_skip_missing_continuations():
    trajs = [_wrong("q", 0, 0.5), _wrong("q", 1, 0.5)]
    sel = [Selection(trajs[0], 5, 0.5)]
    with pytest.raises(ValueError):
        axpo_advantages(trajs, {}, sel, GRPOConfig())
    grpo_advantages(trajs, GRPOConfig())
    before = [list(t.advantages) for t in trajs]
    out = axpo_advantages(trajs, {}, sel, GRPOConfig())
    assert [t.advantages for t in trajs] == before
    assert out["prefix_advantage"] == {} and out["loss_weight"] == 1.0


def test_mean_correct_recovery_and_plain_weight():
    trajs = _group()
    src = trajs[1]
    sel = [Selection(src, fork_point(src, OPEN), 0.5)]
    by = {("q", 1): [_cont(src, j, j < 1) for j in range(4)]}
    cfg = AXPOConfig(recovery_reward="mean_correct", keep_ordinary_weight=False)
    out = axpo_advantages(trajs, by, sel, GRPOConfig(), cfg)
    assert out["recovery"][("q", 1)] == 0.25 and out["loss_weight"] == 1.0


# ---------------------------------------------------------------- metrics

def test_metrics():
    trajs = _group()  # q: triggered; o: has a correct tool rollout
    s1, s2 = trajs[1], trajs[2]
    sel = [Selection(s1, 5, 0.5), Selection(s2, 5, 0.5)]
    conts = [_cont(s1, 0, True), _cont(s1, 1, False), _cont(s2, 0, False)]
    m = axpo_metrics(trajs, sel, conts)
    n_ord = sum(t.num_generated for t in trajs)
    assert m["axpo/triggered_prompts"] == 1 and m["axpo/resampled_prefixes"] == 2
    assert m["axpo/recovery_rate"] == 0.5
    assert m["axpo/extra_token_share"] == pytest.approx(9 / n_ord)
    assert m["axpo/tool_use_share"] == pytest.approx(5 / 6)
    assert m["axpo/triggered_share"] == 0.5
    assert axpo_metrics(trajs, sel, group_continuations(sel, conts)) == m
    empty = axpo_metrics([], [], {})
    assert empty["axpo/recovery_rate"] == 0.0 and empty["axpo/extra_token_share"] == 0.0
