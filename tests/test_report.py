"""python -m mmagent_rl.report on hand-written runs (a Hydra multirun-like layout)."""
from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys

import pytest
from PIL import Image

from conftest import REPO
from mmagent_rl import report, report_plots

FULL = {"loss": 0.1, "tool/use_rate": 0.5, "tool/all_wrong_rate": 0.25, "mapo/alignment": 0.6,
        "kl": 0.01, "time/generate": 1.0, "time/score": 0.1, "time/learn": 2.0,
        "time/sync": 0.05, "time/step": 3.2}


def _write_run(d, rows, *, algo, seed, bad_line=None, eval_json=None):
    os.makedirs(d)
    lines = [json.dumps(r) for r in rows]
    if bad_line is not None:
        lines.insert(1, bad_line)
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (d / "config.yaml").write_text(
        f"model:\n  name: tiny\nalgo:\n  name: {algo}\ntrainer:\n  seed: {seed}\n")
    if eval_json is not None:
        (d / "eval.json").write_text(json.dumps(eval_json))


def _table(md: str, first_header: str) -> dict[str, dict[str, str]]:
    """The Markdown table that starts with `| first_header |`, as {run: {column: cell}}."""
    lines = md.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"| {first_header} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    out = {}
    for ln in lines[start + 2:]:
        if not ln.startswith("|"):
            break
        cells = [c.strip() for c in ln.strip("|").split("|")]
        out[cells[0]] = dict(zip(header, cells))
    return out


def _make_sweep(tmp_path):
    sweep = tmp_path / "multirun" / "2026-01-01" / "00-00-00"
    a = [dict(FULL, step=s, **{"reward/mean": r, "acc/mean": acc})
         for s, r, acc in ((1, 0.2, 0.0), (2, 0.4, 0.5), (3, 0.9, 0.75))]
    _write_run(sweep / "0", a, algo="mapo", seed=0,
               eval_json={"accuracy": 0.625, "pass@1": 0.6, "pass@k": 0.875, "k": 4,
                          "tool_call_rate": 0.5, "n_examples": 8})
    # Run 1: no alignment, no KL, no timings; a crash left a truncated line.
    b = [{"step": s, "loss": 0.2, "reward/mean": r, "acc/mean": 0.5, "tool/use_rate": 0.0,
          "tool/all_wrong_rate": 0.0} for s, r in ((1, 1.0), (2, 0.5))]
    _write_run(sweep / "1", b, algo="grpo", seed=1, bad_line='{"step": 2, "loss": 0.')
    (sweep / "1" / "checkpoints").mkdir()  # not a run, not descended into
    return tmp_path / "multirun"


def test_report_curves_and_table(tmp_path):
    root = _make_sweep(tmp_path)
    out = tmp_path / "rep"
    runs = report.report([str(root)], str(out))
    assert [r.label for r in runs] == ["0", "1"]
    assert [r.bad_lines for r in runs] == [0, 1]

    for stem in ("reward", "accuracy", "tool_use_rate", "all_wrong_rate", "alignment", "kl",
                 "time_generate", "time_score", "time_learn", "time_sync", "time_step"):
        with Image.open(out / f"{stem}.png") as im:
            im.verify()  # a complete, valid PNG
        with Image.open(out / f"{stem}.png") as im:
            assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
    assert not (out / "time_axpo.png").exists()  # no run logged it: no figure, no error

    md = (out / "report.md").read_text()
    train = _table(md, "run | algo | seed | model")
    assert set(train) == {"0", "1"}
    r0, r1 = train["0"], train["1"]
    assert (r0["algo"], r0["seed"], r0["steps"], r0["skipped lines"]) == ("mapo", "0", "3", "0")
    assert (r1["algo"], r1["seed"], r1["steps"], r1["skipped lines"]) == ("grpo", "1", "2", "1")
    assert float(r0["reward final"]) == 0.9 and float(r0["reward mean"]) == 0.5
    assert float(r0["acc final"]) == 0.75
    assert float(r0["alignment final"]) == 0.6 and float(r0["kl final"]) == 0.01
    assert float(r1["reward final"]) == 0.5 and float(r1["reward mean"]) == 0.75
    assert r1["alignment final"] == "—" and r1["kl final"] == "—"  # missing, not an error
    assert "skipped: `1`: 1." in md  # the malformed line is reported against its run

    ev = _table(md, "run | accuracy")  # the eval table: only run 0 has eval.json
    assert set(ev) == {"0"}
    assert float(ev["0"]["pass@k"]) == 0.875 and ev["0"]["k"] == "4"
    assert ev["0"]["format_rate"] == "—"
    assert "![mapo/alignment](alignment.png)" in md and "`time/axpo`" in md


