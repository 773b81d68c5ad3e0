"""The driver loop: generate -> score -> advantages -> learn -> sync, every step.

The driver only calls actor methods (generate, score, train_step, export_weights,
load_weights, save); it never reaches into an actor.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import socket
import time

from omegaconf import OmegaConf

from mmagent_rl import algos
from mmagent_rl.config import Config, validate
from mmagent_rl.metrics import JsonlLogger, rollout_metrics
from mmagent_rl.trajectory import Trajectory

log = logging.getLogger(__name__)


def resolve_model_path(cfg: Config) -> str:
    if cfg.model.path:
        return cfg.model.path
    from mmagent_rl.models.tiny import TinySpec, ensure_tiny_model

    return str(ensure_tiny_model(TinySpec(family=cfg.model.tiny_family,
                                         seed=cfg.model.tiny_seed)))


def make_dataset(cfg: Config, split: str = "train"):
    if cfg.data.kind == "synthetic":
        from mmagent_rl.data.synthetic import SyntheticDataset

        if split == "train":
            return SyntheticDataset(cfg.data.synthetic, seed=cfg.data.seed,
                                    size=cfg.data.train_size, split="train")
        return SyntheticDataset(cfg.data.synthetic, seed=cfg.data.seed,
                                size=cfg.data.eval_size, split="test")  # held out
    from mmagent_rl.data.datasets import load_examples

    path = cfg.data.path if split == "train" else (cfg.data.eval_path or cfg.data.path)
    result = load_examples(path)
    if result.skipped:
        log.warning("data: skipped %d rows: %s", sum(result.skipped.values()),
                    dict(result.skipped))
    return result.examples


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shard_for_learners(trajs: list[Trajectory], world: int) -> list[list[Trajectory]]:
    """Equal-size shards (ZeRO needs the same number of backward passes on every rank);
    padding copies carry a zero loss mask, so they add nothing to the loss."""
    padded = list(trajs)
    while len(padded) % world:
        t = padded[len(padded) % len(trajs)]
        zeros = [0] * len(t.token_ids)
        padded.append(dataclasses.replace(t, loss_mask=zeros, advantages=[0.0] * len(zeros)))
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
    ray.init(address=cfg.trainer.ray_address, num_cpus=cfg.trainer.ray_num_cpus,
             include_dashboard=False, runtime_env={"env_vars": env},
             log_to_driver=True, configure_logging=False)


def start_learners(cfg: Config, model_path: str, *, algo, total_steps: int, lr=None):
    """The DeepSpeed data-parallel group as Ray actors (rank 0 first)."""
    from mmagent_rl.learner.worker import make_learner_actor

    L = cfg.learner
    Learner = make_learner_actor(L.num_cpus, L.num_gpus)
    port = _free_port()
    return [Learner.remote(
        model_path, rank=r, world_size=L.num_workers, master_port=port,
        zero_stage=L.zero_stage, lr=L.lr if lr is None else lr, weight_decay=L.weight_decay,
        betas=list(L.betas), grad_clip=L.grad_clip, micro_batch_size=L.micro_batch_size,
        algo=algo, temperature=cfg.rollout.agent.temperature, torch_threads=L.torch_threads,
        seed=cfg.trainer.seed, system_prompt=cfg.model.system_prompt, dtype=cfg.model.dtype,
        lr_schedule=L.lr_schedule, warmup_steps=L.warmup_steps, total_steps=total_steps,
        min_lr_ratio=L.min_lr_ratio)
        for r in range(L.num_workers)]


class Trainer:
    def __init__(self, cfg: Config, run_dir: str):
        if OmegaConf.is_config(cfg):  # plain dataclasses from here on
            cfg = OmegaConf.to_object(cfg)
        validate(cfg)
        self.cfg, self.run_dir = cfg, run_dir
        os.makedirs(run_dir, exist_ok=True)
        self.model_path = resolve_model_path(cfg)
        self.dataset = make_dataset(cfg, "train")
        self.metrics_log = JsonlLogger(os.path.join(run_dir, "metrics.jsonl")) \
            if cfg.logger.jsonl else None
        start_ray(cfg)
        self._start_actors()
        self.step = 0

    # ---- set-up --------------------------------------------------------------------
    def _start_actors(self) -> None:
        from mmagent_rl.reward.worker import make_reward_actor
        from mmagent_rl.rollout.worker import make_rollout_actor

        c = self.cfg
        Rollout = make_rollout_actor(c.rollout.num_cpus, c.rollout.num_gpus)
        self.rollouts = [Rollout.remote(self.model_path, c.rollout.engine, c.rollout.agent,
                                        c.model.system_prompt)
                         for _ in range(c.rollout.num_workers)]
        Reward = make_reward_actor(c.reward.num_cpus, c.reward.num_gpus)
        self.reward = Reward.remote(c.reward.fn, c.reward.match_mode, c.reward.format_weight)
        self.learners = start_learners(c, self.model_path, algo=c.algo.grpo,
                                       total_steps=c.trainer.total_steps)
        self._get([a.ping.remote() for a in self.rollouts])
        self._get([a.config.remote() for a in self.learners])

    def _get(self, refs):
        import ray

        return ray.get(refs, timeout=self.cfg.trainer.step_timeout_s)

    # ---- one step ------------------------------------------------------------------
    def _examples(self, step: int):
        B = self.cfg.trainer.prompts_per_step
        n = len(self.dataset)
        return [self.dataset[(step * B + i) % n] for i in range(B)]

    def train_step(self) -> dict:
        import ray

        c, step = self.cfg, self.step
        t_start = time.perf_counter()
        examples = self._examples(step)
        R = len(self.rollouts)
        chunks = [examples[i::R] for i in range(R)]
        t0 = time.perf_counter()
        parts = self._get([w.generate.remote(ch, c.rollout.n, c.trainer.seed * 100003 + step)
                           for w, ch in zip(self.rollouts, chunks) if ch])
        trajs = [t for p in parts for t in p]
        t_gen = time.perf_counter() - t0

        t0 = time.perf_counter()
        trajs = self._get(self.reward.score.remote(trajs))
        self.last_trajectories = trajs  # for benchmarks and debugging
        t_score = time.perf_counter() - t0

        adv = algos.grpo_advantages(trajs, c.algo.grpo)
        t0 = time.perf_counter()
        num_tokens = sum(t.num_generated for t in trajs)
        shards = shard_for_learners(trajs, len(self.learners))
        from mmagent_rl.learner.worker import finalize_metrics

        per_rank = self._get([lr.train_step.remote(s, num_tokens, len(trajs))
                              for lr, s in zip(self.learners, shards)])
        learn = finalize_metrics(per_rank)
        t_learn = time.perf_counter() - t0

        t0 = time.perf_counter()
        weights = self.learners[0].export_weights.remote()
        self._get([w.load_weights.remote(weights, step + 1) for w in self.rollouts])
        del weights
        t_sync = time.perf_counter() - t0

        self.step += 1
        total = time.perf_counter() - t_start
        m = {"step": self.step, **learn, **rollout_metrics(trajs),
             "adv/abs_mean": float(adv.abs().mean()), "time/generate": t_gen,
             "time/score": t_score, "time/learn": t_learn, "time/sync": t_sync,
             "time/step": total, "tokens/generated": num_tokens,
             "tokens_per_s": num_tokens / total if total > 0 else 0.0,
             "gen_tokens_per_s": num_tokens / t_gen if t_gen > 0 else 0.0,
             "samples": len(trajs)}
        m.pop("tokens", None)
        if self.metrics_log:
            self.metrics_log.log(m)
        return m

    # ---- the run -------------------------------------------------------------------
    def fit(self) -> list[dict]:
        from tqdm import tqdm

        c = self.cfg
        history = []
        bar = tqdm(total=c.trainer.total_steps, desc="train", disable=not c.trainer.progress,
                   dynamic_ncols=True)
        while self.step < c.trainer.total_steps:
            m = self.train_step()
            history.append(m)
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.4f}", reward=f"{m['reward/mean']:.2f}",
                            tool=f"{m['tool/use_rate']:.2f}")
            bar.write(_format_step(m))
        bar.close()
        if c.trainer.save_final:
            self.save(os.path.join(self.run_dir, "checkpoints", "final"))
        return history

    def save(self, path: str) -> str:
        """Atomic: written to a temporary folder, renamed when complete."""
        tmp = path + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self._get([lr.save.remote(tmp) for lr in self.learners])
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


def _format_step(m: dict) -> str:
    keys = ("loss", "reward/mean", "acc/mean", "tool/use_rate", "tool/all_wrong_rate",
            "grad_norm", "time/generate", "time/learn", "time/sync", "tokens_per_s")
    return f"step {m['step']}: " + " ".join(
        f"{k}={m[k]:.4g}" for k in keys if isinstance(m.get(k), (int, float)))
