"""Driver pieces on hand-built trajectories: metrics, learner shards, advantages."""
from __future__ import annotations

import pytest
import torch

from mmagent_rl import algos
from mmagent_rl.algos.grpo import GRPOConfig
from mmagent_rl.config import Config, validate
from mmagent_rl.metrics import rollout_metrics
from mmagent_rl.cluster import shard_for_learners
from mmagent_rl.trajectory import ToolCall, Trajectory


def traj(pid, correct, tool, n_gen=3, idx=0):
    ids = list(range(5 + n_gen))
    mask = [0] * 5 + [1] * n_gen
    t = Trajectory(prompt_id=pid, sample_idx=idx, token_ids=ids, loss_mask=mask,
                   logprobs=[0.0] * len(ids), images=[], prompt_len=5)
    t.reward = float(correct)
    t.reward_info = {"correct": float(correct), "has_answer": 1.0}
    if tool:
        t.tool_calls = [ToolCall(turn=0, raw="{}")]
    return t


def test_tool_metrics_on_hand_built_groups():
    trajs = [
        traj("a", 0, True), traj("a", 0, True), traj("a", 1, False),  # tools all wrong
        traj("b", 1, True), traj("b", 0, True),  # one tool rollout right
        traj("c", 0, False), traj("c", 0, False),  # no tool use at all
    ]
    m = rollout_metrics(trajs)
    assert m["tool/use_rate"] == pytest.approx(4 / 7)
    assert m["tool/all_wrong_rate"] == pytest.approx(1 / 3)
    assert m["acc/mean"] == pytest.approx(2 / 7)
    assert m["acc/with_tool"] == pytest.approx(1 / 4)


def test_grpo_advantages_are_broadcast_to_generated_tokens_only():
    trajs = [traj("a", 1, False), traj("a", 0, False), traj("b", 1, False)]
    adv = algos.grpo_advantages(trajs, GRPOConfig())
    # group a: rewards [1, 0], mean 0.5, unbiased std sqrt(0.5) -> +-0.7071
    assert adv.tolist() == pytest.approx([0.70710, -0.70710, 0.0], abs=1e-4)
    assert trajs[0].advantages[:5] == [0.0] * 5
    assert trajs[0].advantages[5:] == pytest.approx([0.70710] * 3, abs=1e-4)


def test_learner_shards_are_equal_and_padding_adds_no_tokens():
    trajs = [traj("a", 1, False, idx=i) for i in range(5)]
    algos.grpo_advantages(trajs, GRPOConfig())
    shards = shard_for_learners(trajs, 2)
    assert [len(s) for s in shards] == [3, 3]
    flat = [t for s in shards for t in s]
    assert sum(t.num_generated for t in flat) == sum(t.num_generated for t in trajs)
    assert flat[:5] == trajs


def test_config_validation_names_key_and_choices():
    cfg = Config()
    cfg.algo.name = "grpo"
    validate(cfg)
    cfg.algo.name = "ppo"
    with pytest.raises(ValueError, match=r"algo.name.*valid choices.*grpo"):
        validate(cfg)
    cfg.algo.name = "grpo"
    cfg.rollout.agent.max_turns = 9
    with pytest.raises(ValueError, match="max_images_per_prompt"):
        validate(cfg)


def test_mapo_post_mode_prompt_asks_for_a_description():
    from mmagent_rl.config import system_prompt

    cfg = Config()
    cfg.algo.name = "mapo"
    assert "<description>" in system_prompt(cfg)  # post, the default
    cfg.algo.mapo.description = "label"
    assert system_prompt(cfg) is None  # label mode: the default tool prompt has "label"
    cfg.algo.mapo.description = "post"
    cfg.model.system_prompt = "mine"
    assert system_prompt(cfg) == "mine"  # an explicit prompt always wins


def test_eval_every_on_file_data_needs_a_heldout_file():
    from mmagent_rl.config import validate_common

    cfg = Config()
    cfg.data.kind, cfg.data.path, cfg.trainer.eval_every = "file", "train.jsonl", 5
    with pytest.raises(ValueError, match="data.eval_path"):
        validate_common(cfg)
    cfg.data.eval_path = "heldout.jsonl"
    validate_common(cfg)
    cfg.data.eval_path, cfg.data.eval_fraction = None, 0.2  # a seeded held-out share
    validate_common(cfg)
    cfg.data.eval_fraction = 1.0
    with pytest.raises(ValueError, match="data.eval_fraction"):
        validate_common(cfg)
    cfg.data.eval_fraction, cfg.reward.match_mode = 0.2, "fuzzy"  # before any actor
    with pytest.raises(ValueError, match="reward.match_mode"):
        validate_common(cfg)


