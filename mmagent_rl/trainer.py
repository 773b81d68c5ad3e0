"""The driver loop: generate -> score -> advantages -> learn -> sync, every step.

The driver only calls actor methods (generate, score, train_step, save); it never
reaches into an actor. Weight sync runs learner/sync.py's functions inside the learner
and rollout actors (``actor.__ray_call__``).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import socket
import time

from omegaconf import OmegaConf

from mmagent_rl import algos
from mmagent_rl.config import Config, check_resources, system_prompt, validate
from mmagent_rl.faults import ActorGaveUp, LearnerLost, Restarts, learner_get
from mmagent_rl.metrics import RunLogger, rollout_metrics
from mmagent_rl.learner.worker import finalize_metrics
from mmagent_rl.trajectory import Trajectory, group_by_prompt

log = logging.getLogger(__name__)


def resolve_model_path(cfg: Config) -> str:
    if cfg.model.path:
        return cfg.model.path
    if cfg.model.name == "embedded":  # the shipped SFT agent (mmagent_rl/models/embedded.py)
        from mmagent_rl.models.embedded import embedded_path

        return embedded_path()
    from mmagent_rl.models.tiny import TinySpec, ensure_tiny_model

    return str(ensure_tiny_model(TinySpec(family=cfg.model.tiny_family,
                                         seed=cfg.model.tiny_seed)))


def make_dataset(cfg: Config, split: str = "train", skipped: dict | None = None):
    """The examples of ``split``. For file data, ``skipped`` (if given) receives the
    number of bad rows skipped per reason."""
    if cfg.data.kind == "synthetic":
        from mmagent_rl.data.synthetic import SyntheticDataset

        if split == "train":
            return SyntheticDataset(cfg.data.synthetic, seed=cfg.data.seed,
                                    size=cfg.data.train_size, split="train")
        eval_seed = cfg.data.seed if cfg.data.eval_seed is None else cfg.data.eval_seed
        return SyntheticDataset(cfg.data.synthetic, seed=eval_seed,
                                size=cfg.data.eval_size, split="test")  # held out
    from mmagent_rl.data.datasets import load_examples

    path = cfg.data.path if split == "train" else (cfg.data.eval_path or cfg.data.path)
    result = load_examples(path, max_image_pixels=cfg.data.max_image_pixels,
                           max_image_bytes=cfg.data.max_image_bytes)
    if result.skipped:
        log.warning("data: skipped %d rows: %s", sum(result.skipped.values()),
                    dict(result.skipped))
    if skipped is not None:
        skipped.update(result.skipped)
    return result.examples


def data_metrics(skipped: dict, usable: int) -> dict:
    """``data/skipped_<reason>`` counts, their total and the usable rows, for
    metrics.jsonl (file data)."""
    out = {f"data/skipped_{reason}": float(n) for reason, n in sorted(skipped.items())}
    out["data/skipped_total"] = float(sum(skipped.values()))
    out["data/usable_rows"] = float(usable)
    return out


class NonfiniteGuard:
    """Counts learner steps skipped for a NaN/inf loss or gradient, in a row; the run
    stops after ``limit`` of them (0 = never)."""

    def __init__(self, limit: int):
        self.limit, self.in_a_row, self.total = limit, 0, 0

    def update(self, metrics: dict) -> int:
        if metrics.get("train/skipped_nonfinite", 0.0):
            self.in_a_row += 1
            self.total += 1
        else:
            self.in_a_row = 0
        return self.in_a_row

    @property
    def should_stop(self) -> bool:
        return self.limit > 0 and self.in_a_row >= self.limit


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _rendezvous_address():
    import ray

    return (ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address(),
            _free_port())


def shard_for_learners(trajs: list[Trajectory], world: int) -> list[list[Trajectory]]:
    """Equal-size shards (ZeRO needs the same number of backward passes on every rank);
    padding copies carry a zero loss mask, so they add nothing to the loss."""
    padded = list(trajs)
    while len(padded) % world:
        t = padded[len(padded) % len(trajs)]
        zeros = [0] * len(t.token_ids)
        padded.append(dataclasses.replace(t, loss_mask=zeros, advantages=[0.0] * len(zeros),
                                          meta={**t.meta, "padding": True}))
    k = len(padded) // world
    return [padded[i * k:(i + 1) * k] for i in range(world)]


def start_ray(cfg: Config) -> None:
    """A local Ray (or the cluster at trainer.ray_address) whose workers see our env."""
    import ray

    if ray.is_initialized():
        return
    env = {"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
           "TOKENIZERS_PARALLELISM": "false"}
    for k in ("MMAGENT_RL_CACHE", "WANDB_MODE", "HF_HUB_OFFLINE", "PYTHONPATH"):
        if k in os.environ:
            env[k] = os.environ[k]
    # Under `ray job submit` the job's runtime env already sets its variables, and
    # ray.init refuses to set any of them again (even to the same value).
    job_env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get(
        "runtime_env", {}).get("env_vars", {})
    env = {k: v for k, v in env.items() if k not in job_env}
    ray.init(address=cfg.trainer.ray_address, num_cpus=cfg.trainer.ray_num_cpus,
             include_dashboard=False, runtime_env={"env_vars": env},
             log_to_driver=True, configure_logging=False)


def start_learners(cfg: Config, model_path: str, *, algo, total_steps: int, lr=None):
    """The DeepSpeed data-parallel group as Ray actors (rank 0 first)."""
    from mmagent_rl.learner.worker import make_learner_actor

    import ray

    L = cfg.learner
    Learner = make_learner_actor(L.num_cpus, L.num_gpus)
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # The rendezvous (rank 0's TCP store) lives on one node: take an address and a free
    # port there, and pin rank 0 to that node, so learners can meet across machines.
    # Preferably the driver's node: a lost worker node then takes no learner with it
    # when the learners fit there (rollout and reward actors are restarted; learners not).
    near_driver = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(),
                                                 soft=True)
    node, addr, port = ray.get(ray.remote(_rendezvous_address).options(
        num_cpus=0, scheduling_strategy=near_driver).remote(),
        timeout=cfg.trainer.step_timeout_s)
    pin = NodeAffinitySchedulingStrategy(node, soft=False)
    return [(Learner.options(scheduling_strategy=pin) if r == 0 else Learner).remote(
        model_path, rank=r, world_size=L.num_workers, master_addr=addr, master_port=port,
        zero_stage=L.zero_stage, lr=L.lr if lr is None else lr, weight_decay=L.weight_decay,
        betas=list(L.betas), grad_clip=L.grad_clip, micro_batch_size=L.micro_batch_size,
        algo=algo, temperature=cfg.rollout.agent.temperature, torch_threads=L.torch_threads,
        seed=cfg.trainer.seed, system_prompt=cfg.model.system_prompt, dtype=cfg.model.dtype,
        algo_name=cfg.algo.name or "grpo", papo=cfg.algo.papo, lr_schedule=L.lr_schedule, warmup_steps=L.warmup_steps, total_steps=total_steps,
        min_lr_ratio=L.min_lr_ratio, attn_implementation=cfg.model.attn_implementation,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        min_pixels=cfg.model.min_pixels, max_pixels=cfg.model.max_pixels)
        for r in range(L.num_workers)]


class Trainer:
    last_eval: dict | None = None  # the latest held-out eval's summary (eval.json)
    _eval_refs: list | None = None  # (worker index, ObjectRef of its eval share)

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
        self.eval_examples = (list(make_dataset(cfg, "eval"))
                              if cfg.trainer.eval_every else [])
        if cfg.trainer.eval_every and not self.eval_examples:
            raise ValueError("trainer.eval_every is set but the held-out split is empty "
                             "(data.eval_size, or the rows of data.eval_path)")
        self.collapse = ToolCollapseWatch(cfg.trainer.tool_collapse_floor)
        self.t_fit = time.perf_counter()  # time/elapsed counts from fit() (or here)
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
        mapo = c.algo.name == "mapo"
        self.reward = Reward.remote(c.reward.fn, c.reward.match_mode, c.reward.format_weight,
                                    c.reward.clip if mapo else None,
                                    c.algo.mapo if mapo else None)
        self.learners = start_learners(c, self.model_path, algo=c.algo.grpo,
                                       total_steps=c.trainer.total_steps)
        from mmagent_rl.algos.papo import HackingAlarm
        from mmagent_rl.rollout.chat import ChatFormat

        self.alarm = HackingAlarm(c.algo.papo.alarm_window, c.algo.papo.alarm_kl_jump)
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
        return self.faults.call("reward", [self.reward],
                                [(0, lambda a: a.score.remote(trajs))])[0]

    # ---- one step ------------------------------------------------------------------
    def _next_examples(self, count: int):
        n = len(self.dataset)
        out = [self.dataset[(self.data_pos + i) % n] for i in range(count)]
        self.data_pos += count
        return out

    def _rollout(self, examples, seed: int) -> list[Trajectory]:
        """Generate, then score: every rollout worker gets a share of the prompts."""
        R, n = len(self.rollouts), self.cfg.rollout.n
        chunks = [examples[i::R] for i in range(R)]
        parts = self._on_rollouts([(i, lambda w, ch=ch: w.generate.remote(ch, n, seed))
                                   for i, ch in enumerate(chunks) if ch])
        trajs = [t for p in parts for t in p]
        stale = {t.meta.get("weights_version") for t in trajs} - {self.step}
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
        trajs, times, extra = self._sample_groups(c.trainer.seed * 100003 + step)
        self.last_trajectories = trajs  # for benchmarks and debugging
        adv, algo_metrics = algos.compute_advantages(trajs, c.algo)
        extra.update(algo_metrics)
        if trajs and "align_time_s" in trajs[0].meta:
            extra["mapo/align_pairs_per_s"] = trajs[0].meta["align_pairs"] / max(
                1e-9, trajs[0].meta["align_time_s"])
        batch, num_tokens, num_seqs = trajs, sum(t.num_generated for t in trajs), len(trajs)
        if c.algo.name == "axpo":
            t0 = time.perf_counter()
            batch, axpo_metrics = self._axpo_round(trajs, step)
            extra.update(axpo_metrics)
            extra["time/axpo"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        shards = shard_for_learners(batch, len(self.learners))
        # Normalised by the ordinary batch: AXPO's extra continuations never shrink the
        # weight of an ordinary rollout (ALGORITHMS.md: ordinary rollouts keep 1/G).
        per_rank = self._learners_get([lr.train_step.remote(s, num_tokens, num_seqs)
                                       for lr, s in zip(self.learners, shards)])
        learn = finalize_metrics(per_rank)
        t_learn = time.perf_counter() - t0
        if c.algo.name == "papo":
            extra["papo/hacking_alarm"] = float(self.alarm.update(
                learn.get("papo/kl_prcp", 0.0), learn.get("papo/entropy_ori", 0.0),
                learn.get("papo/entropy_aug", 0.0)))
            if extra["papo/hacking_alarm"]:
                log.warning("PAPO: perception KL jumped while both entropies rose "
                            "(KL hacking?) at step %d", step + 1)

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
        m["time/elapsed"] = time.perf_counter() - self.t_fit
        if c.data.kind == "file":
            m.update(data_metrics(self.data_skipped, len(self.dataset)))
        m["train/nonfinite_in_a_row"] = float(self.nonfinite.update(m))
        if self.metrics_log:
            self.metrics_log.log(m)
        return m

    def _eval_due(self) -> bool:
        every = self.cfg.trainer.eval_every
        return bool(every) and (self.step % every == 0
                                or self.step == self.cfg.trainer.total_steps)

    def evaluate_heldout(self) -> dict:
        """The held-out figures with the current weights: the eval examples split over
        the rollout workers, each running mmagent_rl/eval.py's run_eval, summarised
        here. Returns ``eval/*`` metrics; the full summary is kept for eval.json."""
        from mmagent_rl.eval import summarize

        import ray

        c, E = self.cfg, self.cfg.eval
        t0 = time.perf_counter()
        if self._eval_refs is None:  # each worker's non-empty share, put in Ray once
            R = len(self.rollouts)
            self._eval_refs = [(i, ray.put(share)) for i in range(R)
                               if (share := self.eval_examples[i::R])]
            self.eval_examples = []  # the object store holds them now
        parts = self._on_rollouts([
            (i, lambda w, ref=ref: w.evaluate.remote(
                [ref], E.n_samples, E.seed, E.temperature, c.reward.fn, c.reward.match_mode,
                E.blank_tool_images))
            for i, ref in self._eval_refs])
        result = summarize([t for p in parts for t in p], E.k)
        result["step"] = self.step
        result["time_s"] = time.perf_counter() - t0
        self.last_eval = result
        return {f"eval/{k}": float(v) for k, v in result.items()
                if isinstance(v, (int, float)) and k != "step"}

    def sync_weights(self, version: int, only: list[int] | None = None) -> None:
        """Learner rank 0's weights into every rollout engine (or those in ``only``):
        export and load run inside the actors (learner/sync.py, ``sync.bucket_mb``)."""
        from mmagent_rl.learner import sync

        c = self.cfg
        # Under ZeRO-3 gathering the full weights is a collective: every rank joins.
        group = self.learners if c.learner.zero_stage == 3 else self.learners[:1]
        refs = self._learners_get([lr.__ray_call__.remote(sync.export_buckets,
                                                          c.sync.bucket_mb)
                                   for lr in group])[0]
        workers = range(len(self.rollouts)) if only is None else only
        # A worker that dies while loading comes back with the starting weights and is
        # given these again (no restore step needed: the retry is the load itself).
        self.faults.call("rollout", self.rollouts,
                         [(i, lambda w: w.__ray_call__.remote(sync.load_buckets, refs,
                                                              version))
                          for i in workers])

    def _axpo_round(self, trajs: list[Trajectory], step: int):
        """Trigger, pick prefixes, continue them K times, score, build advantages."""
        import random

        from mmagent_rl.algos import axpo

        c = self.cfg
        sel = axpo.select_prefixes(trajs, c.algo.axpo, self.tool_call_open_id,
                                   c.trainer.prompts_per_step, c.rollout.n,
                                   rng=random.Random(c.trainer.seed * 7 + step))
        conts: list[Trajectory] = []
        if sel:
            prefixes = [axpo.make_prefix(s.traj, s.fork) for s in sel]
            by_id = {t.meta["example_id"]: t for t in trajs}
            exs = [self._example_of(by_id[s.traj.meta["example_id"]]) for s in sel]
            R, k = len(self.rollouts), c.algo.axpo.k
            parts = self._on_rollouts([
                (i, lambda w, i=i: w.continue_from.remote(prefixes[i::R], exs[i::R], k,
                                                          step * 31 + i))
                for i in range(R) if prefixes[i::R]])
            conts = self._score([t for p in parts for t in p])
        grouped = axpo.group_continuations(sel, conts)
        axpo.axpo_advantages(trajs, grouped, sel, c.algo.grpo, c.algo.axpo)
        return trajs + conts, axpo.axpo_metrics(trajs, sel, grouped)

    def _example_of(self, traj: Trajectory):
        """The example a trajectory came from (the zoom tool needs its full image)."""
        from mmagent_rl.data.example import Example

        return Example(id=traj.meta["example_id"], image=traj.images[0], question="",
                       answer=traj.ground_truth, target_box=traj.meta.get("target_box"))

    # ---- the run -------------------------------------------------------------------
    def fit(self) -> list[dict]:
        from tqdm import tqdm

        c = self.cfg
        history = []
        self.t_fit = time.perf_counter()
        if c.trainer.eval_every and self.step == 0:  # the "before" figure
            row = {"step": 0, **self.evaluate_heldout()}
            row["time/elapsed"] = time.perf_counter() - self.t_fit
            if self.metrics_log:
                self.metrics_log.log(row)
            log.info("held-out eval before training: %s", _format_eval(row))
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
            bar.write(_format_step(m))
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

    def _stop_on_fault(self, err: Exception) -> None:
        """A clean stop: the step in progress is not logged nor counted; the message says
        how to go on."""
        from mmagent_rl import checkpoint as ck

        last = ck.latest_checkpoint(self.run_dir)
        how = (f"rerun with trainer.resume=auto (same hydra.run.dir) to continue from {last}"
               if last else "no complete checkpoint to resume from (set trainer.save_every)")
        self.stop_reason = (f"stopped during step {self.step + 1}: {err}; steps 1-{self.step} "
                            f"are complete and logged; {how}")
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

    # ---- resumable checkpoints (mmagent_rl/checkpoint.py) ------------------------------
    def _prepare_resume(self) -> dict:
        """Resolve trainer.resume, turn on per-request seeds when checkpointing, and trim
        metrics.jsonl to the resumed step; returns the checkpoint's driver state ({})."""
        import torch

        from mmagent_rl import checkpoint as ck
        from mmagent_rl.metrics import truncate_jsonl

        c = self.cfg
        self.resume_from = ck.resolve_resume(c.trainer.resume, self.run_dir)
        if c.rollout.agent.seeded_requests is None:
            # The engine's global generator is not saved: an exact resume needs seeds
            # that depend only on (step, prompt, sample, turn).
            c.rollout.agent.seeded_requests = bool(c.trainer.save_every or self.resume_from)
        elif not c.rollout.agent.seeded_requests and (c.trainer.save_every or self.resume_from):
            log.warning("rollout.agent.seeded_requests=false: a resumed run will not sample "
                        "what the uninterrupted run would have")
        if not self.resume_from:
            return {}
        info = ck.read_marker(self.resume_from)  # checked before any actor starts
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
        from mmagent_rl import checkpoint as ck

        path = self.resume_from
        t0 = time.perf_counter()
        self._learners_get([lr.load_state.remote(os.path.join(path, "learner"))
                            for lr in self.learners])
        self.step, self.data_pos = int(state["step"]), int(state["data_pos"])
        ck.set_rng_state(state["rng"])
        for name in ("alarm", "nonfinite", "collapse"):  # their counters, not their settings
            if name in state and hasattr(self, name):
                getattr(self, name).__dict__.update(
                    {k: v for k, v in state[name].items() if k not in _SETTINGS})
        self.faults.counts.update(state.get("faults", {}))
        self.sync_weights(self.step)
        log.info("resumed from %s at step %d (%.1f s)", path, self.step,
                 time.perf_counter() - t0)

    def save_checkpoint(self) -> str:
        """<run dir>/checkpoints/step_<N>: written into step_<N>.tmp, the COMPLETE marker
        last, then renamed; the oldest beyond trainer.keep_checkpoints are deleted."""
        import torch

        from mmagent_rl import checkpoint as ck

        c = self.cfg
        t0 = time.perf_counter()
        tmp = ck.begin(self.run_dir, self.step)
        self._learners_get([lr.save_state.remote(os.path.join(tmp, "learner"))
                            for lr in self.learners])
        state = {"step": self.step, "data_pos": self.data_pos, "rng": ck.rng_state(),
                 "wandb_id": self.metrics_log.wandb_id if self.metrics_log else None}
        for name in ("alarm", "nonfinite", "collapse"):
            if hasattr(self, name):
                state[name] = dict(vars(getattr(self, name)))
        state["faults"] = dict(self.faults.counts)
        torch.save(state, os.path.join(tmp, "trainer_state.pt"))
        path = ck.commit(tmp, {"step": self.step, "learner_world_size": c.learner.num_workers,
                               "zero_stage": c.learner.zero_stage, "algo": c.algo.name})
        ck.prune(self.run_dir, c.trainer.keep_checkpoints)
        log.info("checkpoint %s (%.1f s)", path, time.perf_counter() - t0)
        return path

    def weights_checksum(self) -> float:
        return self._get(self.learners[0].weights_checksum.remote())

    def shutdown(self) -> None:
        import ray

        if self.metrics_log:
            self.metrics_log.close()
        for a in self.rollouts + self.learners + [self.reward]:
            ray.kill(a)


class ToolCollapseWatch:
    """Tool-call collapse, which users of other frameworks report: ``tool/collapse_alarm``
    is 1 on steps whose tool-use rate is below the floor; the first such step warns."""

    def __init__(self, floor: float):
        self.floor, self.warned = floor, False

    def update(self, use_rate: float | None, step: int) -> dict:
        if not self.floor or use_rate is None:
            return {}
        low = use_rate < self.floor
        if low and not self.warned:
            self.warned = True
            log.warning("tool-call collapse? tool/use_rate=%.3f < trainer.tool_collapse_floor"
                        "=%.3f at step %d (warned once; tool/collapse_alarm marks every such "
                        "step)", use_rate, self.floor, step)
        return {"tool/collapse_alarm": float(low)}


def _format_eval(m: dict) -> str:
    keys = ("eval/pass@1", "eval/pass@1_se", "eval/pass@k", "eval/tool_call_rate",
            "eval/box_hit_rate", "eval/format_rate", "eval/time_s")
    return " ".join(f"{k}={m[k]:.4g}" for k in keys if k in m)


_SETTINGS = ("limit", "window", "kl_jump", "floor")  # config values, taken from the resumed run's config


def _format_step(m: dict) -> str:
    keys = ("loss", "reward/mean", "acc/mean", "tool/use_rate", "tool/all_wrong_rate",
            "grad_norm", "time/generate", "time/learn", "time/sync", "tokens_per_s")
    return f"step {m['step']}: " + " ".join(
        f"{k}={m[k]:.4g}" for k in keys if isinstance(m.get(k), (int, float))) + (
        " | held-out " + _format_eval(m) if "eval/pass@1" in m else "")
