"""The tool plug-in interface (mmagent_rl/tools/base.py, registry.py; docs/tools.md).

Unit tier: the registry's errors, the tools_in_prompt rule, the schemas rendered into
the system prompt (the Qwen "# Tools" section), the rotate tool, the contract (a user
tool that raises, refuses, returns garbage or sleeps past its timeout gives an error
observation), per-tool metrics, MAPO's alignment on the returned image, the eval's
figures with other tools. Integration tier (the ``chat`` fixture, and one test on the
real vLLM engine): a demonstration with a scripted rotate call, and user tools offered
in the prompt and run in the agent loop, their errors seen by the model.
"""
from __future__ import annotations

import json
import pickle
import time

import numpy as np
import pytest
from PIL import Image

from mmagent_rl.chat import render_tools_section, system_with_tools
from mmagent_rl.metrics import JsonlLogger, rollout_metrics, tool_metrics
from mmagent_rl.tools.base import ToolContext, ToolError
from mmagent_rl.tools.parse import inert_text, parse_tool_call
from mmagent_rl.tools.registry import (
    BUILTIN_TOOLS,
    DEFAULT_TOOLS,
    ToolSet,
    ToolSettings,
    load_tool,
)
from mmagent_rl.tools.rotate import image_rotate_tool
from mmagent_rl.tools.zoom import image_zoom_in_tool, run_tool
from mmagent_rl.trajectory import ToolCall, Trajectory

USER = ["user_tools:flip_tool", "user_tools:broken_tool", "user_tools:slow_tool"]


def coord_image(width=60, height=40) -> Image.Image:
    """R = x, G = y: a pixel tells where it came from."""
    ys, xs = np.mgrid[0:height, 0:width]
    arr = np.stack([xs, ys, np.full_like(xs, 7)], axis=-1).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def call(name: str, **arguments) -> str:
    return json.dumps({"name": name, "arguments": arguments})


# ---- the registry -------------------------------------------------------------------

@pytest.mark.parametrize("spec, fragment", [
    ("user_tools.flip_tool", "expected 'package.module:attribute'"),
    ("a:b:c", "expected 'package.module:attribute'"),
    (":flip_tool", "expected 'package.module:attribute'"),
    ("no_such_module_xyz:tool", "cannot import module 'no_such_module_xyz'"),
    ("user_tools:no_such_tool", "has no attribute 'no_such_tool'"),
    ("user_tools:not_a_tool", "is not a tool: got int"),
    ("user_tools:plain_function", "is not a tool: got function"),
    ("user_tools:NeedsArgs", "cannot be built without arguments"),
    ("user_tools:bad_name", "tool name 'has a space'"),
])
def test_registry_errors_name_the_entry(spec, fragment):
    with pytest.raises(ValueError) as err:
        ToolSet.load(list(DEFAULT_TOOLS) + [spec])
    assert fragment in str(err.value) and "rollout.tools entry" in str(err.value)


def test_registry_duplicates_and_bad_settings():
    with pytest.raises(ValueError, match="duplicate tool name 'image_zoom_in_tool'"):
        ToolSet.load(list(DEFAULT_TOOLS) + ["user_tools:duplicate_zoom"])
    with pytest.raises(ValueError, match="rollout.tools is empty"):
        ToolSet.load([])
    with pytest.raises(ValueError, match="must be a list"):
        ToolSet.load("mmagent_rl.tools.zoom:image_zoom_in_tool")
    with pytest.raises(ValueError, match="tool_timeout_s"):
        ToolSet.load(DEFAULT_TOOLS, timeout_s=0)
    with pytest.raises(ValueError, match="tools_in_prompt='sometimes'"):
        ToolSet.load(DEFAULT_TOOLS, in_prompt="sometimes")


def test_registry_loads_instances_classes_and_functions_in_order():
    ts = ToolSet.load(list(BUILTIN_TOOLS) + ["user_tools:FlipTool", "user_tools:size_tool"])
    assert ts.names == ("image_zoom_in_tool", "image_rotate_tool", "image_flip_tool",
                        "image_size_tool")
    assert load_tool("mmagent_rl.tools.zoom:image_zoom_in_tool") is image_zoom_in_tool
    for s in ts.schemas:  # OpenAI function format, JSON-serialisable
        assert set(s) == {"type", "function"} and s["type"] == "function"
        assert set(s["function"]) == {"name", "description", "parameters"}
        assert s["function"]["parameters"]["type"] == "object"
        json.dumps(s)


