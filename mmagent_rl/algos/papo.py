"""PAPO: GRPO plus an implicit perception loss (docs/algorithms.md, "PAPO").

Loss, all terms aggregated with the GRPO ``agg`` (so it is additive over micro-batches):
  L = L_grpo(pg + beta_ref*KL_ref) - gamma_at(step)*agg(KL_prcp)
      + eta_ori*agg(-lp) + eta_aug*agg(-lp_aug)
KL_prcp = k3(lp, lp_mask) is *maximised*: the policy should depend on the image. The
``-lp`` terms (sampled-token NLL, an entropy estimate) are the Double Entropy Loss that
keeps both entropies from rising while KL_prcp is pushed up ("KL hacking").
Masking happens on the raw pixels before any processor; the size is unchanged, so the
trajectory's expanded ``<|image_pad|>`` runs stay valid for the masked forward.
"""
from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from mmagent_rl.algos.grpo import (GRPO, GRPOConfig, _masked_mean, aggregate, grpo_loss,
                                   kl_penalty)
from mmagent_rl.algos.registry import LossInputs, register

log = logging.getLogger(__name__)


@dataclass
class PAPOConfig:
    gamma: float = 0.01  # perception-KL weight (0.02 with GRPO on 3B; 0.04 collapsed)
    gamma_final: float | None = None  # linear annealing gamma -> gamma_final ...
    gamma_anneal_steps: int = 0  # ... over this many steps (both set, or neither)
    eta_ori: float = 0.03  # entropy term on the original input
    eta_aug: float = 0.03  # entropy term on the masked input
    mask_prob: float = 0.6  # per-patch Bernoulli probability of blacking out
    patch_size: int = 14  # raw-pixel patch side
    mask_tool_images: bool = False  # also mask tool crops (default: original image(s) only)
    # Optional cap: per-token KL_prcp (after k3's [-10, 10] clamp) clamped to [0, kl_clip]
    # before aggregation; tokens above it get no gradient. None (the authors' released
    # configs: their cap exists but is off) = only k3's clamp. With a cap of 0.2 on the
    # testbed, the 3-5% of tokens above it carried ~95% of the raw KL.
    kl_clip: float | None = None
    # True: eta_aug term uses lp_mask_theta (second forward with grad on the masked input).
    # False: public default, the term uses the detached lp_mask (a constant; no gradient).
    double_entropy_grad: bool = True
    alarm_window: int = 5
    alarm_kl_jump: float = 2.0

    def __post_init__(self):
        if self.gamma < 0 or (self.gamma_final is not None and self.gamma_final < 0):
            raise ValueError(f"gamma and gamma_final must be >= 0, got {self.gamma}, {self.gamma_final}")
        if self.gamma_anneal_steps < 0:
            raise ValueError(f"gamma_anneal_steps must be >= 0, got {self.gamma_anneal_steps}")
        if (self.gamma_final is None) != (self.gamma_anneal_steps == 0):
            raise ValueError("set gamma_final and gamma_anneal_steps > 0 together (or neither); got "
                             f"{self.gamma_final}, {self.gamma_anneal_steps}")
        if self.eta_ori < 0 or self.eta_aug < 0:
            raise ValueError(f"eta_ori and eta_aug must be >= 0, got {self.eta_ori}, {self.eta_aug}")
        if not 0.0 <= self.mask_prob <= 1.0:
            raise ValueError(f"mask_prob must be in [0, 1], got {self.mask_prob}")
        if int(self.patch_size) != self.patch_size or self.patch_size < 1:
            raise ValueError(f"patch_size must be a positive int, got {self.patch_size}")
        if self.kl_clip is not None and self.kl_clip <= 0:
            raise ValueError(f"kl_clip must be > 0 (or None), got {self.kl_clip}")
        if self.alarm_window < 2 or self.alarm_kl_jump < 1.0:
            raise ValueError(f"need alarm_window >= 2 and alarm_kl_jump >= 1, got "
                             f"{self.alarm_window}, {self.alarm_kl_jump}")

    def gamma_at(self, step: int) -> float:
        """Linear from gamma (step 0) to gamma_final (step >= gamma_anneal_steps)."""
        if self.gamma_final is None or self.gamma_anneal_steps == 0:
            return self.gamma
        frac = min(max(step, 0) / self.gamma_anneal_steps, 1.0)
        return self.gamma + (self.gamma_final - self.gamma) * frac


# ---------------------------------------------------------------- masking

