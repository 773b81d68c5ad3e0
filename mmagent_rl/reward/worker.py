"""Scores a whole batch of trajectories: the task reward (a plugin chosen by import
path) and, for MAPO, the CLIP alignment of every tool call's description with the crop
the tool really returned.

``RewardScorer`` is the plain class; ``make_reward_actor`` wraps it as a Ray actor (a
fractional CPU here, a GPU share on clusters).
"""
from __future__ import annotations

import logging
import time

from mmagent_rl.reward.task import load_reward_fn
from mmagent_rl.trajectory import Trajectory

log = logging.getLogger(__name__)


class RewardScorer:
    def __init__(self, fn: str = "mmagent_rl.reward.task:default_reward",
                 match_mode: str = "exact", format_weight: float = 0.0,
                 clip=None, mapo=None, torch_threads: int = 1):
        import torch

        torch.set_num_threads(torch_threads)
        self.fn = load_reward_fn(fn)
        self.kwargs = {"match_mode": match_mode, "format_weight": format_weight}
        self.mapo = mapo
        self.clip = None
        if clip is not None and mapo is not None:
            from mmagent_rl.reward.clip_model import ClipScorer

            self.clip = ClipScorer(clip.arch, clip.checkpoint, clip.device, clip.batch_size,
                                   mapo.max_words)

    def score(self, trajs: list[Trajectory]) -> list[Trajectory]:
        for t in trajs:
            try:
                reward, info = self.fn(t.response_text, t.ground_truth, **self.kwargs)
                t.reward = float(reward)
                t.reward_info = {k: float(v) for k, v in info.items()}
            except Exception as e:  # a broken plugin must not take the run down silently
                log.warning("reward fn failed on %s: %s", t.prompt_id, e)
                t.reward, t.reward_info = 0.0, {"correct": 0.0, "reward_error": 1.0}
        if self.clip is not None:
            self._align(trajs)
        return trajs

    def ping(self) -> bool:
        return True

    def _align(self, trajs: list[Trajectory]) -> None:
        """Per tool call: (description, crop) -> score in [0, 1] and a status; a missing,
        over-long or failed description scores 0 and keeps its status for the metrics."""
        from mmagent_rl.algos.mapo import description_for_call

        t0 = time.perf_counter()
        descs, images, where = [], [], []
        for i, t in enumerate(trajs):
            for k, call in enumerate(t.tool_calls):
                descs.append(description_for_call(t, k, self.mapo, t.meta.get("turn_texts")))
                images.append(t.images[call.image_index] if call.image_index is not None
                              else None)
                where.append(i)
        scores, statuses = self.clip.score_detailed(descs, images) if descs else ([], [])
        for t in trajs:
            t.meta["align_scores"], t.meta["align_statuses"] = [], []
        for i, s, st in zip(where, scores, statuses):
            trajs[i].meta["align_scores"].append(s)
            trajs[i].meta["align_statuses"].append(st)
        if trajs:
            trajs[0].meta["align_time_s"] = time.perf_counter() - t0
            trajs[0].meta["align_pairs"] = len(descs)


def make_reward_actor(num_cpus: float, num_gpus: float = 0.0, max_restarts: int = 3):
    """Restarted by Ray up to ``max_restarts`` times; the driver retries the call."""
    import ray

    return ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=max_restarts,
                      max_task_retries=0)(RewardScorer)
