"""Helpers the format readers share: multiple-choice rendering and column look-up."""
from __future__ import annotations

import math
import string
from typing import Any

from mmagent_rl.data.datasets import LoadContext, _SkipRow, build_example
from mmagent_rl.example import Example

CHOICE_INSTRUCTION = "Answer with the option's letter."
LETTERS = string.ascii_uppercase


def render_choices(question: str, options: list[tuple[str, str]]) -> str:
    """The question, one ``"A. option"`` line per option, then the instruction:

        What colour is the car?
        A. red
        B. blue
        Answer with the option's letter.
    """
    lines = [question.rstrip(), *(f"{letter}. {text}" for letter, text in options)]
    return "\n".join([*lines, CHOICE_INSTRUCTION])


def options_from(value: Any) -> list[tuple[str, str]]:
    """``[(letter, text)]`` from a list of options (lettered A, B, ... in order) or a
    ``{letter: text}`` dict; [] for none."""
    if value is None:
        return []
    if isinstance(value, dict):
        items = sorted((str(k).strip().upper(), v) for k, v in value.items())
        if any(len(k) != 1 or k not in LETTERS for k, _ in items):
            raise _SkipRow("bad_choices", f"keys {[k for k, _ in items]!r:.80}")
    elif isinstance(value, (list, tuple)):
        if len(value) > len(LETTERS):
            raise _SkipRow("bad_choices", f"{len(value)} options")
        items = list(zip(LETTERS, value))
    else:
        raise _SkipRow("wrong_type:choices", type(value).__name__)
    if any(not isinstance(text, (str, int, float)) or isinstance(text, bool)
           for _, text in items):
        raise _SkipRow("bad_choices", "an option is not text")
    return [(k, str(t).strip()) for k, t in items]


def choice_letter(answer: str, options: list[tuple[str, str]]) -> str:
    """The option letter ``answer`` names: a letter ("B", "(B)", "b.") or an option's
    text ("blue"); else the row is skipped as ``bad_choice_answer``."""
    core = answer.strip().strip("()[]. :").upper()
    letters = [k for k, _ in options]
    if len(core) == 1 and core in letters:
        return core
    by_text = [k for k, t in options if t.strip().casefold() == answer.strip().casefold()]
    if len(by_text) == 1:
        return by_text[0]
    raise _SkipRow("bad_choice_answer", f"{answer!r:.40} is not one of {letters}")


def is_blank(value: Any) -> bool:
    """None, NaN, or a string that is empty / "nan" / "none" (pandas-written cells)."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    return isinstance(value, str) and value.strip().lower() in ("", "nan", "none")


def pick(row: dict, ctx: LoadContext, role: str, aliases: tuple[str, ...]) -> tuple[str, Any]:
    """(column, value) for ``role``: ``data.columns[role]`` if set, else the first alias
    the row has a value in; (first alias, None) when there is none."""
    names = (ctx.columns[role],) if role in ctx.columns else aliases
    for name in names:
        if row.get(name) is not None:
            return name, row[name]
    return names[0], None


def example_from_fields(ctx: LoadContext, row: dict, row_no: int, images: list,
                        question: Any, answer: Any, *, options: list[tuple[str, str]],
                        source: str | None = None) -> Example:
    """rows and hf: renders ``options`` into the question (answer -> its letter) and
    reads the optional columns ``id``, ``answer_type``, ``category``,
    ``system_prompt``, ``target_box`` (each renamable through ``data.columns``)."""
    answer_type = pick(row, ctx, "answer_type", ("answer_type",))[1]
    if options and isinstance(question, str) and isinstance(answer, str):
        question = render_choices(question, options)
        answer = choice_letter(answer, options)
        answer_type = answer_type or "choice"
    return build_example(
        ctx, row_no, images, question, answer,
        row_id=pick(row, ctx, "id", ("id",))[1],
        answer_type=answer_type,
        category=pick(row, ctx, "category", ("category",))[1],
        system_prompt=pick(row, ctx, "system_prompt", ("system_prompt",))[1],
        target_box=pick(row, ctx, "target_box", ("target_box",))[1],
        source=source)
