"""The figures of ``python -m mmagent_rl.report`` (matplotlib, Agg backend, PNG files).

- ``eval_vs_step.png`` / ``eval_vs_time.png``: held-out ``eval/pass@1`` against the step
  and against wall time (``time/elapsed``), one line per algorithm: the mean over its
  seeds, a band from the lowest to the highest seed, a marker at each evaluation.
- One figure per training metric (``CURVES``): a centred moving average over
  ``SMOOTH_WINDOW`` logged steps as a solid line, the per-step values faint behind it;
  one line per algorithm (mean over seeds at each step), or one per run when all runs
  share an algorithm. The accuracy figure also marks the held-out pass@1 points.
"""
from __future__ import annotations

import os
from collections import defaultdict
from statistics import mean

# (figure file stem, metric key, y-axis label). Every metric gets its own figure.
CURVES = [
    ("reward", "reward/mean", "reward (mean)"),
    ("accuracy", "acc/mean", "accuracy"),
    ("tool_use_rate", "tool/use_rate", "tool-use rate"),
    ("all_wrong_rate", "tool/all_wrong_rate", "all-wrong rate (tool users)"),
    ("collapse_alarm", "tool/collapse_alarm", "tool-collapse alarm"),
    ("loss", "loss", "loss"),
    ("grad_norm", "grad_norm", "gradient norm"),
    ("grad_variance", "grad/variance", "gradient variance"),
    ("alignment", "mapo/alignment", "MAPO alignment"),
    ("alignment_reward_corr", "mapo/alignment_reward_corr", "corr(alignment, reward)"),
    ("kl_prcp", "papo/kl_prcp", "PAPO perception KL"),
    ("axpo_triggered", "axpo/triggered_prompts", "AXPO triggered prompts"),
    ("axpo_recovery", "axpo/recovery_rate", "AXPO recovery rate"),
    ("kl", "kl", "KL to reference"),
    ("time_generate", "time/generate", "generate (s)"),
    ("time_score", "time/score", "score (s)"),
    ("time_learn", "time/learn", "learn (s)"),
    ("time_sync", "time/sync", "sync (s)"),
    ("time_axpo", "time/axpo", "AXPO round (s)"),
    ("time_step", "time/step", "step (s)"),
]
SMOOTH_WINDOW = 5  # logged steps; centred, so the smoothed line does not lag the raw one
RAW_ALPHA = 0.25
EVAL_KEY = "eval/pass@1"


def smooth(ys: list[float], window: int = SMOOTH_WINDOW) -> list[float]:
    """Centred moving average; the window shrinks at both ends (no padding)."""
    half = window // 2
    return [mean(ys[max(0, i - half):i + half + 1]) for i in range(len(ys))]


def across_runs(series: list[tuple[list, list[float]]]):
    """(xs, mean, min, max) over runs of [(xs, ys)] aligned on equal x (the step, or
    the eval index); a point is the mean of the runs that have it."""
    at = defaultdict(list)
    for xs, ys in series:
        for x, y in zip(xs, ys):
            at[x].append(y)
    xs = sorted(at)
    return xs, [mean(at[x]) for x in xs], [min(at[x]) for x in xs], [max(at[x]) for x in xs]


def eval_curve(runs, by_time: bool = False):
    """Held-out pass@1 over the runs (seeds) of one algorithm: (xs, mean, min, max).
    By step: the runs' eval steps. By time: the seeds are aligned by eval index (they
    evaluate at the same steps) and x is their mean ``time/elapsed`` in minutes; a run
    with an eval row that lacks ``time/elapsed`` (older runs) is left out."""
    if not by_time:
        return across_runs([r.series(EVAL_KEY) for r in runs])
    timed = [r.eval_rows for r in runs
             if r.eval_rows and all("time/elapsed" in row for row in r.eval_rows)]
    if not timed:
        return [], [], [], []
    idx, minutes, _, _ = across_runs(
        [(range(len(rows)), [row["time/elapsed"] / 60 for row in rows]) for rows in timed])
    _, ys, lo, hi = across_runs(
        [(range(len(rows)), [row[EVAL_KEY] for row in rows]) for rows in timed])
    return minutes, ys, lo, hi


