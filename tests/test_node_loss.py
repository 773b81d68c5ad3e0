"""Node loss: on the 2-node local Ray cluster of test_cluster.py (launch/*.sh, 1 CPU per
node), the second node is stopped mid-run. The rollout worker it held dies with it; Ray
restarts it on the head node and the driver retries its share of the step, so the run
completes with every step trained once. (The learner sits on the driver's node; a lost
learner would stop the run cleanly instead: tests/test_faults.py.)"""
from __future__ import annotations

import time
import uuid

import psutil
import pytest

from chaos import rows as _rows
from test_cluster import _alive_nodes, _stop, _submit, _wait_job, cluster  # noqa: F401

STEPS, PROMPTS, N = 5, 2, 2


def _actors_under(proc) -> list[str]:
    """The Ray actors (class names, from their process titles) a node's process runs."""
    out = []
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            title = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if title.startswith("ray::") and not title.startswith("ray::IDLE"):
            out.append(title[5:].split(".")[0].split()[0])
    return out


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_stopping_the_second_node_mid_run_lets_the_run_finish_on_the_first(cluster, tmp_path):
    run = tmp_path / "run"
    sid = f"mmagent-{uuid.uuid4().hex[:8]}"
    _submit(cluster, sid, [
        "+algo=grpo", f"trainer.total_steps={STEPS}", "trainer.ray_address=auto",
        f"hydra.run.dir={run}", "rollout.agent.max_new_tokens=16", "trainer.progress=false",
        f"trainer.prompts_per_step={PROMPTS}", f"rollout.n={N}", "model=tiny",
        "reward.fn=reward_plugins:shortness_reward", "trainer.save_final=false",
        # One engine per node (SPREAD). Everything fits on one node (1 CPU), so what the
        # lost node held can be restarted on the head: 2 x 0.2 + 0.4 + 0.2 = 1.0.
        "rollout.num_workers=2", "rollout.spread_nodes=true", "rollout.num_cpus=0.2",
        "learner.num_workers=1", "learner.num_cpus=0.4", "reward.num_cpus=0.2"])
    t0 = time.monotonic()
    while len(_rows(run)) < 2:  # two steps done: then the node goes
        assert time.monotonic() - t0 < 1500, "no second step"
        time.sleep(2)
    head, node2 = (_actors_under(p) for p in cluster["procs"])
    assert "RolloutWorker" in node2 and "Learner" in head, (head, node2)
    _stop(cluster["procs"][1:])  # `ray start --block` of node 2: SIGTERM, as a node shutdown
    info, logs = _wait_job(cluster, sid, 1500)
    assert info["status"] == "SUCCEEDED", logs[-6000:]
    assert list(_alive_nodes(cluster).values()) == ["head"]
    rows = _rows(run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["learner/samples_total"] for r in rows] == [
        PROMPTS * N * s for s in range(1, STEPS + 1)]
    assert [r["data/position"] for r in rows] == [PROMPTS * s for s in range(1, STEPS + 1)]
    assert rows[-1]["faults/rollout_restarts"] >= 1, rows[-1]
    assert "rollout actor" in logs and "died" in logs
