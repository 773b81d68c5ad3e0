"""The tool interface: what a tool the agent can call must provide.

A tool is an object with

- ``name``: the name the model writes in ``{"name": ..., "arguments": {...}}``;
- ``description`` and ``parameters`` (a JSON schema of the arguments object), which
  make its OpenAI-style function ``schema``, the text offered in the system prompt;
- ``validate(arguments) -> arguments``: its own argument check, run by the parser
  before the tool is called. It raises :class:`ToolError` for a bad call (the message
  becomes the model's "Error: ..." observation) and returns the arguments the tool is
  called with (normalised, e.g. the zoom's box as floats). The default checks
  ``parameters`` (a subset of JSON schema: type, enum, required, minimum/maximum,
  minItems/maxItems, items' type, additionalProperties=false);
- ``__call__(arguments, image, context)``: runs it on the example's original image.
  Returns a PIL image (shown to the model as an image, kept in ``Trajectory.images``),
  a string (shown as text), or a :class:`ToolResult`. A bad request raises
  :class:`ToolError`; any other exception, or running past ``timeout_s``, also becomes an
  error observation (mmagent_rl/tools/registry.py), never a failed rollout.

Tools are named in the config by import path (``rollout.tools``, docs/tools.md): the
attribute is a ``Tool`` instance, a ``Tool`` subclass (instantiated without arguments) or a
function wrapped with :func:`tool`.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from PIL import Image

from mmagent_rl.tools.parse import _short, inert_text

_PLACEHOLDER = {"string": '"..."', "integer": "0", "number": "0", "boolean": "true",
                "array": "[...]", "object": "{...}"}
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,63}$")


class ToolError(Exception):
    """A bad request; ``str(err)`` is an "Error: ..." message shown to the model."""

    def __init__(self, message: str):
        super().__init__(message if message.startswith("Error: ") else f"Error: {message}")


@dataclass
class ToolContext:
    """What a tool may read besides its arguments and the original image."""

    # The trajectory's images so far: the example's image(s) first, then the images
    # earlier tool calls returned (``ToolCall.image_index`` indexes this list).
    images: list[Image.Image] = field(default_factory=list)
    question: str = ""
    turn: int = 0  # the assistant turn that made the call
    # The rollout's AgentConfig (per-tool settings such as zoom_min_size and
    # zoom_out_max_side live there); None outside a rollout: the tool's defaults.
    settings: Any = None

    def setting(self, key: str, default: Any) -> Any:
        return getattr(self.settings, key, default) if self.settings is not None else default


@dataclass
class ToolResult:
    """A tool's full answer: an image or a text, and extras the trajectory records."""

    image: Image.Image | None = None
    text: str | None = None
    crop_box: tuple[int, int, int, int] | None = None  # the zoom: the box really cut


class Tool:
    """Base class of tools. Subclasses set ``name``, ``description``, ``parameters``
    and implement ``__call__``; they may override ``validate``."""

    name: str = ""
    description: str = ""
    parameters: dict = {"type": "object", "properties": {}, "required": []}
    # Seconds a call may run before it becomes "Error: tool X timed out after N s":
    # None = rollout.tool_timeout_s; 0 = no timeout, run in the rollout's thread (the
    # built-in tools, which are fast and trusted).
    timeout_s: float | None = None

    @property
    def schema(self) -> dict:
        """The OpenAI function format the chat templates render in ``# Tools``."""
        return {"type": "function", "function": {
            "name": self.name, "description": self.description,
            "parameters": self.parameters}}

    def example_call(self) -> str:
        """A call in the model's format, for error messages."""
        props = (self.parameters or {}).get("properties") or {}
        args = ", ".join(f'"{k}": {_PLACEHOLDER.get(str((v or {}).get("type")), "...")}'
                         for k, v in props.items())
        return inert_text(f'{{"name": "{self.name}", "arguments": {{{args}}}}}')

    def validate(self, arguments: dict) -> dict:
        return validate_arguments(arguments, self.parameters)

    def __call__(self, arguments: dict, image: Image.Image,
                 context: ToolContext) -> Image.Image | str | ToolResult:
        raise NotImplementedError(f"tool {self.name!r} does not implement __call__")

    def __repr__(self) -> str:
        return f"<tool {self.name}>"


class FunctionTool(Tool):
    """A plain function as a tool (made by :func:`tool`)."""

    def __init__(self, fn: Callable, name: str, description: str, parameters: dict,
                 timeout_s: float | None = None,
                 validator: Callable[[dict], dict | None] | None = None):
        self.fn, self.name, self.description = fn, name, description
        self.parameters, self.timeout_s, self.validator = parameters, timeout_s, validator

    def validate(self, arguments: dict) -> dict:
        arguments = validate_arguments(arguments, self.parameters)
        if self.validator is not None:
            out = self.validator(arguments)
            arguments = arguments if out is None else out
        return arguments

    def __call__(self, arguments, image, context):
        return self.fn(arguments, image, context)


