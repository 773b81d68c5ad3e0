import numpy as np
import pytest
from PIL import Image

from mmagent_rl.data.synthetic import (
    COLOR_RGB,
    QUESTION,
    SyntheticConfig,
    SyntheticDataset,
    describe_target,
    generate_example,
)
from mmagent_rl.tools.zoom import is_valid_box, zoom

CFG = SyntheticConfig()


def color_mask(img: Image.Image, rgb, tol: int = 40) -> np.ndarray:
    arr = np.asarray(img).astype(int)
    return np.abs(arr - np.array(rgb)).max(axis=-1) <= tol


def test_deterministic():
    a, b = generate_example(3, 17, CFG), generate_example(3, 17, CFG)
    assert a.id == b.id == "syn-3-17"
    assert a.answer == b.answer and a.target_box == b.target_box
    assert a.image.tobytes() == b.image.tobytes()
    c = generate_example(3, 18, CFG)
    assert a.image.tobytes() != c.image.tobytes()


def test_splits_are_disjoint():
    train = SyntheticDataset(CFG, seed=0, size=20, split="train")
    val = SyntheticDataset(CFG, seed=0, size=20, split="val")
    train_ids, val_ids = {e.id for e in train}, {e.id for e in val}
    assert len(train_ids) == len(val_ids) == 20
    assert not train_ids & val_ids
    train_pixels = {e.image.tobytes() for e in train}
    assert not any(e.image.tobytes() in train_pixels for e in val)


def test_dataset_indexing():
    ds = SyntheticDataset(CFG, seed=1, size=5)
    assert len(ds) == 5
    assert ds[-1].id == ds[4].id
    with pytest.raises(IndexError):
        ds[5]
    with pytest.raises(ValueError):
        SyntheticDataset(CFG, seed=1, size=5, split="nope")


@pytest.mark.parametrize("index", range(12))
def test_target_box_answer_and_pixels(index):
    ex = generate_example(7, index, SyntheticConfig(easy_fraction=0.3))
    w, h = ex.image.size
    assert ex.question == QUESTION
    assert ex.answer in CFG.colors
    assert is_valid_box(ex.target_box, w, h)
    x1, y1, x2, y2 = ex.target_box

    # The colour at the box centre is the answer.
    assert ex.image.getpixel(((x1 + x2) // 2, (y1 + y2) // 2)) == COLOR_RGB[ex.answer]

    # The black ring touches all four sides of the box (it is the outer box); the square's pixels are all inside the box,
    # and nothing else in the box has a palette colour (distractors keep out).
    box = ex.image.crop(ex.target_box)
    black = color_mask(box, (0, 0, 0), tol=10)
    assert black[0].any() and black[-1].any() and black[:, 0].any() and black[:, -1].any()
    side = ex.meta["square_box"][2] - ex.meta["square_box"][0]
    assert (np.asarray(box) == COLOR_RGB[ex.answer]).all(axis=-1).sum() == side * side
    for name, rgb in COLOR_RGB.items():
        if name != ex.answer:
            assert not (np.asarray(box) == rgb).all(axis=-1).any()
    assert describe_target(ex) == f"a {ex.answer} square inside a black ring"


def test_easy_fraction_roughly_respected():
    cfg = SyntheticConfig(canvas_size=512, easy_fraction=0.3, easy_target_size=(60, 80))
    easy = [generate_example(0, i, cfg).meta["easy"] for i in range(200)]
    assert 0.2 < np.mean(easy) < 0.4
    assert not any(generate_example(0, i, CFG).meta["easy"] for i in range(20))


def test_answers_cover_all_colours():
    answers = {generate_example(2, i, CFG).answer for i in range(60)}
    assert answers == set(CFG.colors)


@pytest.mark.parametrize("index", range(6))
def test_square_small_at_model_resolution_but_clear_in_zoom(index):
    """At 224 px the square fills under a tenth of one 28-px token cell; a 112-px zoom
    of the ring's box shows at least a 25 x 25 patch of it."""
    ex = generate_example(5, index, CFG)
    rgb = COLOR_RGB[ex.answer]
    low = ex.image.resize((224, 224), Image.Resampling.BICUBIC)
    x1, y1, x2, y2 = (round(v * 224 / CFG.canvas_size) for v in ex.target_box)
    near = color_mask(low.crop((x1 - 2, y1 - 2, x2 + 2, y2 + 2)), rgb)
    assert near.sum() < 28 * 28 / 10

    crop, _ = zoom(ex.image, ex.target_box)
    assert color_mask(crop, rgb).sum() > 25 * 25


def test_bad_config_rejected():
    with pytest.raises(ValueError):
        SyntheticConfig(colors=("red", "chartreuse"))
    with pytest.raises(ValueError):
        SyntheticConfig(canvas_size=50)
