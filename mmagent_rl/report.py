"""Curves and a comparison table for finished (or running) runs.

    python -m mmagent_rl.report DIR... [--out OUTDIR]

Every folder under the given dirs that holds a ``metrics.jsonl`` is a run (a single
run dir, ``outputs/``, a Hydra ``multirun/`` sweep...). For each run it reads
``metrics.jsonl`` (a malformed line is skipped and counted, so a run that crashed
mid-write still plots), ``config.yaml`` (algo, seed, model) and ``eval.json`` when
present. It writes one PNG per metric (one line per run; runs without the metric are
left out of that figure) and ``report.md`` with the comparison tables.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from statistics import mean

# (figure file stem, metric key, y-axis label). Every metric gets its own figure.
CURVES = [
    ("reward", "reward/mean", "reward (mean)"),
    ("accuracy", "acc/mean", "accuracy"),
    ("tool_use_rate", "tool/use_rate", "tool-use rate"),
    ("all_wrong_rate", "tool/all_wrong_rate", "all-wrong rate (tool users)"),
    ("alignment", "mapo/alignment", "MAPO alignment"),
    ("kl", "kl", "KL to reference"),
    ("time_generate", "time/generate", "generate (s)"),
    ("time_score", "time/score", "score (s)"),
    ("time_learn", "time/learn", "learn (s)"),
    ("time_sync", "time/sync", "sync (s)"),
    ("time_axpo", "time/axpo", "AXPO round (s)"),
    ("time_step", "time/step", "step (s)"),
]
# Training table columns: (header, metric key, "final" | "mean").
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
EVAL_KEYS = ["accuracy", "pass@1", "pass@k", "k", "tool_call_rate", "format_rate",
             "box_hit_rate", "n_examples"]
MISSING = "-"


@dataclass
class Run:
    path: str
    label: str = ""
    rows: list[dict] = field(default_factory=list)
    bad_lines: int = 0
    algo: str | None = None
    seed: int | None = None
    model: str | None = None
    eval: dict | None = None

    @property
    def legend(self) -> str:
        tags = [t for t in (self.algo, None if self.seed is None else f"seed {self.seed}") if t]
        return f"{self.label} ({', '.join(tags)})" if tags else self.label

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(steps, values) of a numeric metric; rows without it are skipped."""
        xs, ys = [], []
        for i, r in enumerate(self.rows):
            v = r.get(key)
            if _is_number(v):
                step = r.get("step")
                xs.append(step if _is_number(step) else i + 1)
                ys.append(float(v))
        return xs, ys

    def stat(self, key: str, how: str) -> float | None:
        vals = [v for v in self.series(key)[1] if math.isfinite(v)]
        if not vals:
            return None
        return vals[-1] if how == "final" else mean(vals)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


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
    """Rows of a metrics.jsonl and the number of malformed (non-JSON-object) lines.
    Blank lines are not counted."""
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
            if isinstance(row, dict):
                rows.append(row)
            else:
                bad += 1
    return rows, bad


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


def load_run(run_dir: str) -> Run:
    run = Run(path=run_dir)
    run.rows, run.bad_lines = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    cfg = _read_config(run_dir)
    section = lambda k: cfg.get(k) if isinstance(cfg.get(k), dict) else {}  # noqa: E731
    run.algo = section("algo").get("name") or None
    run.seed = section("trainer").get("seed")
    run.model = section("model").get("name")
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


# ---- writing ----------------------------------------------------------------------
def plot_curves(runs: list[Run], out: str) -> list[tuple[str, str]]:
    """One PNG per metric that at least one run has; returns [(stem, key)] written."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    colors = plt.get_cmap("tab10")
    written = []
    for stem, key, ylabel in CURVES:
        lines = [(i, r, *r.series(key)) for i, r in enumerate(runs)]
        lines = [ln for ln in lines if ln[2]]
        if not lines:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for i, r, xs, ys in lines:  # a run keeps its colour in every figure
            ax.plot(xs, ys, label=r.legend, color=colors(i % 10),
                    marker="o" if len(xs) < 20 else None, markersize=3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(os.path.join(out, stem + ".png"), dpi=100)
        plt.close(fig)
        written.append((stem, key))
    return written


def _fmt(v) -> str:
    if v is None:
        return MISSING
    if _is_number(v):
        return str(v) if isinstance(v, int) else f"{v:.4g}"
    return str(v).replace("|", "\\|")


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return lines


def write_markdown(runs: list[Run], figures: list[tuple[str, str]], out: str) -> str:
    md = ["# Run report", ""]
    md.append(f"{len(runs)} run(s). `final` is the last logged value, `mean` the mean "
              f"over all logged steps; {MISSING} = not logged by that run.")
    md += [""]
    md += _table(["run", "algo", "seed", "model", "steps", "skipped lines"]
                 + [h for h, _, _ in TABLE],
                 [[r.label, r.algo, r.seed, r.model, len(r.rows), r.bad_lines]
                  + [r.stat(k, how) for _, k, how in TABLE] for r in runs])
    bad = [r for r in runs if r.bad_lines]
    if bad:
        md += ["", "Malformed lines in metrics.jsonl were skipped: "
               + ", ".join(f"`{r.label}`: {r.bad_lines}" for r in bad) + "."]
    evals = [r for r in runs if r.eval]
    if evals:
        md += ["", "## Eval (eval.json)", ""]
        md += _table(["run"] + EVAL_KEYS, [[r.label] + [r.eval.get(k) for k in EVAL_KEYS]
                                           for r in evals])
    md += ["", "## Curves", ""]
    for stem, key in figures:
        md += [f"### {key}", "", f"![{key}]({stem}.png)", ""]
    absent = [key for _, key, _ in CURVES if key not in {k for _, k in figures}]
    if absent:
        md += ["Not logged by any run: " + ", ".join(f"`{k}`" for k in absent) + "."]
    md += ["", "## Runs", ""] + [f"- `{r.label}`: {r.path}" for r in runs]
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(md) + "\n")
    return path


def report(dirs: list[str], out: str) -> list[Run]:
    runs = load_runs(dirs)
    if not runs:
        raise SystemExit(f"no metrics.jsonl found under {', '.join(dirs)}")
    os.makedirs(out, exist_ok=True)
    figures = plot_curves(runs, out)
    write_markdown(runs, figures, out)
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
