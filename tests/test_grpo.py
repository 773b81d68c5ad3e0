"""Tests for mmagent_rl.algos.grpo against hand-computed numbers."""
import math

import pytest
import torch

from mmagent_rl.algos.grpo import (
    AGG_MODES,
    GRPOConfig,
    aggregate,
    dynamic_sampling_keep,
    entropy_from_logits,
    group_advantages,
    grpo_loss,
    kl_penalty,
    policy_loss,
)

torch.set_num_threads(1)
LN2 = math.log(2.0)


def t(x, **kw):
    return torch.tensor(x, dtype=torch.float32, **kw)


# ---------------------------------------------------------------- advantages

def test_group_advantages_one_group():
    # mean 0.5; deviations +-0.5; unbiased var = (4 * 0.25) / 3 = 1/3; std = 0.57735
    # A = 0.5 / (0.57735 + 1e-6) = 0.866024
    a = group_advantages(t([1, 0, 0, 1]), ["p"] * 4)
    exp = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    assert torch.allclose(a, t([exp, -exp, -exp, exp]), atol=1e-6)


def test_group_advantages_interleaved_and_degenerate_groups():
    # group 1 = rewards [1, 3]: mean 2, std sqrt(((1)^2+(1)^2)/1) = sqrt(2) -> A = -+0.70711
    # group 2 = [5, 5] identical -> 0; group 3 = [7] singleton -> 0
    a = group_advantages(t([1, 5, 3, 5, 7]), [1, 2, 1, 2, 3])
    exp = 1 / (math.sqrt(2) + 1e-6)
    assert torch.allclose(a, t([-exp, 0, exp, 0, 0]), atol=1e-6)


def test_group_advantages_identical_floats_exactly_zero():
    # 0.1 is not exact in binary; mean-subtraction residue must not be blown up by 1/eps
    a = group_advantages(t([0.1, 0.1, 0.1]), ["g"] * 3)
    assert torch.equal(a, torch.zeros(3))


def test_group_advantages_dr_grpo():
    # norm_by_std=False: only subtract mean. [1,0,0,1] -> +-0.5; [2,4,9] mean 5 -> [-3,-1,4]
    a = group_advantages(t([1, 0, 0, 1, 2, 4, 9]), list("aaaabbb"), norm_by_std=False)
    assert torch.allclose(a, t([0.5, -0.5, -0.5, 0.5, -3, -1, 4]), atol=1e-6)


def test_group_advantages_eps_knob():
    # std of [0, 1] = sqrt(0.5) = 0.70711; eps=1 -> A = 0.5 / 1.70711 = 0.29289
    a = group_advantages(t([0, 1]), ["g", "g"], eps=1.0)
    assert torch.allclose(a, t([-0.5 / 1.7071068, 0.5 / 1.7071068]), atol=1e-6)


def test_dynamic_sampling_keep():
    # a: all correct -> drop; b: mixed -> keep; c: all wrong -> drop; d: singleton -> drop
    keep = dynamic_sampling_keep(t([1, 1, 0, 1, 0, 0, 1]), list("aabbccd"))
    assert keep.dtype == torch.bool
    assert keep.tolist() == [False, False, True, True, False, False, False]


# ---------------------------------------------------------------- KL

def test_kl_estimators_at_known_point():
    # lp = 0, lp_ref = ln 0.5 = -ln2
    lp, ref = t([0.0]), t([-LN2])
    assert kl_penalty(lp, ref, "k1").item() == pytest.approx(LN2, abs=1e-6)  # 0.693147
    assert kl_penalty(lp, ref, "k2").item() == pytest.approx(0.5 * LN2 ** 2, abs=1e-6)  # 0.240227
    # k3: x = -ln2, exp(x) = 0.5 -> 0.5 + ln2 - 1 = 0.193147
    assert kl_penalty(lp, ref, "k3").item() == pytest.approx(0.5 + LN2 - 1, abs=1e-6)
    assert kl_penalty(lp, ref, "low_var_kl").item() == pytest.approx(0.5 + LN2 - 1, abs=1e-6)
    assert kl_penalty(ref, ref, "k3").item() == 0.0


def test_k3_clamps():
    # x = lp_ref - lp = +30 -> clamp 20 -> e^20 - 21 huge -> clamp 10
    # x = -30 -> clamp -20 -> e^-20 + 19 = 19.000000002 -> clamp 10
    out = kl_penalty(t([0.0, 30.0]), t([30.0, 0.0]), "k3")
    assert out.tolist() == [10.0, 10.0]


def test_kl_unknown_raises():
    with pytest.raises(ValueError, match="k3"):
        kl_penalty(t([0.0]), t([0.0]), "k4")


