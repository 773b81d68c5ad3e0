"""SFT recipe search: teach a tiny random-weight VLM to zoom, then answer (CPU, 1 thread).

Three parts, kept apart so the winning recipe can be ported to the project's learner:

1. RECIPE: model (Qwen2.5-VL from tiny.py, or a tiny Qwen3-VL built here), tokenizer
   corpus, demo format, curriculum (stages = mixes of sample kinds with their own
   visuals and an optional skill gate), hyper-parameters. ``ladder_q3`` is the one
   that works; the others reproduce the negative results.
2. DATA + LOOP: fresh synthetic examples -> demos -> batches (HF inputs with
   mm_token_type_ids) -> masked token-mean CE, AdamW, warmup, constant LR, cosine over
   the last stage. Plain torch, one process. Teacher-forced accuracies on the key
   tokens (the colour read from an image, the box's x1/y1) are logged per sample kind;
   every training example is new, so they are held-out numbers.
3. EVAL: greedy multi-turn agent (HF ``generate`` per turn, ``zoom`` executed, the
   observation appended with ChatFormat, up to 3 turns) -> the four target metrics.

Sample kinds, all cut from the same demonstration (mmagent_rl.data.demos):
  crop      the observation (crop image) + the final turn: "read the colour"
  locate    the prompt + the tool-call turn: "find the ring, say the box"
  dialogue  the full demonstration
  (easy examples, answered without a tool, are always whole)

Usage:
  python bench/sft_recipe.py train --recipe ladder_q3 --out /tmp/sft_runs/x --max-minutes 60
  python bench/sft_recipe.py train --init /tmp/sft_runs/x/model --skip-stages 4 ...  (chain)
  python bench/sft_recipe.py eval --model /tmp/sft_runs/x/model --n 500 [--observe blank]
Logs are JSONL lines in OUT/log.jsonl (train steps, stage advances, evals).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

torch.set_num_threads(1)  # the machine is shared: one core for this process

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mmagent_rl.data.demos import DemoConfig, final_text, make_demo  # noqa: E402
from mmagent_rl.data.synthetic import (  # noqa: E402
    COLOR_RGB, SPLIT_OFFSETS, SyntheticConfig, generate_example,
)
from mmagent_rl.models import tiny  # noqa: E402
from mmagent_rl.models.tiny import TinySpec, ensure_tiny_model  # noqa: E402
from mmagent_rl.reward.task import answers_match, extract_answer, format_ok  # noqa: E402
from mmagent_rl.chat import ChatFormat  # noqa: E402
from mmagent_rl.tools.parse import find_tool_call, parse_tool_call  # noqa: E402
from mmagent_rl.tools.zoom import is_valid_box, run_tool, zoom  # noqa: E402

# =====================================================================================
# 1. RECIPE
# =====================================================================================

# The default prompt costs ~106 tokens with the tiny tokenizer; the tiny model only needs
# a constant prefix, so a short one saves ~30% of every sequence.
TINY_SYSTEM_PROMPT = "Zoom in with image_zoom_in_tool if needed. Answer as <answer>...</answer>."


@dataclass
class Stage:
    name: str
    steps: int
    # sample kind -> share of steps; each step is one batch of a single kind
    mix: dict[str, float]
    batch: dict[str, int] = field(default_factory=lambda: {
        "crop": 32, "locate": 8, "dialogue": 8})
    easy_fraction: float = 0.1  # share of large-target examples (answered without tool)
    # "crop" samples: None = the demo's crop; (lo, hi) = a box of side uniform(lo, hi)
    # times the square's side around the square (easier visuals for a curriculum)
    crop_scale: tuple[float, float] | None = None
    synthetic: dict = field(default_factory=dict)  # SyntheticConfig overrides
    # > 0: paint a filled black disc of this many ring radii over the ring (easier
    # visuals for locating: a big dark blob instead of a thin ring)
    blob: float = 0.0
    # (metric, threshold): leave the stage early once the mean of the metric over the
    # last 20 batches that report it reaches the threshold (training batches are fresh
    # examples, so this is a held-out estimate), e.g. ("locate/near_xy1", 0.8)
    advance_when: tuple[str, float] | None = None
    # blob in the target's colour instead of black, and a thinking text (format string
    # with {color}) that names it before the tool call: reading the colour makes the
    # model attend to the blob, which is what lets the blob's position flow to the box
    blob_color: bool = False
    think: str | None = None
    think_prob: float = 1.0  # share of locate samples that use ``think``


@dataclass
class Recipe:
    spec: TinySpec = field(default_factory=TinySpec)
    system_prompt: str = TINY_SYSTEM_PROMPT
    demo: DemoConfig = field(default_factory=DemoConfig)
    stages: list[Stage] = field(default_factory=list)
    lr: float = 2e-3
    min_lr_frac: float = 0.1  # cosine decays to lr * min_lr_frac
    warmup_steps: int = 100
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    seed: int = 0
    corpus_extra: bool = False  # tokenizer trained with the demo texts added (see below)
    # LM rotary: None = tiny.py's (theta 1e4, mrope [8, 12, 12] for head_dim 64). With
    # theta 1e4 the w (column) section only gets the lowest frequencies: on an 8x8 token
    # grid a column shift turns them by < 0.03 rad, so attention cannot see columns.
    rope_theta: float | None = None
    # None = Qwen2.5-VL from tiny.py; a dict = a tiny Qwen3-VL (see build_qwen3_tiny)
    qwen3: dict | None = None
    mrope_section: list[int] | None = None


CLEAN = {"n_circles": (0, 0), "n_specks": (0, 0)}  # no distractors: easier visuals
BIG = {"target_size": (140, 200)}  # the synthetic "easy" size: readable at 256 px
MID = {"target_size": (60, 100)}
# Thinking that names the square's colour before the tool call (curriculum only).
SQUARE = "The square is {color}. I zoom in on the black ring."


# ---- the recipe that works ----------------------------------------------------------

def ladder_stages(act_steps: int = 1500) -> list[Stage]:
    """Perception curriculum on the task's own target, enlarged then shrunk.

    Locating: under uniform attention the 64 image tokens pool to the same position
    features wherever the target is, so there is no gradient towards the box until the
    model *attends* to the target. A content question gives it one: the colour of a big
    square, named in the thinking before the tool call. Distractors come back while the
    target is still big (attention must become specific to the black ring, not to any
    coloured disc), then the target shrinks to its real size and the colour hint goes.
    Reading: crops of a big square first, then wider crops, then the demo's crops.
    Each perception stage lasts until its skill is there: the onset of locating varies
    from run to run. The last stage (the only one with a cosine decay) is the dialogue.
    """
    return [
        Stage("big_clean", 1000, {"crop": 0.3, "locate": 0.7}, easy_fraction=0.0,
              crop_scale=(1.0, 3.0), think=SQUARE, synthetic={**CLEAN, **BIG},
              advance_when=("locate/near_xy1", 0.6)),
        Stage("big", 800, {"crop": 0.3, "locate": 0.7}, easy_fraction=0.0,
              crop_scale=(2.0, 8.0), think=SQUARE, synthetic=BIG,
              advance_when=("locate/near_xy1", 0.6)),
        Stage("mid", 800, {"crop": 0.3, "locate": 0.7}, easy_fraction=0.0,
              think=SQUARE, think_prob=0.5, synthetic=MID,
              advance_when=("locate/near_xy1", 0.7)),
        Stage("task", 1200, {"crop": 0.2, "locate": 0.5, "dialogue": 0.3},
              advance_when=("locate/near_xy1", 0.75)),
        Stage("act", act_steps, {"crop": 0.1, "locate": 0.3, "dialogue": 0.6}),
    ]


# Tiny Qwen3-VL (absolute 2-D sin/cos position init in the vision tower), the tokenizer
# with every grid coordinate as one token, the short system prompt, coarse boxes.
LADDER = Recipe(qwen3={"pos_init": "sincos"}, corpus_extra=True, stages=ladder_stages())


# ---- exploration, kept to reproduce the negative results of the report ---------------

def _gated_black_blob(act_steps: int) -> list[Stage]:
    """Black disc over the ring (no content question): locating did not start."""
    return [
        Stage("blob", 1000, {"crop": 0.3, "locate": 0.7}, easy_fraction=0.0,
              crop_scale=(1.0, 3.0), blob=1.0, synthetic=CLEAN,
              advance_when=("locate/near_xy1", 0.6)),
        Stage("clean", 800, {"crop": 0.4, "locate": 0.6}, easy_fraction=0.0,
              crop_scale=(2.0, 8.0), synthetic=CLEAN, advance_when=("locate/near_xy1", 0.8)),
        Stage("task", 800, {"crop": 0.3, "locate": 0.5, "dialogue": 0.2},
              advance_when=("locate/near_xy1", 0.8)),
        Stage("act", act_steps, {"crop": 0.1, "locate": 0.3, "dialogue": 0.6}),
    ]


def _colour_blob(act_steps: int) -> list[Stage]:
    """A disc in the answer's colour painted over the ring, named in the thinking:
    locating started, but collapsed when the (same-coloured) distractors came back."""
    spot = "The spot is {color}. I zoom in on it."
    return [
        Stage("blob3", 1000, {"crop": 0.3, "locate": 0.7}, easy_fraction=0.0,
              crop_scale=(1.0, 3.0), blob=3.0, blob_color=True, think=spot,
              synthetic=CLEAN, advance_when=("locate/near_xy1", 0.6)),
        Stage("blob1", 800, {"crop": 0.3, "locate": 0.7}, easy_fraction=0.0,
              crop_scale=(2.0, 8.0), blob=1.0, blob_color=True, think=spot, think_prob=0.5,
              synthetic=CLEAN, advance_when=("locate/near_xy1", 0.7)),
        Stage("ring", 800, {"crop": 0.3, "locate": 0.7}, easy_fraction=0.0,
              synthetic=CLEAN, advance_when=("locate/near_xy1", 0.7)),
        Stage("task", 800, {"crop": 0.2, "locate": 0.5, "dialogue": 0.3},
              advance_when=("locate/near_xy1", 0.7)),
        Stage("act", act_steps, {"crop": 0.1, "locate": 0.3, "dialogue": 0.6}),
    ]


_Q3 = {"qwen3": {"pos_init": "sincos"}, "corpus_extra": True}
RECIPES: dict[str, Recipe] = {
    "ladder_q3": LADDER,
    # Qwen2.5-VL tiny.py defaults, the full dialogue only (like the first attempt)
    "baseline": Recipe(stages=[Stage("dialogue", 2000, {"dialogue": 1.0})]),
    # reading the demo's crops from scratch: stays at chance
    "probe_crop": Recipe(stages=[Stage("crop", 100000, {"crop": 1.0})]),
    # ... with big squares first: learnt in ~450 steps
    "crop_curriculum": Recipe(stages=[
        Stage("crop_big", 150, {"crop": 1.0}, crop_scale=(1.0, 1.6)),
        Stage("crop_mid", 300, {"crop": 1.0}, crop_scale=(1.5, 4.0)),
        Stage("crop_demo", 100000, {"crop": 1.0})]),
    # the tool call alone (full task / clean canvas): x1, y1 stay at chance
    "probe_locate": Recipe(stages=[Stage("locate", 100000, {"locate": 1.0})]),
    "locate_clean": Recipe(stages=[
        Stage("clean", 100000, {"locate": 1.0}, easy_fraction=0.0, synthetic=CLEAN)]),
    # locate on a clean canvas with a black disc that shrinks: learnt with Qwen3-VL +
    # sincos (once), not with Qwen2.5-VL (run with qwen3=null)
    "locate_blob_q3": Recipe(**_Q3, stages=[
        Stage("blob2", 150, {"locate": 1.0}, easy_fraction=0.0, blob=2.0, synthetic=CLEAN),
        Stage("blob1", 150, {"locate": 1.0}, easy_fraction=0.0, blob=1.0, synthetic=CLEAN),
        Stage("clean", 100000, {"locate": 1.0}, easy_fraction=0.0, synthetic=CLEAN)]),
    "gated_black_blob_q3": Recipe(**_Q3, stages=_gated_black_blob(1500)),
    "colour_blob_q3": Recipe(**_Q3, stages=_colour_blob(1500)),
    "smoke": Recipe(stages=[Stage("a", 10, {"crop": 1.0}), Stage("b", 10, {"locate": 1.0}),
                            Stage("c", 10, {"dialogue": 1.0})], warmup_steps=5),
}


def get_recipe(name: str, overrides: list[str]) -> Recipe:
    """A named recipe with ``key=value`` overrides (json values), e.g. lr=1e-3,
    spec.num_layers=4, demo.box_side=256, stages.0.steps=500."""
    r = dataclasses.replace(RECIPES[name])
    r.stages = [dataclasses.replace(s) for s in r.stages]
    for ov in overrides:
        key, _, raw = ov.partition("=")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        parts = key.split(".")
        if parts[0] == "stages":
            st = r.stages[int(parts[1])]
            setattr(st, parts[2], value)
        elif parts[0] in ("spec", "demo"):
            obj = getattr(r, parts[0])
            if isinstance(getattr(obj, parts[1]), tuple):
                value = tuple(value)
            setattr(r, parts[0], dataclasses.replace(obj, **{parts[1]: value}))
        else:
            if isinstance(getattr(r, key), tuple):
                value = tuple(value)
            setattr(r, key, value)
    return r


# Extra tokenizer corpus: the demo texts (so thinking / system prompt tokenize short)
# and every multiple of 32 up to 1024 as a number, with and without a leading space.
def extra_corpus(recipe: Recipe) -> list[str]:
    rng = random.Random(0)
    nums = [str(v) for v in range(0, 1025, 32)]
    colors = list(COLOR_RGB)
    lines = [recipe.system_prompt, recipe.demo.think, recipe.demo.think_easy]
    # every value once in each slot: "[v" and " v," must both become one token
    lines += ["[" + ", ".join([v] + [rng.choice(nums) for _ in range(3)]) + "]" for v in nums]
    lines += ["[" + ", ".join([rng.choice(nums), v, v, v]) + "]" for v in nums]
    lines += [f"<description>a {c} square inside a black ring</description>"
              f"<answer>{c}</answer>" for c in colors]
    return lines * 50


def build_model(recipe: Recipe, cache_dir: str = "/tmp/sft_models") -> Path:
    path = _build_base(recipe, cache_dir)
    if recipe.rope_theta is None and recipe.mrope_section is None:
        return path
    # Rotary settings do not touch the weights: a copy with a patched config.json.
    rope = (recipe.rope_theta, recipe.mrope_section)
    out = Path(f"{path}-rope-{rope[0]}-{'_'.join(map(str, rope[1] or []))}")
    if not (out / "config.json").exists():
        import shutil
        tmp = Path(str(out) + f".tmp{os.getpid()}")
        shutil.copytree(path, tmp, dirs_exist_ok=True)
        cfg = json.loads((tmp / "config.json").read_text())
        rp = cfg["text_config"]["rope_parameters"]
        if recipe.rope_theta is not None:
            rp["rope_theta"] = float(recipe.rope_theta)
        if recipe.mrope_section is not None:
            rp["mrope_section"] = list(recipe.mrope_section)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
        tmp.rename(out)
    return out


def build_qwen3_tiny(recipe: Recipe, src: Path, cache_dir: str) -> Path:
    """A tiny Qwen3-VL with the same sizes and tokenizer as ``src`` (a Qwen2.5 tiny).

    Why: Qwen3-VL's vision tower has a learned absolute position embedding and its
    LM uses interleaved mRoPE (rows and columns both get high and low frequencies);
    Qwen2.5-VL has neither, which leaves the column of the ring almost invisible.
    Patches are 16 px (cells of 32): max_pixels 256*256 keeps 8x8 = 64 tokens.
    """
    import shutil

    from transformers import (
        AutoTokenizer, GenerationConfig, Qwen3VLConfig, Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    sp = recipe.spec
    key = hashlib.sha256(json.dumps([dataclasses.asdict(sp), recipe.qwen3]).encode()
                         ).hexdigest()[:12]
    out = Path(cache_dir) / f"tiny-qwen3_vl-{key}"
    if (out / "config.json").exists():
        return out
    tok = AutoTokenizer.from_pretrained(str(src))
    q3 = recipe.qwen3
    side = q3.get("image_side", 256)
    ip = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2,
                                  min_pixels=32 * 32, max_pixels=side * side,
                                  image_mean=[0.5] * 3, image_std=[0.5] * 3)
    vp = Qwen3VLVideoProcessor(patch_size=16, merge_size=2, temporal_patch_size=2)
    proc = Qwen3VLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp,
                            chat_template=tok.chat_template)
    tmp = Path(str(out) + f".tmp{os.getpid()}")
    proc.save_pretrained(tmp)
    head_dim = sp.hidden_size // sp.num_heads
    half = head_dim // 2
    hw = q3.get("mrope_hw", (half * 5 // 16))  # [24, 20, 20] for head_dim 128
    ids = {t: tok.convert_tokens_to_ids(t) for t in tiny.SPECIAL_TOKENS}
    cfg = Qwen3VLConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=sp.hidden_size, intermediate_size=sp.intermediate_size,
            num_hidden_layers=sp.num_layers, num_attention_heads=sp.num_heads,
            num_key_value_heads=sp.num_kv_heads, head_dim=head_dim,
            max_position_embeddings=sp.max_position_embeddings, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": float(q3.get("rope_theta", 1e4)),
                             "mrope_section": [half - 2 * hw, hw, hw], "mrope_interleaved": True},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=True),
        vision_config=dict(
            depth=sp.vision_depth, hidden_size=sp.vision_hidden,
            intermediate_size=sp.vision_intermediate, num_heads=sp.vision_heads,
            out_hidden_size=sp.hidden_size, patch_size=16, spatial_merge_size=2,
            temporal_patch_size=2, num_position_embeddings=(side // 16) ** 2,
            deepstack_visual_indexes=list(q3.get("deepstack", []))),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True)
    torch.manual_seed(sp.seed)
    model = Qwen3VLForConditionalGeneration(cfg).to(torch.float32)
    if q3.get("pos_init") == "sincos":
        with torch.no_grad():
            w = model.model.visual.pos_embed.weight
            w.copy_(sincos_2d(int(w.shape[0] ** 0.5), w.shape[1]) * q3.get("pos_scale", 1.0))
    model.generation_config = GenerationConfig(eos_token_id=ids["<|im_end|>"],
                                               pad_token_id=ids["<|endoftext|>"])
    model.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def sincos_2d(side: int, dim: int) -> torch.Tensor:
    """(side*side, dim) table, row-major: half the dims encode the row, half the column,
    as sin/cos at log-spaced frequencies from 1.5 to 0.1 rad per cell (so every cell
    of a 16-cell side differs from its neighbours and the far side)."""
    q = dim // 4
    omega = torch.logspace(math.log10(1.5), math.log10(0.1), q)
    pos = torch.arange(side, dtype=torch.float32)[:, None] * omega[None]  # (side, q)
    enc = torch.cat([pos.sin(), pos.cos()], dim=1)  # (side, 2q)
    rows = enc[:, None, :].expand(side, side, 2 * q)
    cols = enc[None, :, :].expand(side, side, 2 * q)
    return torch.cat([rows, cols], dim=-1).reshape(side * side, 4 * q)


def _build_base(recipe: Recipe, cache_dir: str) -> Path:
    if recipe.corpus_extra:
        original = tiny._corpus
        extra = extra_corpus(recipe)
        tiny._corpus = lambda seed, n_lines=4000: original(seed, n_lines) + extra
        try:  # the spec key does not see the corpus: keep these in their own folder
            cache_dir = cache_dir + "_corpus"
            path = ensure_tiny_model(recipe.spec, cache_dir=cache_dir)
        finally:
            tiny._corpus = original
    else:
        path = ensure_tiny_model(recipe.spec, cache_dir=cache_dir)
    if recipe.qwen3 is not None:
        return build_qwen3_tiny(recipe, path, cache_dir)
    return path


def load_model(path: Path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(str(path), dtype=torch.float32)


# =====================================================================================
# 2. DATA + LOOP
# =====================================================================================

@dataclass
class Sample:
    ids: list[int]
    mask: list[int]
    images: list  # PIL images in sequence order
    kind: str


def cut_samples(demo, chat: ChatFormat, kind: str) -> Sample:
    ids, mask = demo.token_ids, demo.loss_mask
    if kind == "dialogue" or demo.box is None:  # easy examples: the whole (short) demo
        return Sample(ids, mask, demo.images, kind if demo.box else "easy")
    prompt_len = mask.index(1)
    close = ids.index(chat.tool_call_close_id, prompt_len)  # end of the tool-call turn
    if kind == "locate":
        return Sample(ids[:close + 1], mask[:close + 1], demo.images[:1], kind)
    if kind == "crop":  # from the observation's <|im_end|> to the end
        return Sample(ids[close + 1:], mask[close + 1:], demo.images[1:], kind)
    raise ValueError(kind)


def with_blob(ex, scale: float, fill=(0, 0, 0)):
    """A copy of the example with a filled disc centred on the ring."""
    from PIL import ImageDraw

    x1, y1, x2, y2 = ex.target_box
    cx, cy, r = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2 * scale
    image = ex.image.copy()
    ImageDraw.Draw(image).ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    return dataclasses.replace(ex, image=image)


class DataStream:
    """Fresh training examples from the synthetic generator (never repeats)."""

    def __init__(self, recipe: Recipe, chat: ChatFormat, seed: int):
        self.recipe, self.chat = recipe, chat
        self.rng = random.Random(seed)
        self.seed = seed
        self.index = 0

    def batch(self, kind: str, n: int, stage: Stage) -> list[Sample]:
        cfg = SyntheticConfig(**{**stage.synthetic, "easy_fraction":
                                 0.0 if kind == "crop" else stage.easy_fraction})
        out = []
        for _ in range(n):
            ex = generate_example(self.seed, SPLIT_OFFSETS["train"] + self.index, cfg)
            self.index += 1
            if stage.blob > 0 and kind == "locate":  # the crop would be black: locate only
                ex = with_blob(ex, stage.blob, COLOR_RGB[ex.answer] if stage.blob_color
                               else (0, 0, 0))
            demo_cfg = self.recipe.demo
            if stage.think and kind == "locate" and self.rng.random() < stage.think_prob:
                demo_cfg = dataclasses.replace(demo_cfg, think=stage.think.format(color=ex.answer))
            if kind == "crop" and stage.crop_scale:
                out.append(self.scaled_crop(ex, stage.crop_scale))
                continue
            out.append(cut_samples(make_demo(ex, self.chat, self.rng, demo_cfg, strict=False),
                                   self.chat, kind))
        return out

    def scaled_crop(self, ex, scale: tuple[float, float]) -> Sample:
        """Observation + final turn, the crop a box of scale x the square's side."""
        sx1, sy1, sx2, sy2 = ex.meta["square_box"]
        side = (sx2 - sx1) * self.rng.uniform(*scale)
        # the square stays inside the box, anywhere in it
        cx = (sx1 + sx2) / 2 + self.rng.uniform(-1, 1) * max(0, side - (sx2 - sx1)) / 2
        cy = (sy1 + sy2) / 2 + self.rng.uniform(-1, 1) * max(0, side - (sy2 - sy1)) / 2
        w, h = ex.image.size
        box = [max(0, cx - side / 2), max(0, cy - side / 2),
               min(w, cx + side / 2), min(h, cy + side / 2)]
        crop, _ = zoom(ex.image, box, out_max_side=self.recipe.demo.zoom_out_max_side)
        obs = self.chat.observation_ids(crop, None)
        final = self.chat.encode(final_text(ex)) + [self.chat.im_end_id]
        return Sample(obs + final, [0] * len(obs) + [1] * len(final), [crop], "crop")


