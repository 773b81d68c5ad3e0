"""Comparison tables and curves for finished (or running) runs and Hydra sweeps.

    python -m mmagent_rl.report DIR... [--out OUTDIR]

Every folder under the given dirs that holds a ``metrics.jsonl`` is a run (a single
run dir, ``outputs/``, a Hydra ``multirun/`` sweep...). For each run it reads
``metrics.jsonl`` (a malformed line is skipped and counted, so a run that crashed
mid-write still plots; a step logged twice, as by a resumed run, keeps its last
record), ``config.yaml`` (algo, seed, model) and ``eval.json`` when present.

Runs are grouped by algorithm (``algo.name``), the runs of a group being its seeds.
OUTDIR receives ``report.md`` (per algorithm: mean ± std over seeds of the held-out
pass@1/pass@k before and after training, tool use, step time and the mechanism
figures; per run tables), ``report.json`` (the same figures, for scripts) and the PNG
figures of report_plots.py.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from functools import cached_property
from statistics import mean, median, stdev

from mmagent_rl.report_plots import plot_eval, plot_training

# Per-run training table columns: (header, metric key, how: a key of REDUCE).
TABLE = [
    ("reward final", "reward/mean", "final"),
    ("reward mean", "reward/mean", "mean"),
    ("acc final", "acc/mean", "final"),
    ("acc mean", "acc/mean", "mean"),
    ("tool use final", "tool/use_rate", "final"),
    ("all-wrong final", "tool/all_wrong_rate", "final"),
    ("alignment final", "mapo/alignment", "final"),
    ("kl final", "kl", "final"),
    ("step s (mean)", "time/step", "mean"),
]
# Comparison table columns: (header, key of summarize()'s result).
COMPARISON = [
    ("pass@1 before", "pass@1_before"),
    ("pass@1 after", "pass@1_after"),
    ("gain", "pass@1_gain"),
    ("pass@k before", "pass@k_before"),
    ("pass@k after", "pass@k_after"),
    ("tool use", "tool_use_rate"),
    ("all-wrong", "all_wrong_rate"),
    ("box hit after", "box_hit_after"),
    ("step s (median)", "step_s_median"),
]
# Mechanism figures, one number per run: (name in tables and report.json, key, how).
MECHANISMS = [
    ("mapo/alignment", "mapo/alignment", "mean"),
    ("mapo/alignment_reward_corr", "mapo/alignment_reward_corr", "mean"),
    ("papo/kl_prcp", "papo/kl_prcp", "mean"),
    ("papo/kl_prcp_first", "papo/kl_prcp", "first"),
    ("papo/kl_prcp_last", "papo/kl_prcp", "final"),
    ("axpo/triggered_prompts", "axpo/triggered_prompts", "mean"),
    ("axpo/recovery_rate", "axpo/recovery_rate", "mean"),
    ("grad/variance", "grad/variance", "mean"),
    # step 1: runs with the same seed train on the same batch there (same data order and
    # sampling from the same weights), so this compares the algorithms on equal batches
    ("grad/variance_step1", "grad/variance", "first"),
]
# The mechanism table's columns: the figures above, then the held-out evals' cost.
MECHANISM_COLUMNS = [name for name, _, _ in MECHANISMS] + ["eval share of wall"]
REDUCE = {"first": lambda v: v[0], "final": lambda v: v[-1], "mean": mean, "median": median}
EVAL_KEYS = ["accuracy", "pass@1", "pass@k", "k", "tool_call_rate", "format_rate",
             "box_hit_rate", "n_examples"]
MISSING = "—"


@dataclass
class Run:
    path: str
    label: str = ""
    rows: list[dict] = field(default_factory=list)  # one per step, in step order
    bad_lines: int = 0
    repeated_steps: int = 0  # records replaced by a later one for the same step
    algo: str | None = None
    seed: int | None = None
    model: str | None = None
    eval: dict | None = None

    @property
    def legend(self) -> str:
        tags = [t for t in (self.algo, None if self.seed is None else f"seed {self.seed}") if t]
        return f"{self.label} ({', '.join(tags)})" if tags else self.label

    @property
    def train_steps(self) -> int:
        return sum(1 for r in self.rows if r["step"] > 0)  # step 0: the eval before training

    @property
    def eval_rows(self) -> list[dict]:
        """Rows with a held-out evaluation: step 0 (before training) and the eval steps."""
        return [r for r in self.rows if _is_number(r.get("eval/pass@1"))]

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of a numeric metric; rows without it are skipped."""
        pairs = [(r["step"], float(r[key])) for r in self.rows if _is_number(r.get(key))]
        return [s for s, _ in pairs], [v for _, v in pairs]

    def stat(self, key: str, how: str) -> float | None:
        vals = [v for v in self.series(key)[1] if math.isfinite(v)]
        return REDUCE[how](vals) if vals else None

    @cached_property
    def summary(self) -> dict[str, float | None]:
        return summarize(self)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _num(row: dict, key: str) -> float | None:
    v = row.get(key)
    return float(v) if _is_number(v) and math.isfinite(v) else None


