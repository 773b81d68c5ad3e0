import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from mmagent_rl.tools.parse import (
    ParsedCall,
    find_tool_call,
    has_unterminated_call,
    parse_tool_call,
)
from mmagent_rl.tools.zoom import ToolError, is_valid_box, run_tool, zoom


def coord_image(width=300, height=200) -> Image.Image:
    """R = x, G = y (mod 256), so a crop's pixels tell where they came from."""
    ys, xs = np.mgrid[0:height, 0:width]
    arr = np.stack([xs % 256, ys % 256, np.full_like(xs, 7)], axis=-1).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def call(bbox, label="the thing", name="image_zoom_in_tool") -> str:
    return json.dumps({"name": name, "arguments": {"bbox_2d": bbox, "label": label}})


# --- finding the call in the turn -------------------------------------------------

def test_find_tool_call_takes_last_complete_pair():
    text = "think <tool_call>{a}</tool_call> more <tool_call>{b}</tool_call>"
    assert find_tool_call(text) == "{b}"
    assert find_tool_call("no call here") is None


def test_unterminated_call():
    text = 'I will zoom <tool_call>{"name": "image_zoom'
    assert find_tool_call(text) is None
    assert has_unterminated_call(text)
    assert not has_unterminated_call("<tool_call>{}</tool_call>")
    assert not has_unterminated_call("plain text")


# --- parsing ------------------------------------------------------------------------

def test_parse_good_call():
    p = parse_tool_call(call([10, 20, 110, 120.5], label="  a red square  "))
    assert p.ok and p.error is None
    assert p.name == "image_zoom_in_tool"
    assert p.bbox == (10.0, 20.0, 110.0, 120.5)
    assert p.label == "a red square"


