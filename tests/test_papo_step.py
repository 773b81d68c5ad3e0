"""PAPO's sign on a real (tiny) model: one optimizer step with gamma > 0 raises the
perception KL of that batch, compared with gamma = 0 from the same start."""
from __future__ import annotations

import random

import torch

from mmagent_rl.algos.grpo import GRPOConfig
from mmagent_rl.algos.papo import PAPOConfig, masked_images_for, papo_loss
from mmagent_rl.learner.batch import collate
from mmagent_rl.learner.policy import load_policy, token_logprobs
from mmagent_rl.trajectory import Trajectory


def _batch(chat, examples):
    rng = random.Random(0)
    trajs = []
    for i, ex in enumerate(examples[:2]):
        prompt = chat.prompt_ids(ex.image, ex.question)
        gen = [rng.randrange(300, 1500) for _ in range(12)]
        ids = prompt + gen
        trajs.append(Trajectory(prompt_id=ex.id, sample_idx=i, token_ids=ids,
                                loss_mask=[0] * len(prompt) + [1] * len(gen),
                                logprobs=[0.0] * len(ids), images=[ex.image],
                                prompt_len=len(prompt)))
    cfg = PAPOConfig(gamma=0.5, eta_ori=0.0, eta_aug=0.0, kl_clip=None)
    masked = [masked_images_for(t.images, 1, cfg, seed=7) for t in trajs]
    b = collate(trajs, chat.image_processor, chat.image_token_id, chat.pad_id)
    bm = collate(trajs, chat.image_processor, chat.image_token_id, chat.pad_id,
                 images_override=masked)
    return b, bm


def _kl_after_one_step(path, chat, b, bm, gamma):
    torch.manual_seed(0)
    model = load_policy(path).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)  # small: first-order regime
    lp = token_logprobs(model, b, banned_ids=chat.banned_ids)[0]
    with torch.no_grad():
        lpm = token_logprobs(model, bm, banned_ids=chat.banned_ids)[0]
    old = lp.detach()  # ratio 1, zero advantages: only the PAPO term moves the model
    cfg = PAPOConfig(gamma=gamma, eta_ori=0.0, eta_aug=0.0, kl_clip=None,
                     double_entropy_grad=False)
    loss, before = papo_loss(lp, old, torch.zeros_like(lp), b.loss_mask, lp_mask=lpm,
                             grpo_cfg=GRPOConfig(kl_beta=0.0), cfg=cfg, step=0)
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        lp2 = token_logprobs(model, b, banned_ids=chat.banned_ids)[0]
        lpm2 = token_logprobs(model, bm, banned_ids=chat.banned_ids)[0]
        _, after = papo_loss(lp2, lp2, torch.zeros_like(lp2), b.loss_mask, lp_mask=lpm2,
                             grpo_cfg=GRPOConfig(kl_beta=0.0), cfg=cfg, step=0)
    return before["papo/kl_prcp"], after["papo/kl_prcp"]


def test_one_step_with_gamma_increases_perception_kl(tiny_model_path, chat, examples):
    b, bm = _batch(chat, examples)
    start0, after0 = _kl_after_one_step(tiny_model_path, chat, b, bm, gamma=0.0)
    start1, after1 = _kl_after_one_step(tiny_model_path, chat, b, bm, gamma=1.0)
    assert start0 == start1 > 0
    assert after0 == start0  # no PAPO term, zero advantages: nothing moves
    assert after1 > after0  # maximised, not minimised
