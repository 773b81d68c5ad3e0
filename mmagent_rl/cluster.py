"""Where the actors run: Ray start-up, the DeepSpeed learner group and its placement,
and how a step's batch is split over the learners."""
from __future__ import annotations

import dataclasses
import json
import os
import socket

from mmagent_rl.config import Config
from mmagent_rl.trajectory import Trajectory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _rendezvous_address():
    import ray

    return (ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address(),
            free_port())


def shard_for_learners(trajs: list[Trajectory], world: int) -> list[list[Trajectory]]:
    """Equal-size shards (ZeRO needs the same number of backward passes on every rank);
    padding copies carry a zero loss mask, so they add nothing to the loss."""
    padded = list(trajs)
    while len(padded) % world:
        t = padded[len(padded) % len(trajs)]
        zeros = [0] * len(t.token_ids)
        padded.append(dataclasses.replace(t, loss_mask=zeros, advantages=[0.0] * len(zeros),
                                          padding=True))
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


def start_learners(cfg: Config, model_path: str, *, total_steps: int, algo=None, lr=None):
    """The DeepSpeed data-parallel group as Ray actors (rank 0 first); ``algo``: the
    algo section to train with (default cfg.algo)."""
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
        model_path, L, cfg.algo if algo is None else algo, cfg.model, rank=r,
        world_size=L.num_workers, master_addr=addr, master_port=port,
        temperature=cfg.rollout.agent.temperature, seed=cfg.trainer.seed,
        total_steps=total_steps, lr=lr)
        for r in range(L.num_workers)]