def _lines(groups: dict[str, list]) -> list[tuple[str, list]]:
    """(legend, runs) per line: per algorithm, or per run when there is one algorithm
    (then the seeds are worth seeing one by one)."""
    if len(groups) > 1:
        return [(f"{algo} (n={len(rs)})", rs) for algo, rs in groups.items()]
    return [(r.legend, [r]) for rs in groups.values() for r in rs]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, ax, out: str, stem: str) -> None:
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(os.path.join(out, stem + ".png"), dpi=100)


def plot_eval(groups: dict[str, list], out: str) -> list[tuple[str, str]]:
    """eval_vs_step.png and eval_vs_time.png when any run has eval rows (and elapsed
    times, for the second); returns [(stem, title)] written."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    colors = plt.get_cmap("tab10")
    written = []
    for stem, by_time, x, xlabel in (
            ("eval_vs_step", False, "step", "step"),
            ("eval_vs_time", True, "wall time", "wall time (min, mean over seeds)")):
        curves = [(i, algo, eval_curve(rs, by_time)) for i, (algo, rs)
                  in enumerate(groups.items())]
        curves = [c for c in curves if c[2][0]]
        if not curves:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for i, algo, (xs, ys, lo, hi) in curves:  # an algorithm keeps its colour
            n = len(groups[algo])
            ax.plot(xs, ys, color=colors(i % 10), marker="o", markersize=4,
                    label=f"{algo} (mean of {n} seed{'s' * (n > 1)})")
            ax.fill_between(xs, lo, hi, color=colors(i % 10), alpha=0.2, linewidth=0)
        if not by_time:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        title = f"held-out pass@1 vs {x} (band: min-max over seeds)"
        ax.set(xlabel=xlabel, ylabel="held-out pass@1", title=title)
        _save(fig, ax, out, stem)
        plt.close(fig)
        written.append((stem, title))
    return written


def plot_training(groups: dict[str, list], out: str) -> list[tuple[str, str]]:
    """One PNG per CURVES metric that at least one run logged; returns [(stem, key)]."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    colors = plt.get_cmap("tab10")
    lines = _lines(groups)
    per = "mean over seeds per algorithm" if len(groups) > 1 else "per run"
    written = []
    for stem, key, ylabel in CURVES:
        drawn = [(i, label, rs, across_runs([r.series(key) for r in rs]))
                 for i, (label, rs) in enumerate(lines)]
        drawn = [d for d in drawn if d[3][0]]  # the step-0 eval row has no training keys
        if not drawn:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for i, label, rs, (xs, ys, _, _) in drawn:  # a line keeps its colour
            color = colors(i % 10)
            ax.plot(xs, ys, color=color, alpha=RAW_ALPHA, linewidth=1)
            ax.plot(xs, smooth(ys), color=color, label=label,
                    marker="o" if len(xs) < 20 else None, markersize=3)
            if key == "acc/mean":
                ex, ey, _, _ = eval_curve(rs)
                ax.plot(ex, ey, color=color, linestyle="none", marker="D", markersize=6,
                        markeredgecolor="black")
        if key == "acc/mean":  # one legend entry for the markers of every line
            ax.plot([], [], color="gray", linestyle="none", marker="D",
                    markeredgecolor="black", label="held-out pass@1")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel="step", ylabel=ylabel,
               title=f"{key} ({per}; solid: {SMOOTH_WINDOW}-step moving avg, faint: raw)")
        ax.title.set_fontsize("small")
        _save(fig, ax, out, stem)
        plt.close(fig)
        written.append((stem, key))
    return written