# ---------------------------------------------------------------- aggregation

V = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
M = [[1, 1, 0], [1, 0, 0]]


@pytest.mark.parametrize(
    "mode,kw,expected",
    [
        ("token-mean", {}, (1 + 2 + 4) / 3),  # 7/3
        ("seq-mean-token-mean", {}, ((1 + 2) / 2 + 4 / 1) / 2),  # (1.5 + 4)/2 = 2.75
        ("seq-mean-token-sum", {}, ((1 + 2) + 4) / 2),  # 3.5
        ("seq-mean-token-sum-norm", {"max_len": 4}, 7 / (2 * 4)),  # 0.875
        ("seq-mean-token-sum-norm", {}, 7 / (2 * 3)),  # default max_len = T = 3
    ],
)
def test_aggregate_modes_2x3(mode, kw, expected):
    assert aggregate(t(V), t(M), mode, **kw).item() == pytest.approx(expected, abs=1e-6)


def test_aggregate_empty_sequence_and_nan_padding():
    # row 2 has no masked tokens and NaN/inf padding: it contributes 0 but still counts as a seq
    v = t([[1.0, 2.0, float("nan")], [float("inf"), float("nan"), 5.0]])
    m = t([[1, 1, 0], [0, 0, 0]])
    assert aggregate(v, m, "seq-mean-token-mean").item() == pytest.approx((1.5 + 0) / 2)
    assert aggregate(v, m, "token-mean").item() == pytest.approx(1.5)
    assert aggregate(v, torch.zeros(2, 3), "token-mean").item() == 0.0


def test_aggregate_explicit_normalisers():
    # num_tokens=10 -> 7/10; num_seqs=7 -> seq-mean-token-sum 7/7 = 1
    assert aggregate(t(V), t(M), "token-mean", num_tokens=10).item() == pytest.approx(0.7)
    assert aggregate(t(V), t(M), "seq-mean-token-sum", num_seqs=7).item() == pytest.approx(1.0)


def test_aggregate_unknown_raises():
    with pytest.raises(ValueError, match="token-mean"):
        aggregate(t(V), t(M), "mean")


def _batch():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(5, 6, generator=g)
    lengths = [6, 1, 3, 0, 4]  # uneven, incl. an empty sequence
    m = torch.zeros(5, 6)
    for i, n in enumerate(lengths):
        m[i, :n] = 1
    return v, m


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_microbatch_additivity(mode):
    v, m = _batch()
    full = aggregate(v, m, mode, max_len=8)
    n_tok, n_seq = m.sum(), m.shape[0]
    parts = [(0, 1), (1, 4), (4, 5)]  # unequal micro-batch sizes
    # second micro-batch also trimmed to its own max length (5 -> 3 columns), as a collator would
    total = 0.0
    for a, b in parts:
        vv, mm = v[a:b], m[a:b]
        width = max(int(mm.sum(-1).max()), 1)
        total = total + aggregate(vv[:, :width], mm[:, :width], mode,
                                  num_tokens=n_tok, num_seqs=n_seq, max_len=8)
    assert total.item() == pytest.approx(full.item(), abs=1e-6)


def test_local_normalisers_would_not_be_additive():
    # guards the test above: summing local token-means is NOT the global token-mean
    v, m = _batch()
    full = aggregate(v, m, "token-mean")
    naive = aggregate(v[:1], m[:1], "token-mean") + aggregate(v[1:], m[1:], "token-mean")
    assert abs(naive.item() - full.item()) > 1e-3


# ---------------------------------------------------------------- policy loss

def _five_tokens():
    # (A, rho): (+1, 2) upper clip; (+1, .5) unclipped; (-1, .5) lower clip;
    #           (-1, 2) unclipped; (-1, 10) dual clip
    adv = t([[1.0, 1.0, -1.0, -1.0, -1.0]])
    rho = [2.0, 0.5, 0.5, 2.0, 10.0]
    lp_old = t([[-1.0, -2.0, -0.5, -3.0, -4.0]])
    lp = (lp_old + t([[math.log(r) for r in rho]])).requires_grad_(True)
    return lp, lp_old, adv, torch.ones(1, 5)


