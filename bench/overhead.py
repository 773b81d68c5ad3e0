"""The framework's overhead: a whole RL step against the pure compute it contains.

    python bench/overhead.py [--steps 4] [--prompts 4] [--n 4] [--tokens 64] [--quick]

1. The real trainer (Ray, vLLM, DeepSpeed, 1 learner, tiny model, GRPO defaults) runs
   warm-up + ``--steps`` steps; the last step's trajectories are kept.
2. In the same process, a bare ``VLLMEngine`` replays the same requests: every turn of
   every trajectory, with the same prefix (prompt, earlier turns, observations, crops)
   and the same number of sampled tokens, all trajectories' k-th turns in one call,
   the way the agent loop batches them (``ignore_eos``). The prefix, encoder and
   multimodal-processor caches are emptied before each timed replay: the trainer meets
   new examples every step, so a replay must not reuse the previous one's work.
3. A bare learner (plain torch, no DeepSpeed, tensors collated beforehand) runs forward
   and backward of the same trajectories in the same micro-batches; the reference
   forward (KL) and the AdamW step are timed apart.

``overhead_ratio`` = median step time / (pure generation + pure forward/backward).
``overhead_ratio_with_ref_and_optim`` also counts the reference forward and the
optimizer step as compute. Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from common import workload_args


def turn_requests(trajs, image_token_id: int):
    """For every trajectory, its sampled spans (runs of loss mask 1) as
    (prefix ids, images seen so far, tokens sampled)."""
    per_traj = []
    for t in trajs:
        turns, i, n = [], 0, len(t.loss_mask)
        while i < n:
            if t.loss_mask[i]:
                j = i
                while j < n and t.loss_mask[j]:
                    j += 1
                prefix = t.token_ids[:i]
                runs = sum(1 for k in range(len(prefix)) if prefix[k] == image_token_id
                           and (k == 0 or prefix[k - 1] != image_token_id))
                turns.append((prefix, t.images[:runs], j - i))
                i = j
            else:
                i += 1
        per_traj.append(turns)
    return per_traj


def median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    workload_args(ap, steps=4, warmup=1, tokens=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--set", action="append", default=[],
                    help="extra trainer override key=value (repeatable)")
    a = ap.parse_args()
    if a.quick:
        a.steps, a.reps = 2, 2

    import torch
    import yaml

    from common import run_steps, stop

    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in a.set)}
    rows, trainer = run_steps("grpo", steps=a.steps, warmup=a.warmup, prompts=a.prompts,
                              n=a.n, tokens=a.tokens, run_dir="/tmp/mmagent_bench_overhead",
                              overrides=overrides)
    trajs = trainer.last_trajectories
    kl_beta = trainer.cfg.algo.grpo.kl_beta
    mbs = trainer.cfg.learner.micro_batch_size
    stop(trainer)

    def med(k):
        return statistics.median(r[k] for r in rows)

    phases = {k: med(k) for k in ("time/step", "time/generate", "time/score", "time/learn",
                                  "time/learner_compute", "time/sync")}

    torch.set_num_threads(1)
    from mmagent_rl.learner.batch import collate
    from mmagent_rl.learner.policy import load_policy, token_logprobs
    from mmagent_rl.chat import BANNED_LOGIT_BIAS, ChatFormat, collapse_image_runs
    from mmagent_rl.rollout.engine import EngineConfig, VLLMEngine

    path = trainer.model_path
    chat = ChatFormat.from_pretrained(path)
    eng = VLLMEngine(path, EngineConfig(max_model_len=trainer.cfg.rollout.engine.max_model_len))
    per_traj = turn_requests(trajs, chat.image_token_id)
    rounds = max(len(t) for t in per_traj)
    calls = []
    for k in range(rounds):
        batch = [t[k] for t in per_traj if len(t) > k]
        calls.append(([(collapse_image_runs(ids, chat.image_token_id), imgs)
                       for ids, imgs, _ in batch], [c for _, _, c in batch]))
    bias = {t: BANNED_LOGIT_BIAS for t in chat.banned_ids}

    def generate_all():
        for reqs, counts in calls:
            eng.generate(reqs, max_tokens=counts, ignore_eos=True, logit_bias=bias)

    def cold():  # the trainer meets new examples every step: no cache hits across steps
        eng.reset_caches()
        eng.llm.reset_mm_cache()

    generate_all()  # warm-up
    times = []
    for _ in range(a.reps):
        cold()
        times.append(median_time(generate_all, 1))
    pure_gen = statistics.median(times)
    gen_tokens = sum(c for _, counts in calls for c in counts)
    del eng

    model = load_policy(path).train()
    ref = load_policy(path).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    batches = [collate(trajs[i:i + mbs], chat.image_processor, chat.image_token_id, chat.pad_id)
               for i in range(0, len(trajs), mbs)]

    def fwd_bwd():
        for b in batches:
            lp, _ = token_logprobs(model, b, banned_ids=chat.banned_ids)
            (-(lp * b.loss_mask).sum() / max(1, b.num_tokens)).backward()

    def ref_fwd():
        with torch.no_grad():
            for b in batches:
                token_logprobs(ref, b, banned_ids=chat.banned_ids)

    def collate_all():
        for i in range(0, len(trajs), mbs):
            collate(trajs[i:i + mbs], chat.image_processor, chat.image_token_id, chat.pad_id)

    from mmagent_rl.learner.batch import preprocess_images

    mb_images = [[im for t in trajs[i:i + mbs] for im in t.images]
                 for i in range(0, len(trajs), mbs)]

    def images_each():  # before: every rollout's copy of its prompt image processed
        for ims in mb_images:
            chat.image_processor(images=ims, return_tensors="pt")

    def images_once():  # now: each shared image object once (learner/batch.py)
        for ims in mb_images:
            preprocess_images(ims, chat.image_processor)

    fwd_bwd()  # warm-up (and gradients exist for the optimizer step)
    pure_learn = median_time(fwd_bwd, a.reps)
    pure_ref = median_time(ref_fwd, a.reps) if kl_beta > 0 else 0.0
    pure_optim = median_time(opt.step, a.reps)
    collate_s = median_time(collate_all, a.reps)
    img_each_s = median_time(images_each, a.reps)
    img_once_s = median_time(images_once, a.reps)
    real_tokens = sum(int(b.attention_mask.sum()) for b in batches)
    padded_tokens = sum(b.input_ids.numel() for b in batches)

    step = phases["time/step"]
    ratio = step / (pure_gen + pure_learn)
    ratio_full = step / (pure_gen + pure_learn + pure_ref + pure_optim)
    print(f"workload: {a.prompts} prompts x {a.n} samples, <= {a.tokens} new tokens/turn, "
          f"{gen_tokens} sampled tokens in {sum(len(t) for t in per_traj)} turns "
          f"({rounds} rounds), kl_beta={kl_beta}")
    print(f"phase                   seconds (median of {a.steps} steps)")
    for k, v in phases.items():
        print(f"{k:22s} {v:8.3f}  ({100 * v / step:.0f}% of step)")
    print(f"pure generate          {pure_gen:8.3f}")
    print(f"pure forward/backward  {pure_learn:8.3f}")
    print(f"pure reference forward {pure_ref:8.3f}")
    print(f"pure AdamW step        {pure_optim:8.3f}")
    print(f"collate (images, mRoPE) {collate_s:7.3f}  padding: "
          f"{100 * (1 - real_tokens / padded_tokens):.0f}% of learner tokens")
    print(f"image preprocessing    {img_once_s:8.3f}  (each shared image once; "
          f"{img_each_s:.3f} processing every copy)")
    print(f"overhead ratio         {ratio:8.3f}  (step / (pure generate + pure fwd/bwd))")
    print(f"  with ref + optimizer {ratio_full:8.3f}")
    print(json.dumps({
        "workload": {"prompts": a.prompts, "n": a.n, "max_new_tokens": a.tokens,
                     "generated_tokens": gen_tokens, "learners": 1, "kl_beta": kl_beta,
                     "overrides": overrides},
        **{k.replace("/", "_"): round(v, 4) for k, v in phases.items()},
        "pure_generate_s": round(pure_gen, 4), "pure_fwd_bwd_s": round(pure_learn, 4),
        "pure_ref_fwd_s": round(pure_ref, 4), "pure_optim_s": round(pure_optim, 4),
        "collate_s": round(collate_s, 4), "images_dedup_s": round(img_once_s, 4),
        "images_every_copy_s": round(img_each_s, 4),
        "padding_share": round(1 - real_tokens / padded_tokens, 4),
        "overhead_ratio": round(ratio, 3),
        "overhead_ratio_with_ref_and_optim": round(ratio_full, 3),
    }))


if __name__ == "__main__":
    main()
