"""Tiny random-weight Qwen-VL models built locally: no hub, same seed -> same files.

``build_tiny_model(out_dir)`` writes a folder that ``AutoProcessor``, the HF model class
and vLLM all load: a byte-level BPE tokenizer trained on local text (the synthetic task's
vocabulary), the Qwen-VL special tokens plus ``<tool_call>``/``</tool_call>``, a chat
template, a processor with small ``max_pixels``, and random weights from a small config.
``ensure_tiny_model()`` builds it once into a cache folder keyed by the spec and reuses
it afterwards (the build is atomic: a half-built folder is never used).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
]
BUILDER_VERSION = 1  # bump when the recipe changes so caches rebuild

# Qwen-style template; an image item renders as one <|image_pad|> that the processor
# expands. Agent rollouts build token ids directly (token-in / token-out) and only use
# this for the first prompt and for people inspecting the model.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    family: str = "qwen2_5_vl"
    seed: int = 0
    vocab_size: int = 2048
    hidden_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 512
    vision_depth: int = 2
    vision_hidden: int = 128
    vision_heads: int = 4
    vision_intermediate: int = 256
    min_pixels: int = 28 * 28
    max_pixels: int = 224 * 224  # 1024-px canvas -> 224 px -> 64 merged tokens
    max_position_embeddings: int = 4096
    # "agent": the embedded agent's base (models/embedded.py, qwen3_vl only): one token
    # per grid coordinate and for the agent's fixed texts, 256-px images scaled to
    # [-1, 1], a sin/cos 2-D init of the vision position table, no deepstack.
    variant: str = "plain"

    def key(self) -> str:
        fields = asdict(self)
        if self.variant == "plain":  # the keys of the models built before variants
            del fields["variant"]
        blob = json.dumps({"v": BUILDER_VERSION, **fields}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    root = os.environ.get("MMAGENT_RL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "mmagent_rl"
    )
    return Path(root)


def _corpus(seed: int, n_lines: int = 4000) -> list[str]:
    """Local text for the tokenizer: the words, numbers and JSON the agent will write."""
    rng = random.Random(seed)
    colors = ["red", "green", "blue", "yellow", "magenta", "cyan", "black", "white"]
    words = (
        "the a small square inside black ring what is colour color of answer with one word "
        "i need to zoom in on region look closer at image see it shows there target find "
        "left right top bottom corner center circle speck shape letter description crop "
        "think first then call tool because too tiny read clearly error box outside"
    ).split()
    lines = []
    for _ in range(n_lines):
        b = sorted(rng.sample(range(0, 1024), 2)) + sorted(rng.sample(range(0, 1024), 2))
        c = rng.choice(colors)
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(4, 14))))
        lines.append(
            '{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": '
            f'[{b[0]}, {b[2]}, {b[1]}, {b[3]}], "label": "a {c} square inside a black ring"}}}}'
        )
        lines.append(f"<answer>{c}</answer> <description>a {c} square</description>")
        lines.append("<tool_response>Error: the box is outside the image</tool_response>")
    return lines


def _agent_corpus() -> list[str]:
    """The agent's own texts, so that each becomes few tokens: every multiple of 32 up to
    1024 in each slot of a box ("[v" and " v," one token each), the short system prompt,
    the demonstrations' thinking, the description and answer of every colour."""
    from mmagent_rl.data.demos import DemoConfig
    from mmagent_rl.data.synthetic import COLOR_RGB
    from mmagent_rl.models.embedded import SYSTEM_PROMPT

    rng, demo = random.Random(0), DemoConfig()
    nums = [str(v) for v in range(0, 1025, 32)]
    lines = [SYSTEM_PROMPT, demo.think, demo.think_easy]
    lines += ["[" + ", ".join([v] + [rng.choice(nums) for _ in range(3)]) + "]" for v in nums]
    lines += ["[" + ", ".join([rng.choice(nums), v, v, v]) + "]" for v in nums]
    lines += [f"<description>a {c} square inside a black ring</description>"
              f"<answer>{c}</answer>" for c in COLOR_RGB]
    return lines * 50


def sincos_2d(side: int, dim: int):
    """(side*side, dim) position table, row-major: half the dims encode the row, half the
    column, as sin/cos at log-spaced frequencies from 1.5 to 0.1 rad per cell (every cell
    differs from its neighbours and from the far side)."""
    import math

    import torch

    q = dim // 4
    omega = torch.logspace(math.log10(1.5), math.log10(0.1), q)
    pos = torch.arange(side, dtype=torch.float32)[:, None] * omega[None]
    enc = torch.cat([pos.sin(), pos.cos()], dim=1)
    rows = enc[:, None, :].expand(side, side, 2 * q)
    cols = enc[None, :, :].expand(side, side, 2 * q)
    return torch.cat([rows, cols], dim=-1).reshape(side * side, 4 * q)


