"""Shared by the bench scripts: a small trainer run on a fixed workload."""
from __future__ import annotations

import os
import sys
import tempfile

TESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests")


# --quick: the smallest workload that still runs every part of a bench; the tests run
# each bench this way (tests/test_bench_quick.py), so none can rot unnoticed.
QUICK = {"steps": 1, "warmup": 0, "prompts": 2, "n": 2, "tokens": 16}


def workload_args(ap, *, steps: int, tokens: int, prompts: int = 4, n: int = 4,
                  warmup: int | None = None) -> None:
    """The fixed-workload options every trainer benchmark takes (its own defaults)."""
    ap.add_argument("--quick", action="store_true",
                    help=f"the smallest workload ({QUICK}); figures meaningless")
    ap.add_argument("--steps", type=int, default=steps)
    if warmup is not None:
        ap.add_argument("--warmup", type=int, default=warmup)
    ap.add_argument("--prompts", type=int, default=prompts)
    ap.add_argument("--n", type=int, default=n)
    ap.add_argument("--tokens", type=int, default=tokens)


def parse_workload(ap, **quick):
    """``ap.parse_args()`` with ``--quick`` applied (``quick``: this bench's own
    changes to QUICK)."""
    a = ap.parse_args()
    if a.quick:
        for k, v in {**QUICK, **quick}.items():
            if hasattr(a, k):
                setattr(a, k, v)
    return a


def run_steps(algo: str, *, steps: int, warmup: int, prompts: int, n: int, tokens: int,
              run_dir: str, overrides: dict | None = None):
    """The real trainer (1 learner) for warmup + steps steps. Returns (rows after the
    warm-up, the trainer, still running: the caller shuts it down)."""
    from omegaconf import OmegaConf

    from mmagent_rl.config import Config
    from mmagent_rl.trainer import Trainer

    # reward_plugins (tests/) gives a random model non-zero gradients; Ray workers
    # import it through PYTHONPATH.
    if TESTS not in sys.path:
        sys.path.insert(0, TESTS)
    os.environ["PYTHONPATH"] = os.pathsep.join(sys.path)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("WANDB_MODE", "disabled")
    cfg = OmegaConf.structured(Config)
    cfg.algo.name = algo
    cfg.trainer.total_steps = warmup + steps
    cfg.trainer.prompts_per_step = prompts
    cfg.trainer.save_final = False
    cfg.trainer.progress = False
    cfg.rollout.n = n
    cfg.rollout.agent.max_new_tokens = tokens
    cfg.learner.num_workers = 1
    cfg.logger.jsonl = False
    cfg.reward.fn = "reward_plugins:shortness_reward"
    for k, v in (overrides or {}).items():
        OmegaConf.update(cfg, k, v)
    # a fresh folder under the given name: two benches (or two copies) never share one
    run_dir = tempfile.mkdtemp(prefix=os.path.basename(run_dir) + "_",
                               dir=os.path.dirname(run_dir) or None)
    trainer = Trainer(cfg, run_dir)
    rows = [trainer.train_step() for _ in range(warmup + steps)][warmup:]
    return rows, trainer


def stop(trainer) -> None:
    import ray

    trainer.shutdown()
    ray.shutdown()
