"""GSPO (mmagent_rl/algos/gspo.py): numbers worked out by hand, the sequence-level
formula it must equal, and a 2-step run on real Ray + vLLM + DeepSpeed."""
from __future__ import annotations

import json
import math

import pytest
import torch

from mmagent_rl import algos
from mmagent_rl.algos.grpo import GRPOConfig
from mmagent_rl.algos.gspo import GSPOConfig, gspo_loss, sequence_log_ratio
from mmagent_rl.config import AlgoConfig
from test_launch import launch

NO_KL = GRPOConfig(kl_beta=0.0)


def _two_sequences():
    # seq 0: ratios 0.5/0.4 and 1 -> s_0 = sqrt(1.25) = 1.1180, A = +1 -> clipped at 1.0004
    # seq 1: ratios 1, 1, (pad) -> s_1 = 1, A = -1 -> not clipped, loss 1
    lp = torch.tensor([[math.log(0.5), math.log(0.5), 0.0],
                       [math.log(0.3), math.log(0.7), 0.0]], requires_grad=True)
    lp_old = torch.tensor([[math.log(0.4), math.log(0.5), 0.0],
                           [math.log(0.3), math.log(0.7), 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    adv = torch.tensor([[1.0, 1.0, 0.0], [-1.0, -1.0, 0.0]])
    return lp, lp_old, adv, mask


def test_hand_worked_loss_and_gradient():
    lp, lp_old, adv, mask = _two_sequences()
    log_s = sequence_log_ratio(lp, lp_old, mask)
    assert log_s.tolist() == pytest.approx([0.5 * math.log(1.25), 0.0], abs=1e-6)
    loss, stats = gspo_loss(lp, lp_old, adv, mask, cfg=GSPOConfig(), grpo_cfg=NO_KL)
    # (-1.0004 + 1) / 2 sequences
    assert float(loss.detach()) == pytest.approx(-0.0002, abs=1e-6)
    assert stats["gspo/clipped_seq_fraction"] == pytest.approx(0.5)
    assert stats["gspo/seq_ratio_mean"] == pytest.approx((math.sqrt(1.25) + 1) / 2, abs=1e-5)
    loss.backward()
    # seq 0 is clipped: no gradient; seq 1: d/dlp_t of (1/2) * (1/2) * sum_t -A s_t = 1/4
    assert lp.grad.flatten().tolist() == pytest.approx([0.0, 0.0, 0.0, 0.25, 0.25, 0.0], abs=1e-6)


def test_equals_the_sequence_level_formula_value_and_gradient():
    """On random inputs with one advantage per sequence, the token form equals
    -1/G sum_i min(s_i A_i, clip(s_i) A_i) with s_i = exp(mean log ratio), both the
    value and the gradient (wide clip so that some sequences are clipped, some not)."""
    g = torch.Generator().manual_seed(0)
    B, T = 6, 7
    lp0 = -torch.rand(B, T, generator=g) * 2
    lp_old = lp0 + 0.05 * torch.randn(B, T, generator=g)
    mask = (torch.rand(B, T, generator=g) < 0.8).int()
    mask[:, 0] = 1
    a_seq = torch.randn(B, generator=g)
    adv = a_seq[:, None].expand(B, T) * mask
    cfg = GSPOConfig(eps_low=0.01, eps_high=0.01)

    lp = lp0.clone().requires_grad_(True)
    loss, stats = gspo_loss(lp, lp_old, adv, mask, cfg=cfg, grpo_cfg=NO_KL)
    loss.backward()

    lp_ref = lp0.clone().double().requires_grad_(True)
    m = mask.double()
    s = torch.exp(((lp_ref - lp_old.double()) * m).sum(-1) / m.sum(-1))
    a = a_seq.double()
    ref = -torch.minimum(s * a, torch.clamp(s, 1 - 0.01, 1 + 0.01) * a).mean()
    ref.backward()
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-5, abs=1e-7)
    assert torch.allclose(lp.grad.double(), lp_ref.grad, atol=1e-6)
    assert 0 < stats["gspo/clipped_seq_fraction"] < 1  # both cases were exercised


def test_micro_batches_add_up_to_the_whole_batch():
    lp, lp_old, adv, mask = _two_sequences()
    whole, _ = gspo_loss(lp, lp_old, adv, mask, cfg=GSPOConfig(), grpo_cfg=NO_KL)
    parts = [gspo_loss(lp[i:i + 1], lp_old[i:i + 1], adv[i:i + 1], mask[i:i + 1],
                       cfg=GSPOConfig(), grpo_cfg=NO_KL, num_seqs=2)[0] for i in range(2)]
    assert float(sum(parts).detach()) == pytest.approx(float(whole.detach()), abs=1e-7)


def test_registered_and_its_loss_is_what_the_learner_calls():
    assert "gspo" in algos.names()
    cfg = AlgoConfig(name="gspo", grpo=NO_KL)
    algo = algos.build(cfg)
    assert not algo.needs_reference  # kl_beta 0: no reference model loaded
    lp, lp_old, adv, mask = _two_sequences()
    x = algos.LossInputs(lp=lp, lp_old=lp_old, adv=adv, mask=mask, lp_ref=None,
                         num_tokens=4, num_seqs=2, step=0, trajs=[])
    assert float(algo.loss(x)[0].detach()) == pytest.approx(-0.0002, abs=1e-6)
    with pytest.raises(ValueError, match="eps_low"):
        GSPOConfig(eps_low=-1.0)


@pytest.mark.slow
def test_two_step_gspo_run(tmp_path):
    run = tmp_path / "gspo"
    p = launch(["+algo=gspo", f"hydra.run.dir={run}", "trainer.total_steps=2",
                "rollout.agent.max_new_tokens=24", "trainer.prompts_per_step=2", "rollout.n=4",
                "reward.fn=reward_plugins:shortness_reward"])
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert math.isfinite(r["loss"]) and r["learner/steps_total"] == r["step"]
        assert r["gspo/seq_ratio_mean"] == pytest.approx(1.0, abs=1e-3)  # on-policy
        assert 0.0 <= r["gspo/clipped_seq_fraction"] <= 1.0


def test_optional_kl_term_is_a_sequence_mean_of_the_estimator():
    lp, lp_old, adv, mask = _two_sequences()
    lp_ref = lp_old - 0.1  # reference log-probs a fixed 0.1 below
    beta = 0.5
    with_kl, stats = gspo_loss(lp, lp_old, adv, mask, cfg=GSPOConfig(),
                               grpo_cfg=GRPOConfig(kl_beta=beta), lp_ref=lp_ref)
    without, _ = gspo_loss(lp, lp_old, adv, mask, cfg=GSPOConfig(), grpo_cfg=NO_KL)
    m = mask.bool()
    x = (lp_ref - lp).detach()  # k3: exp(x) - x - 1 per generated token
    k3 = torch.where(m, torch.exp(x) - x - 1, torch.zeros(()))
    per_seq = k3.sum(-1) / m.sum(-1)
    assert float((with_kl - without).detach()) == pytest.approx(beta * float(per_seq.mean()),
                                                                rel=1e-5)
    assert stats["kl"] == pytest.approx(float(k3.sum() / m.sum()), rel=1e-5)
