"""Scores a whole batch of trajectories: the task reward (a plugin chosen by import
path) and, when the algorithm asks for it (MAPO), the CLIP alignment of every tool
call's description with the crop the tool really returned.

``RewardScorer`` is the plain class; ``make_reward_actor`` wraps it as a Ray actor (a
fractional CPU here, a GPU share on clusters). The actor's call, ``scores``, returns one
``Score`` per trajectory and its metrics, not the trajectories (their images stay where
they are); ``score`` applies them in place, for local use.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from mmagent_rl.reward.task import load_reward_fn
from mmagent_rl.trajectory import Trajectory

log = logging.getLogger(__name__)


@dataclass
class Score:
    reward: float
    info: dict[str, float] = field(default_factory=dict)
    align_scores: list[float] | None = None
    align_statuses: list[str] | None = None

    def apply(self, t: Trajectory) -> None:
        t.reward, t.reward_info = self.reward, dict(self.info)
        if self.align_scores is not None:
            t.align_scores, t.align_statuses = self.align_scores, self.align_statuses


class RewardScorer:
    """``cfg``: the reward section (``fn``, ``match_mode``, ``format_weight``, ``clip``;
    default: RewardConfig()). ``alignment``: the algorithm's alignment settings
    (``description``, ``max_words``: MAPO's ``alignment()`` hook), or None: no CLIP, no
    alignment scores."""

    def __init__(self, cfg=None, alignment=None, torch_threads: int = 1):
        import torch

        if cfg is None:
            from mmagent_rl.config import RewardConfig

            cfg = RewardConfig()
        torch.set_num_threads(torch_threads)
        self.fn = load_reward_fn(cfg.fn)
        self.kwargs = {"match_mode": cfg.match_mode, "format_weight": cfg.format_weight}
        self.mapo = alignment
        self.clip = None
        if alignment is not None:
            from mmagent_rl.reward.clip_model import ClipScorer

            c = cfg.clip
            self.clip = ClipScorer(c.arch, c.checkpoint, c.device, c.batch_size,
                                   alignment.max_words)

    def scores(self, trajs: list[Trajectory]) -> tuple[list[Score], dict]:
        """One Score per trajectory, and additive metrics (alignment pairs and time)."""
        out = []
        for t in trajs:
            try:
                reward, info = self.fn(t.response_text, t.ground_truth, **self.kwargs)
                out.append(Score(float(reward), {k: float(v) for k, v in info.items()}))
            except Exception as e:  # a broken plugin must not take the run down silently
                log.warning("reward fn failed on %s: %s", t.prompt_id, e)
                out.append(Score(0.0, {"correct": 0.0, "reward_error": 1.0}))
        metrics = self._align(trajs, out) if self.clip is not None else {}
        return out, metrics

    def score(self, trajs: list[Trajectory]) -> list[Trajectory]:
        """``scores`` applied to ``trajs`` in place (the eval and local callers)."""
        for t, s in zip(trajs, self.scores(trajs)[0]):
            s.apply(t)
        return trajs

    def ping(self) -> bool:
        return True

    def _align(self, trajs: list[Trajectory], out: list[Score]) -> dict:
        """Per tool call: (description, crop) -> score in [0, 1] and a status; a missing,
        over-long or failed description scores 0 and keeps its status for the metrics."""
        from mmagent_rl.trajectory import description_for_call

        t0 = time.perf_counter()
        descs, images, where = [], [], []
        for i, t in enumerate(trajs):
            for k, call in enumerate(t.tool_calls):
                descs.append(description_for_call(t, k, self.mapo.description,
                                                  t.turn_texts))
                images.append(t.images[call.image_index] if call.image_index is not None
                              else None)
                where.append(i)
        scores, statuses = self.clip.score_detailed(descs, images) if descs else ([], [])
        for s in out:
            s.align_scores, s.align_statuses = [], []
        for i, sc, st in zip(where, scores, statuses):
            out[i].align_scores.append(sc)
            out[i].align_statuses.append(st)
        return {"mapo/align_pairs": float(len(descs)),
                "mapo/align_time_s": time.perf_counter() - t0}


def make_reward_actor(num_cpus: float, num_gpus: float = 0.0, max_restarts: int = 3):
    """Restarted by Ray up to ``max_restarts`` times; the driver retries the call."""
    import ray

    return ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=max_restarts,
                      max_task_retries=0)(RewardScorer)
