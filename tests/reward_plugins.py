"""Reward plugins for tests, loaded by import path like any user plugin.

A random tiny model never answers, so the task reward is always 0 and GRPO would see
no signal; this one rewards short responses, which gives every group a spread."""


def shortness_reward(response_text: str, ground_truth: str, **_):
    r = 1.0 / (1.0 + len(response_text))
    return r, {"correct": 0.0, "has_answer": 0.0}


def _answer(response_text: str):
    """The normalised answer, or None."""
    from mmagent_rl.reward.task import extract_answer, normalize

    answer = extract_answer(response_text)
    return None if answer is None else normalize(answer)


def red_answer_reward(response_text: str, ground_truth: str, **_):
    """1 for answering "red", whatever the square's colour: a preference the shipped agent
    can learn within a few steps (tests/test_learning.py). "correct" stays the task's."""
    from mmagent_rl.reward.task import normalize

    answer = _answer(response_text)
    return float(answer == "red"), {"correct": float(answer is not None
                                                     and answer == normalize(ground_truth)),
                                    "has_answer": float(answer is not None)}


def red_is_correct_reward(response_text: str, ground_truth: str, **_):
    """Only "red" counts as correct: most groups of the shipped agent (which reads the
    real colour half the time or more) are then all wrong, which is what AXPO's trigger
    needs (tests/test_axpo_e2e.py)."""
    answer = _answer(response_text)
    red = float(answer == "red")
    return red, {"correct": red, "has_answer": float(answer is not None)}