def collate(samples: list[Sample], chat: ChatFormat) -> dict:
    n = max(len(s.ids) for s in samples)
    ids = torch.full((len(samples), n), chat.pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), n), dtype=torch.long)
    att = torch.zeros((len(samples), n), dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, :len(s.ids)] = torch.tensor(s.ids)
        mask[i, :len(s.ids)] = torch.tensor(s.mask)
        att[i, :len(s.ids)] = 1
    images = [im for s in samples for im in s.images]
    batch = {"input_ids": ids, "attention_mask": att,
             "mm_token_type_ids": (ids == chat.image_token_id).long(), "loss_mask": mask}
    if images:
        pix = chat.image_processor(images=images, return_tensors="pt")
        batch["pixel_values"] = pix["pixel_values"]
        batch["image_grid_thw"] = pix["image_grid_thw"]
    return batch


class KeyTokens:
    """Token ids of the numbers and colour names, for cheap teacher-forced accuracies."""

    def __init__(self, tok):
        vocab = tok.get_vocab()
        self.underscore = tok.convert_tokens_to_ids("_")
        self.number = torch.zeros(len(tok), dtype=torch.bool)
        self.color = torch.zeros(len(tok), dtype=torch.bool)
        self.value = torch.full((len(tok),), -10_000)  # numeric value of number tokens
        for t, i in vocab.items():
            s = tok.convert_tokens_to_string([t]).strip()
            if s.isdigit():
                self.number[i] = True
                self.value[i] = int(s)
            if s in COLOR_RGB:
                self.color[i] = True


