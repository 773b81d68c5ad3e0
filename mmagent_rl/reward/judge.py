"""Model-judged task reward: a chat model behind an OpenAI-compatible server (``vllm
serve`` or any other) says whether the extracted <answer> means the same as the ground
truth. Use it with ``reward.fn=mmagent_rl.reward.judge:judge_reward``; its settings are
``reward.judge`` (``JudgeConfig`` in config.py; docs/rewards.md).

It is an ``async def`` plugin, so the reward scorer sends a whole batch at once
(reward/worker.py), at most ``concurrency`` requests in flight. Only the text of the last
``<answer>...</answer>`` is judged; a response without one scores 0 without a request.

A judge that fails never fails the step: a timeout, a refused connection, HTTP 429/5xx or
a body that is not a chat completion is retried (``retries``, exponential backoff);
after that, or at once for another HTTP error or a reply that is neither yes nor no, the
trajectory is scored by the fallback (``fallback``: rule = the rule-based match of
reward.match_mode, zero = wrong) and its info says ``judge_error=1``; the trainer sums
these into ``reward/judge_errors``.

Info per trajectory: ``correct`` (1/0), ``format_ok``, ``has_answer``, ``judge_ok`` (1:
the judge gave a verdict), ``judge_error`` (1: the fallback scored it) and, when a request
was made, ``judge_latency_s`` (from the first request to the verdict or the giving up,
retries included, waiting for a concurrency slot excluded).
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import weakref

from mmagent_rl.reward.task import answers_match, extract_answer, format_ok

log = logging.getLogger(__name__)

DEFAULT_PROMPT = (
    "You are grading the answer to a question about an image. You cannot see the image; "
    "compare the given answer with the reference answer only.\n\n"
    "Question: {question}\n"
    "Reference answer: {ground_truth}\n"
    "Given answer: {answer}\n\n"
    "Does the given answer mean the same as the reference answer (wording, case and "
    "small formatting differences do not matter)? Reply with one word: yes or no."
)
VERDICTS = ("yes", "no")
FALLBACKS = ("rule", "zero")

_FIELD_RE = re.compile(r"\{(question|answer|ground_truth)\}")
_WORDS = {"yes": True, "no": False, "correct": True, "incorrect": False,
          "true": True, "false": False}
_LABEL_RE = re.compile(r"^(?:final\s+)?(?:verdict|judge?ment|answer)\s*[:=\-]\s*")
_JSON_KEYS = ("verdict", "judgement", "judgment", "correct", "answer")


class JudgeError(Exception):
    """No verdict from the judge; ``retryable``: worth another attempt."""

    def __init__(self, msg: str, retryable: bool):
        super().__init__(msg)
        self.retryable = retryable


def render_prompt(template: str | None, question: str, answer: str, ground_truth: str) -> str:
    """The template with {question} {answer} {ground_truth} filled in one pass (a field
    name inside the policy's answer stays text); other braces are kept as they are."""
    values = {"question": question, "answer": answer, "ground_truth": ground_truth}
    return _FIELD_RE.sub(lambda m: values[m.group(1)], template or DEFAULT_PROMPT)


def parse_verdict(text) -> bool | None:
    """True (yes), False (no) or None (not a verdict). Accepted, in any case and with
    surrounding whitespace, quotes, ``*`` or punctuation: a reply whose first word is
    yes/no (or correct/incorrect, true/false), optionally after a "Verdict:" label, and
    JSON such as {"verdict": "yes"} or {"correct": true} (also in a ``` fence)."""
    if not isinstance(text, str):
        return None
    s = text.strip()
    if s.startswith("```"):
        s = s.strip("`").strip()
        s = s[4:].strip() if s.lower().startswith("json") else s
    if s.startswith("{"):
        try:
            obj = json.loads(s)
        except ValueError:
            return None
        if not isinstance(obj, dict):
            return None
        lower = {str(k).lower(): v for k, v in obj.items()}
        for key in _JSON_KEYS:
            if key in lower:
                v = lower[key]
                if isinstance(v, bool):
                    return v
                return _word_verdict(v) if isinstance(v, str) else None
        return None
    return _word_verdict(s)


def _word_verdict(s: str) -> bool | None:
    s = _LABEL_RE.sub("", s.strip().strip("*\"'`").strip().lower())
    words = re.findall(r"[a-z]+", s)
    return _WORDS.get(words[0]) if words else None


def _get(cfg, key: str, default=None):
    """A JudgeConfig field (a dataclass or a mapping)."""
    return cfg.get(key, default) if isinstance(cfg, dict) else getattr(cfg, key, default)


# Per event loop (the scorer runs each batch in a loop of its own): one semaphore per
# endpoint (an asyncio.Semaphore belongs to one loop) and whether a failure was logged.
_SEMAPHORES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_SSL_CONTEXT = None


def _semaphore(url: str, concurrency: int) -> asyncio.Semaphore:
    per_loop = _SEMAPHORES.setdefault(asyncio.get_running_loop(), {})
    key = (url, concurrency)
    if key not in per_loop:
        per_loop[key] = asyncio.Semaphore(max(1, int(concurrency)))
    return per_loop[key]


def _warn_once(msg: str) -> None:
    """A warning for the first failure of a batch (one event loop), debug after that: a
    judge that is down would otherwise log once per trajectory."""
    per_loop = _SEMAPHORES.setdefault(asyncio.get_running_loop(), {})
    if per_loop.get("warned"):
        log.debug(msg)
    else:
        per_loop["warned"] = True
        log.warning(msg + " [further failures of this batch are logged at debug level]")


def _ssl_context():
    """Built once: loading the CA bundle costs ~35 ms, a client per request ~0.5 ms."""
    global _SSL_CONTEXT
    if _SSL_CONTEXT is None:
        import httpx

        _SSL_CONTEXT = httpx.create_ssl_context()
    return _SSL_CONTEXT


def request_body(cfg, prompt: str) -> dict:
    """The chat-completion request. ``structured_output``: vLLM's ``structured_outputs``
    field constrains the reply to one of VERDICTS (vLLM >= 0.11; the older
    ``guided_choice`` is ignored by vLLM 0.32, which only warns)."""
    body = {"model": _get(cfg, "model"), "messages": [{"role": "user", "content": prompt}],
            "max_tokens": int(_get(cfg, "max_tokens", 16)),
            "temperature": float(_get(cfg, "temperature", 0.0))}
    if _get(cfg, "structured_output", True):
        body["structured_outputs"] = {"choice": list(VERDICTS)}
    body.update(dict(_get(cfg, "extra_body", None) or {}))
    return body


async def _attempt(cfg, body: dict) -> bool:
    """One request -> the verdict, or JudgeError."""
    import httpx

    url = str(_get(cfg, "url")).rstrip("/") + "/chat/completions"
    timeout = float(_get(cfg, "timeout_s", 30.0))
    headers = {}
    if _get(cfg, "api_key"):
        headers["Authorization"] = f"Bearer {_get(cfg, 'api_key')}"
    try:
        async with asyncio.timeout(timeout):  # the whole request, however slow the bytes
            async with httpx.AsyncClient(verify=_ssl_context(), timeout=timeout) as client:
                r = await client.post(url, json=body, headers=headers)
    except (TimeoutError, httpx.TimeoutException):
        raise JudgeError(f"timed out after {timeout:g} s", retryable=True) from None
    except httpx.HTTPError as e:  # refused, reset, protocol errors
        raise JudgeError(f"{type(e).__name__}: {e}", retryable=True) from None
    if r.status_code != 200:
        raise JudgeError(f"HTTP {r.status_code}: {r.text[:200]}",
                         retryable=r.status_code == 429 or r.status_code >= 500)
    try:
        content = r.json()["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise JudgeError(f"not a chat completion: {r.text[:200]!r}", retryable=True) from None
    verdict = parse_verdict(content)
    if verdict is None:  # the same prompt at temperature 0 would say it again
        raise JudgeError(f"no verdict in the reply {str(content)[:200]!r}", retryable=False)
    return verdict


async def ask_judge(cfg, question: str, answer: str, ground_truth: str) -> tuple[bool, float]:
    """(verdict, latency in s) from the judge ``cfg``; JudgeError after the retries."""
    body = request_body(cfg, render_prompt(_get(cfg, "prompt_template"), question, answer,
                                           ground_truth))
    sem = _semaphore(str(_get(cfg, "url")), int(_get(cfg, "concurrency", 8)))
    retries, backoff = int(_get(cfg, "retries", 2)), float(_get(cfg, "backoff_s", 0.5))
    start = None
    for k in range(retries + 1):
        async with sem:
            start = time.perf_counter() if start is None else start
            try:
                return await _attempt(cfg, body), time.perf_counter() - start
            except JudgeError as e:
                if not e.retryable or k == retries:
                    e.latency_s = time.perf_counter() - start
                    raise
        await asyncio.sleep(backoff * 2 ** k)  # outside the semaphore
    raise AssertionError("unreachable")


async def judge_reward(response_text: str, ground_truth: str, *, question: str = "",
                       judge=None, match_mode: str = "exact", format_weight: float = 0.0,
                       **_) -> tuple[float, dict[str, float]]:
    """reward = correct + format_weight * format_ok, ``correct`` from the judge ``judge``
    (reward.judge) or, if it fails, from the fallback (module docstring)."""
    if judge is None:
        raise ValueError("judge_reward needs the judge settings (reward.judge)")
    fallback = _get(judge, "fallback", "rule")
    if fallback not in FALLBACKS:
        raise ValueError(f"reward.judge.fallback={fallback!r}: expected one of {FALLBACKS}")
    answer = extract_answer(response_text)
    fmt = float(format_ok(response_text))
    info = {"correct": 0.0, "format_ok": fmt, "has_answer": float(answer is not None),
            "judge_ok": 0.0, "judge_error": 0.0}
    if answer is not None:
        try:
            verdict, latency = await ask_judge(judge, question, answer, ground_truth)
            info.update(correct=float(verdict), judge_ok=1.0, judge_latency_s=latency)
        except Exception as e:  # noqa: BLE001 - JudgeError, or a bug: counted, not raised
            _warn_once(f"judge failed on an answer ({type(e).__name__}: {e}); scoring by "
                       f"fallback={fallback} (counted in reward/judge_errors)")
            correct = fallback == "rule" and answers_match(answer, ground_truth, match_mode)
            info.update(correct=float(correct), judge_error=1.0,
                        judge_latency_s=getattr(e, "latency_s", 0.0))
    return info["correct"] + format_weight * fmt, info
