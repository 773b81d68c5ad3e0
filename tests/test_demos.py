import json
import random

import numpy as np
import pytest

from mmagent_rl.data.demos import (
    DemoConfig,
    demo_from_messages,
    demo_from_row,
    demo_to_row,
    final_text,
    make_demo,
)
from mmagent_rl.data.synthetic import SyntheticConfig, describe_target, generate_example
from mmagent_rl.models.tiny import TinySpec, ensure_tiny_model
from mmagent_rl.chat import ChatFormat
from mmagent_rl.tools.parse import find_tool_call, parse_tool_call
from mmagent_rl.tools.zoom import is_valid_box, zoom


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    # Only the tokenizer and the image processor are used; the tiny build takes seconds.
    path = ensure_tiny_model(TinySpec(), cache_dir=str(tmp_path_factory.mktemp("models")))
    return ChatFormat.from_pretrained(str(path))


def hard_example(index=0):
    ex = generate_example(5, index, SyntheticConfig())
    assert not ex.meta["easy"]
    return ex


def easy_example():
    cfg = SyntheticConfig(easy_fraction=1.0)
    return generate_example(5, 0, cfg)


def test_loss_mask_is_exactly_the_assistant_tokens(chat):
    ex = hard_example()
    demo = make_demo(ex, chat, random.Random(0), DemoConfig())
    crop, _ = zoom(ex.image, demo.box)
    turn1 = demo.messages[2]["content"][0]["text"]
    turn2 = demo.messages[4]["content"][0]["text"]
    # The expected sequence, piece by piece, with its mask written out by hand.
    pieces = [
        (chat.prompt_ids(ex.image, ex.question), 0),
        (chat.encode(turn1), 1),
        (chat.observation_ids(crop, None), 0),  # starts with turn 1's <|im_end|>
        (chat.encode(turn2) + [chat.im_end_id], 1),
    ]
    want_ids = [t for ids, _ in pieces for t in ids]
    want_mask = [m for ids, m in pieces for _ in ids]
    assert demo.token_ids == want_ids
    assert demo.loss_mask == want_mask  # token by token
    # The <|im_end|> right after </tool_call> belongs to the observation.
    # (the system prompt shows a <tool_call> example too: search after the prompt)
    k = demo.token_ids.index(chat.tool_call_close_id, len(pieces[0][0]))
    assert demo.loss_mask[k] == 1
    assert demo.token_ids[k + 1] == chat.im_end_id and demo.loss_mask[k + 1] == 0
    # The generated text is exactly the two assistant turns plus the final <|im_end|>.
    generated = chat.decode([t for t, m in zip(demo.token_ids, demo.loss_mask) if m])
    assert generated == turn1 + turn2 + "<|im_end|>"
    assert demo.token_ids[-1] == chat.im_end_id and demo.loss_mask[-1] == 1
    assert turn2 == final_text(ex) and f"<answer>{ex.answer}</answer>" in turn2
    # No image token is ever trained on.
    assert all(m == 0 for t, m in zip(demo.token_ids, demo.loss_mask)
               if t == chat.image_token_id)
    assert demo.token_ids.count(chat.image_token_id) == (
        chat.num_image_tokens(ex.image) + chat.num_image_tokens(crop))


@pytest.mark.parametrize("cfg", [
    DemoConfig(),
    DemoConfig(coarse_cell=128, box_side=256, jitter=40),
    DemoConfig(coarse_cell=0, jitter=8, label="target"),
])
def test_tool_call_parses_and_contains_target(chat, cfg):
    rng = random.Random(1)
    for index in range(25):
        ex = hard_example(index)
        demo = make_demo(ex, chat, rng, cfg)
        call = parse_tool_call(find_tool_call(demo.messages[2]["content"][0]["text"]))
        assert call.ok, call.error
        w, h = ex.image.size
        assert is_valid_box(list(call.bbox), w, h)
        x1, y1, x2, y2 = call.bbox
        tx1, ty1, tx2, ty2 = ex.target_box
        assert x1 <= tx1 and y1 <= ty1 and x2 >= tx2 and y2 >= ty2
        assert tuple(call.bbox) == demo.box
        if cfg.coarse_cell:
            assert all(v % cfg.coarse_cell == 0 for v in call.bbox)
            assert x2 - x1 == y2 - y1 == cfg.box_side
        want_label = describe_target(ex)
        if cfg.label == "no_color":
            want_label = want_label.replace(f" {ex.answer} ", " ")
        assert call.label == want_label