def test_tools_in_prompt_rule():
    assert not ToolSet.load(DEFAULT_TOOLS).in_prompt  # auto, the zoom alone: the old prompt
    assert ToolSet.load(BUILTIN_TOOLS).in_prompt  # auto, more tools: offered
    assert ToolSet.load(["user_tools:flip_tool"]).in_prompt
    assert ToolSet.load(DEFAULT_TOOLS, in_prompt="True").in_prompt  # Hydra turns true into "True"
    assert not ToolSet.load(BUILTIN_TOOLS, in_prompt=False).in_prompt


def test_settings_from_config_are_picklable_and_default_to_the_zoom():
    from mmagent_rl.config import Config

    cfg = Config()
    assert list(cfg.rollout.tools) == list(DEFAULT_TOOLS)
    settings = ToolSettings.from_config(cfg.rollout)
    assert pickle.loads(pickle.dumps(settings)) == settings  # what Ray sends the workers
    ts = settings.load()
    assert ts.names == ("image_zoom_in_tool",) and not ts.in_prompt
    assert ts.timeout_s == cfg.rollout.tool_timeout_s
    cfg.rollout.tools = list(BUILTIN_TOOLS) + ["user_tools:not_a_tool"]
    with pytest.raises(ValueError, match="not a tool"):
        ToolSet.from_config(cfg.rollout)


# ---- the schemas in the system prompt ------------------------------------------------

class _Tok:
    """A tokenizer as system_with_tools sees it."""

    def __init__(self, template, render=None):
        self.chat_template, self._render = template, render

    def apply_chat_template(self, messages, tools=None, tokenize=False, **_):
        return self._render(messages, tools)


def _qwen_like(messages, tools):  # how Qwen's templates lay out tools=
    lines = "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools or [])
    return (f"<|im_start|>system\n{messages[0]['content']}\n\nTEMPLATE# Tools\n<tools>{lines}"
            "\n</tools><|im_end|>\n<|im_start|>user\n?<|im_end|>\n")


def _ignores_tools(messages, tools):  # like the tiny models' template
    return f"<|im_start|>system\n{messages[0]['content']}<|im_end|>\n"


def test_tools_section_is_qwens_layout():
    schemas = ToolSet.load(BUILTIN_TOOLS).schemas
    section = render_tools_section(schemas)
    assert section.startswith("# Tools\n\nYou may call one or more functions")
    lines = section.split("<tools>\n", 1)[1].split("\n</tools>", 1)[0].split("\n")
    assert [json.loads(x) for x in lines] == schemas
    assert section.endswith('<tool_call>\n{"name": <function-name>, "arguments": '
                            '<args-json-object>}\n</tool_call>')


def test_schemas_rendered_by_the_template_when_it_supports_tools():
    schemas = ToolSet.load(BUILTIN_TOOLS).schemas
    got = system_with_tools(_Tok("x", _qwen_like), "Be brief.", schemas)
    assert got.startswith("Be brief.\n\nTEMPLATE# Tools") and "<|im_" not in got
    assert all(json.dumps(s) in got for s in schemas)
    # a template that ignores tools=, none, or one that raises: our own rendering
    for tok in (_Tok("x", _ignores_tools), _Tok(None), _Tok("x", lambda m, t: 1 / 0)):
        assert system_with_tools(tok, "Be brief.", schemas) == \
            "Be brief.\n\n" + render_tools_section(schemas)
    assert system_with_tools(_Tok(None), "Be brief.", []) == "Be brief."


# ---- parsing through the tools' own validation -----------------------------------------

