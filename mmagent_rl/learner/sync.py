"""Weights from learner rank 0 to every rollout engine, in place, every step.

One interface, backends by name:
- ``object_store`` (CPU default): rank 0 exports HF-named tensors once, ``ray.put``s
  them, and every RolloutWorker loads the same object (zero-copy reads on one node).
- ``cuda_ipc`` / ``nccl`` broadcast: GPU-only, not implemented yet; selecting one on a
  machine without CUDA fails at start with a clear message.
Names and shapes are validated on the receiving side before the engine is touched
(:func:`mmagent_rl.rollout.engine.validate_push`): a failed reload kills a vLLM engine.
"""
from __future__ import annotations

import torch

BACKENDS = ("object_store",)


def export_hf_state(model, gather_zero3: bool = False) -> list[tuple[str, torch.Tensor]]:
    """(checkpoint name, tensor) pairs, named as ``save_pretrained`` would write them,
    tied duplicates dropped, detached copies on CPU."""
    from transformers.core_model_loading import revert_weight_conversion

    if gather_zero3:
        import deepspeed

        params = list(model.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    else:
        sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    # Tied weights (lm_head = embed_tokens) appear twice in state_dict, once on disk.
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    return list(revert_weight_conversion(model, sd).items())


def check_backend(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"sync.backend={name!r} is not available; valid: {list(BACKENDS)}")