def test_report_cli(tmp_path):
    root = _make_sweep(tmp_path)
    single = root / "2026-01-01" / "00-00-00" / "0"
    env = dict(os.environ, PYTHONPATH=REPO)
    p = subprocess.run([sys.executable, "-m", "mmagent_rl.report", str(single)], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert (single / "report" / "report.md").is_file()  # default --out: DIR/report
    assert (single / "report" / "reward.png").is_file()

    p = subprocess.run([sys.executable, "-m", "mmagent_rl.report", str(tmp_path / "nothing")],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "not a folder" in p.stderr


# ---- a 2 algos x 2 seeds sweep as the trainer writes it ---------------------------
ALGOS, SEEDS, STEPS, EVAL_AT = ("grpo", "papo"), (0, 1), 6, (3, 6)
RESUMED = ("grpo", 1)  # this run logs step 4 twice; the second record is the real one
EVAL_PNGS = ("eval_vs_step", "eval_vs_time")


def _fake_rows(algo: str, seed: int) -> list[dict]:
    """metrics.jsonl rows: the step-0 eval row, training rows, eval keys on EVAL_AT steps,
    ``time/elapsed`` everywhere. Values are random but fixed per run."""
    rng = random.Random(f"{algo}-{seed}")
    u = lambda: round(rng.uniform(0, 1), 3)  # noqa: E731

    def evaluation():
        return {"eval/pass@1": u(), "eval/pass@k": u(), "eval/pass@1_se": u() / 10,
                "eval/k": 4.0, "eval/tool_call_rate": u(), "eval/box_hit_rate": u(),
                "eval/format_rate": 1.0, "eval/time_s": 5.0}

    elapsed = 5.0 + seed
    rows = [{"step": 0, **evaluation(), "time/elapsed": elapsed}]
    for step in range(1, STEPS + 1):
        row = {"step": step, "reward/mean": u(), "acc/mean": u(), "tool/use_rate": u(),
               "tool/all_wrong_rate": u(), "time/step": round(rng.uniform(2, 4), 3),
               "loss": u(), "grad_norm": u(), "grad/variance": u(),
               "tool/collapse_alarm": 0.0}
        if algo == "papo":
            row["papo/kl_prcp"] = u()
        elapsed += row["time/step"]
        if step in EVAL_AT:
            row.update(evaluation())
            elapsed += 5.0
        row["time/elapsed"] = elapsed
        rows.append(row)
    return rows


def _make_algo_sweep(tmp_path) -> tuple[str, dict]:
    """The sweep dir and {(algo, seed): the rows that count}."""
    sweep = tmp_path / "multirun" / "2026-01-02" / "10-00-00"
    data = {}
    for algo in ALGOS:
        for seed in SEEDS:
            d = sweep / f"+algo={algo},seed={seed}"
            os.makedirs(d)
            rows = data[algo, seed] = _fake_rows(algo, seed)
            written = list(rows)
            if (algo, seed) == RESUMED:  # a crash after logging step 4, then a resume
                written.insert(4, dict(rows[4], **{"tool/use_rate": 9.0, "time/step": 99.0}))
            (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in written))
            if seed == 0:  # launch.py today: resolved (here only the top-level seed)
                cfg = f"algo:\n  name: {algo}\nseed: {seed}\n"
            else:  # an older launch.py: interpolations left as written, one Hydra-only
                cfg = (f"algo:\n  name: {algo}\nseed: {seed}\ntrainer:\n  seed: ${{seed}}\n"
                       "stamp: ${now:%Y-%m-%d}\n")
            (d / "config.yaml").write_text(cfg)
    return str(tmp_path / "multirun"), data


def _expected(rows: list[dict]) -> dict[str, float]:
    """A run's figures, straight from its rows."""
    evals = [r for r in rows if "eval/pass@1" in r]
    train = lambda k: [r[k] for r in rows if k in r]  # noqa: E731
    e = {"pass@1 before": evals[0]["eval/pass@1"], "pass@1 after": evals[-1]["eval/pass@1"],
         "pass@k before": evals[0]["eval/pass@k"], "pass@k after": evals[-1]["eval/pass@k"],
         "box hit after": evals[-1]["eval/box_hit_rate"],
         "tool use": statistics.mean(train("tool/use_rate")),
         "all-wrong": statistics.mean(train("tool/all_wrong_rate")),
         "step s (median)": statistics.median(train("time/step")),
         "grad/variance": statistics.mean(train("grad/variance")),
         "grad/variance_step1": train("grad/variance")[0],
         "eval share of wall": sum(train("eval/time_s")) / rows[-1]["time/elapsed"]}
    e["gain"] = e["pass@1 after"] - e["pass@1 before"]
    if train("papo/kl_prcp"):
        kl = train("papo/kl_prcp")
        e.update({"papo/kl_prcp": statistics.mean(kl), "papo/kl_prcp_first": kl[0],
                  "papo/kl_prcp_last": kl[-1]})
    return e


def _over_seeds(data: dict, algo: str, name: str) -> tuple[float, float]:
    vals = [_expected(data[algo, s])[name] for s in SEEDS]
    return statistics.mean(vals), statistics.stdev(vals)


def _mean_std(cell: str) -> tuple[float, float]:
    m, s = cell.split(" ± ")
    return float(m), float(s)


def test_sweep_comparison_table(tmp_path):
    root, data = _make_algo_sweep(tmp_path)
    report.report([root], str(tmp_path / "rep"))
    md = (tmp_path / "rep" / "report.md").read_text()
    table = _table(md, "algo | n | seeds")
    assert list(table) == list(ALGOS)
    columns = ("pass@1 before", "pass@1 after", "gain", "pass@k before", "pass@k after",
               "tool use", "all-wrong", "box hit after", "step s (median)")
    for algo in ALGOS:
        row = table[algo]
        assert row["n"] == "2" and row["seeds"] == "0, 1"
        for col in columns:  # rounded to 4 significant digits in the table
            assert _mean_std(row[col]) == pytest.approx(_over_seeds(data, algo, col),
                                                        rel=1e-3), (algo, col)
    # The resumed run's first step-4 record (tool use 9, 99 s) lost to the second.
    assert "Steps logged again (a resumed run; the last record is kept): " \
           "`+algo=grpo,seed=1`: 1." in md


def test_sweep_mechanism_table(tmp_path):
    root, data = _make_algo_sweep(tmp_path)
    report.report([root], str(tmp_path / "rep"))
    table = _table((tmp_path / "rep" / "report.md").read_text(), "algo | n | mapo/alignment")
    for algo in ALGOS:
        for col in ("grad/variance", "grad/variance_step1", "eval share of wall"):
            assert _mean_std(table[algo][col]) == pytest.approx(
                _over_seeds(data, algo, col), rel=1e-3), col
        assert table[algo]["mapo/alignment"] == "—"  # neither logs it
    for col in ("papo/kl_prcp", "papo/kl_prcp_first", "papo/kl_prcp_last"):
        assert table["grpo"][col] == "—"
        assert _mean_std(table["papo"][col]) == pytest.approx(
            _over_seeds(data, "papo", col), rel=1e-3)


def test_sweep_per_run_table_and_seeds(tmp_path):
    root, data = _make_algo_sweep(tmp_path)
    runs = report.report([root], str(tmp_path / "rep"))
    assert [(r.algo, r.seed) for r in runs] == [(a, s) for a in ALGOS for s in SEEDS]
    resumed = next(r for r in runs if (r.algo, r.seed) == RESUMED)
    assert [r["step"] for r in resumed.rows] == list(range(STEPS + 1))
    assert resumed.repeated_steps == 1

    table = _table((tmp_path / "rep" / "report.md").read_text(), "run | algo | seed | steps")
    for (algo, seed), rows in data.items():
        row = table[f"+algo={algo},seed={seed}"]
        assert row["seed"] == str(seed)  # also where config.yaml says ${seed}
        assert row["steps"] == str(STEPS) and row["eval steps"] == f"0→{EVAL_AT[-1]}"
        first, last = rows[0], rows[-1]
        assert _mean_std(row["pass@1 before"]) == pytest.approx(
            (first["eval/pass@1"], first["eval/pass@1_se"]), rel=1e-3)
        assert _mean_std(row["pass@1 after"]) == pytest.approx(
            (last["eval/pass@1"], last["eval/pass@1_se"]), rel=1e-3)
        assert float(row["wall min"]) == pytest.approx(last["time/elapsed"] / 60, rel=1e-3)


def test_config_value_resolves_old_interpolations():
    cfg = {"seed": 3, "trainer": {"seed": "${seed}"}, "stamp": "${now:%Y}",
           "model": {"name": "${nope}"}}
    assert report.config_value(cfg, "trainer.seed") == 3  # despite the Hydra-only key
    assert report.config_value(cfg, "model.name") == "${nope}"  # unresolvable: raw text
    assert report.config_value(cfg, "algo.name") is None


def test_sweep_report_json(tmp_path):
    root, data = _make_algo_sweep(tmp_path)
    report.report([root], str(tmp_path / "rep"))
    js = json.loads((tmp_path / "rep" / "report.json").read_text())
    for algo in ALGOS:
        agg = js["algorithms"][algo]
        assert agg["n"] == 2 and agg["seeds"] == list(SEEDS)
        for key, name in (("pass@1_before", "pass@1 before"), ("pass@1_after", "pass@1 after"),
                          ("pass@1_gain", "gain"), ("tool_use_rate", "tool use"),
                          ("step_s_median", "step s (median)")):
            m, s = _over_seeds(data, algo, name)
            assert (agg["metrics"][key]["mean"], agg["metrics"][key]["std"]) == \
                pytest.approx((m, s), rel=1e-9), (algo, key)
    assert js["algorithms"]["grpo"]["metrics"]["papo/kl_prcp"] is None
    assert [r["seed"] for r in js["runs"]] == [s for _ in ALGOS for s in SEEDS]


def test_sweep_figures(tmp_path):
    root, data = _make_algo_sweep(tmp_path)
    out = tmp_path / "rep"
    report.report([root], str(out))
    md = (out / "report.md").read_text()
    for stem in EVAL_PNGS + ("reward", "accuracy", "tool_use_rate", "kl_prcp",
                             "grad_variance", "collapse_alarm"):
        assert (out / f"{stem}.png").stat().st_size > 0
        with Image.open(out / f"{stem}.png") as im:
            im.verify()
        assert f"({stem}.png)" in md, stem


def test_eval_curves_mean_and_band(tmp_path):
    root, data = _make_algo_sweep(tmp_path)
    groups = report.group_by_algo(report.load_runs([root]))
    for algo, runs in groups.items():
        per_seed = [[r for r in data[algo, s] if "eval/pass@1" in r] for s in SEEDS]
        pass1 = [[r["eval/pass@1"] for r in rows] for rows in zip(*per_seed)]  # by eval
        xs, ys, lo, hi = report_plots.eval_curve(runs)
        assert xs == [0, *EVAL_AT]
        assert ys == pytest.approx([statistics.mean(v) for v in pass1])
        assert (lo, hi) == ([min(v) for v in pass1], [max(v) for v in pass1])
        minutes, ys_t, _, _ = report_plots.eval_curve(runs, by_time=True)
        assert minutes == pytest.approx([statistics.mean(r["time/elapsed"] for r in rows) / 60
                                         for rows in zip(*per_seed)])
        assert ys_t == pytest.approx(ys)
        # Training curves start at step 1: the step-0 row holds eval keys only.
        steps, _, _, _ = report_plots.across_runs([r.series("reward/mean") for r in runs])
        assert steps == list(range(1, STEPS + 1))


def test_smooth_is_a_centred_moving_average():
    assert report_plots.smooth([0, 0, 10, 0, 0], 5) == pytest.approx(
        [10 / 3, 2.5, 2, 2.5, 10 / 3])
    assert report_plots.smooth([1.0, 3.0], 1) == [1.0, 3.0]
