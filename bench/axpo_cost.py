"""The AXPO round's cost relative to the rest of the step, with the prefix cache on/off.

    python bench/axpo_cost.py [--model CHECKPOINT] [--steps 3] [--prompts 4] [--n 4] [--quick]

CHECKPOINT must call tools (a cold-started agent), or nothing triggers; without
--model, the embedded agent on the testbed's task (8-12 px squares), where it fails often
enough to trigger. Runs the real trainer with +algo=axpo twice, with vLLM's
prefix cache on and off, on the same prompts and seeds. Reports per step (median):
the AXPO round's time (continue + score + advantages) over the GRPO part of the step,
and how much of the round the prefix cache saves. Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics

from common import parse_workload, workload_args



def run(model: str, a, cache: bool) -> dict:
    from common import run_steps, stop

    rows, tr = run_steps("axpo", steps=a.steps, warmup=1, prompts=a.prompts, n=a.n,
                         tokens=a.tokens, run_dir="/tmp/mmagent_bench_axpo",
                         overrides={**a.extra, "model.path": model,
                                    "rollout.engine.enable_prefix_caching": cache,
                                    "reward.fn": "mmagent_rl.reward.task:default_reward"})
    stop(tr)
    axpo = statistics.median(r.get("time/axpo", 0.0) for r in rows)
    rest = statistics.median(r["time/step"] - r.get("time/axpo", 0.0) for r in rows)
    return {"axpo_round_s": axpo, "grpo_part_s": rest,
            "triggered_prompts": sum(r["axpo/triggered_prompts"] for r in rows),
            "resampled_prefixes": sum(r["axpo/resampled_prefixes"] for r in rows),
            "extra_token_share": statistics.mean(r["axpo/extra_token_share"] for r in rows)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="default: the embedded agent")
    workload_args(ap, steps=3, tokens=96)
    # quick: enough tokens for the agent to call the tool and answer, or nothing triggers
    a = parse_workload(ap, tokens=96, prompts=4, n=4, steps=3)
    a.extra = {}
    if a.model is None:  # the embedded agent, on the testbed, where it fails often enough
        from mmagent_rl.models.embedded import SYSTEM_PROMPT, embedded_path

        a.model = embedded_path()
        a.extra = {"model.system_prompt": SYSTEM_PROMPT,
                   "data.synthetic.target_size": [8, 12]}
    on, off = run(a.model, a, True), run(a.model, a, False)
    out = {"cache_on": on, "cache_off": off,
           "axpo_round_ratio": on["axpo_round_s"] / on["grpo_part_s"],
           "prefix_cache_saving": 1 - on["axpo_round_s"] / off["axpo_round_s"]
           if off["axpo_round_s"] > 0 else 0.0}
    for k, v in out.items():
        print(f"{k:22s} {v}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