def test_parser_knows_every_registered_tool():
    ts = ToolSet.load(list(BUILTIN_TOOLS) + USER)
    known = "Known tools: image_zoom_in_tool, image_rotate_tool, image_flip_tool, " \
            "broken_tool, slow_tool"
    assert known in ts.parse(call("crop", bbox_2d=[0, 0, 5, 5])).error
    assert known in ts.parse('{"arguments": {}}').error
    assert "image_flip_tool" in ts.parse("not json").error  # the example lists the names
    p = ts.parse(call("image_flip_tool", direction="vertical"))
    assert p.ok and p.arguments == {"direction": "vertical"} and p.bbox is None
    # the zoom keeps its own checks and messages among other tools
    assert ts.parse(call("image_zoom_in_tool", bbox_2d=[0, 0, 5])).error == \
        parse_tool_call(call("image_zoom_in_tool", bbox_2d=[0, 0, 5])).error
    assert "list of 4" in ts.parse(call("image_zoom_in_tool", bbox_2d=[0, 0, 5])).error
    z = ts.parse(call("image_zoom_in_tool", bbox_2d=[1, 2, 30, 40], label=" x "))
    assert z.ok and z.bbox == (1.0, 2.0, 30.0, 40.0) and z.label == "x"
    # the default set: the rotate tool is unknown
    assert "unknown tool 'image_rotate_tool'" in parse_tool_call(
        call("image_rotate_tool", angle=90)).error


@pytest.mark.parametrize("arguments, fragment", [
    ({}, 'missing "direction"'),
    ({"direction": "diagonal"}, '"direction" must be one of "horizontal", "vertical"'),
    ({"direction": 1}, '"direction" must be string'),
    ({"direction": "vertical", "extra": 1}, "unknown argument 'extra'"),
])
def test_schema_validation_of_user_tools(arguments, fragment):
    p = ToolSet.load(USER).parse(json.dumps({"name": "image_flip_tool",
                                             "arguments": arguments}))
    assert p.error is not None and p.error.startswith("Error: ") and fragment in p.error
    assert p.name == "image_flip_tool" and p.arguments is None


def test_a_bug_in_a_users_validate_is_an_error_observation():
    p = ToolSet.load(["user_tools:bad_validate_tool"]).parse(call("bad_validate_tool"))
    assert p.error == "Error: tool bad_validate_tool failed (ZeroDivisionError)"


# ---- the built-in tools ----------------------------------------------------------------

@pytest.mark.parametrize("angle, size, corner", [
    (90, (40, 60), (59, 0)),  # counter-clockwise: the top-right pixel goes top-left
    (180, (60, 40), (59, 39)),
    (270, (40, 60), (0, 39)),
])
def test_rotate_turns_the_original_counter_clockwise(angle, size, corner):
    ts = ToolSet.load(BUILTIN_TOOLS)
    img = coord_image()
    p = ts.parse(call("image_rotate_tool", angle=angle))
    assert p.ok and p.arguments == {"angle": angle}
    out = ts.run(p, img, ToolContext(images=[img, coord_image(8, 8)]))
    assert out.error is None and out.text is None and out.image.size == size
    r, g, _ = np.asarray(out.image)[0, 0]
    assert (r, g) == corner
    assert out.latency_s is not None and out.latency_s >= 0


@pytest.mark.parametrize("arguments, fragment", [
    ({}, 'missing "angle"'),
    ({"angle": 45}, "got 45"),
    ({"angle": -90}, "got -90"),
    ({"angle": 360}, "got 360"),
    ({"angle": "90"}, "got '90'"),
    ({"angle": True}, "got True"),
    ({"angle": None}, "got None"),
    ({"angle": 90.5}, "got 90.5"),
    ({"angle": [90]}, "got [90]"),
])
def test_rotate_validation(arguments, fragment):
    ts = ToolSet.load(BUILTIN_TOOLS)
    p = ts.parse(json.dumps({"name": "image_rotate_tool", "arguments": arguments}))
    assert p.error is not None and p.error.startswith("Error: ") and fragment in p.error
    assert p.name == "image_rotate_tool" and p.arguments is None
    out = ts.run(p, coord_image())
    assert out.image is None and out.error == p.error and out.latency_s is None
    with pytest.raises(ToolError):
        image_rotate_tool.validate(arguments)
    assert image_rotate_tool.validate({"angle": 90.0}) == {"angle": 90}  # JSON 90.0 is 90