def forward_loss(model, batch: dict, keys: KeyTokens) -> tuple[torch.Tensor, dict]:
    inputs = {k: v for k, v in batch.items() if k != "loss_mask"}
    # The LM head only on trained positions: it is ~30% of the tiny model's FLOPs.
    hidden = model.model(**inputs).last_hidden_state[:, :-1]
    m = batch["loss_mask"][:, 1:].bool()
    target = batch["input_ids"][:, 1:][m]
    logits = model.lm_head(hidden[m]).float()
    ce = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    loss = ce.mean()
    with torch.no_grad():  # accuracies of the argmax on the tokens that carry the task
        hit = logits.argmax(-1) == target
        stats = {"loss": loss.item()}
        prev = batch["input_ids"][:, :-1][m]  # the input token at each trained position
        for name, sel in (("num", keys.number[target] & (prev != keys.underscore)),
                          ("color", keys.color[target])):
            if sel.any():
                stats[f"acc_{name}"] = hit[sel].float().mean().item()
                stats[f"ce_{name}"] = ce[sel].mean().item()
        row = torch.arange(m.shape[0]).unsqueeze(1).expand_as(m)[m]
        # the first colour of a sequence is the one read from the image (description);
        # later ones (the answer) can copy it
        col = keys.color[target]
        if col.any():
            pos = torch.nonzero(col).squeeze(1)
            first = torch.full((m.shape[0],), -1, dtype=torch.long)
            first.scatter_reduce_(0, row[pos], pos, reduce="amin", include_self=False)
            first = first[first >= 0]
            stats["acc_color1"] = hit[first].float().mean().item()
        # numbers of the box: not the "2" of "bbox_2d" (the token before it is "_")
        box_num = keys.number[target] & (prev != keys.underscore)
        num_pos = torch.nonzero(box_num).squeeze(1)
        if len(num_pos):  # the first two numbers of a sequence: x1, y1 (not copyable)
            r = row[num_pos]
            rank = torch.zeros_like(r)
            for k in range(1, len(r)):
                rank[k] = rank[k - 1] + 1 if r[k] == r[k - 1] else 0
            sel = num_pos[rank < 2]
            stats["acc_xy1"] = hit[sel].float().mean().item()
            stats["acc_x1"] = hit[num_pos[rank == 0]].float().mean().item()
            stats["ce_xy1"] = ce[sel].mean().item()
            # off by at most 64 px (one coarse cell): often still contains the target
            pv, tv = keys.value[logits[sel].argmax(-1)], keys.value[target[sel]]
            stats["near_xy1"] = ((pv - tv).abs() <= 64).float().mean().item()
        # a box is right only if all its numbers are (exact grid values)
        num = box_num
        per_row = torch.zeros(m.shape[0]).index_add_(0, row, num.float())
        ok_row = torch.zeros(m.shape[0]).index_add_(0, row, (num & hit).float())
        rows = per_row >= 4
        if rows.any():
            stats["acc_box"] = (ok_row[rows] == per_row[rows]).float().mean().item()
    return loss, stats


