"""GRPO math: group advantages, clipped policy loss, KL to reference, aggregation.

Pure torch; formulas in docs/algorithms.md, "GRPO". Every other algorithm in the
project is GRPO plus one change, so these functions are the shared building blocks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Sequence

import torch
from torch import Tensor

from mmagent_rl.algos.registry import Algorithm, LossInputs, register
from mmagent_rl.trajectory import Trajectory

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3", "low_var_kl")
_LOG_RATIO_CLAMP = 20.0  # exp(20) ~ 4.9e8: large but finite, so no inf/NaN in fp32
_K3_CLAMP = 10.0


@dataclass
class GRPOConfig:
    norm_by_std: bool = True  # False = Dr.GRPO (only subtract the group mean)
    eps: float = 1e-6
    eps_low: float = 0.2
    eps_high: float = 0.28  # DAPO clip-higher; 0.2 gives classic PPO
    dual_clip_c: float | None = 3.0  # None disables the dual clip
    kl_beta: float = 0.001  # 0 = no KL term (and no reference model needed)
    kl_estimator: str = "k3"
    agg: str = "token-mean"
    max_response_len: int | None = None  # for seq-mean-token-sum-norm
    dynamic_sampling: bool = False  # DAPO: drop groups with all-equal rewards

    def __post_init__(self):
        if self.agg not in AGG_MODES:
            raise ValueError(f"unknown agg {self.agg!r}; valid: {', '.join(AGG_MODES)}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(
                f"unknown kl_estimator {self.kl_estimator!r}; valid: {', '.join(KL_ESTIMATORS)}"
            )
        if not (0.0 <= self.eps_low < 1.0 and self.eps_high >= 0.0):
            raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got {self.eps_low}, {self.eps_high}")
        if self.dual_clip_c is not None and self.dual_clip_c <= 1.0:
            raise ValueError(f"dual_clip_c must be > 1 (or None), got {self.dual_clip_c}")
        if self.kl_beta < 0:
            raise ValueError(f"kl_beta must be >= 0, got {self.kl_beta}")


def _group_index(group_ids: Sequence[Hashable]) -> list[list[int]]:
    if isinstance(group_ids, Tensor):  # its elements would be distinct 0-d tensors
        group_ids = group_ids.tolist()
    groups: dict[Hashable, list[int]] = {}
    for i, g in enumerate(group_ids):
        groups.setdefault(g, []).append(i)
    return list(groups.values())


def group_advantages(
    rewards: Tensor, group_ids: Sequence[Hashable], norm_by_std: bool = True, eps: float = 1e-6
) -> Tensor:
    """A_i = (r_i - mean_g) / (std_g + eps), unbiased std; groups of size 1 or equal rewards -> 0."""
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    if rewards.dim() != 1 or len(group_ids) != rewards.numel():
        raise ValueError("rewards must be 1-D with one group id per rollout")
    adv = torch.zeros_like(rewards)
    for idx in _group_index(group_ids):
        r = rewards[idx]
        # Set to exactly 0 rather than relying on r - mean: float rounding of the mean
        # would leave ~1e-8 residues that eps=1e-6 then blows up to ~1e-2.
        if r.numel() < 2 or bool((r == r[0]).all()):
            continue
        a = r - r.mean()
        if norm_by_std:
            a = a / (r.std(unbiased=True) + eps)
        adv[idx] = a
    return adv


def dynamic_sampling_keep(rewards: Tensor, group_ids: Sequence[Hashable]) -> Tensor:
    """Per-rollout bool mask [N]: True where the rollout's group has non-identical rewards.

    DAPO dynamic sampling: groups with accuracy 0 or 1 carry zero advantage, so drop them.
    A group of size 1 is trivially all-equal and is dropped too.
    """
    rewards = torch.as_tensor(rewards)
    keep = torch.zeros(rewards.numel(), dtype=torch.bool)
    for idx in _group_index(group_ids):
        r = rewards[idx]
        keep[idx] = not bool((r == r[0]).all())
    return keep


def aggregate(
    values: Tensor,
    mask: Tensor,
    agg: str = "token-mean",
    *,
    num_tokens: int | float | Tensor | None = None,
    num_seqs: int | float | Tensor | None = None,
    max_len: int | None = None,
) -> Tensor:
    """Reduce a [B, T] per-token matrix to a scalar under a 0/1 mask.

    Pass the *global* `num_tokens` / `num_seqs` when a batch is split into micro-batches
    (or DP ranks): the per-micro-batch results then sum to the global-batch value.
    Defaults: local masked-token count, local row count B, max_len = T.
    """
    if agg not in AGG_MODES:
        raise ValueError(f"unknown agg {agg!r}; valid: {', '.join(AGG_MODES)}")
    m = mask.bool()
    # where, not multiply: padding may hold inf/NaN, and 0 * inf = NaN.
    v = torch.where(m, values, torch.zeros((), dtype=values.dtype, device=values.device))
    B, T = v.shape
    if num_seqs is None:
        num_seqs = B
    if agg == "token-mean":
        denom = m.sum() if num_tokens is None else num_tokens
        return v.sum() / max(float(denom), 1.0)
    if agg == "seq-mean-token-mean":
        # clamp(min=1): a sequence with no generated tokens contributes 0, not NaN
        per_seq = v.sum(-1) / m.sum(-1).clamp(min=1).to(v.dtype)
        return per_seq.sum() / max(float(num_seqs), 1.0)
    if agg == "seq-mean-token-sum":
        return v.sum() / max(float(num_seqs), 1.0)
    # seq-mean-token-sum-norm (Dr.GRPO): a constant denominator, so no length bias
    L = T if max_len is None else max_len
    return v.sum() / max(float(num_seqs) * float(L), 1.0)


def kl_penalty(lp: Tensor, lp_ref: Tensor, kind: str = "k3") -> Tensor:
    """Per-token KL(pi || pi_ref) estimate from sampled-token log-probs."""
    if kind == "k1":
        return lp - lp_ref
    if kind == "k2":
        return 0.5 * (lp - lp_ref) ** 2
    if kind in ("k3", "low_var_kl"):
        x = torch.clamp(lp_ref - lp, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
        return torch.clamp(torch.exp(x) - x - 1, -_K3_CLAMP, _K3_CLAMP)
    raise ValueError(f"unknown kl estimator {kind!r}; valid: {', '.join(KL_ESTIMATORS)}")


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Per-position entropy [..., V] -> [...], in fp32: H = logsumexp(z) - sum softmax(z) z."""
    z = logits.float()
    # Entropy is shift-invariant; subtracting the row max avoids the fp32 cancellation
    # of lse - sum(p z) when logits are large (e.g. ~1e3 would be off by ~3e-2).
    zmax = z.detach().amax(dim=-1, keepdim=True)
    z = z - torch.where(torch.isfinite(zmax), zmax, torch.zeros_like(zmax))
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    p = torch.exp(z - lse)
    # -inf logits (masked vocab) have p = 0; zero them so 0 * -inf does not give NaN
    z_safe = torch.where(torch.isfinite(z), z, torch.zeros_like(z))
    return lse.squeeze(-1) - (p * z_safe).sum(-1)


