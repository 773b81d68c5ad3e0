"""The zoom tool: cut a box out of the original image and enlarge it.

Output sides are multiples of 28 because the Qwen2.5-VL processor works on 28-px cells
(14-px patches merged 2x2): a crop of 112x112 becomes exactly 4x4 = 16 vision tokens
and nothing is lost to the processor's own resizing.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence

from PIL import Image

from mmagent_rl.tools.parse import ZOOM_TOOL_NAME, ParsedCall

log = logging.getLogger(__name__)

CELL = 28  # pixels per merged vision token side


class ToolError(Exception):
    """A bad request; ``str(err)`` is an "Error: ..." message shown to the model."""

    def __init__(self, message: str):
        super().__init__(message if message.startswith("Error: ") else f"Error: {message}")


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_valid_box(bbox: object, width: int, height: int) -> bool:
    """Numbers, finite, 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height.

    The "valid format" definition of evaluation: a call whose JSON parses can still
    ask for an impossible box.
    """
    if not isinstance(bbox, Sequence) or isinstance(bbox, (str, bytes)) or len(bbox) != 4:
        return False
    if not all(_is_number(v) for v in bbox):
        return False
    # Ints are always finite; float() of a huge int would overflow, so skip them.
    if any(isinstance(v, float) and not math.isfinite(v) for v in bbox):
        return False
    x1, y1, x2, y2 = bbox
    return 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height


def _round_to_cells(side: float) -> int:
    return max(CELL, int(round(side / CELL)) * CELL)


def _grow_to_min(lo: float, hi: float, min_size: float, limit: int) -> tuple[float, float]:
    """Enlarge [lo, hi] around its centre to min_size, shifted to stay in [0, limit]."""
    size = min(min_size, limit)
    if hi - lo >= size:
        return lo, hi
    centre = (lo + hi) / 2
    lo = min(max(centre - size / 2, 0.0), limit - size)
    return lo, lo + size


def zoom(
    image: Image.Image,
    bbox: Sequence[float],
    *,
    min_size: int = 28,
    out_max_side: int = 112,
) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """Crop ``bbox`` (absolute pixels of ``image``) and resize it for the model.

    Returns the RGB crop, its longer side ``out_max_side`` (rounded to a multiple of
    28) and its shorter side following the aspect ratio, both multiples of 28 and at
    least 28; and the integer box actually cut (x2, y2 exclusive, like PIL).
    """
    if min_size < 1 or out_max_side < 1:
        raise ValueError(f"min_size and out_max_side must be >= 1, got {min_size}, {out_max_side}")
    width, height = image.size
    if (not isinstance(bbox, Sequence) or len(bbox) != 4
            or not all(_is_number(v) for v in bbox)
            or any(isinstance(v, float) and not math.isfinite(v) for v in bbox)):
        raise ToolError(f"bbox_2d must be 4 finite numbers [x1, y1, x2, y2], got {bbox!r:.80}")
    try:
        x1, y1, x2, y2 = (float(v) for v in bbox)
    except OverflowError:  # an int too big for a float
        raise ToolError(f"bbox_2d coordinates are absurdly large: {bbox!r:.80}") from None
    if x2 < x1 or y2 < y1:
        raise ToolError(f"inverted box {list(bbox)}: need x1 < x2 and y1 < y2")
    if x1 == x2 or y1 == y2:
        raise ToolError(f"box {list(bbox)} has zero area")

    x1, y1 = max(x1, 0.0), max(y1, 0.0)
    x2, y2 = min(x2, float(width)), min(y2, float(height))
    if x1 >= x2 or y1 >= y2:
        raise ToolError(f"box {list(bbox)} is outside the image, whose size is "
                        f"{width}x{height} (width x height)")

    x1, x2 = _grow_to_min(x1, x2, min_size, width)
    y1, y2 = _grow_to_min(y1, y2, min_size, height)
    # Floor/ceil so the cut covers every pixel the model asked for; clamp once more
    # against float error.
    box = (max(0, math.floor(x1)), max(0, math.floor(y1)),
           min(width, math.ceil(x2)), min(height, math.ceil(y2)))

    crop = image.crop(box).convert("RGB")
    crop_w, crop_h = crop.size
    longer = _round_to_cells(out_max_side)
    if crop_w >= crop_h:
        size = (longer, _round_to_cells(longer * crop_h / crop_w))
    else:
        size = (_round_to_cells(longer * crop_w / crop_h), longer)
    return crop.resize(size, Image.Resampling.BICUBIC), box


def run_tool(
    parsed: ParsedCall, image: Image.Image, **zoom_kwargs
) -> tuple[Image.Image | None, tuple[int, int, int, int] | None, str | None]:
    """(crop, crop_box, None) on success, (None, None, "Error: ...") otherwise. Never raises."""
    if parsed.error is not None:
        return None, None, parsed.error
    if parsed.name != ZOOM_TOOL_NAME:
        return None, None, f"Error: unknown tool {parsed.name!r:.80}. Known tools: {ZOOM_TOOL_NAME}"
    if parsed.bbox is None:
        return None, None, 'Error: missing "bbox_2d" = [x1, y1, x2, y2] in pixels'
    try:
        crop, box = zoom(image, parsed.bbox, **zoom_kwargs)
    except ToolError as exc:
        return None, None, str(exc)
    except Exception as exc:  # a bug or a broken image must not kill a rollout
        log.warning("zoom failed on %r: %r", parsed.bbox, exc)
        return None, None, f"Error: the zoom tool failed ({type(exc).__name__})"
    return crop, box, None
