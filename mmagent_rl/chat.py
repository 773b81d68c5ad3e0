"""Token-level chat format shared by rollout, SFT demonstrations and the learner (a
contract at the bottom of the package: every wing imports it, it imports no wing).

Turns are built as token ids directly (never by re-rendering the whole chat), so what
the learner trains on is exactly what the engine saw. In these ids every image is a run
of ``<|image_pad|>`` tokens, one per merged vision token; the vLLM engine takes the
same ids with each run collapsed to a single pad (:func:`collapse_image_runs`), which
it expands itself (passing the expanded run makes it expand every pad again).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from PIL import Image

from mmagent_rl.example import IMAGE_PLACEHOLDER

# Structural tokens the policy must never sample (a sampled <|image_pad|> would break
# the image/placeholder bookkeeping). Engine and learner add the same bias so that
# engine and learner log-probs stay identical.
BANNED_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>")
BANNED_LOGIT_BIAS = -100.0

DEFAULT_SYSTEM_PROMPT = (
    "You can zoom into the image: <tool_call>{\"name\": \"image_zoom_in_tool\", "
    "\"arguments\": {\"bbox_2d\": [x1, y1, x2, y2], \"label\": \"what you expect to "
    "see\"}}</tool_call>, with the box in pixels of the original image. "
    "Answer as <answer>...</answer>."
)


# The tools section of Qwen's chat templates (Qwen2.5 / Qwen3 / Qwen3-VL: ``tools=`` of
# apply_chat_template), which follows the system prompt when tools are offered. The
# model answers in the format our parser reads (mmagent_rl/tools/parse.py).
TOOLS_HEADER = ("# Tools\n\nYou may call one or more functions to assist with the user "
                "query.\n\nYou are provided with function signatures within <tools></tools> "
                "XML tags:\n<tools>")
TOOLS_FOOTER = ("\n</tools>\n\nFor each function call, return a json object with function "
                "name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def _tool_lines(schemas: list[dict]) -> str:
    """One JSON line per tool, as the templates' ``tojson`` writes it."""
    return "".join("\n" + json.dumps(s, ensure_ascii=False) for s in schemas)


def render_tools_section(schemas: list[dict]) -> str:
    """The ``# Tools`` section for ``schemas`` (OpenAI function format), rendered here:
    for tokenizers whose chat template ignores ``tools=`` (the tiny models')."""
    return TOOLS_HEADER + _tool_lines(schemas) + TOOLS_FOOTER


def system_with_tools(tokenizer, system: str, schemas: list[dict]) -> str:
    """The system turn's text with the tools offered: the checkpoint's own chat template
    when it renders ``tools=`` (its system turn is taken from the rendering), else
    ``system``, a blank line and :func:`render_tools_section` (Qwen's layout)."""
    if schemas and getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "system", "content": system}, {"role": "user", "content": "?"}],
                tools=schemas, tokenize=False, add_generation_prompt=False)
        except Exception:  # noqa: BLE001 - a template that cannot take tools
            text = ""
        head = "<|im_start|>system\n"
        start = text.find(head) if isinstance(text, str) else -1
        end = text.find("<|im_end|>", start) if start >= 0 else -1
        if end >= 0:
            rendered = text[start + len(head):end]
            if system in rendered and all(s["function"]["name"] in rendered for s in schemas):
                return rendered
    if not schemas:
        return system
    return f"{system}\n\n{render_tools_section(schemas)}" if system else \
        render_tools_section(schemas)