def test_observation_is_the_zoom_of_the_box(chat):
    ex = hard_example(3)
    demo = make_demo(ex, chat, random.Random(2), DemoConfig())
    assert demo.messages[3] == {"role": "tool", "content": [{"type": "image", "image": 1}]}
    want, _ = zoom(ex.image, demo.box)
    got = demo.images[1]
    assert got.size == want.size == (112, 112)
    assert np.array_equal(np.asarray(got), np.asarray(want))
    assert demo.images[0] is ex.image


def test_easy_example_answers_without_tool(chat):
    ex = easy_example()
    assert ex.meta["easy"]
    demo = make_demo(ex, chat, random.Random(0), DemoConfig())
    assert demo.box is None and len(demo.images) == 1
    assert [m["role"] for m in demo.messages] == ["system", "user", "assistant"]
    prompt = chat.prompt_ids(ex.image, ex.question)
    assert chat.tool_call_open_id not in demo.token_ids[len(prompt):]
    assert demo.token_ids[:len(prompt)] == prompt
    assert demo.loss_mask == [0] * len(prompt) + [1] * (len(demo.token_ids) - len(prompt))
    assert demo.token_ids[-1] == chat.im_end_id


@pytest.mark.parametrize("easy", [False, True])
def test_messages_round_trip(chat, easy):
    ex = easy_example() if easy else hard_example(4)
    demo = make_demo(ex, chat, random.Random(3), DemoConfig())
    messages = json.loads(json.dumps(demo.messages))  # JSON-serialisable as is
    again = demo_from_messages(messages, demo.images, chat)
    assert again.token_ids == demo.token_ids
    assert again.loss_mask == demo.loss_mask
    # Through a jsonl row (images as PNG): same tokens, same pixels.
    row = json.loads(json.dumps(demo_to_row(demo)))
    loaded = demo_from_row(row, chat)
    assert loaded.token_ids == demo.token_ids and loaded.loss_mask == demo.loss_mask
    assert loaded.box == demo.box
    for a, b in zip(loaded.images, demo.images):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_other_system_prompt_round_trips(chat):
    import dataclasses

    short = dataclasses.replace(chat, system_prompt="Zoom in, then answer.")
    demo = make_demo(hard_example(5), short, random.Random(0), DemoConfig())
    # Rebuilt with the default ChatFormat: the system text comes from the messages.
    again = demo_from_messages(demo.messages, demo.images, chat)
    assert again.token_ids == demo.token_ids and again.loss_mask == demo.loss_mask


def test_error_observation_and_bad_shapes(chat):
    ex = hard_example(6)
    demo = make_demo(ex, chat, random.Random(0), DemoConfig())
    messages = json.loads(json.dumps(demo.messages))
    messages[3] = {"role": "tool", "content": [{"type": "text", "text": "Error: boom"}]}
    d = demo_from_messages(messages, demo.images[:1], chat)
    obs = chat.observation_ids(None, "Error: boom")
    start = len(chat.prompt_ids(ex.image, ex.question))
    k = d.token_ids.index(chat.tool_call_close_id, start) + 1
    assert d.token_ids[k:k + len(obs)] == obs and d.loss_mask[k:k + len(obs)] == [0] * len(obs)
    with pytest.raises(ValueError):
        demo_from_messages(messages[:3], demo.images, chat)  # tool call, no tool message
    with pytest.raises(ValueError):
        demo_from_messages(messages[1:], demo.images, chat)  # no system message


def test_demos_are_deterministic_given_rng(chat):
    ex = hard_example(7)
    a = make_demo(ex, chat, random.Random(9), DemoConfig())
    b = make_demo(ex, chat, random.Random(9), DemoConfig())
    assert a.token_ids == b.token_ids and a.box == b.box
