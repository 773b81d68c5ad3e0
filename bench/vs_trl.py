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
``generate`` (TRL's default, ``use_vllm=False``).

The same thread budget on both sides, ``--threads`` (2: the machine's cores): TRL's
torch threads; our learner's torch threads, and our vLLM engine's OpenMP threads,
pinned to the first ``--threads`` cores (``VLLM_CPU_OMP_THREADS_BIND``; unpinned it
binds every core it sees). Our engine and learner take turns (the synchronous loop), as
TRL's generation and training do. The two sides run at the same time in two processes
but never step at the same time: one step of ours, then one of TRL's (the TRL child
waits for a line on its stdin before each step), ``--steps`` timed steps each after one
warm-up step. samples/s = sampled trajectories per optimizer step / median step time.
``vs_trl_ratio`` = ours / TRL at ~100M. Last line: one JSON object.
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
def start_ours(path: str, a):
    """The real trainer, built and ready to step (the caller steps and stops it)."""
    from common import run_steps

    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{a.threads - 1}"
    over = {"model.path": path, "algo.grpo.kl_beta": 0.0, "learner.lr": LR,
            "learner.micro_batch_size": 4, "rollout.agent.max_turns": 1,
            "rollout.agent.max_new_tokens": a.tokens, "learner.grad_clip": 1.0,
            "learner.weight_decay": 0.0, "rollout.engine.max_model_len": 2048,
            "rollout.agent.max_total_tokens": 2048, "learner.torch_threads": a.threads,
            "trainer.total_steps": a.steps + 1}
    _, tr = run_steps("grpo", steps=0, warmup=0, prompts=a.prompts, n=a.n,
                      tokens=a.tokens, run_dir="/tmp/mmagent_bench_vs_trl", overrides=over)
    return tr


# ---- TRL (runs in .venv/trl) ----------------------------------------------------------
def run_trl(path: str, a) -> None:
    """The TRL child: before each optimizer step it prints READY and waits for a line on
    stdin; after it, it prints the step's time as a JSON line."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from mmagent_rl.chat import DEFAULT_SYSTEM_PROMPT

    torch.set_num_threads(a.threads)
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

    gen_s = [0.0]  # time in TRL's generation and scoring, per step

    class Timed(GRPOTrainer):
        def _generate_and_score_completions(self, *args, **kw):
            t = time.perf_counter()
            try:
                return super()._generate_and_score_completions(*args, **kw)
            finally:
                gen_s[0] += time.perf_counter() - t

    class Turns(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            print("READY", flush=True)
            sys.stdin.readline()
            self.t, gen_s[0] = time.perf_counter(), 0.0

        def on_step_end(self, args, state, control, **kw):
            print(json.dumps({"step_s": time.perf_counter() - self.t,
                              "generate_s": gen_s[0]}), flush=True)

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
    Timed(model=model, reward_funcs=shortness, args=cfg, train_dataset=ds,
          processing_class=proc, callbacks=[Turns()]).train()


class TRLChild:
    """TRL's trainer in its own venv, one step at a time."""

    def __init__(self, path: str, a):
        if not os.path.exists(TRL_PY):
            raise SystemExit("TRL is not installed: run `make bench-trl` first")
        cmd = [TRL_PY, os.path.abspath(__file__), "--trl-child", path, "--prompts",
               str(a.prompts), "--n", str(a.n), "--tokens", str(a.tokens), "--steps",
               str(a.steps), "--threads", str(a.threads)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, REPO]),
                   TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled",
                   OMP_NUM_THREADS=str(a.threads))
        self.err = open("/tmp/mmagent_bench_trl.stderr", "w")
        self.p = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=self.err, text=True)
        self._expect("READY")  # loaded, before its first step

    def _expect(self, what: str) -> str:
        for line in self.p.stdout:
            if line.startswith(what):
                return line
        self.err.flush()
        raise SystemExit("TRL run failed: " + open(self.err.name).read()[-4000:])

    def step(self) -> dict:
        """One step: {"step_s", "generate_s"} (generation and scoring inside it)."""
        self.p.stdin.write("go\n")
        self.p.stdin.flush()
        return json.loads(self._expect("{"))

    def next_ready(self) -> None:
        self._expect("READY")

    def close(self) -> None:
        self.p.kill()
        self.p.wait()


def compare(path: str, a) -> dict:
    """One warm-up step each, then --steps rounds of one step of each side, the order
    swapped every round."""
    import ray

    tr = start_ours(path, a)
    trl = TRLChild(path, a)
    ours_s, trl_s, gen_tokens, ours_phases, trl_gen = [], [], [], [], []
    try:
        for r in range(a.steps + 1):
            order = ("ours", "trl") if r % 2 == 0 else ("trl", "ours")
            for side in order:
                if side == "ours":
                    m = tr.train_step()
                    if r:
                        ours_s.append(m["time/step"])
                        gen_tokens.append(m["tokens/generated"])
                        ours_phases.append(m)
                else:
                    t = trl.step()
                    if r:
                        trl_s.append(t["step_s"])
                        trl_gen.append(t["generate_s"])
                    if r < a.steps:
                        trl.next_ready()
    finally:
        trl.close()
        tr.shutdown()
        ray.shutdown()
    B = a.prompts * a.n
    o, t = statistics.median(ours_s), statistics.median(trl_s)
    med = lambda k: round(statistics.median(m[k] for m in ours_phases), 3)  # noqa: E731
    return {"ours": {"step_s": o, "samples_per_s": B / o, "steps": ours_s,
                     "generated_tokens": statistics.median(gen_tokens),
                     "generate_s": med("time/generate"), "learn_s": med("time/learn"),
                     "sync_s": med("time/sync")},
            "trl": {"step_s": t, "samples_per_s": B / t, "steps": trl_s,
                    "generate_s": round(statistics.median(trl_gen), 3)},
            "ratio": t / o}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="tiny,100")
    workload_args(ap, steps=5, tokens=32)
    ap.add_argument("--threads", type=int, default=2, help="each side's thread budget")
    ap.add_argument("--trl-child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.trl_child:
        run_trl(a.trl_child, a)
        return
    if a.quick:
        a.sizes, a.steps = "tiny", 1
    res = {}
    for size in a.sizes.split(","):
        res[size] = r = compare(model_path(size), a)
        print(f"{size:>5}: ours {r['ours']['samples_per_s']:.2f} samples/s "
              f"({r['ours']['step_s']:.2f} s/step), TRL {r['trl']['samples_per_s']:.2f} "
              f"samples/s ({r['trl']['step_s']:.2f} s/step): ours/TRL = {r['ratio']:.2f}\n"
              f"       ours: generate {r['ours']['generate_s']:.2f} s, learn "
              f"{r['ours']['learn_s']:.2f} s, sync {r['ours']['sync_s']:.2f} s; TRL: generate "
              f"and score {r['trl']['generate_s']:.2f} s, the rest "
              f"{r['trl']['step_s'] - r['trl']['generate_s']:.2f} s", flush=True)
    big = [s for s in res if s != "tiny"]
    print(json.dumps({
        "workload": {"prompts": a.prompts, "n": a.n, "new_tokens": a.tokens,
                     "steps": a.steps, "threads_per_side": a.threads,
                     "model": "random Qwen2.5-VL (tiny and ~100M)",
                     "trl": "1.16.0, transformers generate", "order": "alternated"},
        "vs_trl_ratio": round(res[big[-1]]["ratio"], 3) if big else None,
        "vs_trl_ratio_tiny": round(res["tiny"]["ratio"], 3) if "tiny" in res else None,
        "results": res,
    }, default=float))


if __name__ == "__main__":
    main()
