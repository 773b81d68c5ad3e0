"""How well the embedded CLIP tells the square's colour on zoom crops of the target.

    .venv/bin/python scripts/clip_colour_check.py --target-size 8 12 --n 120

Each held-out example's ring box is cut as the zoom tool cuts it (112-px output, as the
agent loop asks), and scored against "a <colour> square inside a black ring" for every
palette colour. Prints top-1 accuracy among the colours and pairwise accuracy (true
description above one random other colour), then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import random

import torch

from mmagent_rl.data.synthetic import COLOR_RGB, SyntheticConfig, SyntheticDataset
from mmagent_rl.reward.clip_model import ClipScorer
from mmagent_rl.tools.zoom import zoom


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target-size", type=int, nargs=2, default=[8, 12])
    ap.add_argument("--n", type=int, default=120)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(1)
    ds = SyntheticDataset(SyntheticConfig(target_size=tuple(a.target_size)), a.seed, a.n, "test")
    clip, rng, colours = ClipScorer("embedded"), random.Random(a.seed), list(COLOR_RGB)
    top1 = pairwise = 0
    for ex in ds:
        crop, _ = zoom(ex.image, ex.target_box, out_max_side=112)
        s = clip.score([f"a {c} square inside a black ring" for c in colours], [crop] * len(colours))
        true = colours.index(ex.answer)
        other = rng.choice([i for i in range(len(colours)) if i != true])
        top1 += max(range(len(colours)), key=s.__getitem__) == true
        pairwise += s[true] > s[other]
    out = {"target_size": a.target_size, "n": a.n, "top1": top1 / a.n, "pairwise": pairwise / a.n}
    print(f"target {a.target_size} px, {a.n} crops: top-1 {out['top1']:.3f} among "
          f"{len(colours)} colours, pairwise {out['pairwise']:.3f}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
