"""`python -m mmagent_rl.launch`: the helper every end-to-end test runs it with, and its
start-up errors. The two-learner runs (ZeRO-2 and ZeRO-3) are in test_resume.py, whose
uninterrupted runs check what a plain run must produce."""
from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO

REQUIRED = ("step", "loss", "reward/mean", "acc/mean", "tool/use_rate", "tool/all_wrong_rate",
            "time/generate", "time/score", "time/learn", "time/sync", "tokens_per_s")


def launch(args: list[str], timeout: float = 900,
           module: str = "mmagent_rl.launch") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]))
    if not any(a.startswith(("model=", "model.path=")) for a in args):
        args = ["model=tiny", *args]  # the random tiny model unless a test names another
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_unknown_config_key_fails_at_start_naming_it(tmp_path):
    p = launch(["+algo=grpo", "trainer.total_stepz=2", f"hydra.run.dir={tmp_path}"],
               timeout=120)
    assert p.returncode != 0
    assert "total_stepz" in p.stderr and "Traceback" not in p.stderr.split("total_stepz")[0][-50:]


def test_missing_algo_fails_with_the_valid_choices(tmp_path):
    p = launch([f"hydra.run.dir={tmp_path}"], timeout=120)
    assert p.returncode != 0
    out = p.stderr + p.stdout
    assert "+algo=grpo" in out
    assert "registered: grpo, mapo, papo, axpo, gspo" in out  # every one, not one of five
