"""Driver pieces on hand-built trajectories: metrics, learner shards, advantages."""
from __future__ import annotations

import pytest
import torch

from mmagent_rl import algos
from mmagent_rl.algos.grpo import GRPOConfig
from mmagent_rl.config import Config, validate
from mmagent_rl.metrics import rollout_metrics
from mmagent_rl.trainer import shard_for_learners
from mmagent_rl.trajectory import ToolCall, Trajectory


def traj(pid, correct, tool, n_gen=3, idx=0):
    ids = list(range(5 + n_gen))
    mask = [0] * 5 + [1] * n_gen
    t = Trajectory(prompt_id=pid, sample_idx=idx, token_ids=ids, loss_mask=mask,
                   logprobs=[0.0] * len(ids), images=[], prompt_len=5)
    t.reward = float(correct)
    t.reward_info = {"correct": float(correct), "has_answer": 1.0}
    if tool:
        t.tool_calls = [ToolCall(turn=0, raw="{}")]
    return t


def test_tool_metrics_on_hand_built_groups():
    trajs = [
        traj("a", 0, True), traj("a", 0, True), traj("a", 1, False),  # tools all wrong
        traj("b", 1, True), traj("b", 0, True),  # one tool rollout right
        traj("c", 0, False), traj("c", 0, False),  # no tool use at all
    ]
    m = rollout_metrics(trajs)
    assert m["tool/use_rate"] == pytest.approx(4 / 7)
    assert m["tool/all_wrong_rate"] == pytest.approx(1 / 3)
    assert m["acc/mean"] == pytest.approx(2 / 7)
    assert m["acc/with_tool"] == pytest.approx(1 / 4)


def test_grpo_advantages_are_broadcast_to_generated_tokens_only():
    trajs = [traj("a", 1, False), traj("a", 0, False), traj("b", 1, False)]
    adv = algos.grpo_advantages(trajs, GRPOConfig())
    # group a: rewards [1, 0], mean 0.5, unbiased std sqrt(0.5) -> +-0.7071
    assert adv.tolist() == pytest.approx([0.70710, -0.70710, 0.0], abs=1e-4)
    assert trajs[0].advantages[:5] == [0.0] * 5
    assert trajs[0].advantages[5:] == pytest.approx([0.70710] * 3, abs=1e-4)


def test_learner_shards_are_equal_and_padding_adds_no_tokens():
    trajs = [traj("a", 1, False, idx=i) for i in range(5)]
    algos.grpo_advantages(trajs, GRPOConfig())
    shards = shard_for_learners(trajs, 2)
    assert [len(s) for s in shards] == [3, 3]
    flat = [t for s in shards for t in s]
    assert sum(t.num_generated for t in flat) == sum(t.num_generated for t in trajs)
    assert flat[:5] == trajs


def test_config_validation_names_key_and_choices():
    cfg = Config()
    cfg.algo.name = "grpo"
    validate(cfg)
    cfg.algo.name = "ppo"
    with pytest.raises(ValueError, match=r"algo.name.*valid choices.*grpo"):
        validate(cfg)
    cfg.algo.name = "grpo"
    cfg.rollout.agent.max_turns = 9
    with pytest.raises(ValueError, match="max_images_per_prompt"):
        validate(cfg)


def test_mapo_post_mode_prompt_asks_for_a_description():
    from mmagent_rl.config import system_prompt

    cfg = Config()
    cfg.algo.name = "mapo"
    assert "<description>" in system_prompt(cfg)  # post, the default
    cfg.algo.mapo.description = "label"
    assert system_prompt(cfg) is None  # label mode: the default tool prompt has "label"
    cfg.algo.mapo.description = "post"
    cfg.model.system_prompt = "mine"
    assert system_prompt(cfg) == "mine"  # an explicit prompt always wins


def test_eval_every_on_file_data_needs_a_heldout_file():
    from mmagent_rl.config import validate_common

    cfg = Config()
    cfg.data.kind, cfg.data.path, cfg.trainer.eval_every = "file", "train.jsonl", 5
    with pytest.raises(ValueError, match="data.eval_path"):
        validate_common(cfg)
    cfg.data.eval_path = "heldout.jsonl"
    validate_common(cfg)
