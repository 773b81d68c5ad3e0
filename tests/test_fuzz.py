"""Fuzzing the tool-call parser, the zoom tool and the agent loop (hypothesis).

Parser + tool: any assistant turn (garbage, malformed JSON, huge numbers, NaN/inf,
negative and inverted boxes, unknown tools, unterminated tags, thousands of calls in
one turn, non-UTF-8 bytes decoded with replacement) gives either a valid crop or an
"Error: ..." observation, never an exception, and a successful box is clamped into the
image. The error text is inert: re-tokenizing it yields no structural token.

Agent loop: fuzzed assistant turns go through the real AgentLoop, ChatFormat and zoom
tool, as scripted turns and as the output of a scripted engine that obeys the vLLM
contract (no structural token, stop after a stop token, at most max_tokens). Every
trajectory is capped by max_turns and max_total_tokens, every tool turn that is not
the last one gets an observation, and image placeholders always match the images.
A few cases also run on the real vLLM engine.

The number of cases tried is printed at the end of the module ("fuzz cases tried").
"""
from __future__ import annotations

import json
import math
import os
from collections import Counter

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from mmagent_rl.rollout.agent_loop import AgentConfig, AgentLoop
from mmagent_rl.rollout.engine import Generation
from mmagent_rl.tools.parse import (
    MAX_LABEL_CHARS,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    ParsedCall,
    find_tool_call,
    has_unterminated_call,
    parse_tool_call,
)
from mmagent_rl.tools.zoom import is_valid_box, run_tool

CASES: Counter = Counter()
ENGINE_CALLS: Counter = Counter()
PARSER_EXAMPLES = int(os.environ.get("FUZZ_PARSER_EXAMPLES", 1500))  # per parser test (two tests)
LOOP_EXAMPLES = int(os.environ.get("FUZZ_LOOP_EXAMPLES", 300))  # scripted engine
REAL_ENGINE_EXAMPLES = 60

FUZZ_SETTINGS = dict(deadline=None, derandomize=False, database=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                            HealthCheck.large_base_example])


@pytest.fixture(scope="module", autouse=True)
def report_case_counts(request):
    yield
    line = "fuzz cases tried: " + json.dumps(dict(CASES), sort_keys=True) + \
        f" (total {sum(CASES.values())}); " + json.dumps(dict(ENGINE_CALLS))
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if capture is None:
        print(line)
        return
    with capture.global_and_fixture_disabled():  # shown even without -s
        print("\n" + line)


# ---- strategies -------------------------------------------------------------------

SPECIAL_STRINGS = ["<|image_pad|>", "<|im_end|>", "<|im_start|>", "<|vision_start|>",
                   "<|vision_end|>", "<|endoftext|>", "<|video_pad|>", TOOL_CALL_OPEN,
                   TOOL_CALL_CLOSE, "<tool_response>", "<answer>", "</answer>", "\ud800",
                   "\x00", "\ufffd", "\u202e", "\n", "{", "}", "[", "]", '"', "\\"]

numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.integers(min_value=-50, max_value=1100),
    st.sampled_from([0, -0.0, 1e6, 1e6 + 1, -1e6, 5e-324, 1.7976931348623157e308, 2**63]),
)
words = st.one_of(st.text(max_size=12), st.sampled_from(SPECIAL_STRINGS))
json_leaf = st.one_of(st.none(), st.booleans(), numbers, words)
json_ish = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(words, inner, max_size=4)), max_leaves=10)


@st.composite
def boxes(draw):
    """Negative, inverted, zero-area, huge, non-finite, wrong-length and typed boxes."""
    kind = draw(st.sampled_from(["numbers", "inverted", "points", "wrong", "any"]))
    if kind == "numbers":
        return draw(st.lists(numbers, min_size=4, max_size=4))
    if kind in ("inverted", "points"):
        a, b, c, d = (draw(st.integers(-100, 1200)) for _ in range(4))
        return [max(a, c), max(b, d), min(a, c), min(b, d)] if kind == "inverted" \
            else [a, b, c, d]
    if kind == "wrong":
        return draw(st.lists(numbers, min_size=0, max_size=7))
    return draw(json_ish)


