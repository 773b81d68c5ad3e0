"""rows: the project's own schema, one row per example, in .jsonl or .parquet.

    {"image": path | bytes | {"bytes": ...} | "base64:<data>",   # or "images": [...]
     "question": str, "answer": str,
     "choices": [str, ...],          # optional (or "options"): multiple choice
     "answer_type": "exact" | "choice" | "number",   # optional (else inferred)
     "category": str, "id": str | int, "system_prompt": str,     # optional
     "target_box": [x1, y1, x2, y2]}                             # optional, pixels

With ``images`` the question holds one ``<image>`` per image (or none). With choices
the options are rendered into the question and the answer (a letter or an option's
text) becomes the letter.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from mmagent_rl.data.datasets import LoadContext, _iter_jsonl, _iter_parquet, _SkipRow
from mmagent_rl.data.formats.common import example_from_fields, options_from, pick
from mmagent_rl.example import Example


def iter_rows(ctx: LoadContext) -> Iterator[tuple[int, Any]]:
    suffix = ctx.path.suffix.lower()
    if suffix == ".jsonl":
        return _iter_jsonl(ctx.path)
    if suffix == ".parquet":
        return _iter_parquet(ctx.path)
    raise ValueError(f"unknown data file extension {suffix!r} for {ctx.path}: "
                     "data.format=rows reads .jsonl or .parquet")


def to_example(row: Any, row_no: int, ctx: LoadContext) -> Example:
    if not isinstance(row, dict):
        raise _SkipRow("not_an_object", type(row).__name__)
    if row.get("image") is not None:
        images = [row["image"]]  # one value; a list here is a wrong type, not images
    elif row.get("images") is not None:
        images = row["images"]
        if not isinstance(images, (list, tuple)):
            raise _SkipRow("wrong_type:images", type(images).__name__)
    else:
        raise _SkipRow("missing_column:image")
    for column in ("question", "answer"):
        if row.get(column) is None:
            raise _SkipRow(f"missing_column:{column}")
    options = options_from(pick(row, ctx, "choices", ("choices", "options"))[1])
    return example_from_fields(ctx, row, row_no, list(images), row["question"],
                               row["answer"], options=options)