# ---- reading ----------------------------------------------------------------------
def find_runs(dirs: list[str]) -> list[str]:
    found = set()
    for d in dirs:
        for root, subdirs, files in os.walk(d):
            subdirs[:] = sorted(s for s in subdirs if s not in ("checkpoints", ".hydra"))
            if "metrics.jsonl" in files:
                found.add(os.path.abspath(root))
    return sorted(found)


def read_metrics(path: str) -> tuple[list[dict], int]:
    """Records of a metrics.jsonl, in file order, and the number of malformed lines
    (not a JSON object with a numeric ``step``). Blank lines are not counted."""
    rows, bad = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if isinstance(row, dict) and _is_number(row.get("step")):
                rows.append(row)
            else:
                bad += 1
    return rows, bad


def last_per_step(rows: list[dict]) -> tuple[list[dict], int]:
    """One record per step, by step: a resumed run may log a step again, and the later
    record is the one the run continued from. Also returns how many were replaced."""
    by_step = {}
    for r in rows:
        by_step[r["step"]] = r
    return [by_step[s] for s in sorted(by_step)], len(rows) - len(by_step)


def _read_config(run_dir: str) -> dict:
    """launch.py writes config.yaml in the run dir; Hydra keeps a copy in .hydra/."""
    import yaml

    for name in ("config.yaml", os.path.join(".hydra", "config.yaml")):
        p = os.path.join(run_dir, name)
        if os.path.isfile(p):
            try:
                with open(p) as f:
                    cfg = yaml.safe_load(f)
                return cfg if isinstance(cfg, dict) else {}
            except (OSError, yaml.YAMLError):
                return {}
    return {}


def config_value(cfg: dict, key: str):
    """The dotted ``key`` of a config. Older launch.py wrote interpolations unresolved
    (``trainer.seed: ${seed}``): such a value is resolved with OmegaConf. Key by key,
    because a whole-config resolve fails on any key that needs Hydra's resolvers
    (``${now:...}``); if this key does not resolve either, its raw text is returned."""
    value = cfg
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if not (isinstance(value, str) and "${" in value):
        return value
    from omegaconf import OmegaConf

    try:
        return OmegaConf.select(OmegaConf.create(cfg), key)
    except Exception:  # noqa: BLE001 - any OmegaConf error: show what the file says
        return value


def load_run(run_dir: str) -> Run:
    run = Run(path=run_dir)
    rows, run.bad_lines = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    run.rows, run.repeated_steps = last_per_step(rows)
    cfg = _read_config(run_dir)
    run.algo = config_value(cfg, "algo.name") or None
    seed = config_value(cfg, "trainer.seed")  # what the trainer used; a sweep sets `seed`
    run.seed = config_value(cfg, "seed") if seed is None else seed
    run.model = config_value(cfg, "model.name")
    ev = os.path.join(run_dir, "eval.json")
    if os.path.isfile(ev):
        try:
            with open(ev) as f:
                data = json.load(f)
            run.eval = data if isinstance(data, dict) else None
        except ValueError:
            run.eval = None
    return run


def load_runs(dirs: list[str]) -> list[Run]:
    runs = [load_run(p) for p in find_runs(dirs)]
    # Labels: paths relative to the runs' common parent, so they are short and unique.
    if len(runs) == 1:
        runs[0].label = os.path.basename(runs[0].path) or runs[0].path
    elif runs:
        common = os.path.commonpath([r.path for r in runs])
        for r in runs:
            r.label = os.path.relpath(r.path, common)
    return runs