tool_names = st.one_of(st.just("image_zoom_in_tool"), st.just("image_zoom_in_tool"), words,
                       json_ish)


@st.composite
def call_objects(draw):
    obj = {}
    if draw(st.integers(0, 9)):
        obj["name"] = draw(tool_names)
    if draw(st.integers(0, 9)):
        args = draw(st.one_of(
            st.fixed_dictionaries({"bbox_2d": boxes()},
                                  optional={"label": st.one_of(words, json_ish,
                                                               st.text(min_size=600))}),
            json_ish))
        obj["arguments"] = args
    if draw(st.booleans()):
        obj.update(draw(st.dictionaries(words, json_ish, max_size=2)))
    return draw(st.one_of(st.just(obj), json_ish))


def _mutate(draw, text: str) -> str:
    """Truncate, delete, duplicate or insert characters: malformed JSON."""
    for _ in range(draw(st.integers(1, 3))):
        if not text:
            break
        i = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["cut", "delete", "insert", "dup"]))
        if op == "cut":
            text = text[:i]
        elif op == "delete":
            text = text[:i] + text[i + 1:]
        elif op == "insert":
            text = text[:i] + draw(st.sampled_from(SPECIAL_STRINGS)) + text[i:]
        else:
            text = text[:i] + text[i:i + 5] * 2 + text[i + 5:]
    return text


@st.composite
def raw_calls(draw):
    """The JSON text inside <tool_call>...</tool_call>."""
    kind = draw(st.sampled_from(["json", "json", "malformed", "literals", "garbage", "deep"]))
    if kind == "deep":
        n = draw(st.integers(1, 200_000))
        return draw(st.sampled_from(["[", "{\"a\":", "[{"])) * n
    if kind == "literals":  # number forms that json.dumps never writes
        lit = draw(st.lists(st.sampled_from(
            ["NaN", "-Infinity", "Infinity", "1e999", "-1e999", "1" * 5000, "-0", "1e-999",
             "12345678901234567890123", "0x10", "1_000", "+1", ".5", "5.", "01"]),
            min_size=4, max_size=4))
        return ('{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [%s]}}'
                % ", ".join(lit))
    if kind == "garbage":
        return draw(st.one_of(st.text(), st.binary().map(lambda b: b.decode("utf-8", "replace"))))
    text = json.dumps(draw(call_objects()))  # NaN/Infinity appear in the text
    return _mutate(draw, text) if kind == "malformed" else text


@st.composite
def turn_texts(draw):
    """A whole assistant turn: thinking, zero or more calls, maybe unterminated."""
    kind = draw(st.sampled_from(["call", "call", "valid", "valid", "valid", "unterminated",
                                 "many", "garbage", "bytes", "answer", "special"]))
    prefix = draw(st.text(max_size=30))
    if kind == "valid":  # a well-formed call; the box may still be outside or inverted
        xs, ys = (sorted(draw(st.lists(st.integers(-50, 1100), min_size=2, max_size=2)))
                  for _ in range(2))
        box = [xs[0], ys[0], xs[1], ys[1]]
        return prefix + TOOL_CALL_OPEN + json.dumps({"name": "image_zoom_in_tool", "arguments": {
            "bbox_2d": box, "label": draw(words)}}) + TOOL_CALL_CLOSE
    if kind == "call":
        return prefix + TOOL_CALL_OPEN + draw(raw_calls()) + TOOL_CALL_CLOSE
    if kind == "unterminated":
        return prefix + TOOL_CALL_OPEN + draw(raw_calls())[:draw(st.integers(0, 200))]
    if kind == "many":  # thousands of calls in one turn
        n = draw(st.integers(1000, 3000))
        one = TOOL_CALL_OPEN + draw(raw_calls())[:300] + TOOL_CALL_CLOSE
        tail = draw(st.sampled_from(["", TOOL_CALL_OPEN, TOOL_CALL_OPEN + "{", " done"]))
        return prefix + one * n + tail
    if kind == "bytes":
        return draw(st.binary(max_size=400)).decode("utf-8", "replace")
    if kind == "answer":
        return prefix + "<answer>" + draw(st.text(max_size=10)) + "</answer>"
    if kind == "special":
        return "".join(draw(st.lists(st.one_of(st.sampled_from(SPECIAL_STRINGS), words),
                                     max_size=20)))
    return draw(st.text(max_size=400))


