"""Task reward: is the final <answer> right, and is the response well formed?

The reward function is a plugin: ``load_reward_fn("pkg.module:function")`` returns any
callable with the signature of ``default_reward``: ``fn(response_text, ground_truth, *,
match_mode, format_weight, **_) -> (reward, info)``. ``match_mode`` is always concrete
(exact | choice | number: ``auto`` is resolved per trajectory by the scorer). The scorer
also passes ``question`` (and ``judge``, the reward.judge section) to a plugin that takes
them by name or takes ``**kwargs``. A plugin may be ``async def``: the scorer then runs a
whole batch concurrently (reward/worker.py; reward/judge.py is one).
"""
from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable

from mmagent_rl.tools.parse import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
MATCH_MODES = ("exact", "choice", "number")
# reward.match_mode=auto: each trajectory's own answer_type (one of MATCH_MODES) decides.
AUTO_MODE = "auto"
# Chat end markers a decoded response may still carry; they do not break the format.
_END_MARKERS = ("<|im_end|>", "<|endoftext|>")

_ANSWER_RE = re.compile(re.escape(ANSWER_OPEN) + r"(.*?)" + re.escape(ANSWER_CLOSE), re.DOTALL)
# "(B)", "[B]", "B.", "B)", "B:", "b", "B some text"; not the "B" of "Blue".
_CHOICE_RE = re.compile(r"^[(\[]?([a-z])(?:[)\].:]|\s|$)")
_THOUSANDS_RE = re.compile(r"(?<=\d),(?=\d{3}\b)")
_TOOL_TAG_RE = re.compile(re.escape(TOOL_CALL_OPEN) + "|" + re.escape(TOOL_CALL_CLOSE))


def extract_answer(text: str) -> str | None:
    """Stripped content of the last <answer>...</answer>, or None."""
    found = _ANSWER_RE.findall(text)
    return found[-1].strip() if found else None


def normalize(s: str) -> str:
    """Lowercase, collapse whitespace, drop trailing punctuation ("Red." == "red")."""
    s = " ".join(s.lower().split())
    return s.rstrip(".,;:!? ").strip()


def _choice_letter(s: str) -> str | None:
    m = _CHOICE_RE.match(normalize(s))
    return m.group(1) if m else None


def _as_number(s: str) -> float | None:
    try:
        value = float(_THOUSANDS_RE.sub("", normalize(s)))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def answers_match(pred: str | None, gt: str, mode: str = "exact") -> bool:
    if mode not in MATCH_MODES:
        raise ValueError(f"unknown match mode {mode!r}; expected one of {MATCH_MODES}")
    if pred is None:
        return False
    if mode == "exact":
        return normalize(pred) == normalize(gt)
    if mode == "choice":
        want = _choice_letter(gt)
        if want is None:  # ground truth written as the option text, not a letter
            return normalize(pred) == normalize(gt)
        return _choice_letter(pred) == want
    got, want = _as_number(pred), _as_number(gt)
    if got is None or want is None:
        return False
    return math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-12)


def resolve_match_mode(mode: str, answer_type: str) -> str:
    """The concrete mode for one trajectory: ``mode`` itself, or under ``auto`` the
    example's ``answer_type``. ValueError for a mode (or answer_type) not in MATCH_MODES."""
    concrete = answer_type if mode == AUTO_MODE else mode
    if concrete not in MATCH_MODES:
        what = f"answer_type {answer_type!r} (reward.match_mode=auto)" \
            if mode == AUTO_MODE else f"match mode {mode!r}"
        raise ValueError(f"unknown {what}; expected one of {MATCH_MODES}")
    return concrete


def _tool_calls_closed(text: str) -> bool:
    """Every <tool_call> is closed before the next one opens; no stray closes."""
    inside = False
    for m in _TOOL_TAG_RE.finditer(text):
        is_open = m.group() == TOOL_CALL_OPEN
        if is_open == inside:  # open inside a call, or close outside one
            return False
        inside = is_open
    return not inside


def format_ok(response_text: str) -> bool:
    """Exactly one <answer>...</answer>, at the very end, and all tool calls closed."""
    text = response_text.strip()
    for marker in _END_MARKERS:
        text = text.removesuffix(marker).rstrip()
    if text.count(ANSWER_OPEN) != 1 or text.count(ANSWER_CLOSE) != 1:
        return False
    if not text.endswith(ANSWER_CLOSE) or text.find(ANSWER_OPEN) > text.find(ANSWER_CLOSE):
        return False
    return _tool_calls_closed(text)


def default_reward(
    response_text: str,
    ground_truth: str,
    *,
    match_mode: str = "exact",
    format_weight: float = 0.0,
    **_,
) -> tuple[float, dict[str, float]]:
    """reward = correct + format_weight * format_ok, with the parts in the info dict."""
    answer = extract_answer(response_text)
    correct = float(answers_match(answer, ground_truth, match_mode))
    fmt = float(format_ok(response_text))
    info = {"correct": correct, "format_ok": fmt, "has_answer": float(answer is not None)}
    return correct + format_weight * fmt, info


def load_reward_fn(import_path: str) -> Callable[..., tuple[float, dict[str, float]]]:
    """Import "pkg.module:function"; ValueError with the reason if that fails."""
    module_name, sep, attr = import_path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward function must be given as 'pkg.module:function', "
                         f"got {import_path!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or the module's own import-time error
        raise ValueError(f"cannot import module {module_name!r} for reward function "
                         f"{import_path!r}: {type(exc).__name__}: {exc}") from exc
    fn = getattr(module, attr, None)
    if fn is None:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise ValueError(f"{import_path!r} is not callable (it is a {type(fn).__name__})")
    return fn
