"""Synthetic demonstrations in the agent's exact token format (for SFT warm-up).

A demo of a hard example is the dialogue an ideal agent would have::

    <prompt: system, user image + question>          loss 0
    {think} <tool_call>{"name": ..., "arguments": {"bbox_2d": box, "label": ...}}</tool_call>
                                                      loss 1
    <|im_end|> ... <tool_response><crop></tool_response><|im_end|> ... assistant\\n
                                                      loss 0 (the observation)
    <description>{what the crop shows}</description><answer>{colour}</answer><|im_end|>
                                                      loss 1

An easy example (a large target, ``SyntheticConfig.easy_fraction``) is answered
directly, without a tool. ``box`` is the target box shifted by a random jitter and,
with ``coarse_cell``, snapped to a grid (so coordinates come from a small set of
numbers a tiny model can learn), always containing the target; the observation is
exactly ``zoom(image, box)``.

``Demo.messages`` is the JSON-serialisable chat (roles system / user / assistant /
tool; content items ``{"type": "text", "text": ...}`` or ``{"type": "image",
"image": i}`` with ``i`` an index into ``Demo.images``), the shape the agent loop
produces. :func:`demo_from_messages` rebuilds ids and mask from it, so a jsonl of
demos (:func:`demo_to_row` / :func:`demo_from_row`) loads back to the same tokens.
"""
from __future__ import annotations

import base64
import dataclasses
import io
import json
import random
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from mmagent_rl.example import Example
from mmagent_rl.data.synthetic import describe_target
from mmagent_rl.chat import ChatFormat
from mmagent_rl.tools.parse import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, ZOOM_TOOL_NAME
from mmagent_rl.tools.zoom import zoom

LABEL_MODES = ("target", "no_color")


@dataclass
class DemoConfig:
    # Box: with coarse_cell > 0 a box_side x box_side square whose corners are
    # multiples of coarse_cell (a fixed size: x2 = x1 + box_side is trivial to learn);
    # with coarse_cell = 0 the target box plus a random margin, in exact pixels.
    coarse_cell: int = 64
    box_side: int = 192
    margin: tuple[int, int] = (6, 24)  # exact mode only, px added on each side
    jitter: int = 24  # px, random shift of the box before snapping; 0 = deterministic
    # "target": label = describe_target (names the colour before seeing the crop);
    # "no_color": the same text without the colour word. With "target" every demo's
    # label already holds the answer, so a model can learn to copy it instead of
    # reading the crop; "no_color" removes that shortcut.
    label: str = "no_color"
    think: str = "The square is too small here. I zoom in on the black ring."
    think_easy: str = "The square is large enough to see."
    zoom_out_max_side: int = 112  # zoom(..., out_max_side): 112 px -> 16 vision tokens

    def __post_init__(self) -> None:
        if self.label not in LABEL_MODES:
            raise ValueError(f"label must be one of {LABEL_MODES}, got {self.label!r}")
        if self.coarse_cell < 0 or self.jitter < 0:
            raise ValueError("coarse_cell and jitter must be >= 0")
        if self.coarse_cell and self.box_side % self.coarse_cell:
            raise ValueError(f"box_side {self.box_side} must be a multiple of "
                             f"coarse_cell {self.coarse_cell}")


@dataclass
class Demo:
    token_ids: list[int]
    loss_mask: list[int]
    images: list[Image.Image]  # the example's image, then the crop (if any)
    messages: list[dict[str, Any]]
    box: tuple[int, int, int, int] | None = None  # the tool call's box, None if no tool
    meta: dict[str, Any] = field(default_factory=dict)


# ---- pieces of text ---------------------------------------------------------------

def label_text(example: Example, mode: str) -> str:
    text = describe_target(example)
    if mode == "no_color":
        color = example.meta.get("color", example.answer)
        text = text.replace(f" {color} ", " ", 1)
    return text


def tool_call_text(box: tuple[int, int, int, int], label: str) -> str:
    return call_text(ZOOM_TOOL_NAME, {"bbox_2d": list(box), "label": label})


def call_text(name: str, arguments: dict[str, Any]) -> str:
    """A call of any tool in the agent's format, e.g.
    ``call_text("image_rotate_tool", {"angle": 90})``."""
    body = json.dumps({"name": name, "arguments": arguments})
    return f"{TOOL_CALL_OPEN}{body}{TOOL_CALL_CLOSE}"


def final_text(example: Example) -> str:
    """What follows the observation (or the prompt, without a tool)."""
    return (f"<description>{describe_target(example)}</description>"
            f"<answer>{example.answer}</answer>")


def _contains(outer, inner) -> bool:
    return (outer[0] <= inner[0] and outer[1] <= inner[1]
            and outer[2] >= inner[2] and outer[3] >= inner[3])