def _masked_mean(x: Tensor, m: Tensor) -> float:
    n = int(m.sum())
    return float(torch.where(m, x, torch.zeros_like(x)).sum()) / n if n else 0.0


def policy_loss(
    lp: Tensor,
    lp_old: Tensor,
    adv: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    dual_clip_c: float | None = 3.0,
    agg: str = "token-mean",
    num_tokens=None,
    num_seqs=None,
    max_len: int | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped (asymmetric, dual-clip) surrogate; all inputs [B, T], adv per token."""
    m = mask.bool()
    zero = torch.zeros((), dtype=torch.float32, device=lp.device)
    # Sanitize padding before any math so NaN/inf there cannot leak into gradients.
    log_ratio = torch.where(m, lp.float() - lp_old.float(), zero)
    adv = torch.where(m, adv.float(), zero)
    ratio = torch.exp(torch.clamp(log_ratio, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss_t = torch.maximum(pg1, pg2)
    dual = torch.zeros_like(m)
    if dual_clip_c is not None:
        # For A<0 the ratio is unbounded above; cap the loss at -A*c.
        cap = -adv * dual_clip_c
        dual = (adv < 0) & (loss_t > cap)
        loss_t = torch.where(adv < 0, torch.minimum(loss_t, cap), loss_t)
    loss = aggregate(loss_t, m, agg, num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len)
    with torch.no_grad():
        ratio_d = ratio.detach()
        stats = {
            "clip/upper_fraction": _masked_mean(((adv > 0) & (ratio_d > 1 + eps_high)).float(), m),
            "clip/lower_fraction": _masked_mean(((adv < 0) & (ratio_d < 1 - eps_low)).float(), m),
            "clip/dual_fraction": _masked_mean(dual.float(), m),
            "ratio/mean": _masked_mean(ratio_d, m),
            # |learner - engine| log-probability of the sampled tokens: ~1e-6 while the
            # engine serves the learner's weights (one update per batch); larger means
            # the rollouts came from other weights (a stale sync, a precision gap).
            "rollout/logprob_diff": _masked_mean(log_ratio.detach().abs(), m),
        }
    return loss, stats


def kl_term(lp: Tensor, lp_ref: Tensor, mask: Tensor, cfg: GRPOConfig, agg: str, *,
            num_tokens=None, num_seqs=None) -> tuple[Tensor, float]:
    """The KL-to-reference term before its weight ``cfg.kl_beta``: ``agg`` of the
    per-token estimate ``cfg.kl_estimator``, and its masked mean (for the ``kl`` stat)."""
    m = mask.bool()
    zero = torch.zeros((), dtype=torch.float32, device=lp.device)
    lp_f = torch.where(m, lp.float(), zero)
    ref_f = torch.where(m, lp_ref.float(), zero)
    kl_t = kl_penalty(lp_f, ref_f, cfg.kl_estimator)
    kl = aggregate(kl_t, m, agg, num_tokens=num_tokens, num_seqs=num_seqs,
                   max_len=cfg.max_response_len)
    return kl, _masked_mean(kl_t.detach(), m)


def grpo_loss(
    lp: Tensor,
    lp_old: Tensor,
    adv: Tensor,
    mask: Tensor,
    *,
    lp_ref: Tensor | None = None,
    cfg: GRPOConfig,
    num_tokens=None,
    num_seqs=None,
) -> tuple[Tensor, dict[str, float]]:
    """Policy loss + cfg.kl_beta * agg(kl_t); stats add `pg_loss`, `kl`, `loss`."""
    pg, stats = policy_loss(
        lp, lp_old, adv, mask,
        eps_low=cfg.eps_low, eps_high=cfg.eps_high, dual_clip_c=cfg.dual_clip_c,
        agg=cfg.agg, num_tokens=num_tokens, num_seqs=num_seqs, max_len=cfg.max_response_len,
    )
    loss = pg
    kl_mean = 0.0
    if cfg.kl_beta > 0 and lp_ref is not None:
        kl, kl_mean = kl_term(lp, lp_ref, mask, cfg, cfg.agg, num_tokens=num_tokens,
                              num_seqs=num_seqs)
        loss = pg + cfg.kl_beta * kl
    stats.update(pg_loss=float(pg.detach()), kl=kl_mean, loss=float(loss.detach()))
    return loss, stats


def broadcast_advantages(trajs: list[Trajectory], adv: Tensor) -> None:
    """Rollout i's scalar advantage on every token it generated (0 elsewhere)."""
    for t, a in zip(trajs, adv.tolist()):
        t.advantages = [a if m else 0.0 for m in t.loss_mask]


def grpo_advantages(trajs: list[Trajectory], cfg: GRPOConfig) -> Tensor:
    rewards = torch.tensor([t.reward or 0.0 for t in trajs], dtype=torch.float64)
    adv = group_advantages(rewards, [t.prompt_id for t in trajs],
                           norm_by_std=cfg.norm_by_std, eps=cfg.eps).float()
    broadcast_advantages(trajs, adv)
    return adv


@register
class GRPO(Algorithm):
    """The baseline; the others subclass it and change one hook."""
    name = "grpo"
    config = GRPOConfig  # algo.grpo: shared by every algorithm

    def advantages(self, trajs):
        return grpo_advantages(trajs, self.cfg.grpo), {}

    @property
    def needs_reference(self) -> bool:
        return self.cfg.grpo.kl_beta > 0  # beta 0: no reference model is loaded at all

    def loss(self, x: LossInputs):
        return grpo_loss(x.lp, x.lp_old, x.adv, x.mask, lp_ref=x.lp_ref, cfg=self.cfg.grpo,
                         num_tokens=x.num_tokens, num_seqs=x.num_seqs)
