"""RolloutWorker: a vLLM engine plus the agent loop. A plain class; ``make_rollout_actor``
wraps it as a Ray actor (fractional CPU on one node, a GPU share on clusters)."""
from __future__ import annotations

import torch

from mmagent_rl.example import Example
from mmagent_rl.rollout.agent_loop import AgentConfig, AgentLoop
from mmagent_rl.chat import ChatFormat
from mmagent_rl.rollout.engine import EngineConfig, VLLMEngine
from mmagent_rl.tools.registry import ToolSettings
from mmagent_rl.trajectory import Trajectory


class RolloutWorker:
    def __init__(self, model_path: str, engine_cfg: EngineConfig, agent_cfg: AgentConfig,
                 system_prompt: str | None = None, torch_threads: int = 1,
                 tools: ToolSettings | None = None):
        """``tools``: ``ToolSettings.from_config(cfg.rollout)`` (import paths, loaded
        here); None = the default, the zoom alone."""
        torch.set_num_threads(torch_threads)
        self.tools = (tools or ToolSettings()).load()  # before the engine: fails fast
        self.engine = VLLMEngine(model_path, engine_cfg)
        self.chat = ChatFormat.from_pretrained(model_path, system_prompt)
        self.loop = AgentLoop(self.engine, self.chat, agent_cfg, self.tools)
        self.weights_version = 0

    def generate(self, examples: list[Example], n: int, seed: int) -> list[Trajectory]:
        trajs = self.loop.run(examples, n, seed)
        for t in trajs:
            t.weights_version = self.weights_version
        return trajs

    def evaluate(self, examples_ref: list, n: int, seed: int, temperature: float,
                 blank_tool_images: bool = False) -> list[Trajectory]:
        """Held-out rollouts with the current weights, unscored (the driver scores and
        summarises them as mmagent_rl/eval.py does); images are dropped from the result.
        ``examples_ref``: ``[ObjectRef]`` of this worker's examples (nested, so Ray does
        not fetch them per call), fetched once and kept: the held-out images are ~3 MB
        each; a restarted worker fetches them again."""
        import ray

        from mmagent_rl.example import examples_from_wire
        from mmagent_rl.rollout.agent_loop import eval_agent_config

        key = examples_ref[0].hex()
        if getattr(self, "_eval_key", None) != key:
            self._eval_key = key
            self._eval_set = examples_from_wire(ray.get(examples_ref[0]))

        loop = AgentLoop(self.engine, self.chat, eval_agent_config(
            self.loop.cfg, temperature, blank_tool_images), self.tools)
        with self.engine.rng_preserved():  # training then samples as without this eval
            trajs = loop.run(list(self._eval_set), n=n, seed=seed)
        # ... and finds the caches as it would have.
        self.engine.reset_caches()
        for t in trajs:
            t.images = []
            t.weights_version = self.weights_version
        return trajs

    def continue_from(self, prefixes: list[Trajectory], examples: list[Example], k: int,
                      seed: int) -> list[Trajectory]:
        trajs = self.loop.continue_from(prefixes, examples, k, seed)
        for t in trajs:
            t.weights_version = self.weights_version
        return trajs

    def load_weights(self, named: list, version: int) -> int:
        self.engine.load_weights(named)
        self.weights_version = version
        return version

    def load_weight_refs(self, refs: list, version: int) -> int:
        """Load ``Learner.export_weight_refs``'s buckets in place (learner/sync.py);
        nothing loads unless every bucket is valid and the push is complete."""
        from mmagent_rl.wire import load_buckets

        load_buckets(self.engine, refs)
        self.weights_version = version
        return version

    # vLLM's weight-transfer control plane (sync.backend=transfer): the trainer's
    # client (mmagent_rl/transfer.RolloutClient) calls these; the data comes over the
    # transfer engine's own channel.
    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self.engine.init_weight_transfer(init_info)

    def start_weight_update(self) -> None:
        self.engine.start_weight_update()

    def update_weights(self, update_info: dict) -> None:
        self.engine.update_weights(update_info)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.engine.finish_weight_update()
        if weight_version is not None:
            self.weights_version = int(weight_version)

    def ping(self) -> bool:
        return True


def make_rollout_actor(num_cpus: float, num_gpus: float = 0.0, max_restarts: int = 3,
                       spread_nodes: bool = False):
    """Restarted by Ray up to ``max_restarts`` times; no task retries (the driver
    retries, after giving the new engine the current weights: mmagent_rl/faults.py)."""
    import ray

    opts = {"scheduling_strategy": "SPREAD"} if spread_nodes else {}
    return ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=max_restarts,
                      max_task_retries=0, **opts)(RolloutWorker)
