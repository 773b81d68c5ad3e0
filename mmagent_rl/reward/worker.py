"""Scores a whole batch of trajectories: the task reward (a plugin chosen by import
path) and, when the algorithm asks for it (MAPO), the CLIP alignment of every tool
call's description with the crop the tool really returned.

``RewardScorer`` is the plain class; ``make_reward_actor`` wraps it as a Ray actor (a
fractional CPU here, a GPU share on clusters). The actor's call, ``scores``, returns one
``Score`` per trajectory and its metrics, not the trajectories (their images stay where
they are); ``score`` applies them in place, for local use.

The task reward plugin is called once per trajectory with the trajectory's concrete match
mode (``reward.match_mode=auto``: its ``answer_type``) and its ``question``. An ``async
def`` plugin (a model judge, reward/judge.py) gets the whole batch at once: every call
runs concurrently in one event loop (``asyncio.run`` inside ``scores``; a thread of its
own if the caller already runs a loop). Either way a call that raises scores 0 with
``reward_error``: every trajectory gets a Score.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import time
from dataclasses import dataclass, field

from mmagent_rl.reward.task import AUTO_MODE, MATCH_MODES, load_reward_fn, resolve_match_mode
from mmagent_rl.trajectory import Trajectory

log = logging.getLogger(__name__)


@dataclass
class Score:
    reward: float
    info: dict[str, float] = field(default_factory=dict)
    align_scores: list[float] | None = None
    align_statuses: list[str] | None = None

    def apply(self, t: Trajectory) -> None:
        t.reward, t.reward_info = self.reward, dict(self.info)
        if self.align_scores is not None:
            t.align_scores, t.align_statuses = self.align_scores, self.align_statuses


class RewardScorer:
    """``cfg``: the reward section (``fn``, ``match_mode``, ``format_weight``, ``clip``;
    default: RewardConfig()). ``alignment``: the algorithm's alignment settings
    (``description``, ``max_words``: MAPO's ``alignment()`` hook), or None: no CLIP, no
    alignment scores."""

    def __init__(self, cfg=None, alignment=None, torch_threads: int = 1):
        import torch

        if cfg is None:
            from mmagent_rl.config import RewardConfig

            cfg = RewardConfig()
        torch.set_num_threads(torch_threads)
        self.fn = load_reward_fn(cfg.fn)
        if cfg.match_mode not in (*MATCH_MODES, AUTO_MODE):
            raise ValueError(f"reward.match_mode={cfg.match_mode!r}: expected one of "
                             f"{(*MATCH_MODES, AUTO_MODE)}")
        self.match_mode = cfg.match_mode
        self.is_async = _is_async(self.fn)
        self.kwargs = {"format_weight": cfg.format_weight}
        self.accepts = _keyword_names(self.fn)  # None: any keyword (**kwargs)
        if self._accepts("judge"):
            self.kwargs["judge"] = getattr(cfg, "judge", None)
        self.mapo = alignment
        self.clip = None
        if alignment is not None:
            from mmagent_rl.reward.clip_model import ClipScorer

            c = cfg.clip
            self.clip = ClipScorer(c.arch, c.checkpoint, c.device, c.batch_size,
                                   alignment.max_words)

    def scores(self, trajs: list[Trajectory]) -> tuple[list[Score], dict]:
        """One Score per trajectory, and additive metrics (alignment pairs and time)."""
        calls = [self._call(t) for t in trajs]
        if self.is_async:
            results = _run(_gather(self.fn, calls))
        else:
            results = []
            for c in calls:
                try:
                    results.append(c if isinstance(c, Exception) else self.fn(*c[0], **c[1]))
                except Exception as e:  # noqa: BLE001 - scored as an error below
                    results.append(e)
        out = [self._to_score(t, r) for t, r in zip(trajs, results)]
        metrics = self._align(trajs, out) if self.clip is not None else {}
        return out, metrics

    def _accepts(self, name: str) -> bool:
        return self.accepts is None or name in self.accepts

    def _call(self, t: Trajectory) -> tuple[tuple, dict] | Exception:
        """The plugin's (args, kwargs) for ``t``, or the ValueError of an unknown
        answer_type (that trajectory then scores as a reward error)."""
        try:
            mode = resolve_match_mode(self.match_mode, t.answer_type)
        except ValueError as e:
            return e
        kwargs = dict(self.kwargs, match_mode=mode)
        if self._accepts("question"):
            kwargs["question"] = t.question
        return (t.response_text, t.ground_truth), kwargs

    @staticmethod
    def _to_score(t: Trajectory, result) -> Score:
        """A (reward, info) result, or the exception the call raised -> reward 0 with
        ``reward_error`` (a broken plugin must not take the run down silently)."""
        error = result if isinstance(result, BaseException) else None
        if error is None:
            try:
                reward, info = result
                return Score(float(reward), {k: float(v) for k, v in info.items()})
            except Exception as e:  # noqa: BLE001 - not a (reward, info) of numbers
                error = e
        log.warning("reward fn failed on %s: %s: %s", t.prompt_id, type(error).__name__,
                    error)
        return Score(0.0, {"correct": 0.0, "reward_error": 1.0})

    def score(self, trajs: list[Trajectory]) -> list[Trajectory]:
        """``scores`` applied to ``trajs`` in place (the eval and local callers)."""
        for t, s in zip(trajs, self.scores(trajs)[0]):
            s.apply(t)
        return trajs

    def ping(self) -> bool:
        return True

    def _align(self, trajs: list[Trajectory], out: list[Score]) -> dict:
        """Per tool call: (description, crop) -> score in [0, 1] and a status; a missing,
        over-long or failed description scores 0 and keeps its status for the metrics."""
        from mmagent_rl.trajectory import description_for_call

        t0 = time.perf_counter()
        descs, images, where = [], [], []
        for i, t in enumerate(trajs):
            for k, call in enumerate(t.tool_calls):
                descs.append(description_for_call(t, k, self.mapo.description,
                                                  t.turn_texts))
                images.append(t.images[call.image_index] if call.image_index is not None
                              else None)
                where.append(i)
        scores, statuses = self.clip.score_detailed(descs, images) if descs else ([], [])
        for s in out:
            s.align_scores, s.align_statuses = [], []
        for i, sc, st in zip(where, scores, statuses):
            out[i].align_scores.append(sc)
            out[i].align_statuses.append(st)
        return {"mapo/align_pairs": float(len(descs)),
                "mapo/align_time_s": time.perf_counter() - t0}


def _is_async(fn) -> bool:
    """An ``async def`` function (or partial of one), or an object whose ``__call__`` is."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None))


def _keyword_names(fn) -> set[str] | None:
    """The keyword arguments ``fn`` takes by name; None when it takes ``**kwargs`` (or
    its signature cannot be read): then it is given every optional argument."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


# Module functions, not RewardScorer methods: a Ray actor class with an ``async def``
# method would become an async actor.
async def _gather(fn, calls: list) -> list:
    """Every call of the batch at once (``calls``: (args, kwargs) or an exception); a
    raising call becomes its exception in the result list, the others still run."""
    async def one(call):
        if isinstance(call, BaseException):
            raise call
        args, kwargs = call
        return await fn(*args, **kwargs)

    return await asyncio.gather(*(one(c) for c in calls), return_exceptions=True)


def _run(coro):
    """``asyncio.run(coro)``; from inside a running event loop, in a thread of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def make_reward_actor(num_cpus: float, num_gpus: float = 0.0, max_restarts: int = 3):
    """Restarted by Ray up to ``max_restarts`` times; the driver retries the call."""
    import ray

    return ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=max_restarts,
                      max_task_retries=0)(RewardScorer)
