"""Resumable checkpoints: ``<run dir>/checkpoints/step_<N>/``.

A checkpoint is written into ``step_<N>.tmp/`` and renamed to ``step_<N>/`` when it is
complete; the completion marker (``COMPLETE``) is the last file written before the
rename. Only a folder named ``step_<N>`` that holds the marker is ever resumed from, so
a run killed while saving leaves a ``.tmp`` folder (or, in principle, a folder without
the marker) that is skipped.

Contents:
- ``learner/``: DeepSpeed's checkpoint of every learner rank (module, ZeRO-partitioned
  optimizer and LR-scheduler states, engine counters) and each rank's RNG states;
- ``trainer_state.pt``: the driver's step, data position, RNG states (python, numpy,
  torch) and the other driver-side state (the watches' counters, the algorithm's state
  such as PAPO's hacking alarm, the wandb run id);
- ``COMPLETE``: JSON with the step, learner world size and ZeRO stage.

Rollout engines keep no state worth saving: on resume they get the learners' weights
before the first rollout, and sampling uses per-request seeds (rollout.agent.
seeded_requests), so a resumed run samples what the uninterrupted run would have.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time

from mmagent_rl.guards import SETTINGS

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
DS_TAG = "ds"  # DeepSpeed's tag (sub-folder) inside learner/
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoints_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def step_dir(run_dir: str, step: int) -> str:
    return os.path.join(checkpoints_dir(run_dir), f"step_{step}")


def is_complete(path: str) -> bool:
    return bool(_STEP_DIR.match(os.path.basename(os.path.normpath(path)))) and \
        os.path.isfile(os.path.join(path, MARKER))


def complete_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint under ``run_dir``, oldest first.
    Temporary folders (``step_<N>.tmp``) and folders without the marker are skipped."""
    root = checkpoints_dir(run_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        path = os.path.join(root, name)
        if m and os.path.isdir(path) and is_complete(path):
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: str) -> str | None:
    found = complete_checkpoints(run_dir)
    return found[-1][1] if found else None


def resolve_resume(resume: str, run_dir: str) -> str | None:
    """``trainer.resume``: ``none`` -> None; ``auto`` -> the latest complete checkpoint
    under ``run_dir`` (None if there is none: a fresh start); otherwise the path of one
    checkpoint, which must be complete."""
    if resume in ("none", "null", ""):
        return None
    if resume == "auto":
        path = latest_checkpoint(run_dir)
        if path is None:
            log.info("trainer.resume=auto: no complete checkpoint under %s; starting "
                     "from step 0", checkpoints_dir(run_dir))
        return path
    path = os.path.abspath(os.path.expanduser(resume))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"trainer.resume={resume!r}: no such folder; valid: none, "
                                "auto or a checkpoints/step_<N> folder")
    if not is_complete(path):
        raise ValueError(f"trainer.resume={resume!r} is not a complete checkpoint (a "
                         f"step_<N> folder holding {MARKER}); it may be half-written")
    return path


def read_marker(path: str) -> dict:
    with open(os.path.join(path, MARKER)) as f:
        return json.load(f)


