"""RL that visibly learns, on real Ray + vLLM + DeepSpeed with the shipped agent:
the held-out eval inside training, a reward the agent moves in a few steps, and the
testbed's held-out split kept apart from every training stream."""
from __future__ import annotations

import hashlib
import json
import math

import pytest

from test_launch import launch

# The shipped agent on the testbed, shrunk to what a test can afford.
SMALL = ["+algo=grpo", "model=embedded", "data=synthetic_hard", "learner.num_workers=1",
         "trainer.prompts_per_step=2", "rollout.n=4", "learner.micro_batch_size=4",
         "data.eval_size=6", "eval.n_samples=2", "eval.k=2", "trainer.save_final=true"]


def _rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _training_part(row: dict) -> dict:
    """What a step trained on and what it computed: not its timings or its eval."""
    return {k: v for k, v in row.items()
            if not k.startswith(("time/", "eval/"))
            and not k.endswith(("_per_s", "latency_s"))}


def _public_format_files(tmp_path) -> list[str]:
    """The task's examples as the field ships them: training rows in verl parquet and a
    held-out benchmark in VLMEvalKit TSV (multiple choice, two categories)."""
    from format_fixtures import COLOUR_OPTIONS, as_records, write_tsv, write_verl

    from mmagent_rl.data.synthetic import SyntheticConfig, SyntheticDataset

    train = SyntheticDataset(SyntheticConfig(), seed=0, size=8, split="train")
    held = as_records([SyntheticDataset(SyntheticConfig(), seed=0, size=6, split="test")[i]
                       for i in range(6)], options=COLOUR_OPTIONS)
    for i, r in enumerate(held):
        r.category = ("near", "far")[i % 2]
    write_verl(tmp_path / "train.parquet", [train[i] for i in range(8)])
    write_tsv(tmp_path / "bench.tsv", held)
    return ["data.kind=file", f"data.path={tmp_path / 'train.parquet'}"]


@pytest.mark.slow
def test_eval_inside_training_matches_the_eval_cli_and_leaves_training_alone(tmp_path):
    """On public formats too: a 2-step GRPO run on verl parquet, evaluated on a TSV
    benchmark inside training and by the eval CLI (data.format=tsv)."""
    with_eval, without = tmp_path / "with_eval", tmp_path / "without"
    data = _public_format_files(tmp_path)
    bench = tmp_path / "bench.tsv"
    p = launch([*SMALL, *data, f"data.eval_path={bench}", "trainer.total_steps=2",
                "trainer.eval_every=1", f"hydra.run.dir={with_eval}"])
    assert p.returncode == 0, p.stderr[-4000:]
    rows = _rows(with_eval)
    assert [r["step"] for r in rows] == [0, 1, 2]
    keys = ("eval/pass@1", "eval/pass@k", "eval/tool_call_rate", "eval/box_hit_rate",
            "eval/format_rate")
    for r in rows:
        assert all(k in r for k in keys), set(keys) - set(r)
        assert r["eval/n_examples"] == 6 and r["eval/n_samples"] == 2
    assert "loss" not in rows[0]  # step 0: the eval before training, nothing trained
    assert "held-out pass@1 (6 examples x 2 samples): step 0:" in p.stdout

    # The final eval.json is what the eval CLI gives on the saved checkpoint.
    final = json.loads((with_eval / "eval.json").read_text())
    assert final["step"] == 2
    cli = launch(["model=embedded", "data.format=tsv", f"data.eval_path={bench}",
                  "eval.n_samples=2", "eval.k=2",
                  f"eval.checkpoint={with_eval / 'checkpoints' / 'final'}",
                  f"hydra.run.dir={tmp_path / 'cli'}"], module="mmagent_rl.eval")
    assert cli.returncode == 0, cli.stderr[-4000:]
    alone = json.loads((tmp_path / "cli" / "eval.json").read_text())
    for k in ("pass@1", "pass@k", "tool_call_rate", "box_hit_rate", "format_rate",
              "accuracy", "mean_turns", "n_examples", "n_samples"):
        assert final[k] == pytest.approx(alone[k], abs=1e-12), k
    tool_figures = {k: v for k, v in alone.items() if k.startswith("tool/")}
    assert tool_figures.keys() == {k for k in final if k.startswith("tool/")}
    assert all(k.endswith("latency_s") or final[k] == v for k, v in tool_figures.items())
    assert set(alone["by_category"]) == {"near", "far"}
    assert alone["by_category"] == final["by_category"]
    assert sum(c["n_examples"] for c in alone["by_category"].values()) == 6
    assert "by category" in cli.stdout and "near" in cli.stdout  # the per-category table
    assert all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))

    # The same run without eval trains on the same rollouts, step for step.
    p = launch([*SMALL, *data, "trainer.total_steps=2", "trainer.save_final=false",
                f"hydra.run.dir={without}"])
    assert p.returncode == 0, p.stderr[-4000:]
    plain = _rows(without)
    assert [r["step"] for r in plain] == [1, 2]
    assert [_training_part(r) for r in rows[1:]] == [_training_part(r) for r in plain]


