"""The embedded tiny CLIP (reward/clip_model.py scores with it): its training pairs,
build and held-out evaluation.

Rebuild it, deterministically (same seed -> bit-identical file; 400 steps of 128 pairs,
about 6-8 minutes on one CPU thread); the build's settings and held-out accuracies are
stored in the file's header (``eval`` prints them):

    python -m mmagent_rl.models.tiny_clip build [--out PATH] [--seed N]
    python -m mmagent_rl.models.tiny_clip eval [--checkpoint PATH]

Training pairs are zoom crops of real synthetic canvases, each labelled by what the crop
actually contains (pixel counts of the exact palette colours): the target square (boxes
jittered like an agent's imperfect box), a distractor circle, plain background with
specks, or part of the ring without the square. Several phrasings per kind, so the text
tower keys on colour and shape words rather than on one exact sentence.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mmagent_rl.data.synthetic import COLOR_RGB, SPLIT_OFFSETS, SyntheticConfig, generate_example
from mmagent_rl.reward.clip_model import (
    _META_KEY, BUILD_COMMAND, EMBEDDED_RESIZE_MODE, EMBEDDED_WEIGHTS, MODEL_NAME, ClipScorer,
    _open_clip, _quiet,
)
from mmagent_rl.tools.zoom import zoom

log = logging.getLogger(__name__)


# --- training data: labelled zoom crops of synthetic canvases -------------------------

COLORS = tuple(COLOR_RGB)
KINDS = ("target", "circle", "background", "ring_part")
# The first phrasing of each kind is the canonical one (the target's is describe_target's).
TEMPLATES = {
    "target": ("a {c} square inside a black ring", "a small {c} square inside a black ring",
               "a {c} square in a black circle", "the {c} square inside the ring",
               "a black ring around a {c} square", "a {c} square", "{c} square in a ring"),
    "circle": ("a large {c} circle", "a {c} circle", "a big {c} disc",
               "part of a large {c} circle", "a {c} circle on a white background"),
    "background": ("white background with small specks", "plain background with a few small specks",
                   "empty background", "a blank area with tiny coloured dots",
                   "nothing but background"),
    "ring_part": ("part of a black ring", "the edge of a black ring", "a curved black line"),
}
SYNONYMS = {"magenta": ("purple", "pink"), "cyan": ("turquoise",)}
_KEY = {c: (r << 16) | (g << 8) | b for c, (r, g, b) in COLOR_RGB.items()}
_PALETTE_KEYS = frozenset(_KEY.values())


def describe(kind: str, color: str | None = None) -> str:
    """Canonical description of a crop kind, e.g. describe("circle", "red")."""
    return TEMPLATES[kind][0].format(c=color)


def class_id(kind: str, color: str | None) -> int:
    """One id per (kind, colour): the positives of the multi-positive InfoNCE."""
    if kind in ("target", "circle"):
        return KINDS.index(kind) * len(COLORS) + COLORS.index(color)
    return 2 * len(COLORS) + KINDS.index(kind) - 2


@dataclass
class LabelledCrop:
    image: Image.Image
    kind: str
    color: str | None
    box: tuple[int, int, int, int]


def _inside(inner, outer) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and inner[2] <= outer[2] and inner[3] <= outer[3]


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _keys(arr: np.ndarray) -> np.ndarray:
    """RGB uint8 [..., 3] -> one int per pixel, comparable with _KEY."""
    a = arr.astype(np.int32)
    return (a[..., 0] << 16) | (a[..., 1] << 8) | a[..., 2]


def _classify(arr: np.ndarray, box, example) -> tuple[str, str | None] | None:
    """What the cut box shows, or None when it is ambiguous (then it is not used)."""
    square = example.meta["square_box"]
    if _inside(square, box):
        return "target", example.answer
    if _overlap(square, box):  # part of the square: no clean label
        return None
    sub = _keys(arr[box[1]:box[3], box[0]:box[2]])
    n = sub.size
    frac = sorted(((np.count_nonzero(sub == k) / n, c) for c, k in _KEY.items()), reverse=True)
    black = np.count_nonzero(sub == 0) / n  # only the ring is black
    if black > 0.02:
        return ("ring_part", None) if frac[0][0] < 0.05 else None
    if frac[0][0] >= 0.25 and frac[1][0] < 0.05:
        return "circle", frac[0][1]
    if sum(f for f, _ in frac) < 0.02:  # specks only
        return "background", None
    return None


def _propose(kind: str, rng: random.Random, arr: np.ndarray, example) -> tuple[float, ...] | None:
    """A candidate box for one kind, in canvas pixels."""
    size = arr.shape[0]
    rx1, ry1, rx2, ry2 = example.target_box
    ring = rx2 - rx1
    aspect = math.exp(rng.uniform(-0.35, 0.35))
    if kind == "target":  # an agent's imperfect box: scaled, stretched, off-centre
        side = ring * math.exp(rng.uniform(math.log(0.8), math.log(2.4)))
        cx = (rx1 + rx2) / 2 + rng.uniform(-0.25, 0.25) * side
        cy = (ry1 + ry2) / 2 + rng.uniform(-0.25, 0.25) * side
    elif kind == "ring_part":  # a box on the ring itself, too small to reach the square
        side = rng.uniform(0.3, 0.6) * ring
        angle = rng.uniform(0, 2 * math.pi)
        radius = ring / 2 - 5
        cx = (rx1 + rx2) / 2 + radius * math.cos(angle)
        cy = (ry1 + ry2) / 2 + radius * math.sin(angle)
    elif kind == "circle":  # around a pixel deep inside a circle (not a speck)
        for _ in range(50):
            x, y = rng.randrange(8, size - 8), rng.randrange(8, size - 8)
            probe = _keys(arr[[y, y, y, y - 8, y + 8], [x, x - 8, x + 8, x, x]])
            if probe[0] in _PALETTE_KEYS and (probe == probe[0]).all():
                break
        else:
            return None
        side = rng.uniform(60, 300)
        cx, cy = x + rng.uniform(-0.3, 0.3) * side, y + rng.uniform(-0.3, 0.3) * side
    else:
        side = rng.uniform(40, 260)
        cx, cy = rng.uniform(0, size), rng.uniform(0, size)
    w, h = side * math.sqrt(aspect), side / math.sqrt(aspect)
    box = (max(0.0, cx - w / 2), max(0.0, cy - h / 2), min(size, cx + w / 2), min(size, cy + h / 2))
    return box if box[2] - box[0] >= 8 and box[3] - box[1] >= 8 else None


def sample_crops(example, rng: random.Random, counts: dict[str, int]) -> list[LabelledCrop]:
    """Up to ``counts[kind]`` zoom crops of each kind from one canvas (fewer if the
    canvas has no clean one, e.g. no free background)."""
    arr = np.asarray(example.image)
    out = []
    for kind, n in counts.items():
        found = 0
        for _ in range(20 * n):
            if found == n:
                break
            box = _propose(kind, rng, arr, example)
            if box is None:
                continue
            crop, cut = zoom(example.image, box)  # the crop the agent would get
            label = _classify(arr, cut, example)
            if label is not None and label[0] == kind:
                out.append(LabelledCrop(crop, kind, label[1], cut))
                found += 1
    return out


def _phrase(kind: str, color: str | None, rng: random.Random) -> str:
    # Half the time the canonical sentence (the one the reward will mostly see).
    template = TEMPLATES[kind][0] if rng.random() < 0.5 else rng.choice(TEMPLATES[kind])
    if color in SYNONYMS and rng.random() < 0.15:
        color = rng.choice(SYNONYMS[color])
    return template.format(c=color)


_PER_CANVAS = {"target": 2, "circle": 2, "background": 1, "ring_part": 1}
# Training takes more crops per canvas: drawing and labelling canvases costs as much
# as the forward/backward pass otherwise.
_PER_CANVAS_TRAIN = {kind: 2 * n for kind, n in _PER_CANVAS.items()}
_EASY = SyntheticConfig(easy_fraction=1.0)  # big targets, so scale varies too


def _canvas(seed: int, index: int):
    # One canvas in six has a big ("easy") target.
    return generate_example(seed, index, _EASY if index % 6 == 5 else SyntheticConfig())


def heldout_crops(n_canvases: int, seed: int = 0) -> list[LabelledCrop]:
    """Crops of the synthetic "test" split, never seen in training."""
    rng = random.Random(seed + 7919)
    crops = []
    for i in range(n_canvases):
        crops += sample_crops(_canvas(seed, SPLIT_OFFSETS["test"] + i), rng, _PER_CANVAS)
    return crops


def pairwise_accuracy(scorer: ClipScorer, crops: list[LabelledCrop]) -> dict[str, float]:
    """How often the true description outscores a wrong one on the same crop.

    colour_swap: target crops vs each other colour's square; shape_swap: target crops
    vs "a {c} circle", and circle crops vs "a {c} square inside a black ring".
    """
    pairs: dict[str, list[tuple[int, str, str]]] = {"colour_swap": [], "shape_swap": [],
                                                    "circle_colour_swap": []}
    for i, c in enumerate(crops):
        if c.kind == "target":
            true = describe("target", c.color)
            pairs["colour_swap"] += [(i, true, describe("target", o)) for o in COLORS if o != c.color]
            pairs["shape_swap"].append((i, true, f"a {c.color} circle"))
        elif c.kind == "circle":
            true = describe("circle", c.color)
            pairs["circle_colour_swap"] += [(i, true, describe("circle", o))
                                            for o in COLORS if o != c.color]
            pairs["shape_swap"].append((i, true, describe("target", c.color)))
    result = {}
    for name, items in pairs.items():
        images = [crops[i].image for i, _, _ in items]
        good = scorer.score([t for _, t, _ in items], images)
        bad = scorer.score([w for _, _, w in items], images)
        result[name] = sum(g > b for g, b in zip(good, bad)) / max(1, len(items))
    return result


# --- the build -----------------------------------------------------------------------

def _batches(seed: int, batch_size: int, preprocess):
    """Endless fresh batches (pixels, texts, class ids) from the train split."""
    rng = random.Random(seed)
    index = 0
    pool: list[tuple[torch.Tensor, str, int]] = []
    while True:
        while len(pool) < batch_size:
            for c in sample_crops(_canvas(seed, index), rng, _PER_CANVAS_TRAIN):
                pool.append((preprocess(c.image), _phrase(c.kind, c.color, rng),
                             class_id(c.kind, c.color)))
            index += 1
        batch, pool = pool[:batch_size], pool[batch_size:]
        yield (torch.stack([b[0] for b in batch]), [b[1] for b in batch],
               torch.tensor([b[2] for b in batch]))


def build_embedded_clip(out_path: str | os.PathLike = EMBEDDED_WEIGHTS, seed: int = 0,
                        steps: int = 400, batch_size: int = 128, lr: float = 1e-3,
                        eval_canvases: int = 100) -> dict:
    """Train the tiny CLIP (symmetric multi-positive InfoNCE) and write fp16 safetensors.

    Same arguments -> bit-identical file (one thread, fixed seeds). Returns the
    metadata stored in the file's header.
    """
    from safetensors.torch import save_file

    if steps < 1 or batch_size < 2:
        raise ValueError(f"need steps >= 1 and batch_size >= 2, got {steps}, {batch_size}")
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    open_clip = _open_clip()
    with _quiet(True):  # random init is the point here
        model, _, preprocess = open_clip.create_model_and_transforms(
            MODEL_NAME, pretrained=None, image_resize_mode=EMBEDDED_RESIZE_MODE)
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-6)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / steps))))

    model.train()
    start, running = time.time(), None
    for step, (pixels, texts, ids) in zip(range(steps), _batches(seed, batch_size, preprocess)):
        image_f, text_f, scale = model(pixels, tokenizer(texts))
        logits = scale * image_f @ text_f.T
        # Several items of a batch share a class: all of them are positives.
        same = (ids[:, None] == ids[None, :]).float()
        target = same / same.sum(1, keepdim=True)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == steps - 1:
            log.info("step %d/%d loss %.4f (%.0fs)", step, steps, running, time.time() - start)

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    n_params = sum(v.numel() for v in state.values())
    meta = {"model_name": MODEL_NAME, "seed": seed, "steps": steps, "batch_size": batch_size,
            "lr": lr, "dtype": "float16", "params": n_params,
            "final_loss": round(running, 4), "rebuild": BUILD_COMMAND}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # Held-out accuracy of the fp16 weights as shipped, written into the same header.
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        tmp_file = Path(tmp) / out_path.name
        save_file(state, str(tmp_file))
        acc = pairwise_accuracy(ClipScorer("embedded", tmp_file), heldout_crops(eval_canvases, seed))
        meta["heldout"] = {k: round(v, 4) for k, v in acc.items()}
        # One header entry of sorted JSON: safetensors writes a metadata dict in hash
        # order, which differs between processes and would break bit-identical rebuilds.
        save_file(state, str(tmp_file), metadata={_META_KEY: json.dumps(meta, sort_keys=True)})
        os.chmod(tmp_file, 0o644)  # a shipped asset, not a private temp file
        os.replace(tmp_file, out_path)  # atomic: never a half-written checkpoint
    log.info("wrote %s (%d params, %.0fs): %s", out_path, n_params, time.time() - start, acc)
    return meta


def read_metadata(path: str | os.PathLike = EMBEDDED_WEIGHTS) -> dict:
    """The build's settings and held-out accuracies, from the file's header."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return json.loads((f.metadata() or {}).get(_META_KEY, "{}"))


