"""The shipped tiny CLIP: it tells colours and shapes apart on held-out crops, and
ClipScorer's contract (batching, range, zero for invalid items, clear errors)."""
import random

import pytest
import torch
from PIL import Image

from mmagent_rl.data.synthetic import COLOR_RGB, SyntheticConfig, SyntheticDataset, describe_target
from mmagent_rl.models.tiny_clip import heldout_crops, sample_crops
from mmagent_rl.reward.clip_model import EMBEDDED_WEIGHTS, ClipScorer, load_clip

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def scorer():
    return ClipScorer("embedded", batch_size=16)


@pytest.fixture(scope="module")
def crops():
    return heldout_crops(40)  # the synthetic "test" split: never trained on


def _win_rate(scorer, images, true, wrong):
    good, bad = scorer.score(true, images), scorer.score(wrong, images)
    return sum(g > b for g, b in zip(good, bad)) / len(images)


def test_shipped_file_is_small():
    assert EMBEDDED_WEIGHTS.is_file()
    assert EMBEDDED_WEIGHTS.stat().st_size < 8_000_000


def test_target_colour_beats_other_colours(scorer):
    # Crops built here from describe_target, independently of the module's own eval.
    rng = random.Random(123)
    images, true, wrong = [], [], []
    for ex in SyntheticDataset(SyntheticConfig(), seed=5, size=30, split="test"):
        for c in sample_crops(ex, rng, {"target": 2}):
            for other in COLOR_RGB:
                if other != ex.answer:
                    images.append(c.image)
                    true.append(describe_target(ex))
                    wrong.append(f"a {other} square inside a black ring")
    assert len(images) >= 250
    assert _win_rate(scorer, images, true, wrong) >= 0.9


def test_shape_beats_wrong_shape(scorer, crops):
    targets = [c for c in crops if c.kind == "target"]
    circles = [c for c in crops if c.kind == "circle"]
    assert len(targets) >= 40 and len(circles) >= 40
    assert _win_rate(scorer, [c.image for c in targets],
                     [f"a {c.color} square inside a black ring" for c in targets],
                     [f"a {c.color} circle" for c in targets]) >= 0.9
    assert _win_rate(scorer, [c.image for c in circles],
                     [f"a large {c.color} circle" for c in circles],
                     [f"a {c.color} square inside a black ring" for c in circles]) >= 0.9
    backgrounds = [c for c in crops if c.kind == "background"]
    assert _win_rate(scorer, [c.image for c in backgrounds],
                     ["white background with small specks"] * len(backgrounds),
                     ["a red square inside a black ring"] * len(backgrounds)) >= 0.9


def test_batched_equals_one_by_one_and_in_range(scorer, crops):
    items = crops[:37]  # not a multiple of the batch size
    texts = [f"a {c.color or 'red'} square inside a black ring" for c in items]
    texts[3] = texts[5] = "a large blue circle"  # repeated labels are encoded once
    batched = scorer.score(texts, [c.image for c in items])
    single = [scorer.score([t], [c.image])[0] for t, c in zip(texts, items)]
    assert batched == pytest.approx(single, abs=1e-5)
    assert all(0.0 <= s <= 1.0 for s in batched)


def test_invalid_items_score_zero(scorer, crops):
    image = crops[0].image
    descriptions = ["a red square inside a black ring", None, "   ", " ".join(["word"] * 17),
                    " ".join(["word"] * 16), "a red square inside a black ring"]
    images = [image, image, image, image, image, None]
    scores, statuses = scorer.score_detailed(descriptions, images)
    assert statuses == ["ok", "missing", "missing", "too_long", "ok", "no_image"]
    assert scores[1:4] == [0.0, 0.0, 0.0] and scores[5] == 0.0
    assert scores[0] > 0.0 and scores[4] > 0.0
    assert scorer.score([], []) == []
    with pytest.raises(ValueError, match="descriptions"):
        scorer.score(["a"], [])


def test_non_rgb_image_is_accepted(scorer, crops):
    grey = crops[0].image.convert("L")
    assert 0.0 <= scorer.score(["empty background"], [grey])[0] <= 1.0
    rgba = Image.new("RGBA", (112, 56), (255, 255, 255, 255))
    assert 0.0 <= scorer.score(["empty background"], [rgba])[0] <= 1.0


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown CLIP architecture"):
        load_clip("ViT-Nonexistent-99")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_clip("embedded", checkpoint=tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match="not found"):
        ClipScorer("RN50", checkpoint=str(tmp_path / "missing.pt"))
