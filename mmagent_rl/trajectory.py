"""The one contract between rollout, reward and learner.

A Trajectory is token-in / token-out: ``token_ids`` is exactly what the policy saw and
produced, with every image's ``<|image_pad|>`` run already expanded to the number of
merged vision tokens, so the learner can feed it to the HF model unchanged.
``loss_mask`` is 1 on tokens the policy sampled and 0 on prompt, observation and
padding tokens; ``logprobs`` holds the engine's log-probability of each sampled token
(0.0 where the mask is 0).
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image


@dataclass
class ToolCall:
    """One parsed (or failed) tool call and what the tool returned (an image: the
    ``image_index``-th of Trajectory.images; a text: ``result_text``; or ``error``)."""

    turn: int  # index of the assistant turn that made the call
    raw: str  # text between <tool_call> and </tool_call>
    name: str | None = None
    bbox: tuple[float, float, float, float] | None = None  # as the model asked
    crop_box: tuple[int, int, int, int] | None = None  # what was really cut
    label: str | None = None  # the model's description of what it will see
    error: str | None = None  # None when the tool ran
    image_index: int | None = None  # index into Trajectory.images of the returned image
    # token span [start, end) of this call's assistant turn in Trajectory.token_ids
    span: tuple[int, int] | None = None
    # The arguments the tool was called with, as its validate() returned them (None when
    # the call did not parse); bbox and label above are the zoom's, read from them.
    arguments: dict[str, Any] | None = None
    result_text: str | None = None  # a tool's text result, as shown to the model
    latency_s: float | None = None  # wall time of the tool's run (None: it never ran)

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Trajectory:
    prompt_id: str  # rollouts sharing a prompt_id form a group
    sample_idx: int
    token_ids: list[int]
    loss_mask: list[int]
    logprobs: list[float]
    images: list[Image.Image]  # original image(s) first, then crops in order
    prompt_len: int
    ground_truth: str = ""
    response_text: str = ""  # all generated text, turns joined
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str = ""  # "answer" | "eos" | "max_turns" | "max_tokens" | ...
    reward: float | None = None
    reward_info: dict[str, float] = field(default_factory=dict)
    # Where it came from and how it went (set by the agent loop and the rollout worker).
    example_id: str = ""
    target_box: tuple[int, int, int, int] | None = None  # the example's evidence box
    image_size: tuple[int, int] | None = None  # (width, height) of the original image
    question: str = ""  # the example's question (model-judged rewards read it)
    answer_type: str = "exact"  # the example's (reward.match_mode=auto)
    turns: int = 0  # assistant turns completed
    turn_texts: list[str] = field(default_factory=list)  # each turn's generated text
    weights_version: int | None = None  # the weights it was sampled with
    # A cut prefix to continue (AXPO): the fork turn's text generated before the cut.
    partial_text: str = ""
    padding: bool = False  # a zero-mask copy that evens out the learners' shards
    # The example's own scalar metadata (data-specific), and an algorithm's scratch.
    meta: dict[str, Any] = field(default_factory=dict)
    # Per-token advantage the learner uses; set by the driver (algos/), None before.
    advantages: list[float] | None = None
    # Set by the reward actor when the algorithm asks for alignment scores (MAPO): per
    # tool call, the CLIP score in [0, 1] (0 when invalid) and its status ("ok",
    # "missing", "too_long", ...).
    align_scores: list[float] | None = None
    align_statuses: list[str] | None = None

    def __post_init__(self) -> None:
        n = len(self.token_ids)
        if len(self.loss_mask) != n or len(self.logprobs) != n:
            raise ValueError(
                f"token_ids/loss_mask/logprobs lengths differ: "
                f"{n}/{len(self.loss_mask)}/{len(self.logprobs)}"
            )

    @property
    def num_generated(self) -> int:
        return int(sum(self.loss_mask))

    @property
    def used_tool(self) -> bool:
        """True if the rollout made at least one tool call (well-formed or not)."""
        return len(self.tool_calls) > 0

    @property
    def correct(self) -> bool:
        return bool(self.reward_info.get("correct", 0.0) > 0.5)


def group_by_prompt(trajs: list[Trajectory]) -> dict[str, list[Trajectory]]:
    """Groups in first-seen order (dicts keep insertion order)."""
    groups: dict[str, list[Trajectory]] = {}
    for t in trajs:
        groups.setdefault(t.prompt_id, []).append(t)
    return groups


_DESCRIPTION_RE = re.compile(r"<description>(.*?)</description>", re.DOTALL)


def extract_post_description(turn_text: str) -> str | None:
    """Stripped content of the first ``<description>...</description>``, else None."""
    m = _DESCRIPTION_RE.search(turn_text or "")
    return m.group(1).strip() if m else None


def description_for_call(traj: Trajectory, call_index: int, mode: str,
                         turn_texts: Sequence[str] | None = None) -> str | None:
    """What a tool call says it fetched (MAPO scores it against the crop).

    ``mode`` "label": the call's ``label``. "post": the ``<description>`` in the *next*
    assistant turn (``turn_texts[call.turn + 1]``; the model writes it after seeing the
    crop); None when ``turn_texts`` is None or there is no next turn (cut by max_turns).
    """
    call = traj.tool_calls[call_index]
    if mode == "label":
        return call.label
    nxt = call.turn + 1
    if turn_texts is None or nxt >= len(turn_texts):
        return None
    return extract_post_description(turn_texts[nxt])
