"""`python -m mmagent_rl.sft` on real DeepSpeed learners (Ray actors), from a jsonl file."""
from __future__ import annotations

import json
import random

from mmagent_rl.data.demos import demo_to_row, make_demo
from mmagent_rl.data.synthetic import SyntheticConfig, SyntheticDataset
from test_launch import launch


def test_sft_loss_falls_on_a_small_demo_file_and_bad_rows_are_counted(tmp_path, chat):
    ds = SyntheticDataset(SyntheticConfig(), seed=0, size=4, split="train")
    rows = [demo_to_row(make_demo(ds[i], chat, random.Random(i))) for i in range(4)]
    path = tmp_path / "demos.jsonl"
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        f.write('{"messages": "not a list"}\n')  # a bad row: skipped, counted
    run = tmp_path / "run"
    p = launch(["sft.steps=15", "sft.batch_size=4", "sft.lr=3e-3", f"sft.data_path={path}",
                "learner.num_workers=2", f"hydra.run.dir={run}"], module="mmagent_rl.sft")
    assert p.returncode == 0, p.stderr[-3000:]
    log = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == 15 and log[0]["data/skipped_rows"] == 1
    assert log[-1]["loss"] < 0.6 * log[0]["loss"], (log[0]["loss"], log[-1]["loss"])
    assert (run / "checkpoints" / "final" / "model.safetensors").exists()