def patch_mask(width: int, height: int, patch_size: int, prob: float, seed: int) -> np.ndarray:
    """Bool [ceil(h/ps), ceil(w/ps)]; True = masked, i.i.d. Bernoulli(prob), seeded."""
    rows, cols = math.ceil(height / patch_size), math.ceil(width / patch_size)
    # uniform in [0, 1): prob 0 never masks, prob 1 always does
    return np.random.default_rng(seed).random((rows, cols)) < prob


def mask_image(img: Image.Image, prob: float, seed: int, patch_size: int = 14) -> Image.Image:
    """New image with each masked patch (grid anchored at pixel (0, 0)) set to black.

    The last row/column of patches may be partial. RGBA/LA keep their alpha (only the
    colour goes black); modes without a plain "0 = black" (P, CMYK, ...) become RGB first.
    """
    if img.mode not in ("RGB", "RGBA", "L", "LA", "I", "F"):
        img = img.convert("RGB")
    w, h = img.size
    grid = patch_mask(w, h, patch_size, prob, seed)
    pix = np.repeat(np.repeat(grid, patch_size, axis=0), patch_size, axis=1)[:h, :w]
    arr = np.array(img)  # a copy: the input image is never modified
    if img.mode in ("RGBA", "LA"):
        arr[..., :-1][pix] = 0
    else:
        arr[pix] = 0
    out = Image.fromarray(arr)  # mode inferred from dtype/shape (the `mode=` arg is deprecated)
    assert out.mode == img.mode, (out.mode, img.mode)
    return out


def _image_seed(seed: int, index: int) -> int:
    # SeedSequence mixes (seed, index) well: nearby seeds/indices give unrelated masks
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def masked_images_for(traj_images: list, n_original: int, cfg: PAPOConfig, seed: int) -> list:
    """Masked copies of the first ``n_original`` images (and of tool crops iff
    ``cfg.mask_tool_images``); others are passed through unchanged. Seed per (seed, index)."""
    if not 0 <= n_original <= len(traj_images):
        raise ValueError(f"n_original={n_original} out of range for {len(traj_images)} images")
    out = []
    for i, img in enumerate(traj_images):
        if i < n_original or cfg.mask_tool_images:
            img = mask_image(img, cfg.mask_prob, _image_seed(seed, i), cfg.patch_size)
        out.append(img)
    return out


# ---------------------------------------------------------------- loss

def perception_kl(lp: Tensor, lp_mask: Tensor, kl_clip: float | None = None) -> Tensor:
    """Per-token k3 with x = lp_mask - lp: exp(x) - x - 1, clamped to [-10, 10];
    then clamped to [0, kl_clip] if kl_clip is given (zero gradient above it)."""
    kl = kl_penalty(lp, lp_mask, "k3")  # grpo's k3: x = clamp(lp_mask - lp, +-20)
    if kl_clip is not None:
        kl = torch.clamp(kl, 0.0, kl_clip)
    return kl


def papo_loss(
    lp: Tensor,
    lp_old: Tensor,
    adv: Tensor,
    mask: Tensor,
    *,
    lp_mask: Tensor,
    lp_mask_theta: Tensor | None = None,
    lp_ref: Tensor | None = None,
    grpo_cfg: GRPOConfig,
    cfg: PAPOConfig,
    step: int,
    num_tokens=None,
    num_seqs=None,
) -> tuple[Tensor, dict[str, float]]:
    """GRPO loss plus the PAPO terms; inputs [B, T].

    ``lp_mask``: old policy on the masked input, no_grad; detached here in any case.
    ``lp_mask_theta``: current policy on the masked input, with grad; required when
    ``cfg.double_entropy_grad`` and eta_aug > 0, ignored otherwise (public default: the
    masked entropy term uses lp_mask and carries no gradient).
    Stats ``papo/kl_prcp`` is the masked mean of the *unclipped* per-token KL (what the
    hacking alarm should watch); ``papo/kl_prcp_clipped`` is the optimised value.
    """
    loss, stats = grpo_loss(lp, lp_old, adv, mask, lp_ref=lp_ref, cfg=grpo_cfg,
                            num_tokens=num_tokens, num_seqs=num_seqs)
    m = mask.bool()
    zero = torch.zeros((), dtype=torch.float32, device=lp.device)
    # sanitize padding (may hold inf/NaN) before exp, as grpo does
    lp_f = torch.where(m, lp.float(), zero)
    lpm_f = torch.where(m, lp_mask.detach().float(), zero)
    if cfg.double_entropy_grad:
        if lp_mask_theta is None:
            if cfg.eta_aug > 0:
                raise ValueError("double_entropy_grad needs lp_mask_theta (forward on the "
                                 "masked input with grad)")
            aug = lpm_f
        else:
            aug = torch.where(m, lp_mask_theta.float(), zero)
    else:
        aug = lpm_f

    def agg(v: Tensor) -> Tensor:
        return aggregate(v, m, grpo_cfg.agg, num_tokens=num_tokens, num_seqs=num_seqs,
                         max_len=grpo_cfg.max_response_len)

    gamma = cfg.gamma_at(step)
    kl_t = perception_kl(lp_f, lpm_f, cfg.kl_clip)
    loss = loss - gamma * agg(kl_t) + cfg.eta_ori * agg(-lp_f) + cfg.eta_aug * agg(-aug)
    with torch.no_grad():
        raw = perception_kl(lp_f, lpm_f, None)
        stats.update({
            "papo/kl_prcp": _masked_mean(raw, m),
            "papo/kl_prcp_clipped": _masked_mean(kl_t.detach(), m),
            "papo/kl_clip_fraction": (_masked_mean((raw > cfg.kl_clip).float(), m)
                                      if cfg.kl_clip is not None else 0.0),
            "papo/entropy_ori": _masked_mean(-lp_f.detach(), m),
            "papo/entropy_aug": _masked_mean(-aug.detach(), m),
            "papo/gamma": gamma,
            "loss": float(loss.detach()),
        })
    return loss, stats


