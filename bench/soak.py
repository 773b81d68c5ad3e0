"""Soak test (not in CI): memory growth per step of every process of a long demo run.

    python bench/soak.py [--steps 200] [--out soak.json] [--quick] [override ...]

Runs the CPU demo config (what ``make demo`` runs: ``+algo=grpo`` on the default
config, composed by Hydra from conf/) for ``--steps`` steps with the real Trainer in
this process, and after every step samples the RSS of every process of the run: the
driver (this process), Ray's own processes (GCS, raylet, agents, idle workers) and the
actors: the rollout worker with its in-process vLLM engine, the reward scorer and each
learner rank (their pids are asked from the actors themselves). Extra arguments are
Hydra overrides (e.g. ``rollout.n=2``).

For each process: RSS at the first and last step, and the growth per step, the slope
of a least-squares line through its RSS over the second half of the steps (the first
half is warm-up: allocator pools, caches and lazily built kernels grow there), in
MiB/step. A process is flat when that slope is at most ``--max-slope`` MiB/step; the
exit status is 1 when one is not. Last line: one JSON object ("flat", "growing").

``pytest --soak tests/test_soak.py`` runs it (200 steps) as a test; CI does not.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 2**20


def actor_pids(trainer) -> dict[int, str]:
    """pid -> label for every actor of the trainer."""
    import ray

    def pid(_self) -> int:  # runs inside the actor
        import os as _os

        return _os.getpid()

    named = [("rollout", a) for a in trainer.rollouts] + [("reward", trainer.reward)] \
        + [("learner", a) for a in trainer.learners]
    pids = ray.get([a.__ray_call__.remote(pid) for _, a in named], timeout=300)
    out, seen = {}, {}
    for (kind, _), p in zip(named, pids):
        i = seen.get(kind, 0)
        seen[kind] = i + 1
        out[p] = f"{kind}{i}"
    return out


def describe(p: psutil.Process) -> str:
    try:
        name = p.name()
        if name.startswith("ray::"):
            return name.split(".")[0]  # ray::IDLE, ray::Learner (method names vary)
        cmd = p.cmdline()
        for key in ("gcs_server", "raylet", "dashboard", "log_monitor", "runtime_env",
                    "monitor.py", "agent"):
            if any(key in c for c in cmd[:3]):
                return key
        return name
    except psutil.Error:
        return "?"


def sample(root: psutil.Process, labels: dict[int, str]) -> dict[str, float]:
    """RSS in MiB of the driver and every descendant, by label (label@pid if ambiguous)."""
    out: dict[str, float] = {}
    try:
        procs = [root] + root.children(recursive=True)
    except psutil.Error:
        procs = [root]
    for p in procs:
        try:
            rss = p.memory_info().rss / MIB
        except psutil.Error:
            continue
        label = "driver" if p.pid == root.pid else labels.get(p.pid) or describe(p)
        out[f"{label}@{p.pid}"] = rss
    return out


def slope(ys: list[float]) -> float:
    """Least-squares slope per step."""
    n = len(ys)
    if n < 2:
        return float("nan")
    mx, my = (n - 1) / 2, sum(ys) / n
    sxx = sum((i - mx) ** 2 for i in range(n))
    return sum((i - mx) * (y - my) for i, y in enumerate(ys)) / sxx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default=None, help="also write every sample here (JSON)")
    ap.add_argument("--max-slope", type=float, default=0.5,
                    help="MiB/step above which a process counts as growing")
    ap.add_argument("--quick", action="store_true", help="4 steps (the least with a slope)")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    if a.quick:
        a.steps = 4
    if a.steps < 4:
        ap.error("--steps must be >= 4")

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from hydra import compose, initialize_config_dir

    from mmagent_rl.config import register
    from mmagent_rl.trainer import Trainer

    register()
    run_dir = tempfile.mkdtemp(prefix="mmagent_soak_")
    with initialize_config_dir(os.path.join(REPO, "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["+algo=grpo", f"trainer.total_steps={a.steps}",
                                           "trainer.save_final=false",
                                           "trainer.progress=false", *a.overrides])
    t0 = time.perf_counter()
    trainer = Trainer(cfg, run_dir)
    startup = time.perf_counter() - t0
    root = psutil.Process()
    samples: list[dict[str, float]] = []
    step_times = []
    try:
        labels = actor_pids(trainer)
        for step in range(a.steps):
            t = time.perf_counter()
            m = trainer.train_step()
            step_times.append(time.perf_counter() - t)
            samples.append(sample(root, labels))
            total = sum(samples[-1].values())
            print(f"step {step + 1}/{a.steps}: {step_times[-1]:.1f} s, reward "
                  f"{m['reward/mean']:.3f}, RSS sum {total:.0f} MiB", flush=True)
    finally:
        trainer.shutdown()
        import ray

        ray.shutdown()

    half = samples[len(samples) // 2:]
    procs = {}
    for key in sorted({k for s in samples for k in s}):
        series = [s[key] for s in half if key in s]
        if len(series) < max(2, len(half) // 2):
            continue  # short-lived (e.g. an idle worker that came and went)
        first = next(s[key] for s in samples if key in s)
        procs[key] = {"rss_first_mib": round(first, 1), "rss_last_mib": round(series[-1], 1),
                      "slope_mib_per_step": round(slope(series), 4)}
    totals = [sum(v for k, v in s.items() if k in procs) for s in half]
    width = max(len(k) for k in procs)
    print(f"\n{'process':<{width}}  first MiB  last MiB  MiB/step (steps "
          f"{len(samples) - len(half) + 1}-{len(samples)})")
    for k, v in sorted(procs.items(), key=lambda kv: -kv[1]["rss_last_mib"]):
        print(f"{k:<{width}}  {v['rss_first_mib']:9.1f}  {v['rss_last_mib']:8.1f}  "
              f"{v['slope_mib_per_step']:+.4f}")
    growing = sorted(k for k, v in procs.items() if v["slope_mib_per_step"] > a.max_slope)
    result = {"steps": a.steps, "fit_steps": [len(samples) - len(half) + 1, len(samples)],
              "max_slope_mib_per_step": a.max_slope, "flat": not growing,
              "growing": growing,
              "startup_s": round(startup, 1),
              "step_s_median": round(sorted(step_times)[len(step_times) // 2], 2),
              "total_slope_mib_per_step": round(slope(totals), 4),
              "processes": procs, "run_dir": run_dir}
    if a.out:
        with open(a.out, "w") as f:
            json.dump({**result, "samples": samples, "step_times": step_times}, f)
    print(json.dumps(result))
    return 0 if not growing else 1


if __name__ == "__main__":
    sys.exit(main())
