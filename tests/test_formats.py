"""data.format: every reader loads to the same Examples as the equivalent rows file,
skips and counts its bad rows by reason, and ``auto`` tells the formats apart."""
from __future__ import annotations

import base64
import dataclasses

import pytest
from PIL import Image, ImageDraw

from format_fixtures import (VERL_SYSTEM_PROMPT, VSTAR_INSTRUCTION, Record, png_bytes,
                             rows_row, tsv_rows, verl_row, vstar_rows, write_hf,
                             write_hf_parquet, write_jsonl, write_rows, write_tsv,
                             write_tsv_rows, write_verl, write_verl_rows, write_vstar)
from mmagent_rl.data.datasets import load_examples
from mmagent_rl.data.formats import sniff_format

COLOURS = {"red": (220, 20, 20), "green": (20, 160, 40), "blue": (30, 60, 230),
           "yellow": (240, 210, 0)}
OPTIONS = list(COLOURS)


def picture(colour: str, seed: int = 0, size=(24, 16)) -> Image.Image:
    im = Image.new("RGB", size, (250, 250, 250))
    d = ImageDraw.Draw(im)
    d.rectangle([2 + seed % 5, 3, 12 + seed % 7, 12], fill=COLOURS[colour])
    d.point((size[0] - 1, size[1] - 1), fill=(seed * 37 % 256, 0, 0))  # tell images apart
    return im


def mc_records() -> list[Record]:
    """Four multiple-choice rows; the last two share an image (a TSV reference)."""
    shared = picture("blue", 3)
    return [Record([picture("red", 0)], "What colour is the box?", "red", OPTIONS, "colour"),
            Record([picture("green", 1)], "Which colour is the box?", "B", OPTIONS, "colour"),
            Record([shared], "Name the box's colour.", "blue", OPTIONS, "attr"),
            Record([shared], "Again: the box's colour?", "C", OPTIONS, "attr")]


def open_records() -> list[Record]:
    """Open answers, one with two images and its placeholders."""
    return [Record([picture("yellow", 4)], "<image>\nWhat colour is the box?", "yellow",
                   category="colour"),
            Record([picture("red", 5), picture("blue", 6)],
                   "<image>\n<image>\nHow many boxes in the two images?", "2", category="count"),
            Record([picture("green", 7)], "<image>\nWhat colour?", "green", category="colour")]


def load(path, fmt="auto", **kw):
    return load_examples(path, fmt, **kw)


def view(ex):
    """What must agree across formats."""
    return (ex.question, ex.answer, ex.answer_type, ex.meta.get("category"),
            [(im.size, im.tobytes()) for im in ex.images])


def assert_same(got, want):
    assert [view(e) for e in got] == [view(e) for e in want]


def placeheld(records):
    """The records as a verl writer stores them: "<image>\\n" before a question with no
    placeholder (rows then render the same question)."""
    return [dataclasses.replace(r, question="<image>\n" * len(r.images) + r.question)
            if "<image>" not in r.question else r for r in records]


# ---- rows ------------------------------------------------------------------------------

def test_rows_choices_images_and_answer_types(tmp_path):
    recs = mc_records()[:2] + open_records()
    write_rows(tmp_path / "r.jsonl", recs)
    ex = load(tmp_path / "r.jsonl", "rows").examples
    assert ex[0].question == ("What colour is the box?\nA. red\nB. green\nC. blue\n"
                              "D. yellow\nAnswer with the option's letter.")
    assert [(e.answer, e.answer_type) for e in ex] == [
        ("A", "choice"), ("B", "choice"), ("yellow", "exact"), ("2", "number"),
        ("green", "exact")]
    assert len(ex[3].extra_images) == 1 and ex[3].extra_images[0].tobytes() == \
        recs[3].images[1].tobytes()
    assert ex[2].meta["category"] == "colour" and ex[2].system_prompt is None
    # Parquet holds the same rows.
    write_rows(tmp_path / "r.parquet", recs)
    assert_same(load(tmp_path / "r.parquet", "rows").examples, ex)