def test_policy_loss_clip_branches_and_grads():
    lp, lp_old, adv, mask = _five_tokens()
    loss, stats = policy_loss(lp, lp_old, adv, mask)
    # per token, l = max(-A rho, -A clip(rho, 0.8, 1.28)), then min(l, -A*3) for A<0:
    # 1) max(-2, -1.28) = -1.28       2) max(-0.5, -0.8) = -0.5
    # 3) max(0.5, 0.8) = 0.8          4) max(2, 1.28) = 2, min(2, 3) = 2
    # 5) max(10, 1.28) = 10 -> min(10, 3) = 3
    expected = (-1.28 - 0.5 + 0.8 + 2 + 3) / 5  # 0.804
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    assert stats["clip/upper_fraction"] == pytest.approx(1 / 5)
    assert stats["clip/lower_fraction"] == pytest.approx(1 / 5)
    assert stats["clip/dual_fraction"] == pytest.approx(1 / 5)
    assert stats["ratio/mean"] == pytest.approx((2 + 0.5 + 0.5 + 2 + 10) / 5, abs=1e-5)  # 3.0
    assert all(isinstance(x, float) for x in stats.values())
    loss.backward()
    # unclipped tokens: d(-A exp(lp - lp_old))/dlp = -A rho, divided by 5 tokens;
    # clipped tokens (1, 3, 5) have no gradient
    assert torch.allclose(lp.grad, t([[0.0, -0.5 / 5, 0.0, 2.0 / 5, 0.0]]), atol=1e-6)


def test_policy_loss_dual_clip_disabled_and_symmetric_eps():
    lp, lp_old, adv, mask = _five_tokens()
    loss, stats = policy_loss(lp, lp_old, adv * 2, mask, dual_clip_c=None, eps_high=0.2)
    # A = [2,2,-2,-2,-2]: 1) max(-4, -2.4) = -2.4  2) max(-1, -1.6) = -1
    # 3) max(1, 1.6) = 1.6  4) max(4, 2.4) = 4  5) max(20, 2.4) = 20 (no cap)
    assert loss.item() == pytest.approx((-2.4 - 1 + 1.6 + 4 + 20) / 5, abs=1e-5)  # 4.44
    assert stats["clip/dual_fraction"] == 0.0


def test_policy_loss_ratio_clamp_no_overflow():
    # lp - lp_old = 100 -> clamped to 20; A>0 -> clipped at -1.28 with zero grad
    lp = t([[100.0]]).requires_grad_(True)
    loss, stats = policy_loss(lp, t([[0.0]]), t([[1.0]]), torch.ones(1, 1))
    assert loss.item() == pytest.approx(-1.28)
    assert stats["ratio/mean"] == pytest.approx(math.exp(20), rel=1e-5)
    loss.backward()
    assert lp.grad.item() == 0.0


def test_masked_tokens_get_zero_grad_even_with_inf_padding():
    lp = t([[-1.0, -float("inf"), 5.0], [-0.5, -2.0, float("nan")]]).requires_grad_(True)
    lp_old = t([[-1.0, -float("inf"), -30.0], [-0.5, -2.0, 0.0]])
    adv = t([[1.0, 1.0, float("nan")], [-1.0, -1.0, -1.0]])
    mask = t([[1, 0, 0], [1, 1, 0]])
    loss, stats = policy_loss(lp, lp_old, adv, mask)
    # rho = 1 on the 3 masked-in tokens: losses [-1, 1, 1] -> mean 1/3
    assert loss.item() == pytest.approx(1 / 3, abs=1e-6)
    assert stats["ratio/mean"] == pytest.approx(1.0)
    loss.backward()
    assert torch.isfinite(lp.grad).all()
    # grad = -A rho / 3 on masked-in tokens, exactly 0 elsewhere
    assert torch.allclose(lp.grad, t([[-1 / 3, 0, 0], [1 / 3, 1 / 3, 0]]), atol=1e-6)


def test_policy_loss_microbatch_grads_match_full_batch():
    g = torch.Generator().manual_seed(1)
    lp_old = -torch.rand(4, 5, generator=g) * 3
    lp_full = (lp_old + 0.3 * torch.randn(4, 5, generator=g)).requires_grad_(True)
    adv = torch.randn(4, 1, generator=g).expand(4, 5)
    mask = torch.zeros(4, 5)
    for i, n in enumerate([5, 2, 4, 1]):
        mask[i, :n] = 1
    for mode in AGG_MODES:
        lp_full.grad = None
        full, _ = policy_loss(lp_full, lp_old, adv, mask, agg=mode, max_len=5)
        full.backward()
        g_full = lp_full.grad.clone()
        lp_full.grad = None
        total = 0.0
        for a, b in [(0, 1), (1, 4)]:
            part, _ = policy_loss(lp_full[a:b], lp_old[a:b], adv[a:b], mask[a:b], agg=mode,
                                  num_tokens=mask.sum(), num_seqs=4, max_len=5)
            part.backward()
            total += part.item()
        assert total == pytest.approx(full.item(), abs=1e-6), mode
        assert torch.allclose(lp_full.grad, g_full, atol=1e-7), mode


