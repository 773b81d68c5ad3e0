"""The driver loop: generate -> score -> advantages -> learn -> sync, every step.

The driver only calls actor methods (generate, score, train_step, save); it never
reaches into an actor (weight sync too: ``Learner.export_weight_refs`` then
``RolloutWorker.load_weight_refs``). What differs between algorithms is behind
the hooks of ``self.algorithm`` (mmagent_rl/algos/registry.py): no name is tested here.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time

from omegaconf import OmegaConf

from mmagent_rl import algos
from mmagent_rl.checkpoint import Checkpointing
from mmagent_rl.cluster import shard_for_learners, start_learners, start_ray
from mmagent_rl.config import Config, check_resources, system_prompt, validate
from mmagent_rl.eval import HeldOutEval
from mmagent_rl.faults import ActorGaveUp, LearnerLost, Restarts, learner_get
from mmagent_rl.guards import NonfiniteGuard, ToolCollapseWatch
from mmagent_rl.learner.worker import finalize_metrics
from mmagent_rl.metrics import RunLogger, format_eval, format_step, rollout_metrics
from mmagent_rl.sources import data_metrics, make_dataset, resolve_model_path
from mmagent_rl.trajectory import Trajectory, group_by_prompt

log = logging.getLogger(__name__)


class Trainer(Checkpointing, HeldOutEval):
    _logged_step: int | None = None  # the last step written to metrics.jsonl (this process)

    def __init__(self, cfg: Config, run_dir: str):
        if OmegaConf.is_config(cfg):  # plain dataclasses from here on
            cfg = OmegaConf.to_object(cfg)
        validate(cfg)
        from mmagent_rl.reward.task import load_reward_fn

        load_reward_fn(cfg.reward.fn)  # a bad import path fails here, before any actor
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

    # ---- set-up --------------------------------------------------------------------
    def _start_actors(self) -> None:
        from mmagent_rl.reward.worker import make_reward_actor
        from mmagent_rl.rollout.worker import make_rollout_actor

        c = self.cfg
        restarts = c.trainer.max_actor_restarts
        Rollout = make_rollout_actor(c.rollout.num_cpus, c.rollout.num_gpus, restarts,
                                     c.rollout.spread_nodes)
        # trainer.seed reaches unseeded sampling too (the engine's global generator);
        # seed 0 keeps rollout.engine.seed as it is.
        engine_cfg = dataclasses.replace(
            c.rollout.engine, seed=c.rollout.engine.seed + 1_000_003 * c.trainer.seed)
        self.rollouts = [Rollout.remote(self.model_path, engine_cfg, c.rollout.agent,
                                        system_prompt(c))
                         for _ in range(c.rollout.num_workers)]
        Reward = make_reward_actor(c.reward.num_cpus, c.reward.num_gpus, restarts)
        alignment = self.algorithm.alignment()  # per-tool-call scores (MAPO) or None
        self.reward = Reward.remote(c.reward.fn, c.reward.match_mode, c.reward.format_weight,
                                    c.reward.clip if alignment else None, alignment)
        self.learners = start_learners(c, self.model_path, total_steps=c.trainer.total_steps)
        from mmagent_rl.chat import ChatFormat

        self.tool_call_open_id = ChatFormat.from_pretrained(self.model_path).tool_call_open_id
        self._get([a.ping.remote() for a in self.rollouts])
        self._learners_get([a.config.remote() for a in self.learners])

    def _get(self, refs):
        import ray

        return ray.get(refs, timeout=self.cfg.trainer.step_timeout_s)

    def _learners_get(self, refs):
        """Fails as soon as one learner fails; a dead learner raises LearnerLost."""
        return learner_get(refs, self.cfg.trainer.step_timeout_s)

    def _on_rollouts(self, jobs):
        """(worker index, submit) jobs; a worker that dies is restarted, given the
        current weights, and its job resubmitted unchanged (mmagent_rl/faults.py)."""
        return self.faults.call("rollout", self.rollouts, jobs,
                                restore=lambda i: self.sync_weights(self.step, only=[i]))

    def _score(self, trajs: list[Trajectory]) -> list[Trajectory]:
        """The reward actor's scores, applied here; its additive metrics are summed
        over the step (refill rounds and extra rollouts are scored separately)."""
        scores, metrics = self.faults.call("reward", [self.reward],
                                           [(0, lambda a: a.scores.remote(trajs))])[0]
        for t, s in zip(trajs, scores):
            s.apply(t)
        for k, v in metrics.items():
            self._reward_metrics[k] = self._reward_metrics.get(k, 0.0) + v
        return trajs

    # ---- one step ------------------------------------------------------------------
    def _next_examples(self, count: int):
        n = len(self.dataset)
        out = [self.dataset[(self.data_pos + i) % n] for i in range(count)]
        self.data_pos += count
        self._step_examples.update((ex.id, ex) for ex in out)
        return out

    def _rollout(self, examples, seed: int) -> list[Trajectory]:
        """Generate, then score: every rollout worker gets a share of the prompts."""
        R, n = len(self.rollouts), self.cfg.rollout.n
        chunks = [examples[i::R] for i in range(R)]
        parts = self._on_rollouts([(i, lambda w, ch=ch: w.generate.remote(ch, n, seed))
                                   for i, ch in enumerate(chunks) if ch])
        trajs = [t for p in parts for t in p]
        stale = {t.weights_version for t in trajs} - {self.step}
        if stale:  # e.g. a restarted engine that did not get the current weights
            raise RuntimeError(f"step {self.step + 1}: rollouts from weights version(s) "
                               f"{sorted(stale)}, expected {self.step}; not training on them")
        return trajs

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
            trajs = self._rollout(self._next_examples(need), step_seed + 7919 * r)
            times["time/generate"] += time.perf_counter() - t0
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
        per_rank = self._learners_get([lr.train_step.remote(s, num_tokens, num_seqs)
                                       for lr, s in zip(self.learners, shards)])
        learn = finalize_metrics(per_rank)
        t_learn = time.perf_counter() - t0
        extra.update(self._reward_metrics)
        extra.update(self.algorithm.after_learn({**learn, **extra}, step + 1))

        t0 = time.perf_counter()
        self.sync_weights(step + 1)
        t_sync = time.perf_counter() - t0

        self.step += 1
        total = time.perf_counter() - t_start
        gen_tokens = sum(t.num_generated for t in batch)
        m = {"step": self.step, **learn, **rollout_metrics(trajs), **extra, **times,
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

    def sync_weights(self, version: int, only: list[int] | None = None) -> None:
        """Learner rank 0's weights into every rollout engine (or those in ``only``):
        export and load run inside the actors (learner/sync.py, ``sync.bucket_mb``)."""
        c = self.cfg
        # Under ZeRO-3 gathering the full weights is a collective: every rank joins.
        group = self.learners if c.learner.zero_stage == 3 else self.learners[:1]
        refs = self._learners_get([lr.export_weight_refs.remote(c.sync.bucket_mb)
                                   for lr in group])[0]
        workers = range(len(self.rollouts)) if only is None else only
        # A worker that dies while loading comes back with the starting weights and is
        # given these again (no restore step needed: the retry is the load itself).
        self.faults.call("rollout", self.rollouts,
                         [(i, lambda w: w.load_weight_refs.remote(refs, version))
                          for i in workers])

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
            self.stop_reason = (
                f"stopped at step {self.step}: the last {self.nonfinite.in_a_row} steps had a "
                "NaN/inf loss or gradient and were skipped (trainer.max_nonfinite_steps="
                f"{c.trainer.max_nonfinite_steps}); the weights are unchanged since step "
                f"{self.step - self.nonfinite.in_a_row}")
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
        from mmagent_rl import checkpoint as ck

        logged = self.step if self._logged_step is None else self._logged_step
        last = ck.latest_checkpoint(self.run_dir)
        how = (f"rerun with trainer.resume=auto (same hydra.run.dir) to continue from {last}"
               if last else "no complete checkpoint to resume from (set trainer.save_every)")
        done = f"steps 1-{logged} are complete and logged" if logged else "no step is complete"
        self.stop_reason = (f"stopped during {during or f'step {logged + 1}'}: {err}; "
                            f"{done}; {how}")
        self.exit_status = 4
        log.error("%s", self.stop_reason)

    def save(self, path: str) -> str:
        """Atomic: written to a temporary folder, renamed when complete."""
        tmp = path + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self._learners_get([lr.save.remote(tmp) for lr in self.learners])
        shutil.rmtree(path, ignore_errors=True)
        os.rename(tmp, path)
        return path

    def weights_checksum(self) -> float:
        return self._get(self.learners[0].weights_checksum.remote())

    def shutdown(self) -> None:
        import ray

        if self.metrics_log:
            self.metrics_log.close()
        for a in self.rollouts + self.learners + [self.reward]:
            ray.kill(a)
