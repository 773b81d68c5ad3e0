import base64
import io
import json
import logging
import random

import pytest
from PIL import Image

from mmagent_rl.data.datasets import load_examples


def png_bytes(size=(40, 30), color=(200, 10, 10), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else 0).save(buf, "PNG")
    return buf.getvalue()


def noisy_png_bytes(size=(64, 64), seed: int = 0) -> bytes:
    """Incompressible content, so truncating the file really cuts pixel data."""
    buf = io.BytesIO()
    noise = random.Random(seed).randbytes(size[0] * size[1] * 3)
    Image.frombytes("RGB", size, noise).save(buf, "PNG")
    return buf.getvalue()


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def good_row(image, **extra):
    return {"image": image, "question": "What colour?", "answer": "red", **extra}


@pytest.fixture
def image_dir(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "good.png").write_bytes(png_bytes())
    (tmp_path / "imgs" / "empty.png").write_bytes(b"")
    (tmp_path / "imgs" / "text.png").write_text("this is not an image")
    (tmp_path / "imgs" / "corrupt.png").write_bytes(png_bytes()[:8] + b"\x00garbage" * 20)
    (tmp_path / "imgs" / "truncated.png").write_bytes(noisy_png_bytes()[:2000])
    # 2000 x 1500 = 3M pixels: over twice the 1M limit used below (PIL's hard error);
    # 1100 x 1000 is between 1x and 2x (PIL only warns, which must also skip).
    (tmp_path / "imgs" / "bomb.png").write_bytes(png_bytes((2000, 1500), mode="1"))
    (tmp_path / "imgs" / "big.png").write_bytes(png_bytes((1100, 1000), mode="1"))
    return tmp_path


def test_jsonl_good_rows_all_sources(image_dir):
    abs_path = str(image_dir / "imgs" / "good.png")
    b64 = "base64:" + base64.b64encode(png_bytes((10, 20))).decode()
    write_jsonl(image_dir / "data.jsonl", [
        good_row("imgs/good.png", id="first", target_box=[1, 2, 30.5, 29]),
        good_row(abs_path),
        good_row(b64, id=7),
    ])
    result = load_examples(image_dir / "data.jsonl")
    assert not result.skipped
    a, b, c = result.examples
    assert a.id == "first" and a.target_box == (1, 2, 31, 29)
    assert a.image.mode == "RGB" and a.image.size == (40, 30)
    assert a.image.getpixel((0, 0)) == (200, 10, 10)
    assert b.id == "data-2" and b.target_box is None
    assert c.id == "7" and c.image.size == (10, 20)
    assert (a.question, a.answer) == ("What colour?", "red")