# ---- figures per run and per algorithm -------------------------------------------
def summarize(run: Run) -> dict[str, float | None]:
    """A run's figures (None: not logged). Before/after are the first and the last
    eval rows (normally step 0 and the final step); with one eval there is no after."""
    evals = run.eval_rows
    before = evals[0] if evals else {}
    after = evals[-1] if len(evals) > 1 else {}
    elapsed = run.stat("time/elapsed", "final")
    s = {
        "pass@1_before": _num(before, "eval/pass@1"),
        "pass@1_before_se": _num(before, "eval/pass@1_se"),
        "pass@1_after": _num(after, "eval/pass@1"),
        "pass@1_after_se": _num(after, "eval/pass@1_se"),
        "pass@1_gain": None,
        "pass@k_before": _num(before, "eval/pass@k"),
        "pass@k_after": _num(after, "eval/pass@k"),
        "k": _num(after or before, "eval/k"),
        "box_hit_after": _num(after, "eval/box_hit_rate"),
        "tool_use_rate": run.stat("tool/use_rate", "mean"),
        "all_wrong_rate": run.stat("tool/all_wrong_rate", "mean"),
        "step_s_median": run.stat("time/step", "median"),
        "wall_min": None if elapsed is None else elapsed / 60,
    }
    if s["pass@1_before"] is not None and s["pass@1_after"] is not None:
        s["pass@1_gain"] = s["pass@1_after"] - s["pass@1_before"]
    s.update({name: run.stat(key, how) for name, key, how in MECHANISMS})
    # the held-out evals' share of the run's wall time (time/elapsed at the last row)
    eval_s = run.series("eval/time_s")[1]
    s["eval share of wall"] = sum(eval_s) / elapsed if eval_s and elapsed else None
    return s


def group_by_algo(runs: list[Run]) -> dict[str, list[Run]]:
    """{algo: its runs, by seed}, algorithms in order of first appearance."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.algo or "?", []).append(r)
    for rs in groups.values():  # numeric seeds first (10 after 2), then any others
        rs.sort(key=lambda r: (0, r.seed) if _is_number(r.seed) else (1, str(r.seed)))
    return groups


def aggregate(values: list[float | None]) -> dict | None:
    """Mean and sample standard deviation (n - 1; None for one value) over the runs
    that have the figure; None when none has it."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"mean": mean(vals), "std": stdev(vals) if len(vals) > 1 else None,
            "n": len(vals), "values": vals}


def compare(groups: dict[str, list[Run]]) -> dict[str, dict]:
    """Per algorithm: its runs and every summarize() figure aggregated over them."""
    return {algo: {"n": len(rs), "seeds": [r.seed for r in rs],
                   "runs": [r.label for r in rs],
                   "metrics": {k: aggregate([r.summary[k] for r in rs])
                               for k in rs[0].summary}}
            for algo, rs in groups.items()}


def report(dirs: list[str], out: str) -> list[Run]:
    runs = load_runs(dirs)
    if not runs:
        raise SystemExit(f"no metrics.jsonl found under {', '.join(dirs)}")
    from mmagent_rl.report_md import write_json, write_markdown

    os.makedirs(out, exist_ok=True)
    groups = group_by_algo(runs)
    comp = compare(groups)
    write_markdown(runs, comp, plot_eval(groups, out), plot_training(groups, out), out)
    write_json(runs, comp, out)
    return runs


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mmagent_rl.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+", help="run dirs or folders that contain run dirs")
    p.add_argument("--out", default=None, help="output folder (default: DIR/report of "
                   "the first DIR)")
    a = p.parse_args(argv)
    missing = [d for d in a.dirs if not os.path.isdir(d)]
    if missing:
        raise SystemExit(f"not a folder: {', '.join(missing)}")
    out = a.out or os.path.join(a.dirs[0], "report")
    runs = report(a.dirs, out)
    bad = sum(r.bad_lines for r in runs)
    print(f"{len(runs)} run(s), {bad} malformed line(s) skipped -> "
          f"{os.path.join(out, 'report.md')}", file=sys.stderr)


if __name__ == "__main__":
    main()
