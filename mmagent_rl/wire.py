"""The weights wire format, a contract at the bottom of the package: the learner sends
with it, the rollout engine receives with it (learner/sync.py has the protocol).

Tensors travel as numpy arrays (16-bit floats viewed as int16), which Ray stores out of
band and reads back zero-copy from the shared object store; torch tensors would be
pickled through ``torch.save`` (two extra copies). ``make_buckets`` groups them into
objects of at most ``sync.bucket_mb`` MB.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import torch

BACKENDS = ("object_store", "transfer")
_WIRE_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16}


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


def load_buckets(engine, refs: list) -> None:
    """In a rollout process: load the buckets into ``engine`` (a VLLMEngine) in place."""
    import ray

    # One get for all buckets (one round trip to their owner, not one per bucket); the
    # arrays are zero-copy views of the shared store, turned into tensors bucket by bucket.
    arrays = ray.get(list(refs))
    engine.load_weights_bucketed(lambda i: from_wire(arrays[i]), len(refs))


class WeightPushError(ValueError):
    """A weight push that would break the engine; nothing was loaded."""


def _all_finite(t) -> bool:
    """Exact, and one read pass in the common case: a finite sum means every value is
    finite; a non-finite sum (a NaN/inf, or an overflowing sum) is checked element-wise."""
    if not t.is_floating_point():
        return True
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def check_complete(names: list[str], expected: dict[str, tuple[int, ...]]) -> None:
    """A complete push (every name of one sync, over all its buckets) names every
    checkpoint parameter exactly once: a left-out parameter would silently keep its old
    value in the engine (the rollout policy would no longer be the learner's)."""
    seen: set[str] = set()
    dup = sorted({n for n in names if n in seen or seen.add(n)})
    missing = sorted(set(expected) - seen)
    bad = []
    if missing:
        bad.append(f"{len(missing)} parameters missing from a full push: "
                   + ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else ""))
    if dup:
        bad.append(f"{len(dup)} parameters pushed twice: " + ", ".join(dup[:5]))
    if bad:
        raise WeightPushError("weight push refused: " + "; ".join(bad))


def validate_push(named: list[tuple[str, object]], expected: dict[str, tuple[int, ...]],
                  complete: bool = False) -> None:
    """Refuse unknown names, wrong shapes and non-finite values before touching vLLM:
    a failed reload leaves the engine dead. ``complete``: ``named`` is a whole push,
    which must also name every expected parameter (:func:`check_complete`); a bucket of
    a push is validated with ``complete=False`` and the push's names checked at the end."""
    if complete:
        check_complete([name for name, _ in named], expected)
    bad = []
    for name, t in named:
        if name not in expected:
            bad.append(f"unknown parameter {name!r}")
        elif tuple(t.shape) != expected[name]:
            bad.append(f"{name}: shape {tuple(t.shape)} != {expected[name]}")
        elif not _all_finite(t):
            bad.append(f"{name}: non-finite values")
    if bad:
        raise WeightPushError(f"weight push refused ({len(bad)} problems): " + "; ".join(bad[:5]))


def checkpoint_shapes(model_path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of a safetensors checkpoint, read from the headers."""
    shapes: dict[str, tuple[int, ...]] = {}
    for f in sorted(Path(model_path).glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, info in header.items():
            if name != "__metadata__":
                shapes[name] = tuple(info["shape"])
    return shapes
