"""Supervised warm-up on multi-turn demonstrations, on the same DeepSpeed learners as RL.

    python -m mmagent_rl.sft sft.steps=200 [sft.data_path=demos.jsonl] [hydra.run.dir=...]

The loss is the token-mean NLL of assistant tokens only; prompt and observation tokens
are masked exactly as in RL (a demonstration becomes a Trajectory with the demo's mask).
Demonstrations come from a jsonl file (rows of ``mmagent_rl.data.demos.demo_to_row``:
messages + base64 images) or are generated from the synthetic task. Writes
``metrics.jsonl`` and ``checkpoints/final`` (an HF folder vLLM loads) in the run dir.
"""
from __future__ import annotations

import json
import logging
import os
import random
import time

from mmagent_rl.trajectory import Trajectory

log = logging.getLogger(__name__)


def demo_to_trajectory(demo, idx: int) -> Trajectory:
    n = len(demo.token_ids)
    return Trajectory(prompt_id=f"demo-{idx}", sample_idx=0, token_ids=list(demo.token_ids),
                      loss_mask=list(demo.loss_mask), logprobs=[0.0] * n,
                      images=list(demo.images), prompt_len=demo.loss_mask.index(1)
                      if 1 in demo.loss_mask else n)


class DemoSource:
    """Batches of demonstrations: from a jsonl file (cycled) or generated."""

    def __init__(self, cfg, chat):
        from mmagent_rl.data.synthetic import SyntheticDataset

        self.cfg, self.chat = cfg, chat
        self.rows = None
        if cfg.sft.data_path:
            from mmagent_rl.data.demos import demo_from_row

            self.rows, bad = [], 0
            with open(cfg.sft.data_path, encoding="utf-8") as f:
                for line in f:
                    try:
                        self.rows.append(demo_from_row(json.loads(line), chat))
                    except Exception as e:  # a bad row is skipped and counted
                        bad += 1
                        log.warning("sft: skipped a demonstration row: %s", e)
            if not self.rows:
                raise ValueError(f"no usable demonstration in {cfg.sft.data_path} "
                                 f"({bad} bad rows)")
            self.skipped = bad
        else:
            self.data = SyntheticDataset(cfg.data.synthetic, seed=cfg.data.seed,
                                         size=cfg.data.train_size, split="train")
            self.skipped = 0

    def batch(self, step: int, size: int) -> list[Trajectory]:
        from mmagent_rl.data.demos import make_demo

        out = []
        for i in range(size):
            j = step * size + i
            if self.rows is not None:
                demo = self.rows[j % len(self.rows)]
            else:
                rng = random.Random(f"{self.cfg.sft.seed}-{j}")
                demo = make_demo(self.data[j % len(self.data)], self.chat, rng,
                                 self.cfg.sft.demo)
            out.append(demo_to_trajectory(demo, j))
        return out


def run_sft(cfg, run_dir: str) -> list[dict]:
    from tqdm import tqdm

    from mmagent_rl.algos.grpo import GRPOConfig
    from mmagent_rl.config import AlgoConfig, validate_common
    from mmagent_rl.metrics import JsonlLogger
    from mmagent_rl.chat import ChatFormat
    from mmagent_rl.cluster import shard_for_learners, start_learners, start_ray
    from mmagent_rl.sources import resolve_model_path

    validate_common(cfg)
    model_path = resolve_model_path(cfg)
    chat = ChatFormat.from_pretrained(model_path, cfg.model.system_prompt)
    source = DemoSource(cfg, chat)
    start_ray(cfg)
    import ray

    # the SFT objective needs no algorithm; GRPO without KL loads no reference model
    no_ref = AlgoConfig(name="grpo", grpo=GRPOConfig(kl_beta=0.0))
    learners = start_learners(cfg, model_path, algo=no_ref, total_steps=cfg.sft.steps,
                              lr=cfg.sft.lr)
    timeout = cfg.trainer.step_timeout_s
    metrics = JsonlLogger(os.path.join(run_dir, "metrics.jsonl"))
    history = []
    for step in tqdm(range(cfg.sft.steps), desc="sft", disable=not cfg.trainer.progress):
        t0 = time.perf_counter()
        trajs = source.batch(step, cfg.sft.batch_size)
        n_tok = sum(t.num_generated for t in trajs)
        shards = shard_for_learners(trajs, len(learners))
        per_rank = ray.get([lr.train_step.remote(s, n_tok, len(trajs), "sft")
                            for lr, s in zip(learners, shards)], timeout=timeout)
        m = {"step": step + 1, "loss": sum(r["loss"] for r in per_rank),
             "grad_norm": per_rank[0]["grad_norm"], "lr": per_rank[0]["lr"],
             "tokens": n_tok, "time/step": time.perf_counter() - t0,
             "data/skipped_rows": source.skipped}
        metrics.log(m)
        history.append(m)
    out = os.path.join(run_dir, "checkpoints", "final")
    ray.get([lr.save.remote(out) for lr in learners], timeout=timeout)
    metrics.close()
    for a in learners:
        ray.kill(a)
    log.info("sft: %d steps, checkpoint %s", cfg.sft.steps, out)
    return history


def main() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from mmagent_rl.config import register

    register()

    @hydra.main(version_base="1.3", config_path="../conf", config_name="config")
    def _run(cfg) -> None:
        run_sft(OmegaConf.to_object(cfg), HydraConfig.get().runtime.output_dir)

    _run()


if __name__ == "__main__":
    main()
