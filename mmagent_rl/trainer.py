"""The driver loop: generate -> score -> advantages -> learn -> sync, every step.

The driver only calls actor methods (generate, score, train_step, save); it never
reaches into an actor (weight sync too: ``Learner.export_weight_refs`` then
``RolloutWorker.load_weight_refs``). What differs between algorithms is behind
the hooks of ``self.algorithm`` (mmagent_rl/algos/registry.py): no name is tested here.
The rest lives in mixins: ``Actors`` (cluster.py: start-up, fault-tolerant calls, weight
sync, save), ``Checkpointing`` (checkpoint.py: save and resume), ``HeldOutEval`` (eval.py),
``RolloutsAhead`` (ahead.py: rollouts generated while the learners train).
"""
from __future__ import annotations

import json
import logging
import os
import time

from omegaconf import OmegaConf

from mmagent_rl import algos
from mmagent_rl.ahead import RolloutsAhead
from mmagent_rl.checkpoint import Checkpointing
from mmagent_rl.cluster import Actors, shard_for_learners, start_ray
from mmagent_rl.config import Config, check_resources, validate
from mmagent_rl.eval import HeldOutEval
from mmagent_rl.faults import ActorGaveUp, LearnerLost, Restarts, fault_stop_reason
from mmagent_rl.guards import NonfiniteGuard, ToolCollapseWatch
from mmagent_rl.learner.worker import finalize_metrics
from mmagent_rl.metrics import RunLogger, format_eval, format_step, rollout_metrics
from mmagent_rl.sources import data_metrics, make_dataset, resolve_model_path
from mmagent_rl.trajectory import Trajectory, group_by_prompt

log = logging.getLogger(__name__)