def test_rows_bad_rows_counted(tmp_path):
    good = rows_row(open_records()[0])
    b64 = "base64:" + base64.b64encode(good["image"]).decode()
    two = [b64, b64]
    write_jsonl(tmp_path / "r.jsonl", [
        {**good, "image": b64},
        {"images": two, "question": "<image> only one mark", "answer": "x"},
        {"images": [], "question": "q", "answer": "x"},
        {"images": b64, "question": "q", "answer": "x"},
        {"image": b64, "question": "q", "answer": "purple", "choices": OPTIONS},
        {"image": b64, "question": "q", "answer": "A", "choices": "A,B"},
        {"image": b64, "question": "q", "answer": "x", "answer_type": "fuzzy"},
    ])
    result = load(tmp_path / "r.jsonl")
    assert len(result.examples) == 1
    assert result.skipped == {"placeholder_mismatch": 1, "no_images": 1,
                              "wrong_type:images": 1, "bad_choice_answer": 1,
                              "wrong_type:choices": 1, "bad_answer_type": 1}


# ---- verl ------------------------------------------------------------------------------

def test_verl_matches_rows(tmp_path):
    recs = mc_records() + open_records()
    write_verl(tmp_path / "v.parquet", recs)
    write_rows(tmp_path / "r.jsonl", placeheld(recs))
    got = load(tmp_path / "v.parquet", "verl").examples
    assert_same(got, load(tmp_path / "r.jsonl").examples)
    assert got[0].question.startswith("<image>\nWhat colour is the box?\nA. red\n")
    assert {e.system_prompt for e in got} == {VERL_SYSTEM_PROMPT}
    assert [e.id for e in got] == [str(i) for i in range(len(recs))]
    assert got[0].meta["source"] == "colour"  # data_source


def test_verl_images_as_paths_and_parts(tmp_path):
    (tmp_path / "imgs").mkdir()
    picture("red").save(tmp_path / "imgs" / "a.png")
    rows = [{"prompt": [{"role": "user", "content": [
                {"type": "image"}, {"type": "text", "text": "What colour?"}]}],
             "images": ["imgs/a.png"], "reward_model": {"ground_truth": "red"},
             "data_source": "geo"}]
    write_verl_rows(tmp_path / "v.parquet", rows)
    (ex,) = load(tmp_path / "v.parquet").examples
    assert (ex.question, ex.answer, ex.meta["category"], ex.system_prompt) == \
        ("<image>What colour?", "red", "geo", None)
    assert ex.image.tobytes() == picture("red").tobytes()


def test_verl_bad_rows_counted(tmp_path):
    rec = open_records()[0]
    good = verl_row(rec, 0)

    def bad(**change):
        return {**good, **change}
    user_only = [m for m in good["prompt"] if m["role"] == "user"]
    rows = [
        good,
        bad(images=[]),
        bad(images=None),
        bad(images=[{"bytes": b"not an image", "path": None}]),
        bad(images=[{"bytes": b"", "path": None}]),
        bad(prompt=[{"role": "user", "content": "<image><image> two marks"}]),
        bad(reward_model={"ground_truth": None, "style": "rule"},
            extra_info={"index": 5, "question": "q", "answer": None, "split": "train"}),
        bad(reward_model={"ground_truth": "  ", "style": "rule"}),
        bad(prompt=[{"role": "system", "content": "s"}]),
        bad(prompt=user_only + user_only),
    ]
    write_verl_rows(tmp_path / "v.parquet", rows)
    result = load(tmp_path / "v.parquet")
    assert len(result.examples) == 1
    assert result.skipped == {"no_images": 1, "missing_column:images": 1,
                              "image_not_an_image": 1, "image_empty_file": 1,
                              "placeholder_mismatch": 1, "missing_ground_truth": 2,
                              "bad_prompt": 2}
    # The ground truth falls back to extra_info.answer.
    write_verl_rows(tmp_path / "w.parquet", [bad(reward_model={"ground_truth": None,
                                                               "style": "rule"})])
    assert load(tmp_path / "w.parquet").examples[0].answer == "yellow"
    # Nothing usable: the reasons are in the error.
    write_verl_rows(tmp_path / "x.parquet", rows[5:6])
    with pytest.raises(ValueError, match="data.format=verl.*placeholder_mismatch"):
        load(tmp_path / "x.parquet")


# ---- hf --------------------------------------------------------------------------------