def test_zoom_through_the_interface_is_the_old_zoom():
    ts = ToolSet.load(BUILTIN_TOOLS)
    img = coord_image(300, 200)

    class Settings:
        zoom_min_size, zoom_out_max_side = 56, 224

    for box in ([10, 10, 60, 60], [100, 50, 212, 162], [295, 195, 300, 200],
                [60, 10, 10, 60], [400, 10, 500, 50], [10, 10, 10, 40]):
        raw = call("image_zoom_in_tool", bbox_2d=box)
        for settings, kw in ((None, {}), (Settings, {"min_size": 56, "out_max_side": 224})):
            crop, crop_box, err = run_tool(parse_tool_call(raw), img, **kw)
            out = ts.run(ts.parse(raw), img, ToolContext(images=[img], settings=settings))
            # the message the old agent loop showed (it made run_tool's error inert)
            assert (out.crop_box, out.error) == (crop_box, err and inert_text(err))
            if crop is not None:
                assert out.image.size == crop.size
                assert np.array_equal(np.asarray(out.image), np.asarray(crop))


# ---- the contract: every failure is an observation ----------------------------------------

def test_user_tool_failures_become_error_observations():
    ts = ToolSet.load(USER + ["user_tools:refusing_tool", "user_tools:wrong_type_tool",
                              "user_tools:size_tool", "user_tools:echo_tool"], timeout_s=0.3)
    img = coord_image()

    def run(raw):
        return ts.run(ts.parse(raw), img, ToolContext(images=[img]))

    out = run(call("broken_tool"))
    assert out.error == "Error: tool broken_tool failed (RuntimeError)" and out.image is None
    t0 = time.perf_counter()
    out = run(call("slow_tool", seconds=2))
    assert out.error == "Error: tool slow_tool timed out after 0.3 s"
    assert time.perf_counter() - t0 < 1.5 and 0.25 < out.latency_s < 1.5
    assert run(call("slow_tool", seconds=0)).text == "awake"
    out = run(call("refusing_tool"))  # a ToolError's own message, made inert
    assert out.error.startswith("Error: this image cannot be refused")
    assert "<|image_pad|>" not in out.error
    assert run(call("wrong_type_tool")).error == \
        "Error: tool wrong_type_tool failed (it returned int, not an image or a text)"
    assert run(call("image_size_tool")).text == "60x40"
    assert run(call("echo_tool", text="<|image_pad|> hi")).text == "&lt;|image_pad|> hi"
    flipped = run(call("image_flip_tool", direction="horizontal")).image
    assert np.asarray(flipped)[0, 0, 0] == 59


# ---- metrics ---------------------------------------------------------------------------

def _traj(calls: list[ToolCall], pid="p") -> Trajectory:
    return Trajectory(prompt_id=pid, sample_idx=0, token_ids=[1], loss_mask=[0],
                      logprobs=[0.0], images=[], prompt_len=1, tool_calls=calls, turns=1)


def test_per_tool_metrics(tmp_path):
    a = [ToolCall(0, "", name="image_zoom_in_tool", latency_s=0.1),
         ToolCall(1, "", name="image_zoom_in_tool", error="Error: x", latency_s=0.3),
         ToolCall(2, "", name="image_rotate_tool", error="Error: bad angle")]  # never ran
    b = [ToolCall(0, "", name=None, error="Error: not JSON"),
         ToolCall(1, "", name="image_rotate_tool", latency_s=0.5)]
    m = rollout_metrics([_traj(a), _traj(b)], tool_names=("image_zoom_in_tool",
                                                           "image_rotate_tool", "user_tool"))
    assert m["tool/image_zoom_in_tool/calls"] == 2 and m["tool/image_zoom_in_tool/errors"] == 1
    assert m["tool/image_zoom_in_tool/latency_s"] == pytest.approx(0.2)
    assert m["tool/image_rotate_tool/calls"] == 2 and m["tool/image_rotate_tool/errors"] == 1
    assert m["tool/image_rotate_tool/latency_s"] == pytest.approx(0.5)
    assert (m["tool/user_tool/calls"], m["tool/user_tool/errors"],
            m["tool/user_tool/latency_s"]) == (0, 0, 0)  # registered, never called
    assert not any(k.startswith("tool/None") for k in m)
    assert m["tool/error_rate"] == pytest.approx(3 / 5)
    assert tool_metrics(a) == {k: v for k, v in m.items()
                               if k.startswith("tool/image_zoom_in_tool/")} | {
        "tool/image_rotate_tool/calls": 1.0, "tool/image_rotate_tool/errors": 1.0,
        "tool/image_rotate_tool/latency_s": 0.0}
    log = JsonlLogger(str(tmp_path / "metrics.jsonl"))
    log.log({"step": 1, **m})
    log.close()
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert row["tool/image_rotate_tool/latency_s"] == pytest.approx(0.5)


