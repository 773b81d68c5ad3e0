"""Write small data files in every format ``data.format`` reads (rows, verl, hf, tsv,
vstar), from :class:`Record`s or from ``Example``s (e.g. the synthetic task's).

    from mmagent_rl.data.synthetic import SyntheticConfig, SyntheticDataset
    ds = SyntheticDataset(SyntheticConfig(), seed=0, size=8, split="test")
    write_verl(tmp / "train.parquet", [ds[i] for i in range(8)])
    write_tsv(tmp / "bench.tsv", [ds[i] for i in range(8)], options=COLOUR_OPTIONS)

Images are stored as PNG (lossless: loaded pixels equal the written ones). With
``options`` every record becomes multiple choice (its answer must be one of them).
"""
from __future__ import annotations

import base64
import csv
import dataclasses
import io
import json
import string
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from mmagent_rl.data.formats.common import render_choices
from mmagent_rl.example import IMAGE_PLACEHOLDER, Example

COLOUR_OPTIONS = ["red", "green", "blue", "yellow", "magenta", "cyan"]  # the synthetic task's
VERL_SYSTEM_PROMPT = "You are a careful visual assistant. Answer as <answer>...</answer>."


@dataclass
class Record:
    """One fixture row, format-neutral: the question without its options."""
    images: list[Image.Image]
    question: str
    answer: str  # the text; with options, the right option's text or letter
    options: list[str] | None = None
    category: str | None = None
    id: str | None = None
    system_prompt: str | None = None
    target_box: tuple | None = None  # written by the rows writer only
    extra: dict = field(default_factory=dict)  # more columns, written as they are

    @property
    def letter(self) -> str:
        """The right option's letter (records with options)."""
        a = self.answer.strip()
        if len(a) == 1 and a.upper() in string.ascii_uppercase[:len(self.options)]:
            return a.upper()
        return string.ascii_uppercase[self.options.index(a)]

    @property
    def letter_options(self) -> list[tuple[str, str]]:
        return list(zip(string.ascii_uppercase, self.options or []))

    def rendered(self) -> tuple[str, str]:
        """(question, answer) as the loaders produce them for a multiple-choice row."""
        if not self.options:
            return self.question, self.answer
        return render_choices(self.question, self.letter_options), self.letter


def as_records(items, options: list[str] | None = None) -> list[Record]:
    """Records from Records or Examples; ``options`` makes each one multiple choice."""
    out = []
    for it in items:
        if isinstance(it, Example):
            it = Record(images=list(it.images), question=it.question, answer=it.answer,
                        category=it.meta.get("category"), id=it.id,
                        system_prompt=it.system_prompt, target_box=it.target_box)
        if options is not None:
            it = dataclasses.replace(it, options=list(options))
        out.append(it)
    return out


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for row in rows for k in row))  # from_pylist: row 0's
    pq.write_table(pa.Table.from_pylist([{k: row.get(k) for k in keys} for row in rows]), path)
    return path


# ---- rows ---------------------------------------------------------------------------

def rows_row(r: Record) -> dict:
    """The project's row schema (images as PNG bytes; one image -> ``image``)."""
    row: dict = ({"image": png_bytes(r.images[0])} if len(r.images) == 1
                 else {"images": [png_bytes(im) for im in r.images]})
    row.update(question=r.question, answer=r.answer)
    for key, value in (("choices", r.options), ("category", r.category), ("id", r.id),
                       ("system_prompt", r.system_prompt),
                       ("target_box", list(r.target_box) if r.target_box else None)):
        if value is not None:
            row[key] = value
    return {**row, **r.extra}


def write_rows(path, items, options=None) -> Path:
    """.jsonl (images inline as "base64:...") or .parquet (PNG bytes), by the suffix."""
    rows = [rows_row(r) for r in as_records(items, options)]
    path = Path(path)
    if path.suffix == ".parquet":
        return _write_parquet(path, rows)

    def b64(v):
        return "base64:" + base64.b64encode(v).decode() if isinstance(v, bytes) else v
    for row in rows:
        if "image" in row:
            row["image"] = b64(row["image"])
        if "images" in row:
            row["images"] = [b64(v) for v in row["images"]]
    return write_jsonl(path, rows)


