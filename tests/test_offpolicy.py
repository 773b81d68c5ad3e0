"""The behaviour correction for rollouts sampled by older weights (algos/offpolicy.py),
against a float64 re-derivation of its gradient."""
from __future__ import annotations

import math

import torch

from mmagent_rl.algos.grpo import GRPOConfig, grpo_loss
from mmagent_rl.algos.offpolicy import behaviour_correction, combine


def _inputs(seed=0, B=4, T=6):
    g = torch.Generator().manual_seed(seed)
    lp = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 2).requires_grad_()
    lp_b = lp.detach() + 0.8 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T).clone()
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4:] = False
    return lp, lp_b, adv, mask


def test_fresh_rows_pass_through_unchanged_and_no_stale_rows_is_a_no_op():
    lp, lp_b, adv, mask = _inputs()
    same = behaviour_correction(lp, lp_b, adv, mask, torch.zeros(4, dtype=torch.bool), 2.0)
    assert same[0] is lp_b and same[1] is adv and same[2] == {}
    stale = torch.tensor([True, False, True, False])
    lp_old, adv2, _ = behaviour_correction(lp, lp_b, adv, mask, stale, 2.0)
    assert torch.equal(lp_old[~stale], lp_b[~stale]) and torch.equal(adv2[~stale], adv[~stale])
    assert torch.equal(lp_old[stale], lp.detach()[stale])


def test_the_loss_gradient_is_the_truncated_importance_weighted_policy_gradient():
    """With the corrected inputs, GRPO's clipped loss (token-mean, no KL) has gradient
    -sum_t A_t min(pi/mu, cap) grad log pi_t / N on stale rows, the PPO one elsewhere."""
    cap = 1.5
    lp, lp_b, adv, mask = _inputs(seed=1)
    stale = torch.tensor([True, True, False, True])
    lp_b[2] = lp.detach()[2]  # a fresh row: mu = pi (on-policy)
    lp_old, adv2, sums = behaviour_correction(lp, lp_b, adv, mask, stale, cap)
    cfg = GRPOConfig(kl_beta=0.0)
    n = int(mask.sum())
    loss, _ = grpo_loss(lp, lp_old, adv2, mask, lp_ref=None, cfg=cfg, num_tokens=n, num_seqs=4)
    (grad,) = torch.autograd.grad(loss, lp)
    w = torch.exp(lp.detach() - lp_b).clamp(max=cap)
    w[2] = 1.0
    want = torch.where(mask, -adv * w / n, torch.zeros_like(adv))
    assert torch.allclose(grad, want, atol=1e-12), (grad - want).abs().max()
    raw = torch.exp(lp.detach() - lp_b)[stale.view(-1, 1) & mask]
    got = combine([sums])
    assert got["offpolicy/stale_tokens"] == raw.numel()
    assert math.isclose(got["offpolicy/is_ratio_mean"], float(raw.mean()), rel_tol=1e-9)
    assert got["offpolicy/is_ratio_max"] == float(raw.max())
    assert math.isclose(got["offpolicy/is_clipped_share"], float((raw > cap).double().mean()))
    assert 0 < got["offpolicy/is_clipped_share"] < 1  # the cap does bind somewhere


def test_sums_combine_over_micro_batches_and_ranks():
    a = {"tokens": 2.0, "ratio_sum": 3.0, "clipped": 1.0, "ratio_max": 2.5}
    b = {"tokens": 6.0, "ratio_sum": 5.0, "clipped": 0.0, "ratio_max": 1.1}
    got = combine([a, {}, b])
    assert got == {"offpolicy/is_ratio_mean": 1.0, "offpolicy/is_ratio_max": 2.5,
                   "offpolicy/is_clipped_share": 0.125, "offpolicy/stale_tokens": 8.0}
    assert combine([{}, {}]) == {}