# ---------------------------------------------------------------- grpo_loss

def _two_tokens():
    # rho = 1, A = [+1, -1] -> pg losses [-1, +1], token-mean 0; lp_ref = [ln .5, 0]
    lp = t([[0.0, 0.0]]).requires_grad_(True)
    return lp, t([[0.0, 0.0]]), t([[1.0, -1.0]]), torch.ones(1, 2), t([[-LN2, 0.0]])


def test_grpo_loss_k1():
    lp, lp_old, adv, mask, ref = _two_tokens()
    loss, stats = grpo_loss(lp, lp_old, adv, mask, lp_ref=ref,
                            cfg=GRPOConfig(kl_beta=0.1, kl_estimator="k1"))
    # k1 = [ln2, 0], mean = 0.346574; loss = 0 + 0.1 * 0.346574
    assert stats["pg_loss"] == pytest.approx(0.0, abs=1e-7)
    assert stats["kl"] == pytest.approx(LN2 / 2, abs=1e-6)
    assert loss.item() == pytest.approx(0.1 * LN2 / 2, abs=1e-6)


def test_grpo_loss_default_k3_and_grad():
    lp, lp_old, adv, mask, ref = _two_tokens()
    loss, stats = grpo_loss(lp, lp_old, adv, mask, lp_ref=ref, cfg=GRPOConfig(kl_beta=0.1))
    k3 = 0.5 + LN2 - 1  # 0.193147 on token 1, 0 on token 2
    assert stats["kl"] == pytest.approx(k3 / 2, abs=1e-6)
    assert loss.item() == pytest.approx(0.1 * k3 / 2, abs=1e-6)
    loss.backward()
    # pg grad: -A rho / 2 = [-0.5, +0.5]; k3 grad d/dlp (e^x - x - 1), x = ref - lp:
    # 1 - e^x = [0.5, 0], scaled by beta/2 = 0.05 -> [0.025, 0]
    assert torch.allclose(lp.grad, t([[-0.5 + 0.025, 0.5]]), atol=1e-6)


def test_grpo_loss_kl_skipped():
    lp, lp_old, adv, mask, ref = _two_tokens()
    for cfg, r in [(GRPOConfig(kl_beta=0.0), ref), (GRPOConfig(), None)]:
        loss, stats = grpo_loss(lp, lp_old, adv, mask, lp_ref=r, cfg=cfg)
        assert loss.item() == pytest.approx(0.0, abs=1e-7)
        assert stats["kl"] == 0.0


def test_grpo_loss_uses_cfg_agg_and_max_len():
    lp, lp_old, adv, mask, _ = _two_tokens()
    adv = t([[1.0, 1.0]])  # pg losses [-1, -1], sum -2
    cfg = GRPOConfig(agg="seq-mean-token-sum-norm", max_response_len=8)
    loss, _ = grpo_loss(lp, lp_old, adv, mask, cfg=cfg)
    assert loss.item() == pytest.approx(-2 / (1 * 8))


# ---------------------------------------------------------------- config

def test_config_defaults():
    c = GRPOConfig()
    assert (c.norm_by_std, c.eps, c.eps_low, c.eps_high, c.dual_clip_c) == (True, 1e-6, 0.2, 0.28, 3.0)
    assert (c.kl_beta, c.kl_estimator, c.agg) == (0.001, "k3", "token-mean")
    assert c.max_response_len is None and c.dynamic_sampling is False
    assert GRPOConfig(dual_clip_c=None).dual_clip_c is None


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"agg": "mean"}, "seq-mean-token-sum-norm"),
        ({"kl_estimator": "k4"}, "low_var_kl"),
        ({"dual_clip_c": 0.5}, "dual_clip_c"),
    ],
)
def test_config_invalid_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        GRPOConfig(**kw)


# ---------------------------------------------------------------- entropy

def test_entropy_from_logits():
    logits = t([
        [0.0, 0.0, 0.0, 0.0],  # uniform over 4: ln 4 = 1.386294
        [math.log(3.0), 0.0, -float("inf"), -float("inf")],  # p = [.75, .25]: 0.562335
        [1000.0, 1000.0, -1000.0, -1000.0],  # stable: ln 2 = 0.693147
    ]).requires_grad_(True)
    h = entropy_from_logits(logits)
    expected = [math.log(4), 0.75 * math.log(4 / 3) + 0.25 * math.log(4), LN2]
    assert torch.allclose(h, t(expected), atol=1e-5)
    h.sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert entropy_from_logits(torch.zeros(2, 3, 5)).shape == (2, 3)
