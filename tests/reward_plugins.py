"""Reward plugins for tests, loaded by import path like any user plugin.

A random tiny model never answers, so the task reward is always 0 and GRPO would see
no signal; this one rewards short responses, which gives every group a spread."""


def shortness_reward(response_text: str, ground_truth: str, **_):
    r = 1.0 / (1.0 + len(response_text))
    return r, {"correct": 0.0, "has_answer": 0.0}
