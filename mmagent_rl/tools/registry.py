"""The run's tools: loaded by import path at start, and how a call is run.

``rollout.tools`` lists ``"module:attribute"`` paths (docs/tools.md); :meth:`ToolSet.load`
imports them and fails at once, naming the entry, on a bad path, an attribute that is
not a tool, a broken definition or two tools with one name. :meth:`ToolSet.run` is the
contract every call goes through: whatever the tool does (a ToolError, any other
exception, running past its timeout, returning something that is neither an image nor a
text) the model gets an "Error: ..." observation and the rollout goes on.
"""
from __future__ import annotations

import importlib
import inspect
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from PIL import Image

from mmagent_rl.tools.base import Tool, ToolContext, ToolError, ToolResult, check_definition
from mmagent_rl.tools.parse import ParsedCall, _short, inert_text, parse_with

log = logging.getLogger(__name__)

DEFAULT_TOOLS = ("mmagent_rl.tools.zoom:image_zoom_in_tool",)
BUILTIN_TOOLS = DEFAULT_TOOLS + ("mmagent_rl.tools.rotate:image_rotate_tool",)
DEFAULT_TOOL_TIMEOUT_S = 30.0
IN_PROMPT_CHOICES = ("auto", "true", "false")
MAX_TEXT_CHARS = 4000  # a text result longer than this is cut (the token budget is small)