# ---- MAPO's alignment and the eval figures with other tools -----------------------------

def test_alignment_scores_the_image_the_tool_returned():
    from types import SimpleNamespace

    from mmagent_rl.reward.worker import RewardScorer, Score

    original, rotated, crop = coord_image(), coord_image(40, 60), coord_image(28, 28)
    t = _traj([ToolCall(0, "", name="image_rotate_tool", label="a sideways sign",
                        image_index=1),
               ToolCall(1, "", name="image_rotate_tool", error="Error: bad angle"),
               ToolCall(2, "", name="image_zoom_in_tool", label="a red square",
                        image_index=2)])
    t.images = [original, rotated, crop]
    seen = []

    class Clip:
        def score_detailed(self, descs, images):
            seen.extend(zip(descs, images))
            return [0.5] * len(descs), ["ok"] * len(descs)

    scorer = object.__new__(RewardScorer)
    scorer.clip, scorer.mapo = Clip(), SimpleNamespace(description="label")
    out = [Score(0.0)]
    scorer._align([t], out)
    assert seen[0] == ("a sideways sign", rotated) and seen[0][1] is rotated
    assert seen[1] == (None, None) and seen[2][1] is crop
    assert out[0].align_scores == [0.5, 0.5, 0.5]


def test_eval_summary_takes_calls_of_other_tools():
    from mmagent_rl.eval import summarize

    t = _traj([ToolCall(0, "", name="image_rotate_tool", arguments={"angle": 90},
                        image_index=1),
               ToolCall(1, "", name="image_zoom_in_tool", bbox=(0, 0, 30, 30),
                        image_index=2)])
    t.image_size, t.target_box = (60, 40), (5, 5, 10, 10)
    t.reward_info = {"correct": 1.0, "has_answer": 1.0}
    r = summarize([t], k=1)
    assert r["tool_call_rate"] == 1.0 and r["accuracy_with_tool"] == 1.0


# ---- integration: demonstrations and the agent loop ----------------------------------------

def test_demo_with_a_scripted_rotate_call(chat, examples):
    from mmagent_rl.data.demos import call_text, demo_from_messages, scripted_demo

    ex = examples[2]
    ts = ToolSet.load(BUILTIN_TOOLS)
    turns = ["Sideways. " + call_text("image_rotate_tool", {"angle": 90}),
             call_text("image_rotate_tool", {"angle": 45}),
             call_text("image_zoom_in_tool", {"bbox_2d": [0, 0, 200, 200]}),
             f"<answer>{ex.answer}</answer>"]
    demo = scripted_demo(ex, ts.prompt_chat(chat), turns, ts)
    prompt = chat.decode(demo.token_ids[:demo.loss_mask.index(1)])
    assert "<tools>" in prompt and all(json.dumps(s) in prompt for s in ts.schemas)
    assert len(demo.images) == 3 and demo.meta["tools"] == ["image_rotate_tool"] * 2 + [
        "image_zoom_in_tool"]
    rotated = ex.image.convert("RGB").transpose(Image.Transpose.ROTATE_90)
    assert np.array_equal(np.asarray(demo.images[1]), np.asarray(rotated))
    assert demo.box == (0.0, 0.0, 200.0, 200.0)
    roles = [m["role"] for m in demo.messages]
    assert roles == ["system", "user", "assistant", "tool", "assistant", "tool", "assistant",
                     "tool", "assistant"]
    assert demo.messages[3]["content"] == [{"type": "image", "image": 1}]
    err = demo.messages[5]["content"][0]["text"]
    assert err.startswith('Error: "angle" must be one of 90, 180, 270')
    # the tokens: the observations are the rotated image and the error, loss 0; they
    # rebuild from the messages, so the jsonl form gives the same demonstration
    again = demo_from_messages(demo.messages, demo.images, chat)
    assert again.token_ids == demo.token_ids and again.loss_mask == demo.loss_mask
    pads = [i for i, tid in enumerate(demo.token_ids) if tid == chat.image_token_id]
    assert len(pads) == chat.num_image_tokens(ex.image) + chat.num_image_tokens(rotated) \
        + chat.num_image_tokens(demo.images[2])
    assert not any(demo.loss_mask[i] for i in pads)
    assert chat.decode(chat.encode(err)) in chat.decode(demo.token_ids)


