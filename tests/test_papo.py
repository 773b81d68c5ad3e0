"""Tests for mmagent_rl.algos.papo: raw-pixel masking, loss terms by hand, hacking alarm."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from mmagent_rl.algos.grpo import AGG_MODES, GRPOConfig
from mmagent_rl.algos.papo import (
    HackingAlarm,
    PAPOConfig,
    mask_image,
    masked_images_for,
    papo_loss,
    patch_mask,
    perception_kl,
)

torch.set_num_threads(1)
LN2 = math.log(2.0)
K3_NEG = 0.5 + LN2 - 1  # x = -ln2: exp(x) - x - 1 = 0.193147
K3_POS = 2.0 - LN2 - 1  # x = +ln2: 0.306853


def t(x, **kw):
    return torch.tensor(x, dtype=torch.float32, **kw)


def noisy_image(w, h, mode="RGB", seed=0):
    """Random image with no zero-valued pixel, so any black pixel was masked."""
    rng = np.random.default_rng(seed)
    ch = {"RGB": 3, "RGBA": 4, "L": None}[mode]
    shape = (h, w) if ch is None else (h, w, ch)
    return Image.fromarray(rng.integers(1, 256, size=shape, dtype=np.uint8), mode=mode)


# ---------------------------------------------------------------- config

def test_config_defaults_and_validation():
    c = PAPOConfig()
    assert (c.gamma, c.eta_ori, c.eta_aug, c.mask_prob, c.patch_size, c.kl_clip) == \
        (0.01, 0.03, 0.03, 0.6, 14, None)
    assert c.double_entropy_grad and not c.mask_tool_images
    for bad in (dict(gamma=-1), dict(mask_prob=1.5), dict(patch_size=0), dict(kl_clip=0.0),
                dict(eta_aug=-0.1), dict(gamma_final=0.0), dict(gamma_anneal_steps=10),
                dict(gamma_anneal_steps=-1), dict(alarm_window=1), dict(alarm_kl_jump=0.5)):
        with pytest.raises(ValueError):
            PAPOConfig(**bad)


def test_gamma_annealing():
    c = PAPOConfig(gamma=0.01, gamma_final=0.0, gamma_anneal_steps=100)
    assert c.gamma_at(-5) == pytest.approx(0.01)
    assert c.gamma_at(0) == pytest.approx(0.01)
    assert c.gamma_at(50) == pytest.approx(0.005)
    assert c.gamma_at(100) == pytest.approx(0.0)
    assert c.gamma_at(1000) == pytest.approx(0.0)
    up = PAPOConfig(gamma=0.01, gamma_final=0.03, gamma_anneal_steps=10)
    assert up.gamma_at(5) == pytest.approx(0.02)
    assert PAPOConfig(gamma=0.02).gamma_at(12345) == 0.02  # no annealing


# ---------------------------------------------------------------- masking

def test_masked_fraction_binomial():
    p = 0.6
    for seed in range(3):
        g = patch_mask(1400, 1400, 14, p, seed)  # 100 x 100 = 10000 patches
        assert g.shape == (100, 100) and g.dtype == bool
        n = g.size
        assert abs(g.sum() - n * p) < 4 * math.sqrt(n * p * (1 - p))


def test_patch_mask_shape_ceil_and_seeding():
    assert patch_mask(45, 31, 14, 0.5, 0).shape == (3, 4)  # ceil(31/14), ceil(45/14)
    a, b = patch_mask(700, 700, 14, 0.6, 7), patch_mask(700, 700, 14, 0.6, 7)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, patch_mask(700, 700, 14, 0.6, 8))
    assert not patch_mask(700, 700, 14, 0.0, 1).any()
    assert patch_mask(700, 700, 14, 1.0, 1).all()


def test_mask_image_aligns_to_raw_pixels_with_partial_edges():
    w, h, ps = 45, 31, 14  # last patch column is 3 px wide, last row 3 px high
    img = noisy_image(w, h)
    orig = np.array(img)
    seen_partial = set()
    for seed in range(10):
        out = np.array(mask_image(img, 0.5, seed, patch_size=ps))
        grid = patch_mask(w, h, ps, 0.5, seed)
        assert out.shape == orig.shape
        for r in range(grid.shape[0]):
            for c in range(grid.shape[1]):
                sl = np.s_[r * ps:(r + 1) * ps, c * ps:(c + 1) * ps]
                if grid[r, c]:
                    assert (out[sl] == 0).all()
                else:
                    assert np.array_equal(out[sl], orig[sl])
                if r == grid.shape[0] - 1 or c == grid.shape[1] - 1:
                    seen_partial.add(bool(grid[r, c]))
        # every pixel is either black (in a masked patch) or untouched
        assert ((out == 0).all(-1) | (out == orig).all(-1)).all()
    assert seen_partial == {True, False}  # partial edge patches both masked and kept
    assert np.array_equal(np.array(img), orig)  # input untouched


def test_mask_image_prob_0_and_1_and_modes():
    img = noisy_image(30, 20)
    assert np.array_equal(np.array(mask_image(img, 0.0, 3)), np.array(img))
    assert (np.array(mask_image(img, 1.0, 3)) == 0).all()
    gray = noisy_image(30, 20, "L")
    out = mask_image(gray, 1.0, 0)
    assert out.mode == "L" and (np.array(out) == 0).all()
    rgba = noisy_image(30, 20, "RGBA")
    out = np.array(mask_image(rgba, 1.0, 0))
    assert (out[..., :3] == 0).all() and np.array_equal(out[..., 3], np.array(rgba)[..., 3])
    a, b = mask_image(img, 0.6, 5, 7), mask_image(img, 0.6, 5, 7)
    assert np.array_equal(np.array(a), np.array(b))


def test_masked_images_for_original_only_and_tool_crops():
    imgs = [noisy_image(56, 56, seed=i) for i in range(3)]
    cfg = PAPOConfig(mask_prob=0.5)
    out = masked_images_for(imgs, 1, cfg, seed=11)
    assert len(out) == 3 and out[1] is imgs[1] and out[2] is imgs[2]
    assert not np.array_equal(np.array(out[0]), np.array(imgs[0]))
    again = masked_images_for(imgs, 1, cfg, seed=11)
    assert np.array_equal(np.array(again[0]), np.array(out[0]))
    other = masked_images_for(imgs, 1, cfg, seed=12)
    assert not np.array_equal(np.array(other[0]), np.array(out[0]))

    allm = masked_images_for(imgs, 1, PAPOConfig(mask_prob=0.5, mask_tool_images=True), seed=11)
    assert np.array_equal(np.array(allm[0]), np.array(out[0]))  # same per-index seed
    blacks = [(np.array(x) == 0).all(-1) for x in allm]
    assert all(b.any() for b in blacks)
    assert not np.array_equal(blacks[0], blacks[1])  # per-index seeds differ
    with pytest.raises(ValueError):
        masked_images_for(imgs, 4, cfg, seed=0)


# ---------------------------------------------------------------- perception KL

def test_perception_kl_values_and_clip():
    lp, lpm = t([math.log(0.5), math.log(0.25)]), t([math.log(0.25), math.log(0.5)])
    assert torch.allclose(perception_kl(lp, lpm), t([K3_NEG, K3_POS]), atol=1e-6)
    assert torch.allclose(perception_kl(lp, lpm, 0.2), t([K3_NEG, 0.2]), atol=1e-6)
    # clamped like grpo's k3: x = 30 -> clamp(x)=20 -> exp(20)-21 -> 10
    assert perception_kl(t([-40.0]), t([-10.0])).item() == pytest.approx(10.0)


# ---------------------------------------------------------------- loss

LP = [[math.log(0.5), math.log(0.25), float("nan")]]
LPM = [[math.log(0.25), math.log(0.5), 0.0]]
MASK = [[1, 1, 0]]


def test_papo_loss_value_and_stats_by_hand():
    lp = t(LP, requires_grad=True)
    lp_old = t(LP).nan_to_num(0.0)
    theta = t([[math.log(0.5), math.log(0.5), 0.0]], requires_grad=True)
    gcfg = GRPOConfig(kl_beta=0.0)
    loss, s = papo_loss(lp, lp_old, t([[1.0, 1.0, 0.0]]), t(MASK), lp_mask=t(LPM),
                        lp_mask_theta=theta, grpo_cfg=gcfg, cfg=PAPOConfig(kl_clip=0.2), step=0)
    # pg: ratio 1, -A = -1 per token -> -1. KL clipped: (0.193147 + 0.2)/2 = 0.1965736
    # entropy_ori = (ln2 + 2 ln2)/2 = 1.5 ln2; entropy_aug = ln2
    exp = -1 - 0.01 * (K3_NEG + 0.2) / 2 + 0.03 * 1.5 * LN2 + 0.03 * LN2
    assert exp == pytest.approx(-0.9499796, abs=1e-6)
    assert loss.item() == pytest.approx(exp, abs=1e-6)
    assert s["papo/kl_prcp"] == pytest.approx((K3_NEG + K3_POS) / 2, abs=1e-6)  # 0.25 unclipped
    assert s["papo/kl_prcp_clipped"] == pytest.approx((K3_NEG + 0.2) / 2, abs=1e-6)
    assert s["papo/kl_clip_fraction"] == pytest.approx(0.5)
    assert s["papo/entropy_ori"] == pytest.approx(1.5 * LN2, abs=1e-6)
    assert s["papo/entropy_aug"] == pytest.approx(LN2, abs=1e-6)
    assert s["papo/gamma"] == 0.01 and s["loss"] == pytest.approx(exp, abs=1e-6)
    for k in ("clip/upper_fraction", "clip/lower_fraction", "pg_loss", "kl", "ratio/mean"):
        assert k in s
    loss.backward()
    assert torch.isfinite(lp.grad).all() and lp.grad[0, 2] == 0  # NaN padding is inert


def test_perception_kl_is_maximised_gradient_sign():
    """Only the KL term (adv 0, eta 0): loss = -gamma * mean(k3)."""
    gamma = 0.01
    lp = t(LP, requires_grad=True)
    cfg = PAPOConfig(gamma=gamma, eta_ori=0.0, eta_aug=0.0, kl_clip=None)
    loss, _ = papo_loss(lp, t(LP).nan_to_num(0.0), torch.zeros(1, 3), t(MASK), lp_mask=t(LPM),
                        grpo_cfg=GRPOConfig(kl_beta=0.0), cfg=cfg, step=0)
    assert loss.item() == pytest.approx(-gamma * 0.25, abs=1e-7)
    loss.backward()
    # d k3/d lp = 1 - exp(x), x = lp_mask - lp; d loss/d lp = -gamma/2 * (1 - exp(x))
    # token 0: lp > lp_mask (x=-ln2) -> -0.01/2*0.5 = -0.0025 < 0: descent raises lp further
    # token 1: lp < lp_mask (x=+ln2) -> -0.01/2*(-1) = +0.005 > 0: descent lowers lp further
    assert lp.grad[0, 0].item() == pytest.approx(-0.0025, abs=1e-7)
    assert lp.grad[0, 1].item() == pytest.approx(0.005, abs=1e-7)

    lp2 = t(LP, requires_grad=True)  # with the 0.2 clip token 1 (KL 0.307) gets no gradient
    loss2, _ = papo_loss(lp2, t(LP).nan_to_num(0.0), torch.zeros(1, 3), t(MASK), lp_mask=t(LPM),
                         grpo_cfg=GRPOConfig(kl_beta=0.0),
                         cfg=PAPOConfig(eta_ori=0.0, eta_aug=0.0, kl_clip=0.2), step=0)
    loss2.backward()
    assert lp2.grad[0, 0].item() == pytest.approx(-0.0025, abs=1e-7)
    assert lp2.grad[0, 1].item() == 0.0


def test_gamma_annealing_enters_loss():
    cfg = PAPOConfig(gamma=0.02, gamma_final=0.0, gamma_anneal_steps=10, eta_ori=0, eta_aug=0,
                     kl_clip=None)
    kw = dict(lp_mask=t(LPM), grpo_cfg=GRPOConfig(kl_beta=0.0), cfg=cfg)
    lp0 = t(LP).nan_to_num(0.0)
    for step, g in ((0, 0.02), (5, 0.01), (10, 0.0), (20, 0.0)):
        loss, s = papo_loss(t(LP), lp0, torch.zeros(1, 3), t(MASK), step=step, **kw)
        assert s["papo/gamma"] == pytest.approx(g)
        assert loss.item() == pytest.approx(-g * 0.25, abs=1e-7)


@pytest.mark.parametrize("double", [True, False])
def test_double_entropy_grad(double):
    lp = t(LP, requires_grad=True)
    lpm = t(LPM, requires_grad=True)  # caller's no_grad tensor; must be treated as constant
    theta = t([[math.log(0.5), math.log(0.5), 0.0]], requires_grad=True)
    cfg = PAPOConfig(gamma=0.0, eta_ori=0.0, eta_aug=0.03, double_entropy_grad=double)
    loss, s = papo_loss(lp, t(LP).nan_to_num(0.0), torch.zeros(1, 3), t(MASK), lp_mask=lpm,
                        lp_mask_theta=theta, grpo_cfg=GRPOConfig(kl_beta=0.0), cfg=cfg, step=0)
    loss.backward()
    assert lpm.grad is None
    if double:
        # 0.03 * mean(-theta) = 0.03 ln2; d/d theta = -0.03/2 on generated tokens
        assert loss.item() == pytest.approx(0.03 * LN2, abs=1e-7)
        assert torch.allclose(theta.grad, t([[-0.015, -0.015, 0.0]]))
        assert s["papo/entropy_aug"] == pytest.approx(LN2, abs=1e-6)
    else:
        # public default: detached lp_mask, mean(-lp_mask) = 1.5 ln2, a constant
        assert theta.grad is None
        assert loss.item() == pytest.approx(0.03 * 1.5 * LN2, abs=1e-7)
        assert s["papo/entropy_aug"] == pytest.approx(1.5 * LN2, abs=1e-6)
    assert lp.grad is None or (lp.grad == 0).all()


def test_double_entropy_grad_requires_theta():
    with pytest.raises(ValueError):
        papo_loss(t(LP), t(LP), torch.zeros(1, 3), t(MASK), lp_mask=t(LPM),
                  grpo_cfg=GRPOConfig(), cfg=PAPOConfig(), step=0)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_additive_over_micro_batches(agg):
    g = torch.Generator().manual_seed(0)
    B, T = 4, 6
    lp_old = -torch.rand(B, T, generator=g) * 2
    lp_data = lp_old + 0.3 * torch.randn(B, T, generator=g)
    lp_mask = lp_old + 0.8 * torch.randn(B, T, generator=g)  # some tokens above kl_clip
    lp_ref = lp_old + 0.1 * torch.randn(B, T, generator=g)
    theta_data = lp_mask + 0.1 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, 1, generator=g).expand(B, T).contiguous()
    mask = (torch.rand(B, T, generator=g) > 0.3).float()
    mask[:, 0] = 1
    gcfg = GRPOConfig(agg=agg, kl_beta=0.01)
    cfg = PAPOConfig(gamma=0.05, gamma_final=0.01, gamma_anneal_steps=4)
    nt, ns = mask.sum(), B

    def run(rows, lp, theta, **kw):
        return papo_loss(lp[rows], lp_old[rows], adv[rows], mask[rows], lp_mask=lp_mask[rows],
                         lp_mask_theta=theta[rows], lp_ref=lp_ref[rows], grpo_cfg=gcfg, cfg=cfg,
                         step=2, **kw)[0]

    lp_a, th_a = lp_data.clone().requires_grad_(), theta_data.clone().requires_grad_()
    full = run(slice(0, B), lp_a, th_a)
    full.backward()
    lp_b, th_b = lp_data.clone().requires_grad_(), theta_data.clone().requires_grad_()
    parts = [run(r, lp_b, th_b, num_tokens=nt, num_seqs=ns) for r in (slice(0, 2), slice(2, B))]
    total = parts[0] + parts[1]
    total.backward()
    assert total.item() == pytest.approx(full.item(), abs=1e-6)
    assert torch.allclose(lp_a.grad, lp_b.grad, atol=1e-7)
    assert torch.allclose(th_a.grad, th_b.grad, atol=1e-7)


# ---------------------------------------------------------------- hacking alarm

def test_hacking_alarm_fires_on_jump_with_rising_entropies():
    a = HackingAlarm(window=3, kl_jump=2.0)
    assert not a.update(0.1, 1.0, 1.0)  # no history
    assert not a.update(0.1, 1.0, 1.0)  # only 1 previous value
    assert a.update(0.5, 1.2, 1.3)  # 0.5 > 2 * 0.1, both entropies above 1.0


@pytest.mark.parametrize("cur", [
    (0.5, 1.2, 0.9),  # masked entropy fell
    (0.5, 0.9, 1.2),  # original entropy fell
    (0.5, 1.0, 1.0),  # entropies flat (strict rise needed)
    (0.2, 1.5, 1.5),  # KL exactly 2x: not a jump
    (0.15, 1.5, 1.5),  # entropies rise, KL only mildly
])
def test_hacking_alarm_silent_otherwise(cur):
    a = HackingAlarm(window=3, kl_jump=2.0)
    a.update(0.1, 1.0, 1.0)
    a.update(0.1, 1.0, 1.0)
    assert not a.update(*cur)


def test_hacking_alarm_only_previous_window_counts_and_is_deterministic():
    series = [(10.0, 1.0, 1.0), (10.0, 1.0, 1.0), (1.0, 1.0, 1.0), (1.0, 1.0, 1.0),
              (3.0, 1.1, 1.1), (float("nan"), 5.0, 5.0), (3.0, 2.0, 2.0)]
    outs = []
    for _ in range(2):
        a = HackingAlarm(window=2, kl_jump=2.0)
        outs.append([a.update(*x) for x in series])
    assert outs[0] == outs[1]
    # step 4: window [1, 1] -> 3 > 2 fires (mean of all history, 5.5, would not);
    # NaN is ignored and unrecorded; last: window [1, 3] mean 2 -> 3 < 4, silent
    assert outs[0] == [False, False, False, False, True, False, False]
    with pytest.raises(ValueError):
        HackingAlarm(window=1)