@pytest.mark.slow
def test_rl_moves_a_reward_the_agent_can_learn(tmp_path):
    """Reward 1 only for answering "red": the share of red answers must rise clearly
    above the first two steps' (sampled from the starting policy and after one update).
    Broken gradients or a broken weight sync (the engine keeps sampling the starting
    policy) leave it flat. The best later step is compared, not the last: at this LR
    the agent shipped on 2026-12-05 overshoots and falls back within 8 steps
    (0.03, 0.16, 0.72, 0.50, 0.22, ... in one run)."""
    run = tmp_path / "run"
    # the same 8 prompts every step (data.train_size=8): which colours a batch holds
    # would otherwise move the red share more than 8 steps of learning can
    p = launch([*SMALL, "trainer.total_steps=8", "trainer.prompts_per_step=8",
                "data.train_size=8", "learner.lr=1e-3",
                "reward.fn=reward_plugins:red_answer_reward",
                "trainer.save_final=false", f"hydra.run.dir={run}"])
    assert p.returncode == 0, p.stderr[-4000:]
    r = [row["reward/mean"] for row in _rows(run)]
    start, best = sum(r[:2]) / 2, max(r[2:])
    assert best > start + 0.3, r  # with learner.lr=0 this fails


def _image_hash(ex) -> str:
    return hashlib.sha256(ex.image.tobytes()).hexdigest()


def test_testbed_heldout_split_is_disjoint_from_every_training_stream():
    """The held-out examples of data=synthetic_hard share no (seed, index) key and no
    image with the RL training split of any sweep seed, nor with the SFT streams
    (mmagent_rl.sft's generated demonstrations and the embedded agent's curriculum)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from mmagent_rl.config import register
    from mmagent_rl.data.synthetic import SPLIT_OFFSETS, SyntheticConfig, generate_example
    from mmagent_rl.sources import make_dataset
    from conftest import REPO

    register()
    cfgs = {}
    with initialize_config_dir(config_dir=f"{REPO}/conf", version_base="1.3"):
        for seed in (0, 1, 2):
            c = compose("config", overrides=["data=synthetic_hard", f"seed={seed}"])
            cfgs[seed] = OmegaConf.to_object(c)
    held = {seed: make_dataset(c, "eval") for seed, c in cfgs.items()}
    ids = [ex.id for ex in held[0]]
    assert len(ids) == 256 and len(set(ids)) == 256
    for seed in (1, 2):  # one held-out set for the whole sweep
        assert [ex.id for ex in held[seed]] == ids
    held_hashes = {_image_hash(ex) for ex in held[0]}
    assert len(held_hashes) == 256

    def key(ex):
        return ex.meta["seed"], ex.meta["index"]

    held_keys = {key(ex) for ex in held[0]}
    assert all(ex.meta["index"] >= SPLIT_OFFSETS["test"] for ex in held[0])
    streams = {f"rl seed {s}": make_dataset(c, "train") for s, c in cfgs.items()}
    # The RL train split's whole key range lies below the held-out offset.
    for name, ds in streams.items():
        assert ds.size <= SPLIT_OFFSETS["val"], name
    # mmagent_rl.sft generates from the same train split (its data.* config); the
    # embedded agent's curriculum draws its examples from the train offset too. Sample
    # each stream and compare images as well as keys.
    sft_like = [generate_example(0, SPLIT_OFFSETS["train"] + i, SyntheticConfig())
                for i in range(64)]
    for name, ds in [*streams.items(), ("sft demos", sft_like)]:
        sample = [ds[i] for i in range(64)]
        assert not held_keys & {key(ex) for ex in sample}, name
        assert not held_hashes & {_image_hash(ex) for ex in sample}, name
    # The embedded agent's curriculum (sft=embedded_agent) draws train-split indices
    # below step cap x stride, which it checks is under the val offset.
    from mmagent_rl.sft.curriculum import STRIDE

    with initialize_config_dir(config_dir=f"{REPO}/conf", version_base="1.3"):
        agent = OmegaConf.to_object(compose("config", overrides=["sft=embedded_agent"]))
    assert agent.sft.steps * STRIDE <= SPLIT_OFFSETS["val"]
    # A differing data order across seeds: the training streams are not the same.
    assert _image_hash(streams["rl seed 0"][0]) != _image_hash(streams["rl seed 1"][0])


def test_blank_tool_images_control_replaces_every_crop(engine, chat, examples):
    """eval.blank_tool_images: the model sees a white image of the crop's size."""
    from test_engine_learner import VALID_CALL

    from mmagent_rl.rollout.agent_loop import AgentConfig, AgentLoop

    ex = examples[0]
    runs = {}
    for blank in (False, True):
        loop = AgentLoop(engine, chat, AgentConfig(max_new_tokens=8, max_turns=2,
                                                   blank_tool_images=blank))
        (t,) = loop.run([ex], n=1, seed=0, scripted_turns=[VALID_CALL % ex.target_box])
        assert t.tool_calls[0].ok and len(t.images) == 2
        runs[blank] = t.images[1]
    crop, blank = runs[False], runs[True]
    assert blank.size == crop.size
    assert blank.getcolors() == [(blank.width * blank.height, (255, 255, 255))]
    assert len(crop.getcolors(maxcolors=1 << 20)) > 1  # the crop has the ring and square


def test_tool_collapse_watch_warns_once_and_marks_every_low_step(caplog):
    from mmagent_rl.guards import ToolCollapseWatch

    watch = ToolCollapseWatch(0.2)
    with caplog.at_level("WARNING"):
        marks = [watch.update(rate, step)["tool/collapse_alarm"]
                 for step, rate in enumerate([0.9, 0.5, 0.1, 0.15, 0.6, 0.05], 1)]
    assert marks == [0.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    assert sum("tool-call collapse" in r.getMessage() for r in caplog.records) == 1
    assert ToolCollapseWatch(0.0).update(0.0, 1) == {}  # floor 0: no watch