def write_jsonl(path, rows: list) -> Path:
    """Rows as JSON lines (a str row is written as it is: a broken line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---- verl ---------------------------------------------------------------------------

def verl_row(r: Record, index: int, placeholders: bool = True,
             system_prompt: str | None = VERL_SYSTEM_PROMPT, data_source: str | None = None
             ) -> dict:
    """A verl / EasyR1 row. ``placeholders``: put one "<image>\\n" per image before a
    question that has none (as DeepEyes does); the options are rendered into the
    question and the ground truth is their letter."""
    question, answer = r.rendered()
    if placeholders and IMAGE_PLACEHOLDER not in question:
        question = f"{IMAGE_PLACEHOLDER}\n" * len(r.images) + question
    system = r.system_prompt or system_prompt
    prompt = ([{"role": "system", "content": system}] if system else []) \
        + [{"role": "user", "content": question}]
    return {
        "data_source": data_source or r.category or "fixture",
        "prompt": prompt,
        "images": [{"bytes": png_bytes(im), "path": None} for im in r.images],
        "ability": "visual_reasoning",
        "reward_model": {"ground_truth": answer, "style": "rule"},
        "extra_info": {"index": index, "question": r.question, "answer": answer,
                       "split": "train"},
        **r.extra,
    }


def write_verl(path, items, options=None, **kw) -> Path:
    """A verl parquet; ``kw`` goes to :func:`verl_row`."""
    return write_verl_rows(path, [verl_row(r, i, **kw)
                                  for i, r in enumerate(as_records(items, options))])


def write_verl_rows(path, rows: list[dict]) -> Path:
    return _write_parquet(path, rows)


# ---- hf -----------------------------------------------------------------------------

def hf_dataset(items, options=None, question_col="question", answer_col="answer"):
    """A ``datasets.Dataset`` with an Image feature (``image``; ``images``, a list of
    them, when a record has several)."""
    import datasets

    records = as_records(items, options)
    multi = any(len(r.images) > 1 for r in records)
    data: dict = {"images" if multi else "image":
                  [[png_bytes(im) for im in r.images] if multi else png_bytes(r.images[0])
                   for r in records],
                  question_col: [r.question for r in records],
                  answer_col: [r.answer for r in records]}
    if any(r.options for r in records):
        data["choices"] = [r.options or [] for r in records]
    if any(r.category for r in records):
        data["category"] = [r.category or "" for r in records]
    data["id"] = [r.id or str(i) for i, r in enumerate(records)]
    ds = datasets.Dataset.from_dict(data)
    if multi:
        return ds.cast_column("images", datasets.List(datasets.Image()))
    return ds.cast_column("image", datasets.Image())


def write_hf(path, items=None, options=None, splits: dict | None = None, **kw) -> Path:
    """``save_to_disk`` folder: a Dataset, or a DatasetDict with ``splits``
    ({name: items})."""
    import datasets

    if splits:
        ds = datasets.DatasetDict({k: hf_dataset(v, options, **kw) for k, v in splits.items()})
    else:
        ds = hf_dataset(items, options, **kw)
    ds.save_to_disk(str(path))
    return Path(path)


def write_hf_parquet(path, items, options=None, **kw) -> Path:
    """One parquet shard as ``Dataset.to_parquet`` writes it (the Image feature in the
    schema metadata)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    hf_dataset(items, options, **kw).to_parquet(str(path))
    return Path(path)


# ---- tsv ----------------------------------------------------------------------------

def tsv_rows(items, options=None, share_images: bool = True) -> list[dict]:
    """VLMEvalKit rows: index, image (base64; a repeated image is the index of the row
    that holds it when ``share_images``), question, A.., answer (letter), category."""
    records = as_records(items, options)
    letters = string.ascii_uppercase[:max((len(r.options or []) for r in records), default=0)]
    seen: dict[bytes, int] = {}
    rows = []
    for i, r in enumerate(records):
        data = png_bytes(r.images[0])
        row = {"index": i, "image": str(seen[data]) if share_images and data in seen
               else base64.b64encode(data).decode(), "question": r.question}
        seen.setdefault(data, i)
        opts = dict(r.letter_options)
        row.update({k: opts.get(k, "") for k in letters})
        row["answer"] = r.letter if r.options else r.answer
        row["category"] = r.category or ""
        rows.append({**row, **r.extra})
    return rows


def write_tsv(path, items, options=None, share_images: bool = True) -> Path:
    return write_tsv_rows(path, tsv_rows(items, options, share_images))


def write_tsv_rows(path, rows: list[dict]) -> Path:
    """Tab-separated with a header (the union of the rows' keys, in order), quoted like
    pandas' ``to_csv(sep="\\t")``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, header, delimiter="\t", restval="")
        w.writeheader()
        w.writerows(rows)
    return path


# ---- vstar --------------------------------------------------------------------------

VSTAR_INSTRUCTION = "Answer with the option's letter from the given choices directly."


def vstar_rows(items, folder, options=None, style: str = "text") -> list[dict]:
    """V* rows; each image saved as PNG under ``folder``/<category>/. ``style="text"``:
    the options in the text as "(A) red" lines plus the V* instruction, label = the
    letter; ``"options"``: question + options + answer."""
    folder = Path(folder)
    rows = []
    for i, r in enumerate(as_records(items, options)):
        sub = r.category or "images"
        (folder / sub).mkdir(parents=True, exist_ok=True)
        r.images[0].save(folder / sub / f"img_{i}.png")
        row: dict = {"image": f"{sub}/img_{i}.png"}
        if style == "options" and r.options:
            row.update(question=r.question, options=r.options, answer=r.answer)
        elif r.options:
            lines = [r.question, *(f"({k}) {t}" for k, t in r.letter_options), VSTAR_INSTRUCTION]
            row.update(text="\n".join(lines), label=r.letter)
        else:
            row.update(text=r.question, label=r.answer)
        row.update(question_id=i, category=r.category or "")
        rows.append({**row, **r.extra})
    return rows


def write_vstar(path, items, options=None, style: str = "text") -> Path:
    """A V* ``test_questions.jsonl`` with its images beside it."""
    path = Path(path)
    return write_jsonl(path, vstar_rows(items, path.parent, options, style))
