"""What MAPO and PAPO cost on top of GRPO, and MAPO's gradient-variance claim.

    python bench/algo_cost.py [--steps 3] [--prompts 4] [--n 4] [--tokens 48] [--quick]

1. PAPO vs GRPO: the real trainer (Ray, vLLM, DeepSpeed, 1 learner) on the same
   workload (same prompts, seeds and weights at step 1); median time per step and per
   learn phase, and the learner's peak RSS, with the ratios PAPO / GRPO, for both
   entropy modes (the masked forward only, and the second forward with grad).
2. MAPO: alignment scoring throughput of the reward actor's CLIP (pairs/s) and its
   share of a GRPO step of this workload; and, on the same trajectories (tool calls
   forced with a scripted first turn, labels true or wrong at random), ``grad/variance``
   under MAPO's advantages divided by the same under GRPO's.
Every ratio is measured in this run. Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

from common import TESTS, parse_workload, workload_args

sys.path.insert(0, TESTS)  # reward_plugins, for the in-process part


def trainer_run(algo: str, a, overrides: dict) -> dict:
    import ray

    from common import run_steps, stop

    rows, tr = run_steps(algo, steps=a.steps, warmup=1, prompts=a.prompts, n=a.n,
                         tokens=a.tokens, run_dir=f"/tmp/mmagent_bench_{algo}",
                         overrides=overrides)
    peak = ray.get(tr.learners[0].peak_rss_gib.remote(), timeout=600)
    stop(tr)
    med = lambda k: statistics.median(r[k] for r in rows)  # noqa: E731
    return {"step_s": med("time/step"), "learn_s": med("time/learn"),
            "learner_peak_rss_gib": peak}


def mapo_part(a, grpo_step_s: float) -> dict:
    import torch

    from mmagent_rl import algos
    from mmagent_rl.algos.grpo import GRPOConfig, grpo_loss
    from mmagent_rl.config import AlgoConfig, RewardConfig
    from mmagent_rl.data.synthetic import COLOR_RGB, SyntheticConfig, SyntheticDataset
    from mmagent_rl.learner.batch import collate
    from mmagent_rl.learner.policy import load_policy, token_logprobs
    from mmagent_rl.learner.grad_probe import GradProbe, grad_variance
    from mmagent_rl.models.tiny import ensure_tiny_model
    from mmagent_rl.reward.worker import RewardScorer
    from mmagent_rl.rollout.agent_loop import AgentConfig, AgentLoop
    from mmagent_rl.chat import ChatFormat
    from mmagent_rl.rollout.engine import EngineConfig, VLLMEngine

    torch.set_num_threads(1)
    path = str(ensure_tiny_model())
    chat = ChatFormat.from_pretrained(path)
    ds = SyntheticDataset(SyntheticConfig(), seed=0, size=a.prompts * 4, split="train")
    loop = AgentLoop(VLLMEngine(path, EngineConfig(max_model_len=2048)), chat,
                     AgentConfig(max_new_tokens=a.tokens, max_turns=2))
    rng = random.Random(0)
    trajs = []
    for i in range(a.prompts * 4):
        ex = ds[i]
        for j in range(a.n):  # one scripted call per rollout, its label true or wrong:
            # alignment then varies inside a group (MAPO normalises it per group)
            colour = ex.answer if rng.random() < 0.5 else rng.choice(list(COLOR_RGB))
            call = ('<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": '
                    f'{list(ex.target_box)}, "label": "a {colour} square inside a black '
                    'ring"}}</tool_call>')
            (t,) = loop.run([ex], n=1, seed=i * 1000 + j,
                            scripted_turns=["Let me zoom." + call])
            t.sample_idx = j
            trajs.append(t)
    algo = AlgoConfig(name="mapo")
    # the scripted calls carry a true or wrong label; a random model writes no
    # <description> after the crop, so MAPO's default "post" mode would score nothing
    algo.mapo.description = "label"
    # the scripted turn is not trained (loss mask 0), so the default turn coupling would
    # put the alignment term on no token: couple it to the trajectory's reward instead
    algo.mapo.coupling = "trajectory"
    scorer = RewardScorer(RewardConfig(fn="reward_plugins:shortness_reward"),
                          alignment=algo.mapo)
    scorer.score(trajs[:8])  # warm-up
    t0 = time.perf_counter()
    scores, reward_metrics = scorer.scores(trajs)
    score_s = time.perf_counter() - t0
    for t, s in zip(trajs, scores):
        s.apply(t)
    pairs = sum(len(t.tool_calls) for t in trajs)
    align_s = reward_metrics["mapo/align_time_s"]

    model = load_policy(path).train()
    probe = GradProbe(model, seed=0)
    total_tokens = sum(t.num_generated for t in trajs)

    def variance(name: str) -> float:
        algo.name = name
        algos.build(algo).advantages(trajs)
        probes = []
        for i in range(0, len(trajs), 4):
            b = collate(trajs[i:i + 4], chat.image_processor, chat.image_token_id, chat.pad_id)
            lp = token_logprobs(model, b, banned_ids=chat.banned_ids)[0]
            loss, _ = grpo_loss(lp, b.old_logprobs, b.advantages, b.loss_mask,
                                cfg=GRPOConfig(kl_beta=0.0), num_tokens=total_tokens)
            loss.backward()  # the probe reads g_m from this backward (a hook)
            probes.append(probe.take())
            model.zero_grad(set_to_none=True)
        return grad_variance(probes)

    v_grpo, v_mapo = variance("grpo"), variance("mapo")
    return {"align_pairs": pairs, "align_pairs_per_s": pairs / align_s,
            "align_share_of_grpo_step": (align_s / (len(trajs) / (a.prompts * a.n)))
            / grpo_step_s, "score_s": score_s, "grad_variance_grpo": v_grpo,
            "grad_variance_mapo": v_mapo, "grad_variance_ratio_mapo_grpo": v_mapo / v_grpo}


def main() -> None:
    ap = argparse.ArgumentParser()
    workload_args(ap, steps=3, tokens=48)
    a = parse_workload(ap)
    grpo = trainer_run("grpo", a, {})
    papo = trainer_run("papo", a, {"algo.papo.double_entropy_grad": False})
    papo2 = trainer_run("papo", a, {"algo.papo.double_entropy_grad": True})
    mapo = mapo_part(a, grpo["step_s"])
    out = {"grpo": grpo, "papo_masked_forward": papo, "papo_double_entropy_grad": papo2,
           "papo_step_ratio": papo["step_s"] / grpo["step_s"],
           "papo_learn_ratio": papo["learn_s"] / grpo["learn_s"],
           "papo_grad_step_ratio": papo2["step_s"] / grpo["step_s"],
           "papo_grad_learn_ratio": papo2["learn_s"] / grpo["learn_s"],
           "papo_peak_rss_ratio": papo2["learner_peak_rss_gib"] / grpo["learner_peak_rss_gib"],
           **mapo}
    for k, v in out.items():
        print(f"{k:34s} {v}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
    # Skip the interpreter's teardown: with an in-process vLLM engine it can segfault
    # after everything is printed (seen once in a fresh-clone `make test`, exit -11).
    sys.stdout.flush()
    os._exit(0)