def test_hf_matches_rows_in_every_layout(tmp_path):
    recs = mc_records() + open_records()[:1]
    want = load(write_rows(tmp_path / "r.jsonl", recs)).examples
    write_hf(tmp_path / "disk", recs)
    assert_same(load(tmp_path / "disk", "hf").examples, want)
    write_hf_parquet(tmp_path / "shards" / "part-0.parquet", recs[:3])
    write_hf_parquet(tmp_path / "shards" / "part-1.parquet", recs[3:])
    assert_same(load(tmp_path / "shards").examples, want)  # a folder of shards
    assert_same(load(str(tmp_path / "shards" / "*.parquet")).examples, want)  # a glob
    assert_same(load(tmp_path / "shards" / "part-0.parquet").examples, want[:3])
    arrow = next((tmp_path / "disk").glob("*.arrow"))
    assert_same(load(arrow).examples, want)
    # Multi-image rows (a list of Image) and the problem/solution column names.
    multi = open_records()
    write_hf(tmp_path / "multi", multi, question_col="problem", answer_col="solution")
    assert_same(load(tmp_path / "multi").examples, load(write_rows(
        tmp_path / "m.jsonl", multi)).examples)
    # Other names through data.columns.
    write_hf(tmp_path / "named", recs, question_col="prompt_text", answer_col="gt")
    assert_same(load(tmp_path / "named", columns={"question": "prompt_text",
                                                  "answer": "gt"}).examples, want)
    with pytest.raises(ValueError, match="missing_column:question"):
        load(tmp_path / "named")


def test_hf_splits(tmp_path):
    train, test = mc_records()[:3], mc_records()[3:]
    write_hf(tmp_path / "dd", splits={"train": train, "test": test})
    assert len(load(tmp_path / "dd").examples) == 3
    assert len(load(tmp_path / "dd", purpose="eval").examples) == 1
    assert len(load(tmp_path / "dd", split="test").examples) == 1
    with pytest.raises(ValueError, match="data.split='dev'"):
        load(tmp_path / "dd", split="dev")
    write_hf(tmp_path / "only", splits={"validation": test})
    assert len(load(tmp_path / "only").examples) == 1  # the only split, for training too
    write_hf_parquet(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet", train)
    write_hf_parquet(tmp_path / "hub" / "data" / "test-00000-of-00001.parquet", test)
    assert len(load(tmp_path / "hub").examples) == 3
    assert len(load(tmp_path / "hub", purpose="eval").examples) == 1


def test_hf_bad_rows_counted(tmp_path):
    import datasets

    good = png_bytes(picture("red"))
    ds = datasets.Dataset.from_dict({
        "image": [good, b"junk bytes", good, good, good],
        "question": ["<image>q", "q", "<image><image>q", None, "q"],
        "solution": ["red", "red", "red", "red", "<answer> 3 </answer>"],  # R1-style
    }).cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "d"))
    result = load(tmp_path / "d")
    assert [(e.answer, e.answer_type) for e in result.examples] == [
        ("red", "exact"), ("3", "number")]
    assert result.skipped == {"image_not_an_image": 1, "placeholder_mismatch": 1,
                              "missing_column:question": 1}
    with pytest.raises(ValueError, match="does not exist"):
        load(tmp_path / "nope", "hf")


# ---- tsv -------------------------------------------------------------------------------

def test_tsv_matches_rows(tmp_path):
    recs = mc_records()
    rows = tsv_rows(recs)
    assert rows[3]["image"] == "2"  # the shared image is a reference to row index 2
    write_tsv_rows(tmp_path / "b.tsv", rows)
    got = load(tmp_path / "b.tsv").examples
    assert_same(got, load(write_rows(tmp_path / "r.jsonl", recs)).examples)
    assert [e.id for e in got] == ["0", "1", "2", "3"]
    assert {e.answer_type for e in got} == {"choice"}
    # A forward reference (the image comes later in the file) and an open question.
    rows = tsv_rows(recs)
    rows[2], rows[3] = rows[3], rows[2]
    rows.append({"index": 9, "image": base64.b64encode(png_bytes(picture("red"))).decode(),
                 "question": "Colour?", "A": "", "B": "", "C": "", "D": "",
                 "answer": "red", "category": "open"})
    write_tsv_rows(tmp_path / "f.tsv", rows)
    got = load(tmp_path / "f.tsv").examples
    assert [e.id for e in got] == ["0", "1", "2", "9", "3"]
    assert got[3].question == "Colour?" and got[3].answer_type == "exact"