@dataclass
class ChatFormat:
    """Builds prompt / observation ids for a Qwen-VL style tokenizer + processor."""

    tokenizer: object
    image_processor: object
    system_prompt: str = DEFAULT_SYSTEM_PROMPT

    def __post_init__(self) -> None:
        tok = self.tokenizer
        self.image_token_id = tok.convert_tokens_to_ids("<|image_pad|>")
        self.vision_start_id = tok.convert_tokens_to_ids("<|vision_start|>")
        self.vision_end_id = tok.convert_tokens_to_ids("<|vision_end|>")
        self.im_end_id = tok.convert_tokens_to_ids("<|im_end|>")
        self.tool_call_open_id = tok.convert_tokens_to_ids("<tool_call>")
        self.tool_call_close_id = tok.convert_tokens_to_ids("</tool_call>")
        self.banned_ids = sorted({tok.convert_tokens_to_ids(t) for t in BANNED_TOKENS
                                  if tok.convert_tokens_to_ids(t) is not None})
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.im_end_id
        ip = self.image_processor
        size = getattr(ip, "size", None) or {}
        self.min_pixels = getattr(ip, "min_pixels", None) or size.get("shortest_edge")
        self.max_pixels = getattr(ip, "max_pixels", None) or size.get("longest_edge")
        self.patch_size = ip.patch_size
        self.merge_size = ip.merge_size

    @classmethod
    def from_pretrained(cls, path: str, system_prompt: str | None = None) -> "ChatFormat":
        from transformers import AutoProcessor

        proc = AutoProcessor.from_pretrained(path)
        kw = {} if system_prompt is None else {"system_prompt": system_prompt}
        return cls(proc.tokenizer, proc.image_processor, **kw)

    def with_tools(self, schemas: list[dict]) -> "ChatFormat":
        """A copy whose system prompt offers ``schemas`` (:func:`system_with_tools`);
        itself when it already does."""
        if not schemas or _tool_lines(schemas) in self.system_prompt:
            return self
        return dataclasses.replace(
            self, system_prompt=system_with_tools(self.tokenizer, self.system_prompt, schemas))

    # ---- images -------------------------------------------------------------------
    def image_grid(self, image: Image.Image) -> tuple[int, int, int]:
        """(t, h, w) patch grid the processor will produce, without running it."""
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        factor = self.patch_size * self.merge_size
        h, w = smart_resize(image.height, image.width, factor=factor,
                            min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        return 1, h // self.patch_size, w // self.patch_size

    def num_image_tokens(self, image: Image.Image) -> int:
        t, h, w = self.image_grid(image)
        return t * h * w // (self.merge_size ** 2)

    def image_ids(self, image: Image.Image) -> list[int]:
        return [self.vision_start_id] + [self.image_token_id] * self.num_image_tokens(image) \
            + [self.vision_end_id]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    # ---- turns ----------------------------------------------------------------------
    def prompt_ids(self, images: Image.Image | list[Image.Image], question: str,
                   system_prompt: str | None = None) -> list[int]:
        """System turn, then the user turn: the images where the question's ``<image>``
        placeholders are (one per image), or all before the text if it has none."""
        images = [images] if isinstance(images, Image.Image) else list(images)
        system = self.system_prompt if system_prompt is None else system_prompt
        ids = self.encode(f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n")
        parts = question.split(IMAGE_PLACEHOLDER)
        if len(parts) == 1:
            parts = [""] * len(images) + parts
        elif len(parts) != len(images) + 1:
            raise ValueError(f"the question has {len(parts) - 1} {IMAGE_PLACEHOLDER} "
                             f"placeholders for {len(images)} images")
        for text, image in zip(parts, images):
            if text:
                ids += self.encode(text)
            ids += self.image_ids(image)
        ids += self.encode(f"{parts[-1]}<|im_end|>\n<|im_start|>assistant\n")
        return ids

    def observation_ids(self, crop: Image.Image | None, error: str | None) -> list[int]:
        """Tokens after a tool-call turn: close the turn, the tool's reply, reopen."""
        ids = self.encode("<|im_end|>\n<|im_start|>user\n<tool_response>")
        if crop is not None:
            ids += self.image_ids(crop)
        else:
            ids += self.encode(error or "Error: no result")
        ids += self.encode("</tool_response><|im_end|>\n<|im_start|>assistant\n")
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def collapse_image_runs(ids: list[int], image_token_id: int) -> list[int]:
    """Each run of image pads -> one pad: the form the vLLM engine expects."""
    out: list[int] = []
    for t in ids:
        if t == image_token_id and out and out[-1] == image_token_id:
            continue
        out.append(t)
    return out


def pixel_kwargs(min_pixels: int | None, max_pixels: int | None) -> dict:
    """Processor keyword arguments for the set bounds (HF processors and vLLM's Qwen-VL
    mm_processor_kwargs both take ``min_pixels`` / ``max_pixels``)."""
    return {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels))
            if v is not None}


def load_chat(model_path: str, system_prompt: str | None = None,
              processor_kwargs: dict | None = None) -> ChatFormat:
    """ChatFormat whose image processor takes ``processor_kwargs`` (min/max_pixels)."""
    if not processor_kwargs:
        return ChatFormat.from_pretrained(model_path, system_prompt)
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(model_path, **processor_kwargs)
    kw = {} if system_prompt is None else {"system_prompt": system_prompt}
    return ChatFormat(proc.tokenizer, proc.image_processor, **kw)


def chat_with_processor_kwargs(chat: ChatFormat, model_path: str | None,
                               processor_kwargs: dict | None) -> ChatFormat:
    """``chat`` with its image processor rebuilt for ``processor_kwargs`` (unchanged
    when there are none)."""
    if not processor_kwargs or model_path is None:
        return chat
    new = load_chat(model_path, None, processor_kwargs)
    return ChatFormat(chat.tokenizer, new.image_processor, chat.system_prompt)
