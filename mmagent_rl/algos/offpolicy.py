"""Rollouts sampled by older weights (``trainer.off_policy_steps`` > 0): the correction
applied before any algorithm's loss, so every algorithm trains on stale rollouts alike.

A stale trajectory was sampled by the behaviour policy mu (the engine's weights, version
v) while the learner is at version v + k. Its tokens keep their advantages but are
weighted by the truncated importance ratio w = min(pi / mu, cap), pi the learner's
current policy (detached), and the PPO ratio is taken against pi itself (the
"proximal" policy of decoupled PPO; with one optimizer step per batch it is 1, so the
clip acts on nothing and w does the correcting). Fresh trajectories (k = 0) keep
today's inputs bit for bit: mu is then pi up to float error.
"""
from __future__ import annotations

import torch
from torch import Tensor


def behaviour_correction(lp: Tensor, lp_behaviour: Tensor, adv: Tensor, mask: Tensor,
                         stale: Tensor, cap: float) -> tuple[Tensor, Tensor, dict]:
    """``lp``: the learner's log-probs [B, T] (with grad), ``lp_behaviour``: the engine's;
    ``stale``: [B] bool, the rows sampled by older weights. Returns the (lp_old, adv) to
    give the loss, and sums over the stale rows' tokens (``combine`` turns the sums of
    micro-batches and ranks into the metrics)."""
    rows = stale.bool().view(-1, 1) & mask.bool()
    if not bool(rows.any()):
        return lp_behaviour, adv, {}
    dt = torch.promote_types(lp.dtype, torch.float32)  # at least fp32 (bf16 policies)
    log_w = (lp.detach().to(dt) - lp_behaviour.to(dt)).clamp(-20.0, 20.0)
    raw = torch.exp(log_w)
    w = raw.clamp(max=cap)
    lp_old = torch.where(rows, lp.detach().to(lp_behaviour.dtype), lp_behaviour)
    adv = torch.where(rows, adv * w.to(adv.dtype), adv)
    sums = {"tokens": float(rows.sum()), "ratio_sum": float(raw[rows].sum()),
            "clipped": float((raw[rows] > cap).sum()), "ratio_max": float(raw[rows].max())}
    return lp_old, adv, sums


def combine(parts: list[dict]) -> dict:
    """The metrics of several ``behaviour_correction`` sums (micro-batches, ranks)."""
    parts = [p for p in parts if p]
    n = sum(p["tokens"] for p in parts)
    if not n:
        return {}
    return {"offpolicy/is_ratio_mean": sum(p["ratio_sum"] for p in parts) / n,
            "offpolicy/is_ratio_max": max(p["ratio_max"] for p in parts),
            "offpolicy/is_clipped_share": sum(p["clipped"] for p in parts) / n,
            "offpolicy/stale_tokens": n}