def _snap_axis(lo: int, hi: int, shift: float, cfg: DemoConfig, limit: int) -> tuple[int, int]:
    """One axis of a coarse box: box_side long, centred on [lo, hi] + shift, its start
    rounded to a multiple of coarse_cell and kept inside [0, limit]."""
    cell = cfg.coarse_cell
    side = min(cfg.box_side, limit - limit % cell)
    start = round(((lo + hi) / 2 + shift - side / 2) / cell) * cell
    start = min(max(start, 0), (limit - side) // cell * cell)
    return int(start), int(start + side)


def demo_box(example: Example, rng: random.Random, cfg: DemoConfig,
             strict: bool = True) -> tuple[int, int, int, int]:
    """The tool call's box: jittered, snapped, inside the image, containing the target.

    ``strict=False`` (coarse mode only): a target too big for ``box_side`` gets the
    box centred on it instead of an error (curricula with enlarged targets)."""
    w, h = example.image.size
    tb = example.target_box
    if tb is None:
        raise ValueError(f"example {example.id} has no target_box; a demo needs one")
    for attempt in range(8):
        j = cfg.jitter if attempt < 7 else 0  # last try: no jitter, always contains
        sx, sy = rng.uniform(-j, j), rng.uniform(-j, j)
        if cfg.coarse_cell:
            x1, x2 = _snap_axis(tb[0], tb[2], sx, cfg, w)
            y1, y2 = _snap_axis(tb[1], tb[3], sy, cfg, h)
        else:
            m = [rng.randint(*cfg.margin) for _ in range(4)]
            x1 = max(0, round(tb[0] - m[0] + sx))
            y1 = max(0, round(tb[1] - m[1] + sy))
            x2 = min(w, round(tb[2] + m[2] + sx))
            y2 = min(h, round(tb[3] + m[3] + sy))
        box = (x1, y1, x2, y2)
        if _contains(box, tb) or (not strict and cfg.coarse_cell and attempt == 7):
            return box
    raise ValueError(f"cannot place a box containing {tb} with {cfg} in a {w}x{h} image")


# ---- building ---------------------------------------------------------------------

def make_demo(example: Example, chat: ChatFormat, rng: random.Random,
              cfg: DemoConfig = DemoConfig(), strict: bool = True) -> Demo:
    """The demonstration of one example; tokens are built turn by turn like a rollout.
    ``strict``: see :func:`demo_box`."""
    image = example.image
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": [{"type": "text", "text": chat.system_prompt}]},
        {"role": "user", "content": [{"type": "image", "image": 0},
                                     {"type": "text", "text": example.question}]},
    ]
    ids = chat.prompt_ids(image, example.question)
    mask = [0] * len(ids)
    images = [image]
    box = None

    def assistant(text: str, end_turn: bool) -> None:
        turn = chat.encode(text) + ([chat.im_end_id] if end_turn else [])
        ids.extend(turn)
        mask.extend([1] * len(turn))
        messages.append({"role": "assistant", "content": [{"type": "text", "text": text}]})

    if example.meta.get("easy"):
        assistant(f"{cfg.think_easy} {final_text(example)}", end_turn=True)
    else:
        box = demo_box(example, rng, cfg, strict)
        assistant(f"{cfg.think} {tool_call_text(box, label_text(example, cfg.label))}",
                  end_turn=False)
        crop, _ = zoom(image, box, out_max_side=cfg.zoom_out_max_side)
        obs = chat.observation_ids(crop, None)  # starts with the turn's <|im_end|>
        ids.extend(obs)
        mask.extend([0] * len(obs))
        images.append(crop)
        messages.append({"role": "tool", "content": [{"type": "image", "image": 1}]})
        assistant(final_text(example), end_turn=True)

    return Demo(ids, mask, images, messages, box,
                meta={"id": example.id, "answer": example.answer,
                      "target_box": list(example.target_box or ()),
                      "easy": bool(example.meta.get("easy"))})


