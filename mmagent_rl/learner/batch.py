"""Trajectories -> padded tensors for the learner (token-in / token-out, no re-render).

Per-token tensors are aligned to *targets*: column j holds values for token j+1 of the
sequence, predicted by the logits at position j. Their width is therefore T-1.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mmagent_rl.trajectory import Trajectory


def mrope_positions(ids: list[int], grids: list[tuple[int, int, int]], image_token_id: int,
                    merge_size: int) -> torch.Tensor:
    """Qwen-VL 3-D rotary positions [3, len(ids)], computed the way vLLM does:
    text advances all three axes together; an image run takes (t, h, w) grid indices
    offset by the position where it starts; text after it resumes at max + 1."""
    pos = np.zeros((3, len(ids)), dtype=np.int64)
    i, nxt, img = 0, 0, 0
    n = len(ids)
    while i < n:
        if ids[i] == image_token_id:
            if img >= len(grids):
                raise ValueError(f"more image pad runs in the ids than the {len(grids)} images")
            t, h, w = grids[img]
            h, w = h // merge_size, w // merge_size
            run = t * h * w
            if ids[i:i + run].count(image_token_id) != run:
                raise ValueError(f"image {img}: expected {run} pad tokens at {i}")
            grid = np.indices((t, h, w)).reshape(3, -1) + nxt
            pos[:, i:i + run] = grid
            nxt = int(grid.max()) + 1
            i += run
            img += 1
        else:
            pos[:, i] = nxt
            nxt += 1
            i += 1
    if img != len(grids):
        raise ValueError(f"{len(grids)} images but {img} pad runs in the ids")
    return torch.from_numpy(pos)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    position_ids: torch.Tensor  # [3, B, T]
    mm_token_type_ids: torch.Tensor  # [B, T]
    pixel_values: torch.Tensor | None  # [sum patches, C*P*P*Tp]
    image_grid_thw: torch.Tensor | None  # [num images, 3]
    targets: torch.Tensor  # [B, T-1]
    loss_mask: torch.Tensor  # [B, T-1] float
    old_logprobs: torch.Tensor  # [B, T-1]
    advantages: torch.Tensor  # [B, T-1]
    # when images repeat (a group's samples share their prompt's image): the distinct
    # images' (pixel_values, image_grid_thw) and, per image slot, its distinct image, so
    # the vision tower encodes each once (policy._hidden_states); None: all distinct
    distinct_images: tuple | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.loss_mask.sum().item())


def preprocess_images(images: list, image_processor, distinct: bool = False):
    """(pixel_values, image_grid_thw) of ``images``, each distinct image object processed
    once: the n rollouts of a prompt share its image object (Ray's pickling keeps the
    sharing), so a micro-batch holding a group resizes and normalises it once.
    ``distinct``: also return (the distinct images' pixel_values and grid, the index of
    each image's distinct one), or None when every image is distinct."""
    first: dict[int, int] = {}
    index = [first.setdefault(id(im), len(first)) for im in images]
    unique = list({id(im): im for im in images}.values())
    out = image_processor(images=unique, return_tensors="pt")
    pixel_values, grid = out["pixel_values"], out["image_grid_thw"]
    if len(unique) == len(images):
        return (pixel_values, grid, None) if distinct else (pixel_values, grid)
    rows = grid.prod(dim=-1).tolist()
    starts = np.cumsum([0] + rows).tolist()
    every = torch.cat([pixel_values[starts[i]:starts[i] + rows[i]] for i in index])
    if distinct:
        return every, grid[index], (pixel_values, grid, index)
    return every, grid[index]


def collate(trajs: list[Trajectory], image_processor, image_token_id: int, pad_id: int,
            images_override: list[list] | None = None) -> Batch:
    """Pad right. ``images_override`` replaces each trajectory's images (same sizes),
    e.g. the patch-masked images of PAPO: same tokens, different pixels."""
    B = len(trajs)
    T = max(len(t.token_ids) for t in trajs)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    pos = torch.zeros((3, B, T), dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.float32)
    old = torch.zeros((B, T), dtype=torch.float32)
    adv = torch.zeros((B, T), dtype=torch.float32)
    all_images = []
    for b, t in enumerate(trajs):
        n = len(t.token_ids)
        ids[b, :n] = torch.tensor(t.token_ids)
        attn[b, :n] = 1
        mask[b, :n] = torch.tensor(t.loss_mask, dtype=torch.float32)
        old[b, :n] = torch.tensor(t.logprobs, dtype=torch.float32)
        if t.advantages is not None:
            adv[b, :n] = torch.tensor(t.advantages, dtype=torch.float32)
        all_images.extend(images_override[b] if images_override else t.images)
    pixel_values = grid = distinct = None
    grids: list = []
    if all_images:
        pixel_values, grid, distinct = preprocess_images(all_images, image_processor,
                                                         distinct=True)
        grids = [tuple(int(v) for v in g) for g in grid]
    k = 0
    merge = image_processor.merge_size
    for b, t in enumerate(trajs):
        m = len(images_override[b]) if images_override else len(t.images)
        n = len(t.token_ids)
        pos[:, b, :n] = mrope_positions(t.token_ids, grids[k:k + m], image_token_id, merge)
        k += m
    return Batch(
        input_ids=ids, attention_mask=attn, position_ids=pos,
        mm_token_type_ids=(ids == image_token_id).long() * attn,
        pixel_values=pixel_values, image_grid_thw=grid,
        targets=ids[:, 1:], loss_mask=mask[:, 1:], old_logprobs=old[:, 1:],
        advantages=adv[:, 1:], distinct_images=distinct,
    )
