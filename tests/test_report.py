"""python -m mmagent_rl.report on hand-written runs (a Hydra multirun-like layout)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from PIL import Image

from conftest import REPO
from mmagent_rl import report

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
    train = _table(md, "run")
    assert set(train) == {"0", "1"}
    r0, r1 = train["0"], train["1"]
    assert (r0["algo"], r0["seed"], r0["steps"], r0["skipped lines"]) == ("mapo", "0", "3", "0")
    assert (r1["algo"], r1["seed"], r1["steps"], r1["skipped lines"]) == ("grpo", "1", "2", "1")
    assert float(r0["reward final"]) == 0.9 and float(r0["reward mean"]) == 0.5
    assert float(r0["acc final"]) == 0.75
    assert float(r0["alignment final"]) == 0.6 and float(r0["kl final"]) == 0.01
    assert float(r1["reward final"]) == 0.5 and float(r1["reward mean"]) == 0.75
    assert r1["alignment final"] == "-" and r1["kl final"] == "-"  # missing, not an error
    assert "skipped: `1`: 1." in md  # the malformed line is reported against its run

    ev = _table(md, "run | accuracy")  # the eval table: only run 0 has eval.json
    assert set(ev) == {"0"}
    assert float(ev["0"]["pass@k"]) == 0.875 and ev["0"]["k"] == "4"
    assert ev["0"]["format_rate"] == "-"
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