def test_agent_config_zoom_settings_reach_the_zoom_in_the_loop(chat, examples):
    """rollout.agent.zoom_min_size / zoom_out_max_side still set the zoom's crop; the
    rotate runs in the loop too (scripted turns only: the engine is never asked)."""
    from mmagent_rl.rollout.agent_loop import AgentConfig, AgentLoop

    class NoEngine:
        def generate(self, *a, **k):
            raise AssertionError("not called")

    ex = examples[0]
    ts = ToolSet.load(BUILTIN_TOOLS)
    loop = AgentLoop(NoEngine(), chat, AgentConfig(max_turns=4, zoom_min_size=56,
                                                   zoom_out_max_side=224), ts)
    (t,) = loop.run([ex], n=1, scripted_turns=[
        call_turn("image_zoom_in_tool", bbox_2d=[0, 0, 5, 5], label="corner"),
        call_turn("image_rotate_tool", angle=270), "<answer>red</answer>"])
    zoom_call, rot = t.tool_calls
    assert zoom_call.crop_box == (0, 0, 56, 56) and t.images[1].size == (224, 224)
    assert zoom_call.bbox == (0.0, 0.0, 5.0, 5.0) and zoom_call.label == "corner"
    assert zoom_call.arguments == {"bbox_2d": (0.0, 0.0, 5.0, 5.0), "label": "corner"}
    assert rot.arguments == {"angle": 270} and rot.image_index == 2 and rot.bbox is None
    assert t.images[2].size == ex.image.size[::-1]
    assert t.finish_reason == "eos" and t.turns == 3
    # the default loop (no tools given): the zoom alone, the old prompt
    plain = AgentLoop(NoEngine(), chat, AgentConfig(max_turns=2))
    assert plain.tools.names == ("image_zoom_in_tool",)
    assert plain.chat.system_prompt == chat.system_prompt
    assert loop.chat.system_prompt.startswith(chat.system_prompt + "\n\n# Tools")


@pytest.fixture(scope="module")
def own_engine(tiny_model_path):
    """An engine of this module's own: the session's shares vLLM's process-wide parallel
    state, which an engine that another module made and dropped tears down with it
    (tests/test_resume.py makes one)."""
    from mmagent_rl.rollout.engine import EngineConfig, VLLMEngine

    return VLLMEngine(tiny_model_path, EngineConfig(max_model_len=2048, seed=0))


