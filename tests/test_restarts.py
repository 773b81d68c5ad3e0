"""mmagent_rl/faults.py on real Ray actors (seconds): restart-and-retry, giving up after
max restarts, and failing fast when one of several tasks dies."""
from __future__ import annotations

import os
import time

import pytest

from mmagent_rl.faults import ActorGaveUp, LearnerLost, Restarts, get_fail_fast, learner_get


def _flaky_class():
    """Defined in a function so that Ray ships it by value (the workers cannot import
    this test module)."""

    class Flaky:
        """Dies (its process exits) on the calls listed in the file ``plan``: one line per
        call, "die" or "ok", shared by the restarted processes."""

        def __init__(self, plan: str):
            self.plan, self.restored = plan, False

        def work(self, x: int) -> tuple[int, int, bool]:
            with open(self.plan) as f:
                lines = f.read().split()
            with open(self.plan, "w") as f:
                f.write("\n".join(lines[1:]))
            if lines and lines[0] == "die":
                os._exit(1)
            return x * 2, os.getpid(), self.restored

        def restore(self) -> None:
            self.restored = True

        def ping(self) -> bool:
            return True

        def sleep(self, s: float) -> float:
            time.sleep(s)
            return s

    return Flaky


def _actor(ray, plan, max_restarts: int):
    return ray.remote(num_cpus=0.1, max_restarts=max_restarts, max_task_retries=0)(
        _flaky_class()).remote(str(plan))


def test_dead_actor_is_restarted_restored_and_its_job_retried(ray_session, tmp_path):
    import ray

    plan = tmp_path / "plan"
    plan.write_text("ok\ndie\nok")
    actors = [_actor(ray, plan, 2)]
    first_pid = ray.get(actors[0].work.remote(0), timeout=60)[1]  # uses "ok"
    r = Restarts(max_restarts=2, timeout=60, restart_timeout=60)
    restored = []

    def restore(i):
        restored.append(i)
        ray.get(actors[i].restore.remote(), timeout=60)

    [(value, pid, was_restored)] = r.call("rollout", actors,
                                          [(0, lambda a: a.work.remote(21))], restore)
    assert value == 42 and pid != first_pid and was_restored and restored == [0]
    assert r.counts["faults/rollout_restarts"] == 1 and r.counts["faults/retried_calls"] == 1


def test_actor_dying_past_max_restarts_gives_up_with_a_clear_error(ray_session, tmp_path):
    import ray

    plan = tmp_path / "plan"
    plan.write_text("die\ndie\ndie")
    actors = [_actor(ray, plan, 1)]
    r = Restarts(max_restarts=1, timeout=60, restart_timeout=60)
    with pytest.raises(ActorGaveUp, match="reward actor 0 died 2 times"):
        r.call("reward", actors, [(0, lambda a: a.work.remote(1))])
    assert r.counts["faults/reward_restarts"] == 1


def test_one_dead_task_fails_the_group_at_once(ray_session, tmp_path):
    """A dead learner must not leave the driver waiting for the others (which would
    wait in a collective forever)."""
    import ray

    plan = tmp_path / "plan"
    plan.write_text("die")
    sleeper, dying = _actor(ray, plan, 0), _actor(ray, plan, 0)
    t0 = time.monotonic()
    with pytest.raises(LearnerLost, match="a learner actor died"):
        learner_get([sleeper.sleep.remote(60), dying.work.remote(1)], timeout=120)
    assert time.monotonic() - t0 < 30
    ray.kill(sleeper)
    assert get_fail_fast([], timeout=1) == []