def test_file_data_eval_is_held_out_never_the_training_file(tmp_path):
    """Without data.eval_path an eval of file data needs data.eval_fraction: a seeded
    share the train split leaves out; data.eval_path wins whatever data.kind is."""
    import json

    from PIL import Image

    from mmagent_rl.sources import make_dataset

    Image.new("RGB", (32, 32), "red").save(tmp_path / "red.png")
    rows = [{"image": "red.png", "question": f"q{i}", "answer": "red", "id": i}
            for i in range(10)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "bench.jsonl").write_text(json.dumps(rows[0]) + "\n")
    cfg = Config()
    cfg.data.kind, cfg.data.path = "file", str(tmp_path / "train.jsonl")
    assert len(make_dataset(cfg, "train")) == 10
    with pytest.raises(ValueError, match="data.eval_path.*data.eval_fraction"):
        make_dataset(cfg, "eval")
    cfg.data.eval_fraction = 0.3
    train, held = make_dataset(cfg, "train"), make_dataset(cfg, "eval")
    assert (len(train), len(held)) == (7, 3)
    assert not {e.id for e in train} & {e.id for e in held}
    assert [e.id for e in make_dataset(cfg, "eval")] == [e.id for e in held]  # stable
    cfg.data.seed = 1
    assert [e.id for e in make_dataset(cfg, "eval")] != [e.id for e in held]  # seeded
    cfg.data.eval_fraction = 0.99
    with pytest.raises(ValueError, match="nothing would be left"):
        make_dataset(cfg, "train")
    synthetic = Config()
    synthetic.data.eval_path = str(tmp_path / "bench.jsonl")  # a benchmark file alone
    assert [e.id for e in make_dataset(synthetic, "eval")] == ["0"]


def test_eval_examples_travel_as_arrays_and_come_back_identical():
    import numpy as np
    from PIL import Image

    from mmagent_rl.example import Example, examples_from_wire, examples_to_wire
    from mmagent_rl.data.synthetic import SyntheticConfig, SyntheticDataset

    ds = SyntheticDataset(SyntheticConfig(), seed=0, size=4, split="test")
    exs = [ds[i] for i in range(4)]
    exs.append(Example("p", Image.new("P", (8, 8)), "q", "a"))  # a mode sent as it is
    exs.append(Example("m", Image.new("RGB", (8, 6), "red"), "<image> vs <image>", "a",
                       extra_images=[Image.new("RGB", (4, 4), "blue")]))  # multi-image
    wire = examples_to_wire(exs)
    assert all(isinstance(px[0], np.ndarray) for _, px in wire[:4]) and wire[4][1] is None
    assert all(ex.image is None for ex, _ in wire[:4]) and len(wire[5][1]) == 2
    back = examples_from_wire(wire)
    assert len(back) == len(exs)
    for a, b in zip(exs, back):
        assert (a.id, a.question, a.answer, a.target_box, a.meta, len(a.images)) \
            == (b.id, b.question, b.answer, b.target_box, b.meta, len(b.images))
        for x, y in zip(a.images, b.images):
            assert (x.mode, x.size) == (y.mode, y.size)
            assert np.array_equal(np.asarray(x), np.asarray(y))


def test_reward_scorer_returns_scores_not_trajectories():
    """The reward actor's call sends back one Score per trajectory (no images); the
    driver applies them. The trajectories it was given are left unchanged."""
    from mmagent_rl.reward.worker import RewardScorer, Score
    from mmagent_rl.trajectory import Trajectory

    trajs = [Trajectory(prompt_id="p", sample_idx=i, token_ids=[1, 2], loss_mask=[0, 1],
                        logprobs=[0.0, 0.0], images=[], prompt_len=1, ground_truth="red",
                        response_text=f"<answer>{a}</answer>")
             for i, a in enumerate(("red", "blue"))]
    scores, metrics = RewardScorer().scores(trajs)
    assert all(isinstance(s, Score) for s in scores) and metrics == {}
    assert [t.reward for t in trajs] == [None, None]
    for t, s in zip(trajs, scores):
        s.apply(t)
    assert [t.correct for t in trajs] == [True, False] and trajs[0].reward > trajs[1].reward
    assert trajs[0].align_scores is None  # no alignment asked for


def test_eval_summary_has_per_category_accuracy_and_pass_at_k():
    from mmagent_rl.eval import summarize

    trajs = [traj("a", 1, False, idx=0), traj("a", 0, False, idx=1),
             traj("b", 1, True, idx=0), traj("b", 1, True, idx=1),
             traj("c", 0, False, idx=0), traj("c", 0, False, idx=1)]
    for t in trajs:
        t.image_size = (64, 64)
        t.meta = {"category": "color"} if t.prompt_id in "ab" else {}
    cats = summarize(trajs, k=2)["by_category"]
    assert cats == {"color": {"n_examples": 2, "accuracy": 0.75, "pass@1": 0.75,
                              "pass@k": 1.0},
                    "all": {"n_examples": 1, "accuracy": 0.0, "pass@1": 0.0,
                            "pass@k": 0.0}}