class Trainer(Actors, Checkpointing, HeldOutEval, RolloutsAhead):
    _logged_step: int | None = None  # the last step written to metrics.jsonl (this process)

    def __init__(self, cfg: Config, run_dir: str):
        if OmegaConf.is_config(cfg):  # plain dataclasses from here on
            cfg = OmegaConf.to_object(cfg)
        validate(cfg)
        from mmagent_rl.reward.task import load_reward_fn

        load_reward_fn(cfg.reward.fn)  # a bad import path fails here, before any actor
        from mmagent_rl.tools.registry import ToolSet

        self.tools = ToolSet.from_config(cfg.rollout)  # so does a bad rollout.tools entry
        self.cfg, self.run_dir = cfg, run_dir
        os.makedirs(run_dir, exist_ok=True)
        self.model_path = resolve_model_path(cfg)
        self.data_skipped: dict = {}
        self.dataset = make_dataset(cfg, "train", skipped=self.data_skipped)
        self.nonfinite = NonfiniteGuard(cfg.trainer.max_nonfinite_steps)
        self.faults = Restarts(cfg.trainer.max_actor_restarts, cfg.trainer.step_timeout_s,
                               cfg.trainer.actor_restart_timeout_s)
        self.eval_examples = (list(make_dataset(cfg, "eval"))[:cfg.eval.max_examples or None]
                              if cfg.trainer.eval_every else [])  # as the eval CLI's
        if cfg.trainer.eval_every and not self.eval_examples:
            raise ValueError("trainer.eval_every is set but the held-out split is empty "
                             "(data.eval_size, or the rows of data.eval_path)")
        self.collapse = ToolCollapseWatch(cfg.trainer.tool_collapse_floor)
        self.algorithm = algos.build(cfg.algo)
        self._init_ahead()
        # per step (reset by train_step): the step's prompts by id (AXPO continues from
        # them) and the reward actor's additive metrics, summed over its calls
        self._step_examples: dict = {}
        self._reward_metrics: dict = {}
        self.t_fit = time.perf_counter()  # time/elapsed counts from fit() (or here) ...
        self.elapsed_before = 0.0  # ... plus, on resume, the checkpointed run's elapsed
        self.stop_reason: str | None = None
        self.exit_status = 0  # launch.py exits with it when a stop_reason is set
        resume = self._prepare_resume()  # before the logs open: may trim metrics.jsonl
        self.metrics_log = RunLogger(cfg, run_dir, resume_step=resume.get("step", 0),
                                     wandb_id=resume.get("wandb_id"))
        start_ray(cfg)
        import ray

        check_resources(cfg, ray.cluster_resources())  # before any actor starts
        self._start_actors()
        self.step = 0
        self.data_pos = 0
        if self.resume_from:
            self._resume(resume)

    # ---- one step ------------------------------------------------------------------
    def _draw_examples(self, count: int):
        n = len(self.dataset)
        out = [self.dataset[(self.data_pos + i) % n] for i in range(count)]
        self.data_pos += count
        return out

    def _next_examples(self, count: int):
        out = self._draw_examples(count)
        self._step_examples.update((ex.id, ex) for ex in out)
        return out

    def _rollout(self, examples, seed: int) -> list[Trajectory]:
        """Generate, then score: every rollout worker gets a share of the prompts."""
        R, n = len(self.rollouts), self.cfg.rollout.n
        chunks = [examples[i::R] for i in range(R)]
        parts = self._on_rollouts([(i, lambda w, ch=ch: w.generate.remote(ch, n, seed))
                                   for i, ch in enumerate(chunks) if ch])
        return [t for p in parts for t in p]

    def _sample_groups(self, step_seed: int) -> tuple[list[Trajectory], dict, dict]:
        """B groups; with dynamic sampling (DAPO), groups whose rewards are all equal are
        dropped and refilled from the data, for at most ``max_refill_rounds`` rounds."""
        c = self.cfg
        B = c.trainer.prompts_per_step
        kept: list[Trajectory] = []
        times = {"time/generate": 0.0, "time/score": 0.0}
        info = {"dapo/dropped_groups": 0, "dapo/rounds": 0}
        for r in range(1 + (c.trainer.max_refill_rounds if c.algo.grpo.dynamic_sampling else 0)):
            need = B - len(group_by_prompt(kept))
            if need <= 0:
                break
            t0 = time.perf_counter()
            if r == 0 and self.off_policy_steps:  # generated ahead (ahead.py)
                examples, trajs, wait_s, gen_s = self._take_ahead()
                self._step_examples.update((ex.id, ex) for ex in examples)
                times["time/generate"] += wait_s
                times["time/generate_ahead"] = gen_s
            else:
                trajs = self._rollout(self._next_examples(need), step_seed + 7919 * r)
                times["time/generate"] += time.perf_counter() - t0
            self.check_versions(trajs)
            t0 = time.perf_counter()
            trajs = self._score(trajs)
            times["time/score"] += time.perf_counter() - t0
            info["dapo/rounds"] = r + 1
            if not c.algo.grpo.dynamic_sampling:
                return trajs, times, {}
            for g in group_by_prompt(trajs).values():
                if len({t.reward for t in g}) > 1:
                    kept.extend(g)
                else:
                    info["dapo/dropped_groups"] += 1
        if not kept:  # nothing informative: train on the last round (zero advantages)
            kept = trajs
        return kept, times, info

    def train_step(self) -> dict:
        c, step = self.cfg, self.step
        t_start = time.perf_counter()
        self._step_examples, self._reward_metrics = {}, {}
        trajs, times, extra = self._sample_groups(c.trainer.seed * 100003 + step)
        extra.update(self.staleness_metrics(trajs))  # against this step's version
        self.last_trajectories = trajs  # for benchmarks and debugging
        adv, algo_metrics = self.algorithm.advantages(trajs)
        extra.update(algo_metrics)
        num_tokens, num_seqs = sum(t.num_generated for t in trajs), len(trajs)
        batch, more = self.algorithm.extra_rollouts(trajs, algos.StepContext(
            step=step, seed=c.trainer.seed, prompts_per_step=c.trainer.prompts_per_step,
            group_size=c.rollout.n, tool_call_open_id=self.tool_call_open_id,
            continue_from=self._continue_from))
        extra.update(more)

        t0 = time.perf_counter()
        shards = shard_for_learners(batch, len(self.learners))
        # Normalised by the ordinary batch: AXPO's extra continuations never shrink the
        # weight of an ordinary rollout (docs/algorithms.md: ordinary rollouts keep 1/G).
        version = self.step if self.off_policy_steps else None  # None: all on-policy
        per_rank = self._learners_get([
            lr.train_step.remote(s, num_tokens, num_seqs, policy_version=version)
            for lr, s in zip(self.learners, shards)])
        learn = finalize_metrics(per_rank)
        t_learn = time.perf_counter() - t0
        extra.update(self._reward_metrics)
        extra.update(self.algorithm.after_learn({**learn, **extra}, step + 1))

        t0 = time.perf_counter()
        with self.weights_lock:  # a restore in the background waits (ahead.py)
            self.sync_weights(step + 1)
            self.step += 1
        t_sync = time.perf_counter() - t0
        total = time.perf_counter() - t_start
        gen_tokens = sum(t.num_generated for t in batch)
        m = {"step": self.step, **learn, **rollout_metrics(trajs, self.tools.names),
             **extra, **times,
             "adv/abs_mean": float(adv.abs().mean()), "time/learn": t_learn,
             "time/sync": t_sync, "time/step": total, "tokens/generated": gen_tokens,
             "tokens_per_s": gen_tokens / total if total > 0 else 0.0,
             "gen_tokens_per_s": gen_tokens / times["time/generate"]
             if times["time/generate"] > 0 else 0.0,
             "samples": len(batch), "data/position": self.data_pos,
             **{k: float(v) for k, v in sorted(self.faults.counts.items())}}
        m.pop("tokens", None)
        m.update(self.collapse.update(m.get("tool/use_rate"), self.step))
        if self._eval_due():
            m.update(self.evaluate_heldout())
        m["time/elapsed"] = self.elapsed()
        if c.data.kind == "file":
            m.update(data_metrics(self.data_skipped, len(self.dataset)))
        m["train/nonfinite_in_a_row"] = float(self.nonfinite.update(m))
        if self.metrics_log:
            self.metrics_log.log(m)
        self._logged_step = self.step
        return m

    def elapsed(self) -> float:
        """Wall time of the run's training so far, across resumes."""
        return self.elapsed_before + time.perf_counter() - self.t_fit

    def _continue_from(self, prefixes: list[Trajectory], k: int, seed: int) -> list[Trajectory]:
        """k scored continuations of each prefix (AXPO), split over the rollout workers;
        the tool crops from the prefix's own example."""
        R = len(self.rollouts)
        exs = [self._step_examples[p.example_id] for p in prefixes]
        parts = self._on_rollouts([
            (i, lambda w, i=i: w.continue_from.remote(prefixes[i::R], exs[i::R], k, seed + i))
            for i in range(R) if prefixes[i::R]])
        return self._score([t for p in parts for t in p])

    # ---- the run -------------------------------------------------------------------
    def fit(self) -> list[dict]:
        from tqdm import tqdm

        c = self.cfg
        history = []
        self.t_fit = time.perf_counter()
        if c.trainer.eval_every and self.step == 0:  # the "before" figure
            try:
                row = {"step": 0, **self.evaluate_heldout()}
            except (LearnerLost, ActorGaveUp) as e:
                self._stop_on_fault(e, during="the held-out eval before step 1")
                return history
            row["time/elapsed"] = self.elapsed()
            if self.metrics_log:
                self.metrics_log.log(row)
            log.info("held-out eval before training: %s", format_eval(row))
        bar = tqdm(total=c.trainer.total_steps, desc="train", disable=not c.trainer.progress,
                   dynamic_ncols=True)
        while self.step < c.trainer.total_steps:
            try:
                m = self.train_step()
                history.append(m)
                if c.trainer.save_every and self.step % c.trainer.save_every == 0:
                    self.save_checkpoint()
            except (LearnerLost, ActorGaveUp) as e:
                self._stop_on_fault(e)
                break
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.4f}", reward=f"{m['reward/mean']:.2f}",
                            tool=f"{m['tool/use_rate']:.2f}")
            bar.write(format_step(m))
            if self.nonfinite.should_stop:
                break
        bar.close()
        if self.exit_status:  # an actor fault: the learners' state is gone, nothing to save
            return history
        if self.nonfinite.should_stop:
            self.stop_reason = self.nonfinite.stop_reason(self.step)
            log.error("%s", self.stop_reason)
            self.exit_status = 3
        if c.trainer.save_final:
            self.save(os.path.join(self.run_dir, "checkpoints", "final"))
        if self.last_eval is not None:
            with open(os.path.join(self.run_dir, "eval.json"), "w") as f:
                json.dump(self.last_eval, f, indent=1)
        return history

    def _stop_on_fault(self, err: Exception, during: str | None = None) -> None:
        """A clean stop: the step in progress is not logged nor counted (nor a step
        whose held-out eval failed after it trained); the message says how to go on."""
        logged = self.step if self._logged_step is None else self._logged_step
        self.stop_reason = fault_stop_reason(err, during, logged, self.run_dir)
        self.exit_status = 4
        log.error("%s", self.stop_reason)
