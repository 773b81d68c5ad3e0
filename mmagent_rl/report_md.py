"""report.md and report.json: the tables of mmagent_rl/report.py's summaries."""
from __future__ import annotations

import json
import os

from mmagent_rl.report import (
    COMPARISON, EVAL_KEYS, MECHANISM_COLUMNS, MISSING, TABLE, Run, _is_number,
)
from mmagent_rl.report_plots import CURVES, SMOOTH_WINDOW


def _fmt(v) -> str:
    if v is None:
        return MISSING
    if _is_number(v):
        return str(v) if isinstance(v, int) else f"{v:.4g}"
    return str(v).replace("|", "\\|")


def _pm(value: float | None, spread: float | None) -> str:
    """``value ± spread``, or the value alone when there is no spread."""
    if value is None or spread is None:
        return _fmt(value)
    return f"{_fmt(value)} ± {_fmt(spread)}"


def _agg_cell(agg: dict | None, group_size: int) -> str:
    """mean ± std; (n=...) when only some of the algorithm's runs logged the figure."""
    if agg is None:
        return MISSING
    cell = _pm(agg["mean"], agg["std"])
    return cell if agg["n"] == group_size else f"{cell} (n={agg['n']})"


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return lines


def _comparison_md(comp: dict[str, dict]) -> list[str]:
    seeds = lambda c: ", ".join(_fmt(s) for s in c["seeds"])  # noqa: E731
    md = ["## Comparison by algorithm", "",
          "Mean ± sample standard deviation over seeds (n runs; `(n=...)` when only some "
          "runs logged the figure). Held-out pass@1/pass@k *before* and *after* are the "
          "first and last evaluations of each run (normally step 0 and the last step), "
          "*gain* = after - before per run; tool use and all-wrong are means over the "
          "training steps, box hit is the last evaluation's, step s the run's median "
          f"`time/step`. {MISSING} = not logged.", ""]
    md += _table(["algo", "n", "seeds"] + [h for h, _ in COMPARISON],
                 [[algo, c["n"], seeds(c)] + [_agg_cell(c["metrics"][k], c["n"])
                                              for _, k in COMPARISON]
                  for algo, c in comp.items()])
    ks = sorted({k for c in comp.values() if c["metrics"]["k"]
                 for k in c["metrics"]["k"]["values"]})
    if ks:
        md += ["", "pass@k with k = " + ", ".join(_fmt(int(k)) for k in ks) + "."]
    md += ["", "## Mechanisms by algorithm", "",
           "Mean ± std over seeds of each run's mean over its training steps (`_first`/"
           f"`_last`: the run's first and last logged value). {MISSING} = the algorithm "
           "does not log it.", ""]
    md += _table(["algo", "n"] + MECHANISM_COLUMNS,
                 [[algo, c["n"]] + [_agg_cell(c["metrics"][name], c["n"])
                                    for name in MECHANISM_COLUMNS]
                  for algo, c in comp.items()])
    return md


def _per_run_md(runs: list[Run]) -> list[str]:
    md = ["## Runs: held-out evaluation", "",
          "pass@1 ± its standard error over the eval examples (`eval/pass@1_se`).", ""]
    rows = []
    for r in runs:
        s, evals = r.summary, r.eval_rows
        steps = f"{evals[0]['step']}→{evals[-1]['step']}" if evals else None
        rows.append([r.label, r.algo, r.seed, r.train_steps, steps,
                     _pm(s["pass@1_before"], s["pass@1_before_se"]),
                     _pm(s["pass@1_after"], s["pass@1_after_se"]), s["pass@1_gain"],
                     s["pass@k_before"], s["pass@k_after"], s["box_hit_after"],
                     s["tool_use_rate"], s["all_wrong_rate"], s["step_s_median"],
                     s["wall_min"]])
    md += _table(["run", "algo", "seed", "steps", "eval steps", "pass@1 before",
                  "pass@1 after", "gain", "pass@k before", "pass@k after", "box hit after",
                  "tool use", "all-wrong", "step s (median)", "wall min"], rows)
    md += ["", "## Runs: training", "",
           f"`final` is the last logged value, `mean` the mean over all logged steps; "
           f"{MISSING} = not logged by that run.", ""]
    md += _table(["run", "algo", "seed", "model", "steps", "skipped lines"]
                 + [h for h, _, _ in TABLE],
                 [[r.label, r.algo, r.seed, r.model, r.train_steps, r.bad_lines]
                  + [r.stat(k, how) for _, k, how in TABLE] for r in runs])
    for attr, what in (("bad_lines", "Malformed lines in metrics.jsonl were skipped"),
                       ("repeated_steps", "Steps logged again (a resumed run; the last "
                                          "record is kept)")):
        hit = [r for r in runs if getattr(r, attr)]
        if hit:
            md += ["", f"{what}: " + ", ".join(f"`{r.label}`: {getattr(r, attr)}"
                                               for r in hit) + "."]
    evals = [r for r in runs if r.eval]
    if evals:
        md += ["", "## Eval (eval.json)", ""]
        md += _table(["run"] + EVAL_KEYS, [[r.label] + [r.eval.get(k) for k in EVAL_KEYS]
                                           for r in evals])
    return md


def write_markdown(runs: list[Run], comp: dict[str, dict], eval_figs: list[tuple[str, str]],
                   figures: list[tuple[str, str]], out: str) -> str:
    md = ["# Run report", "", f"{len(runs)} run(s) of {len(comp)} algorithm(s): "
          + ", ".join(f"{a} ({c['n']})" for a, c in comp.items()) + ".", ""]
    md += _comparison_md(comp)
    if eval_figs:
        md += ["", "## Held-out pass@1", ""]
        for stem, title in eval_figs:
            md += [f"![{title}]({stem}.png)", ""]
    md += [""] + _per_run_md(runs)
    md += ["", "## Curves", "",
           f"Solid: centred moving average over {SMOOTH_WINDOW} logged steps; faint: the "
           "per-step values. One line per algorithm (mean over its seeds at each step), "
           "or per run when all runs share an algorithm. The accuracy figure marks the "
           "held-out pass@1.", ""]
    for stem, key in figures:
        md += [f"### {key}", "", f"![{key}]({stem}.png)", ""]
    absent = [key for _, key, _ in CURVES if key not in {k for _, k in figures}]
    if absent:
        md += ["Not logged by any run: " + ", ".join(f"`{k}`" for k in absent) + "."]
    md += ["", "## Run folders", ""] + [f"- `{r.label}`: {r.path}" for r in runs]
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(md) + "\n")
    return path


def write_json(runs: list[Run], comp: dict[str, dict], out: str) -> str:
    """report.json: {"algorithms": compare(), "runs": [per run summary]}."""
    data = {"algorithms": comp,
            "runs": [{"label": r.label, "path": r.path, "algo": r.algo, "seed": r.seed,
                      "model": r.model, "steps": r.train_steps, "bad_lines": r.bad_lines,
                      "repeated_steps": r.repeated_steps, "summary": r.summary}
                     for r in runs]}
    path = os.path.join(out, "report.json")
    with open(path, "w") as f:
        json.dump(data, f, indent=1, allow_nan=False)  # every figure is finite or None
    return path
