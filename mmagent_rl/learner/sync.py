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

import torch

from mmagent_rl.wire import make_buckets, to_wire

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
