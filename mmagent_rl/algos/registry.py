"""The algorithm plug-in point: one registered class per algorithm, with named hooks.

Trainer, learner and reward code call these hooks and never test an algorithm's name.
A new algorithm is a subclass (usually of ``GRPO``: every algorithm here is GRPO plus
one change) decorated with ``@register``, in a module that ``algos/__init__.py``
imports, plus its ``conf/algo/<name>.yaml``. Its settings, if it has any, are a
dataclass named by ``config``: it becomes the config section ``algo.<name>``.

Hooks (the driver's and the learner's own copy of the object each call theirs):
  driver   advantages(trajs)            per-token advantages, written on each trajectory
           extra_rollouts(trajs, ctx)   more trajectories for this step (AXPO)
           alignment()                  settings of the reward actor's per-tool-call
                                        alignment scores, or None (MAPO)
           system_prompt(configured, default)
           after_learn(metrics, step)   metrics from the learners' figures (PAPO alarm)
           state_dict() / load_state_dict(state)   what a checkpoint keeps
  learner  loss(x: LossInputs)          the loss of one micro-batch and its stats;
                                        ``x.logprobs_with_images`` is an extra forward
                                        on other images (PAPO)
           needs_reference              load a frozen reference policy (KL term)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, ClassVar

from torch import Tensor

from mmagent_rl.trajectory import Trajectory

_REGISTRY: dict[str, type["Algorithm"]] = {}


@dataclass
class LossInputs:
    """One micro-batch as the learner sees it; tensors are [B, T] over its tokens."""
    lp: Tensor  # current policy, sampled tokens (with grad)
    lp_old: Tensor  # the engine's log-probs (behaviour policy)
    adv: Tensor  # per-token advantages
    mask: Tensor  # 1 on tokens the policy generated
    lp_ref: Tensor | None  # reference policy (no grad); None without a KL term
    num_tokens: int  # generated tokens of the whole step (all ranks): global token-mean
    num_seqs: int  # sequences of the whole step
    step: int  # optimizer steps taken so far by this learner
    trajs: list[Trajectory]  # the micro-batch's trajectories
    # log-probs of the same tokens given other images of the same sizes, one list per
    # trajectory; the flag asks for a gradient. None where no model is at hand.
    logprobs_with_images: Callable[[list[list], bool], Tensor] | None = None


@dataclass
class StepContext:
    """What ``extra_rollouts`` may use on the driver."""
    step: int  # the step being trained (0-based)
    seed: int  # the run's seed
    prompts_per_step: int  # B
    group_size: int  # G (rollout.n)
    tool_call_open_id: int  # token id of <tool_call>
    # (prefix trajectories, k, seed) -> k scored continuations of each prefix
    continue_from: Callable[[list[Trajectory], int, int], list[Trajectory]]


class Algorithm:
    """The hooks' defaults do nothing; ``GRPO`` (grpo.py) implements the two required
    ones, ``advantages`` and ``loss``."""
    name: ClassVar[str] = ""
    config: ClassVar[type | None] = None  # its settings: the section algo.<name>

    def __init__(self, cfg):
        # the whole algo section (AlgoConfig): its own settings are cfg.<name>, and
        # every algorithm reads the shared cfg.grpo
        self.cfg = cfg

    # ---- driver ---------------------------------------------------------------------
    def advantages(self, trajs: list[Trajectory]) -> tuple[Tensor, dict]:
        """Set ``t.advantages`` on every trajectory; return the per-rollout task
        advantage [N] and metrics."""
        raise NotImplementedError

    def extra_rollouts(self, trajs: list[Trajectory], ctx: StepContext
                       ) -> tuple[list[Trajectory], dict]:
        """The step's training batch (``trajs`` plus any extra trajectories) and metrics."""
        return trajs, {}

    def alignment(self):
        return None

    def system_prompt(self, configured: str | None, default: str) -> str | None:
        return configured

    def after_learn(self, metrics: dict, step: int) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # ---- learner --------------------------------------------------------------------
    @property
    def needs_reference(self) -> bool:
        return False

    def loss(self, x: LossInputs) -> tuple[Tensor, dict]:
        raise NotImplementedError


def register(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator: makes ``+algo=<cls.name>`` available."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"algorithm {cls.name!r} is registered twice "
                         f"({_REGISTRY[cls.name].__name__}, {cls.__name__})")
    _REGISTRY[cls.name] = cls
    return cls


def names() -> list[str]:
    return list(_REGISTRY)


def get(name: str) -> type[Algorithm]:
    if name not in _REGISTRY:
        raise ValueError(f"algo.name={name!r} is not a registered algorithm; valid choices: "
                         f"{', '.join(names())} (choose one with +algo=<name>)")
    return _REGISTRY[name]


def build(cfg) -> Algorithm:
    """The algorithm ``cfg.name`` names, with its settings (cfg: the algo section)."""
    return get(cfg.name)(cfg)


def config_class(module: str = "mmagent_rl.config") -> type:
    """``AlgoConfig``: ``name`` plus one section per registered algorithm with settings.
    ``module`` is where the class is bound (mmagent_rl/config.py binds it), so that
    pickle finds it by name."""
    fields = [("name", str, dataclasses.field(default=""))]
    for cls in _REGISTRY.values():
        if cls.config is not None:
            fields.append((cls.name, cls.config,
                           dataclasses.field(default_factory=cls.config)))
    algo_config = dataclasses.make_dataclass("AlgoConfig", fields)
    algo_config.__module__ = module
    return algo_config
