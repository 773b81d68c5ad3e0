"""CPU-only workaround for PyPI's torchvision, the one place it is explained.

PyPI's torchvision wheel that matches torch 2.13 is a CUDA build. Next to the CPU torch
wheel its compiled ``_C.so`` cannot load, and ``import torchvision`` then dies with
``RuntimeError: operator torchvision::nms does not exist`` while registering fake
kernels. That breaks open_clip, the Qwen-VL processors and ``from vllm import LLM``.

Fix: just before torchvision is first imported, and only when torch is a CPU build,
declare the two operator schemas it expects. Transforms (all this project uses) work;
the compiled ops then raise a clear "no kernel" error if anyone calls them.

It must run in every process that may import torchvision (Ray workers, vLLM engine
processes), so ``make setup`` installs a ``.pth`` file that calls :func:`install_hook`
at interpreter start. The hook is a meta-path finder: it costs nothing until torchvision
is imported. (The same setup step uninstalls torchaudio/torchcodec/triton on CPU
builds: PyPI's torchaudio and torchcodec are CUDA builds whose mere presence breaks
``from vllm import LLM``, and triton is unused on CPU.)
"""
from __future__ import annotations

import importlib.abc
import sys

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_LIBS: list = []  # keep the Library objects alive, or the definitions vanish


def declare_torchvision_ops() -> bool:
    """Declare torchvision's op schemas on CPU torch builds. Returns True if it did."""
    import torch

    if torch.version.cuda is not None or torch.version.hip is not None:
        return False
    try:
        torch.ops.torchvision.nms  # noqa: B018 - already declared (real _C loaded)
        return False
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS:
        lib.define(schema)
    _LIBS.append(lib)
    return True


class _TorchvisionFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision":
            sys.meta_path.remove(self)
            try:
                declare_torchvision_ops()
            except Exception:  # never block the import itself
                pass
        return None  # let the normal finders load the module


def install_hook() -> None:
    if "torchvision" in sys.modules:
        return
    if not any(isinstance(f, _TorchvisionFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionFinder())