def tool(name: str | None = None, *, description: str | None = None,
         parameters: dict | None = None, timeout_s: float | None = None,
         validate: Callable[[dict], dict | None] | None = None):
    """Decorator: ``fn(arguments, image, context)`` becomes a :class:`FunctionTool`
    (name: the function's, description: its docstring, unless given)."""
    def wrap(fn: Callable) -> FunctionTool:
        return FunctionTool(fn, name or fn.__name__,
                            description if description is not None else (fn.__doc__ or "").strip(),
                            parameters or {"type": "object", "properties": {}, "required": []},
                            timeout_s, validate)
    return wrap


# ---- checking a tool's definition (the registry) -----------------------------------

def check_definition(t: Tool, where: str) -> None:
    """A clear ValueError when a tool's name, schema or timeout cannot work."""
    if not isinstance(t.name, str) or not NAME_RE.match(t.name):
        raise ValueError(f"{where}: tool name {t.name!r} must be 1-64 characters of letters, "
                         "digits, '_', '.', '-', starting with a letter or '_'")
    if not isinstance(t.description, str):
        raise ValueError(f"{where}: tool {t.name}: description must be a string")
    params = t.parameters
    if not isinstance(params, dict) or params.get("type", "object") != "object":
        raise ValueError(f"{where}: tool {t.name}: parameters must be a JSON schema of "
                         f'type "object", got {params!r:.200}')
    try:
        json.dumps(t.schema)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: tool {t.name}: schema is not JSON-serialisable ({e})") \
            from None
    if t.timeout_s is not None and (not isinstance(t.timeout_s, (int, float))
                                    or not t.timeout_s >= 0):
        raise ValueError(f"{where}: tool {t.name}: timeout_s must be None or >= 0, "
                         f"got {t.timeout_s!r}")
    if not callable(t):
        raise ValueError(f"{where}: tool {t.name} is not callable")


# ---- the default argument check: a subset of JSON schema ---------------------------

_TYPES = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: (isinstance(v, (int, float)) and not isinstance(v, bool)
                         and (isinstance(v, int) or math.isfinite(v))),
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
    "null": lambda v: v is None,
}


def _type_ok(value: Any, typ: Any) -> bool:
    if typ is None:
        return True
    types = typ if isinstance(typ, list) else [typ]
    return any(_TYPES.get(t, lambda v: True)(value) for t in types)


def _type_name(typ: Any) -> str:
    return " or ".join(typ) if isinstance(typ, list) else str(typ)


def _same(value: Any, allowed: Any) -> bool:
    """JSON equality: true/false are not 1/0."""
    if isinstance(value, bool) or isinstance(allowed, bool):
        return value is allowed
    return value == allowed


def _check_value(key: str, value: Any, spec: dict) -> None:
    typ = spec.get("type")
    if not _type_ok(value, typ):
        raise ToolError(f'"{key}" must be {_type_name(typ)}, got {_short(value)}')
    if "enum" in spec and not any(_same(value, e) for e in spec["enum"]):
        allowed = ", ".join(json.dumps(e) for e in spec["enum"])
        raise ToolError(f'"{key}" must be one of {allowed}, got {_short(value)}')
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in spec and value < spec["minimum"]:
            raise ToolError(f'"{key}" must be >= {spec["minimum"]}, got {_short(value)}')
        if "maximum" in spec and value > spec["maximum"]:
            raise ToolError(f'"{key}" must be <= {spec["maximum"]}, got {_short(value)}')
    if isinstance(value, list):
        if "minItems" in spec and len(value) < spec["minItems"]:
            raise ToolError(f'"{key}" must hold at least {spec["minItems"]} items')
        if "maxItems" in spec and len(value) > spec["maxItems"]:
            raise ToolError(f'"{key}" must hold at most {spec["maxItems"]} items')
        item_type = (spec.get("items") or {}).get("type")
        if item_type and not all(_type_ok(v, item_type) for v in value):
            raise ToolError(f'"{key}" must be a list of {_type_name(item_type)}, '
                            f"got {_short(value)}")


def validate_arguments(arguments: dict, parameters: dict) -> dict:
    """``arguments`` checked against ``parameters`` (see the module docstring); raises
    ToolError naming the first problem. Returns ``arguments`` unchanged."""
    props = (parameters or {}).get("properties") or {}
    for key in (parameters or {}).get("required") or []:
        if key not in arguments:
            hint = (props.get(key) or {}).get("description")
            raise ToolError(f'missing "{key}"' + (f" ({hint})" if hint else ""))
    if (parameters or {}).get("additionalProperties") is False:
        extra = [k for k in arguments if k not in props]
        if extra:
            raise ToolError(f"unknown argument {_short(extra[0])}; arguments: "
                            + ", ".join(props))
    for key, spec in props.items():
        if key in arguments:
            _check_value(key, arguments[key], spec or {})
    return arguments
