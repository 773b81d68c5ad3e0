"""tsv: VLMEvalKit benchmark files (HR-Bench 4K/8K, MME-RealWorld, MMBench, ...).

Tab-separated, one header row. Columns:

    index      the row's id
    image      the image file in base64; or, for a repeated image, the ``index`` of
               the row that holds it (a cell of at most 64 characters)
    image_path used when there is no image cell: a path (relative: to the file's
               folder or data.image_root)
    question   the question
    A, B, ...  the options (single capital letters; empty or NaN cells are left out)
    answer     the right option's letter (or its text); without options, the answer
    hint       optional: put before the question as "Hint: ..."
    category   -> meta["category"]; l2-category -> meta["l2_category"]

With options the question becomes "question\\nA. opt\\nB. opt\\n...\\nAnswer with the
option's letter." and the answer its letter (answer_type "choice").
"""
from __future__ import annotations

import csv
import sys
from collections.abc import Iterator
from typing import Any

from mmagent_rl.data.datasets import BASE64_PREFIX, LoadContext, _SkipRow, build_example
from mmagent_rl.data.formats.common import choice_letter, is_blank, render_choices
from mmagent_rl.example import Example

REF_MAX_CHARS = 64  # an image cell this short is a reference to another row's index


def _reader(f) -> csv.DictReader:
    return csv.DictReader(f, delimiter="\t")  # pandas' to_csv(sep="\t") quoting


def _is_ref(cell: str | None) -> bool:
    return cell is not None and 0 < len(cell.strip()) <= REF_MAX_CHARS


def iter_rows(ctx: LoadContext) -> Iterator[tuple[int, Any]]:
    """Two passes: the first finds which rows other rows point to (their image cells
    are then kept in memory, and only theirs); the second yields the rows, each
    reference replaced by the image it names. A reference to a later row is resolved
    once that row has been read."""
    saved = csv.field_size_limit()
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # base64 cells are megabytes
    try:
        with ctx.path.open("r", encoding="utf-8", errors="replace", newline="") as f:
            refs = {row["image"].strip() for row in _reader(f) if _is_ref(row.get("image"))}
        cache: dict[str, str] = {}
        waiting: list[tuple[int, dict]] = []
        with ctx.path.open("r", encoding="utf-8", errors="replace", newline="") as f:
            for row_no, row in enumerate(_reader(f), start=1):
                index, image = str(row.get("index") or "").strip(), row.get("image")
                if index in refs and image and not _is_ref(image):
                    cache[index] = image
                if _is_ref(image):
                    if image.strip() not in cache:
                        waiting.append((row_no, row))
                        continue
                    row["image"] = cache[image.strip()]
                yield row_no, row
        for row_no, row in waiting:
            ref = row["image"].strip()
            if ref not in cache:
                yield row_no, _SkipRow("image_ref_not_found", f"image -> index {ref!r:.40}")
                continue
            row["image"] = cache[ref]
            yield row_no, row
    finally:
        csv.field_size_limit(saved)


def _cell(row: dict, column: str) -> str | None:
    value = row.get(column)
    return None if is_blank(value) else value.strip()


def to_example(row: Any, row_no: int, ctx: LoadContext) -> Example:
    if None in row:  # csv puts cells past the header under the key None
        raise _SkipRow("bad_tsv_row", f"{len(row[None])} cell(s) more than the header")
    if _cell(row, "image"):
        image = BASE64_PREFIX + "".join(row["image"].split())
    elif _cell(row, "image_path"):
        image = _cell(row, "image_path")
    else:
        raise _SkipRow("missing_column:image")
    question, answer = _cell(row, "question"), _cell(row, "answer")
    for column, value in (("question", question), ("answer", answer)):
        if value is None:
            raise _SkipRow(f"missing_column:{column}")
    hint = _cell(row, "hint")
    if hint:
        question = f"Hint: {hint}\n{question}"
    options = sorted((k, _cell(row, k)) for k in row if len(k) == 1 and "A" <= k <= "Z"
                     and _cell(row, k) is not None)
    answer_type = None
    if options:
        question = render_choices(question, options)
        answer = choice_letter(answer, options)
        answer_type = "choice"
    index = _cell(row, "index")
    ex = build_example(ctx, row_no, [image], question, answer, row_id=index,
                       answer_type=answer_type, category=_cell(row, "category"))
    if _cell(row, "l2-category"):
        ex.meta["l2_category"] = _cell(row, "l2-category")
    return ex
