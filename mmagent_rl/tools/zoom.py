"""The zoom tool: cut a box out of the original image and enlarge it.

``image_zoom_in_tool`` is the tool as the agent calls it (mmagent_rl/tools/base.py's
interface, the default of ``rollout.tools``); :func:`zoom` is the operation itself, which
demonstrations and the eval also use. Its settings are the rollout's
``rollout.agent.zoom_min_size`` and ``rollout.agent.zoom_out_max_side``.

Output sides are multiples of 28 because the Qwen2.5-VL processor works on 28-px cells
(14-px patches merged 2x2): a crop of 112x112 becomes exactly 4x4 = 16 vision tokens
and nothing is lost to the processor's own resizing.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence

from PIL import Image

from mmagent_rl.tools.base import Tool, ToolContext, ToolError, ToolResult
from mmagent_rl.tools.parse import (
    _EXAMPLE_CALL,
    MAX_COORD,
    MAX_LABEL_CHARS,
    ZOOM_TOOL_NAME,
    ParsedCall,
    _parse_coord,
    _short,
)

log = logging.getLogger(__name__)

CELL = 28  # pixels per merged vision token side
__all__ = ["ToolError", "ZoomTool", "image_zoom_in_tool", "is_valid_box", "run_tool", "zoom"]


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
    """(crop, crop_box, None) on success, (None, None, "Error: ...") otherwise. Never raises.

    The zoom alone, without the registry (kept for scripts and tests); the agent loop
    runs every tool through ``ToolSet.run`` (mmagent_rl/tools/registry.py)."""
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


class ZoomTool(Tool):
    """``{"bbox_2d": [x1, y1, x2, y2], "label": "..."}`` -> the zoomed crop (an image)."""

    name = ZOOM_TOOL_NAME
    description = ("Zoom in on a region of the original image: crop the box bbox_2d "
                   "(absolute pixel coordinates [x1, y1, x2, y2] of the original image) and "
                   "enlarge it.")
    parameters = {
        "type": "object",
        "properties": {
            "bbox_2d": {"type": "array", "items": {"type": "number"}, "minItems": 4,
                        "maxItems": 4,
                        "description": "the box [x1, y1, x2, y2] in pixels of the original "
                                       "image"},
            "label": {"type": "string",
                      "description": "what you expect to see in the box"},
        },
        "required": ["bbox_2d"],
    }
    timeout_s = 0  # built in: fast, runs inline

    def example_call(self) -> str:
        return _EXAMPLE_CALL

    def validate(self, arguments: dict) -> dict:
        """The box as 4 floats (finite, at most MAX_COORD: no pixels beyond that) and the
        label stripped, capped and made tokenizable; the messages are the parser's."""
        if "bbox_2d" not in arguments:
            raise ToolError('missing "bbox_2d" = [x1, y1, x2, y2] in pixels')
        box = arguments["bbox_2d"]
        if not isinstance(box, list) or len(box) != 4:
            raise ToolError(f'"bbox_2d" must be a list of 4 numbers [x1, y1, x2, y2], '
                            f"got {_short(box)}")
        coords = [_parse_coord(v) for v in box]
        if any(c is None for c in coords):
            raise ToolError(f'"bbox_2d" must hold 4 finite numbers of at most '
                            f"{MAX_COORD:g}, got {_short(box)}")
        label = arguments.get("label")
        if label is not None:
            if not isinstance(label, str):
                raise ToolError(f'"label" must be a string, got {type(label).__name__}')
            # Lone surrogates (from "\\udXXX" escapes) would crash any tokenizer later.
            label = label.encode("utf-8", "replace").decode("utf-8").strip()[:MAX_LABEL_CHARS]
        return {"bbox_2d": tuple(coords), "label": label}

    def __call__(self, arguments: dict, image: Image.Image, context: ToolContext) -> ToolResult:
        crop, box = zoom(image, arguments["bbox_2d"],
                         min_size=context.setting("zoom_min_size", 28),
                         out_max_side=context.setting("zoom_out_max_side", 112))
        return ToolResult(image=crop, crop_box=box)


image_zoom_in_tool = ZoomTool()
