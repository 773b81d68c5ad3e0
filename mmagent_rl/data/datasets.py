"""Load real (image(s), question, answer) examples from data files.

``load_examples(path, fmt)`` reads one of several formats (``data.format``): ``rows``
(the project's own schema, below), ``verl`` (verl / EasyR1 parquet), ``hf`` (a
``datasets`` folder or shards), ``tsv`` (VLMEvalKit benchmarks) and ``vstar`` (V* jsonl
+ image folder); ``auto`` tells them apart by the path. Each format's reader lives in
:mod:`mmagent_rl.data.formats`; docs/data_formats.md shows them all.

Row schema of ``rows``::

    {"image": path | bytes | {"bytes": ...} | "base64:<data>",
     "question": str, "answer": str,
     "target_box": [x1, y1, x2, y2],   # optional, pixels
     "id": str | int}                  # optional

A relative image path is resolved against the data file's folder (or
``data.image_root``). A bad row is skipped and counted by reason, with one logged
warning per reason; it never stops the load, unless nothing usable is left.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import math
import re
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageFile

from mmagent_rl.example import IMAGE_PLACEHOLDER, Example
from mmagent_rl.tools.zoom import is_valid_box

log = logging.getLogger(__name__)

BASE64_PREFIX = "base64:"
ANSWER_TYPES = ("exact", "choice", "number")


@dataclass
class LoadResult:
    examples: list[Example]
    skipped: Counter = field(default_factory=Counter)  # reason -> number of rows


class _SkipRow(Exception):
    """Internal: the row is unusable; ``reason`` is the counter key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


@dataclass
class LoadContext:
    """What a format reader needs besides the row: where relative image paths start,
    the limits, and the choices the config made."""
    path: Path
    base_dir: Path  # relative image paths resolve here
    max_pixels: int = 64_000_000
    max_bytes: int = 256 * 2**20
    split: str | None = None  # hf: the split to read (None: by purpose)
    purpose: str = "train"  # train | eval: which hf split is the default
    columns: dict[str, str] = field(default_factory=dict)  # hf/rows: role -> column name

    @property
    def stem(self) -> str:
        return self.path.stem if self.path.suffix else self.path.name


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


# ---- one Example, whatever the format ---------------------------------------------------

_ANSWER_TAGS = re.compile(r"^\s*<answer>(.*)</answer>\s*$", re.DOTALL)


def infer_answer_type(question: str, answer: str) -> str:
    """``choice`` for a letter whose option the question lists ("A." / "(A)"),
    ``number`` for a number, else ``exact``."""
    a = answer.strip()
    if len(a) == 1 and a.isalpha() and re.search(
            rf"[(\[]{a.upper()}[)\]]|^\s*{a.upper()}[.):]\s", question, re.MULTILINE):
        return "choice"
    try:
        return "number" if math.isfinite(float(a.replace(",", ""))) else "exact"
    except ValueError:
        return "exact"


