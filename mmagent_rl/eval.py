"""pass@1 / pass@k and tool-use figures on a held-out split, for any checkpoint.

    python -m mmagent_rl.eval [eval.checkpoint=DIR] [eval.n_samples=4 eval.k=4]
                              [data.format=tsv data.eval_path=FILE] [hydra.run.dir=...]

With no checkpoint it evaluates the model the config names (the embedded agent by
default); with data.eval_path, on that file (a benchmark: docs/data_formats.md), else on
the held-out split. Prints a table, one per ``category`` too, and writes ``eval.json``
(``by_category`` included) in the run directory.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from statistics import mean, stdev

from mmagent_rl.metrics import tool_metrics
from mmagent_rl.rollout.agent_loop import eval_agent_config
from mmagent_rl.tools.parse import ZOOM_TOOL_NAME
from mmagent_rl.tools.zoom import is_valid_box
from mmagent_rl.trajectory import Trajectory, group_by_prompt

log = logging.getLogger(__name__)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimator 1 - C(n-c, k) / C(n, k) (n samples, c correct)."""
    if k > n:
        raise ValueError(f"k={k} > n={n} samples")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def standard_error(xs: list[float]) -> float:
    return stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else 0.0


def box_contains(box, target) -> bool:
    return (box[0] <= target[0] and box[1] <= target[1]
            and box[2] >= target[2] and box[3] >= target[3])


def summarize(trajs: list[Trajectory], k: int, tool_names=()) -> dict:
    """The eval.json figures from scored trajectories (n per example)."""
    groups = group_by_prompt(trajs)
    # box figures: zoom calls (and calls whose name did not parse); other tools have no box
    calls = [(t, c) for t in trajs for c in t.tool_calls if c.name in (None, ZOOM_TOOL_NAME)]
    valid = [c.bbox is not None and is_valid_box(c.bbox, *t.image_size) for t, c in calls]
    with_target = [(t, c) for t, c in calls if t.target_box and c.bbox is not None
                   and is_valid_box(c.bbox, *t.image_size)]
    hits = [box_contains(c.bbox, t.target_box) for t, c in with_target]
    n_with_target = sum(1 for t, _ in calls if t.target_box)
    tool, no_tool = [t for t in trajs if t.used_tool], [t for t in trajs if not t.used_tool]
    n = min(len(g) for g in groups.values())
    p1 = [pass_at_k(len(g), sum(t.correct for t in g), 1) for g in groups.values()]
    pk = [pass_at_k(len(g), sum(t.correct for t in g), min(k, len(g))) for g in groups.values()]
    return {
        "n_examples": len(groups),
        "n_samples": n,
        "accuracy": mean(float(t.correct) for t in trajs),
        "pass@1": mean(p1),
        # standard errors over examples (the samples of one example are not independent)
        "pass@1_se": standard_error(p1),
        "pass@k": mean(pk),
        "pass@k_se": standard_error(pk),
        "k": min(k, n),
        "tool_call_rate": len(tool) / len(trajs),
        "format_rate": float(mean(valid)) if valid else 0.0,
        "box_hit_rate": (sum(hits) / n_with_target) if n_with_target else 0.0,
        "accuracy_with_tool": mean(float(t.correct) for t in tool) if tool else 0.0,
        "accuracy_without_tool": mean(float(t.correct) for t in no_tool) if no_tool else 0.0,
        "answer_rate": mean(t.reward_info.get("has_answer", 0.0) for t in trajs),
        "mean_turns": mean(t.turns for t in trajs),
        "by_category": by_category(trajs, k),
        # per tool: calls, errors, mean latency (the tool/<name>/* training metrics)
        **tool_metrics([c for t in trajs for c in t.tool_calls], tool_names),
    }


def by_category(trajs: list[Trajectory], k: int) -> dict:
    """Per ``meta["category"]`` (benchmarks' task types; examples without one count as
    "all"): examples, accuracy, pass@1 and pass@k, as in :func:`summarize`."""
    cats: dict[str, list[list[Trajectory]]] = {}
    for group in group_by_prompt(trajs).values():
        cats.setdefault(str(group[0].meta.get("category", "all")), []).append(group)
    out = {}
    for cat, groups in sorted(cats.items()):
        flat = [t for g in groups for t in g]
        out[cat] = {
            "n_examples": len(groups),
            "accuracy": mean(float(t.correct) for t in flat),
            "pass@1": mean(pass_at_k(len(g), sum(t.correct for t in g), 1) for g in groups),
            "pass@k": mean(pass_at_k(len(g), sum(t.correct for t in g), min(k, len(g)))
                           for g in groups),
        }
    return out


def run_eval(loop, examples, *, n_samples: int, seed: int, scorer) -> list[Trajectory]:
    """The one evaluator: ``n_samples`` rollouts per example through ``loop`` (an
    AgentLoop built with :func:`eval_agent_config`), scored by ``scorer`` (a
    RewardScorer). The CLI below and the trainer's held-out eval both run this; the
    trainer splits the examples over its rollout workers and summarises the union."""
    trajs = loop.run(list(examples), n=n_samples, seed=seed)
    scorer.score(trajs)
    return trajs