def test_tsv_options_hint_and_bad_rows(tmp_path):
    img = base64.b64encode(png_bytes(picture("red"))).decode()

    def row(index, **kw):
        return {"index": index, "image": img, "question": "Colour?", "A": "red",
                "B": "blue", "C": "nan", "D": "", "E": "green", "answer": "A",
                "category": "colour", "l2-category": "fine", "hint": "", **kw}
    write_tsv_rows(tmp_path / "b.tsv", [
        row(0, hint="Look closely."),
        row(1, image="77"),  # no row 77
        row(2, image="!!!" * 30),
        row(3, answer="D"),  # D is empty: not an option
        row(4, answer=""),
        row(5, question=""),
        row(6, answer="green"),  # the option's text
    ])
    result = load(tmp_path / "b.tsv")
    first, last = result.examples
    assert first.question == ("Hint: Look closely.\nColour?\nA. red\nB. blue\nE. green\n"
                              "Answer with the option's letter.")
    assert (first.answer, first.meta["category"], first.meta["l2_category"]) == \
        ("A", "colour", "fine")
    assert last.answer == "E"
    assert result.skipped == {"image_ref_not_found": 1, "image_bad_base64": 1,
                              "bad_choice_answer": 1, "missing_column:answer": 1,
                              "missing_column:question": 1}
    write_tsv_rows(tmp_path / "bad.tsv", [row(1, image="77")])
    with pytest.raises(ValueError, match="image_ref_not_found"):
        load(tmp_path / "bad.tsv")


# ---- vstar -----------------------------------------------------------------------------

def test_vstar_both_forms(tmp_path):
    recs = mc_records()
    write_vstar(tmp_path / "v" / "test_questions.jsonl", recs)
    got = load(tmp_path / "v" / "test_questions.jsonl").examples
    want = load(write_rows(tmp_path / "r.jsonl", recs)).examples
    assert got[0].question == ("What colour is the box?\n(A) red\n(B) green\n(C) blue\n"
                               f"(D) yellow\n{VSTAR_INSTRUCTION}")
    assert [view(e)[1:] for e in got] == [view(e)[1:] for e in want]  # all but the text
    write_vstar(tmp_path / "o" / "q.jsonl", recs, style="options")
    assert_same(load(tmp_path / "o" / "q.jsonl", "vstar").examples, want)
    # Images elsewhere: data.image_root.
    rows = vstar_rows(recs[:1], tmp_path / "imgs")
    write_jsonl(tmp_path / "q.jsonl", rows + [{**rows[0], "image": "colour/none.png"},
                                              {"image": rows[0]["image"], "text": "q"}])
    result = load(tmp_path / "q.jsonl", image_root=tmp_path / "imgs")
    assert [view(e)[1:] for e in result.examples] == [view(want[0])[1:]]
    assert result.skipped == {"image_file_not_found": 1, "missing_column:label": 1}


# ---- auto ------------------------------------------------------------------------------

def test_auto_picks_each_format(tmp_path):
    recs = mc_records()
    paths = {
        "rows": [write_rows(tmp_path / "r.jsonl", recs), write_rows(tmp_path / "r.parquet", recs)],
        "verl": [write_verl(tmp_path / "v.parquet", recs)],
        "hf": [write_hf(tmp_path / "disk", recs),
               write_hf(tmp_path / "dd", splits={"train": recs}),
               write_hf_parquet(tmp_path / "s" / "x.parquet", recs,
                                question_col="problem", answer_col="solution"),
               tmp_path / "s", next((tmp_path / "disk").glob("*.arrow"))],
        "tsv": [write_tsv(tmp_path / "b.tsv", recs)],
        "vstar": [write_vstar(tmp_path / "q" / "test_questions.jsonl", recs)],
    }
    for fmt, found in paths.items():
        for path in found:
            assert sniff_format(path) == fmt, path
            assert len(load(path).examples) == 4, path
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="data.format"):
        sniff_format(tmp_path / "empty")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="extension.*data.format"):
        load(tmp_path / "d.csv")
    with pytest.raises(ValueError, match="data.format='xml' is not valid"):
        load(tmp_path / "b.tsv", "xml")


def test_config_format_and_make_dataset(tmp_path):
    from mmagent_rl.config import Config, validate_common
    from mmagent_rl.sources import make_dataset

    cfg = Config()
    cfg.data.format = "xml"
    with pytest.raises(ValueError, match="data.format"):
        validate_common(cfg)
    cfg.data.format = "verl"
    cfg.data.kind, cfg.data.path = "file", str(write_verl(tmp_path / "v.parquet",
                                                          mc_records()))
    cfg.data.eval_path = str(write_hf(tmp_path / "dd", splits={
        "train": mc_records()[:3], "test": mc_records()[3:]}))
    assert len(make_dataset(cfg, "train")) == 4
    cfg.data.format = "auto"
    assert len(make_dataset(cfg, "eval")) == 1  # the DatasetDict's test split
