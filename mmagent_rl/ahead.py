"""Rollouts generated ahead, while the learners train (``trainer.off_policy_steps = K``).

With K > 0, at the start of step s the driver makes sure the rollouts of steps s .. s+K
are launched, in order, on a background thread (one job at a time: the engines serve
them in turn), then takes step s's. Step s+K's rollouts are generated on the engines
while step s trains; the weight push at the end of step s waits for the engines to be
free, so a rollout is sampled by weights at most K versions older than the learner that
trains on it (exactly K once the pipeline is full). The learner reweights such rollouts
(algos/offpolicy.py). K = 0 is the synchronous loop, unchanged.

Restarts: a rollout actor that dies during a job ahead is restarted and given the
current weights (under ``weights_lock``, never mid-push) and the job's share retried, as
in the synchronous loop; the retried share is then sampled by newer weights than the
rest of its batch (still at most K old), so the run is not bit-for-bit the
uninterrupted one. Checkpoints: when a checkpoint is written (after a step's push) the
jobs ahead are finished; their rollouts are saved in it and trained on after a resume,
so 2 steps + resume + 2 steps equals 4 steps exactly.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future

from mmagent_rl.trajectory import Trajectory


class RolloutsAhead:
    """A mixin of ``Trainer`` (it needs ``cfg``, ``step``, ``_draw_examples`` and
    ``_rollout``)."""

    def _init_ahead(self) -> None:
        self.off_policy_steps = self.cfg.trainer.off_policy_steps
        # the push and the step counter move together; a restore in the background
        # thread (a restarted engine) waits for a push in progress
        self.weights_lock = threading.RLock()
        self._ahead: dict[int, tuple[list, Future]] = {}
        self._last_job: Future | None = None

    def _submit(self, fn, *args) -> Future:
        """Run ``fn`` after the previous job, on a daemon thread: a job stuck on a dead
        actor when the run stops must not keep the process from exiting."""
        fut: Future = Future()
        prev, self._last_job = self._last_job, fut

        def run():
            if prev is not None:
                prev.exception()  # wait for it, whatever its outcome
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - raised where the result is taken
                fut.set_exception(e)

        threading.Thread(target=run, name="rollouts-ahead", daemon=True).start()
        return fut

    def _launch_ahead(self) -> None:
        c = self.cfg
        last = min(self.step + self.off_policy_steps, c.trainer.total_steps - 1)
        for s in range(self.step, last + 1):
            if s not in self._ahead:
                examples = self._draw_examples(c.trainer.prompts_per_step)
                seed = c.trainer.seed * 100003 + s  # the synchronous loop's first round
                self._ahead[s] = (examples, self._submit(self._timed_rollout, examples, seed))

    def _timed_rollout(self, examples, seed):
        t0 = time.perf_counter()
        trajs = self._rollout(examples, seed)
        return trajs, time.perf_counter() - t0

    def _take_ahead(self) -> tuple[list, list[Trajectory], float, float]:
        """This step's examples and rollouts, the wait for them, their generation time."""
        self._launch_ahead()
        examples, fut = self._ahead.pop(self.step)
        t0 = time.perf_counter()
        trajs, gen_s = fut.result()
        return examples, trajs, time.perf_counter() - t0, gen_s

    def check_versions(self, trajs: list[Trajectory]) -> None:
        low = self.step - self.off_policy_steps
        bad = {t.weights_version for t in trajs} - set(range(low, self.step + 1))
        if bad:  # e.g. a restarted engine that did not get the current weights
            raise RuntimeError(
                f"step {self.step + 1}: rollouts from weights version(s) {sorted(bad)}, "
                f"expected {low}..{self.step}; not training on them")

    def staleness_metrics(self, trajs: list[Trajectory]) -> dict:
        if not self.off_policy_steps:
            return {}
        ages = [self.step - t.weights_version for t in trajs]
        out = {"offpolicy/staleness_mean": sum(ages) / len(ages),
               "offpolicy/staleness_max": float(max(ages))}
        for k in range(self.off_policy_steps + 1):
            out[f"offpolicy/staleness_share_{k}"] = ages.count(k) / len(ages)
        return out

    # ---- checkpoints ---------------------------------------------------------------
    def ahead_state(self) -> list:
        """The finished jobs ahead, for a checkpoint: [(step, examples, trajectories)]."""
        return [(s, ex, fut.result()[0]) for s, (ex, fut) in sorted(self._ahead.items())]

    def restore_ahead(self, items: list) -> None:
        for s, ex, trajs in items:
            fut: Future = Future()
            fut.set_result((trajs, 0.0))
            self._ahead[s] = (ex, fut)
