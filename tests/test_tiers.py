"""Every collected test has exactly one tier (tests/conftest.py), so `make test-fast`
(-m unit) and the other tiers together run the whole suite."""
from __future__ import annotations

import collections
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.integration
def test_every_collected_test_has_exactly_one_tier():
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "tests"))
    p = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p",
                        "tier_report", "tests"], cwd=REPO, capture_output=True, text=True,
                       timeout=600, env=env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    tiers = dict(line[len("TIER "):].rsplit(" ", 1) for line in p.stdout.splitlines()
                 if line.startswith("TIER "))  # node ids may hold spaces, tiers do not
    assert len(tiers) > 300
    wrong = {node: t for node, t in tiers.items() if t not in ("unit", "integration", "e2e")}
    assert wrong == {}  # none without a tier, none with two
    counts = collections.Counter(tiers.values())
    assert all(counts[t] for t in ("unit", "integration", "e2e")), counts
    # the tiers the issue names land where they should
    assert tiers["tests/test_gspo.py::test_two_step_gspo_run"] == "e2e"
    assert tiers["tests/test_grpo.py::test_group_advantages_one_group"] == "unit"
    assert tiers["tests/test_engine_learner.py::test_mrope_positions_match_hf_rope_index"] \
        == "integration"