# ---- parser + tool ----------------------------------------------------------------

IMAGES = [Image.new("RGB", size, (30, 60, 90)) for size in
          [(1, 1), (27, 5), (28, 28), (64, 48), (300, 200), (1024, 17)]]


def _check_call(raw: str, image: Image.Image, chat) -> None:
    parsed = parse_tool_call(raw)
    assert isinstance(parsed, ParsedCall)
    assert (parsed.error is None) == (parsed.bbox is not None)
    if parsed.ok:
        assert parsed.name == "image_zoom_in_tool"
        assert all(isinstance(v, float) and math.isfinite(v) for v in parsed.bbox)
        if parsed.label is not None:
            assert len(parsed.label) <= MAX_LABEL_CHARS
            parsed.label.encode("utf-8")  # no lone surrogates: tokenizers can take it
    crop, box, err = run_tool(parsed, image)
    assert (err is None) == (crop is not None) == (box is not None)
    w, h = image.size
    if err is None:
        assert is_valid_box(box, w, h) and all(isinstance(v, int) for v in box)
        x1, y1, x2, y2 = parsed.bbox  # the cut covers the asked box, clamped to the image
        assert box[0] <= max(x1, 0) and box[1] <= max(y1, 0)
        assert box[2] >= min(x2, w) and box[3] >= min(y2, h)
        assert crop.mode == "RGB" and max(crop.size) == 112
        assert crop.size[0] % 28 == 0 and crop.size[1] % 28 == 0 and min(crop.size) >= 28
    else:
        assert err.startswith("Error: ") and "tool failed" not in err
        assert len(err) < 1000
        ids = chat.encode(err)  # the error text becomes ordinary tokens only
        assert not set(ids) & (set(chat.banned_ids) | {chat.im_end_id,
                                                       chat.tool_call_close_id})


@settings(max_examples=PARSER_EXAMPLES, **FUZZ_SETTINGS)
@given(raw=raw_calls(), image=st.sampled_from(IMAGES))
def test_fuzz_parse_and_zoom(chat, raw, image):
    CASES["parser_raw_call"] += 1
    _check_call(raw, image, chat)


@settings(max_examples=PARSER_EXAMPLES, **FUZZ_SETTINGS)
@given(text=turn_texts(), image=st.sampled_from(IMAGES))
def test_fuzz_whole_turn(chat, text, image):
    CASES["parser_turn"] += 1
    raw = find_tool_call(text)
    unterminated = has_unterminated_call(text)
    if raw is None:  # no complete call
        assert TOOL_CALL_CLOSE not in text or TOOL_CALL_OPEN not in text[
            :text.rfind(TOOL_CALL_CLOSE)]
    else:  # the last complete one
        assert TOOL_CALL_OPEN not in raw and text.endswith(raw + TOOL_CALL_CLOSE) == (
            text.rfind(TOOL_CALL_CLOSE) == len(text) - len(TOOL_CALL_CLOSE))
        assert not unterminated or text.rfind(TOOL_CALL_OPEN) > text.rfind(TOOL_CALL_CLOSE)
    _check_call(raw or "", image, chat)


def test_found_bugs_stay_fixed(chat):
    """Regressions for what the fuzzer found (see the module docstring of parse.py)."""
    for name in ("<|image_pad|>", "<|im_start|>x<|im_end|>", "<|vision_start|>"):
        err = parse_tool_call(json.dumps({"name": name, "arguments": {}})).error
        assert 5 not in chat.encode(err) and not set(chat.encode(err)) & set(chat.banned_ids)
    p = parse_tool_call('{"name": "image_zoom_in_tool", "arguments": '
                        '{"bbox_2d": [0, 0, 9, 9], "label": "a\\ud800b"}}')
    assert p.ok and p.label == "a?b"
    chat.encode(p.label)  # raised TypeError before the fix


# ---- the agent loop ---------------------------------------------------------------

