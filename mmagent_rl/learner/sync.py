"""Weights from learner rank 0 to every rollout engine, in place, every step.

One interface, backends by name:
- ``object_store`` (CPU default): rank 0 exports HF-named tensors once, ``ray.put``s
  them, and every RolloutWorker loads the same object (zero-copy reads on one node).
- ``cuda_ipc`` / ``nccl`` broadcast: GPU-only, not implemented yet; selecting one on a
  machine without CUDA fails at start with a clear message.
Names and shapes are validated on the receiving side before the engine is touched
(:func:`mmagent_rl.rollout.engine.validate_push`): a failed reload kills a vLLM engine.
A sync is always a full push: one object, or all the buckets of one sync together, must
name every checkpoint parameter exactly once (``check_complete``), else nothing loads.

Wire format: tensors travel as numpy arrays (16-bit floats viewed as int16), which Ray
stores out of band and reads back zero-copy from the shared object store; torch tensors
would be pickled through ``torch.save`` (two extra copies).

``sync.bucket_mb = 0`` sends them as one object; ``> 0`` as several objects of at most
that many MB (whole tensors, in checkpoint order). Neither side clones the whole model:
the learner puts its live weights into the store bucket by bucket, the engine reads zero-copy
views and streams them through a single in-place reload (every bucket is validated
first). Bucketing lowers the peak extra memory of both processes (bench/weight_sync.py
measures it); the store still holds one full copy. The actors' public methods
``Learner.export_weight_refs`` and ``RolloutWorker.load_weight_refs`` call
:func:`export_buckets` and :func:`load_buckets`.
"""
from __future__ import annotations

import numpy as np
import torch

BACKENDS = ("object_store",)
_WIRE_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16}


def export_hf_state(model, gather_zero3: bool = False,
                    clone: bool = True) -> list[tuple[str, torch.Tensor]]:
    """(checkpoint name, tensor) pairs, named as ``save_pretrained`` would write them,
    tied duplicates dropped, detached copies on CPU. ``clone=False`` returns views of
    the live CPU weights (for a caller that serialises them at once); ZeRO-3's gathered
    weights are always copied."""
    from transformers.core_model_loading import revert_weight_conversion

    if gather_zero3:
        import deepspeed

        params = list(model.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    else:
        sd = {k: (v.detach().cpu().clone() if clone else v.detach().cpu())
              for k, v in model.state_dict().items()}
    # Tied weights (lm_head = embed_tokens) appear twice in state_dict, once on disk.
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    return list(revert_weight_conversion(model, sd).items())


def check_backend(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"sync.backend={name!r} is not available; valid: {list(BACKENDS)}")


def to_wire(named) -> list[tuple[str, np.ndarray, str]]:
    """(name, numpy view, torch dtype name): zero-copy views of CPU tensors."""
    out = []
    for name, t in named:
        t = t.detach().cpu().contiguous()
        view = _WIRE_VIEW.get(t.dtype)
        out.append((name, (t.view(view) if view is not None else t).numpy(),
                    str(t.dtype).removeprefix("torch.")))
    return out


def from_wire(items) -> list[tuple[str, torch.Tensor]]:
    """Inverse of :func:`to_wire` (zero-copy; read-only arrays stay unwritten). Plain
    (name, tensor) pairs pass through unchanged."""
    import warnings

    out = []
    for item in items:
        if len(item) == 2:
            out.append(tuple(item))
            continue
        name, a, dtype = item
        with warnings.catch_warnings():  # object-store arrays are read-only: never written
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(a)
        target = getattr(torch, dtype)
        out.append((name, t.view(target) if t.dtype != target else t))
    return out


def make_buckets(named, bucket_mb: float) -> list[list]:
    """Consecutive groups of whole tensors of at most ``bucket_mb`` MB each (a larger
    tensor is a bucket of its own); the order is kept. ``bucket_mb <= 0``: one bucket."""
    if bucket_mb <= 0:
        return [list(named)] if named else []
    limit = max(1, int(bucket_mb * 2**20))
    buckets, cur, size = [], [], 0
    for name, t in named:
        n = t.numel() * t.element_size()
        if cur and size + n > limit:
            buckets.append(cur)
            cur, size = [], 0
        cur.append((name, t))
        size += n
    if cur:
        buckets.append(cur)
    return buckets


def export_buckets(model, bucket_mb: float, *, gather_zero3: bool, rank: int) -> list:
    """In a learner process: ``model``'s weights as object-store refs, one per bucket.
    Under ZeRO-3 every rank must call it (the gather is a collective); only rank 0's
    list is non-empty."""
    import ray

    named = export_hf_state(model, gather_zero3=gather_zero3, clone=False)
    if rank != 0:
        return []
    # Each put copies the bucket into the store at once, so no full clone is needed.
    return [ray.put(to_wire(b)) for b in make_buckets(named, bucket_mb)]


def load_buckets(engine, refs: list) -> None:
    """In a rollout process: load the buckets into ``engine`` (a VLLMEngine) in place."""
    import ray

    # One get for all buckets (one round trip to their owner, not one per bucket); the
    # arrays are zero-copy views of the shared store, turned into tensors bucket by bucket.
    arrays = ray.get(list(refs))
    engine.load_weights_bucketed(lambda i: from_wire(arrays[i]), len(refs))
