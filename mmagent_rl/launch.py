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
        from mmagent_rl import algos

        raise SystemExit("choose an algorithm: +algo=grpo (registered: "
                         + ", ".join(algos.names()) + ")")
    trainer = Trainer(cfg, run_dir)
    try:
        history = trainer.fit()
    finally:
        trainer.shutdown()
    print_before_after(run_dir)
    if trainer.stop_reason:  # e.g. trainer.max_nonfinite_steps skipped steps in a row
        print(f"mmagent_rl: run stopped early: {trainer.stop_reason}", file=sys.stderr,
              flush=True)
        raise SystemExit(trainer.exit_status)
    return history


def print_before_after(run_dir: str) -> None:
    """With trainer.eval_every: the held-out pass@1 before the first step and after the
    last (metrics.jsonl's step-0 row and the final eval.json)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path) or not os.path.exists(os.path.join(run_dir, "eval.json")):
        return
    import json

    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    evals = [r for r in rows if "eval/pass@1" in r]
    if len(evals) < 2:
        return
    a, b = evals[0], evals[-1]
    n = int(b.get("eval/n_examples", 0)), int(b.get("eval/n_samples", 0))
    print(f"held-out pass@1 ({n[0]} examples x {n[1]} samples): "
          f"step {a['step']}: {a['eval/pass@1']:.3f} +- {a.get('eval/pass@1_se', 0):.3f}  ->  "
          f"step {b['step']}: {b['eval/pass@1']:.3f} +- {b.get('eval/pass@1_se', 0):.3f}  "
          f"({100 * (b['eval/pass@1'] - a['eval/pass@1']):+.1f} points; pass@{int(b['eval/k'])}"
          f" {a['eval/pass@k']:.3f} -> {b['eval/pass@k']:.3f})", flush=True)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    run_dir = HydraConfig.get().runtime.output_dir
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        f.write(OmegaConf.to_yaml(cfg, resolve=True))  # a real seed, not ${seed}
    history = run(cfg, run_dir)
    if history:
        log.info("done: %d steps, run dir %s", len(history), run_dir)


if __name__ == "__main__":
    main()
