"""vstar: V*-Bench style jsonl next to its image folder.

    {"image": "direct_attributes/sa_4690.jpg",
     "text": "What is the color of the ...?\\n(A) red\\n(B) blue\\nAnswer with the
              option's letter from the given choices directly.",   (one line)
     "label": "A", "question_id": 0, "category": "direct_attributes"}

The text is the question as given (its options already in it); the label is the
answer, a "choice" when it is a letter. The other accepted form has ``question`` +
``options`` (a list) + ``answer`` (a letter or an option's text): the options are
then rendered like every other multiple-choice format. Image paths are relative to
the jsonl's folder, or to data.image_root.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from mmagent_rl.data.datasets import LoadContext, _iter_jsonl, _SkipRow, build_example
from mmagent_rl.data.formats.common import choice_letter, options_from, render_choices
from mmagent_rl.example import Example


def iter_rows(ctx: LoadContext) -> Iterator[tuple[int, Any]]:
    return _iter_jsonl(ctx.path)


def to_example(row: Any, row_no: int, ctx: LoadContext) -> Example:
    if not isinstance(row, dict):
        raise _SkipRow("not_an_object", type(row).__name__)
    if row.get("image") is None:
        raise _SkipRow("missing_column:image")
    if "text" in row:
        question, answer = row.get("text"), row.get("label")
        for column, value in (("text", question), ("label", answer)):
            if value is None:
                raise _SkipRow(f"missing_column:{column}")
        options = []
    else:
        question, answer = row.get("question"), row.get("answer")
        for column, value in (("question", question), ("answer", answer)):
            if value is None:
                raise _SkipRow(f"missing_column:{column}")
        options = options_from(row.get("options"))
    answer_type = None
    if options and isinstance(question, str) and isinstance(answer, str):
        question = render_choices(question, options)
        answer = choice_letter(answer, options)
        answer_type = "choice"
    elif isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().isalpha():
        answer, answer_type = answer.strip().upper(), "choice"
    row_id = row.get("question_id", row.get("id"))
    return build_example(ctx, row_no, [row["image"]], question, answer, row_id=row_id,
                         answer_type=answer_type, category=row.get("category"))