def begin(run_dir: str, step: int) -> str:
    """A fresh temporary folder for the checkpoint of ``step``; stale temporary folders
    of earlier, interrupted saves are removed."""
    root = checkpoints_dir(run_dir)
    os.makedirs(root, exist_ok=True)
    for name in os.listdir(root):
        if name.startswith("step_") and name.endswith(".tmp"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    tmp = step_dir(run_dir, step) + ".tmp"
    os.makedirs(tmp)
    return tmp


def commit(tmp: str, info: dict) -> str:
    """Write the marker last, then rename ``step_<N>.tmp`` to ``step_<N>``."""
    _fsync_tree(tmp)
    with open(os.path.join(tmp, MARKER), "w") as f:
        json.dump(info, f)
        f.flush()
        os.fsync(f.fileno())
    final = tmp[:-len(".tmp")]
    if os.path.exists(final):  # a checkpoint of the same step from an earlier attempt
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(os.path.dirname(final))
    return final


def prune(run_dir: str, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` complete checkpoints; returns what was deleted."""
    found = complete_checkpoints(run_dir)
    gone = [p for _, p in found[:max(0, len(found) - keep)]]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def _fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---- RNG states ---------------------------------------------------------------------
def rng_state() -> dict:
    """Python, numpy and torch (CPU, and CUDA when present) generator states."""
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointing:
    """The trainer's resumable checkpoints (a mixin of ``Trainer``: it reads the run's
    config, learners and counters). A checkpoint holds the learners' DeepSpeed states,
    the driver's step, data position, RNG states, the watches' and the algorithm's
    state; resuming trims metrics.jsonl to the checkpoint's step."""

    def _prepare_resume(self) -> dict:
        """Resolve trainer.resume, turn on per-request seeds when checkpointing, and trim
        metrics.jsonl to the resumed step; returns the checkpoint's driver state ({})."""
        import torch

        from mmagent_rl.metrics import truncate_jsonl

        c = self.cfg
        self.resume_from = resolve_resume(c.trainer.resume, self.run_dir)
        if c.rollout.agent.seeded_requests is None:
            # The engine's global generator is not saved: an exact resume needs seeds
            # that depend only on (step, prompt, sample, turn).
            c.rollout.agent.seeded_requests = bool(c.trainer.save_every or self.resume_from)
        elif not c.rollout.agent.seeded_requests and (c.trainer.save_every or self.resume_from):
            log.warning("rollout.agent.seeded_requests=false: a resumed run will not sample "
                        "what the uninterrupted run would have")
        if not self.resume_from:
            return {}
        info = read_marker(self.resume_from)  # checked before any actor starts
        for key, want, have in (("learner.num_workers", info["learner_world_size"],
                                 c.learner.num_workers),
                                ("learner.zero_stage", info["zero_stage"], c.learner.zero_stage)):
            if want != have:
                raise ValueError(f"{key}={have}, but the checkpoint {self.resume_from} was "
                                 f"written with {key}={want}; resume with {key}={want}")
        state = torch.load(os.path.join(self.resume_from, "trainer_state.pt"),
                           weights_only=False)
        metrics = os.path.join(self.run_dir, "metrics.jsonl")
        src = os.path.join(os.path.dirname(os.path.dirname(self.resume_from)), "metrics.jsonl")
        if not os.path.exists(metrics) and os.path.exists(src) and \
                os.path.abspath(src) != os.path.abspath(metrics):
            shutil.copyfile(src, metrics)  # a new run dir continues the old run's log
        dropped = truncate_jsonl(metrics, state["step"])
        if dropped:
            log.info("resume: dropped %d metrics.jsonl records after step %d (they are "
                     "written again)", dropped, state["step"])
        return state

    def _resume(self, state: dict) -> None:
        """Learners load their state; the engines get the resumed weights before the
        first rollout; the driver's counters and RNG states are restored."""
        path = self.resume_from
        t0 = time.perf_counter()
        self._learners_get([lr.load_state.remote(os.path.join(path, "learner"))
                            for lr in self.learners])
        self.step, self.data_pos = int(state["step"]), int(state["data_pos"])
        set_rng_state(state["rng"])
        for name in ("nonfinite", "collapse"):  # their counters, not their settings
            if name in state and hasattr(self, name):
                getattr(self, name).__dict__.update(
                    {k: v for k, v in state[name].items() if k not in SETTINGS})
        if "algorithm" in state and hasattr(self, "algorithm"):
            self.algorithm.load_state_dict(state["algorithm"])
        elif "alarm" in state and hasattr(self, "algorithm"):  # checkpoints written before the algorithm registry
            self.algorithm.load_state_dict({"alarm": list(state["alarm"].get("_hist", []))})
        self.faults.counts.update(state.get("faults", {}))
        self.elapsed_before = float(state.get("elapsed", 0.0))
        if state.get("ahead") and getattr(self, "off_policy_steps", 0):
            self.restore_ahead(state["ahead"])
        self.sync_weights(self.step)
        log.info("resumed from %s at step %d (%.1f s)", path, self.step,
                 time.perf_counter() - t0)

    def save_checkpoint(self) -> str:
        """<run dir>/checkpoints/step_<N>: written into step_<N>.tmp, the COMPLETE marker
        last, then renamed; the oldest beyond trainer.keep_checkpoints are deleted."""
        import torch

        c = self.cfg
        t0 = time.perf_counter()
        tmp = begin(self.run_dir, self.step)
        self._learners_get([lr.save_state.remote(os.path.join(tmp, "learner"))
                            for lr in self.learners])
        state = {"step": self.step, "data_pos": self.data_pos, "rng": rng_state(),
                 "wandb_id": self.metrics_log.wandb_id if self.metrics_log else None}
        for name in ("nonfinite", "collapse"):
            if hasattr(self, name):
                state[name] = dict(vars(getattr(self, name)))
        if hasattr(self, "algorithm"):
            state["algorithm"] = self.algorithm.state_dict()
        state["faults"] = dict(self.faults.counts)
        state["elapsed"] = self.elapsed()  # time/elapsed goes on from here on resume
        if getattr(self, "off_policy_steps", 0):  # the rollouts generated ahead (ahead.py)
            state["ahead"] = self.ahead_state()
        torch.save(state, os.path.join(tmp, "trainer_state.pt"))
        path = commit(tmp, {"step": self.step, "learner_world_size": c.learner.num_workers,
                            "zero_stage": c.learner.zero_stage, "algo": c.algo.name})
        prune(self.run_dir, c.trainer.keep_checkpoints)
        log.info("checkpoint %s (%.1f s)", path, time.perf_counter() - t0)
        return path
