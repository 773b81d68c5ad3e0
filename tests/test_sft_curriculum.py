"""The SFT curriculum's parts: the LR schedule and stage order, the sample kinds, the
skill probes that gate the stages (no learner here; tests/test_embedded.py runs it)."""
from __future__ import annotations

import math

import pytest

from mmagent_rl.chat import ChatFormat
from mmagent_rl.config import Config, SFTConfig, SFTStage
from mmagent_rl.models.embedded import SYSTEM_PROMPT, embedded_path
from mmagent_rl.sft.curriculum import Curriculum
from mmagent_rl.sft.loop import Position, lr_at, next_position
from mmagent_rl.sft.probes import KeyTokens, skill_metrics


def _sft(**kw) -> SFTConfig:
    stages = [SFTStage(name="a", steps=5, mix={"locate": 1.0}),
              SFTStage(name="b", steps=10, mix={"dialogue": 1.0})]
    return SFTConfig(**{"stages": stages, "lr": 1.0, "warmup_steps": 2,
                        "min_lr_ratio": 0.1, "steps": 100, **kw})


def test_lr_warms_up_holds_then_decays_over_the_last_stage_only():
    sft = _sft()
    assert lr_at(sft, Position(0, 0, 0)) == pytest.approx(0.5)
    assert lr_at(sft, Position(1, 0, 1)) == pytest.approx(1.0)
    assert lr_at(sft, Position(4, 0, 4)) == 1.0  # not the last stage: constant
    # the cosine starts where the last stage starts, whenever that is
    assert lr_at(sft, Position(3, 1, 0)) == pytest.approx(1.0)
    assert lr_at(sft, Position(8, 1, 5)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert lr_at(sft, Position(13, 1, 10)) == pytest.approx(0.1)


def test_stages_end_on_their_steps_on_a_gate_or_on_the_cap():
    sft = _sft()
    assert next_position(sft, Position(0, 0, 0), False) == Position(1, 0, 1)
    assert next_position(sft, Position(4, 0, 4), False) == Position(5, 1, 0)
    assert next_position(sft, Position(1, 0, 1), True) == Position(2, 1, 0)  # gate opened
    assert next_position(sft, Position(14, 1, 9), False) is None  # the last stage is done
    assert next_position(_sft(steps=3), Position(2, 0, 2), False) is None  # the cap
    assert next_position(SFTConfig(steps=3), Position(1), False) == Position(2)  # plain


@pytest.fixture(scope="module")
def agent_chat():
    return ChatFormat.from_pretrained(embedded_path(), SYSTEM_PROMPT)


def _curriculum(chat, **stage) -> tuple[Curriculum, SFTStage]:
    cfg = Config()
    st = SFTStage(name="s", steps=10, batch={"crop": 3, "locate": 3, "dialogue": 3},
                  easy_fraction=0.0, **stage)
    cfg.sft.stages = [st]
    return Curriculum(cfg, chat), st


def test_sample_kinds_are_cut_from_one_demonstration(agent_chat):
    chat = agent_chat
    cur, st = _curriculum(chat, mix={"locate": 1.0})
    kind, locate = cur.batch(0, st)
    assert kind == "locate" and len(locate) == 3
    for t in locate:  # the prompt and the tool call, nothing after
        assert t.token_ids[-1] == chat.tool_call_close_id and len(t.images) == 1
        assert t.loss_mask[:t.prompt_len] == [0] * t.prompt_len
    cur, st = _curriculum(chat, mix={"crop": 1.0})
    _, crops = cur.batch(0, st)
    for t in crops:  # the observation (no prompt image), then the trained final turn
        assert len(t.images) == 1 and t.loss_mask[0] == 0 and t.loss_mask[-1] == 1
        assert chat.decode(t.token_ids).count("<answer>") == 1
    cur, st = _curriculum(chat, mix={"dialogue": 1.0})
    _, whole = cur.batch(0, st)
    assert all(len(t.images) == 2 for t in whole)  # the image and the crop


def test_a_batch_depends_on_step_and_stage_only(agent_chat):
    cur, st = _curriculum(agent_chat, mix={"locate": 0.5, "dialogue": 0.5},
                          think="The square is {color}. I zoom in on the black ring.")
    first = cur.batch(7, st)
    cur.batch(3, st)  # another batch in between changes nothing
    again = cur.batch(7, st)
    assert first[0] == again[0]
    assert [t.token_ids for t in first[1]] == [t.token_ids for t in again[1]]
    assert [t.token_ids for t in cur.batch(8, st)[1]] != [t.token_ids for t in first[1]]


def test_a_stage_with_an_unknown_kind_is_refused(agent_chat):
    with pytest.raises(ValueError, match="unknown kinds"):
        _curriculum(agent_chat, mix={"zoom": 1.0})


def test_probes_score_the_first_box_numbers_and_colours(agent_chat):
    chat = agent_chat
    keys = KeyTokens(chat.tokenizer)
    cur, st = _curriculum(chat, mix={"dialogue": 1.0})
    _, trajs = cur.batch(0, st)
    targets = [[t.token_ids[i] for i in range(1, len(t.token_ids)) if t.loss_mask[i]]
               for t in trajs]
    perfect = skill_metrics(trajs, targets, keys)
    assert perfect == {k: 1.0 for k in ("acc_num", "acc_xy1", "near_xy1", "acc_box",
                                        "acc_color", "acc_color1")}
    by_value = {v: i for i, v in keys.value.items()}
    off_by_one_cell, garbage = [], []
    for t, tg in zip(trajs, targets):
        trained = [i for i in range(1, len(t.token_ids)) if t.loss_mask[i]]
        nums = [j for j, i in enumerate(trained) if tg[j] in keys.value
                and t.token_ids[i - 1] != keys.underscore]
        assert len(nums) >= 4  # a box of four numbers in every dialogue
        x1 = nums[0]
        shifted = list(tg)
        shifted[x1] = by_value[keys.value[tg[x1]] + 32] if keys.value[tg[x1]] + 32 in \
            by_value else by_value[keys.value[tg[x1]] - 32]
        off_by_one_cell.append(shifted)
        bad = list(tg)
        bad[x1] = chat.im_end_id  # not a number at all
        garbage.append(bad)
    m = skill_metrics(trajs, off_by_one_cell, keys)
    assert m["acc_xy1"] == pytest.approx(0.5) and m["near_xy1"] == 1.0 and m["acc_box"] == 0
    assert skill_metrics(trajs, garbage, keys)["near_xy1"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="predictions for"):
        skill_metrics(trajs, [tg[:-1] for tg in targets], keys)
