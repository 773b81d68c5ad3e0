"""Parse the zoom tool call out of one assistant turn.

Format (DeepEyes style)::

    <tool_call>{"name": "image_zoom_in_tool",
                "arguments": {"bbox_2d": [x1, y1, x2, y2], "label": "..."}}</tool_call>

Everything here is total: any string gives a ``ParsedCall``; problems are reported as
an "Error: ..." message that is shown to the model as the tool's observation.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
ZOOM_TOOL_NAME = "image_zoom_in_tool"
KNOWN_TOOLS = (ZOOM_TOOL_NAME,)

MAX_COORD = 1e6  # far beyond any real image; larger values are garbage, not pixels
MAX_LABEL_CHARS = 512
_EXAMPLE_CALL = (
    '{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [x1, y1, x2, y2], '
    '"label": "what you expect to see"}}'
)


@dataclass(frozen=True)
class ParsedCall:
    name: str | None
    bbox: tuple[float, float, float, float] | None
    label: str | None
    error: str | None  # None when the call is well formed

    @property
    def ok(self) -> bool:
        return self.error is None


def find_tool_call(text: str) -> str | None:
    """Raw text inside the last complete <tool_call>...</tool_call>, or None."""
    end = text.rfind(TOOL_CALL_CLOSE)
    if end < 0:
        return None
    start = text.rfind(TOOL_CALL_OPEN, 0, end)
    if start < 0:
        return None
    return text[start + len(TOOL_CALL_OPEN):end]


def has_unterminated_call(text: str) -> bool:
    """True if the last <tool_call> is never closed (e.g. generation hit max tokens)."""
    start = text.rfind(TOOL_CALL_OPEN)
    return start >= 0 and text.find(TOOL_CALL_CLOSE, start) < 0


def inert_text(text: str) -> str:
    """Model-written text made safe to echo back in an observation.

    The observation is re-tokenized, and a tokenizer turns the *text* ``<|image_pad|>``
    (which the model can spell with ordinary tokens) into the structural token: an
    image placeholder without an image, which breaks the engine and the learner. Every
    added token of the Qwen-VL tokenizers starts with "<", so "<" is escaped. Lone
    surrogates (JSON allows ``"\\ud800"``) cannot be tokenized: they become "?".
    Idempotent."""
    return text.encode("utf-8", "replace").decode("utf-8").replace("<", "&lt;")


def _short(value: object, limit: int = 80) -> str:
    """repr() capped and made inert, so a garbage call cannot blow up the observation."""
    try:
        text = repr(value)
    except Exception:  # exotic objects; cannot come from json but stay total
        text = f"{type(value).__name__} object"
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return inert_text(text)


def _error(message: str, name: str | None = None) -> ParsedCall:
    return ParsedCall(name=name, bbox=None, label=None, error=f"Error: {message}")


def _parse_coord(value: object) -> float | None:
    """A finite, sane number as float, else None. bool is rejected (it is an int)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, int):  # compare before float(): huge ints overflow float()
        return float(value) if abs(value) <= MAX_COORD else None
    if not math.isfinite(value) or abs(value) > MAX_COORD:
        return None
    return float(value)


def parse_tool_call(raw: str) -> ParsedCall:
    """Parse the JSON inside a tool call. Never raises."""
    try:
        obj = json.loads(raw)
    except (ValueError, TypeError, RecursionError) as exc:
        # ValueError covers JSONDecodeError and ints too long to convert.
        detail = str(exc).split("\n")[0][:120]
        return _error(f"tool call is not valid JSON ({detail}). Expected {_EXAMPLE_CALL}")
    if not isinstance(obj, dict):
        return _error(f"tool call must be a JSON object, got {type(obj).__name__}. "
                      f"Expected {_EXAMPLE_CALL}")

    name = obj.get("name")
    known = ", ".join(KNOWN_TOOLS)
    if name is None:
        return _error(f'missing "name". Known tools: {known}')
    if not isinstance(name, str) or name not in KNOWN_TOOLS:
        return _error(f"unknown tool {_short(name)}. Known tools: {known}")

    args = obj.get("arguments")
    if args is None:
        return _error(f'missing "arguments". Expected {_EXAMPLE_CALL}', name)
    if not isinstance(args, dict):
        return _error('"arguments" must be a JSON object', name)

    if "bbox_2d" not in args:
        return _error('missing "bbox_2d" = [x1, y1, x2, y2] in pixels', name)
    box = args["bbox_2d"]
    if not isinstance(box, list) or len(box) != 4:
        return _error(f'"bbox_2d" must be a list of 4 numbers [x1, y1, x2, y2], '
                      f"got {_short(box)}", name)
    coords = [_parse_coord(v) for v in box]
    if any(c is None for c in coords):
        return _error(f'"bbox_2d" must hold 4 finite numbers of at most {MAX_COORD:g}, '
                      f"got {_short(box)}", name)

    label = args.get("label")
    if label is not None:
        if not isinstance(label, str):
            return _error(f'"label" must be a string, got {type(label).__name__}', name)
        # Lone surrogates (from "\\udXXX" escapes) would crash any tokenizer later.
        label = label.encode("utf-8", "replace").decode("utf-8").strip()[:MAX_LABEL_CHARS]

    return ParsedCall(name=name, bbox=tuple(coords), label=label, error=None)