def _benchmark(scorer: ClipScorer, crops: list[LabelledCrop], n: int = 512) -> float:
    """Pairs per second of ``score`` on groups of 64 (distinct crops, 14 texts)."""
    items = [crops[i % len(crops)] for i in range(n)]
    texts = [describe(c.kind, c.color) for c in items]
    scorer.score(texts[:8], [c.image for c in items[:8]])  # warm-up
    start = time.perf_counter()
    for i in range(0, n, 64):
        scorer.score(texts[i:i + 64], [c.image for c in items[i:i + 64]])
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mmagent_rl.models.tiny_clip")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="train the embedded CLIP and write its weights")
    b.add_argument("--out", default=str(EMBEDDED_WEIGHTS))
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--steps", type=int, default=400)
    e = sub.add_parser("eval", help="held-out pairwise accuracy and scoring speed")
    e.add_argument("--checkpoint", default=None)
    e.add_argument("--canvases", type=int, default=100)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    log.setLevel(logging.INFO)  # open_clip logs every step of model creation at INFO
    torch.set_num_threads(1)
    if args.cmd == "build":
        meta = build_embedded_clip(args.out, seed=args.seed, steps=args.steps)
        digest = hashlib.sha256(Path(args.out).read_bytes()).hexdigest()
        print(json.dumps({**meta, "sha256": digest}, indent=1))
        return
    path = Path(args.checkpoint or EMBEDDED_WEIGHTS)
    scorer = ClipScorer("embedded", args.checkpoint)
    crops = heldout_crops(args.canvases)
    report = {"file": str(path), "bytes": path.stat().st_size,
              "params": sum(p.numel() for p in scorer.model.parameters()),
              "metadata": read_metadata(path), "heldout": pairwise_accuracy(scorer, crops),
              "pairs_per_s_1_thread": round(_benchmark(scorer, crops), 1)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
