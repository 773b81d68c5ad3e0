"""``sync.backend=transfer``: weights through vLLM's own weight-transfer protocol.

vLLM 0.32 splits a weight push into a control plane (``init_weight_transfer_engine``,
``start_weight_update``, ``update_weights``, ``finish_weight_update``, called on the
inference side) and a data plane owned by a pair of engines: a worker-side
``WeightTransferEngine`` built by ``WeightTransferEngineFactory`` inside vLLM's worker, and
a trainer-side ``TrainerWeightTransferEngine`` built by ``WeightTransferTrainerFactory``.
vLLM ships NCCL (separate GPUs) and CUDA IPC (colocated) engines; there is none for CPU.
This module registers one, ``mmagent_gloo``, over a gloo process group of its own (not
the learners' DeepSpeed group), so CPU runs drive the same protocol and code path as a
GPU cluster. ``transfer_backend()`` picks nccl / ipc / mmagent_gloo by the hardware.

The gloo engine stages each push before it touches the model: every bucket is received
into a buffer, then names, shapes, completeness and finiteness are checked
(``wire.validate_push``); only a valid, complete push is loaded, in
``finish_weight_update``, through vLLM's layerwise reload. A refused or broken push
(a sender that dies mid-transfer ends in the group's timeout) leaves the engine serving
its previous weights, and the error reaches the trainer through the control plane.

The rollout actors are the inference side: ``RolloutWorker`` exposes the four protocol
methods, and :class:`RolloutClient` (the trainer's ``VLLMWeightSyncClient``) calls them,
giving each engine its own rank in the group.
"""
from __future__ import annotations

import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any, Callable, ClassVar

import torch

from mmagent_rl.wire import make_buckets, validate_push

log = logging.getLogger(__name__)

GLOO = "mmagent_gloo"
_ALIGN = 64  # byte offset of every tensor in a packed bucket (any dtype can view it)


def transfer_backend(colocated: bool = False) -> str:
    """vLLM's engine name for this machine: NCCL between GPUs, CUDA IPC when trainer and
    engine share a GPU, our gloo engine on CPU."""
    if torch.cuda.is_available():
        return "ipc" if colocated else "nccl"
    return GLOO


def loads_as_received(backend: str) -> bool:
    """vLLM's NCCL and IPC engines load each chunk as it arrives; ours stages the push."""
    return backend != GLOO


def preflight(named: list[tuple[str, torch.Tensor]], expected: dict) -> None:
    """The whole push checked on the sender (names, shapes, completeness, finiteness)
    before its first byte leaves: for an engine that loads as it receives, the receiving
    side's check would come too late. Raises ``wire.WeightPushError``."""
    validate_push(named, expected, complete=True)


def register() -> None:
    """Register the gloo engines with vLLM's factories (idempotent; in-process engines
    see it at once; a vLLM worker in another process imports this module first)."""
    from vllm.distributed.weight_transfer import (WeightTransferEngineFactory,
                                                  WeightTransferTrainerFactory)

    if GLOO not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(GLOO, __name__, "GlooWeightTransferEngine")
    if GLOO not in WeightTransferTrainerFactory._registry:
        WeightTransferTrainerFactory.register_engine(GLOO, __name__, "GlooTrainerEngine")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _group(host: str, port: int, rank: int, world_size: int, timeout_s: float):
    from vllm.distributed.utils import stateless_init_torch_distributed_process_group

    return stateless_init_torch_distributed_process_group(
        host, port, rank, world_size, "gloo", timeout=timedelta(seconds=timeout_s))


def _destroy(group) -> None:
    """Release a group (None: nothing to release); a group broken by a failed push may
    fail to shut down, and is dropped all the same."""
    if group is not None:
        from vllm.distributed.utils import stateless_destroy_torch_distributed_process_group

        try:
            stateless_destroy_torch_distributed_process_group(group)
        except Exception:  # noqa: BLE001
            pass