def test_jsonl_bad_rows_skipped_and_counted(image_dir, caplog):
    rows = [
        good_row("imgs/good.png"),
        good_row("imgs/missing.png"),
        good_row("imgs/empty.png"),
        good_row("imgs/text.png"),
        good_row("imgs/corrupt.png"),
        good_row("imgs/truncated.png"),
        good_row("imgs/bomb.png"),
        good_row("imgs/big.png"),
        good_row("imgs"),  # a directory
        good_row("base64:!!not base64!!"),
        {"image": "imgs/good.png", "answer": "red"},
        {"image": "imgs/good.png", "question": "q", "answer": 3},
        {"question": "q", "answer": "red"},
        good_row("imgs/good.png", target_box=[0, 0, 999, 10]),
        good_row(12),
        "{not json",
        "[1, 2]",
        "",  # blank line: not a row
    ]
    write_jsonl(image_dir / "data.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        result = load_examples(image_dir / "data.jsonl", max_image_pixels=1_000_000)
    assert len(result.examples) == 1
    assert result.skipped == {
        "image_file_not_found": 1,
        "image_empty_file": 1,
        "image_not_an_image": 1,
        "image_corrupt": 2,  # corrupt.png and truncated.png
        "image_too_large": 2,
        "image_unreadable": 1,
        "image_bad_base64": 1,
        "missing_column:question": 1,
        "wrong_type:answer": 1,
        "missing_column:image": 1,
        "bad_target_box": 1,
        "wrong_type:image": 1,
        "bad_json": 1,
        "not_an_object": 1,
    }
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    for reason in result.skipped:
        assert reason in warned
    # The process-wide PIL limit is restored afterwards.
    assert Image.MAX_IMAGE_PIXELS != 1_000_000


def test_parquet_rows(image_dir):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({
        "image": [png_bytes(), b"", b"not an image", png_bytes((5, 5))],
        "question": ["q1", "q2", "q3", None],
        "answer": ["a1", "a2", "a3", "a4"],
    })
    pq.write_table(table, image_dir / "data.parquet")
    result = load_examples(image_dir / "data.parquet")
    assert [e.question for e in result.examples] == ["q1"]
    assert result.skipped == {"image_empty_file": 1, "image_not_an_image": 1,
                              "missing_column:question": 1}


def test_parquet_struct_images_and_paths(image_dir):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({
        "image": [{"bytes": png_bytes(), "path": None}, {"bytes": None, "path": "imgs/good.png"}],
        "question": ["q1", "q2"],
        "answer": ["a1", "a2"],
        "target_box": [[0, 0, 10, 10], None],
    })
    pq.write_table(table, image_dir / "data.parquet")
    result = load_examples(image_dir / "data.parquet")
    assert len(result.examples) == 2 and not result.skipped
    assert result.examples[0].target_box == (0, 0, 10, 10)


def test_all_bad_raises_with_reasons(image_dir):
    write_jsonl(image_dir / "bad.jsonl", [good_row("imgs/missing.png"), "{oops"])
    with pytest.raises(ValueError, match="image_file_not_found"):
        load_examples(image_dir / "bad.jsonl")


def test_unknown_extension(tmp_path):
    (tmp_path / "data.csv").write_text("image,question,answer\n")
    with pytest.raises(ValueError, match="extension"):
        load_examples(tmp_path / "data.csv")


# --- more bad files (each one a real file in tmp_path) ---------------------------------

def png_with_header(width: int, height: int) -> bytes:
    """A PNG whose header announces width x height, with a tiny body: PIL reads the size
    without decoding anything (a decompression bomb, or a zero-size image)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def test_more_bad_files_skipped_and_counted(tmp_path, monkeypatch):
    import os

    from PIL import ImageFile

    d = tmp_path / "imgs"
    d.mkdir()
    (d / "good.png").write_bytes(png_bytes())
    (d / "bomb.png").write_bytes(png_with_header(300_000, 300_000))  # 9e10 pixels
    (d / "zero.png").write_bytes(png_with_header(0, 10))
    (d / "truncated.png").write_bytes(noisy_png_bytes()[:1500])
    (d / "big.png").write_bytes(png_bytes() + b"\x00" * 5000)  # over max_image_bytes
    os.mkfifo(d / "fifo.png")  # reading it would block forever
    buf = io.BytesIO()
    Image.new("CMYK", (8, 8)).save(buf, "JPEG")
    (d / "cmyk.jpg").write_bytes(buf.getvalue())
    buf = io.BytesIO()
    Image.new("I;16", (8, 8)).save(buf, "PNG")
    (d / "gray16.png").write_bytes(buf.getvalue())
    rows = [
        good_row("imgs/good.png"),
        good_row("imgs/cmyk.jpg"),  # unusual modes are fine: converted to RGB
        good_row("imgs/gray16.png"),
        good_row("imgs/bomb.png"),
        good_row("imgs/zero.png"),
        good_row("imgs/truncated.png"),
        good_row("imgs/big.png"),
        good_row("imgs/fifo.png"),
        good_row("/dev/zero"),  # endless: must not be read
        good_row(["imgs/good.png"]),
        good_row("imgs/good.png", target_box=[0, 0, float("nan"), 5]),
        {"image": "imgs/good.png", "question": "  ", "answer": "red"},
        {"image": "imgs/good.png", "question": "q", "answer": "red", "id": 1.5},
    ]
    write_jsonl(tmp_path / "data.jsonl", rows)
    with open(tmp_path / "data.jsonl", "ab") as f:
        f.write(b'{"image": "imgs/good.png", "question": "\xff\xfe", "answer": "a"}\n')
        f.write(b"\xff\xfe\x00garbage\n")
    # A library that turned truncated images on process-wide must not change anything.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    result = load_examples(tmp_path / "data.jsonl", max_image_bytes=3000)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored
    assert [e.image.mode for e in result.examples] == ["RGB"] * 4
    assert result.examples[-1].question == "\ufffd\ufffd"  # bad bytes replaced, row kept
    assert result.skipped == {
        "image_too_large": 1, "image_corrupt": 1,
        "image_not_an_image": 1,  # zero.png: PIL does not take a 0 x 10 PNG header
        "image_file_too_big": 1, "image_unreadable": 2, "wrong_type:image": 1,
        "bad_target_box": 1, "empty:question": 1, "wrong_type:id": 1, "bad_json": 1,
    }


def test_missing_or_unreadable_data_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_examples(tmp_path / "nope.jsonl")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ValueError, match="cannot read data file"):
        load_examples(tmp_path / "broken.parquet")
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(ValueError, match="not a regular file"):
        load_examples(tmp_path / "dir.jsonl")


def test_parquet_without_a_column_and_cut_short(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"image": [png_bytes()], "answer": ["a"]}), tmp_path / "a.parquet")
    with pytest.raises(ValueError, match="missing_column:question"):
        load_examples(tmp_path / "a.parquet")
    # Two row groups, the second one's bytes destroyed: the first is kept, the rest
    # counted.
    table = pa.table({"image": [png_bytes()] * 4, "question": ["q"] * 4, "answer": ["a"] * 4})
    pq.write_table(table, tmp_path / "b.parquet", row_group_size=2, compression="none")
    data = bytearray((tmp_path / "b.parquet").read_bytes())
    meta = pq.ParquetFile(tmp_path / "b.parquet").metadata
    col = meta.row_group(1).column(0)
    start = col.dictionary_page_offset or col.data_page_offset
    data[start:start + 64] = b"\xff" * 64
    (tmp_path / "b.parquet").write_bytes(bytes(data))
    result = load_examples(tmp_path / "b.parquet")
    assert len(result.examples) == 2 and result.skipped == {"file_read_error": 1}
