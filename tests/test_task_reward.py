import pytest

from mmagent_rl.reward.task import (
    answers_match,
    default_reward,
    extract_answer,
    format_ok,
    load_reward_fn,
    normalize,
)

CALL = '<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [1, 2, 3, 4]}}</tool_call>'


def test_extract_answer_takes_last():
    assert extract_answer("<answer> red </answer> then <answer>Blue</answer>") == "Blue"
    assert extract_answer("<answer>\nmulti\nline\n</answer>") == "multi\nline"
    assert extract_answer("no answer") is None
    assert extract_answer("<answer>unclosed") is None


def test_normalize():
    assert normalize("  The  Red\tSquare.  ") == "the red square"
    assert normalize("Red!?") == "red"
    assert normalize("") == ""


@pytest.mark.parametrize(
    "pred, gt, mode, expected",
    [
        ("Red.", "red", "exact", True),
        ("  RED  ", "red", "exact", True),
        ("dark red", "red", "exact", False),
        (None, "red", "exact", False),
        ("(B)", "B", "choice", True),
        ("B.", "b", "choice", True),
        ("b", "(B)", "choice", True),
        ("B) a cat", "B", "choice", True),
        ("[C]", "C", "choice", True),
        ("A", "B", "choice", False),
        ("Blue", "B", "choice", False),  # a word starting with B is not option B
        ("a cat", "A cat", "choice", True),  # ground truth without a letter form
        ("3.0", "3", "number", True),
        ("1,000", "1000", "number", True),
        ("0.1234567", "0.1234568", "number", True),  # within rel tol 1e-6
        ("0.123", "0.124", "number", False),
        ("three", "3", "number", False),
        ("nan", "nan", "number", False),
        ("0", "0.0", "number", True),
    ],
)
def test_answers_match(pred, gt, mode, expected):
    assert answers_match(pred, gt, mode) is expected


def test_unknown_mode_lists_modes():
    with pytest.raises(ValueError, match="exact.*choice.*number"):
        answers_match("a", "a", mode="fuzzy")


@pytest.mark.parametrize(
    "text, ok",
    [
        ("<answer>red</answer>", True),
        (f"I look. {CALL} The crop shows red. <answer>red</answer>", True),
        (f"{CALL} {CALL} <answer>red</answer>\n", True),
        ("<answer>red</answer><|im_end|>", True),
        ("thinking only", False),
        ("<answer>red</answer> trailing words", False),
        ("<answer>red</answer><answer>blue</answer>", False),
        ("<answer>red", False),
        ("</answer>red<answer>", False),
        ("<tool_call>{} <answer>red</answer>", False),  # unclosed call
        ("</tool_call> <answer>red</answer>", False),  # stray close
        ("<tool_call><tool_call>{}</tool_call> <answer>red</answer>", False),
    ],
)
def test_format_ok(text, ok):
    assert format_ok(text) is ok


def test_default_reward():
    reward, info = default_reward(f"{CALL} <answer>Red</answer>", "red")
    assert reward == 1.0
    assert info == {"correct": 1.0, "format_ok": 1.0, "has_answer": 1.0}

    reward, info = default_reward("<answer>blue</answer> oops", "red", format_weight=0.5)
    assert reward == 0.0 and info["format_ok"] == 0.0 and info["has_answer"] == 1.0

    reward, info = default_reward("<answer>blue</answer>", "red", format_weight=0.5)
    assert reward == 0.5

    reward, info = default_reward("no answer", "red")
    assert reward == 0.0 and info["has_answer"] == 0.0
    assert all(isinstance(v, float) for v in info.values())

    reward, _ = default_reward("<answer>(C)</answer>", "C", match_mode="choice")
    assert reward == 1.0


def test_load_reward_fn():
    assert load_reward_fn("mmagent_rl.reward.task:default_reward") is default_reward
    for bad, fragment in [
        ("mmagent_rl.reward.task.default_reward", "pkg.module:function"),
        ("no_such_module_xyz:fn", "cannot import"),
        ("mmagent_rl.reward.task:missing_fn", "no attribute"),
        ("mmagent_rl.reward.task:MATCH_MODES", "not callable"),
    ]:
        with pytest.raises(ValueError, match=fragment):
            load_reward_fn(bad)
