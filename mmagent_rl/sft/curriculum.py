"""SFT data: demonstrations (a jsonl file, or generated whole) and the perception
curriculum that cold-starts the embedded agent (``sft.stages``).

A curriculum step trains one batch of one *sample kind*, all cut from a synthetic
demonstration (mmagent_rl/data/demos.py):

  crop      the observation (the crop) and the final turn: read the colour
  locate    the prompt and the tool-call turn: find the ring, say the box
  dialogue  the whole demonstration
  (an easy example, answered without a tool, is always whole)

A stage can make the visuals easier: a filled disc over the ring (``blob``), crops of
a chosen scale around the square (``crop_scale``), a thinking text that names the
square's colour before the tool call (``think``), task overrides (``synthetic``).
Every batch is a pure function of (seed, step, stage), so a batch prepared ahead for
the current stage and dropped because a gate opened leaves no trace: runs repeat.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import random

from mmagent_rl.chat import ChatFormat
from mmagent_rl.config import SFTStage
from mmagent_rl.data.demos import demo_from_row, final_text, make_demo
from mmagent_rl.data.synthetic import (
    COLOR_RGB, SPLIT_OFFSETS, SyntheticConfig, SyntheticDataset, generate_example,
)
from mmagent_rl.tools.zoom import zoom
from mmagent_rl.trajectory import Trajectory

log = logging.getLogger(__name__)
KINDS = ("crop", "locate", "dialogue")
STRIDE = 1 << 16  # example indices of step s: s * STRIDE + i (a batch never repeats)


def sample_trajectory(ids: list[int], mask: list[int], images: list,
                      name: str) -> Trajectory:
    n = len(ids)
    return Trajectory(prompt_id=name, sample_idx=0, token_ids=list(ids),
                      loss_mask=list(mask), logprobs=[0.0] * n, images=list(images),
                      prompt_len=mask.index(1) if 1 in mask else n)


class DemoSource:
    """Plain SFT: batches of whole demonstrations, from a jsonl file (cycled; a bad row
    is skipped and counted) or generated from the synthetic task."""

    def __init__(self, cfg, chat: ChatFormat):
        self.cfg, self.chat = cfg, chat
        self.rows, self.skipped = None, 0
        if cfg.sft.data_path:
            self.rows = []
            with open(cfg.sft.data_path, encoding="utf-8") as f:
                for line in f:
                    try:
                        self.rows.append(demo_from_row(json.loads(line), chat))
                    except Exception as e:  # noqa: BLE001 - any bad row: counted skip
                        self.skipped += 1
                        log.warning("sft: skipped a demonstration row: %s", e)
            if not self.rows:
                raise ValueError(f"no usable demonstration in {cfg.sft.data_path} "
                                 f"({self.skipped} bad rows)")
        else:
            self.data = SyntheticDataset(cfg.data.synthetic, seed=cfg.data.seed,
                                         size=cfg.data.train_size, split="train")

    def batch(self, step: int, size: int) -> list[Trajectory]:
        out = []
        for i in range(size):
            j = step * size + i
            if self.rows is not None:
                demo = self.rows[j % len(self.rows)]
            else:
                rng = random.Random(f"{self.cfg.sft.seed}-{j}")
                demo = make_demo(self.data[j % len(self.data)], self.chat, rng,
                                 self.cfg.sft.demo)
            out.append(sample_trajectory(demo.token_ids, demo.loss_mask, demo.images,
                                         f"demo-{j}"))
        return out


class Curriculum:
    """Batches of the stages' sample kinds, from fresh synthetic training examples."""

    def __init__(self, cfg, chat: ChatFormat):
        self.cfg, self.chat, self.seed = cfg, chat, cfg.sft.seed
        self.skipped = 0
        if cfg.sft.steps * STRIDE > SPLIT_OFFSETS["val"]:  # keep off the held-out splits
            raise ValueError(f"sft.steps={cfg.sft.steps}: a curriculum draws its examples "
                             f"from the train split, at most "
                             f"{SPLIT_OFFSETS['val'] // STRIDE} steps")
        for st in cfg.sft.stages:
            bad = [k for k in st.mix if k not in KINDS]
            if bad or not st.mix:
                raise ValueError(f"sft.stages[{st.name}].mix: unknown kinds {bad}; "
                                 f"valid: {list(KINDS)}")
            missing = [k for k in st.mix if k not in st.batch]
            if missing:
                raise ValueError(f"sft.stages[{st.name}].batch has no size for {missing}")
            if max(st.batch.values()) > STRIDE:
                raise ValueError(f"sft.stages[{st.name}].batch: at most {STRIDE} a step")

    def kind_at(self, step: int, stage: SFTStage) -> str:
        kinds, weights = zip(*stage.mix.items())
        return random.Random(f"{self.seed}-kind-{step}").choices(kinds, weights)[0]

    def batch(self, step: int, stage: SFTStage) -> tuple[str, list[Trajectory]]:
        kind = self.kind_at(step, stage)
        rng = random.Random(f"{self.seed}-data-{step}")
        task = SyntheticConfig(**{**dataclasses.asdict(SyntheticConfig()), **stage.synthetic,
                                  "easy_fraction": 0.0 if kind == "crop"
                                  else stage.easy_fraction})
        out = []
        for i in range(stage.batch[kind]):
            ex = generate_example(self.seed, SPLIT_OFFSETS["train"] + step * STRIDE + i, task)
            name = f"sft-{step}-{i}"
            if kind == "crop" and stage.crop_scale:
                out.append(self._scaled_crop(ex, stage.crop_scale, rng, name))
                continue
            if stage.blob > 0 and kind == "locate":  # the crop would show the disc
                ex = with_disc(ex, stage.blob, COLOR_RGB[ex.answer] if stage.blob_color
                               else (0, 0, 0))
            demo_cfg = self.cfg.sft.demo
            if stage.think and kind == "locate" and rng.random() < stage.think_prob:
                demo_cfg = dataclasses.replace(demo_cfg,
                                               think=stage.think.format(color=ex.answer))
            demo = make_demo(ex, self.chat, rng, demo_cfg, strict=False)
            out.append(self._cut(demo, kind, name))
        return kind, out

    def _cut(self, demo, kind: str, name: str) -> Trajectory:
        ids, mask = demo.token_ids, demo.loss_mask
        if kind == "dialogue" or demo.box is None:  # easy examples: the whole (short) demo
            return sample_trajectory(ids, mask, demo.images, name)
        close = ids.index(self.chat.tool_call_close_id, mask.index(1))  # end of the call
        if kind == "locate":
            return sample_trajectory(ids[:close + 1], mask[:close + 1], demo.images[:1],
                                     name)
        # crop: from the observation's <|im_end|> to the end
        return sample_trajectory(ids[close + 1:], mask[close + 1:], demo.images[1:], name)

    def _scaled_crop(self, ex, scale: list[float], rng: random.Random,
                     name: str) -> Trajectory:
        """Observation + final turn, the crop a box of ``scale`` x the square's side with
        the square anywhere inside it."""
        sx1, sy1, sx2, sy2 = ex.meta["square_box"]
        side = (sx2 - sx1) * rng.uniform(*scale)
        cx = (sx1 + sx2) / 2 + rng.uniform(-1, 1) * max(0, side - (sx2 - sx1)) / 2
        cy = (sy1 + sy2) / 2 + rng.uniform(-1, 1) * max(0, side - (sy2 - sy1)) / 2
        w, h = ex.image.size
        box = [max(0, cx - side / 2), max(0, cy - side / 2),
               min(w, cx + side / 2), min(h, cy + side / 2)]
        crop, _ = zoom(ex.image, box, out_max_side=self.cfg.sft.demo.zoom_out_max_side)
        obs = self.chat.observation_ids(crop, None)
        final = self.chat.encode(final_text(ex)) + [self.chat.im_end_id]
        return sample_trajectory(obs + final, [0] * len(obs) + [1] * len(final), [crop],
                                 name)


def with_disc(ex, scale: float, fill=(0, 0, 0)):
    """A copy of the example with a filled disc of ``scale`` ring radii on the ring."""
    from PIL import ImageDraw

    x1, y1, x2, y2 = ex.target_box
    cx, cy, r = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2 * scale
    image = ex.image.copy()
    ImageDraw.Draw(image).ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    return dataclasses.replace(ex, image=image)
