"""The rotate tool: the original image turned by a quarter, half or three-quarter turn.

    <tool_call>{"name": "image_rotate_tool", "arguments": {"angle": 90}}</tool_call>

The angle is counter-clockwise (PIL's convention, and the usual mathematical one). The
whole original image is rotated, never an earlier tool output; the result keeps its
pixel count, so it costs as many vision tokens as the original image.
"""
from __future__ import annotations

from PIL import Image

from mmagent_rl.tools.base import Tool, ToolContext, ToolError, ToolResult
from mmagent_rl.tools.parse import _short

ROTATE_TOOL_NAME = "image_rotate_tool"
ANGLES = (90, 180, 270)
_TRANSPOSE = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180,
              270: Image.Transpose.ROTATE_270}


class RotateTool(Tool):
    name = ROTATE_TOOL_NAME
    description = ("Rotate the original image counter-clockwise by angle degrees (90, 180 "
                   "or 270), e.g. to read text or see an object that is sideways or upside "
                   "down.")
    parameters = {
        "type": "object",
        "properties": {
            "angle": {"type": "integer", "enum": list(ANGLES),
                      "description": "degrees counter-clockwise: 90, 180 or 270"},
        },
        "required": ["angle"],
    }
    timeout_s = 0  # built in: fast, runs inline

    def example_call(self) -> str:
        return f'{{"name": "{self.name}", "arguments": {{"angle": 90}}}}'

    def validate(self, arguments: dict) -> dict:
        if "angle" not in arguments:
            raise ToolError('missing "angle": one of 90, 180, 270 (degrees counter-clockwise)')
        angle = arguments["angle"]
        # 90.0 is 90 in JSON; true (a bool is an int in Python) and "90" are not
        if (isinstance(angle, bool) or not isinstance(angle, (int, float))
                or angle not in ANGLES):
            raise ToolError(f'"angle" must be one of 90, 180, 270 (degrees counter-clockwise), '
                            f"got {_short(angle)}")
        return {"angle": int(angle)}

    def __call__(self, arguments: dict, image: Image.Image, context: ToolContext) -> ToolResult:
        return ToolResult(image=image.convert("RGB").transpose(_TRANSPOSE[arguments["angle"]]))


image_rotate_tool = RotateTool()
