"""The learning proof: GRPO from the embedded agent, held-out accuracy before and after.

    python bench/learning_proof.py --seeds 0 1 2 --steps 30 --examples 200

For each seed: one GRPO run (`python -m mmagent_rl.launch +algo=grpo`, the embedded
agent, `trainer.seed=S`), then `python -m mmagent_rl.eval` on its final checkpoint.
The "before" figure is the same eval on the shipped agent (same held-out examples,
same sampling seed). Prints one line per run and, last, one JSON object with the
gains, their mean and standard deviation, and the wall time of each run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", *args], cwd=REPO, check=True)
    return time.perf_counter() - t


def evaluate(out: str, examples: int, checkpoint: str | None) -> dict:
    args = ["mmagent_rl.eval", f"eval.max_examples={examples}", f"data.eval_size={examples}",
            f"hydra.run.dir={out}"]
    if checkpoint:
        args.append(f"eval.checkpoint={checkpoint}")
    _run(args)
    with open(os.path.join(out, "eval.json")) as f:
        return json.load(f)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--examples", type=int, default=200)
    ap.add_argument("--out", default="runs/learning_proof")
    ap.add_argument("overrides", nargs="*", help="extra launch overrides")
    a = ap.parse_args()
    before = evaluate(os.path.join(a.out, "before"), a.examples, None)
    print(f"before: accuracy {before['accuracy']:.3f} tool {before['tool_call_rate']:.2f}",
          flush=True)
    runs = []
    for seed in a.seeds:
        run_dir = os.path.join(a.out, f"grpo_seed{seed}")
        train_s = _run(["mmagent_rl.launch", "+algo=grpo", f"trainer.seed={seed}",
                        f"trainer.total_steps={a.steps}", "trainer.progress=false",
                        f"hydra.run.dir={run_dir}", *a.overrides])
        after = evaluate(os.path.join(run_dir, "eval_after"), a.examples,
                         os.path.join(run_dir, "checkpoints", "final"))
        runs.append({"seed": seed, "train_min": round(train_s / 60, 1),
                     "accuracy": after["accuracy"], "gain": after["accuracy"] - before["accuracy"],
                     "tool_call_rate": after["tool_call_rate"],
                     "box_hit_rate": after["box_hit_rate"]})
        print(json.dumps(runs[-1]), flush=True)
    gains = [r["gain"] for r in runs]
    print(json.dumps({
        "accuracy_before": before["accuracy"], "runs": runs,
        "gain_mean": statistics.mean(gains),
        "gain_std": statistics.stdev(gains) if len(gains) > 1 else 0.0,
        "steps": a.steps, "examples": a.examples, "overrides": a.overrides}))


if __name__ == "__main__":
    main()