def load_tool(spec: str) -> Tool:
    """The tool at ``"package.module:attribute"`` (a Tool instance, or a Tool subclass
    instantiated without arguments). ValueError with the reason otherwise."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ValueError(f"rollout.tools entry {spec!r}: expected 'package.module:attribute'"
                         ", e.g. 'mmagent_rl.tools.zoom:image_zoom_in_tool'")
    module_name, attr = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or the module itself failing on import
        raise ValueError(f"rollout.tools entry {spec!r}: cannot import module "
                         f"{module_name!r} ({type(e).__name__}: {e})") from e
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"rollout.tools entry {spec!r}: module {module_name!r} has no "
                             f"attribute {attr!r}")
        obj = getattr(obj, part)
    if inspect.isclass(obj) and issubclass(obj, Tool):
        try:
            obj = obj()
        except Exception as e:
            raise ValueError(f"rollout.tools entry {spec!r}: the Tool class cannot be built "
                             f"without arguments ({type(e).__name__}: {e})") from e
    if not isinstance(obj, Tool):
        raise ValueError(f"rollout.tools entry {spec!r} is not a tool: got "
                         f"{type(obj).__name__}; expected a mmagent_rl.tools.base.Tool "
                         "instance or subclass, or a function wrapped with "
                         "@mmagent_rl.tools.base.tool(...)")
    check_definition(obj, f"rollout.tools entry {spec!r}")
    return obj


def resolve_in_prompt(value: Any, names: Sequence[str]) -> bool:
    """``rollout.tools_in_prompt``: true/false, or auto = offered in the system prompt
    only when the tools are not the default zoom alone (whose prompts, and the shipped
    embedded agent, describe the zoom call themselves)."""
    v = str(value).strip().lower()
    if v not in IN_PROMPT_CHOICES:
        raise ValueError(f"rollout.tools_in_prompt={value!r} is not valid; valid choices: "
                         f"{list(IN_PROMPT_CHOICES)}")
    if v == "auto":
        return tuple(names) != tuple(load_tool(s).name for s in DEFAULT_TOOLS)
    return v == "true"


@dataclass(frozen=True)
class ToolSettings:
    """The picklable tool configuration (import paths, not objects) that rollout
    workers receive; ``load()`` gives the ToolSet."""

    specs: tuple[str, ...] = DEFAULT_TOOLS
    timeout_s: float = DEFAULT_TOOL_TIMEOUT_S
    in_prompt: str = "auto"

    @classmethod
    def from_config(cls, rollout_cfg) -> "ToolSettings":
        """From the ``rollout`` config section (its ``tools``, ``tool_timeout_s``,
        ``tools_in_prompt``; missing keys: the defaults)."""
        return cls(tuple(getattr(rollout_cfg, "tools", DEFAULT_TOOLS)),
                   float(getattr(rollout_cfg, "tool_timeout_s", DEFAULT_TOOL_TIMEOUT_S)),
                   str(getattr(rollout_cfg, "tools_in_prompt", "auto")))

    def load(self) -> "ToolSet":
        return ToolSet.load(self.specs, self.timeout_s, self.in_prompt)


@dataclass
class ToolOutcome:
    """What one call gave: an image or a text for the model, or an error."""

    image: Image.Image | None = None
    text: str | None = None  # a text result (made inert)
    error: str | None = None  # "Error: ..." (made inert)
    crop_box: tuple[int, int, int, int] | None = None
    latency_s: float | None = None  # wall time of the tool's call


class ToolSet:
    """The tools of a run, by name, in the configured order."""

    def __init__(self, tools: Sequence[Tool], timeout_s: float = DEFAULT_TOOL_TIMEOUT_S,
                 in_prompt: Any = "auto", specs: Sequence[str] | None = None):
        if not tools:
            raise ValueError("rollout.tools is empty: give at least one tool")
        if not timeout_s > 0:
            raise ValueError(f"rollout.tool_timeout_s={timeout_s!r} must be > 0")
        self.by_name: dict[str, Tool] = {}
        for i, t in enumerate(tools):
            where = f"rollout.tools entry {specs[i]!r}" if specs else f"tool {i}"
            check_definition(t, where)
            if t.name in self.by_name:
                raise ValueError(f"{where}: duplicate tool name {t.name!r} (two entries of "
                                 "rollout.tools define it)")
            self.by_name[t.name] = t
        self.timeout_s = float(timeout_s)
        self.in_prompt = resolve_in_prompt(in_prompt, self.names)

    @classmethod
    def load(cls, specs: Sequence[str] = DEFAULT_TOOLS,
             timeout_s: float = DEFAULT_TOOL_TIMEOUT_S, in_prompt: Any = "auto") -> "ToolSet":
        if isinstance(specs, str):
            raise ValueError(f"rollout.tools must be a list of import paths, got the string "
                             f"{specs!r}")
        specs = list(specs)
        return cls([load_tool(s) for s in specs], timeout_s, in_prompt, specs)

    @classmethod
    def from_config(cls, rollout_cfg) -> "ToolSet":
        return ToolSettings.from_config(rollout_cfg).load()

    # ---- what the prompt and the metrics need ----------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.by_name)

    @property
    def schemas(self) -> list[dict]:
        return [t.schema for t in self.by_name.values()]

    def get(self, name: str | None) -> Tool | None:
        return self.by_name.get(name) if isinstance(name, str) else None

    def prompt_chat(self, chat):
        """``chat`` with the tools' schemas in its system prompt when they are offered
        there (``rollout.tools_in_prompt``), else ``chat`` itself."""
        return chat.with_tools(self.schemas) if self.in_prompt else chat

    # ---- a call -----------------------------------------------------------------------
    def parse(self, raw: str) -> ParsedCall:
        return parse_with(raw, self.by_name)

    def timeout_of(self, t: Tool) -> float:
        return self.timeout_s if t.timeout_s is None else float(t.timeout_s)

    def run(self, parsed: ParsedCall, image: Image.Image,
            context: ToolContext | None = None) -> ToolOutcome:
        """Run a parsed call. Never raises; every failure is an error outcome."""
        if parsed.error is not None:
            return ToolOutcome(error=parsed.error)
        t = self.get(parsed.name)
        if t is None:
            return ToolOutcome(error=f"Error: unknown tool {_short(parsed.name)}. Known "
                                     f"tools: {', '.join(self.names)}")
        args = parsed.arguments if parsed.arguments is not None else {}
        context = context if context is not None else ToolContext(images=[image])
        timeout = self.timeout_of(t)
        t0 = time.perf_counter()
        try:
            result = _call(t, args, image, context, timeout)
        except ToolError as exc:
            return ToolOutcome(error=inert_text(str(exc)), latency_s=time.perf_counter() - t0)
        except _Timeout:
            log.warning("tool %s timed out after %g s", t.name, timeout)
            return ToolOutcome(error=f"Error: tool {t.name} timed out after {timeout:g} s",
                               latency_s=time.perf_counter() - t0)
        except Exception as exc:  # a bug or a broken image must not kill a rollout
            log.warning("tool %s failed on %s: %r", t.name, _short(args), exc)
            return ToolOutcome(error=f"Error: tool {t.name} failed ({type(exc).__name__})",
                               latency_s=time.perf_counter() - t0)
        latency = time.perf_counter() - t0
        return _outcome(t.name, result, latency)


class _Timeout(Exception):
    pass


def _call(t: Tool, args: dict, image: Image.Image, context: ToolContext, timeout: float):
    """The tool's call, in a thread when it has a timeout. A call that times out keeps
    running in its (daemon) thread: Python cannot stop it; its result is dropped."""
    if not timeout:
        return t(args, image, context)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = t(args, image, context)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    th = threading.Thread(target=target, name=f"tool-{t.name}", daemon=True)
    th.start()
    th.join(timeout)
    if th.is_alive():
        raise _Timeout()
    if "error" in box:
        e = box["error"]
        if not isinstance(e, Exception):  # SystemExit, KeyboardInterrupt in the tool
            raise RuntimeError(f"{type(e).__name__} in tool") from e
        raise e
    return box.get("result")


def _outcome(name: str, result: Any, latency: float) -> ToolOutcome:
    """Image / text / ToolResult -> ToolOutcome; anything else is an error."""
    crop_box = None
    if isinstance(result, ToolResult):
        crop_box = result.crop_box
        result = result.image if result.image is not None else result.text
    if isinstance(result, Image.Image):
        if result.width < 1 or result.height < 1:
            return ToolOutcome(error=f"Error: tool {name} returned an empty image",
                               latency_s=latency)
        image = result if result.mode == "RGB" else result.convert("RGB")
        return ToolOutcome(image=image, crop_box=crop_box, latency_s=latency)
    if isinstance(result, str):
        text = inert_text(result)
        if len(text) > MAX_TEXT_CHARS:
            text = text[:MAX_TEXT_CHARS - 3] + "..."
        return ToolOutcome(text=text or "(empty result)", latency_s=latency)
    return ToolOutcome(error=f"Error: tool {name} failed (it returned "
                             f"{type(result).__name__}, not an image or a text)",
                       latency_s=latency)


@lru_cache(maxsize=1)
def default_toolset() -> ToolSet:
    """The default tool list (the zoom alone), loaded once."""
    return ToolSet.load(DEFAULT_TOOLS)
