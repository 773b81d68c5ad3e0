"""verl: the verl / EasyR1 RL parquet (DeepEyes-47k, ViRL39K ship it this way).

    prompt        [{"role": "system", "content": str}, {"role": "user", "content": str}]
                  the user text holds one "<image>" per image (or none)
    images        [{"bytes": b"...", "path": ...}, ...] or ["a.jpg", ...]
    reward_model  {"ground_truth": str, "style": "rule"}
    data_source   str                       -> meta["source"], and the category
    extra_info    {"index": int, "question": str, "answer": str, ...}   (optional)

The question is the user message as written (placeholders kept); the system message
becomes ``Example.system_prompt`` (used with data.system_prompt=keep). The ground
truth is ``reward_model.ground_truth``, else ``extra_info.answer``. A message content
may also be a list of parts ({"type": "text", "text": ...} / {"type": "image"}).
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from mmagent_rl.data.datasets import (ANSWER_TYPES, LoadContext, _iter_jsonl, _iter_parquet,
                                      _SkipRow, build_example)
from mmagent_rl.example import IMAGE_PLACEHOLDER, Example


def iter_rows(ctx: LoadContext) -> Iterator[tuple[int, Any]]:
    if ctx.path.suffix.lower() == ".jsonl":
        return _iter_jsonl(ctx.path)
    return _iter_parquet(ctx.path)


def _text(content: Any) -> str:
    """A message's text: a string, or its parts joined (image parts -> <image>)."""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        out = []
        for part in content:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict) and part.get("type") == "text":
                out.append(str(part.get("text") or ""))
            elif isinstance(part, dict) and part.get("type") in ("image", "image_url"):
                out.append(IMAGE_PLACEHOLDER)
            else:
                raise _SkipRow("bad_prompt", f"a content part {part!r:.60}")
        return "".join(out)
    raise _SkipRow("bad_prompt", f"content of type {type(content).__name__}")


def _messages(prompt: Any) -> tuple[str | None, str]:
    """(system text or None, the user text) of a chat prompt."""
    if isinstance(prompt, str):  # a bare question string
        return None, prompt
    if not isinstance(prompt, (list, tuple)) or not all(isinstance(m, dict) for m in prompt):
        raise _SkipRow("wrong_type:prompt", type(prompt).__name__)
    system = [_text(m.get("content")) for m in prompt if m.get("role") == "system"]
    user = [_text(m.get("content")) for m in prompt if m.get("role") == "user"]
    if len(user) != 1 or len(system) > 1:
        raise _SkipRow("bad_prompt", f"{len(user)} user and {len(system)} system messages")
    return (system[0] if system else None), user[0]


def _ground_truth(row: dict, extra: dict) -> str:
    rm = row.get("reward_model")
    gt = rm.get("ground_truth") if isinstance(rm, dict) else None
    if gt is None:
        gt = extra.get("answer")
    if isinstance(gt, (list, tuple)) and len(gt) == 1:  # ["B"]
        gt = gt[0]
    if isinstance(gt, (int, float)) and not isinstance(gt, bool):
        gt = str(gt)
    if gt is None or (isinstance(gt, str) and not gt.strip()):
        raise _SkipRow("missing_ground_truth")
    if not isinstance(gt, str):
        raise _SkipRow("wrong_type:ground_truth", type(gt).__name__)
    return gt


def to_example(row: Any, row_no: int, ctx: LoadContext) -> Example:
    if not isinstance(row, dict):
        raise _SkipRow("not_an_object", type(row).__name__)
    if row.get("prompt") is None:
        raise _SkipRow("missing_column:prompt")
    images = row.get("images")
    if images is None:
        raise _SkipRow("missing_column:images")
    if isinstance(images, (str, dict, bytes)):
        images = [images]  # one image given bare
    extra = row.get("extra_info") if isinstance(row.get("extra_info"), dict) else {}
    system, question = _messages(row["prompt"])
    answer = _ground_truth(row, extra)
    source = row.get("data_source") if isinstance(row.get("data_source"), str) else None
    row_id = extra.get("index", extra.get("id"))
    answer_type = extra.get("answer_type")
    return build_example(
        ctx, row_no, list(images), question, answer,
        row_id=row_id if isinstance(row_id, (str, int)) and not isinstance(row_id, bool)
        else None,
        system_prompt=system,
        answer_type=answer_type if answer_type in ANSWER_TYPES else None,
        category=extra.get("category") or source,
        source=source)
