"""Time per phase of a GRPO step on a fixed workload, and the framework's overhead.

    python bench/step_breakdown.py [--steps 4] [--prompts 4] [--n 4] [--tokens 64] [--quick]

Runs the real trainer (Ray, vLLM, DeepSpeed, 1 learner, tiny model), then, in the same
run, the pure engine generation of the same number of tokens for the same prompts
(one vLLM call, no agent loop) and the pure learner forward/backward on the same
trajectories (plain torch, no DeepSpeed, no collation). Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from common import parse_workload, workload_args


def main() -> None:
    ap = argparse.ArgumentParser()
    workload_args(ap, steps=4, warmup=1, tokens=64)
    a = parse_workload(ap)

    import torch

    from common import run_steps, stop

    rows, trainer = run_steps("grpo", steps=a.steps, warmup=a.warmup, prompts=a.prompts,
                              n=a.n, tokens=a.tokens, run_dir="/tmp/mmagent_bench_step")
    trajs = trainer.last_trajectories
    stop(trainer)

    def med(k):
        return statistics.median(r[k] for r in rows)

    phases = {k: med(k) for k in ("time/step", "time/generate", "time/score", "time/learn",
                                  "time/sync")}

    # ---- pure engine: same prompts, same token counts, one call ----
    torch.set_num_threads(1)
    from mmagent_rl.learner.batch import collate
    from mmagent_rl.learner.policy import load_policy, token_logprobs
    from mmagent_rl.chat import ChatFormat, collapse_image_runs
    from mmagent_rl.rollout.engine import EngineConfig, VLLMEngine

    path = trainer.model_path
    chat = ChatFormat.from_pretrained(path)
    eng = VLLMEngine(path, EngineConfig(max_model_len=4096))
    reqs = [(collapse_image_runs(t.token_ids[:t.prompt_len], chat.image_token_id), t.images[:1])
            for t in trajs]
    counts = [max(1, t.num_generated) for t in trajs]
    eng.generate(reqs, max_tokens=counts, ignore_eos=True)  # warm-up
    gen_times = []
    for _ in range(3):
        t0 = time.perf_counter()
        eng.generate(reqs, max_tokens=counts, ignore_eos=True)
        gen_times.append(time.perf_counter() - t0)
    pure_gen = statistics.median(gen_times)

    # ---- pure learner: forward + backward of the same trajectories ----
    model = load_policy(path).train()
    mbs = 4
    batches = [collate(trajs[i:i + mbs], chat.image_processor, chat.image_token_id, chat.pad_id)
               for i in range(0, len(trajs), mbs)]
    learn_times = []
    for _ in range(3):
        t0 = time.perf_counter()
        for b in batches:
            lp, _ = token_logprobs(model, b, banned_ids=chat.banned_ids)
            (-(lp * b.loss_mask).sum() / max(1, b.num_tokens)).backward()
        learn_times.append(time.perf_counter() - t0)
    pure_learn = statistics.median(learn_times)

    ratio = phases["time/step"] / (pure_gen + pure_learn)
    print("phase            seconds (median of %d steps)" % a.steps)
    for k, v in phases.items():
        print(f"{k:16s} {v:8.3f}  ({100 * v / phases['time/step']:.0f}% of step)")
    print(f"pure generate    {pure_gen:8.3f}")
    print(f"pure learner     {pure_learn:8.3f}")
    print(f"overhead ratio   {ratio:8.3f}  (step / (pure generate + pure learner))")
    print(json.dumps({
        "workload": {"prompts": a.prompts, "n": a.n, "max_new_tokens": a.tokens,
                     "generated_tokens": sum(counts), "learners": 1},
        **{k.replace("/", "_"): round(v, 4) for k, v in phases.items()},
        "pure_generate_s": round(pure_gen, 4), "pure_learner_s": round(pure_learn, 4),
        "overhead_ratio": round(ratio, 3),
    }))


if __name__ == "__main__":
    main()