def build_example(ctx: LoadContext, row_no: int, images: list, question: Any, answer: Any, *,
                  row_id: Any = None, system_prompt: Any = None, answer_type: Any = None,
                  category: Any = None, target_box: Any = None, source: str | None = None,
                  ) -> Example:
    """The checks every format shares, in a fixed order (so a row counts once, under its
    first problem): question and answer are non-empty strings, a valid id, one
    ``<image>`` placeholder per image (or none), a known answer type, images that
    decode within the limits, a target box inside the first image."""
    for column, value in (("question", question), ("answer", answer)):
        if not isinstance(value, str):
            raise _SkipRow(f"wrong_type:{column}", type(value).__name__)
        if not value.strip():
            raise _SkipRow(f"empty:{column}")
    m = _ANSWER_TAGS.match(answer)  # "<answer> B </answer>" solutions: the inside
    answer = m.group(1).strip() if m else answer
    if not answer:
        raise _SkipRow("empty:answer")
    if row_id is not None and (isinstance(row_id, bool) or not isinstance(row_id, (str, int))):
        raise _SkipRow("wrong_type:id", type(row_id).__name__)
    if not images:
        raise _SkipRow("no_images")
    n_marks = question.count(IMAGE_PLACEHOLDER)
    if n_marks and n_marks != len(images):
        raise _SkipRow("placeholder_mismatch",
                       f"{n_marks} {IMAGE_PLACEHOLDER} for {len(images)} image(s)")
    if answer_type is None:
        answer_type = infer_answer_type(question, answer)
    elif answer_type not in ANSWER_TYPES:
        raise _SkipRow("bad_answer_type", f"{answer_type!r:.40}")
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise _SkipRow("wrong_type:system_prompt", type(system_prompt).__name__)
    decoded = [_decode_image(_image_bytes(v, ctx.base_dir, ctx.max_bytes), ctx.max_pixels)
               for v in images]
    meta: dict[str, Any] = {"source": source or ctx.stem, "row": row_no}
    if category is not None and str(category).strip():
        meta["category"] = str(category).strip()
    return Example(
        id=str(row_id) if row_id is not None else f"{ctx.stem}-{row_no}",
        image=decoded[0],
        extra_images=decoded[1:],
        question=question,
        answer=answer,
        target_box=_target_box(target_box, *decoded[0].size),
        meta=meta,
        system_prompt=system_prompt or None,
        answer_type=answer_type,
    )


# ---- the load ---------------------------------------------------------------------------

def load_examples(path: str | Path, fmt: str = "auto", max_image_pixels: int = 64_000_000,
                  max_image_bytes: int = 256 * 2**20, *, split: str | None = None,
                  purpose: str = "train", image_root: str | Path | None = None,
                  columns: dict[str, str] | None = None) -> LoadResult:
    """Load every usable row of ``path`` in format ``fmt`` (``auto``: sniffed from the
    path; see :mod:`mmagent_rl.data.formats`). ``split`` picks an hf DatasetDict's split
    (default: "train" for ``purpose="train"``, "test"/"validation" for "eval", else the
    only one); ``image_root`` is where relative image paths start (default: the data
    file's folder); ``columns`` maps roles (image, question, answer, ...) to other
    column names (hf, rows).

    Raises ValueError for an unknown format or extension, a missing or unreadable data
    file, or when no row is usable. If the file breaks part-way (a corrupt parquet row
    group), the rows read so far are kept and the rest is counted as ``file_read_error``.
    """
    from mmagent_rl.data import formats  # the readers import this module

    path = Path(path)
    name = formats.resolve_format(path, fmt)
    reader = formats.FORMATS[name]
    ctx = LoadContext(path=path, base_dir=Path(image_root) if image_root else path.parent,
                      max_pixels=max_image_pixels, max_bytes=max_image_bytes, split=split,
                      purpose=purpose, columns=dict(columns or {}))

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
            rows = reader.iter_rows(ctx)
            row_no = 0
            while True:
                try:
                    row_no, row = next(rows)
                except StopIteration:
                    break
                except Exception as exc:  # the file itself: not a parquet file, cut, ...
                    if not examples:
                        raise ValueError(f"cannot read data file {path} (data.format="
                                         f"{name}): {type(exc).__name__}: {exc}"[:500]) from exc
                    skipped["file_read_error"] += 1
                    first_detail["file_read_error"] = \
                        f"after row {row_no}: {type(exc).__name__}: {exc}"[:200]
                    break
                try:
                    if isinstance(row, _SkipRow):
                        raise row
                    examples.append(reader.to_example(row, row_no, ctx))
                except _SkipRow as skip:
                    skipped[skip.reason] += 1
                    first_detail.setdefault(skip.reason, f"row {row_no} {skip.detail}".strip())
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved

    for reason, count in sorted(skipped.items()):
        log.warning("%s: skipped %d row(s) for %s (first: %s)",
                    path, count, reason, first_detail[reason])
    if not examples:
        raise ValueError(f"{path} (data.format={name}): no usable rows; skipped by reason: "
                         f"{dict(skipped)}")
    return LoadResult(examples=examples, skipped=skipped)
