"""GSPO (Group Sequence Policy Optimization, Zheng et al., Qwen team, 2025): GRPO's
group advantages with a sequence-level importance ratio, clipped per sequence.

  s_i = (pi(y_i | x) / pi_old(y_i | x)) ** (1 / |y_i|) = exp(mean_t log r_it)
  L   = -1/G sum_i min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i)

Written in the paper's GSPO-token form: on token t, s_it = sg[s_i] * pi(y_t) / sg[pi(y_t)]
has the value s_i and the gradient of s_i spread over the sequence's tokens, and the
loss is the sequence mean of the token mean. With one advantage per sequence (GRPO's)
this is GSPO itself, value and gradient; per-token advantages (MAPO's turns) also work.
The clip range is that of the ratio's geometric mean, so it is ~1e-4, not 0.2: the
paper's 3e-4 / 4e-4 are the defaults. The paper has no KL term (``algo.grpo.kl_beta``
still adds one if set; conf/algo/gspo.yaml sets it to 0).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mmagent_rl.algos.grpo import (_LOG_RATIO_CLAMP, GRPO, GRPOConfig, _masked_mean, aggregate,
                                   kl_term)
from mmagent_rl.algos.registry import LossInputs, register


@dataclass
class GSPOConfig:
    eps_low: float = 3e-4  # clip range of the sequence ratio s_i (the paper's values)
    eps_high: float = 4e-4

    def __post_init__(self):
        if not (0.0 <= self.eps_low < 1.0 and self.eps_high >= 0.0):
            raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got "
                             f"{self.eps_low}, {self.eps_high}")


def sequence_log_ratio(lp: Tensor, lp_old: Tensor, mask: Tensor) -> Tensor:
    """log s_i = mean over the generated tokens of log(pi / pi_old); [B, T] -> [B]."""
    m = mask.bool()
    zero = torch.zeros((), dtype=torch.float32, device=lp.device)
    log_r = torch.where(m, lp.float() - lp_old.float(), zero)
    return log_r.sum(-1) / m.sum(-1).clamp(min=1).to(log_r.dtype)


def gspo_loss(lp: Tensor, lp_old: Tensor, adv: Tensor, mask: Tensor, *, cfg: GSPOConfig,
              grpo_cfg: GRPOConfig, lp_ref: Tensor | None = None,
              num_seqs=None) -> tuple[Tensor, dict[str, float]]:
    """GSPO-token loss (see the module docstring), sequence-mean over ``num_seqs`` (the
    whole step's, so micro-batches add up); plus grpo_cfg.kl_beta * KL if set."""
    m = mask.bool()
    zero = torch.zeros((), dtype=torch.float32, device=lp.device)
    lp_f = torch.where(m, lp.float(), zero)
    log_s = torch.clamp(sequence_log_ratio(lp, lp_old, mask), -_LOG_RATIO_CLAMP,
                        _LOG_RATIO_CLAMP)
    s_t = torch.exp(log_s.detach()).unsqueeze(-1) * torch.exp(lp_f - lp_f.detach())
    a = torch.where(m, adv.float(), zero)
    loss_t = torch.maximum(-a * s_t, -a * torch.clamp(s_t, 1 - cfg.eps_low, 1 + cfg.eps_high))
    pg = aggregate(loss_t, m, "seq-mean-token-mean", num_seqs=num_seqs)
    loss, kl_mean = pg, 0.0
    if grpo_cfg.kl_beta > 0 and lp_ref is not None:
        kl, kl_mean = kl_term(lp, lp_ref, mask, grpo_cfg, "seq-mean-token-mean",
                              num_seqs=num_seqs)
        loss = pg + grpo_cfg.kl_beta * kl
    with torch.no_grad():
        s = torch.exp(log_s.detach())
        rows = m.any(-1)  # sequences with generated tokens (not padding copies)
        seq_adv = torch.where(m, a, zero).sum(-1) / m.sum(-1).clamp(min=1)
        clipped = ((seq_adv > 0) & (s > 1 + cfg.eps_high)) | ((seq_adv < 0) & (s < 1 - cfg.eps_low))
        n = int(rows.sum())
        stats = {
            "gspo/seq_ratio_mean": float(s[rows].mean()) if n else 0.0,
            "gspo/clipped_seq_fraction": float(clipped[rows].float().mean()) if n else 0.0,
            "rollout/logprob_diff": _masked_mean((lp.float() - lp_old.float()).abs(), m),
            "pg_loss": float(pg.detach()), "kl": kl_mean, "loss": float(loss.detach()),
        }
    return loss, stats


@register
class GSPO(GRPO):
    """GRPO's advantages; the sequence-level ratio and clip in the loss."""
    name = "gspo"
    config = GSPOConfig

    def loss(self, x: LossInputs):
        return gspo_loss(x.lp, x.lp_old, x.adv, x.mask, cfg=self.cfg.gspo,
                         grpo_cfg=self.cfg.grpo, lp_ref=x.lp_ref, num_seqs=x.num_seqs)
