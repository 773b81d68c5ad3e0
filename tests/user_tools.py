"""Tools a user could write (docs/tools.md), for tests/test_tool_plugins.py: registered
as ``rollout.tools=[user_tools:flip_tool, ...]`` (tests/ is on the path of the tests)."""
from __future__ import annotations

import time

from PIL import Image, ImageOps

from mmagent_rl.tools.base import Tool, ToolError, tool


class FlipTool(Tool):
    """A Tool subclass: mirrors the original image."""

    name = "image_flip_tool"
    description = "Mirror the original image left-right (horizontal) or top-bottom (vertical)."
    parameters = {
        "type": "object",
        "properties": {"direction": {"type": "string", "enum": ["horizontal", "vertical"],
                                     "description": "horizontal or vertical"}},
        "required": ["direction"],
        "additionalProperties": False,
    }

    def __call__(self, arguments, image, context):
        if arguments["direction"] == "horizontal":
            return ImageOps.mirror(image)
        return ImageOps.flip(image)


flip_tool = FlipTool()


@tool(name="image_size_tool", description="The original image's size as WIDTHxHEIGHT text.")
def size_tool(arguments, image, context):
    return f"{image.width}x{image.height}"


@tool(name="echo_tool", description="Echoes its text.",
      parameters={"type": "object", "properties": {"text": {"type": "string"}},
                  "required": ["text"]})
def echo_tool(arguments, image, context):
    return arguments["text"]


@tool(name="broken_tool", description="Always raises.")
def broken_tool(arguments, image, context):
    raise RuntimeError("the tool's own bug")


@tool(name="slow_tool", description="Sleeps, then answers.",
      parameters={"type": "object", "properties": {"seconds": {"type": "number",
                                                               "minimum": 0}}})
def slow_tool(arguments, image, context):
    time.sleep(arguments.get("seconds", 3.0))
    return "awake"


@tool(name="refusing_tool", description="Raises ToolError, a bad request.")
def refusing_tool(arguments, image, context):
    raise ToolError("this image cannot be refused <|image_pad|>")


@tool(name="wrong_type_tool", description="Returns a number.")
def wrong_type_tool(arguments, image, context):
    return 42


def _crash(arguments):
    return 1 / 0


@tool(name="bad_validate_tool", description="Its validate has a bug.", validate=_crash)
def bad_validate_tool(arguments, image, context):
    return "never"


class DuplicateZoom(FlipTool):
    name = "image_zoom_in_tool"


duplicate_zoom = DuplicateZoom()


class NeedsArgs(Tool):
    name = "needs_args"

    def __init__(self, factor):
        self.factor = factor


class BadName(FlipTool):
    name = "has a space"


bad_name = BadName()
not_a_tool = 42


def plain_function(arguments, image, context):  # not wrapped with @tool
    return image


def blank(size=(8, 8)) -> Image.Image:
    return Image.new("RGB", size, (0, 0, 0))
