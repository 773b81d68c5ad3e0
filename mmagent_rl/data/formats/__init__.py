"""One reader per data format (``data.format``), all loading to :class:`Example`.

Each format module has ``iter_rows(ctx)``, yielding ``(row_no, row)`` (a row may be
a ``_SkipRow``), and ``to_example(row, row_no, ctx)``, raising ``_SkipRow`` for a bad
row; :func:`mmagent_rl.data.datasets.load_examples` runs them, counts the skipped rows
by reason and fails when nothing is usable. docs/data_formats.md shows every format.

``auto`` decides by the path:

- a folder with ``dataset_info.json`` / ``state.json`` / ``dataset_dict.json``, a
  folder of .parquet/.arrow shards, a glob, or an ``.arrow`` file: ``hf``
- ``.tsv``: ``tsv``
- ``.parquet``: ``verl`` if it has ``prompt`` and ``reward_model`` columns, ``rows``
  if it has ``image``/``images``, ``question`` and ``answer``, else ``hf``
- ``.jsonl``: ``vstar`` if its first row has ``text`` and ``label``, else ``rows``
"""
from __future__ import annotations

import json
from pathlib import Path

from mmagent_rl.data.formats import hf, rows, tsv, verl, vstar

FORMATS = {"rows": rows, "verl": verl, "hf": hf, "tsv": tsv, "vstar": vstar}
FORMAT_NAMES = ("auto", *FORMATS)
HF_FOLDER_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_FILE_SUFFIXES = (".jsonl", ".parquet", ".tsv", ".arrow")
_CHOOSE = f"set data.format to one of {list(FORMATS)}"


def resolve_format(path: Path, fmt: str) -> str:
    """``fmt``, or the sniffed format for ``auto``; a file format whose path is not a
    regular file is an error here."""
    if fmt not in FORMAT_NAMES:
        raise ValueError(f"data.format={fmt!r} is not valid; valid choices: "
                         f"{list(FORMAT_NAMES)}")
    name = sniff_format(path) if fmt == "auto" else fmt
    if name != "hf" and not path.is_file():
        raise ValueError(f"data file {path} does not exist or is not a regular file")
    return name


def sniff_format(path: Path) -> str:
    """The format ``data.format=auto`` reads ``path`` as (see the module docstring)."""
    if hf.is_glob(path):
        return "hf"
    suffix = path.suffix.lower()
    if suffix in _FILE_SUFFIXES:
        if not path.is_file():
            raise ValueError(f"data file {path} does not exist or is not a regular file")
        if suffix == ".tsv":
            return "tsv"
        if suffix == ".arrow":
            return "hf"
        if suffix == ".parquet":
            return _sniff_parquet(path)
        return _sniff_jsonl(path)
    if path.is_dir():
        if any((path / m).is_file() for m in HF_FOLDER_MARKERS) or hf.shard_files(path):
            return "hf"
        raise ValueError(f"{path}: a folder without {' / '.join(HF_FOLDER_MARKERS)} (a "
                         "datasets save_to_disk folder) and without .parquet/.arrow shards; "
                         f"data.format=auto cannot tell what it holds: {_CHOOSE}")
    if not path.exists():
        raise ValueError(f"data file {path} does not exist or is not a regular file")
    raise ValueError(f"unknown data file extension {suffix!r} for {path}: data.format=auto "
                     f"knows {list(_FILE_SUFFIXES)} and dataset folders; {_CHOOSE}")


def _sniff_parquet(path: Path) -> str:
    import pyarrow.parquet as pq

    try:
        names = set(pq.read_schema(path).names)
    except Exception as exc:
        raise ValueError(f"cannot read data file {path}: {type(exc).__name__}: {exc}"[:500]
                         ) from exc
    if {"prompt", "reward_model"} <= names:
        return "verl"
    if {"question", "answer"} <= names and names & {"image", "images"}:
        return "rows"
    return "hf"


def _sniff_jsonl(path: Path, max_lines: int = 20) -> str:
    """vstar if the first row that parses has ``text`` and ``label``; else rows (whose
    reader then counts any bad lines)."""
    with path.open("r", encoding="utf-8", errors="replace") as f:
        for _, line in zip(range(max_lines), f):
            try:
                row = json.loads(line)
            except (ValueError, RecursionError):
                continue
            if isinstance(row, dict):
                return "vstar" if {"text", "label"} <= row.keys() else "rows"
    return "rows"
