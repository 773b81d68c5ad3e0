"""Weight sync time vs model size, through the project's real path, against a plain copy.

    python bench/weight_sync.py [--sizes 10,50,100,250] [--bucket-mb 64] [--reps 3]
    python bench/weight_sync.py --quick          # 10M and 50M only, fewer steps

For each size a random Qwen2.5-VL is built from a config (no hub; cached like the tiny
model), then a real ``Learner`` actor (DeepSpeed ZeRO-2, 1 rank) and a real
``RolloutWorker`` actor (vLLM) start, and the actor methods that ``Trainer.sync_weights``
calls every step (``Learner.export_weight_refs``, then ``RolloutWorker.load_weight_refs``)
move the learner's weights into the engine:
- ``one_object``: ``sync.bucket_mb=0`` (learner export -> one object -> engine reload);
- ``bucketed``: ``sync.bucket_mb=B`` (buckets of B MB, loaded one at a time);
- ``before``: the sync this replaced (``Learner.export_weights`` returns torch tensors,
  which Ray pickles through ``torch.save``; ``RolloutWorker.load_weights``).
The baseline is a plain in-memory copy (``dst.copy_(src)``, 1 thread) of tensors of the
same shapes, timed in this process in the same run: ``sync_to_copy_ratio`` = sync time /
copy time, the copy timed right before each sync (same machine load). The peak RSS of
the learner and engine processes during the syncs of a mode, above their RSS before the
first sync (psutil, every 10 ms), shows the extra memory each mode needs.

``sync_step_share``: time/sync / time/step of the real trainer on the tiny model
(4 prompts x 4 samples, 64 new tokens), alternating both sync modes step by step.
Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from dataclasses import replace

# (hidden, intermediate, heads, kv heads) per target size in M parameters; the number
# of layers is solved for the target.
SHAPES = {10: (512, 1408, 8, 2), 50: (768, 2048, 12, 2), 100: (1024, 2816, 16, 2),
          250: (1280, 3456, 20, 4), 500: (1536, 4096, 12, 2)}


def spec_for(target_m: int):
    import torch

    from mmagent_rl.models.tiny import TinySpec, _build_config, _build_tokenizer
    from transformers import Qwen2_5_VLForConditionalGeneration

    h, inter, heads, kv = SHAPES[target_m]
    base = TinySpec(hidden_size=h, intermediate_size=inter, num_heads=heads,
                    num_kv_heads=kv, max_position_embeddings=2048)
    tok = _build_tokenizer(base)

    def count(layers):
        with torch.device("meta"):
            m = Qwen2_5_VLForConditionalGeneration(_build_config(replace(base, num_layers=layers),
                                                                 tok))
        return sum(p.numel() for p in m.parameters())

    c1, c2 = count(1), count(2)
    layers = max(1, round((target_m * 1e6 - (c1 - (c2 - c1))) / (c2 - c1)))
    spec = replace(base, num_layers=layers)
    return spec, count(layers)


class RssPeak:
    """Peak RSS of some processes, sampled in a thread, relative to the start."""

    def __init__(self, pids):
        import psutil

        self.procs = [psutil.Process(p) for p in pids]
        self.base = [p.memory_info().rss for p in self.procs]
        self.peak = list(self.base)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.is_set():
            for i, p in enumerate(self.procs):
                try:
                    self.peak[i] = max(self.peak[i], p.memory_info().rss)
                except Exception:
                    pass
            time.sleep(0.01)

    def stop(self) -> list[float]:
        self._stop.set()
        self._t.join()
        return [(pk - b) / 2**30 for pk, b in zip(self.peak, self.base)]


def measure_size(target_m: int, a) -> dict:
    import ray
    import torch

    from mmagent_rl.algos.grpo import GRPOConfig
    from mmagent_rl.config import AlgoConfig, LearnerConfig
    from mmagent_rl.learner.worker import make_learner_actor
    from mmagent_rl.models.tiny import ensure_tiny_model
    from mmagent_rl.rollout.agent_loop import AgentConfig
    from mmagent_rl.rollout.engine import EngineConfig, checkpoint_shapes
    from mmagent_rl.rollout.worker import make_rollout_actor
    from mmagent_rl.cluster import free_port

    t0 = time.perf_counter()
    spec, n_params = spec_for(target_m)
    path = str(ensure_tiny_model(spec))
    build_s = time.perf_counter() - t0
    shapes = list(checkpoint_shapes(path).values())
    nbytes = 4 * sum(int(torch.Size(s).numel()) for s in shapes)

    learner = make_learner_actor(0.5).remote(
        path, LearnerConfig(zero_stage=2), AlgoConfig(name="grpo", grpo=GRPOConfig(kl_beta=0.0)),
        rank=0, world_size=1, master_addr="127.0.0.1", master_port=free_port())
    worker = make_rollout_actor(0.5).remote(
        path, EngineConfig(max_model_len=1024), AgentConfig(max_total_tokens=1024))
    ray.get([learner.config.remote(), worker.ping.remote()], timeout=1800)
    pid = lambda h: ray.get(h.__ray_call__.remote(lambda self: os.getpid()))  # noqa: E731
    pids = [pid(learner), pid(worker)]

    try:
        return _modes(a, target_m, learner, worker, pids, shapes, spec, n_params,
                      nbytes, build_s)
    finally:
        ray.kill(learner)
        ray.kill(worker)


def _modes(a, target_m, learner, worker, pids, shapes, spec, n_params, nbytes, build_s):
    import ray
    import torch

    def sync(version, bucket_mb):  # what Trainer.sync_weights calls, for one learner
        refs = ray.get(learner.export_weight_refs.remote(bucket_mb), timeout=1800)
        ray.get(worker.load_weight_refs.remote(refs, version), timeout=1800)

    out = {"params_m": round(n_params / 1e6, 1), "bytes_mb": round(nbytes / 2**20, 1),
           "layers": spec.num_layers, "hidden": spec.hidden_size,
           "build_s": round(build_s, 1)}
    src = [torch.randn(s) for s in shapes]
    dst = [torch.empty(s) for s in shapes]

    def plain_copy():
        for d, s_ in zip(dst, src):
            d.copy_(s_)

    def before(version):  # the trainer's sync before bucketing: actor methods, torch pickles
        ref = learner.export_weights.remote()
        ray.get([worker.load_weights.remote(ref, version)], timeout=1800)

    version, copies = 0, []
    base = None
    # Least memory first: an allocator keeps what a sync freed, so a later mode's peak
    # can only hide a smaller footprint, never inflate one.
    for mode, bucket in (("bucketed", a.bucket_mb), ("one_object", 0.0), ("before", None)):
        if bucket is None and target_m > a.before_max_m:
            out["before_s"] = None
            out["before_failed"] = f"skipped above {a.before_max_m}M (--before-max-m)"
            continue
        times, peaks = [], []
        for r in range(a.reps + 1):  # the first is a warm-up
            version += 1
            t0 = time.perf_counter()
            plain_copy()  # interleaved, so both see the same machine load
            if r:
                copies.append(time.perf_counter() - t0)
            mon = RssPeak(pids)
            base = base or mon.base
            t0 = time.perf_counter()
            try:
                before(version) if bucket is None else sync(version, bucket)
            except ray.exceptions.RayError as e:  # e.g. an actor killed for memory
                mon.stop()
                if bucket is not None:
                    raise
                print(f"{target_m}M: the old sync failed ({type(e).__name__}): "
                      f"{str(e).splitlines()[0][:200]}", flush=True)
                out["before_failed"] = type(e).__name__
                break
            dt = time.perf_counter() - t0
            mon.stop()
            if r:
                times.append(dt)
            peaks.append(mon.peak)
        if not times:
            out[f"{mode}_s"] = None
            continue
        out[f"{mode}_s"] = round(statistics.median(times), 4)
        for i, who in enumerate(("learner", "engine")):
            out[f"{mode}_{who}_extra_rss_gib"] = round(
                (max(p[i] for p in peaks) - base[i]) / 2**30, 3)
    # The engine's finiteness check on the same tensors: element-wise (before) vs one
    # summing pass with an exact fallback (rollout/engine.py, _all_finite).
    from mmagent_rl.rollout.engine import _all_finite

    t0 = time.perf_counter()
    assert all(bool(torch.isfinite(t).all()) for t in src)
    out["finite_check_before_s"] = round(time.perf_counter() - t0, 4)
    t0 = time.perf_counter()
    assert all(_all_finite(t) for t in src)
    out["finite_check_s"] = round(time.perf_counter() - t0, 4)
    del src, dst
    copy_s = statistics.median(copies)
    out["copy_s"] = round(copy_s, 4)
    for mode in ("before", "one_object", "bucketed"):
        out[f"{mode}_to_copy"] = round(out[f"{mode}_s"] / copy_s, 2) \
            if out[f"{mode}_s"] is not None else None
    best = min(out["one_object_s"], out["bucketed_s"])
    out["sync_gb_per_s"] = round(nbytes / 2**30 / best, 3)
    out["speedup_vs_before"] = round(out["before_s"] / best, 2) \
        if out["before_s"] is not None else None
    return out


def step_share(a) -> dict:
    """time/sync over time/step of the real trainer (tiny model), both sync modes."""
    from common import run_steps, stop

    rows, tr = run_steps("grpo", steps=0, warmup=1, prompts=4, n=4, tokens=64,
                         run_dir="/tmp/mmagent_bench_sync")
    res = {}
    per_mode = {0.0: [], a.tiny_bucket_mb: []}
    for i in range(2 * a.steps):
        b = list(per_mode)[i % 2]
        tr.cfg.sync.bucket_mb = b
        m = tr.train_step()
        per_mode[b].append(m["time/sync"] / m["time/step"])
    stop(tr)
    res["sync_step_share_one_object"] = round(statistics.median(per_mode[0.0]), 4)
    res["sync_step_share_bucketed"] = round(statistics.median(per_mode[a.tiny_bucket_mb]), 4)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    # 500 fits only on a quiet machine: the engine and learner each need several GiB
    # more than the model while a sync runs (see docs/performance.md).
    ap.add_argument("--sizes", default="10,50,100,250")
    ap.add_argument("--bucket-mb", type=float, default=64.0)
    ap.add_argument("--tiny-bucket-mb", type=float, default=1.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="trainer steps per sync mode")
    ap.add_argument("--before-max-m", type=int, default=250,
                    help="largest size (M params) to run the old sync at: at 500M it needs "
                         "~10 GiB more than this 24 GiB machine can spare")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.sizes, a.reps, a.steps = "10,50", 2, 2
    import torch

    torch.set_num_threads(1)
    share = step_share(a)  # starts Ray (the trainer's own settings)
    print(json.dumps(share), flush=True)
    rows = []
    import ray

    failed = {}
    for s in [int(x) for x in a.sizes.split(",")]:
        try:
            r = measure_size(s, a)
        except ray.exceptions.RayError as e:  # an actor killed for memory, most likely
            failed[s] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            print(f"{s}M failed: {failed[s]}", flush=True)
            continue
        rows.append(r)
        print(json.dumps(r), flush=True)

    ray.shutdown()
    print(f"\n{'params':>8} {'MB':>7} {'copy s':>7} | {'before s':>8} {'x copy':>6} | "
          f"{'1 obj s':>7} {'x copy':>6} | {'bucket s':>8} {'x copy':>6} | "
          "extra RSS GiB learner/engine: before | 1 obj | bucketed")
    for r in rows:
        rss = " | ".join(f"{r[m + '_learner_extra_rss_gib']:.2f}/{r[m + '_engine_extra_rss_gib']:.2f}"
                         if r[m + "_s"] is not None else "failed"
                         for m in ("before", "one_object", "bucketed"))
        old = (f"{r['before_s']:>8.3f} {r['before_to_copy']:>6.1f}" if r["before_s"] is not None
               else f"{'failed':>15}")
        print(f"{r['params_m']:>7}M {r['bytes_mb']:>7} {r['copy_s']:>7.3f} | {old} | "
              f"{r['one_object_s']:>7.3f} {r['one_object_to_copy']:>6.1f} | "
              f"{r['bucketed_s']:>8.3f} {r['bucketed_to_copy']:>6.1f} | {rss}")
    print(f"sync share of a tiny-model step: one object {share['sync_step_share_one_object']:.3f}, "
          f"bucketed ({a.tiny_bucket_mb} MB) {share['sync_step_share_bucketed']:.3f}")
    for s_, why in failed.items():
        print(f"{s_:>7}M failed: {why}")
    largest = rows[-1]
    print(json.dumps({
        "bucket_mb": a.bucket_mb, "sizes": rows, "failed_sizes": failed,
        "sync_to_copy_ratio": min(largest["one_object_to_copy"], largest["bucketed_to_copy"]),
        "sync_to_copy_ratio_at_params_m": largest["params_m"],
        "sync_to_copy_ratio_one_object": largest["one_object_to_copy"],
        "sync_to_copy_ratio_bucketed": largest["bucketed_to_copy"],
        "sync_to_copy_ratio_before": largest["before_to_copy"],
        "sync_step_share": min(share.values()), **share,
    }))


if __name__ == "__main__":
    main()
