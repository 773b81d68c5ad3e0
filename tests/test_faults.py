"""Actor faults in a real run (Ray + vLLM + DeepSpeed, tiny model): the test finds the
actors' processes by their Ray process titles (``ray::RolloutWorker.generate`` while
generating) and SIGKILLs them mid-step.

The runs push weights with ``sync.backend=transfer`` (vLLM's weight-transfer protocol,
mmagent_rl/transfer.py): a restarted engine joins a reopened channel. The object-store
backend is what every other end-to-end test runs.

Every run samples with per-request seeds, so a step retried after a fault must
reproduce the uninterrupted run exactly: same prompts, same trajectories, same loss.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil
import pytest

from chaos import SAME, find_process, rows as _rows, start_run

STEPS, PROMPTS, N = 4, 2, 2
ARGS = ["+algo=grpo", "model=tiny", f"trainer.total_steps={STEPS}",
        f"trainer.prompts_per_step={PROMPTS}", f"rollout.n={N}",
        "rollout.agent.max_new_tokens=24", "rollout.agent.seeded_requests=true",
        "trainer.progress=false", "reward.fn=reward_plugins:shortness_reward",
        "learner.lr=1e-3", "learner.micro_batch_size=2", "trainer.save_final=false",
        "sync.backend=transfer"]


def _start(args: list[str]) -> subprocess.Popen:
    return start_run([*ARGS, *args])  # stdout and stderr in one pipe


def _finish(p: subprocess.Popen, timeout: float = 900) -> tuple[int, str]:
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, _ = p.communicate()
        pytest.fail("run did not finish:\n" + out[-4000:])
    return p.returncode, out


def _kill_when(p: subprocess.Popen, run, *, after_rows: int, busy: str,
               victim: str | None = None, timeout: float = 600) -> int:
    """Once ``after_rows`` steps are logged, wait until a process titled ``busy`` is at
    work (mid-step) and SIGKILL the one titled ``victim`` (default: that one)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if p.poll() is not None:
            pytest.fail("run ended before the fault was injected:\n" + p.stdout.read()[-4000:])
        if len(_rows(run)) >= after_rows and find_process(p.pid, busy):
            target = find_process(p.pid, victim or busy)
            if target is not None:
                target.send_signal(signal.SIGKILL)
                return target.pid
        time.sleep(0.02)
    pytest.fail(f"no {busy!r} process within {timeout:.0f} s")


def _check_counts(rows: list[dict]) -> None:
    """Every step once, every sample trained once, prompts taken in order."""
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["samples"] for r in rows] == [PROMPTS * N] * STEPS
    assert [r["learner/steps_total"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["learner/samples_total"] for r in rows] == [
        PROMPTS * N * s for s in range(1, STEPS + 1)]
    assert [r["data/position"] for r in rows] == [PROMPTS * s for s in range(1, STEPS + 1)]


@pytest.fixture(scope="module")
def clean_rows(tmp_path_factory) -> list[dict]:
    run = tmp_path_factory.mktemp("clean")
    rc, out = _finish(_start([f"hydra.run.dir={run}"]))
    assert rc == 0, out[-4000:]
    rows = _rows(run)
    _check_counts(rows)
    assert not any(k.startswith("faults/") for r in rows for k in r)
    # The engines serve exactly the learner's weights after every sync (tied LM head
    # included): the learner re-scores the sampled tokens to within float error.
    assert max(r["rollout/logprob_diff"] for r in rows) < 1e-4, rows
    return rows


def _same_as_clean(rows: list[dict], clean: list[dict]) -> None:
    for r, c in zip(rows, clean, strict=True):
        assert {k: r[k] for k in SAME} == {k: c[k] for k in SAME}, r["step"]


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_killed_rollout_and_reward_actors_are_restarted_and_the_step_retried(
        tmp_path, clean_rows):
    run = tmp_path / "run"
    p = _start([f"hydra.run.dir={run}"])
    first = _kill_when(p, run, after_rows=1, busy="ray::RolloutWorker.generate")
    # The reward actor dies while the (restarted) rollout worker generates step 4's
    # trajectories: its score call fails, it is restarted and the call retried.
    _kill_when(p, run, after_rows=3, busy="ray::RolloutWorker.generate",
               victim="ray::RewardScorer")
    rc, out = _finish(p)
    assert rc == 0, out[-4000:]
    rows = _rows(run)
    _check_counts(rows)
    _same_as_clean(rows, clean_rows)  # the retried steps sampled the same trajectories
    last = rows[-1]
    assert last["faults/rollout_restarts"] == 1 and last["faults/reward_restarts"] == 1
    assert last["faults/retried_calls"] == 2
    assert rows[0].get("faults/rollout_restarts", 0) == 0  # step 1 had no fault
    assert "rollout actor 0 died" in out and "reward actor 0 died" in out
    assert not psutil.pid_exists(first) or psutil.Process(first).status() == "zombie"


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_killed_learner_stops_cleanly_and_resume_auto_continues(tmp_path, clean_rows):
    run = tmp_path / "run"
    ckpt = ["trainer.save_every=1", "trainer.keep_checkpoints=2"]
    p = _start([f"hydra.run.dir={run}", *ckpt])
    _kill_when(p, run, after_rows=2, busy="ray::Learner.train_step")
    rc, out = _finish(p)
    assert rc == 4, out[-4000:]
    assert "stopped during step 3" in out and "trainer.resume=auto" in out, out[-3000:]
    assert [r["step"] for r in _rows(run)] == [1, 2]  # the lost step is not logged
    assert sorted(os.listdir(run / "checkpoints")) == ["step_1", "step_2"]

    rc, out = _finish(_start([f"hydra.run.dir={run}", *ckpt, "trainer.resume=auto"]))
    assert rc == 0, out[-4000:]
    rows = _rows(run)
    _check_counts(rows)  # steps 3 and 4 trained once, on the learners' restored counters
    _same_as_clean(rows, clean_rows)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_a_rollout_actor_killed_while_generating_ahead_is_restarted(tmp_path):
    """trainer.off_policy_steps=1: the rollout worker is killed while it generates the
    next step's rollouts in the background (the learners train meanwhile); it is
    restarted, given the current weights, and its share retried, as in the synchronous
    loop. The retried share is sampled by newer weights (ahead.py), so the run is not
    compared with the clean one; no rollout is more than 1 version old."""
    run = tmp_path / "run"
    p = _start([f"hydra.run.dir={run}", "trainer.off_policy_steps=1"])
    _kill_when(p, run, after_rows=1, busy="ray::RolloutWorker.generate")
    rc, out = _finish(p)
    assert rc == 0, out[-4000:]
    rows = _rows(run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["samples"] for r in rows] == [PROMPTS * N] * STEPS
    assert [r["learner/samples_total"] for r in rows] == [
        PROMPTS * N * s for s in range(1, STEPS + 1)]
    # the prompts of the step ahead are drawn a step early, none past the last step
    assert [r["data/position"] for r in rows] == [PROMPTS * min(s + 1, STEPS)
                                                  for s in range(1, STEPS + 1)]
    assert rows[-1]["faults/rollout_restarts"] == 1 and rows[-1]["faults/retried_calls"] >= 1
    assert "rollout actor 0 died" in out
    assert max(r["offpolicy/staleness_max"] for r in rows) <= 1
    assert max(r["rollout/logprob_diff"] for r in rows[:1]) < 1e-4  # step 1: fresh
