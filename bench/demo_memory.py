"""Peak memory of the CPU demo, summed over every process it starts.

    python bench/demo_memory.py [--steps 5] [--quick]

Runs the ``make demo`` command (``python -m mmagent_rl.launch +algo=grpo`` with the
Makefile's testbed preset, read from the Makefile's ``TESTBED`` so the two cannot drift)
with ``trainer.total_steps`` and ``trainer.eval_every`` = ``--steps`` (the held-out
evals before the first step and after the last, as in the demo; ``--quick`` skips them)
as a child process. A thread samples the
whole process tree every 0.2 s (the driver, Ray's GCS/raylet/agents, the rollout actor
with its in-process vLLM engine, the reward actor and both learners are all
descendants): the sum of RSS, the largest sum seen, and each process's own peak. The
sum of RSS counts shared pages (libraries, the object store) once per process that
maps them, so it over-states what the machine needs; the proportional set size (PSS,
shared pages split between their users) is sampled too, every 2 s.
Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root] + root.children(recursive=True)
    except psutil.Error:
        return []


def describe(p: psutil.Process) -> str:
    try:
        name = p.name()
        argv = p.cmdline()
        if argv and argv[0].startswith("ray::"):  # an actor (Ray sets its title)
            return argv[0].split()[0]
        cmd = " ".join(argv[:3])
        if name.startswith("ray::"):
            return name
        if "raylet" in cmd or "gcs_server" in cmd:
            return os.path.basename(p.cmdline()[0])
        return name if "python" not in name else " ".join(cmd.split())[:80]
    except psutil.Error:
        return "?"


class Sampler(threading.Thread):
    def __init__(self, root: psutil.Process):
        super().__init__(daemon=True)
        self.root = root
        self.stop = threading.Event()
        self.peak_rss = self.peak_pss = 0
        self.per_proc: dict[int, tuple[str, int]] = {}
        self.peak_procs = 0

    def run(self):
        last_pss = 0.0
        while not self.stop.is_set():
            procs = tree(self.root)
            total = 0
            for p in procs:
                try:
                    rss = p.memory_info().rss
                except psutil.Error:
                    continue
                total += rss
                name, best = self.per_proc.get(p.pid, ("", 0))
                if rss > best or not name:  # named again: an actor's title comes later
                    self.per_proc[p.pid] = (describe(p), max(rss, best))
            self.peak_rss = max(self.peak_rss, total)
            self.peak_procs = max(self.peak_procs, len(procs))
            if time.time() - last_pss > 2.0:
                last_pss = time.time()
                pss = 0
                for p in procs:
                    try:
                        pss += p.memory_full_info().pss
                    except psutil.Error:
                        pass
                self.peak_pss = max(self.peak_pss, pss)
            time.sleep(0.2)


def demo_preset() -> list[str]:
    """The Makefile's TESTBED overrides (what ``make demo`` trains with)."""
    text = open(os.path.join(REPO, "Makefile")).read().replace("\\\n", " ")
    line = next(x for x in text.splitlines() if x.startswith("TESTBED :="))
    return line.split(":=", 1)[1].split()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    a = ap.parse_args()
    if a.quick:  # the figures of a quick run mean nothing
        a.steps = 2
    run_dir = f"/tmp/mmagent_bench_demo_{os.getpid()}"
    evals = 0 if a.quick else a.steps  # a quick run skips the evals (the suite's time)
    cmd = [sys.executable, "-m", "mmagent_rl.launch", "+algo=grpo", *demo_preset(),
           f"trainer.total_steps={a.steps}", f"trainer.eval_every={evals}",
           f"hydra.run.dir={run_dir}", *a.overrides]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
               WANDB_MODE=os.environ.get("WANDB_MODE", "offline"))
    print("running:", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    sampler = Sampler(psutil.Process(child.pid))
    sampler.start()
    tail = []
    for line in child.stdout:
        tail = (tail + [line.rstrip()])[-5:]
        if line.startswith("step "):
            print(line.rstrip()[:160], flush=True)
    rc = child.wait()
    wall = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    if rc != 0:
        print("\n".join(tail))
        raise SystemExit(f"demo failed (exit {rc})")
    gib = 2**30
    top = sorted(sampler.per_proc.values(), key=lambda v: -v[1])[:10]
    print(f"\nwall time {wall:.0f} s for {a.steps} steps; {sampler.peak_procs} processes at most")
    print("largest processes (own peak RSS):")
    for name, rss in top:
        print(f"  {rss / gib:6.2f} GiB  {name}")
    print(f"peak of the summed RSS: {sampler.peak_rss / gib:.2f} GiB "
          f"(PSS, shared pages counted once: {sampler.peak_pss / gib:.2f} GiB)")
    print(json.dumps({
        "steps": a.steps, "wall_s": round(wall, 1),
        "demo_peak_rss_gib": round(sampler.peak_rss / gib, 3),
        "demo_peak_pss_gib": round(sampler.peak_pss / gib, 3),
        "processes": sampler.peak_procs,
        "largest": [{"name": n, "peak_rss_gib": round(r / gib, 3)} for n, r in top[:6]],
    }))


if __name__ == "__main__":
    main()
