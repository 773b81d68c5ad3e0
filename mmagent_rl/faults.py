"""Actor faults during a run.

A rollout or reward actor that dies (its process killed, its node lost) is restarted by
Ray (``max_restarts``); the driver waits for it, restores what the restart lost (a
rollout engine comes back with the starting weights: it is given the current ones) and
retries that actor's share of the step with the same inputs. Ray's own task retries are
off on purpose: they would resend the work to an engine still holding old weights.

A learner that dies takes its optimizer state and its place in the collective group
with it, so the run cannot go on: ``LearnerLost`` stops it cleanly, and
``trainer.resume=auto`` continues from the last complete checkpoint.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any, Callable

log = logging.getLogger(__name__)


class LearnerLost(RuntimeError):
    """A learner actor died: the run must stop and be resumed from a checkpoint."""


class ActorGaveUp(RuntimeError):
    """A rollout or reward actor died more often than it may be restarted."""


class SyncFailed(ActorGaveUp):
    """A weight push failed twice (refused or broken): the engines keep serving the
    previous weights, so the run stops rather than train on stale rollouts."""


def actor_errors() -> tuple[type, ...]:
    import ray

    return (ray.exceptions.RayActorError,)  # ActorDiedError, ActorUnavailableError


def get_fail_fast(refs: list, timeout: float) -> list:
    """``ray.get(refs)``, but raising as soon as any task fails: when one learner dies
    the others wait in a collective that never completes, and ``ray.get`` of the list
    would wait for them first, until the timeout."""
    import ray

    deadline = time.monotonic() + timeout
    pending = list(refs)
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ray.exceptions.GetTimeoutError(f"{len(pending)} tasks not done after "
                                                 f"{timeout:.0f} s (trainer.step_timeout_s)")
        ready, pending = ray.wait(pending, num_returns=1, timeout=left)
        for r in ready:
            ray.get(r)  # raises the task's error
    return ray.get(refs)


def learner_get(refs: list, timeout: float) -> list:
    """``get_fail_fast`` for learner calls: a dead learner becomes ``LearnerLost``."""
    try:
        return get_fail_fast(refs, timeout)
    except actor_errors() as e:
        raise LearnerLost(f"a learner actor died: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from e


class Restarts:
    """Calls on restartable actors, each retried after its actor is back.

    ``counts`` holds cumulative ``faults/*`` metrics: restarts seen per actor kind and
    retried calls."""

    def __init__(self, max_restarts: int, timeout: float, restart_timeout: float):
        self.max_restarts, self.timeout = max_restarts, timeout
        self.restart_timeout = restart_timeout
        self.counts: Counter = Counter()
        self.per_actor: Counter = Counter()  # (kind, index) -> restarts seen

    def call(self, kind: str, actors: list, jobs: list[tuple[int, Callable[[Any], Any]]],
             restore: Callable[[int], None] | None = None) -> list:
        """``jobs``: (actor index, submit) with ``submit(actor) -> ObjectRef``. All are
        submitted at once; a job whose actor died is resubmitted, unchanged, once the
        actor has restarted and ``restore(index)`` has run. Results in job order."""
        refs = [submit(actors[i]) for i, submit in jobs]
        out = []
        for (i, submit), ref in zip(jobs, refs):
            while True:
                try:
                    out.append(self._get(ref))
                    break
                except actor_errors() as e:
                    self._recover(kind, actors, i, e, restore)
                    self.counts["faults/retried_calls"] += 1
                    ref = submit(actors[i])
        return out

    def _get(self, ref):
        import ray

        return ray.get(ref, timeout=self.timeout)

    def _recover(self, kind: str, actors: list, i: int, err: Exception,
                 restore: Callable[[int], None] | None) -> None:
        self.per_actor[kind, i] += 1
        n = self.per_actor[kind, i]
        if n > self.max_restarts:
            raise ActorGaveUp(f"{kind} actor {i} died {n} times; trainer.max_actor_restarts="
                              f"{self.max_restarts}") from err
        log.warning("%s actor %d died (%s); waiting for Ray to restart it (%d of %d)",
                    kind, i, type(err).__name__, n, self.max_restarts)
        t0 = time.monotonic()
        self.wait_alive(actors[i], f"{kind} actor {i}")
        if restore is not None:
            restore(i)
        self.counts[f"faults/{kind}_restarts"] += 1
        self.counts["faults/restart_wait_s"] += time.monotonic() - t0
        log.warning("%s actor %d is back after %.1f s; retrying its share of the step",
                    kind, i, time.monotonic() - t0)

    def wait_alive(self, actor, name: str) -> None:
        """Ping until the restarted actor answers. A ping sent before Ray knows of the
        death fails too: try again until ``restart_timeout``."""
        import ray

        deadline = time.monotonic() + self.restart_timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:  # a restarting actor answers once its constructor has run again
                ray.get(actor.ping.remote(), timeout=max(1.0, deadline - time.monotonic()))
                return
            except (*actor_errors(), ray.exceptions.GetTimeoutError) as e:
                last = e
                time.sleep(1.0)
        raise ActorGaveUp(f"{name} did not come back within {self.restart_timeout:.0f} s "
                          "(trainer.actor_restart_timeout_s)") from last


def fault_stop_reason(err: Exception, during: str | None, logged: int, run_dir: str) -> str:
    """What a run stopped by a lost actor says: where, what is kept, how to go on."""
    from mmagent_rl import checkpoint as ck

    last = ck.latest_checkpoint(run_dir)
    how = (f"rerun with trainer.resume=auto (same hydra.run.dir) to continue from {last}"
           if last else "no complete checkpoint to resume from (set trainer.save_every)")
    done = f"steps 1-{logged} are complete and logged" if logged else "no step is complete"
    return f"stopped during {during or f'step {logged + 1}'}: {err}; {done}; {how}"
