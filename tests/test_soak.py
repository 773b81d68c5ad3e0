"""The long-run soak (``pytest --soak tests/test_soak.py``; skipped otherwise, not in
CI): 200 steps of the CPU demo through bench/soak.py; every process's RSS must stay flat
(growth per step over steps 101-200 at most 0.5 MiB)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.soak
@pytest.mark.timeout(4 * 3600)
def test_200_step_demo_memory_stays_flat(tmp_path):
    p = subprocess.run([sys.executable, "bench/soak.py", "--steps", "200",
                        "--out", str(tmp_path / "soak.json")],
                       cwd=REPO, capture_output=True, text=True, timeout=4 * 3600)
    result = json.loads(p.stdout.strip().splitlines()[-1])
    print(p.stdout[-3000:])
    assert result["steps"] == 200 and result["processes"]
    assert result["flat"], result["growing"]
    assert p.returncode == 0
