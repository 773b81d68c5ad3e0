"""Supervised fine-tuning on the same DeepSpeed learners as RL.

    python -m mmagent_rl.sft sft.steps=200 [sft.data_path=demos.jsonl] [hydra.run.dir=...]
    python -m mmagent_rl.sft sft=embedded_agent     # the embedded agent's curriculum

The loss is the token-mean NLL of assistant tokens only; prompt and observation tokens
are masked exactly as in RL (a demonstration becomes a Trajectory with its mask).
loop.py is the driver, curriculum.py the data (demonstrations and the curriculum's
sample kinds), probes.py the skill metrics that gate the curriculum's stages.
"""
from mmagent_rl.sft.loop import run_sft

__all__ = ["run_sft"]