class ScriptedEngine:
    """Returns the given turn texts in order, as vLLM would: structural tokens are never
    produced (logit bias), output stops after a stop token or at max_tokens. Checks
    every request the way vLLM would reject it: image placeholders must match images."""

    def __init__(self, chat, texts: list[str], fallback: str = "<answer>a</answer>"):
        self.chat, self.texts, self.fallback = chat, list(texts), fallback
        self.calls = 0

    def generate(self, requests, *, max_tokens, stop_token_ids=None, **_):
        chat, banned = self.chat, set(self.chat.banned_ids)
        self.calls += 1
        out = []
        for (ids, images), limit in zip(requests, max_tokens):
            assert limit >= 1
            assert ids.count(chat.image_token_id) == len(images) \
                == ids.count(chat.vision_start_id) == ids.count(chat.vision_end_id)
            text = self.texts.pop(0) if self.texts else self.fallback
            text = text.encode("utf-8", "replace").decode("utf-8")  # a sampled text is UTF-8
            gen = [t for t in chat.encode(text) if t not in banned]
            cut = next((i + 1 for i, t in enumerate(gen) if t in stop_token_ids), None)
            if cut is not None and cut <= limit:
                gen, finish, stop = gen[:cut], "stop", gen[cut - 1]
            elif len(gen) >= limit:
                gen, finish, stop = gen[:limit], "length", None
            else:  # end of turn (eos is <|im_end|> for Qwen)
                gen, finish, stop = gen + [chat.im_end_id], "stop", chat.im_end_id
            out.append(Generation(gen, [-1.0] * len(gen), finish, stop))
        return out


def _image_runs(ids: list[int], pad: int) -> list[int]:
    runs, n = [], 0
    for t in ids + [-1]:
        if t == pad:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    return runs


def _check_trajectory(t, chat, cfg: AgentConfig, prompt_len: int) -> None:
    ids = t.token_ids
    assert len(ids) == len(t.loss_mask) == len(t.logprobs)
    assert len(ids) <= max(cfg.max_total_tokens, prompt_len)
    assert t.turns <= cfg.max_turns
    assert t.finish_reason in ("eos", "max_tokens", "max_turns")
    assert sum(t.loss_mask[:prompt_len]) == 0
    assert all(ids[i] != chat.image_token_id for i, m in enumerate(t.loss_mask) if m)
    # What the learner needs: one placeholder run per image, of the image's length.
    assert _image_runs(ids, chat.image_token_id) == [chat.num_image_tokens(im)
                                                     for im in t.images]
    obs_head = chat.encode("<|im_end|>\n<|im_start|>user\n<tool_response>")
    for call in t.tool_calls:
        assert call.error is None or call.error.startswith("Error: ")
        a, b = call.span
        if call.raw == "" and call.error == "Error: unterminated <tool_call>":
            assert b == len(ids)  # the turn (and the trajectory) ended there
            continue
        if call.ok:
            assert is_valid_box(call.crop_box, *t.images[0].size)
        if b == len(ids):  # no observation: only the last turn, capped
            assert t.finish_reason in ("max_turns", "max_tokens")
            assert call is t.tool_calls[-1]
            continue
        assert ids[b:b + len(obs_head)] == obs_head  # every other tool turn is answered
        assert sum(t.loss_mask[b:b + len(obs_head)]) == 0
        if call.ok:
            assert call.image_index is not None and 0 < call.image_index < len(t.images)
        else:
            obs_text = chat.decode(ids[b:])  # (the tokenizer NFC-normalizes text)
            assert chat.decode(chat.encode(call.error)) in obs_text


@st.composite
def loop_cases(draw, examples_len: int):
    cfg = AgentConfig(max_turns=draw(st.integers(1, 6)),
                      max_new_tokens=draw(st.one_of(st.integers(1, 80),
                                                    st.sampled_from([128, 512, 4096]))),
                      max_total_tokens=0)  # set from the prompt length below
    return dict(
        cfg=cfg, extra_tokens=draw(st.one_of(st.integers(0, 300), st.integers(300, 3000))),
        scripted=draw(st.lists(turn_texts(), max_size=3)),
        engine_texts=draw(st.lists(turn_texts(), max_size=8)),
        example=draw(st.integers(0, examples_len - 1)), n=draw(st.integers(1, 2)))


