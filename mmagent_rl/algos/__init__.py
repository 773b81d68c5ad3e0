"""Pure torch math on tensors and Trajectories: no Ray, vLLM or DeepSpeed imports.

Each algorithm is a class registered by name (``algo.name``; registry.py has the
hooks). Importing this package registers the built-in ones."""
from __future__ import annotations

from mmagent_rl.algos.registry import (Algorithm, LossInputs, StepContext, build,
                                       config_class, get, names, register)
from mmagent_rl.algos import grpo, mapo, papo, axpo, gspo  # noqa: E402,F401  (registers them)
from mmagent_rl.algos.grpo import broadcast_advantages, grpo_advantages  # noqa: E402



def baseline_config():
    """The algo section of plain GRPO with its defaults."""
    return config_class()(name=grpo.GRPO.name)


__all__ = ["baseline_config", "Algorithm", "LossInputs", "StepContext", "build", "config_class", "get", "names",
           "register", "broadcast_advantages", "grpo_advantages"]
