"""Rollouts overlapped with learning: the synchronous loop against
``trainer.off_policy_steps=1`` on the same workload, in the same run.

    python bench/overlap.py [--steps 60] [--seed 0]
    python bench/overlap.py --quick            # tiny model, 2 steps, a 4-example eval

The workload is the testbed preset of ``make demo`` (GRPO from the shipped agent on
``data=synthetic_hard``, 8 prompts x 4 samples, lr 1e-4) with one learner on one thread,
so that a core is free for the engine while the learner trains. Each mode is a real
``python -m mmagent_rl.launch`` run; the held-out eval (256 x 4) runs before the first
step and after the last.

- ``overlap_speedup``: steps/s of the overlapped run over the synchronous one, steps/s
  being steps / the sum of their ``time/step`` (the evals are outside it);
- ``heldout_gain_sync`` / ``heldout_gain_overlap``: pass@1 after the last step minus
  before the first, in points; ``heldout_gap``: overlapped minus synchronous, to read
  against the seed spread of synchronous GRPO (docs/learning.md: +-1.3 points over
  three seeds at 60 steps).
Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTBED = ["data=synthetic_hard", "trainer.prompts_per_step=8", "learner.lr=1e-4",
           "learner.num_workers=1", "learner.torch_threads=1"]
QUICK = ["model=tiny", "trainer.prompts_per_step=2", "rollout.n=2",
         "rollout.agent.max_new_tokens=16", "learner.num_workers=1",
         "learner.micro_batch_size=2", "eval.max_examples=4", "eval.n_samples=2", "eval.k=2",
         "reward.fn=reward_plugins:shortness_reward"]


def run(mode_args: list[str], a, run_dir: str) -> dict:
    args = [sys.executable, "-m", "mmagent_rl.launch", "+algo=grpo",
            *(QUICK if a.quick else TESTBED), f"seed={a.seed}",
            f"trainer.total_steps={a.steps}", f"trainer.eval_every={a.steps}",
            "trainer.progress=false", "trainer.save_final=false",
            f"hydra.run.dir={run_dir}", *mode_args]
    env = dict(os.environ, WANDB_MODE="disabled",
               PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]))
    p = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{mode_args}: exit {p.returncode}\n{p.stderr[-3000:]}")
    rows = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval/pass@1" in r]
    step_s = sum(r["time/step"] for r in steps)
    out = {"steps": len(steps), "train_s": round(step_s, 1),
           "steps_per_s": round(len(steps) / step_s, 4),
           "step_s_median": round(statistics.median(r["time/step"] for r in steps), 3),
           "generate_wait_s_median": round(statistics.median(
               r["time/generate"] for r in steps), 3),
           "learn_s_median": round(statistics.median(r["time/learn"] for r in steps), 3),
           "pass1_before": evals[0]["eval/pass@1"], "pass1_after": evals[-1]["eval/pass@1"],
           "train_reward_last10": round(statistics.mean(
               r["reward/mean"] for r in steps[-10:]), 4)}
    out["heldout_gain_points"] = round(100 * (out["pass1_after"] - out["pass1_before"]), 1)
    if any("offpolicy/staleness_max" in r for r in steps):
        out["staleness_max"] = max(r["offpolicy/staleness_max"] for r in steps)
        out["is_ratio_max"] = max(r.get("offpolicy/is_ratio_max", 1.0) for r in steps)
        out["is_clipped_share_mean"] = round(statistics.mean(
            r.get("offpolicy/is_clipped_share", 0.0) for r in steps), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.steps = 2
    root = tempfile.mkdtemp(prefix="mmagent_bench_overlap_")
    res = {}
    for mode, extra in (("sync", []), ("overlap", ["trainer.off_policy_steps=1"])):
        res[mode] = run(extra, a, os.path.join(root, mode))
        print(mode, json.dumps(res[mode]), flush=True)
    s, o = res["sync"], res["overlap"]
    print(f"\n{'mode':>8} {'steps/s':>8} {'step s':>7} {'gen wait':>8} {'learn':>6} "
          f"{'pass@1 before -> after':>24}")
    for mode, r in res.items():
        print(f"{mode:>8} {r['steps_per_s']:>8.4f} {r['step_s_median']:>7.2f} "
              f"{r['generate_wait_s_median']:>8.2f} {r['learn_s_median']:>6.2f} "
              f"{r['pass1_before']:>10.3f} -> {r['pass1_after']:.3f}")
    print(json.dumps({
        "steps": a.steps, "seed": a.seed, "sync": s, "overlap": o,
        "overlap_speedup": round(o["steps_per_s"] / s["steps_per_s"], 3),
        "heldout_gain_sync": s["heldout_gain_points"],
        "heldout_gain_overlap": o["heldout_gain_points"],
        "heldout_gap": round(o["heldout_gain_points"] - s["heldout_gain_points"], 1),
    }))


if __name__ == "__main__":
    main()
