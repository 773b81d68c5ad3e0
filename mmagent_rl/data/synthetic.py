"""The embedded task, "find the small thing".

A large canvas holds big distractor circles and tiny specks in the palette colours,
plus one small square inside a thick black ring. The ring is visible at the model's
input resolution (~224 px), so the model can LOCATE the target; the square is then
4-7 px, under a tenth of one 28-px vision-token cell, so its colour is a faint signal
mixed into one token. A 112-px zoom of the ring's box shows it clearly, 29-38 px
wide. The answer is the square's colour name. Every example is a pure function of
(seed, index) and the config.
"""
from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from mmagent_rl.example import Example

QUESTION = "What is the colour of the small square inside the black ring? Answer with one word."

COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 20),
    "green": (20, 160, 40),
    "blue": (30, 60, 230),
    "yellow": (240, 210, 0),
    "magenta": (220, 30, 220),
    "cyan": (0, 200, 220),
}
RING_RGB = (0, 0, 0)
_CLEARANCE = 4  # px kept free around the ring's box, so no distractor touches it

# Index offsets give each split its own (seed, index) stream, hence disjoint examples
# for any split size below the offset.
SPLIT_OFFSETS = {"train": 0, "val": 1_000_000_000, "test": 2_000_000_000}


@dataclass
class SyntheticConfig:
    canvas_size: int = 1024
    target_size: tuple[int, int] = (20, 32)  # side of the square, inclusive range
    ring_width: int = 10
    ring_margin: int = 14  # gap between the square's corners and the ring's inner edge
    n_circles: tuple[int, int] = (6, 12)
    circle_radius: tuple[int, int] = (40, 110)
    n_specks: tuple[int, int] = (40, 80)
    easy_fraction: float = 0.0
    easy_target_size: tuple[int, int] = (140, 200)  # readable at low resolution
    colors: tuple[str, ...] = ("red", "green", "blue", "yellow", "magenta", "cyan")

    def __post_init__(self) -> None:
        unknown = [c for c in self.colors if c not in COLOR_RGB]
        if unknown or not self.colors:
            raise ValueError(f"colors must be a non-empty subset of {sorted(COLOR_RGB)}, "
                             f"got unknown {unknown}")
        if not 0.0 <= self.easy_fraction <= 1.0:
            raise ValueError(f"easy_fraction must be in [0, 1], got {self.easy_fraction}")
        biggest = max(self.target_size[1], self.easy_target_size[1] if self.easy_fraction else 0)
        if 2 * self._ring_radius(biggest) + 2 * _CLEARANCE > self.canvas_size:
            raise ValueError(
                f"canvas_size {self.canvas_size} too small for a target of {biggest} px")

    def _ring_radius(self, square_side: int) -> int:
        """Outer radius of the ring around a square of the given side."""
        half_diagonal = math.ceil(square_side * math.sqrt(2) / 2)
        return half_diagonal + self.ring_margin + self.ring_width


def _rng(seed: int, index: int) -> random.Random:
    # sha256, not hash(): Python salts str hashes per process.
    digest = hashlib.sha256(f"mmagent-synthetic:{seed}:{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _circle_clear_of_box(cx: int, cy: int, r: int, box: tuple[int, int, int, int]) -> bool:
    x1, y1, x2, y2 = box
    dx = max(x1 - cx, 0, cx - x2)
    dy = max(y1 - cy, 0, cy - y2)
    return dx * dx + dy * dy > (r + _CLEARANCE) ** 2


def generate_example(seed: int, index: int, cfg: SyntheticConfig) -> Example:
    rng = _rng(seed, index)
    size = cfg.canvas_size
    grey = rng.choice([255, rng.randint(225, 245)])  # white or light grey
    background = (grey, grey, grey)
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)

    easy = rng.random() < cfg.easy_fraction
    side = rng.randint(*(cfg.easy_target_size if easy else cfg.target_size))
    radius = cfg._ring_radius(side)
    cx = rng.randint(radius + _CLEARANCE, size - radius - _CLEARANCE)
    cy = rng.randint(radius + _CLEARANCE, size - radius - _CLEARANCE)
    ring_box = (cx - radius, cy - radius, cx + radius, cy + radius)  # x2, y2 exclusive
    keep_out = (ring_box[0] - _CLEARANCE, ring_box[1] - _CLEARANCE,
                ring_box[2] + _CLEARANCE, ring_box[3] + _CLEARANCE)
    color = rng.choice(cfg.colors)

    # Distractors first, never overlapping the ring's box; rejection sampling with a
    # bounded number of tries (a circle that does not fit is simply left out).
    for _ in range(rng.randint(*cfg.n_circles)):
        r = rng.randint(*cfg.circle_radius)
        fill = COLOR_RGB[rng.choice(cfg.colors)]
        for _try in range(30):
            x, y = rng.randint(0, size - 1), rng.randint(0, size - 1)
            if _circle_clear_of_box(x, y, r, ring_box):
                draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
                break
    for _ in range(rng.randint(*cfg.n_specks)):
        k = rng.randint(2, 4)
        fill = COLOR_RGB[rng.choice(cfg.colors)]
        for _try in range(30):
            x, y = rng.randint(0, size - k), rng.randint(0, size - k)
            if x + k <= keep_out[0] or x >= keep_out[2] or y + k <= keep_out[1] or y >= keep_out[3]:
                draw.rectangle([x, y, x + k - 1, y + k - 1], fill=fill)
                break

    # ImageDraw boxes are inclusive, hence the -1 on the far edges.
    draw.ellipse([ring_box[0], ring_box[1], ring_box[2] - 1, ring_box[3] - 1],
                 outline=RING_RGB, width=cfg.ring_width)
    sx, sy = cx - side // 2, cy - side // 2
    square_box = (sx, sy, sx + side, sy + side)
    draw.rectangle([sx, sy, sx + side - 1, sy + side - 1], fill=COLOR_RGB[color])

    return Example(
        id=f"syn-{seed}-{index}",
        image=image,
        question=QUESTION,
        answer=color,
        target_box=ring_box,
        meta={"easy": easy, "color": color, "square_box": square_box,
              "background": background, "seed": seed, "index": index},
    )


def describe_target(example: Example) -> str:
    """What a zoom on the target shows, e.g. "a red square inside a black ring"."""
    return f"a {example.meta.get('color', example.answer)} square inside a black ring"


class SyntheticDataset:
    """``size`` examples of one split, generated on demand (nothing is cached)."""

    def __init__(self, cfg: SyntheticConfig, seed: int, size: int, split: str = "train"):
        if split not in SPLIT_OFFSETS:
            raise ValueError(f"split must be one of {sorted(SPLIT_OFFSETS)}, got {split!r}")
        if not 0 <= size <= 1_000_000_000:
            raise ValueError(f"size must be in [0, 1e9], got {size}")
        self.cfg, self.seed, self.size, self.split = cfg, seed, size, split
        self._offset = SPLIT_OFFSETS[split]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> Example:
        if i < 0:
            i += self.size
        if not 0 <= i < self.size:
            raise IndexError(f"index {i} out of range for {self.size} examples")
        return generate_example(self.seed, self._offset + i, self.cfg)

    def __iter__(self):
        return (self[i] for i in range(self.size))
