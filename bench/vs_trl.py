"""Our samples/s against TRL's GRPOTrainer on the same workload.

    make bench-trl                       # installs TRL into .venv/trl (see the Makefile)
    python bench/vs_trl.py [--sizes tiny,100] [--steps 2] [--quick]

Both sides train the same model (a random Qwen2.5-VL built from a config: the tiny
model, and one of ~100M parameters), on the same prompts (the synthetic task's first
examples: the system prompt, the image and the question), with the same group size,
the same generation length (``--tokens`` new tokens: TRL is held to exactly that many
with ``min_new_tokens``; ours stops early only at EOS or ``</tool_call>``, which a random
model rarely samples, and the generated-token count is reported), the same optimizer (torch AdamW, lr 1e-6, betas 0.9/0.999, no weight decay,
grad clip 1.0), no KL term (beta 0, so neither loads a reference model), micro-batches
of 4 and one optimizer step per generation batch. The reward is the same cheap
deterministic one on both sides: 1 / (1 + characters in the response).

Ours: the real trainer (Ray, a vLLM rollout worker, 1 DeepSpeed learner, 1 turn per
trajectory). TRL: ``trl.GRPOTrainer`` in a child process run by ``.venv/trl/bin/python``
(TRL 1.16.0; this venv reads the main .venv's packages and adds TRL and its own
dependencies, so nothing in .venv changes), generating with ``transformers``'
``generate`` (TRL's default, ``use_vllm=False``), with 1 torch thread (our learner has 1;
our vLLM engine binds its own 2 OpenMP threads).
samples/s = sampled trajectories per optimizer step / median step time, after a
warm-up step. ``vs_trl_ratio`` = ours / TRL at ~100M. Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from common import workload_args

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TRL_PY = os.path.join(REPO, ".venv", "trl", "bin", "python")
LR = 1e-6


def model_path(size: str) -> str:
    from mmagent_rl.models.tiny import TinySpec, ensure_tiny_model

    if size == "tiny":
        return str(ensure_tiny_model(TinySpec()))
    sys.path.insert(0, HERE)
    from weight_sync import spec_for

    return str(ensure_tiny_model(spec_for(int(size))[0]))


def prompts(count: int):
    from mmagent_rl.data.synthetic import SyntheticConfig, SyntheticDataset

    ds = SyntheticDataset(SyntheticConfig(), seed=0, size=100_000, split="train")
    return [ds[i] for i in range(count)]


def reward_text(text: str) -> float:
    return 1.0 / (1.0 + len(text))


# ---- ours ---------------------------------------------------------------------------
def run_ours(path: str, a) -> dict:
    from common import run_steps, stop

    over = {"model.path": path, "algo.grpo.kl_beta": 0.0, "learner.lr": LR,
            "learner.micro_batch_size": 4, "rollout.agent.max_turns": 1,
            "rollout.agent.max_new_tokens": a.tokens, "learner.grad_clip": 1.0,
            "learner.weight_decay": 0.0, "rollout.engine.max_model_len": 2048,
            "rollout.agent.max_total_tokens": 2048}
    rows, tr = run_steps("grpo", steps=a.steps, warmup=1, prompts=a.prompts, n=a.n,
                         tokens=a.tokens, run_dir="/tmp/mmagent_bench_vs_trl",
                         overrides=over)
    stop(tr)
    step = statistics.median(r["time/step"] for r in rows)
    samples = rows[0]["samples"]
    tokens = statistics.median(r["tokens/generated"] for r in rows)
    return {"step_s": step, "samples": samples, "samples_per_s": samples / step,
            "generated_tokens": tokens}


# ---- TRL (runs in .venv/trl) ----------------------------------------------------------
def run_trl(path: str, a) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from mmagent_rl.chat import DEFAULT_SYSTEM_PROMPT

    # One thread, like our learner: on this shared 2-core machine two OpenMP threads
    # stall each other whenever another process takes a core (a step took 10x longer).
    torch.set_num_threads(1)
    exs = prompts(a.prompts)
    rows = [{"prompt": [{"role": "system",
                         "content": [{"type": "text", "text": DEFAULT_SYSTEM_PROMPT}]},
                        {"role": "user", "content": [{"type": "image"},
                                                     {"type": "text", "text": e.question}]}],
             "image": e.image} for e in exs]
    ds = Dataset.from_list(rows * (a.steps + 2))

    def shortness(completions, **_):
        out = []
        for c in completions:
            text = c[-1]["content"] if isinstance(c, list) else c
            if isinstance(text, list):
                text = "".join(p.get("text", "") for p in text)
            out.append(reward_text(text))
        return out

    class Timer(TrainerCallback):
        def __init__(self):
            self.t, self.steps = time.perf_counter(), []

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            self.steps.append(now - self.t)
            self.t = now

    B = a.prompts * a.n
    cfg = GRPOConfig(
        output_dir="/tmp/mmagent_bench_trl", per_device_train_batch_size=4,
        gradient_accumulation_steps=B // 4, num_generations=a.n,
        max_completion_length=a.tokens, max_steps=a.steps + 1, learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9,
        adam_beta2=0.999, max_grad_norm=1.0, optim="adamw_torch", beta=0.0,
        temperature=1.0, top_p=1.0, num_iterations=1, logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=True, bf16=False, fp16=False, seed=0, shuffle_dataset=False,
        dataloader_num_workers=0, generation_kwargs={"min_new_tokens": a.tokens},
        disable_tqdm=True,
    )
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    proc = AutoProcessor.from_pretrained(path)
    timer = Timer()
    trainer = GRPOTrainer(model=model, reward_funcs=shortness, args=cfg, train_dataset=ds,
                          processing_class=proc, callbacks=[timer])
    timer.t = time.perf_counter()
    trainer.train()
    steps = timer.steps[1:]  # the first step is the warm-up
    step = statistics.median(steps)
    return {"step_s": step, "samples": B, "samples_per_s": B / step, "steps": steps}


def trl_child(path: str, a) -> dict:
    if not os.path.exists(TRL_PY):
        raise SystemExit("TRL is not installed: run `make bench-trl` first")
    cmd = [TRL_PY, os.path.abspath(__file__), "--trl-child", path, "--prompts",
           str(a.prompts), "--n", str(a.n), "--tokens", str(a.tokens), "--steps", str(a.steps)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, REPO]),
               TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        sys.stderr.write(out.stdout[-3000:] + out.stderr[-5000:])
        raise SystemExit(f"TRL run failed (exit {out.returncode})")
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="tiny,100")
    workload_args(ap, steps=2, tokens=32)
    ap.add_argument("--trl-child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.trl_child:
        print(json.dumps(run_trl(a.trl_child, a)))
        return
    if a.quick:
        a.sizes, a.steps = "tiny", 1
    import ray

    res = {}
    for size in a.sizes.split(","):
        path = model_path(size)
        ours = run_ours(path, a)
        if ray.is_initialized():
            ray.shutdown()
        trl = trl_child(path, a)
        res[size] = {"ours": ours, "trl": trl,
                     "ratio": ours["samples_per_s"] / trl["samples_per_s"]}
        print(f"{size:>5}: ours {ours['samples_per_s']:.2f} samples/s "
              f"({ours['step_s']:.2f} s/step), TRL {trl['samples_per_s']:.2f} samples/s "
              f"({trl['step_s']:.2f} s/step): ours/TRL = {res[size]['ratio']:.2f}", flush=True)
    big = [s for s in res if s != "tiny"]
    print(json.dumps({
        "workload": {"prompts": a.prompts, "n": a.n, "new_tokens": a.tokens,
                     "steps": a.steps, "model": "random Qwen2.5-VL (tiny and ~100M)",
                     "trl": "1.16.0, transformers generate"},
        "vs_trl_ratio": round(res[big[-1]]["ratio"], 3) if big else None,
        "vs_trl_ratio_tiny": round(res["tiny"]["ratio"], 3) if "tiny" in res else None,
        "results": res,
    }, default=float))


if __name__ == "__main__":
    main()
