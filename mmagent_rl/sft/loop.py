"""The SFT driver: batches to the DeepSpeed learners, a row of metrics per step, the
final HF checkpoint. Two modes, one loop:

- plain (``sft.stages`` empty): whole demonstrations, from a jsonl file or generated,
  ``sft.batch_size`` a step, for ``sft.steps`` steps, the learner's LR schedule;
- curriculum (``sft.stages``): stages of sample kinds with skill gates
  (mmagent_rl/sft/curriculum.py, probes.py), the LR set here each step: linear warm-up,
  constant, and a cosine to ``min_lr_ratio`` over the last stage only (a stage that ends
  early does not shift the decay). ``sft.steps`` caps the total.

The next batch is prepared while the learners train on this one (its content depends
only on the step and stage, so a batch dropped because a gate opened changes nothing).
Writes ``metrics.jsonl``, ``stages.json`` and ``checkpoints/final`` in the run dir.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class Position:
    step: int
    stage: int = -1  # -1: plain SFT
    stage_step: int = 0


def lr_at(sft, pos: Position) -> float:
    if pos.step < sft.warmup_steps:
        return sft.lr * (pos.step + 1) / sft.warmup_steps
    if pos.stage < len(sft.stages) - 1:
        return sft.lr
    p = min(1.0, pos.stage_step / max(1, sft.stages[pos.stage].steps))
    lo = sft.min_lr_ratio
    return sft.lr * (lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * p)))


def next_position(sft, pos: Position, advanced: bool) -> Position | None:
    if pos.step + 1 >= sft.steps:
        return None
    if pos.stage < 0:
        return Position(pos.step + 1)
    if advanced or pos.stage_step + 1 >= sft.stages[pos.stage].steps:
        if pos.stage + 1 == len(sft.stages):
            return None
        return Position(pos.step + 1, pos.stage + 1, 0)
    return Position(pos.step + 1, pos.stage, pos.stage_step + 1)


def run_sft(cfg, run_dir: str) -> list[dict]:
    from tqdm import tqdm

    import ray

    from mmagent_rl import algos
    from mmagent_rl.chat import ChatFormat
    from mmagent_rl.cluster import shard_for_learners, start_learners, start_ray
    from mmagent_rl.config import validate_common
    from mmagent_rl.metrics import JsonlLogger
    from mmagent_rl.sft.curriculum import Curriculum, DemoSource
    from mmagent_rl.sft.probes import KeyTokens, skill_metrics
    from mmagent_rl.sources import resolve_model_path

    validate_common(cfg)
    sft = cfg.sft
    model_path = resolve_model_path(cfg)
    # the prompt the RL rollouts will see: with the tools' schemas when they are offered
    # there (rollout.tools_in_prompt; a bad rollout.tools entry fails here)
    from mmagent_rl.tools.registry import ToolSet

    chat = ToolSet.from_config(cfg.rollout).prompt_chat(
        ChatFormat.from_pretrained(model_path, cfg.model.system_prompt))
    curriculum = bool(sft.stages)
    source = Curriculum(cfg, chat) if curriculum else DemoSource(cfg, chat)
    keys = KeyTokens(chat.tokenizer) if curriculum else None
    start_ray(cfg)
    # the SFT objective needs no algorithm: the baseline without KL loads no reference
    no_ref = algos.baseline_config()
    no_ref.grpo.kl_beta = 0.0
    learners = start_learners(cfg, model_path, algo=no_ref, total_steps=sft.steps, lr=sft.lr)
    timeout = cfg.trainer.step_timeout_s
    metrics = JsonlLogger(os.path.join(run_dir, "metrics.jsonl"))

    def prepare(pos: Position):
        if not curriculum:
            return "demo", source.batch(pos.step, sft.batch_size), None
        kind, trajs = source.batch(pos.step, sft.stages[pos.stage])
        return kind, trajs, lr_at(sft, pos)

    history, stages, gate = [], [], []
    pos = Position(0, 0 if curriculum else -1)
    batch = prepare(pos)
    if curriculum:
        stages.append({"name": sft.stages[0].name, "start_step": 1})
    bar = tqdm(total=sft.steps, desc="sft", disable=not cfg.trainer.progress)
    t_start = time.perf_counter()
    while pos is not None:
        t0 = time.perf_counter()
        kind, trajs, lr = batch
        n_tok = sum(t.num_generated for t in trajs)
        refs = [lr_.train_step.remote(s, n_tok, len(trajs), "sft", lr=lr)
                for lr_, s in zip(learners, shard_for_learners(trajs, len(learners)))]
        guess = next_position(sft, pos, advanced=False)
        upcoming = prepare(guess) if guess else None  # while the learners work
        per_rank = ray.get(refs, timeout=timeout)
        m = {"step": pos.step + 1, "loss": sum(r["loss"] for r in per_rank),
             "grad_norm": per_rank[0]["grad_norm"], "lr": per_rank[0]["lr"],
             "tokens": n_tok, "data/skipped_rows": source.skipped}
        advanced = False
        if curriculum:
            stage = sft.stages[pos.stage]
            preds = [p for r in per_rank for p in r["predictions"]][:len(trajs)]
            probes = skill_metrics(trajs, preds, keys)
            m.update({"sft/stage": pos.stage, f"{kind}/loss": m["loss"],
                      **{f"{kind}/{k}": v for k, v in probes.items()}})
            if stage.advance_metric and stage.advance_metric in m:
                gate = (gate + [m[stage.advance_metric]])[-stage.advance_window:]
                advanced = (len(gate) == stage.advance_window
                            and sum(gate) / len(gate) >= stage.advance_at)
        m["time/step"] = time.perf_counter() - t0
        m["time/elapsed"] = time.perf_counter() - t_start
        metrics.log(m)
        history.append(m)
        bar.update(1)
        if advanced:
            log.info("sft: stage %s passed its gate (%s %.3f >= %.3f) at step %d",
                     stage.name, stage.advance_metric, sum(gate) / len(gate),
                     stage.advance_at, pos.step + 1)
            upcoming = None
        nxt = next_position(sft, pos, advanced)
        if curriculum and nxt is not None and nxt.stage != pos.stage:
            stages[-1].update(end_step=pos.step + 1, gate_passed=advanced)
            stages.append({"name": sft.stages[nxt.stage].name, "start_step": nxt.step + 1})
            gate = []
        if nxt is not None and (upcoming is None or nxt != guess):
            upcoming = prepare(nxt)
        pos, batch = nxt, upcoming
    bar.close()
    if curriculum:
        stages[-1].update(end_step=len(history), gate_passed=False)
        with open(os.path.join(run_dir, "stages.json"), "w") as f:
            json.dump(stages, f, indent=1)
    out = os.path.join(run_dir, "checkpoints", "final")
    ray.get([lr_.save.remote(out) for lr_ in learners], timeout=timeout)
    metrics.close()
    for a in learners:
        ray.kill(a)
    log.info("sft: %d steps in %.0f s, checkpoint %s", len(history),
             time.perf_counter() - t_start, out)
    return history