def _broadcast(group, buf: torch.Tensor) -> None:
    opts = torch.distributed.BroadcastOptions()
    opts.rootRank = 0
    group.broadcast([buf], opts).wait()


def _nbytes(shape, dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def _aligned(n: int) -> int:
    """``n`` rounded up to the next multiple of _ALIGN."""
    return -(-n // _ALIGN) * _ALIGN


def _layout(shapes, dtypes) -> tuple[list[int], int]:
    """Byte offsets of the tensors of one packed bucket, and its size."""
    offsets, n = [], 0
    for shape, dtype in zip(shapes, dtypes):
        n = _aligned(n)
        offsets.append(n)
        n += _nbytes(shape, dtype)
    return offsets, n


def _reuse(buf: torch.Tensor | None, size: int) -> torch.Tensor:
    """A uint8 buffer of at least ``size`` bytes: ``buf`` if it is big enough. Reusing
    one is what makes a push fast on CPU: fresh pages cost a fault each on first touch
    (gloo moved 64 MB buckets at 0.8 GB/s into fresh buffers, 2.0 GB/s into reused
    ones, on the 2-core development machine)."""
    return buf if buf is not None and buf.numel() >= size else torch.empty(size,
                                                                           dtype=torch.uint8)


def pack(tensors: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """The tensors packed at aligned offsets, in ``out`` if it is big enough."""
    offsets, size = _layout([t.shape for t in tensors], [t.dtype for t in tensors])
    buf = _reuse(out, size)[:size]
    for t, o in zip(tensors, offsets):
        b = t.detach().contiguous().reshape(-1).view(torch.uint8)
        buf[o:o + b.numel()].copy_(b)
    return buf


def unpack(buf: torch.Tensor, shapes, dtypes) -> list[torch.Tensor]:
    offsets, _ = _layout(shapes, dtypes)
    out = []
    for shape, dtype, o in zip(shapes, dtypes, offsets):
        out.append(buf[o:o + _nbytes(shape, dtype)].view(dtype).reshape(shape))
    return out


# ---- the inference side (runs in vLLM's worker) -------------------------------------
@dataclass
class GlooInitInfo:
    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    timeout_s: float = 120.0
    # name -> shape of the checkpoint (the engine's wrapper adds it): what a push must name
    expected_shapes: dict = field(default_factory=dict)


@dataclass
class GlooUpdateInfo:
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    bucket_sizes: list[int]  # tensors per packed bucket, in order


def _engine_base():
    from vllm.distributed.weight_transfer import WeightTransferEngine

    return WeightTransferEngine


class GlooWeightTransferEngine(_engine_base()):
    init_info_cls = GlooInitInfo
    update_info_cls = GlooUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self.group = None
        self.expected: dict[str, tuple[int, ...]] = {}
        self.staged: list | None = None
        self.stage: torch.Tensor | None = None  # the staging area, reused across pushes
        self.timing: dict[str, float] = {}

    def init_transfer_engine(self, info: GlooInitInfo) -> None:
        self.shutdown()  # a new group (new members, or after a failure) replaces the old
        self.expected = {k: tuple(v) for k, v in info.expected_shapes.items()}
        rank = info.rank_offset + self.parallel_config.rank  # tensor-parallel workers
        self.group = _group(info.master_address, info.master_port, rank, info.world_size,
                            info.timeout_s)

    def start_weight_update(self) -> None:
        self.staged = None  # nothing touches the model until the whole push is valid

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # The base class synchronises an accelerator; there is none here.
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, info: GlooUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("weight transfer: init_weight_transfer_engine was not called")
        dtypes = [getattr(torch, d) for d in info.dtype_names]
        sizes, i = [], 0
        for k in info.bucket_sizes:
            sizes.append(_layout(info.shapes[i:i + k], dtypes[i:i + k])[1])
            i += k
        # One staging area for the whole push, kept for the next one (the engine holds
        # one more copy of the weights between pushes; fresh pages each time cost more
        # than the transfer: see _reuse)
        nbytes = sum(_aligned(n) for n in sizes)
        self.stage = _reuse(self.stage, nbytes)
        staged, i, offset, t0 = [], 0, 0, time.perf_counter()
        for k, n in zip(info.bucket_sizes, sizes):  # receive everything, then check it
            shapes, dts = info.shapes[i:i + k], dtypes[i:i + k]
            buf = self.stage[offset:offset + n]
            _broadcast(self.group, buf)
            staged += list(zip(info.names[i:i + k], unpack(buf, shapes, dts)))
            i, offset = i + k, offset + _aligned(n)
        t1 = time.perf_counter()
        validate_push(staged, self.expected, complete=True)  # WeightPushError: nothing loads
        self.timing = {"received_mb": nbytes / 2**20, "receive_s": t1 - t0,
                       "check_s": time.perf_counter() - t1}
        self.staged = staged

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import (finalize_layerwise_reload,
                                                             initialize_layerwise_reload)

        if self.staged is None:
            raise RuntimeError("weight transfer: finish_weight_update without a received push")
        staged, self.staged = self.staged, None
        t0 = time.perf_counter()
        initialize_layerwise_reload(self.model)
        self.model.load_weights(iter(staged))
        finalize_layerwise_reload(self.model, self.model_config)
        self.timing["load_s"] = time.perf_counter() - t0
        log.info("weight push: %.0f MB received in %.3f s, checked in %.3f s, loaded in "
                 "%.3f s", *(self.timing[k] for k in ("received_mb", "receive_s", "check_s",
                                                       "load_s")))

    def shutdown(self) -> None:
        _destroy(self.group)
        self.group = None


# ---- the trainer side (runs in learner rank 0) --------------------------------------
def trainer_init_info(backend: str, *, address: str, port: int, world_size: int,
                      bucket_mb: float, timeout_s: float):
    """The trainer-side init info of ``backend``. NCCL and IPC are vLLM's own engines
    (GPU only; written against vLLM 0.32's dataclasses, never run here: docs/clusters.md):
    they load each chunk as it arrives, so unlike the gloo engine a sender lost
    mid-transfer can leave a GPU engine partly updated (the run then stops)."""
    packed_bytes = int(max(bucket_mb, 1) * 2**20)
    if backend == GLOO:
        return GlooTrainerInitInfo(rank=0, master_address=address, master_port=port,
                                   world_size=world_size, bucket_mb=bucket_mb,
                                   timeout_s=timeout_s)
    if backend == "nccl":
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        return NCCLTrainerInitInfo(rank=0, master_address=address, master_port=port,
                                   world_size=world_size, packed=True,
                                   packed_buffer_size_bytes=packed_bytes)
    if backend == "ipc":
        from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo

        return IPCTrainerInitInfo(rank=0, packed=True, packed_buffer_size_bytes=packed_bytes)
    raise ValueError(f"unknown weight-transfer backend {backend!r}")


class NamedSource:
    """A ``WeightSource`` over a function that returns the current (name, tensor) pairs
    (the learner's HF-named export); each pass calls it again."""

    def __init__(self, export: Callable[[], list]):
        self.export = export

    def metadata(self):
        from vllm.distributed.weight_transfer import ParamMeta

        return [ParamMeta(n, t.dtype, tuple(t.shape)) for n, t in self.export()]

    def __iter__(self):
        return iter(self.export())


class RolloutClient:
    """The trainer's ``VLLMWeightSyncClient`` for our rollout actors: every call fans
    out to all of them and waits; ``init`` gives engine i the ranks from
    ``1 + i * ranks_per_engine`` (its tensor-parallel workers add their own rank)."""

    def __init__(self, handles: list, timeout_s: float, ranks_per_engine: int = 1):
        self.handles, self.timeout_s = list(handles), timeout_s
        self.rank_offsets = [1 + i * ranks_per_engine for i in range(len(self.handles))]

    def _all(self, method: str, *args):
        import ray

        return ray.get([getattr(h, method).remote(*args) for h in self.handles],
                       timeout=self.timeout_s)

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        import ray

        ray.get([h.init_weight_transfer_engine.remote({**init_info, "rank_offset": r})
                 for h, r in zip(self.handles, self.rank_offsets)], timeout=self.timeout_s)

    def start_weight_update(self) -> None:
        self._all("start_weight_update")

    def update_weights(self, update_info) -> None:
        self._all("update_weights", update_info)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._all("finish_weight_update", weight_version)


def _trainer_info_base():
    from vllm.distributed.weight_transfer.base import TrainerInitInfo

    return TrainerInitInfo


@dataclass
class GlooTrainerInitInfo(_trainer_info_base()):
    backend: ClassVar[str] = GLOO
    master_address: str = "127.0.0.1"
    master_port: int = 0
    world_size: int = 2
    bucket_mb: float = 256.0
    timeout_s: float = 120.0


def _trainer_base():
    from vllm.distributed.weight_transfer import TrainerWeightTransferEngine

    return TrainerWeightTransferEngine


class GlooTrainerEngine(_trainer_base()):
    init_info_cls = GlooTrainerInitInfo

    def __init__(self, *, client, source, is_sender: bool = True, bucket_mb: float = 256.0):
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.bucket_mb = bucket_mb
        self.group = None
        self.packed: torch.Tensor | None = None  # the send buffer, reused bucket to bucket
        self.version: str | None = None  # set by the caller before send_weights

    @classmethod
    def trainer_init(cls, init_info: GlooTrainerInitInfo, *, client, source=None):
        engine = cls(client=client, source=source, is_sender=init_info.is_sender,
                     bucket_mb=init_info.bucket_mb)
        if not engine.is_sender:
            return engine
        worker_info = asdict(GlooInitInfo(init_info.master_address, init_info.master_port,
                                          1, init_info.world_size, init_info.timeout_s))
        worker_info.pop("expected_shapes")  # each engine adds its checkpoint's
        # The workers block in the rendezvous until rank 0 (us) joins: both at once.
        with ThreadPoolExecutor(max_workers=1) as exe:
            fut = exe.submit(client.init_weight_transfer_engine, worker_info)
            engine.group = _group(init_info.master_address, init_info.master_port, 0,
                                  init_info.world_size, init_info.timeout_s)
            fut.result()
        return engine

    def send_weights(self) -> None:
        t0 = time.perf_counter()
        named = list(self.source)
        if not self.is_sender:
            return
        buckets = make_buckets(named, self.bucket_mb)
        info = GlooUpdateInfo(names=[n for n, _ in named],
                              dtype_names=[str(t.dtype).removeprefix("torch.") for _, t in named],
                              shapes=[list(t.shape) for _, t in named],
                              bucket_sizes=[len(b) for b in buckets])
        self.client.start_weight_update()
        exe = ThreadPoolExecutor(max_workers=1)
        try:
            # The engines receive (update_weights) while we broadcast.
            fut = exe.submit(self.client.update_weights, asdict(info))
            t1, pack_s = time.perf_counter(), 0.0
            largest = max((_layout([t.shape for _, t in b], [t.dtype for _, t in b])[1]
                           for b in buckets), default=0)
            self.packed = _reuse(self.packed, largest)
            for b in buckets:
                tp = time.perf_counter()
                buf = pack([t for _, t in b], self.packed)
                pack_s += time.perf_counter() - tp
                _broadcast(self.group, buf)
            t2 = time.perf_counter()
            fut.result()  # a refused push raises here (WeightPushError from an engine)
        finally:
            exe.shutdown(wait=False)
        t3 = time.perf_counter()
        self.client.finish_weight_update(self.version)
        log.info("weight push sent: export %.3f s, pack %.3f s, broadcast %.3f s, engines "
                 "checked %.3f s later, loaded in %.3f s", t1 - t0, pack_s, t2 - t1 - pack_s,
                 t3 - t2, time.perf_counter() - t3)

    def shutdown(self) -> None:
        _destroy(self.group)
        self.group, self.packed = None, None
