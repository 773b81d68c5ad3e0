"""Per-step rollout metrics and the local JSONL log that plots are drawn from."""
from __future__ import annotations

import json
import math
import os
from statistics import mean

from mmagent_rl.trajectory import Trajectory, group_by_prompt


def rollout_metrics(trajs: list[Trajectory]) -> dict[str, float]:
    """Rewards, accuracy and tool use of one step's trajectories.

    ``tool/all_wrong_rate`` is the share of groups (prompts) whose tool-using rollouts
    are non-empty and all wrong: AXPO's trigger rate, over all groups of the step."""
    if not trajs:
        return {}
    groups = group_by_prompt(trajs)
    all_wrong = 0
    for g in groups.values():
        used = [t for t in g if t.used_tool]
        if used and not any(t.correct for t in used):
            all_wrong += 1
    calls = [c for t in trajs for c in t.tool_calls]
    with_tool = [t for t in trajs if t.used_tool]
    without = [t for t in trajs if not t.used_tool]
    m = {
        "reward/mean": mean(t.reward or 0.0 for t in trajs),
        "reward/std": _std([t.reward or 0.0 for t in trajs]),
        "acc/mean": mean(float(t.correct) for t in trajs),
        "acc/with_tool": mean(float(t.correct) for t in with_tool) if with_tool else 0.0,
        "acc/without_tool": mean(float(t.correct) for t in without) if without else 0.0,
        "format/answer_rate": mean(t.reward_info.get("has_answer", 0.0) for t in trajs),
        "tool/use_rate": len(with_tool) / len(trajs),
        "tool/all_wrong_rate": all_wrong / len(groups),
        "tool/calls_per_traj": len(calls) / len(trajs),
        "tool/error_rate": (sum(not c.ok for c in calls) / len(calls)) if calls else 0.0,
        "response/gen_tokens_mean": mean(t.num_generated for t in trajs),
        "response/len_mean": mean(len(t.token_ids) for t in trajs),
        "response/turns_mean": mean(int(t.meta.get("turns", 0)) for t in trajs),
        "response/max_tokens_rate": mean(float(t.finish_reason == "max_tokens") for t in trajs),
        "response/max_turns_rate": mean(float(t.finish_reason == "max_turns") for t in trajs),
    }
    return m


def _std(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    mu = mean(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1))


class JsonlLogger:
    """Appends one JSON object per line and flushes it, so a crash loses nothing."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self._f = open(path, "a", encoding="utf-8")

    def log(self, record: dict) -> None:
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v))
                 for k, v in record.items()}
        self._f.write(json.dumps(clean) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()