# ---------------------------------------------------------------- KL-hacking alarm

class HackingAlarm:
    """Flags the PAPO collapse signature: KL_prcp jumps while both entropies rise.

    ``update`` fires when kl > kl_jump * mean(previous `window` kl values) (at least 2
    previous values) and entropy_ori, entropy_aug both exceed their previous-window means.
    Non-finite inputs return False and are not recorded.
    """

    def __init__(self, window: int = 5, kl_jump: float = 2.0):
        if window < 2 or kl_jump < 1.0:
            raise ValueError(f"need window >= 2 and kl_jump >= 1, got {window}, {kl_jump}")
        self.window, self.kl_jump = window, kl_jump
        self._hist: deque[tuple[float, float, float]] = deque(maxlen=window)

    def update(self, kl_prcp: float, entropy_ori: float, entropy_aug: float) -> bool:
        cur = (float(kl_prcp), float(entropy_ori), float(entropy_aug))
        if not all(math.isfinite(v) for v in cur):
            return False
        fired = False
        if len(self._hist) >= 2:
            kl_m, eo_m, ea_m = (sum(col) / len(self._hist) for col in zip(*self._hist))
            fired = cur[0] > self.kl_jump * kl_m and cur[1] > eo_m and cur[2] > ea_m
        self._hist.append(cur)
        return fired


def papo_seed(step: int, t) -> int:
    """Mask seed of one trajectory at one step: fixed across ranks and re-runs."""
    import zlib

    return zlib.crc32(f"{step}/{t.prompt_id}/{t.sample_idx}".encode())


@register
class PAPO(GRPO):
    """GRPO plus the perception and double-entropy terms: the loss needs the policy's
    log-probs on patch-masked images (an extra forward), and the driver watches for
    KL hacking."""
    name = "papo"
    config = PAPOConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        p = cfg.papo
        self.alarm = HackingAlarm(p.alarm_window, p.alarm_kl_jump)

    def loss(self, x: LossInputs):
        p = self.cfg.papo
        # The same tokens given patch-masked images (same sizes, so the same ids).
        masked = [masked_images_for(t.images, int(t.meta.get("n_prompt_images", 1)), p,
                                    seed=papo_seed(x.step, t)) for t in x.trajs]
        lp_mask = x.logprobs_with_images(masked, False)  # the old policy: before step()
        lp_mask_theta = (x.logprobs_with_images(masked, True)
                         if p.double_entropy_grad and p.eta_aug > 0 else None)
        return papo_loss(x.lp, x.lp_old, x.adv, x.mask, lp_mask=lp_mask,
                         lp_mask_theta=lp_mask_theta, lp_ref=x.lp_ref, grpo_cfg=self.cfg.grpo,
                         cfg=p, step=x.step, num_tokens=x.num_tokens, num_seqs=x.num_seqs)

    def after_learn(self, metrics, step):
        fired = self.alarm.update(metrics.get("papo/kl_prcp", 0.0),
                                  metrics.get("papo/entropy_ori", 0.0),
                                  metrics.get("papo/entropy_aug", 0.0))
        if fired:
            log.warning("PAPO: perception KL jumped while both entropies rose (KL hacking?) "
                        "at step %d", step)
        return {"papo/hacking_alarm": float(fired)}

    def state_dict(self):
        return {"alarm": list(self.alarm._hist)}

    def load_state_dict(self, state):
        self.alarm._hist.clear()
        self.alarm._hist.extend(tuple(h) for h in state.get("alarm", []))