def test_label_is_optional_and_capped():
    raw = json.dumps({"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [0, 0, 5, 5]}})
    assert parse_tool_call(raw).label is None
    assert len(parse_tool_call(call([0, 0, 5, 5], label="x" * 2000)).label) == 512


@pytest.mark.parametrize(
    "raw, fragment",
    [
        ("not json", "not valid JSON"),
        ("[1, 2, 3]", "must be a JSON object"),
        ('{"arguments": {"bbox_2d": [0, 0, 5, 5]}}', 'missing "name"'),
        (call([0, 0, 5, 5], name="crop_tool"), "unknown tool"),
        (json.dumps({"name": 3, "arguments": {}}), "unknown tool"),
        ('{"name": "image_zoom_in_tool"}', 'missing "arguments"'),
        ('{"name": "image_zoom_in_tool", "arguments": [1]}', "must be a JSON object"),
        ('{"name": "image_zoom_in_tool", "arguments": {}}', 'missing "bbox_2d"'),
        (call([0, 0, 5]), "list of 4"),
        (call("0,0,5,5"), "list of 4"),
        (call([0, 0, "5", 5]), "4 finite numbers"),
        (call([0, 0, True, 5]), "4 finite numbers"),
        (call([0, 0, None, 5]), "4 finite numbers"),
        ('{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [0, 0, NaN, 5]}}', "finite"),
        ('{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [0, 0, Infinity, 5]}}', "finite"),
        (call([0, 0, 1e7, 5]), "finite"),
        (call([0, 0, 10**400, 5]), "finite"),
        (call([0, 0, 5, 5], label=42), '"label" must be a string'),
    ],
)
def test_bad_calls_give_error_messages(raw, fragment):
    p = parse_tool_call(raw)
    assert p.error is not None and p.error.startswith("Error: ")
    assert fragment in p.error
    assert p.bbox is None


def test_unknown_tool_lists_known_tools():
    assert "image_zoom_in_tool" in parse_tool_call(call([0, 0, 5, 5], name="x")).error


# --- zoom ------------------------------------------------------------------------------

def test_crop_content_matches_box():
    img = coord_image()
    crop, box = zoom(img, (40, 30, 152, 86), out_max_side=10_000)  # no downscale blur
    assert box == (40, 30, 152, 86)
    assert crop.size[0] % 28 == 0 and crop.size[1] % 28 == 0
    raw = img.crop(box)  # the cut itself, before resizing
    arr = np.asarray(raw)
    assert arr[0, 0, 0] == 40 and arr[0, 0, 1] == 30
    assert arr[-1, -1, 0] == 151 and arr[-1, -1, 1] == 85


def test_crop_resized_region_is_right():
    img = coord_image()
    crop, box = zoom(img, (100, 50, 212, 162))  # 112 x 112 -> 112 x 112, no resampling
    assert crop.size == (112, 112)
    arr = np.asarray(crop).astype(int)
    assert abs(arr[0, 0, 0] - 100) <= 1 and abs(arr[0, 0, 1] - 50) <= 1
    assert abs(arr[60, 80, 0] - 180) <= 1 and abs(arr[60, 80, 1] - 110) <= 1


def test_rounding_is_outward():
    _, box = zoom(coord_image(), (10.7, 20.2, 60.1, 70.9))
    assert box == (10, 20, 61, 71)


def test_clamping_to_image():
    _, box = zoom(coord_image(300, 200), (-50, -10, 100, 500))
    assert box == (0, 0, 100, 200)


def test_box_outside_names_image_size():
    with pytest.raises(ToolError, match="300x200"):
        zoom(coord_image(300, 200), (400, 10, 500, 50))


@pytest.mark.parametrize("bbox", [(50, 10, 20, 40), (10, 40, 20, 30)])
def test_inverted_box_is_error(bbox):
    with pytest.raises(ToolError, match="inverted"):
        zoom(coord_image(), bbox)


@pytest.mark.parametrize("bbox", [(10, 10, 10, 40), (10, 10, 40, 10)])
def test_zero_area_box_is_error(bbox):
    with pytest.raises(ToolError, match="zero area") as err:
        zoom(coord_image(), bbox)
    assert str(err.value).startswith("Error: ")


def test_small_box_enlarged_around_centre():
    _, box = zoom(coord_image(), (100, 100, 110, 104), min_size=28)
    assert box == (91, 88, 119, 116)  # centre (105, 102) kept, 28 x 28


def test_small_box_near_border_shifted_inside():
    img = coord_image(300, 200)
    _, box = zoom(img, (0, 0, 5, 5))
    assert box == (0, 0, 28, 28)
    _, box = zoom(img, (295, 195, 300, 200))
    assert box == (272, 172, 300, 200)


def test_min_size_never_exceeds_image():
    img = coord_image(20, 10)
    crop, box = zoom(img, (2, 2, 4, 4), min_size=28)
    assert box == (0, 0, 20, 10)
    assert crop.size[0] % 28 == 0 and crop.size[1] % 28 == 0


@pytest.mark.parametrize(
    "bbox, expected",
    [
        ((0, 0, 100, 100), (112, 112)),
        ((0, 0, 200, 100), (112, 56)),
        ((0, 0, 50, 190), (28, 112)),  # 112 * 50/190 = 29.5 -> 28
        ((0, 0, 290, 30), (112, 28)),  # very thin: shorter side floors at 28
    ],
)
def test_output_sides_multiple_of_28(bbox, expected):
    crop, _ = zoom(coord_image(300, 200), bbox)
    assert crop.size == expected
    assert crop.mode == "RGB"


def test_non_rgb_image_gives_rgb_crop():
    img = Image.new("L", (100, 100), 128)
    crop, _ = zoom(img, (0, 0, 50, 50))
    assert crop.mode == "RGB"


@pytest.mark.parametrize(
    "bbox, ok",
    [
        ((0, 0, 300, 200), True),
        ([10.5, 20, 30, 40.25], True),
        ((0, 0, 301, 200), False),
        ((-1, 0, 10, 10), False),
        ((10, 10, 10, 20), False),
        ((20, 10, 10, 20), False),
        ((0, 0, 9224, 20), False),
        ((0, 0, float("nan"), 20), False),
        ((0, 0, float("inf"), 20), False),
        ((0, 0, True, 20), False),
        ((0, 0, "5", 20), False),
        ((0, 0, 5), False),
        ("0 0 5 5", False),
        (None, False),
    ],
)
def test_is_valid_box(bbox, ok):
    assert is_valid_box(bbox, 300, 200) is ok


# --- run_tool --------------------------------------------------------------------------

def test_run_tool_success_and_errors():
    img = coord_image()
    crop, box, err = run_tool(parse_tool_call(call([10, 10, 60, 60])), img)
    assert err is None and box == (10, 10, 60, 60) and crop.size == (112, 112)

    for parsed in [
        parse_tool_call("{bad"),
        parse_tool_call(call([60, 10, 10, 60])),
        ParsedCall(name="other", bbox=(0, 0, 5, 5), label=None, error=None),
        ParsedCall(name="image_zoom_in_tool", bbox=None, label=None, error=None),
        ParsedCall(name="image_zoom_in_tool", bbox=(0, 0, math.nan, 5), label=None, error=None),
    ]:
        crop, box, err = run_tool(parsed, img)
        assert crop is None and box is None
        assert err.startswith("Error: ")


# --- fuzz: never raise ----------------------------------------------------------------

FUZZ_IMAGE = coord_image(64, 48)
numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.sampled_from([0, 1, 47, 48, 63, 64, -1, 1e6, 1e6 + 1, -0.0]),
)
json_leaf = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=10))
json_ish = st.recursive(
    json_leaf,
    lambda inner: st.one_of(st.lists(inner, max_size=5),
                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)
call_dicts = st.fixed_dictionaries(
    {"name": st.one_of(st.just("image_zoom_in_tool"), json_ish)},
    optional={"arguments": st.one_of(
        st.fixed_dictionaries({"bbox_2d": st.one_of(st.lists(numbers, min_size=0, max_size=6),
                                                     json_ish)},
                              optional={"label": json_ish}),
        json_ish,
    )},
)


def _check_total(raw: str) -> None:
    parsed = parse_tool_call(raw)
    assert isinstance(parsed, ParsedCall)
    assert (parsed.error is None) == (parsed.bbox is not None)
    crop, box, err = run_tool(parsed, FUZZ_IMAGE)
    assert (err is None) == (crop is not None)
    if err is None:
        assert crop.size[0] % 28 == 0 and crop.size[1] % 28 == 0
        assert is_valid_box(box, 64, 48)
    else:
        assert err.startswith("Error: ")
        assert "tool failed" not in err  # only the catch-all for bugs says this


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_fuzz_arbitrary_text(text):
    _check_total(text)
    find_tool_call(text)
    has_unterminated_call(text)


@settings(max_examples=300, deadline=None)
@given(call_dicts)
def test_fuzz_json_dicts(obj):
    _check_total(json.dumps(obj))  # allow_nan: NaN/Infinity appear in the JSON text


@settings(max_examples=300, deadline=None)
@given(st.lists(numbers, min_size=4, max_size=4))
def test_fuzz_boxes(bbox):
    parsed = ParsedCall(name="image_zoom_in_tool", bbox=tuple(bbox), label=None, error=None)
    crop, box, err = run_tool(parsed, FUZZ_IMAGE)
    assert (err is None) == (crop is not None)
    assert err is None or "tool failed" not in err
    _check_total(call(bbox))
