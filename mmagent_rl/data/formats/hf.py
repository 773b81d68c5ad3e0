"""hf: Hugging Face ``datasets`` data, read with the ``datasets`` library.

The path is one of:

- a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``;
- parquet or arrow shards: one file, a folder of them, or a glob (``data/*.parquet``).

A DatasetDict (or shards named ``train-*``, ``test-*``, ...) gives several splits:
``data.split`` picks one; without it training reads ``train`` and an eval reads
``test``, else ``validation``, else the only split there is.

Columns (the first one present; ``data.columns`` renames any, e.g.
``data.columns={question: prompt_text}``):

    image      image | images       an Image feature, a list of them, bytes or paths
    question   question | problem | query
    answer     answer | solution | label   (a number is taken as its text)
    choices    choices | options    optional: rendered into the question
    category, id, answer_type, system_prompt, target_box   optional
"""
from __future__ import annotations

import glob
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmagent_rl.data.datasets import LoadContext, _SkipRow
from mmagent_rl.data.formats.common import example_from_fields, options_from, pick
from mmagent_rl.example import Example

SHARD_SUFFIXES = (".parquet", ".arrow")
_SPLIT_NAMES = ("train", "test", "validation", "val", "dev", "testmini")
_EVAL_SPLITS = ("test", "validation", "val", "testmini", "dev")


def is_glob(path: Path) -> bool:
    return any(c in str(path) for c in "*?[")


def shard_files(path: Path) -> list[Path]:
    """The .parquet / .arrow files under a folder (recursively), or of a glob."""
    if is_glob(path):
        found = [Path(p) for p in glob.glob(str(path), recursive=True)]
    elif path.is_dir():
        found = [p for p in path.rglob("*") if not any(s.startswith(".") for s in p.parts)]
    else:
        found = [path]
    return sorted(p for p in found if p.is_file() and p.suffix.lower() in SHARD_SUFFIXES)


def pick_split(available: list[str], ctx: LoadContext) -> str:
    """``data.split``, else train (training) / test, validation (eval), else the only one."""
    if ctx.split is not None:
        if ctx.split not in available:
            raise ValueError(f"{ctx.path}: data.split={ctx.split!r} is not one of its "
                             f"splits {available}")
        return ctx.split
    for name in ("train",) if ctx.purpose == "train" else _EVAL_SPLITS:
        if name in available:
            return name
    if len(available) == 1:
        return available[0]
    raise ValueError(f"{ctx.path} holds the splits {available}: set data.split")


def _split_of(file: Path) -> str | None:
    m = re.match(r"[A-Za-z]+", file.stem)
    if m and m.group().lower() in _SPLIT_NAMES:
        return m.group().lower()
    return file.parent.name.lower() if file.parent.name.lower() in _SPLIT_NAMES else None


def _open(ctx: LoadContext):
    """An IterableDataset over the chosen split, images left undecoded."""
    import datasets

    path = ctx.path
    if path.is_dir() and any((path / m).is_file() for m in
                             ("dataset_info.json", "state.json", "dataset_dict.json")):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[pick_split(list(ds), ctx)]
        return ds.to_iterable_dataset().decode(False)
    files = shard_files(path)
    if not files:
        raise ValueError(f"{path}: no .parquet/.arrow shards and not a datasets folder "
                         "(save_to_disk)")
    kinds = {f.suffix.lower() for f in files}
    if len(kinds) > 1:
        raise ValueError(f"{path}: mixes .parquet and .arrow shards; point at one kind")
    by_split: dict[str, list[str]] = {}
    for f in files:
        by_split.setdefault(_split_of(f) or "all", []).append(str(f))
    if set(by_split) != {"all"}:
        by_split.pop("all", None)  # README-less extras next to named split shards
        files = by_split[pick_split(sorted(by_split), ctx)]
    else:
        files = by_split["all"]
    ds = datasets.load_dataset(kinds.pop().lstrip("."), data_files=files, split="train",
                               streaming=True)  # streamed: no copy into the HF cache
    return ds.decode(False)


def iter_rows(ctx: LoadContext) -> Iterator[tuple[int, Any]]:
    if not is_glob(ctx.path) and not ctx.path.exists():
        raise ValueError(f"data path {ctx.path} does not exist")
    for row_no, row in enumerate(_open(ctx), start=1):
        yield row_no, row


def to_example(row: Any, row_no: int, ctx: LoadContext) -> Example:
    if not isinstance(row, dict):
        raise _SkipRow("not_an_object", type(row).__name__)
    _, images = pick(row, ctx, "image", ("image", "images"))
    _, question = pick(row, ctx, "question", ("question", "problem", "query"))
    _, answer = pick(row, ctx, "answer", ("answer", "solution", "label"))
    for role, value in (("image", images), ("question", question), ("answer", answer)):
        if value is None:
            raise _SkipRow(f"missing_column:{role}")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    options = options_from(pick(row, ctx, "choices", ("choices", "options"))[1])
    return example_from_fields(ctx, row, row_no, images, question, answer, options=options)