def scripted_demo(example: Example, chat: ChatFormat, turns: list[str], tools=None,
                  settings=None) -> Demo:
    """A demonstration of scripted assistant turns with any tools, run as the agent loop
    runs them: a turn ending with ``</tool_call>`` is parsed and executed by ``tools``
    (a ToolSet; None = the default, the zoom alone) on the example's image and followed
    by the observation (the returned image, a text, or the "Error: ..." the model would
    see); the last turn must be a final one (it ends with ``<|im_end|>``). ``settings``:
    the AgentConfig the tools read (zoom_min_size, ...; None = their defaults). Every
    assistant token has loss 1, as in :func:`make_demo`.

    E.g. ``scripted_demo(ex, chat, [call_text("image_rotate_tool", {"angle": 90}),
    "<answer>red</answer>"], ToolSet.load(BUILTIN_TOOLS))``."""
    from mmagent_rl.tools.base import ToolContext
    from mmagent_rl.tools.parse import find_tool_call
    from mmagent_rl.tools.registry import default_toolset

    tools = tools if tools is not None else default_toolset()
    if not turns or turns[-1].rstrip().endswith(TOOL_CALL_CLOSE):
        raise ValueError("the last scripted turn must be a final answer, not a tool call")
    images = [example.image]
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": [{"type": "text", "text": chat.system_prompt}]},
        {"role": "user", "content": [{"type": "image", "image": 0},
                                     {"type": "text", "text": example.question}]},
    ]
    ids = chat.prompt_ids(example.image, example.question)
    mask = [0] * len(ids)
    box, names = None, []
    for k, text in enumerate(turns):
        calls_tool = text.rstrip().endswith(TOOL_CALL_CLOSE)
        if calls_tool != (k < len(turns) - 1):
            raise ValueError(f"scripted turn {k}: every turn but the last must end with a "
                             "tool call")
        turn = chat.encode(text) + ([] if calls_tool else [chat.im_end_id])
        ids.extend(turn)
        mask.extend([1] * len(turn))
        messages.append({"role": "assistant", "content": [{"type": "text", "text": text}]})
        if not calls_tool:
            break
        parsed = tools.parse(find_tool_call(text) or "")
        out = tools.run(parsed, example.image, ToolContext(
            images=list(images), question=example.question, turn=k, settings=settings))
        names.append(parsed.name)
        if parsed.bbox is not None and box is None:  # the first zoom's box, as asked
            box = parsed.bbox
        if out.image is not None:
            messages.append({"role": "tool", "content": [{"type": "image",
                                                          "image": len(images)}]})
            images.append(out.image)
            obs = chat.observation_ids(out.image, None)
        else:
            shown = out.error if out.error is not None else out.text
            messages.append({"role": "tool", "content": [{"type": "text", "text": shown}]})
            obs = chat.observation_ids(None, shown)
        ids.extend(obs)
        mask.extend([0] * len(obs))
    return Demo(ids, mask, images, messages, box,
                meta={"id": example.id, "answer": example.answer,
                      "target_box": list(example.target_box or ()), "tools": names})


def _text_of(message: dict[str, Any]) -> str:
    return "".join(item["text"] for item in message["content"] if item["type"] == "text")


def _images_of(message: dict[str, Any]) -> list[int]:
    return [item["image"] for item in message["content"] if item["type"] == "image"]


def demo_from_messages(messages: list[dict[str, Any]], images: list[Image.Image],
                       chat: ChatFormat) -> Demo:
    """Token ids and loss mask of a message list (system, user, then assistant/tool).

    Supported shape: the agent's. One system message, one user message with one image
    and the question, then assistant turns; an assistant turn that ends with
    ``</tool_call>`` is followed by one tool message (a crop image or an error text),
    any other assistant turn is final and ends with ``<|im_end|>`` (loss 1).
    """
    if len(messages) < 3 or [m["role"] for m in messages[:2]] != ["system", "user"]:
        raise ValueError("messages must start with a system and a user message")
    system = _text_of(messages[0])
    if system != chat.system_prompt:
        chat = dataclasses.replace(chat, system_prompt=system)
    user_images = _images_of(messages[1])
    if len(user_images) != 1:
        raise ValueError(f"the user message must hold exactly one image, got {user_images}")
    ids = chat.prompt_ids(images[user_images[0]], _text_of(messages[1]))
    mask = [0] * len(ids)

    rest = messages[2:]
    i = 0
    while i < len(rest):
        msg = rest[i]
        if msg["role"] != "assistant":
            raise ValueError(f"expected an assistant message at {i + 2}, got {msg['role']!r}")
        text = _text_of(msg)
        calls_tool = text.rstrip().endswith(TOOL_CALL_CLOSE)
        turn = chat.encode(text) + ([] if calls_tool else [chat.im_end_id])
        ids.extend(turn)
        mask.extend([1] * len(turn))
        if not calls_tool:
            if i != len(rest) - 1:
                raise ValueError("an assistant turn without a tool call must be the last")
            break
        if i + 1 >= len(rest) or rest[i + 1]["role"] != "tool":
            raise ValueError(f"assistant turn {i + 2} calls a tool but no tool message follows")
        tool = rest[i + 1]
        crops = _images_of(tool)
        obs = chat.observation_ids(images[crops[0]] if crops else None,
                                   None if crops else _text_of(tool))
        ids.extend(obs)
        mask.extend([0] * len(obs))
        i += 2
    return Demo(ids, mask, list(images), messages)


# ---- jsonl rows ---------------------------------------------------------------------

def _png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "base64:" + base64.b64encode(buf.getvalue()).decode("ascii")


def demo_to_row(demo: Demo) -> dict[str, Any]:
    """One jsonl row: messages, images as base64 PNG, meta."""
    return {"messages": demo.messages, "images": [_png_b64(im) for im in demo.images],
            "box": list(demo.box) if demo.box else None, "meta": demo.meta}


def demo_from_row(row: dict[str, Any], chat: ChatFormat) -> Demo:
    images = []
    for s in row["images"]:
        data = base64.b64decode(s.removeprefix("base64:"))
        with Image.open(io.BytesIO(data)) as im:
            images.append(im.convert("RGB"))
    demo = demo_from_messages(row["messages"], images, chat)
    demo.box = tuple(row["box"]) if row.get("box") else None
    demo.meta = dict(row.get("meta") or {})
    return demo