@settings(max_examples=LOOP_EXAMPLES, **FUZZ_SETTINGS)
@given(case=loop_cases(8))
def test_fuzz_agent_loop_scripted_engine(chat, examples, case):
    CASES["agent_loop_scripted_engine"] += 1
    ex = examples[case["example"]]
    prompt_len = len(chat.prompt_ids(ex.image, ex.question))
    cfg = case["cfg"]
    cfg.max_total_tokens = prompt_len + case["extra_tokens"]
    engine = ScriptedEngine(chat, case["engine_texts"])
    trajs = AgentLoop(engine, chat, cfg).run([ex], n=case["n"], seed=0,
                                             scripted_turns=case["scripted"])
    assert len(trajs) == case["n"]
    for t in trajs:
        _check_trajectory(t, chat, cfg, prompt_len)
        event(f"finish={t.finish_reason}")
        event(f"crops={len(t.images) - 1}")
        event(f"failed calls={sum(not c.ok for c in t.tool_calls)}")


class CountingEngine:
    def __init__(self, engine):
        self.engine, self.calls = engine, 0

    def generate(self, *args, **kw):
        self.calls += 1
        return self.engine.generate(*args, **kw)


@settings(max_examples=REAL_ENGINE_EXAMPLES, **FUZZ_SETTINGS)
@given(calls=st.lists(raw_calls(), min_size=1, max_size=3), prefix=st.text(max_size=20),
       more_turns=st.integers(1, 2), extra=st.integers(400, 1500))
def test_fuzz_agent_loop_real_engine(engine, chat, examples, calls, prefix, more_turns,
                                     extra):
    """Fuzzed tool calls as scripted turns (each one terminated, so the loop goes on),
    then real sampling on the real vLLM engine: it never receives a request it rejects,
    whatever the observations before were."""
    CASES["agent_loop_real_engine"] += 1
    ex = examples[1]
    prompt_len = len(chat.prompt_ids(ex.image, ex.question))
    cfg = AgentConfig(max_turns=len(calls) + more_turns, max_new_tokens=6,
                      max_total_tokens=prompt_len + extra)
    counting = CountingEngine(engine)
    # (a stop token inside would end the turn early, and the trajectory with it)
    turns = [prefix + TOOL_CALL_OPEN + c[:200].replace("<|im_end|>", "").replace(
        TOOL_CALL_CLOSE, "") + TOOL_CALL_CLOSE for c in calls]
    (t,) = AgentLoop(counting, chat, cfg).run([ex], n=1, seed=0, scripted_turns=turns)
    _check_trajectory(t, chat, cfg, prompt_len)
    ENGINE_CALLS["real_engine_generate_calls"] += counting.calls
    event(f"engine calls={counting.calls}")


def test_scripted_turn_is_cut_like_a_generation(chat, examples):
    """Scripted text cannot inject structural tokens, stops at the first stop token and
    respects the token budget."""
    ex = examples[0]
    prompt_len = len(chat.prompt_ids(ex.image, ex.question))
    call = ('<tool_call>{"name": "image_zoom_in_tool", "arguments": '
            '{"bbox_2d": [10, 10, 90, 90]}}</tool_call>')
    engine = ScriptedEngine(chat, [])
    loop = AgentLoop(engine, chat, AgentConfig(max_turns=3, max_total_tokens=prompt_len + 400))
    (t,) = loop.run([ex], n=1, scripted_turns=["<|image_pad|><|vision_start|>" + call * 3])
    assert len(t.images) == 2 and len(t.tool_calls) >= 1 and t.tool_calls[0].ok
    assert t.turn_texts[0].count("</tool_call>") == 1
    loop = AgentLoop(engine, chat, AgentConfig(max_turns=3, max_total_tokens=prompt_len + 5))
    (t,) = loop.run([ex], n=1, scripted_turns=["x" * 50 + call])
    assert len(t.token_ids) == prompt_len + 5 and t.finish_reason == "max_tokens"
