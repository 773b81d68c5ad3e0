"""Every bench script runs in its --quick mode and ends with its JSON line, so none can
rot unnoticed. The figures of a quick run mean nothing; only that each part ran and
reported is checked. The benches run two at a time (each has its own local Ray; most of
a quick run is start-up latency, so the pair shares the 2 cores well)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# bench -> keys of its last line that must be finite numbers; longest first (the pool
# then finishes close together)
BENCHES = {
    "vs_trl": ["vs_trl_ratio_tiny"],
    "algo_cost": ["papo_step_ratio", "papo_learn_ratio", "papo_peak_rss_ratio",
                  "align_pairs_per_s", "grad_variance_ratio_mapo_grpo"],
    "chaos": ["wall_ratio_chaos_vs_clean"],
    "axpo_cost": ["axpo_round_ratio", "prefix_cache_saving"],
    "scaling": ["slope_group_size", "slope_turns", "slope_resolution"],
    "weight_sync": ["sync_to_copy_ratio", "sync_step_share", "sync_to_copy_ratio_transfer",
                    "sync_to_copy_ratio_object_store", "sync_over_floor_transfer"],
    "overhead": ["overhead_ratio", "overhead_ratio_with_ref_and_optim"],
    "overlap": ["overlap_speedup", "heldout_gain_sync", "heldout_gain_overlap"],
    "soak": ["max_slope_mib_per_step", "step_s_median"],
    "step_breakdown": ["overhead_ratio", "time_step", "pure_generate_s"],
    "demo_memory": ["demo_peak_rss_gib", "demo_peak_pss_gib"],
}


def _run(bench: str) -> subprocess.CompletedProcess:
    # vs_trl runs against TRL in its own venv, which `make bench-trl` installs
    cmd = (["make", "-s", "bench-trl", "BENCH_ARGS=--quick"] if bench == "vs_trl"
           else [sys.executable, f"bench/{bench}.py", "--quick"])
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1500)


def _problems(bench: str, p: subprocess.CompletedProcess) -> list[str]:
    # soak exits 1 when a process grows, which 4 steps cannot tell from noise
    if p.returncode not in ((0, 1) if bench == "soak" else (0,)):
        return [f"exit {p.returncode}: {p.stdout[-1500:]} {p.stderr[-2500:]}"]
    try:
        last = json.loads(p.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError) as e:
        return [f"no JSON last line ({e}): {p.stdout[-1500:]}"]
    bad = [f"{k}={last.get(k)!r}" for k in BENCHES[bench]
           if not isinstance(last.get(k), (int, float)) or not math.isfinite(last[k])]
    if bench == "chaos" and not (last["completed"] and last["faults_injected"] == 2
                                 and last["identical_to_clean"]):
        bad.append(f"chaos: {last}")
    if bench == "soak" and not (last["steps"] == 4 and last["processes"]):
        bad.append(f"soak: {last}")
    if bench == "weight_sync" and last["failed_sizes"] != {}:
        bad.append(f"weight_sync failed sizes: {last['failed_sizes']}")
    return bad


@pytest.mark.slow
def test_every_bench_quick_mode_runs_and_reports():
    benches = sorted(os.path.splitext(f)[0] for f in os.listdir(os.path.join(REPO, "bench"))
                     if f.endswith(".py") and f != "common.py")
    assert sorted(BENCHES) == benches, "a bench without a quick run here"
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(BENCHES, pool.map(_run, BENCHES)))
    problems = {b: _problems(b, p) for b, p in results.items()}
    assert not any(problems.values()), {b: v for b, v in problems.items() if v}
