"""Scores a whole batch of trajectories: task reward (a plugin chosen by import path).

``RewardScorer`` is the plain class; ``RewardActor`` is its thin Ray shell.
"""
from __future__ import annotations

import logging

from mmagent_rl.reward.task import load_reward_fn
from mmagent_rl.trajectory import Trajectory

log = logging.getLogger(__name__)


class RewardScorer:
    def __init__(self, fn: str = "mmagent_rl.reward.task:default_reward",
                 match_mode: str = "exact", format_weight: float = 0.0):
        self.fn = load_reward_fn(fn)
        self.kwargs = {"match_mode": match_mode, "format_weight": format_weight}

    def score(self, trajs: list[Trajectory]) -> list[Trajectory]:
        for t in trajs:
            try:
                reward, info = self.fn(t.response_text, t.ground_truth, **self.kwargs)
                t.reward = float(reward)
                t.reward_info = {k: float(v) for k, v in info.items()}
            except Exception as e:  # a broken plugin must not take the run down silently
                log.warning("reward fn failed on %s: %s", t.prompt_id, e)
                t.reward, t.reward_info = 0.0, {"correct": 0.0, "reward_error": 1.0}
        return trajs


def make_reward_actor(num_cpus: float, num_gpus: float = 0.0):
    import ray

    return ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=3)(RewardScorer)