def test_user_tools_in_the_agent_loop_on_the_real_engine(own_engine, chat, examples):
    """User tools from tests/user_tools.py next to the built-in rotate: offered in the
    prompt, run on scripted calls; an exception, a timeout and an unknown name become
    observations the model sees, and the real engine takes every request and goes on."""
    from mmagent_rl.rollout.agent_loop import AgentConfig, AgentLoop

    ts = ToolSet.load(["mmagent_rl.tools.rotate:image_rotate_tool"] + USER, timeout_s=0.4)
    ex = examples[1]
    loop = AgentLoop(own_engine, chat, AgentConfig(max_turns=6, max_new_tokens=4,
                                               max_total_tokens=2000), ts)
    turns = [call_turn("image_rotate_tool", angle=180),
             call_turn("image_flip_tool", direction="horizontal"),
             call_turn("broken_tool"), call_turn("slow_tool", seconds=3),
             call_turn("image_zoom_in_tool", bbox_2d=[0, 0, 50, 50])]
    (t,) = loop.run([ex], n=1, seed=0, scripted_turns=turns)

    prompt = chat.decode(t.token_ids[:t.prompt_len])  # offered in the prompt
    assert "# Tools" in prompt and "<tools>" in prompt
    for s in ts.schemas:
        assert json.dumps(s) in prompt
    assert prompt.count(chat.system_prompt.split("\n")[0]) == 1

    assert [c.name for c in t.tool_calls] == ["image_rotate_tool", "image_flip_tool",
                                              "broken_tool", "slow_tool", None]
    rot, flip, broken, slow, unknown = t.tool_calls
    assert rot.ok and flip.ok and rot.image_index == 1 and flip.image_index == 2
    assert np.array_equal(np.asarray(t.images[1]), np.asarray(
        ex.image.convert("RGB").transpose(Image.Transpose.ROTATE_180)))
    assert np.array_equal(np.asarray(t.images[2]), np.asarray(
        ex.image.convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT)))
    assert broken.error == "Error: tool broken_tool failed (RuntimeError)"
    assert slow.error == "Error: tool slow_tool timed out after 0.4 s"
    assert unknown.error.startswith("Error: unknown tool 'image_zoom_in_tool'. Known tools: "
                                    "image_rotate_tool, image_flip_tool")
    assert all(c.latency_s is not None for c in (rot, flip, broken, slow))
    assert unknown.latency_s is None
    # what the model saw after each failed call: the error text, as tokens (mask 0)
    calls = t.tool_calls
    for k in (2, 3, 4):
        b = calls[k].span[1]
        obs = t.token_ids[b:b + len(chat.observation_ids(None, calls[k].error))]
        assert obs == chat.observation_ids(None, calls[k].error)
        assert f"<tool_response>{calls[k].error}</tool_response>" in chat.decode(obs)
        assert not any(t.loss_mask[b:b + len(obs)])
    # ... and the images it saw: each a run of pads of the returned image's size
    pads = t.token_ids.count(chat.image_token_id)
    assert pads == sum(chat.num_image_tokens(im) for im in t.images)
    assert t.turns == 6 and len(t.turn_texts) == 6  # the engine generated after them all
    m = rollout_metrics([t], ts.names)
    assert m["tool/broken_tool/errors"] == 1 and m["tool/image_flip_tool/errors"] == 0
    assert m["tool/slow_tool/latency_s"] >= 0.4


def call_turn(name: str, **arguments) -> str:
    return "<tool_call>" + call(name, **arguments) + "</tool_call>"


def test_the_documented_user_tool_works(tmp_path, monkeypatch):
    """docs/tools.md's example tool, written to my_pkg/tools.py as a user would, loads
    by its import path and runs; the launch command's list composes."""
    import pathlib
    import re
    import sys

    doc = (pathlib.Path(__file__).parents[1] / "docs" / "tools.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, re.S)
    pkg = tmp_path / "my_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "tools.py").write_text(blocks[0] + "\n" + blocks[1])
    monkeypatch.syspath_prepend(str(tmp_path))
    launch = re.search(r"'rollout.tools=\[(.*?)\]'", doc).group(1).split(",")
    ts = ToolSet.load(launch + ["my_pkg.tools:size_tool"])
    assert ts.names == ("image_zoom_in_tool", "image_grayscale_tool", "image_size_tool")
    assert ts.in_prompt and ts.timeout_of(ts.get("image_grayscale_tool")) == 5.0
    img = coord_image()
    out = ts.run(ts.parse(call("image_grayscale_tool", contrast=2)), img)
    arr = np.asarray(out.image)
    assert out.error is None and arr.shape == (40, 60, 3) and (arr[..., 0] == arr[..., 2]).all()
    assert "contrast" in ts.parse(call("image_grayscale_tool", contrast=9)).error
    assert ts.run(ts.parse(call("image_size_tool")), img).text == "60x40"
    sys.modules.pop("my_pkg.tools", None)
    sys.modules.pop("my_pkg", None)