def _build_tokenizer(spec: TinySpec):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = _corpus(spec.seed) + (_agent_corpus() if spec.variant == "agent" else [])
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token=None, additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _build_config(spec: TinySpec, tok):
    from transformers import Qwen2_5_VLConfig

    head_dim = spec.hidden_size // spec.num_heads
    quarter = head_dim // 2 // 4  # mrope_section must sum to head_dim / 2
    mrope = [head_dim // 2 - 2 * quarter * 3 // 2, quarter * 3 // 2, quarter * 3 // 2]
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(
        vocab_size=len(tok), hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "mrope_section": mrope},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=True,
    )
    vision = dict(
        depth=spec.vision_depth, hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate, num_heads=spec.vision_heads,
        out_hidden_size=spec.hidden_size, patch_size=14, spatial_merge_size=2,
        temporal_patch_size=2, window_size=112,
        fullatt_block_indexes=list(range(spec.vision_depth)),
    )
    cfg = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True,
    )
    cfg.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    return cfg


def _build_qwen3_config(spec: TinySpec, tok):
    from transformers import Qwen3VLConfig

    head_dim = spec.hidden_size // spec.num_heads
    half = head_dim // 2  # interleaved mrope; Qwen3-VL's [24, 20, 20] scaled to half
    h = w = (half * 5 // 16)
    mrope = [half - h - w, h, w]
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(
        vocab_size=len(tok), hidden_size=spec.hidden_size, head_dim=head_dim,
        intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "mrope_section": mrope, "mrope_interleaved": True},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=True,
    )
    vision = dict(
        depth=spec.vision_depth, hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate, num_heads=spec.vision_heads,
        out_hidden_size=spec.hidden_size, patch_size=16, spatial_merge_size=2,
        temporal_patch_size=2, num_position_embeddings=256,
        deepstack_visual_indexes=[] if spec.variant == "agent" else [spec.vision_depth - 1],
    )
    cfg = Qwen3VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True,
    )
    cfg.architectures = ["Qwen3VLForConditionalGeneration"]
    return cfg


def build_tiny_model(out_dir: str | os.PathLike, spec: TinySpec = TinySpec()) -> Path:
    """Write the model folder (tokenizer, processor, config, random weights)."""
    import torch
    from transformers import (
        GenerationConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import (
        Qwen2VLVideoProcessor,
    )

    families = ("qwen2_5_vl", "qwen3_vl")
    if spec.family not in families:
        raise ValueError(f"unknown tiny family {spec.family!r}; valid: {list(families)}")
    if spec.variant not in ("plain", "agent") or (
            spec.variant == "agent" and spec.family != "qwen3_vl"):
        raise ValueError(f"tiny variant {spec.variant!r}: valid are plain, and agent "
                         "(qwen3_vl only)")
    qwen3 = spec.family == "qwen3_vl"
    agent = spec.variant == "agent"
    patch = 16 if qwen3 else 14
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = _build_tokenizer(spec)
    pixels = dict(min_pixels=spec.min_pixels, max_pixels=spec.max_pixels, patch_size=patch)
    if agent:  # 256 px (8 x 8 merged tokens), pixels scaled to [-1, 1]
        pixels.update(min_pixels=32 * 32, max_pixels=256 * 256)
    image_proc = Qwen2VLImageProcessorPil(
        **pixels, **(dict(image_mean=[0.5] * 3, image_std=[0.5] * 3) if agent else {}))
    if qwen3:
        from transformers import Qwen3VLForConditionalGeneration, Qwen3VLProcessor
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import (
            Qwen3VLVideoProcessor,
        )

        proc = Qwen3VLProcessor(image_processor=image_proc, tokenizer=tok,
                                video_processor=Qwen3VLVideoProcessor(patch_size=patch),
                                chat_template=CHAT_TEMPLATE)
        cfg, model_cls = _build_qwen3_config(spec, tok), Qwen3VLForConditionalGeneration
    else:
        proc = Qwen2_5_VLProcessor(image_processor=image_proc, tokenizer=tok,
                                   video_processor=Qwen2VLVideoProcessor(**pixels),
                                   chat_template=CHAT_TEMPLATE)
        cfg, model_cls = _build_config(spec, tok), Qwen2_5_VLForConditionalGeneration
    proc.save_pretrained(out)
    torch.manual_seed(spec.seed)
    model = model_cls(cfg).to(torch.float32)
    if agent:
        with torch.no_grad():
            w = model.model.visual.pos_embed.weight
            w.copy_(sincos_2d(int(w.shape[0] ** 0.5), w.shape[1]))
    model.generation_config = GenerationConfig(
        eos_token_id=cfg.text_config.eos_token_id, pad_token_id=cfg.text_config.pad_token_id
    )
    model.save_pretrained(out, safe_serialization=True)
    (out / "tiny_spec.json").write_text(json.dumps(asdict(spec), indent=1))
    return out


def ensure_tiny_model(spec: TinySpec = TinySpec(), cache_dir: str | None = None) -> Path:
    """Path of the cached tiny model, building it on first use (atomic rename)."""
    root = Path(cache_dir) if cache_dir else default_cache_dir() / "models"
    final = root / f"tiny-{spec.family}-{spec.key()}"
    if (final / "config.json").exists() and (final / "model.safetensors").exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        build_tiny_model(tmp, spec)
        try:
            tmp.rename(final)
        except OSError:  # another process won the race: use theirs
            if not (final / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


if __name__ == "__main__":
    print(ensure_tiny_model())
