"""Chaos run (not in CI): actors SIGKILLed again and again during a real run, against
the same run undisturbed.

    python bench/chaos.py [--steps 12] [--faults 10] [--quick] [override ...]

Runs ``python -m mmagent_rl.launch`` (tiny model, per-request seeds) twice: clean, then
with faults. In the second run, after each of the first ``--faults`` logged steps, one
actor process is killed, the kinds in turn: the rollout worker while it generates, the
reward scorer while the rollout worker generates (so it dies mid-step), and the rollout
worker right when the step is logged (idle, or loading the new weights). Extra
arguments are Hydra overrides for both runs.

Prints each fault and a last JSON line: faults injected, the run's own restart counts,
whether every step's loss, reward, grad norm and token count equal the clean run's,
and the wall-time ratio faulted/clean.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAME = ("loss", "reward/mean", "grad_norm", "tokens/generated")
KINDS = (("ray::RolloutWorker.generate", "ray::RolloutWorker"),  # (wait for, kill)
         ("ray::RolloutWorker.generate", "ray::RewardScorer"),
         (None, "ray::RolloutWorker"))


def find_process(root_pid: int, title: str) -> psutil.Process | None:
    """The descendant of ``root_pid`` whose Ray process title starts with ``title``
    (``ray::<Class>.<method>`` while a method runs, ``ray::<Class>`` when idle)."""
    for proc in psutil.Process(root_pid).children(recursive=True):
        try:
            if " ".join(proc.cmdline()).startswith(title):
                return proc
        except psutil.Error:
            continue
    return None


def start_run(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]))
    env.setdefault("WANDB_MODE", "disabled")
    return subprocess.Popen([sys.executable, "-m", "mmagent_rl.launch", *args], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def rows(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


def run(args: list[str], run_dir: str, faults: int = 0, timeout: float = 3600) -> dict:
    t0 = time.perf_counter()
    p = start_run([*args, f"hydra.run.dir={run_dir}"])
    injected = []
    for k in range(faults):
        wait_for, victim = KINDS[k % len(KINDS)]
        while len(rows(run_dir)) < k + 1 or (wait_for and not find_process(p.pid, wait_for)):
            if p.poll() is not None or time.perf_counter() - t0 > timeout:
                break
            time.sleep(0.02)
        target = find_process(p.pid, victim) if p.poll() is None else None
        if target is None:
            print(f"fault {k + 1}: no {victim} process (run ended?)", flush=True)
            break
        target.send_signal(signal.SIGKILL)
        injected.append(victim)
        print(f"fault {k + 1}: killed {victim} (pid {target.pid}) after step {k + 1}"
              + (f", during {wait_for}" if wait_for else ""), flush=True)
    out, _ = p.communicate(timeout=max(1.0, timeout - (time.perf_counter() - t0)))
    return {"rc": p.returncode, "rows": rows(run_dir), "injected": injected,
            "wall_s": time.perf_counter() - t0, "log": out}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--faults", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="3 steps, 2 faults")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    if a.quick:
        a.steps, a.faults = 3, 2
    if a.faults >= a.steps:
        ap.error("--faults must be < --steps (a fault follows a logged step)")
    args = ["+algo=grpo", "model=tiny", f"trainer.total_steps={a.steps}",
            "trainer.prompts_per_step=2", "rollout.n=2", "rollout.agent.max_new_tokens=24",
            "rollout.agent.seeded_requests=true", "trainer.progress=false",
            "reward.fn=reward_plugins:shortness_reward", "learner.num_workers=1",
            "trainer.save_final=false", f"trainer.max_actor_restarts={a.faults}",
            *a.overrides]
    tmp = tempfile.mkdtemp(prefix="mmagent_chaos_")
    clean = run(args, os.path.join(tmp, "clean"))
    chaos = run(args, os.path.join(tmp, "chaos"), faults=a.faults)
    for name, r in (("clean", clean), ("chaos", chaos)):
        if r["rc"] != 0:
            print(f"{name} run failed (exit {r['rc']}):\n{r['log'][-4000:]}")
    last = chaos["rows"][-1] if chaos["rows"] else {}
    same = len(clean["rows"]) == len(chaos["rows"]) == a.steps and all(
        all(c[k] == f[k] for k in SAME) for c, f in zip(clean["rows"], chaos["rows"]))
    result = {
        "steps": a.steps, "faults_injected": len(chaos["injected"]),
        "killed": {v: chaos["injected"].count(v) for v in sorted(set(chaos["injected"]))},
        "completed": chaos["rc"] == 0 and len(chaos["rows"]) == a.steps,
        "restarts_reported": {k: last[k] for k in sorted(last) if k.startswith("faults/")},
        "steps_logged": [r["step"] for r in chaos["rows"]],
        "samples_trained": last.get("learner/samples_total"),
        "identical_to_clean": same,
        "clean_wall_s": round(clean["wall_s"], 1), "chaos_wall_s": round(chaos["wall_s"], 1),
        "wall_ratio_chaos_vs_clean": round(chaos["wall_s"] / clean["wall_s"], 2)}
    print(json.dumps(result))
    return 0 if result["completed"] and same else 1


if __name__ == "__main__":
    sys.exit(main())