def evaluate(model_path: str, examples, *, n_samples: int, k: int, temperature: float,
             agent_cfg, engine_cfg, reward_cfg=None, seed: int = 0,
             system_prompt: str | None = None,
             blank_tool_images: bool = False, tools=None) -> tuple[dict, list[Trajectory]]:
    """``reward_cfg``: the reward section the rollouts are scored with (default:
    RewardConfig())."""
    from mmagent_rl.reward.worker import RewardScorer
    from mmagent_rl.rollout.agent_loop import AgentLoop
    from mmagent_rl.chat import ChatFormat
    from mmagent_rl.rollout.engine import VLLMEngine

    engine = VLLMEngine(model_path, engine_cfg)
    loop = AgentLoop(engine, ChatFormat.from_pretrained(model_path, system_prompt),
                     eval_agent_config(agent_cfg, temperature, blank_tool_images), tools)
    trajs = run_eval(loop, examples, n_samples=n_samples, seed=seed,
                     scorer=RewardScorer(reward_cfg))
    return summarize(trajs, k, loop.tools.names), trajs


class HeldOutEval:
    """The held-out eval inside training (a mixin of ``Trainer``: it uses the run's
    config, rollout workers and ``eval_examples``): before the first step, every
    ``trainer.eval_every`` steps and after the last: the rollouts on the workers, the
    scoring (as :func:`run_eval` does) and the summary on the driver."""
    last_eval: dict | None = None  # the latest held-out eval's summary (eval.json)
    _eval_refs: list | None = None  # (worker index, ObjectRef of its eval share)

    def _eval_due(self) -> bool:
        every = self.cfg.trainer.eval_every
        return bool(every) and (self.step % every == 0
                                or self.step == self.cfg.trainer.total_steps)

    def evaluate_heldout(self) -> dict:
        """The held-out figures with the current weights: the eval examples split over
        the rollout workers, their rollouts scored and summarised here as run_eval
        does. Returns ``eval/*`` metrics; the full summary is kept for eval.json."""
        import ray

        c, E = self.cfg, self.cfg.eval
        t0 = time.perf_counter()
        if self._eval_refs is None:  # each worker's non-empty share, put in Ray once
            from mmagent_rl.example import examples_to_wire

            R = len(self.rollouts)
            self._eval_refs = [(i, ray.put(examples_to_wire(share))) for i in range(R)
                               if (share := self.eval_examples[i::R])]
            self.eval_examples = []  # the object store holds them now
        parts = self._on_rollouts([
            (i, lambda w, ref=ref: w.evaluate.remote(
                [ref], E.n_samples, E.seed, E.temperature, E.blank_tool_images))
            for i, ref in self._eval_refs])
        from mmagent_rl.reward.worker import RewardScorer

        trajs = RewardScorer(c.reward).score(
            [t for p in parts for t in p])
        result = summarize(trajs, E.k, self.tools.names)
        result["step"] = self.step
        result["time_s"] = time.perf_counter() - t0
        self.last_eval = result
        return {f"eval/{k}": float(v) for k, v in result.items()
                if isinstance(v, (int, float)) and k != "step"}


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="eval")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, v in result.items():
        if not isinstance(v, dict):
            table.add_row(key, f"{v:.4f}" if isinstance(v, float) else str(v))
    Console().print(table)
    cats = result.get("by_category") or {}
    if cats:
        per = Table(title="by category")
        for col in ("category", "n_examples", "accuracy", "pass@1", "pass@k"):
            per.add_column(col, justify="left" if col == "category" else "right")
        for cat, row in cats.items():
            per.add_row(cat, str(row["n_examples"]),
                        *(f"{row[c]:.4f}" for c in ("accuracy", "pass@1", "pass@k")))
        Console().print(per)


def main() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from mmagent_rl.config import register

    register()

    @hydra.main(version_base="1.3", config_path="../conf", config_name="config")
    def _run(cfg) -> None:
        import torch

        from mmagent_rl.config import agent_config, system_prompt
        from mmagent_rl.sources import make_dataset, resolve_model_path
        from mmagent_rl.tools.registry import ToolSet

        c = OmegaConf.to_object(cfg)
        torch.set_num_threads(c.eval.torch_threads)
        run_dir = HydraConfig.get().runtime.output_dir
        path = c.eval.checkpoint or resolve_model_path(c)
        examples = make_dataset(c, "eval")
        if c.eval.max_examples:
            examples = [examples[i] for i in range(min(c.eval.max_examples, len(examples)))]
        result, _ = evaluate(
            path, examples, n_samples=c.eval.n_samples, k=c.eval.k,
            temperature=c.eval.temperature, agent_cfg=agent_config(c),
            engine_cfg=c.rollout.engine, reward_cfg=c.reward, seed=c.eval.seed,
            system_prompt=system_prompt(c), blank_tool_images=c.eval.blank_tool_images,
            tools=ToolSet.from_config(c.rollout))
        result["checkpoint"] = path
        print_table(result)
        with open(os.path.join(run_dir, "eval.json"), "w") as f:
            json.dump(result, f, indent=1)

    _run()


if __name__ == "__main__":
    main()
