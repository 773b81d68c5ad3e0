"""Parse a tool call out of one assistant turn.

Format (Qwen / DeepEyes style)::

    <tool_call>{"name": "image_zoom_in_tool",
                "arguments": {"bbox_2d": [x1, y1, x2, y2], "label": "..."}}</tool_call>

Any registered tool's name is accepted (mmagent_rl/tools/registry.py); its arguments are
checked by the tool's own ``validate`` (the zoom checks its box, mmagent_rl/tools/zoom.py).
Everything here is total: any string gives a ``ParsedCall``; problems are reported as
an "Error: ..." message that is shown to the model as the tool's observation.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
ZOOM_TOOL_NAME = "image_zoom_in_tool"
KNOWN_TOOLS = (ZOOM_TOOL_NAME,)  # the default tool list's names (rollout.tools)
log = logging.getLogger(__name__)

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
    # The arguments the tool is called with, as its validate() returned them (None on
    # error). ``bbox`` / ``label`` are read from them: a tuple ``bbox_2d`` (the zoom's)
    # and a string ``label``.
    arguments: dict[str, Any] | None = None

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


def parse_tool_call(raw: str, tools: Any = None) -> ParsedCall:
    """Parse the JSON inside a tool call. Never raises.

    ``tools``: a ToolSet (mmagent_rl/tools/registry.py) or a mapping name -> Tool; None =
    the default tool list (the zoom alone)."""
    if tools is None:
        from mmagent_rl.tools.registry import default_toolset

        tools = default_toolset()
    return parse_with(raw, tools.by_name if hasattr(tools, "by_name") else tools)


def _expected(tools: Mapping[str, Any]) -> str:
    if len(tools) == 1:
        return next(iter(tools.values())).example_call()
    return '{"name": NAME, "arguments": {...}} with NAME one of ' + ", ".join(tools)


def parse_with(raw: str, tools: Mapping[str, Any]) -> ParsedCall:
    """:func:`parse_tool_call` with the tools given as a mapping name -> Tool."""
    try:
        obj = json.loads(raw)
    except (ValueError, TypeError, RecursionError) as exc:
        # ValueError covers JSONDecodeError and ints too long to convert.
        detail = str(exc).split("\n")[0][:120]
        return _error(f"tool call is not valid JSON ({detail}). Expected {_expected(tools)}")
    if not isinstance(obj, dict):
        return _error(f"tool call must be a JSON object, got {type(obj).__name__}. "
                      f"Expected {_expected(tools)}")

    name = obj.get("name")
    known = ", ".join(tools)
    if name is None:
        return _error(f'missing "name". Known tools: {known}')
    if not isinstance(name, str) or name not in tools:
        return _error(f"unknown tool {_short(name)}. Known tools: {known}")
    tool = tools[name]

    args = obj.get("arguments")
    if args is None:
        return _error(f'missing "arguments". Expected {tool.example_call()}', name)
    if not isinstance(args, dict):
        return _error('"arguments" must be a JSON object', name)

    from mmagent_rl.tools.base import ToolError

    try:
        out = tool.validate(args)
    except ToolError as exc:
        return _error(inert_text(str(exc)).removeprefix("Error: "), name)
    except Exception as exc:  # a bug in a user's validate must not kill a rollout
        log.warning("tool %s: validate failed on %s: %r", name, _short(args), exc)
        return _error(f"tool {name} failed ({type(exc).__name__})", name)
    args = args if out is None else out
    if not isinstance(args, dict):
        return _error(f"tool {name} failed (validate returned {type(args).__name__})", name)
    bbox = args.get("bbox_2d")
    bbox = bbox if isinstance(bbox, tuple) and len(bbox) == 4 else None
    label = args.get("label")
    return ParsedCall(name=name, bbox=bbox, label=label if isinstance(label, str) else None,
                      error=None, arguments=args)