def lr_at(step: int, stage_step: int, stage_steps: int, last_stage: bool,
          recipe: Recipe) -> float:
    """Linear warmup, constant, and a cosine decay over the last stage only (so stages
    that end early do not shift the schedule)."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    if not last_stage:
        return recipe.lr
    p = min(1.0, stage_step / max(1, stage_steps))
    lo = recipe.min_lr_frac
    return recipe.lr * (lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * p)))


def train(recipe: Recipe, out: Path, max_minutes: float, eval_every_min: float,
          eval_n: int, log_every: int = 25, init: str | None = None,
          skip_warmup: bool = False, max_steps: int = 0) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.seed)
    path = build_model(recipe)
    chat = ChatFormat.from_pretrained(str(path), system_prompt=recipe.system_prompt)
    # init: continue from a previous run's weights (same model folder layout), so a
    # long curriculum can be run as a chain of shorter jobs
    model = load_model(Path(init) if init else path)
    model.train()
    if skip_warmup:
        recipe = dataclasses.replace(recipe, warmup_steps=20)  # fresh Adam moments
    n_params = sum(p.numel() for p in model.parameters())
    keys = KeyTokens(chat.tokenizer)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=recipe.lr, betas=recipe.betas)
    stream = DataStream(recipe, chat, seed=recipe.seed)
    log = (out / "log.jsonl").open("a")
    meta = {"event": "start", "recipe": dataclasses.asdict(recipe), "model_path": str(path),
            "n_params": n_params}
    log.write(json.dumps(meta) + "\n")
    print(json.dumps(meta), flush=True)

    mix_rng = random.Random(recipe.seed + 1)
    train_time = 0.0  # seconds spent in training (eval excluded)
    data_time = 0.0
    next_eval = eval_every_min * 60
    step, examples = 0, 0
    window: dict[str, list] = {}
    stop = False
    for si, stage in enumerate(recipe.stages):
        kinds, weights = zip(*stage.mix.items())
        gate: list[float] = []
        for stage_step in range(stage.steps):
            t0 = time.perf_counter()
            kind = mix_rng.choices(kinds, weights)[0]
            samples = stream.batch(kind, stage.batch[kind], stage)
            batch = collate(samples, chat)
            t1 = time.perf_counter()
            for g in opt.param_groups:
                g["lr"] = lr_at(step, stage_step, stage.steps,
                                si == len(recipe.stages) - 1, recipe)
            loss, stats = forward_loss(model, batch, keys)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            opt.step()
            t2 = time.perf_counter()
            train_time += t2 - t0
            data_time += t1 - t0
            step += 1
            examples += len(samples)
            stats["gnorm"] = gn.item()
            for k, v in stats.items():
                window.setdefault(f"{kind}/{k}", []).append(v)
            if step % log_every == 0:
                rec = {"event": "train", "step": step, "stage": stage.name,
                       "train_min": round(train_time / 60, 2), "examples": examples,
                       "ex_per_s": round(examples / train_time, 2),
                       "data_frac": round(data_time / train_time, 3),
                       "lr": opt.param_groups[0]["lr"]}
                rec.update({k: round(sum(v) / len(v), 4) for k, v in window.items()})
                window = {}
                log.write(json.dumps(rec) + "\n")
                log.flush()
                print(json.dumps(rec), flush=True)
            if eval_every_min > 0 and train_time >= next_eval:
                next_eval += eval_every_min * 60
                _eval_and_log(model, chat, recipe, eval_n, step, train_time, log)
            # max_steps: a step-based stop, which (unlike the clock) a rebuild reproduces
            if train_time >= max_minutes * 60 or step == max_steps:
                stop = True
                break
            if stage.advance_when:
                name, threshold = stage.advance_when
                kind_of, metric = name.split("/")
                if kind == kind_of and metric in stats:
                    gate = (gate + [stats[metric]])[-20:]
                    if len(gate) == 20 and sum(gate) / 20 >= threshold:
                        rec = {"event": "advance", "step": step, "stage": stage.name,
                               "train_min": round(train_time / 60, 2), name: sum(gate) / 20}
                        log.write(json.dumps(rec) + "\n")
                        print(json.dumps(rec), flush=True)
                        break
        if stop:
            break

    model.save_pretrained(out / "model", safe_serialization=True)
    chat.tokenizer.save_pretrained(out / "model")
    chat.image_processor.save_pretrained(out / "model")
    for f in ("processor_config.json", "tiny_spec.json", "chat_template.jinja",
              "preprocessor_config.json", "video_preprocessor_config.json"):
        if (path / f).exists() and not (out / "model" / f).exists():
            (out / "model" / f).write_bytes((path / f).read_bytes())
    (out / "model" / "system_prompt.txt").write_text(recipe.system_prompt)
    (out / "model" / "demo_config.json").write_text(json.dumps(dataclasses.asdict(recipe.demo)))
    _eval_and_log(model, chat, recipe, eval_n, step, train_time, log, final=True)
    log.close()


def _eval_and_log(model, chat, recipe, n, step, train_time, log, final=False):
    if n <= 0:
        return
    t = time.perf_counter()
    model.eval()
    res = evaluate(model, chat, n=n, seed=12345, demo=recipe.demo)
    model.train()
    rec = {"event": "eval_final" if final else "eval", "step": step,
           "train_min": round(train_time / 60, 2), "eval_s": round(time.perf_counter() - t, 1),
           **{k: v for k, v in res.items() if k != "samples"}}
    log.write(json.dumps(rec) + "\n")
    log.flush()
    print(json.dumps(rec), flush=True)


# =====================================================================================
# 3. EVAL: greedy multi-turn agent
# =====================================================================================

@torch.no_grad()
def _generate(model, chat: ChatFormat, contexts: list[list[int]], images: list[list],
              max_new_tokens: int) -> list[list[int]]:
    """Greedy continuation of each context (left-padded batch), cut at the first stop."""
    n = max(len(c) for c in contexts)
    ids = torch.full((len(contexts), n), chat.pad_id, dtype=torch.long)
    att = torch.zeros_like(ids)
    for i, c in enumerate(contexts):
        ids[i, n - len(c):] = torch.tensor(c)
        att[i, n - len(c):] = 1
    flat = [im for ims in images for im in ims]
    pix = chat.image_processor(images=flat, return_tensors="pt")
    stops = [chat.im_end_id, chat.tool_call_close_id]
    out = model.generate(
        input_ids=ids, attention_mask=att, mm_token_type_ids=(ids == chat.image_token_id).long(),
        pixel_values=pix["pixel_values"], image_grid_thw=pix["image_grid_thw"],
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
        pad_token_id=chat.pad_id,
    )
    res = []
    for row in out[:, n:].tolist():
        cut = next((k + 1 for k, t in enumerate(row) if t in stops), len(row))
        res.append(row[:cut])
    return res


def _contains(outer, inner) -> bool:
    return (outer[0] <= inner[0] and outer[1] <= inner[1]
            and outer[2] >= inner[2] and outer[3] >= inner[3])


def evaluate(model, chat: ChatFormat, n: int = 200, seed: int = 12345,
             synthetic: SyntheticConfig | None = None, demo: DemoConfig | None = None,
             max_turns: int = 3, batch_size: int = 25, max_new_tokens: int = 96,
             split: str = "test", observe: str = "crop") -> dict:
    """The four target metrics on n held-out examples, greedy decoding.

    tool_rate     share of examples with at least one tool call
    valid_format  share of tool calls whose JSON parses with a valid box in the image
    box_contains  share of tool calls whose box contains the target box
    accuracy      share of examples whose final <answer> is right (chance 1/6)

    observe="blank" replaces every crop by a grey image of the same size: a control
    that shows whether the answer really comes from the crop.
    """
    synthetic = synthetic or SyntheticConfig()
    demo = demo or DemoConfig()
    exs = [generate_example(seed, SPLIT_OFFSETS[split] + i, synthetic) for i in range(n)]
    records = []
    for b in range(0, n, batch_size):
        group = exs[b:b + batch_size]
        ctx = [chat.prompt_ids(e.image, e.question) for e in group]
        imgs = [[e.image] for e in group]
        text = [""] * len(group)
        calls: list[list[dict]] = [[] for _ in group]
        live = list(range(len(group)))
        for _turn in range(max_turns):
            if not live:
                break
            outs = _generate(model, chat, [ctx[i] for i in live], [imgs[i] for i in live],
                             max_new_tokens)
            still = []
            for i, new in zip(live, outs):
                ctx[i] = ctx[i] + new
                turn_text = chat.decode(new)
                text[i] += turn_text
                if new and new[-1] == chat.tool_call_close_id:
                    raw = find_tool_call(turn_text)
                    parsed = parse_tool_call(raw if raw is not None else "")
                    w, h = group[i].image.size
                    valid = parsed.ok and is_valid_box(list(parsed.bbox), w, h)
                    calls[i].append({
                        "bbox": list(parsed.bbox) if parsed.bbox else None,
                        "valid": valid,
                        "contains": bool(valid and _contains(parsed.bbox, group[i].target_box)),
                    })
                    crop, _, err = run_tool(parsed, group[i].image,
                                            out_max_side=demo.zoom_out_max_side)
                    if crop is not None and observe == "blank":
                        crop = Image.new("RGB", crop.size, (200, 200, 200))
                    ctx[i] = ctx[i] + chat.observation_ids(crop, err)
                    if crop is not None:
                        imgs[i].append(crop)
                    still.append(i)
            live = still
        for i, e in enumerate(group):
            ans = extract_answer(text[i])
            records.append({"id": e.id, "answer": e.answer, "pred": ans,
                            "correct": answers_match(ans, e.answer), "calls": calls[i],
                            "format_ok": format_ok(text[i]), "easy": e.meta["easy"],
                            "text": text[i][-300:]})
    all_calls = [c for r in records for c in r["calls"]]
    first_calls = [r["calls"][0] for r in records if r["calls"]]
    preds = [r["pred"] for r in records]
    return {
        "n": n,
        "tool_rate": sum(bool(r["calls"]) for r in records) / n,
        "valid_format": sum(c["valid"] for c in all_calls) / max(1, len(all_calls)),
        "box_contains": sum(c["contains"] for c in all_calls) / max(1, len(all_calls)),
        "box_contains_first": sum(c["contains"] for c in first_calls) / max(1, len(first_calls)),
        "accuracy": sum(r["correct"] for r in records) / n,
        # accuracy when the (first) box contained the target / when it did not
        "acc_if_contains": _ratio([r["correct"] for r in records
                                   if r["calls"] and r["calls"][0]["contains"]]),
        "acc_if_missed": _ratio([r["correct"] for r in records
                                 if r["calls"] and not r["calls"][0]["contains"]]),
        "answer_format_ok": sum(r["format_ok"] for r in records) / n,
        "calls_per_example": len(all_calls) / n,
        "distinct_answers": len(set(p for p in preds if p)),
        "distinct_boxes": len(set(tuple(c["bbox"]) for c in all_calls if c["bbox"])),
        "samples": records,
    }


def _ratio(xs: list) -> float | None:
    return round(sum(xs) / len(xs), 3) if xs else None


# =====================================================================================

def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--recipe", default="ladder_q3")
    t.add_argument("--out", required=True)
    t.add_argument("--max-minutes", type=float, default=20.0)
    t.add_argument("--eval-every-min", type=float, default=5.0)
    t.add_argument("--eval-n", type=int, default=100)
    t.add_argument("--log-every", type=int, default=25)
    t.add_argument("--init", default=None, help="start from this saved model folder")
    t.add_argument("--skip-stages", type=int, default=0, help="drop the first N stages")
    t.add_argument("--max-steps", type=int, default=0, help="stop after N steps (0: no cap)")
    t.add_argument("overrides", nargs="*", help="key=value, e.g. lr=1e-3 spec.num_layers=4")
    e = sub.add_parser("eval")
    e.add_argument("--model", required=True)
    e.add_argument("--n", type=int, default=200)
    e.add_argument("--seed", type=int, default=12345)
    e.add_argument("--easy-fraction", type=float, default=0.0)
    e.add_argument("--dump", default="")
    e.add_argument("--observe", default="crop", choices=["crop", "blank"])
    args = ap.parse_args()

    if args.cmd == "train":
        recipe = get_recipe(args.recipe, args.overrides)
        recipe.stages = recipe.stages[args.skip_stages:]
        train(recipe, Path(args.out), args.max_minutes, args.eval_every_min, args.eval_n,
              args.log_every, init=args.init, skip_warmup=bool(args.init),
              max_steps=args.max_steps)
    else:
        p = Path(args.model)
        sp = (p / "system_prompt.txt").read_text() if (p / "system_prompt.txt").exists() \
            else None
        demo = DemoConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in
                             json.loads((p / "demo_config.json").read_text()).items()}) \
            if (p / "demo_config.json").exists() else None
        chat = ChatFormat.from_pretrained(str(p), system_prompt=sp)
        model = load_model(p)
        model.eval()
        t0 = time.perf_counter()
        res = evaluate(model, chat, n=args.n, seed=args.seed, demo=demo,
                       synthetic=SyntheticConfig(easy_fraction=args.easy_fraction),
                       observe=args.observe)
        samples = res.pop("samples")
        res["eval_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(res))
        if args.dump:
            Path(args.dump).write_text("\n".join(json.dumps(s) for s in samples))


if __name__ == "__main__":
    main()
