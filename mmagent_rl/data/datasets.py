"""Load real (image, question, answer) rows from .jsonl or .parquet.

Row schema::

    {"image": path | bytes | {"bytes": ...} | "base64:<data>",
     "question": str, "answer": str,
     "target_box": [x1, y1, x2, y2],   # optional, pixels
     "id": str | int}                  # optional

A relative image path is resolved against the data file's folder. A bad row is
skipped and counted by reason, with one logged warning per reason; it never stops
the load, unless nothing usable is left.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import math
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageFile

from mmagent_rl.example import Example
from mmagent_rl.tools.zoom import is_valid_box

log = logging.getLogger(__name__)

BASE64_PREFIX = "base64:"


@dataclass
class LoadResult:
    examples: list[Example]
    skipped: Counter = field(default_factory=Counter)  # reason -> number of rows


class _SkipRow(Exception):
    """Internal: the row is unusable; ``reason`` is the counter key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open("r", encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue  # blank lines are not rows
            try:
                yield line_no, json.loads(line)
            except (ValueError, RecursionError) as exc:
                yield line_no, _SkipRow("bad_json", str(exc)[:100])


def _iter_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq  # lazy: only parquet users need pyarrow

    row_no = 0
    pf = pq.ParquetFile(path)
    for group in range(pf.num_row_groups):  # one at a time: a corrupt one ends the read there
        for batch in pf.iter_batches(batch_size=256, row_groups=[group]):
            for row in batch.to_pylist():
                row_no += 1
                yield row_no, row


def _image_bytes(value: Any, base_dir: Path, max_bytes: int = 2**62) -> bytes:
    """The encoded image file for any supported ``image`` value."""
    if isinstance(value, dict):  # e.g. the HF datasets Image feature {"bytes", "path"}
        value = value.get("bytes") if value.get("bytes") is not None else value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if not isinstance(value, str) or not value:
        raise _SkipRow("wrong_type:image", type(value).__name__)
    if value.startswith(BASE64_PREFIX):
        try:
            return base64.b64decode(value[len(BASE64_PREFIX):], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise _SkipRow("image_bad_base64", str(exc)) from None
    file = Path(value) if Path(value).is_absolute() else base_dir / value
    try:
        if not file.is_file():  # a directory, a FIFO (would block), /dev/zero (endless)
            if not file.exists():
                raise FileNotFoundError(value)
            raise _SkipRow("image_unreadable", f"{file}: not a regular file")
        if file.stat().st_size > max_bytes:
            raise _SkipRow("image_file_too_big", f"{file}: {file.stat().st_size} bytes")
        return file.read_bytes()
    except FileNotFoundError:
        raise _SkipRow("image_file_not_found", str(file)) from None
    except (OSError, ValueError) as exc:  # no permission, a NUL in the path, ...
        raise _SkipRow("image_unreadable", f"{file}: {exc}"[:200]) from None


def _decode_image(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise _SkipRow("image_empty_file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            # Check the header's size before decoding anything big.
            if img.width * img.height > max_pixels:
                raise _SkipRow("image_too_large", f"{img.width}x{img.height}")
            if img.width == 0 or img.height == 0:
                raise _SkipRow("image_zero_size")
            img.load()  # decode now: truncated data fails here, not in a rollout
            return img.convert("RGB")
    except _SkipRow:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _SkipRow("image_too_large", str(exc)[:100]) from None
    except Image.UnidentifiedImageError:
        raise _SkipRow("image_not_an_image") from None
    except Exception as exc:  # PIL decoders raise OSError, SyntaxError, ValueError, ...
        raise _SkipRow("image_corrupt", f"{type(exc).__name__}: {exc}"[:100]) from None


def _target_box(value: Any, width: int, height: int) -> tuple[int, int, int, int] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not is_valid_box(list(value), width, height):
        raise _SkipRow("bad_target_box", f"{value!r:.80} for a {width}x{height} image")
    x1, y1, x2, y2 = value
    # Outward rounding keeps the whole marked region inside the box.
    return (math.floor(x1), math.floor(y1), math.ceil(x2), math.ceil(y2))


def _row_to_example(row: Any, row_no: int, base_dir: Path, stem: str, max_pixels: int,
                    max_bytes: int = 2**62) -> Example:
    if isinstance(row, _SkipRow):
        raise row
    if not isinstance(row, dict):
        raise _SkipRow("not_an_object", type(row).__name__)
    for column in ("image", "question", "answer"):
        if row.get(column) is None:
            raise _SkipRow(f"missing_column:{column}")
    for column in ("question", "answer"):
        if not isinstance(row[column], str):
            raise _SkipRow(f"wrong_type:{column}", type(row[column]).__name__)
        if not row[column].strip():
            raise _SkipRow(f"empty:{column}")
    row_id = row.get("id")
    if row_id is not None and (isinstance(row_id, bool) or not isinstance(row_id, (str, int))):
        raise _SkipRow("wrong_type:id", type(row_id).__name__)

    image = _decode_image(_image_bytes(row["image"], base_dir, max_bytes), max_pixels)
    return Example(
        id=str(row_id) if row_id is not None else f"{stem}-{row_no}",
        image=image,
        question=row["question"],
        answer=row["answer"],
        target_box=_target_box(row.get("target_box"), *image.size),
        meta={"source": stem, "row": row_no},
    )


def load_examples(path: str | Path, max_image_pixels: int = 64_000_000,
                  max_image_bytes: int = 256 * 2**20) -> LoadResult:
    """Load every usable row of a .jsonl or .parquet file; see the module docstring.

    Raises ValueError for an unknown extension, a missing or unreadable data file, or
    when no row is usable. If the file breaks part-way (a corrupt parquet row group),
    the rows read so far are kept and the rest is counted as ``file_read_error``.
    """
    path = Path(path)
    readers = {".jsonl": _iter_jsonl, ".parquet": _iter_parquet}
    if path.suffix.lower() not in readers:
        raise ValueError(f"unknown data file extension {path.suffix!r} for {path}; "
                         f"expected one of {sorted(readers)}")
    if not path.is_file():
        raise ValueError(f"data file {path} does not exist or is not a regular file")

    examples: list[Example] = []
    skipped: Counter = Counter()
    first_detail: dict[str, str] = {}
    saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    # PIL's bomb check uses a process-wide limit: raise it to ours while loading (and
    # turn its warning into an error) so max_image_pixels is what decides. Truncated
    # images must fail even if some library allowed them process-wide.
    # Not thread-safe; loading happens once, at start-up.
    Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = max_image_pixels, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            rows = readers[path.suffix.lower()](path)
            row_no = 0
            while True:
                try:
                    row_no, row = next(rows)
                except StopIteration:
                    break
                except Exception as exc:  # the file itself: not a parquet file, cut, ...
                    if not examples:
                        raise ValueError(f"cannot read data file {path}: "
                                         f"{type(exc).__name__}: {exc}"[:500]) from exc
                    skipped["file_read_error"] += 1
                    first_detail["file_read_error"] = \
                        f"after row {row_no}: {type(exc).__name__}: {exc}"[:200]
                    break
                try:
                    examples.append(_row_to_example(row, row_no, path.parent, path.stem,
                                                    max_image_pixels, max_image_bytes))
                except _SkipRow as skip:
                    skipped[skip.reason] += 1
                    first_detail.setdefault(skip.reason, f"row {row_no} {skip.detail}".strip())
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved

    for reason, count in sorted(skipped.items()):
        log.warning("%s: skipped %d row(s) for %s (first: %s)",
                    path, count, reason, first_detail[reason])
    if not examples:
        raise ValueError(f"{path}: no usable rows; skipped by reason: {dict(skipped)}")
    return LoadResult(examples=examples, skipped=skipped)
