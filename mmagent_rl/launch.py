"""Hydra entry point: ``python -m mmagent_rl.launch +algo=grpo trainer.total_steps=N``.

The run directory is Hydra's (``hydra.run.dir=...`` works); it receives
``metrics.jsonl``, the resolved ``config.yaml`` and ``checkpoints/final``.
A run the trainer stops early exits after printing the reason: status 3 after
``trainer.max_nonfinite_steps`` non-finite steps in a row (the final checkpoint is still
saved), status 4 when a learner died or a rollout/reward actor could not be restarted
(rerun with ``trainer.resume=auto`` to continue from the last complete checkpoint).
"""
from __future__ import annotations

import logging
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from mmagent_rl.config import register

register()
log = logging.getLogger("mmagent_rl")


def run(cfg: DictConfig, run_dir: str) -> list[dict]:
    from mmagent_rl.trainer import Trainer

    if not OmegaConf.select(cfg, "algo.name", default=None):
        raise SystemExit("choose an algorithm: +algo=grpo (valid: grpo)")
    trainer = Trainer(cfg, run_dir)
    try:
        history = trainer.fit()
    finally:
        trainer.shutdown()
    if trainer.stop_reason:  # e.g. trainer.max_nonfinite_steps skipped steps in a row
        print(f"mmagent_rl: run stopped early: {trainer.stop_reason}", file=sys.stderr,
              flush=True)
        raise SystemExit(trainer.exit_status)
    return history


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    run_dir = HydraConfig.get().runtime.output_dir
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        f.write(OmegaConf.to_yaml(cfg))
    history = run(cfg, run_dir)
    if history:
        log.info("done: %d steps, run dir %s", len(history), run_dir)


if __name__ == "__main__":
    main()
