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
