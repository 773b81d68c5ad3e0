"""Pure torch math on tensors and Trajectories: no Ray, vLLM or DeepSpeed imports.

An algorithm is picked by name (``algo.name``); each is GRPO plus one change."""
from __future__ import annotations

import torch

from mmagent_rl.algos.grpo import GRPOConfig, group_advantages
from mmagent_rl.trajectory import Trajectory


def broadcast_advantages(trajs: list[Trajectory], adv: torch.Tensor) -> None:
    """Rollout i's scalar advantage on every token it generated (0 elsewhere)."""
    for t, a in zip(trajs, adv.tolist()):
        t.advantages = [a if m else 0.0 for m in t.loss_mask]


def grpo_advantages(trajs: list[Trajectory], cfg: GRPOConfig) -> torch.Tensor:
    rewards = torch.tensor([t.reward or 0.0 for t in trajs], dtype=torch.float64)
    adv = group_advantages(rewards, [t.prompt_id for t in trajs],
                           norm_by_std=cfg.norm_by_std, eps=cfg.eps).float()
    broadcast_advantages(trajs, adv)
    return adv


def compute_advantages(trajs: list[Trajectory], algo) -> tuple[torch.Tensor, dict]:
    """Per-token advantages for ``algo.name`` (grpo, papo, axpo: GRPO's; mapo: coupled
    with the alignment scores the reward actor stored in ``meta``). Returns the
    per-rollout task advantage and the algorithm's metrics."""
    if algo.name != "mapo":
        return grpo_advantages(trajs, algo.grpo), {}
    from dataclasses import replace

    from mmagent_rl.algos.mapo import alignment_metrics, compute_mapo_advantages

    # The scorer returns (cos + 1) / 2 already; rescale=false asks for raw cosines.
    statuses = [list(t.meta.get("align_statuses", [])) for t in trajs]
    scores = [list(t.meta.get("align_scores", [])) for t in trajs]
    if not algo.mapo.rescale:
        scores = [[2 * s - 1 if st == "ok" else None for s, st in zip(sc, sts)]
                  for sc, sts in zip(scores, statuses)]
    cfg = replace(algo.mapo, rescale=False)
    adv = compute_mapo_advantages(trajs, scores, cfg, algo.grpo, statuses)
    rescaled = [[s if st == "ok" else 0.0 for s, st in zip(sc, sts)] for sc, sts in
                zip([list(t.meta.get("align_scores", [])) for t in trajs], statuses)]
    metrics = alignment_metrics(rescaled, statuses, [t.reward or 0.0 for t in trajs])
    return adv, metrics
